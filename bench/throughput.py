"""Kafka throughput: the whole relay pipeline beside a bare producer and a bare fetch loop.

Three measurements, in one run, against the same broker, alternating round by round
(a b c a b c ...) so that the noise of a shared two-core machine hits all three alike; the
medians are the result:

(a) end to end: simulator -> CtctClient -> Poller (parse, sort, dedup, one SQLite transaction
    per page-sized chunk into the outbox, synchronous=FULL as shipped) -> KafkaSink (its default
    settings: acks=all, idempotent, linger 20 ms, 2000-event outbox batches) -> broker. A fresh
    state DB per round; its own topics, the same every round (below). The clock runs from just
    before the sink task and the passes start until the sink has acknowledged every committed
    event (its cursor reaches the outbox head), so producer start-up and the sink's idle polling
    are included.
    Before the clock, (a) applies the relay's garbage-collector policy as ``run_relay`` does once
    started (``relay.heap.settle_after_startup``); it is process-wide, so (b) and (c) run with
    it too.
(b) bare producer: one AIOKafkaProducer with the sink's settings sends the records (a) put on
    Kafka: the same topic template, keys, values and CloudEvents headers, built with
    ``record_for`` from (a)'s outbox, keys hashed to partitions, before the clock starts. It
    uses the fastest path aiokafka offers, the one the sink uses too: closed per-partition
    batches through ``send_batch``. Its own topics with the same partitioning, so neither side
    appends to a log the other one filled. The clock includes producer start-up, as in (a),
    and stops when every batch is acknowledged.
(b') for reference only, not in the target: the same records through ``send()`` one by one,
    the producer's everyday API (which the sink used before; it costs ~2.5x the CPU per record).
(c) bare fetch: GET + read + orjson.loads + next_link over the same campaign feeds at limit 500,
    as ``bench/fetch.py``'s floor.

Target: (a) >= 0.6 x min(b, c): the whole pipeline keeps at least 60 % of the throughput of the
slower of its two I/O floors. Also printed: the bench process's peak RSS and its CPU seconds per
10,000 events during (a) (the relay's own: client, poller, store thread, sink). Then the physical
bound: for each of (a), (b) and (c), the CPU seconds per 10,000 events of this process, of the
simulator's process and of the dev broker's JVM (``/proc/<pid>/stat`` utime + stime, children
included, read just outside each clock), and from (a)'s total the cores it would need at the
target rate, against ``os.cpu_count()``; also the cores a pipeline costing no more than the two
floors together ((b) + (c)) would need, the least any relay can.

A warm-up round (not counted) comes first, so that connections and the broker's JIT are warm.
Every topic is created up front, so topic creation and leader election are outside all clocks;
the sink only checks that its topics exist (``create_topics: false``, the default). Each of (a),
(b) and (b') appends to the same topics in every round, as a running relay appends to the same
partitions, and every partition gets its first index entries before any clock
(``prime_indexes``): the broker's first write of a partition's index costs it ~16 MiB of
zero-filled page cache on this machine, which (a), with its smaller batches, paid inside its
clock on fresh topics and (b) did not, and which grew dearer round after round (see
``prime_indexes``). Delivery is verified after each round from the growth of the topics' end
offsets, outside the clock. Per-round rates are printed too, so a drift shows.

(a) is one function taking a store URL.

``--replicas 1,2,3`` measures something else: the pipeline as N replica *processes* sharing one
PostgreSQL database (a throwaway cluster from tests/pgkit.py with fsync on, or
``$RELAY_TEST_POSTGRES_URL`` / ``$DATABASE_URL``), each claiming campaign streams with leases
and polling them, one of them holding the Kafka sink's lease and publishing everything. Rounds
alternate between the replica counts (1 2 3 1 2 3 ...), each on a fresh database, each count
appending to its own topics; the clock runs from the start signal until the sink's cursor has
passed every committed event; per count it prints the median events/s and CPU seconds per
10,000 events (the replicas' own, and the PostgreSQL server's when it is the throwaway cluster).

    python bench/throughput.py [--rounds 3] [--contacts 4000] [--campaigns 2] [--profile]
    python bench/throughput.py --replicas 1,2,3 [--rounds 3] [--contacts 1000] [--campaigns 12]

Uses ``$KAFKA_BOOTSTRAP_SERVERS`` when set, else starts a dev broker (relay.devkafka).
SIGTERM stops the run as Ctrl-C does: the broker, the simulator, the replicas, the PostgreSQL
cluster and the temporary directories are all cleaned up (exit status 143).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import multiprocessing
import os
import resource
import signal
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.partitioner import murmur2
from aiokafka.producer.message_accumulator import BatchBuilder

from relay import logs
from relay.ctct import catalogue
from relay.ctct.catalogue import Scope
from relay.ctct.client import Credentials, CtctClient
from relay.ctct.ratelimit import Budget, RateLimiter
from relay.devkafka import DevKafka, ensure_kafka
from relay.events import Kind
from relay.heap import settle_after_startup
from relay.leases import new_replica_id, run_leased
from relay.poller import Poller, PollSettings
from relay.scheduler import ScheduleSettings
from relay.sim import Scenario, SimClock, create_app
from relay.sim.scenario import ApiKey, Audience, Campaigns, Contacts
from relay.sinks.kafka import SINK, KafkaSettings, KafkaSink, record_for
from relay.store import PostgresSettings, PostgresStore, Store, StreamKey, open_store
from relay.store.coordination import PgCoordinator

try:  # run as a script, bench/ is on the path
    from fetch import KEY, TOKEN, bare_loop  # type: ignore[import-not-found,no-redef]
except ImportError:  # imported as bench.throughput (the tests)
    from bench.fetch import KEY, TOKEN, bare_loop

ACCOUNT = "bench"
START = datetime(2026, 11, 1, tzinfo=UTC)
TARGET = 0.6
# The sink's own defaults, with only the topic template and address varied per run.
SINK_DEFAULTS = KafkaSettings(bootstrap_servers="")
SIMULATOR = "bench-simulator"  # its process name, to find its CPU time
DONE_POLL_S = 0.005  # how often (a) checks the sink's count: 5 ms on rounds of seconds
INDEX_INTERVAL_BYTES = 4096  # the broker's index.interval.bytes, the default (prime_indexes)


def serve(port: int, contacts: int, campaigns: int) -> None:
    """The simulator process: ``campaigns`` campaigns to every contact, no limits, no faults."""
    scenario = Scenario(
        seed=3,
        start=START,
        time_scale=0,
        keys=(ApiKey(KEY, TOKEN, qps=None, daily=None),),
        contacts=Contacts(count=contacts),
        campaigns=Campaigns(
            count=campaigns, already_sent=campaigns, audience=Audience(fraction=1.0)
        ),
    )
    web.run_app(
        create_app(scenario, SimClock(START, time_scale=0)),
        host="127.0.0.1",
        port=port,
        print=None,
        access_log=None,
    )


@contextlib.contextmanager
def simulator(contacts: int, campaigns: int) -> Iterator[str]:
    """Run the simulator in a spawned process (its CPU is not ours); yields its base URL."""
    port = free_port()
    process = multiprocessing.get_context("spawn").Process(
        target=serve, args=(port, contacts, campaigns), daemon=True, name=SIMULATOR
    )
    process.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.join()


@dataclass(frozen=True, slots=True)
class World:
    """What the simulator shows once its clock has moved past all activity."""

    base: str
    campaigns: tuple[str, ...]
    activities: int  # ground truth: every visible activity

    def feed_paths(self) -> list[str]:
        """Every campaign activity feed, as the bare fetch loop reads them."""
        return [
            catalogue.feed(Scope.CAMPAIGN, kind).url_path(campaign)
            for campaign in self.campaigns
            for kind in Kind
        ]


async def open_world(session: aiohttp.ClientSession, base: str) -> World:
    """Wait for the simulator, advance its clock two weeks (all activity visible), read truth."""
    for _ in range(400):
        try:
            async with session.get(f"{base}/_sim/clock") as resp:
                if resp.status == 200:
                    break
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    else:
        raise RuntimeError(f"the simulator at {base} did not start")
    async with session.post(f"{base}/_sim/clock", json={"advance_s": 14 * 86400}) as resp:
        resp.raise_for_status()
    async with session.get(f"{base}/_sim/truth") as resp:
        truth = (await resp.json())["activities"]
    campaigns = tuple(sorted({str(a["campaign_id"]) for a in truth}))
    return World(base, campaigns, len(truth))


@dataclass(frozen=True, slots=True)
class Record:
    """One Kafka record as the sink sends it, minus the topic (that depends on the prefix)."""

    kind: Kind
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]
    partition: int  # the default partitioner's choice for the key, computed off the clock


@dataclass(frozen=True, slots=True)
class Cpu:
    """CPU seconds spent while one clock ran, by process; None: not measured (no such process
    of ours: an external broker, or no meter)."""

    bench: float  # this process: the relay in (a), the bare producer or fetch loop in (b), (c)
    simulator: float | None
    broker: float | None  # the dev broker's JVM
    busy_cores: float | None = None  # the whole machine's CPU use meanwhile, in cores

    @property
    def total(self) -> float:
        """All the measured processes together."""
        return self.bench + (self.simulator or 0.0) + (self.broker or 0.0)


class Meter:
    """Reads the CPU time of the processes one clock involves: this process
    (``time.process_time``, every thread) and the simulator's and broker's (``/proc``, utime +
    stime of the process and its children). ``start`` reads /proc before this process's time and
    ``stop`` after it, so scanning /proc is not counted as this process's work."""

    def __init__(self, simulator_pid: int | None = None, broker_pid: int | None = None) -> None:
        self._roots = (simulator_pid, broker_pid)

    def _others(self) -> list[float | None]:
        roots = [r for r in self._roots if r is not None]
        found = dict(zip(roots, trees_cpu_s(roots), strict=True))
        return [None if r is None else found[r] for r in self._roots]

    def start(self) -> tuple[float, list[float | None], tuple[int, int]]:
        machine, others = machine_ticks(), self._others()
        return time.process_time(), others, machine

    def stop(self, started: tuple[float, list[float | None], tuple[int, int]]) -> Cpu:
        bench = time.process_time() - started[0]
        after, machine = self._others(), machine_ticks()
        spent = [
            None if a is None or b is None else a - b
            for a, b in zip(after, started[1], strict=True)
        ]
        return Cpu(bench, spent[0], spent[1], busy_cores(started[2], machine))


