"""``ctct-relay webhooks …`` against a live admin API: tables, --json, one-line errors."""

from __future__ import annotations

import argparse
import io
import socket
from collections.abc import Awaitable, Callable

import aiohttp
import orjson
import pytest
from pytest_aiohttp import AiohttpServer

from relay.api import AdminSettings, create_admin_app
from relay.api.client import (
    TOKEN_ENV,
    AdminApiError,
    AdminClient,
    add_webhooks_parser,
    api_url,
    run_webhooks,
    terminal_safe,
    webhooks_command,
)
from relay.cli import main
from relay.sinks.ssrf import Guard
from relay.store import Store
from tests.api.conftest import KEY, PUBLIC_URL, T0, TOKEN, Clock, activity, foreign_app

Cli = Callable[..., Awaitable[tuple[int, str, str]]]


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse a command line the way relay.cli will, with the webhooks commands added."""
    parser = argparse.ArgumentParser(prog="ctct-relay")
    add_webhooks_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


@pytest.fixture
async def cli(aiohttp_server: AiohttpServer, store: Store, clock: Clock) -> Cli:
    """Runs one CLI command against the admin API on a real port; returns (status, out, err)."""
    return await cli_on(aiohttp_server, store, clock)


@pytest.fixture
async def any_cli(aiohttp_server: AiohttpServer, any_store: Store, clock: Clock) -> Cli:
    """``cli`` over each state store backend."""
    return await cli_on(aiohttp_server, any_store, clock)


async def cli_on(aiohttp_server: AiohttpServer, store: Store, clock: Clock) -> Cli:
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


async def test_text_views_hide_what_a_url_carries_as_status_does(any_cli: Cli) -> None:
    """add, list, show, update and rotate-secret print a webhook URL without its user info,
    fragment and query values (a password or token), as status does; --json has it as
    registered."""
    url = "https://u:PSEKRET7@93.184.216.34/hook?token=QSEKRET8#FSEKRET9"
    status, out, err = await any_cli("add", url, "-e", "click")
    assert (status, err) == (0, "")
    hook_id = next(line.split()[-1] for line in out.splitlines() if line.startswith("id:"))
    outs = [out]
    for argv in (
        ("list",),
        ("show", hook_id),
        ("update", hook_id, "--description", "crm"),
        ("rotate-secret", hook_id),
    ):
        status, out, err = await any_cli(*argv)
        assert (status, err) == (0, "")
        outs.append(out)
    for out in outs:
        assert "https://93.184.216.34/hook?token=***" in out
        assert "SEKRET" not in out
        assert "//u" not in out
    assert outs[2].count("--json has them") == 1  # show says what it left out
    status, out, _ = await any_cli("show", hook_id, "--json")
    assert orjson.loads(out)["url"] == url
    status, out, _ = await any_cli("list", "--json")
    assert orjson.loads(out)["webhooks"][0]["url"] == url


async def test_list_tells_apart_urls_differing_only_in_their_query(cli: Cli) -> None:
    """Two webhooks whose URLs differ only in their query: list shows each query's keys with
    the values as ***, so the rows differ, and no value appears; --json has the URLs whole."""
    base = "https://93.184.216.34/hook"
    urls = [f"{base}?token=QSEKRET1&tenant=TSEKRET2", f"{base}?key=QSEKRET3"]
    for url in urls:
        assert (await cli("add", url, "-e", "click"))[0] == 0
    status, out, err = await cli("list")
    assert (status, err) == (0, "")
    rows = out.splitlines()[1:]
    assert sorted(row.split()[-1] for row in rows) == [
        f"{base}?key=***",
        f"{base}?token=***&tenant=***",
    ]
    assert "SEKRET" not in out
    status, out, _ = await cli("list", "--json")
    assert sorted(h["url"] for h in orjson.loads(out)["webhooks"]) == sorted(urls)


async def test_secret_prints_the_current_secret(cli: Cli) -> None:
    """`webhooks secret ID` prints the secret alone on its first line (then the rotation's
    grace, when one runs); --json the API's answer; show and list never print it."""
    status, out, _ = await cli("add", PUBLIC_URL, "-e", "*", "--json")
    created = orjson.loads(out)
    status, out, err = await cli("secret", created["id"])
    assert (status, out, err) == (0, created["secret"] + "\n", "")
    status, out, _ = await cli("rotate-secret", created["id"], "--json")
    rotated = orjson.loads(out)
    status, out, _ = await cli("secret", created["id"])
    first, second = out.splitlines()
    assert first == rotated["secret"]
    assert second == (
        f"(the previous secret also signs until {rotated['previous_secret_expires_at']})"
    )
    status, out, _ = await cli("secret", created["id"], "--json")
    assert orjson.loads(out)["secret"] == rotated["secret"]
    for argv in (("show", created["id"]), ("list",)):
        status, out, _ = await cli(*argv)
        assert "whsec_" not in out
    status, out, err = await cli("secret", "wh_0000000000000000")
    assert (status, out) == (1, "")
    assert err.startswith("ctct-relay: error: no webhook")


