"""The benchmarks' core functions on tiny inputs: output shape and sane, comparable values."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import freshness, scale
from relay.events import Kind
from relay.scheduler import ScheduleSettings

BUDGET_PER_DAY = 4000.0  # tight for the small workload, so the policies differ


@pytest.fixture(scope="module")
def workload() -> freshness.Workload:
    """Forty campaigns over a simulated day: skewed, since each is busy only after its send."""
    return freshness.build_workload(campaigns=40, days=1.0, contacts=40, seed=3)


@pytest.fixture(scope="module")
def comparison(workload: freshness.Workload) -> freshness.Comparison:
    """The three policies on the tiny workload."""
    return freshness.compare(workload, BUDGET_PER_DAY)


def test_workload_is_the_simulators_ground_truth(workload: freshness.Workload) -> None:
    """Every campaign is a stream created at its send, with activities ordered by visible_at."""
    assert len(workload.streams) == 40
    assert workload.created_s == sorted(workload.created_s)
    for stream in workload.streams:
        assert stream.visible_s, "every campaign has at least its sends"
        assert list(stream.visible_s) == sorted(stream.visible_s)
        assert stream.visible_s[0] >= stream.created_s
        assert len(stream.kinds) == len(stream.visible_s)
    assert workload.events() > 0


def test_ledger_charges_summary_plus_pages_of_changed_feeds() -> None:
    """A pass costs 1 + one request per 500-record page of each changed kind, and commits late."""
    opens, clicks = freshness._KINDS.index(Kind.OPEN), freshness._KINDS.index(Kind.CLICK)
    stream = freshness.StreamTruth(
        campaign_id="1",
        created_s=0.0,
        visible_s=tuple([10.0] * 600 + [20.0, 5000.0]),
        kinds=tuple([opens] * 600 + [clicks, opens]),
    )
    ledger = freshness.Ledger(freshness.Workload((stream,), 10_000.0, 20_000.0), budget_rps=0.5)
    first = ledger.run_pass(0, 100.0)
    assert (first.new, first.requests) == (601, 1 + 2 + 1)  # summary, 2 pages of opens, 1 of clicks
    commit_s = first.commit_s
    assert commit_s == 100.0 + first.requests / 0.5
    second = ledger.run_pass(0, 200.0)
    assert (second.new, second.requests) == (0, 1)  # nothing changed: the summary only
    result = ledger.result("probe")
    assert result.events == 602
    assert result.uncommitted == 1  # the open at 5000 s: counted as lagging until the end
    assert result.requests == 5
    assert result.mean_lag_s > commit_s - 20.0


def test_ledger_charges_the_reads_by_time_as_the_scheduler_does() -> None:
    """A campaign's opens and clicks count unique recipients, so the poller reads each that has a
    count every repeat_read_s whether it moved or not: the ledger left those requests out, so
    the relay's figures were optimistic. They are charged now, one request per such feed, at the
    first pass repeat_read_s after the pass that last read them all; the scheduler's estimate
    gets the pass's share of one such read instead (PassOutcome.planned_requests), and the next
    due time of the read."""
    opens, clicks = freshness._KINDS.index(Kind.OPEN), freshness._KINDS.index(Kind.CLICK)
    sends = freshness._KINDS.index(Kind.SEND)
    stream = freshness.StreamTruth(
        campaign_id="1",
        created_s=0.0,
        visible_s=(5.0, 10.0, 20.0, 30_000.0),
        kinds=(sends, opens, clicks, opens),
    )
    every = 1000.0
    workload = freshness.Workload((stream,), 40_000.0, 50_000.0)
    ledger = freshness.Ledger(workload, budget_rps=1.0, repeat_read_s=every)
    first = ledger.run_pass(0, 100.0)  # every feed with a count read: the read by time is done
    assert (first.requests, first.commit_s, first.repeat_due_s) == (4, 104.0, 104.0 + every)
    assert first.planned == pytest.approx(4 + 2 * 100.0 / every)  # share: opens, clicks
    quiet = ledger.run_pass(0, 500.0)
    assert (quiet.requests, quiet.repeat_due_s) == (1, 104.0 + every)
    assert quiet.planned == pytest.approx(1 + 2 * (500.0 - 104.0) / every)
    due = ledger.run_pass(0, 104.0 + every)  # opens and clicks read by time: one request each
    assert (due.new, due.requests) == (0, 3)
    assert due.planned == pytest.approx(1 + 2 * (104.0 + every - 501.0) / every)
    assert due.repeat_due_s == due.commit_s + every
    moved = ledger.run_pass(0, 30_001.0)  # the open count moved: read; clicks read by time
    assert (moved.new, moved.requests) == (1, 3)
    assert moved.planned == pytest.approx(3 - 1 + 2)  # a whole read by time covered, and more
    assert ledger.result("probe").repeat_requests == 2 + 1


def test_the_relay_is_charged_its_reads_by_time(workload: freshness.Workload) -> None:
    """The relay's column spends requests on reads by time, within the same budget."""
    budget_rps = BUDGET_PER_DAY / 86400
    settings = ScheduleSettings()
    charged = freshness.run_relay(workload, budget_rps, settings)
    assert charged.repeat_requests > 0
    assert charged.requests <= budget_rps * workload.horizon_s + 10


def test_freshness_report_shape(comparison: freshness.Comparison) -> None:
    """Each policy commits every event of the horizon, within the budget, with positive lags."""
    events = {p.events for p in (comparison.relay, comparison.round_robin, comparison.oracle)}
    assert len(events) == 1
    assert events.pop() > 0
    for policy in (comparison.relay, comparison.round_robin, comparison.oracle):
        assert policy.uncommitted == 0
        assert policy.mean_lag_s > 0
        assert policy.p95_lag_s > 0
        assert 0 < policy.requests <= comparison.budget_requests + 10  # + one pass in flight
    lines = freshness.report(comparison)
    assert any(line.strip().startswith("relay / oracle") for line in lines)
    assert any(line.strip().startswith("relay / round robin") for line in lines)
    assert all(("meets" in line) or ("MISSES" in line) for line in lines[-2:])


