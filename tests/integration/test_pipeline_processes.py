"""The relay as real processes against the simulator: crashes, upstream faults, the quota."""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
import time
from collections import Counter
from pathlib import Path

import pytest

from relay.store import PostgresStore
from tests import pgkit
from tests.procs import Proc, SimProcess, outbox, relay_config, sim_scenario, wait_until
from tests.sqlitekit import damage_middle

pytestmark = pytest.mark.integration

KEY, TOKEN = "k-crash-1", "t-crash-1"


def scenario(**overrides: object) -> dict[str, object]:
    base = sim_scenario(
        KEY,
        TOKEN,
        seed=21,
        contacts={"count": 60},
        campaigns={"count": 6, "already_sent": 2, "sent_every_s": 600, "audience": 1.0},
        rates={"late": 0.2, "late_mean_s": 90, "send_batch": 30, "open_delay_s": 400},
    )
    base.update(overrides)
    return base


def settle(sim: SimProcess, relay: Proc, db: Path, timeout_s: float = 90) -> None:
    """Stop new activity, let late arrivals land, wait for the relay to commit everything."""
    sim.advance(3600)
    truth = sim.truth()
    try:
        wait_until(lambda: db.exists() and outbox(db) == truth, timeout_s, "outbox == truth")
    except AssertionError:
        got = outbox(db)
        missing, extra = truth - got, got - truth
        raise AssertionError(
            f"{len(missing)} missing (e.g. {list(missing)[:3]}), {len(extra)} extra"
            f" (e.g. {list(extra)[:3]}); relay log tail:\n{relay.output()[-3000:]}"
        ) from None


def test_sigkill_at_random_moments_loses_and_doubles_nothing(tmp_path: Path) -> None:
    """Killed with SIGKILL twelve times (mid-pagination included), the outbox ends exactly right."""
    sim = SimProcess(tmp_path, scenario()).start()
    relay = Proc(["run", "--config", str(relay_config(tmp_path, sim))], tmp_path / "relay.log")
    db = tmp_path / "state.db"
    rng = random.Random(1234)
    try:
        relay.start()
        for _ in range(12):
            sim.advance(300)
            time.sleep(rng.uniform(0.4, 2.0))
            relay.kill()
            relay.start()
        settle(sim, relay, db)
        assert relay.alive(), relay.output()
        assert relay.stop() == 0
    finally:
        relay.kill()
        sim.kill()
    got = outbox(db)
    assert max(got.values()) == 1
    assert sum(got.values()) > 500
    assert relay.starts == 13


def test_upstream_faults_lose_nothing_and_watermarks_stay_honest(tmp_path: Path) -> None:
    """5xx, slow, truncated and over-qps answers: no crash, nothing lost, no watermark ahead."""
    faults = {"error_5xx_rate": 0.15, "slow_rate": 0.05, "slow_s": 0.6, "truncate_rate": 0.1}
    keys = [{"api_key": KEY, "access_token": TOKEN, "qps": 6, "daily": None}]
    sim = SimProcess(tmp_path, scenario(faults=faults, keys=keys)).start()
    config = relay_config(
        tmp_path,
        sim,
        account={"rate_limit": {"requests_per_second": 20, "requests_per_day": 10**6}},
        schedule={"concurrency": 4},
    )
    relay = Proc(["run", "--config", str(config)], tmp_path / "relay.log").start()
    db = tmp_path / "state.db"
    try:
        for _ in range(10):
            sim.advance(300)
            time.sleep(1.0)
            assert_watermarks_behind_commits(db, sim)
        sim.post("/_sim/faults", {"reset": True})
        settle(sim, relay, db)
        assert relay.alive(), relay.output()
    finally:
        relay.kill()
        sim.kill()
    stats = sim_stats_rejections(relay.output())
    assert stats["retries"] > 10, "faults were injected and retried"


def assert_watermarks_behind_commits(db: Path, sim: SimProcess) -> None:
    """Every activity at or before a feed's watermark is committed, except late arrivals (the
    API returned them only after they occurred; the overlap window re-reads them)."""
    if not db.exists():
        return
    truth, late = sim.truth(), sim.late_arrivals()
    with sqlite3.connect(db) as conn:
        marks = conn.execute(
            "SELECT s.resource_id, w.kind, w.watermark_ms FROM watermarks w"
            " JOIN streams s ON s.id = w.stream_id WHERE s.scope = 'campaign'"
        ).fetchall()
    committed = outbox(db)
    for campaign, kind, mark in marks:
        behind = [i for i in truth if i[0] == kind and i[1] == campaign and i[3] <= mark]
        missing = [i for i in behind if i not in committed and i not in late]
        assert not missing, (campaign, kind, mark, missing[:3])


def sim_stats_rejections(log: str) -> Counter[str]:
    return Counter(retries=log.count('"ctct.retry"'))


def test_budget_holds_per_second_and_per_day_across_a_restart(tmp_path: Path) -> None:
    """Served requests never exceed 2 in any second nor the daily allowance, restart included."""
    keys = [{"api_key": KEY, "access_token": TOKEN, "qps": None, "daily": None}]
    sim = SimProcess(tmp_path, scenario(keys=keys)).start()
    config = relay_config(
        tmp_path,
        sim,
        account={
            "rate_limit": {"requests_per_second": 2, "requests_per_day": 60, "reserved_share": 0.5}
        },
    )
    relay = Proc(["run", "--config", str(config)], tmp_path / "relay.log")
    try:
        relay.start()
        sim.advance(600)
        time.sleep(6)
        relay.kill()
        relay.start()
        sim.advance(600)
        wait_until(lambda: key_stats(sim)["served"] >= 30, 60, "the daily allowance to be spent")
        time.sleep(3)  # anything beyond the allowance would show up now
        assert relay.alive(), relay.output()
        stats = key_stats(sim)
    finally:
        relay.kill()
        sim.kill()
    assert stats["served"] == 30, stats
    assert stats["max_per_1s"] <= 2, stats
    assert '"account.paused"' in relay.output()


