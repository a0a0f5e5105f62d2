"""Run the real proxy app under uvicorn on 127.0.0.1 in a background thread (tests reuse this).

    with ProxyServer(create_app(settings, scorer=fake)) as proxy:
        client = openai.OpenAI(base_url=proxy.url, api_key="x")
"""
from __future__ import annotations

import asyncio
import socket
import threading
import time

import uvicorn
from starlette.applications import Starlette

from proxy.httpserver import BoundedHttpToolsProtocol


class ProxyServer:
    def __init__(self, app: Starlette, host: str = "127.0.0.1", http: type | None = None):
        self.app = app
        self.host = host
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP;
        # without it every keep-alive response waits ~40 ms (Nagle meets the client's delayed ACK).
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.port = self.sock.getsockname()[1]
        # the protocol `satroute serve` runs (bounded request heads), unless a test gives its own
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                timeout_graceful_shutdown=2, http=http or BoundedHttpToolsProtocol)
        self.server = uvicorn.Server(config)
        self.thread: threading.Thread | None = None

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base}/v1"

    def start(self) -> "ProxyServer":
        self.thread = threading.Thread(
            target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])),
            name="proxy-server", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("proxy server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread:
            self.thread.join(10)
        self.sock.close()

    def __enter__(self) -> "ProxyServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
