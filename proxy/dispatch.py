"""Dispatch: retries, per-request deadline, fallback, cooldown; the only module that imports litellm.

Owns: calling the ranked targets of one request until one answers. Each target gets bounded
attempts (tenacity: exponential backoff with jitter, at least the wait the upstream names, never past
the request's deadline); a target that still fails before the first byte reaches the client hands
over to the next-ranked one (at once, not retried, after a timeout or a rate limit: a 429, or a
wait the upstream names), and so does a model refusal (401/402/403/404: its key, credit or name)
or a parameter its provider does not take; transient failures and refusals feed the cooldowns;
other upstream 4xx answers go back to the client as they are, without retry or fallback. A caller
that asks for it (``Call.attempts``: onboarding, which counts its spend) gets how each attempt ended
and whether the upstream may have billed it without an answer (``Attempt``); one that paces its
requests itself (``Call.paced``: onboarding) gets a rate limit (429, 503, 529, a Retry-After) at
once, without retries.
Two ways to make one attempt, chosen per model in providers.py (``Deployment.fast_path``):
- pass-through (``upstream.py``) for OpenAI-compatible upstreams: the body goes out as the client
  sent it, over a pooled HTTP client; litellm's own per-call cost is not paid (docs/benchmarks.md);
- ``litellm.acompletion`` for every provider that needs request translation (Anthropic, Bedrock,
  Gemini, Ollama's native API, ...).
Does not know: HTTP serving, routing policy, where the targets came from.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import gc
import hashlib
import logging
import os
import random
import re
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Mapping, Protocol, Sequence

import orjson
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from proxy.cooldown import Cooldowns
from proxy.errors import AllUpstreamsFailed, UpstreamClientError, UpstreamError, UpstreamTransient
from proxy.grammars import GrammarCheck
from proxy.localserver import LOCAL_ONLY_FIELDS, llama_cpp_request
from proxy.logs import adopt_loggers
from proxy.protocol import OPENAI_CHAT_PARAMS
from proxy.providers import OPENAI_COMPATIBLE, Deployment, RouterSettings
from proxy.routing import part_types
from proxy.settings import prepare_litellm_environment
from proxy.upstream import (CONTEXT_WINDOW, GENERATION_FAILED, LIMIT_NAMES, UNSUPPORTED, Answer, PassThrough,
                            StreamStalled, cannot_read, classify, dumps_lenient, error_labels, error_object,
                            interrupted_event, labelled, limited, out_of_quota, redirected, retried_already,
                            too_long, transient, unfit_request, unfit_summary, wait_seconds, within_gaps)

log = logging.getLogger("satroute.dispatch")


@dataclass
class Call:
    """One request to dispatch: the targets best first (fallbacks after the first)."""

    targets: Sequence[Deployment]
    body: Mapping[str, Any]  # the client's body; ``model`` is replaced per target
    stream: bool
    router: RouterSettings
    redact: Callable[[str], str] = str
    deadline: float = 0.0  # time.monotonic() by which the first byte must be in hand; 0: router's
    # the cooldowns' epochs as of the configuration ``targets`` come from (Cooldowns.epochs); None:
    # as of each call, for targets read from the configuration just before
    epochs: Mapping[str, int] | None = None
    # where given, how each attempt ended is appended to it (``Attempt``): onboarding counts those
    # the upstream may have billed without an answer; None (traffic): nothing is recorded
    attempts: list["Attempt"] | None = None
    # the caller paces its own requests to the upstream (onboarding: many questions at once): a
    # failure that says the upstream limits how fast it is asked (``UpstreamTransient.slow_down``)
    # is raised at once, not waited out and retried here, so that the caller holds all its
    # requests, not this one alone
    paced: bool = False
    digest: bytes | None = field(default=None, init=False)  # of the body, once needed (_cause)

    def note(self, model: str, failure: UpstreamClientError | UpstreamTransient | None = None) -> None:
        """Record one attempt to ``model`` in ``attempts`` (where given): answered (``failure``
        None), or failed with ``failure``."""
        if self.attempts is not None:
            self.attempts.append(Attempt.of(model, failure))


@dataclass
class Reply:
    """What answered: ``body`` (JSON bytes) or ``chunks`` (SSE events), model fields renamed."""

    model: str
    failed: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | None = None
    chunks: AsyncIterator[bytes] | None = None


# an upstream's answers that refuse a request before generating any of it, besides every 3xx and
# 4xx: unavailable (503), overloaded (Anthropic's 529)
_REFUSED_UNSERVED = frozenset({503, 529})


@dataclass(frozen=True)
class Attempt:
    """How one attempt of a call ended: ``outcome`` is "answered", or why it failed as
    ``x-satroute-failed`` says it ("timeout", "connection", "http_503", "bad_answer", ...).
    ``billed``: the upstream may have generated, and billed, an answer the call did not get: the
    request was sent and no answer of the upstream's said it was refused unserved (a timeout, a
    connection cut after sending, a 5xx other than 503 and 529: a gateway's 502, 504 or 524 while
    the model went on, a 500 midway, text-generation-inference's 424 (``GENERATION_FAILED``); a
    200 that carries no answer; one cancelled while it was out, ``cancelled``, unless it is known
    not to have been sent: on the pass-through path, cut before its headers were written, while
    its host was being resolved or connected to). Never billed: a connection that was never made,
    another 3xx or 4xx (429 included), a 503 or 529, a request refused before sending."""

    model: str
    outcome: str
    billed: bool = False

    @classmethod
    def of(cls, model: str, failure: UpstreamClientError | UpstreamTransient | None) -> "Attempt":
        if failure is None:
            return cls(model, "answered")
        if isinstance(failure, UpstreamClientError):  # a 4xx, or refused before it was sent
            return cls(model, failure.reason)
        status = failure.upstream_status
        refused = not failure.timeout and (300 <= status < 500 and status != GENERATION_FAILED
                                           or status in _REFUSED_UNSERVED)
        return cls(model, _reason(failure), failure.sent and not refused)


class Dispatcher(Protocol):
    async def complete(self, call: Call) -> Reply: ...


# 5xx that say the upstream is unreachable or overloaded, whatever was asked: gateways (502-504),
# Cloudflare's origin down, refused, timed out (520-524), Anthropic's overloaded_error (529)
_UNAVAILABLE_5XX = frozenset({502, 503, 504, 520, 521, 522, 523, 524, 529})


def _cause(exc: UpstreamTransient, call: "Call") -> bytes | None:
    """What a failure counts under towards the cooldown: the request (a digest of its body, the
    ``model`` aside) when the upstream answered with an error that may be the request's own (a
    ``5xx`` not in ``_UNAVAILABLE_5XX``, text-generation-inference's ``424``), so that its
    retries, by the proxy or by its client, count once; None when nothing answered, in time or at
    all, the upstream said it is unavailable or overloaded (``408``, ``409``, ``425``, ``429``,
    ``_UNAVAILABLE_5XX``), or it answered 200 with no answer (an HTML page: a wrong ``api_base``, a
    captive portal): that is the model's state, and every attempt counts."""
    status = exc.upstream_status
    if exc.timeout or not (500 <= status < 600 or status == GENERATION_FAILED) or status in _UNAVAILABLE_5XX:
        return None
    if call.digest is None:  # once per request, however many of its attempts fail so
        rest = {k: v for k, v in call.body.items() if k != "model"}
        call.digest = hashlib.blake2b(dumps_lenient(rest), digest_size=16).digest()
    return call.digest


