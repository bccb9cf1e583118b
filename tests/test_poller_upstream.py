"""Poll passes against a programmable Constant Contact v2 stand-in served on 127.0.0.1 (the
real client, over HTTP): upstream behaviours the simulator does not show, such as summary
counters ahead of their feeds and a clock far from the relay's."""

from __future__ import annotations

import email.utils
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from relay.ctct import catalogue
from relay.ctct.client import Credentials, CtctClient
from relay.ctct.ratelimit import Budget, RateLimiter
from relay.events import Kind, format_millis, parse_time, to_millis
from relay.poller import PassOutcome, Poller, PollSettings
from relay.store import Store, StreamKey
from tests.simkit import API_KEY, START, TOKEN

ACCOUNT = "acme"
T0 = to_millis(START)
SCOPES = {"emailmarketing": "campaign", "contacts": "contact"}
SUFFIXES = {suffix: kind for kind, suffix in catalogue.FEEDS.items()}
EXTRA = {
    Kind.BOUNCE: {"bounce_code": "B"},
    Kind.CLICK: {"link_id": "1"},
    Kind.UNSUBSCRIBE: {"unsubscribe_source": "ACTION_BY_CUSTOMER"},
}


@dataclass
class Upstream:
    """One account's activity, each record listed by its campaign's and its contact's feeds
    (newest first, one page, ``created_since`` honoured); summaries count what the feeds list
    plus ``ahead`` (counters that moved before the feed shows the record); with ``unique``, a
    campaign's opens, clicks and forwards count recipients, as the real API's do. The ``Date``
    header is the relay's clock (``Relay.now_ms``) plus ``skew_ms``."""

    records: list[tuple[Kind, str, str, int]] = field(default_factory=list)
    ahead: dict[tuple[str, str, Kind], int] = field(default_factory=dict)
    skew_ms: int = 0
    unique: bool = False
    url: str = ""
    now_ms: Callable[[], int] = lambda: T0

    def add(self, kind: Kind, campaign: str, contact: str, at_ms: int) -> None:
        self.records.append((kind, campaign, contact, at_ms))

    def _listed(self, scope: str, resource_id: str, kind: Kind) -> list[tuple[int, dict[str, str]]]:
        return [
            (
                at_ms,
                {
                    "activity_type": kind.activity_type,
                    "campaign_id": campaign,
                    "contact_id": contact,
                    "email_address": f"{contact}@example.com",
                    f"{kind.value}_date": format_millis(at_ms),
                    **EXTRA.get(kind, {}),
                },
            )
            for k, campaign, contact, at_ms in self.records
            if k is kind and resource_id == (campaign if scope == "campaign" else contact)
        ]

    def _count(self, scope: str, resource_id: str, kind: Kind) -> int:
        listed = self._listed(scope, resource_id, kind)
        if self.unique and scope == "campaign" and kind in {Kind.OPEN, Kind.CLICK, Kind.FORWARD}:
            return len({record["contact_id"] for _, record in listed})
        return len(listed)

    async def handle(self, request: web.Request) -> web.Response:
        parts = request.path.strip("/").split("/")  # v2, scope, [campaigns,] id, tracking, ...
        scope = SCOPES[parts[1]]
        rest = parts[3:] if scope == "campaign" else parts[2:]
        resource_id, tail = rest[0], rest[2:]
        clock_s = (self.now_ms() + self.skew_ms) / 1000
        headers = {"Date": email.utils.formatdate(clock_s, usegmt=True)}
        if tail == ["reports", "summary"]:
            counts = {
                suffix: self._count(scope, resource_id, kind)
                + self.ahead.get((scope, resource_id, kind), 0)
                for suffix, kind in SUFFIXES.items()
            }
            return web.json_response(counts, headers=headers)
        since = request.query.get("created_since")
        floor = to_millis(parse_time(since, "created_since")) if since else 0
        listed = sorted(
            (r for r in self._listed(scope, resource_id, SUFFIXES[tail[0]]) if r[0] >= floor),
            key=lambda r: r[0],
            reverse=True,
        )
        body = {"meta": {"pagination": {}}, "results": [record for _, record in listed]}
        return web.json_response(body, headers=headers)


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    state = Upstream()
    app = web.Application()
    app.router.add_get("/{tail:.*}", state.handle)
    async with TestServer(app, host="127.0.0.1") as server:
        state.url = str(server.make_url("")).rstrip("/")
        yield state


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


