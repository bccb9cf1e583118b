"""tests/turns.py: a serial test runs alone, others together, and a waiting serial test is not
starved by a stream of others. Each ``Turns`` opens the lock files itself, as each xdist worker
does, so two of them in threads contend as two workers would."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from tests.turns import Turns

WAIT_S = 5.0


def holding(turns: Turns, *, alone: bool) -> tuple[threading.Event, threading.Event]:
    """A thread that takes a turn, sets ``started`` and keeps the turn until ``release`` is set."""
    started, release = threading.Event(), threading.Event()

    def run() -> None:
        with turns.turn(alone=alone):
            started.set()
            release.wait(WAIT_S)

    threading.Thread(target=run, daemon=True).start()
    return started, release


def settle(condition: Callable[[], bool]) -> bool:
    """Whether ``condition`` still holds after a moment (a thread that could go on has)."""
    threading.Event().wait(0.2)
    return condition()


def test_others_share_a_turn(tmp_path: Path) -> None:
    """Two tests that are not serial run at the same time."""
    first, release_first = holding(Turns(tmp_path), alone=False)
    assert first.wait(WAIT_S)
    second, release_second = holding(Turns(tmp_path), alone=False)
    assert second.wait(WAIT_S)
    release_first.set()
    release_second.set()


def test_a_serial_test_waits_for_the_running_ones_and_then_runs_alone(tmp_path: Path) -> None:
    """A serial test starts only once the running test ends; another waits until it ends."""
    other, release_other = holding(Turns(tmp_path), alone=False)
    assert other.wait(WAIT_S)
    serial, release_serial = holding(Turns(tmp_path), alone=True)
    assert settle(lambda: not serial.is_set())
    release_other.set()
    assert serial.wait(WAIT_S)
    later, release_later = holding(Turns(tmp_path), alone=False)
    assert settle(lambda: not later.is_set())
    release_serial.set()
    assert later.wait(WAIT_S)
    release_later.set()


def test_a_waiting_serial_test_is_not_starved_by_later_ones(tmp_path: Path) -> None:
    """Once a serial test waits, a test that comes after it waits too, though the running test
    would share its turn with it."""
    other, release_other = holding(Turns(tmp_path), alone=False)
    assert other.wait(WAIT_S)
    serial, release_serial = holding(Turns(tmp_path), alone=True)
    assert settle(lambda: not serial.is_set())
    later, release_later = holding(Turns(tmp_path), alone=False)
    assert settle(lambda: not later.is_set())
    release_other.set()
    assert serial.wait(WAIT_S)
    assert settle(lambda: not later.is_set())
    release_serial.set()
    assert later.wait(WAIT_S)
    release_later.set()


def test_a_run_of_serial_tests_keeps_its_turn_between_them(tmp_path: Path) -> None:
    """A serial test followed by another keeps the turn: nothing runs between the two, and the
    turn ends with the last of them."""
    serial = Turns(tmp_path)
    with serial.turn(alone=True, alone_next=True):
        pass
    other, release_other = holding(Turns(tmp_path), alone=False)
    assert settle(lambda: not other.is_set())
    with serial.turn(alone=True, alone_next=False):
        assert not other.is_set()
    assert other.wait(WAIT_S)
    release_other.set()
