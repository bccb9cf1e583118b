"""``ctct-relay status|replay|pause|resume|targets`` against a live admin API."""

from __future__ import annotations

import argparse
import asyncio
import io

import orjson
import pytest
from pytest_aiohttp import AiohttpServer

from relay.api import AdminSettings, create_admin_app
from relay.api.client import TOKEN_ENV
from relay.api.ops_client import add_ops_parsers, ops_command, run_ops
from relay.api.status import AccountQuota, RelayView
from relay.cli import main
from relay.events import WILDCARD
from relay.sinks.ssrf import Guard
from relay.store import Store, Webhook
from tests.api.conftest import KEY, T0, TOKEN, Clock, activity, foreign_app
from tests.api.test_client import free_port


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse a command line the way relay.cli does."""
    parser = argparse.ArgumentParser(prog="ctct-relay")
    add_ops_parsers(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


class Cli:
    """Runs one command against the app on a real port; returns (status, out, err)."""

    def __init__(self, api: str) -> None:
        self.api = api

    async def __call__(self, *argv: str, token: str = TOKEN) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        args = parse([*argv, "--api", self.api])
        status = await ops_command(args, {TOKEN_ENV: token}, out, err)
        return status, out.getvalue(), err.getvalue()


@pytest.fixture
async def cli(aiohttp_server: AiohttpServer, store: Store, clock: Clock) -> Cli:
    """The CLI aimed at an admin API that runs account acme."""
    view = RelayView(accounts={"acme": AccountQuota("acme", 9000, lambda: 100)})
    app = create_admin_app(
        store, AdminSettings(token=TOKEN), guard=Guard(), now_ms=clock, view=view
    )
    server = await aiohttp_server(app)
    return Cli(str(server.make_url("")))


async def test_status_is_an_aligned_table_and_json_on_request(cli: Cli, store: Store) -> None:
    """Accounts, sinks and webhooks as tables; --streams adds streams; --json the raw answer."""
    await store.ensure_streams([KEY], T0)
    status, out, err = await cli("status", "--streams")
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["ACCOUNT", "USED", "TODAY"]
    assert lines[1].split()[:3] == ["acme", "100", "8900"]
    assert "outbox head 0" in out
    assert "webhooks-fanout" in out
    assert f"campaign/{KEY.resource_id}" in out
    assert "1 of 1 streams" in out
    status, out, _ = await cli("status", "--json")
    assert orjson.loads(out)["accounts"][0]["quota"]["left_today"] == 8900


async def test_status_tells_apart_webhook_urls_differing_only_in_their_query(
    cli: Cli, store: Store
) -> None:
    """status shows a webhook URL's query keys with every value as *** (the JSON too), so two
    webhooks differing only in their query differ there; no value, user info or fragment."""
    base = "https://93.184.216.34/hook"
    for n, query in enumerate(["token=QSEKRET1&tenant=TSEKRET2", "key=QSEKRET3#FSEKRET4"]):
        url = f"https://u:PSEKRET5@93.184.216.34/hook?{query}"
        hook = Webhook(f"wh_{n}", url, (WILDCARD,), "s", created_ms=T0, updated_ms=T0)
        await store.create_webhook(hook)
    status, out, err = await cli("status")
    assert (status, err) == (0, "")
    rows = [line.split()[-1] for line in out.splitlines() if line.startswith("wh_")]
    assert sorted(rows) == [f"{base}?key=***", f"{base}?token=***&tenant=***"]
    status, out, _ = await cli("status", "--json")
    assert "SEKRET" not in out
    assert len({w["url"] for w in orjson.loads(out)["webhooks"]}) == 2


async def test_status_table_says_whether_each_sink_reaches_its_destination(
    aiohttp_server: AiohttpServer, store: Store, clock: Clock
) -> None:
    """The sinks table shows CONNECTED (yes/no, '-' where this process does not know) and the
    last error, clipped to one table cell; the JSON keeps the whole error."""
    error = "KafkaConnectionError: Unable to bootstrap from " + "127.0.0.1:9 " * 20
    view = RelayView(
        accounts={"acme": AccountQuota("acme", 9000, lambda: 100)},
        sinks=("kafka", "webhooks-fanout"),
        health={"kafka": lambda: (False, error)},
    )
    app = create_admin_app(
        store, AdminSettings(token=TOKEN), guard=Guard(), now_ms=clock, view=view
    )
    cli = Cli(str((await aiohttp_server(app)).make_url("")))
    status, out, err = await cli("status")
    assert (status, err) == (0, "")
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("SINK"))
    assert lines[at].split()[-4:] == ["LETTERS", "CONNECTED", "LAST", "ERROR"]
    kafka = next(line for line in lines[at:] if line.startswith("kafka"))
    assert kafka.split()[4:7] == ["no", "KafkaConnectionError:", "Unable"]
    assert kafka.endswith("…")
    assert len(kafka.split(None, 5)[5]) == 80
    fanout = next(line for line in lines[at:] if line.startswith("webhooks-fanout"))
    assert fanout.split()[4:] == ["-", "-"]
    status, out, _ = await cli("status", "--json")
    sinks = {s["name"]: s for s in orjson.loads(out)["sinks"]}
    assert (sinks["kafka"]["connected"], sinks["kafka"]["last_error"]) == (False, error)


async def test_status_says_which_accounts_share_an_api_key(
    aiohttp_server: AiohttpServer, store: Store, clock: Clock
) -> None:
    """Accounts on one api_key show the key's numbers, its budget, and whom they share it with."""

    def used() -> int:  # one budget, one count
        return 700

    view = RelayView(
        accounts={
            name: AccountQuota(name, 9000, used, budget="key:0123456789ab", shared_with=(other,))
            for name, other in (("shop-a", "shop-b"), ("shop-b", "shop-a"))
        }
        | {"solo": AccountQuota("solo", 9000, lambda: 5, budget="key:ba9876543210")}
    )
    app = create_admin_app(
        store, AdminSettings(token=TOKEN), guard=Guard(), now_ms=clock, view=view
    )
    cli = Cli(str((await aiohttp_server(app)).make_url("")))
    status, out, err = await cli("status", "--json")
    assert (status, err) == (0, "")
    quotas = {a["name"]: a["quota"] for a in orjson.loads(out)["accounts"]}
    assert quotas["shop-a"] == {
        "used_today": 700,
        "allowance": 9000,
        "left_today": 8300,
        "budget": "key:0123456789ab",
        "shared_with": ["shop-b"],
    }
    assert quotas["solo"]["shared_with"] == []
    status, out, err = await cli("status")
    lines = out.splitlines()
    assert "SHARES KEY WITH" in lines[0]
    rows = {line.split()[0]: line for line in lines[1:4]}
    at = lines[0].index("SHARES KEY WITH")
    assert rows["shop-a"][at:].split()[0] == "shop-b"
    assert rows["shop-b"][at:].split()[0] == "shop-a"
    assert rows["solo"][at:].split()[0] == "-"


