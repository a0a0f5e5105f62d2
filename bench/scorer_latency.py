"""Model-SAT scorer latency, load time and resident memory, against the number of candidates.

Usage::

    python bench/scorer_latency.py [--checkpoint PATH] [--candidates 2,5,10,20] [--repeats 7]
                                   [--instruction-tokens 256] [--threads 2] [--device cpu]
                                   [--dtype auto|float32|bfloat16]
                                   [--instruction-budget N] [--json OUT.json] [--plot OUT.png]
                                   [--bundle DIR]

Each call scores one fresh instruction of ``--instruction-tokens`` tokens (before the checkpoint's
own truncation) against n candidates with the built-in MMLU-Pro profiles (their capability vectors
are cached after the first call, as in the proxy). Prints a markdown table: p50 / p90 / min latency
per n, the load time, and the peak resident memory of the process (and the GPU's peak allocation on
CUDA). ``--bundle DIR`` builds the checkpoint's network over random backbone weights from a
``bench/backbone_bundle.py`` folder: the same shapes and token counts, so the same times, on a machine
without the backbone packages (``bench/cuda_check.sh``); its load time and memory are not the served
ones.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PARAGRAPH = ("A farmer plants three fields of wheat and measures the yield of each one after a dry summer. "
             "The first field received irrigation twice a week, the second once a week, and the third none. "
             "Which conclusion about the effect of irrigation on yield is best supported, and why would a "
             "controlled experiment need more than one field per treatment to be convincing? ")


def instruction(tokenizer, n_tokens: int, salt: int) -> str:
    """A distinct instruction of at least ``n_tokens`` tokens (the salt defeats any caching)."""
    text = f"Question {salt}: "
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < n_tokens:
        text += PARAGRAPH
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    return tokenizer.decode(ids)


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile of ``values`` (0 < q <= 1)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--candidates", default="2,5,10,20")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--instruction-tokens", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto", help="auto (as served), float32 or bfloat16")
    p.add_argument("--instruction-budget", type=int, default=None,
                   help="override the checkpoint's instruction token budget (cost study only)")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--bundle", default=None,
                   help="random backbone weights from this bench/backbone_bundle.py folder (timing only)")
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    from scorer.aptitude import builtin_profiles
    from scorer.inference import ModelSATScorer

    t0 = time.perf_counter()
    if a.bundle:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from backbone_bundle import build_scorer

        scorer = build_scorer(a.checkpoint, a.bundle, device=a.device, dtype=a.dtype)
    else:
        scorer = ModelSATScorer.load(a.checkpoint, device=a.device, dtype=a.dtype)
    load_s = time.perf_counter() - t0
    if a.instruction_budget:
        scorer.model.config.max_instruction_tokens = a.instruction_budget
    profiles = builtin_profiles("mmlu_pro")
    names = sorted(profiles)
    tok = scorer.model.tokenizer
    rows = []
    salt = 0
    for n in [int(x) for x in a.candidates.split(",")]:
        cands = {f"{names[i % len(names)]}#{i}": profiles[names[i % len(names)]] for i in range(n)}
        scorer.score(instruction(tok, a.instruction_tokens, salt), cands)  # warm: capability caches
        times = []
        for _ in range(a.repeats):
            salt += 1
            text = instruction(tok, a.instruction_tokens, salt)
            t = time.perf_counter()
            scorer.score(text, cands)
            times.append((time.perf_counter() - t) * 1000)
        rows.append({"candidates": n, "p50_ms": statistics.median(times),
                     "p90_ms": percentile(times, 0.9), "min_ms": min(times)})
    cfg = scorer.model.config
    device, dtype = scorer.runs_on.split(", ")
    gpu_peak_mb = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    report = {"device": device, "dtype": dtype, "threads": a.threads, "load_s": load_s, "rss_peak_mb": rss_peak_mb(),
              "gpu_peak_allocated_mb": gpu_peak_mb, "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
              "backbone_weights": "random (--bundle)" if a.bundle else "trained",
              "instruction_tokens": a.instruction_tokens, "instruction_budget": cfg.max_instruction_tokens,
              "n_layers": cfg.n_layers, "n_orders": cfg.n_orders, "variant": cfg.variant, "rows": rows}
    print(f"device {device} ({dtype}), {a.threads} threads, {cfg.n_layers} layers of phi, instruction "
          f"{a.instruction_tokens} tokens (truncated to {cfg.max_instruction_tokens}), {cfg.n_orders} orders")
    print(f"load {load_s:.2f} s, peak RSS {report['rss_peak_mb']:.0f} MB"
          + (f", GPU {report['gpu']} peak allocated {gpu_peak_mb:.0f} MB" if gpu_peak_mb is not None else "")
          + (f"; backbone weights random (--bundle {a.bundle})" if a.bundle else ""))
    print("| candidates | p50 ms | p90 ms | min ms |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['candidates']} | {r['p50_ms']:.0f} | {r['p90_ms']:.0f} | {r['min_ms']:.0f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    if a.plot:
        try:
            import matplotlib
        except ImportError:
            print(f"matplotlib is not installed: no plot at {a.plot}")
            return 0

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.4))
        xs = [r["candidates"] for r in rows]
        ax.plot(xs, [r["p50_ms"] for r in rows], "o-", label="p50")
        ax.plot(xs, [r["p90_ms"] for r in rows], "s--", label="p90")
        if device == "cuda":
            ax.axhline(10, color="grey", lw=0.8, ls=":", label="target p50, 8 candidates")
        else:
            ax.axhline(250, color="grey", lw=0.8, ls=":", label="target p50, 5 candidates")
        ax.set_xlabel("candidates")
        ax.set_ylabel("ms per score() call")
        ax.set_title(f"Model-SAT scorer latency ({device}, {a.threads} threads)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.plot, dpi=120)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
