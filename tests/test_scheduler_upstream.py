"""The scheduler against an upstream on loopback answering for the whole key or account (a 503
with a long Retry-After, a 403 that is no rate limit): real client, poller and SQLite store."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from relay.ctct import catalogue
from relay.ctct.client import Credentials, CtctClient, RetryPolicy
from relay.ctct.ratelimit import Budget, RateLimiter
from relay.poller import Poller, PollSettings
from relay.scheduler import AccountRuntime, Planner, Scheduler, ScheduleSettings
from relay.store import Store, StreamKey, open_store

API_KEY = "k3y-upstream-test"
TOKEN = "t0ken-upstream-test"

# the client's retries in hundredths of a second (its Retry-After bound stays 120 s)
QUICK = RetryPolicy(base_delay_s=0.01, max_delay_s=0.02)

Answer = Callable[[web.Request], web.Response]


@dataclass
class Upstream:
    """What the loopback upstream saw: every request's path, and whose token it carried."""

    paths: list[str]
    tokens: list[str]


@asynccontextmanager
async def upstream(answer: Answer) -> AsyncIterator[tuple[str, Upstream]]:
    """An HTTP server on 127.0.0.1 answering every GET with ``answer``: its base URL."""
    seen = Upstream([], [])

    async def handler(request: web.Request) -> web.Response:
        seen.paths.append(request.path)
        seen.tokens.append(request.headers.get("Authorization", "").removeprefix("Bearer "))
        return answer(request)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    assert site._server is not None
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


async def run_scheduler(
    store: Store, base_url: str, accounts: tuple[str, ...], streams: int, seconds: float
) -> list[AccountRuntime]:
    """``streams`` campaign streams of each account (one api_key, one limiter; the access token
    ``TOKEN-<account>``), polled one pass at a time per account for ``seconds``."""
    now = int(time.time() * 1000)
    await store.ensure_streams(
        [StreamKey(a, "campaign", str(100 + i)) for a in accounts for i in range(streams)], now
    )
    settings = ScheduleSettings(tick_s=0.1, concurrency=1, error_backoff_s=0.2)
    limiter = RateLimiter(Budget(requests_per_second=50))
    async with aiohttp.ClientSession() as session:
        runtimes = []
        for a in accounts:  # each with its own access token
            credentials = Credentials(base_url, API_KEY, f"{TOKEN}-{a}")
            client = CtctClient(session, credentials, limiter, retry=QUICK)
            poller = Poller(client, store, a, PollSettings())
            runtimes.append(AccountRuntime(a, poller, limiter, Planner(settings)))
        scheduler = Scheduler(store, runtimes, settings)
        await scheduler.start()
        try:
            await asyncio.sleep(seconds)
        finally:
            await scheduler.stop()
    return runtimes


@pytest.fixture
async def state(tmp_path: Path) -> AsyncIterator[Store]:
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await store.open()
    yield store
    await store.close()


def unavailable(_request: web.Request) -> web.Response:
    body = [{"error_key": "http.status.service_unavailable", "error_message": "maintenance"}]
    return web.json_response(body, status=503, headers={"Retry-After": "900"})


async def test_a_503_with_a_long_retry_after_pauses_the_key(state: Store) -> None:
    """The API answers 503 with Retry-After: 900: the first pass pauses the key for 900 s
    (status shows why) and no other stream sends its own request (each did, and only its own
    stream backed off, while the rest of the key kept sending)."""
    async with upstream(unavailable) as (base_url, seen):
        started = time.time()
        await run_scheduler(state, base_url, ("a",), streams=3, seconds=1.0)
    assert len(seen.paths) == 1
    until_ms, reason = (await state.account_pauses())["a"]
    assert abs(until_ms - (started + 900) * 1000) < 5_000
    assert "503 with Retry-After 900 s" in reason
    assert "maintenance" in reason
    assert API_KEY not in reason
    assert all(s.consecutive_errors == 0 for s in await state.streams("a"))


async def test_a_503_with_a_long_retry_after_on_a_feed_ends_the_pass(state: Store) -> None:
    """The summary answers, its feeds 503 with Retry-After: the pass stops at the first feed
    (the others would get the same answer) and the key pauses."""
    counts = {field: 1 for field in catalogue.FEEDS.values()}

    def answer(request: web.Request) -> web.Response:
        if request.path.endswith("/reports/summary"):
            return web.json_response(counts)
        return unavailable(request)

    async with upstream(answer) as (base_url, seen):
        await run_scheduler(state, base_url, ("a",), streams=3, seconds=1.0)
    assert len(seen.paths) == 2, seen.paths
    assert "503 with Retry-After 900 s" in (await state.account_pauses())["a"][1]


async def test_a_503_without_retry_after_stays_the_streams_error(state: Store) -> None:
    """A plain 5xx is the stream's failure: counted and backed off, nothing paused."""

    def answer(_request: web.Request) -> web.Response:
        return web.json_response({"error_key": "http.status.internal_error"}, status=500)

    async with upstream(answer) as (base_url, _seen):
        await run_scheduler(state, base_url, ("a",), streams=1, seconds=0.5)
    assert await state.account_pauses() == {}
    assert (await state.streams("a"))[0].consecutive_errors >= 1


def forbidden_for_a(request: web.Request) -> web.Response:
    """Account a's token is refused with a 403 that is no rate limit; b's summaries answer."""
    if request.headers.get("Authorization") == f"Bearer {TOKEN}-b":
        return web.json_response({})  # no counts: no feed to read
    return web.json_response(
        [{"error_key": "http.status.forbidden", "error_message": "application deactivated"}],
        status=403,
    )


async def test_a_403_that_is_no_rate_limit_pauses_its_account_for_an_hour(state: Store) -> None:
    """A 403 other than the rate limits' (a deactivated application, revoked privileges) will
    not pass by itself: the account pauses for an hour, saying why, after one request (every
    stream got its own 403, each failing on its own). Another account of the same key goes
    on: the 403 is about the account's token, not the key's budget."""
    async with upstream(forbidden_for_a) as (base_url, seen):
        started = time.time()
        await run_scheduler(state, base_url, ("a", "b"), streams=3, seconds=1.0)
    pauses = await state.account_pauses()
    assert set(pauses) == {"a"}
    until_ms, reason = pauses["a"]
    assert abs(until_ms - (started + 3600) * 1000) < 5_000
    assert reason.startswith("forbidden: ")
    assert "http.status.forbidden: application deactivated" in reason
    assert API_KEY not in reason
    assert TOKEN not in reason
    assert seen.tokens.count(f"{TOKEN}-a") == 1
    assert seen.tokens.count(f"{TOKEN}-b") == 3  # b's three summaries: b goes on
    assert all(s.last_poll_ms for s in await state.streams("b"))
