"""Graceful shutdown of a real ``satroute serve`` process: SIGTERM stops accepting connections, lets
in-flight streams finish within the deadline, cuts what outlives it with an answer the SDK
understands, runs the shutdown that saves state, and exits by the signal. SIGHUP ends nothing."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from proxy.localserver import free_port
from tests.support.mock_upstream import MockUpstream, answer

REPO = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, upstream: str) -> Path:
    path = tmp_path / "providers.yaml"
    path.write_text(
        "model_list:\n"
        "  - model_name: m1\n"
        "    litellm_params: {model: openai/m1, api_base: '%s', api_key: sk-test-abcdefgh1234}\n"
        % upstream)
    return path


def _serve(config: Path, port: int, tmp_path: Path, deadline_s: float,
           env: dict[str, str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "SATROUTE_SHUTDOWN_TIMEOUT_S": str(deadline_s),
           "SATROUTE_STATE_DIR": str(tmp_path / "state"), "SATROUTE_SCORER": "constant",
           "SATROUTE_ONBOARDING": "false", **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config), "--port", str(port)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited early: {proc.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("serve did not start")


def _stream(port: int, out: dict, first: threading.Event, model: str = "m1") -> None:
    chunks = []
    try:
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30,
                          json={"model": model, "stream": True,
                                "messages": [{"role": "user", "content": "hi"}]}) as response:
            out["status"] = response.status_code
            for line in response.iter_lines():
                if line.startswith("data: "):
                    chunks.append(line[6:])
                    first.set()
    except httpx.HTTPError as exc:
        out["error"] = type(exc).__name__
    finally:
        out["chunks"] = chunks
        first.set()


def _json_lines(text: str) -> list[dict]:
    lines = []
    for line in text.splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


def test_sigterm_lets_an_in_flight_stream_finish_refuses_new_connections_and_exits_cleanly(
        tmp_path):
    with MockUpstream() as up:
        up.set("m1", answer("one two three four five six", chunks=6, chunk_delay=0.4))
        port = free_port()
        proc = _serve(_config(tmp_path, up.url), port, tmp_path, deadline_s=15)
        out, first = {}, threading.Event()
        client = threading.Thread(target=_stream, args=(port, out, first))
        client.start()
        assert first.wait(15), "the stream never started"
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
        client.join(20)
        rc = proc.wait(20)
        logs = proc.stdout.read()
    assert rc == -signal.SIGTERM, logs  # uvicorn re-raises SIGTERM once it has shut down
    assert out["status"] == 200 and "error" not in out, out
    assert out["chunks"][-1] == "[DONE]"
    text = "".join(json.loads(c)["choices"][0]["delta"].get("content") or ""
                   for c in out["chunks"][:-1] if json.loads(c)["choices"])
    assert text.split() == "one two three four five six".split()
    lines = _json_lines(logs)
    request_lines = [entry for entry in lines if entry.get("path") == "/v1/chat/completions"]
    assert len(request_lines) == 1 and request_lines[0]["status"] == 200
    assert any(entry.get("msg") == "shutdown complete" for entry in lines), logs
    assert "sk-test-abcdefgh1234" not in logs


def test_sigterm_cuts_a_stream_that_outlives_the_deadline(tmp_path):
    with MockUpstream() as up:
        up.set("m1", answer("slow " * 40, chunks=40, chunk_delay=0.5))
        port = free_port()
        proc = _serve(_config(tmp_path, up.url), port, tmp_path, deadline_s=1)
        out, first = {}, threading.Event()
        client = threading.Thread(target=_stream, args=(port, out, first))
        client.start()
        assert first.wait(15)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(15)
        took = time.monotonic() - started
        client.join(10)
        logs = proc.stdout.read()
    assert rc == -signal.SIGTERM, logs  # uvicorn re-raises SIGTERM once it has shut down
    assert took < 6, f"shutdown took {took:.1f} s with a 1 s deadline"
    assert out["chunks"][-1:] != ["[DONE]"]
    # it ends in an error event the SDK raises on, not in a truncated body
    assert json.loads(out["chunks"][-1])["error"]["code"] == "shutting_down", out
    assert "error" not in out, out
    lines = _json_lines(logs)
    assert any(entry.get("msg") == "shutdown complete" for entry in lines), logs
    [line] = [entry for entry in lines if entry.get("path") == "/v1/chat/completions"]
    assert (line["status"], line["error"]) == (200, "shutting_down")
    assert not [entry for entry in lines if entry.get("level") == "error"
                and "Exception in ASGI application" in entry.get("msg", "")], logs


def test_sigterm_answers_a_request_that_outlives_the_deadline_with_a_503_and_logs_its_route(tmp_path):
    import sqlite3

    import openai

    with MockUpstream() as up:
        up.set("m1", answer("late", delay=8))
        config = _config(tmp_path, up.url)
        profile = tmp_path / "m1.json"
        profile.write_text('{"tasks": {"t1": 0.5}}')
        config.write_text(config.read_text() + "    model_info: {capability_profile: m1.json}\n")
        port = free_port()
        proc = _serve(config, port, tmp_path, deadline_s=1)
        out = {}

        def ask():
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
            try:
                client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "hi"}])
            except openai.APIStatusError as exc:
                out["status"], out["code"] = exc.status_code, exc.code
                out["retry_after"] = exc.response.headers.get("retry-after")
                out["request_id"] = exc.response.headers.get("x-request-id")

        client = threading.Thread(target=ask)
        client.start()
        deadline = time.monotonic() + 10
        while not up.bodies("m1"):  # the request reached the upstream
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        client.join(10)
        logs = proc.stdout.read()
    assert (out.get("status"), out.get("code"), out.get("retry_after")) == (503, "shutting_down", "1"), logs
    lines = _json_lines(logs)
    assert not [entry for entry in lines if "Exception in ASGI application" in entry.get("msg", "")], logs
    with sqlite3.connect(tmp_path / "state" / "satroute.db") as db:
        rows = db.execute("SELECT request_id, chosen FROM routing_log").fetchall()
    assert rows == [(out["request_id"], "")], rows


def test_sigterm_mid_onboarding_stores_the_answers_to_the_questions_already_sent(tmp_path):
    """The questions out at SIGTERM are paid for: they are answered and stored within the grace
    period, and none is sent after the signal, even while a client's stream still runs (the
    onboarding stops asking at the signal, not once the requests are done), so the next start
    asks none of them again."""
    from proxy.store import Store
    from tests.onboarding.fakes import tiny_suite_files

    suite, data = tiny_suite_files(tmp_path, n_tasks=2, per_task=5)
    with MockUpstream() as up:
        up.set("m1", answer("The answer is (A).", delay=2.0))
        up.set("m2", answer("one two three four five six", chunks=6, chunk_delay=1.0))
        config = _config(tmp_path, up.url)
        config.write_text(config.read_text() + (
            "  - model_name: m2\n"
            "    litellm_params: {model: openai/m2, api_base: '%s', api_key: sk-test-abcdefgh1234}\n"
            "    model_info: {onboard: false}\n" % up.url))
        port = free_port()
        env = {"SATROUTE_ONBOARDING": "true", "SATROUTE_ONBOARDING_SUITE": str(suite),
               "SATROUTE_ONBOARDING_DATA": str(data), "SATROUTE_ONBOARDING_CONCURRENCY": "2"}
        proc = _serve(config, port, tmp_path, deadline_s=15, env=env)
        deadline = time.monotonic() + 30
        while len(up.bodies("m1")) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(up.bodies("m1")) == 2, "the test never started"
        out, first = {}, threading.Event()
        client = threading.Thread(target=_stream, args=(port, out, first, "m2"))
        client.start()
        assert first.wait(15), "the stream never started"
        proc.send_signal(signal.SIGTERM)
        client.join(20)
        rc = proc.wait(20)
        logs = proc.stdout.read()
        sent = len(up.bodies("m1"))
    assert rc == -signal.SIGTERM, logs
    assert out["status"] == 200 and out["chunks"][-1] == "[DONE]", out
    assert sent == 2, logs  # nothing asked after the signal, though the stream ran 6 s more
    with Store(tmp_path / "state") as store:
        progress = store.progress("m1")
        assert len(store.answered("m1")) == 2, logs  # both answers stored
    assert (progress.status, progress.reason, progress.owner) == ("pending", "interrupted", None)
    assert any(entry.get("msg") == "shutdown complete" for entry in _json_lines(logs)), logs


def _serve_again(config: Path, port: int, tmp_path: Path) -> subprocess.CompletedProcess:
    """``satroute serve`` run to its end, as ``_serve`` starts it."""
    env = {**os.environ, "SATROUTE_STATE_DIR": str(tmp_path / "state"), "SATROUTE_SCORER": "constant",
           "SATROUTE_ONBOARDING": "false"}
    return subprocess.run([sys.executable, "-m", "proxy.cli", "serve", "--config", str(config), "--port", str(port)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_serve_on_a_port_in_use_exits_2_in_one_line_before_starting_anything(tmp_path):
    """A port already in use: one line naming it and why, exit 2 as for the other start-up
    errors, before the app is built (uvicorn found it only once the app, its local model servers
    and onboarding had started, and stopped them again: exit 3, a status documented nowhere)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _serve_again(_config(tmp_path, "http://127.0.0.1:9/v1"), port, tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr == (f"satroute: cannot listen on 127.0.0.1:{port}: Address already in use; another process "
                           "listens there (a satroute serve already running?): stop it, or choose another port "
                           "(--port, SATROUTE_PORT)\n")
    assert not (tmp_path / "state").exists()  # nothing was started: no store opened, no key made


def test_a_second_serve_on_the_port_of_a_running_one_exits_2_and_leaves_it_serving(tmp_path):
    with MockUpstream() as up:
        up.set("m1", answer("still here"))
        config, port = _config(tmp_path, up.url), free_port()
        proc = _serve(config, port, tmp_path, deadline_s=5)
        try:
            done = _serve_again(config, port, tmp_path)
            assert done.returncode == 2, done.stdout + done.stderr
            assert done.stderr.startswith(f"satroute: cannot listen on 127.0.0.1:{port}: Address already in use")
            reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30, json={
                "model": "m1", "messages": [{"role": "user", "content": "hi"}]})
            assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == "still here"
        finally:
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(20)
        logs = proc.stdout.read()
    assert rc == -signal.SIGTERM, logs
    assert any(entry.get("msg") == f"Uvicorn running on http://127.0.0.1:{port} (Press CTRL+C to quit)"
               for entry in _json_lines(logs)), logs


