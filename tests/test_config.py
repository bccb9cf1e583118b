"""Configuration loading: interpolation, overrides, and errors that name the key."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relay.config import ConfigError, Secret, Settings, from_mapping, load
from relay.store import PostgresStore, StoreError

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


def load_error(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> str:
    """The message of the ConfigError that loading ``text`` raises (in ``environ``, by default
    one that sets only KEY)."""
    with pytest.raises(ConfigError) as caught:
        load(write(tmp_path, text), environ={"KEY": "k"} if environ is None else environ)
    return str(caught.value)


def test_example_config_loads_with_every_default() -> None:
    """The documented example is valid as shipped."""
    settings = load(EXAMPLE, environ={})
    account = settings.accounts[0]
    assert account.name == "demo"
    assert account.budget.requests_per_second == 4
    assert account.budget.daily_allowance == 9000
    assert settings.http.retry.max_attempts == 5
    assert settings.outbox_retention_h == 168


def test_the_breaker_settings_load_and_a_cap_below_the_first_pause_is_refused(
    tmp_path: Path,
) -> None:
    """http.breaker_* reach the settings (0 failures: never opens); a max_open_s below
    open_s names both keys."""
    text = MINIMAL + "http: {breaker_failures: 0, breaker_open_s: 5, breaker_max_open_s: 60}\n"
    breaker = load(write(tmp_path, text), environ={"KEY": "k"}).http.breaker
    assert (breaker.failures, breaker.open_s, breaker.max_open_s) == (0, 5, 60)
    assert load(EXAMPLE, environ={}).http.breaker.failures == 10
    text = MINIMAL + "http: {breaker_open_s: 600, breaker_max_open_s: 60}\n"
    with pytest.raises(
        ConfigError, match=r"http\.breaker_max_open_s: 60 is shorter than http\.breaker_open_s"
    ):
        load(write(tmp_path, text), environ={"KEY": "k"})


def test_unknown_keys_are_refused(tmp_path: Path) -> None:
    """A key the loader does not read is an error, so a typo never passes silently."""
    text = EXAMPLE.read_text().replace("  level: info", "  level: info\n  colour: blue")
    with pytest.raises(ConfigError, match=r"logging: unknown key\(s\) colour"):
        load(write(tmp_path, text), environ={})


@pytest.mark.parametrize(
    ("key", "shown"),
    [
        pytest.param("~", "null", id="null"),
        pytest.param("true", "true", id="bool"),
        pytest.param("3", "3", id="int"),
    ],
)
def test_unknown_keys_are_named_as_yaml_writes_them(tmp_path: Path, key: str, shown: str) -> None:
    """An unknown key YAML reads as null, a bool or a number is named as written, not as Python
    prints it (``None``, ``True``)."""
    text = EXAMPLE.read_text().replace("  level: info", f"  level: info\n  {key}: 1")
    with pytest.raises(ConfigError, match=rf"logging: unknown key\(s\) {shown}$"):
        load(write(tmp_path, text), environ={})


def test_env_interpolation_and_defaults(tmp_path: Path) -> None:
    """${NAME} is replaced from the environment, ${NAME:-x} falls back to x."""
    settings = load(write(tmp_path, MINIMAL), environ={"KEY": "k-123"})
    assert settings.accounts[0].api_key.reveal() == "k-123"
    assert settings.accounts[0].access_token.reveal() == "tok-default"


def test_every_account_polls_knowing_the_dedup_retention(tmp_path: Path) -> None:
    """Pollers leave out re-read activity older than the dedup keys kept (poll.dedup_retention_h),
    so every account's poll settings carry it, per-account overrides included."""
    text = "poll: {dedup_retention_h: 48}\n" + MINIMAL + "    poll: {overlap_s: 900}\n"
    settings = load(write(tmp_path, text), environ={"KEY": "k"})
    assert settings.dedup_retention_h == 48
    assert settings.accounts[0].poll.dedup_retention_s == 48 * 3600
    assert settings.accounts[0].poll.overlap_s == 900


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("${SET}", "v", id="plain"),
        pytest.param("${EMPTY}", "", id="plain-empty"),
        pytest.param("${UNSET:-d}", "d", id="colon-dash-unset"),
        pytest.param("${EMPTY:-d}", "d", id="colon-dash-empty"),
        pytest.param("${SET:-d}", "v", id="colon-dash-set"),
        pytest.param("${UNSET-d}", "d", id="dash-unset"),
        pytest.param("${EMPTY-d}", "", id="dash-empty"),
        pytest.param("${UNSET:-}", "", id="empty-default"),
        pytest.param("${SET:?needed}", "v", id="colon-question-set"),
        pytest.param("${EMPTY?needed}", "", id="question-empty"),
        pytest.param("a-${SET}-${SET}-b", "a-v-v-b", id="several"),
        pytest.param("$${SET}", "${SET}", id="escaped"),
        pytest.param("$$${SET}", "$v", id="dollar-then-reference"),
        pytest.param("$$$${SET}", "$${SET}", id="two-escaped-dollars"),
        pytest.param("pa$$word-${SET}", "pa$$word-v", id="dollars-elsewhere-as-written"),
        pytest.param("$SET-${SET}-$", "$SET-v-$", id="bare-dollar"),
        pytest.param("${UNSET:-a:b-c?d$e}", "a:b-c?d$e", id="default-text"),
    ],
)
def test_env_reference_forms(tmp_path: Path, value: str, expected: str) -> None:
    """The forms of Docker Compose and POSIX shells: ${NAME}, ${NAME:-x} (unset or empty),
    ${NAME-x} (unset), ${NAME:?m}/${NAME?m}; $${ is a literal ${, any other $ is text."""
    text = MINIMAL + f"admin: {{host: 127.0.0.1, token: '0123456789abcdef{value}'}}\n"
    env = {"KEY": "k", "SET": "v", "EMPTY": ""}
    settings = load(write(tmp_path, text), environ=env)
    assert settings.admin.token == f"0123456789abcdef{expected}"


@pytest.mark.parametrize(
    ("value", "env", "problem"),
    [
        pytest.param(
            "${CTCT_RELAY_ADMIN_TOKEN:?required}",
            {},
            "environment variable CTCT_RELAY_ADMIN_TOKEN is not set: required",
            id="colon-question-unset",
        ),
        pytest.param(
            "${CTCT_RELAY_ADMIN_TOKEN:?set it to the admin API token}",
            {"CTCT_RELAY_ADMIN_TOKEN": ""},
            "environment variable CTCT_RELAY_ADMIN_TOKEN is empty: set it to the admin API token",
            id="colon-question-empty",
        ),
        pytest.param(
            "${CTCT_RELAY_ADMIN_TOKEN?required}",
            {},
            "environment variable CTCT_RELAY_ADMIN_TOKEN is not set: required",
            id="question-unset",
        ),
        pytest.param(
            "${CTCT_RELAY_ADMIN_TOKEN:?}",
            {},
            "environment variable CTCT_RELAY_ADMIN_TOKEN is not set",
            id="no-message",
        ),
    ],
)
def test_required_reference_names_key_variable_and_message(
    tmp_path: Path, value: str, env: dict[str, str], problem: str
) -> None:
    """`admin.token: ${CTCT_RELAY_ADMIN_TOKEN:?required}` (deploy/docker-compose.yml's syntax)
    with the variable unset was kept as text: the relay listened on 0.0.0.0 with that literal
    string as its admin token. It is an error naming the key, the variable and the message."""
    text = MINIMAL + f"admin: {{host: 0.0.0.0, token: '{value}'}}\n"
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load(path, environ={"KEY": "k", **env})
    assert str(caught.value) == f"{path}: admin.token: {problem}"


_NOT_A_NAME = (
    "a reference not starting with a variable name (a letter or _, then letters, digits or _)"
)


@pytest.mark.parametrize(
    ("reference", "problem"),
    [
        pytest.param("${CTCT_API_KEY", "a ${ without its closing }", id="unclosed"),
        pytest.param("${1BAD}", _NOT_A_NAME, id="digit"),
        pytest.param("${}", "an empty reference ${}", id="empty"),
        pytest.param("${-x}", _NOT_A_NAME, id="no-name"),
        pytest.param(
            "${CTCT_API_KEY:+alt}",
            "a reference with something other than }, :-, -, :? or ? after the name",
            id="unsupported-operator",
        ),
        pytest.param(
            "${CTCT_API_KEY:-${OTHER}}",
            "a reference inside another (nesting is not supported)",
            id="nested",
        ),
    ],
)
def test_malformed_references_are_errors_naming_the_key(
    tmp_path: Path, reference: str, problem: str
) -> None:
    """`${CTCT_API_KEY` (unclosed), `${1BAD}` and `${}` were kept as literal text, secrets
    included. Each is an error naming the key's path and what is wrong; a secret key's text is
    not shown, another key's reference is."""
    env = {"KEY": "k", "CTCT_API_KEY": "from-env", "OTHER": "o"}
    secret = MINIMAL.replace("${KEY}", f"sk-live-4411{reference}")
    message = load_error(tmp_path, secret, env)
    assert f": accounts[0].api_key: {problem}; the value of a secret is not shown (" in message
    assert "sk-live-4411" not in message
    assert "CTCT_API_KEY" not in message
    assert "supported: ${NAME}, ${NAME:-default}, ${NAME-default}" in message

    text = MINIMAL + f"logging: {{level: 'info{reference}'}}\n"
    with pytest.raises(ConfigError) as caught:
        load(write(tmp_path, text), environ=env)
    shown = (
        reference
        if problem != "a reference inside another (nesting is not supported)"
        else ("${CTCT_API_KEY:-${OTHER}")
    )
    assert f": logging.level: {problem} in {shown!r} (supported: " in str(caught.value)


def test_the_example_documents_every_reference_form() -> None:
    """The example file's header lists every form the loader takes."""
    header = EXAMPLE.read_text().split("\n\n", 1)[0]
    for form in ("${NAME}", "${NAME:-default}", "${NAME-default}", "${NAME:?message}"):
        assert form in header
    assert "${NAME?message}" in header
    assert "$${" in header


def test_missing_env_var_names_key_and_variable(tmp_path: Path) -> None:
    """An unset ${NAME} is an error naming the file, as every other one does, the key and the
    variable."""
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError) as caught:
        load(path, environ={})
    assert str(caught.value) == (
        f"{path}: accounts[0].api_key: environment variable KEY is not set"
    )


def test_environment_overrides_any_key(tmp_path: Path) -> None:
    """CTCT_RELAY_… variables override nested keys and list items."""
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


def test_other_commands_variables_are_not_overrides(tmp_path: Path) -> None:
    """The CLI's admin token and dev-kafka's jar cache variables do not break loading the config."""
    env = {"KEY": "k", "CTCT_RELAY_ADMIN_TOKEN": "t0k", "CTCT_RELAY_KAFKA_CACHE": str(tmp_path)}
    settings = load(write(tmp_path, MINIMAL), environ=env)
    assert settings.accounts[0].name


def test_unknown_override_names_its_variable(tmp_path: Path) -> None:
    """A misspelt CTCT_RELAY_ variable is an error that names the unknown key and the variable,
    not the file, which has no such key."""
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError) as caught:
        load(path, environ={"KEY": "k", "CTCT_RELAY_HTTPP__TIMEOUT_S": "1"})
    message = str(caught.value)
    assert message.startswith(
        "top level: unknown key(s) httpp (from CTCT_RELAY_HTTPP__TIMEOUT_S); every CTCT_RELAY_*"
        " variable sets a config key"
    ), message
    assert str(path) not in message
    assert caught.value.environment


