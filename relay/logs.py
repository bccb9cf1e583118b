"""structlog set-up: JSON lines off a TTY, console on one, and secret redaction on every path.

Redaction runs as the last processor before rendering, so whatever a log call passes (an
exception text, a URL, a header dict) is scrubbed of the configured secrets, of their obvious
encodings (URL-quoted, base64, the key part of a ``whsec_`` secret) and of anything that looks
like one (``api_key=…`` query values, ``Bearer …`` tokens, ``whsec_…`` webhook secrets, a URL's
password and query values).
Records of libraries that log through the standard library go through the same processors
(structlog's ``ProcessorFormatter``): the same JSON lines, redacted the same way.

Every line of one poll pass carries its ``poll_id``, of one webhook delivery its ``delivery`` id,
of one admin API request its ``request_id`` and ``peer``: the scheduler, the dispatcher and the
API bind them with ``bound_contextvars``, and ``merge_contextvars`` is the first processor here.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import sys
import time
from collections.abc import Callable, Iterable, MutableMapping
from typing import TextIO
from urllib.parse import quote, quote_plus

import orjson
import structlog
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from structlog.typing import EventDict, Processor, WrappedLogger

REDACTED = "***"
_PATTERNS = (
    re.compile(r"(?i)(api_key=)[^&\s\"']+"),
    re.compile(r"(?i)(access_token=)[^&\s\"']+"),
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"),
    re.compile(r"()whsec_[A-Za-z0-9+/=]+"),
    # the password of a URL's user info (https://user:password@host/): the user name stays
    re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^\s/?#@:\"'<>]*:)[^\s/?#@\"'<>]+(?=@)"),
)
# An absolute URL's query: every value is masked, as status and the webhook dispatcher show
# webhook URLs (tokens hide in ?token=, ?sig=, ?code=…, not only in api_key=); the keys stay.
_URL_QUERY = re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^\s?#\"'<>]*\?)([^\s#\"'<>]+)")
_QUERY_VALUE = re.compile(r"=[^&;]*")


class Redactor:
    """Replaces known secret values and secret-shaped substrings in any nested log value."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        forms = {form for s in secrets if len(s) >= 4 for form in _encodings(s)}
        # longest first, so a secret that contains another is replaced whole
        self._secrets = sorted(forms, key=len, reverse=True)

    def text(self, value: str) -> str:
        """``value`` with every secret replaced."""
        for secret in self._secrets:
            if secret in value:
                value = value.replace(secret, REDACTED)
        for pattern in _PATTERNS:
            value = pattern.sub(lambda m: m.group(1) + REDACTED, value)
        return _URL_QUERY.sub(_masked_query, value)

    def value(self, value: object) -> object:
        """Redact strings inside dicts, lists and tuples; numbers, booleans and None pass
        unchanged, anything else becomes its redacted ``str()``."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {k: self.value(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.value(v) for v in value)
        if isinstance(value, BaseException):
            return self.text(f"{type(value).__name__}: {value}")
        if value is None or isinstance(value, (bool, int, float)):
            return value
        # anything else is rendered by str() or repr() (a yarl.URL, a set) or field by field
        # (orjson writes a dataclass's fields, whatever its repr hides): redact its text here
        return self.text(str(value))

    def __call__(self, _logger: WrappedLogger, _name: str, event: EventDict) -> EventDict:
        for key, item in list(event.items()):
            event[key] = self.value(item)
        return event


def _masked_query(match: re.Match[str]) -> str:
    """A URL's query with every value as ``***``; an item without ``=`` may be a token itself."""
    items = match.group(2).split("&")
    masked = [_QUERY_VALUE.sub("=" + REDACTED, i, count=1) if "=" in i else REDACTED for i in items]
    return match.group(1) + "&".join(masked)


def _encodings(secret: str) -> set[str]:
    """The secret as it may appear when a library quotes or encodes it."""
    forms = {secret, quote(secret, safe=""), quote_plus(secret)}
    forms.add(base64.b64encode(secret.encode()).decode().rstrip("="))
    if secret.startswith("whsec_") and len(secret) > 10:
        key = secret.removeprefix("whsec_")
        forms |= {key, quote(key, safe=""), key.rstrip("=")}
    return forms


def configure(
    level: str = "info",
    fmt: str = "auto",
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
) -> Redactor:
    """Configure structlog (and the stdlib root logger, for libraries) once at start-up."""
    out = stream or sys.stderr
    redactor = Redactor(secrets)
    console = fmt == "console" or (fmt == "auto" and out.isatty())
    context: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Processor = (
        structlog.dev.ConsoleRenderer(colors=False)
        if console
        else structlog.processors.JSONRenderer(serializer=_dumps)
    )
    # the traceback becomes an ``exception`` text field before redaction, so it is scrubbed too
    rendering: list[Processor] = [structlog.processors.format_exc_info, redactor, renderer]
    structlog.configure(
        processors=[*context, *rendering],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    # Libraries (aiokafka, aiohttp, asyncio, asyncpg) log through the standard library: their
    # records go through the same processors, so they are one JSON object per line (or one
    # console line) with the library's name in ``logger``, redacted like everything else.
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*context, structlog.stdlib.add_logger_name],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *rendering],
        )
    )
    handler.addFilter(_drop_cancellations)
    handler.addFilter(_one_line_reconnects)
    handler.addFilter(_one_line_bad_requests)
    handler.addFilter(RepeatCollapser())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(_LEVELS[level], logging.WARNING))
    return redactor