class Relay:
    """Passes over the store's streams the way the scheduler runs them, on a settable clock."""

    def __init__(
        self,
        upstream: Upstream,
        session: aiohttp.ClientSession,
        store: Store,
        settings: PollSettings,
    ) -> None:
        self.store, self.now_ms = store, T0
        upstream.now_ms = lambda: self.now_ms
        client = CtctClient(
            session,
            Credentials(upstream.url, API_KEY, TOKEN),
            RateLimiter(Budget(requests_per_second=10_000, requests_per_day=10**7)),
        )
        self.poller = Poller(client, store, ACCOUNT, settings, now_ms=lambda: self.now_ms)

    async def add(self, scope: str, resource_id: str, *, seed: bool) -> int:
        key = StreamKey(ACCOUNT, scope, resource_id)
        await self.store.ensure_streams([key], self.now_ms, seed=seed)
        return next(s.id for s in await self.store.streams() if s.key == key)

    async def run(
        self, stream_id: int, advance_s: float = 0.0, repeat_every_s: float | None = None
    ) -> PassOutcome:
        """Advance the clock and run one pass of the stream, finished as the scheduler does."""
        self.now_ms += int(advance_s * 1000)
        stream = await self.store.stream(stream_id)
        outcome = await self.poller.run_pass(stream, None, repeat_every_s)
        await self.store.finish_pass(stream_id, outcome.result(self.now_ms, 1.0, self.now_ms))
        return outcome

    async def emitted(self) -> list[tuple[str, str]]:
        return [(e.kind.value, e.contact_id) for e in await self.store.read_outbox(0, 10**6)]


async def test_a_count_ahead_of_its_feed_keeps_the_feed_read_until_it_shows_the_record(
    upstream: Upstream, session: aiohttp.ClientSession, any_store: Store
) -> None:
    """The bounce counter moves before the feed lists the bounce: the pass that sees the count
    reads an empty feed, and the count no longer changes once the bounce shows. The count used
    to be stored as read and the feed skipped for good (a quiet feed: no later bounce to move
    the count again), so the bounce was never emitted. Every backend keeps the feed behind."""
    relay = Relay(upstream, session, any_store, PollSettings(start_from="earliest"))
    stream_id = await relay.add("campaign", "1100", seed=False)
    upstream.ahead[("campaign", "1100", Kind.BOUNCE)] = 1
    first = await relay.run(stream_id)
    assert first.feeds_read == [Kind.BOUNCE]
    assert Kind.BOUNCE in (await any_store.stream(stream_id)).behind
    upstream.ahead.clear()
    upstream.add(Kind.BOUNCE, "1100", "42", T0 - 5000)  # listed two minutes after it counted
    second = await relay.run(stream_id, 120)
    assert (second.feeds_read, second.new) == ([Kind.BOUNCE], 1)
    assert await relay.emitted() == [("bounce", "42")]
    assert (await any_store.stream(stream_id)).behind == {}
    third = await relay.run(stream_id, 120)  # caught up: the summary alone again
    assert (third.feeds_read, third.requests) == ([], 1)


async def test_a_feed_behind_its_count_is_read_for_overlap_s_and_no_longer(
    upstream: Upstream, session: aiohttp.ClientSession, store: Store
) -> None:
    """A count that the feed never matches (a counter the feed does not list) costs one feed
    request per pass until overlap_s has passed since the count moved, the last read at or
    after that time, then the summary alone; a new change opens the window again."""
    settings = PollSettings(start_from="earliest", overlap_s=600)
    relay = Relay(upstream, session, store, settings)
    stream_id = await relay.add("campaign", "1100", seed=False)
    upstream.ahead[("campaign", "1100", Kind.FORWARD)] = 1
    costs = [(await relay.run(stream_id, 0 if i == 0 else 240)).requests for i in range(6)]
    assert costs == [2, 2, 2, 2, 1, 1]  # seen at 0 s; read again at 240, 480 and 720 s
    upstream.ahead[("campaign", "1100", Kind.FORWARD)] = 2
    costs = [(await relay.run(stream_id, 400)).requests for _ in range(4)]
    assert costs == [2, 2, 2, 1]  # seen at +0 s; read again at +400 s and +800 s


async def test_a_stream_seeded_at_run_time_hides_no_activity_from_the_others(
    upstream: Upstream, session: aiohttp.ClientSession, store: Store
) -> None:
    """A contact added with start_from: now while a campaign stream of the same activity runs:
    its history used to go into the account-wide dedup at its first read, so the campaign
    stream, not yet past that activity, found it known and never emitted it. History is left
    out by its time now: the campaign stream emits it, and the contact stream emits none of its
    history, at its first read or later (the overlap, a late arrival), only what came after."""
    settings = PollSettings(start_from="now", kinds=(Kind.OPEN,), overlap_s=600)
    relay = Relay(upstream, session, store, settings)
    relay.now_ms = T0 - 3600_000
    campaign = await relay.add("campaign", "1100", seed=True)  # watching for an hour
    assert (await relay.run(campaign, 3600)).new == 0
    upstream.add(Kind.OPEN, "1100", "42", T0 + 59_000)
    relay.now_ms += 60_000
    contact = await relay.add("contact", "42", seed=True)  # a target added a second later
    assert (await relay.run(contact)).new == 0
    assert (await relay.run(campaign)).new == 1
    upstream.add(Kind.OPEN, "1100", "42", T0 + 30_000)  # the contact's history, listed late
    assert (await relay.run(contact, 120)).new == 0
    assert (await relay.run(campaign)).new == 1
    upstream.add(Kind.OPEN, "1100", "42", T0 + 200_000)  # after the contact was added
    assert (await relay.run(contact, 120)).new == 1
    assert (await relay.run(campaign)).new == 0  # the same activity: one event
    for _ in range(3):
        assert (await relay.run(contact, 120)).new == 0
    assert await relay.emitted() == [("open", "42")] * 3
    emitted = sorted(e.occurred_ms for e in await store.read_outbox(0, 10**6))
    assert emitted == [T0 + 30_000, T0 + 59_000, T0 + 200_000]


