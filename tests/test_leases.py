"""Work under a lease: runs only while held, survives worker failures, stops when the lease is
lost, gives it back on the way out."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Sequence

import pytest

from relay.leases import leased_job, new_replica_id, run_leased
from relay.store import StoreError, StreamLease
from relay.store.coordination import Reservation


class Leases:
    """An in-process coordinator: ``owner`` holds the lease; ``fail`` makes calls raise."""

    shared_budget = True
    lease_s = 0.3

    def __init__(self, replica: str = "me") -> None:
        self.replica = replica
        self.owner: str | None = None
        self.fail = False
        self.released = 0

    async def hold(self, names: Sequence[str]) -> set[str]:
        if self.fail:
            raise StoreError("state store (PostgreSQL at db:5432/relay): query failed")
        if self.owner in (None, self.replica):
            self.owner = self.replica
            return set(names)
        return set()

    async def release(self, names: Sequence[str]) -> None:
        if self.owner == self.replica:
            self.owner = None
        self.released += 1

    async def claim_streams(
        self, account: str, now_ms: int, limit: int, exclude: Collection[int]
    ) -> list[int]:
        return []

    async def renew_streams(self, stream_ids: Collection[int]) -> set[int]:
        return set()

    async def release_streams(self, stream_ids: Collection[int]) -> None:
        return None

    def lease(self, stream_id: int) -> StreamLease | None:
        return None

    async def reserve_request(
        self, account: str, day: str, now_ms: int, burst: int, window_ms: int, allowance: int
    ) -> Reservation:
        return Reservation(True, 0, 0)

    async def return_request(self, account: str, day: str, sent_ms: int) -> int:
        return 0


class Boom(Exception):
    """A worker failure."""


async def test_worker_runs_only_under_the_lease_and_survives_its_failures() -> None:
    """While another replica holds the lease nothing runs; then a failing worker is restarted
    (after a backoff) instead of ending the loop; stop gives the lease back."""
    leases = Leases()
    leases.owner = "other"
    runs = 0

    async def worker(stop: asyncio.Event, valid: Callable[[], bool]) -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise Boom("broker refused")
        await stop.wait()

    stop = asyncio.Event()
    task = asyncio.create_task(run_leased("sink:kafka", leases, worker, stop, backoff_max_s=0.1))
    await asyncio.sleep(0.3)
    assert runs == 0
    leases.owner = None
    for _ in range(100):
        if runs >= 2:
            break
        await asyncio.sleep(0.02)
    assert runs == 2
    stop.set()
    await asyncio.wait_for(task, 5)
    assert leases.owner is None  # given back, not left to expire


async def test_lost_lease_stops_the_worker_and_fatal_errors_propagate() -> None:
    """Renewals failing for longer than the lease stop the worker; a fatal error ends the
    loop with that error."""
    leases = Leases()
    stopped = asyncio.Event()

    async def worker(stop: asyncio.Event, valid: Callable[[], bool]) -> None:
        await stop.wait()
        stopped.set()

    stop = asyncio.Event()
    task = asyncio.create_task(run_leased("sink:kafka", leases, worker, stop))
    await asyncio.sleep(0.15)
    leases.fail = True  # the database is unreachable: the lease cannot be renewed
    await asyncio.wait_for(stopped.wait(), 2)
    stop.set()
    await asyncio.wait_for(task, 5)

    async def misconfigured(stop: asyncio.Event, valid: Callable[[], bool]) -> None:
        raise Boom("topic does not exist")

    with pytest.raises(Boom):
        await asyncio.wait_for(
            run_leased("sink:kafka", Leases(), misconfigured, asyncio.Event(), fatal=(Boom,)), 5
        )


async def test_leased_job_runs_on_the_holder_only() -> None:
    """A periodic job runs where its lease is taken and gives it back after each run."""
    ran: list[str] = []
    mine, theirs = Leases("me"), Leases("other")
    theirs.owner = "me"  # "me" holds it: "other" must skip

    async def job() -> None:
        ran.append("run")

    await leased_job(mine, "discover:acme", job)()
    await leased_job(theirs, "discover:acme", job)()
    assert ran == ["run"]
    assert mine.owner is None


def test_replica_ids_are_unique_per_process_and_call() -> None:
    """host-pid-random: two ids never collide, both name this process."""
    first, second = new_replica_id(), new_replica_id()
    assert first != second
    assert first.rsplit("-", 2)[1] == second.rsplit("-", 2)[1]


class SlowLeases(Leases):
    """Leases renewed every 10 s: a worker's end or a stop must not wait for the tick."""

    lease_s = 30.0


