"""scorer.data: loading the shared format, splits, score semantics, the router's instruction text."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest

from scorer.data import DataError, Prompt, format_instruction, is_correct, load_dataset, write_dataset


def _prompt(pid, dataset="mmlu", split="train", **kw):
    return {"id": pid, "dataset": dataset, "category": kw.get("category", "anatomy"), "source": kw.get("source", "x"),
            "split": split, "question": kw.get("question", f"q {pid}?"), "options": kw.get("options", []),
            "answer": kw.get("answer")}


@pytest.fixture()
def folder(tmp_path):
    prompts = [_prompt("p1"), _prompt("p2", split="test"), _prompt("g1", dataset="gsm8k"),
               _prompt("g2", dataset="gsm8k", split="test"), _prompt("x1", dataset="mmlu_pro")]
    outcomes = [("p1", "A", 0.31), ("p1", "B", 0.0), ("p2", "A", 0.0), ("g1", "A", 0.5), ("g1", "B", 0.4),
                ("g2", "B", 1.0), ("x1", "A", 1), ("x1", "B", 0), ("unlisted", "A", 1)]
    return write_dataset(tmp_path / "set", prompts, outcomes)


def test_load_matrix_with_nan_for_missing(folder):
    data = load_dataset(folder)
    assert data.models == ["A", "B"]
    assert data.ids == ["p1", "p2", "g1", "g2", "x1"]
    assert data.scores[data.rows(["p1"])[0]].tolist() == [0.31, 0.0]
    assert math.isnan(data.scores[1, 1]) and math.isnan(data.scores[3, 0])


def test_correct_semantics_per_dataset(folder):
    data = load_dataset(folder)
    a, b = data.correct("A"), data.correct("B")
    # mmlu: correct = score > 0 (0.31 is right); gsm8k: share >= 0.5; mmlu_pro 0/1
    assert a[0] == 1.0 and b[0] == 0.0
    assert a[2] == 1.0 and b[2] == 0.0
    assert a[4] == 1.0 and b[4] == 0.0
    assert math.isnan(b[1]) and math.isnan(a[3])
    assert is_correct("gsm8k", np.array([0.49, 0.5])).tolist() == [0.0, 1.0]
    assert is_correct("cmmlu", np.array([0.01, 0.0])).tolist() == [1.0, 0.0]


def test_split_keeps_only_that_split(folder):
    data = load_dataset(folder)
    train, test = data.split("train"), data.split("test")
    assert train.ids == ["p1", "g1", "x1"] and test.ids == ["p2", "g2"]
    assert train.models == data.models
    assert train.correct("A").tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(DataError):
        data.split("validation")


def test_loading_is_cached_per_path(folder):
    assert load_dataset(folder) is load_dataset(str(folder))


def test_unknown_model_and_missing_folder(folder, tmp_path):
    with pytest.raises(DataError):
        load_dataset(folder).correct("nope")
    with pytest.raises(DataError):
        load_dataset(tmp_path / "absent")


def test_format_instruction_letters_options():
    p = Prompt("i", "mmlu_pro", "c", "s", "train", "What is 2+2?", ("3", "4"), "B")
    assert format_instruction(p) == "What is 2+2?\nA. 3\nB. 4"
    assert format_instruction({"question": "Hi", "options": []}) == "Hi"
    assert format_instruction({"question": "Q", "options": ["x"]}) == "Q\nA. x"


@pytest.mark.data
def test_real_sets_load(shared_data):
    pro = load_dataset(shared_data / "mmlu_pro")
    assert len(pro) == 12032 and len(pro.models) == 24
    assert len(pro.split("test")) == 2420
    rdc = load_dataset(shared_data / "routerdc")
    assert len(rdc) == 20600 and len(rdc.models) == 7
    assert not np.isnan(rdc.correct_matrix()).any()


def _outcomes_file(tmp_path, text):
    import gzip

    folder = write_dataset(tmp_path / "set", [_prompt("p1"), _prompt("p2", split="test")], [])
    with gzip.open(folder / "outcomes.csv.gz", "wt", encoding="utf-8", newline="") as fh:
        fh.write(text)
    return folder


def test_outcomes_read_three_columns_and_skip_blank_lines(tmp_path):
    folder = _outcomes_file(tmp_path, "prompt_id,model,score,note\np1,A,1,checked\n\np2,A,0,\n\n")
    data = load_dataset(folder)
    assert data.models == ["A"] and data.scores[:, 0].tolist() == [1.0, 0.0]


@pytest.mark.parametrize("row, message", [("p2,A,", "line 3: score '' is not a number"),
                                          ("p2,A,yes", "line 3: score 'yes' is not a number"),
                                          ("p2,A", "line 3: expected prompt_id,model,score")])
def test_a_malformed_outcome_row_is_a_data_error_naming_its_line(tmp_path, row, message):
    folder = _outcomes_file(tmp_path, f"prompt_id,model,score\np1,A,1\n{row}\n")
    with pytest.raises(DataError, match=message):
        load_dataset(folder)


@pytest.mark.parametrize("lines, message", [
    ('{"id": "p1"}\n{"question": "where is my id?"}\n', r"line 2: the prompt has no \"id\""),
    ('{"id": "p1"}\n\n[1, 2]\n', "line 3: expected a JSON object, got list"),
    ('{"id": "p1"}\n{not json\n', r"line 2: not JSON \(Expecting property name enclosed in double quotes, column 2\)"),
    ('{"id": "p1", "options": 5}\n', "line 1: 'int' object is not iterable"),
])
def test_a_malformed_prompt_line_is_a_data_error_naming_its_file_and_line(tmp_path, lines, message):
    import gzip

    folder = write_dataset(tmp_path / "set", [], [])
    with gzip.open(folder / "prompts.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write(lines)
    with pytest.raises(DataError, match=f"^{re.escape(str(folder / 'prompts.jsonl.gz'))}: {message}$"):
        load_dataset(folder)


@pytest.mark.parametrize("name", ["prompts.jsonl.gz", "outcomes.csv.gz"])
@pytest.mark.parametrize("content", [b"prompt_id,model,score\n", b"\x1f\x8b\x08\x00cut short"])
def test_a_file_that_is_not_gzip_is_a_data_error_naming_it(tmp_path, name, content):
    folder = write_dataset(tmp_path / "set", [_prompt("p1")], [("p1", "A", 1.0)])
    (folder / name).write_bytes(content)
    with pytest.raises(DataError, match=f"^{re.escape(str(folder / name))}: not a gzip file$"):
        load_dataset(folder)


def test_a_stray_quote_in_the_outcomes_is_a_data_error_naming_the_file(tmp_path):
    """The csv reader reads on to the next quote: past its field limit, csv.Error, not a traceback."""
    import gzip

    folder = write_dataset(tmp_path / "set", [{"id": f"p{i}", "question": "q", "split": "test"} for i in range(3)], [])
    with gzip.open(folder / "outcomes.csv.gz", "wt", encoding="utf-8") as fh:
        fh.write('prompt_id,model,score\np0,"model-a,1\n' + "p1,model-a,1\n" * 12_000)
    with pytest.raises(DataError, match=f"^{re.escape(str(folder / 'outcomes.csv.gz'))}: line \\d+: field larger"):
        load_dataset(folder)


def _prompts_file(tmp_path, lines):
    import gzip

    folder = write_dataset(tmp_path / "set", [], [])
    with gzip.open(folder / "prompts.jsonl.gz", "wt", encoding="utf-8") as fh:
        fh.write(lines)
    return folder


@pytest.mark.parametrize("lines, message", [
    ('{"id": "p1", "split": "train"}\n{"id": "p2", "split": "Test"}\n',
     "line 2: prompt 'p2' has split 'Test'; the format allows only 'train' and 'test' "
     "(the splits found: 'Test', 'train')"),
    ('{"id": "p1", "split": "validation"}\n{"id": "p2", "split": "dev"}\n',
     "line 1: prompt 'p1' has split 'validation'; the format allows only 'train' and 'test' "
     "(the splits found: 'dev', 'validation')"),
    ('{"id": "p1", "split": "test"}\n{"id": "p2"}\n',
     "line 2: prompt 'p2' has split ''; the format allows only 'train' and 'test' (the splits found: '', 'test')"),
])
def test_a_split_other_than_train_or_test_is_refused_naming_its_line_and_the_splits_found(tmp_path, lines, message):
    """Such a prompt used to be dropped without a word: neither trained nor tested on."""
    folder = _prompts_file(tmp_path, lines)
    with pytest.raises(DataError, match=f"^{re.escape(str(folder / 'prompts.jsonl.gz'))}: {re.escape(message)}$"):
        load_dataset(folder)


def test_a_folder_without_outcomes_is_not_refused_for_its_splits(tmp_path):
    """MMLU's folder, questions only with a dev split: no outcomes to route, which is what the
    commands that read it say (a folder of routing data has only train and test)."""
    folder = _prompts_file(tmp_path, '{"id": "p1", "split": "dev"}\n')
    (folder / "outcomes.csv.gz").unlink()
    data = load_dataset(folder)
    assert [p.split for p in data.prompts] == ["dev"] and data.models == []


def test_a_split_with_no_prompt_names_the_splits_there_are(folder):
    with pytest.raises(DataError, match=r"^no prompts in split 'tset' \(the splits found: 'test', 'train'\)$"):
        load_dataset(folder).split("tset")


@pytest.mark.parametrize("second, kind", [("p1,A,1", "the same"), ("p1,A,0", "a different")])
def test_a_second_row_for_one_prompt_and_model_is_refused_naming_both_lines(tmp_path, second, kind):
    folder = _outcomes_file(tmp_path, f"prompt_id,model,score\np1,A,1\np2,A,0\n{second}\n")
    with pytest.raises(DataError, match=f"line 4: a second row for prompt 'p1' and model 'A' \\(the first is line 2, "
                                        f"{kind} score\\); keep one row per pair$"):
        load_dataset(folder)


@pytest.mark.parametrize("score", ["2", "-1", "inf", "-inf", "1.0001"])
def test_a_score_outside_0_1_is_refused_naming_its_line(tmp_path, score):
    folder = _outcomes_file(tmp_path, f"prompt_id,model,score\np1,A,1\np2,A,{score}\n")
    with pytest.raises(DataError, match=f"line 3: score '{re.escape(score)}' is outside \\[0, 1\\]$"):
        load_dataset(folder)


def test_a_nan_score_is_still_a_missing_result(tmp_path):
    data = load_dataset(_outcomes_file(tmp_path, "prompt_id,model,score\np1,A,1\np2,A,nan\n"))
    assert data.scores[0, 0] == 1.0 and math.isnan(data.scores[1, 0])


@pytest.mark.parametrize("name", ["prompts.jsonl.gz", "outcomes.csv.gz"])
def test_a_byte_order_mark_at_the_start_of_either_file_is_skipped(tmp_path, name):
    """Some Windows tools write one: it broke the header check, or the first line's JSON."""
    import gzip

    folder = write_dataset(tmp_path / "set", [_prompt("p1"), _prompt("p2", split="test")],
                           [("p1", "A", 1.0), ("p2", "A", 0.0)])
    with gzip.open(folder / name, "rb") as fh:
        body = fh.read()
    (folder / name).write_bytes(gzip.compress("\ufeff".encode() + body))
    data = load_dataset(folder)
    assert data.ids == ["p1", "p2"] and data.models == ["A"] and data.scores[:, 0].tolist() == [1.0, 0.0]


