"""Campaign discovery's seeding: which discovered campaigns keep their history out of the outbox
(start_from: now) and which are all new. In-process stand-in of the client's campaign list."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import cast

import pytest

from relay.ctct.catalogue import Endpoint
from relay.ctct.client import CtctClient, Page
from relay.events import format_millis, to_millis
from relay.store import Store, StreamKey
from relay.targets import CampaignDiscovery, ensure_configured

T0 = 1_795_000_000_000
HOUR = 3600_000


class Sent:
    """The account's sent campaigns, as campaigns.sent lists them."""

    def __init__(self) -> None:
        self.campaigns: dict[str, int] = {}  # id -> last run (Unix ms)
        self.server_ms: int | None = None  # the Date header of the answer

    async def pages(
        self, endpoint: Endpoint, since: datetime | None = None, **_: object
    ) -> AsyncIterator[Page]:
        rows = tuple(
            {"id": cid, "last_run_date": format_millis(ms), "modified_date": format_millis(ms)}
            for cid, ms in self.campaigns.items()
            if since is None or ms >= to_millis(since)  # modified_since is inclusive
        )
        yield Page(1, rows, None, self.server_ms)


async def _nothing() -> None:
    return None


def discovery(store: Store, sent: Sent, now: list[int]) -> CampaignDiscovery:
    return CampaignDiscovery(cast(CtctClient, sent), store, "acme", 30, _nothing, lambda: now[0])


async def seeds(store: Store) -> dict[str, bool]:
    return {
        s.key.resource_id: s.seed for s in await store.streams("acme") if s.key.scope == "campaign"
    }


@pytest.mark.parametrize(("contacts", "ids"), [([], []), (["42"], []), ([], ["c9"])])
async def test_campaigns_sent_before_watching_began_are_seeded_whatever_is_configured(
    store: Store, contacts: list[str], ids: list[str]
) -> None:
    """Configured contacts or campaign ids made the store look used at the first discovery, so
    every old campaign found then emitted its whole history (and spent the budget on it)."""
    now = [T0]
    await ensure_configured(store, "acme", ids, contacts, T0)
    sent = Sent()
    sent.campaigns = {"c1": T0 - 48 * HOUR, "c2": T0 - HOUR}
    await discovery(store, sent, now).run()
    assert {k: v for k, v in (await seeds(store)).items() if k in ("c1", "c2")} == {
        "c1": True,
        "c2": True,
    }


async def test_campaigns_sent_while_watching_are_all_new(store: Store) -> None:
    """Found later (or at a first discovery that found nothing), a campaign sent after the relay
    started watching emits everything; one sent before it is still history."""
    now = [T0]
    await ensure_configured(store, "acme", [], ["42"], T0)
    sent = Sent()
    found = discovery(store, sent, now)
    await found.run()  # nothing sent yet
    now[0] = T0 + 2 * HOUR
    sent.campaigns = {"new": T0 + HOUR, "old": T0 - HOUR}
    await found.run()
    assert await seeds(store) == {"new": False, "old": True}


@pytest.mark.parametrize("server_ms", [None, T0 + HOUR])
async def test_a_campaign_dated_in_the_far_future_does_not_hide_later_ones(
    store: Store, server_ms: int | None
) -> None:
    """One campaign modified in the year 9999 moved modified_since there: every campaign sent
    after it was missed by the incremental scans until the next full scan, a day later. The
    next since is capped at the API's clock (its Date header, else the relay's) + the skew."""
    now = [T0]
    sent = Sent()
    sent.server_ms = server_ms
    sent.campaigns = {"odd": 253_402_300_000_000, "c1": T0 - HOUR}  # 9999-12-31
    found = discovery(store, sent, now)
    await found.run()  # the first run is a full scan
    now[0] = T0 + 2 * HOUR
    sent.server_ms = None if server_ms is None else T0 + 2 * HOUR
    sent.campaigns["later"] = T0 + 90 * 60_000
    await found.run()  # incremental
    assert "later" in await seeds(store)


@pytest.mark.parametrize(
    ("relay_ms", "server_ms"),
    [
        pytest.param(T0 + 3 * 365 * 24 * HOUR, T0, id="api-clock-years-behind"),
        pytest.param(T0 - 3 * 365 * 24 * HOUR, T0, id="api-clock-years-ahead"),
        pytest.param(T0, None, id="no-date-header"),
    ],
)
async def test_campaign_age_is_measured_on_the_apis_clock(
    store: Store, relay_ms: int, server_ms: int | None
) -> None:
    """max_age_days (30) compared the campaigns' dates (the API's clock) with the relay's
    clock: against a simulator whose clock was more than 30 days behind (a fixed scenario start,
    a CI run weeks later) every campaign was retired and nothing polled, and one ahead followed
    campaigns of any age. The age is taken from the answer's Date header, else the relay's
    clock."""
    sent = Sent()
    sent.server_ms = server_ms
    sent.campaigns = {"c1": T0 - HOUR, "c2": T0 - 20 * 24 * HOUR, "old": T0 - 40 * 24 * HOUR}
    await discovery(store, sent, [relay_ms]).run()
    assert set(await seeds(store)) == {"c1", "c2"}


@pytest.mark.parametrize(
    "skew_ms",
    [pytest.param(-24 * HOUR, id="api-clock-a-day-behind"), pytest.param(24 * HOUR, id="ahead")],
)
async def test_seeding_compares_send_times_with_when_watching_began_on_the_apis_clock(
    store: Store, skew_ms: int
) -> None:
    """Send times are the API's clock; when watching began was the relay's (its first
    stream's creation): against an API a day behind, a campaign sent an hour after the relay
    started looked sent before it, and its activity was left out as history; against one a day
    ahead, a campaign sent an hour before looked new and emitted its whole history. The
    creation is moved by the answer's Date header offset (or taken from a seeded stream's
    stored history line)."""
    now = [T0]
    await ensure_configured(store, "acme", [], ["42"], T0)  # watching since T0 (relay clock)
    sent = Sent()
    found = discovery(store, sent, now)
    now[0] = T0 + 3 * HOUR
    sent.server_ms = now[0] + skew_ms
    sent.campaigns = {"after": T0 + skew_ms + HOUR, "before": T0 + skew_ms - HOUR}
    await found.run()
    assert await seeds(store) == {"after": False, "before": True}


async def test_campaigns_named_in_the_config_are_never_retired_for_their_age(
    store: Store,
) -> None:
    """``campaigns.ids`` are followed regardless of discovery, until removed (README), but the
    full scan retired every listed campaign sent more than ``max_age_days`` ago, configured or
    not: a configured campaign sent 40 days ago stopped being polled seconds after start-up (its
    late opens and clicks never emitted) and was retired again after every restart. A discovered
    campaign of that age is still retired."""
    now = [T0]
    await ensure_configured(store, "acme", ["c9"], [], T0)
    sent = Sent()
    sent.campaigns = {"c9": T0 - 40 * 24 * HOUR, "c8": T0 - 40 * 24 * HOUR, "c1": T0 - HOUR}
    await store.ensure_streams([StreamKey("acme", "campaign", "c8")], T0)  # found back then
    found = CampaignDiscovery(
        cast(CtctClient, sent), store, "acme", 30, _nothing, lambda: now[0], keep=("c9",)
    )
    await found.run()
    retired = {s.key.resource_id: s.retired for s in await store.streams("acme")}
    assert retired == {"c9": False, "c8": True, "c1": False}
