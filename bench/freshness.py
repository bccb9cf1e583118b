"""Freshness: the scheduler's event lag beside round robin and an oracle, same budget, one run.

The budget, not the CPU, limits freshness, so this is a discrete-event simulation in virtual time,
not a timing run. The workload is the simulator's own ground truth: a ``relay.sim`` world with
hundreds of campaigns sent over the horizon is advanced in-process (a frozen ``SimClock`` moved with
``advance()``), and every activity's campaign, kind and ``visible_at`` is read from
``World.visible()``. One campaign is one stream; it exists from its send time (discovery is free).

The cost model is the poller's: a pass costs 1 request for the summary plus, per activity kind
whose count changed since the last pass, one request per 500-record page of what became visible
since then, plus the periodic reads by time of a campaign's opens, clicks and forwards (their
counts are of unique recipients, so the poller also reads each that has a count by time, every
``poll.repeat_read_s`` at the shortest, see ``relay.poller.Poller._repeat_reads``): one request
for each such feed whose count did not change, at the first pass an interval after the pass that
last read them all (after the stream's creation before that). The interval is the relay's
(``relay.scheduler.repeat_interval_s``): ``repeat_read_s``, stretched when one read of every
stream's feeds would take more than ``schedule.repeat_share`` of the planning budget. The relay
gets it from its Planner before each pass, as Scheduler._polled hands it to the poller; round
robin and the oracle from the same rule over the ledger's count of those feeds (the same cost
model for all three; ``fit_repeats=False`` keeps theirs at ``repeat_read_s``). Passes run one
after another; a pass that starts at t observes what is visible at t, spends c/B seconds of the
budget B (requests/second), and commits at t + c/B. An event's lag is that commit time minus its
``visible_at``. The policies:

    relay        relay.scheduler.Planner driven exactly as Scheduler._finished drives it: after
                 each pass, after_pass(stream, previous rate or None, new, elapsed since the last
                 pass or creation, planned requests, B * budget_share) gives the next due time,
                 no later than the next read by time; the planned requests are the pass's own
                 with a read by time spread over the passes between two of them, as
                 PassOutcome.planned_requests does; the planner learns what the stream's read by
                 time costs (set_repeat_feeds). A new stream is loaded with the prior rate and
                 is due at once. Idle when nothing is due.
    round robin  every existing stream in creation order, back to back; never idle.
    oracle       the same mechanics, but relay.scheduler.SqrtPolicy is fed every stream's true
                 rate (events becoming visible within +-5 minutes: narrower than the 15-minute
                 mean open delay, so it follows a campaign's decay) and true cost (1 + kinds
                 active in that window), refreshed each minute of virtual time; the interval is
                 interval_s(stream, B * budget_share) at each pass, no later than the next read by
                 time (as the relay's). Idle when nothing is due.

All three use ScheduleSettings() as the relay does by default: its 60 s .. 6 h intervals suit a
multi-day horizon, so nothing is changed. The planning budget is the constant B * budget_share;
the running Scheduler plans with today's remaining quota over the rest of the day, which equals
that while spending keeps pace. Lag is measured for events that become visible within the
horizon; the simulation then runs a drain period so that every such event is committed, and
requests are counted for passes that start within the horizon. Targets: the relay's mean lag is at
most 1.3 times the oracle's and at most half of round robin's. A benchmark reports; it exits 0.

    python bench/freshness.py [--campaigns 300] [--days 3] [--budget-per-day 9000] [--seed 7]
                              [--contacts 400]
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import math
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from relay.ctct.catalogue import Scope
from relay.events import Kind
from relay.poller import UNIQUE_COUNTED, PollSettings
from relay.scheduler import Planner, ScheduleSettings, SqrtPolicy, repeat_interval_s
from relay.sim import Scenario, SimClock
from relay.sim.scenario import Audience, Campaigns, Contacts
from relay.sim.world import World

START = datetime(2026, 11, 2, tzinfo=UTC)
PAGE_LIMIT = 500  # the poller's page size: more records than this cost another request
DRAIN_S = 12 * 3600.0  # after the horizon: twice the 6 h max interval, so every event is committed
ORACLE_WINDOW_S = 300.0  # half-width of the window the oracle's "true rate" is counted in
ORACLE_REFRESH_S = 60.0  # how often the oracle re-reads true rates (the relay's min interval)
TARGET_VS_ORACLE = 1.3
TARGET_VS_ROUND_ROBIN = 0.5
_KINDS = tuple(Kind)
# a campaign's feeds whose counts are of unique recipients: read by time as well (index into _KINDS)
_BY_TIME = frozenset(_KINDS.index(kind) for kind in UNIQUE_COUNTED[Scope.CAMPAIGN])


@dataclass(frozen=True, slots=True)
class StreamTruth:
    """One campaign stream's ground truth, in seconds after the start."""

    campaign_id: str
    created_s: float  # the send time: the stream exists (and is due) from here
    visible_s: tuple[float, ...]  # every activity's visible_at, ascending
    kinds: tuple[int, ...]  # index into _KINDS of each activity, parallel to visible_s


