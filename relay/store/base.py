"""The state-store interface and its values: streams, watermarks, dedup keys, the outbox, quota.

A *stream* is one polled resource of one account (a campaign or a contact); it is polled as a unit
(its summary first, then the activity feeds whose counts changed), and each feed keeps its own
watermark. The *outbox* is the append-only log of committed events; sinks read it by sequence
number and keep their own cursors.

Every method is one transaction. ``commit_page`` is the exactly-once point: the page's new dedup
keys and exactly those events are written together, or nothing is.

Webhook URLs are unique (schema version 3): ``create_webhook`` and ``update_webhook`` raise
:class:`DuplicateError` for a URL another webhook has, so a check-then-insert race between two
registrations (or two replicas upserting declared webhooks) cannot create two endpoints for one URL.
``update_webhook`` writes only the fields it is given, ``finish_attempts`` skips deliveries deleted
meanwhile, and ``close`` may be called twice. ``fanout`` and ``finish_attempts`` need not wait for
a flush to disk (bookkeeping whose loss only causes a redelivery).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from relay.events import (
    TYPE_PREFIX,
    Activity,
    Kind,
    attributes,
    slot_setters,
    structured,
    type_matches,
)

# The ``meta`` row of the budget names' salt (Store.budget_salt).
BUDGET_SALT = "budget_salt"


class StoreError(Exception):
    """The state store failed or holds something it cannot use; the message says which."""


class UnavailableError(StoreError):
    """The store could not be reached (PostgreSQL: for ``reconnect_max_s``): the same call may
    succeed later; nothing in it was refused.

    ``unchanged``: the call gave up at a :func:`relay.store.budget.wait_budget`'s deadline before
    any writing transaction of that unit of work sent its COMMIT, so none of it was applied.
    """

    def __init__(self, message: str, *, unchanged: bool = False) -> None:
        super().__init__(message)
        self.unchanged = unchanged


class CorruptError(StoreError):
    """The store's data is damaged (SQLite: "database disk image is malformed", "file is not a
    database"; PostgreSQL: SQLSTATE XX001 data_corrupted, XX002 index_corrupted): nothing read
    from it can be trusted and no retry mends it, so the store refuses every later call and the
    relay stops with this error (:meth:`Store.on_fatal`). The message names the file or server
    and how to restore it."""


class CorruptionLatch:
    """What a store does once its data is found damaged, shared by both backends: the first
    :class:`CorruptError` is kept and handed to the :meth:`Store.on_fatal` listeners (once), and
    every later call is refused with it, since writing more on top of damage can only spread
    it."""

    def __init__(self) -> None:
        self._listeners: list[Callable[[StoreError], None]] = []
        self._damage: CorruptError | None = None

    def listen(self, listener: Callable[[StoreError], None]) -> None:
        """:meth:`Store.on_fatal`: ``listener`` hears the first damage found."""
        self._listeners.append(listener)

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Around one call of the store: refused at once after damage was found; a
        :class:`CorruptError` it raises closes the latch and tells the listeners (the first
        one only), then goes on to the caller."""
        if self._damage is not None:
            raise CorruptError(str(self._damage))
        try:
            yield
        except CorruptError as exc:
            self._close(exc)
            raise

    def _close(self, exc: CorruptError) -> None:
        if self._damage is not None:
            return
        self._damage = exc
        for listener in self._listeners:
            listener(exc)


class NotFoundError(StoreError):
    """A webhook, delivery or stream that does not exist."""


class LeaseLostError(StoreError):
    """A pass's stream lease is no longer its own: another replica claimed the stream since
    (the store refused the pass's write, in the transaction that would have made it), or the
    lease ran out by this replica's own clock before its next upstream request (it was paused
    past it, or its renewals did not get through). Not retriable for that pass: it ends, what
    it committed before stays committed, and the stream's state is the new holder's to write.
    """

    retriable = False


def lease_lost_message(lease: StreamLease, owner: str | None, epoch: int | None) -> str:
    """The LeaseLostError of a write of ``lease``'s pass that found the stream's lease row
    with ``owner`` and ``epoch`` (None: released, or no such stream)."""
    if epoch is None:
        now = "no longer there"
    elif owner is None:
        now = f"released after claim {epoch}"
    else:
        now = f"held by {owner} under claim {epoch}"
    return (
        f"stream {lease.stream_id}: this pass's lease (claim {lease.epoch}) is gone, the"
        f" stream's lease is {now}: the stream was claimed again (taken over while this"
        " replica was paused or could not renew); the pass ends here, what it committed before"
        " stays committed"
    )