def test_kubernetes_service_links_name_their_variables(tmp_path: Path) -> None:
    """A Service named ctct-relay gives every pod of the namespace CTCT_RELAY_SERVICE_HOST,
    CTCT_RELAY_PORT_8081_TCP, … (unless enableServiceLinks is false). The relay stopped with
    "relay.yaml: top level: unknown key(s) port, …", blaming the file; each key now names the
    variable that set it, and the message says where such variables come from."""
    env = {
        "KEY": "k",
        "CTCT_RELAY_SERVICE_HOST": "10.96.12.34",
        "CTCT_RELAY_SERVICE_PORT": "8081",
        "CTCT_RELAY_PORT": "tcp://10.96.12.34:8081",
        "CTCT_RELAY_PORT_8081_TCP_ADDR": "10.96.12.34",
    }
    message = load_error(tmp_path, MINIMAL, env)
    assert message.startswith(
        "top level: unknown key(s) port (from CTCT_RELAY_PORT), port_8081_tcp_addr (from"
        " CTCT_RELAY_PORT_8081_TCP_ADDR), service_host (from CTCT_RELAY_SERVICE_HOST),"
        " service_port (from CTCT_RELAY_SERVICE_PORT)"
    ), message
    assert "enableServiceLinks: false" in message


@pytest.mark.parametrize(
    ("extra", "env", "message"),
    [
        pytest.param(
            "",
            {"CTCT_RELAY_HTTP__TIMEOUTS": "5"},
            r"^http: unknown key\(s\) timeouts \(from CTCT_RELAY_HTTP__TIMEOUTS\);",
            id="in-a-section",
        ),
        pytest.param(
            "http: {timeout_s: 3}\n",
            {"CTCT_RELAY_HTTP": "{timeout: 5}"},
            r"^http: unknown key\(s\) timeout \(from CTCT_RELAY_HTTP\);",
            id="in-a-flow-mapping",
        ),
        pytest.param(
            "",
            {"CTCT_RELAY_ACCOUNTS__0__POLL__OVERLAPS": "5"},
            r"^accounts\[0\]\.poll: unknown key\(s\) overlaps \(from"
            r" CTCT_RELAY_ACCOUNTS__0__POLL__OVERLAPS\);",
            id="in-a-list-item",
        ),
        pytest.param(
            "    campaing: {}\n",
            {"CTCT_RELAY_ACCOUNTS__0__CONTACT": "[1]"},
            r"/relay\.yaml: accounts\[0\]: unknown key\(s\) campaing, contact \(from"
            r" CTCT_RELAY_ACCOUNTS__0__CONTACT\);",
            id="file-and-variable",
        ),
    ],
)
def test_unknown_keys_are_named_with_their_source(
    tmp_path: Path, extra: str, env: dict[str, str], message: str
) -> None:
    """A key a variable set is named with the variable, wherever it lands; the file is named
    only when one of the unknown keys is written in it."""
    with pytest.raises(ConfigError, match=message):
        load(write(tmp_path, MINIMAL + extra), environ={"KEY": "k", **env})


