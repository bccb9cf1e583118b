"""Which stream to poll when, under each account's request budget.

The budget, not the CPU, limits freshness: 10,000 requests a day is about one request every nine
seconds. Polling stream *i* every T_i seconds costs c_i/T_i requests per second (c_i: requests per
pass) and leaves its events waiting T_i/2 on average, so the event-weighted mean lag is
sum(r_i T_i)/(2 sum r_i). Minimizing it under sum(c_i/T_i) = B gives the square-root rule:

    T_i = sqrt(c_i / r_i) * sum_j sqrt(c_j r_j) / B

so a stream with four times the activity is polled twice as often. ``SqrtPolicy`` keeps the sum
incrementally (a decision is O(1) at 100,000 streams); ``Scheduler`` measures r_i and c_i from
passes, spreads what is left of today's quota over what is left of the day, and dispatches due
streams with APScheduler.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from relay.ctct import errors
from relay.ctct.ratelimit import RateLimiter, next_utc_midnight
from relay.leases import Tenure
from relay.metrics import Metrics
from relay.poller import PassOutcome, Poller, asks_key_to_wait
from relay.store import LeaseLostError, ReplayRequest, Store, StoreError, Stream, StreamLease
from relay.store.coordination import Coordinator, LocalCoordinator

log = structlog.get_logger(__name__)

# how often replicas sharing PostgreSQL re-read targets, pauses and rates into their planners
RELOAD_EVERY_S = 30.0

# A 404 retires a stream only when its previous pass met one too (its error starts with this):
# a retired stream is polled again only after a restart or discovery's daily full scan, so one
# passing 404 (an upstream glitch, a campaign briefly unlisted) lost up to a day of its events.
# A stream really gone costs one more pass, after the error backoff.
NOT_FOUND = "not found (retired if its next pass finds it gone too): "

# after a pass fails on the state store (a full disk, a database restarting), no pass starts for
# this long, doubling while the store keeps failing: every pass spends requests before it
# commits, and retrying due streams at each tick spent them for nothing
STORE_RETRY_S = 1.0
STORE_RETRY_MAX_S = 60.0

# The account's budget ran out (the daily quota, ours or the API's; the API's per-second limit, a
# 429), not the stream: the account pauses or the stream waits a while, but the stream is neither
# counted as failing nor backed off further. Under a tiny quota this is the normal course of a day.
# A 5xx with a Retry-After (poller.asks_key_to_wait) is handled the same way: the API asked the
# key to wait, and every other stream of the key would only get the same answer.
# A pause of the key (KeyPausedError: a long Retry-After, a pause stored, the key's open circuit,
# ctct/breaker.py) is handled the same way: the stream stays due for when it ends.
_BUDGET_ERRORS = (
    errors.QuotaExhaustedError,
    errors.BudgetExhaustedError,
    errors.TooManyRequestsError,
    errors.OverQpsError,
    errors.KeyPausedError,
)


@dataclass(frozen=True, slots=True)
class ScheduleSettings:
    """Bounds and smoothing of adaptive polling."""

    min_interval_s: float = 60.0
    max_interval_s: float = 6 * 3600.0
    prior_rate_per_h: float = 120.0  # assumed for a stream never polled: poll it soon
    floor_rate_per_h: float = 0.05  # keeps silent streams in the rule, at max_interval_s
    smoothing: float = 0.5  # least weight of the latest pass in the rate estimate
    rate_memory_s: float = 1800.0  # a pass covering this long outweighs the history ~2:1
    budget_share: float = 0.9  # of the day's pace; the rest absorbs retries and discovery
    # Most of the planning budget the reads by time of campaigns' unique-counted feeds
    # (poll.repeat_read_s) may take: beyond it their interval stretches (see repeat_interval_s);
    # 0: never stretched, every repeat_read_s whatever the budget.
    repeat_share: float = 0.25
    tick_s: float = 1.0
    concurrency: int = 2  # streams of one account polled at once (the limiter still paces)
    error_backoff_s: float = 30.0
    error_backoff_max_s: float = 3600.0


class SqrtPolicy:
    """Poll intervals by the square-root rule; O(1) per decision."""

    def __init__(self, settings: ScheduleSettings) -> None:
        self._settings = settings
        self._weights: dict[int, float] = {}  # stream -> sqrt(c r), r in events/s
        self._costs: dict[int, float] = {}
        self._rates: dict[int, float] = {}
        self._sum = 0.0

    def __len__(self) -> int:
        return len(self._weights)

    @property
    def total_weight(self) -> float:
        """sum_j sqrt(c_j r_j): what the streams ask of the budget."""
        return max(self._sum, 0.0)

    def update(self, stream_id: int, rate_per_h: float, cost: float) -> None:
        """Set a stream's activity rate (events/hour) and requests per pass."""
        rate = max(rate_per_h, self._settings.floor_rate_per_h) / 3600.0
        weight = math.sqrt(max(cost, 1.0) * rate)
        self._sum += weight - self._weights.get(stream_id, 0.0)
        self._weights[stream_id] = weight
        self._costs[stream_id] = max(cost, 1.0)
        self._rates[stream_id] = rate

    def remove(self, stream_id: int) -> None:
        """Forget a retired or paused stream."""
        self._sum -= self._weights.pop(stream_id, 0.0)
        self._costs.pop(stream_id, None)
        self._rates.pop(stream_id, None)

    def interval_s(self, stream_id: int, budget_rps: float) -> float:
        """Seconds until the stream's next pass, for a planning budget in requests/second."""
        s = self._settings
        rate = self._rates.get(stream_id)
        if rate is None or budget_rps <= 0:
            return s.max_interval_s
        ideal = math.sqrt(self._costs[stream_id] / rate) * max(self._sum, 0.0) / budget_rps
        return min(s.max_interval_s, max(s.min_interval_s, ideal))

    def interval_outside_s(self, rate_per_h: float, cost: float, budget_rps: float) -> float:
        """``interval_s`` of a stream not in the sums, as if it were added (it is not)."""
        s = self._settings
        if budget_rps <= 0:
            return s.max_interval_s
        rate = max(rate_per_h, s.floor_rate_per_h) / 3600.0
        cost = max(cost, 1.0)
        total = max(self._sum, 0.0) + math.sqrt(cost * rate)
        ideal = math.sqrt(cost / rate) * total / budget_rps
        return min(s.max_interval_s, max(s.min_interval_s, ideal))


