"""The admin HTTP API (aiohttp.web): webhook registration, deliveries, health, OpenAPI document.

Modules: :mod:`~relay.api.app` (factory, auth, JSON errors, health), :mod:`~relay.api.webhooks`
(routes), :mod:`~relay.api.service` (registration rules, also for webhooks declared in the config
file), :mod:`~relay.api.body` (request checking), :mod:`~relay.api.views` (JSON shapes),
:mod:`~relay.api.openapi` (the document), :mod:`~relay.api.client` (the CLI's HTTP client);
for operating the relay, :mod:`~relay.api.streams` (status, streams, pauses, replay and target
routes), :mod:`~relay.api.status` (what status shows), :mod:`~relay.api.replay` (the replay
rules) and :mod:`~relay.api.ops_client` (``ctct-relay status|replay|pause|resume|targets``).
"""

from __future__ import annotations

from relay.api.app import AdminConfigError, admin_runner, check_exposure, create_admin_app
from relay.api.openapi import document as openapi_document
from relay.api.service import (
    DeclaredWebhook,
    WebhookChanges,
    WebhookError,
    declared_secrets,
    upsert_declared,
)
from relay.api.state import AdminSettings

__all__ = [
    "AdminConfigError",
    "AdminSettings",
    "DeclaredWebhook",
    "WebhookChanges",
    "WebhookError",
    "admin_runner",
    "check_exposure",
    "create_admin_app",
    "declared_secrets",
    "openapi_document",
    "upsert_declared",
]
