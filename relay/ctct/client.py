"""The async HTTP client for the Constant Contact v2 API: requests, paging, retries, error mapping.

One code path serves every catalogue endpoint. Each request goes through the account's
:class:`RateLimiter` (retries included, so no retry storm can exceed the budget); errors are
mapped to :mod:`relay.ctct.errors` at this boundary, with the api_key and token redacted.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Final
from urllib.parse import parse_qsl, urlencode, urlsplit

import aiohttp
import orjson
import structlog

from relay.ctct import errors
from relay.ctct.catalogue import Endpoint, Shape
from relay.ctct.ratelimit import Admission, RateLimiter, next_utc_midnight
from relay.events import JsonObject, format_time, text_without_surrogates, to_millis

log = structlog.get_logger(__name__)

OVER_QPS: Final = "mashery.not.authorized.over.qps"
OVER_RATELIMIT: Final = "mashery.not.authorized.over.ratelimit"
_ERROR_BODY_CAP = 64 * 1024
# Pages in a row that bring no record not seen earlier in the paging run (none at all, or only
# repeats) and still carry a next_link before a pass gives up: a server bug that keeps changing
# the link over nothing, or over the same records, would otherwise spend the whole daily budget.
MAX_EMPTY_PAGES: Final = 3
# Records remembered per paging run to tell a repeat; past this the memory starts over (a cursor
# stuck on the same pages is still caught within MAX_EMPTY_PAGES pages of that).
_SEEN_RECORDS_CAP: Final = 100_000
_REDACTED = "***"


@dataclass(slots=True)
class RequestCount:
    """Requests sent within one unit of work (a pass), whatever client sent them; a count
    opened inside another (a part of the pass) charges both."""

    requests: int = 0
    outer: RequestCount | None = None


# One per unit of work: a client is shared by all passes of its account, and passes run
# concurrently, so a difference of ``requests_sent`` would charge each pass the others' requests.
_REQUEST_COUNT: ContextVar[RequestCount | None] = ContextVar("ctct_request_count", default=None)


@contextmanager
def counting_requests() -> Iterator[RequestCount]:
    """Count the requests sent by this task (and tasks it starts) inside the block."""
    count = RequestCount(outer=_REQUEST_COUNT.get())
    token = _REQUEST_COUNT.set(count)
    try:
        yield count
    finally:
        _REQUEST_COUNT.reset(token)


# A unit of work's own condition for sending at all, asked before each request it sends (see
# ``guarding_requests``): per task, like the count, since the client is shared.
_REQUEST_GUARD: ContextVar[Callable[[], None] | None] = ContextVar(
    "ctct_request_guard", default=None
)


@contextmanager
def guarding_requests(check: Callable[[], None] | None) -> Iterator[None]:
    """Call ``check`` before each request (each attempt) this task (and tasks it starts) sends
    inside the block, and again once the rate limiter admitted it (that may have waited): it
    raises to stop the unit of work before the request leaves, the admission given back. A
    pass whose stream lease ran out (its replica was paused past it) stops so, instead of
    spending the key's budget, shared by every replica, on reads another replica makes too.
    None: no check."""
    token = _REQUEST_GUARD.set(check)
    try:
        yield
    finally:
        _REQUEST_GUARD.reset(token)


def _guard() -> None:
    """Raise what the unit of work's ``guarding_requests`` check raises, if it has one."""
    check = _REQUEST_GUARD.get()
    if check is not None:
        check()


def count_request(requests: int = 1) -> None:
    """Charge one request to the current unit of work, if one is counting (-1: take back one
    that never left)."""
    count = _REQUEST_COUNT.get()
    while count is not None:
        count.requests += requests
        count = count.outer


@dataclass(frozen=True, slots=True)
class Credentials:
    """Where an account's API lives and how to authenticate; secrets never appear in repr."""

    base_url: str
    api_key: str = field(repr=False)
    access_token: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounded retries with exponential backoff and full jitter."""

    max_attempts: int = 5
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0
    # A Retry-After longer than this is not slept through; the error goes to the caller.
    max_retry_after_s: float = 120.0

    def delay_s(self, attempt: int, rng: random.Random) -> float:
        """Sleep before retry number ``attempt`` (1-based): full jitter over a doubling cap."""
        cap = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
        return rng.uniform(cap / 2, cap)


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a paged endpoint: its records, in the order the API sent them, and the
    upstream's clock when it answered (its ``Date`` header as Unix ms; None when the header was
    missing or unreadable)."""

    number: int
    records: tuple[JsonObject, ...]
    next_link: str | None
    server_ms: int | None = None


