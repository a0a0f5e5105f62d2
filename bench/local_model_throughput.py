"""Generation speed of the built-in local model (SmolLM2-135M, llama-cpp-python) per thread count.

Starts the local server the way the proxy does (proxy.localserver) once per thread count and prints
the wall time and completion tokens/s of a 32- and a 128-token answer (temperature 0).

    .venv/bin/python bench/local_model_throughput.py --threads 1 2
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy.localserver import (  # noqa: E402
    BUILTIN_SMOLLM2, LocalServer, LocalServerSpec, free_port, resolve_gguf)

PROMPT = "Write a long story about a dragon."


async def measure(threads: int, lengths: list[int]) -> None:
    spec = LocalServerSpec(model_path=resolve_gguf(BUILTIN_SMOLLM2), alias="smollm2",
                           port=free_port(), n_ctx=2048, n_threads=threads)
    server = LocalServer.for_spec(spec)
    await server.start()
    try:
        async with httpx.AsyncClient(timeout=600, trust_env=False) as client:
            for n in lengths:
                started = time.perf_counter()
                body = (await client.post(f"{spec.api_base}/chat/completions", json={
                    "model": "smollm2", "max_tokens": n, "temperature": 0,
                    "messages": [{"role": "user", "content": PROMPT}]})).json()
                seconds = time.perf_counter() - started
                tokens = body["usage"]["completion_tokens"]
                print(f"threads {threads}  max_tokens {n:4d}  {tokens:4d} tokens  "
                      f"{seconds:6.2f} s  {tokens / seconds:6.1f} tokens/s", flush=True)
    finally:
        await server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 128])
    args = parser.parse_args()
    for threads in args.threads:
        asyncio.run(measure(threads, args.lengths))


if __name__ == "__main__":
    main()