def test_unknown_keys_of_mixed_types_are_listed(tmp_path: Path) -> None:
    """An integer key beside a misspelt one crashed the loader with a TypeError in sorted()."""
    text = MINIMAL + "    8080: oops\n    campaing: {discover: true}\n"
    with pytest.raises(ConfigError, match=r"accounts\[0\]: unknown key\(s\) 8080, campaing$"):
        load(write(tmp_path, text), environ={"KEY": "k"})


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
            MINIMAL
            + "webhooks: {declared: [{url: 'https://x.example/h', rate_limit_per_s: 1e-9}]}",
            r"webhooks\.declared\[0\]\.rate_limit_per_s: expected a number >= 1\.15741e-05"
            r" and <= 100000, got '1e-9'",
            id="declared-rate-too-slow",
        ),
        pytest.param(
            MINIMAL + "webhooks: {max_webhooks: 0}",
            r"webhooks\.max_webhooks: expected an integer >= 1 and <= 10000, got 0",
            id="max-webhooks-zero",
        ),
        pytest.param(
            MINIMAL + "webhooks: {max_webhooks: 1, declared: [{url: 'https://x.example/h'},"
            " {url: 'https://y.example/h'}]}",
            r"webhooks\.declared: 2 webhooks declared, more than webhooks\.max_webhooks \(1\)"
            " allows",
            id="declared-beyond-max-webhooks",
        ),
        pytest.param(
            MINIMAL + "    rate_limit: {reserved_share: 1.5}",
            r"reserved_share: expected a number >= 0 and <= 0.99",
            id="share-too-big",
        ),
        pytest.param(
            MINIMAL + "    poll: {overlap_s: 360000}",
            r"poll\.dedup_retention_h: must be longer than twice accounts\[0\]\.poll\.overlap_s"
            r" \(168 h against 360000 s\)",
            id="account-overlap-past-retention",
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


def test_max_webhooks_defaults_to_100_and_reaches_the_admin_api(tmp_path: Path) -> None:
    """webhooks.max_webhooks: 100 unless set; the admin API enforces it (its settings)."""
    assert load(write(tmp_path, MINIMAL), environ={"KEY": "k"}).admin.max_webhooks == 100
    text = MINIMAL + "webhooks: {max_webhooks: 250}"
    assert load(write(tmp_path, text), environ={"KEY": "k"}).admin.max_webhooks == 250


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    """A config path that does not exist says so."""
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(tmp_path / "nope.yaml", environ={})


def test_an_empty_path_says_it_is_empty() -> None:
    """An empty config path (``--config ""``) says so; it read as the directory ".": "cannot
    read config file: Is a directory"."""
    with pytest.raises(ConfigError, match=r"^config file: the path is empty \(expected"):
        load("", environ={})


def test_secrets_never_render() -> None:
    """repr and str of a Secret and of settings holding one never show the value."""
    secret = Secret("s3cr3t-value")
    assert "s3cr3t" not in repr(secret)
    assert "s3cr3t" not in str(secret)
    settings = load(EXAMPLE, environ={"CTCT_API_KEY": "s3cr3t-value"})
    assert "s3cr3t" not in repr(settings)


def _paths(node: object, prefix: str = "") -> set[str]:
    """Key paths of a YAML tree, list indexes folded to []."""
    if isinstance(node, dict):
        out = set()
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            out |= {path} | _paths(value, path)
        return out
    if isinstance(node, list):
        return set().union(*(_paths(v, f"{prefix}[]") for v in node)) if node else set()
    return set()


def test_every_key_the_loader_reads_is_documented(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading records each key path the loader asks for; all of them are in the example."""
    import re

    import yaml

    from relay import config as cfg

    asked: set[str] = set()
    original = cfg._Reader._get

    def spy(self: cfg._Reader, name: str) -> object:
        asked.add(re.sub(r"\[\d+\]", "[]", self.key(name)))
        return original(self, name)

    monkeypatch.setattr(cfg._Reader, "_get", spy)
    load(EXAMPLE, environ={})
    documented = _paths(yaml.safe_load(EXAMPLE.read_text()))
    # per-account poll overrides take the keys of the documented top-level poll section
    asked = {p.replace("accounts[].poll.", "poll.") for p in asked}
    assert asked - documented == set()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        pytest.param("kafka: {}", "kafka.bootstrap_servers: required", id="kafka-no-servers"),
        pytest.param(
            "kafka: {bootstrap_servers: b:9092, topic: 'x.{topic}'}",
            r"kafka.topic: only \{kind\}",
            id="kafka-bad-template",
        ),
        pytest.param(
            "kafka: {bootstrap_servers: b:9092, topic: 'bad topic/{kind}'}",
            r"kafka.topic: 'bad topic/send' is not a Kafka topic name",
            id="kafka-topic-name",
        ),
        pytest.param(
            "kafka: {bootstrap_servers: b:9092, topic: 'ctct.{kind:>10}'}",
            r"kafka.topic: 'ctct.      send' is not a Kafka topic name",
            id="kafka-topic-format-spec",
        ),
        pytest.param(
            "kafka: {bootstrap_servers: b:9092, security: {protocol: SASL_SSL}}",
            "kafka.security.username: required",
            id="sasl-needs-user",
        ),
        pytest.param(
            "kafka: {bootstrap_servers: b:9092, security: {ssl_cafile: /nope.pem}}",
            "kafka.security.ssl_cafile: no such file",
            id="missing-ca",
        ),
        pytest.param(
            "poll: {kinds: [click, spam]}", "poll.kinds: expected a non-empty list", id="kind"
        ),
        pytest.param(
            "poll: {start_from: yesterday}", "poll.start_from: expected now, earliest", id="start"
        ),
        pytest.param(
            "poll: {overlap_s: 3600, dedup_retention_h: 1}",
            "poll.dedup_retention_h: must be longer",
            id="retention",
        ),
        pytest.param(
            "schedule: {min_interval_s: 100, max_interval_s: 10}",
            "schedule.min_interval_s: must not exceed",
            id="intervals",
        ),
        pytest.param("state: mysql://x/y", "state: expected sqlite", id="state"),
        pytest.param(
            "state: 'postgresql://u:pw-zz@db:5432'",
            r"state: the PostgreSQL URL names no database \(expected"
            r" postgresql://user:password@host:port/database\), got 'postgresql://…@db:5432'$",
            id="state-no-database",
        ),
        pytest.param(
            "state: 'postgresql://db:54x2/relay'",
            r"state: the port is not a number from 1 to 65535 .*, got 'postgresql://db:54x2/relay'$",
            id="state-bad-port",
        ),
        pytest.param(
            "state: 'sqlite:///'",
            r"state: expected sqlite:///path/to/state\.db \(the path of a database file\),"
            r" got 'sqlite:///'$",
            id="sqlite-no-path",
        ),
        pytest.param(
            "state: 'sqlite:////'",
            r"state: expected sqlite:///.*, got 'sqlite:////'$",
            id="sqlite-root",
        ),
        pytest.param(
            "state: 'sqlite://relay.db'",
            r"state: expected sqlite:///.*, got 'sqlite://relay.db'$",
            id="sqlite-two-slashes",
        ),
        pytest.param(
            "postgres: {pool_max_size: 0}",
            "postgres.pool_max_size: expected an integer >= 1",
            id="pool",
        ),
        pytest.param(
            "postgres: {pool_min_size: 20}",
            "postgres.pool_min_size: expected an integer >= 0 and <= 10",
            id="pool-min",
        ),
        pytest.param(
            "postgres: {lease_s: 0.5}", "postgres.lease_s: expected a number >= 1", id="lease"
        ),
        pytest.param("postgres: {poolsize: 3}", "postgres: unknown key", id="pg-unknown"),
        pytest.param(
            "outbox_retention_h: -1", "outbox_retention_h: expected a number >= 0", id="outbox"
        ),
    ],
)
def test_pipeline_sections_name_the_problem(tmp_path: Path, extra: str, message: str) -> None:
    """Kafka, poll, schedule and state errors name the key."""
    with pytest.raises(ConfigError, match=message):
        load(write(tmp_path, MINIMAL + extra), environ={"KEY": "k"})


def test_kafka_password_is_a_secret(tmp_path: Path) -> None:
    """The SASL password joins the secrets that log redaction scrubs."""
    text = MINIMAL + (
        "kafka: {bootstrap_servers: 'b:9092', security: {protocol: SASL_PLAINTEXT,"
        " username: u, password: kafka-pw-123}}"
    )
    settings = load(write(tmp_path, text), environ={"KEY": "k"})
    assert "kafka-pw-123" in settings.secrets()
    assert "kafka-pw-123" not in repr(settings)


def test_postgresql_state_and_its_settings(tmp_path: Path) -> None:
    """A postgresql:// state is accepted with its pool and lease settings; the password is a
    secret for log redaction and never shown."""
    text = MINIMAL + (
        "state: 'postgresql://relay:pg-secret-9@db.internal:5433/relay'\n"
        "postgres: {pool_max_size: 4, statement_timeout_s: 5, lease_s: 6, request_margin_s: 0.2}\n"
    )
    settings = load(write(tmp_path, text), environ={"KEY": "k"})
    assert settings.state.startswith("postgresql://")
    assert settings.postgres.pool_max_size == 4
    assert settings.postgres.statement_timeout_s == 5
    assert settings.postgres.lease_s == 6
    assert settings.postgres.request_margin_s == 0.2
    assert "pg-secret-9" in settings.secrets()


def test_a_password_in_the_state_urls_query_is_a_secret(tmp_path: Path) -> None:
    """asyncpg takes `?password=` and `?sslpassword=` too: they are scrubbed from logs as the
    user info's password is (only that one was)."""
    url = "postgresql://relay@db.internal/relay?password=q-secret-1&sslpassword=q-secret-2"
    settings = load(write(tmp_path, MINIMAL + f"state: '{url}'\n"), environ={"KEY": "k"})
    assert {"q-secret-1", "q-secret-2"} <= set(settings.secrets())


_BAD_STATE_URLS = [
    pytest.param(
        "postgresql://relay:pg-secret-9@db.internal:5432/relay?sslmode=bogus",
        "sslmode must be one of disable, allow, prefer, require, verify-ca, verify-full, got"
        " 'postgresql://…@db.internal:5432/relay?sslmode=***'",
        id="sslmode",
    ),
    pytest.param(
        "postgresql://relay:pg-secret-9@ho st/relay",
        "'ho st' is not a valid host name (an IP address, or labels of 1 to 63 letters, digits,"
        " '-' or '_' separated by single dots), got 'postgresql://…@ho st/relay'",
        id="host-with-space",
    ),
    pytest.param(
        "postgresql://relay:pg-secret-9@db..internal/relay",
        "'db..internal' is not a valid host name (an IP address, or labels of 1 to 63 letters,"
        " digits, '-' or '_' separated by single dots), got 'postgresql://…@db..internal/relay'",
        id="empty-label",
    ),
    pytest.param(
        "postgresql://relay:pg-secret-9@db/relay?sslmode",
        "the query is not name=value pairs separated by &, got 'postgresql://…@db/relay?***'",
        id="item-without-equals",
    ),
    pytest.param(
        "postgresql://relay@db/relay?sslmode=require&target_session_attrs=master",
        "target_session_attrs must be one of any, primary, standby, prefer-standby, read-write,"
        " read-only, got 'postgresql://…@db/relay?sslmode=***&target_session_attrs=***'",
        id="target-session-attrs",
    ),
    pytest.param(
        "postgresql://relay@db/relay?sslmode=require&ssl_min_protocol_version=TLSv1.9",
        "ssl_min_protocol_version must be one of TLSv1, TLSv1.1, TLSv1.2, TLSv1.3, got"
        " 'postgresql://…@db/relay?sslmode=***&ssl_min_protocol_version=***'",
        id="tls-version",
    ),
    pytest.param(
        "postgresql://relay@db/relay?sslnegotiation=tls",
        "sslnegotiation must be one of postgres, direct, got"
        " 'postgresql://…@db/relay?sslnegotiation=***'",
        id="sslnegotiation",
    ),
    pytest.param(
        "postgresql://relay:pg-secret-9@db1:5432,,db2:5432/relay",
        "host 2 of 3 is empty (expected host:port,host:port), got"
        " 'postgresql://…@db1:5432,,db2:5432/relay'",
        id="multi-host-empty-host",
    ),
    pytest.param(
        "postgresql://relay:pg-secret-9@db1:5432,db2:99999/relay",
        "the port of host 2 is not a number from 1 to 65535 (in a password, / ? # @ and : must be"
        " percent-encoded) (expected postgresql://user:password@host:port/database), got"
        " 'postgresql://…@db1:5432,db2:99999/relay'",
        id="multi-host-port-out-of-range",
    ),
    pytest.param(
        "postgresql://relay:pg-secret-9@db1,db..2/relay",
        "host 2 of 2, 'db..2', is not a valid host name (an IP address, or labels of 1 to 63"
        " letters, digits, '-' or '_' separated by single dots), got"
        " 'postgresql://…@db1,db..2/relay'",
        id="multi-host-bad-name",
    ),
    pytest.param(
        "postgresql://relay:pg-secret-9@db1:5432,db2:5432/relay?target_session_attrs=primary-ish",
        "target_session_attrs must be one of any, primary, standby, prefer-standby, read-write,"
        " read-only, got 'postgresql://…@db1:5432,db2:5432/relay?target_session_attrs=***'",
        id="multi-host-target-session-attrs",
    ),
    pytest.param(
        "postgresql://relay:pg-secret-9@db:0/relay",
        "the port is not a number from 1 to 65535 (in a password, / ? # @ and : must be"
        " percent-encoded) (expected postgresql://user:password@host:port/database), got"
        " 'postgresql://…@db:0/relay'",
        id="port-zero",
    ),
    pytest.param(
        "postgresql://relay:pg-secret-9@/relay?host=db&port=54x2",
        "?port= is not a number from 1 to 65535, got 'postgresql://…@/relay?host=***&port=***'",
        id="query-port-not-a-number",
    ),
    pytest.param(
        "postgresql://relay:pg-secret-9@/relay?host=db&port=65536",
        "?port= is not a number from 1 to 65535, got 'postgresql://…@/relay?host=***&port=***'",
        id="query-port-out-of-range",
    ),
    pytest.param(
        "postgresql://relay:pg-secret-9@/relay?host=db1,db2&port=5432,5433,5434",
        "?port= names 3 ports for 2 hosts of ?host=, got 'postgresql://…@/relay?host=***&port=***'",
        id="query-ports-for-hosts",
    ),
    pytest.param(
        "postgresql://relay:pg-secret-9@/relay?host=db1,db2&port=5432,",
        "entry 2 of ?port= is not a number from 1 to 65535, got"
        " 'postgresql://…@/relay?host=***&port=***'",
        id="query-port-empty-entry",
    ),
    pytest.param(
        "postgresql://relay:pg-secret-9@/relay?host=",
        "?host= is empty (expected a host name, an IP address or a socket directory), got"
        " 'postgresql://…@/relay?host=***'",
        id="query-host-empty",
    ),
    pytest.param(
        "postgresql://relay:pg-secret-9@/relay?host=db1,,db2",
        "entry 2 of ?host= is empty (expected a host name, an IP address or a socket directory),"
        " got 'postgresql://…@/relay?host=***'",
        id="query-host-empty-entry",
    ),
    pytest.param(
        "postgresql://relay:pg-secret-9@/relay?host=run/postgresql",
        "?host= is not a valid host name, IP address or socket directory (an absolute path), got"
        " 'postgresql://…@/relay?host=***'",
        id="query-host-relative-path",
    ),
    pytest.param(
        "postgresql://relay:pg-secret-9@db/relay?port=5433",
        "?port= is ignored by asyncpg when a host precedes the path: give the hosts and ports"
        " either as host:port,host:port before the path or as"
        " postgresql://user:password@/database?host=…&port=…, got"
        " 'postgresql://…@db/relay?port=***'",
        id="query-port-beside-a-host",
    ),
    pytest.param(
        "postgresql://relay:pg-secret-9@db/relay?host=/run/postgresql",
        "?host= is ignored by asyncpg when a host precedes the path: give the hosts and ports"
        " either as host:port,host:port before the path or as"
        " postgresql://user:password@/database?host=…&port=…, got"
        " 'postgresql://…@db/relay?host=***'",
        id="query-host-beside-a-host",
    ),
    pytest.param(
        "postgresql://relay:pg-secret-9@/relay?port=5432,5433",
        "?port= names 2 ports but the URL names no host (give the hosts with ?host=…, or one"
        " port), got 'postgresql://…@/relay?port=***'",
        id="no-host-ports",
    ),
    pytest.param(
        "postgresql://relay:pg-secret-9@db:5432/?dbname=relay",
        "?dbname= is ignored by asyncpg after a '/' (it would connect to the database named like"
        " the user): remove the '/' before the '?', or name the database in the path (expected"
        " postgresql://user:password@host:port/database), got"
        " 'postgresql://…@db:5432/?dbname=***'",
        id="dbname-after-slash",
    ),
    pytest.param(
        "postgresql://relay:pg-secret-9@db:5432/relay?dbname=other",
        "the database is named twice, in the path and by ?dbname= (asyncpg takes the path's,"
        " libpq the query's): name it once, got 'postgresql://…@db:5432/relay?dbname=***'",
        id="database-twice",
    ),
    pytest.param(
        "postgresql://relay:pg-secret-9@db:5432?dbname=relay&database=other",
        "the database is named twice, by ?dbname= and ?database=: name it once, got"
        " 'postgresql://…@db:5432?dbname=***&database=***'",
        id="dbname-and-database",
    ),
    pytest.param(
        "postgresql://relay:pg-secret-9@db:5432?dbname=",
        "the PostgreSQL URL names no database (expected"
        " postgresql://user:password@host:port/database), got 'postgresql://…@db:5432?dbname=***'",
        id="dbname-blank",
    ),
]


@pytest.mark.parametrize(("url", "problem"), _BAD_STATE_URLS)
def test_postgresql_state_url_is_checked_at_load(tmp_path: Path, url: str, problem: str) -> None:
    """`?sslmode=bogus` and a host with a space loaded, and `run` retried for 60 s as if the
    server were down (asyncpg's ClientConfigurationError, a resolver error) before exiting 1.
    Now the config does not load: an error naming state and the problem, never the password."""
    path = write(tmp_path, MINIMAL + f"state: '{url}'\n")
    with pytest.raises(ConfigError) as caught:
        load(path, environ={"KEY": "k"})
    assert str(caught.value) == f"{path}: state: {problem}"
    assert "pg-secret-9" not in str(caught.value)


@pytest.mark.parametrize(("url", "problem"), _BAD_STATE_URLS)
def test_the_store_refuses_a_url_as_the_config_does(url: str, problem: str) -> None:
    """PostgresStore.from_url checked only the scheme, so a URL given to it directly (a script,
    a benchmark) failed at connect, or was retried for reconnect_max_s as if the server were
    down. It runs the config's check now: the same problem (never a password or query value)."""
    with pytest.raises(StoreError) as caught:
        PostgresStore.from_url(url)
    assert str(caught.value) == f"state: {problem.rpartition(', got ')[0]}"


def test_a_bad_postgresql_state_url_exits_2_at_once(tmp_path: Path) -> None:
    """`ctct-relay run` with `?sslmode=bogus` exits 2 with the config error, before connecting."""
    url = "postgresql://relay:pg-secret-9@127.0.0.1:9/relay?sslmode=bogus"
    path = write(tmp_path, MINIMAL + f"state: '{url}'\n")
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "relay", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "KEY": "k"},
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert time.monotonic() - started < 30
    assert "state: sslmode must be one of" in done.stderr
    assert "pg-secret-9" not in done.stderr + done.stdout


@pytest.mark.parametrize(
    "query",
    [
        "sslmode=verify-full",
        "sslmode=verify_ca",
        "sslmode=disable&application_name=x&search_path=relay",
        "target_session_attrs=read-write&sslnegotiation=postgres",
        "sslmode=require&ssl_min_protocol_version=TLSv1.2&ssl_max_protocol_version=TLSv1_3",
        "gsslib=gssapi&sslmode=",
    ],
)
def test_postgresql_state_url_with_options_asyncpg_takes_loads(tmp_path: Path, query: str) -> None:
    """Values asyncpg accepts load, in its spellings; parameters it sends to the server as
    settings (application_name, search_path) are the server's to check."""
    url = f"postgresql://relay:pg-secret-9@db.internal:5432/relay?{query}"
    settings = load(write(tmp_path, MINIMAL + f"state: '{url}'\n"), environ={"KEY": "k"})
    assert settings.state == url


@pytest.mark.parametrize(
    "url",
    [
        pytest.param(
            "postgresql://relay:pg-secret-9@db1:5432,db2:5433/relay"
            "?target_session_attrs=read-write",
            id="multi-host",
        ),
        pytest.param("postgresql://relay:pg-secret-9@db1,[::1]:5433,10.0.0.3/relay", id="ipv6"),
        pytest.param("postgresql://relay@/relay?host=/run/postgresql", id="socket"),
        pytest.param("postgresql://relay@%2Frun%2Fpostgresql:5433/relay", id="socket-encoded"),
        pytest.param("postgresql://relay:pg-secret-9@/relay?host=db&port=5433", id="query-host"),
        pytest.param(
            "postgresql://relay@/relay?host=db1,/run/postgresql&port=5432,5433"
            "&target_session_attrs=primary",
            id="query-hosts",
        ),
        pytest.param("postgresql://relay@/relay?host=db1,db2&port=5433", id="query-one-port"),
        pytest.param("postgresql://relay:pg-secret-9@/relay", id="default-host"),
        pytest.param("postgresql:///relay", id="default-host-no-user"),
        pytest.param("postgresql://relay@/relay?port=5433&sslmode=disable", id="default-host-port"),
        pytest.param("postgresql://relay:pg-secret-9@db:5433?dbname=relay", id="dbname"),
        pytest.param("postgresql://relay@db?database=relay", id="database"),
        pytest.param("postgresql://relay@?host=/run/postgresql&dbname=relay", id="dbname-socket"),
    ],
)
def test_postgresql_state_url_with_several_hosts_or_a_socket_loads(
    tmp_path: Path, url: str
) -> None:
    """Hosts asyncpg (and libpq) try in order (an HA pair), a Unix socket directory, and
    ?host=/?port= were refused at load ("the port is not a number", "names no host"): they
    load now, each host and port checked. So do no host at all (postgresql:///relay: $PGHOST,
    else the local socket directories and localhost) and a database given only by ?dbname= in
    a URL with no path, which were refused ("names no host", "names no database")."""
    settings = load(write(tmp_path, MINIMAL + f"state: '{url}'\n"), environ={"KEY": "k"})
    assert settings.state == url


def test_postgresql_url_choices_are_asyncpgs() -> None:
    """The values checked at load are the ones asyncpg takes, so a new asyncpg cannot drift."""
    from asyncpg import connect_utils  # its parser: private, read only by this test

    from relay.store.pgurl import URL_CHOICES

    modes = tuple(mode.name.replace("_", "-") for mode in connect_utils.SSLMode)
    assert URL_CHOICES["sslmode"] == modes
    assert URL_CHOICES["sslnegotiation"] == tuple(n.value for n in connect_utils.SSLNegotiation)
    attrs = tuple(a.value for a in connect_utils.SessionAttribute)
    assert URL_CHOICES["target_session_attrs"] == attrs
    for version in URL_CHOICES["ssl_min_protocol_version"]:
        connect_utils._parse_tls_version(version)
    assert URL_CHOICES["ssl_max_protocol_version"] == URL_CHOICES["ssl_min_protocol_version"]


# Every key read as a whole number, with a YAML snippet setting it to {} (accounts[0] keys extend
# the MINIMAL account).
INTEGER_KEYS = {
    "poll.page_limit": "poll: {{page_limit: {}}}",
    "schedule.concurrency": "schedule: {{concurrency: {}}}",
    "http.max_attempts": "http: {{max_attempts: {}}}",
    "admin.port": "admin: {{port: {}}}",
    "webhooks.concurrency": "webhooks: {{concurrency: {}}}",
    "webhooks.response_cap_bytes": "webhooks: {{response_cap_bytes: {}}}",
    "postgres.pool_max_size": "postgres: {{pool_max_size: {}}}",
    "postgres.pool_min_size": "postgres: {{pool_min_size: {}}}",
    "kafka.linger_ms": "kafka: {{bootstrap_servers: b, linger_ms: {}}}",
    "kafka.max_batch_bytes": "kafka: {{bootstrap_servers: b, max_batch_bytes: {}}}",
    "kafka.max_request_bytes": "kafka: {{bootstrap_servers: b, max_request_bytes: {}}}",
    "kafka.partitions": "kafka: {{bootstrap_servers: b, partitions: {}}}",
    "kafka.replication_factor": "kafka: {{bootstrap_servers: b, replication_factor: {}}}",
    "kafka.batch_events": "kafka: {{bootstrap_servers: b, batch_events: {}}}",
    "accounts[0].rate_limit.requests_per_day": "    rate_limit: {{requests_per_day: {}}}",
}


@pytest.mark.parametrize("value", ["0.9", "2.5", "8081.9", ".nan", ".inf", "-.inf", "true", "x"])
@pytest.mark.parametrize("key", INTEGER_KEYS)
def test_integer_keys_refuse_what_is_not_a_whole_number(
    tmp_path: Path, key: str, value: str
) -> None:
    """A fraction is never truncated (page_limit 0.9 was 0), NaN and infinity never reach int()."""
    with pytest.raises(ConfigError, match=rf"^.*: {re.escape(key)}: expected an integer >= \d"):
        load(write(tmp_path, MINIMAL + INTEGER_KEYS[key].format(value)), environ={"KEY": "k"})


def test_integer_keys_take_whole_numbers_written_as_floats(tmp_path: Path) -> None:
    """3.0 is a whole number: it loads as the int 3."""
    text = MINIMAL + "    rate_limit: {requests_per_day: 1200.0}\npoll: {page_limit: 3.0}\n"
    settings = load(write(tmp_path, text), environ={"KEY": "k"})
    assert settings.accounts[0].poll.page_limit == 3
    assert type(settings.accounts[0].poll.page_limit) is int
    assert settings.accounts[0].budget.requests_per_day == 1200


def test_one_attempt_means_no_retries(tmp_path: Path) -> None:
    """http.max_attempts: 1 is allowed (the minimum is inclusive): requests are not retried."""
    settings = load(write(tmp_path, MINIMAL + "http: {max_attempts: 1}"), environ={"KEY": "k"})
    assert settings.http.retry.max_attempts == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        pytest.param(
            "schedule: {tick_s: .inf}", r"schedule\.tick_s: expected a finite number > 0", id="inf"
        ),
        pytest.param(
            "schedule: {min_interval_s: .nan}",
            r"schedule\.min_interval_s: expected a finite number > 0",
            id="nan",
        ),
        pytest.param(
            "webhooks: {timeout_s: -.inf}",
            "webhooks.timeout_s: expected a finite number",
            id="-inf",
        ),
        pytest.param(
            "schedule: {tick_s: 1.0e+15}",
            r"schedule\.tick_s: expected a number > 0 and <= 1e\+09, got ",
            id="huge",
        ),
        pytest.param(
            "    campaigns: {max_age_days: 1.0e+6}",
            r"accounts\[0\]\.campaigns\.max_age_days: expected a number > 0 and <= 36500",
            id="max-age-days",
        ),
        pytest.param(
            "webhooks: {retry_schedule_s: [5, .inf]}",
            "webhooks.retry_schedule_s: expected a non-empty list of seconds",
            id="schedule-inf",
        ),
        pytest.param(
            "webhooks: {retry_schedule_s: [.nan]}",
            "webhooks.retry_schedule_s: expected a non-empty list of seconds",
            id="schedule-nan",
        ),
        pytest.param(
            "kafka: {bootstrap_servers: b, partitions: 99999999999}",
            r"kafka\.partitions: expected an integer >= 1 and <= 2147483647, got 99999999999",
            id="int-too-big",
        ),
        pytest.param(
            "kafka: {bootstrap_servers: b, replication_factor: 40000}",
            r"kafka\.replication_factor: expected an integer >= 1 and <= 32767",
            id="replication-int16",
        ),
        pytest.param(
            "kafka: {bootstrap_servers: b, request_timeout_s: 3000000}",
            r"kafka\.request_timeout_s: expected a number >= 0.001 and <= 2147483, got 3000000",
            id="request-timeout-int32-ms",
        ),
    ],
)
def test_numbers_are_finite_and_bounded(tmp_path: Path, extra: str, message: str) -> None:
    """NaN and infinity are refused by name (they crashed int() or the scheduler at start), and so
    are values beyond what the timers and Kafka fields hold."""
    with pytest.raises(ConfigError, match=message):
        load(write(tmp_path, MINIMAL + extra), environ={"KEY": "k"})