class RetryingDispatcher:
    def __init__(self, cooldowns: Cooldowns, passthrough: PassThrough | None = None,
                 metrics: Any = None, log_prompts: bool = False):
        self.cooldowns = cooldowns
        # SATROUTE_LOG_PROMPTS: off, a failure is logged by its summary, without the upstream's
        # words (or litellm's), which may quote the request back
        self.log_prompts = log_prompts
        self.metrics = metrics  # proxy.metrics.Metrics or None: retries, fallbacks, latency
        self.passthrough = passthrough or PassThrough()
        self.grammars = GrammarCheck()  # what a local model's server is sent, checked first
        self._litellm: Any = None
        self._import_lock = asyncio.Lock()
        self._busy: collections.Counter[str] = collections.Counter()  # calls under way, by model
        self._unusable: dict[tuple[str, str, str], str | None] = {}  # litellm's provider check, remembered
        # called once litellm is imported, when ``unusable`` starts to tell (the registry asks again)
        self.on_litellm: list[Callable[[], None]] = []

    def busy(self, name: str) -> int:
        """How many calls to model ``name`` are under way, from their first attempt to the last
        byte of their answer (a stream's end, or its close or drop when the client left): what a
        local server's restart waits for before it stops the old one."""
        return self._busy[name]

    async def _held(self, name: str, attempts: Awaitable[Answer]) -> Answer:
        self._busy[name] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._busy[name] -= 1
                if self._busy[name] <= 0:  # no entry left behind per name ever called
                    del self._busy[name]

        try:
            answer = await attempts
            if answer.chunks is not None:  # held until the stream is done with
                return dataclasses.replace(answer, chunks=_HeldStream(answer.chunks, release))
        except BaseException:
            release()
            raise
        release()
        return answer

    async def close(self) -> None:
        await self.passthrough.close()

    def unusable(self, d: Deployment) -> str | None:
        """Why litellm cannot call model ``d`` at all: it finds no provider for its
        ``litellm_params.model`` (a misspelt prefix, a served id with a slash and no prefix). None
        when it can, on the pass-through path, and until litellm is imported (``prepare``; then
        ``on_litellm`` is called)."""
        if d.fast_path or self._litellm is None:
            return None
        provider = _custom_provider(d)
        key = (d.model, str(provider), str(d.api_base))
        if key not in self._unusable:
            if len(self._unusable) >= 1024:  # one entry per model ever configured: edits add more
                self._unusable.clear()
            try:
                self._litellm.get_llm_provider(model=d.model, custom_llm_provider=provider,
                                               api_base=d.api_base)
                self._unusable[key] = None
            except Exception:  # noqa: BLE001 (litellm's BadRequestError, or any failure to tell)
                self._unusable[key] = (
                    f"litellm knows no provider {d.model.partition('/')[0]!r} for litellm_params.model "
                    f"{d.model!r}: write <provider>/<model id>, as openai/{d.model} for an "
                    "OpenAI-compatible server")
        return self._unusable[key]

    async def prepare(self, models: Sequence[Deployment]) -> None:
        """Import litellm (seconds, once) when one of ``models`` is called through it, so that no
        request waits for the import; the pass-through path needs nothing."""
        if self._litellm is None and any(not d.fast_path for d in models):
            await self._import_litellm()

    async def complete(self, call: Call) -> Reply:
        router = call.router
        # a model added since start-up may be the first to need litellm: its import (seconds,
        # once) is paid before the request's deadline starts, not out of the upstream's time
        await self.prepare(call.targets)
        deadline = call.deadline or time.monotonic() + router.deadline_s
        failed: list[tuple[str, str]] = []
        timed_out = False
        all_429 = True  # every model tried answered 429: a rate limit, or a used-up quota
        last: UpstreamTransient | None = None
        said_after: float | None = None  # the longest Retry-After of the failures
        soonest: float | None = None  # the shortest: when a model may answer again
        unnamed = False  # a model rate limited the request without naming a wait: it may be soon
        for target in call.targets:
            if time.monotonic() >= deadline:
                timed_out = True
                break
            if failed and self.metrics is not None:
                self.metrics.observe_fallback(failed[-1][0], target.name)
            # its failures count only for the upstream it goes to, the one the plan's configuration names
            epoch = (call.epochs.get(target.name, 0) if call.epochs is not None
                     else self.cooldowns.epoch(target.name))
            called = [self.cooldowns.now()]  # when its last attempt was made
            try:
                answer = await self._held(target.name,
                                          self._with_retries(target, call, deadline, epoch,
                                                             last=target is call.targets[-1], called=called))
            except UpstreamClientError as exc:  # its answer goes back as it is, with what failed before
                if exc.unfit is not None and target is not call.targets[-1]:
                    # this model cannot take the request's parameters (or its length), another
                    # may: the model's health is not in question (no cooldown)
                    failed.append((target.name, exc.unfit))
                    all_429 = False
                    log.warning("%s; the next model is tried", self._told(exc))  # it names the model
                    continue
                # the model is unusable, not the request: it falls back, and counts towards the
                # model's cooldown; any other 4xx is about the request and goes back as is
                if exc.refuses_the_model():
                    if (self.cooldowns.failure(target.name, router.allowed_fails, router.cooldown_s, epoch,
                                               why=exc.reason)
                            and self.metrics is not None):
                        self.metrics.observe_cooldown(target.name)
                    quota = exc.out_of_credit  # a used-up quota (the one 429 that is refused), no credit
                    # a routed request: the next model answers; the last model out of quota after
                    # others rate limited it: the client is told when those may answer (below)
                    if target is not call.targets[-1] or (quota and last is not None and all_429):
                        failed.append((target.name, exc.reason))
                        all_429 = all_429 and quota
                        log.warning("model %s refused the request: %s", target.name, self._told(exc))
                        continue
                exc.failed = failed
                raise
            except UpstreamTransient as exc:
                failed.append((target.name, _reason(exc)))
                if exc.retry_after is not None:
                    said_after = max(said_after or 0.0, exc.retry_after)
                    soonest = min(soonest if soonest is not None else exc.retry_after, exc.retry_after)
                elif exc.upstream_status == 429:
                    unnamed = True
                timed_out = exc.timeout
                all_429 = all_429 and exc.upstream_status == 429
                last = exc
                log.warning("model %s failed: %s", target.name, self._told(exc))
                continue
            self.cooldowns.success(target.name, epoch, since=called[0])
            return Reply(model=target.name, failed=failed, body=answer.body, chunks=answer.chunks)
        names = ", ".join(f"{n} ({r})" for n, r in failed) or "none tried before the deadline"
        err = AllUpstreamsFailed(f"every model failed: {names}", failed=failed, timeout=timed_out)
        err.upstream_retry_after = said_after
        err.slow_down = last is not None and last.slow_down
        if last is not None:  # what failed, in its words ("Overloaded"; for a 429, which limit)
            err.message = f"{err.message}; the last said: {last.message}"
            err.summary = f"{err.summary}; the last said: {last.summary}"
        if last is not None and all_429:  # rate limited, the models out of quota aside
            err.status, err.code = 429, "rate_limited"
            # when a model may take it again: the soonest wait named, unless one named none (then
            # the client's own backoff is the wait, not another model's hour), and never past
            # cooldown_max_s, after which the proxy asks the model again whatever it said
            err.retry_after = None if unnamed or soonest is None else min(soonest, router.cooldown_max_s)
        raise err

    def _told(self, exc: UpstreamError) -> str:
        """What the log says of a model's failure: its message while prompts are logged, else its
        summary (its status and error labels, no words of the upstream's)."""
        return exc.message if self.log_prompts else exc.summary

    async def _with_retries(self, d: Deployment, call: Call, deadline: float, epoch: int,
                            last: bool = True, called: list[float] | None = None) -> Answer:
        """``d``'s attempts; ``called[0]`` is set to when each is made. Unless it is the ``last``
        model to try, they stop once ``d`` cools down (its failures, or other requests', put it
        there, before or during a wait between attempts), times out, or is rate limited (``_waits``):
        the next-ranked model answers."""
        router = call.router
        failure: UpstreamTransient | None = None
        retrying = AsyncRetrying(
            stop=_Stop(router.num_retries + 1, deadline),
            wait=_Wait(router.retry_backoff_s, router.retry_backoff_max_s, router.retry_after_max_s),
            # a timeout is not asked again of the same model while another one may answer: it
            # took the whole attempt's time, and a model that hangs would take it again; nor is a
            # rate limit (a 429, or any failure that names a wait): the next model may answer now
            # a caller that paces itself (``Call.paced``) gets a rate limit at once
            # nor is a failure whose answer says a proxy in front of the model retried it already
            retry=retry_if_exception(lambda exc: isinstance(exc, UpstreamTransient)
                                     and not exc.retried and not (call.paced and exc.slow_down)
                                     and (last or not (exc.timeout or _waits(exc)
                                                       or self.cooldowns.cooling(d.name)))),
            reraise=True, sleep=asyncio.sleep)
        async for attempt in retrying:
            with attempt:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise UpstreamTransient(f"{d.name}: request deadline reached", model=d.name,
                                            status=504, timeout=True)
                if failure is not None and not last and self.cooldowns.cooling(d.name):
                    raise failure  # it cooled while this request waited to ask it again
                if self.metrics is not None and attempt.retry_state.attempt_number > 1:
                    self.metrics.observe_retry(d.name)
                started = time.perf_counter()
                budget = min(attempt_timeout(d, router, call.stream), remaining)
                timed = True
                if called is not None:
                    called[0] = self.cooldowns.now()
                sent: list[bool | None] = [None]  # None: not known (litellm's call)
                try:
                    answer = await self._attempt(d, call, budget, sent)
                except asyncio.CancelledError:  # the client left: the upstream's time is unknown
                    timed = False
                    if call.attempts is not None:  # cut while out: billed unless known unsent
                        call.attempts.append(Attempt(d.name, "cancelled", billed=sent[0] is not False))
                    raise
                except UpstreamClientError as exc:  # refused before anything was sent: no upstream time
                    timed = exc.unfit in (None, CONTEXT_WINDOW, UNSUPPORTED)  # the model answered those
                    call.note(d.name, exc)
                    raise
                except UpstreamTransient as exc:
                    call.note(d.name, exc)
                    # a timeout the request's own deadline cut short, or a failure that may be the
                    # request's, says nothing about the model: it must not cool it for everyone
                    cut_short = exc.timeout and budget < attempt_timeout(d, router, call.stream)
                    if (exc.counts and not cut_short
                            and self.cooldowns.failure(d.name, router.allowed_fails, router.cooldown_s, epoch,
                                                       _cause(exc, call), why=_reason(exc),
                                                       wait=_cooling_wait(exc, router))
                            and self.metrics is not None):
                        self.metrics.observe_cooldown(d.name)
                    failure = exc
                    raise
                finally:
                    if self.metrics is not None and timed:  # to the answer, or a stream's first chunk
                        self.metrics.observe_upstream(d.name, time.perf_counter() - started)
                call.note(d.name)
                return answer
        raise AssertionError("unreachable: tenacity reraises the last failure")

    async def _attempt(self, d: Deployment, call: Call, first_byte_s: float,
                       sent: list[bool | None] | None = None) -> Answer:
        local = d.info.local_server
        if local is not None:  # llama-cpp-python's server: what it cannot read is put as it reads it
            # its defaults from litellm_params too: a max_completion_tokens there is as ignored.
            # A client's `grammar` (llama.cpp's own field, not OpenAI's) is not sent: some grammars
            # crash that server (a rule never defined, a left recursion), and with it the model for
            # every client; an admin's, in extra_body, is
            asked = {k: v for k, v in call.body.items() if k not in LOCAL_ONLY_FIELDS}
            body, why = llama_cpp_request(PassThrough.with_defaults(d, asked), vision=local.vision)
            if body is not None:  # a schema that would crash the server, for every client
                try:  # within the attempt's time: a burst of new schemas waits for its check
                    async with asyncio.timeout(first_byte_s):
                        why = await self.grammars.why_not(body, local.own_chat_format) or ""
                except TimeoutError:
                    why = "its JSON schemas could not be checked against its server's grammar parser in time"
                body = None if why else body
            if body is None:
                raise unfit_request(d.name, f"model {d.name} cannot take this request: {why}",
                                    "untranslatable", "untranslatable_request")
            call = dataclasses.replace(call, body=body)
        if d.fast_path:
            return await self.passthrough.attempt(d, call.body, call.stream, first_byte_s,
                                                  attempt_timeout(d, call.router, call.stream), call.redact,
                                                  connect_s=call.router.connect_timeout_s, sent=sent)
        return await self._litellm_attempt(d, call, first_byte_s)

    async def _import_litellm(self) -> Any:
        async with self._import_lock:
            if self._litellm is None:
                prepare_litellm_environment()

                def load() -> Any:
                    import litellm

                    litellm.suppress_debug_info = True
                    adopt_loggers("LiteLLM", "LiteLLM Router", "LiteLLM Proxy")
                    follow_no_redirects()
                    keep_provider_deltas()
                    return litellm

                self._litellm = await asyncio.to_thread(load)
                gc.freeze()  # its modules leave the collector's walks (see ScorerHost.load)
                for listener in self.on_litellm:
                    try:
                        listener()
                    except Exception as exc:  # noqa: BLE001 (the request that imported goes on)
                        log.error("after litellm's import: %s", type(exc).__name__)
        return self._litellm

    async def _litellm_attempt(self, d: Deployment, call: Call, first_byte_s: float) -> Answer:
        dropped = sorted(part_types(call.body) & d.dropped_parts)
        if dropped:  # sent without them, the model answered as if they were not there
            raise unfit_request(d.name, f"model {d.name} cannot take this request: litellm leaves "
                                f"{', '.join(dropped)} parts out of what it sends the model's provider",
                                "untranslatable", "untranslatable_request", param="messages")
        litellm = self._litellm or await self._import_litellm()
        import openai  # litellm's exceptions subclass the openai SDK's

        why = self.unusable(d)
        if why is not None:  # a request that reached it before the registry left it out
            text = f"The model '{d.name}' cannot be called: {why}"
            raise UpstreamClientError(text, status=404, model=d.name, upstream_body={"error": {
                "message": text, "type": "invalid_request_error", "param": None, "code": "model_not_found"}})
        # the client's limit on the answer, under either name, replaces the model's default under
        # either (LIMIT_NAMES): litellm would send both, which OpenAI refuses; a null the client
        # sent leaves the default in place (litellm reads a None keyword as not given)
        told = limited(call.body)
        kwargs = {k: v for k, v in d.params.items()  # the timeouts: below
                  if k not in ("max_retries", "num_retries", "timeout", "stream_timeout")
                  and not (told and k in LIMIT_NAMES)}
        provider = _custom_provider(d)
        if provider is not None:
            kwargs["custom_llm_provider"] = provider
        openai_like = _openai_like(d.provider, d.upstream_model)
        kwargs.update({k: v for k, v in litellm_request_kwargs(call.body, d, openai_like).items()
                       if not (v is None and k in kwargs)})
        if not openai_like:
            _fit_thinking(litellm, kwargs, d)
        # litellm's timeout bounds each read of a stream, like the pass-through's sock_read: the
        # whole timeout_s, not what the deadline left for the first chunk (asyncio.timeout below);
        # and the TCP connect by connect_timeout_s, as there: an unreachable host falls back soon
        import httpx

        limit = attempt_timeout(d, call.router, call.stream)
        kwargs.update(model=d.model, num_retries=0, max_retries=0,
                      timeout=httpx.Timeout(limit, connect=min(call.router.connect_timeout_s, limit)))
        if d.api_base:
            kwargs["api_base"] = d.api_base
        if d.api_key:
            kwargs["api_key"] = d.api_key
        elif d.api_base:
            # A self-hosted OpenAI-compatible server needs no key, but litellm's client insists.
            kwargs["api_key"] = "no-key"
        try:
            async with asyncio.timeout(first_byte_s):
                resp = await litellm.acompletion(**kwargs)
                if not call.stream:
                    resp.model = d.name
                    return Answer(body=dumps_lenient(openai_shape(resp.model_dump(exclude_none=True),
                                                                  translated=not openai_like)))
                first = await anext(aiter(resp), None)
                if first is not None and _finished_empty(first) and (openai_like or not _labelled_stream(resp)):
                    # litellm makes a stream of anything that answers 200 (an HTML page, an empty
                    # body, keep-alives only): one empty chunk that says "stop". An OpenAI-format
                    # answer never begins so (its first chunk names the role); a translated
                    # provider's empty answer does, so there the body's type must say it too.
                    raise UpstreamTransient(f"{d.name}: answered a stream request with no answer in it",
                                            model=d.name, status=200, reason="bad_answer")
        except TimeoutError:
            raise UpstreamTransient(f"{d.name}: no answer within {first_byte_s:.1f}s",
                                    model=d.name, status=504, timeout=True) from None
        except openai.OpenAIError as exc:
            raise _classify_litellm(exc, d.name, call.redact,
                                    local=d.info.local_server is not None) from None
        except UpstreamError:
            raise  # this function's own verdict on what litellm returned
        except Exception as exc:  # noqa: BLE001 (litellm's own failure, whatever it raised)
            raise _litellm_failed(exc, d.name, call.redact, texts=self.log_prompts) from None
        if first is None:
            raise UpstreamTransient(f"{d.name}: stream closed before its first chunk", model=d.name)
        return Answer(chunks=_litellm_chunks(first, resp, d.name, openai.OpenAIError, call.redact,
                                             translated=not openai_like, texts=self.log_prompts,
                                             gap_s=limit))


