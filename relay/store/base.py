"""The state-store interface and its values: streams, watermarks, dedup keys, the outbox, quota.

A *stream* is one polled resource of one account (a campaign or a contact); it is polled as a unit
(its summary first, then the activity feeds whose counts changed), and each feed keeps its own
watermark. The *outbox* is the append-only log of committed events; sinks read it by sequence
number and keep their own cursors.

Every method is one transaction. ``commit_page`` is the exactly-once point: the page's new dedup
keys and exactly those events are written together, or nothing is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from relay.events import Activity, Kind, attributes, structured


class StoreError(Exception):
    """The state store failed or holds something it cannot use; the message says which."""


@dataclass(frozen=True, slots=True)
class StreamKey:
    """Identity of a stream."""

    account: str
    scope: str  # "campaign" or "contact": the catalogue scope of the resource
    resource_id: str

    def __str__(self) -> str:
        return f"{self.account}/{self.scope}/{self.resource_id}"


@dataclass(frozen=True, slots=True)
class Stream:
    """A stream's scheduling state, as stored."""

    id: int
    key: StreamKey
    next_due_ms: int
    rate_per_h: float  # observed new activities per hour (EWMA)
    consecutive_errors: int
    last_error: str | None
    last_poll_ms: int | None
    retired: bool
    paused: bool
    summary: dict[str, int]  # counts at the last pass, for change detection
    watermarks: dict[Kind, int]  # per feed: newest activity time committed, Unix ms
    seed: bool  # first read of a feed absorbs history instead of emitting it (start_from: now)
    created_ms: int


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """One committed event, as sinks read it."""

    seq: int
    event_id: str
    account: str
    kind: Kind
    campaign_id: str
    contact_id: str
    occurred_ms: int
    committed_ms: int
    data: bytes  # the CloudEvent ``data`` JSON

    def attributes(self) -> dict[str, str]:
        """The CloudEvent context attributes."""
        return attributes(
            self.event_id,
            self.account,
            self.kind,
            self.campaign_id,
            self.contact_id,
            self.occurred_ms,
        )

    def structured(self) -> bytes:
        """The whole event as structured-mode CloudEvents JSON."""
        return structured(self.attributes(), self.data)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An event a sink gave up on, and why."""

    sink: str
    seq: int
    event_id: str
    reason: str
    created_ms: int


@dataclass(frozen=True, slots=True)
class PassResult:
    """What a finished pass of a stream writes back."""

    watermarks: dict[Kind, int]
    summary: dict[str, int]
    next_due_ms: int
    rate_per_h: float
    polled_ms: int


class Store(Protocol):
    """Durable state of one relay deployment. Implementations: SQLite (embedded), PostgreSQL."""

    async def open(self) -> None:
        """Connect and apply pending migrations."""

    async def close(self) -> None:
        """Flush and release the connection."""

    async def schema_version(self) -> int:
        """The applied migration version."""

    async def ensure_streams(
        self, keys: Sequence[StreamKey], due_ms: int, *, seed: bool = True
    ) -> int:
        """Create missing streams (due at ``due_ms``) and un-retire listed ones; returns how many
        were created. ``seed``: their first read absorbs history (start_from: now)."""

    async def streams(self, account: str | None = None) -> list[Stream]:
        """Every stream (of one account), retired ones included."""

    async def due_streams(self, now_ms: int, limit: int) -> list[int]:
        """Ids of active (not retired, not paused) streams due by ``now_ms``, soonest first."""

    async def stream_rates(self) -> dict[int, tuple[float, int]]:
        """Active streams' (rate_per_h, next_due_ms), for the scheduler's budget arithmetic."""

    async def stream(self, stream_id: int) -> Stream:
        """One stream; raises StoreError when it does not exist."""

    async def commit_page(
        self, stream_id: int, activities: Sequence[Activity], now_ms: int, *, emit: bool = True
    ) -> int:
        """Insert the page's unseen dedup keys and append exactly those events (none when not
        ``emit``: seeding); returns how many keys were new. One transaction."""

    async def finish_pass(self, stream_id: int, result: PassResult) -> None:
        """Advance watermarks (never backwards), store the summary, schedule the next pass."""

    async def record_error(
        self, stream_id: int, error: str, next_due_ms: int, *, retire: bool = False
    ) -> None:
        """Count a failed pass, keep its message, back off (or retire the stream)."""

    async def set_paused(self, stream_id: int, paused: bool) -> None:
        """Pause or resume one stream."""

    async def retire_streams(self, keys: Sequence[StreamKey]) -> None:
        """Stop polling these streams (their state is kept)."""

    async def spend_quota(self, account: str, day: str, requests: int) -> int:
        """Add to the account's request count of a UTC day (YYYY-MM-DD); returns the new total."""

    async def quota_used(self, account: str, day: str) -> int:
        """Requests counted for the account on that UTC day."""

    async def set_account_pause(self, account: str, until_ms: int | None, reason: str) -> None:
        """Pause an account until a time (None: resume)."""

    async def account_pauses(self) -> dict[str, tuple[int, str]]:
        """Accounts currently paused: until (Unix ms) and why."""

    async def read_outbox(self, after_seq: int, limit: int) -> list[OutboxEvent]:
        """Committed events with seq > after_seq, in order."""

    async def outbox_head(self) -> int:
        """The highest committed seq (0 when empty)."""

    async def sink_cursor(self, sink: str) -> int:
        """The last seq a sink has finished with (0 when new)."""

    async def set_sink_cursor(self, sink: str, seq: int) -> None:
        """Move a sink's cursor to ``seq``."""

    async def add_dead_letter(
        self, sink: str, seq: int, event_id: str, reason: str, now_ms: int
    ) -> None:
        """Record an event a sink could never deliver, with the reason."""

    async def dead_letters(self, sink: str, limit: int = 100) -> list[DeadLetter]:
        """A sink's dead letters, oldest first."""

    async def prune_dedup(self, before_ms: int) -> int:
        """Forget dedup keys of activities older than ``before_ms``; returns how many."""

    async def dedup_count(self) -> int:
        """How many dedup keys are held."""
