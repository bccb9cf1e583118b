"""``ctct-relay webhooks …`` against a live admin API: tables, --json, one-line errors."""

from __future__ import annotations

import argparse
import io
import socket
from collections.abc import Awaitable, Callable

import orjson
import pytest
from pytest_aiohttp import AiohttpServer

from relay.api import AdminSettings, create_admin_app
from relay.api.client import TOKEN_ENV, add_webhooks_parser, run_webhooks, webhooks_command
from relay.sinks.ssrf import Guard
from relay.store import Store
from tests.api.conftest import PUBLIC_URL, TOKEN, Clock

Cli = Callable[..., Awaitable[tuple[int, str, str]]]


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse a command line the way relay.cli will, with the webhooks commands added."""
    parser = argparse.ArgumentParser(prog="ctct-relay")
    add_webhooks_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


@pytest.fixture
async def cli(aiohttp_server: AiohttpServer, store: Store, clock: Clock) -> Cli:
    """Runs one CLI command against the admin API on a real port; returns (status, out, err)."""
    app = create_admin_app(store, AdminSettings(token=TOKEN), guard=Guard(), now_ms=clock)
    server = await aiohttp_server(app)
    api = str(server.make_url(""))

    async def run(*argv: str, environ: dict[str, str] | None = None) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        args = parse(["webhooks", *argv, "--api", api])
        env = {TOKEN_ENV: TOKEN} if environ is None else environ
        status = await webhooks_command(args, env, out, err)
        return status, out.getvalue(), err.getvalue()

    return run


async def test_add_list_show_rotate_remove(cli: Cli) -> None:
    """The whole life of a webhook through the CLI, readable output at each step."""
    status, out, err = await cli(
        "add", PUBLIC_URL, "-e", "click", "-e", "open", "--description", "crm"
    )
    assert (status, err) == (0, "")
    assert "secret:" in out
    assert "whsec_" in out
    hook_id = next(line.split()[-1] for line in out.splitlines() if line.startswith("id:"))
    assert hook_id.startswith("wh_")
    assert "click, open" in out

    status, out, _ = await cli("list")
    assert status == 0
    header, row = out.splitlines()
    assert header.split() == ["ID", "ENABLED", "EVENT", "TYPES", "URL"]
    assert row.split()[:2] == [hook_id, "yes"]
    assert row.endswith(PUBLIC_URL)

    status, out, _ = await cli("show", hook_id)
    assert status == 0
    assert "crm" in out
    assert "whsec_" not in out

    status, out, _ = await cli("rotate-secret", hook_id)
    assert status == 0
    assert "whsec_" in out
    assert "old secret until:" in out

    status, out, _ = await cli("remove", hook_id)
    assert (status, out) == (0, f"removed webhook {hook_id}\n")
    status, out, _ = await cli("list")
    assert (status, out) == (0, "no webhooks\n")


async def test_json_output(cli: Cli) -> None:
    """--json prints the API's answer as JSON."""
    status, out, _ = await cli("add", PUBLIC_URL, "-e", "*", "--json")
    assert status == 0
    created = orjson.loads(out)
    assert created["event_types"] == ["com.constantcontact.email.*"]
    status, out, _ = await cli("list", "--json")
    assert [h["id"] for h in orjson.loads(out)["webhooks"]] == [created["id"]]
    status, out, _ = await cli("deliveries", created["id"], "--json", "--status", "dead")
    assert orjson.loads(out) == {"deliveries": []}


async def test_deliveries_redeliver_and_recover_text(cli: Cli) -> None:
    """deliveries, redeliver and recover print one readable answer each."""
    status, out, _ = await cli("add", PUBLIC_URL, "-e", "click", "--json")
    hook_id = orjson.loads(out)["id"]
    assert await cli("deliveries", hook_id) == (0, "no deliveries\n", "")
    status, out, _ = await cli("recover", hook_id, "--since", "2025-01-01T00:00:00Z")
    assert (status, out) == (0, f"0 deliveries owed again to webhook {hook_id}\n")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["show", "wh_0000000000000000"], "no webhook with id", id="404"),
        pytest.param(["add", "http://10.0.0.1/", "-e", "click"], "url: 10.0.0.1", id="ssrf"),
        pytest.param(["add", PUBLIC_URL, "-e", "view"], "event_types[0]: unknown", id="400"),
        pytest.param(["redeliver", "99"], "no delivery with id 99", id="redeliver"),
        pytest.param(["recover", "wh_x", "--since", "soon"], "since: expected", id="since"),
    ],
)
async def test_api_errors_are_one_line(cli: Cli, argv: list[str], message: str) -> None:
    """An API error is one line 'ctct-relay: error: …' on stderr and exit status 1."""
    status, out, err = await cli(*argv)
    assert status == 1
    assert out == ""
    assert err.startswith("ctct-relay: error: ")
    assert message in err
    assert err.count("\n") == 1


