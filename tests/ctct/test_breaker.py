"""The api_key's circuit breaker and holds (relay/ctct/breaker.py), alone and in the client
against an upstream on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import aiohttp
import pytest
from aiohttp import web

from relay.ctct import catalogue, errors
from relay.ctct.breaker import BreakerSettings, KeyBreaker
from relay.ctct.client import Credentials, CtctClient, RetryPolicy, counting_requests
from relay.ctct.ratelimit import Budget, RateLimiter
from tests.httpkit import serving_get
from tests.simkit import API_KEY, TOKEN

QUICK = RetryPolicy(base_delay_s=0.01, max_delay_s=0.02)
SUMMARY = catalogue.get("campaign.summary")


class Clock:
    """A wall clock the test moves."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_the_circuit_opens_probes_one_at_a_time_and_closes_on_an_answer() -> None:
    """Failures in a row open it; while open nothing is admitted; at its probe time one
    request probes while the others are refused; a failed probe opens it twice as long; an
    answer below 500 closes it and the count starts over."""
    clock = Clock()
    breaker = KeyBreaker(BreakerSettings(failures=3, open_s=10, max_open_s=25), clock)
    down = errors.ServerError("GET x answered 503", status=503)
    for _ in range(2):
        assert breaker.admit() is False
        breaker.observe(down, False)
    assert breaker.admit() is False
    breaker.observe(errors.NotFoundError("404", status=404), False)  # an answer: starts over
    for _ in range(3):
        breaker.observe(down, breaker.admit())
    assert (breaker.state(), breaker.open_until_s) == ("open", clock.now + 10)
    with pytest.raises(errors.CircuitOpenError) as refused:
        breaker.admit()
    assert refused.value.resume_at.timestamp() == clock.now + 10
    assert "3 requests in a row failed" in str(refused.value)
    clock.now += 10
    assert breaker.state() == "half_open"
    assert breaker.admit() is True  # the probe
    assert breaker.blocks_passes()
    with pytest.raises(errors.CircuitOpenError, match="a probe request is out"):
        breaker.admit()
    breaker.observe(errors.TransportError("refused", sent=False), True)
    assert breaker.open_until_s == clock.now + 20  # doubled
    clock.now += 20
    breaker.observe(down, breaker.admit())
    assert breaker.open_until_s == clock.now + 25  # capped at max_open_s
    clock.now += 25
    probe = breaker.admit()
    breaker.observe(errors.ResponseTimeoutError("slow"), probe)  # tells nothing: probe again
    assert breaker.admit() is True
    breaker.observe(None, True)
    assert (breaker.state(), breaker.failures, breaker.blocks_passes()) == ("closed", 0, False)
    breaker.observe(down, breaker.admit())
    assert breaker.state() == "closed"  # the count starts over, and the period too
    breaker.observe(down, breaker.admit())
    breaker.observe(down, breaker.admit())
    assert breaker.open_until_s == clock.now + 10


@asynccontextmanager
async def upstream(
    answer: Callable[[web.Request], web.Response],
) -> AsyncIterator[tuple[str, list[float]]]:
    """An HTTP server on 127.0.0.1 answering every GET with ``answer``; its base URL and the
    (monotonic) time each request arrived."""
    arrived: list[float] = []

    async def handler(request: web.Request) -> web.Response:
        arrived.append(time.monotonic())
        return answer(request)

    async with serving_get(handler) as base_url:
        yield base_url, arrived


def _client(session: aiohttp.ClientSession, base_url: str, limiter: RateLimiter) -> CtctClient:
    return CtctClient(session, Credentials(base_url, API_KEY, TOKEN), limiter, retry=QUICK)


async def test_an_outage_opens_the_keys_circuit_for_every_client_of_the_key() -> None:
    """Every answer a 500: after breaker_failures attempts in a row the key's circuit opens,
    the failing request stops retrying, and another account's client of the same key sends
    nothing (each went through all its attempts, stream after stream)."""

    def server_error(_request: web.Request) -> web.Response:
        return web.json_response({"error_key": "http.status.internal_error"}, status=500)

    limiter = RateLimiter(
        Budget(requests_per_second=1000), breaker=KeyBreaker(BreakerSettings(failures=3))
    )
    async with upstream(server_error) as (base_url, arrived), aiohttp.ClientSession() as session:
        first, second = _client(session, base_url, limiter), _client(session, base_url, limiter)
        with pytest.raises(errors.CircuitOpenError) as opened:
            await first.fetch(SUMMARY, resource_id="1")
        with pytest.raises(errors.CircuitOpenError):
            await second.fetch(SUMMARY, resource_id="2")
    assert len(arrived) == 3
    assert not opened.value.sent
    assert "500" in str(opened.value)
    assert API_KEY not in str(opened.value)
    assert limiter.breaker.state() == "open"


async def test_a_short_retry_after_holds_the_keys_other_requests() -> None:
    """A 429 with Retry-After: 1 for one request: the key's other requests wait for it too
    (only the task that got the 429 slept, the others kept hitting the limit)."""
    answered: list[int] = []

    def answer(_request: web.Request) -> web.Response:
        answered.append(1)
        if len(answered) == 1:
            body = [{"error_key": "too.many"}]
            return web.json_response(body, status=429, headers={"Retry-After": "1"})
        return web.json_response({"sends": 0})

    limiter = RateLimiter(Budget(requests_per_second=1000))
    async with upstream(answer) as (base_url, arrived), aiohttp.ClientSession() as session:
        first, second = _client(session, base_url, limiter), _client(session, base_url, limiter)
        limited = asyncio.create_task(first.fetch(SUMMARY, resource_id="1"))
        await asyncio.sleep(0.2)  # the 429 is in
        await second.fetch(SUMMARY, resource_id="2")
        await limited
    assert len(arrived) == 3
    assert min(arrived[1:]) - arrived[0] >= 0.9


async def test_a_long_retry_after_stops_the_keys_other_requests() -> None:
    """A Retry-After longer than max_retry_after_s: the request that got it raises, and the
    key's next request is not sent at all (KeyPausedError, the scheduler pauses the key)."""

    def too_many(_request: web.Request) -> web.Response:
        body = [{"error_key": "too.many"}]
        return web.json_response(body, status=429, headers={"Retry-After": "900"})

    limiter = RateLimiter(Budget(requests_per_second=1000))
    async with upstream(too_many) as (base_url, arrived), aiohttp.ClientSession() as session:
        first, second = _client(session, base_url, limiter), _client(session, base_url, limiter)
        with pytest.raises(errors.TooManyRequestsError):
            await first.fetch(SUMMARY, resource_id="1")
        with pytest.raises(errors.KeyPausedError, match="429 with Retry-After") as paused:
            await second.fetch(SUMMARY, resource_id="2")
    assert len(arrived) == 1
    assert abs(paused.value.resume_at.timestamp() - (time.time() + 900)) < 5


async def test_attempts_given_back_are_no_requests_of_the_pass() -> None:
    """Connection refused on every attempt: the quota got them back, and the unit of work's
    request count (a pass's cost in the planner) counts none of them either."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    limiter = RateLimiter(Budget(requests_per_second=1000))
    async with aiohttp.ClientSession() as session:
        client = _client(session, f"http://127.0.0.1:{port}", limiter)
        with counting_requests() as sent, pytest.raises(errors.TransportError):
            await client.fetch(SUMMARY, resource_id="1")
    assert limiter.used_today == 0
    assert sent.requests == 0
