"""Replay, pause and targets against the real pipeline: simulator, relay and a webhook receiver
as real processes and servers, driven through the ``ctct-relay`` command line."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from relay.sinks.signing import generate_secret, sign
from tests.integration.test_kafka_sink import consume_all
from tests.procs import ROOT, Proc, SimProcess, free_port, outbox, relay_config, wait_until

pytestmark = pytest.mark.integration

KEY, TOKEN = "k-replay-1", "t-replay-1"
ADMIN_TOKEN = "admin-token-replay-7d1f"
SECRET = generate_secret()


class Receiver:
    """A webhook consumer on 127.0.0.1 that checks signatures and keeps what it received."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str, dict[str, object]]] = []  # (received, id, event)
        self.bad_signatures = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                expected = sign(
                    SECRET, self.headers["webhook-id"], int(self.headers["webhook-timestamp"]), raw
                )
                given = self.headers["webhook-signature"].split()
                event = json.loads(raw)
                with receiver._lock:
                    if expected not in given:
                        receiver.bad_signatures += 1
                    receiver.events.append((time.time(), str(event["id"]), event))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def ids(self, after: float = 0.0) -> Counter[str]:
        with self._lock:
            return Counter(i for t, i, _ in self.events if t >= after)

    def lose_everything_after(self, moment: float) -> None:
        """What a consumer restored from a backup taken at ``moment`` still has."""
        with self._lock:
            self.events = [e for e in self.events if e[0] < moment]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """The webhook consumer."""
    r = Receiver()
    yield r
    r.close()


def start_pipeline(
    tmp_path: Path, receiver: Receiver, **extra: object
) -> tuple[SimProcess, Proc, str]:
    """Simulator and relay (admin API with a token, one declared webhook, ``extra`` config);
    returns them with the admin API's URL."""
    scenario = {
        "seed": 7,
        "start": "2026-11-20T09:00:00Z",
        "time_scale": 0,
        "keys": [{"api_key": KEY, "access_token": TOKEN, "qps": None, "daily": None}],
        "contacts": {"count": 40},
        "campaigns": {"count": 4, "already_sent": 2, "sent_every_s": 600, "audience": 1.0},
        "rates": {"late": 0.0, "send_batch": 20, "open_delay_s": 300},
    }
    sim = SimProcess(tmp_path, scenario).start()
    port = free_port()
    config = relay_config(
        tmp_path,
        sim,
        api_key=KEY,
        token=TOKEN,
        admin={"port": port, "token": ADMIN_TOKEN},
        webhooks={
            "allow_networks": ["127.0.0.0/8"],
            "retry_schedule_s": [0.2, 0.5],
            "declared": [
                {
                    "url": receiver.url,
                    "event_types": ["com.constantcontact.email.*"],
                    "secret": SECRET,
                }
            ],
        },
        **extra,
    )
    try:
        relay = Proc(["run", "--config", str(config)], tmp_path / "relay.log").start()
    except BaseException:
        sim.kill()
        raise
    return sim, relay, f"http://127.0.0.1:{port}"


@pytest.fixture
def pipeline(tmp_path: Path, receiver: Receiver) -> Iterator[tuple[SimProcess, Proc, str]]:
    """The pipeline without Kafka."""
    sim, relay, api = start_pipeline(tmp_path, receiver)
    try:
        yield sim, relay, api
    finally:
        relay.kill()
        sim.kill()


def rfc3339(ms: int) -> str:
    """Unix milliseconds as RFC 3339 UTC, exactly."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def cli(api: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``ctct-relay <args> --api <api> --token <token>`` as a user types it."""
    return subprocess.run(
        [sys.executable, "-m", "relay", *args, "--api", api, "--token", ADMIN_TOKEN],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        check=False,
    )


def cli_json(api: str, *args: str) -> dict[str, object]:
    done = cli(api, *args, "--json")
    assert done.returncode == 0, done.stderr
    answer: dict[str, object] = json.loads(done.stdout)
    return answer


