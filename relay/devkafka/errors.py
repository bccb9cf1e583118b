"""The one error of the dev-broker layer, and how its messages quote a tool's output."""

from __future__ import annotations

TAIL_LINES = 40


class DevKafkaError(Exception):
    """The local broker could not be fetched, started or reached; the message says what to do."""


def tail(lines: list[str], count: int = TAIL_LINES) -> str:
    """The last `count` lines, joined: enough of a log to show why something failed."""
    return "\n".join(lines[-count:])
