"""The onboarding engine against fake askers: grading, resume, stall, failure, spend cap."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
import sqlite3
import time

import pytest

from proxy.errors import AllUpstreamsFailed, UpstreamClientError
from proxy.onboarding import PROBE, PROBE_TOKENS, Onboarding, Options, Prices, estimate_cost
from proxy.store import GradedAnswer, ModelBusy, Store
from scorer.aptitude import profile_from_graded

from onboarding.fakes import FakeAsker, make_suite, wait_until


@pytest.fixture
def tiny():
    return make_suite()

FAST = Options(concurrency=4, backoff_s=0.01, backoff_max_s=0.02, give_up_s=0.2)


def gold_map(questions):
    return {q.id: q.answer for q in questions}


async def test_full_run_grades_and_stores_the_profile(tmp_path, tiny):
    suite, questions = tiny
    gold = gold_map(questions)
    right = {qid for i, qid in enumerate(sorted(gold)) if i % 3 != 0}
    asker = FakeAsker(questions, lambda q: gold[q] if q in right else ("A" if gold[q] != "A" else "B"))
    with Store(tmp_path) as store:
        progress = await Onboarding(store, suite, questions, asker, FAST).run("m")
        assert progress.status == "done" and progress.done == progress.total == 12
        expected = profile_from_graded(suite, {q: q in right for q in gold})
        assert store.get("m") == pytest.approx(expected)
        assert set(asker.asked.values()) == {1}
        assert asker.params[0] == {"max_tokens": 2048, "temperature": 0.0}


async def test_concurrency_is_bounded(tmp_path, tiny):
    suite, questions = tiny
    asker = FakeAsker(questions, lambda q: "A", delay=0.01)
    with Store(tmp_path) as store:
        await Onboarding(store, suite, questions, asker, Options(concurrency=3)).run("m")
    assert asker.peak == 3


async def test_resume_never_asks_a_stored_question_again(tmp_path, tiny):
    suite, questions = tiny
    gold = gold_map(questions)
    first = FakeAsker(questions, lambda q: gold[q], delay=0.005)
    with Store(tmp_path) as store:
        engine = Onboarding(store, suite, questions, first, Options(concurrency=2))
        task = asyncio.create_task(engine.run("m"))
        while len(store.answered("m")) < 5:
            await asyncio.sleep(0.001)
        task.cancel()  # the process dies mid-test
        with pytest.raises(asyncio.CancelledError):
            await task
        stored = store.answered("m")
        assert store.get("m") is None  # no half-finished profile
    with Store(tmp_path) as store:
        second = FakeAsker(questions, lambda q: gold[q])
        progress = await Onboarding(store, suite, questions, second, FAST).run("m")
        assert progress.status == "done"
        assert not stored & set(second.asked)
        assert set(second.asked) | stored == set(gold)
        assert store.get("m") == {t: 1.0 for t in suite.task_ids}


async def test_the_estimated_cost_of_a_resumed_run_is_the_whole_test_s(tmp_path, tiny):
    """Resumed after a restart, the estimate shown beside the spend covered only the questions
    left (0.0587 for the whole test, then 0.0409, then 0.0164 beside 1.0 spent): it is what was
    spent plus the estimate for what is left, as the cap counts it."""
    suite, questions = tiny
    prices = Prices(1.0, 10.0)
    with Store(tmp_path) as store:
        engine = Onboarding(store, suite, questions, FakeAsker(questions, lambda q: "A", delay=0.005),
                            Options(concurrency=2))
        task = asyncio.create_task(engine.run("m", prices))
        while len(store.answered("m")) < 5:
            await asyncio.sleep(0.001)
        assert store.progress("m").estimated_cost == pytest.approx(estimate_cost(questions, prices, FAST),
                                                                   abs=1e-4)
        task.cancel()  # the process stops mid-test
        with pytest.raises(asyncio.CancelledError):
            await task
        spent, done = store.spent("m"), store.answered("m")
    with Store(tmp_path) as store:
        progress = await Onboarding(store, suite, questions, FakeAsker(questions, lambda q: "A"),
                                    FAST).run("m", prices)
    left = [q for q in questions if q.id not in done]
    assert progress.status == "done" and 0 < len(left) < 12
    assert progress.estimated_cost == pytest.approx(spent + estimate_cost(left, prices, FAST), abs=1e-4)


async def test_upstream_down_mid_test_stalls_then_resumes(tmp_path, tiny):
    suite, questions = tiny
    asker = FakeAsker(questions, lambda q: "A", delay=0.002)
    statuses = []
    with Store(tmp_path) as store:
        engine = Onboarding(store, suite, questions, asker, FAST)
        down = [AllUpstreamsFailed("every model failed: m (connection)", failed=[("m", "connection")])
                for _ in range(6)]

        async def watch():
            while True:
                p = store.progress("m")
                if p is not None:
                    statuses.append((p.status, p.reason))
                await asyncio.sleep(0.001)

        watcher = asyncio.create_task(watch())

        async def break_later():
            while len(store.answered("m")) < 3:
                await asyncio.sleep(0.001)
            asker.failures.extend(down)

        breaker = asyncio.create_task(break_later())
        progress = await engine.run("m")
        watcher.cancel()
        await breaker
    assert progress.status == "done" and progress.done == 12
    assert any(s == "stalled" and "connection" in (r or "") for s, r in statuses)
    assert set(asker.asked.values()) == {1}


async def test_model_that_never_answers_fails_with_the_reason(tmp_path, tiny):
    suite, questions = tiny
    asker = FakeAsker(questions, lambda q: "A")
    asker.failures = [ConnectionError("connection refused")] * 10_000
    with Store(tmp_path) as store:
        progress = await Onboarding(store, suite, questions, asker, FAST).run("m")
        assert progress.status == "failed"
        assert "connection refused" in progress.reason and "no answer for" in progress.reason
        assert store.get("m") is None


@pytest.mark.parametrize("fails, takes, said", [
    # each 429 at once, held 20 s or the backoff, whichever is longer: 0, 20, ..., 100, 132
    (lambda: rate_limited(retry_after=20), 0, "no answer for 132s: "),
    # a gateway's 500 after 40 s each (dispatch's attempts): the first failure is seen at 40 s
    (lambda: AllUpstreamsFailed("every model failed: m (http_500)", failed=[("m", "http_500")]), 40,
     "no answer for 167s: "),
], ids=["429s", "slow 500s"])
async def test_a_model_that_never_answers_says_for_how_long_since_the_run_began(tmp_path, tiny, fails, takes, said):
    """It failed 2 minutes after the first failure the run heard of, and said "no answer for
    120s" where nothing had been answered for longer: the time is the run's, from its start. A
    run failed while the upstream held it does not say when it resumes."""
    suite, questions = tiny
    now = [1000.0]

    class Failing(FakeAsker):
        async def ask(self, model, messages, **params):
            now[0] += takes
            raise fails()

    async def sleep(seconds):
        now[0] += seconds
        await asyncio.sleep(0)

    with Store(tmp_path) as store:
        engine = Onboarding(store, suite, questions, Failing(questions, lambda q: "A"),
                            Options(concurrency=1, backoff_s=1, backoff_max_s=60, give_up_s=120))
        engine.clock, engine.sleep = (lambda: now[0]), sleep
        progress = await asyncio.wait_for(engine.run("m"), 10)
    assert progress.status == "failed" and progress.reason.startswith(said), progress.reason
    assert "resuming" not in progress.reason  # it does not


async def test_refused_request_fails_at_once(tmp_path, tiny):
    suite, questions = tiny
    asker = FakeAsker(questions, lambda q: "A")
    asker.failures = [UpstreamClientError("model 'x' not found", status=404)]
    with Store(tmp_path) as store:
        progress = await Onboarding(store, suite, questions, asker, FAST).run("m")
    assert progress.status == "failed" and "not found" in progress.reason


async def test_spend_cap_refuses_before_the_first_question(tmp_path, tiny):
    suite, questions = tiny
    asker = FakeAsker(questions, lambda q: "A")
    prices = Prices(input_per_mtok=10_000.0, output_per_mtok=30_000.0)
    estimate = estimate_cost(questions, prices, FAST)
    assert estimate > 1.0
    opts = Options(concurrency=4, spend_cap_usd=1.0)
    with Store(tmp_path) as store:
        progress = await Onboarding(store, suite, questions, asker, opts).run("m", prices)
        assert progress.status == "failed" and "exceeds the spend cap $1.00" in progress.reason
        assert (progress.done, progress.total) == (0, 12)  # the admin API shows 0 of 12, not 0 of 0
        assert not asker.asked
        roomy = Options(concurrency=4, spend_cap_usd=estimate * 2)
        progress = await Onboarding(store, suite, questions, asker, roomy).run("m", prices)
        assert progress.status == "done"
        assert progress.estimated_cost == pytest.approx(estimate, rel=1e-3)


async def test_spend_cap_is_enforced_while_answers_come_in(tmp_path, tiny):
    suite, questions = tiny
    long = FakeAsker(questions, lambda q: "A")
    prices = Prices(0.0, 1_000_000.0)  # $1 per output token
    opts = Options(concurrency=1, spend_cap_usd=estimate_cost(questions, prices,
                                                            Options(expected_output_tokens=2)) + 1,
                   expected_output_tokens=2)
    with Store(tmp_path) as store:
        progress = await Onboarding(store, suite, questions, long, opts).run("m", prices)
    assert progress.status == "failed" and "spend cap" in progress.reason
    assert 0 < sum(long.asked.values()) < 12


class Poison(FakeAsker):
    """Answers "A" to everything but ``bad_id``, on which it raises ``make_exc()``."""

    def __init__(self, questions, bad_id, make_exc):
        super().__init__(questions, lambda q: "A")
        self.bad_id, self.make_exc, self.bad_asks = bad_id, make_exc, 0

    async def ask(self, model, messages, **params):
        if messages[-1]["content"] != PROBE and self.question_of(messages).id == self.bad_id:
            self.bad_asks += 1
            await asyncio.sleep(0)
            raise self.make_exc()
        return await super().ask(model, messages, **params)


async def test_a_prompt_refused_with_a_4xx_grades_as_no_answer(tmp_path, tiny):
    suite, questions = tiny
    bad = questions[5].id
    asker = Poison(questions, bad, lambda: UpstreamClientError(
        "The response was filtered due to the prompt triggering content management policy",
        status=400))
    with Store(tmp_path) as store:
        progress = await Onboarding(store, suite, questions, asker, FAST).run("m")
        assert progress.status == "done" and progress.done == 12
        assert [(a.letter, a.correct) for a in store.answers("m") if a.question_id == bad] == [
            (None, False)]
    assert asker.bad_asks <= 2  # asked again only when it came before any answer


async def test_a_prompt_flagged_by_a_moderating_provider_grades_as_no_answer(tmp_path, tiny):
    """OpenRouter's 403 for a moderated model's flagged input is about the prompt: one flagged
    question used to fail the whole run (and every retry of it) as a refused key would."""
    suite, questions = tiny
    bad = questions[5].id
    asker = Poison(questions, bad, lambda: UpstreamClientError(
        'openai/gpt-4o requires moderation on OpenRouter. Your input was flagged for "violence".',
        status=403, upstream_body={"error": {"code": 403, "message": "...", "metadata": {
            "reasons": ["violence"], "flagged_input": "...", "provider_name": None}}}))
    with Store(tmp_path) as store:
        progress = await Onboarding(store, suite, questions, asker, FAST).run("m")
        assert progress.status == "done" and progress.done == 12
        assert [(a.letter, a.correct) for a in store.answers("m") if a.question_id == bad] == [
            (None, False)]


@pytest.mark.parametrize("exc", [
    UpstreamClientError("invalid api key", status=401),
    UpstreamClientError("forbidden", status=403),
    UpstreamClientError("The model `gpt-9` does not exist", status=400),
    UpstreamClientError("bad request", status=400,
                        upstream_body={"error": {"code": "model_not_found"}}),
])
async def test_a_4xx_about_the_model_fails_at_once(tmp_path, tiny, exc):
    suite, questions = tiny
    asker = FakeAsker(questions, lambda q: "A")
    asker.failures = [exc]
    with Store(tmp_path) as store:
        progress = await Onboarding(store, suite, questions, asker, FAST).run("m")
    assert progress.status == "failed" and exc.message in progress.reason


async def test_a_4xx_on_every_prompt_fails_without_recording_any(tmp_path, tiny):
    suite, questions = tiny
    asker = FakeAsker(questions, lambda q: "A")
    asker.failures = [UpstreamClientError("max_tokens is too large", status=400)] * 1000
    with Store(tmp_path) as store:
        progress = await Onboarding(store, suite, questions, asker, FAST).run("m")
        assert progress.status == "failed" and "refused 10 requests in a row" in progress.reason
        assert "max_tokens is too large" in progress.reason and not store.answered("m")


async def test_a_question_failing_alone_is_given_up_after_bounded_attempts(tmp_path, tiny, caplog):
    suite, questions = tiny
    bad = questions[5].id
    asker = Poison(questions, bad, lambda: AllUpstreamsFailed(
        "m: HTTP 500: internal error processing this prompt", failed=[("m", "http_500")]))
    with Store(tmp_path) as store:
        progress = await asyncio.wait_for(
            Onboarding(store, suite, questions, asker, FAST).run("m"), 10)
        assert progress.status == "done" and progress.done == 12
        assert [(a.letter, a.correct) for a in store.answers("m") if a.question_id == bad] == [
            (None, False)]
    assert asker.bad_asks == FAST.question_attempts == 5
    assert f"question {bad} failed 5 times" in caplog.text


class Poisons(FakeAsker):
    """Answers "A" to everything but ``bad`` (ids), on which it fails with a 500 every time."""

    def __init__(self, questions, bad):
        super().__init__(questions, lambda q: "A")
        self.bad = set(bad)
        self.bad_asks: dict[str, int] = dict.fromkeys(bad, 0)

    async def ask(self, model, messages, **params):
        if messages[-1]["content"] == PROBE:
            return await self.probe(params)
        q = self.question_of(messages)
        if q.id in self.bad:
            self.bad_asks[q.id] += 1
            await asyncio.sleep(0.001)
            raise AllUpstreamsFailed("m: HTTP 500: cannot template this prompt", failed=[("m", "http_500")])
        return await super().ask(model, messages, **params)


@pytest.mark.parametrize("concurrency", [1, 4])
async def test_two_questions_that_always_fail_are_both_graded_and_the_run_ends(tmp_path, tiny, concurrency):
    """Left last, two such questions failed in turn: each failure had the other's beside it, so
    neither was ever counted against, and the run stayed stalled for ever."""
    suite, questions = tiny
    bad = [questions[3].id, questions[8].id]
    asker = Poisons(questions, bad)
    opts = Options(concurrency=concurrency, backoff_s=0.001, backoff_max_s=0.002, give_up_s=0.2)
    with Store(tmp_path) as store:
        progress = await asyncio.wait_for(Onboarding(store, suite, questions, asker, opts).run(
            "m", Prices(1.0, 2.0)), 10)
        assert progress.status == "done" and progress.done == 12
        assert sorted(a.question_id for a in store.answers("m") if a.letter is None) == sorted(bad)
        assert progress.spent > 0  # the probes' few tokens are counted
    assert all(n <= 2 * opts.question_attempts for n in asker.bad_asks.values()), asker.bad_asks
    assert set(asker.asked.values()) == {1}  # no answered question asked again: a probe tells
    assert asker.probes and all(p["max_tokens"] == PROBE_TOKENS for p in asker.probes)


async def test_a_probe_the_model_refuses_still_says_it_answers(tmp_path, tiny):
    """A model with a thinking budget refuses the probe's few tokens with a 400: that is an
    answer. Taken for an outage, the last question's failures never counted: stalled for ever."""
    suite, questions = tiny
    bad = questions[5].id

    class RefusesProbe(Poisons):
        async def probe(self, params):
            self.probes.append(params)
            raise UpstreamClientError("max_tokens must be greater than thinking.budget_tokens", status=400)

    asker = RefusesProbe(questions, [bad])
    opts = Options(concurrency=2, backoff_s=0.001, backoff_max_s=0.002, give_up_s=0.2)
    with Store(tmp_path) as store:
        progress = await asyncio.wait_for(Onboarding(store, suite, questions, asker, opts).run("m"), 10)
        assert progress.status == "done" and progress.done == 12
    assert asker.bad_asks[bad] == opts.question_attempts and asker.probes


