"""Webhook delivery: fan the outbox out to registered endpoints and deliver, signed, with retries.

Each committed event becomes one *delivery* per enabled webhook whose filters match (fan-out is
one store transaction that also moves the fan-out cursor). Every webhook has its own worker with
its own concurrency limit and optional rate limit, so a slow, failing or dead endpoint only ever
holds its own slots: it never delays another endpoint.

An attempt POSTs the structured-mode CloudEvent with Standard Webhooks headers (``webhook-id`` is
the event id, stable across retries). 2xx is success; anything else, redirects included (never
followed), is a failure retried on a schedule with jitter (``Retry-After`` on 429/503 is honoured
within bounds). 410 Gone disables the endpoint at once; an endpoint failing continuously for
``disable_after_s`` is disabled; a delivery out of attempts is dead-lettered (visible and
redeliverable through the admin API). A crash mid-attempt leaves the delivery pending, so it is
sent again: at least once, duplicates with the same ``webhook-id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
import structlog

from relay.metrics import Metrics
from relay.sinks import signing
from relay.sinks.ssrf import Guard, GuardedResolver, SsrfError
from relay.store import Attempt, Delivery, OutboxEvent, Store, StoreError, Webhook
from relay.store.coordination import Coordinator, LocalCoordinator

log = structlog.get_logger(__name__)

DEFAULT_SCHEDULE_S = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
CONTENT_TYPE = "application/cloudevents+json"


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
    idle_poll_s: float = 0.2
    refresh_s: float = 1.0  # how often workers pick up webhook changes (new, edited, disabled)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt ended with."""

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
        self._settings = settings
        self._metrics = metrics or Metrics(now_ms)
        self._guard = guard
        self._now_ms = now_ms
        self._workers: dict[str, _Worker] = {}
        self._recorder = _Recorder(store)
        self.delivered = 0
        self.failed_attempts = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Fan out and keep workers in step with the registered webhooks until ``stop``."""
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(self._guard), limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            next_refresh = 0.0
            failures = 0
            try:
                while not stop.is_set():
                    try:
                        fanned = await self._store.fanout(
                            self._settings.fanout_batch, self._now_ms()
                        )
                        if time.monotonic() >= next_refresh:
                            await self._reconcile(session)
                            next_refresh = time.monotonic() + self._settings.refresh_s
                        failures = 0
                    except StoreError as exc:
                        # the store is unreachable: keep trying, and stop the workers before
                        # their leases run out (another replica may take the endpoints then)
                        failures += 1
                        log.warning("webhooks.store_error", error=str(exc))
                        await self._drop_expired()
                        await _sleep_or_stop(stop, min(5.0, 0.2 * 2**failures))
                        continue
                    if fanned:
                        for worker in self._workers.values():
                            worker.wake.set()
                        continue
                    await _sleep_or_stop(stop, self._settings.idle_poll_s)
            finally:
                await asyncio.gather(*(w.stop() for w in self._workers.values()))
                held = [_lease(hook_id) for hook_id in self._workers]
                self._workers.clear()
                with contextlib.suppress(StoreError):
                    await self._coordinator.release(held)

    async def _drop_expired(self) -> None:
        if self._workers and time.monotonic() >= self._held_until:
            log.warning("webhooks.leases_expired", webhooks=len(self._workers))
            await asyncio.gather(*(w.stop() for w in self._workers.values()))
            self._workers.clear()

    async def _reconcile(self, session: aiohttp.ClientSession) -> None:
        enabled = {h.id: h for h in await self._store.webhooks() if h.enabled}
        asked = time.monotonic()
        held = await self._coordinator.hold([_lease(hook_id) for hook_id in enabled])
        self._held_until = asked + 0.9 * self._coordinator.lease_s
        hooks = {hook_id: h for hook_id, h in enabled.items() if _lease(hook_id) in held}
        for hook_id in [h for h in self._workers if h not in hooks]:
            await self._workers.pop(hook_id).stop()
        for hook in hooks.values():
            worker = self._workers.get(hook.id)
            if worker is None:
                worker = _Worker(self, session, hook)
                self._workers[hook.id] = worker
                worker.start()
            else:
                worker.hook = hook

    def _retry_delay_s(self, attempts_done: int, outcome: Outcome) -> float | None:
        """Wait before the next attempt, or None when the schedule is exhausted."""
        schedule = self._settings.retry_schedule_s
        if attempts_done > len(schedule):
            return None
        wait = schedule[attempts_done - 1]
        if outcome.retry_after_s is not None:
            wait = min(max(wait, outcome.retry_after_s), self._settings.max_retry_after_s)
        jitter = self._settings.jitter
        return wait * random.uniform(1 - jitter, 1 + jitter)

    async def _attempt(
        self, session: aiohttp.ClientSession, hook: Webhook, event: OutboxEvent
    ) -> Outcome:
        """POST one event; every failure becomes an Outcome, never an exception."""
        body = event.structured()
        timestamp = self._now_ms() // 1000
        headers = signing.headers(
            hook.secrets_in_use(self._now_ms()), event.event_id, timestamp, body
        )
        headers["content-type"] = CONTENT_TYPE
        s = self._settings
        started = time.perf_counter()
        try:
            self._guard.check_literal(urlsplit(hook.url).hostname or "")
            async with session.post(
                hook.url,
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=s.timeout_s, sock_connect=s.connect_timeout_s),
            ) as resp:
                raw = await resp.content.read(s.response_cap_bytes)
                excerpt = raw.decode("utf-8", "replace")[: s.excerpt_chars]
                retry_after = _retry_after(resp) if resp.status in (429, 503) else None
                return Outcome(resp.status, _ms(started), excerpt, None, retry_after)
        except SsrfError as exc:
            return Outcome(None, _ms(started), "", f"refused: {exc}")
        except TimeoutError:
            return Outcome(None, _ms(started), "", f"timed out after {s.timeout_s}s")
        except aiohttp.ClientConnectorError as exc:
            reason = exc.os_error.strerror or str(exc.os_error) or type(exc.os_error).__name__
            return Outcome(None, _ms(started), "", f"cannot connect: {reason}")
        except (aiohttp.ClientError, OSError) as exc:
            return Outcome(None, _ms(started), "", f"{type(exc).__name__}: {exc}"[:500])

    async def _settle(
        self,
        hook: Webhook,
        delivery: Delivery,
        outcome: Outcome,
        failing: bool,
        committed_ms: int = 0,
    ) -> bool:
        """Record the attempt and decide what happens next to the delivery and the endpoint;
        True when the endpoint was disabled. ``failing``: its failing clock may be running."""
        now = self._now_ms()
        attempt = Attempt(
            delivery.id,
            now,
            outcome.status_code,
            outcome.latency_ms,
            outcome.excerpt,
            outcome.error,
        )
        if outcome.ok:
            await self._recorder.record(attempt, "delivered", now)
            self._metrics.webhook_attempt("delivered", committed_ms)
            if failing:  # a write per success only when there is a clock to stop
                await self._store.webhook_succeeded(hook.id)
            self.delivered += 1
            return False
        self.failed_attempts += 1
        delay = self._retry_delay_s(delivery.attempts + 1, outcome)
        status, next_ms = ("dead", now) if delay is None else ("pending", now + int(delay * 1000))
        await self._recorder.record(attempt, status, next_ms)
        self._metrics.webhook_attempt(status, committed_ms)
        log.warning(
            "webhook.attempt_failed",
            webhook=hook.id,
            event_id=delivery.event_id,
            status=outcome.status_code,
            error=outcome.error,
            next=status,
        )
        if outcome.status_code == 410:
            await self._store.disable_webhook(hook.id, "410 Gone from the endpoint", now)
            log.error("webhook.disabled", webhook=hook.id, reason="410 Gone")
            return True
        if await self._store.webhook_failed(
            hook.id, now, int(self._settings.disable_after_s * 1000)
        ):
            log.error("webhook.disabled", webhook=hook.id, reason="failing continuously")
            return True
        return False


class _Worker:
    """Delivers one webhook's due deliveries within its own concurrency and rate limits."""

    def __init__(
        self, dispatcher: WebhookDispatcher, session: aiohttp.ClientSession, hook: Webhook
    ) -> None:
        self._dispatcher = dispatcher
        self._session = session
        self.hook = hook
        self.wake = asyncio.Event()
        self._slots = asyncio.Semaphore(dispatcher._settings.concurrency)
        self._inflight: set[int] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._next_send = 0.0
        self.disabled = False  # set by an attempt that disabled the endpoint: take no more work
        self.failing = hook.failing_since_ms is not None

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop(), name=f"webhook:{self.hook.id}")

    async def stop(self) -> None:
        """Stop taking work; let attempts in flight finish (bounded by the request timeout)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _loop(self) -> None:
        d = self._dispatcher
        while not self.disabled:
            try:
                due = await d._store.due_deliveries(
                    self.hook.id, d._now_ms(), 8 * d._settings.concurrency
                )
            except StoreError as exc:
                log.warning("webhook.store_error", webhook=self.hook.id, error=str(exc))
                due = []
            fresh = [(dl, ev) for dl, ev in due if dl.id not in self._inflight]
            if not fresh:
                await self._idle()
                continue
            for delivery, event in fresh:
                await self._slots.acquire()
                if self.disabled:
                    self._slots.release()
                    return
                await self._pace()
                self._inflight.add(delivery.id)
                task = asyncio.create_task(self._deliver(delivery, event))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _idle(self) -> None:
        """Sleep until woken by fan-out or until the next retry is due (at most refresh_s)."""
        d = self._dispatcher
        wait = d._settings.refresh_s
        with contextlib.suppress(StoreError):
            due_ms = await d._store.next_due_ms(self.hook.id)
            if due_ms is not None:
                wait = min(wait, max(0.0, (due_ms - d._now_ms()) / 1000))
        self.wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), wait)

    async def _pace(self) -> None:
        """The endpoint's own rate limit, as a minimum spacing between attempts."""
        rate = self.hook.rate_limit_per_s
        if not rate:
            return
        now = time.monotonic()
        if self._next_send > now:
            await asyncio.sleep(self._next_send - now)
        self._next_send = max(now, self._next_send) + 1.0 / rate

    async def _deliver(self, delivery: Delivery, event: OutboxEvent) -> None:
        d = self._dispatcher
        try:
            with structlog.contextvars.bound_contextvars(
                webhook=self.hook.id, delivery=delivery.id
            ):
                outcome = await d._attempt(self._session, self.hook, event)
                settle = d._settle(self.hook, delivery, outcome, self.failing, event.committed_ms)
                if await asyncio.shield(settle):
                    self.disabled = True
                self.failing = not outcome.ok
        except StoreError as exc:
            log.warning("webhook.store_error", webhook=self.hook.id, error=str(exc))
        finally:
            self._inflight.discard(delivery.id)
            self._slots.release()
            self.wake.set()