async def test_wrong_token_is_one_line(cli: Cli) -> None:
    """A refused token: one line with the API's message, exit 1, no traceback."""
    status, out, err = await cli("status", token="wrong")
    assert (status, out) == (1, "")
    assert err == "ctct-relay: error: Authorization: the bearer token is not valid (HTTP 401)\n"


async def test_token_with_a_line_break_is_a_usage_error(cli: Cli) -> None:
    """A token holding CR/LF (read from a file): one line naming the variable, exit 2; a token
    with only a line end around it works."""
    status, out, err = await cli("status", token="adm1n\r\nsecret")
    assert (status, out) == (2, "")
    assert err == (
        f"ctct-relay: error: {TOKEN_ENV}: the admin token holds a control character"
        " (a line break, a tab, …); an HTTP header cannot carry it\n"
    )
    assert (await cli("status", token=TOKEN + "\r\n"))[0] == 0


def test_unreachable_api_is_one_line() -> None:
    """No server: one line naming the API, exit 1 (sync entry point)."""
    args = parse(["status", "--api", f"http://127.0.0.1:{free_port()}"])
    out_io, err_io = io.StringIO(), io.StringIO()
    assert run_ops(args, {}, out_io, err_io) == 1
    assert err_io.getvalue().startswith("ctct-relay: error: cannot reach the admin API at")
    assert err_io.getvalue().count("\n") == 1


