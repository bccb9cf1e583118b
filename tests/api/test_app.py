"""The admin application: exposure check, bearer auth, health, OpenAPI, JSON errors everywhere."""

from __future__ import annotations

import asyncio
import gzip
import io
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest
from aiohttp import ClientResponse, web
from pytest_aiohttp import AiohttpClient
from structlog.testing import capture_logs

from relay import logs
from relay.api import (
    AdminConfigError,
    AdminSettings,
    admin_runner,
    check_exposure,
    create_admin_app,
    openapi_document,
)
from relay.api.app import READ_TIMEOUT_S, SHUTDOWN_GRACE_S, STORE_WAIT_S
from relay.api.body import MAX_BODY_BYTES
from relay.api.responses import JsonObject
from relay.api.status import RelayView
from relay.ctct.breaker import KeyBreaker
from relay.events import Activity, Kind, from_millis
from relay.logs import REDACTED, Redactor
from relay.metrics import FANOUT_CURSOR, STORE_TIMEOUT_S, Metrics
from relay.sinks.ssrf import Guard
from relay.store import (
    CorruptError,
    PostgresStore,
    Store,
    StoreError,
    StreamKey,
    UnavailableError,
    open_store,
)
from relay.store.pgurl import describe_url
from relay.store.postgres import PostgresSettings
from tests import pgkit
from tests.api.conftest import AUTH, PUBLIC_URL, TOKEN, Client, ClientFactory, error_of
from tests.sqlitekit import damage_middle, filled_state


@dataclass
class _Limiter:
    """A rate limiter's counters, as the scrape reads them."""

    used_today: int = 120
    remaining_today: int = 8880
    waited_s: float = 0.0
    waits: int = 0
    breaker: KeyBreaker = field(default_factory=KeyBreaker)


@pytest.mark.parametrize(
    "host",
    [
        pytest.param("0.0.0.0", id="all-ipv4"),
        pytest.param("::", id="all-ipv6"),
        pytest.param("", id="empty"),
        pytest.param("10.1.2.3", id="private"),
        pytest.param("admin.example.com", id="name"),
    ],
)
def test_exposure_needs_a_token_off_loopback(host: str) -> None:
    """Without a token, a non-loopback listen address is refused with a message naming the key."""
    with pytest.raises(AdminConfigError, match=r"^admin\.token: required when admin\.host"):
        check_exposure(AdminSettings(host=host))


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "::1", "[::1]", "localhost"])
def test_exposure_allows_loopback_without_token(host: str) -> None:
    """Loopback addresses may serve the API without a token."""
    check_exposure(AdminSettings(host=host))


def test_exposure_with_token_anywhere() -> None:
    """A token makes any listen address acceptable."""
    check_exposure(AdminSettings(host="0.0.0.0", token=TOKEN))


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        pytest.param(AdminSettings(token=""), "admin.token", id="empty-token"),
        pytest.param(AdminSettings(token="a b"), "admin.token", id="space-in-token"),
        pytest.param(AdminSettings(port=70000), "admin.port", id="port"),
        pytest.param(AdminSettings(rotation_grace_s=-1), "admin.rotation_grace_s", id="grace"),
    ],
)
def test_exposure_refuses_unusable_settings(settings: AdminSettings, key: str) -> None:
    """Settings that cannot work are refused naming the key, never echoing the token."""
    with pytest.raises(AdminConfigError, match=rf"^{key}:") as caught:
        check_exposure(settings)
    assert "a b" not in str(caught.value)


def test_a_short_token_is_refused_without_showing_it() -> None:
    """Tokens shorter than 16 characters are guessable, and too short to scrub from logs."""
    with pytest.raises(AdminConfigError, match=r"^admin\.token: must be at least 16") as refused:
        check_exposure(AdminSettings(host="0.0.0.0", token="abc123"))
    assert "abc123" not in str(refused.value)
    check_exposure(AdminSettings(host="0.0.0.0", token="0123456789abcdef"))


