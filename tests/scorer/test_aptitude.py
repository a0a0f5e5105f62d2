"""scorer.aptitude: suite selection from train questions, JSON round trip, profiles."""
from __future__ import annotations

import numpy as np
import pytest

from scorer.aptitude import (Suite, build_suite, builtin_profiles, load_builtin_profile, load_suite,
                             profile_from_graded, profile_from_outcomes, save_profile)
from scorer.data import DataError, load_dataset, write_dataset

MODELS = ["A", "B", "C", "D"]
# question -> (subject, split, models that got it right)
DESIGN = {
    "a1": ("anatomy", "train", "ABCD"),  # p = 1: tells nobody apart
    "a2": ("anatomy", "train", "AC"),    # p = .5
    "a3": ("anatomy", "train", "A"),     # p = .25
    "a4": ("anatomy", "test", "AB"),     # test: never selected
    "s1": ("astronomy", "train", "AB"),
    "s2": ("astronomy", "train", "AB"),
    "s3": ("astronomy", "train", ""),
    "v1": ("virology", "train", ""),
    "v2": ("virology", "train", ""),
    "v3": ("virology", "train", "D"),
    "n1": ("nutrition", "train", "AB"),  # D has no outcome: excluded, leaving nutrition too small
    "n2": ("nutrition", "train", "AB"),
}


@pytest.fixture()
def data(tmp_path):
    prompts = [{"id": q, "dataset": "mmlu_pro", "category": "x", "source": f"ori_mmlu-{s}", "split": sp,
                "question": q, "options": ["a", "b"], "answer": "A"} for q, (s, sp, _) in DESIGN.items()]
    prompts.append({"id": "o1", "dataset": "mmlu_pro", "category": "x", "source": "stemez-Physics",
                    "split": "train", "question": "o1", "options": [], "answer": "A"})
    outcomes = [(q, m, int(m in right)) for q, (_, _, right) in DESIGN.items() for m in MODELS
                if not (q == "n2" and m == "D")]
    return load_dataset(write_dataset(tmp_path / "set", prompts, outcomes))


def test_selects_discriminating_questions_and_tasks(data):
    suite = build_suite(data, "tiny", n_tasks=2, n_questions=2, seed=0, min_questions=2)
    assert suite.task_ids == ["anatomy", "astronomy"]  # spread .41 and .5 beat virology's .22
    assert suite.task("anatomy").question_ids == ("a2", "a3")  # p(1-p) = .25, .19 > 0 for a1
    assert set(suite.task("astronomy").question_ids) == {"s1", "s2"}
    assert suite.task("anatomy").keywords[0] == "Medicine" and len(suite.task("anatomy").keywords) == 5
    assert all(data.prompt(q).split == "train" for q in suite.question_ids)


def test_selection_is_seeded(data):
    picks = {build_suite(data, "t", n_tasks=3, n_questions=2, seed=s, min_questions=2).task("virology").question_ids
             for s in range(10)}
    assert all("v3" in p for p in picks) and len(picks) == 2  # the v1/v2 tie is broken by the seed
    a = build_suite(data, "t", n_tasks=3, n_questions=2, seed=4, min_questions=2)
    assert a == build_suite(data, "t", n_tasks=3, n_questions=2, seed=4, min_questions=2)


def test_too_few_subjects_is_an_error(data):
    with pytest.raises(DataError):
        build_suite(data, "t", n_tasks=4, n_questions=2, min_questions=3)


def test_profiles_from_outcomes_and_graded_agree(data):
    suite = build_suite(data, "tiny", n_tasks=2, n_questions=2, seed=0, min_questions=2)
    assert profile_from_outcomes(suite, data, "A") == {"anatomy": 1.0, "astronomy": 1.0}
    assert profile_from_outcomes(suite, data, "C") == {"anatomy": 0.5, "astronomy": 0.0}
    graded = {"a2": True, "a3": False, "s1": True}  # s2 ungraded: left out of the denominator
    assert profile_from_graded(suite, graded) == {"anatomy": 0.5, "astronomy": 1.0}
    assert profile_from_graded(suite, {"a2": True}) == {"anatomy": 1.0}  # no graded astronomy question


def test_a_suite_naming_a_test_question_is_refused_before_a_profile_reads_it(data):
    from scorer.aptitude import Task

    suite = Suite("edited", 1, (Task("anatomy", ("a", "b", "c", "d", "e"), ("a2", "a4")),))  # a4 is test
    with pytest.raises(DataError, match="outside the train split.*a4"):
        profile_from_outcomes(suite, data, "A")


def test_suite_and_profile_files_round_trip(data, tmp_path):
    suite = build_suite(data, "tiny", n_tasks=2, n_questions=2, seed=0, min_questions=2)
    suite.save(tmp_path / "tiny.json")
    assert load_suite(tmp_path / "tiny.json") == suite
    text = (tmp_path / "tiny.json").read_text()
    assert "a2" in text and '"options"' not in text
    save_profile(suite, "org/Model-1", {"anatomy": 0.5, "astronomy": 1.0}, tmp_path / "profiles")
    body = load_builtin_profile("builtin:tiny/org/Model-1", tmp_path / "profiles")
    assert body == {"model": "org/Model-1", "suite": "tiny", "tasks": {"anatomy": 0.5, "astronomy": 1.0}}
    assert builtin_profiles("tiny", tmp_path / "profiles") == {"org/Model-1": {"anatomy": 0.5, "astronomy": 1.0}}
    with pytest.raises(DataError):
        load_builtin_profile("builtin:tiny/absent", tmp_path / "profiles")