def test_outcomes_that_name_no_prompt_of_the_folder_say_so(tmp_path):
    """Not "no model outcomes": the file has rows, under ids the prompts do not use."""
    folder = _outcomes_file(tmp_path, "prompt_id,model,score\n1,A,1\n2,A,0\n")
    with pytest.raises(DataError, match="outcomes.csv.gz: none of its 2 rows names a prompt id of prompts.jsonl.gz "
                                        r"\(e.g. '1', where prompts.jsonl.gz has ids like 'p1'\)$"):
        load_dataset(folder)


def test_a_file_rewritten_within_one_mtime_tick_is_checked_again(tmp_path):
    """The parse is cached per file version: a malformed rewrite must not hide behind the old parse."""
    import gzip
    import os

    folder = _outcomes_file(tmp_path, "prompt_id,model,score\np1,A,1\np2,A,0\n")
    assert load_dataset(folder).models == ["A"]
    path = folder / "outcomes.csv.gz"
    stamp = path.stat().st_mtime_ns
    with gzip.open(path, "wt", encoding="utf-8", newline="") as fh:
        fh.write("prompt_id,model,score\np1,A,1\np2,A,yes\n")
    os.utime(path, ns=(stamp, stamp))
    with pytest.raises(DataError, match="line 3: score 'yes' is not a number"):
        load_dataset(folder)