class _Recorder:
    """Group commit of attempt records: one store transaction for every attempt that finished
    within ``linger_s`` (profiled: a transaction per attempt capped delivery throughput).
    ``record`` returns once its attempt is durable, so a delivery is never fetched again while
    its result is still in memory.
    """

    def __init__(self, store: Store, linger_s: float = 0.002, max_batch: int = 500) -> None:
        self._store = store
        self._linger_s = linger_s
        self._max_batch = max_batch
        self._pending: list[tuple[Attempt, str, int, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def record(self, attempt: Attempt, status: str, next_ms: int) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((attempt, status, next_ms, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush())
        await future

    async def _flush(self) -> None:
        await asyncio.sleep(self._linger_s)
        while self._pending:
            batch, self._pending = (
                self._pending[: self._max_batch],
                self._pending[self._max_batch :],
            )
            try:
                await self._store.finish_attempts([(a, s, n) for a, s, n, _ in batch])
            except StoreError as exc:
                for *_, future in batch:
                    future.set_exception(exc)
            else:
                for *_, future in batch:
                    future.set_result(None)
        self._flusher = None


def _lease(webhook_id: str) -> str:
    return f"webhook:{webhook_id}"


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)


def _retry_after(resp: aiohttp.ClientResponse) -> float | None:
    value = resp.headers.get("Retry-After", "").strip()
    return float(value) if value.isdigit() else None
