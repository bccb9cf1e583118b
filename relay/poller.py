"""One pass over one stream: summary gate, pages, normalize, commit, watermark.

Results come newest first, so a feed's watermark may only advance after its last page: the pass
is committed in transactions of up to ``commit_events`` activities (each its unseen dedup keys
plus exactly those events), and the watermarks move in ``finish_pass`` once every feed of the pass
is read and committed. A crash anywhere before that re-reads the same window next time, and dedup
drops what was already committed.

A watermark never moves past the upstream's own clock: the ``Date`` header of the page that
carried the record (the relay's clock without one) plus ``CLOCK_SKEW_S``. A record dated later (a
bad upstream row, say year 9999) is still emitted, and logged, but it does not drag the
watermark along, which would leave every later activity older than ``created_since`` for good.
The relay's own clock is no bound: the simulator's virtual clock runs ahead of it.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeGuard

import structlog

from relay.ctct import catalogue
from relay.ctct.catalogue import Scope
from relay.ctct.client import CtctClient, Page, counting_requests, guarding_requests
from relay.ctct.errors import (
    BadRequestError,
    BudgetExhaustedError,
    CtctError,
    KeyPausedError,
    MalformedResponseError,
    OverQpsError,
    PaginationLoopError,
    QuotaExhaustedError,
    ResponseTimeoutError,
    ServerError,
    TooManyRequestsError,
)
from relay.events import (
    Activity,
    Kind,
    RecordError,
    format_millis,
    from_millis,
    parse_activity,
    parse_time,
    to_millis,
)
from relay.store import Behind, PassResult, Store, Stream, StreamLease

log = structlog.get_logger(__name__)

SUMMARY_ENDPOINT = {Scope.CAMPAIGN: "campaign.summary", Scope.CONTACT: "contact.summary"}
# How far past the upstream's clock a record's time may lie and still move the watermark: the
# Date header has whole seconds, and the servers behind one API need not agree to the second.
CLOCK_SKEW_S = 60.0


# Summary counts of unique recipients, not of a feed's records: the campaign summary's opens,
# clicks and forwards (v2 docs: "Number of unique recipients who clicked a link in this email
# campaign"), while their feeds list every open, click and forward. A repeat open, a click on a
# second link or a second forward by a recipient already counted moves no count at all (nor a
# related one: that recipient is counted in opens and clicks already), so the summary gate
# alone never read it while nobody new acted. These feeds are also read by time: at least every
# ``repeat_read_s`` (see ``_repeat_reads``).
UNIQUE_COUNTED = {
    Scope.CONTACT: frozenset[Kind](),
    Scope.CAMPAIGN: frozenset({Kind.OPEN, Kind.CLICK, Kind.FORWARD}),
}
# Summary counts that count a feed's records, so that they bound how many pages reading it may
# take: all but the unique counts, which bound nothing.
COUNTED_FEEDS = {scope: frozenset(Kind) - unique for scope, unique in UNIQUE_COUNTED.items()}
# Pages a feed's read may take beyond what its summary count implies: activity arriving during
# the pass (a campaign still sending) and a count lagging the feed. Past that, the cursor is
# going nowhere (see ``_page_bound``).
PAGE_MARGIN = 3
PAGE_GROWTH = 0.5


# Errors of one feed's read that say nothing of the stream's other feeds (a feed answering 5xx,
# a malformed body, a pagination loop, a rejected parameter): the other feeds are committed and
# move on, the failing one keeps its watermark and summary count, and the pass reports the error
# once finished, so the stream still backs off (a 2xx whose body was cut off mid-way is such a
# MalformedResponseError). 401, 403, 404 and transport errors (but a response timeout, below)
# concern the account, the network or the stream itself: they end the pass, once what it read
# is committed. The key's budget (KEY_ERRORS, below) stops it, finished with what it read.
FEED_ERRORS = (ServerError, MalformedResponseError, PaginationLoopError, BadRequestError)
# A request that got a connection but no answer in time (after its retries) is feed-local too: a
# slow query upstream (a big feed's window) concerns that feed. Ending the pass at the second
# timeout (the rule before) left every feed after two slow ones unread, pass after pass, for as
# long as they stayed slow. Instead, a feed that timed out is read after the stream's other
# feeds at its next passes (``Poller._slow``), and once ``MAX_TIMEOUTS_PER_PASS`` feeds timed out
# in a pass, the feeds still waiting that timed out before are put off to a later pass (tried
# first among the slow ones then): feeds known slow spend no more of the budget per pass than
# the old rule let timeouts spend (a feed turning slow costs its retries once, in the pass that
# finds it). A connection that cannot be made (refused, reset, DNS, a connect timeout)
# concerns the network and ends the pass at once, as does the summary timing out.
MAX_TIMEOUTS_PER_PASS = 2


def asks_key_to_wait(exc: BaseException) -> TypeGuard[ServerError]:
    """A 5xx that came with a ``Retry-After`` (still set after the client's retries: longer than
    it waits in place, or its attempts ran out): the API asked for a wait, as a 429 does, and
    the whole key honours it (the scheduler pauses the key) instead of each stream failing."""
    return isinstance(exc, ServerError) and bool(exc.retry_after_s)


# Errors that say the key may not send for now (its budget, the API's limits, a Retry-After, a
# pause of the key, its open circuit), nothing about the stream. Met after the summary, they stop
# the pass at that page (no further request), and the pass is finished with what it read: the
# feeds read whole move their watermarks, the stopped one and those not read keep theirs (and
# their summary counts, so the gate reads them next time). Ending the pass on them threw the
# whole pass's watermarks away: the next pass re-read (and paid for) every feed read before.
KEY_ERRORS = (
    KeyPausedError,
    BudgetExhaustedError,
    QuotaExhaustedError,
    TooManyRequestsError,
    OverQpsError,
)


def stops_for_key(exc: BaseException) -> TypeGuard[CtctError]:
    """Whether an error stops the pass for the key's sake (``KEY_ERRORS``, a 5xx asking the
    key to wait)."""
    return isinstance(exc, KEY_ERRORS) or asks_key_to_wait(exc)


@dataclass(frozen=True, slots=True)
class PollSettings:
    """How a pass reads a stream."""

    kinds: tuple[Kind, ...] = tuple(Kind)
    overlap_s: float = 600.0  # created_since = watermark - overlap, to catch late arrivals
    start_from: str = "now"  # "now" | "earliest" | an ISO 8601 timestamp
    summary_gate: bool = True  # skip feeds whose summary count did not change
    page_limit: int = 500
    buffer_limit: int = 50_000  # activities held to sort a pass before committing
    # Activities per commit transaction. Page-sized (500) transactions made committing the
    # slowest stage of a pass: per-transaction work and an fsync each (profiled).
    commit_events: int = 2000
    # How long dedup keys are kept (``poll.dedup_retention_h``): a feed read again after that
    # long cannot tell its old activities from new ones, so they are left out (see _read_feed).
    dedup_retention_s: float = 7 * 86400.0
    # Unique-counted feeds (``UNIQUE_COUNTED``) are read this often, their counts moving or not
    # (``poll.repeat_read_s``); the scheduler polls the stream by then. The shortest interval:
    # the scheduler stretches it when those reads would take more than ``schedule.repeat_share``
    # of the account's budget (``relay.scheduler.repeat_interval_s``).
    repeat_read_s: float = 21_600.0

    def start_ms(self) -> int | None:
        """The first-run lower bound: None for "now" (seed) and "earliest" (everything)."""
        if self.start_from in {"now", "earliest"}:
            return None
        return to_millis(parse_time(self.start_from, "poll.start_from"))


@dataclass(slots=True)
class PassOutcome:
    """What one pass did, for the scheduler and the logs."""

    requests: int = 0
    fetched: int = 0
    new: int = 0
    skipped_records: int = 0
    beyond_retention: int = 0  # re-read activities older than the dedup keys kept: left out
    future_records: int = 0  # dated past the upstream's clock: emitted, not in the watermark
    replayed: int = 0  # known activities emitted again by a replay
    recent: int = 0  # activities read that occurred after the stream was added (first-pass rate)
    feeds_read: list[Kind] = field(default_factory=list)
    watermarks: dict[Kind, int] = field(default_factory=dict)
    summary: dict[str, int] = field(default_factory=dict)
    replay_from_ms: int | None = None  # re-emit known activity from this time (an operator asked)
    feed_error: CtctError | None = None  # a feed failed, the others were committed (FEED_ERRORS)
    feeds_failed: list[Kind] = field(default_factory=list)
    # feeds not tried: they timed out in an earlier pass, and this one had its share of
    # timeouts already (MAX_TIMEOUTS_PER_PASS); read at a later pass, like a failed feed
    feeds_put_off: list[Kind] = field(default_factory=list)
    counts: dict[str, int] | None = None  # what the summary answered in this pass, if it was read
    timeouts: int = 0  # feeds whose read timed out in this pass
    feeds_timed_out: list[Kind] = field(default_factory=list)
    behind: dict[Kind, Behind] = field(default_factory=dict)  # feeds behind their summary count
    line_ms: int | None = None  # the seeded stream's history line this pass fixed (Poller._line)
    # Reads of the unique-counted feeds by time (see Poller._repeat_reads): when this pass read
    # every one of them that has a count (stored: the next such read is due an interval later),
    # when that next read is due (the scheduler polls the stream by then; None: never), the
    # requests of feeds read only because it was due (part of ``requests``), and the share of
    # such a read this pass is charged in the scheduler's cost estimate instead.
    swept_ms: int | None = None
    repeat_due_ms: int | None = None
    repeat_requests: int = 0
    repeat_share: float = 0.0
    # the unique-counted feeds with a count (what a read by time costs; None: not looked at, a
    # replay or no summary gate) and the interval of such reads this pass used
    repeat_feeds: int | None = None
    repeat_every_ms: int = 0
    # the key may not send for now (KEY_ERRORS): the pass stopped at a page, finished with the
    # feeds it read whole; the scheduler pauses the key or defers the stream as for that error
    stopped: CtctError | None = None
    feeds_stopped: list[Kind] = field(default_factory=list)  # not read (whole) for that
    # the claim the pass runs under (replicas on PostgreSQL): the fencing token of its commits
    # and the check before each of its requests; None: not fenced (one process)
    lease: StreamLease | None = None

    def result(self, next_due_ms: int, rate_per_h: float, polled_ms: int) -> PassResult:
        """What finishing this pass writes back to the stream: everything the pass carries over
        (watermarks, summary, a feed's error, feeds behind their counts, the history line, the
        last full read of the unique-counted feeds) with the caller's schedule. One place, so
        no caller (the scheduler, a benchmark, a test) drops a field a later pass relies on."""
        return PassResult(
            watermarks=self.watermarks,
            summary=self.summary,
            next_due_ms=next_due_ms,
            rate_per_h=rate_per_h,
            polled_ms=polled_ms,
            error=None if self.feed_error is None else str(self.feed_error),
            behind=self.behind,
            line_ms=self.line_ms,
            swept_ms=self.swept_ms,
        )

    @property
    def planned_requests(self) -> float:
        """What the pass costs in the scheduler's per-pass cost estimate: its requests, with a
        read of the unique-counted feeds by time spread over the passes between two of them (one
        is due every interval of such reads whatever the stream's; charging it whole to the
        pass that made it made that pass's cost jump, and the next interval with it)."""
        return self.requests - self.repeat_requests + self.repeat_share


class Poller:
    """Reads streams of one account into the store."""

    def __init__(
        self,
        client: CtctClient,
        store: Store,
        account: str,
        settings: PollSettings,
        now_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        on_commit: Callable[[], None] | None = None,
    ) -> None:
        self._client = client
        self._store = store
        self._account = account
        self._settings = settings
        self._now_ms = now_ms
        self._on_commit = on_commit  # tells in-process sinks that the outbox grew
        # the upstream's clock minus the relay's, by the last Date header read (None: none yet)
        self._offset_ms: int | None = None
        # per stream id: its feeds whose read timed out (or was put off) in a pass, in the order
        # to try them at the next, after the stream's other feeds. This process's memory only:
        # after a restart (or on another replica) a slow feed costs one pass its place.
        self._slow: dict[int, tuple[Kind, ...]] = {}

    @property
    def repeat_read_s(self) -> float:
        """The shortest interval of reads by time (``poll.repeat_read_s``)."""
        return self._settings.repeat_read_s

    async def run_pass(
        self,
        stream: Stream,
        replay_from_ms: int | None = None,
        repeat_every_s: float | None = None,
        *,
        lease: StreamLease | None = None,
    ) -> PassOutcome:
        """Poll every feed of the stream that may have news; commit what is new.

        ``replay_from_ms``: read every feed again from that activity time (the watermark is
        treated as if it were there; the stored one never moves back) and emit what is found
        then or later even when dedup knows it, with its usual id.
        ``repeat_every_s``: the interval of reads by time the scheduler fits into the budget
        (never below ``repeat_read_s``; None: ``repeat_read_s``).
        ``lease``: the scheduler's claim of the stream (replicas): each commit is fenced by it
        and each request waits on ``StreamLease.check``; either raises ``LeaseLostError`` once
        the lease is gone, which ends the pass (what it committed stays committed).
        """
        every_s = max(self._settings.repeat_read_s, repeat_every_s or 0.0)
        outcome = PassOutcome(
            watermarks=dict(stream.watermarks),
            summary=dict(stream.summary),
            behind={k: b for k, b in stream.behind.items() if k in self._settings.kinds},
            repeat_every_ms=max(1, int(every_s * 1000)),
            lease=lease,
        )
        # The client is the account's, shared by its concurrent passes: each pass counts the
        # requests sent from its own task (and tasks it starts), not the client's total, and
        # stops its own requests once its lease ran out (a replica paused past it).
        check = None if lease is None else lease.check
        with counting_requests() as sent, guarding_requests(check):
            await self._read_stream(stream, replay_from_ms, outcome)
        outcome.requests = sent.requests
        return outcome

    async def _read_stream(
        self, stream: Stream, replay_from_ms: int | None, outcome: PassOutcome
    ) -> None:
        scope = Scope(stream.key.scope)
        to_read = list(self._settings.kinds)
        by_time: set[Kind] = set()  # read only because their read by time is due
        if self._settings.summary_gate:
            changed = await self._changed_kinds(stream, scope, outcome)
            if replay_from_ms is None:
                # a feed still behind its count is read again (see _settle); a unique-counted
                # one whose read by time is due too
                due = self._repeat_reads(stream, scope, outcome)
                to_read = [k for k in to_read if k in changed or k in outcome.behind or k in due]
                by_time = due - set(changed) - set(outcome.behind)
        else:
            outcome.behind.clear()
        if replay_from_ms is not None:
            outcome.replay_from_ms = replay_from_ms
            # a feed never read keeps no watermark: it reads from its first-run bound anyway,
            # and inventing one could hide late activity older than the replay time
            for kind, mark in stream.watermarks.items():
                outcome.watermarks[kind] = min(mark, replay_from_ms)
        pending: list[Activity] = []
        unread = await self._read_feeds(stream, scope, to_read, by_time, outcome, pending)
        if stream.line_ms is not None or self._offset_ms is not None:
            for kind in unread:  # nothing to absorb: later activity is newer than the line
                outcome.watermarks[kind] = self._line(stream, outcome)
        # else no Date header was seen yet: an unread feed keeps no watermark (a line on the
        # relay's clock could lie in the upstream's future), and its first read starts at the
        # line known then
        if self._settings.summary_gate:
            self._swept(scope, outcome)
        await self._commit(stream.id, pending, outcome)

    async def _read_feeds(
        self,
        stream: Stream,
        scope: Scope,
        to_read: list[Kind],
        by_time: set[Kind],
        outcome: PassOutcome,
        pending: list[Activity],
    ) -> list[Kind]:
        """Read the feeds to read, those that timed out at an earlier pass last (see
        ``MAX_TIMEOUTS_PER_PASS``); the seeded feeds not read, for their history line."""
        unread: list[Kind] = []
        slow = [k for k in self._slow.get(stream.id, ()) if k in self._settings.kinds]
        attempted: set[Kind] = set()
        try:
            for kind in [k for k in self._settings.kinds if k not in slow] + slow:
                reads = kind in by_time or kind in to_read
                if reads and outcome.stopped is not None:
                    self._read_again(stream, kind, outcome)  # the key may not send: next pass
                    outcome.feeds_stopped.append(kind)
                    continue
                if reads and kind in slow and self._puts_off(stream, kind, outcome):
                    continue
                if reads:
                    attempted.add(kind)
                if kind in by_time:
                    with counting_requests() as sent:  # counted in the pass's requests as well
                        await self._read_feed_or_skip(stream, scope, kind, outcome, pending)
                    outcome.repeat_requests += sent.requests
                elif kind in to_read:
                    await self._read_feed_or_skip(stream, scope, kind, outcome, pending)
                elif self._seeds(stream, kind, outcome):
                    unread.append(kind)
        finally:
            # the slow feeds not tried in this pass come first among them at the next
            waiting = [k for k in slow if k not in attempted]
            still_slow = tuple(waiting + outcome.feeds_timed_out)
            if still_slow:
                self._slow[stream.id] = still_slow
            else:
                self._slow.pop(stream.id, None)
        return unread

    def _repeat_reads(self, stream: Stream, scope: Scope, outcome: PassOutcome) -> set[Kind]:
        """The unique-counted feeds (``UNIQUE_COUNTED``) to read whether their counts moved or
        not: all that have a count, once the interval of such reads (``repeat_read_s``, or
        longer when the scheduler stretches it to the budget) has passed since a pass last read
        them all (since the stream was added, before its first such pass). Their counts cannot
        tell a repeat open, a click on a second link or a second forward by a recipient already
        counted: such activity waits for this read, or for a read its feed's count moved, at
        most that interval (the scheduler polls the stream by then, ``repeat_due_ms``). A
        count of 0 has no recipient, so no activity to repeat: such a feed costs nothing.

        Also sets the pass's share of such a read for the scheduler's cost estimate: the feeds
        it would read, times the part of the interval this pass covers."""
        unique = [k for k in self._settings.kinds if k in UNIQUE_COUNTED[scope]]
        if not unique:
            return set()
        now = self._now_ms()
        every_ms = outcome.repeat_every_ms
        last = stream.created_ms if stream.swept_ms is None else stream.swept_ms
        outcome.repeat_due_ms = last + every_ms
        counted = {k for k in unique if outcome.summary.get(catalogue.FEEDS[k], 0) > 0}
        outcome.repeat_feeds = len(counted)
        covered = max(0, now - (stream.last_poll_ms or stream.created_ms))
        outcome.repeat_share = len(counted) * min(1.0, covered / every_ms)
        return counted if now >= last + every_ms else set()

    def _swept(self, scope: Scope, outcome: PassOutcome) -> None:
        """When this pass read every unique-counted feed that has a count (by time, or because
        its count moved: a busy campaign's passes often do), the next read by time is due the
        interval of such reads from now. A feed that failed leaves it due (the next pass reads
        them again)."""
        unique = [k for k in self._settings.kinds if k in UNIQUE_COUNTED[scope]]
        if not unique or outcome.counts is None:
            return
        counted = [k for k in unique if outcome.counts.get(catalogue.FEEDS[k], 0) > 0]
        if all(k in outcome.feeds_read for k in counted):
            now = self._now_ms()
            outcome.swept_ms = now
            outcome.repeat_due_ms = now + outcome.repeat_every_ms

    async def _read_feed_or_skip(
        self,
        stream: Stream,
        scope: Scope,
        kind: Kind,
        outcome: PassOutcome,
        pending: list[Activity],
    ) -> None:
        """Read one feed; a feed-local error (``FEED_ERRORS``, a response timeout) leaves it
        to the next pass.

        One persistently failing feed used to fail every pass of the stream, so the other feeds'
        activity was read again at each retry and never emitted. What the failing feed read
        before the error is committed with the rest: its watermark does not move, so the next
        pass reads it again and dedup drops it. A replay still fails whole: a retry of a replay
        appends again what it committed.

        An error that ends the pass commits what the pass read first: the feeds read before it
        (and this one's pages before the error) were thrown away at every failed pass, so one
        feed timing out pass after pass held back the stream's every event. Safe, as above:
        watermarks move only in ``finish_pass``, which a failed pass never reaches; dedup drops
        the re-read. Not in a replay, for the same reason as above.

        An error of the key (``KEY_ERRORS``) stops the pass instead: no request after it, and
        the pass is finished with the feeds it read whole (``PassOutcome.stopped``).
        """
        try:
            await self._read_feed(stream, scope, kind, outcome, pending)
        except CtctError as exc:
            if outcome.replay_from_ms is None and stops_for_key(exc):
                # a 5xx with a Retry-After the client did not wait out speaks for the whole
                # key, as a 429 or a spent quota do: the pass's other feeds would only get it
                # too. It stops here, and is finished with what it read (KEY_ERRORS).
                self._read_again(stream, kind, outcome)
                outcome.stopped = exc
                outcome.feeds_stopped.append(kind)
                log.warning("poll.stopped", kind=kind.value, error=str(exc))
                return
            if not isinstance(exc, (*FEED_ERRORS, ResponseTimeoutError)):
                await self._commit_before_failing(stream, pending, outcome)
                raise
            if outcome.replay_from_ms is not None:
                await self._commit_before_failing(stream, pending, outcome)
                raise
            if isinstance(exc, ResponseTimeoutError):
                outcome.timeouts += 1
                outcome.feeds_timed_out.append(kind)
            self._read_again(stream, kind, outcome)
            outcome.feeds_failed.append(kind)
            if outcome.feed_error is None:
                outcome.feed_error = exc
            log.warning("poll.feed_failed", stream=str(stream.key), kind=kind.value, error=str(exc))

    def _read_again(self, stream: Stream, kind: Kind, outcome: PassOutcome) -> None:
        """Leave a feed to the next pass: its watermark does not move, and its stored summary
        count is kept, so the summary gate reads it again."""
        name = catalogue.FEEDS[kind]
        if name in stream.summary:
            outcome.summary[name] = stream.summary[name]
        else:
            outcome.summary.pop(name, None)

    def _puts_off(self, stream: Stream, kind: Kind, outcome: PassOutcome) -> bool:
        """Whether a feed that timed out at an earlier pass waits for a later one: this pass had
        ``MAX_TIMEOUTS_PER_PASS`` timeouts already (not in a replay, which reads every feed or
        fails whole)."""
        if outcome.timeouts < MAX_TIMEOUTS_PER_PASS or outcome.replay_from_ms is not None:
            return False
        self._read_again(stream, kind, outcome)
        outcome.feeds_put_off.append(kind)
        log.warning("poll.feed_put_off", stream=str(stream.key), kind=kind.value)
        return True

    async def _commit_before_failing(
        self, stream: Stream, pending: list[Activity], outcome: PassOutcome
    ) -> None:
        """Commit what the pass read before an error ends it (see ``_read_feed_or_skip``)."""
        if outcome.replay_from_ms is None and pending:
            await self._commit(stream.id, pending, outcome)

    def _settle(self, stream: Stream, kind: Kind, shown: int, outcome: PassOutcome) -> None:
        """Whether a feed just read is still behind its summary count.

        The upstream's counters can move before its tracking feed lists the record: a read
        that shows fewer new activities than the count moved by leaves the feed behind, and it
        is read again at each pass of the stream (the count no longer changes, so the gate
        alone would skip it for good) until it has shown them or until ``overlap_s`` has passed
        since the count last moved, the longest a late arrival may take by the README's
        promise; the read at or after that time is the last. ``shown``: activities the read
        showed that are newer than the feed's stored watermark (all on a first read). A first read
        bounded by ``start_from`` cannot show the history older than its window, so it stays
        behind for ``overlap_s``: the price of catching what its counts saw first.
        """
        name = catalogue.FEEDS[kind]
        moved = outcome.summary.get(name, 0) - stream.summary.get(name, 0)
        before = outcome.behind.pop(kind, None)
        now = self._now_ms()
        missing = max(0, (0 if before is None else before.missing) + moved - shown)
        since = now if moved > 0 or before is None else before.since_ms
        if missing and now < since + self._overlap_ms:
            outcome.behind[kind] = Behind(since, missing)

    async def _commit(self, stream_id: int, pending: list[Activity], outcome: PassOutcome) -> None:
        """Commit buffered activity oldest first, one transaction per ``commit_events``.

        Feeds arrive newest first and kind by kind; sorting the pass makes the outbox (and so
        each contact's Kafka partition) follow activity order within the pass. An activity read
        twice (offset pages that shifted under the pass repeat records) is committed once: a
        replay appends every activity it commits, known or not.
        """
        unique = {_identity(activity): activity for activity in pending}
        if len(unique) < len(pending):
            pending[:] = unique.values()
        pending.sort(key=_activity_order)
        size = self._settings.commit_events
        for start in range(0, len(pending), size):
            chunk = pending[start : start + size]
            if outcome.replay_from_ms is None:
                new = await self._store.commit_page(
                    stream_id, chunk, self._now_ms(), lease=outcome.lease
                )
                appended = new
            else:
                new, appended = await self._store.commit_replay_page(
                    stream_id, chunk, self._now_ms(), outcome.replay_from_ms, lease=outcome.lease
                )
                outcome.replayed += appended - new
            outcome.new += new
            if appended and self._on_commit is not None:
                self._on_commit()
        pending.clear()

    @property
    def _overlap_ms(self) -> int:
        return int(self._settings.overlap_s * 1000)

    def _seeds(self, stream: Stream, kind: Kind, outcome: PassOutcome) -> bool:
        """Whether this is a seeded feed's first read (start_from: now): it starts at the
        stream's history line (see ``_history_line``), not at the start of the feed."""
        return stream.seed and kind not in outcome.watermarks and self._settings.start_from == "now"

    def _line(self, stream: Stream, outcome: PassOutcome) -> int:
        """When a seeded stream was added, on the upstream's clock: its creation time moved by
        the offset of the upstream's Date header (activity times are on that clock; against an
        upstream whose clock is behind the relay's, the relay's clock put everything that
        happened after the stream was added into its history). The first pass that knows the
        offset fixes it (``PassOutcome.line_ms``, stored), so the Date header's whole seconds
        cannot move it between passes. The relay's clock while no Date header was seen."""
        if stream.line_ms is not None:
            return stream.line_ms
        if outcome.line_ms is None and self._offset_ms is not None:
            outcome.line_ms = stream.created_ms + self._offset_ms
        return stream.created_ms if outcome.line_ms is None else outcome.line_ms

    def _history_line(self, stream: Stream, outcome: PassOutcome) -> int | None:
        """Activity at or before this time is a seeded stream's history (start_from: now): the
        stream never emits it, at its first read or any later one (the overlap, late arrivals),
        but a replay does. None: the stream emits everything it reads.

        History is left out by its time, never by dedup keys: the keys are account-wide, so
        history a new stream wrote into dedup was "known" to every other stream that had not
        read it yet (a contact added as a target while a campaign stream of the same activity
        was between passes), and they never emitted it. The line is the creation time, not the
        time of the read, so a first pass that fails or is cut short, or an outage before it,
        loses nothing. Streams found by discovery after start-up are not seeded: all they have
        is new.
        """
        seeded = stream.seed and self._settings.start_from == "now"
        return self._line(stream, outcome) if seeded and outcome.replay_from_ms is None else None

    async def _changed_kinds(
        self, stream: Stream, scope: Scope, outcome: PassOutcome
    ) -> list[Kind]:
        endpoint = catalogue.get(SUMMARY_ENDPOINT[scope])
        body = await self._client.fetch(endpoint, resource_id=stream.key.resource_id)
        if not isinstance(body, dict):
            raise MalformedResponseError("summary is not an object", endpoint=endpoint.name)
        counts = {k: v for k, v in body.items() if isinstance(v, int) and not isinstance(v, bool)}
        outcome.summary = counts
        outcome.counts = dict(counts)  # outcome.summary changes as feeds fail
        return [
            kind
            for kind in self._settings.kinds
            if counts.get(catalogue.FEEDS[kind], 0) != stream.summary.get(catalogue.FEEDS[kind], 0)
        ]

    async def _read_feed(
        self,
        stream: Stream,
        scope: Scope,
        kind: Kind,
        outcome: PassOutcome,
        pending: list[Activity],
    ) -> None:
        seeding = self._seeds(stream, kind, outcome)
        stored = stream.watermarks.get(kind)
        shown = 0
        watermark = outcome.watermarks.get(kind)
        # Dedup keys older than the retention are pruned, so a feed idle that long and read
        # again from its watermark would emit its last activities a second time: what is that
        # old AND no newer than the watermark (read before) is left out. Activity after the
        # watermark was never read, however old (the relay or the stream stopped longer than
        # the retention): it is kept. First reads (backfills) and replays keep everything.
        # "That old" holds on both clocks (see _horizon).
        filtering = watermark is not None and outcome.replay_from_ms is None
        too_old = 0
        last_page: Previous = ([], 0)  # the feed's previous page, see _unrepeated
        newest = watermark
        endpoint = catalogue.feed(scope, kind)
        pages = self._client.pages(
            endpoint,
            resource_id=stream.key.resource_id,
            since=self._since(watermark, self._line(stream, outcome) if seeding else None),
            limit=self._settings.page_limit,
        )
        bound = self._page_bound(scope, kind, outcome)
        if bound is not None:
            pages = _bounded(pages, bound, stream, kind, endpoint.name)
        async for page in pages:
            if page.server_ms is not None:
                self._offset_ms = page.server_ms - self._now_ms()
            activities = self._parse(page.records, kind, outcome)
            outcome.fetched += len(activities)
            # each activity's time once per page (a property computed on every read: profiled,
            # reading it for each use below cost ~1 us per activity)
            times = [a.occurred_ms for a in activities]
            activities, times, last_page = _unrepeated(activities, times, last_page)
            if not activities:
                continue
            shown += len(times) if stored is None else sum(1 for t in times if t > stored)
            created_ms = stream.created_ms
            outcome.recent += sum(1 for t in times if t > created_ms)
            page_max = max(times)
            ceiling = self._ceiling(stream, kind, page, activities, page_max, outcome)
            page_newest = min(page_max, ceiling)
            newest = page_newest if newest is None else max(newest, page_newest)
            horizon = self._horizon(page, watermark) if filtering else None
            if horizon is not None and min(times) < horizon:
                kept = [a for a in activities if a.occurred_ms >= horizon]
                too_old += len(activities) - len(kept)
                activities = kept
            line = self._history_line(stream, outcome)
            if line is not None and min(times) <= line:
                activities = [a for a in activities if a.occurred_ms > line]
            pending.extend(activities)
            if len(pending) >= self._settings.buffer_limit:
                # A huge backfill: keep memory bounded; order holds within each flush.
                await self._commit(stream.id, pending, outcome)
        if too_old:
            outcome.beyond_retention += too_old
            log.info("poll.beyond_retention", kind=kind.value, activities=too_old)
        if seeding:
            # nothing to absorb: later activity is newer than the line (learnt during this
            # read when the read had to start at the relay's clock: see _line)
            newest = max(newest or 0, self._line(stream, outcome))
        if newest is not None:
            outcome.watermarks[kind] = newest
        outcome.feeds_read.append(kind)
        if self._settings.summary_gate:
            self._settle(stream, kind, shown, outcome)

    def _page_bound(self, scope: Scope, kind: Kind, outcome: PassOutcome) -> PageBound | None:
        """How many pages a read of this feed may take, when this pass's summary gave a count of
        its records: the pages the count fills plus ``PAGE_MARGIN`` and ``PAGE_GROWTH``.

        The client stops a cursor that keeps returning nothing new; this stops one that keeps
        returning records (a cycle longer than the client remembers, records that differ only
        in a field), which would otherwise spend the key's whole daily budget in one pass. The
        count is the feed's total, so an incremental read is far below the bound."""
        name = catalogue.FEEDS[kind]
        if outcome.counts is None or kind not in COUNTED_FEEDS[scope] or name not in outcome.counts:
            return None
        count = max(0, outcome.counts[name])
        limit = self._settings.page_limit
        expected = max(1, -(-count // limit))
        allowed = expected + max(PAGE_MARGIN, int(expected * PAGE_GROWTH))
        return PageBound(count, name, limit, allowed)

    def _horizon(self, page: Page, watermark: int | None) -> int:
        """Activities of this page older than this were read before and may have lost their
        dedup keys: older than the retention on the relay's clock (the prune's) AND on the
        upstream's (the page's Date header), and no newer than the watermark.

        A key goes only once both its activity time and its insertion are older than the
        retention by the relay's clock, and it was inserted after the activity became visible
        upstream: with the two clocks a steady distance apart, an activity younger than the
        retention on the upstream's clock still has its key. On the relay's clock alone, a
        feed whose activity times are older than the retention (an upstream clock that far
        behind: a simulator on a fixed past date) lost every late arrival inside the overlap
        although its neighbours' keys were inserted seconds before.
        """
        retention_ms = int(self._settings.dedup_retention_s * 1000)
        now = self._now_ms()
        upstream = now if page.server_ms is None else min(now, page.server_ms)
        return min(upstream - retention_ms, (watermark or 0) + 1)

    def _ceiling(
        self,
        stream: Stream,
        kind: Kind,
        page: Page,
        activities: list[Activity],
        page_max: int,
        outcome: PassOutcome,
    ) -> int:
        """The highest watermark this page may set: the upstream's clock when it answered (the
        relay's without a Date header) plus ``CLOCK_SKEW_S``. Activities dated later are logged
        (once per read: dedup keeps them from being emitted twice)."""
        upstream_ms, clock = page.server_ms, "date_header"
        if upstream_ms is None:
            upstream_ms, clock = self._now_ms(), "relay"
        ceiling = upstream_ms + int(CLOCK_SKEW_S * 1000)
        if page_max <= ceiling:
            return ceiling
        for activity in activities:
            if activity.occurred_ms > ceiling:
                outcome.future_records += 1
                log.warning(
                    "poll.future_record",
                    stream=str(stream.key),
                    kind=kind.value,
                    contact_id=activity.contact_id,
                    occurred=format_millis(activity.occurred_ms),
                    upstream_now=format_millis(upstream_ms),
                    clock=clock,
                )
        return ceiling

    def _since(self, watermark: int | None, line: int | None) -> datetime | None:
        """created_since for a feed: the watermark minus the overlap, or the first-run bound
        (``line``: a seeded feed's first read, see ``_line``; what is older is history)."""
        if watermark is not None:
            return from_millis(max(0, watermark - self._overlap_ms))
        if line is not None:
            return from_millis(max(0, line))
        start = self._settings.start_ms()
        return None if start is None else from_millis(start)

    def _parse(
        self, records: tuple[dict[str, object], ...], kind: Kind, outcome: PassOutcome
    ) -> list[Activity]:
        activities = []
        for record in records:
            try:
                activities.append(parse_activity(record, account=self._account, kind=kind))
            except RecordError as exc:
                outcome.skipped_records += 1
                log.warning("poll.bad_record", kind=kind.value, error=str(exc))
        return activities


@dataclass(frozen=True, slots=True)
class PageBound:
    """The most pages a feed's read may take, and the summary count it was derived from."""

    count: int
    name: str  # the summary field, e.g. "sends"
    limit: int  # records per page
    pages: int


async def _bounded(
    pages: AsyncIterator[Page], bound: PageBound, stream: Stream, kind: Kind, endpoint: str
) -> AsyncIterator[Page]:
    """``pages`` up to ``bound.pages``; a next_link past them raises PaginationLoopError (a
    feed error: the other feeds go on) instead of being followed."""
    async for page in pages:
        yield page
        if page.next_link is not None and page.number >= bound.pages:
            raise PaginationLoopError(
                f"{stream.key} {kind.value}: {page.number} pages read and the feed still has a"
                f" next_link, though the summary counts {bound.count} {bound.name} ({bound.limit}"
                f" a page; at most {bound.pages} pages expected); not following it:"
                f" {page.next_link}",
                endpoint=endpoint,
            )


def _unrepeated(
    activities: list[Activity], times: list[int], previous: Previous
) -> tuple[list[Activity], list[int], Previous]:
    """A page without the records its feed's previous page already returned (and their times),
    and what the next page is to be compared with.

    Offset pages of a newest-first feed shift when activity arrives mid-pass: the last records
    of one page come again at the top of the next. ``_commit`` drops repeats within what it
    commits at once; this also covers a repeat across a buffer flush (``buffer_limit``), which a
    replay would otherwise append twice, holding only one page. A repeat has its time in both
    pages, so only records at least as new as the previous page's oldest are compared (in the
    usual newest-first order, none or the few sharing its time).
    """
    before, oldest = previous
    whole: Previous = (activities, min(times, default=0))
    if not before or not times or max(times) < oldest:
        return activities, times, whole
    seen = {_identity(a) for a in before}
    keep = [i for i, t in enumerate(times) if t < oldest or _identity(activities[i]) not in seen]
    if len(keep) == len(activities):
        return activities, times, whole
    return [activities[i] for i in keep], [times[i] for i in keep], whole


# What the dedup key holds (the poller reads one account), without the SHA-1 of the event id.
Identity = tuple[Kind, str, str, datetime, str]
Previous = tuple[list[Activity], int]  # a feed's previous page, and its oldest activity time


def _identity(activity: Activity) -> Identity:
    link = (activity.link_id or "0") if activity.kind is Kind.CLICK else ""
    return (activity.kind, activity.campaign_id, activity.contact_id, activity.occurred_at, link)


_KIND_ORDER = {kind: index for index, kind in enumerate(Kind)}


def _activity_order(activity: Activity) -> tuple[int, int, str, str]:
    """Activity time first; ties (same millisecond) in a fixed, deterministic order."""
    return (
        activity.occurred_ms,
        _KIND_ORDER[activity.kind],
        activity.contact_id,
        activity.link_id or "",
    )
