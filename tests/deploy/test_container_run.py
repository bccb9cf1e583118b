"""What the image runs, as real processes: no Docker engine runs here or in CI.

The command line is read from the Dockerfile (ENTRYPOINT + CMD), the config and the health check
script are the repository files the Dockerfile copies to the paths that command line names, and
the container-only settings are redirected by environment variables, as `docker run -e` would:
the state file into a temp dir, the admin API onto a free loopback port, the upstream onto the
simulator.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.files import BIN, copied_from, dockerfile, only
from tests.procs import SimProcess, free_port, wait_until

pytestmark = pytest.mark.integration

KEY, TOKEN, ADMIN_TOKEN = "k-image-1", "t-image-1", "admin-image-token-1"


def scenario() -> dict[str, object]:
    return {
        "seed": 5,
        "start": "2026-11-20T09:00:00Z",
        "time_scale": 0,
        "keys": [{"api_key": KEY, "access_token": TOKEN, "qps": None, "daily": None}],
        "contacts": {"count": 30},
        "campaigns": {"count": 3, "already_sent": 2, "sent_every_s": 600, "audience": 1.0},
    }


def image_command() -> tuple[list[str], list[str]]:
    """(relay argv, health check argv) as the image would run them, mapped onto this checkout."""
    instructions = dockerfile()
    entrypoint = only(instructions, "ENTRYPOINT").exec_form()
    cmd = only(instructions, "CMD").exec_form()
    config_at = cmd.index("--config") + 1
    cmd[config_at] = str(copied_from(instructions, cmd[config_at]))
    check = only(instructions, "HEALTHCHECK").exec_form()
    # /opt/venv/bin/python is the venv the build stage made; ours is this interpreter's.
    check = [sys.executable, str(copied_from(instructions, check[1])), *check[2:]]
    return [str(BIN / entrypoint[0]), *entrypoint[1:], *cmd], check


def container_env(tmp: Path, sim: SimProcess, admin_port: int) -> dict[str, str]:
    """`docker run -e …`: the secrets, and the container paths and ports redirected."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTCT_")}
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "CTCT_API_KEY": KEY,
            "CTCT_ACCESS_TOKEN": TOKEN,
            "CTCT_RELAY_ADMIN_TOKEN": ADMIN_TOKEN,
            "CTCT_BASE_URL": sim.url,
            # /var/lib/ctct-relay is the image's volume; here a temp dir
            "CTCT_RELAY_STATE": f"sqlite:///{tmp / 'relay-state.db'}",
            # 0.0.0.0 inside a container; loopback on a shared test machine
            "CTCT_RELAY_ADMIN__HOST": "127.0.0.1",
            "CTCT_RELAY_ADMIN__PORT": str(admin_port),
            # seconds instead of minutes, and the simulator's history, so events flow at once
            "CTCT_RELAY_POLL__START_FROM": "earliest",
            "CTCT_RELAY_SCHEDULE__MIN_INTERVAL_S": "0.3",
            "CTCT_RELAY_SCHEDULE__MAX_INTERVAL_S": "2",
            "CTCT_RELAY_SCHEDULE__TICK_S": "0.2",
        }
    )
    return env


def committed_events(db: Path) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(db) as conn:
        try:
            (count,) = conn.execute("SELECT count(*) FROM outbox").fetchone()
        except sqlite3.OperationalError:  # the schema is not there yet
            return 0
    return int(count)


def test_image_command_is_healthy_while_it_runs_and_unhealthy_after(tmp_path: Path) -> None:
    """The image's CMD relays the simulator's events; HEALTHCHECK passes, then fails once down."""
    sim = SimProcess(tmp_path, scenario()).start()
    admin_port = free_port()
    relay_argv, check_argv = image_command()
    check_argv = [a.replace(":8081/", f":{admin_port}/") for a in check_argv]
    assert any(f":{admin_port}/healthz" in a for a in check_argv), check_argv
    db = tmp_path / "relay-state.db"
    log = tmp_path / "relay.log"

    def health() -> subprocess.CompletedProcess[str]:
        return subprocess.run(check_argv, capture_output=True, text=True, timeout=30, check=False)

    before = health()
    assert before.returncode == 1, "healthy with no relay running"
    with log.open("wb") as out:
        relay = subprocess.Popen(
            relay_argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env=container_env(tmp_path, sim, admin_port),
        )
    try:
        wait_until(lambda: health().returncode == 0, 60, "the health check to pass")
        wait_until(lambda: committed_events(db) > 0, 60, "events in the redirected state file")
        assert relay.poll() is None, log.read_text()
        relay.send_signal(signal.SIGTERM)
        assert relay.wait(30) == 0, log.read_text()[-3000:]
    finally:
        if relay.poll() is None:
            relay.kill()
            relay.wait(10)
        sim.kill()
    after = health()
    assert after.returncode == 1
    assert "not reachable" in after.stderr
    # the container config logs JSON lines for the log driver; the secrets never show
    text = log.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines
    for line in lines:
        json.loads(line)
    for secret in (KEY, TOKEN, ADMIN_TOKEN):
        assert secret not in text
