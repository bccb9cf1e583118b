"""The ``ctct-relay`` command line: parses arguments, loads settings, runs one command.

This is the boundary that turns every expected failure (bad config, unknown endpoint, unreachable
API) into one clear line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TextIO

import aiohttp
import orjson

from relay import logs, sim
from relay.api.client import add_webhooks_parser, positive_number, resource_id, run_webhooks
from relay.api.ops_client import add_ops_parsers, run_ops
from relay.app import run_relay
from relay.config import AccountSettings, ConfigError, Settings, load
from relay.ctct import catalogue
from relay.ctct.catalogue import Shape
from relay.ctct.client import CtctClient
from relay.ctct.errors import CtctError
from relay.ctct.ratelimit import RateLimiter
from relay.devkafka import DevKafkaError, serve_dev_kafka
from relay.events import RecordError, parse_activity, parse_time
from relay.sinks.kafka import KafkaSinkError
from relay.store import StoreError

EXIT_RUNTIME = 1
EXIT_USAGE = 2
# the scenario shipped with the package (config/sim.example.yaml in a checkout links to it), so
# `ctct-relay sim` and `demo` work from any directory and from an installed wheel
DEFAULT_SCENARIO = str(Path(sim.__file__).with_name("example.yaml"))
OPS_COMMANDS = frozenset(
    {"status", "replay", "pause", "resume", "targets", "dead-letters", "sinks"}
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``ctct-relay`` and ``python -m relay``."""
    redactor = logs.Redactor()
    try:
        args = _parser().parse_args(argv)  # in the try: a Ctrl-C here is 130 too
        if args.command == "sim":
            return _sim(args)
        if args.command == "demo":
            return _demo(args)
        if args.command == "endpoints":
            return _endpoints(sys.stdout)
        if args.command == "webhooks":
            return run_webhooks(args, os.environ, sys.stdout)
        if args.command in OPS_COMMANDS:
            return run_ops(args, os.environ, sys.stdout)
        if args.command == "dev-kafka":
            logs.configure("warning")
            data_dir = Path(args.data_dir) if args.data_dir else None
            asyncio.run(serve_dev_kafka(args.port, data_dir, sys.stdout))
            return 0
        settings = load(args.config)
        redactor = logs.configure(
            settings.logging.level, settings.logging.format, settings.secrets()
        )
        if args.command == "run":
            asyncio.run(_run(settings))
            return 0
        return asyncio.run(_fetch(settings, args, sys.stdout))
    except (ConfigError, sim.ScenarioError, catalogue.UnknownEndpointError) as exc:
        return _fail(redactor.text(str(exc)), EXIT_USAGE)
    except (CtctError, StoreError, DevKafkaError, KafkaSinkError) as exc:
        return _fail(redactor.text(str(exc)), EXIT_RUNTIME)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into head, less, …: the reader left, nothing to say
        sys.stderr.close()
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctct-relay",
        description="Change-feed relay for the Constant Contact v2 tracking API.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("run", help="run the relay: poll, deduplicate, publish")
    p.add_argument("--config", required=True, help="relay config YAML")

    p = commands.add_parser("sim", help="run the Constant Contact v2 API simulator")
    p.add_argument(
        "--config",
        default=DEFAULT_SCENARIO,
        help="scenario YAML (default: the packaged example, config/sim.example.yaml)",
    )
    p.add_argument("--host", default="127.0.0.1", help="listen address (%(default)s)")
    p.add_argument("--port", type=_port, default=8080, help="listen port (%(default)s)")

    p = commands.add_parser(
        "demo", help="run the simulator, the relay, a webhook receiver (and Kafka) together"
    )
    p.add_argument(
        "--scenario",
        default=DEFAULT_SCENARIO,
        help="scenario YAML (default: the packaged example, config/sim.example.yaml)",
    )
    p.add_argument(
        "--duration", type=positive_number, default=None, help="stop after this many seconds"
    )
    p.add_argument("--state-dir", default=None, help="keep the relay state here (default: temp)")
    p.add_argument("--no-kafka", action="store_true", help="do not start a local Kafka broker")

    commands.add_parser("endpoints", help="list the upstream endpoints the client knows")
    add_webhooks_parser(commands)
    add_ops_parsers(commands)

    p = commands.add_parser(
        "dev-kafka", help="run a local single-node Apache Kafka broker (needs Java 17 and Maven)"
    )
    p.add_argument("--port", type=_port, default=None, help="client port (default: a free one)")
    p.add_argument("--data-dir", default=None, help="keep the broker's data here across runs")

    p = commands.add_parser("fetch", help="call one upstream endpoint and print what it returns")
    p.add_argument("endpoint", help="catalogue name, e.g. campaign.clicks (see 'endpoints')")
    p.add_argument("--config", required=True, help="relay config YAML")
    p.add_argument("--account", help="account name (default: the first one)")
    # checked as `targets` and `replay --campaign` check it: `--id abc` was requested (and
    # retried, spending the budget) as .../campaigns/abc/tracking/opens
    p.add_argument(
        "--id", dest="resource_id", type=resource_id, help="contact or campaign id (digits)"
    )
    p.add_argument(
        "--link-id", type=resource_id, help="link id (digits), for *.clicks_by_link only"
    )
    p.add_argument(
        "--since", help="created_since / modified_since, ISO 8601 (endpoints that take one)"
    )
    p.add_argument("--limit", type=int, help="page size")
    p.add_argument(
        "--max-pages",
        type=_positive_int,
        default=None,
        help="stop after this many pages (1 or more; paged endpoints)",
    )
    p.add_argument("--raw", action="store_true", help="print records as the API sent them")
    return parser


