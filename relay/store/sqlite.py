"""The embedded state store on SQLite: WAL mode, one connection, one writer thread.

Every call runs on a single worker thread that owns the connection, so calls are serialized (SQLite
has one writer anyway) and the event loop never blocks on disk. ``synchronous=FULL`` makes a
committed page durable before ``commit_page`` returns: a crash after it loses nothing. Webhook
fan-out and attempt records and the Kafka sink's cursor commit without an fsync (see ``_tx``):
undoing them can only cause a redelivery.

The relay's own store is opened ``exclusive``: an advisory lock (``flock``) on ``<state>.lock``
beside the file (its real path, symbolic links resolved), held while the store is open, so a
second relay on the same file stops at start-up instead of polling the same streams again
(SQLite's own locks only serialize writes). A file with hard links is refused there: the lock
cannot tell that another name is the same file.

Stream leases (``StreamLease``, the fencing token of a pass's writes on PostgreSQL) are accepted
and not checked: the lock makes this process the only writer of every stream, and its
coordinator hands no lease out. The commit path pays nothing for them.

A damaged file (SQLITE_CORRUPT, SQLITE_NOTADB) is a :class:`CorruptError`: the store refuses
every later call and tells its ``on_fatal`` listeners, so the relay stops instead of failing
every pass for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import os
import secrets
import shlex
import sqlite3
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import orjson
import structlog

from relay.events import DATA_CONTENT_TYPE, SPECVERSION, TYPE_PREFIX, Activity, Kind
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
    UnwantedError,
    Webhook,
    disabled_message,
    gone_message,
    limit_message,
    unwanted_message,
)
from relay.store.migrations import MIGRATIONS

T = TypeVar("T")

log = structlog.get_logger(__name__)

# primary result codes (an extended code keeps its primary one in the low byte) of a damaged file
_CORRUPT_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})


def path_from_url(url: str) -> Path | None:
    """``sqlite:///relative.db``, ``sqlite:////abs/path.db``; None for ``sqlite://:memory:``."""
    parts = urlsplit(url)
    if parts.scheme != "sqlite":
        raise StoreError(f"state: not a sqlite URL: {url!r}")
    raw = url[len("sqlite://") :]
    if raw in {":memory:", "/:memory:"}:
        return None
    if not raw.startswith("/") or raw == "/":
        raise StoreError(f"state: expected sqlite:///path/to/file.db, got {url!r}")
    return Path(raw[1:])  # sqlite:///rel.db -> rel.db, sqlite:////abs.db -> /abs.db


def create_private(path: Path) -> None:
    """Create a missing state file readable and writable by its owner only: it holds webhook
    signing secrets. SQLite gives the ``-wal`` and ``-shm`` files it makes beside it the same
    mode. An existing file keeps its mode (``chmod 600`` it; the README says so)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)


class StateLock:
    """An exclusive advisory lock (``flock``) on ``<state file>.lock``: one holder at a time.

    Beside the file's real path (symbolic links resolved), so a link to the file or to its
    directory finds the same lock; a hard link cannot be told by its path (see
    :func:`_refuse_hard_links`).

    ``flock`` locks belong to an open file description, so a second :meth:`acquire` of the same
    file fails in the same process too; the kernel releases the lock when the holder exits,
    however it exits (SIGKILL included), so a stale lock file never blocks anyone. The file is
    left in place (removing it would let two processes lock two different files) and holds the
    pid of its last holder, which the error names.
    """

    def __init__(self, state: Path) -> None:
        self.state = state
        self.real, self.path = self._resolve()
        self._fd: int | None = None

    def _resolve(self) -> tuple[Path, Path]:
        """The state file's real path and the lock file's."""
        real = Path(os.path.realpath(self.state))
        return real, real.with_name(real.name + ".lock")

    def acquire(self) -> None:
        """Take the lock or raise :class:`StoreError` naming the state file and the holder."""
        if self._fd is not None:
            return
        self.real, self.path = self._resolve()  # again: a link may have been made since
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreError(
                f"state store ({self.state}): cannot create its lock file {self.path}:"
                f" {exc.strerror or exc}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder(fd)
            os.close(fd)
            if exc.errno not in {errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES}:
                raise StoreError(
                    f"state store ({self.state}): cannot lock {self.path}: {exc.strerror or exc}"
                ) from None
            linked = self.real != Path(os.path.abspath(self.state))
            named = f"{self.state} (that is, {self.real})" if linked else str(self.state)
            raise StoreError(
                f"state store {named} is in use by another ctct-relay process{holder}"
                " (one relay per SQLite file; several replicas need a postgresql:// state)"
            ) from None
        with contextlib.suppress(OSError):  # the pid is a courtesy for the next one's error
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        """Give the lock up (closing the file releases it); a no-op when not held."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def _refuse_hard_links(state: Path, found: os.stat_result | None) -> None:
    """SQLite keeps the write-ahead log beside the name it was given, and the lock is found by
    name too: two relays on two hard links of one file would both run, with a log each, and
    corrupt it. A path cannot tell which other names a file has, its link count can."""
    if found is None or found.st_nlink <= 1:
        return
    raise StoreError(
        f"state store {state} has {found.st_nlink} hard links (names): another relay could use"
        " the file under another name, unseen by the lock, and two relays on one SQLite file"
        " corrupt it; keep one name (`find <its file system> -xdev -samefile"
        f" {shlex.quote(str(state))}` lists them), or copy the file instead of linking it"
    )


def _corruption(exc: BaseException) -> sqlite3.Error | None:
    """The SQLITE_CORRUPT or SQLITE_NOTADB error in ``exc`` or what it was raised from (a
    ROLLBACK that failed after it), None when there is none."""
    seen: BaseException | None = exc
    while seen is not None:
        code = getattr(seen, "sqlite_errorcode", None)  # not on errors we raise ourselves
        if (
            isinstance(seen, sqlite3.Error)
            and isinstance(code, int)
            and code & 0xFF in _CORRUPT_CODES
        ):
            return seen
        seen = seen.__context__
    return None


def _corrupt_error(where: str, exc: sqlite3.Error) -> CorruptError:
    """The :class:`CorruptError` of a damaged state file: what happened and what to do."""
    path = shlex.quote(where)
    return CorruptError(
        f"state store {where} is corrupt ({exc}): nothing read from it can be trusted, so the"
        " relay stops. With the relay stopped, restore the file from a backup, or save what it"
        f" still holds with `sqlite3 {path} .recover | sqlite3 recovered.db` and set state to"
        " the new file (events whose dedup keys are lost are sent again, with the same ids)"
    )