async def test_pause_resume_and_targets(cli: Cli, store: Store) -> None:
    """Account and stream pauses, targets added, listed and removed."""
    status, out, _ = await cli("pause", "--account", "acme", "--reason", "maintenance")
    assert (status, out) == (0, "account acme is paused: maintenance\n")
    status, out, _ = await cli("resume", "--account", "acme")
    assert out == "account acme is not paused by an operator\n"
    status, out, err = await cli(
        "targets", "add", "--account", "acme", "--campaign", "11", "--contact", "5"
    )
    assert status == 0, err
    assert out.splitlines() == ["2 new targets", "campaigns: 11", "contacts:  5"]
    stream_id = (await store.streams())[0].id
    status, out, _ = await cli("pause", "--stream", str(stream_id))
    assert out == f"stream {stream_id} is paused\n"
    status, out, _ = await cli("targets", "remove", "--account", "acme", "--campaign", "11")
    assert out == "removed campaign 11\n"
    status, out, _ = await cli("targets", "list", "--account", "acme")
    assert out.splitlines() == ["campaigns: -", "contacts:  5", "removed:   campaign 11"]
    status, _, err = await cli("targets", "remove", "--account", "acme", "--campaign", "11")
    assert status == 1
    assert "does not poll campaign '11'" in err


async def test_targets_remove_that_fails_part_way_says_what_it_removed(
    cli: Cli, store: Store
) -> None:
    """One DELETE per target: when a later one fails, the error says which were removed
    before it (the error alone read as if nothing had changed)."""
    status, _, err = await cli("targets", "add", "--account", "acme", "--campaign", "11")
    assert status == 0, err
    await cli("targets", "add", "--account", "acme", "--contact", "5")
    argv = ["--account", "acme", "--campaign", "11", "--campaign", "12", "--contact", "5"]
    status, out, err = await cli("targets", "remove", *argv)
    assert (status, out) == (1, "")
    assert err == (
        "ctct-relay: error: account 'acme' does not poll campaign '12' (HTTP 404);"
        " removed before it: campaign 11\n"
    )
    assert [s.key.resource_id for s in await store.streams() if not s.retired] == ["5"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(
            ["targets", "add", "--account", "acme"],
            "give at least one --campaign or --contact",
            id="targets-without-ids",
        ),
        pytest.param(
            ["replay", "--stream", "1", "--campaign", "7", "--since", "2025-01-01T00:00:00Z"],
            "--campaign: needs --account",
            id="campaign-without-account",
        ),
        pytest.param(["status", "--limit", "0"], "--limit: expected 1 to 1000, got 0", id="limit"),
        pytest.param(
            ["dead-letters", "--limit", "1001"],
            "--limit: expected 1 to 1000, got 1001",
            id="dead-letters-limit",
        ),
        pytest.param(
            ["pause", "--stream", "1", "--reason", "maintenance"],
            "--reason: only an account pause takes a reason, not --stream",
            id="stream-pause-reason",
        ),
    ],
)
async def test_usage_errors_exit_2(cli: Cli, store: Store, argv: list[str], message: str) -> None:
    """Options that cannot go together: one line, exit 2 as for argparse's own usage errors,
    and nothing sent (a stream pause's --reason is not dropped silently: the stream stays)."""
    await store.ensure_streams([KEY], T0)
    assert await cli(*argv) == (2, "", f"ctct-relay: error: {message}\n")
    assert not (await store.streams())[0].paused


