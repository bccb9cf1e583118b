"""bench/throughput.py's core on a tiny workload against a real broker and simulator process."""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from bench import throughput
from relay.devkafka import DevKafka, ensure_kafka
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


async def test_rounds_append_to_the_same_topics_of_each_side(tmp_path: Path) -> None:
    """(a), (b) and (b') each write to one set of topics in every round, not to fresh ones per
    round: a fresh partition's first write costs the broker page-cache set-up inside the clock
    of whichever side writes it (see ``prime_indexes``). Each round still delivers exactly the
    round's events (counted from the growth of the end offsets), and the report shows every
    round's rates."""
    with throughput.simulator(contacts=60, campaigns=1) as base:
        async with throughput.kafka(tmp_path / "kafka") as bootstrap:
            before = await _topics(bootstrap)
            results = await throughput.measure(base, bootstrap, rounds=2, state_dir=tmp_path)
            created = await _topics(bootstrap) - before
    assert len(created) == 3 * len(Kind)  # (a), (b) and (b'), whatever the number of rounds
    assert len({topic.split(".", 1)[0] for topic in created}) == 3
    for done in results.rounds:
        assert done.delivered == done.produced == done.per_record == results.world.activities
    lines = throughput.report(results, contacts=60, bootstrap=bootstrap)
    assert [line.split(":")[0] for line in lines if line.startswith("  round ")] == [
        "  round 1",
        "  round 2",
    ]


async def test_created_topics_have_their_first_index_entries(tmp_path: Path) -> None:
    """Before any clock, every partition of the bench's topics holds its first offset-index and
    time-index entry: the broker's first index write (a fault on its preallocated,
    memory-mapped index files, zero-filled around by the kernel's readahead) is off the
    clocks, whichever side's batches would have triggered it."""
    dist = await asyncio.to_thread(ensure_kafka)
    async with DevKafka(dist, tmp_path / "kafka") as broker:  # its files are ours to read
        settings = throughput.topic_settings(broker.bootstrap_servers, "primed")
        await throughput.create_topics(broker.bootstrap_servers, [settings])
        dirs = [broker.data_dir / f"{t}-{p}" for t in settings.topics() for p in range(3)]
        for partition in dirs:
            # entry 0 of each index: offset 1 (relative) at the position after the first batch,
            # and a real timestamp (an index without entries reads as zeros: a sparse file)
            offset, position = struct.unpack(">ii", _head(partition, "index", 8))
            timestamp, _ = struct.unpack(">qi", _head(partition, "timeindex", 12))
            assert (offset, position > throughput.INDEX_INTERVAL_BYTES) == (1, True), partition
            assert timestamp > 0, partition
        assert len(dirs) == settings.partitions * len(Kind)


def _head(partition: Path, suffix: str, size: int) -> bytes:
    with (partition / f"{0:020d}.{suffix}").open("rb") as index:
        return index.read(size)


async def _topics(bootstrap: str) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()
