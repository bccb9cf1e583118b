"""The scheduler against an upstream on loopback answering for the whole key or account (a 503
with a long Retry-After, a 403 that is no rate limit): real client, poller and SQLite store."""

from __future__ import annotations

import asyncio
import inspect
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from relay.ctct import catalogue
from relay.ctct.breaker import BreakerSettings, KeyBreaker
from relay.ctct.client import Credentials, CtctClient, RetryPolicy
from relay.ctct.ratelimit import Budget, RateLimiter
from relay.events import Kind, format_millis
from relay.poller import Poller, PollSettings
from relay.scheduler import AccountRuntime, Planner, Scheduler, ScheduleSettings
from relay.store import Store, StreamKey, open_store
from tests.httpkit import serving_get

API_KEY = "k3y-upstream-test"
TOKEN = "t0ken-upstream-test"

# the client's retries in hundredths of a second (its Retry-After bound stays 120 s)
QUICK = RetryPolicy(base_delay_s=0.01, max_delay_s=0.02)

Answer = Callable[[web.Request], web.StreamResponse | Awaitable[web.StreamResponse]]


@dataclass
class Upstream:
    """What the loopback upstream saw: every request's path, and whose token it carried."""

    paths: list[str]
    tokens: list[str]


@asynccontextmanager
async def upstream(answer: Answer) -> AsyncIterator[tuple[str, Upstream]]:
    """An HTTP server on 127.0.0.1 answering every GET with ``answer``: its base URL."""
    seen = Upstream([], [])

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.paths.append(request.path)
        seen.tokens.append(request.headers.get("Authorization", "").removeprefix("Bearer "))
        answered = answer(request)
        return await answered if inspect.isawaitable(answered) else answered

    async with serving_get(handler) as base_url:
        yield base_url, seen


async def run_scheduler(
    store: Store,
    base_url: str,
    accounts: tuple[str, ...],
    streams: int,
    seconds: float,
    *,
    breaker: BreakerSettings | None = None,
    poll: PollSettings | None = None,
    concurrency: int = 1,
) -> list[AccountRuntime]:
    """``streams`` campaign streams of each account (one api_key, one limiter; the access token
    ``TOKEN-<account>``), polled ``concurrency`` passes at a time per account for ``seconds``."""
    now = int(time.time() * 1000)
    await store.ensure_streams(
        [StreamKey(a, "campaign", str(100 + i)) for a in accounts for i in range(streams)], now
    )
    settings = ScheduleSettings(tick_s=0.1, concurrency=concurrency, error_backoff_s=0.2)
    limiter = RateLimiter(Budget(requests_per_second=50), breaker=KeyBreaker(breaker))
    async with aiohttp.ClientSession() as session:
        runtimes = []
        for a in accounts:  # each with its own access token
            credentials = Credentials(base_url, API_KEY, f"{TOKEN}-{a}")
            client = CtctClient(session, credentials, limiter, retry=QUICK)
            poller = Poller(client, store, a, poll or PollSettings())
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


def server_error(_request: web.Request) -> web.Response:
    return web.json_response({"error_key": "http.status.internal_error"}, status=500)


async def test_a_503_without_retry_after_stays_the_streams_error(state: Store) -> None:
    """A plain 5xx is the stream's failure: counted and backed off, nothing paused (while the
    key's circuit stays closed: see below)."""
    async with upstream(server_error) as (base_url, _seen):
        closed = BreakerSettings(failures=0)  # never opens
        await run_scheduler(state, base_url, ("a",), streams=1, seconds=0.5, breaker=closed)
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