def test_settings_repr_hides_the_token() -> None:
    """The token never shows in a repr (and so in logs of the settings)."""
    assert TOKEN not in repr(AdminSettings(token=TOKEN))


async def test_factory_refuses_unsafe_exposure(store: Store) -> None:
    """The factory itself refuses an open API on all interfaces."""
    with pytest.raises(AdminConfigError):
        create_admin_app(store, AdminSettings(host="0.0.0.0"), guard=Guard())


async def test_health_ready_and_openapi_are_open(client: Client) -> None:
    """/healthz, /readyz and /openapi.json answer without a token."""
    health = await client.get("/healthz")
    assert health.status == 200
    assert await health.json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status == 200
    assert await ready.json() == {"status": "ready"}
    doc = await client.get("/openapi.json")
    assert doc.status == 200
    assert (await doc.json())["openapi"] == "3.1.0"


async def test_head_on_the_open_routes_answers_as_get_does(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    """Load balancers and uptime checks probe with HEAD: /healthz, /readyz and /openapi.json
    answer it with GET's status and headers and no body (it was a 405), /readyz a 503 too
    while the store is gone; the document lists HEAD there."""
    own = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await own.open()
    client = await aiohttp_client(create_admin_app(own, AdminSettings(), guard=Guard()))
    for path in ("/healthz", "/readyz", "/openapi.json"):
        got, head = await client.get(path), await client.head(path)
        assert head.status == got.status == 200, path
        assert head.headers["Content-Type"] == got.headers["Content-Type"], path
        assert await head.read() == b"", path
    paths = (await (await client.get("/openapi.json")).json())["paths"]
    assert all("head" in paths[p] for p in ("/healthz", "/readyz", "/openapi.json"))
    await own.close()
    assert (await client.head("/readyz")).status == 503


async def test_readyz_is_503_when_the_store_is_gone(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    """A closed store makes /readyz answer 503 with a JSON error; liveness stays 200."""
    own = open_store(f"sqlite:///{tmp_path / 'gone.db'}")
    await own.open()
    client = await aiohttp_client(create_admin_app(own, AdminSettings(), guard=Guard()))
    await own.close()
    with capture_logs() as logs:
        error = await error_of(await client.get("/readyz"), 503)
    assert error["code"] == "unavailable"
    assert "gone.db" not in error["message"]  # unauthenticated: no file names
    assert any(e["event"] == "api.not_ready" for e in logs)
    assert (await client.get("/healthz")).status == 200


async def test_readyz_is_503_once_the_store_is_found_corrupt(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    """A store found corrupt by any call makes /readyz answer 503 saying so, though the page
    the probe reads is intact (it stayed ready while every pass failed); no file name."""
    db = tmp_path / "state.db"
    await filled_state(db)
    damage_middle(db)
    own = open_store(f"sqlite:///{db}")
    await own.open()
    try:
        client = await aiohttp_client(create_admin_app(own, AdminSettings(), guard=Guard()))
        assert (await client.get("/readyz")).status == 200  # not found yet
        with pytest.raises(CorruptError):
            await own.read_outbox(0, 10_000)
        with capture_logs() as logs:
            error = await error_of(await client.get("/readyz"), 503)
    finally:
        await own.close()
    assert error == {
        "code": "unavailable",
        "message": "the state store is corrupt; see the relay log",
    }
    assert any(e["event"] == "api.not_ready" for e in logs)


async def test_readyz_is_503_once_postgresql_reports_damage(
    aiohttp_client: AiohttpClient, postgres_url: str
) -> None:
    """A PostgreSQL store whose server reports a damaged page (SQLSTATE XX001) makes /readyz
    answer 503 saying the store is corrupt (it stayed ready while every pass failed on it); no
    host, no password."""
    own = open_store(postgres_url)
    await own.open()
    try:
        assert isinstance(own, PostgresStore)
        client = await aiohttp_client(create_admin_app(own, AdminSettings(), guard=Guard()))
        await own.ensure_streams([StreamKey("acme", "campaign", "1")], 0)
        [stream] = await own.streams()
        activity = Activity(
            account="acme",
            kind=Kind.OPEN,
            campaign_id="1100394165290",
            contact_id="1",
            email_address="c1@example.com",
            occurred_at=from_millis(1_763_000_000_000),
        )
        await own.transaction(lambda conn: pgkit.damage_on_insert(conn, "outbox", "XX001"))
        assert (await client.get("/readyz")).status == 200  # not found yet
        with pytest.raises(CorruptError):
            await own.commit_page(stream.id, [activity], 0)
        error = await error_of(await client.get("/readyz"), 503)
    finally:
        await own.close()
    assert error == {
        "code": "unavailable",
        "message": "the state store is corrupt; see the relay log",
    }


@pytest.mark.parametrize(
    ("failure", "message"),
    [
        pytest.param(
            UnavailableError(
                "state store (PostgreSQL at db:5432/relay): query failed for 60s:"
                " ConnectionRefusedError: [Errno 111] Connect call failed"
            ),
            "state store (PostgreSQL at db:5432/relay): query failed for 60s:"
            " ConnectionRefusedError: [Errno 111] Connect call failed",
            id="unavailable",
        ),
        pytest.param(
            StoreError("disk I/O error near hunter2-store-pw"),
            f"state store: disk I/O error near {REDACTED}",
            id="other-redacted",
        ),
    ],
)
async def test_a_failing_store_is_a_503_naming_it_not_a_crash(
    make_client: ClientFactory, failure: StoreError, message: str
) -> None:
    """A store that fails makes /v1 answer 503 `unavailable` naming the store problem (configured
    secrets redacted), logged as a warning without a traceback, not as a 500 crash."""

    async def failing_status() -> JsonObject:
        raise failure

    view = RelayView(redact=Redactor(["hunter2-store-pw"]).text)
    client = await make_client(status=failing_status, view=view)
    with capture_logs() as logs:
        error = await error_of(await client.get("/v1/status", headers=AUTH), 503)
    assert error == {"code": "unavailable", "message": message}
    assert not [e for e in logs if e["event"] == "api.unhandled"]
    logged = [e for e in logs if e["event"] == "api.store_error"]
    assert [e["path"] for e in logged] == ["/v1/status"]
    assert "exc_info" not in logged[0]
    assert "hunter2" not in repr(logs)


async def _timed(call: Awaitable[ClientResponse]) -> tuple[float, int, str]:
    started = time.monotonic()
    response = await call
    text = await response.text()
    return time.monotonic() - started, response.status, text


PASSWORD = "pw-S3cret-77"


@dataclass
class _OwnServer:
    """A PostgreSQL server of the test's own (to stop and start) and a store on it, opened with
    PASSWORD in its URL (``url`` is that URL without it)."""

    cluster: pgkit.Cluster
    url: str
    store: PostgresStore


@pytest.fixture
async def own_server() -> AsyncIterator[_OwnServer]:
    """A store on a server of its own that retries every call for 60 s
    (postgres.reconnect_max_s): an outage is the test's to start."""
    cluster = pgkit.Cluster().start()
    try:
        url = pgkit.fresh_database(cluster.url)
        with_password = url.replace("://postgres@", f"://postgres:{PASSWORD}@")
        assert with_password != url
        store = PostgresStore(with_password, PostgresSettings(reconnect_max_s=60))
        await store.open()
        try:
            yield _OwnServer(cluster, url, store)
        finally:
            await store.close()
    finally:
        cluster.destroy()


def _unavailable(body: str, url: str) -> str:
    """The message of the "unavailable" error in ``body``, which names the PostgreSQL server at
    ``url`` and never its password."""
    error = orjson.loads(body)["error"]
    assert error["code"] == "unavailable"
    assert error["message"].startswith(f"state store (PostgreSQL at {describe_url(url)}): ")
    assert PASSWORD not in error["message"]
    return str(error["message"])


async def test_a_postgresql_outage_is_a_prompt_503_and_metrics_say_store_down(
    aiohttp_client: AiohttpClient, own_server: _OwnServer
) -> None:
    """PostgreSQL down (every call retried for postgres.reconnect_max_s, 60 s): a GET /v1/...
    answers 503 within READ_TIMEOUT_S naming the server (never the URL's password), and
    /metrics within its store bound, with ctct_relay_store_up 0 and the process's own quota
    gauges (Prometheus gives up after 10 s; they used to hang for the whole minute)."""
    metrics = Metrics()
    metrics.watch_store(own_server.store, [FANOUT_CURSOR])
    metrics.watch_limiter("acme", _Limiter(), "key:0123456789ab")
    settings = AdminSettings(token=TOKEN)
    client = await aiohttp_client(
        create_admin_app(own_server.store, settings, guard=Guard(), metrics=metrics)
    )
    assert (await client.get("/v1/status", headers=AUTH)).status == 200
    assert "ctct_relay_store_up 1.0" in await (await client.get("/metrics")).text()
    own_server.cluster.stop()
    with capture_logs() as logs:
        (status_s, status, body), (metrics_s, metrics_status, text) = await asyncio.gather(
            _timed(client.get("/v1/status", headers=AUTH)), _timed(client.get("/metrics"))
        )
    assert status == 503, body
    assert status_s < READ_TIMEOUT_S + 3
    _unavailable(body, own_server.url)
    assert metrics_status == 200
    assert STORE_TIMEOUT_S - 1 < metrics_s < STORE_TIMEOUT_S + 3
    assert "ctct_relay_store_up 0.0" in text
    assert 'ctct_relay_quota_used_requests{account="acme",budget="key:0123456789ab"} 120.0' in text
    assert not [e for e in logs if e["event"] == "api.unhandled"]
    assert {e["path"] for e in logs if e["event"] == "api.store_error"} == {"/v1/status"}
    assert PASSWORD not in repr(logs)


async def test_a_change_during_an_outage_is_a_prompt_503_and_never_applied_later(
    aiohttp_client: AiohttpClient, own_server: _OwnServer
) -> None:
    """PostgreSQL down: POST /v1/webhooks answers 503 within STORE_WAIT_S (not after
    postgres.reconnect_max_s, longer than the CLI's 30 s --timeout), naming the server and
    saying nothing was changed; once the server is back the webhook does not appear by itself
    (no attempt outlives the 503), and the same request then succeeds."""
    hook = {"url": PUBLIC_URL, "event_types": ["com.constantcontact.email.click"]}
    client = await aiohttp_client(
        create_admin_app(own_server.store, AdminSettings(token=TOKEN), guard=Guard())
    )
    assert (await client.get("/v1/webhooks", headers=AUTH)).status == 200
    own_server.cluster.stop()
    with capture_logs() as logs:
        write_s, write_status, write_body = await _timed(
            client.post("/v1/webhooks", json=hook, headers=AUTH)
        )
    own_server.cluster.start()
    await asyncio.sleep(3)  # an attempt left running would commit now
    listed = await client.get("/v1/webhooks", headers=AUTH)
    assert listed.status == 200
    assert (await listed.json())["webhooks"] == []
    assert (await client.post("/v1/webhooks", json=hook, headers=AUTH)).status == 201
    assert write_status == 503, write_body
    assert write_s < STORE_WAIT_S + 3
    assert _unavailable(write_body, own_server.url).endswith(
        "; nothing was changed: repeat the request when the store answers again"
    )
    assert PASSWORD not in repr(logs)
    assert [e["path"] for e in logs if e["event"] == "api.store_error"] == ["/v1/webhooks"]


async def test_missing_token_is_401_with_challenge(client: Client) -> None:
    """Without Authorization every /v1 route answers 401 with WWW-Authenticate: Bearer."""
    response = await client.get("/v1/webhooks")
    error = await error_of(response, 401)
    assert error["code"] == "unauthorized"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "header",
    [
        pytest.param("Bearer wrong-token", id="wrong"),
        pytest.param(f"Basic {TOKEN}", id="wrong-scheme"),
        pytest.param(f"Bearer {TOKEN}x", id="longer"),
        pytest.param("Bearer", id="empty"),
        pytest.param("Bearer t\u00e9st", id="non-ascii"),
    ],
)
async def test_wrong_token_is_401(client: Client, header: str) -> None:
    """A wrong token, scheme or shape is refused with invalid_token, never a 5xx."""
    response = await client.get("/v1/webhooks", headers={"Authorization": header})
    await error_of(response, 401)
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]


async def test_right_token_is_accepted_case_insensitive_scheme(client: Client) -> None:
    """The bearer scheme name is case-insensitive; the token is exact."""
    response = await client.get("/v1/webhooks", headers={"Authorization": f"bearer {TOKEN}"})
    assert response.status == 200
    assert await response.json() == {"webhooks": []}


async def test_unknown_paths_need_the_token_too(client: Client) -> None:
    """Probing unknown paths without a token reveals nothing: 401, not 404."""
    await error_of(await client.get("/v1/nothing-here"), 401)
    await error_of(await client.get("/admin"), 401)


async def test_loopback_without_token_is_open(make_client: ClientFactory) -> None:
    """With no token configured (loopback), /v1 routes need no Authorization."""
    client = await make_client(AdminSettings(host="127.0.0.1", token=None))
    response = await client.get("/v1/webhooks")
    assert response.status == 200


async def test_unknown_route_is_json_404(client: Client) -> None:
    """An unknown route is a JSON 404."""
    error = await error_of(await client.get("/v1/nothing-here", headers=AUTH), 404)
    assert error["code"] == "not_found"


async def test_wrong_method_is_json_405_with_allow(client: Client) -> None:
    """A known path with a wrong method is a JSON 405 listing the allowed methods."""
    response = await client.put("/v1/webhooks", headers=AUTH)
    error = await error_of(response, 405)
    assert error["code"] == "method_not_allowed"
    assert set(response.headers["Allow"].split(", ")) == {"GET", "POST"}


async def test_oversized_body_is_json_413(client: Client) -> None:
    """A body over the cap is refused with 413 before it is parsed."""
    big = b'{"url": "' + b"a" * MAX_BODY_BYTES + b'"}'
    response = await client.post("/v1/webhooks", data=big, headers=AUTH)
    error = await error_of(response, 413)
    assert error["message"].startswith("body:")


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        pytest.param(b"{not json", "body: not valid JSON", id="malformed"),
        pytest.param(b"", "body: not valid JSON", id="empty"),
        pytest.param(b"[1, 2]", "body: expected a JSON object, got an array", id="array"),
        pytest.param(b"null", "body: expected a JSON object, got null", id="null"),
        pytest.param(b'"\xff"', "body: not valid JSON", id="bad-utf8"),
    ],
)
async def test_invalid_json_is_400(client: Client, data: bytes, needle: str) -> None:
    """Bodies that are not a JSON object are a 400 saying so."""
    headers = {**AUTH, "Content-Type": "application/json"}
    error = await error_of(await client.post("/v1/webhooks", data=data, headers=headers), 400)
    assert error["code"] == "invalid_request"
    assert error["message"].startswith(needle)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_body_that_does_not_decode_as_its_content_encoding_is_400(
    client: Client, store: Store, encoding: str
) -> None:
    """aiohttp decodes a Content-Encoding as the body is read: one that does not decode is a
    400 naming the problem, not a 500 with a logged traceback; a body that decodes is read."""
    await store.ensure_streams([StreamKey("acme", "campaign", "1")], 0)
    stream = (await store.streams())[0]
    headers = {**AUTH, "Content-Type": "application/json", "Content-Encoding": encoding}
    path = f"/v1/streams/{stream.id}/pause"
    with capture_logs() as logs:
        response = await client.post(path, data=b"not compressed", headers=headers)
        error = await error_of(response, 400)
    assert error["code"] == "invalid_request"
    assert error["message"] == (
        f"body: cannot be read as sent: Can not decode content-encoding: {encoding}"
    )
    assert not [e for e in logs if e["log_level"] == "error"], logs
    assert not (await store.streams())[0].paused
    packed = gzip.compress(b"{}") if encoding == "gzip" else zlib.compress(b"{}")
    response = await client.post(path, data=packed, headers=headers)
    assert response.status == 200, await response.text()
    assert (await store.streams())[0].paused


