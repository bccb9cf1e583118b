"""Scale: 10,000 campaign and 100,000 contact streams in a real SQLite store.

Three measurements, each against an absolute target (there is no baseline to take a ratio with):

1. Peak RSS of this process (``VmHWM`` from /proc/self/status, ``ru_maxrss`` as a fallback),
   sampled after each phase: registering the streams with ``ensure_streams`` in batches, loading
   the scheduler's state with the relay's own ``Scheduler.reload`` (which calls ``Planner.load``
   for every stream of ``store.stream_rates()``), and a few thousand simulated passes. The SQLite
   connection lives in this process, so its page cache counts too. Target: under 300 MB.
2. A scheduling decision's latency at that size: one ``store.due_streams`` + ``store.stream``
   (the scheduler reads the stream to know its previous rate and last poll) +
   ``Planner.after_pass`` + ``store.finish_pass`` cycle, timed with ``perf_counter``; p50 and
   p99 over the passes. ``finish_pass`` commits with ``synchronous=FULL``, so the disk's fsync
   is part of it, as in production. Target: p99 under 50 ms.
3. The dedup store over a long run: synthetic ``relay.events.Activity`` values are committed with
   ``store.commit_page`` day by day (pages of 500, each re-reading a slice of the page before, as
   the poller's overlap does), the day's events are fanned out to webhooks (none registered: the
   fan-out only moves its cursor, as a running dispatcher does), then the relay's prune job runs
   as it does with the default retentions of 168 h: ``prune_dedup``, ``prune_deliveries`` and
   ``prune_outbox`` (published events older than ``outbox_retention_h``; the fan-out is the only
   reader, as in a relay without a Kafka sink). Per simulated day: dedup keys, the dedup table's
   bytes (SQLite's ``dbstat``) and the file's bytes (database plus WAL). Each must plateau: over
   the last seven days its least-squares slope stays within 1% of its maximum per day.

Passes run in virtual time: each advances the clock by its requests at 9,000 requests/day, and
every stream is due at registration, so the due query always has a backlog to choose from.

    python bench/scale.py [--campaigns 10000] [--contacts 100000] [--passes 3000] [--days 30]
                          [--per-day 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import resource
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

from relay.ctct import catalogue
from relay.ctct.ratelimit import Budget, RateLimiter
from relay.events import Activity, Kind, to_millis
from relay.poller import Poller
from relay.scheduler import AccountRuntime, Planner, Scheduler, ScheduleSettings
from relay.store import PassResult, Store, StreamKey, open_store

ACCOUNT = "bench"
START = datetime(2026, 11, 1, tzinfo=UTC)
BUDGET_PER_DAY = 9000.0
REGISTER_BATCH = 5000
PAGE = 500  # the poller commits one page of up to 500 records per transaction
OVERLAP_SHARE = 0.05  # of each page re-read from the page before (overlap), dropped by dedup
DEDUP_RETENTION_H = 168.0  # the relay's default dedup_retention_h
OUTBOX_RETENTION_H = 168.0  # the relay's default outbox_retention_h
BUSY_EVERY = 50  # one stream in 50 is busy: a skewed workload like freshness.py's
BUSY_RATE_PER_H, QUIET_RATE_PER_H = 60.0, 0.05
TARGET_RSS_MB = 300.0
TARGET_P99_MS = 50.0
PLATEAU_SLOPE = 0.01  # of the maximum, per day, over the last week
_DAY_MS = 86_400_000
_KINDS = tuple(Kind)


@dataclass(frozen=True, slots=True)
class Memory:
    """Resident set size now and at its peak, in MB."""

    rss_mb: float
    peak_mb: float


def memory() -> Memory:
    """This process's RSS and peak RSS (VmRSS, VmHWM; ru_maxrss where /proc is missing)."""
    fields: dict[str, float] = {}
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                name, _, value = line.partition(":")
                if name in {"VmRSS", "VmHWM"}:
                    fields[name] = float(value.split()[0]) / 1024  # kB
    except OSError:
        pass
    max_rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    peak = max(fields.get("VmHWM", 0.0), max_rss_kb / 1024)
    return Memory(fields.get("VmRSS", peak), peak)


@dataclass(frozen=True, slots=True)
class DayRow:
    """The store after one simulated day's commits and its prune."""

    day: int
    dedup_keys: int
    dedup_bytes: int
    outbox_bytes: int
    file_bytes: int
    outbox_rows: int
    fresh: int  # keys that were new on commit
    pruned: int