@pytest.mark.parametrize(
    "value",
    [
        "abc #def",
        "0123",
        "0x1F",
        "12:30:45",
        "1_000",
        "1e5",
        "&a b",
        "*abc",
        "#abc",
        "~",
        "null",
        "on",
        "false",
        "a: b",
        "!!binary aGVsbG8=",
        "[secretval]",
        "{a: b}",
        "[unclosed",
        " padded ",
        "123456789012345678901234567890",
    ],
)
def test_overrides_of_string_keys_keep_the_text_as_set(tmp_path: Path, value: str) -> None:
    """A CTCT_RELAY_ variable gives a string key exactly its text: YAML never turns it into a
    comment, an octal number, a sexagesimal one, an anchor, null or a boolean."""
    env = {
        "KEY": "k",
        "CTCT_RELAY_ACCOUNTS__0__API_KEY": value,
        "CTCT_RELAY_ACCOUNTS__0__ACCESS_TOKEN": value,
        "CTCT_RELAY_KAFKA__BOOTSTRAP_SERVERS": "b:9092",
        "CTCT_RELAY_KAFKA__CLIENT_ID": value,
    }
    token = value + "-padded-to-16-chars"  # admin tokens have at least 16 characters
    if " " not in value:  # the admin token travels in a header: no spaces
        env["CTCT_RELAY_ADMIN__TOKEN"] = token
    settings = load(write(tmp_path, MINIMAL), environ=env)
    # the credentials alone lose surrounding whitespace (a secret file's line end)
    assert settings.accounts[0].api_key.reveal() == value.strip()
    assert settings.accounts[0].access_token.reveal() == value.strip()
    assert settings.kafka is not None
    assert settings.kafka.client_id == value
    if " " not in value:
        assert settings.admin.token == token


