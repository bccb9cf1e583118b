"""Two replicas on PostgreSQL, one paused past its stream lease while the other took the stream
over and polled it: the real scheduler, poller and client against an upstream on loopback. The
paused pass, once it wakes, must neither write (pages, replays, the stream's bookkeeping) nor
send another request."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from relay.ctct.client import Credentials, CtctClient, RetryPolicy
from relay.ctct.ratelimit import Budget, RateLimiter
from relay.events import Kind
from relay.poller import Poller, PollSettings
from relay.scheduler import AccountRuntime, Planner, Scheduler, ScheduleSettings
from relay.store import PostgresSettings, PostgresStore, Stream, StreamKey
from relay.store.coordination import PgCoordinator
from tests.httpkit import serving_get
from tests.test_scheduler_upstream import record

API_KEY = "k3y-fencing-test"
# a's lease runs out while its pass is stuck; b's outlasts its pass on a loaded machine (no
# renewals run here)
LEASE_S = {"a": 2.0, "b": 30.0}
BASE = "/v2/emailmarketing/campaigns/100/tracking/"
SENDS = PollSettings(kinds=(Kind.SEND,), start_from="earliest")
# one pass per test and replica: the next is planned an hour on at least
SETTINGS = ScheduleSettings(min_interval_s=3600, max_interval_s=7200, concurrency=1)


class Campaign:
    """Campaign 100's sends, served to each replica (told apart by its access token); a
    replica's request of ``freeze_at`` (the summary or the sends) waits, once, until ``thaw``
    is set: the replica's pass is stuck there, its lease left to run out, as in a pause."""

    def __init__(self) -> None:
        now = int(time.time() * 1000)
        self.sends = [record(Kind.SEND, f"c{n}", now - 3600_000 + n) for n in range(2)]
        self.requests: list[tuple[str, str]] = []  # (replica, what) as they arrived
        self.freeze: tuple[str, str] | None = None
        self.frozen = asyncio.Event()
        self.thaw = asyncio.Event()

    def arrives(self, contact: str) -> None:
        """A send upstream that the campaign did not have before."""
        now = int(time.time() * 1000)
        self.sends.append(record(Kind.SEND, contact, now - 1800_000))

    async def answer(self, request: web.Request) -> web.Response:
        replica = request.headers["Authorization"].removeprefix("Bearer ")
        what = request.path.removeprefix(BASE)
        self.requests.append((replica, what))
        # what the upstream held when the request came, answered after the thaw
        sends = list(self.sends)
        if self.freeze == (replica, what):
            self.freeze = None
            self.frozen.set()
            await self.thaw.wait()
        if what == "reports/summary":
            return web.json_response({"sends": len(sends)})
        return web.json_response({"meta": {"pagination": {}}, "results": sends})

    def sent_by(self, replica: str) -> list[str]:
        return [what for who, what in self.requests if who == replica]


@dataclass
class Replica:
    name: str
    store: PostgresStore
    scheduler: Scheduler


@pytest.fixture
async def campaign() -> AsyncIterator[Campaign]:
    """The campaign, thawed at the end whatever happened (no request left waiting)."""
    served = Campaign()
    yield served
    served.thaw.set()


@pytest.fixture
async def replicas(postgres_url: str, campaign: Campaign) -> AsyncIterator[list[Replica]]:
    """Replicas a and b, each its own store (pool), client and scheduler (ticked by the test,
    no renewals running: a stuck pass's lease runs out), leases of ``LEASE_S``, and one
    campaign stream due now."""
    async with AsyncExitStack() as stack:
        base_url = await stack.enter_async_context(serving_get(campaign.answer))
        session = await stack.enter_async_context(aiohttp.ClientSession())
        made = []
        for name in ("a", "b"):
            store = PostgresStore.from_url(postgres_url)
            await store.open()
            stack.push_async_callback(store.close)
            limiter = RateLimiter(Budget(requests_per_second=50))
            credentials = Credentials(base_url, API_KEY, name)
            client = CtctClient(session, credentials, limiter, retry=RetryPolicy(max_attempts=1))
            poller = Poller(client, store, "acme", SENDS)
            runtime = AccountRuntime("acme", poller, limiter, Planner(SETTINGS))
            coordinator = PgCoordinator(store, name, PostgresSettings(lease_s=LEASE_S[name]))
            scheduler = Scheduler(store, [runtime], SETTINGS, coordinator=coordinator)
            stack.push_async_callback(scheduler.wait_idle)
            made.append(Replica(name, store, scheduler))
        await made[0].store.ensure_streams(
            [StreamKey("acme", "campaign", "100")], int(time.time() * 1000), seed=False
        )
        await made[0].scheduler.reload()
        await made[1].scheduler.reload()
        yield made
        campaign.thaw.set()