class GoneError(StoreError):
    """A delivery whose event is no longer in the outbox (pruned after ``outbox_retention_h``):
    it cannot be sent again."""


def gone_message(delivery: Delivery) -> str:
    """The GoneError of a delivery whose event was pruned."""
    return (
        f"delivery {delivery.id}: its event {delivery.event_id} is no longer in the outbox"
        " (pruned after outbox_retention_h) and cannot be sent again"
    )


class UnwantedError(StoreError):
    """A redelivery of an event its webhook's filter (``event_types``) no longer lets through:
    it would stay pending unsent for ever (the worker sends only the kinds the filter wants)."""


def unwanted_message(delivery: Delivery, kind: str, hook: Webhook) -> str:
    """The UnwantedError of a delivery whose kind ``hook``'s filter rejects."""
    return (
        f"delivery {delivery.id}: its event is a {TYPE_PREFIX}{kind}, which webhook {hook.id}'s"
        f" event_types ({', '.join(hook.event_types)}) no longer let through; widen them"
        f" (PATCH /v1/webhooks/{hook.id}) to send it again"
    )


class DisabledError(StoreError):
    """A redelivery or recovery for a disabled webhook: nothing would be sent until it is
    enabled again, so it is refused rather than accepted and left waiting."""


def disabled_message(hook: Webhook) -> str:
    """The DisabledError of a redelivery or recovery for ``hook``, which is disabled."""
    reason = f" ({hook.disabled_reason})" if hook.disabled_reason else ""
    return (
        f"webhook {hook.id} is disabled{reason}; enable it first (PATCH /v1/webhooks/{hook.id}"
        f' {{"enabled": true}}, or ctct-relay webhooks update {hook.id} --enable)'
    )


class DuplicateError(StoreError):
    """A webhook URL that another webhook already has (``webhooks.url`` is unique, migration 3);
    the message names the webhook holding it."""


# A filter edit leaves the rejected deliveries due by its time plus this (clocks of replicas may
# disagree by a little) to the worker: one may be in flight (see Store.update_webhook).
SPARED_DUE_MS = 60_000


class LimitError(StoreError):
    """A webhook registration beyond the most a relay keeps (``webhooks.max_webhooks``): each
    webhook has its own worker, and fan-out writes a delivery per webhook per event."""


def limit_message(limit: int) -> str:
    """The LimitError of a registration when ``limit`` webhooks are registered already."""
    return (
        f"webhooks: {limit} are registered, the most allowed (webhooks.max_webhooks);"
        " delete one or raise the limit"
    )


class StreamRate(NamedTuple):
    """What the scheduler's planner needs of an active stream (:meth:`Store.stream_rates`)."""

    account: str
    rate_per_h: float | None  # None: never polled yet


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
    # feeds whose summary count moved further than their reads showed (see ``Behind``)
    behind: dict[Kind, Behind] = field(default_factory=dict)
    # a seeded stream's history line on the upstream's clock (created_ms moved by the offset of
    # the upstream's Date header), fixed by its first pass that saw one; None: not yet
    line_ms: int | None = None
    # when a pass last read every unique-counted feed of the stream that has a count (a
    # campaign's opens, clicks, forwards: see relay.poller.UNIQUE_COUNTED); None: none yet
    swept_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Behind:
    """A feed whose summary count moved further than the feed's reads have shown: the
    upstream's counters can move before its tracking feed lists the record, so the feed is
    read again at each pass until it shows ``missing`` more activities or ``overlap_s`` has
    passed since ``since_ms`` (on the relay's clock, when the last change was seen)."""

    since_ms: int
    missing: int


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

    def __init__(
        self,
        seq: int,
        event_id: str,
        account: str,
        kind: Kind,
        campaign_id: str,
        contact_id: str,
        occurred_ms: int,
        committed_ms: int,
        data: bytes,
    ) -> None:
        # Still frozen, each slot set through its descriptor: the generated __init__ calls
        # object.__setattr__ by name per field, twice the cost (one event is built per commit
        # of an activity, and per row read back or due for a webhook; see Activity.__init__).
        s = _OUTBOX_EVENT_SLOTS
        s[0](self, seq)
        s[1](self, event_id)
        s[2](self, account)
        s[3](self, kind)
        s[4](self, campaign_id)
        s[5](self, contact_id)
        s[6](self, occurred_ms)
        s[7](self, committed_ms)
        s[8](self, data)

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


_OUTBOX_EVENT_SLOTS = slot_setters(OutboxEvent)


