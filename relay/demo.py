"""``ctct-relay demo``: the real pipeline on one machine, in the terminal.

Starts, on loopback ports, the simulator (a lively scenario: campaigns going out, activity every
second), the relay itself (``run_relay`` on the embedded SQLite store, state in a temporary or
given directory), a webhook receiver that verifies the Standard Webhooks signature of every
request and prints each event on one line and, when Java (and Maven, or a filled jar cache) is
there, a local Kafka broker with a consumer printing what arrives on the topics. Stops in order
on Ctrl-C, SIGTERM or after ``--duration``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import os
import shlex
import shutil
import signal
import socket
import sys
import sysconfig
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import orjson
import yaml
from aiohttp import web
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from relay import logs
from relay.app import run_relay
from relay.config import ConfigError, load
from relay.devkafka import DevKafka, DevKafkaError, ensure_kafka
from relay.events import Kind
from relay.sim import Scenario, create_app
from relay.sinks import signing
from relay.store import open_store

TOPIC = "ctct.email.{kind}"
TOLERANCE_S = 300  # Standard Webhooks: refuse timestamps further than this from now
RECEIVER = "demo receiver"  # the description of the demo receiver's webhook
STATE_FILE = "state.db"  # the relay's SQLite state in the state directory
ENABLE_KAFKA = (
    "Kafka: off. To see events on Kafka topics too, install Java 17+ and Maven"
    " (e.g. apt-get install openjdk-17-jre-headless maven) and run make demo again."
)


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """What ``ctct-relay demo`` was asked for."""

    duration_s: float | None = None  # None: until Ctrl-C
    state_dir: Path | None = None  # None: a temporary directory, removed at exit
    kafka: bool = True  # False: do not even look for Java


@dataclass
class Tally:
    """What reached the outside world, for the closing line (and the tests)."""

    webhook_ok: int = 0
    webhook_rejected: int = 0
    kafka: int = 0


async def run_demo(scenario: Scenario, options: DemoOptions, out: TextIO) -> int:
    """Run every component until the duration passes, Ctrl-C or SIGTERM; 0 when all went well."""
    stop = asyncio.Event()
    _on_signals(stop)
    tally = Tally()
    # The sim's daily quota would stop the demo for the day; its per-second limit stays.
    scenario = dataclasses.replace(
        scenario, keys=tuple(dataclasses.replace(k, daily=None) for k in scenario.keys)
    )
    async with contextlib.AsyncExitStack() as stack:
        state = options.state_dir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="ctct-demo-"))
        )
        _state_dir(state)
        # first: a --state-dir another demo (or relay) is using stops here, before its
        # relay.yaml is rewritten or a broker is started on its kafka/ directory
        await _forget_old_receivers(f"sqlite:///{state / STATE_FILE}")
        sim_url = await stack.enter_async_context(_serve(create_app(scenario)))
        secret = signing.generate_secret()
        hook_url = await stack.enter_async_context(_serve(_receiver(secret, out, tally)))
        bootstrap = await _start_kafka(stack, state, options, out)
        admin_port = _free_port()
        config = _write_config(state, scenario, sim_url, hook_url + "/hook", secret, admin_port)
        config = config if bootstrap is None else _with_kafka(config, bootstrap)
        settings = load(config, environ={})  # the demo config is complete; no overrides
        logs.configure("warning", "auto", settings.secrets())
        if bootstrap is not None:
            # a fresh topic's first fetch may meet a leader election: aiokafka logs it as an
            # error and retries; the demo's consumer reports real failures itself
            logging.getLogger("aiokafka.consumer").setLevel(logging.CRITICAL)
            await _create_topics(bootstrap)
            stack.push_async_callback(
                _cancel, asyncio.create_task(_consume(bootstrap, out, tally, stop))
            )
        admin = f"http://127.0.0.1:{admin_port}"
        off = ENABLE_KAFKA if options.kafka else "Kafka: off (--no-kafka)"
        _banner(out, sim_url, hook_url, admin, config, bootstrap, off)
        relay = asyncio.create_task(run_relay(settings, stop))
        stopped = asyncio.create_task(stop.wait())
        # the relay only returns early with an error (e.g. the admin port was taken)
        await asyncio.wait(
            {relay, stopped}, timeout=options.duration_s, return_when="FIRST_COMPLETED"
        )
        stop.set()
        await stopped
        await relay  # an orderly stop: sinks flush, the store closes; its error goes to the CLI
    print(
        f"demo: {tally.webhook_ok} events at the webhook receiver (signatures verified,"
        f" {tally.webhook_rejected} rejected), {tally.kafka} records from Kafka",
        file=out,
        flush=True,
    )
    return 0 if tally.webhook_rejected == 0 else 1


async def _forget_old_receivers(state: str) -> None:
    """Remove the receivers of earlier demos kept in a reused --state-dir: they listened on
    ports that are gone, and their failing deliveries would retry and dead-letter for ever.
    Runs before this demo's relay declares its own receiver. Opened exclusive, like the relay's
    store: a state directory in use by another demo is refused (StoreError) before anything
    else of this demo starts."""
    store = open_store(state, exclusive=True)
    await store.open()
    try:
        for webhook in await store.webhooks():
            if webhook.description == RECEIVER:
                await store.delete_webhook(webhook.id)
    finally:
        await store.close()


def _state_dir(state: Path) -> None:
    """Create the state directory and check that it takes files, before anything starts."""
    probe = state / ".ctct-demo-probe"
    if state.exists() and not state.is_dir():
        raise ConfigError(f"--state-dir: {state} is not a directory")
    try:
        state.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"--state-dir: cannot keep state in {state}: {exc.strerror or exc}"
        ) from None


def _on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
            loop.add_signal_handler(signum, stop.set)


def _banner(
    out: TextIO, sim: str, hook: str, admin: str, config: Path, kafka: str | None, off: str
) -> None:
    lines = [
        f"simulator     {sim}  (ground truth: {sim}/_sim/truth)",
        f"webhooks      {hook}/hook  (signatures verified with the declared secret)",
        f"admin API     {admin}/v1/webhooks  (OpenAPI: {admin}/openapi.json)",
        f"metrics       {admin}/metrics",
        # the demo's admin API listens on loopback without a token (its config sets none), and
        # `status` takes the API's URL, not a config file
        f"status        {relay_command()} status --api {admin}",
        f"relay config  {config}",
        f"Kafka         {kafka}  (topics ctct.email.<kind>)" if kafka else off,
        "events below as they arrive; Ctrl-C stops everything",
    ]
    print("\n".join(lines), file=out, flush=True)


def relay_command(path: str | None = None) -> str:
    """``ctct-relay`` as a shell with ``path`` (default: this one's ``PATH``) runs it: the bare
    name when that finds this installation's, else the full path of the one beside this
    interpreter (``make demo`` runs ``.venv/bin/ctct-relay``, which a fresh shell does not
    find), else this interpreter with ``-m relay``."""
    installed = shutil.which("ctct-relay", path=sysconfig.get_path("scripts"))
    if installed is None:
        return f"{shlex.quote(sys.executable)} -m relay"
    found = shutil.which("ctct-relay", path=path)
    if found is not None and os.path.samefile(found, installed):
        return "ctct-relay"
    return shlex.quote(os.path.abspath(installed))


@contextlib.asynccontextmanager
async def _serve(app: web.Application) -> AsyncIterator[str]:
    """``app`` on a free loopback port; yields its base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def _receiver(secret: str, out: TextIO, tally: Tally) -> web.Application:
    """A webhook endpoint that checks the Standard Webhooks signature and prints the event."""

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        problem = _check_signature(secret, request.headers, body)
        if problem is not None:
            tally.webhook_rejected += 1
            print(f"webhook  REJECTED: {problem}", file=out, flush=True)
            return web.Response(status=401, text=problem)
        tally.webhook_ok += 1
        event = orjson.loads(body)
        print("webhook  " + _event_line(event, event.get("data", {})), file=out, flush=True)
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    return app


def _check_signature(secret: str, headers: Mapping[str, str], body: bytes) -> str | None:
    """None when the request is signed with ``secret`` and recent, else what is wrong."""
    msg_id = headers.get("webhook-id")
    stamp = headers.get("webhook-timestamp")
    given = headers.get("webhook-signature")
    if not (msg_id and stamp and given):
        return "missing webhook-id, webhook-timestamp or webhook-signature"
    if not stamp.isdigit() or abs(time.time() - int(stamp)) > TOLERANCE_S:
        return f"webhook-timestamp {stamp!r} is not within {TOLERANCE_S}s of now"
    expected = signing.sign(secret, msg_id, int(stamp), body)
    if any(hmac.compare_digest(expected, part) for part in given.split()):
        return None
    return "no signature in webhook-signature matches the secret"


def _event_line(attrs: dict[str, object], data: object) -> str:
    """One readable line: kind, campaign, contact, when, id."""
    fields = data if isinstance(data, dict) else {}
    kind = str(attrs.get("type", "")).rsplit(".", 1)[-1]
    extra = f"  link {fields['link_id']}" if fields.get("link_id") else ""
    extra += f"  code {fields['bounce_code']}" if fields.get("bounce_code") else ""
    return (
        f"{kind:11} campaign {fields.get('campaign_id', '?')}  contact"
        f" {fields.get('contact_id', '?'):>6}  at {attrs.get('time', '?')}{extra}"
        f"  id {str(attrs.get('id', ''))[:8]}"
    )


async def _start_kafka(
    stack: contextlib.AsyncExitStack, state: Path, options: DemoOptions, out: TextIO
) -> str | None:
    """A dev broker's bootstrap address, or None (and why) when Kafka cannot run here."""
    if not options.kafka:
        return None
    print("Kafka: starting a local broker (the first run fetches it with Maven)", file=out)
    try:
        dist = await asyncio.to_thread(ensure_kafka)
        broker = await stack.enter_async_context(DevKafka(dist, state / "kafka"))
    except DevKafkaError as exc:
        print(f"Kafka: not started: {exc}", file=out)
        return None
    return broker.bootstrap_servers


def _with_kafka(config: Path, bootstrap: str) -> Path:
    raw = yaml.safe_load(config.read_text())
    raw["kafka"] = {"bootstrap_servers": bootstrap, "create_topics": True, "partitions": 1}
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    return config


async def _create_topics(bootstrap: str) -> None:
    """Create the topics up front, so the consumer subscribes before the first event."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [TOPIC.format(kind=k.value) for k in Kind]
        missing = [NewTopic(t, 1, 1) for t in wanted if t not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(missing)
    finally:
        await admin.close()


async def _consume(bootstrap: str, out: TextIO, tally: Tally, stop: asyncio.Event) -> None:
    """Print every record on the event topics (binary mode: attributes in ce_ headers)."""
    consumer = AIOKafkaConsumer(
        *(TOPIC.format(kind=k.value) for k in Kind),
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    try:
        await consumer.start()
        async for record in consumer:
            headers = {k: v.decode() for k, v in record.headers}
            attrs = {k.removeprefix("ce_"): v for k, v in headers.items()}
            tally.kafka += 1
            line = _event_line(attrs, orjson.loads(record.value or b"{}"))
            print(f"kafka    {line}  ({record.topic}@{record.offset})", file=out, flush=True)
    except KafkaError as exc:
        print(f"Kafka consumer stopped: {exc}", file=out, flush=True)
    finally:
        with contextlib.suppress(KafkaError):
            await consumer.stop()


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _write_config(
    state: Path, scenario: Scenario, sim_url: str, hook_url: str, secret: str, admin_port: int
) -> Path:
    """The relay config of the demo, written where the user can read and reuse it."""
    key = scenario.keys[0]
    config = {
        "state": f"sqlite:///{state / STATE_FILE}",
        "accounts": [
            {
                "name": "demo",
                "base_url": sim_url,
                "api_key": key.api_key,
                "access_token": key.access_token,
                "campaigns": {"discover": True, "discover_interval_s": 2},
                # the simulator's per-second limit; a day's quota the demo never reaches
                "rate_limit": {
                    "requests_per_second": float(key.qps or 4),
                    "requests_per_day": 1_000_000,
                },
            }
        ],
        # repeat_read_s as max_interval_s, as their defaults are: the simulator runs 30 times
        # faster, so a campaign's repeat opens and clicks show within the demo (10 s apart at
        # best; stretched when those reads would take more than schedule.repeat_share of the
        # simulator's 4 requests/s)
        "poll": {"start_from": "earliest", "overlap_s": 600, "repeat_read_s": 10},
        "schedule": {"min_interval_s": 1, "max_interval_s": 10, "tick_s": 0.5},
        "http": {"max_attempts": 5, "backoff_base_s": 0.2, "backoff_max_s": 2},
        "admin": {"host": "127.0.0.1", "port": admin_port},
        "webhooks": {
            "allow_networks": ["127.0.0.1/32"],
            "retry_schedule_s": [1, 2, 5],
            "declared": [{"url": hook_url, "secret": secret, "description": RECEIVER}],
        },
        "logging": {"level": "warning", "format": "auto"},
    }
    path = state / "relay.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)  # it holds the webhook secret and the (simulated) api key
    return path


def _free_port() -> int:
    """A free loopback port for the admin API (printed before the relay starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
