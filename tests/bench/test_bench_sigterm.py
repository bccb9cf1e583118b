"""Benchmarks that start helper processes take them down when stopped by SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text()
        found.update(int(c) for c in text.split())
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


@pytest.mark.parametrize(
    "args",
    [
        ["bench/webhooks.py", "--events", "200000", "--rounds", "50"],
        ["bench/fetch.py", "--rounds", "500"],
    ],
    ids=["webhooks", "fetch"],
)
def test_sigterm_stops_the_helper_process_too(args: list[str]) -> None:
    """SIGTERM's default action killed the bench alone: its receiver or simulator process,
    started with multiprocessing, was left running."""
    bench = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        helpers: set[int] = set()
        while not helpers and time.monotonic() < deadline:
            time.sleep(0.2)
            # the spawn start method runs a resource tracker beside the helper: both must go
            helpers = _children(bench.pid)
        assert helpers, "the bench started no helper process"
        time.sleep(1.5)  # into the measurement
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(30) == 130  # "stopped", as after Ctrl-C
        deadline = time.monotonic() + 10
        while any(map(_alive, helpers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in helpers if _alive(p)]
    finally:
        if bench.poll() is None:
            bench.kill()
        for pid in _children(bench.pid) if bench.poll() is None else ():
            os.kill(pid, signal.SIGKILL)
