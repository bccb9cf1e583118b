"""Campaign discovery as the relay runs it (``app._discovery_job``) against the simulator: it
spends an account's requests only when the account's passes may, and an upstream error it meets
pauses the account as a pass's would."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import cast

import pytest

from relay.app import _discovery_job
from relay.ctct.ratelimit import Budget, RateLimiter
from relay.poller import Poller
from relay.scheduler import AccountRuntime, Planner, Scheduler, ScheduleSettings
from relay.store import Store
from relay.store.coordination import LocalCoordinator
from relay.targets import CampaignDiscovery
from tests.simkit import API_KEY, Sim


async def served(sim: Sim) -> tuple[int, dict[str, int]]:
    """Requests the simulator answered for the test key, and those it refused, by reason."""
    async with sim.session.get(f"{sim.url}/_sim/stats") as resp:
        key = (await resp.json())["keys"][API_KEY]
    return key["served"], key["rejected"]


def job_for(
    sim: Sim, store: Store, *, token: str | None = None
) -> tuple[Scheduler, Callable[[], Awaitable[None]]]:
    client = sim.client() if token is None else sim.client(token=token)
    limiter = RateLimiter(Budget())  # the client's own is the sim's unlimited one
    runtime = AccountRuntime("acme", cast(Poller, None), limiter, Planner(ScheduleSettings()))
    scheduler = Scheduler(store, [runtime], ScheduleSettings())
    discovery = CampaignDiscovery(client, store, "acme", 30, scheduler.reload)
    job = _discovery_job(scheduler, LocalCoordinator(store, "test"), "acme", discovery)
    return scheduler, job


def now_ms() -> int:
    return int(time.time() * 1000)


@pytest.mark.parametrize("paused_by", ["operator", "relay"])
async def test_discovery_calls_nothing_for_a_held_or_paused_account(
    sim: Sim, store: Store, paused_by: str
) -> None:
    """An account held by an operator (`ctct-relay pause --account`), or paused by the relay
    (a 401, its key's quota or Retry-After, learned by any replica), is not called by discovery
    either: it called the API every discover_interval_s whatever the account's state."""
    scheduler, job = job_for(sim, store)
    if paused_by == "operator":
        await store.hold_account("acme", "maintenance", now_ms())
    else:
        await store.set_account_pause("acme", now_ms() + 3600_000, "429 with Retry-After 3600 s")
    await job()
    assert await served(sim) == (0, {})
    assert await store.streams("acme") == []
    if paused_by == "operator":
        await store.release_account("acme")
    else:
        await store.set_account_pause("acme", None, "")
        await scheduler.reload()  # the relay's own pause is cleared by a reload (a restart)
    await job()
    assert (await served(sim))[0] > 0  # the same job calls once the account may spend again
    assert len(await store.streams("acme")) == 3


async def test_discovery_meeting_rejected_credentials_pauses_the_account(
    sim: Sim, store: Store
) -> None:
    """A 401 met by discovery pauses the account (stored, an hour, as a pass's 401 does) instead
    of being only logged; the next run then calls nothing."""
    _, job = job_for(sim, store, token="not-the-token")
    before = now_ms()
    await job()
    served_, rejected = await served(sim)
    assert served_ == 0
    assert sum(rejected.values()) == 1
    pauses = await store.account_pauses()
    until_ms, reason = pauses["acme"]
    assert until_ms >= before + 3600_000
    assert reason.startswith("credentials rejected")
    await job()
    assert sum((await served(sim))[1].values()) == 1  # paused: not asked again
