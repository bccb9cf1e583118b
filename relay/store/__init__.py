"""Durable state behind one interface (:class:`Store`); ``open_store`` picks the backend by URL."""

from __future__ import annotations

from relay.store.base import (
    Attempt,
    Behind,
    CorruptError,
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
    Store,
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
)
from relay.store.budget import WaitBudget, current_budget, wait_budget
from relay.store.postgres import PostgresSettings, PostgresStore
from relay.store.sqlite import SqliteStore


def open_store(
    url: str, postgres: PostgresSettings | None = None, *, exclusive: bool = False
) -> Store:
    """The store for a state URL (``sqlite:///path.db``, ``postgresql://…``); call
    ``await store.open()`` next. ``postgres``: pool, timeouts and leases of a PostgreSQL store.

    ``exclusive`` (the relay's store): a SQLite file is locked while open, so ``open()`` fails
    with "state store … is in use by another ctct-relay process" when another process (or
    another exclusive store of this one) has it open; PostgreSQL ignores it (replicas share).
    """
    scheme = url.split(":", 1)[0]
    if scheme == "sqlite":
        return SqliteStore.from_url(url, exclusive=exclusive)
    if scheme in {"postgresql", "postgres"}:
        return PostgresStore.from_url(url, postgres)
    raise StoreError(f"state: unsupported URL scheme {scheme!r} (supported: sqlite, postgresql)")


__all__ = [
    "Attempt",
    "Behind",
    "CorruptError",
    "DeadLetter",
    "Delivery",
    "DeliveryCounts",
    "DisabledError",
    "DueSend",
    "DuplicateError",
    "GoneError",
    "LeaseLostError",
    "LimitError",
    "NotFoundError",
    "OutboxAppend",
    "OutboxEvent",
    "OutboxRange",
    "OutboxSelector",
    "Overview",
    "PassResult",
    "PostgresSettings",
    "PostgresStore",
    "ReplayRequest",
    "SqliteStore",
    "Store",
    "StoreError",
    "Stream",
    "StreamFilter",
    "StreamKey",
    "StreamLease",
    "StreamRate",
    "StreamStats",
    "UnavailableError",
    "UnwantedError",
    "WaitBudget",
    "Webhook",
    "current_budget",
    "open_store",
    "wait_budget",
]
