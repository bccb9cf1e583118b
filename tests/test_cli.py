"""The command line as a user runs it: real processes, clear one-line errors, no tracebacks."""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from relay.cli import _parser
from tests.procs import SimProcess

ROOT = Path(__file__).resolve().parent.parent


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        check=False,
    )


def config(tmp_path: Path, base_url: str, extra: str = "") -> Path:
    path = tmp_path / "relay.yaml"
    path.write_text(
        f"""
accounts:
  - name: t
    base_url: {base_url}
    api_key: cli-key-9d8c7b
    access_token: cli-token-1a2b3c
http:
  max_attempts: 2
  backoff_base_s: 0.01
{extra}"""
    )
    return path


def assert_clean_failure(result: subprocess.CompletedProcess[str], code: int, text: str) -> None:
    assert result.returncode == code, result.stderr
    assert text in result.stderr
    assert "Traceback" not in result.stderr
    for secret in ("cli-key-9d8c7b", "cli-token-1a2b3c"):
        assert secret not in result.stderr + result.stdout


def test_unknown_endpoint_is_a_usage_error(tmp_path: Path) -> None:
    """An endpoint name not in the catalogue exits 2 and lists the known names."""
    result = run("fetch", "campaign.click", "--config", str(config(tmp_path, "http://127.0.0.1:1")))
    assert_clean_failure(result, 2, "unknown endpoint 'campaign.click'; known endpoints:")


def test_malformed_config_names_the_key(tmp_path: Path) -> None:
    """A config error exits 2 naming the file and the key."""
    path = config(tmp_path, "http://127.0.0.1:1", "logging:\n  level: loud\n")
    result = run("fetch", "campaign.opens", "--id", "1", "--config", str(path))
    assert_clean_failure(result, 2, "logging.level: expected one of debug, info, warning, error")


def test_an_empty_config_path_says_it_is_empty() -> None:
    """``--config ""`` exits 2 saying the path is empty (it was ".: cannot read config file:
    Is a directory")."""
    result = run("fetch", "campaign.opens", "--id", "1", "--config", "")
    assert_clean_failure(result, 2, "config file: the path is empty")
    assert "Is a directory" not in result.stderr


def test_broken_yaml_names_the_line(tmp_path: Path) -> None:
    """Invalid YAML exits 2 with the line and column."""
    path = tmp_path / "bad.yaml"
    path.write_text("accounts:\n  - name: [unclosed\n")
    result = run("fetch", "campaign.opens", "--config", str(path))
    assert_clean_failure(result, 2, "not valid YAML at line")


