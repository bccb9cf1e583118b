"""Admin API fixtures: a real SQLite store in tmp_path and the app on a real aiohttp test server."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient
from aiohttp.web import Application, Request
from pytest_aiohttp import AiohttpClient

from relay.api import AdminSettings, create_admin_app
from relay.api.responses import JsonObject
from relay.api.status import RelayView
from relay.events import Activity, Kind, from_millis
from relay.sinks.ssrf import Guard
from relay.store import Store, StreamKey

TOKEN = "test-admin-token-5f2c9a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
T0 = 1_763_700_000_000
PUBLIC_URL = "https://93.184.216.34/hook"  # a public literal: registration never connects
KEY = StreamKey("acme", "campaign", "1100394165290")

Client = TestClient[Request, Application]
ClientFactory = Callable[..., Awaitable[Client]]


@dataclass
class Clock:
    """A settable clock in Unix ms, so times in answers are exact."""

    now: int = T0

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock() -> Clock:
    """The app's clock."""
    return Clock()


@pytest.fixture
def make_client(
    aiohttp_client: AiohttpClient,
    store: Store,
    clock: Clock,
) -> ClientFactory:
    """Start the admin app on a real port with given settings; returns its test client."""

    async def make(
        settings: AdminSettings | None = None,
        guard: Guard | None = None,
        status: Callable[[], Awaitable[JsonObject]] | None = None,
        view: RelayView | None = None,
    ) -> Client:
        app = create_admin_app(
            store,
            settings or AdminSettings(token=TOKEN),
            guard=guard or Guard(),
            now_ms=clock,
            status=status,
            view=view,
        )
        return await aiohttp_client(app)

    return make


@pytest.fixture
async def client(make_client: ClientFactory) -> Client:
    """The app with a token and a guard without allowlist."""
    return await make_client()


def activity(contact: int, ms: int, kind: Kind = Kind.CLICK) -> Activity:
    """One tracking activity of the test account."""
    return Activity(
        account="acme",
        kind=kind,
        campaign_id="1100394165290",
        contact_id=str(contact),
        email_address=f"c{contact}@example.com",
        occurred_at=from_millis(ms),
        link_id="1" if kind is Kind.CLICK else None,
    )


async def commit_events(store: Store, activities: list[Activity], now_ms: int) -> None:
    """Commit one page of events and fan them out to the webhooks."""
    await store.ensure_streams([KEY], now_ms)
    stream_id = (await store.streams())[0].id
    await store.commit_page(stream_id, activities, now_ms)
    await store.fanout(1000, now_ms)


async def error_of(response: ClientResponse, status: int) -> dict[str, str]:
    """The ``error`` object of a JSON error response with the expected status."""
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"code", "message"}
    assert all(isinstance(v, str) and v for v in error.values())
    return {"code": error["code"], "message": error["message"]}


def foreign_app(status: int, body: bytes = b"", location: str | None = None) -> web.Application:
    """A server that is not the admin API: every request gets ``status`` (a proxy, an ingress
    redirecting http to https, another service on the port)."""

    async def answer(request: web.Request) -> web.Response:
        headers = {"Location": location} if location else {}
        return web.Response(status=status, body=body, headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app
