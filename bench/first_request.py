"""What the first routed request pays after the scorer loads, with and without the proxy's warm-up.

Usage::

    python bench/first_request.py [--candidates 5] [--runs 5] [--threads 2] [--dtype auto]
                                  [--checkpoint PATH] [--json OUT.json]

Each run is a fresh process (nothing cached): it loads the scorer, warms it up on the candidates'
profiles as ``satroute serve`` does (``ModelSATScorer.warm_up``) or not, then times the first
``score()`` call on a new 256-token instruction and the second one on another. The built-in
MMLU-Pro profiles are the candidates. Prints the medians per mode as a markdown table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def one_run(a: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    from scorer.aptitude import builtin_profiles
    from scorer.inference import ModelSATScorer
    from scorer_latency import instruction

    scorer = ModelSATScorer.load(a.checkpoint, dtype=a.dtype)
    profiles = builtin_profiles("mmlu_pro")
    candidates = {m: profiles[m] for m in sorted(profiles)[: a.candidates]}
    warm_ms = None
    if a.warm:
        started = time.perf_counter()
        scorer.warm_up(candidates)
        warm_ms = (time.perf_counter() - started) * 1000
    out = {"warm_up_ms": warm_ms, "runs_on": scorer.runs_on}
    for key, salt in (("first_ms", 1), ("second_ms", 2)):
        text = instruction(scorer.model.tokenizer, 256, salt)
        started = time.perf_counter()
        scorer.score(text, candidates)
        out[key] = (time.perf_counter() - started) * 1000
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--candidates", type=int, default=5)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a child: one run, JSON out
    p.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(one_run(a)))
        return 0
    common = ["--candidates", str(a.candidates), "--threads", str(a.threads), "--dtype", a.dtype]
    if a.checkpoint:
        common += ["--checkpoint", a.checkpoint]
    report = {"candidates": a.candidates, "threads": a.threads, "runs": a.runs, "modes": {}}
    for mode in ("cold", "warmed up"):
        runs = []
        for _ in range(a.runs):
            child = [sys.executable, __file__, "--one", *common, *(["--warm"] if mode != "cold" else [])]
            done = subprocess.run(child, capture_output=True, text=True, check=True)
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        report["runs_on"] = runs[0]["runs_on"]
        report["modes"][mode] = {k: statistics.median(r[k] for r in runs) if runs[0][k] is not None else None
                                 for k in ("warm_up_ms", "first_ms", "second_ms")}
    print(f"{report['runs_on']}, {a.threads} threads, {a.candidates} candidates, median of {a.runs} fresh processes")
    print("| mode | warm-up at load ms | first request ms | second request ms |")
    print("|---|---|---|---|")
    for mode, m in report["modes"].items():
        warm = "-" if m["warm_up_ms"] is None else f"{m['warm_up_ms']:.0f}"
        print(f"| {mode} | {warm} | {m['first_ms']:.0f} | {m['second_ms']:.0f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