def test_unreachable_base_url_is_a_runtime_error(tmp_path: Path) -> None:
    """Connection refused exits 1 with the host and port, after the configured retries."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = config(tmp_path, f"http://127.0.0.1:{port}")
    result = run("fetch", "campaign.opens", "--id", "1", "--config", str(path))
    assert_clean_failure(result, 1, f"cannot connect to 127.0.0.1:{port}")


def test_missing_resource_id_is_a_usage_error(tmp_path: Path) -> None:
    """An endpoint that needs a campaign id refuses to run without one."""
    result = run("fetch", "campaign.opens", "--config", str(config(tmp_path, "http://127.0.0.1:1")))
    assert_clean_failure(result, 2, "needs a campaign id")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(
            ["campaign.clicks", "--id", "1", "--max-pages", "0"],
            "argument --max-pages: expected a whole number from 1 up, got '0'",
            id="max-pages-0",
        ),
        pytest.param(
            ["campaign.clicks", "--id", "1", "--max-pages=-3"],
            "argument --max-pages: expected a whole number from 1 up, got '-3'",
            id="max-pages-negative",
        ),
        pytest.param(
            ["campaign.clicks", "--id", "1", "--link-id", "5"],
            "ctct-relay: error: --link-id: campaign.clicks takes no link id"
            " (the *.clicks_by_link endpoints do)",
            id="link-id",
        ),
        pytest.param(
            ["campaign.summary", "--id", "1", "--since", "2026-01-01T00:00:00Z"],
            "ctct-relay: error: --since: campaign.summary takes no since time"
            " (it has no time filter)",
            id="since",
        ),
        pytest.param(
            ["campaigns.sent", "--id", "1"],
            "ctct-relay: error: --id: campaigns.sent is account-wide and takes no id",
            id="id",
        ),
        pytest.param(
            ["contact.summary", "--id", "1", "--max-pages", "2"],
            "ctct-relay: error: --max-pages: contact.summary is not paged",
            id="max-pages-unpaged",
        ),
    ],
)
def test_fetch_options_the_endpoint_ignores_are_usage_errors(
    tmp_path: Path, argv: list[str], message: str
) -> None:
    """An option the endpoint would ignore exits 2 naming it, before any request (--max-pages 0
    printed the first page, --link-id on campaign.clicks every click, both with exit 0)."""
    path = config(tmp_path, "http://127.0.0.1:1")
    result = run("fetch", *argv, "--config", str(path))
    assert_clean_failure(result, 2, message)
    assert result.stderr.splitlines()[-1].endswith(message)
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("argv", "shown"),
    [
        pytest.param(["campaign.opens", "--id", "abc"], "'abc'", id="campaign-letters"),
        pytest.param(["contact.clicks", "--id", "12a"], "'12a'", id="contact-letters"),
        pytest.param(["campaign.sends", "--id", "../1"], "'../1'", id="path"),
        pytest.param(["campaign.summary", "--id", "1" * 65], "'" + "1" * 65 + "'", id="65-digits"),
        pytest.param(["contact.opens", "--id="], "''", id="empty"),
    ],
)
def test_fetch_id_that_is_not_an_id_is_a_usage_error(
    tmp_path: Path, argv: list[str], shown: str
) -> None:
    """``fetch --id`` takes 1 to 64 digits, as ``targets`` and ``replay --campaign`` do: anything
    else is argparse's usage error naming --id, exit 2, before any request (``--id abc`` was
    requested as .../campaigns/abc/tracking/opens and retried)."""
    path = config(tmp_path, "http://127.0.0.1:1")
    result = run("fetch", *argv, "--config", str(path))
    message = f"argument --id: expected a Constant Contact id (1 to 64 digits), got {shown}"
    assert_clean_failure(result, 2, message)
    assert result.stderr.splitlines()[-1].endswith(message)
    assert result.stdout == ""


def test_fetch_link_id_that_is_not_an_id_is_a_usage_error(tmp_path: Path) -> None:
    """``fetch --link-id`` takes digits as ``--id`` does: ``../x`` was put in the request path."""
    path = config(tmp_path, "http://127.0.0.1:1")
    argv = ["campaign.clicks_by_link", "--id", "1", "--link-id", "../x", "--config", str(path)]
    result = run("fetch", *argv)
    message = "argument --link-id: expected a Constant Contact id (1 to 64 digits), got '../x'"
    assert_clean_failure(result, 2, message)
    assert result.stdout == ""


def test_missing_scenario_file_is_a_usage_error() -> None:
    """The simulator refuses a scenario path that does not exist."""
    result = run("sim", "--config", "/nonexistent/scenario.yaml")
    assert_clean_failure(result, 2, "/nonexistent/scenario.yaml")


def test_sim_start_up_line_counts_its_api_keys_and_shows_none(tmp_path: Path) -> None:
    """``ctct-relay sim`` says where it listens and how many api keys it accepts, from which
    scenario file, and prints no key or token (it printed ``api keys: <each key>``)."""
    secrets = ("apiKEYsecret7f3a91c2", "tokSECRET-0b1c", "apiKEYsecond-55aa", "tokSECOND-77")
    keys = [
        {"api_key": secrets[0], "access_token": secrets[1], "more_tokens": ["tokMORE-9e9e"]},
        {"api_key": secrets[2], "access_token": secrets[3]},
    ]
    simulator = SimProcess(tmp_path, {"keys": keys}).start()
    try:
        text = simulator.output()
    finally:
        simulator.kill()
    url = simulator.url
    line = (
        f"ctct simulator listening on {url}/v2 (2 api keys from {tmp_path / 'scenario.yaml'};"
        f" control: {url}/_sim)"
    )
    assert line in text.splitlines(), text
    for secret in (*secrets, "tokMORE-9e9e"):
        assert secret not in text


@pytest.mark.parametrize("command", ["sim --config", "demo --no-kafka --scenario"])
def test_a_scenario_date_that_does_not_exist_is_one_line(tmp_path: Path, command: str) -> None:
    """start: 2026-02-30T… was a 43-line ValueError traceback from YAML's timestamp, in sim and
    through demo --scenario: now the scenario's one line, exit 2."""
    path = tmp_path / "feb30.yaml"
    path.write_text("start: 2026-02-30T08:00:00Z\n")
    result = run(*command.split(), str(path), timeout=30)
    assert_clean_failure(result, 2, "")
    assert result.stderr == (
        "ctct-relay: error: feb30.yaml: start: expected an ISO 8601 date and time,"
        " got '2026-02-30T08:00:00Z'\n"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(
            ["sim", "--port", "99999"],
            "argument --port: expected a port number from 1 to 65535, got '99999'",
            id="sim-port-range",
        ),
        pytest.param(
            ["dev-kafka", "--port", "0"],
            "argument --port: expected a port number from 1 to 65535, got '0'",
            id="dev-kafka-port-range",
        ),
        pytest.param(
            ["demo", "--no-kafka", "--duration", "nan"],
            "argument --duration: expected a finite number greater than 0, got 'nan'",
            id="demo-duration",
        ),
    ],
)
def test_bad_numbers_of_sim_and_demo_are_usage_errors(argv: list[str], message: str) -> None:
    """A port out of range (an OverflowError from the socket before) or a duration that is not
    a finite positive number: argparse's one line, exit 2."""
    assert_clean_failure(run(*argv), 2, message)