def _litellm_failed(exc: Exception, model: str, redact: Callable[[str], str],
                    texts: bool = False) -> UpstreamError:
    """An exception of litellm's that is none of its API errors (those subclass the openai SDK's):
    its own code failed on this request, building it for the provider (a ``TypeError`` on a value of
    a shape it did not expect) or reading it, where it does not map the failure to one of its
    errors. The request's, not the model's health's: not retried, not counted toward a cooldown; a
    routed request goes to another model, one naming this model gets a 400 saying what failed
    (``untranslatable``, as for a request litellm says it cannot translate). The log says where it
    was raised: it is litellm's fault to report upstream; its traceback and message only where
    ``texts`` (SATROUTE_LOG_PROMPTS), since the message may quote the request."""
    if texts:
        log.error("model %s: litellm failed on a request: %s", model, type(exc).__name__, exc_info=exc)
    else:
        frames = traceback.extract_tb(exc.__traceback__)
        where = f" in {frames[-1].name} ({os.path.basename(frames[-1].filename)}:{frames[-1].lineno})" if frames else ""
        log.error("model %s: litellm failed on a request: %s%s", model, type(exc).__name__, where)
    said = redact(f"{type(exc).__name__}: {exc}")[:300]
    return unfit_request(model, f"model {model} cannot take this request: litellm failed making it "
                                f"({said})", "untranslatable", "untranslatable_request",
                         summary=f"model {model} cannot take this request: litellm failed making it "
                                 f"({type(exc).__name__})")


