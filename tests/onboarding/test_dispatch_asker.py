"""DispatchAsker: the onboarding seam over the proxy's dispatcher."""
from __future__ import annotations

import asyncio

import pytest
import yaml

from proxy.cooldown import Cooldowns
from proxy.dispatch import Attempt, Reply, RetryingDispatcher
from proxy.errors import AllUpstreamsFailed, UpstreamTransient
from proxy.onboarding import Onboarding, Options, Prices, RunCancelled, Said, prompt_tokens
from proxy.onboarding_service import DispatchAsker
from proxy.providers import ProviderRegistry
from proxy.store import Store
from support.mock_upstream import MockUpstream, answer, fail, stall

from onboarding.fakes import make_suite, wait_until


class FakeDispatcher:
    def __init__(self, body: bytes):
        self.body, self.calls = body, []

    async def complete(self, call):
        self.calls.append(call)
        return Reply(model=call.targets[0].name, body=self.body)


@pytest.fixture
def registry(tmp_path):
    path = tmp_path / "providers.yaml"
    path.write_text(yaml.safe_dump({"model_list": [
        {"model_name": "m", "litellm_params": {"model": "openai/up-m", "api_base": "http://x/v1"}}]}))
    return ProviderRegistry(path, dict)


async def test_one_unstreamed_completion_to_the_named_model(registry):
    fake = FakeDispatcher(b'{"choices": [{"message": {"role": "assistant", "content": "hi"}}],'
                          b' "usage": {"prompt_tokens": 12, "completion_tokens": 3000, "total_tokens": 3012}}')
    msgs = [{"role": "user", "content": "q"}]
    # the tokens billed, a reasoning model's hidden ones included, come with the text
    assert await DispatchAsker(registry, fake).ask("m", msgs, temperature=0.0) == Said("hi", 12, 3000, 3012)
    call = fake.calls[0]
    assert [t.name for t in call.targets] == ["m"] and call.stream is False
    assert call.body == {"model": "m", "messages": msgs, "temperature": 0.0}


async def test_an_answer_stopped_at_max_tokens_says_so(registry):
    body = b'{"choices": [{"message": {"content": ""}, "finish_reason": "length"}]}'
    assert await DispatchAsker(registry, FakeDispatcher(body)).ask("m", []) == Said("", cut_off=True)
    whole = b'{"choices": [{"message": {"content": "The answer is (A)."}, "finish_reason": "stop"}]}'
    assert not (await DispatchAsker(registry, FakeDispatcher(whole)).ask("m", [])).cut_off


async def test_an_answer_withheld_by_the_content_filter_says_so(registry):
    body = b'{"choices": [{"message": {"content": null}, "finish_reason": "content_filter"}]}'
    assert await DispatchAsker(registry, FakeDispatcher(body)).ask("m", []) == Said("", filtered=True)


async def test_malformed_answers_and_unknown_models(registry):
    with pytest.raises(UpstreamTransient, match="not a chat completion"):
        await DispatchAsker(registry, FakeDispatcher(b"<html>")).ask("m", [])
    with pytest.raises(UpstreamTransient):
        await DispatchAsker(registry, FakeDispatcher(b'{"choices": []}')).ask("m", [])
    assert await DispatchAsker(registry, FakeDispatcher(
        b'{"choices": [{"message": {"content": null}}], "usage": {"completion_tokens": "x"}}')
    ).ask("m", []) == Said("")
    with pytest.raises(RunCancelled, match="no longer in providers.yaml"):
        await DispatchAsker(registry, FakeDispatcher(b"{}")).ask("gone", [])


async def test_content_as_a_list_of_parts_is_joined_text(registry):
    body = (b'{"choices": [{"message": {"role": "assistant", "content": ['
            b'{"type": "thinking", "thinking": [{"type": "text", "text": "hmm, (B)?"}]},'
            b'{"type": "text", "text": "Step one."}, {"type": "text", "text": "The answer is (A)."}'
            b']}}]}')
    said = await DispatchAsker(registry, FakeDispatcher(body)).ask("m", [])
    assert said.text == "Step one.\nThe answer is (A)."
    with pytest.raises(UpstreamTransient, match="not a chat completion"):
        await DispatchAsker(registry, FakeDispatcher(
            b'{"choices": [{"message": {"content": {"text": "x"}}}]}')).ask("m", [])


class Retrying(FakeDispatcher):
    """Records ``tried`` in the call's attempts, then answers with ``body`` or raises ``failure``."""

    def __init__(self, body: bytes, tried: list[Attempt], failure: Exception | None = None):
        super().__init__(body)
        self.tried, self.failure = tried, failure

    async def complete(self, call):
        call.attempts.extend(self.tried)
        if self.failure is not None:
            raise self.failure
        return await super().complete(call)


async def test_attempts_that_may_be_billed_with_no_answer_are_counted(registry):
    """Dispatch's retries that timed out or were cut after sending are paid for: the answer (or the
    failure) says how many; a 429 and a connection never made cost nothing."""
    tried = [Attempt("m", "timeout", True), Attempt("m", "http_429"), Attempt("m", "connection", True),
             Attempt("m", "connection")]
    body = b'{"choices": [{"message": {"content": "The answer is (A)."}}]}'
    said = await DispatchAsker(registry, Retrying(body, tried + [Attempt("m", "answered")])).ask("m", [])
    assert said.unanswered == 2 and said.text == "The answer is (A)."
    down = AllUpstreamsFailed("every model failed: m (timeout)", failed=[("m", "timeout")], timeout=True)
    with pytest.raises(AllUpstreamsFailed) as failed:
        await DispatchAsker(registry, Retrying(b"", [*tried, Attempt("m", "timeout", True)], down)
                            ).ask("m", [])
    assert failed.value.unanswered == 3
    with pytest.raises(UpstreamTransient) as garbled:  # it came back, unread: maybe billed too
        await DispatchAsker(registry, Retrying(b'{"choices": []}', tried)).ask("m", [])
    assert garbled.value.unanswered == 3