def test_sim_on_a_port_in_use_is_one_line() -> None:
    """The simulator on a taken port says so in one line (it was an OSError traceback), exit 2
    like ``run``'s "admin: cannot listen on …"."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("sim", "--port", str(port))
    assert_clean_failure(result, 2, f"sim: cannot listen on 127.0.0.1:{port}: ")
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("where", "message"),
    [
        pytest.param("a-file", "is not a directory", id="file"),
        pytest.param("a-file/state", "cannot keep state in", id="under-a-file"),
    ],
)
def test_demo_state_dir_that_cannot_hold_state_is_one_line(
    tmp_path: Path, where: str, message: str
) -> None:
    """``demo --state-dir`` that cannot be a directory: one line naming the option, exit 2,
    before anything starts (it was a FileNotFoundError/FileExistsError traceback)."""
    (tmp_path / "a-file").write_text("not a directory")
    result = run("demo", "--no-kafka", "--duration", "5", "--state-dir", str(tmp_path / where))
    assert_clean_failure(result, 2, "ctct-relay: error: --state-dir: ")
    assert message in result.stderr
    assert str(tmp_path / where) in result.stderr
    assert result.stdout == ""


def test_endpoints_lists_the_catalogue() -> None:
    """`endpoints` prints every catalogue entry."""
    result = run("endpoints")
    assert result.returncode == 0
    assert "campaign.clicks_by_link" in result.stdout
    assert "contact.summary_by_campaign" in result.stdout


@pytest.mark.integration
def test_demo_shows_events_flowing() -> None:
    """The demo (Kafka left out) delivers events to its webhook receiver within seconds."""
    result = run("demo", "--duration", "8", "--no-kafka", timeout=90)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("webhook  ")]
    assert len(lines) >= 5, result.stdout
    assert "demo: " in result.stdout
    assert "Traceback" not in result.stderr


ADMIN_OPTIONS = {"--api", "--token", "--json", "--timeout"}  # the README states them once


def _options(parser: argparse.ArgumentParser) -> set[str]:
    """Long options of a command, of its actions too (webhooks add, targets list, …)."""
    found: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _options(sub)
        found |= {o for o in action.option_strings if o.startswith("--") and o != "--help"}
    return found


def test_readme_commands_table_matches_the_parser() -> None:
    """Every command of the README's table shows exactly the options its --help has (the
    admin API's common options are named once below the table), and every command is there."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Commands\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `ctct-relay ([a-z-]+(?:\\\|[a-z-]+)*)([^`]*)`", section, re.MULTILINE)
    (commands,) = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    documented: set[str] = set()
    for names, usage in rows:
        shown = set(re.findall(r"--[a-z-]+", usage)) - ADMIN_OPTIONS
        expected: set[str] = set()
        for name in names.split("\\|"):  # pause|resume: one row for both
            documented.add(name)
            if name != "webhooks":  # its actions' options: `ctct-relay webhooks ACTION --help`
                expected |= _options(commands.choices[name]) - ADMIN_OPTIONS
        assert shown == expected, f"README row of {names}"
    assert documented == set(commands.choices)
    common = section.split("The admin API commands", 1)[1].split("\n\n", 1)[0]
    for option in ADMIN_OPTIONS:
        assert f"`{option}" in common


