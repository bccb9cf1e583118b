"""The operations routes: status, streams, pauses, replay and run-time targets, on a real store."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import cast

import pytest
from aiohttp.web import Application
from pytest_aiohttp import AiohttpClient

from relay.api import AdminSettings, create_admin_app
from relay.api.status import AccountQuota, CircuitView, RelayView, public_url
from relay.api.views import time_or_null
from relay.ctct.client import CtctClient
from relay.events import Kind
from relay.sinks.ssrf import Guard
from relay.store import PassResult, Store, StreamKey, Webhook
from relay.targets import CampaignDiscovery
from tests.api.conftest import AUTH, KEY, T0, TOKEN, Client, Clock, activity, error_of
from tests.test_targets import Sent

Make = Callable[[RelayView], Awaitable[Client]]


@pytest.fixture
def make(aiohttp_client: AiohttpClient, store: Store, clock: Clock) -> Make:
    """The admin app with a given relay view (accounts, scheduler callback)."""

    async def start(view: RelayView) -> Client:
        app: Application = create_admin_app(
            store, AdminSettings(token=TOKEN), guard=Guard(), now_ms=clock, view=view
        )
        client: Client = await aiohttp_client(app)
        return client

    return start


class Changes:
    """Counts scheduler reloads the API asked for."""

    def __init__(self) -> None:
        self.count = 0

    async def __call__(self) -> None:
        self.count += 1


@pytest.fixture
def changes() -> Changes:
    """The scheduler-reload callback."""
    return Changes()


@pytest.fixture
async def api(make: Make, changes: Changes) -> Client:
    """The app as a running relay with account acme (9,000 requests a day, 1,234 spent)."""
    view = RelayView(
        accounts={"acme": AccountQuota("acme", 9000, lambda: 1234)},
        redact=lambda text: text.replace("k-secret-key", "[REDACTED]"),
        on_change=changes,
        health={"kafka": lambda: (False, "KafkaConnectionError: no broker for k-secret-key")},
    )
    return await make(view)


async def stream_id(store: Store, key: StreamKey = KEY) -> int:
    """The id of a stream, created when missing."""
    await store.ensure_streams([key], T0)
    return next(s.id for s in await store.streams() if s.key == key)


async def test_status_shows_quota_streams_sinks_and_webhook_health(
    api: Client, store: Store, clock: Clock
) -> None:
    """Quota used/left, stream counts and lag, sink depth, webhook backlog; no secret anywhere."""
    sid = await stream_id(store)
    await store.commit_page(sid, [activity(i, T0 - 60_000 + i) for i in range(5)], T0)
    await store.finish_pass(sid, PassResult({Kind.CLICK: T0 - 60_000}, {}, T0 + 5000, 1.0, T0))
    await store.record_error(sid, "upstream said no to api_key=k-secret-key", T0 + 5000)
    await store.set_sink_cursor("kafka", 2)
    await store.add_dead_letter("kafka", 1, "e1", "too large", T0)
    hook = await store.create_webhook(
        Webhook(
            id="wh_1",
            url="https://user:pw@93.184.216.34/hook?token=abc",
            event_types=("*",),
            secret="whsec_c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0",
            created_ms=T0,
            updated_ms=T0,
        )
    )
    await store.webhook_failed(hook.id, T0, 10**9, 10**9)
    clock.now = T0 + 120_000
    response = await api.get("/v1/status", headers=AUTH)
    assert response.status == 200
    text = await response.text()
    for secret in ("k-secret-key", "pw", "token=abc", "whsec_", TOKEN):
        assert secret not in text
    body = await response.json()
    (acme,) = body["accounts"]
    assert acme["quota"] == {
        "used_today": 1234,
        "allowance": 9000,
        "left_today": 7766,
        "budget": None,
        "shared_with": [],
    }
    assert acme["streams"] == {
        "total": 1,
        "active": 1,
        "paused": 0,
        "retired": 0,
        "failing": 1,
        "replaying": 0,
    }
    assert acme["max_lag_s"] == 180.0
    assert acme["paused"] is None
    assert acme["circuit"] is None  # the view tells none
    assert acme["held"] is None
    assert body["outbox"] == {"head": 5}
    sinks = {s["name"]: s for s in body["sinks"]}
    assert sinks["kafka"] == {
        "name": "kafka",
        "cursor": 2,
        "depth": 3,
        "dead_letters": 1,
        "running": False,
        # what this process's Kafka sink reports, its error redacted
        "connected": False,
        "last_error": "KafkaConnectionError: no broker for [REDACTED]",
    }
    assert sinks["webhooks-fanout"]["depth"] == 5
    assert sinks["webhooks-fanout"]["connected"] is None  # a sink that does not report it
    (health,) = body["webhooks"]
    assert health["url"] == "https://93.184.216.34/hook?token=***"  # no value, user info
    assert health["failing_since"] is not None
    assert health["enabled"] is True


async def test_streams_listing_filters_and_pages(api: Client, store: Store) -> None:
    """Filters by account, scope, state and replay; limit/offset pages with a total."""
    keys = [StreamKey("acme", "campaign", str(i)) for i in range(5)]
    keys.append(StreamKey("acme", "contact", "77"))
    keys.append(StreamKey("other", "campaign", "9"))
    await store.ensure_streams(keys, T0)
    await store.set_paused(await stream_id(store, keys[1]), True)
    await store.request_replay([await stream_id(store, keys[2])], T0 - 1000, T0)

    async def listing(query: str) -> dict[str, object]:
        response = await api.get(f"/v1/streams?{query}", headers=AUTH)
        assert response.status == 200, await response.text()
        result: dict[str, object] = await response.json()
        return result

    assert (await listing("account=acme"))["total"] == 6
    assert (await listing("account=acme&scope=contact"))["total"] == 1
    assert (await listing("state=paused"))["total"] == 1
    replaying = await listing("replaying=true")
    assert [s["resource_id"] for s in replaying["streams"]] == ["2"]  # type: ignore[attr-defined]
    page = await listing("limit=2&offset=2")
    assert page["total"] == 7
    assert len(page["streams"]) == 2
    error = await error_of(await api.get("/v1/streams?state=sleeping", headers=AUTH), 400)
    assert error["message"].startswith("state:")
    error = await error_of(await api.get("/v1/streams?limt=3", headers=AUTH), 400)
    assert "unknown query parameter" in error["message"]
    error = await error_of(await api.get("/v1/streams?account=a%00b", headers=AUTH), 400)
    assert error["message"].startswith("account: expected 1 to 100 letters")


LONG = "9" * 5000


@pytest.mark.parametrize(
    ("path", "status", "start"),
    [
        pytest.param(f"/v1/streams?limit={LONG}", 400, "limit: expected an integer", id="limit"),
        pytest.param(f"/v1/streams?offset={LONG}", 400, "offset: expected an integer", id="offset"),
        pytest.param(f"/v1/streams?account={'a' * 5000}", 400, "account: expected", id="account"),
        pytest.param(f"/v1/streams?state={LONG}", 400, "state: expected one of", id="state"),
        pytest.param(f"/v1/dead-letters?sink={LONG}", 400, "sink: expected one of", id="sink"),
        pytest.param(f"/v1/streams?{LONG}=1", 400, "9999", id="unknown-parameter"),
        pytest.param(f"/v1/accounts/{'a' * 5000}/targets", 404, "no account named", id="path"),
    ],
)
async def test_a_long_value_is_quoted_cut_short(
    api: Client, path: str, status: int, start: str
) -> None:
    """An error quotes what was sent cut short, as it does for path ids: a query value or a
    path may be kilobytes long, and the message is for reading (it quoted all of it)."""
    error = await error_of(await api.get(path, headers=AUTH), status)
    assert error["message"].startswith(start)
    assert "…" in error["message"]
    assert len(error["message"]) < 300, len(error["message"])


@pytest.mark.parametrize("path", ["/v1/streams/{sid}", "/v1/accounts/acme/targets", "/v1/status"])
async def test_gets_refuse_unknown_query_parameters(api: Client, store: Store, path: str) -> None:
    """Every GET names an unknown query parameter (two of them used to ignore it)."""
    target = path.format(sid=await stream_id(store))
    error = await error_of(await api.get(f"{target}?bogus=1", headers=AUTH), 400)
    assert error["message"] == "bogus: unknown query parameter (known: none)"


async def test_stream_pause_and_resume_reach_the_scheduler(
    api: Client, store: Store, changes: Changes
) -> None:
    """Pausing takes the stream out of due streams; resuming puts it back; both reload."""
    sid = await stream_id(store)
    response = await api.post(f"/v1/streams/{sid}/pause", headers=AUTH)
    assert (await response.json())["state"] == "paused"
    assert await store.due_streams(T0 + 1, 10) == []
    response = await api.post(f"/v1/streams/{sid}/resume", headers=AUTH)
    assert (await response.json())["state"] == "active"
    assert await store.due_streams(T0 + 1, 10) == [sid]
    assert changes.count == 2
    await error_of(await api.post("/v1/streams/999/pause", headers=AUTH), 404)
    await error_of(await api.post("/v1/streams/abc/pause", headers=AUTH), 400)


async def test_account_pause_is_an_operator_hold_apart_from_quota_pauses(
    api: Client, store: Store, clock: Clock
) -> None:
    """An operator pause shows as held with its reason; a quota pause as paused; distinct."""
    await store.set_account_pause("acme", T0 + 3_600_000, "daily quota spent")
    response = await api.post(
        "/v1/accounts/acme/pause", json={"reason": "CRM migration"}, headers=AUTH
    )
    assert (await response.json())["held"]["reason"] == "CRM migration"
    status = await (await api.get("/v1/status", headers=AUTH)).json()
    (acme,) = status["accounts"]
    assert acme["held"]["reason"] == "CRM migration"
    assert acme["paused"]["reason"] == "daily quota spent"
    response = await api.post("/v1/accounts/acme/resume", headers=AUTH)
    assert (await response.json())["held"] is None
    assert await store.account_holds() == {}
    assert "acme" in await store.account_pauses()  # the quota pause is the relay's, untouched
    error = await error_of(await api.post("/v1/accounts/nobody/pause", headers=AUTH), 404)
    assert "configured: acme" in error["message"]


async def test_log_replay_counts_then_appends_copies_with_the_same_ids(
    api: Client, store: Store, clock: Clock
) -> None:
    """Dry run counts; the replay appends the events committed since, same ids, in order, once."""
    sid = await stream_id(store)
    await store.commit_page(sid, [activity(i, T0 + i) for i in range(3)], T0)
    await store.commit_page(sid, [activity(i, T0 + i) for i in range(10, 14)], T0 + 10_000)
    since = "2025-11-21T04:40:05Z"  # T0 + 5 s
    dry = await api.post(
        f"/v1/streams/{sid}/replay", json={"since": since, "dry_run": True}, headers=AUTH
    )
    assert dry.status == 202
    assert (await dry.json())["events"] == 4
    assert await store.outbox_head() == 7
    clock.now = T0 + 20_000
    done = await (
        await api.post(f"/v1/streams/{sid}/replay", json={"since": since}, headers=AUTH)
    ).json()
    assert (done["events"], done["first_seq"], done["last_seq"]) == (4, 8, 11)
    events = await store.read_outbox(0, 100)
    assert [e.event_id for e in events[7:]] == [e.event_id for e in events[3:7]]
    assert all(e.committed_ms == T0 + 20_000 for e in events[7:])
    again = await (
        await api.post("/v1/accounts/acme/replay", json={"since": since}, headers=AUTH)
    ).json()
    assert again["events"] == 4  # the copies are not copied a second time
    error = await error_of(
        await api.post(f"/v1/streams/{sid}/replay", json={"since": "yesterday"}, headers=AUTH), 400
    )
    assert error["message"].startswith("since:")


@pytest.mark.parametrize(
    "since",
    [
        pytest.param("9999-12-31T23:59:59-01:00", id="after-year-9999-in-utc"),
        pytest.param("0001-01-01T00:00:00+01:00", id="before-year-1-in-utc"),
    ],
)
async def test_a_replay_time_outside_the_datetime_range_is_a_400(
    api: Client, store: Store, since: str
) -> None:
    """A valid RFC 3339 time whose UTC instant no datetime holds is a 400 naming ``since``
    (the answer echoes the time back: it was a 500)."""
    sid = await stream_id(store)
    response = await api.post(f"/v1/streams/{sid}/replay", json={"since": since}, headers=AUTH)
    assert (await error_of(response, 400))["message"].startswith("since:")


@pytest.mark.parametrize(
    "since",
    [
        pytest.param("9999-12-31T23:59:59-01:00", id="year-10000-in-utc"),
        pytest.param("0001-01-01T00:00:00+01:00", id="year-0-in-utc"),
    ],
)
@pytest.mark.parametrize("source", ["log", "upstream"])
@pytest.mark.parametrize("dry_run", [True, False])
async def test_every_replay_route_and_source_names_the_time_range(
    api: Client, store: Store, since: str, source: str, dry_run: bool
) -> None:
    """Stream and account replays, from the log or upstream, dry or not: a time outside the
    range is a 400 whose message states the range the OpenAPI document gives, nothing asked."""
    sid = await stream_id(store)
    ask = {"since": since, "source": source, "dry_run": dry_run}
    for path in (f"/v1/streams/{sid}/replay", "/v1/accounts/acme/replay"):
        error = await error_of(await api.post(path, json=ask, headers=AUTH), 400)
        assert error["message"] == f"since: outside the years 1 to 9999 in UTC: {since!r}"
    assert await store.replays() == {}


async def test_replay_since_at_the_end_of_time_is_accepted(api: Client, store: Store) -> None:
    """The latest time there is, in UTC, is a valid (if empty) replay."""
    sid = await stream_id(store)
    ask = {"since": "9999-12-31T23:59:59.999+00:00", "dry_run": True}
    response = await api.post(f"/v1/streams/{sid}/replay", json=ask, headers=AUTH)
    assert response.status == 202
    assert (await response.json())["since"] == "9999-12-31T23:59:59.999Z"


async def test_upstream_replay_asks_for_a_re_read(api: Client, store: Store) -> None:
    """An upstream replay marks the stream, makes it due now; a campaign that is not polled is
    a 404 and a retired stream a 409."""
    sid = await stream_id(store)
    await store.finish_pass(sid, PassResult({}, {}, T0 + 3_600_000, 1.0, T0))
    body = {"since": "2025-11-21T04:00:00Z", "source": "upstream", "campaign": KEY.resource_id}
    answer = await (await api.post("/v1/accounts/acme/replay", json=body, headers=AUTH)).json()
    assert answer["streams"] == 1
    assert await store.replays() == {sid: 1_763_697_600_000}
    assert await store.due_streams(T0, 10) == [sid]
    body["campaign"] = "404404"
    await error_of(await api.post("/v1/accounts/acme/replay", json=body, headers=AUTH), 404)
    await store.retire_streams([KEY])
    stream_body = {"since": "2025-11-21T04:00:00Z", "source": "upstream"}
    await error_of(await api.post(f"/v1/streams/{sid}/replay", json=stream_body, headers=AUTH), 409)


async def test_targets_added_and_removed_at_run_time(
    api: Client, store: Store, changes: Changes
) -> None:
    """Added targets become streams (kept in the store); removed ones retire and are listed."""
    response = await api.post(
        "/v1/accounts/acme/targets",
        json={"campaigns": ["11", "12"], "contacts": ["5"]},
        headers=AUTH,
    )
    assert response.status == 201
    body = await response.json()
    assert (body["campaigns"], body["contacts"], body["created"]) == (["11", "12"], ["5"], 3)
    again = await api.post("/v1/accounts/acme/targets", json={"campaigns": ["11"]}, headers=AUTH)
    assert again.status == 200
    assert (await again.json())["created"] == 0
    response = await api.delete("/v1/accounts/acme/targets/campaigns/11", headers=AUTH)
    assert response.status == 204
    listed = await (await api.get("/v1/accounts/acme/targets", headers=AUTH)).json()
    assert listed["campaigns"] == ["12"]
    assert listed["removed"] == [{"scope": "campaign", "resource_id": "11"}]
    assert await store.removed_targets("acme") == {StreamKey("acme", "campaign", "11")}
    await error_of(await api.delete("/v1/accounts/acme/targets/campaigns/11x", headers=AUTH), 400)
    await error_of(await api.delete("/v1/accounts/acme/targets/lists/1", headers=AUTH), 400)
    error = await error_of(
        await api.post("/v1/accounts/acme/targets", json={"campaigns": ["abc"]}, headers=AUTH), 400
    )
    assert (
        error["message"]
        == "campaigns[0]: expected a Constant Contact id (1 to 64 digits), got 'abc'"
    )
    await error_of(await api.post("/v1/accounts/acme/targets", json={}, headers=AUTH), 400)
    re_added = await api.post("/v1/accounts/acme/targets", json={"campaigns": ["11"]}, headers=AUTH)
    assert "11" in (await re_added.json())["campaigns"]
    assert await store.removed_targets("acme") == set()
    assert changes.count == 4  # two adds that changed something, one removal, one re-add


async def _nothing() -> None:
    return None


async def retired(store: Store) -> dict[str, bool]:
    """Whether each campaign stream of acme is retired."""
    return {s.key.resource_id: s.retired for s in await store.streams("acme")}


async def test_campaigns_added_at_run_time_are_never_retired_for_their_age(
    api: Client, store: Store
) -> None:
    """Campaigns an operator added (this route, ``ctct-relay targets add --campaign``) are
    followed until removed, as ``campaigns.ids`` are; but discovery's daily full scan retired
    every listed campaign sent more than ``max_age_days`` ago, added or not: an added campaign
    sent 40 days ago stopped being polled at the next full scan (its late opens and clicks never
    emitted). The mark is kept in the store, so a new discovery (a restart, another replica)
    honours it. A discovered campaign of that age, and an added one removed since, are retired;
    one retired by discovery and then added is followed again."""
    old = T0 - 40 * 86_400_000
    sent = Sent()
    sent.campaigns = {"11": old, "12": old, "13": old}
    await store.ensure_streams([StreamKey("acme", "campaign", "13")], T0)  # discovered earlier
    added = await api.post(
        "/v1/accounts/acme/targets", json={"campaigns": ["11", "12"]}, headers=AUTH
    )
    assert added.status == 201

    def discovery() -> CampaignDiscovery:
        return CampaignDiscovery(cast(CtctClient, sent), store, "acme", 30, _nothing, lambda: T0)

    await discovery().run()
    assert await retired(store) == {"11": False, "12": False, "13": True}
    removed = await api.delete("/v1/accounts/acme/targets/campaigns/12", headers=AUTH)
    assert removed.status == 204
    again = await api.post("/v1/accounts/acme/targets", json={"campaigns": ["13"]}, headers=AUTH)
    assert again.status == 200  # the stream existed (retired): followed again, not created
    await discovery().run()
    assert await retired(store) == {"11": False, "12": True, "13": False}


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        pytest.param(
            "https://a:b@h.example/p?q=1#f", "https://h.example/p?q=***", id="userinfo-query"
        ),
        pytest.param(
            "https://h.example/p?token=s3&tenant=acme",
            "https://h.example/p?token=***&tenant=***",
            id="query-keys",
        ),
        pytest.param("https://h.example/p?s3cret&a=", "https://h.example/p?***&a=***", id="bare"),
        pytest.param("https://h.example/p?", "https://h.example/p", id="empty-query"),
        pytest.param("http://[::1]:8080/x", "http://[::1]:8080/x", id="ipv6-port"),
        pytest.param("http://h:99999/", "(unparsable URL)", id="bad-port"),
    ],
)
def test_public_url_drops_where_credentials_hide(url: str, shown: str) -> None:
    """User info, fragment and every query value never reach the status output; the query's
    keys do (an item without ``=`` may be a token itself: hidden whole)."""
    assert public_url(url) == shown


async def test_routes_need_the_token(api: Client) -> None:
    """Every operations route is behind the bearer token."""
    for method, path in (
        ("GET", "/v1/status"),
        ("GET", "/v1/streams"),
        ("POST", "/v1/accounts/acme/pause"),
    ):
        await error_of(await api.request(method, path), 401)


async def test_dead_letters_are_listed_oldest_first_with_a_total(api: Client, store: Store) -> None:
    """GET /v1/dead-letters: the Kafka sink's dead letters with the broker's reason, oldest
    first, at most limit of them, and how many there are in all."""
    for seq in (7, 3, 5):
        await store.add_dead_letter("kafka", seq, f"e{seq}", f"MessageSizeTooLargeError {seq}", T0)
    response = await api.get("/v1/dead-letters", headers=AUTH)
    assert response.status == 200
    answer = await response.json()
    assert answer["total"] == 3
    assert answer["limit"] == 100
    assert [d["seq"] for d in answer["dead_letters"]] == [3, 5, 7]
    assert answer["dead_letters"][0] == {
        "sink": "kafka",
        "seq": 3,
        "event_id": "e3",
        "reason": "MessageSizeTooLargeError 3",
        "created_at": "2025-11-21T04:40:00.000Z",
    }
    response = await api.get("/v1/dead-letters?sink=kafka&limit=2", headers=AUTH)
    answer = await response.json()
    assert [d["event_id"] for d in answer["dead_letters"]] == ["e3", "e5"]
    assert (answer["total"], answer["limit"]) == (3, 2)


async def test_a_dead_letter_reason_goes_through_the_redactor(api: Client, store: Store) -> None:
    """The broker's error text is shown as status shows a sink's last error: redacted."""
    reason = "KafkaError: SASL authentication failed for k-secret-key"
    await store.add_dead_letter("kafka", 4, "e4", reason, T0)
    answer = await (await api.get("/v1/dead-letters", headers=AUTH)).json()
    shown = answer["dead_letters"][0]["reason"]
    assert shown == "KafkaError: SASL authentication failed for [REDACTED]"


@pytest.mark.parametrize(
    ("query", "message"),
    [
        pytest.param("sink=webhooks", "sink: expected one of kafka", id="sink"),
        pytest.param("limit=0", "limit: expected an integer from 1 to 1000", id="limit-0"),
        pytest.param("limit=1001", "limit: expected an integer from 1 to 1000", id="limit-big"),
        pytest.param("limit=2&limit=3", "limit: given more than once", id="limit-twice"),
        pytest.param("limt=3", "limt: unknown query parameter", id="unknown"),
    ],
)
async def test_dead_letters_query_errors_name_the_parameter(
    api: Client, query: str, message: str
) -> None:
    """A bad sink, limit or parameter: 400 naming it."""
    error = await error_of(await api.get(f"/v1/dead-letters?{query}", headers=AUTH), 400)
    assert message in error["message"]


async def test_dead_letters_need_the_token(api: Client) -> None:
    """Like every /v1 route: 401 without the bearer token."""
    await error_of(await api.get("/v1/dead-letters"), 401)


_BIGINT = 2**63 - 1


@pytest.mark.parametrize(
    ("method", "path", "message"),
    [
        pytest.param(
            "POST",
            f"/v1/streams/{10**19}/pause",
            f"stream_id: expected an integer from 1 to {_BIGINT}, got '{10**19}'",
            id="stream-20-digits",
        ),
        pytest.param(
            "POST",
            f"/v1/streams/{_BIGINT + 1}/replay",
            f"stream_id: expected an integer from 1 to {_BIGINT}, got '{_BIGINT + 1}'",
            id="stream-past-bigint",
        ),
        pytest.param(
            "GET",
            "/v1/streams/0",
            f"stream_id: expected an integer from 1 to {_BIGINT}, got '0'",
            id="stream-zero",
        ),
        pytest.param(
            "POST",
            "/v1/streams/abc/resume",
            f"stream_id: expected an integer from 1 to {_BIGINT}, got 'abc'",
            id="stream-not-a-number",
        ),
        pytest.param(
            "POST",
            f"/v1/deliveries/{2**70}/redeliver",
            f"delivery_id: expected an integer from 1 to {_BIGINT}, got '{2**70}'",
            id="delivery-huge",
        ),
        # more digits than int() converts (4300): never parsed, and not echoed whole
        pytest.param(
            "POST",
            f"/v1/deliveries/{'1' * 5000}/redeliver",
            f"delivery_id: expected an integer from 1 to {_BIGINT}, got '{'1' * 40}…'",
            id="delivery-5000-digits",
        ),
        pytest.param(
            "DELETE",
            "/v1/accounts/acme/targets/campaigns/abc",
            "resource_id: expected a Constant Contact id (1 to 64 digits), got 'abc'",
            id="target-not-numeric",
        ),
        pytest.param(
            "DELETE",
            "/v1/accounts/acme/targets/campaigns/1%002",
            "resource_id: expected a Constant Contact id (1 to 64 digits), got '1\\x002'",
            id="target-nul",
        ),
        pytest.param(
            "DELETE",
            "/v1/accounts/acme/targets/lists/1",
            "kind: expected campaigns or contacts, got 'lists'",
            id="target-kind",
        ),
    ],
)
async def test_a_path_parameter_of_the_wrong_shape_is_a_400_naming_it(
    api: Client, method: str, path: str, message: str
) -> None:
    """A path id out of range or not an id at all (replay --stream of 20 digits) is a 400 naming
    the parameter, as the OpenAPI schema says, not a 404 quoting it as a string."""
    response = await api.request(method, path, headers=AUTH)
    error = await error_of(response, 400)
    assert error == {"code": "invalid_request", "message": message}


async def test_status_shows_the_keys_circuit_breaker(make: Make, store: Store) -> None:
    """An account configured here shows its api_key's circuit: state, failures in a row, when
    it probes, the last error (redacted); the pause the scheduler stored for it shows why."""
    circuit = CircuitView("open", 10, T0 + 30_000, "GET /v2/x?api_key=k-secret-key answered 503")
    view = RelayView(
        accounts={"acme": AccountQuota("acme", 9000, lambda: 10, circuit=lambda: circuit)},
        redact=lambda text: text.replace("k-secret-key", "[REDACTED]"),
    )
    api = await make(view)
    await store.set_account_pause("acme", T0 + 30_000, "circuit open: 10 requests in a row failed")
    response = await api.get("/v1/status", headers=AUTH)
    assert response.status == 200
    (acme,) = (await response.json())["accounts"]
    assert acme["circuit"] == {
        "state": "open",
        "consecutive_failures": 10,
        "probe_at": time_or_null(T0 + 30_000),
        "last_error": "GET /v2/x?api_key=[REDACTED] answered 503",
    }
    assert acme["paused"]["reason"].startswith("circuit open: 10 requests")


async def test_forgetting_a_retired_sink_releases_its_hold_on_the_outbox(
    make: Make, store: Store
) -> None:
    """DELETE /v1/sinks/{sink}: the stored cursor of a sink configured nowhere goes (204), so
    the outbox prune stops keeping its events; an unknown one is a 404, one this replica runs
    (webhook fan-out always) a 409 that leaves the cursor alone."""
    await store.set_sink_cursor("kafka", 4)
    await store.set_sink_cursor("webhooks-fanout", 9)
    api = await make(RelayView())  # this replica does not run the Kafka sink
    status = await (await api.get("/v1/status", headers=AUTH)).json()
    assert {s["name"]: s["running"] for s in status["sinks"]} == {
        "kafka": False,
        "webhooks-fanout": True,
    }
    response = await api.delete("/v1/sinks/kafka", headers=AUTH)
    assert response.status == 204, await response.text()
    assert await store.sink_cursors() == {"webhooks-fanout": 9}
    error = await error_of(await api.delete("/v1/sinks/kafka", headers=AUTH), 404)
    assert error["message"] == "no stored cursor of a sink named 'kafka'"
    error = await error_of(await api.delete("/v1/sinks/webhooks-fanout", headers=AUTH), 409)
    assert error["message"].startswith("sink 'webhooks-fanout' is configured on this replica")
    await store.set_sink_cursor("kafka", 4)
    running = await make(RelayView(sinks=("webhooks-fanout", "kafka")))
    await error_of(await running.delete("/v1/sinks/kafka", headers=AUTH), 409)
    await error_of(await running.delete("/v1/sinks/kafka"), 401)
    assert await store.sink_cursors() == {"kafka": 4, "webhooks-fanout": 9}
