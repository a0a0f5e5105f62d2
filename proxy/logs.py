"""Structured logs: every log line is one JSON object, and every HTTP request gets exactly one line.

Owns: the JSON formatter (with secret redaction applied to every line, whatever logger wrote it), the
request id (taken from a well-formed incoming ``X-Request-ID`` or made here, and always returned in
the ``X-Request-ID`` response header), and the ASGI middleware that writes the one line per request
when the response is finished (for a stream: when its last chunk has gone): method, path, status,
requested and routed model, the scores, scorer/upstream/total latencies, time to first byte, token
usage, fallbacks. Prompt text is logged only when ``include_prompts`` is on; header values never are.

Does not know: routing or dispatch. It reads what they report in two ways that need nothing from
them: the response itself (the ``model`` field and ``usage`` of the JSON body or of the streamed
chunks, and the routing headers), and a ``RequestRecord`` that handlers may fill through
``request_record(request)`` when they know more (e.g. the upstream latency). Finished records go to
listeners (``on_record``), which is how ``proxy.metrics`` counts requests without knowing HTTP.
"""
from __future__ import annotations

import asyncio
import codecs
import json
import logging
import math
import re
import sys
import time
import uuid
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import unquote

import orjson

from proxy.protocol import read_json

REQUEST_ID_HEADER = "x-request-id"
_GOOD_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Shapes of credentials that must never reach a log even if nobody configured them as secrets.
_SECRET_SHAPES = re.compile(
    r"(?i)(bearer\s+)[^\s\"',]+|\b(sk-[A-Za-z0-9_-]{8,}|gsk_[A-Za-z0-9]{8,}|hf_[A-Za-z0-9]{8,})")
REDACTED = "[redacted]"
_STATE_KEY = "satroute_request_record"
# the id of the request being served, for every line logged while serving it (a dispatch warning
# naming the model that failed), so that each can be tied to the request's own line; tasks the
# request starts inherit it
_REQUEST_ID: ContextVar[str | None] = ContextVar("satroute_request_id", default=None)
_MAX_SNIFF_BYTES = 1 << 20  # non-streamed JSON bodies larger than this are not parsed for usage


def new_request_id() -> str:
    return "req_" + uuid.uuid4().hex


class Redactor:
    """Replaces known secret values and credential-shaped strings with ``[redacted]``."""

    def __init__(self, secrets: Callable[[], Iterable[str]] | None = None):
        self._secrets = secrets

    def use(self, secrets: Callable[[], Iterable[str]]) -> None:
        """Read secrets from here from now on (e.g. the live configuration, once it is loaded)."""
        self._secrets = secrets

    def __call__(self, text: str) -> str:
        if self._secrets is not None:
            for secret in self._secrets():
                if secret and len(secret) >= 4 and secret in text:
                    text = text.replace(secret, REDACTED)
        return _SECRET_SHAPES.sub(lambda m: (m.group(1) or "") + REDACTED, text)


def _with_request_id(fields: Any) -> Any:
    """A record's ``fields``, with the id of the request being served when it has none."""
    rid = _REQUEST_ID.get()
    if rid is None or (isinstance(fields, Mapping) and "request_id" in fields):
        return fields
    return {**fields, "request_id": rid} if isinstance(fields, Mapping) else {"request_id": rid}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and the record's ``fields`` extra."""

    def __init__(self, redactor: Redactor | None = None, *, ascii_only: bool = False):
        super().__init__()
        self.redactor = redactor or Redactor()
        # for a stream that is not UTF-8: Python writes a character it cannot encode as
        # ``\U0001f680``, no JSON escape, and a shipper dropped the line about that model
        self.ascii_only = ascii_only

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = _with_request_id(getattr(record, "fields", None))
        if isinstance(fields, Mapping):
            entry.update(fields)
        if record.exc_info and record.levelno >= logging.ERROR:
            kind, exc = record.exc_info[0], record.exc_info[1]
            entry["exc_type"] = kind.__name__ if kind else None
            entry["exc_message"] = str(exc) if exc is not None else None
            entry["traceback"] = self.formatException(record.exc_info)
        return _BREAKS.sub(_json_escape, json.dumps(redacted(entry, self.redactor),
                                                        ensure_ascii=self.ascii_only))


