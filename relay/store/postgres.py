"""The shared state store on PostgreSQL (asyncpg): the same semantics as the SQLite store, for
several relay replicas at once.

Every call is one transaction on a pooled connection. A connection that breaks (the server
restarts, the network drops) rolls its transaction back on the server, so nothing half-written
survives; the call is retried on a fresh connection with bounded, logged backoff for up to
``reconnect_max_s`` (or until the deadline of a :func:`relay.store.budget.wait_budget`, while no
writing transaction of its unit of work has sent COMMIT), then fails with a :class:`StoreError`
naming the server. A connect asyncpg refuses for the URL or its settings
(``ClientConfigurationError``: ``?sslnegotiation=direct&sslmode=disable``) is no outage: it
fails at once. Retrying a
transaction whose commit went through but whose answer was lost repeats it: every write here is
idempotent or, like the quota count, may over-count but never under-count.

Damage the server reports (SQLSTATE ``XX001 data_corrupted``, ``XX002 index_corrupted``) is a
:class:`CorruptError`, as a damaged SQLite file is: no retry mends it and nothing read from the
database can be trusted, so the store refuses every later call and tells its ``on_fatal``
listeners, and the relay stops instead of running on against a damaged table. ``XX000
internal_error`` stays a plain :class:`StoreError`: the server raises it for its own failures of
many kinds ("cache lookup failed", "could not open file"), most of which are no damage to data.

Outbox appends take one transaction-scoped advisory lock, so sequence numbers become visible in
order: a sink that has read seq N never finds a smaller one committed later.

Webhook fan-out and attempt records and the Kafka sink's cursor commit with ``SET LOCAL
synchronous_commit = off``: they survive a crash of the relay (the server has them), and a crash
of the server can undo only the last few, which means sending again with the same id (see
``Store.finish_attempts``, ``Store.set_sink_cursor``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TypeVar

import asyncpg
import orjson
import structlog
from asyncpg import Connection, Pool

from relay.events import Activity, Kind

# Row shapes are shared with the SQLite store: one definition of each value's columns.
from relay.store import rowmap
from relay.store.base import (
    BUDGET_SALT,
    SPARED_DUE_MS,
    Attempt,
    CorruptError,
    CorruptionLatch,
    DeadLetter,
    Delivery,
    DeliveryCounts,
    DisabledError,
    DueSend,
    DuplicateError,
    GoneError,
    LeaseLostError,
    LimitError,
    NotFoundError,
    OutboxAppend,
    OutboxEvent,
    OutboxRange,
    OutboxSelector,
    Overview,
    PassResult,
    ReplayRequest,
    StoreError,
    Stream,
    StreamFilter,
    StreamKey,
    StreamLease,
    StreamRate,
    StreamStats,
    UnavailableError,
    UnwantedError,
    Webhook,
    disabled_message,
    gone_message,
    lease_lost_message,
    limit_message,
    unwanted_message,
)
from relay.store.budget import WaitBudget, current_budget
from relay.store.pg_migrations import PG_MIGRATIONS
from relay.store.pgurl import describe_url, url_problem

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Advisory lock keys (namespace, key): one namespace for this application's locks.
LOCK_NS = 0x43544354  # "CTCT"
LOCK_OUTBOX = 1
LOCK_MIGRATE = 2
LOCK_FANOUT = 3
# retention deletes (exclusive) against the calls that owe deliveries again (shared): prune's NOT
# EXISTS cannot see a recover's or redeliver's uncommitted pending deliveries, and would delete
# the events they read
LOCK_RETENTION = 4
LOCK_WEBHOOKS = 5  # registrations counted against webhooks.max_webhooks
# How long opening the store may spend on migrations, waiting for another replica's included;
# the client waits a little longer, so the server's own error ends a migration that overruns.
MIGRATE_TIMEOUT_S = 3600.0
_MIGRATE_WAIT_S = MIGRATE_TIMEOUT_S + 5
BUDGET_NS = 0x43544355  # per-account request budget: (BUDGET_NS, hashtext(account))
# the database's clock, in Unix ms: what every replica shares when their own clocks disagree
DB_NOW_MS = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::bigint"
_WROTE = "SELECT txid_current_if_assigned() IS NOT NULL"  # this transaction changed something
COMMITS_CHANNEL = "relay_outbox"  # NOTIFY channel: a transaction appended outbox events

# Errors after which the same transaction may succeed on another connection or a bit later.
RETRIABLE: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,  # a connection the server cut while it was idle
    ConnectionError,
    OSError,
    TimeoutError,
)

# Damage the server found in the data (SQLSTATE class XX but XX000): fatal, see the docstring.
CORRUPT: tuple[type[asyncpg.PostgresError], ...] = (
    asyncpg.exceptions.DataCorruptedError,  # XX001 data_corrupted
    asyncpg.exceptions.IndexCorruptedError,  # XX002 index_corrupted
)
_CONDITIONS = {"XX001": "data_corrupted", "XX002": "index_corrupted"}


@dataclass(frozen=True, slots=True)
class PostgresSettings:
    """Pool, timeouts and reconnects of the PostgreSQL store; leases and the shared budget."""

    pool_min_size: int = 1
    pool_max_size: int = 10
    statement_timeout_s: float = 30.0
    connect_timeout_s: float = 10.0
    reconnect_max_s: float = 60.0  # retry a call this long through an outage, then fail it
    lease_s: float = 15.0  # a dead replica's streams and sinks are taken over after this
    request_margin_s: float = 0.15  # added to each account's one-second window (clock skew)


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def _wait_any(first: asyncio.Event, second: asyncio.Event, timeout_s: float) -> None:
    waits = [asyncio.ensure_future(first.wait()), asyncio.ensure_future(second.wait())]
    try:
        await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
        await asyncio.gather(*waits, return_exceptions=True)


def _count(status: str) -> int:
    """Rows affected, from a command status such as ``UPDATE 3`` or ``INSERT 0 2``."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _corrupt_error(where: str, exc: asyncpg.PostgresError) -> CorruptError:
    """The :class:`CorruptError` of damage the server reported: what happened and what to do."""
    code = f"{exc.sqlstate} {_CONDITIONS.get(exc.sqlstate, '')}".rstrip()
    if isinstance(exc, asyncpg.exceptions.IndexCorruptedError):
        mend = "rebuild the index it names (REINDEX) or restore the database from a backup"
    else:
        mend = "restore the database from a backup"
    return CorruptError(
        f"state store (PostgreSQL at {where}) is corrupt (SQLSTATE {code}: {exc}): nothing read"
        " from it can be trusted, so the relay stops. Check the server: its log names the"
        " damaged relation and block, and pg_amcheck checks the database (a failing disk or"
        f" file system is the usual cause); then, with every replica stopped, {mend}"
    )


