"""The event model: tracking-record parsing, the dedup key, the deterministic event id, CloudEvents.

Constant Contact v2 tracking records are inconsistent (``campaign_id`` sometimes a JSON number,
``link_id`` sometimes the number ``0``, dates with or without milliseconds). Everything here
normalizes them so that one activity has exactly one :class:`DedupKey` and one event id, whichever
endpoint (contact or campaign scope) returned it.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import resources

import orjson

JsonObject = dict[str, object]

SPECVERSION = "1.0"
DATA_CONTENT_TYPE = "application/json"
TYPE_PREFIX = "com.constantcontact.email."
# Namespace for the UUIDv5 event ids. Changing it changes every event id ever emitted: never do.
_ID_NAMESPACE = uuid.UUID("6f0c3a52-6d1e-5b9e-9a4f-3c2b7c1d0e11")
_ID_NAMESPACE_BYTES = _ID_NAMESPACE.bytes
# SHA-1 is what RFC 4122 v5 is defined with: an id derivation, not a security function.
_ID_NAMESPACE_SHA1 = hashlib.sha1(_ID_NAMESPACE_BYTES, usedforsecurity=False)
# A v5 UUID as a 128-bit integer: the version nibble (byte 6's high half) is 5, the variant
# (byte 8's two high bits) RFC 4122's 0b10; every other bit is the SHA-1's.
_UUID_FIELDS = ~((0xF0 << 72) | (0xC0 << 56)) & ((1 << 128) - 1)
_UUID5_BITS = (0x50 << 72) | (0x80 << 56)
# Constant Contact v2 names contacts and campaigns by numeric strings ("1100394165290"; records
# sometimes carry them as JSON numbers): what an operator gives as a target must be one
RESOURCE_ID = re.compile(r"[0-9]{1,64}", re.ASCII)
RESOURCE_ID_SHAPE = "a Constant Contact id (1 to 64 digits)"


class Kind(enum.StrEnum):
    """The six activity kinds; the suffix of the CloudEvent ``type``."""

    SEND = "send"
    OPEN = "open"
    CLICK = "click"
    FORWARD = "forward"
    BOUNCE = "bounce"
    UNSUBSCRIBE = "unsubscribe"

    @property
    def activity_type(self) -> str:
        """The upstream ``activity_type`` value, e.g. ``EMAIL_CLICK``."""
        return f"EMAIL_{self.name}"

    @property
    def date_field(self) -> str:
        """The record field that carries the activity time, e.g. ``click_date``."""
        return f"{self.value}_date"

    @property
    def event_type(self) -> str:
        """The CloudEvent ``type``, e.g. ``com.constantcontact.email.click``."""
        return TYPE_PREFIX + self.value


_KIND_BY_ACTIVITY_TYPE = {kind.activity_type: kind for kind in Kind}
# The properties above as lookups, for the per-record paths (each property builds its string anew)
_ACTIVITY_TYPE = {kind: kind.activity_type for kind in Kind}
_DATE_FIELD = {kind: kind.date_field for kind in Kind}
BOUNCE_CODES = frozenset("BSDFVZX")


class RecordError(ValueError):
    """A tracking record that cannot be turned into an activity; the message names the field."""


@dataclass(frozen=True, slots=True)
class DedupKey:
    """Identity of one activity: the same activity always has the same key."""

    activity_type: str
    campaign_id: str
    contact_id: str
    occurred_ms: int
    link_id: str  # "" for every kind but clicks

    def as_text(self) -> str:
        """A stable one-line form, used for storage and for the event id."""
        return "|".join(
            (
                self.activity_type,
                self.campaign_id,
                self.contact_id,
                str(self.occurred_ms),
                self.link_id,
            )
        )


@dataclass(frozen=True, slots=True)
class Activity:
    """One normalized tracking activity of one account."""

    account: str
    kind: Kind
    campaign_id: str
    contact_id: str
    email_address: str
    occurred_at: datetime  # UTC, millisecond precision
    link_id: str | None = None
    bounce_code: str | None = None
    bounce_description: str | None = None
    bounce_message: str | None = None
    unsubscribe_source: str | None = None
    unsubscribe_reason: str | None = None
    # Last of the fields, so that positional callers written before it still line up. Not part
    # of the dedup key or the id: the same click reported with and without it is one activity.
    link_uri: str | None = None
    # Activity time as Unix milliseconds, derived from occurred_at once (read ~6 times on the
    # way to the outbox: a property recomputed it each time)
    occurred_ms: int = field(init=False, repr=False, compare=False)

    def __init__(
        self,
        account: str,
        kind: Kind,
        campaign_id: str,
        contact_id: str,
        email_address: str,
        occurred_at: datetime,
        link_id: str | None = None,
        bounce_code: str | None = None,
        bounce_description: str | None = None,
        bounce_message: str | None = None,
        unsubscribe_source: str | None = None,
        unsubscribe_reason: str | None = None,
        link_uri: str | None = None,
    ) -> None:
        # Still frozen, but each slot is set through its own descriptor: the generated __init__
        # of a frozen dataclass calls object.__setattr__ by name per field, which cost twice as
        # much (profiled: one is built per record read, on the event loop's thread).
        s = _ACTIVITY_SLOTS
        s[0](self, account)
        s[1](self, kind)
        s[2](self, campaign_id)
        s[3](self, contact_id)
        s[4](self, email_address)
        s[5](self, occurred_at)
        s[6](self, link_id)
        s[7](self, bounce_code)
        s[8](self, bounce_description)
        s[9](self, bounce_message)
        s[10](self, unsubscribe_source)
        s[11](self, unsubscribe_reason)
        s[12](self, link_uri)
        s[13](self, to_millis(occurred_at))

    @property
    def dedup_key(self) -> DedupKey:
        """(type, campaign, contact, time in UTC ms), plus the link for clicks."""
        return DedupKey(
            _ACTIVITY_TYPE[self.kind],
            self.campaign_id,
            self.contact_id,
            self.occurred_ms,
            (self.link_id or "0") if self.kind is Kind.CLICK else "",
        )

    @property
    def event_id(self) -> str:
        """Deterministic CloudEvent id: UUIDv5 of the account and the dedup key."""
        return format_id(self.event_id_bytes)

    @property
    def event_id_bytes(self) -> bytes:
        """The 16 bytes of :attr:`event_id` (the stored dedup key), computed once per call."""
        # The same text as f"{account}|{dedup_key.as_text()}", without building the key.
        link = (self.link_id or "0") if self.kind is Kind.CLICK else ""
        return uuid5_bytes(
            f"{self.account}|{_ACTIVITY_TYPE[self.kind]}|{self.campaign_id}|{self.contact_id}"
            f"|{self.occurred_ms}|{link}"
        )

    def data(self) -> JsonObject:
        """The CloudEvent ``data``: snake_case fields, ids as strings."""
        out: JsonObject = {
            "account": self.account,
            "activity_type": _ACTIVITY_TYPE[self.kind],
            "campaign_id": self.campaign_id,
            "contact_id": self.contact_id,
            "email_address": self.email_address,
            "occurred_at": format_millis(self.occurred_ms),
        }
        if self.kind is Kind.CLICK:
            out["link_id"] = self.link_id or "0"
            out["link_uri"] = self.link_uri or ""
        elif self.kind is Kind.BOUNCE:
            out["bounce_code"] = self.bounce_code
            out["bounce_description"] = self.bounce_description or ""
            out["bounce_message"] = self.bounce_message or ""
        elif self.kind is Kind.UNSUBSCRIBE:
            out["unsubscribe_source"] = self.unsubscribe_source or ""
            out["unsubscribe_reason"] = self.unsubscribe_reason or ""
        return out

    def attributes(self) -> dict[str, str]:
        """The CloudEvent context attributes (everything but ``data``)."""
        return attributes(
            self.event_id,
            self.account,
            self.kind,
            self.campaign_id,
            self.contact_id,
            self.occurred_ms,
        )

    def to_cloudevent(self) -> JsonObject:
        """The structured-mode CloudEvents 1.0 representation."""
        return {**self.attributes(), "data": self.data()}


SlotSetter = Callable[[object, object], None]


def slot_setters(cls: type) -> tuple[SlotSetter, ...]:
    """The ``__set__`` of each of a slotted class's slots, in ``__slots__`` order: what a frozen
    dataclass's own ``__init__`` may call to set its fields (``Activity``)."""
    slots: tuple[str, ...] = cls.__dict__["__slots__"]
    return tuple(cls.__dict__[name].__set__ for name in slots)


