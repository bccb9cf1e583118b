"""Webhook delivery: fan the outbox out to registered endpoints and deliver, signed, with retries.

Each committed event becomes one *delivery* per enabled webhook whose filters match (fan-out is
one store transaction that also moves the fan-out cursor). Every webhook has its own worker with
its own concurrency limit and optional rate limit, so a slow, failing or dead endpoint only ever
holds its own slots: it never delays another endpoint.

An attempt POSTs the structured-mode CloudEvent with Standard Webhooks headers (``webhook-id`` is
the event id, stable across retries). 2xx is success; anything else, redirects included (never
followed), is a failure retried on a schedule with jitter (``Retry-After`` on 429/503 is honoured
within bounds). 410 Gone disables the endpoint at once; an endpoint failing continuously for
``disable_after_s`` is disabled (a silence without failed attempts longer than the retry
schedule allows restarts that clock); a delivery out of attempts is dead-lettered (visible and
redeliverable through the admin API). A crash mid-attempt leaves the delivery pending, so it is
sent again: at least once, duplicates with the same ``webhook-id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import heapq
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC
from typing import NamedTuple
from urllib.parse import urlsplit

import aiohttp
import structlog

from relay.metrics import Metrics
from relay.sinks import signing
from relay.sinks.ssrf import Guard, GuardedConnector, SsrfError, shown
from relay.store import (
    Attempt,
    DueSend,
    Store,
    StoreError,
    UnavailableError,
    Webhook,
    rowmap,
)
from relay.store.coordination import Coordinator, LocalCoordinator

log = structlog.get_logger(__name__)

DEFAULT_SCHEDULE_S = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
CONTENT_TYPE = "application/cloudevents+json"
TALLY_S = 0.05  # settled attempts reach the metrics in batches, at most this late
EXCERPT_WAIT_S = 1.0  # for a response body not there with the headers (the status is known)
LOG_WEBHOOKS_MAX = 10  # webhooks a log line about a batch names (a batch may hold hundreds)


@dataclass(frozen=True, slots=True)
class DeliverySettings:
    """How webhooks are delivered."""

    retry_schedule_s: tuple[float, ...] = DEFAULT_SCHEDULE_S  # waits after attempt 1, 2, …
    jitter: float = 0.1  # each wait is scaled by a random factor in [1 - jitter, 1 + jitter]
    timeout_s: float = 15.0
    connect_timeout_s: float = 15.0
    max_retry_after_s: float = 3600.0
    response_cap_bytes: int = 4096  # read at most this much of a response
    excerpt_chars: int = 512  # stored per attempt
    concurrency: int = 4  # in-flight attempts per endpoint
    disable_after_s: float = 5 * 86400.0
    fanout_batch: int = 1000
    fetch_batch: int = 512  # due deliveries read per store query, per endpoint
    idle_poll_s: float = 0.2  # fan-out without a commit notice (events appended by replays)
    refresh_s: float = 1.0  # how often workers pick up webhook changes (new, edited, disabled)

    @property
    def quiet_s(self) -> float:
        """The longest an endpoint failing continuously, with a delivery owed to it, goes
        without a failed attempt: the longest retry wait (a Retry-After can lengthen one up to
        ``max_retry_after_s``; jitter included on either), the attempt's timeout and a refresh.
        A silence longer than twice this (see ``_Worker._settle``) restarts the failing clock."""
        longest = max((*self.retry_schedule_s, self.max_retry_after_s)) * (1 + self.jitter)
        return longest + self.timeout_s + self.refresh_s


class Outcome(NamedTuple):
    """What one attempt ended with (a tuple: one is built per attempt, and a frozen
    dataclass's ``__init__`` cost ~0.8 us of the event loop's thread each, timed)."""

    status_code: int | None
    latency_ms: float
    excerpt: str
    error: str | None
    retry_after_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


class WebhookDispatcher:
    """Runs fan-out and one worker per enabled webhook until stopped."""

    name = "webhooks"

    def __init__(
        self,
        store: Store,
        settings: DeliverySettings,
        guard: Guard,
        now_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        metrics: Metrics | None = None,
        coordinator: Coordinator | None = None,
    ) -> None:
        self._store = store
        # each endpoint is served by the one replica holding its lease, so its concurrency and
        # rate limits hold for the deployment (alone on SQLite, every lease is held)
        self._coordinator = coordinator or LocalCoordinator(store, "local")
        self._held_until = 0.0  # monotonic time the endpoint leases run out unless renewed
        self._renewed = asyncio.Event()  # _reconcile asked for the leases again
        self._metrics = metrics or Metrics(now_ms)
        self._settings = settings
        self._guard = guard
        self._now_ms = now_ms
        self._workers: dict[str, _Worker] = {}
        # per webhook, the deliveries fetched and not yet recorded, shared by every worker of
        # it: the current one and any number still finishing their attempts after being
        # stopped, so none of them fetches and sends a delivery another has in flight
        self._held: dict[str, set[int]] = {}
        self._retired: set[asyncio.Task[None]] = set()  # stop tasks of retired workers
        self._recorder = _Recorder(store)
        self._tally: list[tuple[str, int, int]] = []  # settled attempts not yet in the metrics
        self._tally_due: asyncio.TimerHandle | None = None
        self._wake = asyncio.Event()
        self._refresh_now = False  # a webhook changed: reconcile the workers at the next wake
        self._timeout = aiohttp.ClientTimeout(
            total=settings.timeout_s, sock_connect=settings.connect_timeout_s
        )
        self.delivered = 0
        self.failed_attempts = 0

    def notify(self) -> None:
        """Events were committed: fan them out now instead of at the next idle poll."""
        self._wake.set()

    def changed(self, webhook_id: str, hook: Webhook | None = None) -> None:
        """A webhook was registered, edited or removed, or deliveries of it were made due now
        (redeliver, recover) in this process: act on it now instead of at the next refresh.
        ``hook``: the webhook as just stored by an edit; its filter applies to the worker's
        queue at once (the store dropped the pending deliveries it rejects, or left the due
        ones, which may be in flight, for the worker to drop)."""
        self._refresh_now = True
        self._wake.set()
        worker = self._workers.get(webhook_id)
        if worker is not None:
            if hook is not None:
                worker.refilter(hook)
            worker.recheck()
            worker.poke()

    async def run(self, stop: asyncio.Event) -> None:
        """Fan out and keep workers in step with the registered webhooks until ``stop``."""
        connector = GuardedConnector(self._guard, limit=0)
        # no cookie jar: an endpoint's Set-Cookie must not follow later deliveries to it or to
        # other endpoints on its host (attempts are stateless, as Standard Webhooks senders are)
        jar = aiohttp.DummyCookieJar()
        async with aiohttp.ClientSession(connector=connector, cookie_jar=jar) as session:
            stopper = asyncio.create_task(self._wake_on(stop))
            watchdog = asyncio.create_task(self._expire_leases(), name="webhooks:leases")
            next_refresh = 0.0
            # the leases are renewed with the refresh: at least thrice per lease, as elsewhere
            refresh_s = min(self._settings.refresh_s, self._coordinator.lease_s / 3)
            failures = 0
            try:
                while not stop.is_set():
                    self._wake.clear()  # before the read: a commit from now on wakes us again
                    try:
                        fanned = await self._store.fanout(
                            self._settings.fanout_batch, self._now_ms()
                        )
                        if self._refresh_now or time.monotonic() >= next_refresh:
                            self._refresh_now = False
                            await self._reconcile(session)
                            next_refresh = time.monotonic() + refresh_s
                        failures = 0
                    except StoreError as exc:
                        # the store is unreachable: nothing was fanned out; keep trying (the
                        # watchdog retires the workers if their leases run out meanwhile)
                        failures += 1
                        log.warning("webhooks.store_error", error=str(exc))
                        await _sleep_or_stop(stop, min(5.0, 0.2 * 2**failures))
                        continue
                    if fanned:
                        for worker in self._workers.values():
                            worker.poke()
                    if fanned >= self._settings.fanout_batch:
                        continue  # more are waiting: no pause
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self._settings.idle_poll_s)
            finally:
                stopper.cancel()
                watchdog.cancel()
                await asyncio.gather(stopper, watchdog, return_exceptions=True)
                held = [_lease(hook_id) for hook_id in self._workers]
                workers = list(self._workers.values())
                self._workers.clear()
                await asyncio.gather(*(w.stop() for w in workers), *self._retired)
                await self._recorder.close()
                self._fold_tally()
                with contextlib.suppress(StoreError):
                    await self._coordinator.release(held)

    async def _wake_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._wake.set()

    def _count(self, outcome: str, committed_ms: int, settled_ms: int) -> None:
        """Tally one settled attempt for the metrics (folded in every ``TALLY_S``)."""
        self._tally.append((outcome, committed_ms, settled_ms))
        if self._tally_due is None:
            self._tally_due = asyncio.get_running_loop().call_later(TALLY_S, self._fold_tally)

    def _fold_tally(self) -> None:
        if self._tally_due is not None:
            self._tally_due.cancel()
            self._tally_due = None
        tally, self._tally = self._tally, []
        if tally:
            self._metrics.webhooks_settled(tally)

    async def _expire_leases(self) -> None:
        """Retire the workers when their leases run out unrenewed, on time: a store call may
        hang (PostgreSQL: reconnecting for ``reconnect_max_s``, longer than ``lease_s``) without
        failing, and another replica takes an expired lease over."""
        while True:
            left_s = self._held_until - time.monotonic()
            if left_s > 0:
                await asyncio.sleep(left_s)  # then look again: _reconcile may have renewed
                continue
            self._drop_expired()
            self._renewed.clear()
            await self._renewed.wait()

    def _drop_expired(self) -> None:
        if self._workers and time.monotonic() >= self._held_until:
            log.warning("webhooks.leases_expired", workers=len(self._workers))
            for hook_id in list(self._workers):
                self._retire(self._workers.pop(hook_id))

    async def _reconcile(self, session: aiohttp.ClientSession) -> None:
        enabled = {h.id: h for h in await self._store.webhooks() if h.enabled}
        asked = time.monotonic()
        held = await self._coordinator.hold([_lease(hook_id) for hook_id in enabled])
        self._held_until = asked + 0.9 * self._coordinator.lease_s
        self._renewed.set()
        if time.monotonic() >= self._held_until:
            held = set()  # the answer came too late to rely on: the leases may have run out
        hooks = {hook_id: h for hook_id, h in enabled.items() if _lease(hook_id) in held}
        for hook_id in [h for h in self._workers if h not in hooks]:
            self._retire(self._workers.pop(hook_id))
        for hook in hooks.values():
            worker = self._workers.get(hook.id)
            if worker is not None and worker.disabled and not worker.disabling:
                # an attempt disabled the endpoint, yet the store has it enabled: enabled again
                # since, or the disabling write failed; a new worker takes over (this one stays
                # stopped for good)
                self._retire(self._workers.pop(hook.id))
                worker = None
            if worker is not None:
                worker.update(hook)
                continue
            # workers of the same webhook still finishing their attempts share what they hold,
            # so the new one does not send those deliveries a second time
            worker = _Worker(self, session, hook, self._held.setdefault(hook.id, set()))
            self._workers[hook.id] = worker
            worker.start()
        for hook_id in [h for h, ids in self._held.items() if not ids and h not in self._workers]:
            del self._held[hook_id]  # nothing in flight: no worker can be sending it

    def _retire(self, worker: _Worker) -> None:
        """Stop a worker without waiting here: a hanging endpoint must not hold up fan-out."""
        hook_id = worker.hook.id
        worker.halt()  # now, not when the stop task first runs: a sender may be about to start
        task = asyncio.create_task(worker.stop(), name=f"webhook:{hook_id}:stop")
        self._retired.add(task)

        def done(finished: asyncio.Task[None]) -> None:
            self._retired.discard(finished)
            successor = self._workers.get(hook_id)
            if successor is not None:
                successor.poke()  # what the stopped worker held and let go of is due to it

        task.add_done_callback(done)

    def _retry_delay_s(self, attempts_done: int, outcome: Outcome) -> float | None:
        """Wait before the next attempt, or None when the schedule is exhausted. A Retry-After
        (bounded by ``max_retry_after_s``) can only lengthen the scheduled wait: it never cuts a
        long one short, and jitter never brings the retry before the time the endpoint asked
        (it spreads the retries after it)."""
        schedule = self._settings.retry_schedule_s
        if attempts_done > len(schedule):
            return None
        jitter = self._settings.jitter
        wait = schedule[attempts_done - 1] * random.uniform(1 - jitter, 1 + jitter)
        if outcome.retry_after_s is not None:
            # jittered above the time asked for: a rate-limited endpoint tells a backlog the same
            # time, and without it every one of those retries fell due at that one instant
            asked = min(outcome.retry_after_s, self._settings.max_retry_after_s)
            wait = max(wait, asked * random.uniform(1, 1 + jitter))
        return wait

    async def _attempt(
        self,
        session: aiohttp.ClientSession,
        hook: Webhook,
        due: DueSend,
        refused: SsrfError | None = None,
    ) -> Outcome:
        """POST one event; every failure becomes an Outcome, never an exception. ``refused``:
        the guard's verdict on the URL's IP literal host (names are checked at connect time)."""
        body = due.body
        now_ms = self._now_ms()
        headers = signing.headers(hook.secrets_in_use(now_ms), due.event_id, now_ms // 1000, body)
        headers["content-type"] = CONTENT_TYPE
        s = self._settings
        started = time.perf_counter()
        if refused is not None:
            return Outcome(None, _ms(started), "", f"refused: {refused}")
        try:
            async with session.post(
                hook.url, data=body, headers=headers, allow_redirects=False, timeout=self._timeout
            ) as resp:
                raw = await self._excerpt(resp.content, started)
                excerpt = raw.decode("utf-8", "replace")[: s.excerpt_chars]
                retry_after = (
                    _retry_after(resp, now_ms / 1000) if resp.status in (429, 503) else None
                )
                return Outcome(resp.status, _ms(started), excerpt, None, retry_after)
        except SsrfError as exc:
            return Outcome(None, _ms(started), "", f"refused: {exc}")
        except aiohttp.ConnectionTimeoutError:
            error = f"connect timed out after {s.connect_timeout_s}s"
            return Outcome(None, _ms(started), "", error)
        except TimeoutError:
            return Outcome(None, _ms(started), "", f"timed out after {s.timeout_s}s")
        except aiohttp.ClientConnectorError as exc:
            reason = exc.os_error.strerror or str(exc.os_error) or type(exc.os_error).__name__
            return Outcome(None, _ms(started), "", f"cannot connect: {reason}")
        except (aiohttp.ClientError, OSError) as exc:
            return Outcome(None, _ms(started), "", _error_text(exc, hook.url))

    async def _excerpt(self, content: aiohttp.StreamReader, started: float) -> bytes:
        """The start of a response body (up to ``response_cap_bytes``), for the record. The
        status is known once the headers are in, so a body that stalls must not throw it away
        (read under the whole request's timeout, a 2xx with a stalled body was recorded as a
        timeout and sent again): a body not there with the headers is waited for at most
        ``EXCERPT_WAIT_S`` (or the request's time left), then the excerpt is what came. One
        there already (the common case: it comes in the headers' packet) costs no timer. A body
        that breaks off (the connection closed before the length announced, a bad chunk) keeps
        the status too: a 2xx is delivered, not sent again, a 410 still disables."""
        s = self._settings
        try:
            raw = content.read_nowait(s.response_cap_bytes)
            if raw or content.is_eof():
                return raw
            left_s = s.timeout_s - (time.perf_counter() - started)
            async with asyncio.timeout(max(0.0, min(EXCERPT_WAIT_S, left_s))):
                return await content.read(s.response_cap_bytes)
        except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
            return b""


class _Worker:
    """Delivers one webhook's due deliveries within its own concurrency and rate limits.

    A feeder keeps a local queue of due deliveries, read from the store in batches and refilled
    only when it runs low; ``concurrency`` senders take from it. The store is read again when
    fan-out created deliveries (``poke``), when a recorded retry falls due, when the queue runs
    low after a full batch, and every ``refresh_s`` (redeliveries, recoveries, retries left by
    an earlier run). A delivery is *held* from the moment it is fetched until its attempt is
    recorded, and a held delivery is never queued twice, so when everything due is in flight
    (a hanging endpoint) the worker waits instead of reading the store in a loop.
    """

    def __init__(
        self,
        dispatcher: WebhookDispatcher,
        session: aiohttp.ClientSession,
        hook: Webhook,
        held: set[int],
    ) -> None:
        s = dispatcher._settings
        self._dispatcher = dispatcher
        self._session = session
        self.hook = hook
        self.held = held  # fetched, not yet recorded: shared with the webhook's other workers
        self._queue: asyncio.Queue[DueSend | None] = asyncio.Queue()
        self._low_water = max(2 * s.concurrency, s.fetch_batch // 8)  # a refill takes ms
        self._batch = max(s.fetch_batch, 2 * self._low_water)
        self._more = True  # the store may hold due deliveries not fetched yet
        self._feed = asyncio.Event()  # something for the feeder to look at
        self._retries: list[int] = []  # heap of recorded retry times (Unix ms)
        self._recheck: set[int] = set()  # held at a change: look again once each is recorded
        self._next_send = 0.0
        self._repace = asyncio.Event()  # set: senders waiting for a slot look again
        self._feeder: asyncio.Task[None] | None = None
        self._senders: list[asyncio.Task[None]] = []
        self._stopping = False
        self.disabled = False  # an attempt disabled the endpoint: take no more work
        self.disabling = False  # ... and the store is being told
        self.failing_since_ms = hook.failing_since_ms
        self.last_failure_ms = hook.last_failure_ms
        self._refused = _literal_refusal(dispatcher._guard, hook.url)
        self._wanted = _wanted_kinds(hook)
        # the store may hold pending deliveries of kinds the filter rejects (those a filter
        # edit left because they were due, a redelivery an older version let through): never
        # read, they are dropped at the first fetch and at the first after each filter change,
        # but the held ones, whose records must find them; so once none of those held then is
        # held any more, they are dropped again
        self._drop_unwanted = True
        self._drop_after: set[int] = set(held)

    def start(self) -> None:
        name = f"webhook:{self.hook.id}"
        self._feeder = asyncio.create_task(self._feed_loop(), name=f"{name}:feed")
        self._senders = [
            asyncio.create_task(self._send_loop(), name=f"{name}:send")
            for _ in range(self._dispatcher._settings.concurrency)
        ]

    def update(self, hook: Webhook) -> None:
        """The webhook as stored now (secrets, rate limit, failing clock)."""
        if hook.url != self.hook.url:
            self._refused = _literal_refusal(self._dispatcher._guard, hook.url)
        if hook.rate_limit_per_s != self.hook.rate_limit_per_s:
            self._next_send = time.monotonic()  # spacing by the new limit from now
            self._wake_pacers()
        self.hook = hook
        self.failing_since_ms = hook.failing_since_ms
        self.last_failure_ms = hook.last_failure_ms
        self.refilter(hook)

    def refilter(self, hook: Webhook) -> None:
        """Send only the kinds ``hook``'s filter lets through: a delivery queued or waiting for
        its rate-limit slot whose kind a narrowed filter rejects is let go unsent; attempts
        already started finish and are recorded (the store left the due ones of those kinds:
        they are dropped once none of them is held)."""
        wanted = _wanted_kinds(hook)
        if wanted != self._wanted:
            self._wanted = wanted
            self._drop_unwanted = True
            self._drop_after = set(self.held)

    def poke(self) -> None:
        """Fan-out created deliveries: look in the store."""
        self._more = True
        self._feed.set()

    def recheck(self) -> None:
        """Deliveries may have been reset (redeliver, recover): a held one (in flight, or its
        record lingering) is left out of the read this change wakes, and its record does not
        undo the reset (its version moved on), so it is due again once recorded: look then,
        not at the next periodic look ``refresh_s`` later."""
        self._recheck = set(self.held)

    def halt(self) -> None:
        """Start no attempt from now on (``stop`` then winds the worker down)."""
        self._stopping = True
        self._wake_pacers()

    def _wake_pacers(self) -> None:
        self._repace.set()
        self._repace = asyncio.Event()

    async def stop(self) -> None:
        """Take no more work; let attempts in flight finish (bounded by the request timeout).
        Deliveries still queued stay pending in the store for whoever runs next."""
        self.halt()
        if self._feeder is not None:
            self._feeder.cancel()
            await asyncio.gather(self._feeder, return_exceptions=True)
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None:
                self.held.discard(item.delivery_id)
        for _ in self._senders:
            self._queue.put_nowait(None)
        await asyncio.gather(*self._senders, return_exceptions=True)

    async def _feed_loop(self) -> None:
        settings = self._dispatcher._settings
        while not (self.disabled or self._stopping):
            now = self._dispatcher._now_ms()
            while self._retries and self._retries[0] <= now:
                heapq.heappop(self._retries)
                self._more = True
            if self._more and self._queue.qsize() < self._low_water:
                self._feed.clear()  # a poke while the store is read must not be lost
                self._more = await self._fetch(now) or self._feed.is_set()
                continue
            wait_s = settings.refresh_s
            if self._retries:
                wait_s = min(wait_s, (self._retries[0] - now) / 1000)
            self._feed.clear()
            try:
                await asyncio.wait_for(self._feed.wait(), max(wait_s, 0.001))
            except TimeoutError:
                self._more = True  # the periodic look

    async def _fetch(self, now_ms: int) -> bool:
        """Queue due deliveries not held yet; True if the store may have more due."""
        d = self._dispatcher
        if self._drop_after:
            self._drop_after &= self.held
            self._drop_unwanted |= not self._drop_after  # the last of them let go: again
        if self._drop_unwanted:
            self._drop_unwanted = False
            await self._drop()
        # the held ones (in flight, or their records lingering) are left out by the store: read
        # back, a third of each read was rows thrown away, and its Python work held the GIL
        # while the senders waited (profiled: ~5 ms stalls per refill); waiting for the
        # lingering records to be written first made every refill ~8 ms longer instead
        try:
            # of the wanted kinds only: others, never sent, would fill every batch and hold
            # the wanted ones back for ever
            due = await d._store.due_sends(
                self.hook.id, now_ms, self._batch, self.held, kinds=self._wanted
            )
        except StoreError as exc:
            log.warning("webhook.store_error", webhook=self.hook.id, error=str(exc))
            await asyncio.sleep(self._dispatcher._settings.refresh_s)
            return True
        for item in due:
            if item.delivery_id not in self.held:  # a safety net: only this feeder adds to held
                self.held.add(item.delivery_id)
                self._queue.put_nowait(item)
        if len(due) >= self._batch:
            return True
        # all that is due now is queued: the next retry the store holds wakes the feeder, also
        # one recorded before this worker existed (by the worker it replaced, or a past run)
        try:
            # of the wanted kinds only, as the due read: a pending delivery of another (never
            # read) must not wake the feeder for a read that leaves it out
            later = await d._store.next_due_ms(self.hook.id, now_ms, kinds=self._wanted)
        except StoreError as exc:
            log.warning("webhook.store_error", webhook=self.hook.id, error=str(exc))
            return False
        if later is not None and (not self._retries or later < self._retries[0]):
            heapq.heappush(self._retries, later)
        return False

    async def _drop(self) -> None:
        """Drop the pending deliveries the stored filter rejects (the due read leaves them out,
        so they would stay pending, never sent nor dead-lettered), but the held ones: in flight
        or their records lingering, those must find them; a failure only leaves them (the due
        read still leaves them out)."""
        try:
            dropped = await self._dispatcher._store.drop_unwanted(self.hook.id, set(self.held))
        except StoreError as exc:
            log.warning("webhook.store_error", webhook=self.hook.id, error=str(exc))
            return
        if dropped:
            log.info("webhook.unwanted_dropped", webhook=self.hook.id, deliveries=dropped)

    async def _send_loop(self) -> None:
        d = self._dispatcher
        while True:
            item = await self._queue.get()
            if item is None:
                return
            if self._let_go(item):
                continue  # drain until stop() sends the end marker
            if self._more and self._queue.qsize() < self._low_water:
                self._feed.set()
            if self.hook.rate_limit_per_s:
                await self._pace()
                if self._let_go(item):  # stopped or refiltered while it waited for its slot
                    continue
            if time.monotonic() >= d._held_until:
                # the leases ran out by our own clock (a paused process resumed before the
                # watchdog ran): another replica may serve the endpoint now; the watchdog or
                # the next renewal decides what becomes of this worker (kept: it reads the
                # delivery again at its next look)
                self.held.discard(item.delivery_id)
                self._more = True
                continue
            try:
                outcome = await d._attempt(self._session, self.hook, item, self._refused)
            except Exception as exc:  # see _crashed
                outcome = self._crashed(exc)
            try:
                writes = self._settle(item, outcome)
                if writes is not None:  # the endpoint's state: finish it even if we are cancelled
                    await asyncio.shield(writes)
                if d._recorder.full:
                    await d._recorder.room()
            except StoreError as exc:
                log.warning("webhook.store_error", webhook=self.hook.id, error=str(exc))
            except Exception as exc:  # a bug must not end the sender: the worker would stall
                error = _error_text(exc, self.hook.url)
                log.error("webhook.settle_crashed", webhook=self.hook.id, error=error)

    def _let_go(self, item: DueSend) -> bool:
        """Whether ``item`` is not to be sent: the worker stops or is disabled, or the filter
        no longer wants its kind. It is no longer held (pending in the store, if still there,
        for whoever runs next)."""
        if not (self.disabled or self._stopping) and item.kind in self._wanted:
            return False
        self.held.discard(item.delivery_id)
        return True

    def _crashed(self, exc: Exception) -> Outcome:
        """What an attempt raised (it should not: a bug, or an answer nobody thought of) is a
        failed attempt, logged, never the end of the sender task, which would hold its delivery
        for ever and take one of the endpoint's slots with it. (Caught in the sender itself: a
        coroutine wrapping each attempt was one more frame on every step of every request.)"""
        # no traceback: its frames' text may hold the URL (and a token in its query)
        error = _error_text(exc, self.hook.url)
        log.error("webhook.attempt_crashed", webhook=self.hook.id, error=error)
        return Outcome(None, 0.0, "", f"internal error: {error}"[:500])

    async def _pace(self) -> None:
        """The endpoint's own rate limit, as a minimum spacing between attempts: each sender
        reserves its slot before sleeping, so concurrent senders never share one. A sender
        waiting for its slot is woken when the worker stops or is disabled (a slow limit must
        not hold up shutdown) and when the limit changes (it reserves again under the new one).
        """
        while not (self.disabled or self._stopping):
            rate = self.hook.rate_limit_per_s
            if not rate:
                return
            now = time.monotonic()
            slot = max(now, self._next_send)
            self._next_send = slot + 1.0 / rate
            if slot <= now:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._repace.wait(), slot - now)
                continue  # woken before the slot: stopped, disabled or a new limit
            return

    def _settle(self, due: DueSend, outcome: Outcome) -> Coroutine[None, None, None] | None:
        """Hand the attempt to the recorder; returns the store writes the endpoint's state
        needs (none for a success of a healthy endpoint: the common case costs no task)."""
        d = self._dispatcher
        now = d._now_ms()
        attempt = Attempt(
            due.delivery_id,
            now,
            outcome.status_code,
            outcome.latency_ms,
            _storable(outcome.excerpt),
            None if outcome.error is None else _storable(outcome.error),
        )
        # settled only if no redeliver/recover reset it meanwhile (its version moved on; the
        # attempt count could not tell: a reset sets it back to what a first attempt read)
        read = due.version
        if outcome.ok:
            d._recorder.add(attempt, self.hook.id, "delivered", now, read, self._recorded)
            d._count("delivered", due.committed_ms, now)
            d.delivered += 1
            if self.failing_since_ms is None:
                return None
            self.failing_since_ms = self.last_failure_ms = None  # a write only to stop a clock
            return d._store.webhook_succeeded(self.hook.id)
        d.failed_attempts += 1
        delay = d._retry_delay_s(due.attempts + 1, outcome)
        status, next_ms = ("dead", now) if delay is None else ("pending", now + int(delay * 1000))
        d._recorder.add(attempt, self.hook.id, status, next_ms, read, self._recorded)
        d._count(status, due.committed_ms, now)
        log.warning(
            "webhook.attempt_failed",
            webhook=self.hook.id,
            delivery=due.delivery_id,
            event_id=due.event_id,
            status=outcome.status_code,
            error=outcome.error,
            next=status,
        )
        if outcome.status_code == 410:
            self.disabled = self.disabling = True
            self._wake_pacers()
            return self._gone(now)
        # disabled only on evidence of continuous failure: the store keeps the clock's start
        # and its last noted failure, refreshed at most once per quiet period (a failing
        # endpoint must not load the store the others need), so the stored one is at most that
        # old while failures go on, and a failure more than twice that after it follows a
        # silence (the relay down or idle, nothing owed): the clock restarts instead of
        # counting the silence, and one failure after a restart cannot disable the endpoint
        after_ms = int(d._settings.disable_after_s * 1000)
        quiet_ms = int(d._settings.quiet_s * 1000)
        since, last = self.failing_since_ms, self.last_failure_ms
        if since is not None and last is not None and now - last <= quiet_ms:
            if now - since < after_ms:
                return None  # the clock runs, noted recently, not due yet: nothing to write
        elif since is None or last is None or now - last > 2 * quiet_ms:
            since = now  # started, or restarted after a silence (as the store does)
        self.failing_since_ms, self.last_failure_ms = since, now
        return self._failed(now, after_ms, 2 * quiet_ms)

    async def _gone(self, now_ms: int) -> None:
        d = self._dispatcher
        try:
            await d._store.disable_webhook(self.hook.id, "410 Gone from the endpoint", now_ms)
        finally:
            self.disabling = False  # written, or not: then the next reconcile sees it enabled
        log.error("webhook.disabled", webhook=self.hook.id, reason="410 Gone")

    async def _failed(self, now_ms: int, after_ms: int, restart_after_ms: int) -> None:
        """Start (or restart) the failing clock or note a failure, and let the store disable the
        endpoint once the clock has run for ``after_ms``: a write when the clock starts, once
        per quiet period, and when it may be due, not per failure."""
        store = self._dispatcher._store
        if await store.webhook_failed(self.hook.id, now_ms, after_ms, restart_after_ms):
            self.disabled = True
            self._wake_pacers()
            log.error("webhook.disabled", webhook=self.hook.id, reason="failing continuously")

    def _recorded(self, delivery_id: int, status: str, next_ms: int) -> None:
        """The recorder wrote the attempt (or could not: then it is due again at once). A retry
        is the business of whichever worker serves the webhook now (this one, or the one that
        took over while the attempt's record was being written)."""
        self.held.discard(delivery_id)
        current = self._dispatcher._workers.get(self.hook.id, self)
        if current._recheck and delivery_id in current._recheck:
            current._recheck.discard(delivery_id)
            current.poke()  # it may have been reset while held: due now
        if status == "pending":
            heapq.heappush(current._retries, next_ms)
            current._feed.set()


Recorded = Callable[[int, str, int], None]


class _Recorder:
    """Group commit of attempt records: one store transaction for every attempt that finished
    within ``linger_s`` or while the previous transaction ran (profiled: a transaction per
    attempt capped delivery throughput). Senders do not wait for it: a delivery stays *held*
    by its worker until its record is written, so it is never fetched again while its result
    is only in memory; a crash before the write leaves it pending, and it is sent again with
    the same ``webhook-id``.

    A batch the store refuses is written again record by record (unless the store is
    unreachable), so one record it cannot take does not take the others down with it. A record
    that still cannot be written stays held for a backoff that doubles with each failure of
    that delivery (``backoff_s`` to ``max_backoff_s``), then is due again: an attempt whose
    record fails must not turn into a resend loop against its endpoint.
    """

    def __init__(
        self,
        store: Store,
        linger_s: float = 0.02,
        max_batch: int = 500,
        max_backlog: int = 5000,
        backoff_s: float = 1.0,
        max_backoff_s: float = 300.0,
    ) -> None:
        self._store = store
        self._linger_s = linger_s
        self._max_batch = max_batch
        self._max_backlog = max_backlog
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._pending: list[_Record] = []
        self._flusher: asyncio.Task[None] | None = None
        self._room = asyncio.Event()
        self._room.set()
        self._hurry = asyncio.Event()  # write without lingering
        self._closed = False
        self._failures: dict[int, int] = {}  # delivery id -> its records failed in a row
        self._backoffs: set[asyncio.TimerHandle] = set()

    def add(
        self,
        attempt: Attempt,
        webhook_id: str,
        status: str,
        next_ms: int,
        read_version: int,
        done: Recorded,
    ) -> None:
        """Record an attempt of a delivery (of ``webhook_id``, named when its record cannot be
        written) read at ``read_version``; ``done(delivery_id, status, next_ms)`` runs once it
        is written (or after a backoff, when it cannot be)."""
        self._pending.append((attempt, webhook_id, status, next_ms, read_version, done))
        if len(self._pending) >= self._max_backlog:
            self._room.clear()
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(), name="webhook:recorder")

    @property
    def full(self) -> bool:
        """The backlog is full: the store is slower than the endpoints."""
        return not self._room.is_set()

    async def room(self) -> None:
        """Wait while the backlog is full."""
        await self._room.wait()

    async def close(self) -> None:
        """Write everything recorded so far, without lingering; drop the backoffs (the
        deliveries they hold are pending in the store, for whoever runs next)."""
        self._closed = True
        self._hurry.set()
        while self._flusher is not None:
            await asyncio.shield(self._flusher)
        for handle in self._backoffs:
            handle.cancel()
        self._backoffs.clear()

    async def _flush(self) -> None:
        try:
            # nobody waits for the write (senders go on), so gathering costs no latency, and
            # each transaction has a fixed cost of ~130 us in the store thread (profiled); the
            # linger comes before every batch, not only the first: writing again as soon as
            # the last write returned made batches of ~14 attempts under load (profiled: the
            # commits alone were a fifth of the store thread's time)
            while self._pending:
                if not self._hurry.is_set() and len(self._pending) < self._max_batch:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._hurry.wait(), self._linger_s)
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                await self._write(batch)
                if len(self._pending) < self._max_backlog:
                    self._room.set()
        finally:
            self._flusher = None
            if not self._closed:
                self._hurry.clear()

    async def _write(self, batch: list[_Record]) -> None:
        try:
            await self._store.finish_attempts([(a, s, n, r) for a, _, s, n, r, _ in batch])
        except StoreError as exc:
            webhooks = _webhooks_named([record[1] for record in batch])
            log.warning(
                "webhook.store_error", webhooks=webhooks, error=str(exc), attempts=len(batch)
            )
            if len(batch) == 1 or isinstance(exc, UnavailableError):
                for record in batch:
                    self._back_off(record)
                return
            for record in batch:  # which one the store refused: the others are written
                attempt, webhook_id, status, next_ms, read, _ = record
                try:
                    await self._store.finish_attempts([(attempt, status, next_ms, read)])
                except StoreError as single:
                    log.warning(
                        "webhook.record_refused",
                        webhook=webhook_id,
                        delivery=attempt.delivery_id,
                        error=str(single),
                    )
                    self._back_off(record)
                else:
                    self._written(record)
        else:
            for record in batch:
                self._written(record)

    def _written(self, record: _Record) -> None:
        attempt, _, status, next_ms, _, done = record
        self._failures.pop(attempt.delivery_id, None)
        done(attempt.delivery_id, status, next_ms)

    def _back_off(self, record: _Record) -> None:
        """Not recorded: the delivery stays held for the backoff, then is due again."""
        attempt, _, _, _, _, done = record
        failures = self._failures.get(attempt.delivery_id, 0)
        self._failures[attempt.delivery_id] = failures + 1
        wait_s = min(self._backoff_s * 2 ** min(failures, 30), self._max_backoff_s)

        def release() -> None:
            self._backoffs.discard(handle)
            done(attempt.delivery_id, "pending", attempt.attempted_ms)

        handle = asyncio.get_running_loop().call_later(wait_s, release)
        self._backoffs.add(handle)