def test_overrides_of_numbers_flags_and_lists(tmp_path: Path) -> None:
    """Number keys read decimal text, true/false keys their words (any case), list and mapping keys
    a YAML flow collection."""
    env = {
        "KEY": "k",
        "CTCT_RELAY_HTTP__MAX_ATTEMPTS": "0012",
        "CTCT_RELAY_HTTP__TIMEOUT_S": " 2.5e1 ",
        "CTCT_RELAY_POLL__PAGE_LIMIT": "100.0",
        "CTCT_RELAY_POLL__SUMMARY_GATE": "Off",
        "CTCT_RELAY_POLL__KINDS": "[click, open]",
        "CTCT_RELAY_ADMIN__METRICS_PUBLIC": "no",
        "CTCT_RELAY_ACCOUNTS__0__CAMPAIGNS__DISCOVER": "FALSE",
        "CTCT_RELAY_ACCOUNTS__0__CONTACTS": "[1001, 0042]",
        "CTCT_RELAY_ACCOUNTS__0__RATE_LIMIT": "{requests_per_second: 2, requests_per_day: 500}",
        "CTCT_RELAY_WEBHOOKS__RETRY_SCHEDULE_S": "[1, '2.5']",
    }
    settings = load(write(tmp_path, MINIMAL), environ=env)
    account = settings.accounts[0]
    assert settings.http.retry.max_attempts == 12
    assert settings.http.timeout_s == 25
    assert account.poll.page_limit == 100
    assert account.poll.summary_gate is False
    assert [k.value for k in account.poll.kinds] == ["click", "open"]
    assert settings.admin.metrics_public is False
    assert account.campaigns.discover is False
    assert account.contacts == ("1001", "0042")
    assert (account.budget.requests_per_second, account.budget.requests_per_day) == (2, 500)
    assert settings.delivery.retry_schedule_s == (1, 2.5)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        pytest.param(
            "HTTP__TIMEOUT_S",
            "0x1F",
            r"http\.timeout_s: expected a number > 0, got '0x1F'",
            id="hex",
        ),
        pytest.param(
            "HTTP__TIMEOUT_S", "12:30", r"http\.timeout_s: expected a number > 0", id="sexagesimal"
        ),
        pytest.param(
            "HTTP__TIMEOUT_S", "nan", r"http\.timeout_s: expected a finite number", id="nan"
        ),
        pytest.param(
            "POLL__PAGE_LIMIT", "1.5", r"poll\.page_limit: expected an integer", id="fraction"
        ),
        pytest.param(
            "POLL__SUMMARY_GATE", "1", r"poll\.summary_gate: expected true or false", id="flag"
        ),
        pytest.param(
            "POLL__KINDS", "click", r"poll\.kinds: expected a list of strings", id="not-a-list"
        ),
        pytest.param(
            "ACCOUNTS__0__RATE_LIMIT",
            "{requests_per_second: 0}",
            r"accounts\[0\]\.rate_limit\.requests_per_second: expected a number > 0",
            id="inside-a-mapping-it-sets",
        ),
    ],
)
def test_overrides_that_do_not_fit_their_key(
    tmp_path: Path, variable: str, value: str, message: str
) -> None:
    """Override text that does not spell what the key takes is refused, naming the key and the
    variable, not the config file (which was blamed: it does not hold the value)."""
    env = {"KEY": "k", f"CTCT_RELAY_{variable}": value}
    path = write(tmp_path, MINIMAL)
    key, rest = message.split(": ", 1)  # the key the value fails, whichever variable set it
    with pytest.raises(
        ConfigError, match=rf"^{key} \(from CTCT_RELAY_{variable}\): {rest}"
    ) as caught:
        load(path, environ=env)
    assert str(path) not in str(caught.value)
    assert caught.value.environment


def test_yaml_text_keeps_the_form_it_was_written_in(tmp_path: Path) -> None:
    """Unquoted times, leading-zero ids and tokens, and on/off words reach string keys as written
    (YAML 1.1 made them dates, octal numbers and booleans); number and true/false keys still read
    them."""
    text = """
accounts:
  - name: acme
    base_url: https://api.example.com
    api_key: 0123
    access_token: 12:30:45
    campaigns: {ids: [0123, 1100394165290], discover: no}
    poll: {start_from: 2026-01-01T10:00:00Z, summary_gate: off}
poll: {start_from: 2026-01-01, page_limit: 0100}
http: {timeout_s: 1e3}
kafka: {bootstrap_servers: 'b:9092', client_id: on, create_topics: yes}
"""
    settings = load(write(tmp_path, text), environ={})
    account = settings.accounts[0]
    assert account.api_key.reveal() == "0123"
    assert account.access_token.reveal() == "12:30:45"
    assert account.campaigns.ids == ("0123", "1100394165290")
    assert account.campaigns.discover is False
    assert account.poll.start_from == "2026-01-01T10:00:00Z"
    assert account.poll.summary_gate is False
    assert account.poll.page_limit == 100
    assert settings.http.timeout_s == 1000
    assert settings.kafka is not None
    assert settings.kafka.client_id == "on"
    assert settings.kafka.create_topics is True
    top = load(write(tmp_path, MINIMAL + "poll: {start_from: 2026-01-01}"), {"KEY": "k"})
    assert top.accounts[0].poll.start_from == "2026-01-01"


def test_a_float_for_a_string_key_says_to_quote_it(tmp_path: Path) -> None:
    """YAML reads 1.50 as a number; the error says to quote it rather than guess the text."""
    text = MINIMAL + "kafka: {bootstrap_servers: b, client_id: 1.50}"
    with pytest.raises(ConfigError, match=r"kafka\.client_id: expected a string, got 1\.5 \(quote"):
        load(write(tmp_path, text), environ={"KEY": "k"})


SECRET_KEYS = {  # each secret key, set to VALUE
    "accounts[0].api_key": MINIMAL.replace("${KEY}", "VALUE"),
    "accounts[0].access_token": MINIMAL.replace("tok-${TOKEN_SUFFIX:-default}", "VALUE"),
    "admin.token": MINIMAL + "admin: {token: VALUE}",
    "kafka.security.password": MINIMAL
    + "kafka: {bootstrap_servers: b, security: {protocol: SASL_SSL, username: u, password: VALUE}}",
    "kafka.security.ssl_password": MINIMAL
    + "kafka: {bootstrap_servers: b, security: {protocol: SSL, ssl_password: VALUE}}",
    "webhooks.declared[0].secret": MINIMAL
    + "webhooks: {declared: [{url: 'https://x.example/h', secret: VALUE}]}",
}


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        ("[secretval]", "a list"),
        ("{secretval: 1}", "a mapping"),
        ("12.75", r"a number \(quote it in YAML\)"),
        ("true", r"true/false \(quote it in YAML\)"),
    ],
)
@pytest.mark.parametrize("key", SECRET_KEYS)
def test_errors_never_show_a_secret(tmp_path: Path, key: str, value: str, kind: str) -> None:
    """A secret key of the wrong type is named with the type it got, never with its value."""
    text = SECRET_KEYS[key].replace("VALUE", value)
    message = load_error(tmp_path, text)
    assert re.search(rf"{re.escape(key)}: expected a string, got {kind}", message), message
    assert "secretval" not in message
    assert "12.75" not in message
    assert "not shown" in message


_ACCOUNT = "{name: acme, base_url: 'https://api.example.com', api_key: secretval, access_token: t}"


@pytest.mark.parametrize(
    ("text", "environ", "expected"),
    [
        pytest.param(
            "accounts:\n  name: acme\n  api_key: secretval\n  access_token: secretval\n",
            {},
            "accounts: expected a list, got a mapping of name, api_key, access_token",
            id="accounts-without-its-dash",
        ),
        pytest.param(
            "accounts:\n  - [acme, secretval]\n",
            {},
            r"accounts\[0\]: expected a mapping, got a list of 2 items",
            id="account-as-a-list",
        ),
        pytest.param(
            MINIMAL + "admin: [127.0.0.1, 8081, secretval]\n",
            {},
            "admin: expected a mapping, got a list of 3 items",
            id="admin-as-a-list",
        ),
        pytest.param(
            MINIMAL + "kafka: {bootstrap_servers: b, security: [SASL_SSL, u, secretval]}\n",
            {},
            r"kafka\.security: expected a mapping, got a list of 3 items",
            id="kafka-security-as-a-list",
        ),
        pytest.param(
            MINIMAL.replace("name: acme", "name: {api_key: secretval}"),
            {},
            r"accounts\[0\]\.name: expected a string, got a mapping of api_key",
            id="mapping-for-a-string",
        ),
        pytest.param(
            MINIMAL,
            {"CTCT_RELAY_ACCOUNTS": _ACCOUNT},
            r"accounts \(from CTCT_RELAY_ACCOUNTS\): expected a list, got a mapping of name,",
            id="override-mapping-for-a-list",
        ),
        pytest.param(
            MINIMAL,
            {"CTCT_RELAY_ACCOUNTS": "[" + _ACCOUNT[:-1]},
            r"accounts \(from CTCT_RELAY_ACCOUNTS\): expected a list, got text starting with \[",
            id="override-flow-text-that-does-not-parse",
        ),
        pytest.param(
            MINIMAL,
            {"CTCT_RELAY_ACCOUNTS__0": "[acme, secretval]"},
            r"accounts\[0\] \(from CTCT_RELAY_ACCOUNTS__0\): expected a mapping, got a list of 2",
            id="override-list-for-a-mapping",
        ),
    ],
)
def test_a_section_of_the_wrong_shape_never_shows_its_values(
    tmp_path: Path, text: str, environ: dict[str, str], expected: str
) -> None:
    """A section written where another shape belongs (accounts: without its "-") is named by
    its keys or length: its values are api keys, tokens and passwords."""
    with pytest.raises(ConfigError) as caught:
        load(write(tmp_path, text), environ={"KEY": "k", **environ})
    message = str(caught.value)
    assert re.search(expected, message), message
    assert "secretval" not in message
    assert "values not shown" in message or "(not shown)" in message


@pytest.mark.parametrize(
    ("extra", "shown"),
    [
        pytest.param("state: 'mysql://u:hunter2pass@h/db'", "'mysql://…@h/db'", id="scheme"),
        pytest.param("state: 'relay:hunter2pass@db:5432/relay'", "'…@db:5432/relay'", id="no-//"),
        pytest.param(
            "state: 'sqlite://u:hunter2pass@h/x?password=hunter2pass#hunter2pass'",
            "'sqlite://…@h/x?password=***#***'",
            id="query",
        ),
    ],
)
def test_state_errors_never_show_a_password(tmp_path: Path, extra: str, shown: str) -> None:
    """The state URL of an error is shown without user info, with the values of its query
    parameters and its fragment as ***."""
    message = load_error(tmp_path, MINIMAL + extra)
    assert re.search(
        rf"state: expected sqlite:///path/to/state\.db.*, got {re.escape(shown)}$", message
    )
    assert "hunter2pass" not in message


def test_state_url_that_does_not_parse(tmp_path: Path) -> None:
    """An unclosed IPv6 bracket is a ConfigError naming state, not a ValueError traceback."""
    text = MINIMAL + "state: 'postgresql://relay:hunter2pass@[::1/relay'"
    message = load_error(tmp_path, text)
    assert message.endswith("state: not a valid URL, got 'postgresql://…@[::1/relay'"), message
    assert "hunter2pass" not in message


def test_base_url_errors_never_show_user_info(tmp_path: Path) -> None:
    """An account's base_url is shown without the user info it may carry."""
    text = MINIMAL.replace("https://api.example.com", "ftp://u:hunter2pass@x.example/v2")
    with pytest.raises(ConfigError, match=r"base_url: expected an http\(s\) URL") as caught:
        load(write(tmp_path, text), environ={"KEY": "k"})
    assert "hunter2pass" not in str(caught.value)
    assert str(caught.value).endswith("got 'ftp://…@x.example/v2'")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        pytest.param("http: {timeout_s: true}", r"http\.timeout_s: .*, got true$", id="bool"),
        pytest.param("http: {timeout_s: .nan}", r"http\.timeout_s: .*, got \.nan$", id="nan"),
        pytest.param("poll: {summary_gate: 3}", r"poll\.summary_gate: .*, got 3$", id="int"),
        pytest.param(
            "kafka: {bootstrap_servers: !!timestamp 2024-01-01}",
            r"kafka\.bootstrap_servers: expected a string, got 2024-01-01$",
            id="date",
        ),
        pytest.param(
            "logging: {level: [1, null, .inf]}",
            r"logging\.level: expected one of debug, info, warning, error, got \[1, null, \.inf\]$",
            id="list",
        ),
        pytest.param(  # its values may be secrets: only its keys
            "logging: {level: {a: [1, null]}}",
            r"logging\.level: .*, got a mapping of a \(values not shown\)$",
            id="mapping",
        ),
    ],
)
def test_errors_show_values_as_yaml_writes_them(tmp_path: Path, extra: str, message: str) -> None:
    """true, .nan, dates and collections appear in YAML's spelling, not Python's repr."""
    with pytest.raises(ConfigError, match=message):
        load(write(tmp_path, MINIMAL + extra), environ={"KEY": "k"})