@dataclass
class ScaleResult:
    """Everything the scale run measured."""

    streams: int
    registered: int = 0  # streams ensure_streams created
    register_s: float = 0.0
    reload_s: float = 0.0
    memory: list[tuple[str, Memory]] = field(default_factory=list)
    cycle_ms: list[float] = field(default_factory=list)
    due_ms: list[float] = field(default_factory=list)
    finish_ms: list[float] = field(default_factory=list)
    days: list[DayRow] = field(default_factory=list)
    dedup_bound: int = 0  # keys a correct prune can leave: retention + one day of activity


def stream_keys(campaigns: int, contacts: int) -> Iterator[StreamKey]:
    """Campaign streams first, then contact streams, with API-looking ids."""
    for i in range(campaigns):
        yield StreamKey(ACCOUNT, "campaign", str(1_100_394_165_290 + 1_013 * i))
    for i in range(contacts):
        yield StreamKey(ACCOUNT, "contact", str(1001 + i))


async def register(store: Store, campaigns: int, contacts: int) -> int:
    """ensure_streams in batches, as discovery and configured targets do."""
    batch: list[StreamKey] = []
    created = 0
    for key in stream_keys(campaigns, contacts):
        batch.append(key)
        if len(batch) == REGISTER_BATCH:
            created += await store.ensure_streams(batch, to_millis(START))
            batch = []
    if batch:
        created += await store.ensure_streams(batch, to_millis(START))
    return created


async def reload_scheduler(store: Store, planner: Planner, settings: ScheduleSettings) -> None:
    """The relay's own Scheduler.reload: pauses, stream_rates, Planner.load for each."""
    runtime = AccountRuntime(
        name=ACCOUNT,
        poller=cast(Poller, None),  # reload never touches the poller
        limiter=RateLimiter(Budget()),
        planner=planner,
    )
    scheduler = Scheduler(store, [runtime], settings)
    await scheduler.reload()


def _poisson(rng: random.Random, mean: float) -> int:
    """A Poisson sample (Knuth's method for small means, a rounded normal for large ones)."""
    if mean > 30:
        return max(0, round(rng.gauss(mean, math.sqrt(mean))))
    limit, count, product = math.exp(-mean), 0, rng.random()
    while product > limit:
        count += 1
        product *= rng.random()
    return count


async def run_passes(
    store: Store, planner: Planner, settings: ScheduleSettings, passes: int, result: ScaleResult
) -> None:
    """Simulated passes through the relay's decision path, each cycle timed."""
    rng = random.Random(5)
    budget_rps = BUDGET_PER_DAY / 86400.0
    plan_rps = budget_rps * settings.budget_share
    now_ms = to_millis(START) + 1000
    for _ in range(passes):
        started = time.perf_counter()
        due = await store.due_streams(now_ms, settings.concurrency)  # as Scheduler.tick asks
        after_due = time.perf_counter()
        if not due:
            now_ms += 1000
            continue
        stream = await store.stream(due[0])
        since_ms = stream.last_poll_ms or stream.created_ms
        true_rate = BUSY_RATE_PER_H if stream.id % BUSY_EVERY == 0 else QUIET_RATE_PER_H
        new = _poisson(rng, true_rate * (now_ms - since_ms) / 3_600_000)
        requests = 1 + min(new, 3)  # the summary, plus the feeds whose counts changed
        rate, interval = planner.after_pass(
            stream.id,
            stream.rate_per_h if stream.last_poll_ms else None,
            new,
            (now_ms - since_ms) / 1000.0,
            requests,
            plan_rps,
        )
        summary = dict(stream.summary)
        summary[catalogue.FEEDS[Kind.OPEN]] = summary.get(catalogue.FEEDS[Kind.OPEN], 0) + new
        before_finish = time.perf_counter()
        await store.finish_pass(
            stream.id,
            PassResult(
                watermarks={Kind.OPEN: now_ms - 60_000} if new else {},
                summary=summary,
                next_due_ms=now_ms + int(interval * 1000),
                rate_per_h=rate,
                polled_ms=now_ms,
                # what Scheduler._finished writes too: no feed behind its count here, the
                # history line (kept from the first pass) and the last full read of opens
                behind={},
                line_ms=now_ms,
                swept_ms=now_ms,
            ),
        )
        finished = time.perf_counter()
        result.cycle_ms.append((finished - started) * 1000)
        result.due_ms.append((after_due - started) * 1000)
        result.finish_ms.append((finished - before_finish) * 1000)
        now_ms += int(requests / budget_rps * 1000)  # the budget paces passes


