"""A client that stops reading a stream without leaving is let go after client_write_timeout_s:
its request, and the call to the model behind it, would otherwise be held for as long as it
keeps its socket open."""
from __future__ import annotations

import json
import socket
import time

import pytest

from conftest import RecordingScorer, model_entry, write_config
from support.mock_upstream import answer
from support.prometheus import scrape

IN_FLIGHT = ("satroute_in_flight_requests", ())


def _stalled_client(port: int) -> socket.socket:
    """Asks for a stream, reads its first bytes, then never reads again (and never closes)."""
    body = json.dumps({"model": "m1", "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert sock.recv(2048).startswith(b"HTTP/1.1 200")
    return sock


def _in_flight(proxy) -> float:
    return scrape(proxy.base)[IN_FLIGHT] - 1  # the scrape itself is in flight


@pytest.mark.parametrize("fast", [True, False], ids=["passthrough", "litellm"])
def test_a_client_that_stops_reading_is_let_go_with_the_model_s_call(tmp_path, upstream, start_proxy,
                                                                     fast, caplog):
    cfg = write_config(tmp_path / "providers.yaml",
                       [model_entry("m1", upstream.url, tmp_path, fast_path=fast)],
                       client_write_timeout_s=1)
    proxy = start_proxy(cfg, scorer=RecordingScorer({"m1": 1.0}))
    # far more than the buffers hold (16 MB), no two chunks alike (litellm ends a stream that repeats one)
    upstream.set("m1", answer("".join(f"{i:07d} " for i in range(2_000_000)), chunks=8000))
    before = len(upstream.open)  # kept-alive connections of earlier calls
    clients = [_stalled_client(proxy.port) for _ in range(2)]
    try:
        deadline = time.monotonic() + 15
        while _in_flight(proxy) > 0:
            assert time.monotonic() < deadline, "a stalled client still holds its request"
            time.sleep(0.2)
        # let go by the timeout, both (not answered in full: the buffers could not hold it)
        assert caplog.text.count("a write to the client waited 1 s (client_write_timeout_s)") == 2
        assert proxy.app.state.services.dispatcher.busy("m1") == 0  # the model's call is over
        deadline = time.monotonic() + 3  # and its connection closed, not left to a garbage collection
        while len(upstream.open) > before:
            assert time.monotonic() < deadline, "the stalled calls' connections to the model are still open"
            time.sleep(0.1)
    finally:
        for sock in clients:
            sock.close()
