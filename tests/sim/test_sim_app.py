"""The simulator's /v2 data endpoints: shapes, ordering, filters, paging, summaries, discovery."""

from __future__ import annotations

import base64
from collections import Counter
from urllib.parse import parse_qs, urlsplit

import pytest
from pytest_aiohttp import AiohttpClient

from relay.ctct.catalogue import ENDPOINTS, FEEDS, Scope, Shape
from relay.events import Kind, parse_activity, parse_time
from relay.sim import create_app, get_state
from tests.sim import (
    Client,
    JsonObject,
    advance,
    all_pages,
    get_json,
    scenario,
    truth,
)

COMMON = {"activity_type", "campaign_id", "contact_id", "email_address"}
KEYS = {
    Kind.SEND: COMMON | {"send_date"},
    Kind.OPEN: COMMON | {"open_date"},
    Kind.FORWARD: COMMON | {"forward_date"},
    Kind.CLICK: COMMON | {"link_id", "click_date"},
    Kind.BOUNCE: COMMON | {"bounce_code", "bounce_description", "bounce_message", "bounce_date"},
    Kind.UNSUBSCRIBE: COMMON | {"unsubscribe_source", "unsubscribe_reason", "unsubscribe_date"},
}


def keys(kind: Kind, record: JsonObject) -> set[str]:
    """The keys a record of ``kind`` has: a click on a link also has the link's URL."""
    if kind is Kind.CLICK and str(record["link_id"]) != "0":
        return KEYS[kind] | {"link_uri"}
    return KEYS[kind]


@pytest.fixture
async def client(aiohttp_client: AiohttpClient) -> Client:
    """A simulator with frozen time at the scenario start."""
    return await aiohttp_client(create_app(scenario()))


def busiest(rows: list[JsonObject], field: str, kind: Kind) -> str:
    """The contact or campaign id with the most activities of ``kind``."""
    counts = Counter(str(row[field]) for row in rows if row["kind"] == kind.value)
    return counts.most_common(1)[0][0]


def when(record: JsonObject) -> int:
    """A record's activity time as Unix ms, whatever its kind."""
    kind = Kind(str(record["activity_type"]).removeprefix("EMAIL_").lower())
    return int(parse_time(record[kind.date_field]).timestamp() * 1000)


def identity(record: JsonObject) -> tuple[str, str, str, int, str]:
    """(type, campaign, contact, ms, link) with ids normalized to strings."""
    link = str(record.get("link_id", ""))
    return (
        str(record["activity_type"]),
        str(record["campaign_id"]),
        str(record["contact_id"]),
        when(record),
        link,
    )


def test_every_catalogue_endpoint_has_a_route() -> None:
    """All 20 catalogue paths are routed, under their catalogue names."""
    app = create_app(scenario())
    routed = {
        route.resource.canonical
        for route in app.router.routes()
        if route.method == "GET" and route.resource is not None
    }
    assert len(ENDPOINTS) == 20
    assert {endpoint.path for endpoint in ENDPOINTS} <= routed


@pytest.mark.parametrize("kind", list(Kind), ids=str)
@pytest.mark.parametrize("scope", [Scope.CAMPAIGN, Scope.CONTACT], ids=str)
async def test_feed_records_have_exact_keys_newest_first(
    client: Client, kind: Kind, scope: Scope
) -> None:
    """Each feed returns exactly its kind's keys, newest activity first."""
    rows = await truth(client)
    field = "campaign_id" if scope is Scope.CAMPAIGN else "contact_id"
    resource = busiest(rows, field, kind)
    base = "/v2/emailmarketing/campaigns" if scope is Scope.CAMPAIGN else "/v2/contacts"
    body = await get_json(client, f"{base}/{resource}/tracking/{FEEDS[kind]}", limit="500")
    assert isinstance(body, dict)
    results = body["results"]
    assert results
    assert all(set(record) == keys(kind, record) for record in results)
    assert all(record["activity_type"] == kind.activity_type for record in results)
    times = [when(record) for record in results]
    assert times == sorted(times, reverse=True)