def test_sqlite_state_naming_a_directory_is_refused(tmp_path: Path) -> None:
    """sqlite:///<a directory> is refused at load, naming state, not when the store opens."""
    text = MINIMAL + f"state: 'sqlite:///{tmp_path}'"
    with pytest.raises(
        ConfigError, match=r"state: expected sqlite:///path/to/state\.db \(the path"
    ):
        load(write(tmp_path, text), environ={"KEY": "k"})


@pytest.mark.parametrize("url", ["sqlite:///:memory:", "sqlite://:memory:"])
def test_in_memory_sqlite_state_is_refused(tmp_path: Path, url: str) -> None:
    """An in-memory state loaded and ran, then was lost at exit (every stream started again
    from start_from, every event sent again): refused at load, naming state."""
    with pytest.raises(
        ConfigError,
        match=r"state: expected sqlite:///path/to/state\.db \(an in-memory state is lost when"
        r" the relay stops: it must survive restarts\), got 'sqlite://",
    ):
        load(write(tmp_path, MINIMAL + f"state: '{url}'"), environ={"KEY": "k"})


@pytest.mark.parametrize(
    "url",
    [
        "sqlite:///relay.db?mode=ro",
        "sqlite:////var/lib/relay/state.db?cache=shared",
        "sqlite:///x#y",
    ],
)
def test_sqlite_state_with_a_query_or_fragment_is_refused(tmp_path: Path, url: str) -> None:
    """A ?query or #fragment of a sqlite state became part of the file name: a new, empty
    "relay.db?mode=ro" beside the real state. Refused at load, naming state; no file made."""
    with pytest.raises(ConfigError, match=r"state: .*takes no \?query or #fragment") as caught:
        load(write(tmp_path, MINIMAL + f"state: '{url}'"), environ={"KEY": "k"})
    assert "got 'sqlite://" in str(caught.value)


@pytest.mark.parametrize(
    "name",
    ["acme corp/eu #1", "acme/eu", "a b", "ünicode", "x" * 101, "tab\tname", "0123:x", ".", ".."],
)
def test_account_names_fit_uris_and_api_paths(tmp_path: Path, name: str) -> None:
    """An account name is part of CloudEvent sources (ctct://<name>/…) and admin API paths: the
    API's own pattern (relay.api.streams.ACCOUNT_NAME) is checked at load, naming the key ("."
    and "..", dot segments, are a path no client sends as written)."""
    text = MINIMAL.replace("name: acme", f"name: {name!r}")
    with pytest.raises(ConfigError, match=r"accounts\[0\]\.name: expected 1 to 100 letters"):
        load(write(tmp_path, text), environ={"KEY": "k"})


@pytest.mark.parametrize(
    "name", ["acme", "acme-eu.prod_2", "0123", "x" * 100, "...", ".a", ".a.", "a.", "." + "x" * 99]
)
def test_account_names_of_the_api_pattern_load(tmp_path: Path, name: str) -> None:
    """Names the admin API can address load unchanged."""
    text = MINIMAL.replace("name: acme", f"name: {name}")
    assert load(write(tmp_path, text), environ={"KEY": "k"}).accounts[0].name == name


def test_dedup_retention_is_global(tmp_path: Path) -> None:
    """Dedup keys are pruned for all accounts at once, so a per-account retention is refused with
    a message that says where it goes (it used to be 'unknown key')."""
    text = MINIMAL + "    poll: {overlap_s: 60, dedup_retention_h: 24}\n"
    with pytest.raises(
        ConfigError,
        match=r"accounts\[0\]\.poll\.dedup_retention_h: set poll\.dedup_retention_h at the top"
        r" level \(dedup keys are pruned for all accounts at once\)$",
    ):
        load(write(tmp_path, text), environ={"KEY": "k"})


def test_null_overrides_unset_keys_that_are_not_strings(tmp_path: Path) -> None:
    """null or ~ in an override unsets a number, list or mapping key (CTCT_RELAY_KAFKA=null leaves
    the Kafka section out, as the Kubernetes test does); a string key keeps the word as text."""
    text = MINIMAL + (
        "http: {timeout_s: 3}\nkafka: {bootstrap_servers: 'b:9092'}\n"
        "webhooks: {declared: [{url: 'https://x.example/h', rate_limit_per_s: 5}]}\n"
    )
    env = {
        "KEY": "k",
        "CTCT_RELAY_KAFKA": "null",
        "CTCT_RELAY_HTTP__TIMEOUT_S": "~",
        "CTCT_RELAY_WEBHOOKS__DECLARED__0__RATE_LIMIT_PER_S": "NULL",
        "CTCT_RELAY_ACCOUNTS__0__ACCESS_TOKEN": "null",
    }
    settings = load(write(tmp_path, text), environ=env)
    assert settings.kafka is None
    assert settings.http.timeout_s == 30
    assert settings.webhooks[0].rate_limit_per_s is None
    assert settings.accounts[0].access_token.reveal() == "null"


def test_an_integer_of_thousands_of_digits_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    """Python's int() refuses strings over 4300 digits with a ValueError; such a value is refused
    by name (and kept as text for a string key)."""
    digits = "1" * 5000
    text = MINIMAL.replace("${KEY}", digits) + f"http: {{timeout_s: {digits}}}"
    with pytest.raises(ConfigError, match=r"http\.timeout_s: expected a finite number > 0, got '1"):
        load(write(tmp_path, text), environ={})
    settings = load(write(tmp_path, MINIMAL.replace("${KEY}", digits)), environ={})
    assert settings.accounts[0].api_key.reveal() == digits


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "http: {timeout_s: !!float s3cr3t}",
            r"not valid YAML: a value does not fit its explicit tag",
            id="tag-float",
        ),
        pytest.param(
            "poll: {start_from: !!timestamp 2020-99-99}",
            r"not valid YAML: a value does not fit its explicit tag",
            id="tag-timestamp",
        ),
        pytest.param(
            "accounts: &a [*a]", "a YAML anchor contains an alias to itself", id="self-alias"
        ),
        pytest.param(
            "a: " + "[" * 5000 + "]" * 5000, "not valid YAML: nested too deeply", id="deep"
        ),
    ],
)
def test_yaml_the_loader_cannot_build_is_an_error_not_a_traceback(
    tmp_path: Path, text: str, message: str
) -> None:
    """Values that fail their explicit tag, self-referencing anchors and absurd nesting raised
    ValueError or RecursionError; they are config errors, without the value."""
    with pytest.raises(ConfigError, match=message) as caught:
        load(write(tmp_path, text), environ={})
    assert "s3cr3t" not in str(caught.value)


def test_a_file_that_is_not_utf8_is_an_error(tmp_path: Path) -> None:
    """A config that is not UTF-8 text is refused with the byte, not a UnicodeDecodeError."""
    path = tmp_path / "relay.yaml"
    path.write_bytes(b"accounts: \xff\n")
    with pytest.raises(ConfigError, match=r"relay\.yaml: not UTF-8 text \(byte 11\)"):
        load(path, environ={})


def test_a_key_written_twice_is_an_error(tmp_path: Path) -> None:
    """Two kafka: sections (or any key twice in one mapping) are refused with the line; PyYAML
    kept the last one silently. Merge keys (<<: *anchor) still override as YAML says."""
    import yaml

    from relay.config import _Loader

    text = MINIMAL + "kafka: {bootstrap_servers: 'a:9092'}\npoll: {}\nkafka: {}\n"
    with pytest.raises(ConfigError, match=r"not valid YAML at line 9, column 1: the key kafka is"):
        load(write(tmp_path, text), environ={"KEY": "k"})
    merged = "base: &b {x: 1, y: 1}\nc: {<<: *b, x: 2}\n"
    assert yaml.load(merged, _Loader) == {"base": {"x": 1, "y": 1}, "c": {"x": 2, "y": 1}}  # noqa: S506


def two_accounts(
    second_key: str = "APPKEY-one-for-both",
    second_url: str = "https://api.example.com",
    **limits: object,
) -> dict[str, object]:
    """shop-a and shop-b, each with its own token; shop-b with ``limits`` as its rate_limit."""
    account = {"base_url": "https://api.example.com", "api_key": "APPKEY-one-for-both"}
    return {
        "accounts": [
            {**account, "name": "shop-a", "access_token": "token-a"},
            {
                **account,
                "name": "shop-b",
                "base_url": second_url,
                "api_key": second_key,
                "access_token": "token-b",
                "rate_limit": limits,
            },
        ]
    }


SALT = bytes(range(32))


def test_accounts_sharing_an_api_key_share_one_budget() -> None:
    """Same api_key and server: one budget, named by an HMAC under the store's salt that shows
    nothing of the key and does not depend on account names or order; another key or server is
    another budget."""
    settings = from_mapping(two_accounts())
    a, b = settings.accounts
    name = a.budget_name(SALT)
    assert b.budget_name(SALT) == name
    assert re.fullmatch(r"key:[0-9a-f]{12}", name)
    assert "APPKEY" not in name
    assert settings.budget_groups(SALT) == {name: ("shop-a", "shop-b")}
    # a trailing slash or upper-case host is the same server
    same = from_mapping(two_accounts(second_url="https://API.example.com/"))
    assert same.accounts[1].budget_name(SALT) == name
    accounts = two_accounts()["accounts"]
    assert isinstance(accounts, list)
    renamed = [dict(x, name=f"x{i}") for i, x in enumerate(reversed(accounts))]
    assert {x.budget_name(SALT) for x in from_mapping({"accounts": renamed}).accounts} == {name}
    other_key = from_mapping(two_accounts(second_key="APPKEY-another"))
    other_url = from_mapping(two_accounts(second_url="https://sandbox.example.com"))
    for settings in (other_key, other_url):
        first, second = settings.accounts
        assert first.budget_name(SALT) == name != second.budget_name(SALT)
        assert len(settings.budget_groups(SALT)) == 2


def test_a_budget_name_cannot_be_recomputed_from_the_key_alone() -> None:
    """Whoever reads /metrics and holds a candidate api_key could confirm it: the name was an
    unsalted digest of the server and the key. Under the store's salt, another store (another
    salt) names the same key otherwise, and the unsalted digest (kept only to carry an upgraded
    store's count over) is neither name."""
    account = from_mapping(two_accounts()).accounts[0]
    text = "ctct-relay budget\0https://api.example.com\0APPKEY-one-for-both"
    unsalted = "key:" + hashlib.sha256(text.encode()).hexdigest()[:12]
    assert account.legacy_budget_id == unsalted
    other = account.budget_name(bytes(32))
    assert len({account.budget_name(SALT), other, unsalted}) == 3


