"""The scheduler's arithmetic: rate estimates and the square-root rule under a budget."""

from __future__ import annotations

import asyncio
import io
import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
from structlog.testing import capture_logs

from relay import logs
from relay.ctct import errors
from relay.ctct.ratelimit import Budget, RateLimiter
from relay.metrics import Metrics
from relay.poller import PassOutcome, Poller
from relay.scheduler import (
    AccountRuntime,
    Planner,
    Scheduler,
    ScheduleSettings,
    SqrtPolicy,
    estimate_rate,
    repeat_interval_s,
)
from relay.store import (
    LeaseLostError,
    PassResult,
    PostgresSettings,
    PostgresStore,
    Store,
    StoreError,
    Stream,
    StreamKey,
    StreamLease,
    open_store,
)
from relay.store.coordination import PgCoordinator

WIDE = ScheduleSettings(min_interval_s=1, max_interval_s=10**9)


def test_four_times_the_rate_is_polled_twice_as_often() -> None:
    """Intervals follow sqrt(cost/rate), scaled so the plan spends exactly the budget."""
    policy = SqrtPolicy(WIDE)
    policy.update(1, 400.0, 1.0)
    policy.update(2, 100.0, 1.0)
    budget = 0.1
    t1, t2 = policy.interval_s(1, budget), policy.interval_s(2, budget)
    assert t2 / t1 == pytest.approx(2.0)
    assert 1 / t1 + 1 / t2 == pytest.approx(budget)


def test_intervals_stay_within_bounds() -> None:
    """A silent stream settles at max_interval_s, a busy one at min_interval_s."""
    settings = ScheduleSettings(min_interval_s=60, max_interval_s=3600)
    policy = SqrtPolicy(settings)
    policy.update(1, 0.0, 1.0)
    policy.update(2, 10**9, 1.0)
    assert policy.interval_s(1, 0.001) == 3600
    assert policy.interval_s(2, 1000.0) == 60


def test_removing_a_stream_frees_its_share() -> None:
    """After a stream is retired, the others get its share of the budget."""
    policy = SqrtPolicy(WIDE)
    policy.update(1, 100.0, 1.0)
    policy.update(2, 100.0, 1.0)
    before = policy.interval_s(1, 0.1)
    policy.remove(2)
    assert policy.interval_s(1, 0.1) == pytest.approx(before / 2)


def test_a_long_quiet_pass_drops_the_rate_fast() -> None:
    """A pass covering hours with nothing new outweighs the history; a short one does not."""
    long_quiet = estimate_rate(1000.0, 0, 4 * 3600, 0.5, 1800)
    short_quiet = estimate_rate(1000.0, 0, 10, 0.5, 1800)
    assert long_quiet == pytest.approx(1000.0 * math.exp(-8), rel=1e-6)
    assert short_quiet == pytest.approx(500.0)


def test_planner_first_pass_uses_the_prior() -> None:
    """A never-polled stream starts from prior_rate_per_h; a busy pass raises it."""
    planner = Planner(ScheduleSettings(prior_rate_per_h=120, min_interval_s=1))
    rate, interval = planner.after_pass(7, None, 60, 60.0, 3, 0.1)
    assert rate > 120
    assert interval >= 1


def test_a_stream_gone_silent_is_not_mistaken_for_one_never_polled() -> None:
    """A quiet stream's rate decays to exactly 0.0 after ~16 days of 6-hourly passes. Loaded
    back (start-up, target changes, discovery) it must keep that rate, not the busy prior: 1000
    such streams at the prior stretched a busy stream's interval from ~200 s to hours."""
    settings = ScheduleSettings()
    rate, passes = settings.prior_rate_per_h, 0
    while rate > 0 and passes < 1000:
        rate = estimate_rate(rate, 0, 6 * 3600, settings.smoothing, settings.rate_memory_s)
        passes += 1
    assert rate == 0.0
    assert passes < 100
    budget = 9000 / 86400 * 0.9
    silent, never = Planner(settings), Planner(settings)
    for stream_id in range(1000):
        silent.load(stream_id, 0.0)
        never.load(stream_id, None)
    for planner in (silent, never):
        planner.load(10_000, 600.0)
    busy_silent = silent.policy.interval_s(10_000, budget)
    busy_never = never.policy.interval_s(10_000, budget)
    assert busy_silent < 600 < 5 * busy_silent < busy_never


class StandInPoller:
    """Stands in for the poller (no upstream here): remembers each pass the scheduler starts
    (stream id, replay start, interval of reads by time handed), raises what ``fail`` says the
    upstream would, else answers with one request spent and the watermarks unchanged."""

    repeat_read_s = 21_600.0  # Poller.repeat_read_s: poll.repeat_read_s

    repeat_feeds: int | None = None

    def __init__(self) -> None:
        self.started: list[tuple[int, int | None, float | None]] = []

    @property
    def passes(self) -> list[int]:
        return [stream_id for stream_id, _, _ in self.started]

    @property
    def calls(self) -> int:
        return len(self.started)

    def fail(self) -> None:
        """Raise what the pass just started fails with (nothing, here)."""

    async def run_pass(
        self,
        stream: Stream,
        replay_from_ms: int | None = None,
        repeat_every_s: float | None = None,
        *,
        lease: StreamLease | None = None,
    ) -> PassOutcome:
        self.started.append((stream.id, replay_from_ms, repeat_every_s))
        self.fail()
        watermarks = dict(stream.watermarks)
        return PassOutcome(requests=1, watermarks=watermarks, repeat_feeds=self.repeat_feeds)


class RecordingPoller(StandInPoller):
    """Records the passes the scheduler starts with their replay starts."""

    @property
    def replays(self) -> list[tuple[int, int | None]]:
        return [(stream_id, replay) for stream_id, replay, _ in self.started]


async def test_operator_holds_and_replays_reach_the_passes(tmp_path: Path) -> None:
    """A held account starts no pass until released; a replay request goes to the next pass
    of its stream and is cleared once that pass finished."""
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await store.open()
    try:
        now = 1_763_000_000_000
        await store.ensure_streams([StreamKey("acme", "contact", "1")], now)
        sid = (await store.streams())[0].id
        poller = RecordingPoller()
        runtime = AccountRuntime("acme", cast(Poller, poller), RateLimiter(Budget()), Planner(WIDE))
        scheduler = Scheduler(store, [runtime], WIDE, now_ms=lambda: now)
        await store.hold_account("acme", "maintenance", now)
        await scheduler.tick()
        await scheduler.wait_idle()
        assert poller.replays == []
        await store.release_account("acme")
        await store.request_replay([sid], now - 5000, now)
        await scheduler.tick()
        await scheduler.wait_idle()
        assert poller.replays == [(sid, now - 5000)]
        assert await store.stream_replay(sid) is None
    finally:
        await store.close()


