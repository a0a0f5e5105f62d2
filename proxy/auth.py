"""Master-key authentication for every route except the public probes, and what stands in for it
against web pages while no key is set.

Owns: the rule "with a master key set, every request outside PUBLIC_PATHS needs
``Authorization: Bearer <key>``", checked in constant time, answered with 401 in OpenAI's shape;
without a key, the refusal (403) of requests a web page makes: an ``Origin`` the admin did not
list, or (listening on loopback) a ``Host`` that is not a loopback name, which is how a page
reaches a local server through DNS rebinding. A pure ASGI middleware, so routes added later
(admin, onboarding) are covered without opting in.
Does not know: what the routes do, where the key came from.
"""
from __future__ import annotations

import hmac
import ipaddress
from typing import Sequence
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from proxy.errors import AuthError, PermissionDenied, error_response

PUBLIC_PATHS = frozenset({"/health", "/ready"})
# origins a keyless proxy answers besides the listed ones: pages served from this machine, and
# desktop apps and editors (Electron, Tauri, VS Code webviews), which are not web pages
APP_SCHEMES = frozenset({"app", "file", "tauri", "vscode-webview"})


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) only listens where other machines cannot reach:
    a loopback address, ``localhost`` or a name under it (``tauri.localhost``: RFC 6761 keeps
    them on loopback, and browsers resolve them there themselves, so DNS cannot rebind them)."""
    host = host.lower().rstrip(".")
    if host in ("localhost", "ip6-localhost") or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name (it may resolve anywhere); 0.0.0.0 and :: parse, as not loopback


def _host_of(authority: str) -> str:
    """The host of a ``Host`` header's value (``name:port``, ``[v6]:port``), lower-cased."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        return authority[1:authority.find("]")] if "]" in authority else authority
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


class MasterKeyAuth:
    def __init__(self, app: ASGIApp, master_key: str | None, origins: Sequence[str] = (),
                 loopback: bool = False):
        """``origins``: SATROUTE_CORS_ORIGINS (``*``: any); ``loopback``: the server listens on
        loopback only, so without a key a request naming another host is refused."""
        self.app = app
        self._key = master_key.encode() if master_key else None
        self._origins = frozenset(origins)
        self._loopback = loopback

    def _keyless_refusal(self, scope: Scope) -> str | None:
        """Why a request is refused while no master key is set (None: it is not): a browser sends
        a simple cross-site POST (a text/plain body, no preflight) from any page, and the proxy
        would spend the providers' keys for it; with a rebound DNS name, the page even reads the
        answers and /admin. Clients that are not browsers send no Origin."""
        origin = host = None
        for name, value in scope["headers"]:
            if name == b"origin":
                origin = value.decode("latin-1").strip()
            elif name == b"host":
                host = value.decode("latin-1")
        if self._loopback and host is not None and not is_loopback(_host_of(host)):
            return (f"requests for the host {_host_of(host)!r} are refused: the proxy listens on "
                    "loopback without SATROUTE_MASTER_KEY (a web page can rename a local address "
                    "to reach it); use localhost or 127.0.0.1, or set a master key")
        if origin is None or "*" in self._origins or origin.rstrip("/") in self._origins:
            return None
        parts = urlsplit(origin)
        if parts.scheme in APP_SCHEMES or (parts.scheme in ("http", "https")
                                           and is_loopback(parts.hostname or "")):
            return None
        return (f"requests from web pages ({origin[:100]}) are refused while no "
                "SATROUTE_MASTER_KEY is set: any site could spend the providers' keys; set a "
                "master key, or list the origin in SATROUTE_CORS_ORIGINS")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        if self._key is None:
            why = self._keyless_refusal(scope)
            if why is not None:
                await error_response(PermissionDenied(why))(scope, receive, send)
                return
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
