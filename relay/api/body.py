"""Request input of the admin API: JSON bodies, path ids and query values, checked field by field.

Nothing parsed from a request travels further untyped: a body becomes ``dict[str, object]`` and
each field is taken out with the accessor for its type, which raises a 400 naming the field. The
limits here are the ones the OpenAPI document declares (:mod:`relay.api.openapi` reads them), so
the document and the checks cannot drift apart.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from datetime import UTC, datetime, timedelta, timezone, tzinfo

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from relay.api.responses import ApiError, JsonObject, bad_request, not_found
from relay.events import RESOURCE_ID, RESOURCE_ID_SHAPE, to_millis

MAX_BODY_BYTES = 64 * 1024
JSON_MEDIA_TYPE = "application/json"  # the only Content-Type of a request body (parameters aside)
# the types a web page may POST to another site without a CORS preflight
_BROWSER_FORM_TYPES = frozenset(
    {"text/plain", "application/x-www-form-urlencoded", "multipart/form-data"}
)
MAX_URL_CHARS = 2048
MAX_DESCRIPTION_CHARS = 1000
MAX_SECRET_CHARS = 200
MAX_RATE_PER_S = 100_000.0
# one request a day: a slower limit spaces its requests past any wait that means something (a
# rate of 5e-324 spaced them by infinity, so the endpoint's senders waited for ever)
MIN_RATE_PER_S = 1 / 86400
MAX_EVENT_TYPES = 16
MAX_DELIVERY_ID = 2**63 - 1  # SQLite and PostgreSQL BIGINT: a larger id can name nothing
DELIVERY_STATUSES = ("pending", "delivered", "dead")
DEFAULT_DELIVERY_LIMIT = 50
MAX_DELIVERY_LIMIT = 500
# every string of a body (no NUL: PostgreSQL text cannot hold it), as the OpenAPI document says
NO_NUL_PATTERN = "^[^\\x00]*$"
# a time whose UTC date leaves datetime's years cannot be echoed back (the OpenAPI document says so)
TIME_RANGE = "the years 1 to 9999 in UTC"

# RFC 3339 date-time as JSON Schema's ``format: date-time`` means it (fromisoformat alone would
# also take a bare date or a time without offset, which the document says are invalid)
# (seconds up to 60: a leap second, read as :59; 61 and up are no time at all)
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):([0-5]\d|60)(\.\d+)?([Zz]|[+-]\d{2}:\d{2})",
    re.ASCII,
)
# 19 digits hold any BIGINT, and a longer run never reaches int() (its 4300-digit limit raises)
_DIGITS = re.compile(r"[0-9]{1,19}", re.ASCII)


async def read_object(request: web.Request, *, optional: bool = False) -> JsonObject:
    """The request body as a JSON object; an absent (zero-byte) body is ``{}`` when ``optional``.

    A body of whitespace alone is not absent: it is sent, and it is not a JSON text (RFC 8259
    needs a value), so it is a 400 like any other unparsable body.

    A body must be sent as ``Content-Type: application/json`` (415 otherwise): the types a web
    page may send to another site without asking it first (``text/plain``, forms) never reach
    the API's changes. An empty body sent as one of those types (an empty form) is refused too;
    an empty body of any other type (aiohttp sends ``application/octet-stream``) is absent.

    The size cap is the application's ``client_max_size``: reading past it raises aiohttp's 413,
    which the error middleware renders as JSON. aiohttp decodes a ``Content-Encoding`` (gzip,
    deflate) as it reads: a body that does not decode as its header says is a 400 naming the
    problem (it was a 500 and a logged traceback), as is one cut short by the client closing
    the connection (an answer no one reads, but no traceback in the log).
    """
    try:
        raw = await request.read()
    except web.RequestPayloadError as exc:
        raise bad_request(f"body: cannot be read as sent: {payload_problem(exc)}") from None
    except ConnectionError:  # the client left mid-body: no one to answer, nothing of ours failed
        raise bad_request("body: the connection closed before all of it arrived") from None
    media_type = request.content_type.lower()
    if optional and not raw and media_type not in _BROWSER_FORM_TYPES:
        return {}
    if media_type != JSON_MEDIA_TYPE:
        given = request.headers.get("Content-Type")
        raise ApiError(
            415,
            f"Content-Type: expected {JSON_MEDIA_TYPE},"
            f" got {'none' if given is None else repr(given[:100])}",
        )
    try:
        parsed: object = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise bad_request(f"body: not valid JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise bad_request(f"body: expected a JSON object, got {_json_type(parsed)}")
    return {str(key): value for key, value in parsed.items()}


def payload_problem(exc: BaseException) -> str:
    """What aiohttp found wrong with a request body (``Can not decode content-encoding: gzip``),
    on one line: its parser's message, without the status it prefixes."""
    cause = exc.__cause__
    text = cause.message if isinstance(cause, HttpProcessingError) else str(exc)
    text = _STATUS_PREFIX.sub("", " ".join(str(text).split()))
    return text if len(text) <= 200 else text[:200] + "…"


