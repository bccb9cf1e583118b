"""Webhook delivery survives SIGKILL: real ``ctct-relay run`` processes against the simulator,
two real aiohttp receivers on 127.0.0.1, the relay killed mid-delivery again and again.

At-least-once is the promise: every activity of the simulator's ground truth reaches every
endpoint whose filters match it, at least once; an attempt cut short by the kill is sent again
after the restart, and such a duplicate carries the same ``webhook-id`` (the CloudEvent id) and
the same event as the first.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from standardwebhooks.webhooks import Webhook as Verifier
from standardwebhooks.webhooks import WebhookVerificationError

from relay.sinks.signing import generate_secret
from tests.procs import (
    Identity,
    Proc,
    SimProcess,
    data_identity,
    relay_config,
    sim_scenario,
    wait_until,
)

pytestmark = pytest.mark.integration

KEY, TOKEN = "k-whcrash-1", "t-whcrash-1"
PREFIX = "com.constantcontact.email."
KILLS = 12
CLICKS_AND_OPENS = (PREFIX + "click", PREFIX + "open")


class Receiver:
    """A webhook endpoint (aiohttp) that verifies every signature, answers after a few
    milliseconds (so the relay always has attempts in flight) and keeps what it received."""

    def __init__(self, name: str, secret: str, seed: int) -> None:
        self.name = name
        self.secret = secret
        self.url = ""
        self.received: list[tuple[str, str, bytes]] = []  # (webhook-id, event id, body)
        self.bad_signatures = 0
        self.in_flight = 0
        self._rng = random.Random(seed)
        self._verifier = Verifier(secret)

    async def handle(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        try:
            body = await request.read()
            headers = {k.lower(): v for k, v in request.headers.items()}
            try:
                self._verifier.verify(body, headers)
            except WebhookVerificationError:
                self.bad_signatures += 1
                return web.Response(status=400)
            await asyncio.sleep(self._rng.uniform(0.02, 0.06))
            event = orjson.loads(body)
            self.received.append((headers["webhook-id"], str(event["id"]), body))
            return web.Response(status=204)
        finally:
            self.in_flight -= 1

    def identities(self) -> Counter[Identity]:
        """What arrived, by activity (kind, campaign, contact, time, link), with repeats."""
        out: Counter[Identity] = Counter()
        for _, _, body in list(self.received):
            event = orjson.loads(body)
            kind = str(event["type"]).removeprefix(PREFIX)
            out[data_identity(kind, orjson.dumps(event["data"]))] += 1
        return out


class Receivers:
    """The endpoints, served by one event loop in a background thread."""

    def __init__(self, *receivers: Receiver) -> None:
        self.receivers = receivers
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> Receivers:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return self

    def __exit__(self, *_: object) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()

    async def _start(self) -> None:
        app = web.Application()
        for r in self.receivers:
            app.router.add_post(f"/{r.name}", r.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        for r in self.receivers:
            r.url = f"http://127.0.0.1:{port}/{r.name}"

    def in_flight(self) -> int:
        return sum(r.in_flight for r in self.receivers)


@pytest.fixture
def receivers() -> Iterator[tuple[Receiver, Receiver]]:
    """Everything (wildcard) and clicks-and-opens, each with its own secret."""
    everything = Receiver("everything", generate_secret(), seed=1)
    engaged = Receiver("engaged", generate_secret(), seed=2)
    with Receivers(everything, engaged):
        yield everything, engaged


def scenario() -> dict[str, object]:
    return sim_scenario(
        KEY,
        TOKEN,
        seed=33,
        contacts={"count": 60},
        campaigns={"count": 6, "already_sent": 2, "sent_every_s": 600, "audience": 1.0},
        rates={"late": 0.0, "send_batch": 30, "open_delay_s": 300},
    )


def test_sigkill_mid_delivery_loses_nothing_and_duplicates_keep_their_id(
    tmp_path: Path, receivers: tuple[Receiver, Receiver]
) -> None:
    """Twelve SIGKILLs with attempts in flight: every activity reaches each matching endpoint at
    least once, and every duplicate has the webhook-id (and event) of the first delivery."""
    everything, engaged = receivers
    sim = SimProcess(tmp_path, scenario()).start()
    config = relay_config(
        tmp_path,
        sim,
        api_key=KEY,
        token=TOKEN,
        webhooks={
            "allow_networks": ["127.0.0.0/8"],
            "retry_schedule_s": [0.2, 0.5, 1, 1, 1, 1, 1, 1],
            "concurrency": 4,
            "declared": [
                {"url": everything.url, "event_types": [PREFIX + "*"], "secret": everything.secret},
                {
                    "url": engaged.url,
                    "event_types": list(CLICKS_AND_OPENS),
                    "secret": engaged.secret,
                },
            ],
        },
    )
    relay = Proc(["run", "--config", str(config)], tmp_path / "relay.log")
    rng = random.Random(5)
    killed_in_flight = 0
    try:
        relay.start()
        for _ in range(KILLS):
            sim.advance(300)
            wait_busy(everything, engaged)
            time.sleep(rng.uniform(0.05, 0.4))
            wait_busy(everything, engaged)  # the kill lands while attempts are in flight
            killed_in_flight += receivers_busy(everything, engaged)
            relay.kill()
            relay.start()
        sim.advance(3600)
        truth = sim.truth()
        wanted = Counter({i: 1 for i in truth if PREFIX + i[0] in CLICKS_AND_OPENS})
        wait_until(
            lambda: covers(everything, truth) and covers(engaged, wanted),
            60,
            "every activity delivered to each matching endpoint",
        )
        assert relay.alive(), relay.output()[-3000:]
        assert relay.stop() == 0
    finally:
        relay.kill()
        sim.kill()
    assert relay.starts == KILLS + 1
    assert killed_in_flight >= 10, f"only {killed_in_flight} kills had attempts in flight"
    assert everything.bad_signatures == engaged.bad_signatures == 0
    assert set(engaged.identities()) == set(wanted), "the filter let other types through"
    duplicates = {r.name: duplicates_with_one_id(r) for r in (everything, engaged)}
    print(
        f"webhooks crash test: {KILLS} SIGKILLs ({killed_in_flight} with attempts in flight);"
        f" delivered {len(everything.received)} + {len(engaged.received)} requests for"
        f" {len(truth)} + {len(wanted)} activities; duplicates: {duplicates}"
    )


def receivers_busy(*receivers: Receiver) -> bool:
    return any(r.in_flight for r in receivers)


def wait_busy(*receivers: Receiver, timeout_s: float = 10.0) -> None:
    """Until a request is being answered (or the timeout: then the kill is not counted)."""
    deadline = time.monotonic() + timeout_s
    while not receivers_busy(*receivers) and time.monotonic() < deadline:
        time.sleep(0.005)


def covers(receiver: Receiver, truth: Counter[Identity]) -> bool:
    got = receiver.identities()
    return all(got[identity] >= 1 for identity in truth)


def duplicates_with_one_id(receiver: Receiver) -> int:
    """How many requests repeated an activity already received; asserts each repeat carried
    the first one's webhook-id, that the id is the CloudEvent id, and the event is the same."""
    by_id: dict[str, list[bytes]] = defaultdict(list)
    ids_of: dict[Identity, set[str]] = defaultdict(set)
    for webhook_id, event_id, body in receiver.received:
        assert webhook_id == event_id, (webhook_id, event_id)
        by_id[webhook_id].append(body)
        event = orjson.loads(body)
        kind = str(event["type"]).removeprefix(PREFIX)
        ids_of[data_identity(kind, orjson.dumps(event["data"]))].add(webhook_id)
    spread = {identity: ids for identity, ids in ids_of.items() if len(ids) > 1}
    assert not spread, f"{receiver.name}: one activity under several ids: {list(spread)[:3]}"
    for webhook_id, bodies in by_id.items():
        events = {orjson.dumps(orjson.loads(b), option=orjson.OPT_SORT_KEYS) for b in bodies}
        assert len(events) == 1, f"{receiver.name}: {webhook_id} carried different events"
    return sum(len(bodies) - 1 for bodies in by_id.values())
