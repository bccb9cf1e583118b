"""The kafka section's numbers: each refused outside what Kafka carries, the error naming the
key and the whole allowed range."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from relay.config import ConfigError, load
from tests.test_config import MINIMAL, write


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        pytest.param("linger_ms", "-1", "an integer >= 0 and <= 2147483647", id="linger-negative"),
        pytest.param("linger_ms", "2147483648", "an integer >= 0 and <= 2147483647", id="linger"),
        pytest.param("max_batch_bytes", "0", "an integer >= 1 and <= 2147483647", id="batch-0"),
        pytest.param("max_batch_bytes", "-5", "an integer >= 1 and <= 2147483647", id="batch-neg"),
        pytest.param("max_batch_bytes", "2147483648", "an integer >= 1 and <= 2147483647", id="b"),
        pytest.param("request_timeout_s", "0", "a number >= 0.001 and <= 2147483", id="rto-0"),
        pytest.param("request_timeout_s", "-1", "a number >= 0.001 and <= 2147483", id="rto-neg"),
        pytest.param(
            "request_timeout_s", "0.0001", "a number >= 0.001 and <= 2147483", id="rto-sub-ms"
        ),
        pytest.param(
            "request_timeout_s", "0.0009", "a number >= 0.001 and <= 2147483", id="rto-0.9ms"
        ),
    ],
)
def test_out_of_range_values_name_the_key_and_the_range(
    tmp_path: Path, key: str, value: str, allowed: str
) -> None:
    """Zero, negative, beyond int32, and a request timeout under a millisecond (it became
    request_timeout_ms 0: every request timed out at once, retried for ever) stop the load."""
    text = MINIMAL + f"kafka: {{bootstrap_servers: b, {key}: {value}}}\n"
    expected = rf"kafka\.{key}: expected {re.escape(allowed)}, got {re.escape(value)}$"
    with pytest.raises(ConfigError, match=expected):
        load(write(tmp_path, text), environ={"KEY": "k"})


@pytest.mark.parametrize("value", ["0", "1", "377", "1023"])
def test_a_request_limit_no_event_fits_is_refused_with_the_reason(
    tmp_path: Path, value: str
) -> None:
    """max_request_bytes under 1024 (1 loaded, then every event was dead-lettered as too
    large: the smallest is ~380 bytes as a record) stops the load, saying why."""
    text = MINIMAL + f"kafka: {{bootstrap_servers: b, max_request_bytes: {value}}}\n"
    expected = (
        rf"kafka\.max_request_bytes: expected an integer >= 1024 and <= 2147483647, got {value}"
        r" \(every event is a few hundred bytes as a Kafka record: a smaller limit dead-letters"
        r" them all as too large\)$"
    )
    with pytest.raises(ConfigError, match=expected):
        load(write(tmp_path, text), environ={"KEY": "k"})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("linger_ms", "0"),
        ("linger_ms", "2147483647"),
        ("max_batch_bytes", "1"),
        ("max_request_bytes", "1024"),
        ("max_request_bytes", "2147483647"),
        ("request_timeout_s", "0.001"),
        ("request_timeout_s", "2147483"),
    ],
)
def test_the_ends_of_each_range_load(tmp_path: Path, key: str, value: str) -> None:
    """Both bounds are allowed values; a 1 ms request timeout reaches aiokafka as 1, not 0."""
    text = MINIMAL + f"kafka: {{bootstrap_servers: b, {key}: {value}}}\n"
    settings = load(write(tmp_path, text), environ={"KEY": "k"}).kafka
    assert settings is not None
    assert getattr(settings, key) == float(value)
    timeout_ms = settings.client_options()["request_timeout_ms"]
    assert isinstance(timeout_ms, int)
    assert timeout_ms >= 1