async def test_contact_activity_list_mixes_kinds(client: Client) -> None:
    """/v2/contacts/{id}/tracking lists every kind of the contact, newest first."""
    rows = await truth(client)
    contact = busiest(rows, "contact_id", Kind.CLICK)
    results = await all_pages(client, f"/v2/contacts/{contact}/tracking", limit="500")
    expected = Counter(r["kind"] for r in rows if r["contact_id"] == contact)
    kinds = Counter(str(r["activity_type"]).removeprefix("EMAIL_").lower() for r in results)
    assert kinds == expected
    assert len(expected) > 2
    times = [when(record) for record in results]
    assert times == sorted(times, reverse=True)


async def test_feed_equals_ground_truth(client: Client) -> None:
    """A campaign's clicks feed holds exactly the visible clicks of the truth."""
    rows = await truth(client)
    campaign = busiest(rows, "campaign_id", Kind.CLICK)
    results = await all_pages(
        client, f"/v2/emailmarketing/campaigns/{campaign}/tracking/clicks", limit="3"
    )
    expected = [identity(r) for r in rows if r["campaign_id"] == campaign and r["kind"] == "click"]
    assert sorted(identity(r) for r in results) == sorted(expected)


async def test_clicks_by_link_filters_to_that_link(client: Client) -> None:
    """clicks/{link_id} returns only that link's clicks, in both scopes."""
    rows = await truth(client)
    click = next(r for r in rows if r["kind"] == "click")
    link, campaign, contact = click["link_id"], click["campaign_id"], click["contact_id"]
    for path in (
        f"/v2/emailmarketing/campaigns/{campaign}/tracking/clicks/{link}",
        f"/v2/contacts/{contact}/tracking/clicks/{link}",
    ):
        results = await all_pages(client, path, limit="500")
        assert results
        assert {str(r["link_id"]) for r in results} == {link}


async def test_click_records_carry_the_links_url_into_the_event(client: Client) -> None:
    """As the API's do, click records of both scopes carry link_uri (but the "0" link's, which
    names no link); the relay's event data has it, and the same click's id from either side."""
    rows = await truth(client)
    click = next(r for r in rows if r["kind"] == "click" and r["link_id"] != "0")
    campaign, contact, link = click["campaign_id"], click["contact_id"], click["link_id"]
    uri = click["link_uri"]
    assert isinstance(uri, str)
    assert uri.startswith("https://")
    ids = set()
    for path in (
        f"/v2/emailmarketing/campaigns/{campaign}/tracking/clicks/{link}",
        f"/v2/contacts/{contact}/tracking/clicks/{link}",
    ):
        results = await all_pages(client, path, limit="500")
        mine = [r for r in results if identity(r) == identity(click)]
        assert len(mine) == 1
        activity = parse_activity(mine[0], account="acme", kind=Kind.CLICK)
        assert activity.data()["link_uri"] == uri
        ids.add(activity.event_id)
    assert len(ids) == 1
    zero = [r for r in rows if r["kind"] == "click" and r["link_id"] == "0"]
    assert zero
    assert all("link_uri" not in r for r in zero)


async def test_created_since_is_inclusive(client: Client) -> None:
    """created_since includes an activity at exactly that millisecond, and not one ms later."""
    rows = await truth(client)
    target = next(r for r in rows if r["kind"] == "open")
    path = f"/v2/emailmarketing/campaigns/{target['campaign_id']}/tracking/opens"
    at = str(target["open_date"])
    later = at[:-4] + f"{int(at[-4:-1]) + 1:03d}Z" if not at.endswith("999Z") else None
    body = await get_json(client, path, created_since=at, limit="500")
    assert isinstance(body, dict)
    assert identity(target) in {identity(r) for r in body["results"]}
    assert all(when(r) >= when(target) for r in body["results"])
    if later is not None:
        body = await get_json(client, path, created_since=later, limit="500")
        assert isinstance(body, dict)
        assert identity(target) not in {identity(r) for r in body["results"]}


