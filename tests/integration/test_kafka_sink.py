"""The relay publishing to a real Apache Kafka broker: exactly the truth, headers, keys, order,
broker outages, SIGKILLs and records the broker refuses."""

from __future__ import annotations

import asyncio
import random
import re
import sqlite3
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import aiohttp
import orjson
import pytest
import yaml
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from structlog.testing import capture_logs

from relay.events import Activity, Kind, from_millis
from relay.metrics import Metrics
from relay.sinks.kafka import KafkaSettings, KafkaSink, KafkaSinkError
from relay.store import OutboxEvent, Store, StreamKey, open_store
from tests.integration.conftest import DevKafkaFactory
from tests.integration.kafkakit import BootstrapProxy, Running, until
from tests.procs import (
    Identity,
    Proc,
    SimProcess,
    data_identity,
    free_port,
    outbox,
    relay_config,
    sim_scenario,
    wait_until,
)

pytestmark = pytest.mark.integration

KEY, TOKEN = "k-kafka-1", "t-kafka-1"


def scenario() -> dict[str, object]:
    return sim_scenario(
        KEY,
        TOKEN,
        seed=33,
        contacts={"count": 50},
        campaigns={"count": 5, "already_sent": 2, "sent_every_s": 600, "audience": 1.0},
        rates={"late": 0.1, "late_mean_s": 60, "send_batch": 25, "open_delay_s": 400},
    )


def kafka_config(tmp: Path, sim: SimProcess, bootstrap: str, prefix: str) -> Path:
    return relay_config(
        tmp,
        sim,
        api_key=KEY,
        token=TOKEN,
        kafka={
            "bootstrap_servers": bootstrap,
            "topic": prefix + ".ctct.email.{kind}",
            "create_topics": True,
            "partitions": 3,
            "request_timeout_s": 10,
        },
    )


Message = tuple[str, bytes, dict[str, bytes], bytes, int, int]  # topic, key, headers, value, p, off


async def consume_all(
    bootstrap: str, topics: list[str], idle_s: float | None = None
) -> list[Message]:
    """Everything on the topics, from the beginning. Without ``idle_s``: up to the end offsets
    the topics have when called, for callers whose publishers have all stopped (nothing more
    can arrive, so waiting for silence would only cost time). With ``idle_s``: until nothing new
    arrives for idle_s, for callers whose publisher may still be sending."""
    if idle_s is not None:
        return await _consume_until_idle(bootstrap, topics, idle_s)
    partitions = await _partitions(bootstrap, topics)
    consumer = _reader(bootstrap)
    await consumer.start()
    messages: list[Message] = []
    try:
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        deadline = asyncio.get_running_loop().time() + 60
        while behind := [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"not read to their end offsets within 60 s: {behind}")
            batch = await consumer.getmany(timeout_ms=1000, max_records=5000)
            _collect(messages, batch)
        return messages
    finally:
        await consumer.stop()


