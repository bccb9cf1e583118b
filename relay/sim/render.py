"""How the simulator writes JSON: tracking records with the API's quirks, resources, times.

The real API is inconsistent, and a relay must cope: ``campaign_id`` is sometimes a JSON number,
the "0" link's ``link_id`` sometimes the number 0, and a time whose millisecond part is 000
sometimes has no fraction at all. Which record shows which quirk is a pure function of the
activity and the scope (contact or campaign endpoints), so the same activity can look different
from the two sides but always the same from one side.
"""

from __future__ import annotations

import functools
from datetime import datetime, timedelta

from relay.ctct.catalogue import Scope
from relay.events import Kind
from relay.sim.model import Activity, BounceDetail, Campaign, Contact, UnsubscribeDetail

JsonObject = dict[str, object]

_EPOCH = datetime(1970, 1, 1)  # naive on purpose: isoformat() then has no offset to strip
# Enum properties are computed on every access; a page renders up to 500 records.
_ACTIVITY_TYPE = {kind: kind.activity_type for kind in Kind}
_DATE_FIELD = {kind: kind.date_field for kind in Kind}
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # 2**64 / golden ratio
_SCOPE_SALT = {Scope.CONTACT: 1, Scope.CAMPAIGN: 2, Scope.ACCOUNT: 3}
_NUMERIC_CAMPAIGN = 0b11  # both bits clear: a quarter of the records
_NUMERIC_ZERO_LINK = 1 << 2
_NO_FRACTION = 1 << 3


def format_ms(ms: int, *, drop_zero_fraction: bool = False) -> str:
    """``2026-11-23T08:15:39.123Z``; ``…:39Z`` when asked and the milliseconds are 000."""
    seconds, millis = divmod(ms, 1000)
    text = _second(seconds)
    if drop_zero_fraction and millis == 0:
        return text + "Z"
    return f"{text}.{millis:03d}Z"


@functools.lru_cache(maxsize=1 << 16)
def _second(seconds: int) -> str:
    # Formatting dominates rendering a page; re-polled pages repeat the same seconds.
    return (_EPOCH + timedelta(0, seconds)).isoformat()


def quirk_bits(uid: int, scope: Scope) -> int:
    """Well-mixed bits of the activity and the scope (Fibonacci hashing): which quirks it shows."""
    return (((uid << 2) + _SCOPE_SALT[scope]) * _GOLDEN & _MASK64) >> 56


def record(activity: Activity, scope: Scope, quirks: bool) -> JsonObject:
    """The tracking record as an endpoint of ``scope`` returns it."""
    bits = quirk_bits(activity.uid, scope) if quirks else None
    numeric_campaign = bits is not None and bits & _NUMERIC_CAMPAIGN == 0
    out: JsonObject = {
        "activity_type": _ACTIVITY_TYPE[activity.kind],
        "campaign_id": int(activity.campaign.id) if numeric_campaign else activity.campaign.id,
        "contact_id": activity.contact.id,
        "email_address": activity.contact.email,
    }
    if activity.kind is Kind.CLICK:
        numeric_link = bits is not None and activity.link_id == "0" and bits & _NUMERIC_ZERO_LINK
        out["link_id"] = 0 if numeric_link else activity.link_id
        if activity.link_id != "0":  # the "0" link is a click the API names no link for
            out["link_uri"] = link_uri(activity.campaign, activity.link_id)
    _add_detail(out, activity.detail)
    out[_DATE_FIELD[activity.kind]] = format_ms(
        activity.occurred_ms, drop_zero_fraction=bits is not None and bool(bits & _NO_FRACTION)
    )
    return out


def link_uri(campaign: Campaign, link_id: str) -> str:
    """The URL a campaign's link points to; click records carry it as ``link_uri`` (at both
    scopes: the Java SDK reads both into one ClickReport, which has it)."""
    return f"https://www.example.com/{campaign.id}/{link_id}"


def canonical(activity: Activity) -> JsonObject:
    """The ground-truth form: ids as strings, times with milliseconds, plus kind and visible_at."""
    out = record(activity, Scope.ACCOUNT, quirks=False)
    out["kind"] = activity.kind.value
    out["visible_at"] = format_ms(activity.visible_ms)
    return out


def _add_detail(out: JsonObject, detail: BounceDetail | UnsubscribeDetail | None) -> None:
    if isinstance(detail, BounceDetail):
        out["bounce_code"] = detail.code
        out["bounce_description"] = detail.description
        out["bounce_message"] = detail.message
    elif isinstance(detail, UnsubscribeDetail):
        out["unsubscribe_source"] = detail.source
        out["unsubscribe_reason"] = detail.reason


def campaign_resource(campaign: Campaign) -> JsonObject:
    """A campaign as the discovery list returns it."""
    sent = format_ms(campaign.send_ms)
    return {
        "id": campaign.id,
        "name": campaign.name,
        "status": "SENT",
        "modified_date": sent,
        "last_run_date": sent,
    }


def contact_resource(contact: Contact) -> JsonObject:
    """A contact as the discovery list returns it."""
    return {
        "id": contact.id,
        "status": "ACTIVE",
        "email_addresses": [{"email_address": contact.email}],
        "modified_date": format_ms(contact.created_ms),
    }