async def test_one_transient_failure_does_not_fail_a_slow_model_whose_answers_are_coming(tmp_path, tiny):
    """A large model on a CPU takes minutes per answer; one 429 past give_up_s, before its first
    answer, is no sign it never answers (only a timeout, an ask that waited all along, is)."""
    suite, questions = tiny
    asker = FakeAsker(questions, lambda q: "A", delay=0.5)  # each answer takes longer than give_up_s
    opts = Options(concurrency=2, backoff_s=0.01, backoff_max_s=0.02, give_up_s=0.3)

    async def one_429_later():
        await asyncio.sleep(0.35)
        asker.failures.append(AllUpstreamsFailed("every model failed: m (http_429)", failed=[("m", "http_429")]))

    with Store(tmp_path) as store:
        blip = asyncio.create_task(one_429_later())
        progress = await asyncio.wait_for(Onboarding(store, suite, questions, asker, opts).run("m"), 20)
        await blip
    assert progress.status == "done" and progress.done == 12


async def test_an_upstream_that_never_answers_is_said_stalled_then_fails_from_the_run_s_start(tmp_path, tiny):
    """It accepts every request and answers none: each ask fails only at its timeout. The run said
    running all along, and failed only give_up_s after that first timeout (30 minutes with the
    router's defaults)."""
    suite, questions = tiny

    class Hung(FakeAsker):
        async def ask(self, model, messages, **params):
            await asyncio.sleep(0.6)  # the ask's timeout
            raise AllUpstreamsFailed("every model failed: m (timeout)", failed=[("m", "timeout")], timeout=True)

    opts = Options(concurrency=2, backoff_s=0.01, backoff_max_s=0.02, give_up_s=0.3, heartbeat_s=0.02)
    statuses = []
    with Store(tmp_path) as store:
        run = asyncio.create_task(Onboarding(store, suite, questions, Hung(questions, lambda q: "A"), opts).run("m"))
        while not run.done():
            stored = store.progress("m")
            statuses.append((stored.status, stored.reason) if stored else None)
            await asyncio.sleep(0.02)
        progress = run.result()
    quiet = [r for s, r in filter(None, statuses) if s == "stalled"]
    assert quiet and "no answer for" in quiet[0] and "2 questions waiting on the upstream" in quiet[0]
    assert progress.status == "failed" and "timeout" in progress.reason  # at its first failure