@dataclass(frozen=True, slots=True)
class EndToEnd:
    """One (a) run: what it committed and delivered, how long it took, what it cost."""

    committed: int  # new events the passes committed to the outbox
    published: int  # events the sink counted as acknowledged
    seconds: float
    cpu: Cpu
    records: list[Record]  # the outbox as Kafka records, for (b)

    @property
    def rate(self) -> float:
        """Events per second."""
        return self.published / self.seconds

    @property
    def cpu_s(self) -> float:
        """CPU seconds of this process (the relay) during the clock."""
        return self.cpu.bench


async def end_to_end(
    session: aiohttp.ClientSession,
    world: World,
    store_url: str,
    settings: KafkaSettings,
    *,
    keep_records: bool = True,
    meter: Meter | None = None,
) -> EndToEnd:
    """Poll every campaign stream into a fresh store while the Kafka sink drains it.

    The store URL is the only backend knob: a PostgreSQL replica would pass its own.
    ``keep_records``: turn the outbox into Kafka records for (b), after the clock stopped.
    ``meter``: whose CPU to read around the clock (this process's only without one).
    """
    meter = meter or Meter()
    store = open_store(store_url)
    await store.open()
    try:
        keys = [StreamKey(ACCOUNT, Scope.CAMPAIGN.value, c) for c in world.campaigns]
        await store.ensure_streams(keys, now_ms(), seed=False)
        client = CtctClient(
            session,
            Credentials(world.base, KEY, TOKEN),
            RateLimiter(Budget(requests_per_second=1e6, requests_per_day=10**9)),
        )
        sink = KafkaSink(settings, store)
        poller = Poller(
            client, store, ACCOUNT, PollSettings(start_from="earliest"), on_commit=sink.notify
        )
        stop = asyncio.Event()
        settle_after_startup()  # as run_relay does once started: the relay as it runs
        cpu_started = meter.start()
        started = time.perf_counter()
        sink_task = asyncio.create_task(sink.run(stop), name="bench:sink")
        try:
            committed = await _poll_all(store, poller)
            while sink.published < committed:
                if sink_task.done():  # a sink that died would leave us waiting forever
                    sink_task.result()
                    raise RuntimeError("the Kafka sink stopped before publishing everything")
                await asyncio.sleep(DONE_POLL_S)
            seconds = time.perf_counter() - started
            cpu = meter.stop(cpu_started)
        finally:
            stop.set()
            await sink_task
        head, cursor = await store.outbox_head(), await store.sink_cursor(SINK)
        if cursor != head or head != committed:
            raise RuntimeError(f"outbox head {head}, sink cursor {cursor}, committed {committed}")
        records = await outbox_records(store, settings.content_mode) if keep_records else []
        return EndToEnd(committed, sink.published, seconds, cpu, records)
    finally:
        await store.close()


