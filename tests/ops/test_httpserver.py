"""The HTTP server's bounds on what one client can hold: a request head's size and time, and a
body that stops arriving. Without them one connection sending a 200 MiB header took the process
45 s of CPU, and connections that never finished a request were kept for ever."""
from __future__ import annotations

import asyncio
import socket
import time

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from proxy.httpserver import MAX_HEAD_BYTES, BoundedHttpToolsProtocol
from tests.support.proxy_server import ProxyServer


class QuickProtocol(BoundedHttpToolsProtocol):
    head_timeout_s = 0.5


async def echo(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"{len(await request.body())}")


async def slow(request: Request) -> PlainTextResponse:
    await asyncio.sleep(1.0)
    return PlainTextResponse("slow")


async def early(request: Request) -> PlainTextResponse:  # answers without reading the body
    return PlainTextResponse("early")


@pytest.fixture
def server():
    app = Starlette(routes=[Route("/", echo, methods=["GET", "POST"]), Route("/slow", slow),
                            Route("/early", early, methods=["POST"]),
                            Route("/headers", headers, methods=["POST"])])
    with ProxyServer(app, http=QuickProtocol) as srv:
        yield srv


def _connect(server) -> socket.socket:
    sock = socket.create_connection((server.host, server.port), timeout=5)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _response(sock: socket.socket) -> bytes:
    """One whole response (head and its content-length body) read from ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_a_head_over_the_bound_is_refused_with_431_before_it_is_parsed(server):
    with _connect(server) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * (MAX_HEAD_BYTES + 1))
        answer = _read_all(sock)  # the server closes the connection
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert b'"code":"request_header_too_large"' in answer  # OpenAI's error shape, as every other


def test_a_refused_head_has_its_log_line_and_request_id(server, caplog):
    """Answered below the app, a 431 or 408 was in no log: the one line every request gets."""
    import logging

    caplog.set_level(logging.INFO, logger="satroute.request")
    with _connect(server) as sock:
        sock.sendall(b"GET /v1/models?access_token=secret-token HTTP/1.1\r\nhost: x\r\nx-big: "
                     + b"a" * (MAX_HEAD_BYTES + 1))
        answer = _read_all(sock)
    with _connect(server) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")  # and nothing more
        timed_out = _read_all(sock)
    lines = [r for r in caplog.records if r.name == "satroute.request"]
    assert "secret-token" not in caplog.text  # the query is not logged, as in every other line
    assert [(r.fields["status"], r.fields["error"], r.fields["path"]) for r in lines] == [
        (431, "request_header_too_large", "/v1/models"), (408, "request_timeout", "/v1/chat/completions")]
    rid = lines[0].fields["request_id"]
    assert f"x-request-id: {rid}\r\n".encode() in answer and rid.startswith("req_")
    assert lines[1].fields["request_id"].encode() in timed_out
    assert all(r.fields["client"].startswith("127.0.0.1:") for r in lines)


@pytest.mark.parametrize("head", [b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-bad: a\x00b\r\n\r\n",
                                  b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n"
                                  b"transfer-encoding: chunked\r\n\r\n",
                                  b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"],  # TLS on the plain port
                         ids=["nul_in_header", "length_and_chunked", "tls_hello"])
def test_a_request_http_cannot_parse_is_refused_in_openai_s_shape_with_its_log_line(server, caplog, head):
    """uvicorn's own 400 was text/plain, with no request id and no request line: the client had
    no error.message, and the admin no trace of whom it refused."""
    import json
    import logging

    caplog.set_level(logging.INFO, logger="satroute.request")
    with _connect(server) as sock:
        sock.sendall(head)
        answer = _read_all(sock)
    status, _, body = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 400 ") and b"content-type: application/json" in status
    error = json.loads(body)["error"]
    assert error["code"] == "invalid_http_request" and error["message"].startswith("not a valid HTTP/1.1 request: ")
    [line] = [r for r in caplog.records if r.name == "satroute.request"]
    assert line.fields["status"] == 400 and line.fields["error"] == "invalid_http_request"
    assert f"x-request-id: {line.fields['request_id']}\r\n".encode() in status
    assert line.fields["client"].startswith("127.0.0.1:")


def test_a_target_that_is_no_url_waits_for_the_answer_owed_and_is_refused_in_its_own_words(server):
    """A request target uvicorn cannot parse fails in its callback, after the head was taken for
    done: the refusal took the place of the slow answer still owed to the request before it
    (pipelined), and said only "callback error". Now that answer comes whole, then the connection
    closes, as for any head refused behind an answer owed; alone, the 400 names the target."""
    with _connect(server) as sock:
        sock.sendall(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\nGET http://[::1 HTTP/1.1\r\nhost: x\r\n\r\n")
        answers = _read_all(sock)
    assert answers.startswith(b"HTTP/1.1 200 ") and answers.endswith(b"\r\n\r\nslow")
    with _connect(server) as sock:
        sock.sendall(b"GET http://[::1 HTTP/1.1\r\nhost: x\r\n\r\n")
        refusal = _read_all(sock)
    assert refusal.startswith(b"HTTP/1.1 400 ") and b"invalid url b'http://[::1'" in refusal


def test_a_body_that_turns_bad_after_its_answer_gets_no_second_answer(server):
    """The app answered before reading a chunked body whose next chunk is malformed: the
    connection closes, where a second, unasked-for 400 followed the answer."""
    with _connect(server) as sock:
        sock.sendall(b"POST /early HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        assert _response(sock).startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"zz\r\n")
        assert _read_all(sock) == b""


def test_a_pipelined_request_whose_body_turns_bad_is_refused_after_the_answer_before_it(server, caplog):
    """Its 400 was written at once, in the place of the answer still owed to the request before
    it (whose upstream call was made and paid for), and that answer was then lost. Its line names
    its path, as a refused request's line does."""
    import json
    import logging

    caplog.set_level(logging.INFO, logger="satroute.request")
    with _connect(server) as sock:
        sock.sendall(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n"
                     b"POST /?token=secret HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nZZZ\r\n")
        answers = _read_all(sock)
    first, _, rest = answers.partition(b"\r\n\r\nslow")
    assert first.startswith(b"HTTP/1.1 200 "), answers
    head, _, body = rest.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answers
    # one JSON document and nothing after it: the refused request never reached the app
    assert json.loads(body)["error"]["code"] == "invalid_http_request"
    [line] = [r for r in caplog.records if r.name == "satroute.request"]
    assert (line.fields["path"], line.fields["status"]) == ("/", 400)


