"""Retries, Retry-After, fallback, cooldown and recovery, 4xx pass-through; on both dispatch paths."""
from __future__ import annotations

import logging
import threading
import time

import httpx
import openai
import pytest

from conftest import RecordingScorer, model_entry, write_config
from support.mock_upstream import answer, drop, fail, rate_limit, stall
from support.raw_upstream import raw_upstream
from support.prometheus import scrape

MESSAGES = [{"role": "user", "content": "hello"}]
PATHS = [pytest.param(True, id="passthrough"), pytest.param(False, id="litellm")]


def client(proxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=proxy.url, api_key="x", max_retries=0, timeout=30)


def setup(tmp_path, upstream, start_proxy, fast: bool, **router):
    models = [model_entry(n, upstream.url, tmp_path, fast_path=fast) for n in ("m1", "m2", "m3")]
    cfg = write_config(tmp_path / "providers.yaml", models, **router)
    return start_proxy(cfg, scorer=RecordingScorer({"m1": 0.9, "m2": 0.5, "m3": 0.1}))


@pytest.mark.parametrize("fast", PATHS)
def test_transient_failures_are_retried_on_the_same_model(tmp_path, upstream, start_proxy, fast):
    proxy = setup(tmp_path, upstream, start_proxy, fast)
    upstream.queue("m1", fail(503), drop())
    raw = client(proxy).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    assert raw.parse().model == "m1"
    assert "x-satroute-failed" not in raw.headers
    assert len(upstream.bodies("m1")) == 3 and upstream.bodies("m2") == []


@pytest.mark.parametrize("fast", PATHS)
def test_retry_after_is_honoured(tmp_path, upstream, start_proxy, fast):
    """The last (here the only) model a request may try is asked again once its wait is over."""
    proxy = setup(tmp_path, upstream, start_proxy, fast)
    upstream.queue("m1", rate_limit(0.6))
    started = time.monotonic()
    assert client(proxy).chat.completions.create(model="m1", messages=MESSAGES).model == "m1"
    assert time.monotonic() - started >= 0.6
    first, second = [r.at for r in upstream.received if r.body["model"] == "m1"]
    assert second - first >= 0.6


@pytest.mark.parametrize("fast", PATHS)
@pytest.mark.parametrize("limit", [pytest.param(rate_limit(2.0), id="retry-after"),
                                   pytest.param(fail(429, "Rate limit reached", "requests"), id="no-wait-named"),
                                   pytest.param(fail(503, "down for maintenance", retry_after=2.0), id="503-retry-after")])
def test_a_rate_limited_model_hands_a_routed_request_to_the_next_at_once(tmp_path, upstream, start_proxy,
                                                                        fast, limit):
    """A routed request waited out the first model's Retry-After (twice) while the next-ranked
    model, on another provider, was free: a rate limit says the model can take the request only
    later, and the next one may take it now, as after a timeout."""
    proxy = setup(tmp_path, upstream, start_proxy, fast)
    upstream.set("m1", limit)
    started = time.monotonic()
    raw = client(proxy).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    assert raw.parse().model == "m2" and raw.headers["x-satroute-failed"] == f"m1:http_{limit.status}"
    assert time.monotonic() - started < 1.5 and len(upstream.bodies("m1")) == 1


# a 429 as OpenAI sends one for a per-minute limit: no Retry-After, only when each limit resets
def openai_rate_limit(requests_reset: str, tokens_reset: str | None = None, tokens_left: str = "9000"):
    said = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": requests_reset}
    if tokens_reset is not None:
        said.update({"x-ratelimit-remaining-tokens": tokens_left, "x-ratelimit-reset-tokens": tokens_reset})
    return fail(429, "Rate limit reached for requests per min (RPM)", "requests", headers=said)


@pytest.mark.parametrize("fast", PATHS)
def test_a_429_without_retry_after_waits_for_its_rate_limit_s_reset(tmp_path, upstream, start_proxy, fast):
    """OpenAI's 429 for a per-minute limit names no Retry-After, only when the limit resets
    (x-ratelimit-reset-requests: 1s): the proxy asked again after its own short backoff, three
    times in half a second, and failed the client while the same SDK call made to the provider
    waited the second and was answered."""
    proxy = setup(tmp_path, upstream, start_proxy, fast)
    upstream.queue("m1", openai_rate_limit("600ms", tokens_reset="6m0s"), answer("after the reset"))
    reply = client(proxy).chat.completions.create(model="m1", messages=MESSAGES)
    assert reply.choices[0].message.content == "after the reset"
    first, second = [r.at for r in upstream.received if r.body["model"] == "m1"]
    assert second - first >= 0.6  # the requests' limit, used up; not the tokens' (9000 left)


def test_an_anthropic_429_without_retry_after_waits_for_its_rate_limit_s_reset(tmp_path, upstream,
                                                                              start_proxy):
    """Anthropic's reset headers are times (RFC 3339), read through litellm's exception."""
    import datetime

    entry = {"model_name": "claude", "litellm_params": {"model": "anthropic/claude-upstream",
             "api_key": "sk-ant-test", "api_base": upstream.url.removesuffix("/v1")}}
    proxy = start_proxy(write_config(tmp_path / "providers.yaml", [entry]))
    reset = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=1.5)
    upstream.queue("claude-upstream", fail(429, "This request would exceed the rate limit", "rate_limit_error",
                                           headers={"anthropic-ratelimit-requests-remaining": "0",
                                                    "anthropic-ratelimit-requests-reset": reset.isoformat()}),
                   answer("after the reset"))
    reply = client(proxy).chat.completions.create(model="claude", messages=MESSAGES)
    assert reply.choices[0].message.content == "after the reset"
    first, second = [r.at for r in upstream.received if r.body["model"] == "claude-upstream"]
    assert second - first >= 1.0


def test_the_wait_a_429_names_in_its_reset_headers():
    """Which reset a 429 without Retry-After is waited for: the used-up limit's, else the latest."""
    import datetime

    from proxy.upstream import wait_seconds

    def openai(requests, tokens, requests_left="5", tokens_left="5"):
        return {"x-ratelimit-reset-requests": requests, "x-ratelimit-remaining-requests": requests_left,
                "x-ratelimit-reset-tokens": tokens, "x-ratelimit-remaining-tokens": tokens_left}

    for said, seconds in [("1s", 1), ("20ms", 0.02), ("1.5s", 1.5), ("6m0s", 360), ("2h3m4.5s", 7384.5)]:
        assert wait_seconds(429, {"x-ratelimit-reset-requests": said}) == pytest.approx(seconds)
    assert wait_seconds(429, openai("1s", "6m0s", requests_left="0")) == 1
    assert wait_seconds(429, openai("1s", "6m0s", tokens_left="0")) == 360
    assert wait_seconds(429, openai("1s", "6m0s")) == 360  # none used up: both must be whole
    assert wait_seconds(429, {"x-ratelimit-reset-requests": "1s", "retry-after": "7"}) == 7
    # a bare number may be a time as well as a length; a 500 says nothing of waiting
    assert wait_seconds(429, {"x-ratelimit-reset-requests": "30"}) is None
    assert wait_seconds(500, {"x-ratelimit-reset-requests": "1s"}) is None
    soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=30)
    past = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
    anthropic = {"anthropic-ratelimit-tokens-remaining": "0",
                 "anthropic-ratelimit-tokens-reset": soon.isoformat().replace("+00:00", "Z"),
                 "anthropic-ratelimit-requests-remaining": "3",
                 "anthropic-ratelimit-requests-reset": past.isoformat()}
    assert 28 < wait_seconds(429, anthropic) <= 30
    assert wait_seconds(429, {"anthropic-ratelimit-requests-reset": "soon"}) is None


def test_a_time_a_429_names_is_read_against_the_upstream_s_date(monkeypatch):
    """A Retry-After date and Anthropic's reset times are the upstream's clock: with the answer's
    Date they give the wait it meant, however far this host's clock is off (a virtual machine
    resumed before NTP set it); without a Date, or with one unreadable, this host's clock."""
    import email.utils

    from proxy.upstream import wait_seconds

    sent = 1_800_000_000.0
    date = email.utils.formatdate(sent, usegmt=True)
    later = {"retry-after": email.utils.formatdate(sent + 20, usegmt=True)}
    reset = {"anthropic-ratelimit-requests-remaining": "0",
             "anthropic-ratelimit-requests-reset": "2027-01-15T08:00:20Z"}  # sent + 20
    for off in (-3600.0, 0.0, 3600.0):
        monkeypatch.setattr(time, "time", lambda: sent + off)
        assert wait_seconds(429, {**later, "date": date}) == pytest.approx(20)
        assert wait_seconds(429, {**reset, "date": date}) == pytest.approx(20)
        assert wait_seconds(503, {**later, "date": date}) == pytest.approx(20)
        for no_date in ({}, {"date": "yesterday"}):
            assert wait_seconds(429, {**later, **no_date}) == pytest.approx(max(0.0, 20 - off))


BEYOND_ANY_CLOCK = "Mon, 01 Jan 99999999999999999999 00:00:00 GMT"


def test_a_date_no_clock_can_hold_is_read_as_none():
    """A year past what a date can hold raised OverflowError, not ValueError, out of the parser."""
    import email.utils

    from proxy.upstream import wait_seconds

    soon = email.utils.formatdate(time.time() + 20, usegmt=True)
    for date in (BEYOND_ANY_CLOCK, "Mon, 01 Jan 10000 00:00:00 GMT",
                 "Mon, 01 Jan 0001 00:00:00", "\x00"):
        assert wait_seconds(503, {"retry-after": date}) in (None, 0.0), date
        assert wait_seconds(429, {"retry-after": soon, "date": date}) == pytest.approx(20, abs=2), date
        assert wait_seconds(429, {"anthropic-ratelimit-requests-reset": "2027-01-15T08:00:20Z",
                                  "date": date}) is not None, date


@pytest.mark.parametrize("fast", PATHS)
@pytest.mark.parametrize("headers", [{"retry-after": BEYOND_ANY_CLOCK}, {"date": BEYOND_ANY_CLOCK}],
                         ids=["retry-after", "date"])
def test_a_429_with_a_date_no_clock_can_hold_hands_the_request_on(tmp_path, upstream, start_proxy, fast,
                                                                   headers):
    """Such a header from the upstream (or from anyone on an http:// path to it) made every
    routed request to that model a 500, the next model never tried."""
    proxy = setup(tmp_path, upstream, start_proxy, fast, num_retries=0)
    upstream.set("m1", fail(429, "Rate limit reached", "requests", headers=headers))
    raw = client(proxy).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    assert raw.parse().model == "m2" and raw.headers["x-satroute-failed"].startswith("m1")


def test_a_rate_limit_s_reset_reaches_the_client_as_retry_after(tmp_path, upstream, start_proxy):
    proxy = setup(tmp_path, upstream, start_proxy, True, num_retries=0)
    upstream.set("m2", openai_rate_limit("3s"))
    r = httpx.post(f"{proxy.url}/chat/completions", json={"model": "m2", "messages": MESSAGES}, timeout=60)
    assert r.status_code == 429 and r.headers["retry-after"] == "3"
    assert r.headers["x-should-retry"] == "false"


