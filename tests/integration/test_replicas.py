"""Several relay replicas as real processes on one PostgreSQL, one simulator, the real Kafka broker
and a webhook receiver: the work is shared, nothing is lost or polled twice at once, the account
budget holds for the deployment, and a replica's death or a database restart changes nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from relay.devkafka import DevKafka, KafkaDist
from tests import pgkit
from tests.integration.test_kafka_sink import consume_all
from tests.integration.test_replay import SECRET, Receiver
from tests.procs import (
    Identity,
    Proc,
    SimProcess,
    data_identity,
    free_port,
    relay_config,
    sim_scenario,
)

pytestmark = pytest.mark.integration

KEY, TOKEN = "k-replicas-1", "t-replicas-1"
LEASE_S = 3.0
WEBHOOK_CONCURRENCY = 2  # per endpoint: for the deployment, not per replica
KINDS = ("send", "open", "click", "forward", "bounce", "unsubscribe")


class CountingReceiver(Receiver):
    """The webhook consumer, taking ``delay_s`` per request and counting requests in progress:
    the most at once shows whether the endpoint's concurrency limit held across replicas."""

    def __init__(self, delay_s: float = 0.01) -> None:
        super().__init__()
        self.inflight = 0
        self.max_inflight = 0
        receiver = self
        verifying = self.server.RequestHandlerClass

        class Handler(verifying):  # type: ignore[valid-type, misc]
            def do_POST(self) -> None:
                with receiver._lock:
                    receiver.inflight += 1
                    receiver.max_inflight = max(receiver.max_inflight, receiver.inflight)
                time.sleep(delay_s)
                with receiver._lock:  # before answering: the relay's next request may follow
                    receiver.inflight -= 1
                super().do_POST()

        self.server.RequestHandlerClass = Handler


@pytest.fixture
def receiver() -> Iterator[CountingReceiver]:
    """The webhook consumer (checks signatures, counts concurrent requests)."""
    r = CountingReceiver()
    yield r
    r.close()


def scenario() -> dict[str, object]:
    return sim_scenario(
        KEY,
        TOKEN,
        seed=33,
        contacts={"count": 40},
        campaigns={"count": 6, "already_sent": 3, "sent_every_s": 600, "audience": 1.0},
        rates={"late": 0.1, "late_mean_s": 60, "send_batch": 40, "open_delay_s": 300},
    )


