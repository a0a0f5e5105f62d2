"""JSON request logs: one line per request, the request id header, what is and is never logged."""
from __future__ import annotations

import io
import json
import logging

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from proxy.logs import (
    REQUEST_ID_HEADER,
    JsonFormatter,
    Redactor,
    RequestLogMiddleware,
    request_record,
)

SECRET = "sk-live-THISMUSTNEVERLEAK1234"
QUOTED_SECRET = 'pa"ss\\word-1234'  # a configured secret with a quote and a backslash
PROMPT = "What is the capital of Burkina Faso?"


async def chat(request: Request) -> JSONResponse:
    body = await request.json()
    record = request_record(request)
    record.requested_model = body["model"]
    record.upstream_ms = 12.5
    return JSONResponse(
        {"id": "c1", "object": "chat.completion", "model": "small-model",
         "choices": [{"index": 0, "message": {"role": "assistant", "content": "Ouagadougou"}}],
         "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}},
        headers={"x-satroute-model": "small-model",
                 "x-satroute-scores": "small-model=0.8,big-model=0.6",
                 "x-satroute-scorer-ms": "4.2"})


async def stream(request: Request) -> StreamingResponse:
    async def chunks():
        for i in range(3):
            yield f'data: {{"id":"c2","model":"streamer","choices":[{{"delta":{{"content":"{i}"}}}}]}}\n\n'
        yield ('data: {"id":"c2","model":"streamer","choices":[],'
               '"usage":{"prompt_tokens":5,"completion_tokens":3,"total_tokens":8}}\n\n')
        yield "data: [DONE]\n\n"
    return StreamingResponse(chunks(), media_type="text/event-stream")


async def leak(request: Request) -> JSONResponse:
    logging.getLogger("satroute.test").warning("upstream said: bad key %s", SECRET)
    return JSONResponse({"ok": True})


async def boom(request: Request) -> JSONResponse:
    raise RuntimeError("handler crashed")


async def quoted(request: Request) -> JSONResponse:
    log = logging.getLogger("satroute.test")
    log.warning('upstream rejected header "Authorization: Bearer abcdefgh12345678"')
    log.warning("configured key %s in quotes", QUOTED_SECRET)
    return JSONResponse({"ok": True})


async def cut_stream(request: Request) -> StreamingResponse:
    async def chunks():
        yield 'data: {"id":"c3","model":"streamer","choices":[{"delta":{"content":"The answer"}}]}\n\n'
        yield ('data: {"error":{"message":"upstream stream interrupted: ClientPayloadError",'
               '"type":"upstream_error","param":null,"code":"stream_interrupted"}}\n\n')
    return StreamingResponse(chunks(), media_type="text/event-stream")


def _client(include_prompts=False, records=None):
    stream_out = io.StringIO()
    handler = logging.StreamHandler(stream_out)
    handler.setFormatter(JsonFormatter(Redactor(lambda: [SECRET, QUOTED_SECRET])))
    logger = logging.getLogger("satroute.request.test")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    other = logging.getLogger("satroute.test")
    other.handlers[:] = [handler]
    other.propagate = False
    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]),
                            Route("/stream", stream), Route("/leak", leak), Route("/boom", boom),
                            Route("/quoted", quoted), Route("/chat/completions", cut_stream, methods=["POST"]),
                            Route("/health", leak)])
    app.add_middleware(RequestLogMiddleware, logger=logger, include_prompts=include_prompts,
                       on_record=[records.append] if records is not None else ())
    return TestClient(app, raise_server_exceptions=False), stream_out


def _lines(out: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]


