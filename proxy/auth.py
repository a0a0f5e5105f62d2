"""Master-key authentication for every route except the public probes.

Owns: the rule "with a master key set, every request outside PUBLIC_PATHS needs
``Authorization: Bearer <key>``", checked in constant time, answered with 401 in OpenAI's shape.
A pure ASGI middleware, so routes added later (admin, onboarding) are covered without opting in.
Does not know: what the routes do, where the key came from.
"""
from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from proxy.errors import AuthError, error_response

PUBLIC_PATHS = frozenset({"/health", "/ready"})


class MasterKeyAuth:
    def __init__(self, app: ASGIApp, master_key: str | None):
        self.app = app
        self._key = master_key.encode() if master_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._key is None or scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                given = value
                break
        # the scheme is case-insensitive (RFC 9110) and may be followed by more than one space
        scheme, _, token = given.strip().partition(b" ")
        if not (scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)):
            reason = "missing Authorization header" if not given else "invalid API key"
            response = error_response(AuthError(f"{reason}: send 'Authorization: Bearer <key>'"),
                                      headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