class Deployment:
    """N replicas with one config: the same simulator, database, Kafka topics and webhook."""

    def __init__(
        self,
        tmp: Path,
        db_url: str,
        kafka: str,
        receiver: Receiver,
        replicas: int,
        lease_s: float = LEASE_S,
    ) -> None:
        self.sim = SimProcess(tmp, scenario()).start()
        self.db_url = db_url
        self.kafka = kafka
        self.prefix = f"replicas{free_port()}"
        self.receiver = receiver
        config = relay_config(
            tmp,
            self.sim,
            api_key=KEY,
            token=TOKEN,
            state=db_url,
            postgres={"lease_s": lease_s, "reconnect_max_s": 120},
            poll={"start_from": "earliest", "overlap_s": 1800, "page_limit": 50},
            schedule={"min_interval_s": 0.3, "max_interval_s": 2, "tick_s": 0.2},
            kafka={
                "bootstrap_servers": kafka,
                "topic": self.prefix + ".ctct.email.{kind}",
                "create_topics": True,
                "partitions": 3,
                "request_timeout_s": 10,
            },
            webhooks={
                "allow_networks": ["127.0.0.0/8"],
                "concurrency": WEBHOOK_CONCURRENCY,
                "retry_schedule_s": [0.2, 0.5, 1, 2, 5, 5, 5, 5],
                "declared": [
                    {
                        "url": receiver.url,
                        "event_types": ["com.constantcontact.email.*"],
                        "secret": SECRET,
                    }
                ],
            },
        )
        self.relays = [
            Proc(["run", "--config", str(config)], tmp / f"relay-{n}.log") for n in range(replicas)
        ]
        for relay in self.relays:
            relay.start()

    def stop(self) -> None:
        for relay in self.relays:
            relay.kill()
        self.sim.kill()

    def logs(self) -> str:
        return "\n".join(f"--- {r.log.name}\n{r.output()[-2500:]}" for r in self.relays)

    def query(self, sql: str, *args: object) -> list[asyncpg.Record]:
        async def run() -> list[asyncpg.Record]:
            conn = await asyncpg.connect(self.db_url)
            try:
                return list(await conn.fetch(sql, *args))
            finally:
                await conn.close()

        return asyncio.run(run())

    def outbox(self) -> Counter[Identity]:
        rows = self.query("SELECT kind, data FROM outbox")
        return Counter(data_identity(str(r[0]), bytes(r[1])) for r in rows)

    def settle(self, timeout_s: float = 120) -> set[str]:
        """Stop new activity; wait until the outbox holds the truth, once each, and the webhook
        received every committed event; returns the committed event ids."""
        self.sim.advance(3600)
        truth = self.sim.truth()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = self.outbox()
            ids = {str(r[0]) for r in self.query("SELECT event_id FROM outbox")}
            if got == truth and ids <= set(self.receiver.ids()):
                return ids
            time.sleep(0.5)
        missing, extra = truth - got, got - truth
        unsent = ids - set(self.receiver.ids())
        raise AssertionError(
            f"outbox: {len(missing)} missing, {len(extra)} extra; webhook: {len(unsent)} not"
            f" received\n{self.logs()}"
        )

    def kafka_ids(self, expected: set[str], timeout_s: float = 60) -> Counter[str]:
        """Event ids on the topics once every expected one is there (duplicates kept)."""
        return Counter(ce_id for _, _, ce_id in self.kafka_records(expected, timeout_s))

    def kafka_records(
        self, expected: set[str], timeout_s: float = 60
    ) -> list[tuple[str, int, str]]:
        """(topic, partition, ce_id) of every record in offset order, once every expected
        event id is there."""
        topics = [f"{self.prefix}.ctct.email.{k}" for k in KINDS]
        deadline = time.monotonic() + timeout_s
        while True:
            messages = asyncio.run(consume_all(self.kafka, topics, idle_s=2.0))
            records = [
                (m[0], m[4], dict(m[2])["ce_id"].decode())
                for m in sorted(messages, key=lambda m: (m[0], m[4], m[5]))
            ]
            if {r[2] for r in records} >= expected or time.monotonic() > deadline:
                return records
            time.sleep(1)

    def key_stats(self) -> dict[str, object]:
        stats = self.sim.get("/_sim/stats")
        keys = stats["keys"]
        assert isinstance(keys, dict)
        return {**keys[KEY], "overlapping": stats["overlapping"]}

    def passes_by_replica(self) -> list[int]:
        return [r.output().count('"poll.pass"') for r in self.relays]

    def held(self, lease: str, timeout_s: float = 30) -> str:
        """The replica holding ``lease``, once one does (within ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while (holder := self.holder(lease)) is None:
            assert time.monotonic() < deadline, self.logs()
            time.sleep(0.2)
        return holder

    def holder(self, lease: str) -> str | None:
        rows = self.query(
            "SELECT owner FROM leases WHERE name = $1 AND expires_ms >"
            " (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::bigint",
            lease,
        )
        return str(rows[0][0]) if rows else None

    def relay_of(self, replica: str) -> Proc:
        pid = int(replica.rsplit("-", 2)[1])
        [relay] = [r for r in self.relays if r.popen is not None and r.popen.pid == pid]
        return relay


def run_activity(deployment: Deployment, rounds: int, pause_s: float = 1.5) -> None:
    for _ in range(rounds):
        deployment.sim.advance(600)
        time.sleep(pause_s)


def assert_budget_and_no_overlap(deployment: Deployment) -> None:
    stats = deployment.key_stats()
    assert stats["overlapping"] == 0, "a stream was polled by two replicas at once"
    assert stats["max_per_1s"] <= 4, stats  # the account's 4/s, for all replicas together
    assert stats["rejected"] == {}, stats
    [counted] = deployment.query("SELECT COALESCE(SUM(used), 0) FROM quota")
    served = stats["served"]
    assert isinstance(served, int)
    # every request of every replica was counted before it was sent, against one daily quota
    assert served <= int(counted[0]) <= 9000, (served, counted[0])


def test_three_replicas_share_the_work_and_deliver_everything(
    tmp_path: Path, postgres_url: str, kafka_bootstrap: str, receiver: CountingReceiver
) -> None:
    """Three replicas: every ground-truth activity reaches Kafka (in commit order per partition:
    one publisher) and the webhook (within its concurrency limit: one sender), no stream is
    polled by two at once, the API budget holds for all of them, each webhook is declared once."""
    # a long lease: no takeover under a loaded machine's slow renewals, so one publisher
    deployment = Deployment(
        tmp_path, postgres_url, kafka_bootstrap, receiver, replicas=3, lease_s=10
    )
    try:
        run_activity(deployment, rounds=4)
        ids = deployment.settle()
        records = deployment.kafka_records(ids)
        assert_budget_and_no_overlap(deployment)
        assert all(r.alive() for r in deployment.relays), deployment.logs()
        passes = deployment.passes_by_replica()
        hooks = deployment.query("SELECT COUNT(*) FROM webhooks")[0][0]
        seq = {str(r[0]): int(r[1]) for r in deployment.query("SELECT event_id, seq FROM outbox")}
    finally:
        deployment.stop()
    assert Counter(ce_id for _, _, ce_id in records) == Counter(ids)  # each once
    for partition in {(topic, p) for topic, p, _ in records}:
        order = [seq[ce_id] for topic, p, ce_id in records if (topic, p) == partition]
        assert order == sorted(order), f"{partition}: published out of commit order"
    assert receiver.bad_signatures == 0
    assert 1 <= receiver.max_inflight <= WEBHOOK_CONCURRENCY
    assert hooks == 1  # declared by three replicas at once, created once
    assert sum(1 for n in passes if n > 0) >= 2, passes  # the work was shared


def test_a_killed_replica_is_taken_over_within_the_lease(
    tmp_path: Path, postgres_url: str, kafka_bootstrap: str, receiver: Receiver
) -> None:
    """SIGKILL the replica publishing to Kafka mid-run: another takes the Kafka sink over within
    the lease expiry and the dead one's streams are polled again; nothing is lost."""
    deployment = Deployment(tmp_path, postgres_url, kafka_bootstrap, receiver, replicas=3)
    try:
        run_activity(deployment, rounds=2)
        holder = deployment.held("sink:kafka")
        victim = deployment.relay_of(holder)
        streams = deployment.query("SELECT id FROM streams WHERE lease_owner = $1", holder)
        deployment.sim.advance(600)
        victim.kill()
        killed = time.monotonic()
        while (successor := deployment.holder("sink:kafka")) in (None, holder):
            assert time.monotonic() - killed < LEASE_S + 5, deployment.logs()
            time.sleep(0.1)
        taken_over_s = time.monotonic() - killed
        run_activity(deployment, rounds=2)
        ids = deployment.settle()
        published = deployment.kafka_ids(ids)
        assert_budget_and_no_overlap(deployment)
        left = deployment.query("SELECT COUNT(*) FROM streams WHERE lease_owner = $1", holder)
        left = left[0][0]
    finally:
        deployment.stop()
    assert successor != holder
    assert taken_over_s < LEASE_S + 5
    assert left == 0, f"streams {streams} still leased by the dead replica"
    assert set(published) == ids  # duplicates may follow a takeover; losses may not