def test_a_429_that_names_no_wait_at_all_leaves_the_sdk_its_own_backoff(tmp_path, upstream, start_proxy):
    """With no Retry-After nor reset to wait for, the proxy's retries came a quarter of a second
    apart: `x-should-retry: false` then left the client no wait at all before the error."""
    proxy = setup(tmp_path, upstream, start_proxy, True, num_retries=0)
    upstream.set("m2", fail(429, "Rate limit reached", "requests"))
    sdk = openai.OpenAI(base_url=proxy.url, api_key="x", timeout=30)  # the SDK's default retries
    upstream.queue("m2", fail(429, "Rate limit reached", "requests"), answer("on the SDK's retry"))
    assert sdk.chat.completions.create(model="m2", messages=MESSAGES).choices[0].message.content \
        == "on the SDK's retry"
    r = httpx.post(f"{proxy.url}/chat/completions", json={"model": "m2", "messages": MESSAGES}, timeout=60)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
    assert "x-should-retry" not in r.headers and "retry-after" not in r.headers


@pytest.mark.parametrize("fast", PATHS)
def test_falls_back_to_next_ranked_model_and_says_so(tmp_path, upstream, start_proxy, fast):
    proxy = setup(tmp_path, upstream, start_proxy, fast)
    upstream.set("m1", fail(500))
    raw = client(proxy).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    assert raw.parse().model == "m2"
    assert raw.headers["x-satroute-model"] == "m2"
    assert raw.headers["x-satroute-failed"] == "m1:http_500"
    assert len(upstream.bodies("m1")) == 3  # num_retries=2


@pytest.mark.parametrize("fast", PATHS)
def test_streaming_falls_back_before_the_first_byte(tmp_path, upstream, start_proxy, fast):
    proxy = setup(tmp_path, upstream, start_proxy, fast, num_retries=0)
    upstream.set("m1", fail(502))
    with client(proxy).chat.completions.with_streaming_response.create(
            model="auto", messages=MESSAGES, stream=True) as raw:
        assert raw.headers["x-satroute-failed"] == "m1:http_502"
        chunks = list(raw.parse())
    assert {c.model for c in chunks} == {"m2"}


@pytest.mark.parametrize("fast", PATHS)
def test_upstream_client_errors_pass_through_unretried(tmp_path, upstream, start_proxy, fast):
    proxy = setup(tmp_path, upstream, start_proxy, fast)
    # (a request too long for the model is the exception: tests/proxy/test_context_window.py)
    upstream.set("m1", fail(400, "temperature must be at most 2", "invalid_request_error"))
    with pytest.raises(openai.BadRequestError) as err:
        client(proxy).chat.completions.create(model="auto", messages=MESSAGES)
    assert "temperature must be at most 2" in err.value.message
    assert len(upstream.bodies("m1")) == 1 and upstream.bodies("m2") == []
    upstream.set("m2", fail(401, "bad upstream key", "authentication_error"))
    with pytest.raises(openai.AuthenticationError) as err:
        client(proxy).chat.completions.create(model="m2", messages=MESSAGES)
    # the upstream's own error object, on both paths (litellm's wording and type do not leak in)
    assert err.value.body == {"message": "bad upstream key", "type": "authentication_error",
                              "param": None, "code": "mock_error"}
    upstream.set("m3", fail(404, "no such upstream model", "invalid_request_error"))
    with pytest.raises(openai.NotFoundError):
        client(proxy).chat.completions.create(model="m3", messages=MESSAGES)
    assert len(upstream.bodies("m2")) == 1 and len(upstream.bodies("m3")) == 1


@pytest.mark.parametrize("fast", PATHS)
def test_a_model_whose_key_is_refused_hands_routed_requests_to_the_next_and_cools(tmp_path, upstream,
                                                                                 start_proxy, fast):
    """One provider's revoked key (401), a model it no longer has (404): the routed request is
    answered by the next-ranked model, and after allowed_fails such refusals the model leaves
    routing for cooldown_s. A request naming that model gets the upstream's answer as it is."""
    proxy = setup(tmp_path, upstream, start_proxy, fast, num_retries=0, allowed_fails=2, cooldown_s=30)
    upstream.set("m1", fail(401, "invalid api key", "authentication_error"))
    upstream.set("m2", fail(404, "model not found", "invalid_request_error"))
    raw = client(proxy).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    assert raw.headers["x-satroute-model"] == "m3"
    assert raw.headers["x-satroute-failed"] == "m1:http_401,m2:http_404"
    with pytest.raises(openai.AuthenticationError):  # named: its own answer, no fallback
        client(proxy).chat.completions.create(model="m1", messages=MESSAGES)
    assert httpx.get(f"{proxy.base}/ready").json()["cooling"] == ["m1"]  # refused twice in a row
    assert len(upstream.bodies("m2")) == 1
    raw = client(proxy).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    assert raw.headers["x-satroute-failed"] == "m2:http_404" and raw.headers["x-satroute-model"] == "m3"
    assert httpx.get(f"{proxy.base}/ready").json()["cooling"] == ["m1", "m2"]


@pytest.mark.parametrize("fast", PATHS)
def test_a_502_ends_with_the_last_model_s_own_words(tmp_path, upstream, start_proxy, fast):
    """"every model failed: m1 (http_503)" told a client that named the model nothing of why;
    the provider's words ("Service is too busy") come last, as a 429's already did."""
    proxy = setup(tmp_path, upstream, start_proxy, fast, num_retries=0)
    upstream.set("m1", fail(503, "Service is too busy. Please retry later.", "service_unavailable_error"))
    with pytest.raises(openai.InternalServerError) as err:
        client(proxy).chat.completions.create(model="m1", messages=MESSAGES)
    said = err.value.body["message"]
    assert err.value.status_code == 502 and said.startswith("every model failed: m1 (http_503); the last said: ")
    assert said.endswith("Service is too busy. Please retry later.")


@pytest.mark.parametrize("fast", PATHS)
def test_a_403_for_a_flagged_prompt_is_the_request_s_not_the_model_s(tmp_path, upstream, start_proxy, fast):
    """OpenRouter refuses a moderated model's flagged input with 403 ("Your input was flagged"):
    like Azure's 400 content_filter, it goes back to the client as it is, and three flagged
    prompts no longer take the model out of routing for everyone else's clean ones."""
    proxy = setup(tmp_path, upstream, start_proxy, fast, num_retries=0, allowed_fails=2, cooldown_s=30)
    upstream.set("m1", fail(403, 'openai/gpt-4o requires moderation on OpenRouter. Your input was '
                                 'flagged for "violence". No credits were charged.', "moderation"))
    for _ in range(3):
        with pytest.raises(openai.PermissionDeniedError) as err:
            client(proxy).chat.completions.create(model="auto", messages=MESSAGES)
        assert "Your input was flagged" in err.value.message
    assert httpx.get(f"{proxy.base}/ready").json()["cooling"] == []
    assert len(upstream.bodies("m1")) == 3 and upstream.bodies("m2") == []
    # an account flagged is a key refused, as any other 403: the next model answers
    upstream.set("m1", fail(403, "Your account has been flagged for suspicious activity and API access "
                                 "is disabled.", "permission_error"))
    raw = client(proxy).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    assert raw.headers["x-satroute-model"] == "m2" and raw.headers["x-satroute-failed"] == "m1:http_403"


@pytest.mark.parametrize("fast", PATHS)
def test_a_model_out_of_credit_hands_routed_requests_to_the_next(tmp_path, upstream, start_proxy, fast):
    """402 (the provider's account has no credit left) is the model's problem, not the request's."""
    proxy = setup(tmp_path, upstream, start_proxy, fast, num_retries=0)
    upstream.set("m1", fail(402, "Insufficient credits", "insufficient_quota"))
    raw = client(proxy).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    assert raw.headers["x-satroute-model"] == "m2"
    assert raw.headers["x-satroute-failed"] == "m1:insufficient_quota"
    with pytest.raises(openai.APIStatusError) as err:  # named: its own answer, no fallback
        client(proxy).chat.completions.create(model="m1", messages=MESSAGES)
    assert err.value.status_code == 402 and "Insufficient credits" in err.value.message


@pytest.mark.parametrize("fast", PATHS)
def test_an_account_out_of_credit_said_in_a_400_is_the_model_s_problem(tmp_path, upstream, start_proxy, fast):
    """Anthropic says its account has no credit left with a 400 invalid_request_error: every routed
    request ranking the model first failed with that 400, for ever (a 400 is never the model's)."""
    proxy = setup(tmp_path, upstream, start_proxy, fast, num_retries=0, allowed_fails=2)
    upstream.set("m1", fail(400, "Your credit balance is too low to access the Anthropic API. Please go to "
                                 "Plans & Billing to upgrade or purchase credits.", "invalid_request_error"))
    for _ in range(2):
        raw = client(proxy).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
        assert raw.headers["x-satroute-model"] == "m2"
        assert raw.headers["x-satroute-failed"] == "m1:insufficient_quota"
    ready = httpx.get(f"{proxy.base}/ready").json()
    assert ready["cooling"] == ["m1"] and ready["out_of_quota"] == ["m1"]
    # any other 400 is the request's: one that quotes the client's own words back included, or a
    # client could make every model look out of credit, and cool it for everyone
    for said in ("temperature: must be at most 2",
                 "Invalid value: 'Your credit balance is too low'. Supported values are: 'system', 'user'"):
        upstream.set("m2", fail(400, said, "invalid_request_error"))
        r = httpx.post(f"{proxy.url}/chat/completions", timeout=30,
                       json={"model": "auto", "messages": MESSAGES, "satroute": {"models": ["m2", "m3"]}})
        assert r.status_code == 400 and "x-satroute-failed" not in r.headers


def test_only_the_upstream_s_own_words_say_an_account_is_out_of_credit():
    from proxy.errors import UpstreamClientError

    def refusal(message, type_="invalid_request_error", unfit=None):
        return UpstreamClientError(f"m1: {message}", status=400, model="m1", unfit=unfit,
                                   upstream_body={"error": {"message": message, "type": type_}})

    assert refusal("Your credit balance is too low to access the Anthropic API.").out_of_credit
    assert not refusal("Invalid value: 'Your credit balance is too low'.").out_of_credit
    assert not refusal("Your credit balance is too low", type_="other").out_of_credit
    assert not refusal("Your credit balance is too low", unfit="untranslatable").out_of_credit
    assert not UpstreamClientError("x", status=402, unfit="untranslatable").out_of_credit


@pytest.mark.parametrize("fast", PATHS)
def test_one_request_a_model_cannot_serve_does_not_cool_it_for_everyone(tmp_path, upstream, start_proxy,
                                                                       fast):
    """A deterministic 500 on one prompt: the proxy retries it, and its user sends it twice more
    (regenerate; a client that retries a 502), nine attempts in all; they count once, and the
    model stays in routing. Other requests failing too is the model's state: three in a row cool
    it (allowed_fails 3)."""
    proxy = setup(tmp_path, upstream, start_proxy, fast, retry_backoff_s=0.01, retry_backoff_max_s=0.01)
    upstream.set("m1", fail(500, "cannot render this prompt"))
    for _ in range(3):
        with pytest.raises(openai.InternalServerError):
            client(proxy).chat.completions.create(model="m1", messages=MESSAGES)
    assert len(upstream.bodies("m1")) == 9
    assert httpx.get(f"{proxy.base}/ready").json()["cooling"] == []
    raw = client(proxy).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    assert raw.headers["x-satroute-failed"] == "m1:http_500"  # it was still tried first
    for text in ("second prompt", "third prompt"):
        client(proxy).chat.completions.create(model="auto", messages=[{"role": "user", "content": text}])
    assert httpx.get(f"{proxy.base}/ready").json()["cooling"] == ["m1"]
    assert scrape(proxy.base)[("satroute_cooldowns_total", (("model", "m1"),))] == 1