async def test_a_worker_failure_or_a_stop_is_noticed_at_once() -> None:
    """run_leased waited for the next renewal tick (a third of the lease) before it saw a fatal
    error of the worker, or a stop."""

    async def misconfigured(stop: asyncio.Event, valid: Callable[[], bool]) -> None:
        raise Boom("topic does not exist")

    with pytest.raises(Boom):
        await asyncio.wait_for(
            run_leased("sink:kafka", SlowLeases(), misconfigured, asyncio.Event(), fatal=(Boom,)),
            2,
        )

    async def worker(stop: asyncio.Event, valid: Callable[[], bool]) -> None:
        await stop.wait()

    stop = asyncio.Event()
    task = asyncio.create_task(run_leased("sink:kafka", SlowLeases(), worker, stop))
    await asyncio.sleep(0.1)
    stop.set()
    await asyncio.wait_for(task, 2)


async def test_cancelling_run_leased_cancels_and_awaits_its_worker() -> None:
    """When its owner's grace runs out and cancels it, run_leased ends its worker before it
    ends: the worker (the Kafka sink) outlived it and went on after the store closed."""
    running = asyncio.Event()
    worker_ended = asyncio.Event()

    async def stubborn(stop: asyncio.Event, valid: Callable[[], bool]) -> None:  # unresponsive
        running.set()
        try:
            await asyncio.sleep(3600)
        finally:
            worker_ended.set()

    leases = Leases()
    stop = asyncio.Event()
    task = asyncio.create_task(run_leased("sink:kafka", leases, stubborn, stop, grace_s=60))
    await asyncio.wait_for(running.wait(), 2)
    stop.set()
    await asyncio.sleep(0.1)  # run_leased now waits out its grace for the worker
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2)
    assert worker_ended.is_set()
    assert leases.owner is None  # given back


async def test_the_lease_is_given_back_when_the_wait_for_a_cancelled_worker_is_cancelled() -> None:
    """A worker slow to end once cancelled (the Kafka sink flushing to an unreachable broker)
    and run_leased cancelled again while it waits for it: the lease is still given back, so the
    other replicas need not wait out its term."""
    running = asyncio.Event()

    async def slow_to_end(stop: asyncio.Event, valid: Callable[[], bool]) -> None:
        running.set()
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(3600)  # cleanup that hangs until cancelled again

    leases = Leases()
    stop = asyncio.Event()
    task = asyncio.create_task(run_leased("sink:kafka", leases, slow_to_end, stop, grace_s=60))
    await asyncio.wait_for(running.wait(), 2)
    stop.set()
    await asyncio.sleep(0.1)  # run_leased waits out its grace for the worker
    task.cancel()  # its owner's grace ran out
    await asyncio.sleep(0.1)  # run_leased waits for the cancelled worker
    task.cancel()  # the owner gives up on it too
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2)
    assert leases.owner is None, "given back"
    assert leases.released == 1


class RoundTripLeases(Leases):
    """Leases whose ``hold`` takes a database round trip and counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.holds = 0

    async def hold(self, names: Sequence[str]) -> set[str]:
        self.holds += 1
        await asyncio.sleep(0.05)
        return await super().hold(names)


async def test_a_lease_run_out_while_paused_is_lost_at_once_without_asking_the_store() -> None:
    """A holder paused (SIGSTOP) past its lease while another replica took it over finds the
    lease invalid the moment it resumes, and is stopped without a renewal: the renewal's round
    trip was the window in which the resumed Kafka sink published again what the successor had
    already published (rev9)."""
    leases = RoundTripLeases()
    checks: list[Callable[[], bool]] = []
    started, stopped = asyncio.Event(), asyncio.Event()

    async def worker(stop: asyncio.Event, valid: Callable[[], bool]) -> None:
        checks.append(valid)
        started.set()
        await stop.wait()
        stopped.set()

    stop = asyncio.Event()
    task = asyncio.create_task(run_leased("sink:kafka", leases, worker, stop))
    await asyncio.wait_for(started.wait(), 2)
    [valid] = checks
    assert valid()
    await asyncio.sleep(0.15)  # renewed at least once: still valid
    assert valid()
    leases.owner = "other"  # the lease ran out and a successor took it, while ...
    asked = leases.holds
    # ... this process was paused: its event loop did not run (a blocking sleep is the pause)
    time.sleep(2 * leases.lease_s)  # noqa: ASYNC251
    assert not valid()  # nothing may be sent now, before any task of ours runs
    await asyncio.wait_for(stopped.wait(), 2)
    assert leases.holds == asked  # stopped on its own clock: no round trip first
    stop.set()
    await asyncio.wait_for(task, 5)


async def test_the_validity_check_turns_false_when_a_renewal_loses_the_lease() -> None:
    """The store answering that another replica holds the lease makes the worker's check false
    before the worker is stopped, not only once the lease's time is up."""
    leases = Leases()
    seen: list[bool] = []

    async def worker(stop: asyncio.Event, valid: Callable[[], bool]) -> None:
        await stop.wait()
        seen.append(valid())

    stop = asyncio.Event()
    task = asyncio.create_task(run_leased("sink:kafka", leases, worker, stop))
    await asyncio.sleep(0.05)
    leases.owner = "other"
    for _ in range(100):
        if seen:
            break
        await asyncio.sleep(0.01)
    assert seen == [False]
    stop.set()
    await asyncio.wait_for(task, 5)