def test_a_chunked_body_s_trailers_are_bounded_as_headers_are(server):
    """llhttp hands trailers to the same callbacks as headers, built up the same costly way.
    (What follows body bytes in the same read is counted from the next read: twice the bound.)"""
    with _connect(server) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"
                     b"5\r\nhello\r\n0\r\nx-trailer: " + b"a" * (2 * MAX_HEAD_BYTES + 10))
        assert _read_all(sock).startswith(b"HTTP/1.1 431 ")


def test_a_body_larger_than_the_bound_is_no_head_even_when_the_head_s_end_is_split(server):
    """The head's blank line split across two reads, the second carrying 100 KB of body: the
    body's bytes are not head bytes."""
    body = b"x" * 100_000
    for cut in (1, 2, 3, 4):
        with _connect(server) as sock:
            raw = b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % len(body) + body
            head_end = raw.index(b"\r\n\r\n")
            sock.sendall(raw[:head_end + cut])
            time.sleep(0.05)
            sock.sendall(raw[head_end + cut:])
            assert _response(sock).endswith(b"\r\n\r\n100000"), cut


def test_the_second_request_on_a_connection_is_bounded_as_the_first(server):
    with _connect(server) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        assert _response(sock).startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * (MAX_HEAD_BYTES + 1) + b"\r\n\r\n")
        assert _read_all(sock).startswith(b"HTTP/1.1 431 ")
    with _connect(server) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        assert _response(sock).startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\nx-half: ")
        assert _read_all(sock).startswith(b"HTTP/1.1 408 ")


