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
        """CREATE TABLE webhooks (
            id TEXT PRIMARY KEY,
            url TEXT NOT NULL,
            description TEXT NOT NULL DEFAULT '',
            event_types TEXT NOT NULL,
            enabled INTEGER NOT NULL DEFAULT 1,
            secret TEXT NOT NULL,
            previous_secret TEXT,
            previous_expires_ms BIGINT,
            rate_limit_per_s DOUBLE PRECISION,
            start_seq BIGINT NOT NULL,
            disabled_reason TEXT,
            failing_since_ms BIGINT,
            created_ms BIGINT NOT NULL,
            updated_ms BIGINT NOT NULL
        )""",
        """CREATE TABLE deliveries (
            id INTEGER PRIMARY KEY,
            webhook_id TEXT NOT NULL REFERENCES webhooks (id) ON DELETE CASCADE,
            seq BIGINT NOT NULL,
            event_id TEXT NOT NULL,
            status TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            next_attempt_ms BIGINT NOT NULL,
            last_status INTEGER,
            last_error TEXT,
            created_ms BIGINT NOT NULL,
            delivered_ms BIGINT,
            UNIQUE (webhook_id, seq)
        )""",
        "CREATE INDEX deliveries_due ON deliveries (webhook_id, status, next_attempt_ms)",
        """CREATE TABLE attempts (
            id INTEGER PRIMARY KEY,
            delivery_id INTEGER NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
            attempted_ms BIGINT NOT NULL,
            status_code INTEGER,
            latency_ms DOUBLE PRECISION NOT NULL,
            response_excerpt TEXT NOT NULL DEFAULT '',
            error TEXT
        )""",
        "CREATE INDEX attempts_delivery ON attempts (delivery_id)",
    ),
    # operations: replay by re-polling, operator holds on accounts, targets removed at run time
    (
        "ALTER TABLE streams ADD COLUMN replay_from_ms BIGINT",
        """CREATE TABLE account_holds (
            account TEXT PRIMARY KEY,
            reason TEXT NOT NULL,
            held_ms BIGINT NOT NULL
        )""",
        """CREATE TABLE removed_targets (
            account TEXT NOT NULL,
            scope TEXT NOT NULL,
            resource_id TEXT NOT NULL,
            removed_ms BIGINT NOT NULL,
            PRIMARY KEY (account, scope, resource_id)
        )""",
        "CREATE INDEX outbox_stream ON outbox (stream_id, seq)",
    ),
    # one webhook per URL: duplicates registered before (a check-then-insert race) keep the
    # oldest; the younger ones are disabled and their url marked, so the unique index can be built
    (
        """UPDATE webhooks SET enabled = 0,
            disabled_reason = 'URL registered twice; the oldest webhook with it was kept',
            url = url || '#duplicate-' || id
        WHERE EXISTS (SELECT 1 FROM webhooks AS older WHERE older.url = webhooks.url
            AND (older.created_ms < webhooks.created_ms
                OR (older.created_ms = webhooks.created_ms AND older.id < webhooks.id)))""",
        "CREATE UNIQUE INDEX webhooks_url ON webhooks (url)",
    ),
    # the due read orders by (next_attempt_ms, seq): with seq in the index the ORDER BY … LIMIT
    # is read off the index, and only the rows returned are joined to the outbox; without it,
    # every pending delivery sharing a next_attempt_ms (a whole fan-out batch) was joined, its
    # data copied, and sorted on each read (profiled: ~5 ms per read of 512 behind 3,000)
    (
        "DROP INDEX deliveries_due",
        "CREATE INDEX deliveries_due ON deliveries (webhook_id, status, next_attempt_ms, seq)",
    ),
    # the deliveries listing pages newest first by id (GET /v1/webhooks/{id}/deliveries,
    # ``before``): without this index it read every delivery of the webhook and sorted them on
    # each page; with it, a page is a range read of the index that stops at the limit
    ("CREATE INDEX deliveries_webhook ON deliveries (webhook_id, id)",),
    # dedup keys are kept by when they were inserted as well as by activity time: a backfill
    # commits history older than the retention before its pass ends, and a pass that then
    # fails is read again from the same watermark; its keys must outlive the retry. Existing
    # keys get 0 (pruned by activity time, as before). The prune reads the later of the two
    # times off an index, replacing the index on occurred_ms (the prune was its only reader).
    (
        "ALTER TABLE dedup ADD COLUMN inserted_ms BIGINT NOT NULL DEFAULT 0",
        "DROP INDEX dedup_occurred",
        "CREATE INDEX dedup_kept ON dedup (max(occurred_ms, inserted_ms))",
    ),
    # feeds whose summary count moved before the feed showed the record (the counters are
    # ahead of the tracking feed): kind -> [since_ms, missing], read again until caught up or
    # overlap_s has passed; kept in the store so a restart does not forget them
    ("ALTER TABLE streams ADD COLUMN behind TEXT NOT NULL DEFAULT '{}'",),
    # a seeded stream's history line on the upstream's clock (its creation moved by the offset
    # of the upstream's Date header), fixed at its first pass that saw one: against an upstream
    # clock behind the relay's, the relay's clock put every later activity in its history
    ("ALTER TABLE streams ADD COLUMN line_ms BIGINT",),
    # when a pass last read every unique-counted feed of a campaign stream (opens, clicks and
    # forwards count unique recipients, so a repeat moves no count): they are read again
    # poll.repeat_read_s later, counts moving or not; NULL: since the stream was added
    ("ALTER TABLE streams ADD COLUMN swept_ms BIGINT",),
    # values the relay makes once per store and keeps: ``budget_salt``, the random key of the
    # HMAC that names each api_key's budget (relay.config.AccountSettings.budget_name), so that
    # whoever reads /metrics cannot confirm a guessed api_key with an unsalted digest of it
    ("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",),
    # one dead letter per (sink, seq): the Kafka sink writes it before moving its cursor, so a
    # crash between the two, a replay or a lost lease recorded the same event again; the first
    # record of each is kept
    (
        "DELETE FROM dead_letters WHERE id NOT IN"
        " (SELECT MIN(id) FROM dead_letters GROUP BY sink, seq)",
        "DROP INDEX dead_letters_sink",
        "CREATE UNIQUE INDEX dead_letters_sink_seq ON dead_letters (sink, seq)",
    ),
    # a delivery's version, moved on by every settled attempt and every reset (redeliver,
    # recover): an attempt settles its delivery only if the version is still the one read for
    # it. The attempt count could not tell a reset (back to 0) from the state a first attempt
    # read, so that attempt's outcome overwrote a redelivery made while it was in flight
    ("ALTER TABLE deliveries ADD COLUMN version INTEGER NOT NULL DEFAULT 0",),
    # when the failing clock last noted a failed attempt (refreshed at most every quiet period of
    # a failing endpoint, see DeliverySettings.quiet_s): a failure after a longer silence (the
    # relay down, nothing owed) restarts the clock instead of counting that silence as failing.
    # A clock left running by an older relay has none: its next failure restarts it
    ("ALTER TABLE webhooks ADD COLUMN last_failure_ms BIGINT",),
    # targets an operator added at run time (admin API, ``ctct-relay targets add``): followed
    # until removed, as campaigns.ids are, so discovery's full scan does not retire them for
    # their age. Kept in the store, as the removals are, for restarts and the other replicas.
    # Targets added by an older relay have no row: adding them again records them
    (
        """CREATE TABLE added_targets (
            account TEXT NOT NULL,
            scope TEXT NOT NULL,
            resource_id TEXT NOT NULL,
            added_ms BIGINT NOT NULL,
            PRIMARY KEY (account, scope, resource_id)
        )""",
    ),
    # how many upstream replays were asked of a stream: the end of a pass clears (and stops
    # keeping the stream due for) only the request it ran. The time alone could not tell a
    # request asked again with the same (or a later) time while a pass ran the first: that
    # pass's end cleared it, and nothing re-read what the operator asked for
    ("ALTER TABLE streams ADD COLUMN replay_asked INTEGER NOT NULL DEFAULT 0",),
    # PostgreSQL only: the epoch of each stream's lease, the fencing token of a pass's writes
    # (see pg_migrations.py, version 16). One process holds a SQLite file and every stream in
    # it, so there is no lease to fence: the version is recorded, the numbers stay in step
    (),
)
