"""Work that one replica at a time does, under a lease of the store's :class:`Coordinator`.

``run_leased`` keeps a worker (the Kafka sink) running only while this replica holds its lease:
it takes the lease (waiting while another replica holds it), starts the worker, renews the lease
every third of its length, and stops the worker when a renewal fails or does not come back before
the lease would expire, or when the lease ran out by this process's own clock before it could be
renewed at all (the process was paused: no store call decides that). The worker also gets a cheap
check of the same clock (``Tenure.valid``) to call right before each send. A worker that fails,
or a lost lease, never ends the process: it logs, backs off and tries to take the lease again.
The scheduler times each stream pass's lease with a ``Tenure`` too (renewed by its own renewals):
the pass checks it before each upstream request (``relay.store.StreamLease``).
``leased_job`` runs a periodic job (discovery, pruning) on the replica that gets its lease;
``AccountBudget`` is an api_key's shared budget as the rate limiter sees it. Replica ids are
generated per process: nothing to configure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import structlog

from relay.ctct.ratelimit import SharedReply
from relay.store import StoreError
from relay.store.coordination import Coordinator

log = structlog.get_logger(__name__)

# the worker gets its stop event and the lease's validity check (``Tenure.valid``)
Worker = Callable[[asyncio.Event, Callable[[], bool]], Coroutine[Any, Any, None]]


class Tenure:
    """A lease as this process's monotonic clock sees it, no store call needed: held until the
    start of the last successful ``hold`` plus ``lease_s`` (the store's expiry is no earlier),
    less a safety margin of a tenth of the lease. The clock runs on while the process is
    paused (SIGSTOP, a frozen VM), so a paused holder finds its lease gone when it resumes,
    before it does anything else, even though its renewal loop has not run yet."""

    def __init__(self, lease_s: float, asked: float) -> None:
        self._lease_s = lease_s
        self._until = asked + 0.9 * lease_s
        self._lost = False

    def renewed(self, asked: float) -> None:
        """A ``hold`` started at monotonic time ``asked`` kept the lease."""
        self._until = asked + 0.9 * self._lease_s

    def lose(self) -> None:
        self._lost = True

    def left_s(self) -> float:
        """Seconds the lease can still be relied on (0 or less: it is lost)."""
        return -1.0 if self._lost else self._until - time.monotonic()

    def valid(self) -> bool:
        return self.left_s() > 0


def new_replica_id() -> str:
    """``host-pid-random``: unique per process, readable in logs and lease tables."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class AccountBudget:
    """One budget's per-second and daily limits, shared by every replica (``SharedBudget``).
    ``budget`` names it in the request log and the quota count: ``AccountSettings.budget_name``,
    one per api_key, so the accounts sharing a key share it too."""

    def __init__(self, coordinator: Coordinator, budget: str) -> None:
        self._coordinator = coordinator
        self._account = budget

    async def reserve(
        self, day: str, now_ms: int, burst: int, window_ms: int, allowance: int
    ) -> SharedReply:
        r = await self._coordinator.reserve_request(
            self._account, day, now_ms, burst, window_ms, allowance
        )
        return SharedReply(r.admitted, r.wait_ms, r.used_today, r.sent_ms, r.day, r.day_left_ms)

    async def give_back(self, day: str, sent_ms: int) -> int:
        return await self._coordinator.return_request(self._account, day, sent_ms)


async def run_leased(
    name: str,
    coordinator: Coordinator,
    worker: Worker,
    stop: asyncio.Event,
    *,
    fatal: tuple[type[BaseException], ...] = (),
    grace_s: float = 30.0,
    backoff_max_s: float = 30.0,
) -> None:
    """Run ``worker(its_stop)`` while holding lease ``name``, until ``stop``.

    Exceptions of the ``fatal`` types (configuration the worker can never work with) end this
    and propagate; any other failure, of the worker or of the store, is logged and retried.
    """
    renew_s = coordinator.lease_s / 3
    failures = 0
    while not stop.is_set():
        started = time.monotonic()
        if not await _take(name, coordinator):
            await _sleep_or_stop(stop, renew_s)
            continue
        log.info("lease.acquired", lease=name)
        tenure = Tenure(coordinator.lease_s, started)
        worker_stop = asyncio.Event()
        task = asyncio.create_task(worker(worker_stop, tenure.valid), name=f"leased:{name}")
        done: set[asyncio.Task[None]] = set()
        try:
            await _renew_while_running(name, coordinator, task, stop, tenure)
            worker_stop.set()
            done, _ = await asyncio.wait({task}, timeout=grace_s)
        finally:
            worker_stop.set()
            try:
                # the grace ran out, or this was cancelled (its owner's grace ran out): either
                # way the worker must not outlive this (it would publish after the store closed)
                if not done:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            finally:
                # also when that wait is cancelled in turn: a lease kept would hold the other
                # replicas off for its whole term
                await _give_back(name, coordinator)
        error = task.exception() if task.done() and not task.cancelled() else None
        if isinstance(error, fatal):
            raise error
        if error is None and stop.is_set():
            return
        failures = 1 if time.monotonic() - started > coordinator.lease_s else failures + 1
        delay_s = min(backoff_max_s, 0.5 * 2 ** min(failures, 8))
        if error is not None:
            log.error("leased.failed", lease=name, error=str(error), retry_in_s=delay_s)
        await _sleep_or_stop(stop, delay_s)


async def _renew_while_running(
    name: str,
    coordinator: Coordinator,
    task: asyncio.Task[None],
    stop: asyncio.Event,
    tenure: Tenure,
) -> None:
    """Renew the lease until the worker ends, ``stop`` is set, or the lease is lost."""
    lease_s = coordinator.lease_s
    stopping = asyncio.ensure_future(stop.wait())
    try:
        while not stop.is_set() and not task.done():
            # whichever comes first: a worker's end or a stop must not wait for the next tick
            await asyncio.wait(
                {task, stopping}, timeout=lease_s / 3, return_when=asyncio.FIRST_COMPLETED
            )
            if stop.is_set() or task.done():
                return
            # a lease that ran out by our own clock (the process was paused) is lost, whatever
            # the store would say: another replica may have taken it and published meanwhile
            left_s = tenure.left_s()
            if left_s <= 0:
                tenure.lose()
                log.warning("lease.lost", lease=name, reason="ran out before its renewal")
                return
            # a renewal that cannot finish before the lease runs out is a lost lease: another
            # replica may take it then, and two publishers would break per-contact order
            started = time.monotonic()
            try:
                held = name in await asyncio.wait_for(coordinator.hold([name]), left_s)
            except (StoreError, TimeoutError) as exc:
                log.warning("lease.renew_failed", lease=name, error=str(exc) or "timed out")
                held = False
            if not held:
                tenure.lose()
                log.warning("lease.lost", lease=name)
                return
            tenure.renewed(started)
    finally:
        stopping.cancel()


async def _take(name: str, coordinator: Coordinator) -> bool:
    try:
        return name in await coordinator.hold([name])
    except StoreError as exc:
        log.warning("lease.error", lease=name, error=str(exc))
        return False


async def _give_back(name: str, coordinator: Coordinator) -> None:
    try:
        await asyncio.shield(coordinator.release([name]))
    except StoreError as exc:
        log.warning("lease.release_failed", lease=name, error=str(exc))


def leased_job(
    coordinator: Coordinator, name: str, job: Callable[[], Awaitable[None]]
) -> Callable[[], Awaitable[None]]:
    """A periodic job that runs on whichever replica holds lease ``name`` at the time; the
    lease is given back after each run."""

    async def run() -> None:
        if not await _take(name, coordinator):
            return
        try:
            await job()
        finally:
            await _give_back(name, coordinator)

    return run


async def exclusively(
    coordinator: Coordinator, name: str, job: Callable[[], Awaitable[None]], timeout_s: float
) -> None:
    """Run ``job`` once while holding lease ``name``, waiting for another replica to finish its
    own run (start-up work such as upserting declared webhooks); raises StoreError after
    ``timeout_s`` without the lease."""
    deadline = time.monotonic() + timeout_s
    while not await _take(name, coordinator):
        if time.monotonic() > deadline:
            raise StoreError(f"lease {name!r}: still held by another replica after {timeout_s}s")
        await asyncio.sleep(0.2)
    try:
        await job()
    finally:
        await _give_back(name, coordinator)


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