class PostgresStore:
    """:class:`relay.store.base.Store` on a PostgreSQL database shared by every replica."""

    def __init__(self, url: str, settings: PostgresSettings | None = None) -> None:
        self._url = url
        self.settings = settings or PostgresSettings()
        self._where = describe_url(url)
        self._pool: Pool | None = None
        self._latch = CorruptionLatch()

    @classmethod
    def from_url(cls, url: str, settings: PostgresSettings | None = None) -> PostgresStore:
        """A store for a ``postgresql://user:password@host:port/database`` URL; a URL asyncpg
        would refuse or misread is a :class:`StoreError` saying why (as at config load)."""
        problem = url_problem(url)
        if problem is not None:
            raise StoreError(f"state: {problem}")  # the caller holds the URL; no secret shown
        return cls(url, settings)

    @property
    def where(self) -> str:
        """The server and database, for messages."""
        return self._where

    # -- connections and transactions -----------------------------------------------------------

    async def open(self) -> None:
        s = self.settings
        timeout_ms = str(int(s.statement_timeout_s * 1000))

        async def create() -> Pool:
            return await asyncpg.create_pool(
                self._url,
                min_size=min(s.pool_min_size, s.pool_max_size),
                max_size=s.pool_max_size,
                timeout=s.connect_timeout_s,
                command_timeout=s.statement_timeout_s + 5,
                server_settings={
                    "statement_timeout": timeout_ms,
                    "application_name": "ctct-relay",
                },
            )

        # an open that fails or is cancelled after the pool started (in the migration, which
        # waits for another replica's) closes the pool: the caller closes only a store that
        # opened (relay.app), so its connections would stay open until the process exits
        self._pool = pool = await self._retrying(create, "connect")
        try:
            await self.transaction(_migrate)
        except BaseException:
            self._pool = None
            pool.terminate()  # no await: a cancelled open may not wait on the server
            raise

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 10)
            except RETRIABLE:
                pool.terminate()

    async def transaction(self, fn: Callable[[Connection], Awaitable[T]]) -> T:
        """Run ``fn`` in one transaction, retrying it through connection failures; refused
        once the database was found damaged (:class:`CorruptError`)."""
        budget = current_budget()

        async def attempt() -> T:
            if self._pool is None:
                raise StoreError("state store is not open")
            async with self._pool.acquire(timeout=self._connect_timeout_s(budget)) as conn:
                try:
                    async with conn.transaction():
                        result = await fn(conn)
                        # COMMIT of a change is next: from here on, giving up early could leave
                        # the unit of work half-applied, or applied after its 503
                        if budget and not budget.committing and await conn.fetchval(_WROTE):
                            budget.note_commit()
                        return result
                except RETRIABLE:
                    conn.terminate()  # never hand a broken connection out again
                    raise

        with self._latch.guard():  # damage found: writing more on top of it can only spread it
            return await self._retrying(attempt, "query")

    async def listen_commits(self, wake: Callable[[], None], stop: asyncio.Event) -> None:
        """Call ``wake`` whenever any process commits outbox events (LISTEN on one connection
        of its own), until ``stop``; reconnects after a lost connection, waking once then for
        whatever was committed meanwhile. Sinks still poll: this only makes them prompt."""
        delay_s = 0.1
        while not stop.is_set():
            try:
                conn = await asyncpg.connect(
                    self._url,
                    timeout=self.settings.connect_timeout_s,
                    server_settings={"application_name": "ctct-relay-listen"},
                )
            except (*RETRIABLE, asyncpg.PostgresError) as exc:
                log.warning("store.listen_retry", server=self._where, error=_reason(exc))
                await _sleep_or_stop(stop, delay_s)
                delay_s = min(delay_s * 2, 5.0)
                continue
            try:
                closed = asyncio.Event()
                conn.add_termination_listener(lambda _conn, lost=closed: lost.set())
                await conn.add_listener(COMMITS_CHANNEL, lambda *_args: wake())
                delay_s = 0.1
                wake()
                while not (stop.is_set() or closed.is_set() or conn.is_closed()):
                    await _wait_any(stop, closed, 5.0)
            except (*RETRIABLE, asyncpg.PostgresError) as exc:
                log.warning("store.listen_retry", server=self._where, error=_reason(exc))
            finally:
                try:
                    await asyncio.wait_for(conn.close(), 5)
                except (*RETRIABLE, asyncpg.PostgresError):
                    conn.terminate()

    def _connect_timeout_s(self, budget: WaitBudget | None) -> float:
        """A connection attempt ends by the budget's deadline, if one still applies."""
        remaining = budget.remaining_s() if budget is not None else None
        if remaining is None:
            return self.settings.connect_timeout_s
        return max(0.1, min(self.settings.connect_timeout_s, remaining))

    async def _retrying(self, call: Callable[[], Awaitable[T]], what: str) -> T:
        deadline = time.monotonic() + self.settings.reconnect_max_s
        budget = current_budget()
        delay_s = 0.1
        attempt = 1
        while True:
            try:
                return await call()
            except StoreError:
                raise
            except asyncpg.ClientConfigurationError as exc:
                # the URL or the settings, not the network: every attempt would fail alike (an
                # InterfaceError, so it comes before RETRIABLE)
                raise StoreError(
                    f"state store (PostgreSQL at {self._where}): {what} refused by the client:"
                    f" {_reason(exc)}"
                ) from None
            except RETRIABLE as exc:
                remaining = budget.remaining_s() if budget is not None else None
                if budget is not None and remaining is not None and remaining < delay_s:
                    # nothing of this unit of work has been sent to COMMIT: it was not applied
                    raise UnavailableError(
                        f"state store (PostgreSQL at {self._where}): {what} failed; gave up"
                        f" after {budget.seconds:g}s: {_reason(exc)}",
                        unchanged=True,
                    ) from None
                if time.monotonic() + delay_s > deadline:
                    raise UnavailableError(
                        f"state store (PostgreSQL at {self._where}): {what} failed for"
                        f" {self.settings.reconnect_max_s:g}s: {_reason(exc)}"
                    ) from None
                log.warning(
                    "store.retry",
                    server=self._where,
                    attempt=attempt,
                    error=_reason(exc),
                    retry_in_s=round(delay_s, 2),
                )
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 2.0)
                attempt += 1
            except CORRUPT as exc:
                raise _corrupt_error(self._where, exc) from exc
            except asyncpg.PostgresError as exc:
                raise StoreError(f"state store (PostgreSQL at {self._where}): {exc}") from None

    # -- streams ----------------------------------------------------------------------------------

    async def schema_version(self) -> int:
        return await self.transaction(_version)

    async def ensure_streams(
        self, keys: Sequence[StreamKey], due_ms: int, *, seed: bool = True
    ) -> int:
        cols = _key_columns(keys)

        async def run(conn: Connection) -> int:
            status = await conn.execute(
                "INSERT INTO streams (account, scope, resource_id, next_due_ms, seed, created_ms)"
                " SELECT a, s, r, $4, $5, $4 FROM unnest($1::text[], $2::text[], $3::text[])"
                " WITH ORDINALITY AS t(a, s, r, n) ORDER BY n"
                " ON CONFLICT (account, scope, resource_id) DO NOTHING",
                *cols,
                due_ms,
                int(seed),
            )
            await conn.execute(
                "UPDATE streams SET retired = 0 FROM unnest($1::text[], $2::text[], $3::text[])"
                " AS t(a, s, r) WHERE account = a AND scope = s AND resource_id = r"
                " AND retired = 1",
                *cols,
            )
            return _count(status)

        return await self.transaction(run)

    async def streams(self, account: str | None = None) -> list[Stream]:
        async def run(conn: Connection) -> list[Stream]:
            if account:
                rows = await conn.fetch(
                    f"SELECT {rowmap.STREAM_COLUMNS} FROM streams WHERE account = $1"  # noqa: S608
                    " ORDER BY id",
                    account,
                )
            else:
                rows = await conn.fetch(
                    f"SELECT {rowmap.STREAM_COLUMNS} FROM streams ORDER BY id"  # noqa: S608
                )
            marks = await _watermarks(conn, None)
            return [rowmap.stream(row, marks.get(int(row[0]), {})) for row in rows]

        return await self.transaction(run)

    async def stream(self, stream_id: int) -> Stream:
        async def run(conn: Connection) -> Stream:
            row = await conn.fetchrow(
                f"SELECT {rowmap.STREAM_COLUMNS} FROM streams WHERE id = $1",  # noqa: S608
                stream_id,
            )
            if row is None:
                raise StoreError(f"no stream with id {stream_id}")
            return rowmap.stream(row, (await _watermarks(conn, stream_id)).get(stream_id, {}))

        return await self.transaction(run)

    async def due_streams(self, now_ms: int, limit: int, account: str | None = None) -> list[int]:
        mine = "" if account is None else " AND account = $3"
        args = (now_ms, limit) if account is None else (now_ms, limit, account)

        async def run(conn: Connection) -> list[int]:
            rows = await conn.fetch(
                "SELECT id FROM streams WHERE retired = 0 AND paused = 0 AND next_due_ms <= $1"  # noqa: S608 - constant fragments
                f"{mine} ORDER BY next_due_ms, id LIMIT $2",
                *args,
            )
            return [int(r[0]) for r in rows]

        return await self.transaction(run)

    async def stream_rates(self) -> dict[int, StreamRate]:
        async def run(conn: Connection) -> dict[int, StreamRate]:
            rows = await conn.fetch(
                "SELECT id, account, rate_per_h, last_poll_ms IS NULL FROM streams"
                " WHERE retired = 0 AND paused = 0"
            )
            return {int(i): StreamRate(a, None if new else float(r)) for i, a, r, new in rows}

        return await self.transaction(run)

    async def commit_page(
        self,
        stream_id: int,
        activities: Sequence[Activity],
        now_ms: int,
        *,
        emit: bool = True,
        lease: StreamLease | None = None,
    ) -> int:
        fresh: dict[bytes, Activity] = {}
        for activity in activities:
            fresh.setdefault(activity.event_id_bytes, activity)  # a page may repeat one

        async def run(conn: Connection) -> int:
            await _fence(conn, stream_id, lease)
            new = await _insert_dedup(conn, fresh, now_ms)
            if emit and new:
                rows = [
                    rowmap.outbox_row(key, a, stream_id, now_ms)
                    for key, a in fresh.items()
                    if key in new
                ]
                await _append_outbox(conn, rows)
            return len(new)

        return await self.transaction(run)

    def on_append(self, listener: Callable[[OutboxAppend], None]) -> None:
        """Announces nothing: every replica appends, and the one holding the Kafka sink's
        lease reads the outbox (woken by ``LISTEN``)."""

    def on_fatal(self, listener: Callable[[StoreError], None]) -> None:
        """Calls ``listener`` once the server reports damage (``XX001``, ``XX002``: a
        :class:`CorruptError`). A lost server is no such error: it is retried
        (``reconnect_max_s``) and then fails the call alone; the next call tries again."""
        self._latch.listen(listener)

    async def finish_pass(
        self,
        stream_id: int,
        result: PassResult,
        *,
        replay: ReplayRequest | None = None,
        lease: StreamLease | None = None,
    ) -> None:
        async def run(conn: Connection) -> None:
            await _fence(conn, stream_id, lease)
            await conn.execute(
                f"UPDATE streams SET next_due_ms = {_next_due('$1', '$10')},"  # noqa: S608 - constant fragments
                " rate_per_h = $2, last_poll_ms = $3,"
                " summary = $4, consecutive_errors = CASE WHEN $5::text IS NULL THEN 0"
                " ELSE consecutive_errors + 1 END, last_error = $5, behind = $7,"
                " line_ms = COALESCE(line_ms, $8), swept_ms = COALESCE($9, swept_ms),"
                f" replay_from_ms = {_end_replay('$10')} WHERE id = $6",
                result.next_due_ms,
                result.rate_per_h,
                result.polled_ms,
                orjson.dumps(result.summary).decode(),
                None if result.error is None else result.error[:1000],
                stream_id,
                rowmap.behind_json(result.behind),
                result.line_ms,
                result.swept_ms,
                _asked(replay),
            )
            await conn.executemany(
                "INSERT INTO watermarks (stream_id, kind, watermark_ms) VALUES ($1, $2, $3)"
                " ON CONFLICT (stream_id, kind) DO UPDATE SET watermark_ms ="
                " GREATEST(watermarks.watermark_ms, excluded.watermark_ms)",
                [(stream_id, kind.value, ms) for kind, ms in result.watermarks.items()],
            )

        await self.transaction(run)

    async def record_error(
        self,
        stream_id: int,
        error: str,
        next_due_ms: int,
        *,
        retire: bool = False,
        replay: ReplayRequest | None = None,
        lease: StreamLease | None = None,
    ) -> None:
        await self._fenced(
            stream_id,
            lease,
            "UPDATE streams SET consecutive_errors = consecutive_errors + 1, last_error = $1,"  # noqa: S608 - constant fragments
            f" next_due_ms = {_next_due('$2', '$5')}, retired = GREATEST(retired, $3)"
            " WHERE id = $4",
            error[:1000],
            next_due_ms,
            int(retire),
            stream_id,
            _asked(replay),
        )

    async def defer_stream(
        self,
        stream_id: int,
        next_due_ms: int,
        *,
        replay: ReplayRequest | None = None,
        lease: StreamLease | None = None,
    ) -> None:
        await self._fenced(
            stream_id,
            lease,
            f"UPDATE streams SET next_due_ms = {_next_due('$1', '$3')} WHERE id = $2",  # noqa: S608 - constant fragments
            next_due_ms,
            stream_id,
            _asked(replay),
        )

    async def _fenced(
        self, stream_id: int, lease: StreamLease | None, sql: str, *args: object
    ) -> None:
        """One statement of a pass on its stream, in a transaction that checks its lease
        first (see ``_fence``)."""

        async def run(conn: Connection) -> None:
            await _fence(conn, stream_id, lease)
            await conn.execute(sql, *args)

        await self.transaction(run)

    async def set_paused(self, stream_id: int, paused: bool) -> None:
        await self._execute("UPDATE streams SET paused = $1 WHERE id = $2", int(paused), stream_id)

    async def retire_streams(self, keys: Sequence[StreamKey]) -> int:
        return await self._execute(
            "UPDATE streams SET retired = 1 FROM unnest($1::text[], $2::text[], $3::text[])"
            " AS t(a, s, r) WHERE account = a AND scope = s AND resource_id = r"
            " AND retired = 0 AND NOT EXISTS (SELECT 1 FROM added_targets AS x"
            " WHERE x.account = a AND x.scope = s AND x.resource_id = r)",
            *_key_columns(keys),
        )

    # -- quota and account pauses -------------------------------------------------------------

    async def spend_quota(self, account: str, day: str, requests: int) -> int:
        async def run(conn: Connection) -> int:
            return int(
                await conn.fetchval(
                    "INSERT INTO quota (account, day, used) VALUES ($1, $2, $3)"
                    " ON CONFLICT (account, day) DO UPDATE SET used = quota.used + excluded.used"
                    " RETURNING used",
                    account,
                    day,
                    requests,
                )
            )

        return await self.transaction(run)

    async def quota_used(self, account: str, day: str) -> int:
        async def run(conn: Connection) -> int:
            used = await conn.fetchval(
                "SELECT used FROM quota WHERE account = $1 AND day = $2", account, day
            )
            return int(used or 0)

        return await self.transaction(run)

    async def budget_salt(self) -> bytes:
        made = secrets.token_hex(32)

        async def run(conn: Connection) -> str:
            await conn.execute(
                "INSERT INTO meta (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                BUDGET_SALT,
                made,
            )
            return str(await conn.fetchval("SELECT value FROM meta WHERE name = $1", BUDGET_SALT))

        return bytes.fromhex(await self.transaction(run))

    async def set_account_pause(self, account: str, until_ms: int | None, reason: str) -> None:
        if until_ms is None:
            await self._execute("DELETE FROM account_pauses WHERE account = $1", account)
            return
        await self._execute(
            "INSERT INTO account_pauses (account, until_ms, reason) VALUES ($1, $2, $3)"
            " ON CONFLICT (account) DO UPDATE SET until_ms = excluded.until_ms,"
            " reason = excluded.reason WHERE account_pauses.until_ms < excluded.until_ms",
            account,
            until_ms,
            reason,
        )

    async def end_account_pause(self, account: str, now_ms: int) -> bool:
        async def run(conn: Connection) -> bool:
            # the database's clock must have passed the pause too: a replica whose clock runs
            # ahead ended a stored Retry-After (or quota) pause early for every replica
            status = await conn.execute(
                "DELETE FROM account_pauses WHERE account = $1"  # noqa: S608 - constant fragment
                f" AND until_ms <= LEAST($2, {DB_NOW_MS})",
                account,
                now_ms,
            )
            return bool(_count(status))

        return await self.transaction(run)

    async def account_pauses(self) -> dict[str, tuple[int, str]]:
        async def run(conn: Connection) -> dict[str, tuple[int, str]]:
            rows = await conn.fetch("SELECT account, until_ms, reason FROM account_pauses")
            return {str(a): (int(u), str(r)) for a, u, r in rows}

        return await self.transaction(run)

    # -- outbox and sinks -----------------------------------------------------------------------

    async def read_outbox(self, after_seq: int, limit: int) -> list[OutboxEvent]:
        async def run(conn: Connection) -> list[OutboxEvent]:
            rows = await conn.fetch(
                "SELECT seq, event_id, account, kind, campaign_id, contact_id, occurred_ms,"
                " committed_ms, data FROM outbox WHERE seq > $1 ORDER BY seq LIMIT $2",
                after_seq,
                limit,
            )
            return [rowmap.outbox_event(r) for r in rows]

        return await self.transaction(run)

    async def outbox_head(self) -> int:
        return await self._value_int("SELECT COALESCE(MAX(seq), 0) FROM outbox")

    async def sink_cursor(self, sink: str) -> int:
        return await self._value_int("SELECT seq FROM sink_cursors WHERE sink = $1", sink)

    async def set_sink_cursor(self, sink: str, seq: int) -> None:
        async def run(conn: Connection) -> None:
            await conn.execute(_NO_FLUSH)  # undone, it only means sending again (same ids)
            # never back: a replica that lost the lease while paused settles its old round
            # after the successor recorded more (each value written means "all up to here
            # was acknowledged", so the greater one is true too)
            await conn.execute(
                "INSERT INTO sink_cursors (sink, seq) VALUES ($1, $2)"
                " ON CONFLICT (sink) DO UPDATE SET seq = GREATEST(sink_cursors.seq, excluded.seq)",
                sink,
                seq,
            )

        await self.transaction(run)

    async def add_dead_letter(
        self, sink: str, seq: int, event_id: str, reason: str, now_ms: int
    ) -> None:
        await self._execute(
            "INSERT INTO dead_letters (sink, seq, event_id, reason, created_ms)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (sink, seq) DO NOTHING",
            sink,
            seq,
            event_id,
            reason[:2000],
            now_ms,
        )

    async def dead_letters(self, sink: str, limit: int = 100) -> list[DeadLetter]:
        async def run(conn: Connection) -> list[DeadLetter]:
            rows = await conn.fetch(
                "SELECT sink, seq, event_id, reason, created_ms FROM dead_letters"
                " WHERE sink = $1 ORDER BY seq, id LIMIT $2",
                sink,
                limit,
            )
            return [DeadLetter(str(a), int(b), str(c), str(d), int(e)) for a, b, c, d, e in rows]

        return await self.transaction(run)

    # -- webhooks ---------------------------------------------------------------------------------

    async def create_webhook(self, webhook: Webhook, max_webhooks: int | None = None) -> Webhook:
        async def run(conn: Connection) -> Webhook:
            # A retry of this very call (the same id and secret, both random) whose COMMIT went
            # through but whose answer was lost with its connection: the webhook is there, so
            # answer with it. Inserted again, it failed as a duplicate of itself, and the
            # caller never saw the secret of the webhook it had registered.
            row = await conn.fetchrow(
                f"SELECT {rowmap.WEBHOOK_COLUMNS} FROM webhooks WHERE id = $1",  # noqa: S608
                webhook.id,
            )
            if row is not None:
                stored = rowmap.webhook(row)
                if stored.url == webhook.url and stored.secret == webhook.secret:
                    return stored
            if max_webhooks is not None:
                # registrations one at a time (READ COMMITTED: two counting at once would both
                # see room for one more)
                await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", LOCK_NS, LOCK_WEBHOOKS)
                count = int(await conn.fetchval("SELECT COUNT(*) FROM webhooks"))
                if count >= max_webhooks:
                    raise LimitError(limit_message(max_webhooks))
            # The fan-out's lock, until this commits: a fan-out then ran before the head was read
            # (it moved past events this webhook is not owed), or runs after the commit and sees
            # the webhook. Between the two, one on another replica read the webhooks without it
            # and moved past events committed meanwhile, owed by start_seq, never delivered.
            await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", LOCK_NS, LOCK_FANOUT)
            head = int(await conn.fetchval("SELECT COALESCE(MAX(seq), 0) FROM outbox"))
            created = dataclasses.replace(webhook, start_seq=head)
            await _unique_url(conn, webhook.url, _INSERT_WEBHOOK, *rowmap.webhook_row(created))
            return created

        return await self.transaction(run)

    async def webhook(self, webhook_id: str) -> Webhook:
        return await self.transaction(lambda conn: _get_webhook(conn, webhook_id))

    async def webhooks(self) -> list[Webhook]:
        async def run(conn: Connection) -> list[Webhook]:
            rows = await conn.fetch(
                f"SELECT {rowmap.WEBHOOK_COLUMNS} FROM webhooks ORDER BY created_ms, id"  # noqa: S608
            )
            return [rowmap.webhook(r) for r in rows]

        return await self.transaction(run)

    async def update_webhook(self, webhook: Webhook, fields: Collection[str] | None = None) -> None:
        names = list(rowmap.WEBHOOK_FIELDS[1:]) if fields is None else rowmap.update_fields(fields)
        if not names:
            return
        values = dict(zip(rowmap.WEBHOOK_FIELDS, rowmap.webhook_row(webhook), strict=True))
        assignments = ", ".join(f"{name} = ${i}" for i, name in enumerate(names, start=2))

        async def run(conn: Connection) -> None:
            status = await _unique_url(
                conn,
                webhook.url,
                f"UPDATE webhooks SET {assignments} WHERE id = $1",  # noqa: S608 - field names
                webhook.id,
                *(values[name] for name in names),
            )
            if not _count(status):
                raise NotFoundError(f"no webhook with id {webhook.id!r}")
            if "event_types" in names:  # in the same transaction
                await _drop_unwanted(conn, webhook, due_after_ms=webhook.updated_ms + SPARED_DUE_MS)
            if rowmap.retries_now(webhook, names):
                moved = int("url" in names)
                await conn.execute(_RETRY_NOW, webhook.id, webhook.updated_ms, moved)

        await self.transaction(run)

    async def delete_webhook(self, webhook_id: str) -> None:
        async def run(conn: Connection) -> None:
            # deliveries and their attempts go with it (ON DELETE CASCADE)
            status = await conn.execute("DELETE FROM webhooks WHERE id = $1", webhook_id)
            if not _count(status):
                raise NotFoundError(f"no webhook with id {webhook_id!r}")

        await self.transaction(run)

    async def webhook_failed(
        self, webhook_id: str, now_ms: int, disable_after_ms: int, restart_after_ms: int
    ) -> bool:
        async def run(conn: Connection) -> bool:
            # started, or restarted after a silence (see the SQLite store)
            await conn.execute(
                "UPDATE webhooks SET failing_since_ms = CASE WHEN failing_since_ms IS NULL"
                " OR last_failure_ms IS NULL OR last_failure_ms < $2 THEN $1"
                " ELSE failing_since_ms END, last_failure_ms = $1 WHERE id = $3",
                now_ms,
                now_ms - restart_after_ms,
                webhook_id,
            )
            status = await conn.execute(
                "UPDATE webhooks SET enabled = 0, updated_ms = $1, disabled_reason ="
                " 'failing continuously since ' || failing_since_ms || ' (Unix ms)'"
                " WHERE id = $2 AND enabled = 1 AND failing_since_ms <= $3",
                now_ms,
                webhook_id,
                now_ms - disable_after_ms,
            )
            return bool(_count(status))

        return await self.transaction(run)

    async def webhook_succeeded(self, webhook_id: str) -> None:
        await self._execute(
            "UPDATE webhooks SET failing_since_ms = NULL, last_failure_ms = NULL"
            " WHERE id = $1 AND failing_since_ms IS NOT NULL",
            webhook_id,
        )

    async def disable_webhook(self, webhook_id: str, reason: str, now_ms: int) -> None:
        await self._execute(
            "UPDATE webhooks SET enabled = 0, disabled_reason = $1, updated_ms = $2 WHERE id = $3",
            reason,
            now_ms,
            webhook_id,
        )

    async def fanout(self, limit: int, now_ms: int) -> int:
        async def run(conn: Connection) -> int:
            await conn.execute(_NO_FLUSH)  # bookkeeping: no wait for the WAL flush
            # one fan-out at a time across replicas: each event is fanned out once, in order
            await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", LOCK_NS, LOCK_FANOUT)
            cursor = int(
                await conn.fetchval("SELECT seq FROM sink_cursors WHERE sink = $1", rowmap.FANOUT)
                or 0
            )
            events = await conn.fetch(
                "SELECT seq, event_id, kind FROM outbox WHERE seq > $1 ORDER BY seq LIMIT $2",
                cursor,
                limit,
            )
            if not events:
                return 0
            # the rows locked FOR SHARE until the commit: a filter edit (update_webhook) in
            # progress is waited for and its filter read, and one starting later waits for this
            # commit, so its drop sees these deliveries (without the lock, an edit committing
            # between this read and the insert left deliveries of kinds it rejects pending)
            hooks = [
                rowmap.webhook(r)
                for r in await conn.fetch(
                    f"SELECT {rowmap.WEBHOOK_COLUMNS} FROM webhooks WHERE enabled = 1"  # noqa: S608
                    " ORDER BY id FOR SHARE"
                )
            ]
            rows = [
                (hook.id, int(seq), event_id, now_ms, now_ms)
                for seq, event_id, kind in events
                for hook in hooks
                if seq > hook.start_seq and hook.wants(Kind(kind).event_type)
            ]
            await _insert_deliveries(conn, rows)
            await conn.execute(
                "INSERT INTO sink_cursors (sink, seq) VALUES ($1, $2)"
                " ON CONFLICT (sink) DO UPDATE SET seq = excluded.seq",
                rowmap.FANOUT,
                int(events[-1][0]),
            )
            return len(events)

        return await self.transaction(run)

    async def due_deliveries(
        self, webhook_id: str, now_ms: int, limit: int, skip: Collection[int] = ()
    ) -> list[tuple[Delivery, OutboxEvent]]:
        return [(d, e) for d, e, _ in await self._due(webhook_id, now_ms, limit, skip, None)]

    async def due_sends(
        self,
        webhook_id: str,
        now_ms: int,
        limit: int,
        skip: Collection[int] = (),
        *,
        kinds: Collection[str],
    ) -> list[DueSend]:
        due = await self._due(webhook_id, now_ms, limit, skip, kinds)
        return [
            DueSend(
                d.id, d.attempts, d.event_id, e.committed_ms, e.structured(), e.kind.value, version
            )
            for d, e, version in due
        ]

    async def _due(
        self,
        webhook_id: str,
        now_ms: int,
        limit: int,
        skip: Collection[int],
        kinds: Collection[str] | None,
    ) -> list[tuple[Delivery, OutboxEvent, int]]:
        """The due read of both: each delivery with its event and its version; of ``kinds``
        only, when given (rows of others are left out, not counted in the limit)."""

        async def run(conn: Connection) -> list[tuple[Delivery, OutboxEvent, int]]:
            rows = await conn.fetch(
                f"SELECT {_DELIVERY_COLUMNS_D}, {_OUTBOX_COLUMNS_O}, d.version"  # noqa: S608
                " FROM deliveries d JOIN outbox o ON o.seq = d.seq"
                " WHERE d.webhook_id = $1 AND d.status = 'pending' AND d.next_attempt_ms <= $2"
                " AND d.id <> ALL($3::bigint[])"
                " AND ($5::text[] IS NULL OR o.kind = ANY($5::text[]))"
                " ORDER BY d.next_attempt_ms, d.seq LIMIT $4",
                webhook_id,
                now_ms,
                list(skip),
                limit,
                None if kinds is None else list(kinds),
            )
            width = len(rowmap.DELIVERY_COLUMNS.split(","))
            return [
                (rowmap.delivery(r[:width]), rowmap.outbox_event(r[width:-1]), int(r[-1]))
                for r in rows
            ]

        return await self.transaction(run)

    async def drop_unwanted(self, webhook_id: str, skip: Collection[int] = ()) -> int:
        async def run(conn: Connection) -> int:
            hook = await _get_webhook(conn, webhook_id, share=True)
            return await _drop_unwanted(conn, hook, skip=skip)

        return await self.transaction(run)

    async def next_due_ms(
        self, webhook_id: str, after_ms: int = -1, *, kinds: Collection[str] | None = None
    ) -> int | None:
        async def run(conn: Connection) -> int | None:
            # the deliveries_due index in due order, to the first of a wanted kind (a MIN over
            # the join would read every pending delivery of a failing endpoint)
            value = await conn.fetchval(
                "SELECT d.next_attempt_ms FROM deliveries d JOIN outbox o ON o.seq = d.seq"
                " WHERE d.webhook_id = $1 AND d.status = 'pending' AND d.next_attempt_ms > $2"
                " AND ($3::text[] IS NULL OR o.kind = ANY($3::text[]))"
                " ORDER BY d.next_attempt_ms LIMIT 1",
                webhook_id,
                after_ms,
                None if kinds is None else list(kinds),
            )
            return None if value is None else int(value)

        return await self.transaction(run)

    async def finish_attempts(self, results: Sequence[tuple[Attempt, str, int, int]]) -> None:
        async def run(conn: Connection) -> None:
            await conn.execute(_NO_FLUSH)  # bookkeeping: no wait for the WAL flush
            # a delivery deleted with its webhook while the attempt was in flight has nothing
            # left to record: skipped, the rest of the batch still commits. The row is locked
            # as the foreign key's check locks it: a delete not yet committed (another
            # replica's API) is waited for and then seen, where a plain EXISTS saw the row
            # still there and the check, after that wait, failed the whole batch
            await conn.executemany(
                "INSERT INTO attempts (delivery_id, attempted_ms, status_code, latency_ms,"
                " response_excerpt, error) SELECT $1, $2, $3, $4, $5, $6"
                " WHERE EXISTS (SELECT 1 FROM deliveries WHERE id = $1 FOR KEY SHARE)",
                [
                    (
                        a.delivery_id,
                        a.attempted_ms,
                        a.status_code,
                        a.latency_ms,
                        a.response_excerpt,
                        a.error,
                    )
                    for a, _, _, _ in results
                ],
            )
            # only a delivery with the version the sender read: one reset meanwhile
            # (redeliver, recover) keeps its reset, the attempt is only its history
            await conn.executemany(
                "UPDATE deliveries SET status = $1, attempts = attempts + 1,"
                " version = version + 1, next_attempt_ms = $2, last_status = $3, last_error = $4,"
                " delivered_ms = CASE WHEN $1 = 'delivered' THEN $5 ELSE delivered_ms END"
                " WHERE id = $6 AND version = $7",
                [
                    (status, next_ms, a.status_code, a.error, a.attempted_ms, a.delivery_id, read)
                    for a, status, next_ms, read in results
                ],
            )

        await self.transaction(run)

    async def delivery(self, delivery_id: int) -> Delivery:
        return await self.transaction(lambda conn: _get_delivery(conn, delivery_id))

    async def deliveries(
        self, webhook_id: str, limit: int, status: str | None = None, *, before: int | None = None
    ) -> list[Delivery]:
        async def run(conn: Connection) -> list[Delivery]:
            sql, args = deliveries_query(webhook_id, limit, status, before)
            rows = await conn.fetch(sql, *args)
            return [rowmap.delivery(r) for r in rows]

        return await self.transaction(run)

    async def attempts(self, delivery_id: int) -> list[Attempt]:
        async def run(conn: Connection) -> list[Attempt]:
            rows = await conn.fetch(
                "SELECT delivery_id, attempted_ms, status_code, latency_ms, response_excerpt,"
                " error FROM attempts WHERE delivery_id = $1 ORDER BY id",
                delivery_id,
            )
            return [Attempt(int(a), int(b), c, float(d), str(e), f) for a, b, c, d, e, f in rows]

        return await self.transaction(run)

    async def attempts_of(self, delivery_ids: Collection[int]) -> dict[int, list[Attempt]]:
        ids = sorted(set(delivery_ids))
        found: dict[int, list[Attempt]] = {i: [] for i in ids}
        if not ids:
            return found

        async def run(conn: Connection) -> dict[int, list[Attempt]]:
            rows = await conn.fetch(
                "SELECT delivery_id, attempted_ms, status_code, latency_ms, response_excerpt,"
                " error FROM attempts WHERE delivery_id = ANY($1::bigint[])"
                " ORDER BY delivery_id, id",
                ids,
            )
            for a, b, c, d, e, f in rows:
                found[int(a)].append(Attempt(int(a), int(b), c, float(d), str(e), f))
            return found

        return await self.transaction(run)

    async def redeliver(self, delivery_id: int, now_ms: int) -> Delivery:
        async def run(conn: Connection) -> Delivery:
            await _owing(conn)
            # only to an enabled webhook, of a kind its filter wants: the worker sends no other,
            # so it would stay pending for ever (the webhook's row is locked while it is read, so
            # a change cannot commit between this check and the write: see _check_wanted)
            await _check_wanted(conn, delivery_id)
            # only while its event is in the outbox (see the SQLite store)
            status = await conn.execute(
                "UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_ms = $1,"
                " version = version + 1 WHERE id = $2 AND EXISTS (SELECT 1 FROM outbox"
                " WHERE outbox.seq = deliveries.seq)",
                now_ms,
                delivery_id,
            )
            delivery = await _get_delivery(conn, delivery_id)  # NotFoundError when none
            if not _count(status):
                raise GoneError(gone_message(delivery))
            return delivery

        return await self.transaction(run)

    async def recover(self, webhook_id: str, since_ms: int, now_ms: int) -> int:
        async def run(conn: Connection) -> int:
            await _owing(conn)
            # the filter as it stays until the commit (its row locked: see _check_wanted)
            hook = await _get_webhook(conn, webhook_id, share=True)
            if not hook.enabled:  # nothing would be sent until it is enabled again
                raise DisabledError(disabled_message(hook))
            kinds = rowmap.wanted_kinds(hook)
            if not kinds:
                return 0
            sql = rowmap.RECOVER.format(
                hook="$1", now="$2::bigint", since="$3", kinds="= ANY($4::text[])"
            )
            # the status counts the rows updated as well as those inserted (INSERT 0 n)
            return _count(await conn.execute(sql, webhook_id, now_ms, since_ms, kinds))

        return await self.transaction(run)

    # -- retention ------------------------------------------------------------------------------

    async def prune_dedup(self, before_ms: int) -> int:
        async def run(conn: Connection) -> int:
            return _count(
                await conn.execute(
                    # the expression of the dedup_kept index, so the prune reads it off the index
                    "DELETE FROM dedup WHERE event_id IN (SELECT event_id FROM dedup"
                    " WHERE GREATEST(occurred_ms, inserted_ms) < $1"
                    " ORDER BY GREATEST(occurred_ms, inserted_ms) LIMIT $2)",
                    before_ms,
                    rowmap.PRUNE_CHUNK,
                )
            )

        return await self._in_chunks(run)

    async def _in_chunks(self, run: Callable[[Connection], Awaitable[int]]) -> int:
        """Repeat a deleting transaction until it removes less than a chunk; the total.
        Chunked: short transactions."""
        pruned = 0
        while True:
            removed = await self.transaction(run)
            pruned += removed
            if removed < rowmap.PRUNE_CHUNK:
                return pruned

    async def prune_outbox(self, before_ms: int, sinks: Sequence[str]) -> int:
        async def run(conn: Connection) -> int:
            await _pruning(conn)  # before the reads: they then see every committed delivery
            # Every stored cursor holds, configured here or not: a sink left out of this
            # replica's config (or of the config for a while) still owes its events.
            found = {
                str(r[0]): int(r[1]) for r in await conn.fetch("SELECT sink, seq FROM sink_cursors")
            }
            # A reader without a cursor has read nothing yet.
            names = {rowmap.FANOUT, *sinks, *found}
            below = min(found.get(name, 0) for name in names)
            if below <= 0:
                return 0
            # Strictly below: the newest row stays, so MAX(seq) is still the outbox head; rows
            # a pending or dead delivery still reads stay, whatever their age.
            return _count(
                await conn.execute(
                    "DELETE FROM outbox WHERE seq IN (SELECT o.seq FROM outbox o"
                    " WHERE o.seq < $1 AND o.committed_ms < $2 AND NOT EXISTS"
                    " (SELECT 1 FROM deliveries d WHERE d.seq = o.seq"
                    " AND d.status != 'delivered') ORDER BY o.seq LIMIT $3)",
                    below,
                    before_ms,
                    rowmap.PRUNE_CHUNK,
                )
            )

        return await self._in_chunks(run)

    async def prune_deliveries(self, before_ms: int) -> int:
        async def run(conn: Connection) -> int:  # attempts go too (ON DELETE CASCADE)
            await _pruning(conn)  # a redeliver making one pending meanwhile keeps it
            return _count(
                await conn.execute(
                    "DELETE FROM deliveries WHERE id IN (SELECT id FROM deliveries"
                    " WHERE status = 'delivered' AND delivered_ms < $1 ORDER BY id LIMIT $2)",
                    before_ms,
                    rowmap.PRUNE_CHUNK,
                )
            )

        return await self._in_chunks(run)

    async def dedup_count(self) -> int:
        return await self._value_int("SELECT COUNT(*) FROM dedup")

    async def overview(self) -> Overview:
        async def run(conn: Connection) -> Overview:
            streams = {
                (str(scope), str(state)): int(n)
                for scope, state, n in await conn.fetch(
                    "SELECT scope, CASE WHEN retired <> 0 THEN 'retired' WHEN paused <> 0"
                    " THEN 'paused' ELSE 'active' END AS state, COUNT(*) FROM streams"
                    " GROUP BY 1, 2"
                )
            }
            marks = {
                (str(scope), Kind(kind)): (int(oldest), int(newest))
                for scope, kind, oldest, newest in await conn.fetch(
                    "SELECT s.scope, w.kind, MIN(w.watermark_ms), MAX(w.watermark_ms)"
                    " FROM watermarks w JOIN streams s ON s.id = w.stream_id"
                    " WHERE s.retired = 0 AND s.paused = 0 GROUP BY s.scope, w.kind"
                )
            }
            pending = await conn.fetchval(
                "SELECT COUNT(*) FROM deliveries WHERE status = 'pending'"
            )
            return Overview(streams, marks, int(pending))

        return await self.transaction(run)

    # -- operations: status, operator holds, replay, run-time targets --------------------------

    async def sink_cursors(self) -> dict[str, int]:
        async def run(conn: Connection) -> dict[str, int]:
            rows = await conn.fetch("SELECT sink, seq FROM sink_cursors")
            return {str(k): int(v) for k, v in rows}

        return await self.transaction(run)

    async def forget_sink(self, sink: str) -> bool:
        return await self._execute("DELETE FROM sink_cursors WHERE sink = $1", sink) > 0

    async def dead_letter_counts(self) -> dict[str, int]:
        async def run(conn: Connection) -> dict[str, int]:
            rows = await conn.fetch("SELECT sink, COUNT(*) FROM dead_letters GROUP BY sink")
            return {str(k): int(v) for k, v in rows}

        return await self.transaction(run)

    async def delivery_counts(self) -> dict[str, DeliveryCounts]:
        async def run(conn: Connection) -> dict[str, DeliveryCounts]:
            rows = await conn.fetch(
                "SELECT webhook_id, COUNT(*) FILTER (WHERE status = 'pending'),"
                " COUNT(*) FILTER (WHERE status = 'dead'),"
                " MIN(seq) FILTER (WHERE status = 'pending') FROM deliveries"
                " WHERE status IN ('pending', 'dead') GROUP BY webhook_id"
            )
            return {
                str(w): DeliveryCounts(int(p), int(d), None if o is None else int(o))
                for w, p, d, o in rows
            }

        return await self.transaction(run)

    async def hold_account(self, account: str, reason: str, now_ms: int) -> None:
        await self._execute(
            "INSERT INTO account_holds (account, reason, held_ms) VALUES ($1, $2, $3)"
            " ON CONFLICT (account) DO UPDATE SET reason = excluded.reason",
            account,
            reason[:1000],
            now_ms,
        )

    async def release_account(self, account: str) -> bool:
        async def run(conn: Connection) -> bool:
            status = await conn.execute("DELETE FROM account_holds WHERE account = $1", account)
            return bool(_count(status))

        return await self.transaction(run)

    async def account_holds(self) -> dict[str, tuple[int, str]]:
        async def run(conn: Connection) -> dict[str, tuple[int, str]]:
            rows = await conn.fetch("SELECT account, held_ms, reason FROM account_holds")
            return {str(a): (int(h), str(r)) for a, h, r in rows}

        return await self.transaction(run)

    async def request_replay(self, stream_ids: Sequence[int], since_ms: int, now_ms: int) -> int:
        async def run(conn: Connection) -> int:
            changed = 0
            for sid in stream_ids:
                changed += _count(
                    await conn.execute(
                        "UPDATE streams SET replay_from_ms = LEAST(COALESCE(replay_from_ms, $1),"
                        " $1), replay_asked = replay_asked + 1,"
                        " next_due_ms = LEAST(next_due_ms, $2) WHERE id = $3",
                        since_ms,
                        now_ms,
                        sid,
                    )
                )
            return changed

        return await self.transaction(run)

    async def stream_replay(self, stream_id: int) -> ReplayRequest | None:
        async def run(conn: Connection) -> ReplayRequest | None:
            row = await conn.fetchrow(
                "SELECT replay_from_ms, replay_asked FROM streams WHERE id = $1", stream_id
            )
            if row is None or row[0] is None:
                return None
            return ReplayRequest(int(row[0]), int(row[1]))

        return await self.transaction(run)

    async def replays(self) -> dict[int, int]:
        async def run(conn: Connection) -> dict[int, int]:
            rows = await conn.fetch(
                "SELECT id, replay_from_ms FROM streams WHERE replay_from_ms IS NOT NULL"
            )
            return {int(i): int(r) for i, r in rows}

        return await self.transaction(run)

    async def commit_replay_page(
        self,
        stream_id: int,
        activities: Sequence[Activity],
        now_ms: int,
        since_ms: int,
        *,
        lease: StreamLease | None = None,
    ) -> tuple[int, int]:
        unique: dict[bytes, Activity] = {}
        for activity in activities:
            unique.setdefault(activity.event_id_bytes, activity)  # a page may repeat one

        async def run(conn: Connection) -> tuple[int, int]:
            await _fence(conn, stream_id, lease)
            inserted = await _insert_dedup(conn, unique, now_ms)
            rows = [
                rowmap.outbox_row(key, activity, stream_id, now_ms)
                for key, activity in unique.items()
                if key in inserted or activity.occurred_ms >= since_ms
            ]
            await _append_outbox(conn, rows)
            return len(inserted), len(rows)

        return await self.transaction(run)

    async def count_outbox(self, selector: OutboxSelector) -> OutboxRange:
        where, args = _selection(selector, 1)

        async def run(conn: Connection) -> OutboxRange:
            row = await conn.fetchrow(
                # an event replayed before is in the log twice: it goes out once per replay
                f"SELECT COUNT(DISTINCT event_id), MIN(seq), MAX(seq) FROM outbox"  # noqa: S608
                f" WHERE {where}",
                *args,
            )
            assert row is not None  # an aggregate always returns a row
            return OutboxRange(int(row[0]), int(row[1] or 0), int(row[2] or 0))

        return await self.transaction(run)

    async def replay_outbox(self, selector: OutboxSelector, now_ms: int) -> OutboxRange:
        where, args = _selection(selector, 3)

        async def run(conn: Connection) -> OutboxRange:
            await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", LOCK_NS, LOCK_OUTBOX)
            await conn.execute("SELECT pg_notify($1, '')", COMMITS_CHANNEL)
            head = int(await conn.fetchval("SELECT COALESCE(MAX(seq), 0) FROM outbox"))
            await conn.execute(
                "INSERT INTO outbox (event_id, account, stream_id, kind, campaign_id,"  # noqa: S608
                " contact_id, occurred_ms, committed_ms, data)"
                " SELECT event_id, account, stream_id, kind, campaign_id, contact_id,"
                " occurred_ms, $1, data FROM outbox WHERE seq IN"
                f" (SELECT MIN(seq) FROM outbox WHERE {where} AND seq <= $2 GROUP BY event_id)"
                " ORDER BY seq",
                now_ms,
                head,
                *args,
            )
            row = await conn.fetchrow(
                "SELECT COUNT(*), MIN(seq), MAX(seq) FROM outbox WHERE seq > $1", head
            )
            assert row is not None  # an aggregate always returns a row
            return OutboxRange(int(row[0]), int(row[1] or 0), int(row[2] or 0))

        return await self.transaction(run)

    async def remove_targets(self, keys: Sequence[StreamKey], now_ms: int) -> int:
        async def run(conn: Connection) -> int:
            existed = 0
            for key in keys:
                row = (key.account, key.scope, key.resource_id)
                status = await conn.execute(
                    "UPDATE streams SET retired = 1 WHERE account = $1 AND scope = $2"
                    " AND resource_id = $3 AND retired = 0",
                    *row,
                )
                if not _count(status):
                    continue  # not polled: nothing to remove, no mark either
                existed += 1
                await conn.execute(
                    "INSERT INTO removed_targets (account, scope, resource_id, removed_ms)"
                    " VALUES ($1, $2, $3, $4) ON CONFLICT (account, scope, resource_id)"
                    " DO NOTHING",
                    *row,
                    now_ms,
                )
                await conn.execute(
                    "DELETE FROM added_targets"
                    " WHERE account = $1 AND scope = $2 AND resource_id = $3",
                    *row,
                )
            return existed

        return await self.transaction(run)

    async def _targets(self, table: str, account: str) -> set[StreamKey]:
        """The account's targets listed in ``table`` (removed_targets or added_targets)."""

        async def run(conn: Connection) -> set[StreamKey]:
            query = f"SELECT scope, resource_id FROM {table} WHERE account = $1"  # noqa: S608 - constant table names
            rows = await conn.fetch(query, account)
            return {StreamKey(account, str(s), str(r)) for s, r in rows}

        return await self.transaction(run)

    async def removed_targets(self, account: str) -> set[StreamKey]:
        return await self._targets("removed_targets", account)

    async def add_targets(self, keys: Sequence[StreamKey], now_ms: int) -> None:
        cols = _key_columns(keys)

        async def run(conn: Connection) -> None:
            await conn.execute(
                "DELETE FROM removed_targets USING unnest($1::text[], $2::text[], $3::text[])"
                " AS t(a, s, r) WHERE account = a AND scope = s AND resource_id = r",
                *cols,
            )
            await conn.execute(
                "INSERT INTO added_targets (account, scope, resource_id, added_ms)"
                " SELECT a, s, r, $4 FROM unnest($1::text[], $2::text[], $3::text[])"
                " AS t(a, s, r) ON CONFLICT (account, scope, resource_id) DO NOTHING",
                *cols,
                now_ms,
            )

        await self.transaction(run)

    async def added_targets(self, account: str) -> set[StreamKey]:
        return await self._targets("added_targets", account)

    async def stream_stats(self) -> dict[str, StreamStats]:
        async def run(conn: Connection) -> dict[str, StreamStats]:
            oldest = {
                str(a): int(m)
                for a, m in await conn.fetch(
                    "SELECT s.account, MIN(w.watermark_ms) FROM watermarks w"
                    " JOIN streams s ON s.id = w.stream_id WHERE s.retired = 0 AND s.paused = 0"
                    " GROUP BY s.account"
                )
            }
            rows = await conn.fetch(
                "SELECT account, COUNT(*),"
                " COUNT(*) FILTER (WHERE retired = 0 AND paused = 0),"
                " COUNT(*) FILTER (WHERE retired = 0 AND paused = 0 AND consecutive_errors > 0),"
                " COUNT(*) FILTER (WHERE retired = 0 AND paused = 1),"
                " COUNT(*) FILTER (WHERE retired = 1),"
                " COUNT(*) FILTER (WHERE replay_from_ms IS NOT NULL) FROM streams GROUP BY account"
            )
            return {
                str(a): StreamStats(
                    int(t), int(ac), int(f), int(p), int(r), int(rp), oldest.get(str(a))
                )
                for a, t, ac, f, p, r, rp in rows
            }

        return await self.transaction(run)

    async def stream_page(
        self, where: StreamFilter, limit: int, offset: int
    ) -> tuple[list[Stream], int]:
        clause, args = _stream_filter(where)
        n = len(args)

        async def run(conn: Connection) -> tuple[list[Stream], int]:
            total = int(
                await conn.fetchval(
                    f"SELECT COUNT(*) FROM streams WHERE {clause}",  # noqa: S608
                    *args,
                )
            )
            rows = await conn.fetch(
                f"SELECT {rowmap.STREAM_COLUMNS} FROM streams WHERE {clause}"  # noqa: S608
                f" ORDER BY id LIMIT ${n + 1} OFFSET ${n + 2}",
                *args,
                limit,
                offset,
            )
            ids = [int(row[0]) for row in rows]
            marks: dict[int, dict[Kind, int]] = {}
            for sid, kind, ms in await conn.fetch(
                "SELECT stream_id, kind, watermark_ms FROM watermarks"
                " WHERE stream_id = ANY($1::bigint[])",
                ids,
            ):
                marks.setdefault(int(sid), {})[Kind(kind)] = int(ms)
            return [rowmap.stream(row, marks.get(int(row[0]), {})) for row in rows], total

        return await self.transaction(run)

    # -- helpers ----------------------------------------------------------------------------------

    async def _execute(self, sql: str, *args: object) -> int:
        """Run one statement in a transaction of its own; the rows it changed."""

        async def run(conn: Connection) -> int:
            return _count(await conn.execute(sql, *args))

        return await self.transaction(run)

    async def _value_int(self, sql: str, *args: object) -> int:
        async def run(conn: Connection) -> int:
            return int(await conn.fetchval(sql, *args) or 0)

        return await self.transaction(run)