async def test_an_outage_opens_the_keys_circuit_and_pauses_the_key(state: Store) -> None:
    """Every answer a plain 500: after http.breaker_failures attempts in a row the key's
    circuit opens and the key pauses until its probe time, saying why, instead of each of the
    five streams retrying on its own backoff (five attempts a pass: dozens of requests a
    second here, about 40 per stream in an hour with the default backoff)."""
    async with upstream(server_error) as (base_url, seen):
        started = time.time()
        runtimes = await run_scheduler(state, base_url, ("a", "b"), streams=5, seconds=1.5)
    # the default breaker_failures, and the other account's request in flight when it opened
    assert 10 <= len(seen.paths) <= 11
    assert runtimes[0].limiter.breaker.state() == "open"
    pauses = await state.account_pauses()
    assert set(pauses) == {"a", "b"}  # every account of the key
    until_ms, reason = pauses["a"]
    assert abs(until_ms - (started + 30) * 1000) < 5_000  # the default breaker_open_s
    assert re.match(r"circuit open: 1[01] requests in a row failed \(5xx or no answer\)", reason)
    assert "http.status.internal_error" in reason
    assert API_KEY not in reason


async def test_the_open_circuit_probes_one_request_at_a_time_and_closes(state: Store) -> None:
    """While the upstream is down, after the circuit opens, one pass at a time probes (at
    breaker_open_s, then twice that); once a probe is answered the circuit closes, the pause
    ends and every stream of both accounts is polled."""
    down = True
    open_requests = 0  # in flight now
    failed = 0  # answered 500
    most_open = 0
    opened = asyncio.Event()

    async def answer(request: web.Request) -> web.Response:
        nonlocal open_requests, most_open, failed
        open_requests += 1
        if down:  # once it is up, every stream goes on at once
            most_open = max(most_open, open_requests)
        try:
            await asyncio.sleep(0.02)
            failed += down
            return server_error(request) if down else web.json_response({})
        finally:
            open_requests -= 1
            if failed >= breaker.failures and not open_requests:
                opened.set()  # open, and what was out when it opened is back

    async def recover() -> None:
        nonlocal down, most_open
        await opened.wait()
        most_open = 0
        await asyncio.sleep(0.5)
        down = False

    breaker = BreakerSettings(failures=3, open_s=0.3, max_open_s=10)
    async with upstream(answer) as (base_url, seen):
        recovering = asyncio.create_task(recover())
        runtimes = await run_scheduler(
            state, base_url, ("a", "b"), streams=3, seconds=3.0, breaker=breaker, concurrency=2
        )
        await asyncio.wait_for(recovering, 5)
    assert most_open == 1  # probes only, one at a time, while it was down
    assert runtimes[0].limiter.breaker.state() == "closed"
    streams = await state.streams()
    assert len(streams) == 6
    assert all(s.last_poll_ms for s in streams)
    assert all(until <= time.time() * 1000 for until, _ in (await state.account_pauses()).values())
    # the first attempts (up to the four passes in flight when it opened) and two probes
    assert len(seen.paths) <= 20, seen.paths


def record(kind: Kind, contact: str, at_ms: int) -> dict[str, str]:
    """One tracking record of campaign 100 as the API lists it."""
    return {
        "activity_type": kind.activity_type,
        "campaign_id": "100",
        "contact_id": contact,
        "email_address": f"{contact}@example.com",
        f"{kind.value}_date": format_millis(at_ms),
    }


class PagedCampaign:
    """Campaign 100 with one send and three opens, a page each (page_limit 1); campaign 101's
    summary is ``other`` (after ``other_delay_s``); an open page's answer waits ``page_s``;
    ``limited_page``: that open page answers 429 with a long Retry-After."""

    BASE = "/v2/emailmarketing/campaigns"

    def __init__(
        self, page_s: float = 0.0, limited_page: int | None = None, cut_page: int | None = None
    ) -> None:
        self.at_ms = int(time.time() * 1000) - 3600_000
        self.page_s = page_s
        self.limited_page = limited_page
        self.cut_page = cut_page  # this open page's body is cut off mid-way
        self.cuts = 0  # how many times (None: always)
        self.cut: int | None = None
        self.other_delay_s = 0.0
        self.other: Answer = lambda _r: web.json_response({})

    async def answer(self, request: web.Request) -> web.StreamResponse:
        if request.path.startswith(f"{self.BASE}/101/"):
            await asyncio.sleep(self.other_delay_s)
            answered = self.other(request)
            return await answered if inspect.isawaitable(answered) else answered
        tail = request.path.removeprefix(f"{self.BASE}/100/tracking/")
        if tail == "reports/summary":
            return web.json_response({"sends": 1, "opens": 3})
        if tail == "sends":
            body = {"meta": {"pagination": {}}, "results": [record(Kind.SEND, "c0", self.at_ms)]}
            return web.json_response(body)
        page = int(request.query.get("page", "1"))
        if page == self.limited_page:
            return too_many(request)
        await asyncio.sleep(self.page_s)
        if page == self.cut_page and (self.cut is None or self.cuts < self.cut):
            self.cuts += 1
            return await cut_off(request)
        more = {"next_link": f"{self.BASE}/100/tracking/opens?page={page + 1}"} if page < 3 else {}
        opened = record(Kind.OPEN, f"c{page}", self.at_ms + 1000 - page)
        return web.json_response({"meta": {"pagination": more}, "results": [opened]})