async def test_json_output(cli: Cli) -> None:
    """--json prints the API's answer as JSON."""
    status, out, _ = await cli("add", PUBLIC_URL, "-e", "*", "--json")
    assert status == 0
    created = orjson.loads(out)
    assert created["event_types"] == ["com.constantcontact.email.*"]
    status, out, _ = await cli("list", "--json")
    assert [h["id"] for h in orjson.loads(out)["webhooks"]] == [created["id"]]
    status, out, _ = await cli("deliveries", created["id"], "--json", "--status", "dead")
    assert orjson.loads(out) == {"deliveries": [], "next_before": None}


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


async def test_update_re_enables_a_webhook_disabled_by_a_410(cli: Cli, store: Store) -> None:
    """`webhooks update --enable` undoes a 410's disable, the way the log hint says; every other
    PATCH field has its option, and only the fields given change."""
    status, out, _ = await cli("add", PUBLIC_URL, "-e", "click", "--rate-limit", "5", "--json")
    created = orjson.loads(out)
    hook_id = created["id"]
    await store.disable_webhook(hook_id, "410 Gone from the endpoint", 0)
    status, out, _ = await cli("show", hook_id)
    (enabled,) = [line for line in out.splitlines() if line.startswith("enabled:")]
    assert enabled.split(maxsplit=1)[1] == (
        f"no (410 Gone from the endpoint; ctct-relay webhooks update {hook_id} --enable)"
    )

    status, out, err = await cli("update", hook_id, "--enable")
    assert (status, err) == (0, "")
    (enabled,) = [line for line in out.splitlines() if line.startswith("enabled:")]
    assert enabled.split() == ["enabled:", "yes"]
    shown = await store.webhook(hook_id)
    assert shown.enabled is True
    assert shown.disabled_reason is None
    assert shown.rate_limit_per_s == 5.0  # untouched

    other = "https://93.184.216.35/other"
    status, out, err = await cli(
        "update",
        hook_id,
        "--url",
        other,
        "-e",
        "open,bounce",
        "-e",
        "com.constantcontact.email.*",
        "--description",
        "new owner",
        "--disable",
        "--no-rate-limit",
        "--json",
    )
    assert (status, err) == (0, "")
    changed = orjson.loads(out)
    assert changed["url"] == other
    assert changed["event_types"] == [
        "com.constantcontact.email.open",
        "com.constantcontact.email.bounce",
        "com.constantcontact.email.*",
    ]
    assert changed["description"] == "new owner"
    assert changed["enabled"] is False
    assert changed["rate_limit_per_s"] is None
    assert "secret" not in changed

    status, out, _ = await cli("update", hook_id, "--rate-limit", "2.5", "--json")
    assert status == 0
    again = orjson.loads(out)
    assert again["rate_limit_per_s"] == 2.5
    assert (again["url"], again["enabled"], again["description"]) == (other, False, "new owner")