_DELIVERY_COLUMNS_D = ", ".join(f"d.{c.strip()}" for c in rowmap.DELIVERY_COLUMNS.split(","))
_OUTBOX_COLUMNS_O = (
    "o.seq, o.event_id, o.account, o.kind, o.campaign_id, o.contact_id, o.occurred_ms,"
    " o.committed_ms, o.data"
)
_RETRY_NOW = rowmap.RETRY_NOW.format(hook="$1", now="$2::bigint", bump="$3::integer", least="LEAST")
_INSERT_WEBHOOK = (
    f"INSERT INTO webhooks ({rowmap.WEBHOOK_COLUMNS})"  # noqa: S608 - column names are constants
    f" VALUES ({', '.join(f'${i}' for i in range(1, len(rowmap.WEBHOOK_COLUMNS.split(',')) + 1))})"
)


def _next_due(due: str, handled: str) -> str:
    """``rowmap.NEXT_DUE`` with these parameters (the handled replay's typed: it may be NULL)."""
    return rowmap.NEXT_DUE.format(due=due, handled=f"{handled}::integer", least="LEAST")


def _end_replay(handled: str) -> str:
    """``rowmap.END_REPLAY`` with this parameter (typed, as in ``_next_due``)."""
    return rowmap.END_REPLAY.format(handled=f"{handled}::integer")