def committed(db: Path) -> list[tuple[int, str, int, int]]:
    """The outbox as (seq, event id, committed ms, occurred ms)."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT seq, event_id, committed_ms, occurred_ms FROM outbox")
        return [(int(a), str(b), int(c), int(d)) for a, b, c, d in rows]


def settle(sim: SimProcess, relay: Proc, receiver: Receiver, db: Path) -> None:
    """Let the relay commit everything the simulator has, and the receiver get all of it."""
    truth = sim.truth()

    def caught_up() -> bool:
        try:
            return db.exists() and outbox(db) == truth
        except sqlite3.OperationalError:  # the relay is still creating its tables
            return False

    wait_until(caught_up, 90, "outbox == truth")
    ids = {e for _, e, _, _ in committed(db)}
    wait_until(lambda: set(receiver.ids()) == ids, 60, "receiver has every committed event")
    assert relay.alive(), relay.output()[-3000:]


def test_log_replay_gives_a_consumer_exactly_what_it_lost_with_the_same_ids(
    tmp_path: Path, pipeline: tuple[SimProcess, Proc, str], receiver: Receiver
) -> None:
    """Everything received after T, lost and replayed from the log: exactly those ids, once."""
    sim, relay, api = pipeline
    db = tmp_path / "state.db"
    sim.advance(900)
    settle(sim, relay, receiver, db)
    before = set(receiver.ids())
    time.sleep(0.05)
    moment = time.time()
    time.sleep(0.05)
    sim.advance(1800)
    settle(sim, relay, receiver, db)
    lost = receiver.ids(after=moment)
    assert len(lost) > 20
    assert set(lost).isdisjoint(before)

    receiver.lose_everything_after(moment)
    since = rfc3339(int(moment * 1000))
    dry = cli_json(api, "replay", "--account", "acme", "--since", since, "--dry-run")
    assert dry["events"] == len(lost)
    assert set(receiver.ids(after=moment)) == set()  # a dry run sends nothing

    done = cli(api, "replay", "--account", "acme", "--since", since, "--wait")
    assert done.returncode == 0, done.stderr
    assert f"{len(lost)} events are being sent again" in done.stdout
    assert "replay:" in done.stderr  # the progress display
    # --wait returned: every replayed delivery was answered, so the consumer has them all now
    assert len(receiver.ids(after=moment)) == len(lost)
    time.sleep(1.0)  # anything extra would arrive now
    assert receiver.ids(after=moment) == lost  # the same ids, each exactly once
    assert set(receiver.ids()) == before | set(lost)
    assert receiver.bad_signatures == 0


def test_upstream_replay_re_polls_a_campaign_from_an_activity_time(
    tmp_path: Path, pipeline: tuple[SimProcess, Proc, str], receiver: Receiver
) -> None:
    """Re-polling one campaign from T re-emits its activity since T, ids unchanged, nothing else."""
    sim, relay, api = pipeline
    db = tmp_path / "state.db"
    sim.advance(2400)
    settle(sim, relay, receiver, db)
    streams = cli_json(api, "status", "--streams", "--account", "acme")["streams"]
    assert isinstance(streams, dict)
    campaign = max(
        (s for s in streams["streams"] if s["scope"] == "campaign"),  # type: ignore[union-attr]
        key=lambda s: len(s["feeds"]),
    )
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT event_id, occurred_ms FROM outbox WHERE stream_id = ?", (campaign["id"],)
        ).fetchall()
    times = sorted(ms for _, ms in rows)
    since_ms = times[len(times) // 2]
    expected = Counter(str(e) for e, ms in rows if ms >= since_ms)
    mark = time.time()
    since = rfc3339(since_ms)
    args = ["replay", "--account", "acme", "--campaign", campaign["resource_id"], "--since", since]
    dry = cli_json(api, *args, "--source", "upstream", "--dry-run")
    assert dry["streams"] == 1
    assert dry["events"] == sum(expected.values())

    done = cli(api, *args, "--source", "upstream", "--wait")
    assert done.returncode == 0, done.stderr
    assert len(receiver.ids(after=mark)) == len(expected)  # --wait covers the delivery too
    time.sleep(1.0)
    assert receiver.ids(after=mark) == expected
    assert relay.alive()
    assert "poll.replayed" in relay.output()


def quiescent(db: Path, quiet_s: float = 2.0, timeout_s: float = 30.0) -> int:
    """The outbox's size once it has not grown for ``quiet_s``: the passes in flight when the
    account was held have finished (a fixed second was too short for a pass of several feeds
    on a loaded machine, which then committed what the simulator's next advance showed)."""
    deadline = time.monotonic() + timeout_s
    size, since = len(committed(db)), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = len(committed(db))
        if now != size:
            size, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return size
    raise AssertionError(f"the outbox kept growing for {timeout_s}s after the pause")


def test_pause_resume_and_targets_at_run_time(
    tmp_path: Path, pipeline: tuple[SimProcess, Proc, str], receiver: Receiver
) -> None:
    """An operator pause stops polling until resumed; a removed campaign stays removed."""
    sim, relay, api = pipeline
    db = tmp_path / "state.db"
    sim.advance(600)
    settle(sim, relay, receiver, db)
    done = cli(api, "pause", "--account", "acme", "--reason", "maintenance window")
    assert done.returncode == 0, done.stderr
    assert "paused: maintenance window" in done.stdout
    held_at = quiescent(db)  # passes in flight finish (slower on a loaded machine)
    sim.advance(1200)
    time.sleep(3.0)
    assert len(committed(db)) == held_at  # nothing polled while held
    status = cli(api, "status")
    assert status.returncode == 0
    assert "by operator since" in status.stdout

    targets = cli_json(api, "targets", "list", "--account", "acme")["campaigns"]
    assert isinstance(targets, list)
    assert targets
    gone = str(targets[0])
    assert cli(api, "targets", "remove", "--account", "acme", "--campaign", gone).returncode == 0
    assert cli(api, "resume", "--account", "acme").returncode == 0
    settle_rows = lambda: len(committed(db)) > held_at  # noqa: E731
    wait_until(settle_rows, 60, "polling after resume")
    time.sleep(2.0)  # a discovery pass or two: the removed campaign must not come back
    after = cli_json(api, "targets", "list", "--account", "acme")
    assert gone not in after["campaigns"]  # type: ignore[operator]
    assert {"scope": "campaign", "resource_id": gone} in after["removed"]  # type: ignore[operator]
    assert ADMIN_TOKEN not in status.stdout
    assert KEY not in status.stdout

    added = cli(api, "targets", "add", "--account", "acme", "--contact", "1003")
    assert added.returncode == 0, added.stderr
    assert relay.stop() == 0  # a restart keeps run-time targets, added and removed
    relay.start()
    wait_until(lambda: cli(api, "status").returncode == 0, 30, "the restarted admin API")
    time.sleep(2.0)  # the start-up discovery (a full scan) has run
    restarted = cli_json(api, "targets", "list", "--account", "acme")
    assert gone not in restarted["campaigns"]  # type: ignore[operator]
    assert "1003" in restarted["contacts"]  # type: ignore[operator]


def test_log_replay_reaches_kafka_and_webhooks_with_the_same_ids(
    tmp_path: Path, receiver: Receiver, kafka_bootstrap: str
) -> None:
    """Kafka gets every lost event a second time with the same ce_id, the rest once."""
    prefix = f"replay{free_port()}"
    kafka = {
        "bootstrap_servers": kafka_bootstrap,
        "topic": prefix + ".ctct.email.{kind}",
        "create_topics": True,
        "partitions": 2,
        "request_timeout_s": 10,
    }
    sim, relay, api = start_pipeline(tmp_path, receiver, kafka=kafka)
    db = tmp_path / "state.db"
    try:
        sim.advance(900)
        settle(sim, relay, receiver, db)
        time.sleep(0.05)
        moment = time.time()
        time.sleep(0.05)
        sim.advance(1800)
        settle(sim, relay, receiver, db)
        lost = receiver.ids(after=moment)
        receiver.lose_everything_after(moment)
        done = cli(
            api, "replay", "--account", "acme", "--since", rfc3339(int(moment * 1000)), "--wait"
        )
        assert done.returncode == 0, done.stderr
        assert "kafka" in done.stderr  # progress names every sink
        assert receiver.ids(after=moment) == lost
        topics = [
            f"{prefix}.ctct.email.{k}"
            for k in ("send", "open", "click", "forward", "bounce", "unsubscribe")
        ]
        messages = asyncio.run(consume_all(kafka_bootstrap, topics, idle_s=3.0))
    finally:
        relay.kill()
        sim.kill()
    published = Counter(dict(m[2])["ce_id"].decode() for m in messages)
    everything = {e for _, e, _, _ in committed(db)}
    assert set(published) == everything
    assert {i for i, n in published.items() if n == 2} == set(lost)
    assert max(published.values()) == 2
