"""The per-account rate limiter: per-second sliding window, daily allowance, reserved share."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import pytest
from structlog.testing import capture_logs

from relay.ctct.errors import BudgetExhaustedError
from relay.ctct.ratelimit import Budget, RateLimiter, next_utc_midnight
from relay.store import StoreError


class FakeTime:
    """A clock that only moves when the limiter sleeps (or the test says so)."""

    def __init__(self, wall: float) -> None:
        self.wall = wall
        self.mono = 1000.0
        self.sent: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def limiter(budget: Budget, clock: FakeTime, used_today: int = 0) -> RateLimiter:
    return RateLimiter(
        budget,
        used_today=used_today,
        wall_clock=lambda: clock.wall,
        monotonic=lambda: clock.mono,
        sleep=clock.sleep,
    )


async def test_no_window_holds_more_than_the_per_second_limit() -> None:
    """With 4/s, any window of one second sees at most 4 admitted requests."""
    clock = FakeTime(wall=1_700_000_000.0)
    lim = limiter(Budget(requests_per_second=4, window_margin_s=0.0), clock)
    admitted = []
    for _ in range(40):
        await lim.acquire()
        admitted.append(clock.mono)
    for i, start in enumerate(admitted):
        in_window = [t for t in admitted[i:] if t < start + 1.0]
        assert len(in_window) <= 4
    assert admitted[-1] - admitted[0] == pytest.approx(9.0)  # 40 requests at 4/s, no slower


async def test_fractional_rates_space_requests() -> None:
    """0.5 requests per second means one request every two seconds."""
    clock = FakeTime(wall=1_700_000_000.0)
    lim = limiter(Budget(requests_per_second=0.5, window_margin_s=0.0), clock)
    times = []
    for _ in range(3):
        await lim.acquire()
        times.append(clock.mono)
    assert [b - a for a, b in itertools.pairwise(times)] == [2.0, 2.0]


@pytest.mark.parametrize(
    ("rps", "most", "window_s"), [(4.0, 4, 1.1), (2.5, 2, 1.1), (1.5, 1, 1.1), (0.5, 1, 2.1)]
)
async def test_no_one_second_window_exceeds_a_fractional_limit(
    rps: float, most: int, window_s: float
) -> None:
    """With a fractional requests_per_second, any window of one second holds at most its whole
    part (at least 1), and requests are not spaced further apart than that needs."""
    clock = FakeTime(wall=1_700_000_000.0)
    lim = limiter(Budget(requests_per_second=rps), clock)  # the default 100 ms margin
    assert lim.budget.window_s == pytest.approx(window_s)
    admitted = []
    for _ in range(40):
        await lim.acquire()
        admitted.append(clock.mono)
    worst = max(sum(1 for t in admitted if start <= t < start + 1.0) for start in admitted)
    assert worst == most
    # bursts of `most`, one window apart: 40 requests take (40 / most - 1) windows, no longer
    assert admitted[-1] - admitted[0] == pytest.approx((40 / most - 1) * window_s)


async def test_daily_allowance_keeps_the_reserved_share() -> None:
    """With 10% reserved, 100/day admits 90 and then refuses until midnight UTC."""
    clock = FakeTime(wall=datetime(2026, 11, 23, 12, tzinfo=UTC).timestamp())
    lim = limiter(Budget(requests_per_second=1000, requests_per_day=100, reserved_share=0.1), clock)
    for _ in range(90):
        await lim.acquire()
    with pytest.raises(BudgetExhaustedError) as caught:
        await lim.acquire()
    assert caught.value.resume_at == datetime(2026, 11, 24, tzinfo=UTC)
    assert lim.remaining_today == 0


async def test_counter_survives_restart_and_resets_at_midnight() -> None:
    """A limiter started with today's count refuses at once; the next UTC day starts fresh."""
    clock = FakeTime(wall=datetime(2026, 11, 23, 23, 59, tzinfo=UTC).timestamp())
    lim = limiter(Budget(requests_per_day=10, reserved_share=0.0), clock, used_today=10)
    with pytest.raises(BudgetExhaustedError):
        await lim.acquire()
    clock.wall += 120
    await lim.acquire()
    assert lim.used_today == 1


async def test_exhaust_today_blocks_until_tomorrow() -> None:
    """When the API says the quota is spent, the limiter stops admitting for the day."""
    clock = FakeTime(wall=datetime(2026, 11, 23, 8, tzinfo=UTC).timestamp())
    lim = limiter(Budget(), clock)
    lim.exhaust_today()
    with pytest.raises(BudgetExhaustedError):
        await lim.acquire()


def test_next_midnight_is_utc() -> None:
    """The daily quota renews at 00:00 UTC, whatever the local offset of the input."""
    moment = datetime.fromisoformat("2026-11-23T23:30:00-05:00")
    assert next_utc_midnight(moment) == datetime(2026, 11, 25, tzinfo=UTC)