async def test_add_and_rotate_take_a_given_secret(cli: Cli) -> None:
    """--secret on add registers that secret and on rotate-secret makes it the new one; the
    API's check of its form comes back as one line."""
    first = "whsec_" + "A" * 32
    second = "whsec_" + "B" * 32
    status, out, err = await cli("add", PUBLIC_URL, "-e", "click", "--secret", first, "--json")
    assert (status, err) == (0, "")
    created = orjson.loads(out)
    assert created["secret"] == first
    status, out, err = await cli("rotate-secret", created["id"], "--secret", second, "--json")
    assert (status, err) == (0, "")
    assert orjson.loads(out)["secret"] == second
    status, out, err = await cli("rotate-secret", created["id"], "--secret", "hunter2")
    assert (status, out) == (1, "")
    assert err.startswith("ctct-relay: error: secret")
    assert err.count("\n") == 1
    assert "hunter2" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["update", "wh_x"], "update: nothing to change", id="nothing"),
        pytest.param(["update", "wh_x", "-e", "click,"], "--event-type: empty", id="empty-type"),
        pytest.param(["add", PUBLIC_URL, "-e", ""], "--event-type: empty", id="add-empty-type"),
    ],
)
async def test_update_usage_errors_are_one_line_exit_2(
    cli: Cli, argv: list[str], message: str
) -> None:
    """An update without a change, or an empty event type, never reaches the API: exit 2."""
    status, out, err = await cli(*argv)
    assert (status, out) == (2, "")
    assert err.startswith(f"ctct-relay: error: {message}")
    assert err.count("\n") == 1


async def test_update_of_an_unknown_webhook_is_one_line(cli: Cli) -> None:
    """The API's 404 for an unknown id: one line, exit 1."""
    status, out, err = await cli("update", "wh_0000000000000000", "--enable")
    assert (status, out) == (1, "")
    assert "no webhook with id" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["--enable", "--disable"], id="enable-disable"),
        pytest.param(["--rate-limit", "3", "--no-rate-limit"], id="rate-no-rate"),
        pytest.param(["--rate-limit", "nan"], id="rate-nan"),
        pytest.param(["--rate-limit", "0"], id="rate-zero"),
    ],
)
def test_update_conflicting_or_bad_options_are_usage_errors(
    capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """Options that contradict each other, or a rate that is not finite and > 0: argparse's
    usage error, exit 2, no traceback."""
    with pytest.raises(SystemExit) as exited:
        parse(["webhooks", "update", "wh_x", *argv])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument" in err
    assert "Traceback" not in err


async def test_deliveries_pages_back_with_before(cli: Cli, store: Store) -> None:
    """`webhooks deliveries --limit N` says how to ask for older ones; `--before` gets them."""
    status, out, _ = await cli("add", PUBLIC_URL, "-e", "*", "--json")
    hook_id = orjson.loads(out)["id"]
    await store.ensure_streams([KEY], T0)
    sid = next(s.id for s in await store.streams() if s.key == KEY)
    await store.commit_page(sid, [activity(i, T0 - 9000 + i) for i in range(3)], T0)
    await store.fanout(100, T0)
    ids = [d.id for d in await store.deliveries(hook_id, 10)]
    status, out, err = await cli("deliveries", hook_id, "--limit", "2")
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert [line.split()[0] for line in lines[1:3]] == [str(i) for i in ids[:2]]
    assert lines[-1] == f"(older ones: --before {ids[1]})"
    status, out, _ = await cli("deliveries", hook_id, "--limit", "2", "--before", str(ids[1]))
    lines = out.splitlines()
    assert status == 0
    assert len(lines) == 2  # the header and the oldest; no hint: nothing older
    assert lines[1].split()[0] == str(ids[2])
    status, out, _ = await cli("deliveries", hook_id, "--before", str(ids[1]), "--json")
    assert [d["id"] for d in orjson.loads(out)["deliveries"]] == [ids[2]]


@pytest.mark.parametrize("value", ["0", "-1", "x", "٣"])
def test_deliveries_before_must_be_a_delivery_id(
    capsys: pytest.CaptureFixture[str], value: str
) -> None:
    """--before takes a delivery id (an integer >= 1): anything else is a usage error, exit 2."""
    with pytest.raises(SystemExit) as exited:
        parse(["webhooks", "deliveries", "wh_x", f"--before={value}"])
    assert exited.value.code == 2
    assert "error: argument --before: expected a delivery id" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "501", "-1", "x", "٣", "9" * 5000])