async def _half_a_pause(
    store: Store, runner_for: Callable[[web.Application], web.AppRunner]
) -> tuple[web.AppRunner, asyncio.StreamWriter]:
    """The admin app on ``store`` served by ``runner_for(app)`` on a free port, and a connection
    that sent it the head of a POST pausing a new stream with 1 byte of its 100-byte body: the
    handler is reading the body. The caller cleans up the runner."""
    await store.ensure_streams([StreamKey("acme", "campaign", "1")], 0)
    stream = (await store.streams())[0]
    runner = runner_for(create_admin_app(store, AdminSettings(token=TOKEN), guard=Guard()))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    head = (
        f"POST /v1/streams/{stream.id}/pause HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
        "Content-Length: 100\r\n\r\n{"
    )
    _, writer = await asyncio.open_connection("127.0.0.1", runner.addresses[0][1])
    writer.write(head.encode())
    await writer.drain()
    await asyncio.sleep(0.1)  # the handler is reading the body
    return runner, writer


async def test_a_client_leaving_mid_body_is_no_crash_in_the_log(store: Store) -> None:
    """A client that closes the connection before its whole body arrived: nothing of ours
    failed, so no "api.unhandled" error with a traceback is logged, and nothing changes. (On
    the app as the relay serves it: the test client's server cancels the handler instead.)"""
    with capture_logs() as logs:
        runner, writer = await _half_a_pause(store, web.AppRunner)
        try:
            writer.close()
            await writer.wait_closed()
            await asyncio.sleep(0.2)  # the read fails as the connection is lost
        finally:
            await runner.cleanup()
    assert not [e for e in logs if e["log_level"] == "error"], logs
    assert not (await store.streams())[0].paused


