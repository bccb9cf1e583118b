"""``ctct-relay status|replay|pause|resume|targets|dead-letters|sinks``: operating a running
relay from the shell.

Like ``ctct-relay webhooks`` (:mod:`relay.api.client`), every command is one or a few HTTP calls
to the admin API; answers print as aligned plain text, or as the API's JSON with ``--json``;
every failure (unreachable API, wrong token, the API's own refusal) is one line
``ctct-relay: error: …`` and exit status 1, a usage error (``--campaign`` without ``--account``)
one such line and exit status 2. ``replay --wait`` follows the replay until every sink
has sent it, with a one-line progress display on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TextIO

import aiohttp
import orjson

from relay.api.body import rfc3339_ms
from relay.api.client import (
    AdminApiError,
    AdminClient,
    UsageError,
    admin_token,
    answered,
    common_parser,
    failed,
    integer_id,
    objects,
    resource_id,
    rfc3339_time,
    segment,
    table,
    terminal_safe,
    text_of,
)
from relay.api.responses import JsonObject

WAIT_POLL_S = 0.5
DEAD_LETTER_LIMIT = 100
MAX_DEAD_LETTER_LIMIT = 1000

Action = Callable[[AdminClient, argparse.Namespace, TextIO], Awaitable[tuple[object, str]]]


def add_ops_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``status``, ``replay``, ``pause``, ``resume``, ``targets``, ``dead-letters`` and
    ``sinks``."""
    common = common_parser()
    p = commands.add_parser("status", parents=[common], help="what the running relay is doing")
    p.add_argument("--streams", action="store_true", help="also list streams")
    p.add_argument("--account", default=None, help="only this account's streams")
    p.add_argument("--state", choices=("active", "failing", "paused", "retired"), default=None)
    p.add_argument("--limit", type=int, default=50, help="streams to list (%(default)s)")

    p = commands.add_parser("replay", parents=[common], help="send events again from a time")
    _target(p, campaign=True)
    p.add_argument(
        "--since",
        type=_replay_since,
        required=True,
        help="RFC 3339 time from 1970 on, e.g. 2025-01-31T12:00:00Z",
    )
    p.add_argument(
        "--source",
        choices=("log", "upstream"),
        default="log",
        help="log: resend what was committed since then (default); upstream: re-poll from then",
    )
    p.add_argument("--dry-run", action="store_true", help="only say how many events")
    p.add_argument("--wait", action="store_true", help="follow it until every sink sent it")

    for name, text in (("pause", "stop polling"), ("resume", "poll again")):
        p = commands.add_parser(name, parents=[common], help=f"{text}: a stream or an account")
        _target(p, campaign=False)
        if name == "pause":
            p.add_argument("--reason", default=None, help="shown in status (accounts only)")

    p = commands.add_parser(
        "dead-letters", parents=[common], help="events a sink gave up on, with the reason"
    )
    p.add_argument("--sink", choices=("kafka",), default="kafka", help="(%(default)s)")
    p.add_argument(
        "--limit", type=int, default=DEAD_LETTER_LIMIT, help="at most this many (%(default)s)"
    )

    p = commands.add_parser("targets", help="campaigns and contacts an account polls")
    actions = p.add_subparsers(dest="targets_command", required=True, metavar="ACTION")
    for name, text in (
        ("list", "list them"),
        ("add", "poll more (kept across restarts)"),
        ("remove", "stop polling some"),
    ):
        q = actions.add_parser(name, parents=[common], help=text)
        q.add_argument("--account", required=True)
        if name != "list":
            q.add_argument(
                "--campaign", dest="campaigns", action="append", default=[], type=resource_id
            )
            q.add_argument(
                "--contact", dest="contacts", action="append", default=[], type=resource_id
            )

    p = commands.add_parser("sinks", help="sinks the outbox keeps events for")
    actions = p.add_subparsers(dest="sinks_command", required=True, metavar="ACTION")
    q = actions.add_parser(
        "forget",
        parents=[common],
        help="retire a sink removed from every replica's config: the outbox prune stops"
        " keeping the events it has not published",
    )
    q.add_argument("sink", help="its name, as status lists it (kafka)")


