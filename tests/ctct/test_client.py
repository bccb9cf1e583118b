"""The Constant Contact client against the running simulator: every endpoint, paging, errors."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiohttp.typedefs import Handler
from asyncpg import Connection

from relay.app import StoreLedger
from relay.ctct import catalogue, errors
from relay.ctct.catalogue import Endpoint, Scope, Shape
from relay.ctct.client import (
    MAX_EMPTY_PAGES,
    Credentials,
    CtctClient,
    RetryPolicy,
    _date_ms,
    counting_requests,
    guarding_requests,
    redact_url,
)
from relay.ctct.ratelimit import Budget, RateLimiter
from relay.events import Activity, Kind, parse_activity, parse_time, to_millis
from relay.leases import AccountBudget
from relay.sim import Scenario
from relay.sim.scenario import ApiKey, Campaigns, Contacts
from relay.store import PostgresStore, Store
from relay.store.coordination import coordinator_for
from tests.simkit import API_KEY, SCENARIO, START, TOKEN, MakeSim, Sim

Truth = list[dict[str, object]]


def pick(truth: Truth, **match: object) -> dict[str, object]:
    """The first ground-truth activity with the given field values."""
    return next(a for a in truth if all(a.get(k) == v for k, v in match.items()))


def expected(truth: Truth, endpoint: Endpoint, resource: str, link: str | None) -> Counter[str]:
    """Identities of the activities an activity endpoint should return for one resource."""
    field = "contact_id" if endpoint.scope is Scope.CONTACT else "campaign_id"
    rows = [
        a
        for a in truth
        if a[field] == resource
        and (endpoint.kind is None or a["kind"] == endpoint.kind.value)
        and (link is None or a.get("link_id") == link)
    ]
    return Counter(_identity(a) for a in rows)


def _identity(a: dict[str, object]) -> str:
    kind = Kind(str(a["kind"]))
    moment = parse_time(a[kind.date_field])
    link = a.get("link_id", "") if kind is Kind.CLICK else ""
    return f"{kind.value}|{a['campaign_id']}|{a['contact_id']}|{moment.isoformat()}|{link}"


def _ids(truth: Truth, endpoint: Endpoint) -> tuple[str, str | None]:
    """A resource with activity of the endpoint's kind (clicks for mixed lists), and a link."""
    found = pick(truth, kind=(endpoint.kind or Kind.CLICK).value)
    resource = found["contact_id" if endpoint.scope is Scope.CONTACT else "campaign_id"]
    return str(resource), str(found.get("link_id"))


ACTIVITY_ENDPOINTS = [e for e in catalogue.ENDPOINTS if e.shape is Shape.ACTIVITIES]


