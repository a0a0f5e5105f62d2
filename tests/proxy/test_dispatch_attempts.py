"""What dispatch records of each attempt for a caller that asks (``Call.attempts``: onboarding
counts its spend so): how it ended, and whether the upstream may have billed it with no answer
back; on both dispatch paths."""
from __future__ import annotations

import asyncio

import pytest

from conftest import model_entry, write_config
from proxy.cooldown import Cooldowns
from proxy.dispatch import Call, RetryingDispatcher
from proxy.errors import AllUpstreamsFailed, UpstreamClientError
from proxy.providers import ProviderRegistry
from support.mock_upstream import answer, drop, fail, rate_limit, stall

MESSAGES = [{"role": "user", "content": "hello"}]
PATHS = [pytest.param(True, id="passthrough"), pytest.param(False, id="litellm")]


async def complete(tmp_path, base, fast, tried, paced=False, **router):
    """One unstreamed call to model m1 at ``base``, its attempts recorded in ``tried``."""
    cfg = write_config(tmp_path / "providers.yaml", [model_entry("m1", base, tmp_path, fast_path=fast)],
                       **router)
    snap = ProviderRegistry(cfg, dict).snapshot
    dispatcher = RetryingDispatcher(Cooldowns())
    try:
        return await dispatcher.complete(Call(targets=[snap.models["m1"]], stream=False,
                                              body={"model": "m1", "messages": MESSAGES},
                                              router=snap.router, attempts=tried, paced=paced))
    finally:
        await dispatcher.close()


@pytest.mark.parametrize("fast", PATHS)
async def test_each_attempt_says_how_it_ended_and_whether_it_may_be_billed(tmp_path, upstream, fast):
    """A timeout, a connection cut after the request was sent and a 500 may each have been
    generated and billed; a 503, a 429 and a 400 were refused before anything was generated."""
    # one call first: litellm's first call on a busy machine (its import, its client) could take
    # the whole 0.5 s timeout of the first attempt below, before anything was sent
    await complete(tmp_path, upstream.url, fast, [])
    upstream.reset()
    upstream.queue("m1", stall(1.5), drop(), fail(503), fail(429), fail(500), answer("hi"))
    tried: list = []
    reply = await complete(tmp_path, upstream.url, fast, tried, num_retries=5, timeout_s=0.5,
                           allowed_fails=100, deadline_s=60)
    assert reply.model == "m1"
    assert [(a.model, a.outcome, a.billed) for a in tried] == [
        ("m1", "timeout", True), ("m1", "connection", True), ("m1", "http_503", False),
        ("m1", "http_429", False), ("m1", "http_500", True), ("m1", "answered", False)]
    upstream.queue("m1", stall(1.5), fail(400, "bad temperature"))
    tried.clear()
    with pytest.raises(UpstreamClientError):
        await complete(tmp_path, upstream.url, fast, tried, num_retries=1, timeout_s=0.5)
    assert [(a.outcome, a.billed) for a in tried] == [("timeout", True), ("http_400", False)]
    upstream.queue("m1", fail(429, "You exceeded your current quota.", "insufficient_quota"))
    tried.clear()
    with pytest.raises(UpstreamClientError):  # a used-up quota, by its own name: no rate limit
        await complete(tmp_path, upstream.url, fast, tried, num_retries=1)
    assert [(a.outcome, a.billed) for a in tried] == [("insufficient_quota", False)]


@pytest.mark.parametrize("fast", PATHS)
async def test_a_connection_never_made_is_never_billed(tmp_path, fast):
    tried: list = []
    with pytest.raises(AllUpstreamsFailed):
        await complete(tmp_path, "http://127.0.0.1:9/v1", fast, tried, num_retries=1)
    assert [(a.outcome, a.billed) for a in tried] == [("connection", False)] * 2