async def test_stop_waits_for_a_running_job_to_unwind(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A job still running at stop is cancelled and has finished before stop returns, so it
    never touches a store that closes next; the cancellation is no error (APScheduler logged
    it as the job raising, with a traceback, at every shutdown)."""
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await store.open()
    try:
        runtime = AccountRuntime(
            "acme", cast(Poller, RecordingPoller()), RateLimiter(Budget()), Planner(WIDE)
        )
        scheduler = Scheduler(store, [runtime], WIDE)
        started, unwound = asyncio.Event(), asyncio.Event()

        async def slow_job() -> None:
            started.set()
            try:
                await asyncio.sleep(60)
            finally:
                await asyncio.sleep(0.05)  # cleanup that needs the loop, like a lease release
                unwound.set()

        scheduler.add_job(slow_job, 3600, "slow")
        await scheduler.start()
        await asyncio.wait_for(started.wait(), 5)
        with caplog.at_level(logging.INFO, logger="apscheduler"):
            await scheduler.stop()
            await asyncio.sleep(0.05)  # APScheduler's own task reports the job's end
        assert unwound.is_set()
        errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert errors == [], [r.getMessage() for r in errors]
    finally:
        await store.close()


SECRET_URL = "/v2/contacts/1/tracking?api_key=k-secret-key"


class CrashingPoller(StandInPoller):
    """A poller with a defect: its first ``crashes`` passes raise RuntimeError."""

    def __init__(self, crashes: int) -> None:
        super().__init__()
        self.crashes = crashes

    def fail(self) -> None:
        if self.calls <= self.crashes:
            raise RuntimeError(f"parse edge case in {SECRET_URL}")


class StoreFailingPoller(StandInPoller):
    """A poller whose passes fail on the state store while ``failing`` (a full disk)."""

    failing = True

    def fail(self) -> None:
        if self.failing:
            raise StoreError("state store (/data/state.db): database or disk is full")


async def test_passes_failing_on_the_store_hold_back_new_passes(tmp_path: Path) -> None:
    """A pass that fails on the store starts a backoff during which no pass starts (1 s,
    doubling while the store keeps failing, to 60 s): each pass spends requests before it
    commits, and due streams retried at every tick spent them for nothing. The first pass that
    gets through ends the backoff."""
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await store.open()
    try:
        clock = [1_763_000_000_000]
        await store.ensure_streams([StreamKey("acme", "contact", "1")], clock[0])
        poller = StoreFailingPoller()
        runtime = AccountRuntime("acme", cast(Poller, poller), RateLimiter(Budget()), Planner(WIDE))
        scheduler = Scheduler(store, [runtime], WIDE, now_ms=lambda: clock[0])

        async def tick_at(offset_ms: int) -> None:
            clock[0] += offset_ms
            await scheduler.tick()
            await scheduler.wait_idle()

        await tick_at(0)
        assert poller.calls == 1  # failed: 1 s
        await tick_at(999)
        assert poller.calls == 1
        await tick_at(1)
        assert poller.calls == 2  # failed again: 2 s
        await tick_at(1_999)
        assert poller.calls == 2
        await tick_at(1)
        assert poller.calls == 3  # then 4 s, 8 s, ... at most 60 s
        for _ in range(10):
            await tick_at(60_000)
        assert poller.calls == 13
        await tick_at(59_999)
        assert poller.calls == 13
        poller.failing = False
        await tick_at(1)
        assert poller.calls == 14  # through: no backoff any more
        await store.request_replay([(await store.streams())[0].id], clock[0] - 1000, clock[0])
        await tick_at(0)
        assert poller.calls == 15
    finally:
        await store.close()


async def test_a_pass_failing_on_the_store_is_logged_with_its_account_and_poll_id(
    tmp_path: Path,
) -> None:
    """The line of a pass that failed on the state store names the account and the pass's
    poll_id, as the pass's other lines do, with the stream's id (it had only the stream_id: the
    failure fell outside the pass's bound context, so grepping the poll_id or the account
    missed it)."""
    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await store.open()
    try:
        await store.ensure_streams([StreamKey("acme", "contact", "1")], 1_763_000_000_000)
        poller = StoreFailingPoller()
        runtime = AccountRuntime("acme", cast(Poller, poller), RateLimiter(Budget()), Planner(WIDE))
        scheduler = Scheduler(store, [runtime], WIDE, now_ms=lambda: 1_763_000_000_000)
        await scheduler.tick()
        await scheduler.wait_idle()
    finally:
        await store.close()
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    (failed,) = [line for line in lines if line["event"] == "poll.store_error"]
    assert failed["account"] == "acme"
    assert failed["stream_id"] == 1
    assert len(failed["poll_id"]) == 12


class FencedPoller(StandInPoller):
    """A poller whose passes end on a lost stream lease (another replica took the stream
    over while this one was paused)."""

    def fail(self) -> None:
        raise LeaseLostError("stream 1: this pass's lease (claim 1) is gone")


async def test_a_pass_whose_lease_was_lost_records_nothing_and_holds_nothing_back(
    tmp_path: Path,
) -> None:
    """A pass ending on LeaseLostError is no failure of the store nor of the stream: logged as
    poll.lease_lost and counted by its class, no error recorded for the stream (it is the new
    holder's), and the next due stream's pass starts at the next tick (a store error's backoff
    would hold every pass back)."""
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await store.open()
    try:
        clock = [1_763_000_000_000]
        await store.ensure_streams([StreamKey("acme", "contact", str(n)) for n in (1, 2)], clock[0])
        poller = FencedPoller()
        runtime = AccountRuntime("acme", cast(Poller, poller), RateLimiter(Budget()), Planner(WIDE))
        metrics = Metrics(lambda: clock[0])
        settings = ScheduleSettings(min_interval_s=1, max_interval_s=10**9, concurrency=1)
        scheduler = Scheduler(store, [runtime], settings, now_ms=lambda: clock[0], metrics=metrics)
        with capture_logs() as logs:
            await scheduler.tick()
            await scheduler.wait_idle()
            await scheduler.tick()
            await scheduler.wait_idle()
        assert poller.calls == 2
        assert [line["event"] for line in logs if line["log_level"] == "warning"] == [
            "poll.lease_lost",
            "poll.lease_lost",
        ]
        streams = await store.streams()
        assert [(s.consecutive_errors, s.last_error) for s in streams] == [(0, None), (0, None)]
        passes = {"account": "acme", "result": "LeaseLostError"}
        assert metrics.registry.get_sample_value("ctct_relay_poll_passes_total", passes) == 2
    finally:
        await store.close()


async def test_a_pass_that_crashes_is_a_failed_pass_with_backoff(tmp_path: Path) -> None:
    """An unexpected exception from a pass is logged as poll.crashed, counted, and recorded as a
    failed pass that backs off like an upstream error, instead of leaving the stream due and
    claimed again at every tick; the next pass after the backoff runs normally."""
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await store.open()
    try:
        clock = [1_763_000_000_000]
        await store.ensure_streams([StreamKey("acme", "contact", "1")], clock[0])
        poller = CrashingPoller(crashes=1)
        runtime = AccountRuntime("acme", cast(Poller, poller), RateLimiter(Budget()), Planner(WIDE))
        metrics = Metrics(lambda: clock[0])
        settings = ScheduleSettings(min_interval_s=1, max_interval_s=10**9, error_backoff_s=30)
        scheduler = Scheduler(store, [runtime], settings, now_ms=lambda: clock[0], metrics=metrics)
        out = io.StringIO()
        logs.configure("info", "json", secrets=["k-secret-key"], stream=out)
        await scheduler.tick()
        await scheduler.wait_idle()
        stream = (await store.streams())[0]
        assert poller.calls == 1
        assert stream.consecutive_errors == 1
        assert stream.last_error == f"RuntimeError: parse edge case in {SECRET_URL}"
        assert clock[0] + 15_000 <= stream.next_due_ms <= clock[0] + 30_000
        assert "k-secret-key" not in out.getvalue()
        lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
        crashed = [line for line in lines if line["event"] == "poll.crashed"]
        assert len(crashed) == 1
        assert crashed[0]["level"] == "error"
        assert crashed[0]["error_type"] == "RuntimeError"
        assert crashed[0]["error"] == "parse edge case in /v2/contacts/1/tracking?api_key=***"
        assert crashed[0]["poll_id"]
        assert "in run_pass" in crashed[0]["exception"]  # the traceback, in the log only
        result = {"account": "acme", "result": "RuntimeError"}
        assert metrics.registry.get_sample_value("ctct_relay_poll_passes_total", result) == 1
        for _ in range(3):  # within the backoff: the stream is not claimed again
            clock[0] += 1000
            await scheduler.tick()
            await scheduler.wait_idle()
        assert poller.calls == 1
        clock[0] = stream.next_due_ms
        await scheduler.tick()
        await scheduler.wait_idle()
        assert poller.calls == 2
        assert scheduler.passes == 1
        stream = (await store.streams())[0]
        assert stream.consecutive_errors == 0
    finally:
        await store.close()


class BrokenPlanner(Planner):
    """A planner with a defect: its arithmetic after a pass raises."""

    def after_pass(self, *args: object, **kwargs: object) -> tuple[float, float]:
        raise ZeroDivisionError("float division by zero")


async def test_a_pass_whose_bookkeeping_crashes_backs_off_too(tmp_path: Path) -> None:
    """A defect after the pages were read (the planner's arithmetic) is a failed pass as well:
    the stream backs off instead of being claimed again at every tick."""
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await store.open()
    try:
        now = 1_763_000_000_000
        await store.ensure_streams([StreamKey("acme", "contact", "1")], now)
        poller = RecordingPoller()
        runtime = AccountRuntime(
            "acme", cast(Poller, poller), RateLimiter(Budget()), BrokenPlanner(WIDE)
        )
        scheduler = Scheduler(store, [runtime], WIDE, now_ms=lambda: now)
        for _ in range(3):
            await scheduler.tick()
            await scheduler.wait_idle()
        stream = (await store.streams())[0]
        assert len(poller.passes) == 1
        assert stream.consecutive_errors == 1
        assert stream.last_error == "ZeroDivisionError: float division by zero"
        assert stream.next_due_ms > now
    finally:
        await store.close()


class TooManyRequestsPoller(StandInPoller):
    """An upstream answering the first pass with a 429 whose Retry-After the client did not
    wait out (longer than ``http.max_retry_after_s``); later passes succeed."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__()
        self.retry_after_s = retry_after_s

    def fail(self) -> None:
        if len(self.started) == 1:
            raise errors.TooManyRequestsError(
                "GET /v2/emailmarketing/campaigns/1/tracking/opens answered 429",
                endpoint="campaign_opens",
                status=429,
                retry_after_s=self.retry_after_s,
            )


async def _paused_by_429(tmp_path: Path, retry_after_s: float) -> tuple[int, int, str]:
    """Five due streams, one pass at a time, the first one answered 429; ticks every minute
    until the pause ends, asserting no stream is polled before: (start, paused until, reason)."""
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await store.open()
    try:
        start = 1_763_000_000_000
        clock = [start]
        await store.ensure_streams([StreamKey("acme", "contact", str(i)) for i in range(5)], start)
        poller = TooManyRequestsPoller(retry_after_s)
        runtime = AccountRuntime("acme", cast(Poller, poller), RateLimiter(Budget()), Planner(WIDE))
        # a per-stream backoff of about a second: only the account's pause keeps streams waiting
        settings = ScheduleSettings(
            min_interval_s=1, max_interval_s=10**9, concurrency=1, error_backoff_s=1
        )
        scheduler = Scheduler(store, [runtime], settings, now_ms=lambda: clock[0])
        await scheduler.tick()
        await scheduler.wait_idle()
        assert len(poller.passes) == 1
        paused_until = runtime.paused_until_ms
        until_ms, reason = (await store.account_pauses())["acme"]
        assert until_ms == paused_until
        while clock[0] + 60_000 < paused_until:
            clock[0] += 60_000
            await scheduler.tick()
            await scheduler.wait_idle()
            assert len(poller.passes) == 1, f"a stream was polled {clock[0] - start} ms in"
        clock[0] = paused_until
        await scheduler.tick()
        await scheduler.wait_idle()
        assert len(poller.passes) == 2  # the pause ends by itself
        assert "acme" not in await store.account_pauses()
        return start, paused_until, reason
    finally:
        await store.close()


async def test_a_429_with_a_long_retry_after_pauses_the_whole_account(tmp_path: Path) -> None:
    """A Retry-After the client handed back (longer than it waits in place) pauses every stream
    of the account until it has passed, not only the stream whose pass got the 429: the others
    would each get their own 429 and spend the daily budget."""
    start, paused_until, reason = await _paused_by_429(tmp_path, 3600.0)
    assert paused_until == start + 3_600_000
    assert "Retry-After 3600 s" in reason
    assert "answered 429" in reason


async def test_a_bogus_retry_after_pauses_the_account_for_a_day_at_most(tmp_path: Path) -> None:
    """A Retry-After of years is capped at 24 h."""
    start, paused_until, reason = await _paused_by_429(tmp_path, 10.0**9)
    assert paused_until == start + 86_400_000
    assert "Retry-After 1e+09 s" in reason


class RaisingPoller(StandInPoller):
    """Every pass raises the error ``make`` builds for the time on ``clock``, until ``fixed``;
    then passes succeed."""

    def __init__(self, make: Callable[[int], Exception], clock: list[int]) -> None:
        super().__init__()
        self.make = make
        self.clock = clock
        self.fixed = False

    def fail(self) -> None:
        if not self.fixed:
            raise self.make(self.clock[0])


T_PAUSE = 1_763_000_000_000


def midnight_after(now_ms: int) -> datetime:
    return datetime.fromtimestamp(now_ms // 86_400_000 * 86_400 + 86_400, UTC)


def over_ratelimit(now_ms: int) -> Exception:
    return errors.QuotaExhaustedError(
        "answered 403 (mashery.not.authorized.over.ratelimit)",
        resume_at=midnight_after(now_ms),
        status=403,
        error_key="mashery.not.authorized.over.ratelimit",
    )


BUDGET_ERRORS = [
    pytest.param(
        lambda now: errors.BudgetExhaustedError("allowance spent", resume_at=midnight_after(now)),
        True,
        id="local-daily-allowance",
    ),
    pytest.param(over_ratelimit, True, id="upstream-403-over-ratelimit"),
    pytest.param(
        lambda now: errors.TooManyRequestsError("answered 429", status=429, retry_after_s=3600.0),
        True,
        id="upstream-429-retry-after",
    ),
    pytest.param(lambda now: errors.TooManyRequestsError("answered 429"), False, id="upstream-429"),
    pytest.param(
        lambda now: errors.OverQpsError(
            "answered 403 (mashery.not.authorized.over.qps)",
            status=403,
            error_key="mashery.not.authorized.over.qps",
        ),
        False,
        id="upstream-403-over-qps",
    ),
]


@pytest.mark.parametrize(("make", "pauses_account"), BUDGET_ERRORS)
async def test_a_budget_pause_is_not_a_stream_error(
    tmp_path: Path, make: Callable[[int], Exception], pauses_account: bool
) -> None:
    """A pass stopped because the account's budget ran out (the daily quota, locally or by the
    API's 403; a 429; the API's per-second limit after the retries) is not counted as the
    stream's error and its backoff does not grow: a spent quota or a Retry-After pauses the
    account, the per-second limit defers the stream by error_backoff_s, never doubled."""
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await store.open()
    try:
        clock = [T_PAUSE]
        await store.ensure_streams([StreamKey("acme", "contact", "1")], T_PAUSE)
        poller = RaisingPoller(make, clock)
        runtime = AccountRuntime("acme", cast(Poller, poller), RateLimiter(Budget()), Planner(WIDE))
        scheduler = Scheduler(store, [runtime], WIDE, now_ms=lambda: clock[0])
        for _ in range(4):  # each time the pause ends the budget has run out again
            await scheduler.tick()
            await scheduler.wait_idle()
            stream = (await store.streams())[0]
            if pauses_account:
                until_ms = (await store.account_pauses())["acme"][0]
                assert until_ms > clock[0]
            else:
                assert await store.account_pauses() == {}
                until_ms = stream.next_due_ms
                assert clock[0] + 15_000 <= until_ms <= clock[0] + 30_000  # error_backoff_s
            clock[0] = until_ms
        assert len(poller.passes) == 4
        stream = (await store.streams())[0]
        assert stream.consecutive_errors == 0
        assert stream.last_error is None
        assert (await store.stream_stats())["acme"].failing == 0
        poller.fixed = True
        await scheduler.tick()
        await scheduler.wait_idle()
        assert len(poller.passes) == 5
        assert scheduler.passes == 1
    finally:
        await store.close()


async def test_a_real_upstream_error_still_counts_and_backs_off(tmp_path: Path) -> None:
    """A 5xx after the retries is the stream's error: counted, shown failing, backed off more
    each time, and the account is not paused."""
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await store.open()
    try:
        clock = [T_PAUSE]
        await store.ensure_streams([StreamKey("acme", "contact", "1")], T_PAUSE)
        poller = RaisingPoller(lambda now: errors.ServerError("answered 503"), clock)
        runtime = AccountRuntime("acme", cast(Poller, poller), RateLimiter(Budget()), Planner(WIDE))
        settings = ScheduleSettings(min_interval_s=1, max_interval_s=10**9, error_backoff_s=30)
        scheduler = Scheduler(store, [runtime], settings, now_ms=lambda: clock[0])
        for errors_so_far in (1, 2):
            await scheduler.tick()
            await scheduler.wait_idle()
            stream = (await store.streams())[0]
            assert stream.consecutive_errors == errors_so_far
            assert stream.next_due_ms >= clock[0] + 15_000 * errors_so_far
            clock[0] = stream.next_due_ms
        assert (await store.stream_stats())["acme"].failing == 1
        assert await store.account_pauses() == {}
    finally:
        await store.close()


async def test_an_account_pause_learned_by_one_replica_holds_for_every_replica(
    postgres_url: str,
) -> None:
    """Two replicas on PostgreSQL: when one learns the key's daily quota is spent (the API's
    403), the other starts no pass until the pause ends instead of spending requests until it
    gets its own 403; when it ends, both poll again and the stored pause is gone."""
    stores = [PostgresStore.from_url(postgres_url) for _ in range(2)]
    for store in stores:
        await store.open()
    try:
        clock = [T_PAUSE]
        keys = [StreamKey("acme", "campaign", str(i)) for i in range(6)]
        await stores[0].ensure_streams(keys, T_PAUSE)
        learner = RaisingPoller(over_ratelimit, clock)
        other = RaisingPoller(over_ratelimit, clock)
        other.fixed = True
        settings = ScheduleSettings(min_interval_s=3600, max_interval_s=10**9, concurrency=1)
        schedulers = []
        for i, (store, poller) in enumerate(zip(stores, (learner, other), strict=True)):
            runtime = AccountRuntime(
                "acme", cast(Poller, poller), RateLimiter(Budget()), Planner(settings)
            )
            coordinator = PgCoordinator(store, f"replica-{i}", PostgresSettings())
            scheduler = Scheduler(
                store, [runtime], settings, now_ms=lambda: clock[0], coordinator=coordinator
            )
            await scheduler.reload()  # as start() does: no pause yet
            schedulers.append(scheduler)
        a, b = schedulers
        await a.tick()
        await a.wait_idle()
        assert len(learner.passes) == 1
        until_ms = (await stores[1].account_pauses())["acme"][0]
        assert until_ms == int(midnight_after(T_PAUSE).timestamp() * 1000)
        for _ in range(3):
            clock[0] += 60_000
            await b.tick()
            await b.wait_idle()
        assert other.passes == [], "the other replica spent requests on a paused account"
        clock[0] = until_ms
        learner.fixed = True
        await b.tick()
        await a.tick()
        await asyncio.gather(a.wait_idle(), b.wait_idle())
        assert len(other.passes) == 1
        assert len(learner.passes) == 2
        assert await stores[0].account_pauses() == {}
    finally:
        for store in stores:
            await store.close()


async def test_a_key_pause_stored_by_another_replica_stops_passes_running_here(
    postgres_url: str,
) -> None:
    """Two replicas on PostgreSQL: one gets a 429 with a long Retry-After and stores the key's
    pause; the other, with a pass of the key in flight, holds the key at its next tick, so that
    pass stops at its next request (the client refuses every request of a held key) instead of
    running on, each request getting its own 429."""
    stores = [PostgresStore.from_url(postgres_url) for _ in range(2)]
    for store in stores:
        await store.open()
    running = BlockedPoller()
    schedulers: list[Scheduler] = []
    try:
        clock = [int(time.time() * 1000)]  # the breaker holds on the wall clock
        keys = [StreamKey("acme", "campaign", str(i)) for i in range(4)]
        await stores[0].ensure_streams(keys, clock[0])
        too_many = errors.TooManyRequestsError("answered 429", status=429, retry_after_s=600.0)
        learner = RaisingPoller(lambda _now: too_many, clock)
        settings = ScheduleSettings(min_interval_s=3600, max_interval_s=10**9, concurrency=1)
        limiters = []
        for i, (store, poller) in enumerate(zip(stores, (learner, running), strict=True)):
            limiter = RateLimiter(Budget())
            runtime = AccountRuntime("acme", cast(Poller, poller), limiter, Planner(settings))
            coordinator = PgCoordinator(store, f"replica-{i}", PostgresSettings())
            scheduler = Scheduler(
                store, [runtime], settings, now_ms=lambda: clock[0], coordinator=coordinator
            )
            await scheduler.reload()
            schedulers.append(scheduler)
            limiters.append(limiter)
        a, b = schedulers
        await b.tick()
        await asyncio.wait_for(running.waiting.wait(), 5)  # b's pass is in flight
        await a.tick()
        await a.wait_idle()
        until_ms = (await stores[1].account_pauses())["acme"][0]
        assert until_ms == clock[0] + 600_000
        assert limiters[1].breaker.held_until_s == 0
        clock[0] += 1000
        await b.tick()
        assert limiters[1].breaker.held_until_s == until_ms / 1000, "b's pass would run on"
        assert "429 with Retry-After 600 s" in limiters[1].breaker.hold_reason
    finally:
        running.go.set()
        for scheduler in schedulers:
            await scheduler.wait_idle()
        for store in stores:
            await store.close()


async def test_a_pause_of_one_account_of_a_key_seen_from_another_replica_holds_no_key(
    tmp_path: Path,
) -> None:
    """Pauses stored elsewhere (as another replica would): one of two accounts of a key paused
    (a 401) holds nothing, and its partner polls on; both paused (the key's pause) hold the
    key until the earlier of them ends."""
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await store.open()
    try:
        now = int(time.time() * 1000)
        await store.ensure_streams([StreamKey(n, "contact", "1") for n in ("a", "b")], now)
        limiter = RateLimiter(Budget())
        runtimes = [
            AccountRuntime(n, cast(Poller, StandInPoller()), limiter, Planner(WIDE))
            for n in ("a", "b")
        ]
        scheduler = Scheduler(store, runtimes, WIDE, now_ms=lambda: now)
        await scheduler.reload()
        await store.set_account_pause("a", now + 3_600_000, "credentials rejected: 401")
        await scheduler.tick()
        await scheduler.wait_idle()
        assert limiter.breaker.held_until_s == 0
        assert cast(StandInPoller, runtimes[1].poller).calls == 1
        await store.set_account_pause("b", now + 600_000, "api_key shared with a: 429")
        await scheduler.tick()
        assert limiter.breaker.held_until_s == (now + 600_000) / 1000
    finally:
        await store.close()


async def test_a_backfilling_first_pass_does_not_push_the_other_streams_out(
    tmp_path: Path,
) -> None:
    """A campaign discovered after its send reads thousands of activities on its first pass,
    seconds after it was added: divided by those seconds they looked like millions an hour, and
    the square-root rule stretched every other stream's interval. A first pass's rate counts
    only what happened since the stream was added; the other streams' next passes do not
    move."""
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await store.open()
    try:
        clock = [1_796_000_000_000]
        runtime = AccountRuntime("acme", cast(Poller, None), RateLimiter(Budget()), Planner(WIDE))
        scheduler = Scheduler(store, [runtime], ScheduleSettings(), now_ms=lambda: clock[0])
        contacts = [StreamKey("acme", "contact", str(i)) for i in range(50)]
        await store.ensure_streams(contacts, clock[0] - 86_400_000)
        for stream in await store.streams():
            await store.finish_pass(
                stream.id, PassResult({}, {}, clock[0], 30.0, clock[0] - 1800_000)
            )
        await scheduler.reload()
        contact = (await store.streams())[0]

        async def contact_interval_s() -> float:
            """The contact stream's next interval after a pass half an hour after its last."""
            clock[0] += 1800_000
            stream = await store.stream(contact.id)
            await scheduler._finished(runtime, stream, PassOutcome(requests=2, new=15), None)
            return ((await store.stream(contact.id)).next_due_ms - clock[0]) / 1000

        await contact_interval_s()
        before = await contact_interval_s()
        await store.ensure_streams([StreamKey("acme", "campaign", "42")], clock[0], seed=False)
        await scheduler.reload()
        clock[0] += 2000
        campaign = next(s for s in await store.streams() if s.key.scope == "campaign")
        history = PassOutcome(requests=45, new=20_000, recent=0)  # all of it before it was added
        await scheduler._finished(runtime, campaign, history, None)
        assert (await store.stream(campaign.id)).rate_per_h < ScheduleSettings().prior_rate_per_h
        assert await contact_interval_s() == pytest.approx(before, rel=0.2)  # was 20 times
    finally:
        await store.close()


class FailingOncePoller(StandInPoller):
    """Its first pass fails with ``error``; later ones succeed."""

    def __init__(self, error: Exception | None) -> None:
        super().__init__()
        self.error = error

    def fail(self) -> None:
        if self.error is not None and len(self.started) == 1:
            raise self.error


async def _pauses_after(tmp_path: Path, error: Exception) -> dict[str, tuple[int, str]]:
    """shop-a and shop-b on one api_key (one limiter), solo on another; shop-a's first pass
    fails with ``error``: the stored pauses after one tick."""
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await store.open()
    try:
        now = 1_763_000_000_000
        names = ("shop-a", "shop-b", "solo")
        await store.ensure_streams([StreamKey(n, "contact", "1") for n in names], now)
        shared, own = RateLimiter(Budget()), RateLimiter(Budget())
        runtimes = [
            AccountRuntime(
                name,
                cast(Poller, FailingOncePoller(error if name == "shop-a" else None)),
                shared if name != "solo" else own,
                Planner(WIDE),
            )
            for name in names
        ]
        settings = ScheduleSettings(min_interval_s=1, max_interval_s=10**9, concurrency=1)
        scheduler = Scheduler(store, runtimes, settings, now_ms=lambda: now)
        await scheduler.tick()
        await scheduler.wait_idle()
        return await store.account_pauses()
    finally:
        await store.close()


async def test_a_spent_api_key_pauses_every_account_using_it(tmp_path: Path) -> None:
    """The API's over-ratelimit 403 is about the key: every account sharing it pauses until the
    quota renews (each would get its own 403 otherwise); an account on another key does not."""
    resume = datetime(2025, 11, 14, tzinfo=UTC)
    error = errors.QuotaExhaustedError(
        "answered 403 mashery.not.authorized.over.ratelimit",
        resume_at=resume,
        endpoint="contact_opens",
        status=403,
    )
    pauses = await _pauses_after(tmp_path, error)
    assert set(pauses) == {"shop-a", "shop-b"}
    until_ms = int(resume.timestamp() * 1000)
    assert pauses["shop-a"] == (until_ms, "contact_opens: " + error.message)
    assert pauses["shop-b"][0] == until_ms
    assert pauses["shop-b"][1].startswith("api_key shared with shop-a: contact_opens: answered")


async def test_a_429_retry_after_pauses_every_account_of_the_key(tmp_path: Path) -> None:
    """A long Retry-After holds for the whole key."""
    error = errors.TooManyRequestsError("answered 429", status=429, retry_after_s=600.0)
    pauses = await _pauses_after(tmp_path, error)
    assert set(pauses) == {"shop-a", "shop-b"}
    assert pauses["shop-a"][0] == pauses["shop-b"][0]


async def test_rejected_credentials_pause_only_their_account(tmp_path: Path) -> None:
    """A 401 is about one account's access token: the others on the key keep polling."""
    error = errors.UnauthorizedError("answered 401", status=401)
    assert set(await _pauses_after(tmp_path, error)) == {"shop-a"}


def test_accounts_sharing_a_key_split_its_pace_by_their_streams_weight(tmp_path: Path) -> None:
    """Accounts on one limiter plan with shares of the key's pace in proportion to what their
    streams ask (so intervals follow the square-root rule over all their streams), together the
    pace of one account; an account on its own key keeps the whole of its own."""
    shared = RateLimiter(Budget())

    def runtime(name: str, limiter: RateLimiter, rates: list[float]) -> AccountRuntime:
        planner = Planner(WIDE)
        for stream_id, rate in enumerate(rates):
            planner.load(stream_id, rate)
        return AccountRuntime(name, cast(Poller, RecordingPoller()), limiter, planner)

    a = runtime("shop-a", shared, [400.0, 400.0, 400.0])
    b = runtime("shop-b", shared, [100.0])
    solo = runtime("solo", RateLimiter(Budget()), [100.0])
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    alone = Scheduler(store, [solo], WIDE).budget_rps(solo)
    scheduler = Scheduler(store, [a, b, solo], WIDE)
    share_a, share_b = scheduler.budget_rps(a), scheduler.budget_rps(b)
    assert share_a + share_b == pytest.approx(alone)
    assert share_a == pytest.approx(6 * share_b)  # 3 x sqrt(400) against sqrt(100)
    assert scheduler.budget_rps(solo) == pytest.approx(alone)
    # the same interval for a stream of either account as if one account had them all
    joint = runtime("joint", RateLimiter(Budget()), [400.0, 400.0, 400.0, 100.0])
    expected = joint.planner.policy.interval_s(3, alone)
    assert b.planner.policy.interval_s(0, share_b) == pytest.approx(expected)


async def test_replicas_planners_follow_target_changes_made_through_another(
    postgres_url: str,
) -> None:
    """Two replicas on PostgreSQL: an operator removes 900 of 1,000 targets through replica A
    (A reloads at once) and pauses one more. Replica B heard of neither: its planner kept 1,000
    streams and planned ~10x too long intervals until a restart. Its periodic reload now brings
    it in line, with the same intervals as A's."""
    store = PostgresStore.from_url(postgres_url)
    await store.open()
    try:
        keys = [StreamKey("acme", "contact", str(1000 + i)) for i in range(1000)]
        far = 4_000_000_000_000  # nothing is due: ticks claim no stream, only reloads run
        await store.ensure_streams(keys, far)
        settings = ScheduleSettings()
        replicas = []
        for name in ("A", "B"):
            runtime = AccountRuntime(
                "acme", cast(Poller, None), RateLimiter(Budget()), Planner(settings)
            )
            coordinator = PgCoordinator(store, f"replica-{name}", PostgresSettings())
            scheduler = Scheduler(
                store, [runtime], settings, coordinator=coordinator, reload_every_s=0.3
            )
            replicas.append((scheduler, runtime))
        (a, a_runtime), (b, b_runtime) = replicas
        await a.reload()
        await b.start()
        try:
            assert len(b_runtime.planner.policy) == 1000
            await store.remove_targets(keys[100:], 2_000)
            kept = sorted(s.id for s in await store.streams("acme") if not s.retired)
            await store.set_paused(kept[-1], True)
            await a.reload()  # what A's admin API does after the change
            assert len(a_runtime.planner.policy) == 99
            for _ in range(50):
                if len(b_runtime.planner.policy) == 99:
                    break
                await asyncio.sleep(0.1)
            assert b_runtime.planner.streams() == a_runtime.planner.streams()
            assert b_runtime.planner.policy.total_weight == pytest.approx(
                a_runtime.planner.policy.total_weight
            )
            assert b_runtime.planner.policy.interval_s(kept[0], 0.1) == pytest.approx(
                a_runtime.planner.policy.interval_s(kept[0], 0.1)
            )
        finally:
            await b.stop()
    finally:
        await store.close()


async def test_a_reload_keeps_what_a_running_pass_taught_the_planner(tmp_path: Path) -> None:
    """A stream being polled keeps the rate its pass is about to store; the others take the
    store's (which another replica's passes may have moved)."""
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await store.open()
    try:
        await store.ensure_streams([StreamKey("acme", "contact", str(i)) for i in range(3)], 0)
        runtime = AccountRuntime("acme", cast(Poller, None), RateLimiter(Budget()), Planner(WIDE))
        scheduler = Scheduler(store, [runtime], WIDE)
        await scheduler.reload()
        ids = sorted(runtime.planner.streams())
        assert len(ids) == 3
        for sid in ids:
            await store.finish_pass(sid, PassResult({}, {}, 10**13, 7.0, 1_000))
        runtime.inflight.add(ids[0])
        taught, _ = runtime.planner.after_pass(ids[0], None, 50, 600.0, 2, 0.1)  # not yet stored
        await scheduler.reload()
        assert runtime.planner.rate_per_h(ids[0]) == taught
        assert runtime.planner.rate_per_h(ids[1]) == runtime.planner.rate_per_h(ids[2]) == 7.0
        runtime.inflight.clear()
        await scheduler.reload()
        assert runtime.planner.rate_per_h(ids[0]) == 7.0  # what the store holds now
    finally:
        await store.close()


class BlockedPoller(RecordingPoller):
    """Each pass waits for ``go`` (``waiting`` is set once one does), then finds 5000 new
    events over 10 requests, 3 unique-counted feeds among them."""

    def __init__(self) -> None:
        super().__init__()
        self.go = asyncio.Event()
        self.waiting = asyncio.Event()

    async def run_pass(
        self,
        stream: Stream,
        replay_from_ms: int | None = None,
        repeat_every_s: float | None = None,
        *,
        lease: StreamLease | None = None,
    ) -> PassOutcome:
        self.started.append((stream.id, replay_from_ms, repeat_every_s))
        self.waiting.set()
        await self.go.wait()
        return PassOutcome(
            watermarks=dict(stream.watermarks), new=5000, requests=10, repeat_feeds=3
        )


async def test_a_stream_paused_while_its_pass_runs_stays_out_of_the_budget(
    tmp_path: Path,
) -> None:
    """Pausing a stream reloads the planner without it; the pass in flight then finishing must
    not put it back (it kept the busiest stream's share of the budget, and its reads by time,
    until the next reload: on SQLite, the next admin change or a restart). The pass is still
    recorded."""
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await store.open()
    try:
        await store.ensure_streams([StreamKey("acme", "campaign", str(i)) for i in (1, 2)], 0)
        busy, other = sorted(s.id for s in await store.streams("acme"))
        poller = BlockedPoller()
        runtime = AccountRuntime("acme", cast(Poller, poller), RateLimiter(Budget()), Planner(WIDE))
        scheduler = Scheduler(store, [runtime], WIDE)
        await scheduler.reload()
        alone = Planner(WIDE)
        alone.load(other, None)
        pass_ = asyncio.create_task(scheduler._pass(runtime, busy))
        runtime.inflight.add(busy)
        await asyncio.wait_for(poller.waiting.wait(), 5)
        await store.set_paused(busy, True)
        await scheduler.reload()  # what POST /v1/streams/{id}/pause does
        assert runtime.planner.streams() == {other}
        poller.go.set()
        await pass_
        assert runtime.planner.streams() == {other}
        assert runtime.planner.policy.total_weight == alone.policy.total_weight
        assert runtime.planner.repeat_feeds() == 0
        assert (await store.stream(busy)).last_poll_ms is not None  # the pass was recorded
    finally:
        await store.close()


async def test_a_stream_resumed_while_its_pass_runs_is_back_in_the_budget(
    tmp_path: Path,
) -> None:
    """The mirror case: a stream paused, then resumed while a pass of it runs, is in the sums
    again after that reload, and its pass's end updates it there."""
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await store.open()
    try:
        await store.ensure_streams([StreamKey("acme", "campaign", "1")], 0)
        sid = (await store.streams("acme"))[0].id
        poller = BlockedPoller()
        runtime = AccountRuntime("acme", cast(Poller, poller), RateLimiter(Budget()), Planner(WIDE))
        scheduler = Scheduler(store, [runtime], WIDE)
        await scheduler.reload()
        pass_ = asyncio.create_task(scheduler._pass(runtime, sid))
        runtime.inflight.add(sid)
        await asyncio.wait_for(poller.waiting.wait(), 5)
        await store.set_paused(sid, True)
        await scheduler.reload()
        assert runtime.planner.streams() == set()
        await store.set_paused(sid, False)
        await scheduler.reload()
        assert runtime.planner.streams() == {sid}
        poller.go.set()
        await pass_
        assert runtime.planner.rate_per_h(sid) == (await store.stream(sid)).rate_per_h
        assert runtime.planner.repeat_feeds() == 3
    finally:
        await store.close()


class BlockedFailingPoller(BlockedPoller):
    """A BlockedPoller whose passes then raise ``error`` (None: succeed)."""

    def __init__(self, error: Exception | None) -> None:
        super().__init__()
        self.error = error

    async def run_pass(
        self,
        stream: Stream,
        replay_from_ms: int | None = None,
        repeat_every_s: float | None = None,
        *,
        lease: StreamLease | None = None,
    ) -> PassOutcome:
        outcome = await super().run_pass(stream, replay_from_ms, repeat_every_s)
        if self.error is not None:
            raise self.error
        return outcome


PASS_ENDINGS = [
    pytest.param(None, id="finished"),
    pytest.param(errors.ServerError("answered 503", status=503), id="failed"),
    pytest.param(
        errors.OverQpsError(
            "answered 403 (mashery.not.authorized.over.qps)",
            status=403,
            error_key="mashery.not.authorized.over.qps",
        ),
        id="deferred",
    ),
]


@pytest.mark.parametrize("error", PASS_ENDINGS)
@pytest.mark.parametrize(
    "running",
    [None, 1000, 86_400_000],
    ids=["no-replay", "replaying", "the-same-replay-asked-again"],
)
async def test_a_replay_asked_for_while_a_pass_runs_is_not_put_off(
    any_store: Store, error: Exception | None, running: int | None
) -> None:
    """A replay requested while a pass of its stream runs leaves the stream due once that pass
    ends (finished, failed or deferred), whether the pass was a replay itself or not, even the
    same replay asked again (same since: the running pass's end cleared it with its own): it
    waited for the next planned pass (up to max_interval_s, 6 h), and `replay --wait` with it."""
    store = any_store
    now = 1_763_000_000_000
    await store.ensure_streams([StreamKey("acme", "campaign", "123")], now)
    sid = (await store.streams("acme"))[0].id
    if running is not None:
        await store.request_replay([sid], now - running, now)
    poller = BlockedFailingPoller(error)
    runtime = AccountRuntime("acme", cast(Poller, poller), RateLimiter(Budget()), Planner(WIDE))
    settings = ScheduleSettings(min_interval_s=3600, error_backoff_s=3600)
    scheduler = Scheduler(store, [runtime], settings, now_ms=lambda: now)
    await scheduler.tick()
    await asyncio.wait_for(poller.waiting.wait(), 5)
    await store.request_replay([sid], now - 86_400_000, now)
    poller.go.set()
    await scheduler.wait_idle()
    assert poller.replays == [(sid, None if running is None else now - running)]
    assert await store.due_streams(now, 10) == [sid]
    replay = await store.stream_replay(sid)
    assert replay is not None
    assert replay.since_ms == now - 86_400_000
    await scheduler.tick()  # the next tick starts the replay
    await scheduler.wait_idle()
    assert poller.replays[1:] == [(sid, now - 86_400_000)]


class LostAfterFinish:
    """The real store, whose finish_pass commits and then fails as a lost lease (or a crash)
    right after it would: whatever the pass writes after its end does not happen."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    async def finish_pass(self, stream_id: int, result: PassResult, **kwargs: Any) -> None:
        await self._store.finish_pass(stream_id, result, **kwargs)
        raise LeaseLostError(f"stream {stream_id}: lost right after finish_pass (injected)")


async def test_a_replay_ends_with_the_pass_that_ran_it(any_store: Store) -> None:
    """A replay pass whose end committed is not run again when the pass fails right after (its
    lease lost, the process gone): the replay's request ended in the same transaction. It was
    cleared by a later write of its own, so the next pass re-read the feeds from the replay time
    and appended every event again."""
    store = any_store
    now = [1_763_000_000_000]
    await store.ensure_streams([StreamKey("acme", "campaign", "123")], now[0])
    sid = (await store.streams("acme"))[0].id
    await store.request_replay([sid], now[0] - 86_400_000, now[0])
    poller = RecordingPoller()
    runtime = AccountRuntime("acme", cast(Poller, poller), RateLimiter(Budget()), Planner(WIDE))
    settings = ScheduleSettings(min_interval_s=60, max_interval_s=3600)
    scheduler = Scheduler(
        cast(Store, LostAfterFinish(store)), [runtime], settings, now_ms=lambda: now[0]
    )
    with capture_logs() as logs:
        await scheduler.tick()
        await scheduler.wait_idle()
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["poll.lease_lost"]
    assert await store.stream_replay(sid) is None
    now[0] += 7200_000  # the next planned pass
    await scheduler.tick()
    await scheduler.wait_idle()
    assert poller.replays == [(sid, now[0] - 7200_000 - 86_400_000), (sid, None)]


async def test_a_replica_clock_ahead_keeps_a_stored_pause_until_the_database_ends_it(
    any_store: Store,
) -> None:
    """A replica whose clock runs 2 h ahead neither polls nor ends a pause stored until 1 h from
    now on PostgreSQL (the database's clock decides for every replica); it ended it for all of
    them. On SQLite, one process, its own clock ends it."""
    store = any_store
    real_ms = int(time.time() * 1000)
    await store.ensure_streams([StreamKey("acme", "contact", "1")], real_ms)
    await store.set_account_pause("acme", real_ms + 3_600_000, "Retry-After")
    poller = RecordingPoller()
    runtime = AccountRuntime("acme", cast(Poller, poller), RateLimiter(Budget()), Planner(WIDE))
    scheduler = Scheduler(store, [runtime], WIDE, now_ms=lambda: real_ms + 7_200_000)
    for _ in range(2):
        await scheduler.tick()
        await scheduler.wait_idle()
    shared = isinstance(store, PostgresStore)
    assert (await store.account_pauses() != {}) is shared
    assert (poller.calls == 0) is shared


def test_a_pass_of_a_stream_not_in_the_sums_is_planned_as_if_it_were() -> None:
    """A stream this replica has not loaded yet (another replica's discovery made it) gets the
    interval it would have in the sums, not max_interval_s, and stays out until loaded."""
    settings = ScheduleSettings()
    planner, loaded = Planner(settings), Planner(settings)
    for p in (planner, loaded):
        for sid in range(10):
            p.load(sid, 30.0)
    loaded.load(99, 120.0)
    budget = 9000 / 86400 * 0.9
    _, outside = planner.after_pass(99, None, 0, 60.0, 2.0, budget)
    _, inside = loaded.after_pass(99, None, 0, 60.0, 2.0, budget)
    assert 99 not in planner.streams()
    assert outside == pytest.approx(inside)
    assert outside < settings.max_interval_s


class CostRecordingPlanner(Planner):
    """The real planner, recording the per-pass cost each pass charges it."""

    def __init__(self, settings: ScheduleSettings) -> None:
        super().__init__(settings)
        self.charged: list[float] = []

    def after_pass(
        self,
        stream_id: int,
        previous_rate_per_h: float | None,
        new: int,
        elapsed_s: float,
        requests: float,
        budget_rps: float,
    ) -> tuple[float, float]:
        self.charged.append(requests)
        return super().after_pass(
            stream_id, previous_rate_per_h, new, elapsed_s, requests, budget_rps
        )


async def test_a_quiet_campaign_is_polled_by_its_read_by_time_at_its_share_of_the_cost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A campaign's unique-counted feeds are read every poll.repeat_read_s whatever their
    counts: a silent stream the square-root rule leaves at max_interval_s is polled by the time
    that read is due, and the planner is charged the pass's share of that read (spread over the
    passes between two of them), not its whole cost on the pass that made it."""
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await store.open()
    try:
        clock = [1_796_000_000_000]
        settings = ScheduleSettings()
        planner = CostRecordingPlanner(settings)
        runtime = AccountRuntime("acme", cast(Poller, None), RateLimiter(Budget()), planner)
        scheduler = Scheduler(store, [runtime], settings, now_ms=lambda: clock[0])
        keys = [StreamKey("acme", "campaign", "1"), StreamKey("acme", "campaign", "2")]
        await store.ensure_streams(keys, clock[0] - 86_400_000)
        for stream in await store.streams():
            await store.finish_pass(stream.id, PassResult({}, {}, clock[0], 0.0, clock[0] - 60_000))
        await scheduler.reload()
        # a budget this tight leaves silent streams at max_interval_s, whatever the time of day
        monkeypatch.setattr(scheduler, "budget_rps", lambda _runtime: 1e-4)
        plain, repeating = await store.streams()
        await scheduler._finished(runtime, plain, PassOutcome(requests=1), None)
        repeat = PassOutcome(
            requests=3, repeat_requests=2, repeat_share=0.5, repeat_due_ms=clock[0] + 3600_000
        )
        await scheduler._finished(runtime, repeating, repeat, None)
        assert planner.charged == [1, 1.5]
        assert (await store.stream(plain.id)).next_due_ms == clock[0] + 21_600_000
        assert (await store.stream(repeating.id)).next_due_ms == clock[0] + 3600_000
    finally:
        await store.close()


def test_reads_by_time_stretch_to_their_share_of_a_tight_budget_and_keep_it_when_ample() -> None:
    """repeat_interval_s: poll.repeat_read_s while one read by time of every followed stream
    at that interval fits in schedule.repeat_share of the planning budget, else as often as
    that share pays for; a budget spent (0), nothing to read or a share of 0 (off) leaves
    repeat_read_s."""
    assert repeat_interval_s(21_600, 900, budget_rps=1.0, share=0.25) == 21_600
    # 300 campaigns x 3 feeds on a 2,700-request planned day: a quarter pays for 675 a day
    assert repeat_interval_s(21_600, 900, 2700 / 86400, 0.25) == pytest.approx(115_200)
    assert repeat_interval_s(21_600, 0, 2700 / 86400, 0.25) == 21_600
    assert repeat_interval_s(21_600, 900, 0.0, 0.25) == 21_600
    assert repeat_interval_s(21_600, 900, 2700 / 86400, 0.0) == 21_600  # a share of 0: off


def test_the_planner_counts_what_reads_by_time_cost_and_extrapolates_streams_unmeasured() -> None:
    """The planner sums each stream's unique-counted feeds with a count, as its passes report
    them, and counts streams no pass here measured (after a start, polled by another replica)
    as the mean of those measured; a removed stream leaves the sum."""
    settings = ScheduleSettings(repeat_share=0.25)
    planner = Planner(settings)
    for stream_id in range(300):
        planner.load(stream_id, None)
    tight = 2700 / 86400
    assert planner.repeat_interval_s(21_600, tight) == 21_600  # nothing measured yet
    for stream_id in range(100):
        planner.after_pass(stream_id, None, 0, 600.0, 1.0, tight)
        planner.set_repeat_feeds(stream_id, 3)
    assert planner.repeat_feeds() == pytest.approx(900)  # 100 measured at 3: 300 streams
    assert planner.repeat_interval_s(21_600, tight) == pytest.approx(115_200)
    assert planner.repeat_interval_s(21_600, 1.0) == 21_600  # an ample budget: unchanged
    planner.set_repeat_feeds(0, 0)  # no count: nothing to repeat
    planner.remove(1)
    assert planner.repeat_feeds() == pytest.approx(3 * 98 * 299 / 99)
    planner.set_repeat_feeds(1, 3)  # its pass ended after it was removed: not followed
    assert planner.repeat_feeds() == pytest.approx(3 * 98 * 299 / 99)


class RepeatRecordingPoller(StandInPoller):
    """Records the interval of reads by time each pass is handed; every stream a campaign with
    three unique-counted feeds that have a count."""

    repeat_feeds = 3

    @property
    def handed(self) -> list[float | None]:
        return [every_s for _, _, every_s in self.started]


async def test_the_scheduler_hands_passes_the_interval_of_reads_by_time_its_budget_pays_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With 300 campaigns followed and 2,700 requests a day to plan with, reads by time every
    repeat_read_s (up to 10,800 requests a day) would take four times the day: once the passes
    have measured what they cost, each pass is handed the interval that a quarter of the budget
    pays for; with an ample budget, repeat_read_s."""
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await store.open()
    try:
        now = 1_796_000_000_000
        settings = ScheduleSettings(repeat_share=0.25)
        poller = RepeatRecordingPoller()
        runtime = AccountRuntime(
            "acme", cast(Poller, poller), RateLimiter(Budget()), Planner(settings)
        )
        scheduler = Scheduler(store, [runtime], settings, now_ms=lambda: now)
        keys = [StreamKey("acme", "campaign", str(i)) for i in range(300)]
        await store.ensure_streams(keys, now - 60_000)
        await scheduler.reload()
        budget = [2700 / 86400]
        monkeypatch.setattr(scheduler, "budget_rps", lambda _runtime: budget[0])
        ids = [stream.id for stream in await store.streams()]
        for stream_id in ids:
            await scheduler._polled(runtime, stream_id)
        assert poller.handed[0] == 21_600
        await scheduler._polled(runtime, ids[0])
        assert poller.handed[-1] == pytest.approx(900 / (0.25 * budget[0]))  # 32 hours
        budget[0] = 1.0
        await scheduler._polled(runtime, ids[0])
        assert poller.handed[-1] == 21_600
    finally:
        await store.close()


ACCOUNT_JOB_ERRORS = [
    pytest.param(errors.UnauthorizedError("answered 401", status=401), {"shop-a"}, id="401"),
    pytest.param(errors.ForbiddenError("answered 403", status=403), {"shop-a"}, id="403"),
    pytest.param(
        errors.ServerError("answered 503", status=503, retry_after_s=600.0),
        {"shop-a", "shop-b"},
        id="503-retry-after",
    ),
    pytest.param(
        errors.TooManyRequestsError("answered 429", status=429, retry_after_s=600.0),
        {"shop-a", "shop-b"},
        id="429-retry-after",
    ),
    pytest.param(errors.TooManyRequestsError("answered 429"), set(), id="429"),
    pytest.param(errors.ServerError("answered 500", status=500), set(), id="500"),
]


@pytest.mark.parametrize(("error", "paused"), ACCOUNT_JOB_ERRORS)
async def test_an_account_job_error_pauses_as_a_passs_would(
    tmp_path: Path, error: errors.CtctError, paused: set[str]
) -> None:
    """An upstream error met by an account's job (campaign discovery) pauses the account or its
    key as the same error met by a pass does, and is raised again (the job's owner logs it)."""
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await store.open()
    try:
        shared = RateLimiter(Budget())
        runtimes = [
            AccountRuntime(name, cast(Poller, None), shared, Planner(WIDE))
            for name in ("shop-a", "shop-b")
        ]
        scheduler = Scheduler(store, runtimes, WIDE, now_ms=lambda: T_PAUSE)

        async def failing() -> None:
            raise error

        with pytest.raises(type(error)):
            await scheduler.account_job("shop-a", failing)()
        assert set(await store.account_pauses()) == paused
    finally:
        await store.close()
