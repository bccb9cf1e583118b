"""The generator, the world's indexes, the clock, paging tokens and rendering, without HTTP."""

from __future__ import annotations

import statistics
import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.ctct.catalogue import Scope
from relay.events import Kind, parse_activity
from relay.sim import SimClock
from relay.sim.generator import generate
from relay.sim.index import SortedIndex, newest_first
from relay.sim.model import Activity, Campaign, Contact
from relay.sim.params import ParamError, page_request, parse_since
from relay.sim.render import canonical, format_ms, record
from relay.sim.scenario import Rates
from relay.sim.world import World
from tests.sim import START, scenario

START_MS = int(START.timestamp() * 1000)


def contacts(count: int) -> tuple[Contact, ...]:
    """``count`` contacts, all existing an hour before the start."""
    return tuple(
        Contact(str(1001 + i), f"contact{1001 + i}@example.com", START_MS - 3_600_000)
        for i in range(count)
    )


def campaign(index: int = 0, links: tuple[str, ...] = ("0", "11", "12")) -> Campaign:
    """A campaign sent at the start to everyone."""
    return Campaign(index, str(1100394165290 + index), f"c{index}", START_MS, links, 1.0, None)


BUSY = Rates(open=0.9, reopen=0.6, click=0.8, reclick=0.6, scanner=0.2, late=0.3, send_batch=50)


def test_generation_is_deterministic() -> None:
    """The same seed and campaign give the same history; another seed does not."""
    people = contacts(200)
    first = generate(campaign(), people, BUSY, seed=5)
    again = generate(campaign(), people, BUSY, seed=5)
    other = generate(campaign(), people, BUSY, seed=6)
    assert first == again
    assert first.activities != other.activities


@pytest.mark.parametrize("seed", range(5))
def test_identities_never_collide(seed: int) -> None:
    """No two activities share (type, campaign, contact, millisecond, link)."""
    history = generate(campaign(), contacts(300), BUSY, seed=seed)
    identities = [a.identity for a in history.activities]
    assert len(identities) == len(set(identities))


def test_identities_match_the_relays_dedup_keys() -> None:
    """Rendered records parse (relay.events) to distinct dedup keys, one per activity."""
    history = generate(campaign(), contacts(300), BUSY, seed=2)
    keys = {
        parse_activity(record(a, Scope.CONTACT, quirks=True), account="x").dedup_key
        for a in history.activities
    }
    assert len(keys) == len(history.activities)


def test_sends_are_batched_in_the_same_millisecond() -> None:
    """One send per recipient, send_batch of them sharing each millisecond."""
    history = generate(campaign(), contacts(120), BUSY, seed=1)
    sends = [a for a in history.activities if a.kind is Kind.SEND]
    assert len(sends) == 120
    per_ms = Counter(a.occurred_ms for a in sends)
    assert sorted(per_ms.values()) == [20, 50, 50]
    assert all(ms % 1000 == 0 for ms in per_ms)


def test_link_scanners_click_every_link_at_once() -> None:
    """A scanner's clicks on all links of the campaign share one millisecond."""
    history = generate(campaign(), contacts(200), BUSY, seed=1)
    clicks: dict[tuple[str, int], set[str]] = {}
    for a in history.activities:
        if a.kind is Kind.CLICK:
            clicks.setdefault((a.contact.id, a.occurred_ms), set()).add(a.link_id)
    assert {"0", "11", "12"} in clicks.values()


def test_activity_follows_the_send_and_bounces_carry_codes() -> None:
    """Nothing happens before the send; bounces have a known code and nothing follows them."""
    history = generate(campaign(), contacts(400), Rates(bounce=0.2), seed=3)
    assert all(a.occurred_ms >= START_MS for a in history.activities)
    assert all(a.visible_ms >= a.occurred_ms for a in history.activities)
    bounced = {a.contact.id for a in history.activities if a.kind is Kind.BOUNCE}
    assert bounced
    assert not any(
        a.contact.id in bounced for a in history.activities if a.kind in (Kind.OPEN, Kind.CLICK)
    )
    codes = {canonical(a)["bounce_code"] for a in history.activities if a.kind is Kind.BOUNCE}
    assert codes <= set("BSDFVZX")


def test_late_arrivals_are_a_fraction() -> None:
    """About the configured share of activities become visible after their own time."""
    history = generate(campaign(), contacts(500), Rates(late=0.25), seed=4)
    late = sum(a.visible_ms > a.occurred_ms for a in history.activities)
    assert 0.15 < late / len(history.activities) < 0.35
    assert all(
        a.visible_ms - a.occurred_ms >= 1000
        for a in history.activities
        if a.visible_ms > a.occurred_ms
    )


def test_audience_count_and_fraction() -> None:
    """An audience count picks that many recipients; a fraction that share."""
    people = contacts(40)
    by_count = Campaign(0, "1", "c", START_MS, (), 1.0, 7)
    by_fraction = Campaign(1, "2", "c", START_MS, (), 0.25, None)
    for target, expected in ((by_count, 7), (by_fraction, 10)):
        sends = [a for a in generate(target, people, Rates(), 1).activities if a.kind is Kind.SEND]
        assert len(sends) == expected


