"""What only the PostgreSQL store has to do: outages, concurrent replicas, ordered outbox."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from relay.config import ConfigError, load
from relay.events import WILDCARD, Activity, Kind, from_millis
from relay.store import (
    Attempt,
    CorruptError,
    PostgresSettings,
    PostgresStore,
    StoreError,
    StreamKey,
    UnavailableError,
    Webhook,
    open_store,
    wait_budget,
)
from relay.store.migrations import MIGRATIONS
from relay.store.pg_migrations import PG_MIGRATIONS
from relay.store.postgres import LOCK_MIGRATE, LOCK_NS
from tests import pgkit
from tests.procs import free_port

T0 = 1_763_000_000_000


def activity(contact: int, ms: int) -> Activity:
    return Activity(
        account="acme",
        kind=Kind.OPEN,
        campaign_id="1100394165290",
        contact_id=str(contact),
        email_address=f"c{contact}@example.com",
        occurred_at=from_millis(ms),
    )


def test_schema_versions_match_sqlite() -> None:
    """Both backends know the same schema versions, so neither can drift behind the other."""
    assert len(PG_MIGRATIONS) == len(MIGRATIONS)


async def test_unreachable_server_is_a_store_error_naming_it() -> None:
    """No server: a StoreError naming host, port and database (never the password), after the
    bounded reconnect time."""
    port = free_port()
    store = PostgresStore.from_url(
        f"postgresql://relay:pw-hidden-7@127.0.0.1:{port}/relaydb",
        PostgresSettings(reconnect_max_s=1.0, connect_timeout_s=1.0),
    )
    started = time.monotonic()
    with pytest.raises(StoreError, match=f"127.0.0.1:{port}/relaydb") as caught:
        await store.open()
    assert time.monotonic() - started < 10
    assert "pw-hidden-7" not in str(caught.value)
    await store.close()


async def test_a_url_asyncpg_refuses_is_a_store_error_at_once() -> None:
    """asyncpg's ClientConfigurationError (an InterfaceError, so retriable before) comes from
    the URL, not the network: it fails the first attempt instead of being retried for
    reconnect_max_s as if the server were down. (The config refuses each of these values on its
    own; this pair only asyncpg does.)"""
    port = free_port()
    store = PostgresStore.from_url(
        f"postgresql://relay:pw-hidden-7@127.0.0.1:{port}/relaydb"
        "?sslnegotiation=direct&sslmode=disable",
        PostgresSettings(reconnect_max_s=30.0, connect_timeout_s=1.0),
    )
    started = time.monotonic()
    with pytest.raises(StoreError) as caught:
        await store.open()
    assert time.monotonic() - started < 5
    assert not isinstance(caught.value, UnavailableError)
    message = str(caught.value)
    assert message.startswith(
        f"state store (PostgreSQL at 127.0.0.1:{port}/relaydb): connect refused by the client:"
        " ClientConfigurationError: direct TLS requires sslmode=require"
    ), message
    assert "pw-hidden-7" not in message
    await store.close()


@pytest.mark.parametrize(
    ("sqlstate", "condition", "mend"),
    [
        pytest.param("XX001", "data_corrupted", "restore the database from a backup", id="data"),
        pytest.param(
            "XX002", "index_corrupted", "rebuild the index it names (REINDEX)", id="index"
        ),
    ],
)
async def test_damage_the_server_reports_is_a_corrupt_error_that_ends_the_store(
    postgres_url: str, sqlstate: str, condition: str, mend: str
) -> None:
    """SQLSTATE XX001/XX002 (a damaged page or index) was a StoreError like any other: every
    pass failed on it while the replica stayed ready. Now it is a CorruptError naming the
    SQLSTATE, the server and what to do (never the password); the listeners hear it once, and
    every later call is refused, also one the damage would not touch."""
    # trust authentication: the server never asks for this password, so the URL may hold one
    url = postgres_url.replace("postgres@", "postgres:pw-hidden-7@", 1)
    store = PostgresStore.from_url(url)
    heard: list[StoreError] = []
    store.on_fatal(heard.append)
    await store.open()
    try:
        await store.ensure_streams([StreamKey("acme", "campaign", "1")], T0)
        [stream] = await store.streams()
        words = await store.transaction(
            lambda conn: pgkit.damage_on_insert(conn, "outbox", sqlstate)
        )
        with pytest.raises(CorruptError) as found:
            await store.commit_page(stream.id, [activity(1, T0)], T0)
        message = str(found.value)
        assert message.startswith(
            f"state store (PostgreSQL at {store.where}) is corrupt"
            f" (SQLSTATE {sqlstate} {condition}: {words}): "
        ), message
        assert "Check the server: its log names the damaged relation" in message
        assert mend in message
        assert "pw-hidden-7" not in message
        assert isinstance(found.value.__cause__, asyncpg.exceptions.InternalServerError)
        assert heard == [found.value]
        with pytest.raises(CorruptError) as refused:
            await store.schema_version()  # reads what is intact: refused all the same
        assert str(refused.value) == message
        assert heard == [found.value]
    finally:
        await store.close()


async def test_an_internal_error_is_a_plain_store_error(postgres_url: str) -> None:
    """SQLSTATE XX000 internal_error (the server's own failure, of many kinds) fails its call
    alone: a StoreError, not a CorruptError, the listeners hear nothing, the next call runs."""
    store = PostgresStore.from_url(postgres_url)
    heard: list[StoreError] = []
    store.on_fatal(heard.append)
    await store.open()
    try:
        with pytest.raises(StoreError) as failed:
            await store.transaction(
                lambda conn: conn.execute(
                    "DO $$ BEGIN RAISE EXCEPTION 'cache lookup failed for type 0'"
                    " USING ERRCODE = 'XX000'; END $$"
                )
            )
        assert not isinstance(failed.value, CorruptError)
        assert heard == []
        assert await store.schema_version() == len(PG_MIGRATIONS)
    finally:
        await store.close()


ACCOUNT = """
accounts:
  - {name: acme, base_url: "https://api.example.com", api_key: k, access_token: t}
"""


async def _opens_and_works(tmp_path: Path, url: str) -> tuple[PostgresStore, asyncpg.Record]:
    """The store of a config whose state is ``url``, opened: it commits and reads a page, and
    its LISTEN connection (a connect of its own) comes up. Returns it closed, with the address
    and port its connection reached (None, None through a Unix socket)."""
    path = tmp_path / "relay.yaml"
    path.write_text(ACCOUNT + f"state: '{url}'\n")
    settings = load(path, environ={})
    store = open_store(settings.state, settings.postgres)
    assert isinstance(store, PostgresStore)
    await store.open()
    woken, stop = asyncio.Event(), asyncio.Event()
    listening = asyncio.create_task(store.listen_commits(woken.set, stop))
    try:
        await store.ensure_streams([StreamKey("acme", "campaign", "1")], T0)
        [stream] = await store.streams()
        assert await store.commit_page(stream.id, [activity(1, T0), activity(2, T0)], T0) == 2
        assert [e.contact_id for e in await store.read_outbox(0, 10)] == ["1", "2"]
        await asyncio.wait_for(woken.wait(), 10)  # the wake-up on connecting
        reached = await store.transaction(
            lambda conn: conn.fetchrow("SELECT inet_server_addr()::text, inet_server_port()")
        )
    finally:
        stop.set()
        await asyncio.wait_for(listening, 10)
        await store.close()
    return store, reached


async def test_a_url_with_several_hosts_tries_them_in_order(
    postgres_url: str, tmp_path: Path
) -> None:
    """postgresql://h1:p1,h2:p2/db?target_session_attrs=read-write (an HA pair, as libpq and
    asyncpg take it) was refused at load ("the port is not a number"). Now it loads and the
    store tries the hosts in order: the first, a closed port, refuses the connection; the
    second is the server, where the store opens and works. Messages name both hosts."""
    closed = free_port()
    scheme, _, rest = postgres_url.partition("://")
    auth, at, server = rest.rpartition("@")
    url = f"{scheme}://{auth}{at}127.0.0.1:{closed},{server}?target_session_attrs=read-write"
    store, _reached = await _opens_and_works(tmp_path, url)
    assert store.where == f"127.0.0.1:{closed},{server}"


async def test_a_unix_socket_directory_in_the_query_is_a_host(tmp_path: Path) -> None:
    """?host=/a/socket/directory&port=… (and ?host= lists, tried in order) was refused at load
    ("names no host"). Now it loads, and the store connects through the cluster's socket after
    a closed port on 127.0.0.1; messages do not show the query's values."""
    cluster = pgkit.Cluster().start()
    try:
        closed = free_port()
        url = (
            f"postgresql://postgres@/postgres?host=127.0.0.1,{cluster.root}"
            f"&port={closed},{cluster.port}"
        )
        store, reached = await _opens_and_works(tmp_path, url)
        assert store.where == "?host=…/postgres"
        assert tuple(reached) == (None, None)  # the socket, not TCP
    finally:
        cluster.destroy()


