"""A stand-in for llama-cpp-python's server in supervision tests: answers GET /v1/models on a port.

Usage: python fake_model_server.py PORT [--exit-after SECONDS] [--exit-code N] [--never-ready]
                                 [--uvicorn] [--ignore-stop]

``--uvicorn`` serves through uvicorn, as llama-cpp-python's server does: it installs its own SIGINT
and SIGTERM handlers (a graceful stop), over whatever the process inherited. ``--ignore-stop``
ignores SIGINT and SIGTERM, as llama-cpp-python's server does while it computes a non-streamed
answer (its client gone or not): it stops once that is done.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        body = json.dumps({"object": "list", "data": [{"id": "fake", "object": "model",
                                                       "pid": os.getpid()}]}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


async def _asgi(scope, receive, send):
    if scope["type"] != "http":
        return
    body = json.dumps({"object": "list", "data": [{"id": "fake", "object": "model",
                                                   "pid": os.getpid()}]}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--exit-after", type=float)
    parser.add_argument("--exit-code", type=int, default=3)
    parser.add_argument("--never-ready", action="store_true")
    parser.add_argument("--uvicorn", action="store_true")
    parser.add_argument("--ignore-stop", action="store_true")
    args = parser.parse_args()
    print(f"fake server pid {os.getpid()} starting", flush=True)
    if args.ignore_stop:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.exit_after is not None:
        threading.Timer(args.exit_after, lambda: os._exit(args.exit_code)).start()
    if args.never_ready:
        threading.Event().wait()
    if args.uvicorn:
        import uvicorn

        uvicorn.run(_asgi, host="127.0.0.1", port=args.port, log_level="warning")
        return
    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
