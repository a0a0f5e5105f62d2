"""providers.yaml: LiteLLM compatibility, validation messages, credentials, profiles, registry."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from proxy.errors import ConfigError
from proxy.providers import LocalServerConfig, ProviderRegistry, legacy_fingerprint, parse, upstream_fingerprint
from proxy.store import Store

LITELLM_CONFIG = """
model_list:
  - model_name: gpt-4o
    litellm_params:
      model: openai/gpt-4o
      api_key: os.environ/OPENAI_API_KEY
      rpm: 60
  - model_name: claude
    litellm_params:
      model: anthropic/claude-3-5-sonnet-20240620
      api_key: os.environ/ANTHROPIC_API_KEY
  - model_name: local
    litellm_params:
      model: hosted_vllm/Qwen/Qwen2.5-7B-Instruct
      api_base: http://localhost:8001/v1
      temperature: 0.2
    model_info:
      id: abc
litellm_settings:
  drop_params: true
router_settings:
  routing_strategy: simple-shuffle
general_settings:
  master_key: sk-1234
"""


def snap(text: str, env=None, tmp: Path = Path("/tmp/x/providers.yaml"), lookup=lambda n: None):
    return parse(text, tmp, env or {}, lookup)


def test_existing_litellm_model_list_loads_as_is():
    s = snap(LITELLM_CONFIG, {"OPENAI_API_KEY": "sk-a", "ANTHROPIC_API_KEY": "sk-b"})
    assert list(s.models) == ["gpt-4o", "claude", "local"]
    gpt, claude, local = s.models.values()
    assert (gpt.provider, gpt.upstream_model, gpt.api_key) == ("openai", "gpt-4o", "sk-a")
    assert gpt.fast_path and local.fast_path and not claude.fast_path  # anthropic: translated
    assert local.upstream_model == "Qwen/Qwen2.5-7B-Instruct"
    assert local.params["temperature"] == 0.2 and gpt.params["rpm"] == 60
    assert s.router.router_name == "auto"
    assert all(d.available and d.profile is None and not d.routable for d in s.models.values())
    assert "sk-a" not in repr(gpt)


def test_unresolved_env_key_marks_model_unavailable():
    s = snap(LITELLM_CONFIG, {"OPENAI_API_KEY": "sk-a"})
    assert s.models["gpt-4o"].available
    assert "ANTHROPIC_API_KEY" in s.models["claude"].unavailable
    assert [d.name for d in s.available()] == ["gpt-4o", "local"]


def test_credentials_in_api_base_beside_an_api_key_mark_the_model_unavailable():
    """One Authorization header cannot carry both: the call failed before it was sent (a 500 on
    the pass-through path), on every request routed to the model."""
    s = snap("model_list:\n"
             "  - {model_name: both, litellm_params: {model: openai/x, api_key: sk-k,"
             " api_base: 'https://u:p@host/v1'}}\n"
             "  - {model_name: url_only, litellm_params: {model: openai/x, api_base: 'https://u:p@host/v1'}}\n"
             "  - {model_name: key_only, litellm_params: {model: openai/x, api_key: sk-k,"
             " api_base: 'https://host/v1'}}\n")
    assert "user:password@" in s.models["both"].unavailable
    assert s.models["url_only"].available and s.models["key_only"].available
    header = snap("model_list:\n"
                  "  - {model_name: h, litellm_params: {model: openai/x, api_base: 'https://u:p@host/v1',"
                  " extra_headers: {authorization: Bearer t}}}\n")
    assert "extra_headers.Authorization" in header.models["h"].unavailable


def test_a_key_read_from_a_file_with_its_line_break_is_sent_without_it():
    """A secret mounted from a file (`kubectl create secret --from-file`, `KEY=$(cat f)`) ends
    in a line break: aiohttp refused the header, a 500 on every routed request."""
    s = snap(LITELLM_CONFIG, {"OPENAI_API_KEY": "sk-a\n", "ANTHROPIC_API_KEY": " \r\n"})
    assert s.models["gpt-4o"].api_key == "sk-a" and s.models["gpt-4o"].available
    assert "ANTHROPIC_API_KEY" in s.models["claude"].unavailable  # nothing but the line break


@pytest.mark.parametrize("params, words", [
    ("api_base: '127.0.0.1:11434/v1'", ["api_base", "http:// or https://", "127.0.0.1:11434/v1"]),
    ("api_base: 'htp://host/v1'", ["api_base", "http:// or https://"]),
    ("api_base: 'http:///v1'", ["api_base", "with a host"]),
    ("api_base: 'hxxp://u:secret@host/v1'", ["api_base", "http:// or https://"]),
    ("api_key: \"sk-a\\nb\"", ["api_key", "control character"]),
    ("extra_headers: {X-Team: \"t\\r1\"}", ["extra_headers.X-Team", "control character"]),
])
def test_a_model_no_call_could_be_sent_to_is_unavailable_with_the_reason(params, words):
    """Every call to it failed before leaving (a bare `connection` failure, or a 500 from
    aiohttp's header check) while /ready said it was ready."""
    s = snap("model_list:\n  - {model_name: m, litellm_params: {model: openai/x, %s}}\n"
             "  - {model_name: ok, litellm_params: {model: openai/x, api_base: 'HTTPS://host:8443/v1'}}\n"
             % params)
    why = s.models["m"].unavailable
    assert why is not None and all(w in why for w in words), why
    assert "secret" not in why and s.models["ok"].available


def test_a_tab_inside_a_header_value_is_no_control_character_http_refuses():
    s = snap("model_list:\n  - {model_name: m, litellm_params: {model: openai/x, extra_headers: {X-Note: \"a\\tb\"}}}\n")
    assert s.models["m"].available


@pytest.mark.parametrize("text, words", [
    ("model_list: []", ["model_list", "at least 1"]),
    ("model_list:\n  - model_name: a\n", ["model_list.0.litellm_params", "Field required"]),
    ("model_list:\n  - model_name: a\n    litellm_params: {model: x}\n"
     "    model_info: {input_price_per_mtok: -1}\n",
     ["model_list.0.model_info.input_price_per_mtok", "-1"]),
    ("model_list:\n  - {model_name: a, litellm_params: {model: x}}\n"
     "router_settings: {num_retries: many}\n", ["router_settings.num_retries", "'many'"]),
    ("model_list:\n  - {model_name: a, litellm_params: {model: x}}\n"
     "  - {model_name: a, litellm_params: {model: y}}\n", ["duplicate name 'a'"]),
    ("model_list:\n  - {model_name: auto, litellm_params: {model: x}}\n", ["router's name"]),
    ("- just a list", ["top level"]),
    ("model_list: [", ["not valid YAML", "line"]),
    # a local server's args may not reopen it beyond loopback or override what the proxy sets
    ("model_list:\n  - {model_name: a, litellm_params: {model: openai/a},\n"
     "     model_info: {local_server: {args: ['--n_batch', '64', '--host', '0.0.0.0']}}}\n",
     ["model_list.0.model_info.local_server.args", "--host is set by the proxy"]),
    ("model_list:\n  - {model_name: a, litellm_params: {model: openai/a},\n"
     "     model_info: {local_server: {args: ['--api-key=k']}}}\n", ["--api-key"]),
    ("model_list:\n  - {model_name: a, litellm_params: {model: openai/a},\n"  # argparse's abbreviations
     "     model_info: {local_server: {args: ['--hos', '0.0.0.0']}}}\n", ["--hos is set by the proxy"]),
    ("model_list:\n  - {model_name: a, litellm_params: {model: openai/a},\n"
     "     model_info: {local_server: {args: ['--conf=x.yaml']}}}\n", ["--conf is set by the proxy"]),
    # a clip model is loaded only by a multimodal chat format: without one, every request with
    # content parts failed with the server's 500
    ("model_list:\n  - {model_name: a, litellm_params: {model: openai/a},\n"
     "     model_info: {local_server: {args: ['--clip_model_path', 'mmproj.gguf']}}}\n",
     ["model_list.0.model_info.local_server.args", "--clip_model_path needs a multimodal --chat_format",
      "llava-1-5", "with no --chat_format"]),
    ("model_list:\n  - {model_name: a, litellm_params: {model: openai/a},\n"
     "     model_info: {local_server: {args: ['--chat_format=chatml', '--clip', 'mmproj.gguf']}}}\n",
     ["--clip_model_path needs a multimodal --chat_format", "with --chat_format chatml"]),
])
def test_validation_errors_name_file_key_and_value(text, words):
    with pytest.raises(ConfigError) as err:
        snap(text)
    assert "/tmp/x/providers.yaml" in str(err.value)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("text, expected", [
    ("model_list:\n  - {model_name: a, litellm_params: {model: x, api_key: sk-hidden-999}}\n"
     "  - {model_name: a, litellm_params: {model: y}}\n",
     "/tmp/x/providers.yaml: model_list.1.model_name: duplicate name 'a'"),
    ("model_list:\n  - {model_name: a, litellm_params: {model: x}}\nrouter_settings: {default_model: b}\n",
     "/tmp/x/providers.yaml: router_settings.default_model: 'b' is not a model_name of model_list"),
])
def test_a_check_across_the_file_names_its_key_without_dumping_the_file(text, expected):
    with pytest.raises(ConfigError) as err:
        snap(text)
    assert str(err.value) == expected


def _warnings(caplog, text: str) -> list[str]:
    """The warnings of loading ``text`` as providers.yaml."""
    with caplog.at_level("WARNING", logger="satroute.providers"):
        snap(text)
    return [r.getMessage() for r in caplog.records]


def test_a_misspelt_key_of_ours_is_a_warning(caplog):
    text = ("model_list:\n  - model_name: a\n    litellm_params: {model: x}\n"
            "    model_info: {capabilty_profile: builtin:mmlu_pro/gpt4o, mode: chat}\n"
            "router_settings: {num_retires: 5, routing_strategy: simple-shuffle}\n")
    warned = _warnings(caplog, text)
    assert any("model_list.0.model_info.capabilty_profile" in w and "capability_profile" in w for w in warned)
    assert any("router_settings.num_retires" in w and "num_retries" in w for w in warned)
    assert len(warned) == 2  # LiteLLM's own keys (mode, routing_strategy) are no typo


@pytest.mark.parametrize("text, where, meant", [
    ("model_list:\n  - {model_name: a, litellm_params: {model: x}}\nrouter_setting: {cooldown_s: 1}\n",
     "router_setting", "router_settings"),
    ("model_list:\n  - {model_name: a, litellm_params: {model: x}, modle_info: {onboard: false}}\n",
     "model_list.0.modle_info", "model_info"),
    ("model_list:\n  - {model_name: a, litellm_param: {model: x}, litellm_params: {model: x}}\n",
     "model_list.0.litellm_param", "litellm_params"),
    ("model_list:\n  - {model_name: a, litellm_params: {model: openai/a, api_bsae: 'http://h/v1'}}\n",
     "model_list.0.litellm_params.api_bsae", "api_base"),
    ("model_list:\n  - {model_name: a, litellm_params: {model: openai/a, api_kye: sk-hidden-999}}\n",
     "model_list.0.litellm_params.api_kye", "api_key"),
    # read by satroute though litellm's (a per-model timeout; parameters a provider cannot take)
    ("model_list:\n  - {model_name: a, litellm_params: {model: openai/a, timout: 5}}\n",
     "model_list.0.litellm_params.timout", "timeout"),
    ("model_list:\n  - {model_name: a, litellm_params: {model: anthropic/a, drop_param: true}}\n",
     "model_list.0.litellm_params.drop_param", "drop_params"),
])
def test_a_misspelt_key_anywhere_is_a_warning(caplog, text, where, meant):
    """Outside model_info and router_settings too: a misspelt api_base sends an openai/ model's
    prompts and key to api.openai.com, silently but for this warning."""
    warned = _warnings(caplog, text)
    assert len(warned) == 1 and f" {where} is not a key" in warned[0] and warned[0].endswith(f"{meant}?")
    assert "sk-hidden" not in caplog.text


def test_litellm_s_rate_limits_are_said_to_be_unenforced(caplog):
    """A LiteLLM model_list loads as it is; its rpm/tpm are not enforced here, and the admin who
    kept them must not believe the upstream protected."""
    text = ("model_list:\n  - {model_name: a, litellm_params: {model: openai/a, rpm: 10, tpm: 1000}}\n"
            "  - {model_name: b, litellm_params: {model: openai/b}, model_info: {max_parallel_requests: 2}}\n"
            "  - {model_name: c, litellm_params: {model: openai/c}}\n")
    warned = _warnings(caplog, text)
    assert len(warned) == 2
    assert "model_list.0.litellm_params: rpm, tpm: LiteLLM's rate limits are not enforced" in warned[0]
    assert "model_list.1.model_info: max_parallel_requests" in warned[1]


def test_a_litellm_price_that_is_no_price_is_a_warning(caplog):
    """Onboarding's spend cap counts it as free: an admin must hear so (ours are refused)."""
    text = ("model_list:\n  - model_name: a\n    litellm_params: {model: openai/a, input_cost_per_token: '$2.5e-6'}\n"
            "    model_info: {input_cost_per_token: 2.5e-06, output_cost_per_token: -1}\n"
            "  - {model_name: b, litellm_params: {model: openai/b}, model_info: {input_cost_per_token: '2.5e-06'}}\n"
            "  - {model_name: c, litellm_params: {model: openai/c, input_cost_per_token: os.environ/C_PRICE}}\n")
    warned = _warnings(caplog, text)
    # b's, a string YAML reads from 2.5e-06, is a price; c's is read from the environment
    assert len(warned) == 2, warned
    assert "model_list.0.litellm_params: input_cost_per_token: not a price" in warned[0]
    assert "model_list.0.model_info: output_cost_per_token: not a price" in warned[1]


def test_a_misspelt_model_list_is_named_in_a_warning_beside_the_error(caplog):
    with caplog.at_level("WARNING", logger="satroute.providers"), pytest.raises(ConfigError):
        snap("modle_list:\n  - {model_name: a, litellm_params: {model: x}}\n")
    assert "modle_list is not a key satroute reads; did you mean model_list?" in caplog.text


def test_litellm_own_keys_are_no_typo(caplog):
    text = """
model_list:
  - model_name: azure
    litellm_params: {model: azure/gpt-4o, api_version: '2024-02-01', rpm: 60, tpm: 1000,
                     timeout: 30, max_retries: 1, organization: org, base_model: azure/gpt-4o,
                     api_type: azure, input_cost_per_token: 0.1, custom_llm_provider: azure}
    model_info: {id: abc, mode: chat, base_model: x, max_tokens: 10}
router_settings: {routing_strategy: simple-shuffle, model_group_alias: {}}
litellm_settings: {drop_params: true}
general_settings: {master_key: sk-1234}
environment_variables: {X: y}
"""
    with caplog.at_level("WARNING", logger="satroute.providers"):
        snap(text)
    # no typo; only that its rate limits are not enforced here
    assert [r.getMessage().split(": ", 1)[1] for r in caplog.records] == [
        "model_list.0.litellm_params: rpm, tpm: LiteLLM's rate limits are not enforced by satroute "
        "(a model's 429 is retried, then cools it down)"]


def test_a_key_given_twice_is_a_warning_naming_it_and_the_last_value_counts(caplog):
    """LiteLLM (PyYAML) keeps the last value and says nothing: the file loads, with a warning.
    A YAML merge (``<<``) is no repetition."""
    text = ("base: &b {cooldown_s: 5}\n"
            "model_list:\n  - model_name: a\n    litellm_params: {model: x}\n"
            "router_settings:\n  <<: *b\n  cooldown_s: 7\n  num_retries: 1\n  num_retries: 4\n")
    with caplog.at_level("WARNING", logger="satroute.providers"):
        s = snap(text)
    assert s.router.num_retries == 4 and s.router.cooldown_s == 7
    warned = [r.getMessage() for r in caplog.records]
    assert warned == ["/tmp/x/providers.yaml: line 9: key num_retries appears twice in the same "
                      "mapping; the last value counts"]


@pytest.mark.parametrize("text", [
    "model_list:\n  - {model_name: a, litellm_params: {model: x}}\nrouter_settings:\n"
    "  # routing_strategy: simple-shuffle\n",
    "model_list:\n  - model_name: a\n    litellm_params: {model: x}\n    model_info:\n"
    "      # mode: chat\n",
    "model_list:\n  - {model_name: a, litellm_params: {model: x}}\nlitellm_settings:\n"
    "general_settings:\n",
])
def test_a_section_with_every_key_commented_out_is_an_empty_one(text):
    s = snap(text)
    assert s.router.router_name == "auto" and s.models["a"].info.onboard


def test_a_value_yaml_cannot_convert_is_a_config_error():
    """PyYAML raises ValueError (not a YAMLError) for these: it used to escape as a traceback."""
    with pytest.raises(ConfigError, match="not valid YAML") as err:
        snap("model_list:\n  - {model_name: a, litellm_params: {model: x}, model_info: {d: 2024-13-01}}\n")
    assert "2024-13" not in str(err.value)


def test_validation_errors_hide_keys():
    text = "model_list:\n  - model_name: a\n    litellm_params: {api_key: sk-hidden-999}\n"
    with pytest.raises(ConfigError) as err:
        snap(text)
    assert "sk-hidden-999" not in str(err.value) and "litellm_params" in str(err.value)


def test_profiles_from_file_builtin_and_source(tmp_path, monkeypatch):
    (tmp_path / "p.json").write_text(json.dumps({"model": "a", "suite": "s",
                                                 "tasks": {"t1": 0.7}}))
    import scorer.aptitude

    builtin = tmp_path / "pkg" / "assets" / "profiles" / "suite1"
    builtin.mkdir(parents=True)
    (builtin / "b.json").write_text(json.dumps({"model": "b", "suite": "suite1",
                                                "tasks": {"t1": 0.2}}))
    monkeypatch.setattr(scorer.aptitude, "assets_dir", lambda: tmp_path / "pkg" / "assets")
    text = """
model_list:
  - {model_name: a, litellm_params: {model: openai/a}, model_info: {capability_profile: p.json}}
  - {model_name: b, litellm_params: {model: openai/b},
     model_info: {capability_profile: "builtin:suite1/b"}}
  - {model_name: c, litellm_params: {model: openai/c}}
"""
    s = parse(text, tmp_path / "providers.yaml", {}, lambda d: {"c": {"t1": 0.9}}.get(d.name))
    assert {n: dict(d.profile) for n, d in s.models.items()} == {
        "a": {"t1": 0.7}, "b": {"t1": 0.2}, "c": {"t1": 0.9}}
    # the suite a profile file names (the admin API shows it); the store knows an onboarded one's
    assert {n: d.profile_suite for n, d in s.models.items()} == {"a": "s", "b": "suite1", "c": None}
    with pytest.raises(ConfigError) as err:
        parse(text.replace("p.json", "missing.json"), tmp_path / "providers.yaml", {}, lambda d: None)
    assert "model_list.0.model_info.capability_profile" in str(err.value)
    assert "missing.json" in str(err.value)


def test_a_builtin_profile_is_named_by_its_model_name_slash_and_all():
    """RouterDC's model names have a `/` (`meta-math/MetaMath-Mistral-7B`), as the profile file's
    own `model` field and `satroute evaluate` spell them; the file writes it `--`. Both spellings
    name the profile, as in the scorer's loader; a missing one still says what was looked for."""
    from scorer.aptitude import load_builtin_profile

    def entry(ref: str) -> str:
        return (f"model_list:\n  - {{model_name: m, litellm_params: {{model: openai/m}}, "
                f"model_info: {{capability_profile: '{ref}'}}}}\n")

    shipped = load_builtin_profile("builtin:routerdc/meta-math/MetaMath-Mistral-7B")
    for ref in ("builtin:routerdc/meta-math/MetaMath-Mistral-7B",
                "builtin:routerdc/meta-math--MetaMath-Mistral-7B"):
        d = snap(entry(ref)).models["m"]
        assert dict(d.profile) == shipped["tasks"] and d.profile_suite == "routerdc", ref
    with pytest.raises(ConfigError) as err:
        snap(entry("builtin:routerdc/meta-math/No-Such-Model"))
    said = str(err.value)
    assert "model_list.0.model_info.capability_profile" in said
    assert "'builtin:routerdc/meta-math/No-Such-Model'" in said
    assert str(Path("profiles") / "routerdc" / "meta-math--No-Such-Model.json") in said
    with pytest.raises(ConfigError, match=r"capability_profile: expected builtin:<suite>/<model>"):
        snap(entry("builtin:gpt4o"))


class Source:
    def __init__(self):
        self.profiles = {}

    def get(self, name, upstream, legacy=None, also=()):
        return self.profiles.get(name)

    def profile_suite(self, name):
        return "mmlu_pro" if name in self.profiles else None


def test_registry_profiles_from_source_and_set_profile(tmp_path):
    path = tmp_path / "providers.yaml"
    path.write_text("model_list:\n  - {model_name: new, litellm_params: {model: openai/n}}\n"
                    "  - {model_name: other, litellm_params: {model: openai/o}}\n")
    source = Source()
    reg = ProviderRegistry(path, dict, source)
    assert not reg.snapshot.models["new"].routable
    reg.set_profile("new", {"t": 0.5})  # onboarding marks it ready
    assert reg.snapshot.models["new"].routable
    source.profiles["other"] = {"t": 0.1}
    reg.refresh_profiles()
    assert reg.snapshot.models["other"].profile == {"t": 0.1}
    # a later reload keeps profiles set at run time
    path.write_text(path.read_text() + "router_settings: {router_name: best}\n")
    assert reg.reload()
    assert reg.snapshot.router.router_name == "best"
    assert reg.snapshot.models["new"].routable and reg.snapshot.models["other"].routable
    assert not reg.reload()  # unchanged


def _suites_config(*entries: tuple[str, str | None]) -> str:
    """providers.yaml with a model per (name, capability_profile or None: onboarded)."""
    lines = ["model_list:"]
    for name, ref in entries:
        info = f", model_info: {{capability_profile: '{ref}'}}" if ref else ""
        lines.append(f"  - {{model_name: {name}, litellm_params: {{model: openai/{name}}}{info}}}")
    return "\n".join(lines) + "\n"


def _mix_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "different aptitude suites" in r.getMessage()]