def _activity(rng: random.Random, day_start: datetime, campaigns: int, contacts: int) -> Activity:
    kind = _KINDS[rng.randrange(len(_KINDS))]
    return Activity(
        account=ACCOUNT,
        kind=kind,
        campaign_id=str(1_100_394_165_290 + 1_013 * rng.randrange(campaigns)),
        contact_id=str(1001 + rng.randrange(contacts)),
        email_address="contact@example.com",
        occurred_at=day_start + timedelta(milliseconds=rng.randrange(_DAY_MS)),
        link_id=str(rng.randrange(1000, 1032)) if kind is Kind.CLICK else None,
    )


def table_bytes(path: Path, table: str) -> int:
    """Bytes of a table and its indexes, from SQLite's dbstat (walking only those B-trees)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        names = [
            str(row[0])
            for row in conn.execute("SELECT name FROM sqlite_schema WHERE tbl_name = ?", (table,))
        ]
        total = 0
        for name in names:
            row = conn.execute(
                "SELECT COALESCE(SUM(pgsize), 0) FROM dbstat WHERE name = ?", (name,)
            ).fetchone()
            total += int(row[0])
        return total
    finally:
        conn.close()  # the context manager of sqlite3 commits, it does not close


def outbox_rows(path: Path) -> int:
    """Events in the outbox now (its head seq counts the pruned ones too)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
    finally:
        conn.close()


def _file_bytes(path: Path) -> int:
    wal = path.with_name(path.name + "-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


async def dedup_run(
    store: Store,
    path: Path,
    campaigns: int,
    contacts: int,
    days: int,
    per_day: int,
    result: ScaleResult,
) -> None:
    """Commit a day of activity at a time, prune at the end of each day, record the sizes."""
    rng = random.Random(9)
    retention_ms = int(DEDUP_RETENTION_H * 3_600_000)
    outbox_ms = int(OUTBOX_RETENTION_H * 3_600_000)
    overlap = max(1, int(PAGE * OVERLAP_SHARE))
    previous: list[Activity] = []
    for day in range(days):
        day_start = START + timedelta(days=day)
        fresh = 0
        for first in range(0, per_day, PAGE - overlap):
            page = previous[-overlap:] + [
                _activity(rng, day_start, campaigns, contacts)
                for _ in range(min(PAGE - overlap, per_day - first))
            ]
            committed_ms = to_millis(day_start) + (first * _DAY_MS) // per_day
            fresh += await store.commit_page(1 + rng.randrange(campaigns), page, committed_ms)
            previous = page
        end_ms = to_millis(day_start) + _DAY_MS
        while await store.fanout(10_000, end_ms):
            pass
        pruned = await store.prune_dedup(end_ms - retention_ms)
        await store.prune_deliveries(end_ms - outbox_ms)
        await store.prune_outbox(end_ms - outbox_ms, [])
        result.days.append(
            DayRow(
                day=day + 1,
                dedup_keys=await store.dedup_count(),
                dedup_bytes=table_bytes(path, "dedup"),
                outbox_bytes=table_bytes(path, "outbox"),
                file_bytes=_file_bytes(path),
                outbox_rows=outbox_rows(path),
                fresh=fresh,
                pruned=pruned,
            )
        )
    result.dedup_bound = int((DEDUP_RETENTION_H / 24 + 1) * per_day)


async def run(
    directory: Path,
    campaigns: int = 10_000,
    contacts: int = 100_000,
    passes: int = 3000,
    days: int = 30,
    per_day: int = 20_000,
) -> ScaleResult:
    """The whole scale run against a fresh SQLite file in ``directory``."""
    path = directory / "state.db"
    store = open_store(f"sqlite:///{path}")
    await store.open()
    settings = ScheduleSettings()
    result = ScaleResult(streams=campaigns + contacts)
    try:
        result.memory.append(("store opened", memory()))
        started = time.perf_counter()
        result.registered = await register(store, campaigns, contacts)
        result.register_s = time.perf_counter() - started
        result.memory.append((f"{campaigns + contacts} streams registered", memory()))
        planner = Planner(settings)
        started = time.perf_counter()
        await reload_scheduler(store, planner, settings)
        result.reload_s = time.perf_counter() - started
        result.memory.append(("scheduler state loaded", memory()))
        await run_passes(store, planner, settings, passes, result)
        result.memory.append((f"{len(result.cycle_ms)} passes", memory()))
        await dedup_run(store, path, campaigns, contacts, days, per_day, result)
        result.memory.append((f"{days}-day dedup run", memory()))
    finally:
        await store.close()
    return result


def last_week_slope(values: list[float]) -> float:
    """Least-squares slope per day over the last seven values (0 with fewer than two)."""
    tail = values[-7:]
    if len(tail) < 2:
        return 0.0
    return statistics.linear_regression(range(len(tail)), tail).slope


def plateaus(values: list[float]) -> bool:
    """Whether the last week's slope is within PLATEAU_SLOPE of the maximum, per day."""
    return last_week_slope(values) <= PLATEAU_SLOPE * max(values, default=0.0)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)] if ordered else 0.0