async def test_an_outage_gives_up_on_no_question(tmp_path, tiny):
    suite, questions = tiny
    gold = gold_map(questions)
    for concurrency in (1, 4):
        asker = FakeAsker(questions, lambda q: gold[q], delay=0.001)
        asker.failures = [ConnectionError("connection refused")] * 40

        async def answer_first():
            # the model answers once, then is down for 40 requests
            asker.failures, held = [], asker.failures
            while not asker.asked:
                await asyncio.sleep(0.001)
            asker.failures = held

        opts = Options(concurrency=concurrency, backoff_s=0.001, backoff_max_s=0.002)
        with Store(tmp_path / str(concurrency)) as store:
            helper = asyncio.create_task(answer_first())
            progress = await Onboarding(store, suite, questions, asker, opts).run("m")
            await helper
            assert progress.status == "done" and progress.accuracy == 1.0
            assert not asker.failures


async def test_one_blip_on_every_request_in_flight_counts_once(tmp_path):
    suite, questions = make_suite(n_tasks=4, per_task=10)
    asker = FakeAsker(questions, lambda q: "A", delay=0.01)
    opts = Options(concurrency=8, backoff_s=0.05, backoff_max_s=10.0)
    with Store(tmp_path) as store:
        engine = Onboarding(store, suite, questions, asker, opts)
        seen = []
        counted = engine._failed

        async def failed(state, *args, **kwargs):
            await counted(state, *args, **kwargs)
            seen.append((state.failures, state.resume_at - engine.clock()))

        engine._failed = failed

        async def blip():  # fails the asks in flight now (a worker may be storing an answer)
            while len(store.answered("m")) < 10 or asker.in_flight < 4:
                await asyncio.sleep(0.001)
            asker.failures = [AllUpstreamsFailed("m: HTTP 503: blip", failed=[("m", "http_503")])
                              for _ in range(asker.in_flight)]
            return len(asker.failures)

        helper = asyncio.create_task(blip())
        progress = await asyncio.wait_for(engine.run("m"), 10)
        blipped = await helper
    assert progress.status == "done"
    assert len(seen) == blipped >= 4
    assert max(f for f, _ in seen) == 1 and max(d for _, d in seen) <= 0.05


async def test_the_spend_cap_holds_across_restarts(tmp_path, tiny):
    suite, questions = tiny
    asker = FakeAsker(questions, lambda q: "A")
    prices = Prices(0.0, 1_000_000.0)  # $1 per output token; answers are longer than expected
    cap = estimate_cost(questions, prices, Options(expected_output_tokens=2)) + 1
    opts = Options(concurrency=1, expected_output_tokens=2, spend_cap_usd=cap)
    with Store(tmp_path) as store:
        progress = await Onboarding(store, suite, questions, asker, opts).run("m", prices)
    assert progress.status == "failed" and "reached after" in progress.reason
    assert progress.spent > cap and progress.to_json()["spent_usd"] > cap
    paid = sum(asker.asked.values())
    assert 0 < paid < 12
    for _ in range(3):  # each a fresh process: the cap is already spent, nothing is asked
        with Store(tmp_path) as store:
            progress = await Onboarding(store, suite, questions, asker, opts).run("m", prices)
        assert progress.status == "failed"
        assert "already spent exceeds the spend cap" in progress.reason
    assert sum(asker.asked.values()) == paid


async def test_the_spend_cap_holds_across_edits_of_the_upstream(tmp_path, tiny, caplog):
    """api_base edited back and forth (127.0.0.1, localhost: another upstream each time) forgot the
    spend with the answers, and each run spent the cap again: the spend is kept, and said so."""
    suite, questions = tiny
    asker = FakeAsker(questions, lambda q: "A")
    prices = Prices(0.0, 1_000_000.0)
    cap = estimate_cost(questions, prices, Options(expected_output_tokens=2)) + 1
    opts = Options(concurrency=1, expected_output_tokens=2, spend_cap_usd=cap)
    with Store(tmp_path) as store:
        progress = await Onboarding(store, suite, questions, asker, opts).run("m", prices, upstream="a")
        assert progress.status == "failed" and "reached after" in progress.reason
        paid, spent = sum(asker.asked.values()), progress.spent
        for upstream in ("b", "a", "b"):
            progress = await Onboarding(store, suite, questions, asker, opts).run("m", prices,
                                                                                  upstream=upstream)
            assert progress.status == "failed" and progress.done == 0
            assert f"plus ${spent:.2f} already spent (${spent:.2f} of it on answers forgotten when it " \
                   "pointed at another upstream) exceeds the spend cap" in progress.reason
            assert progress.to_json()["spent_forgotten_usd"] == progress.to_json()["spent_usd"] > cap
    assert sum(asker.asked.values()) == paid
    assert f"forgotten; the ${spent:.2f} spent on it is kept, and counts against the spend cap" in caplog.text


async def test_answers_of_another_upstream_are_forgotten(tmp_path, tiny, caplog):
    suite, questions = tiny
    gold = gold_map(questions)
    with Store(tmp_path) as store:
        await Onboarding(store, suite, questions, FakeAsker(questions, lambda q: "A"),
                         FAST).run("m", upstream="tiny")
        assert store.progress("m").status == "done"
        right = FakeAsker(questions, lambda q: gold[q])
        progress = await Onboarding(store, suite, questions, right, FAST).run("m", upstream="tiny")
        assert not right.asked  # same upstream: nothing asked again
        progress = await Onboarding(store, suite, questions, right, FAST).run("m", upstream="big")
        assert progress.status == "done" and progress.accuracy == 1.0
        assert sum(right.asked.values()) == 12
        # the line the docs quote, word for word, whichever side noticed the edit
        assert ("onboarding m: its upstream changed; its answers and profile were forgotten; "
                "onboarding it again") in caplog.text  # nothing spent (no prices): nothing kept


async def test_answers_kept_from_another_suite_are_not_progress_on_this_one(tmp_path):
    """A model onboarded on one suite and then on another keeps its old answers (they are not
    thrown away), but they count neither as questions done nor in the accuracy so far."""
    from dataclasses import replace

    from scorer.aptitude import Suite, Task

    old_questions = [replace(q, id=f"old/{q.id}") for q in make_suite(n_tasks=2, per_task=3)[1]]
    old_suite = Suite("old", 1, (Task("t", ("a", "b", "c", "d", "e"), tuple(q.id for q in old_questions)),))
    new_suite, new_questions = make_suite(n_tasks=3, per_task=4)
    with Store(tmp_path) as store:
        asker = FakeAsker(old_questions, lambda q: "A")  # wrong on some of the old questions
        await Onboarding(store, old_suite, old_questions, asker, FAST).run("m")
        kept = len(store.answered("m"))
        assert kept == len(old_questions) > 0
        gold = gold_map(new_questions)
        engine = Onboarding(store, new_suite, new_questions, FakeAsker(new_questions, lambda q: gold[q]), FAST)
        progress = await engine.run("m")
        assert progress.status == "done" and (progress.done, progress.total) == (12, 12)
        assert progress.accuracy == 1.0
        assert len(store.answered("m")) == 12 + kept  # nothing lost
        assert store.progress("m").done == 12 + kept  # unfiltered: every stored answer


