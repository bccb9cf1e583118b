"""Whether a request of one api_key may go out now: its circuit breaker and its holds.

An upstream outage and a ``Retry-After`` concern every stream of the key, not the one whose
request met them. Without this, each stream retried an outage on its own backoff (five attempts a
pass, about 40 requests per stream in the first hour), and a 429's short ``Retry-After`` was slept
only by the task that got it while the key's other streams kept hitting the limit.

- The *circuit* opens after ``BreakerSettings.failures`` attempts in a row, across all streams
  of the key, that got a 5xx or no HTTP answer (refused, reset, DNS, a connect timeout; a
  response timeout is a slow query, not an outage, and counts neither way). While open no
  request of the key goes out; once ``open_s`` has passed one probe request may, alone: an answer
  that is no 5xx closes the circuit, a failure opens it again for twice as long (up to
  ``max_open_s``). Any HTTP answer below 500 resets the count.
- A *hold* is a time before which no request of the key goes out: a 429's or 5xx's
  ``Retry-After``, or a pause of the key the scheduler stored (a long ``Retry-After``, the
  circuit, a replica's). A request meeting a short hold (``RetryPolicy.max_retry_after_s`` at
  most) waits it out in place; a longer one (and an open circuit) stops it with
  :class:`KeyPausedError`, so a pass in flight ends at its next page.

One per api_key, owned by its :class:`RateLimiter`; this process's memory only (the scheduler
stores the pauses it implies, for status and the other replicas).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog

from relay.ctct.errors import (
    CircuitOpenError,
    CtctError,
    ResponseTimeoutError,
    ServerError,
    TransportError,
)

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    """When an api_key's circuit opens and for how long (``http.breaker_*``)."""

    failures: int = 10  # attempts in a row, across the key's streams, that open it; 0: never
    open_s: float = 30.0  # the first open period; doubles with each failed probe
    max_open_s: float = 1800.0


def counts_as_outage(exc: CtctError) -> bool:
    """A 5xx, or no HTTP answer at all; a response timeout (a slow query) is not counted."""
    if isinstance(exc, ResponseTimeoutError):
        return False
    return isinstance(exc, (ServerError, TransportError))


def answered(exc: CtctError) -> bool:
    """An HTTP answer that is no 5xx (a 4xx, a 2xx with a bad body): the API is up."""
    return exc.status is not None and exc.status < 500


class KeyBreaker:
    """One api_key's circuit and holds (see the module docstring)."""

    def __init__(
        self, settings: BreakerSettings | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.settings = settings or BreakerSettings()
        self._clock = clock
        self.failures = 0  # attempts in a row that failed (counts_as_outage)
        self._opens = 0  # open periods in a row: the next is open_s * 2 ** this
        self.open_until_s: float | None = None  # open (wall clock); None: closed
        self.probing = False  # the one probe request is out
        self.last_error = ""
        self.held_until_s = 0.0  # no request before this (wall clock)
        self.hold_reason = ""

    def now(self) -> float:
        """The wall clock holds and open periods are on (Unix seconds)."""
        return self._clock()

    @property
    def is_open(self) -> bool:
        """Whether the circuit is open (a probe may be due or out)."""
        return self.open_until_s is not None

    def state(self) -> str:
        """``closed``, ``open`` (waiting for its probe time) or ``half_open`` (a probe may go or
        is out)."""
        if self.open_until_s is None:
            return "closed"
        return "open" if self._clock() < self.open_until_s else "half_open"

    def blocks_passes(self) -> bool:
        """Whether no pass may start now: open and not yet at its probe time, or probing."""
        return self.is_open and (self.probing or self.state() == "open")

    def reason(self) -> str:
        """Why the circuit is open, for the pause it implies (safe to show: errors are)."""
        return (
            f"circuit open: {self.failures} requests in a row failed (5xx or no answer), last:"
            f" {self.last_error}"
        )

    def hold(self, until_s: float, reason: str) -> None:
        """No request of the key before ``until_s``; a later hold already set is kept."""
        if until_s > self.held_until_s:
            self.held_until_s = until_s
            self.hold_reason = reason

    def check(self) -> None:
        """Raise :class:`CircuitOpenError` while the circuit admits no request: open and before
        its probe time, or with its probe out."""
        if self.open_until_s is None:
            return
        now = self._clock()
        if now < self.open_until_s or self.probing:
            resume = self.open_until_s if now < self.open_until_s else now
            raise CircuitOpenError(
                self.reason() + ("; a probe request is out" if self.probing else ""),
                resume_at=datetime.fromtimestamp(resume, UTC),
            )

    def admit(self) -> bool:
        """Whether a request may go out as far as the circuit goes: raises
        :class:`CircuitOpenError` when it may not; True when this request is the probe (its
        outcome must be reported: ``succeeded``, ``failed`` or ``abandoned``)."""
        self.check()
        if self.open_until_s is None:
            return False
        self.probing = True
        log.info("ctct.circuit_probe", failures=self.failures)
        return True

    def observe(self, exc: CtctError | None, probe: bool) -> None:
        """An attempt's outcome: None (a 2xx) or its error."""
        if exc is None or answered(exc):
            self.succeeded(probe)
        elif counts_as_outage(exc):
            self.failed(probe, str(exc))
        else:
            self.abandoned(probe)

    def succeeded(self, probe: bool) -> None:
        """The API answered (below 500): the count starts over, an open circuit closes."""
        self.failures = 0
        if probe:
            self.probing = False
        if self.open_until_s is not None and (probe or not self.probing):
            log.info("ctct.circuit_closed")
            self.open_until_s = None
            self._opens = 0

    def failed(self, probe: bool, error: str) -> None:
        """A 5xx or no answer: counted; the threshold reached (or the probe failing) opens the
        circuit, for ``open_s`` doubling with each open period in a row."""
        self.failures += 1
        self.last_error = error
        if probe:
            self.probing = False
        threshold = self.settings.failures
        if probe or (self.open_until_s is None and threshold and self.failures >= threshold):
            s = self.settings
            open_s = min(s.max_open_s, s.open_s * 2 ** min(self._opens, 30))
            self._opens += 1
            self.open_until_s = self._clock() + open_s
            log.warning(
                "ctct.circuit_open", failures=self.failures, open_s=open_s, error=self.last_error
            )

    def abandoned(self, probe: bool) -> None:
        """The attempt ended without telling (cancelled, an error of ours): a probe is no longer
        out, and the next request may probe."""
        if probe:
            self.probing = False
