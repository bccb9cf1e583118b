"""Forward-only schema migrations, shared by every store backend.

Each entry is one version: a list of statements applied in one transaction, after which the
version is recorded. Never edit a released entry; append a new one. The SQL is the portable
subset SQLite and PostgreSQL share (``ON CONFLICT``, ``RETURNING``, no AUTOINCREMENT quirks
outside the outbox sequence).
"""

from __future__ import annotations

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE streams (
            id INTEGER PRIMARY KEY,
            account TEXT NOT NULL,
            scope TEXT NOT NULL,
            resource_id TEXT NOT NULL,
            next_due_ms BIGINT NOT NULL,
            rate_per_h DOUBLE PRECISION NOT NULL DEFAULT 0,
            consecutive_errors INTEGER NOT NULL DEFAULT 0,
            last_error TEXT,
            last_poll_ms BIGINT,
            retired INTEGER NOT NULL DEFAULT 0,
            paused INTEGER NOT NULL DEFAULT 0,
            summary TEXT NOT NULL DEFAULT '{}',
            seed INTEGER NOT NULL DEFAULT 1,
            created_ms BIGINT NOT NULL,
            UNIQUE (account, scope, resource_id)
        )""",
        "CREATE INDEX streams_due ON streams (next_due_ms) WHERE retired = 0 AND paused = 0",
        """CREATE TABLE watermarks (
            stream_id INTEGER NOT NULL REFERENCES streams (id),
            kind TEXT NOT NULL,
            watermark_ms BIGINT NOT NULL,
            PRIMARY KEY (stream_id, kind)
        )""",
        """CREATE TABLE dedup (
            event_id BLOB NOT NULL PRIMARY KEY,
            occurred_ms BIGINT NOT NULL
        )""",
        "CREATE INDEX dedup_occurred ON dedup (occurred_ms)",
        """CREATE TABLE outbox (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            event_id TEXT NOT NULL,
            account TEXT NOT NULL,
            stream_id INTEGER,
            kind TEXT NOT NULL,
            campaign_id TEXT NOT NULL,
            contact_id TEXT NOT NULL,
            occurred_ms BIGINT NOT NULL,
            committed_ms BIGINT NOT NULL,
            data BLOB NOT NULL
        )""",
        "CREATE INDEX outbox_committed ON outbox (committed_ms)",
        "CREATE TABLE sink_cursors (sink TEXT PRIMARY KEY, seq BIGINT NOT NULL)",
        """CREATE TABLE quota (
            account TEXT NOT NULL,
            day TEXT NOT NULL,
            used INTEGER NOT NULL,
            PRIMARY KEY (account, day)
        )""",
        """CREATE TABLE account_pauses (
            account TEXT PRIMARY KEY,
            until_ms BIGINT NOT NULL,
            reason TEXT NOT NULL
        )""",
        """CREATE TABLE dead_letters (
            id INTEGER PRIMARY KEY,
            sink TEXT NOT NULL,
            seq BIGINT NOT NULL,
            event_id TEXT NOT NULL,
            reason TEXT NOT NULL,
            created_ms BIGINT NOT NULL
        )""",
        "CREATE INDEX dead_letters_sink ON dead_letters (sink, seq)",
    ),
)