_ACTIVITY_SLOTS = slot_setters(Activity)


def attributes(
    event_id: str, account: str, kind: Kind, campaign_id: str, contact_id: str, occurred_ms: int
) -> dict[str, str]:
    """CloudEvent context attributes of an activity; the outbox rebuilds them from its columns."""
    return {
        "specversion": SPECVERSION,
        "id": event_id,
        "source": source(account, campaign_id),
        "type": kind.event_type,
        "subject": contact_id,
        "time": format_millis(occurred_ms),
        "datacontenttype": DATA_CONTENT_TYPE,
    }


def uuid5_bytes(name: str) -> bytes:
    """RFC 4122 UUIDv5 bytes of ``name`` in the event-id namespace, as ``uuid.uuid5`` computes
    them but without building a UUID object (the commit path makes one per activity)."""
    sha1 = _ID_NAMESPACE_SHA1.copy()  # the namespace's 16 bytes hashed once
    sha1.update(name.encode())
    digest = int.from_bytes(sha1.digest()[:16])
    return ((digest & _UUID_FIELDS) | _UUID5_BITS).to_bytes(16)


def format_id(raw: bytes) -> str:
    """The canonical 8-4-4-4-12 hex form of 16 id bytes (``str(uuid.UUID(bytes=raw))``)."""
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def source(account: str, campaign_id: str) -> str:
    """The CloudEvent ``source`` of an account's campaign."""
    return f"ctct://{account}/campaigns/{campaign_id}"