def estimate_rate(
    previous_per_h: float,
    new: int,
    elapsed_s: float,
    smoothing: float,
    memory_s: float = 1800.0,
) -> float:
    """EWMA of new activities per hour, from one pass that found ``new`` over ``elapsed_s``.

    A pass that covers a long stretch of time says more than one that covers a few seconds: its
    weight grows towards 1 with ``elapsed_s / memory_s`` (never below ``smoothing``). Without
    this, a campaign that went quiet keeps half its old rate per empty pass and holds a large
    share of the budget for most of a day (measured with bench/freshness.py).
    """
    if elapsed_s <= 0:
        return previous_per_h
    observed = new * 3600.0 / elapsed_s
    weight = max(smoothing, 1.0 - math.exp(-elapsed_s / memory_s))
    return weight * observed + (1 - weight) * previous_per_h


def repeat_interval_s(
    shortest_s: float, repeat_feeds: float, budget_rps: float, share: float
) -> float:
    """How often the unique-counted feeds are read by time: every ``shortest_s``
    (``poll.repeat_read_s``) while one read of all of them (``repeat_feeds`` requests, a feed
    each) at that interval takes at most ``share`` of the planning budget, else as often as that
    share pays for: ``max(shortest_s, repeat_feeds / (share * budget_rps))``.

    Those reads find only repeats (a recipient's second open or click: activity no count shows)
    and are due whatever a stream's activity, so left at a fixed interval they grow with every
    campaign followed: with 300 campaigns they alone asked more than a 3,000-request day, and
    the stream deadlines they set crowded out first reads of new activity (bench/freshness.py).
    A spent budget (0) leaves ``shortest_s``: nothing is polled then anyway. A share of 0
    turns this off: ``shortest_s`` whatever the budget.
    """
    if budget_rps <= 0 or repeat_feeds <= 0 or share <= 0:
        return shortest_s
    return max(shortest_s, repeat_feeds / (share * budget_rps))