def test_profiles_of_different_suites_are_reported_not_compared_silently(tmp_path, caplog):
    """The same model profiled on RouterDC's 4-option questions outscores its MMLU-Pro-profiled
    self on every prompt: a mix still serves, but is logged at load and reload naming the models
    of each suite, and is listed for /ready. A model without a profile yet does not count."""
    caplog.set_level(logging.WARNING, logger="satroute.providers")
    path = tmp_path / "providers.yaml"
    path.write_text(_suites_config(("rdc", "builtin:routerdc/meta-llama--Meta-Llama-3-8B"),
                                   ("pro", "builtin:mmlu_pro/Meta-Llama-3-8B"),
                                   ("pro2", "builtin:mmlu_pro/Mistral-7B-v0.1"),
                                   ("pending", None)))
    source = Source()
    reg = ProviderRegistry(path, dict, source)
    mixed = {"routerdc": ["rdc"], "mmlu_pro": ["pro", "pro2"]}
    assert reg.snapshot.mixed_suites() == mixed
    assert all(d.routable for n, d in reg.snapshot.models.items() if n != "pending")  # still served
    [warning] = _mix_warnings(caplog)
    assert "routerdc: rdc; mmlu_pro: pro, pro2" in warning and "pending" not in warning
    reg.refresh_profiles()  # nothing changed: not said again
    assert len(_mix_warnings(caplog)) == 1
    # onboarding's profile counts with the suite the store recorded for it
    source.profiles["pending"] = {"anatomy": 0.5}
    reg.refresh_profiles()
    assert reg.snapshot.models["pending"].profile_suite == "mmlu_pro"
    assert reg.snapshot.mixed_suites() == {"routerdc": ["rdc"], "mmlu_pro": ["pro", "pro2", "pending"]}
    assert len(_mix_warnings(caplog)) == 2
    path.write_text(path.read_text() + "router_settings: {router_name: best}\n")
    assert reg.reload() and len(_mix_warnings(caplog)) == 3  # every reload says it again
    # one suite: nothing to say
    path.write_text(_suites_config(("pro", "builtin:mmlu_pro/Meta-Llama-3-8B"), ("pending", None)))
    assert reg.reload() and reg.snapshot.mixed_suites() is None and len(_mix_warnings(caplog)) == 3