async def test_a_url_with_no_host_takes_the_default_hosts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """postgresql://user@/database (no host: libpq's default) was refused at load ("names no
    host"), though asyncpg takes it as libpq does: $PGHOST, else the local socket directories,
    then localhost. Now it loads and the store works: with ?port= and no $PGHOST through
    localhost (no default socket directory holds this cluster's socket), and with $PGHOST and
    $PGPORT alone through the socket in the directory $PGHOST names."""
    cluster = pgkit.Cluster().start()
    try:
        monkeypatch.delenv("PGHOST", raising=False)
        monkeypatch.delenv("PGPORT", raising=False)
        first = (await pgkit.create_database(cluster.url)).rpartition("/")[2]
        url = f"postgresql://postgres@/{first}?port={cluster.port}"
        store, reached = await _opens_and_works(tmp_path, url)
        assert store.where == f"the default host/{first}"
        assert reached[1] == cluster.port  # TCP, to localhost
        monkeypatch.setenv("PGHOST", str(cluster.root))
        monkeypatch.setenv("PGPORT", str(cluster.port))
        second = (await pgkit.create_database(cluster.url)).rpartition("/")[2]
        _store, reached = await _opens_and_works(tmp_path, f"postgresql://postgres@/{second}")
        assert tuple(reached) == (None, None)  # the socket
    finally:
        cluster.destroy()


