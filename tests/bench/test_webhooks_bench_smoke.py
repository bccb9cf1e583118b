"""bench/webhooks.py's sides on a tiny load against a real receiver on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

from bench import webhooks
from relay.events import structured
from relay.sinks.webhooks import DeliverySettings


async def test_both_sides_deliver_every_event_and_measure_cpu(
    tmp_path: Path, aiohttp_server: Callable[..., Awaitable[TestServer]]
) -> None:
    """The bare loop and the dispatcher each POST every event once; wall and CPU time > 0;
    latency samples are commit-to-receipt times."""
    received: list[bytes] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.read())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    server = await aiohttp_server(app)
    url = str(server.make_url("/hook"))
    bodies = [
        structured(a.attributes(), orjson.dumps(a.data())) for a in webhooks.activities(30, 0)
    ]
    bare = await webhooks.bare(url, bodies, 4)
    assert len(received) == 30
    assert bare.seconds > 0
    assert bare.cpu_s > 0
    received.clear()
    settings = replace(DeliverySettings(), concurrency=4, idle_poll_s=0.01)
    run = await webhooks.dispatched(tmp_path, url, 30, settings, 0)
    assert sorted(received) == sorted(bodies)  # the same CloudEvents, each once
    assert run.seconds > 0
    assert run.cpu_s > 0
    latencies = await webhooks.latency(tmp_path, url, settings, 5)
    assert len(latencies) == 5
    assert all(0 < s < 5 for s in latencies)