def test_a_postgresql_restart_loses_nothing(
    tmp_path: Path, kafka_bootstrap: str, receiver: Receiver
) -> None:
    """The database restarts mid-run (every connection cut): the replicas reconnect and carry
    on, and every activity still reaches Kafka and the webhook."""
    cluster = pgkit.Cluster().start()
    print(f"PostgreSQL server log: {cluster.log}")
    db_url = pgkit.fresh_database(cluster.url)
    deployment = Deployment(tmp_path, db_url, kafka_bootstrap, receiver, replicas=2)
    try:
        run_activity(deployment, rounds=2)
        deployment.sim.advance(600)
        cluster.stop()
        time.sleep(2)  # replicas see the outage: errors, retries, no exit
        cluster.start()
        run_activity(deployment, rounds=2)
        ids = deployment.settle()
        published = deployment.kafka_ids(ids)
        assert all(r.alive() for r in deployment.relays), deployment.logs()
        assert_budget_and_no_overlap(deployment)
        output = "".join(r.output() for r in deployment.relays)
    finally:
        deployment.stop()
        cluster.destroy()
    assert set(published) == ids
    assert '"store.retry"' in output  # the outage was seen and ridden out
    assert "Traceback" not in output


class CursorWatch:
    """Polls the Kafka sink's cursor every 10 ms in a thread; ``moves`` lists each new value."""

    def __init__(self, db_url: str) -> None:
        self.moves: list[int] = []
        self._done = threading.Event()
        self._db_url = db_url
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()

    async def _run(self) -> None:
        conn = await asyncpg.connect(self._db_url)
        try:
            while not self._done.is_set():
                seq = await conn.fetchval("SELECT seq FROM sink_cursors WHERE sink = 'kafka'")
                if seq is not None and (not self.moves or self.moves[-1] != seq):
                    self.moves.append(int(seq))
                await asyncio.sleep(0.01)
        finally:
            await conn.close()

    def stop(self) -> list[int]:
        self._done.set()
        self._thread.join(10)
        return self.moves


