"""Configuration loading: interpolation, overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config import ConfigError, Secret, load

EXAMPLE = Path(__file__).parent.parent / "config" / "relay.example.yaml"

MINIMAL = """
accounts:
  - name: acme
    base_url: https://api.example.com
    api_key: ${KEY}
    access_token: tok-${TOKEN_SUFFIX:-default}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relay.yaml"
    path.write_text(text)
    return path


def test_example_config_loads_with_every_default() -> None:
    """The documented example is valid as shipped."""
    settings = load(EXAMPLE, environ={})
    account = settings.accounts[0]
    assert account.name == "demo"
    assert account.budget.requests_per_second == 4
    assert account.budget.daily_allowance == 9000
    assert settings.http.retry.max_attempts == 5


def test_unknown_keys_are_refused(tmp_path: Path) -> None:
    """A key the loader does not read is an error, so a typo never passes silently."""
    text = EXAMPLE.read_text().replace("  level: info", "  level: info\n  colour: blue")
    with pytest.raises(ConfigError, match=r"logging: unknown key\(s\) colour"):
        load(write(tmp_path, text), environ={})


def test_env_interpolation_and_defaults(tmp_path: Path) -> None:
    """${NAME} is replaced from the environment, ${NAME:-x} falls back to x."""
    settings = load(write(tmp_path, MINIMAL), environ={"KEY": "k-123"})
    assert settings.accounts[0].api_key.reveal() == "k-123"
    assert settings.accounts[0].access_token.reveal() == "tok-default"


def test_missing_env_var_names_key_and_variable(tmp_path: Path) -> None:
    """An unset ${NAME} is an error naming the key and the variable."""
    with pytest.raises(ConfigError, match=r"accounts\[0\]\.api_key: environment variable KEY"):
        load(write(tmp_path, MINIMAL), environ={})


def test_environment_overrides_any_key(tmp_path: Path) -> None:
    """CTCT_RELAY_… variables override nested keys and list items, parsed as YAML scalars."""
    env = {
        "KEY": "k",
        "CTCT_RELAY_HTTP__TIMEOUT_S": "7.5",
        "CTCT_RELAY_ACCOUNTS__0__RATE_LIMIT__REQUESTS_PER_SECOND": "2",
        "CTCT_RELAY_LOGGING__LEVEL": "debug",
    }
    settings = load(write(tmp_path, MINIMAL), environ=env)
    assert settings.http.timeout_s == 7.5
    assert settings.accounts[0].budget.requests_per_second == 2
    assert settings.logging.level == "debug"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("accounts: []", "accounts: at least one account", id="no-accounts"),
        pytest.param("accounts: 5", "accounts: expected a list", id="accounts-not-list"),
        pytest.param(
            MINIMAL.replace("https://api.example.com", "ftp://x"),
            r"accounts\[0\]\.base_url: expected an http\(s\) URL",
            id="bad-url",
        ),
        pytest.param(
            MINIMAL + "    rate_limit: {requests_per_second: fast}",
            r"accounts\[0\]\.rate_limit\.requests_per_second: expected a number > 0, got 'fast'",
            id="bad-number",
        ),
        pytest.param(
            MINIMAL + "    rate_limit: {reserved_share: 1.5}",
            r"reserved_share: expected a number >= 0 and <= 0.99",
            id="share-too-big",
        ),
        pytest.param(
            MINIMAL + "logging: {format: xml}",
            "logging.format: expected one of auto, json, console",
            id="bad-choice",
        ),
        pytest.param(MINIMAL + "kafak: {}", r"top level: unknown key\(s\) kafak", id="typo"),
        pytest.param("accounts: [\n  - name: [", "not valid YAML at line", id="yaml-syntax"),
        pytest.param("- 1\n- 2", "top level must be a mapping", id="not-mapping"),
    ],
)
def test_bad_config_names_the_problem(tmp_path: Path, text: str, message: str) -> None:
    """Each malformed config is refused with a message naming the key and the problem."""
    with pytest.raises(ConfigError, match=message):
        load(write(tmp_path, text), environ={"KEY": "k"})


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    """A config path that does not exist says so."""
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(tmp_path / "nope.yaml", environ={})


def test_secrets_never_render() -> None:
    """repr and str of a Secret and of settings holding one never show the value."""
    secret = Secret("s3cr3t-value")
    assert "s3cr3t" not in repr(secret)
    assert "s3cr3t" not in str(secret)
    settings = load(EXAMPLE, environ={"CTCT_API_KEY": "s3cr3t-value"})
    assert "s3cr3t" not in repr(settings)
