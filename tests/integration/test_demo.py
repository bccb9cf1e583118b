"""``ctct-relay demo`` as a user runs it: a process, headless, for a bounded time or to Ctrl-C."""

from __future__ import annotations

import os
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
import sysconfig
import time
import urllib.request
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
    """For 10 s the demo's receiver verifies and prints events, its consumer prints the same
    events from Kafka, and the demo exits 0 with its summary. (10 s carry some 260 events each
    way, over ten times the 20 asserted: 25 s only made the test slower.)"""
    proc = demo(tmp_path, "--duration", "10")
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


def test_what_the_banner_prints_works(tmp_path: Path) -> None:
    """Every URL the banner prints answers 200 and its status command, run as printed in a shell
    whose PATH lacks the virtualenv, as a fresh one after ``make demo`` (even with an admin token
    of another relay in the environment), prints the demo's account (it printed a bare
    ``ctct-relay``: command not found)."""
    scripts = Path(sysconfig.get_path("scripts"))
    fresh_path = os.pathsep.join(
        d for d in os.environ.get("PATH", "").split(os.pathsep) if d and Path(d) != scripts
    )
    proc = demo(
        tmp_path,
        *("--no-kafka", "--duration", "60", "--state-dir", str(tmp_path / "s")),
        env={"PATH": fresh_path},
    )
    out = tmp_path / "demo.out"
    try:
        wait_until(lambda: "webhook  send" in out.read_text(), 60, "a first webhook event")
        banner = out.read_text().split("events below as they arrive")[0]
        urls = re.findall(r"http://127\.0\.0\.1:\d+/\S*[a-z]", banner)
        webhooks_receiver = [u for u in urls if u.endswith("/hook")]
        assert len(urls) - len(webhooks_receiver) == 4, banner  # truth, v1, openapi, metrics
        for url in set(urls) - set(webhooks_receiver):  # a POST there would count as rejected
            with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback
                assert response.status == 200, url
        printed = re.search(r"^status +(\S*ctct-relay status .*)$", banner, re.MULTILINE)
        assert printed is not None, banner
        argv = shlex.split(printed.group(1))
        assert argv[0] == str(scripts / "ctct-relay")
        assert argv[1] == "status"
        for environ in ({}, {"CTCT_RELAY_ADMIN_TOKEN": "another-relays-token"}):
            env = {k: v for k, v in os.environ.items() if k != "CTCT_RELAY_ADMIN_TOKEN"}
            status = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                cwd=ROOT,
                env={**env, "PATH": fresh_path, **environ},
                timeout=60,
                check=False,
            )
            assert status.returncode == 0, status.stderr
            assert re.search(r"^demo +\d+", status.stdout, re.MULTILINE), status.stdout
        config = re.search(r"^relay config +(\S+)$", banner, re.MULTILINE)
        assert config is not None
        assert Path(config.group(1)) == tmp_path / "s" / "relay.yaml"
        assert Path(config.group(1)).is_file()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0, out.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_reused_state_dir_keeps_only_the_current_receiver(tmp_path: Path) -> None:
    """A second demo on the same --state-dir removes the first run's receiver webhook, whose
    port is gone (its deliveries failed and dead-lettered), and delivers to its own."""
    state = tmp_path / "state"
    for run in (1, 2):
        # 4 s deliver some 50 events; the first run's receiver is gone once it ends
        proc = demo(tmp_path, "--no-kafka", "--duration", "4", "--state-dir", str(state))
        assert proc.wait(120) == 0, (tmp_path / "demo.out").read_text()
        text = (tmp_path / "demo.out").read_text()
        summary = SUMMARY.search(text)
        assert summary is not None, text[-2000:]
        assert int(summary.group(1)) > 0, f"run {run}: {text[-2000:]}"
    with sqlite3.connect(state / "state.db") as conn:
        hooks = conn.execute("SELECT url FROM webhooks").fetchall()
        orphans = conn.execute(
            "SELECT COUNT(*) FROM deliveries WHERE webhook_id NOT IN (SELECT id FROM webhooks)"
        ).fetchone()[0]
    assert len(hooks) == 1, hooks
    assert orphans == 0  # nothing left retrying towards the old port


def test_a_state_dir_in_use_is_refused_before_anything_starts(tmp_path: Path) -> None:
    """A second demo on the --state-dir of a running one stops at once, exit 1, one line naming
    the state file (it rewrote the first's relay.yaml and ran a second relay on its state)."""
    state = tmp_path / "state"
    first = demo(tmp_path, "--no-kafka", "--duration", "60", "--state-dir", str(state))
    second_dir = tmp_path / "second"
    second_dir.mkdir()
    second: subprocess.Popen[bytes] | None = None
    try:
        # an event delivered: the first demo's relay is running (it holds the state's lock)
        wait_until(
            lambda: EVENT_LINE.search((tmp_path / "demo.out").read_text()) is not None,
            60,
            "the first demo's first event",
        )
        written = (state / "relay.yaml").read_text()
        second = demo(second_dir, "--no-kafka", "--duration", "60", "--state-dir", str(state))
        assert second.wait(60) == 1
        said = (second_dir / "demo.out").read_text()
        assert said == (
            f"ctct-relay: error: state store {state / 'state.db'} is in use by another"
            f" ctct-relay process (pid {first.pid}) (one relay per SQLite file; several"
            " replicas need a postgresql:// state)\n"
        )
        assert (state / "relay.yaml").read_text() == written
        assert first.poll() is None
        first.send_signal(signal.SIGINT)
        assert first.wait(60) == 0, (tmp_path / "demo.out").read_text()
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