def test_sighup_checks_providers_yaml_at_once_and_never_stops_the_proxy(tmp_path):
    """SIGHUP (systemd's ExecReload=, nginx's and HAProxy's reload, a closed terminal) ended the
    process at once, cutting a request in flight. It takes an edit now, without waiting for the
    watch (an hour apart here); an invalid file is reported and the last good configuration
    serves on; the request in flight is answered; SIGTERM still ends it gracefully."""
    with MockUpstream() as up:
        up.set("m1", answer("late but whole", delay=2))
        up.set("m2", answer("from m2"))
        config = _config(tmp_path, up.url)
        port = free_port()
        proc = _serve(config, port, tmp_path, deadline_s=5, env={"SATROUTE_RELOAD_INTERVAL_S": "3600"})
        base = f"http://127.0.0.1:{port}"
        try:
            out = {}

            def ask():
                out["response"] = httpx.post(f"{base}/v1/chat/completions", timeout=30, json={
                    "model": "m1", "messages": [{"role": "user", "content": "hi"}]})

            client = threading.Thread(target=ask)
            client.start()
            deadline = time.monotonic() + 10
            while not up.bodies("m1"):  # the request reached the upstream
                assert time.monotonic() < deadline, "the request never reached the upstream"
                time.sleep(0.05)
            proc.send_signal(signal.SIGHUP)  # nothing changed: checked, and nothing else
            client.join(20)
            assert out["response"].status_code == 200, out["response"].text
            assert out["response"].json()["choices"][0]["message"]["content"] == "late but whole"

            def models() -> list[str]:
                return [m["id"] for m in httpx.get(f"{base}/v1/models", timeout=5).json()["data"]]

            def soon(check) -> bool:
                deadline = time.monotonic() + 10
                while not check():
                    if time.monotonic() > deadline:
                        return False
                    time.sleep(0.05)
                return True

            config.write_text(config.read_text() + (
                "  - model_name: m2\n"
                "    litellm_params: {model: openai/m2, api_base: '%s', api_key: sk-test-abcdefgh1234}\n"
                % up.url))
            proc.send_signal(signal.SIGHUP)
            assert soon(lambda: "m2" in models()), models()
            config.write_text(config.read_text() + "  - {model_name: m3}\n")  # no litellm_params
            proc.send_signal(signal.SIGHUP)
            assert soon(lambda: httpx.get(f"{base}/ready", timeout=5).json()["config_rejected"])
            assert models() == ["auto", "m1", "m2"]  # the last good configuration
            assert httpx.post(f"{base}/v1/chat/completions", timeout=10, json={
                "model": "m2", "messages": [{"role": "user", "content": "hi"}]}).status_code == 200
            assert proc.poll() is None
        finally:
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(20)
        logs = proc.stdout.read()
    assert rc == -signal.SIGTERM, logs
    said = [entry["msg"] for entry in _json_lines(logs) if entry.get("msg", "").startswith("SIGHUP")]
    assert said[0] == f"SIGHUP: {config} checked: unchanged", said
    assert said[1] == f"SIGHUP: {config} checked: reloaded, 2 models", said
    assert said[2].startswith(f"SIGHUP: {config} checked: not taken, keeping the last good "
                              f"configuration: {config}: model_list.2"), said
    assert len(said) == 3, said
    assert any(entry.get("msg") == "shutdown complete" for entry in _json_lines(logs)), logs