@dataclass(frozen=True, slots=True)
class OutboxAppend:
    """What one commit appended to the outbox: exactly the rows with
    ``after_seq < seq <= events[-1].seq``, in seq order."""

    after_seq: int
    events: list[OutboxEvent]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An event a sink gave up on, and why."""

    sink: str
    seq: int
    event_id: str
    reason: str
    created_ms: int


@dataclass(frozen=True, slots=True)
class Webhook:
    """A registered webhook endpoint."""

    id: str
    url: str
    event_types: tuple[str, ...]
    secret: str = field(repr=False)
    description: str = ""
    enabled: bool = True
    previous_secret: str | None = field(default=None, repr=False)
    previous_expires_ms: int | None = None
    rate_limit_per_s: float | None = None
    start_seq: int = 0  # receives events with seq > start_seq (committed after registration)
    disabled_reason: str | None = None
    failing_since_ms: int | None = None  # the failing clock's start (None: not failing)
    created_ms: int = 0
    updated_ms: int = 0
    last_failure_ms: int | None = None  # the clock's latest failed attempt noted in the store

    def secrets_in_use(self, now_ms: int) -> list[str]:
        """The current secret, plus the previous one during its grace period."""
        if self.previous_secret and (self.previous_expires_ms or 0) > now_ms:
            return [self.secret, self.previous_secret]
        return [self.secret]

    def wants(self, event_type: str) -> bool:
        """Whether the filters let this event type through."""
        return type_matches(self.event_types, event_type)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event owed to one webhook."""

    id: int
    webhook_id: str
    seq: int
    event_id: str
    status: str  # pending | delivered | dead
    attempts: int
    next_attempt_ms: int
    last_status: int | None
    last_error: str | None
    created_ms: int
    delivered_ms: int | None


class DueSend(NamedTuple):
    """A due delivery as its sender needs it: the event's structured-mode CloudEvent
    (:meth:`OutboxEvent.structured`, byte for byte) already built by the store."""

    delivery_id: int
    attempts: int  # made before this one: the retry schedule's position
    event_id: str
    committed_ms: int
    body: bytes
    kind: str  # the event's Kind value: a sender skips a kind its webhook's filter now rejects
    version: int  # when read: the attempt settles the delivery only if it is still this


class Attempt(NamedTuple):
    """One HTTP attempt of a delivery (a tuple, as DueSend: the dispatcher builds one per
    attempt, and a frozen dataclass's ``__init__`` cost it ~0.9 us each, timed)."""

    delivery_id: int
    attempted_ms: int
    status_code: int | None
    latency_ms: float
    response_excerpt: str = ""
    error: str | None = None


@dataclass(frozen=True, slots=True)
class PassResult:
    """What a finished pass of a stream writes back."""

    watermarks: dict[Kind, int]
    summary: dict[str, int]
    next_due_ms: int
    rate_per_h: float
    polled_ms: int
    # a feed failed and the others were committed: the stream counts one more consecutive error
    # (so it keeps backing off) with this as its last_error; None: a clean pass clears both
    error: str | None = None
    behind: dict[Kind, Behind] = field(default_factory=dict)  # replaces the stream's
    line_ms: int | None = None  # stored when the stream has none yet (the first one stays)
    swept_ms: int | None = None  # replaces the stream's when set (None: keeps it)


@dataclass(frozen=True, slots=True)
class StreamLease:
    """One claim of a stream by a replica (PostgreSQL: ``Coordinator.claim_streams``), the
    fencing token of that pass's writes. Every claim of a stream increases its ``epoch``, so a
    pass that lost its lease (its replica paused past the expiry while another took the stream
    over) is told apart from the new holder's, even by the same replica: each write of the pass
    (``commit_page``, ``finish_pass`` …) checks the stream's lease row in its own transaction
    and raises :class:`LeaseLostError` instead of writing when the row has another owner or
    epoch. ``held`` is the same lease by this replica's own clock (``relay.leases.Tenure``), no
    store call: checked before each upstream request of the pass (``check``)."""

    stream_id: int
    owner: str
    epoch: int
    held: Callable[[], bool] = field(default=lambda: True, compare=False, repr=False)

    def check(self) -> None:
        """Raise :class:`LeaseLostError` if the lease ran out by this replica's clock."""
        if not self.held():
            raise LeaseLostError(
                f"stream {self.stream_id}: this pass's lease (claim {self.epoch}) ran out by this"
                " replica's clock before its next upstream request (the process was paused past"
                " it, or its renewals did not get through): the pass ends without sending it;"
                " what it committed before stays committed"
            )


