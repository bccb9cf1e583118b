"""The event model: record parsing, dedup keys, event ids, CloudEvents and their schemas."""

from __future__ import annotations

import dataclasses
import re
import uuid
from datetime import UTC, datetime, timedelta, timezone

import jsonschema
import orjson
import pytest
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from hypothesis import given
from hypothesis import strategies as st

from relay.events import (
    Activity,
    Kind,
    RecordError,
    format_millis,
    format_time,
    from_millis,
    parse_activity,
    parse_time,
    schema,
    to_millis,
)

SAMPLES: dict[Kind, dict[str, object]] = {
    Kind.SEND: {"send_date": "2026-11-20T10:00:00.123Z"},
    Kind.OPEN: {"open_date": "2026-11-20T10:05:00.000Z"},
    Kind.FORWARD: {"forward_date": "2026-11-20T10:06:00Z"},
    Kind.CLICK: {"click_date": "2026-11-20T10:07:01.500Z", "link_id": "7"},
    Kind.BOUNCE: {
        "bounce_date": "2026-11-20T10:00:02.000Z",
        "bounce_code": "B",
        "bounce_description": "Non-existent address",
        "bounce_message": "",
    },
    Kind.UNSUBSCRIBE: {
        "unsubscribe_date": "2026-11-20T11:00:00.000Z",
        "unsubscribe_source": "ACTION_BY_CUSTOMER",
        "unsubscribe_reason": "",
    },
}


def record(kind: Kind, **overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "activity_type": kind.activity_type,
        "campaign_id": "1100394165290",
        "contact_id": "1001",
        "email_address": "contact1001@example.com",
        **SAMPLES[kind],
    }
    base.update(overrides)
    return base


@pytest.mark.parametrize("kind", list(Kind), ids=lambda k: k.value)
def test_every_kind_parses_and_validates_against_its_schema(kind: Kind) -> None:
    """Each kind's sample record becomes a CloudEvent whose data matches the published schema."""
    activity = parse_activity(record(kind), account="acme", kind=kind)
    event = activity.to_cloudevent()
    assert event["type"] == f"com.constantcontact.email.{kind.value}"
    assert event["subject"] == "1001"
    jsonschema.validate(event["data"], schema(kind), format_checker=jsonschema.FormatChecker())


@pytest.mark.parametrize("kind", list(Kind), ids=lambda k: k.value)
def test_cloudevent_parses_with_the_cloudevents_sdk(kind: Kind) -> None:
    """Structured-mode JSON is accepted by the official CloudEvents SDK, attributes intact."""
    activity = parse_activity(record(kind), account="acme", kind=kind)
    body = orjson.dumps(activity.to_cloudevent())
    parsed = JSONFormat().read(CloudEvent, body)
    assert parsed.get_id() == activity.event_id
    assert parsed.get_type() == kind.event_type
    assert parsed.get_subject() == "1001"
    assert parsed.get_source() == "ctct://acme/campaigns/1100394165290"
    assert parsed.get_time() == activity.occurred_at
    assert parsed.get_data() == activity.data()


def test_quirky_renderings_of_one_activity_share_key_and_id() -> None:
    """Numeric ids, link 0 as a number and dates without milliseconds all normalize alike."""
    plain = parse_activity(
        record(Kind.CLICK, link_id="0", click_date="2026-11-20T10:07:01.000Z"), account="a"
    )
    quirky = parse_activity(
        record(Kind.CLICK, campaign_id=1100394165290, link_id=0, click_date="2026-11-20T10:07:01Z"),
        account="a",
        kind=Kind.CLICK,
    )
    offset = parse_activity(
        record(Kind.CLICK, link_id="0", click_date="2026-11-20T11:07:01+01:00"), account="a"
    )
    assert plain.dedup_key == quirky.dedup_key == offset.dedup_key
    assert plain.event_id == quirky.event_id == offset.event_id