async def test_created_since_without_millis_is_accepted(client: Client) -> None:
    """YYYY-MM-DDTHH:MM:SSZ is the same instant as .000Z."""
    rows = await truth(client)
    path = f"/v2/emailmarketing/campaigns/{rows[0]['campaign_id']}/tracking/sends"
    short = await get_json(client, path, created_since="2026-11-23T07:50:00Z", limit="500")
    full = await get_json(client, path, created_since="2026-11-23T07:50:00.000Z", limit="500")
    assert short == full


@pytest.mark.parametrize(
    ("params", "named"),
    [
        pytest.param({"created_since": "2026-11-23"}, "created_since", id="date-only"),
        pytest.param({"created_since": "2026-11-23T08:00:00+00:00"}, "created_since", id="offset"),
        pytest.param({"created_since": "2026-11-23T08:00:00.12Z"}, "created_since", id="2-digit"),
        pytest.param({"created_since": "2026-13-23T08:00:00Z"}, "created_since", id="month-13"),
        pytest.param({"created_since": "yesterday"}, "created_since", id="word"),
        pytest.param({"limit": "0"}, "limit", id="limit-0"),
        pytest.param({"limit": "501"}, "limit", id="limit-501"),
        pytest.param({"limit": "ten"}, "limit", id="limit-word"),
        pytest.param({"limit": "-5"}, "limit", id="limit-negative"),
        pytest.param({"next": "not*a*token"}, "next", id="bad-token-chars"),
        pytest.param({"next": "c3RhcnRBdD0x"}, "next", id="token-without-limit"),
        pytest.param({"next": "c3RhcnRBdD0wJmxpbWl0PTU"}, "next", id="token-start-0"),
        pytest.param({"next": "Zm9vPWJhcg"}, "next", id="token-foreign"),
    ],
)
async def test_bad_parameters_are_400(client: Client, params: dict[str, str], named: str) -> None:
    """A bad parameter gets 400 query.param.invalid with a message naming it."""
    rows = await truth(client)
    path = f"/v2/emailmarketing/campaigns/{rows[0]['campaign_id']}/tracking/opens"
    body = await get_json(client, path, expect=400, **params)
    assert isinstance(body, list)
    assert body[0]["error_key"] == "query.param.invalid"
    assert named in body[0]["error_message"]


async def test_default_limit_is_50(aiohttp_client: AiohttpClient) -> None:
    """Without limit a page of the contacts list holds 50 records and links to the next."""
    client = await aiohttp_client(create_app(scenario(contacts={"count": 60})))
    body = await get_json(client, "/v2/contacts")
    assert isinstance(body, dict)
    assert len(body["results"]) == 50
    assert "next_link" in body["meta"]["pagination"]


async def test_tracking_default_limit_is_500(aiohttp_client: AiohttpClient) -> None:
    """Without limit a tracking feed page holds up to 500 records, as the v2 docs' paginated-output
    table gives for campaign and contact tracking (the discovery lists' default is 50)."""
    client = await aiohttp_client(create_app(scenario(contacts={"count": 120})))
    campaign = get_state(client.app).world.campaigns[0]
    body = await get_json(client, f"/v2/emailmarketing/campaigns/{campaign.id}/tracking/sends")
    assert isinstance(body, dict)
    assert len(body["results"]) == 120
    assert body["meta"] == {"pagination": {}}


async def test_last_page_has_empty_pagination(client: Client) -> None:
    """When nothing follows, meta.pagination is an empty object."""
    body = await get_json(client, "/v2/contacts", limit="500")
    assert isinstance(body, dict)
    assert len(body["results"]) == 30
    assert body["meta"] == {"pagination": {}}


