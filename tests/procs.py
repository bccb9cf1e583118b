"""Real processes for integration tests: the simulator and the relay, started as a user would."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

import yaml

from relay.events import Kind, parse_time, to_millis

ROOT = Path(__file__).resolve().parent.parent
Identity = tuple[str, str, str, int, str]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Proc:
    """``python -m relay …`` in the background, output to a log file, killable and restartable."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.args = args
        self.log = log
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> Proc:
        self.starts += 1
        with self.log.open("ab") as out:
            out.write(f"\n--- start {self.starts} ---\n".encode())
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "relay", *self.args],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        return self

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, like a power cut."""
        if self.popen and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(10)

    def stop(self) -> int:
        """SIGTERM and wait: the graceful path."""
        assert self.popen is not None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                return self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                raise
        return self.popen.returncode

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def sim_scenario(api_key: str, token: str, *, seed: int, **parts: object) -> dict[str, object]:
    """A SimProcess scenario: one key (``api_key``, ``token``) without limits, a clock that moves
    only by ``sim.advance``; ``parts`` (contacts, campaigns, rates, faults, keys, ...) as the
    simulator reads them."""
    return {
        "seed": seed,
        "start": "2026-11-20T09:00:00Z",
        "time_scale": 0,
        "keys": [{"api_key": api_key, "access_token": token, "qps": None, "daily": None}],
        **parts,
    }


class SimProcess(Proc):
    """``ctct-relay sim`` on a free port with a scenario written from a mapping."""

    def __init__(self, tmp: Path, scenario: dict[str, object]) -> None:
        self.port = free_port()
        path = tmp / "scenario.yaml"
        path.write_text(yaml.safe_dump(scenario))
        super().__init__(["sim", "--config", str(path), "--port", str(self.port)], tmp / "sim.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> SimProcess:
        super().start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                self.get("/_sim/clock")
                return self
            except OSError:
                time.sleep(0.1)
        raise AssertionError(f"simulator did not start:\n{self.output()}")

    def get(self, path: str) -> dict[str, object]:
        with urllib.request.urlopen(self.url + path, timeout=30) as resp:  # noqa: S310 - loopback
            body: dict[str, object] = json.loads(resp.read())
            return body

    def post(self, path: str, body: dict[str, object]) -> dict[str, object]:
        request = urllib.request.Request(  # noqa: S310 - loopback
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310 - loopback
            result: dict[str, object] = json.loads(resp.read())
            return result

    def advance(self, seconds: float) -> None:
        self.post("/_sim/clock", {"advance_s": seconds})

    def truth(self) -> Counter[Identity]:
        return Counter(truth_identity(a) for a in self._visible())

    def late_arrivals(self) -> set[Identity]:
        """Visible activities the API started returning only after they occurred."""
        late = set()
        for a in self._visible():
            identity = truth_identity(a)
            if to_millis(parse_time(str(a["visible_at"]))) > identity[3]:
                late.add(identity)
        return late

    def _visible(self) -> list[dict[str, object]]:
        activities = self.get("/_sim/truth")["activities"]
        assert isinstance(activities, list)
        return activities


def truth_identity(a: dict[str, object]) -> Identity:
    kind = Kind(str(a["kind"]))
    link = str(a.get("link_id", "")) if kind is Kind.CLICK else ""
    ms = to_millis(parse_time(a[kind.date_field]))
    return kind.value, str(a["campaign_id"]), str(a["contact_id"]), ms, link


def data_identity(kind: str, raw: bytes) -> Identity:
    """The identity of an event from its kind and ``data`` JSON."""
    data = json.loads(raw)
    ms = to_millis(parse_time(data["occurred_at"]))
    return kind, data["campaign_id"], data["contact_id"], ms, data.get("link_id", "")


def outbox(db: Path) -> Counter[Identity]:
    """What the relay committed, read straight from its SQLite state file."""
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT kind, data FROM outbox").fetchall()
    return Counter(data_identity(str(r[0]), bytes(r[1])) for r in rows)


def relay_config(
    tmp: Path,
    sim: SimProcess,
    *,
    api_key: str = "k-crash-1",
    token: str = "t-crash-1",
    account: dict[str, object] | None = None,
    **extra: object,
) -> Path:
    """A relay config for the simulator; ``account`` merges into its one account, ``extra`` into
    the top level (deeply for dicts)."""
    config: dict[str, object] = {
        "state": f"sqlite:///{tmp / 'state.db'}",
        "accounts": [
            {
                "name": "acme",
                "base_url": sim.url,
                "api_key": api_key,
                "access_token": token,
                "campaigns": {"discover": True, "discover_interval_s": 0.5},
                **(account or {}),
            }
        ],
        # time constants in seconds of the relay's clock, scaled down as the schedule's are:
        # the simulator's clock jumps by sim.advance, so a campaign's repeat opens and clicks
        # (which move no unique-recipient count) are read at repeat_read_s, not 6 hours later
        "poll": {"start_from": "earliest", "overlap_s": 1800, "page_limit": 20, "repeat_read_s": 2},
        # repeat_share 0: reads by time every repeat_read_s whatever the budget. The budget is a
        # real day's (10,000 requests) while the clocks above are scaled down ~10,000 times, so
        # the share would stretch those reads to minutes (as it should at that rate)
        "schedule": {"min_interval_s": 0.3, "max_interval_s": 2, "tick_s": 0.2, "repeat_share": 0},
        "http": {"max_attempts": 3, "backoff_base_s": 0.05, "backoff_max_s": 0.5},
        "logging": {"level": "info", "format": "json"},
        "admin": {"port": 0},
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}  # type: ignore[dict-item]
        else:
            config[key] = value
    path = tmp / "relay.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def wait_until(predicate: object, timeout_s: float, what: str) -> None:
    """Poll ``predicate()`` until true; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
