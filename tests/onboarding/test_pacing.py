"""Onboarding against an upstream that limits how fast it is asked, through the proxy's own
dispatch path (``DispatchAsker`` over ``RetryingDispatcher``) to a mock upstream: what the
upstream receives, and when."""
from __future__ import annotations

import asyncio

import yaml

from proxy.cooldown import Cooldowns
from proxy.dispatch import RetryingDispatcher
from proxy.onboarding import Onboarding, Options
from proxy.onboarding_service import DispatchAsker
from proxy.providers import ProviderRegistry
from proxy.store import Store
from support.mock_upstream import MockUpstream, answer, rate_limit

from onboarding.fakes import make_suite

ANSWER = "Let's think. The answer is (A)."


def registry(tmp_path, base, *names):
    """Models ``names`` on one upstream at ``base``, with dispatch's retries (a rate limit was
    waited out and retried in the ask that met it)."""
    path = tmp_path / "providers.yaml"
    path.write_text(yaml.safe_dump({"model_list": [
        {"model_name": n, "litellm_params": {"model": f"openai/{n}", "api_base": base, "api_key": "k"}}
        for n in names], "router_settings": {
        "num_retries": 2, "retry_backoff_s": 0.01, "timeout_s": 5, "deadline_s": 20}}))
    return ProviderRegistry(path, dict)


async def test_a_rate_limit_holds_every_question_of_the_run(tmp_path):
    """One ask met a 429 with Retry-After 1 s and waited it out alone, inside dispatch's retries;
    the engine, which heard of it only when the retries were spent, sent the other workers'
    next questions meanwhile: the upstream saw requests while it had said to wait."""
    suite, questions = make_suite(n_tasks=2, per_task=6)
    with MockUpstream() as up:
        up.set("m", answer(ANSWER, delay=0.2))
        up.queue("m", rate_limit(1.0))
        dispatcher = RetryingDispatcher(Cooldowns())
        opts = Options(concurrency=4, backoff_s=0.05, backoff_max_s=5)
        try:
            with Store(tmp_path) as store:
                engine = Onboarding(store, suite, questions,
                                    DispatchAsker(registry(tmp_path, up.url, "m"), dispatcher), opts)
                progress = await asyncio.wait_for(engine.run("m"), 20)
        finally:
            await dispatcher.close()
        sent = sorted(r.at for r in up.received)
    assert progress.status == "done" and progress.done == 12
    told = sent[0]  # the first requests went at once, one of them rate limited at once
    assert not [at - told for at in sent if told + 0.1 < at < told + 0.95]
    assert len(sent) == 13  # each question once, and the one limited again
