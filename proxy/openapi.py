"""``GET /openapi.json``: an OpenAPI 3.1 description of the endpoints this app really serves.

Owns: the document. It is built from the app's own route table at request time (so a route added
later, e.g. the admin endpoints, appears with its methods and its handler's docstring even without
an entry here), with request and response schemas taken from the wire types in ``proxy.protocol``
for the endpoints described in detail, and the master-key bearer scheme on every non-public path.
Does not know: what the handlers do beyond their docstrings; routing, dispatch.
"""
from __future__ import annotations

import inspect
import re
from typing import Any, Iterable

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route

from proxy import __version__, protocol
from proxy.auth import PUBLIC_PATHS

OPENAPI_VERSION = "3.1.0"
REF = "#/components/schemas/{model}"
_PARAM = re.compile(r"{(\w+):\w+}")
_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "object", "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}
_ERROR_CODES = {
    "400": "malformed JSON, a body that is not an object, missing or invalid fields",
    "401": "missing or wrong master key",
    "404": "the model is neither the router's name nor a configured, available model",
    "4XX": "the named model refused the request (its provider's 4xx, passed on: a 402 or a quota "
           "error when its account is out of credit)",
    "403": "a web page's request (its Origin is not listed in SATROUTE_CORS_ORIGINS) while no "
           "master key is set, or a loopback proxy reached under another host name",
    "408": "the body did not arrive in time",
    "413": "the body is larger than the configured limit",
    "415": "a Content-Encoding the proxy does not read",
    "429": "every candidate is rate limited (Retry-After, when a model named a wait: the soonest "
           "one); or the named model's own 429, passed on",
    "431": "the request's header fields are too large (the connection is then closed)",
    "502": "every model tried failed before the first byte",
    "503": "no routable model, the scorer is not loaded, or the named local model is starting "
           "(Retry-After says when to come back)",
    "504": "the request deadline passed before any model answered",
}
_ROUTING_HEADERS = {
    protocol.HEADER_MODEL: "the model that answered",
    protocol.HEADER_ROUTE: "'routed' (chosen by the scorer), 'direct' (named by the client), 'default' "
                           "(router_settings.default_model) or 'aptitude' (ranked by the profiles' means: "
                           "the scorer failed, timed out or is stalled)",
    protocol.HEADER_DEGRADED: "'aptitude' only: scorer_failed, scorer_timeout or scorer_stalled",
    protocol.HEADER_SCORES: "routed only: name=score pairs, best first",
    protocol.HEADER_SCORER_MS: "routed only: the scorer's latency in milliseconds",
    protocol.HEADER_FAILED: "name:reason pairs of models that failed before the answering one",
    "x-request-id": "the request id, also in the request's log line",
}


_NAMES = {"type": "array", "items": {"type": "string"}}
_READY = {
    "type": "object",
    "required": ["status", "reasons", "models", "scorer", "cooling", "cooling_left_s",
                 "out_of_quota", "unavailable", "config_rejected", "state_store", "mixed_suites",
                 "checked_at"],
    "properties": {
        "status": {"enum": ["ready", "not ready"]},
        "reasons": {**_NAMES, "description": "why not ready (e.g. 'shutting down')"},
        "models": {**_NAMES, "description": "the models that can be routed to now"},
        "scorer": {"type": "object", "description": "state (loading, loaded, failed, stalled), "
                   "runs_on, checkpoint, busy_s, cuda_error"},
        "cooling": {**_NAMES, "description": "the models cooling down after failures"},
        "cooling_left_s": {"type": "object", "additionalProperties": {"type": "number"},
                           "description": "the seconds each cooling model has left"},
        "out_of_quota": {**_NAMES, "description": "the models whose last call said their "
                         "account is out of quota or credit, none answered since"},
        "unavailable": {"type": "object", "additionalProperties": {"type": "string"},
                        "description": "configured models left out of routing, with why"},
        "config_rejected": {"type": ["string", "null"], "description": "why the providers.yaml "
                            "on disk is not the configuration served"},
        "state_store": {"type": ["string", "null"], "description": "why onboarding stopped: "
                        "the state store's file was deleted or replaced while the proxy runs"},
        "mixed_suites": {"type": ["object", "null"], "additionalProperties": _NAMES,
                         "description": "the models with a profile, by aptitude suite, when "
                         "there are several"},
        "checked_at": {"type": "integer", "description": "Unix time of this answer"},
    },
}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _errors(*codes: str) -> dict[str, Any]:
    return {c: {"description": _ERROR_CODES[c], "content": _json({"$ref": REF.format(
        model="Error")})} for c in codes}