def test_link_scanner_clicks_in_one_instant_are_distinct() -> None:
    """Clicks on different links in the same millisecond are different activities."""
    one = parse_activity(record(Kind.CLICK, link_id="1"), account="a")
    two = parse_activity(record(Kind.CLICK, link_id="2"), account="a")
    assert one.dedup_key != two.dedup_key
    assert one.event_id != two.event_id


def test_event_id_depends_on_the_account() -> None:
    """Two accounts never share an event id for lookalike activity."""
    r = record(Kind.OPEN)
    assert parse_activity(r, account="a").event_id != parse_activity(r, account="b").event_id


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        pytest.param({"campaign_id": None}, "campaign_id", id="missing-campaign"),
        pytest.param({"contact_id": True}, "contact_id", id="bool-contact"),
        pytest.param({"contact_id": "  "}, "contact_id", id="blank-contact"),
        pytest.param({"open_date": "yesterday"}, "open_date", id="bad-date"),
        pytest.param({"open_date": None}, "open_date", id="missing-date"),
        pytest.param({"activity_type": "EMAIL_SPAM"}, "activity_type", id="unknown-type"),
        pytest.param({"activity_type": "EMAIL_CLICK"}, "activity_type", id="wrong-feed"),
        pytest.param({"email_address": 5}, "email_address", id="numeric-email"),
        pytest.param({"contact_id": "4\x002"}, "contact_id", id="nul-in-contact"),
        pytest.param({"campaign_id": "11\x1b[0m"}, "campaign_id", id="escape-in-campaign"),
    ],
)
def test_bad_records_name_the_field(overrides: dict[str, object], field: str) -> None:
    """A record that cannot be normalized raises RecordError naming the offending field."""
    with pytest.raises(RecordError, match=field):
        parse_activity(record(Kind.OPEN, **overrides), account="a", kind=Kind.OPEN)


def test_text_with_lone_surrogates_survives_into_the_event() -> None:
    """A lone UTF-16 surrogate in free text (a string cut mid-emoji, parsed by a JSON decoder
    that keeps it) made orjson refuse the event's data at commit, failing the whole commit; it
    becomes U+FFFD (a pair split into two code points is joined). An id holding such characters
    is no id the upstream meant: the record is refused, naming the field."""
    raw = record(
        Kind.UNSUBSCRIBE,
        email_address="ren\ufffd@example.fr",
        unsubscribe_reason="bye \ud83d",
        unsubscribe_source="\ud83d\ude00",
    )
    activity = parse_activity(raw, account="a")
    data = orjson.loads(orjson.dumps(activity.data()))
    assert data["unsubscribe_reason"] == "bye \ufffd"
    assert data["unsubscribe_source"] == "\U0001f600"
    assert data["email_address"] == "ren\ufffd@example.fr"
    for bad in ("12\ufffd3", "12\udce93"):
        with pytest.raises(RecordError, match="contact_id: holds characters that could not be"):
            parse_activity(record(Kind.OPEN, contact_id=bad), account="a")


def test_unknown_bounce_code_is_rejected() -> None:
    """Bounce codes outside the documented set are errors, not silently passed on."""
    with pytest.raises(RecordError, match="bounce_code"):
        parse_activity(record(Kind.BOUNCE, bounce_code="Q"), account="a")


# The v2 API's bounce codes and what each means (v2 SDKs' BounceCode; the v3 bounces report
# documents the same seven): the published schema must say the same.
DOCUMENTED_BOUNCE_CODES = {
    "B": "non-existent address",
    "D": "undeliverable",
    "F": "mailbox full",
    "S": "suspended",
    "V": "vacation/auto-reply",
    "X": "other",
    "Z": "blocked",
}


