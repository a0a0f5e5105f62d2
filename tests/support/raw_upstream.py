"""A raw HTTP upstream for the tests of what real servers put on the wire (status line, headers
and body bytes chosen by the test), beside the higher-level mock in ``mock_upstream``."""
from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time


def raw_upstream(respond):
    """An HTTP server answering each POST with ``respond(request_json) -> bytes`` (status line,
    headers and a close-delimited body), or ``await respond(request_json, reader, writer)`` when
    it is a coroutine function, on a thread; a context manager yielding its /v1 URL."""
    async def handle(reader, writer):
        data = b""
        while b"\r\n\r\n" not in data:
            data += await reader.read(65536)
        head, body = data.split(b"\r\n\r\n", 1)
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        while len(body) < length:
            body += await reader.read(65536)
        if asyncio.iscoroutinefunction(respond):  # it writes itself, at its own pace
            await respond(json.loads(body), reader, writer)
        else:
            writer.write(respond(json.loads(body)))
            await writer.drain()
        writer.close()

    @contextlib.contextmanager
    def running():
        ready, box = threading.Event(), {}

        def serve():
            async def main():
                server = await asyncio.start_server(handle, "127.0.0.1", 0)
                box.update(port=server.sockets[0].getsockname()[1], loop=asyncio.get_running_loop(),
                           stop=asyncio.Event())
                ready.set()
                async with server:
                    await box["stop"].wait()
            asyncio.run(main())

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        ready.wait(5)
        try:
            yield f"http://127.0.0.1:{box['port']}/v1"
        finally:
            box["loop"].call_soon_threadsafe(box["stop"].set)
            thread.join(5)

    return running()


@contextlib.contextmanager
def never_connecting_port():
    """The port of a loopback listener whose backlog is full: a connect to it never completes."""
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(0)
        port = hole.getsockname()[1]
        fillers = []
        for _ in range(3):  # fill the backlog: later connects hang
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fillers.append(s)
        time.sleep(0.1)
        try:
            yield port
        finally:
            for s in fillers:
                s.close()