def test_one_json_line_per_request_with_model_scores_latency_usage_and_request_id():
    client, out = _client()
    response = client.post("/v1/chat/completions", json={
        "model": "auto", "messages": [{"role": "user", "content": PROMPT}]},
        headers={"authorization": f"Bearer {SECRET}"})
    assert response.status_code == 200
    rid = response.headers[REQUEST_ID_HEADER]
    assert rid.startswith("req_")
    [line] = _lines(out)
    assert line["request_id"] == rid
    assert line["status"] == 200 and line["method"] == "POST"
    assert line["requested_model"] == "auto" and line["routed_model"] == "small-model"
    assert line["scores"] == {"small-model": 0.8, "big-model": 0.6}
    assert line["scorer_ms"] == 4.2 and line["upstream_ms"] == 12.5 and line["total_ms"] > 0
    assert line["usage"] == {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
    assert line["level"] == "info" and line["ts"].endswith("Z")
    raw = out.getvalue()
    assert PROMPT not in raw and "Ouagadougou" not in raw and SECRET not in raw
    assert "prompt" not in line


def test_prompt_text_is_logged_only_when_enabled():
    client, out = _client(include_prompts=True)
    client.post("/v1/chat/completions", json={
        "model": "auto", "messages": [{"role": "system", "content": "be brief"},
                                      {"role": "user", "content": [{"type": "text",
                                                                    "text": PROMPT}]}]})
    assert _lines(out)[0]["prompt"] == PROMPT


@pytest.mark.parametrize("body, prompt", [
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "Describe this"},
                                                {"type": "image_url", "image_url": {"url": "x"}, "text": None}]}]},
     "Describe this"),
    ({"messages": 5}, None),
    ({"messages": "hello"}, None),
    ({"messages": {"role": "user", "content": "hi"}}, None),
    ({"messages": [{"role": "user", "content": {"text": "hi"}}]}, None),
    ([1, 2], None),
    ('{"messages": [{"role": "user", "content": "cut \\ud83d here"}]}', "cut \ufffd here"),  # as the handler reads it
])
def test_any_body_still_gets_its_log_line_when_prompts_are_logged(body, prompt):
    """The prompt is read after the answer went out: a body the handler refused or a content part
    with a null text must not cost the request its log line and its metrics."""
    records: list = []
    client, out = _client(include_prompts=True, records=records)
    if isinstance(body, str):  # raw JSON text, as a client wrote it
        client.post("/v1/chat/completions", content=body.encode(), headers={"content-type": "application/json"})
    else:
        client.post("/v1/chat/completions", json=body)
    [line] = _lines(out)
    assert line.get("prompt") == prompt
    assert len(records) == 1


def test_a_logged_prompt_is_cut_to_a_bounded_length():
    from proxy.logs import MAX_LOGGED_PROMPT

    client, out = _client(include_prompts=True)
    client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 200_000}]})
    logged = _lines(out)[0]["prompt"]
    assert logged == "x" * MAX_LOGGED_PROMPT + f"…(+{200_000 - MAX_LOGGED_PROMPT} chars)"


def test_a_well_formed_incoming_request_id_is_kept_and_a_bad_one_replaced():
    client, out = _client()
    kept = client.get("/stream", headers={REQUEST_ID_HEADER: "trace-42.a"})
    assert kept.headers[REQUEST_ID_HEADER] == "trace-42.a"
    replaced = client.get("/stream", headers={REQUEST_ID_HEADER: "bad id <script>"})
    assert replaced.headers[REQUEST_ID_HEADER].startswith("req_")
    # one shaped like a credential would read [redacted] in the log and match no header
    secretish = client.get("/stream", headers={REQUEST_ID_HEADER: "trace-hf_0123456789abcdef"})
    assert secretish.headers[REQUEST_ID_HEADER].startswith("req_")
    assert [line["request_id"] for line in _lines(out)] == [
        "trace-42.a", replaced.headers[REQUEST_ID_HEADER], secretish.headers[REQUEST_ID_HEADER]]


def test_a_stream_is_logged_once_at_its_end_with_its_model_and_usage():
    records = []
    client, out = _client(records=records)
    with client.stream("GET", "/stream") as response:
        assert _lines(out) == []  # headers are out, the line waits for the end of the stream
        body = b"".join(response.iter_bytes())
    assert body.endswith(b"data: [DONE]\n\n")
    [line] = _lines(out)
    assert line["stream"] is True and line["routed_model"] == "streamer"
    assert line["usage"]["total_tokens"] == 8 and line["ttfb_ms"] <= line["total_ms"]
    assert len(records) == 1 and records[0].routed_model == "streamer"


