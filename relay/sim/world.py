"""The live simulated account: which activities are visible now, indexed per stream.

Campaign histories are generated lazily (when the clock reaches the send time, or ahead of it by
the background ticker); their activities wait in a heap keyed by when they become visible and are
drained into per-stream sorted indexes as the clock passes. Draining happens before each
request, so every answer reflects the clock at that moment and costs a bisect and a slice.
"""

from __future__ import annotations

import bisect
import heapq
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import TypeVar

from relay.ctct.catalogue import Scope
from relay.events import Kind
from relay.sim.generator import CampaignHistory, generate
from relay.sim.index import SortedIndex, newest_first
from relay.sim.model import Activity, Campaign, Contact
from relay.sim.scenario import Scenario
from relay.sim.schedule import build_campaigns, build_contacts

# (scope, contact or campaign id, kind or None for the mixed list, link id or "")
StreamKey = tuple[Scope, str, Kind | None, str]
# What a campaign's summary counts as unique recipients, as the real API does (v2 docs: "opens:
# Number of unique recipients who opened…", the same for clicks and forwards): a repeat open,
# a click on a second link or a second forward by a recipient already counted moves nothing.
# Sends, bounces and unsubscribes, and every count of a contact's summary, count activities.
UNIQUE_IN_CAMPAIGN = frozenset({Kind.OPEN, Kind.CLICK, Kind.FORWARD})
_EMPTY = SortedIndex()  # answered for streams with no activity yet; never written to
_T = TypeVar("_T")