def redacted(value: Any, redact: Callable[[str], str]) -> Any:
    """``value`` ready for ``json.dumps``: every string, a mapping's keys included, redacted before
    it is quoted (redacting the JSON text could eat an escaping backslash, and a key with a quote in
    it would not match), every non-finite float (an unscored candidate's -inf) None (JSON has
    neither Infinity nor NaN; a log shipper rejects the whole line for one), anything else its
    redacted ``str``. For a log line, and for what an open endpoint (``/ready``) shows."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, Mapping):
        return {redact(str(k)): redacted(v, redact) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redacted(v, redact) for v in value]
    return redact(str(value))


# what json.dumps leaves as it is but still ends a line for some readers (str.splitlines, editors,
# log viewers: NEL, U+2028, U+2029) or drives a terminal (C1 controls, CSI among them): a client's
# path, model name or message must not make its own line, nor move a reader's cursor
_BREAKS = re.compile("[\x7f-\x9f\u2028\u2029]")
_CONTROL = re.compile(f"[\x00-\x1f]|{_BREAKS.pattern}")  # and C0 controls, for the text format


def _json_escape(match: re.Match) -> str:
    return f"\\u{ord(match.group()):04x}"  # only ever inside a JSON string: still the same text


class TextFormatter(logging.Formatter):
    """Plain ``time level logger: message`` lines, then the record's ``fields`` as ``key=value``
    (values as JSON), redacted like the JSON ones."""

    def __init__(self, redactor: Redactor | None = None):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.redactor = redactor or Redactor()

    def formatMessage(self, record: logging.LogRecord) -> str:
        # one record, one line (a traceback, appended after it, keeps its own lines): a newline in
        # a request's path (uvicorn decodes %0a) would otherwise start a line passing for a record
        return _CONTROL.sub(lambda m: repr(m.group())[1:-1], super().formatMessage(record))

    def format(self, record: logging.LogRecord) -> str:
        line = self.redactor(super().format(record))
        fields = _with_request_id(getattr(record, "fields", None))
        if isinstance(fields, Mapping) and fields:  # redacted before they are quoted, as in JSON
            pairs = redacted(fields, self.redactor)
            line += " " + _BREAKS.sub(_json_escape, " ".join(
                f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in pairs.items()))
        return line


def _utf8(stream) -> bool:
    """Whether ``stream`` writes UTF-8 (a stream that says no encoding is taken to)."""
    encoding = getattr(stream, "encoding", None)
    if not isinstance(encoding, str):
        return True
    try:
        return codecs.lookup(encoding).name == "utf-8"
    except LookupError:
        return False


def configure_logging(level: str = "info", *, redactor: Redactor | None = None,
                      stream=None, json_lines: bool = True) -> logging.Handler:
    """Send the ``satroute`` loggers (and uvicorn's) to ``stream``, as JSON lines unless
    ``json_lines`` is false; returns the handler.

    Called by the process entry point, never at import. Calling again replaces the handler.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(redactor, ascii_only=not _utf8(handler.stream))
                         if json_lines else TextFormatter(redactor))
    handler.set_name("satroute-json")
    for name in ("satroute", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if h.get_name() == "satroute-json"]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(level.upper())
        logger.propagate = False
    # Our middleware writes one line per request; uvicorn's access log would be a second one.
    logging.getLogger("uvicorn.access").disabled = True
    return handler


def adopt_loggers(*names: str) -> None:
    """Send other libraries' loggers (litellm's, which installs a plain stderr handler of its own
    at import) through the handler ``configure_logging`` set, so that every line is in the
    configured format and redacted; warnings and worse only. Without that handler (a test, a
    library user), nothing changes."""
    ours = next((h for h in logging.getLogger("satroute").handlers if h.get_name() == "satroute-json"),
                None)
    if ours is None:
        return
    for name in names:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.addHandler(ours)
        logger.setLevel(logging.WARNING)
        logger.propagate = False


