"""The hourly maintenance job: dedup keys, published outbox events and delivered webhook
deliveries past their retention."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from pathlib import Path

import yaml
from structlog.testing import capture_logs

from relay.app import _prune, run_relay
from relay.config import load
from relay.events import WILDCARD, Activity, Kind, from_millis
from relay.store import Attempt, Store, StreamKey, Webhook
from tests.procs import free_port

HOUR_MS = 3600_000


async def commit_old_events(store: Store, count: int, age_h: float) -> None:
    """``count`` events committed (and occurring) ``age_h`` hours ago, fanned out."""
    await store.ensure_streams([StreamKey("acme", "campaign", "1")], 0)
    [stream] = await store.streams()
    then = int(time.time() * 1000 - age_h * HOUR_MS)
    page = [
        Activity("acme", Kind.OPEN, "1", str(i), f"c{i}@example.com", from_millis(then + i))
        for i in range(count)
    ]
    await store.commit_page(stream.id, page, then)
    await store.fanout(1000, then)


async def test_job_prunes_published_events_and_old_dedup_keys(store: Store) -> None:
    """Events Kafka published, older than the retention, go with their old dedup keys."""
    await commit_old_events(store, 10, age_h=200)
    await store.set_sink_cursor("kafka", 10)
    await _prune(store, 168 * HOUR_MS, 168 * HOUR_MS, ["kafka"])
    assert [e.seq for e in await store.read_outbox(0, 100)] == [10]  # the head stays
    assert await store.dedup_count() == 0


async def test_job_prunes_delivered_webhook_history(store: Store) -> None:
    """Deliveries delivered before the retention go with their attempts; a dead one stays."""
    await store.create_webhook(
        Webhook(id="wh_1", url="https://example.com/h", event_types=(WILDCARD,), secret="s")
    )
    await commit_old_events(store, 3, age_h=200)
    then = int(time.time() * 1000 - 200 * HOUR_MS)
    first, second, third = sorted(await store.deliveries("wh_1", 10), key=lambda d: d.seq)
    await store.finish_attempts(
        [
            (Attempt(first.id, then, 200, 1.0), "delivered", then, 0),
            (Attempt(second.id, then, 500, 1.0), "dead", then, 0),
        ]
    )
    await _prune(store, 168 * HOUR_MS, 168 * HOUR_MS, [])
    left = sorted((d.seq, d.status) for d in await store.deliveries("wh_1", 10))
    assert left == [(second.seq, "dead"), (third.seq, "pending")]
    assert await store.attempts(first.id) == []


async def test_job_keeps_what_kafka_has_not_published(store: Store) -> None:
    """However old, events above the Kafka cursor stay while the Kafka sink is configured."""
    await commit_old_events(store, 10, age_h=200)
    await store.set_sink_cursor("kafka", 4)
    await _prune(store, 168 * HOUR_MS, 168 * HOUR_MS, ["kafka"])
    assert [e.seq for e in await store.read_outbox(0, 100)] == list(range(4, 11))
    await _prune(store, 168 * HOUR_MS, 300 * HOUR_MS, [])  # retention not yet reached
    assert len(await store.read_outbox(0, 100)) == 7


async def test_job_keeps_what_an_unconfigured_sink_has_not_published(store: Store) -> None:
    """Kafka left out of the config (of the replica holding the prune lease): its stored cursor
    still holds the prune back, and a warning names it; forgotten, it holds nothing."""
    await commit_old_events(store, 10, age_h=200)
    await store.set_sink_cursor("kafka", 4)
    with capture_logs() as logs:
        await _prune(store, 168 * HOUR_MS, 168 * HOUR_MS, [])
    assert [e.seq for e in await store.read_outbox(0, 100)] == list(range(4, 11))
    [held] = [entry for entry in logs if entry["event"] == "outbox.prune_held"]
    assert held["sinks"] == {"kafka": 4}
    assert held["log_level"] == "warning"
    assert await store.forget_sink("kafka")
    with capture_logs() as logs:
        await _prune(store, 168 * HOUR_MS, 168 * HOUR_MS, [])
    assert [e.seq for e in await store.read_outbox(0, 100)] == [10]
    assert not [entry for entry in logs if entry["event"] == "outbox.prune_held"]


async def test_a_configured_sink_stores_its_cursor_at_start_up(tmp_path: Path) -> None:
    """The relay stores a configured Kafka sink's cursor (0) before it publishes anything (here
    its broker never answers), so a replica without Kafka that prunes keeps Kafka's events."""
    db = tmp_path / "state.db"
    config = {
        "state": f"sqlite:///{db}",
        "accounts": [
            {
                "name": "acme",
                "base_url": f"http://127.0.0.1:{free_port()}",  # nothing listens: passes fail
                "api_key": "k",
                "access_token": "t",
                "campaigns": {"discover": False},
            }
        ],
        "admin": {"port": free_port(), "token": "maintenance-test-admin-token"},
        "kafka": {"bootstrap_servers": f"127.0.0.1:{free_port()}"},  # nothing listens
        "logging": {"level": "error"},
    }
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(config))
    stop = asyncio.Event()
    relay = asyncio.create_task(run_relay(load(path, environ={}), stop))

    def kafka_cursor() -> int | None:
        if not db.exists():
            return None
        with contextlib.closing(sqlite3.connect(db)) as conn:
            try:
                row = conn.execute("SELECT seq FROM sink_cursors WHERE sink = 'kafka'").fetchone()
            except sqlite3.OperationalError:  # not migrated yet
                return None
        return None if row is None else int(row[0])

    try:
        for _ in range(200):
            if kafka_cursor() is not None or relay.done():
                break
            await asyncio.sleep(0.05)
        assert kafka_cursor() == 0
    finally:
        stop.set()
        await asyncio.wait_for(relay, 30)