def _asked(replay: ReplayRequest | None) -> int | None:
    """The request count ``_next_due`` compares with (None: the pass ran no replay)."""
    return None if replay is None else replay.asked


async def _version(conn: Connection) -> int:
    return int(await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version") or 0)


async def _migrate(conn: Connection) -> None:
    """Apply pending migrations; the advisory lock makes replicas that start together wait.

    Neither the wait nor a migration's statements are bounded by ``statement_timeout_s`` (the
    store's calls' limit), only by ``MIGRATE_TIMEOUT_S``: cut off at it, a replica starting
    while another applied a longer migration failed to start, and a migration longer than it
    (an index built on a large table) was rolled back at every start, for good."""
    await conn.execute(f"SET LOCAL statement_timeout = {int(MIGRATE_TIMEOUT_S * 1000)}")
    await conn.execute(
        "SELECT pg_advisory_xact_lock($1, $2)", LOCK_NS, LOCK_MIGRATE, timeout=_MIGRATE_WAIT_S
    )
    await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY)")
    current = await _version(conn)
    if current > len(PG_MIGRATIONS):
        raise StoreError(
            f"state store: schema version {current} is newer than this relay knows"
            f" ({len(PG_MIGRATIONS)}); run a newer ctct-relay"
        )
    for version, script in enumerate(PG_MIGRATIONS, start=1):
        if version <= current:
            continue
        for statement in script:
            await conn.execute(statement, timeout=_MIGRATE_WAIT_S)
        await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", version)


