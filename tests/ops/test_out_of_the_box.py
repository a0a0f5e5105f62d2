"""Out of the box: `satroute serve --config providers.yaml` with no API keys and no internet routes
real requests to the built-in local model (SmolLM2 served by llama-cpp-python, started by the
proxy), through the official openai SDK, streaming and not; SIGTERM stops the child server too."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from proxy.localserver import free_port, llama_cpp_available

REPO = Path(__file__).resolve().parents[2]
KEYS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GROQ_API_KEY", "VLLM_API_BASE",
        "SATROUTE_MASTER_KEY", "SATROUTE_SCORER")

pytestmark = [pytest.mark.backbone,
              pytest.mark.skipif(not llama_cpp_available(),
                                 reason="llama-cpp-python (extra 'local') not installed")]


def _repo_config_on_free_port(tmp_path: Path) -> tuple[Path, int]:
    """The repository's providers.yaml as it is, but with the local server on a free port."""
    conf = yaml.safe_load((REPO / "providers.yaml").read_text())
    local = next(e for e in conf["model_list"] if e.get("model_info", {}).get("local_server"))
    port = free_port()
    local["model_info"]["local_server"]["port"] = port
    local["model_info"]["local_server"]["n_ctx"] = 1024
    path = tmp_path / "providers.yaml"
    path.write_text(yaml.safe_dump(conf))
    return path, port


def _wait_ready(base: str, proc: subprocess.Popen, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited: {proc.stdout.read()}")
        try:
            last = httpx.get(f"{base}/ready", timeout=2)
            if last.status_code == 200:
                return last.json()
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"not ready: {last.text if last is not None else 'no answer'}")


