"""``ctct-relay webhooks …``: the command-line client of the admin API.

Each action is one HTTP call (aiohttp) to a running relay's admin API; the answer is printed as a
table or key/value lines, or as JSON with ``--json``. Every failure (the API's error message, an
unreachable API, a timeout) is one line ``ctct-relay: error: …`` and exit status 1; a command line
that cannot be right (a token with a line break in it, an option without the one it needs) is one
such line and exit status 2, like argparse's own usage errors. The token comes from ``--token`` or
the ``CTCT_RELAY_ADMIN_TOKEN`` variable of the environment the caller passes in (only
``relay.cli`` reads the process environment).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import re
import sys
import unicodedata
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TextIO
from urllib.parse import SplitResult, quote, urlsplit

import aiohttp
import orjson

from relay.api.body import MAX_DELIVERY_ID, MAX_DELIVERY_LIMIT, rfc3339_ms
from relay.api.responses import JsonObject
from relay.api.status import public_url
from relay.events import RESOURCE_ID, RESOURCE_ID_SHAPE, TYPE_PREFIX
from relay.hostnames import valid_host

DEFAULT_API = "http://127.0.0.1:8081"
TOKEN_ENV = "CTCT_RELAY_ADMIN_TOKEN"  # noqa: S105 - the variable's name, not a token
DEFAULT_TIMEOUT_S = 30.0
EXIT_ERROR = 1
EXIT_USAGE = 2
_JSON_BODY = {"Content-Type": "application/json"}  # the API refuses a body of any other type


class AdminApiError(Exception):
    """The admin API refused a request or could not be reached; the message says which."""


class UsageError(Exception):
    """The command line cannot be right (exit 2, like argparse's errors); the message says why."""


def admin_token(given: str | None, environ: Mapping[str, str]) -> str | None:
    """The admin token of ``--token``, else of the environment; None when there is none.

    Whitespace around it is dropped (``$(cat token.txt)`` keeps a CRLF file's carriage return);
    a control character left inside cannot go into a header, so it is a usage error naming where
    the token came from, never showing the token.
    """
    source, raw = ("--token", given) if given else (TOKEN_ENV, environ.get(TOKEN_ENV))
    token = (raw or "").strip()
    if any(unicodedata.category(c) == "Cc" for c in token):
        raise UsageError(
            f"{source}: the admin token holds a control character (a line break, a tab, …);"
            " an HTTP header cannot carry it"
        )
    return token or None


def positive_number(text: str) -> float:
    """An argparse type: a finite number greater than 0 (``nan``, ``inf``, 0 and less refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number greater than 0, got {text!r}")
    return value


def api_url(text: str) -> str:
    """An argparse type for ``--api``: an http or https URL with a host, an optional port from 1
    to 65535 and an optional path prefix; no user name or password (the admin API takes a
    bearer token, and a password in the URL would be shown in errors), no query or fragment.

    Checked before any request, so a mistyped URL is a usage error (exit 2) naming --api, not a
    traceback (user info and a token could not be combined) or an unclear line."""
    try:
        parts = urlsplit(text)
    except ValueError as exc:  # e.g. an unbalanced [ of an IPv6 literal
        raise argparse.ArgumentTypeError(f"not a URL: {exc}: {_masked(text)!r}") from None
    example = "such as http://127.0.0.1:8081"
    if parts.scheme.lower() not in {"http", "https"} or "://" not in text:
        hint = f"; did you mean 'http://{text}'?" if "://" not in text else ""
        raise argparse.ArgumentTypeError(
            f"expected an http:// or https:// URL {example}, got {_masked(text)!r}{hint}"
        )
    if "@" in parts.netloc:
        raise argparse.ArgumentTypeError(
            f"a user name or password cannot go in the URL (give the admin token with --token"
            f" or ${TOKEN_ENV}), got {_masked(text)!r}"
        )
    if parts.query or parts.fragment or text.endswith(("?", "#")):
        raise argparse.ArgumentTypeError(
            f"expected a base URL without ?query or #fragment {example}, got {text!r}"
        )
    if not parts.hostname or not valid_host(parts.hostname):
        raise argparse.ArgumentTypeError(
            f"expected a host name or IP address in the URL {example}, got {text!r}"
        )
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0 or (port is None and parts.netloc.endswith(":")):
        raise argparse.ArgumentTypeError(
            f"expected a port from 1 to 65535 in the URL {example}, got {text!r}"
        )
    return text


def _masked(url: str) -> str:
    """``url`` with any user info before the host replaced by ``***`` (it may hold a password)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return re.sub(r"//[^/@]*@", "//***@", url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return SplitResult(
        parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment
    ).geturl()


def _unmasked_nowhere(exc: BaseException) -> str:
    """An exception's text with the user info of any URL in it replaced by ``***``."""
    return re.sub(r"(?<=//)[^/@\s]*@", "***@", str(exc))


def rfc3339_time(text: str) -> str:
    """An argparse type for ``--since``: an RFC 3339 time with an offset, as the API reads it,
    checked here so ``--since yesterday`` is a usage error (exit 2), not the API's HTTP 400."""
    try:
        rfc3339_ms(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def integer_id(what: str) -> Callable[[str], int]:
    """An argparse type: a delivery or stream id, an integer the API takes (1 to a BIGINT's
    maximum), so a mistyped one is a usage error naming the option, not the API's 400."""

    def parse(text: str) -> int:
        # 19 digits hold any BIGINT; a longer run never reaches int() (its 4300-digit limit)
        digits = text.isascii() and text.isdigit() and len(text) <= 19
        if not (digits and 1 <= int(text) <= MAX_DELIVERY_ID):
            raise argparse.ArgumentTypeError(
                f"expected {what} (an integer from 1 to {MAX_DELIVERY_ID}), got {text[:40]!r}"
            )
        return int(text)

    return parse


def delivery_limit(text: str) -> int:
    """An argparse type for ``deliveries --limit``: 1 to MAX_DELIVERY_LIMIT, as the API takes
    it, so ``--limit 0`` is a usage error naming the option (exit 2), not the API's 400."""
    digits = text.isascii() and text.isdigit() and len(text) <= 19
    if not (digits and 1 <= int(text) <= MAX_DELIVERY_LIMIT):
        raise argparse.ArgumentTypeError(
            f"expected an integer from 1 to {MAX_DELIVERY_LIMIT}, got {text[:40]!r}"
        )
    return int(text)


def resource_id(text: str) -> str:
    """An argparse type: a campaign or contact id, as the API takes it."""
    if not RESOURCE_ID.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected {RESOURCE_ID_SHAPE}, got {text[:70]!r}")
    return text


_delivery_id = integer_id("a delivery id")


class AdminClient:
    """Calls the admin API over one session; answers are JSON objects (None for 204)."""

    def __init__(self, session: aiohttp.ClientSession, api: str, token: str | None) -> None:
        self._session = session
        self._api = api.rstrip("/")
        self._shown = _masked(self._api)  # what errors name: never a password of the URL
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def call(
        self,
        method: str,
        path: str,
        body: JsonObject | None = None,
        query: Mapping[str, str] | None = None,
    ) -> JsonObject | None:
        """One request; raises AdminApiError with the API's message on any error status."""
        url = self._api + path
        try:
            async with self._session.request(
                method,
                url,
                headers=self._headers if body is None else {**self._headers, **_JSON_BODY},
                data=None if body is None else orjson.dumps(body),
                params=dict(query or {}),
                allow_redirects=False,
            ) as response:
                raw = await response.read()
                status, reason = response.status, response.reason
                location = response.headers.get("Location")
        except aiohttp.ClientConnectorError as exc:
            raise AdminApiError(
                f"cannot reach the admin API at {self._shown}: {exc.strerror}"
            ) from None
        except aiohttp.InvalidURL:  # its text is the URL, which may hold a password
            raise AdminApiError(f"admin API at {self._shown}: not a valid URL") from None
        except aiohttp.ClientError as exc:
            raise AdminApiError(f"admin API at {self._shown}: {_unmasked_nowhere(exc)}") from None
        except TimeoutError:
            raise AdminApiError(f"the admin API at {self._shown} did not answer in time") from None
        except ValueError as exc:
            # a URL aiohttp cannot use (UnicodeError of a bad host name is one; user info with a
            # token is another): --api checks both first, this is for callers that do not
            raise AdminApiError(
                f"admin API at {self._shown}: not a usable URL: {_unmasked_nowhere(exc)}"
            ) from None
        if status >= 300:
            raise AdminApiError(self._refusal(method, path, status, reason, raw, location))
        if status == 204 or not raw:
            return None
        return _json_object(raw, f"{method} {path}")

    def _refusal(
        self,
        method: str,
        path: str,
        status: int,
        reason: str | None,
        raw: bytes,
        location: str | None,
    ) -> str:
        """What an answer other than a success says: the API's own error message, or, for an
        answer that is not the API's (another server, a proxy in front, a redirect, which the
        API never sends and the client does not follow), the request and the status. A
        redirect's 204-like empty body was taken for a success: ``webhooks remove`` said
        "removed" through an ingress redirecting http to https, and nothing was."""
        message = _error_message(raw)
        if message is not None and status >= 400:
            return f"{message} (HTTP {status})"
        answer = f"HTTP {status}{f' {reason}' if reason else ''}"
        if 300 <= status < 400:
            to = f" to {public_url(location)}" if location else ""
            return (
                f"{method} {self._shown}{path}: {answer}, a redirect{to}; the admin API never"
                " sends one, so the request did not reach it (give --api the URL it answers at)"
            )
        return (
            f"{method} {self._shown}{path}: {answer}, not an answer of the ctct-relay admin API"
            " (a proxy in front of it, or --api names another server)"
        )


def common_parser() -> argparse.ArgumentParser:
    """The options every admin API command takes: where, which token, JSON, timeout."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--api",
        type=api_url,
        default=DEFAULT_API,
        help="admin API base URL, http(s)://HOST[:PORT][/PREFIX] (%(default)s)",
    )
    common.add_argument("--token", default=None, help=f"admin token (default: ${TOKEN_ENV})")
    common.add_argument("--json", action="store_true", help="print the API's JSON answer")
    common.add_argument(
        "--timeout", type=positive_number, default=DEFAULT_TIMEOUT_S, help="seconds (%(default)s)"
    )
    return common


def add_webhooks_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``webhooks add|list|show|update|remove|rotate-secret|secret|deliveries|redeliver|
    recover``."""
    common = common_parser()
    parser = commands.add_parser("webhooks", help="manage webhooks through the admin API")
    actions = parser.add_subparsers(dest="webhooks_command", required=True, metavar="ACTION")

    p = actions.add_parser("add", parents=[common], help="register a webhook")
    p.add_argument("url", help="destination (https; must resolve to public addresses)")
    _event_types_option(p, required=True)
    p.add_argument("--description", default=None, help="free text, e.g. who owns the receiver")
    p.add_argument("--disabled", action="store_true", help="register it disabled")
    p.add_argument(
        "--rate-limit", type=positive_number, default=None, help="requests per second (> 0)"
    )
    _secret_option(p, "its signing secret (default: one is generated)")

    actions.add_parser("list", parents=[common], help="list webhooks")
    for name, text in (
        ("show", "show one webhook"),
        ("remove", "remove a webhook with its deliveries"),
    ):
        actions.add_parser(name, parents=[common], help=text).add_argument("id")

    p = actions.add_parser(
        "update", parents=[common], help="change a webhook (e.g. --enable it again after a 410)"
    )
    p.add_argument("id")
    p.add_argument("--url", default=None, help="new destination (same rules as add)")
    _event_types_option(p, required=False)
    p.add_argument("--description", default=None, help="new description ('' clears it)")
    enabled = p.add_mutually_exclusive_group()
    enabled.add_argument(
        "--enable",
        dest="enabled",
        action="store_const",
        const=True,
        default=None,
        help="deliver to it again (after a 410 Gone, an auto-disable or --disable)",
    )
    enabled.add_argument(
        "--disable", dest="enabled", action="store_const", const=False, help="stop delivering"
    )
    rate = p.add_mutually_exclusive_group()
    rate.add_argument(
        "--rate-limit", type=positive_number, default=None, help="requests per second (> 0)"
    )
    rate.add_argument("--no-rate-limit", action="store_true", help="remove its rate limit")

    p = actions.add_parser(
        "rotate-secret",
        parents=[common],
        help="replace a webhook's secret (the old one stays valid for a grace)",
    )
    p.add_argument("id")
    _secret_option(p, "the new secret (default: one is generated)")

    p = actions.add_parser(
        "secret",
        parents=[common],
        help="print a webhook's current signing secret (e.g. a declared webhook's generated one)",
    )
    p.add_argument("id")

    p = actions.add_parser("deliveries", parents=[common], help="a webhook's recent deliveries")
    p.add_argument("id")
    p.add_argument("--status", choices=("pending", "delivered", "dead"), default=None)
    p.add_argument(
        "--limit",
        type=delivery_limit,
        default=None,
        help=f"at most this many (1..{MAX_DELIVERY_LIMIT}; the API's default: 50)",
    )
    p.add_argument(
        "--before",
        type=_delivery_id,
        default=None,
        metavar="DELIVERY_ID",
        help="only older ones: those with a lower id (the next page back, as the listing says)",
    )

    p = actions.add_parser(
        "redeliver",
        parents=[common],
        help="send a delivery again (refused while its webhook's event types reject its type)",
    )
    p.add_argument("delivery_id", type=_delivery_id)

    p = actions.add_parser("recover", parents=[common], help="re-send events since a time")
    p.add_argument("id")
    p.add_argument(
        "--since",
        type=rfc3339_time,
        required=True,
        help="RFC 3339 time, e.g. 2025-01-31T12:00:00Z",
    )


def _event_types_option(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument(
        "-e",
        "--event-type",
        dest="event_types",
        metavar="TYPE",
        action="append",
        required=required,
        default=None,
        help="event type to deliver, repeatable or comma-separated: click, open, … or a full"
        " type; * for all" + ("" if required else " (replaces the webhook's list)"),
    )


def _secret_option(parser: argparse.ArgumentParser, text: str) -> None:
    parser.add_argument(
        "--secret",
        default=None,
        help=f"{text}: whsec_ + base64 of 24 to 64 bytes (visible in the process list: prefer"
        " the generated one on a shared machine)",
    )


def run_webhooks(
    args: argparse.Namespace,
    environ: Mapping[str, str],
    out: TextIO,
    err: TextIO | None = None,
) -> int:
    """Run one ``webhooks`` action; returns the exit status."""
    return asyncio.run(webhooks_command(args, environ, out, err or sys.stderr))


async def webhooks_command(
    args: argparse.Namespace, environ: Mapping[str, str], out: TextIO, err: TextIO
) -> int:
    """:func:`run_webhooks` inside a running event loop."""
    action = _ACTIONS[args.webhooks_command]
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    try:
        token = admin_token(args.token, environ)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            shown = await action(AdminClient(session, args.api, token), args)
    except (UsageError, AdminApiError) as exc:
        return failed(exc, err)
    if args.json:
        if shown.answer is not None:
            out.write(orjson.dumps(shown.answer, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        out.write(terminal_safe(shown.text, keep="\n") + "\n")
    return 0


@dataclass(frozen=True)
class _Shown:
    """What an action prints: the API's answer (for --json) and its readable form."""

    answer: JsonObject | None
    text: str


async def _add(client: AdminClient, args: argparse.Namespace) -> _Shown:
    body: JsonObject = {
        "url": args.url,
        "event_types": _event_types(args.event_types),
        "enabled": not args.disabled,
    }
    if args.description is not None:
        body["description"] = args.description
    if args.rate_limit is not None:
        body["rate_limit_per_s"] = args.rate_limit
    if args.secret is not None:
        body["secret"] = args.secret
    hook = answered(await client.call("POST", "/v1/webhooks", body))
    return _Shown(hook, _webhook_text(hook))


async def _update(client: AdminClient, args: argparse.Namespace) -> _Shown:
    body: JsonObject = {}
    if args.url is not None:
        body["url"] = args.url
    if args.event_types is not None:
        body["event_types"] = _event_types(args.event_types)
    if args.description is not None:
        body["description"] = args.description
    if args.enabled is not None:
        body["enabled"] = args.enabled
    if args.rate_limit is not None:
        body["rate_limit_per_s"] = args.rate_limit
    if args.no_rate_limit:
        body["rate_limit_per_s"] = None
    if not body:
        raise UsageError(
            "update: nothing to change (give --url, --event-type, --description,"
            " --enable/--disable or --rate-limit/--no-rate-limit)"
        )
    hook = answered(await client.call("PATCH", f"/v1/webhooks/{segment(args.id)}", body))
    return _Shown(hook, _webhook_text(hook))


async def _list(client: AdminClient, _args: argparse.Namespace) -> _Shown:
    answer = answered(await client.call("GET", "/v1/webhooks"))
    hooks = objects(answer.get("webhooks"))
    rows = [
        [
            text_of(h.get("id")),
            "yes" if h.get("enabled") is True else "no",
            _types_text(h.get("event_types")),
            _url_text(h.get("url")),
        ]
        for h in hooks
    ]
    text = table(["ID", "ENABLED", "EVENT TYPES", "URL"], rows) if rows else "no webhooks"
    return _Shown(answer, text)


async def _show(client: AdminClient, args: argparse.Namespace) -> _Shown:
    hook = answered(await client.call("GET", f"/v1/webhooks/{segment(args.id)}"))
    return _Shown(hook, _webhook_text(hook))


async def _remove(client: AdminClient, args: argparse.Namespace) -> _Shown:
    await client.call("DELETE", f"/v1/webhooks/{segment(args.id)}")
    return _Shown(None, f"removed webhook {args.id}")


async def _rotate(client: AdminClient, args: argparse.Namespace) -> _Shown:
    path = f"/v1/webhooks/{segment(args.id)}/rotate-secret"
    body: JsonObject = {} if args.secret is None else {"secret": args.secret}
    hook = answered(await client.call("POST", path, body))
    return _Shown(hook, _webhook_text(hook))


async def _secret(client: AdminClient, args: argparse.Namespace) -> _Shown:
    answer = answered(await client.call("GET", f"/v1/webhooks/{segment(args.id)}/secret"))
    text = text_of(answer.get("secret"))
    until = answer.get("previous_secret_expires_at")
    if until:  # the secret stays alone on the first line (`... | head -n1`)
        text += f"\n(the previous secret also signs until {text_of(until)})"
    return _Shown(answer, text)


async def _deliveries(client: AdminClient, args: argparse.Namespace) -> _Shown:
    query = {"status": args.status} if args.status else {}
    if args.limit is not None:
        query["limit"] = str(args.limit)
    if args.before is not None:
        query["before"] = str(args.before)
    path = f"/v1/webhooks/{segment(args.id)}/deliveries"
    answer = answered(await client.call("GET", path, query=query))
    rows = [
        [
            text_of(d.get("id")),
            text_of(d.get("status")),
            text_of(d.get("attempt_count")),
            text_of(d.get("last_status") or d.get("last_error") or "-")[:40],
            text_of(d.get("created_at")),
            text_of(d.get("event_id")),
        ]
        for d in objects(answer.get("deliveries"))
    ]
    headers = ["ID", "STATUS", "ATTEMPTS", "LAST", "CREATED", "EVENT"]
    text = table(headers, rows) if rows else "no deliveries"
    older = answer.get("next_before")
    if rows and isinstance(older, int) and not isinstance(older, bool):
        text += f"\n(older ones: --before {older})"
    return _Shown(answer, text)


async def _redeliver(client: AdminClient, args: argparse.Namespace) -> _Shown:
    path = f"/v1/deliveries/{args.delivery_id}/redeliver"
    delivery = answered(await client.call("POST", path))
    return _Shown(delivery, f"delivery {args.delivery_id} is {text_of(delivery.get('status'))}")


async def _recover(client: AdminClient, args: argparse.Namespace) -> _Shown:
    path = f"/v1/webhooks/{segment(args.id)}/recover"
    answer = answered(await client.call("POST", path, {"since": args.since}))
    count = text_of(answer.get("deliveries"))
    return _Shown(answer, f"{count} deliveries owed again to webhook {args.id}")


_ACTIONS: Mapping[str, Callable[[AdminClient, argparse.Namespace], Awaitable[_Shown]]] = {
    "add": _add,
    "list": _list,
    "show": _show,
    "update": _update,
    "remove": _remove,
    "rotate-secret": _rotate,
    "secret": _secret,
    "deliveries": _deliveries,
    "redeliver": _redeliver,
    "recover": _recover,
}


def _webhook_text(hook: JsonObject) -> str:
    enabled = "yes"
    if hook.get("enabled") is not True:
        reason = text_of(hook.get("disabled_reason")) or "disabled"
        enabled = f"no ({reason}; ctct-relay webhooks update {text_of(hook.get('id'))} --enable)"
    rate = hook.get("rate_limit_per_s")
    lines = [
        ("id", text_of(hook.get("id"))),
        ("url", _url_text(hook.get("url"), note=True)),
        ("event types", _types_text(hook.get("event_types"))),
        ("description", text_of(hook.get("description"))),
        ("enabled", enabled),
        ("rate limit", "none" if rate is None else f"{text_of(rate)}/s"),
        ("failing since", text_of(hook.get("failing_since") or "-")),
        ("created", text_of(hook.get("created_at"))),
        ("updated", text_of(hook.get("updated_at"))),
    ]
    if hook.get("previous_secret_expires_at"):
        lines.append(("old secret until", text_of(hook.get("previous_secret_expires_at"))))
    if "secret" in hook:
        again = f"ctct-relay webhooks secret {text_of(hook.get('id'))} shows it again"
        lines.append(("secret", f"{text_of(hook.get('secret'))}  ({again})"))
    width = max(len(k) for k, _ in lines) + 1
    return "\n".join(f"{k + ':':{width}} {v}" for k, v in lines)


def _url_text(url: object, *, note: bool = False) -> str:
    """A webhook URL as the text views show it: without user info or fragment and with every
    query value as ``***``, as ``status`` shows it (a password or a token in the query must not
    land in a terminal's scrollback or a pasted log; the query's keys tell apart URLs that
    differ only there); ``--json`` has it as registered. ``note``: say so when something was
    left out."""
    if not isinstance(url, str):
        return text_of(url)
    public = text_of(public_url(url))
    if note and public_url(url) != url:
        return f"{public}  (user info, query values and fragment not shown; --json has them)"
    return public


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Rows as aligned plain-text columns (also used by the operations commands)."""
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [headers, *rows]
    )


def _event_types(given: Sequence[str]) -> list[str]:
    """Every ``-e`` value, comma lists split, each as :func:`_event_type` makes it; an empty
    one (``-e ''``, ``-e click,``) is a usage error rather than an odd type sent to the API."""
    types: list[str] = []
    for value in given:
        for part in value.split(","):
            if not part.strip():
                raise UsageError(f"--event-type: empty event type in {value!r}")
            types.append(_event_type(part.strip()))
    return types


def _event_type(text: str) -> str:
    """``click`` → ``com.constantcontact.email.click``; ``*`` → the wildcard; full types as is."""
    return text if "." in text else TYPE_PREFIX + text


def _types_text(value: object) -> str:
    types = value if isinstance(value, list) else []
    return ", ".join(text_of(t).removeprefix(TYPE_PREFIX) for t in types)


def segment(text: str) -> str:
    """``text`` quoted as one URL path segment."""
    return quote(text, safe="")


def text_of(value: object) -> str:
    """A JSON value as table text (null as empty), on one line (line breaks and tabs become
    spaces) and with every other control character shown escaped (:func:`terminal_safe`):
    API-stored text (a description, a response excerpt, an endpoint's error) must not move the
    cursor, retitle the window or fake other lines."""
    return "" if value is None else terminal_safe(str(value).translate(_SPACES))


_SPACES = str.maketrans(dict.fromkeys("\t\n\v\f\r", " "))


# Bidirectional overrides and isolates: they reorder what the terminal shows ("Trojan Source")
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def failed(exc: UsageError | AdminApiError, err: TextIO) -> int:
    """Print ``exc`` as the command's one error line; the exit status it calls for."""
    print(f"ctct-relay: error: {terminal_safe(str(exc))}", file=err)
    return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_ERROR


def terminal_safe(text: str, keep: str = "") -> str:
    """``text`` with each control character (C0, DEL, C1: ESC and CSI start terminal escape
    sequences) and bidirectional override shown as ``\\x1b`` / ``\\u202e``, except those in
    ``keep`` (the line breaks of a multi-line answer). --json output is not touched: JSON
    escapes them itself."""
    if text.isprintable() and not _BIDI.intersection(text):
        return text  # the common case: nothing to look at per character
    return "".join(
        c
        if c in keep or not (unicodedata.category(c) == "Cc" or c in _BIDI)
        else (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
        for c in text
    )


def objects(value: object) -> list[JsonObject]:
    """The JSON objects of a list value (anything else: none)."""
    items = value if isinstance(value, list) else []
    return [{str(k): v for k, v in item.items()} for item in items if isinstance(item, dict)]


def answered(answer: JsonObject | None) -> JsonObject:
    """An answer the API must have sent, or a clear error."""
    if answer is None:
        raise AdminApiError("the admin API sent an empty answer")
    return answer


def _json_object(raw: bytes, what: str) -> JsonObject:
    try:
        parsed: object = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise AdminApiError(f"{what}: the answer is not JSON") from None
    if not isinstance(parsed, dict):
        raise AdminApiError(f"{what}: expected a JSON object in the answer")
    return {str(k): v for k, v in parsed.items()}


def _error_message(raw: bytes) -> str | None:
    """The API's own error message; None when the answer is not the API's."""
    try:
        parsed: object = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if isinstance(parsed, dict):
        error = parsed.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
    return None
