"""bench/router_scores.py: the saved score matrices and what is computed from them (the aptitude
weight's fit, reports, paired comparisons, zoos on their complete rows)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from scorer.inference import aptitude
from support import tiny_modelsat as tiny

PROFILES = tiny.PROFILES
_scorer = tiny.scorer


def _bench():
    """bench/router_scores.py, loaded as a module (bench/ is not a package)."""
    path = Path(__file__).resolve().parents[2] / "bench" / "router_scores.py"
    spec = importlib.util.spec_from_file_location("router_scores", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_the_bench_that_fits_the_aptitude_weight_routes_as_the_weighted_scorer(tmp_path):
    bench = _bench()
    names, texts = list(PROFILES), ["law court", "what is algebra ?", "biology cells", "history war"]
    plain = _scorer()
    scores = np.array([[plain.score(t, PROFILES)[m] for m in names] for t in texts])
    apt = np.array([aptitude(PROFILES[m]) for m in names])
    for weight in (0.0, 0.7, 3.0, 40.0):
        weighted = _scorer(aptitude_weight=weight)
        picks = [names.index(max((got := weighted.score(t, PROFILES)), key=got.get)) for t in texts]
        correct = np.eye(len(names))[picks]  # right exactly where the weighted scorer's pick is
        assert bench.routed(scores, correct, apt, weight, "raw") == 1.0


def test_the_bench_routes_each_zoo_on_the_rows_complete_for_its_own_models(tmp_path):
    """A dump made with --all-rows holds NaN outcomes; each zoo drops only the rows it lacks."""
    bench = _bench()
    models = list(dict.fromkeys(m for zoo in ("small", "mixed") for m in bench.ZOOS[zoo].split(",")))
    correct = np.ones((6, len(models)), dtype=np.float32)
    only_mixed = models.index("DeepSeek-Coder-V2")  # in the mixed zoo, not in the small one
    correct[[1, 4], only_mixed] = np.nan
    file = tmp_path / "dump.npz"
    np.savez(file, ids=np.arange(6).astype(str), datasets=np.array(["d"] * 6), models=np.array(models),
             scores=np.zeros_like(correct), correct=correct, val=np.zeros(6, bool), aptitude=np.zeros(len(models)))
    views = {name: (s, c, val) for name, s, c, _, val in bench.zoo_views(file, ["small", "mixed"])}
    assert len(views["small"][1]) == 6  # its models have every outcome: every row stays
    assert len(views["mixed"][1]) == 4 and not np.isnan(views["mixed"][1]).any()
    assert len(views["mixed"][0]) == len(views["mixed"][2]) == 4  # scores and val follow the same rows


def test_the_bench_report_routes_as_the_fit_and_splits_by_benchmark():
    bench = _bench()
    scores = np.array([[0.0, 1.0], [2.0, 0.0], [0.0, 0.5], [0.0, 0.1]])
    correct = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    aptitude, datasets = np.array([0.6, 0.4]), np.array(["gsm8k", "mmlu", "mmlu", "mmlu"])
    got = bench.zoo_report(scores, correct, aptitude, datasets, ["a", "b"], weight=1.0)
    # the weight adds 0.6 to a and 0.4 to b: it moves the last prompt to a (0.6 against 0.5) and no other
    assert got["router"] == bench.routed(scores, correct, aptitude, 1.0, "raw") == 0.75
    assert got["picks"] == {"a": 0.5, "b": 0.5}
    assert got["best_single"] == {"model": "a", "accuracy": 0.75}
    assert got["by_dataset"]["gsm8k"]["router"] == 1.0 and got["by_dataset"]["mmlu"]["router"] == 0.6667


def test_the_bench_paired_difference_counts_the_prompts_each_router_alone_gets_right():
    bench = _bench()
    router, baseline = np.array([1, 1, 0, 1, 0, 1.0]), np.array([1, 0, 1, 0, 0, 1.0])
    got = bench.paired_difference(router, baseline, resamples=500)
    assert got["diff"] == round(1 / 6, 4)
    assert (got["router_only_right"], got["baseline_only_right"]) == (2, 1)
    assert got["ci95"][0] <= got["diff"] <= got["ci95"][1]
    same = bench.paired_difference(router, router, resamples=50)
    assert same["diff"] == 0 and same["ci95"] == [0, 0]


def test_the_bench_dumps_the_networks_own_scores_and_puts_the_weight_back_when_asked(tmp_path):
    bench = _bench()
    plain, weighted = _scorer(), _scorer(aptitude_weight=6.0)  # the same seed: the same network
    assert bench.without_aptitude_weight(weighted) == 6.0
    assert weighted.score("law court", PROFILES) == pytest.approx(plain.score("law court", PROFILES), abs=1e-6)
    file, old = tmp_path / "new.npz", tmp_path / "old.npz"
    np.savez(file, checkpoint_weight=np.array(6.0))
    np.savez(old, scores=np.zeros((1, 1)))  # dumped before the weight was recorded
    assert bench.weight_for(np.load(file), None) == 6.0 and bench.weight_for(np.load(file), 0.0) == 0.0
    assert bench.weight_for(np.load(old), None) == 0.0
