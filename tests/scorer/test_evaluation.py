"""scorer.evaluation: routing numbers on a hand-checkable zoo, missing outcomes, limit, the CLI."""
from __future__ import annotations

import argparse
import json
import re

import pytest

from scorer.data import load_dataset, write_dataset
from scorer.evaluation import add_arguments, compare, eligible_rows, evaluate, run

MODELS = ["A", "B", "C"]
# prompt -> (dataset, split, who is right); "?" marks a missing outcome for C
ROWS = {
    "t1": ("mmlu", "test", "A"),
    "t2": ("mmlu", "test", "B"),
    "t3": ("mmlu", "test", "AB"),
    "t4": ("gsm8k", "test", ""),
    "t5": ("gsm8k", "test", "C"),
    "t6": ("gsm8k", "test", "A?"),
    "r1": ("mmlu", "train", "A"),
    "r2": ("gsm8k", "train", "C"),
}


@pytest.fixture()
def data(tmp_path):
    prompts = [{"id": p, "dataset": ds, "category": "cat", "source": "s", "split": sp, "question": f"route me {p}"}
               for p, (ds, sp, _) in ROWS.items()]
    outcomes = [(p, m, float(m in right)) for p, (_, _, right) in ROWS.items() for m in MODELS
                if not (m == "C" and "?" in right)]
    return load_dataset(write_dataset(tmp_path / "zoo", prompts, outcomes))


class KeywordScorer:
    """Routes 'route me tN' to a fixed model per prompt: a fake with the Scorer method only."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def score(self, instruction, candidates):
        self.calls.append((instruction, dict(candidates)))
        want = self.table[instruction.split()[-1]]
        return {m: (1.0 if m == want else 0.0) for m in candidates}


def test_hand_checked_numbers(data):
    scorer = KeywordScorer({"t1": "A", "t2": "A", "t3": "B", "t4": "C", "t5": "C"})
    profiles = {m: {"task": 0.5} for m in MODELS}
    report = evaluate(scorer, data, MODELS, profiles)
    # t6 dropped (C has no outcome); on t1..t5: router right on t1, t3, t5 = 3/5
    assert report["n"] == 5 and report["n_missing"] == 1
    assert report["router"] == 0.6
    assert report["singles"] == {"A": 0.4, "B": 0.4, "C": 0.2}
    assert report["best_single"] == {"model": "A", "accuracy": 0.4}
    assert report["random"] == pytest.approx(round(5 / 15, 4))
    assert report["oracle"] == 0.8
    assert report["choices"] == {"A": 0.4, "B": 0.2, "C": 0.4}
    assert report["by_dataset"]["gsm8k"]["router"] == 0.5 and report["by_dataset"]["mmlu"]["router"] == pytest.approx(0.6667)
    instruction, candidates = scorer.calls[0]
    assert instruction == "route me t1" and candidates == profiles  # profiles are handed to the scorer


def test_ties_go_to_first_model_and_batched_path(data):
    class Flat:
        def score_many(self, instructions, candidates):
            return [{m: 0.0 for m in candidates} for _ in instructions]

        def score(self, instruction, candidates):
            raise AssertionError("score_many should be used")

    report = evaluate(Flat(), data, MODELS, {})
    assert report["router"] == report["singles"]["A"]


def test_limit_is_a_fixed_sample(data):
    a, _ = eligible_rows(data, MODELS, limit=3, seed=0)
    b, _ = eligible_rows(data, MODELS, limit=3, seed=0)
    assert a.ids == b.ids and len(a) == 3 and all(i.startswith("t") and i != "t6" for i in a.ids)
    scorer = KeywordScorer({f"t{i}": "A" for i in range(1, 7)})
    assert compare({"x": scorer, "y": scorer}, data, MODELS, {}, limit=3)["n"] == 3


def _cli(data, *extra):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["--data", data.path, "--models", "A,B,C", *extra])


def test_cli_json_keys(data, capsys, tmp_path):
    args = _cli(data, "--router", "category", "--baselines", "category", "--json", "--suite", "none",
                "--cache-dir", str(tmp_path))
    assert run(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"n", "router", "best_single", "random", "oracle", "baselines"} <= set(out)
    assert set(out["best_single"]) == {"model", "accuracy"}
    # category baseline: train mmlu -> A, gsm8k -> C; test: t1..t3 -> A (2/3), t4, t5 -> C (1/2)
    assert out["router"] == 0.6 and out["baselines"] == {"category": 0.6}
    assert out["by_dataset"]["mmlu"]["baselines"]["category"] == pytest.approx(0.6667)


def test_cli_mistakes_are_one_line_and_exit_2_before_any_baseline_is_trained(data, capsys, tmp_path, monkeypatch):
    import scorer.baselines as baselines

    trained = []
    monkeypatch.setattr(baselines, "train_baseline", lambda name, *a, **k: trained.append(name))
    args = _cli(data, "--router", "none", "--baselines", "category", "--suite", "none")
    args.models = "A,NOT-A-MODEL"
    assert run(args) == 2
    assert "'NOT-A-MODEL' not in" in capsys.readouterr().err
    missing = str(tmp_path / "no-checkpoint")
    assert run(_cli(data, "--router", f"mine={missing}", "--baselines", "category", "--suite", "none")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no Model-SAT checkpoint" in err and trained == []
    with pytest.raises(SystemExit):  # argparse: a sample of no prompt is no evaluation
        _cli(data, "--limit", "0")


def test_cli_text_report(data, capsys, tmp_path):
    assert run(_cli(data, "--router", "none", "--baselines", "category", "--suite", "none")) == 0
    text = capsys.readouterr().out
    assert "router (none): -" in text and "category: 0.6000" in text and "oracle: 0.8000" in text


@pytest.mark.data
def test_reference_points_match_the_data_readme(shared_data):
    """The README's headroom table for the small MMLU-Pro zoo, reproduced by the harness."""
    zoo = ["Meta-Llama-3_1-8B-Instruct", "Phi-3-mini-4k-instruct", "gemma-7b", "Qwen1.5-7B-Chat",
           "Mistral-7B-Instruct-v0.2"]

    class Always:
        def score(self, instruction, candidates):
            return {m: float(m == "Meta-Llama-3_1-8B-Instruct") for m in candidates}

    report = evaluate(Always(), load_dataset(shared_data / "mmlu_pro"), zoo, {})
    assert report["n"] == 2420 and report["n_missing"] == 0
    assert report["best_single"] == {"model": "Meta-Llama-3_1-8B-Instruct", "accuracy": pytest.approx(0.436, abs=5e-4)}
    assert report["router"] == report["best_single"]["accuracy"]
    assert report["random"] == pytest.approx(0.338, abs=5e-4) and report["oracle"] == pytest.approx(0.670, abs=5e-4)


