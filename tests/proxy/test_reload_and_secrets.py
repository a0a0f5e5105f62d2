"""Hot reload of providers.yaml (good and bad edits) and keys never leaking anywhere."""
from __future__ import annotations

import logging
import time

import httpx
import openai
import pytest

from conftest import model_entry, write_config
from support.prometheus import scrape

MESSAGES = [{"role": "user", "content": "hi"}]


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def model_ids(proxy) -> list[str]:
    return [m["id"] for m in httpx.get(f"{proxy.url}/models").json()["data"]]


def test_good_edit_takes_effect_without_restart(tmp_path, upstream, start_proxy):
    path = write_config(tmp_path / "providers.yaml", [model_entry("m1", upstream.url, tmp_path)])
    proxy = start_proxy(path)
    assert model_ids(proxy) == ["auto", "m1"]
    write_config(path, [model_entry("m1", upstream.url, tmp_path),
                        model_entry("m9", upstream.url, tmp_path)], router_name="smart")
    assert wait_for(lambda: model_ids(proxy) == ["smart", "m1", "m9"])
    c = openai.OpenAI(base_url=proxy.url, api_key="x", max_retries=0)
    assert c.chat.completions.create(model="m9", messages=MESSAGES).model == "m9"
    assert c.chat.completions.create(model="smart", messages=MESSAGES).model == "m1"


def test_an_edit_during_the_shutdown_s_grace_period_is_logged_not_taken(tmp_path, upstream,
                                                                        start_proxy, caplog):
    """As SIGHUP then is: a reload during the grace period would start work the shutdown has
    already stopped (a local model the edit adds got its server started in the exiting process)."""
    path = write_config(tmp_path / "providers.yaml", [model_entry("m1", upstream.url, tmp_path)])
    proxy = start_proxy(path)
    caplog.set_level(logging.INFO, logger="satroute.providers")
    proxy.app.state.services.begin_shutdown()  # what SIGTERM does, before the grace period
    write_config(path, [model_entry("m1", upstream.url, tmp_path),
                        model_entry("m9", upstream.url, tmp_path)])
    time.sleep(0.6)  # six ticks of the watch: two take an edit
    assert model_ids(proxy) == ["auto", "m1"]
    assert caplog.text.count("not applied, the proxy is stopping") == 1  # once, not every tick


def test_bad_edit_is_logged_and_last_good_config_keeps_serving(tmp_path, upstream, start_proxy,
                                                               caplog):
    path = write_config(tmp_path / "providers.yaml", [model_entry("m1", upstream.url, tmp_path)])
    proxy = start_proxy(path)
    good = path.read_text()

    def rejected():  # what /ready and /metrics tell an admin who missed the log line
        ready = httpx.get(f"{proxy.base}/ready")
        assert ready.status_code == 200  # still serving: the last good configuration
        return ready.json()["config_rejected"], scrape(proxy.base)[("satroute_config_rejected", ())]

    assert rejected() == (None, 0)
    caplog.set_level(logging.ERROR, logger="satroute.providers")
    path.write_text("model_list:\n  - model_name: m2\n    litellm_params: {api_base: x}\n")
    assert wait_for(lambda: "rejected" in caplog.text)
    assert "model_list.0.litellm_params.model" in caplog.text and str(path) in caplog.text
    why, flag = rejected()
    assert flag == 1 and str(path) in why and "model_list.0.litellm_params.model" in why
    assert model_ids(proxy) == ["auto", "m1"]
    c = openai.OpenAI(base_url=proxy.url, api_key="x", max_retries=0)
    assert c.chat.completions.create(model="auto", messages=MESSAGES).model == "m1"
    path.write_text(": : not yaml [")
    assert wait_for(lambda: "not valid YAML" in caplog.text)
    assert "not valid YAML" in rejected()[0]
    # /ready is open: a rejected edit's values are redacted there as in the log
    path.write_text("model_list:\n  - litellm_params: {model: openai/x, extra_headers: {X-Org: sk-proj-ABCDEFGH1234}}\n")
    assert wait_for(lambda: "X-Org" in (rejected()[0] or ""))
    assert "sk-proj-ABCDEFGH1234" not in rejected()[0] and "[redacted]" in rejected()[0]
    assert c.chat.completions.create(model="auto", messages=MESSAGES).model == "m1"
    path.unlink()  # unreadable (an editor that moves the file away and back)
    assert wait_for(lambda: rejected()[0] == f"{path}: file not found")
    path.write_text(good)  # the file served, back as it was
    assert wait_for(lambda: rejected() == (None, 0))