@dataclass(frozen=True, slots=True)
class Workload:
    """Streams in creation order, the measured horizon and the end of the drain period."""

    streams: tuple[StreamTruth, ...]
    horizon_s: float
    end_s: float

    @property
    def created_s(self) -> list[float]:
        """Creation times, ascending (streams are ordered by send time)."""
        return [s.created_s for s in self.streams]

    def events(self) -> int:
        """Activities becoming visible within the horizon: what lag is measured over."""
        return sum(bisect.bisect_right(s.visible_s, self.horizon_s) for s in self.streams)


@dataclass(frozen=True, slots=True)
class PolicyResult:
    """What one policy achieved over the horizon."""

    name: str
    events: int
    mean_lag_s: float
    p95_lag_s: float
    mean_lag_engagement_s: float  # all kinds but sends: what follows the send burst
    requests: int  # spent by passes starting within the horizon
    repeat_requests: int  # of those, reads by time of unique-counted feeds
    passes: int
    uncommitted: int  # horizon events still uncommitted at the end (lag then counted to the end)


def build_workload(campaigns: int, days: float, contacts: int, seed: int) -> Workload:
    """The simulator's world for the horizon plus the drain period, read in-process."""
    horizon_s = days * 86400.0
    end_s = horizon_s + DRAIN_S
    scenario = Scenario(
        seed=seed,
        start=START,
        time_scale=0,
        contacts=Contacts(count=contacts),
        # Sent evenly over the horizon with the default rates (decaying, 5% late arrivals): each
        # campaign is busy for the hour after its send and quiet afterwards, so most streams are
        # quiet at any time.
        campaigns=Campaigns(
            count=campaigns,
            already_sent=0,
            sent_every_s=horizon_s / campaigns,
            audience=Audience(fraction=1.0),
        ),
    )
    clock = SimClock(START, time_scale=0)
    world = World(scenario, clock.start_ms)
    clock.advance(end_s)
    world.advance_to(clock.now_ms())
    start_ms = clock.start_ms
    per_campaign: dict[str, list[tuple[float, int]]] = {c.id: [] for c in world.campaigns}
    kind_index = {kind: i for i, kind in enumerate(_KINDS)}
    for activity in world.visible():
        per_campaign[activity.campaign.id].append(
            ((activity.visible_ms - start_ms) / 1000.0, kind_index[activity.kind])
        )
    streams = []
    for campaign in world.campaigns:  # in send order
        rows = sorted(per_campaign[campaign.id])
        streams.append(
            StreamTruth(
                campaign_id=campaign.id,
                created_s=(campaign.send_ms - start_ms) / 1000.0,
                visible_s=tuple(v for v, _ in rows),
                kinds=tuple(k for _, k in rows),
            )
        )
    return Workload(tuple(streams), horizon_s, end_s)