async def test_a_database_given_by_dbname_is_the_one_connected(
    postgres_url: str, tmp_path: Path
) -> None:
    """postgresql://user@host:port?dbname=database (no path, as libpq and asyncpg both read it)
    was refused at load ("names no database"). Now it loads and the store works in that
    database; messages show ?dbname=…, not its value. After a bare '/' asyncpg ignores
    ?dbname= and connects to the database named like the user, so that URL stays refused,
    saying so."""
    base, _, name = postgres_url.partition("?")[0].rpartition("/")
    url = f"{base}?dbname={name}"
    store, _reached = await _opens_and_works(tmp_path, url)
    assert store.where == f"{base.rpartition('@')[2]}/?dbname=…"
    await store.open()
    try:
        assert (
            await store.transaction(lambda conn: conn.fetchval("SELECT current_database()")) == name
        )
    finally:
        await store.close()
    slash = f"{base}/?dbname={name}"
    path = tmp_path / "slash.yaml"
    path.write_text(ACCOUNT + f"state: '{slash}'\n")
    with pytest.raises(ConfigError, match=r"state: \?dbname= is ignored by asyncpg after a '/'"):
        load(path, environ={})
    conn = await asyncpg.connect(slash)  # what the refusal says asyncpg does
    try:
        assert await conn.fetchval("SELECT current_database() = current_user") is True
        assert await conn.fetchval("SELECT current_database()") != name
    finally:
        await conn.close()


