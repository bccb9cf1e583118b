"""The corruption latch both stores share (the stores' own behaviour on damage is tested with
each backend: test_sqlite_faults.py, test_postgres.py, and /readyz in tests/api/test_app.py)."""

from __future__ import annotations

import pytest

from relay.store import CorruptError, StoreError
from relay.store.base import CorruptionLatch


def test_the_first_damage_is_told_once_and_refuses_every_later_call() -> None:
    """The first CorruptError out of a guarded call reaches every listener once, in the order
    they were added; a second one (a call that was already running) tells nobody again; every
    later call is refused before it runs, with the first one's message."""
    latch = CorruptionLatch()
    heard: list[tuple[str, StoreError]] = []
    latch.listen(lambda exc: heard.append(("app", exc)))
    latch.listen(lambda exc: heard.append(("api", exc)))
    first, second = CorruptError("state.db is corrupt"), CorruptError("again")
    with pytest.raises(CorruptError) as raised, latch.guard():
        raise first
    assert raised.value is first
    with pytest.raises(CorruptError), latch.guard():
        raise second
    assert heard == [("app", first), ("api", first)]
    ran = []
    with pytest.raises(CorruptError, match=r"^state\.db is corrupt$"), latch.guard():
        ran.append(True)
    assert ran == []
    assert len(heard) == 2


def test_other_store_errors_pass_and_leave_it_open() -> None:
    """A StoreError that is no damage (an outage, a refused call) goes to its caller alone: no
    listener hears it and the next call runs."""
    latch = CorruptionLatch()
    heard: list[StoreError] = []
    latch.listen(heard.append)
    with pytest.raises(StoreError, match="down"), latch.guard():
        raise StoreError("down")
    with latch.guard():
        ran = True
    assert ran
    assert heard == []
