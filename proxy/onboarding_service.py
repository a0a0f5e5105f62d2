"""Onboarding inside the proxy: every configured model without a profile takes the test in the background.

Owns: ``DispatchAsker`` (the onboarding seam filled with the proxy's own dispatch path, so the test
goes through the same retries, timeouts and cooldowns as traffic) and ``OnboardingService``, which
watches the provider registry: at start-up and after every change of providers.yaml it starts a
background run for each available model that has neither a profile in the file nor a finished one in
the store (a failed run is tried again only when the file changes or the proxy restarts); it cancels
runs of models removed from the file, and when a run is done it makes the registry read the store
again, so the model becomes an ``auto`` candidate. Until then the model is callable by name only.
Also the JSON the admin endpoints show (``status``, ``profile``).
Does not know: HTTP handlers, how answers are graded or stored (``proxy.onboarding``, ``proxy.store``).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path
from typing import Any, Callable, Coroutine

import orjson

from proxy.dispatch import Call, Dispatcher
from proxy.errors import UpstreamClientError, UpstreamTransient
from proxy.onboarding import Onboarding, Options, Prices, status_of
from proxy.providers import Deployment, ProviderRegistry
from proxy.questions import Question, QuestionSourceError, load_questions
from proxy.store import Store

log = logging.getLogger("satroute.onboarding")

Spawn = Callable[[Coroutine[Any, Any, Any], str], asyncio.Task]


class DispatchAsker:
    """``Asker`` over the proxy's dispatcher: one non-streamed chat completion to one named model."""

    def __init__(self, registry: ProviderRegistry, dispatcher: Dispatcher):
        self.registry, self.dispatcher = registry, dispatcher

    async def ask(self, model: str, messages: list[dict], **params: object) -> str:
        snap = self.registry.snapshot
        target = snap.models.get(model)
        if target is None:
            raise UpstreamClientError(f"model {model!r} is no longer in providers.yaml", status=404,
                                      model=model)
        body = {"model": model, "messages": messages, **params}
        reply = await self.dispatcher.complete(Call(targets=[target], body=body, stream=False,
                                                    router=snap.router, redact=snap.redact))
        try:
            message = orjson.loads(reply.body or b"{}")["choices"][0]["message"]
            return message.get("content") or ""
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise UpstreamTransient(f"{model}: answer is not a chat completion: "
                                    f"{(reply.body or b'')[:200]!r}", model=model) from None


def prices_of(d: Deployment) -> Prices:
    return Prices(d.info.input_price_per_mtok, d.info.output_price_per_mtok)


def needs_onboarding(d: Deployment) -> bool:
    return d.available and d.info.onboard and not d.info.capability_profile and d.profile is None


class OnboardingService:
    def __init__(self, store: Store, registry: ProviderRegistry, asker: Any, spawn: Spawn, *,
                 suite: str = "mmlu_pro", data: Path | None = None, hub: bool = True,
                 options: Options = Options(), metrics: Any = None):
        self.store, self.registry, self.asker, self.spawn = store, registry, asker, spawn
        self.metrics = metrics  # has observe_onboarding(model, answered, total, state), or None
        self.suite_name, self.data, self.hub, self.options = suite, data, hub, options
        self.runs: dict[str, asyncio.Task] = {}
        self._engine: Onboarding | None = None
        self._engine_lock = asyncio.Lock()
        self._source_error: str | None = None
        self._failed_stamp: dict[str, bytes] = {}  # model -> file digest when its run failed
        self._digest = b""

    # -- the background loop ----------------------------------------------------------------
    async def watch(self, interval_s: float) -> None:
        """Sync at once, then whenever the registry's snapshot changes (until cancelled)."""
        last = None
        while True:
            snap = self.registry.snapshot
            if snap is not last:
                last = snap
                self.sync()
            self._report()
            await asyncio.sleep(interval_s)

    def _report(self) -> None:
        """Onboarding progress into the metrics (one query, on each tick of the watch loop)."""
        if self.metrics is None:
            return
        for p in self.store.all_progress():
            if p.model in self.registry.snapshot.models:
                self.metrics.observe_onboarding(p.model, p.done, p.total, p.status)

    def _file_digest(self) -> bytes:
        try:
            return hashlib.sha256(self.registry.path.read_bytes()).digest()
        except OSError:
            return self._digest

    def sync(self) -> None:
        """Start runs for models that need one; cancel runs of models that left the file."""
        digest = self._file_digest()
        if digest != self._digest:
            self._digest = digest
            self._source_error = None  # a changed file may have fixed the data path: try again
        models = self.registry.snapshot.models
        for name, task in list(self.runs.items()):
            if name not in models and not task.done():
                log.info("onboarding %s cancelled: no longer in providers.yaml", name)
                task.cancel()
        for name, d in models.items():
            running = name in self.runs and not self.runs[name].done()
            if running or not needs_onboarding(d):
                continue
            if self._failed_stamp.get(name) == digest:
                continue  # failed with this very configuration; wait for an edit or a restart
            self.runs[name] = self.spawn(self._run(d, digest), f"onboard-{name}")

    async def _run(self, d: Deployment, digest: bytes) -> None:
        try:
            engine = await self._get_engine()
        except QuestionSourceError as exc:
            self.store.set_status(d.name, "failed", exc.message, suite=self.suite_name)
            self._failed_stamp[d.name] = digest
            return
        progress = await engine.run(d.name, prices_of(d))
        if progress.status == "done":
            self.registry.refresh_profiles()
            log.info("model %s onboarded: now an auto candidate", d.name)
        elif progress.status == "failed":
            self._failed_stamp[d.name] = digest

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
            return self._engine

    # -- what the admin endpoints show ------------------------------------------------------
    def status(self) -> dict:
        snap = self.registry.snapshot
        out: dict[str, dict] = {}
        for name, d in snap.models.items():
            if d.info.capability_profile:
                out[name] = {"status": "done", "reason": None, "profile_source": "providers.yaml",
                             "questions_done": 0, "questions_total": 0, "accuracy_so_far": None}
                continue
            entry = status_of(self.store.progress(name))
            if entry["status"] == "pending" and not d.available:
                entry["reason"] = f"unavailable: {d.unavailable}"
            entry["profile_source"] = "onboarding" if d.profile is not None else None
            out[name] = entry
        return {"suite": self.suite_name, "models": out}

    def profile(self, name: str) -> dict | None:
        """``{"model", "suite", "source", "tasks"}`` for a model that has a profile, else None."""
        d = self.registry.snapshot.models.get(name)
        if d is None or d.profile is None:
            return None
        source = "providers.yaml" if d.info.capability_profile else "onboarding"
        suite = self.store.profile_suite(name) if source == "onboarding" else None
        return {"model": name, "suite": suite, "source": source, "tasks": dict(d.profile)}

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
        svc.spawn(_close_at_shutdown(store), "state-store")
        if not settings.onboarding:
            return
        svc.onboarding = OnboardingService(
            store, svc.registry, DispatchAsker(svc.registry, svc.dispatcher), svc.spawn,
            suite=settings.onboarding_suite, data=settings.onboarding_data,
            hub=settings.onboarding_hub, options=service_options(settings),
            metrics=getattr(svc, "metrics", None))
        svc.spawn(svc.onboarding.watch(min(0.5, settings.reload_interval_s)), "onboarding-watch")

    return hook


async def _close_at_shutdown(store: Store) -> None:
    try:
        await asyncio.Event().wait()
    finally:
        store.close()