def test_a_nan_score_is_never_the_pick():
    from scorer.evaluation import route

    class Broken:
        def score(self, instruction, candidates):
            return {"A": float("nan"), "B": 0.2, "C": 0.1}

    assert route(Broken(), ["x", "y"], MODELS, {}).tolist() == [1, 1]


def test_cli_a_folder_without_outcomes_is_one_line_and_exit_2(tmp_path, capsys):
    folder = write_dataset(tmp_path / "bare", [{"id": "q1", "split": "test", "question": "what?"}], [])
    args = argparse.ArgumentParser()
    add_arguments(args)
    assert run(args.parse_args(["--data", str(folder), "--router", "none", "--baselines", "category"])) == 2
    assert capsys.readouterr().err == f"satroute evaluate: no model outcomes in {folder}\n"


@pytest.mark.parametrize("flags", [("--router", "foo"), ("--router", "none", "--baselines", "category,foo")])
def test_cli_an_unknown_router_or_baseline_is_one_line_and_exit_2(data, capsys, flags):
    assert run(_cli(data, "--suite", "none", *flags)) == 2
    err = capsys.readouterr().err
    assert err.startswith("satroute evaluate: unknown router/baseline 'foo'") and err.count("\n") == 1


def test_cli_a_model_named_twice_is_one_line_and_exit_2(data, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--data", data.path, "--models", "A,B,A", "--router", "none", "--baselines",
                              "category", "--suite", "none"])
    assert run(args) == 2
    assert capsys.readouterr().err == "satroute evaluate: --models names 'A' more than once\n"