async def _fence(conn: Connection, stream_id: int, lease: StreamLease | None) -> None:
    """Raise :class:`LeaseLostError` unless ``lease`` (a pass's claim; None: not checked) still
    holds the stream: its owner and epoch, the ones the claim wrote. The row stays locked until
    the transaction ends, so no claim lands between this check and the commit: a claim by
    another replica (``FOR UPDATE SKIP LOCKED``) passes the stream by meanwhile. ``NO KEY``: the
    foreign keys of the watermarks and outbox rows written here do not wait for it."""
    if lease is None:
        return
    row = await conn.fetchrow(
        "SELECT lease_owner, lease_epoch FROM streams WHERE id = $1 FOR NO KEY UPDATE", stream_id
    )
    owner, epoch = (None, None) if row is None else (row[0], int(row[1]))
    if owner != lease.owner or epoch != lease.epoch:
        raise LeaseLostError(lease_lost_message(lease, owner, epoch))


async def _watermarks(conn: Connection, stream_id: int | None) -> dict[int, dict[Kind, int]]:
    if stream_id is None:
        rows = await conn.fetch("SELECT stream_id, kind, watermark_ms FROM watermarks")
    else:
        rows = await conn.fetch(
            "SELECT stream_id, kind, watermark_ms FROM watermarks WHERE stream_id = $1", stream_id
        )
    out: dict[int, dict[Kind, int]] = {}
    for sid, kind, ms in rows:
        out.setdefault(int(sid), {})[Kind(kind)] = int(ms)
    return out


