"""The scorer's load on a fresh machine (no converted backbone yet) and on a later start.

Usage::

    python bench/first_start.py [--checkpoint PATH] [--dtype auto] [--json OUT.json]

Each start is a fresh process with ``SATROUTE_CACHE_DIR`` pointed at a new, empty folder for the
first one (so SmolLM2's GGUF is dequantized into it, as on a fresh machine or an empty container
volume) and at that same folder for the second. Prints, per start, the seconds ``load_scorer``
took, the process's peak resident memory and its resident memory once loaded.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one_start(checkpoint: str | None, dtype: str) -> dict:
    from scorer_latency import rss_peak_mb  # bench helper beside this file

    started = time.perf_counter()
    from scorer import load_scorer

    scorer = load_scorer(checkpoint, dtype=dtype)
    load_s = time.perf_counter() - started
    rss_mb = next(int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith("VmRSS"))
    return {"load_s": load_s, "peak_rss_mb": rss_peak_mb(), "rss_after_load_mb": rss_mb, "runs_on": scorer.runs_on}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--json", default=None)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: one start, JSON out
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(one_start(a.checkpoint, a.dtype)))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "SATROUTE_CACHE_DIR": cache, "PYTHONPATH": str(REPO)}
        child = [sys.executable, __file__, "--one", "--dtype", a.dtype,
                 *(["--checkpoint", a.checkpoint] if a.checkpoint else [])]
        for start in ("first (empty cache)", "second"):
            done = subprocess.run(child, capture_output=True, text=True, env=env, check=True)
            rows.append({"start": start, **json.loads(done.stdout.strip().splitlines()[-1])})
    print(f"scorer {rows[0]['runs_on']}; each start a fresh process")
    print("| start | load s | peak RSS MB | RSS once loaded MB |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['start']} | {r['load_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['rss_after_load_mb']:.0f} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows}, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