def test_a_paused_kafka_publisher_sends_nothing_more_after_a_takeover(
    tmp_path: Path, postgres_url: str, kafka_dist: KafkaDist, receiver: Receiver
) -> None:
    """The replica publishing to Kafka is paused (SIGSTOP) with a round in flight, past its
    lease; the other takes the sink over and publishes past it. Resumed (SIGCONT), the paused
    one sends nothing beyond the round in flight when it was paused, and the shared cursor never
    moves back (it settled its old round and wrote the cursor back from 341 to 155, and sent
    again events the successor had published and recorded: rev9)."""
    # a private broker: it is paused too, so the holder's last round is unacknowledged
    broker = DevKafka(kafka_dist, tmp_path / "kafka", num_partitions=3)
    asyncio.run(broker.start())
    deployment = Deployment(tmp_path, postgres_url, broker.bootstrap_servers, receiver, 2)
    watch: CursorWatch | None = None
    try:
        run_activity(deployment, rounds=2)
        holder = deployment.held("sink:kafka")
        victim = deployment.relay_of(holder)
        assert victim.popen is not None
        assert broker.pid is not None
        time.sleep(2)  # the outbox drains
        watch = CursorWatch(postgres_url)
        os.kill(broker.pid, signal.SIGSTOP)  # the next round stays unacknowledged for now
        deployment.sim.advance(600)
        time.sleep(1.0)  # a round goes to the paused broker
        os.kill(victim.popen.pid, signal.SIGSTOP)
        [[head]] = deployment.query("SELECT COALESCE(MAX(seq), 0) FROM outbox")
        paused = time.monotonic()
        os.kill(broker.pid, signal.SIGCONT)
        deployment.sim.advance(600)  # new activity for the successor alone
        while (successor := deployment.holder("sink:kafka")) in (None, holder):
            assert time.monotonic() - paused < LEASE_S + 10, deployment.logs()
            time.sleep(0.1)
        # the successor publishes everything committed, then the old holder resumes
        deadline = time.monotonic() + 30
        while True:
            [[cursor, top]] = deployment.query(
                "SELECT (SELECT seq FROM sink_cursors WHERE sink = 'kafka'),"
                " (SELECT COALESCE(MAX(seq), 0) FROM outbox)"
            )
            if cursor == top and cursor > head and time.monotonic() - paused > 2 * LEASE_S:
                break
            assert time.monotonic() < deadline, deployment.logs()
            time.sleep(0.1)
        os.kill(victim.popen.pid, signal.SIGCONT)
        time.sleep(3)  # the resumed replica settles its round and stops publishing
        moves = watch.stop()
        sql = "SELECT event_id, seq FROM outbox"
        committed = {str(r[0]) for r in deployment.query(sql)}
        records = deployment.kafka_records(committed)
        # read again: late activity may have been committed (and published) meanwhile
        seqs = {str(r[0]): int(r[1]) for r in deployment.query(sql)}
        resumed = victim.output()
    finally:
        if watch is not None:
            watch.stop()
        deployment.stop()
        asyncio.run(broker.stop())
    assert successor != holder
    assert moves == sorted(moves), f"the Kafka cursor moved back: {moves}"
    counts = Counter(seqs[ce_id] for _, _, ce_id in records)
    assert {seqs[ce_id] for ce_id in committed} <= set(counts)  # nothing lost
    # sent twice: at most the paused holder's round in flight (the successor sent it again)
    again = sorted(seq for seq, n in counts.items() if n > 1 and seq > head)
    assert again == [], f"published again beyond the round in flight (head {head}): {again}"
    assert '"lease.lost"' in resumed or '"kafka.lease_ran_out"' in resumed, resumed[-3000:]
