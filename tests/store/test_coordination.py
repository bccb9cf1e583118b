"""Replicas sharing PostgreSQL: stream leases (SKIP LOCKED, expiry takeover), named leases and
the shared request budget; and the single-process coordinator of SQLite."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import date, timedelta
from pathlib import Path

import asyncpg
import pytest

from relay.ctct.errors import BudgetExhaustedError
from relay.ctct.ratelimit import Budget, RateLimiter
from relay.events import Activity, Kind, from_millis
from relay.leases import AccountBudget
from relay.store import (
    LeaseLostError,
    PassResult,
    PostgresSettings,
    PostgresStore,
    ReplayRequest,
    StreamKey,
    open_store,
)
from relay.store.coordination import LocalCoordinator, PgCoordinator

T0 = 1_763_000_000_000
KEYS = [StreamKey("acme", "campaign", str(i)) for i in range(4)]


@pytest.fixture
async def stores(postgres_url: str) -> AsyncIterator[list[PostgresStore]]:
    """Two stores (two pools, as two replicas have) on one fresh database, with four streams
    of account acme due at T0."""
    opened = [PostgresStore.from_url(postgres_url) for _ in range(2)]
    for store in opened:
        await store.open()
    await opened[0].ensure_streams(KEYS, T0)
    yield opened
    for store in opened:
        await store.close()


def replicas(stores: list[PostgresStore], lease_s: float = 15.0) -> list[PgCoordinator]:
    settings = PostgresSettings(lease_s=lease_s)
    return [PgCoordinator(s, f"replica-{i}", settings) for i, s in enumerate(stores)]


async def test_concurrent_claims_never_share_a_stream(stores: list[PostgresStore]) -> None:
    """Two replicas claiming at once get disjoint streams; together every due one, once."""
    a, b = replicas(stores)
    got_a, got_b = await asyncio.gather(
        a.claim_streams("acme", T0, 3, set()), b.claim_streams("acme", T0, 3, set())
    )
    assert not set(got_a) & set(got_b)
    assert len(got_a) + len(got_b) == 4
    assert await a.claim_streams("acme", T0, 3, set()) == []
    assert await b.claim_streams("other", T0, 3, set()) == []  # another account's streams


async def test_claims_skip_rows_locked_by_another_transaction(
    stores: list[PostgresStore], postgres_url: str
) -> None:
    """A stream row locked elsewhere is skipped at once, not waited for."""
    [a] = replicas(stores[:1])
    first = (await stores[0].streams())[0].id
    conn = await asyncpg.connect(postgres_url)
    try:
        async with conn.transaction():
            await conn.execute("SELECT id FROM streams WHERE id = $1 FOR UPDATE", first)
            started = time.monotonic()
            claimed = await asyncio.wait_for(a.claim_streams("acme", T0, 10, set()), 5)
            assert time.monotonic() - started < 2
    finally:
        await conn.close()
    assert first not in claimed
    assert len(claimed) == 3


async def test_expired_leases_are_taken_over_and_released_ones_at_once(
    stores: list[PostgresStore],
) -> None:
    """A replica that stops renewing loses its streams after the lease; a released stream is
    claimable at once; renewing tells a replica which streams it still holds."""
    a, b = replicas(stores, lease_s=1.0)
    held = await a.claim_streams("acme", T0, 2, set())
    assert await a.renew_streams(held) == set(held)
    await a.release_streams(held[:1])
    every = [s.id for s in await stores[0].streams()]
    mine = await b.claim_streams("acme", T0, 10, set())
    assert mine == [s for s in every if s != held[1]]
    await asyncio.sleep(1.2)  # a's remaining lease expires (b's too: b passes its own in flight)
    assert await b.claim_streams("acme", T0, 10, set(mine)) == [held[1]]
    assert await a.renew_streams(held[1:]) == set()  # a learns it lost it


async def test_named_leases_have_one_holder(stores: list[PostgresStore]) -> None:
    """A named lease is held by one replica, renewed by it, released or expired to another."""
    a, b = replicas(stores, lease_s=1.0)
    assert await a.hold(["sink:kafka", "webhook:1"]) == {"sink:kafka", "webhook:1"}
    assert await b.hold(["sink:kafka", "webhook:1", "webhook:2"]) == {"webhook:2"}
    assert await a.hold(["sink:kafka"]) == {"sink:kafka"}  # renewal
    await a.release(["webhook:1"])
    assert await b.hold(["webhook:1"]) == {"webhook:1"}
    await asyncio.sleep(1.2)
    assert await b.hold(["sink:kafka"]) == {"sink:kafka"}
    assert await a.hold(["sink:kafka"]) == set()


async def test_shared_budget_counts_every_replica(stores: list[PostgresStore]) -> None:
    """Requests of both replicas fill one window and one daily count; a full window says how
    long to wait (at most the window plus the margin), a spent allowance says not today."""
    a, b = replicas(stores)
    day = "2025-11-13"  # a replica's: the database's own is counted
    admitted = [await r.reserve_request("acme", day, T0, 4, 1100, 6) for r in [a, b, a, b]]
    assert [r.admitted for r in admitted] == [True] * 4
    day = admitted[0].day
    assert admitted[-1].used_today == 4
    full = await b.reserve_request("acme", day, T0, 4, 1100, 6)
    assert not full.admitted
    assert 0 < full.wait_ms <= 1100 + 150  # until the oldest leaves the window, plus the margin
    other = await a.reserve_request("beta", day, T0, 4, 1100, 6)
    assert other.admitted  # each account has its own budget
    await asyncio.sleep(full.wait_ms / 1000 + 0.05)
    assert (await a.reserve_request("acme", day, T0, 4, 1100, 6)).admitted
    assert (await b.reserve_request("acme", day, T0, 4, 1100, 6)).admitted
    await asyncio.sleep(1.3)
    spent = await a.reserve_request("acme", day, T0, 4, 1100, 6)
    assert (spent.admitted, spent.wait_ms, spent.used_today) == (False, 0, 6)
    assert await stores[0].quota_used("acme", day) == 6


async def test_limiters_of_two_replicas_keep_one_per_second_limit(
    stores: list[PostgresStore],
) -> None:
    """Two replicas' rate limiters sending as fast as they may: no second of the deployment
    holds more than 4 requests, and both got their turns."""
    a, b = replicas(stores)
    budget = Budget(requests_per_second=4, requests_per_day=10_000)
    sent: list[tuple[float, str]] = []

    async def replica(coordinator: PgCoordinator) -> None:
        limiter = RateLimiter(budget, shared=AccountBudget(coordinator, "acme"))
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            await limiter.acquire()
            sent.append((time.monotonic(), coordinator.replica))

    await asyncio.gather(replica(a), replica(b))
    times = sorted(t for t, _ in sent)
    busiest = max(sum(1 for u in times if t <= u < t + 1.0) for t in times)
    assert busiest <= 4
    assert len(times) >= 8  # the budget was used, not starved
    assert {r for _, r in sent} == {"replica-0", "replica-1"}


async def test_two_replicas_committing_the_same_page_append_each_event_once(
    stores: list[PostgresStore],
) -> None:
    """Commits not fenced by a lease (the same activity read by a contact's stream and its
    campaign's, on two replicas): the dedup keys absorb them, the same page committed by both
    at once appends each event once, and the older pass's watermark does not move the
    stream's back."""
    events = [
        Activity(
            account="acme",
            kind=Kind.OPEN,
            campaign_id="1",
            contact_id=str(n),
            email_address=f"c{n}@example.com",
            occurred_at=from_millis(T0 + n),
        )
        for n in range(50)
    ]
    stream = (await stores[0].streams())[0].id
    new = await asyncio.gather(*(s.commit_page(stream, events, T0) for s in stores))
    assert sorted(new) == [0, 50]
    assert len(await stores[0].read_outbox(0, 1000)) == 50
    newer = PassResult({Kind.OPEN: T0 + 49}, {}, next_due_ms=T0, rate_per_h=1.0, polled_ms=T0)
    older = PassResult({Kind.OPEN: T0 + 9}, {}, next_due_ms=T0, rate_per_h=1.0, polled_ms=T0)
    await stores[1].finish_pass(stream, newer)
    await stores[0].finish_pass(stream, older)
    assert (await stores[0].stream(stream)).watermarks[Kind.OPEN] == T0 + 49


def opens(count: int) -> list[Activity]:
    return [
        Activity(
            account="acme",
            kind=Kind.OPEN,
            campaign_id="1",
            contact_id=str(n),
            email_address=f"c{n}@example.com",
            occurred_at=from_millis(T0 + n),
        )
        for n in range(count)
    ]


async def test_a_pass_whose_lease_was_claimed_again_writes_nothing(
    stores: list[PostgresStore],
) -> None:
    """a's lease runs out (a paused) and b claims the stream: every write of a's pass, made
    with its claim, is refused in its own transaction (LeaseLostError, naming the stream, the
    claims and the holder) and changes nothing: no dedup key, no event, neither the stream's
    schedule, summary or errors nor its replay request. b's writes, with its own claim, go
    through; once b released the stream, a's claim is still refused."""
    a, b = replicas(stores, lease_s=1.0)
    stream = (await stores[0].streams())[0].id
    [first] = await a.claim_streams("acme", T0, 1, set())
    assert first == stream
    mine = a.lease(stream)
    assert mine is not None
    assert (mine.owner, mine.epoch) == ("replica-0", 1)
    await asyncio.sleep(1.2)
    assert await b.claim_streams("acme", T0, 1, set()) == [stream]
    theirs = b.lease(stream)
    assert theirs is not None
    assert theirs.epoch == 2
    replay = ReplayRequest(T0, 1)
    await stores[0].request_replay([stream], T0, T0)
    before = await stores[0].stream(stream)
    result = PassResult({Kind.OPEN: T0 + 9}, {"opens": 10}, T0 + 60_000, 5.0, T0)
    writes = {
        "commit_page": lambda: stores[0].commit_page(stream, opens(10), T0, lease=mine),
        "commit_replay_page": lambda: stores[0].commit_replay_page(
            stream, opens(10), T0, T0, lease=mine
        ),
        "finish_pass": lambda: stores[0].finish_pass(stream, result, replay=replay, lease=mine),
        "record_error": lambda: stores[0].record_error(stream, "500", T0 + 1, lease=mine),
        "defer_stream": lambda: stores[0].defer_stream(stream, T0 + 1, lease=mine),
    }
    for name, write in writes.items():
        with pytest.raises(LeaseLostError) as refused:
            await write()
        assert str(refused.value).startswith(
            f"stream {stream}: this pass's lease (claim 1) is gone, the stream's lease is held"
            " by replica-1 under claim 2: the stream was claimed again"
        ), name
    assert await stores[0].dedup_count() == 0
    assert await stores[0].read_outbox(0, 100) == []
    assert await stores[0].stream(stream) == before
    assert await stores[0].replays() == {stream: T0}
    assert await stores[1].commit_page(stream, opens(10), T0, lease=theirs) == 10
    await stores[1].finish_pass(stream, result, replay=replay, lease=theirs)
    assert (await stores[1].stream(stream)).summary == {"opens": 10}
    assert await stores[1].replays() == {}  # the replay ended with b's pass
    await b.release_streams([stream])
    assert b.lease(stream) is None
    with pytest.raises(LeaseLostError, match="released after claim 2"):
        await stores[0].commit_page(stream, opens(11), T0, lease=mine)
    assert await stores[0].dedup_count() == 10


async def test_a_lease_that_ran_out_unclaimed_still_writes_and_renews(
    stores: list[PostgresStore],
) -> None:
    """A lease past its expiry that no other replica claimed is still the stream's only one:
    the pass's writes go through, a renewal keeps it, and every new claim has a higher epoch
    (released or not)."""
    a, b = replicas(stores, lease_s=1.0)
    [stream] = await a.claim_streams("acme", T0, 1, set())
    mine = a.lease(stream)
    await asyncio.sleep(1.2)
    assert await stores[0].commit_page(stream, opens(3), T0, lease=mine) == 3
    assert await a.renew_streams([stream]) == {stream}
    others = [s.id for s in await stores[0].streams() if s.id != stream]
    assert await b.claim_streams("acme", T0, 4, set()) == others
    await a.release_streams([stream])
    assert await b.claim_streams("acme", T0, 4, set(others)) == [stream]
    again = b.lease(stream)
    assert again is not None
    assert again.epoch == 2


async def _database_day(url: str) -> tuple[str, float]:
    """The database's UTC day, and the seconds left of it."""
    conn = await asyncpg.connect(url)
    try:
        day, left_s = await conn.fetchrow(
            "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD'),"
            " EXTRACT(EPOCH FROM date_trunc('day', clock_timestamp() AT TIME ZONE 'UTC')"
            " + interval '1 day' - clock_timestamp() AT TIME ZONE 'UTC')"
        )
    finally:
        await conn.close()
    return str(day), float(left_s)


async def test_the_quota_day_is_the_databases_whatever_a_replicas_clock_says(
    stores: list[PostgresStore], postgres_url: str
) -> None:
    """Replicas whose clocks stand on either side of midnight count on one day, the database's:
    one whose clock is ahead used to spend the next day's quota beside the others still
    spending today's (the API counts one day), and a request it takes back leaves that day."""
    a, b = replicas(stores)
    today, _ = await _database_day(postgres_url)
    tomorrow = (date.fromisoformat(today) + timedelta(days=1)).isoformat()
    first = await a.reserve_request("acme", today, T0, 4, 1100, 2)
    ahead = await b.reserve_request("acme", tomorrow, T0, 4, 1100, 2)
    assert first.admitted
    assert ahead.admitted
    spent = await a.reserve_request("acme", today, T0, 4, 1100, 2)
    assert (spent.admitted, spent.wait_ms) == (False, 0), "a day's allowance spent twice"
    assert await stores[0].quota_used("acme", tomorrow) == 0
    assert (first.day, ahead.day, ahead.used_today) == (today, today, 2)
    assert await b.return_request("acme", tomorrow, ahead.sent_ms) == 1
    assert await stores[0].quota_used("acme", today) == 1


async def test_a_replica_clock_ahead_pauses_the_key_until_the_databases_midnight(
    stores: list[PostgresStore], postgres_url: str
) -> None:
    """The shared day's allowance spent, a replica whose clock is 12 hours ahead gives the
    key's pause the database's midnight (in its own clock's terms), not its own next one:
    after its own midnight it used to pause the key for most of a day."""
    a, b = replicas(stores)
    budget = Budget(requests_per_second=4, requests_per_day=1, reserved_share=0.0)
    today, _ = await _database_day(postgres_url)
    assert (await a.reserve_request("acme", today, T0, 4, 1100, 1)).admitted
    skew_s = 12 * 3600.0
    limiter = RateLimiter(
        budget, shared=AccountBudget(b, "acme"), wall_clock=lambda: time.time() + skew_s
    )
    with pytest.raises(BudgetExhaustedError) as raised:
        await limiter.acquire()
    _, left_s = await _database_day(postgres_url)
    expected = time.time() + skew_s + left_s
    assert abs(raised.value.resume_at.timestamp() - expected) < 5


async def test_local_coordinator_claims_only_the_accounts_own_streams(tmp_path: Path) -> None:
    """Two accounts on SQLite: the other account's earlier due streams (say it is paused until
    midnight, so nobody polls them) never fill this account's claim. They used to: its passes
    then found streams of another account, did nothing, and its own were never polled."""
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await store.open()
    try:
        other = [StreamKey("globex", "campaign", str(n)) for n in range(6)]
        await store.ensure_streams(other, T0 - 60_000)
        await store.ensure_streams([StreamKey("acme", "campaign", "1")], T0)
        [mine] = [s.id for s in await store.streams("acme")]
        local = LocalCoordinator(store, "solo")
        assert await local.claim_streams("acme", T0, 2, ()) == [mine]
        assert len(await local.claim_streams("globex", T0, 10, ())) == 6
        assert await store.due_streams(T0, 10, "acme") == [mine]
        assert len(await store.due_streams(T0, 10)) == 7
    finally:
        await store.close()


async def test_local_coordinator_is_everything_due(tmp_path: Path) -> None:
    """Alone on SQLite: every due stream not in flight is claimable and every lease is held."""
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await store.open()
    try:
        await store.ensure_streams(KEYS, T0)
        local = LocalCoordinator(store, "solo")
        ids = await store.due_streams(T0, 10)
        assert await local.claim_streams("acme", T0, 2, {ids[0]}) == ids[1:3]
        assert await local.renew_streams(ids) == set(ids)
        assert local.lease(ids[1]) is None  # nothing to fence: one process
        assert await local.hold(["sink:kafka"]) == {"sink:kafka"}
        assert not local.shared_budget
    finally:
        await store.close()