def structured(attrs: dict[str, str], data: bytes) -> bytes:
    """Structured-mode JSON from attributes and already-serialized ``data``, without re-parsing."""
    head = orjson.dumps(attrs)
    return head[:-1] + b',"data":' + data + b"}"


EVENT_TYPES = tuple(kind.event_type for kind in Kind)
WILDCARD = TYPE_PREFIX + "*"


def type_matches(patterns: tuple[str, ...], event_type: str) -> bool:
    """Whether an event type passes a filter of exact types and ``com.constantcontact.email.*``."""
    return event_type in patterns or WILDCARD in patterns


def check_type_pattern(pattern: str) -> None:
    """Raise ValueError unless ``pattern`` is a known event type or the wildcard."""
    if pattern != WILDCARD and pattern not in EVENT_TYPES:
        known = ", ".join((*EVENT_TYPES, WILDCARD))
        raise ValueError(f"unknown event type {pattern!r} (known: {known})")


def schema(kind: Kind) -> JsonObject:
    """The published JSON Schema of the ``data`` of events of ``kind`` (``relay/schemas/``)."""
    text = resources.files("relay").joinpath("schemas", f"{kind.value}.json").read_bytes()
    loaded: JsonObject = json.loads(text)
    return loaded


def to_millis(moment: datetime) -> int:
    """Unix milliseconds of an aware datetime."""
    delta = moment - _EPOCH
    return delta.days * 86_400_000 + delta.seconds * 1000 + delta.microseconds // 1000


def from_millis(ms: int) -> datetime:
    """Aware UTC datetime of Unix milliseconds."""
    return _EPOCH + timedelta(milliseconds=ms)