def test_a_profile_naming_no_suite_is_not_taken_for_any_suite(tmp_path, caplog):
    """A profile file without ``suite`` may have been measured on anything: beside one that names
    its suite it is reported as ``unknown``; alone, or beside others like it, it is not."""
    (tmp_path / "p.json").write_text(json.dumps({"model": "a", "tasks": {"anatomy": 0.7}}))
    path = tmp_path / "providers.yaml"
    path.write_text(_suites_config(("own", "p.json"), ("own2", "p.json")))
    assert ProviderRegistry(path, dict).snapshot.mixed_suites() is None
    path.write_text(_suites_config(("own", "p.json"), ("pro", "builtin:mmlu_pro/Meta-Llama-3-8B")))
    assert ProviderRegistry(path, dict).snapshot.mixed_suites() == {"unknown": ["own"],
                                                                    "mmlu_pro": ["pro"]}


def test_registry_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        ProviderRegistry(tmp_path / "nope.yaml", dict)


def test_registry_on_a_directory_is_a_config_error(tmp_path):
    """A Kubernetes ConfigMap mounted without subPath: the path is a folder."""
    with pytest.raises(ConfigError, match="is a directory"):
        ProviderRegistry(tmp_path, dict)


def _entry(api_base: str, model: str = "openai/fresh") -> str:
    return f"model_list:\n  - {{model_name: fresh, litellm_params: {{model: {model}, api_base: '{api_base}'}}}}\n"