def _key_columns(keys: Sequence[StreamKey]) -> tuple[list[str], list[str], list[str]]:
    return (
        [k.account for k in keys],
        [k.scope for k in keys],
        [k.resource_id for k in keys],
    )


async def _insert_dedup(conn: Connection, fresh: dict[bytes, Activity], now_ms: int) -> set[bytes]:
    """Insert the keys not yet known; returns those that were new. A concurrent insert of the
    same key waits for the other transaction and then counts as known."""
    if not fresh:
        return set()
    rows = await conn.fetch(
        "INSERT INTO dedup (event_id, occurred_ms, inserted_ms)"
        " SELECT k, o, $3 FROM unnest($1::bytea[], $2::bigint[]) AS page (k, o)"
        " ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
        list(fresh),
        [a.occurred_ms for a in fresh.values()],
        now_ms,
    )
    return {bytes(r[0]) for r in rows}


async def _append_outbox(conn: Connection, rows: list[tuple[object, ...]]) -> None:
    """Append events in order. The advisory lock is held until commit, so sequence numbers
    commit in order across replicas (sinks read ``seq > cursor`` and must never skip one)."""
    if not rows:
        return
    await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", LOCK_NS, LOCK_OUTBOX)
    await conn.execute("SELECT pg_notify($1, '')", COMMITS_CHANNEL)  # sent at commit
    columns = list(zip(*rows, strict=True))
    await conn.execute(
        "INSERT INTO outbox (event_id, account, stream_id, kind, campaign_id, contact_id,"
        " occurred_ms, committed_ms, data)"
        " SELECT e, a, s, k, ca, co, o, c, d FROM unnest($1::text[], $2::text[], $3::bigint[],"
        " $4::text[], $5::text[], $6::text[], $7::bigint[], $8::bigint[], $9::bytea[])"
        " WITH ORDINALITY AS t(e, a, s, k, ca, co, o, c, d, n) ORDER BY n",
        *[list(c) for c in columns],
    )