async def test_after_restart_the_first_window_is_assumed_full() -> None:
    """A limiter started after a crash waits one window before its first request."""
    clock = FakeTime(wall=1_700_000_000.0)
    lim = RateLimiter(
        Budget(requests_per_second=2, window_margin_s=0.0),
        after_restart=True,
        wall_clock=lambda: clock.wall,
        monotonic=lambda: clock.mono,
        sleep=clock.sleep,
    )
    start = clock.mono
    await lim.acquire()
    assert clock.mono - start == pytest.approx(1.0)


class FailingLedger:
    """A quota ledger whose first ``failures`` writes fail, as a full disk fails them."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.total = 0

    async def spend(self, day: str, requests: int) -> int:
        if self.failures:
            self.failures -= 1
            raise StoreError("state store (/data/state.db): database or disk is full")
        self.total += requests
        return self.total


async def test_a_request_the_ledger_did_not_count_is_not_counted() -> None:
    """An acquire whose ledger write fails raises, and neither the day's count nor the
    per-second window keeps the request it did not send: after the store recovers, the whole
    allowance and window are there (a full disk once spent a day's allowance on no request)."""
    clock = FakeTime(wall=1_700_000_000.0)
    ledger = FailingLedger(failures=50)
    lim = RateLimiter(
        Budget(requests_per_second=4, requests_per_day=100, reserved_share=0.0, window_margin_s=0),
        ledger=ledger,
        wall_clock=lambda: clock.wall,
        monotonic=lambda: clock.mono,
        sleep=clock.sleep,
    )
    for _ in range(50):
        with pytest.raises(StoreError):
            await lim.acquire()
    assert lim.remaining_today == 100
    assert clock.mono == 1000.0  # no failed acquire waited for a slot the others took
    for _ in range(4):
        await lim.acquire()
    assert clock.mono == 1000.0  # a whole window: four at once
    assert (lim.remaining_today, ledger.total) == (96, 4)


class CountingLedger:
    """A quota ledger in memory: the day's total."""

    def __init__(self) -> None:
        self.total = 0

    async def spend(self, day: str, requests: int) -> int:
        self.total += requests
        return self.total


async def test_a_request_given_back_frees_its_slot_and_its_count() -> None:
    """A request that never left (``give_back``) leaves the per-second window and the day's
    count, here and in the ledger; a quota the API said is spent stays spent."""
    clock = FakeTime(wall=1_700_000_000.0)
    ledger = CountingLedger()
    lim = RateLimiter(
        Budget(requests_per_second=2, requests_per_day=100, reserved_share=0.0, window_margin_s=0),
        ledger=ledger,
        wall_clock=lambda: clock.wall,
        monotonic=lambda: clock.mono,
        sleep=clock.sleep,
    )
    sent = await lim.acquire()
    unsent = await lim.acquire()
    await lim.give_back(unsent)
    assert (lim.used_today, ledger.total) == (1, 1)
    await lim.acquire()
    assert clock.mono == 1000.0  # its slot was free again: no wait
    lim.exhaust_today()
    await lim.give_back(sent)
    assert ledger.total == 1
    assert lim.remaining_today == 0


class LedgerFailingAfter(CountingLedger):
    """A quota ledger whose writes fail after the first ``works`` (the store went away)."""

    def __init__(self, works: int) -> None:
        super().__init__()
        self.works = works

    async def spend(self, day: str, requests: int) -> int:
        if self.works <= 0:
            raise StoreError("state store (/data/state.db): database is locked")
        self.works -= 1
        return await super().spend(day, requests)


async def test_a_give_back_that_failed_names_its_budget() -> None:
    """A request the ledger could not take back is logged with the budget's name (as /v1/status
    and /metrics show it), its day and where it stays counted: the line named only the day, and
    an operator of several api_keys could not tell which count was one too high."""
    clock = FakeTime(wall=1_700_000_000.0)
    lim = RateLimiter(
        Budget(requests_per_second=4, requests_per_day=100, reserved_share=0.0),
        name="key:0123456789ab",
        ledger=LedgerFailingAfter(works=1),
        wall_clock=lambda: clock.wall,
        monotonic=lambda: clock.mono,
        sleep=clock.sleep,
    )
    unsent = await lim.acquire()
    with capture_logs() as logs:
        await lim.give_back(unsent)
    assert logs == [
        {
            "event": "quota.give_back_failed",
            "log_level": "warning",
            "budget": "key:0123456789ab",
            "day": "2023-11-14",
            "counted_in": "ledger",
            "error": "state store (/data/state.db): database is locked",
        }
    ]
    assert lim.used_today == 1  # left counted: over-counting is the safe side
