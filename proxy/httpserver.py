"""The HTTP server's protocol: uvicorn's httptools protocol, bounded where a client could hold it.

Owns: how many bytes the parser may read outside a body, and how long a request head may take to
arrive. uvicorn's httptools protocol bounds neither: one connection sending a header (or a chunked
body's trailer) of hundreds of MiB costs the process seconds of CPU per 64 MiB (httptools builds
the value by repeated concatenation) and as much memory, and a connection that sends half a head,
or nothing, is kept for ever (its keep-alive timeout starts only after a response).

- More than ``MAX_HEAD_BYTES`` fed to the parser with no body byte among them (a request line and
  headers, a chunked body's size lines and trailers) is refused before the parser reads much past
  the bound: ``431``, and the connection is closed; a pipelined head refused behind an answer
  still owed gets no answer of its own: the connection is closed once that answer is sent.
  Bytes that follow body bytes in one piece fed are counted from the next piece on, so trailers
  are refused within twice the bound.
- A head not complete ``HEAD_TIMEOUT_S`` after the connection opened, or after the first byte that
  follows an answer on a kept-alive connection, gets ``408`` (nothing, if nothing came) and the
  connection is closed; not while an earlier request on it is still being answered.
- An offer to switch protocols that the server does not take (``Connection: Upgrade`` with
  ``Upgrade: h2c``, which Java's ``HttpClient`` sends on every ``http://`` request by default) is
  declined, as RFC 9110 section 7.8 allows: the request is answered as plain HTTP/1.1, with its
  body. httptools ends such a request at its head (no body reaches the app, and the body's bytes
  are then parsed as a request of their own); the head is therefore read again, without the
  offer, by a fresh parser, followed by what came after it.

Both answers are OpenAI's error shape, as every other, with an ``x-request-id`` and the request's
log line (the app's middleware, which writes every other, never sees them). Does not know: the
app; a body's pace
(``proxy.endpoints.read_body`` bounds that).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from proxy.errors import error_body
from proxy.logs import RequestRecord, new_request_id, request_record_of

_request_log = logging.getLogger("satroute.request")

MAX_HEAD_BYTES = 64 * 1024  # nginx's default allows 32 KiB of headers, h11 16 KiB
HEAD_TIMEOUT_S = 30.0  # nginx's client_header_timeout is 60 s
LINGER_S = 2.0  # after a refusal, how long what the client still sends is read and dropped


def _path_of(url: bytes) -> str:
    """A request target as a refusal's log line names it: without its query (which may carry a
    token), as every other request's line has it, and at most 200 characters."""
    return url.partition(b"?")[0].decode("latin-1", "replace")[:200]


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    max_head_bytes = MAX_HEAD_BYTES
    head_timeout_s = HEAD_TIMEOUT_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._run = 0  # bytes fed since the parser last read body bytes or ended a message
        self._in_head = True  # a head is awaited: from the connection, or a request's first byte
        self._began = False  # the awaited head's first byte has come
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False  # what comes after a refusal is not read
        self._declined = False  # this head offers a protocol switch the server does not take
        # a pipelined request's refusal (its message and path), after the answers owed
        self._after_owed: tuple[str, str] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._in_head and self.timeout_keep_alive_task is not None:
            # bytes on a connection idle after its answer (a bare CRLF, or the rest of a body the
            # app never read) end uvicorn's keep-alive timer: they start a head, and its timer
            self._in_head = True
            self._arm()
        # fed in pieces no larger than what is left under the bound: the parser never reads past
        # it outside a body, and the bytes of a body reset the count as it reads them
        while data and not self._refused and not self.transport.is_closing():
            room = self.max_head_bytes + 1 - self._run
            piece, data = data[:room], data[room:]
            self._run += len(piece)
            self._feed(piece)
            if self._run > self.max_head_bytes and not self._refused:
                self._refuse(431, "Request Header Fields Too Large", "request_header_too_large",
                             f"over {self.max_head_bytes} bytes of request line, headers or "
                             "trailers")

    def _feed(self, data: bytes) -> None:
        """uvicorn's ``data_received`` (0.55), but an upgrade it would not take is declined: the
        head is read again without the offer, with what followed it (a loop, not a recursion:
        a thousand such heads pipelined in one read are a thousand turns)."""
        self._unset_keepalive_if_required()
        while data:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError as exc:
                # what a callback of ours or uvicorn's refused (a request target that is no URL)
                # by its own words, not httptools' "callback error"
                cause = exc.__context__ if isinstance(exc, httptools.parser.errors.HttpParserCallbackError) else None
                why = f"not a valid HTTP/1.1 request: {(str(cause or exc).strip() or 'unparsable')[:200]}"
                in_body = not self._began and self.cycle is not None  # of a request the app has
                if in_body and self._queued(self.cycle):
                    # of a pipelined request not begun yet: it never reaches the app; the answers
                    # owed before it go first, then its 400 (on_response_complete)
                    self.pipeline.remove(next(p for p in self.pipeline if p[0] is self.cycle))
                    self._refused = True
                    self.transport.pause_reading()
                    self._after_owed = (why, _path_of(self.url))
                    return
                if in_body and self.cycle.response_started:
                    # of a request the app has answered, or is answering (bytes after its answer
                    # may have been taken for its body): the app sees the connection go (one
                    # answer and one log line each)
                    self._refused = True
                    self.transport.close()
                    return
                record = None
                if in_body:
                    # of a request the app runs and has not answered yet (it waits for the body):
                    # the 400 is that request's answer, under its request id, and its line and
                    # count say so, not a client that left; what the app sends after it is
                    # dropped (the cycle is done with)
                    record = request_record_of(self.cycle.scope)
                    self.cycle.disconnected = True
                    self.cycle.message_event.set()
                # in OpenAI's error shape, with a request id and a line in the request log, as the
                # other refusals below the app are (uvicorn's is a bare text/plain 400)
                self._refuse(400, "Bad Request", "invalid_http_request", why, record)
            except httptools.HttpParserUpgrade as exc:
                if self._declined:
                    data = self._without_the_offer() + data[exc.args[0]:]
                    continue
                if self._should_upgrade():
                    self.handle_websocket_upgrade()
                else:  # CONNECT: uvicorn's answer, unchanged
                    self._unsupported_upgrade_warning()
            return

    def _queued(self, cycle) -> bool:
        """Whether ``cycle`` waits in the pipeline, behind a request still being answered."""
        return any(queued is cycle for queued, _ in self.pipeline)

    def on_response_complete(self) -> None:
        owed = bool(self.pipeline)
        super().on_response_complete()
        if self._after_owed is not None and not owed and not self.transport.is_closing():
            # the last answer owed before a pipelined request refused in its body: its 400 now
            if self.timeout_keep_alive_task is not None:
                self.timeout_keep_alive_task.cancel()
                self.timeout_keep_alive_task = None
            (message, path), self._after_owed = self._after_owed, None
            self._refused = False  # _refuse sets it again
            self._refuse(400, "Bad Request", "invalid_http_request", message, path=path)

    def _without_the_offer(self) -> bytes:
        """The declined head, as it was parsed but without its offer to switch protocols, for a
        fresh parser (now ``self.parser``) to read."""
        self._declined = False
        offer = {b"upgrade", b"http2-settings"}
        lines = [self.parser.get_method() + b" " + self.url + b" HTTP/"
                 + self.parser.get_http_version().encode("ascii")]
        for name, value in self.headers:
            if name == b"connection":
                value = b", ".join(t.strip() for t in value.split(b",") if t.strip().lower() not in offer)
                if not value:
                    continue
            elif name in offer:
                continue
            lines.append(name + b": " + value)
        self.parser = httptools.HttpRequestParser(self)
        self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def on_body(self, body: bytes) -> None:
        self._run = 0
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self._declined:  # httptools ends a request that offers an upgrade at its head
            return
        self._run = 0
        super().on_message_complete()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._began = True
        if not self._in_head:  # the next request on a kept-alive connection
            self._in_head = True
            self._arm()

    def on_headers_complete(self) -> None:
        if self.parser.should_upgrade() and not self._should_upgrade() \
                and self.parser.get_method() != b"CONNECT":  # CONNECT's switch is its method's
            self._declined = True  # read again without the offer (_feed), with its body
            return
        self._disarm()
        super().on_headers_complete()  # one that raises (a target that is no URL) leaves the head in
        self._in_head = self._began = False  # progress: its refusal waits for an answer still owed

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _owed(self) -> bool:
        """Whether an earlier request on this connection is still being answered (pipelined): its
        answer goes first, and reading waits for it."""
        return (self.cycle is not None and not self.cycle.response_complete) or bool(self.pipeline)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._in_head or self._refused or self.transport.is_closing():
            return
        if self._owed():  # its head may be waiting on our reading, paused for the earlier answer
            self._arm()
        elif self._began or self._run:  # a request began: say why it ends
            self._refuse(408, "Request Timeout", "request_timeout",
                         f"request head not received within {self.head_timeout_s:g}s")
        else:  # nothing was sent: nothing to answer
            self.transport.close()

    def _refuse(self, status: int, phrase: str, code: str, message: str,
                record: RequestRecord | None = None, path: str | None = None) -> None:
        """Answer ``status`` in OpenAI's error shape and close. ``record``: the app's record of the
        request refused, which takes the refusal for its own line (the request id the answer
        carries, the status and the code); else a line is written here, with ``path`` (the
        request's, as far as it came when not given)."""
        self._refused = True
        self._disarm()
        if self._in_head and self._owed():  # an earlier request's answer first, then close
            self.transport.pause_reading()
            if self.cycle is not None:
                self.cycle.keep_alive = False
            return
        if self.cycle is not None and self.cycle.response_started and not self.cycle.response_complete:
            self.transport.close()  # this request's own answer began (its trailers came late): cut
            return
        body = orjson.dumps(error_body(message, "invalid_request_error", code))
        request_id = record.request_id if record is not None else new_request_id()
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"x-request-id: %s\r\nconnection: close\r\n\r\n%s"
                             % (status, phrase.encode(), len(body), request_id.encode(), body))
        # answered below the app, whose middleware writes every other request's line: this one's
        # line is written here, so that a refused request leaves a trace too
        if record is not None:
            record.refused = (status, code)
        else:
            if path is None:  # the path as far as it came
                path = _path_of(getattr(self, "url", b"") if self._began else b"")
            fields = {"request_id": request_id, "path": path, "status": status, "error": code}
            if self.client:
                fields["client"] = "%s:%s" % tuple(self.client)
            _request_log.info("- %s %d", path or "-", status, extra={"fields": fields})
        # a lingering close: what the client is still sending is read and dropped for a moment, so
        # that its unread bytes do not make the kernel reset the connection before it reads this
        try:
            self.transport.write_eof()
        except (NotImplementedError, OSError, RuntimeError):
            pass
        self.loop.call_later(LINGER_S, self.transport.close)