async def cut_off(request: web.Request) -> web.StreamResponse:
    """A 200 whose body stops a third of the way through its Content-Length: the connection
    closes mid-body."""
    response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    response.content_length = 300
    await response.prepare(request)
    await response.write(b'{"meta": {"pagination": {}}, "results": [{"activity_type": "EMAIL_')
    assert request.transport is not None
    request.transport.close()
    return response


def too_many(_request: web.Request) -> web.Response:
    body = [{"error_key": "http.status.too_many_requests", "error_message": "slow down"}]
    return web.json_response(body, status=429, headers={"Retry-After": "900"})


PAGED = PollSettings(kinds=(Kind.SEND, Kind.OPEN), start_from="earliest", page_limit=1)


async def test_a_pass_stopped_by_a_429_keeps_the_feeds_it_read(state: Store) -> None:
    """The second page of the opens answers 429 with Retry-After: 900: the key pauses, and the
    pass is finished with what it read: the sends' watermark moves (their feed was read whole),
    the opens' does not (read again from the start at the next pass), the open of page 1 is
    committed, and the stream counts no error and stays due. The pass used to end on the
    error, and the next re-read (and paid for) the sends too."""
    campaign = PagedCampaign(limited_page=2)
    async with upstream(campaign.answer) as (base_url, seen):
        await run_scheduler(state, base_url, ("a",), streams=1, seconds=0.6, poll=PAGED)
    assert [p.rsplit("/", 1)[1] for p in seen.paths] == ["summary", "sends", "opens", "opens"]
    assert "429 with Retry-After 900 s" in (await state.account_pauses())["a"][1]
    stream = (await state.streams("a"))[0]
    assert stream.watermarks == {Kind.SEND: campaign.at_ms}
    assert stream.summary.get("sends") == 1
    assert "opens" not in stream.summary  # read again
    assert (stream.consecutive_errors, stream.last_error) == (0, None)
    assert stream.next_due_ms <= time.time() * 1000
    events = await state.read_outbox(0, 100)
    assert sorted(e.contact_id for e in events) == ["c0", "c1"]


async def test_passes_running_when_the_key_pauses_stop_at_their_next_page(state: Store) -> None:
    """Campaign 101's summary answers 429 with Retry-After: 900 while campaign 100's pass is
    reading its first page of opens: that pass sends no further request (it read all three
    pages, each costing the key's budget against a limit the API had just said was spent),
    keeps what it read (the sends' watermark, the open of page 1) and stays due."""
    campaign = PagedCampaign(page_s=0.3)
    campaign.other_delay_s = 0.1
    campaign.other = too_many
    async with upstream(campaign.answer) as (base_url, seen):
        await run_scheduler(
            state, base_url, ("a",), streams=2, seconds=1.2, poll=PAGED, concurrency=2
        )
    opens = [p for p in seen.paths if p.endswith("/100/tracking/opens")]
    assert len(opens) == 1, seen.paths
    assert "429 with Retry-After 900 s" in (await state.account_pauses())["a"][1]
    stream = next(s for s in await state.streams("a") if s.key.resource_id == "100")
    assert stream.watermarks == {Kind.SEND: campaign.at_ms}
    assert stream.consecutive_errors == 0
    assert sorted(e.contact_id for e in await state.read_outbox(0, 100)) == ["c0", "c1"]


