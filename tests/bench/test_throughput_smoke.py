"""bench/throughput.py's core on a tiny workload against a real broker and simulator process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench import throughput
from relay.events import Kind

pytestmark = pytest.mark.integration


async def test_throughput_rounds_move_the_same_events_exactly_once(tmp_path: Path) -> None:
    """(a) delivers exactly what it committed, (b) and (c) count the same events, rates > 0."""
    with throughput.simulator(contacts=60, campaigns=1) as base:
        # $KAFKA_BOOTSTRAP_SERVERS when set, else a private dev broker stopped on exit
        async with throughput.kafka(tmp_path / "kafka") as bootstrap:
            results = await throughput.measure(base, bootstrap, rounds=1, state_dir=tmp_path)
    assert results.world.activities > 0
    assert len(results.world.campaigns) == 1
    [done] = results.rounds
    assert done.e2e.committed == done.e2e.published == done.delivered == results.world.activities
    assert done.kinds[Kind.SEND] == 60  # one per contact
    assert done.e2e.records == []  # sent by (b) and (b'), then dropped
    assert done.produced == done.fetched == done.e2e.committed
    assert results.e2e > 0
    assert results.producer > 0
    assert results.fetch > 0
    assert results.ratio > 0
    assert results.cpu_per_10k > 0
    lines = throughput.report(results, contacts=60, bootstrap=bootstrap)
    assert lines[-1].startswith(("verdict: meets", "verdict: MISSES"))


async def test_throughput_reports_every_process_cpu_and_the_cores_needed(tmp_path: Path) -> None:
    """(a), (b) and (c) each carry the CPU of this process, the simulator's and the dev
    broker's, and the report derives the cores (a) needs at the target rate."""
    with throughput.simulator(contacts=60, campaigns=1) as base:
        async with throughput.kafka(tmp_path / "kafka") as bootstrap:
            ours = throughput.broker_pid(bootstrap)
            results = await throughput.measure(base, bootstrap, rounds=1, state_dir=tmp_path)
    assert (ours is None) == bool(os.environ.get("KAFKA_BOOTSTRAP_SERVERS"))
    [done] = results.rounds
    for side in "abc":
        cpu = done.cpu(side)
        assert cpu.bench > 0
        assert cpu.simulator is not None
        assert cpu.simulator >= 0
        assert (cpu.broker is None) == (ours is None)
        assert cpu.busy_cores is not None
        assert 0 <= cpu.busy_cores <= (os.cpu_count() or 1)
        assert cpu.total >= cpu.bench
    lines = throughput.report(results, contacts=60, bootstrap=bootstrap)
    text = "\n".join(lines)
    for label in ("(a) relay end to end:", "(b) bare producer   :", "(c) bare fetch      :"):
        assert f"    {label}" in text
    [needs] = [line for line in lines if line.startswith("  cores (a) needs at the target rate:")]
    assert needs.endswith(f"this machine has {os.cpu_count()} (os.cpu_count())")
    assert lines[-1].startswith(("verdict: meets", "verdict: MISSES"))


async def test_replica_rounds_report_each_count(postgres_server: str) -> None:
    """--replicas on a tiny workload: every count is measured (each round checks that every
    event reached Kafka) and reported with its rate and CPU."""
    lines = await throughput.run_replicas([1, 2], 1, 40, 3, server=postgres_server)
    assert lines[0].startswith("replicas: ")
    assert lines[1].startswith("  1 replica(s): ")
    assert lines[2].startswith("  2 replica(s): ")
    assert "CPU per 10k events: replicas" in lines[2]
