"""Two accounts on one api_key, against the simulator's per-key limits, on SQLite and PostgreSQL.

Constant Contact counts its 4 requests a second and its daily quota per api_key, and one key
serves every account of an integration (each with its own access token). A relay that gave each
account its own budget would send up to 8 a second on the key and get 403 over-qps answers.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from relay.app import run_relay
from relay.config import load
from relay.metrics import Metrics
from relay.sim import Scenario
from relay.sim.scenario import ApiKey, Campaigns, Contacts
from relay.store import open_store
from tests.procs import free_port
from tests.simkit import API_KEY, START, TOKEN, MakeSim

TOKEN_B = "test-token-b-3c19d4"
ADMIN_TOKEN = "shared-key-test-admin-token"
SCENARIO = Scenario(
    seed=9,
    start=START,
    time_scale=0,
    keys=(ApiKey(API_KEY, TOKEN, qps=4, daily=None, more_tokens=(TOKEN_B,)),),
    contacts=Contacts(count=60),
    campaigns=Campaigns(count=4, already_sent=4, sent_every_s=900),
)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
@pytest.mark.serial  # measures wall time: other workers would skew it
async def test_two_accounts_on_one_api_key_keep_to_the_keys_limits(
    backend: str, make_sim: MakeSim, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Both accounts poll busily, yet the key never gets more than 4 requests in a second nor a
    single over-qps answer; one count of the key's requests, and status says who shares it."""
    sim = await make_sim(SCENARIO, advance_s=3600)
    state = (
        f"sqlite:///{tmp_path / 'state.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    admin_port = free_port()
    account = {
        "base_url": sim.url,
        "api_key": API_KEY,
        "campaigns": {"discover": True, "discover_interval_s": 1},
    }
    config = {
        "state": state,
        "accounts": [
            {**account, "name": "shop-a", "access_token": TOKEN},
            {**account, "name": "shop-b", "access_token": TOKEN_B},
        ],
        # busy: full backfills of every campaign in pages of 5, polled again within a second
        "poll": {"start_from": "earliest", "overlap_s": 3600, "page_limit": 5},
        "schedule": {"min_interval_s": 0.2, "max_interval_s": 1, "tick_s": 0.1, "concurrency": 4},
        "http": {"max_attempts": 1},
        "admin": {"port": admin_port, "token": ADMIN_TOKEN},
        "logging": {"level": "warning", "format": "json"},
    }
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(config))
    settings = load(path, environ={})
    stop = asyncio.Event()
    relay = asyncio.create_task(run_relay(settings, stop, Metrics()))
    started = time.monotonic()
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(6):
                await asyncio.sleep(1)
                assert not relay.done(), relay.result()
                await sim.advance(300)
            headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            async with session.get(
                f"http://127.0.0.1:{admin_port}/v1/status", headers=headers
            ) as resp:
                assert resp.status == 200
                status = await resp.json()
            async with session.get(f"{sim.url}/_sim/stats") as resp:
                stats = (await resp.json())["keys"][API_KEY]
            async with session.get(f"http://127.0.0.1:{admin_port}/metrics") as resp:
                scraped = await resp.text()
    finally:
        stop.set()
        await relay
    elapsed_s = time.monotonic() - started
    store = open_store(settings.state, settings.postgres)
    await store.open()
    try:
        budget = settings.accounts[0].budget_name(await store.budget_salt())
        today = datetime.now(UTC).date().isoformat()
        counted = await store.quota_used(budget, today)
        per_account = [await store.quota_used(name, today) for name in ("shop-a", "shop-b")]
    finally:
        await store.close()
    assert stats["rejected"] == {}, stats  # not one over-qps (or any other) refusal
    assert stats["max_per_1s"] <= 4, stats
    # the key was kept busy: demand above its 4/s, so the limit was what held it back
    assert stats["served"] >= 2.5 * elapsed_s, (stats, elapsed_s)
    quotas = {a["name"]: a["quota"] for a in status["accounts"]}
    assert quotas["shop-a"]["budget"] == quotas["shop-b"]["budget"] == budget
    assert quotas["shop-a"]["shared_with"] == ["shop-b"]
    assert quotas["shop-b"]["shared_with"] == ["shop-a"]
    assert API_KEY not in str(status)
    # the budget label: an HMAC under the store's salt; the unsalted digest it was let whoever
    # read /metrics confirm a guessed api_key
    assert f'budget="{budget}"' in scraped
    text = f"ctct-relay budget\0{sim.url}\0{API_KEY}"
    unsalted = hashlib.sha256(text.encode()).hexdigest()[:12]
    assert unsalted not in scraped
    assert unsalted not in str(status)
    requests = {
        name: sum(
            s.value
            for family in text_string_to_metric_families(scraped)
            for s in family.samples
            if s.name == "ctct_relay_api_requests_total" and s.labels["account"] == name
        )
        for name in ("shop-a", "shop-b")
    }
    assert min(requests.values()) >= 4, requests  # both accounts polled, with their own tokens
    # one count for the key, taken before each request was sent
    assert counted >= stats["served"], (counted, stats)
    assert per_account == [0, 0]