def test_committed_suites_shape():
    pro, rdc = load_suite("mmlu_pro"), load_suite("routerdc")
    assert len(pro.tasks) == 50 and all(len(t.question_ids) == 20 for t in pro.tasks)
    assert len(rdc.tasks) == 50 and sum(len(t.question_ids) == 20 for t in rdc.tasks) >= 34
    assert all(len(t.keywords) == 5 for t in pro.tasks + rdc.tasks)
    assert set(builtin_profiles("mmlu_pro")) >= {"gpt4o", "Meta-Llama-3_1-8B-Instruct"}
    assert len(builtin_profiles("routerdc")) == 7


@pytest.mark.data
def test_committed_suites_are_train_only_and_profiles_match(shared_data):
    for name in ("mmlu_pro", "routerdc"):
        data, suite = load_dataset(shared_data / name), load_suite(name)
        rows = data.rows(suite.question_ids)
        assert all(data.prompts[r].split == "train" for r in rows)
        assert len(set(suite.question_ids)) == len(suite.question_ids)
        model = data.models[0]
        stored = load_builtin_profile(f"builtin:{name}/{model}")["tasks"]
        for task in suite.tasks:
            direct = float(np.nanmean(data.correct(model)[data.rows(task.question_ids)]))
            assert stored[task.id] == pytest.approx(direct, abs=1e-4)
    assert build_suite(load_dataset(shared_data / "mmlu_pro"), "mmlu_pro") == load_suite("mmlu_pro")


def test_build_assets_from_a_missing_data_folder_is_one_line_and_exit_2(tmp_path, capsys):
    from scorer.build_assets import main

    assert main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "assets")]) == 2
    err = capsys.readouterr().err
    assert err == f"python -m scorer.build_assets: {tmp_path / 'nowhere' / 'mmlu_pro'} holds no prompts.jsonl.gz\n"
    assert not (tmp_path / "assets").exists()


def test_the_suite_of_a_folder_given_as_dot_is_the_folder_s_own(tmp_path, monkeypatch):
    """``--data .`` from inside ``routerdc/``: ``Path(".").name`` is empty, and mmlu_pro was taken."""
    from scorer.aptitude import suite_for

    (tmp_path / "routerdc").mkdir()
    monkeypatch.chdir(tmp_path / "routerdc")
    assert suite_for(".") == "routerdc" and suite_for("../routerdc") == "routerdc"
    # a link keeps the name it was given (data/routerdc -> /mnt/datasets/data-v2)
    (tmp_path / "data-v2").mkdir()
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "routerdc").symlink_to(tmp_path / "data-v2")
    assert suite_for(tmp_path / "linked" / "routerdc") == "routerdc"


def _half_held_suite():
    """Two tasks of two questions, of which the data folder holds one each (a2, s1): half the suite."""
    from scorer.aptitude import Task

    return Suite("part", 1, (Task("anatomy", ("a",) * 5, ("a2", "zz1")), Task("astronomy", ("s",) * 5, ("s1", "zz2"))))


def test_computed_profiles_say_their_coverage_and_refuse_a_thin_one(data):
    from scorer.aptitude import Task, check_coverage, computed_profiles

    suite = _half_held_suite()
    profiles, coverage = computed_profiles(suite, data, ["A"])
    assert profiles == {"A": {"anatomy": 1.0, "astronomy": 1.0}} and coverage == {"A": (2, 2)}
    assert check_coverage(suite, coverage, "DIR", "ADVICE") == [
        "profile of 'A' computed from DIR: 2 of the 4 questions of suite 'part' (2 of its 2 tasks)"]
    thin = Suite("thin", 1, suite.tasks[:1] + (Task("virology", ("v",) * 5, ("zz3", "zz4")),))  # 1 of 4 held
    profiles, coverage = computed_profiles(thin, data, ["A"])
    assert profiles == {"A": {"anatomy": 1.0}} and coverage == {"A": (1, 1)}
    with pytest.raises(DataError, match=r"^the profile of model 'A' computed from DIR rests on 1 of the 4 questions of "
                                        r"suite 'thin' \(1 of its 2 tasks\), under 50%: too thin to route by "
                                        r"\(--allow-partial-profiles uses it anyway\); ADVICE$"):
        check_coverage(thin, coverage, "DIR", "ADVICE")
    assert len(check_coverage(thin, coverage, "DIR", "ADVICE", allow_partial=True)) == 1


def test_a_model_with_no_graded_suite_question_is_refused_even_when_partial_profiles_are_allowed(data):
    """One model without a graded question is that model's problem; none with one is the folder's
    (or the suite's): said once, with --suite, not model after model."""
    from scorer.aptitude import Task, check_coverage, computed_profiles

    suite = Suite("elsewhere", 1, (Task("anatomy", ("a",) * 5, ("zz1", "zz2")),))
    _, coverage = computed_profiles(suite, data, ["A"])
    assert coverage == {"A": (0, 0)}
    with pytest.raises(DataError, match="^no model has an outcome on a question of suite 'elsewhere' in DIR: its train "
                                        r"split holds none of them \(pass --suite naming the suite its questions are "
                                        r"from\); ADVICE$"):
        check_coverage(suite, coverage, "DIR", "ADVICE", allow_partial=True)
    with pytest.raises(DataError, match="^model 'A' has no outcomes on the questions of suite 'elsewhere' in DIR, so "
                                        "no profile can be computed for it; ADVICE$"):
        check_coverage(suite, {"B": (2, 1), **coverage}, "DIR", "ADVICE", allow_partial=True)