@dataclass
class RequestRecord:
    """Everything the one log line of a request says; handlers may fill any field."""

    request_id: str
    method: str
    path: str
    status: int = 0
    requested_model: str | None = None
    routed_model: str | None = None
    scores: dict[str, float] | None = None
    failed_models: list[str] = field(default_factory=list)
    stream: bool | None = None  # the request's own ``stream`` where the handler read it
    scorer_ms: float | None = None
    upstream_ms: float | None = None
    ttfb_ms: float | None = None
    total_ms: float | None = None
    usage: dict[str, int] | None = None
    error: str | None = None
    prompt: str | None = None
    # the code of the error event that ended the response (a stream the upstream cut short), as
    # against an error of the proxy or a client that left; in the log line as ``error``
    upstream_error: str | None = None
    # (status, code) of a refusal the HTTP server answered in the app's place (a body that turned
    # out malformed before the answer began): what the line and the count say, whatever the app
    # made of the connection it then saw closed
    refused: tuple[int, str] | None = None

    def fields(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items()
                if v is not None and v != [] and k not in ("upstream_error", "refused")}


def request_record(request) -> RequestRecord | None:
    """The record of the request being served (a Starlette ``Request``), if the middleware runs."""
    return request_record_of(request.scope)


def request_record_of(scope) -> RequestRecord | None:
    """``request_record`` from an ASGI scope."""
    return scope.get("state", {}).get(_STATE_KEY)


def parse_scores(value: str) -> dict[str, float] | None:
    """Routing-scores header: JSON object, or ``model=score`` pairs separated by commas."""
    value = value.strip()
    try:
        if value.startswith("{"):
            return {str(k): float(v) for k, v in json.loads(value).items()}
        pairs = (p.split("=", 1) for p in value.split(",") if "=" in p)
        return {unquote(k.strip()): float(v) for k, v in pairs}  # names percent-encoded where needed
    except (ValueError, TypeError, AttributeError):
        return None


MAX_LOGGED_PROMPT = 4000  # characters of a logged prompt; the rest is counted, not written


def _prompt_text(body: bytes) -> str | None:
    """The last user turn's text of a chat request body (only read when prompts are logged), cut
    to ``MAX_LOGGED_PROMPT`` characters. Any body the proxy was sent, well-formed or not, gives a
    string or None: the request's log line must not depend on it."""
    try:
        messages = read_json(body).get("messages")  # as the handler read it (a lone surrogate mended)
    except (ValueError, AttributeError):
        return None
    if not isinstance(messages, list):
        return None
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                content = " ".join(p["text"] for p in content
                                   if isinstance(p, dict) and isinstance(p.get("text"), str))
            if not isinstance(content, str):
                return None
            if len(content) > MAX_LOGGED_PROMPT:
                content = f"{content[:MAX_LOGGED_PROMPT]}…(+{len(content) - MAX_LOGGED_PROMPT} chars)"
            return content
    return None


