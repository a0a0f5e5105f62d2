"""/openapi.json describes exactly the routes the app serves, with resolvable schemas."""
from __future__ import annotations

from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from proxy.openapi import build_document, openapi_endpoint


async def _ok(request):
    return Response(b"{}")


async def admin_thing(request):
    """List the onboarding jobs.

    More text that is not the summary.
    """
    return Response(b"{}")


def _app() -> Starlette:
    return Starlette(routes=[
        Route("/v1/chat/completions", _ok, methods=["POST"]),
        Route("/v1/models", _ok, methods=["GET"]),
        Route("/health", _ok, methods=["GET"]),
        Route("/ready", _ok, methods=["GET"]),
        Route("/metrics", _ok, methods=["GET"]),
        Route("/admin/onboarding", admin_thing, methods=["GET"]),
        Route("/admin/models/{name:path}/profile", _ok, methods=["GET"]),
        Route("/openapi.json", openapi_endpoint, methods=["GET"]),
        Route("/models", _ok, methods=["GET"], include_in_schema=False),  # an alias, not described
    ])


def _refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def test_every_served_route_is_described_and_nothing_else():
    app = _app()
    with TestClient(app) as client:
        response = client.get("/openapi.json")
    assert response.status_code == 200
    doc = response.json()
    assert doc["openapi"].startswith("3.1")
    described = {(p, m) for p, ops in doc["paths"].items() for m in ops}
    served = {(r.path.replace(":path", ""), m.lower()) for r in app.routes for m in r.methods
              if m != "HEAD" and r.include_in_schema}
    assert described == served and "/models" not in doc["paths"]
    profile = doc["paths"]["/admin/models/{name}/profile"]["get"]
    assert profile["parameters"] == [{"name": "name", "in": "path", "required": True,
                                      "schema": {"type": "string"}}]
    assert doc["paths"]["/admin/onboarding"]["get"]["summary"] == "List the onboarding jobs."


def test_schemas_resolve_and_public_probes_need_no_key():
    doc = build_document(_app().routes, router_name="auto")
    schemas = doc["components"]["schemas"]
    for ref in _refs(doc):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    request = schemas["ChatCompletionRequest"]
    assert {"model", "messages"} <= set(request["required"])
    assert "satroute" in request["properties"]  # our allow-list extension is documented
    assert "x-satroute-model" in chat["responses"]["200"]["headers"]
    assert {"400", "401", "404", "413", "502", "503"} <= set(chat["responses"])
    assert doc["paths"]["/health"]["get"]["security"] == []
    assert doc["paths"]["/ready"]["get"]["security"] == []
    assert "security" not in doc["paths"]["/v1/models"]["get"]
    assert doc["security"] == [{"masterKey": []}]
    ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))