def test_keys_never_appear_in_output_logs_or_errors(tmp_path, upstream, start_proxy, caplog,
                                                    monkeypatch):
    secret = "sk-live-SECRET-0123456789"
    monkeypatch.setenv("TEST_UPSTREAM_KEY", secret)
    caplog.set_level(logging.DEBUG)
    models = [model_entry("m1", upstream.url, tmp_path, key="os.environ/TEST_UPSTREAM_KEY"),
              model_entry("m2", upstream.url, tmp_path, key="os.environ/TEST_UPSTREAM_KEY",
                          fast_path=False)]
    path = write_config(tmp_path / "providers.yaml", models)
    proxy = start_proxy(path)
    # the upstream gets the key ...
    c = openai.OpenAI(base_url=proxy.url, api_key="x", max_retries=0)
    c.chat.completions.create(model="m1", messages=MESSAGES)
    assert upstream.received[-1].headers["authorization"] == f"Bearer {secret}"
    # ... but an upstream error echoing it is redacted, on both paths
    seen = []
    for name in ("m1", "m2"):
        upstream.set(name, __import__("support.mock_upstream").mock_upstream.fail(
            401, f"Incorrect API key provided: {secret}", f"invalid_key:{secret}"))  # type too
        r = httpx.post(f"{proxy.url}/chat/completions", json={"model": name, "messages": MESSAGES},
                       timeout=60)
        assert r.status_code == 401
        seen.append(r.text)
    seen += [httpx.get(f"{proxy.url}/models").text, httpx.get(f"{proxy.base}/ready").text]
    # a bad edit whose error would show the key
    path.write_text(path.read_text().replace("os.environ/TEST_UPSTREAM_KEY", "[" + secret))
    assert wait_for(lambda: "rejected" in caplog.text)
    assert all(secret not in text for text in seen)
    assert secret not in caplog.text
    assert "***" in seen[0]


def test_unresolved_key_makes_model_unavailable_and_is_logged(tmp_path, upstream, start_proxy,
                                                              caplog, monkeypatch):
    monkeypatch.delenv("MISSING_KEY_VAR", raising=False)
    caplog.set_level(logging.WARNING, logger="satroute.providers")
    models = [model_entry("m1", upstream.url, tmp_path),
              model_entry("m2", upstream.url, tmp_path, key="os.environ/MISSING_KEY_VAR")]
    proxy = start_proxy(write_config(tmp_path / "providers.yaml", models))
    assert "m2 unavailable" in caplog.text and "MISSING_KEY_VAR" in caplog.text
    assert model_ids(proxy) == ["auto", "m1"]
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=proxy.url, api_key="x", max_retries=0).chat.completions.create(
            model="m2", messages=MESSAGES)


