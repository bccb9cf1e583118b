"""The dev Kafka broker: records through aiokafka, topics, outages, and what a missing tool says."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import ConsumerRecord

from relay.devkafka import (
    KAFKA_VERSION,
    DevKafka,
    DevKafkaError,
    KafkaDist,
    default_cache_dir,
    ensure_kafka,
    serve_dev_kafka,
)
from tests.integration.conftest import DevKafkaFactory

Header = tuple[str, bytes]


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def fake_tool(bin_dir: Path, name: str, script: str = "exit 1") -> Path:
    """An executable shell script standing in for `java` or `mvn`."""
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


class Announcements(io.StringIO):
    """A text stream that signals its first write, for a command's "ready" line."""

    def __init__(self) -> None:
        super().__init__()
        self.written = asyncio.Event()

    def write(self, text: str, /) -> int:
        self.written.set()
        return super().write(text)

    async def ready_at(self, serving: asyncio.Task[None]) -> str:
        """The address ``serving`` (a ``serve_dev_kafka`` writing here) announces its broker
        at, within 60 s."""
        written = asyncio.create_task(self.written.wait())
        await asyncio.wait({serving, written}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        written.cancel()
        assert "ready at" in self.getvalue(), "serve_dev_kafka printed nothing within 60 s"
        return self.getvalue().split("ready at ", 1)[1].split(" ", 1)[0]


async def create_topic(bootstrap: str, topic: str, partitions: int = 1) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, replication_factor=1)])
    finally:
        await admin.close()


async def list_topics(bootstrap: str) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        topics: list[str] = await admin.list_topics()
        return topics
    finally:
        await admin.close()


async def read_all(bootstrap: str, topic: str, count: int) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of `topic` from the start: at least `count`, plus any that follow at once."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest"
    )
    await consumer.start()
    records: list[ConsumerRecord[bytes, bytes]] = []
    try:
        async with asyncio.timeout(30):
            while len(records) < count:
                for batch in (await consumer.getmany(timeout_ms=500)).values():
                    records.extend(batch)
        for batch in (await consumer.getmany(timeout_ms=500)).values():
            records.extend(batch)
    finally:
        await consumer.stop()
    return records


@pytest.mark.integration
async def test_records_keep_key_value_and_headers(kafka_bootstrap: str) -> None:
    """Records produced idempotently with acks=all come back with their keys and headers."""
    topic = unique("devkafka-roundtrip")
    await create_topic(kafka_bootstrap, topic)
    sent: list[tuple[bytes, bytes, list[Header]]] = [
        (
            f"contact-{n}".encode(),
            orjson.dumps({"n": n}),
            [("ce_id", f"event-{n}".encode()), ("ce_type", b"com.constantcontact.email.open")],
        )
        for n in range(3)
    ]
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap, acks="all", enable_idempotence=True
    )
    await producer.start()
    try:
        for key, value, headers in sent:
            await producer.send_and_wait(topic, value, key=key, headers=headers)
    finally:
        await producer.stop()

    records = await read_all(kafka_bootstrap, topic, len(sent))

    assert [(r.key, r.value, list(r.headers)) for r in records] == sent


@pytest.mark.integration
async def test_admin_client_creates_topic_with_partitions(kafka_bootstrap: str) -> None:
    """A topic created through the admin client exists with the partitions asked for."""
    topic = unique("devkafka-admin")

    await create_topic(kafka_bootstrap, topic, partitions=3)

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        [described] = await admin.describe_topics([topic])
    finally:
        await admin.close()
    assert described["error_code"] == 0
    assert len(described["partitions"]) == 3


@pytest.mark.integration
@pytest.mark.parametrize(
    ("auto_create", "expected_partitions"),
    [
        pytest.param(False, None, id="refused-by-default"),
        pytest.param(True, 2, id="created-with-num-partitions"),
    ],
)
async def test_auto_create_topics_follows_the_option(
    dev_kafka_factory: DevKafkaFactory, auto_create: bool, expected_partitions: int | None
) -> None:
    """Asking for an unknown topic creates it only when the broker was told to allow that."""
    broker = await dev_kafka_factory(auto_create_topics=auto_create, num_partitions=2)
    topic = unique("devkafka-auto")
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
    await admin.start()
    try:
        await admin.describe_topics([topic])  # a metadata request that allows auto-creation
        async with asyncio.timeout(10):
            while True:
                [described] = await admin.describe_topics([topic])
                if not auto_create or described["error_code"] == 0:
                    break
                await asyncio.sleep(0.1)
        topics = await admin.list_topics()
    finally:
        await admin.close()

    assert (topic in topics) is auto_create
    partitions = len(described["partitions"]) if described["error_code"] == 0 else None
    assert partitions == expected_partitions


