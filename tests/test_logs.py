"""Log set-up: redaction of secrets on every path, JSON rendering off a TTY."""

from __future__ import annotations

import io
import logging

import orjson
import structlog

from relay import logs


def test_configured_secrets_and_secret_shapes_are_redacted() -> None:
    """Known secrets, api_key= values, bearer tokens and whsec_ secrets never reach the output."""
    out = io.StringIO()
    logs.configure("debug", "json", secrets=["key-abc123", "tok-xyz789"], stream=out)
    log = structlog.get_logger("t")
    log.info(
        "request",
        url="https://api.example.com/v2/contacts?api_key=other-key&limit=5",
        headers={"Authorization": "Bearer tok-xyz789"},
        note=["key-abc123 leaked", ("nested", "whsec_c2VjcmV0c2VjcmV0")],
        error=ValueError("bad key-abc123"),
    )
    text = out.getvalue()
    for secret in ("key-abc123", "tok-xyz789", "other-key", "whsec_c2VjcmV0"):
        assert secret not in text
    line = orjson.loads(text.splitlines()[-1])
    assert line["url"].endswith("api_key=***&limit=5")
    assert line["event"] == "request"


def test_stdlib_logging_of_libraries_is_redacted_too() -> None:
    """Records logged by libraries through the logging module are scrubbed as well."""
    out = io.StringIO()
    logs.configure("info", "json", secrets=["key-abc123"], stream=out)
    logging.getLogger("aiohttp.client").warning("GET %s failed", "/v2?api_key=key-abc123")
    assert "key-abc123" not in out.getvalue()
    assert "api_key=***" in out.getvalue()


def test_level_filters_debug() -> None:
    """At level info, debug lines are not written."""
    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    structlog.get_logger("t").debug("hidden")
    assert out.getvalue() == ""