async def test_a_body_cut_off_once_is_read_again(state: Store) -> None:
    """The second page of the opens is cut off mid-body once: the client asks for that page
    again and the pass goes on, everything read and committed."""
    campaign = PagedCampaign(cut_page=2)
    campaign.cut = 1
    async with upstream(campaign.answer) as (base_url, seen):
        await run_scheduler(state, base_url, ("a",), streams=1, seconds=0.6, poll=PAGED)
    assert [p.rsplit("/", 1)[1] for p in seen.paths][:6] == ["summary", "sends"] + ["opens"] * 4
    stream = (await state.streams("a"))[0]
    assert (stream.consecutive_errors, set(stream.watermarks)) == (0, {Kind.SEND, Kind.OPEN})
    assert sorted(e.contact_id for e in await state.read_outbox(0, 100)) == ["c0", "c1", "c2", "c3"]


async def test_a_body_cut_off_on_every_attempt_fails_only_its_feed(state: Store) -> None:
    """The second page of the opens is cut off on every attempt: after the client's bounded
    retries of that page, only the opens fail (their watermark stays, page 1 committed); the
    sends, read whole, keep their progress. It used to end the pass as a network failure,
    throwing the sends' watermark away with it."""
    campaign = PagedCampaign(cut_page=2)
    async with upstream(campaign.answer) as (base_url, _seen):
        await run_scheduler(state, base_url, ("a",), streams=1, seconds=0.3, poll=PAGED)
    assert campaign.cuts >= QUICK.max_attempts  # a pass's retries of page 2
    stream = (await state.streams("a"))[0]
    assert stream.watermarks == {Kind.SEND: campaign.at_ms}
    assert stream.consecutive_errors >= 1
    assert "cut off" in str(stream.last_error)
    assert sorted(e.contact_id for e in await state.read_outbox(0, 100)) == ["c0", "c1"]


def over_ratelimit(_request: web.Request) -> web.Response:
    body = [{"error_key": "mashery.not.authorized.over.ratelimit", "error_message": "quota"}]
    return web.json_response(body, status=403)


async def test_an_over_ratelimit_pause_holds_across_a_restart(state: Store) -> None:
    """The API's 403 over.ratelimit pauses the key until 00:00 UTC, and a restarted relay
    (a new scheduler, limiter and client on the same store) sends nothing before then: the
    pause is stored, not only the limiter's memory."""
    async with upstream(over_ratelimit) as (base_url, seen):
        await run_scheduler(state, base_url, ("a",), streams=2, seconds=0.5)
        assert len(seen.paths) == 1
        await run_scheduler(state, base_url, ("a",), streams=2, seconds=0.5)
    assert len(seen.paths) == 1
    assert "over.ratelimit" in (await state.account_pauses())["a"][1]


@pytest.mark.parametrize("gone", [pytest.param(False, id="once"), pytest.param(True, id="gone")])
async def test_a_404_retires_a_stream_only_when_its_next_pass_finds_it_gone_too(
    state: Store, gone: bool
) -> None:
    """A summary answering 404 once is a failed pass like any other (the stream is polled
    again after its backoff and goes on: it was retired at once, until a restart or the daily
    scan); one still answering 404 at the next pass retires the stream."""
    answers: list[int] = []

    def answer(_request: web.Request) -> web.Response:
        answers.append(1)
        if gone or len(answers) == 1:
            return web.json_response([{"error_key": "http.status.not_found"}], status=404)
        return web.json_response({})

    async with upstream(answer) as (base_url, seen):
        await run_scheduler(state, base_url, ("a",), streams=1, seconds=0.8)
    stream = (await state.streams("a"))[0]
    assert stream.retired is gone
    if gone:
        assert len(seen.paths) == 2
        assert "404" in str(stream.last_error)
    else:
        assert len(seen.paths) >= 2
        assert (stream.consecutive_errors, stream.last_error) == (0, None)
