"""Admin endpoints for onboarding: ``GET /admin/onboarding`` and ``GET /admin/models/{name}/profile``.

Owns: the two read-only handlers and their JSON. They sit behind the master key like every route
outside ``/health`` and ``/ready`` (``proxy.auth``).
``/admin/onboarding``: ``{"enabled", "suite", "models": {name: {"status": pending | running |
stalled | failed | done, "reason", "questions_done", "questions_total", "accuracy_so_far",
"profile_source": "providers.yaml" | "onboarding" | null, ...}}}``.
``/admin/models/{name}/profile``: ``{"model", "suite", "source", "tasks": {task_id: accuracy}}``;
404 in OpenAI's error shape for an unknown model or one without a profile yet.
Does not know: how onboarding runs (``proxy.onboarding_service``), routing, dispatch.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.errors import ModelNotFound

if TYPE_CHECKING:
    from proxy.app import Services

JSON = "application/json"


def _services(request: Request) -> "Services":
    return request.app.state.services


async def onboarding_status(request: Request) -> Response:
    """Onboarding status of every configured model: state, reason, questions done, accuracy so far.

    ``{"enabled", "suite", "models": {name: {"status", "reason", "questions_done",
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
        payload = {"enabled": False, "suite": None, "models": models}
    else:
        payload = {"enabled": True, **service.status()}
    return Response(orjson.dumps(payload), media_type=JSON)


async def model_profile(request: Request) -> Response:
    """A model's capability profile: its accuracy on each task of the aptitude suite.

    ``{"model", "suite", "source", "tasks": {task_id: accuracy}}``; 404 while it has none.
    """
    svc = _services(request)
    name = request.path_params["name"]
    d = svc.registry.snapshot.models.get(name)
    if d is None:
        raise ModelNotFound(f"no model {name!r} in providers.yaml", param="name")
    if d.profile is None:
        status = svc.onboarding.status()["models"].get(name, {}) if svc.onboarding else {}
        why = status.get("status", "pending")
        raise ModelNotFound(f"model {name!r} has no capability profile yet (onboarding: {why})",
                            param="name", code="profile_not_found")
    if svc.onboarding is not None:
        body = svc.onboarding.profile(name)
    else:
        body = {"model": name, "suite": None,
                "source": "providers.yaml" if d.info.capability_profile else "onboarding",
                "tasks": dict(d.profile)}
    return Response(orjson.dumps(body), media_type=JSON)


def routes() -> list[Route]:
    return [Route("/admin/onboarding", onboarding_status, methods=["GET"]),
            Route("/admin/models/{name:path}/profile", model_profile, methods=["GET"])]
