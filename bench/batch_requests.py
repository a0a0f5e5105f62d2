"""Would scoring concurrent requests together raise the scorer's throughput? Measured, not assumed.

Usage::

    python bench/batch_requests.py [--checkpoint PATH] [--batches 1,2,4,8] [--candidates 5]
                                   [--instruction-tokens 256] [--repeats 5] [--threads 2]
                                   [--device cpu] [--dtype auto] [--json OUT.json] [--profile]
                                   [--bundle DIR]

The proxy scores one request at a time (``ModelSATScorer.score``: psi's instruction vector, the
instruction prefix through phi, then every candidate suffix in one batch after the prefix's cache).
This bench stacks B requests into one pass of each stage instead: psi encodes the B instructions
together, phi runs the B prefixes as one batch, and the B x n x r candidate suffixes run as one batch,
each row after its own request's key/value cache. The instructions have the same token count, so no
padding is needed and the stacked pass computes exactly what B separate calls compute: the bench
checks that the scores agree (``max_diff``) before it reports a time.

Prints, per B, the milliseconds per request of B sequential ``score`` calls and of the stacked pass
(each stage and in all), and the stacked pass's speed-up. A speed-up near 1 means the device is
already busy with one request and micro-batching would only add queueing delay. ``--profile`` also
prints where five one-at-a-time ``score`` calls spend their time, by torch operator. ``--bundle``
builds the network over random backbone weights (``bench/backbone_bundle.py``): the same times, on a
machine without the backbone packages.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from scorer_latency import instruction  # noqa: E402  (bench helper beside this file)


def stacked_scores(scorer, texts: list[str], candidates: dict) -> tuple[list[dict[str, float]], dict[str, float]]:
    """Score ``texts`` (equal token counts) against ``candidates`` in one pass per stage; returns the
    scores per text (as ``score`` returns them) and each stage's milliseconds."""
    import torch

    from scorer.aptitude import aptitude

    model, cfg = scorer.model, scorer.model.config
    on_cuda = model.embed.weight.device.type == "cuda"

    def done() -> float:
        """Now, once the device has finished what was queued (CUDA runs asynchronously)."""
        if on_cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    if cfg.layout != "instruction_first":
        raise SystemExit("the stacked pass shares each request's prefix cache: instruction_first layout only")
    ms: dict[str, float] = {}
    with torch.inference_mode():
        t = time.perf_counter()
        if cfg.instruction_vector_tokens > 0:
            for text, vec in zip(texts, model._encode(texts, model._psi_window(cfg.instruction_vector_tokens))):
                model._instruction_vectors[text] = vec  # what instruction_embeds reads next
        ms["psi"] = (done() - t) * 1000

        t = time.perf_counter()
        prefixes = [model.instruction_embeds(text) for text in texts]
        if len({p.shape[0] for p in prefixes}) != 1:
            raise SystemExit("instructions of different token counts: the stacked pass needs equal prefixes")
        kvs = model.prefix_cache(torch.stack(prefixes))  # padded as one request's is
        ms["prefix"] = (done() - t) * 1000

        t = time.perf_counter()
        names = list(candidates)
        suffixes = [scorer._candidate_suffixes(candidates[n]) for n in names]
        flat = [s for group in suffixes for s in group]
        per_request = len(flat)
        past = [(k.repeat_interleave(per_request, dim=0), v.repeat_interleave(per_request, dim=0)) for k, v in kvs]
        raw = model.score_shared(past, flat * len(texts)).float()
        ms["suffixes"] = (done() - t) * 1000
    means = raw.view(len(texts), len(names), -1).mean(dim=2)
    weight = cfg.aptitude_weight
    out = [{n: float(s) + (weight * aptitude(candidates[n]) if weight else 0.0) for n, s in zip(names, row)}
           for row in means.tolist()]
    ms["total"] = sum(ms.values())
    return out, ms


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--batches", default="1,2,4,8")
    p.add_argument("--candidates", type=int, default=5)
    p.add_argument("--instruction-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--json", default=None)
    p.add_argument("--profile", action="store_true", help="print the top operators of five score calls")
    p.add_argument("--bundle", default=None,
                   help="random backbone weights from this bench/backbone_bundle.py folder (timing only)")
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    from scorer.aptitude import builtin_profiles
    from scorer.inference import ModelSATScorer

    if a.bundle:
        from backbone_bundle import build_scorer

        scorer = build_scorer(a.checkpoint, a.bundle, device=a.device, dtype=a.dtype)
    else:
        scorer = ModelSATScorer.load(a.checkpoint, device=a.device, dtype=a.dtype)
    profiles = builtin_profiles("mmlu_pro")
    names = sorted(profiles)
    candidates = {f"{names[i % len(names)]}#{i}": profiles[names[i % len(names)]] for i in range(a.candidates)}
    tok = scorer.model.tokenizer
    scorer.warm_up(candidates)
    salt = iter(range(10**9))

    def fresh(n: int) -> list[str]:
        return [instruction(tok, a.instruction_tokens, next(salt)) for _ in range(n)]

    stacked_scores(scorer, fresh(2), candidates)  # first stacked pass: allocator warm-up
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for text in fresh(5):
                scorer.score(text, candidates)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
    rows = []
    for b in [int(x) for x in a.batches.split(",")]:
        seq, stacked, stages, diff = [], [], [], 0.0
        for _ in range(a.repeats):
            texts = fresh(b)
            t = time.perf_counter()
            one_by_one = [scorer.score(text, candidates) for text in texts]
            seq.append((time.perf_counter() - t) * 1000 / b)
            texts = fresh(b)  # fresh texts again: no instruction vector comes from a cache
            together, ms = stacked_scores(scorer, texts, candidates)
            stacked.append(ms["total"] / b)
            stages.append({k: v / b for k, v in ms.items()})
            check = [scorer.score(text, candidates) for text in texts]
            diff = max([diff] + [abs(x[n] - y[n]) for x, y in zip(together, check) for n in candidates])
            del one_by_one
        row = {"batch": b, "sequential_ms_per_request": statistics.median(seq),
               "stacked_ms_per_request": statistics.median(stacked),
               **{f"stacked_{k}_ms_per_request": statistics.median(s[k] for s in stages)
                  for k in ("psi", "prefix", "suffixes")},
               "max_diff": diff}
        row["speedup"] = row["sequential_ms_per_request"] / row["stacked_ms_per_request"]
        rows.append(row)
    device, dtype = scorer.runs_on.split(", ")
    report = {"device": device, "dtype": dtype, "threads": a.threads, "candidates": a.candidates,
              "backbone_weights": "random (--bundle)" if a.bundle else "trained",
              "instruction_tokens": a.instruction_tokens, "n_orders": scorer.model.config.n_orders,
              "repeats": a.repeats, "rows": rows}
    print(f"device {device} ({dtype}), {a.threads} threads, {a.candidates} candidates x "
          f"{scorer.model.config.n_orders} orders, instruction {a.instruction_tokens} tokens; medians of {a.repeats}")
    print("| B requests | sequential ms/request | stacked ms/request | psi | prefix | suffixes | speed-up "
          "| max score diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['sequential_ms_per_request']:.1f} | {r['stacked_ms_per_request']:.1f} | "
              f"{r['stacked_psi_ms_per_request']:.1f} | {r['stacked_prefix_ms_per_request']:.1f} | "
              f"{r['stacked_suffixes_ms_per_request']:.1f} | {r['speedup']:.2f}x | {r['max_diff']:.3g} |")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
