"""bench/router_scores.py: the saved score matrices and what is computed from them (the aptitude
weight's fit, reports, paired comparisons, zoos on their complete rows)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from scorer.inference import aptitude
from support import bench_module
from support import tiny_modelsat as tiny

PROFILES = tiny.PROFILES
_scorer = tiny.scorer


def _bench():
    return bench_module.load("router_scores")


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


def test_the_bench_subject_prior_reads_the_task_of_each_prompts_own_subject(tmp_path, capsys):
    """``subject`` adds each candidate's aptitude on the prompt's MMLU subject; rows without a task
    of the suite get the profile's mean, and the suite's own questions are left out."""
    from scorer.aptitude import builtin_profiles, load_suite
    from scorer.data import load_dataset, write_dataset

    bench = _bench()
    suite, profiles = load_suite("mmlu_pro"), builtin_profiles("mmlu_pro")
    models = ["gemma-7b", "Yi-34B"]
    # two subjects on which the two profiles disagree: each is better on one of them
    tasks = [t for t in suite.task_ids if profiles[models[0]][t] != profiles[models[1]][t]]
    better = {t: int(profiles[models[1]][t] > profiles[models[0]][t]) for t in tasks}
    first = next(t for t in tasks if better[t] == 0)
    second = next(t for t in tasks if better[t] == 1)
    rows = [("p0", f"ori_mmlu-{first}"), ("p1", f"ori_mmlu-{second}"), ("p2", "stemez-Physics"),
            (suite.question_ids[0], f"ori_mmlu-{first}")]
    prompts = [{"id": i, "dataset": "mmlu_pro", "category": "x", "source": src, "split": "test",
                "question": "q", "options": ["a", "b"], "answer": "A"} for i, src in rows]
    data = load_dataset(write_dataset(tmp_path / "mmlu_pro", prompts, [(i, m, 1.0) for i, _ in rows for m in models]))
    correct = np.zeros((4, 2), dtype=np.float32)
    correct[0, 0] = correct[1, 1] = correct[3, 1] = 1.0  # right where its subject says
    correct[2, 1] = 1.0  # no subject: right on the model with the stronger profile (Yi-34B)
    mean = np.array([np.mean(list(profiles[m].values())) for m in models])
    file = tmp_path / "x_train.npz"
    np.savez(file, ids=np.array([i for i, _ in rows]), datasets=np.array(["mmlu_pro"] * 4), models=np.array(models),
             scores=np.zeros((4, 2), np.float32), correct=correct, val=np.zeros(4, bool), aptitude=mean)
    prior, has, in_suite = bench.subject_prior(np.load(file), data, "mmlu_pro")
    assert prior[0].tolist() == [profiles[m][first] for m in models]
    assert prior[1].tolist() == [profiles[m][second] for m in models]
    assert prior[2].tolist() == pytest.approx(mean.tolist())  # no task of the suite: the mean
    assert has.tolist() == [True, True, False, True] and in_suite.tolist() == [False, False, False, True]

    assert bench.main(["subject", str(file), "--data", str(tmp_path / "mmlu_pro"), "--weight", "0"]) == 0
    got = json.loads(capsys.readouterr().out.strip())
    assert got["n"] == 3  # the suite's own question is left out
    assert got["chosen"]["v"] > 0 and got["chosen"]["router"] == 1.0
    # the mean alone sends both MMLU rows to one model: one of them is wrong
    assert got["mean_only_best_on_this_file"] < 1.0


def test_the_bench_neighbour_prior_averages_each_models_outcomes_on_the_nearest_suite_questions(tmp_path):
    from scorer.aptitude import load_suite
    from scorer.data import load_dataset, write_dataset

    bench = _bench()
    asked = load_suite("mmlu_pro").question_ids[:3]
    ids = list(asked) + ["p0", "p1"]
    models = ["gemma-7b", "Yi-34B"]
    right = {asked[0]: (1, 0), asked[1]: (1, 0), asked[2]: (0, 1), "p0": (1, 1), "p1": (0, 0)}
    prompts = [{"id": i, "dataset": "mmlu_pro", "category": "x", "source": "s", "split": "test",
                "question": "q", "options": ["a", "b"], "answer": "A"} for i in ids]
    outcomes = [(i, m, float(right[i][j])) for i in ids for j, m in enumerate(models)]
    data = load_dataset(write_dataset(tmp_path / "mmlu_pro", prompts, outcomes))
    # p0 lies by the first two suite questions, p1 by the third; the suite's own rows lie on themselves
    vectors = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [1.0, 0.05], [0.05, 1.0]])
    file = tmp_path / "dump.npz"
    np.savez(file, ids=np.array(["p0", "p1", asked[2]]), models=np.array(models))
    prior, has, in_suite = bench.neighbour_prior(np.load(file), data, "mmlu_pro", vectors, k=2)
    assert prior.tolist() == [[1.0, 0.0], [0.5, 0.5], [0.5, 0.5]]
    assert has.all() and in_suite.tolist() == [False, False, True]
    prior, _, _ = bench.neighbour_prior(np.load(file), data, "mmlu_pro", vectors, k=1)
    assert prior.tolist() == [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]


def test_the_bench_agree_compares_two_dumps_each_at_its_own_weight(tmp_path, capsys):
    bench = _bench()
    common = dict(ids=np.array(["a", "b", "c", "d"]), datasets=np.array(["d"] * 4), models=np.array(["x", "y"]),
                  correct=np.array([[1, 0], [1, 0], [0, 1], [0, 1]], np.float32), val=np.zeros(4, bool),
                  aptitude=np.array([1.0, 0.0]))
    first, second = tmp_path / "first.npz", tmp_path / "second.npz"
    np.savez(first, scores=np.array([[0, 1], [0, 1], [0, 1], [0, 1]], np.float32), **common)  # y unless w > 1
    np.savez(second, scores=np.array([[1, 0], [1, 0], [0, 1], [0, 1]], np.float32), **common)  # right at w 0
    assert bench.main(["agree", str(first), str(second), "--weight", "0"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert (got["first"], got["second"], got["same_pick"], got["weights"]) == (0.5, 1.0, 0.5, [0.0, 0.0])
    assert bench.main(["agree", str(first), str(second), "--weight", "2", "--second-weight", "0"]) == 0
    got = json.loads(capsys.readouterr().out)  # the first now picks x everywhere, the second is unchanged
    assert (got["first"], got["second"], got["same_pick"], got["weights"]) == (0.5, 1.0, 0.5, [2.0, 0.0])
    assert bench.main(["agree", str(first), str(second), "--weight", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["second"] == 0.5  # both at 2: the second picks x too


def test_the_bench_dump_scores_the_validation_slice_alone_when_asked(tmp_path, monkeypatch):
    """``dump --only-val`` keeps exactly the rows ``satroute train --val-size N`` held out, and a
    full dump marks the same rows as ``val``."""
    import scorer as scorer_package
    from scorer.aptitude import builtin_profiles
    from scorer.data import write_dataset

    bench = _bench()
    models = ["gemma-7b", "Yi-34B"]
    ids = [f"t{i}" for i in range(8)]
    prompts = [{"id": i, "dataset": "mmlu_pro", "category": "law", "source": "s", "split": "train",
                "question": f"law court {n}", "options": ["a", "b"], "answer": "A"} for n, i in enumerate(ids)]
    folder = write_dataset(tmp_path / "mmlu_pro", prompts, [(i, m, float(n % 2)) for n, i in enumerate(ids) for m in models])
    monkeypatch.setattr(scorer_package, "load_scorer", lambda *a, **k: _scorer())
    common = ["--data", str(folder), "--split", "train", "--models", ",".join(models), "--val-size", "3", "--threads", "0"]
    assert bench.main(["dump", *common, "--out", str(tmp_path / "all.npz")]) == 0
    assert bench.main(["dump", *common, "--only-val", "--out", str(tmp_path / "val.npz")]) == 0
    whole, val = np.load(tmp_path / "all.npz"), np.load(tmp_path / "val.npz")
    assert len(whole["ids"]) == 8 and whole["val"].sum() == 3
    assert sorted(val["ids"]) == sorted(whole["ids"][whole["val"]]) and val["val"].all()
    profiles = builtin_profiles("mmlu_pro")
    first = str(val["ids"][0])
    expected = _scorer().score(f"law court {ids.index(first)}\nA. a\nB. b", {m: profiles[m] for m in models})
    assert val["scores"][0] == pytest.approx([expected[m] for m in models], abs=1e-4)
    with pytest.raises(SystemExit, match="--only-val"):
        bench.main(["dump", *common, "--only-val", "--limit", "2", "--out", str(tmp_path / "x.npz")])
    # --all-rows scores every row: a --limit sample of them is no zoo's `satroute evaluate --limit` sample
    assert bench.main(["dump", *common, "--all-rows", "--limit", "2", "--out", str(tmp_path / "y.npz")]) == 2
    assert not (tmp_path / "y.npz").exists()