async def _relay_connections(
    admin: asyncpg.Connection, database: str, wanted: Callable[[int], bool]
) -> int:
    """How many connections the store has to ``database`` (pg_stat_activity), once ``wanted``
    holds for that number or after 10 s (a closed connection's backend leaves a moment later)."""
    deadline = time.monotonic() + 10
    while True:
        count: int = await admin.fetchval(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = $1"
            " AND application_name = 'ctct-relay'",
            database,
        )
        if wanted(count) or time.monotonic() > deadline:
            return count
        await asyncio.sleep(0.05)  # the server's view: no event to wait on


async def test_an_open_cancelled_after_the_pool_started_closes_it(postgres_url: str) -> None:
    """An open cancelled while its migration waited (another replica migrating: the advisory
    lock held) kept its pool, and its connections stayed open on the server until the process
    exited (the relay closes only a store that opened). Now the open closes the pool first."""
    database = postgres_url.partition("?")[0].rpartition("/")[2]
    # pg_stat_activity is read once per transaction: the watcher is not the lock's holder
    admin, holder = await asyncpg.connect(postgres_url), await asyncpg.connect(postgres_url)
    try:
        async with holder.transaction():
            await holder.execute("SELECT pg_advisory_xact_lock($1, $2)", LOCK_NS, LOCK_MIGRATE)
            store = PostgresStore.from_url(postgres_url, PostgresSettings(pool_min_size=2))
            opening = asyncio.create_task(store.open())
            # the pool is up, its migration waits for the lock
            assert await _relay_connections(admin, database, lambda n: n == 2) == 2
            assert not opening.done()
            opening.cancel()
            with pytest.raises(asyncio.CancelledError):
                await opening
        assert await _relay_connections(admin, database, lambda n: n == 0) == 0
        await store.close()  # closing a store that did not open is fine
    finally:
        await admin.close()
        await holder.close()


async def test_an_open_that_fails_after_the_pool_started_closes_it(postgres_url: str) -> None:
    """An open whose migration fails (a schema newer than this relay knows) raised its
    StoreError and kept its pool's connections open; now it closes them first."""
    database = postgres_url.partition("?")[0].rpartition("/")[2]
    admin = await asyncpg.connect(postgres_url)
    try:
        await admin.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY)")
        await admin.execute("INSERT INTO schema_version VALUES ($1)", len(PG_MIGRATIONS) + 1)
        store = PostgresStore.from_url(postgres_url)
        with pytest.raises(StoreError, match="is newer than this relay knows"):
            await store.open()
        assert await _relay_connections(admin, database, lambda n: n == 0) == 0
    finally:
        await admin.close()