@pytest.mark.parametrize("fast", PATHS)
@pytest.mark.parametrize("status", [503, 529, 522])
def test_an_overloaded_model_cools_after_one_request(tmp_path, upstream, start_proxy, fast, status):
    """503, Anthropic's 529 overloaded_error, Cloudflare's 522 (and 429, 502, 504, 520-524, a
    refused connection, a timeout) are the model's state, not the request's: every attempt
    counts, and one request whose three attempts meet it cools it."""
    proxy = setup(tmp_path, upstream, start_proxy, fast, retry_backoff_s=0.01, retry_backoff_max_s=0.01)
    upstream.set("m1", fail(status, "overloaded"))
    assert client(proxy).chat.completions.create(model="auto", messages=MESSAGES).model == "m2"
    assert len(upstream.bodies("m1")) == 3
    assert httpx.get(f"{proxy.base}/ready").json()["cooling"] == ["m1"]


def test_stalled_upstream_times_out_and_falls_back(tmp_path, upstream, start_proxy):
    proxy = setup(tmp_path, upstream, start_proxy, True, timeout_s=0.3, num_retries=0)
    upstream.set("m1", stall(5))
    raw = client(proxy).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    assert raw.parse().model == "m2"
    assert raw.headers["x-satroute-failed"] == "m1:timeout"


@pytest.mark.parametrize("fast", PATHS)
def test_a_model_s_own_timeout_replaces_the_router_s(tmp_path, upstream, start_proxy, fast):
    """litellm_params.timeout: shorter for a model that should fail fast, longer for a slow one."""
    models = [model_entry(n, upstream.url, tmp_path, fast_path=fast) for n in ("m1", "m2")]
    models[0]["litellm_params"]["timeout"] = 0.3
    models[1]["litellm_params"]["timeout"] = 3
    cfg = write_config(tmp_path / "providers.yaml", models, timeout_s=1.0, num_retries=0)
    proxy = start_proxy(cfg, scorer=RecordingScorer({"m1": 0.9, "m2": 0.5}))
    client(proxy).chat.completions.create(model="m2", messages=MESSAGES)  # litellm imported
    upstream.set("m1", stall(5))
    upstream.set("m2", answer(delay=1.5))
    started = time.monotonic()
    raw = client(proxy).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    assert raw.headers["x-satroute-failed"] == "m1:timeout" and raw.parse().model == "m2"
    assert time.monotonic() - started < 1.5 + 0.3 + 0.7


@pytest.mark.parametrize("fast", PATHS)
def test_a_model_that_hangs_is_not_asked_again_while_another_may_answer(tmp_path, upstream,
                                                                        start_proxy, fast):
    """A timeout took the attempt's whole time: retrying it on the same model, when two retries of
    the timeout do not fit in the deadline, gave a 504 with the next model never asked. The next
    model answers at once; a request naming the hung model keeps its retries."""
    proxy = setup(tmp_path, upstream, start_proxy, fast, timeout_s=0.5, deadline_s=1.4, num_retries=2)
    client(proxy).chat.completions.create(model="m2", messages=MESSAGES)  # litellm imported
    upstream.set("m1", stall(5))
    raw = client(proxy).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    assert raw.parse().model == "m2" and raw.headers["x-satroute-failed"] == "m1:timeout"
    assert len(upstream.bodies("m1")) == 1
    with pytest.raises(openai.APIStatusError) as err:
        client(proxy).chat.completions.create(model="m1", messages=MESSAGES)
    assert err.value.status_code == 504 and len(upstream.bodies("m1")) == 1 + 3  # its own retries


def test_the_default_deadline_ends_before_the_sdks_own_timeout():
    """The openai SDKs give up after 600 s and retry twice: the proxy answers first, and an attempt
    that hangs leaves room for the next model."""
    from proxy.providers import RouterSettings

    router, sdk = RouterSettings(), openai.OpenAI(api_key="x")
    assert router.deadline_s < sdk.timeout.read
    assert router.deadline_s - router.timeout_s >= 0.9 * router.timeout_s  # the next: near a whole attempt


def test_request_deadline_bounds_everything(tmp_path, upstream, start_proxy):
    proxy = setup(tmp_path, upstream, start_proxy, True, timeout_s=0.4, deadline_s=0.7)
    for name in ("m1", "m2", "m3"):
        upstream.set(name, stall(5))
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as err:
        client(proxy).chat.completions.create(model="auto", messages=MESSAGES)
    assert err.value.status_code == 504 and err.value.code == "upstream_timeout"
    assert time.monotonic() - started < 2.0


def test_all_models_failing_is_502_naming_them(tmp_path, upstream, start_proxy):
    proxy = setup(tmp_path, upstream, start_proxy, True, num_retries=0)
    upstream.set("*", fail(500))
    with pytest.raises(openai.APIStatusError) as err:
        client(proxy).chat.completions.create(model="auto", messages=MESSAGES)
    assert err.value.status_code == 502
    assert all(n in err.value.message for n in ("m1", "m2", "m3"))


def test_an_sdk_does_not_repeat_the_cascade_the_proxy_already_ran(tmp_path, upstream, start_proxy):
    """The openai SDK retries a 502/504 twice by default; the proxy has already retried and fallen
    back, so it says x-should-retry: false and one client call costs one cascade, not three."""
    proxy = setup(tmp_path, upstream, start_proxy, True, num_retries=0)
    upstream.set("*", fail(500))
    sdk = openai.OpenAI(base_url=proxy.url, api_key="x", timeout=30)  # the SDK's default retries
    assert sdk.max_retries == 2
    with pytest.raises(openai.InternalServerError) as err:
        sdk.chat.completions.create(model="auto", messages=MESSAGES)
    assert err.value.response.headers["x-should-retry"] == "false"
    assert len(upstream.bodies()) == 3  # m1, m2, m3 once each


def test_rate_limited_direct_call_returns_429_with_retry_after(tmp_path, upstream, start_proxy):
    proxy = setup(tmp_path, upstream, start_proxy, True, num_retries=0)
    upstream.set("m2", rate_limit(7))
    r = httpx.post(f"{proxy.url}/chat/completions", json={"model": "m2", "messages": MESSAGES},
                   timeout=60)
    assert r.status_code == 429 and r.headers["retry-after"] == "7"
    assert r.json()["error"]["code"] == "rate_limited"


@pytest.mark.parametrize("fast", PATHS)
def test_a_used_up_quota_is_no_rate_limit_it_falls_back_at_once_and_is_not_retried(
        tmp_path, upstream, start_proxy, fast):
    """OpenAI's 429 insufficient_quota ("You exceeded your current quota"): waiting does not help.
    It was retried three times (nine with the SDK's own retries) and its words replaced by
    "rate_limited"; now it counts like a 402: the next model answers, the model cools down, and a
    request naming it gets the provider's own error."""
    proxy = setup(tmp_path, upstream, start_proxy, fast, allowed_fails=2)
    upstream.set("m1", fail(429, "You exceeded your current quota, please check your plan and "
                            "billing details.", "insufficient_quota"))
    raw = client(proxy).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    assert raw.parse().model == "m2" and raw.headers["x-satroute-failed"] == "m1:insufficient_quota"
    assert len(upstream.bodies("m1")) == 1
    with pytest.raises(openai.RateLimitError) as err:
        client(proxy).chat.completions.create(model="m1", messages=MESSAGES)
    assert "exceeded your current quota" in err.value.message
    assert err.value.body["type"] == "insufficient_quota"
    assert len(upstream.bodies("m1")) == 2
    ready = httpx.get(f"{proxy.base}/ready").json()
    assert ready["cooling"] == ["m1"] and ready["out_of_quota"] == ["m1"]


@pytest.mark.parametrize("fast", PATHS)
def test_a_used_up_quota_passed_back_after_a_fallback_is_not_retried_by_the_sdk(
        tmp_path, upstream, start_proxy, fast):
    """The last model's used-up quota is passed back as a 429: without `x-should-retry: false`
    the openai SDK (two retries by default) sent the whole routed chain three times, and the
    answer did not say which model had failed before it."""
    proxy = setup(tmp_path, upstream, start_proxy, fast, num_retries=0, allowed_fails=5)
    upstream.set("m1", fail(503))
    upstream.set("m2", fail(429, "You exceeded your current quota.", "insufficient_quota"))
    retrying = openai.OpenAI(base_url=proxy.url, api_key="x", max_retries=2, timeout=30)
    with pytest.raises(openai.RateLimitError) as err:
        retrying.chat.completions.create(model="auto", messages=MESSAGES,
                                         extra_body={"satroute": {"models": ["m1", "m2"]}})
    assert err.value.response.headers["x-should-retry"] == "false"
    assert err.value.response.headers["x-satroute-failed"] == "m1:http_503"
    assert len(upstream.bodies("m1")) == 1 and len(upstream.bodies("m2")) == 1


QUOTA = fail(429, "You exceeded your current quota, please check your plan and billing details.",
             "insufficient_quota")


def routes(proxy, count: int) -> list:
    """The routing log's rows, once ``count`` are written (it is written in batches)."""
    deadline = time.time() + 10
    while len(rows := httpx.get(f"{proxy.base}/admin/routes").json()["data"]) < count and time.time() < deadline:
        time.sleep(0.1)
    return rows


@pytest.mark.parametrize("fast", PATHS)
def test_models_rate_limited_or_out_of_quota_answer_429_with_the_soonest_retry_after(
        tmp_path, upstream, start_proxy, fast):
    """Every model tried answered 429, one of them for a used-up quota: the request answered 502
    "every model failed: m1 (http_429), ..." (the quota first) or passed the quota's 429 back (the
    quota last), either way without the Retry-After of the models only rate limited, and the
    quota was labelled http_429 as a rate limit is. The soonest Retry-After is the one passed on."""
    proxy = setup(tmp_path, upstream, start_proxy, fast, num_retries=0, allowed_fails=10)
    ask = {"model": "auto", "messages": MESSAGES}
    upstream.set("m1", QUOTA)
    upstream.set("m2", rate_limit(3))
    upstream.set("m3", rate_limit(1))
    for soonest, models in (("1", ["m1", "m2", "m3"]), ("3", ["m1", "m3"])):
        ask["satroute"] = {"models": models}
        r = httpx.post(f"{proxy.url}/chat/completions", json=ask, timeout=30)
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
        assert r.headers["retry-after"] == soonest and r.headers["x-should-retry"] == "false"
        assert "(insufficient_quota)" in r.json()["error"]["message"]
        upstream.set("m1", rate_limit(3))  # then the model out of quota is the last one tried
        upstream.set("m3", QUOTA)
    assert [[(f["model"], f["reason"]) for f in row["failed"]] for row in routes(proxy, 2)] == [
        [("m1", "http_429"), ("m3", "insufficient_quota")],  # newest first
        [("m1", "insufficient_quota"), ("m2", "http_429"), ("m3", "http_429")]]
    assert sorted(httpx.get(f"{proxy.base}/ready").json()["out_of_quota"]) == ["m3"]
    upstream.set("m1", QUOTA)  # every model out of quota: the last one's own 429, not to be retried
    r = httpx.post(f"{proxy.url}/chat/completions", json=ask, timeout=30)
    assert r.status_code == 429 and r.json()["error"]["type"] == "insufficient_quota"
    assert r.headers["x-should-retry"] == "false" and "retry-after" not in r.headers
    assert r.headers["x-satroute-failed"] == "m1:insufficient_quota"
    assert sorted(httpx.get(f"{proxy.base}/ready").json()["out_of_quota"]) == ["m1", "m3"]