# Anthropic's least thinking budget: thinking.budget_tokens must be at least this, and below max_tokens
_LEAST_THINKING_BUDGET = 1024


def _fit_thinking(litellm: Any, kwargs: dict[str, Any], d: Deployment) -> None:
    """A ``reasoning_effort`` that litellm turns into Anthropic's thinking (Claude, also on Bedrock
    or Vertex AI), made a request Anthropic takes, or refused as one this model cannot take.

    litellm gives older Claude models a fixed ``thinking.budget_tokens`` per effort (low 1024,
    medium 2048, high 4096, ...) and keeps the request's limit on the answer, which Anthropic
    refuses unless it is above the budget; in OpenAI's terms that limit counts the reasoning too,
    so the budget is fitted under it (to the limit less one, as litellm fits one of its own), sent
    as ``thinking`` in place of the effort. A limit that leaves no room for Anthropic's least budget
    (``_LEAST_THINKING_BUDGET``), or a ``temperature`` other than 1 beside thinking (adaptive too),
    which Anthropic refuses, raise ``unfit_request``: a routed request goes to another model, one naming
    this model gets the 400. Anything else (no thinking, a provider litellm maps otherwise, a
    mapping litellm fails to make: its own call says why) is left as it is."""
    effort = kwargs.get("reasoning_effort")
    said = effort.get("effort") if isinstance(effort, dict) else effort
    if not isinstance(said, str) or said == "none" or "thinking" in kwargs:
        return
    limit_name = next((name for name in ("max_completion_tokens", "max_tokens") if isinstance(
        kwargs.get(name), (int, float)) and not isinstance(kwargs[name], bool)), None)
    temperature = kwargs.get("temperature")
    if limit_name is None and temperature in (None, 1):
        return  # nothing that could clash: litellm sets max_tokens above its budget itself
    try:
        model, provider, _, _ = litellm.get_llm_provider(
            model=d.model, custom_llm_provider=_custom_provider(d), api_base=d.api_base)
        thinking = litellm.get_optional_params(model=model, custom_llm_provider=provider,
                                               reasoning_effort=effort).get("thinking")
    except Exception:  # noqa: BLE001 (litellm's own call raises it again, classified)
        return
    if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "adaptive"):
        return
    if temperature not in (None, 1):
        raise unfit_request(
            d.name, f"model {d.name} cannot take the parameters ['reasoning_effort', 'temperature'] "
            f"together: its provider thinks for reasoning_effort {said!r}, and `temperature` may only "
            "be set to 1 when thinking is enabled. Send the request without one of them",
            "unsupported_params", "unsupported_parameter")
    budget, limit = thinking.get("budget_tokens"), kwargs.get(limit_name) if limit_name else None
    if thinking["type"] != "enabled" or not isinstance(budget, int) or limit is None or budget < limit:
        return
    if int(limit) - 1 < _LEAST_THINKING_BUDGET:
        raise unfit_request(
            d.name, f"model {d.name} cannot take the parameters ['reasoning_effort', '{limit_name}'] "
            f"together: its provider thinks for reasoning_effort {said!r} with a budget of at least "
            f"{_LEAST_THINKING_BUDGET} tokens, below the limit on the answer, and {limit_name} is "
            f"{limit}. Send a higher {limit_name}, or no reasoning_effort",
            "unsupported_params", "unsupported_parameter")
    del kwargs["reasoning_effort"]
    kwargs["thinking"] = {"type": "enabled", "budget_tokens": int(limit) - 1}


# the types a provider's own stream is sent as: SSE, Ollama's JSON lines, Bedrock's event stream
_STREAM_TYPES = ("event-stream", "ndjson", "jsonl", "json-seq", "eventstream")


def _labelled_stream(resp: Any) -> bool:
    sent = ((getattr(resp, "_hidden_params", None) or {}).get("additional_headers") or {}) \
        .get("llm_provider-content-type")
    return not isinstance(sent, str) or any(kind in sent.lower() for kind in _STREAM_TYPES)


def _finished_empty(chunk: Any) -> bool:
    """A first chunk that ends every choice without a word (no role, content or tool call)."""
    choices = getattr(chunk, "choices", None) or []
    return bool(choices) and all(getattr(c, "finish_reason", None) and not _delta_says(getattr(c, "delta", None))
                                 for c in choices)


def _delta_says(delta: Any) -> bool:
    if delta is None:
        return False
    return any(getattr(delta, key, None) for key in ("role", "content", "tool_calls", "function_call",
                                                      "refusal", "reasoning_content"))