async def test_a_request_held_open_cannot_hold_the_stop(store: Store) -> None:
    """A stop cancels admin requests still in progress after SHUTDOWN_GRACE_S: a client that
    sends half a body and waits held the relay's stop for aiohttp's default 60 s, past the
    40 s a stopping container gets."""
    runner, writer = await _half_a_pause(store, admin_runner)  # the body never comes
    try:
        started = time.monotonic()
        await asyncio.wait_for(runner.cleanup(), SHUTDOWN_GRACE_S + 10)
        assert time.monotonic() - started < SHUTDOWN_GRACE_S + 2
    finally:
        writer.close()
    assert not (await store.streams())[0].paused


async def test_unexpected_exception_is_logged_json_500(make_client: ClientFactory) -> None:
    """A bug behind a route is a JSON 500 and a logged traceback, with no detail on the wire."""

    async def broken_status() -> JsonObject:
        raise RuntimeError("kaput whsec_c2VjcmV0LXRoYXQtbXVzdC1ub3QtbGVhaw==")

    client = await make_client(status=broken_status)
    with capture_logs() as logs:
        error = await error_of(await client.get("/v1/status", headers=AUTH), 500)
    assert error["code"] == "internal"
    assert "kaput" not in error["message"]
    logged = [e for e in logs if e["event"] == "api.unhandled"]
    assert logged
    assert logged[0]["path"] == "/v1/status"