class Seen:
    """The proxy's dispatcher, each call it is given kept (``calls``: their attempts so far)."""

    def __init__(self, dispatcher):
        self.dispatcher, self.calls = dispatcher, []

    async def complete(self, call):
        self.calls.append(call)
        return await self.dispatcher.complete(call)


def mock_registry(tmp_path, base, **router):
    path = tmp_path / "providers.yaml"
    path.write_text(yaml.safe_dump({"model_list": [
        {"model_name": "m", "litellm_params": {"model": "openai/m", "api_base": base, "api_key": "k"}}],
        "router_settings": {"timeout_s": 30, "deadline_s": 60, **router}}))
    return ProviderRegistry(path, dict)


async def unanswered_when_cut(asker, until) -> int | None:
    """Ask model m, cancel the ask once ``until()``: the ``unanswered`` its cancellation carries."""
    async def asking():
        try:
            await asker.ask("m", [{"role": "user", "content": "q"}])
        except asyncio.CancelledError as exc:
            return getattr(exc, "unanswered", None)
        raise AssertionError("answered before the cancellation")

    task = asyncio.create_task(asking())
    await wait_until(until)
    task.cancel()
    return await asyncio.wait_for(task, 5)


async def test_a_cancelled_ask_counts_the_attempts_it_sent_the_one_out_included(tmp_path):
    """A run stopped mid-ask (its model removed or pointed elsewhere, the proxy's stop): the
    cancellation dropped dispatch's record, so what the upstream had been sent counted nothing.
    It carries the attempts that may be billed: one that failed so before, and the one out (sent
    or not: it cannot be told); cut between two attempts (dispatch's backoff), none is out."""
    with MockUpstream() as up:
        dispatcher = RetryingDispatcher(Cooldowns())
        try:
            up.queue("m", fail(500), stall(30))
            asker = DispatchAsker(mock_registry(tmp_path, up.url, num_retries=1,
                                                retry_backoff_s=0.01), dispatcher)
            assert await unanswered_when_cut(asker, lambda: len(up.received) == 2) == 2
            up.reset()
            up.queue("m", fail(500))
            seen = Seen(dispatcher)
            asker = DispatchAsker(mock_registry(tmp_path, up.url, num_retries=1,
                                                retry_backoff_s=10), seen)
            assert await unanswered_when_cut(
                asker, lambda: seen.calls and len(seen.calls[0].attempts) == 1) == 1
            assert [(a.outcome, a.billed) for a in seen.calls[0].attempts] == [("http_500", True)]
        finally:
            await dispatcher.close()


async def test_a_run_stopped_with_questions_out_counts_them_for_the_spend(tmp_path):
    """The upstream received 4 questions, then the run was cancelled (as an edit of its api_base
    cancels it): the stored spend was $0; it is each question's prompt and answer budget."""
    suite, questions = make_suite(n_tasks=2, per_task=4)
    prices = Prices(10.0, 30.0)
    with MockUpstream() as up:
        up.set("m", answer("The answer is (A).", delay=30))
        dispatcher = RetryingDispatcher(Cooldowns())
        try:
            with Store(tmp_path) as store:
                engine = Onboarding(store, suite, questions,
                                    DispatchAsker(mock_registry(tmp_path, up.url, num_retries=0), dispatcher),
                                    Options(concurrency=4))
                task = asyncio.create_task(engine.run("m", prices))
                await wait_until(lambda: len(up.received) == 4)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await asyncio.wait_for(task, 5)
                spent = store.spent("m")
        finally:
            await dispatcher.close()
    asked = [q for q in questions if any(q.question in str(b) for b in up.bodies("m"))]
    assert len(asked) == 4
    assert spent == pytest.approx(sum(prices.cost(prompt_tokens(q), 2048) for q in asked))


@pytest.mark.parametrize("message", [
    {"content": "The answer is (A).", "reasoning_content": "x" * 8000},  # a reasoning parser's
    {"content": "The answer is (A).", "reasoning": "x" * 8000},  # OpenRouter's, newer vLLM's
    {"content": "The answer is (A).", "reasoning_content": "x" * 8000,  # litellm gives Claude's twice
     "thinking_blocks": [{"type": "thinking", "thinking": "x" * 8000, "signature": "s"}]},
    {"content": "The answer is (A).", "reasoning_details": [{"type": "reasoning.text", "text": "x" * 8000},
                                                            {"type": "reasoning.encrypted", "data": "y"}]},
    {"content": [{"type": "thinking", "thinking": [{"type": "text", "text": "x" * 8000}]},
                 {"type": "text", "text": "The answer is (A)."}]},
])
async def test_reasoning_returned_beside_the_answer_comes_with_it(registry, message):
    """Not graded, but billed: the spend counts its length where no usage says what it cost."""
    import orjson

    body = orjson.dumps({"choices": [{"message": {"role": "assistant", **message}}]})
    said = await DispatchAsker(registry, FakeDispatcher(body)).ask("m", [])
    assert said.text == "The answer is (A)." and said.reasoning == "x" * 8000