async def test_killed_connections_are_replaced_and_nothing_is_lost(postgres_url: str) -> None:
    """Every connection of the pool killed by the server: the next calls reconnect and see all
    that was committed before."""
    store = PostgresStore.from_url(postgres_url, PostgresSettings(pool_min_size=3))
    await store.open()
    try:
        await store.ensure_streams([StreamKey("acme", "campaign", "1")], T0)
        [stream] = await store.streams()
        assert await store.commit_page(stream.id, [activity(1, T0), activity(2, T0)], T0) == 2
        admin = await asyncpg.connect(postgres_url)
        try:
            killed = await admin.fetchval(
                "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        finally:
            await admin.close()
        assert killed >= 1
        assert await store.commit_page(stream.id, [activity(2, T0), activity(3, T0)], T0) == 1
        assert [e.contact_id for e in await store.read_outbox(0, 10)] == ["1", "2", "3"]
    finally:
        await store.close()


async def test_replicas_migrate_once_and_append_in_order(postgres_url: str) -> None:
    """Three stores opened at once on a new database migrate it once; while they commit pages
    concurrently, a reader following ``seq > cursor`` (as sinks do) never skips an event."""
    stores = [PostgresStore.from_url(postgres_url) for _ in range(3)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        assert {await s.schema_version() for s in stores} == {len(PG_MIGRATIONS)}
        # replicas asking at once for the budget names' salt all get the one made first
        assert len(set(await asyncio.gather(*(s.budget_salt() for s in stores)))) == 1
        await stores[0].ensure_streams([StreamKey("acme", "campaign", str(i)) for i in range(3)], 0)
        ids = [s.id for s in await stores[0].streams()]
        pages, per_page = 40, 25

        async def writer(n: int) -> None:
            for page in range(pages):
                batch = [
                    activity(n * 100_000 + page * per_page + i, T0 + i) for i in range(per_page)
                ]
                await stores[n].commit_page(ids[n], batch, T0)

        seen: list[int] = []
        writing = asyncio.gather(*(writer(n) for n in range(3)))

        async def reader() -> None:
            cursor = 0
            while True:
                done = writing.done()
                events = await stores[0].read_outbox(cursor, 500)
                seen.extend(e.seq for e in events)
                cursor = events[-1].seq if events else cursor
                if done and not events:
                    return
                await asyncio.sleep(0)

        await asyncio.gather(writing, reader())
        assert len(seen) == 3 * pages * per_page
        assert seen == sorted(set(seen))
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def _waiting_on_a_lock(url: str, query_start: str) -> None:
    """Return once another backend's statement starting with ``query_start`` waits on a lock."""
    admin = await asyncpg.connect(url)
    try:
        for _ in range(200):
            waiting = await admin.fetchval(
                "SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND query LIKE $1 AND pid <> pg_backend_pid()",
                query_start + "%",
            )
            if waiting:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"no statement {query_start!r} came to wait on a lock")
    finally:
        await admin.close()


async def test_a_webhook_registered_during_a_fanout_gets_every_event_after_its_start(
    postgres_url: str,
) -> None:
    """A webhook receives every event with seq > its start_seq. Its registration read the outbox
    head, then inserted the webhook: a fan-out on another replica running in between (events
    committed meanwhile) read the webhooks without the new one and moved its cursor past those
    events, which the webhook, though owed them by its start_seq, never received."""
    store = PostgresStore.from_url(postgres_url)
    await store.open()
    blocker = await asyncpg.connect(postgres_url)
    try:
        await store.ensure_streams([StreamKey("acme", "campaign", "1")], T0)
        [stream] = await store.streams()
        await store.commit_page(stream.id, [activity(1, T0)], T0)
        assert await store.fanout(100, T0) == 1
        # An uncommitted registration of the same URL holds the new one's INSERT (the unique
        # index): the window between its head read and its commit, held open.
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute(
            "INSERT INTO webhooks (id, url, event_types, secret, start_seq, created_ms,"
            " updated_ms) VALUES ('wh_other', 'https://example.com/h', '[]', 's', 0, 0, 0)"
        )
        registering = asyncio.create_task(
            store.create_webhook(
                Webhook(id="wh_1", url="https://example.com/h", event_types=(WILDCARD,), secret="s")
            )
        )
        await _waiting_on_a_lock(postgres_url, "INSERT INTO webhooks")
        await store.commit_page(stream.id, [activity(2, T0 + 1), activity(3, T0 + 2)], T0)
        fanning = asyncio.create_task(store.fanout(100, T0))
        await asyncio.sleep(0.3)  # the fan-out runs now (or waits for the registration)
        await tx.rollback()
        created = await registering
        await fanning
        await store.fanout(100, T0)
        owed = {e.seq for e in await store.read_outbox(created.start_seq, 100)}
        assert owed  # the events committed during the registration
        delivered = {d.seq for d in await store.deliveries(created.id, 100)}
        assert delivered == owed
    finally:
        await blocker.close()
        await store.close()


async def test_a_replica_waits_for_a_long_migration_instead_of_failing(postgres_url: str) -> None:
    """Replicas that start together wait for the one applying the migrations (their advisory
    lock), and a migration's statements run as long as they take: neither is cut off by
    ``statement_timeout_s``, meant for the store's calls. Cut off, the waiting replica failed
    to start whenever a migration took longer, and a migration longer than it (an index on a
    large table) could never be applied at all."""
    holder = await asyncpg.connect(postgres_url)
    store = PostgresStore.from_url(postgres_url, PostgresSettings(statement_timeout_s=0.2))
    try:
        await holder.execute("SELECT pg_advisory_lock($1, $2)", LOCK_NS, LOCK_MIGRATE)
        opening = asyncio.create_task(store.open())
        await asyncio.sleep(1.0)  # another replica migrating for five statement timeouts
        await holder.execute("SELECT pg_advisory_unlock($1, $2)", LOCK_NS, LOCK_MIGRATE)
        await asyncio.wait_for(opening, 30)
        assert await store.schema_version() == len(PG_MIGRATIONS)
        # the store's own calls keep their limit
        with pytest.raises(StoreError, match="statement timeout"):
            await store.transaction(lambda conn: conn.execute("SELECT pg_sleep(1)"))
    finally:
        await holder.close()
        await store.close()


async def test_commits_of_another_replica_wake_a_listener(postgres_url: str) -> None:
    """A commit in one store wakes the other store's listener promptly, also after the
    listener's connection was cut (it reconnects)."""
    writer, reader = PostgresStore.from_url(postgres_url), PostgresStore.from_url(postgres_url)
    await writer.open()
    await reader.open()
    woken = asyncio.Event()
    stop = asyncio.Event()
    listening = asyncio.create_task(reader.listen_commits(woken.set, stop))
    try:
        await writer.ensure_streams([StreamKey("acme", "campaign", "1")], T0)
        [stream] = await writer.streams()
        for round_ in range(2):
            await asyncio.wait_for(woken.wait(), 5)  # the wake-up on (re)connecting
            woken.clear()
            await writer.commit_page(stream.id, [activity(round_, T0)], T0)
            await asyncio.wait_for(woken.wait(), 2)
            woken.clear()
            admin = await asyncpg.connect(postgres_url)
            try:
                await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE application_name = 'ctct-relay-listen'"
                )
            finally:
                await admin.close()
    finally:
        stop.set()
        await asyncio.wait_for(listening, 10)
        await writer.close()
        await reader.close()