def _holder(fd: int) -> str:
    """`` (pid N)`` from a lock file's content, '' when it holds none."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return f" (pid {text})" if text.isdigit() else ""


class SqliteStore:
    """:class:`relay.store.base.Store` on one SQLite file.

    ``exclusive``: hold a :class:`StateLock` on the file while open (the relay's store); other
    opens (tests, benchmarks, the demo's clean-up) take none and are not stopped by one.
    """

    def __init__(self, path: Path | None, *, exclusive: bool = False) -> None:
        self._path = path
        self._lock = StateLock(path) if exclusive and path is not None else None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self._append_listeners: list[Callable[[OutboxAppend], None]] = []
        self._latch = CorruptionLatch()

    @classmethod
    def from_url(cls, url: str, *, exclusive: bool = False) -> SqliteStore:
        """A store for a ``sqlite:///…`` URL."""
        return cls(path_from_url(url), exclusive=exclusive)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:  # its executor is shut down: submitting would raise RuntimeError
            raise StoreError(f"state store ({self._where()}) is closed")

        def call() -> T:
            if self._conn is None:
                raise StoreError("state store is not open")
            try:
                return fn(self._conn)
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):  # the call's own error is the news
                    self._conn.rollback()
                damage = _corruption(exc)
                if damage is not None:
                    raise _corrupt_error(self._where(), damage) from exc
                raise StoreError(f"state store ({self._where()}): {exc}") from exc

        with self._latch.guard():  # a damaged file: writing more into it can only spread it
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def on_fatal(self, listener: Callable[[StoreError], None]) -> None:
        self._latch.listen(listener)

    def _where(self) -> str:
        return str(self._path) if self._path else ":memory:"

    async def open(self) -> None:
        def connect() -> bool:
            conn: sqlite3.Connection | None = None
            found: os.stat_result | None = None
            try:
                if self._path is not None:
                    self._path.parent.mkdir(parents=True, exist_ok=True)
                if self._lock is not None:
                    self._lock.acquire()  # before anything touches the file (migrations too)
                if self._path is not None:
                    with contextlib.suppress(FileNotFoundError):
                        found = self._path.stat()  # before we create it: was it there?
                    if self._lock is not None:
                        _refuse_hard_links(self._path, found)
                    create_private(self._path)
                conn = sqlite3.connect(
                    self._path or ":memory:", isolation_level=None, check_same_thread=False
                )
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA foreign_keys=ON")
                conn.execute("PRAGMA busy_timeout=5000")
                _migrate(conn)
            except (sqlite3.Error, OSError) as exc:
                if conn is not None:
                    conn.close()  # a store that did not open keeps no connection either
                damage = _corruption(exc)
                if damage is not None:
                    raise _corrupt_error(self._where(), damage) from None
                raise StoreError(f"state store ({self._where()}): cannot open: {exc}") from None
            self._conn = conn
            # SQLite writes its header when it first opens a file (WAL mode), so an empty file
            # that was there before is one that lost its content (truncated), or was made
            # empty on purpose (`touch` before a bind mount), not one of ours
            return found is not None and found.st_size == 0

        def connect_or_unlock() -> bool:
            try:
                return connect()
            except BaseException:
                if self._lock is not None:
                    self._lock.release()  # a store that did not open holds nothing
                raise

        loop = asyncio.get_running_loop()
        if await loop.run_in_executor(self._executor, connect_or_unlock):
            log.warning(
                "store.empty_file",
                path=str(self._path),
                detail="the state file was empty (0 bytes): a new store was created in it. If it"
                " held this relay's state, that state is lost (watermarks, dedup keys, webhooks"
                " and their secrets): stop the relay and restore the file from a backup",
            )

    async def close(self) -> None:
        if self._closed:
            return  # the executor is gone: a second close has nothing left to release
        self._closed = True

        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            if self._lock is not None:
                self._lock.release()  # after the connection: nothing of ours writes any more

        await asyncio.get_running_loop().run_in_executor(self._executor, shut)
        self._executor.shutdown(wait=True)

    async def schema_version(self) -> int:
        return await self._run(_version)

    async def ensure_streams(
        self, keys: Sequence[StreamKey], due_ms: int, *, seed: bool = True
    ) -> int:
        def run(conn: sqlite3.Connection) -> int:
            with _tx(conn):
                before = conn.total_changes
                conn.executemany(
                    "INSERT INTO streams"
                    " (account, scope, resource_id, next_due_ms, seed, created_ms)"
                    " VALUES (?, ?, ?, ?, ?, ?)"
                    " ON CONFLICT (account, scope, resource_id) DO NOTHING",
                    [(k.account, k.scope, k.resource_id, due_ms, int(seed), due_ms) for k in keys],
                )
                created = conn.total_changes - before
                conn.executemany(
                    "UPDATE streams SET retired = 0"
                    " WHERE account = ? AND scope = ? AND resource_id = ? AND retired = 1",
                    [(k.account, k.scope, k.resource_id) for k in keys],
                )
            return created

        return await self._run(run)

    async def streams(self, account: str | None = None) -> list[Stream]:
        def run(conn: sqlite3.Connection) -> list[Stream]:
            where, args = ("WHERE account = ?", (account,)) if account else ("", ())
            rows = conn.execute(
                f"SELECT {rowmap.STREAM_COLUMNS} FROM streams {where} ORDER BY id",  # noqa: S608
                args,
            ).fetchall()
            marks = _watermarks(conn, None)
            return [rowmap.stream(row, marks.get(row[0], {})) for row in rows]

        return await self._run(run)

    async def stream(self, stream_id: int) -> Stream:
        def run(conn: sqlite3.Connection) -> Stream:
            row = conn.execute(
                f"SELECT {rowmap.STREAM_COLUMNS} FROM streams WHERE id = ?",  # noqa: S608
                (stream_id,),
            ).fetchone()
            if row is None:
                raise StoreError(f"no stream with id {stream_id}")
            return rowmap.stream(row, _watermarks(conn, stream_id).get(stream_id, {}))

        return await self._run(run)

    async def due_streams(self, now_ms: int, limit: int, account: str | None = None) -> list[int]:
        # one account's by the index on (account, next_due_ms)
        mine = "" if account is None else " AND account = ?"
        args = (now_ms, limit) if account is None else (now_ms, account, limit)

        def run(conn: sqlite3.Connection) -> list[int]:
            rows = conn.execute(
                "SELECT id FROM streams WHERE retired = 0 AND paused = 0 AND next_due_ms <= ?"  # noqa: S608 - constant fragments
                f"{mine} ORDER BY next_due_ms LIMIT ?",
                args,
            ).fetchall()
            return [int(r[0]) for r in rows]

        return await self._run(run)

    async def stream_rates(self) -> dict[int, StreamRate]:
        def run(conn: sqlite3.Connection) -> dict[int, StreamRate]:
            rows = conn.execute(
                "SELECT id, account, rate_per_h, last_poll_ms IS NULL FROM streams"
                " WHERE retired = 0 AND paused = 0"
            )
            return {int(i): StreamRate(a, None if new else float(r)) for i, a, r, new in rows}

        return await self._run(run)

    async def commit_page(
        self,
        stream_id: int,
        activities: Sequence[Activity],
        now_ms: int,
        *,
        emit: bool = True,
        lease: StreamLease | None = None,  # not checked: see the module docstring
    ) -> int:
        # Ids are derived here (a SHA-1 each), and announced events built after the commit, in
        # the caller's thread: the store's one thread is the pipeline's narrowest stage, and
        # the caller can do this while it commits another stream's page (profiled).
        fresh: dict[bytes, Activity] = {}
        for activity in activities:
            fresh.setdefault(activity.event_id_bytes, activity)  # a page may repeat one
        announce = emit and bool(self._append_listeners)

        def run(conn: sqlite3.Connection) -> tuple[int, list[tuple[object, ...]], int, int]:
            with _tx(conn):
                for seen in _existing_ids(conn, list(fresh)):
                    del fresh[seen]
                if not fresh:
                    return 0, [], 0, 0
                # Each write takes the page as one parameter, so it is one step: the sqlite3
                # module hands the GIL back and forth around every step, and with the event
                # loop busy, executemany's per-row steps spent more time waiting for the GIL
                # than writing (profiled, per bench round: the dedup insert took 68-95 ms of
                # wall time for 27-37 ms of CPU). A row-by-row INSERT OR IGNORE cost ~47 us
                # per event.
                occurred = orjson.dumps([a.occurred_ms for a in fresh.values()])
                conn.execute(_INSERT_DEDUP, (b"".join(fresh), occurred, now_ms))
                if not emit:
                    return len(fresh), [], 0, 0
                rows = [rowmap.outbox_row(key, a, stream_id, now_ms) for key, a in fresh.items()]
                head = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM outbox").fetchone()[0]
                conn.execute(_INSERT_OUTBOX_PAGE, _page_args(rows, stream_id, now_ms))
                last = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
            return len(fresh), rows, int(head), int(last)

        new, rows, head, last = await self._run(run)
        if announce and rows:
            # one writer inside BEGIN IMMEDIATE: the rows got consecutive seqs ending at
            # last_insert_rowid(), and nothing else lies above head
            appended = OutboxAppend(head, rowmap.appended(rows, last))
            for listener in self._append_listeners:
                listener(appended)
        return new

    def on_append(self, listener: Callable[[OutboxAppend], None]) -> None:
        self._append_listeners.append(listener)

    async def finish_pass(
        self,
        stream_id: int,
        result: PassResult,
        *,
        replay: ReplayRequest | None = None,
        lease: StreamLease | None = None,
    ) -> None:
        def run(conn: sqlite3.Connection) -> None:
            with _tx(conn):
                conn.execute(
                    f"UPDATE streams SET next_due_ms = {_next_due('?1', '?11')},"  # noqa: S608 - constant fragments
                    " rate_per_h = ?2, last_poll_ms = ?3,"
                    " summary = ?4, behind = ?5, line_ms = COALESCE(line_ms, ?6),"
                    " swept_ms = COALESCE(?7, swept_ms),"
                    " consecutive_errors = CASE WHEN ?8 IS NULL THEN 0"
                    " ELSE consecutive_errors + 1 END, last_error = ?9,"
                    f" replay_from_ms = {rowmap.END_REPLAY.format(handled='?11')}"
                    " WHERE id = ?10",
                    (
                        result.next_due_ms,
                        result.rate_per_h,
                        result.polled_ms,
                        orjson.dumps(result.summary).decode(),
                        rowmap.behind_json(result.behind),
                        result.line_ms,
                        result.swept_ms,
                        result.error,
                        None if result.error is None else result.error[:1000],
                        stream_id,
                        _asked(replay),
                    ),
                )
                conn.executemany(
                    "INSERT INTO watermarks (stream_id, kind, watermark_ms) VALUES (?, ?, ?)"
                    " ON CONFLICT (stream_id, kind) DO UPDATE SET watermark_ms ="
                    " MAX(watermarks.watermark_ms, excluded.watermark_ms)",
                    [(stream_id, kind.value, ms) for kind, ms in result.watermarks.items()],
                )

        await self._run(run)

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
        await self._run(
            lambda conn: _write(
                conn,
                "UPDATE streams SET consecutive_errors = consecutive_errors + 1, last_error = ?1,"  # noqa: S608 - constant fragments
                f" next_due_ms = {_next_due('?2', '?5')}, retired = MAX(retired, ?3)"
                " WHERE id = ?4",
                (error[:1000], next_due_ms, int(retire), stream_id, _asked(replay)),
            )
        )

    async def defer_stream(
        self,
        stream_id: int,
        next_due_ms: int,
        *,
        replay: ReplayRequest | None = None,
        lease: StreamLease | None = None,
    ) -> None:
        await self._run(
            lambda conn: _write(
                conn,
                f"UPDATE streams SET next_due_ms = {_next_due('?1', '?3')} WHERE id = ?2",  # noqa: S608 - constant fragments
                (next_due_ms, stream_id, _asked(replay)),
            )
        )

    async def set_paused(self, stream_id: int, paused: bool) -> None:
        await self._run(
            lambda conn: _write(
                conn, "UPDATE streams SET paused = ? WHERE id = ?", (int(paused), stream_id)
            )
        )

    async def retire_streams(self, keys: Sequence[StreamKey]) -> int:
        def run(conn: sqlite3.Connection) -> int:
            with _tx(conn):
                before = conn.total_changes
                conn.executemany(
                    "UPDATE streams SET retired = 1"
                    " WHERE account = ? AND scope = ? AND resource_id = ? AND retired = 0"
                    " AND NOT EXISTS (SELECT 1 FROM added_targets AS a"
                    " WHERE a.account = streams.account AND a.scope = streams.scope"
                    " AND a.resource_id = streams.resource_id)",
                    [(k.account, k.scope, k.resource_id) for k in keys],
                )
                return conn.total_changes - before

        return await self._run(run)

    async def spend_quota(self, account: str, day: str, requests: int) -> int:
        def run(conn: sqlite3.Connection) -> int:
            with _tx(conn):
                row = conn.execute(
                    "INSERT INTO quota (account, day, used) VALUES (?, ?, ?)"
                    " ON CONFLICT (account, day) DO UPDATE SET used = quota.used + excluded.used"
                    " RETURNING used",
                    (account, day, requests),
                ).fetchone()
            return int(row[0])

        return await self._run(run)

    async def quota_used(self, account: str, day: str) -> int:
        def run(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT used FROM quota WHERE account = ? AND day = ?", (account, day)
            ).fetchone()
            return int(row[0]) if row else 0

        return await self._run(run)

    async def budget_salt(self) -> bytes:
        made = secrets.token_hex(32)

        def run(conn: sqlite3.Connection) -> str:
            with _tx(conn):
                conn.execute(
                    "INSERT INTO meta (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                    (BUDGET_SALT, made),
                )
                row = conn.execute("SELECT value FROM meta WHERE name = ?", (BUDGET_SALT,))
                return str(row.fetchone()[0])

        return bytes.fromhex(await self._run(run))

    async def set_account_pause(self, account: str, until_ms: int | None, reason: str) -> None:
        if until_ms is None:
            sql, args = "DELETE FROM account_pauses WHERE account = ?", (account,)
        else:
            sql = (
                "INSERT INTO account_pauses (account, until_ms, reason) VALUES (?, ?, ?)"
                " ON CONFLICT (account) DO UPDATE SET until_ms = excluded.until_ms,"
                " reason = excluded.reason WHERE account_pauses.until_ms < excluded.until_ms"
            )
            args = (account, until_ms, reason)  # type: ignore[assignment]
        await self._run(lambda conn: _write(conn, sql, args))

    async def end_account_pause(self, account: str, now_ms: int) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            with _tx(conn):
                deleted = conn.execute(
                    "DELETE FROM account_pauses WHERE account = ? AND until_ms <= ?",
                    (account, now_ms),
                ).rowcount
            return bool(deleted)

        return await self._run(run)

    async def account_pauses(self) -> dict[str, tuple[int, str]]:
        def run(conn: sqlite3.Connection) -> dict[str, tuple[int, str]]:
            rows = conn.execute("SELECT account, until_ms, reason FROM account_pauses")
            return {str(a): (int(u), str(r)) for a, u, r in rows}

        return await self._run(run)

    async def read_outbox(self, after_seq: int, limit: int) -> list[OutboxEvent]:
        def run(conn: sqlite3.Connection) -> list[OutboxEvent]:
            rows = conn.execute(
                "SELECT seq, event_id, account, kind, campaign_id, contact_id, occurred_ms,"
                " committed_ms, data FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()
            return [rowmap.outbox_event(r) for r in rows]

        return await self._run(run)

    async def outbox_head(self) -> int:
        def run(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM outbox").fetchone()
            return int(row[0])

        return await self._run(run)

    async def sink_cursor(self, sink: str) -> int:
        def run(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT seq FROM sink_cursors WHERE sink = ?", (sink,)).fetchone()
            return int(row[0]) if row else 0

        return await self._run(run)

    async def set_sink_cursor(self, sink: str, seq: int) -> None:
        def run(conn: sqlite3.Connection) -> None:
            # No fsync: a power cut that undoes it can only mean sending again with the same
            # ids; every sink round paid one, in the thread that also commits pages (profiled).
            # never back, as on PostgreSQL (a late writer must not undo a newer position)
            with _tx(conn, durable=False):
                conn.execute(
                    "INSERT INTO sink_cursors (sink, seq) VALUES (?, ?)"
                    " ON CONFLICT (sink) DO UPDATE SET seq = MAX(seq, excluded.seq)",
                    (sink, seq),
                )

        await self._run(run)

    async def add_dead_letter(
        self, sink: str, seq: int, event_id: str, reason: str, now_ms: int
    ) -> None:
        await self._run(
            lambda conn: _write(
                conn,
                "INSERT INTO dead_letters (sink, seq, event_id, reason, created_ms)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (sink, seq) DO NOTHING",
                (sink, seq, event_id, reason[:2000], now_ms),
            )
        )

    async def dead_letters(self, sink: str, limit: int = 100) -> list[DeadLetter]:
        def run(conn: sqlite3.Connection) -> list[DeadLetter]:
            rows = conn.execute(
                "SELECT sink, seq, event_id, reason, created_ms FROM dead_letters"
                " WHERE sink = ? ORDER BY seq, id LIMIT ?",
                (sink, limit),
            ).fetchall()
            return [DeadLetter(str(a), int(b), str(c), str(d), int(e)) for a, b, c, d, e in rows]

        return await self._run(run)

    async def create_webhook(self, webhook: Webhook, max_webhooks: int | None = None) -> Webhook:
        def run(conn: sqlite3.Connection) -> Webhook:
            with _tx(conn):  # one write transaction at a time: the count holds until the insert
                if max_webhooks is not None:
                    (count,) = conn.execute("SELECT COUNT(*) FROM webhooks").fetchone()
                    if count >= max_webhooks:
                        raise LimitError(limit_message(max_webhooks))
                head = int(conn.execute("SELECT COALESCE(MAX(seq), 0) FROM outbox").fetchone()[0])
                created = dataclasses.replace(webhook, start_seq=head)
                with _unique_url(conn, webhook.url):
                    conn.execute(_INSERT_WEBHOOK, rowmap.webhook_row(created))
            return created

        return await self._run(run)

    async def webhook(self, webhook_id: str) -> Webhook:
        return await self._run(lambda conn: _get_webhook(conn, webhook_id))

    async def webhooks(self) -> list[Webhook]:
        def run(conn: sqlite3.Connection) -> list[Webhook]:
            rows = conn.execute(
                f"SELECT {rowmap.WEBHOOK_COLUMNS} FROM webhooks ORDER BY created_ms, id"  # noqa: S608
            )
            return [rowmap.webhook(r) for r in rows]

        return await self._run(run)

    async def update_webhook(self, webhook: Webhook, fields: Collection[str] | None = None) -> None:
        names = rowmap.WEBHOOK_FIELDS[1:] if fields is None else rowmap.update_fields(fields)
        if not names:
            return
        values = dict(zip(rowmap.WEBHOOK_FIELDS, rowmap.webhook_row(webhook), strict=True))
        assignments = ", ".join(f"{name} = ?" for name in names)

        def run(conn: sqlite3.Connection) -> None:
            with _tx(conn), _unique_url(conn, webhook.url):
                changed = conn.execute(
                    f"UPDATE webhooks SET {assignments} WHERE id = ?",  # noqa: S608 - field names
                    (*(values[name] for name in names), webhook.id),
                ).rowcount
                if changed and "event_types" in names:
                    _drop_unwanted(conn, webhook, due_after_ms=webhook.updated_ms + SPARED_DUE_MS)
                if changed and rowmap.retries_now(webhook, names):
                    moved = int("url" in names)
                    args = {"hook": webhook.id, "now": webhook.updated_ms, "bump": moved}
                    conn.execute(_RETRY_NOW, args)
            if not changed:
                raise NotFoundError(f"no webhook with id {webhook.id!r}")

        await self._run(run)

    async def delete_webhook(self, webhook_id: str) -> None:
        def run(conn: sqlite3.Connection) -> None:
            with _tx(conn):
                conn.execute(
                    "DELETE FROM attempts WHERE delivery_id IN"
                    " (SELECT id FROM deliveries WHERE webhook_id = ?)",
                    (webhook_id,),
                )
                conn.execute("DELETE FROM deliveries WHERE webhook_id = ?", (webhook_id,))
                deleted = conn.execute("DELETE FROM webhooks WHERE id = ?", (webhook_id,)).rowcount
            if not deleted:
                raise NotFoundError(f"no webhook with id {webhook_id!r}")

        await self._run(run)

    async def webhook_failed(
        self, webhook_id: str, now_ms: int, disable_after_ms: int, restart_after_ms: int
    ) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            with _tx(conn):
                conn.execute(_NOTE_FAILURE, (now_ms, now_ms - restart_after_ms, webhook_id))
                disabled = conn.execute(
                    "UPDATE webhooks SET enabled = 0, updated_ms = ?, disabled_reason ="
                    " 'failing continuously since ' || failing_since_ms || ' (Unix ms)'"
                    " WHERE id = ? AND enabled = 1 AND failing_since_ms <= ?",
                    (now_ms, webhook_id, now_ms - disable_after_ms),
                ).rowcount
            return bool(disabled)

        return await self._run(run)

    async def webhook_succeeded(self, webhook_id: str) -> None:
        await self._run(
            lambda conn: _write(
                conn,
                "UPDATE webhooks SET failing_since_ms = NULL, last_failure_ms = NULL"
                " WHERE id = ? AND failing_since_ms IS NOT NULL",
                (webhook_id,),
            )
        )

    async def disable_webhook(self, webhook_id: str, reason: str, now_ms: int) -> None:
        await self._run(
            lambda conn: _write(
                conn,
                "UPDATE webhooks SET enabled = 0, disabled_reason = ?, updated_ms = ? WHERE id = ?",
                (reason, now_ms, webhook_id),
            )
        )

    async def fanout(self, limit: int, now_ms: int) -> int:
        def run(conn: sqlite3.Connection) -> int:
            # nothing new is the common answer: one read, no write transaction (profiled: an
            # empty pass cost as much as a full one)
            if not conn.execute(_FANOUT_PENDING, (rowmap.FANOUT,)).fetchone():
                return 0
            with _tx(conn, durable=False):
                row = conn.execute(
                    "SELECT seq FROM sink_cursors WHERE sink = ?", (rowmap.FANOUT,)
                ).fetchone()
                cursor = int(row[0]) if row else 0
                count, last = conn.execute(
                    "SELECT COUNT(*), MAX(seq) FROM"
                    " (SELECT seq FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?)",
                    (cursor, limit),
                ).fetchone()
                if not count:
                    return 0
                hooks = [
                    rowmap.webhook(r)
                    for r in conn.execute(
                        f"SELECT {rowmap.WEBHOOK_COLUMNS} FROM webhooks WHERE enabled = 1"  # noqa: S608
                    )
                ]
                # one INSERT … SELECT per webhook over the kinds its filter lets through: no
                # Python per event (profiled); the filter stays Webhook.wants
                for hook in hooks:
                    kinds = rowmap.wanted_kinds(hook)
                    if not kinds:
                        continue
                    conn.execute(
                        "INSERT INTO deliveries (webhook_id, seq, event_id, status,"  # noqa: S608
                        " next_attempt_ms, created_ms) SELECT ?, seq, event_id, 'pending', ?, ?"
                        " FROM outbox WHERE seq > ? AND seq <= ?"
                        f" AND kind IN ({', '.join('?' * len(kinds))})"
                        " ORDER BY seq ON CONFLICT (webhook_id, seq) DO NOTHING",
                        (hook.id, now_ms, now_ms, max(cursor, hook.start_seq), last, *kinds),
                    )
                conn.execute(
                    "INSERT INTO sink_cursors (sink, seq) VALUES (?, ?)"
                    " ON CONFLICT (sink) DO UPDATE SET seq = excluded.seq",
                    (rowmap.FANOUT, int(last)),
                )
            return int(count)

        return await self._run(run)

    async def due_deliveries(
        self, webhook_id: str, now_ms: int, limit: int, skip: Collection[int] = ()
    ) -> list[tuple[Delivery, OutboxEvent]]:
        held = orjson.dumps(list(skip))

        def run(conn: sqlite3.Connection) -> list[tuple[Delivery, OutboxEvent]]:
            # the rows as one JSON array, so one step: the sqlite3 module hands the GIL back
            # and forth around every row's step, and with the event loop busy each hand-back
            # waited for its next system call (profiled: a read of ~600 due rows took 11-30 ms
            # under load, long enough for the senders to run dry)
            (batch,) = conn.execute(_DUE_JSON, (webhook_id, now_ms, held, limit)).fetchone()
            rows = orjson.loads(batch)
            rows.sort(key=_due_order)  # json_group_array's input order is not promised
            return [_due(r) for r in rows]

        return await self._run(run)

    async def due_sends(
        self,
        webhook_id: str,
        now_ms: int,
        limit: int,
        skip: Collection[int] = (),
        *,
        kinds: Collection[str],
    ) -> list[DueSend]:
        held = orjson.dumps(list(skip))
        wanted = orjson.dumps(list(kinds))

        def run(conn: sqlite3.Connection) -> list[DueSend]:
            # as due_deliveries, with each body built by SQLite (C, the GIL released): building
            # two frozen dataclasses per row here and the body per attempt in the event loop's
            # thread were the dispatcher's largest Python costs besides aiohttp (profiled:
            # ~6 us a row of store-thread GIL time, ~6 us per attempt in the loop's thread)
            args = (webhook_id, now_ms, held, wanted, limit)
            (batch,) = conn.execute(_DUE_SENDS_JSON, args).fetchone()
            rows = orjson.loads(batch)
            rows.sort()  # by [next_attempt_ms, seq, …]: unique per webhook, the query's order
            return [DueSend(r[2], r[3], r[4], r[5], r[6].encode(), r[7], r[8]) for r in rows]

        return await self._run(run)

    async def drop_unwanted(self, webhook_id: str, skip: Collection[int] = ()) -> int:
        def run(conn: sqlite3.Connection) -> int:
            with _tx(conn):
                return _drop_unwanted(conn, _get_webhook(conn, webhook_id), skip=skip)

        return await self._run(run)

    async def next_due_ms(
        self, webhook_id: str, after_ms: int = -1, *, kinds: Collection[str] | None = None
    ) -> int | None:
        def run(conn: sqlite3.Connection) -> int | None:
            if kinds is None:
                row = conn.execute(
                    "SELECT MIN(next_attempt_ms) FROM deliveries"
                    " WHERE webhook_id = ? AND status = 'pending' AND next_attempt_ms > ?",
                    (webhook_id, after_ms),
                ).fetchone()
            else:  # the deliveries_due index in due order, to the first of a wanted kind
                row = conn.execute(
                    "SELECT d.next_attempt_ms FROM deliveries d JOIN outbox o ON o.seq = d.seq"
                    " WHERE d.webhook_id = ? AND d.status = 'pending' AND d.next_attempt_ms > ?"
                    " AND o.kind IN (SELECT value FROM json_each(?))"
                    " ORDER BY d.next_attempt_ms LIMIT 1",
                    (webhook_id, after_ms, orjson.dumps(list(kinds))),
                ).fetchone()
            return None if row is None or row[0] is None else int(row[0])

        return await self._run(run)

    async def finish_attempts(self, results: Sequence[tuple[Attempt, str, int, int]]) -> None:
        # the whole batch as one JSON parameter: two statements whatever its size, instead of
        # two per attempt, each binding values and handing the GIL back and forth (profiled)
        batch = orjson.dumps(
            [
                [
                    a.delivery_id,
                    a.attempted_ms,
                    a.status_code,
                    a.latency_ms,
                    a.response_excerpt,
                    a.error,
                    status,
                    next_ms,
                    read,
                ]
                for a, status, next_ms, read in results
            ]
        )

        def run(conn: sqlite3.Connection) -> None:
            with _tx(conn, durable=False):
                # a delivery deleted with its webhook while the attempt was in flight has
                # nothing left to record: skipped, the rest of the batch still commits; one
                # reset meanwhile (redeliver, recover: its version is no longer the one the
                # sender read) keeps its reset, the attempt is only its history
                conn.execute(_INSERT_ATTEMPTS, (batch,))
                conn.execute(_SETTLE_DELIVERIES, (batch,))

        await self._run(run)

    async def delivery(self, delivery_id: int) -> Delivery:
        return await self._run(lambda conn: _get_delivery(conn, delivery_id))

    async def deliveries(
        self, webhook_id: str, limit: int, status: str | None = None, *, before: int | None = None
    ) -> list[Delivery]:
        def run(conn: sqlite3.Connection) -> list[Delivery]:
            rows = conn.execute(*deliveries_query(webhook_id, limit, status, before))
            return [rowmap.delivery(r) for r in rows]

        return await self._run(run)

    async def attempts(self, delivery_id: int) -> list[Attempt]:
        def run(conn: sqlite3.Connection) -> list[Attempt]:
            rows = conn.execute(
                "SELECT delivery_id, attempted_ms, status_code, latency_ms, response_excerpt,"
                " error FROM attempts WHERE delivery_id = ? ORDER BY id",
                (delivery_id,),
            )
            return [Attempt(int(a), int(b), c, float(d), str(e), f) for a, b, c, d, e, f in rows]

        return await self._run(run)

    async def attempts_of(self, delivery_ids: Collection[int]) -> dict[int, list[Attempt]]:
        ids = sorted(set(delivery_ids))
        found: dict[int, list[Attempt]] = {i: [] for i in ids}
        if not ids:
            return found
        listed = orjson.dumps(ids)  # one parameter, however many (SQLite caps their number)

        def run(conn: sqlite3.Connection) -> dict[int, list[Attempt]]:
            rows = conn.execute(
                "SELECT delivery_id, attempted_ms, status_code, latency_ms, response_excerpt,"
                " error FROM attempts WHERE delivery_id IN (SELECT value FROM json_each(?))"
                " ORDER BY delivery_id, id",
                (listed,),
            )
            for a, b, c, d, e, f in rows:
                found[int(a)].append(Attempt(int(a), int(b), c, float(d), str(e), f))
            return found

        return await self._run(run)

    async def redeliver(self, delivery_id: int, now_ms: int) -> Delivery:
        def run(conn: sqlite3.Connection) -> Delivery:
            with _tx(conn):
                # only to an enabled webhook (a disabled one has no worker: it would wait unsent)
                # and of a kind its filter wants: the worker sends no other, so it would stay
                # pending for ever (a change in another transaction cannot come between this
                # check and the write: SQLite runs one write transaction at a time)
                _check_wanted(conn, delivery_id)
                # only while its event is in the outbox: the due read joins it, so a delivery
                # made pending without it would be neither sent nor ever dead-lettered
                changed = conn.execute(
                    "UPDATE deliveries SET status = 'pending', attempts = 0, next_attempt_ms = ?,"
                    " version = version + 1 WHERE id = ? AND EXISTS (SELECT 1 FROM outbox"
                    " WHERE outbox.seq = deliveries.seq)",
                    (now_ms, delivery_id),
                ).rowcount
            delivery = _get_delivery(conn, delivery_id)  # NotFoundError when there is none
            if not changed:
                raise GoneError(gone_message(delivery))
            return delivery

        return await self._run(run)

    async def recover(self, webhook_id: str, since_ms: int, now_ms: int) -> int:
        def run(conn: sqlite3.Connection) -> int:
            with _tx(conn):
                hook = _get_webhook(conn, webhook_id)
                if not hook.enabled:  # nothing would be sent until it is enabled again
                    raise DisabledError(disabled_message(hook))
                kinds = rowmap.wanted_kinds(hook)
                if not kinds:
                    return 0
                marks = ", ".join(f"?{n}" for n in range(4, 4 + len(kinds)))
                sql = rowmap.RECOVER.format(hook="?1", now="?2", since="?3", kinds=f"IN ({marks})")
                # an upsert's rowcount counts the rows it updated as well as those it inserted
                return int(conn.execute(sql, (webhook_id, now_ms, since_ms, *kinds)).rowcount)

        return await self._run(run)

    async def prune_dedup(self, before_ms: int) -> int:
        def run(conn: sqlite3.Connection) -> int:
            with _tx(conn):
                # the expression of the dedup_kept index, so the prune reads it off the index
                return conn.execute(
                    "DELETE FROM dedup WHERE event_id IN (SELECT event_id FROM dedup"
                    " WHERE max(occurred_ms, inserted_ms) < ?"
                    " ORDER BY max(occurred_ms, inserted_ms) LIMIT ?)",
                    (before_ms, rowmap.PRUNE_CHUNK),
                ).rowcount

        return await self._in_chunks(run)

    async def _in_chunks(self, run: Callable[[sqlite3.Connection], int]) -> int:
        """Repeat a deleting transaction until it removes less than a chunk; the total.
        Chunked, so polling and sinks get the writer between transactions."""
        pruned = 0
        while True:
            removed = await self._run(run)
            pruned += removed
            if removed < rowmap.PRUNE_CHUNK:
                return pruned

    async def prune_outbox(self, before_ms: int, sinks: Sequence[str]) -> int:
        def run(conn: sqlite3.Connection) -> int:
            with _tx(conn):
                # Every stored cursor holds, configured here or not: a sink left out of this
                # replica's config (or of the config for a while) still owes its events.
                found = dict(conn.execute("SELECT sink, seq FROM sink_cursors").fetchall())
                # A reader without a cursor has read nothing yet.
                names = {rowmap.FANOUT, *sinks, *found}
                below = min(int(found.get(name, 0)) for name in names)
                if below <= 0:
                    return 0
                # Strictly below: the newest row stays, so MAX(seq) is still the outbox head.
                # Deliveries read their event from the outbox when due (pending) or when
                # redelivered (dead): those rows stay, whatever their age.
                return conn.execute(
                    "DELETE FROM outbox WHERE seq IN (SELECT seq FROM outbox"
                    " WHERE seq < ? AND committed_ms < ? AND seq NOT IN"
                    " (SELECT seq FROM deliveries WHERE status != 'delivered')"
                    " ORDER BY seq LIMIT ?)",
                    (below, before_ms, rowmap.PRUNE_CHUNK),
                ).rowcount

        return await self._in_chunks(run)

    async def prune_deliveries(self, before_ms: int) -> int:
        def run(conn: sqlite3.Connection) -> int:
            with _tx(conn):  # attempts go with their delivery (ON DELETE CASCADE)
                return conn.execute(
                    "DELETE FROM deliveries WHERE id IN (SELECT id FROM deliveries"
                    " WHERE status = 'delivered' AND delivered_ms < ? ORDER BY id LIMIT ?)",
                    (before_ms, rowmap.PRUNE_CHUNK),
                ).rowcount

        return await self._in_chunks(run)

    async def dedup_count(self) -> int:
        def run(conn: sqlite3.Connection) -> int:
            return int(conn.execute("SELECT COUNT(*) FROM dedup").fetchone()[0])

        return await self._run(run)

    async def overview(self) -> Overview:
        def run(conn: sqlite3.Connection) -> Overview:
            streams = {
                (str(scope), str(state)): int(n)
                for scope, state, n in conn.execute(
                    "SELECT scope, CASE WHEN retired THEN 'retired' WHEN paused THEN 'paused'"
                    " ELSE 'active' END AS state, COUNT(*) FROM streams GROUP BY scope, state"
                )
            }
            marks = {
                (str(scope), Kind(kind)): (int(oldest), int(newest))
                for scope, kind, oldest, newest in conn.execute(
                    "SELECT s.scope, w.kind, MIN(w.watermark_ms), MAX(w.watermark_ms)"
                    " FROM watermarks w JOIN streams s ON s.id = w.stream_id"
                    " WHERE s.retired = 0 AND s.paused = 0 GROUP BY s.scope, w.kind"
                )
            }
            pending = conn.execute(
                "SELECT COUNT(*) FROM deliveries WHERE status = 'pending'"
            ).fetchone()[0]
            return Overview(streams, marks, int(pending))

        return await self._run(run)

    # -- operations: status, operator holds, replay, run-time targets --------------------------

    async def sink_cursors(self) -> dict[str, int]:
        def run(conn: sqlite3.Connection) -> dict[str, int]:
            return {str(k): int(v) for k, v in conn.execute("SELECT sink, seq FROM sink_cursors")}

        return await self._run(run)

    async def forget_sink(self, sink: str) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            with _tx(conn):
                return conn.execute("DELETE FROM sink_cursors WHERE sink = ?", (sink,)).rowcount > 0

        return await self._run(run)

    async def dead_letter_counts(self) -> dict[str, int]:
        def run(conn: sqlite3.Connection) -> dict[str, int]:
            rows = conn.execute("SELECT sink, COUNT(*) FROM dead_letters GROUP BY sink")
            return {str(k): int(v) for k, v in rows}

        return await self._run(run)

    async def delivery_counts(self) -> dict[str, DeliveryCounts]:
        def run(conn: sqlite3.Connection) -> dict[str, DeliveryCounts]:
            rows = conn.execute(
                "SELECT webhook_id, SUM(status = 'pending'), SUM(status = 'dead'),"
                " MIN(CASE WHEN status = 'pending' THEN seq END) FROM deliveries"
                " WHERE status IN ('pending', 'dead') GROUP BY webhook_id"
            )
            return {
                str(w): DeliveryCounts(int(p), int(d), None if o is None else int(o))
                for w, p, d, o in rows
            }

        return await self._run(run)

    async def hold_account(self, account: str, reason: str, now_ms: int) -> None:
        await self._run(
            lambda conn: _write(
                conn,
                "INSERT INTO account_holds (account, reason, held_ms) VALUES (?, ?, ?)"
                " ON CONFLICT (account) DO UPDATE SET reason = excluded.reason",
                (account, reason[:1000], now_ms),
            )
        )

    async def release_account(self, account: str) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            with _tx(conn):
                deleted = conn.execute(
                    "DELETE FROM account_holds WHERE account = ?", (account,)
                ).rowcount
            return bool(deleted)

        return await self._run(run)

    async def account_holds(self) -> dict[str, tuple[int, str]]:
        def run(conn: sqlite3.Connection) -> dict[str, tuple[int, str]]:
            rows = conn.execute("SELECT account, held_ms, reason FROM account_holds")
            return {str(a): (int(h), str(r)) for a, h, r in rows}

        return await self._run(run)

    async def request_replay(self, stream_ids: Sequence[int], since_ms: int, now_ms: int) -> int:
        def run(conn: sqlite3.Connection) -> int:
            with _tx(conn):
                before = conn.total_changes
                conn.executemany(
                    "UPDATE streams SET replay_from_ms = MIN(COALESCE(replay_from_ms, ?), ?),"
                    " replay_asked = replay_asked + 1, next_due_ms = MIN(next_due_ms, ?)"
                    " WHERE id = ?",
                    [(since_ms, since_ms, now_ms, sid) for sid in stream_ids],
                )
                return conn.total_changes - before

        return await self._run(run)

    async def stream_replay(self, stream_id: int) -> ReplayRequest | None:
        def run(conn: sqlite3.Connection) -> ReplayRequest | None:
            row = conn.execute(
                "SELECT replay_from_ms, replay_asked FROM streams WHERE id = ?", (stream_id,)
            ).fetchone()
            return (
                None if row is None or row[0] is None else ReplayRequest(int(row[0]), int(row[1]))
            )

        return await self._run(run)

    async def replays(self) -> dict[int, int]:
        def run(conn: sqlite3.Connection) -> dict[int, int]:
            rows = conn.execute(
                "SELECT id, replay_from_ms FROM streams WHERE replay_from_ms IS NOT NULL"
            )
            return {int(i): int(r) for i, r in rows}

        return await self._run(run)

    async def commit_replay_page(
        self,
        stream_id: int,
        activities: Sequence[Activity],
        now_ms: int,
        since_ms: int,
        *,
        lease: StreamLease | None = None,
    ) -> tuple[int, int]:
        def run(conn: sqlite3.Connection) -> tuple[int, int]:
            new = 0
            rows: list[tuple[object, ...]] = []
            done: set[bytes] = set()  # a page may repeat one: it is appended once
            with _tx(conn):
                for activity in activities:
                    key = activity.event_id_bytes
                    if key in done:
                        continue
                    done.add(key)
                    inserted = conn.execute(
                        "INSERT INTO dedup (event_id, occurred_ms, inserted_ms) VALUES (?, ?, ?)"
                        " ON CONFLICT (event_id) DO NOTHING",
                        (key, activity.occurred_ms, now_ms),
                    ).rowcount
                    new += inserted
                    if inserted or activity.occurred_ms >= since_ms:
                        rows.append(rowmap.outbox_row(key, activity, stream_id, now_ms))
                conn.executemany(_INSERT_OUTBOX, rows)
            return new, len(rows)

        return await self._run(run)

    async def count_outbox(self, selector: OutboxSelector) -> OutboxRange:
        def run(conn: sqlite3.Connection) -> OutboxRange:
            where, args = _selection(selector)
            row = conn.execute(
                # an event replayed before is in the log twice: it goes out once per replay
                f"SELECT COUNT(DISTINCT event_id), MIN(seq), MAX(seq) FROM outbox"  # noqa: S608
                f" WHERE {where}",
                args,
            ).fetchone()
            return OutboxRange(int(row[0]), int(row[1] or 0), int(row[2] or 0))

        return await self._run(run)

    async def replay_outbox(self, selector: OutboxSelector, now_ms: int) -> OutboxRange:
        def run(conn: sqlite3.Connection) -> OutboxRange:
            where, args = _selection(selector)
            with _tx(conn):
                head = int(conn.execute("SELECT COALESCE(MAX(seq), 0) FROM outbox").fetchone()[0])
                conn.execute(
                    "INSERT INTO outbox (event_id, account, stream_id, kind, campaign_id,"  # noqa: S608
                    " contact_id, occurred_ms, committed_ms, data)"
                    " SELECT event_id, account, stream_id, kind, campaign_id, contact_id,"
                    " occurred_ms, ?, data FROM outbox WHERE seq IN"
                    f" (SELECT MIN(seq) FROM outbox WHERE {where} AND seq <= ? GROUP BY event_id)"
                    " ORDER BY seq",
                    (now_ms, *args, head),
                )
                row = conn.execute(
                    "SELECT COUNT(*), MIN(seq), MAX(seq) FROM outbox WHERE seq > ?", (head,)
                ).fetchone()
            return OutboxRange(int(row[0]), int(row[1] or 0), int(row[2] or 0))

        return await self._run(run)

    async def remove_targets(self, keys: Sequence[StreamKey], now_ms: int) -> int:
        def run(conn: sqlite3.Connection) -> int:
            existed = 0
            with _tx(conn):
                for key in keys:
                    row = (key.account, key.scope, key.resource_id)
                    if not conn.execute(
                        "UPDATE streams SET retired = 1"
                        " WHERE account = ? AND scope = ? AND resource_id = ? AND retired = 0",
                        row,
                    ).rowcount:
                        continue  # not polled: nothing to remove, no mark either
                    existed += 1
                    conn.execute(
                        "INSERT INTO removed_targets (account, scope, resource_id, removed_ms)"
                        " VALUES (?, ?, ?, ?) ON CONFLICT (account, scope, resource_id) DO NOTHING",
                        (*row, now_ms),
                    )
                    conn.execute(
                        "DELETE FROM added_targets"
                        " WHERE account = ? AND scope = ? AND resource_id = ?",
                        row,
                    )
            return existed

        return await self._run(run)

    async def _targets(self, table: str, account: str) -> set[StreamKey]:
        """The account's targets listed in ``table`` (removed_targets or added_targets)."""

        def run(conn: sqlite3.Connection) -> set[StreamKey]:
            rows = conn.execute(
                f"SELECT scope, resource_id FROM {table} WHERE account = ?",  # noqa: S608 - constant table names
                (account,),
            )
            return {StreamKey(account, str(s), str(r)) for s, r in rows}

        return await self._run(run)

    async def removed_targets(self, account: str) -> set[StreamKey]:
        return await self._targets("removed_targets", account)

    async def add_targets(self, keys: Sequence[StreamKey], now_ms: int) -> None:
        def run(conn: sqlite3.Connection) -> None:
            rows = [(k.account, k.scope, k.resource_id) for k in keys]
            with _tx(conn):
                conn.executemany(
                    "DELETE FROM removed_targets"
                    " WHERE account = ? AND scope = ? AND resource_id = ?",
                    rows,
                )
                conn.executemany(
                    "INSERT INTO added_targets (account, scope, resource_id, added_ms)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (account, scope, resource_id) DO NOTHING",
                    [(*row, now_ms) for row in rows],
                )

        await self._run(run)

    async def added_targets(self, account: str) -> set[StreamKey]:
        return await self._targets("added_targets", account)

    async def stream_stats(self) -> dict[str, StreamStats]:
        def run(conn: sqlite3.Connection) -> dict[str, StreamStats]:
            oldest = dict(
                conn.execute(
                    "SELECT s.account, MIN(w.watermark_ms) FROM watermarks w"
                    " JOIN streams s ON s.id = w.stream_id WHERE s.retired = 0 AND s.paused = 0"
                    " GROUP BY s.account"
                ).fetchall()
            )
            rows = conn.execute(
                "SELECT account, COUNT(*), SUM(retired = 0 AND paused = 0),"
                " SUM(retired = 0 AND paused = 0 AND consecutive_errors > 0),"
                " SUM(retired = 0 AND paused = 1), SUM(retired = 1),"
                " SUM(replay_from_ms IS NOT NULL) FROM streams GROUP BY account"
            )
            return {
                str(a): StreamStats(
                    int(t),
                    int(ac),
                    int(f),
                    int(p),
                    int(r),
                    int(rp),
                    None if oldest.get(a) is None else int(oldest[a]),
                )
                for a, t, ac, f, p, r, rp in rows
            }

        return await self._run(run)

    async def stream_page(
        self, where: StreamFilter, limit: int, offset: int
    ) -> tuple[list[Stream], int]:
        def run(conn: sqlite3.Connection) -> tuple[list[Stream], int]:
            clause, args = _stream_filter(where)
            total = int(
                conn.execute(
                    f"SELECT COUNT(*) FROM streams WHERE {clause}",  # noqa: S608
                    args,
                ).fetchone()[0]
            )
            rows = conn.execute(
                f"SELECT {rowmap.STREAM_COLUMNS} FROM streams WHERE {clause}"  # noqa: S608
                " ORDER BY id LIMIT ? OFFSET ?",
                (*args, limit, offset),
            ).fetchall()
            marks: dict[int, dict[Kind, int]] = {}
            ids = [int(row[0]) for row in rows]
            for sid, kind, ms in conn.execute(
                "SELECT stream_id, kind, watermark_ms FROM watermarks WHERE stream_id IN"  # noqa: S608
                f" ({', '.join('?' for _ in ids)})",
                ids,
            ):
                marks.setdefault(int(sid), {})[Kind(kind)] = int(ms)
            return [rowmap.stream(row, marks.get(int(row[0]), {})) for row in rows], total

        return await self._run(run)


@contextlib.contextmanager
def _tx(conn: sqlite3.Connection, *, durable: bool = True) -> Iterator[None]:
    """BEGIN IMMEDIATE … COMMIT, or ROLLBACK on any error: one store call, one transaction.

    ``durable=False`` commits without an fsync (``synchronous=NORMAL``): the transaction
    survives a crash of the process, and a power cut may undo it together with everything
    committed after it, never alone (the WAL is replayed in order). For webhook bookkeeping
    and the Kafka cursor only, where being undone means sending again with the same id.
    """
    if not durable:
        conn.execute("PRAGMA synchronous=NORMAL")
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    finally:
        if not durable:
            conn.execute("PRAGMA synchronous=FULL")


def _next_due(due: str, handled: str) -> str:
    """``rowmap.NEXT_DUE`` with these parameters."""
    return rowmap.NEXT_DUE.format(due=due, handled=handled, least="MIN")


def _asked(replay: ReplayRequest | None) -> int | None:
    """The request count ``_next_due`` compares with (None: the pass ran no replay)."""
    return None if replay is None else replay.asked


def _write(conn: sqlite3.Connection, sql: str, args: tuple[object, ...]) -> None:
    with _tx(conn):
        conn.execute(sql, args)


def _version(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
    return int(row[0] or 0)


def _migrate(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY)")
    current = _version(conn)
    if current > len(MIGRATIONS):
        raise sqlite3.DatabaseError(
            f"schema version {current} is newer than this relay knows ({len(MIGRATIONS)});"
            " run a newer ctct-relay"
        )
    for version, script in enumerate(MIGRATIONS, start=1):
        if version <= current:
            continue
        with _tx(conn):
            for statement in script:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))


def _watermarks(conn: sqlite3.Connection, stream_id: int | None) -> dict[int, dict[Kind, int]]:
    where, args = ("WHERE stream_id = ?", (stream_id,)) if stream_id is not None else ("", ())
    out: dict[int, dict[Kind, int]] = {}
    for sid, kind, ms in conn.execute(
        f"SELECT stream_id, kind, watermark_ms FROM watermarks {where}",  # noqa: S608
        args,
    ):
        out.setdefault(int(sid), {})[Kind(kind)] = int(ms)
    return out


_BATCH = (
    "WITH batch AS (SELECT json_extract(value, '$[0]') AS id, json_extract(value, '$[1]') AS at,"
    " json_extract(value, '$[2]') AS code, json_extract(value, '$[3]') AS latency,"
    " json_extract(value, '$[4]') AS excerpt, json_extract(value, '$[5]') AS error,"
    " json_extract(value, '$[6]') AS status, json_extract(value, '$[7]') AS next_ms,"
    " json_extract(value, '$[8]') AS read"
    " FROM json_each(?))"
)
_INSERT_ATTEMPTS = (
    f"{_BATCH} INSERT"  # noqa: S608 - constants only
    "  INTO attempts (delivery_id, attempted_ms, status_code, latency_ms,"
    " response_excerpt, error) SELECT id, at, code, latency, excerpt, error FROM batch"
    " WHERE id IN (SELECT id FROM deliveries)"
)
_SETTLE_DELIVERIES = (
    f"{_BATCH} UPDATE"  # noqa: S608 - constants only
    "  deliveries SET status = batch.status, attempts = attempts + 1, version = version + 1,"
    " next_attempt_ms = batch.next_ms, last_status = batch.code, last_error = batch.error,"
    " delivered_ms = CASE WHEN batch.status = 'delivered' THEN batch.at ELSE delivered_ms END"
    " FROM batch WHERE deliveries.id = batch.id AND deliveries.version = batch.read"
)
_RETRY_NOW = rowmap.RETRY_NOW.format(hook=":hook", now=":now", bump=":bump", least="MIN")
# the failing clock (Store.webhook_failed): started, or restarted when its last noted failure is
# older than the silence allowed (every SET expression reads the row as it was before)
_NOTE_FAILURE = (
    "UPDATE webhooks SET failing_since_ms = CASE WHEN failing_since_ms IS NULL"
    " OR last_failure_ms IS NULL OR last_failure_ms < ?2 THEN ?1 ELSE failing_since_ms END,"
    " last_failure_ms = ?1 WHERE id = ?3"
)
_FANOUT_PENDING = (
    "SELECT 1 FROM outbox WHERE seq >"
    " COALESCE((SELECT seq FROM sink_cursors WHERE sink = ?), 0) LIMIT 1"
)
_DELIVERY_COLUMNS_D = ", ".join(f"d.{c.strip()}" for c in rowmap.DELIVERY_COLUMNS.split(","))
# the data column holds UTF-8 JSON: as text it is one JSON string that decodes to the same bytes
_DUE_JSON = (
    "SELECT json_group_array(json_array(id, webhook_id, seq, event_id, status, attempts,"  # noqa: S608
    " next_attempt_ms, last_status, last_error, created_ms, delivered_ms, o_seq, o_event_id,"
    " o_account, o_kind, o_campaign_id, o_contact_id, o_occurred_ms, o_committed_ms, o_data))"
    f" FROM (SELECT {_DELIVERY_COLUMNS_D}, o.seq AS o_seq, o.event_id AS o_event_id,"
    " o.account AS o_account, o.kind AS o_kind, o.campaign_id AS o_campaign_id,"
    " o.contact_id AS o_contact_id, o.occurred_ms AS o_occurred_ms,"
    " o.committed_ms AS o_committed_ms, CAST(o.data AS TEXT) AS o_data"
    " FROM deliveries d JOIN outbox o ON o.seq = d.seq"
    " WHERE d.webhook_id = ? AND d.status = 'pending' AND d.next_attempt_ms <= ?"
    " AND d.id NOT IN (SELECT value FROM json_each(?)) ORDER BY d.next_attempt_ms, d.seq LIMIT ?)"
)

# OutboxEvent.structured() in SQL, byte for byte (orjson's compact output of attributes(), then
# the data as stored; json_quote escapes as orjson does, a test compares them on awkward text)
_BODY = (
    f'\'{{"specversion":"{SPECVERSION}","id":\' || json_quote(o.event_id)'
    " || ',\"source\":' || json_quote('ctct://' || o.account || '/campaigns/' || o.campaign_id)"
    f' || \',"type":"{TYPE_PREFIX}\' || o.kind || \'","subject":\' || json_quote(o.contact_id)'
    " || ',\"time\":\"' || strftime('%Y-%m-%dT%H:%M:%fZ', o.occurred_ms / 1000.0, 'unixepoch')"
    f' || \'","datacontenttype":"{DATA_CONTENT_TYPE}","data":\' || CAST(o.data AS TEXT)'
    " || '}'"
)
_DUE_SENDS_JSON = (
    "SELECT json_group_array(json_array(next_ms, seq, id, attempts, event_id, committed_ms,"  # noqa: S608
    " body, kind, version)) FROM (SELECT d.next_attempt_ms AS next_ms, d.seq AS seq,"
    " d.id AS id, d.attempts AS attempts, d.event_id AS event_id, o.committed_ms AS committed_ms,"
    f" {_BODY} AS body, o.kind AS kind, d.version AS version"
    " FROM deliveries d JOIN outbox o ON o.seq = d.seq"
    " WHERE d.webhook_id = ? AND d.status = 'pending' AND d.next_attempt_ms <= ?"
    " AND d.id NOT IN (SELECT value FROM json_each(?))"
    # the wanted kinds (a JSON array): rows of others are left out, not counted in the limit
    " AND o.kind IN (SELECT value FROM json_each(?)) ORDER BY d.next_attempt_ms, d.seq LIMIT ?)"
)


@contextlib.contextmanager
def _unique_url(conn: sqlite3.Connection, url: str) -> Iterator[None]:
    """Turns a violation of the unique index on ``webhooks.url`` into DuplicateError."""
    try:
        yield
    except sqlite3.IntegrityError as exc:
        if "webhooks.url" not in str(exc):
            raise
        row = conn.execute("SELECT id FROM webhooks WHERE url = ?", (url,)).fetchone()
        holder = f" as webhook {row[0]}" if row else ""
        raise DuplicateError(f"url: already registered{holder}") from None


_INSERT_WEBHOOK = (
    f"INSERT INTO webhooks ({rowmap.WEBHOOK_COLUMNS})"  # noqa: S608 - column names are constants
    f" VALUES ({', '.join('?' for _ in rowmap.WEBHOOK_COLUMNS.split(','))})"
)


def _drop_unwanted(
    conn: sqlite3.Connection,
    hook: Webhook,
    *,
    due_after_ms: int | None = None,
    skip: Collection[int] = (),
) -> int:
    """A filter changed: the webhook's pending deliveries its filter now rejects go, with their
    attempts, as ``delete_webhook``'s do (they would otherwise be retried for a day or more),
    but those due by ``due_after_ms`` and those in ``skip`` (possibly in flight: see
    Store.update_webhook); returns how many."""
    kinds = rowmap.unwanted_kinds(hook)
    if not kinds:
        return 0
    where = rowmap.UNWANTED_PENDING.format(hook="?", kinds=f"IN ({', '.join('?' * len(kinds))})")
    args: tuple[object, ...] = (hook.id, *kinds)
    if due_after_ms is not None:
        where, args = f"{where} AND next_attempt_ms > ?", (*args, due_after_ms)
    if skip:
        where += " AND id NOT IN (SELECT value FROM json_each(?))"
        args = (*args, orjson.dumps(list(skip)))
    conn.execute(
        f"DELETE FROM attempts WHERE delivery_id IN (SELECT id FROM deliveries WHERE {where})",  # noqa: S608
        args,
    )
    return int(conn.execute(f"DELETE FROM deliveries WHERE {where}", args).rowcount)  # noqa: S608


def _check_wanted(conn: sqlite3.Connection, delivery_id: int) -> None:
    """DisabledError when the delivery's webhook is disabled, UnwantedError when its event is of
    a kind the webhook's filter rejects (no answer when the delivery or its event is gone: the
    caller says which)."""
    row = conn.execute(rowmap.DELIVERY_KIND.format(id="?"), (delivery_id,)).fetchone()
    if row is None:
        return
    webhook_id, kind = row
    hook = _get_webhook(conn, webhook_id)
    if not hook.enabled:
        raise DisabledError(disabled_message(hook))
    if not hook.wants(rowmap.KINDS[kind].event_type):
        raise UnwantedError(unwanted_message(_get_delivery(conn, delivery_id), kind, hook))


def _get_webhook(conn: sqlite3.Connection, webhook_id: str) -> Webhook:
    row = conn.execute(
        f"SELECT {rowmap.WEBHOOK_COLUMNS} FROM webhooks WHERE id = ?",  # noqa: S608
        (webhook_id,),
    ).fetchone()
    if row is None:
        raise NotFoundError(f"no webhook with id {webhook_id!r}")
    return rowmap.webhook(row)


def deliveries_query(
    webhook_id: str, limit: int, status: str | None, before: int | None
) -> tuple[str, tuple[object, ...]]:
    """The SQL and arguments of one page of :meth:`SqliteStore.deliveries` (newest first; the
    index ``deliveries_webhook`` serves it, which a test checks with ``EXPLAIN QUERY PLAN``)."""
    where = "webhook_id = ?"
    args: tuple[object, ...] = (webhook_id,)
    if status:
        where, args = where + " AND status = ?", (*args, status)
    if before is not None:
        where, args = where + " AND id < ?", (*args, before)
    sql = (
        f"SELECT {rowmap.DELIVERY_COLUMNS} FROM deliveries WHERE {where}"  # noqa: S608
        " ORDER BY id DESC LIMIT ?"
    )
    return sql, (*args, limit)


def _get_delivery(conn: sqlite3.Connection, delivery_id: int) -> Delivery:
    row = conn.execute(
        f"SELECT {rowmap.DELIVERY_COLUMNS} FROM deliveries WHERE id = ?",  # noqa: S608
        (delivery_id,),
    ).fetchone()
    if row is None:
        raise NotFoundError(f"no delivery with id {delivery_id}")
    return rowmap.delivery(row)


def _due(r: Sequence[Any]) -> tuple[Delivery, OutboxEvent]:
    # one row of _DUE_JSON, without slicing; JSON keeps ints as ints, the data comes as text
    # (this runs for every attempt: profiled, it was the store thread's largest Python cost)
    return (
        Delivery(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], r[10]),
        OutboxEvent(
            r[11], r[12], r[13], rowmap.KINDS[r[14]], r[15], r[16], r[17], r[18], r[19].encode()
        ),
    )


def _due_order(r: Sequence[Any]) -> tuple[int, int]:
    return r[6], r[2]  # next_attempt_ms, seq: the order of the query


def _existing_ids(conn: sqlite3.Connection, keys: list[bytes]) -> list[bytes]:
    """Which of ``keys`` (event ids, 16 bytes each) the dedup table already holds: one
    statement however many keys (see ``commit_page``)."""
    found = conn.execute(_SEEN_IDS, (b"".join(keys), len(keys))).fetchall()
    return [bytes(row[0]) for row in found]


# The page's ids go in as one blob of 16-byte ids (uuid5 bytes), split by substr(); CROSS JOIN
# keeps the ids the outer loop, so each is one primary-key search however large dedup grows.
_SEEN_IDS = (
    "WITH RECURSIVE i(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM i WHERE n + 1 < ?2)"
    " SELECT d.event_id FROM i CROSS JOIN dedup AS d ON d.event_id = substr(?1, i.n * 16 + 1, 16)"
)
_INSERT_DEDUP = (
    "INSERT INTO dedup (event_id, occurred_ms, inserted_ms)"
    " SELECT substr(?1, key * 16 + 1, 16), value, ?3 FROM json_each(?2)"
)
# A page as one statement: ids and data (most of a row's bytes) as two blobs read with substr(),
# O(1) on a BLOB, the ids 36 bytes each and the data at the offset and length its row gives; the
# rest of each row a short JSON array. SQLite (3.40 here) parses a row's JSON again for each
# ->> (no parse cache before 3.45): with the data and ids inside it, as before, the statement
# cost 6.9 us a row of the store thread's CPU, now 3.2 (2,000-row pages).
# stream_id and committed_ms are the same for every row of a commit: parameters.
_INSERT_OUTBOX_PAGE = (
    "INSERT INTO outbox (event_id, account, stream_id, kind, campaign_id, contact_id, occurred_ms,"
    " committed_ms, data) SELECT CAST(substr(?2, key * 36 + 1, 36) AS TEXT), value ->> 0, ?4,"
    " value ->> 1, value ->> 2, value ->> 3, value ->> 4, ?5, substr(?3, value ->> 5, value ->> 6)"
    " FROM json_each(?1) ORDER BY key"
)


def _page_args(
    rows: Sequence[tuple[Any, ...]], stream_id: int, committed_ms: int
) -> tuple[bytes, bytes, bytes, int, int]:
    """``_INSERT_OUTBOX_PAGE``'s parameters for ``outbox_row`` tuples of one commit."""
    ids = "".join([row[0] for row in rows]).encode()
    if len(ids) != 36 * len(rows):  # format_id's 8-4-4-4-12 form, ASCII: never, but checked
        raise StoreError("outbox event ids must be 36 characters")
    data = b"".join([row[8] for row in rows])
    columns = []
    offset = 1  # substr() counts from 1
    for row in rows:
        size = len(row[8])
        columns.append((row[1], row[3], row[4], row[5], row[6], offset, size))
        offset += size
    return orjson.dumps(columns), ids, data, stream_id, committed_ms


_INSERT_OUTBOX = (
    "INSERT INTO outbox (event_id, account, stream_id, kind, campaign_id, contact_id, occurred_ms,"
    " committed_ms, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _selection(selector: OutboxSelector) -> tuple[str, tuple[object, ...]]:
    """The WHERE clause (and its arguments) of the events a log replay selects."""
    column = "occurred_ms" if selector.by_activity_time else "committed_ms"
    where = f"account = ? AND {column} >= ?"
    args: tuple[object, ...] = (selector.account, selector.since_ms)
    if selector.stream_id is not None:
        where += " AND stream_id = ?"
        args += (selector.stream_id,)
    if selector.campaign_id is not None:
        where += " AND campaign_id = ?"
        args += (selector.campaign_id,)
    return where, args


def _stream_filter(where: StreamFilter) -> tuple[str, tuple[object, ...]]:
    """The WHERE clause (and arguments) of a stream listing; only constants are interpolated."""
    clauses = ["1 = 1"]
    args: list[object] = []
    if where.account is not None:
        clauses.append("account = ?")
        args.append(where.account)
    if where.scope is not None:
        clauses.append("scope = ?")
        args.append(where.scope)
    if where.state is not None:
        if where.state not in rowmap.STATE_CLAUSES:
            raise StoreError(f"unknown stream state {where.state!r}")
        clauses.append(rowmap.STATE_CLAUSES[where.state])
    if where.replaying is not None:
        clauses.append(f"replay_from_ms IS {'NOT ' if where.replaying else ''}NULL")
    return " AND ".join(clauses), tuple(args)
