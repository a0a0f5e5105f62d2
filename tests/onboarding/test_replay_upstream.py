"""The replay upstream recognises every aptitude question and answers as the recorded model did."""
from __future__ import annotations

import httpx
import pytest

from proxy.questions import from_folder
from scorer.aptitude import load_suite
from scorer.grading import build_messages, extract_answer
from support.replay_upstream import Replay, ReplayUpstream

pytestmark = pytest.mark.data

REPLAYED = ["gemma-7b", "Yi-34B"]  # one with recorded generations, one with predictions only


@pytest.fixture(scope="module")
def replay(shared_data):
    return Replay(shared_data / "mmlu_pro", REPLAYED, prefer=load_suite("mmlu_pro").question_ids)


def test_every_suite_question_is_recognised_and_answered_as_recorded(replay, shared_data):
    suite = load_suite("mmlu_pro")
    questions = from_folder(shared_data / "mmlu_pro", suite.question_ids)
    suite_task = {qid: t.id for t in suite.tasks for qid in t.question_ids}
    claimed: set[str] = set()
    for q in questions:
        content = build_messages(q.question, q.options, q.subject)[-1]["content"]
        qid = replay.question_id(content, claimed)
        claimed.add(qid)
        # the data's word-for-word copies of a question share a subject, hence a task
        assert qid == q.id or (suite_task[qid] == suite_task[q.id]
                               and replay.prompt_key(qid) == replay.prompt_key(q.id))
    assert claimed == set(suite.question_ids)
    for q in questions:
        assert replay.answer(q.id, "gemma-7b") == replay.text[(q.id, "gemma-7b")]
        assert extract_answer(replay.answer(q.id, "Yi-34B"), len(q.options)) == (
            replay.pred[(q.id, "Yi-34B")] or None)


def test_served_over_http_with_pause_and_drop(shared_data):
    suite = load_suite("mmlu_pro")
    q = from_folder(shared_data / "mmlu_pro", suite.question_ids[:1])[0]
    messages = build_messages(q.question, q.options, q.subject)
    with ReplayUpstream(shared_data / "mmlu_pro", REPLAYED) as up, httpx.Client() as client:
        r = client.post(f"{up.url}/chat/completions", json={"model": "Yi-34B", "messages": messages})
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"].endswith(
            f"({up.replay.pred[(q.id, 'Yi-34B')]}).")
        assert up.answered["Yi-34B"] == [q.id]
        assert client.post(f"{up.url}/chat/completions",
                           json={"model": "nope", "messages": messages}).status_code == 404
        up.pause()
        with httpx.Client(timeout=0.2) as impatient, pytest.raises(httpx.ReadTimeout):
            impatient.post(f"{up.url}/chat/completions", json={"model": "Yi-34B", "messages": messages})
        up.drop_waiting()
        assert up.answered["Yi-34B"] == [q.id]
        assert up.received["Yi-34B"] == [q.id, q.id]
