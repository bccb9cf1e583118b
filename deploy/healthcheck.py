"""Container health check for ctct-relay: exit 0 when the admin API's ``/healthz`` says ok.

The image's ``HEALTHCHECK`` runs this with the venv's Python, so the image needs no curl. Standard
library only. Exit codes follow Docker's convention: 0 healthy, 1 unhealthy (with one line on
stderr saying why). ``/healthz`` is unauthenticated, so no token is needed or sent.

    python healthcheck.py [--url http://127.0.0.1:8081/healthz] [--timeout-s 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from urllib.parse import urlsplit

DEFAULT_URL = "http://127.0.0.1:8081/healthz"


def check(url: str, timeout_s: float) -> str | None:
    """None when healthy, else why not."""
    if urlsplit(url).scheme not in {"http", "https"}:
        return f"--url must be http(s), got {url!r}"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - scheme checked
            status, body = resp.status, resp.read(4096)
    except urllib.error.HTTPError as exc:
        return f"{url} answered HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return f"{url} not reachable: {reason}"
    if status != 200:
        return f"{url} answered HTTP {status}"
    try:
        answer = json.loads(body)
    except ValueError:
        return f"{url} answered 200 without a JSON body"
    if not isinstance(answer, dict) or answer.get("status") != "ok":
        return f"{url} answered 200 but not status ok: {body[:200]!r}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Exit 0 when ctct-relay's /healthz says ok.")
    parser.add_argument("--url", default=DEFAULT_URL, help="health URL (%(default)s)")
    parser.add_argument("--timeout-s", type=float, default=3.0, help="seconds (%(default)s)")
    args = parser.parse_args(argv)
    problem = check(args.url, args.timeout_s)
    if problem is not None:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
