"""How replicas sharing one store divide the work: stream leases, named leases, shared budgets.

A *stream lease* says which replica polls a stream: a replica claims due streams with
``SELECT … FOR UPDATE SKIP LOCKED`` (two replicas claiming at once never get the same stream),
marks them with its id, an expiry and the next epoch of the stream's lease, renews them while
the pass runs and releases them after. A replica that dies stops renewing; once its leases
expire, another claims the streams. A replica that was only paused (SIGSTOP, a frozen VM, a long
GC) past its lease's expiry wakes up with its pass still running: the claim's owner and epoch
(:class:`StreamLease`, ``lease``) are that pass's fencing token, which each of its writes checks
in its own transaction, so once another replica claimed the stream the old pass can write
nothing more (neither pages nor bookkeeping) and ends.
A *named lease* does the same for one thing at a time: the Kafka sink (one publisher keeps each
contact's order), one webhook's deliveries (its concurrency limit holds), a periodic job.
The *shared budget* is a request log per budget (one per api_key, named ``key:<hex>``; the
``account`` column holds that name): each request is inserted before it is sent, under an
advisory lock per budget, so the per-second limit and the daily quota are counted for the whole
deployment and for every account using the key.

Lease expiries, the request log and the quota's UTC day are on the database's clock, so
replicas' clocks need not agree (a replica whose clock ran a few minutes ahead used to count its
requests on the next day's quota from its own midnight on, beside the others still spending
today's); ``request_margin_s`` widens each account's window for the time between a request's
admission and its arrival upstream.

On SQLite there is one process: :class:`LocalCoordinator` claims what is due, always holds every
lease and leaves the budget to the in-process rate limiter.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from asyncpg import Connection

from relay.store.base import Store, StreamLease
from relay.store.postgres import BUDGET_NS, DB_NOW_MS, PostgresSettings, PostgresStore

_DAY_MS = 86_400_000
_LOG_KEEP_MS = 60_000  # request log rows older than this are deleted as new ones come


@dataclass(frozen=True, slots=True)
class Reservation:
    """The answer of the shared budget to one request: admitted (counted, send it now), or wait
    ``wait_ms`` and ask again, or (neither) today's allowance is spent."""

    admitted: bool
    wait_ms: int
    used_today: int
    sent_ms: int = 0  # when the request log took it (the store's clock); 0: not logged
    day: str = ""  # the UTC day (YYYY-MM-DD) counted: the store's, if it has a clock
    day_left_ms: int = 0  # until that day ends, by the same clock


class Coordinator(Protocol):
    """Leases and the shared budget of one replica."""

    replica: str
    lease_s: float
    shared_budget: bool  # whether reserve_request counts for the whole deployment

    async def claim_streams(
        self, account: str, now_ms: int, limit: int, exclude: Collection[int]
    ) -> list[int]:
        """Lease up to ``limit`` of the account's active streams due by ``now_ms``, soonest
        first, that no replica holds (``exclude``: this replica's passes in flight)."""

    async def renew_streams(self, stream_ids: Collection[int]) -> set[int]:
        """Extend these stream leases (the claims this replica made); returns those it still
        holds."""

    async def release_streams(self, stream_ids: Collection[int]) -> None:
        """Give these streams back (their pass is over), each only if this replica's claim of
        it is still the stream's lease."""

    def lease(self, stream_id: int) -> StreamLease | None:
        """The claim this replica made of a stream it claimed and has not released: the
        fencing token its pass hands the store's writes. None: nothing to fence (SQLite)."""

    async def hold(self, names: Sequence[str]) -> set[str]:
        """Take or extend named leases; returns the names this replica holds now."""

    async def release(self, names: Sequence[str]) -> None:
        """Give named leases back, so another replica need not wait for their expiry."""

    async def watch_commits(self, wake: Callable[[], None], stop: asyncio.Event) -> None:
        """Call ``wake`` when another replica commits outbox events, until ``stop`` (so the
        sinks here need not wait for their next idle poll)."""

    async def reserve_request(
        self, account: str, day: str, now_ms: int, burst: int, window_ms: int, allowance: int
    ) -> Reservation:
        """Admit one request of the account if no window of ``window_ms`` (plus the margin)
        would hold more than ``burst`` and today's count is below ``allowance``. ``now_ms`` and
        ``day`` are the caller's clock, for stores without one of their own (PostgreSQL uses
        its own for both: ``Reservation.day`` says which day was counted)."""

    async def return_request(self, account: str, day: str, sent_ms: int) -> int:
        """Take back a request admitted at ``sent_ms`` (``Reservation.sent_ms``) that was never
        sent: out of the request log and the count of the day it was counted on (``day``, or
        the store's day of ``sent_ms``); returns the count left."""