def test_an_edit_that_is_not_utf8_or_names_an_unset_model_never_ends_hot_reload(tmp_path, upstream,
                                                                               start_proxy, caplog):
    """Such edits used to raise something other than a ConfigError: the watcher died (no later
    edit was ever applied) and its log line quoted the file, keys included."""
    from proxy.errors import ConfigError
    from proxy.providers import ProviderRegistry

    path = write_config(tmp_path / "providers.yaml", [model_entry("m1", upstream.url, tmp_path)])
    proxy = start_proxy(path)
    caplog.set_level(logging.ERROR)
    latin1 = path.read_text().replace("model_list:", "# café\nmodel_list:", 1)
    latin1 += "# api_key: sk-literal-KEY-9876543210\n"
    path.write_bytes(latin1.encode("latin-1"))
    assert wait_for(lambda: "not UTF-8" in caplog.text)
    assert "sk-literal-KEY" not in caplog.text and "café" not in caplog.text
    entries = [model_entry("m1", upstream.url, tmp_path), model_entry("m2", upstream.url, tmp_path)]
    entries[1]["litellm_params"]["model"] = "os.environ/SATROUTE_TEST_UNSET_MODEL"
    write_config(path, entries)
    assert wait_for(lambda: "m2" in httpx.get(f"{proxy.base}/ready").json()["unavailable"])
    assert "SATROUTE_TEST_UNSET_MODEL" in httpx.get(f"{proxy.base}/ready").json()["unavailable"]["m2"]
    write_config(path, [model_entry("m1", upstream.url, tmp_path), model_entry("m3", upstream.url, tmp_path)])
    assert wait_for(lambda: model_ids(proxy) == ["auto", "m1", "m3"])  # the watcher lives on
    path.write_bytes(latin1.encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):  # and at start-up: the usual clear error
        ProviderRegistry(path, dict)


def test_a_key_echoed_across_the_cut_of_a_non_json_error_body_is_still_redacted():
    from proxy.upstream import classify

    key = "sk-proj-REVIEWKEY0123456789abcdefABCDE"
    body = b"<html>" + b"x" * 270 + b" you sent Bearer " + key.encode() + b"</html>"  # the key spans byte 300
    for status in (401, 502):
        err = classify(status, body, "m1", {}, lambda text: text.replace(key, "***"))
        assert "REVIEWKEY" not in err.message and "***" in err.message


def test_a_rejected_edit_never_shows_credentials_a_url_carries(tmp_path):
    from proxy.errors import ConfigError
    from proxy.providers import ProviderRegistry

    path = tmp_path / "providers.yaml"
    path.write_text("model_list:\n  - model_name: m1\n    litellm_params:\n"
                    "      api_base: https://admin:hunter2pass@llm.example/v1?apikey=QWERTY123456\n")
    with pytest.raises(ConfigError) as err:  # no litellm_params.model: rejected, the entry shown
        ProviderRegistry(path, dict)
    message = str(err.value)
    assert "litellm_params.model" in message and "llm.example/v1" in message
    assert "hunter2pass" not in message and "QWERTY123456" not in message


@pytest.mark.parametrize("api_base, shown, hidden", [
    ("vllm.internal:8000/v1?access_token=tok_5e6f7a8b9c0d", "vllm.internal:8000/v1", "tok_5e6f7a8b9c0d"),
    ("hxxp://admin:hunter2pass@10.20.30.40:9999/v1?k=QWERTY1", "hxxp://10.20.30.40:9999/v1", "hunter2pass"),
    ("admin:hunter2pass@10.20.30.40:9999/v1", None, "hunter2pass"),
])
def test_an_api_base_no_call_could_use_is_shown_without_its_query_or_credentials(tmp_path, api_base, shown,
                                                                                 hidden):
    """The reason a model is unavailable goes to the log and to the open /ready: it quoted the
    whole value, a token in its query string included."""
    from proxy.providers import parse

    snap = parse("model_list:\n  - {model_name: m, litellm_params: {model: openai/x, api_base: '%s'}}\n"
                 % api_base, tmp_path / "providers.yaml", {}, lambda d: None)
    why = snap.models["m"].unavailable
    assert why is not None and "not an http:// or https:// URL" in why
    assert hidden not in why and "QWERTY1" not in why and "?" not in why
    assert (f"({shown!r})" in why) if shown else why.endswith("with a host")