@pytest.mark.integration
async def test_killed_broker_restarts_on_same_port_with_its_data(
    dev_kafka_factory: DevKafkaFactory,
) -> None:
    """After a SIGKILL and restart, acked records survive and a waiting producer delivers once."""
    broker = await dev_kafka_factory()
    bootstrap = broker.bootstrap_servers
    topic = unique("devkafka-outage")
    await create_topic(bootstrap, topic)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"before", key=b"contact-1")
        await broker.kill()
        assert broker.pid is None
        during = await producer.send(topic, b"during", key=b"contact-1")
        await broker.restart()
        async with asyncio.timeout(30):
            await during
    finally:
        await producer.stop()

    assert broker.bootstrap_servers == bootstrap
    records = await read_all(bootstrap, topic, 2)
    assert [r.value for r in records] == [b"before", b"during"]


@pytest.mark.integration
async def test_serve_dev_kafka_announces_broker_and_stops_on_cancel(
    kafka_dist: KafkaDist, tmp_path: Path
) -> None:
    """`serve_dev_kafka` prints where the broker listens and shuts it down when cancelled."""
    out = Announcements()
    task = asyncio.create_task(serve_dev_kafka(None, tmp_path / "kafka", out))
    try:
        bootstrap = await out.ready_at(task)
        assert isinstance(await list_topics(bootstrap), list)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    assert f"(log: {tmp_path / 'kafka' / 'broker.log'})" in out.getvalue()
    host, port = bootstrap.split(":")
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection(host, int(port))


# A program that starts a broker and never stops it itself: what stops it is the launcher's.
OWNER = """
import asyncio, signal, sys
from pathlib import Path
from relay.devkafka import DevKafka, KafkaDist

signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored

async def main() -> None:
    libs, version, java, work = sys.argv[1:]
    broker = DevKafka(KafkaDist(Path(libs), version, Path(java)), Path(work))
    await broker.start()
    print(broker.pid, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def running(pid: int) -> bool:
    """Whether a process (not a zombie) has this pid."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.integration
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_a_signalled_owner_stops_its_broker(
    kafka_dist: KafkaDist, tmp_path: Path, signum: signal.Signals
) -> None:
    """The broker JVM runs in its own session, so a signal to its owner does not reach it:
    SIGTERM (whose default action skips all cleanup) and SIGINT to a program that never stops
    its broker still stop it, and the program ends as the signal would have ended it."""
    args = [str(kafka_dist.libs_dir), kafka_dist.version, str(kafka_dist.java), str(tmp_path)]
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, *args], stdout=subprocess.PIPE, cwd=Path(__file__).parents[2]
    )
    jvm = None
    try:
        assert owner.stdout is not None
        line = owner.stdout.readline()  # the broker pid once it answers (the timeout caps it)
        assert line.strip().isdigit(), f"the owner printed {line!r}; see {tmp_path / 'broker.log'}"
        jvm = int(line)
        assert running(jvm)
        owner.send_signal(signum)
        assert owner.wait(60) == -signum  # ended by the signal (uncaught KeyboardInterrupt too)
        assert not running(jvm), f"the broker (pid {jvm}) outlived its owner"
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
        if owner.stdout is not None:
            owner.stdout.close()
        if jvm is not None and running(jvm):
            os.kill(jvm, signal.SIGKILL)  # the leaked broker of this test, by its pid