def _serve(tmp_path: Path, config: Path, **settings: str) -> tuple[subprocess.Popen, str]:
    """`satroute serve` on ``config`` with no provider key, on a free port: the process, its URL."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in KEYS}
    env.update(SATROUTE_STATE_DIR=str(tmp_path / "state"), SATROUTE_SHUTDOWN_TIMEOUT_S="5", **settings)
    satroute = Path(sys.executable).with_name("satroute")
    proc = subprocess.Popen([str(satroute), "serve", "--config", str(config), "--port", str(port)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    return proc, f"http://127.0.0.1:{port}"


def test_serve_routes_real_requests_to_the_local_model_without_keys(tmp_path):
    config, local_port = _repo_config_on_free_port(tmp_path)
    proc, base = _serve(tmp_path, config)
    try:
        ready = _wait_ready(base, proc)
        assert ready["models"] == ["smollm2"]
        assert {"gpt-4o", "claude-sonnet", "llama-3.1-8b"} <= set(ready["unavailable"])
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list()] == ["auto", "smollm2"]
        raw = client.chat.completions.with_raw_response.create(
            model="auto", max_tokens=12, temperature=0,
            messages=[{"role": "user", "content": "What is the capital of France?"}])
        completion = raw.parse()
        assert completion.model == "smollm2" and raw.headers["x-satroute-model"] == "smollm2"
        assert raw.headers["x-satroute-route"] == "default"
        assert completion.choices[0].message.content.strip()
        assert completion.usage.completion_tokens >= 1
        stream = client.chat.completions.create(
            model="auto", max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "Say hello."}])
        chunks = list(stream)
        assert {c.model for c in chunks} == {"smollm2"}
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
        metrics = httpx.get(f"{base}/metrics").text
        assert 'satroute_local_server_up{name="smollm2"} 1.0' in metrics
        assert 'satroute_requests_total{model="smollm2",status="200"} 2.0' in metrics
        # the local server next to the proxy answers the proxy only (and satroute onboard, which
        # reads the key this start kept in the state folder), not whoever reaches its port
        direct = f"http://127.0.0.1:{local_port}/v1/chat/completions"
        body = {"model": "smollm2", "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]}
        assert httpx.post(direct, json=body, timeout=60).status_code == 401
        key = (tmp_path / "state" / "local_server.key").read_text()
        assert httpx.post(direct, json=body, timeout=60,
                          headers={"Authorization": f"Bearer {key}"}).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
        logs = proc.stdout.read()
    assert rc == -signal.SIGTERM, logs
    assert key not in logs
    with pytest.raises(httpx.TransportError):  # the child server went down with the proxy
        httpx.get(f"http://127.0.0.1:{local_port}/v1/models", timeout=2)
    assert "shutdown complete" in logs


def test_an_edit_of_the_local_model_lets_the_answer_it_is_streaming_finish(tmp_path):
    """An edit of the local_server block restarts the child; the stream it is sending runs to its
    end first (stopped at once, llama-cpp-python's server would end it early with a bare [DONE])."""
    config, _ = _repo_config_on_free_port(tmp_path)
    proc, base = _serve(tmp_path, config, SATROUTE_RELOAD_INTERVAL_S="0.1", SATROUTE_ONBOARDING="false")
    try:
        _wait_ready(base, proc)
        conf = yaml.safe_load(config.read_text())
        local = next(e for e in conf["model_list"] if e["model_name"] == "smollm2")
        local["model_info"]["local_server"]["n_ctx"] = 768
        pieces, finish, seen_down = 0, None, False
        with httpx.stream("POST", f"{base}/v1/chat/completions", timeout=120, json={
                "model": "smollm2", "stream": True, "max_tokens": 300, "temperature": 0,
                "messages": [{"role": "user", "content": "Tell me a long story about a cat."}]}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[len("data: "):])
                assert "error" not in event, (pieces, event)  # the stream was cut
                choice = event["choices"][0]
                pieces += bool(choice["delta"].get("content"))
                finish = choice["finish_reason"] or finish
                if pieces == 1:
                    config.write_text(yaml.safe_dump(conf))  # the edit, mid-answer
                if pieces % 10 == 0 and not seen_down:
                    ready = httpx.get(f"{base}/ready", timeout=5).json()
                    seen_down = "smollm2" in ready["unavailable"]  # out of routing: on its way back
        assert seen_down, "the edit was not taken while the answer streamed"
        assert finish == "length" and pieces >= 250, (finish, pieces)
        _wait_ready(base, proc)  # back, on its new server
        deadline = time.monotonic() + 60
        while "smollm2" not in httpx.get(f"{base}/ready", timeout=5).json()["models"]:
            assert time.monotonic() < deadline, "the edited local model did not come back"
            time.sleep(0.2)
        again = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
            "model": "smollm2", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})
        assert again.status_code == 200, again.text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_the_local_model_takes_the_request_shapes_openai_takes_or_says_clearly_why_not(tmp_path):
    """llama-cpp-python's server answers some shapes OpenAI accepts with a 500 (which the proxy
    retried, answered 502 and cooled the only model for), ignores max_completion_tokens, and ends
    at once a stream whose prompt is longer than its context."""
    config, _ = _repo_config_on_free_port(tmp_path)
    proc, base = _serve(tmp_path, config, SATROUTE_ONBOARDING="false")
    try:
        _wait_ready(base, proc)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
        calls = [{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]
        shapes = {
            "text parts": [{"role": "user", "content": [{"type": "text", "text": "Say hello."}]}],
            "developer": [{"role": "developer", "content": "Be terse."}, {"role": "user", "content": "Hi"}],
            "tool result": [{"role": "user", "content": "Weather?"},
                            {"role": "assistant", "content": None, "tool_calls": calls},
                            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]}
        for name, messages in shapes.items():
            answer = client.chat.completions.create(model="smollm2", max_tokens=4, messages=messages)
            assert answer.choices[0].message.content is not None, name
        schema = {"type": "json_schema", "json_schema": {"name": "c", "schema": {
            "type": "object", "properties": {"color": {"type": "string"}}, "required": ["color"]}}}
        answer = client.chat.completions.create(model="smollm2", max_tokens=24, response_format=schema,
                                                messages=[{"role": "user", "content": "Name a color."}])
        assert answer.choices[0].message.content.lstrip().startswith("{")
        for stream in (False, True):  # honoured as max_tokens is: not written until n_ctx
            kw = dict(model="smollm2", max_completion_tokens=6, temperature=0,
                      messages=[{"role": "user", "content": "Tell me a long story about a cat."}])
            if stream:
                chunks = list(client.chat.completions.create(stream=True, **kw))
                finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
                pieces = sum(bool(c.choices and c.choices[0].delta.content) for c in chunks)
                assert finish == ["length"] and pieces <= 6
            else:
                answer = client.chat.completions.create(**kw)
                assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 6
        with pytest.raises(openai.BadRequestError, match="reads text only") as refused:
            client.chat.completions.create(model="smollm2", max_tokens=4, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}])
        assert refused.value.code == "untranslatable_request"
        # what its validation refuses is the request's 400, not its 500 with its traceback (retried,
        # and cooling the model): checked before it is sent, or read from its answer
        for name, extra in {"seed": {"seed": 2 ** 64}, "top_k": {"top_k": -1},
                            "response_format": {"response_format": "json_object"},
                            "mirostat_mode": {"mirostat_mode": 7}}.items():
            refused = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
                "model": "smollm2", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}], **extra})
            assert refused.status_code == 400 and name in refused.json()["error"]["message"], refused.text
            assert "site-packages" not in refused.text and "File " not in refused.text
        long = "The quick brown fox jumps over the lazy dog. " * 400  # ~4,000 tokens, n_ctx 1024
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as too_long:
                out = client.chat.completions.create(model="smollm2", max_tokens=4, stream=stream,
                                                     messages=[{"role": "user", "content": long}])
                list(out) if stream else None
            assert too_long.value.code == "context_length_exceeded", stream
        ready = httpx.get(f"{base}/ready", timeout=5).json()
        assert ready["cooling"] == [] and ready["models"] == ["smollm2"]  # no request cooled it
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