def redact_url(url: str) -> str:
    """The URL with the value of ``api_key`` (and any ``access_token``) replaced."""
    parts = urlsplit(url)
    if not parts.query:
        return url
    query = [
        (key, _REDACTED if key.lower() in {"api_key", "access_token"} else value)
        for key, value in parse_qsl(parts.query, keep_blank_values=True)
    ]
    return parts._replace(query=urlencode(query, safe="*:")).geturl()


class CtctClient:
    """Calls one account's endpoints on a shared ``aiohttp.ClientSession``."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        credentials: Credentials,
        limiter: RateLimiter,
        *,
        retry: RetryPolicy | None = None,
        timeout: aiohttp.ClientTimeout | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_response: Callable[[str, str, float], None] | None = None,
    ) -> None:
        self._session = session
        # (endpoint, status or "timeout"/"transport_error", seconds): the metrics hook
        self._on_response = on_response or _ignore_response
        self._credentials = credentials
        self._base = credentials.base_url.rstrip("/")
        self._limiter = limiter
        self._breaker = limiter.breaker  # the key's, shared as its limiter is
        self._retry = retry or RetryPolicy()
        self._timeout = timeout or aiohttp.ClientTimeout(total=30, connect=10)
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._headers = {
            "Accept": "application/json",
            "Authorization": f"Bearer {credentials.access_token}",
        }
        # Attempts made, including those that never left (refused, not buildable): the quota
        # and a pass's count (``counting_requests``) get those back; this total does not.
        self.requests_sent = 0

    async def pages(
        self,
        endpoint: Endpoint,
        *,
        resource_id: str | None = None,
        link_id: str | None = None,
        since: datetime | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[Page]:
        """Yield every page of a paged endpoint, following ``next_link`` until there is none.

        Raises :class:`PaginationLoopError` when a ``next_link`` repeats (the same path and
        parameters), or after ``MAX_EMPTY_PAGES`` pages in a row that still carry one but bring
        no record not seen earlier in this run: no records at all, or only repeats (a cursor
        that hands out a new link over the same records).

        ``since`` is sent as ``created_since``/``modified_since`` (inclusive). ``limit`` defaults
        to the endpoint's maximum; later pages inherit it through the next token.
        """
        if not endpoint.paged:
            raise ValueError(f"endpoint {endpoint.name} is not paged; use fetch()")
        max_limit = endpoint.max_limit or 0
        size = max_limit if limit is None else limit
        if not 1 <= size <= max_limit:
            raise ValueError(f"limit for {endpoint.name} must be 1..{max_limit}, got {size}")
        params = list(endpoint.fixed_params)
        if since is not None and endpoint.since_param:
            params.append((endpoint.since_param, format_time(since)))
        params.append(("limit", str(size)))
        path = endpoint.url_path(resource_id, link_id)
        links: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
        records_seen: set[int] = set()
        number = 1
        stale = 0  # pages in a row that brought no record not seen earlier in this run
        while True:
            body, server_ms = await self._get(endpoint.name, path, params)
            records, next_link = _paged_body(endpoint.name, body)
            fresh = _remember(records, records_seen)
            yield Page(number, records, next_link, server_ms)
            if next_link is None:
                return
            path, params = self._follow(endpoint.name, next_link)
            link = (path, tuple(sorted(params)))  # the same link, whatever its parameter order
            if link in links:
                raise errors.PaginationLoopError(
                    f"next_link repeated on page {number + 1}: {next_link}", endpoint=endpoint.name
                )
            stale = 0 if fresh else stale + 1
            if stale >= MAX_EMPTY_PAGES:
                raise errors.PaginationLoopError(
                    f"{stale} pages in a row (up to page {number}) brought no new record (none,"
                    f" or only records this read had already returned) but a next_link; not"
                    f" following it: {next_link}",
                    endpoint=endpoint.name,
                )
            links.add(link)
            number += 1

    async def fetch(
        self, endpoint: Endpoint, *, resource_id: str | None = None
    ) -> JsonObject | list[JsonObject]:
        """The body of an unpaged endpoint: a summary object, or the summary-by-campaign list."""
        if endpoint.paged:
            raise ValueError(f"endpoint {endpoint.name} is paged; use pages()")
        body, _ = await self._get(
            endpoint.name, endpoint.url_path(resource_id), list(endpoint.fixed_params)
        )
        if endpoint.shape is Shape.SUMMARY_LIST:
            if isinstance(body, list) and all(isinstance(row, dict) for row in body):
                return body
            raise _malformed(endpoint.name, "expected a JSON array of objects")
        if isinstance(body, dict):
            return body
        raise _malformed(endpoint.name, "expected a JSON object")

    def _follow(self, name: str, next_link: str) -> tuple[str, list[tuple[str, str]]]:
        """Split a next_link into path and params; it must stay on our host: it gets the key."""
        parts = urlsplit(next_link)
        if parts.scheme or parts.netloc or not parts.path.startswith("/"):
            raise _malformed(name, f"next_link is not a relative path: {next_link!r}")
        return parts.path, parse_qsl(parts.query, keep_blank_values=True)

    async def _get(
        self, name: str, path: str, params: list[tuple[str, str]]
    ) -> tuple[object, int | None]:
        """One logical GET with bounded retries; every attempt that may have reached the API
        spends budget (one that provably never left is given back, and is no request of the
        pass either). Each attempt first asks the key's breaker (``relay.ctct.breaker``): a
        short hold is waited out, a long one or an open circuit raises ``KeyPausedError``. The
        body, and the upstream's clock (its ``Date`` header, Unix ms) when it answered."""
        attempt = 1
        slept_until = 0.0  # a hold this request's own retry delay has already waited out
        while True:
            _guard()
            probe = await self._key_admits(slept_until)
            admission: Admission | None = None
            try:
                admission = await self._limiter.acquire()
                await self._still_wanted(admission)
                result = await self._attempt(name, path, params)
            except errors.QuotaExhaustedError:
                self._breaker.succeeded(probe)
                self._limiter.exhaust_today()
                raise
            except errors.CtctError as exc:
                self._breaker.observe(exc, probe)
                if not exc.sent and admission is not None:
                    await self._limiter.give_back(admission)
                    count_request(-1)
                if exc.retry_after_s:
                    # the API asked the key, not this request, to wait: the key's other
                    # requests wait too (a long wait stops them: the scheduler pauses the key)
                    until = self._breaker.now() + exc.retry_after_s
                    self._breaker.hold(until, f"{exc.status} with Retry-After: {exc}")
                    slept_until = until
                delay = self._retry_delay(exc, attempt)
                if delay is None:
                    raise
                log.warning(
                    "ctct.retry",
                    endpoint=name,
                    attempt=attempt,
                    delay_s=round(delay, 3),
                    error=str(exc),
                )
                await self._sleep(delay)
                attempt += 1
            except BaseException:
                self._breaker.abandoned(probe)
                raise
            else:
                self._breaker.succeeded(probe)
                return result

    async def _still_wanted(self, admission: Admission) -> None:
        """The unit of work's check (``guarding_requests``) after the limiter's wait: a request
        it stops is given back, never sent."""
        try:
            _guard()
        except BaseException:
            await self._limiter.give_back(admission)
            raise

    async def _key_admits(self, slept_until: float) -> bool:
        """Wait out a short hold of the key (one this request's retry delay covered already is
        not waited again); raise ``KeyPausedError`` for a longer one, ``CircuitOpenError`` while
        the circuit is open. True when the request goes as the circuit's probe."""
        breaker = self._breaker
        breaker.check()  # an open circuit stops the request at once, whatever it holds
        while breaker.held_until_s > slept_until:
            until = breaker.held_until_s
            wait_s = until - breaker.now()
            if wait_s <= 0:
                break
            if wait_s > self._retry.max_retry_after_s:
                resume_at = datetime.fromtimestamp(until, UTC)
                raise errors.KeyPausedError(
                    f"api_key paused until {format_time(resume_at)}: {breaker.hold_reason}",
                    resume_at=resume_at,
                )
            await self._sleep(wait_s)
            slept_until = until  # a hold set meanwhile, if later, is waited for too
        return breaker.admit()

    def _retry_delay(self, exc: errors.CtctError, attempt: int) -> float | None:
        """Seconds to wait before retrying, or None when the error goes to the caller."""
        if not exc.retriable or attempt >= self._retry.max_attempts:
            return None
        delay = self._retry.delay_s(attempt, self._rng)
        if exc.retry_after_s is not None:
            if exc.retry_after_s > self._retry.max_retry_after_s:
                return None
            delay = max(delay, exc.retry_after_s)
        if isinstance(exc, errors.OverQpsError):
            delay = max(delay, self._limiter.budget.window_s)  # the API's window must pass
        return delay

    async def _attempt(
        self, name: str, path: str, params: list[tuple[str, str]]
    ) -> tuple[object, int | None]:
        url = self._base + path
        query = [("api_key", self._credentials.api_key), *params]

        def shown() -> str:  # only errors need it; not built on the success path
            return redact_url(f"{url}?{urlencode(query)}")

        started = time.perf_counter()
        self.requests_sent += 1
        count_request()
        try:
            async with self._session.get(
                url,
                params=query,
                headers=self._headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as resp:
                status = resp.status
                if 200 <= status < 300:
                    body = await self._read_whole(resp, name, shown, started)
                else:
                    body = await _read_capped(resp, _ERROR_BODY_CAP)
                retry_after = resp.headers.get("Retry-After")
                server_ms = _date_ms(resp.headers.get("Date"))
        except TimeoutError as exc:
            self._on_response(name, "timeout", time.perf_counter() - started)
            if isinstance(exc, aiohttp.ConnectionTimeoutError):  # the network, not the query
                raise errors.TransportError(
                    f"GET {shown()} timed out connecting (connect_timeout_s"
                    f" {self._timeout.connect}, timeout_s {self._timeout.total})",
                    endpoint=name,
                    sent=False,  # no connection, so no request: the API counted nothing
                ) from None
            raise errors.ResponseTimeoutError(
                f"GET {shown()} timed out after {self._timeout.total}s", endpoint=name
            ) from None
        except aiohttp.ClientError as exc:
            self._on_response(name, "transport_error", time.perf_counter() - started)
            # from None: aiohttp's own exception text may carry the full URL with the api_key
            raise errors.TransportError(
                f"GET {shown()} failed: {_describe_transport(exc)}",
                endpoint=name,
                # refused, DNS, TLS handshake: no request went out. A disconnect or reset once
                # connected may have reached the API after it was sent: that one stays counted.
                sent=not isinstance(exc, aiohttp.ClientConnectorError),
            ) from None
        except ValueError as exc:  # UnicodeError included
            # aiohttp refused to build the request: a control character in the token's header,
            # a host name IDNA cannot encode. The config refuses both at load; this keeps any
            # other such value from crashing a pass, and says what it was.
            self._on_response(name, "transport_error", time.perf_counter() - started)
            raise errors.InvalidRequestError(
                f"GET {shown()} could not be sent: {self._request_problem(exc)}",
                endpoint=name,
                sent=False,
            ) from None
        log.debug(
            "ctct.response",
            endpoint=name,
            status=status,
            latency_ms=round((time.perf_counter() - started) * 1000, 1),
        )
        self._on_response(name, str(status), time.perf_counter() - started)
        if not 200 <= status < 300:
            raise _map_error(name, shown(), status, body, retry_after)
        try:
            return orjson.loads(body), server_ms
        except orjson.JSONDecodeError as exc:
            strict_error = str(exc)
        # One record's text that is not clean UTF-8 (a Latin-1 byte, a lone surrogate escape of
        # a string cut mid-emoji) made orjson refuse the page, and the feed never moved again.
        try:
            parsed, repaired = _lenient_json(body)
        except ValueError as exc:
            raise _malformed(
                name, f"GET {shown()} answered {status} with a body that is {exc}"
            ) from None
        if repaired is None:  # clean text; not JSON orjson takes
            raise _malformed(
                name,
                f"GET {shown()} answered {status} with a body that is not JSON ({strict_error})",
            )
        log.warning("ctct.body_repaired", endpoint=name, path=path, status=status, problem=repaired)
        return parsed, server_ms

    async def _read_whole(
        self,
        resp: aiohttp.ClientResponse,
        name: str,
        shown: Callable[[], str],
        started: float,
    ) -> bytes:
        """A 2xx's body. One cut off mid-way (the connection closed before its length) is a
        malformed answer of this request, not a network failure: it is retried as such, and
        once the retries are spent only its feed fails (``poller.FEED_ERRORS``), the pass
        keeping the feeds it read; as a transport error it ended the whole pass."""
        try:
            return await resp.read()
        except aiohttp.ClientPayloadError:
            self._on_response(name, str(resp.status), time.perf_counter() - started)
            raise _malformed(
                name, f"GET {shown()} answered {resp.status} with a body cut off mid-way"
            ) from None

    def _request_problem(self, exc: ValueError) -> str:
        """What aiohttp said, with the credentials' values scrubbed from it."""
        if isinstance(exc, UnicodeError):
            what = f"the host of the base_url is not a valid host name ({exc})"
        else:
            what = f"a credential or the base_url holds what an HTTP request cannot carry ({exc})"
        for secret in (self._credentials.api_key, self._credentials.access_token):
            for value in {secret, secret.strip()}:
                if value:
                    what = what.replace(value, _REDACTED)
        return what


def _ignore_response(_endpoint: str, _status: str, _seconds: float) -> None:
    """No metrics wanted (tools such as ``ctct-relay fetch``)."""


async def _read_capped(resp: aiohttp.ClientResponse, cap: int) -> bytes:
    """Up to ``cap`` bytes of a body we only quote in an error message."""
    chunks: list[bytes] = []
    size = 0
    while size < cap:
        chunk = await resp.content.read(cap - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _remember(records: tuple[JsonObject, ...], seen: set[int]) -> bool:
    """Add the records to those seen in this paging run; whether any of them was new there.

    A record is known by a hash of its fields and values (a 64-bit hash: a collision could at
    worst count one page of a read as stale)."""
    if len(seen) + len(records) > _SEEN_RECORDS_CAP:
        seen.clear()
    before = len(seen)
    for record in records:
        try:
            seen.add(hash(tuple(record.items())))
        except TypeError:  # a nested object or list: not hashable as it is
            seen.add(hash(orjson.dumps(record, option=orjson.OPT_SORT_KEYS)))
    return len(seen) > before


def _lenient_json(body: bytes) -> tuple[object, str | None]:
    """A body orjson refused, parsed with what is not text replaced by U+FFFD (bytes that are
    not UTF-8, lone UTF-16 surrogate escapes), and what was replaced; None when nothing was:
    the refusal was not about the text's encoding. Raises ValueError naming the problems of a
    body that is neither UTF-8 nor JSON."""
    problems = []
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = body.decode("utf-8", "replace")
        problems.append(f"not valid UTF-8 (byte 0x{body[exc.start]:02x} at offset {exc.start})")
    try:
        parsed = json.loads(text)  # the standard library's takes lone surrogate escapes
        lone = _Replaced()
        parsed = lone.clean(parsed)
    except (ValueError, RecursionError) as exc:
        if not problems:  # clean text, just not JSON: the caller says what orjson said
            return None, None
        problems.append(f"not JSON ({exc})")
        raise ValueError(" and ".join(problems)) from None
    if lone.strings:
        problems.append(f"{lone.strings} string(s) holding a lone UTF-16 surrogate escape")
    return parsed, "; ".join(problems) or None


class _Replaced:
    """Replaces lone surrogates in every string (keys too) of a parsed body; counts them."""

    def __init__(self) -> None:
        self.strings = 0

    def clean(self, value: object) -> object:
        if isinstance(value, str):
            cleaned = text_without_surrogates(value)
            self.strings += cleaned is not value
            return cleaned
        if isinstance(value, list):
            return [self.clean(item) for item in value]
        if isinstance(value, dict):
            return {self.clean(key): self.clean(item) for key, item in value.items()}
        return value


def _paged_body(name: str, body: object) -> tuple[tuple[JsonObject, ...], str | None]:
    if not isinstance(body, dict):
        raise _malformed(name, "expected a JSON object with 'results'")
    results = body.get("results")
    if not isinstance(results, list) or not all(isinstance(row, dict) for row in results):
        raise _malformed(name, "'results' is not a list of objects")
    meta = body.get("meta")
    pagination = meta.get("pagination") if isinstance(meta, dict) else None
    next_link = pagination.get("next_link") if isinstance(pagination, dict) else None
    if next_link is not None and (not isinstance(next_link, str) or not next_link):
        raise _malformed(name, f"meta.pagination.next_link is not a path: {next_link!r}")
    return tuple(results), next_link


def _malformed(name: str, message: str) -> errors.MalformedResponseError:
    return errors.MalformedResponseError(message, endpoint=name)


def _describe_transport(exc: aiohttp.ClientError) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {exc.host}:{exc.port} ({exc.os_error.strerror or exc.os_error})"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "server closed the connection"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "response body was cut off"
    return type(exc).__name__


def _upstream_errors(body: bytes) -> list[tuple[str, str]]:
    """(error_key, error_message) pairs of the API's error array; empty when it is not one."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return []
    if isinstance(parsed, dict):
        parsed = [parsed]
    if not isinstance(parsed, list):
        return []
    return [
        (_said(item.get("error_key")), _said(item.get("error_message")))
        for item in parsed
        if isinstance(item, dict)
    ]


def _said(value: object) -> str:
    """One field of an error entry as text; absent or null says nothing ("", not "None")."""
    return "" if value is None else str(value).strip()


_BY_STATUS: Mapping[int, type[errors.ResponseError]] = {
    400: errors.BadRequestError,
    401: errors.UnauthorizedError,
    403: errors.ForbiddenError,
    404: errors.NotFoundError,
    406: errors.NotAcceptableError,
    429: errors.TooManyRequestsError,
}


def _map_error(
    name: str, shown: str, status: int, body: bytes, retry_after: str | None
) -> errors.CtctError:
    """The typed error for a non-2xx answer, with the API's own error keys and messages."""
    pairs = _upstream_errors(body)
    key = (pairs[0][0] or None) if pairs else None
    # each entry: its key and message, or whichever of the two came (": message" said nothing)
    said = "; ".join(f"{k}: {m}" if k and m else k or m for k, m in pairs if k or m)
    said = said or _excerpt(body)
    message = f"GET {shown} answered {status}" + (f" ({said})" if said else "")
    if status == 403 and key == OVER_QPS:
        return errors.OverQpsError(message, endpoint=name, status=status, error_key=key)
    if status == 403 and key == OVER_RATELIMIT:
        resume_at = next_utc_midnight(datetime.now().astimezone())
        return errors.QuotaExhaustedError(
            message + f"; paused until {format_time(resume_at)}",
            resume_at=resume_at,
            endpoint=name,
            status=status,
            error_key=key,
        )
    cls = _BY_STATUS.get(status)
    if cls is None:
        cls = errors.ServerError if status >= 500 else errors.ResponseError
    return cls(
        message,
        endpoint=name,
        status=status,
        error_key=key,
        retry_after_s=_retry_after_s(retry_after),
    )


def _retry_after_s(value: str | None) -> float | None:
    """Retry-After as seconds (delta-seconds form; the HTTP-date form counts from now); None for
    anything else (ASCII digits only: ``str.isdigit`` also takes "²", which float refuses)."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:  # HTTP-dates are GMT
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())


def _date_ms(value: str | None) -> int | None:
    """An HTTP ``Date`` header as Unix ms; None when absent or not an HTTP date with a zone."""
    if not value:
        return None
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:  # "-0000": no zone known, so no instant either
        return None
    return to_millis(moment)


def _excerpt(body: bytes) -> str:
    text = body[:200].decode("utf-8", "replace").strip()
    return " ".join(text.split())
