"""The deterministic activity generator: one campaign's whole tracking history.

A campaign's history depends only on (seed, campaign index, the contacts existing at its send
time, the rates), so it can be generated lazily, in any order, and always comes out the same. No
two activities share an identity (type, campaign, contact, millisecond, link): a collision moves
the later one a millisecond on.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from dataclasses import dataclass

from relay.events import Kind
from relay.sim.model import Activity, BounceDetail, Campaign, Contact, UnsubscribeDetail
from relay.sim.scenario import Rates

_BOUNCES = (
    ("B", "Non-existent address"),
    ("D", "Undeliverable"),
    ("F", "Mailbox full"),
    ("S", "Suspended"),
    ("V", "Vacation or autoreply"),
    ("Z", "Blocked"),
    ("X", "Other"),
)
_BOUNCE_MESSAGES = (
    "550 5.1.1 Recipient address rejected: User unknown",
    "552 5.2.2 Mailbox full",
    "554 5.7.1 Message rejected as spam",
)
_UNSUBSCRIBE_REASONS = ("Too many emails", "Not relevant to me", "I never signed up", "Other")
_SCANNER_DELAY_MS = (500, 5000)  # link scanners act within seconds of delivery
_MIN_LATE_MS = 1000


@dataclass(frozen=True, slots=True)
class CampaignHistory:
    """Everything a campaign will ever produce."""

    campaign: Campaign
    activities: tuple[Activity, ...]  # ordered by (visible_ms, uid): the order they appear
    spam_visible_ms: tuple[int, ...]  # spam reports (no feed; summaries count them), ordered


def generate(
    campaign: Campaign, contacts: Sequence[Contact], rates: Rates, seed: int
) -> CampaignHistory:
    """The history of ``campaign``; ``contacts`` are all contacts, in creation order."""
    rng = random.Random(f"ctct-sim/{seed}/{campaign.index}")
    builder = _Builder(campaign, rates, rng)
    recipients = _audience(campaign, contacts, rng)
    batch = max(1, rates.send_batch)
    gap_ms = round(rates.send_batch_gap_s * 1000)
    for number, first in enumerate(range(0, len(recipients), batch)):
        sent_ms = campaign.send_ms + number * gap_ms
        for contact in recipients[first : first + batch]:
            builder.add(Kind.SEND, contact, sent_ms)
            _react(builder, contact, sent_ms)
    return builder.history()


def _audience(campaign: Campaign, contacts: Sequence[Contact], rng: random.Random) -> list[Contact]:
    """The recipients: a seeded sample of the contacts that exist at send time, in id order."""
    existing = contacts[: bisect.bisect_right(contacts, campaign.send_ms, key=_created_ms)]
    if campaign.audience_count is not None:
        size = min(campaign.audience_count, len(existing))
    elif campaign.audience_fraction > 0 and existing:
        size = max(1, round(campaign.audience_fraction * len(existing)))
    else:
        size = 0
    chosen = rng.sample(list(existing), size)
    chosen.sort(key=lambda contact: int(contact.id))
    return chosen


def _created_ms(contact: Contact) -> int:
    return contact.created_ms


class _Builder:
    """Collects one campaign's activities, keeping identities unique."""

    def __init__(self, campaign: Campaign, rates: Rates, rng: random.Random) -> None:
        self.campaign = campaign
        self.rates = rates
        self.rng = rng
        self._items: list[Activity] = []
        self._spam: list[int] = []
        self._seen: set[tuple[Kind, str, int, str]] = set()
        self._next_uid = campaign.index << 32

    def delay_ms(self, mean_s: float) -> int:
        """An exponential delay with mean ``mean_s``: activity decays after its cause."""
        if mean_s <= 0:
            return 0
        return round(self.rng.expovariate(1.0 / mean_s) * 1000)

    def chance(self, probability: float) -> bool:
        """True with ``probability``."""
        return self.rng.random() < probability

    def add(
        self,
        kind: Kind,
        contact: Contact,
        at_ms: int,
        link_id: str = "",
        detail: BounceDetail | UnsubscribeDetail | None = None,
    ) -> int:
        """Record one activity at ``at_ms`` or the first free millisecond after; returns it."""
        while (kind, contact.id, at_ms, link_id) in self._seen:
            at_ms += 1
        self._seen.add((kind, contact.id, at_ms, link_id))
        visible_ms = at_ms
        if self.chance(self.rates.late):
            visible_ms += max(_MIN_LATE_MS, self.delay_ms(self.rates.late_mean_s))
        uid = self._next_uid
        self._next_uid += 1
        self._items.append(
            Activity(at_ms, uid, kind, self.campaign, contact, visible_ms, link_id, detail)
        )
        return at_ms

    def spam(self, at_ms: int) -> None:
        """Record a spam report, visible from ``at_ms``."""
        self._spam.append(at_ms)

    def history(self) -> CampaignHistory:
        """The collected activities, in the order they become visible."""
        items = sorted(self._items, key=lambda a: (a.visible_ms, a.uid))
        return CampaignHistory(self.campaign, tuple(items), tuple(sorted(self._spam)))