@pytest.mark.parametrize(
    "skew_ms",
    [
        pytest.param(-86400_000, id="upstream-a-day-behind"),
        pytest.param(30 * 86400_000, id="ahead"),
    ],
)
async def test_start_from_now_draws_the_history_line_on_the_upstreams_clock(
    upstream: Upstream, session: aiohttp.ClientSession, any_store: Store, skew_ms: int
) -> None:
    """Activity times and the Date header are the upstream's clock; the history line and the
    first read's bound were the relay's: an upstream a day behind had everything after the
    stream was added counted as history (nothing emitted, ever), one ahead had its history
    emitted. The line is the creation moved by the Date header's offset, fixed by the first
    pass and stored, so a restarted relay keeps it."""
    settings = PollSettings(start_from="now", kinds=(Kind.OPEN,), overlap_s=600)
    relay = Relay(upstream, session, any_store, settings)
    upstream.skew_ms = skew_ms
    upstream.add(Kind.OPEN, "1100", "old", T0 + skew_ms - 3600_000)  # history
    stream_id = await relay.add("campaign", "1100", seed=True)
    assert (await relay.run(stream_id, 10)).new == 0
    assert (await any_store.stream(stream_id)).line_ms == T0 + skew_ms
    for contact, after_s in (("n1", 30), ("n2", 40)):
        upstream.add(Kind.OPEN, "1100", contact, T0 + skew_ms + after_s * 1000)
    assert (await relay.run(stream_id, 60)).new == 2
    restarted = Relay(upstream, session, any_store, settings)  # knows no offset yet
    restarted.now_ms = relay.now_ms + 60_000
    upstream.add(Kind.OPEN, "1100", "n3", T0 + skew_ms + 100_000)
    assert (await restarted.run(stream_id)).new == 1
    assert await restarted.emitted() == [("open", "n1"), ("open", "n2"), ("open", "n3")]


async def _sent_opened_clicked(
    upstream: Upstream, session: aiohttp.ClientSession, store: Store
) -> tuple[Relay, int]:
    """Campaign 1100, counting unique recipients, which contact 42 was sent, opened and clicked
    before T0, and a relay reading its feeds by time every hour: the relay and the stream."""
    upstream.unique = True
    settings = PollSettings(start_from="earliest", repeat_read_s=3600)
    relay = Relay(upstream, session, store, settings)
    stream_id = await relay.add("campaign", "1100", seed=False)
    upstream.add(Kind.SEND, "1100", "42", T0 - 60_000)
    upstream.add(Kind.OPEN, "1100", "42", T0 - 30_000)
    upstream.add(Kind.CLICK, "1100", "42", T0 - 20_000)
    return relay, stream_id