@pytest.mark.parametrize("fast", PATHS)
def test_a_long_named_wait_does_not_hide_a_model_that_named_none(tmp_path, upstream, start_proxy, fast):
    """m1 limited for an hour, m2 for a moment with no wait named: the client was told to wait an
    hour and not to retry, where its SDK's own retry a second later was answered by m2; and a wait
    past cooldown_max_s went out as it came (years), though the proxy asks the model again by then."""
    proxy = setup(tmp_path, upstream, start_proxy, fast, num_retries=0, allowed_fails=10, cooldown_max_s=600)
    ask = {"model": "auto", "messages": MESSAGES, "satroute": {"models": ["m1", "m2"]}}
    upstream.set("m1", rate_limit(3600))
    upstream.set("m2", fail(429, "Rate limit reached", "rate_limit_exceeded"))
    r = httpx.post(f"{proxy.url}/chat/completions", json=ask, timeout=30)
    assert r.status_code == 429 and "retry-after" not in r.headers and "x-should-retry" not in r.headers
    upstream.set("m2", rate_limit(999_999))
    r = httpx.post(f"{proxy.url}/chat/completions", json=ask, timeout=30)
    assert r.status_code == 429 and r.headers["retry-after"] == "600"


@pytest.mark.parametrize("fast", PATHS)
def test_a_rate_limit_in_quota_words_is_still_a_rate_limit(tmp_path, upstream, start_proxy, fast):
    """Gemini says "You exceeded your current quota" for its per-minute limits, which a wait
    clears: only OpenAI's insufficient_quota label means a used-up quota, never the words."""
    proxy = setup(tmp_path, upstream, start_proxy, fast)
    said = ("You exceeded your current quota, please check your plan and billing details. Quota "
            "exceeded for metric: generate_content_free_tier_requests, limit: 2. Please retry in 1s.")
    upstream.queue("m1", fail(429, said, "RESOURCE_EXHAUSTED", retry_after=0.1), answer("after the wait"))
    reply = client(proxy).chat.completions.create(model="m1", messages=MESSAGES)
    assert reply.choices[0].message.content == "after the wait" and len(upstream.bodies("m1")) == 2


def test_an_sdk_does_not_repeat_a_rate_limited_cascade_the_proxy_already_waited_on(
        tmp_path, upstream, start_proxy):
    """A 429 with Retry-After: the proxy waited and asked again (three attempts); the openai SDK,
    which retries a 429 twice on its own, is told not to: one client call, three upstream calls,
    not nine. The provider's words say which limit."""
    proxy = setup(tmp_path, upstream, start_proxy, True, num_retries=2)
    upstream.set("m2", fail(429, "Rate limit reached for requests per min (RPM)", retry_after=0.1))
    sdk = openai.OpenAI(base_url=proxy.url, api_key="x", timeout=30)  # the SDK's default retries
    with pytest.raises(openai.RateLimitError) as err:
        sdk.chat.completions.create(model="m2", messages=MESSAGES)
    assert err.value.response.headers["x-should-retry"] == "false"
    assert err.value.response.headers["retry-after"] == "1"
    assert err.value.code == "rate_limited" and "requests per min" in err.value.message
    assert len(upstream.bodies("m2")) == 3


def test_the_retry_after_passed_on_is_rounded_up(tmp_path, upstream, start_proxy):
    """retry-after-ms: 2500 reached the client as Retry-After: 2 (rounded half to even): a client
    that trusts it asks again half a second too soon."""
    proxy = setup(tmp_path, upstream, start_proxy, True, num_retries=0)
    for said, passed in (("2500", "3"), ("1200", "2"), ("3000", "3"), ("10", "1")):
        upstream.set("m2", fail(429, "rate limited", "requests", headers={"retry-after-ms": said}))
        r = httpx.post(f"{proxy.url}/chat/completions", json={"model": "m2", "messages": MESSAGES}, timeout=60)
        assert r.status_code == 429 and r.headers["retry-after"] == passed


def test_a_retry_after_that_is_no_finite_number_is_ignored_not_a_500(tmp_path, upstream, start_proxy):
    """`Retry-After: inf` (or 1e999) was read as an infinite wait: the 429 became a 500."""
    proxy = setup(tmp_path, upstream, start_proxy, True, num_retries=0)
    upstream.set("m2", rate_limit(float("inf")))
    r = httpx.post(f"{proxy.url}/chat/completions", json={"model": "m2", "messages": MESSAGES},
                   timeout=60)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
    assert "retry-after" not in r.headers


def test_failing_model_cools_down_and_comes_back(tmp_path, upstream, start_proxy):
    proxy = setup(tmp_path, upstream, start_proxy, True, num_retries=0, allowed_fails=2,
                  cooldown_s=0.8)
    upstream.set("m1", fail(500))
    c = client(proxy)
    for text in ("one", "two"):  # two requests (one sent twice would count once)
        assert c.chat.completions.create(model="auto", messages=[{"role": "user", "content": text}]).model == "m2"
    calls = len(upstream.bodies("m1"))
    assert calls == 2
    # cooling: m1 is not even tried
    raw = c.chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    assert raw.parse().model == "m2" and "x-satroute-failed" not in raw.headers
    assert len(upstream.bodies("m1")) == calls
    assert "m1" in httpx.get(f"{proxy.base}/ready").json()["cooling"]
    upstream.set("m1", answer())
    time.sleep(0.9)
    assert c.chat.completions.create(model="auto", messages=MESSAGES).model == "m1"
    assert "m1" not in httpx.get(f"{proxy.base}/ready").json()["cooling"]


def test_a_rate_limited_model_cools_for_the_wait_it_named(tmp_path, upstream, start_proxy):
    """Routed traffic asked a model that said Retry-After: 3600 again every cooldown_s, and kept
    one that said Retry-After: 1 out for 30 s: it now cools for the wait named, up to
    cooldown_max_s."""
    proxy = setup(tmp_path, upstream, start_proxy, True, num_retries=0, allowed_fails=1,
                  cooldown_s=30, cooldown_max_s=2)

    def cooled_for() -> float:
        raw = client(proxy).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
        assert raw.parse().model == "m2" and raw.headers["x-satroute-failed"] == "m1:http_429"
        began = time.monotonic()
        while httpx.get(f"{proxy.base}/ready").json()["cooling"] and time.monotonic() - began < 5:
            time.sleep(0.05)
        return time.monotonic() - began

    upstream.queue("m1", rate_limit(1))
    assert 0.7 < cooled_for() < 2
    assert client(proxy).chat.completions.create(model="auto", messages=MESSAGES).model == "m1"
    upstream.queue("m1", rate_limit(3600))
    assert 1.5 < cooled_for() < 4  # cooldown_max_s
    assert len(upstream.bodies("m1")) == 3


def test_an_edit_that_fixes_a_cooling_model_or_shortens_cooldowns_takes_effect(tmp_path, upstream,
                                                                               start_proxy):
    """The admin fixes m1's api_base: m1 is routed to at once, not after its cooldown; lowering
    cooldown_s ends longer cooldowns already running."""
    dead = "http://127.0.0.1:9/v1"
    models = [model_entry("m1", dead, tmp_path), model_entry("m2", dead, tmp_path),
              model_entry("m3", upstream.url, tmp_path)]
    cfg = write_config(tmp_path / "providers.yaml", models, num_retries=0, allowed_fails=1,
                       cooldown_s=120)
    proxy = start_proxy(cfg, scorer=RecordingScorer({"m1": 0.9, "m2": 0.5, "m3": 0.1}))
    raw = client(proxy).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    assert raw.headers["x-satroute-failed"] == "m1:connection,m2:connection"
    assert httpx.get(f"{proxy.base}/ready").json()["cooling"] == ["m1", "m2"]
    models[0] = model_entry("m1", upstream.url, tmp_path)  # fixed
    write_config(cfg, models, num_retries=0, allowed_fails=1, cooldown_s=0.5)
    deadline = time.monotonic() + 5
    while httpx.get(f"{proxy.base}/ready").json()["cooling"] != ["m2"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client(proxy).chat.completions.create(model="auto", messages=MESSAGES).model == "m1"
    time.sleep(0.6)  # m2's own cooldown now ends within the new cooldown_s
    assert httpx.get(f"{proxy.base}/ready").json()["cooling"] == []


def test_a_cooling_model_removed_from_the_file_is_listed_neither_as_cooling_nor_in_metrics(tmp_path, upstream,
                                                                                           start_proxy):
    dead = "http://127.0.0.1:9/v1"
    models = [model_entry("m1", dead, tmp_path), model_entry("m2", dead, tmp_path),
              model_entry("m3", upstream.url, tmp_path)]
    cfg = write_config(tmp_path / "providers.yaml", models, num_retries=0, allowed_fails=1, cooldown_s=120)
    proxy = start_proxy(cfg, scorer=RecordingScorer({"m1": 0.9, "m2": 0.5, "m3": 0.1}))
    client(proxy).chat.completions.create(model="auto", messages=MESSAGES)
    assert httpx.get(f"{proxy.base}/ready").json()["cooling"] == ["m1", "m2"]
    write_config(cfg, [models[0], models[2]], num_retries=0, allowed_fails=1, cooldown_s=120)
    deadline = time.monotonic() + 5
    while httpx.get(f"{proxy.base}/ready").json()["models"] != ["m1", "m3"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(f"{proxy.base}/ready").json()["cooling"] == ["m1"]
    series = [dict(labels) for _, labels in scrape(proxy.base)]
    assert not any("m2" in labels.values() for labels in series)  # cooldowns, fallbacks, latency
    assert {"from_model": "m1", "to_model": "m2"} not in series
    assert {"model": "m1"} in series  # a model still configured keeps its own


def test_failures_in_flight_across_an_edit_that_fixed_the_model_do_not_cool_it(tmp_path, upstream,
                                                                                start_proxy):
    """A request to the old, failing api_base is still retrying when the fix lands: its failures
    are the old upstream's, and must not take the fixed model out of routing."""
    from support.mock_upstream import Behavior, MockUpstream

    with MockUpstream() as bad:
        bad.set("m1", Behavior("fail", status=503, message="down", error_type="server_error", delay=0.4))
        cfg = write_config(tmp_path / "providers.yaml", [model_entry("m1", bad.url, tmp_path)],
                           num_retries=2, retry_backoff_s=0.01, retry_backoff_max_s=0.01,
                           allowed_fails=2, cooldown_s=120)
        proxy = start_proxy(cfg)
        out = {}
        thread = threading.Thread(target=lambda: out.setdefault("status", httpx.post(
            f"{proxy.url}/chat/completions", json={"model": "m1", "messages": MESSAGES}, timeout=30).status_code))
        thread.start()
        time.sleep(0.2)  # its first attempt is in flight
        write_config(cfg, [model_entry("m1", upstream.url, tmp_path)], num_retries=2, retry_backoff_s=0.01,
                     retry_backoff_max_s=0.01, allowed_fails=2, cooldown_s=120)
        thread.join(30)
    assert out["status"] == 502 and len(bad.bodies("m1")) == 3  # it kept to the upstream it began on
    ready = httpx.get(f"{proxy.base}/ready")
    assert ready.status_code == 200 and ready.json()["cooling"] == []
    assert client(proxy).chat.completions.create(model="m1", messages=MESSAGES).model == "m1"


@pytest.mark.parametrize("fast", PATHS)
def test_a_model_that_cools_down_is_not_retried_further_when_another_can_answer(tmp_path, upstream,
                                                                               start_proxy, fast):
    """Its retries stop once it cools (here its own second failure, allowed_fails 2; under load,
    other requests' too): the next-ranked model answers rather than the overloaded one being
    asked three more times. A request naming it has no other model: it keeps its retries."""
    proxy = setup(tmp_path, upstream, start_proxy, fast, num_retries=4, allowed_fails=2,
                  retry_backoff_s=0.01, retry_backoff_max_s=0.01)
    upstream.set("m1", fail(503, "overloaded"))
    raw = client(proxy).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    assert raw.parse().model == "m2" and raw.headers["x-satroute-failed"] == "m1:http_503"
    assert len(upstream.bodies("m1")) == 2
    with pytest.raises(openai.InternalServerError):
        client(proxy).chat.completions.create(model="m1", messages=MESSAGES)
    assert len(upstream.bodies("m1")) == 2 + 5


def test_a_retry_that_succeeds_ends_the_cooldown_its_request_ran_into(tmp_path, upstream, start_proxy):
    """Two 503s cool m1 (allowed_fails 2); the request's third attempt, made after that, is
    answered: m1 answers again, and stays in routing."""
    proxy = setup(tmp_path, upstream, start_proxy, True, allowed_fails=2, retry_backoff_s=0.01,
                  retry_backoff_max_s=0.01)
    upstream.queue("m1", fail(503), fail(503))
    assert client(proxy).chat.completions.create(model="m1", messages=MESSAGES).model == "m1"
    assert len(upstream.bodies("m1")) == 3
    assert httpx.get(f"{proxy.base}/ready").json()["cooling"] == []


def test_a_model_that_cools_while_a_request_waits_to_ask_it_again_is_not_asked_again(
        tmp_path, upstream, start_proxy):
    """Request A waits 1 to 2 s (its backoff after m1's 503) to ask m1 again; meanwhile request
    B's failure cools m1. A falls back to m2 when its wait ends, without asking the cooling model
    once more."""
    proxy = setup(tmp_path, upstream, start_proxy, True, num_retries=1, allowed_fails=2,
                  retry_backoff_s=2.0, retry_backoff_max_s=2.0)
    upstream.set("m1", fail(503))
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("raw", client(proxy).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "A"}])))
    thread.start()
    time.sleep(0.5)
    raw = client(proxy).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "B"}])
    assert raw.parse().model == "m2"  # B's failure cooled m1: no wait, no retry
    thread.join(30)
    assert out["raw"].parse().model == "m2" and out["raw"].headers["x-satroute-failed"] == "m1:http_503"
    assert len(upstream.bodies("m1")) == 2  # A once, B once