async def test_paging_token_is_base64_query_sent_alone(client: Client) -> None:
    """next_link is the path plus ?next=TOKEN, TOKEN unpadded base64url of startAt/limit/filters;
    startAt counts from 1, as the v2 docs' tokens do (startAt=26&limit=25 after a first page of
    25, startAt=3&limit=2 after one of 2)."""
    rows = await truth(client)
    campaign = busiest(rows, "campaign_id", Kind.SEND)
    path = f"/v2/emailmarketing/campaigns/{campaign}/tracking/sends"
    body = await get_json(client, path, limit="5", created_since="2026-11-23T07:00:00.000Z")
    assert isinstance(body, dict)
    link = urlsplit(body["meta"]["pagination"]["next_link"])
    assert link.path == path
    (token,) = parse_qs(link.query)["next"]
    assert "=" not in token
    decoded = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    assert parse_qs(decoded) == {
        "startAt": ["6"],
        "limit": ["5"],
        "created_since": ["2026-11-23T07:00:00.000Z"],
    }


@pytest.mark.parametrize("limit", ["1", "7", "500"])
async def test_pages_concatenate_to_the_full_list(client: Client, limit: str) -> None:
    """Following next_link yields the one-page list, in order, nothing missing or repeated."""
    rows = await truth(client)
    contact = busiest(rows, "contact_id", Kind.OPEN)
    path = f"/v2/contacts/{contact}/tracking"
    whole = await get_json(client, path, limit="500")
    paged = await all_pages(client, path, limit=limit)
    assert isinstance(whole, dict)
    assert paged == whole["results"]


async def test_arrivals_between_pages_repeat_but_never_lose(client: Client) -> None:
    """Offset paging over the live list: new activity shifts pages (repeats), nothing is lost."""
    rows = await truth(client)
    campaign = str(rows[-1]["campaign_id"])
    path = f"/v2/emailmarketing/campaigns/{campaign}/tracking/opens"
    before = await all_pages(client, path, limit="500")
    first = await get_json(client, path, limit="4")
    assert isinstance(first, dict)
    await advance(client, 900)
    seen = list(first["results"])
    next_link = first["meta"]["pagination"].get("next_link")
    while next_link:
        body = await get_json(client, next_link)
        assert isinstance(body, dict)
        seen.extend(body["results"])
        next_link = body["meta"]["pagination"].get("next_link")
    assert {identity(r) for r in before} <= {identity(r) for r in seen}
    assert len(seen) > len({identity(r) for r in seen})  # the shift shows as repeats


async def test_late_arrivals_appear_after_the_clock_passes_them(client: Client) -> None:
    """An activity can become visible after its own time; created_since then finds it."""
    before = {identity(r) for r in await truth(client)}
    now = await advance(client, 0)
    await advance(client, 600)
    after = await truth(client)
    # Canonical times all have milliseconds, so they compare as strings.
    late = [r for r in after if identity(r) not in before and str(r[f"{r['kind']}_date"]) < now]
    assert late, "the scenario has late arrivals"
    target = late[0]
    assert str(target["visible_at"]) > now
    kind = Kind(str(target["kind"]))
    path = f"/v2/contacts/{target['contact_id']}/tracking/{FEEDS[kind]}"
    body = await get_json(client, path, created_since=str(target[kind.date_field]), limit="500")
    assert isinstance(body, dict)
    assert identity(target) in {identity(r) for r in body["results"]}