async def test_a_run_leaves_a_model_another_process_onboards(tmp_path, tiny):
    suite, questions = tiny
    asker = FakeAsker(questions, lambda q: "A")
    with Store(tmp_path) as store, Store(tmp_path) as other:
        other.begin("m", suite.name, 12, upstream="fp")
        with pytest.raises(ModelBusy) as busy:
            await Onboarding(store, suite, questions, asker, FAST).run("m", upstream="other-fp")
        assert busy.value.owner == other.owner
        assert not asker.asked and not store.answered("m")  # nothing asked, nothing forgotten
        assert store.progress("m").status == "running" and not store.upstream_changed("m", "fp")


async def test_the_lease_is_held_while_the_run_lasts_and_released_however_it_ends(tmp_path, tiny):
    suite, questions = tiny
    opts = Options(concurrency=1, heartbeat_s=0.02, backoff_s=0.01, give_up_s=0.2)
    with Store(tmp_path) as store, Store(tmp_path, lease_stale_s=0.1) as other:
        slow = FakeAsker(questions, lambda q: "A", delay=0.03)  # 12 x 0.03 s: past the staleness
        run = asyncio.create_task(Onboarding(store, suite, questions, slow, opts).run("m"))
        while not store.answered("m"):
            await asyncio.sleep(0.005)
        while len(store.answered("m")) < 6:
            with pytest.raises(ModelBusy):  # kept fresh by the heartbeat
                other.claim("m")
            await asyncio.sleep(0.01)
        assert (await run).status == "done"
        other.claim("m")  # done: released
        other.release("m")
        store.forget("m")
        asker = FakeAsker(questions, lambda q: "A", delay=0.01)
        run = asyncio.create_task(Onboarding(store, suite, questions, asker, opts).run("m"))
        while not store.answered("m"):
            await asyncio.sleep(0.005)
        run.cancel()  # the proxy stops
        with pytest.raises(asyncio.CancelledError):
            await run
        other.claim("m")
        other.release("m")
        down = FakeAsker(questions, lambda q: "A")
        down.failures = [UpstreamClientError("invalid api key", status=401)]
        assert (await Onboarding(store, suite, questions, down, opts).run("m")).status == "failed"
        other.claim("m")


async def test_an_answer_the_store_refuses_to_write_is_tried_again_not_lost(tmp_path, tiny):
    """A write refused past the busy timeout (another process held the lock) stalls the run and
    is tried again: every answer paid for is stored, none is asked twice, the run does not fail."""
    suite, questions = tiny
    asker = FakeAsker(questions, lambda q: "A")
    with Store(tmp_path) as store:
        record, set_status, statuses, calls = store.record, store.set_status, [], []

        def refusing(*args, **kwargs):
            calls.append(args)
            if 3 <= len(calls) <= 5:
                raise sqlite3.OperationalError("database is locked")
            return record(*args, **kwargs)

        store.record = refusing
        store.set_status = lambda model, status, reason=None, **kw: (
            statuses.append((status, reason)), set_status(model, status, reason, **kw))
        progress = await Onboarding(store, suite, questions, asker, FAST).run("m")
        assert progress.status == "done" and progress.done == 12
        assert set(asker.asked.values()) == {1} and sum(asker.asked.values()) == 12
        assert ("stalled", "the state store refuses writes: database is locked") in statuses
        assert statuses[-1] == ("running", None)  # and it went on


async def test_a_stall_of_the_store_while_grading_a_refused_prompt_ends_at_the_next_answer(tmp_path, tiny):
    """The write of a prompt's no-answer, refused by the store for a while, said stalled; the
    answers after it were stored at once, and the run said stalled until it was done."""
    suite, questions = tiny
    asker = Poison(questions, questions[5].id, lambda: UpstreamClientError("content filter", status=400))
    asker.delay = 0.005
    with Store(tmp_path) as store:
        record, set_status, statuses, refused = store.record, store.set_status, [], []

        def refusing(model, graded, *args, **kwargs):
            if graded.text is None and not refused:  # the no-answer, the first time
                refused.append(graded)
                raise sqlite3.OperationalError("database is locked")
            return record(model, graded, *args, **kwargs)

        store.record = refusing
        store.set_status = lambda model, status, reason=None, **kw: (
            statuses.append((status, reason)), set_status(model, status, reason, **kw))
        progress = await Onboarding(store, suite, questions, asker, FAST).run("m")
    assert progress.status == "done" and refused
    assert ("stalled", "the state store refuses writes: database is locked") in statuses
    assert statuses[-1] == ("running", None)


async def test_a_model_that_refuses_max_tokens_or_temperature_is_asked_as_it_takes_them(tmp_path, tiny):
    """OpenAI's reasoning models refuse max_tokens (they take max_completion_tokens) and any
    temperature but their default: the run asks as the model takes it, grading no prompt wrong."""
    suite, questions = tiny
    gold = gold_map(questions)

    class Reasoning(FakeAsker):
        async def ask(self, model, messages, **params):
            if "max_tokens" in params:
                raise UpstreamClientError("Unsupported parameter: 'max_tokens' is not supported with this "
                                          "model. Use 'max_completion_tokens' instead.", status=400)
            if "temperature" in params:
                raise UpstreamClientError("Unsupported value: 'temperature' does not support 0 with this "
                                          "model. Only the default (1) value is supported.", status=400)
            return await super().ask(model, messages, **params)

    asker = Reasoning(questions, lambda q: gold[q])
    with Store(tmp_path) as store:
        progress = await Onboarding(store, suite, questions, asker, FAST).run("o-model")
        assert progress.status == "done" and progress.accuracy == 1.0
    assert set(asker.asked.values()) == {1}
    assert all(p == {"max_completion_tokens": 2048} for p in asker.params)


@pytest.mark.parametrize("refusal", [
    # litellm refuses before sending, in its own words per model family
    UpstreamClientError("model o cannot take the parameters ['temperature']: its provider does not "
                        "support them (O-series models don't support temperature=0.0. Only "
                        "temperature=1 is supported.)", status=400, unfit="unsupported_params"),
    # Anthropic's own answers
    UpstreamClientError("`temperature` is deprecated for this model.", status=400),
    UpstreamClientError("temperature may only be set to 1 when thinking is enabled.", status=400),
])
async def test_every_wording_of_a_refused_temperature_leaves_it_to_the_model(tmp_path, tiny, refusal):
    suite, questions = tiny
    gold = gold_map(questions)

    class NoTemperature(FakeAsker):
        async def ask(self, model, messages, **params):
            if "temperature" in params:
                raise refusal
            return await super().ask(model, messages, **params)

    asker = NoTemperature(questions, lambda q: gold[q])
    with Store(tmp_path) as store:
        progress = await Onboarding(store, suite, questions, asker, FAST).run("m")
        assert progress.status == "done" and progress.accuracy == 1.0
    assert asker.params[-1] == {"max_tokens": 2048}


async def test_a_parameter_the_run_cannot_drop_fails_at_once_naming_it(tmp_path, tiny):
    """Refused before anything is sent, for every question alike: no '10 requests in a row'."""
    suite, questions = tiny
    asker = FakeAsker(questions, lambda q: "A")
    asker.failures = [UpstreamClientError("model m cannot take the parameters ['max_completion_tokens']",
                                          status=400, unfit="unsupported_params")] * 50
    with Store(tmp_path) as store:
        progress = await Onboarding(store, suite, questions, asker, FAST).run("m")
    assert progress.status == "failed" and progress.done == 0
    assert progress.reason.startswith("the model cannot take the run's parameters: ")
    assert "['max_completion_tokens']" in progress.reason and len(asker.params) <= FAST.concurrency


async def test_a_question_litellm_cannot_send_is_graded_no_answer_not_the_end_of_the_run(tmp_path, tiny):
    """One question's text litellm could not translate for the provider is that question's
    problem: the run goes on."""
    suite, questions = tiny
    asker = FakeAsker(questions, lambda q: "A")
    asker.failures = [UpstreamClientError("model m cannot take this request: litellm could not translate it",
                                          status=400, unfit="untranslatable")]
    with Store(tmp_path) as store:
        progress = await Onboarding(store, suite, questions, asker, FAST).run("m")
    assert progress.status == "done" and progress.done == len(questions)


