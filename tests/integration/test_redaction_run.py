"""A full relay process with every kind of secret configured: none of them reaches its logs."""

from __future__ import annotations

import base64
import json
import secrets
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest

from tests.procs import Proc, SimProcess, free_port, outbox, relay_config, wait_until

pytestmark = pytest.mark.integration


class _Hook(BaseHTTPRequestHandler):
    """Fails every third request (so failures are logged), accepts the rest."""

    count = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).count += 1
        self.send_response(500 if self.count % 3 == 0 else 204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_args: object) -> None:  # quiet test output
        return


@pytest.fixture
def receiver() -> Iterator[str]:
    """A webhook endpoint on loopback; yields its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()
    server.server_close()


def admin(
    port: int, method: str, path: str, token: str, body: object = None
) -> tuple[int, dict[str, object]]:
    """One admin API call; returns status and JSON body (errors included)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method=method,
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310 - loopback
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def answers(port: int) -> bool:
    """Whether the admin API is up."""
    try:
        return admin(port, "GET", "/healthz", "")[0] == 200
    except OSError:
        return False


def encodings(secret: str) -> set[str]:
    """The secret and the forms it would most likely leak in."""
    forms = {secret, quote(secret, safe=""), quote_plus(secret), f"Bearer {secret}"}
    forms.add(base64.b64encode(secret.encode()).decode().rstrip("="))
    if secret.startswith("whsec_"):
        key = secret.removeprefix("whsec_")
        forms |= {key, key.rstrip("="), quote(key, safe="")}
    return forms


def test_no_secret_in_any_log_line_of_a_run_with_faults(tmp_path: Path, receiver: str) -> None:
    """Polls, webhook deliveries and failures, admin API calls (good and bad tokens), secret
    rotation and an upstream 401 that echoes the key: the log holds none of the secrets."""
    key, token = f"k-{secrets.token_hex(8)}", f"t-{secrets.token_hex(8)}"
    admin_token = f"adm-{secrets.token_hex(12)}"
    hook_secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    api_secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    scenario = {
        "seed": 3,
        "start": "2026-11-20T09:00:00Z",
        "time_scale": 0,
        "keys": [{"api_key": key, "access_token": token, "qps": None, "daily": None}],
        "contacts": {"count": 30},
        "campaigns": {"count": 4, "already_sent": 2, "sent_every_s": 600},
        "faults": {"error_5xx_rate": 0.1, "truncate_rate": 0.05},
    }
    sim = SimProcess(tmp_path, scenario).start()
    port = free_port()
    relays: list[Proc] = []
    leaked_by_api: list[str] = []

    def start(fmt: str) -> Proc:
        config = relay_config(
            tmp_path,
            sim,
            api_key=key,
            token=token,
            logging={"level": "debug", "format": fmt},
            admin={"port": port, "token": admin_token},
            webhooks={
                "allow_networks": ["127.0.0.1/32"],
                "retry_schedule_s": [0.2, 0.2],
                "declared": [{"url": receiver, "secret": hook_secret}],
            },
        )
        relay = Proc(["run", "--config", str(config)], tmp_path / f"relay-{fmt}.log").start()
        relays.append(relay)
        wait_until(lambda: answers(port), 30, "the admin API")
        return relay

    db = tmp_path / "state.db"
    try:
        # console rendering first, then JSON lines: both processor paths
        relay = start("console")
        sim.advance(900)
        wait_until(lambda: db.exists() and len(outbox(db)) > 20, 60, "committed events")
        body = {
            "url": receiver + "-api",
            "secret": api_secret,
            "event_types": ["com.constantcontact.email.*"],
        }
        status, made = admin(port, "POST", "/v1/webhooks", admin_token, body)
        assert status == 201, made
        status, rotated = admin(
            port, "POST", f"/v1/webhooks/{made['id']}/rotate-secret", admin_token
        )
        assert status == 200, rotated
        leaked_by_api.append(str(rotated["secret"]))
        assert admin(port, "GET", "/v1/webhooks", "wrong-" + admin_token)[0] == 401
        # a secret in a refused query parameter reaches neither the answer's log line nor others
        assert admin(port, "GET", f"/v1/webhooks?api_key={key}", admin_token)[0] == 400
        sim.advance(900)
        wait_until(lambda: _Hook.count > 30, 60, "webhook deliveries")
        assert relay.stop() == 0

        relay = start("json")
        sim.advance(900)
        wait_until(lambda: _Hook.count > 60, 60, "more webhook deliveries")
        script = [
            {"status": 401, "error_message": f"invalid credentials: api_key={key} token {token}"}
        ] * 20
        sim.post("/_sim/faults", {"reset": True, "script": script})
        sim.advance(900)
        wait_until(lambda: '"account.paused"' in relay.output(), 60, "the upstream 401")
        assert relay.stop() == 0
    finally:
        for proc in relays:
            proc.kill()
        sim.kill()
    text = "".join(proc.output() for proc in relays)
    assert "credentials rejected" in text, "the 401 was logged"
    assert "webhook.attempt_failed" in text, "failed deliveries were logged"
    assert "api.unauthorized" in text, "the bad admin token was logged"
    for secret in (key, token, admin_token, hook_secret, api_secret, *leaked_by_api):
        for form in encodings(secret):
            assert form not in text, f"a form of a configured secret leaked: {form[:6]}…"