def _react(b: _Builder, contact: Contact, sent_ms: int) -> None:
    """What one recipient does after the send."""
    if b.chance(b.rates.bounce):
        _bounce(b, contact, sent_ms)
        return  # a bounced message cannot be opened
    if b.chance(b.rates.scanner):
        _scan(b, contact, sent_ms)
        return
    if b.chance(b.rates.unsubscribe):
        _unsubscribe(b, contact, sent_ms + b.delay_ms(b.rates.open_delay_s))
    if b.chance(b.rates.open):
        _open(b, contact, sent_ms + b.delay_ms(b.rates.open_delay_s))


def _bounce(b: _Builder, contact: Contact, sent_ms: int) -> None:
    code, description = b.rng.choice(_BOUNCES)
    message = b.rng.choice(_BOUNCE_MESSAGES) if b.chance(0.4) else ""
    at_ms = sent_ms + max(1, b.delay_ms(b.rates.bounce_delay_s))
    b.add(Kind.BOUNCE, contact, at_ms, detail=BounceDetail(code, description, message))


def _scan(b: _Builder, contact: Contact, sent_ms: int) -> None:
    """A link scanner opens and follows every link in the same millisecond."""
    at_ms = b.add(Kind.OPEN, contact, sent_ms + b.rng.randint(*_SCANNER_DELAY_MS))
    for link_id in b.campaign.links:
        b.add(Kind.CLICK, contact, at_ms, link_id)


def _unsubscribe(b: _Builder, contact: Contact, at_ms: int) -> None:
    source = "ACTION_BY_CUSTOMER" if b.chance(0.85) else "ACTION_BY_OWNER"
    reason = b.rng.choice(_UNSUBSCRIBE_REASONS) if b.chance(0.3) else ""
    b.add(Kind.UNSUBSCRIBE, contact, at_ms, detail=UnsubscribeDetail(source, reason))


def _open(b: _Builder, contact: Contact, opened_ms: int) -> None:
    """The first open, re-opens, and what an opener may go on to do."""
    opened_ms = b.add(Kind.OPEN, contact, opened_ms)
    at_ms = opened_ms
    while b.chance(b.rates.reopen):
        at_ms = b.add(Kind.OPEN, contact, at_ms + b.delay_ms(b.rates.open_delay_s))
    if b.chance(b.rates.forward):
        b.add(Kind.FORWARD, contact, opened_ms + b.delay_ms(b.rates.click_delay_s))
    if b.chance(b.rates.spam):
        b.spam(opened_ms + b.delay_ms(b.rates.click_delay_s))
    if b.campaign.links and b.chance(b.rates.click):
        _clicks(b, contact, opened_ms)


def _clicks(b: _Builder, contact: Contact, opened_ms: int) -> None:
    at_ms = b.add(
        Kind.CLICK,
        contact,
        opened_ms + b.delay_ms(b.rates.click_delay_s),
        b.rng.choice(b.campaign.links),
    )
    while b.chance(b.rates.reclick):
        link_id = b.rng.choice(b.campaign.links)
        at_ms = b.add(Kind.CLICK, contact, at_ms + b.delay_ms(b.rates.click_delay_s), link_id)