class SlowScorer(RecordingScorer):
    def score(self, instruction, candidates):
        time.sleep(1.0)  # a CPU scorer under load
        return super().score(instruction, candidates)


def test_failures_of_a_request_scored_across_an_edit_that_fixed_the_model_do_not_cool_it(tmp_path, upstream,
                                                                                       start_proxy):
    """The fix lands while the request is being scored: its calls still go to the old, dead
    api_base (the configuration it was planned under), and their failures are not the new one's."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    cfg = write_config(tmp_path / "providers.yaml", [model_entry("m1", dead, tmp_path),
                                                     model_entry("m2", upstream.url, tmp_path)],
                       retry_backoff_s=0.01, retry_backoff_max_s=0.01, cooldown_s=120)
    proxy = start_proxy(cfg, scorer=SlowScorer({"m1": 1.0, "m2": 0.5}))
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("raw", client(proxy).chat.completions.with_raw_response.create(
        model="auto", messages=MESSAGES)))
    thread.start()
    time.sleep(0.3)  # being scored
    write_config(cfg, [model_entry("m1", upstream.url, tmp_path), model_entry("m2", upstream.url, tmp_path)],
                 retry_backoff_s=0.01, retry_backoff_max_s=0.01, cooldown_s=120)
    thread.join(30)
    assert out["raw"].headers["x-satroute-failed"] == "m1:connection"  # it went where it was planned
    assert out["raw"].headers["x-satroute-model"] == "m2"
    assert httpx.get(f"{proxy.base}/ready").json()["cooling"] == []
    assert client(proxy).chat.completions.create(model="auto", messages=MESSAGES).model == "m1"


def test_requests_let_in_before_an_overload_do_not_end_its_cooldown(tmp_path, upstream, start_proxy):
    """Five slow requests are in flight to m1 when it starts refusing new work (429) and cools;
    their answers arriving afterwards do not bring it back before cooldown_s."""
    from concurrent.futures import ThreadPoolExecutor

    proxy = setup(tmp_path, upstream, start_proxy, True, num_retries=0, cooldown_s=30)
    upstream.set("m1", answer(delay=1.0))
    with ThreadPoolExecutor(8) as pool:
        slow = [pool.submit(client(proxy).chat.completions.create, model="m1",
                            messages=[{"role": "user", "content": f"slow {i}"}]) for i in range(5)]
        time.sleep(0.3)
        upstream.set("m1", fail(429, "overloaded"))
        for i in range(3):
            raw = client(proxy).chat.completions.with_raw_response.create(
                model="auto", messages=[{"role": "user", "content": f"burst {i}"}])
            assert raw.headers["x-satroute-failed"] == "m1:http_429"
        assert httpx.get(f"{proxy.base}/ready").json()["cooling"] == ["m1"]
        assert [f.result().model for f in slow] == ["m1"] * 5
    assert httpx.get(f"{proxy.base}/ready").json()["cooling"] == ["m1"]
    raw = client(proxy).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    assert raw.parse().model == "m2" and "x-satroute-failed" not in raw.headers  # not even tried


@pytest.mark.parametrize("fast", PATHS)
def test_unreachable_upstream_falls_back_with_reason_connection(tmp_path, upstream, start_proxy,
                                                                fast):
    """Both dispatch paths name a refused connection alike (litellm reports it as a 500)."""
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    models = [model_entry("m1", dead, tmp_path, fast_path=fast),
              model_entry("m2", upstream.url, tmp_path)]
    proxy = start_proxy(write_config(tmp_path / "providers.yaml", models),
                        scorer=RecordingScorer({"m1": 1.0}))
    raw = client(proxy).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    assert raw.parse().model == "m2"
    assert raw.headers["x-satroute-failed"] == "m1:connection"


def _means_config(tmp_path, upstream, **router):
    """m1 (profile mean 0.25) before m2 (0.8): the means rank m2 first, the file's order m1."""
    import json

    models = []
    for name, tasks in (("m1", {"t1": 0.2, "t2": 0.3}), ("m2", {"t1": 0.9, "t2": 0.7})):
        (tmp_path / f"{name}.json").write_text(json.dumps({"model": name, "suite": "test", "tasks": tasks}))
        entry = model_entry(name, upstream.url)
        entry["model_info"]["capability_profile"] = f"{name}.json"
        models.append(entry)
    return write_config(tmp_path / "providers.yaml", models, **router)


def _metric(proxy, reason: str) -> float:
    return scrape(proxy.base).get(("satroute_scorer_degraded_total", (("reason", reason),)), 0.0)


def test_a_scorer_failure_is_answered_by_the_profile_means_not_a_503(tmp_path, upstream, start_proxy):
    class Broken:
        def score(self, instruction, candidates):
            raise RuntimeError("CUDA out of memory")

    proxy = start_proxy(_means_config(tmp_path, upstream), scorer=Broken())
    raw = client(proxy).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    assert raw.parse().model == "m2"  # the stronger profile, not the first in the file
    assert raw.headers["x-satroute-route"] == "aptitude"
    assert raw.headers["x-satroute-degraded"] == "scorer_failed"
    assert raw.headers["x-satroute-scores"] == "m2=0.8000,m1=0.2500"
    assert _metric(proxy, "scorer_failed") == 1.0
    assert client(proxy).chat.completions.create(model="m1", messages=MESSAGES).model == "m1"
    deadline = time.time() + 10
    while not (logged := httpx.get(f"{proxy.base}/admin/routes").json()["data"]) and time.time() < deadline:
        time.sleep(0.1)  # the routing log is written in batches
    assert logged[0]["degraded"] == "scorer_failed" and logged[0]["scores"] == {"m2": 0.8, "m1": 0.25}


def test_a_slow_scorer_is_not_waited_for_past_its_timeout(tmp_path, upstream, start_proxy, caplog):
    class Slow:
        def score(self, instruction, candidates):
            time.sleep(1.0)
            return {"m1": 1.0, "m2": 0.0}

    caplog.set_level(logging.WARNING, logger="satroute.scoring")
    proxy = start_proxy(_means_config(tmp_path, upstream, scorer_timeout_s=0.05), scorer=Slow())
    started = time.perf_counter()
    raw = client(proxy).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    assert time.perf_counter() - started < 0.9  # answered before the scorer would have been
    assert raw.parse().model == "m2" and raw.headers["x-satroute-degraded"] == "scorer_timeout"
    assert 40 <= float(raw.headers["x-satroute-scorer-ms"]) < 900
    assert _metric(proxy, "scorer_timeout") == 1.0
    # the timeout in the warning as set, not rounded to "0.1 s" beside a wait of 60 ms
    assert "scorer could not answer within 50 ms" in caplog.text
    time.sleep(1.0)  # the abandoned call has finished; a scorer within its time routes again
    (tmp_path / "providers.yaml").write_text((tmp_path / "providers.yaml").read_text()
                                              .replace("scorer_timeout_s: 0.05", "scorer_timeout_s: 5.0"))
    time.sleep(0.5)
    raw = client(proxy).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    assert raw.parse().model == "m1" and raw.headers["x-satroute-route"] == "routed"
    assert "x-satroute-degraded" not in raw.headers


def test_litellm_is_imported_lazily_with_the_local_cost_map():
    import subprocess
    import sys

    switches = ("LITELLM_LOCAL_MODEL_COST_MAP", "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS")
    code = ("import os, sys; from proxy.app import create_app; "
            "assert 'litellm' not in sys.modules; "
            "from proxy.settings import prepare_litellm_environment as p; p(); "
            f"assert all(os.environ[name] == 'True' for name in {switches!r})")
    env = {k: v for k, v in __import__("os").environ.items() if k not in switches}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("fast", PATHS)
def test_stream_cut_after_first_byte_ends_with_in_band_error(tmp_path, upstream, start_proxy,
                                                             fast):
    proxy = setup(tmp_path, upstream, start_proxy, fast)
    upstream.set("m1", answer("abcdefgh", chunks=4, cut_after=3, chunk_delay=0.05))
    got = []
    with pytest.raises(openai.APIError) as err:
        for chunk in client(proxy).chat.completions.create(model="m1", messages=MESSAGES,
                                                           stream=True):
            got.append(chunk)
    assert got and {c.model for c in got} == {"m1"}
    assert "interrupted" in str(err.value.message)
    assert upstream.bodies("m2") == []  # committed to m1: no fallback after the first byte


