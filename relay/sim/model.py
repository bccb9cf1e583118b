"""The simulated account's things: contacts, campaigns and tracking activities, as immutable values.

Times are Unix milliseconds (``*_ms``) throughout the simulator: the API's resolution, and cheap to
compare and bisect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from relay.events import Kind


@dataclass(frozen=True, slots=True)
class Contact:
    """One contact; it exists (is listed, has a tracking history) from ``created_ms`` on."""

    id: str
    email: str
    created_ms: int


@dataclass(frozen=True, slots=True)
class Campaign:
    """One campaign; it is sent, and then listed as SENT, at ``send_ms``."""

    index: int  # position in send order; seeds the campaign's generator
    id: str
    name: str
    send_ms: int
    links: tuple[str, ...]
    audience_fraction: float
    audience_count: int | None


@dataclass(frozen=True, slots=True)
class BounceDetail:
    """The fields only bounce records carry."""

    code: str
    description: str
    message: str


@dataclass(frozen=True, slots=True)
class UnsubscribeDetail:
    """The fields only unsubscribe records carry."""

    source: str
    reason: str


class Activity(NamedTuple):
    """One tracking activity.

    A NamedTuple rather than a frozen dataclass: equally immutable, four times cheaper to create
    (a busy scenario creates hundreds of thousands), and ordered natively: the first two fields
    make tuple order (occurred_ms, uid), the feed order, so indexes sort and bisect in C.
    ``uid`` is unique, so comparisons never reach the later, unorderable fields.
    """

    occurred_ms: int
    uid: int  # unique and stable for a seed; orders same-millisecond activities, seeds quirks
    kind: Kind
    campaign: Campaign
    contact: Contact
    visible_ms: int  # when the API starts returning it; later than occurred_ms for late arrivals
    link_id: str = ""  # clicks only
    detail: BounceDetail | UnsubscribeDetail | None = None

    @property
    def identity(self) -> tuple[str, str, str, int, str]:
        """(type, campaign, contact, millisecond, link): what makes an activity distinct."""
        return (self.kind.value, self.campaign.id, self.contact.id, self.occurred_ms, self.link_id)