def test_the_bounce_schema_gives_each_code_its_documented_meaning() -> None:
    """The schema's enum is the documented set and its description pairs each code with the
    meaning Constant Contact gives it (it said S undeliverable, D mailbox full, F vacation, V
    blocked, Z suspended: a consumer acting on a blocked bounce as a suspended address)."""
    bounce = schema(Kind.BOUNCE)["properties"]
    assert isinstance(bounce, dict)
    code = bounce["bounce_code"]
    assert sorted(code["enum"]) == sorted(DOCUMENTED_BOUNCE_CODES)
    described = dict(re.findall(r"\b([A-Z]) ([a-z][a-z /-]*[a-z])", code["description"]))
    assert described == DOCUMENTED_BOUNCE_CODES
    for letter in DOCUMENTED_BOUNCE_CODES:
        parse_activity(record(Kind.BOUNCE, bounce_code=letter.lower()), account="a")


def test_mixed_feed_record_without_type_is_an_error() -> None:
    """The all-activities list must say what each record is."""
    with pytest.raises(RecordError, match="activity_type"):
        parse_activity(record(Kind.OPEN, activity_type=None), account="a", kind=None)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("0001-01-01T00:00:00+01:00", id="before-year-1-in-utc"),
        pytest.param("9999-12-31T23:59:59-01:00", id="after-year-9999-in-utc"),
        pytest.param("0001-01-01T00:00+00:01", id="one-minute-short"),
        pytest.param("9999-12-31 23:59:59.999-00:01", id="space-separated"),
        pytest.param("99991231T235959-0100", id="basic-format"),
        pytest.param("9999-12-31T23:59:59-23:59:59.999999", id="seconds-offset"),
    ],
)
def test_a_time_outside_the_datetime_range_in_utc_is_a_record_error(value: str) -> None:
    """A parsable time whose UTC instant no datetime holds is a RecordError naming the field
    and the value (it was an OverflowError, which no caller treats as a bad record)."""
    with pytest.raises(RecordError, match=re.escape("open_date: outside the years 1 to 9999")):
        parse_time(value, "open_date")
    with pytest.raises(RecordError, match=re.escape(repr(value))):
        parse_activity(record(Kind.OPEN, open_date=value), account="a", kind=Kind.OPEN)


@pytest.mark.parametrize(
    ("value", "formatted"),
    [
        pytest.param("0001-01-01T00:00:00Z", "0001-01-01T00:00:00.000Z", id="first-instant"),
        pytest.param("0001-01-01T00:59:00+00:59", "0001-01-01T00:00:00.000Z", id="offset-first"),
        pytest.param("0999-06-30T12:00:00.5Z", "0999-06-30T12:00:00.500Z", id="three-digit-year"),
        pytest.param(
            "9999-12-31T23:59:59.999999Z", "9999-12-31T23:59:59.999Z", id="last-millisecond"
        ),
        pytest.param("9999-12-31T22:59:59-01:00", "9999-12-31T23:59:59.000Z", id="offset-last"),
    ],
)
def test_the_first_and_last_representable_times_round_trip(value: str, formatted: str) -> None:
    """Times at the edges of the range parse, convert to Unix ms and back, and format as
    RFC 3339 with a four-digit year (the event's ``time`` and ``occurred_at``)."""
    moment = parse_time(value, "open_date")
    ms = to_millis(moment)
    assert from_millis(ms) == moment
    assert format_millis(ms) == formatted
    activity = parse_activity(record(Kind.OPEN, open_date=value), account="a", kind=Kind.OPEN)
    assert activity.data()["occurred_at"] == formatted


# --- properties ------------------------------------------------------------------------------

