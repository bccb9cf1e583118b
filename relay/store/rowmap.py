"""Row mapping shared by the SQLite and PostgreSQL stores: column lists, and tuples to values.

Both backends have the same tables and column order (their migrations are kept in step), so a
row read from either becomes the same ``Stream``, ``Webhook``, ``Delivery`` or ``OutboxEvent``
here, and a value is written as the same tuple.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import orjson

from relay.events import Activity, Kind, format_id
from relay.store.base import (
    Behind,
    Delivery,
    OutboxEvent,
    StoreError,
    Stream,
    StreamKey,
    Webhook,
)

FANOUT = "webhooks-fanout"  # the sink cursor of webhook fan-out
PRUNE_CHUNK = 10_000  # rows pruned per transaction (dedup keys, outbox events, deliveries)

STREAM_COLUMNS = (
    "id, account, scope, resource_id, next_due_ms, rate_per_h, consecutive_errors, last_error,"
    " last_poll_ms, retired, paused, summary, seed, created_ms, behind,"
    " line_ms, swept_ms"
)
STATE_CLAUSES = {
    "active": "retired = 0 AND paused = 0",
    "failing": "retired = 0 AND paused = 0 AND consecutive_errors > 0",
    "paused": "retired = 0 AND paused = 1",
    "retired": "retired = 1",
}

# next_due_ms as the end of a pass writes it (finish_pass, record_error, defer_stream), given the
# replay request that pass ran ({handled}: its replay_asked, NULL: none): a replay asked for while
# it ran (request_replay made the stream due then, and counted the request, so the stored count
# differs, whatever the times) keeps the stream due then, instead of being put off to the next
# planned pass (up to max_interval_s, with `replay --wait` waiting). Portable SQL: SQLite before
# 3.39 has no IS DISTINCT FROM.
NEXT_DUE = (
    "CASE WHEN replay_from_ms IS NOT NULL AND ({handled} IS NULL OR replay_asked <> {handled})"
    " THEN {least}(next_due_ms, {due}) ELSE {due} END"
)
# replay_from_ms as finish_pass writes it: the request the pass ran ({handled}, as above) ends in
# the transaction that ends the pass, so a crash or a lost lease cannot come between them and run
# the finished replay again (appending its events again); one asked for since is the next pass's.
# The statement reads the row as it was, so NEXT_DUE beside it still sees the request.
END_REPLAY = "CASE WHEN replay_asked = {handled} THEN NULL ELSE replay_from_ms END"

WEBHOOK_COLUMNS = (
    "id, url, description, event_types, enabled, secret, previous_secret, previous_expires_ms,"
    " rate_limit_per_s, start_seq, disabled_reason, failing_since_ms, created_ms, updated_ms,"
    " last_failure_ms"
)
DELIVERY_COLUMNS = (
    "id, webhook_id, seq, event_id, status, attempts, next_attempt_ms, last_status, last_error,"
    " created_ms, delivered_ms"
)
WEBHOOK_FIELDS = tuple(c.strip() for c in WEBHOOK_COLUMNS.split(","))  # Webhook's field names


def update_fields(fields: Collection[str]) -> list[str]:
    """The columns an update writes, in table order; refuses ``id`` and unknown names."""
    unknown = set(fields) - set(WEBHOOK_FIELDS[1:])
    if unknown:
        raise StoreError(f"update_webhook: not updatable: {', '.join(sorted(unknown))}")
    return [name for name in WEBHOOK_FIELDS[1:] if name in fields]


def unwanted_kinds(hook: Webhook) -> list[str]:
    """The outbox kinds ``hook``'s filter rejects: a filter changed to this drops the webhook's
    pending deliveries of them (``update_webhook``)."""
    return [kind.value for kind in Kind if not hook.wants(kind.event_type)]


# a webhook's pending deliveries whose event is of one of the kinds given (an array parameter on
# PostgreSQL); served by the deliveries_due index, then one outbox lookup by seq per row
UNWANTED_PENDING = (
    "webhook_id = {hook} AND status = 'pending' AND EXISTS (SELECT 1 FROM outbox o"
    " WHERE o.seq = deliveries.seq AND o.kind {kinds})"
)


# a webhook's pending deliveries made due by {now} (``Store.update_webhook``: the webhook enabled
# again or moved to another URL), their attempt counts kept; the deliveries_due index finds them.
# {bump} 1 (a URL change) moves their versions on, as a reset does: the record of an attempt in
# flight to the old URL then joins the history without settling its delivery, so a wait earned
# there cannot come back; 0 (enabled again) lets such a record settle it (the same endpoint
# answered: its failure is evidence, its success must not be sent again).
RETRY_NOW = (
    "UPDATE deliveries SET next_attempt_ms = {least}(next_attempt_ms, {now}),"
    " version = version + {bump} WHERE webhook_id = {hook} AND status = 'pending'"
)


def retries_now(hook: Webhook, names: Collection[str]) -> bool:
    """Whether an update writing the fields ``names`` of ``hook`` makes its waiting retries due
    now: it enables the webhook (it "resumes at once": the waits were earned by an outage it is
    back from) or writes its URL (the new destination has failed none of them)."""
    return "url" in names or ("enabled" in names and hook.enabled)


# the webhook and outbox kind of a delivery (no row: the delivery or its event is gone)
DELIVERY_KIND = (
    "SELECT d.webhook_id, o.kind FROM deliveries d JOIN outbox o ON o.seq = d.seq WHERE d.id = {id}"
)


def wanted_kinds(hook: Webhook) -> list[str]:
    """The outbox kinds ``hook``'s filter lets through (the filter stays ``Webhook.wants``)."""
    return [kind.value for kind in Kind if hook.wants(kind.event_type)]