async def _fails_after(call: Awaitable[object]) -> tuple[float, UnavailableError]:
    started = time.monotonic()
    with pytest.raises(UnavailableError) as caught:
        await call
    return time.monotonic() - started, caught.value


async def test_a_wait_budget_gives_up_early_only_before_a_change_is_committed() -> None:
    """Under a wait budget, a call to an unreachable server gives up at the budget's deadline
    (``unchanged``: nothing of the unit of work was sent to COMMIT), not after reconnect_max_s;
    reads do not count as changes. Once a transaction that wrote has committed, the unit's
    later calls run their full reconnect_max_s, so a unit of work is never cut short
    half-applied."""
    cluster = pgkit.Cluster().start()
    try:
        url = pgkit.fresh_database(cluster.url)
        store = PostgresStore.from_url(url, PostgresSettings(reconnect_max_s=6))
        await store.open()
        try:
            with wait_budget(1.5) as writing:
                await store.streams()
                assert not writing.committing  # a read is no change
                await store.ensure_streams([StreamKey("acme", "campaign", "1")], T0)
                assert writing.committing
                cluster.stop()
                late_s, late = await _fails_after(store.streams())
            with wait_budget(1.5) as reading:
                early_s, early = await _fails_after(store.streams())
            assert not reading.committing
        finally:
            await store.close()
    finally:
        cluster.destroy()
    assert 5 < late_s < 9
    assert not late.unchanged
    assert 0.5 < early_s < 2.5
    assert early.unchanged
    assert "gave up after 1.5s" in str(early)


