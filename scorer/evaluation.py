"""Routing benchmarks: route a data set's test prompts with any ``Scorer``, next to the reference points.

Owns: ``evaluate`` (routing accuracy of a scorer over a zoo, with each single model, the best single
model, random choice, the oracle, and a per-benchmark breakdown by ``dataset``), ``compare`` (the
same for several scorers on one prompt sample), and the ``satroute evaluate`` command
(``add_arguments`` / ``run``; also ``python -m scorer.evaluation``).

Does not know: how any scorer works inside (Model-SAT comes from ``scorer.load_scorer``, baselines from
``scorer.baselines``), the proxy.

Rules:
- Routing picks the argmax of ``scorer.score(format_instruction(prompt), {model: profile})``; ties go
  to the model listed first. A scorer with ``score_many(instructions, candidates)`` is called in
  batches instead (same result, faster).
- Missing outcomes: a prompt on which any zoo model has no recorded outcome is left out (for every
  row of the table alike) and counted in ``n_missing``; every figure is over the same prompts. A
  split with no prompt left is a ``DataError`` (naming the models with no outcome there at all).
- ``random`` is the expected accuracy of a uniformly random pick; ``oracle`` is right when any zoo
  model is right.
- Profiles (only when Model-SAT or ``aptitude`` reads them): built-in, else computed from DIR's
  train split, which must hold at least half the suite's questions (``--allow-partial-profiles``
  lowers that to one); no suite question may be in DIR's test split.
- ``limit``: a fixed sample of that many prompts, drawn with ``seed`` from the eligible prompts and
  kept in data order, so repeated runs and different scorers see the same prompts.
"""
from __future__ import annotations

import argparse
import json
import math
import signal
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from scorer import Profile, Scorer
from scorer.data import DataError, RoutingData, format_instruction, load_dataset

BATCH = 256


def eligible_rows(data: RoutingData, models: Sequence[str], split: str = "test", limit: int | None = None,
                  seed: int = 0) -> tuple[RoutingData, int]:
    """The evaluated prompts (the split, complete for the zoo, optionally sampled) and how many were missing."""
    part = data.split(split).with_models(models)
    known = ~np.isnan(part.correct_matrix())
    complete = known.all(axis=1)
    if not complete.any():  # every figure would be over no prompt
        absent = [m for m, seen in zip(part.models, known.any(axis=0)) if not seen]
        where = f" in {data.path}" if data.path else ""
        raise DataError(f"no {split} prompt{where} has an outcome for every model of the zoo"
                        + (f"; no outcome at all for {', '.join(map(repr, absent))}" if absent else ""))
    rows = np.flatnonzero(complete)
    if limit is not None and limit < len(rows):
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=limit, replace=False))
    return part.subset(rows), int((~complete).sum())


def route(scorer: Scorer, instructions: Sequence[str], models: Sequence[str],
          profiles: Mapping[str, Profile]) -> np.ndarray:
    """Index into ``models`` of the pick for each instruction."""
    candidates = {m: profiles.get(m, {}) for m in models}
    many = getattr(scorer, "score_many", None)
    if many is not None:
        results = [r for s in range(0, len(instructions), BATCH) for r in many(instructions[s:s + BATCH], candidates)]
    else:
        results = [scorer.score(text, candidates) for text in instructions]
    picks = []
    for r in results:
        scores = np.array([r.get(m, float("-inf")) for m in models], dtype=np.float64)
        picks.append(int(np.argmax(np.where(np.isnan(scores), -np.inf, scores))))  # argmax takes NaN for the max
    return np.array(picks, dtype=np.int64)


def _table(correct: np.ndarray, models: Sequence[str]) -> dict:
    singles = correct.mean(axis=0) if len(correct) else np.zeros(len(models))
    best = int(np.argmax(singles))
    return {
        "n": int(len(correct)),
        "singles": {m: round(float(a), 4) for m, a in zip(models, singles)},
        "best_single": {"model": models[best], "accuracy": round(float(singles[best]), 4)},
        "random": round(float(correct.mean()) if len(correct) else 0.0, 4),
        "oracle": round(float(correct.max(axis=1).mean()) if len(correct) else 0.0, 4),
    }