def test_accounts_sharing_an_api_key_must_agree_on_its_limits() -> None:
    """Different rate_limit settings for one key: one line naming both accounts and the key path,
    never the key."""
    with pytest.raises(ConfigError) as caught:
        from_mapping(two_accounts(requests_per_second=2))
    message = str(caught.value)
    assert message == (
        "accounts[1].rate_limit: shop-b shares its api_key with shop-a (accounts[0]), so its"
        " rate_limit settings must be equal (requests_per_second 2 against 4)"
    )
    assert "APPKEY" not in message
    with pytest.raises(ConfigError, match=r"requests_per_day 5000 against 10000, reserved_share"):
        from_mapping(two_accounts(requests_per_day=5000, reserved_share=0.2))
    # the same settings written out are fine, and another key may have its own
    from_mapping(two_accounts(requests_per_second=4, requests_per_day=10000))
    from_mapping(two_accounts(second_key="APPKEY-another", requests_per_second=2))


@pytest.mark.parametrize(
    "servers",
    [
        pytest.param("localhost:abc", id="port-not-a-number"),
        pytest.param("127.0.0.1:99999", id="port-too-large"),
        pytest.param("broker:0", id="port-zero"),
        pytest.param("a:9092,,b:9092", id="empty-item"),
        pytest.param("user@broker:9092", id="userinfo"),
    ],
)
def test_bad_bootstrap_servers_are_refused_naming_the_key(tmp_path: Path, servers: str) -> None:
    """A server list aiokafka cannot connect to stops the start (it was retried for ever)."""
    text = MINIMAL + f"kafka: {{bootstrap_servers: '{servers}'}}"
    with pytest.raises(ConfigError, match=r"kafka\.bootstrap_servers: expected host:port"):
        load(write(tmp_path, text), environ={"KEY": "k"})


def test_good_bootstrap_servers_load(tmp_path: Path) -> None:
    """Several servers, an IPv6 address and a server without a port (9092) are accepted."""
    servers = "b1:9092, [::1]:19092,b3"
    text = MINIMAL + f"kafka: {{bootstrap_servers: '{servers}'}}"
    settings = load(write(tmp_path, text), {"KEY": "k"})
    assert settings.kafka is not None
    assert settings.kafka.bootstrap_servers == servers


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A self-signed certificate with its key encrypted (passphrase pw-1234) and plain."""
    where = tmp_path_factory.mktemp("tls")
    for name, protect in (("enc", ["-passout", "pass:pw-1234"]), ("plain", ["-nodes"])):
        files = ["-keyout", str(where / f"{name}.key"), "-out", str(where / f"{name}.crt")]
        command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-days", "1", "-subj", "/CN=t"]
        subprocess.run(
            [*command, *files, *protect],
            check=True,
            capture_output=True,
        )
    return {p.name: p for p in where.iterdir()}


def _ssl(tls: dict[str, Path], **keys: str) -> str:
    fields = ", ".join(f"{k}: '{tls.get(v, v)}'" for k, v in keys.items())
    return MINIMAL + f"kafka: {{bootstrap_servers: b, security: {{protocol: SSL, {fields}}}}}"


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        pytest.param(
            {"ssl_certfile": "enc.crt", "ssl_keyfile": "enc.key"},
            r"kafka\.security\.ssl_keyfile: \S+enc\.key is encrypted: give its passphrase in"
            " ssl_password",
            id="encrypted-key-no-passphrase",
        ),
        pytest.param(
            {"ssl_certfile": "enc.crt", "ssl_keyfile": "enc.key", "ssl_password": "wrong-one"},
            r"kafka\.security\.ssl_password: does not decrypt \S+enc\.key",
            id="wrong-passphrase",
        ),
        pytest.param(
            {"ssl_certfile": "enc.crt", "ssl_keyfile": "plain.key"},
            r"kafka\.security\.ssl_keyfile: \S+plain\.key is not the key of the certificate",
            id="key-of-another-certificate",
        ),
        pytest.param(
            {"ssl_certfile": "plain.key", "ssl_keyfile": "plain.key"},
            r"kafka\.security\.ssl_certfile: no PEM certificate in \S+plain\.key",
            id="certfile-not-a-certificate",
        ),
        pytest.param(
            {"ssl_cafile": "plain.key"},
            r"kafka\.security\.ssl_cafile: no CA certificate OpenSSL can load in \S+plain\.key",
            id="cafile-not-a-ca",
        ),
    ],
)
def test_unusable_tls_files_stop_the_load_naming_the_key(
    tmp_path: Path, tls_files: dict[str, Path], keys: dict[str, str], message: str
) -> None:
    """The TLS context is built at load: a file or passphrase OpenSSL cannot use is a one-line
    error naming its key (it passed, then prompted on a terminal or failed for ever), and the
    passphrase never shows."""
    with pytest.raises(ConfigError, match=message) as caught:
        load(write(tmp_path, _ssl(tls_files, **keys)), environ={"KEY": "k"})
    assert "wrong-one" not in str(caught.value)
    assert "\n" not in str(caught.value)


def test_an_encrypted_key_loads_with_its_passphrase(
    tmp_path: Path, tls_files: dict[str, Path]
) -> None:
    """ssl_password decrypts the key at load; it is a secret: redacted, never in repr."""
    text = _ssl(
        tls_files,
        ssl_cafile="enc.crt",
        ssl_certfile="enc.crt",
        ssl_keyfile="enc.key",
        ssl_password="pw-1234",
    )
    settings = load(write(tmp_path, text), environ={"KEY": "k"})
    assert settings.kafka is not None
    security = settings.kafka.security
    assert security.ssl_password == "pw-1234"
    assert security.context is not None
    assert settings.kafka.client_options()["ssl_context"] is security.context
    assert "pw-1234" in settings.secrets()
    assert "pw-1234" not in repr(settings)


@pytest.mark.parametrize(
    ("security", "message"),
    [
        pytest.param(
            "{ssl_cafile: CA}",
            "kafka.security.protocol: ssl_cafile is used only with SSL or SASL_SSL, not with"
            " PLAINTEXT",
            id="ssl-with-plaintext",
        ),
        pytest.param(
            "{protocol: SASL_PLAINTEXT, username: u, password: p, ssl_cafile: CA}",
            "kafka.security.protocol: ssl_cafile is used only with SSL or SASL_SSL, not with"
            " SASL_PLAINTEXT",
            id="ssl-with-sasl-plaintext",
        ),
        pytest.param(
            "{protocol: SSL, username: u, password: p}",
            "kafka.security.protocol: username, password are used only with SASL_PLAINTEXT or"
            " SASL_SSL, not with SSL",
            id="sasl-user-with-ssl",
        ),
    ],
)
def test_security_settings_the_protocol_ignores_are_refused(
    tmp_path: Path, tls_files: dict[str, Path], security: str, message: str
) -> None:
    """TLS files without TLS, or SASL credentials without SASL, were silently ignored."""
    text = MINIMAL + "kafka: {bootstrap_servers: b, security: SECURITY}"
    text = text.replace("SECURITY", security.replace("CA", str(tls_files["plain.crt"])))
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(write(tmp_path, text), environ={"KEY": "k"})


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("http://127.0.0.1:8080/v2", id="path"),
        pytest.param("https://api.constantcontact.com/v2/", id="path-slash"),
        pytest.param("https://bob:pw-secret-1@api.constantcontact.com", id="userinfo"),
    ],
)
def test_base_url_takes_scheme_and_host_only(tmp_path: Path, url: str) -> None:
    """The client appends /v2/...: a path doubled it and the 404s retired every stream; user
    info made every request fail with a traceback. Neither loads; a password never shows."""
    text = MINIMAL.replace("https://api.example.com", url)
    message = load_error(tmp_path, text)
    assert (
        "accounts[0].base_url: give the scheme and host only, e.g. https://api.constantcontact.com"
        in message
    )
    assert "pw-secret-1" not in message


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        pytest.param("http://127.0.0.1:28080?x=1", "'http://127.0.0.1:28080?x=***'", id="query"),
        pytest.param(
            "https://api.constantcontact.com/?api_key=tok-9f2e&v=2&flag",
            "'https://api.constantcontact.com/?api_key=***&v=***&***'",
            id="query-items",
        ),
        pytest.param(
            "https://api.constantcontact.com#tok-9f2e",
            "'https://api.constantcontact.com#***'",
            id="fragment",
        ),
    ],
)
def test_base_url_with_a_query_says_so_with_its_values_masked(
    tmp_path: Path, url: str, shown: str
) -> None:
    """`http://127.0.0.1:28080?x=1` was refused as not "the scheme and host only", shown as
    `'http://127.0.0.1:28080'`: exactly what the error asked for. The error says a query or
    fragment is not allowed and shows the query's keys, each value (a token, maybe) as ***."""
    text = MINIMAL.replace("https://api.example.com", url)
    message = load_error(tmp_path, text)
    assert message.endswith(
        "accounts[0].base_url: a query or fragment is not allowed (give the scheme and host only,"
        f" e.g. https://api.constantcontact.com), got {shown}"
    ), message
    assert "tok-9f2e" not in message


@pytest.mark.parametrize("url", ["https://api.constantcontact.com/", "http://127.0.0.1:8080"])
def test_base_url_with_at_most_a_slash_loads(tmp_path: Path, url: str) -> None:
    """A trailing slash alone is still only the scheme and host."""
    settings = load(write(tmp_path, MINIMAL.replace("https://api.example.com", url)), {"KEY": "k"})
    assert settings.accounts[0].base_url == url


@pytest.mark.parametrize(
    "name", ["CTCT_RELAY_HTTP__", "CTCT_RELAY_HTTP____TIMEOUT_S", "CTCT_RELAY___HTTP"]
)
def test_an_override_with_an_empty_key_name_names_the_variable(tmp_path: Path, name: str) -> None:
    """CTCT_RELAY_HTTP__=1 said `http: unknown key(s) ` with an empty name."""
    with pytest.raises(ConfigError, match=rf"^{name}: an empty key name"):
        load(write(tmp_path, MINIMAL), environ={"KEY": "k", name: "1"})


@pytest.mark.parametrize("key", ["api_key", "access_token"])
@pytest.mark.parametrize("around", ["\n", "\r\n", " \t", "\n\n"])
def test_credentials_lose_surrounding_whitespace(tmp_path: Path, key: str, around: str) -> None:
    """A secret read from a file keeps its line end (kubectl create secret --from-file): the
    token loaded with it, then every request died in aiohttp ("Forbidden control character")
    while the relay reported itself ready."""
    env = {"KEY": "k", f"CTCT_RELAY_ACCOUNTS__0__{key.upper()}": f"{around}secret-42{around}"}
    settings = load(write(tmp_path, MINIMAL), environ=env)
    assert getattr(settings.accounts[0], key).reveal() == "secret-42"


@pytest.mark.parametrize("key", ["api_key", "access_token"])
@pytest.mark.parametrize("inside", ["\n", "\r", "\x00", "\x7f", "\t", "\x85"])
def test_a_control_character_inside_a_credential_is_refused(
    tmp_path: Path, key: str, inside: str
) -> None:
    """What stripping leaves inside is refused at load, naming the key, never the value."""
    env = {"KEY": "k", f"CTCT_RELAY_ACCOUNTS__0__{key.upper()}": f"tok3n{inside}v4lue\n"}
    message = load_error(tmp_path, MINIMAL, env)
    variable = f"CTCT_RELAY_ACCOUNTS__0__{key.upper()}"
    assert message.startswith(f"accounts[0].{key} (from {variable}): holds a control"), message
    assert "tok3n" not in message
    assert "v4lue" not in message
    assert message.endswith("the value of a secret is not shown")


