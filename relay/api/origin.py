"""Who may call a tokenless admin API: this machine's own clients, not a web page.

Without ``admin.token`` the API listens on loopback only (:func:`relay.api.app.check_exposure`),
but a browser on this machine still reaches it: any web page can send it a "simple" cross-site
``POST`` (no CORS preflight), and a page on a name the attacker re-points at 127.0.0.1 (DNS
rebinding) can even read the answers. :func:`local_only` refuses both with a 403, so a tokenless
API answers only requests that

- name it by a loopback address or ``localhost`` in ``Host`` (a rebound name is refused), and
- carry no ``Origin`` other than the API's own, and no ``Sec-Fetch-Site`` of ``cross-site`` or
  ``same-site`` (what browsers send for another site's requests).

Command-line clients (``ctct-relay``, curl) send none of these headers and pass. With a token,
browsers cannot send it unasked, so none of this applies.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from relay.api.responses import ApiError

_DEFAULT_PORTS = {"http": 80, "https": 443}
_CROSS = frozenset({"cross-site", "same-site"})
_SHOWN_CHARS = 100


def local_only() -> Middleware:
    """The middleware of an API without a token (see the module docstring)."""

    @web.middleware
    async def local_callers(request: web.Request, handler: Handler) -> web.StreamResponse:
        check_local(request.headers, request.scheme)
        return await handler(request)

    return local_callers


def check_local(headers: Mapping[str, str], scheme: str = "http") -> None:
    """Raise a 403 ApiError unless a request with these headers is one :func:`local_only` lets
    through."""
    host = headers.get("Host")
    name_port = _host_port(host or "", scheme)
    if name_port is None or not _loopback_name(name_port[0]):
        raise ApiError(
            403,
            f"Host: {_shown(host or '')!r} is not a loopback address or localhost; without"
            " admin.token the admin API answers only requests addressed to 127.0.0.1, [::1] or"
            " localhost (set admin.token to reach it by another name)",
        )
    site = headers.get("Sec-Fetch-Site", "").strip().lower()
    if site in _CROSS:
        raise ApiError(
            403,
            f"Sec-Fetch-Site: {site}: without admin.token the admin API refuses requests"
            " made by another site's web page",
        )
    origin = headers.get("Origin")
    if origin is not None and _origin_port(origin) != name_port:
        raise ApiError(
            403,
            f"Origin: {_shown(origin)!r} is not this API's own; without admin.token the admin"
            " API refuses requests made by another site's web page",
        )


def _host_port(value: str, scheme: str) -> tuple[str, int] | None:
    """``Host``'s name (lower case, IPv6 without brackets) and port; None when malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket:
            return None
    else:
        name, _, port_text = value.partition(":")
        rest = f":{port_text}" if ":" in value else ""
    digits = rest[1:]
    if rest and (not rest.startswith(":") or not digits.isascii() or not digits.isdigit()):
        return None
    # a port has at most 5 digits: a longer run is malformed (one of over 4300 digits made
    # int() raise, a 500 with a logged traceback for any client that can connect)
    if len(digits) > 5 or (digits and int(digits) > 65535):
        return None
    port = int(digits) if digits else _DEFAULT_PORTS.get(scheme, 80)
    return (name, port) if name else None


def _loopback_name(name: str) -> bool:
    if name == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _origin_port(origin: str) -> tuple[str, int] | None:
    """An ``Origin``'s host and port, as :func:`_host_port` gives them; None for ``null`` or
    anything that is not an http(s) origin."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    return parts.hostname, port if port is not None else _DEFAULT_PORTS[parts.scheme]


def _shown(text: str) -> str:
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "…"