@dataclass(frozen=True, slots=True)
class ReplayRequest:
    """A stream's pending upstream replay: the activity time its next pass re-reads from, and
    which request it is (``asked``: how many were made of the stream), so that the end of a pass
    clears or discounts only the request it ran, not one asked for again while it ran."""

    since_ms: int
    asked: int


@dataclass(frozen=True, slots=True)
class Overview:
    """Aggregates for metrics, from grouped queries: as cheap at 100,000 streams as at ten."""

    streams: dict[tuple[str, str], int]  # (scope, state: active | paused | retired) -> count
    watermarks: dict[tuple[str, Kind], tuple[int, int]]  # over active streams: oldest, newest
    pending_deliveries: int  # webhook deliveries not yet delivered or dead


@dataclass(frozen=True, slots=True)
class OutboxSelector:
    """Which committed events a log replay re-emits: one account's, narrowed by stream or
    campaign, committed (or, ``by_activity_time``, that occurred) at or after ``since_ms``."""

    account: str
    since_ms: int
    stream_id: int | None = None
    campaign_id: str | None = None
    by_activity_time: bool = False  # since_ms compares with occurred_ms instead of committed_ms


@dataclass(frozen=True, slots=True)
class OutboxRange:
    """How many events a replay selected or appended, and their seq range (0, 0 when none)."""

    count: int
    first_seq: int = 0
    last_seq: int = 0


@dataclass(frozen=True, slots=True)
class DeliveryCounts:
    """A webhook's backlog: pending and dead deliveries, and the oldest pending event's seq."""

    pending: int = 0
    dead: int = 0
    oldest_pending_seq: int | None = None


@dataclass(frozen=True, slots=True)
class StreamStats:
    """One account's streams counted by state, for status: ``active`` includes ``failing``
    (polled with backoff); ``paused`` excludes retired ones."""

    total: int = 0
    active: int = 0
    failing: int = 0
    paused: int = 0
    retired: int = 0
    replaying: int = 0
    oldest_watermark_ms: int | None = None  # over the feeds of active streams (not paused, retired)


@dataclass(frozen=True, slots=True)
class StreamFilter:
    """Which streams a listing shows; None matches anything. ``state`` is active (not paused,
    not retired), failing (active with errors), paused or retired."""

    account: str | None = None
    scope: str | None = None
    state: str | None = None
    replaying: bool | None = None