_STATUS_PREFIX = re.compile(r"^[0-9]{3}, message: ")


def check_fields(
    body: JsonObject, allowed: Collection[str], required: Collection[str] = ()
) -> None:
    """Refuse unknown fields (a typo must not be silently ignored) and missing required ones."""
    for name in body:
        if name not in allowed:
            known = ", ".join(sorted(allowed))
            raise bad_request(f"{clip(name)}: unknown field (known: {known})")
    for name in required:
        if name not in body:
            raise bad_request(f"{name}: required")


def string(body: JsonObject, name: str, *, max_chars: int) -> str:
    """A string field of at most ``max_chars`` characters, without NUL (U+0000: PostgreSQL text
    cannot hold it)."""
    value = body[name]
    if not isinstance(value, str):
        raise bad_request(f"{name}: expected a string, got {_json_type(value)}")
    if len(value) > max_chars:
        raise bad_request(f"{name}: longer than {max_chars} characters")
    if "\x00" in value:
        raise bad_request(f"{name}: must not contain NUL (U+0000)")
    return value


def boolean(body: JsonObject, name: str) -> bool:
    """A true/false field."""
    value = body[name]
    if not isinstance(value, bool):
        raise bad_request(f"{name}: expected true or false, got {_json_type(value)}")
    return value


def string_list(body: JsonObject, name: str, *, max_items: int, max_chars: int) -> list[str]:
    """A non-empty array of strings."""
    value = body[name]
    if not isinstance(value, list):
        raise bad_request(f"{name}: expected an array of strings, got {_json_type(value)}")
    if not value:
        raise bad_request(f"{name}: at least one is required")
    if len(value) > max_items:
        raise bad_request(f"{name}: at most {max_items} items")
    out: list[str] = []
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise bad_request(f"{name}[{index}]: expected a string, got {_json_type(item)}")
        if len(item) > max_chars:
            raise bad_request(f"{name}[{index}]: longer than {max_chars} characters")
        if "\x00" in item:
            raise bad_request(f"{name}[{index}]: must not contain NUL (U+0000)")
        out.append(item)
    return out


RATE_RANGE = f"must be at least {MIN_RATE_PER_S:.3g} (one a day) and at most {MAX_RATE_PER_S:g}"


def rate_or_null(body: JsonObject, name: str) -> float | None:
    """A number in [MIN_RATE_PER_S, MAX_RATE_PER_S], or null for "no limit"."""
    value = body[name]
    if value is None:
        return None
    # bool is an int subclass: true is not a rate
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad_request(f"{name}: expected a number or null, got {_json_type(value)}")
    rate = float(value)
    if not (math.isfinite(rate) and MIN_RATE_PER_S <= rate <= MAX_RATE_PER_S):
        raise bad_request(f"{name}: {RATE_RANGE}")
    return rate


def timestamp_ms(body: JsonObject, name: str) -> int:
    """An RFC 3339 date-time with an offset, within :data:`TIME_RANGE`, as Unix milliseconds."""
    value = body[name]
    if not isinstance(value, str):
        raise bad_request(f"{name}: expected an RFC 3339 time, got {_json_type(value)}")
    try:
        return rfc3339_ms(value)
    except ValueError as exc:
        raise bad_request(f"{name}: {exc}") from None