@pytest.mark.parametrize("router, suite, message", [
    ("model-sat", "none", "--suite none gives the models no profiles, and model-sat reads them"),
    ("aptitude", "none", "--suite none gives the models no profiles, and aptitude reads them"),
    ("model-sat", "mmlu_pro", "no model has an outcome on a question of suite 'mmlu_pro' in .*: its train split "
                              r"holds none of them \(pass --suite .*\); a profile needs the folder's train split to "
                              r"hold the suite's questions, .*; otherwise route with --router none and the baselines .*"),
])
def test_cli_a_router_that_reads_profiles_needs_a_profile_for_every_model(data, capsys, monkeypatch, router, suite,
                                                                         message):
    import scorer

    trained = []
    monkeypatch.setattr(scorer, "load_scorer", lambda *a, **k: KeywordScorer({}))
    monkeypatch.setattr("scorer.baselines.train_baseline", lambda name, *a, **k: trained.append(name))
    assert run(_cli(data, "--router", router, "--baselines", "category", "--suite", suite)) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(f"satroute evaluate: {message}\n", err) and trained == []


def test_cli_a_checkpoint_whose_config_does_not_describe_its_weights_is_one_line_and_exit_2(data, capsys, tmp_path):
    from scorer.inference import save_checkpoint
    from support import tiny_modelsat as tiny

    enc, llm = tiny.save_backbones(tmp_path / "backbones")
    folder = save_checkpoint(tiny.build(accuracy_feature=True, encoder=enc, llm=llm), tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "accuracy_feature": False}))
    assert run(_cli(data, "--router", f"mine={folder}", "--baselines", "none", "--suite", "none")) == 2
    err = capsys.readouterr().err  # after the backbones' loading bars
    assert err.splitlines()[-1].startswith(f"satroute evaluate: {folder / 'config.json'} does not describe the weights")
    assert "Traceback" not in err



def test_cli_a_checkpoint_whose_phi_is_gone_is_one_line_and_exit_2(data, capsys, tmp_path):
    """A checkpoint names its backbones by path: one since moved is said in one line, no traceback."""
    import shutil

    from scorer.inference import save_checkpoint
    from support import tiny_modelsat as tiny

    enc, llm = tiny.save_backbones(tmp_path / "backbones")
    folder = save_checkpoint(tiny.build(encoder=enc, llm=llm), tmp_path / "ckpt")
    shutil.rmtree(llm)
    assert run(_cli(data, "--router", f"mine={folder}", "--baselines", "none", "--suite", "none")) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("satroute evaluate: cannot load LLM") and "Traceback" not in err


def test_cli_a_checkpoint_whose_weights_are_a_git_lfs_pointer_is_one_line_and_exit_2(data, capsys, tmp_path):
    from scorer.inference import save_checkpoint
    from support import tiny_modelsat as tiny

    enc, llm = tiny.save_backbones(tmp_path / "backbones")
    folder = save_checkpoint(tiny.build(accuracy_feature=True, encoder=enc, llm=llm), tmp_path / "ckpt")
    (folder / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:4d7a\n"
                                              "size 12345678\n")
    assert run(_cli(data, "--router", f"mine={folder}", "--baselines", "none", "--suite", "none")) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (f"satroute evaluate: {folder / 'model.safetensors'} is a Git LFS pointer, not the "
                                    "file itself: this checkout was made without git-lfs (install it, then run "
                                    "`git lfs pull`)")
    assert "Traceback" not in err