def key_stats(sim: SimProcess) -> dict[str, int]:
    """served and max_per_1s of the test key, as the simulator counted them."""
    keys = sim.get("/_sim/stats")["keys"]
    assert isinstance(keys, dict)
    return {name: int(keys[KEY][name]) for name in ("served", "max_per_1s")}


def test_a_second_relay_on_the_same_sqlite_file_stops_at_start_up(tmp_path: Path) -> None:
    """Two `ctct-relay run` on one state file: the second exits 1 with one line naming the file
    and the first's pid, and polls nothing (it started silently, polling the same streams with
    the same budget); once the first has stopped, the same command starts."""
    sim = SimProcess(tmp_path, scenario()).start()
    config = relay_config(tmp_path, sim)
    first = Proc(["run", "--config", str(config)], tmp_path / "relay.log").start()
    second = Proc(["run", "--config", str(config)], tmp_path / "second.log")
    db = tmp_path / "state.db"
    try:
        wait_until(lambda: '"relay.started"' in first.output(), 30, "the first relay")
        second.start()
        assert second.popen is not None
        assert second.popen.wait(30) == 1
        said = second.output().split("--- start 1 ---\n", 1)[1]
        assert first.popen is not None
        assert said == (
            f"ctct-relay: error: state store {db} is in use by another ctct-relay process"
            f" (pid {first.popen.pid}) (one relay per SQLite file; several replicas need a"
            " postgresql:// state)\n"
        )
        assert first.alive(), first.output()
        assert first.stop() == 0
        second.start()
        wait_until(lambda: '"relay.started"' in second.output(), 30, "the second relay")
        assert second.alive(), second.output()
        assert second.stop() == 0
    finally:
        first.kill()
        second.kill()
        sim.kill()


def last_words(relay: Proc) -> tuple[str, str]:
    """Wait (60 s at most) for ``relay`` to exit 1 by itself: its output, and the last line."""
    assert relay.popen is not None
    status = relay.popen.wait(60)
    said = relay.output()
    assert status == 1, said[-3000:]
    return said, said.rstrip("\n").rsplit("\n", 1)[-1]


def test_a_state_file_corrupted_while_the_relay_runs_stops_it(tmp_path: Path) -> None:
    """Pages of the running relay's state file overwritten: the first store call that reads one
    ends the relay, exit status 1, its last line naming the file and what to do, no traceback
    (it polled on for ever, every pass failing, ready all the while)."""
    sim = SimProcess(tmp_path, scenario()).start()
    relay = Proc(["run", "--config", str(relay_config(tmp_path, sim))], tmp_path / "relay.log")
    db = tmp_path / "state.db"
    try:
        relay.start()
        sim.advance(900)
        wait_until(lambda: db.exists() and sum(outbox(db).values()) >= 300, 60, "300 events")
        with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
            # everything into the file, so the relay reads the damaged pages, not the log's
            wait_until(
                lambda: conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0,
                30,
                "a checkpoint",
            )
            damage_middle(db)
            # a write from another connection: the relay's drops its page cache and reads
            conn.execute("PRAGMA user_version = 1")
        sim.advance(900)  # new activity: passes look its dedup keys up all over the file
        said, last = last_words(relay)
    finally:
        relay.kill()
        sim.kill()
    assert last.startswith(f"ctct-relay: error: state store {db} is corrupt ("), said[-3000:]
    assert f"sqlite3 {db} .recover | sqlite3 recovered.db" in last
    assert "Traceback" not in said
    assert '"store.failed"' in said


async def _damaged_outbox(url: str, sqlstate: str) -> str:
    """A migrated database whose outbox inserts fail as on a damaged page (SQLSTATE)."""
    store = PostgresStore.from_url(url)
    await store.open()
    try:
        return await store.transaction(
            lambda conn: pgkit.damage_on_insert(conn, "outbox", sqlstate)
        )
    finally:
        await store.close()


def test_damage_postgresql_reports_stops_the_relay(tmp_path: Path, postgres_url: str) -> None:
    """A replica whose server reports a damaged page (SQLSTATE XX001) when it commits its first
    page exits 1, its last line naming the server, the SQLSTATE and what to do, no traceback
    and no password (it polled on for ever, every pass failing, ready all the while)."""
    # trust authentication: the server never asks for this password, so the URL may hold one
    url = postgres_url.replace("postgres@", "postgres:pw-hidden-7@", 1)
    words = asyncio.run(_damaged_outbox(url, "XX001"))
    sim = SimProcess(tmp_path, scenario()).start()
    relay = Proc(
        ["run", "--config", str(relay_config(tmp_path, sim, state=url))], tmp_path / "relay.log"
    )
    try:
        relay.start()
        sim.advance(900)
        said, last = last_words(relay)
    finally:
        relay.kill()
        sim.kill()
    where = PostgresStore.from_url(url).where
    assert last.startswith(
        f"ctct-relay: error: state store (PostgreSQL at {where}) is corrupt"
        f" (SQLSTATE XX001 data_corrupted: {words}): "
    ), said[-3000:]
    assert "Check the server" in last
    assert "Traceback" not in said
    assert '"store.failed"' in said
    assert "pw-hidden-7" not in said
