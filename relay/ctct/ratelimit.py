"""Request budget of one api_key: the per-second limit and the daily quota, minus a reserved share.

Constant Contact counts both limits per api_key, so the accounts sharing a key share one limiter.

The per-second limit is a sliding log, not a token bucket: a bucket of 4 tokens refilled at 4/s lets
8 requests through in one second (a full bucket, then the refills), and Mashery counts per second.
With a log of the last N send times, no window of ``window_s`` ever holds more than N requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import NamedTuple, Protocol

import structlog

from relay.ctct.breaker import KeyBreaker
from relay.ctct.errors import BudgetExhaustedError

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Budget:
    """An api_key's published limits and the share of the daily quota left to other applications."""

    requests_per_second: float = 4.0
    requests_per_day: int = 10_000
    reserved_share: float = 0.1
    # Slack added to every one-second window so that a request delayed between our clock and the
    # server's (a busy event loop, a slow connect) cannot push a 5th request into the server's
    # second. 20 ms was seen to be too little on a loaded 2-core machine; 100 ms costs at most 9%
    # of the per-second rate, which is rarely the binding limit (the daily quota is).
    window_margin_s: float = 0.1

    @property
    def daily_allowance(self) -> int:
        """Requests this relay may spend per UTC day."""
        return math.floor(self.requests_per_day * (1.0 - self.reserved_share))

    @property
    def burst(self) -> int:
        """Requests allowed in one window: the whole part of the per-second limit, at least 1."""
        return max(1, math.floor(self.requests_per_second))

    @property
    def window_s(self) -> float:
        """Length of the window that may hold ``burst`` requests: one second (plus the margin),
        or ``1 / requests_per_second`` when that is longer (below 1 request per second).

        Never shorter than a second: with 2.5/s, ``burst / rate`` would be 0.8 s, and two such
        windows of 2 requests fit 4 requests into one second. A fractional part above 1/s is
        thus not spent; no one-second window can hold it without exceeding the limit."""
        return max(1.0, self.burst / self.requests_per_second) + self.window_margin_s


class QuotaLedger(Protocol):
    """Durable count of an account's requests per UTC day (the state store provides one)."""

    async def spend(self, day: str, requests: int) -> int:
        """Add ``requests`` to the count of ``day`` (YYYY-MM-DD); return the new total."""
        ...


class SharedReply(NamedTuple):
    """A shared budget's answer to one request."""

    admitted: bool
    wait_ms: int  # before asking again; 0 when not admitted: the day's allowance is spent
    used: int  # the count of ``day``
    sent_ms: int  # when the shared window logged it (Unix ms, the shared clock); 0: not logged
    day: str  # the UTC day counted, by the shared clock (replicas' own clocks may disagree)
    day_left_ms: int  # until that day ends, by the shared clock


class SharedBudget(Protocol):
    """An account's budget counted for several processes at once (replicas sharing a store)."""

    async def reserve(
        self, day: str, now_ms: int, burst: int, window_ms: int, allowance: int
    ) -> SharedReply:
        """Count one request if the shared window and the day's count allow it (``day`` and
        ``now_ms``: this process's clock, for a budget without a clock of its own)."""
        ...

    async def give_back(self, day: str, sent_ms: int) -> int:
        """Take back a request admitted at ``sent_ms`` that was never sent: out of the shared
        window and ``day``'s count; return the count left."""
        ...


@dataclass(frozen=True, slots=True)
class Admission:
    """One request :meth:`RateLimiter.acquire` admitted: what ``give_back`` takes back."""

    day: str  # the UTC day it was counted on
    sent_at: float  # its entry in the per-second log (monotonic seconds)
    shared_ms: int | None = None  # its entry in the shared window, when shared


def next_utc_midnight(moment: datetime) -> datetime:
    """The start of the UTC day after ``moment``: when a daily quota resets."""
    day = moment.astimezone(UTC).date() + timedelta(days=1)
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