class RequestLogMiddleware:
    """Pure ASGI middleware: request id in and out, one JSON line per finished HTTP request.

    Header names the proxy uses to report routing are given by the app (``model_header`` etc.);
    the record's fields set by handlers win over what is read from headers and bodies.
    """

    def __init__(self, app, *, logger: logging.Logger | None = None,
                 include_prompts: Callable[[], bool] | bool = False,
                 on_record: Iterable[Callable[[RequestRecord], None]] = (),
                 model_header: str = "x-satroute-model",
                 scores_header: str = "x-satroute-scores",
                 scorer_ms_header: str = "x-satroute-scorer-ms",
                 failed_header: str = "x-satroute-failed",
                 skip_paths: Iterable[str] = ("/health", "/ready", "/metrics"),
                 in_flight=None, crash_response: Callable[[], Any] | None = None,
                 cut_response: Callable[[], Any] | None = None,
                 cut_event: bytes | None = None):
        self.app = app
        # the app's 500 (an ASGI response), sent from here when the app fails before answering,
        # so it too carries the request id (Starlette's own 500 is sent from outside this layer)
        self.crash_response = crash_response
        # what a request cut by the server (a shutdown past its grace period) ends with: its
        # answer (``cut_response``, an ASGI response) if none began, else this last event of a
        # stream that began; without them the server's own plain 500, or a truncated stream
        self.cut_response = cut_response
        self.cut_event = cut_event
        self.logger = logger or logging.getLogger("satroute.request")
        self._include_prompts = include_prompts
        self.on_record = list(on_record)
        self._headers = {model_header.lower().encode(): "model",
                         scores_header.lower().encode(): "scores",
                         scorer_ms_header.lower().encode(): "scorer_ms",
                         failed_header.lower().encode(): "failed"}
        self.skip_paths = frozenset(skip_paths)
        self.in_flight = in_flight  # a gauge-like object (inc/dec), e.g. Metrics.in_flight

    def include_prompts(self) -> bool:
        flag = self._include_prompts
        return bool(flag() if callable(flag) else flag)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        incoming = dict(scope.get("headers") or ()).get(REQUEST_ID_HEADER.encode(), b"").decode(
            "latin-1")
        record = RequestRecord(
            # one shaped like a credential would be [redacted] in the log, which then could not be
            # tied to the header the client got: it is given a fresh one, as a malformed one is
            request_id=(incoming if _GOOD_REQUEST_ID.match(incoming) and not _SECRET_SHAPES.search(incoming)
                        else new_request_id()),
            method=scope.get("method", ""), path=scope.get("path", ""))
        scope.setdefault("state", {})[_STATE_KEY] = record
        _REQUEST_ID.set(record.request_id)
        sniff = _BodySniffer()
        want_prompt = record.method == "POST" and self.include_prompts()
        request_body = bytearray()

        async def receive_wrapper():
            message = await receive()
            if want_prompt and message["type"] == "http.request":
                request_body.extend(message.get("body", b""))
            return message

        async def send_wrapper(message):
            kind = message["type"]
            if kind == "http.response.start":
                record.status = message["status"]
                headers = list(message.get("headers") or ())
                self._read_headers(record, headers, sniff)
                headers.append((REQUEST_ID_HEADER.encode(), record.request_id.encode()))
                message = {**message, "headers": headers}
            elif kind == "http.response.body":
                if record.ttfb_ms is None:
                    record.ttfb_ms = round((time.perf_counter() - started) * 1000, 2)
                sniff.feed(message.get("body", b""))
                if not message.get("more_body", False):
                    await send(message)
                    self._finish(record, sniff, started, request_body if want_prompt else None)
                    return
            await send(message)

        if self.in_flight is not None:
            self.in_flight.inc()
        try:
            await self.app(scope, receive_wrapper if want_prompt else receive, send_wrapper)
        except asyncio.CancelledError:
            # only the server cancels a request's own task: a shutdown whose grace period ran out
            # (a client that leaves is let go by the app and by Starlette without one)
            if self.cut_response is None:
                raise
            asyncio.current_task().uncancel()  # this request ends here, answered
            if record.total_ms is not None:  # its response had ended: nothing more may be sent
                return
            record.error = "shutting_down"
            if record.status == 0:
                await self.cut_response()(scope, receive, send_wrapper)
            elif sniff.kind == "sse" and self.cut_event is not None:
                await send_wrapper({"type": "http.response.body", "body": self.cut_event,
                                    "more_body": False})
        except Exception as exc:
            if record.status == 0 and self.crash_response is not None:
                record.error = type(exc).__name__
                await self.crash_response()(scope, receive, send_wrapper)
            raise  # the app's error handling logs it; its own 500 sees one already sent
        finally:
            # the id stays set: the line the app's last-resort handler logs with the trace, outside
            # this layer, carries it too (each request runs in a task and context of its own)
            if self.in_flight is not None:
                self.in_flight.dec()
            if record.total_ms is None:  # the app failed or the client left before the end
                failure = sys.exc_info()[0]
                # an app that returns before its response ended: a stream whose client went away
                record.error = record.error or (failure.__name__ if failure else "client disconnected")
                record.status = record.status or 500
                self._finish(record, sniff, started, request_body if want_prompt else None)

    def _read_headers(self, record: RequestRecord, headers, sniff: "_BodySniffer") -> None:
        for name, value in headers:
            lname = name.lower()
            if lname == b"content-type":
                sniff.kind = "sse" if b"event-stream" in value else (
                    "json" if b"json" in value else None)
                if record.stream is None:  # not a chat request: what the answer is
                    record.stream = sniff.kind == "sse"
                continue
            what = self._headers.get(lname)
            text = value.decode("latin-1")
            if what == "model" and record.routed_model is None:
                record.routed_model = unquote(text)
            elif what == "scores" and record.scores is None:
                record.scores = parse_scores(text)
            elif what == "scorer_ms" and record.scorer_ms is None:
                try:
                    record.scorer_ms = float(text)
                except ValueError:
                    pass
            elif what == "failed" and not record.failed_models:
                record.failed_models = [unquote(m.strip()) for m in text.split(",") if m.strip()]

    def _finish(self, record: RequestRecord, sniff: "_BodySniffer", started: float,
                request_body: bytearray | None) -> None:
        record.total_ms = round((time.perf_counter() - started) * 1000, 2)
        if record.refused is not None:
            record.status, record.error = record.refused
        record.stream = bool(record.stream)
        sniff.close()
        if record.routed_model is None:
            record.routed_model = sniff.model
        if record.usage is None:
            record.usage = sniff.usage
        record.upstream_error = sniff.error
        if record.error is None:  # a stream that ended in an error event still said 200
            record.error = sniff.error
        if request_body is not None:
            record.prompt = _prompt_text(bytes(request_body))
        for listener in self.on_record:
            listener(record)
        if record.path in self.skip_paths and record.status < 400:
            return
        self.logger.info("%s %s %s", record.method, record.path, record.status,
                         extra={"fields": record.fields()})


