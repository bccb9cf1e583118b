"""The relay's per-api_key limiters: one count per key, resumed from the store after a restart."""

from __future__ import annotations

from datetime import UTC, datetime

from relay.app import _limiter
from relay.config import from_mapping
from relay.store import Store
from relay.store.coordination import LocalCoordinator

DAY = datetime.now(UTC).date().isoformat()
SETTINGS = from_mapping(
    {
        "accounts": [
            {
                "name": name,
                "base_url": "https://api.example.com",
                "api_key": "APPKEY-one-for-both",
                "access_token": f"token-{name}",
            }
            for name in ("shop-a", "shop-b")
        ]
    }
)


async def test_counts_stored_per_account_carry_over_once_into_the_keys_count(
    store: Store,
) -> None:
    """Today's counts an older version stored per account name start the key's count after the
    upgrade (a restart must not overspend); a later restart resumes the key's count alone."""
    account = SETTINGS.accounts[0]
    budget = account.budget_id
    await store.spend_quota("shop-a", DAY, 300)
    await store.spend_quota("shop-b", DAY, 200)
    members = SETTINGS.budget_groups()[budget]
    coordinator = LocalCoordinator(store, "test")
    limiter = await _limiter(account, members, store, DAY, coordinator)
    assert limiter.used_today == 500
    assert await store.quota_used(budget, DAY) == 500
    await limiter.acquire()
    assert await store.quota_used(budget, DAY) == 501
    restarted = await _limiter(account, members, store, DAY, coordinator)
    assert restarted.used_today == 501
    assert await store.quota_used(budget, DAY) == 501
