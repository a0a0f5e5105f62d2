"""Onboarding inside the proxy: every configured model without a profile takes the test in the background.

Owns: ``DispatchAsker`` (the onboarding seam filled with the proxy's own dispatch path, so the test
goes through the same retries, timeouts and cooldowns as traffic) and ``OnboardingService``, which
watches the provider registry: at start-up and after every change of providers.yaml it starts a
background run for each available model that has neither a profile in the file nor a finished one in
the store (a failed run is tried again only when the file changes, the proxy restarts or on SIGHUP,
and so is one another process failed with the same configuration since then: ``run_config``); it cancels
runs of models removed from the file, forgets the stored answers and profile of a model whose
upstream (``upstream_fingerprint``) changed and onboards it again, and when a run is done it makes
the registry read the store again, so the model becomes an ``auto`` candidate. Until then the model
is callable by name only. The runs of models on one provider account (``upstream_account``) are
paced together: one concurrency, one hold. A run that crashes is recorded as ``failed`` with the reason.
Other processes share the store (``satroute onboard``, another proxy): a model another process
onboards now (``ModelBusy``), or whose run the store refused to start, is skipped and tried again on
a later tick, never marked failed; a profile another process stored (again) is picked up on the next
tick, and one it forgot stops being routed with. The service records in the store which upstream
each model it would onboard, or routes on a stored profile, points at (``Store.using``, refreshed every tick at most, and at least
every quarter of the lease's staleness), and a model whose stored answers came from the upstream
another live proxy points it at is not forgotten (``UpstreamInUse``): it waits, ``pending`` with
the reason, until that proxy stops or agrees. Once per process, each configured model's stored
answers are graded again with this version's grader (``Onboarding.regrade``), and a profile whose
grades change is rewritten.
Store calls run on worker threads, never on the event loop that serves requests.
Also the JSON the admin endpoints show (``status``, ``profile``): a ``running`` or ``stalled`` row
whose lease nobody holds (its process was killed, or an earlier version stopped without saying so)
is shown ``pending`` ("interrupted"), since nothing runs it; a store that cannot be read answers 503
with the reason. A check of the watch loop that fails logs the error once, not every tick.
Does not know: HTTP handlers, how answers are graded or stored (``proxy.onboarding``, ``proxy.store``).
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable, Coroutine, Iterable, Mapping, Sequence

import orjson

from proxy.dispatch import Attempt, Call, Dispatcher
from proxy.errors import ServiceUnavailable, UpstreamError, UpstreamTransient
from proxy.onboarding import (RUN_UPSTREAM, Onboarding, Options, Prices, RunCancelled, Said, spend_kept,
                              status_of)
from proxy.prices import LITELLM_PRICE_KEYS, litellm_cost, listed_prices
from proxy.providers import (Deployment, ProviderRegistry, fingerprints, plain_fingerprint, upstream_account,
                             upstream_fingerprint)
from proxy.questions import Question, QuestionSourceError, load_questions
from proxy.store import ModelBusy, Progress, Store, UpstreamInUse
from scorer.data import DataError

log = logging.getLogger("satroute.onboarding")

Spawn = Callable[[Coroutine[Any, Any, Any], str], asyncio.Task]


class DispatchAsker:
    """``Asker`` over the proxy's dispatcher: one non-streamed chat completion to one named model,
    with dispatch's retries except of a rate limit (``Call.paced``: the engine paces the run).
    The attempts dispatch made that the upstream may have billed with no answer back
    (``Attempt.billed``) are counted: an answer's in ``Said.unanswered``, a failure's, or a
    cancellation's (the one out when it came included), as the exception's ``unanswered``."""

    def __init__(self, registry: ProviderRegistry, dispatcher: Dispatcher):
        self.registry, self.dispatcher = registry, dispatcher

    async def ask(self, model: str, messages: list[dict], **params: object) -> Said:
        snap = self.registry.snapshot
        target = snap.models.get(model)
        if target is None:
            raise RunCancelled(f"model {model!r} is no longer in providers.yaml")
        began_for = RUN_UPSTREAM.get()
        if began_for is not None and upstream_fingerprint(target) != began_for:
            # an edit points it at another upstream: its answers are not this run's model's, and
            # the run stops before one is stored (an edit undone before the next check let them
            # in as the model's own)
            raise RunCancelled(f"model {model!r} points at another upstream now")
        body = {"model": model, "messages": messages, **params}
        tried: list[Attempt] = []  # how each attempt ended, dispatch's retries included
        try:
            # paced: a rate limit comes back at once, for the engine to hold every question (a
            # retry here after its Retry-After held this one alone while the others were sent)
            reply = await self.dispatcher.complete(Call(targets=[target], body=body, stream=False,
                                                        router=snap.router, redact=snap.redact,
                                                        attempts=tried, paced=True))
        except (UpstreamError, asyncio.CancelledError) as exc:
            # a cancelled ask too (the run stopped): what it sent before is billed all the same
            exc.unanswered = sum(a.billed for a in tried)
            raise
        unanswered = sum(a.billed for a in tried)
        try:
            answer = orjson.loads(reply.body or b"{}")
            choice = answer["choices"][0]
            text = content_text(choice["message"].get("content"))
            usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else {}
            return Said(text, _tokens(usage.get("prompt_tokens")), _tokens(usage.get("completion_tokens")),
                        _tokens(usage.get("total_tokens")), cut_off=choice.get("finish_reason") == "length",
                        filtered=choice.get("finish_reason") == "content_filter", unanswered=unanswered,
                        reasoning=reasoning_text(choice["message"]))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            failure = UpstreamTransient(f"{model}: answer is not a chat completion: "
                                        f"{(reply.body or b'')[:200]!r}", model=model)
            failure.unanswered = unanswered + 1  # this one came back, and may be billed too
            raise failure from None


def _tokens(value: object) -> int | None:
    """A usage count as the upstream gave it, or None when it gave none (or nonsense)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def content_text(content: object) -> str:
    """A chat message's ``content`` as text: a string as is; a list of parts (``[{"type": "text",
    "text": ...}, {"type": "thinking", ...}]``) as its text parts joined by newlines; None as "".
    Anything else raises TypeError."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(part["text"] for part in content if isinstance(part, dict)
                         and part.get("type", "text") in ("text", "output_text")
                         and isinstance(part.get("text"), str))
    raise TypeError(f"message content is a {type(content).__name__}")


def reasoning_text(message: dict) -> str:
    """The reasoning a chat message carries beside its answer, where its upstream returns it: a
    reasoning parser's ``reasoning_content`` (vLLM, llama.cpp, DeepSeek's API) or ``reasoning``
    (OpenRouter, newer vLLM), ``thinking_blocks`` (Claude's, through litellm), OpenRouter's
    ``reasoning_details`` (their text or summary; an encrypted one has none to measure), or
    ``content`` parts of type ``thinking`` or ``reasoning``. The longest of them: several carry
    the same text (litellm gives Claude's thinking both as ``reasoning_content`` and as
    ``thinking_blocks``). "" when there is none."""
    content = message.get("content")
    parts = [part for part in content if isinstance(part, dict) and part.get("type") in
             ("thinking", "reasoning")] if isinstance(content, list) else []
    fields = [message.get(name) for name in ("reasoning_content", "reasoning", "thinking_blocks",
                                             "reasoning_details")]
    return max((_text_within(field) for field in (*fields, parts)), key=len)


def _text_within(value: object) -> str:
    """The text a reasoning field holds: a string, or parts (nested) holding it as ``text``,
    ``thinking`` or ``summary``."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(filter(None, map(_text_within, value)))
    if isinstance(value, dict):
        return "\n".join(filter(None, (_text_within(value.get(k)) for k in ("text", "thinking", "summary"))))
    return ""


def onboardable(d: Deployment) -> bool:
    """An available model whose profile (if any) comes from onboarding, not providers.yaml."""
    return d.available and d.info.onboard and not d.info.capability_profile


def prices_of(d: Deployment) -> Prices:
    """The model's prices, each side (input, output) from the first source that gives it: ours in
    providers.yaml (``*_price_per_mtok``), LiteLLM's there (``*_cost_per_token``, in
    ``model_info``, then ``litellm_params``), then litellm's price list for a hosted model
    (``proxy.prices``), so that a gpt-4o added without prices, or with one side only, is not
    taken for free on either side. A side none of them gives counts as free; where the other side
    is known, a warning says so, once per model and side."""
    sides = [d.info.input_price_per_mtok, d.info.output_price_per_mtok]
    for section in (d.info.model_extra or {}, d.params):
        for i, key in enumerate(LITELLM_PRICE_KEYS):
            cost = litellm_cost(section.get(key)) if sides[i] is None else None
            if cost is not None:
                sides[i] = cost * 1e6
    if None in sides:
        listed = listed_prices(d.model, d.provider, d.api_base)
        if listed is not None:
            sides = [given if given is not None else price for given, price in zip(sides, listed)]
    inp, out = sides
    if (inp is None) != (out is None):
        missing = "input" if inp is None else "output"
        if (d.name, missing) not in _FREE_SIDES:
            _FREE_SIDES.add((d.name, missing))
            log.warning("onboarding %s: providers.yaml prices its %s tokens only, and litellm's price "
                        "list does not know it: onboarding counts its %s tokens as free (set "
                        "model_info.%s_price_per_mtok)", d.name, "output" if inp is None else "input",
                        missing, missing)
    return Prices(inp, out)


_FREE_SIDES: set[tuple[str, str]] = set()  # (model, side) counted free, the other side priced: warned


def _not_onboardable(d: Deployment) -> str:
    """Why ``onboardable(d)`` is False, in the words of the admin's file."""
    if not d.available:
        return f"unavailable: {d.unavailable}"
    if d.info.capability_profile:
        return "providers.yaml gives its capability_profile"
    return "model_info.onboard is false"


def needs_onboarding(d: Deployment) -> bool:
    return onboardable(d) and d.profile is None


def run_config(d: Deployment, suite: str, options: Options, secret: str) -> str:
    """What a run of ``d`` depends on, hashed (as a failure is stored): its entry in providers.yaml
    as resolved (the upstream, its key and parameters, ``model_info`` with the prices), the suite
    and the onboarding options. Processes that compute the same one would fail the same way.
    Keyed with ``secret``, the state directory's own (the local servers' key, readable by its
    owner only, the same for every proxy on it): a plain hash of what holds the model's key would
    let anyone who reads the store test guesses of that key offline."""
    what = [d.model, d.api_base, d.api_key, dict(d.params), d.info.model_dump(mode="json"), suite,
            dataclasses.asdict(options)]
    text = json.dumps(what, sort_keys=True, default=str).encode()
    return hmac.new(secret.encode(), text, hashlib.sha256).hexdigest()[:16]


_RETRY_HINT = ("onboarding %s is tried again when its entry in providers.yaml changes, at the next "
               "start, or on SIGHUP (kill -HUP)")


class OnboardingService:
    def __init__(self, store: Store, registry: ProviderRegistry, asker: Any, spawn: Spawn, *,
                 suite: str = "mmlu_pro", data: Path | None = None, hub: bool = True,
                 options: Options = Options(), metrics: Any = None):
        self.store, self.registry, self.asker, self.spawn = store, registry, asker, spawn
        self.metrics = metrics  # has observe_onboarding(model, answered, total, state), or None
        self.suite_name, self.data, self.hub, self.options = suite, data, hub, options
        self.runs: dict[str, asyncio.Task] = {}
        self.store_lost: str | None = None  # why onboarding stopped: the store's file went away
        self._store_suspect = False  # the last tick found the store's file changed
        self._engine: Onboarding | None = None
        self._engine_lock = asyncio.Lock()
        self._source_error: str | None = None
        self._failed_stamp: dict[str, bytes] = {}  # model -> file digest when its run failed
        # when the configuration was last read (a start, a changed file, SIGHUP): a failure another
        # process stored since, with the same configuration, is this process's too
        self._since = time.time()
        # model -> why its stored answers are another proxy's, on another upstream (shown pending)
        self._elsewhere: dict[str, str] = {}
        self._announced: dict[str, tuple[str, str]] | None = None  # what Store.using last recorded
        self._announced_at = 0.0  # time.monotonic() of that
        self._run_upstream: dict[str, str] = {}  # model -> upstream fingerprint of its run
        self._run_prices: dict[str, Prices] = {}  # model -> the prices its run counts spend at
        self._stopping: dict[str, str] = {}  # model -> why sync stopped its run (recorded as pending)
        # the file as ``_since`` read it: the first tick, the file unchanged, keeps that time (a
        # failure another process stored between the start and that tick is this one's too)
        self._digest = registry.file_digest
        self._questions: frozenset[str] | None = None  # the suite's ids, once loaded
        self._waiting: dict[str, str] = {}  # model -> why its run could not start now (tried again)
        # model -> the stored profile the registry last read for it: its done row's updated_at,
        # or None (the store held no finished profile)
        self._picked_up: dict[str, float | None] = {}
        self._reported: set[str] = set()  # models with onboarding series in the metrics
        self._regraded: set[str] = set()  # models whose stored answers this process graded again
        self._regrade_error: str | None = None  # why stored answers cannot be graded again (logged once)
        self._check_error: str | None = None  # why the watch loop's last check failed (logged once)
        self._prepare_failed = False  # litellm's import failed once: not tried before every sync
        self.draining = False  # the proxy is stopping: no run starts, no new question is asked
        self._retry_asked = False  # retry_failed: the next tick syncs, the file unchanged

    # -- the background loop ----------------------------------------------------------------
    async def watch(self, interval_s: float) -> None:
        """Sync at once, then whenever the registry's snapshot changes or a model waits to be
        tried again (until cancelled). Each tick reads every model's stored progress once: to
        pick up profiles another process stored, and for the metrics."""
        last = None
        while True:
            try:
                await self._check_store_file()
                progress = await asyncio.to_thread(self.store.all_progress, self._suite_questions(),
                                                   list(self.registry.snapshot.models))
                self._pick_up_profiles(progress)
                await self._announce()
                snap = self.registry.snapshot
                if snap is not last or self._waiting or self._retry_asked:
                    self._retry_asked = False
                    await self._dispatch_ready(snap)
                    last = self.registry.snapshot  # litellm's import may have left a model out
                    await self.sync()
                await self._regrade(progress)
                self._report(progress)
                if self._check_error is not None:
                    log.info("onboarding: checks work again")
                    self._check_error = None
            except Exception as exc:  # one bad tick (the store locked past its timeout) must not end the loop
                self._check_failed(exc, interval_s)
                last = None
            await asyncio.sleep(interval_s)

    async def _check_store_file(self) -> None:
        """Stop onboarding, said once, when the state store's file was deleted or replaced under
        the running proxy: its answers went on being written to the file SQLite had open, where
        nothing reads them, and were asked and paid for again after a restart, while the status
        counted them as stored. Seen on two ticks in a row (a network volume's passing glitch
        is not a lost store), each looked at on a thread (a hung volume must not hold the loop)."""
        if self.store_lost is not None:
            return
        why = await asyncio.to_thread(self.store.file_changed)
        if why is None or not self._store_suspect:
            self._store_suspect = why is not None
            return
        self.store_lost = (f"the state store {self.store.path} {why} while the proxy runs: "
                           "onboarding stopped, and the routing log is not kept; restart the proxy")
        log.error("%s", self.store_lost)
        self.begin_drain()

    async def _dispatch_ready(self, snap: Any) -> None:
        """litellm imported before a run starts for a model that needs it: its checks (a provider
        it does not know) make such a model unavailable, "pending" with the reason, where a run
        started before the import was refused by the dispatcher ("failed", and a cooldown)."""
        prepare = getattr(getattr(self.asker, "dispatcher", None), "prepare", None)
        if prepare is None or self._prepare_failed:
            return
        try:
            await prepare([d for d in snap.models.values() if needs_onboarding(d)])
        except Exception as exc:  # noqa: BLE001 (a broken litellm must not stop every model's test)
            # once: the runs go on, and a model that needs litellm fails on its own with the reason
            self._prepare_failed = True
            log.error("onboarding: litellm cannot be loaded (%s: %s); the models that need it "
                      "fail their test with the reason", type(exc).__name__, exc)

    async def _announce(self) -> None:
        """Record in the store the upstream each model this process onboards points at, and each
        it routes with ``onboard: false`` on a profile another run stored (``Store.using``; one
        with no profile whose run failed with this configuration, or that it does not onboard,
        has nothing to keep), when that changed, and otherwise often enough that
        the record never goes stale while the process runs: another proxy then keeps the answers
        this one's upstream gave. A store that refuses the write now (locked past its busy timeout) is asked
        again on the next call; the checks of this one go on."""
        failed_now = {name for name, stamp in self._failed_stamp.items()
                      if stamp == self.registry.file_digest}  # not run again as configured
        now = {name: fingerprints(d)
               for name, d in self.registry.snapshot.models.items()
               if d.available and not d.info.capability_profile  # onboardable, or routed on a stored profile
               and (d.profile is not None or (onboardable(d) and name not in failed_now))}
        fresh = time.monotonic() - self._announced_at < self.store.lease_stale_s / 4
        if now == self._announced and fresh:
            return
        try:
            await asyncio.to_thread(self.store.using, now)
        except sqlite3.OperationalError:
            return
        self._announced, self._announced_at = now, time.monotonic()

    def _check_failed(self, exc: Exception, interval_s: float) -> None:
        """Log a failed check once per distinct error: a store that stays broken (damaged, disk
        gone) would otherwise log a traceback every tick. A bug's traceback is logged, once."""
        why = f"{type(exc).__name__}: {exc}"
        if why == self._check_error:
            return
        self._check_error = why
        log.error("onboarding: this check failed (%s); trying again every %.1fs (logged again "
                  "only when the error changes)", why, interval_s,
                  exc_info=None if isinstance(exc, sqlite3.Error) else exc)

    def _pick_up_profiles(self, progress: Iterable[Progress]) -> None:
        """Make the registry read the store again when a configured model's stored profile is not
        the one it last read: its row is ``done`` with another ``updated_at`` (another process,
        ``satroute onboard``, finished it or measured it again; or this process's run finished a
        moment ago), or it is no longer ``done`` while the model is routed with a profile (``onboard
        --restart`` forgot it: the model stops being an ``auto`` candidate, and the next sync
        onboards it again like any model without a profile). One read of the registry per tick
        for all such models, and once per stored version, so a row without its profile does not
        make every tick read them all."""
        stored = {p.model: p.updated_at if p.status == "done" else None for p in progress}
        before = self.registry.snapshot.models
        seen = {name: stored.get(name) for name, d in before.items() if not d.info.capability_profile}
        stale = [name for name, version in seen.items()
                 if (name not in self._picked_up or self._picked_up[name] != version)
                 and (version is not None or before[name].profile is not None)]
        if stale:
            self.registry.refresh_profiles()
            after = self.registry.snapshot.models
            for name in stale:
                was, now = before[name].profile, after[name].profile if name in after else None
                if now is not None and was is None:
                    log.info("model %s is onboarded: now an auto candidate", name)
                elif now is not None and now != was:
                    log.info("model %s: the store holds a new profile for it; routed with that one", name)
                elif now is None and was is not None:
                    log.warning("model %s: its stored profile was forgotten; no longer an auto "
                                "candidate until it is onboarded again", name)
        self._picked_up.update(seen)

    async def _regrade(self, progress: Iterable[Progress]) -> None:
        """Once per process, each configured model's stored answers graded again with this
        version's grader (``Onboarding.regrade``): an earlier version's faulty grades must not stay
        in its profile. A model this process runs is graded again by its run; one another live
        process holds (it may be onboarding it) is left for a later tick, as is one the store
        refuses to write now. Without the questions (they cannot be loaded) nothing is graded
        again; said once."""
        models = self.registry.snapshot.models
        due = [p for p in progress if p.done and p.model not in self._regraded and p.model in models
               and not models[p.model].info.capability_profile]
        if not due:
            return
        try:
            engine = await self._get_engine()
        except (QuestionSourceError, DataError) as exc:
            why = exc.message if isinstance(exc, QuestionSourceError) else str(exc)
            if why != self._regrade_error:
                log.warning("onboarding: stored answers are not graded again by this version: %s", why)
            self._regrade_error = why
            return
        self._regrade_error = None
        for p in due:
            task = self.runs.get(p.model)
            if task is not None and not task.done():
                self._regraded.add(p.model)  # its run grades them again under its lease
                continue
            if self.store.held(p.owner, p.heartbeat, ("lease", p.model)):
                continue
            try:
                await engine.regrade(p.model)
            except (ModelBusy, sqlite3.OperationalError):
                continue
            self._regraded.add(p.model)

    def _report(self, progress: list[Progress]) -> None:
        """Onboarding progress into the metrics (none for a model whose stored answers are
        another upstream's: ``pending``); the series of models no longer configured are dropped.
        Each configured model's lease is read on every tick, metrics or not: the store judges a
        lease it has read before by its own monotonic clock (``Store.held``)."""
        models = self.registry.snapshot.models
        shown = {p.model: self._shown(p)[0] for p in progress if p.model in models}
        if self.metrics is None:
            return
        for p in progress:
            if p.model in models:
                if p.model in self._elsewhere:
                    self.metrics.observe_onboarding(p.model, 0, 0, "pending")
                else:
                    self.metrics.observe_onboarding(p.model, p.done, p.total, shown[p.model])
                self._reported.add(p.model)
        for name in [m for m in self._reported if m not in models]:
            self.metrics.forget_onboarding(name)
            self._reported.discard(name)

    async def sync(self) -> None:
        """Start runs for models that need one; cancel runs of models that left the file."""
        if self.draining:
            return
        digest = self.registry.file_digest  # hashed by the registry's own reads of the file
        if digest != self._digest:
            self._digest = digest
            self._since = time.time()
            self._source_error = None  # a changed file may have fixed the data path: try again
        await self._announce()  # before anything is forgotten: what this process points at now
        models = self.registry.snapshot.models
        for name, task in list(self.runs.items()):
            if name not in models and not task.done():
                log.info("onboarding %s cancelled: no longer in providers.yaml", name)
                task.cancel()
        self._forget_gone(models)
        for name in [m for m in self._waiting if m not in models or not needs_onboarding(models[m])]:
            del self._waiting[name]  # gone, or profiled meanwhile (by the process it waited for)
            self._elsewhere.pop(name, None)
        for name, d in models.items():
            task = self.runs.get(name)
            running = task is not None and not task.done()
            upstream = upstream_fingerprint(d)
            config = run_config(d, self.suite_name, self.options, self.registry.local_key)
            if running:
                same_upstream = self._run_upstream.get(name) == upstream
                if same_upstream and onboardable(d):
                    prices = prices_of(d)
                    if self._run_prices.get(name) != prices:
                        # the spend so far stands; the run reads the new prices for the rest
                        # (Onboarding._repriced), its asks in flight kept: they are paid for
                        log.warning("onboarding %s: its prices changed mid-run; going on at the "
                                    "new prices", name)
                        self._run_prices[name] = prices
                    continue
                if not onboardable(d):  # the edit takes the model out of onboarding: stop paying
                    self._stopping[name] = f"stopped: {_not_onboardable(d)}"
                    log.warning("onboarding %s stopped: %s", name, _not_onboardable(d))
                else:
                    # another upstream answers under this name now: its answers are not the same
                    # model's; the next run forgets them once the old run has stopped (an answer
                    # being stored at the cancel is stored first), and starts over
                    log.warning("onboarding %s: its upstream changed mid-run; starting over", name)
                task.cancel()
                self._failed_stamp.pop(name, None)
                if not onboardable(d):
                    continue
            elif not onboardable(d):
                continue
            elif (changed := await self._upstream_changed(name, *fingerprints(d), plain_fingerprint(d))) is None:
                continue  # the store could not tell now: a later tick asks again
            elif changed:
                if name in self._elsewhere and await self._still_elsewhere(name):
                    continue  # read, not a write lock twice a second: another proxy's still
                if (kept := await self._reset(name)) is None:
                    continue
                log.warning("onboarding %s: its upstream changed; its answers and profile were "
                            "forgotten%s; onboarding it again", name, spend_kept(kept))
            elif d.profile is not None:
                continue
            elif self._failed_stamp.get(name) == digest:
                continue  # failed with this very configuration; wait for an edit or a restart
            elif await self._failed_elsewhere(name, config, digest):
                continue  # another process failed it with this very configuration meanwhile
            self._run_upstream[name] = upstream
            self._run_prices[name] = prices_of(d)
            self.runs[name] = self.spawn(self._run(d, digest, config, after=task if running else None),
                                         f"onboard-{name}")

    def _forget_gone(self, models: Mapping[str, Any]) -> None:
        """Drop what is kept about models no longer in providers.yaml once their runs ended: a
        cancelled run's task held its whole stack (some 180 KB), and a proxy whose admins add and
        remove models for weeks kept one for every name it ever onboarded."""
        for name in [n for n, task in self.runs.items() if n not in models and task.done()]:
            task = self.runs.pop(name)
            if not task.cancelled():
                task.exception()  # read: a failure was logged by the task's done-callback
        kept = (self._run_upstream, self._run_prices, self._picked_up, self._failed_stamp)
        for name in {n for names in (*kept, self._regraded) for n in names
                     if n not in models and n not in self.runs}:  # a live run still reads its own
            for by_name in kept:
                by_name.pop(name, None)
            self._regraded.discard(name)
        _FREE_SIDES.difference_update({k for k in _FREE_SIDES if k[0] not in models})

    async def _upstream_changed(self, name: str, upstream: str, legacy: str,
                                also: Sequence[str] = (), plain: str | None = None) -> bool | None:
        """``Store.upstream_changed`` on a thread; None (and the model waits for a later tick)
        when the store refuses the check now (locked past its busy timeout)."""
        try:
            changed = await asyncio.to_thread(self.store.upstream_changed, name, upstream, legacy, also, plain)
        except sqlite3.OperationalError as exc:
            self._wait(name, f"the state store refuses writes: {exc}")
            return None
        if not changed:  # what is stored is this upstream's (again)
            self._elsewhere.pop(name, None)
        return changed

    async def _still_elsewhere(self, name: str) -> bool:
        """Whether another live process still points ``name`` at the upstream its stored answers
        came from (``Store.upstream_user``, a read); a store that cannot be read now: True."""
        try:
            return await asyncio.to_thread(self.store.upstream_user, name) is not None
        except sqlite3.OperationalError:
            return True

    async def _reset(self, name: str) -> float | None:
        """Forget a model's stored answers and profile for another upstream, and stop routing with
        its stored profile; the USD its onboarding spent, which is kept (``Store.forget``). None
        (nothing forgotten) while another process onboards it or points it at the upstream its
        stored answers came from, or the store refuses the write: tried again on a later tick."""
        try:
            kept = await asyncio.to_thread(self.store.forget, name, moved=True)
        except ModelBusy as exc:
            self._busy(name, exc)
            return None
        except sqlite3.OperationalError as exc:
            self._wait(name, f"the state store refuses writes: {exc}")
            return None
        self._failed_stamp.pop(name, None)
        self._elsewhere.pop(name, None)
        self.registry.refresh_profiles()
        return kept

    async def _failed_elsewhere(self, name: str, config: str, digest: bytes) -> bool:
        """True when the model's stored failure was recorded with ``config`` since this process
        last read its configuration (another process failed it as this one would): then it is
        this process's failure too (stamped with ``digest``; logged once), tried again at the
        same times as one of its own. "Since" is by the wall clock, and a failure recorded later
        than now was recorded before the clock was stepped back: not since (else a proxy whose
        clock went back an hour took its own failure for another's, and tried it again neither on
        SIGHUP nor at a restart for that hour). A store that cannot be read now: True, and a
        later tick asks again."""
        try:
            failure = await asyncio.to_thread(self.store.failure, name)
        except sqlite3.OperationalError as exc:
            self._wait(name, f"the state store cannot be read: {exc}")
            return True
        if (failure is None or failure[0] != config or failure[1] < self._since
                or failure[1] > time.time() + self.store.lease_stale_s):  # before a step back
            return False
        self._failed_stamp[name] = digest
        self._waiting.pop(name, None)
        log.warning("onboarding %s: another process on this state directory failed it with the "
                    "same configuration: %s", name, failure[2])
        log.info(_RETRY_HINT, name)
        return True

    def _busy(self, model: str, exc: ModelBusy) -> None:
        """``_wait`` for ``exc``; one that says the stored answers are another proxy's, on
        another upstream, is also what ``status`` shows for the model."""
        if isinstance(exc, UpstreamInUse):
            self._elsewhere[model] = (f"{exc}; onboarded on this proxy's upstream once that proxy "
                                      "stops or points it there too")
        self._wait(model, str(exc))

    def _wait(self, model: str, why: str) -> None:
        """The model's run cannot start now, and is not failed: a later tick tries again."""
        if self._waiting.get(model) != why:
            log.info("onboarding %s: %s; trying again later", model, why)
        self._waiting[model] = why

    async def _run(self, d: Deployment, digest: bytes, config: str,
                   after: asyncio.Task | None = None) -> None:
        """Onboard ``d``; a failure is stamped with ``digest`` (the file's) here and stored with
        ``config`` (``run_config``) for the other processes."""
        if after is not None:  # a cancelled run of the same model: let it stop first
            await asyncio.gather(after, return_exceptions=True)
        try:
            engine = await self._get_engine()
            fallback = prices_of(d)
            upstream, legacy, also = fingerprints(d)
            progress = await engine.run(d.name, lambda: self._run_prices.get(d.name, fallback),
                                        upstream, legacy, config, failed_since=self._since,
                                        account=upstream_account(d), also=also,
                                        plain=plain_fingerprint(d))
        except asyncio.CancelledError:
            # the next tick drops what is kept about a model that left the file, its run ended
            self._retry_asked = True
            why = self._stopping.pop(d.name, None)
            if why is not None:  # stopped by an edit, not by shutdown: the store must not say running
                await asyncio.to_thread(self.store.set_status, d.name, "pending", why,
                                        suite=self.suite_name)
            raise
        except ModelBusy as exc:  # another process onboards it: no failure of this model
            self._busy(d.name, exc)
            return
        except sqlite3.OperationalError as exc:  # the store refused a write for its busy timeout
            self._wait(d.name, f"the state store refuses writes: {exc}")
            return
        except QuestionSourceError as exc:
            await self._fail(d.name, digest, config, exc.message)
            return
        except DataError as exc:  # SATROUTE_ONBOARDING_SUITE names no suite, or a broken one
            await self._fail(d.name, digest, config,
                             f"aptitude suite {self.suite_name!r} cannot be loaded: {exc}")
            return
        except Exception as exc:  # a bug must not leave the model "running" for ever
            log.exception("onboarding %s crashed", d.name)
            await self._fail(d.name, digest, config, f"onboarding crashed: {type(exc).__name__}: {exc}")
            return
        self._waiting.pop(d.name, None)
        self._elsewhere.pop(d.name, None)
        if progress.status == "pending":
            # stopped at an ask by an edit (the model gone, or pointing elsewhere): the next tick
            # looks again, since the edit may have been undone meanwhile, with no change left for
            # it to see (the run resumes, or starts over on the other upstream)
            self._retry_asked = True
        if progress.status == "done":
            self.registry.refresh_profiles()
            log.info("model %s onboarded: now an auto candidate", d.name)
        elif progress.status == "failed":
            self._failed_stamp[d.name] = digest
            log.info(_RETRY_HINT, d.name)

    async def _fail(self, model: str, digest: bytes, config: str, reason: str) -> None:
        """Record a run that could not go on: ``failed`` with the reason (and ``config``, for the
        other processes), until the file changes."""
        self._failed_stamp[model] = digest
        self._waiting.pop(model, None)
        log.error("onboarding %s failed: %s", model, reason)
        log.info(_RETRY_HINT, model)
        try:
            await asyncio.to_thread(self.store.set_status, model, "failed", reason,
                                    suite=self.suite_name, config=config)
        except Exception:  # the store itself is broken: the log says why
            log.exception("onboarding %s: cannot record the failure", model)

    async def _get_engine(self) -> Onboarding:
        async with self._engine_lock:
            if self._engine is None:
                if self._source_error is not None:
                    raise QuestionSourceError(self._source_error)
                from scorer.aptitude import load_suite

                suite = load_suite(self.suite_name)
                try:
                    questions: list[Question] = await asyncio.to_thread(
                        load_questions, suite.question_ids, suite.name, self.data, hub=self.hub,
                        cache_dir=self.store.dir)
                except QuestionSourceError as exc:
                    self._source_error = exc.message
                    raise
                self._engine = Onboarding(self.store, suite, questions, self.asker, self.options)
                if self.draining:
                    self._engine.drain()
            return self._engine

    def _suite_questions(self) -> frozenset[str] | None:
        """The suite's question ids, which progress counts (None while the suite cannot load:
        every stored answer counts)."""
        if self._questions is None:
            from scorer.aptitude import load_suite

            try:
                suite = self._engine.suite if self._engine is not None else load_suite(self.suite_name)
            except Exception:  # the run that needs the suite fails with the reason; this only counts
                return None
            self._questions = frozenset(suite.question_ids)
        return self._questions

    # -- what the admin endpoints show ------------------------------------------------------
    def _shown(self, p: Progress) -> tuple[str, str | None]:
        """A stored row's status and reason as shown: ``running`` or ``stalled`` without a held
        lease is a run that was stopped without saying so (killed; an earlier version's shutdown):
        nothing runs it, and the next run resumes it. A live run's status that the store refused
        to record (a full disk: the row still says running) is shown instead of the row's."""
        unstored = self._engine.unstored.get(p.model) if self._engine is not None else None
        if unstored is not None:  # this process's live run, whose store refuses writes now
            return unstored
        if p.status in ("running", "stalled") and not self.store.held(p.owner, p.heartbeat,
                                                                      ("lease", p.model)):
            return "pending", "interrupted"
        return p.status, p.reason

    def status(self) -> dict:
        """Every configured model's onboarding, as the admin API shows it. A model shown ``done``
        is an ``auto`` candidate already: a profile finished in the store is read into the
        registry first (it may have been stored a moment ago, here or by another process).
        ``ServiceUnavailable`` (503) when the store cannot be read (damaged, locked)."""
        try:
            progress = {p.model: p for p in self.store.all_progress(self._suite_questions(),
                                                                    list(self.registry.snapshot.models))}
            self._pick_up_profiles(progress.values())
        except sqlite3.DatabaseError as exc:
            raise ServiceUnavailable(f"the state store cannot be read ({self.store.path}): {exc}",
                                     code="state_store_unavailable") from None
        snap = self.registry.snapshot
        out: dict[str, dict] = {}
        for name, d in snap.models.items():
            if d.info.capability_profile:
                out[name] = {"status": "done", "reason": None, "profile_source": "providers.yaml",
                             "questions_done": 0, "questions_total": 0, "accuracy_so_far": None}
                continue
            p = progress.get(name)
            entry = status_of(p)
            if name in self._elsewhere:  # what is stored is another upstream's, not this one's
                entry = status_of(None)
                entry["reason"] = self._elsewhere[name]
            elif p is not None:
                entry["status"], entry["reason"] = self._shown(p)
            if entry["status"] == "pending" and not d.available:
                entry["reason"] = f"unavailable: {d.unavailable}"
            elif entry["status"] == "pending" and not d.info.onboard and d.profile is None:
                entry["reason"] = "not onboarded: model_info.onboard is false"
            entry["profile_source"] = "onboarding" if d.profile is not None else None
            out[name] = entry
        return {"suite": self.suite_name, "stopped": self.store_lost, "models": out}

    def profile(self, name: str) -> dict | None:
        """``{"model", "suite", "source", "tasks"}`` for a model that has a profile, else None."""
        d = self.registry.snapshot.models.get(name)
        if d is None or d.profile is None:
            return None
        source = "providers.yaml" if d.info.capability_profile else "onboarding"
        suite = self.store.profile_suite(name) if source == "onboarding" else d.profile_suite
        return {"model": name, "suite": suite, "source": source, "tasks": dict(d.profile)}

    def retry_failed(self) -> list[str]:
        """Have the next tick onboard again every model whose run failed (SIGHUP: its upstream,
        down or refusing, may be back, with providers.yaml unchanged); the models, by name."""
        if self.draining:  # stopping, or stopped for a lost store: nothing is tried again
            return []
        failed = sorted(self._failed_stamp)
        self._failed_stamp.clear()
        self._since = time.time()  # a failure stored before is not this configuration's to keep
        self._retry_asked = self._retry_asked or bool(failed)  # two before a tick: still asked
        return failed

    def begin_drain(self) -> None:
        """The proxy is stopping: start no run and ask no new question; the asks out go on."""
        self.draining = True
        if self._engine is not None:
            self._engine.drain()

    async def drain(self, deadline: float, forced: Callable[[], bool] = lambda: False) -> None:
        """Let the questions already sent be answered and stored, until ``deadline``
        (``time.monotonic``) or ``forced()``: they are paid for, and an answer cut off is paid
        again at the next start. ``stop`` cancels what is left."""
        self.begin_drain()
        engine = self._engine
        if engine is None or not engine.asks_out():
            return
        log.info("onboarding: waiting up to %.0fs for the %d questions sent to be answered",
                 max(0.0, deadline - time.monotonic()), engine.asks_out())
        while engine.asks_out() and time.monotonic() < deadline and not forced():
            await asyncio.sleep(0.05)
        if engine.asks_out():
            held = engine.answers_unstored()
            out = engine.asks_out() - held
            said = [f"{out} question{'s' if out != 1 else ''} sent were not answered"] if out else []
            if held:  # answered and paid for, but the store refused them (a full disk)
                said.append(f"{held} answer{'s' if held != 1 else ''} received could not be stored "
                            "(the state store refuses writes)")
            log.warning("onboarding: %s before the shutdown's deadline; they are asked again at the "
                        "next start", " and ".join(said))

    async def stop(self) -> None:
        for task in self.runs.values():
            task.cancel()
        await asyncio.gather(*self.runs.values(), return_exceptions=True)


def service_options(settings: Any) -> Options:
    """Onboarding options from the proxy's Settings (a negative spend cap means none)."""
    cap = settings.onboarding_spend_cap_usd
    return Options(concurrency=settings.onboarding_concurrency,
                   max_tokens=settings.onboarding_max_tokens,
                   spend_cap_usd=None if cap is None or cap < 0 else cap)


def open_store(settings: Any) -> Store | None:
    """The state store, when onboarding or the routing log is on, or an earlier run left one."""
    from proxy.store import DB_NAME

    if settings.onboarding or settings.route_log or (Path(settings.state_dir) / DB_NAME).exists():
        return Store(settings.state_dir)
    return None


def onboarding_hook(store: Store) -> Callable[[Any], None]:
    """A start-up hook: attach the service to the app's Services and start its watch loop."""

    def hook(svc: Any) -> None:
        settings = svc.settings
        svc.spawn(_close_at_shutdown(store, svc), "state-store")
        if not settings.onboarding:
            return
        svc.onboarding = OnboardingService(
            store, svc.registry, DispatchAsker(svc.registry, svc.dispatcher), svc.spawn,
            suite=settings.onboarding_suite, data=settings.onboarding_data,
            hub=settings.onboarding_hub, options=service_options(settings),
            metrics=getattr(svc, "metrics", None))
        svc.spawn(svc.onboarding.watch(min(0.5, settings.reload_interval_s)), "onboarding-watch")

    return hook


async def _close_at_shutdown(store: Store, svc: Any) -> None:
    try:
        await asyncio.Event().wait()
    finally:
        # the runs, cancelled at shutdown too, write their last answer and give up their leases
        # before the store closes (else: "Cannot operate on a closed database", logged as a crash)
        if getattr(svc, "onboarding", None) is not None:
            await svc.onboarding.stop()
        store.close()