def test_secrets_are_redacted_from_every_log_line_whoever_writes_it():
    client, out = _client()
    client.get("/leak")
    lines = _lines(out)
    assert SECRET not in out.getvalue()
    assert "[redacted]" in lines[0]["msg"]


@pytest.mark.parametrize("text", ["Authorization: Bearer abcdefgh12345678",
                                  "key=sk-ant-api03-abcdefghijkl", "gsk_abcdefghijklmnop"])
def test_credential_shaped_strings_are_redacted_without_configuration(text):
    redacted = Redactor()(text)
    assert "[redacted]" in redacted
    assert "abcdefgh" not in redacted


def test_redaction_keeps_every_line_json_and_finds_quoted_secrets():
    """Redacting after json.dumps ate the backslash that escapes a quote after a Bearer token
    (the line no longer parsed), and missed a secret whose quote the JSON text escapes."""
    client, out = _client()
    client.get("/quoted")
    raw = [line for line in out.getvalue().splitlines() if line.strip()]
    lines = [json.loads(line) for line in raw]  # every line parses
    assert lines[0]["msg"] == 'upstream rejected header "Authorization: Bearer [redacted]"'
    assert lines[1]["msg"] == "configured key [redacted] in quotes"
    assert "abcdefgh" not in out.getvalue() and "ss\\\\word" not in out.getvalue()


def test_a_stream_that_ends_in_an_error_event_is_logged_and_counted_as_one():
    """The status stays 200 (the headers went before the cut), so the error event is what tells."""
    from proxy.metrics import Metrics

    metrics, records = Metrics(), []
    client, out = _client(records=records)
    client.post("/chat/completions", json={})
    client.get("/stream")
    for record in records:
        metrics.observe_record(record)
    cut = _lines(out)[0]
    assert cut["status"] == 200 and cut["stream"] is True and cut["error"] == "stream_interrupted"
    assert "error" not in _lines(out)[1]
    assert metrics.stream_errors.labels(model="streamer")._value.get() == 1
    # a client that leaves mid-stream (a frontend's Stop button) is no upstream error
    from proxy.logs import RequestRecord

    left = RequestRecord("r", "POST", "/v1/chat/completions", status=200, routed_model="streamer",
                         stream=True, error="client disconnected")
    metrics.observe_record(left)
    assert metrics.stream_errors.labels(model="streamer")._value.get() == 1
    assert "upstream_error" not in cut


def test_a_crash_logs_its_message_and_traceback_in_json():
    """What the proxy's last-resort handler logs (satroute.app, with exc_info): in JSON too, the
    message and the trace, redacted, not only the exception's class."""
    try:
        raise KeyError(f"api_base for {SECRET}")
    except KeyError:
        import sys

        record = logging.LogRecord("satroute.app", logging.ERROR, __file__, 1,
                                   "unhandled error on %s", ("POST /v1/chat/completions",), sys.exc_info())
    line = json.loads(JsonFormatter(Redactor(lambda: [SECRET])).format(record))
    assert line["exc_type"] == "KeyError" and line["exc_message"] == "'api_base for [redacted]'"
    assert line["traceback"].startswith("Traceback") and "test_a_crash_logs" in line["traceback"]
    assert SECRET not in json.dumps(line)


def test_health_probes_are_counted_but_not_logged_and_a_crash_is_logged():
    records = []
    client, out = _client(records=records)
    client.get("/health")
    assert client.get("/boom").status_code == 500
    lines = [line for line in _lines(out) if line["logger"] == "satroute.request.test"]
    assert [r.path for r in records] == ["/health", "/boom"]
    assert [line["path"] for line in lines] == ["/boom"]
    assert lines[0]["status"] == 500 and "error" in lines[0]