async def taken_over(a: Replica, b: Replica, campaign: Campaign) -> Stream:
    """a's pass gets stuck at ``campaign.freeze``; a send arrives; a's lease runs out and b
    claims the stream, polls it whole and finishes its pass. The stream as b left it."""
    await a.scheduler.tick()
    await asyncio.wait_for(campaign.frozen.wait(), 5)
    campaign.arrives("c9")
    await asyncio.sleep(LEASE_S["a"] + 0.3)
    await b.scheduler.tick()
    await asyncio.wait_for(b.scheduler.wait_idle(), 10)
    assert campaign.sent_by("b")[-2:] == ["reports/summary", "sends"], "b did not poll it"
    [stream] = await b.store.streams()
    return stream


async def woken(a: Replica, campaign: Campaign) -> list[dict[str, object]]:
    """a's stuck request answered (the pause over): its pass runs on to its end; its logs."""
    with capture_logs() as logs:
        campaign.thaw.set()
        await asyncio.wait_for(a.scheduler.wait_idle(), 10)
    return logs


async def test_a_pass_woken_after_a_takeover_leaves_the_new_holders_stream_as_it_was(
    replicas: list[Replica], campaign: Campaign
) -> None:
    """a is stuck on the sends page, its last request, while b takes the stream over, finds a
    send more and finishes. Woken, a's pass committed its page and then its bookkeeping over
    b's: the summary count b stored went back (the next pass reads the feed again), the next
    pass's time and the rate were a's (its pass found nothing new: the rate dropped), and
    last_poll_ms too. Now its commit is refused in the transaction that checks the lease, and
    the pass ends, logged, without writing anything."""
    a, b = replicas
    campaign.freeze = ("a", "sends")
    left_by_b = await taken_over(a, b, campaign)
    assert left_by_b.summary == {"sends": 3}
    logs = await woken(a, campaign)
    [stream] = await a.store.streams()
    assert stream == left_by_b, "the paused pass wrote over the new holder's"
    assert len(await a.store.read_outbox(0, 100)) == 3
    [lost] = [line for line in logs if line["event"] == "poll.lease_lost"]
    assert str(lost["error"]).startswith(
        f"stream {stream.id}: this pass's lease (claim 1) is gone, the stream's lease is"
        " released after claim 2: the stream was claimed again"
    )
    assert (await a.store.stream_stats())["acme"].failing == 0


async def test_a_pass_woken_after_a_takeover_sends_no_further_request(
    replicas: list[Replica], campaign: Campaign
) -> None:
    """a is stuck on the summary while b takes the stream over. Woken, a's pass went on to
    read the sends (a request of the key's shared budget, for what b had read already), then
    committed and wrote its bookkeeping over b's. Its lease ran out by its own clock: the pass
    stops before its next request, and writes nothing."""
    a, b = replicas
    campaign.freeze = ("a", "reports/summary")
    left_by_b = await taken_over(a, b, campaign)
    logs = await woken(a, campaign)
    assert campaign.sent_by("a") == ["reports/summary"], "the paused pass spent requests"
    [stream] = await a.store.streams()
    assert stream == left_by_b
    [lost] = [line for line in logs if line["event"] == "poll.lease_lost"]
    assert "ran out by this replica's clock before its next upstream request" in str(lost["error"])


async def test_a_replay_woken_after_a_takeover_is_not_emitted_twice(
    replicas: list[Replica], campaign: Campaign
) -> None:
    """An operator asks for a replay; a's replay pass is stuck on its sends page while b takes
    the stream over and runs the replay (each known event appended once more). Woken, a's pass
    appended what it had read once more again (a replay commit appends known events: dedup
    cannot absorb it). Now its replay commit is refused."""
    a, b = replicas
    await b.scheduler.tick()
    await asyncio.wait_for(b.scheduler.wait_idle(), 10)
    assert len(await b.store.read_outbox(0, 100)) == 2
    [stream] = await b.store.streams()
    await b.store.request_replay([stream.id], 0, int(time.time() * 1000))
    campaign.freeze = ("a", "sends")
    await taken_over(a, b, campaign)
    assert len(await b.store.read_outbox(0, 100)) == 2 + 3  # b's replay: the new one, and 2 again
    await woken(a, campaign)
    events = await a.store.read_outbox(0, 100)
    assert len(events) == 5, "the paused replay pass appended its events again"
    assert await a.store.replays() == {}
