"""Webhooks declared in the config file: idempotent upsert by URL, secrets, enabled state."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from relay.api import DeclaredWebhook, WebhookError, upsert_declared
from relay.api.service import DISABLED_BY_CONFIG
from relay.events import WILDCARD
from relay.sinks import signing
from relay.sinks.ssrf import Guard
from relay.store import Store, Webhook, open_store
from tests.api.conftest import PUBLIC_URL, T0

CLICK = "com.constantcontact.email.click"
OTHER_URL = "https://93.184.216.35/other"


async def test_upsert_creates_then_is_idempotent(store: Store) -> None:
    """The first upsert creates; repeating it changes nothing, not even updated_ms."""
    declared = [
        DeclaredWebhook(PUBLIC_URL, (CLICK,), description="crm"),
        DeclaredWebhook(OTHER_URL, (WILDCARD,), rate_limit_per_s=3.0),
    ]
    first = await upsert_declared(store, Guard(), declared, T0)
    assert [w.url for w in first] == [PUBLIC_URL, OTHER_URL]
    assert first[0].id.startswith("wh_")
    signing.secret_key(first[0].secret)
    again = await upsert_declared(store, Guard(), declared, T0 + 60_000)
    assert again == first
    # the store orders by creation time, then id: same-millisecond ids come in any order
    assert sorted(await store.webhooks(), key=lambda w: w.id) == sorted(first, key=lambda w: w.id)


async def test_upsert_updates_fields_matched_by_url(store: Store) -> None:
    """A changed declaration updates the stored webhook in place (same id, same secret)."""
    (created,) = await upsert_declared(store, Guard(), [DeclaredWebhook(PUBLIC_URL, (CLICK,))], T0)
    changed = DeclaredWebhook(PUBLIC_URL, (WILDCARD,), description="all", rate_limit_per_s=1.5)
    (updated,) = await upsert_declared(store, Guard(), [changed], T0 + 1000)
    assert updated.id == created.id
    assert updated.secret == created.secret
    assert updated.event_types == (WILDCARD,)
    assert updated.description == "all"
    assert updated.rate_limit_per_s == 1.5
    assert updated.updated_ms == T0 + 1000
    assert await store.webhook(created.id) == updated


async def test_declared_secret_replaces_only_when_different(store: Store) -> None:
    """A declared secret is used at creation and replaces the stored one only if it changed: as
    a rotation, the stored one signing too for the grace period (receivers that switched to
    it, e.g. after an earlier rotation, keep verifying)."""
    secret, other = signing.generate_secret(), signing.generate_secret()
    (created,) = await upsert_declared(
        store, Guard(), [DeclaredWebhook(PUBLIC_URL, (CLICK,), secret=secret)], T0
    )
    assert created.secret == secret
    (same,) = await upsert_declared(
        store, Guard(), [DeclaredWebhook(PUBLIC_URL, (CLICK,), secret=secret)], T0 + 1
    )
    assert same == created
    (kept,) = await upsert_declared(store, Guard(), [DeclaredWebhook(PUBLIC_URL, (CLICK,))], T0 + 2)
    assert kept.secret == secret  # no secret declared: keep the stored one
    (replaced,) = await upsert_declared(
        store, Guard(), [DeclaredWebhook(PUBLIC_URL, (CLICK,), secret=other)], T0 + 3
    )
    assert replaced.secret == other
    stored = await store.webhook(created.id)
    day_ms = 86_400_000  # admin.rotation_grace_s's default
    assert stored.secrets_in_use(T0 + 3) == [other, secret]
    assert stored.previous_expires_ms == T0 + 3 + day_ms
    assert stored.secrets_in_use(T0 + 3 + day_ms) == [other]
    # and for the grace configured
    (again,) = await upsert_declared(
        store, Guard(), [DeclaredWebhook(PUBLIC_URL, (CLICK,), secret=secret)], T0 + 4, grace_s=60
    )
    assert (again.previous_secret, again.previous_expires_ms) == (other, T0 + 4 + 60_000)


async def test_config_disable_and_reenable(store: Store) -> None:
    """enabled: false in the config disables; flipping it back re-enables what it disabled."""
    (hook,) = await upsert_declared(store, Guard(), [DeclaredWebhook(PUBLIC_URL, (CLICK,))], T0)
    (off,) = await upsert_declared(
        store, Guard(), [DeclaredWebhook(PUBLIC_URL, (CLICK,), enabled=False)], T0 + 1
    )
    assert (off.enabled, off.disabled_reason) == (False, DISABLED_BY_CONFIG)
    (on,) = await upsert_declared(store, Guard(), [DeclaredWebhook(PUBLIC_URL, (CLICK,))], T0 + 2)
    assert (on.id, on.enabled, on.disabled_reason) == (hook.id, True, None)


async def test_restart_does_not_undo_an_automatic_disable(store: Store) -> None:
    """A webhook the dispatcher disabled stays disabled across restarts until an operator acts."""
    (hook,) = await upsert_declared(store, Guard(), [DeclaredWebhook(PUBLIC_URL, (CLICK,))], T0)
    await store.disable_webhook(hook.id, "410 Gone", T0 + 1)
    (after,) = await upsert_declared(
        store, Guard(), [DeclaredWebhook(PUBLIC_URL, (CLICK,))], T0 + 2
    )
    assert (after.enabled, after.disabled_reason) == (False, "410 Gone")


async def test_undeclared_webhooks_are_left_alone(store: Store) -> None:
    """Webhooks not in the declaration (e.g. registered through the API) are not touched."""
    (api_hook,) = await upsert_declared(store, Guard(), [DeclaredWebhook(OTHER_URL, (CLICK,))], T0)
    await upsert_declared(store, Guard(), [DeclaredWebhook(PUBLIC_URL, (CLICK,))], T0)
    assert api_hook in await store.webhooks()


@pytest.mark.parametrize(
    ("declared", "prefix"),
    [
        pytest.param(
            [DeclaredWebhook(PUBLIC_URL, (CLICK,)), DeclaredWebhook("http://10.0.0.1/", (CLICK,))],
            "webhooks[1].url: ",
            id="ssrf",
        ),
        pytest.param(
            [DeclaredWebhook(PUBLIC_URL, ("com.constantcontact.email.view",))],
            "webhooks[0].event_types[0]: unknown event type",
            id="type",
        ),
        pytest.param(
            [DeclaredWebhook(PUBLIC_URL, (CLICK,), secret="nope")],
            "webhooks[0].secret: must start with whsec_",
            id="secret",
        ),
        pytest.param(
            [DeclaredWebhook(PUBLIC_URL, (CLICK,), rate_limit_per_s=0.0)],
            "webhooks[0].rate_limit_per_s: ",
            id="rate",
        ),
        pytest.param(
            [DeclaredWebhook(PUBLIC_URL, (CLICK,)), DeclaredWebhook(PUBLIC_URL, (WILDCARD,))],
            "webhooks[1].url: ",
            id="twice",
        ),
    ],
)
async def test_invalid_declarations_write_nothing(
    store: Store, declared: list[DeclaredWebhook], prefix: str
) -> None:
    """A bad entry is refused naming it, before anything is written."""
    with pytest.raises(WebhookError) as caught:
        await upsert_declared(store, Guard(), declared, T0)
    assert str(caught.value).startswith(prefix), str(caught.value)
    assert await store.webhooks() == []


async def test_errors_name_the_config_key_of_the_list(store: Store) -> None:
    """The relay passes the config key of its declared list, so errors name the key to fix."""
    bad = [DeclaredWebhook(PUBLIC_URL, (CLICK,), secret="nope")]
    with pytest.raises(WebhookError, match=r"^webhooks\.declared\[0\]\.secret: must start"):
        await upsert_declared(store, Guard(), bad, T0, "webhooks.declared")


async def test_a_declared_webhook_beyond_max_webhooks_is_named(store: Store) -> None:
    """Declared webhooks count against max_webhooks with those registered through the API: a
    new one beyond it is an error naming its entry and the limit; the ones before it stay, and
    one already stored is updated whatever the count."""
    declared = [DeclaredWebhook(f"https://93.184.216.{n}/hook", (CLICK,)) for n in range(30, 33)]
    with pytest.raises(WebhookError) as caught:
        await upsert_declared(store, Guard(), declared, T0, "webhooks.declared", 2)
    assert str(caught.value) == (
        "webhooks.declared[2].url: not registered: webhooks: 2 are registered, the most allowed"
        " (webhooks.max_webhooks); delete one or raise the limit"
    )
    assert len(await store.webhooks()) == 2
    again = await upsert_declared(store, Guard(), declared[:2], T0, "webhooks.declared", 2)
    assert len(again) == 2


async def test_a_url_declared_twice_is_named_without_its_password(store: Store) -> None:
    url = "https://ops:hunter2@93.184.216.34/hook"
    twice = [DeclaredWebhook(url, (CLICK,)), DeclaredWebhook(url, (WILDCARD,))]
    with pytest.raises(WebhookError) as caught:
        await upsert_declared(store, Guard(), twice, T0)
    assert "hunter2" not in str(caught.value)
    assert "ops:***@93.184.216.34" in str(caught.value)


async def test_declared_urls_are_matched_normalised(store: Store) -> None:
    """A declared URL is stored normalised (scheme and host case, default port) and matched so:
    another spelling of it next start updates the same webhook, and a row stored unnormalised
    by an older relay is matched too, not registered again."""
    (created,) = await upsert_declared(
        store, Guard(), [DeclaredWebhook("HTTPS://93.184.216.34:443/Hook?A=B", (CLICK,))], T0
    )
    assert created.url == "https://93.184.216.34/Hook?A=B"
    (again,) = await upsert_declared(
        store, Guard(), [DeclaredWebhook("https://93.184.216.34/Hook?A=B", (WILDCARD,))], T0 + 1
    )
    assert again.id == created.id
    assert again.event_types == (WILDCARD,)
    legacy = await store.create_webhook(
        Webhook(id="wh_legacy", url="HTTPS://93.184.216.35:443/h", event_types=(CLICK,), secret="s")
    )
    (matched,) = await upsert_declared(
        store, Guard(), [DeclaredWebhook("https://93.184.216.35/h", (CLICK,), description="x")], T0
    )
    assert (matched.id, matched.url, matched.description) == (legacy.id, legacy.url, "x")
    assert len(await store.webhooks()) == 2


async def test_one_url_declared_in_two_spellings_is_declared_twice(store: Store) -> None:
    """Two declarations that normalise to one URL are refused like the same URL twice."""
    twice = [
        DeclaredWebhook("https://93.184.216.34/hook", (CLICK,)),
        DeclaredWebhook("https://93.184.216.34:443/hook", (WILDCARD,)),
    ]
    with pytest.raises(WebhookError, match=r"^webhooks\[1\]\.url: .* is declared twice"):
        await upsert_declared(store, Guard(), twice, T0)
    assert await store.webhooks() == []


def test_declared_repr_hides_the_secret() -> None:
    """A declared secret never shows in a repr."""
    secret = signing.generate_secret()
    assert secret not in repr(DeclaredWebhook(PUBLIC_URL, (CLICK,), secret=secret))


async def test_upsert_racing_another_replica_updates_its_webhook(tmp_path: Path) -> None:
    """Two replicas start together on one database and both declare a URL: both read an empty
    list, one creates the webhook, the other hits the unique URL and updates that webhook
    instead of failing start-up."""
    stores = [open_store(f"sqlite:///{tmp_path / 'shared.db'}") for _ in range(2)]
    for opened in stores:
        await opened.open()
    try:
        declared = [DeclaredWebhook(PUBLIC_URL, (CLICK,), description="crm")]
        results = await asyncio.gather(
            *(upsert_declared(opened, Guard(), declared, T0) for opened in stores)
        )
        ids = {hook.id for (hook,) in results}
        assert len(ids) == 1
        assert [w.id for w in await stores[0].webhooks()] == list(ids)
    finally:
        for opened in stores:
            await opened.close()
