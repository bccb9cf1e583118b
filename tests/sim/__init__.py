"""Tests of the Constant Contact v2 API simulator, and the helpers they share."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime

from aiohttp.test_utils import TestClient
from aiohttp.web import Application, Request

from relay.sim import Scenario, scenario_from_mapping

START = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
KEY = "sim-test-key"
TOKEN = "sim-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
Client = TestClient[Request, Application]
JsonObject = dict[str, object]

# Frozen time (advanced explicitly), no limits, enough activity of every kind to page through.
BASE: dict[str, object] = {
    "seed": 3,
    "start": START,
    "time_scale": 0,
    "keys": [{"api_key": KEY, "access_token": TOKEN, "qps": None, "daily": None}],
    "contacts": {"count": 30},
    "campaigns": {"count": 4, "already_sent": 2, "sent_every_s": 600, "links": 2},
    "rates": {
        "open": 0.8,
        "click": 0.6,
        "forward": 0.2,
        "bounce": 0.1,
        "unsubscribe": 0.1,
        "spam": 0.3,
        "scanner": 0.1,
        "open_delay_s": 120,
        "late": 0.2,
        "late_mean_s": 60,
        "send_batch": 8,
    },
}


def scenario(**overrides: object) -> Scenario:
    """The test scenario with top-level sections replaced or merged (one level deep)."""
    data = dict(BASE)
    for key, value in overrides.items():
        current = data.get(key)
        if isinstance(current, Mapping) and isinstance(value, Mapping):
            data[key] = {**current, **value}
        else:
            data[key] = value
    return scenario_from_mapping(data)


async def get_json(client: Client, path: str, expect: int = 200, **params: str) -> object:
    """GET a /v2 path with valid credentials; asserts the status and returns the JSON body."""
    return await fetch_json(client, path, params, expect)


async def fetch_json(client: Client, path: str, params: Mapping[str, str], expect: int) -> object:
    """GET with valid credentials and ``params``; asserts the status, returns the JSON body."""
    resp = await client.get(path, params={"api_key": KEY, **params}, headers=AUTH)
    assert resp.status == expect, await resp.text()
    return await resp.json()


async def all_pages(client: Client, path: str, **params: str) -> list[JsonObject]:
    """Every result of a paged endpoint, following next_link with only the api_key."""
    body = await fetch_json(client, path, params, 200)
    results: list[JsonObject] = []
    while True:
        assert isinstance(body, dict)
        results.extend(body["results"])
        next_link = body["meta"]["pagination"].get("next_link")
        if next_link is None:
            return results
        body = await get_json(client, next_link)


async def truth(client: Client) -> list[JsonObject]:
    """The simulator's ground truth."""
    resp = await client.get("/_sim/truth")
    assert resp.status == 200
    body = await resp.json()
    activities: list[JsonObject] = body["activities"]
    return activities


async def advance(client: Client, seconds: float) -> str:
    """Advance simulated time; returns the new now."""
    resp = await client.post("/_sim/clock", json={"advance_s": seconds})
    assert resp.status == 200, await resp.text()
    now: str = (await resp.json())["now"]
    return now