@pytest.mark.parametrize("after", [b"\r\n", b"x"], ids=["bare CRLF", "unread body byte"])
def test_bytes_after_an_answer_do_not_hold_the_connection(server, after):
    """A bare CRLF (llhttp begins no message on it), or one more byte of a body the app answered
    without reading, ended uvicorn's keep-alive timer with no other to follow: held for ever."""
    with _connect(server) as sock:
        sock.sendall(b"POST /early HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\nabc")
        assert _response(sock).endswith(b"early")
        sock.sendall(after)
        started = time.monotonic()
        _read_all(sock)  # closed (with a 408, or nothing), not held
    assert time.monotonic() - started < 3


async def headers(request: Request) -> PlainTextResponse:
    body = await request.body()
    return PlainTextResponse(f"{len(body)} " + ",".join(f"{k}={v}" for k, v in request.headers.items()))


_OFFER = b"connection: Upgrade, HTTP2-Settings\r\nupgrade: h2c\r\nhttp2-settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n"


@pytest.mark.parametrize("framing", ["length", "chunked"])
@pytest.mark.parametrize("split", [False, True], ids=["one piece", "body sent apart"])
def test_an_h2c_upgrade_offer_is_declined_and_the_request_served_with_its_body(server, framing, split):
    """Java's HttpClient offers ``Upgrade: h2c`` on every http:// request (LangChain4j, Spring's
    JDK client). httptools ended such a request at its head: the app read an empty body (a 400
    for every chat request) and the body's bytes were parsed as a request of their own."""
    body = b'{"model": "auto", "messages": []}'
    framed = (b"content-length: %d\r\n\r\n%s" % (len(body), body) if framing == "length" else
              b"transfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    head, _, rest = framed.partition(b"\r\n\r\n")
    with _connect(server) as sock:
        for _ in range(2):  # it sends the offer again on each request; the connection lives on
            sock.sendall(b"POST /headers HTTP/1.1\r\nhost: x\r\n" + _OFFER + head + b"\r\n\r\n")
            if split:
                time.sleep(0.1)
            sock.sendall(rest)
            answer = _response(sock)
            assert answer.startswith(b"HTTP/1.1 200 "), answer
            seen = answer.partition(b"\r\n\r\n")[2].decode()
            assert seen.startswith(f"{len(body)} "), seen
            assert "upgrade" not in seen.lower() and "http2-settings" not in seen  # declined
        sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n" + _OFFER + b"\r\n")  # no body at all
        assert _response(sock).startswith(b"HTTP/1.1 200 ")


def test_a_thousand_pipelined_upgrade_offers_are_each_answered(server):
    """Each declined head was read again by a call within the last: 500 in one read passed
    Python's recursion limit, and the connection died with a traceback in the log."""
    with _connect(server) as sock:
        sock.sendall((b"GET / HTTP/1.1\r\nhost: x\r\n" + _OFFER + b"\r\n") * 1000
                     + b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        answers = _read_all(sock)
    assert answers.count(b"HTTP/1.1 200 ") == 1001


def test_a_client_that_writes_its_whole_oversized_head_before_reading_gets_the_431(server):
    """Closing with its bytes unread made the kernel reset the connection: no 431 to read."""
    with _connect(server) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 300_000 + b"\r\n\r\n")
        assert _read_all(sock).startswith(b"HTTP/1.1 431 ")


def test_a_pipelined_head_s_timer_does_not_cut_the_answer_still_owed(server):
    """Request 1 takes 1 s; request 2's head, begun behind it, is never finished. The head timeout
    (0.5 s) passes while request 1 is being answered: its answer comes whole, then request 2's 408."""
    with _connect(server) as sock:
        sock.sendall(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\nGET / HTTP/1.1\r\nho")
        both = _read_all(sock)  # the two answers may come in one read
    first, _, rest = both.partition(b"\r\n\r\nslow")
    assert first.startswith(b"HTTP/1.1 200 ") and b"content-length: 4" in first
    assert rest.startswith(b"HTTP/1.1 408 ")


def test_heads_within_the_bound_are_served_on_a_kept_alive_connection(server):
    """The bound is per request: two heads of 40 KiB on one connection are both under it."""
    with _connect(server) as sock:
        for _ in range(2):
            sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 40_000 + b"\r\n\r\n")
            assert _response(sock).startswith(b"HTTP/1.1 200 ")


def test_a_connection_that_sends_nothing_is_closed(server):
    with _connect(server) as sock:
        started = time.monotonic()
        assert _read_all(sock) == b""  # closed, with nothing to answer
    assert time.monotonic() - started < 3


def test_a_head_that_stops_arriving_gets_408(server):
    with _connect(server) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\nx-half: ")
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408 ") and b'"code":"request_timeout"' in answer


def test_the_head_timeout_does_not_bound_a_body_or_a_kept_alive_connection_s_next_request(server):
    """A body that arrives after the head's time (an upload) is read; a second request sent
    later on the same connection gets its own head time."""
    with _connect(server) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nab")
        time.sleep(0.8)
        sock.sendall(b"cde")
        assert _response(sock).endswith(b"\r\n\r\n5")
        time.sleep(0.3)
        sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        assert _response(sock).startswith(b"HTTP/1.1 200 ")


def test_a_body_that_stops_arriving_gets_408(monkeypatch, tmp_path):
    """A client that declared more than it sends, or a chunked body that never ends, would
    hold its connection and a request slot for ever."""
    from proxy import endpoints
    from proxy.app import create_app
    from proxy.settings import Settings

    monkeypatch.setattr(endpoints, "BODY_IDLE_TIMEOUT_S", 0.5)
    cfg = tmp_path / "providers.yaml"
    cfg.write_text("model_list:\n  - model_name: m1\n    litellm_params: {model: openai/m1, api_base: 'http://127.0.0.1:9/v1'}\n")
    app = create_app(Settings(config=cfg, scorer="constant", state_dir=tmp_path / "state", onboarding=False))
    with ProxyServer(app) as srv:
        for head in (b"content-length: 1000\r\n\r\n{\"model\": ", b"transfer-encoding: chunked\r\n\r\n5\r\n{\"mod\r\n"):
            with _connect(srv) as sock:
                started = time.monotonic()
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
                             + head)
                answer = _response(sock)
            assert answer.startswith(b"HTTP/1.1 408 ") and b'"code":"request_timeout"' in answer
            assert time.monotonic() - started < 5


