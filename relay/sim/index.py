"""Sorted per-stream indexes and newest-first offset paging over them.

An index holds a stream's visible activities in ascending (occurred_ms, uid) order, which is the
natural order of :class:`Activity` tuples, so sorting and bisecting run in C; a query is a bisect
for ``created_since`` and a slice, never a scan. Paging is by offset from the newest item
over the live list, as the real API pages: an arrival between two pages shifts later pages (a
repeat), but nothing is skipped, because items are only ever inserted.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from relay.sim.model import Activity

# Above this many new items, re-sorting (Timsort merging two runs, linear) beats insort.
_BULK = 16


@dataclass(frozen=True, slots=True)
class Window:
    """Ascending positions ``low..high`` (exclusive) that a page covers, and whether more follow."""

    low: int
    high: int
    more: bool


def newest_first(eligible_low: int, eligible_high: int, start: int, limit: int) -> Window:
    """The positions of newest-first items ``start..start+limit`` of an ascending range."""
    high = max(eligible_low, eligible_high - start)
    low = max(eligible_low, high - limit)
    return Window(low, high, low > eligible_low)


class SortedIndex:
    """One stream's visible activities, ascending by (occurred_ms, uid)."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: list[Activity] = []

    def __len__(self) -> int:
        return len(self._items)

    def add(self, new: Sequence[Activity]) -> None:
        """Insert newly visible activities."""
        items = self._items
        if len(new) > _BULK:
            items.extend(new)
            items.sort()
            return
        for activity in new:
            if not items or items[-1] < activity:
                items.append(activity)  # the common case: the newest so far
            else:
                bisect.insort(items, activity)

    def page(self, since_ms: int | None, start: int, limit: int) -> tuple[list[Activity], bool]:
        """Newest-first items ``start..start+limit`` of those at or after ``since_ms``."""
        # (since_ms,) sorts before every activity of that millisecond: an inclusive bound.
        low = 0 if since_ms is None else bisect.bisect_left(self._items, (since_ms,))
        window = newest_first(low, len(self._items), start, limit)
        return self._items[window.low : window.high][::-1], window.more

    def items(self) -> Sequence[Activity]:
        """All items, ascending (read-only view for summaries)."""
        return self._items