def test_with_a_shutdown_delay_the_proxy_serves_on_not_ready_before_it_stops(tmp_path):
    """A Kubernetes Service learns of a stopping pod as its endpoints are updated, seconds after the
    signal: a listener closed at once refused the requests sent meanwhile. With the delay the
    proxy serves on, new connections too, and /ready says it is leaving."""
    with MockUpstream() as up:
        up.set("m1", answer("hello"))
        port = free_port()
        proc = _serve(_config(tmp_path, up.url), port, tmp_path, deadline_s=5,
                      env={"SATROUTE_SHUTDOWN_DELAY_S": "4"})
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/ready", timeout=5).status_code == 200
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        # an edit made now is not taken, nor a SIGHUP's check: the process is on its way out
        config = tmp_path / "providers.yaml"
        config.write_text(config.read_text() + config.read_text().split("\n", 1)[1].replace("m1", "m2"))
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.5)  # the watch's interval is 1 s
        models = [m["id"] for m in httpx.get(f"{base}/v1/models", timeout=5).json()["data"]]
        ready = httpx.get(f"{base}/ready", timeout=5)  # a new connection, still taken
        chat = httpx.post(f"{base}/v1/chat/completions", timeout=10,
                          json={"model": "m1", "messages": [{"role": "user", "content": "hi"}]})
        waited = time.monotonic() - signalled
        rc = proc.wait(20)
        stopped_after = time.monotonic() - signalled
        logs = proc.stdout.read()
    assert waited < 2.9, "the requests were answered late"
    assert "m2" not in models, models
    assert "SIGHUP: shutting down; providers.yaml not checked" in logs
    assert "edited: not applied, the proxy is stopping" in logs
    assert ready.status_code == 503 and ready.json()["reasons"] == ["shutting down"], ready.text
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"] == "hello"
    assert rc == -signal.SIGTERM and 4 <= stopped_after < 11, (rc, stopped_after, logs)
    assert any(entry.get("msg") == "shutdown complete" for entry in _json_lines(logs)), logs