async def test_summaries_count_what_is_visible(client: Client) -> None:
    """Campaign and contact summaries equal the truth's counts, and grow as time passes: a
    campaign's opens, clicks and forwards count unique recipients (v2 docs), everything else
    counts activities."""
    fields = {"sends": "send", "opens": "open", "clicks": "click", "forwards": "forward"}
    fields |= {"unsubscribes": "unsubscribe", "bounces": "bounce"}
    for step in (0, 900):
        await advance(client, step)
        rows = await truth(client)
        campaign = busiest(rows, "campaign_id", Kind.OPEN)
        contact = busiest(rows, "contact_id", Kind.OPEN)
        summary = await get_json(
            client,
            f"/v2/emailmarketing/campaigns/{campaign}/tracking/reports/summary",
            updateSummary="true",
        )
        expected = Counter(str(r["kind"]) for r in rows if r["campaign_id"] == campaign)
        recipients = Counter(
            kind
            for kind, _ in {
                (str(r["kind"]), str(r["contact_id"]))
                for r in rows
                if r["campaign_id"] == campaign and r["kind"] in {"open", "click", "forward"}
            }
        )
        assert recipients["open"] < expected["open"], "the campaign has repeat opens"
        for kind in ("open", "click", "forward"):
            expected[kind] = recipients[kind]
        assert isinstance(summary, dict)
        assert set(summary) == {*fields, "spam_count"}
        assert {name: summary[name] for name in fields} == {
            name: expected[kind] for name, kind in fields.items()
        }
        summary = await get_json(client, f"/v2/contacts/{contact}/tracking/reports/summary")
        expected = Counter(str(r["kind"]) for r in rows if r["contact_id"] == contact)
        counts: JsonObject = {name: expected[kind] for name, kind in fields.items()}
        assert summary == {**counts, "contact_id": contact}  # the v2 docs' shape: with the id


async def test_spam_count_is_reported(client: Client) -> None:
    """Spam reports have no feed but show in the campaign summary."""
    await advance(client, 3600)
    state = get_state(client.app)
    counts = [state.world.spam_count(c.id) for c in state.world.campaigns]
    assert sum(counts) > 0


async def test_summary_by_campaign_is_a_plain_array(aiohttp_client: AiohttpClient) -> None:
    """summaryByCampaign: one row per campaign with activity, not paged, in the v2 docs' shape
    (campaign_id, contact_id, opens, clicks, forwards, bounces: no sends, no unsubscribes); opens,
    forwards and bounces count times, clicks the distinct links clicked ("unique link clicks")."""
    client = await aiohttp_client(create_app(scenario(rates={"reclick": 0.9})))
    await advance(client, 900)
    rows = await truth(client)
    mine = [r for r in rows if r["kind"] == "click"]
    # a contact who clicked one link more than once, so clicks and unique links differ
    repeat = Counter((r["contact_id"], r["campaign_id"], r["link_id"]) for r in mine)
    contact = next(contact for (contact, _, _), n in repeat.items() if n > 1)
    body = await get_json(client, f"/v2/contacts/{contact}/tracking/reports/summaryByCampaign")
    assert isinstance(body, list)
    mine = [r for r in rows if r["contact_id"] == contact]
    assert {row["campaign_id"] for row in body} == {r["campaign_id"] for r in mine}
    differs = False
    for row in body:
        assert set(row) == {"campaign_id", "contact_id", "opens", "clicks", "forwards", "bounces"}
        assert row["contact_id"] == contact
        here = [r for r in mine if r["campaign_id"] == row["campaign_id"]]
        expected = Counter(str(r["kind"]) for r in here)
        links = {r["link_id"] for r in here if r["kind"] == "click"}
        assert (row["opens"], row["forwards"], row["bounces"]) == (
            expected["open"],
            expected["forward"],
            expected["bounce"],
        )
        assert row["clicks"] == len(links)
        differs |= expected["click"] != len(links)
    assert differs, "the contact clicked a link twice in one campaign"


async def test_campaign_summary_is_stale_without_update_summary(client: Client) -> None:
    """Without updateSummary=true a campaign summary is "as of the last scheduled update" (v2
    docs): here the last whole simulated hour; with it, current. So a relay that dropped the
    parameter would see its summary gate miss activity, as it would upstream."""
    state = get_state(client.app)
    campaign = state.world.campaigns[1]  # sent at 07:55, five minutes before the start (08:00)
    path = f"/v2/emailmarketing/campaigns/{campaign.id}/tracking/reports/summary"
    at_start = await get_json(client, path, updateSummary="true")
    await advance(client, 900)
    current = await get_json(client, path, updateSummary="true")
    assert current != at_start, "the campaign gained activity in the quarter hour"
    assert await get_json(client, path) == at_start  # as of 08:00, the last whole hour
    assert await get_json(client, path, updateSummary="false") == at_start
    await advance(client, 2700)  # 09:00: the next scheduled update, for every campaign
    for sent in state.world.campaigns:
        path = f"/v2/emailmarketing/campaigns/{sent.id}/tracking/reports/summary"
        assert await get_json(client, path) == await get_json(client, path, updateSummary="true")