async def _poll_all(store: Store, poller: Poller) -> int:
    """One pass per stream, as many at once as the scheduler allows; returns events committed."""
    gate = asyncio.Semaphore(ScheduleSettings().concurrency)
    committed = 0

    async def one(stream_id: int) -> None:
        nonlocal committed
        async with gate:
            stream = await store.stream(stream_id)
            outcome = await poller.run_pass(stream)
            # The scheduler's bookkeeping after a pass (Scheduler._finished): one transaction.
            polled = now_ms()
            await store.finish_pass(stream.id, outcome.result(polled + 60_000, 0.0, polled))
            committed += outcome.new

    async with asyncio.TaskGroup() as group:
        for stream in await store.streams(ACCOUNT):
            group.create_task(one(stream.id))
    return committed


async def outbox_records(store: Store, mode: str) -> list[Record]:
    """The whole outbox as the sink turns it into Kafka records."""
    records: list[Record] = []
    cursor = 0
    while events := await store.read_outbox(cursor, 5000):
        for event in events:
            value, headers = record_for(event, mode)
            key = event.contact_id.encode()
            partition = (murmur2(key) & 0x7FFFFFFF) % SINK_DEFAULTS.partitions
            records.append(Record(event.kind, key, value, headers, partition))
        cursor = events[-1].seq
    return records


def bare_producer(settings: KafkaSettings) -> AIOKafkaProducer:
    """A producer configured exactly as ``KafkaSink._producer`` configures its own."""
    return AIOKafkaProducer(
        **settings.client_options(),
        acks="all",
        enable_idempotence=True,
        compression_type=None if settings.compression == "none" else settings.compression,
        linger_ms=settings.linger_ms,
        max_batch_size=settings.max_batch_bytes,
        max_request_size=settings.max_request_bytes,
    )


async def produce(
    settings: KafkaSettings, records: Sequence[Record], meter: Meter | None = None
) -> tuple[float, Cpu]:
    """Send every record and await every acknowledgement; returns the seconds it took and the
    CPU it cost (``meter``: whose; this process's only without one).

    The fastest way aiokafka offers, as the sink does it: records grouped per partition (keys
    hashed before the clock starts) into closed batches handed over with ``send_batch``.
    """
    topics = {kind: settings.topic_for(kind) for kind in Kind}  # looked up once: the floor
    producer = bare_producer(settings)
    meter = meter or Meter()
    cpu_started = meter.start()
    started = time.perf_counter()
    await producer.start()
    try:
        open_batches: dict[tuple[str, int], BatchBuilder] = {}
        full: list[tuple[str, int, BatchBuilder]] = []
        for r in records:
            where = (topics[r.kind], r.partition)
            batch = open_batches.get(where)
            if batch is None or not _append(batch, r):
                if batch is not None:
                    full.append((*where, batch))
                batch = open_batches[where] = producer.create_batch()
                _append(batch, r)
        full += [(*where, batch) for where, batch in open_batches.items()]
        pending = []
        for topic, partition, batch in full:
            batch.close()
            pending.append(await producer.send_batch(batch, topic, partition=partition))
        await asyncio.gather(*pending)
        seconds = time.perf_counter() - started
        return seconds, meter.stop(cpu_started)
    finally:
        await producer.stop()


def _append(batch: BatchBuilder, r: Record) -> bool:
    return batch.append(key=r.key, value=r.value, timestamp=None, headers=r.headers) is not None


async def produce_per_record(settings: KafkaSettings, records: Sequence[Record]) -> float:
    """For reference only: ``send()`` per record, the producer's everyday API."""
    topics = {kind: settings.topic_for(kind) for kind in Kind}
    producer = bare_producer(settings)
    started = time.perf_counter()
    await producer.start()
    try:
        pending = [
            await producer.send(topics[r.kind], value=r.value, key=r.key, headers=r.headers)
            for r in records
        ]
        await asyncio.gather(*pending)
        return time.perf_counter() - started
    finally:
        await producer.stop()


def topic_settings(bootstrap: str, prefix: str) -> KafkaSettings:
    """The sink's defaults, writing to ``<prefix>.ctct.email.{kind}``."""
    return KafkaSettings(bootstrap_servers=bootstrap, topic=f"{prefix}.{SINK_DEFAULTS.topic}")