moments = st.datetimes(
    min_value=datetime(2005, 1, 1), max_value=datetime(2040, 1, 1), timezones=st.just(UTC)
).map(lambda d: d.replace(microsecond=d.microsecond // 1000 * 1000))
ids = st.integers(min_value=1, max_value=10**15)
offsets = st.integers(min_value=-12 * 60, max_value=14 * 60).map(lambda m: timedelta(minutes=m))


def render_time(moment: datetime, offset: timedelta, style: int) -> str:
    """One of the forms real responses use for the same instant."""
    local = moment.astimezone(timezone(offset))
    if style == 0:
        return format_time(moment)
    if style == 1 and moment.microsecond == 0:
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")
    return local.isoformat(timespec="milliseconds")


@given(
    kind=st.sampled_from(list(Kind)),
    campaign=ids,
    contact=ids,
    link=st.integers(min_value=0, max_value=10**6),
    moment=moments,
    offset=offsets,
    style=st.integers(0, 2),
    numeric=st.booleans(),
)
def test_renderings_normalize_to_the_canonical_key(
    kind: Kind,
    campaign: int,
    contact: int,
    link: int,
    moment: datetime,
    offset: timedelta,
    style: int,
    numeric: bool,
) -> None:
    """Whatever form ids and dates take, the key is the canonical one."""
    raw = record(
        kind,
        campaign_id=campaign if numeric else str(campaign),
        contact_id=str(contact),
        link_id=link if numeric else str(link),
        **{kind.date_field: render_time(moment, offset, style)},
    )
    activity = parse_activity(raw, account="a", kind=kind)
    key = activity.dedup_key
    assert key.campaign_id == str(campaign)
    assert key.contact_id == str(contact)
    assert key.occurred_ms == to_millis(moment)
    assert key.link_id == (str(link) if kind is Kind.CLICK else "")
    assert from_millis(key.occurred_ms) == moment
    assert parse_time(format_time(moment)) == moment


activity_tuples = st.tuples(
    st.sampled_from(list(Kind)), ids, ids, st.integers(0, 10**12), st.integers(0, 50)
)


@given(st.lists(activity_tuples, min_size=2, max_size=40, unique=True))
def test_distinct_activities_never_collide(tuples: list[tuple[Kind, int, int, int, int]]) -> None:
    """Distinct (type, campaign, contact, ms, link) identities get distinct keys and ids."""
    activities = [
        Activity(
            account="a",
            kind=kind,
            campaign_id=str(campaign),
            contact_id=str(contact),
            email_address="x@example.com",
            occurred_at=from_millis(ms),
            link_id=str(link) if kind is Kind.CLICK else None,
        )
        for kind, campaign, contact, ms, link in tuples
        if kind is Kind.CLICK or link == 0  # link is only identity for clicks
    ]
    keys = {a.dedup_key for a in activities}
    assert len(keys) == len(activities)
    assert len({a.event_id for a in activities}) == len(activities)


def test_structured_from_columns_equals_the_full_event() -> None:
    """The outbox's attributes + data JSON concatenate into exactly the structured CloudEvent."""
    from relay.events import structured

    activity = parse_activity(record(Kind.CLICK), account="acme")
    body = structured(activity.attributes(), orjson.dumps(activity.data()))
    assert orjson.loads(body) == activity.to_cloudevent()
    assert JSONFormat().read(CloudEvent, body).get_id() == activity.event_id


# A contact-scope click as the v2 API returns it (the Constant Contact Ruby SDK's fixture of
# /v2/contacts/{id}/tracking/clicks; the Java SDK's ClickReport maps the same link_uri).
_URI = "http://www.constantcontact.com"


def test_a_clicks_link_uri_is_in_the_event_data_and_validates() -> None:
    """The clicked URL reaches the CloudEvent data (and the structured body the webhooks POST),
    and the data matches the published click schema."""
    from relay.events import structured

    activity = parse_activity(record(Kind.CLICK, link_uri=_URI), account="acme")
    data = activity.to_cloudevent()["data"]
    assert data == {**activity.data(), "link_uri": _URI}
    jsonschema.validate(data, schema(Kind.CLICK), format_checker=_FORMATS)
    body = structured(activity.attributes(), orjson.dumps(activity.data()))
    assert orjson.loads(body)["data"]["link_uri"] == _URI


def test_a_click_without_link_uri_still_validates() -> None:
    """Campaign-scope records may lack it: "" like other text a record lacks; and the data of a
    click committed before the field existed (no link_uri at all) is still valid."""
    for lacking in ({}, {"link_uri": None}, {"link_uri": ""}):
        data = parse_activity(record(Kind.CLICK, **lacking), account="acme").data()
        assert data["link_uri"] == ""
        jsonschema.validate(data, schema(Kind.CLICK), format_checker=_FORMATS)
        older = {k: v for k, v in data.items() if k != "link_uri"}
        jsonschema.validate(older, schema(Kind.CLICK), format_checker=_FORMATS)


def test_link_uri_changes_neither_the_dedup_key_nor_the_event_id() -> None:
    """Ids are a contract: a click has the id it had before link_uri was read (pinned), and
    the same click with or without a URL is one activity."""
    with_uri = parse_activity(record(Kind.CLICK, link_uri=_URI), account="acme")
    without = parse_activity(record(Kind.CLICK), account="acme")
    assert with_uri.event_id == without.event_id == "08b14b60-1e33-56d7-8798-f41db689b884"
    assert with_uri.event_id_bytes == without.event_id_bytes
    assert with_uri.dedup_key == without.dedup_key
    assert with_uri.dedup_key.as_text() == "EMAIL_CLICK|1100394165290|1001|1795169221500|7"


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        pytest.param(5, "", id="number"),
        pytest.param(True, "", id="bool"),
        pytest.param({"href": _URI}, "", id="object"),
        pytest.param([_URI], "", id="list"),
        pytest.param("http://x.example/" + "a" * 7984, "", id="over-long"),
        pytest.param("http://x.example/" + "a" * 7983, "http://x.example/" + "a" * 7983, id="8000"),
        pytest.param("http://x.example/\t\x00?", "http://x.example/\t\x00?", id="control"),
        pytest.param("http://x.example/\ud83d", "http://x.example/\ufffd", id="surrogate"),
    ],
)
def test_an_unusable_link_uri_is_dropped_and_the_click_kept(value: object, kept: str) -> None:
    """A link_uri that is no string or too long for a URL is left out, not a bad record; text
    is kept as other free text is (control characters as they are, lone surrogates replaced)."""
    activity = parse_activity(record(Kind.CLICK, link_uri=value), account="acme")
    data = orjson.loads(orjson.dumps(activity.data()))
    assert data["link_uri"] == kept
    assert data["link_id"] == "7"
    assert activity.event_id == "08b14b60-1e33-56d7-8798-f41db689b884"
    jsonschema.validate(data, schema(Kind.CLICK), format_checker=_FORMATS)


