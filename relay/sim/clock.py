"""Simulated time: real elapsed time scaled, plus manual jumps.

Monotonic, never the wall clock, drives it, so a wall-clock step cannot move simulated time
backwards. ``time_scale`` 0 freezes it except for :meth:`SimClock.advance`, which tests use to
step through a scenario deterministically. Time stops at :data:`END`: every date the simulator
serves lies between :data:`EARLIEST` and it (past the year 9999 no date can be written at all).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)  # the first instant a scenario may place anything at
END = datetime(9999, 1, 1, tzinfo=UTC)  # simulated time runs up to here and stops


class SimClock:
    """``now() = start + real elapsed * time_scale + advanced``."""

    def __init__(
        self,
        start: datetime | None = None,
        time_scale: float = 1.0,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not math.isfinite(time_scale) or time_scale < 0:
            raise ValueError(f"time_scale must be a number >= 0, got {time_scale!r}")
        if start is None:
            start = datetime.now(UTC)
        elif start.tzinfo is None:
            raise ValueError("start must be an aware datetime")
        elif not EARLIEST <= start < END:
            raise ValueError(f"start must be from {EARLIEST:%Y-%m-%d} to before {END:%Y-%m-%d}")
        self._start = start.astimezone(UTC)
        self._scale = time_scale
        self._monotonic = monotonic
        self._origin = monotonic()
        self._offset_s = 0.0

    @property
    def start(self) -> datetime:
        """Simulated time at creation (aware UTC)."""
        return self._start

    @property
    def start_ms(self) -> int:
        """Simulated time at creation, as Unix milliseconds."""
        return _to_ms(self._start)

    @property
    def time_scale(self) -> float:
        """Simulated seconds per real second."""
        return self._scale

    def now(self) -> datetime:
        """The current simulated time (aware UTC), at most :data:`END`."""
        elapsed_s = self.elapsed_s()
        # compared before building the timedelta, which overflows long before a float does
        if elapsed_s >= self._room_s():
            return END
        return min(END, self._start + timedelta(seconds=elapsed_s))

    def now_ms(self) -> int:
        """The current simulated time as Unix milliseconds."""
        return _to_ms(self.now())

    def elapsed_s(self) -> float:
        """Simulated seconds since the start."""
        return (self._monotonic() - self._origin) * self._scale + self._offset_s

    def advance(self, seconds: float) -> None:
        """Jump forward; simulated time never goes back, nor past :data:`END`."""
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"can only advance by a number of seconds >= 0, got {seconds!r}")
        if self.elapsed_s() + seconds > self._room_s():
            raise ValueError(
                f"advancing by {seconds!r} seconds would pass {END:%Y-%m-%d}, where simulated"
                f" time ends ({self._room_s() - self.elapsed_s():.0f} seconds from now)"
            )
        self._offset_s += seconds

    def _room_s(self) -> float:
        return (END - self._start).total_seconds()


def _to_ms(moment: datetime) -> int:
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return delta.days * 86_400_000 + delta.seconds * 1000 + delta.microseconds // 1000