class Planner:
    """One account's adaptive polling: measured rates and costs feeding the square-root rule.

    Pure arithmetic, no I/O: the scheduler calls it after each pass, and ``bench/freshness.py``
    drives the very same object in simulated time.
    """

    def __init__(self, settings: ScheduleSettings) -> None:
        self._settings = settings
        self.policy = SqrtPolicy(settings)
        self._costs: dict[int, float] = {}
        self._rates: dict[int, float] = {}  # stream -> the rate (events/hour) it is planned with
        # stream -> its unique-counted feeds with a count (what its read by time costs), as
        # its last pass here found them, and their sum
        self._repeat_feeds: dict[int, int] = {}
        self._repeat_sum = 0

    def streams(self) -> set[int]:
        """The streams in the budget sums."""
        return set(self._rates)

    def rate_per_h(self, stream_id: int) -> float | None:
        """The rate a stream is planned with (None: not in the budget sums)."""
        return self._rates.get(stream_id)

    def load(self, stream_id: int, rate_per_h: float | None) -> None:
        """Register a stream with its stored rate (None: never polled, assume it is busy). A
        rate of 0 is a stream gone silent (its estimate decays to exactly 0.0 after ~16 days of
        quiet passes), not one never polled: it keeps its floor, not the busy prior. Loading a
        stream again with the rate it has costs a lookup (replicas reload every 30 s)."""
        rate = self._settings.prior_rate_per_h if rate_per_h is None else rate_per_h
        if self._rates.get(stream_id) == rate:
            return
        self._rates[stream_id] = rate
        self.policy.update(stream_id, rate, self._costs.get(stream_id, 2.0))

    def remove(self, stream_id: int) -> None:
        """Forget a retired stream."""
        self.policy.remove(stream_id)
        self._costs.pop(stream_id, None)
        self._rates.pop(stream_id, None)
        self._repeat_sum -= self._repeat_feeds.pop(stream_id, 0)

    def set_repeat_feeds(self, stream_id: int, feeds: int) -> None:
        """Record what a read by time of the stream costs (its unique-counted feeds that have a
        count, ``PassOutcome.repeat_feeds``)."""
        if stream_id not in self._rates:
            return  # removed while its pass ran: not followed
        self._repeat_sum += feeds - self._repeat_feeds.get(stream_id, 0)
        self._repeat_feeds[stream_id] = feeds

    def repeat_feeds(self) -> float:
        """Requests one read by time of every followed stream takes. Streams no pass here has
        measured yet (after a start, or polled by other replicas) count as the mean of those
        measured: a replica polls about 1/N of the streams, and counting only those would let
        every replica spend the whole share."""
        known = len(self._repeat_feeds)
        if not known:
            return 0.0
        return self._repeat_sum * max(len(self._rates), known) / known

    def repeat_interval_s(self, shortest_s: float, budget_rps: float) -> float:
        """The interval of reads by time for a planning budget (``repeat_interval_s``)."""
        share = self._settings.repeat_share
        return repeat_interval_s(shortest_s, self.repeat_feeds(), budget_rps, share)

    def after_pass(
        self,
        stream_id: int,
        previous_rate_per_h: float | None,
        new: int,
        elapsed_s: float,
        requests: float | None,
        budget_rps: float,
    ) -> tuple[float, float]:
        """The stream's new rate estimate (events/hour) and the seconds until its next pass.
        ``requests`` None: the pass says nothing of the stream's cost (it was stopped part way,
        ``PassOutcome.stopped``), which stays as it was.

        Only ``load`` (the scheduler's reload) puts a stream in the sums: one paused, retired or
        removed while its pass ran stays out (put back here, a paused stream used to keep its
        share of the budget until the next reload: on SQLite, the next admin change), and one
        this replica has not loaded yet joins at its next reload. Either is planned as if it
        were in the sums, neither is left at max_interval_s."""
        s = self._settings
        previous = s.prior_rate_per_h if previous_rate_per_h is None else previous_rate_per_h
        rate = estimate_rate(previous, new, elapsed_s, s.smoothing, s.rate_memory_s)
        known = self._costs.get(stream_id, 2.0)
        cost = known if requests is None else s.smoothing * requests + (1 - s.smoothing) * known
        if stream_id not in self._rates:
            return rate, self.policy.interval_outside_s(rate, cost, budget_rps)
        self._costs[stream_id] = cost
        self._rates[stream_id] = rate
        self.policy.update(stream_id, rate, cost)
        return rate, self.policy.interval_s(stream_id, budget_rps)


@dataclass
class AccountRuntime:
    """What the scheduler drives for one account."""

    name: str
    poller: Poller
    limiter: RateLimiter
    planner: Planner
    inflight: set[int] = field(default_factory=set)
    paused_until_ms: int = 0


