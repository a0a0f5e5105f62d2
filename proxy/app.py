"""Composition root: builds settings, registry, scorer, dispatcher once and wires the Starlette app.

Owns: ``create_app`` (the factory uvicorn and tests call), the ``Services`` every handler reaches
through ``request.app.state.services``, and the lifespan: it loads the scorer in the background,
watches providers.yaml for edits, runs startup hooks (``hook(services)``, which may start their own
background tasks with ``services.spawn``), and closes everything on shutdown: the routing log's last
write first, then background tasks (the state store closes with them), the dispatcher, the scorer.
Does not know: request parsing, routing policy, upstream protocols.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Coroutine, Iterable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy import admin, endpoints, protocol
from proxy.auth import MasterKeyAuth, is_loopback
from proxy.cooldown import Cooldowns
from proxy.cpuload import CpuLoad, busy_within_quota
from proxy.dispatch import Dispatcher, RetryingDispatcher
from proxy.errors import SatrouteError, StateStoreError, error_event, plain_error_response
from proxy.localserver import local_models_hook, shared_key, threads_of
from proxy.logs import RequestLogMiddleware
from proxy.metrics import Metrics
from proxy.onboarding_service import onboarding_hook, open_store
from proxy.openapi import openapi_endpoint
from proxy.providers import ProfileSource, ProviderRegistry, Snapshot
from proxy.routelog import route_log_hook
from proxy.scoring import ScorerHost
from proxy.settings import Settings, environ
from proxy.store import unopenable

log = logging.getLogger("satroute.app")

StartupHook = Callable[["Services"], Awaitable[None] | None]


@dataclass
class Services:
    """The long-lived objects of one app; built once, reached from handlers via app.state."""

    settings: Settings
    registry: ProviderRegistry
    scoring: ScorerHost
    dispatcher: Dispatcher
    cooldowns: Cooldowns
    metrics: Metrics = field(default_factory=Metrics)
    onboarding: Any = None  # OnboardingService, attached at start-up when onboarding is on
    route_log: Any = None  # routelog.RouteLog, attached at start-up when there is a state store
    store: Any = None  # proxy.store.Store, when there is a state store
    tasks: set[asyncio.Task] = field(default_factory=set)
    stopping_since: float | None = None  # time.monotonic() when the shutdown began
    leaving: bool = False  # a stop signal came: /ready says not ready (SATROUTE_SHUTDOWN_DELAY_S)

    @property
    def stop_signalled(self) -> bool:
        """A stop signal came (the shutdown may not have begun: SATROUTE_SHUTDOWN_DELAY_S): no
        configuration edit is taken from now on, and no onboarding is tried again."""
        return self.leaving or self.stopping_since is not None
    forced: Callable[[], bool] = lambda: False  # the server was told to quit at once (Ctrl+C twice)

    def begin_shutdown(self) -> None:
        """The shutdown begins (SIGTERM, before the in-flight requests' grace period): onboarding
        asks no new question from now on. Called again by the lifespan's end, which it starts
        only once."""
        if self.stopping_since is None:
            self.stopping_since = time.monotonic()
        if self.onboarding is not None:
            self.onboarding.begin_drain()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task:
        """Start a background task that lives until shutdown (cancelled then); failures logged."""
        task = asyncio.create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()  # its type and message, never its repr (which may quote data)
            log.error("background task %s failed: %s: %s", task.get_name(), type(exc).__name__, exc)

    async def stop_tasks(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def follow_edit(cooldowns: Cooldowns, old: Snapshot, new: Snapshot) -> None:
    """Cooldowns after an edit of providers.yaml: a model now reached another way (its model,
    api_base or key changed: the fix for what failed) starts with a clean record, and no cooldown
    outlasts a lowered ``cooldown_s`` (one for a wait an upstream named, ``cooldown_max_s``). A
    model no longer in the file keeps no record (``/ready`` would list it as cooling)."""
    for name in old.models.keys() - new.models.keys():
        cooldowns.forget(name)
    for name, d in new.models.items():
        before = old.models.get(name)
        if before is None or (before.model, before.api_base, before.api_key) != (d.model, d.api_base,
                                                                                 d.api_key):
            cooldowns.forget(name)
    router = new.router
    cooldowns.shorten(router.cooldown_s, router.cooldown_max_s if router.cooldown_s > 0 else 0.0)


def build_services(settings: Settings, *, scorer: Any = None, dispatcher: Dispatcher | None = None,
                   profile_source: ProfileSource | None = None, local_key: str | None = None) -> Services:
    registry = ProviderRegistry(settings.config, environ, profile_source, local_key=local_key)
    cooldowns = Cooldowns()
    registry.on_reload.append(lambda old, new: follow_edit(cooldowns, old, new))
    metrics = Metrics()
    registry.on_reload.append(lambda old, new: metrics.follow_models(old.models, new.models))
    metrics.config_rejected.set_function(lambda: float(registry.rejected is not None))
    dispatcher = dispatcher or RetryingDispatcher(cooldowns, metrics=metrics, log_prompts=settings.log_prompts)
    unusable = getattr(dispatcher, "unusable", None)
    if unusable is not None:  # a model litellm cannot call is left out, with the reason, in /ready
        registry.checks.append(unusable)
        dispatcher.on_litellm.append(registry.refresh_profiles)  # it tells once litellm is loaded
    return Services(
        settings=settings, registry=registry,
        scoring=ScorerHost(scorer, threads=settings.scorer_threads, on_call=metrics.observe_scoring),
        dispatcher=dispatcher, cooldowns=cooldowns, metrics=metrics)


# What a browser's script may read of an answer: the routing headers, the request id, Retry-After.
EXPOSED_HEADERS = [protocol.HEADER_MODEL, protocol.HEADER_ROUTE, protocol.HEADER_DEGRADED,
                   protocol.HEADER_SCORES, protocol.HEADER_SCORER_MS, protocol.HEADER_FAILED,
                   "x-request-id", "retry-after", "x-should-retry"]


# OpenAI's APIs other than chat completions, by the first part of their path after /v1. A client
# that calls one (the Agents SDK calls the Responses API by default) is told what is served, and
# frameworks that read any 404 as "model not found" at least print a message that says what to do.
OTHER_OPENAI_APIS = frozenset({
    "responses", "embeddings", "completions", "audio", "images", "moderations", "files",
    "uploads", "batches", "fine_tuning", "assistants", "threads", "vector_stores", "realtime",
    "conversations", "containers", "videos", "evals"})
NOT_SERVED = ("not served here: satroute serves the Chat Completions API (POST /v1/chat/completions) "
              "and the model list (GET /v1/models); set the client to use chat completions "
              "(docs/frontends.md says how for common SDKs and frameworks)")


def _other_openai_api(path: str) -> bool:
    parts = path.strip("/").split("/")
    if parts[0] == "v1":
        parts = parts[1:]
    return bool(parts) and parts[0] in OTHER_OPENAI_APIS


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = "not_found" if exc.status_code == 404 else "method_not_allowed"
    said = (NOT_SERVED if exc.status_code == 404 and _other_openai_api(request.url.path)
            else exc.detail)
    return plain_error_response(exc.status_code, f"{request.method} {request.url.path}: {said}",
                                "invalid_request_error", code,
                                headers=exc.headers)  # a 405's Allow


async def _internal_error(request: Request, exc: Exception) -> Response:
    # The last resort: the trace goes to the log, never to the client.
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _crash_response()


class WithoutTrailingSlash:
    """A path written with one trailing ``/`` (``/v1/chat/completions/``, as a base URL ending in
    ``/`` or a hand-written URL gives it) is served as the path without it. Starlette would answer
    an empty 307 whose ``Location`` it builds from the ``Host`` header and the connection's scheme:
    ``http://`` behind a TLS-terminating balancer, an internal host name behind a reverse proxy,
    and a bodiless error to an SDK that does not follow redirects."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and len(path) > 1 and path.endswith("/"):
            scope = {**scope, "path": path[:-1]}
            raw = scope.get("raw_path")
            if raw and raw.partition(b"?")[0].endswith(b"/"):
                scope["raw_path"] = raw.partition(b"?")[0][:-1]
        await self.app(scope, receive, send)


def _crash_response() -> Response:
    # the server closes the connection after an error the app raised: said, so that a client's
    # pool opens a new one for its next request instead of meeting a reset on this one
    return plain_error_response(500, "internal error in the proxy", "internal_error",
                                headers={"Connection": "close"})


def _shutdown_response() -> Response:
    """A request still unanswered when the shutdown's grace period ran out: a 503 the SDKs retry
    (elsewhere, behind a load balancer), rather than the server's plain-text 500."""
    return plain_error_response(503, "the proxy is shutting down; send the request again",
                                "server_error", "shutting_down",
                                headers={"Retry-After": "1", "Connection": "close"})


def create_app(settings: Settings | None = None, *, scorer: Any = None,
               dispatcher: Dispatcher | None = None, profile_source: ProfileSource | None = None,
               startup: Iterable[StartupHook] = ()) -> Starlette:
    """The ASGI app. Tests inject a scorer and/or dispatcher; a ConfigError raises here."""
    settings = settings or Settings()
    # The onboarding store is the registry's source of profiles unless a test injects its own.
    try:
        store = open_store(settings) if profile_source is None else None
    except (OSError, sqlite3.Error) as exc:  # a file where the folder should be, no permission, ...
        raise StateStoreError(unopenable(settings.state_dir, exc) + " (SATROUTE_STATE_DIR)") from None
    # the local servers' key kept in the state folder (or made and kept there now, once for every
    # proxy on it): a `satroute onboard` that read it goes on asking the local model across a
    # restart of this proxy, and asks any proxy's servers on that folder with it
    svc = build_services(settings, scorer=scorer, dispatcher=dispatcher,
                         profile_source=profile_source or store,
                         local_key=shared_key(store.dir) if store is not None else None)
    svc.store = store
    hooks = [local_models_hook, *([onboarding_hook(store), route_log_hook(store)] if store else []),
             *startup]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        def profiles() -> dict:
            return {d.name: d.profile for d in svc.registry.snapshot.models.values() if d.routable}

        busy = getattr(svc.dispatcher, "busy", None)

        others = CpuLoad()

        def cores_busy() -> int:
            # the threads of the local model servers answering now (known at once), or the cores
            # other processes (those servers among them) kept busy over the last second
            local = sum(threads_of(d.info.local_server) for d in svc.registry.snapshot.models.values()
                        if d.info.local_server is not None and busy is not None and busy(d.name) > 0)
            return max(local, busy_within_quota(others.busy_cores()))

        svc.spawn(svc.scoring.keep_loading(settings, profiles, cores_busy), "scorer-load")
        if settings.scorer == "modelsat" and not settings.scorer_torch_threads:
            svc.spawn(others.watch(1.0), "cpu-load")
        # until the shutdown begins: an edit during its grace period is logged, not taken
        svc.spawn(svc.registry.watch(settings.reload_interval_s,
                                     lambda: svc.stop_signalled), "config-watch")
        svc.spawn(svc.scoring.keep_warm(profiles, max(1.0, settings.reload_interval_s)), "scorer-warm")
        prepare = getattr(svc.dispatcher, "prepare", None)
        if prepare is not None:  # import litellm now if a model needs it, not in a request's time
            def after_edit(old: Snapshot, new: Snapshot) -> None:  # its models may be the first to need litellm
                try:
                    asyncio.get_running_loop()
                except RuntimeError:  # reloaded off the server's loop: the first request prepares
                    return
                svc.spawn(prepare(list(new.models.values())), "dispatch-prepare")

            svc.spawn(prepare(list(svc.registry.snapshot.models.values())), "dispatch-prepare")
            svc.registry.on_reload.append(after_edit)
        for hook in hooks:
            result = hook(svc)
            if asyncio.iscoroutine(result):
                await result
        try:
            yield
        finally:
            svc.begin_shutdown()
            if svc.onboarding is not None:  # its asks out are paid for: their answers are stored
                assert svc.stopping_since is not None
                await svc.onboarding.drain(svc.stopping_since + settings.shutdown_timeout_s,
                                           svc.forced)
            if svc.route_log is not None:  # its last write must land before the store closes
                await svc.route_log.stop()
            await svc.stop_tasks()
            close = getattr(svc.dispatcher, "close", None)
            if close is not None:
                await close()
            svc.scoring.close()
            log.info("shutdown complete")

    routes = [
        Route("/v1/chat/completions", endpoints.chat_completions, methods=["POST"]),
        Route("/v1/models", endpoints.list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", endpoints.retrieve_model, methods=["GET"]),
        Route("/health", endpoints.health, methods=["GET"]),
        Route("/ready", endpoints.ready, methods=["GET"]),
        Route("/metrics", svc.metrics.endpoint, methods=["GET"]),
        Route("/openapi.json", openapi_endpoint, methods=["GET"]),
        Route("/admin/route", endpoints.route_preview, methods=["POST"]),
        *admin.routes(),
        # The same endpoints without the /v1 prefix, as LiteLLM's proxy serves them, for clients
        # configured with the bare host as base URL; left out of /openapi.json.
        Route("/chat/completions", endpoints.chat_completions, methods=["POST"], include_in_schema=False),
        Route("/models", endpoints.list_models, methods=["GET"], include_in_schema=False),
        Route("/models/{model_id:path}", endpoints.retrieve_model, methods=["GET"], include_in_schema=False),
    ]
    # Every request, 401s included, gets a request id and its one log line.
    request_log = Middleware(RequestLogMiddleware, include_prompts=settings.log_prompts,
                             on_record=[svc.metrics.observe_record],
                             in_flight=svc.metrics.in_flight, crash_response=_crash_response,
                             cut_response=_shutdown_response,
                             cut_event=error_event("the proxy is shutting down: the answer is incomplete",
                                                   "server_error", "shutting_down"))
    # CORS (when origins are set) outermost: a browser's preflight, which carries no key, is answered
    # before the key check, and every answer, the request log's own 500 included, carries its headers.
    origins = settings.cors_origin_list()
    cors = [Middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                       allow_headers=["*"], expose_headers=EXPOSED_HEADERS, max_age=600)] if origins else []
    app = Starlette(
        routes=routes, lifespan=lifespan,
        middleware=[Middleware(WithoutTrailingSlash), *cors, request_log,
                    Middleware(MasterKeyAuth, master_key=settings.master_key_value(),
                               origins=origins, loopback=is_loopback(settings.host))],
        exception_handlers={SatrouteError: endpoints.satroute_error, HTTPException: _http_error,
                            500: _internal_error})
    app.router.redirect_slashes = False  # WithoutTrailingSlash serves those paths; no 307 for others
    app.state.services = svc
    return app
