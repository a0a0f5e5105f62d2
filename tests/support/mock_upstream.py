"""A real OpenAI-compatible HTTP server on 127.0.0.1 for tests and benchmarks.

It speaks enough of the OpenAI API (``POST /v1/chat/completions``, streaming or not, a stream with
``n`` choices, ``stream_options.include_usage``; ``GET /v1/models``), and of Anthropic's
(``POST /v1/messages``, for the litellm path's translation), and can be told, per model or per request,
to answer, stream, fail with a status, stall, drop the connection (before answering or in the
middle of a stream), or answer 429 with Retry-After.
It records every request body it received. Lean on purpose (asyncio + httptools, no framework) so
that it is never the bottleneck of a benchmark.

In-process use (tests)::

    with MockUpstream() as up:                      # serves on a free port, in a thread
        up.set("m1", answer("hello"))               # default for model m1 ("*": any model)
        up.queue("m1", fail(503), rate_limit(1.0))  # the next two requests to m1, then default
        ... base_url=up.url ...                     # "http://127.0.0.1:PORT/v1"
        up.bodies("m1")                             # request bodies received for m1

As a process (benchmarks): ``python tests/support/mock_upstream.py --port 9001``.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httptools


@dataclass(frozen=True)
class Behavior:
    kind: str = "answer"  # answer | fail | stall | drop
    content: str | None = None  # the answer's text; default "reply from <model>"
    status: int = 200
    message: str = ""
    error_type: str = "server_error"
    retry_after: float | None = None
    delay: float = 0.0  # seconds before the answer (stall: before answering at all)
    chunks: int = 4  # streamed content chunks
    chunk_delay: float = 0.0
    cut_after: int | None = None  # streams: close the connection after this many events
    refusal: str | None = None  # answer with this refusal (OpenAI format) instead of content
    finish: str = "stop"  # the answer's finish_reason, each choice's in a stream of n
    headers: tuple[tuple[str, str], ...] = ()  # a failure's own headers (a rate limit's resets)


def answer(content: str | None = None, delay: float = 0.0, chunks: int = 4,
           chunk_delay: float = 0.0, cut_after: int | None = None,
           refusal: str | None = None, finish: str = "stop") -> Behavior:
    return Behavior("answer", content=content, delay=delay, chunks=chunks, chunk_delay=chunk_delay,
                    cut_after=cut_after, refusal=refusal, finish=finish)


def fail(status: int = 500, message: str = "mock failure", error_type: str | None = None,
         retry_after: float | None = None, headers: dict[str, str] | None = None) -> Behavior:
    etype = error_type or ("invalid_request_error" if status < 500 else "server_error")
    return Behavior("fail", status=status, message=message, error_type=etype,
                    retry_after=retry_after, headers=tuple((headers or {}).items()))


def rate_limit(retry_after: float = 1.0) -> Behavior:
    return fail(429, "rate limited", "rate_limit_error", retry_after=retry_after)


def stall(seconds: float = 30.0) -> Behavior:
    return Behavior("stall", delay=seconds)


def drop() -> Behavior:
    return Behavior("drop")


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: Any
    at: float = field(default_factory=time.monotonic)


class MockUpstream:
    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host, self.port = host, port
        self._defaults: dict[str, Behavior] = {"*": answer()}
        self._queues: dict[str, collections.deque[Behavior]] = collections.defaultdict(
            collections.deque)
        self._lock = threading.Lock()
        self.received: list[Received] = []
        self.open: set["_Conn"] = set()  # the connections clients hold now
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None

    # -- control ---------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def set(self, model: str, behavior: Behavior) -> None:
        with self._lock:
            self._defaults[model] = behavior
            self._queues.pop(model, None)

    def queue(self, model: str, *behaviors: Behavior) -> None:
        with self._lock:
            self._queues[model].extend(behaviors)

    def reset(self) -> None:
        with self._lock:
            self._defaults = {"*": answer()}
            self._queues.clear()
            self.received.clear()

    def bodies(self, model: str | None = None) -> list[Any]:
        with self._lock:
            return [r.body for r in self.received if model is None
                    or (isinstance(r.body, dict) and r.body.get("model") == model)]

    def behavior_for(self, model: str) -> Behavior:
        with self._lock:
            q = self._queues.get(model)
            if q:
                return q.popleft()
            return self._defaults.get(model) or self._defaults["*"]

    def record(self, path: str, headers: dict[str, str], body: Any) -> None:
        with self._lock:
            self.received.append(Received(path, headers, body))

    # -- lifecycle -------------------------------------------------------------------------------
    async def serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        # IPPROTO_TCP explicitly, so asyncio sets TCP_NODELAY on accepted connections (streams
        # are many small writes; Nagle would hold them back against the client's delayed ACK).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self._server = await self._loop.create_server(lambda: _Conn(self), sock=sock, backlog=1024)
        await self._server.serve_forever()

    def start(self) -> "MockUpstream":
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            task = loop.create_task(self.serve())
            loop.call_soon(lambda: loop.call_later(0.01, ready.set))
            try:
                loop.run_until_complete(task)
            except asyncio.CancelledError:
                pass
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="mock-upstream", daemon=True)
        self._thread.start()
        if not ready.wait(10) or self.port == 0:
            raise RuntimeError("mock upstream did not start")
        return self

    def stop(self) -> None:
        if self._loop and self._server:
            self._loop.call_soon_threadsafe(self._server.close)
            for task in asyncio.all_tasks(self._loop):
                self._loop.call_soon_threadsafe(task.cancel)
        if self._thread:
            self._thread.join(5)

    def __enter__(self) -> "MockUpstream":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Conn(asyncio.Protocol):
    def __init__(self, mock: MockUpstream):
        self.mock = mock
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.pending: asyncio.Task | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.mock.open.add(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.mock.open.discard(self)
        if self.pending:
            self.pending.cancel()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        path = self.url.decode().split("?")[0]
        method = self.parser.get_method().decode()
        raw = b"".join(self.body)
        headers = self.headers
        self.url, self.headers, self.body = b"", {}, []
        self.pending = asyncio.get_running_loop().create_task(self.handle(method, path, headers, raw))

    def write(self, status: int, body: bytes, ctype: bytes = b"application/json",
              extra: bytes = b"") -> None:
        self.transport.write(b"HTTP/1.1 %d X\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s\r\n"
                             % (status, ctype, len(body), extra) + body)

    async def handle(self, method: str, path: str, headers: dict[str, str], raw: bytes) -> None:
        if method == "GET" and path.endswith("/models"):
            self.write(200, json.dumps({"object": "list", "data": []}).encode())
            return
        if method == "POST" and path.endswith("/messages"):
            await self.handle_anthropic(path, headers, raw)
            return
        if method != "POST" or not path.endswith("/chat/completions"):
            self.write(404, b'{"error":{"message":"not found","type":"invalid_request_error"}}')
            return
        try:
            body = json.loads(raw)
        except ValueError:
            self.write(400, b'{"error":{"message":"bad json","type":"invalid_request_error"}}')
            return
        self.mock.record(path, headers, body)
        model = body.get("model", "")
        b = await self.behave(model)
        if b is None:
            return
        if b.kind == "fail":
            err = {"error": {"message": b.message, "type": b.error_type, "param": None,
                             "code": "mock_error" if b.status != 429 else "rate_limit_exceeded"}}
            self.write(b.status, json.dumps(err).encode(), extra=retry_after_header(b))
            return
        text = b.content if b.content is not None else f"reply from {model}"
        if body.get("stream"):
            await self.stream(model, text, b, body)
        else:
            self.write(200, completion(model, text, b.refusal, b.finish))

    async def behave(self, model: str) -> Behavior | None:
        """The behaviour for ``model``'s request, after its delay (a stall's too); None when it is
        to drop the connection, which is then closed."""
        b = self.mock.behavior_for(model)
        if b.delay:
            await asyncio.sleep(b.delay)
        if b.kind == "drop":
            self.transport.close()
            return None
        return b

    async def handle_anthropic(self, path: str, headers: dict[str, str], raw: bytes) -> None:
        """Anthropic's Messages API, as strict as the real one about unknown top-level fields and
        about what may go with thinking."""
        body = json.loads(raw)
        self.mock.record(path, headers, body)
        model = body.get("model", "")
        unknown = sorted(set(body) - ANTHROPIC_FIELDS)
        if unknown:
            self.write(400, anthropic_error("invalid_request_error",
                                            f"{unknown[0]}: Extra inputs are not permitted"))
            return
        refused = thinking_refused(body)
        if refused:
            self.write(400, anthropic_error("invalid_request_error", refused))
            return
        b = await self.behave(model)
        if b is None:
            return
        if b.kind == "fail":
            self.write(b.status, anthropic_error(b.error_type, b.message), extra=retry_after_header(b))
            return
        text = b.content if b.content is not None else f"reply from {model}"
        if not body.get("stream"):
            self.write(200, json.dumps(anthropic_message(model, text)).encode())
            return
        start = anthropic_message(model, "")
        start["content"], start["stop_reason"] = [], None
        events = [("message_start", {"type": "message_start", "message": start}),
                  ("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": {"type": "text", "text": ""}}),
                  ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                           "delta": {"type": "text_delta", "text": text}}),
                  ("content_block_stop", {"type": "content_block_stop", "index": 0}),
                  ("message_delta", {"type": "message_delta", "usage": {"output_tokens": 7},
                                     "delta": {"stop_reason": "end_turn", "stop_sequence": None}}),
                  ("message_stop", {"type": "message_stop"})]
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n")
        for name, data in events:
            ev = f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
            self.transport.write(b"%x\r\n%s\r\n" % (len(ev), ev))
        self.transport.write(b"0\r\n\r\n")

    async def stream(self, model: str, text: str, b: Behavior, body: dict[str, Any]) -> None:
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n")
        n = max(1, b.chunks)
        step = max(1, -(-len(text) // n))
        pieces = [text[i:i + step] for i in range(0, len(text), step)] or [""]
        # n choices as OpenAI streams them: one choice a chunk, interleaved, each ended by its own
        choices = range(choices_asked(body))
        events = [chunk(model, {"role": "assistant", "content": ""}, None, i) for i in choices]
        events += [chunk(model, {"content": p}, None, i) for p in pieces for i in choices]
        events += [chunk(model, {}, b.finish, i) for i in choices]
        opts = body.get("stream_options") or {}
        if opts.get("include_usage"):
            events.append(sse({"id": "chatcmpl-mock", "object": "chat.completion.chunk",
                               "created": 0, "model": model, "choices": [], "usage": usage()}))
        events.append(b"data: [DONE]\n\n")
        for i, ev in enumerate(events):
            if b.cut_after is not None and i >= b.cut_after:
                self.transport.close()  # mid-stream, without the terminating chunk
                return
            self.transport.write(b"%x\r\n%s\r\n" % (len(ev), ev))
            if b.chunk_delay:
                await asyncio.sleep(b.chunk_delay)
        self.transport.write(b"0\r\n\r\n")


def retry_after_header(b: Behavior) -> bytes:
    """A failure's headers: its Retry-After, where it has one, and its own."""
    said = b"retry-after: %s\r\n" % str(b.retry_after).encode() if b.retry_after is not None else b""
    return said + b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in b.headers)