def _port(text: str) -> int:
    """An argparse type: a TCP port to listen on, 1..65535."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 1 to 65535, got {text!r}")
    return int(text)


def _positive_int(text: str) -> int:
    """An argparse type: a whole number from 1 up (``--max-pages 0`` printed a page anyway)."""
    if not text.isascii() or not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number from 1 up, got {text!r}")
    return int(text)


def _fail(message: str, code: int) -> int:
    print(f"ctct-relay: error: {message}", file=sys.stderr)
    return code


def _scenario(path: str) -> sim.Scenario:
    return sim.load_scenario(Path(path))


def _demo(args: argparse.Namespace) -> int:
    from relay.demo import DemoOptions, run_demo  # the demo's imports only when asked for

    logs.configure("warning")
    options = DemoOptions(
        duration_s=args.duration,
        state_dir=Path(args.state_dir) if args.state_dir else None,
        kafka=not args.no_kafka,
    )
    return asyncio.run(run_demo(_scenario(args.scenario), options, sys.stdout))


def _sim(args: argparse.Namespace) -> int:
    logs.configure()
    scenario = _scenario(args.config)
    try:
        sim.run_sim(scenario, args.host, args.port, source=args.config)
    except OSError as exc:  # the address is taken, not ours, or the host name does not resolve
        where = f"{args.host}:{args.port}"
        raise ConfigError(f"sim: cannot listen on {where}: {exc.strerror or exc}") from None
    return 0


async def _run(settings: Settings) -> None:
    """The relay until SIGTERM or SIGINT, then an orderly shutdown."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await run_relay(settings, stop, settle_heap=True)


def _endpoints(out: TextIO) -> int:
    for ep in catalogue.ENDPOINTS:
        paging = f"paged, limit <= {ep.max_limit}" if ep.paged else "not paged"
        print(f"{ep.name:28} {ep.shape.value:13} {paging:22} {ep.path}", file=out)
    return 0


def _account(settings: Settings, name: str | None) -> AccountSettings:
    if name is None:
        return settings.accounts[0]
    for account in settings.accounts:
        if account.name == name:
            return account
    known = ", ".join(a.name for a in settings.accounts)
    raise ConfigError(f"--account: no account named {name!r} (configured: {known})")


async def _fetch(settings: Settings, args: argparse.Namespace, out: TextIO) -> int:
    endpoint = catalogue.get(args.endpoint)
    account = _account(settings, args.account)
    _refuse_ignored_options(endpoint, args)
    since: datetime | None = None
    try:
        if args.since:
            since = parse_time(args.since, "--since")
        endpoint.url_path(args.resource_id, args.link_id)  # validates the ids the path needs
    except (RecordError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    if args.limit is not None and not 1 <= args.limit <= (endpoint.max_limit or 0):
        takes = f"1..{endpoint.max_limit}" if endpoint.paged else "no limit (not paged)"
        raise ConfigError(f"--limit: {endpoint.name} takes {takes}, got {args.limit}")
    timeout = aiohttp.ClientTimeout(
        total=settings.http.timeout_s, connect=settings.http.connect_timeout_s
    )
    async with aiohttp.ClientSession() as session:
        client = CtctClient(
            session,
            account.credentials(),
            RateLimiter(account.budget),
            retry=settings.http.retry,
            timeout=timeout,
        )
        if not endpoint.paged:
            body = await client.fetch(endpoint, resource_id=args.resource_id)
            out.write(orjson.dumps(body, option=orjson.OPT_INDENT_2).decode() + "\n")
            return 0
        pages = client.pages(
            endpoint,
            resource_id=args.resource_id,
            link_id=args.link_id,
            since=since,
            limit=args.limit,
        )
        async for page in pages:
            for record in page.records:
                out.write(_render(record, endpoint, account.name, args.raw) + "\n")
            if args.max_pages is not None and page.number >= args.max_pages:
                break
    return 0


def _refuse_ignored_options(endpoint: catalogue.Endpoint, args: argparse.Namespace) -> None:
    """An option the endpoint has no use for is a usage error naming it, not silently ignored
    (``campaign.clicks --link-id 5`` printed every click, ``--since`` on a summary all time)."""
    if args.link_id is not None and not endpoint.needs_link:
        raise ConfigError(
            f"--link-id: {endpoint.name} takes no link id (the *.clicks_by_link endpoints do)"
        )
    if args.since is not None and endpoint.since_param is None:
        raise ConfigError(f"--since: {endpoint.name} takes no since time (it has no time filter)")
    if args.resource_id is not None and endpoint.scope is catalogue.Scope.ACCOUNT:
        raise ConfigError(f"--id: {endpoint.name} is account-wide and takes no id")
    if args.max_pages is not None and not endpoint.paged:
        raise ConfigError(f"--max-pages: {endpoint.name} is not paged")


def _render(
    record: dict[str, object], endpoint: catalogue.Endpoint, account: str, raw: bool
) -> str:
    if raw or endpoint.shape is not Shape.ACTIVITIES:
        return orjson.dumps(record).decode()
    try:
        event = parse_activity(record, account=account, kind=endpoint.kind)
    except RecordError as exc:
        return orjson.dumps({"error": str(exc), "record": record}).decode()
    return orjson.dumps(event.to_cloudevent()).decode()
