"""Turns of the pytest-xdist workers: a test marked ``serial`` runs while no other test runs.

``make test`` runs the suite in several worker processes (most tests wait on brokers, timers
and subprocesses, so more workers than cores pay). A few tests measure latency, rates or CPU
time against a bound; the load of other workers would skew what they measure, so they take
their turn alone. Two ``flock`` locks in a directory the controller makes for the run: every
test holds the run lock, shared or (serial) exclusive; the gate, taken before it, keeps a
stream of shared holders from starving a serial test that waits (a waiting serial test holds
the gate, so no other test starts until it has run). The serial tests are collected first, so
one worker runs them back to back at the start, while the others have only begun.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MARK = "serial"
WORKER_INPUT_KEY = "relay_turns_dir"


class Turns:
    """One worker's handles on the run's gate and run locks (kept open for the session)."""

    def __init__(self, directory: Path) -> None:
        flags = os.O_RDWR | os.O_CREAT
        self._gate = os.open(directory / "gate.lock", flags, 0o600)
        self._run = os.open(directory / "run.lock", flags, 0o600)
        self._alone = False  # the run lock is still held exclusively by the test before

    @contextmanager
    def turn(self, *, alone: bool, alone_next: bool = False) -> Iterator[None]:
        """Hold the run lock for one test: exclusive when ``alone``, else shared. A serial test
        followed by another keeps it, so a run of serial tests waits for the others once."""
        if not (alone and self._alone):
            fcntl.flock(self._gate, fcntl.LOCK_EX)
            try:
                fcntl.flock(self._run, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
            finally:
                fcntl.flock(self._gate, fcntl.LOCK_UN)
        self._alone = alone
        try:
            yield
        finally:
            if not (alone and alone_next):
                self._alone = False
                fcntl.flock(self._run, fcntl.LOCK_UN)
