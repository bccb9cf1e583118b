"""The relay's per-api_key limiters: one count per key, resumed from the store after a restart."""

from __future__ import annotations

from datetime import UTC, datetime

from relay.api.status import AccountQuota, RelayView, status
from relay.app import _limiter
from relay.config import from_mapping
from relay.metrics import FANOUT_CURSOR, Metrics
from relay.store import PostgresStore, Store
from relay.store.coordination import LocalCoordinator, PgCoordinator

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
    salt = await store.budget_salt()
    budget = account.budget_name(salt)
    await store.spend_quota("shop-a", DAY, 300)
    await store.spend_quota("shop-b", DAY, 200)
    members = SETTINGS.budget_groups(salt)[budget]
    coordinator = LocalCoordinator(store, "test")
    limiter = await _limiter(account, budget, members, store, DAY, coordinator)
    assert limiter.name == budget  # its log lines name it so (quota.give_back_failed)
    assert limiter.used_today == 500
    assert await store.quota_used(budget, DAY) == 500
    await limiter.acquire()
    assert await store.quota_used(budget, DAY) == 501
    restarted = await _limiter(account, budget, members, store, DAY, coordinator)
    assert restarted.used_today == 501
    assert await store.quota_used(budget, DAY) == 501


async def test_the_count_under_the_unsalted_name_carries_over_once(any_store: Store) -> None:
    """The version before named a key's budget by an unsalted digest: today's count stored under
    it starts the salted budget's count after the upgrade (no lost daily count, on either
    backend), and the per-account counts it had carried already are not added again."""
    account = SETTINGS.accounts[0]
    salt = await any_store.budget_salt()
    budget = account.budget_name(salt)
    assert budget != account.legacy_budget_id
    await any_store.spend_quota("shop-a", DAY, 300)  # what the version before that counted
    await any_store.spend_quota(account.legacy_budget_id, DAY, 7300)  # 300 carried, then 7000
    coordinator = LocalCoordinator(any_store, "test")
    members = SETTINGS.budget_groups(salt)[budget]
    limiter = await _limiter(account, budget, members, any_store, DAY, coordinator)
    assert limiter.used_today == 7300
    await limiter.acquire()
    restarted = await _limiter(account, budget, members, any_store, DAY, coordinator)
    assert restarted.used_today == await any_store.quota_used(budget, DAY) == 7301


async def test_every_replica_shows_the_budgets_count_from_the_store(postgres_url: str) -> None:
    """Two replicas' limiters of one api_key on PostgreSQL: after replica A spends 40 requests,
    replica B's /v1/status and /metrics show 40 used too (the store's count for the budget),
    not its own limiter's 0; whichever replica a Service sends an operator to answers the same."""
    settings = from_mapping(
        {
            "state": postgres_url,
            "accounts": [
                {
                    "name": "acme",
                    "base_url": "https://api.example.com",
                    "api_key": "k-quota-replicas",
                    "access_token": "t-quota-replicas",
                    "rate_limit": {"requests_per_second": 1000, "requests_per_day": 10000},
                }
            ],
        }
    )
    account = settings.accounts[0]
    store = PostgresStore(postgres_url, settings.postgres)
    await store.open()
    try:
        budget = account.budget_name(await store.budget_salt())
        views: dict[str, RelayView] = {}
        scrapes: dict[str, Metrics] = {}
        limiters = {}
        for name in ("A", "B"):
            coordinator = PgCoordinator(store, f"replica-{name}", settings.postgres)
            limiter = await _limiter(account, budget, ("acme",), store, DAY, coordinator)
            limiters[name] = limiter
            quota = AccountQuota(
                "acme", limiter.budget.daily_allowance, lambda lim=limiter: lim.used_today, budget
            )
            views[name] = RelayView(accounts={"acme": quota})
            metrics = Metrics()
            metrics.watch_limiter("acme", limiter, budget)
            metrics.watch_store(store, [FANOUT_CURSOR])
            scrapes[name] = metrics
        for _ in range(40):
            await limiters["A"].acquire()
        assert limiters["B"].used_today == 0  # B's limiter has not heard of them
        now = int(datetime.now(UTC).timestamp() * 1000)
        allowance = account.budget.daily_allowance
        for name in ("A", "B"):
            shown = (await status(store, views[name], now))["accounts"]
            assert isinstance(shown, list)
            assert shown[0]["quota"]["used_today"] == 40, name
            assert shown[0]["quota"]["left_today"] == allowance - 40, name
            text = (await scrapes[name].scrape()).decode()
            labels = f'{{account="acme",budget="{budget}"}}'
            assert f"ctct_relay_quota_used_requests{labels} 40.0" in text, name
            assert f"ctct_relay_quota_remaining_requests{labels} {allowance - 40}.0" in text, name
    finally:
        await store.close()
