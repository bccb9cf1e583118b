"""The gate and the control plane: auth, 406, per-key limits, faults, truth, stats, clock."""

from __future__ import annotations

import asyncio
import gc
import json
import time
from datetime import UTC, datetime

import aiohttp
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpClient

from relay.sim import ApiKey, create_app, get_state, serve
from relay.sim.app import TICK_S
from relay.sim.gate import accepts_json
from relay.sim.limits import Limits
from relay.sim.v2 import Handler
from tests.sim import AUTH, KEY, TOKEN, Client, advance, get_json, scenario

CONTACTS = "/v2/contacts"


@pytest.fixture
async def client(aiohttp_client: AiohttpClient) -> Client:
    """A simulator with frozen time and an unlimited key."""
    return await aiohttp_client(create_app(scenario()))


async def limited(aiohttp_client: AiohttpClient, qps: int | None, daily: int | None) -> Client:
    """A simulator whose key has the given limits."""
    keys = [{"api_key": KEY, "access_token": TOKEN, "qps": qps, "daily": daily}]
    return await aiohttp_client(create_app(scenario(keys=keys)))


async def stats(client: Client) -> dict[str, object]:
    """GET /_sim/stats."""
    resp = await client.get("/_sim/stats")
    assert resp.status == 200
    body: dict[str, object] = await resp.json()
    return body


INACTIVE = (
    "mashery.not.authorized.inactive",
    "The Mashery account associated with this request is not active, or an invalid API key was"
    " used.",
)
INVALID_TOKEN = (
    "http.status.authentication.invalid_token",
    "Not authorized: the Authorization: Bearer access token is not one of this api_key's",
)


@pytest.mark.parametrize(
    ("params", "headers", "error"),
    [
        pytest.param({}, AUTH, INACTIVE, id="no-api-key"),
        pytest.param({"api_key": "other"}, AUTH, INACTIVE, id="unknown-api-key"),
        pytest.param({"api_key": KEY}, {}, INVALID_TOKEN, id="no-authorization"),
        pytest.param(
            {"api_key": KEY}, {"Authorization": "Bearer wrong"}, INVALID_TOKEN, id="wrong-token"
        ),
        pytest.param(
            {"api_key": KEY}, {"Authorization": f"Basic {TOKEN}"}, INVALID_TOKEN, id="not-bearer"
        ),
    ],
)
async def test_credentials_must_match_or_401(
    client: Client, params: dict[str, str], headers: dict[str, str], error: tuple[str, str]
) -> None:
    """Both the api_key and its bearer token are required; otherwise 401 and no data, with the
    error keys Constant Contact's API gives (clients such as its WordPress plugin branch on
    them): mashery.not.authorized.inactive for the key, .invalid_token for the token."""
    resp = await client.get(CONTACTS, params=params, headers=headers)
    assert resp.status == 401
    assert await resp.json() == [{"error_key": error[0], "error_message": error[1]}]


async def test_rejections_are_counted_per_key(client: Client) -> None:
    """Stats count 401s under the key (or "(unknown)") and served requests per key."""
    await client.get(CONTACTS, params={"api_key": KEY})
    await client.get(CONTACTS, params={"api_key": "nope"}, headers=AUTH)
    await get_json(client, CONTACTS)
    body = await stats(client)
    keys = body["keys"]
    assert isinstance(keys, dict)
    assert keys[KEY]["served"] == 1
    assert keys[KEY]["rejected"] == {"unauthorized": 1}
    assert keys["(unknown)"]["rejected"] == {"unauthorized": 1}
    endpoints = body["endpoints"]
    assert isinstance(endpoints, dict)
    assert endpoints["/v2/contacts"] == {"requests": 3, "by_status": {"200": 1, "401": 2}}


@pytest.mark.parametrize(
    ("accept", "ok"),
    [
        pytest.param(None, True, id="absent"),
        pytest.param("application/json", True, id="json"),
        pytest.param("*/*", True, id="any"),
        pytest.param("text/html, application/*;q=0.5", True, id="wildcard-subtype"),
        pytest.param("application/json;q=0", False, id="json-refused"),
        pytest.param("text/html", False, id="html"),
        pytest.param("application/xml", False, id="xml"),
    ],
)
def test_accept_negotiation(accept: str | None, ok: bool) -> None:
    """An Accept header must admit application/json with q > 0 (absent admits everything)."""
    assert accepts_json(accept) is ok


