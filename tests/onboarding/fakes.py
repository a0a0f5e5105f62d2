"""Helpers of the onboarding tests: a tiny suite (in memory or as files), a fake asker, providers.yaml."""
from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Callable

import orjson
import yaml

from proxy.dispatch import Reply
from proxy.onboarding import PROBE, Onboarding, Options
from proxy.onboarding_service import DispatchAsker, OnboardingService
from proxy.providers import ProviderRegistry
from proxy.questions import Question
from scorer.data import write_dataset
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
        self.answers: dict[str, object] = {}  # question id -> what to answer instead (text or Said)
        self.probes: list[dict] = []  # the parameters of each probe (Onboarding._model_answers)

    def question_of(self, messages) -> Question:
        user = messages[-1]["content"]
        text = user.split("\n", 1)[0].removeprefix("Question: ")
        return self.by_text[text]

    async def ask(self, model, messages, **params):
        if messages[-1]["content"] == PROBE:  # is the model up? (no question of the test)
            return await self.probe(params)
        q = self.question_of(messages)
        self.params.append(params)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            if self.failures:
                raise self.failures.pop(0)
            self.asked[q.id] += 1
            if q.id in self.answers:
                return self.answers[q.id]
            return f"Thinking about it... The answer is ({self.decide(q.id)})."
        finally:
            self.in_flight -= 1


    async def probe(self, params) -> str:
        self.probes.append(params)
        await asyncio.sleep(self.delay)
        if self.failures:
            raise self.failures.pop(0)
        return "OK"


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


def tiny_suite_files(tmp_path, n_tasks: int = 2, per_task: int = 3):
    """A suite JSON and a question folder: task0 answers A, task1 B; -> (suite path, folder)."""
    tasks, prompts = [], []
    for t in range(n_tasks):
        ids = [f"mmlu_pro/{t * 10 + i}" for i in range(per_task)]
        tasks.append({"id": f"task{t}", "keywords": ["a", "b", "c", "d", "e"], "question_ids": ids})
        prompts += [{"id": q, "dataset": "mmlu_pro", "category": "c", "source": f"ori_mmlu-s{t}",
                     "split": "train", "question": f"Question number {q}?",
                     "options": ["w", "x", "y", "z"], "answer": "A" if t == 0 else "B"} for q in ids]
    suite = tmp_path / "tiny_suite.json"
    suite.write_text(json.dumps({"name": "tiny", "version": 1, "tasks": tasks}))
    return suite, write_dataset(tmp_path / "questions", prompts, [])


def model_entry(name, base, tmp_path, profile=False):
    info = {"input_price_per_mtok": 0.1, "output_price_per_mtok": 0.2}
    if profile:
        (tmp_path / f"{name}.json").write_text(json.dumps({"tasks": {"task0": 0.5, "task1": 0.5}}))
        info["capability_profile"] = f"{name}.json"
    return {"model_name": name, "litellm_params": {"model": f"openai/{name}", "api_base": base},
            "model_info": info}


def write_providers(path, models):
    path.write_text(yaml.safe_dump({"model_list": models, "router_settings": {
        "num_retries": 0, "timeout_s": 5, "deadline_s": 10}}))


# -- an OnboardingService over a providers.yaml, without HTTP ------------------------------------
def spawn(coro, name):
    return asyncio.create_task(coro, name=name)


class Answering:
    """A dispatcher whose every completion carries ``content`` (after ``delay`` s)."""

    def __init__(self, content, delay: float = 0.0):
        self.content, self.delay, self.calls = content, delay, 0

    async def complete(self, call):
        self.calls += 1
        await asyncio.sleep(self.delay)
        body = {"choices": [{"message": {"role": "assistant", "content": self.content}}]}
        return Reply(model=call.targets[0].name, body=orjson.dumps(body))


def service(config, store, dispatcher, suite, questions, concurrency: int = 2):
    """The providers.yaml at ``config`` as a registry, and an OnboardingService over it whose
    questions go through ``dispatcher`` and whose engine asks ``suite``'s ``questions``."""
    from proxy.localserver import shared_key

    # the state directory's key, as the proxy's (proxy/app.py): what a stored failure is keyed with
    registry = ProviderRegistry(config, dict, store, local_key=shared_key(store.dir))
    svc = OnboardingService(store, registry, DispatchAsker(registry, dispatcher), spawn)
    svc._engine = Onboarding(store, suite, questions, svc.asker, Options(concurrency=concurrency))
    return registry, svc


async def wait_until(check, timeout: float = 10.0):
    for _ in range(int(timeout / 0.01)):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met")