class RateLimiter:
    """Admits requests of one api_key (all its accounts) without exceeding its :class:`Budget`.

    ``acquire()`` waits for a per-second slot and spends one request of today's allowance, or
    raises :class:`BudgetExhaustedError` when the allowance is spent. Waiters are served in order.
    With a ``ledger``, every request is recorded durably before it is sent (and taken back by
    ``give_back`` if it provably never left), so the daily count survives restarts (start with
    ``used_today`` read from the same ledger). With a ``shared``
    budget, each request is also admitted by it (and counted there, instead of in a ledger), so
    several replicas together keep the account's limits. ``name``: the budget's name
    (``AccountSettings.budget_name``, ``key:<hex>``, as /v1/status and /metrics show it; never
    the api_key), for the limiter's log lines.
    """

    def __init__(
        self,
        budget: Budget,
        *,
        name: str = "",
        used_today: int = 0,
        ledger: QuotaLedger | None = None,
        shared: SharedBudget | None = None,
        after_restart: bool = False,
        breaker: KeyBreaker | None = None,
        wall_clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.budget = budget
        self.name = name
        # the key's circuit and holds (a Retry-After, a pause): shared as the limiter is, by
        # every account and client of the key
        self.breaker = breaker or KeyBreaker(clock=wall_clock)
        self._wall_clock = wall_clock
        self._monotonic = monotonic
        self._sleep = sleep
        self._day = self._today()
        self._used_today = used_today
        self._ledger = ledger
        self._shared = shared
        self._sent: deque[float] = deque(maxlen=budget.burst)
        if after_restart:
            # The previous process may have spent this second's requests just before it died;
            # the log of their times died with it, so assume a full window.
            self._sent.extend([monotonic()] * budget.burst)
        self._exhausted = False  # today's quota marked spent by exhaust_today
        self._lock = asyncio.Lock()
        self.waited_s = 0.0  # total time spent waiting for a slot, for metrics
        self.waits = 0  # requests that had to wait for a slot, for metrics

    @property
    def used_today(self) -> int:
        """Requests spent since 00:00 UTC."""
        self._roll_day()
        return self._used_today

    @property
    def remaining_today(self) -> int:
        """Requests left of today's allowance."""
        return max(0, self.budget.daily_allowance - self.used_today)

    def resume_at(self) -> datetime:
        """When the daily allowance renews."""
        return next_utc_midnight(datetime.fromtimestamp(self._wall_clock(), UTC))

    def exhaust_today(self) -> None:
        """Mark today's quota spent, e.g. after the API said so (other apps share the key)."""
        self._roll_day()
        self._exhausted = True
        self._used_today = max(self._used_today, self.budget.daily_allowance)

    async def acquire(self) -> Admission:
        """Wait for a slot and count the request; raise if today's allowance is spent. The
        admission is what :meth:`give_back` takes back if the request is never sent."""
        async with self._lock:
            if self.remaining_today <= 0:
                raise BudgetExhaustedError(
                    f"daily allowance of {self.budget.daily_allowance} requests is spent",
                    resume_at=self.resume_at(),
                )
            if len(self._sent) == self._sent.maxlen:
                wait_s = self._sent[0] + self.budget.window_s - self._monotonic()
                if wait_s > 0:
                    self.waited_s += wait_s
                    self.waits += 1
                    await self._sleep(wait_s)
            day = self._day.isoformat()
            if self._shared is not None:
                # counted there before it is sent, for every replica, on the shared clock's day
                reply = await self._reserve_shared(self._shared)
                sent_at = self._monotonic()
                self._sent.append(sent_at)
                return Admission(reply.day or day, sent_at, reply.sent_ms)
            admission = Admission(day, self._monotonic())
            self._sent.append(admission.sent_at)
            self._used_today += 1
            if self._ledger is not None:
                # Counted before it is sent: a crash can over-count, never under-count. The
                # ledger's total wins, so replicas sharing it see each other's requests.
                try:
                    self._used_today = await self._ledger.spend(day, 1)
                except BaseException:
                    # not counted in the store, so not sent: taken back here too (a full disk
                    # failed every spend, and the count alone spent the day's allowance)
                    self._take_back(admission, None)
                    raise
            return admission

    async def give_back(self, admission: Admission) -> None:
        """Take back a request that provably never left (no connection was made, or it could
        not be built): out of the per-second log and the day's count, here and in the ledger
        or shared budget it was counted in. The API never saw it, so it spends nothing of the
        key's quota; charged, a network outage spent the whole day's allowance on retries.
        A failure to take it back in the store leaves it counted (over-counting is the safe
        side) and is logged, not raised: the caller is handling the request's own error."""
        async with self._lock:
            counted_in: int | None = None
            kept_by = ""  # where the count stays one too high if taking it back fails
            try:
                if self._shared is not None and admission.shared_ms is not None:
                    kept_by = "shared"  # the window and day's count every replica shares
                    counted_in = await self._shared.give_back(admission.day, admission.shared_ms)
                elif self._ledger is not None:
                    kept_by = "ledger"  # the store's count of the day
                    counted_in = await self._ledger.spend(admission.day, -1)
            except Exception as exc:
                # the budget by the name /v1/status and /metrics show for it: a key shared by
                # several accounts has one count, whichever account's request it was
                log.warning(
                    "quota.give_back_failed",
                    budget=self.name or None,
                    day=admission.day,
                    counted_in=kept_by,
                    error=str(exc),
                )
                self._forget_send(admission)
                return
            self._take_back(admission, counted_in)

    def _forget_send(self, admission: Admission) -> None:
        """Remove the admission's entry from the per-second log (if it is still there)."""
        with contextlib.suppress(ValueError):  # pushed out of the log by later requests
            self._sent.remove(admission.sent_at)

    def _take_back(self, admission: Admission, counted_in: int | None) -> None:
        """Undo an admission here: its per-second entry, and its place in the day's count
        (``counted_in``: the count the ledger or shared budget holds now, if it answered)."""
        self._forget_send(admission)
        self._roll_day()
        if admission.day != self._day.isoformat():
            return  # counted on a day that is over: today's count is not its
        used = self._used_today - 1 if counted_in is None else counted_in
        if self._exhausted:  # marked spent by the API meanwhile: it stays spent
            used = max(used, self.budget.daily_allowance)
        self._used_today = max(0, used)

    async def _reserve_shared(self, shared: SharedBudget) -> SharedReply:
        """Wait until the shared budget admits the request; raise when its day's allowance is
        spent."""
        budget = self.budget
        while True:
            reply = await shared.reserve(
                self._day.isoformat(),
                int(self._wall_clock() * 1000),
                budget.burst,
                int(budget.window_s * 1000),
                budget.daily_allowance,
            )
            if reply.day in ("", self._day.isoformat()):
                # another day's count (this clock and the shared one on either side of a
                # midnight) is not this day's: this process's day rolls by its own clock
                self._used_today = reply.used
            if reply.admitted:
                return reply
            if reply.wait_ms <= 0:
                # when the shared day ends, in this clock's terms: a replica whose clock ran
                # ahead past midnight while the shared day was still spent paused the key
                # until its own next midnight, a whole day
                resume_s = self._wall_clock() + reply.day_left_ms / 1000
                raise BudgetExhaustedError(
                    f"daily allowance of {budget.daily_allowance} requests is spent"
                    " (counted over every replica)",
                    resume_at=datetime.fromtimestamp(resume_s, UTC)
                    if reply.day
                    else self.resume_at(),
                )
            self.waited_s += reply.wait_ms / 1000
            self.waits += 1
            await self._sleep(reply.wait_ms / 1000)

    def _today(self) -> date:
        return datetime.fromtimestamp(self._wall_clock(), UTC).date()

    def _roll_day(self) -> None:
        today = self._today()
        if today != self._day:
            self._day = today
            self._used_today = 0
            self._exhausted = False