def format_time(moment: datetime) -> str:
    """RFC 3339 UTC with milliseconds, the form Constant Contact's ``created_since`` takes."""
    return format_millis(to_millis(moment))


_DATES: dict[int, str] = {}  # day number -> "YYYY-MM-DDT": activity clusters on few days


def format_millis(ms: int) -> str:
    """:func:`format_time` of Unix milliseconds.

    Every event's time is formatted twice (its data, its ``ce_time`` header): integer arithmetic
    and a per-day cache take half the time of a datetime and strftime (profiled).
    """
    day, rest = divmod(ms, 86_400_000)
    date = _DATES.get(day)
    if date is None:
        if len(_DATES) > 10_000:
            _DATES.clear()
        when = _EPOCH + timedelta(days=day)
        # not strftime: glibc's %Y writes year 1 as "1", and RFC 3339 needs four digits
        date = _DATES[day] = f"{when.year:04d}-{when.month:02d}-{when.day:02d}T"
    seconds, milli = divmod(rest, 1000)
    minutes, second = divmod(seconds, 60)
    hour, minute = divmod(minutes, 60)
    # Table lookups: four ":02d" format specs were still 5 % of the pipeline's GIL time.
    return f"{date}{_PAD2[hour]}:{_PAD2[minute]}:{_PAD2[second]}.{_PAD3[milli]}Z"


_PAD2 = tuple(f"{i:02d}" for i in range(100))
_PAD3 = tuple(f"{i:03d}" for i in range(1000))


def parse_time(value: object, field: str = "date") -> datetime:
    """Parse an upstream timestamp (``Z`` or offset, with or without fraction) to UTC ms."""
    if not isinstance(value, str) or not value:
        raise RecordError(f"{field}: expected an ISO 8601 timestamp, got {value!r}")
    with contextlib.suppress(ValueError, OverflowError):
        # The common case, "...T10:05:00.123Z", is already canonical: fromisoformat reads the Z
        # itself since Python 3.11, and the normalization below would only copy it (profiled:
        # a third of parse_activity).
        fast = datetime.fromisoformat(value)
        if fast.tzinfo is UTC and fast.microsecond % 1000 == 0:
            return fast
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(text)
    except (ValueError, OverflowError):
        raise RecordError(f"{field}: not an ISO 8601 timestamp: {value!r}") from None
    if moment.tzinfo is None:  # the API documents UTC; a bare timestamp is UTC
        moment = moment.replace(tzinfo=UTC)
    try:
        moment = moment.astimezone(UTC)
    except OverflowError:
        # e.g. 0001-01-01T00:00:00+01:00: the instant is before year 1 (or after 9999) in UTC,
        # which no datetime, and no RFC 3339 time of an event, can hold
        raise RecordError(f"{field}: outside the years 1 to 9999 in UTC: {value!r}") from None
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def parse_activity(
    raw: Mapping[str, object], *, account: str, kind: Kind | None = None
) -> Activity:
    """Normalize one tracking record.

    ``kind`` is what the endpoint returns; records from the mixed all-activities list pass None and
    are typed by their own ``activity_type``. Raises :class:`RecordError` naming the bad field.
    """
    record_kind = _record_kind(raw, kind)
    date_field = _DATE_FIELD[record_kind]
    link_id = link_uri = bounce_code = bounce_description = bounce_message = None
    unsubscribe_source = unsubscribe_reason = None
    if record_kind is Kind.CLICK:
        link_id = "0" if raw.get("link_id") in (None, "") else _id(raw, "link_id")
        link_uri = _link_uri(raw.get("link_uri"))
    elif record_kind is Kind.BOUNCE:
        bounce_code = _text(raw, "bounce_code").upper()
        if bounce_code not in BOUNCE_CODES:
            known = "".join(sorted(BOUNCE_CODES))
            raise RecordError(f"bounce_code: unknown code {bounce_code!r} (known: {known})")
        bounce_description = _text(raw, "bounce_description")
        bounce_message = _text(raw, "bounce_message")
    elif record_kind is Kind.UNSUBSCRIBE:
        unsubscribe_source = _text(raw, "unsubscribe_source")
        unsubscribe_reason = _text(raw, "unsubscribe_reason")
    # positional, in field order: keywords cost ~0.3 us per record (one per record read)
    return Activity(
        account,
        record_kind,
        _id(raw, "campaign_id"),
        _id(raw, "contact_id"),
        _text(raw, "email_address"),
        parse_time(raw.get(date_field), date_field),
        link_id,
        bounce_code,
        bounce_description,
        bounce_message,
        unsubscribe_source,
        unsubscribe_reason,
        link_uri,
    )