@dataclass(frozen=True, slots=True)
class Pass:
    """What one pass did and what the scheduler learns from it."""

    new: int
    requests: int  # every request sent, reads by time included: what the budget pays
    commit_s: float
    # the pass's cost in the scheduler's estimate (PassOutcome.planned_requests): its requests
    # with its reads by time replaced by its share of one such read
    planned: float
    repeat_due_s: float  # the next read by time is due then: the scheduler polls by then
    repeat_feeds: int  # what a read by time of the stream costs now (PassOutcome.repeat_feeds)


@dataclass
class Ledger:
    """Every policy's passes go through here: one cost model, one budget, one way to count lag."""

    workload: Workload
    budget_rps: float
    repeat_read_s: float = PollSettings().repeat_read_s
    # With a share, the interval of reads by time is stretched to fit that share of the planning
    # budget (relay.scheduler.repeat_interval_s) over every stream's reads by time; None: fixed.
    # The relay's own passes get the interval from its Planner instead (run_pass's every_s).
    repeat_share: float | None = None
    plan_rps: float = 0.0
    cursors: list[int] = field(default_factory=list)  # per stream: activities committed so far
    # per stream, as the store keeps them: the unique-counted feeds whose count is above 0, when
    # a pass last read all of them (Stream.swept_ms) and when the last pass committed
    counted: list[frozenset[int]] = field(default_factory=list)
    swept_s: list[float | None] = field(default_factory=list)
    polled_s: list[float | None] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)
    engagement_lags: list[float] = field(default_factory=list)
    requests: int = 0
    repeat_requests: int = 0  # of ``requests``: reads by time
    passes: int = 0

    def __post_init__(self) -> None:
        streams = len(self.workload.streams)
        self.cursors = [0] * streams
        self.counted = [frozenset()] * streams
        self.swept_s = [None] * streams
        self.polled_s = [None] * streams

    def repeat_every_s(self) -> float:
        """The interval of reads by time for round robin and the oracle (see ``repeat_share``)."""
        if self.repeat_share is None:
            return self.repeat_read_s
        feeds = sum(len(counted) for counted in self.counted)
        return repeat_interval_s(self.repeat_read_s, feeds, self.plan_rps, self.repeat_share)

    def run_pass(self, index: int, start_s: float, every_s: float | None = None) -> Pass:
        """One pass of a stream starting at ``start_s``; ``every_s``: the interval of reads by
        time the scheduler handed the poller (None: ``repeat_every_s()``)."""
        stream = self.workload.streams[index]
        begin = self.cursors[index]
        end = bisect.bisect_right(stream.visible_s, start_s, lo=begin)
        # The summary gate: a feed is read only if its count changed, one request per page.
        counts = Counter(stream.kinds[begin:end])
        requests = 1 + sum(math.ceil(n / PAGE_LIMIT) for n in counts.values())
        # Reads by time (Poller._repeat_reads): every unique-counted feed that has a count, once
        # repeat_read_s has passed since a pass last read them all; one request each (nothing
        # new since the last pass, or its count would have moved and the gate read it).
        counted = self.counted[index] = self.counted[index] | (counts.keys() & _BY_TIME)
        every = self.repeat_every_s() if every_s is None else every_s
        created, every = stream.created_s, max(self.repeat_read_s, every)
        swept = self.swept_s[index]
        last = created if swept is None else swept
        by_time = counted - counts.keys() if start_s >= last + every else frozenset()
        requests += len(by_time)
        polled = self.polled_s[index]
        covered = max(0.0, start_s - (created if polled is None else polled))
        share = len(counted) * min(1.0, covered / every)
        commit_s = start_s + requests / self.budget_rps
        if counted <= counts.keys() | by_time:  # Poller._swept: this pass read them all
            swept = self.swept_s[index] = commit_s
        self.polled_s[index] = commit_s
        horizon = self.workload.horizon_s
        for visible, kind in zip(stream.visible_s[begin:end], stream.kinds[begin:end], strict=True):
            if visible <= horizon:
                self.lags.append(commit_s - visible)
                if _KINDS[kind] is not Kind.SEND:
                    self.engagement_lags.append(commit_s - visible)
        self.cursors[index] = end
        if start_s < horizon:
            self.requests += requests
            self.repeat_requests += len(by_time)
            self.passes += 1
        repeat_due_s = (created if swept is None else swept) + every
        planned = requests - len(by_time) + share
        return Pass(end - begin, requests, commit_s, planned, repeat_due_s, len(counted))

    def result(self, name: str) -> PolicyResult:
        """Lag statistics; horizon events never committed count as lagging until the end."""
        lags, engagement = list(self.lags), list(self.engagement_lags)
        uncommitted = 0
        w = self.workload
        for index, stream in enumerate(w.streams):
            high = bisect.bisect_right(stream.visible_s, w.horizon_s)
            for visible, kind in zip(
                stream.visible_s[self.cursors[index] : high],
                stream.kinds[self.cursors[index] : high],
                strict=True,
            ):
                uncommitted += 1
                lags.append(w.end_s - visible)
                if _KINDS[kind] is not Kind.SEND:
                    engagement.append(w.end_s - visible)
        return PolicyResult(
            name=name,
            events=len(lags),
            mean_lag_s=statistics.fmean(lags) if lags else 0.0,
            p95_lag_s=_quantile(lags, 0.95),
            mean_lag_engagement_s=statistics.fmean(engagement) if engagement else 0.0,
            requests=self.requests,
            repeat_requests=self.repeat_requests,
            passes=self.passes,
            uncommitted=uncommitted,
        )


