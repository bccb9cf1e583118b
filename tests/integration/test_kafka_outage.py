"""The Kafka sink when the broker cannot be reached: outages reported while aiokafka retries
for ever, bounded stops, a start-up that cannot finish, an option Kafka cannot encode."""

from __future__ import annotations

import asyncio
import re
import signal
import time
import uuid
from pathlib import Path

import pytest
import yaml
from structlog.testing import capture_logs

from relay.devkafka import DevKafka, KafkaDist
from relay.metrics import Metrics
from relay.sinks.kafka import KafkaSettings, KafkaSink, KafkaSinkError
from relay.store import open_store
from tests.integration.conftest import DevKafkaFactory
from tests.integration.kafkakit import Running, until
from tests.integration.test_kafka_sink import (
    SimProcess,
    bounce,
    consume_all,
    kafka_config,
    scenario,
)
from tests.procs import Proc, free_port

pytestmark = pytest.mark.integration

# kafka.request_timeout_s of these tests: every wait they assert on is a multiple of it. A dev
# broker on loopback acknowledges in milliseconds, so 3 s still leaves a loaded machine ample
# room before a healthy broker would be taken for silent (5 s made this file ~100 s).
RTO_S = 3.0


def settings_for(bootstrap: str, prefix: str) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=bootstrap,
        topic=prefix + ".ctct.email.{kind}",
        create_topics=True,
        request_timeout_s=RTO_S,
        retry_backoff_max_s=1.0,
    )


async def connected(sink: KafkaSink) -> None:
    async def up() -> bool:
        return sink.connected

    await until(up, 60, "the sink connects")