@pytest.mark.parametrize("fast", PATHS)
async def test_a_caller_that_paces_itself_gets_a_rate_limit_at_once(tmp_path, upstream, fast):
    """Onboarding holds all its questions for a rate limit: one ask that waited out the
    Retry-After and retried alone, its failure unseen, let the others be sent meanwhile. The
    attempts before it are retried and recorded as ever (the spend counts them)."""
    for limit, said in ((rate_limit(5.0), 5.0), (fail(503), None), (fail(529), None)):
        upstream.queue("m1", fail(500), limit, answer("too late"))
        tried: list = []
        with pytest.raises(AllUpstreamsFailed) as failed:
            await asyncio.wait_for(complete(tmp_path, upstream.url, fast, tried, paced=True,
                                            num_retries=2, allowed_fails=100), 3)
        assert failed.value.slow_down and failed.value.upstream_retry_after == said
        assert [(a.outcome, a.billed) for a in tried] == [("http_500", True),
                                                          (f"http_{limit.status}", False)]
        upstream.reset()
    upstream.queue("m1", rate_limit(0.2))  # traffic still waits it out and retries
    assert (await complete(tmp_path, upstream.url, fast, [], num_retries=1)).model == "m1"


@pytest.mark.parametrize("fast", PATHS)
async def test_an_attempt_cut_before_its_request_went_out_is_not_billed(tmp_path, upstream, fast):
    """A caller that stops an attempt (onboarding re-pointing a model, a client gone) while its
    connection is still being made (a host resolving or not accepting) sent nothing: it is not
    counted as billed on the pass-through path, which knows when its headers went out. Cut once
    they had, and on litellm's path where that is not known, it may have been billed."""
    from support.raw_upstream import never_connecting_port

    async def cut(base: str, after_s: float) -> list:
        tried: list = []
        task = asyncio.create_task(complete(tmp_path, base, fast, tried, num_retries=0, timeout_s=30,
                                            connect_timeout_s=30))
        await asyncio.sleep(after_s)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return [(a.outcome, a.billed) for a in tried]

    await complete(tmp_path, upstream.url, fast, [])  # litellm imported: the attempt starts at once
    with never_connecting_port() as port:
        assert await cut(f"http://127.0.0.1:{port}/v1", 0.5) == [("cancelled", not fast)]
    upstream.queue("m1", stall(5))
    assert await cut(upstream.url, 1.0) == [("cancelled", True)]


async def test_an_attempt_whose_time_runs_out_while_it_connects_is_not_billed(tmp_path):
    """A model's timeout_s below connect_timeout_s: the attempt's limit came while the connection
    was still being made. Nothing was sent, so nothing was billed: the pass-through knows (through
    litellm a timeout cannot be told apart, and counts)."""
    from support.raw_upstream import never_connecting_port

    tried: list = []
    with never_connecting_port() as port:
        with pytest.raises(AllUpstreamsFailed):
            await complete(tmp_path, f"http://127.0.0.1:{port}/v1", True, tried, num_retries=0, timeout_s=0.5,
                           connect_timeout_s=5)
    assert [(a.outcome, a.billed) for a in tried] == [("timeout", False)]


@pytest.mark.parametrize("fast", PATHS)
async def test_a_424_is_the_server_s_failure_only_when_text_generation_inference_says_so(tmp_path, fast):
    """TGI's 424 with error_type "generation" failed while generating: retried, and billed as a
    500 midway is. SageMaker's 424 wraps any error of its model's container, a client's 400
    included: the request's own, asked once, never billed."""
    import json

    from support.raw_upstream import raw_upstream

    bodies = {"generation": {"error": "Request failed during generation: Server error: CUDA out of memory",
                             "error_type": "generation"},
              "sagemaker": {"error": {"message": "Received client error (400) from primary with message "
                                                 "\"bad input\"", "type": "ModelError"}}}
    for kind, body in bodies.items():
        reply = (b"HTTP/1.1 424 Failed Dependency\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n"
                 + json.dumps(body).encode())
        with raw_upstream(lambda request: reply) as url:
            tried: list = []
            with pytest.raises((AllUpstreamsFailed, UpstreamClientError)) as failed:
                await complete(tmp_path, url, fast, tried, num_retries=1, allowed_fails=100)
        if kind == "generation":
            assert isinstance(failed.value, AllUpstreamsFailed)
            assert [(a.outcome, a.billed) for a in tried] == [("http_424", True)] * 2
        else:
            assert isinstance(failed.value, UpstreamClientError) and failed.value.status == 424
            assert [(a.outcome, a.billed) for a in tried] == [("http_424", False)]