def test_satroute_serve_runs_the_bounded_protocol(tmp_path):
    """What `satroute serve` hands uvicorn: checked on the real process, with a head over the
    bound, and its keep-alive timeout (uvicorn's own, 5 s, closed connections a load balancer
    keeps for 60 s, and the requests it then sent on them were lost)."""
    from proxy.localserver import free_port
    from proxy.settings import Settings
    from tests.ops.test_shutdown import _config, _serve

    assert Settings().keepalive_timeout_s == 75
    port = free_port()
    proc = _serve(_config(tmp_path, "http://127.0.0.1:9/v1"), port, tmp_path, deadline_s=2,
                  env={"SATROUTE_KEEPALIVE_TIMEOUT_S": "1.5"})
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * (MAX_HEAD_BYTES + 10))
            assert _read_all(sock).startswith(b"HTTP/1.1 431 ")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            for idle_s in (0, 1.0):  # kept open while idle within the timeout
                time.sleep(idle_s)
                sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
                assert _response(sock).startswith(b"HTTP/1.1 200 ")
            time.sleep(2.5)
            assert sock.recv(1) == b""  # closed once idle past it
    finally:
        proc.terminate()
        proc.wait(30)


def test_the_bound_costs_a_normal_request_nothing_it_can_see():
    """A head split across reads at its very end still completes (the end is found in the read
    that carries it)."""
    app = Starlette(routes=[Route("/", echo, methods=["GET", "POST"])])

    async def go():
        with ProxyServer(app, http=QuickProtocol) as srv:
            reader, writer = await asyncio.open_connection(srv.host, srv.port)
            writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r")
            await writer.drain()
            await asyncio.sleep(0.1)
            writer.write(b"\n")
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 5)
            writer.close()
            return line

    assert asyncio.run(go()).startswith(b"HTTP/1.1 200 ")
