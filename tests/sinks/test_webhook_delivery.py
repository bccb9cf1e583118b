"""Webhook delivery against real HTTP receivers on 127.0.0.1: signatures, filters, retries,
Retry-After, 410, auto-disable, dead letters, redelivery, recovery, SSRF and isolation."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import statistics
import threading
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from standardwebhooks.webhooks import Webhook as Verifier
from structlog.testing import capture_logs

from relay.api import service
from relay.events import Activity, Kind, from_millis
from relay.sinks import signing
from relay.sinks.ssrf import Guard
from relay.sinks.webhooks import (
    DeliverySettings,
    Outcome,
    WebhookDispatcher,
    _webhooks_named,
)
from relay.store import Attempt, Store, StoreError, StreamKey, UnwantedError, Webhook
from relay.store.coordination import Coordinator, LocalCoordinator
from tests.storekit import behind_the_store

ALLOW_LOOPBACK = Guard.from_strings(["127.0.0.0/8", "::1/128"])
FAST = DeliverySettings(
    retry_schedule_s=(0.05, 0.1, 0.15),
    jitter=0.0,
    timeout_s=2.0,
    idle_poll_s=0.02,
    refresh_s=0.1,
)
T0 = 1_763_600_000_000


@dataclass
class Receiver:
    """A webhook endpoint whose answers the test scripts; it records what it received."""

    server: TestServer | None = None
    answers: list[int | str] = field(default_factory=list)  # status codes or "hang"/"redirect"
    default: int | str = 200
    received: list[tuple[float, dict[str, str], bytes]] = field(default_factory=list)
    retry_after: str | None = None
    set_cookie: str | None = None
    delay_s: float = 0.0  # before answering: a slow endpoint

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("/hook"))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append((time.monotonic(), dict(request.headers), body))
        answer = self.answers.pop(0) if self.answers else self.default
        if answer == "hang":
            await asyncio.sleep(3600)
        if answer == "redirect":
            raise web.HTTPFound(self.url + "/elsewhere")
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        headers = {"Retry-After": self.retry_after} if self.retry_after else {}
        if self.set_cookie:
            headers["Set-Cookie"] = self.set_cookie
        return web.Response(
            status=int(answer), text="ok" if answer == 200 else "nope", headers=headers
        )


Start = Callable[..., Awaitable[Receiver]]


@pytest.fixture
async def receiver(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> Start:
    """Factory of receivers on free loopback ports."""

    async def start(**kwargs: object) -> Receiver:
        r = Receiver(**kwargs)  # type: ignore[arg-type]
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", r.handle)
        r.server = await aiohttp_server(app)
        return r

    return start


def activity(n: int, kind: Kind = Kind.OPEN) -> Activity:
    return Activity(
        account="acme",
        kind=kind,
        campaign_id="1100394165290",
        contact_id=str(1000 + n),
        email_address=f"c{n}@example.com",
        occurred_at=from_millis(T0 + n),
        link_id="1" if kind is Kind.CLICK else None,
    )


async def commit(store: Store, activities: list[Activity]) -> None:
    await store.ensure_streams([StreamKey("acme", "campaign", "1100394165290")], T0)
    sid = (await store.streams())[0].id
    await store.commit_page(sid, activities, int(time.time() * 1000))


async def register(
    store: Store, url: str, types: tuple[str, ...] = ("com.constantcontact.email.*",), **kw: object
) -> Webhook:
    hook = Webhook(
        id=f"wh_{len(await store.webhooks())}",
        url=url,
        event_types=types,
        secret=signing.generate_secret(),
        **kw,
    )  # type: ignore[arg-type]
    return await store.create_webhook(hook)


class Running:
    """The dispatcher running in the background for one test."""

    def __init__(
        self,
        store: Store,
        settings: DeliverySettings = FAST,
        guard: Guard = ALLOW_LOOPBACK,
        coordinator: Coordinator | None = None,
    ) -> None:
        self.dispatcher = WebhookDispatcher(store, settings, guard, coordinator=coordinator)
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> WebhookDispatcher:
        self.task = asyncio.create_task(self.dispatcher.run(self.stop))
        return self.dispatcher

    async def __aexit__(self, *_: object) -> None:
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 10)


async def until(
    predicate: Callable[[], object], timeout_s: float = 10.0, interval_s: float = 0.02
) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(interval_s)


async def test_delivery_is_signed_per_standard_webhooks_and_a_structured_cloudevent(
    store: Store, receiver: Start
) -> None:
    """The standardwebhooks library verifies every request; the body parses with the CE SDK."""
    r = await receiver()
    hook = await register(store, r.url)
    await commit(store, [activity(i) for i in range(3)])
    async with Running(store):
        await until(lambda: len(r.received) == 3)
    for _, headers, body in r.received:
        lower = {k.lower(): v for k, v in headers.items()}
        Verifier(hook.secret).verify(body, lower)
        event = JSONFormat().read(CloudEvent, body)
        assert lower["webhook-id"] == event.get_id()
        assert lower["content-type"] == "application/cloudevents+json"
        assert event.get_type() == "com.constantcontact.email.open"


async def test_filters_and_start_point(store: Store, receiver: Start) -> None:
    """Only matching types are delivered, and only events committed after registration."""
    clicks, everything = await receiver(), await receiver()
    await commit(store, [activity(0, Kind.CLICK)])  # before registration: nobody gets it
    await register(store, clicks.url, ("com.constantcontact.email.click",))
    await register(store, everything.url)
    await commit(store, [activity(1, Kind.OPEN), activity(2, Kind.CLICK), activity(3, Kind.SEND)])
    async with Running(store):
        await until(lambda: len(everything.received) == 3 and len(clicks.received) == 1)
        await asyncio.sleep(0.2)
    types = [orjson.loads(b)["type"] for _, _, b in clicks.received]
    assert types == ["com.constantcontact.email.click"]
    assert len(everything.received) == 3


async def test_rotation_signs_with_both_secrets_during_grace(store: Store, receiver: Start) -> None:
    """While the previous secret is valid, either secret verifies the request."""
    r = await receiver()
    hook = await register(store, r.url)
    old = hook.secret
    rotated = replace(
        hook,
        secret=signing.generate_secret(),
        previous_secret=old,
        previous_expires_ms=int(time.time() * 1000) + 60_000,
    )
    await store.update_webhook(rotated)
    await commit(store, [activity(1)])
    async with Running(store):
        await until(lambda: len(r.received) == 1)
    _, headers, body = r.received[0]
    lower = {k.lower(): v for k, v in headers.items()}
    assert len(lower["webhook-signature"].split(" ")) == 2
    Verifier(old).verify(body, lower)
    Verifier(rotated.secret).verify(body, lower)


async def test_retries_follow_the_schedule_then_succeed(store: Store, receiver: Start) -> None:
    """500, 500, then 200: three attempts spaced by the schedule; the delivery ends delivered."""
    r = await receiver(answers=[500, 500])
    hook = await register(store, r.url)
    await commit(store, [activity(1)])
    async with Running(store):
        await until(lambda: len(r.received) == 3)
        await asyncio.sleep(0.2)
    gaps = [b[0] - a[0] for a, b in zip(r.received, r.received[1:], strict=False)]
    assert gaps[0] >= 0.05
    assert gaps[1] >= 0.1
    (delivery,) = await store.deliveries(hook.id, 10)
    assert (delivery.status, delivery.attempts) == ("delivered", 3)
    assert [a.status_code for a in await store.attempts(delivery.id)] == [500, 500, 200]
    assert (await store.webhook(hook.id)).failing_since_ms is None


async def test_retry_after_is_honoured(store: Store, receiver: Start) -> None:
    """A 429 with Retry-After: 1 waits a second, not the 50 ms the schedule says."""
    r = await receiver(answers=[429], retry_after="1")
    await register(store, r.url)
    await commit(store, [activity(1)])
    async with Running(store):
        await until(lambda: len(r.received) == 2, 5)
    assert r.received[1][0] - r.received[0][0] >= 0.95


async def test_gone_disables_the_endpoint_at_once(store: Store, receiver: Start) -> None:
    """410 Gone disables the webhook; nothing more is attempted."""
    r = await receiver(default=410)
    hook = await register(store, r.url)
    await commit(store, [activity(1), activity(2)])
    async with Running(store):
        await until(lambda: len(r.received) >= 1)
        await asyncio.sleep(0.5)
    stored = await store.webhook(hook.id)
    assert not stored.enabled
    assert "410" in (stored.disabled_reason or "")
    assert len(r.received) <= 2  # the two first attempts may already be in flight together


async def test_continuous_failure_disables_and_dead_letters_are_redeliverable(
    store: Store, receiver: Start
) -> None:
    """Out of attempts → dead; failing past disable_after_s → disabled; redeliver → delivered."""
    r = await receiver(default=500)
    hook = await register(store, r.url)
    await commit(store, [activity(1)])
    settings = replace(FAST, disable_after_s=0.2)
    async with Running(store, settings):
        await until(lambda: len(r.received) == 4)  # 1 + 3 retries
        await asyncio.sleep(0.3)
    (delivery,) = await store.deliveries(hook.id, 10)
    assert delivery.status == "dead"
    stored = await store.webhook(hook.id)
    assert not stored.enabled
    assert "failing continuously" in (stored.disabled_reason or "")
    r.default = 200
    await store.update_webhook(
        replace(stored, enabled=True, disabled_reason=None, failing_since_ms=None)
    )
    await store.redeliver(delivery.id, int(time.time() * 1000))
    async with Running(store, settings):
        await until(lambda: len(r.received) == 5)
        await asyncio.sleep(0.2)
    assert (await store.delivery(delivery.id)).status == "delivered"


async def test_a_failure_after_a_long_silence_does_not_disable_at_once(
    any_store: Store, receiver: Start
) -> None:
    """The failing clock was started 6 days ago by a failure before the relay stopped: one 503
    after the restart starts the clock again instead of disabling the endpoint (5 days) at
    once; the retry succeeds and everything is delivered."""
    store = any_store
    r = await receiver(answers=[503], default=204)
    hook = await register(store, r.url)
    settings = replace(FAST, retry_schedule_s=(0.2,), concurrency=1)
    now = int(time.time() * 1000)
    day = 86_400_000
    restart_ms = int(2 * settings.quiet_s * 1000)
    assert not await store.webhook_failed(hook.id, now - 6 * day, 5 * day, restart_ms)
    await commit(store, [activity(i) for i in range(3)])
    async with Running(store, settings) as dispatcher:
        await until(lambda: dispatcher.delivered == 3)
    stored = await store.webhook(hook.id)
    assert (stored.enabled, stored.disabled_reason, stored.failing_since_ms) == (True, None, None)
    deliveries = await store.deliveries(hook.id, 10)
    assert sorted((d.status, d.attempts) for d in deliveries) == [
        ("delivered", 1),
        ("delivered", 1),
        ("delivered", 2),
    ]


# the failing clock in compressed time: retries 0.1 s apart, a quiet period of 0.7 s (wait,
# timeout and refresh), so a silence of over 1.4 s restarts the clock; disabled after 1 s
COMPRESSED = replace(
    FAST,
    retry_schedule_s=(0.1,),
    max_retry_after_s=0.1,
    timeout_s=0.5,
    refresh_s=0.1,
    disable_after_s=1.0,
)


async def test_an_endpoint_failing_continuously_is_still_disabled(
    any_store: Store, receiver: Start
) -> None:
    """Failing on every attempt, retried every 0.1 s for 4 s: disabled after disable_after_s
    (the clock noted in the store once per quiet period, never restarted)."""
    settings = replace(COMPRESSED, retry_schedule_s=(0.1,) * 40)
    assert settings.quiet_s == pytest.approx(0.7)
    store = any_store
    r = await receiver(default=500)
    hook = await register(store, r.url)
    await commit(store, [activity(1)])
    started = time.monotonic()
    async with Running(store, settings):
        await until(lambda: len(r.received) >= 1)
        while (await store.webhook(hook.id)).enabled:
            assert time.monotonic() - started < 3.0, "not disabled in time"
            await asyncio.sleep(0.05)
    stored = await store.webhook(hook.id)
    assert "failing continuously" in (stored.disabled_reason or "")
    assert time.monotonic() - started >= 1.0


async def test_a_failure_after_an_idle_silence_restarts_the_clock(
    any_store: Store, receiver: Start
) -> None:
    """An event fails until dead-lettered, nothing is owed for 2 s (longer than the quiet
    period allows, and than disable_after_s), then the next event fails: the clock starts again
    at that failure instead of disabling the endpoint for a failure spanning the idle time."""
    store = any_store
    r = await receiver(default=500)
    hook = await register(store, r.url)
    await commit(store, [activity(1)])
    async with Running(store, COMPRESSED) as dispatcher:
        await until(lambda: dispatcher.failed_attempts == 2)  # dead
        first = (await store.webhook(hook.id)).failing_since_ms
        assert first is not None
        await asyncio.sleep(2.0)
        await commit(store, [activity(2)])
        await until(lambda: dispatcher.failed_attempts >= 3)
        await asyncio.sleep(0.3)  # its clock write
    stored = await store.webhook(hook.id)
    assert (stored.enabled, stored.disabled_reason) == (True, None)
    assert stored.failing_since_ms is not None
    assert stored.failing_since_ms >= first + 2000


async def test_recover_redelivers_since_a_time(store: Store, receiver: Start) -> None:
    """recover owes the endpoint every matching event committed since the given time."""
    r = await receiver()
    hook = await register(store, r.url)
    await commit(store, [activity(i) for i in range(4)])
    async with Running(store):
        await until(lambda: len(r.received) == 4)
    assert await store.recover(hook.id, 0, int(time.time() * 1000)) == 4
    async with Running(store):
        await until(lambda: len(r.received) == 8)
    ids = [h["webhook-id"] for _, h, _ in r.received]
    assert sorted(ids[:4]) == sorted(ids[4:])  # same webhook-id the second time


async def test_changes_told_to_the_dispatcher_act_at_once_not_at_its_refresh(
    store: Store, receiver: Start
) -> None:
    """With a 30 s refresh, a webhook registered while running and a redelivery, each followed
    by ``changed`` (as the admin API does), are delivered within a second."""
    settings = replace(FAST, refresh_s=30.0, idle_poll_s=30.0)
    r = await receiver()
    await commit(store, [activity(1)])  # committed before the webhook: not owed to it
    async with Running(store, settings) as dispatcher:
        await asyncio.sleep(0.2)  # the first refresh found no webhook
        hook = await register(store, r.url)
        dispatcher.changed(hook.id)
        await commit(store, [activity(2)])
        dispatcher.notify()
        await until(lambda: len(r.received) == 1, timeout_s=1.0)
        (delivery,) = await store.deliveries(hook.id, 10)
        await until(lambda: not dispatcher._workers[hook.id].held, timeout_s=1.0)
        await store.redeliver(delivery.id, int(time.time() * 1000))
        dispatcher.changed(hook.id)
        await until(lambda: len(r.received) == 2, timeout_s=1.0)
    ids = [h["webhook-id"] for _, h, _ in r.received]
    assert ids[0] == ids[1] == delivery.event_id


async def test_redirects_are_failures_not_followed(store: Store, receiver: Start) -> None:
    """A 302 is recorded as a failed attempt and the Location is never requested."""
    r = await receiver(answers=["redirect"])
    hook = await register(store, r.url)
    await commit(store, [activity(1)])
    async with Running(store):
        await until(lambda: len(r.received) == 2)
    assert all(body for _, _, body in r.received)  # both were POSTs to /hook, none to /elsewhere
    (delivery,) = await store.deliveries(hook.id, 10)
    first = (await store.attempts(delivery.id))[0]
    assert first.status_code == 302


async def test_an_unparsable_answer_is_recorded_and_logged_without_the_query_token(
    store: Store,
) -> None:
    """aiohttp names the request's URL when it cannot parse an answer: the attempt's error, as
    stored and as logged, says what was wrong but never shows the token in the URL's query."""

    async def not_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(not_http, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        hook = await register(store, f"http://127.0.0.1:{port}/hook?token=s3cr3t-t0ken")
        await commit(store, [activity(1)])
        with capture_logs() as logs:
            async with Running(store):
                await until(lambda: any(e["event"] == "webhook.attempt_failed" for e in logs))
    finally:
        server.close()
        await server.wait_closed()
    (delivery,) = await store.deliveries(hook.id, 10)
    error = (await store.attempts(delivery.id))[0].error or ""
    assert error.startswith("ClientResponseError: 400"), error
    assert "s3cr3t" not in error
    assert "s3cr3t" not in repr(logs)
    assert "s3cr3t" not in (delivery.last_error or "")


async def test_cookies_an_endpoint_sets_are_never_sent(store: Store, receiver: Start) -> None:
    """Deliveries are stateless: a Set-Cookie from an endpoint is sent back neither to it nor to
    another endpoint on the same host (both webhooks here), as a shared cookie jar would."""
    r = await receiver(set_cookie="session=abc123; Path=/")
    port = r.url.split(":")[2].split("/")[0]
    # a host name, not an IP literal: aiohttp's default jar keeps cookies only for names
    await register(store, f"http://localhost:{port}/hook")
    await register(store, f"http://localhost:{port}/other")
    await commit(store, [activity(1)])
    async with Running(store):
        await until(lambda: len(r.received) == 2)
        await commit(store, [activity(2)])
        await until(lambda: len(r.received) == 4)
    assert {h["Host"] for _, h, _ in r.received} == {f"localhost:{port}"}
    assert [h for _, h, _ in r.received if "Cookie" in h] == []


async def test_names_resolving_to_loopback_are_refused_at_connect_time(
    store: Store, receiver: Start
) -> None:
    """DNS rebinding: a webhook stored with a name that resolves to 127.0.0.1 is never called."""
    r = await receiver()
    port = r.url.split(":")[2].split("/")[0]
    hook = await register(store, f"http://localhost:{port}/hook")
    await commit(store, [activity(1)])
    async with Running(store, guard=Guard()):
        await asyncio.sleep(0.5)
    assert r.received == []
    (delivery,) = await store.deliveries(hook.id, 10)
    attempts = await store.attempts(delivery.id)
    assert attempts
    assert "loopback" in (attempts[0].error or "")


async def test_name_lookups_do_not_wait_for_the_default_executor(
    store: Store, receiver: Start
) -> None:
    """Every thread of the event loop's default executor is busy (lookups hanging elsewhere in
    the process: endpoints whose DNS hangs, the upstream client's; ``to_thread`` calls): a
    webhook whose host is a name is still delivered at once, its lookup on the resolver's own
    threads. (Lookups ran on the default executor's few threads, so a few endpoints whose DNS
    hung held up every endpoint's connections.)"""
    r = await receiver()
    port = r.url.split(":")[2].split("/")[0]
    await register(store, f"http://localhost:{port}/hook")
    await commit(store, [activity(1)])
    loop = asyncio.get_running_loop()
    release = threading.Event()
    busy = [loop.run_in_executor(None, release.wait, 30.0) for _ in range(40)]  # > 32 threads
    try:
        async with Running(store):
            await until(lambda: r.received, 3)
    finally:
        release.set()
        await asyncio.gather(*busy)


class LoopbackIsPublic(Guard):
    """The guard with loopback taken for a public address: the only address a test can reach,
    standing for a public one that is outside ``allow_networks``."""

    def check_ip(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, host: str) -> None:
        if not ip.is_loopback:
            super().check_ip(ip, host)


async def test_plain_http_goes_only_to_allowlisted_addresses_at_connect_time_too(
    any_store: Store, receiver: Start
) -> None:
    """https is required unless the destination is allowlisted, also when the name resolves to
    an address outside the allowlist only at delivery time (DNS changed, the allowlist shrank):
    no request is sent, the attempt is refused naming the rule. (The rule held at registration
    only: the signed events went out in clear text to any address the name came to resolve to.)"""
    store = any_store
    r = await receiver()
    port = r.url.split(":")[2].split("/")[0]
    url = await service.check_url(ALLOW_LOOPBACK, f"http://localhost:{port}/hook")  # allowlisted
    hook = await register(store, url)
    await commit(store, [activity(1)])
    async with Running(store, guard=LoopbackIsPublic()) as dispatcher:  # outside the allowlist
        await until(lambda: r.received or dispatcher.failed_attempts)
    assert r.received == []
    (delivery,) = await store.deliveries(hook.id, 10)
    error = (await store.attempts(delivery.id))[0].error or ""
    assert error.startswith("refused: url: https is required for localhost"), error
    assert "webhooks.allow_networks" in error


@pytest.mark.serial  # measures wall time: other workers would skew it
async def test_a_dead_and_a_failing_endpoint_do_not_slow_a_healthy_one(
    store: Store, receiver: Start
) -> None:
    """p99 latency (commit to receipt) of a healthy endpoint stays within 2x of alone.

    Alone and crowded (a hanging and a failing endpoint enabled beside it) alternate twice in
    one dispatcher run, 100 events each time, so a shared machine's changing load falls on both
    alike. The clock starts when the commit has returned and the dispatcher is told, as the
    poller does: the commit's own fsync is not delivery latency (its spikes under load made this
    flaky without saying anything about isolation).
    """
    settings = replace(FAST, timeout_s=5.0, retry_schedule_s=(0.05,) * 5)
    serial = iter(range(10_000, 20_000))
    await commit(store, [])
    stream_id = (await store.streams())[0].id
    healthy, dead, failing = (
        await receiver(),
        await receiver(default="hang"),
        await receiver(default=500),
    )
    await register(store, healthy.url)
    latencies: dict[bool, list[float]] = {False: [], True: []}
    others: list[Webhook] = []
    async with Running(store, settings) as dispatcher:
        for phase in range(4):
            crowded = phase % 2 == 1
            if phase == 1:
                others = [await register(store, dead.url), await register(store, failing.url)]
            for other in others[: len(others) if phase > 1 else 0]:
                await store.update_webhook(replace(other, enabled=crowded), ("enabled",))
            await asyncio.sleep(3 * settings.refresh_s)  # the workers follow
            for _ in range(100):
                before = len(healthy.received)
                now = int(time.time() * 1000)
                await store.commit_page(stream_id, [activity(next(serial))], now)
                committed = time.monotonic()
                dispatcher.notify()
                await until(lambda n=before: len(healthy.received) > n, interval_s=0.002)
                latencies[crowded].append(healthy.received[-1][0] - committed)
    assert dead.received
    assert failing.received
    baseline, crowded_p99 = (statistics.quantiles(latencies[c], n=100)[98] for c in (False, True))
    assert crowded_p99 <= max(2 * baseline, baseline + 0.05), (baseline, crowded_p99)


class CountingStore:
    """The real store, counting the reads a worker makes of its due deliveries."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.reads = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    async def due_sends(
        self,
        webhook_id: str,
        now_ms: int,
        limit: int,
        skip: Collection[int] = (),
        *,
        kinds: Collection[str],
    ) -> object:
        self.reads += 1
        return await self._store.due_sends(webhook_id, now_ms, limit, skip, kinds=kinds)

    async def next_due_ms(self, webhook_id: str, after_ms: int = -1, **kw: Any) -> int | None:
        self.reads += 1
        return await self._store.next_due_ms(webhook_id, after_ms, **kw)


async def test_pending_deliveries_of_a_rejected_kind_do_not_wake_the_worker(
    any_store: Store, receiver: Start, tmp_path: Path
) -> None:
    """20 opens pending for a clicks-only webhook (as a fan-out racing a filter edit could
    leave), due one every 100 ms: the worker, which never reads them, does not wake for them
    either (about one look after the change, none till its refresh; it used to be woken by
    each one's due time, for a read that left it out: two reads each)."""
    r = await receiver()
    await commit(any_store, [activity(i) for i in range(20)])
    hook = await register(any_store, r.url, ("com.constantcontact.email.click",))
    counting = CountingStore(any_store)
    async with Running(counting, replace(FAST, refresh_s=5.0)) as dispatcher:  # type: ignore[arg-type]
        await asyncio.sleep(0.3)  # the worker started (and dropped what its filter rejects)
        now = int(time.time() * 1000)
        await behind_the_store(
            any_store,
            tmp_path,
            "INSERT INTO deliveries (webhook_id, seq, event_id, status, next_attempt_ms,"  # noqa: S608
            f" created_ms) SELECT '{hook.id}', seq, event_id, 'pending', {now} + 100 * seq, 0"
            " FROM outbox",
        )
        dispatcher.changed(hook.id)  # one look now
        before = counting.reads
        await asyncio.sleep(2.5)
        reads = counting.reads - before
    assert reads <= 4, reads
    assert r.received == []


async def test_a_worker_whose_deliveries_are_all_in_flight_waits(
    store: Store, receiver: Start
) -> None:
    """Everything due is in flight at a hanging endpoint: the worker waits for a change instead
    of re-reading the store in a loop (about one look per refresh_s, not thousands a second; a
    look is two reads: what is due now, and when the next retry is)."""
    r = await receiver(default="hang")
    await register(store, r.url)
    await commit(store, [activity(1), activity(2)])
    counting = CountingStore(store)
    settings = replace(FAST, concurrency=4, timeout_s=3.0)
    async with Running(counting, settings):  # type: ignore[arg-type]
        await until(lambda: len(r.received) == 2)
        before = counting.reads
        await asyncio.sleep(1.0)
        reads = counting.reads - before
    assert reads <= 2 * (1.0 / settings.refresh_s) + 5, reads


async def test_rate_limit_spaces_attempts_across_concurrent_senders(
    store: Store, receiver: Start
) -> None:
    """rate_limit_per_s 20 with four senders: requests are spread at 50 ms (receipt times
    carry network jitter, hence the margins; senders sharing a slot arrive microseconds apart)."""
    r = await receiver()
    await register(store, r.url, rate_limit_per_s=20.0)
    await commit(store, [activity(i) for i in range(8)])
    async with Running(store, replace(FAST, concurrency=4)):
        await until(lambda: len(r.received) == 8)
    times = sorted(t for t, _, _ in r.received)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) >= 0.02, gaps
    assert times[-1] - times[0] >= 7 * 0.05 - 0.05, gaps


class Outage:
    """A database cut off from the replica: while ``cut`` is set, the store's fan-out and the
    coordinator's lease renewal hang (as a PostgreSQL store's calls do while it reconnects, for
    up to ``reconnect_max_s`` and longer than a lease) instead of failing."""

    def __init__(self) -> None:
        self.restored = asyncio.Event()
        self.restored.set()

    @property
    def cut(self) -> bool:
        return not self.restored.is_set()

    async def hang_while_cut(self) -> None:
        await self.restored.wait()


class CutStore:
    """The real store, whose fan-out hangs during an outage (every other call goes through:
    the attempts' records, the workers' reads)."""

    def __init__(self, store: Store, outage: Outage) -> None:
        self._store = store
        self._outage = outage

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    async def fanout(self, limit: int, now_ms: int) -> int:
        await self._outage.hang_while_cut()
        return await self._store.fanout(limit, now_ms)


class CutCoordinator(LocalCoordinator):
    """Grants every lease, for ``lease_s`` from the start of each renewal, as the PostgreSQL
    coordinator does while the database answers; renewals hang during an outage."""

    def __init__(self, store: Store, outage: Outage, lease_s: float) -> None:
        super().__init__(store, "replica-a", lease_s)
        self._outage = outage
        self.expires_at = 0.0  # monotonic time the leases granted so far run out

    async def hold(self, names: Sequence[str]) -> set[str]:
        asked = time.monotonic()
        await self._outage.hang_while_cut()
        if not self._outage.cut:  # an answer after the outage: the lease counts from now
            asked = max(asked, time.monotonic())
        self.expires_at = asked + self.lease_s
        return set(names)


async def test_workers_stop_on_time_when_their_leases_run_out_during_a_hanging_outage(
    store: Store, receiver: Start
) -> None:
    """Cut off from the database, with fan-out and lease renewal hanging instead of failing, a
    replica starts no attempt after its endpoint lease ran out (another replica may hold it by
    then), though its local queue is long; the attempts in flight at expiry (at most
    ``concurrency``) finish. When the database is back, the leases are held again and every
    event is delivered, once."""
    r = await receiver(delay_s=0.03)
    hook = await register(store, r.url)
    events = 150
    await commit(store, [activity(i) for i in range(events)])
    outage = Outage()
    coordinator = CutCoordinator(store, outage, lease_s=1.5)
    settings = replace(FAST, concurrency=2, refresh_s=0.2)
    cut = CutStore(store, outage)
    async with Running(cut, settings, coordinator=coordinator):  # type: ignore[arg-type]
        await until(lambda: len(r.received) >= 20)
        outage.restored.clear()
        try:
            expires_at = coordinator.expires_at
            at_cut = len(r.received)
            await asyncio.sleep(expires_at - time.monotonic() + 1.5)
            arrivals = [t for t, _, _ in r.received]
        finally:
            outage.restored.set()
        assert events - at_cut >= 100, "the endpoint is slow: a long queue is left at the cut"
        late = [round(t - expires_at, 3) for t in arrivals if t > expires_at]
        assert len(late) <= settings.concurrency, late
        in_cut = len(arrivals)
        await until(lambda: len({h["webhook-id"] for _, h, _ in r.received}) == events)
    assert len(await store.deliveries(hook.id, 2 * events, "delivered")) == events
    assert len(r.received) > in_cut
    ids = [h["webhook-id"] for _, h, _ in r.received]
    assert len(ids) == len(set(ids)), "a delivery was sent twice"


async def test_a_lease_shorter_than_the_refresh_is_renewed_in_time(
    store: Store, receiver: Start
) -> None:
    """With ``lease_s`` (1 s, the least allowed) under the refresh period, the leases are still
    renewed before they run out: the workers are never retired for an expired lease while the
    store answers."""
    r = await receiver(delay_s=0.02)
    await register(store, r.url)
    events = 120
    await commit(store, [activity(i) for i in range(events)])
    settings = replace(FAST, concurrency=2, refresh_s=1.0)
    coordinator = LocalCoordinator(store, "local", lease_s=1.0)
    with capture_logs() as logs:
        async with Running(store, settings, coordinator=coordinator):
            await until(lambda: len(r.received) >= events)
            await asyncio.sleep(0.5)
    assert [line for line in logs if line["event"] == "webhooks.leases_expired"] == []
    assert len(r.received) == events


class FailingDisable:
    """The real store, whose disable_webhook fails (the database refused the write)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    async def disable_webhook(self, webhook_id: str, reason: str, now_ms: int) -> None:
        raise StoreError("the database refused the write")


async def test_a_webhook_enabled_again_right_after_a_410_gets_its_deliveries(
    store: Store, receiver: Start
) -> None:
    """The worker that saw the 410 stops for good; enabled again before any periodic refresh
    (as the API does: it tells the dispatcher at once), a new worker delivers the rest."""
    r = await receiver(answers=[410])
    hook = await register(store, r.url)
    await commit(store, [activity(i) for i in range(3)])
    async with Running(store, replace(FAST, refresh_s=30.0, concurrency=1)) as dispatcher:
        for _ in range(250):
            if not (await store.webhook(hook.id)).enabled:
                break
            await asyncio.sleep(0.02)
        disabled = await store.webhook(hook.id)
        assert not disabled.enabled
        await store.update_webhook(replace(disabled, enabled=True, disabled_reason=None))
        dispatcher.changed(hook.id)
        await until(lambda: dispatcher.delivered == 3, 5)
    assert len(r.received) == 4


async def test_a_410_whose_disabling_write_failed_is_tried_again_not_left_stalled(
    store: Store, receiver: Start
) -> None:
    """The store still has the webhook enabled: the next refresh gives it a new worker, which
    delivers (the endpoint answers 2xx again) instead of the stopped one holding it for ever."""
    r = await receiver(answers=[410])
    await register(store, r.url)
    await commit(store, [activity(i) for i in range(3)])
    flaky = FailingDisable(store)
    async with Running(flaky, replace(FAST, concurrency=1)) as dispatcher:  # type: ignore[arg-type]
        await until(lambda: dispatcher.delivered == 3, 5)
    assert len(r.received) == 4


@pytest.mark.serial  # measures wall time: other workers would skew it
async def test_a_slow_rate_limit_does_not_hold_up_stopping(store: Store, receiver: Start) -> None:
    """Senders waiting 20 s for their slots (0.05/s) are woken by the stop: it takes well under
    a second, and none of them sends on its way out."""
    r = await receiver()
    await register(store, r.url, rate_limit_per_s=0.05)
    await commit(store, [activity(i) for i in range(6)])
    running = Running(store, replace(FAST, concurrency=4))
    async with running:
        await until(lambda: len(r.received) == 1)
        await asyncio.sleep(0.2)  # the other senders are waiting for their slots
        started = time.monotonic()
        running.stop.set()
        assert running.task is not None
        await asyncio.wait_for(asyncio.shield(running.task), 5)
        assert time.monotonic() - started < 1.0
    await asyncio.sleep(0.2)
    assert len(r.received) == 1


async def test_a_raised_rate_limit_applies_to_senders_already_waiting(
    store: Store, receiver: Start
) -> None:
    """Senders waiting for slots under 0.05/s reserve again when the limit goes to 1000/s."""
    r = await receiver()
    hook = await register(store, r.url, rate_limit_per_s=0.05)
    await commit(store, [activity(i) for i in range(6)])
    async with Running(store, replace(FAST, concurrency=4)) as dispatcher:
        await until(lambda: len(r.received) == 1)
        await asyncio.sleep(0.2)
        await store.update_webhook(replace(await store.webhook(hook.id), rate_limit_per_s=1000.0))
        dispatcher.changed(hook.id)
        await until(lambda: len(r.received) == 6, 3)


def answering(status: int, body: bytes, *, delay_s: float = 0.0) -> Handler:
    """A receiver's handler: every request answered ``status`` with ``body``."""

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        if delay_s:
            await asyncio.sleep(delay_s)
        return web.Response(status=status, body=body)

    return handle


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def serve(
    aiohttp_server: Callable[..., Awaitable[TestServer]], handler: Handler
) -> tuple[str, list[float]]:
    """A receiver on a free loopback port running ``handler``: its URL and its arrival times."""
    arrivals: list[float] = []

    async def counted(request: web.Request) -> web.StreamResponse:
        arrivals.append(time.monotonic())
        return await handler(request)

    app = web.Application()
    app.router.add_post("/{tail:.*}", counted)
    server = await aiohttp_server(app)
    return str(server.make_url("/hook")), arrivals


async def test_a_nul_in_a_response_is_recorded_not_a_resend_loop(
    any_store: Store, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    """An endpoint answering 200 with a NUL byte in its body: the excerpt is stored with U+FFFD
    in its place (PostgreSQL text refuses NUL: the batch of attempt records failed and every
    attempt in it was made due again at once, a resend loop for every endpoint in the batch).
    Each event reaches each endpoint once."""
    nul_url, nul_hits = await serve(aiohttp_server, answering(200, b"ok\x00!"))
    ok_url, ok_hits = await serve(aiohttp_server, answering(200, b"ok"))
    nul_hook = await register(any_store, nul_url)
    ok_hook = await register(any_store, ok_url)
    await commit(any_store, [activity(i) for i in range(10)])
    async with Running(any_store) as dispatcher:
        await until(lambda: dispatcher.delivered >= 20)
        await asyncio.sleep(0.5)  # a resend loop would show here
    assert (len(nul_hits), len(ok_hits)) == (10, 10)
    for hook in (nul_hook, ok_hook):
        deliveries = await any_store.deliveries(hook.id, 100)
        assert {(d.status, d.attempts) for d in deliveries} == {("delivered", 1)}
    [attempt] = await any_store.attempts((await any_store.deliveries(nul_hook.id, 1))[0].id)
    assert attempt.response_excerpt == "ok\ufffd!"


class RefusingRecords:
    """The real store, refusing (as PostgreSQL refused a NUL) every batch of attempt records
    that holds one of the ``refused`` deliveries' records."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.refused: set[int] = set()

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    async def finish_attempts(self, results: Sequence[tuple[Attempt, str, int, int]]) -> None:
        if any(a.delivery_id in self.refused for a, _, _, _ in results):
            raise StoreError("invalid byte sequence for encoding UTF8: 0x00")
        await self._store.finish_attempts(results)


async def test_a_record_the_store_refuses_backs_off_and_spares_the_rest_of_its_batch(
    store: Store, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    """One attempt record the store cannot write: the others of its batch are written one by
    one (delivered, sent once), and its delivery is held for a backoff (1 s, then 2 s, ...)
    before it is sent again, instead of being due again at once (a tight resend loop)."""
    url, hits = await serve(aiohttp_server, answering(200, b"ok"))
    hook = await register(store, url)
    await commit(store, [activity(i) for i in range(10)])
    await store.fanout(100, int(time.time() * 1000))
    refusing = RefusingRecords(store)
    poisoned = min(d.id for d in await store.deliveries(hook.id, 100))
    refusing.refused.add(poisoned)
    async with Running(refusing, replace(FAST, concurrency=10)):  # type: ignore[arg-type]
        await until(lambda: len(hits) >= 10)
        await asyncio.sleep(2.0)
        delivered = await store.deliveries(hook.id, 100, "delivered")
        assert len(delivered) == 9
        # the refused one: sent first, then after 1 s and after 2 more (not yet)
        assert 10 <= len(hits) <= 11, len(hits)
        refusing.refused.clear()
        await until(lambda: len(hits) == 12, timeout_s=5.0)
        await asyncio.sleep(0.2)
    assert (await store.delivery(poisoned)).status == "delivered"
    assert len(hits) == 12


class RefusingAllRecords:
    """The real store, refusing every attempt record once ``attempted`` says so: the first
    batch waits for that, so the records of every attempt are written in at most two batches."""

    def __init__(self, store: Store, attempted: Callable[[], bool]) -> None:
        self._store = store
        self._attempted = attempted

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    async def finish_attempts(self, results: Sequence[tuple[Attempt, str, int, int]]) -> None:
        await until(self._attempted)
        raise StoreError("invalid byte sequence for encoding UTF8: 0x00")


async def test_the_store_refusing_records_is_logged_naming_their_webhooks(
    store: Store, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    """A batch of attempt records the store refuses is logged with the distinct webhooks it
    holds, and each record refused on its own with its webhook (neither named one)."""
    served = [await serve(aiohttp_server, answering(200, b"ok")) for _ in range(2)]
    hooks = [await register(store, url) for url, _ in served]
    await commit(store, [activity(i) for i in range(2)])
    await store.fanout(100, int(time.time() * 1000))
    owner = {d.id: h.id for h in hooks for d in await store.deliveries(h.id, 10)}
    refusing = RefusingAllRecords(store, lambda: sum(len(hits) for _, hits in served) >= 4)
    with capture_logs() as logs:
        async with Running(refusing):  # type: ignore[arg-type]
            await until(lambda: any(x["event"] == "webhook.record_refused" for x in logs))
    batches = [x for x in logs if x["event"] == "webhook.store_error" and "attempts" in x]
    named = [name for x in batches for name in x.get("webhooks", [])]
    assert sum(x["attempts"] for x in batches) >= 4  # every attempt, in one batch or two
    assert set(named) == {h.id for h in hooks}
    assert all(len(x["webhooks"]) == len(set(x["webhooks"])) for x in batches)  # distinct
    refused = [x for x in logs if x["event"] == "webhook.record_refused"]
    assert all(x.get("webhook") == owner[x["delivery"]] for x in refused)


def test_a_batch_names_a_bounded_number_of_webhooks() -> None:
    """A batch of records of many webhooks names the first few and counts the rest."""
    assert _webhooks_named([f"wh_{i % 30}" for i in range(90)]) == [
        *(f"wh_{i}" for i in range(10)),
        "... 20 more",
    ]
    assert _webhooks_named(["wh_1", "wh_0", "wh_1"]) == ["wh_1", "wh_0"]


class CrashingOnce(WebhookDispatcher):
    """A dispatcher whose first attempt raises what no handler expects (a bug, or an answer
    nobody thought of): the sender task must not end with it."""

    crashed = False

    async def _attempt(self, *args: Any, **kwargs: Any) -> Outcome:
        if not self.crashed:
            self.crashed = True
            raise RuntimeError("unexpected")
        return await super()._attempt(*args, **kwargs)


async def test_an_attempt_that_raises_is_a_failed_attempt_and_the_sender_lives_on(
    store: Store, receiver: Start
) -> None:
    """With one sender (concurrency 1), an attempt raising an unexpected exception is recorded
    as failed and retried: the delivery and the next events are delivered (the sender task
    used to end, holding its delivery for ever: nothing was sent again)."""
    r = await receiver()
    hook = await register(store, r.url)
    await commit(store, [activity(i) for i in range(3)])
    dispatcher = CrashingOnce(store, replace(FAST, concurrency=1), ALLOW_LOOPBACK)
    stop = asyncio.Event()
    with capture_logs() as logs:
        task = asyncio.create_task(dispatcher.run(stop))
        try:
            await until(lambda: dispatcher.delivered == 3)
        finally:
            stop.set()
            await asyncio.wait_for(task, 10)
    deliveries = await store.deliveries(hook.id, 10)
    errors = [a.error for d in deliveries for a in await store.attempts(d.id)]
    assert "internal error: RuntimeError: unexpected" in errors
    assert [line["event"] for line in logs if line["log_level"] == "error"] == [
        "webhook.attempt_crashed"
    ]


async def test_a_retry_after_float_refuses_does_not_end_the_sender(
    store: Store, receiver: Start
) -> None:
    """503 with ``Retry-After: ²`` (str.isdigit says yes, float says no) is an ordinary failed
    attempt, retried on the schedule; the sender lives on."""
    r = await receiver(answers=[503, 503], retry_after="\u00b2")
    hook = await register(store, r.url)
    await commit(store, [activity(1)])
    async with Running(store, replace(FAST, concurrency=1)) as dispatcher:
        await until(lambda: dispatcher.delivered == 1)
    (delivery,) = await store.deliveries(hook.id, 10)
    assert [a.status_code for a in await store.attempts(delivery.id)] == [503, 503, 200]


async def test_a_delivery_in_flight_is_not_sent_again_by_a_later_worker(
    store: Store, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    """Disabled and enabled twice while its only attempt hangs at a slow endpoint: every worker
    of the webhook (the stopped ones finishing their attempts, the new one) shares one held
    set, so none sends the delivery in flight a second time."""
    in_flight = 0
    most = 0

    async def slow(request: web.Request) -> web.StreamResponse:
        nonlocal in_flight, most
        await request.read()
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(2.0)
        in_flight -= 1
        return web.Response(text="ok")

    url, hits = await serve(aiohttp_server, slow)
    hook = await register(store, url)
    await commit(store, [activity(1)])
    async with Running(store, replace(FAST, timeout_s=10.0)) as dispatcher:
        await until(lambda: len(hits) == 1)
        for enabled in (False, True, False, True):
            stored = await store.webhook(hook.id)
            await store.update_webhook(replace(stored, enabled=enabled), ("enabled",))
            dispatcher.changed(hook.id)
            await asyncio.sleep(0.3)
        await until(lambda: dispatcher.delivered == 1)
        await asyncio.sleep(0.5)
    assert (len(hits), most) == (1, 1)
    (delivery,) = await store.deliveries(hook.id, 10)
    assert (delivery.status, delivery.attempts) == ("delivered", 1)


async def test_a_narrowed_filter_stops_the_deliveries_it_rejects_queued_ones_included(
    any_store: Store, receiver: Start
) -> None:
    """An edit narrowing event_types while the worker has deliveries of the dropped kind queued
    behind a slow attempt: that attempt finishes and is recorded, none of the queued ones of
    the dropped kind is sent afterwards, the kinds still wanted are, and the store keeps no
    trace of the rest."""
    r = await receiver(delay_s=0.3)
    hook = await register(any_store, r.url)
    await commit(any_store, [*(activity(i) for i in range(3)), activity(9, Kind.CLICK)])
    async with Running(any_store, replace(FAST, concurrency=1)) as dispatcher:
        await until(lambda: len(r.received) == 1)  # the first open is in flight, the rest queued
        now = int(time.time() * 1000)  # the edit's time, as the service writes it
        narrowed = replace(hook, event_types=("com.constantcontact.email.click",), updated_ms=now)
        await any_store.update_webhook(narrowed, ["event_types", "updated_ms"])
        dispatcher.changed(hook.id, narrowed)  # as the admin API's PATCH does
        await until(lambda: dispatcher.delivered == 2)
        await asyncio.sleep(0.5)
    types = [orjson.loads(b)["type"].rsplit(".", 1)[1] for _, _, b in r.received]
    assert types == ["open", "click"]
    left = await any_store.deliveries(hook.id, 10)
    assert [d.status for d in left] == ["delivered", "delivered"]  # the click, the first open


class GatedRecords:
    """The real store, whose attempt records wait for ``gate`` (a store slow to write them, or
    the recorder's linger stretched): an edit can come between an attempt and its record."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.gate = asyncio.Event()
        self.waiting = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    async def finish_attempts(self, results: Sequence[tuple[Attempt, str, int, int]]) -> None:
        self.waiting += 1
        await self.gate.wait()
        await self._store.finish_attempts(results)


@pytest.mark.parametrize("status", [200, 503])
async def test_an_attempt_recorded_after_a_filter_edit_rejecting_its_kind_is_kept(
    any_store: Store, aiohttp_server: Callable[..., Awaitable[TestServer]], status: int
) -> None:
    """An open's attempt done, its record not yet written (the recorder lingers), when a PATCH
    (the service, as the API calls it) narrows the filter to clicks: a 200 is recorded, the
    delivery delivered with its attempt in the history; a 503 is recorded too, and the open,
    no longer wanted, is then dropped, never sent again. (The edit deleted the pending open,
    so the record found nothing: a delivery the endpoint received vanished from its history.)"""
    url, hits = await serve(aiohttp_server, answering(status, b"ok"))
    hook = await register(any_store, url)
    await commit(any_store, [activity(1)])
    gated = GatedRecords(any_store)
    async with Running(gated) as dispatcher:  # type: ignore[arg-type]
        await until(lambda: gated.waiting == 1)  # the attempt is done, its record waits
        changes = service.WebhookChanges(event_types=("com.constantcontact.email.click",))
        edited = await service.update_webhook(
            any_store, ALLOW_LOOPBACK, hook.id, changes, int(time.time() * 1000)
        )
        dispatcher.changed(hook.id, edited)  # as the admin API's PATCH does
        gated.gate.set()
        await asyncio.sleep(0.5)  # the record, then the worker's look (refresh_s 0.1)
    assert len(hits) == 1
    if status == 200:
        (delivery,) = await any_store.deliveries(hook.id, 10)
        assert (delivery.status, delivery.attempts) == ("delivered", 1)
        (attempt,) = await any_store.attempts(delivery.id)
        assert attempt.status_code == 200
    else:
        assert await any_store.deliveries(hook.id, 10) == []


async def test_redelivered_deliveries_of_a_kind_the_filter_rejects_never_starve_the_rest(
    any_store: Store, receiver: Start
) -> None:
    """600 opens delivered, the filter narrowed to clicks, every open redelivered (as an
    operator would through the API): the redeliveries are refused, and clicks committed next
    arrive. (Made pending, the opens were never sent nor dead-lettered, and as the oldest due
    they filled every 512-row read, so no click was ever fetched.)"""
    r = await receiver(default=204)
    hook = await register(any_store, r.url)
    await commit(any_store, [activity(i) for i in range(600)])
    async with Running(any_store, replace(FAST, concurrency=8)) as dispatcher:
        await until(lambda: dispatcher.delivered == 600, timeout_s=30)
        # the last records written (a store has no event to wait on)
        while await any_store.deliveries(hook.id, 1, "pending"):  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        narrowed = replace(hook, event_types=("com.constantcontact.email.click",))
        await any_store.update_webhook(narrowed, ["event_types"])
        dispatcher.changed(hook.id, narrowed)
        now = int(time.time() * 1000)
        ids = [d.id for d in await any_store.deliveries(hook.id, 1000)]
        outcomes = [
            await asyncio.gather(any_store.redeliver(i, now), return_exceptions=True) for i in ids
        ]
        dispatcher.changed(hook.id)
        await asyncio.sleep(0.3)
        r.received.clear()
        await commit(any_store, [activity(1000 + i, Kind.CLICK) for i in range(5)])
        dispatcher.notify()
        await until(lambda: len(r.received) == 5, timeout_s=5)
    types = {orjson.loads(b)["type"] for _, _, b in r.received}
    assert types == {"com.constantcontact.email.click"}
    refused = [o for (o,) in outcomes if isinstance(o, UnwantedError)]
    assert len(refused) == len(ids) == 600
    assert await any_store.deliveries(hook.id, 10, "pending") == []


async def test_pending_deliveries_of_a_rejected_kind_left_by_an_older_relay_are_dropped(
    any_store: Store, receiver: Start, tmp_path: Path
) -> None:
    """A store where an older relay left 600 opens pending (redelivered after the filter was
    narrowed to clicks): the worker reads only clicks, so the clicks committed next arrive, and
    it drops the opens when it starts, as a filter edit does; nothing stays pending."""
    r = await receiver(default=204)
    hook = await register(any_store, r.url, ("com.constantcontact.email.click",))
    await commit(any_store, [activity(i) for i in range(1200)])
    await any_store.fanout(2000, T0)  # none of them: opens
    await behind_the_store(  # what the old redeliver of them left: opens pending, due
        any_store,
        tmp_path,
        "INSERT INTO deliveries (webhook_id, seq, event_id, status, next_attempt_ms, created_ms)"
        " SELECT (SELECT id FROM webhooks), seq, event_id, 'pending', 0, 0 FROM outbox",
    )
    assert len(await any_store.deliveries(hook.id, 2000, "pending")) == 1200
    await commit(any_store, [activity(2000 + i, Kind.CLICK) for i in range(5)])
    async with Running(any_store, replace(FAST, concurrency=8)) as dispatcher:
        await until(lambda: len(r.received) == 5, timeout_s=5)
        await asyncio.sleep(0.3)
    types = {orjson.loads(b)["type"] for _, _, b in r.received}
    assert types == {"com.constantcontact.email.click"}
    assert dispatcher.delivered == 5
    assert await any_store.deliveries(hook.id, 10, "pending") == []


async def test_a_redelivery_while_the_last_attempt_is_in_flight_is_not_undone(
    store: Store, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    """Redeliver (as the API does) while the delivery's last scheduled attempt hangs: when that
    attempt fails, the delivery stays pending with its fresh budget (it used to end dead, as
    the sender computed from the count it read) and is sent again."""
    answered: list[int] = []
    in_flight = asyncio.Event()

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        answered.append(len(answered) + 1)
        if len(answered) == 2:  # the last scheduled attempt: slow, then a failure
            in_flight.set()
            await asyncio.sleep(1.0)
            return web.Response(status=500)
        return web.Response(status=500 if len(answered) == 1 else 200)

    url, hits = await serve(aiohttp_server, handle)
    hook = await register(store, url)
    await commit(store, [activity(1)])
    async with Running(store, replace(FAST, retry_schedule_s=(0.05,))) as dispatcher:
        await asyncio.wait_for(in_flight.wait(), 10)
        (delivery,) = await store.deliveries(hook.id, 10)
        answer = await store.redeliver(delivery.id, int(time.time() * 1000))
        dispatcher.changed(hook.id)
        assert (answer.status, answer.attempts) == ("pending", 0)
        await until(lambda: dispatcher.delivered == 1, timeout_s=5.0)
    final = await store.delivery(delivery.id)
    assert (final.status, final.attempts, len(hits)) == ("delivered", 1, 3)
    assert len(await store.attempts(delivery.id)) == 3


@pytest.mark.parametrize("reset", ["redeliver", "recover"])
async def test_a_reset_during_the_first_attempt_is_not_undone(
    any_store: Store, aiohttp_server: Callable[..., Awaitable[TestServer]], reset: str
) -> None:
    """Redeliver or recover (as the API does) while a delivery's FIRST attempt hangs: when that
    attempt fails (503, Retry-After an hour), the delivery stays pending, attempts 0, due now,
    and is sent again. (The reset used to be recognised by the attempt count, which it sets back
    to 0, the count a first attempt read: that attempt's retry in an hour overwrote the reset.)"""
    store = any_store

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        await asyncio.sleep(1.0)
        return web.Response(status=503, headers={"Retry-After": "3600"})

    url, hits = await serve(aiohttp_server, handle)
    hook = await register(store, url)
    await commit(store, [activity(1)])
    async with Running(store, replace(FAST, timeout_s=5.0)) as dispatcher:
        await until(lambda: len(hits) == 1)
        await asyncio.sleep(0.3)  # the first attempt is in flight
        (delivery,) = await store.deliveries(hook.id, 10)
        reset_ms = int(time.time() * 1000)
        if reset == "redeliver":
            await store.redeliver(delivery.id, reset_ms)
        else:
            assert await store.recover(hook.id, 0, reset_ms) == 1
        dispatcher.changed(hook.id)
        for _ in range(100):  # until the first attempt is recorded (the second takes 1 s)
            if await store.attempts(delivery.id):
                break
            await asyncio.sleep(0.02)
        settled = await store.delivery(delivery.id)
        assert (settled.status, settled.attempts) == ("pending", 0)
        assert settled.next_attempt_ms == reset_ms  # due now, not in an hour
        await until(lambda: len(hits) == 2, timeout_s=5.0)
    assert len(await store.attempts(delivery.id)) >= 1


@pytest.mark.parametrize("answer", [200, 500])
async def test_a_delivery_reset_while_in_flight_is_sent_again_without_waiting_for_the_refresh(
    any_store: Store, aiohttp_server: Callable[..., Awaitable[TestServer]], answer: int
) -> None:
    """Redelivered (as the API does) while its attempt hangs, refresh_s 5 s: once that attempt
    is recorded (a 200 or a 500; the reset keeps the delivery pending, due now) the worker
    reads it again at once, not at its next periodic look. (The change's wake-up came while
    the delivery was held, so the read left it out, and nothing woke the worker when the
    record let go of it: the resend waited for the refresh.)"""
    store = any_store
    handler = answering(answer, b"", delay_s=1.0)
    url, hits = await serve(aiohttp_server, handler)
    hook = await register(store, url)
    await commit(store, [activity(1)])
    async with Running(store, replace(FAST, refresh_s=5.0, timeout_s=5.0)) as dispatcher:
        await until(lambda: len(hits) == 1)
        (delivery,) = await store.deliveries(hook.id, 10)
        await store.redeliver(delivery.id, int(time.time() * 1000))
        dispatcher.changed(hook.id)
        told = time.monotonic()
        await until(lambda: len(hits) == 2, timeout_s=8.0)
        assert hits[1] - told < 2.5, hits[1] - told  # the attempt's 1 s, then at once
        await until(lambda: dispatcher.delivered + dispatcher.failed_attempts >= 2)


class Malformed:
    """A raw TCP endpoint answering with a malformed status line."""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(b"HTTP/1.1 2OO OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()


async def test_an_error_text_never_carries_the_url_and_its_token(store: Store) -> None:
    """aiohttp's ClientResponseError (here: a malformed status line) says the URL in its str():
    the stored, listed and logged error is built from its status and message only."""
    server = await asyncio.start_server(Malformed().handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    url = f"http://alice:S3cretPassw0rd@127.0.0.1:{port}/hook?token=TopSecretToken123"
    hook = await register(store, url)
    await commit(store, [activity(1)])
    try:
        with capture_logs() as logs:
            async with Running(store, replace(FAST, retry_schedule_s=(60.0,))):
                await until(lambda: dispatcher_attempted(logs))
    finally:
        server.close()
        await server.wait_closed()
    (delivery,) = await store.deliveries(hook.id, 10)
    [attempt] = await store.attempts(delivery.id)
    logged = [str(line.get("error")) for line in logs]
    for text in (delivery.last_error or "", attempt.error or "", *logged):
        assert "S3cretPassw0rd" not in text
        assert "TopSecretToken123" not in text
        assert "127.0.0.1" not in text
    assert (attempt.error or "").startswith("ClientResponseError: 400, ")


class StalledBody:
    """A raw TCP endpoint answering each request ``200 OK`` with ``Content-Length: 10``, then
    nothing: the status is in, the body never comes."""

    def __init__(self) -> None:
        self.requests = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        self.requests += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        await writer.drain()
        with contextlib.suppress(ConnectionError):
            await reader.read()  # silence until the client hangs up
        writer.close()


async def test_a_2xx_whose_body_stalls_is_delivered_not_timed_out_and_resent(
    store: Store,
) -> None:
    """The status line and headers of a 200 arrive, the body never does: the attempt is a
    success with status 200 and an empty excerpt, within the excerpt's own wait (1 s), not the
    request's timeout; one request. (The body was read under the whole request's timeout: the
    attempt was recorded as a timeout, its status thrown away, and the event sent again.)"""
    endpoint = StalledBody()
    server = await asyncio.start_server(endpoint.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    hook = await register(store, f"http://127.0.0.1:{port}/hook")
    await commit(store, [activity(1)])
    try:
        async with Running(store, replace(FAST, timeout_s=3.0)) as dispatcher:
            await until(lambda: dispatcher.delivered + dispatcher.failed_attempts > 0, 6)
            await asyncio.sleep(0.3)  # a resend would show here
    finally:
        server.close()
        await server.wait_closed()
    (delivery,) = await store.deliveries(hook.id, 10)
    assert (delivery.status, delivery.attempts, delivery.last_status) == ("delivered", 1, 200)
    [attempt] = await store.attempts(delivery.id)
    assert (attempt.status_code, attempt.response_excerpt, attempt.error) == (200, "", None)
    assert 900 <= attempt.latency_ms < 2000, attempt.latency_ms
    assert (dispatcher.delivered, dispatcher.failed_attempts, endpoint.requests) == (1, 0, 1)


@pytest.mark.parametrize("status", [200, 410])
async def test_an_answer_whose_body_breaks_off_keeps_its_status(
    any_store: Store, aiohttp_server: Callable[..., Awaitable[TestServer]], status: int
) -> None:
    """A real aiohttp endpoint sends the status line and headers, then its handler crashes and
    the connection closes before the body it announced: the status stands (a 200 is delivered,
    once; a 410 disables the endpoint). (The cut body's ClientPayloadError threw the status
    away: the 200 was recorded as a failed attempt without a status and sent again until
    dead-lettered, the 410 never disabled anything.)"""
    store = any_store
    requests: list[int] = []

    async def crashing(request: web.Request) -> web.StreamResponse:
        await request.read()
        requests.append(1)
        answer = web.StreamResponse(status=status)
        answer.content_length = 100
        await answer.prepare(request)
        await asyncio.sleep(0.05)  # the headers are out and the client waits for the body
        raise RuntimeError("the endpoint's handler failed after its headers")

    app = web.Application()
    app.router.add_post("/hook", crashing)
    server = await aiohttp_server(app)
    hook = await register(store, str(server.make_url("/hook")))
    await commit(store, [activity(1)])
    async with Running(store) as dispatcher:
        await until(lambda: dispatcher.delivered + dispatcher.failed_attempts > 0)
        await asyncio.sleep(0.4)  # a resend would show here (the schedule's first wait: 50 ms)
    (delivery,) = await store.deliveries(hook.id, 10)
    [attempt, *_] = await store.attempts(delivery.id)
    assert (attempt.status_code, attempt.error) == (status, None)
    if status == 200:
        assert (delivery.status, delivery.attempts, len(requests)) == ("delivered", 1, 1)
    else:
        assert not (await store.webhook(hook.id)).enabled


def dispatcher_attempted(logs: list[dict[str, Any]]) -> bool:
    return any(line["event"] == "webhook.attempt_failed" for line in logs)


LONG_WAIT = replace(FAST, retry_schedule_s=(36_000.0, 0.05), concurrency=1)  # a 10 h first wait


async def test_a_webhook_enabled_again_resumes_its_waiting_retries_at_once(
    any_store: Store, receiver: Start
) -> None:
    """A delivery failed once and waits 10 h for its retry; the webhook is disabled, then
    enabled again through the service (as PATCH does): the retry is sent at once, its attempt
    count kept."""
    store = any_store
    r = await receiver(answers=[500], default=200)
    hook = await register(store, r.url)
    await commit(store, [activity(1)])
    async with Running(store, LONG_WAIT) as dispatcher:
        await until(lambda: dispatcher.failed_attempts == 1)
        await until(lambda: not dispatcher._workers[hook.id].held)  # its 10 h wait recorded
        now = int(time.time() * 1000)
        off = service.WebhookChanges(enabled=False)
        await service.update_webhook(store, ALLOW_LOOPBACK, hook.id, off, now)
        dispatcher.changed(hook.id)
        on = service.WebhookChanges(enabled=True)
        await service.update_webhook(store, ALLOW_LOOPBACK, hook.id, on, now + 1)
        dispatcher.changed(hook.id)
        await until(lambda: dispatcher.delivered == 1, timeout_s=5.0)
    (delivery,) = await store.deliveries(hook.id, 10)
    assert (delivery.status, delivery.attempts) == ("delivered", 2)


async def test_a_new_url_starts_a_fresh_failing_clock_and_gets_the_waiting_retries_now(
    any_store: Store, receiver: Start
) -> None:
    """The old URL has failed for disable_after_s and one delivery waits 10 h for its retry;
    moved to a new URL (PATCH url), whose first answer is a 500: that failure starts a fresh
    clock instead of disabling the webhook, and both deliveries reach the new URL at once."""
    store = any_store
    old, new = await receiver(default=500), await receiver(answers=[500], default=200)
    hook = await register(store, old.url)
    await commit(store, [activity(1)])
    async with Running(store, LONG_WAIT) as dispatcher:
        await until(lambda: dispatcher.failed_attempts == 1)
    assert (await store.deliveries(hook.id, 10))[0].attempts == 1  # its 10 h wait recorded
    now = int(time.time() * 1000)
    day = 86_400_000
    # failing for 5 days (disable_after_s), its last failure just now: one more disables it
    failing = replace(
        await store.webhook(hook.id), failing_since_ms=now - 5 * day, last_failure_ms=now
    )
    await store.update_webhook(failing, ("failing_since_ms", "last_failure_ms"))
    moved = service.WebhookChanges(url=new.url)
    await service.update_webhook(store, ALLOW_LOOPBACK, hook.id, moved, now)
    assert (await store.webhook(hook.id)).failing_since_ms is None
    await commit(store, [activity(2)])
    async with Running(store, LONG_WAIT) as dispatcher:
        await until(lambda: dispatcher.delivered == 2, timeout_s=5.0)
    stored = await store.webhook(hook.id)
    assert (stored.enabled, stored.disabled_reason, stored.failing_since_ms) == (True, None, None)
    assert len(old.received) == 1