def kind_of(activity_type: str) -> Kind:
    """The kind of an upstream ``activity_type`` such as ``EMAIL_OPEN``."""
    try:
        return _KIND_BY_ACTIVITY_TYPE[activity_type.upper()]
    except KeyError:
        known = ", ".join(sorted(_KIND_BY_ACTIVITY_TYPE))
        raise RecordError(f"activity_type: unknown {activity_type!r} (known: {known})") from None


def _record_kind(raw: Mapping[str, object], expected: Kind | None) -> Kind:
    declared = raw.get("activity_type")
    if declared is None or declared == "":
        if expected is None:
            raise RecordError("activity_type: missing in a record of the mixed activity list")
        return expected
    if not isinstance(declared, str):
        raise RecordError(f"activity_type: expected a string, got {declared!r}")
    found = kind_of(declared)
    if expected is not None and found is not expected:
        raise RecordError(f"activity_type: {declared!r} in a {expected.value} feed")
    return found


def _id(raw: Mapping[str, object], field: str) -> str:
    value = raw.get(field)
    # bool is an int subclass; True is never an id
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str) and value.strip():
        value = value.strip()
        if value.isascii() and value.isdigit():  # what the API's ids are: nothing to check
            return value
        if not value.isascii() and ("\ufffd" in value or _SURROGATE.search(value)):
            # bytes that were not text upstream: whatever id it was, this is not it
            raise RecordError(f"{field}: holds characters that could not be decoded: {value!r}")
        if _CONTROL.search(value):
            # no id of the API's, and PostgreSQL refuses NUL in text: the commit of its page
            # failed at every pass, so the stream never got past it
            raise RecordError(f"{field}: holds a control character: {value!r}")
        return value
    raise RecordError(f"{field}: expected an id (string or integer), got {value!r}")


def _text(raw: Mapping[str, object], field: str) -> str:
    value = raw.get(field)
    if value is None:
        return ""
    if isinstance(value, str):
        return value if value.isascii() else text_without_surrogates(value)
    raise RecordError(f"{field}: expected a string, got {value!r}")


# RFC 9110 section 4.1: senders and recipients should support URIs of at least 8000 octets. A
# longer value is no link a mail could carry; kept, it would bloat every copy of the event.
LINK_URI_MAX = 8000


def _link_uri(value: object) -> str | None:
    """The clicked link's URL, or None: it is extra information about a click the rest of the
    record already identifies, so a value that is not a string, or is no plausible URL for its
    length, is left out instead of refusing the record (cut short, it would be a different URL).
    Kept as text like the other free text: lone surrogates replaced, nothing else changed."""
    if not isinstance(value, str) or not value or len(value) > LINK_URI_MAX:
        return None
    return value if value.isascii() else text_without_surrogates(value)


_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def text_without_surrogates(value: str) -> str:
    """``value`` with each lone UTF-16 surrogate replaced by U+FFFD (and a pair written as two
    code points joined into one): no UTF-8 encoder, orjson's included, takes a surrogate, so
    one such string in an event failed its whole commit. The same object when there is none."""
    if value.isascii() or not _SURROGATE.search(value):
        return value
    return value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