def test_cli_aptitude_weight_replaces_the_checkpoints_own(data, tmp_path, monkeypatch):
    """A checkpoint whose config was given a weight later (route_alignment's 2.52, ninth round) is
    scored as it was before that (0) only with the override: its earlier figures reproduce."""
    from scorer.evaluation import _build_scorer
    from scorer.inference import save_checkpoint
    from support import tiny_modelsat as tiny

    enc, llm = tiny.save_backbones(tmp_path / "backbones")
    folder = save_checkpoint(tiny.build(accuracy_feature=True, encoder=enc, llm=llm), tmp_path / "ckpt")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "aptitude_weight": 2.5}))
    monkeypatch.setattr("scorer.inference.load_suite", lambda name: tiny.suite())
    profiles = {"strong": {t: 0.9 for t in tiny.suite().task_ids}, "weak": {t: 0.1 for t in tiny.suite().task_ids}}

    def scores(*flags, spec="model-sat"):
        router = _build_scorer(spec, _cli(data, "--checkpoint", str(folder), "--dtype", "float32", *flags),
                               data, MODELS, None)
        return router.score("law court", profiles)

    own, none, given = scores(), scores("--aptitude-weight", "0"), scores("--aptitude-weight", "1")
    for name, mean in (("strong", 0.9), ("weak", 0.1)):
        assert own[name] - none[name] == pytest.approx(2.5 * mean, abs=1e-4)
        assert given[name] - none[name] == pytest.approx(mean, abs=1e-4)
    # the same for a checkpoint named as NAME=CHECKPOINT
    assert scores("--aptitude-weight", "0", spec=f"mine={folder}") == pytest.approx(none)


def test_a_zoo_with_no_complete_test_prompt_is_an_error_naming_the_models_without_one(tmp_path, capsys):
    prompts = [{"id": p, "split": sp, "question": p} for p, sp in (("r1", "train"), ("t1", "test"), ("t2", "test"))]
    outcomes = [(p, m, 1.0) for p in ("r1", "t1", "t2") for m in "AB"] + [("r1", "C", 1.0)]
    folder = write_dataset(tmp_path / "zoo", prompts, outcomes)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args(["--data", str(folder), "--router", "none", "--baselines", "category",
                                  "--suite", "none", "--json"])) == 2
    assert capsys.readouterr() == ("", f"satroute evaluate: no test prompt in {folder.resolve()} has an outcome for "
                                       "every model of the zoo; no outcome at all for 'C'\n")
    assert eligible_rows(load_dataset(folder), ["A", "B"])[0].ids == ["t1", "t2"]  # the zoo without C


@pytest.mark.parametrize("flag, value, message", [
    ("--threads", "-1", "must be 1 or more, not -1"), ("--threads", "0", "must be 1 or more, not 0"),
    ("--embed-tokens", "-5", "must be 1 or more, not -5"), ("--embed-tokens", "0", "must be 1 or more, not 0"),
    ("--seed", "-1", "must be 0 or more, not -1"),
    ("--aptitude-weight", "nan", "must be a finite number, not nan"),
    ("--aptitude-weight", "inf", "must be a finite number, not inf"),
])
def test_cli_numbers_out_of_range_are_refused_naming_their_option(data, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exc:
        _cli(data, flag, value)
    assert exc.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: argument {flag}: {message}")


def test_cli_a_malformed_prompt_line_is_one_line_and_exit_2(data, capsys):
    import gzip

    prompts = f"{data.path}/prompts.jsonl.gz"
    with gzip.open(prompts, "wt", encoding="utf-8") as fh:
        fh.write('{"id": "t1", "split": "test"}\n["t2"]\n')
    assert run(_cli(data, "--router", "none", "--baselines", "category", "--suite", "none")) == 2
    assert capsys.readouterr().err == f"satroute evaluate: {prompts}: line 2: expected a JSON object, got list\n"


def test_cli_ctrl_c_is_one_line_and_exit_130(data, capsys, monkeypatch):
    """A long evaluation stopped by Ctrl+C: no 65-line traceback, the status a shell expects."""
    import scorer.evaluation

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(scorer.evaluation, "compare", interrupted)
    try:
        status = run(_cli(data, "--router", "none", "--baselines", "category", "--suite", "none"))
    except KeyboardInterrupt:
        pytest.fail("Ctrl+C is a traceback")
    assert status == 130
    assert capsys.readouterr() == ("", "interrupted\n")


@pytest.fixture()
def suite_file(tmp_path):
    """A suite of two tasks of two questions; ``data`` holds r1 and r2, its train questions: half of it."""
    from scorer.aptitude import Suite, Task

    path = tmp_path / "part.json"
    Suite("part", 1, (Task("law", ("l",) * 5, ("r1", "zz1")), Task("art", ("a",) * 5, ("r2", "zz2")))).save(path)
    return path


def test_cli_a_profile_computed_from_the_folder_says_its_coverage_on_stderr(data, capsys, suite_file):
    assert run(_cli(data, "--router", "aptitude", "--baselines", "none", "--suite", str(suite_file))) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [f"satroute evaluate: profile of {m!r} computed from {data.path}: 2 of the 4 questions of suite "
                   "'part' (2 of its 2 tasks)" for m in MODELS]


def test_cli_a_thin_profile_computed_from_the_folder_is_refused_unless_allowed(data, capsys, tmp_path, monkeypatch):
    """23 suite questions over 19 tasks routed a whole zoo onto one model: under half the suite, stop."""
    from scorer.aptitude import Suite, Task

    trained = []
    monkeypatch.setattr("scorer.baselines.train_baseline", lambda name, *a, **k: trained.append(name))
    path = tmp_path / "thin.json"
    Suite("thin", 1, (Task("law", ("l",) * 5, ("r1", "zz1", "zz2")),)).save(path)
    assert run(_cli(data, "--router", "aptitude", "--baselines", "category", "--suite", str(path))) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"satroute evaluate: the profile of model 'A' computed from {data.path} rests on 1 of the 3 "
                          "questions of suite 'thin' (1 of its 1 tasks), under 50%: too thin to route by "
                          "(--allow-partial-profiles uses it anyway); ") and err.count("\n") == 1 and trained == []
    monkeypatch.undo()  # the aptitude router is built by train_baseline
    assert run(_cli(data, "--router", "aptitude", "--baselines", "none", "--suite", str(path),
                    "--allow-partial-profiles")) == 0
    assert f"satroute evaluate: profile of 'C' computed from {data.path}: 1 of the 3 questions" in capsys.readouterr().err


