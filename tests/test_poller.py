"""Poll passes against the simulator: exactly-once into the outbox, seeding, summary gating."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from relay.ctct import catalogue, errors
from relay.ctct.catalogue import Endpoint
from relay.ctct.client import Credentials, CtctClient, Page, RetryPolicy, count_request
from relay.ctct.errors import CtctError, ServerError, TransportError
from relay.ctct.ratelimit import Budget, RateLimiter
from relay.events import Kind, format_millis, to_millis
from relay.poller import CLOCK_SKEW_S, Poller, PollSettings
from relay.sim import Scenario
from relay.sim.scenario import ApiKey, Audience, Campaigns, Contacts, Rates
from relay.store import PassResult, Store, StreamKey
from relay.targets import CampaignDiscovery
from tests.procs import data_identity, truth_identity
from tests.simkit import API_KEY, START, TOKEN, MakeSim, Sim

ACCOUNT = "acme"

BUSY = Scenario(
    seed=5,
    start=START,
    time_scale=0,
    keys=(ApiKey(API_KEY, TOKEN, qps=None, daily=None),),
    contacts=Contacts(count=80),
    campaigns=Campaigns(count=5, already_sent=2, sent_every_s=900, audience=Audience(1.0)),
    rates=Rates(late=0.2, late_mean_s=90, send_batch=40, open_delay_s=600, scanner=0.1),
)

# One campaign, sent just before the start, to three contacts who all open and click, then
# open and click again for hours: a campaign summary's opens and clicks count unique recipients,
# so after the first few minutes neither count moves again.
REPEATS = Scenario(
    seed=9,
    start=START,
    time_scale=0,
    keys=(ApiKey(API_KEY, TOKEN, qps=None, daily=None),),
    contacts=Contacts(count=3),
    campaigns=Campaigns(count=1, already_sent=1, sent_every_s=600, audience=Audience(1.0)),
    rates=Rates(
        open=1.0,
        reopen=0.8,
        click=1.0,
        reclick=0.8,
        forward=0.0,
        bounce=0.0,
        unsubscribe=0.0,
        spam=0.0,
        scanner=0.0,
        late=0.0,
        open_delay_s=120,
        click_delay_s=1800,
    ),
)


async def outbox_identities(store: Store) -> Counter[tuple[str, str, str, int, str]]:
    return Counter(data_identity(e.kind.value, e.data) for e in await store.read_outbox(0, 10**6))


class Driver:
    """Runs passes over every stream the way the scheduler would, with the sim's clock."""

    def __init__(self, sim: Sim, store: Store, settings: PollSettings) -> None:
        self.sim = sim
        self.store = store
        self.client = sim.client(budget=Budget(requests_per_second=10_000, requests_per_day=10**7))
        self.poller = Poller(self.client, store, ACCOUNT, settings, now_ms=lambda: self.now_ms)
        self.now_ms = to_millis(START)

    async def tick(self, advance_s: float) -> int:
        """Advance the simulator, discover, and pass over every active stream once."""
        await self.sim.advance(advance_s)
        self.now_ms += int(advance_s * 1000)
        discovery = CampaignDiscovery(
            self.client, self.store, ACCOUNT, 365, _noop, lambda: self.now_ms
        )
        await discovery.run()
        new = 0
        for stream in await self.store.streams():
            if stream.retired:
                continue
            outcome = await self.poller.run_pass(stream)
            new += outcome.new
            await self.store.finish_pass(stream.id, outcome.result(self.now_ms, 1.0, self.now_ms))
        return new


async def _noop() -> None:
    return None


async def test_exactly_once_with_late_bursts_and_overlapping_scopes(
    make_sim: MakeSim, store: Store
) -> None:
    """Every ground-truth activity reaches the outbox exactly once, and nothing else does:
    repeat opens and clicks of recipients a campaign summary counts already (unique counts)
    included, by the read repeat_read_s after the last."""
    sim = await make_sim(BUSY, advance_s=0)
    truth_contacts = [str(1001 + i) for i in range(0, 80, 7)]
    await store.ensure_streams(
        [StreamKey(ACCOUNT, "contact", c) for c in truth_contacts], to_millis(START)
    )
    settings = PollSettings(
        start_from="earliest", page_limit=25, overlap_s=1800, repeat_read_s=1800
    )
    driver = Driver(sim, store, settings)
    for _ in range(30):  # campaigns are sent during the run; activity keeps arriving
        await driver.tick(150)
    while await driver.tick(600):  # quiet period: late arrivals land, passes find nothing new
        pass
    await driver.tick(settings.repeat_read_s)  # repeats no count shows are read by then
    truth = Counter(truth_identity(a) for a in await sim.truth())
    got = await outbox_identities(store)
    assert sum(truth.values()) > 800
    assert max(truth.values()) == 1, "the simulator's identities are unique"
    assert got == truth
    same_ms = Counter((k, c, ms) for k, c, _, ms, _ in truth if k == "send")
    assert max(same_ms.values()) > 1, "the scenario has same-millisecond sends"


async def test_repeat_opens_and_clicks_of_counted_recipients_are_emitted(
    make_sim: MakeSim, store: Store
) -> None:
    """A campaign summary's opens and clicks count unique recipients: a recipient's second open,
    or a click on a second link, moves no count. The summary gate read a feed only when its
    count moved, so that activity was read only when a new recipient opened or clicked, and
    never on a campaign with nobody new (here: all three recipients counted in the first
    minutes, and hours of repeats). Unique-counted feeds are read at least every
    ``repeat_read_s`` too: every repeat is emitted, exactly once."""
    sim = await make_sim(REPEATS, advance_s=0)
    settings = PollSettings(
        start_from="earliest", kinds=(Kind.OPEN, Kind.CLICK), repeat_read_s=3600
    )
    driver = Driver(sim, store, settings)
    for _ in range(8 * 6):  # eight hours, a pass every ten minutes
        await driver.tick(600)
    truth = Counter(truth_identity(a) for a in await sim.truth() if a["kind"] in {"open", "click"})
    recipients = {(kind, contact) for kind, _, contact, _, _ in truth}
    assert len(recipients) == 6, "three recipients open and click"
    assert sum(truth.values()) > 3 * len(recipients), "and keep opening and clicking"
    got = await outbox_identities(store)
    assert got == truth