async def test_a_500_names_the_request_id_of_its_log_lines(make_client: ClientFactory) -> None:
    """A 500's message and its X-Request-Id header carry the request_id its traceback was
    logged with (the message said only "the relay log has the details": which of them was
    left to timestamps)."""

    async def broken_status() -> JsonObject:
        raise RuntimeError("kaput")

    client = await make_client(status=broken_status)
    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    response = await client.get("/v1/status", headers=AUTH)
    error = await error_of(response, 500)
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    (crash,) = [line for line in lines if line["event"] == "api.unhandled"]
    assert response.headers["X-Request-Id"] == crash["request_id"]
    assert f"request_id {crash['request_id']}" in error["message"]
    ok = await client.get("/healthz")
    assert len(ok.headers["X-Request-Id"]) == 12


async def test_status_route_serves_the_callable(make_client: ClientFactory) -> None:
    """The optional status callable is served at /v1/status and documented only then."""

    async def status() -> JsonObject:
        return {"streams": 3}

    client = await make_client(status=status)
    response = await client.get("/v1/status", headers=AUTH)
    assert await response.json() == {"streams": 3}
    assert "/v1/status" in (await (await client.get("/openapi.json")).json())["paths"]


async def test_builtin_status_without_callable(client: Client) -> None:
    """Without a status callable /v1/status is built from the store, and documented."""
    response = await client.get("/v1/status", headers=AUTH)
    assert response.status == 200
    assert set(await response.json()) == {"time", "accounts", "outbox", "sinks", "webhooks"}
    assert "/v1/status" in (await (await client.get("/openapi.json")).json())["paths"]


