"""Which streams exist: configured campaigns and contacts, and campaigns found by discovery.

Discovery lists the account's SENT campaigns, incrementally with ``modified_since`` and in full
once a day (to retire campaigns older than ``max_age_days`` by the API's clock, but never one
named in the config or added by an operator at run time: those are followed until removed). A
campaign last sent before the relay started watching the account (when its first stream was
added, on the API's clock: moved by the offset of the answer's Date header; now, on a fresh
store) is *seeded*: start_from decides whether its history is emitted. One sent since was sent
while we were watching (or while we were down), so all of it is new. (Deciding by "the store
had no streams yet" made configured contacts or campaign ids turn every old campaign found at
the first discovery into a full backfill.)
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from datetime import timedelta

import structlog

from relay.ctct import catalogue
from relay.ctct.client import CtctClient
from relay.events import (
    JsonObject,
    RecordError,
    format_millis,
    from_millis,
    parse_time,
    to_millis,
)
from relay.poller import CLOCK_SKEW_S
from relay.store import Store, StreamKey

log = structlog.get_logger(__name__)

FULL_SCAN_EVERY_S = 86_400.0
_OVERLAP_MS = 3_600_000  # re-list campaigns modified in the last hour of the previous scan


class CampaignDiscovery:
    """Keeps an account's campaign streams in step with its SENT campaigns."""

    def __init__(
        self,
        client: CtctClient,
        store: Store,
        account: str,
        max_age_days: float,
        on_change: Callable[[], Awaitable[None]],
        now_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        keep: Collection[str] = (),
    ) -> None:
        self._client = client
        # campaign ids named in the config: followed regardless of discovery, however old
        self._keep = frozenset(keep)
        self._store = store
        self._account = account
        self._max_age_ms = int(timedelta(days=max_age_days).total_seconds() * 1000)
        self._on_change = on_change
        self._now_ms = now_ms
        self._since_ms: int | None = None
        self._last_full_ms = 0

    async def run(self) -> None:
        """One discovery pass; new campaigns become streams due now."""
        now = self._now_ms()
        full = self._since_ms is None or now - self._last_full_ms >= FULL_SCAN_EVERY_S * 1000
        # The next modified_since comes from the API's own timestamps, never from our clock:
        # the two can disagree, and a since ahead of the API's clock would hide new campaigns.
        since = None if full else from_millis(max(0, (self._since_ms or 0) - _OVERLAP_MS))
        rows: list[JsonObject] = []
        upstream_ms: int | None = None  # the API's clock (Date header) when it answered
        offset_ms: int | None = None  # the API's clock minus the relay's, by that header
        async for page in self._client.pages(catalogue.get("campaigns.sent"), since=since):
            rows.extend(page.records)
            if page.server_ms is not None:
                upstream_ms = max(upstream_ms or 0, page.server_ms)
                offset_ms = page.server_ms - self._now_ms()
        # Ages are measured on the API's clock (the relay's without a Date header), as the
        # campaigns' dates are: against a simulator whose clock is days behind the relay's (or
        # ahead of it), the relay's clock retired every campaign (or none).
        upstream_now = now if upstream_ms is None else upstream_ms
        known = await self._store.streams(self._account)
        # When the relay started watching, on the API's clock, as the send times it is compared
        # with are: its first stream's creation moved by the Date header's offset (the history
        # line a seeded stream fixed, when it has one). On the relay's clock, an API clock a
        # day behind made every campaign sent in the day after the start look sent before it
        # (its history kept out of the outbox), and one ahead made old campaigns all new.
        watching_since = min(
            (self._upstream_ms(s.created_ms, s.line_ms, offset_ms) for s in known),
            default=upstream_now,
        )
        young, old = self._split_by_age(rows, upstream_now)
        removed = await self._store.removed_targets(self._account)  # an operator's word stands
        history: list[StreamKey] = []
        new: list[StreamKey] = []
        for cid, sent in young:
            key = StreamKey(self._account, "campaign", cid)
            if key not in removed:
                (history if sent is None or sent <= watching_since else new).append(key)
        created = 0
        for keys, seed in ((history, True), (new, False)):
            if keys:
                created += await self._store.ensure_streams(keys, now, seed=seed)
        # a configured campaign is followed until removed from the config, whatever its age;
        # one an operator added at run time is spared by the store (Store.retire_streams)
        old = [c for c in old if c not in self._keep]
        retired = 0
        if full:
            if old:
                retired = await self._store.retire_streams(
                    [StreamKey(self._account, "campaign", c) for c in old]
                )
            self._last_full_ms = now
        newest = self._newest(rows, upstream_now)
        if newest is not None:
            self._since_ms = max(self._since_ms or 0, newest)
        elif self._since_ms is None:
            self._since_ms = 0
        if created or retired:
            log.info(
                "discovery", account=self._account, found=len(rows), new=created, retired=retired
            )
            await self._on_change()

    @staticmethod
    def _upstream_ms(created_ms: int, line_ms: int | None, offset_ms: int | None) -> int:
        """A stream's creation on the API's clock: its stored history line (the poller's, by
        the Date header of its first pass), else its creation moved by ``offset_ms`` (the
        relay's clock without one)."""
        if line_ms is not None:
            return line_ms
        return created_ms if offset_ms is None else created_ms + offset_ms

    def _newest(self, rows: Sequence[JsonObject], upstream_ms: int) -> int | None:
        """The latest modification time listed, never past the API's clock (the relay's without
        a Date header) plus ``CLOCK_SKEW_S``: one campaign dated in the year 9999 would otherwise
        hide every campaign sent later from the incremental scans until the next full scan."""
        ceiling = upstream_ms + int(CLOCK_SKEW_S * 1000)
        newest: int | None = None
        for row in rows:
            modified = _modified_ms(row)
            if modified is None:
                continue
            if modified > ceiling:
                log.warning(
                    "discovery.future_campaign",
                    account=self._account,
                    campaign_id=str(row.get("id"))[:64],
                    modified=format_millis(modified),
                    upstream_now=format_millis(upstream_ms),
                )
                modified = ceiling
            newest = modified if newest is None else max(newest, modified)
        return newest

    def _split_by_age(
        self, rows: Sequence[JsonObject], upstream_now: int
    ) -> tuple[list[tuple[str, int | None]], list[str]]:
        """Campaigns to follow (with when they were last sent), and ids too old to follow:
        last sent more than ``max_age_days`` before ``upstream_now`` (the API's clock)."""
        young: list[tuple[str, int | None]] = []
        old: list[str] = []
        for row in rows:
            cid = row.get("id")
            if not isinstance(cid, (str, int)) or isinstance(cid, bool):
                log.warning("discovery.bad_row", account=self._account, row=str(row)[:200])
                continue
            sent = _sent_ms(row)
            if sent is not None and upstream_now - sent > self._max_age_ms:
                old.append(str(cid))
            else:
                young.append((str(cid), sent))
        return young, old


def _sent_ms(row: JsonObject) -> int | None:
    return _first_time(row, ("last_run_date", "modified_date"))


def _modified_ms(row: JsonObject) -> int | None:
    return _first_time(row, ("modified_date", "last_run_date"))


def _first_time(row: JsonObject, fields: tuple[str, ...]) -> int | None:
    for field in fields:
        value = row.get(field)
        if isinstance(value, str) and value:
            try:
                return to_millis(parse_time(value, field))
            except RecordError:
                continue
    return None


async def ensure_configured(
    store: Store, account: str, campaigns: Sequence[str], contacts: Sequence[str], now_ms: int
) -> int:
    """Streams for the campaigns and contacts named in the config; returns how many were new."""
    keys = [StreamKey(account, "campaign", c) for c in campaigns]
    keys += [StreamKey(account, "contact", c) for c in contacts]
    return await store.ensure_streams(keys, now_ms) if keys else 0
