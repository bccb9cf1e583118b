"""Authentication, Mashery-style per-key limits, and the request statistics of ``/_sim/stats``.

The limits are counted per api_key, as the real API counts them: every account (access token)
using a key spends the same per-second window and daily quota.

Limits run on real time, not simulated time: a relay's budget is real requests per real second
and per real UTC day. The per-second limit is a sliding window, so no 1-second window ever holds
more than ``qps`` admitted requests; the daily count resets at 00:00 UTC of the wall clock.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

from relay.sim.scenario import ApiKey

JsonObject = dict[str, object]
UNKNOWN_KEY = "(unknown)"  # stats bucket of requests whose api_key is missing or unknown
_WINDOW_S = 1.0


class Reason:
    """Why a request was rejected before reaching the data (stats keys)."""

    UNAUTHORIZED = "unauthorized"
    NOT_ACCEPTABLE = "not_acceptable"
    OVER_QPS = "over_qps"
    OVER_RATELIMIT = "over_ratelimit"


@dataclass(slots=True)
class _Usage:
    """One key's live counters."""

    window: deque[float] = field(default_factory=deque)  # admission times in the last second
    day: date | None = None
    today: int = 0
    max_per_window: int = 0


class Limits:
    """Checks credentials and admits requests per key within its qps and daily limits."""

    def __init__(
        self,
        keys: Iterable[ApiKey],
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._keys = {key.api_key: key for key in keys}
        self._usage = {name: _Usage() for name in self._keys}
        self._monotonic = monotonic
        self._wall_clock = wall_clock

    def authenticate(self, api_key: str | None, authorization: str | None) -> ApiKey | None:
        """The key, if ``api_key`` is known and the header carries one of its bearer tokens."""
        key = self._keys.get(api_key or "")
        if key is None or authorization is None:
            return None
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or token.strip() not in key.tokens:
            return None
        return key

    def admit(self, key: ApiKey) -> str | None:
        """Count one request against ``key``; None if admitted, else the rejection reason."""
        usage = self._usage[key.api_key]
        now = self._monotonic()
        while usage.window and usage.window[0] <= now - _WINDOW_S:
            usage.window.popleft()
        today = self._today()
        if usage.day != today:
            usage.day, usage.today = today, 0
        if key.qps and len(usage.window) >= key.qps:
            return Reason.OVER_QPS
        if key.daily and usage.today >= key.daily:
            return Reason.OVER_RATELIMIT
        usage.window.append(now)
        usage.today += 1
        usage.max_per_window = max(usage.max_per_window, len(usage.window))
        return None

    def describe(self, name: str) -> JsonObject:
        """Live limit counters of one key."""
        usage = self._usage.get(name)
        if usage is None:
            return {}
        key = self._keys[name]
        return {
            "qps_limit": key.qps,
            "daily_limit": key.daily,
            # the count is reset by a new day's first request; until then it is yesterday's
            "used_today": usage.today if usage.day == self._today() else 0,
            "max_per_1s": usage.max_per_window,
        }

    def _today(self) -> date:
        return datetime.fromtimestamp(self._wall_clock(), UTC).date()

    def names(self) -> list[str]:
        """The configured api keys."""
        return list(self._keys)


@dataclass(slots=True)
class _KeyCounts:
    served: int = 0
    faults: int = 0
    rejected: Counter[str] = field(default_factory=Counter)


class Stats:
    """Per-key served/rejected counts and per-endpoint status counts."""

    def __init__(self) -> None:
        self._keys: dict[str, _KeyCounts] = {}
        self._endpoints: dict[str, Counter[int]] = {}
        self._open: Counter[str] = Counter()  # tracking requests in progress, per stream
        self.overlapping = 0  # requests that started while another for its stream was open

    def begin(self, stream: str | None) -> None:
        """A tracking request for ``stream`` started (None: not a tracking request)."""
        if stream is None:
            return
        if self._open[stream]:
            self.overlapping += 1
        self._open[stream] += 1

    def end(self, stream: str | None) -> None:
        """The request of ``begin`` was answered."""
        if stream is None:
            return
        self._open[stream] -= 1
        if not self._open[stream]:
            del self._open[stream]

    def _key(self, name: str) -> _KeyCounts:
        counts = self._keys.get(name)
        if counts is None:
            counts = self._keys[name] = _KeyCounts()
        return counts

    def served(self, name: str, *, fault: bool) -> None:
        """One request answered past the gate (by data, an error about it, or a fault)."""
        counts = self._key(name)
        counts.served += 1
        counts.faults += fault

    def rejected(self, name: str, reason: str) -> None:
        """One request turned away at the gate."""
        self._key(name).rejected[reason] += 1

    def answered(self, template: str, status: int) -> None:
        """One /v2 answer, by route template."""
        self._endpoints.setdefault(template, Counter())[status] += 1

    def describe(self, limits: Limits) -> JsonObject:
        """Everything, as JSON."""
        names = [*limits.names(), *(n for n in self._keys if n not in limits.names())]
        keys: JsonObject = {}
        for name in names:
            counts = self._keys.get(name) or _KeyCounts()
            keys[name] = {
                "served": counts.served,
                "faults": counts.faults,
                "rejected": dict(sorted(counts.rejected.items())),
                **limits.describe(name),
            }
        endpoints = {
            template: {
                "requests": sum(statuses.values()),
                "by_status": {str(status): n for status, n in sorted(statuses.items())},
            }
            for template, statuses in sorted(self._endpoints.items())
        }
        return {"keys": keys, "endpoints": endpoints, "overlapping": self.overlapping}