def _replay_since(text: str) -> str:
    """An argparse type: ``replay --since``, an RFC 3339 time the API takes (from 1970 on)."""
    since = rfc3339_time(text)
    if rfc3339_ms(since) < 0:
        raise argparse.ArgumentTypeError(f"must be 1970-01-01T00:00:00Z or later, got {text!r}")
    return since


def _target(parser: argparse.ArgumentParser, *, campaign: bool) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--stream", type=integer_id("a stream id"), default=None, help="a stream id (see status)"
    )
    which.add_argument("--account", default=None, help="an account name")
    if campaign:
        parser.add_argument(
            "--campaign", type=resource_id, default=None, help="with --account: one campaign"
        )


def run_ops(
    args: argparse.Namespace, environ: Mapping[str, str], out: TextIO, err: TextIO | None = None
) -> int:
    """Run one operations command; returns the exit status."""
    return asyncio.run(ops_command(args, environ, out, err or sys.stderr))


async def ops_command(
    args: argparse.Namespace, environ: Mapping[str, str], out: TextIO, err: TextIO
) -> int:
    """:func:`run_ops` inside a running event loop."""
    sub = {"targets": "targets_command", "sinks": "sinks_command"}.get(args.command)
    name = args.command if sub is None else f"{args.command}-{getattr(args, sub)}"
    try:
        _check(args)
        token = admin_token(args.token, environ)
        timeout = aiohttp.ClientTimeout(total=args.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            answer, text = await _ACTIONS[name](AdminClient(session, args.api, token), args, err)
    except (UsageError, AdminApiError) as exc:
        return failed(exc, err)
    if args.json:
        out.write(orjson.dumps(answer, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        out.write(terminal_safe(text, keep="\n") + "\n")
    return 0


def _check(args: argparse.Namespace) -> None:
    """What argparse cannot say about the combination of options: usage errors (exit 2)."""
    if getattr(args, "campaign", None) and not getattr(args, "account", None):
        raise UsageError("--campaign: needs --account")
    if args.command == "pause" and args.stream is not None and args.reason is not None:
        # the API keeps a reason for an account's pause only; dropping it silently would lie
        raise UsageError("--reason: only an account pause takes a reason, not --stream")
    if args.command == "status" and not 1 <= args.limit <= 1000:
        raise UsageError(f"--limit: expected 1 to 1000, got {args.limit}")
    if args.command == "dead-letters" and not 1 <= args.limit <= MAX_DEAD_LETTER_LIMIT:
        raise UsageError(f"--limit: expected 1 to {MAX_DEAD_LETTER_LIMIT}, got {args.limit}")
    listing = args.command != "targets" or args.targets_command == "list"
    if not listing and not (args.campaigns or args.contacts):
        raise UsageError("give at least one --campaign or --contact")


# -- status -------------------------------------------------------------------------------------


async def _status(
    client: AdminClient, args: argparse.Namespace, _err: TextIO
) -> tuple[object, str]:
    status = answered(await client.call("GET", "/v1/status"))
    parts = [_accounts_text(status), _sinks_text(status), _webhooks_text(status)]
    answer: JsonObject = dict(status)
    if args.streams or args.account or args.state:
        query = {"limit": str(args.limit)}
        if args.account:
            query["account"] = args.account
        if args.state:
            query["state"] = args.state
        listed = answered(await client.call("GET", "/v1/streams", query=query))
        answer["streams"] = listed
        parts.append(_streams_text(listed))
    return answer, "\n\n".join(parts)


def _accounts_text(status: JsonObject) -> str:
    rows = []
    for a in objects(status.get("accounts")):
        quota = _dict(a.get("quota"))
        streams = _dict(a.get("streams"))
        rows.append(
            [
                text_of(a.get("name")),
                text_of(quota.get("used_today")),
                text_of(quota.get("left_today") if quota.get("left_today") is not None else "-"),
                f"{text_of(streams.get('active'))}/{text_of(streams.get('total'))}",
                text_of(streams.get("failing")),
                text_of(streams.get("replaying")),
                _duration(a.get("max_lag_s")),
                ", ".join(_strings(quota.get("shared_with"))) or "-",
                _pause_text(a),
            ]
        )
    heads = [
        "ACCOUNT",
        "USED TODAY",
        "LEFT",
        "ACTIVE",
        "FAILING",
        "REPLAYING",
        "MAX LAG",
        "SHARES KEY WITH",
        "PAUSE",
    ]
    return table(heads, rows) if rows else "no accounts"


def _pause_text(account: JsonObject) -> str:
    held, paused = _dict(account.get("held")), _dict(account.get("paused"))
    if held:
        return f"by operator since {text_of(held.get('since'))}: {text_of(held.get('reason'))}"
    if paused:
        return f"by relay until {text_of(paused.get('until'))}: {text_of(paused.get('reason'))}"
    return "-"


def _sinks_text(status: JsonObject) -> str:
    head = text_of(_dict(status.get("outbox")).get("head"))
    rows = [
        [
            text_of(s.get("name")),
            text_of(s.get("cursor")),
            text_of(s.get("depth")),
            text_of(s.get("dead_letters")),
            _connected_text(s.get("connected")),
            _clip(text_of(s.get("last_error")) or "-", LAST_ERROR_CHARS),
        ]
        for s in objects(status.get("sinks"))
    ]
    heads = ["SINK", "CURSOR", "DEPTH", "DEAD LETTERS", "CONNECTED", "LAST ERROR"]
    return f"outbox head {head}\n" + table(heads, rows)


# a sink's last error in the status table (the whole of it is in --json)
LAST_ERROR_CHARS = 80


def _connected_text(connected: object) -> str:
    """yes/no, or '-' where this process does not know (the fan-out; a replica not publishing)."""
    return "-" if connected is None else "yes" if connected is True else "no"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _webhooks_text(status: JsonObject) -> str:
    rows = [
        [
            text_of(w.get("id")),
            "enabled"
            if w.get("enabled") is True
            else f"disabled ({text_of(w.get('disabled_reason'))})",
            text_of(w.get("failing_since") or "-"),
            text_of(w.get("pending")),
            text_of(w.get("dead_letters")),
            text_of(w.get("url")),
        ]
        for w in objects(status.get("webhooks"))
    ]
    heads = ["WEBHOOK", "STATE", "FAILING SINCE", "PENDING", "DEAD", "URL"]
    return table(heads, rows) if rows else "no webhooks"


def _streams_text(listed: JsonObject) -> str:
    rows = [
        [
            text_of(s.get("id")),
            text_of(s.get("account")),
            f"{text_of(s.get('scope'))}/{text_of(s.get('resource_id'))}",
            text_of(s.get("state")),
            _duration(s.get("lag_s")),
            _duration(s.get("interval_s")),
            text_of(s.get("last_poll_at") or "-"),
            text_of(s.get("last_error") or "-")[:60],
        ]
        for s in objects(listed.get("streams"))
    ]
    heads = ["STREAM", "ACCOUNT", "RESOURCE", "STATE", "LAG", "INTERVAL", "LAST POLL", "LAST ERROR"]
    shown = f"{len(rows)} of {text_of(listed.get('total'))} streams"
    return (table(heads, rows) + "\n" + shown) if rows else "no streams"


# -- replay -------------------------------------------------------------------------------------


async def _replay(client: AdminClient, args: argparse.Namespace, err: TextIO) -> tuple[object, str]:
    body: JsonObject = {"since": args.since, "source": args.source, "dry_run": args.dry_run}
    if args.stream is not None:
        path = f"/v1/streams/{args.stream}/replay"
    else:
        path = f"/v1/accounts/{segment(args.account)}/replay"
        if args.campaign:
            body["campaign"] = args.campaign
    waits = args.wait and not args.dry_run
    head_before = await _head(client) if waits and args.source == "upstream" else 0
    answer = answered(await client.call("POST", path, body))
    text = _replay_text(answer)
    if waits:
        if answer.get("source") == "log":
            await _follow_log(
                client, _int(answer.get("first_seq")), _int(answer.get("last_seq")), err
            )
        else:
            await _follow_upstream(client, args, err)
            # what the re-read committed (and whatever else came meanwhile) still has to go out
            await _follow_log(client, head_before + 1, await _head(client), err)
        text += "; done"
    return answer, text


async def _head(client: AdminClient) -> int:
    return _int(_dict(answered(await client.call("GET", "/v1/status")).get("outbox")).get("head"))


def _replay_text(answer: JsonObject) -> str:
    events = text_of(answer.get("events"))
    if answer.get("source") == "log":
        verb = "would be sent again" if answer.get("dry_run") else "are being sent again"
        return (
            f"{events} events {verb} (same ids), from the log since {text_of(answer.get('since'))}"
        )
    streams = text_of(answer.get("streams"))
    if answer.get("dry_run"):
        return (
            f"{streams} streams would be re-read from {text_of(answer.get('since'))};"
            f" the log holds {events} of their events since then (more may come)"
        )
    return f"{streams} streams will be re-read from {text_of(answer.get('since'))}"


async def _follow_log(client: AdminClient, first: int, last: int, err: TextIO) -> None:
    """Until every sink's cursor and every webhook's backlog is past the range first..last."""
    if not first or last < first:
        return
    total = last - first + 1
    while True:
        status = answered(await client.call("GET", "/v1/status"))
        sinks = {
            text_of(s.get("name")): _int(s.get("cursor"))
            for s in objects(status.get("sinks"))
            if s.get("running") is True  # a stale cursor of a sink no longer configured never moves
        }
        behind = [
            w
            for w in objects(status.get("webhooks"))
            if w.get("enabled") is True and 0 < _int(w.get("oldest_pending_seq")) <= last
        ]
        parts = [
            f"{n} {min(total, max(0, c - first + 1))}/{total}" for n, c in sorted(sinks.items())
        ]
        parts.append(f"webhooks behind: {len(behind)}")
        _progress(err, "replay: " + ", ".join(parts))
        if all(c >= last for c in sinks.values()) and not behind:
            break
        await asyncio.sleep(WAIT_POLL_S)
    if err.isatty():
        err.write("\n")  # end the line rewritten in place


async def _follow_upstream(client: AdminClient, args: argparse.Namespace, err: TextIO) -> None:
    """Until no selected stream still has its replay pending."""
    query = {"replaying": "true", "limit": "1"}
    if args.account:
        query["account"] = args.account
    started = time.monotonic()
    while True:
        if args.stream is not None:
            stream = answered(await client.call("GET", f"/v1/streams/{args.stream}"))
            left = 0 if stream.get("replay_from") is None else 1
        else:
            left = _int(answered(await client.call("GET", "/v1/streams", query=query)).get("total"))
        _progress(
            err, f"replay: {left} streams left to re-read ({time.monotonic() - started:.0f}s)"
        )
        if not left:
            break
        await asyncio.sleep(WAIT_POLL_S)
    if err.isatty():
        err.write("\n")  # end the line rewritten in place


def _progress(err: TextIO, line: str) -> None:
    """One line, rewritten in place on a terminal, appended elsewhere (logs stay readable)."""
    err.write(("\r" + line + "\x1b[K") if err.isatty() else line + "\n")
    err.flush()


# -- pause, resume, targets ---------------------------------------------------------------------


async def _pause(client: AdminClient, args: argparse.Namespace, _err: TextIO) -> tuple[object, str]:
    return await _pause_or_resume(client, args, "pause")


async def _resume(
    client: AdminClient, args: argparse.Namespace, _err: TextIO
) -> tuple[object, str]:
    return await _pause_or_resume(client, args, "resume")


async def _pause_or_resume(
    client: AdminClient, args: argparse.Namespace, verb: str
) -> tuple[object, str]:
    if args.stream is not None:
        stream = answered(await client.call("POST", f"/v1/streams/{args.stream}/{verb}", {}))
        return stream, f"stream {args.stream} is {text_of(stream.get('state'))}"
    body: JsonObject = {}
    if verb == "pause" and args.reason:
        body["reason"] = args.reason
    path = f"/v1/accounts/{segment(args.account)}/{verb}"
    answer = answered(await client.call("POST", path, body))
    held = _dict(answer.get("held"))
    text = (
        f"account {args.account} is paused: {text_of(held.get('reason'))}"
        if held
        else f"account {args.account} is not paused by an operator"
    )
    return answer, text


async def _targets_list(
    client: AdminClient, args: argparse.Namespace, _err: TextIO
) -> tuple[object, str]:
    answer = answered(await client.call("GET", f"/v1/accounts/{segment(args.account)}/targets"))
    return answer, _targets_text(answer)


async def _targets_add(
    client: AdminClient, args: argparse.Namespace, _err: TextIO
) -> tuple[object, str]:
    body: JsonObject = {}
    if args.campaigns:
        body["campaigns"] = list(args.campaigns)
    if args.contacts:
        body["contacts"] = list(args.contacts)
    path = f"/v1/accounts/{segment(args.account)}/targets"
    answer = answered(await client.call("POST", path, body))
    return answer, f"{text_of(answer.get('created'))} new targets\n" + _targets_text(answer)


async def _targets_remove(
    client: AdminClient, args: argparse.Namespace, _err: TextIO
) -> tuple[object, str]:
    account = segment(args.account)
    removed: list[str] = []
    for kind, ids in (("campaigns", args.campaigns), ("contacts", args.contacts)):
        for rid in ids:
            path = f"/v1/accounts/{account}/targets/{kind}/{segment(rid)}"
            try:
                await client.call("DELETE", path)
            except AdminApiError as exc:
                # one call per target: those before the failure are gone, which the error
                # must say (alone it read as if nothing had changed)
                if removed:
                    raise AdminApiError(f"{exc}; removed before it: {', '.join(removed)}") from None
                raise
            removed.append(f"{kind[:-1]} {rid}")
    return {"removed": removed}, "removed " + ", ".join(removed)


def _targets_text(answer: JsonObject) -> str:
    campaigns, contacts = _strings(answer.get("campaigns")), _strings(answer.get("contacts"))
    removed = objects(answer.get("removed"))
    lines = [
        f"campaigns: {', '.join(campaigns) or '-'}",
        f"contacts:  {', '.join(contacts) or '-'}",
    ]
    if removed:
        gone = ", ".join(
            f"{text_of(r.get('scope'))} {text_of(r.get('resource_id'))}" for r in removed
        )
        lines.append(f"removed:   {gone}")
    return "\n".join(lines)


async def _dead_letters(
    client: AdminClient, args: argparse.Namespace, _err: TextIO
) -> tuple[object, str]:
    query = {"sink": args.sink, "limit": str(args.limit)}
    answer = answered(await client.call("GET", "/v1/dead-letters", query=query))
    rows = [
        [
            text_of(d.get("seq")),
            text_of(d.get("created_at")),
            text_of(d.get("event_id")),
            " ".join(text_of(d.get("reason")).split()),  # one line per dead letter
        ]
        for d in objects(answer.get("dead_letters"))
    ]
    if not rows:
        return answer, f"no dead letters ({args.sink})"
    text = table(["SEQ", "CREATED", "EVENT", "REASON"], rows)
    total = _int(answer.get("total"))
    if total > len(rows):
        text += f"\n(the oldest {len(rows)} of {total}; --limit shows more)"
    return answer, text


async def _sinks_forget(
    client: AdminClient, args: argparse.Namespace, _err: TextIO
) -> tuple[object, str]:
    await client.call("DELETE", f"/v1/sinks/{segment(args.sink)}")
    return {"forgotten": args.sink}, (
        f"forgot sink {args.sink}: the outbox prune no longer keeps events for it"
    )


_ACTIONS: Mapping[str, Action] = {
    "status": _status,
    "replay": _replay,
    "pause": _pause,
    "resume": _resume,
    "targets-list": _targets_list,
    "targets-add": _targets_add,
    "targets-remove": _targets_remove,
    "dead-letters": _dead_letters,
    "sinks-forget": _sinks_forget,
}


def _dict(value: object) -> JsonObject:
    return {str(k): v for k, v in value.items()} if isinstance(value, dict) else {}


def _strings(value: object) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else []


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _duration(value: object) -> str:
    """Seconds as 45s, 12m03s, 5h02m or 3d04h; '-' when unknown."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "-"
    seconds = int(value)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"
