"""Who may talk to the server: ASGI middleware run before any handler.

``Guard`` stops what a web page in the user's browser could do to a server on localhost:
- the ``Host`` header must name this server: an IP address, ``localhost``, the address it is bound to, or a
  name in ``allowed_hosts`` (``*``: any). A DNS-rebinding page reaches 127.0.0.1 under its own domain name,
  which is refused (403).
- a request carrying an ``Origin`` header (browsers send one with every cross-site and every POST request) is
  refused (403) unless that origin is in ``cors_origins`` (``*``: any); those origins get CORS answers
  (``cors_middleware``), no others do.
- a POST must say ``Content-Type: application/json`` (415): an HTML form or a "simple" cross-site request
  cannot, so it cannot reach the handlers without the CORS preflight the server does not answer.

``ApiKey`` asks every request for ``Authorization: Bearer KEY``, KEY one of the server's keys (401).
"""

from __future__ import annotations

import hmac
import ipaddress

from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from .errors import error_response

LOCAL_NAMES = ("localhost",)


def _host_name(header: str) -> str:
    """The host part of a Host header ("[::1]:8080" -> "::1", "Example.com.:80" -> "example.com")."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1 : h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0].rstrip(".") if h.count(":") == 1 else h.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class Guard:
    """ASGI middleware: the Host, Origin and Content-Type checks of the module docstring."""

    def __init__(self, app, *, bound_host: str, allowed_hosts: tuple[str, ...] = (), cors_origins: tuple[str, ...] = ()):
        self.app = app
        self.any_host = "*" in allowed_hosts
        self.hosts = {_host_name(h) for h in (*LOCAL_NAMES, bound_host, *allowed_hosts) if h and h != "*"}
        self.any_origin = "*" in cors_origins
        self.origins = {o.rstrip("/").lower() for o in cors_origins if o != "*"}

    def _refusal(self, scope) -> tuple[int, str, str] | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = _host_name(headers.get("host", ""))
        if not (self.any_host or host in self.hosts or _is_ip(host)):
            return 403, "this server does not answer for that host name (start it with --allowed-hosts NAME to add one)", "host_not_allowed"
        origin = headers.get("origin")
        if origin is not None and not (self.any_origin or origin.rstrip("/").lower() in self.origins):
            return 403, "requests from web pages are refused (start the server with --cors-origin ORIGIN to allow a page's origin)", "origin_not_allowed"
        if scope["method"] == "POST":
            media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media != "application/json":
                return 415, "send the request body as JSON with 'Content-Type: application/json'", "unsupported_media_type"
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            refused = self._refusal(scope)
            if refused:
                status, message, code = refused
                await error_response(scope["path"], status, message, code=code)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ApiKey:
    """ASGI middleware: every HTTP request must carry ``Authorization: Bearer KEY`` with one of ``keys`` (401
    otherwise)."""

    def __init__(self, app, keys: tuple[str, ...]):
        self.app = app
        self.keys = [k.encode() for k in keys]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            scheme, _, given = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
            given = given.strip()
            known = [hmac.compare_digest(given, k) for k in self.keys]  # every key compared: no early exit
            if scheme.lower() != b"bearer" or not any(known):
                response = error_response(scope["path"], 401, "a valid API key is required (Authorization: Bearer KEY)",
                                          code="invalid_api_key")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def middleware(*, bound_host: str, allowed_hosts: tuple[str, ...], cors_origins: tuple[str, ...],
               api_keys: tuple[str, ...]) -> list[Middleware]:
    """The access middleware, outermost first: Guard, CORS answers for ``cors_origins``, the API key."""
    out = [Middleware(Guard, bound_host=bound_host, allowed_hosts=allowed_hosts, cors_origins=cors_origins)]
    if cors_origins:
        out.append(Middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST", "HEAD"],
                              allow_headers=["Authorization", "Content-Type"]))
    if api_keys:
        out.append(Middleware(ApiKey, keys=api_keys))
    return out