async def test_an_attempt_recorded_while_its_webhook_is_being_deleted_is_skipped(
    postgres_url: str,
) -> None:
    """A webhook deleted (on another replica, not yet committed) while one of its attempts is
    recorded: the record waits for the delete and skips the delivery gone with it. It used to
    see the delivery still there, insert the attempt and fail the batch on the foreign key."""
    store = PostgresStore.from_url(postgres_url)
    await store.open()
    deleting = await asyncpg.connect(postgres_url)
    try:
        await store.ensure_streams([StreamKey("acme", "campaign", "1")], T0)
        [stream] = await store.streams()
        await store.create_webhook(
            Webhook(id="wh_1", url="https://example.com/h", event_types=(WILDCARD,), secret="s")
        )
        await store.commit_page(stream.id, [activity(1, T0)], T0)
        await store.fanout(100, T0)
        [delivery] = await store.deliveries("wh_1", 10)
        tx = deleting.transaction()
        await tx.start()
        await deleting.execute("DELETE FROM webhooks WHERE id = 'wh_1'")
        recording = asyncio.create_task(
            store.finish_attempts([(Attempt(delivery.id, T0, 200, 1.0), "delivered", T0, 0)])
        )
        await _waiting_on_a_lock(postgres_url, "INSERT INTO attempts")
        await tx.commit()
        await asyncio.wait_for(recording, 10)  # no StoreError (foreign key violation)
        assert await store.attempts(delivery.id) == []
    finally:
        await deleting.close()
        await store.close()


class _CommitCutter:
    """A TCP proxy to the server that, once ``armed``, passes the next COMMIT on and cuts its
    connection before the server's answer reaches the client: a commit that went through,
    its answer lost."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 5432
        self._url = parts
        self.armed = False
        self.cut = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        """Start listening; the URL through the proxy."""
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        netloc = f"{self._url.username}@127.0.0.1:{port}"
        return urlunsplit(self._url._replace(netloc=netloc))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self._host, self._port)
        cut = asyncio.Event()

        async def upstream() -> None:
            while data := await reader.read(65536):
                if self.armed and b"COMMIT" in data:
                    self.armed = False
                    cut.set()  # before it is sent: no part of the answer goes back
                up_writer.write(data)
                await up_writer.drain()

        async def downstream() -> None:
            while data := await up_reader.read(65536):
                if cut.is_set():
                    self.cut.set()  # the server answered: it committed; the answer is dropped
                    return
                writer.write(data)
                await writer.drain()

        tasks = {asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())}
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            writer.transport.abort()
            up_writer.transport.abort()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_registration_whose_commit_answer_was_lost_is_answered_with_the_webhook(
    postgres_url: str,
) -> None:
    """The connection breaks after the server committed a new webhook but before the answer
    came back: the store's retry answers with that webhook (its secret with it). It used to
    insert it again and fail as a duplicate of itself, the webhook registered but its secret
    never shown."""
    cutter = _CommitCutter(postgres_url)
    store = PostgresStore.from_url(await cutter.start())
    await store.open()
    try:
        cutter.armed = True
        webhook = Webhook(
            id="wh_1", url="https://example.com/h", event_types=(WILDCARD,), secret="whsec_1"
        )
        created = await asyncio.wait_for(store.create_webhook(webhook, max_webhooks=1), 30)
        assert cutter.cut.is_set()  # the answer of its COMMIT was lost indeed
        assert (created.id, created.secret) == ("wh_1", "whsec_1")
        assert [w.id for w in await store.webhooks()] == ["wh_1"]
    finally:
        await store.close()
        await cutter.close()