_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def _dumps(obj: MutableMapping[str, object], **_kw: object) -> str:
    return orjson.dumps(obj, default=str).decode()


def _drop_cancellations(record: logging.LogRecord) -> bool:
    """Drop library records about a task cancelled at shutdown: APScheduler logs the jobs it
    cancels when the scheduler stops as "Error running job" with a traceback. Stopping is not
    an error, and Ctrl-C must not print tracebacks."""
    return not (record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError))


def _one_line_reconnects(record: logging.LogRecord) -> bool:
    """asyncpg's pool logs each failed reconnect during a PostgreSQL outage with a traceback
    ("Failed to restore the pool connection floor"); the store retries and logs the outage
    itself, so the library's line keeps just the error."""
    if record.name.startswith("asyncpg") and record.exc_info and record.exc_info[1] is not None:
        error = record.exc_info[1]
        record.msg = f"{record.getMessage()}: {type(error).__name__}: {error}"
        record.args = None
        record.exc_info = None
        record.exc_text = None
    return True


# aiokafka's records that repeat at every metadata lookup, keyed by (logger, message template)
_REPEATING = {("aiokafka.cluster", "Topic %s not found in cluster metadata")}


class RepeatCollapser:
    """aiokafka logs "Topic %s not found in cluster metadata" at each metadata lookup while a
    topic the producer writes to is missing (deleted at run time): thousands of lines a second,
    for as long as it lasts. The first record per topic passes; repeats within ``window_s`` are
    dropped and counted, and the next one to pass says how many were left out. The sink's own
    ``kafka.unavailable`` lines still say what fails."""

    def __init__(self, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._window_s = window_s
        self._clock = clock
        self._seen: dict[tuple[str, str, object], tuple[float, int]] = {}  # -> (passed, dropped)

    def __call__(self, record: logging.LogRecord) -> bool:
        if not isinstance(record.msg, str) or (record.name, record.msg) not in _REPEATING:
            return True
        key = (record.name, record.msg, record.args)
        now = self._clock()
        passed, dropped = self._seen.get(key, (None, 0))
        if passed is not None and now - passed < self._window_s:
            self._seen[key] = (passed, dropped + 1)
            return False
        if len(self._seen) >= 1000:  # topics are few; a bound all the same
            self._seen.clear()
        self._seen[key] = (now, 0)
        if dropped and passed is not None:
            record.msg = (
                f"{record.getMessage()} (repeated {dropped} times in the last"
                f" {now - passed:.0f} s, not logged)"
            )
            record.args = None
        return True


_DETAIL_CHARS = 200


def _one_line_bad_requests(record: logging.LogRecord) -> bool:
    """aiohttp's server logs every request it cannot parse (a request line or header over 8190
    bytes, a bad HTTP version, a bad chunk) as an error with a ~1 KB traceback: anyone who can
    connect could flood the log with them. It has answered 400 already and nothing of ours
    failed, so the record becomes a one-line warning naming the peer and the problem.

    So does its "Unhandled exception" for a body that does not decode as its
    ``Content-Encoding`` says (gzip that is not gzip): after the answer (a 400, or a 401 to a
    request without the token, whose body is never read) aiohttp drains the rest of the body,
    finds the error again and closes the connection."""
    error = record.exc_info[1] if record.exc_info else None
    if not record.name.startswith("aiohttp.server"):
        return True
    if isinstance(error, HttpProcessingError):
        peer = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        record.msg = "malformed HTTP request from %s, answered %s: %s: %s"
        record.args = (peer, error.code or 400, type(error).__name__, _detail(error.message))
    elif isinstance(error, RequestPayloadError):
        cause = error.__cause__
        text = cause.message if isinstance(cause, HttpProcessingError) else str(error)
        record.msg = "malformed HTTP request body, connection closed: %s: %s"
        record.args = (type(cause or error).__name__, _detail(text))
    else:
        return True
    record.levelno, record.levelname = logging.WARNING, "WARNING"
    record.exc_info = None
    record.exc_text = None
    return True


def _detail(text: object) -> str:
    """The parser's message (which quotes the request's bytes over several lines): one line,
    capped, without the status it may start with."""
    detail = _STATUS_PREFIX.sub("", " ".join(str(text).split()))
    return detail if len(detail) <= _DETAIL_CHARS else detail[:_DETAIL_CHARS] + "…"


_STATUS_PREFIX = re.compile(r"^[0-9]{3}, message: ")