def _detailed(router_name: str) -> dict[tuple[str, str], dict[str, Any]]:
    headers = {name: {"description": text, "schema": {"type": "string"}}
               for name, text in _ROUTING_HEADERS.items()}
    # a chat completion request: what /v1/chat/completions serves and /admin/route previews
    chat_request = {"required": True, "content": _json({"$ref": REF.format(model="ChatCompletionRequest")})}
    return {
        ("/v1/chat/completions", "post"): {
            "summary": "Create a chat completion, routed by Model-SAT when model is "
                       f"'{router_name}'",
            "description": "OpenAI's chat completions API. Every field the proxy does not read "
                           "is passed to the upstream untouched. With `stream: true` the answer "
                           "is server-sent events ending with `data: [DONE]`.",
            "requestBody": chat_request,
            "responses": {
                "200": {"description": "the upstream's completion (JSON), or its chunks (SSE)",
                        "headers": headers,
                        "content": {"application/json": {"schema": {"type": "object"}},
                                    "text/event-stream": {"schema": {"type": "string"}}}},
                **_errors("400", "401", "403", "404", "408", "413", "415", "429", "431", "4XX",
                          "502", "503", "504")},
        },
        ("/admin/route", "post"): {
            "summary": "Where a chat completion request would go, without calling any model",
            "description": "The same decision a real request gets (the scorer, the profiles' means "
                           "when it fails, the default model, or the model named), counted as "
                           "no request or routing decision (its scoring call is in the scorer's "
                           "latency histogram) and with no routing log written.",
            "requestBody": chat_request,
            "responses": {
                "200": {"description": "{chosen, route, degraded, ranked: [{model, score}], tries, "
                                       "scorer_ms, instruction}",
                        "content": _json({"type": "object"})},
                **_errors("400", "401", "404", "413", "503")},
        },
        ("/v1/models", "get"): {
            "summary": "The router's name and every configured model that is available",
            "responses": {"200": {"description": "OpenAI's model list", "content": _json(
                {"$ref": REF.format(model="ModelList")})}, **_errors("401")},
        },
        ("/v1/models/{model_id}", "get"): {
            "summary": "One model card (the router's name or an available configured model)",
            "responses": {"200": {"description": "OpenAI's model object", "content": _json(
                {"$ref": REF.format(model="ModelCard")})}, **_errors("401", "404", "503")},
        },
        ("/health", "get"): {"summary": "The process is alive", "security": [],
                             "responses": {"200": {"description": "ok"}}},
        ("/ready", "get"): {
            "summary": "Ready to route: not stopping, the scorer loaded (or a default model to "
                       "answer meanwhile), and at least one model reachable", "security": [],
            "responses": {"200": {"description": "ready", "content": _json(_READY)},
                          "503": {"description": "not ready; `reasons` says why", "content": _json(_READY)}}},
        ("/metrics", "get"): {
            "summary": "Prometheus metrics (text exposition format)",
            "responses": {"200": {"description": "metrics", "content": {
                "text/plain": {"schema": {"type": "string"}}}}, **_errors("401")}},
        ("/admin/routes", "get"): {
            "summary": "The routing log: the most recent requests to the router's name, newest "
                       "first",
            "parameters": [{"name": "limit", "in": "query", "required": False,
                            "description": "how many entries (default 100)",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 1000}}],
            "responses": {
                "200": {"description": "{object: list, data: [{at, requested, chosen, scores, "
                                       "scorer_ms, failed, request_id, degraded}]}",
                        "content": _json({"type": "object"})},
                "400": {"description": "limit is not an integer from 1 to 1000",
                        "content": _json({"$ref": REF.format(model="Error")})},
                **_errors("401")}},
        ("/openapi.json", "get"): {
            "summary": "This document",
            "responses": {"200": {"description": "OpenAPI 3.1", "content": _json(
                {"type": "object"})}}},
    }


def _components() -> dict[str, Any]:
    schemas: dict[str, Any] = {"Error": _ERROR}
    for model in (protocol.ChatCompletionRequest, protocol.ModelList, protocol.ModelCard):
        schema = model.model_json_schema(ref_template=REF)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return schemas


def _walk(routes: Iterable[BaseRoute], prefix: str = ""):
    """(OpenAPI path, route): Starlette's ``{name:converter}`` becomes ``{name}``."""
    for route in routes:
        if isinstance(route, Mount):
            yield from _walk(route.routes, prefix + route.path)
        elif isinstance(route, Route) and route.include_in_schema:
            yield _PARAM.sub(r"{\1}", prefix + route.path), route


def _parameters(path: str) -> list[dict[str, Any]]:
    return [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in re.findall(r"{(\w+)}", path)]


def build_document(routes: Iterable[BaseRoute], *, router_name: str = "auto",
                   public_paths: Iterable[str] = PUBLIC_PATHS,
                   title: str = "satroute", version: str = __version__) -> dict[str, Any]:
    detailed = _detailed(router_name)
    public = set(public_paths)
    paths: dict[str, dict[str, Any]] = {}
    for path, route in _walk(routes):
        methods = sorted(m.lower() for m in (route.methods or {"GET"}) if m != "HEAD")
        for method in methods:
            op = detailed.get((path, method))
            if op is None:
                doc = inspect.getdoc(route.endpoint) or f"{method.upper()} {path}"
                op = {"summary": doc.splitlines()[0],
                      "responses": {"200": {"description": "success"}, **_errors("401")}}
            slug = re.sub(r"[^A-Za-z0-9_]", "", path.strip("/").replace("/", "_")) or "root"
            op = {"operationId": f"{method}_{slug}", **op}
            if _parameters(path):
                op["parameters"] = _parameters(path)
            if path in public:
                op["security"] = []
            paths.setdefault(path, {})[method] = op
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": title, "version": version,
                 "description": "OpenAI-compatible LLM routing proxy driven by Model-SAT."},
        "paths": paths,
        "components": {"schemas": _components(), "securitySchemes": {
            "masterKey": {"type": "http", "scheme": "bearer",
                          "description": "SATROUTE_MASTER_KEY, when one is set"}}},
        "security": [{"masterKey": []}],
    }


async def openapi_endpoint(request: Request) -> Response:
    """``GET /openapi.json``: the description of this app's endpoints."""
    services = getattr(request.app.state, "services", None)
    router = services.registry.snapshot.router.router_name if services is not None else "auto"
    doc = build_document(request.app.routes, router_name=router)
    return Response(orjson.dumps(doc), media_type="application/json")
