"""``ctct-relay run`` stops promptly on SIGTERM whatever start-up step it is waiting in: an
unreachable PostgreSQL, a start-up lease another replica holds, a Kafka broker that does not
answer. Orchestrators SIGKILL after their grace period (40 s in deploy/k8s)."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import yaml

from relay.store import open_store
from relay.store.coordination import coordinator_for
from tests.procs import Proc, free_port, wait_until

pytestmark = pytest.mark.integration

PROMPT_S = 5.0  # SIGTERM to exit; the waits below were 15 to 60 s


def config(tmp: Path, state: str, **extra: object) -> Path:
    """A relay config whose upstream is a closed port: only start-up and shutdown matter."""
    settings: dict[str, object] = {
        "state": state,
        "accounts": [
            {
                "name": "acme",
                "base_url": f"http://127.0.0.1:{free_port()}",
                "api_key": "k-startup-1",
                "access_token": "t-startup-1",
            }
        ],
        "logging": {"level": "info", "format": "json"},
        "admin": {"port": 0},
        **extra,
    }
    path = tmp / "relay.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def sigterm_exit(relay: Proc) -> tuple[int, float]:
    """SIGTERM the relay: its exit code and how long it took to exit."""
    assert relay.popen is not None
    assert relay.alive(), relay.output()
    sent = time.monotonic()
    relay.popen.send_signal(signal.SIGTERM)
    try:
        code = relay.popen.wait(60)
    except subprocess.TimeoutExpired:
        relay.kill()
        raise
    return code, time.monotonic() - sent


def assert_stopped_cleanly(relay: Proc, code: int, took_s: float) -> str:
    text = relay.output()
    assert took_s < PROMPT_S, f"exit took {took_s:.1f}s:\n{text[-3000:]}"
    assert code == 0, text[-3000:]  # as a SIGTERM once started
    assert "Traceback" not in text
    assert "ctct-relay: error" not in text
    return text


def test_sigterm_while_postgresql_is_unreachable(tmp_path: Path) -> None:
    """The store retries connecting for postgres.reconnect_max_s (60 s): a SIGTERM meanwhile
    ends the relay at once, exit 0, saying it stopped during start-up (it exited only after the
    60 s, exit 1 "connect failed for 60s")."""
    state = f"postgresql://user:pw@127.0.0.1:{free_port()}/db"
    relay = Proc(["run", "--config", str(config(tmp_path, state))], tmp_path / "relay.log")
    relay.start()
    try:
        wait_until(lambda: "store.retry" in relay.output(), 20, "a store.retry line")
        time.sleep(1)
        code, took_s = sigterm_exit(relay)
    finally:
        relay.kill()
    text = assert_stopped_cleanly(relay, code, took_s)
    assert "relay.stopped_during_startup" in text
    assert "connect failed" not in text


def test_sigterm_while_another_replica_holds_the_declare_webhooks_lease(
    tmp_path: Path, postgres_url: str
) -> None:
    """Replicas upsert the declared webhooks one at a time under a lease: a relay waiting for it
    (up to 4 leases, 60 s) stops at once on SIGTERM."""

    async def hold() -> None:
        store = open_store(postgres_url)
        await store.open()
        try:
            held = await coordinator_for(store, "another-replica").hold(["declare-webhooks"])
            assert held == {"declare-webhooks"}
        finally:
            await store.close()

    asyncio.run(hold())  # for postgres.lease_s (15 s), as a replica starting alongside would
    relay = Proc(["run", "--config", str(config(tmp_path, postgres_url))], tmp_path / "relay.log")
    relay.start()
    try:
        time.sleep(3)
        assert "relay.started" not in relay.output(), relay.output()
        code, took_s = sigterm_exit(relay)
    finally:
        relay.kill()
    text = assert_stopped_cleanly(relay, code, took_s)
    assert "relay.stopped_during_startup" in text


@pytest.fixture
def silent_broker() -> Iterator[str]:
    """host:port of a listener that accepts connections and never answers: a hung broker."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not done.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{listener.getsockname()[1]}"
    finally:
        done.set()
        thread.join(5)
        for conn in accepted:
            conn.close()
        listener.close()


def test_sigterm_while_the_kafka_sink_connects_to_a_silent_broker(
    tmp_path: Path, silent_broker: str
) -> None:
    """The Kafka sink's connect waits request_timeout_s (30 s) for a broker that does not
    answer: a SIGTERM meanwhile stops the relay at once (it took the sink's 30 s grace)."""
    path = config(
        tmp_path,
        f"sqlite:///{tmp_path / 'state.db'}",
        kafka={"bootstrap_servers": silent_broker, "request_timeout_s": 30},
    )
    relay = Proc(["run", "--config", str(path)], tmp_path / "relay.log")
    relay.start()
    try:
        wait_until(lambda: "relay.started" in relay.output(), 30, "relay.started")
        time.sleep(1)
        code, took_s = sigterm_exit(relay)
    finally:
        relay.kill()
    assert_stopped_cleanly(relay, code, took_s)


async def test_a_sink_failing_during_start_up_still_ends_the_relay_with_its_error(
    tmp_path: Path, postgres_url: str, kafka_bootstrap: str
) -> None:
    """Start-up held (another transaction locks the table of the budget salt) while the Kafka
    sink finds its topics missing: the sink's stop is the relay's failure, exit 1 with the
    topic error, not a quiet "stopped during start-up"."""
    store = open_store(postgres_url)
    await store.open()  # the schema, so the lock below is all that holds the relay
    await store.close()
    prefix = f"missing{uuid.uuid4().hex[:8]}"
    kafka = {"bootstrap_servers": kafka_bootstrap, "topic": prefix + ".{kind}"}
    path = config(tmp_path, postgres_url, kafka=kafka)
    relay = Proc(["run", "--config", str(path)], tmp_path / "relay.log")
    conn = await asyncpg.connect(postgres_url)
    try:
        async with conn.transaction():
            await conn.execute("LOCK TABLE meta IN ACCESS EXCLUSIVE MODE")
            relay.start()
            assert relay.popen is not None
            try:  # within the relay's statement timeout (30 s), which would end the wait too
                code: int | None = await asyncio.to_thread(relay.popen.wait, 25)
            except subprocess.TimeoutExpired:
                code = None
    finally:
        await conn.close()
        relay.kill()
    text = relay.output()
    assert code == 1, text[-3000:]
    last = text.rstrip("\n").rsplit("\n", 1)[-1]
    assert last.startswith(f"ctct-relay: error: kafka: topic(s) {prefix}."), text[-3000:]
    assert "relay.started" not in text
    assert "relay.stopped_during_startup" not in text
    assert "Traceback" not in text