class Store(Protocol):
    """Durable state of one relay deployment. Implementations: SQLite (embedded), PostgreSQL."""

    async def open(self) -> None:
        """Connect and apply pending migrations."""

    async def close(self) -> None:
        """Flush and release the connection. Safe to call again (later calls do nothing)."""

    async def schema_version(self) -> int:
        """The applied migration version."""

    async def ensure_streams(
        self, keys: Sequence[StreamKey], due_ms: int, *, seed: bool = True
    ) -> int:
        """Create missing streams (due at ``due_ms``) and un-retire listed ones; returns how many
        were created. ``seed``: their first read absorbs history (start_from: now)."""

    async def streams(self, account: str | None = None) -> list[Stream]:
        """Every stream (of one account), retired ones included."""

    async def due_streams(self, now_ms: int, limit: int, account: str | None = None) -> list[int]:
        """Ids of active (not retired, not paused) streams due by ``now_ms``, soonest first; of
        one account when ``account`` is given."""

    async def stream_rates(self) -> dict[int, StreamRate]:
        """Active (not retired, not paused) streams' account and rate, for the scheduler's budget
        arithmetic: one light row per stream (replicas re-read it every 30 s)."""

    async def stream(self, stream_id: int) -> Stream:
        """One stream; raises StoreError when it does not exist."""

    async def commit_page(
        self,
        stream_id: int,
        activities: Sequence[Activity],
        now_ms: int,
        *,
        emit: bool = True,
        lease: StreamLease | None = None,
    ) -> int:
        """Insert the page's unseen dedup keys and append exactly those events (none when not
        ``emit``: seeding); returns how many keys were new. One transaction.

        ``lease``: the claim the pass runs under (PostgreSQL replicas); the stream's lease row is
        checked in the same transaction, and a pass whose lease another claim replaced writes
        nothing: :class:`LeaseLostError`. The same holds for every write of a pass below
        (``commit_replay_page``, ``finish_pass``, ``record_error``, ``defer_stream``). None: not
        checked (SQLite: one process, which holds every stream)."""

    async def finish_pass(
        self,
        stream_id: int,
        result: PassResult,
        *,
        replay: ReplayRequest | None = None,
        lease: StreamLease | None = None,
    ) -> None:
        """Advance watermarks (never backwards), store the summary and the feeds behind it,
        fix the history line if the stream has none, schedule the next pass.

        ``replay``: the replay the pass ran (``stream_replay`` before it; None: none). Its
        request ends in the same transaction (a pass that finished cannot leave it to run
        again), unless another was made since ``stream_replay`` read it: that one is the next
        pass's. A replay asked for while the pass ran (even with the same time) keeps the stream
        due when it was asked, here and in ``record_error`` and ``defer_stream`` (which end no
        request: the pass is retried). ``lease``: as in ``commit_page``."""

    async def record_error(
        self,
        stream_id: int,
        error: str,
        next_due_ms: int,
        *,
        retire: bool = False,
        replay: ReplayRequest | None = None,
        lease: StreamLease | None = None,
    ) -> None:
        """Count a failed pass, keep its message, back off (or retire the stream); a replay
        asked for while it ran keeps the stream due (``finish_pass``)."""

    async def defer_stream(
        self,
        stream_id: int,
        next_due_ms: int,
        *,
        replay: ReplayRequest | None = None,
        lease: StreamLease | None = None,
    ) -> None:
        """Move the stream's next pass to ``next_due_ms`` without counting an error (the
        account's budget ran out, not the stream); a replay asked for while the pass ran keeps
        the stream due (``finish_pass``)."""

    async def set_paused(self, stream_id: int, paused: bool) -> None:
        """Pause or resume one stream."""

    async def retire_streams(self, keys: Sequence[StreamKey]) -> int:
        """Stop polling these streams (their state is kept), except those an operator added
        (``add_targets``: followed until removed, whatever their age); returns how many were
        polled before. The exception is checked in the same statement, so an addition made
        while discovery's full scan runs (on any replica) is never retired by it."""

    async def spend_quota(self, account: str, day: str, requests: int) -> int:
        """Add to a request count of a UTC day (YYYY-MM-DD); returns the new total. The relay
        counts per budget (``key:<hex>``, one per api_key); older versions counted per account,
        then per budget under an unsalted digest (``AccountSettings.legacy_budget_id``)."""

    async def quota_used(self, account: str, day: str) -> int:
        """Requests counted under that name (a budget's or an account's) on that UTC day."""

    async def budget_salt(self) -> bytes:
        """The store's random salt of budget names (``AccountSettings.budget_name``): made by
        the first caller, the same for every later one and every replica sharing the store."""

    async def set_account_pause(self, account: str, until_ms: int | None, reason: str) -> None:
        """Pause an account until a time (None: resume). A stored pause that lasts longer is
        kept: a replica learning a short pause (a 429) must not cut another's (the quota's)."""

    async def end_account_pause(self, account: str, now_ms: int) -> bool:
        """Lift the account's pause if it has ended by ``now_ms``; False if there was none that
        had (a newer pause another replica stored stays)."""

    async def account_pauses(self) -> dict[str, tuple[int, str]]:
        """Accounts currently paused: until (Unix ms) and why."""

    async def read_outbox(self, after_seq: int, limit: int) -> list[OutboxEvent]:
        """Committed events with seq > after_seq, in order."""

    def on_append(self, listener: Callable[[OutboxAppend], None]) -> None:
        """Hand ``listener`` what each ``commit_page`` of this store object appended, after
        the commit, on the event loop, so an in-process sink need not read it back. Other
        appends (replays, other processes) are not announced: a reader that finds a gap reads
        the outbox, which stays the only source of truth. ``listener`` must not raise."""

    def on_fatal(self, listener: Callable[[StoreError], None]) -> None:
        """Hand ``listener``, on the event loop, the first error after which this store cannot
        be used any more (a :class:`CorruptError`); every later call fails with such an error
        too. The relay stops on it instead of failing every pass for ever. Failures that pass
        (PostgreSQL: an outage is retried) never call it. ``listener`` must not raise."""

    async def outbox_head(self) -> int:
        """The highest committed seq (0 when empty)."""

    async def sink_cursor(self, sink: str) -> int:
        """The last seq a sink has finished with (0 when new)."""

    async def set_sink_cursor(self, sink: str, seq: int) -> None:
        """Move a sink's cursor forward to ``seq``; a ``seq`` below the stored one changes
        nothing (a late write of a replica that lost the sink's lease must not move it back).
        A crash of the machine (not of the relay) may still undo a write, so the sink sends
        those events again, with the same ids."""

    async def add_dead_letter(
        self, sink: str, seq: int, event_id: str, reason: str, now_ms: int
    ) -> None:
        """Record an event a sink could never deliver, with the reason; once per (sink, seq):
        recording it again (a crash before the cursor moved, a replay) keeps the first."""

    async def dead_letters(self, sink: str, limit: int = 100) -> list[DeadLetter]:
        """A sink's dead letters, oldest first (by seq, then in the order recorded)."""

    async def create_webhook(self, webhook: Webhook, max_webhooks: int | None = None) -> Webhook:
        """Store a new webhook; its start_seq becomes the current outbox head. Raises
        DuplicateError when another webhook has the same URL (checked by the unique index, so
        two concurrent registrations cannot both succeed), and LimitError when ``max_webhooks``
        webhooks (enabled or not) are registered already (counted in the transaction that
        inserts, registrations one at a time, so concurrent ones cannot pass the limit)."""

    async def webhook(self, webhook_id: str) -> Webhook:
        """One webhook; raises NotFoundError."""

    async def webhooks(self) -> list[Webhook]:
        """Every webhook, oldest first."""

    async def update_webhook(self, webhook: Webhook, fields: Collection[str] | None = None) -> None:
        """Write ``webhook``'s values of the named fields (Webhook attribute names) and nothing
        else; None writes every field but ``id``. Writing only what a change touched keeps it from
        undoing a concurrent write of the others (the dispatcher's ``failing_since_ms``, a
        disable). Writing ``event_types`` drops, in the same transaction, the webhook's pending
        deliveries (and their attempts) whose kind the new filter rejects, but for those due by
        ``webhook.updated_ms`` (the edit's time) plus ``SPARED_DUE_MS``: one of those may be in
        flight, and its attempt's record must find it (a success would otherwise vanish from
        the history); they stay pending, never read (``due_sends`` takes the wanted kinds),
        until the worker drops them (:meth:`drop_unwanted`) once it holds none of them. Writing
        ``url``, or ``enabled`` as true, makes the webhook's pending deliveries (retries waiting
        included) due by ``webhook.updated_ms``, in the same transaction, their attempt counts
        kept: a webhook enabled again resumes at once, and a new destination has failed none of
        them. A URL change moves their versions on, as a reset does: the record of an attempt
        in flight to the old URL then joins the history without settling its delivery, which
        stays due (and is sent to the new URL, with the same ``webhook-id``, even if that
        attempt succeeded); enabling does not (an attempt in flight then reached the same
        endpoint: its record settles the delivery as usual). Raises
        NotFoundError, DuplicateError (the URL is taken), StoreError for a name that is not a
        field or is ``id``."""

    async def delete_webhook(self, webhook_id: str) -> None:
        """Remove a webhook with its deliveries; raises NotFoundError."""

    async def webhook_failed(
        self, webhook_id: str, now_ms: int, disable_after_ms: int, restart_after_ms: int
    ) -> bool:
        """Note a failed attempt at ``now_ms``: start the failing clock if it is not running, or
        restart it if no failure was noted for more than ``restart_after_ms`` (or none at all:
        a clock from before schema version 13), so a silence (the relay down, nothing owed) is
        not counted as failing; disable the webhook once the clock has run for
        ``disable_after_ms``. True if disabled."""

    async def webhook_succeeded(self, webhook_id: str) -> None:
        """A success stops the failing clock."""

    async def disable_webhook(self, webhook_id: str, reason: str, now_ms: int) -> None:
        """Stop delivering to a webhook, with the reason (e.g. 410 Gone)."""

    async def fanout(self, limit: int, now_ms: int) -> int:
        """Create deliveries for committed events not yet fanned out, for every enabled webhook
        whose filters match; returns how many events were fanned out. One transaction, which
        need not be flushed to disk before returning (see ``finish_attempts``)."""

    async def due_deliveries(
        self, webhook_id: str, now_ms: int, limit: int, skip: Collection[int] = ()
    ) -> list[tuple[Delivery, OutboxEvent]]:
        """Pending deliveries of a webhook due by now, soonest due first, then by seq, leaving
        out the delivery ids in ``skip`` (those the reader already holds: neither joined to
        their events nor counted in ``limit``)."""

    async def due_sends(
        self,
        webhook_id: str,
        now_ms: int,
        limit: int,
        skip: Collection[int] = (),
        *,
        kinds: Collection[str],
    ) -> list[DueSend]:
        """:meth:`due_deliveries`, in the same order, as what the webhook senders need (no
        Delivery or OutboxEvent objects: the sender uses five of their twenty fields), only
        those whose event is of one of ``kinds`` (outbox kinds: the ones the webhook's filter
        lets through, ``rowmap.wanted_kinds``). Pending deliveries of other kinds are neither
        read nor counted in ``limit``, so they can never fill a batch and hold the wanted ones
        back (see :meth:`drop_unwanted`)."""

    async def drop_unwanted(self, webhook_id: str, skip: Collection[int] = ()) -> int:
        """Drop the webhook's pending deliveries (and their attempts) whose kind its filter, as
        stored now, rejects, but those in ``skip`` (the ones the caller holds: in flight, or
        their records not yet written); returns how many. Such deliveries are never sent
        (``due_sends`` leaves them out): a filter edit leaves those that were due (see
        :meth:`update_webhook`), and a store written by an older version (a redelivery it let
        through) can hold some. Raises NotFoundError."""

    async def next_due_ms(
        self, webhook_id: str, after_ms: int = -1, *, kinds: Collection[str] | None = None
    ) -> int | None:
        """When the webhook's first pending delivery due later than ``after_ms`` (Unix ms) is
        due (None: nothing pending after it); with ``kinds``, of those kinds only (as
        ``due_sends`` reads: a delivery the reader would leave out must not wake it)."""

    async def finish_attempts(self, results: Sequence[tuple[Attempt, str, int, int]]) -> None:
        """Record attempts and their deliveries' new status (pending with a retry time,
        delivered, or dead), all in one transaction. An attempt whose delivery no longer exists
        (its webhook was deleted while the attempt was in flight) is skipped, not an error.

        Each result is (attempt, status, next attempt ms, the delivery's ``DueSend.version``
        when it was read for this attempt). Every settled attempt and every reset moves a
        delivery's version on, never back: a delivery whose version is no longer that one (a
        ``redeliver`` or ``recover`` reset it while the attempt was in flight, whichever attempt
        it was, or another attempt of it settled first) keeps what it has: the attempt is
        recorded in its history, the delivery's status is not touched.

        This and ``fanout`` are bookkeeping: they must survive a crash of the relay process but
        may commit without waiting for a flush to disk (SQLite ``synchronous=NORMAL``,
        PostgreSQL ``SET LOCAL synchronous_commit = off``). A machine crash that undoes them
        also undoes everything committed after them, so it can only cause a redelivery with the
        same ``webhook-id``, never a loss."""

    async def delivery(self, delivery_id: int) -> Delivery:
        """One delivery; raises NotFoundError."""

    async def deliveries(
        self, webhook_id: str, limit: int, status: str | None = None, *, before: int | None = None
    ) -> list[Delivery]:
        """A webhook's deliveries, newest (highest id) first; with ``before``, only those whose id
        is lower (the next page back: ``before`` is the last id of the page before)."""

    async def attempts(self, delivery_id: int) -> list[Attempt]:
        """A delivery's attempts, oldest first."""

    async def attempts_of(self, delivery_ids: Collection[int]) -> dict[int, list[Attempt]]:
        """The attempts of each of ``delivery_ids``, oldest first, in one query (a page of
        deliveries with their histories: a query per delivery made a page of 100 cost 101); a
        delivery without attempts (or unknown) maps to an empty list."""

    async def redeliver(self, delivery_id: int, now_ms: int) -> Delivery:
        """Make a delivery pending again, due now, with a fresh attempt budget. Raises
        NotFoundError, GoneError when its event was pruned from the outbox (a delivered
        delivery's history outlives its event), DisabledError when its webhook is disabled, or
        UnwantedError when its webhook's filter no longer lets its event's type through (both
        decided in the same transaction as the write)."""

    async def recover(self, webhook_id: str, since_ms: int, now_ms: int) -> int:
        """Owe the webhook every matching event committed since ``since_ms`` again, once: the
        webhook's pending delivery of the event is reset (whatever its seq: a log replay's copy),
        else its first seq since ``since_ms`` is owed. Returns how many events, each counted
        once (one delivery created or reset per event). Raises NotFoundError, or DisabledError
        when the webhook is disabled (decided in the same transaction as the write)."""

    async def prune_dedup(self, before_ms: int) -> int:
        """Forget dedup keys of activities older than ``before_ms`` that were also inserted
        before it (a backfill's old history outlives a retry of its pass); returns how many."""

    async def prune_outbox(self, before_ms: int, sinks: Sequence[str]) -> int:
        """Delete outbox events committed before ``before_ms`` that every reader is done with:
        below every stored sink cursor, whether or not the sink is configured here (a sink left
        out of the config still owes its events until :meth:`forget_sink`), below the webhook
        fan-out's, and nothing at all while one of ``sinks`` (the configured ones) has no
        cursor yet (the newest event always stays: it marks the head); and owed to no webhook
        (no pending or dead delivery); returns how many. Short transactions."""

    async def prune_deliveries(self, before_ms: int) -> int:
        """Delete deliveries delivered before ``before_ms``, with their attempt history;
        pending and dead deliveries stay (owed, or redeliverable); returns how many. Short
        transactions."""

    async def dedup_count(self) -> int:
        """How many dedup keys are held."""

    async def overview(self) -> Overview:
        """Stream counts, watermark ranges per scope and kind, pending deliveries."""

    # -- operations: status, operator holds, replay, run-time targets --------------------------

    async def sink_cursors(self) -> dict[str, int]:
        """Every sink cursor by sink name (``kafka``, ``webhooks-fanout``, …)."""

    async def forget_sink(self, sink: str) -> bool:
        """Delete a retired sink's cursor, so it no longer holds the outbox prune back (its dead
        letters stay); returns whether it had one. Configured again later, the sink starts from
        the oldest event still in the outbox."""

    async def dead_letter_counts(self) -> dict[str, int]:
        """How many dead letters each sink holds."""

    async def delivery_counts(self) -> dict[str, DeliveryCounts]:
        """Per webhook id: pending and dead deliveries (webhooks with neither are absent)."""

    async def hold_account(self, account: str, reason: str, now_ms: int) -> None:
        """An operator pause of an account: no pass starts until released (kept apart from the
        relay's own quota pauses, which end by themselves)."""

    async def release_account(self, account: str) -> bool:
        """End an operator pause; False if the account was not held."""

    async def account_holds(self) -> dict[str, tuple[int, str]]:
        """Accounts held by an operator: since (Unix ms) and why."""

    async def request_replay(self, stream_ids: Sequence[int], since_ms: int, now_ms: int) -> int:
        """Ask for the next pass of these streams to re-read every feed from ``since_ms``
        (activity time) and re-emit what it finds, and make them due now; returns how many
        streams exist. A second request keeps the earlier of the two times, and is a new request
        all the same: a pass already running the first does not end it."""

    async def stream_replay(self, stream_id: int) -> ReplayRequest | None:
        """The replay a stream's next pass runs (None: no replay asked)."""

    async def replays(self) -> dict[int, int]:
        """Every stream with a replay pending: stream id -> since (Unix ms)."""

    async def commit_replay_page(
        self,
        stream_id: int,
        activities: Sequence[Activity],
        now_ms: int,
        since_ms: int,
        *,
        lease: StreamLease | None = None,
    ) -> tuple[int, int]:
        """Like ``commit_page``, but also append events whose dedup key is known when they
        occurred at or after ``since_ms`` (they keep their ids), each activity once however often
        ``activities`` holds it; returns (new keys, appended)."""

    async def count_outbox(self, selector: OutboxSelector) -> OutboxRange:
        """The committed events a log replay would re-emit."""

    async def replay_outbox(self, selector: OutboxSelector, now_ms: int) -> OutboxRange:
        """Append copies of the selected events (same ids, data and order) at the outbox head,
        committed now, so every sink sends them again; returns the appended range."""

    async def remove_targets(self, keys: Sequence[StreamKey], now_ms: int) -> int:
        """Retire those of these streams that are polled (exist, not retired), remember they
        were removed (discovery must not bring them back) and forget that an operator added
        them; returns how many were polled."""

    async def removed_targets(self, account: str) -> set[StreamKey]:
        """Streams of the account an operator removed."""

    async def add_targets(self, keys: Sequence[StreamKey], now_ms: int) -> None:
        """An operator added these streams: forget that they were removed, and remember the
        addition (discovery does not retire them for their age). The streams themselves are
        made by ``ensure_streams``."""

    async def added_targets(self, account: str) -> set[StreamKey]:
        """Streams of the account an operator added (and did not remove since)."""

    async def stream_stats(self) -> dict[str, StreamStats]:
        """Per account, its streams counted by state and the oldest watermark (one query's
        worth of work, not a read of every stream)."""

    async def stream_page(
        self, where: StreamFilter, limit: int, offset: int
    ) -> tuple[list[Stream], int]:
        """Streams matching the filter in id order, ``limit`` from ``offset``, and how many
        match in all."""
