"""How long one unit of work (an admin API request) may wait for a store that does not answer.

A store retries a call through an outage for its own time (PostgreSQL: ``reconnect_max_s``). A
caller that cannot wait that long opens a :func:`wait_budget`; the store then starts no new
attempt after the budget's deadline and fails the call with an :class:`UnavailableError` whose
``unchanged`` is true. It may do so only while none of the unit's writing transactions has sent
its COMMIT: from that moment (:meth:`WaitBudget.note_commit`) the budget no longer shortens
anything, so the unit's remaining calls (and the retries of a COMMIT whose answer was lost) run
their full course. A unit of work is therefore never cut short half-applied, and a write that
gave up early was not applied, then or later: no attempt of it is left running.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

__all__ = ["WaitBudget", "current_budget", "wait_budget"]


@dataclass
class WaitBudget:
    """The deadline (``time.monotonic()``) of one unit of work's store calls."""

    seconds: float
    deadline: float
    committing: bool = False  # a writing transaction of this unit has sent its COMMIT

    def note_commit(self) -> None:
        """A transaction that changed something is about to commit: stop shortening calls."""
        self.committing = True

    def remaining_s(self) -> float | None:
        """Seconds left before giving up, or None when the budget no longer applies."""
        if self.committing:
            return None
        return self.deadline - time.monotonic()


_BUDGET: ContextVar[WaitBudget | None] = ContextVar("store_wait_budget", default=None)


def current_budget() -> WaitBudget | None:
    """The budget of the unit of work running in this context, if any."""
    return _BUDGET.get()


@contextlib.contextmanager
def wait_budget(seconds: float) -> Iterator[WaitBudget]:
    """Store calls made inside give up on an unreachable store after ``seconds`` in all (see
    the module docstring for the one exception)."""
    budget = WaitBudget(seconds, time.monotonic() + seconds)
    token = _BUDGET.set(budget)
    try:
        yield budget
    finally:
        _BUDGET.reset(token)