def _share(policy: PolicyResult) -> float:
    return policy.repeat_requests / policy.requests if policy.requests else 0.0


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def run_relay(
    workload: Workload,
    budget_rps: float,
    settings: ScheduleSettings,
    planner_factory: Callable[[ScheduleSettings], Planner] = Planner,
) -> PolicyResult:
    """(a) The relay's Planner, called as Scheduler._finished calls it."""
    ledger = Ledger(workload, budget_rps)
    planner = planner_factory(settings)
    plan_rps = budget_rps * settings.budget_share  # what Scheduler.budget_rps hands the planner
    created = workload.created_s
    rates: list[float | None] = [None] * len(created)  # None: never polled (no last_poll_ms)
    last_s: list[float | None] = [None] * len(created)
    due = [(at, index) for index, at in enumerate(created)]  # new streams are due at once
    heapq.heapify(due)
    loaded = 0
    free_s = 0.0
    while due:
        start_s = max(due[0][0], free_s)
        if start_s >= workload.end_s:
            break
        _, index = heapq.heappop(due)
        # Discovery registers streams as they appear; their prior weight enters the rule then.
        while loaded < len(created) and created[loaded] <= start_s:
            planner.load(loaded, None)
            loaded += 1
        # the interval of reads by time fitted to the budget, as Scheduler._polled hands it over
        every_s = planner.repeat_interval_s(ledger.repeat_read_s, plan_rps)
        done = ledger.run_pass(index, start_s, every_s)
        now_s = done.commit_s
        since = last_s[index]
        rate, interval = planner.after_pass(
            index,
            rates[index],
            done.new,
            now_s - (created[index] if since is None else since),
            done.planned,
            plan_rps,
        )
        planner.set_repeat_feeds(index, done.repeat_feeds)
        # the next read by time is due then: a quiet stream planned further out is polled by then
        interval = min(interval, max(settings.min_interval_s, done.repeat_due_s - now_s))
        rates[index], last_s[index] = rate, now_s
        heapq.heappush(due, (now_s + interval, index))
        free_s = now_s
    return ledger.result("relay")


def _baseline_ledger(
    workload: Workload, budget_rps: float, settings: ScheduleSettings, fit_repeats: bool
) -> Ledger:
    """Round robin's and the oracle's ledger: reads by time fitted to the same share of the same
    planning budget as the relay's (``fit_repeats``), or every ``repeat_read_s`` regardless."""
    if not fit_repeats:
        return Ledger(workload, budget_rps)
    plan_rps = budget_rps * settings.budget_share
    return Ledger(workload, budget_rps, repeat_share=settings.repeat_share, plan_rps=plan_rps)


