"""deploy/healthcheck.py as Docker runs it: a subprocess whose exit code is the verdict."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.deploy.files import HEALTHCHECK
from tests.procs import free_port


class _Canned(BaseHTTPRequestHandler):
    """Answers every GET with the server's canned status and body; records the paths asked."""

    server: _Server

    def do_GET(self) -> None:
        self.server.paths.append(self.path)
        self.send_response(self.server.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.server.body)))
        self.end_headers()
        self.wfile.write(self.server.body)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: pytest shows the assertion, not the access log."""


class _Server(ThreadingHTTPServer):
    status = 200
    body = b'{"status": "ok"}'
    paths: list[str]


@pytest.fixture
def server() -> Iterator[_Server]:
    """A real HTTP server on 127.0.0.1 with a canned answer."""
    httpd = _Server(("127.0.0.1", 0), _Canned)
    httpd.paths = []
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def run_check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def url(server: _Server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/healthz"


def test_ok_is_healthy(server: _Server) -> None:
    """200 with {"status": "ok"} exits 0, silently, after asking /healthz."""
    result = run_check("--url", url(server))
    assert (result.returncode, result.stderr) == (0, "")
    assert server.paths == ["/healthz"]


@pytest.mark.parametrize(
    ("status", "body", "says"),
    [
        pytest.param(503, b'{"status": "down"}', "HTTP 503", id="503"),
        pytest.param(200, b"<html>ok</html>", "without a JSON body", id="not-json"),
        pytest.param(200, b'{"status": "starting"}', "not status ok", id="wrong-status"),
    ],
)
def test_anything_else_is_unhealthy(server: _Server, status: int, body: bytes, says: str) -> None:
    """A non-200 answer or a 200 that is not the relay's ok exits 1 and says why."""
    server.status, server.body = status, body
    result = run_check("--url", url(server))
    assert result.returncode == 1
    assert says in result.stderr
    assert result.stderr.startswith("unhealthy: ")


def test_nothing_listening_is_unhealthy() -> None:
    """A refused connection exits 1 naming the URL."""
    target = f"http://127.0.0.1:{free_port()}/healthz"
    result = run_check("--url", target, "--timeout-s", "2")
    assert result.returncode == 1
    assert f"{target} not reachable" in result.stderr


def test_only_http_urls() -> None:
    """A file:// URL is refused rather than read."""
    result = run_check("--url", "file:///etc/passwd")
    assert result.returncode == 1
    assert "must be http(s)" in result.stderr