def test_models_marked_ready_at_run_time_become_routable(tmp_path, upstream, start_proxy):
    models = [model_entry("old", upstream.url, tmp_path),
              model_entry("fresh", upstream.url, tmp_path, profile=False)]
    proxy = start_proxy(write_config(tmp_path / "providers.yaml", models),
                        scorer=RecordingScorer({"fresh": 1.0}))
    assert client(proxy).chat.completions.create(model="auto", messages=MESSAGES).model == "old"
    proxy.app.state.services.registry.set_profile("fresh", {"t1": 0.9})  # what onboarding does
    assert client(proxy).chat.completions.create(model="auto", messages=MESSAGES).model == "fresh"
    proxy.app.state.services.registry.set_unavailable("fresh", "local server down")
    assert client(proxy).chat.completions.create(model="auto", messages=MESSAGES).model == "old"
    assert "fresh" not in [m.id for m in client(proxy).models.list()]


def test_a_client_cannot_send_the_configured_key_elsewhere_through_litellm_keywords(tmp_path, upstream,
                                                                                  start_proxy):
    """litellm reads many keywords as its own settings (api_base, base_url, mock_response, ...):
    fields of the client's body must reach the upstream as body fields, never as those settings."""
    from support.mock_upstream import MockUpstream

    secret = "sk-configured-server-key-0123456789"
    cfg = write_config(tmp_path / "providers.yaml",
                       [model_entry("m1", upstream.url, tmp_path, fast_path=False, key=secret)], num_retries=0)
    proxy = start_proxy(cfg)
    with MockUpstream() as elsewhere:
        for field, value in (("base_url", elsewhere.url), ("api_base", elsewhere.url),
                             ("mock_response", "a forged answer"), ("extra_headers", {"x-leak": "1"})):
            r = httpx.post(f"{proxy.url}/chat/completions", timeout=30,
                           json={"model": "m1", "messages": MESSAGES, field: value, "x_vendor": 7})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == "reply from m1", field
        assert elsewhere.received == []
    sent = upstream.received[-4:]
    assert all(rec.headers.get("authorization") == f"Bearer {secret}" for rec in sent)
    assert all(rec.body["x_vendor"] == 7 for rec in sent)  # unknown fields still reach the upstream
    assert "x-leak" not in sent[-1].headers and sent[-1].body["extra_headers"] == {"x-leak": "1"}


def test_a_request_litellm_cannot_translate_does_not_cool_the_model(tmp_path, upstream, start_proxy):
    """litellm wraps its own failure to translate a request (here a tool without its function) as a
    'connection error' though nothing was sent: the model's health is not in question."""
    claude = model_entry("claude", upstream.url, tmp_path, key="sk-ant-0123456789")
    claude["litellm_params"]["model"] = "anthropic/claude-3-5-sonnet-20241022"
    cfg = write_config(tmp_path / "providers.yaml", [claude, model_entry("m2", upstream.url, tmp_path)],
                       num_retries=1, allowed_fails=1)
    proxy = start_proxy(cfg, scorer=RecordingScorer({"claude": 1.0, "m2": 0.5}))
    for _ in range(2):
        r = httpx.post(f"{proxy.url}/chat/completions", timeout=60,
                       json={"model": "claude", "messages": MESSAGES, "tools": [{"type": "function"}]})
        assert r.status_code >= 400
    assert upstream.received == []  # litellm never sent it
    assert httpx.get(f"{proxy.base}/ready").json()["cooling"] == []


def test_a_healthy_fallback_cut_short_by_the_deadline_is_not_cooled(tmp_path, upstream, start_proxy):
    from support.mock_upstream import Behavior

    cfg = write_config(tmp_path / "providers.yaml", [model_entry(n, upstream.url, tmp_path) for n in ("m1", "m2")],
                       num_retries=0, timeout_s=5.0, deadline_s=1.0, allowed_fails=2, cooldown_s=30)
    proxy = start_proxy(cfg, scorer=RecordingScorer({"m1": 1.0, "m2": 0.5}))
    upstream.set("m1", Behavior("fail", status=503, message="overloaded", delay=0.9))  # slow 503s
    upstream.set("m2", answer(delay=0.3))  # healthy, but left with 0.1 s of the request's deadline
    for _ in range(2):
        r = httpx.post(f"{proxy.url}/chat/completions", timeout=30, json={"model": "auto", "messages": MESSAGES})
        assert r.status_code == 504
    assert httpx.get(f"{proxy.base}/ready").json()["cooling"] == ["m1"]  # m1 failed on its own time


@pytest.mark.parametrize("fast", PATHS)
def test_a_client_that_leaves_before_the_answer_stops_the_retries_and_fallbacks(tmp_path, upstream,
                                                                               start_proxy, fast):
    proxy = setup(tmp_path, upstream, start_proxy, fast, num_retries=2, timeout_s=0.6, deadline_s=20)
    upstream.set("m1", stall(1.0))  # every attempt would time out, then m2 and m3 would be tried
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{proxy.url}/chat/completions", timeout=0.3, json={"model": "auto", "messages": MESSAGES})
    time.sleep(2.0)
    # at most the one call in flight when the client left (litellm's first import may outlast it)
    assert [r.body["model"] for r in upstream.received] in ([], ["m1"])
    assert httpx.get(f"{proxy.base}/ready").json()["cooling"] == []
    deadline = time.time() + 10  # the decision was counted, so it is in the routing log too
    while not (rows := httpx.get(f"{proxy.base}/admin/routes").json()["data"]) and time.time() < deadline:
        time.sleep(0.1)
    assert [(r["requested"], r["chosen"], r["failed"]) for r in rows] == [("auto", None, [])]
    # the call cut off when the client left says nothing of the upstream's latency
    assert ("satroute_upstream_latency_seconds_count", (("model", "m1"),)) not in scrape(proxy.base)


@pytest.mark.parametrize("fast", PATHS)
def test_a_routed_request_the_model_refuses_is_in_the_routing_log(tmp_path, upstream, start_proxy, fast):
    proxy = setup(tmp_path, upstream, start_proxy, fast)
    upstream.queue("m1", fail(503), fail(503), fail(503))
    upstream.queue("m2", fail(400, "temperature must be at most 2", "invalid_request_error"))
    r = httpx.post(f"{proxy.url}/chat/completions", timeout=30, json={"model": "auto", "messages": MESSAGES})
    assert r.status_code == 400
    deadline = time.time() + 10
    while not (rows := httpx.get(f"{proxy.base}/admin/routes").json()["data"]) and time.time() < deadline:
        time.sleep(0.1)  # the routing log is written in batches
    assert [(row["chosen"], row["failed"]) for row in rows] == [
        (None, [{"model": "m1", "reason": "http_503"}, {"model": "m2", "reason": "http_400"}])]


def test_litellm_is_imported_at_start_up_when_a_model_needs_it(tmp_path, upstream, start_proxy):
    """The import takes seconds: no request should wait for it, nor have it eat its deadline."""
    cfg = write_config(tmp_path / "providers.yaml", [model_entry("m1", upstream.url, tmp_path, fast_path=False)])
    proxy = start_proxy(cfg)
    dispatcher = proxy.app.state.services.dispatcher
    deadline = time.time() + 30
    while dispatcher._litellm is None and time.time() < deadline:
        time.sleep(0.05)
    assert dispatcher._litellm is not None and upstream.received == []  # before any request


def _chunk_event(model: str, content: str, prefix: bytes = b"") -> bytes:
    import json

    return prefix + b"data: " + json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 0, "model": model,
                                            "choices": [{"index": 0, "delta": {"content": content},
                                                         "finish_reason": None}]}).encode() + b"\n\n"


@pytest.fixture
def dying_upstream():
    """An OpenAI-compatible server whose streams end cleanly (a close-delimited body) after two
    content chunks: no finish_reason, no [DONE], no transport error."""
    def respond(request):
        return (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
                + _chunk_event(request["model"], "The answer ") + _chunk_event(request["model"], "is "))

    with raw_upstream(respond) as url:
        yield url


def test_a_stream_the_upstream_ends_before_the_answer_is_finished_ends_in_an_error(tmp_path, dying_upstream,
                                                                                  start_proxy):
    cfg = write_config(tmp_path / "providers.yaml", [model_entry("m1", dying_upstream, tmp_path, fast_path=True)],
                       num_retries=0)
    proxy = start_proxy(cfg)
    stream = client(proxy).chat.completions.create(model="m1", messages=MESSAGES, stream=True)
    text = []
    with pytest.raises(openai.APIError, match="stream interrupted"):
        for chunk in stream:
            text.append(chunk.choices[0].delta.content or "")
    assert "".join(text) == "The answer is "  # what came is relayed, and not taken for the whole