def run_round_robin(
    workload: Workload,
    budget_rps: float,
    settings: ScheduleSettings | None = None,
    fit_repeats: bool = True,
) -> PolicyResult:
    """(b) Every existing stream in creation order, back to back, never idle."""
    ledger = _baseline_ledger(workload, budget_rps, settings or ScheduleSettings(), fit_repeats)
    created = workload.created_s
    now_s, position = 0.0, 0
    while now_s < workload.end_s:
        existing = bisect.bisect_right(created, now_s)
        if existing == 0:
            now_s = created[0]  # no stream yet: nothing to spend the budget on
            continue
        if position >= existing:
            position = 0
        now_s = ledger.run_pass(position, now_s).commit_s
        position += 1
    return ledger.result("round robin")


class _Truth:
    """Each stream's true rate and pass cost around a moment, from the ground truth."""

    def __init__(self, workload: Workload) -> None:
        self._streams = workload.streams
        # Per stream: before this time the window is empty and stays so (no update needed).
        self._quiet_until = [-math.inf] * len(workload.streams)

    def rate_and_cost(self, index: int, at_s: float) -> tuple[float, float]:
        """(events/hour becoming visible within the window around ``at_s``, 1 + kinds active)."""
        stream = self._streams[index]
        low = bisect.bisect_left(stream.visible_s, at_s - ORACLE_WINDOW_S)
        high = bisect.bisect_right(stream.visible_s, at_s + ORACLE_WINDOW_S, lo=low)
        if high == low:
            following = stream.visible_s[high] if high < len(stream.visible_s) else math.inf
            self._quiet_until[index] = following - ORACLE_WINDOW_S
            return 0.0, 1.0
        rate_per_h = (high - low) * 3600.0 / (2 * ORACLE_WINDOW_S)
        return rate_per_h, 1.0 + len(set(stream.kinds[low:high]))

    def changing(self, index: int, at_s: float) -> bool:
        """Whether the stream's window may hold events at ``at_s`` (else its rate is still 0)."""
        return at_s >= self._quiet_until[index]


def run_oracle(
    workload: Workload, budget_rps: float, settings: ScheduleSettings, fit_repeats: bool = True
) -> PolicyResult:
    """(c) The relay's mechanics, but SqrtPolicy is fed true rates and costs instead of estimates.

    Every stream's weight follows the truth (refreshed each minute), so the rule's sum is right
    at every decision; as in the relay, a stream's next due time is set at its pass. Re-planning
    every stream at each refresh was tried and is worse: every stream whose shorter interval has
    already elapsed becomes due at the refresh instant, and hundreds of quiet streams then queue
    ahead of the busy ones.
    """
    ledger = _baseline_ledger(workload, budget_rps, settings, fit_repeats)
    policy = SqrtPolicy(settings)
    truth = _Truth(workload)
    plan_rps = budget_rps * settings.budget_share
    created = workload.created_s
    due = [(at, index) for index, at in enumerate(created)]  # new streams are due at once
    heapq.heapify(due)
    free_s, refresh_s = 0.0, 0.0
    while due:
        start_s = max(due[0][0], free_s)
        if start_s >= workload.end_s:
            break
        if refresh_s <= start_s:
            for index in range(bisect.bisect_right(created, refresh_s)):
                if truth.changing(index, refresh_s):
                    policy.update(index, *truth.rate_and_cost(index, refresh_s))
            refresh_s += ORACLE_REFRESH_S
            continue
        _, index = heapq.heappop(due)
        done = ledger.run_pass(index, start_s)
        now_s = done.commit_s
        policy.update(index, *truth.rate_and_cost(index, now_s))
        interval = policy.interval_s(index, plan_rps)
        interval = min(interval, max(settings.min_interval_s, done.repeat_due_s - now_s))
        heapq.heappush(due, (now_s + interval, index))
        free_s = now_s
    return ledger.result("oracle")


