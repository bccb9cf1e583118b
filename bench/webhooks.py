"""Webhook delivery throughput: the relay's dispatcher beside a bare aiohttp POST loop.

A fast receiver runs in its own process (so its CPU is not charged to either side). Both sides
send the same structured CloudEvents at the same concurrency: the bare loop is N tasks doing
``session.post`` back to back; the dispatcher reads them from a SQLite outbox, fans them out,
signs them (Standard Webhooks) and records every attempt. Rounds alternate so machine noise hits
both alike; the ratio of medians is the result (target: the dispatcher at least 0.7 of the bare
loop); CPU per delivery is the process's CPU time (both threads) over the deliveries. Latency
from outbox commit to receipt is measured with events committed one at a time, the dispatcher
told of each commit as the poller tells it.

    python bench/webhooks.py [--events 3000] [--concurrency 8] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import signal
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web

from relay import logs
from relay.events import Activity, Kind, from_millis, structured
from relay.sinks import signing
from relay.sinks.ssrf import Guard
from relay.sinks.webhooks import DeliverySettings, WebhookDispatcher
from relay.store import Store, StreamKey, Webhook, open_store

TARGET = 0.7
T0 = 1_763_600_000_000


def receive(port: int) -> None:
    """The receiver process: answer 204 to every POST, count them."""
    count = {"n": 0}

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        count["n"] += 1
        return web.Response(status=204)

    async def seen(_request: web.Request) -> web.Response:
        return web.json_response(count)

    app = web.Application()
    app.router.add_post("/hook", hook)
    app.router.add_get("/count", seen)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def activities(n: int, offset: int) -> list[Activity]:
    return [
        Activity(
            account="bench",
            kind=Kind.OPEN,
            campaign_id="1100394165290",
            contact_id=str(offset + i),
            email_address=f"c{offset + i}@example.com",
            occurred_at=from_millis(T0 + offset + i),
        )
        for i in range(n)
    ]


@dataclass(frozen=True)
class Run:
    """One timed side of a round: wall seconds and this process's CPU seconds."""

    seconds: float
    cpu_s: float


async def bare(url: str, bodies: list[bytes], concurrency: int) -> Run:
    """N workers POSTing every body, each awaiting its response."""
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    headers = {"content-type": "application/cloudevents+json"}

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            body = queue.get_nowait()
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        started, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return Run(time.perf_counter() - started, time.process_time() - cpu)


async def new_store(tmp: Path, name: str) -> Store:
    store = open_store(f"sqlite:///{tmp / name}")
    await store.open()
    await store.ensure_streams([StreamKey("bench", "campaign", "1100394165290")], T0)
    return store


async def dispatched(tmp: Path, url: str, n: int, settings: DeliverySettings, round_: int) -> Run:
    """The dispatcher delivering n committed events (fan-out, sign, record), until every
    attempt record is written."""
    store = await new_store(tmp, f"round{round_}.db")
    hook = Webhook("wh_bench", url, ("com.constantcontact.email.*",), signing.generate_secret())
    await store.create_webhook(hook)
    sid = (await store.streams())[0].id
    for start in range(0, n, 500):
        await store.commit_page(sid, activities(min(500, n - start), start), T0)
    dispatcher = WebhookDispatcher(store, settings, Guard.from_strings(["127.0.0.0/8"]))
    stop = asyncio.Event()
    started, cpu = time.perf_counter(), time.process_time()
    task = asyncio.create_task(dispatcher.run(stop))
    while dispatcher.delivered < n:  # noqa: ASYNC110 - polling a counter costs less than a hook
        await asyncio.sleep(0.005)
    stop.set()
    await task  # the last attempt records are written
    run = Run(time.perf_counter() - started, time.process_time() - cpu)
    await store.close()
    return run


async def latency(tmp: Path, url: str, settings: DeliverySettings, samples: int) -> list[float]:
    """Commit-to-receipt seconds, one event at a time: from the return of the outbox commit
    (its own fsync is not delivery latency) to the 2xx coming back."""
    store = await new_store(tmp, "latency.db")
    await store.create_webhook(
        Webhook("wh_lat", url, ("com.constantcontact.email.*",), signing.generate_secret())
    )
    sid = (await store.streams())[0].id
    dispatcher = WebhookDispatcher(store, settings, Guard.from_strings(["127.0.0.0/8"]))
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop))
    await asyncio.sleep(0.3)
    out = []
    for i in range(samples):
        before = dispatcher.delivered
        await store.commit_page(sid, activities(1, 10_000_000 + i), T0)
        committed = time.perf_counter()  # the commit returned: the event is in the outbox
        dispatcher.notify()  # as the poller does after each commit
        while dispatcher.delivered == before:  # noqa: ASYNC110 - as above
            await asyncio.sleep(0.001)
        out.append(time.perf_counter() - committed)
    stop.set()
    await task
    await store.close()
    return out


async def measure(port: int, args: argparse.Namespace) -> None:
    url = f"http://127.0.0.1:{port}/hook"
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            try:
                async with session.get(f"http://127.0.0.1:{port}/count"):
                    break
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)
    settings = replace(DeliverySettings(), concurrency=args.concurrency, idle_poll_s=0.01)
    bodies = [
        structured(a.attributes(), orjson.dumps(a.data())) for a in activities(args.events, 0)
    ]
    bare_runs, relay_runs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            bare_runs.append(await bare(url, bodies, args.concurrency))
            relay_runs.append(await dispatched(Path(tmp), url, args.events, settings, r))
        lat = await latency(Path(tmp), url, settings, args.latency_samples)
    bare_med = statistics.median(args.events / run.seconds for run in bare_runs)
    relay_med = statistics.median(args.events / run.seconds for run in relay_runs)
    bare_cpu = statistics.median(run.cpu_s / args.events * 1e6 for run in bare_runs)
    relay_cpu = statistics.median(run.cpu_s / args.events * 1e6 for run in relay_runs)
    ratio = relay_med / bare_med
    q = statistics.quantiles(lat, n=100)
    print(
        f"webhooks: {args.events} events per round, concurrency {args.concurrency},"
        f" {args.rounds} rounds"
    )
    print(
        f"  bare aiohttp POST loop : {bare_med:8.0f} deliveries/s (median),"
        f" {bare_cpu:4.0f} us CPU per delivery"
    )
    print(
        f"  ctct-relay dispatcher  : {relay_med:8.0f} deliveries/s (median),"
        f" {relay_cpu:4.0f} us CPU per delivery (both threads)"
    )
    verdict = "meets" if ratio >= TARGET else "MISSES"
    print(f"  ratio dispatcher/bare  : {ratio:8.2f}  ({verdict} target >= {TARGET})")
    print(
        f"  commit-to-receipt latency: p50 {q[49] * 1000:.1f} ms,"
        f" p99 {q[98] * 1000:.1f} ms ({len(lat)} samples)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--latency-samples", type=int, default=200)
    args = parser.parse_args()
    logs.configure("error")
    # SIGTERM stops the bench as Ctrl-C does, so the finally below takes the helper process
    # down with it (SIGTERM's default action would leave it running)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = multiprocessing.get_context("spawn").Process(target=receive, args=(port,), daemon=True)
    server.start()
    try:
        asyncio.run(measure(port, args))
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return 130
    finally:
        server.terminate()
        server.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