def _finish_event(model: str, usage: bool = False) -> bytes:
    import json

    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": model,
             "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    out = b"data: " + json.dumps(chunk).encode() + b"\n\n"
    if usage:
        chunk = {**chunk, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
        out += b"data: " + json.dumps(chunk).encode() + b"\n\n"
    return out


@pytest.mark.parametrize("said_done", [False, True], ids=["upstream left it out", "upstream sent it"])
def test_a_finished_stream_ends_with_exactly_one_done(tmp_path, start_proxy, said_done):
    """Some servers end a finished stream (every choice has its finish_reason) without [DONE]; a
    client that reads until [DONE] (as the docs promise every stream ends) must get it, once."""
    def respond(request):
        return (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
                + _chunk_event(request["model"], "Hi") + _finish_event(request["model"], usage=True)
                + (b"data: [DONE]\n\n" if said_done else b""))

    with raw_upstream(respond) as url:
        cfg = write_config(tmp_path / "providers.yaml", [model_entry("m1", url, tmp_path, fast_path=True)],
                           num_retries=0)
        proxy = start_proxy(cfg)
        r = httpx.post(f"{proxy.url}/chat/completions", timeout=10,
                       json={"model": "m1", "messages": MESSAGES, "stream": True})
    events = [e for e in r.text.split("\n\n") if e.strip()]
    assert events[-1] == "data: [DONE]" and r.text.count("[DONE]") == 1, r.text
    assert '"usage"' in events[-2] and "stream_interrupted" not in r.text


@pytest.mark.parametrize("fast", PATHS)
def test_a_committed_stream_may_pause_up_to_timeout_s_between_chunks(tmp_path, upstream, start_proxy, fast):
    """A retry used most of the deadline, so the stream's first chunk had 0.5 s; once it came, the
    gaps between chunks are bounded by timeout_s, as on the pass-through path, not by that 0.5 s."""
    from support.mock_upstream import Behavior

    cfg = write_config(tmp_path / "providers.yaml", [model_entry("m1", upstream.url, tmp_path, fast_path=fast)],
                       num_retries=1, retry_backoff_s=0.01, retry_backoff_max_s=0.01, timeout_s=5.0, deadline_s=1.5)
    proxy = start_proxy(cfg)
    client(proxy).chat.completions.create(model="m1", messages=MESSAGES)  # litellm imported, connections warm
    upstream.queue("m1", Behavior("fail", status=503, message="busy", delay=1.0),
                   answer("abcdefgh", chunks=4, chunk_delay=0.7))
    text = "".join(c.choices[0].delta.content or "" for c in
                   client(proxy).chat.completions.create(model="m1", messages=MESSAGES, stream=True) if c.choices)
    assert text == "abcdefgh"


def _json_reply(obj) -> bytes:
    import json

    return (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n"
            + json.dumps(obj).encode())


def test_a_stream_request_answered_with_json_reaches_the_client_as_a_stream(tmp_path, start_proxy):
    """Some servers ignore stream: true and send the whole chat.completion: the client still gets
    a stream with the answer (the tool call indexed, the usage chunk it asked for, [DONE]), not an
    empty stream."""
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    completion = {"id": "cmpl-1", "object": "chat.completion", "created": 7, "model": "upstream-id",
                  "choices": [{"index": 0, "finish_reason": "tool_calls", "logprobs": None,
                               "message": {"role": "assistant", "content": "the full answer",
                                           "tool_calls": [call]}}],
                  "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}
    with raw_upstream(lambda request: _json_reply(completion)) as url:
        cfg = write_config(tmp_path / "providers.yaml", [model_entry("m1", url, tmp_path, fast_path=True)],
                           num_retries=0)
        proxy = start_proxy(cfg)
        chunks = list(client(proxy).chat.completions.create(
            model="m1", messages=MESSAGES, stream=True, stream_options={"include_usage": True}))
    assert [c.model for c in chunks] == ["m1", "m1"]
    first, last = chunks
    assert first.id == "cmpl-1" and first.object == "chat.completion.chunk"
    assert first.choices[0].delta.content == "the full answer"
    assert first.choices[0].finish_reason == "tool_calls"
    assert first.choices[0].delta.tool_calls[0].index == 0
    assert first.choices[0].delta.tool_calls[0].function.name == "f"
    assert last.choices == [] and last.usage.total_tokens == 8


def test_a_stream_request_answered_with_other_json_falls_back(tmp_path, upstream, start_proxy):
    with raw_upstream(lambda request: _json_reply({"status": "ok"})) as url:
        cfg = write_config(tmp_path / "providers.yaml",
                           [model_entry("m1", url, tmp_path, fast_path=True),
                            model_entry("m2", upstream.url, tmp_path, fast_path=True)], num_retries=0)
        proxy = start_proxy(cfg, scorer=RecordingScorer({"m1": 0.9, "m2": 0.5}))
        raw = client(proxy).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    assert raw.headers["x-satroute-model"] == "m2" and text
    assert raw.headers["x-satroute-failed"] == "m1:bad_answer"


def test_stream_events_with_event_or_id_lines_are_renamed_too(tmp_path, start_proxy):
    def respond(request):
        return (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
                + _chunk_event("upstream-id", "a", b"event: message\n")
                + _chunk_event("upstream-id", "b", b"id: 2\n") + b"data: [DONE]\n\n")

    with raw_upstream(respond) as url:
        cfg = write_config(tmp_path / "providers.yaml", [model_entry("m1", url, tmp_path, fast_path=True)],
                           num_retries=0)
        proxy = start_proxy(cfg)
        chunks = list(client(proxy).chat.completions.create(model="m1", messages=MESSAGES, stream=True))
    assert [(c.model, c.choices[0].delta.content) for c in chunks] == [("m1", "a"), ("m1", "b")]


def test_the_litellm_path_keeps_openai_s_null_fields_and_empty_usage_choices(tmp_path, start_proxy):
    """A tool-call answer's message has content: null, a chunk's finish_reason is null until the
    end, and the usage chunk of include_usage has no choices, as from OpenAI (strict decoders
    require them; litellm's dump without its empty fields had dropped them)."""
    import json

    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    completion = {"id": "cmpl-1", "object": "chat.completion", "created": 7, "model": "up",
                  "choices": [{"index": 0, "finish_reason": "tool_calls",
                               "message": {"role": "assistant", "content": None, "tool_calls": [call]}}],
                  "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}

    def respond(request):
        if not request.get("stream"):
            return _json_reply(completion)
        head = {"id": "c", "object": "chat.completion.chunk", "created": 7, "model": "up"}
        events = [{**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"},
                                        "finish_reason": None}]},
                  {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                  {**head, "choices": [], "usage": completion["usage"]}]
        return (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n"
                + b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n")

    with raw_upstream(respond) as url:
        cfg = write_config(tmp_path / "providers.yaml", [model_entry("m1", url, tmp_path, fast_path=False)],
                           num_retries=0)
        proxy = start_proxy(cfg)
        body = {"model": "m1", "messages": MESSAGES}
        answer = httpx.post(f"{proxy.url}/chat/completions", json=body, timeout=60).json()
        streamed = httpx.post(f"{proxy.url}/chat/completions", timeout=60,
                              json={**body, "stream": True, "stream_options": {"include_usage": True}}).text
    message = answer["choices"][0]["message"]
    assert "content" in message and message["content"] is None and message["tool_calls"][0]["id"] == "call_1"
    chunks = [json.loads(e[len("data: "):]) for e in streamed.strip().split("\n\n") if e != "data: [DONE]"]
    assert all("finish_reason" in c for chunk in chunks for c in chunk["choices"])
    assert chunks[0]["choices"][0]["finish_reason"] is None
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 8
    assert streamed.endswith("data: [DONE]\n\n")


def test_a_client_leaving_before_the_first_event_closes_the_upstream_connection(tmp_path, start_proxy):
    """The upstream sent its headers and is still thinking (a reasoning model, a queued vLLM
    request): a client that leaves now must stop the generation, not leave it to run for nobody."""
    import asyncio
    import threading

    closed = threading.Event()

    async def respond(request, reader, writer):
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")
        await writer.drain()
        try:
            if await asyncio.wait_for(reader.read(1), 10) == b"":  # the proxy hung up
                closed.set()
        except (asyncio.TimeoutError, ConnectionError):
            pass

    with raw_upstream(respond) as url:
        cfg = write_config(tmp_path / "providers.yaml", [model_entry("m1", url, tmp_path, fast_path=True)],
                           num_retries=0)
        proxy = start_proxy(cfg)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{proxy.url}/chat/completions", timeout=httpx.Timeout(10, read=0.5),
                       json={"model": "m1", "messages": MESSAGES, "stream": True})
        assert closed.wait(5), "the upstream connection stayed open after the client left"


def test_a_client_that_drops_its_upload_is_a_499_not_a_500(tmp_path, upstream, start_proxy, caplog):
    import socket
    from urllib.parse import urlsplit

    proxy = setup(tmp_path, upstream, start_proxy, True)
    host = urlsplit(proxy.base)
    caplog.set_level(logging.INFO)
    for _ in range(3):
        with socket.create_connection((host.hostname, host.port)) as conn:
            conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
                         b"content-length: 100000\r\n\r\n" + b'{"model": "auto", "messages": [' + b" " * 1000)
        time.sleep(0.2)
    metrics = scrape(proxy.base)
    assert metrics.get(("satroute_requests_total", (("model", "none"), ("status", "499")))) == 3
    assert ("satroute_requests_total", (("model", "none"), ("status", "500"))) not in metrics
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert upstream.bodies() == []


def test_a_client_that_leaves_while_its_request_is_scored_is_let_go(tmp_path, upstream, start_proxy):
    """Scoring is for a client that waits: one that leaves is not answered, counted or logged as
    degraded when the scorer's timeout would have passed; the call itself finishes and its scores
    are remembered for the client's retry."""
    class Slow(RecordingScorer):
        def score(self, instruction, candidates):
            time.sleep(1.0)
            return super().score(instruction, candidates)

    scorer = Slow({"m1": 0.9, "m2": 0.5, "m3": 0.1})
    models = [model_entry(n, upstream.url, tmp_path, fast_path=True) for n in ("m1", "m2", "m3")]
    proxy = start_proxy(write_config(tmp_path / "providers.yaml", models, scorer_timeout_s=3.0), scorer=scorer)
    body = {"model": "auto", "messages": MESSAGES}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{proxy.url}/chat/completions", json=body, timeout=httpx.Timeout(10, read=0.3))
    time.sleep(1.5)  # the scoring call ends meanwhile
    metrics = scrape(proxy.base)
    assert metrics.get(("satroute_requests_total", (("model", "none"), ("status", "499")))) == 1
    assert not [k for k in metrics if k[0] == "satroute_routing_decisions_total"]
    assert upstream.bodies() == []
    retry = client(proxy).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    assert retry.headers["x-satroute-model"] == "m1" and len(scorer.calls) == 1  # remembered


def test_a_queued_scoring_call_nobody_waits_for_any_more_is_skipped(tmp_path, upstream, start_proxy):
    """Clients that hang up while their requests wait for the scorer (a stop button, a client's
    timeout): their queued calls ran anyway, one after the other, and held the next live request
    for seconds. A queued call whose every request has left is skipped; the running one finishes."""
    class Slow(RecordingScorer):
        def score(self, instruction, candidates):
            time.sleep(0.5)
            return super().score(instruction, candidates)

    scorer = Slow({"m1": 0.9, "m2": 0.5})
    models = [model_entry(n, upstream.url, tmp_path, fast_path=True) for n in ("m1", "m2")]
    proxy = start_proxy(write_config(tmp_path / "providers.yaml", models, scorer_timeout_s=10.0), scorer=scorer)

    def leave_early(text):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{proxy.url}/chat/completions", timeout=httpx.Timeout(10, read=0.2),
                       json={"model": "auto", "messages": [{"role": "user", "content": text}]})

    threads = [threading.Thread(target=leave_early, args=(f"question {i}",)) for i in range(4)]
    for t in threads:
        t.start()
        time.sleep(0.02)  # in order: the first one's call runs, the others' queue behind it
    for t in threads:
        t.join()
    started = time.monotonic()
    live = client(proxy).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "the live one"}])
    waited = time.monotonic() - started
    assert live.headers["x-satroute-model"] == "m1" and live.headers["x-satroute-route"] == "routed"
    asked = [c[0] for c in scorer.calls]
    assert len(asked) == 2 and asked[-1] == "the live one"  # the running one, then: the queued three skipped
    assert waited < 1.5  # the running call's rest and its own, not three more calls first


async def test_a_503_s_retry_after_reaches_a_caller_that_waits_on_the_model_itself(tmp_path, upstream):
    """Onboarding waits on its model: it honoured a 429's Retry-After and not a 503's (RFC 9110
    gives both), asking again on its own 1, 2, 4 s backoff. A client is not told to wait (its
    other models may answer): the Retry-After of a failure only goes back when all were 429s."""
    from proxy.cooldown import Cooldowns
    from proxy.dispatch import Call, RetryingDispatcher
    from proxy.errors import AllUpstreamsFailed
    from proxy.providers import ProviderRegistry

    cfg = write_config(tmp_path / "providers.yaml", [model_entry("m1", upstream.url, tmp_path, fast_path=True)],
                       num_retries=0, retry_after_max_s=1)
    snap = ProviderRegistry(cfg, dict).snapshot
    upstream.set("m1", fail(503, "down for maintenance", retry_after=45))
    dispatcher = RetryingDispatcher(Cooldowns())
    try:
        with pytest.raises(AllUpstreamsFailed) as err:
            await dispatcher.complete(Call(targets=[snap.models["m1"]], body={"model": "m1", "messages": MESSAGES},
                                           stream=False, router=snap.router, redact=snap.redact))
    finally:
        await dispatcher.close()
    assert err.value.upstream_retry_after == 45 and err.value.retry_after is None