@dataclass(frozen=True, slots=True)
class Comparison:
    """The three policies on one workload and budget."""

    relay: PolicyResult
    round_robin: PolicyResult
    oracle: PolicyResult
    budget_requests: float  # what the budget allows over the horizon

    @property
    def vs_oracle(self) -> float:
        """Relay mean lag / oracle mean lag (target <= 1.3)."""
        return self.relay.mean_lag_s / self.oracle.mean_lag_s

    @property
    def vs_round_robin(self) -> float:
        """Relay mean lag / round-robin mean lag (target <= 0.5)."""
        return self.relay.mean_lag_s / self.round_robin.mean_lag_s


def compare(
    workload: Workload,
    budget_per_day: float,
    settings: ScheduleSettings | None = None,
    fit_repeats: bool = True,
) -> Comparison:
    """Run the three policies on the same workload, budget and cost model."""
    settings = settings or ScheduleSettings()
    budget_rps = budget_per_day / 86400.0
    return Comparison(
        relay=run_relay(workload, budget_rps, settings),
        round_robin=run_round_robin(workload, budget_rps, settings, fit_repeats),
        oracle=run_oracle(workload, budget_rps, settings, fit_repeats),
        budget_requests=budget_rps * workload.horizon_s,
    )


def report(result: Comparison) -> list[str]:
    """The side-by-side table and the verdicts."""
    columns = (result.relay, result.round_robin, result.oracle)
    rows: list[tuple[str, Callable[[PolicyResult], str]]] = [
        ("mean lag (s)", lambda p: f"{p.mean_lag_s:.1f}"),
        ("mean lag (min)", lambda p: f"{p.mean_lag_s / 60:.2f}"),
        ("p95 lag (s)", lambda p: f"{p.p95_lag_s:.1f}"),
        ("p95 lag (min)", lambda p: f"{p.p95_lag_s / 60:.2f}"),
        ("mean lag, non-send (min)", lambda p: f"{p.mean_lag_engagement_s / 60:.2f}"),
        ("events", lambda p: str(p.events)),
        ("uncommitted at end", lambda p: str(p.uncommitted)),
        ("passes", lambda p: str(p.passes)),
        ("requests spent", lambda p: str(p.requests)),
        ("  of which reads by time", lambda p: f"{p.repeat_requests} ({_share(p):.0%})"),
    ]
    lines = [f"  {'':32}" + "".join(f"{p.name:>14}" for p in columns)]
    lines += [f"  {label:32}" + "".join(f"{cell(p):>14}" for p in columns) for label, cell in rows]
    lines.append(f"  {'budget over the horizon':32}{result.budget_requests:14.0f}")
    for label, ratio, target in (
        ("relay / oracle", result.vs_oracle, TARGET_VS_ORACLE),
        ("relay / round robin", result.vs_round_robin, TARGET_VS_ROUND_ROBIN),
    ):
        verdict = "meets" if ratio <= target else "MISSES"
        lines.append(f"  {label + ' (mean lag)':32}{ratio:14.2f}  ({verdict} target <= {target})")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--campaigns", type=int, default=300)
    parser.add_argument("--days", type=float, default=3.0)
    parser.add_argument("--budget-per-day", type=float, default=9000.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--contacts", type=int, default=400)
    args = parser.parse_args()
    started = time.perf_counter()
    workload = build_workload(args.campaigns, args.days, args.contacts, args.seed)
    built = time.perf_counter()
    result = compare(workload, args.budget_per_day)
    s = ScheduleSettings()
    print(
        f"freshness: {args.campaigns} campaign streams over {args.days:g} days"
        f" (+{DRAIN_S / 3600:g} h drain), {args.contacts} contacts, seed {args.seed},"
        f" budget {args.budget_per_day:g} requests/day"
    )
    print(
        f"  settings: intervals {s.min_interval_s:g}..{s.max_interval_s:g} s,"
        f" prior {s.prior_rate_per_h:g}/h, smoothing {s.smoothing:g},"
        f" budget_share {s.budget_share:g}, repeat_read_s {PollSettings().repeat_read_s:g},"
        f" repeat_share {s.repeat_share:g}"
    )
    for line in report(result):
        print(line)
    finished = time.perf_counter()
    print(f"  (world {built - started:.1f} s, simulation {finished - built:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