async def test_unacceptable_accept_is_406(client: Client) -> None:
    """Accept: text/html gets 406 http.status.not_acceptable."""
    resp = await client.get(
        CONTACTS, params={"api_key": KEY}, headers={**AUTH, "Accept": "text/html"}
    )
    assert resp.status == 406
    body = await resp.json(content_type=None)
    assert body[0]["error_key"] == "http.status.not_acceptable"


async def test_over_qps_is_403_and_nothing_is_served(aiohttp_client: AiohttpClient) -> None:
    """A burst above the key's qps gets 403 over.qps; no 1-second window serves more than qps."""
    client = await limited(aiohttp_client, qps=3, daily=None)
    statuses = []
    for _ in range(5):
        resp = await client.get(CONTACTS, params={"api_key": KEY}, headers=AUTH)
        statuses.append(resp.status)
        if resp.status == 403:
            body = await resp.json()
            assert body == [  # the body Constant Contact's API sends (its developer forum)
                {
                    "error_key": "mashery.not.authorized.over.qps",
                    "error_message": "The Mashery account associated with this request is over"
                    " its queries-per-second quota.",
                }
            ]
    assert statuses[:3] == [200, 200, 200]
    assert 403 in statuses
    keys = (await stats(client))["keys"]
    assert isinstance(keys, dict)
    assert keys[KEY]["max_per_1s"] == 3
    assert keys[KEY]["rejected"]["over_qps"] == statuses.count(403)


async def test_accounts_on_one_key_share_its_limits(aiohttp_client: AiohttpClient) -> None:
    """Two accounts (access tokens) on one api_key spend one per-second window and one daily
    count, as the real API counts per key; a token of neither account is still a 401."""
    keys = [{"api_key": KEY, "access_token": TOKEN, "more_tokens": ["tok-b"], "qps": 4}]
    client = await aiohttp_client(create_app(scenario(keys=keys)))
    statuses = []
    for token in [TOKEN, "tok-b"] * 3:
        resp = await client.get(
            CONTACTS, params={"api_key": KEY}, headers={"Authorization": f"Bearer {token}"}
        )
        statuses.append(resp.status)
    assert statuses == [200, 200, 200, 200, 403, 403]
    resp = await client.get(
        CONTACTS, params={"api_key": KEY}, headers={"Authorization": "Bearer tok-c"}
    )
    assert resp.status == 401
    keys_stats = (await stats(client))["keys"]
    assert isinstance(keys_stats, dict)
    assert keys_stats[KEY]["max_per_1s"] == 4
    assert keys_stats[KEY]["used_today"] == 4
    assert keys_stats[KEY]["rejected"] == {"over_qps": 2, "unauthorized": 1}


async def test_qps_window_slides(aiohttp_client: AiohttpClient) -> None:
    """After a second, the key may send again."""
    client = await limited(aiohttp_client, qps=1, daily=None)
    await get_json(client, CONTACTS)
    await get_json(client, CONTACTS, expect=403)
    await asyncio.sleep(1.05)
    await get_json(client, CONTACTS)


async def test_daily_quota_is_403_over_ratelimit(aiohttp_client: AiohttpClient) -> None:
    """The request after the daily quota gets 403 over.ratelimit."""
    client = await limited(aiohttp_client, qps=None, daily=3)
    for _ in range(3):
        await get_json(client, CONTACTS)
    body = await get_json(client, CONTACTS, expect=403)
    assert body == [
        {
            "error_key": "mashery.not.authorized.over.ratelimit",
            "error_message": "The Mashery account associated with this request is over its rate"
            " limit quota.",
        }
    ]
    keys = (await stats(client))["keys"]
    assert isinstance(keys, dict)
    assert keys[KEY]["used_today"] == 3
    assert keys[KEY]["rejected"] == {"over_ratelimit": 1}


def test_daily_quota_resets_at_utc_midnight() -> None:
    """The daily count starts over when the UTC date changes (in the stats too, before the new
    day's first request)."""
    wall = [datetime(2026, 11, 23, 23, 59, 59, tzinfo=UTC).timestamp()]
    mono = [100.0]
    limits = Limits(
        [ApiKey("k", "t", qps=None, daily=2)], monotonic=lambda: mono[0], wall_clock=lambda: wall[0]
    )
    key = limits.authenticate("k", "Bearer t")
    assert key is not None
    assert [limits.admit(key) for _ in range(3)] == [None, None, "over_ratelimit"]
    assert limits.describe("k")["used_today"] == 2
    wall[0] += 1.0
    assert limits.describe("k")["used_today"] == 0  # a new day, before its first request
    assert limits.admit(key) is None
    assert limits.describe("k")["used_today"] == 1