async def test_secrets_never_logged(client: Client) -> None:
    """Creating and rotating a webhook logs neither secret nor token nor URL path."""
    with capture_logs() as logs:
        created = await client.post(
            "/v1/webhooks",
            json={"url": PUBLIC_URL, "event_types": ["com.constantcontact.email.*"]},
            headers=AUTH,
        )
        hook = await created.json()
        rotated = await client.post(f"/v1/webhooks/{hook['id']}/rotate-secret", headers=AUTH)
        new_secret = (await rotated.json())["secret"]
        await client.get("/v1/webhooks", headers={"Authorization": "Bearer nope"})
    text = repr(logs)
    for secret in (hook["secret"], new_secret, TOKEN, "/hook"):
        assert secret not in text
    assert any(e["event"] == "webhook.created" for e in logs)


def test_openapi_states_the_time_range_of_every_since_in_a_request_body() -> None:
    """Every request body's since (replays, webhook recover) says which times the API takes:
    a schema-valid date-time outside the years 1..9999 in UTC is a documented 400."""
    schemas = openapi_document()["components"]["schemas"]
    assert isinstance(schemas, dict)
    for name in ("Recover", "StreamReplay", "AccountReplay"):
        since = schemas[name]["properties"]["since"]
        assert since["format"] == "date-time"
        assert "the years 1 to 9999 in UTC" in since["description"], name
    for name in ("StreamReplay", "AccountReplay"):  # replay.parse refuses earlier times
        assert "1970-01-01T00:00:00Z on" in schemas[name]["properties"]["since"]["description"]


def test_the_documented_secret_pattern_is_the_one_the_api_enforces() -> None:
    """whsec_ + base64 of 24 to 64 bytes, every length in between and none outside (the document
    used to accept 22, 23, 65 and 66 bytes, which the API refuses)."""
    import base64
    import re

    from relay.sinks import signing

    schemas = openapi_document()["components"]["schemas"]  # type: ignore[index]
    pattern = re.compile(schemas["WebhookCreate"]["properties"]["secret"]["pattern"])
    for size in range(16, 73):
        secret = "whsec_" + base64.b64encode(bytes(range(size))).decode()
        try:
            signing.secret_key(secret)
            accepted = True
        except signing.SecretError:
            accepted = False
        assert bool(pattern.fullmatch(secret)) == accepted == (24 <= size <= 64), size