@pytest.mark.parametrize("path", ["passthrough", "litellm", "anthropic"])
def test_an_upstream_s_redirect_is_not_followed_to_another_host(tmp_path, upstream, start_proxy, path):
    """An upstream answering 307 (a moved domain, a gateway, a hijacked name) had the request sent
    on, prompt and headers with it: httpx and aiohttp drop Authorization across origins, not an
    x-api-key (Anthropic's key, through litellm) or an admin's extra_headers. A redirect is now
    the model's failure: a routed request goes to the next model, and nothing reaches the other
    host."""
    def moved(request):
        return (b"HTTP/1.1 307 Temporary Redirect\r\nLocation: " + upstream.url.encode()
                + b"/chat/completions\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    with raw_upstream(moved) as url:
        hop = model_entry("hop", url, tmp_path, key="sk-ant-0123456789abcdef",
                          fast_path=path == "passthrough")
        hop["litellm_params"]["extra_headers"] = {"x-gateway-key": "gw-0123456789abcdef"}
        if path == "anthropic":
            hop["litellm_params"]["model"] = "anthropic/claude-3-5-sonnet-20241022"
            hop["litellm_params"]["api_base"] = url.removesuffix("/v1")
        cfg = write_config(tmp_path / "providers.yaml", [hop, model_entry("m2", upstream.url, tmp_path)],
                           num_retries=0)
        proxy = start_proxy(cfg, scorer=RecordingScorer({"hop": 1.0, "m2": 0.5}))
        raw = client(proxy).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
        assert raw.parse().model == "m2" and raw.headers["x-satroute-failed"] == "hop:bad_answer"
        with pytest.raises(openai.APIStatusError) as err:
            client(proxy).chat.completions.create(model="hop", messages=MESSAGES)
    assert err.value.status_code == 502 and "hop (bad_answer)" in err.value.message
    assert [r.body.get("model") for r in upstream.received] == ["m2"]  # nothing followed the 307


SECRET_PROMPT = "PATIENT-RECORD-4471 John Doe"


@pytest.mark.parametrize("fast", PATHS)
@pytest.mark.parametrize("prompts", [False, True], ids=["prompts_off", "prompts_on"])
def test_an_upstream_error_quoting_the_prompt_is_logged_by_its_status_and_labels_unless_prompts_are(
        tmp_path, upstream, start_proxy, caplog, fast, prompts):
    """Upstreams quote the request in their errors (a 500 "while processing '...'", a 400 with the
    messages' input_value): with SATROUTE_LOG_PROMPTS off the text reached the log through the
    lines that say a model failed, refused the request or could not take it. It is logged by its
    status and its error's type and code; the client gets the upstream's words either way."""
    models = [model_entry(n, upstream.url, tmp_path, fast_path=fast) for n in ("m1", "m2", "m3", "m4")]
    cfg = write_config(tmp_path / "providers.yaml", models, num_retries=0, max_fallbacks=3)
    proxy = start_proxy(cfg, scorer=RecordingScorer({"m1": 0.9, "m2": 0.7, "m3": 0.5, "m4": 0.1}),
                        log_prompts=prompts)
    upstream.set("m1", fail(500, f"Internal error while processing prompt '{SECRET_PROMPT}'"))
    upstream.set("m2", fail(403, f"model not allowed for this prompt: {SECRET_PROMPT}", "permission_error"))
    upstream.set("m3", fail(400, "This model's maximum context length is 8192 tokens; input_value="
                            f"[{{'role': 'user', 'content': '{SECRET_PROMPT}'}}]", "invalid_request_error"))
    caplog.set_level(logging.WARNING, logger="satroute.dispatch")
    raw = client(proxy).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": SECRET_PROMPT}])
    assert raw.headers["x-satroute-failed"] == "m1:http_500,m2:http_403,m3:context_window"
    said = [r.getMessage() for r in caplog.records if r.name == "satroute.dispatch"]
    assert len(said) == 3, said
    assert all(SECRET_PROMPT in line for line in said) is prompts
    if not prompts:
        assert not any(SECRET_PROMPT in line for line in said)
        assert "model m1 failed: m1: " in said[0] and "HTTP 500" in said[0] and "mock_error" in said[0]
        assert said[1] == "model m2 refused the request: HTTP 403 (permission_error, mock_error)"
        assert said[2] == ("model m3 cannot take this request (context_window): HTTP 400 "
                           "(invalid_request_error, mock_error); the next model is tried")
    with pytest.raises(openai.PermissionDeniedError) as err:  # the client still reads the upstream's words
        client(proxy).chat.completions.create(model="m2", messages=[{"role": "user", "content": SECRET_PROMPT}])
    assert SECRET_PROMPT in err.value.message


def test_a_non_json_error_body_is_summed_up_by_its_status_alone():
    """A traceback the upstream sends as text quotes the request's values: none of it in the summary."""
    from proxy.upstream import classify

    body = f"Traceback (most recent call last):\n  ValueError: bad input '{SECRET_PROMPT}'".encode()
    for status in (500, 422):
        err = classify(status, body, "m1", {}, str)
        assert SECRET_PROMPT in err.message and SECRET_PROMPT not in err.summary
        assert err.summary == (f"m1: HTTP {status}" if status == 500 else f"HTTP {status}")


async def test_a_litellm_stream_chunk_that_cannot_be_read_is_logged_by_its_type_unless_prompts_are(caplog):
    from proxy.dispatch import _litellm_chunks

    class Chunk:
        model = "x"

        def model_dump(self, exclude_none=True):
            return {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": self.model,
                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"}}]}

    async def stream():
        yield Chunk()
        raise ValueError(f"cannot read chunk {{'content': '{SECRET_PROMPT}'}}")

    caplog.set_level(logging.WARNING, logger="satroute.dispatch")
    for texts in (False, True):
        caplog.clear()
        chunks = stream()
        events = [e async for e in _litellm_chunks(await anext(chunks), chunks, "m1", KeyError, str, texts=texts)]
        assert b"could not be read" in events[-1]
        [line] = [r.getMessage() for r in caplog.records]
        assert line.startswith("m1: the model's stream could not be read: ")
        assert (SECRET_PROMPT in line) is texts and ("ValueError" in line)


def _profiled(tmp_path, name: str, mean: float) -> dict:
    import json

    (tmp_path / f"{name}.json").write_text(json.dumps({"model": name, "tasks": {"t1": mean, "t2": mean}}))
    entry = model_entry(name, "http://127.0.0.1:9", tmp_path, profile=False)
    entry["model_info"]["capability_profile"] = f"{name}.json"
    return entry


@pytest.mark.parametrize("limit, read", [(None, 20), (3, 3), (0, 25)])
def test_the_scorer_reads_the_candidates_with_the_best_means_past_its_limit(tmp_path, start_proxy, limit, read):
    """With no limit, the scorer read every candidate in one pass: 60 took about 2 s on a CPU, the
    scorer's timeout, and most requests were ranked by the means alone. Past
    max_scored_candidates it reads those with the best profile means; the others come after
    them, best mean first, shown unscored."""
    means = {f"m{i:02d}": (i * 7 % 25) / 25 for i in range(25)}  # all different, not in config order
    router = {} if limit is None else {"max_scored_candidates": limit}
    cfg = write_config(tmp_path / "providers.yaml", [_profiled(tmp_path, n, m) for n, m in means.items()],
                       **router)
    scorer = RecordingScorer({"m00": 9.0})  # the worst mean: read only without a limit
    proxy = start_proxy(cfg, scorer=scorer)
    r = httpx.post(f"{proxy.base}/admin/route", json={"model": "auto", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
    best = sorted(means, key=lambda n: -means[n])
    (_, asked), = scorer.calls
    assert sorted(asked) == sorted(best[:read])
    ranked = [e["model"] for e in r.json()["ranked"]]
    assert sorted(ranked[:read]) == sorted(best[:read]) and ranked[read:] == best[read:]
    assert all(e["score"] is None or e["score"] == float("-inf") for e in r.json()["ranked"][read:])
    assert r.json()["chosen"] == ("m00" if read == 25 else ranked[0])


_TGI = {
    # text-generation-inference's GenerationError: the server failed while generating
    "424": (424, {"error": "Request failed during generation: Server error: CUDA out of memory",
                  "error_type": "generation"}, "bad:http_424"),
    # its validation of a request longer than the model's max_total_tokens
    "422": (422, {"error": "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096. "
                           "Given: 4000 `inputs` tokens and 200 `max_new_tokens`", "error_type": "validation"},
            "bad:context_window"),
}


@pytest.mark.parametrize("fast", PATHS)
@pytest.mark.parametrize("case", sorted(_TGI))
def test_text_generation_inference_s_failures_hand_a_routed_request_on(tmp_path, upstream, start_proxy, fast,
                                                                       case):
    """Its 424 (the GPU failed mid-generation) went back to the client as the client's own
    error, the next model never tried; its 422 for a request past the context fell back on
    litellm's path only. A request naming the model gets TGI's own words, not a repr."""
    status, said, failed = _TGI[case]
    raw, named = _routed_and_named(tmp_path, upstream, start_proxy, fast, status, said)
    assert raw.parse().model == "ok"
    assert raw.headers["x-satroute-failed"].startswith(failed), raw.headers["x-satroute-failed"]
    if status == 422:
        assert named.status_code == 422
        assert named.body["message"] == said["error"]  # the upstream's text, on both paths


def _routed_and_named(tmp_path, upstream, start_proxy, fast, status: int, said: dict):
    """A model "bad" that answers everything with ``status`` and the JSON ``said``, ranked above a
    healthy "ok": the answer a routed request gets, and the error a request naming "bad" gets."""
    import json

    reply = (f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n".encode()
             + json.dumps(said).encode())
    with raw_upstream(lambda request: reply) as url:
        models = [model_entry("bad", url, tmp_path, fast_path=fast), model_entry("ok", upstream.url, tmp_path)]
        cfg = write_config(tmp_path / "providers.yaml", models, num_retries=0)
        proxy = start_proxy(cfg, scorer=RecordingScorer({"bad": 0.9, "ok": 0.1}))
        raw = client(proxy).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
        with pytest.raises(openai.APIStatusError) as named:
            client(proxy).chat.completions.create(model="bad", messages=MESSAGES)
    return raw, named.value


@pytest.mark.parametrize("fast", PATHS)
def test_an_upstream_that_says_not_to_retry_is_not_asked_again(tmp_path, upstream, start_proxy, fast):
    """A satroute (or a LiteLLM proxy) in front of the model answers its last failure with
    `x-should-retry: false`, having retried already: asking it again ran its whole cascade three
    times, nine calls to the model for one request. The next model is still tried."""
    proxy = setup(tmp_path, upstream, start_proxy, fast)
    upstream.set("m1", fail(502, "every model failed", headers={"x-should-retry": "false"}))
    with pytest.raises(openai.APIStatusError):
        client(proxy).chat.completions.create(model="m1", messages=MESSAGES)
    assert len(upstream.bodies("m1")) == 1
    raw = client(proxy).chat.completions.with_raw_response.create(model="auto", messages=MESSAGES)
    assert raw.parse().model == "m2" and len(upstream.bodies("m1")) == 2


@pytest.mark.parametrize("fast", PATHS)
def test_a_gateway_s_error_label_does_not_hide_its_message(tmp_path, upstream, start_proxy, fast):
    """NestJS, Fastify and Spring answer {"statusCode": 400, "error": "Bad Request", "message": ...}:
    the client got "Bad Request" alone, and a model saying it cannot read images was not seen as
    such (a routed request no longer fell back)."""
    said = {"statusCode": 400, "error": "Bad Request", "message": "This model does not support images"}
    raw, named = _routed_and_named(tmp_path, upstream, start_proxy, fast, 400, said)
    assert raw.parse().model == "ok" and raw.headers["x-satroute-failed"] == "bad:unsupported_feature"
    assert named.status_code == 400 and named.body["message"] == "This model does not support images"