def test_null_and_zero_limits_are_unenforced() -> None:
    """A key with qps/daily None admits any burst."""
    limits = Limits([ApiKey("k", "t", qps=None, daily=None)], monotonic=lambda: 5.0)
    key = limits.authenticate("k", "bearer t")
    assert key is not None
    assert all(limits.admit(key) is None for _ in range(50))


async def post_faults(client: Client, body: object, expect: int = 200) -> dict[str, object]:
    """POST /_sim/faults."""
    resp = await client.post("/_sim/faults", json=body)
    assert resp.status == expect, await resp.text()
    answer = await resp.json()
    assert isinstance(answer, dict | list)
    return answer if isinstance(answer, dict) else {"errors": answer}


async def test_fault_script_is_played_in_order(client: Client) -> None:
    """Each /v2 request consumes one script entry; then normal answers resume."""
    await post_faults(
        client,
        {
            "script": [
                {"status": 500},
                {"status": 429, "retry_after": 2},
                {"status": 403, "error_key": "mashery.not.authorized.over.qps"},
                {"truncate": True},
                {"delay_s": 0.2},
                {"status": 503, "error_message": "down for maintenance"},
            ]
        },
    )
    seen = []
    for _ in range(7):
        started = time.monotonic()
        resp = await client.get(CONTACTS, params={"api_key": KEY}, headers=AUTH)
        text = await resp.text()
        seen.append(
            (resp.status, resp.headers.get("Retry-After"), text, time.monotonic() - started)
        )
    assert [s[0] for s in seen] == [500, 429, 403, 200, 200, 503, 200]
    assert '"http.status.internal_server_error"' in seen[0][2]
    assert seen[1][1] == "2"
    assert '"http.status.too_many_requests"' in seen[1][2]
    assert "mashery.not.authorized.over.qps" in seen[2][2]
    with pytest.raises(json.JSONDecodeError):
        json.loads(seen[3][2])
    assert seen[3][2].startswith('{"meta"')
    assert seen[4][3] >= 0.2
    assert '"down for maintenance"' in seen[5][2]
    assert (await stats(client))["faults_injected"] == 6


async def test_fault_script_is_described_as_it_will_play(client: Client) -> None:
    """GET /_sim/faults lists each queued entry with every value it will use: a Retry-After of 0
    (sent as "Retry-After: 0") is listed, where it was dropped as if none were set."""
    script = [{"status": 503, "retry_after": 0}, {"status": 429}, {"delay_s": 0.5}]
    state = await post_faults(client, {"script": script})
    assert state["script"] == [
        {"status": 503, "retry_after_s": 0.0},
        {"status": 429, "retry_after_s": 1.0},
        {"delay_s": 0.5},
    ]
    resp = await client.get(CONTACTS, params={"api_key": KEY}, headers=AUTH)
    assert (resp.status, resp.headers.get("Retry-After")) == (503, "0")


async def test_a_truncation_with_nothing_to_cut_is_not_counted(client: Client) -> None:
    """A truncate entry met by an error answer (a 404 here) leaves it whole, and the stats do not
    count a fault that changed nothing (they counted every entry played)."""
    await post_faults(client, {"script": [{"truncate": True}]})
    body = await get_json(client, "/v2/contacts/999999/tracking/opens", expect=404)
    assert isinstance(body, list)
    counts = await stats(client)
    assert counts["faults_injected"] == 0
    keys = counts["keys"]
    assert isinstance(keys, dict)
    assert keys[KEY]["faults"] == 0
    await post_faults(client, {"script": [{"truncate": True}]})
    resp = await client.get(CONTACTS, params={"api_key": KEY}, headers=AUTH)
    assert not (await resp.text()).endswith("}")
    assert (await stats(client))["faults_injected"] == 1


async def test_script_prefix_limits_which_requests_consume(client: Client) -> None:
    """With script_path_prefix, only matching paths take script entries."""
    await post_faults(
        client, {"script": [{"status": 502}], "script_path_prefix": "/v2/emailmarketing/"}
    )
    await get_json(client, CONTACTS)
    await get_json(client, "/v2/emailmarketing/campaigns", expect=502)
    await get_json(client, "/v2/emailmarketing/campaigns")