async def test_start_from_now_emits_nothing_of_the_past(make_sim: MakeSim, store: Store) -> None:
    """Seeding absorbs the history present at the first pass; later activity is emitted."""
    sim = await make_sim(BUSY, advance_s=3600)
    driver = Driver(sim, store, PollSettings(start_from="now", overlap_s=600))
    driver.now_ms += 3600_000
    assert await driver.tick(0) == 0
    assert await store.read_outbox(0, 10) == []
    before = {truth_identity(a) for a in await sim.truth()}
    for _ in range(8):
        await driver.tick(300)
    emitted = await outbox_identities(store)
    assert emitted, "activity after the first pass is emitted"
    assert not set(emitted) & before


async def test_summary_gate_skips_unchanged_feeds(make_sim: MakeSim, store: Store) -> None:
    """A pass over a stream whose summary did not change costs exactly one request."""
    sim = await make_sim(BUSY, advance_s=7200)
    driver = Driver(sim, store, PollSettings(start_from="earliest"))
    await store.ensure_streams([StreamKey(ACCOUNT, "contact", "1001")], driver.now_ms)
    await driver.tick(0)
    stream = (await store.streams())[0]
    sent = driver.client.requests_sent
    outcome = await driver.poller.run_pass(stream)
    assert outcome.requests == driver.client.requests_sent - sent == 1
    assert outcome.feeds_read == []


async def test_records_that_cannot_be_parsed_are_skipped_not_fatal(
    make_sim: MakeSim, store: Store
) -> None:
    """A malformed record is counted and logged; the rest of the page is committed."""
    from relay.poller import PassOutcome

    sim = await make_sim(BUSY, advance_s=0)
    driver = Driver(sim, store, PollSettings())
    outcome = PassOutcome()
    good = {
        "activity_type": "EMAIL_OPEN",
        "campaign_id": "1",
        "contact_id": "2",
        "email_address": "x@example.com",
        "open_date": "2026-11-20T10:00:00.000Z",
    }
    parsed = driver.poller._parse((good, {**good, "open_date": "never"}), Kind.OPEN, outcome)
    assert len(parsed) == 1
    assert outcome.skipped_records == 1