async def test_replay_dry_run_then_wait_shows_progress(
    cli: Cli, store: Store, clock: Clock
) -> None:
    """A dry run counts; --wait follows the sinks until the replayed range is sent."""
    await store.ensure_streams([KEY], T0)
    sid = (await store.streams())[0].id
    await store.commit_page(sid, [activity(i, T0 + i) for i in range(6)], T0)
    await store.fanout(100, T0)
    since = "2025-11-21T04:40:00Z"  # T0
    status, out, _ = await cli("replay", "--account", "acme", "--since", since, "--dry-run")
    assert (status, out) == (
        0,
        f"6 events would be sent again (same ids), from the log since {since[:-1]}.000Z\n",
    )

    async def sink() -> None:  # the fan-out sink, as the running relay would drive it
        while True:
            await store.fanout(2, T0)
            await asyncio.sleep(0.05)

    task = asyncio.create_task(sink())
    try:
        status, out, err = await cli("replay", "--stream", str(sid), "--since", since, "--wait")
    finally:
        task.cancel()
    assert status == 0, err
    assert out.endswith("; done\n")
    progress = err.splitlines()
    assert progress[-1] == "replay: webhooks-fanout 6/6, webhooks behind: 0"
    assert await store.outbox_head() == 12
    status, _, err = await cli("replay", "--stream", "999", "--since", since)
    assert status == 1
    assert "no stream with id 999" in err


