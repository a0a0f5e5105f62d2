"""Resident memory of the served scorer under traffic whose instructions vary in length.

`bench/scorer_latency.py` measures one fixed 256-token instruction; real requests come in every
length, and with them every input shape the network meets. A CPU's kernel libraries keep what they
built for each shape (several MB each in bfloat16), so what matters for the memory budget is the
RSS after many distinct lengths, for each number of candidates a request may have.

For each candidate count, scores one instruction of every word count 1..N (the words drawn at
random, seeded), then prints RSS and peak RSS; a second pass over the same lengths shows whether
anything is still growing.

    python bench/scorer_memory.py --words 300 --candidates 5,2 [--threads 1] [--dtype auto] [--json F]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scorer_latency import rss_peak_mb  # noqa: E402 (bench/ is not a package)

WORDS = ("the of a integral derive compute history chemistry law model proof theorem river city "
         "why how is market court cell war energy").split()


def rss_mb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 // 2**20


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--words", type=int, default=300, help="instruction word counts 1..N")
    parser.add_argument("--candidates", default="5,2", help="candidate counts, in turn")
    parser.add_argument("--passes", type=int, default=2, help="passes over the lengths per count")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import torch

    from scorer import load_scorer
    from scorer.aptitude import builtin_profiles

    torch.set_num_threads(args.threads)
    scorer = load_scorer(args.checkpoint, dtype=None if args.dtype == "auto" else args.dtype)
    profiles = builtin_profiles("mmlu_pro")
    names = sorted(profiles)
    rnd = random.Random(0)
    counts = [int(c) for c in args.candidates.split(",")]
    scorer.score("warm up", {n: profiles[n] for n in names[:max(counts)]})
    rows = [{"step": "loaded and warmed up", "rss_mb": rss_mb(), "peak_mb": round(rss_peak_mb())}]
    print(f"{scorer.runs_on}; {args.threads} thread(s)")
    print(f"{'after':<46} {'RSS MB':>7} {'peak MB':>8} {'s':>5}")
    print(f"{rows[0]['step']:<46} {rows[0]['rss_mb']:>7} {rows[0]['peak_mb']:>8}")
    started = time.perf_counter()
    for count in counts:
        candidates = {n: profiles[n] for n in names[:count]}
        for p in range(1, args.passes + 1):
            for words in range(1, args.words + 1):
                scorer.score(" ".join(rnd.choice(WORDS) for _ in range(words)), candidates)
            step = f"{count} candidates, 1..{args.words} words, pass {p}"
            rows.append({"step": step, "candidates": count, "pass": p, "rss_mb": rss_mb(),
                         "peak_mb": round(rss_peak_mb()), "seconds": round(time.perf_counter() - started, 1)})
            print(f"{step:<46} {rows[-1]['rss_mb']:>7} {rows[-1]['peak_mb']:>8} {rows[-1]['seconds']:>5.0f}",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"runs_on": scorer.runs_on, "threads": args.threads,
                                               "words": args.words, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