def test_a_stored_profile_counts_only_for_the_upstream_it_was_measured_on(tmp_path):
    """With onboarding off nothing forgets a profile when its model's upstream changes: the
    registry must not route another model with it."""
    path = tmp_path / "providers.yaml"
    path.write_text(_entry("http://a/v1"))
    with Store(tmp_path / "state") as store:
        reg = ProviderRegistry(path, dict, store)
        measured_on = upstream_fingerprint(reg.snapshot.models["fresh"])
        store.begin("fresh", "suite", total=1, upstream=measured_on)
        store.finish("fresh", "suite", {"t": 0.5})
        reg.refresh_profiles()
        assert reg.snapshot.models["fresh"].routable
        assert reg.snapshot.models["fresh"].profile_suite == "suite"  # as the store recorded it
        path.write_text(_entry("http://b/v1"))
        assert reg.reload() and not reg.snapshot.models["fresh"].routable
        path.write_text(_entry("http://a/v1", model="openai/other"))
        assert reg.reload() and reg.snapshot.models["fresh"].profile is None
        path.write_text(_entry("http://a/v1"))
        assert reg.reload() and reg.snapshot.models["fresh"].profile == {"t": 0.5}


def test_upstream_fingerprint_is_the_one_onboarding_records():
    from proxy import onboarding_service

    d = snap(_entry("http://a/v1")).models["fresh"]
    assert onboarding_service.upstream_fingerprint(d) == upstream_fingerprint(d)
    assert upstream_fingerprint(d) != upstream_fingerprint(snap(_entry("http://b/v1")).models["fresh"])


