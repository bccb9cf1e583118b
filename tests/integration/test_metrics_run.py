"""/metrics of a running relay against the simulator, a real webhook receiver and real Kafka."""

from __future__ import annotations

import asyncio
import uuid
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from relay.app import run_relay
from relay.config import load
from relay.metrics import Metrics
from relay.sim import Faults, Scenario
from relay.sim.scenario import ApiKey, Campaigns, Contacts
from tests.procs import free_port
from tests.simkit import API_KEY, START, TOKEN, MakeSim

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

SCENARIO = Scenario(
    seed=5,
    start=START,
    time_scale=0,
    keys=(ApiKey(API_KEY, TOKEN, qps=None, daily=None),),
    contacts=Contacts(count=50),
    campaigns=Campaigns(count=8, already_sent=3, sent_every_s=600),
    faults=Faults(error_5xx_rate=0.05),
)


def receiver() -> tuple[web.Application, Counter[str]]:
    """Accepts most events; fails some once (retried) and some always (dead-lettered)."""
    seen: Counter[str] = Counter()

    async def hook(request: web.Request) -> web.Response:
        event_id = request.headers["webhook-id"]
        seen[event_id] += 1
        bucket = zlib.crc32(event_id.encode()) % 20
        if bucket == 0 or (bucket < 4 and seen[event_id] == 1):
            return web.Response(status=500)
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    return app, seen


async def scrape(session: aiohttp.ClientSession, url: str) -> Samples:
    async with session.get(url) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        text = await resp.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels``."""
    return sum(
        value
        for (sample, pairs), value in samples.items()
        if sample == name and set(labels.items()) <= set(pairs)
    )


async def test_listed_series_move_during_a_run(
    make_sim: MakeSim,
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    kafka_bootstrap: str,
    tmp_path: Path,
) -> None:
    """API requests, quota, waits, events, lag, outbox depth, Kafka latency, webhook outcomes,
    delivery latency and dead letters all show up and move while the relay works."""
    sim = await make_sim(SCENARIO, advance_s=1800)
    app, _seen = receiver()
    hook = await aiohttp_server(app)
    admin_port = free_port()
    config = {
        "state": f"sqlite:///{tmp_path / 'state.db'}",
        "accounts": [
            {
                "name": "acme",
                "base_url": sim.url,
                "api_key": API_KEY,
                "access_token": TOKEN,
                "campaigns": {"discover": True, "discover_interval_s": 0.5},
                "rate_limit": {"requests_per_second": 8, "requests_per_day": 100000},
            }
        ],
        "poll": {"start_from": "earliest", "overlap_s": 1800, "page_limit": 10},
        "schedule": {"min_interval_s": 0.3, "max_interval_s": 2, "tick_s": 0.2, "concurrency": 4},
        "http": {"max_attempts": 4, "backoff_base_s": 0.05, "backoff_max_s": 0.2},
        "admin": {"port": admin_port, "token": "metrics-test-admin-token"},
        "kafka": {
            "bootstrap_servers": kafka_bootstrap,
            "topic": f"metrics-{uuid.uuid4().hex[:8]}.{{kind}}",
            "create_topics": True,
            "partitions": 1,
        },
        "webhooks": {
            "allow_networks": ["127.0.0.1/32"],
            "retry_schedule_s": [0.2],
            "declared": [{"url": str(hook.make_url("/hook"))}],
        },
        "logging": {"level": "warning", "format": "json"},
    }
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(config))
    settings = load(path, environ={})
    stop = asyncio.Event()
    relay = asyncio.create_task(run_relay(settings, stop, Metrics()))
    url = f"http://127.0.0.1:{admin_port}/metrics"
    try:
        async with aiohttp.ClientSession() as session:
            first = await _scrape_when(session, url, relay, "ctct_relay_events_new_total")
            for _ in range(6):
                await sim.advance(600)
                await asyncio.sleep(1.5)
            await asyncio.sleep(3)  # webhook retries (0.2 s) settle into delivered or dead
            last = await scrape(session, url)
    finally:
        stop.set()
        await relay
    moved = {
        "ctct_relay_api_requests_total": {"status": "200"},
        "ctct_relay_api_request_seconds_count": {},
        "ctct_relay_quota_used_requests": {"account": "acme"},
        "ctct_relay_rate_limit_waits_total": {"account": "acme"},
        "ctct_relay_rate_limit_wait_seconds_total": {"account": "acme"},
        "ctct_relay_events_fetched_total": {},
        "ctct_relay_events_new_total": {},
        "ctct_relay_events_deduplicated_total": {},
        "ctct_relay_kafka_publish_seconds_count": {},
        "ctct_relay_events_published_total": {"sink": "kafka"},
        "ctct_relay_delivery_latency_seconds_count": {"sink": "webhooks"},
        "ctct_relay_webhook_attempts_total": {"outcome": "delivered"},
        "ctct_relay_poll_passes_total": {"result": "ok"},
    }
    for name, labels in moved.items():
        assert total(last, name, **labels) > total(first, name, **labels), name
    assert total(last, "ctct_relay_quota_remaining_requests", account="acme") < total(
        first, "ctct_relay_quota_remaining_requests", account="acme"
    )
    assert total(last, "ctct_relay_webhook_attempts_total", outcome="retry") > 0
    assert total(last, "ctct_relay_webhook_attempts_total", outcome="dead") > 0
    assert total(last, "ctct_relay_dead_letters_total", sink="webhooks") > 0
    assert total(last, "ctct_relay_delivery_latency_seconds_count", sink="kafka") > 0
    assert total(last, "ctct_relay_api_requests_total") > total(
        last, "ctct_relay_api_requests_total", status="200"
    ), "the injected 5xx answers are counted under their status"
    lags = {dict(pairs)["kind"] for (name, pairs) in last if "watermark_lag_max" in name}
    assert {"send", "open", "click"} <= lags
    assert ("ctct_relay_outbox_depth_events", (("sink", "kafka"),)) in last
    assert ("ctct_relay_outbox_depth_events", (("sink", "webhooks-fanout"),)) in last
    label_names = {k for (_name, pairs) in last for k, _v in pairs}
    assert label_names <= {
        "account",
        "budget",  # one per configured api_key
        "endpoint",
        "status",
        "result",
        "sink",
        "outcome",
        "scope",
    } | {
        "kind",
        "state",
        "le",
    }, "no unbounded label (stream, campaign, contact or webhook id)"


async def _scrape_when(
    session: aiohttp.ClientSession, url: str, relay: asyncio.Task[None], name: str
) -> Samples:
    """The first scrape that shows some committed events (the relay is past its start-up)."""
    for _ in range(120):
        if relay.done():
            relay.result()  # raises the relay's error
        try:
            samples = await scrape(session, url)
        except aiohttp.ClientConnectionError:
            samples = {}
        if total(samples, name) > 0:
            return samples
        await asyncio.sleep(0.25)
    raise AssertionError(f"{name} never moved")