def _accuracy(correct: np.ndarray, picks: np.ndarray) -> float:
    return round(float(correct[np.arange(len(picks)), picks].mean()), 4) if len(picks) else 0.0


def compare(scorers: Mapping[str, Scorer], data: RoutingData, models: Sequence[str],
            profiles: Mapping[str, Profile], split: str = "test", limit: int | None = None, seed: int = 0) -> dict:
    """Routing accuracy of each named scorer on one prompt sample, with the reference points."""
    models = list(models)
    part, n_missing = eligible_rows(data, models, split, limit, seed)
    correct = part.correct_matrix()
    texts = [format_instruction(p) for p in part.prompts]
    picks = {name: route(s, texts, models, profiles) for name, s in scorers.items()}
    report = {**_table(correct, models), "n_missing": n_missing, "models": models,
              "scorers": {name: _accuracy(correct, p) for name, p in picks.items()},
              "choices": {name: {m: round(float((p == j).mean()), 4) if len(p) else 0.0
                                 for j, m in enumerate(models)} for name, p in picks.items()}}
    datasets = np.array([p.dataset for p in part.prompts])
    if len(set(datasets)) > 1:
        report["by_dataset"] = {}
        for ds in sorted(set(datasets)):
            mask = datasets == ds
            report["by_dataset"][str(ds)] = {**_table(correct[mask], models),
                                             "scorers": {n: _accuracy(correct[mask], p[mask]) for n, p in picks.items()}}
    return report


def evaluate(scorer: Scorer, data: RoutingData, models: Sequence[str], profiles: Mapping[str, Profile],
             split: str = "test", limit: int | None = None, seed: int = 0) -> dict:
    """Routing accuracy of one scorer (``router``) next to singles, best single, random, oracle."""
    report = compare({"router": scorer}, data, models, profiles, split, limit, seed)
    report["router"] = report["scorers"].pop("router")
    report["choices"] = report["choices"]["router"]
    for block in report.get("by_dataset", {}).values():
        block["router"] = block.pop("scorers")["router"]
    del report["scorers"]
    return report