def test_the_same_upstream_written_another_way_has_the_same_fingerprint():
    """A trailing slash, the host's or scheme's case, a rotated password in the URL, or the
    provider prefix the file may leave out (openai) name the same upstream: a profile measured on
    it must not be forgotten, and the test paid again, for such an edit."""
    def fingerprint(api_base: str, model: str = "openai/fresh") -> str:
        return upstream_fingerprint(snap(_entry(api_base, model)).models["fresh"])

    same = fingerprint("http://user:pw1@h.example:8000/v1")
    for written in ("http://user:pw1@h.example:8000/v1/", "http://user:pw2@h.example:8000/v1",
                    "http://h.example:8000/v1", "HTTP://H.Example:8000/v1"):
        assert fingerprint(written) == same, written
    assert fingerprint("http://h.example:8000/v1", model="fresh") == same
    for other in ("http://h.example:8001/v1", "http://h.example:8000/v2", "https://h.example:8000/v1",
                  "http://h.example:8000/V1", "http://other.example:8000/v1"):
        assert fingerprint(other) != same, other
    assert fingerprint("http://h.example:8000/v1", model="hosted_vllm/fresh") != same
    # two names of the same machine, in general two hosts
    assert fingerprint("http://localhost:8000/v1") != fingerprint("http://127.0.0.1:8000/v1")
    assert fingerprint("http://LOCALHOST:8000/v1/") == fingerprint("http://localhost:8000/v1")