def test_only_clicks_carry_a_link_uri() -> None:
    """A link_uri on another kind's record is not read: their schemas allow no such field."""
    data = parse_activity(record(Kind.OPEN, link_uri=_URI), account="acme").data()
    assert "link_uri" not in data
    jsonschema.validate(data, schema(Kind.OPEN), format_checker=_FORMATS)


_FORMATS = jsonschema.FormatChecker()


# The id namespace as released: every id ever emitted derives from it.
_NAMESPACE = uuid.UUID("6f0c3a52-6d1e-5b9e-9a4f-3c2b7c1d0e11")


@given(
    st.text(min_size=0, max_size=12),
    st.sampled_from(list(Kind)),
    ids,
    ids,
    st.integers(-(10**12), 4 * 10**12),
    st.integers(0, 50),
)
def test_event_id_is_byte_identical_to_uuid5(
    account: str, kind: Kind, campaign: int, contact: int, ms: int, link: int
) -> None:
    """The hashlib derivation gives exactly uuid.uuid5's id, as text and as stored bytes."""
    activity = Activity(
        account=account,
        kind=kind,
        campaign_id=str(campaign),
        contact_id=str(contact),
        email_address="x@example.com",
        occurred_at=from_millis(ms),
        link_id=str(link) if kind is Kind.CLICK else None,
    )
    expected = uuid.uuid5(_NAMESPACE, f"{account}|{activity.dedup_key.as_text()}")
    assert activity.event_id_bytes == expected.bytes
    assert activity.event_id == str(expected)


