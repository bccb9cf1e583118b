"""Fetch throughput: the relay's client beside a bare aiohttp loop, same pages, same run.

The simulator runs in its own process (so the server's CPU is not charged to either side) with one
busy campaign. Both sides fetch every activity feed of that campaign at limit 500, following
next_link to the end; the bare loop does only GET + read + orjson.loads + next_link. Rounds
alternate between the two so that machine noise hits both alike; the ratio of medians is the
result. Target: the client fetches at least 0.8 as many activities per second as the bare loop.

    python bench/fetch.py [--rounds 7] [--contacts 4000]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import signal
import socket
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime

import aiohttp
import orjson
from aiohttp import web

from relay import logs
from relay.ctct import catalogue
from relay.ctct.catalogue import Scope
from relay.ctct.client import Credentials, CtctClient
from relay.ctct.ratelimit import Budget, RateLimiter
from relay.events import Kind
from relay.sim import Scenario, SimClock, create_app
from relay.sim.scenario import ApiKey, Audience, Campaigns, Contacts

KEY, TOKEN = "bench-key", "bench-token"
START = datetime(2026, 11, 1, tzinfo=UTC)
TARGET = 0.8


def serve(port: int, contacts: int) -> None:
    """The simulator process: one campaign sent to every contact, no limits, no faults."""
    scenario = Scenario(
        seed=3,
        start=START,
        time_scale=0,
        keys=(ApiKey(KEY, TOKEN, qps=None, daily=None),),
        contacts=Contacts(count=contacts),
        campaigns=Campaigns(count=1, already_sent=1, audience=Audience(fraction=1.0)),
    )
    web.run_app(
        create_app(scenario, SimClock(START, time_scale=0)),
        host="127.0.0.1",
        port=port,
        print=None,
        access_log=None,
    )


async def bare_loop(session: aiohttp.ClientSession, base: str, paths: Sequence[str]) -> int:
    """The floor: GET, read, parse, follow next_link. Nothing else."""
    headers = {"Accept": "application/json", "Authorization": f"Bearer {TOKEN}"}
    count = 0
    for path in paths:
        url, params = base + path, {"api_key": KEY, "limit": "500"}
        while True:
            async with session.get(url, params=params, headers=headers) as resp:
                body = orjson.loads(await resp.read())
            count += len(body["results"])
            link = body["meta"]["pagination"].get("next_link")
            if not link:
                break
            url, params = base + link, {"api_key": KEY}
    return count


async def client_loop(client: CtctClient, campaign: str) -> int:
    count = 0
    for kind in Kind:
        async for page in client.pages(catalogue.feed(Scope.CAMPAIGN, kind), resource_id=campaign):
            count += len(page.records)
    return count


async def measure(port: int, rounds: int) -> tuple[list[float], list[float], int]:
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        await _wait_ready(session, base)
        async with session.post(f"{base}/_sim/clock", json={"advance_s": 14 * 86400}) as resp:
            resp.raise_for_status()
        async with session.get(f"{base}/_sim/truth") as resp:
            truth = (await resp.json())["activities"]
        campaign = str(truth[0]["campaign_id"])
        paths = [catalogue.feed(Scope.CAMPAIGN, k).url_path(campaign) for k in Kind]
        client = CtctClient(
            session,
            Credentials(base, KEY, TOKEN),
            RateLimiter(Budget(requests_per_second=1e6, requests_per_day=10**9)),
        )
        bare_rates, client_rates = [], []
        expected = await bare_loop(session, base, paths)  # warm-up, and the count both must see
        assert await client_loop(client, campaign) == expected
        for _ in range(rounds):
            started = time.perf_counter()
            assert await bare_loop(session, base, paths) == expected
            bare_rates.append(expected / (time.perf_counter() - started))
            started = time.perf_counter()
            assert await client_loop(client, campaign) == expected
            client_rates.append(expected / (time.perf_counter() - started))
        return bare_rates, client_rates, expected


async def _wait_ready(session: aiohttp.ClientSession, base: str) -> None:
    for _ in range(200):
        try:
            async with session.get(f"{base}/_sim/clock") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise SystemExit("simulator did not start")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--contacts", type=int, default=4000)
    args = parser.parse_args()
    logs.configure("warning")  # as in production: debug lines are filtered, not rendered
    # SIGTERM stops the bench as Ctrl-C does, so the finally below takes the helper process
    # down with it (SIGTERM's default action would leave it running)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    port = free_port()
    server = multiprocessing.get_context("spawn").Process(
        target=serve, args=(port, args.contacts), daemon=True
    )
    server.start()
    try:
        bare, client, activities = asyncio.run(measure(port, args.rounds))
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
        return 130
    finally:
        server.terminate()
        server.join()
    bare_med, client_med = statistics.median(bare), statistics.median(client)
    ratio = client_med / bare_med
    print(f"fetch: {activities} activities per round, {args.rounds} rounds, limit 500")
    print(f"  bare aiohttp loop : {bare_med:10.0f} activities/s (median)")
    print(f"  ctct-relay client : {client_med:10.0f} activities/s (median)")
    verdict = "meets" if ratio >= TARGET else "MISSES"
    print(f"  ratio client/bare : {ratio:10.2f}  ({verdict} target >= {TARGET})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