def rfc3339_ms(value: str) -> int:
    """:func:`timestamp_ms` of a string, for the API and the command line (which checks
    ``--since`` with it before sending it); a ValueError says what is wrong."""
    match = _RFC3339.fullmatch(value)
    try:
        if match is None:
            raise ValueError(value)
        year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
        fraction = (match.group(7) or ".")[1:]
        micros = int(fraction[:6].ljust(6, "0"))
        moment = datetime(
            year,
            month,
            day,
            hour,
            minute,
            min(second, 59),  # RFC 3339 allows a leap second; datetime does not
            micros,
            tzinfo=_offset(match.group(8)),
        )
    except ValueError:
        raise ValueError(
            f"expected an RFC 3339 time such as 2025-01-31T12:00:00Z, got {value!r}"
        ) from None
    try:
        moment.astimezone(UTC)  # answers echo the time back in UTC: it must be a datetime there
    except OverflowError:
        raise ValueError(f"outside {TIME_RANGE}: {value!r}") from None
    return to_millis(moment)


def _offset(text: str) -> tzinfo:
    if text in {"Z", "z"}:
        return UTC
    sign = -1 if text[0] == "-" else 1
    hours, minutes = int(text[1:3]), int(text[4:6])
    if minutes > 59:
        raise ValueError(text)
    return timezone(sign * timedelta(hours=hours, minutes=minutes))


def path_id(request: web.Request, name: str, what: str) -> str:
    """A string id from the path. One with NUL names nothing (no store can hold it; PostgreSQL
    refuses it in a query): 404, without asking the store."""
    text = request.match_info[name]
    if "\x00" in text:
        raise not_found(f"no {what} with id {text!r}")
    return text


def path_integer(request: web.Request, name: str, maximum: int) -> int:
    """An integer id from the path (``stream_id``, ``delivery_id``: 1 to a BIGINT's maximum).
    Anything else is a 400 naming the parameter, as the OpenAPI document's schema says: it is
    not an id at all (a 404 would quote it as if it were one that does not exist)."""
    text = request.match_info[name]
    if not _DIGITS.fullmatch(text) or not 1 <= int(text) <= maximum:
        raise bad_request(f"{name}: expected an integer from 1 to {maximum}, got {clip(text)!r}")
    return int(text)


def path_resource_id(request: web.Request, name: str) -> str:
    """A contact or campaign id from the path: anything else is a 400 naming the parameter."""
    text = request.match_info[name]
    if not RESOURCE_ID.fullmatch(text):
        raise bad_request(f"{name}: expected {RESOURCE_ID_SHAPE}, got {clip(text)!r}")
    return text


def clip(text: str, limit: int = 40) -> str:
    """A value for a message: what was sent, cut short (a path may be kilobytes long)."""
    return text if len(text) <= limit else text[:limit] + "…"


def check_query(request: web.Request, allowed: Collection[str]) -> None:
    """Refuse unknown query parameters (``?stauts=dead`` must not list everything)."""
    for name in request.query:
        if name not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise bad_request(f"{clip(name)}: unknown query parameter (known: {known})")


def query_status(request: web.Request) -> str | None:
    """The ``status`` filter of a deliveries listing."""
    status = _query_value(request, "status")
    if status is not None and status not in DELIVERY_STATUSES:
        raise bad_request(f"status: expected one of {', '.join(DELIVERY_STATUSES)}, got {status!r}")
    return status


def query_limit(request: web.Request) -> int:
    """The ``limit`` of a deliveries listing, 1..MAX_DELIVERY_LIMIT."""
    text = _query_value(request, "limit")
    if text is None:
        return DEFAULT_DELIVERY_LIMIT
    if not _DIGITS.fullmatch(text) or not 1 <= int(text) <= MAX_DELIVERY_LIMIT:
        raise bad_request(
            f"limit: expected an integer from 1 to {MAX_DELIVERY_LIMIT}, got {text!r}"
        )
    return int(text)


def query_before(request: web.Request) -> int | None:
    """The ``before`` cursor of a deliveries listing: a delivery id, 1..MAX_DELIVERY_ID."""
    text = _query_value(request, "before")
    if text is None:
        return None
    if not _DIGITS.fullmatch(text) or not 1 <= int(text) <= MAX_DELIVERY_ID:
        raise bad_request(
            f"before: expected a delivery id (an integer from 1 to {MAX_DELIVERY_ID}), got {text!r}"
        )
    return int(text)


def _query_value(request: web.Request, name: str) -> str | None:
    values = request.query.getall(name, [])
    if len(values) > 1:
        raise bad_request(f"{name}: given more than once")
    return values[0] if values else None


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