def test_in_flight_gauge_counts_a_request_while_it_is_served():
    seen = []

    class Gauge:
        value = 0

        def inc(self):
            self.value += 1

        def dec(self):
            self.value -= 1

    gauge = Gauge()

    async def probe(request):
        seen.append(gauge.value)
        return JSONResponse({})

    app = Starlette(routes=[Route("/probe", probe)])
    app.add_middleware(RequestLogMiddleware, in_flight=gauge)
    with TestClient(app) as client:
        client.get("/probe")
    assert seen == [1] and gauge.value == 0


def test_text_lines_carry_the_request_s_fields_too():
    """SATROUTE_LOG_FORMAT=text: a plain line, but the request id, model, scores, error and the
    prompt (when asked for) are still on it, redacted."""
    from proxy.logs import TextFormatter

    record = logging.LogRecord("satroute.request", logging.INFO, __file__, 1, "POST %s %s",
                               ("/v1/chat/completions", 502), None)
    record.fields = {"request_id": "req_1", "routed_model": "m1", "scores": {"m1": 0.5, "m2": float("-inf")},
                     "error": "upstream_failed", "prompt": f"my key is {SECRET}"}
    line = TextFormatter(Redactor(lambda: [SECRET])).format(record)
    assert line.endswith('satroute.request: POST /v1/chat/completions 502 request_id="req_1" routed_model="m1" '
                         'scores={"m1": 0.5, "m2": null} error="upstream_failed" prompt="my key is [redacted]"')


def test_text_lines_quote_a_redacted_value_whole():
    """Redacting after quoting would eat the backslash before the quote that follows a token."""
    from proxy.logs import TextFormatter

    record = logging.LogRecord("satroute.request", logging.INFO, __file__, 1, "POST", (), None)
    record.fields = {"prompt": 'curl -H "Authorization: Bearer abcdefgh12345678" https://x'}
    line = TextFormatter(Redactor()).format(record)
    assert line.endswith(r'prompt="curl -H \"Authorization: Bearer [redacted]\" https://x"')


def test_a_newline_a_client_puts_in_its_path_cannot_forge_a_text_line():
    """uvicorn decodes %0a in a path, and 401s are logged too: with no key, a client could write
    a line of its own into the text log."""
    from proxy.logs import TextFormatter

    forged = "/v1/models\n2026-12-06 13:00:00,000 INFO satroute.request: GET /admin/routes 200\r"
    record = logging.LogRecord("satroute.request", logging.INFO, __file__, 1, "%s %s %s",
                               ("GET", forged, 401), None)
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    line = TextFormatter(Redactor()).format(record)
    first, *traceback = line.split("\n")
    assert "GET /v1/models\\n2026-12-06" in first and "\\r 401" in first
    assert traceback[0].startswith("Traceback") and traceback[-1] == "ValueError: boom"


@pytest.mark.parametrize("brk", ["\u2028", "\u2029", "\x85"])
def test_no_character_a_line_reader_splits_on_can_forge_a_line_in_either_format(brk):
    """str.splitlines, editors and log viewers also end a line at NEL, U+2028 and U+2029, which
    json.dumps leaves as they are: a path or a model name must not make a line of its own; nor
    may a C1 control (CSI) drive the terminal that shows the log."""
    from proxy.logs import JsonFormatter, TextFormatter

    forged = f"/v1/x{brk}2026-12-06 23:59:59,000 ERROR satroute.app: master key rotated\x9b2J"
    record = logging.LogRecord("satroute.request", logging.INFO, __file__, 1, "%s %s %s",
                               ("GET", forged, 401), None)
    record.fields = {"requested_model": forged}
    for formatter in (TextFormatter(Redactor()), JsonFormatter(Redactor())):
        line = formatter.format(record)
        assert len(line.splitlines()) == 1 and "\x9b" not in line, type(formatter).__name__
    logged = json.loads(JsonFormatter(Redactor()).format(record))
    assert logged["requested_model"] == forged and logged["msg"] == f"GET {forged} 401"  # the same text


