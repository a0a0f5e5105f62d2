"""A small synthetic suite and a fake asker for the onboarding engine tests."""
from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Callable

from proxy.questions import Question
from scorer.aptitude import Suite, Task

LETTERS = "ABCD"


def make_suite(n_tasks: int = 3, per_task: int = 4) -> tuple[Suite, list[Question]]:
    tasks, questions = [], []
    for t in range(n_tasks):
        ids = tuple(f"mmlu_pro/{t * 100 + i}" for i in range(per_task))
        tasks.append(Task(f"task{t}", ("k1", "k2", "k3", "k4", "k5"), ids))
        for i, qid in enumerate(ids):
            questions.append(Question(qid, f"Question {qid}: what is {t} + {i}?",
                                      tuple(str(t + i + d) for d in range(4)),
                                      LETTERS[(t + i) % 4], f"ori_mmlu-subject{t}"))
    return Suite("tiny", 1, tuple(tasks)), questions


class FakeAsker:
    """Answers from ``decide(question_id) -> letter``; can fail through ``behaviour``."""

    def __init__(self, questions: list[Question], decide: Callable[[str], str],
                 delay: float = 0.0):
        self.by_text = {q.question: q for q in questions}
        self.decide, self.delay = decide, delay
        self.asked: Counter = Counter()
        self.in_flight = 0
        self.peak = 0
        self.failures: list[BaseException] = []  # raised in order, one per call, before answering
        self.params: list[dict] = []

    def question_of(self, messages) -> Question:
        user = messages[-1]["content"]
        text = user.split("\n", 1)[0].removeprefix("Question: ")
        return self.by_text[text]

    async def ask(self, model, messages, **params):
        q = self.question_of(messages)
        self.params.append(params)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            if self.failures:
                raise self.failures.pop(0)
            self.asked[q.id] += 1
            return f"Thinking about it... The answer is ({self.decide(q.id)})."
        finally:
            self.in_flight -= 1


def wait_for(get, check, timeout: float = 30.0, every: float = 0.02):
    """Poll ``get()`` until ``check(value)``; the value, or AssertionError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = get()
        if check(value):
            return value
        time.sleep(every)
    raise AssertionError(f"condition not met in {timeout}s; last: {value}")