def activity(uid: int, occurred_ms: int) -> Activity:
    """A bare activity for index tests."""
    person = Contact("1", "a@example.com", 0)
    return Activity(occurred_ms, uid, Kind.OPEN, campaign(), person, occurred_ms)


@given(
    times=st.lists(st.integers(0, 50), max_size=60),
    since=st.none() | st.integers(0, 50),
    limit=st.integers(1, 10),
)
def test_index_pages_are_newest_first_slices(
    times: list[int], since: int | None, limit: int
) -> None:
    """Pages of a SortedIndex concatenate to the filtered list, newest first."""
    index = SortedIndex()
    items = [activity(uid, t) for uid, t in enumerate(times)]
    for chunk in (items[:5], items[5:40], items[40:]):  # small and bulk inserts
        index.add(chunk)
    expected = sorted(
        (a for a in items if since is None or a.occurred_ms >= since),
        key=lambda a: (a.occurred_ms, a.uid),
        reverse=True,
    )
    pages, start, more = [], 0, True
    while more:
        page, more = index.page(since, start, limit)
        pages.extend(page)
        start += limit
    assert pages == expected


def test_newest_first_window() -> None:
    """The window arithmetic: positions counted from the top, never below the since bound."""
    window = newest_first(2, 10, 0, 3)
    assert (window.low, window.high, window.more) == (7, 10, True)
    window = newest_first(2, 10, 6, 3)
    assert (window.low, window.high, window.more) == (2, 4, False)
    window = newest_first(2, 10, 50, 3)
    assert (window.low, window.high, window.more) == (2, 2, False)


def test_world_drains_by_visibility() -> None:
    """Advancing the world reveals exactly the activities visible by then."""
    world = World(scenario(), START_MS)
    world.advance_to(START_MS)
    early = world.visible_count
    world.advance_to(START_MS + 3_600_000)
    assert world.visible_count > early
    assert all(a.visible_ms <= START_MS + 3_600_000 for a in world.visible())


@pytest.mark.serial  # measures wall time: other workers would skew it
def test_large_world_queries_are_fast() -> None:
    """Hundreds of thousands of activities: a 500-item page costs a bisect and a slice."""
    big = scenario(
        contacts={"count": 2000},
        campaigns={"count": 40, "already_sent": 40, "sent_every_s": 600, "links": 3},
    )
    world = World(big, START_MS)
    world.advance_to(START_MS + 86_400_000)
    assert world.visible_count > 100_000
    target = world.campaigns[20]
    key = (Scope.CAMPAIGN, target.id, Kind.OPEN, "")
    since = START_MS - 30 * 60_000
    durations = []
    for start in range(0, 5000, 500):
        began = time.perf_counter()
        page, _ = world.stream(key).page(since, start, 500)
        [record(a, Scope.CAMPAIGN, True) for a in page]
        durations.append(time.perf_counter() - began)
    assert statistics.median(durations) < 0.05


def test_clock_scales_and_advances() -> None:
    """now = start + elapsed x time_scale + advanced; advance never goes back."""
    ticks = [100.0]
    clock = SimClock(START, time_scale=60, monotonic=lambda: ticks[0])
    assert clock.now() == START
    ticks[0] += 2
    clock.advance(30)
    assert clock.now() == START + timedelta(seconds=150)
    assert clock.now_ms() == START_MS + 150_000
    with pytest.raises(ValueError, match=">= 0"):
        clock.advance(-1)
    frozen = SimClock(START, time_scale=0)
    assert frozen.now() == START
    assert SimClock().now().tzinfo is not None
    with pytest.raises(ValueError, match="aware"):
        SimClock(datetime(2026, 1, 1))


def test_paging_token_round_trip() -> None:
    """A next token carries offset, limit and filters; the page after it continues them."""
    first = page_request({"api_key": "k", "limit": "7", "created_since": "x"}, 500)
    token = first.next_token()
    second = page_request({"next": token, "api_key": "k", "limit": "2"}, 500)
    assert (second.start, second.limit, dict(second.params)) == (7, 7, {"created_since": "x"})
    with pytest.raises(ParamError, match="next"):
        page_request({"next": token}, 5)  # a limit beyond this endpoint's maximum


def test_since_parsing() -> None:
    """created_since takes UTC with Z, millis optional, and returns Unix ms."""
    assert parse_since({"s": "2026-11-23T08:00:00.007Z"}, "s") == START_MS + 7
    assert parse_since({"s": "2026-11-23T08:00:00Z"}, "s") == START_MS
    assert parse_since({}, "s") is None
    with pytest.raises(ParamError, match=r"^s: "):
        parse_since({"s": "2026-11-23T08:00:00"}, "s")


def test_time_format() -> None:
    """Times have millis; the short form only drops a .000 fraction."""
    assert format_ms(START_MS + 123) == "2026-11-23T08:00:00.123Z"
    assert format_ms(START_MS, drop_zero_fraction=True) == "2026-11-23T08:00:00Z"
    assert format_ms(START_MS + 1, drop_zero_fraction=True) == "2026-11-23T08:00:00.001Z"
    assert datetime.fromisoformat(format_ms(START_MS).replace("Z", "+00:00")) == START.astimezone(
        UTC
    )