async def create_topics(bootstrap: str, settings: Sequence[KafkaSettings]) -> None:
    """Create every topic of every run in one go, wait until each partition takes writes, and
    give each partition its first index entries (``prime_indexes``).

    Otherwise the first producer on a fresh topic meets NotLeaderForPartition and retries with
    backoff (over a second, measured) inside someone's clock.
    """
    wanted = {t: s.partitions for s in settings for t in s.topics()}
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="ctct-relay-bench")
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(t, n, SINK_DEFAULTS.replication_factor) for t, n in wanted.items()]
        )
        deadline = time.monotonic() + 30
        while not _described(await admin.describe_topics(list(wanted)), wanted):
            if time.monotonic() > deadline:
                raise RuntimeError("the benchmark's topics got no partition leaders within 30 s")
            await asyncio.sleep(0.1)
    finally:
        await admin.close()
    # The metadata names a leader before that broker serves the partition; a ListOffsets
    # request is answered only by the serving leader, and writes nothing.
    await end_offsets(
        bootstrap, [TopicPartition(t, p) for t, n in wanted.items() for p in range(n)]
    )
    await prime_indexes(bootstrap, wanted)


async def prime_indexes(bootstrap: str, wanted: dict[str, int]) -> None:
    """Make the broker write the first offset- and time-index entry of every partition, off
    every clock: two records per partition, in two requests, the first over
    ``index.interval.bytes``, so the second append writes the entries.

    The broker memory-maps each partition's index files, preallocated (10 MiB each, sparse),
    and the first entry faults them in; the kernel reads around the fault, zero-filling up to
    the disk's readahead (8 MiB here, ``read_ahead_kb``): ~16 MiB of page cache per partition,
    ~290 MiB for (a)'s 18 partitions (measured with perf: 81 % of the broker's CPU in a late
    (a) round went to that memset). (a), whose ~140-record batches write index entries, paid it
    inside its clock on fresh topics, while (b), one full batch per partition, wrote none; and
    as the page cache grew round by round into memory the VM had never touched, zero-filling it
    got ~7x dearer (3.8 against 0.5 ms per MiB, measured), so (a) fell from round to round.
    A relay in production appends to the same partitions for ever and meets this once per log
    segment.
    """
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, client_id="ctct-relay-bench")
    await producer.start()
    try:
        for value in (bytes(INDEX_INTERVAL_BYTES), b""):  # appended one after the other
            sent = [
                await producer.send(topic, value, partition=p)
                for topic, n in wanted.items()
                for p in range(n)
            ]
            await asyncio.gather(*sent)
    finally:
        await producer.stop()


def _described(described: list[dict[str, Any]], wanted: dict[str, int]) -> bool:
    """Whether the metadata shows every wanted topic with all its partitions and their leaders."""
    ready = {
        t["topic"]
        for t in described
        if t["error_code"] == 0
        and len(t["partitions"]) == wanted.get(t["topic"], -1)
        and all(p["error_code"] == 0 and p["leader"] >= 0 for p in t["partitions"])
    }
    return ready >= wanted.keys()