async def test_random_faults_and_reset(client: Client) -> None:
    """Rates of 1 fail every request; reset clears rates and script."""
    await post_faults(client, {"error_5xx_rate": 1.0})
    for _ in range(5):
        resp = await client.get(CONTACTS, params={"api_key": KEY}, headers=AUTH)
        assert resp.status in (500, 502, 503)
        body = await resp.json()
        assert body[0]["error_key"].startswith("http.status.")
    await post_faults(client, {"error_5xx_rate": 0, "truncate_rate": 1.0})
    resp = await client.get(CONTACTS, params={"api_key": KEY}, headers=AUTH)
    assert resp.status == 200
    assert not (await resp.text()).endswith("}")
    state = await post_faults(client, {"reset": True, "script": [{"status": 500}]})
    assert state["truncate_rate"] == 0.0
    assert state["script"] == [{"status": 500}]
    state = await post_faults(client, {"reset": True})
    assert state["script"] == []
    await get_json(client, CONTACTS)


@pytest.mark.parametrize(
    ("body", "named"),
    [
        pytest.param({"error_5xx_rate": "lots"}, "error_5xx_rate", id="bad-rate"),
        pytest.param({"slow_rate": 2}, "slow_rate", id="rate-above-1"),
        pytest.param({"script": [{"status": 200}]}, "script[0].status", id="ok-status"),
        pytest.param({"script": [{"stauts": 500}]}, "stauts", id="typo"),
        pytest.param({"script": [{"status": 500, "truncate": True}]}, "truncate", id="both"),
        pytest.param({"script": {"status": 500}}, "script", id="not-a-list"),
        pytest.param({"chaos": True}, "chaos", id="unknown-key"),
        pytest.param([1, 2], "mapping", id="not-an-object"),
    ],
)
async def test_bad_fault_settings_are_400_and_change_nothing(
    client: Client, body: object, named: str
) -> None:
    """An invalid POST /_sim/faults names the problem and leaves the settings as they were."""
    answer = await post_faults(client, body, expect=400)
    errors = answer["errors"]
    assert isinstance(errors, list)
    assert named in errors[0]["error_message"]
    resp = await client.get("/_sim/faults")
    current = await resp.json()
    assert current["error_5xx_rate"] == 0.0
    assert current["script"] == []


async def test_truth_lists_canonical_records(client: Client) -> None:
    """Truth records have string ids, millisecond dates, kind and visible_at."""
    resp = await client.get("/_sim/truth")
    body = await resp.json()
    assert body["now"] == "2026-11-23T08:00:00.000Z"
    assert body["activities"]
    for record in body["activities"]:
        assert isinstance(record["campaign_id"], str)
        assert isinstance(record.get("link_id", ""), str)
        date = record[f"{record['kind']}_date"]
        assert len(date) == 24
        assert date <= record["visible_at"] <= body["now"]


async def test_truth_has_no_identity_collisions(client: Client) -> None:
    """(type, campaign, contact, millisecond, link) is unique across all activity."""
    await advance(client, 7200)
    body = await (await client.get("/_sim/truth")).json()
    identities = [
        (r["kind"], r["campaign_id"], r["contact_id"], r[f"{r['kind']}_date"], r.get("link_id"))
        for r in body["activities"]
    ]
    assert len(identities) == len(set(identities))


async def test_clock_endpoints(client: Client) -> None:
    """GET shows the clock; POST advances it; a negative or bad advance is a 400."""
    resp = await client.get("/_sim/clock")
    assert await resp.json() == {
        "now": "2026-11-23T08:00:00.000Z",
        "start": "2026-11-23T08:00:00.000Z",
        "time_scale": 0.0,
        "elapsed_s": 0.0,
    }
    assert await advance(client, 90.5) == "2026-11-23T08:01:30.500Z"
    for bad in ({"advance_s": -1}, {"advance_s": "soon"}, {"advanse_s": 1}, {"advance_s": 1e300}):
        resp = await client.post("/_sim/clock", json=bad)
        assert resp.status == 400
        assert "advance" in (await resp.json())[0]["error_message"]
    resp = await client.post("/_sim/clock", data=b"{not json")
    assert resp.status == 400
    assert get_state(client.app).clock.elapsed_s() == 90.5