def test_the_provider_s_own_api_base_written_out_is_the_same_upstream(tmp_path):
    """OpenAI's api_base written out (or left out again) is the upstream a hosted model had: its
    profile is kept, not forgotten and the whole test paid for again (at no price, since a model
    with an api_base of its own is not priced from litellm's list)."""
    def model(api_base: str | None, name: str = "openai/gpt-4o"):
        params = {"model": name} | ({"api_base": api_base} if api_base is not None else {})
        return snap(json.dumps({"model_list": [{"model_name": "m", "litellm_params": params}]})).models["m"]

    bare = upstream_fingerprint(model(None))
    for written in ("https://api.openai.com/v1", "https://api.openai.com/v1/", "HTTPS://API.OpenAI.com/v1"):
        assert upstream_fingerprint(model(written)) == bare, written
    assert upstream_fingerprint(model(None, "gpt-4o")) == bare
    for other in ("https://api.openai.com/v2", "https://eu.api.openai.com/v1", "http://api.openai.com/v1"):
        assert upstream_fingerprint(model(other)) != bare, other
    # a model onboarded with no api_base keeps its profile when it is written out
    path = tmp_path / "providers.yaml"
    path.write_text("model_list:\n  - {model_name: m, litellm_params: {model: openai/gpt-4o}}\n")
    with Store(tmp_path / "state") as store:
        reg = ProviderRegistry(path, dict, store)
        d = reg.snapshot.models["m"]
        store.begin("m", "suite", total=1, upstream=upstream_fingerprint(d), legacy=legacy_fingerprint(d))
        store.finish("m", "suite", {"t": 0.5})
        path.write_text("model_list:\n  - {model_name: m, litellm_params: {model: openai/gpt-4o, "
                        "api_base: 'https://api.openai.com/v1/'}}\n")
        assert reg.reload() and reg.snapshot.models["m"].profile == {"t": 0.5}
        d = reg.snapshot.models["m"]
        assert not store.upstream_changed("m", upstream_fingerprint(d), legacy_fingerprint(d))


