"""Durable state behind one interface (:class:`Store`); ``open_store`` picks the backend by URL."""

from __future__ import annotations

from relay.store.base import (
    Attempt,
    DeadLetter,
    Delivery,
    DeliveryCounts,
    DuplicateError,
    NotFoundError,
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
    StreamStats,
    Webhook,
)
from relay.store.sqlite import SqliteStore


def open_store(url: str) -> Store:
    """The store for a state URL (``sqlite:///path.db``); call ``await store.open()`` next."""
    scheme = url.split(":", 1)[0]
    if scheme == "sqlite":
        return SqliteStore.from_url(url)
    raise StoreError(f"state: unsupported URL scheme {scheme!r} (supported: sqlite)")


__all__ = [
    "Attempt",
    "DeadLetter",
    "Delivery",
    "DeliveryCounts",
    "DuplicateError",
    "NotFoundError",
    "OutboxEvent",
    "OutboxRange",
    "OutboxSelector",
    "Overview",
    "PassResult",
    "SqliteStore",
    "Store",
    "StoreError",
    "Stream",
    "StreamFilter",
    "StreamKey",
    "StreamStats",
    "Webhook",
    "open_store",
]