@pytest.mark.parametrize("where", ["a-file", "a-file/data"])
def test_dev_kafka_data_dir_that_cannot_hold_data_is_one_line(tmp_path: Path, where: str) -> None:
    """``dev-kafka --data-dir`` that cannot be a directory: one line naming the option and
    the reason, exit 1 (it was a FileExistsError/NotADirectoryError traceback)."""
    (tmp_path / "a-file").write_text("not a directory")
    result = run("dev-kafka", "--data-dir", str(tmp_path / where))
    assert_clean_failure(result, 1, f"--data-dir {tmp_path / where}: cannot keep the broker's")
    assert len(result.stderr.strip().splitlines()) == 1


def test_dev_kafka_cache_variable_that_cannot_hold_the_cache_is_one_line(tmp_path: Path) -> None:
    """CTCT_RELAY_KAFKA_CACHE under a file: one line naming the variable (it was a traceback)."""
    (tmp_path / "a-file").write_text("not a directory")
    cache = tmp_path / "a-file" / "cache"
    result = run("dev-kafka", env={"CTCT_RELAY_KAFKA_CACHE": str(cache)})
    assert_clean_failure(result, 1, f"CTCT_RELAY_KAFKA_CACHE={cache}: cannot keep the Kafka cache")
    assert "Not a directory" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_sim_finds_its_default_scenario_from_any_directory(tmp_path: Path) -> None:
    """Without --config, the packaged scenario is used wherever the command runs (it was looked
    up as config/sim.example.yaml under the current directory): here the simulator gets as
    far as its port, which is taken."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "relay", "sim", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            check=False,
        )
    assert_clean_failure(result, 2, f"sim: cannot listen on 127.0.0.1:{port}: ")


# Run in a fresh interpreter: a KeyboardInterrupt raised by the import of relay.cli, which is
# where a Ctrl-C at start-up lands (the imports take most of a second on a slow host).
_INTERRUPTED_IMPORT = """
import runpy, sys

class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == "relay.cli":
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, Interrupt())
sys.argv = ["ctct-relay", "status"]
runpy.run_module("relay", run_name="__main__")
"""


def test_ctrl_c_during_the_start_up_imports_is_exit_130_without_a_traceback() -> None:
    """`python -m relay` (and ctct-relay, the same function) interrupted while it imports the
    command line exits 130 like an interrupt later on, with no KeyboardInterrupt traceback."""
    result = subprocess.run(
        [sys.executable, "-c", _INTERRUPTED_IMPORT],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout) == (130, "")
    assert "Traceback" not in result.stderr, result.stderr


def test_the_console_script_is_the_interrupt_safe_entry_point() -> None:
    """pyproject's ctct-relay script runs relay.__main__:run, which catches a Ctrl-C during the
    imports; relay.cli:main cannot (the script imports relay.cli before calling it)."""
    text = (ROOT / "pyproject.toml").read_text()
    assert 'ctct-relay = "relay.__main__:run"' in text
