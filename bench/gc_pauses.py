"""Garbage-collector pauses in a process that holds what ``satroute serve`` holds, with and without
``gc.freeze()`` (which the proxy calls once its scorer is loaded and warm, and after litellm's import).

A full (generation 2) collection walks every tracked object: the app's modules, litellm and the
loaded scorer are several hundred thousand, and a collection runs on the event loop, holding every
request. A large request body (many messages) allocates enough to trigger several. This parses
such a body ``--parses`` times, as the chat endpoint does, and prints the parse times and the full
collections it triggered, then the same after ``gc.freeze()``.

    .venv/bin/python bench/gc_pauses.py [--messages 20000] [--parses 40]
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(raw: bytes, parses: int) -> dict:
    from proxy.endpoints import parse_request

    full: list[float] = []
    began = [0.0]

    def watch(phase: str, info: dict) -> None:
        if info["generation"] == 2:
            if phase == "start":
                began[0] = time.perf_counter()
            else:
                full.append((time.perf_counter() - began[0]) * 1000)

    gc.callbacks.append(watch)
    times, held = [], None
    try:
        for _ in range(parses):
            started = time.perf_counter()
            held = parse_request(raw)  # a request's objects live while it is served
            times.append((time.perf_counter() - started) * 1000)
    finally:
        gc.callbacks.remove(watch)
    del held
    return {"parse_p50_ms": statistics.median(times), "parse_max_ms": max(times),
            "full_collections": len(full), "full_p50_ms": statistics.median(full) if full else 0.0,
            "full_max_ms": max(full) if full else 0.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=20_000)
    ap.add_argument("--parses", type=int, default=40)
    a = ap.parse_args(argv)
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import importlib

    import orjson

    from scorer import load_scorer

    # what the proxy holds: its app, litellm (once a model needs it), the loaded scorer
    held = [importlib.import_module("proxy.app"), importlib.import_module("litellm"), load_scorer()]
    raw = orjson.dumps({"model": "m", "messages": [
        {"role": "user" if i % 2 == 0 else "assistant", "content": "hi"} for i in range(a.messages)]})
    print(f"{len(gc.get_objects())} objects tracked by the collector; body of {a.messages} messages, "
          f"{len(raw) // 1024} KiB, parsed {a.parses} times")
    print("| | parse p50 ms | parse max ms | full collections | each, p50 ms | max ms |")
    print("|---|---|---|---|---|---|")
    for label in ("as loaded", "after gc.freeze()"):
        if label != "as loaded":
            gc.freeze()
        r = run(raw, a.parses)
        print(f"| {label} | {r['parse_p50_ms']:.0f} | {r['parse_max_ms']:.0f} | {r['full_collections']} | "
              f"{r['full_p50_ms']:.0f} | {r['full_max_ms']:.0f} |")
    del held
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