class Scheduler:
    """Dispatches due streams of every account, one APScheduler tick at a time."""

    def __init__(
        self,
        store: Store,
        accounts: Sequence[AccountRuntime],
        settings: ScheduleSettings,
        now_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        metrics: Metrics | None = None,
        coordinator: Coordinator | None = None,
        reload_every_s: float = RELOAD_EVERY_S,
    ) -> None:
        self._store = store
        self._reload_every_s = reload_every_s
        self._reloading = asyncio.Lock()  # one reload at a time (periodic, admin, discovery)
        # streams whose pass ended while a reload was reading the store: their planner entry may
        # be newer than what the reload read, which must not overwrite it
        self._finished_during_reload: set[int] | None = None
        # which streams this process may poll: all that are due (alone on SQLite), or those it
        # leased (replicas sharing PostgreSQL)
        self._coordinator = coordinator or LocalCoordinator(store, "local")
        self._passes: dict[int, asyncio.Task[None]] = {}  # stream -> its pass in flight
        # stream -> its pass's lease by this process's clock (replicas: see _lease)
        self._tenures: dict[int, Tenure] = {}
        self._metrics = metrics or Metrics(now_ms)
        self._accounts = {a.name: a for a in accounts}
        self._settings = settings
        self._now_ms = now_ms
        self._tasks: set[asyncio.Task[None]] = set()
        self._job_tasks: set[asyncio.Task[object]] = set()  # jobs APScheduler is running now
        self._aps = AsyncIOScheduler(timezone=UTC)
        self._rng = random.Random()
        self._store_failures = 0  # passes failed on the store in a row
        self._store_retry_ms = 0  # no pass starts before this (Unix ms) after those failures
        self._stopping = False
        self.passes = 0

    async def start(self) -> None:
        """Load stream rates and pauses, then start ticking."""
        await self.reload()
        self._aps.add_job(
            self._tracked(self.tick),
            "interval",
            seconds=self._settings.tick_s,
            id="tick",
            max_instances=1,
            coalesce=True,
            next_run_time=datetime.now(UTC),
        )
        if self._coordinator.shared_budget:
            self._aps.add_job(
                self._tracked(self.renew_leases),
                "interval",
                seconds=self._coordinator.lease_s / 3,
                id="renew-leases",
                max_instances=1,
                coalesce=True,
            )
            # targets, pauses and rates change through other replicas too (their admin API,
            # discovery and passes): without this, the planner here kept weighing streams removed
            # elsewhere (or missed new ones) until a restart, and planned the wrong intervals
            self._aps.add_job(
                self._tracked(self._periodic_reload),
                "interval",
                seconds=self._reload_every_s,
                id="reload",
                max_instances=1,
                coalesce=True,
            )
        self._aps.start()

    def add_job(self, func: Callable[[], Awaitable[None]], seconds: float, job_id: str) -> None:
        """Run ``func`` every ``seconds`` (discovery, pruning), starting now."""
        self._aps.add_job(
            self._tracked(func),
            "interval",
            seconds=seconds,
            id=job_id,
            max_instances=1,
            coalesce=True,
            next_run_time=datetime.now(UTC),
        )

    async def reload(self) -> None:
        """Bring each account's policy in line with the store: its active streams with their
        stored rates, none other (after start-up, target or pause changes, and every
        ``reload_every_s`` with replicas). Streams being polled here, or whose pass finished
        while the store was read, keep what their pass taught the planner."""
        async with self._reloading:
            self._finished_during_reload = set()
            try:
                pauses = await self._store.account_pauses()
                rates = await self._store.stream_rates()
            finally:
                fresh, self._finished_during_reload = self._finished_during_reload, None
            now = self._now_ms()
            for runtime in self._accounts.values():
                stored = pauses.get(runtime.name, (0, ""))[0]
                if stored > max(runtime.paused_until_ms, now):  # seen here first: as a tick
                    self._hold_key_while_paused(runtime, pauses, now)
                runtime.paused_until_ms = stored
            active: dict[str, set[int]] = {name: set() for name in self._accounts}
            for stream_id, (account, rate) in rates.items():
                owner = self._accounts.get(account)
                if owner is None:
                    continue
                active[account].add(stream_id)
                if stream_id in fresh:
                    continue
                # a stream being polled keeps what its pass teaches, unless it is out of the
                # sums (resumed while that pass ran): its pass's end no longer puts it back
                if stream_id not in owner.inflight or owner.planner.rate_per_h(stream_id) is None:
                    owner.planner.load(stream_id, rate)
            for name, runtime in self._accounts.items():
                # retired, paused or removed (here or through another replica): out of the sums
                for stream_id in runtime.planner.streams() - active[name]:
                    runtime.planner.remove(stream_id)

    async def _periodic_reload(self) -> None:
        try:
            await self.reload()
        except StoreError as exc:  # e.g. PostgreSQL restarting: the next one tries again
            log.warning("schedule.reload_failed", error=str(exc))

    def _tracked(self, job: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        """``job`` as APScheduler runs it, its task known to ``stop``."""

        async def run() -> None:
            task = asyncio.current_task()
            if task is not None:
                self._job_tasks.add(task)
            try:
                await job()
            except asyncio.CancelledError:
                if not self._stopping:
                    raise
                # abandoned by stop(): the job's end, not its failure (APScheduler logs anything
                # a job raises, a cancellation too, as an error with its traceback)
            finally:
                if task is not None:
                    self._job_tasks.discard(task)

        return run

    async def stop(self) -> None:
        """Stop ticking; abandon in-flight passes and jobs (what they committed stays
        committed), and wait until they have unwound, so nothing runs on a closed store."""
        self._stopping = True
        if self._aps.running:
            self._aps.shutdown(wait=False)
        running = [*self._job_tasks, *self._tasks]
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)

    async def tick(self) -> None:
        """Start passes for due streams of every account that has capacity and budget."""
        try:
            await self._tick()
        except StoreError as exc:  # e.g. PostgreSQL restarting: the next tick tries again
            log.warning("schedule.store_error", error=str(exc))

    async def _tick(self) -> None:
        now = self._now_ms()
        if now < self._store_retry_ms:
            return  # passes failed on the store: backing off (see STORE_RETRY_S)
        for runtime in await self._unpaused(self._accounts.values(), now):
            free = self._settings.concurrency - len(runtime.inflight)
            breaker = runtime.limiter.breaker
            if breaker.blocks_passes():
                continue  # the key's circuit is open, or its one probe is out
            if breaker.is_open:
                free = min(free, 1 - len(runtime.inflight))  # one pass, whose request probes
            if free <= 0 or runtime.limiter.remaining_today <= 0:
                continue
            asked = time.monotonic()
            due = await self._coordinator.claim_streams(runtime.name, now, free, runtime.inflight)
            for stream_id in due:
                if len(runtime.inflight) >= self._settings.concurrency:
                    await self._coordinator.release_streams([stream_id])
                    continue
                runtime.inflight.add(stream_id)
                lease = self._lease(stream_id, asked)
                task = asyncio.create_task(self._pass(runtime, stream_id, lease))
                self._tasks.add(task)
                self._passes[stream_id] = task
                task.add_done_callback(self._tasks.discard)

    async def _unpaused(self, runtimes: Iterable[AccountRuntime], now: int) -> list[AccountRuntime]:
        """Those of ``runtimes`` that may spend requests now (passes at each tick, campaign
        discovery before it runs): neither held by an operator nor paused by the relay; a
        pause that has ended is lifted."""
        held = await self._store.account_holds()  # operator pauses: read each time, any replica
        # the relay's own pauses too: a spent quota or a long Retry-After one replica learned
        # holds for all of them, or each would spend requests until it got the answer itself
        pauses = await self._store.account_pauses()
        unpaused: list[AccountRuntime] = []
        for runtime in runtimes:
            await self._circuit_paused(runtime, now)
            stored, reason = pauses.get(runtime.name, (0, ""))
            if stored > runtime.paused_until_ms:
                if stored > now:
                    log.info(
                        "account.pause_seen", account=runtime.name, until_ms=stored, reason=reason
                    )
                    self._hold_key_while_paused(runtime, pauses, now)
                runtime.paused_until_ms = stored
            if runtime.paused_until_ms > now or runtime.name in held:
                continue
            if runtime.paused_until_ms:
                # only a pause that has ended: another replica may have stored a newer one (seen
                # at the next tick), or the store's clock (PostgreSQL's) says this one has not
                ended = await self._store.end_account_pause(runtime.name, now)
                if not ended and stored == runtime.paused_until_ms:
                    continue  # this replica's clock runs ahead: the store's decides for all
                runtime.paused_until_ms = 0
                log.info("account.resumed", account=runtime.name)
            unpaused.append(runtime)
        return unpaused

    def _hold_key_while_paused(
        self, runtime: AccountRuntime, pauses: dict[str, tuple[int, str]], now: int
    ) -> None:
        """A pause stored by another replica for every account of ``runtime``'s api_key (a
        spent quota, a long Retry-After, its open circuit: what ``_pause_key`` stores) holds
        the key here too, so passes of it already running here stop at their next page, as
        they do on the replica that stored it; they used to run on to their end, sending
        requests the API had asked the key to hold back. A pause of one account of several (a
        401) holds nothing: the others may go on."""
        sharing = [a.name for a in self._accounts.values() if a.limiter is runtime.limiter]
        until, reason = min((pauses.get(name, (0, "")) for name in sharing), key=lambda p: p[0])
        if until > now:
            runtime.limiter.breaker.hold(until / 1000, reason)

    def account_job(
        self, account: str, job: Callable[[], Awaitable[None]]
    ) -> Callable[[], Awaitable[None]]:
        """``job`` (campaign discovery) spending ``account``'s requests as its passes do: skipped
        while the account is held or paused, and an upstream error it meets pauses the account
        (or its api_key) as a pass's would; the error is raised again."""
        runtime = self._accounts[account]

        async def run() -> None:
            if not await self._unpaused([runtime], self._now_ms()):
                return
            try:
                await job()
            except errors.CtctError as exc:
                await self._account_failed(runtime, None, exc, self._now_ms(), None)
                raise

        return run

    def _lease(self, stream_id: int, asked: float) -> StreamLease | None:
        """The claim of a stream just claimed (its pass's fencing token: ``StreamLease``), held
        by this process's clock from ``asked`` (monotonic: when the claim was asked for) as
        renewals keep it (``Tenure``): a pass stops before a request once it ran out, as after
        a pause past it, with no store call. None: nothing to fence (one process)."""
        lease = self._coordinator.lease(stream_id)
        if lease is None:
            return None
        tenure = Tenure(self._coordinator.lease_s, asked)
        self._tenures[stream_id] = tenure
        return dataclasses.replace(lease, held=tenure.valid)

    async def renew_leases(self) -> None:
        """Extend the leases of the streams being polled; a pass whose lease is lost (another
        replica may poll the stream now) is abandoned: what it committed stays committed."""
        held = dict(self._passes)
        if not held:
            return
        asked = time.monotonic()
        try:
            kept = await self._coordinator.renew_streams(list(held))
        except StoreError as exc:
            log.warning("lease.renew_failed", streams=len(held), error=str(exc))
            return
        for stream_id, task in held.items():
            tenure = self._tenures.get(stream_id)
            if stream_id in kept:
                if tenure is not None:
                    tenure.renewed(asked)
            elif not task.done():
                if tenure is not None:
                    tenure.lose()
                log.warning("lease.lost", stream_id=stream_id)
                task.cancel()

    async def wait_idle(self) -> None:
        """Wait for in-flight passes to finish (tests, graceful shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def budget_rps(self, runtime: AccountRuntime) -> float:
        """Requests/second to plan with: what is left today spread over what is left of it."""
        now = datetime.now(UTC)
        left_s = max(60.0, (next_utc_midnight(now) - now).total_seconds())
        pace = runtime.limiter.remaining_today / left_s
        rps = min(pace, runtime.limiter.budget.requests_per_second) * self._settings.budget_share
        # Accounts sharing an api_key share its limiter: each plans with its streams' share of
        # the weights, so together they follow the square-root rule over all their streams (and
        # spend the key's pace once, not once per account). A paused account spends nothing.
        now_ms = self._now_ms()
        sharing = [
            a
            for a in self._accounts.values()
            if a.limiter is runtime.limiter and (a is runtime or a.paused_until_ms <= now_ms)
        ]
        total = sum(a.planner.policy.total_weight for a in sharing)
        if len(sharing) > 1 and total > 0:
            rps *= runtime.planner.policy.total_weight / total
        return rps

    async def _pass(
        self, runtime: AccountRuntime, stream_id: int, lease: StreamLease | None = None
    ) -> None:
        # every line of one pass carries its poll id and account (and the stream once it is
        # read), its failure on the store included: that line is written out here
        poll_id = secrets.token_hex(6)
        with structlog.contextvars.bound_contextvars(account=runtime.name, poll_id=poll_id):
            await self._pass_logged(runtime, stream_id, lease)

    async def _pass_logged(
        self, runtime: AccountRuntime, stream_id: int, lease: StreamLease | None
    ) -> None:
        try:
            await self._polled(runtime, stream_id, lease)
        except LeaseLostError as exc:
            # another replica claimed the stream while this one was paused (or its renewals
            # failed): its pass writes the stream's state now, so this one records nothing
            # (no error, no backoff: neither the store nor the stream failed). What it
            # committed before stays committed; its other pages are the new holder's to read.
            self._metrics.pass_failed(runtime.name, exc)
            log.warning("poll.lease_lost", stream_id=stream_id, error=str(exc))
        except StoreError as exc:
            # the store is unreachable or refused a write: the stream stays due, and its pages
            # committed so far stay committed; the next pass (here or elsewhere) re-reads them,
            # once the backoff has passed
            self._store_failures += 1
            retry_s = min(STORE_RETRY_MAX_S, STORE_RETRY_S * 2 ** min(self._store_failures - 1, 16))
            self._store_retry_ms = max(self._store_retry_ms, self._now_ms() + int(retry_s * 1000))
            log.warning("poll.store_error", stream_id=stream_id, error=str(exc), retry_in_s=retry_s)
        else:
            self._store_failures = 0
        finally:
            try:
                # before the stream leaves ``inflight``: a claim of it by this replica in
                # between (its lease run out) would be the one released here
                await self._coordinator.release_streams([stream_id])
            except StoreError as exc:  # the lease then ends by itself at its expiry
                log.warning("lease.release_failed", stream_id=stream_id, error=str(exc))
            finally:
                runtime.inflight.discard(stream_id)
                if self._finished_during_reload is not None:
                    self._finished_during_reload.add(stream_id)
                self._passes.pop(stream_id, None)
                self._tenures.pop(stream_id, None)

    async def _polled(
        self, runtime: AccountRuntime, stream_id: int, lease: StreamLease | None = None
    ) -> None:
        stream = await self._store.stream(stream_id)
        if stream.key.account != runtime.name or stream.retired or stream.paused:
            return
        replay = await self._store.stream_replay(stream_id)
        with structlog.contextvars.bound_contextvars(stream=str(stream.key)):
            try:
                # reads by time no more often than the account's budget pays for (see
                # repeat_interval_s): they must not crowd out first reads of new activity
                repeat_every_s = runtime.planner.repeat_interval_s(
                    runtime.poller.repeat_read_s, self.budget_rps(runtime)
                )
                since = None if replay is None else replay.since_ms
                outcome = await runtime.poller.run_pass(stream, since, repeat_every_s, lease=lease)
                await self._finished(runtime, stream, outcome, replay, lease)
                if outcome.stopped is not None:
                    # the key may not send for now: paused (or the stream deferred) as a pass
                    # ending on that error would be, with what this one read kept
                    await self._account_failed(
                        runtime, stream, outcome.stopped, self._now_ms(), replay, lease
                    )
            except StoreError:
                raise  # the store failed, not the stream: _pass leaves the stream due
            except Exception as exc:
                # a CtctError, or a defect (ours, or an upstream value nobody foresaw): uncaught,
                # it would end the task unseen, the stream still due and claimed at every tick
                await self._failed(runtime, stream, exc, replay, lease)
                return
            if replay is not None:  # ended by finish_pass, in the transaction ending the pass
                log.info("poll.replayed", since_ms=replay.since_ms, replayed=outcome.replayed)

    async def _finished(
        self,
        runtime: AccountRuntime,
        stream: Stream,
        outcome: PassOutcome,
        replay: ReplayRequest | None,
        lease: StreamLease | None = None,
    ) -> None:
        now = self._now_ms()
        # A first pass's rate is measured since the stream was added, so only what happened
        # since then counts: a backfill (a campaign discovered after its send, start_from:
        # earliest) divided by those seconds looked like millions an hour, and the square-root
        # rule pushed every other stream of the account out until the estimate decayed.
        new = outcome.new if stream.last_poll_ms else min(outcome.new, outcome.recent)
        stopped = outcome.stopped is not None
        rate, interval = runtime.planner.after_pass(
            stream.id,
            stream.rate_per_h if stream.last_poll_ms else None,
            new,
            (now - (stream.last_poll_ms or stream.created_ms)) / 1000.0,
            None if stopped else outcome.planned_requests,  # a part of a pass: no cost
            self.budget_rps(runtime),
        )
        if outcome.repeat_feeds is not None:
            runtime.planner.set_repeat_feeds(stream.id, outcome.repeat_feeds)
        if outcome.repeat_due_ms is not None:
            # the unique-counted feeds' read by time (poll.repeat_read_s) is due then: a quiet
            # stream planned further out is polled by then (its cost, the summary and those
            # feeds, is in planned_requests)
            due_s = (outcome.repeat_due_ms - now) / 1000.0
            interval = min(interval, max(self._settings.min_interval_s, due_s))
        failed = outcome.feed_error
        if failed is not None:
            # the other feeds were committed and move on; the failing one is read again no
            # sooner than a failed pass would be, backing off as its errors repeat
            interval = max(interval, self._backoff_s(stream))
        if stopped:
            # the feeds it did not read are due when the key may send again (the pause that
            # follows keeps the stream from being polled before)
            interval = 0.0
        # ends the replay the pass ran with it (nothing between them can run it again); a
        # replay asked for while the pass ran (not the one it ran) keeps the stream due
        await self._store.finish_pass(
            stream.id,
            outcome.result(now + int(interval * 1000), rate, now),
            replay=replay,
            lease=lease,
        )
        self.passes += 1
        ended = outcome.stopped or failed
        result = "ok" if ended is None else type(ended).__name__
        self._metrics.pass_finished(runtime.name, outcome, result)
        if failed is not None:
            log.warning(
                "poll.failed",
                error=str(failed),
                feeds_failed=[k.value for k in outcome.feeds_failed],
                feeds_put_off=[k.value for k in outcome.feeds_put_off],
                retry_in_s=round(interval, 1),
            )
        log.info(
            "poll.pass",
            requests=outcome.requests,
            fetched=outcome.fetched,
            new=outcome.new,
            skipped=outcome.skipped_records,
            feeds=[k.value for k in outcome.feeds_read],
            rate_per_h=round(rate, 2),
            next_in_s=round(interval, 1),
        )

    def _backoff_s(self, stream: Stream) -> float:
        """How long a stream waits after a failed pass: doubling with its consecutive errors
        (before this one), up to error_backoff_max_s, jittered."""
        backoff: float = min(
            self._settings.error_backoff_max_s,
            self._settings.error_backoff_s * 2 ** min(stream.consecutive_errors, 16),
        )
        return backoff * self._rng.uniform(0.5, 1.0)

    async def _failed(
        self,
        runtime: AccountRuntime,
        stream: Stream,
        exc: Exception,
        replay: ReplayRequest | None,
        lease: StreamLease | None = None,
    ) -> None:
        """Record a failed pass and back off; an upstream error may also pause the account or
        retire the stream. Any other exception is a crash: logged with its traceback."""
        self._metrics.pass_failed(runtime.name, exc)
        now = self._now_ms()
        if isinstance(exc, errors.NotFoundError):
            if stream.consecutive_errors and (stream.last_error or "").startswith(NOT_FOUND):
                log.warning("poll.retired", reason=str(exc))
                await self._store.record_error(stream.id, str(exc), now, retire=True, lease=lease)
                runtime.planner.remove(stream.id)
                return
            # the first 404: a failed pass like any other, retired if the next finds it gone
            reason = NOT_FOUND + str(exc)
            delay_s = self._backoff_s(stream)
            log.warning("poll.not_found", error=str(exc), retry_in_s=round(delay_s, 1))
            await self._store.record_error(
                stream.id, reason, now + int(delay_s * 1000), replay=replay, lease=lease
            )
            return
        if await self._account_failed(runtime, stream, exc, now, replay, lease):
            return
        delay_s = self._backoff_s(stream)
        retry_in_s = round(delay_s, 1)
        if isinstance(exc, errors.CtctError):
            reason = str(exc)
            log.warning("poll.failed", error=reason, retry_in_s=retry_in_s)
        else:
            reason = f"{type(exc).__name__}: {exc}"
            log.error(
                "poll.crashed",
                error_type=type(exc).__name__,
                error=str(exc),
                retry_in_s=retry_in_s,
                exc_info=exc,
            )
        due = now + int(delay_s * 1000)
        await self._store.record_error(stream.id, reason, due, replay=replay, lease=lease)

    async def _budget_ran_out(
        self,
        runtime: AccountRuntime,
        stream: Stream | None,
        exc: errors.CtctError,
        now: int,
        replay: ReplayRequest | None,
        lease: StreamLease | None = None,
    ) -> None:
        """The account's budget ran out, not the stream: its error count stays as it is. A spent
        quota or a Retry-After (a 429's or a 5xx's) pauses the account (every replica honours
        the stored pause) and leaves the stream due for when it ends. The API's per-second
        limit still hit after the client's retries (an over-qps 403, a 429 without Retry-After)
        defers only this stream, by ``error_backoff_s``, never doubled: the next second may
        well have room. Outside a pass (``stream`` None: campaign discovery) only the pauses
        apply."""
        if isinstance(exc, (errors.QuotaExhaustedError, errors.BudgetExhaustedError)):
            await self._pause_key(runtime, int(exc.resume_at.timestamp() * 1000), str(exc))
        elif isinstance(exc, errors.KeyPausedError):
            # the key was paused (here, by a Retry-After or its circuit): stored once; a probe
            # already out (resume_at now) pauses nothing, the next tick sees its outcome
            until = int(exc.resume_at.timestamp() * 1000)
            if until > now and until > runtime.paused_until_ms:
                await self._pause_key(runtime, until, str(exc))
        elif exc.retry_after_s:
            # The server asked the whole key to wait (the client only waits out short ones in
            # place): every other stream would get its own 429 (or 503) and spend budget. A
            # bogus header cannot pause the account for ever: at most a day.
            wait_s = min(exc.retry_after_s, 86_400.0)
            reason = f"{exc.status or 429} with Retry-After {exc.retry_after_s:g} s: {exc}"
            await self._pause_key(runtime, now + int(wait_s * 1000), reason)
        elif stream is not None:  # a job outside a pass runs again at its own interval
            delay_s = self._settings.error_backoff_s * self._rng.uniform(0.5, 1.0)
            log.warning("poll.rate_limited", error=str(exc), retry_in_s=round(delay_s, 1))
            due = now + int(delay_s * 1000)
            await self._store.defer_stream(stream.id, due, replay=replay, lease=lease)

    async def _account_failed(
        self,
        runtime: AccountRuntime,
        stream: Stream | None,
        exc: Exception,
        now: int,
        replay: ReplayRequest | None,
        lease: StreamLease | None = None,
    ) -> bool:
        """Pause the account or its api_key for an error that is about them, not the stream
        (a pass's, or campaign discovery's: ``stream`` None). True: the budget ran out
        (``_budget_ran_out``), which the stream does not count as its error."""
        if not isinstance(exc, errors.CtctError):
            return False
        if isinstance(exc, _BUDGET_ERRORS) or asks_key_to_wait(exc):
            await self._budget_ran_out(runtime, stream, exc, now, replay, lease)
            return True
        if isinstance(exc, errors.UnauthorizedError):
            # Credentials will not fix themselves; retry hourly so a rotated key is picked up.
            await self._pause(runtime, now + 3600_000, f"credentials rejected: {exc}")
        elif isinstance(exc, errors.ForbiddenError):
            # A 403 that is no rate limit (those are OverQpsError and QuotaExhaustedError): a
            # deactivated application, revoked privileges. It will not pass by itself either,
            # and every stream of the account would get its own; the token is the account's,
            # so only the account pauses, retried hourly like a 401.
            await self._pause(runtime, now + 3600_000, f"forbidden: {exc}")
        return False

    async def _circuit_paused(self, runtime: AccountRuntime, now: int) -> None:
        """Store the pause an open circuit of the account's key implies (until its probe time),
        for status and every replica, once per open period."""
        breaker = runtime.limiter.breaker
        if breaker.open_until_s is None:
            return
        until = int(breaker.open_until_s * 1000)
        if until > now and until > runtime.paused_until_ms:
            await self._pause_key(runtime, until, breaker.reason())

    async def _pause(self, runtime: AccountRuntime, until_ms: int, reason: str) -> None:
        runtime.paused_until_ms = max(runtime.paused_until_ms, until_ms)
        await self._store.set_account_pause(runtime.name, until_ms, reason)
        log.error("account.paused", account=runtime.name, until_ms=until_ms, reason=reason)

    async def _pause_key(self, runtime: AccountRuntime, until_ms: int, reason: str) -> None:
        """Pause every account of ``runtime``'s api_key (those sharing its limiter): the key's
        quota or a Retry-After holds for all of them. A 401 pauses only its account. Passes of
        the key already running stop at their next request (the key's hold, ctct/breaker.py)."""
        runtime.limiter.breaker.hold(until_ms / 1000, reason)
        await self._pause(runtime, until_ms, reason)
        for other in self._accounts.values():
            if other is not runtime and other.limiter is runtime.limiter:
                await self._pause(other, until_ms, f"api_key shared with {runtime.name}: {reason}")