# --- command line -------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="a folder in the shared format")
    parser.add_argument("--models", default=None, help="comma-separated zoo (default: every model in DIR)")
    parser.add_argument("--checkpoint", default=None, help="Model-SAT checkpoint (default: the committed one)")
    parser.add_argument("--router", default="model-sat",
                        help="what routes: model-sat (the checkpoint), a baseline name (knn, mlp, rf, category), "
                             "NAME=CHECKPOINT, or none")
    parser.add_argument("--baselines", default="knn,mlp,rf,category",
                        help="comma-separated baselines to report, 'none', or NAME=CHECKPOINT for another Model-SAT "
                             "checkpoint (e.g. text_only=PATH)")
    parser.add_argument("--suite", default=None, help="aptitude suite of the profiles (default: DIR's name if a "
                                                      "suite has it, else mmlu_pro); none: no profiles")
    parser.add_argument("--allow-partial-profiles", action="store_true",
                        help="use a profile computed from DIR even when it rests on under half of the suite's "
                             "questions (default: refused)")
    parser.add_argument("--split", default="test", help="the split routed (train or test)")
    parser.add_argument("--limit", type=positive_int, default=None, help="a fixed, deterministic sample of N prompts")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--cache-dir", default=None, help="embedding cache (default: ~/.cache/satroute)")
    parser.add_argument("--embed-tokens", type=positive_int, default=128,
                        help="tokens of each prompt the embedding baselines read (default 128)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="Model-SAT's dtype (auto: as satroute serve runs it here; before the eleventh "
                             "round of docs/evaluation.md every figure was float32)")
    parser.add_argument("--aptitude-weight", type=finite_float, default=None, metavar="W",
                        help="score each Model-SAT checkpoint loaded here with this aptitude weight in place "
                             "of its config's (0: the network's own scores, as the figures of "
                             "docs/evaluation.md's rounds 4 to 8 were measured)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (1 is fastest on a busy 2-core machine)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


#: what a user can do when the folder cannot give a model a profile (the end of those messages)
PROFILE_ADVICE = ("a profile needs the folder's train split to hold the suite's questions, or a built-in profile "
                  "under the model's name (scorer/assets/profiles/); otherwise route with --router none and the "
                  "baselines knn, mlp, rf, category, or leave the model out (--models)")


def _profiles(args, data: RoutingData, models: Sequence[str],
              readers: Sequence[str] = ("model-sat",)) -> dict[str, dict[str, float]]:
    """Built-in profiles of the suite; a model without one gets it computed from DIR's outcomes
    (refused when it rests on too few of the suite's questions, unless --allow-partial-profiles;
    said on stderr either way). Only when a router reads them (``readers``; by default, as for
    Model-SAT): the others run on any folder."""
    from scorer.aptitude import (builtin_profiles, check_coverage, check_train_only, computed_profiles, load_suite,
                                 suite_for)

    if args.suite == "none" or not readers:
        return {m: {} for m in models}
    name = suite_for(args.data, args.suite)
    suite = load_suite(name)
    check_train_only(suite, data)  # a built-in profile measured on DIR's test questions has seen them too
    stored = builtin_profiles(name)
    computed, coverage = computed_profiles(suite, data, [m for m in models if m not in stored])
    for note in check_coverage(suite, coverage, data.path or str(args.data), PROFILE_ADVICE,
                               getattr(args, "allow_partial_profiles", False)):
        print(f"satroute evaluate: {note}", file=sys.stderr)
    return {m: stored[m] if m in stored else computed[m] for m in models}


def _check_profiles(args, profiles: Mapping[str, Profile], readers: Sequence[str]) -> None:
    """Every model needs a profile when a router that reads them runs (``readers``: their specs):
    an empty one would stop Model-SAT, or leave the aptitude baseline picking the first model."""
    if not readers:
        return
    if args.suite == "none":
        raise DataError(f"--suite none gives the models no profiles, and {', '.join(readers)} reads them")
    from scorer.aptitude import suite_for

    for model, profile in profiles.items():
        if not profile:
            raise DataError(f"model {model!r} has an empty profile in suite {suite_for(args.data, args.suite)!r}; "
                            + PROFILE_ADVICE)


def _build_scorer(spec: str, args, data: RoutingData, models: Sequence[str], embedder) -> Scorer:
    from scorer import load_scorer
    from scorer.baselines import BASELINES, train_baseline

    name, _, path = spec.partition("=")
    if path:
        return _weighted(load_scorer(path, dtype=args.dtype), args)
    if name in BASELINES:
        return train_baseline(name, data, models, embedder, args.seed, args.cache_dir)
    if name == "model-sat":
        return _weighted(load_scorer(args.checkpoint, dtype=args.dtype), args)
    raise ValueError(f"unknown router/baseline {spec!r} (choose model-sat, {', '.join(BASELINES)}, NAME=CHECKPOINT "
                     "or none)")


def _weighted(scorer: Scorer, args) -> Scorer:
    """A Model-SAT scorer with ``--aptitude-weight`` in place of its checkpoint's, when given."""
    weight = getattr(args, "aptitude_weight", None)
    if weight is not None:
        scorer.model.config.aptitude_weight = weight
    return scorer


ROUTER_KEY = "\0router"  # cannot clash with a baseline's name


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def run(args: argparse.Namespace) -> int:
    """The evaluation; a wrong model name, router name, data folder or checkpoint (its backbones
    included) is one line on stderr and exit code 2, not a traceback (and is found before any
    baseline is trained). Ctrl+C is one line too, and exit code 130 (nothing is lost: the report
    comes at the end)."""
    from scorer.backbones import BackboneError
    from scorer.inference import CheckpointError

    try:
        return _run(args)
    except (DataError, CheckpointError, BackboneError, ValueError) as exc:  # BackboneError: a checkpoint's psi or phi
        print(f"satroute evaluate: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 128 + signal.SIGINT


def _run(args: argparse.Namespace) -> int:
    from scorer.baselines import BASELINES
    from scorer.embeddings import Embedder

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    data = load_dataset(args.data)
    if not data.models:
        raise DataError(f"no model outcomes in {args.data}")
    models = [m.strip() for m in args.models.split(",")] if args.models else list(data.models)
    unknown = [m for m in models if m not in data.models]
    twice = sorted({m for m in models if models.count(m) > 1})
    if twice:  # a zoo holds each model once: the report's zoo size and random choice would be wrong
        raise DataError(f"--models names {', '.join(map(repr, twice))} more than once")
    if unknown:
        raise DataError(f"{', '.join(map(repr, unknown))} not in {args.data} (its models: {', '.join(data.models)})")
    eligible_rows(data, models, args.split, args.limit, args.seed)  # a wrong split, or none left: now, not at the end
    embedder = Embedder(max_length=args.embed_tokens)
    specs = [] if args.baselines in ("", "none") else [s.strip() for s in args.baselines.split(",") if s.strip()]
    routers = [args.router] if args.router != "none" else []
    wanted = list(dict.fromkeys(specs + routers))
    # checkpoints first, then the profiles they read: a wrong path or suite must not wait for
    # every baseline to be trained
    checkpoints = [spec for spec in wanted if spec not in BASELINES]
    readers = checkpoints + [spec for spec in wanted if spec == "aptitude"]
    built = {spec: _build_scorer(spec, args, data, models, embedder) for spec in checkpoints}
    profiles = _profiles(args, data, models, readers)
    _check_profiles(args, profiles, readers)
    built.update({spec: _build_scorer(spec, args, data, models, embedder) for spec in wanted if spec not in built})
    scorers = {spec.partition("=")[0]: built[spec] for spec in specs}
    if args.router != "none":
        scorers[ROUTER_KEY] = built[args.router]
    report = compare(scorers, data, models, profiles, args.split, args.limit, args.seed)
    report["router_name"] = args.router
    if args.router != "none":
        report["router_runs_on"] = getattr(built[args.router], "runs_on", None)
    report["router"] = report["scorers"].pop(ROUTER_KEY, None)
    report["baselines"] = report.pop("scorers")
    if ROUTER_KEY in report["choices"]:
        report["choices"]["router"] = report["choices"].pop(ROUTER_KEY)
    for block in report.get("by_dataset", {}).values():
        block["router"] = block["scorers"].pop(ROUTER_KEY, None)
        block["baselines"] = block.pop("scorers")
    if args.json:
        print(json.dumps(report, allow_nan=False))
    else:
        print(format_report(report))
    return 0


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def format_report(report: Mapping) -> str:
    lines = [f"{report['n']} prompts ({report['n_missing']} left out: missing outcomes), zoo of {len(report['models'])}",
             f"  router ({report.get('router_name', 'router')}): {_fmt(report['router'])}"]
    lines += [f"  {name}: {acc:.4f}" for name, acc in report.get("baselines", {}).items()]
    best = report["best_single"]
    lines += [f"  best single ({best['model']}): {best['accuracy']:.4f}", f"  random: {report['random']:.4f}",
              f"  oracle: {report['oracle']:.4f}"]
    for ds, block in report.get("by_dataset", {}).items():
        extra = " ".join(f"{k}={v:.4f}" for k, v in block.get("baselines", {}).items())
        lines.append(f"  [{ds}] n={block['n']} router={_fmt(block['router'])} {extra} best={block['best_single']['accuracy']:.4f}"
                     f" random={block['random']:.4f} oracle={block['oracle']:.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="satroute evaluate", description="Routing accuracy on a data set's test split.")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