class _HeldStream:
    """A streamed answer that keeps its model counted busy until it ends, fails, is closed or is
    dropped unread (a client that left before the first chunk never starts it)."""

    def __init__(self, chunks: AsyncIterator[bytes], release: Callable[[], None]):
        self._chunks, self._release = chunks, release

    def __aiter__(self) -> "_HeldStream":
        return self

    async def __anext__(self) -> bytes:
        try:
            return await self._chunks.__anext__()
        except BaseException:  # its end, an upstream failure, or the client gone (cancelled)
            self._release()
            raise

    async def aclose(self) -> None:
        self._release()
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None:
            await aclose()

    def __del__(self) -> None:
        self._release()


def attempt_timeout(d: Deployment, router: RouterSettings, stream: bool = False) -> float:
    """One attempt's limit for this model: its ``litellm_params.timeout`` (seconds) where it gives
    one, as litellm's own router reads it (a slow local or reasoning model may need more than
    the others), or for a streamed request its ``stream_timeout`` where it gives one, else
    ``router_settings.timeout_s``. The deadline bounds both. It is also the longest gap between
    a stream's events."""
    if stream and "stream_timeout" in d.params:
        # as LiteLLM reads it: one that is not a positive number (null, 0) is not given
        given = _seconds(d.params["stream_timeout"])
        if given is not None:
            return given
    own = d.params.get("timeout")
    if own is None:  # the usual case, on every attempt: no exception to raise and catch
        return router.timeout_s
    own = _seconds(own)
    return router.timeout_s if own is None else own