async def test_update_summary_must_be_boolean(client: Client) -> None:
    """updateSummary takes true or false only."""
    rows = await truth(client)
    path = f"/v2/emailmarketing/campaigns/{rows[0]['campaign_id']}/tracking/reports/summary"
    body = await get_json(client, path, expect=400, updateSummary="maybe")
    assert isinstance(body, list)
    assert "updateSummary" in body[0]["error_message"]


@pytest.mark.parametrize(
    "path",
    [
        "/v2/contacts/999999/tracking/opens",
        "/v2/contacts/999999/tracking/reports/summary",
        "/v2/contacts/999999/tracking/reports/summaryByCampaign",
        "/v2/emailmarketing/campaigns/42/tracking/clicks",
        "/v2/emailmarketing/campaigns/42/tracking/reports/summary",
        "/v2/contacts/1001/tracking/clicks/77777",
        "/v2/no/such/route",
    ],
)
async def test_unknown_ids_links_and_routes_are_404(client: Client, path: str) -> None:
    """Unknown contacts, campaigns, links and paths get 404 http.status.not_found."""
    body = await get_json(client, path, expect=404)
    assert isinstance(body, list)
    assert body[0]["error_key"] == "http.status.not_found"


async def test_campaign_link_must_belong_to_the_campaign(client: Client) -> None:
    """A link of another campaign is a 404 in campaign scope."""
    state = get_state(client.app)
    first, second = state.world.campaigns[:2]
    foreign = next(link for link in second.links if link not in first.links)
    await get_json(
        client, f"/v2/emailmarketing/campaigns/{first.id}/tracking/clicks/{foreign}", expect=404
    )


async def test_unsent_campaign_has_no_activity(client: Client) -> None:
    """A scheduled campaign answers with an empty feed until its send time."""
    state = get_state(client.app)
    scheduled = state.world.campaigns[-1]
    path = f"/v2/emailmarketing/campaigns/{scheduled.id}/tracking/sends"
    body = await get_json(client, path)
    assert body == {"meta": {"pagination": {}}, "results": []}
    await advance(client, 3600)
    body = await get_json(client, path)
    assert isinstance(body, dict)
    assert body["results"]


async def test_sent_campaigns_list_grows_with_the_clock(client: Client) -> None:
    """Discovery lists campaigns whose send time has passed, newest first, with SENT status."""
    listed = await all_pages(client, "/v2/emailmarketing/campaigns", status="SENT", limit="1")
    assert [c["name"] for c in listed] == ["Product update #2", "Weekly digest #1"]
    assert all(set(c) == {"id", "name", "status", "modified_date", "last_run_date"} for c in listed)
    assert all(c["status"] == "SENT" for c in listed)
    await advance(client, 300)
    listed = await all_pages(client, "/v2/emailmarketing/campaigns", status="SENT")
    assert len(listed) == 3
    since = str(listed[0]["modified_date"])
    recent = await all_pages(client, "/v2/emailmarketing/campaigns", modified_since=since)
    assert recent == listed[:1]


@pytest.mark.parametrize(("status", "code", "count"), [("DRAFT", 200, 0), ("BOGUS", 400, None)])
async def test_campaign_status_filter(
    client: Client, status: str, code: int, count: int | None
) -> None:
    """Statuses the simulator has no campaigns in list nothing; unknown statuses are 400."""
    body = await get_json(client, "/v2/emailmarketing/campaigns", expect=code, status=status)
    if count is not None:
        assert isinstance(body, dict)
        assert len(body["results"]) == count