def test_ready_shows_every_reason_with_the_configuration_s_secrets_redacted(tmp_path, upstream, start_proxy,
                                                                           monkeypatch):
    """/ready answers without a key: an api_base read from the environment (a value of its length
    counts as a secret) was shown whole in the model's reason, a token in its path included."""
    token = "tok_9f8e7d6c5b4a39281706"
    monkeypatch.setenv("GW_BASE", f"gw.internal:8080/{token}/v1")
    gateway = model_entry("gw", upstream.url, tmp_path)
    gateway["litellm_params"]["api_base"] = "os.environ/GW_BASE"
    proxy = start_proxy(write_config(tmp_path / "providers.yaml", [model_entry("m1", upstream.url, tmp_path),
                                                                  gateway]))
    ready = httpx.get(f"{proxy.base}/ready")
    assert ready.status_code == 200 and "gw" in ready.json()["unavailable"]
    assert "[redacted]" in ready.json()["unavailable"]["gw"]
    assert token not in ready.text


def test_a_placeholder_key_a_model_name_holds_is_not_redacted_out_of_the_name(tmp_path, upstream,
                                                                              start_proxy):
    """Ollama's `api_key: ollama` and LM Studio's `lm-studio` are placeholders: redacted as secrets,
    /ready listed `[redacted]-qwen`, and of two unusable models one, under the same name."""
    ollama = model_entry("ollama-qwen", "localhost:11434/v1", tmp_path)
    ollama["litellm_params"]["api_key"] = "ollama"
    studio = model_entry("lm-studio-qwen", "localhost:1234/v1", tmp_path)
    studio["litellm_params"]["api_key"] = "lm-studio"
    proxy = start_proxy(write_config(tmp_path / "providers.yaml", [model_entry("m1", upstream.url, tmp_path),
                                                                  ollama, studio]))
    ready = httpx.get(f"{proxy.base}/ready").json()
    assert set(ready["unavailable"]) == {"ollama-qwen", "lm-studio-qwen"}
    assert "[redacted]" not in str(ready)


def test_a_key_read_from_the_environment_stays_a_secret_whatever_model_names_hold(tmp_path):
    """Only a placeholder written as the entry's own key and held by its own name or id is
    exempt: a real key another entry's model id happens to contain is redacted."""
    from proxy.providers import ProviderRegistry

    path = tmp_path / "providers.yaml"
    path.write_text(
        "model_list:\n"
        "  - {model_name: prod-gpt, litellm_params: {model: openai/gpt, api_key: os.environ/VLLM_KEY}}\n"
        "  - {model_name: big, litellm_params: {model: mistral/mistral-large-latest, api_key: sk-big-01}}\n"
        "  - {model_name: ollama-qwen, litellm_params: {model: openai/qwen, api_key: ollama}}\n")
    registry = ProviderRegistry(path, lambda: {"VLLM_KEY": "large-latest"})
    assert set(registry.snapshot.secrets) == {"large-latest", "sk-big-01"}


def test_placeholder_keys_written_twice_held_by_another_entry_or_empty(tmp_path):
    """A placeholder is exempt wherever the file writes it (also in extra_headers) and whichever
    model's name holds it; an empty key (a keyless server) is no secret and no fault."""
    from proxy.providers import ProviderRegistry

    path = tmp_path / "providers.yaml"
    path.write_text(
        "model_list:\n"
        "  - {model_name: llama3, litellm_params: {model: openai/llama3, api_key: ollama,"
        " extra_headers: {api-key: ollama}}}\n"
        "  - {model_name: ollama-qwen, litellm_params: {model: ollama/qwen2.5}}\n"
        "  - {model_name: vllm, litellm_params: {model: openai/v, api_key: ''}}\n")
    registry = ProviderRegistry(path, dict)
    assert registry.snapshot.secrets == () and set(registry.snapshot.models) == {"llama3", "ollama-qwen", "vllm"}
    assert registry.snapshot.redact("ollama-qwen") == "ollama-qwen"