class World:
    """Contacts, campaigns and the activities visible at the world's current time."""

    def __init__(self, scenario: Scenario, start_ms: int) -> None:
        self._scenario = scenario
        self.contacts = build_contacts(scenario.contacts, start_ms)
        self.campaigns = build_campaigns(scenario.campaigns, start_ms)
        self._contact_by_id = {contact.id: contact for contact in self.contacts}
        self._campaign_by_id = {campaign.id: campaign for campaign in self.campaigns}
        self._created_ms = [contact.created_ms for contact in self.contacts]
        self._send_ms = [campaign.send_ms for campaign in self.campaigns]
        self._link_ids = frozenset(link for c in self.campaigns for link in c.links)
        self._histories: list[CampaignHistory] = []  # by campaign index, generated in send order
        self._cursors: list[int] = []  # per campaign: how many of its activities are visible
        self._pending: list[tuple[int, int]] = []  # heap of (next visible_ms, campaign index)
        self._spam: dict[str, tuple[int, ...]] = {}
        self._streams: dict[StreamKey, SortedIndex] = {}
        self._visible: list[Activity] = []
        # per (campaign, kind) of UNIQUE_IN_CAMPAIGN: the contacts with a visible activity
        self._recipients: defaultdict[tuple[str, Kind], set[str]] = defaultdict(set)
        self.now_ms = -(2**62)

    def next_due(self, until_ms: int) -> Campaign | None:
        """The next campaign to generate, if it is sent by ``until_ms``."""
        index = len(self._histories)
        if index < len(self.campaigns) and self.campaigns[index].send_ms <= until_ms:
            return self.campaigns[index]
        return None

    def generate(self, campaign: Campaign) -> CampaignHistory:
        """The history of ``campaign``; pure, so it may run in a worker thread."""
        scenario = self._scenario
        return generate(campaign, self.contacts, scenario.rates, scenario.seed)

    def attach(self, history: CampaignHistory) -> bool:
        """Schedule a generated history; False (and ignored) unless it is the next one due."""
        index = history.campaign.index
        if index != len(self._histories):
            return False  # generated meanwhile on a request's path
        self._histories.append(history)
        self._cursors.append(0)
        self._spam[history.campaign.id] = history.spam_visible_ms
        if history.activities:
            heapq.heappush(self._pending, (history.activities[0].visible_ms, index))
        return True

    def prepare(self, until_ms: int) -> bool:
        """Generate the next campaign if it is sent by ``until_ms``; whether one was generated."""
        campaign = self.next_due(until_ms)
        return campaign is not None and self.attach(self.generate(campaign))

    def advance_to(self, now_ms: int) -> None:
        """Make everything visible by ``now_ms`` visible; the world never goes back in time."""
        if now_ms <= self.now_ms:
            return
        self.now_ms = now_ms
        while self.prepare(now_ms):
            pass
        fresh = self._drain(now_ms)
        if fresh:
            self._index(fresh)

    def _drain(self, now_ms: int) -> list[Activity]:
        fresh: list[Activity] = []
        pending = self._pending
        while pending and pending[0][0] <= now_ms:
            _, index = heapq.heappop(pending)
            activities = self._histories[index].activities
            begin = self._cursors[index]
            end = bisect.bisect_right(activities, now_ms, lo=begin, key=_visible_ms)
            fresh.extend(activities[begin:end])
            self._cursors[index] = end
            if end < len(activities):
                heapq.heappush(pending, (activities[end].visible_ms, index))
        return fresh

    def _index(self, fresh: list[Activity]) -> None:
        groups: defaultdict[StreamKey, list[Activity]] = defaultdict(list)
        for activity in fresh:
            contact_id, campaign_id, kind = activity.contact.id, activity.campaign.id, activity.kind
            groups[(Scope.CONTACT, contact_id, kind, "")].append(activity)
            groups[(Scope.CONTACT, contact_id, None, "")].append(activity)
            groups[(Scope.CAMPAIGN, campaign_id, kind, "")].append(activity)
            if kind in UNIQUE_IN_CAMPAIGN:
                self._recipients[(campaign_id, kind)].add(contact_id)
            if kind is Kind.CLICK:
                groups[(Scope.CONTACT, contact_id, kind, activity.link_id)].append(activity)
                groups[(Scope.CAMPAIGN, campaign_id, kind, activity.link_id)].append(activity)
        for key, items in groups.items():
            stream = self._streams.get(key)
            if stream is None:
                stream = self._streams[key] = SortedIndex()
            stream.add(items)
        self._visible.extend(fresh)

    def stream(self, key: StreamKey) -> SortedIndex:
        """The visible activities of one stream (possibly none)."""
        return self._streams.get(key, _EMPTY)

    def contact(self, contact_id: str) -> Contact | None:
        """The contact, if it exists by now."""
        contact = self._contact_by_id.get(contact_id)
        return contact if contact is not None and contact.created_ms <= self.now_ms else None

    def campaign(self, campaign_id: str) -> Campaign | None:
        """The campaign, sent or scheduled; an unsent one has no activity yet."""
        return self._campaign_by_id.get(campaign_id)

    def knows_link(self, link_id: str, campaign: Campaign | None = None) -> bool:
        """Whether ``link_id`` is a link of ``campaign`` (of any campaign when None)."""
        return link_id in (campaign.links if campaign is not None else self._link_ids)

    def counts(self, scope: Scope, resource_id: str) -> dict[Kind, int]:
        """What one contact's or campaign's summary counts per kind, by now: visible activities,
        but unique recipients for a campaign's opens, clicks and forwards (UNIQUE_IN_CAMPAIGN)."""
        counts = {kind: len(self.stream((scope, resource_id, kind, ""))) for kind in Kind}
        if scope is Scope.CAMPAIGN:
            for kind in UNIQUE_IN_CAMPAIGN:
                counts[kind] = len(self._recipients.get((resource_id, kind), ()))
        return counts

    def spam_count(self, campaign_id: str, at_ms: int | None = None) -> int:
        """Spam reports of a campaign visible by now (by ``at_ms``, a time before now)."""
        at_ms = self.now_ms if at_ms is None else min(at_ms, self.now_ms)
        return bisect.bisect_right(self._spam.get(campaign_id, ()), at_ms)

    def campaign_counts_at(self, campaign_id: str, at_ms: int) -> dict[Kind, int]:
        """What a campaign's summary counted at ``at_ms`` (at most now), as :meth:`counts`
        counts: a scan of its history up to then, for the rare summary asked without
        updateSummary (the relay's ask for current counts)."""
        at_ms = min(at_ms, self.now_ms)
        counts = dict.fromkeys(Kind, 0)
        campaign = self._campaign_by_id.get(campaign_id)
        if campaign is None or campaign.index >= len(self._histories):
            return counts
        activities = self._histories[campaign.index].activities  # by visible_ms
        end = bisect.bisect_right(activities, at_ms, key=_visible_ms)
        recipients: defaultdict[Kind, set[str]] = defaultdict(set)
        for activity in activities[:end]:
            if activity.kind in UNIQUE_IN_CAMPAIGN:
                recipients[activity.kind].add(activity.contact.id)
            else:
                counts[activity.kind] += 1
        for kind, contacts in recipients.items():
            counts[kind] = len(contacts)
        return counts

    def counts_by_campaign(self, contact_id: str) -> list[tuple[Campaign, Counter[Kind]]]:
        """A contact's visible activities counted per campaign, most recently sent first; clicks
        count the distinct links clicked (v2 docs of summaryByCampaign: "clicks: Number of unique
        link clicks the contact made", against "opens: Number of times the contact opened")."""
        per_campaign: dict[str, Counter[Kind]] = defaultdict(Counter)
        links: defaultdict[str, set[str]] = defaultdict(set)
        for activity in self.stream((Scope.CONTACT, contact_id, None, "")).items():
            per_campaign[activity.campaign.id][activity.kind] += 1
            if activity.kind is Kind.CLICK:
                links[activity.campaign.id].add(activity.link_id)
        for campaign_id, clicked in links.items():
            per_campaign[campaign_id][Kind.CLICK] = len(clicked)
        rows = [(self._campaign_by_id[cid], counts) for cid, counts in per_campaign.items()]
        rows.sort(key=lambda row: (row[0].send_ms, row[0].index), reverse=True)
        return rows

    def sent_campaigns(
        self, since_ms: int | None, start: int, limit: int
    ) -> tuple[list[Campaign], bool]:
        """Newest-first page of campaigns sent by now and modified (sent) at or after since."""
        return _resource_page(self.campaigns, self._send_ms, self.now_ms, since_ms, start, limit)

    def existing_contacts(
        self, since_ms: int | None, start: int, limit: int
    ) -> tuple[list[Contact], bool]:
        """Newest-first page of contacts existing by now and modified at or after since."""
        return _resource_page(self.contacts, self._created_ms, self.now_ms, since_ms, start, limit)

    def visible(self) -> list[Activity]:
        """Every activity visible by now, ascending by (occurred_ms, uid)."""
        return sorted(self._visible)

    @property
    def sent_count(self) -> int:
        """How many campaigns are sent by now."""
        return bisect.bisect_right(self._send_ms, self.now_ms)

    @property
    def contact_count(self) -> int:
        """How many contacts exist by now."""
        return bisect.bisect_right(self._created_ms, self.now_ms)

    @property
    def visible_count(self) -> int:
        """How many activities are visible by now."""
        return len(self._visible)


def _visible_ms(activity: Activity) -> int:
    return activity.visible_ms


def _resource_page(
    items: Sequence[_T],
    times: Sequence[int],
    now_ms: int,
    since_ms: int | None,
    start: int,
    limit: int,
) -> tuple[list[_T], bool]:
    """Offset page over ascending ``items`` whose time is in ``since_ms..now_ms``."""
    high = bisect.bisect_right(times, now_ms)
    low = 0 if since_ms is None else bisect.bisect_left(times, since_ms, hi=high)
    window = newest_first(low, high, start, limit)
    return list(items[window.low : window.high])[::-1], window.more
