"""Raw Model-SAT scores per prompt and candidate, saved once, so routing rules over them can be
studied without another forward pass.

``dump`` scores every prompt of a split (or a seeded sample, as ``satroute evaluate --limit`` draws
it) for every model listed, and writes an ``.npz``: ``ids``, ``datasets``, ``models``, ``scores``
[prompts, models], ``correct`` [prompts, models], ``aptitude`` [models] (the mean of each profile),
and ``val`` (train split only: the prompt is in the validation slice that ``satroute train`` held
out, so the checkpoint never trained on it: ``--val-size 200 --split-seed 0`` unless told the run's
own). ``--only-val`` scores that slice alone: with a slice set aside large enough (``satroute train
--val-size 2000``), it is where two candidates can be compared without looking at the test split.

    python bench/router_scores.py dump --data ../shared/data/routerdc --split train --limit 2000 \
        --out runs/scores/default_routerdc_train.npz [--checkpoint C] [--models M1,M2] [--threads 1]

The scores are the network's own: the checkpoint's ``aptitude_weight`` is left out and recorded
(``checkpoint_weight``), and ``report``, ``paired`` and ``agree`` put it back unless ``--weight``
says otherwise. ``--dtype`` is the scorer's (``auto``: as ``satroute serve`` would run it here; the
file records the one used). ``--all-rows`` (which takes no ``--limit``) keeps the prompts on which some listed model has no outcome (its
``correct`` is NaN there), so one file of twelve MMLU-Pro models serves the small zoo's 2,420 test
prompts as well as the mixed zoo's 2,083: each zoo is routed on the rows complete for its own
models, the rule of ``satroute evaluate``. ``--shard K/N`` scores every N-th prompt from the K-th,
so N processes can share a split; ``merge`` joins their files. ``fit`` prints the routing accuracy
of ``score + w * aptitude`` (the checkpoint's ``aptitude_weight``) over a grid of w, for each file
and each zoo of the data README whose models the file holds (or the zoo of all its models), and the
weight that does best on the mean over the train files (``--fit-on``):

    python bench/router_scores.py fit runs/scores/*_train.npz runs/scores/*_test.npz

``report`` routes one file at one weight and prints, per zoo, one JSON object shaped like ``satroute
evaluate --json``'s (``n``, ``router``, ``best_single``, ``random``, ``oracle``, ``singles``, the
share of each model among the picks, and the same per benchmark):

    python bench/router_scores.py report runs/scores/cprior_routerdc_test.npz --weight 6.35

``paired`` trains a baseline of ``satroute evaluate`` on the data set's train split, routes the
file's prompts with it, and prints both accuracies on the same prompts with a paired bootstrap 95%
interval of their difference (2,000 resamples, seed 0) and the prompts only one of the two gets
right:

    python bench/router_scores.py paired runs/scores/cprior_routerdc_test.npz \
        --data ../shared/data/routerdc --baseline mlp --weight 6.35

``agree`` compares two dumps of the same prompts and models (the same network in two dtypes, say):
per zoo, both accuracies at one weight, the share of prompts whose pick is the same, and the
paired interval of the difference:

    python bench/router_scores.py agree runs/scores/fp32.npz runs/scores/bf16.npz --weight 6.35

(``--second-weight`` gives the second file its own weight, to compare two networks each as served.)

``subject`` asks whether the profile says more per request than its mean: it routes by ``score +
w * aptitude + v * subject``, where ``subject`` is the candidate's accuracy on the suite's task of
the prompt's own MMLU subject (read from the data set's labels, which a served router does not
have: an upper bound on any subject matcher), or the profile's mean where the suite has no such
task. (w, v) is chosen on the mean over the train files; rows whose question is one of the suite's
are left out, since the profile holds their own outcome. ``--neighbours K`` reads the aptitude test
question by question instead: ``subject`` becomes the candidate's mean outcome on the K questions of
the suite nearest to the prompt (sentence embeddings, as the baselines'):

    python bench/router_scores.py subject runs/scores/*_train.npz runs/scores/*_test.npz \
        --data ../shared/data/mmlu_pro [--neighbours 30]

Since a candidate's score does not depend on the other candidates, any zoo inside the listed models
can then be routed from the file. Writes nothing into the repository unless told to.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from scorer.data import format_instruction, load_dataset
from scorer.evaluation import _accuracy, _profiles, _table, eligible_rows


def _val_ids(data, data_dir: Path, val_size: int = 200, split_seed: int = 0) -> set[str]:
    """The ids of the validation slice ``satroute train --val-size N --split-seed S`` holds out."""
    from scorer.aptitude import suite_for
    from scorer.training import build_pools

    _, val, _ = build_pools(data, suite_for(data_dir, "auto"), [], val_size, split_seed)
    return set(val.ids or [])


def without_aptitude_weight(scorer) -> float:
    """Set the scorer's aptitude weight to 0 and return what it was: a dump holds the network's own
    scores, so that files of checkpoints with and without a weight compare, and any weight can be
    put back by ``fit``, ``report``, ``paired`` or ``agree``."""
    config = scorer.model.config
    weight, config.aptitude_weight = float(config.aptitude_weight), 0.0
    return weight


def dump(args: argparse.Namespace) -> int:
    import torch

    from scorer import load_scorer
    from scorer.inference import aptitude

    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset(args.data)
    models = [m.strip() for m in args.models.split(",")] if args.models else list(data.models)
    profiles = _profiles(args, data, models)
    if args.all_rows:
        if args.limit is not None:  # a sample of all rows is not the sample evaluate draws for any zoo
            print("router_scores dump: --all-rows scores every prompt; --limit would draw a sample that "
                  "no zoo's `satroute evaluate --limit` draws (it samples the rows complete for its "
                  "models): give one or the other", file=sys.stderr)
            return 2
        part = data.split(args.split).with_models(models)
    else:
        part, _ = eligible_rows(data, models, args.split, args.limit, args.seed)
    held_out = _val_ids(data, args.data, args.val_size, args.split_seed) if args.split == "train" else set()
    if args.only_val:
        if args.split != "train" or args.limit is not None:
            raise SystemExit("--only-val scores the train split's whole validation slice: no --limit, --split train")
        part = part.subset(np.array([p.id in held_out for p in part.prompts], dtype=bool))
    shard, shards = (int(x) for x in args.shard.split("/"))
    part = part.subset(np.arange(shard, len(part.prompts), shards))
    scorer = load_scorer(args.checkpoint, dtype=args.dtype)
    weight = without_aptitude_weight(scorer)
    candidates = {m: profiles[m] for m in models}
    scores = np.zeros((len(part.prompts), len(models)), dtype=np.float32)
    start = time.time()
    for i, prompt in enumerate(part.prompts):
        got = scorer.score(format_instruction(prompt), candidates)
        scores[i] = [got[m] for m in models]
        if (i + 1) % 200 == 0:
            print(f"{i + 1}/{len(part.prompts)} {time.time() - start:.0f}s", file=sys.stderr, flush=True)
    ids = np.array([p.id for p in part.prompts])
    val = np.isin(ids, list(held_out)) if held_out else np.zeros(len(ids), bool)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(args.out, ids=ids, datasets=np.array([p.dataset for p in part.prompts]), models=np.array(models),
             scores=scores, correct=part.correct_matrix().astype(np.float32), val=val,
             aptitude=np.array([aptitude(profiles[m]) for m in models]),
             dtype=np.array(scorer.runs_on.split(", ")[1]), checkpoint_weight=np.array(weight))
    print(f"{len(ids)} prompts x {len(models)} models -> {args.out} ({time.time() - start:.0f}s)")
    return 0


ZOOS = {
    "small": "Meta-Llama-3_1-8B-Instruct,Phi-3-mini-4k-instruct,gemma-7b,Qwen1.5-7B-Chat,Mistral-7B-Instruct-v0.2",
    "mixed": "Meta-Llama-3_1-8B-Instruct,Phi-3-mini-4k-instruct,Yi-34B,Qwen1.5-72B-Chat,Meta-Llama-3-70B,"
             "DeepSeek-Coder-V2,jamba-1.5-large,c4ai-command-r-v01",
    "unseen_gemma": "gemma-7b,Qwen1.5-7B-Chat,Mistral-7B-Instruct-v0.2",
    "unseen_yi": "Yi-34B,c4ai-command-r-v01,Meta-Llama-3-8B",
}


def _zoos_of(z, zoos: list[str]):
    """(name, the zoo's models, their columns, the rows complete for them) for each named zoo whose
    models the file holds; a file that holds none of them is one zoo of all its models ("all":
    RouterDC's seven)."""
    models = [str(m) for m in z["models"]]
    for name in [n for n in zoos if set(ZOOS[n].split(",")) <= set(models)] or ["all"]:
        names = models if name == "all" else ZOOS[name].split(",")
        cols = [models.index(m) for m in names]
        yield name, names, cols, ~np.isnan(z["correct"][:, cols]).any(axis=1)


def zoo_views(path: Path, zoos: list[str]):
    """(name, scores, correct, aptitude, val) for each zoo of ``_zoos_of``, on the rows on which
    every one of its models has an outcome."""
    z = np.load(path)
    for name, _, cols, rows in _zoos_of(z, zoos):
        yield name, z["scores"][rows][:, cols], z["correct"][rows][:, cols], z["aptitude"][cols], z["val"][rows]


def picks_at(scores: np.ndarray, aptitude: np.ndarray, weight: float) -> np.ndarray:
    """Index of each prompt's pick: the argmax of ``score + weight * aptitude``."""
    return np.argmax(scores.astype(np.float64) + weight * aptitude[None, :], axis=1)


def routed(scores: np.ndarray, correct: np.ndarray, aptitude: np.ndarray, weight: float, rule: str) -> float:
    """Routing accuracy of argmax(score' + weight * aptitude); rule "z" standardises each prompt's scores first."""
    s = scores.astype(np.float64)
    if rule == "z":
        s = (s - s.mean(axis=1, keepdims=True)) / (s.std(axis=1, keepdims=True) + 1e-9)
    picks = picks_at(s, aptitude, weight)
    return float((correct[np.arange(len(picks)), picks] > 0).mean())


def zoo_report(scores: np.ndarray, correct: np.ndarray, aptitude: np.ndarray, datasets: np.ndarray,
               models: list[str], weight: float) -> dict:
    """``satroute evaluate``'s figures for one zoo, routed by ``score + weight * aptitude``."""
    right = (correct > 0).astype(np.float64)
    picks = picks_at(scores, aptitude, weight)

    def block(rows: np.ndarray) -> dict:
        share = np.bincount(picks[rows], minlength=len(models)) / max(1, rows.sum())
        return {**_table(right[rows], models), "router": _accuracy(right[rows], picks[rows]),
                "picks": {m: round(float(x), 4) for m, x in zip(models, share) if x > 0}}

    everything = np.ones(len(picks), dtype=bool)
    out = {"weight": weight, **block(everything)}
    if len(set(datasets)) > 1:
        out["by_dataset"] = {str(d): block(datasets == d) for d in sorted(set(datasets))}
    return out


def weight_for(z, asked: float | None) -> float:
    """The weight asked for, else the one the dumped checkpoint is served with (0 for older files)."""
    if asked is not None:
        return asked
    return float(z["checkpoint_weight"]) if "checkpoint_weight" in z.files else 0.0


def report(args: argparse.Namespace) -> int:
    for path in args.files:
        z = np.load(path)
        for name, names, cols, rows in _zoos_of(z, args.zoos.split(",")):
            got = zoo_report(z["scores"][rows][:, cols], z["correct"][rows][:, cols], z["aptitude"][cols],
                             z["datasets"][rows], names, weight_for(z, args.weight))
            print(json.dumps({"file": path.name, "zoo": name, **got}))
    return 0


def paired_difference(router: np.ndarray, baseline: np.ndarray, resamples: int = 2000, seed: int = 0) -> dict:
    """Mean of ``router - baseline`` (per-prompt 1/0 outcomes) and its paired bootstrap 95% interval."""
    rng = np.random.default_rng(seed)
    n = len(router)
    diff = router.astype(np.float64) - baseline
    boots = [diff[rng.integers(0, n, n)].mean() for _ in range(resamples)]
    return {"diff": round(float(diff.mean()), 4),
            "ci95": [round(float(np.percentile(boots, 2.5)), 4), round(float(np.percentile(boots, 97.5)), 4)],
            "router_only_right": int(((router > 0) & (baseline == 0)).sum()),
            "baseline_only_right": int(((router == 0) & (baseline > 0)).sum())}


def paired(args: argparse.Namespace) -> int:
    import torch

    from scorer.baselines import train_baseline

    torch.set_num_threads(args.threads)
    z = np.load(args.file)
    models = [str(m) for m in z["models"]]
    data = load_dataset(args.data)
    split = data.split(args.split)
    by_id = {p.id: p for p in split.prompts}
    texts = [format_instruction(by_id[str(i)]) for i in z["ids"]]
    baseline = train_baseline(args.baseline, data, models)
    got = baseline.score_many(texts, {m: {} for m in models})
    picks = [int(np.argmax([g[m] for m in models])) for g in got]
    right = (z["correct"] > 0).astype(np.float64)
    rows = np.arange(len(texts))
    weight = weight_for(z, args.weight)
    base, routed_right = right[rows, picks], right[rows, picks_at(z["scores"], z["aptitude"], weight)]
    print(json.dumps({"file": args.file.name, "n": len(texts), "weight": weight,
                      "router": round(float(routed_right.mean()), 4), args.baseline: round(float(base.mean()), 4),
                      **paired_difference(routed_right, base)}))
    return 0


def agree(args: argparse.Namespace) -> int:
    a, b = np.load(args.first), np.load(args.second)
    if list(a["ids"]) != list(b["ids"]) or list(a["models"]) != list(b["models"]):
        raise SystemExit("the two dumps must hold the same prompts and models, in the same order")
    weights = [weight_for(a, args.weight),
               weight_for(b, args.weight if args.second_weight is None else args.second_weight)]
    for name, _, cols, rows in _zoos_of(a, args.zoos.split(",")):
        right = (a["correct"][rows][:, cols] > 0).astype(np.float64)
        picks = [picks_at(z["scores"][rows][:, cols], z["aptitude"][cols], w) for z, w in zip((a, b), weights)]
        first, second = (right[np.arange(len(p)), p] for p in picks)
        print(json.dumps({"zoo": name, "n": int(rows.sum()), "weights": weights,
                          "dtypes": [str(z["dtype"]) if "dtype" in z.files else "float32" for z in (a, b)],
                          "first": round(float(first.mean()), 4), "second": round(float(second.mean()), 4),
                          "same_pick": round(float(np.mean(picks[0] == picks[1])), 4),
                          **{k.replace("router", "second").replace("baseline", "first"): v
                             for k, v in paired_difference(second, first).items()}}))
    return 0


def merge(args: argparse.Namespace) -> int:
    parts = [np.load(p) for p in args.files]
    joined = {k: np.concatenate([p[k] for p in parts]) for k in ("ids", "datasets", "scores", "correct", "val")}
    kept = {k: parts[0][k] for k in ("models", "aptitude", "dtype", "checkpoint_weight") if k in parts[0].files}
    np.savez(args.out, **kept, **joined)
    print(f"{len(joined['ids'])} prompts -> {args.out}")
    return 0


def fit(args: argparse.Namespace) -> int:
    weights = [0.0] + [float(w) for w in np.geomspace(0.25, 256, 31)] + [1e6]
    zoos = args.zoos.split(",")
    for rule in ("raw", "z"):
        table: dict[str, list[float]] = {}
        for path in args.files:
            for name, s, c, a, val in zoo_views(path, zoos):
                key = f"{path.stem}:{name}"
                table[key] = [routed(s, c, a, w, rule) for w in weights]
                if args.val_only and val.any():
                    table[key + ":val"] = [routed(s[val], c[val], a, w, rule) for w in weights]
        print(f"rule {rule}")
        print("weight  " + "  ".join(k for k in table))
        for j, w in enumerate(weights):
            print(f"{w:8.2f} " + "  ".join(f"{table[k][j]:.4f}".rjust(len(k)) for k in table))
        fitted = [k for k in table if args.fit_on in k.split(":")[0] and not k.endswith(":val")]
        if fitted:
            j = int(np.argmax(np.mean([table[k] for k in fitted], axis=0)))  # ties: the smallest weight
            print(f"selected on {', '.join(fitted)}: weight {weights[j]:.2f}; "
                  + ", ".join(f"{k} {table[k][j]:.4f} (at 0: {table[k][0]:.4f})" for k in table))
    return 0


def subject_prior(z, data, suite_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each row of a dump: each model's accuracy on the suite's task of the prompt's MMLU
    subject (the profile's mean where the suite has none) [rows, models], whether the suite had one,
    and whether the question is itself one of the suite's."""
    from scorer.aptitude import aptitude, builtin_profiles, load_suite, subject_of

    suite, profiles = load_suite(suite_name), builtin_profiles(suite_name)
    models = [str(m) for m in z["models"]]
    tasks, asked = set(suite.task_ids), set(suite.question_ids)
    prompt_of = {p.id: p for p in data.prompts}
    subjects = [subject_of(prompt_of[str(i)]) for i in z["ids"]]
    mean = np.array([aptitude(profiles[m]) for m in models])
    prior = np.array([[profiles[m][s] for m in models] if s in tasks else mean for s in subjects])
    return prior, np.array([s in tasks for s in subjects]), np.isin(z["ids"], list(asked))


def neighbour_prior(z, data, suite_name: str, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """As ``subject_prior``, but each model's mean outcome over the ``k`` questions of the suite
    nearest to the prompt (cosine of ``vectors``, one row per prompt of ``data``; the suite's
    questions that ``data`` holds): the aptitude test read question by question, not task by task."""
    from scorer.aptitude import load_suite

    held = set(data.ids)
    asked = [q for q in load_suite(suite_name).question_ids if q in held]
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    ids = [str(i) for i in z["ids"]]
    nearest = np.argsort(-(unit[data.rows(ids)] @ unit[data.rows(asked)].T), axis=1, kind="stable")[:, :k]
    cols = [data.column(str(m)) for m in z["models"]]
    outcomes = data.correct_matrix()[data.rows(asked)][:, cols]
    with np.errstate(invalid="ignore"):
        prior = np.nanmean(outcomes[nearest], axis=1)
    return np.nan_to_num(prior), np.ones(len(ids), dtype=bool), np.isin(ids, asked)


def subject(args: argparse.Namespace) -> int:
    from scorer.aptitude import suite_for

    data = load_dataset(args.data)
    suite_name = suite_for(args.data, args.suite)
    if args.neighbours:
        from scorer.embeddings import Embedder, dataset_embeddings

        vectors = dataset_embeddings(data, Embedder())
    grid = [0.0] + [float(w) for w in np.geomspace(0.5, 32, 13)]
    table, views = {}, {}
    for path in args.files:
        z = np.load(path)
        prior, has, in_suite = (neighbour_prior(z, data, suite_name, vectors, args.neighbours) if args.neighbours
                                else subject_prior(z, data, suite_name))
        for name, _, cols, rows in _zoos_of(z, args.zoos.split(",")):
            rows = rows & ~in_suite
            s, c, a, p = z["scores"][rows][:, cols], z["correct"][rows][:, cols], z["aptitude"][cols], prior[rows][:, cols]
            key = f"{path.stem}:{name}"
            views[key] = (s, c, a, p, weight_for(z, args.weight), float(has[rows].mean()))
            table[key] = np.array([[routed(s + v * p, c, a, w, "raw") for v in grid] for w in grid])
    fitted = [k for k in table if args.fit_on in k.split(":")[0]]
    if not fitted:
        raise SystemExit(f"no file name contains {args.fit_on!r} to choose the weights on")
    i, j = np.unravel_index(np.argmax(np.mean([table[k] for k in fitted], axis=0)), (len(grid), len(grid)))
    for key, (s, c, a, p, served, share) in views.items():
        right = (c > 0).astype(np.float64)
        kind = {"prior": f"{args.neighbours} suite neighbours"} if args.neighbours else {
            "prior": "subject task", "with_subject_task": round(share, 4)}
        print(json.dumps({"zoo": key, "n": len(s), **kind,
                          "best_single": round(float(right.mean(0).max()), 4),
                          "served": {"w": served, "v": 0.0, "router": round(routed(s, c, a, served, "raw"), 4)},
                          "chosen": {"w": round(grid[i], 2), "v": round(grid[j], 2),
                                     "router": round(float(table[key][i, j]), 4)},
                          "mean_only_best_on_this_file": round(float(table[key][:, 0].max()), 4),
                          "best_on_this_file": round(float(table[key].max()), 4)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dump", help="score a split and save the matrix")
    d.add_argument("--data", required=True, type=Path)
    d.add_argument("--models", default=None)
    d.add_argument("--checkpoint", default=None)
    d.add_argument("--suite", default=None, help="aptitude suite of the profiles (default: as satroute evaluate)")
    d.add_argument("--split", default="test")
    d.add_argument("--limit", type=int, default=None)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=int, default=1)
    d.add_argument("--dtype", default="auto", help="auto (as served), float32 or bfloat16")
    d.add_argument("--all-rows", action="store_true",
                   help="also the prompts on which some listed model has no outcome (each zoo drops them itself)")
    d.add_argument("--val-size", type=int, default=200, help="the validation slice of the checkpoint's training run")
    d.add_argument("--split-seed", type=int, default=0, help="and its split seed")
    d.add_argument("--only-val", action="store_true", help="score only that slice (train split)")
    d.add_argument("--shard", default="0/1", help="K/N: only every N-th prompt from the K-th (run N side by side)")
    d.add_argument("--out", required=True, type=Path)
    m = sub.add_parser("merge", help="join the shards of one dump into one file")
    m.add_argument("files", nargs="+", type=Path)
    m.add_argument("--out", required=True, type=Path)
    f = sub.add_parser("fit", help="routing accuracy of score + weight * aptitude over a grid of weights")
    f.add_argument("files", nargs="+", type=Path)
    f.add_argument("--zoos", default=",".join(ZOOS))
    f.add_argument("--fit-on", default="_train",
                   help="select the weight on the mean over the files whose name contains this (default _train)")
    f.add_argument("--val-only", action="store_true", help="also the validation slice alone (train files)")
    r = sub.add_parser("report", help="evaluate-style figures of each zoo of each file at one weight")
    r.add_argument("files", nargs="+", type=Path)
    r.add_argument("--weight", type=float, default=None, help="default: the dumped checkpoint's own")
    r.add_argument("--zoos", default=",".join(ZOOS))
    q = sub.add_parser("paired", help="the router against a baseline on the same prompts, with a bootstrap interval")
    q.add_argument("file", type=Path)
    q.add_argument("--data", required=True, type=Path)
    q.add_argument("--split", default="test")
    q.add_argument("--baseline", default="mlp")
    q.add_argument("--weight", type=float, default=None, help="default: the dumped checkpoint's own")
    q.add_argument("--threads", type=int, default=1)
    g = sub.add_parser("agree", help="two dumps of the same prompts: both accuracies and how often they pick alike")
    g.add_argument("first", type=Path)
    g.add_argument("second", type=Path)
    g.add_argument("--weight", type=float, default=None, help="default: each dumped checkpoint's own")
    g.add_argument("--second-weight", type=float, default=None,
                   help="the second file's, when the two networks are served with different weights (default: --weight)")
    g.add_argument("--zoos", default=",".join(ZOOS))
    t = sub.add_parser("subject", help="score + w * aptitude + v * the aptitude on the prompt's own subject")
    t.add_argument("files", nargs="+", type=Path)
    t.add_argument("--data", required=True, type=Path)
    t.add_argument("--suite", default=None, help="aptitude suite (default: as satroute evaluate)")
    t.add_argument("--zoos", default=",".join(ZOOS))
    t.add_argument("--fit-on", default="_train")
    t.add_argument("--weight", type=float, default=None, help="the served w to compare with (default: the dumped checkpoint's own)")
    t.add_argument("--neighbours", type=int, default=0,
                   help="K: the prior is each model's mean outcome on the K suite questions nearest the prompt")
    args = parser.parse_args(argv)
    return {"dump": dump, "merge": merge, "fit": fit, "report": report, "paired": paired,
            "agree": agree, "subject": subject}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