class LocalCoordinator:
    """One process owns the store: everything due is claimable, every lease is held."""

    shared_budget = False

    def __init__(self, store: Store, replica: str, lease_s: float = 15.0) -> None:
        self._store = store
        self.replica = replica
        self.lease_s = lease_s

    async def claim_streams(
        self, account: str, now_ms: int, limit: int, exclude: Collection[int]
    ) -> list[int]:
        # this account's own: another's due streams (paused until midnight, or simply earlier)
        # must not fill the claim and leave this one unpolled
        due = await self._store.due_streams(now_ms, limit + len(exclude), account)
        return [s for s in due if s not in exclude][:limit]

    async def renew_streams(self, stream_ids: Collection[int]) -> set[int]:
        return set(stream_ids)

    async def release_streams(self, stream_ids: Collection[int]) -> None:
        return None

    def lease(self, stream_id: int) -> StreamLease | None:
        return None  # one process holds the store (its file lock): no other writer to fence

    async def hold(self, names: Sequence[str]) -> set[str]:
        return set(names)

    async def release(self, names: Sequence[str]) -> None:
        return None

    async def watch_commits(self, wake: Callable[[], None], stop: asyncio.Event) -> None:
        return None  # every commit is this process's own: the poller wakes the sinks itself

    async def reserve_request(
        self, account: str, day: str, now_ms: int, burst: int, window_ms: int, allowance: int
    ) -> Reservation:
        used = await self._store.spend_quota(account, day, 1)
        return Reservation(True, 0, used, now_ms, day, _day_left_ms(now_ms))

    async def return_request(self, account: str, day: str, sent_ms: int) -> int:
        return await self._store.spend_quota(account, day, -1)