async def test_campaign_list_limit_is_at_most_50(client: Client) -> None:
    """The campaigns list takes limit 1..50."""
    await get_json(client, "/v2/emailmarketing/campaigns", expect=400, limit="51")


async def test_contacts_list_and_new_contacts(aiohttp_client: AiohttpClient) -> None:
    """Contacts are listed with their email; contacts added during the run appear on time."""
    client = await aiohttp_client(
        create_app(scenario(contacts={"count": 5, "added": 2, "added_every_s": 60}))
    )
    listed = await all_pages(client, "/v2/contacts", limit="2")
    assert [c["id"] for c in listed] == ["1005", "1004", "1003", "1002", "1001"]
    assert listed[0] == {
        "id": "1005",
        "status": "ACTIVE",
        "email_addresses": [{"email_address": "contact1005@example.com"}],
        "modified_date": "2026-11-23T07:00:00.000Z",
    }
    await get_json(client, "/v2/contacts/1006/tracking", expect=404)
    await advance(client, 60)
    listed = await all_pages(client, "/v2/contacts", modified_since="2026-11-23T08:00:00Z")
    assert [c["id"] for c in listed] == ["1006"]


async def test_same_seed_same_truth(aiohttp_client: AiohttpClient) -> None:
    """Two simulators of one scenario produce identical ground truth; another seed differs."""
    first = await aiohttp_client(create_app(scenario()))
    second = await aiohttp_client(create_app(scenario()))
    other = await aiohttp_client(create_app(scenario(seed=4)))
    for client in (first, second, other):
        await advance(client, 1800)
    assert await truth(first) == await truth(second)
    assert await truth(first) != await truth(other)


async def test_quirks_appear_stably_and_can_be_turned_off(aiohttp_client: AiohttpClient) -> None:
    """Numeric ids and fraction-less .000 times appear, the same on every call; quirks off: none."""
    for quirks in (True, False):
        client = await aiohttp_client(create_app(scenario(quirks=quirks)))
        await advance(client, 1800)
        records: list[JsonObject] = []
        for campaign in get_state(client.app).world.campaigns[:3]:
            for feed in ("sends", "clicks"):
                path = f"/v2/emailmarketing/campaigns/{campaign.id}/tracking/{feed}"
                page = await all_pages(client, path, limit="500")
                assert await all_pages(client, path, limit="500") == page
                records += page
        dates = [str(r.get("send_date") or r.get("click_date")) for r in records]
        numeric_campaign = [r for r in records if isinstance(r["campaign_id"], int)]
        numeric_link = [r for r in records if r.get("link_id") == 0]
        no_fraction = [r for r, date in zip(records, dates, strict=True) if "." not in date]
        assert all(when(r) % 1000 == 0 for r in no_fraction)  # only ever for a .000 instant
        assert bool(numeric_campaign) is quirks
        assert bool(numeric_link) is quirks
        assert bool(no_fraction) is quirks


async def test_contact_and_campaign_scope_render_one_activity_differently(
    aiohttp_client: AiohttpClient,
) -> None:
    """The same activity can look different per scope, but normalizes to one identity."""
    client = await aiohttp_client(create_app(scenario()))
    await advance(client, 1800)
    campaign = get_state(client.app).world.campaigns[0]
    by_campaign = await all_pages(
        client, f"/v2/emailmarketing/campaigns/{campaign.id}/tracking/sends", limit="500"
    )
    differing = 0
    for record in by_campaign[:20]:
        contact = record["contact_id"]
        mine = await all_pages(client, f"/v2/contacts/{contact}/tracking/sends", limit="500")
        same = [r for r in mine if identity(r) == identity(record)]
        assert len(same) == 1
        differing += same[0] != record
    assert differing > 0


def test_every_shape_is_served() -> None:
    """The catalogue's four shapes all have endpoints (guards the route mapping above)."""
    assert {endpoint.shape for endpoint in ENDPOINTS} == set(Shape)