def gauge(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("ctct_relay_kafka_connected")


async def test_an_outage_with_batches_waiting_is_reported_and_publishing_resumes(
    tmp_path: Path, dev_kafka_factory: DevKafkaFactory
) -> None:
    """Events of a kind already published wait for a killed broker: within request_timeout_s
    the sink says it is not connected, with the error, the gauge is 0 and kafka.unavailable is
    logged once (aiokafka retries such a batch for ever, so nothing failed and the sink said
    connected throughout); the broker back, everything arrives and the error goes."""
    broker = await dev_kafka_factory()
    prefix = f"stall{uuid.uuid4().hex[:8]}"
    settings = settings_for(broker.bootstrap_servers, prefix)
    metrics = Metrics(lambda: 0)
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await store.open()
    try:
        with capture_logs() as logs:
            run = Running(KafkaSink(settings, store, metrics=metrics), store)
            await connected(run.sink)
            await run.commit([bounce(i) for i in range(100)])
            await run.caught_up()
            assert run.sink.health() == (True, None)
            assert gauge(metrics) == 1.0
            await broker.kill()
            await run.commit([bounce(i) for i in range(100, 200)])

            async def down() -> bool:
                return run.sink.health()[0] is False

            took = await until(down, RTO_S + 5, "the sink reports the broker unreachable")
            assert run.sink.health()[1], "with the error"
            assert gauge(metrics) == 0.0
            await asyncio.sleep(RTO_S + 1)  # the metadata request may have failed first
            _, error = run.sink.health()
            assert error is not None
            assert re.fullmatch(
                rf"kafka: no acknowledgement from {broker.bootstrap_servers} for \d+ s", error
            ), error
            assert [e["event"] for e in logs].count("kafka.unavailable") == 1, "logged once"
            await broker.restart()
            await run.caught_up(90)
            assert run.sink.health() == (True, None), "the error went with an acknowledgement"
            assert gauge(metrics) == 1.0
            await run.stop()
        outbox = await store.read_outbox(0, 1000)
    finally:
        await store.close()
    print(f"\noutage reported after {took:.1f} s")
    messages = await consume_all(broker.bootstrap_servers, settings.topics())
    assert {m[2]["ce_id"].decode() for m in messages} == {e.event_id for e in outbox}


async def test_an_outage_while_idle_is_reported_by_a_metadata_request(
    tmp_path: Path, dev_kafka_factory: DevKafkaFactory
) -> None:
    """Nothing to publish when the broker dies: a metadata request every request_timeout_s
    notices it (nothing else would), and notices its return."""
    broker = await dev_kafka_factory()
    settings = settings_for(broker.bootstrap_servers, f"idle{uuid.uuid4().hex[:8]}")
    metrics = Metrics(lambda: 0)
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await store.open()
    try:
        run = Running(KafkaSink(settings, store, metrics=metrics), store)
        await connected(run.sink)

        async def down() -> bool:
            return run.sink.health()[0] is False

        async def up() -> bool:
            return run.sink.health() == (True, None)

        await broker.kill()
        await until(down, 2 * RTO_S + 5, "the idle sink reports the broker unreachable")
        _, error = run.sink.health()
        assert error == (
            f"kafka: no broker of {broker.bootstrap_servers} answers a metadata request"
            f" (asked every {RTO_S:g} s)"
        )
        assert gauge(metrics) == 0.0
        await broker.restart()
        await until(up, 2 * RTO_S + 5, "the idle sink reports the broker back")
        assert gauge(metrics) == 1.0
        await run.stop()
    finally:
        await store.close()


async def test_a_stop_with_the_broker_down_is_bounded_and_keeps_the_cursor(
    tmp_path: Path, dev_kafka_factory: DevKafkaFactory
) -> None:
    """A stop while batches wait for a dead broker returns within request_timeout_s (it waited
    for aiokafka's flush for ever), the cursor stays before the unacknowledged events, and the
    next start publishes them (at least once, same ce_id)."""
    broker = await dev_kafka_factory()
    settings = settings_for(broker.bootstrap_servers, f"stop{uuid.uuid4().hex[:8]}")
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await store.open()
    try:
        run = Running(KafkaSink(settings, store), store)
        await connected(run.sink)
        acknowledged = await run.commit([bounce(i) for i in range(100)])
        await run.caught_up()
        await broker.kill()
        await run.commit([bounce(i) for i in range(100, 200)])
        await asyncio.sleep(1.0)  # handed to the producer
        with capture_logs() as logs:
            took = await run.stop()
        assert took < RTO_S + 5, f"stop took {took:.1f} s"
        assert await store.sink_cursor("kafka") == acknowledged
        assert "kafka.producer_abandoned" in [e["event"] for e in logs]
        await broker.restart()
        again = Running(KafkaSink(settings, store), store)
        await again.caught_up(90)
        await again.stop()
        outbox = await store.read_outbox(0, 1000)
    finally:
        await store.close()
    messages = await consume_all(broker.bootstrap_servers, settings.topics())
    assert {m[2]["ce_id"].decode() for m in messages} == {e.event_id for e in outbox}


async def test_sigterm_with_the_broker_down_exits_well_within_the_grace(
    tmp_path: Path, dev_kafka_factory: DevKafkaFactory
) -> None:
    """The relay publishing to a broker that died: SIGTERM ends it with 0 well within the
    40 s grace of deploy/k8s (it took ~45 s: Kubernetes would kill it). The lease given back
    when that wait is cut short is tests/test_leases.py's."""
    broker = await dev_kafka_factory()
    sim = SimProcess(tmp_path, scenario()).start()
    config = kafka_config(tmp_path, sim, broker.bootstrap_servers, f"term{uuid.uuid4().hex[:8]}")
    settings = yaml.safe_load(config.read_text())
    settings["poll"] = {**settings.get("poll", {}), "kinds": ["send"]}  # one kind, one topic
    # the stop's wait for acknowledgements is min(request_timeout_s, 10 s); the old code waited
    # for the relay's 45 s sink grace whatever the timeout
    settings["kafka"]["request_timeout_s"] = RTO_S
    config.write_text(yaml.safe_dump(settings))
    relay = Proc(["run", "--config", str(config)], tmp_path / "relay.log").start()
    print(f"relay log: {relay.log}")
    try:
        for _ in range(4):
            sim.advance(300)
            await asyncio.sleep(1.0)
        await broker.kill()
        for _ in range(3):
            sim.advance(300)
            await asyncio.sleep(1.0)
        await asyncio.sleep(3)
        started = time.monotonic()
        assert relay.popen is not None
        relay.popen.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(relay.popen.wait, 60)
        took = time.monotonic() - started
    finally:
        relay.kill()
        sim.kill()
    assert code == 0, relay.output()[-3000:]
    assert took < 25, f"SIGTERM took {took:.1f} s"
    assert "relay.stopping" in relay.output()


class _AdvertisedElsewhere(DevKafka):
    """A broker advertising ``advertised_port`` instead of its listener's port (the classic
    Docker mistake): the bootstrap answers, the address it names may not."""

    def __init__(self, dist: KafkaDist, work_dir: Path, advertised_port: int) -> None:
        super().__init__(dist, work_dir)
        self.advertised_port = advertised_port

    def _write_config(self) -> Path:
        path = super()._write_config()
        text = path.read_text().replace(
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{self._port}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.advertised_port}",
        )
        path.write_text(text)
        return path


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def test_an_unreachable_advertised_listener_is_named_at_start_up(
    tmp_path: Path, kafka_dist: KafkaDist
) -> None:
    """The bootstrap answers but the broker's advertised listener does not: start-up ends after
    2 x request_timeout_s with an error naming both addresses and advertised.listeners (it
    waited for a producer id for ever, saying nothing), then backs off and retries."""
    advertised = free_port()
    broker = _AdvertisedElsewhere(kafka_dist, tmp_path / "kafka", advertised)
    print(f"private Kafka broker log: {broker.log_path}")
    pipes: set[asyncio.Task[None]] = set()

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # the broker reaches itself through its advertised address while it starts
        host, port = broker.bootstrap_servers.split(":")
        upstream_r, upstream_w = await asyncio.open_connection(host, int(port))
        for pipe in (_pipe(reader, upstream_w), _pipe(upstream_r, writer)):
            pipes.add(task := asyncio.create_task(pipe))
            task.add_done_callback(pipes.discard)

    proxy = await asyncio.start_server(forward, "127.0.0.1", advertised)
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await store.open()
    try:
        await broker.start()
        proxy.close()  # now nothing answers at the advertised address
        await proxy.wait_closed()
        for task in list(pipes):
            task.cancel()
        settings = settings_for(broker.bootstrap_servers, f"adv{uuid.uuid4().hex[:8]}")
        run = Running(KafkaSink(settings, store), store)

        async def failed() -> bool:
            return run.sink.health()[1] is not None

        took = await until(failed, 2 * RTO_S + 5, "start-up fails with an error")
        assert run.sink.health() == (
            False,
            f"KafkaUnreachableError: kafka: reached bootstrap"
            f" {broker.bootstrap_servers}, but broker 1 at 127.0.0.1:{advertised} (its advertised"
            " listener) does not answer; check the broker's advertised.listeners",
        )
        assert not run.task.done(), "backs off and retries"
        assert await run.stop() < RTO_S
    finally:
        proxy.close()
        await store.close()
        await broker.stop()
    print(f"\nstart-up gave up after {took:.1f} s")


async def test_an_option_kafka_cannot_encode_stops_the_sink_with_its_text(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    """A request timeout beyond Kafka's int32 milliseconds (config refuses it; here it is set
    directly): aiokafka's ValueError escaped the sink and run_leased retried it for ever; now
    the sink stops with the sink's error and the text."""
    settings = KafkaSettings(
        bootstrap_servers=kafka_bootstrap,
        topic=f"enc{uuid.uuid4().hex[:8]}" + ".ctct.email.{kind}",
        create_topics=True,
        request_timeout_s=3_000_000,
    )
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await store.open()
    try:
        run = Running(KafkaSink(settings, store), store)
        await run.commit([bounce(i) for i in range(10)])
        with pytest.raises(KafkaSinkError, match=r"^kafka: \w+(Error)?: .+"):
            await asyncio.wait_for(run.task, 60)
    finally:
        run.halt.set()
        await store.close()
