"""Who exists and when: the scenario's contacts and campaigns laid out on the simulated timeline.

Pure functions of the scenario and the start instant, so the same scenario always yields the same
ids, send times and links.
"""

from __future__ import annotations

from relay.sim.model import Campaign, Contact
from relay.sim.scenario import Audience, Campaigns, CampaignSpec, Contacts

# Generated campaign ids look like the API's 13-digit ones.
_CAMPAIGN_ID_BASE = 1_100_394_165_290
_CAMPAIGN_ID_STEP = 1_013
_LINK_ID_BASE = 1_000
MAX_LINKS = 31  # generated link ids are spaced 32 apart per campaign
_NAMES = (
    "Weekly digest",
    "Product update",
    "Spring sale",
    "Customer stories",
    "Event invitation",
    "Tips and tricks",
)
_CONTACT_SPACING_MS = 3_600_000  # initial contacts were created an hour apart before the start


def generated_campaign_id(position: int) -> str:
    """The id of the schedule's campaign number ``position`` (0-based)."""
    return str(_CAMPAIGN_ID_BASE + _CAMPAIGN_ID_STEP * position)


def build_contacts(spec: Contacts, start_ms: int) -> tuple[Contact, ...]:
    """Every contact of the run, in creation order (which is also id order)."""
    created = [start_ms - (spec.count - k) * _CONTACT_SPACING_MS for k in range(spec.count)]
    created += [start_ms + round((j + 1) * spec.added_every_s * 1000) for j in range(spec.added)]
    return tuple(
        Contact(str(spec.first_id + k), f"contact{spec.first_id + k}@example.com", at)
        for k, at in enumerate(created)
    )


def build_campaigns(spec: Campaigns, start_ms: int) -> tuple[Campaign, ...]:
    """Every campaign of the run, in send order; ``index`` is the position in that order."""
    rows: list[tuple[int, str, str, Audience, tuple[str, ...] | None]] = []
    every_ms = spec.sent_every_s * 1000
    for i in range(spec.count):
        # Half an interval off the start on both sides: the first new send comes soon.
        send_ms = _whole_second(start_ms + round((i - spec.already_sent + 0.5) * every_ms))
        name = f"{_NAMES[i % len(_NAMES)]} #{i + 1}"
        rows.append((send_ms, generated_campaign_id(i), name, spec.audience, None))
    rows.extend(_explicit_row(item, spec, start_ms) for item in spec.explicit)
    rows.sort(key=lambda row: (row[0], row[1]))
    return tuple(
        Campaign(
            index=index,
            id=campaign_id,
            name=name,
            send_ms=send_ms,
            links=links if links is not None else _links(spec, index),
            audience_fraction=audience.fraction,
            audience_count=audience.count,
        )
        for index, (send_ms, campaign_id, name, audience, links) in enumerate(rows)
    )


def earliest_ms(contacts: Contacts, campaigns: Campaigns, start_ms: int) -> list[tuple[str, int]]:
    """The earliest instant each scenario key places something at, by key path: the first
    contact, the first generated send, each explicit send (as the builders above compute them)."""
    rows = []
    if contacts.count:
        rows.append(("contacts.count", start_ms - contacts.count * _CONTACT_SPACING_MS))
    if campaigns.count:
        offset_ms = round((0.5 - campaigns.already_sent) * campaigns.sent_every_s * 1000)
        rows.append(("campaigns.sent_every_s", _whole_second(start_ms + offset_ms)))
    for i, item in enumerate(campaigns.explicit):
        send_ms = _whole_second(start_ms + round(item.send_at_s * 1000))
        rows.append((f"campaigns.explicit[{i}].send_at_s", send_ms))
    return rows


def _explicit_row(
    item: CampaignSpec, spec: Campaigns, start_ms: int
) -> tuple[int, str, str, Audience, tuple[str, ...] | None]:
    send_ms = _whole_second(start_ms + round(item.send_at_s * 1000))
    name = item.name or f"Campaign {item.id}"
    return (send_ms, item.id, name, item.audience or spec.audience, item.links)


def _whole_second(ms: int) -> int:
    # Sends start on whole seconds: batched sends then have .000 times, which the API
    # sometimes renders without a fraction.
    return ms // 1000 * 1000


def _links(spec: Campaigns, index: int) -> tuple[str, ...]:
    zero = ("0",) if spec.zero_link else ()
    base = _LINK_ID_BASE + (MAX_LINKS + 1) * index
    return zero + tuple(str(base + j) for j in range(spec.links))
