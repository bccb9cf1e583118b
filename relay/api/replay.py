"""Replay: send a stream's, a campaign's or an account's events again, from a point in time.

Two sources, both keeping every event's CloudEvent ``id`` (it is derived from the activity, not
from when or how often it is sent), so a consumer that deduplicates by id is never confused:

``log`` (the default) re-appends copies of the retained outbox events *committed* at or after
``since`` to the head of the outbox, in their original order. Every sink reads the outbox by
sequence number, so Kafka publishes them again and every webhook whose filters match gets a new
delivery: one mechanism for all sinks, and the sinks need no replay mode. Commit time is the
right clock here: a consumer that lost what it received after T lost exactly what was committed
after T (late activity that happened before T but arrived after it included). An event already
replayed once is copied once, not once per copy.

``upstream`` asks the scheduler to re-read the streams' feeds from ``since`` (*activity* time):
their next pass treats the watermark as if it were ``since`` and appends what it finds then or
later even though dedup already knows it. Use it when the log itself cannot be trusted (say the
state was restored from an old backup) or to backfill history a stream never emitted (a target
added with ``start_from: now``). The count is known only after the passes; a dry run reports how
many of those events the log already holds, a lower bound.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from relay.api import body
from relay.api.responses import JsonObject, bad_request
from relay.api.views import time_or_null
from relay.events import RESOURCE_ID, RESOURCE_ID_SHAPE
from relay.store import OutboxSelector, Store, Stream

LOG = "log"
UPSTREAM = "upstream"
SOURCES = (LOG, UPSTREAM)
FIELDS = ("since", "source", "dry_run")
MAX_CAMPAIGN_CHARS = 64

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class ReplayRequest:
    """A checked replay request."""

    since_ms: int
    source: str = LOG
    dry_run: bool = False
    campaign_id: str | None = None


def parse(data: JsonObject, *, allow_campaign: bool) -> ReplayRequest:
    """The request body, field by field (400 naming the field)."""
    allowed = (*FIELDS, "campaign") if allow_campaign else FIELDS
    body.check_fields(data, allowed, required=("since",))
    source = body.string(data, "source", max_chars=16) if "source" in data else LOG
    if source not in SOURCES:
        raise bad_request(f"source: expected one of {', '.join(SOURCES)}, got {source!r}")
    campaign = None
    if "campaign" in data:
        campaign = body.string(data, "campaign", max_chars=MAX_CAMPAIGN_CHARS)
        if not RESOURCE_ID.fullmatch(campaign):
            raise bad_request(f"campaign: expected {RESOURCE_ID_SHAPE}, got {campaign!r}")
    since_ms = body.timestamp_ms(data, "since")
    if since_ms < 0:
        raise bad_request("since: must be 1970-01-01T00:00:00Z or later")
    return ReplayRequest(
        since_ms=since_ms,
        source=source,
        dry_run=body.boolean(data, "dry_run") if "dry_run" in data else False,
        campaign_id=campaign,
    )


async def run(
    store: Store,
    ask: ReplayRequest,
    account: str,
    streams: Sequence[Stream],
    now_ms: int,
    *,
    stream_id: int | None = None,
) -> JsonObject:
    """Carry out (or, for a dry run, count) a replay of ``account``'s events.

    ``stream_id`` narrows it to one stream (``/v1/streams/{id}/replay``), ``ask.campaign_id`` to
    one campaign; ``streams`` are the streams an upstream replay re-reads.
    """
    answer: JsonObject = {
        "source": ask.source,
        "since": time_or_null(ask.since_ms),
        "dry_run": ask.dry_run,
    }
    if ask.source == LOG:
        selector = OutboxSelector(account, ask.since_ms, stream_id, ask.campaign_id)
        found = (
            await store.count_outbox(selector)
            if ask.dry_run
            else await store.replay_outbox(selector, now_ms)
        )
        if not ask.dry_run:
            log.info(
                "api.replay",
                source=LOG,
                account=account,
                stream_id=stream_id,
                campaign=ask.campaign_id,
                since_ms=ask.since_ms,
                events=found.count,
            )
        return {
            **answer,
            "events": found.count,
            "first_seq": found.first_seq or None,
            "last_seq": found.last_seq or None,
            "streams": None,
        }
    # a campaign's upstream replay re-reads its campaign stream: count that stream's events
    narrowed = stream_id if ask.campaign_id is None else streams[0].id if streams else None
    known = await store.count_outbox(
        OutboxSelector(account, ask.since_ms, narrowed, None, by_activity_time=True)
    )
    if not ask.dry_run and streams:
        await store.request_replay([s.id for s in streams], ask.since_ms, now_ms)
        log.info(
            "api.replay",
            source=UPSTREAM,
            account=account,
            stream_id=stream_id,
            campaign=ask.campaign_id,
            since_ms=ask.since_ms,
            streams=len(streams),
        )
    return {
        **answer,
        "events": known.count if streams else 0,
        "first_seq": None,
        "last_seq": None,
        "streams": len(streams),
    }