@pytest.mark.parametrize("now", [None, "https://api.openai.com/v1"])
def test_a_profile_stored_with_openai_s_api_base_written_out_by_an_earlier_version_is_kept(tmp_path, now):
    """Earlier versions fingerprinted OpenAI's api_base written out as another upstream than none:
    a row they stored so is this upstream's whether the file now writes it or not."""
    from proxy.providers import _fingerprint, earlier_forms

    base = "https://api.openai.com/v1"
    params = "{model: openai/gpt-4o" + (f", api_base: '{now}'" if now else "") + "}"
    path = tmp_path / "providers.yaml"
    path.write_text(f"model_list:\n  - {{model_name: m, litellm_params: {params}}}\n")
    with Store(tmp_path / "state") as store:
        # as a version before this one recorded it: today's form then hashed the base as written
        store.begin("m", "suite", total=1, upstream=_fingerprint("openai/gpt-4o", base),
                    legacy=_fingerprint("openai/gpt-4o", base))
        store.finish("m", "suite", {"t": 0.5})
        reg = ProviderRegistry(path, dict, store)
        d = reg.snapshot.models["m"]
        assert reg.snapshot.models["m"].profile == {"t": 0.5}
        assert not store.upstream_changed("m", upstream_fingerprint(d), legacy_fingerprint(d), earlier_forms(d))
        other = parse("model_list:\n  - {model_name: m, litellm_params: {model: openai/gpt-4o, "
                      "api_base: 'https://eu.example/v1'}}\n", path, {}, lambda d: None).models["m"]
        assert earlier_forms(other) == ()
        assert store.upstream_changed("m", upstream_fingerprint(other), legacy_fingerprint(other))


def test_models_on_one_provider_account_share_one_upstream_account():
    """Onboarding paces the models on one account together (their rate limits are the account's):
    the same provider, api_base and key, whatever the model; another key or host is another
    account. The key itself is in nothing it gives."""
    from proxy.providers import upstream_account

    def account(model: str, base: str | None, key: str | None) -> str:
        entry = {"model_name": "m", "litellm_params": {"model": model, "api_key": key}}
        if base is not None:
            entry["litellm_params"]["api_base"] = base
        return upstream_account(snap(json.dumps({"model_list": [entry]})).models["m"])

    one = account("openai/a", "http://h.example/v1", "sk-secret-1")
    assert account("openai/b", "http://h.example/v1/", "sk-secret-1") == one
    assert account("b", "HTTP://h.example/v1", "sk-secret-1") == one
    for other in (("openai/a", "http://h.example/v1", "sk-secret-2"),
                  ("openai/a", "http://other.example/v1", "sk-secret-1"),
                  ("anthropic/a", None, "sk-secret-1"), ("openai/a", None, "sk-secret-1")):
        assert account(*other) != one, other
    assert account("openai/gpt-4o", None, "k") == account("openai/gpt-4o-mini", None, "k")
    assert "secret" not in one and len(one) == 16


def test_an_upstream_account_is_whom_the_upstream_knows_the_requests_to_come_from():
    """One OpenAI key written with and without `api_base: https://api.openai.com/v1` (where it goes
    either way) was two accounts, paced apart; teams on one gateway told apart by the credentials
    in its URL or by keys in extra_headers were one, paced together. The credentials in the URL,
    the ones extra_headers carry (by any case of their name) and the organization count; other
    headers do not, and none of it is in what it gives."""
    from proxy.providers import upstream_account

    def account(**params) -> str:
        entry = {"model_name": "m", "litellm_params": {"model": "openai/a", **params}}
        return upstream_account(snap(json.dumps({"model_list": [entry]})).models["m"])

    key = account(api_key="sk-secret-1")
    assert account(api_key="sk-secret-1", api_base="https://api.openai.com/v1/") == key
    assert account(api_key="sk-secret-1", api_base="https://gw.example/v1") != key
    assert account(api_key="sk-secret-1", organization="org-secret-2") != key

    alice = account(api_base="http://alice:secret-a@gw.example/v1")
    assert account(api_base="http://alice:secret-a@GW.example/v1/", model="openai/b") == alice
    assert account(api_base="http://bob:secret-b@gw.example/v1") != alice
    assert account(api_base="http://gw.example/v1") != alice

    base = "http://gw.example/v1"
    for name in ("Authorization", "api-key", "X-API-Key", "x-goog-api-key", "OpenAI-Organization",
                 "OpenAI-Project"):
        team_a = account(api_base=base, extra_headers={name: "secret-of-team-a"})
        assert account(api_base=base, extra_headers={name.lower(): "secret-of-team-a",
                                                     "X-Title": "another app"}) == team_a, name
        assert account(api_base=base, extra_headers={name: "secret-of-team-b"}) != team_a, name
        assert account(api_base=base) != team_a, name
        assert "secret" not in team_a and len(team_a) == 16
    assert account(api_base=base, extra_headers={"X-Title": "an app"}) == account(api_base=base)
    assert "secret" not in alice + key