def _verdict(ok: bool) -> str:
    return "meets" if ok else "MISSES"


def report(result: ScaleResult) -> list[str]:
    """Memory, latency and dedup tables with their verdicts."""
    mb = 1024 * 1024
    lines = [
        f"  registered {result.registered} streams in {result.register_s:.1f} s,"
        f" scheduler reload {result.reload_s:.2f} s",
        "  memory (MB)                           RSS      peak",
    ]
    lines += [f"    {label:32}{m.rss_mb:8.1f}{m.peak_mb:10.1f}" for label, m in result.memory]
    peak = max((m.peak_mb for _, m in result.memory), default=0.0)
    lines.append(f"  peak RSS {peak:.1f} MB  ({_verdict(peak < TARGET_RSS_MB)} target < 300 MB)")
    p99 = _percentile(result.cycle_ms, 0.99)
    lines += [
        f"  decision cycle at {result.streams} streams, {len(result.cycle_ms)} cycles (ms):"
        f" p50 {_percentile(result.cycle_ms, 0.5):.2f}  p99 {p99:.2f}"
        f"  max {max(result.cycle_ms, default=0.0):.2f}",
        f"    due_streams p50 {_percentile(result.due_ms, 0.5):.2f} p99"
        f" {_percentile(result.due_ms, 0.99):.2f}; finish_pass p50"
        f" {_percentile(result.finish_ms, 0.5):.2f} p99 {_percentile(result.finish_ms, 0.99):.2f}",
        f"  decision p99 {p99:.2f} ms  ({_verdict(p99 < TARGET_P99_MS)} target < 50 ms)",
        "  day  dedup keys  dedup MB  outbox MB   file MB  outbox rows    fresh   pruned",
    ]
    lines += [
        f"  {d.day:3} {d.dedup_keys:11} {d.dedup_bytes / mb:9.1f} {d.outbox_bytes / mb:10.1f}"
        f" {d.file_bytes / mb:9.1f} {d.outbox_rows:12} {d.fresh:8} {d.pruned:8}"
        for d in result.days
    ]
    series = (
        ("dedup keys", [float(d.dedup_keys) for d in result.days], 1.0, ""),
        ("dedup table", [float(d.dedup_bytes) for d in result.days], mb, " MB"),
        ("database file", [float(d.file_bytes) for d in result.days], mb, " MB"),
    )
    for label, values, unit, suffix in series:
        top, slope = max(values, default=0.0), last_week_slope(values)
        lines.append(
            f"  {label:14} max {top / unit:,.1f}{suffix}, last-week slope"
            f" {slope / unit:+,.1f}{suffix}/day  ({_verdict(plateaus(values))} target: plateau)"
        )
    outbox_slope = last_week_slope([float(d.outbox_bytes) for d in result.days])
    lines.append(
        f"  of which outbox {outbox_slope / mb:+,.1f} MB/day (published events leave after"
        f" {OUTBOX_RETENTION_H:g} h)"
    )
    last = result.days[-1].dedup_keys if result.days else 0
    lines.append(
        f"  dedup keys after the last prune {last}"
        f" (bound: retention + 1 day of activity = {result.dedup_bound})"
    )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--campaigns", type=int, default=10_000)
    parser.add_argument("--contacts", type=int, default=100_000)
    parser.add_argument("--passes", type=int, default=3000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--per-day", type=int, default=20_000)
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ctct-scale-") as tmp:
        result = asyncio.run(
            run(Path(tmp), args.campaigns, args.contacts, args.passes, args.days, args.per_day)
        )
    print(
        f"scale: {args.campaigns} campaign + {args.contacts} contact streams, SQLite"
        f" {sqlite3.sqlite_version}, {os.cpu_count()} cores, Python {sys.version.split()[0]}"
    )
    for line in report(result):
        print(line)
    print(f"  (total {time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
