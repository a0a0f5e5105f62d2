"""The question source: a data folder, the hub's MMLU-Pro (through a mock transport), or a clear error."""
from __future__ import annotations

import httpx
import pytest

from proxy.questions import (HUB_ROWS_URL, QuestionSourceError, from_folder, from_hub,
                             load_questions)
from scorer.data import write_dataset


def _folder(tmp_path):
    prompts = [{"id": f"mmlu_pro/{n}", "dataset": "mmlu_pro", "category": "math",
                "source": "ori_mmlu-college_mathematics", "split": "train",
                "question": f"q{n}?", "options": ["1", "2", "3"], "answer": "B"} for n in (70, 71, 99)]
    return write_dataset(tmp_path / "mmlu_pro", prompts, [])


def test_from_folder_in_suite_order(tmp_path):
    qs = from_folder(_folder(tmp_path), ["mmlu_pro/99", "mmlu_pro/70"])
    assert [q.id for q in qs] == ["mmlu_pro/99", "mmlu_pro/70"]
    assert qs[0].options == ("1", "2", "3") and qs[0].answer == "B"
    assert qs[0].subject == "ori_mmlu-college_mathematics"


async def test_a_gold_letter_written_in_lower_case_grades_as_the_capital(tmp_path):
    """A folder of one's own wrote "b": compared as it came with the capital the grader reads,
    every answer of an onboarded model was graded wrong (accuracy 0% for a perfect model)."""
    from fakes import FakeAsker
    from proxy.onboarding import Onboarding, Options
    from proxy.store import Store
    from scorer.aptitude import Suite, Task

    prompts = [{"id": f"mmlu_pro/{n}", "dataset": "mmlu_pro", "category": "math", "source": "ori_mmlu-x",
                "split": "train", "question": f"q{n}?", "options": ["1", "2", "3"], "answer": " b "}
               for n in (1, 2)]
    questions = from_folder(write_dataset(tmp_path / "lower", prompts, []), ["mmlu_pro/1", "mmlu_pro/2"])
    assert [q.answer for q in questions] == ["B", "B"]
    suite = Suite("lower", 1, (Task("t", ("a", "b", "c", "d", "e"), ("mmlu_pro/1", "mmlu_pro/2")),))
    with Store(tmp_path / "state") as store:
        progress = await Onboarding(store, suite, questions, FakeAsker(questions, lambda q: "B"),
                                    Options(concurrency=1)).run("m")
        assert progress.status == "done" and progress.accuracy == 1.0


def test_folder_missing_questions_or_files_is_a_clear_error(tmp_path):
    with pytest.raises(QuestionSourceError, match="lacks 1"):
        from_folder(_folder(tmp_path), ["mmlu_pro/70", "mmlu_pro/5"])
    with pytest.raises(QuestionSourceError, match="no prompts.jsonl.gz"):
        from_folder(tmp_path / "nothing", ["mmlu_pro/70"])


def test_a_folder_with_a_byte_order_mark_is_read_and_a_bad_line_named(tmp_path):
    """The routing data's reader skips a byte-order mark: so does onboarding's, on the same folder
    (it stopped with JSON's "Unexpected UTF-8 BOM", naming no file); a line that is no JSON is
    named by its file and line."""
    import gzip

    folder = _folder(tmp_path)
    path = folder / "prompts.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        text = fh.read()
    with gzip.open(path, "wt", encoding="utf-8-sig") as fh:
        fh.write(text)
    assert [q.id for q in from_folder(folder, ["mmlu_pro/70"])] == ["mmlu_pro/70"]
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write(text.splitlines()[0] + "\n{not json\n")
    with pytest.raises(QuestionSourceError, match=f"^{path}: line 2: JSONDecodeError: "):
        from_folder(folder, ["mmlu_pro/70"])
    path.write_bytes(b"not gzip")
    with pytest.raises(QuestionSourceError, match=f"^{path}: BadGzipFile: "):
        from_folder(folder, ["mmlu_pro/70"])


def _hub(total=250, fail=False):
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if fail:
            raise httpx.ConnectError("no network")
        assert str(request.url).startswith(HUB_ROWS_URL)
        assert request.url.params["dataset"] == "TIGER-Lab/MMLU-Pro"
        assert request.url.params["split"] == "test"
        offset, length = int(request.url.params["offset"]), int(request.url.params["length"])
        rows = [{"row_idx": i, "row": {"question_id": 70 + i, "question": f"hub q{70 + i}",
                                       "options": ["a", "b", "c", "d"], "answer": "C",
                                       "answer_index": 2, "cot_content": "", "category": "law",
                                       "src": "ori_mmlu-international_law"}}
                for i in range(offset, min(total, offset + length))]
        return httpx.Response(200, json={"rows": rows, "num_rows_total": total})

    return httpx.Client(transport=httpx.MockTransport(handler)), calls


def test_from_hub_maps_question_id_and_caches(tmp_path):
    client, calls = _hub()
    cache = tmp_path / "cache.jsonl"
    qs = from_hub(["mmlu_pro/75", "mmlu_pro/300"], cache, client=client)
    assert [q.id for q in qs] == ["mmlu_pro/75", "mmlu_pro/300"]
    assert qs[0].question == "hub q75" and qs[0].answer == "C"
    assert qs[0].subject == "ori_mmlu-international_law"
    assert len(calls) == 3  # 250 rows in pages of 100
    again = from_hub(["mmlu_pro/75"], cache, client=_hub(fail=True)[0])  # from the cache
    assert again[0].question == "hub q75"


def test_offline_without_a_folder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr("proxy.questions.default_folder", lambda suite: None)
    client, _ = _hub(fail=True)
    with pytest.raises(QuestionSourceError, match="cannot read TIGER-Lab/MMLU-Pro.*give a data folder"):
        load_questions(["mmlu_pro/70"], "mmlu_pro", client=client)
    with pytest.raises(QuestionSourceError, match="no source for the 'mmlu_pro' aptitude questions"):
        load_questions(["mmlu_pro/70"], "mmlu_pro", hub=False)


def test_an_explicit_folder_wins(tmp_path):
    qs = load_questions(["mmlu_pro/71"], "mmlu_pro", _folder(tmp_path), client=_hub(fail=True)[0])
    assert qs[0].question == "q71?"
