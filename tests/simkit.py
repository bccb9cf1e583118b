"""A running simulator on 127.0.0.1 for tests, and clients bound to it (fixtures: make_sim, sim)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from aiohttp.typedefs import Middleware

from relay.ctct.client import Credentials, CtctClient, RetryPolicy
from relay.ctct.ratelimit import Budget, RateLimiter
from relay.sim import Scenario, SimClock, create_app
from relay.sim.scenario import ApiKey, Campaigns, Contacts

API_KEY = "test-key-5f2a9c"
TOKEN = "test-token-77e1b0"
START = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)

SCENARIO = Scenario(
    seed=11,
    start=START,
    time_scale=0,
    keys=(ApiKey(API_KEY, TOKEN, qps=None, daily=None),),
    contacts=Contacts(count=60),
    campaigns=Campaigns(count=3, already_sent=3, sent_every_s=1800),
)


@dataclasses.dataclass
class Sim:
    """A simulator running on loopback, with helpers to read its ground truth and steer it."""

    server: TestServer
    session: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    async def truth(self) -> list[dict[str, object]]:
        async with self.session.get(f"{self.url}/_sim/truth") as resp:
            body = await resp.json()
        activities: list[dict[str, object]] = body["activities"]
        return activities

    async def faults(self, **body: object) -> None:
        async with self.session.post(f"{self.url}/_sim/faults", json=body) as resp:
            assert resp.status == 200, await resp.text()

    async def advance(self, seconds: float) -> None:
        async with self.session.post(f"{self.url}/_sim/clock", json={"advance_s": seconds}) as resp:
            assert resp.status == 200

    def client(
        self,
        *,
        api_key: str = API_KEY,
        token: str = TOKEN,
        budget: Budget | None = None,
        retry: RetryPolicy | None = None,
        timeout: aiohttp.ClientTimeout | None = None,
        sleeps: list[float] | None = None,
    ) -> CtctClient:
        """A client for this simulator; ``sleeps`` records retry delays instead of sleeping."""

        async def record(delay: float) -> None:
            assert sleeps is not None
            sleeps.append(delay)

        return CtctClient(
            self.session,
            Credentials(self.url, api_key, token),
            RateLimiter(budget or Budget(requests_per_second=1000, requests_per_day=10**6)),
            retry=retry,
            timeout=timeout,
            sleep=record if sleeps is not None else _no_sleep,
        )


async def _no_sleep(_delay: float) -> None:
    """Retries in tests do not wait; the delays themselves are asserted where they matter."""


MakeSim = Callable[..., Awaitable[Sim]]


@pytest.fixture
async def make_sim(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> AsyncIterator[MakeSim]:
    """Start a simulator for a scenario (the client-test default unless given), 2 h after start."""
    sessions: list[aiohttp.ClientSession] = []

    async def start(
        scenario: Scenario = SCENARIO,
        advance_s: float = 7200,
        middlewares: Sequence[Middleware] = (),
    ) -> Sim:
        app = create_app(scenario, SimClock(START, time_scale=0))
        app.middlewares.extend(middlewares)
        server = await aiohttp_server(app)
        session = aiohttp.ClientSession()
        sessions.append(session)
        sim = Sim(server, session)
        if advance_s:
            await sim.advance(advance_s)
        return sim

    yield start
    for session in sessions:
        await session.close()


@pytest.fixture
async def sim(make_sim: MakeSim) -> Sim:
    """The default simulator for client tests."""
    return await make_sim()