async def end_offsets(bootstrap: str, partitions: Sequence[TopicPartition]) -> int:
    """The sum of the partitions' end offsets: how many records they hold, none being deleted."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None)
    await consumer.start()
    try:
        return sum((await consumer.end_offsets(list(partitions))).values())
    finally:
        await consumer.stop()


async def on_kafka(settings: KafkaSettings) -> int:
    """How many records the topics of ``settings`` hold."""
    return await end_offsets(
        settings.bootstrap_servers,
        [TopicPartition(t, p) for t in settings.topics() for p in range(settings.partitions)],
    )


Sides = dict[str, KafkaSettings]  # "a", "b", "s" (b'): the topics each one writes to


@dataclass(frozen=True, slots=True)
class Round:
    """One a-b-c round."""

    e2e: EndToEnd
    delivered: int  # records (a)'s topics gained in the round
    produced: int  # records (b) sent, as its topics gained them
    producer_s: float
    producer_cpu: Cpu
    fetched: int
    fetch_s: float
    fetch_cpu: Cpu
    per_record: int  # records (b') sent with send() per record, as its topics gained them
    per_record_s: float
    kinds: dict[Kind, int]  # the records (b) and (b') sent, by kind (the records are not kept)

    def cpu(self, side: str) -> Cpu:
        """What (a), (b) or (c) cost while its clock ran."""
        return {"a": self.e2e.cpu, "b": self.producer_cpu, "c": self.fetch_cpu}[side]

    @property
    def per_record_rate(self) -> float:
        """(b') in events per second: not part of the target, shown for reference."""
        return self.per_record / self.per_record_s

    @property
    def producer_rate(self) -> float:
        """(b) in events per second."""
        return self.produced / self.producer_s

    @property
    def fetch_rate(self) -> float:
        """(c) in events per second."""
        return self.fetched / self.fetch_s


@dataclass(frozen=True, slots=True)
class Results:
    """Every measured round (the warm-up is not among them)."""

    world: World
    rounds: list[Round]
    profile: str | None = None  # pyinstrument's text for one extra (a), with --profile

    @property
    def e2e(self) -> float:
        """Median (a), events per second."""
        return statistics.median(r.e2e.rate for r in self.rounds)

    @property
    def producer(self) -> float:
        """Median (b), events per second."""
        return statistics.median(r.producer_rate for r in self.rounds)

    @property
    def per_record(self) -> float:
        """Median (b'), events per second."""
        return statistics.median(r.per_record_rate for r in self.rounds)

    @property
    def fetch(self) -> float:
        """Median (c), events per second."""
        return statistics.median(r.fetch_rate for r in self.rounds)

    @property
    def ratio(self) -> float:
        """(a) over the slower floor."""
        return self.e2e / min(self.producer, self.fetch)

    @property
    def cpu_per_10k(self) -> float:
        """Median CPU seconds of this process per 10,000 events during (a)."""
        return statistics.median(r.e2e.cpu_s / r.e2e.published * 10_000 for r in self.rounds)

    def cpu_10k(self, side: str) -> Cpu:
        """Median CPU seconds per 10,000 events of each process during (a), (b) or (c)
        (``side``); ``busy_cores`` is the median machine load meanwhile."""
        spent = [r.cpu(side) for r in self.rounds]
        events = [r.e2e.published for r in self.rounds]  # all three moved the same events

        def median(values: list[float | None]) -> float | None:
            known = [v for v in values if v is not None]
            return statistics.median(known) if len(known) == len(values) else None

        def per_10k(part: str) -> float | None:
            values = [getattr(c, part) for c in spent]
            return median(
                [None if v is None else v / n * 10_000 for v, n in zip(values, events, strict=True)]
            )

        return Cpu(
            statistics.median(c.bench / n * 10_000 for c, n in zip(spent, events, strict=True)),
            per_10k("simulator"),
            per_10k("broker"),
            median([c.busy_cores for c in spent]),
        )

    def total_10k(self, side: str) -> float:
        """Median over rounds of all the measured processes' CPU per 10,000 events."""
        return statistics.median(r.cpu(side).total / r.e2e.published * 10_000 for r in self.rounds)


async def one_round(
    session: aiohttp.ClientSession,
    world: World,
    state_dir: Path,
    sides: Sides,
    name: str,
    meter: Meter | None = None,
) -> Round:
    """(a), then (b) with (a)'s records, then (c); (a) on a fresh state DB, each of (a), (b)
    and (b') appending to its own topics (the same every round); what each delivered is the
    growth of its topics' end offsets."""
    meter = meter or Meter()
    before = {side: await on_kafka(settings) for side, settings in sides.items()}
    db = state_dir / f"{name}.db"
    e2e = await end_to_end(session, world, f"sqlite:///{db}", sides["a"], meter=meter)
    producer_s, producer_cpu = await produce(sides["b"], e2e.records, meter)
    per_record_s = await produce_per_record(sides["s"], e2e.records)
    cpu_started = meter.start()
    started = time.perf_counter()
    fetched = await bare_loop(session, world.base, world.feed_paths())
    fetch_s = time.perf_counter() - started
    fetch_cpu = meter.stop(cpu_started)
    done = Round(
        # Without the records: kept, every round's ~30,000 objects made each later (a) pay for
        # them in the collector's full passes (measured: 97 ms of GC in round 1's (a), 197 ms
        # in round 3's), a cost of this script, not of the relay.
        dataclasses.replace(e2e, records=[]),
        delivered=await on_kafka(sides["a"]) - before["a"],
        produced=await on_kafka(sides["b"]) - before["b"],
        producer_s=producer_s,
        producer_cpu=producer_cpu,
        fetched=fetched,
        fetch_s=fetch_s,
        fetch_cpu=fetch_cpu,
        per_record=await on_kafka(sides["s"]) - before["s"],
        per_record_s=per_record_s,
        kinds=dict(Counter(r.kind for r in e2e.records)),
    )
    # Rates compare like with like only if all three moved the same events, each exactly once.
    counts = (
        world.activities,
        e2e.committed,
        done.delivered,
        done.produced,
        done.per_record,
        done.fetched,
    )
    if len(set(counts)) != 1:
        labels = ("truth", "committed", "on (a)'s", "on (b)'s", "on (b')'s topics", "fetched")
        detail = ", ".join(f"{label} {n}" for label, n in zip(labels, counts, strict=True))
        raise RuntimeError(f"round {name}: counts differ: {detail}")
    return done


async def measure(
    base: str, bootstrap: str, rounds: int, state_dir: Path, *, profile: bool = False
) -> Results:
    """A warm-up round, then ``rounds`` measured ones, against one simulator and one broker.

    Each of (a), (b) and (b') has its own topics, the same in every round (see
    ``prime_indexes``: fresh ones per round made every round pay the broker's first-write costs
    inside (a)'s clock, more so round after round)."""
    run = uuid.uuid4().hex[:8]
    names = [f"bench{run}r{i}" for i in range(rounds + 1)]  # r0 is the warm-up
    sides: Sides = {side: topic_settings(bootstrap, f"bench{run}{side}") for side in "abs"}
    profiled = topic_settings(bootstrap, f"bench{run}p")
    topics = [*sides.values()]
    await create_topics(bootstrap, [*topics, profiled] if profile else topics)
    meter = Meter(simulator_pid(), broker_pid(bootstrap))
    async with aiohttp.ClientSession() as session:
        world = await open_world(session, base)
        done = [await one_round(session, world, state_dir, sides, n, meter) for n in names]
        text = await profile_e2e(session, world, state_dir, profiled) if profile else None
    return Results(world, done[1:], text)


async def profile_e2e(
    session: aiohttp.ClientSession, world: World, state_dir: Path, settings: KafkaSettings
) -> str:
    """One more (a) under pyinstrument, outside the results: where the event loop's time goes.

    The store's worker thread is not sampled; its share shows as the loop waiting in
    ``epoll.poll`` (for the thread, and for the GIL that thread holds in its Python parts).
    """
    from pyinstrument import Profiler  # a development tool: imported only when asked for

    profiler = Profiler(interval=0.001, async_mode="disabled")  # every task, not just one
    profiler.start()
    try:
        db = state_dir / "profiled.db"
        await end_to_end(session, world, f"sqlite:///{db}", settings, keep_records=False)
    finally:
        profiler.stop()
    return profiler.output_text(unicode=False, color=False)


@contextlib.asynccontextmanager
async def kafka(work_dir: Path) -> AsyncIterator[str]:
    """``$KAFKA_BOOTSTRAP_SERVERS``, else a dev broker in ``work_dir`` stopped on exit."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    dist = await asyncio.to_thread(ensure_kafka)  # Maven only if the jar cache is incomplete
    async with DevKafka(dist, work_dir) as broker:
        if broker.pid is not None:
            _BROKERS[broker.bootstrap_servers] = broker.pid
        try:
            yield broker.bootstrap_servers
        finally:
            _BROKERS.pop(broker.bootstrap_servers, None)


_BROKERS: dict[str, int] = {}  # bootstrap -> JVM pid of the dev brokers ``kafka`` runs


def now_ms() -> int:
    """Wall-clock Unix milliseconds."""
    return int(time.time() * 1000)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def peak_rss_mib() -> float:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def simulator_pid() -> int | None:
    """The simulator process's id (``simulator``), None when none runs."""
    return next((p.pid for p in multiprocessing.active_children() if p.name == SIMULATOR), None)


def broker_pid(bootstrap: str) -> int | None:
    """The JVM of the dev broker ``kafka`` runs at ``bootstrap``; None for an external one."""
    return _BROKERS.get(bootstrap)


def bound_lines(results: Results) -> list[str]:
    """CPU per 10,000 events of every process during (a), (b) and (c), and what (a)'s would
    take in cores at the target rate, against this machine's."""

    def seconds(value: float | None) -> str:
        return "       n/a" if value is None else f"{value:8.2f} s"

    lines = [
        "  CPU per 10k events    :  this proc  simulator     broker        all  (medians)",
    ]
    labels = {"a": "(a) relay end to end", "b": "(b) bare producer", "c": "(c) bare fetch"}
    for side, label in labels.items():
        c = results.cpu_10k(side)
        lines.append(
            f"    {label:20}: {seconds(c.bench)} {seconds(c.simulator)} {seconds(c.broker)}"
            f" {seconds(results.total_10k(side))}"
        )
    cores = os.cpu_count() or 1
    floor = min(results.producer, results.fetch)
    target = TARGET * floor
    per_event = results.total_10k("a") / 10_000
    needed = target * per_event
    reach = cores / per_event if per_event else float("inf")
    least = (results.total_10k("b") + results.total_10k("c")) / 10_000
    busy = results.cpu_10k("a").busy_cores
    lines += [
        f"  cores (a) needs at the target rate: {TARGET} x {floor:,.0f} = {target:,.0f} events/s"
        f" x {per_event * 1e6:.1f} us of CPU per event (all processes) = {needed:.1f} cores;"
        f" this machine has {cores} (os.cpu_count())",
        f"  (a) with all {cores} cores at that CPU per event: at most {reach:,.0f} events/s"
        f" (ratio {reach / floor:.2f}); costing only (b) + (c) ({least * 1e6:.1f} us per event)"
        f" it would need {target * least:.1f} cores (ratio at most"
        f" {cores / least / floor if least else float('inf'):.2f})",
    ]
    if busy is not None:
        lines.append(
            f"  machine busy during (a): {busy:.1f} of {cores} cores (median; every process)"
        )
    return lines


def round_lines(results: Results) -> list[str]:
    """Each measured round's rates and the broker's CPU during (a) and (b): a broker (or
    machine) slowing down round after round shows here, not in the medians."""

    def broker(cpu: Cpu) -> str:
        return "n/a" if cpu.broker is None else f"{cpu.broker:.2f} s"

    return [
        f"  round {i}: (a) {r.e2e.rate:7.0f}  (b) {r.producer_rate:7.0f}  (c) {r.fetch_rate:7.0f}"
        f" events/s; broker CPU (a) {broker(r.e2e.cpu)}, (b) {broker(r.producer_cpu)}"
        for i, r in enumerate(results.rounds, 1)
    ]


def report(results: Results, contacts: int, bootstrap: str) -> list[str]:
    """The printed result."""
    world, rounds = results.world, results.rounds
    floor = min(results.producer, results.fetch)
    verdict = "meets" if results.ratio >= TARGET else "MISSES"
    return [
        f"throughput: {world.activities} events per round ({len(world.campaigns)} campaigns x"
        f" {contacts} contacts), {len(rounds)} rounds + warm-up, broker {bootstrap}",
        f"  (a) relay end to end  : {results.e2e:10.0f} events/s (median)",
        f"  (b) bare producer     : {results.producer:10.0f} events/s (median)",
        f"  (b') per-record send(): {results.per_record:10.0f} events/s (median; reference only)",
        f"  (c) bare fetch        : {results.fetch:10.0f} events/s (median)",
        f"  ratio a / min(b, c)   : {results.ratio:10.2f}  (floor {floor:.0f} events/s)",
        f"  (a) CPU per 10k events: {results.cpu_per_10k:10.2f} s (this process only; the"
        " simulator and broker run in other processes and are not counted)",
        f"  peak RSS              : {peak_rss_mib():10.1f} MiB (this process)",
        *bound_lines(results),
        *round_lines(results),
        f"verdict: {verdict} target a / min(b, c) >= {TARGET}",
    ]


async def run(args: argparse.Namespace) -> list[str]:
    with (
        tempfile.TemporaryDirectory(prefix="ctct-bench-") as tmp,
        simulator(args.contacts, args.campaigns) as base,
    ):
        async with kafka(Path(tmp) / "kafka") as bootstrap:
            results = await measure(base, bootstrap, args.rounds, Path(tmp), profile=args.profile)
            lines = report(results, args.contacts, bootstrap)
            return lines if results.profile is None else [*lines, "", results.profile]


# -- several replicas on PostgreSQL (--replicas) ---------------------------------------------


def pgkit() -> ModuleType:
    """tests/pgkit.py, the throwaway cluster of the tests (this script runs from bench/)."""
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module("tests.pgkit")


@dataclass(frozen=True, slots=True)
class ReplicaRun:
    """One round of N replicas: events, seconds, CPU of the replicas and of the server."""

    replicas: int
    events: int
    seconds: float
    cpu_s: float
    server_cpu_s: float | None
    simulator_cpu_s: float
    broker_cpu_s: float  # the dev broker's JVM (0 with $KAFKA_BOOTSTRAP_SERVERS)
    passes: tuple[int, ...]  # passes each replica ran
    busy_cores: float  # the whole machine's CPU use during the round, in cores (others' too)

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def replica_process(
    db_url: str, base: str, bootstrap: str, prefix: str, signals: tuple[Any, ...], out: Any
) -> None:
    """One replica (a spawned process): wait for the start signal, claim and poll campaign
    streams until none is due, publish under the Kafka sink's lease; report its CPU at the end."""
    logs.configure("warning")
    out.put(asyncio.run(_replica(db_url, base, bootstrap, prefix, signals)))


async def _replica(
    db_url: str, base: str, bootstrap: str, prefix: str, signals: tuple[Any, ...]
) -> tuple[float, int]:
    ready, go, done = signals
    store = PostgresStore.from_url(db_url)
    await store.open()
    coordinator = PgCoordinator(store, new_replica_id(), PostgresSettings())
    try:
        async with aiohttp.ClientSession() as session:
            client = CtctClient(
                session,
                Credentials(base, KEY, TOKEN),
                RateLimiter(Budget(requests_per_second=1e6, requests_per_day=10**9)),
            )
            sink = KafkaSink(topic_settings(bootstrap, prefix), store)
            poller = Poller(
                client, store, ACCOUNT, PollSettings(start_from="earliest"), on_commit=sink.notify
            )
            stop = asyncio.Event()
            settle_after_startup()  # as run_relay does once started
            ready.set()
            await asyncio.to_thread(go.wait)
            cpu_started = time.process_time()
            leased = asyncio.create_task(run_leased("sink:kafka", coordinator, sink.run, stop))
            # commits of the other replicas wake the sink, as in the relay
            watch = asyncio.create_task(coordinator.watch_commits(sink.notify, stop))
            passes = await _poll_claimed(coordinator, store, poller)
            await asyncio.to_thread(done.wait)
            cpu_s = time.process_time() - cpu_started
            stop.set()
            await asyncio.gather(leased, watch)
            return cpu_s, passes
    finally:
        await store.close()


async def _poll_claimed(coordinator: PgCoordinator, store: Store, poller: Poller) -> int:
    """Claim due streams (as the scheduler does) and poll each once; returns passes run."""
    concurrency = ScheduleSettings().concurrency
    inflight: dict[int, asyncio.Task[None]] = {}
    passes = 0

    async def one(stream_id: int) -> None:
        stream = await store.stream(stream_id)
        lease = coordinator.lease(stream_id)  # its writes fenced by the claim, as the relay's
        outcome = await poller.run_pass(stream, lease=lease)
        polled = now_ms()
        far = polled + 86_400_000  # polled once: due again only long after the round
        await store.finish_pass(stream.id, outcome.result(far, 0.0, polled), lease=lease)
        await coordinator.release_streams([stream_id])

    while True:
        free = concurrency - len(inflight)
        claimed = (
            await coordinator.claim_streams(ACCOUNT, now_ms(), free, set(inflight)) if free else []
        )
        for stream_id in claimed:
            inflight[stream_id] = asyncio.create_task(one(stream_id))
        if not inflight:
            return passes
        finished, _ = await asyncio.wait(inflight.values(), return_when=asyncio.FIRST_COMPLETED)
        for stream_id, task in list(inflight.items()):
            if task in finished:
                task.result()
                del inflight[stream_id]
                passes += 1


async def replica_round(
    world: World, server: str, bootstrap: str, replicas: int, name: str, postmaster: int | None
) -> ReplicaRun:
    """N replica processes on a fresh database, timed from the start signal until the Kafka
    sink's cursor passed every event; checks every event reached the topics (``name``'s, the
    same in every round of this replica count: see ``prime_indexes``)."""
    kit = pgkit()
    db_url = await asyncio.to_thread(kit.fresh_database, server)
    setup = PostgresStore.from_url(db_url)
    await setup.open()  # migrations and streams before the clock
    keys = [StreamKey(ACCOUNT, Scope.CAMPAIGN.value, c) for c in world.campaigns]
    await setup.ensure_streams(keys, now_ms(), seed=False)
    settings = topic_settings(bootstrap, name)
    before = await on_kafka(settings)
    context = multiprocessing.get_context("spawn")
    go, done, out = context.Event(), context.Event(), context.Queue()
    readies = [context.Event() for _ in range(replicas)]
    processes = [
        context.Process(
            target=replica_process,
            args=(db_url, world.base, bootstrap, name, (ready, go, done), out),
            daemon=True,
        )
        for ready in readies
    ]
    for process in processes:
        process.start()
    try:
        for ready in readies:
            await asyncio.to_thread(ready.wait, 60)
        sim_pid = next(p.pid for p in multiprocessing.active_children() if p.name == SIMULATOR)
        assert sim_pid is not None
        sim_before = tree_cpu_s(sim_pid)
        broker_before = children_cpu_s("java")
        server_before = tree_cpu_s(postmaster) if postmaster else None
        machine_before = machine_ticks()
        started = time.perf_counter()
        go.set()
        # the sink runs in another process: its progress is in the database
        while await _sink_behind(setup, world.activities):  # noqa: ASYNC110
            await asyncio.sleep(DONE_POLL_S)
        seconds = time.perf_counter() - started
        machine_after = machine_ticks()
        server_after = tree_cpu_s(postmaster) if postmaster else None
        sim_after = tree_cpu_s(sim_pid)
        broker_after = children_cpu_s("java")
        done.set()
        reports = [await asyncio.to_thread(out.get, True, 60) for _ in processes]
    finally:
        done.set()
        for process in processes:
            process.join(30)
            if process.is_alive():
                process.kill()
        await setup.close()
    delivered = await on_kafka(settings) - before
    if delivered != world.activities:
        raise RuntimeError(f"{name}: {delivered} records on Kafka, {world.activities} events")
    server_s = None
    if server_before is not None and server_after is not None:
        server_s = server_after - server_before
    return ReplicaRun(
        replicas,
        world.activities,
        seconds,
        sum(cpu for cpu, _ in reports),
        server_s,
        sim_after - sim_before,
        broker_after - broker_before,
        tuple(sorted((p for _, p in reports), reverse=True)),
        busy_cores(machine_before, machine_after),
    )


def machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine so far, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    return sum(values) - idle, sum(values)


def busy_cores(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Cores' worth of CPU in use between two ``machine_ticks``."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total * (os.cpu_count() or 1) if total else 0.0


async def _sink_behind(store: PostgresStore, events: int) -> bool:
    """Whether the Kafka sink has not yet passed all ``events`` committed events."""

    async def count(conn: Any) -> int:
        return int(await conn.fetchval("SELECT COUNT(*) FROM outbox"))

    head, cursor = await store.outbox_head(), await store.sink_cursor(SINK)
    return head == 0 or cursor < head or await store.transaction(count) < events


def children_cpu_s(command: str) -> float:
    """CPU seconds of this process's children named ``command`` (the dev broker's java)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            name, rest = stat.read_text().split(" (", 1)[1].rsplit(")", 1)
            values = rest.split()
            if name == command and int(values[1]) == os.getpid():
                total += int(values[11]) + int(values[12])
        except (OSError, IndexError, ValueError):
            continue
    return total / ticks


def tree_cpu_s(root: int) -> float:
    """CPU seconds (user + system) of process ``root`` and its children (a PostgreSQL
    postmaster and its backends), from /proc: not other servers on a shared machine."""
    return trees_cpu_s([root])[0]


def trees_cpu_s(roots: Sequence[int]) -> list[float]:
    """``tree_cpu_s`` of each of ``roots``, from one scan of /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    totals = dict.fromkeys(roots, 0)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            values = stat.read_text().rsplit(")", 1)[1].split()
            pid, ppid = int(stat.parent.name), int(values[1])
            for root in {pid, ppid} & totals.keys():
                totals[root] += int(values[11]) + int(values[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            continue  # a process that ended meanwhile
    return [totals[root] / ticks for root in roots]


async def run_replicas(
    counts: list[int], rounds: int, contacts: int, campaigns: int, server: str | None = None
) -> list[str]:
    """Alternating rounds of each replica count; the printed medians. ``server``: a PostgreSQL
    server URL (else the environment's, else a throwaway cluster)."""
    kit = pgkit()
    external = server or kit.external_url()
    cluster = None if external else kit.Cluster(fsync=True).start()
    server = external or cluster.url
    run_id = uuid.uuid4().hex[:8]
    try:
        with (
            tempfile.TemporaryDirectory(prefix="ctct-bench-") as tmp,
            simulator(contacts, campaigns) as base,
        ):
            async with kafka(Path(tmp) / "kafka") as bootstrap:
                # each count its own topics, the same every round (see prime_indexes)
                names = [(n, f"bench{run_id}n{n}") for _ in range(rounds + 1) for n in counts]
                await create_topics(
                    bootstrap, [topic_settings(bootstrap, f"bench{run_id}n{n}") for n in counts]
                )
                async with aiohttp.ClientSession() as session:
                    world = await open_world(session, base)
                postmaster = None
                if cluster is not None:  # the throwaway cluster's server process
                    pid_file = cluster.data / "postmaster.pid"
                    postmaster = int(pid_file.read_text().split()[0])
                done = [
                    await replica_round(world, server, bootstrap, n, x, postmaster)
                    for n, x in names
                ]
    finally:
        if cluster is not None:
            cluster.destroy()
    measured = done[len(counts) :]  # the first round of each count is the warm-up
    return replica_report(world, measured, counts, rounds, server_cpu=cluster is not None)


def replica_report(
    world: World, runs: list[ReplicaRun], counts: list[int], rounds: int, *, server_cpu: bool
) -> list[str]:
    lines = [
        f"replicas: {world.activities} events per round ({len(world.campaigns)} campaign streams),"
        f" {rounds} rounds + warm-up per replica count, one PostgreSQL database per round",
    ]
    base_rate = None
    for n in counts:
        mine = [r for r in runs if r.replicas == n]
        rate = statistics.median(r.rate for r in mine)
        base_rate = base_rate or rate
        cpu = statistics.median(r.cpu_s / r.events * 10_000 for r in mine)
        server_s = statistics.median((r.server_cpu_s or 0) / r.events * 10_000 for r in mine)
        server = f", PostgreSQL server {server_s:.2f} s" if server_cpu else ""
        sim_s = statistics.median(r.simulator_cpu_s / r.events * 10_000 for r in mine)
        broker_s = statistics.median(r.broker_cpu_s / r.events * 10_000 for r in mine)
        server += f", simulator {sim_s:.2f} s, Kafka broker {broker_s:.2f} s"
        passes = "/".join(str(p) for p in mine[-1].passes)
        busy = statistics.median(r.busy_cores for r in mine)
        lines.append(
            f"  {n} replica(s): {rate:8.0f} events/s ({rate / base_rate:.2f}x),"
            f" CPU per 10k events: replicas {cpu:.2f} s{server}; passes per replica {passes};"
            f" machine busy {busy:.1f} of {os.cpu_count()} cores"
        )
    return lines


async def cancelled_on_sigterm(work: Coroutine[Any, Any, list[str]]) -> list[str]:
    """``work``, cancelled by SIGTERM as ``asyncio.run`` cancels it on Ctrl-C: every ``finally``
    of the bench runs, so the broker, the simulator, the replicas, the PostgreSQL cluster and
    the temporary directories go with it (SIGTERM's default action would leave them running)."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await work
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--contacts", type=int, default=4000)
    parser.add_argument("--campaigns", type=int, default=2)
    # --replicas divides streams between processes: it needs several campaigns to divide
    parser.add_argument(
        "--profile", action="store_true", help="profile one extra (a) run with pyinstrument"
    )
    parser.add_argument(
        "--replicas",
        help="comma-separated replica counts (e.g. 1,2,3): the pipeline as that many processes"
        " on one PostgreSQL database instead of (a) / (b) / (c)",
    )
    args = parser.parse_args()
    logs.configure("warning")  # as in production: debug lines are filtered, not rendered
    if args.replicas:
        counts = [int(n) for n in args.replicas.split(",")]
        work = run_replicas(counts, args.rounds, args.contacts, args.campaigns)
    else:
        work = run(args)
    try:
        lines = asyncio.run(cancelled_on_sigterm(work))
    except asyncio.CancelledError:
        print("stopped by SIGTERM", file=sys.stderr)
        return 128 + signal.SIGTERM
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