@pytest.mark.parametrize("usage, billed", [
    ((100, 3000, None), lambda est_in, est_out: (max(100, est_in), 3000)),  # hidden reasoning tokens
    ((100, 0, 3100), lambda est_in, est_out: (max(100, est_in), 3000)),  # counted in the total only
    ((0, 0, 0), lambda est_in, est_out: (est_in, est_out)),  # zero-filled (litellm, no usage sent)
    ((None, None, None), lambda est_in, est_out: (est_in, est_out)),  # none reported
])
async def test_spend_counts_what_the_upstream_billed_and_never_less_than_the_estimate(
        tmp_path, tiny, usage, billed):
    from proxy.onboarding import Said, prompt_tokens
    from proxy.routing import approx_tokens

    suite, questions = tiny

    class Billed(FakeAsker):
        async def ask(self, model, messages, **params):
            return Said(await super().ask(model, messages, **params), *usage)

    prices = Prices(1.0, 10.0)
    answer = "Thinking about it... The answer is (A)."
    expected = sum(prices.cost(*billed(prompt_tokens(q), approx_tokens(answer))) for q in questions)
    with Store(tmp_path) as store:
        await Onboarding(store, suite, questions, Billed(questions, lambda q: "A"), FAST).run("m", prices)
        assert store.spent("m") == pytest.approx(expected) and expected > 0


async def test_reasoning_and_a_cut_off_answer_count_when_no_usage_says_what_was_billed(tmp_path, tiny):
    """A reasoning model's upstream that sends no usage: the reasoning returned beside the answer
    (``reasoning_content``, 2,000 tokens) counts as its text does, and an answer cut off at
    max_tokens, its reasoning not returned, counts the whole budget."""
    from proxy.onboarding import Said
    from proxy.routing import approx_tokens

    suite, questions = tiny
    asker = FakeAsker(questions, lambda q: "A")
    text = "Thinking about it... The answer is (A)."
    asker.answers[questions[0].id] = Said(text, reasoning="x" * 8000)
    asker.answers[questions[1].id] = Said("", cut_off=True)
    prices = Prices(0.0, 1.0)
    with Store(tmp_path) as store:
        await Onboarding(store, suite, questions, asker, FAST).run("m", prices)
        assert store.spent("m") == pytest.approx(prices.cost(0, 11 * approx_tokens(text) + 2000 + 2048))


def timed_out(attempts: int | None) -> AllUpstreamsFailed:
    """An ask that timed out, after ``attempts`` billed with no answer back (None: not counted by
    the asker)."""
    exc = AllUpstreamsFailed("every model failed: m (timeout)", failed=[("m", "timeout")], timeout=True)
    exc.unanswered = attempts
    return exc


async def test_attempts_sent_and_not_answered_count_for_the_spend(tmp_path, tiny):
    """A provider bills what it generated for an ask that timed out (dispatch's retries too): each
    such attempt counts its prompt and the whole answer budget, stored as the answers' spend is; an
    attempt refused before any generation (a 429, a connection never made) costs nothing."""
    from proxy.onboarding import Said
    from proxy.routing import approx_tokens

    suite, questions = tiny
    asker = FakeAsker(questions, lambda q: "A")
    # two timed out in dispatch, none sent, one bare timeout (an asker that does not count: one)
    asker.failures = [timed_out(2), timed_out(0), TimeoutError("read timed out")]
    asker.answers[questions[-1].id] = Said("The answer is (A).", unanswered=1)  # retried, then answered
    prices = Prices(0.0, 1.0)  # output only: the prompts' lengths aside
    answers = (11 * approx_tokens("Thinking about it... The answer is (A).")
               + approx_tokens("The answer is (A)."))
    with Store(tmp_path) as store:
        progress = await Onboarding(store, suite, questions, asker, FAST).run("m", prices)
    assert progress.status == "done"
    with Store(tmp_path) as store:  # stored: a restart counts it too
        assert store.spent("m") == pytest.approx(prices.cost(0, answers + (2 + 1 + 1) * 2048))


async def test_the_spend_cap_stops_a_run_whose_asks_time_out(tmp_path, tiny):
    """Answers that come cost little, asks that time out were paid in full: the cap counts them."""
    suite, questions = tiny
    asker = FakeAsker(questions, lambda q: "A")
    asker.failures = [timed_out(1)] * 3
    prices = Prices(0.0, 1_000.0)  # an unanswered attempt: 2048 tokens, $2.05
    opts = Options(concurrency=1, backoff_s=0.01, backoff_max_s=0.02, spend_cap_usd=5.0)
    assert estimate_cost(questions, prices, opts) < 5.0
    with Store(tmp_path) as store:
        progress = await Onboarding(store, suite, questions, asker, opts).run("m", prices)
    assert progress.status == "failed" and "spend cap $5.00 reached after $6.1" in progress.reason
    assert progress.spent > 6.0


class CutAsker(FakeAsker):
    """Each ask cut by a cancellation says it sent ``told`` attempts with no answer back (None:
    says nothing)."""

    def __init__(self, questions, told: int | None):
        super().__init__(questions, lambda q: "A", delay=30)
        self.told = told

    async def ask(self, model, messages, **params):
        try:
            return await super().ask(model, messages, **params)
        except asyncio.CancelledError as exc:
            if self.told is not None:
                exc.unanswered = self.told
            raise


