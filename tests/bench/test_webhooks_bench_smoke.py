"""bench/webhooks.py's sides on a tiny load against a real receiver on 127.0.0.1."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer
from standardwebhooks.webhooks import Webhook as Verifier

from bench import webhooks
from relay.events import structured
from relay.sinks import signing
from relay.sinks.webhooks import DeliverySettings

Received = list[tuple[list[tuple[str, str]], bytes]]


async def receiver(
    aiohttp_server: Callable[..., Awaitable[TestServer]],
) -> tuple[str, Received]:
    received: Received = []

    async def hook(request: web.Request) -> web.Response:
        headers = [(k.decode(), v.decode()) for k, v in request.raw_headers]
        received.append((headers, await request.read()))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    server = await aiohttp_server(app)
    return str(server.make_url("/hook")), received


def shape(headers: list[tuple[str, str]]) -> list[tuple[str, int]]:
    """What must match on the wire: each header's name, in order, and its value's length."""
    return [(name, len(value)) for name, value in headers]


async def test_every_side_delivers_every_event_and_measures_cpu(
    tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    """The bare loops and the dispatcher each POST every event once; wall and CPU time > 0;
    latency samples are commit-to-receipt times."""
    url, received = await receiver(aiohttp_server)
    bodies = [
        structured(a.attributes(), orjson.dumps(a.data())) for a in webhooks.activities(30, 0)
    ]
    minimal = await webhooks.bare_minimal(url, bodies, 4)
    assert sorted(body for _, body in received) == sorted(bodies)
    assert minimal.seconds > 0
    assert minimal.cpu_s > 0
    received.clear()
    settings = replace(DeliverySettings(), concurrency=4, idle_poll_s=0.01)
    requests = webhooks.same_requests(bodies, signing.generate_secret(), int(time.time()))
    bare = await webhooks.bare(url, requests, 4, settings)
    assert sorted(body for _, body in received) == sorted(bodies)
    assert bare.seconds > 0
    assert bare.cpu_s > 0
    received.clear()
    run = await webhooks.dispatched(tmp_path, url, 30, settings, 0)
    assert sorted(body for _, body in received) == sorted(bodies)  # the same CloudEvents, each once
    assert run.seconds > 0
    assert run.cpu_s > 0
    latencies = await webhooks.latency(tmp_path, url, settings, 5)
    assert len(latencies) == 5
    assert all(0 < s < 5 for s in latencies)


async def test_the_bare_loop_sends_the_dispatchers_requests(
    tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    """The floor sends what the dispatcher sends: the same body bytes and the same headers in
    the same order with values of the same lengths, its signature a valid one."""
    url, received = await receiver(aiohttp_server)
    bodies = [structured(a.attributes(), orjson.dumps(a.data())) for a in webhooks.activities(3, 0)]
    settings = replace(DeliverySettings(), concurrency=1, idle_poll_s=0.01)
    secret = signing.generate_secret()
    await webhooks.bare(url, webhooks.same_requests(bodies, secret, int(time.time())), 1, settings)
    floor = {body: headers for headers, body in received}
    received.clear()
    await webhooks.dispatched(tmp_path, url, 3, settings, 0)
    relay = {body: headers for headers, body in received}
    assert set(floor) == set(relay) == set(bodies)
    for body in bodies:
        assert shape(floor[body]) == shape(relay[body])
        names = [name.lower() for name, _ in floor[body]]
        assert {"webhook-id", "webhook-timestamp", "webhook-signature"} <= set(names)
        Verifier(secret).verify(body, dict(floor[body]))  # raises if not a valid signature
