"""The HTTP server's protocol: uvicorn's httptools protocol, bounded where a client could hold it.

Owns: how large a request head (request line and headers) may be and how long it may take to
arrive. uvicorn's httptools protocol bounds neither: one connection sending a header of hundreds of
MiB costs the process seconds of CPU per 64 MiB (the value is built by repeated concatenation) and
as much memory, and a connection that sends half a head, or nothing, is kept for ever (its
keep-alive timeout starts only after a response). A head larger than ``MAX_HEAD_BYTES`` gets a
``431`` and the connection is closed; one not complete ``HEAD_TIMEOUT_S`` after the connection
opened (or its previous request began) gets a ``408`` and the connection is closed.
Does not know: the app, bodies (``proxy.endpoints.read_body`` bounds those).
"""
from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024  # nginx's default allows 32 KiB of headers, h11 16 KiB
HEAD_TIMEOUT_S = 30.0  # nginx's client_header_timeout is 60 s


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    max_head_bytes = MAX_HEAD_BYTES
    head_timeout_s = HEAD_TIMEOUT_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # a head is being read: from the connection or a request's first byte
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        if self._in_head:  # counted before the parser sees it: it is the parser that is costly
            end = data.find(b"\r\n\r\n")
            self._head_bytes += len(data) if end < 0 else end + 4
            if self._head_bytes > self.max_head_bytes:
                self._refuse(431, "Request Header Fields Too Large",
                             f"request line and headers over {self.max_head_bytes} bytes")
                return
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self._in_head:  # the next request on a kept-alive connection
            self._in_head, self._head_bytes = True, 0
            self._arm()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm()
        super().on_headers_complete()

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._in_head or self.transport.is_closing():
            return
        if self._head_bytes:  # a request began: say why it ends
            self._refuse(408, "Request Timeout", f"request head not received within {self.head_timeout_s:g}s")
        else:  # nothing was sent: nothing to answer
            self.transport.close()

    def _refuse(self, status: int, phrase: str, message: str) -> None:
        body = message.encode()
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                             % (status, phrase.encode(), len(body), body))
        self.transport.close()
