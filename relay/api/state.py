"""What the admin application holds: its settings and the typed keys of its shared objects.

Handlers find the store, the SSRF guard, the clock and the settings through these ``web.AppKey``s;
they live apart from :mod:`relay.api.app` so route modules can use them without a circular import.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from aiohttp import web

from relay.api.responses import JsonObject
from relay.sinks.ssrf import Guard
from relay.store import Store


@dataclass(frozen=True)
class AdminSettings:
    """Where the admin API listens and how it is protected."""

    host: str = "127.0.0.1"
    port: int = 8081
    token: str | None = field(default=None, repr=False)  # bearer token; required off loopback
    rotation_grace_s: float = 86400.0  # how long a rotated-out secret keeps signing
    metrics_public: bool = True  # /metrics without the token, as Prometheus scrapers expect
    # webhooks registered at most (config: webhooks.max_webhooks): each has its own worker, and
    # fan-out writes a delivery per webhook per event
    max_webhooks: int = 100


StatusFn = Callable[[], Awaitable[JsonObject]]

STORE = web.AppKey[Store]("relay.store")
SETTINGS = web.AppKey("relay.admin_settings", AdminSettings)
GUARD = web.AppKey("relay.guard", Guard)
NOW_MS = web.AppKey[Callable[[], int]]("relay.now_ms")
# normalised URL -> config key, of the declared webhooks whose secret the config file sets
DECLARED_SECRETS = web.AppKey[Mapping[str, str]]("relay.declared_secrets")