def test_round_robin_never_idles(comparison: freshness.Comparison) -> None:
    """Round robin spends the budget from the first send on; the adaptive policies may idle."""
    assert comparison.round_robin.requests >= 0.9 * comparison.budget_requests
    assert comparison.relay.requests <= comparison.round_robin.requests


def test_oracle_and_relay_beat_round_robin(comparison: freshness.Comparison) -> None:
    """On a skewed workload the square-root rule, true or estimated, lags less than round robin."""
    assert comparison.oracle.mean_lag_s <= comparison.round_robin.mean_lag_s
    assert comparison.relay.mean_lag_s <= comparison.round_robin.mean_lag_s
    assert comparison.vs_round_robin == pytest.approx(
        comparison.relay.mean_lag_s / comparison.round_robin.mean_lag_s
    )


def test_relay_policy_is_driven_through_the_planner(workload: freshness.Workload) -> None:
    """The relay's column comes from the Planner it is given: a slower planner lags more."""
    settings = ScheduleSettings()
    budget_rps = BUDGET_PER_DAY / 86400
    default = freshness.run_relay(workload, budget_rps, settings)
    slow = ScheduleSettings(min_interval_s=3600.0, max_interval_s=3600.0)
    throttled = freshness.run_relay(workload, budget_rps, slow)
    assert throttled.mean_lag_s > default.mean_lag_s


async def test_scale_run_shape_and_bounded_dedup(tmp_path: Path) -> None:
    """A small scale run: streams registered, cycles timed, dedup keys and outbox rows plateau
    (the prune job's retentions of a week), the keys under the bound. (At this size the WAL's
    growth between checkpoints moves the file's bytes by more than 1% a day.)"""
    per_day, days = 400, 14  # a week of retention, then a week of steady state
    result = await scale.run(
        tmp_path, campaigns=100, contacts=1000, passes=150, days=days, per_day=per_day
    )
    assert result.registered == 1100
    assert len(result.cycle_ms) == 150
    assert all(ms > 0 for ms in result.cycle_ms)
    assert [label for label, _ in result.memory][-1] == f"{days}-day dedup run"
    assert all(m.peak_mb >= m.rss_mb > 0 for _, m in result.memory)
    assert [d.day for d in result.days] == list(range(1, days + 1))
    assert all(d.fresh == per_day for d in result.days)  # overlap re-reads are deduplicated
    keys = [float(d.dedup_keys) for d in result.days]
    assert keys[-1] <= result.dedup_bound
    assert keys[-1] == 7 * per_day  # exactly the retention's days survive a prune
    assert scale.plateaus(keys)
    rows = [d.outbox_rows for d in result.days]
    assert rows[:7] == [per_day * (day + 1) for day in range(7)]
    assert rows[7:] == [7 * per_day] * (days - 7)  # a day's events in, a week-old day's out
    lines = scale.report(result)
    assert any("decision p99" in line for line in lines)
    assert any(line.strip().startswith("dedup keys ") and "meets" in line for line in lines)


def test_plateau_verdicts() -> None:
    """A steady series plateaus; one still growing by more than 1% of its maximum a day does not."""
    assert scale.plateaus([5.0] * 3 + [100.0] * 7)
    assert not scale.plateaus([float(day) for day in range(1, 31)])
    assert scale.last_week_slope([1.0, 3.0]) == pytest.approx(2.0)


def test_reads_by_time_keep_to_their_share_of_a_tight_budget(workload: freshness.Workload) -> None:
    """With a budget too small for reads by time every repeat_read_s, the relay's planner
    stretches their interval (schedule.repeat_share): they take at most that share of the
    planning budget, fewer than at a share of the whole budget, and still happen."""
    budget_rps = 600 / 86400
    tight = ScheduleSettings(repeat_share=0.25)
    whole = ScheduleSettings(repeat_share=1.0)
    fitted = freshness.run_relay(workload, budget_rps, tight)
    unfitted = freshness.run_relay(workload, budget_rps, whole)
    plan_requests = budget_rps * tight.budget_share * workload.horizon_s
    assert 0 < fitted.repeat_requests <= 0.25 * plan_requests
    assert fitted.repeat_requests < unfitted.repeat_requests


def test_the_baselines_ledger_fits_reads_by_time_to_the_same_share() -> None:
    """Round robin and the oracle get reads by time at the interval the relay's rule gives for
    the same share of the same planning budget: a stream whose two counted feeds would take
    more than that share every repeat_read_s is read by time later, at the stretched interval."""
    opens, clicks = freshness._KINDS.index(Kind.OPEN), freshness._KINDS.index(Kind.CLICK)
    stream = freshness.StreamTruth("1", 0.0, (10.0, 20.0), (opens, clicks))
    workload = freshness.Workload((stream,), 40_000.0, 50_000.0)
    # two feeds per read; a quarter of 2 / 4,000 requests/s pays for one read per 4,000 s
    ledger = freshness.Ledger(
        workload, budget_rps=1.0, repeat_read_s=1000.0, repeat_share=0.25, plan_rps=0.002
    )
    first = ledger.run_pass(0, 100.0)
    assert first.repeat_due_s == pytest.approx(first.commit_s + 4000.0)
    assert ledger.run_pass(0, first.commit_s + 1000.0).requests == 1  # not yet: stretched
    due = ledger.run_pass(0, first.commit_s + 4000.0)
    assert due.requests == 1 + 2