@pytest.mark.parametrize("asked, used", [(256, 256), (640, 768), (1000, 1024), (2048, 2048), (4000, 4096)])
def test_a_local_server_s_context_is_whole_blocks_of_256(asked, used):
    """llama.cpp pads n_ctx to a multiple of 256 while llama-cpp-python sizes its buffers by the
    number given: a request filling the padding was a 500 instead of a 400 or `length`."""
    from proxy.localserver import LocalServerSpec
    from proxy.routing import context_window

    s = snap("model_list:\n  - {model_name: m, litellm_params: {model: openai/m},\n"
             f"     model_info: {{local_server: {{n_ctx: {asked}}}}}}}\n")
    d = s.models["m"]
    assert d.info.local_server.n_ctx == used and context_window(d) == used
    command = LocalServerSpec(model_path=Path("m.gguf"), alias="m", port=28431, n_ctx=d.info.local_server.n_ctx).command()
    assert command[command.index("--n_ctx") + 1] == str(used)


def test_example_providers_yaml_loads():
    repo = Path(__file__).resolve().parents[2]
    s = parse((repo / "providers.yaml").read_text(), repo / "providers.yaml",
              {"OPENAI_API_KEY": "sk-x", "ANTHROPIC_API_KEY": "sk-y"}, lambda n: None)
    assert len(s.models) >= 3 and s.router.router_name == "auto"


def test_a_local_server_s_own_flags_and_values_are_taken():
    s = snap("model_list:\n  - {model_name: a, litellm_params: {model: openai/a},\n"
             "     model_info: {local_server: {args: ['--n_batch', '64', '--chat_format', 'model']}}}\n")
    assert s.models["a"].info.local_server.args == ["--n_batch", "64", "--chat_format", "model"]


@pytest.mark.parametrize("args, vision", [
    (["--chat_format", "llava-1-5", "--clip_model_path", "mmproj.gguf"], True),
    (["--clip=mmproj.gguf", "--chat_f=qwen2.5-vl"], True),  # argparse's abbreviations, with =
    (["--chat_format", "chatml", "--chat_format", "moondream", "--clip_model_path", "m.gguf"], True),  # the last
    (["--chat_format", "llava-1-5"], False),  # no clip model: the server cannot load its handler
    (["--chat_format", "chatml-function-calling"], False),
    ([], False),
])
def test_a_local_server_reads_images_only_with_a_clip_model_and_a_multimodal_format(args, vision):
    """llama-cpp-python's server loads an image handler only for a multimodal --chat_format; a
    --clip_model_path alone it ignores."""
    conf = LocalServerConfig(args=args)
    assert conf.vision is vision
    assert conf.own_chat_format is bool(args)


@pytest.mark.parametrize("model, params, words", [
    # a zero-width space pasted with the key: no provider's key holds one, on either path
    ("openai/x", "api_key: \"sk-abcd\\u200b\"", ["api_key", "non-ASCII", "U+200B", "position 7"]),
    ("anthropic/x", "api_key: \"sk-abcd\\u200b\"", ["api_key", "U+200B"]),
    ("openai/x", "organization: \"org-é\"", ["organization", "U+00E9"]),
    # litellm's HTTP client encodes header values as ASCII: every call failed before it left
    ("anthropic/x", "extra_headers: {X-Title: \"我的应用\"}", ["extra_headers.X-Title", "U+6211", "litellm"]),
])
def test_a_header_value_beyond_ascii_that_cannot_be_sent_makes_the_model_unavailable(model, params, words):
    s = snap("model_list:\n  - {model_name: m, litellm_params: {model: %s, %s}}\n" % (model, params))
    why = s.models["m"].unavailable
    assert why is not None and all(w in why for w in words), why
    assert "abcd" not in why  # the key itself is never quoted


def test_the_direct_path_sends_other_headers_utf8_bytes_and_stays_available():
    s = snap("model_list:\n  - {model_name: m, litellm_params: {model: openai/x,"
             " extra_headers: {X-Title: \"café\"}}}\n"
             "  - {model_name: l, litellm_params: {model: openai/x, extra_headers: {X-Title: \"café\"}},"
             " model_info: {fast_path: false}}\n")
    assert s.models["m"].available and s.models["m"].fast_path
    assert "litellm" in (s.models["l"].unavailable or "")


def test_litellms_http_client_cannot_send_a_header_value_beyond_ascii():
    """What the refusal above stands on: if httpx ever sends such values, it can go."""
    import httpx
    with pytest.raises(UnicodeEncodeError):
        httpx.Request("POST", "http://127.0.0.1:9/", headers={"X-Title": "café"})