def test_an_edit_s_own_secrets_are_redacted_in_what_it_makes_the_registry_log(tmp_path, caplog):
    """The log redacts the secrets of the configuration served: the lines about an edit being
    taken in (a model it makes unavailable) are written before it serves, so they are redacted
    with the edit's own secrets, as at start-up."""
    from proxy.providers import ProviderRegistry

    token = "tok_0a1b2c3d4e5f6a7b8c9d"
    env = {"GW_BASE": f"gw.internal:8080/{token}/v1"}
    path = tmp_path / "providers.yaml"
    path.write_text("model_list:\n  - {model_name: m1, litellm_params: {model: openai/m1}}\n")
    registry = ProviderRegistry(path, lambda: env)
    caplog.set_level(logging.WARNING, logger="satroute.providers")
    path.write_text(path.read_text()
                    + "  - {model_name: gw, litellm_params: {model: openai/b, api_base: os.environ/GW_BASE}}\n")
    assert registry.reload()
    assert "model gw unavailable: " in caplog.text and "[redacted]" in caplog.text
    assert token not in caplog.text


def test_environment_references_and_secrets_are_found_at_any_depth(tmp_path, monkeypatch):
    from proxy.providers import ProviderRegistry

    monkeypatch.setenv("HDR_KEY", "azkey-9f8e7d6c5b4a3")
    monkeypatch.setenv("SA_JSON", '{"type": "service_account", "private": "x"}')
    monkeypatch.setenv("SHORT", "30")
    path = tmp_path / "providers.yaml"
    path.write_text("model_list:\n  - model_name: m1\n    litellm_params:\n      model: openai/x\n"
                    "      extra_headers: {api-key: os.environ/HDR_KEY, x-literal-token: tok-LITERAL-123}\n"
                    "      vertex_credentials: os.environ/SA_JSON\n      timeout: os.environ/SHORT\n"
                    "  - model_name: m2\n    litellm_params:\n      model: openai/y\n"
                    "      extra_headers: {api-key: os.environ/SATROUTE_TEST_NOT_SET}\n")
    snap = ProviderRegistry(path, lambda: dict(__import__("os").environ)).snapshot
    m1 = snap.models["m1"]
    assert m1.params["extra_headers"] == {"api-key": "azkey-9f8e7d6c5b4a3", "x-literal-token": "tok-LITERAL-123"}
    assert m1.available and m1.params["timeout"] == "30"
    for secret in ("azkey-9f8e7d6c5b4a3", "tok-LITERAL-123", '{"type": "service_account", "private": "x"}'):
        assert secret in snap.secrets
    assert "30" not in snap.secrets  # a short setting is not a secret: it would blank out any "30"
    assert not snap.models["m2"].available and "SATROUTE_TEST_NOT_SET" in snap.models["m2"].unavailable
    assert "the key azkey-9f8e7d6c5b4a3" not in snap.redact("the key azkey-9f8e7d6c5b4a3")


def _profiled(path, profile="p.json"):
    """providers.yaml with one model whose profile is the file ``profile`` beside it."""
    path.write_text("model_list:\n  - model_name: m1\n    litellm_params: {model: openai/m1}\n"
                    f"    model_info: {{capability_profile: {profile}}}\n")
    return path


def _profile(path, acc):
    path.write_text(f'{{"suite": "s", "tasks": {{"t": {acc}}}}}')


def test_an_edited_profile_file_is_reloaded(tmp_path):
    from proxy.providers import ProviderRegistry

    _profile(tmp_path / "p.json", 0.5)
    reg = ProviderRegistry(_profiled(tmp_path / "providers.yaml"), dict)
    assert not reg.reload()
    _profile(tmp_path / "p.json", 0.9)  # providers.yaml itself unchanged
    assert reg.reload() and reg.snapshot.models["m1"].profile == {"t": 0.9}
    assert not reg.reload()


def test_an_edit_rejected_for_a_missing_profile_file_is_applied_once_the_file_appears(tmp_path, caplog):
    """The admin saves providers.yaml a moment before copying the profile it names."""
    from proxy.providers import ProviderRegistry

    path = tmp_path / "providers.yaml"
    path.write_text("model_list:\n  - {model_name: m0, litellm_params: {model: openai/m0}}\n")
    reg = ProviderRegistry(path, dict)
    caplog.set_level(logging.ERROR, logger="satroute.providers")
    _profiled(path, "new.json")
    assert not reg.reload() and not reg.reload()
    assert [r.getMessage().count("reload rejected") for r in caplog.records] == [1]  # once
    assert "new.json" in caplog.text
    _profile(tmp_path / "new.json", 0.7)
    assert reg.reload() and reg.snapshot.models["m1"].profile == {"t": 0.7}


