"""GET /v1/webhooks/{id}/secret: a webhook's current signing secret, e.g. a declared one's."""

from __future__ import annotations

from structlog.testing import capture_logs

from relay.api import AdminSettings, service
from relay.events import WILDCARD
from relay.sinks.ssrf import Guard
from relay.store import Store
from tests.api.conftest import AUTH, PUBLIC_URL, T0, TOKEN, ClientFactory, Clock, error_of
from tests.api.test_webhooks import ok


async def test_a_declared_webhooks_generated_secret_can_be_read(
    make_client: ClientFactory, clock: Clock, store: Store
) -> None:
    """GET /v1/webhooks/{id}/secret: the secret of a webhook declared without one (generated at
    start-up, never shown before), then during and after a rotation's grace; never logged."""
    client = await make_client(AdminSettings(token=TOKEN, rotation_grace_s=600))
    declared = service.DeclaredWebhook(PUBLIC_URL, (WILDCARD,))
    (hook,) = await service.upsert_declared(store, Guard(), [declared], T0)
    path = f"/v1/webhooks/{hook.id}/secret"
    with capture_logs() as logs:
        shown = await ok(await client.get(path, headers=AUTH))
    assert shown == {
        "webhook_id": hook.id,
        "secret": hook.secret,
        "previous_secret_expires_at": None,
    }
    assert [e["event"] for e in logs] == ["webhook.secret_read"]
    assert hook.secret not in repr(logs)
    rotated = await ok(await client.post(f"/v1/webhooks/{hook.id}/rotate-secret", headers=AUTH))
    during = await ok(await client.get(path, headers=AUTH))
    assert during["secret"] == rotated["secret"] != hook.secret
    assert during["previous_secret_expires_at"] == "2025-11-21T04:50:00.000Z"
    assert hook.secret not in repr(during)  # the previous secret is never shown
    clock.now = T0 + 600_000
    after = await ok(await client.get(path, headers=AUTH))
    assert after["previous_secret_expires_at"] is None
    await error_of(await client.get(path), 401)
    await error_of(await client.get(path + "?reveal=1", headers=AUTH), 400)
