"""Typed reading of untrusted mappings (scenario YAML, ``/_sim`` JSON bodies).

A :class:`Fields` reads one mapping at a key path; every error it raises is a
:class:`ScenarioError` naming the full path (``faults.error_5xx_rate: expected …, got 'lots'``),
and :meth:`Fields.finish` rejects keys nobody asked for, so a typo never passes silently.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from relay.sim.scenario import ScenarioError


class Fields:
    """One mapping being read, at a key path."""

    def __init__(self, data: object, path: str = "") -> None:
        if not isinstance(data, Mapping):
            where = path or "the top level"
            raise ScenarioError(f"{where}: expected a mapping of keys, got {_shown(data)}")
        self._data: Mapping[object, object] = data
        self._path = path
        self._read: set[str] = set()

    def key(self, name: str) -> str:
        """The full path of ``name`` in this mapping."""
        return f"{self._path}.{name}" if self._path else name

    def has(self, name: str) -> bool:
        """Whether ``name`` is present (null counts as present)."""
        return name in self._data

    def raw(self, name: str) -> object:
        """The value of ``name`` as it is, None when absent; marks it read."""
        self._read.add(name)
        return self._data.get(name)

    def fail(self, name: str, problem: str) -> ScenarioError:
        """An error about ``name``."""
        return ScenarioError(f"{self.key(name)}: {problem}")

    def number(
        self, name: str, default: float, *, low: float | None = 0.0, high: float | None = None
    ) -> float:
        """A finite number in ``low..high`` (inclusive; None: unbounded)."""
        value = self.raw(name)
        if value is None:
            return default
        expected = _range_text("a number", low, high)
        # bool is an int subclass, and `true` is never meant as 1
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(name, f"expected {expected}, got {_shown(value)}")
        number = float(value)
        too_low = low is not None and number < low
        if not math.isfinite(number) or too_low or (high is not None and number > high):
            raise self.fail(name, f"expected {expected}, got {_shown(value)}")
        return number

    def rate(self, name: str, default: float) -> float:
        """A probability."""
        return self.number(name, default, low=0.0, high=1.0)

    def integer(self, name: str, default: int, *, low: int = 0, high: int | None = None) -> int:
        """A whole number in ``low..high`` (inclusive)."""
        value = self.optional_integer(name, default, low=low, high=high)
        if value is None:
            raise self.fail(name, f"expected {_range_text('an integer', low, high)}, got null")
        return value

    def optional_integer(
        self, name: str, default: int | None, *, low: int = 0, high: int | None = None
    ) -> int | None:
        """A whole number in ``low..high``, or None when the key is null."""
        if not self.has(name):
            self._read.add(name)
            return default
        value = self.raw(name)
        if value is None:
            return None
        expected = _range_text("an integer", low, high)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(name, f"expected {expected}, got {_shown(value)}")
        if value < low or (high is not None and value > high):
            raise self.fail(name, f"expected {expected}, got {value}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        """true or false."""
        value = self.raw(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(name, f"expected true or false, got {_shown(value)}")
        return value

    def text(self, name: str, default: str | None = None) -> str:
        """A non-empty string; required when ``default`` is None."""
        value = self.raw(name)
        if value is None:
            if default is None:
                raise self.fail(name, "required")
            return default
        if not isinstance(value, str) or not value.strip():
            raise self.fail(name, f"expected a non-empty string, got {_shown(value)}")
        return value.strip()

    def child(self, name: str) -> Fields:
        """The nested mapping ``name`` (empty when absent)."""
        value = self.raw(name)
        return Fields({} if value is None else value, self.key(name))

    def children(self, name: str) -> list[Fields]:
        """The list of mappings ``name`` (empty when absent)."""
        value = self.raw(name)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(name, f"expected a list, got {_shown(value)}")
        return [Fields(item, f"{self.key(name)}[{i}]") for i, item in enumerate(value)]

    def finish(self) -> None:
        """Reject every key that was not read."""
        unknown = sorted(str(k) for k in self._data if k not in self._read)
        if unknown:
            known = ", ".join(sorted(self._read))
            names = ", ".join(unknown)
            where = self._path or "the top level"
            raise ScenarioError(f"{where}: unknown key(s) {names} (known: {known})")


def _range_text(what: str, low: float | None, high: float | None) -> str:
    if low is None:
        return what if high is None else f"{what} <= {_plain(high)}"
    if high is None:
        return f"{what} >= {_plain(low)}"
    return f"{what} between {_plain(low)} and {_plain(high)}"


def _plain(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