async def test_the_watch_sees_an_edit_of_the_same_size_and_mtime(tmp_path):
    """A file system with a coarse timestamp (1 or 2 s) gives two quick saves the same mtime."""
    import asyncio
    import os

    from proxy.providers import ProviderRegistry

    path = tmp_path / "providers.yaml"

    def save(cooldown):
        path.write_text("model_list:\n  - {model_name: a, litellm_params: {model: openai/a}}\n"
                        f"router_settings: {{cooldown_s: {cooldown}}}\n")

    save(10)
    reg = ProviderRegistry(path, dict)
    watch = asyncio.create_task(reg.watch(0.01))
    try:
        save(30)
        stamp = os.stat(path)
        assert await _until(lambda: reg.snapshot.router.cooldown_s == 30)
        save(60)
        os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
        assert await _until(lambda: reg.snapshot.router.cooldown_s == 60)
    finally:
        watch.cancel()


async def test_the_watch_logs_a_failure_once_not_every_tick(tmp_path, caplog):
    import asyncio

    from proxy.providers import ProviderRegistry

    path = tmp_path / "providers.yaml"
    path.write_text("model_list:\n  - {model_name: a, litellm_params: {model: openai/a}}\n")
    good = path.read_text()
    reg = ProviderRegistry(path, dict)
    caplog.set_level(logging.INFO, logger="satroute.providers")
    watch = asyncio.create_task(reg.watch(0.005))
    try:
        path.unlink()
        assert await _until(lambda: "file not found" in caplog.text)
        await asyncio.sleep(0.1)  # many ticks
        path.write_text("model_list: [")
        assert await _until(lambda: "rejected" in caplog.text)
        await asyncio.sleep(0.1)
        path.write_text(good)
        await asyncio.sleep(0.1)
    finally:
        watch.cancel()
    logged = [r.getMessage().split(": ")[0] for r in caplog.records]
    assert logged == ["config reload failed, keeping the last good configuration",
                      "config reload rejected, keeping the last good configuration",
                      f"config reloaded from {path}"]


async def _until(predicate, timeout: float = 5.0) -> bool:
    import asyncio

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return False


def test_the_watch_takes_an_edit_only_once_it_reads_the_same_twice(tmp_path):
    """An editor that truncates then writes in pieces: its first piece may be valid YAML (one model
    of two, an api_base cut short). Taken, it would fail requests naming the missing model and make
    onboarding forget a model's stored answers for an upstream it never had."""
    from proxy.providers import ProviderRegistry

    path = tmp_path / "providers.yaml"
    whole = ("model_list:\n  - {model_name: a, litellm_params: {model: openai/a, api_base: 'http://127.0.0.1:3000/v1'}}\n"
             "  - {model_name: b, litellm_params: {model: openai/b}}\n")
    path.write_text("model_list:\n  - {model_name: a, litellm_params: {model: openai/a}}\n")
    reg = ProviderRegistry(path, dict)
    path.write_text(whole[:whole.index("  - {model_name: b")])  # the first piece: valid on its own
    assert not reg.reload(settle=True)  # seen once
    path.write_text(whole)  # the rest lands before the next tick
    assert not reg.reload(settle=True)  # changed again: seen once more
    assert list(reg.snapshot.models) == ["a"] and reg.snapshot.models["a"].api_base is None
    assert reg.reload(settle=True)  # the same bytes twice: taken
    assert list(reg.snapshot.models) == ["a", "b"] and not reg.reload(settle=True)
    assert reg.snapshot.models["a"].api_base == "http://127.0.0.1:3000/v1"