async def test_time_stops_at_the_end_of_the_calendar(aiohttp_client: AiohttpClient) -> None:
    """A clock running past 9999-01-01 (a huge time_scale) stops there: the simulator keeps
    answering, where computing the date overflowed and it failed to start."""
    client = await aiohttp_client(create_app(scenario(time_scale=1e300)))
    await asyncio.sleep(0.01)
    resp = await client.get("/_sim/clock")
    assert resp.status == 200
    assert (await resp.json())["now"] == "9999-01-01T00:00:00.000Z"
    await get_json(client, CONTACTS)


async def test_date_header_is_when_the_data_was_read(aiohttp_client: AiohttpClient) -> None:
    """An answer's Date is the simulated time its data was read at, not when it was sent: the
    time a request spends after the read (real seconds, times time_scale) made Date run ahead
    of the data, by minutes at a high time_scale, skewing the relay's view of the API's clock."""

    @web.middleware
    async def slow_to_send(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        if request.path.startswith("/v2/"):
            get_state(request.app).clock.advance(3600)  # an hour passes after the read
        return response

    app = create_app(scenario())
    app.middlewares.append(slow_to_send)  # inside the gate: between the read and the send
    client = await aiohttp_client(app)
    resp = await client.get(CONTACTS, params={"api_key": KEY}, headers=AUTH)
    assert resp.status == 200
    assert resp.headers["Date"] == "Mon, 23 Nov 2026 08:00:00 GMT"
    resp = await client.get("/_sim/clock")  # no read of the world: the clock's time
    assert resp.headers["Date"] == "Mon, 23 Nov 2026 09:00:00 GMT"


async def test_stats_show_world_size(client: Client) -> None:
    """Stats report the simulated now, visible activities, sent campaigns and contacts."""
    world = (await stats(client))["world"]
    assert isinstance(world, dict)
    assert world["campaigns_sent"] == 2
    assert world["contacts"] == 30
    assert world["visible_activities"] > 0


async def test_serve_runs_the_ticker_and_answers() -> None:
    """serve() listens on a free port; the ticker keeps the world current without requests."""
    fast = scenario(time_scale=3600, keys=[{"api_key": KEY, "access_token": TOKEN}])
    async with serve(fast) as sim, aiohttp.ClientSession() as session:
        state = sim.state
        before = state.world.now_ms
        await asyncio.sleep(3 * TICK_S)
        assert state.world.now_ms > before + 3600 * 1000 * TICK_S
        url = f"{sim.url}/v2/contacts"
        async with session.get(url, params={"api_key": KEY}, headers=AUTH) as resp:
            assert resp.status == 200
            assert len((await resp.json())["results"]) == 30


async def test_frozen_gc_app_generates_ahead(aiohttp_client: AiohttpClient) -> None:
    """With freeze_gc the world is exempted from collection after each generation step."""
    app = create_app(scenario(time_scale=600), freeze_gc=True)
    try:
        client = await aiohttp_client(app)
        await asyncio.sleep(3 * TICK_S)
        assert gc.get_freeze_count() > 0
        world = get_state(client.app).world
        assert world.next_due(world.now_ms + 600_000) is None  # generated before being sent
    finally:
        gc.unfreeze()


def test_overlapping_requests_for_one_stream_are_counted() -> None:
    """Two tracking requests for the same resource open at once count as one overlap; requests
    for other resources, one after the other, or outside tracking do not."""
    from relay.sim.gate import stream_of
    from relay.sim.limits import Stats

    opens = stream_of("/v2/contacts/1017/tracking/opens")
    summary = stream_of("/v2/contacts/1017/tracking/reports/summary")
    other = stream_of("/v2/emailmarketing/campaigns/11/tracking/clicks/3")
    assert opens == summary == "/v2/contacts/1017"
    assert other == "/v2/emailmarketing/campaigns/11"
    assert stream_of("/v2/emailmarketing/campaigns") is None
    counts = Stats()
    counts.begin(opens)
    counts.begin(other)
    counts.begin(None)
    counts.end(opens)
    counts.begin(summary)  # after the first one ended
    assert counts.overlapping == 0
    counts.begin(opens)  # while summary is open
    assert counts.overlapping == 1
    assert counts.describe(Limits([]))["overlapping"] == 1
