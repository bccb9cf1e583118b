"""``ctct-relay demo`` as a user runs it: a process, headless, for a bounded time or to Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.procs import ROOT, wait_until

pytestmark = pytest.mark.integration

EVENT_LINE = re.compile(
    r"^(webhook|kafka)  +(send|open|click|forward|bounce|unsubscribe) +campaign \d+ +contact +\d+"
    r" +at \S+Z.* id [0-9a-f]{8}",
    re.MULTILINE,
)
SUMMARY = re.compile(r"demo: (\d+) events at the webhook receiver \(signatures verified, (\d+)")


def demo(tmp: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with (tmp / "demo.out").open("wb") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "relay", "demo", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )


def test_demo_delivers_signed_webhooks_and_kafka_records_then_stops(tmp_path: Path) -> None:
    """For 25 s the demo's receiver verifies and prints events, its consumer prints the same
    events from Kafka, and the demo exits 0 with its summary."""
    proc = demo(tmp_path, "--duration", "25")
    assert proc.wait(180) == 0, (tmp_path / "demo.out").read_text()
    text = (tmp_path / "demo.out").read_text()
    assert "Traceback" not in text
    lines = EVENT_LINE.findall(text)
    hooks = [kind for sink, kind in lines if sink == "webhook"]
    records = [kind for sink, kind in lines if sink == "kafka"]
    assert len(hooks) >= 20, text[-3000:]
    assert len(records) >= 20, text[-3000:]
    assert {"send", "open"} <= set(hooks)
    summary = SUMMARY.search(text)
    assert summary is not None, text[-2000:]
    assert int(summary.group(1)) == len(hooks)
    assert summary.group(2) == "0"
    assert "/metrics" in text
    assert "admin API" in text
    assert "ctct-relay status" in text


def test_ctrl_c_stops_the_demo_cleanly_and_without_java_it_says_how_to_enable_kafka(
    tmp_path: Path,
) -> None:
    """Without java on PATH the demo runs without Kafka and says how to enable it; SIGINT
    stops it with exit 0 and no traceback."""
    bare = tmp_path / "bin"
    bare.mkdir()
    proc = demo(tmp_path, env={"PATH": str(bare)})
    out = tmp_path / "demo.out"
    try:
        wait_until(lambda: "webhook  send" in out.read_text(), 60, "a first webhook event")
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, out.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = out.read_text()
    assert "Traceback" not in text
    assert "KeyboardInterrupt" not in text
    assert "install Java 17+ and Maven" in text
    assert "records from Kafka" in text