class PgCoordinator:
    """Leases and request logs in the replicas' shared PostgreSQL database."""

    shared_budget = True

    def __init__(self, store: PostgresStore, replica: str, settings: PostgresSettings) -> None:
        self._store = store
        self.replica = replica
        self.lease_s = settings.lease_s
        self._lease_ms = int(settings.lease_s * 1000)
        self._margin_ms = int(settings.request_margin_s * 1000)
        # stream -> the epoch of this replica's claim of it, from the claim until its release
        self._epochs: dict[int, int] = {}

    async def claim_streams(
        self, account: str, now_ms: int, limit: int, exclude: Collection[int]
    ) -> list[int]:
        if limit <= 0:
            return []

        async def run(conn: Connection) -> tuple[list[int], dict[int, int]]:
            rows = await conn.fetch(
                "WITH due AS (SELECT id, next_due_ms FROM streams"  # noqa: S608 - constants only
                " WHERE account = $1 AND retired = 0 AND paused = 0 AND next_due_ms <= $2"
                f" AND (lease_expires_ms IS NULL OR lease_expires_ms < {DB_NOW_MS})"
                " AND id <> ALL($5::bigint[])"
                " ORDER BY next_due_ms, id LIMIT $3 FOR UPDATE SKIP LOCKED)"
                f" UPDATE streams s SET lease_owner = $4, lease_expires_ms = {DB_NOW_MS} + $6,"
                " lease_epoch = s.lease_epoch + 1"
                " FROM due WHERE s.id = due.id RETURNING s.id, due.next_due_ms, s.lease_epoch",
                account,
                now_ms,
                limit,
                self.replica,
                list(exclude),
                self._lease_ms,
            )
            claimed = sorted(rows, key=lambda r: (r[1], r[0]))
            return [int(r[0]) for r in claimed], {int(r[0]): int(r[2]) for r in claimed}

        ids, epochs = await self._store.transaction(run)
        self._epochs.update(epochs)
        return ids

    def _claims(self, stream_ids: Collection[int]) -> tuple[list[int], list[int]]:
        """The streams of ``stream_ids`` this replica claimed, and the epochs of its claims."""
        mine = [s for s in stream_ids if s in self._epochs]
        return mine, [self._epochs[s] for s in mine]

    async def renew_streams(self, stream_ids: Collection[int]) -> set[int]:
        ids, epochs = self._claims(stream_ids)
        if not ids:
            return set()

        async def run(conn: Connection) -> set[int]:
            # the epoch too: the owner alone is this replica's every claim of the stream, and an
            # earlier one must not be kept alive by a later one's renewal (or the other way)
            rows = await conn.fetch(
                f"UPDATE streams s SET lease_expires_ms = {DB_NOW_MS} + $3"  # noqa: S608
                " FROM unnest($1::bigint[], $4::bigint[]) AS c(id, epoch)"
                " WHERE s.id = c.id AND s.lease_owner = $2 AND s.lease_epoch = c.epoch"
                " RETURNING s.id",
                ids,
                self.replica,
                self._lease_ms,
                epochs,
            )
            return {int(r[0]) for r in rows}

        return await self._store.transaction(run)

    async def release_streams(self, stream_ids: Collection[int]) -> None:
        ids, epochs = self._claims(stream_ids)
        if not ids:
            return

        async def run(conn: Connection) -> None:
            # only the claim being released: the end of a pass whose lease was lost must not
            # release a later claim of the same stream (by this replica: the owner is the same)
            await conn.execute(
                "UPDATE streams s SET lease_owner = NULL, lease_expires_ms = NULL"
                " FROM unnest($1::bigint[], $3::bigint[]) AS c(id, epoch)"
                " WHERE s.id = c.id AND s.lease_owner = $2 AND s.lease_epoch = c.epoch",
                ids,
                self.replica,
                epochs,
            )

        await self._store.transaction(run)
        for stream_id, epoch in zip(ids, epochs, strict=True):
            if self._epochs.get(stream_id) == epoch:
                del self._epochs[stream_id]

    def lease(self, stream_id: int) -> StreamLease | None:
        epoch = self._epochs.get(stream_id)
        return None if epoch is None else StreamLease(stream_id, self.replica, epoch)

    async def hold(self, names: Sequence[str]) -> set[str]:
        if not names:
            return set()

        async def run(conn: Connection) -> set[str]:
            rows = await conn.fetch(
                "INSERT INTO leases (name, owner, expires_ms)"  # noqa: S608 - constants only
                f" SELECT n, $2, {DB_NOW_MS} + $3 FROM unnest($1::text[]) AS t(n)"
                " ON CONFLICT (name) DO UPDATE SET owner = excluded.owner,"
                " expires_ms = excluded.expires_ms"
                f" WHERE leases.owner = excluded.owner OR leases.expires_ms < {DB_NOW_MS}"
                " RETURNING name",
                sorted(set(names)),  # one order for every replica: no deadlocks between them
                self.replica,
                self._lease_ms,
            )
            return {str(r[0]) for r in rows}

        return await self._store.transaction(run)

    async def release(self, names: Sequence[str]) -> None:
        if not names:
            return

        async def run(conn: Connection) -> None:
            await conn.execute(
                "DELETE FROM leases WHERE name = ANY($1::text[]) AND owner = $2",
                list(names),
                self.replica,
            )

        await self._store.transaction(run)

    async def watch_commits(self, wake: Callable[[], None], stop: asyncio.Event) -> None:
        await self._store.listen_commits(wake, stop)

    async def reserve_request(
        self, account: str, day: str, now_ms: int, burst: int, window_ms: int, allowance: int
    ) -> Reservation:
        window = window_ms + self._margin_ms

        async def run(conn: Connection) -> Reservation:
            await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", BUDGET_NS, account)
            # the database's clock, read under the lock: one clock for every replica, and the
            # time the request is really admitted (a call retried through an outage is late)
            now = int(await conn.fetchval(f"SELECT {DB_NOW_MS}"))
            # the day too: one replica's clock ahead of the others' counted on tomorrow's quota
            # from its own midnight on, while they still spent today's (both on the key's one
            # day upstream), and one behind kept counting a spent day after midnight
            day, left_ms = _utc_day(now), _day_left_ms(now)
            used = int(
                await conn.fetchval(
                    "SELECT used FROM quota WHERE account = $1 AND day = $2", account, day
                )
                or 0
            )
            if used >= allowance:
                return Reservation(False, 0, used, 0, day, left_ms)
            # the burst-th newest request: while it is inside the window, the window is full
            edge = await conn.fetchval(
                "SELECT sent_ms FROM request_log WHERE account = $1"
                " ORDER BY sent_ms DESC OFFSET $2 LIMIT 1",
                account,
                burst - 1,
            )
            if edge is not None and int(edge) > now - window:
                return Reservation(False, int(edge) + window - now, used, 0, day, left_ms)
            await conn.execute(
                "DELETE FROM request_log WHERE account = $1 AND sent_ms < $2",
                account,
                now - _LOG_KEEP_MS,
            )
            await conn.execute(
                "INSERT INTO request_log (account, sent_ms, replica) VALUES ($1, $2, $3)",
                account,
                now,
                self.replica,
            )
            used = int(
                await conn.fetchval(
                    "INSERT INTO quota (account, day, used) VALUES ($1, $2, 1)"
                    " ON CONFLICT (account, day) DO UPDATE SET used = quota.used + 1"
                    " RETURNING used",
                    account,
                    day,
                )
            )
            return Reservation(True, 0, used, now, day, left_ms)

        return await self._store.transaction(run)

    async def return_request(self, account: str, day: str, sent_ms: int) -> int:
        day = _utc_day(sent_ms)  # the day reserve_request counted it on, by the same clock

        async def run(conn: Connection) -> int:
            # under the lock reserve_request takes: its window and count read consistently
            await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", BUDGET_NS, account)
            await conn.execute(
                "DELETE FROM request_log WHERE ctid = (SELECT ctid FROM request_log"
                " WHERE account = $1 AND sent_ms = $2 AND replica = $3 LIMIT 1)",
                account,
                sent_ms,
                self.replica,
            )
            used = await conn.fetchval(
                "UPDATE quota SET used = used - 1 WHERE account = $1 AND day = $2 AND used > 0"
                " RETURNING used",
                account,
                day,
            )
            return int(used or 0)

        return await self._store.transaction(run)


def _utc_day(ms: int) -> str:
    """The UTC day (YYYY-MM-DD) of a Unix time in milliseconds."""
    return datetime.fromtimestamp(ms / 1000, UTC).date().isoformat()


def _day_left_ms(ms: int) -> int:
    """Milliseconds from a Unix time in milliseconds to the end of its UTC day."""
    return _DAY_MS - ms % _DAY_MS


def coordinator_for(
    store: Store, replica: str, settings: PostgresSettings | None = None
) -> Coordinator:
    """The coordinator of a store: shared through PostgreSQL, or local to this process."""
    settings = settings or PostgresSettings()
    if isinstance(store, PostgresStore):
        return PgCoordinator(store, replica, settings)
    return LocalCoordinator(store, replica, settings.lease_s)