class _BodySniffer:
    """Finds the ``model`` and ``usage`` of an OpenAI response, JSON or SSE, without copying much."""

    def __init__(self):
        self.kind: str | None = None
        self.model: str | None = None
        self.usage: dict[str, int] | None = None
        self.error: str | None = None
        self._json = bytearray()
        self._sse_rest = b""

    def feed(self, chunk: bytes) -> None:
        if not chunk or self.kind is None:
            return
        if self.kind == "json":
            if len(self._json) + len(chunk) <= _MAX_SNIFF_BYTES:
                self._json.extend(chunk)
            else:
                self.kind = None
            return
        data = self._sse_rest + chunk
        lines = data.split(b"\n")
        self._sse_rest = lines.pop()
        for line in lines:
            self._sse_line(line)

    def _sse_line(self, line: bytes) -> None:
        line = line.strip()
        if not line.startswith(b"data:") or (self.model and b'"usage"' not in line
                                             and b'"error"' not in line):
            return
        try:
            obj = orjson.loads(line[5:])
        except orjson.JSONDecodeError:
            return
        self._take(obj)

    def _take(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            return
        if isinstance(obj.get("model"), str) and self.model is None:
            self.model = obj["model"]
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.usage = {k: v for k, v in usage.items() if isinstance(v, int)}
        error = obj.get("error")
        if isinstance(error, dict) and self.error is None:  # an error body, or a stream's error event
            self.error = str(error.get("code") or error.get("type") or "error")

    def close(self) -> None:
        if self.kind == "json" and self._json:
            try:
                self._take(orjson.loads(bytes(self._json)))
            except orjson.JSONDecodeError:
                pass
        elif self.kind == "sse" and self._sse_rest:
            self._sse_line(self._sse_rest)
        self._json.clear()
        self._sse_rest = b""
