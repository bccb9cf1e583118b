"""What the image and the Kubernetes pods run, as real processes: no Docker engine or cluster
runs here or in CI.

The command line is read from the Dockerfile (ENTRYPOINT + CMD) or the Deployment (args); the
config and the health check script are the repository files the Dockerfile copies (or the
ConfigMap mounts) at the paths that command line names; secrets come in as the environment the
container would get; what only exists in a container or cluster is redirected by environment
variables, as `docker run -e` would: the state into a temp dir or the test PostgreSQL, the admin
API onto a free loopback port, the upstream onto the simulator.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import asyncpg
import pytest

from tests.deploy.files import BIN, copied_from, dockerfile, manifests, only
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


def pod_command(tmp: Path) -> tuple[list[str], dict[str, str]]:
    """(argv, probe paths) of the Deployment's container, its ConfigMap written out as mounted."""
    deployment = next(m for m in manifests().values() if m["kind"] == "Deployment")
    configmap = next(m for m in manifests().values() if m["kind"] == "ConfigMap")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    config_file = tmp / "relay.yaml"
    config_file.write_text(configmap["data"]["relay.yaml"])
    args = list(container["args"])
    args[args.index("--config") + 1] = str(config_file)
    entrypoint = only(dockerfile(), "ENTRYPOINT").exec_form()
    probes = {
        "liveness": container["livenessProbe"]["httpGet"]["path"],
        "readiness": container["readinessProbe"]["httpGet"]["path"],
    }
    return [str(BIN / entrypoint[0]), *entrypoint[1:], *args], probes


def pod_env(sim: SimProcess, state_url: str, admin_port: int) -> dict[str, str]:
    """The Deployment's secretKeyRef variables filled in, and the cluster addresses redirected."""
    deployment = next(m for m in manifests().values() if m["kind"] == "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    secret = {
        "api-key": KEY,
        "access-token": TOKEN,
        "admin-token": ADMIN_TOKEN,
        "postgres-password": "unused-the-test-server-trusts-loopback",
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTCT_")}
    for var in container["env"]:
        env[var["name"]] = secret[var["valueFrom"]["secretKeyRef"]["key"]]
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "CTCT_RELAY_STATE": state_url,
            "CTCT_RELAY_ACCOUNTS__0__BASE_URL": sim.url,
            # no broker here: the section is switched off; events stay in the shared outbox
            "CTCT_RELAY_KAFKA": "null",
            "CTCT_RELAY_ADMIN__HOST": "127.0.0.1",
            "CTCT_RELAY_ADMIN__PORT": str(admin_port),
            "CTCT_RELAY_POLL__START_FROM": "earliest",
            "CTCT_RELAY_SCHEDULE__MIN_INTERVAL_S": "0.3",
            "CTCT_RELAY_SCHEDULE__MAX_INTERVAL_S": "2",
            "CTCT_RELAY_SCHEDULE__TICK_S": "0.2",
        }
    )
    return env


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


async def outbox_ids(url: str) -> tuple[int, int]:
    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow("SELECT count(*), count(DISTINCT event_id) FROM outbox")
    except asyncpg.UndefinedTableError:
        return 0, 0
    finally:
        await conn.close()
    return int(row[0]), int(row[1])


def test_two_pods_on_one_postgresql_pass_their_probes(tmp_path: Path, postgres_url: str) -> None:
    """The Deployment's two replicas as processes on one PostgreSQL: both live and ready, every
    event committed once, no stream polled by both at a time, a clean stop on SIGTERM. (How the
    replicas divide the work is tests/integration/test_replicas.py's subject.)"""
    sim = SimProcess(tmp_path, scenario()).start()
    argv, probes = pod_command(tmp_path)
    ports = [free_port(), free_port()]
    pods: list[subprocess.Popen[bytes]] = []
    logs = [tmp_path / f"pod-{i}.log" for i in range(2)]
    try:
        for port, log in zip(ports, logs, strict=True):
            with log.open("wb") as out:
                pods.append(
                    subprocess.Popen(
                        argv,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        cwd=tmp_path,
                        env=pod_env(sim, postgres_url, port),
                    )
                )
        for port in ports:
            for path in probes.values():
                url = f"http://127.0.0.1:{port}{path}"
                wait_until(lambda url=url: http_status(url) == 200, 60, f"{url} to answer 200")
        wait_until(lambda: asyncio.run(outbox_ids(postgres_url))[0] > 0, 60, "shared outbox")
        sim.advance(1800)  # more activity while both replicas poll
        time.sleep(3)
        for pod, log in zip(pods, logs, strict=True):
            assert pod.poll() is None, log.read_text()[-3000:]
        for pod in pods:
            pod.send_signal(signal.SIGTERM)
        for pod, log in zip(pods, logs, strict=True):
            assert pod.wait(30) == 0, log.read_text()[-3000:]
        stats = sim.get("/_sim/stats")
    finally:
        for pod in pods:
            if pod.poll() is None:
                pod.kill()
                pod.wait(10)
        sim.kill()
    total, distinct = asyncio.run(outbox_ids(postgres_url))
    assert total == distinct > 0, "an event was committed twice"
    assert stats["overlapping"] == 0, "a stream was polled by both replicas at once"
    started = [log.read_text().count('"relay.started"') for log in logs]
    assert started == [1, 1]