# attempt, webhook id, status, next_ms, version read, done
_Record = tuple[Attempt, str, str, int, int, Recorded]


def _webhooks_named(webhook_ids: list[str]) -> list[str]:
    """The distinct webhooks of a batch for a log line, in order, at most ``LOG_WEBHOOKS_MAX``
    of them (then how many more): enough to find the endpoints, bounded for a line."""
    distinct = list(dict.fromkeys(webhook_ids))
    if len(distinct) <= LOG_WEBHOOKS_MAX:
        return distinct
    return [*distinct[:LOG_WEBHOOKS_MAX], f"... {len(distinct) - LOG_WEBHOOKS_MAX} more"]


def _wanted_kinds(hook: Webhook) -> frozenset[str]:
    """The outbox kinds (``DueSend.kind``) ``hook``'s filter lets through: those fan-out
    creates deliveries of, and the only ones the due read returns."""
    return frozenset(rowmap.wanted_kinds(hook))


def _literal_refusal(guard: Guard, url: str) -> SsrfError | None:
    """The guard's verdict on a URL whose host is an IP literal (aiohttp does not resolve
    those, so the resolver's check never sees them); None when allowed or a name."""
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:  # refused at registration: only a store written by hand holds one
        return SsrfError("url: not a valid URL")
    try:
        guard.check_literal(host)
    except SsrfError as exc:
        return exc
    return None


