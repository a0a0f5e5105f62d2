"""How much routing signal do the denoised training targets of ``satroute train --neighbours K`` hold?

With ``--neighbours K`` the routing loss's target for an instruction is each model's accuracy on its
K nearest train instructions (sentence-embedding cosine, itself left out). A scorer that reproduced
those targets perfectly would route each train instruction to the argmax of its target. This script
measures that routing accuracy on the training pool itself (the pool ``satroute train`` builds:
suite questions and the validation slice held out), restricted to one zoo, for several K, next to
the best single model and the oracle on the same rows. It is the ceiling of what distilling the
targets can give on the training distribution; ``test`` is never read. ``--category-prior``
blends the targets with each model's accuracy on the rest of the row's category, as
``satroute train --category-prior`` does (``--category-shrink`` pulling it toward the data set's,
as there); each record also gives the ceiling per benchmark. ``--mlp-folds F`` adds the same
records for another teacher, the MLP baseline's out-of-fold predictions (F folds over the pool, each
fold predicted by an MLP trained on the others; ``"k": "mlp_oof"``): is a stronger learner of the
train outcomes a better source of targets than the neighbours?

    python bench/neighbour_targets.py --data ../shared/data/mmlu_pro --zoo small --k 10,30,100
    python bench/neighbour_targets.py --data ../shared/data/routerdc --suite routerdc --zoo all
    python bench/neighbour_targets.py --data ../shared/data/routerdc --suite routerdc --zoo all \
        --k 50 --category-prior 0,0.3,0.5,0.7,1
    python bench/neighbour_targets.py --data ../shared/data/routerdc --suite routerdc --zoo all \
        --k 50 --category-prior 0.4,0.7 --category-shrink 0,10,30,100
    python bench/neighbour_targets.py --data ../shared/data/routerdc --suite routerdc --zoo all \
        --k 50 --category-prior 0,0.5,0.7,1 --mlp-folds 5
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_headroom import ZOOS  # noqa: E402

from scorer.baselines import train_mlp  # noqa: E402
from scorer.data import data_root, load_dataset  # noqa: E402
from scorer.embeddings import Embedder, dataset_embeddings  # noqa: E402
from scorer.training import blend_targets, build_pools, category_accuracies, neighbour_targets  # noqa: E402


def mlp_out_of_fold(vectors: np.ndarray, correct: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """Each row's per-model probabilities from the MLP baseline trained on the other folds."""
    fold = np.random.default_rng(seed).permutation(len(vectors)) % folds
    out = np.zeros(correct.shape, dtype=np.float32)
    for f in range(folds):
        fn, _ = train_mlp(vectors[fold != f], correct[fold != f], seed=seed + f)
        out[fold == f] = fn(vectors[fold == f])
    return out


def ceiling(data_dir, suite: str, zoo: list[str] | None, ks: list[int], val_size: int = 60,
            priors: tuple[float, ...] = (0.0,), shrinks: tuple[float, ...] = (0.0,), mlp_folds: int = 0) -> list[dict]:
    data = load_dataset(data_dir)
    pool, _, _ = build_pools(data, suite, [], val_size, 0)
    train = data.split("train")
    rows = train.subset(train.rows(pool.ids))  # the pool's prompts, in the pool's order
    vectors = dataset_embeddings(rows, Embedder())
    cols = [pool.models.index(m) for m in (zoo or pool.models)]
    correct = pool.correct[:, cols]
    keep = ~np.isnan(correct).any(axis=1)  # the evaluation harness's rule: all zoo outcomes known
    c = correct[keep]
    benchmark = np.array([p.dataset for p in rows.prompts])[keep]
    # the category accuracies depend on the shrinkage only: once each, not once per K and weight
    prior = {m: category_accuracies(rows.prompts, pool.correct, m) for m in shrinks} if any(priors) else {}
    out = []
    teachers = [(k, lambda k=k: neighbour_targets(vectors, pool.correct, k)) for k in ks]
    if mlp_folds:
        teachers.append(("mlp_oof", lambda: mlp_out_of_fold(vectors, pool.correct, mlp_folds)))
    for k, make in teachers:
        knn = make()
        for w, m in [(w, m) for w in priors for m in (shrinks if w else (0.0,))]:
            soft = (blend_targets(knn, prior[m], w) if w else knn)[:, cols][keep]
            pick = np.nan_to_num(soft, nan=-1.0).argmax(axis=1)
            right = c[np.arange(len(c)), pick]
            out.append({"k": k, "category_prior": w, "category_shrink": m, "n": int(keep.sum()),
                        "targets_argmax": round(float(right.mean()), 4),
                        "best_single": round(float(c.mean(axis=0).max()), 4),
                        "oracle": round(float(c.max(axis=1).mean()), 4),
                        "by_dataset": {b: round(float(right[benchmark == b].mean()), 4) for b in np.unique(benchmark)},
                        "share_of_picks": {zoo_m: round(float(np.mean(pick == i)), 3)
                                           for i, zoo_m in enumerate(zoo or pool.models)}})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(data_root() / "mmlu_pro"))
    ap.add_argument("--suite", default="mmlu_pro")
    ap.add_argument("--zoo", default="small", help="small, mixed (MMLU-Pro) or all (every model of --data)")
    ap.add_argument("--k", default="10,30,50,100")
    ap.add_argument("--category-prior", default="0", help="comma-separated blend weights (0 = none)")
    ap.add_argument("--mlp-folds", type=int, default=0,
                    help="also the MLP baseline's out-of-fold predictions as targets, over this many folds")
    ap.add_argument("--category-shrink", default="0",
                    help="comma-separated pseudo-counts toward the data set's accuracies (0 = none)")
    a = ap.parse_args()
    zoo = None if a.zoo == "all" else ZOOS[a.zoo]
    priors = tuple(float(w) for w in a.category_prior.split(","))
    shrinks = tuple(float(m) for m in a.category_shrink.split(","))
    for rec in ceiling(a.data, a.suite, zoo, [int(k) for k in a.k.split(",")], priors=priors, shrinks=shrinks,
                       mlp_folds=a.mlp_folds):
        print(json.dumps({"data": Path(a.data).name, "zoo": a.zoo, **rec}))


if __name__ == "__main__":
    main()