def _seconds(value: Any) -> float | None:
    """``value`` as a finite positive number of seconds, or None."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if 0 < seconds < float("inf") else None


@functools.lru_cache(maxsize=256)
def _openai_like(provider: str, model: str) -> bool:
    """Whether litellm calls this provider in OpenAI's format, merging ``extra_body`` into the
    request (OpenAI-compatible servers, Azure, and the providers litellm configures as OpenAI-like:
    Groq, OpenRouter, Together, DeepSeek, Mistral, ...). Call only once litellm is imported."""
    if provider in OPENAI_COMPATIBLE or provider in ("azure", "azure_ai"):
        return True
    try:
        from litellm.llms.openai.chat.gpt_transformation import OpenAIGPTConfig
        from litellm.types.utils import LlmProviders
        from litellm.utils import ProviderConfigManager

        config = ProviderConfigManager.get_provider_chat_config(model=model,
                                                                provider=LlmProviders(provider))
    except Exception:  # noqa: BLE001 (an unknown provider, or litellm moved these: not OpenAI-like)
        return False
    return isinstance(config, OpenAIGPTConfig)


def litellm_request_kwargs(body: Mapping[str, Any], d: Deployment,
                           openai_like: bool = True) -> dict[str, Any]:
    """The client's body as ``litellm.acompletion`` keywords: the OpenAI chat parameters
    (``protocol.OPENAI_CHAT_PARAMS``, which litellm translates for each provider) as they are.
    Never another keyword: litellm reads many as its own settings (``api_base``, ``base_url``,
    ``api_key``, ``extra_headers``, ``mock_response``, ``metadata``, ...), and a client must not
    choose where the configured credentials are sent.

    Every other field (but ``model``, which the target sets) goes under ``extra_body``, merged
    over the one in ``litellm_params``, for a provider called in OpenAI's format (``openai_like``);
    so does ``user``, which litellm keeps only for models in OpenAI's own catalogue. A translated
    provider (Anthropic, Gemini, ...) gets none of them: litellm would send ``extra_body`` as a
    field of its own, which such an API refuses, so a routed request carrying an OpenAI-only field
    (``metadata``, ``prompt_cache_key``) would fail on every such model. Such a provider's own
    fields on an assistant message (Gemini's ``thought_signatures``, as ``openai_shape`` gave them)
    go back where litellm reads them (``_set_aside``)."""
    # a null is left out: litellm reads a None keyword as not given, except where its own code
    # reads the value itself (``web_search_options: null`` raised a TypeError before any call)
    kwargs = {k: v for k, v in body.items() if k in OPENAI_CHAT_PARAMS and v is not None}
    extra = {k: v for k, v in body.items() if k not in OPENAI_CHAT_PARAMS and k != "model"}
    if not openai_like:
        if extra:
            log.debug("model %s: fields its provider does not take left out: %s",
                      d.name, ", ".join(sorted(extra)))
        if isinstance(kwargs.get("messages"), list):
            kwargs["messages"] = [_set_aside(message) for message in kwargs["messages"]]
        return kwargs
    if "user" in kwargs:
        extra["user"] = kwargs.pop("user")
    configured = d.params.get("extra_body")
    if extra:
        kwargs["extra_body"] = {**(configured if isinstance(configured, dict) else {}), **extra}
    return kwargs


# the fields of an assistant message that are OpenAI's, or litellm's place for the others
_OPENAI_ASSISTANT_FIELDS = frozenset({"role", "content", "name", "tool_calls", "function_call", "refusal",
                                      "audio", "provider_specific_fields"})


def _set_aside(message: Any) -> Any:
    """An assistant message of a client's, with the provider's own fields on it (Gemini's
    ``thought_signatures``, which ``openai_shape`` lifted from litellm's
    ``provider_specific_fields``) also under ``provider_specific_fields``, where litellm's
    translation reads them back (the client's own there win); any other message as it is."""
    if not isinstance(message, dict) or message.get("role") != "assistant":
        return message
    own = {k: v for k, v in message.items() if k not in _OPENAI_ASSISTANT_FIELDS}
    if not own:
        return message
    kept = message.get("provider_specific_fields")
    return {**message, "provider_specific_fields": {**own, **(kept if isinstance(kept, dict) else {})}}


# litellm's words for a parameter a provider does not take: its generic "does not support
# parameters: ['seed']", or a model family's own ("O-series models don't support temperature=0.0",
# "claude-opus-4-7 does not support temperature=0.0")
_LITELLM_PREFIX = re.compile(r"^(\s*litellm\.\w+:)+")
_UNSUPPORTED = re.compile(r"does not support parameters: (\[[^\]]*\])|n't support (\w+)=|"
                          r"does not support (\w+)=")


def _classify_litellm(exc: Exception, model: str, redact: Callable[[str], str],
                      local: bool = False) -> Exception:
    """What a litellm exception stands for, as ``upstream.classify`` says for the pass-through
    path (``local``: the model's upstream is its local llama-cpp-python server)."""
    import litellm

    message = redact(str(getattr(exc, "message", None) or exc))
    if isinstance(exc, litellm.UnsupportedParamsError):  # refused before anything was sent
        found = _UNSUPPORTED.search(message)
        names = found.group(1) or f"['{found.group(2) or found.group(3)}']" if found else None
        what = f"the parameters {names}" if names else "a parameter of this request"
        # litellm's own reason, without its advice about its own proxy's settings
        said = _said(message.split("To drop")[0])
        text = (f"model {model} cannot take {what}: its provider does not support them ({said}). "
                "Send the request without them, or set litellm_params.drop_params: true for this "
                "model in providers.yaml to have them dropped")
        return unfit_request(model, text, "unsupported_params", "unsupported_parameter")
    image = getattr(litellm, "ImageFetchError", None)
    if image is not None and isinstance(exc, image):
        # litellm fetches an image URL itself for providers that take images inline, and refuses
        # private and unresolvable hosts before anything is sent: another model (one given the
        # URL) may take the request. Its advice names a setting of its own proxy, not ours.
        said = _ADVICE.sub("", _said(message))
        return unfit_request(model, f"model {model} cannot take this request: {said}", "image_fetch",
                             "image_fetch_failed",  # litellm's words name the client's URL
                             summary=f"model {model} cannot take this request: an image could not be fetched")
    # the status the upstream answered, where one did: litellm relabels some (a 529 as 500, a
    # 413 as 400, a 408 or 504 answer as its Timeout) and the pass-through path reports them as is
    answered = _answered_status(exc)
    uncounted = None if answered else _UNCOUNTED_PART.search(message)
    if uncounted is not None:
        # litellm counting the request's tokens, for a provider whose answer says none (Ollama's:
        # it counts them whether or not it does), fails on a part type it does not know (sound, a
        # refusal) after the upstream answered: the request's failure, which every attempt repeats
        return unfit_request(model, f"model {model} cannot take this request: litellm cannot read its "
                             f"{uncounted.group(1)} parts for the model's provider",
                             "untranslatable", "untranslatable_request", param="messages")
    if not answered and (_failed_reading_the_answer(exc) or _NO_ANSWER in message):
        # the upstream answered 200 with what litellm cannot read as an answer (an HTML page, an
        # empty body, an error object, another shape): the model's failure, as on the
        # pass-through path (litellm labels it a connection error, a 500 or a 422)
        return UpstreamTransient(f"{model}: answered with something that is no answer: {_said(message)}",
                                 model=model, status=200, reason="bad_answer",
                                 summary=f"{model}: answered with something that is no answer")
    status = answered or getattr(exc, "status_code", None)
    if isinstance(status, int) and 300 <= status < 400:
        return redirected(model, status)
    failure = None if answered else _transport_failure(exc)
    if failure is not None:  # litellm labels these 500; report them as the pass-through path does
        return UpstreamTransient(f"{model}: {type(exc).__name__}: {message}", model=model,
                                 status=504 if failure == "timeout" else 0,
                                 timeout=failure == "timeout", sent=not _never_connected(exc),
                                 summary=f"{model}: " + ("no answer in time" if failure == "timeout"
                                                         else "connection failed")
                                 + f" ({type(exc).__name__})")
    import openai

    if isinstance(exc, openai.APIConnectionError) and not answered:
        # litellm's "connection error" with no network failure behind it: it failed on its own
        # side, translating this request for the provider (a tool_choice or a response_format
        # outside OpenAI's spec, say), before sending anything. Another model may take the
        # request; this one's health is not in question, and trying again would fail the same way.
        text = (f"model {model} cannot take this request: litellm could not translate it for "
                "the model's provider")
        # litellm's words may quote what it could not translate, the messages included
        return unfit_request(model, f"{text} ({_said(message)})", "untranslatable", "untranslatable_request",
                             summary=text)
    upstream = _upstream_error(exc)  # the upstream's own error object, where one came back
    if local and status == 500 and upstream is not None:  # a refusal of its server's validation?
        refused = classify(500, orjson.dumps({"error": upstream}), model, {}, redact, local=True)
        if isinstance(refused, UpstreamClientError):
            return refused
    if status is None or transient(status, (upstream or {}).get("type")) \
            and not out_of_quota(int(status), error_labels(upstream)):
        response = getattr(exc, "response", None)
        headers = (getattr(exc, "litellm_response_headers", None)
                   or getattr(response, "headers", None) or {})
        timeout = not answered and "timeout" in type(exc).__name__.lower()
        return UpstreamTransient(f"{model}: {type(exc).__name__}: {message}", model=model,
                                 status=status or 0, retry_after=wait_seconds(status or 0, headers),
                                 timeout=timeout, retried=retried_already(headers),
                                 summary=f"{model}: {type(exc).__name__}" + (
                                     f": HTTP {status}{labelled(upstream, redact)}" if status else ""))
    # litellm knows its providers' words for a request longer than the model's context
    too_long_for_it = isinstance(exc, litellm.ContextWindowExceededError)
    if upstream is not None:  # the upstream's own error, passed back as the pass-through path does
        refused = classify(int(status), orjson.dumps({"error": upstream}), model, {}, redact)
        if isinstance(refused, UpstreamClientError) and too_long_for_it:
            refused.unfit = CONTEXT_WINDOW
        return refused
    code = getattr(exc, "code", None)
    # the upstream's words, without litellm's labels ("APIError: OpenAIException - ") or the
    # bytes' repr some providers' errors carry (b'<html>...'); none left: what the status says
    said = _PROVIDER_LABEL.sub("", _said(message)).strip()
    if len(said) >= 3 and said[:2] in ("b'", 'b"') and said[-1] == said[1]:
        said = said[2:-1]
    said = said or f"upstream answered HTTP {status}"
    body = {"error": {"message": said, "type": "invalid_request_error", "param": None,
                      "code": redact(str(code)) if code is not None else None}}
    fits = not (too_long_for_it or too_long(int(status), said, str(code)))
    unfit = CONTEXT_WINDOW if not fits else UNSUPPORTED if cannot_read(int(status), said) else None
    labels = f"HTTP {status}{labelled({'code': code}, redact)}"
    return UpstreamClientError(said, status=int(status), model=model, upstream_body=body, unfit=unfit,
                               summary=unfit_summary(model, unfit, labels))


# litellm's advice to the admin of its own proxy, at the end of some of its messages
_ADVICE = re.compile(r"[;.]?\s*(an admin|if this is a legitimate)[^.]*general_settings[^.]*\.?", re.I)


def _said(message: str) -> str:
    """The first line of a litellm message, without its ``litellm.<Error>:`` labels (the rest
    can be a traceback)."""
    return _LITELLM_PREFIX.sub("", message.strip().split("\n")[0]).strip()


def _custom_provider(d: Deployment) -> Any:
    """The provider litellm is told: the file's ``custom_llm_provider``, or ``openai`` for a model
    without a provider prefix (as the pass-through path reads it; litellm would guess one from
    the name, or find none for a served name of one's own)."""
    return d.params.get("custom_llm_provider") or ("openai" if "/" not in d.model else None)


# litellm's label before a provider's own words: "APIError: OpenAIException - "
_PROVIDER_LABEL = re.compile(r"^(\w+Error: )?\w+(Exception|Error) -(\s|$)")
# litellm's words for an upstream's 200 it could not parse (OpenAI-format providers)
_NO_ANSWER = "Empty or invalid response from LLM endpoint"
# litellm's words for a content part its token counter does not know ("Error getting number of
# tokens from content list: Invalid content item type: input_audio. Expected ...")
_UNCOUNTED_PART = re.compile(r"Invalid content item type: ([\w-]{1,40})")
# the functions in which litellm reads an upstream's answer: a failure raised in one of them is
# the answer's, not the request's (litellm labels both APIConnectionError)
_READING_THE_ANSWER = frozenset({"transform_response", "transform_parsed_response",
                                 "convert_to_model_response_object", "chunk_parser"})


def _failed_reading_the_answer(exc: BaseException) -> bool:
    """Whether litellm failed inside one of the functions that read an answer (a JSON error there
    too: never one met translating the request, as a client's cut-off tool arguments are)."""
    for link in _chain(exc):
        tb = link.__traceback__
        while tb is not None:
            name = tb.tb_frame.f_code.co_name
            if name in _READING_THE_ANSWER or (
                    name in ("parse", "_parse")  # the openai SDK parsing a 200's body
                    and str(tb.tb_frame.f_globals.get("__name__", "")).startswith("openai.")):
                return True
            tb = tb.tb_next
    return False


def _upstream_error(exc: BaseException) -> dict | None:
    """The upstream's ``error`` object behind a litellm exception, where one came back: litellm
    keeps the provider call's exception in the chain, with the parsed body (``body``) or the
    response itself; None when none is found."""
    for link in _chain(exc):
        body = getattr(link, "body", None)
        if isinstance(body, dict) and (err := error_object(body)) is not None:
            return err
        raw = getattr(getattr(link, "response", None), "content", None)
        if isinstance(raw, (bytes, bytearray)) and raw:
            try:
                parsed = orjson.loads(raw)
            except orjson.JSONDecodeError:
                parsed = None
            if isinstance(parsed, dict) and (err := error_object(parsed, whole=False)) is not None:
                return err
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions behind it (cause, else context), each once: litellm keeps the
    provider call's own exception, and with it what the upstream answered, down this chain."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        yield link
        link = link.__cause__ or link.__context__


def follow_no_redirects() -> None:
    """litellm's HTTP clients follow redirects: an upstream that answers 307 (a moved domain, a
    gateway, a hijacked name) would get the request sent on to another host, prompt and headers
    with it (httpx drops ``Authorization`` across origins, not an ``x-api-key`` or an admin's
    ``extra_headers``). Its two factories of async clients are wrapped so that every client they
    make follows none: a 3xx is then the model's failure (``_classify_litellm``), as on the
    pass-through path."""
    from litellm.llms.custom_httpx.http_handler import AsyncHTTPHandler
    from litellm.llms.openai.common_utils import BaseOpenAILLM

    if getattr(AsyncHTTPHandler.create_client, "_satroute", False):
        return
    make_handler_client = AsyncHTTPHandler.create_client
    make_openai_client = BaseOpenAILLM._get_async_http_client

    def unfollowing(client: Any) -> Any:
        if client is not None:
            client.follow_redirects = False
        return client

    def create_client(self: Any, *args: Any, **kwargs: Any) -> Any:
        return unfollowing(make_handler_client(self, *args, **kwargs))

    def get_async_http_client(*args: Any, **kwargs: Any) -> Any:
        return unfollowing(make_openai_client(*args, **kwargs))

    create_client._satroute = True  # type: ignore[attr-defined]
    AsyncHTTPHandler.create_client = create_client  # type: ignore[method-assign]
    BaseOpenAILLM._get_async_http_client = staticmethod(get_async_http_client)  # type: ignore[method-assign]


# the fields of a delta that litellm's own test of a streamed chunk reads (``is_chunk_non_empty``)
_JUDGED_DELTA_FIELDS = frozenset({"content", "role", "function_call", "tool_calls", "audio"})


def keep_provider_deltas() -> None:
    """litellm drops a streamed chunk from an OpenAI-format provider whose delta carries none of the
    fields it knows (content, tool calls, ``reasoning_content``): OpenRouter's chunk that carries
    only the encrypted ``reasoning_details`` a client must send back on its next turn (Gemini 3's
    reasoning), a delta's ``refusal``. Its test of a chunk is wrapped so that a delta with a value
    in any other field is kept too; the pass-through path relays every chunk."""
    from litellm.litellm_core_utils.streaming_handler import CustomStreamWrapper

    if getattr(CustomStreamWrapper.is_chunk_non_empty, "_satroute", False):
        return
    judge = CustomStreamWrapper.is_chunk_non_empty

    def is_chunk_non_empty(self: Any, completion_obj: Any, model_response: Any, response_obj: Any) -> bool:
        if judge(self, completion_obj, model_response, response_obj):
            return True
        choices = getattr(model_response, "choices", None)
        delta = getattr(choices[0], "delta", None) if choices else None
        extra = getattr(delta, "model_extra", None) or {}
        return any(value not in (None, "", [], {}) for key, value in extra.items()
                   if key not in _JUDGED_DELTA_FIELDS)

    is_chunk_non_empty._satroute = True  # type: ignore[attr-defined]
    CustomStreamWrapper.is_chunk_non_empty = is_chunk_non_empty  # type: ignore[method-assign]


def _answered_status(exc: BaseException) -> int | None:
    """The HTTP status of the upstream's own answer behind a litellm exception (the provider
    call's ``httpx.HTTPStatusError``, which litellm keeps in the chain), or None."""
    import httpx

    return next((link.response.status_code for link in _chain(exc)
                 if isinstance(link, httpx.HTTPStatusError)), None)


def _transport_failure(exc: BaseException) -> str | None:
    """``"timeout"`` or ``"connection"`` when no HTTP answer came back, else None.

    litellm re-raises the openai SDK's ``APIConnectionError`` / ``APITimeoutError`` (or the
    underlying connect error) as its own exceptions, some of them status 500
    (``InternalServerError: Connection error``), keeping the original as the cause; the chain says
    whether an upstream answered at all.
    """
    import aiohttp
    import httpx
    import openai

    for link in _chain(exc):
        if isinstance(link, (openai.APITimeoutError, TimeoutError, httpx.TimeoutException)):
            return "timeout"
        # a network failure underneath, not litellm's label alone: litellm also wraps its own
        # errors (a request it could not translate) as APIConnectionError
        if isinstance(link, (OSError, httpx.TransportError, aiohttp.ClientError)):
            return "connection"
    return None


def _never_connected(exc: BaseException) -> bool:
    """Whether the transport failure behind a litellm exception is one of connecting (refused,
    unresolvable, timed out connecting): the request never reached the upstream."""
    import aiohttp
    import httpx

    return any(isinstance(link, (httpx.ConnectError, httpx.ConnectTimeout, ConnectionRefusedError,
                                 aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError))
               for link in _chain(exc))


def openai_shape(obj: dict[str, Any], translated: bool = False) -> dict[str, Any]:
    """A litellm answer or chunk, dumped without its many empty fields, put back in OpenAI's shape:
    the fields the API always sends even when null (a choice's ``finish_reason`` and
    ``logprobs``, a message's ``content``, as in a tool call, and ``refusal``); the provider's own
    fields of a message or delta, which litellm moves under ``provider_specific_fields``
    (OpenRouter's ``reasoning`` and ``reasoning_details``, Gemini's ``thought_signatures``), back
    on it as the pass-through path gives them (``_lift``); none of litellm's own additions:
    ``provider_specific_fields`` itself, an ``index`` on a whole message's tool calls, the empty
    ``images`` it gives every Gemini message and the empty ``vertex_ai_*`` lists beside it, and
    for a provider it ``translated`` (no OpenAI-format upstream wrote the usage) the Anthropic
    names it gives the usage beside OpenAI's (``cache_read_input_tokens``: OpenAI's is
    ``prompt_tokens_details.cached_tokens``, there too); and ``choices: []`` on the usage chunk of
    ``stream_options.include_usage`` (litellm gives it an empty delta)."""
    choices = obj.get("choices")
    if not isinstance(choices, list):
        return obj
    for key in [k for k, v in obj.items() if k.startswith("vertex_ai_") and v == []]:
        del obj[key]
    usage = obj.get("usage")
    if translated and isinstance(usage, dict):
        for key in _LITELLM_USAGE:
            usage.pop(key, None)
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        choice.setdefault("finish_reason", None)
        choice.setdefault("logprobs", None)
        choice.pop("provider_specific_fields", None)
        for part in ("message", "delta"):
            said = choice.get(part)
            if not isinstance(said, dict):
                continue
            _lift(said, said.pop("provider_specific_fields", None))
            if said.get("images") == []:
                del said["images"]
        message = choice.get("message")
        if isinstance(message, dict):
            message.setdefault("content", None)
            message.setdefault("refusal", None)
            for call in message.get("tool_calls") or ():
                if isinstance(call, dict):
                    call.pop("index", None)
    if obj.get("object") == "chat.completion.chunk" and isinstance(usage, dict) and all(
            isinstance(c, dict) and not c.get("delta") and c.get("finish_reason") is None for c in choices):
        obj["choices"] = []
    return obj


# the names litellm gives a translated provider's usage beside OpenAI's own, in Anthropic's words
_LITELLM_USAGE = ("cache_read_input_tokens", "cache_creation_input_tokens")


def _lift(said: dict[str, Any], kept: Any) -> None:
    """The fields of the provider's own that litellm ``kept`` aside for a message or delta, put
    back on it, where litellm gave it none of that name (Anthropic's ``thinking_blocks`` are in
    both); a null is left out, as litellm writes some the provider never sent (Anthropic's
    ``citations``, OpenAI's ``refusal``)."""
    if isinstance(kept, dict):
        for key, value in kept.items():
            if value is not None:
                said.setdefault(key, value)


class _ChoiceEnds:
    """What litellm's stream wrapper loses of a streamed answer with ``n`` > 1 choices, put back.
    litellm keeps one ``finish_reason`` for the whole stream and sends it on one closing chunk, for
    choice 0, dropping the upstream's end of every choice; and it strips the role from every chunk
    after the stream's first (dropping a chunk that had nothing else), so the other choices start
    without one. OpenAI starts every choice with its role and ends every one with a
    ``finish_reason``, and the SDKs' stream helpers rely on it (the Node SDK throws "missing
    finish_reason for choice 1").

    ``seen`` notes a chunk's choices as it goes out, giving a choice first seen after the stream's
    first one the role that one had; ``closings`` are, once, the chunks that end every choice seen
    and not ended, with the stream's ``finish_reason``: none for a one-choice stream, nor for a
    stream that ended no choice."""

    def __init__(self) -> None:
        self.role: Any = None
        self.started: dict[int, None] = {}  # choice indexes, in the order they came
        self.ended: set[int] = set()
        self.finish: Any = None  # the last finish_reason relayed: the stream's, as litellm keeps one
        self.ending: dict[str, Any] = {}  # the chunk that carried it: the others' ends copy its fields

    def seen(self, obj: dict[str, Any]) -> dict[str, Any]:
        for choice in obj.get("choices") or ():
            index = choice.get("index") if isinstance(choice, dict) else None
            if not isinstance(index, int):
                continue
            delta = choice.get("delta")
            if index not in self.started and isinstance(delta, dict):
                if not self.started:
                    self.role = delta.get("role")
                elif self.role is not None and "role" not in delta:
                    delta["role"] = self.role
            self.started.setdefault(index)
            if choice.get("finish_reason") is not None:
                self.ended.add(index)
                self.finish, self.ending = choice["finish_reason"], obj
        return obj

    def closings(self) -> list[dict[str, Any]]:
        if self.finish is None:  # the stream never ended a choice: there is no reason to give
            return []
        left = [index for index in self.started if index not in self.ended]
        self.ended.update(left)
        closings = []
        for index in left:
            closing = dict(self.ending, choices=[{"index": index, "delta": {}, "logprobs": None,
                                                  "finish_reason": self.finish}])
            closing.pop("usage", None)  # include_usage's usage is sent once, on its own chunk
            closings.append(closing)
        return closings


async def _litellm_chunks(first: Any, stream: Any, name: str, errors: type,
                          redact: Callable[[str], str], translated: bool = False,
                          texts: bool = False, gap_s: float | None = None) -> AsyncIterator[bytes]:
    """The SSE events of a litellm stream whose ``first`` chunk is in hand. ``texts``: a chunk that
    cannot be read is logged with what it said (else by its exception's type only: it may quote
    the answer, or the request back). ``gap_s``: the longest wait for the next chunk (an upstream
    that keeps its connection alive with comments, which litellm reads past, never ended)."""
    ends = _ChoiceEnds()

    def shaped(chunk: Any) -> dict[str, Any]:
        chunk.model = name
        return openai_shape(chunk.model_dump(exclude_none=True), translated)

    def encode(obj: dict[str, Any]) -> bytes:
        return b"data: " + dumps_lenient(obj) + b"\n\n"

    told = [False]  # litellm has had a finish reason from the upstream, at any chunk so far

    def heard() -> None:
        # Gemini's is held only while its chunk is read (litellm forgets it at a later frame
        # without one, a usage-only tail): it is looked for after every chunk
        if getattr(stream, "received_finish_reason", None) or getattr(stream, "intermittent_finish_reason", None):
            told[0] = True

    def invented(obj: dict[str, Any]) -> bool:
        # litellm ends a stream its upstream closed before finishing the answer (no finish reason,
        # no Anthropic message_stop) with a chunk of its own that says "stop": a cut tool call's
        # arguments would be taken for whole ones
        heard()
        return (not told[0] and hasattr(stream, "received_finish_reason")
                and any(isinstance(c, dict) and c.get("finish_reason") for c in obj.get("choices") or ()))

    try:
        heard()
        yield encode(ends.seen(shaped(first)))
        try:
            async for chunk in (stream if gap_s is None else within_gaps(stream, gap_s)):
                obj = shaped(chunk)
                if invented(obj):
                    yield interrupted_event("the upstream ended it before the answer was finished")
                    return
                if obj.get("choices") == [] and "usage" in obj:  # include_usage's chunk stays the last
                    if isinstance(obj["usage"], dict) and "cost" in obj["usage"] and _estimated_cost(stream):
                        del obj["usage"]["cost"]
                    for closing in ends.closings():
                        yield encode(closing)
                yield encode(ends.seen(obj))
        except StreamStalled as exc:
            yield interrupted_event(str(exc))
            return
        except errors as exc:  # the upstream's own reason ("Overloaded"), not only litellm's class name
            said = _said(redact(str(getattr(exc, "message", None) or exc)))
            yield interrupted_event(said or type(exc).__name__)
            return
        except Exception as exc:  # litellm could not read what came (OpenRouter's error chunk with a
            # string code raises ValueError): the client gets the error event, not a cut connection
            log.warning("%s: the model's stream could not be read: %s", name,
                        redact(repr(exc))[:300] if texts else type(exc).__name__)
            yield interrupted_event(f"the answer of {name} could not be read")
            return
        for closing in ends.closings():
            yield encode(closing)
        yield b"data: [DONE]\n\n"
    finally:  # closed early (a client that stopped reading): the model's connection goes now, not at GC
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


def _estimated_cost(stream: Any) -> bool:
    """Whether the ``usage.cost`` on the usage chunk of a litellm stream is litellm's own estimate,
    from its price map, not the provider's: no chunk the provider sent gave one (OpenRouter's
    does, and it is kept). False when it cannot tell (litellm no longer keeps the chunks)."""
    chunks = getattr(stream, "chunks", None)
    return isinstance(chunks, list) and not any(
        getattr(getattr(chunk, "usage", None), "cost", None) is not None for chunk in chunks)


def _reason(exc: UpstreamTransient) -> str:
    if exc.reason:
        return exc.reason
    if exc.timeout:
        return "timeout"
    if exc.upstream_status:
        return f"http_{exc.upstream_status}"
    return "connection"


def _cooling_wait(exc: UpstreamTransient, router: RouterSettings) -> float | None:
    """How long ``exc`` cools its model if it starts a cooldown: the wait it named, at least 1 s
    (a Retry-After's own unit: a reset "20ms" away, or past, would cool it for nothing) and at most
    ``cooldown_max_s``; None where it named none (``cooldown_s``)."""
    if exc.retry_after is None:
        return None
    return min(max(exc.retry_after, 1.0), router.cooldown_max_s)


def _waits(exc: UpstreamTransient) -> bool:
    """Whether ``exc`` says the model can take the request only later: a 429, or a failure that
    names how long to wait (``retry_after``). A routed request does not wait for it while another
    model may answer at once."""
    return exc.upstream_status == 429 or exc.retry_after is not None


class _Wait:
    """Exponential backoff with full jitter, but never shorter than the wait the upstream named
    (``retry_after``: its Retry-After, or a 429's rate-limit reset)."""

    def __init__(self, base: float, cap: float, retry_after_cap: float):
        self.base, self.cap, self.retry_after_cap = base, cap, retry_after_cap

    def __call__(self, state: RetryCallState) -> float:
        backoff = min(self.cap, self.base * 2 ** (state.attempt_number - 1))
        wait = random.uniform(backoff / 2, backoff)
        exc = state.outcome.exception() if state.outcome else None
        after = getattr(exc, "retry_after", None)
        if after is not None:
            wait = max(wait, after if after <= self.retry_after_cap else float("inf"))
        return wait


class _Stop:
    """Stop after ``attempts``, or when the next wait would end past the deadline."""

    def __init__(self, attempts: int, deadline: float):
        self.attempts, self.deadline = attempts, deadline

    def __call__(self, state: RetryCallState) -> bool:
        if state.attempt_number >= self.attempts:
            return True
        return time.monotonic() + state.upcoming_sleep >= self.deadline