# for this transaction only: commit without waiting for the WAL flush (see the module docstring)
_NO_FLUSH = "SET LOCAL synchronous_commit = off"


async def _owing(conn: Connection) -> None:
    """Shared retention lock: a ``recover`` or ``redeliver`` commits before a prune reads."""
    await conn.execute("SELECT pg_advisory_xact_lock_shared($1, $2)", LOCK_NS, LOCK_RETENTION)


async def _pruning(conn: Connection) -> None:
    """Exclusive retention lock: waits for the recovers and redelivers in progress, so the
    prune's statements (each with its own snapshot, READ COMMITTED) see their deliveries."""
    await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", LOCK_NS, LOCK_RETENTION)


async def _insert_deliveries(conn: Connection, rows: list[tuple[str, int, str, int, int]]) -> None:
    if not rows:
        return
    columns = list(zip(*rows, strict=True))
    await conn.execute(
        "INSERT INTO deliveries (webhook_id, seq, event_id, status, next_attempt_ms, created_ms)"
        " SELECT w, s, e, 'pending', n, c FROM unnest($1::text[], $2::bigint[], $3::text[],"
        " $4::bigint[], $5::bigint[]) WITH ORDINALITY AS t(w, s, e, n, c, i) ORDER BY i"
        " ON CONFLICT (webhook_id, seq) DO NOTHING",
        *[list(c) for c in columns],
    )


