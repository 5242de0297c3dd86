"""Open access (no API keys) is for one developer's own machine; this keeps it there.

Without keys any request is served as organization `local`, so the app itself, however it
was started (`make serve`, uvicorn with any `--host`, behind a proxy), refuses what could
come from elsewhere:
- a client that is not on loopback (fail closed: bind to 0.0.0.0 and nothing is served);
- a `Host` that is not this machine's name: a web page that rebinds its own DNS name to
  127.0.0.1 sends its name as Host (DNS rebinding);
- an `Origin` that is not this machine's: a page the developer opens may post forms or
  fetch requests to 127.0.0.1, but its browser says where the page came from (CSRF);
- a request that came through a proxy (`Forwarded`, `X-Forwarded-*`, `X-Real-IP`, `Via`):
  a reverse proxy on this machine makes every remote client look local (nginx's defaults
  send a loopback Host and no X-Forwarded-For), so a server behind one needs API keys.
With API keys none of this applies (a page has no key), except that `FTAAS_ALLOWED_HOSTS`,
when set, is enforced in every mode. Answers are 403 in OpenAI's envelope. Whether keys
exist is asked per request (one is made with `python -m service keys create` while the
server runs); until the app's key ring is there, the guard holds.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any
from urllib.parse import urlsplit

from service.config import Settings
from service.errors import envelope

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
# Headers a proxy adds (RFC 7239 and the common de-facto ones).
PROXY_HEADERS = ("forwarded", "via", "x-real-ip")


def is_loopback(host: str) -> bool:
    """`localhost` or a loopback address (what a server may bind to, a client come from)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_loopback_name(host: str) -> bool:
    """A Host a browser on this machine may send: also `*.localhost`, which browsers
    resolve to loopback themselves (RFC 6761), so no page can rebind it."""
    return is_loopback(host) or host.lower().endswith(".localhost")


def host_name(value: str) -> str:
    """`Host` or an origin's host without its port (IPv6 brackets removed)."""
    return (urlsplit(f"//{value}").hostname or "").lower()


class LocalGuard:
    def __init__(self, app: Any, settings: Settings):
        self.app, self.settings = app, settings
        self.allowed = {h.strip().lower() for h in settings.allowed_hosts.split(",") if h.strip()}

    def _allowed_host(self, name: str) -> bool:
        if self.allowed:
            return name in self.allowed
        return is_loopback_name(name)

    @staticmethod
    def _open_access(scope: dict[str, Any]) -> bool:
        keys = getattr(getattr(scope.get("app"), "state", None), "keys", None)
        return keys is None or bool(keys.open_access())  # fail closed before start-up

    def refusal(self, scope: dict[str, Any]) -> str | None:
        headers = {key.decode("latin-1").lower(): value for key, value in scope["headers"]}
        host = host_name(headers.get("host", b"").decode("latin-1"))
        open_access = self._open_access(scope)
        if (open_access or self.allowed) and not self._allowed_host(host):
            return f"Host {host!r} is not one this server answers to"
        if not open_access:
            return None
        client = (scope.get("client") or ("", 0))[0]
        proxied = sorted(h for h in headers if h in PROXY_HEADERS or h.startswith("x-forwarded-"))
        if not is_loopback(client) or proxied:
            return (
                "Without API keys this server answers only its own machine: make one "
                "(`python -m service keys create`) or set FTAAS_API_KEYS to serve others"
            )
        origin = headers.get("origin")
        if origin is not None:
            origin_host = urlsplit(origin.decode("latin-1")).hostname or ""
            if not self._allowed_host(origin_host.lower()):
                return f"Requests from web pages of {origin_host or 'another origin'} are refused"
        return None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        reason = self.refusal(scope)
        if reason is None:
            return await self.app(scope, receive, send)
        body = json.dumps(envelope(reason, "invalid_request_error", None, "forbidden")).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})