@pytest.mark.parametrize("key", ["api_key", "access_token"])
def test_a_credential_of_whitespace_alone_is_missing(tmp_path: Path, key: str) -> None:
    env = {"KEY": "k", f"CTCT_RELAY_ACCOUNTS__0__{key.upper()}": " \r\n"}
    with pytest.raises(ConfigError, match=rf"^accounts\[0\]\.{key} \(from \S+\): required, but"):
        load(write(tmp_path, MINIMAL), environ=env)


@pytest.mark.parametrize(
    "token", ["0123456789abcdefXYZ\r\n", "0123456789abcdefXYZ\n", " 0123456789abcdefXYZ"]
)
def test_admin_token_loses_surrounding_whitespace(tmp_path: Path, token: str) -> None:
    """${CTCT_RELAY_ADMIN_TOKEN} of a CRLF file was refused by the relay ("must be non-empty
    printable ASCII without spaces") while the CLI, stripping it, sent the same token."""
    text = MINIMAL + "admin: {token: '${CTCT_RELAY_ADMIN_TOKEN}'}\n"
    settings = load(write(tmp_path, text), environ={"KEY": "k", "CTCT_RELAY_ADMIN_TOKEN": token})
    assert settings.admin.token == "0123456789abcdefXYZ"


def test_admin_token_of_whitespace_alone_is_refused(tmp_path: Path) -> None:
    """Stripped to nothing, it is not taken for 'no token' (an unauthenticated API)."""
    text = MINIMAL + "admin: {token: '${CTCT_RELAY_ADMIN_TOKEN}'}\n"
    with pytest.raises(ConfigError, match=r"admin\.token: must be non-empty"):
        load(write(tmp_path, text), environ={"KEY": "k", "CTCT_RELAY_ADMIN_TOKEN": "\r\n"})


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        pytest.param("http://api..constantcontact.com", "not a valid host name", id="empty-label"),
        pytest.param("https://.api.example.com", "not a valid host name", id="leading-dot"),
        pytest.param(f"https://{'a' * 64}.example.com", "not a valid host name", id="long-label"),
        pytest.param("https://ex ample.com", "not a valid host name", id="space"),
        pytest.param("https://-api.example.com", "not a valid host name", id="hyphen-first"),
        pytest.param("http://1.2.3.4.5", "not a valid host name", id="not-an-address"),
        pytest.param("http://api.example.com:99999", "the port is not a number", id="port-big"),
        pytest.param("http://api.example.com:http", "the port is not a number", id="port-text"),
        pytest.param("http://api.example.com:0", "the port is not a number", id="port-0"),
        pytest.param("http://[::1", "expected an http", id="broken-ipv6"),
        pytest.param("http://[zz]", "expected an http", id="not-ipv6"),
    ],
)
def test_base_url_host_and_port_are_checked_at_load(tmp_path: Path, url: str, problem: str) -> None:
    """A host the resolver's IDNA encoding refuses loaded, then every pass crashed with
    UnicodeError; a broken [IPv6] literal crashed the loader with a ValueError."""
    text = MINIMAL.replace("https://api.example.com", url)
    with pytest.raises(ConfigError, match=rf"accounts\[0\]\.base_url: .*{problem}"):
        load(write(tmp_path, text), environ={"KEY": "k"})


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:18380",
        "http://[::1]:8080",
        "http://localhost:8080",
        "https://api.constantcontact.com.",
        "https://b\u00fccher.example",
        "http://sim_api:8080",
        "http://sim:8080",
    ],
)
def test_base_url_hosts_that_resolve_load(tmp_path: Path, url: str) -> None:
    settings = load(write(tmp_path, MINIMAL.replace("https://api.example.com", url)), {"KEY": "k"})
    assert settings.accounts[0].base_url == url


def test_example_declared_webhook_shows_the_defaults(tmp_path: Path) -> None:
    """The example (and the README reference made from it) gives each key its default: its
    declared webhook listed rate_limit_per_s 10 and two event types, while leaving them out
    gives no limit and every email event."""
    example = load(EXAMPLE, environ={}).webhooks
    minimal = from_mapping(
        {
            "accounts": [
                {"name": "d", "base_url": "http://h", "api_key": "k", "access_token": "t"}
            ],
            "webhooks": {"declared": [{"url": example[0].url}]},
        }
    ).webhooks
    assert example == minimal


_SASL = (
    "kafka: {bootstrap_servers: 'b:9092', security: {protocol: SASL_PLAINTEXT, username: u,"
    " password: '${KAFKA_PASSWORD}'}}\n"
)
_DECLARED = "webhooks: {declared: [{url: 'https://93.184.216.34/h', secret: '${HOOK_SECRET}'}]}\n"
_HOOK_SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw" + "MfKQ9r8GKYqrTwjUPD8ILPZI"


def _secret_setting(name: str) -> tuple[str, str]:
    """The config text giving the secret ``name`` from a variable, and that variable."""
    if name == "kafka.security.password":
        return MINIMAL + _SASL, "KAFKA_PASSWORD"
    return MINIMAL + _DECLARED, "HOOK_SECRET"


def _secret_of(settings: Settings, name: str) -> str | None:
    if name == "kafka.security.password":
        assert settings.kafka is not None
        return settings.kafka.security.password
    return settings.webhooks[0].secret


_SECRET_KEYS = ["kafka.security.password", "webhooks.declared[0].secret"]


@pytest.mark.parametrize("key", _SECRET_KEYS)
@pytest.mark.parametrize("around", ["\n", "\r\n", " \t"])
def test_passwords_and_webhook_secrets_lose_surrounding_whitespace(
    tmp_path: Path, key: str, around: str
) -> None:
    """The rule of api_key/access_token/admin.token holds for every secret: a Kafka password or
    a declared webhook secret read from a file (its line end kept) loads without it (it loaded
    as given: SASL failed for ever, the webhook secret failed the start as 'not valid base64')."""
    text, variable = _secret_setting(key)
    value = _HOOK_SECRET if key.startswith("webhooks") else "kafka-pw-123"
    settings = load(write(tmp_path, text), environ={"KEY": "k", variable: around + value + around})
    assert _secret_of(settings, key) == value
    assert value in settings.secrets() or key.startswith("webhooks")


@pytest.mark.parametrize("key", _SECRET_KEYS)
@pytest.mark.parametrize(
    ("value", "problem"),
    [
        pytest.param("MfKQ9r8GKYqrT\nwjUPD8\n", "holds a control character", id="line-break"),
        pytest.param("MfKQ9r8GKYqrT\x00wjUPD8", "holds a control character", id="nul"),
        pytest.param(" \r\n", "only whitespace", id="whitespace-alone"),
    ],
)
def test_a_bad_password_or_webhook_secret_is_refused_naming_its_key(
    tmp_path: Path, key: str, value: str, problem: str
) -> None:
    """What stripping leaves inside (a control character), or nothing left at all, is refused
    at load naming the key, never showing the value."""
    text, variable = _secret_setting(key)
    if key.startswith("webhooks") and problem != "only whitespace":
        value = "whsec_" + value
    message = load_error(tmp_path, text, {"KEY": "k", variable: value})
    expected = "required, but empty" if key.startswith("kafka") and value.isspace() else problem
    assert f": {key}: {expected}" in message, message
    assert "MfKQ9r8GKYqr" not in message


def test_a_declared_webhook_secret_is_checked_at_load(tmp_path: Path) -> None:
    """A declared secret that is no whsec_ secret stops the load naming its key (it stopped
    the start later, naming webhooks[0]), never showing the value."""
    environ = {"KEY": "k", "HOOK_SECRET": "whsec_MfKQ9r8GKYqr!!"}
    message = load_error(tmp_path, MINIMAL + _DECLARED, environ)
    assert ": webhooks.declared[0].secret: the part after whsec_ is not valid" in message
    assert "MfKQ9r8GKYqr" not in message


def test_an_ssl_password_loses_surrounding_whitespace(
    tmp_path: Path, tls_files: dict[str, Path]
) -> None:
    """The key's passphrase from a file with its line end decrypts the key (it did not)."""
    text = _ssl(
        tls_files,
        ssl_cafile="enc.crt",
        ssl_certfile="enc.crt",
        ssl_keyfile="enc.key",
        ssl_password="${SSL_PASSWORD}",
    )
    settings = load(write(tmp_path, text), environ={"KEY": "k", "SSL_PASSWORD": "pw-1234\r\n"})
    assert settings.kafka is not None
    assert settings.kafka.security.ssl_password == "pw-1234"


def test_a_bad_value_in_the_file_is_still_the_files(tmp_path: Path) -> None:
    """Only what a variable set is blamed on it: a bad value written in the file, beside a
    variable setting another key of the same mapping, names the file."""
    path = write(tmp_path, MINIMAL + "poll: {page_limit: 1.5}\n")
    with pytest.raises(ConfigError) as caught:
        load(path, environ={"KEY": "k", "CTCT_RELAY_POLL__KINDS": "[click]"})
    assert str(caught.value).startswith(f"{path}: poll.page_limit: expected an integer")


@pytest.mark.parametrize(
    ("extra", "key", "shown"),
    [
        pytest.param(
            "    contacts: [1001, abc]\n", "accounts[0].contacts[1]", "'abc'", id="contact"
        ),
        pytest.param(
            "    campaigns: {ids: ['11 00']}\n",
            "accounts[0].campaigns.ids[0]",
            "'11 00'",
            id="campaign",
        ),
    ],
)
def test_target_ids_are_constant_contact_ids(
    tmp_path: Path, extra: str, key: str, shown: str
) -> None:
    """Contact and campaign ids are what the v2 API names them by (digits), as the admin API and
    the CLI take them: anything else is refused at load naming the item."""
    with pytest.raises(ConfigError) as caught:
        load(write(tmp_path, MINIMAL + extra), environ={"KEY": "k"})
    assert f": {key}: expected a Constant Contact id (1 to 64 digits), got {shown}" in str(
        caught.value
    )


def test_repeat_read_s_is_read_per_account_and_must_be_positive(tmp_path: Path) -> None:
    """poll.repeat_read_s: how often a campaign's unique-counted feeds are read whatever their
    counts; the top level sets every account's, an account may override it, 0 is refused."""
    assert load(write(tmp_path, MINIMAL), {"KEY": "k"}).accounts[0].poll.repeat_read_s == 21_600
    top = load(write(tmp_path, MINIMAL + "poll: {repeat_read_s: 3600}"), {"KEY": "k"})
    assert top.accounts[0].poll.repeat_read_s == 3600
    with pytest.raises(ConfigError, match=r"poll\.repeat_read_s: expected a number > 0, got 0$"):
        load(write(tmp_path, MINIMAL + "poll: {repeat_read_s: 0}"), {"KEY": "k"})


def test_schedule_repeat_share_is_read_and_must_be_a_share(tmp_path: Path) -> None:
    """schedule.repeat_share: most of the planning budget reads by time may take before their
    interval stretches; a share in [0, 1] (0: never stretched), anything else refused by
    name."""
    assert load(write(tmp_path, MINIMAL), {"KEY": "k"}).schedule.repeat_share == 0.25
    given = load(write(tmp_path, MINIMAL + "schedule: {repeat_share: 0.5}"), {"KEY": "k"})
    assert given.schedule.repeat_share == 0.5
    off = load(write(tmp_path, MINIMAL + "schedule: {repeat_share: 0}"), {"KEY": "k"})
    assert off.schedule.repeat_share == 0  # never stretched
    refused = r": schedule\.repeat_share: expected a number >= 0 and <= 1, got "
    for bad in ("1.5", "-0.1", "lots"):
        with pytest.raises(ConfigError, match=refused):
            load(write(tmp_path, MINIMAL + f"schedule: {{repeat_share: {bad}}}"), {"KEY": "k"})