@pytest.mark.parametrize("endpoint", ACTIVITY_ENDPOINTS, ids=lambda e: e.name)
async def test_activity_endpoint_returns_exactly_the_truth(sim: Sim, endpoint: Endpoint) -> None:
    """Every activity feed, paged at a small limit, yields its activities once, newest first."""
    truth = await sim.truth()
    resource, link = _ids(truth, endpoint)
    client = sim.client()
    got: Counter[str] = Counter()
    pages = 0
    async for page in client.pages(
        endpoint,
        resource_id=resource,
        link_id=link if endpoint.needs_link else None,
        limit=7,
    ):
        pages += 1
        times = []
        for record in page.records:
            activity = parse_activity(record, account="t", kind=endpoint.kind)
            got[_activity_identity(activity)] += 1
            times.append(activity.occurred_at)
        assert times == sorted(times, reverse=True)
    want = expected(truth, endpoint, resource, link if endpoint.needs_link else None)
    assert want, "the scenario should give every feed something to return"
    assert got == want
    assert pages == -(-sum(want.values()) // 7)


def _activity_identity(a: Activity) -> str:
    link = a.link_id if a.kind is Kind.CLICK else ""
    return f"{a.kind.value}|{a.campaign_id}|{a.contact_id}|{a.occurred_at.isoformat()}|{link}"


async def test_created_since_is_inclusive(sim: Sim) -> None:
    """An activity exactly at created_since is returned; nothing older is."""
    truth = await sim.truth()
    opens = sorted((a for a in truth if a["kind"] == "open"), key=lambda a: str(a["open_date"]))
    pivot = opens[len(opens) // 2]
    since = parse_time(pivot["open_date"])
    campaign = str(pivot["campaign_id"])
    client = sim.client()
    seen = []
    async for page in client.pages(
        catalogue.get("campaign.opens"), resource_id=campaign, since=since
    ):
        seen += [parse_activity(r, account="t").occurred_at for r in page.records]
    assert since in seen
    assert min(seen) == since
    want = [
        a for a in opens if a["campaign_id"] == campaign and parse_time(a["open_date"]) >= since
    ]
    assert len(seen) == len(want)


async def test_later_pages_send_only_the_next_token(make_sim: MakeSim) -> None:
    """Page two onward is requested with next and api_key alone; the first limit still applies."""
    seen: list[dict[str, str]] = []

    @web.middleware
    async def spy(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/v2/"):
            seen.append(dict(request.query))
        return await handler(request)

    sim = await make_sim(middlewares=[spy])
    truth = await sim.truth()
    campaign = str(pick(truth, kind="send")["campaign_id"])
    endpoint = catalogue.get("campaign.sends")
    sizes = [
        len(page.records)
        async for page in sim.client().pages(endpoint, resource_id=campaign, limit=5)
    ]
    assert len(sizes) > 2
    assert all(size == 5 for size in sizes[:-1])
    assert set(seen[0]) == {"api_key", "limit"}
    assert all(set(q) == {"api_key", "next"} for q in seen[1 : len(sizes)])


@pytest.mark.parametrize(
    "name", ["contact.summary", "campaign.summary", "contact.summary_by_campaign"]
)
async def test_summaries_count_what_is_visible(sim: Sim, name: str) -> None:
    """Summary endpoints return counts that match the ground truth for the resource."""
    truth = await sim.truth()
    endpoint = catalogue.get(name)
    field = "contact_id" if endpoint.scope is Scope.CONTACT else "campaign_id"
    resource = str(pick(truth, kind="open")[field])
    body = await sim.client().fetch(endpoint, resource_id=resource)
    rows = [a for a in truth if a[field] == resource]
    if endpoint.shape is Shape.SUMMARY_LIST:
        assert isinstance(body, list)
        per_campaign = {str(row["campaign_id"]): row for row in body}
        for campaign, row in per_campaign.items():
            mine = [a for a in rows if a["campaign_id"] == campaign]
            assert row["opens"] == sum(a["kind"] == "open" for a in mine)
            assert "unsubscribes" not in row
    elif endpoint.scope is Scope.CONTACT:
        assert isinstance(body, dict)
        assert body["opens"] == sum(a["kind"] == "open" for a in rows)
        assert body["clicks"] == sum(a["kind"] == "click" for a in rows)
    else:  # a campaign's opens and clicks count unique recipients (v2 docs)
        assert isinstance(body, dict)
        assert body["opens"] == len({a["contact_id"] for a in rows if a["kind"] == "open"})
        assert body["clicks"] == len({a["contact_id"] for a in rows if a["kind"] == "click"})
        assert body["sends"] == sum(a["kind"] == "send" for a in rows)


@pytest.mark.parametrize("name", ["campaigns.sent", "contacts.modified"])
async def test_discovery_lists_page_through(sim: Sim, name: str) -> None:
    """Campaign and contact discovery page through every resource."""
    endpoint = catalogue.get(name)
    ids = [
        str(row["id"])
        async for page in sim.client().pages(endpoint, limit=2)
        for row in page.records
    ]
    want = SCENARIO.campaigns.already_sent if name == "campaigns.sent" else SCENARIO.contacts.count
    assert len(ids) == len(set(ids)) == want


# --- errors -----------------------------------------------------------------------------------


async def test_wrong_token_is_unauthorized(sim: Sim) -> None:
    """A bad access token maps to UnauthorizedError, not retried."""
    client = sim.client(token="wrong-token")
    with pytest.raises(errors.UnauthorizedError, match="401") as caught:
        await client.fetch(catalogue.get("contact.summary"), resource_id="1001")
    assert client.requests_sent == 1
    assert not caught.value.retriable


async def test_unknown_campaign_is_not_found(sim: Sim) -> None:
    """A campaign that does not exist maps to NotFoundError carrying the API's error key."""
    with pytest.raises(errors.NotFoundError) as caught:
        async for _ in sim.client().pages(catalogue.get("campaign.opens"), resource_id="999"):
            pass
    assert caught.value.status == 404
    assert caught.value.error_key


@pytest.mark.parametrize(
    ("script", "error", "retriable"),
    [
        pytest.param({"status": 400}, errors.BadRequestError, False, id="400"),
        pytest.param({"status": 406}, errors.NotAcceptableError, False, id="406"),
        pytest.param({"status": 403, "error_key": "other"}, errors.ForbiddenError, False, id="403"),
        pytest.param({"status": 500}, errors.ServerError, True, id="500"),
        pytest.param({"status": 503}, errors.ServerError, True, id="503"),
        pytest.param({"truncate": True}, errors.MalformedResponseError, True, id="truncated"),
        pytest.param(
            {"status": 403, "error_key": "mashery.not.authorized.over.qps"},
            errors.OverQpsError,
            True,
            id="over-qps",
        ),
        pytest.param(
            {"status": 429, "retry_after": 1}, errors.TooManyRequestsError, True, id="429"
        ),
    ],
)
async def test_error_statuses_map_to_typed_errors(
    sim: Sim, script: dict[str, object], error: type[errors.CtctError], retriable: bool
) -> None:
    """Each error answer maps to its class; retriable ones are retried up to max_attempts."""
    await sim.faults(script=[script] * 3)
    client = sim.client(retry=RetryPolicy(max_attempts=3))
    with pytest.raises(error):
        await client.fetch(catalogue.get("contact.summary"), resource_id="1001")
    assert client.requests_sent == (3 if retriable else 1)


async def test_retriable_errors_recover(sim: Sim) -> None:
    """5xx, truncated bodies, over-qps and 429 followed by success return the data."""
    await sim.faults(
        script=[
            {"status": 502},
            {"truncate": True},
            {"status": 403, "error_key": "mashery.not.authorized.over.qps"},
            {"status": 429, "retry_after": 2},
        ]
    )
    sleeps: list[float] = []
    client = sim.client(sleeps=sleeps, retry=RetryPolicy(max_attempts=5, base_delay_s=0.1))
    body = await client.fetch(catalogue.get("contact.summary"), resource_id="1001")
    assert isinstance(body, dict)
    assert "opens" in body
    assert client.requests_sent == 5
    assert sleeps[3] >= 2  # Retry-After honoured
    assert sleeps[2] >= 1  # over-qps waits out the API's one-second window
    assert all(s >= 0.05 for s in sleeps[:2])


async def test_retry_after_beyond_the_bound_goes_to_the_caller(sim: Sim) -> None:
    """A Retry-After longer than max_retry_after_s is not slept through."""
    await sim.faults(script=[{"status": 429, "retry_after": 3600}])
    client = sim.client(retry=RetryPolicy(max_retry_after_s=60))
    with pytest.raises(errors.TooManyRequestsError) as caught:
        await client.fetch(catalogue.get("contact.summary"), resource_id="1001")
    assert caught.value.retry_after_s == 3600
    assert client.requests_sent == 1


async def test_per_second_limit_of_the_api_is_mapped_and_survived(make_sim: MakeSim) -> None:
    """A client allowed more than the key's qps gets real over-qps 403s and still finishes."""
    scenario = Scenario(
        seed=11,
        start=START,
        time_scale=0,
        keys=(ApiKey(API_KEY, TOKEN, qps=2, daily=None),),
        contacts=Contacts(count=20),
        campaigns=Campaigns(count=1, already_sent=1),
    )
    sim = await make_sim(scenario)
    client = sim.client(budget=Budget(requests_per_second=50), retry=RetryPolicy(max_attempts=10))
    client._sleep = asyncio.sleep  # real waiting: the API's window must really pass
    endpoint = catalogue.get("contact.summary")
    bodies = await asyncio.gather(*(client.fetch(endpoint, resource_id="1001") for _ in range(5)))
    assert len(bodies) == 5
    assert client.requests_sent > 5  # some were refused with over-qps and retried


async def test_daily_quota_403_pauses_the_account(make_sim: MakeSim) -> None:
    """Over-ratelimit maps to QuotaExhaustedError with resume at 00:00 UTC; the limiter stops."""
    scenario = Scenario(
        seed=11,
        start=START,
        time_scale=0,
        keys=(ApiKey(API_KEY, TOKEN, qps=None, daily=3),),
        contacts=Contacts(count=5),
        campaigns=Campaigns(count=1, already_sent=1),
    )
    sim = await make_sim(scenario, advance_s=0)
    client = sim.client()
    endpoint = catalogue.get("contact.summary")
    for _ in range(3):
        await client.fetch(endpoint, resource_id="1001")
    with pytest.raises(errors.QuotaExhaustedError) as caught:
        await client.fetch(endpoint, resource_id="1001")
    assert caught.value.resume_at.hour == 0
    assert caught.value.resume_at.tzinfo is not None
    with pytest.raises(errors.BudgetExhaustedError):
        await client.fetch(endpoint, resource_id="1001")
    assert client.requests_sent == 4


async def test_timeout_is_a_transport_error(sim: Sim) -> None:
    """A response slower than the timeout becomes a retriable ResponseTimeoutError (a
    TransportError: the poller lets one per pass fail only its feed)."""
    await sim.faults(script=[{"delay_s": 2}, {"delay_s": 2}])
    client = sim.client(retry=RetryPolicy(max_attempts=2), timeout=aiohttp.ClientTimeout(total=0.3))
    with pytest.raises(errors.ResponseTimeoutError, match=r"timed out after 0\.3s") as caught:
        await client.fetch(catalogue.get("contact.summary"), resource_id="1001")
    assert caught.value.retriable


@contextlib.contextmanager
def full_backlog() -> Iterator[int]:
    """A port on 127.0.0.1 whose listener's accept queue is full: the SYN of a connection to it
    is dropped, so connecting times out."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port: int = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(3)]
        try:
            for filler in fillers:
                filler.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    filler.connect(("127.0.0.1", port))
            yield port
        finally:
            for filler in fillers:
                filler.close()


async def test_a_connection_that_cannot_be_made_in_time_is_no_response_timeout() -> None:
    """A connect timeout (a listener whose backlog is full drops the SYN) is the network's
    failure: a plain TransportError, which ends a pass, not a ResponseTimeoutError."""
    with full_backlog() as port:
        async with aiohttp.ClientSession() as session:
            client = CtctClient(
                session,
                Credentials(f"http://127.0.0.1:{port}", API_KEY, TOKEN),
                RateLimiter(Budget(requests_per_second=100)),
                retry=RetryPolicy(max_attempts=1),
                timeout=aiohttp.ClientTimeout(total=2, connect=0.2),
            )
            with pytest.raises(errors.TransportError, match="timed out connecting") as caught:
                await client.fetch(catalogue.get("contact.summary"), resource_id="1")
    assert not isinstance(caught.value, errors.ResponseTimeoutError)


async def test_unreachable_base_url_is_a_clear_transport_error() -> None:
    """Connection refused names the host and port, after bounded retries."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with aiohttp.ClientSession() as session:
        client = CtctClient(
            session,
            Credentials(f"http://127.0.0.1:{port}", API_KEY, TOKEN),
            RateLimiter(Budget(requests_per_second=100)),
            retry=RetryPolicy(max_attempts=2, base_delay_s=0.01),
        )
        with pytest.raises(errors.TransportError, match=f"cannot connect to 127.0.0.1:{port}"):
            await client.fetch(catalogue.get("contact.summary"), resource_id="1")
        assert client.requests_sent == 2


@pytest.mark.parametrize("token", [TOKEN + "\n", TOKEN + "\r\n", f"{TOKEN[:4]}\x00{TOKEN[4:]}"])
async def test_a_control_character_in_the_token_is_a_typed_error(sim: Sim, token: str) -> None:
    """aiohttp refuses the header ("Forbidden control character detected in headers"): the
    ValueError escaped the client, so `fetch` died with a traceback and every pass of `run` was
    a crash. It is an InvalidRequestError naming the cause, not retried, never showing it."""
    client = sim.client(token=token, retry=RetryPolicy(max_attempts=3, base_delay_s=0.01))
    with pytest.raises(errors.InvalidRequestError) as caught:
        await client.fetch(catalogue.get("contact.summary"), resource_id="1001")
    message = str(caught.value)
    assert "could not be sent" in message
    assert "Forbidden control character" in message
    assert TOKEN not in message
    assert API_KEY not in message
    assert not caught.value.retriable
    assert client.requests_sent == 1


async def test_a_host_name_idna_refuses_is_a_typed_error() -> None:
    """http://api..constantcontact.com: the resolver's IDNA encoding raises UnicodeError, which
    escaped the client as a crash on every request."""
    async with aiohttp.ClientSession() as session:
        client = CtctClient(
            session,
            Credentials("http://api..constantcontact.com", API_KEY, TOKEN),
            RateLimiter(Budget(requests_per_second=100)),
            retry=RetryPolicy(max_attempts=3, base_delay_s=0.01),
        )
        with pytest.raises(errors.InvalidRequestError, match="not a valid host name") as caught:
            await client.fetch(catalogue.get("contact.summary"), resource_id="1")
        assert API_KEY not in str(caught.value)
        assert client.requests_sent == 1


# --- paging defects, served by a deliberately broken API on loopback -------------------------


async def broken_api(
    aiohttp_server: Callable[..., object],
    next_link: Callable[[int], str | None],
    results: Callable[[int], int] = lambda n: 0,
) -> str:
    """Serves page n (1-based) with ``next_link(n)`` and ``results(n)`` records; the base URL."""
    calls = {"n": 0}

    async def handler(_request: web.Request) -> web.Response:
        calls["n"] += 1
        n = calls["n"]
        link = next_link(n)
        meta = {"pagination": {"next_link": link} if link else {}}
        records = [{"activity_type": "EMAIL_OPEN", "page": n}] * results(n)
        return web.json_response({"meta": meta, "results": records})

    return await serve_get(aiohttp_server, handler)


async def serve_get(aiohttp_server: Callable[..., object], handler: Handler) -> str:
    """Serves ``handler`` for every GET on a test server; its base URL."""
    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    server = await aiohttp_server(app)  # type: ignore[operator]
    assert isinstance(server, TestServer)
    return str(server.make_url(""))


def _client(
    session: aiohttp.ClientSession,
    base_url: str,
    budget: Budget | None = None,
    retry: RetryPolicy | None = None,
) -> CtctClient:
    """The test key's client of ``base_url``, 100 requests a second unless ``budget`` says."""
    return CtctClient(
        session,
        Credentials(base_url, API_KEY, TOKEN),
        RateLimiter(budget or Budget(requests_per_second=100)),
        retry=retry,
    )


@pytest.mark.parametrize(
    ("body", "said"),
    [
        pytest.param(
            [{"error_message": "created_since is not a valid date"}],
            "(created_since is not a valid date)",
            id="message-without-key",
        ),
        pytest.param([{"error_key": "query.param.invalid"}], "(query.param.invalid)", id="key"),
        pytest.param(
            [
                {"error_key": "query.param.invalid", "error_message": "limit: 1 to 500"},
                {"error_key": "", "error_message": "next: not a token"},
            ],
            "(query.param.invalid: limit: 1 to 500; next: not a token)",
            id="two-errors",
        ),
    ],
)
async def test_the_apis_error_array_is_quoted_as_it_said(
    aiohttp_server: Callable[..., object], body: list[dict[str, str]], said: str
) -> None:
    """Each entry of the API's ``[{error_key, error_message}]`` is named in the error: a key
    and its message, or whichever of the two came (an entry without a key read ": message")."""

    async def handler(_request: web.Request) -> web.Response:
        return web.json_response(body, status=400)

    base_url = await serve_get(aiohttp_server, handler)
    async with aiohttp.ClientSession() as session:
        client = _client(session, base_url)
        with pytest.raises(errors.BadRequestError) as caught:
            await client.fetch(catalogue.get("contact.summary"), resource_id="1")
    assert str(caught.value).endswith(f"answered 400 {said}")


async def test_repeated_next_link_is_an_error(aiohttp_server: Callable[..., object]) -> None:
    """A next_link the API already sent stops the pass with PaginationLoopError."""
    links = {1: "/v2/x?next=AAA", 2: "/v2/x?next=BBB", 3: "/v2/x?next=AAA"}
    base_url = await broken_api(aiohttp_server, lambda n: links.get(n, "/v2/x?next=ZZZ"))
    async with aiohttp.ClientSession() as session:
        client = _client(session, base_url)
        with pytest.raises(errors.PaginationLoopError, match="repeated"):
            async for _ in client.pages(catalogue.get("campaign.opens"), resource_id="1"):
                pass
        assert client.requests_sent == 3


async def test_next_links_over_empty_pages_stop_the_pass(
    aiohttp_server: Callable[..., object],
) -> None:
    """A server that keeps sending new next_links with no records stops the pass after
    MAX_EMPTY_PAGES empty pages in a row (instead of spending the day's budget); a page with
    records in between starts the count again."""
    assert MAX_EMPTY_PAGES == 3
    base_url = await broken_api(
        aiohttp_server, lambda n: f"/v2/x?next=T{n}", lambda n: 2 if n == 3 else 0
    )
    async with aiohttp.ClientSession() as session:
        client = _client(session, base_url, Budget(requests_per_second=1000))
        seen: list[int] = []

        async def read() -> None:
            async for page in client.pages(catalogue.get("campaign.opens"), resource_id="1"):
                seen.append(page.number)

        with pytest.raises(errors.PaginationLoopError) as caught:
            await read()
        assert seen == [1, 2, 3, 4, 5, 6]
        assert client.requests_sent == 6
        assert str(caught.value).startswith("campaign.opens: 3 pages in a row (up to page 6)")
        assert "/v2/x?next=T6" in str(caught.value)


async def test_a_cursor_over_the_same_records_stops_the_pass(
    aiohttp_server: Callable[..., object],
) -> None:
    """A next_link that changes at every page (a nonce in the token) over the same records:
    only pages with no records counted, so the loop ran until the day's budget was spent. A page
    that brings nothing this read has not already returned counts as empty; a repeat of a link
    with its parameters in another order is a repeat."""
    sent = {"n": 0}
    same = [{"activity_type": "EMAIL_OPEN", "contact_id": str(i)} for i in range(3)]

    async def stuck(_request: web.Request) -> web.Response:
        sent["n"] += 1
        link = f"/v2/x?next=tok&nonce={sent['n']}"
        return web.json_response({"meta": {"pagination": {"next_link": link}}, "results": same})

    async def reordered(request: web.Request) -> web.Response:
        page = int(request.query.get("p", "1"))
        link = "/v2/y?next=A&p=2" if page == 1 else "/v2/y?p=2&next=A"
        record = {"activity_type": "EMAIL_OPEN", "contact_id": str(page)}
        return web.json_response({"meta": {"pagination": {"next_link": link}}, "results": [record]})

    app = web.Application()
    app.router.add_get("/v2/y", reordered)
    app.router.add_get("/{tail:.*}", stuck)
    server = await aiohttp_server(app)  # type: ignore[operator]
    async with aiohttp.ClientSession() as session:
        client = _client(
            session,
            str(server.make_url("")),
            Budget(requests_per_second=1000, requests_per_day=300),
        )
        with pytest.raises(errors.PaginationLoopError) as caught:
            async for _ in client.pages(catalogue.get("campaign.opens"), resource_id="1"):
                pass
        assert client.requests_sent == 1 + MAX_EMPTY_PAGES
        message = str(caught.value)
        assert message.startswith("campaign.opens: 3 pages in a row (up to page 4) brought no new")
        assert "only records this read had already returned" in message
        assert API_KEY not in message

        other = Endpoint("y", "/v2/y", Scope.ACCOUNT, Shape.RESOURCES, max_limit=50)
        with pytest.raises(errors.PaginationLoopError, match="repeated on page 3"):
            async for _ in client.pages(other):
                pass


async def test_a_long_feed_with_records_is_not_cut_short(
    aiohttp_server: Callable[..., object],
) -> None:
    """Every page of a long feed is followed when each carries records, even with a run of
    fewer than MAX_EMPTY_PAGES empty pages among them."""
    pages = 200
    base_url = await broken_api(
        aiohttp_server,
        lambda n: f"/v2/x?next=T{n}" if n < pages else None,
        lambda n: 0 if n in {50, 51} else 1,
    )
    async with aiohttp.ClientSession() as session:
        client = _client(session, base_url, Budget(requests_per_second=1000))
        numbers = [
            p.number async for p in client.pages(catalogue.get("campaign.opens"), resource_id="1")
        ]
        assert numbers == list(range(1, pages + 1))


GOOD_OPEN = b'{"activity_type":"EMAIL_OPEN","contact_id":"1","email_address":"a@example.com"}'


@pytest.mark.parametrize(
    ("text", "email", "problem"),
    [
        pytest.param(
            b"ren\xe9@example.fr", "ren\ufffd@example.fr", "not valid UTF-8 (byte 0xe9", id="latin1"
        ),
        pytest.param(
            b"x@example.com \\ud83d",
            "x@example.com \ufffd",
            "1 string(s) holding a lone UTF-16 surrogate escape",
            id="lone-surrogate",
        ),
    ],
)
async def test_a_record_whose_text_is_not_clean_utf8_does_not_lose_the_page(
    aiohttp_server: Callable[..., object], text: bytes, email: str, problem: str
) -> None:
    """A Latin-1 byte or a lone surrogate escape in one record made orjson refuse the whole
    page: a MalformedResponseError every pass, the feed's watermark stuck, every later event of
    the feed lost. The page is read with the bad text replaced by U+FFFD, and a warning names
    the endpoint and the problem (never the credentials)."""
    odd = b'{"activity_type":"EMAIL_OPEN","contact_id":"2","email_address":"' + text + b'"}'
    body = b'{"meta":{"pagination":{}},"results":[' + GOOD_OPEN + b"," + odd + b"]}"

    async def handler(_request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    base_url = await serve_get(aiohttp_server, handler)
    async with aiohttp.ClientSession() as session:
        client = _client(session, base_url)
        with structlog.testing.capture_logs() as logs:
            pages = [
                p async for p in client.pages(catalogue.get("campaign.opens"), resource_id="9")
            ]
    [page] = pages
    assert [r["email_address"] for r in page.records] == ["a@example.com", email]
    assert client.requests_sent == 1  # not retried: the body will not change
    [warning] = [line for line in logs if line["event"] == "ctct.body_repaired"]
    assert warning["endpoint"] == "campaign.opens"
    assert warning["path"] == "/v2/emailmarketing/campaigns/9/tracking/opens"
    assert warning["problem"].startswith(problem)
    assert API_KEY not in str(logs)
    assert TOKEN not in str(logs)


@pytest.mark.parametrize(
    ("body", "said"),
    [
        pytest.param(
            b'{"results": [ren\xe9',
            "not valid UTF-8 (byte 0xe9 at offset 16) and not JSON",
            id="latin1",
        ),
        pytest.param(b"<html>busy</html>", "not JSON (unexpected character", id="html"),
    ],
)
async def test_a_body_that_is_not_json_says_what_is_wrong_with_it(
    aiohttp_server: Callable[..., object], body: bytes, said: str
) -> None:
    """orjson calls every invalid UTF-8 input "surrogates not allowed": a Latin-1 byte in a
    body that is not JSON either was reported as a surrogate problem. The error names the byte
    and its offset, and then what the JSON parser said."""

    async def handler(_request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    base_url = await serve_get(aiohttp_server, handler)
    async with aiohttp.ClientSession() as session:
        client = _client(session, base_url, retry=RetryPolicy(max_attempts=1))
        with pytest.raises(errors.MalformedResponseError) as caught:
            await client.fetch(catalogue.get("campaign.summary"), resource_id="9")
    message = str(caught.value)
    assert f"answered 200 with a body that is {said}" in message
    assert "surrogate" not in message
    assert API_KEY not in message


async def test_next_link_to_another_host_is_refused(aiohttp_server: Callable[..., object]) -> None:
    """An absolute next_link is never followed: it would send the api_key elsewhere."""
    base_url = await broken_api(aiohttp_server, lambda n: "https://evil.example/v2?next=A")
    async with aiohttp.ClientSession() as session:
        client = _client(session, base_url)
        with pytest.raises(errors.MalformedResponseError, match="not a relative path"):
            async for _ in client.pages(catalogue.get("campaign.opens"), resource_id="1"):
                pass


async def test_paging_arguments_are_checked(sim: Sim) -> None:
    """A limit outside the endpoint's range and missing ids are refused before any request."""
    client = sim.client()
    with pytest.raises(ValueError, match=r"1\.\.50"):
        await anext(client.pages(catalogue.get("campaigns.sent"), limit=51))
    with pytest.raises(ValueError, match="not paged"):
        await anext(client.pages(catalogue.get("campaign.summary"), resource_id="1"))
    assert client.requests_sent == 0
    with pytest.raises(ValueError, match="needs a campaign id"):
        catalogue.get("campaign.opens").url_path(None)
    with pytest.raises(ValueError, match="needs a link id"):
        catalogue.get("campaign.clicks_by_link").url_path("1")


def test_unknown_endpoint_lists_known_ones() -> None:
    """An unknown endpoint name says so and lists the names that exist."""
    with pytest.raises(catalogue.UnknownEndpointError, match=r"campaign\.clicks_by_link"):
        catalogue.get("campaign.click")


# --- redaction --------------------------------------------------------------------------------


def test_redact_url_hides_the_key() -> None:
    """api_key values are replaced in URLs, other parameters kept."""
    shown = redact_url(f"https://x/v2/contacts?api_key={API_KEY}&limit=5")
    assert API_KEY not in shown
    assert "api_key=***" in shown
    assert "limit=5" in shown


async def test_secrets_never_appear_in_errors_or_logs(sim: Sim) -> None:
    """Across retries and every error class, neither the api_key nor the token is shown."""
    await sim.faults(
        script=[
            {"status": 500},
            {"truncate": True},
            {"status": 429, "retry_after": 1},
            {"status": 400},
        ]
    )
    texts: list[str] = []
    with structlog.testing.capture_logs() as captured:
        client = sim.client(retry=RetryPolicy(max_attempts=5))
        with pytest.raises(errors.BadRequestError) as caught:
            await client.fetch(catalogue.get("contact.summary"), resource_id="1001")
        texts += [str(caught.value), repr(caught.value), repr(client._credentials)]
        for bad in (sim.client(token="bad-token-zz"), sim.client(api_key="bad-key-zz")):
            with pytest.raises(errors.UnauthorizedError) as unauthorized:
                await bad.fetch(catalogue.get("contact.summary"), resource_id="1001")
            texts.append(str(unauthorized.value))
    texts += [repr(entry) for entry in captured]
    assert len(captured) >= 3  # the retries were logged
    blob = "\n".join(texts)
    for secret in (API_KEY, TOKEN, "bad-token-zz", "bad-key-zz"):
        assert secret not in blob
    assert "api_key=***" in blob


async def test_all_activities_list_is_mixed_and_newest_first(sim: Sim) -> None:
    """The contact's all-activities list carries several kinds, each typed by activity_type."""
    truth = await sim.truth()
    contact = str(pick(truth, kind="click")["contact_id"])
    kinds = set()
    async for page in sim.client().pages(catalogue.get("contact.activities"), resource_id=contact):
        for record in page.records:
            kinds.add(parse_activity(record, account="t").kind)
    assert {Kind.SEND, Kind.OPEN, Kind.CLICK} <= kinds


async def test_later_activity_becomes_visible_after_time_passes(make_sim: MakeSim) -> None:
    """Advancing the simulator's clock reveals more activity to the same query."""
    sim = await make_sim(advance_s=0)
    truth_before = await sim.truth()
    await sim.advance(timedelta(minutes=30).total_seconds())
    truth_after = await sim.truth()
    assert len(truth_after) > len(truth_before)


async def test_pages_carry_the_upstreams_clock_from_its_date_header(make_sim: MakeSim) -> None:
    """Each page carries the Date header as Unix ms, and the simulator's Date follows its
    virtual clock (here weeks behind real time; in the demo, ahead of it)."""
    sim = await make_sim(advance_s=7200)
    campaign = str(pick(await sim.truth(), kind="open")["campaign_id"])
    endpoint = catalogue.get("campaign.opens")
    pages = [page async for page in sim.client().pages(endpoint, resource_id=campaign)]
    virtual_ms = to_millis(START + timedelta(seconds=7200))  # frozen clock: exact to the second
    assert [page.server_ms for page in pages] == [virtual_ms] * len(pages)


@pytest.mark.parametrize(
    ("header", "ms"),
    [
        pytest.param("Fri, 20 Nov 2026 09:00:00 GMT", to_millis(START), id="imf-fixdate"),
        pytest.param("Fri, 20 Nov 2026 10:00:00 +0100", to_millis(START), id="numeric-zone"),
        pytest.param(None, None, id="absent"),
        pytest.param("yesterday", None, id="not-a-date"),
        pytest.param("Fri, 20 Nov 2026 09:00:00 -0000", None, id="no-zone"),
        pytest.param("Mon, 01 Jan 99999999999999999999 00:00:00 GMT", None, id="overflow"),
    ],
)
def test_date_headers_are_read_as_unix_ms_or_none(header: str | None, ms: int | None) -> None:
    """A Date header the poller can bound watermarks by, or None (it then uses its own clock)."""
    assert _date_ms(header) == ms


async def test_requests_are_counted_per_task_on_a_shared_client(sim: Sim) -> None:
    """Passes of one account share its client and run concurrently: counting_requests counts
    only what the counting task sent, while requests_sent stays the client's total."""
    client = sim.client()
    summary = catalogue.get("contact.summary")

    async def send(times: int) -> int:
        with counting_requests() as sent:
            for _ in range(times):
                await client.fetch(summary, resource_id="1001")
        return sent.requests

    assert await asyncio.gather(send(3), send(1)) == [3, 1]
    assert client.requests_sent == 4


class Stopped(Exception):
    """What a unit of work's request guard raises in these tests."""


@pytest.mark.parametrize(
    "allowed",
    [
        pytest.param(0, id="before-the-limiter"),
        pytest.param(1, id="after-the-limiter-admitted-it"),
    ],
)
async def test_a_guarded_unit_of_work_stops_before_its_request_leaves(
    sim: Sim, allowed: int
) -> None:
    """guarding_requests asks its check before each request of the task, and again once the
    limiter admitted it (which may have waited): a check that raises stops the request before
    it is sent, and an admission already taken is given back (the day's count is untouched);
    another task of the same client is not guarded."""
    limiter = RateLimiter(Budget(requests_per_second=1000, requests_per_day=10**6))
    client = CtctClient(sim.session, Credentials(sim.url, API_KEY, TOKEN), limiter)
    summary = catalogue.get("contact.summary")
    asked: list[int] = []

    def check() -> None:
        asked.append(1)
        if len(asked) > allowed:
            raise Stopped("lease ran out")

    before = limiter.remaining_today
    with counting_requests() as sent, guarding_requests(check), pytest.raises(Stopped):
        await client.fetch(summary, resource_id="1001")
    assert (len(asked), sent.requests, client.requests_sent) == (allowed + 1, 0, 0)
    assert limiter.remaining_today == before
    await client.fetch(summary, resource_id="1001")
    assert client.requests_sent == 1


@pytest.mark.parametrize(
    "retry_after",
    [
        pytest.param("\u00b2", id="superscript-two"),
        pytest.param("\u0663", id="arabic-indic-digit"),
        pytest.param("Mon, 01 Jan 99999999999999999999 00:00:00 GMT", id="overflowing-year"),
    ],
)
async def test_an_odd_retry_after_is_ignored_not_a_crash(
    aiohttp_server: Callable[..., object], retry_after: str
) -> None:
    """A 429 whose Retry-After is neither ASCII delay-seconds nor a usable HTTP date is retried
    on the client's own schedule (str.isdigit takes "²", which float refuses; a huge year
    overflows): the pass gets its page, it does not die with ValueError or OverflowError."""
    calls = {"n": 0}

    async def handler(_request: web.Request) -> web.Response:
        calls["n"] += 1
        if calls["n"] == 1:
            return web.json_response(
                {"error_key": "too.many"}, status=429, headers={"Retry-After": retry_after}
            )
        return web.json_response({"meta": {"pagination": {}}, "results": []})

    base_url = await serve_get(aiohttp_server, handler)
    async with aiohttp.ClientSession() as session:
        client = _client(session, base_url, retry=RetryPolicy(base_delay_s=0.01, max_delay_s=0.01))
        pages = [p async for p in client.pages(catalogue.get("campaign.opens"), resource_id="1")]
    assert calls["n"] == 2
    assert len(pages) == 1


# --- the quota counts only requests that may have reached the API ----------------------------


async def _no_sleep(_seconds: float) -> None:
    """Retry delays not waited out: the attempts, not the time, are what is counted."""


def _counted_limiter(store: Store) -> RateLimiter:
    """The limiter as the relay builds it on ``store``: counted in the store's ledger (SQLite),
    or in the budget every replica shares (PostgreSQL)."""
    coordinator = coordinator_for(store, "test")
    budget = Budget(requests_per_second=1000, window_margin_s=0)
    if coordinator.shared_budget:
        return RateLimiter(budget, shared=AccountBudget(coordinator, "b"), sleep=_no_sleep)
    return RateLimiter(budget, ledger=StoreLedger(store, "b"), sleep=_no_sleep)


def _today() -> str:
    return datetime.now(UTC).date().isoformat()


async def test_requests_that_never_left_are_not_charged_to_the_quota(any_store: Store) -> None:
    """Connection refused on every attempt: no request reached the API, so none is counted
    in the day's quota, in the store or here (each attempt was, and an outage of an hour and a
    half spent the day's 9,000 requests and paused the key until midnight)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    limiter = _counted_limiter(any_store)
    async with aiohttp.ClientSession() as session:
        client = CtctClient(
            session,
            Credentials(f"http://127.0.0.1:{port}", API_KEY, TOKEN),
            limiter,
            sleep=_no_sleep,
        )
        with pytest.raises(errors.TransportError, match="cannot connect") as caught:
            await client.fetch(catalogue.get("campaign.summary"), resource_id="1")
        assert client.requests_sent == RetryPolicy().max_attempts
    assert await any_store.quota_used("b", _today()) == 0
    assert limiter.used_today == 0
    assert not caught.value.sent
    if isinstance(any_store, PostgresStore):  # nor does the shared per-second window keep them

        async def logged(conn: Connection) -> int:
            return int(await conn.fetchval("SELECT count(*) FROM request_log"))

        assert await any_store.transaction(logged) == 0


async def test_a_request_that_could_not_be_built_is_not_charged(store: Store) -> None:
    """aiohttp refused the host name: nothing was sent, nothing is counted."""
    limiter = _counted_limiter(store)
    async with aiohttp.ClientSession() as session:
        client = CtctClient(
            session, Credentials("http://api..constantcontact.com", API_KEY, TOKEN), limiter
        )
        with pytest.raises(errors.InvalidRequestError):
            await client.fetch(catalogue.get("contact.summary"), resource_id="1")
    assert await store.quota_used("b", _today()) == 0


async def test_a_connect_timeout_is_not_charged(store: Store) -> None:
    """A connection that could not be made in time carried no request."""
    with full_backlog() as port:
        async with aiohttp.ClientSession() as session:
            client = CtctClient(
                session,
                Credentials(f"http://127.0.0.1:{port}", API_KEY, TOKEN),
                _counted_limiter(store),
                retry=RetryPolicy(max_attempts=2, base_delay_s=0.01),
                timeout=aiohttp.ClientTimeout(total=2, connect=0.2),
            )
            with pytest.raises(errors.TransportError, match="timed out connecting"):
                await client.fetch(catalogue.get("contact.summary"), resource_id="1")
    assert await store.quota_used("b", _today()) == 0


@pytest.mark.parametrize("answer", ["disconnect", "slow", "503"])
async def test_requests_that_reached_the_server_stay_charged(
    aiohttp_server: Callable[..., object], store: Store, answer: str
) -> None:
    """A disconnect after the request was sent, a read timeout, any answer: the API may have
    counted the request, so the quota does too (over-counting is the safe side)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        if answer == "disconnect":
            assert request.transport is not None
            request.transport.close()
        elif answer == "slow":
            await asyncio.sleep(1)
        return web.json_response({"error_key": "x"}, status=503)

    base_url = await serve_get(aiohttp_server, handler)
    async with aiohttp.ClientSession() as session:
        client = CtctClient(
            session,
            Credentials(base_url, API_KEY, TOKEN),
            _counted_limiter(store),
            retry=RetryPolicy(max_attempts=2),
            timeout=aiohttp.ClientTimeout(total=0.3),
            sleep=_no_sleep,
        )
        with pytest.raises(errors.CtctError):
            await client.fetch(catalogue.get("contact.summary"), resource_id="1")
    assert await store.quota_used("b", _today()) == 2