async def test_unique_counted_feeds_are_read_every_repeat_read_s_whatever_their_counts(
    upstream: Upstream, session: aiohttp.ClientSession, any_store: Store
) -> None:
    """A campaign's opens, clicks and forwards count unique recipients: a repeat open moves no
    count, and the gate never read it while nobody new opened. Those feeds are read by time,
    at least every repeat_read_s, those with a count only (forwards: 0, not read), whatever
    the stream's interval; a pass that reads them all for their counts resets that time, and
    the store keeps it. The scheduler is charged a share of that read per pass."""
    relay, stream_id = await _sent_opened_clicked(upstream, session, any_store)
    first = await relay.run(stream_id, 10)  # every feed with a count: a full read
    assert (first.feeds_read, first.new, first.swept_ms) == (
        [Kind.SEND, Kind.OPEN, Kind.CLICK],
        3,
        relay.now_ms,
    )
    assert (await any_store.stream(stream_id)).swept_ms == relay.now_ms
    assert first.repeat_due_ms == relay.now_ms + 3600_000
    swept = relay.now_ms
    upstream.add(Kind.OPEN, "1100", "42", relay.now_ms + 60_000)  # a repeat: no count moves
    upstream.add(Kind.CLICK, "1100", "42", relay.now_ms + 90_000)  # a second link, say
    quiet = await relay.run(stream_id, 1800)
    assert (quiet.feeds_read, quiet.requests, quiet.new) == ([], 1, 0)
    assert quiet.planned_requests == pytest.approx(1 + 2 * 0.5)  # half of a 2-feed read
    assert quiet.repeat_due_ms == swept + 3600_000
    due = await relay.run(stream_id, 1800)  # repeat_read_s after the last full read
    assert (due.feeds_read, due.new) == ([Kind.OPEN, Kind.CLICK], 2)
    assert (due.requests, due.repeat_requests) == (3, 2)
    assert due.planned_requests == pytest.approx(1 + 2 * 0.5)
    assert (await any_store.stream(stream_id)).swept_ms == relay.now_ms
    assert await relay.emitted() == [
        ("send", "42"),
        ("open", "42"),
        ("click", "42"),
        ("open", "42"),
        ("click", "42"),
    ]
    upstream.add(Kind.OPEN, "1100", "43", relay.now_ms + 10_000)  # someone new: opens move
    upstream.add(Kind.CLICK, "1100", "42", relay.now_ms + 20_000)  # a repeat click
    moved = await relay.run(stream_id, 600)
    assert (moved.feeds_read, moved.new, moved.swept_ms) == ([Kind.OPEN], 1, None)
    assert (await relay.run(stream_id, 3000)).feeds_read == [Kind.OPEN, Kind.CLICK]
    assert await relay.emitted() == [
        ("send", "42"),
        ("open", "42"),
        ("click", "42"),
        ("open", "42"),
        ("click", "42"),
        ("open", "43"),
        ("click", "42"),
    ]


async def test_reads_by_time_follow_the_interval_the_scheduler_fits_to_the_budget(
    upstream: Upstream, session: aiohttp.ClientSession, any_store: Store
) -> None:
    """The scheduler stretches the interval of reads by time when they would take more than
    schedule.repeat_share of the budget: a pass repeat_read_s after the last full read then
    reads no feed by time, its share and the next due time follow the stretched interval, and
    the pass at that interval reads them. An interval below repeat_read_s is not taken."""
    relay, stream_id = await _sent_opened_clicked(upstream, session, any_store)
    first = await relay.run(stream_id, 10, repeat_every_s=10_800)
    assert (first.repeat_feeds, first.repeat_due_ms) == (2, relay.now_ms + 10_800_000)
    swept = relay.now_ms
    upstream.add(Kind.OPEN, "1100", "42", relay.now_ms + 60_000)  # a repeat: no count moves
    quiet = await relay.run(stream_id, 3600, repeat_every_s=10_800)
    assert (quiet.feeds_read, quiet.requests, quiet.repeat_requests) == ([], 1, 0)
    assert quiet.planned_requests == pytest.approx(1 + 2 / 3)  # a third of a 2-feed read
    assert quiet.repeat_due_ms == swept + 10_800_000
    due = await relay.run(stream_id, 7200, repeat_every_s=10_800)
    assert (due.feeds_read, due.repeat_requests, due.new) == ([Kind.OPEN, Kind.CLICK], 2, 1)
    assert due.repeat_due_ms == relay.now_ms + 10_800_000
    swept = relay.now_ms
    shorter = await relay.run(stream_id, 1800, repeat_every_s=60)  # never below repeat_read_s
    assert (shorter.feeds_read, shorter.repeat_due_ms) == ([], swept + 3600_000)
    assert await relay.emitted() == [
        ("send", "42"),
        ("open", "42"),
        ("click", "42"),
        ("open", "42"),
    ]


async def test_a_record_whose_id_holds_a_control_character_is_skipped_not_a_stalled_stream(
    upstream: Upstream, session: aiohttp.ClientSession, any_store: Store
) -> None:
    """A contact id with a NUL (or any other control character) is no Constant Contact id (the
    API names contacts and campaigns by numeric strings). It used to pass the parser, and
    PostgreSQL refuses NUL in text: every commit of the page failed, the watermark never moved,
    and the stream's every later activity waited behind that one record for good. It is skipped
    now, counted and logged as ``poll.bad_record``, on every backend, and the stream goes on."""
    relay = Relay(upstream, session, any_store, PollSettings(start_from="earliest"))
    stream_id = await relay.add("campaign", "1100", seed=False)
    upstream.add(Kind.OPEN, "1100", "4\x002", T0 - 2000)
    upstream.add(Kind.OPEN, "1100", "43", T0 - 1000)
    first = await relay.run(stream_id)
    assert (first.new, first.skipped_records) == (1, 1)
    upstream.add(Kind.OPEN, "1100", "44", T0 + 60_000)
    second = await relay.run(stream_id, 120)
    assert second.new == 1
    assert await relay.emitted() == [("open", "43"), ("open", "44")]