def test_deliveries_limit_out_of_range_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], value: str
) -> None:
    """--limit takes 1 to 500, as the API does: anything else is a usage error naming the
    option, exit 2 (it was sent, and the API's 400 was exit 1)."""
    with pytest.raises(SystemExit) as exited:
        parse(["webhooks", "deliveries", "wh_x", f"--limit={value}"])
    assert exited.value.code == 2
    assert "error: argument --limit: expected an integer from 1 to 500" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("api", "problem"),
    [
        pytest.param(
            "http://admin:PROXYPASSWORD@127.0.0.1:18381",
            "a user name or password cannot go in the URL (give the admin token with --token or"
            " $CTCT_RELAY_ADMIN_TOKEN), got 'http://***@127.0.0.1:18381'",
            id="userinfo",
        ),
        pytest.param(
            "http://relay..internal:8081",
            "expected a host name or IP address in the URL such as http://127.0.0.1:8081,"
            " got 'http://relay..internal:8081'",
            id="empty-label",
        ),
        pytest.param(
            "127.0.0.1:18381",
            "expected an http:// or https:// URL such as http://127.0.0.1:8081, got"
            " '127.0.0.1:18381'; did you mean 'http://127.0.0.1:18381'?",
            id="no-scheme",
        ),
        pytest.param(
            "http://127.0.0.1:80810",
            "expected a port from 1 to 65535 in the URL such as http://127.0.0.1:8081, got"
            " 'http://127.0.0.1:80810'",
            id="port",
        ),
        pytest.param(
            "http://127.0.0.1:8081/?x=1",
            "expected a base URL without ?query or #fragment such as http://127.0.0.1:8081,"
            " got 'http://127.0.0.1:8081/?x=1'",
            id="query",
        ),
    ],
)
@pytest.mark.parametrize("command", [["status"], ["webhooks", "list"]])
def test_an_unusable_api_url_is_a_usage_error(
    api: str, problem: str, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """--api is checked before any request: exit 2 and argparse's one error line naming --api,
    never the password of the URL (a traceback with a token, the password without one)."""
    with pytest.raises(SystemExit) as exited:
        main([*command, "--api", api, "--token", TOKEN])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "PROXYPASSWORD" not in err
    assert err.splitlines()[-1] == (
        f"ctct-relay {' '.join(command)}: error: argument --api: {problem}"
    )


@pytest.mark.parametrize(
    "api", ["http://127.0.0.1:8081", "https://relay.internal/admin/", "http://[::1]:9", "HTTP://x"]
)
def test_usable_api_urls_pass(api: str) -> None:
    """Hosts, IPv6 literals, path prefixes (behind a proxy) and default ports are fine."""
    assert api_url(api) == api


@pytest.mark.parametrize(
    ("api", "token"),
    [
        pytest.param("http://admin:PROXYPASSWORD@127.0.0.1:9", TOKEN, id="userinfo-and-token"),
        pytest.param("http://relay..internal:8081", None, id="idna"),
    ],
)
async def test_client_turns_an_unusable_url_into_one_error(api: str, token: str | None) -> None:
    """AdminClient.call, given a URL that did not pass --api's check (a caller of the library),
    raises AdminApiError without the password (aiohttp's ValueError and UnicodeError escaped
    as tracebacks)."""
    async with aiohttp.ClientSession() as session:
        with pytest.raises(AdminApiError) as failed:
            await AdminClient(session, api, token).call("GET", "/v1/status")
    message = str(failed.value)
    assert "PROXYPASSWORD" not in message
    assert message.startswith("admin API at http://")
    assert "not a usable URL" in message


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        pytest.param(
            ["webhooks", "recover", "wh_x", "--since", "soon"],
            "expected an RFC 3339 time such as 2025-01-31T12:00:00Z, got 'soon'",
            id="recover-words",
        ),
        pytest.param(
            ["replay", "--stream", "1", "--since", "yesterday"],
            "expected an RFC 3339 time such as 2025-01-31T12:00:00Z, got 'yesterday'",
            id="replay-words",
        ),
        pytest.param(
            ["replay", "--account", "acme", "--since", "2026-12-06"],
            "expected an RFC 3339 time such as 2025-01-31T12:00:00Z, got '2026-12-06'",
            id="replay-date-only",
        ),
        pytest.param(
            ["replay", "--stream", "1", "--since", "2026-12-06T00:00:00+25:00"],
            "expected an RFC 3339 time such as 2025-01-31T12:00:00Z,"
            " got '2026-12-06T00:00:00+25:00'",
            id="replay-offset",
        ),
        pytest.param(
            ["replay", "--stream", "1", "--since", "0001-01-01T00:00:00Z"],
            "must be 1970-01-01T00:00:00Z or later, got '0001-01-01T00:00:00Z'",
            id="replay-before-1970",
        ),
    ],
)
def test_a_since_that_is_not_a_time_is_a_usage_error(
    argv: list[str], problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--since is read as RFC 3339 before any request (the API's HTTP 400 was exit 1): argparse's
    usage block and one error line naming --since, exit 2; nothing is sent (no API listens)."""
    api = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--api", api])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: ctct-relay ")
    command = " ".join(argv[:2] if argv[0] == "webhooks" else argv[:1])
    assert err.splitlines()[-1] == f"ctct-relay {command}: error: argument --since: {problem}"


ESCAPES = "\x1b]0;PWNED\x07\x1b[2J\x1b[31mfake\x1b[0m\x9b1m\u202eevil\nid: wh_fake"


async def test_stored_text_cannot_drive_the_terminal(cli: Cli) -> None:
    """A description holding terminal escapes, C1 controls, a bidi override and a line break is
    printed escaped by show (no ESC, BEL or CSI byte; the line break a space, so no forged
    line); --json keeps the text as it is, JSON-escaped."""
    status, out, _ = await cli("add", PUBLIC_URL, "-e", "*", "--description", ESCAPES, "--json")
    hook_id = orjson.loads(out)["id"]
    status, shown, err = await cli("show", hook_id)
    assert (status, err) == (0, "")
    assert not any(c in shown for c in "\x1b\x07\x9b\u202e")
    assert " \\x1b]0;PWNED\\x07\\x1b[2J\\x1b[31mfake\\x1b[0m\\x9b1m\\u202eevil id: wh_fake" in shown
    assert [line.split() for line in shown.splitlines() if line.startswith("id:")] == [
        ["id:", hook_id]
    ]
    status, out, _ = await cli("show", hook_id, "--json")
    assert orjson.loads(out)["description"] == ESCAPES
    assert "\x1b" not in out  # JSON escapes it as \u001b


def test_terminal_safe_keeps_what_is_printable() -> None:
    """Plain text, tabs of nothing, accents and emoji pass; controls are shown escaped."""
    assert terminal_safe("café 🎉 ok") == "café 🎉 ok"
    assert terminal_safe("a\tb\r\nc\x7f") == "a\\x09b\\x0d\\x0ac\\x7f"
    assert terminal_safe("one\ntwo\x1b", keep="\n") == "one\ntwo\\x1b"


async def test_webhooks_remove_through_a_redirect_is_an_error(
    aiohttp_server: AiohttpServer,
) -> None:
    """`webhooks remove` answered by a redirect (an ingress sending http to https) printed
    "removed webhook" with nothing removed: now one error line naming the redirect, exit 1."""
    server = await aiohttp_server(foreign_app(308, location="https://relay.example.com/"))
    out, err = io.StringIO(), io.StringIO()
    args = parse(["webhooks", "remove", "wh_1", "--api", str(server.make_url(""))])
    assert await webhooks_command(args, {}, out, err) == 1
    assert out.getvalue() == ""
    assert "HTTP 308 Permanent Redirect, a redirect to https://relay.example.com/" in err.getvalue()