def usage() -> dict[str, int]:
    return {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def choices_asked(body: dict[str, Any]) -> int:
    n = body.get("n")
    return int(n) if isinstance(n, (int, float)) and n >= 1 else 1


def chunk(model: str, delta: dict[str, Any], finish: str | None, index: int = 0) -> bytes:
    return sse({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0,
                "model": model, "system_fingerprint": "fp_mock",
                "choices": [{"index": index, "delta": delta, "finish_reason": finish}]})


def completion(model: str, text: str, refusal: str | None = None, finish: str = "stop") -> bytes:
    message = ({"role": "assistant", "content": None, "refusal": refusal} if refusal is not None
               else {"role": "assistant", "content": text})
    return json.dumps({
        "id": "chatcmpl-mock", "object": "chat.completion", "created": 0, "model": model,
        "system_fingerprint": "fp_mock", "x_mock_extra": {"kept": True},
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": usage()}, separators=(",", ":")).encode()


# The top-level fields Anthropic's Messages API takes; any other is a 400.
ANTHROPIC_FIELDS = frozenset({
    "model", "messages", "max_tokens", "system", "stop_sequences", "stream", "temperature", "top_p",
    "top_k", "metadata", "tools", "tool_choice", "thinking", "output_config", "service_tier", "container",
    "mcp_servers"})


def thinking_refused(body: dict[str, Any]) -> str | None:
    """Anthropic's words for a request whose thinking it does not take with the rest of it."""
    thinking = body.get("thinking") if isinstance(body.get("thinking"), dict) else {}
    if thinking.get("type") == "enabled" and body.get("max_tokens", 0) <= thinking.get("budget_tokens", 0):
        return "`max_tokens` must be greater than `thinking.budget_tokens`"
    if thinking.get("type") in ("enabled", "adaptive") and body.get("temperature") not in (None, 1):
        return "`temperature` may only be set to 1 when thinking is enabled"
    return None


def anthropic_message(model: str, text: str) -> dict[str, Any]:
    return {"id": "msg_mock", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
            "stop_sequence": None, "usage": {"input_tokens": 11, "output_tokens": 7}}


def anthropic_error(error_type: str, message: str) -> bytes:
    return json.dumps({"type": "error", "error": {"type": error_type, "message": message}}).encode()


def main() -> None:
    ap = argparse.ArgumentParser(description="OpenAI-compatible mock upstream")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9001)
    ap.add_argument("--content", default=None, help="answer text")
    ap.add_argument("--chunks", type=int, default=8)
    args = ap.parse_args()
    mock = MockUpstream(args.host, args.port)
    mock.set("*", answer(args.content, chunks=args.chunks))
    mock.received = _Discard()  # a benchmark does not keep bodies
    try:
        import uvloop

        uvloop.run(mock.serve())
    except ImportError:
        asyncio.run(mock.serve())


class _Discard(list):
    def append(self, item: Any) -> None:
        pass


if __name__ == "__main__":
    main()