def test_cli_entry_point_runs_the_operations_commands(capsys: pytest.CaptureFixture[str]) -> None:
    """``ctct-relay status`` goes through relay.cli: one error line and exit 1 with no API."""
    from relay.cli import main

    assert main(["status", "--api", f"http://127.0.0.1:{free_port()}"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("ctct-relay: error: cannot reach the admin API")


async def test_dead_letters_table_json_and_the_rest_left_out(cli: Cli, store: Store) -> None:
    """``dead-letters`` lists the Kafka sink's dead letters oldest first, one line each (a
    reason's line breaks folded), says when the limit left some out; --json is the answer."""
    assert await cli("dead-letters") == (0, "no dead letters (kafka)\n", "")
    await store.add_dead_letter("kafka", 8, "evt-8", "KafkaError: record\ntoo large", T0)
    await store.add_dead_letter("kafka", 2, "evt-2", "MessageSizeTooLargeError: 2 MB", T0)
    status, out, err = await cli("dead-letters", "--sink", "kafka")
    assert (status, err) == (0, "")
    header, first, second = out.splitlines()
    assert header.split() == ["SEQ", "CREATED", "EVENT", "REASON"]
    assert first.split() == [
        "2",
        "2025-11-21T04:40:00.000Z",
        "evt-2",
        "MessageSizeTooLargeError:",
        "2",
        "MB",
    ]
    assert second.endswith("evt-8  KafkaError: record too large")
    status, out, _ = await cli("dead-letters", "--limit", "1")
    assert status == 0
    assert out.splitlines()[-1] == "(the oldest 1 of 2; --limit shows more)"
    status, out, _ = await cli("dead-letters", "--json")
    answer = orjson.loads(out)
    assert [d["event_id"] for d in answer["dead_letters"]] == ["evt-2", "evt-8"]
    assert answer["total"] == 2


_BIGINT = 2**63 - 1
_NOT_AN_ID = "expected a Constant Contact id (1 to 64 digits)"


@pytest.mark.parametrize(
    ("argv", "option", "problem"),
    [
        pytest.param(
            ["targets", "add", "--account", "acme", "--campaign", "abc"],
            "--campaign",
            f"{_NOT_AN_ID}, got 'abc'",
            id="targets-add-campaign",
        ),
        pytest.param(
            ["targets", "remove", "--account", "acme", "--contact", "5x"],
            "--contact",
            f"{_NOT_AN_ID}, got '5x'",
            id="targets-remove-contact",
        ),
        pytest.param(
            ["replay", "--account", "acme", "--campaign", "c-1", "--since", "2025-01-01T00:00:00Z"],
            "--campaign",
            f"{_NOT_AN_ID}, got 'c-1'",
            id="replay-campaign",
        ),
        pytest.param(
            ["replay", "--stream", "1" * 20, "--since", "2025-01-01T00:00:00Z"],
            "--stream",
            f"expected a stream id (an integer from 1 to {_BIGINT}), got '{'1' * 20}'",
            id="replay-stream-20-digits",
        ),
        pytest.param(
            ["pause", "--stream", "0"],
            "--stream",
            f"expected a stream id (an integer from 1 to {_BIGINT}), got '0'",
            id="pause-stream-zero",
        ),
        pytest.param(
            ["webhooks", "redeliver", str(_BIGINT + 1)],
            "delivery_id",
            f"expected a delivery id (an integer from 1 to {_BIGINT}), got '{_BIGINT + 1}'",
            id="redeliver-past-bigint",
        ),
    ],
)
def test_ids_of_the_wrong_shape_are_usage_errors(
    argv: list[str], option: str, problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`targets add --campaign abc` was sent (and accepted by the API), `replay --stream` of 20
    digits got a 404 quoting the id: ids are checked as the API takes them, a usage error naming
    the option, exit 2; nothing is sent (no API listens)."""
    api = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--api", api])
    assert exited.value.code == 2
    assert (
        capsys.readouterr().err.splitlines()[-1].endswith(f": error: argument {option}: {problem}")
    )


async def test_sinks_forget_releases_a_retired_sink(cli: Cli, store: Store) -> None:
    """``sinks forget kafka`` deletes the cursor of a sink configured nowhere; an unknown sink
    is one error line and exit 1."""
    await store.set_sink_cursor("kafka", 3)
    status, out, err = await cli("sinks", "forget", "kafka")
    assert (status, err) == (0, "")
    assert out == "forgot sink kafka: the outbox prune no longer keeps events for it\n"
    assert "kafka" not in await store.sink_cursors()
    status, out, err = await cli("sinks", "forget", "kafka")
    assert (status, out) == (1, "")
    assert err.startswith("ctct-relay: error: ")
    assert "no stored cursor of a sink named 'kafka'" in err


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param(["sinks", "forget", "kafka"], id="sinks-forget"),
        pytest.param(["targets", "remove", "--account", "acme", "--campaign", "5"], id="targets"),
        pytest.param(["pause", "--account", "acme"], id="pause"),
        pytest.param(["status"], id="status"),
    ],
)
@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_redirect_is_an_error_not_a_success(
    aiohttp_server: AiohttpServer, argv: list[str], status: int
) -> None:
    """The admin API never redirects and the client does not follow: an ingress redirecting
    http to https made `sinks forget` and `targets remove` report success with nothing done.
    One line naming the request, the status and where it points (its query masked), exit 1."""
    to = "https://relay.example.com/v1/x?token=hunter2pass"
    server = await aiohttp_server(foreign_app(status, location=to))
    code, out, err = await Cli(str(server.make_url("")))(*argv)
    assert (code, out) == (1, "")
    assert err.startswith("ctct-relay: error: "), err
    assert f": HTTP {status} " in err
    assert "a redirect to https://relay.example.com/v1/x?token=***;" in err
    assert "hunter2pass" not in err
    assert err.count("\n") == 1


async def test_an_error_page_of_another_server_names_the_request(
    aiohttp_server: AiohttpServer,
) -> None:
    """A 404 or 502 page not of the admin API (--api naming another service, a proxy whose
    backend is down) says which request got it and that the answer is not the API's; the
    API's own errors keep their message."""
    server = await aiohttp_server(foreign_app(502, b"<html>Bad Gateway</html>"))
    api = str(server.make_url("")).rstrip("/")
    code, _, err = await Cli(api)("status")
    assert code == 1
    assert err == (
        f"ctct-relay: error: GET {api}/v1/status: HTTP 502 Bad Gateway, not an answer of the"
        " ctct-relay admin API (a proxy in front of it, or --api names another server)\n"
    )