def jvms_under(work_dir: Path) -> list[int]:
    """Processes whose command line names ``work_dir`` (the broker's config is there)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes()
        except OSError:  # not a process, or gone
            continue
        if proc.name.isdigit() and str(work_dir).encode() in command and b"java" in command:
            pids.append(int(proc.name))
    return pids


@pytest.mark.integration
async def test_serve_dev_kafka_fails_when_its_broker_dies(
    kafka_dist: KafkaDist, tmp_path: Path
) -> None:
    """The broker JVM dies (the OOM killer, say): `serve_dev_kafka` ends with an error quoting
    the broker's log (it went on waiting for a signal, announcing a dead broker)."""
    out = Announcements()
    task = asyncio.create_task(serve_dev_kafka(None, tmp_path / "kafka", out))
    try:
        await out.ready_at(task)
        for pid in jvms_under(tmp_path / "kafka"):
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(DevKafkaError, match=r"exited \(code -9\); last lines of"):
            await asyncio.wait_for(task, 10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.integration
async def test_complete_cache_needs_no_maven(kafka_dist: KafkaDist, tmp_path: Path) -> None:
    """Once the cache is complete, only `java` has to be on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "java").symlink_to(kafka_dist.java)

    dist = ensure_kafka(kafka_dist.libs_dir.parent, env={"PATH": str(bin_dir)})

    assert dist.libs_dir == kafka_dist.libs_dir


@pytest.mark.integration
async def test_java_home_is_the_java_that_runs_the_broker(
    kafka_dist: KafkaDist, tmp_path: Path
) -> None:
    """`JAVA_HOME` names the Java, as Kafka's own scripts and Maven take it, ahead of an
    (older) `java` on PATH; one without bin/java is named (it was ignored: the broker ran on
    the PATH's java, and an old one failed with only the JVM's words in the broker log)."""
    home = tmp_path / "jdk"
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "java").symlink_to(kafka_dist.java)
    fake_tool(tmp_path / "bin", "java", "echo 'java 1.8' >&2; exit 1")
    env = {"PATH": str(tmp_path / "bin"), "JAVA_HOME": str(home)}

    dist = ensure_kafka(kafka_dist.libs_dir.parent, env=env)

    assert dist.java == home / "bin" / "java"
    with pytest.raises(DevKafkaError, match=r"JAVA_HOME=.*: no .*bin/java"):
        ensure_kafka(kafka_dist.libs_dir.parent, env={**env, "JAVA_HOME": str(tmp_path / "gone")})


@pytest.mark.parametrize(
    ("present", "missing"),
    [
        pytest.param((), "java and mvn", id="both"),
        pytest.param(("mvn",), "java", id="java"),
        pytest.param(("java",), "mvn", id="mvn"),
    ],
)
def test_missing_tools_say_what_to_install(
    tmp_path: Path, present: tuple[str, ...], missing: str
) -> None:
    """Without java or mvn on PATH, the error names each missing tool and its package."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in present:
        fake_tool(bin_dir, name)

    with pytest.raises(DevKafkaError, match=f"needs {missing} on PATH") as info:
        ensure_kafka(tmp_path / "cache", env={"PATH": str(bin_dir)})

    message = str(info.value)
    assert ("openjdk-17-jre-headless" in message) is ("java" in missing)
    assert ("apt-get install maven" in message) is ("mvn" in missing)


def test_maven_failure_quotes_its_output(tmp_path: Path) -> None:
    """A failing Maven run raises with the end of its output and leaves no usable cache."""
    bin_dir = tmp_path / "bin"
    fake_tool(bin_dir, "java")
    fake_tool(
        bin_dir, "mvn", 'echo "[ERROR] Could not resolve org.apache.kafka:kafka_2.13"\nexit 1'
    )
    cache = tmp_path / "cache"

    with pytest.raises(DevKafkaError, match="exit 1") as info:
        ensure_kafka(cache, env={"PATH": str(bin_dir)})

    assert "[ERROR] Could not resolve org.apache.kafka:kafka_2.13" in str(info.value)
    assert not (cache / "libs").exists()
    assert not (cache / "libs.complete").exists()


@pytest.mark.parametrize(
    ("storage_tool", "broker", "error"),
    [
        pytest.param(
            "echo 'bad config' >&2; exit 1", "exit 0", r"formatting .* \(exit 1\)", id="format"
        ),
        pytest.param("exit 0", "echo 'bad config' >&2; exit 3", r"exited \(code 3\)", id="exit"),
        pytest.param("exit 0", "echo 'bad config'; exec sleep 60", r"within 1 s", id="hang"),
    ],
)
async def test_failed_start_quotes_the_log_and_leaves_no_process(
    tmp_path: Path, storage_tool: str, broker: str, error: str
) -> None:
    """A broker that fails to format, exits or never answers fails `start()` with its log."""
    script = f'case "$*" in *StorageTool*) {storage_tool};; esac\n{broker}'
    java = fake_tool(tmp_path / "bin", "java", script)
    kafka = DevKafka(
        KafkaDist(tmp_path / "libs", "test", java), tmp_path / "kafka", ready_timeout_s=1
    )

    with pytest.raises(DevKafkaError, match=error) as info:
        await kafka.start()

    assert "bad config" in str(info.value)
    assert kafka.pid is None


async def test_taken_port_is_refused_before_starting(tmp_path: Path) -> None:
    """Asking for a port another process listens on fails at once with the port named."""
    java = fake_tool(tmp_path / "bin", "java", "exit 0")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        broker = DevKafka(KafkaDist(tmp_path / "libs", "test", java), tmp_path / "kafka", port=port)

        with pytest.raises(DevKafkaError, match=f"port {port} on 127.0.0.1 is in use"):
            await broker.start()


def test_default_cache_follows_the_environment(tmp_path: Path) -> None:
    """`CTCT_RELAY_KAFKA_CACHE` replaces the per-version cache under the checkout."""
    assert default_cache_dir({"CTCT_RELAY_KAFKA_CACHE": str(tmp_path)}) == tmp_path
    assert default_cache_dir({}).parts[-3:] == (".cache", "kafka", KAFKA_VERSION)
