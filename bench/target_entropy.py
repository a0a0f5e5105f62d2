"""The floor of the routing loss: how much of its value the targets themselves leave.

The routing loss is a cross-entropy between the network's scores over a group of models and the
softmax (``--target-temperature``) of the row's denoised targets. Its least possible value is the
targets' own entropy; a training loss that sits at that floor has nothing left to learn from, however
its routing compares with the targets' argmax. For each data set this prints, over random training
groups drawn as ``satroute train`` draws them (``--group-models`` of the row's models with a
target), the mean target entropy, the loss of uniform scores (ln g), and the mean weight the target
gives its own argmax, at each temperature asked for.

    python bench/target_entropy.py --data ../shared/data/mmlu_pro,../shared/data/routerdc \
        --neighbours 50 --category-prior 0.7 --temperature 0.05,0.02,0.01

Reads only the train split; embeddings come from the on-disk cache (computed once otherwise).
"""
from __future__ import annotations

import argparse
import json
import math

import numpy as np

from scorer.aptitude import suite_for
from scorer.data import load_dataset
from scorer.training import build_pools


def group_stats(soft: np.ndarray, g: int, temperatures: list[float], samples: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, len(soft), size=samples)
    out = {t: {"entropy": [], "top": [], "uniform": []} for t in temperatures}
    for r in rows:
        known = np.flatnonzero(~np.isnan(soft[r]))
        if len(known) < 2:
            continue
        group = rng.choice(known, size=min(g, len(known)), replace=False)
        x = soft[r, group].astype(np.float64)
        for t in temperatures:
            p = np.exp((x - x.max()) / t)
            p /= p.sum()
            out[t]["entropy"].append(float(-(p * np.log(np.maximum(p, 1e-12))).sum()))
            out[t]["top"].append(float(p.max()))
            out[t]["uniform"].append(math.log(len(group)))
    return {str(t): {k: round(float(np.mean(v)), 4) for k, v in s.items()} for t, s in out.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/mmlu_pro,../shared/data/routerdc")
    p.add_argument("--neighbours", type=int, default=50)
    p.add_argument("--category-prior", type=float, default=0.7)
    p.add_argument("--group-models", type=int, default=7)
    p.add_argument("--temperature", default="0.05")
    p.add_argument("--val-size", type=int, default=200)
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exclude-models", type=lambda s: [m for m in s.split(",") if m],
                   default=["gemma-7b", "Yi-34B"], help="as satroute train: models its pools leave out")
    a = p.parse_args(argv)
    temps = [float(t) for t in a.temperature.split(",")]
    for folder in a.data.split(","):
        pool, _, _ = build_pools(load_dataset(folder), suite_for(folder, "auto"), a.exclude_models, a.val_size, a.seed,
                                 neighbours=a.neighbours, category_prior=a.category_prior)
        stats = group_stats(pool.soft, a.group_models, temps, a.samples, a.seed)
        print(json.dumps({"data": folder, "rows": len(pool.soft), "neighbours": a.neighbours,
                          "category_prior": a.category_prior, "group_models": a.group_models,
                          "by_temperature": stats}))


if __name__ == "__main__":
    main()
