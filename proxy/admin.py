"""Admin endpoints: onboarding status, a model's capability profile, the routing log.

Owns: the three read-only handlers and their JSON. They sit behind the master key like every route
outside ``/health`` and ``/ready`` (``proxy.auth``).
``/admin/onboarding``: ``{"enabled", "suite", "models": {name: {"status": pending | running |
stalled | failed | done, "reason", "questions_done", "questions_total", "accuracy_so_far",
"profile_source": "providers.yaml" | "onboarding" | null, ...}}}``.
``/admin/models/{name}/profile``: ``{"model", "suite", "source", "tasks": {task_id: accuracy}}``;
404 in OpenAI's error shape for an unknown model or one without a profile yet.
``/admin/routes?limit=N``: the routing log, newest first, ``{"object": "list", "data": [{"at",
"requested", "chosen", "scores", "scorer_ms", "failed", "degraded", "request_id"}]}``; ``limit`` 1 to 1000
(default 100), 400 otherwise; an empty list when there is no routing log.
Does not know: how onboarding runs (``proxy.onboarding_service``), how the routing log is written
(``proxy.routelog``), routing, dispatch.
"""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.errors import ModelNotFound, RequestError

if TYPE_CHECKING:
    from proxy.app import Services

JSON = "application/json"
ROUTES_DEFAULT_LIMIT = 100
ROUTES_MAX_LIMIT = 1000


def _services(request: Request) -> "Services":
    return request.app.state.services


async def onboarding_status(request: Request) -> Response:
    """Onboarding status of every configured model: state, reason, questions done, accuracy so far.

    ``{"enabled", "suite", "stopped", "models": {name: {"status", "reason", "questions_done",
    "questions_total", "accuracy_so_far", "profile_source"}}}``; behind the master key.
    """
    svc = _services(request)
    service = svc.onboarding
    if service is None:
        snap = svc.registry.snapshot
        models = {name: {"status": "done" if d.profile is not None else "pending",
                         "reason": None if d.profile is not None else "onboarding is disabled",
                         "profile_source": ("providers.yaml" if d.info.capability_profile
                                            else "onboarding" if d.profile is not None else None)}
                  for name, d in snap.models.items()}
        payload = {"enabled": False, "suite": None, "stopped": None, "models": models}
    else:
        payload = {"enabled": True, **service.status()}
    return Response(orjson.dumps(payload), media_type=JSON)


async def model_profile(request: Request) -> Response:
    """A model's capability profile: its accuracy on each task of the aptitude suite.

    ``{"model", "suite", "source", "tasks": {task_id: accuracy}}``; 404 while it has none. A name
    no longer in providers.yaml (renamed, removed) whose profile the store still holds gets it,
    with ``"configured": false``: saved, it is a ``capability_profile`` for the new name.
    """
    svc = _services(request)
    name = request.path_params["name"]
    d = svc.registry.snapshot.models.get(name)
    if d is None:
        stored = await asyncio.to_thread(_stored_profile, svc.store, name) if svc.store else None
        if stored is None:
            raise ModelNotFound(f"no model {name!r} in providers.yaml", param="name")
        return Response(orjson.dumps(stored), media_type=JSON)
    if d.profile is None:
        status = svc.onboarding.status()["models"].get(name, {}) if svc.onboarding else {}
        why = status.get("status", "pending")
        raise ModelNotFound(f"model {name!r} has no capability profile yet (onboarding: {why})",
                            param="name", code="profile_not_found")
    if svc.onboarding is not None:
        body = svc.onboarding.profile(name)
    elif d.info.capability_profile:
        body = {"model": name, "suite": d.profile_suite, "source": "providers.yaml",
                "tasks": dict(d.profile)}
    else:  # stored by an earlier run or by `satroute onboard`: the store knows its suite
        suite = svc.store.profile_suite(name) if svc.store is not None else None
        body = {"model": name, "suite": suite, "source": "onboarding", "tasks": dict(d.profile)}
    return Response(orjson.dumps(body), media_type=JSON)


def _stored_profile(store, name: str) -> dict | None:
    """The profile the store holds under ``name`` whatever upstream it was measured on, as the
    profile endpoint gives it, or None."""
    tasks = store.get(name)
    if tasks is None:
        return None
    return {"model": name, "suite": store.profile_suite(name), "source": "onboarding",
            "configured": False, "tasks": tasks}


async def routing_log(request: Request) -> Response:
    """The most recent routing decisions, newest first (``?limit=N``, 1 to 1000, default 100).

    ``{"object": "list", "data": [{"at", "requested", "chosen", "scores", "scorer_ms", "failed",
    "request_id"}]}``; 400 for a bad limit; behind the master key.
    """
    raw = request.query_params.get("limit")
    limit = ROUTES_DEFAULT_LIMIT if raw is None else _int_in(raw, 1, ROUTES_MAX_LIMIT)
    if limit is None:
        raise RequestError(f"limit must be an integer from 1 to {ROUTES_MAX_LIMIT}, not {raw!r}",
                           param="limit", code="invalid_value")
    route_log = _services(request).route_log
    data = await route_log.recent(limit) if route_log is not None else []
    return Response(orjson.dumps({"object": "list", "data": data}), media_type=JSON)


def _int_in(text: str, low: int, high: int) -> int | None:
    value = int(text) if text.isascii() and text.isdigit() and len(text) <= 9 else None
    return value if value is not None and low <= value <= high else None


def routes() -> list[Route]:
    return [Route("/admin/onboarding", onboarding_status, methods=["GET"]),
            Route("/admin/models/{name:path}/profile", model_profile, methods=["GET"]),
            Route("/admin/routes", routing_log, methods=["GET"])]