# recover: one delivery per event of the kinds given committed since a time, however many times
# a log replay put it in the outbox. The webhook's pending delivery of the event is reset,
# whatever its seq (a copy fanned out and not yet sent); without one, the event's first seq
# since the time is owed (a new delivery, or its delivered or dead one reset). One statement:
# the filter and the choice in SQL, no Python per event; the pending deliveries are grouped
# once (the due index) and joined by event id, instead of looked up per event (no index).
# Each row is one event at a seq of its own, so the count of rows written is the count of events.
RECOVER = (
    "INSERT INTO deliveries (webhook_id, seq, event_id, status, next_attempt_ms, created_ms)"
    " SELECT {hook}, COALESCE(p.seq, o.seq), o.event_id, 'pending', {now}, {now}"
    " FROM (SELECT event_id, MIN(seq) AS seq FROM outbox"
    " WHERE committed_ms >= {since} AND kind {kinds} GROUP BY event_id) o"
    " LEFT JOIN (SELECT event_id, MIN(seq) AS seq FROM deliveries"
    " WHERE webhook_id = {hook} AND status = 'pending' GROUP BY event_id) p"
    " ON p.event_id = o.event_id"
    " WHERE true ORDER BY 2"  # SQLite: or ON CONFLICT would parse as the join's ON
    " ON CONFLICT (webhook_id, seq) DO UPDATE SET status = 'pending', attempts = 0,"
    " next_attempt_ms = excluded.next_attempt_ms, version = deliveries.version + 1"
)


KINDS = {kind.value: kind for kind in Kind}
# and back: an enum's .value goes through a Python-level property (one per outbox row)
KIND_VALUES = {kind: kind.value for kind in Kind}


def stream(row: Sequence[object], marks: dict[Kind, int]) -> Stream:
    summary = orjson.loads(str(row[11]))
    return Stream(
        id=int(str(row[0])),
        key=StreamKey(str(row[1]), str(row[2]), str(row[3])),
        next_due_ms=int(str(row[4])),
        rate_per_h=float(str(row[5])),
        consecutive_errors=int(str(row[6])),
        last_error=None if row[7] is None else str(row[7]),
        last_poll_ms=None if row[8] is None else int(str(row[8])),
        retired=bool(row[9]),
        paused=bool(row[10]),
        summary={str(k): int(v) for k, v in summary.items()},
        watermarks=marks,
        seed=bool(row[12]),
        created_ms=int(str(row[13])),
        behind={
            KINDS[k]: Behind(int(v[0]), int(v[1]))
            for k, v in orjson.loads(str(row[14])).items()
            if k in KINDS
        },
        line_ms=None if row[15] is None else int(str(row[15])),
        swept_ms=None if row[16] is None else int(str(row[16])),
    )


def behind_json(behind: dict[Kind, Behind]) -> str:
    """The ``behind`` column: kind -> [since_ms, missing]."""
    return orjson.dumps({k.value: [b.since_ms, b.missing] for k, b in behind.items()}).decode()


def webhook_row(w: Webhook) -> tuple[object, ...]:
    return (
        w.id,
        w.url,
        w.description,
        orjson.dumps(list(w.event_types)).decode(),
        int(w.enabled),
        w.secret,
        w.previous_secret,
        w.previous_expires_ms,
        w.rate_limit_per_s,
        w.start_seq,
        w.disabled_reason,
        w.failing_since_ms,
        w.created_ms,
        w.updated_ms,
        w.last_failure_ms,
    )


def webhook(r: Sequence[Any]) -> Webhook:
    return Webhook(
        id=r[0],
        url=r[1],
        description=r[2],
        event_types=tuple(orjson.loads(r[3])),
        enabled=bool(r[4]),
        secret=r[5],
        previous_secret=r[6],
        previous_expires_ms=r[7],
        rate_limit_per_s=r[8],
        start_seq=int(r[9]),
        disabled_reason=r[10],
        failing_since_ms=r[11],
        created_ms=int(r[12]),
        updated_ms=int(r[13]),
        last_failure_ms=r[14],
    )


def delivery(r: Sequence[Any]) -> Delivery:
    # positional, in field order: keywords cost microseconds a row in a frozen dataclass, and
    # the dispatcher reads a row per attempt (profiled)
    return Delivery(
        int(r[0]), r[1], int(r[2]), r[3], r[4], int(r[5]), int(r[6]), r[7], r[8], int(r[9]), r[10]
    )


def outbox_event(r: Sequence[Any]) -> OutboxEvent:
    # Positional, in field order: keywords cost ~3 us a row in a frozen dataclass (profiled:
    # reading the outbox back was 11 % of the pipeline); Kind(value) goes through
    # EnumType.__call__, a dict lookup does not.
    return OutboxEvent(
        int(r[0]), r[1], r[2], KINDS[r[3]], r[4], r[5], int(r[6]), int(r[7]), bytes(r[8])
    )


def appended(rows: Sequence[tuple[Any, ...]], last_seq: int) -> list[OutboxEvent]:
    """``outbox_row`` tuples just inserted with consecutive seqs ending at ``last_seq``, as
    ``outbox_event`` reads them back."""
    first = last_seq - len(rows) + 1
    return [
        OutboxEvent(first + i, r[0], r[1], KINDS[r[3]], r[4], r[5], r[6], r[7], r[8])
        for i, r in enumerate(rows)
    ]


def outbox_row(
    event_id: bytes, activity: Activity, stream_id: int, now_ms: int
) -> tuple[object, ...]:
    return (
        format_id(event_id),
        activity.account,
        stream_id,
        KIND_VALUES[activity.kind],
        activity.campaign_id,
        activity.contact_id,
        activity.occurred_ms,
        now_ms,
        orjson.dumps(activity.data()),
    )