def test_litellm_s_own_log_lines_go_through_ours_as_json_and_redacted():
    from proxy.logs import adopt_loggers, configure_logging

    out = io.StringIO()
    handler = configure_logging("info", redactor=Redactor(lambda: [SECRET]), stream=out)
    theirs = logging.getLogger("LiteLLM-test")
    theirs.addHandler(logging.StreamHandler(io.StringIO()))  # what litellm installs at import
    try:
        adopt_loggers("LiteLLM-test")
        theirs.info("chatter that is not worth a line")
        theirs.warning("Image fetch of http://x/a\n{\"forged\": 1} failed with key %s", SECRET)
        lines = out.getvalue().splitlines()
        assert len(lines) == 1
        logged = json.loads(lines[0])
        assert logged["logger"] == "LiteLLM-test" and SECRET not in lines[0]
        assert "\n{\"forged\": 1}" in logged["msg"]
    finally:
        for name in ("satroute", "uvicorn", "uvicorn.error", "LiteLLM-test"):
            logging.getLogger(name).removeHandler(handler)
        logging.getLogger("LiteLLM-test").handlers.clear()


def test_a_stream_its_client_left_is_logged_as_such_with_the_status_it_had():
    """Starlette ends a streaming response without its last body when the client disconnects (a
    frontend's Stop button): the line says so, not that the proxy failed."""
    import asyncio

    out = io.StringIO()
    logger = logging.getLogger("satroute.request.left")
    logger.handlers[:] = [logging.StreamHandler(out)]
    logger.handlers[0].setFormatter(JsonFormatter())
    logger.setLevel(logging.INFO)
    logger.propagate = False

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        pass

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
    asyncio.run(RequestLogMiddleware(app, logger=logger)(scope, receive, send))
    [line] = _lines(out)
    assert (line["status"], line["stream"], line["error"]) == (200, True, "client disconnected")


def test_a_line_logged_while_a_request_is_served_carries_its_request_id():
    client, out = _client()
    rid = client.get("/leak").headers[REQUEST_ID_HEADER]
    warning, request = _lines(out)
    assert warning["msg"].startswith("upstream said") and warning["request_id"] == rid
    assert request["request_id"] == rid
    logging.getLogger("satroute.test").warning("outside any request")
    assert "request_id" not in _lines(out)[-1]


def test_a_request_cut_after_its_response_ended_sends_nothing_more():
    """A shutdown's cancellation that lands after the last body (a background task, say) must not
    make the middleware send a cut event into a finished response."""
    import asyncio

    sent = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        raise asyncio.CancelledError  # the server's cancellation, after the end

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    async def cut():  # pragma: no cover - must not be called
        raise AssertionError("a cut response after the end")

    middleware = RequestLogMiddleware(app, logger=logging.getLogger("satroute.request.cut"),
                                      cut_response=cut, cut_event=b"data: {}\n\n")
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
    asyncio.run(middleware(scope, receive, send))
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]


@pytest.mark.parametrize("encoding, kept", [("ascii", False), ("latin-1", False), ("utf-8", True),
                                            ("UTF8", True)])
def test_a_line_about_a_name_beyond_the_streams_encoding_is_still_json(encoding, kept):
    """A stream that is not UTF-8 (PYTHONIOENCODING, a Latin-1 locale) writes what it cannot
    encode as ``\\U0001f680``, no JSON escape: the line about that model was dropped by a shipper."""
    from proxy.logs import configure_logging

    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding=encoding, errors="backslashreplace", write_through=True)
    handler = configure_logging("info", stream=out)
    try:
        logging.getLogger("satroute.request").info("routed", extra={"fields": {"routed_model": "my model 🚀 é"}})
        line = raw.getvalue().decode(encoding).strip()
        assert json.loads(line)["routed_model"] == "my model 🚀 é"
        assert ("🚀" in line) is kept
    finally:
        for name in ("satroute", "uvicorn", "uvicorn.error"):
            logging.getLogger(name).removeHandler(handler)