async def _partitions(bootstrap: str, topics: list[str]) -> list[TopicPartition]:
    """The partitions of those of ``topics`` that exist."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics(topics)
    finally:
        await admin.close()
    return [
        TopicPartition(t["topic"], p["partition"])
        for t in described
        if t["error_code"] == 0
        for p in t["partitions"]
    ]


def _reader(bootstrap: str, *topics: str) -> AIOKafkaConsumer:
    """A consumer of no group, from the earliest offsets, committing nothing."""
    return AIOKafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )


async def _consume_until_idle(bootstrap: str, topics: list[str], idle_s: float) -> list[Message]:
    consumer = _reader(bootstrap, *topics)
    await consumer.start()
    messages: list[Message] = []
    try:
        while True:
            batch = await consumer.getmany(timeout_ms=int(idle_s * 1000), max_records=5000)
            if not batch:
                return messages
            _collect(messages, batch)
    finally:
        await consumer.stop()


def _collect(messages: list[Message], batch: dict[TopicPartition, list[ConsumerRecord]]) -> None:
    for records in batch.values():
        for r in records:
            headers = {k: v for k, v in r.headers}
            messages.append((r.topic, r.key, headers, r.value, r.partition, r.offset))


def identities(messages: list[Message]) -> Counter[Identity]:
    return Counter(data_identity(m[0].rsplit(".", 1)[1], m[3]) for m in messages)


def topics_of(prefix: str) -> list[str]:
    return [f"{prefix}.ctct.email.{k.value}" for k in Kind]


ADMIN_TOKEN = "admin-token-kafka-test"


async def kafka_health(admin_port: int) -> tuple[object, object, float | None]:
    """The kafka entry's connected and last_error in /v1/status, and the
    ctct_relay_kafka_connected gauge in /metrics."""
    base = f"http://127.0.0.1:{admin_port}"
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/v1/status", headers=headers) as resp:
            assert resp.status == 200
            status = await resp.json()
        async with session.get(f"{base}/metrics", headers=headers) as resp:
            scraped = await resp.text()
    [entry] = [s for s in status["sinks"] if s["name"] == "kafka"]
    gauges = [
        line.split()[1]
        for line in scraped.splitlines()
        if line.startswith("ctct_relay_kafka_connected ")
    ]
    return entry["connected"], entry["last_error"], float(gauges[0]) if gauges else None


def outbox_head(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT COALESCE(MAX(seq), 0) FROM outbox").fetchone()[0])


def kafka_cursor(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT seq FROM sink_cursors WHERE sink = 'kafka'").fetchone()
    return 0 if row is None else int(row[0])


def settle_kafka(sim: SimProcess, db: Path, relay: Proc, bootstrap: str, prefix: str) -> None:
    """Stop new activity and wait until the outbox matches truth and the sink caught up."""
    sim.advance(3600)
    truth = sim.truth()
    wait_until(lambda: db.exists() and outbox(db) == truth, 120, "outbox == truth")

    def caught_up() -> bool:
        with sqlite3.connect(db) as conn:
            head = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM outbox").fetchone()[0]
            row = conn.execute("SELECT seq FROM sink_cursors WHERE sink = 'kafka'").fetchone()
        return row is not None and row[0] == head

    wait_until(
        caught_up, 120, f"the Kafka cursor to reach the outbox head\n{relay.output()[-2000:]}"
    )


async def test_every_activity_reaches_kafka_once_with_cloudevents_headers(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    """End to end: exactly the ground truth on the topics, binary-mode headers, key, order."""
    prefix = f"e2e{uuid.uuid4().hex[:8]}"
    sim = SimProcess(tmp_path, scenario()).start()
    relay = Proc(
        ["run", "--config", str(kafka_config(tmp_path, sim, kafka_bootstrap, prefix))],
        tmp_path / "relay.log",
    ).start()
    db = tmp_path / "state.db"
    try:
        for _ in range(8):
            sim.advance(300)
            await asyncio.sleep(0.7)
        await asyncio.to_thread(settle_kafka, sim, db, relay, kafka_bootstrap, prefix)
        truth = sim.truth()
        assert relay.stop() == 0
    finally:
        relay.kill()
        sim.kill()
    messages = await consume_all(kafka_bootstrap, topics_of(prefix))
    assert identities(messages) == truth
    for topic, key, headers, value, _p, _o in messages:
        data = orjson.loads(value)
        kind = topic.rsplit(".", 1)[1]
        assert headers["ce_specversion"] == b"1.0"
        assert headers["ce_type"] == f"com.constantcontact.email.{kind}".encode()
        assert headers["ce_subject"] == key == data["contact_id"].encode()
        assert headers["ce_source"] == f"ctct://acme/campaigns/{data['campaign_id']}".encode()
        assert headers["content-type"] == b"application/json"
        assert uuid.UUID(headers["ce_id"].decode())
        assert headers["ce_time"].decode() == data["occurred_at"]
    assert_partition_order_is_outbox_order(messages, db)


def assert_partition_order_is_outbox_order(messages: list[Message], db: Path) -> None:
    """Per topic and contact, records sit in the order the outbox committed them."""
    with sqlite3.connect(db) as conn:
        seq_of = {eid: seq for eid, seq in conn.execute("SELECT event_id, seq FROM outbox")}
    by_contact: dict[tuple[str, bytes], list[tuple[int, int, int]]] = defaultdict(list)
    for topic, key, headers, _v, partition, offset in messages:
        by_contact[(topic, key)].append((partition, offset, seq_of[headers["ce_id"].decode()]))
    for records in by_contact.values():
        assert len({p for p, _, _ in records}) == 1, "one contact, one partition"
        seqs = [seq for _, _, seq in sorted(records)]
        assert seqs == sorted(seqs)


async def test_broker_outage_loses_nothing(
    tmp_path: Path, dev_kafka_factory: DevKafkaFactory
) -> None:
    """The broker is killed mid-run and returns later: polling goes on, publishing resumes;
    /v1/status and /metrics say when the broker is unreachable, and the error goes once the
    broker acknowledges again."""
    broker = await dev_kafka_factory()
    prefix = f"out{uuid.uuid4().hex[:8]}"
    sim = SimProcess(tmp_path, scenario()).start()
    admin_port = free_port()
    config = kafka_config(tmp_path, sim, broker.bootstrap_servers, prefix)
    settings = yaml.safe_load(config.read_text())
    settings["admin"] = {"port": admin_port, "token": ADMIN_TOKEN}
    config.write_text(yaml.safe_dump(settings))
    relay = Proc(["run", "--config", str(config)], tmp_path / "relay.log").start()
    db = tmp_path / "state.db"
    try:
        for _ in range(3):
            sim.advance(300)
            await asyncio.sleep(1.0)
        up = await kafka_health(admin_port)
        assert up == (True, None, 1.0), "connected, no error, gauge 1"
        await broker.kill()
        for _ in range(60):  # reported within request_timeout_s (10 s): no ack, or no metadata
            down = await kafka_health(admin_port)
            if down[0] is False and down[1]:
                break
            sim.advance(60)
            await asyncio.sleep(0.5)
        assert down[0] is False, "status says the broker is unreachable"
        assert down[1], "with the error"
        assert down[2] == 0.0, "ctct_relay_kafka_connected 0"
        committed_while_down = len(outbox(db))
        for _ in range(4):
            sim.advance(300)
            await asyncio.sleep(1.5)
        assert len(outbox(db)) > committed_while_down, "polling went on while Kafka was down"
        assert kafka_cursor(db) < outbox_head(db), "events waited in the outbox"
        await broker.restart()
        await asyncio.to_thread(settle_kafka, sim, db, relay, broker.bootstrap_servers, prefix)
        truth = sim.truth()
        assert relay.alive()
        assert await kafka_health(admin_port) == (True, None, 1.0), "the error went with an ack"
    finally:
        relay.kill()
        sim.kill()
    messages = await consume_all(broker.bootstrap_servers, topics_of(prefix))
    got = identities(messages)
    assert set(got) == set(truth)


async def test_sigkill_while_publishing_duplicates_only_with_the_same_id(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    """Killed ten times while publishing: nothing lost; duplicates repeat their ce_id."""
    prefix = f"crash{uuid.uuid4().hex[:8]}"
    sim = SimProcess(tmp_path, scenario()).start()
    config = kafka_config(tmp_path, sim, kafka_bootstrap, prefix)
    relay = Proc(["run", "--config", str(config)], tmp_path / "relay.log").start()
    db = tmp_path / "state.db"
    rng = random.Random(77)
    try:
        for _ in range(10):
            sim.advance(300)
            await asyncio.sleep(rng.uniform(0.5, 2.0))
            relay.kill()
            relay.start()
        await asyncio.to_thread(settle_kafka, sim, db, relay, kafka_bootstrap, prefix)
        truth = sim.truth()
    finally:
        relay.kill()
        sim.kill()
    messages = await consume_all(kafka_bootstrap, topics_of(prefix))
    got = identities(messages)
    assert set(got) == set(truth), "nothing lost, nothing invented"
    ids_per_identity: dict[Identity, set[bytes]] = defaultdict(set)
    for m in messages:
        ids_per_identity[data_identity(m[0].rsplit(".", 1)[1], m[3])].add(m[2]["ce_id"])
    assert all(len(ids) == 1 for ids in ids_per_identity.values())
    duplicates = sum(got.values()) - len(got)
    print(f"\nkafka crash test: {len(got)} events, {duplicates} duplicates after 10 SIGKILLs")


def bounces(count: int, contacts: int = 50) -> list[Activity]:
    return [bounce(i, contacts) for i in range(count)]


def bounce(i: int, contacts: int = 50, message: str = "") -> Activity:
    return Activity(
        account="acme",
        kind=Kind.BOUNCE,
        campaign_id="1",
        contact_id=str(1000 + i % contacts),
        email_address=f"c{i}@example.com",
        occurred_at=from_millis(1_763_000_000_000 + i),
        bounce_code="B",
        bounce_message=message,
    )


async def set_topic_limit(
    admin: AIOKafkaAdminClient, topics: list[str], limit: int, name: str = "max.message.bytes"
) -> None:
    """Set the topics' configuration ``name`` (a size limit); returns once the broker applies
    it."""
    resources = [ConfigResource(ConfigResourceType.TOPIC, t, {name: str(limit)}) for t in topics]
    await admin.alter_configs(resources)
    for _ in range(100):
        [answer] = await admin.describe_configs(resources)
        if all(dict((e[0], e[1]) for e in r[4])[name] == str(limit) for r in answer.resources):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} of {topics} still not {limit}")


LIMIT = "max.message.bytes"


async def publish(
    sink: KafkaSink, store: Store, page: list[Activity], before: Callable[[], Awaitable[None]]
) -> None:
    """Run the sink; once it is connected run ``before``, commit ``page`` and wait until the
    sink's cursor reaches the outbox head."""
    await store.ensure_streams([StreamKey("acme", "campaign", "1")], 0)
    [stream] = await store.streams()
    stop = asyncio.Event()
    task = asyncio.create_task(sink.run(stop))
    try:
        for _ in range(600):
            if sink.connected or task.done():
                break
            await asyncio.sleep(0.05)
        assert sink.connected, "the sink connects"
        await before()
        await store.commit_page(stream.id, page, 0)
        sink.notify()
        head = await store.outbox_head()
        for _ in range(600):
            if await store.sink_cursor("kafka") == head or task.done():
                break
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await task
    assert await store.sink_cursor("kafka") == head


