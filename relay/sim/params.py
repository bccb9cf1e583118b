"""Query parameters of /v2 requests: strict parsing, and the opaque paging token.

A ``next_link`` is the request path plus ``?next=TOKEN``; the token is unpadded URL-safe base64 of
a urlencoded query (``startAt=501&limit=500&created_since=…``) holding everything the next page
needs, because the client sends it alone (with the api_key). ``startAt`` counts from 1, as in
the v2 docs' tokens (``startAt=26&limit=25`` after a first page of 25). A bad value raises
:class:`ParamError` naming the parameter; the app answers it with a 400.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import parse_qsl, urlencode

# The API takes UTC with a Z, with or without milliseconds, and nothing else.
_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{3})?Z")
_TOKEN = re.compile(r"[A-Za-z0-9_-]+")
_DIGITS = re.compile(r"[0-9]{1,9}")
# The v2 docs' "Paginated Output" table: the discovery lists default to 50 per page, campaign and
# contact tracking to 500 (their maximum).
DEFAULT_LIMIT = 50
TRACKING_DEFAULT_LIMIT = 500
START_AT = "startAt"
NEXT = "next"


class ParamError(ValueError):
    """A query parameter the API rejects; ``param`` is its name."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class PageRequest:
    """One page to serve: offset, size, and the remaining (filter) parameters."""

    start: int  # 0-based offset from the newest item (the token's startAt is 1-based)
    limit: int
    params: Mapping[str, str]  # everything but api_key, next, startAt and limit

    def next_token(self) -> str:
        """The token of the page after this one."""
        query = [(START_AT, str(self.start + self.limit + 1)), ("limit", str(self.limit))]
        query.extend(sorted(self.params.items()))
        raw = urlencode(query).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def page_request(
    query: Mapping[str, str], max_limit: int, default_limit: int = DEFAULT_LIMIT
) -> PageRequest:
    """The page a request asks for: from its ``next`` token, or from its own parameters
    (``default_limit`` records when it names no ``limit``)."""
    if NEXT in query:
        return _from_token(query[NEXT], max_limit)
    params = {k: v for k, v in query.items() if k not in ("api_key", START_AT)}
    limit_text = params.pop("limit", None)
    limit = default_limit if limit_text is None else parse_limit(limit_text, max_limit)
    return PageRequest(0, limit, params)


def parse_limit(text: str, max_limit: int) -> int:
    """``limit``: an integer 1..max_limit."""
    if not _DIGITS.fullmatch(text) or not 1 <= int(text) <= max_limit:
        raise ParamError("limit", f"limit: must be an integer from 1 to {max_limit}, got {text!r}")
    return int(text)


def parse_since(params: Mapping[str, str], name: str) -> int | None:
    """``created_since``/``modified_since`` as Unix ms (inclusive), or None when absent."""
    text = params.get(name)
    if text is None:
        return None
    if not _TIME.fullmatch(text):
        raise ParamError(
            name, f"{name}: expected YYYY-MM-DDTHH:MM:SS.sssZ (UTC, millis optional), got {text!r}"
        )
    try:
        moment = datetime.strptime(text[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    except ValueError:
        raise ParamError(name, f"{name}: not a valid date and time: {text!r}") from None
    millis = int(text[20:23]) if len(text) > 20 else 0
    return int(moment.timestamp()) * 1000 + millis


def parse_flag(params: Mapping[str, str], name: str) -> bool | None:
    """An optional ``true``/``false`` parameter."""
    text = params.get(name)
    if text is None:
        return None
    if text.lower() not in ("true", "false"):
        raise ParamError(name, f"{name}: expected true or false, got {text!r}")
    return text.lower() == "true"


def _from_token(token: str, max_limit: int) -> PageRequest:
    invalid = ParamError(NEXT, f"{NEXT}: not a paging token issued by this API: {token[:40]!r}")
    if not _TOKEN.fullmatch(token):
        raise invalid
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        pairs = parse_qsl(raw, keep_blank_values=True, strict_parsing=True)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise invalid from None
    params = dict(pairs)
    start = params.pop(START_AT, "")
    limit = params.pop("limit", "")
    if len(params) + 2 != len(pairs) or not _DIGITS.fullmatch(start) or int(start) < 1:
        raise invalid
    if not _DIGITS.fullmatch(limit) or not 1 <= int(limit) <= max_limit:
        raise invalid
    return PageRequest(int(start) - 1, int(limit), params)
