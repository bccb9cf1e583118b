"""Durable state behind one interface (:class:`Store`); ``open_store`` picks the backend by URL."""

from __future__ import annotations

from relay.store.base import (
    Attempt,
    DeadLetter,
    Delivery,
    DeliveryCounts,
    DuplicateError,
    GoneError,
    NotFoundError,
    OutboxAppend,
    OutboxEvent,
    OutboxRange,
    OutboxSelector,
    Overview,
    PassResult,
    Store,
    StoreError,
    Stream,
    StreamFilter,
    StreamKey,
    StreamRate,
    StreamStats,
    UnavailableError,
    Webhook,
)
from relay.store.postgres import PostgresSettings, PostgresStore
from relay.store.sqlite import SqliteStore


def open_store(url: str, postgres: PostgresSettings | None = None) -> Store:
    """The store for a state URL (``sqlite:///path.db``, ``postgresql://…``); call
    ``await store.open()`` next. ``postgres``: pool, timeouts and leases of a PostgreSQL store."""
    scheme = url.split(":", 1)[0]
    if scheme == "sqlite":
        return SqliteStore.from_url(url)
    if scheme in {"postgresql", "postgres"}:
        return PostgresStore.from_url(url, postgres)
    raise StoreError(f"state: unsupported URL scheme {scheme!r} (supported: sqlite, postgresql)")


__all__ = [
    "Attempt",
    "DeadLetter",
    "Delivery",
    "DeliveryCounts",
    "DuplicateError",
    "GoneError",
    "NotFoundError",
    "OutboxAppend",
    "OutboxEvent",
    "OutboxRange",
    "OutboxSelector",
    "Overview",
    "PassResult",
    "PostgresSettings",
    "PostgresStore",
    "SqliteStore",
    "Store",
    "StoreError",
    "Stream",
    "StreamFilter",
    "StreamKey",
    "StreamRate",
    "StreamStats",
    "UnavailableError",
    "Webhook",
    "open_store",
]