def assert_once_in_order(
    messages: list[Message], outbox: list[OutboxEvent], left: set[int]
) -> None:
    """Every outbox event but the indexes in ``left`` exactly once; per contact, outbox order."""
    wanted = {e.event_id for i, e in enumerate(outbox) if i not in left}
    got = Counter(m[2]["ce_id"].decode() for m in messages)
    assert set(got) == wanted
    repeated = sum(n - 1 for n in got.values())
    assert repeated == 0, f"{repeated} records sent more than once"
    seq_of = {e.event_id: e.seq for e in outbox}
    by_key: dict[bytes, list[tuple[int, int]]] = defaultdict(list)
    for _t, key, headers, _v, _partition, offset in messages:
        by_key[key].append((offset, seq_of[headers["ce_id"].decode()]))
    for records in by_key.values():
        seqs = [seq for _, seq in sorted(records)]
        assert seqs == sorted(seqs), "per contact, Kafka order is outbox order"


@pytest.mark.parametrize(
    ("max_batch_bytes", "lowered"),
    [
        # the topics' limit is lowered after the sink read it: the batch with the culprit is
        # refused whole, and so is every other batch above the new limit
        pytest.param(1_048_576, True, id="whole-batch-refused"),
        # the limit is read at start-up: the culprit is dead-lettered before it is sent, with
        # rounds in flight (it was sent, refused, and its producer replaced)
        pytest.param(32_768, False, id="record-above-known-limit-never-sent"),
    ],
)
async def test_records_refused_for_good_are_dead_lettered_and_the_rest_keep_order(
    tmp_path: Path, kafka_bootstrap: str, max_batch_bytes: int, lowered: bool
) -> None:
    """One event too large for the request, one too large for the topic: both dead-lettered
    with the reason, every other event published exactly once, in outbox order, nothing
    blocked: the refusal breaks neither its partition's order nor the idempotent producer's
    sequence numbers, and nothing acknowledged is sent again. A record above a topic limit the
    sink read at start-up is never sent: its reason names its size and the limit."""
    prefix = f"dlq{uuid.uuid4().hex[:8]}"
    settings = KafkaSettings(
        bootstrap_servers=kafka_bootstrap,
        topic=prefix + ".ctct.email.{kind}",
        max_request_bytes=300_000,
        max_batch_bytes=max_batch_bytes,
        batch_events=500,  # rounds in flight on every partition when the broker refuses
        request_timeout_s=10,
    )
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await store.open()
    try:  # the broker refuses records above 64 KiB on these topics
        configs = {} if lowered else {LIMIT: "65536"}
        await admin.create_topics(
            [NewTopic(t, 3, 1, topic_configs=configs) for t in settings.topics()]
        )

        async def lower() -> None:
            if lowered:
                await set_topic_limit(admin, settings.topics(), 65536)

        page = bounces(2000)
        page[40] = bounce(40, message="x" * 400_000)  # above max_request_bytes: never sent
        page[80] = bounce(80, message="y" * 100_000)  # fits a request, not the topic: refused
        metrics = Metrics(lambda: 0)
        sink = KafkaSink(settings, store, metrics=metrics)
        with capture_logs() as logs:
            await publish(sink, store, page, lower)
        events = [entry["event"] for entry in logs]
        assert ("kafka.batch_refused" in events) is lowered, "the case this test is about"
        # a refusal by the broker replaces the producer; one known before sending does not
        assert ("kafka.producer_replaced" in events) is lowered
        letters = await store.dead_letters("kafka")
        outbox = await store.read_outbox(0, 5000)
        assert [d.seq for d in letters] == [outbox[40].seq, outbox[80].seq]
        assert re.fullmatch(
            r"MessageSizeTooLargeError: \[Error 10\] MessageSizeTooLargeError: 4\d{5} bytes"
            r" > kafka.max_request_bytes 300000",
            letters[0].reason,
        )
        if lowered:  # the broker's refusal, with the size the broker does not give
            assert re.fullmatch(
                r"MessageSizeTooLargeError: \[Error 10\] MessageSizeTooLargeError: 1\d{5} bytes"
                rf" as a record batch of its own, refused by the broker for topic {prefix}"
                r"\.ctct\.email\.bounce",
                letters[1].reason,
            )
        else:  # the broker's error, with the size and the limit
            assert re.fullmatch(
                r"MessageSizeTooLargeError: \[Error 10\] MessageSizeTooLargeError: 1\d{5} bytes"
                rf" as a record batch > max.message.bytes 65536 of topic {prefix}"
                r"\.ctct\.email\.bounce",
                letters[1].reason,
            )
        assert sink.dead_lettered == 2
        # dead letters are not published: neither in the sink's count nor in the metrics
        assert sink.published == 1998
        value = metrics.registry.get_sample_value
        assert value("ctct_relay_events_published_total", {"sink": "kafka"}) == 1998
        assert value("ctct_relay_dead_letters_total", {"sink": "kafka"}) == 2
    finally:
        await store.close()
        await admin.close()
    messages = await consume_all(kafka_bootstrap, settings.topics())
    assert_once_in_order(messages, outbox, {40, 80})