def test_cli_routers_that_read_no_profile_run_whatever_the_suite_holds(data, capsys, tmp_path):
    from scorer.aptitude import Suite, Task

    path = tmp_path / "elsewhere.json"
    Suite("elsewhere", 1, (Task("law", ("l",) * 5, ("zz1", "t1")),)).save(path)  # nothing held, and a test question
    assert run(_cli(data, "--router", "none", "--baselines", "category", "--suite", str(path))) == 0
    assert capsys.readouterr().err == ""


def test_cli_a_built_in_profile_is_refused_when_the_folder_tests_on_the_suite_s_questions(tmp_path, capsys):
    """A built-in profile was measured on the suite's questions: routing them, it has seen the answers."""
    from scorer.aptitude import load_suite

    asked = load_suite("mmlu_pro").question_ids[0]
    prompts = [{"id": p, "split": sp, "question": p} for p, sp in ((asked, "test"), ("t1", "test"), ("r1", "train"))]
    outcomes = [(p, m, 1.0) for p in (asked, "t1", "r1") for m in ("gemma-7b", "Yi-34B")]
    folder = write_dataset(tmp_path / "mmlu_pro", prompts, outcomes)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args(["--data", str(folder), "--router", "aptitude", "--baselines", "none"])) == 2
    assert capsys.readouterr().err == (f"satroute evaluate: suite 'mmlu_pro' names 1 question(s) outside the train "
                                       f"split of {folder.resolve()} (e.g. {asked!r}): a profile must not read them\n")


def test_cli_a_split_with_nothing_to_route_is_found_before_any_baseline_is_trained(data, capsys, monkeypatch,
                                                                                  tmp_path):
    trained = []
    monkeypatch.setattr("scorer.baselines.train_baseline", lambda name, *a, **k: trained.append(name))
    assert run(_cli(data, "--router", "none", "--baselines", "category", "--suite", "none", "--split", "tset")) == 2
    assert capsys.readouterr().err == ("satroute evaluate: no prompts in split 'tset' (the splits found: 'test', "
                                       "'train')\n")
    folder = write_dataset(tmp_path / "trainonly", [{"id": "r1", "split": "train", "question": "q"}], [("r1", "A", 1)])
    assert run(_cli(load_dataset(folder), "--models", "A", "--router", "none", "--baselines", "category")) == 2
    assert capsys.readouterr().err == "satroute evaluate: no prompts in split 'test' (the splits found: 'train')\n"
    assert trained == []