async def _unique_url(conn: Connection, url: str, sql: str, *args: object) -> str:
    """Run a webhook insert or update; a violation of the unique index on ``webhooks.url``
    becomes DuplicateError naming the webhook that has the URL (the savepoint keeps the
    transaction usable for that lookup)."""
    try:
        async with conn.transaction():
            return str(await conn.execute(sql, *args))
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name != "webhooks_url":
            raise
    holder = await conn.fetchval("SELECT id FROM webhooks WHERE url = $1", url)
    raise DuplicateError(f"url: already registered{f' as webhook {holder}' if holder else ''}")


async def _get_webhook(conn: Connection, webhook_id: str, *, share: bool = False) -> Webhook:
    """The webhook; ``share``: its row locked FOR SHARE until the transaction ends, so no
    change to it (a filter edit) commits meanwhile, and one in progress is waited for and read
    as committed (READ COMMITTED reads the row's newest version after the wait)."""
    lock = " FOR SHARE" if share else ""
    row = await conn.fetchrow(
        f"SELECT {rowmap.WEBHOOK_COLUMNS} FROM webhooks WHERE id = $1{lock}",  # noqa: S608
        webhook_id,
    )
    if row is None:
        raise NotFoundError(f"no webhook with id {webhook_id!r}")
    return rowmap.webhook(row)


async def _drop_unwanted(
    conn: Connection,
    hook: Webhook,
    *,
    due_after_ms: int | None = None,
    skip: Collection[int] = (),
) -> int:
    """The webhook's pending deliveries its filter rejects go, as delete_webhook's do (attempts
    by ON DELETE CASCADE; they would otherwise never be sent), but those due by
    ``due_after_ms`` and those in ``skip`` (possibly in flight: see the SQLite store); returns
    how many."""
    kinds = rowmap.unwanted_kinds(hook)
    if not kinds:
        return 0
    where = rowmap.UNWANTED_PENDING.format(hook="$1", kinds="= ANY($2::text[])")
    where += " AND ($3::bigint IS NULL OR next_attempt_ms > $3) AND id <> ALL($4::bigint[])"
    sql = f"DELETE FROM deliveries WHERE {where}"  # noqa: S608 - constants
    return _count(await conn.execute(sql, hook.id, kinds, due_after_ms, list(skip)))


async def _check_wanted(conn: Connection, delivery_id: int) -> None:
    """DisabledError when the delivery's webhook is disabled, UnwantedError when its event is of
    a kind the webhook's filter rejects (no answer when the delivery or its event is gone: the
    caller says which). The webhook's row is locked FOR SHARE, so no change to it commits
    between this read and the caller's write: a filter edit (``update_webhook``) would not see
    the delivery pending and leave it so, a disable would leave it waiting unsent."""
    row = await conn.fetchrow(rowmap.DELIVERY_KIND.format(id="$1"), delivery_id)
    if row is None:
        return
    webhook_id, kind = row
    hook = await _get_webhook(conn, webhook_id, share=True)
    if not hook.enabled:
        raise DisabledError(disabled_message(hook))
    if not hook.wants(rowmap.KINDS[kind].event_type):
        raise UnwantedError(unwanted_message(await _get_delivery(conn, delivery_id), kind, hook))


def deliveries_query(
    webhook_id: str, limit: int, status: str | None, before: int | None
) -> tuple[str, list[object]]:
    """The SQL and arguments of one page of :meth:`PostgresStore.deliveries` (newest first; the
    index ``deliveries_webhook`` serves it, which a test checks with ``EXPLAIN``)."""
    where = "webhook_id = $1"
    args: list[object] = [webhook_id]
    if status:
        args.append(status)
        where += f" AND status = ${len(args)}"
    if before is not None:
        args.append(before)
        where += f" AND id < ${len(args)}"
    args.append(limit)
    sql = (
        f"SELECT {rowmap.DELIVERY_COLUMNS} FROM deliveries WHERE {where}"  # noqa: S608
        f" ORDER BY id DESC LIMIT ${len(args)}"
    )
    return sql, args


async def _get_delivery(conn: Connection, delivery_id: int) -> Delivery:
    row = await conn.fetchrow(
        f"SELECT {rowmap.DELIVERY_COLUMNS} FROM deliveries WHERE id = $1",  # noqa: S608
        delivery_id,
    )
    if row is None:
        raise NotFoundError(f"no delivery with id {delivery_id}")
    return rowmap.delivery(row)


def _selection(selector: OutboxSelector, first: int) -> tuple[str, tuple[object, ...]]:
    """The WHERE clause (placeholders from ``$first``) of the events a log replay selects."""
    column = "occurred_ms" if selector.by_activity_time else "committed_ms"
    where = f"account = ${first} AND {column} >= ${first + 1}"
    args: tuple[object, ...] = (selector.account, selector.since_ms)
    if selector.stream_id is not None:
        where += f" AND stream_id = ${first + len(args)}"
        args += (selector.stream_id,)
    if selector.campaign_id is not None:
        where += f" AND campaign_id = ${first + len(args)}"
        args += (selector.campaign_id,)
    return where, args


def _stream_filter(where: StreamFilter) -> tuple[str, tuple[object, ...]]:
    """The WHERE clause (and arguments) of a stream listing; only constants are interpolated."""
    clauses = ["TRUE"]
    args: list[object] = []
    if where.account is not None:
        args.append(where.account)
        clauses.append(f"account = ${len(args)}")
    if where.scope is not None:
        args.append(where.scope)
        clauses.append(f"scope = ${len(args)}")
    if where.state is not None:
        if where.state not in rowmap.STATE_CLAUSES:
            raise StoreError(f"unknown stream state {where.state!r}")
        clauses.append(rowmap.STATE_CLAUSES[where.state])
    if where.replaying is not None:
        clauses.append(f"replay_from_ms IS {'NOT ' if where.replaying else ''}NULL")
    return " AND ".join(clauses), tuple(args)