async def test_missing_token_is_one_line(cli: Cli) -> None:
    """Without a token the 401 message tells what to send."""
    status, _, err = await cli("list", environ={})
    assert status == 1
    assert err == (
        "ctct-relay: error: Authorization: required"
        " (send 'Authorization: Bearer <admin token>') (HTTP 401)\n"
    )


async def test_token_flag_wins_over_environment(cli: Cli) -> None:
    """--token is used before the environment variable."""
    status, _, err = await cli("list", "--token", "wrong", environ={TOKEN_ENV: TOKEN})
    assert status == 1
    assert "bearer token is not valid" in err


def free_port() -> int:
    """A port nothing listens on (bound then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_unreachable_api_is_one_line() -> None:
    """No server: one line naming the API, exit 1, no traceback (sync entry point)."""
    args = parse(["webhooks", "list", "--api", f"http://127.0.0.1:{free_port()}"])
    out, err = io.StringIO(), io.StringIO()
    assert run_webhooks(args, {}, out, err) == 1
    assert err.getvalue().startswith("ctct-relay: error: cannot reach the admin API at http://")
    assert err.getvalue().count("\n") == 1


async def test_token_read_from_a_crlf_file_is_used_without_its_line_end(cli: Cli) -> None:
    """``CTCT_RELAY_ADMIN_TOKEN="$(cat token.txt)"`` of a CRLF file keeps a trailing carriage
    return (and a flag may keep a newline): whitespace around the token is dropped."""
    assert (await cli("list", environ={TOKEN_ENV: TOKEN + "\r"}))[0] == 0
    assert (await cli("list", "--token", f" {TOKEN}\r\n", environ={}))[0] == 0


@pytest.mark.parametrize(
    ("argv", "environ", "source"),
    [
        pytest.param(["--token", "adm1n\nsecret"], {}, "--token", id="flag-newline"),
        pytest.param([], {TOKEN_ENV: "adm1n\r\nsecret"}, TOKEN_ENV, id="env-crlf"),
        pytest.param([], {TOKEN_ENV: "adm1n\x7fsecret"}, TOKEN_ENV, id="env-del"),
    ],
)
async def test_token_with_a_control_character_is_a_usage_error(
    cli: Cli, argv: list[str], environ: dict[str, str], source: str
) -> None:
    """A control character inside the token: one line naming where it came from, exit 2, the
    token not shown, no traceback (aiohttp would refuse the header with a ValueError)."""
    status, out, err = await cli("list", *argv, environ=environ)
    assert (status, out) == (2, "")
    assert err.startswith(f"ctct-relay: error: {source}: the admin token holds a control character")
    assert err.count("\n") == 1
    assert "adm1n" not in err
    assert "secret" not in err


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-2", "fast"])
@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        pytest.param(["add", PUBLIC_URL, "-e", "click"], "--rate-limit", id="rate-limit"),
        pytest.param(["list"], "--timeout", id="timeout"),
    ],
)
def test_non_finite_or_non_positive_numbers_are_usage_errors(
    capsys: pytest.CaptureFixture[str], argv: list[str], flag: str, value: str
) -> None:
    """--rate-limit nan would reach the API as null (no limit at all) and --timeout inf ended in
    an OverflowError: both refuse anything but a finite number > 0, argparse-style, exit 2."""
    with pytest.raises(SystemExit) as exited:
        parse(["webhooks", *argv, f"{flag}={value}"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {flag}: expected a" in err
    assert repr(value) in err
    assert "Traceback" not in err


async def test_a_fractional_rate_limit_is_sent(cli: Cli) -> None:
    """A finite positive --rate-limit reaches the webhook as given."""
    status, out, _ = await cli("add", PUBLIC_URL, "-e", "click", "--rate-limit", "0.5", "--json")
    assert status == 0
    assert orjson.loads(out)["rate_limit_per_s"] == 0.5