@pytest.mark.parametrize("told, counted", [(None, 1), (2, 2), (0, 0)])
async def test_asks_a_stopped_run_cut_count_for_the_spend(tmp_path, tiny, told, counted):
    """A run stopped with questions out (its model left providers.yaml or changed upstream, the
    proxy's stop, a signal) stored no spend for them, though the upstream had them and bills them:
    each counts its attempts sent (as the asker says; one, the ask out, where it says nothing) at
    the whole answer budget, stored before the run stops, which stops as it did."""
    suite, questions = tiny
    asker = CutAsker(questions, told)
    prices = Prices(0.0, 1.0)  # output only: the prompts' lengths aside
    with Store(tmp_path) as store:
        task = asyncio.create_task(Onboarding(store, suite, questions, asker,
                                              Options(concurrency=3)).run("m", prices))
        await wait_until(lambda: asker.in_flight == 3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
        progress = store.progress("m")
    assert progress.status == "pending" and progress.reason == "interrupted" and progress.done == 0
    assert progress.spent == pytest.approx(prices.cost(0, 3 * counted * 2048))


async def test_a_stopped_run_whose_cut_asks_the_store_refuses_still_stops_at_once(tmp_path, tiny, caplog):
    """Their spend is written once, not tried again with backoff as an answer is: the run must
    stop (the proxy's stop waits for it). What could not be stored is logged."""
    suite, questions = tiny
    asker = CutAsker(questions, None)
    with Store(tmp_path) as store:
        def refusing(*args, **kwargs):
            raise sqlite3.OperationalError("database is locked")

        store.add_spend = refusing
        task = asyncio.create_task(Onboarding(store, suite, questions, asker, FAST).run("m", Prices(0.0, 1.0)))
        await wait_until(lambda: asker.in_flight == 4)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
        progress = store.progress("m")
        assert progress.status == "pending" and progress.owner is None and progress.spent == 0
    assert "cannot store the $0.0020 its asks cut by the stop may have cost: database is locked" in caplog.text


@pytest.mark.parametrize("status", [429, 503])
async def test_no_question_is_asked_again_before_the_upstream_s_retry_after(tmp_path, tiny, caplog, status):
    caplog.set_level(logging.INFO, logger="satroute.onboarding")
    suite, questions = tiny
    limited = AllUpstreamsFailed(f"every model failed: m (http_{status})", failed=[("m", f"http_{status}")])
    if status == 429:  # every failure a 429: the client is told too
        limited.retry_after = 0.5
    limited.upstream_retry_after = 0.5  # a 503's says when as well
    asker = FakeAsker(questions, lambda q: "A")
    asker.failures = [limited]
    times = []
    real_ask = asker.ask

    async def ask(model, messages, **params):
        times.append(asyncio.get_running_loop().time())
        return await real_ask(model, messages, **params)

    asker.ask = ask
    with Store(tmp_path) as store:
        progress = await Onboarding(store, suite, questions, asker,
                                    Options(concurrency=1, backoff_s=0.01, backoff_max_s=5)).run("m")
    assert progress.status == "done"
    assert times[1] - times[0] >= 0.5  # not the 0.01 s backoff
    # and said so, once, with the hold's end: at info, a named wait kept by itself is routine
    [held] = [r for r in caplog.records if r.name == "satroute.onboarding" and " held: " in r.getMessage()]
    assert held.levelname == "INFO" and "asked to wait 0.5s (Retry-After); resuming at " in held.getMessage()
    assert "stalled (" not in caplog.text


def rate_limited(model="m", retry_after=None):
    """What dispatch raises for an ask the upstream rate-limited (``Call.paced``: at once)."""
    exc = AllUpstreamsFailed(f"every model failed: {model} (http_429)", failed=[(model, "http_429")])
    exc.retry_after = exc.upstream_retry_after = retry_after
    exc.slow_down = True
    return exc


class Timed(FakeAsker):
    """Records when each question is sent, how many are in flight then and to which model
    (``sent``), and when each failure comes back (``failed_at``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sent: list[tuple[float, int, str]] = []
        self.failed_at: list[float] = []

    async def ask(self, model, messages, **params):
        loop = asyncio.get_running_loop()
        self.sent.append((loop.time(), self.in_flight + 1, model))
        try:
            return await super().ask(model, messages, **params)
        except Exception:
            self.failed_at.append(loop.time())
            raise


async def test_after_a_rate_limit_fewer_questions_go_at_once_growing_back_as_answers_come(tmp_path):
    """The questions held for a rate limit went again all at once when the hold ended, and met
    the limit again in lockstep: half as many go, and one more for each round of answers."""
    suite, questions = make_suite(n_tasks=4, per_task=10)
    asker = Timed(questions, lambda q: "A", delay=0.02)
    asker.failures = [rate_limited(retry_after=0.1)]
    with Store(tmp_path) as store:
        progress = await Onboarding(store, suite, questions, asker,
                                    Options(concurrency=4, backoff_s=0.01, backoff_max_s=5)).run("m")
    assert progress.status == "done"
    after = [(at, n) for at, n, _ in asker.sent if at >= asker.failed_at[0]]
    assert after[0][0] >= asker.failed_at[0] + 0.09  # none before the hold ended
    after = [n for _, n in after]
    assert max(after[:4]) == 2  # half of the 4 at first
    assert max(after) == 4  # and all of them again once answers came


async def test_models_on_one_provider_account_share_its_holds_and_its_questions_in_flight(tmp_path):
    """Three models on one provider, each with its own concurrency and hold, had up to three times
    as many questions out as one, and went on asking while the provider had told a sibling to
    wait: a run's ``account`` is shared by the runs on the same one."""
    suite, questions = make_suite(n_tasks=4, per_task=5)
    asker = Timed(questions, lambda q: "A", delay=0.02)
    asker.failures = [rate_limited(retry_after=0.2)]
    opts = Options(concurrency=3, backoff_s=0.01, backoff_max_s=5)
    with Store(tmp_path) as store:
        engine = Onboarding(store, suite, questions, asker, opts)
        done = await asyncio.gather(*(engine.run(m, account="one") for m in ("m1", "m2", "m3")))
        assert {p.status for p in done} == {"done"}
        assert asker.peak == 3  # over the three models together
        told = asker.failed_at[0]
        assert not [(at, m) for at, _, m in asker.sent if told < at < told + 0.19]  # no model asked
        apart = await asyncio.gather(*(engine.run(m, account=m) for m in ("m4", "m5")))
        assert {p.status for p in apart} == {"done"} and asker.peak == 6  # two accounts: 3 each


async def test_models_on_one_account_are_onboarded_one_after_another_not_all_together(tmp_path):
    """The account's places went round every run in turn: ten models on one key were each half
    done at half time and all became routable only near the end (the first after 343 s of 425).
    The run begun first is served first; one that cannot ask now (its backoff) holds no one back."""
    suite, questions = make_suite(n_tasks=2, per_task=6)
    asker = Timed(questions, lambda q: "A", delay=0.01)
    opts = Options(concurrency=3, backoff_s=0.05, backoff_max_s=0.05)
    with Store(tmp_path) as store:
        engine = Onboarding(store, suite, questions, asker, opts)
        finished: list[str] = []

        async def run(m):
            progress = await engine.run(m, account="one")
            finished.append(m)
            return progress

        done = await asyncio.gather(*(run(m) for m in ("m1", "m2", "m3")))
        n = len(questions)
        sent = [m for _, _, m in asker.sent]
        began = list(dict.fromkeys(sent))  # the order the runs began asking (their store reads race)
        assert sorted(began) == ["m1", "m2", "m3"] and sent == [m for m in began for _ in range(n)]
        assert {p.status for p in done} == {"done"} and finished == began
        assert asker.peak == 3  # the places were all used all along
        # m1 fails once, its backoff lets m2 ask meanwhile; m1 has the turn again after it
        asker.sent.clear()
        asker.failures = [TimeoutError("slow")]
        done = await asyncio.gather(*(engine.run(m, account="two") for m in ("m4", "m5")))
        assert {p.status for p in done} == {"done"}
        order = [m for _, _, m in asker.sent]
        first_m5 = order.index("m5")
        assert first_m5 < len(order) - n  # m5 was not kept waiting through m4's backoff
        assert "m4" in order[first_m5:]


async def test_a_run_the_upstream_holds_says_stalled_until_the_hold_is_over(tmp_path, caplog):
    """An answer that came during the hold (its question sent before) said "running", reason
    null, for the rest of a 57 s Retry-After with nothing in flight: the run stays stalled, saying
    why and until when, and so does a run of another model on the same provider account. The log
    says each run's hold once, and its end, at info: a named wait kept by itself is routine."""
    caplog.set_level(logging.INFO, logger="satroute.onboarding")
    suite, questions = make_suite(n_tasks=3, per_task=4)

    class LimitedOnce(FakeAsker):  # m1's first question is rate limited, the others answered
        told_at = None
        limited = False

        async def ask(self, model, messages, **params):
            if model == "m1" and not self.limited:
                self.limited = True
                await asyncio.sleep(0.01)
                self.told_at = asyncio.get_running_loop().time()
                raise rate_limited("m1", retry_after=0.4)
            return await super().ask(model, messages, **params)

    asker = LimitedOnce(questions, lambda q: "A", delay=0.03)
    seen = {"m1": [], "m2": []}
    with Store(tmp_path) as store:
        async def watch():
            while True:
                for m, statuses in seen.items():
                    p = store.progress(m)
                    if p is not None:
                        statuses.append((asyncio.get_running_loop().time(), p.status, p.reason))
                await asyncio.sleep(0.01)

        watcher = asyncio.create_task(watch())
        engine = Onboarding(store, suite, questions, asker, Options(concurrency=4, backoff_s=0.01))
        first = asyncio.create_task(engine.run("m1", account="one"))
        await wait_until(lambda: asker.in_flight == 3)  # m1's other questions are out
        done = await asyncio.gather(first, engine.run("m2", account="one"))
        watcher.cancel()
    assert {p.status for p in done} == {"done"}
    end = asker.told_at + 0.4
    for m, statuses in seen.items():
        during = [(status, reason) for at, status, reason in statuses if asker.told_at + 0.05 < at < end - 0.05]
        assert during and all(status == "stalled" for status, _ in during), (m, during)
        assert all("asked to wait 0.4s (Retry-After)" in reason and "; resuming at 20" in reason
                   for _, reason in during)
        told = " when asked for m1, another model on its provider account"
        assert all((told in reason) == (m == "m2") for _, reason in during)
        assert ("running", None) in [(status, reason) for at, status, reason in statuses if at > end]
        said = [(r.levelname, r.getMessage()) for r in caplog.records
                if r.name == "satroute.onboarding" and r.getMessage().startswith(f"onboarding {m}")]
        held = [text for _, text in said if " held: " in text]
        assert len(held) == 1 and (told in held[0]) == (m == "m2"), said
        assert f"onboarding {m}: the upstream's hold is over, resuming" in [text for _, text in said]
        assert all(level == "INFO" for level, _ in said), said


async def test_a_held_run_says_when_it_resumes_its_own_backoff_included(tmp_path, tiny):
    """The upstream asked to wait 20 s, and the run's own backoff after its failures is 60 s:
    it resumes in 60 s, and says so."""
    import datetime

    suite, questions = tiny
    now = [1000.0]

    async def sleep(seconds):
        now[0] += seconds
        await asyncio.sleep(0)

    asker = FakeAsker(questions, lambda q: "A")
    asker.failures = [rate_limited(retry_after=20)]
    with Store(tmp_path) as store:
        set_status, said = store.set_status, []
        store.set_status = lambda model, status, reason=None, **kw: (
            said.append((time.time(), status, reason)), set_status(model, status, reason, **kw))
        engine = Onboarding(store, suite, questions, asker,
                            Options(concurrency=1, backoff_s=60, backoff_max_s=60))
        engine.clock, engine.sleep = (lambda: now[0]), sleep
        assert (await asyncio.wait_for(engine.run("m"), 10)).status == "done"
    at, status, reason = said[0]
    assert status == "stalled" and "the upstream asked to wait 20s (Retry-After); resuming at " in reason
    resumes = datetime.datetime.strptime(reason.rpartition(" at ")[2], "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()
    assert at + 58 < resumes < at + 61
    assert said[1][1:] == ("running", None)


async def test_a_stall_is_logged_when_it_begins(tmp_path, tiny, caplog):
    from proxy.errors import UpstreamTransient

    suite, questions = tiny
    asker = FakeAsker(questions, lambda q: "A")
    asker.failures = [UpstreamTransient("m: HTTP 503: overloaded", model="m", status=503)]
    with Store(tmp_path) as store:
        assert (await Onboarding(store, suite, questions, asker, FAST).run("m")).status == "done"
    assert "onboarding m stalled (1 failures): UpstreamTransient: m: HTTP 503: overloaded" in caplog.text


async def test_answers_cut_off_at_max_tokens_are_graded_wrong_and_said_so(tmp_path, tiny, caplog):
    """A reasoning model that spends its budget thinking gives no answer (finish_reason "length"):
    graded wrong as MMLU-Pro's harness does, but the profile may then understate it, which the admin
    must be told, in the log and in the status's reason."""
    import logging

    from proxy.onboarding import Said

    suite, questions = tiny
    cut = {q.id for q in questions[:2]}
    thinker = FakeAsker(questions, lambda q: "A")
    thinker.answers = dict.fromkeys(cut, Said("Let me think about each option in turn. First,", cut_off=True))

    caplog.set_level(logging.WARNING, logger="satroute.onboarding")
    with Store(tmp_path) as store:
        progress = await Onboarding(store, suite, questions, thinker,
                                    Options(concurrency=1, max_tokens=512)).run("m", Prices())
        assert progress.status == "done"
        assert progress.reason.startswith(f"2 of {len(questions)} answers of this run were cut off at "
                                          "max_tokens=512 before they stated a letter (graded wrong; ")
        graded = store.graded("m")
        assert not any(graded[q] for q in cut)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and "SATROUTE_ONBOARDING_MAX_TOKENS" in warnings[0]
    assert "SATROUTE_ONBOARDING_MAX_TOKENS" in warnings[1] and "2 of" in warnings[1]


async def test_an_answer_that_came_back_only_as_reasoning_is_graded_from_it_and_said(tmp_path, tiny, caplog):
    """vLLM's reasoning parser gives content null, and the whole text as reasoning_content, when
    a model never closes its thinking (finish_reason stop): every answer was graded empty, the
    profile all zeros, and the run said done with no reason and no warning."""
    import logging

    from proxy.onboarding import Said

    suite, questions = tiny
    thinker = FakeAsker(questions, lambda q: "A")
    def trace(q):  # a trace tries a letter before it settles on another
        wrong = "B" if q.answer != "B" else "C"
        return (f"<think>At first glance the answer is ({wrong})? Wait, no: option {q.answer} fits best."
                f"\n**Final Answer**\nThe answer is ({q.answer}).")

    thinker.answers = {q.id: Said("", reasoning=trace(q)) for q in questions}
    thinker.answers[questions[2].id] = Said("", reasoning=f"<|channel|>analysis<|message|>so the answer is "
                                                            f"({questions[2].answer})<|end|>")  # harmony
    thinker.answers[questions[0].id] = Said("", reasoning="I am not sure.", cut_off=True)  # not this
    caplog.set_level(logging.WARNING, logger="satroute.onboarding")
    with Store(tmp_path) as store:
        progress = await Onboarding(store, suite, questions, thinker,
                                    Options(concurrency=1)).run("m", Prices())
        assert progress.status == "done"
        graded = store.graded("m")
        assert sum(graded.values()) == len(questions) - 1 and not graded[questions[0].id]
        assert f"{len(questions) - 1} of {len(questions)} answers of this run came back with empty content" \
            in progress.reason
        assert await Onboarding(store, suite, questions, thinker, Options()).regrade("m") == 0  # as stored
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("graded from the reasoning" in w for w in warnings) == 1


async def test_answers_stored_empty_are_said_when_the_run_ends(tmp_path, tiny):
    """Before answers came back as reasoning only were graded from it, they were stored empty: the
    profile all zeros, and nothing said. A run that ends on such a store says so, and how to ask
    them again."""
    suite, questions = tiny
    with Store(tmp_path) as store:
        for q in questions[:-1]:  # as the version before stored them
            store.record("m", GradedAnswer(q.id, None, False, ""))
        progress = await Onboarding(store, suite, questions, FakeAsker(questions, lambda q: "A"),
                                    Options(concurrency=1)).run("m", Prices())
    assert progress.status == "done"
    assert f"{len(questions) - 1} of its {len(questions)} stored answers are empty" in progress.reason
    assert "satroute onboard --restart" in progress.reason


async def test_a_model_that_often_states_no_letter_in_the_graded_form_is_flagged(tmp_path, tiny):
    """Asked zero-shot, a chat model may answer "**Answer: B**", which MMLU-Pro's rule (and so the
    zoo's recorded outcomes) counts as no answer: above NO_LETTER_SHARE of answers the status says so."""
    suite, questions = tiny
    bold = FakeAsker(questions, lambda q: "A")
    bold.answers = {q.id: "**Answer: A**" for q in questions[:4]}

    with Store(tmp_path) as store:
        progress = await Onboarding(store, suite, questions, bold, FAST).run("m", Prices())
    assert progress.status == "done"
    assert progress.reason == (f"4 of its {len(questions)} answers stated no letter as 'the answer is (X)' "
                               "(graded wrong), more than any zoo model whose answers are recorded (9% to "
                               "23%): its profile may understate it")


async def test_answers_the_content_filter_withheld_are_said_so_not_blamed_on_their_form(tmp_path, tiny):
    """Gemini's safety blocks (finish_reason content_filter) are graded wrong; the status used to
    say the model answered in a form the grading does not read, which it never did."""
    from proxy.onboarding import Said

    suite, questions = tiny
    blocked = FakeAsker(questions, lambda q: "A")
    blocked.answers = {q.id: Said("", filtered=True) for q in questions[:4]}
    with Store(tmp_path) as store:
        progress = await Onboarding(store, suite, questions, blocked, FAST).run("m", Prices())
        assert sum(store.graded("m").values()) <= len(questions) - 4
    assert progress.status == "done"
    assert progress.reason == (f"4 of {len(questions)} answers of this run were withheld by the provider's "
                               "content filter (finish_reason content_filter; graded wrong)")


async def test_answers_withheld_in_an_earlier_run_are_not_blamed_on_their_form_either(tmp_path):
    """A resumed run counts every stored answer: 12 of 30 withheld by a content filter in the run
    that was interrupted read as 12 answers that stated no letter."""
    from proxy.store import GradedAnswer

    suite, questions = make_suite(3, 10)
    with Store(tmp_path) as store:
        for q in questions[:12]:  # the interrupted run's answers: withheld, no text
            store.record("m", GradedAnswer(q.id, None, False, ""))
        progress = await Onboarding(store, suite, questions, FakeAsker(questions, lambda q: "A"),
                                    FAST).run("m", Prices())
    assert progress.status == "done" and "stated no letter" not in (progress.reason or "")


async def test_a_resumed_run_grades_the_answers_stored_before_again(tmp_path, tiny, caplog):
    """A run resumed after an upgrade that fixed the grader (an earlier version compared the gold
    letters of a question folder of one's own as written, "c", and graded every answer wrong):
    the answers stored before are graded again from their text, so the profile is not a mix of the
    earlier grades and today's; an answer stored without text (none) stays wrong, and nothing
    stored is asked again."""
    from proxy.store import GradedAnswer

    suite, questions = tiny
    gold = gold_map(questions)
    with Store(tmp_path) as store:
        for q in questions[:6]:  # right, graded wrong
            store.record("m", GradedAnswer(q.id, q.answer, False, f"The answer is ({q.answer})."))
        store.record("m", GradedAnswer(questions[6].id, None, False, None))  # refused: no answer
        asker = FakeAsker(questions, lambda q: gold[q])
        progress = await Onboarding(store, suite, questions, asker, FAST).run("m")
        assert progress.status == "done" and progress.correct == len(questions) - 1
        assert set(asker.asked) == {q.id for q in questions[7:]}
        expected = profile_from_graded(suite, {q: q != questions[6].id for q in gold})
        assert store.get("m") == pytest.approx(expected)
    assert [r.getMessage() for r in caplog.records if "graded otherwise" in r.getMessage()] == [
        "onboarding m: 6 of its 7 stored answers are graded otherwise by this version's grader "
        "(6 now right, 0 now wrong); their grades are rewritten"]


async def test_stored_answers_are_graded_again_off_the_serving_loop(tmp_path, tiny, monkeypatch):
    """Grading a model's stored answers again ran on the event loop that serves requests: 1,000
    long answers (a reasoning model's) held it half a second, once per model at every start."""
    import threading

    import proxy.onboarding as onboarding
    from proxy.store import GradedAnswer

    suite, questions = tiny
    graders = set()
    real = onboarding.extract_answer

    def extract_answer(text, n_options):
        graders.add(threading.current_thread())
        return real(text, n_options)

    monkeypatch.setattr(onboarding, "extract_answer", extract_answer)
    with Store(tmp_path) as store:
        for q in questions[:6]:
            store.record("m", GradedAnswer(q.id, q.answer, False, f"The answer is ({q.answer})."))
        assert await Onboarding(store, suite, questions, FakeAsker(questions, lambda q: None),
                                FAST).regrade("m") == 6
    assert graders and threading.current_thread() not in graders


@pytest.mark.parametrize("stored_slips, slips_now, flagged", [(10, 0, True), (0, 4, False)])
async def test_the_no_letter_share_is_that_of_every_stored_answer_not_of_the_last_run(
        tmp_path, stored_slips, slips_now, flagged):
    """The profile is made of every stored answer, a resumed run's earlier ones too: a run that
    resumes after slips is flagged (10 of 30 stored), 4 slips in a short resumed run are not (4 of 30)."""
    from proxy.store import GradedAnswer

    suite, questions = make_suite(3, 10)
    before, after = questions[:20], questions[20:]
    resumed = FakeAsker(questions, lambda q: "A")
    resumed.answers = {q.id: "**Answer: A**" for q in after[:slips_now]}

    with Store(tmp_path) as store:
        for n, q in enumerate(before):  # an earlier run's answers
            letter = None if n < stored_slips else "A"
            text = "..." if letter is None else "The answer is (A)."
            store.record("m", GradedAnswer(q.id, letter, letter == q.answer, text))
        progress = await Onboarding(store, suite, questions, resumed, FAST).run("m", Prices())
    assert progress.status == "done"
    assert (progress.reason is not None) == flagged
    if flagged:
        assert progress.reason.startswith(f"{stored_slips} of its {len(questions)} answers stated no letter")


async def test_a_run_with_no_answer_cut_off_is_done_with_no_reason(tmp_path, tiny):
    suite, questions = tiny
    with Store(tmp_path) as store:
        progress = await Onboarding(store, suite, questions, FakeAsker(questions, lambda q: "A"), FAST).run(
            "m", Prices())
    assert progress.status == "done" and progress.reason is None


async def test_a_worker_that_waited_on_the_lease_check_does_not_take_a_question_already_taken(tmp_path, tiny):
    """Workers check that questions are left, then may wait on the store (the lease, checked when
    a heartbeat is late: a busy store of a big zoo's runs); another worker took the last one
    meanwhile, and popping the empty queue crashed the run at 999 of 1,000 answers: `failed`,
    never retried by itself."""
    suite, questions = tiny
    with Store(tmp_path) as store:
        engine = Onboarding(store, suite, questions, FakeAsker(questions, lambda q: "A", delay=0.01),
                            replace(FAST, concurrency=len(questions) - 1))

        async def slow_check(state):  # every worker waits here, as on a late heartbeat
            await asyncio.sleep(0.2)
            return True

        engine._still_held = slow_check
        progress = await engine.run("m")
    assert progress.status == "done" and progress.done == len(questions)


async def test_a_run_waiting_in_line_on_its_account_has_not_been_waiting_on_its_upstream(tmp_path, caplog):
    """Served after another model's run on its account, a run that had sent nothing for minutes
    was failed by its first timed-out ask ("no answer for ...": a cold start), or said stalled as
    soon as its first question was out: the clocks ran from the run's start, not its first ask."""
    suite, questions = make_suite(n_tasks=3, per_task=10)

    class ColdStart(FakeAsker):  # b's first ask times out (a model loading), then it answers
        async def ask(self, model, messages, **params):
            if model == "b" and not self.failures_seen:
                self.failures_seen = True
                await asyncio.sleep(0.1)
                raise TimeoutError("the upstream did not answer in time")
            return await super().ask(model, messages, **params)

    asker = ColdStart(questions, lambda q: "A", delay=0.05)
    asker.failures_seen = False
    opts = Options(concurrency=1, backoff_s=0.01, backoff_max_s=0.02, give_up_s=1.0)
    with Store(tmp_path) as store, caplog.at_level(logging.WARNING, logger="satroute.onboarding"):
        engine = Onboarding(store, suite, questions, asker, opts)
        first = asyncio.create_task(engine.run("a", account="one"))
        await wait_until(lambda: asker.asked)  # a asks first: b waits its turn, some 1.5 s
        b = await engine.run("b", account="one")
        await first
    assert b.status == "done" and b.done == len(questions), b.reason
    assert "onboarding b stalled: no answer for" not in caplog.text


async def test_every_wait_in_line_on_its_account_is_no_wait_on_its_upstream(tmp_path):
    """Not only the wait before its first ask: a run that got a place while the run before it
    was in its backoff, then waited in line again while that one asked all its questions, was
    failed by its next failure ("no answer for" the whole wait), after two asks."""
    from proxy.errors import UpstreamError

    suite, questions = make_suite(n_tasks=3, per_task=10)

    class Loading(FakeAsker):  # a fails once; b fails twice (a cold start's 503s)
        async def ask(self, model, messages, **params):
            if self.fails.get(model):
                self.fails[model] -= 1
                await asyncio.sleep(0.01)
                raise UpstreamError("HTTP 503: model is loading")
            return await super().ask(model, messages, **params)

    asker = Loading(questions, lambda q: "A", delay=0.05)
    asker.fails = {"a": 1, "b": 2}
    opts = Options(concurrency=1, backoff_s=0.2, backoff_max_s=0.4, give_up_s=1.0)
    with Store(tmp_path) as store:
        engine = Onboarding(store, suite, questions, asker, opts)
        first = asyncio.create_task(engine.run("a", account="one"))
        await wait_until(lambda: asker.failures or asker.asked or not asker.fails["a"])
        b = await engine.run("b", account="one")
        a = await first
    assert a.status == "done" and b.status == "done" and b.done == len(questions), b.reason


async def test_a_run_waiting_in_line_says_so_not_a_stale_failure(tmp_path):
    """Waiting behind another model's run on its account, a run showed "stalled" with a timeout
    of minutes before (its backoff long over), or "running" with nothing asked."""
    suite, questions = make_suite(n_tasks=2, per_task=6)
    asker = Timed(questions, lambda q: "A", delay=0.02)
    with Store(tmp_path) as store:
        set_status, said = store.set_status, []
        store.set_status = lambda model, status, reason=None, **kw: (
            said.append((model, status, reason)), set_status(model, status, reason, **kw))
        engine = Onboarding(store, suite, questions, asker, Options(concurrency=2))
        first = asyncio.create_task(engine.run("m1", account="one"))
        await wait_until(lambda: asker.sent)
        second = await engine.run("m2", account="one")
        await first
    assert second.status == "done"
    mine = [(status, reason) for model, status, reason in said if model == "m2"]
    waiting = ("running", "waiting for m1, begun earlier on its provider account: its models are "
               "onboarded one after another")
    assert mine.index(waiting) < mine.index(("running", None))
    first_m2 = next(at for at, _, m in asker.sent if m == "m2")
    assert all(at < first_m2 for at, _, m in asker.sent if m == "m1")  # it waited all along


async def test_a_run_waiting_in_line_says_so_again_after_a_hold(tmp_path):
    """A rate-limit hold on the account said "stalled" for the run in line too; once it was over,
    that run showed "running" with no reason, sending nothing, until its turn came."""
    suite, questions = make_suite(n_tasks=3, per_task=6)

    class LimitedOnce(Timed):  # m1's fourth question is rate limited, the others answered
        n = 0

        async def ask(self, model, messages, **params):
            if model == "m1":
                self.n += 1
                if self.n == 4:
                    await asyncio.sleep(0.01)
                    raise rate_limited("m1", retry_after=0.3)
            return await super().ask(model, messages, **params)

    asker = LimitedOnce(questions, lambda q: "A", delay=0.03)
    with Store(tmp_path) as store:
        set_status, said = store.set_status, []
        store.set_status = lambda model, status, reason=None, **kw: (
            said.append((model, status, reason)), set_status(model, status, reason, **kw))
        engine = Onboarding(store, suite, questions, asker, Options(concurrency=2, backoff_s=0.01))
        first = asyncio.create_task(engine.run("m1", account="one"))
        await wait_until(lambda: asker.sent)
        second = await engine.run("m2", account="one")
        await first
    assert second.status == "done"
    mine = [(status, (reason or "")[:16]) for model, status, reason in said if model == "m2"]
    held = next(i for i, (status, _) in enumerate(mine) if status == "stalled")
    after = mine[held + 1:]
    turn = after.index(("running", ""), after.index(("running", "waiting for m1, ")))
    first_m2 = next(at for at, _, m in asker.sent if m == "m2")
    assert all(at < first_m2 for at, _, m in asker.sent if m == "m1") and turn > 0