def _lease(webhook_id: str) -> str:
    return f"webhook:{webhook_id}"


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


def _storable(text: str) -> str:
    """Text from an endpoint, fit to store: PostgreSQL TEXT refuses NUL (one such excerpt failed
    the whole batch of attempt records it was written with)."""
    return text.replace("\x00", "\ufffd")


def _error_text(exc: BaseException, url: str) -> str:
    """An attempt's error for its record, the API and the log, storable: never the webhook URL
    as registered, whose query or user info may carry a token (``str()`` of some aiohttp errors
    includes it: those are built from their parts; any other text shows the URL as
    :func:`shown` does)."""
    name = type(exc).__name__
    if isinstance(exc, aiohttp.ClientResponseError):
        text = f"{name}: {exc.status}, {exc.message}"
    elif isinstance(exc, aiohttp.InvalidURL):
        text = f"{name}: {exc.description or 'invalid URL'}"
    elif isinstance(exc, aiohttp.NonHttpUrlClientError):
        text = f"{name}: not an http(s) URL"
    else:
        text = f"{name}: {exc}"
    if url:
        text = text.replace(url, shown(url))
    return _storable(text)[:500]


def _retry_after(resp: aiohttp.ClientResponse, now_s: float) -> float | None:
    """Seconds a Retry-After header asks for: delay-seconds or an HTTP-date (RFC 9110); None
    for anything else (ASCII digits only: ``str.isdigit`` also takes "²", which float refuses)."""
    value = resp.headers.get("Retry-After", "").strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # HTTP-dates are GMT
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now_s)