def test_event_id_of_a_known_activity_never_changes() -> None:
    """A pinned id (computed by the uuid.uuid5 release): released ids must never drift."""
    activity = parse_activity(record(Kind.CLICK), account="acme")
    assert activity.event_id == "08b14b60-1e33-56d7-8798-f41db689b884"


@given(st.integers(-(10**13), 10**14))
def test_format_millis_matches_strftime(ms: int) -> None:
    """The integer formatter writes exactly what the datetime formatting wrote."""
    moment = from_millis(ms)
    expected = moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    assert format_millis(ms) == expected
    assert format_time(moment) == expected


@given(
    moment=st.datetimes(
        min_value=datetime(1990, 1, 1), max_value=datetime(2090, 1, 1), timezones=st.just(UTC)
    ),
    offset=offsets,
    style=st.sampled_from(["Z", "z", "+00:00", "offset", "naive", "micro-Z", "padded"]),
)
def test_parse_time_normalizes_every_rendering_to_utc_milliseconds(
    moment: datetime, offset: timedelta, style: str
) -> None:
    """Fast path or not, the result is the instant in UTC, truncated to whole milliseconds."""
    base = moment.replace(tzinfo=None).isoformat(timespec="microseconds")
    text = {
        "Z": base + "Z",
        "z": base + "z",
        "+00:00": base + "+00:00",
        "offset": moment.astimezone(timezone(offset)).isoformat(timespec="microseconds"),
        "naive": base,
        "micro-Z": base + "Z",
        "padded": f"  {base}Z ",
    }[style]
    parsed = parse_time(text)
    assert parsed.tzinfo is UTC
    assert parsed == moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def test_activity_built_by_its_own_init_is_still_a_frozen_value() -> None:
    """Activity's hand-written __init__ puts each argument in its field, derives occurred_ms
    from occurred_at (again in dataclasses.replace), and keeps the frozen dataclass's contract:
    immutable, equal and hashed by value, a repr without the derived field."""
    fields = {
        "account": "acme",
        "kind": Kind.BOUNCE,
        "campaign_id": "11",
        "contact_id": "22",
        "email_address": "x@example.com",
        "occurred_at": from_millis(1_763_000_000_123),
        "link_id": "33",
        "bounce_code": "B",
        "bounce_description": "desc",
        "bounce_message": "msg",
        "unsubscribe_source": "src",
        "unsubscribe_reason": "why",
        "link_uri": "https://example.com/a",
    }
    activity = Activity(**fields)  # type: ignore[arg-type]
    assert {name: getattr(activity, name) for name in fields} == fields
    assert activity.occurred_ms == 1_763_000_000_123
    assert activity == Activity(*fields.values())  # type: ignore[arg-type]
    assert hash(activity) == hash(Activity(**fields))  # type: ignore[arg-type]
    assert activity != dataclasses.replace(activity, link_id="34")
    assert activity != dataclasses.replace(activity, link_uri="https://example.com/b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        activity.contact_id = "23"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        activity.occurred_ms = 0  # type: ignore[misc]
    later = dataclasses.replace(activity, occurred_at=from_millis(1_763_000_001_000))
    assert later.occurred_ms == 1_763_000_001_000
    assert later.contact_id == "22"
    assert "occurred_ms" not in repr(activity)
    short = Activity("acme", Kind.OPEN, "11", "22", "x@example.com", from_millis(5))
    assert (short.link_id, short.bounce_code, short.unsubscribe_reason) == (None, None, None)
    assert short.occurred_ms == 5