async def test_a_fresh_producer_that_cannot_start_does_not_hang_the_sink(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    """A batch refused for good needs a fresh producer, and the bootstrap address does not
    answer it (the broker itself still does): rounds ahead keep going on the producer they
    were going on, the sink gives the fresh one up within twice request_timeout_s, backs off,
    and publishes everything once the address answers again. (The sink handed later rounds to
    the fresh producer before it had started, and when its start failed they waited for its
    metadata for ever: publishing stopped for good, the broker back or not.)"""
    prefix = f"fresh{uuid.uuid4().hex[:8]}"
    proxy = BootstrapProxy(kafka_bootstrap)
    await proxy.start()
    settings = KafkaSettings(
        bootstrap_servers=proxy.address,
        topic=prefix + ".{kind}",
        batch_events=200,  # rounds ahead wait for the refused one
        request_timeout_s=3,
        retry_backoff_max_s=1,
    )
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await store.open()
    try:
        await admin.create_topics([NewTopic(t, 3, 1) for t in settings.topics()])
        page = bounces(3000)
        page[40] = bounce(40, message="y" * 100_000)
        with capture_logs() as logs:
            run = Running(KafkaSink(settings, store), store)

            async def connected() -> bool:
                return run.sink.connected

            await until(connected, 60, "the sink connects")
            proxy.hold()  # from now on no bootstrap succeeds
            await set_topic_limit(admin, settings.topics(), 65536)  # the sink does not know
            await run.commit(page)
            await asyncio.sleep(3 * settings.request_timeout_s)
            proxy.hold(False)
            await run.caught_up(60)
            await run.stop(60)
        letters = await store.dead_letters("kafka")
        outbox = await store.read_outbox(0, 5000)
    finally:
        await store.close()
        await admin.close()
        await proxy.close()
    assert [d.seq for d in letters] == [outbox[40].seq]
    failures = [e["error"] for e in logs if e["event"] == "kafka.unavailable"]
    assert any("a fresh producer" in f for f in failures), failures  # the case of this test
    messages = await consume_all(kafka_bootstrap, settings.topics())
    got = {m[2]["ce_id"].decode() for m in messages}  # a restart may send some twice
    assert got == {e.event_id for i, e in enumerate(outbox) if i != 40}


async def test_a_stop_while_rounds_wait_for_their_partition_is_no_failure(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    """Stopped while rounds wait for their partition's previous batch (one partition, small
    rounds): the sink stops without reporting a failure, and what was acknowledged is behind
    its cursor. (The rounds not sent because of the stop failed like an outage: every stop
    under load logged ``kafka.unavailable`` "stopping: not sent" and left that as the sink's
    last error.)"""
    prefix = f"stop{uuid.uuid4().hex[:8]}"
    settings = KafkaSettings(
        bootstrap_servers=kafka_bootstrap,
        topic=prefix + ".{kind}",
        batch_events=20,
        create_topics=True,
        partitions=1,
        request_timeout_s=10,
    )
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await store.open()
    try:
        with capture_logs() as logs:
            run = Running(KafkaSink(settings, store), store)
            head = await run.commit(bounces(20_000))

            async def publishing() -> bool:
                return await store.sink_cursor("kafka") > 0

            await until(publishing, 60, "the sink publishes")
            await run.stop(60)
        cursor = await store.sink_cursor("kafka")
    finally:
        await store.close()
    assert 0 < cursor < head, "stopped while publishing"
    assert [e for e in logs if e["log_level"] in {"warning", "error"}] == []
    assert run.sink.last_error is None
    messages = await consume_all(kafka_bootstrap, settings.topics())
    assert len({m[2]["ce_id"] for m in messages}) >= cursor


async def test_batches_stay_within_the_topics_max_message_bytes(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    """A topic limit below kafka.max_batch_bytes (the default 1 MiB here) caps that topic's
    record batches: the broker refuses none, so nothing is sent one by one or twice."""
    prefix = f"cap{uuid.uuid4().hex[:8]}"
    settings = KafkaSettings(
        bootstrap_servers=kafka_bootstrap, topic=prefix + ".{kind}", request_timeout_s=10
    )
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(t, 3, 1, topic_configs={LIMIT: "16384"}) for t in settings.topics()]
        )
    finally:
        await admin.close()
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await store.open()
    try:
        sink = KafkaSink(settings, store, metrics=Metrics(lambda: 0))

        async def nothing() -> None:
            pass

        with capture_logs() as logs:
            await publish(sink, store, bounces(3000), nothing)
        outbox = await store.read_outbox(0, 5000)
        assert await store.dead_letters("kafka") == []
    finally:
        await store.close()
    events = [entry["event"] for entry in logs]
    assert "kafka.batch_refused" not in events
    assert "kafka.producer_replaced" not in events
    capped = [e for e in logs if e["event"] == "kafka.batches_capped"]
    assert {e["topic"] for e in capped} == set(settings.topics())
    assert {e["max_message_bytes"] for e in capped} == {16384}
    messages = await consume_all(kafka_bootstrap, settings.topics())
    assert_once_in_order(messages, outbox, set())
    assert sink.published == 3000


@pytest.mark.parametrize(
    "lowered",
    [
        # segment.bytes read at start-up: batches kept within it, the culprit never sent
        pytest.param(False, id="known-at-start-up"),
        # lowered after the sink read it: the broker refuses whole batches (RecordListTooLarge)
        pytest.param(True, id="lowered-while-publishing"),
    ],
)
async def test_a_topics_segment_bytes_bounds_batches_like_max_message_bytes(
    tmp_path: Path, kafka_bootstrap: str, lowered: bool
) -> None:
    """The broker refuses a record batch larger than its topic's segment.bytes
    (RecordListTooLarge), whatever max.message.bytes says: batches stay within it, a record
    above it on its own is dead-lettered naming segment.bytes, the rest is published once and
    in order. (The sink read max.message.bytes only: every batch above segment.bytes was
    refused, the producer restarted, and the same batches refused again, for ever.)"""
    prefix = f"seg{uuid.uuid4().hex[:8]}"
    settings = KafkaSettings(
        bootstrap_servers=kafka_bootstrap,
        topic=prefix + ".{kind}",
        batch_events=500,
        request_timeout_s=10,
    )
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await store.open()
    try:
        configs = {} if lowered else {SEGMENT: "65536"}
        await admin.create_topics(
            [NewTopic(t, 3, 1, topic_configs=configs) for t in settings.topics()]
        )

        async def lower() -> None:
            if lowered:
                await set_topic_limit(admin, settings.topics(), 65536, SEGMENT)

        page = bounces(2000)
        page[80] = bounce(80, message="y" * 100_000)  # fits max.message.bytes, not a segment
        sink = KafkaSink(settings, store, metrics=Metrics(lambda: 0))
        with capture_logs() as logs:
            await publish(sink, store, page, lower)
        letters = await store.dead_letters("kafka")
        outbox = await store.read_outbox(0, 5000)
        assert [d.seq for d in letters] == [outbox[80].seq]
        if lowered:  # the broker's refusal, found by sending the batch again record by record
            assert re.fullmatch(
                r"RecordListTooLargeError: \[Error 18\] RecordListTooLargeError: 1\d{5} bytes"
                rf" as a record batch of its own, refused by the broker for topic {prefix}"
                r"\.bounce",
                letters[0].reason,
            )
        else:
            assert re.fullmatch(
                r"RecordListTooLargeError: \[Error 18\] RecordListTooLargeError: 1\d{5} bytes"
                rf" as a record batch > segment.bytes 65536 of topic {prefix}\.bounce",
                letters[0].reason,
            )
            capped = [e for e in logs if e["event"] == "kafka.batches_capped"]
            assert {e["topic"] for e in capped} == set(settings.topics())
            assert {e["segment_bytes"] for e in capped} == {65536}
            assert "kafka.batch_refused" not in [e["event"] for e in logs]
        assert sink.published == 1999
    finally:
        await store.close()
        await admin.close()
    messages = await consume_all(kafka_bootstrap, settings.topics())
    assert_once_in_order(messages, outbox, {80})


SEGMENT = "segment.bytes"


async def test_topics_the_broker_will_not_create_stop_the_sink_naming_them(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    """create_topics: true with a replication factor one broker cannot give: the sink stops with
    the topic and the broker's reason (it reported them created and retried for ever)."""
    prefix = f"rf{uuid.uuid4().hex[:8]}"
    settings = KafkaSettings(
        bootstrap_servers=kafka_bootstrap,
        topic=prefix + ".ctct.email.{kind}",
        create_topics=True,
        replication_factor=3,
        request_timeout_s=10,
    )
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await store.open()
    try:
        sink = KafkaSink(settings, store)
        with pytest.raises(KafkaSinkError) as stopped:
            await asyncio.wait_for(sink.run(asyncio.Event()), 60)
    finally:
        await store.close()
    message = str(stopped.value)
    assert message.startswith(f"kafka: cannot create topic(s) on {kafka_bootstrap}: ")
    assert f"{prefix}.ctct.email.open: InvalidReplicationFactorError" in message


async def test_a_topic_deleted_while_publishing_is_reported_and_retried(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    """A topic deleted after start-up (create_topics: false) is reported as the sink's error and
    retried, as access problems are: publishing resumes once it exists again. (The sink stopped
    with it, and the relay exited 1 with it, polling and webhooks included.)"""
    prefix = f"del{uuid.uuid4().hex[:8]}"
    settings = KafkaSettings(
        bootstrap_servers=kafka_bootstrap,
        topic=prefix + ".{kind}",
        request_timeout_s=3,
        retry_backoff_max_s=1,
    )
    bounces_topic = settings.topic_for(Kind.BOUNCE)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await store.open()
    try:
        await admin.create_topics([NewTopic(t, 1, 1) for t in settings.topics()])
        with capture_logs() as logs:
            run = Running(KafkaSink(settings, store), store)
            await run.commit(bounces(5))
            await run.caught_up(60)
            await admin.delete_topics([bounces_topic])

            async def deleted() -> bool:
                return bounces_topic not in await admin.list_topics()

            await until(deleted, 30, "the topic is deleted")
            await run.commit([bounce(i) for i in range(5, 10)])

            async def reported() -> bool:
                assert not run.task.done(), run.task
                return "do not exist" in (run.sink.last_error or "")

            await until(reported, 60, "the missing topic is reported")
            assert run.sink.last_error == (
                f"kafka: topic(s) {bounces_topic} do not exist on {kafka_bootstrap}; create them"
                " or set kafka.create_topics: true"
            )
            await admin.create_topics([NewTopic(bounces_topic, 1, 1)])
            await run.caught_up(60)
            await run.stop(60)
    finally:
        await store.close()
        await admin.close()
    warned = [e["error"] for e in logs if e["event"] == "kafka.unavailable"]
    assert run.sink.last_error is None
    assert any("do not exist" in w for w in warned), warned
    messages = await consume_all(kafka_bootstrap, [bounces_topic])
    assert len({m[2]["ce_id"] for m in messages}) == 5  # those after the deletion


async def test_events_of_kinds_no_longer_polled_are_published_too(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    """Bounces wait in the outbox and poll.kinds is now [click]: the relay creates the topic of
    every kind and publishes them (it created only the click topic and stalled for good)."""
    prefix = f"kinds{uuid.uuid4().hex[:8]}"
    db = tmp_path / "state.db"
    store = open_store(f"sqlite:///{db}")
    await store.open()
    try:
        await store.ensure_streams([StreamKey("acme", "campaign", "1")], 0)
        [stream] = await store.streams()
        page = [
            Activity(
                account="acme",
                kind=Kind.BOUNCE,
                campaign_id="1",
                contact_id=str(1000 + i),
                email_address=f"c{i}@example.com",
                occurred_at=from_millis(1_763_000_000_000 + i),
                bounce_code="B",
            )
            for i in range(20)
        ]
        await store.commit_page(stream.id, page, 0)
    finally:
        await store.close()
    upstream = cast(SimProcess, SimpleNamespace(url=f"http://127.0.0.1:{free_port()}"))
    config = relay_config(
        tmp_path,
        upstream,
        poll={"kinds": ["click"]},
        kafka={
            "bootstrap_servers": kafka_bootstrap,
            "topic": prefix + ".ctct.email.{kind}",
            "create_topics": True,
            "request_timeout_s": 10,
        },
    )
    relay = Proc(["run", "--config", str(config)], tmp_path / "relay.log").start()
    print(f"relay log: {relay.log}")  # shown when the test fails
    try:
        await asyncio.to_thread(
            wait_until,
            lambda: kafka_cursor(db) == outbox_head(db),
            60,
            "the Kafka cursor to reach the outbox head (see relay.log)",
        )
        assert relay.stop() == 0
    finally:
        relay.kill()
    messages = await consume_all(kafka_bootstrap, [f"{prefix}.ctct.email.bounce"])
    assert len({m[2]["ce_id"] for m in messages}) == 20