async def test_commits_with_new_events_notify_the_sinks(make_sim: MakeSim, store: Store) -> None:
    """on_commit fires for each chunk that added events; seeding and repeats are silent."""
    sim = await make_sim(BUSY, advance_s=3600)
    driver = Driver(sim, store, PollSettings())
    calls: list[int] = []
    driver.poller = Poller(
        driver.client,
        store,
        ACCOUNT,
        PollSettings(start_from="now", overlap_s=600, page_limit=5, commit_events=5),
        now_ms=lambda: driver.now_ms,
        on_commit=lambda: calls.append(1),
    )
    driver.now_ms += 3600_000
    assert await driver.tick(0) == 0
    assert calls == [], "seeding commits nothing to the outbox"
    new = 0
    for _ in range(6):
        new += await driver.tick(300)
    assert new > 5, "the scenario commits more than one chunk"
    assert len(calls) >= -(-new // 5)  # at least one call per chunk's worth of new events
    before = len(calls)
    assert await driver.tick(0) == 0  # the same window again: dedup drops it all
    assert len(calls) == before


async def test_replay_pass_re_emits_known_activity_since_a_time_with_its_ids(
    make_sim: MakeSim, store: Store
) -> None:
    """A replay pass reads past the summary gate and watermark, re-emits exactly what occurred
    since the asked time (same ids), counts none of it as new, and never moves a watermark back."""
    sim = await make_sim(BUSY, advance_s=7200)
    driver = Driver(sim, store, PollSettings(start_from="earliest", overlap_s=600))
    await store.ensure_streams([StreamKey(ACCOUNT, "contact", "1001")], driver.now_ms)
    await driver.tick(0)
    stream = next(s for s in await store.streams() if s.key.scope == "contact")
    everything = await store.read_outbox(0, 10**6)
    first = [e for e in everything if e.contact_id == "1001"]  # whichever stream found it first
    assert len(first) > 4
    since = sorted(e.occurred_ms for e in first)[len(first) // 2]
    outcome = await driver.poller.run_pass(stream, replay_from_ms=since)
    again = await store.read_outbox(everything[-1].seq, 10**6)
    assert outcome.new == 0
    assert outcome.replayed == len(again)
    assert Counter(e.event_id for e in again) == Counter(
        e.event_id for e in first if e.occurred_ms >= since
    )
    assert all(outcome.watermarks[k] >= since for k in outcome.watermarks)
    await store.finish_pass(
        stream.id, PassResult(outcome.watermarks, outcome.summary, 0, 1.0, driver.now_ms)
    )
    assert (await store.stream(stream.id)).watermarks == stream.watermarks


class Feeds:
    """An in-process stand-in of the client for one campaign: records per kind, filtered by
    created_since, newest first, in pages of ``page_size``; a kind listed in ``failing``
    answers 500."""

    def __init__(self) -> None:
        self.requests_sent = 0
        self.records: dict[Kind, list[dict[str, object]]] = {k: [] for k in Kind}
        self.failing: set[Kind] = set()
        self.failing_with: CtctError = ServerError("500 from the test")
        self.clock_ms: int | None = None  # the upstream's clock (Date header); None: not sent
        self.page_size: int | None = None  # None: one page
        # each page after the first repeats the previous page's last record, as offset pages do
        # when activity arrives between two page requests
        self.shifted = False

    def add(self, kind: Kind, contact: str, at_ms: int) -> None:
        self.records[kind].append(
            {
                "activity_type": kind.activity_type,
                "campaign_id": "1",
                "contact_id": contact,
                "email_address": f"{contact}@example.com",
                f"{kind.value}_date": format_millis(at_ms),
                **({"link_id": "1"} if kind is Kind.CLICK else {}),
            }
        )

    async def fetch(self, endpoint: Endpoint, *, resource_id: str | None = None) -> object:
        await asyncio.sleep(0)
        self.requests_sent += 1
        count_request()
        return {catalogue.FEEDS[k]: len(v) for k, v in self.records.items()}

    async def pages(
        self,
        endpoint: Endpoint,
        *,
        resource_id: str | None = None,
        since: datetime | None = None,
        limit: int = 500,
    ) -> AsyncIterator[Page]:
        self.requests_sent += 1
        count_request()
        kind = next(k for k in Kind if endpoint == catalogue.feed(catalogue.Scope.CAMPAIGN, k))
        if kind in self.failing:
            raise self.failing_with
        floor = None if since is None else to_millis(since)
        date = f"{kind.value}_date"
        found = [
            r for r in self.records[kind] if floor is None or str(r[date]) >= format_millis(floor)
        ]
        rows = tuple(sorted(found, key=lambda r: str(r[date]), reverse=True))
        size = self.page_size or max(len(rows), 1)
        pages = [rows[start : start + size] for start in range(0, max(len(rows), 1), size)]
        for number, records in enumerate(pages, start=1):
            if number > 1:
                self.requests_sent += 1
                count_request()
                if self.shifted:  # one activity arrived upstream since the previous page
                    records = (pages[number - 2][-1], *records)
            await asyncio.sleep(0)  # concurrent passes interleave, as on a network
            yield Page(number, records, None, self.clock_ms)


class Passes:
    """Passes over one seeded campaign stream, the way the scheduler runs them."""

    def __init__(self, store: Store, feeds: Feeds, settings: PollSettings, now_ms: int) -> None:
        self.store, self.now_ms = store, now_ms
        self.poller = Poller(feeds, store, ACCOUNT, settings, now_ms=lambda: self.now_ms)  # type: ignore[arg-type]

    async def run(self, advance_s: float = 0.0) -> bool:
        """Advance the clock and run one pass; False when it failed (a feed or all of it)."""
        self.now_ms += int(advance_s * 1000)
        stream = (await self.store.streams())[0]
        try:
            outcome = await self.poller.run_pass(stream)
        except CtctError:
            return False
        await self.store.finish_pass(stream.id, outcome.result(0, 1.0, self.now_ms))
        return outcome.feed_error is None

    async def contacts(self) -> list[tuple[str, str]]:
        return [(e.kind.value, e.contact_id) for e in await self.store.read_outbox(0, 10**6)]


T_START = to_millis(START)


async def test_a_failed_first_pass_loses_no_activity_after_the_stream_was_added(
    store: Store,
) -> None:
    """start_from: now absorbs what happened before the stream was added, whatever happens to
    the first passes: activity after it is emitted even when the first pass fails in another
    feed (it used to be absorbed by the next pass's new seed, or never read)."""
    feeds = Feeds()
    await store.ensure_streams([StreamKey(ACCOUNT, "campaign", "1")], T_START, seed=True)
    passes = Passes(store, feeds, PollSettings(kinds=(Kind.OPEN, Kind.CLICK)), T_START)
    feeds.add(Kind.OPEN, "100", T_START - 3600_000)  # history: absorbed
    feeds.add(Kind.CLICK, "100", T_START - 60_000)
    feeds.failing.add(Kind.CLICK)
    assert not await passes.run(10)  # opens seeded, then the click feed fails
    feeds.add(Kind.OPEN, "200", T_START + 60_000)
    assert not await passes.run(90)
    feeds.add(Kind.OPEN, "300", T_START + 7200_000)  # two hours on: past the seed window
    feeds.failing.clear()
    assert await passes.run(7200)
    feeds.add(Kind.CLICK, "400", passes.now_ms + 1000)
    assert await passes.run(60)
    assert sorted(await passes.contacts()) == [("click", "400"), ("open", "200"), ("open", "300")]


async def test_a_feed_read_again_after_the_dedup_retention_emits_nothing_twice(
    store: Store,
) -> None:
    """Dedup keys are pruned by activity time; a feed idle for longer than that is read again
    from its watermark (a new activity, or no summary gate), and the activities the pruned keys
    stood for are left out instead of being emitted a second time, every hour."""
    feeds = Feeds()
    await store.ensure_streams([StreamKey(ACCOUNT, "campaign", "1")], T_START, seed=False)
    day = 86400_000
    settings = PollSettings(kinds=(Kind.OPEN,), summary_gate=False, dedup_retention_s=2 * 86400)
    passes = Passes(store, feeds, settings, T_START)
    feeds.add(Kind.OPEN, "100", T_START - 30_000)
    feeds.add(Kind.OPEN, "101", T_START - 20_000)
    assert await passes.run(0)
    assert len(await passes.contacts()) == 2
    for _ in range(3):  # days of hourly passes with nothing new, pruning as the relay does
        for _ in range(24):
            assert await passes.run(3600)
            await store.prune_dedup(passes.now_ms - 2 * day)
    feeds.add(Kind.OPEN, "102", passes.now_ms - 5000)
    assert await passes.run(60)
    assert sorted(await passes.contacts()) == [("open", "100"), ("open", "101"), ("open", "102")]


@pytest.mark.parametrize(
    "bad_time",
    [
        pytest.param("0001-01-01T00:00:00+01:00", id="before-year-1-in-utc"),
        pytest.param("9999-12-31T23:59:59-01:00", id="after-year-9999-in-utc"),
    ],
)
async def test_a_record_with_an_out_of_range_time_is_skipped_and_counted(
    store: Store, bad_time: str
) -> None:
    """The pass goes on past the record: the good records are committed, the bad one counts in
    ``skipped_records``, and the watermark is the newest good time (the overflow used to kill
    every pass of the stream)."""
    feeds = Feeds()
    await store.ensure_streams([StreamKey(ACCOUNT, "campaign", "1")], T_START, seed=False)
    feeds.add(Kind.OPEN, "1", T_START - 2000)
    feeds.add(Kind.OPEN, "2", T_START - 1000)
    feeds.records[Kind.OPEN].insert(1, {**feeds.records[Kind.OPEN][0], "open_date": bad_time})
    settings = PollSettings(kinds=(Kind.OPEN,), start_from="earliest", summary_gate=False)
    passes = Passes(store, feeds, settings, T_START)
    stream = (await store.streams())[0]
    outcome = await passes.poller.run_pass(stream)
    assert outcome.skipped_records == 1
    assert outcome.new == 2
    assert outcome.watermarks == {Kind.OPEN: T_START - 1000}
    assert sorted(await passes.contacts()) == [("open", "1"), ("open", "2")]


YEAR_9999 = to_millis(datetime(9999, 1, 1, tzinfo=UTC))


async def test_a_record_dated_far_in_the_future_does_not_silence_the_feed(store: Store) -> None:
    """A bad upstream row dated 9999 is emitted once and logged, but the watermark stops at the
    upstream's clock (its Date header) plus the skew allowance: later real activity is still
    read (the watermark used to jump to 9999, every later activity older than created_since)."""
    feeds = Feeds()
    await store.ensure_streams([StreamKey(ACCOUNT, "campaign", "1")], T_START, seed=False)
    settings = PollSettings(kinds=(Kind.OPEN,), start_from="earliest", summary_gate=False)
    passes = Passes(store, feeds, settings, T_START)
    feeds.clock_ms = T_START
    feeds.add(Kind.OPEN, "1", T_START - 1000)
    feeds.add(Kind.OPEN, "9", YEAR_9999)
    with capture_logs() as logs:
        assert await passes.run()
    stream = (await store.streams())[0]
    assert stream.watermarks[Kind.OPEN] == T_START + int(CLOCK_SKEW_S * 1000)
    [future] = [line for line in logs if line["event"] == "poll.future_record"]
    assert future["stream"] == str(stream.key)
    assert future["occurred"] == "9999-01-01T00:00:00.000Z"
    assert future["upstream_now"] == format_millis(T_START)
    assert future["clock"] == "date_header"
    for contact in ("2", "3"):  # real activity keeps coming; the bad row is read again
        feeds.clock_ms += 300_000
        feeds.add(Kind.OPEN, contact, feeds.clock_ms - 1000)
        assert await passes.run(300)
    assert sorted(await passes.contacts()) == [("open", c) for c in ("1", "2", "3", "9")]
    assert (await store.streams())[0].watermarks[Kind.OPEN] <= feeds.clock_ms + 60_000


async def test_the_upstream_clock_bounds_the_watermark_not_the_relays(store: Store) -> None:
    """An upstream clock ahead of the relay's (the simulator's virtual time) is the bound: its
    newest record moves the watermark, though it is later than the relay's own now."""
    feeds = Feeds()
    await store.ensure_streams([StreamKey(ACCOUNT, "campaign", "1")], T_START, seed=False)
    settings = PollSettings(kinds=(Kind.OPEN,), start_from="earliest", summary_gate=False)
    passes = Passes(store, feeds, settings, T_START)
    feeds.clock_ms = T_START + 30 * 86400_000  # a month ahead of the relay
    feeds.add(Kind.OPEN, "1", feeds.clock_ms - 1000)
    with capture_logs() as logs:
        assert await passes.run()
    assert (await store.streams())[0].watermarks[Kind.OPEN] == feeds.clock_ms - 1000
    assert not [line for line in logs if line["event"] == "poll.future_record"]


async def test_without_a_date_header_the_relays_clock_bounds_the_watermark(store: Store) -> None:
    """No usable Date header: the relay's clock plus the allowance is the bound."""
    feeds = Feeds()
    await store.ensure_streams([StreamKey(ACCOUNT, "campaign", "1")], T_START, seed=False)
    settings = PollSettings(kinds=(Kind.OPEN,), start_from="earliest", summary_gate=False)
    passes = Passes(store, feeds, settings, T_START)
    feeds.add(Kind.OPEN, "1", T_START + 86400_000)
    with capture_logs() as logs:
        assert await passes.run()
    assert (await store.streams())[0].watermarks[Kind.OPEN] == T_START + 60_000
    [future] = [line for line in logs if line["event"] == "poll.future_record"]
    assert future["clock"] == "relay"
    assert future["upstream_now"] == format_millis(T_START)


async def test_activity_after_the_watermark_is_kept_however_old(store: Store) -> None:
    """The relay down (or the stream failing) longer than the dedup retention: what happened
    after the feed's watermark was never read, so it is emitted however old; only what the
    watermark covers and the retention no longer does is left out (everything older than the
    retention was dropped, never-read activity included)."""
    feeds = Feeds()
    await store.ensure_streams([StreamKey(ACCOUNT, "campaign", "1")], T_START, seed=False)
    day = 86400_000
    settings = PollSettings(kinds=(Kind.OPEN,), summary_gate=False, dedup_retention_s=2 * 86400)
    passes = Passes(store, feeds, settings, T_START)
    feeds.add(Kind.OPEN, "100", T_START - 30_000)
    assert await passes.run(0)
    for contact, at_ms in (("101", T_START + day // 2), ("102", T_START + 2 * day)):
        feeds.add(Kind.OPEN, contact, at_ms)
    passes.now_ms += 3 * day  # down for three days: all of it is older than the retention
    await store.prune_dedup(passes.now_ms - 2 * day)
    feeds.add(Kind.OPEN, "103", passes.now_ms - 5000)
    stream = (await store.streams())[0]
    outcome = await passes.poller.run_pass(stream)
    assert (outcome.new, outcome.beyond_retention) == (3, 1)  # 100: read before, key pruned
    assert sorted(await passes.contacts()) == [("open", c) for c in ("100", "101", "102", "103")]


@pytest.mark.parametrize(
    "relay_ahead_days", [pytest.param(0, id="same-clock"), pytest.param(30, id="relay-30d-ahead")]
)
async def test_a_late_arrival_is_kept_when_the_upstreams_clock_is_behind(
    store: Store, relay_ahead_days: int
) -> None:
    """The retention filter compared activity times with the relay's clock alone: against an
    upstream whose clock was more than dedup_retention_h behind (a simulator on a fixed past
    date, CI weeks later) every late arrival inside the overlap was left out as beyond the
    retention, though its neighbours' dedup keys were inserted seconds before. The upstream's
    Date header says it is recent; the relay's clock still bounds what the prune removed."""
    feeds = Feeds()
    ahead = relay_ahead_days * 86400_000
    await store.ensure_streams([StreamKey(ACCOUNT, "campaign", "1")], T_START + ahead, seed=False)
    settings = PollSettings(kinds=(Kind.OPEN,), start_from="earliest", summary_gate=False)
    passes = Passes(store, feeds, settings, T_START + ahead)
    feeds.clock_ms = T_START
    feeds.add(Kind.OPEN, "100", T_START - 30_000)
    feeds.add(Kind.OPEN, "101", T_START)
    assert await passes.run(0)
    feeds.clock_ms += 120_000
    feeds.add(Kind.OPEN, "102", T_START - 60_000)  # visible two minutes late, inside the overlap
    assert await passes.run(120)
    assert sorted(await passes.contacts()) == [("open", c) for c in ("100", "101", "102")]


async def test_a_feed_idle_past_the_retention_on_both_clocks_is_still_filtered(
    store: Store,
) -> None:
    """With a Date header as old as the relay's clock, a feed idle for longer than the
    retention still leaves out what it read before and whose keys were pruned."""
    feeds = Feeds()
    await store.ensure_streams([StreamKey(ACCOUNT, "campaign", "1")], T_START, seed=False)
    day = 86400_000
    settings = PollSettings(kinds=(Kind.OPEN,), summary_gate=False, dedup_retention_s=2 * 86400)
    passes = Passes(store, feeds, settings, T_START)
    feeds.clock_ms = T_START
    feeds.add(Kind.OPEN, "100", T_START - 30_000)
    assert await passes.run(0)
    passes.now_ms += 3 * day
    feeds.clock_ms += 3 * day
    await store.prune_dedup(passes.now_ms - 2 * day)
    feeds.add(Kind.OPEN, "101", passes.now_ms - 5000)
    outcome = await passes.poller.run_pass((await store.streams())[0])
    assert (outcome.new, outcome.beyond_retention) == (1, 1)  # 100: read before, key pruned


async def test_a_backfill_retried_after_the_prune_emits_nothing_twice(store: Store) -> None:
    """A first read bigger than buffer_limit commits before its pass ends; the pass then
    fails, the hourly prune runs (the history is older than the retention), and the retry reads
    it all again: dedup still knows what was committed."""
    feeds = Feeds()
    await store.ensure_streams([StreamKey(ACCOUNT, "campaign", "1")], T_START, seed=False)
    day = 86400_000
    for i in range(6):
        feeds.add(Kind.OPEN, str(100 + i), T_START - 30 * day - i * 60_000)
    feeds.add(Kind.CLICK, "200", T_START - 30 * day)
    feeds.page_size = 2
    feeds.failing.add(Kind.CLICK)  # after the opens were flushed, the connection breaks
    feeds.failing_with = TransportError("connection reset by peer")
    settings = PollSettings(
        kinds=(Kind.OPEN, Kind.CLICK), start_from="earliest", summary_gate=False, buffer_limit=2
    )
    passes = Passes(store, feeds, settings, T_START)
    assert not await passes.run(0)
    assert len(await passes.contacts()) == 6  # flushed before the click feed failed
    await store.prune_dedup(T_START + 3600_000 - int(settings.dedup_retention_s * 1000))
    feeds.failing.clear()
    assert await passes.run(3600)
    assert Counter(await passes.contacts()) == Counter(
        [("open", str(100 + i)) for i in range(6)] + [("click", "200")]
    )


async def test_a_record_repeated_by_shifted_pages_is_replayed_once(store: Store) -> None:
    """Offset pages shift when activity arrives mid-pass, so a page repeats the previous page's
    last record; a replay appends what it reads even when dedup knows it, so the repeat was
    appended twice, within one commit or across a buffer flush."""
    feeds = Feeds()
    await store.ensure_streams([StreamKey(ACCOUNT, "campaign", "1")], T_START, seed=False)
    for i in range(7):
        feeds.add(Kind.OPEN, str(100 + i), T_START - 60_000 * (i + 1))
    settings = PollSettings(kinds=(Kind.OPEN,), start_from="earliest", summary_gate=False)
    passes = Passes(store, feeds, settings, T_START)
    assert await passes.run(0)
    head = len(await passes.contacts())
    feeds.page_size, feeds.shifted = 2, True
    for buffer_limit in (50_000, 3):  # all in one commit; flushed between pages
        poller = Poller(feeds, store, ACCOUNT, replace(settings, buffer_limit=buffer_limit))  # type: ignore[arg-type]
        stream = (await store.streams())[0]
        outcome = await poller.run_pass(stream, replay_from_ms=T_START - 3600_000)
        replayed = (await passes.contacts())[head:]
        assert (outcome.replayed, len(replayed)) == (7, 7)
        assert Counter(replayed) == Counter(("open", str(100 + i)) for i in range(7))
        head += len(replayed)


async def test_concurrent_passes_are_charged_their_own_requests(store: Store) -> None:
    """The account's client is shared by its passes, two at a time: each pass's request count
    is its own (the difference of the client's total charged each the other's requests, and
    inflated the planner's cost of quiet streams)."""
    feeds = Feeds()
    for i in range(10):
        feeds.add(Kind.OPEN, str(100 + i), T_START - i * 1000)
    feeds.page_size = 2
    keys = [StreamKey(ACCOUNT, "campaign", "busy"), StreamKey(ACCOUNT, "campaign", "quiet")]
    await store.ensure_streams(keys, T_START, seed=False)
    busy, quiet = await store.streams()
    counts = {catalogue.FEEDS[k]: len(v) for k, v in feeds.records.items()}
    await store.finish_pass(quiet.id, PassResult({}, counts, 0, 1.0, T_START))  # nothing new
    quiet = await store.stream(quiet.id)
    settings = PollSettings(kinds=(Kind.OPEN,), start_from="earliest")
    poller = Poller(feeds, store, ACCOUNT, settings, now_ms=lambda: T_START)  # type: ignore[arg-type]
    outcomes = await asyncio.gather(poller.run_pass(busy), poller.run_pass(quiet))
    assert [o.requests for o in outcomes] == [6, 1]  # summary + 5 pages; the summary only
    assert feeds.requests_sent == 7


async def test_a_failing_feed_does_not_hold_back_the_others(store: Store) -> None:
    """One feed (clicks) answering 500 pass after pass: the other feeds' activity is committed
    at the first pass (the whole pass failed, so it was read again at every retry, never emitted);
    the failing feed keeps its watermark and summary count, the stream counts its errors, and
    the feed is read in full once it answers again."""
    feeds = Feeds()
    await store.ensure_streams([StreamKey(ACCOUNT, "campaign", "1")], T_START, seed=False)
    settings = PollSettings(kinds=(Kind.OPEN, Kind.CLICK), start_from="earliest")
    passes = Passes(store, feeds, settings, T_START)
    feeds.add(Kind.OPEN, "100", T_START - 60_000)
    feeds.add(Kind.CLICK, "200", T_START - 30_000)
    feeds.failing.add(Kind.CLICK)
    for hour in range(3):
        feeds.add(Kind.OPEN, str(101 + hour), passes.now_ms + 3600_000 - 1000)
        assert not await passes.run(3600)
        assert sorted(await passes.contacts()) == [("open", str(100 + i)) for i in range(hour + 2)]
    stream = (await store.streams())[0]
    assert stream.consecutive_errors == 3
    assert stream.last_error == "500 from the test"
    assert Kind.CLICK not in stream.watermarks
    assert catalogue.FEEDS[Kind.CLICK] not in stream.summary
    feeds.failing.clear()
    assert await passes.run(3600)
    assert ("click", "200") in await passes.contacts()
    assert len(await passes.contacts()) == 5
    assert (await store.streams())[0].consecutive_errors == 0


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(TransportError("connection reset"), id="transport"),
        pytest.param(errors.UnauthorizedError("401", status=401), id="unauthorized"),
    ],
)
async def test_an_account_wide_error_in_one_feed_still_ends_the_pass(
    store: Store, error: CtctError
) -> None:
    """Errors that concern the key or the network, not the feed, end the pass (the scheduler
    pauses or backs off the account's stream as before); what the pass read before the error is
    committed first (it was thrown away), and no watermark moves: the pass never finishes."""
    feeds = Feeds()
    await store.ensure_streams([StreamKey(ACCOUNT, "campaign", "1")], T_START, seed=False)
    settings = PollSettings(kinds=(Kind.OPEN, Kind.CLICK), start_from="earliest")
    passes = Passes(store, feeds, settings, T_START)
    feeds.add(Kind.OPEN, "100", T_START - 60_000)
    feeds.add(Kind.CLICK, "200", T_START - 30_000)
    feeds.failing.add(Kind.CLICK)
    feeds.failing_with = error
    stream = (await store.streams())[0]
    with pytest.raises(type(error)):
        await passes.poller.run_pass(stream)
    assert await passes.contacts() == [("open", "100")]
    assert (await store.streams())[0].watermarks == {}


async def test_a_pass_counts_what_happened_after_the_stream_was_added(store: Store) -> None:
    """``recent`` (the scheduler's first-pass rate) counts only activity after the stream was
    added, not the history a first read backfills."""
    feeds = Feeds()
    await store.ensure_streams([StreamKey(ACCOUNT, "campaign", "1")], T_START, seed=False)
    feeds.add(Kind.OPEN, "100", T_START - 86400_000)
    feeds.add(Kind.OPEN, "101", T_START + 1000)
    settings = PollSettings(kinds=(Kind.OPEN,), start_from="earliest")
    passes = Passes(store, feeds, settings, T_START + 2000)
    outcome = await passes.poller.run_pass((await store.streams())[0])
    assert (outcome.new, outcome.recent) == (2, 1)


# --- a deliberately broken upstream on loopback, read by the real client -------------------


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def upstream_client(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    session: aiohttp.ClientSession,
    handler: Handler,
    timeout_s: float = 30.0,
) -> CtctClient:
    """A client of an upstream served by ``handler`` on 127.0.0.1 (retries without sleeping)."""
    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    server = await aiohttp_server(app)

    async def no_sleep(_seconds: float) -> None:
        await asyncio.sleep(0)

    return CtctClient(
        session,
        Credentials(str(server.make_url("")), API_KEY, TOKEN),
        RateLimiter(Budget(requests_per_second=10_000, requests_per_day=2000)),
        retry=RetryPolicy(max_attempts=2, base_delay_s=0.01),
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        sleep=no_sleep,
    )


def tracking_page(records: list[dict[str, object]], next_link: str | None = None) -> web.Response:
    pagination = {"next_link": next_link} if next_link else {}
    return web.json_response({"meta": {"pagination": pagination}, "results": records})


def tracking_record(kind: Kind, contact: str, at_ms: int) -> dict[str, object]:
    return {
        "activity_type": kind.activity_type,
        "campaign_id": "1100",
        "contact_id": contact,
        "email_address": f"{contact}@example.com",
        f"{kind.value}_date": format_millis(at_ms),
    }


async def test_a_cursor_that_never_ends_stops_at_what_the_summary_count_implies(
    aiohttp_server: Callable[..., Awaitable[TestServer]], store: Store
) -> None:
    """A sends feed whose cursor hands out a new next_link and a new record at every page (so
    the client's guard never fires): it used to be followed until the day's budget was spent,
    and the key paused until midnight. The summary counts 3 sends, one page's worth: the read
    stops a few pages later as a feed error, logged once with the stream and the feed, and the
    other feeds are read and committed. A campaign's opens count unique recipients, not the
    feed's records, so a long opens feed is read in full whatever its count."""
    served: Counter[str] = Counter()

    async def handler(request: web.Request) -> web.Response:
        feed = request.path.rsplit("/", 1)[-1]
        served[feed] += 1
        n = served[feed]
        if feed == "summary":
            return web.json_response({"sends": 3, "opens": 1, "bounces": 1})
        if feed == "sends":  # a new record and a new link, for ever
            record = tracking_record(Kind.SEND, str(n), T_START - n * 1000)
            return tracking_page([record], f"{request.path}?next=s{n}")
        if feed == "opens":  # six pages: one contact opened many times
            record = tracking_record(Kind.OPEN, "7", T_START - n * 1000)
            return tracking_page([record], f"{request.path}?next=o{n}" if n < 6 else None)
        bounce = tracking_record(Kind.BOUNCE, "9", T_START - 500) | {"bounce_code": "B"}
        return tracking_page([bounce])

    await store.ensure_streams([StreamKey(ACCOUNT, "campaign", "1100")], T_START, seed=False)
    settings = PollSettings(kinds=(Kind.SEND, Kind.OPEN, Kind.BOUNCE), start_from="earliest")
    async with aiohttp.ClientSession() as session:
        client = await upstream_client(aiohttp_server, session, handler)
        poller = Poller(client, store, ACCOUNT, settings, now_ms=lambda: T_START)
        stream = (await store.streams())[0]
        with capture_logs() as logs:
            outcome = await poller.run_pass(stream)
    assert served == {"summary": 1, "sends": 4, "opens": 6, "bounces": 1}
    assert outcome.feeds_failed == [Kind.SEND]
    assert isinstance(outcome.feed_error, errors.PaginationLoopError)
    assert str(outcome.feed_error).startswith(
        "campaign.sends: acme/campaign/1100 send: 4 pages read and the feed still has a"
        " next_link, though the summary counts 3 sends (500 a page; at most 4 pages expected)"
    )
    [failed] = [line for line in logs if line["event"] == "poll.feed_failed"]
    assert (failed["stream"], failed["kind"]) == ("acme/campaign/1100", "send")
    assert outcome.watermarks.keys() == {Kind.OPEN, Kind.BOUNCE}
    assert "sends" not in outcome.summary  # read again next pass
    assert Counter(kind for kind, _ in await outbox_kinds(store)) == {
        "send": 4,  # what the failing feed read is committed; its watermark does not move
        "open": 6,
        "bounce": 1,
    }


async def outbox_kinds(store: Store) -> list[tuple[str, str]]:
    return [(e.kind.value, e.contact_id) for e in await store.read_outbox(0, 10**6)]


async def test_text_that_is_not_clean_utf8_costs_one_record_at_most(
    aiohttp_server: Callable[..., Awaitable[TestServer]], store: Store
) -> None:
    """One Latin-1 byte in a record's email, a lone surrogate escape in an unsubscribe reason:
    orjson refused the whole page, so the feed failed every pass and nothing on it (or after
    it) was ever emitted. The text is repaired (U+FFFD) and emitted; a record whose contact id
    is what could not be decoded is skipped and logged as poll.bad_record, not its page."""
    at = T_START - 60_000
    opens = [tracking_record(Kind.OPEN, str(c), at - c) for c in (1, 2, 3, 4)]
    opens[1]["email_address"] = "LATIN1"
    opens[2]["contact_id"] = "CONTACT"
    unsubscribe = tracking_record(Kind.UNSUBSCRIBE, "5", at) | {"unsubscribe_reason": "SURR"}
    bodies = {
        "opens": orjson.dumps({"meta": {"pagination": {}}, "results": opens})
        .replace(b"LATIN1", b"ren\xe9@example.fr")
        .replace(b"CONTACT", b"3\xe93"),
        "unsubscribes": orjson.dumps(
            {"meta": {"pagination": {}}, "results": [unsubscribe]}
        ).replace(b"SURR", b"too many \\ud83d"),
    }

    async def handler(request: web.Request) -> web.Response:
        feed = request.path.rsplit("/", 1)[-1]
        if feed == "summary":
            return web.json_response({"opens": 4, "unsubscribes": 1})
        return web.Response(body=bodies[feed], content_type="application/json")

    await store.ensure_streams([StreamKey(ACCOUNT, "campaign", "1100")], T_START, seed=False)
    settings = PollSettings(kinds=(Kind.OPEN, Kind.UNSUBSCRIBE), start_from="earliest")
    async with aiohttp.ClientSession() as session:
        client = await upstream_client(aiohttp_server, session, handler)
        poller = Poller(client, store, ACCOUNT, settings, now_ms=lambda: T_START)
        with capture_logs() as logs:
            outcome = await poller.run_pass((await store.streams())[0])
    assert (outcome.feed_error, outcome.new, outcome.skipped_records) == (None, 4, 1)
    assert outcome.watermarks == {Kind.OPEN: at - 1, Kind.UNSUBSCRIBE: at}
    data = {e.contact_id: orjson.loads(e.data) for e in await store.read_outbox(0, 10**6)}
    assert sorted(data) == ["1", "2", "4", "5"]
    assert data["2"]["email_address"] == "ren\ufffd@example.fr"
    assert data["5"]["unsubscribe_reason"] == "too many \ufffd"
    [bad] = [line for line in logs if line["event"] == "poll.bad_record"]
    assert bad["error"].startswith("contact_id: holds characters that could not be decoded")
    repaired = [line["endpoint"] for line in logs if line["event"] == "ctct.body_repaired"]
    assert repaired == ["campaign.opens", "campaign.unsubscribes"]


def slow_feeds_upstream(slow: set[str], served: Counter[str]) -> Handler:
    """Answers a campaign's summary and feeds at once, but ``slow`` feeds only after a second
    (a slow query upstream); one fresh record per feed."""

    async def handler(request: web.Request) -> web.Response:
        feed = request.path.rsplit("/", 1)[-1]
        served[feed] += 1
        if feed == "summary":
            return web.json_response({"sends": 1, "opens": 1, "clicks": 1, "bounces": 1})
        if feed in slow:
            await asyncio.sleep(1)
        kind = next(k for k in Kind if catalogue.FEEDS[k] == feed)
        record = tracking_record(kind, "1", T_START - 1000)
        extra = {"bounce_code": "B"} if kind is Kind.BOUNCE else {"link_id": "1"}
        return tracking_page([record | extra])

    return handler


async def test_a_feed_that_times_out_does_not_hold_back_the_others(
    aiohttp_server: Callable[..., Awaitable[TestServer]], store: Store
) -> None:
    """One feed (sends) answering slower than the timeout, pass after pass: the timeout ended
    the pass and what the other feeds had read was thrown away, so none of the stream's events
    were delivered while it stayed slow. The timed-out feed fails alone (its watermark and
    summary count kept, the stream backing off); the feeds before and after it are committed."""
    served: Counter[str] = Counter()
    await store.ensure_streams([StreamKey(ACCOUNT, "campaign", "1100")], T_START, seed=False)
    settings = PollSettings(kinds=(Kind.OPEN, Kind.SEND, Kind.BOUNCE), start_from="earliest")
    async with aiohttp.ClientSession() as session:
        handler = slow_feeds_upstream({"sends"}, served)
        client = await upstream_client(aiohttp_server, session, handler, timeout_s=0.2)
        poller = Poller(client, store, ACCOUNT, settings, now_ms=lambda: T_START)
        outcome = await poller.run_pass((await store.streams())[0])
    assert served == {"summary": 1, "opens": 1, "sends": 2, "bounces": 1}  # sends: 2 attempts
    assert outcome.feeds_failed == [Kind.SEND]
    assert isinstance(outcome.feed_error, errors.ResponseTimeoutError)
    assert outcome.watermarks.keys() == {Kind.OPEN, Kind.BOUNCE}
    assert "sends" not in outcome.summary
    assert sorted(await outbox_kinds(store)) == [("bounce", "1"), ("open", "1")]


class SlowFeeds:
    """A middleware for the simulator: the campaign feeds named in ``slow`` answer only after
    0.6 s (a slow query upstream); records the feeds asked, pass by pass."""

    def __init__(self, slow: set[str]) -> None:
        self.slow = slow
        self.asked: list[str] = []

        @web.middleware
        async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.path.startswith("/v2/emailmarketing/campaigns/"):
                feed = request.path.rsplit("/", 1)[-1]
                self.asked.append(feed)
                if feed in self.slow:
                    await asyncio.sleep(0.6)
            return await handler(request)

        self.middleware = middleware

    def take(self) -> list[str]:
        """The feeds asked since the last call, in order (one entry per request)."""
        asked, self.asked = self.asked, []
        return asked


async def slow_feed_poller(
    make_sim: MakeSim, store: Store, slow: set[str], kinds: tuple[Kind, ...]
) -> tuple[SlowFeeds, Poller, Sim, str]:
    """A poller of one sent campaign of the simulator, whose ``slow`` feeds time out (0.2 s, two
    attempts a request); every feed is read at every pass (no summary gate)."""
    upstream = SlowFeeds(slow)
    sim = await make_sim(middlewares=[upstream.middleware])
    truth = await sim.truth()
    campaign = next(
        str(c)
        for c in sorted({a["campaign_id"] for a in truth}, key=str)
        if all(any(a["campaign_id"] == c and a["kind"] == k.value for a in truth) for k in kinds)
    )
    await store.ensure_streams([StreamKey(ACCOUNT, "campaign", campaign)], T_START, seed=False)
    client = sim.client(retry=RetryPolicy(max_attempts=2), timeout=aiohttp.ClientTimeout(total=0.2))
    settings = PollSettings(kinds=kinds, start_from="earliest", summary_gate=False)
    return upstream, Poller(client, store, ACCOUNT, settings, now_ms=lambda: T_START), sim, campaign


async def test_two_slow_feeds_leave_the_others_read_and_committed_every_pass(
    make_sim: MakeSim, store: Store
) -> None:
    """Two feeds of a stream timing out (sends, clicks) against the simulator: the second
    timeout ended the pass, so the feeds after it (bounces, unsubscribes) went unread at every
    pass while both stayed slow, and nothing read moved a watermark. Both now fail alone: every
    other feed is read, committed in full and its watermark moves; the slow ones keep theirs,
    spend their two attempts each, and are read after the others at the next pass."""
    kinds = (Kind.OPEN, Kind.SEND, Kind.CLICK, Kind.BOUNCE, Kind.UNSUBSCRIBE)
    upstream, poller, sim, campaign = await slow_feed_poller(
        make_sim, store, {"sends", "clicks"}, kinds
    )
    outcome = await poller.run_pass((await store.streams())[0])
    assert upstream.take() == [
        "opens", "sends", "sends", "clicks", "clicks", "bounces", "unsubscribes"
    ]  # fmt: skip
    assert outcome.feeds_failed == [Kind.SEND, Kind.CLICK]
    assert outcome.feeds_read == [Kind.OPEN, Kind.BOUNCE, Kind.UNSUBSCRIBE]
    assert isinstance(outcome.feed_error, errors.ResponseTimeoutError)
    assert outcome.watermarks.keys() == {Kind.OPEN, Kind.BOUNCE, Kind.UNSUBSCRIBE}
    healthy = {"open", "bounce", "unsubscribe"}
    truth = Counter(
        truth_identity(a)
        for a in await sim.truth()
        if a["campaign_id"] == campaign and a["kind"] in healthy
    )
    assert await outbox_identities(store) == truth
    stream = (await store.streams())[0]
    await store.finish_pass(stream.id, outcome.result(T_START, 1.0, T_START))
    stream = (await store.streams())[0]
    assert stream.watermarks.keys() == {Kind.OPEN, Kind.BOUNCE, Kind.UNSUBSCRIBE}
    outcome = await poller.run_pass(stream)
    assert upstream.take() == [
        "opens", "bounces", "unsubscribes", "sends", "sends", "clicks", "clicks"
    ]  # fmt: skip
    assert outcome.feeds_failed == [Kind.SEND, Kind.CLICK]


async def test_slow_feeds_spend_two_feeds_attempts_a_pass_and_take_turns(
    make_sim: MakeSim, store: Store
) -> None:
    """Three slow feeds: the pass that finds them tries each (it cannot know); at later passes
    the healthy feeds come first, two slow feeds spend their attempts (as many as the old rule
    let a pass spend on timeouts) and the third is put off, first in line at the next pass."""
    kinds = (Kind.SEND, Kind.CLICK, Kind.FORWARD, Kind.OPEN, Kind.BOUNCE)
    upstream, poller, _, _ = await slow_feed_poller(
        make_sim, store, {"sends", "clicks", "forwards"}, kinds
    )
    stream = (await store.streams())[0]
    first = await poller.run_pass(stream)
    assert upstream.take() == [
        "sends", "sends", "clicks", "clicks", "forwards", "forwards", "opens", "bounces"
    ]  # fmt: skip
    assert first.feeds_read == [Kind.OPEN, Kind.BOUNCE]
    with capture_logs() as logs:
        second = await poller.run_pass(stream)
    assert upstream.take() == ["opens", "bounces", "sends", "sends", "clicks", "clicks"]
    assert (second.feeds_read, second.feeds_put_off) == ([Kind.OPEN, Kind.BOUNCE], [Kind.FORWARD])
    [put_off] = [line for line in logs if line["event"] == "poll.feed_put_off"]
    assert put_off["kind"] == "forward"
    third = await poller.run_pass(stream)
    assert upstream.take() == ["opens", "bounces", "forwards", "forwards", "sends", "sends"]
    assert third.feeds_put_off == [Kind.CLICK]
    assert third.feeds_failed == [Kind.FORWARD, Kind.SEND]


async def test_a_network_that_refuses_every_connection_ends_the_pass_at_once(
    store: Store,
) -> None:
    """Connection refused is the network's failure, not a feed's: the pass ends at the first
    feed (its attempts only) instead of spending requests on every feed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    await store.ensure_streams([StreamKey(ACCOUNT, "campaign", "1100")], T_START, seed=False)
    settings = PollSettings(start_from="earliest", summary_gate=False)
    async with aiohttp.ClientSession() as session:
        client = CtctClient(
            session,
            Credentials(f"http://127.0.0.1:{port}", API_KEY, TOKEN),
            RateLimiter(Budget(requests_per_second=10_000)),
            retry=RetryPolicy(max_attempts=2, base_delay_s=0.01),
        )
        poller = Poller(client, store, ACCOUNT, settings, now_ms=lambda: T_START)
        with pytest.raises(errors.TransportError, match="cannot connect") as caught:
            await poller.run_pass((await store.streams())[0])
    assert not isinstance(caught.value, errors.ResponseTimeoutError)
    assert client.requests_sent == 2
