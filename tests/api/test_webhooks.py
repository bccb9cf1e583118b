"""Webhook routes against a real store: CRUD, validation, SSRF, rotation, deliveries, recovery."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import re
import time
from typing import Any

import pytest
from aiohttp import ClientResponse
from pytest_aiohttp import AiohttpClient
from standardwebhooks.webhooks import Webhook as Verifier

from relay.api import AdminSettings, create_admin_app, service
from relay.api.status import RelayView
from relay.events import WILDCARD, Kind
from relay.logs import Redactor
from relay.sinks import signing
from relay.sinks.ssrf import Guard
from relay.store import Attempt, Store, Webhook
from tests.api.conftest import (
    AUTH,
    KEY,
    PUBLIC_URL,
    T0,
    TOKEN,
    Client,
    ClientFactory,
    Clock,
    activity,
    commit_events,
    error_of,
)

CLICK = "com.constantcontact.email.click"
OPEN = "com.constantcontact.email.open"
WEBHOOK_FIELDS = {
    "id",
    "url",
    "event_types",
    "description",
    "enabled",
    "rate_limit_per_s",
    "disabled_reason",
    "failing_since",
    "previous_secret_expires_at",
    "created_at",
    "updated_at",
}


async def create(client: Client, **fields: object) -> dict[str, Any]:
    """Register a webhook (public literal URL, clicks by default) and return the 201 body."""
    body = {"url": PUBLIC_URL, "event_types": [CLICK], **fields}
    response = await client.post("/v1/webhooks", json=body, headers=AUTH)
    assert response.status == 201, await response.text()
    created: dict[str, Any] = await response.json()
    return created


async def ok(response: ClientResponse, status: int = 200) -> dict[str, Any]:
    """The JSON body of a successful response."""
    assert response.status == status, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def test_create_returns_the_webhook_with_its_secret(client: Client, store: Store) -> None:
    """POST registers a webhook: 201, wh_ id, generated secret, times in RFC 3339 UTC ms."""
    hook = await create(client, description="CRM", rate_limit_per_s=5)
    assert set(hook) == WEBHOOK_FIELDS | {"secret"}
    assert re.fullmatch(r"wh_[0-9a-f]{16}", str(hook["id"]))
    assert hook["url"] == PUBLIC_URL
    assert hook["event_types"] == [CLICK]
    assert hook["description"] == "CRM"
    assert hook["enabled"] is True
    assert hook["rate_limit_per_s"] == 5.0
    assert hook["disabled_reason"] is None
    assert hook["created_at"] == "2025-11-21T04:40:00.000Z"
    signing.secret_key(str(hook["secret"]))
    stored = await store.webhook(str(hook["id"]))
    assert stored.secret == hook["secret"]


async def test_create_with_own_secret_and_disabled(client: Client) -> None:
    """A supplied valid secret is kept; enabled=false registers it disabled with a reason."""
    secret = signing.generate_secret()
    hook = await create(client, secret=secret, enabled=False, event_types=[WILDCARD])
    assert hook["secret"] == secret
    assert hook["enabled"] is False
    assert hook["disabled_reason"] == "disabled through the admin API"


async def test_secret_never_returned_by_reads(client: Client) -> None:
    """GET, list and PATCH never show the secret."""
    hook = await create(client)
    path = f"/v1/webhooks/{hook['id']}"
    shown = await ok(await client.get(path, headers=AUTH))
    assert set(shown) == WEBHOOK_FIELDS
    listed = await ok(await client.get("/v1/webhooks", headers=AUTH))
    assert listed == {"webhooks": [shown]}
    patched = await ok(await client.patch(path, json={"description": "x"}, headers=AUTH))
    assert "secret" not in patched
    assert str(hook["secret"]) not in repr([shown, listed, patched])


async def test_list_in_creation_order(client: Client, clock: Clock) -> None:
    """The list holds every webhook, oldest first."""
    first = await create(client)
    clock.now += 1000
    second = await create(client, url="https://93.184.216.35/other")
    listed = await ok(await client.get("/v1/webhooks", headers=AUTH))
    assert [h["id"] for h in listed["webhooks"]] == [first["id"], second["id"]]


async def test_registrations_beyond_max_webhooks_are_409(
    aiohttp_client: AiohttpClient, any_store: Store
) -> None:
    """With max_webhooks 3, six concurrent registrations make exactly three webhooks (the
    count is taken in the registering transaction, on PostgreSQL too); the others are 409s
    with code webhook_limit naming the limit and the config key, disabled webhooks count, and
    removing one makes room for one."""
    settings = AdminSettings(token=TOKEN, max_webhooks=3)
    client = await aiohttp_client(
        create_admin_app(any_store, settings, guard=Guard(), now_ms=Clock())
    )
    bodies = [
        {"url": f"https://93.184.216.{n}/hook", "event_types": [CLICK], "enabled": n % 2 == 0}
        for n in range(40, 46)
    ]
    answers = await asyncio.gather(
        *(client.post("/v1/webhooks", json=b, headers=AUTH) for b in bodies)
    )
    assert sorted(a.status for a in answers) == [201] * 3 + [409] * 3
    refused = [a for a in answers if a.status == 409]
    for answer in refused:
        assert await error_of(answer, 409) == {
            "code": "webhook_limit",
            "message": "webhooks: 3 are registered, the most allowed (webhooks.max_webhooks);"
            " delete one or raise the limit",
        }
    assert len(await any_store.webhooks()) == 3
    victim = (await any_store.webhooks())[0].id
    assert (await client.delete(f"/v1/webhooks/{victim}", headers=AUTH)).status == 204
    await ok(
        await client.post("/v1/webhooks", json=bodies[0] | {"url": PUBLIC_URL}, headers=AUTH), 201
    )
    spec = await client.get("/openapi.json")
    codes = (await spec.json())["components"]["schemas"]["Error"]["properties"]["error"]
    assert "webhook_limit" in codes["properties"]["code"]["enum"]


async def test_duplicate_url_is_409(client: Client) -> None:
    """A second webhook for the same URL is a conflict naming the existing one."""
    hook = await create(client)
    response = await client.post(
        "/v1/webhooks", json={"url": PUBLIC_URL, "event_types": [OPEN]}, headers=AUTH
    )
    error = await error_of(response, 409)
    assert error["message"] == f"url: already registered as webhook {hook['id']}"


@pytest.mark.parametrize(
    ("first", "stored", "again"),
    [
        pytest.param(
            "HTTPS://93.184.216.34:443/hook",
            "https://93.184.216.34/hook",
            "https://93.184.216.34/hook",
            id="scheme-port",
        ),
        pytest.param(
            "http://LocalHost/hook", "http://localhost/hook", "http://localhost:80/hook", id="host"
        ),
        pytest.param(
            "https://[2606:4700::ABCD]/hook",
            "https://[2606:4700::abcd]/hook",
            "https://[2606:4700::abcd]:443/hook",
            id="ipv6",
        ),
    ],
)
async def test_one_endpoint_spelled_two_ways_is_one_webhook(
    make_client: ClientFactory, first: str, stored: str, again: str
) -> None:
    """Scheme and host case and the scheme's default port do not make another webhook: the URL
    is stored with them normalised, path and query as written, and the second spelling is a 409,
    by POST or by PATCH."""
    client = await make_client(guard=Guard.from_strings(["127.0.0.0/8"]))
    hook = await create(client, url=first)
    assert hook["url"] == stored
    response = await client.post(
        "/v1/webhooks", json={"url": again, "event_types": [OPEN]}, headers=AUTH
    )
    error = await error_of(response, 409)
    assert error["message"] == f"url: already registered as webhook {hook['id']}"
    other = await create(client, url="https://93.184.216.35/other")
    response = await client.patch(f"/v1/webhooks/{other['id']}", json={"url": again}, headers=AUTH)
    assert (await error_of(response, 409))["message"].endswith(hook["id"])


async def test_path_and_query_keep_their_case(client: Client) -> None:
    """Only scheme, host and default port are normalised: the endpoint interprets the rest."""
    hook = await create(client, url="HTTPS://93.184.216.34:8443/Hooks/CTCT?Token=AbC#Frag")
    assert hook["url"] == "https://93.184.216.34:8443/Hooks/CTCT?Token=AbC#Frag"


async def test_a_url_stored_before_normalising_still_holds_its_endpoint(
    make_client: ClientFactory, store: Store
) -> None:
    """A webhook stored with an unnormalised URL (registered by an older relay) still makes
    another spelling of its endpoint a 409, by POST or by PATCH; PATCHing itself to the
    normalised spelling is allowed."""
    legacy = await store.create_webhook(
        Webhook(id="wh_legacy", url="http://LOCALHOST:80/hook", event_types=(CLICK,), secret="s")
    )
    client = await make_client(guard=Guard.from_strings(["127.0.0.0/8"]))
    response = await client.post(
        "/v1/webhooks", json={"url": "http://localhost/hook", "event_types": [OPEN]}, headers=AUTH
    )
    error = await error_of(response, 409)
    assert error["message"] == f"url: already registered as webhook {legacy.id}"
    other = await create(client, url="https://93.184.216.35/other")
    response = await client.patch(
        f"/v1/webhooks/{other['id']}", json={"url": "http://localhost:80/hook"}, headers=AUTH
    )
    assert (await error_of(response, 409))["message"].endswith(legacy.id)
    moved = await ok(
        await client.patch(
            f"/v1/webhooks/{legacy.id}", json={"url": "http://Localhost/hook"}, headers=AUTH
        )
    )
    assert moved["url"] == "http://localhost/hook"


async def test_concurrent_registrations_of_one_url_make_one_webhook(client: Client) -> None:
    """Ten simultaneous POSTs of one URL: one 201, nine 409 with JSON errors (the store's unique
    index decides, not a lookup that all ten could pass before any inserts)."""
    body = {"url": PUBLIC_URL, "event_types": [OPEN]}
    responses = await asyncio.gather(
        *(client.post("/v1/webhooks", json=body, headers=AUTH) for _ in range(10))
    )
    assert sorted(r.status for r in responses) == [201] + [409] * 9
    created = next(r for r in responses if r.status == 201)
    hook_id = (await created.json())["id"]
    for response in responses:
        if response.status == 409:
            error = await error_of(response, 409)
            assert error == {
                "code": "conflict",
                "message": f"url: already registered as webhook {hook_id}",
            }
    listed = await ok(await client.get("/v1/webhooks", headers=AUTH))
    assert [h["id"] for h in listed["webhooks"]] == [hook_id]


async def test_patch_to_a_taken_url_is_409_and_changes_nothing(client: Client) -> None:
    """Moving a webhook to another's URL is a conflict; the webhook keeps its own URL."""
    first = await create(client)
    second = await create(client, url="https://93.184.216.35/other", description="second")
    response = await client.patch(
        f"/v1/webhooks/{second['id']}",
        json={"url": PUBLIC_URL, "description": "moved"},
        headers=AUTH,
    )
    error = await error_of(response, 409)
    assert error["message"] == f"url: already registered as webhook {first['id']}"
    shown = await ok(await client.get(f"/v1/webhooks/{second['id']}", headers=AUTH))
    assert (shown["url"], shown["description"]) == ("https://93.184.216.35/other", "second")


async def test_patch_does_not_undo_the_dispatchers_writes(client: Client, store: Store) -> None:
    """A PATCH of the description, racing a 410 that disabled the webhook after the PATCH read
    it, leaves the webhook disabled (only the changed fields are written)."""
    hook = await create(client)
    stale = await store.webhook(hook["id"])
    await store.disable_webhook(hook["id"], "410 Gone from the endpoint", T0)
    await store.webhook_failed(hook["id"], T0, 10**9, 10**9)
    changed = dataclasses.replace(stale, description="crm", updated_ms=T0 + 1)
    await store.update_webhook(changed, service.changed_fields(stale, changed))
    shown = await ok(await client.get(f"/v1/webhooks/{hook['id']}", headers=AUTH))
    assert shown["description"] == "crm"
    assert shown["enabled"] is False
    assert shown["disabled_reason"] == "410 Gone from the endpoint"
    assert shown["failing_since"] is not None


async def test_event_types_are_deduplicated(client: Client) -> None:
    """Repeated event types are kept once, in order."""
    hook = await create(client, event_types=[OPEN, CLICK, OPEN])
    assert hook["event_types"] == [OPEN, CLICK]


@pytest.mark.parametrize(
    ("body", "prefix"),
    [
        pytest.param({"event_types": [CLICK]}, "url: required", id="no-url"),
        pytest.param({"url": PUBLIC_URL}, "event_types: required", id="no-types"),
        pytest.param({"url": 5, "event_types": [CLICK]}, "url: expected a string", id="url-type"),
        pytest.param(
            {"url": PUBLIC_URL, "event_types": []}, "event_types: at least one", id="none"
        ),
        pytest.param(
            {"url": PUBLIC_URL, "event_types": CLICK}, "event_types: expected an array", id="str"
        ),
        pytest.param(
            {"url": PUBLIC_URL, "event_types": ["com.constantcontact.email.view"]},
            "event_types[0]: unknown event type",
            id="unknown-type",
        ),
        pytest.param(
            {"url": PUBLIC_URL, "event_types": [CLICK, 3]},
            "event_types[1]: expected a string",
            id="item-type",
        ),
        pytest.param(
            {"url": PUBLIC_URL, "event_types": [CLICK], "enabled": "yes"},
            "enabled: expected true or false",
            id="enabled",
        ),
        pytest.param(
            {"url": PUBLIC_URL, "event_types": [CLICK], "rate_limit_per_s": 0},
            "rate_limit_per_s: must be at least 1.16e-05 (one a day)",
            id="rate-zero",
        ),
        pytest.param(
            # its spacing was infinite: the endpoint's senders waited for ever
            {"url": PUBLIC_URL, "event_types": [CLICK], "rate_limit_per_s": 5e-324},
            "rate_limit_per_s: must be at least 1.16e-05 (one a day) and at most 100000",
            id="rate-subnormal",
        ),
        pytest.param(
            {"url": "https://hooks.example.com:0/h", "event_types": [CLICK]},
            "url: port 0 cannot be connected to",
            id="port-zero",
        ),
        pytest.param(
            {"url": PUBLIC_URL, "event_types": [CLICK], "rate_limit_per_s": True},
            "rate_limit_per_s: expected a number or null",
            id="rate-bool",
        ),
        pytest.param(
            {"url": PUBLIC_URL, "event_types": [CLICK], "secret": "hunter2"},
            "secret: must start with whsec_",
            id="secret-prefix",
        ),
        pytest.param(
            {"url": PUBLIC_URL, "event_types": [CLICK], "secret": "whsec_c2hvcnQ="},
            "secret: must encode 24 to 64 bytes",
            id="secret-short",
        ),
        pytest.param(
            {"url": PUBLIC_URL, "event_types": [CLICK], "description": "x" * 1001},
            "description: longer than 1000",
            id="description",
        ),
        pytest.param(
            {"url": PUBLIC_URL, "event_types": [CLICK], "colour": "red"},
            "colour: unknown field",
            id="unknown-field",
        ),
        pytest.param(
            {"url": "ftp://93.184.216.34/x", "event_types": [CLICK]},
            "url: expected an http(s) URL",
            id="scheme",
        ),
        pytest.param(
            {"url": "https://93.184.216.34/a b", "event_types": [CLICK]},
            "url: must be printable ASCII",
            id="space",
        ),
        pytest.param(
            {"url": "http://93.184.216.34/hook", "event_types": [CLICK]},
            "url: https is required",
            id="plain-http",
        ),
        pytest.param(
            {"url": PUBLIC_URL, "event_types": [CLICK], "description": "a\x00b"},
            "description: must not contain NUL",
            id="description-nul",
        ),
        pytest.param(
            {"url": f"https://{'a' * 64}.example.com/hook", "event_types": [CLICK]},
            "url: ",
            id="label-over-63",
        ),
        pytest.param(
            {"url": "https://a..example.com/hook", "event_types": [CLICK]},
            "url: ",
            id="empty-label",
        ),
        pytest.param(
            {"url": "https://[::1/hook", "event_types": [CLICK]},
            "url: not a valid URL",
            id="unclosed-ipv6",
        ),
        pytest.param(
            {"url": "https://[zz]/hook", "event_types": [CLICK]},
            "url: not a valid URL",
            id="bad-ipv6",
        ),
        # urlsplit reads host 93.184.215.14 (public), WHATWG parsers 127.0.0.1, yarl refuses it
        pytest.param(
            {"url": "https://127.0.0.1\\@93.184.215.14/", "event_types": [CLICK]},
            "url: must not contain a backslash",
            id="backslash-authority",
        ),
        pytest.param(
            {"url": "https://93.184.215.14/a\\b", "event_types": [CLICK]},
            "url: must not contain a backslash",
            id="backslash-path",
        ),
        pytest.param(
            {"url": "https://u@[::1]@93.184.216.34/hook", "event_types": [CLICK]},
            "url: its host '93.184.216.34' cannot be connected to",
            id="host-only-urlsplit-reads",
        ),
    ],
)
async def test_create_validation_names_the_field(
    client: Client, body: dict[str, object], prefix: str
) -> None:
    """Every bad field is a 400 whose message starts with the field's name."""
    error = await error_of(await client.post("/v1/webhooks", json=body, headers=AUTH), 400)
    assert error["message"].startswith(prefix), error["message"]
    assert "hunter2" not in error["message"]


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("http://127.0.0.1/", id="loopback"),
        pytest.param("https://10.0.0.1/", id="private"),
        pytest.param("http://169.254.169.254/latest/meta-data", id="metadata"),
        pytest.param("http://[::1]/", id="ipv6-loopback"),
        pytest.param("http://[::ffff:127.0.0.1]/", id="ipv4-mapped"),
        pytest.param("http://localhost/", id="localhost-name"),
        pytest.param("https://0.0.0.0/", id="unspecified"),
        pytest.param("https://[64:ff9b::a9fe:a9fe]/x", id="nat64-metadata"),
        pytest.param("https://[::ffff:0:a9fe:a9fe]/x", id="ipv4-translated-metadata"),
        pytest.param("https://[::7f00:1]/", id="ipv4-compatible-loopback"),
        pytest.param("https://[2002:7f00:1::]/", id="6to4-loopback"),
        pytest.param("https://[64:ff9b:1::a00:1]/", id="local-use-nat64"),
        pytest.param("https://2130706433/", id="decimal-ipv4"),
        pytest.param("https://0x7f.1/", id="hex-short-ipv4"),
    ],
)
async def test_ssrf_refused_at_registration(client: Client, url: str) -> None:
    """Destinations resolving to non-public addresses are refused with 400 naming the url."""
    response = await client.post(
        "/v1/webhooks", json={"url": url, "event_types": [CLICK]}, headers=AUTH
    )
    error = await error_of(response, 400)
    assert error["message"].startswith("url: ")


async def test_non_dotted_numeric_hosts_refused_even_when_allowlisted(
    make_client: ClientFactory,
) -> None:
    """``2130706433`` resolves to 127.0.0.1, but aiohttp will not connect to such a host: every
    delivery would fail, so registration refuses it and says how to write it."""
    client = await make_client(guard=Guard.from_strings(["127.0.0.0/8"]))
    response = await client.post(
        "/v1/webhooks", json={"url": "http://2130706433:9/x", "event_types": [CLICK]}, headers=AUTH
    )
    message = (await error_of(response, 400))["message"]
    assert message == "url: 2130706433 is not an IPv4 address in dotted form a.b.c.d"


async def test_public_literal_accepted(client: Client) -> None:
    """A public address is accepted (registration does not connect)."""
    hook = await create(client, url="https://93.184.216.34:8443/hooks/ctct?x=1")
    assert hook["url"] == "https://93.184.216.34:8443/hooks/ctct?x=1"


async def test_allowlisted_loopback_accepted(make_client: ClientFactory) -> None:
    """With 127.0.0.0/8 allowlisted, a plain-http loopback receiver may be registered."""
    client = await make_client(guard=Guard.from_strings(["127.0.0.0/8"]))
    hook = await create(client, url="http://127.0.0.1:9876/hook")
    assert hook["url"] == "http://127.0.0.1:9876/hook"


async def test_patch_fields_and_recheck_url(client: Client, clock: Clock, store: Store) -> None:
    """PATCH changes the given fields, re-checks a new URL and bumps updated_at."""
    hook = await create(client)
    path = f"/v1/webhooks/{hook['id']}"
    clock.now += 60_000
    patched = await ok(
        await client.patch(
            path,
            json={
                "event_types": [WILDCARD],
                "description": "all",
                "rate_limit_per_s": 2.5,
                "url": "https://93.184.216.34/v2",
            },
            headers=AUTH,
        )
    )
    assert patched["event_types"] == [WILDCARD]
    assert patched["description"] == "all"
    assert patched["rate_limit_per_s"] == 2.5
    assert patched["url"] == "https://93.184.216.34/v2"
    assert patched["updated_at"] == "2025-11-21T04:41:00.000Z"
    assert patched["created_at"] == hook["created_at"]
    cleared = await ok(await client.patch(path, json={"rate_limit_per_s": None}, headers=AUTH))
    assert cleared["rate_limit_per_s"] is None
    refused = await client.patch(path, json={"url": "http://10.0.0.1/"}, headers=AUTH)
    assert (await error_of(refused, 400))["message"].startswith("url: ")
    assert (await store.webhook(str(hook["id"]))).url == "https://93.184.216.34/v2"


@pytest.mark.parametrize(
    ("body", "prefix"),
    [
        pytest.param({"secret": signing.generate_secret()}, "secret: change it with", id="secret"),
        pytest.param({"start_seq": 0}, "start_seq: unknown field", id="unknown"),
        pytest.param({"event_types": []}, "event_types: at least one", id="types"),
        pytest.param({"enabled": None}, "enabled: expected true or false", id="enabled"),
        pytest.param(
            {"url": "https://127.0.0.1\\@93.184.215.14/"},
            "url: must not contain a backslash",
            id="backslash",
        ),
    ],
)
async def test_patch_validation(client: Client, body: dict[str, object], prefix: str) -> None:
    """PATCH refuses unknown fields (secret has its own route) and bad values, naming them."""
    hook = await create(client)
    response = await client.patch(f"/v1/webhooks/{hook['id']}", json=body, headers=AUTH)
    assert (await error_of(response, 400))["message"].startswith(prefix)


async def test_reenable_clears_failure_state(client: Client, store: Store) -> None:
    """Re-enabling an auto-disabled webhook clears disabled_reason and the failing clock."""
    hook = await create(client)
    hook_id = str(hook["id"])
    await store.webhook_failed(hook_id, T0, disable_after_ms=0, restart_after_ms=10**9)
    disabled = await ok(await client.get(f"/v1/webhooks/{hook_id}", headers=AUTH))
    assert disabled["enabled"] is False
    assert disabled["failing_since"] == "2025-11-21T04:40:00.000Z"
    assert str(disabled["disabled_reason"]).startswith("failing continuously")
    again = await ok(
        await client.patch(f"/v1/webhooks/{hook_id}", json={"enabled": True}, headers=AUTH)
    )
    assert again["enabled"] is True
    assert again["disabled_reason"] is None
    assert again["failing_since"] is None
    stored = await store.webhook(hook_id)
    assert (stored.failing_since_ms, stored.last_failure_ms) == (None, None)


async def test_disable_through_api_keeps_reason(client: Client) -> None:
    """PATCH enabled=false disables with an operator reason."""
    hook = await create(client)
    off = await ok(
        await client.patch(f"/v1/webhooks/{hook['id']}", json={"enabled": False}, headers=AUTH)
    )
    assert off["enabled"] is False
    assert off["disabled_reason"] == "disabled through the admin API"


async def test_delete_then_404(client: Client) -> None:
    """DELETE answers 204 once, then the webhook is gone everywhere."""
    hook = await create(client)
    path = f"/v1/webhooks/{hook['id']}"
    response = await client.delete(path, headers=AUTH)
    assert response.status == 204
    assert await response.read() == b""
    for method in ("GET", "DELETE"):
        error = await error_of(await client.request(method, path, headers=AUTH), 404)
        assert error["code"] == "not_found"


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        pytest.param("GET", "/v1/webhooks/wh_0000000000000000", None, id="show"),
        pytest.param("PATCH", "/v1/webhooks/wh_0000000000000000", {"enabled": True}, id="patch"),
        pytest.param("DELETE", "/v1/webhooks/wh_0000000000000000", None, id="delete"),
        pytest.param("POST", "/v1/webhooks/wh_0000000000000000/rotate-secret", None, id="rotate"),
        pytest.param("GET", "/v1/webhooks/wh_0000000000000000/deliveries", None, id="deliveries"),
        pytest.param("GET", "/v1/webhooks/wh_0000000000000000/secret", None, id="secret"),
        pytest.param(
            "POST",
            "/v1/webhooks/wh_0000000000000000/recover",
            {"since": "2025-01-01T00:00:00Z"},
            id="recover",
        ),
        pytest.param("POST", "/v1/deliveries/424242/redeliver", None, id="redeliver"),
    ],
)
async def test_unknown_ids_are_404(
    client: Client, method: str, path: str, body: dict[str, object] | None
) -> None:
    """Every route answers 404 JSON for an unknown webhook or delivery id, never a 5xx."""
    response = await client.request(method, path, json=body, headers=AUTH)
    error = await error_of(response, 404)
    assert error["message"].startswith("no ")


async def test_rotation_keeps_previous_secret_for_the_grace(
    make_client: ClientFactory, clock: Clock, store: Store
) -> None:
    """rotate-secret returns a new secret; the old one stays in use until the grace ends."""
    client = await make_client(AdminSettings(token=TOKEN, rotation_grace_s=600))
    hook = await create(client)
    hook_id, old = str(hook["id"]), str(hook["secret"])
    rotated = await ok(await client.post(f"/v1/webhooks/{hook_id}/rotate-secret", headers=AUTH))
    new = str(rotated["secret"])
    assert new != old
    assert rotated["previous_secret_expires_at"] == "2025-11-21T04:50:00.000Z"
    stored = await store.webhook(hook_id)
    assert stored.secrets_in_use(T0 + 599_999) == [new, old]
    assert stored.secrets_in_use(T0 + 600_000) == [new]
    # during the grace a receiver still holding the old secret verifies what the relay signs
    body, now_s = b'{"ok": true}', int(time.time())
    headers = signing.headers(stored.secrets_in_use(T0 + 1), "msg_1", now_s, body)
    Verifier(old).verify(body, headers)
    Verifier(new).verify(body, headers)
    clock.now = T0 + 600_000
    shown = await ok(await client.get(f"/v1/webhooks/{hook_id}", headers=AUTH))
    assert shown["previous_secret_expires_at"] is None
    assert "secret" not in shown


async def test_rotation_of_a_secret_the_config_declares_is_409_naming_the_key(
    aiohttp_client: AiohttpClient, store: Store
) -> None:
    """A webhook whose secret the config file declares: rotated through the API, the next start
    put the config's secret back, so rotate-secret is a 409 naming the config key (without the
    secret) and changes nothing; a declared webhook without a secret rotates as usual."""
    secret = signing.generate_secret()
    other_url = "https://93.184.216.35/other"
    declared = [
        service.DeclaredWebhook(other_url, (CLICK,)),
        service.DeclaredWebhook(PUBLIC_URL, (CLICK,), secret=secret),
    ]
    hooks = await service.upsert_declared(store, Guard(), declared, T0, "webhooks.declared")
    app = create_admin_app(
        store,
        AdminSettings(token=TOKEN),
        guard=Guard(),
        now_ms=lambda: T0,
        declared_secrets=service.declared_secrets(declared, "webhooks.declared"),
    )
    client = await aiohttp_client(app)
    response = await client.post(f"/v1/webhooks/{hooks[1].id}/rotate-secret", headers=AUTH)
    error = await error_of(response, 409)
    assert error == {
        "code": "conflict",
        "message": f"secret: webhook {hooks[1].id}'s secret is declared in the config file"
        " (webhooks.declared[1].secret): change it there; the next start rotates to it, the old"
        " one signing for admin.rotation_grace_s",
    }
    assert secret not in error["message"]
    assert await store.webhook(hooks[1].id) == hooks[1]
    rotated = await client.post(f"/v1/webhooks/{hooks[0].id}/rotate-secret", headers=AUTH)
    assert (await ok(rotated))["secret"] != hooks[0].secret


async def test_rotation_to_a_given_secret(client: Client, store: Store) -> None:
    """A secret in the rotation body is validated and used; reusing the current one is a 400."""
    hook = await create(client)
    path = f"/v1/webhooks/{hook['id']}/rotate-secret"
    chosen = signing.generate_secret(48)
    rotated = await ok(await client.post(path, json={"secret": chosen}, headers=AUTH))
    assert rotated["secret"] == chosen
    assert (await store.webhook(str(hook["id"]))).secret == chosen
    same = await client.post(path, json={"secret": chosen}, headers=AUTH)
    assert (await error_of(same, 400))["message"].startswith("secret: the new secret must differ")
    bad = await client.post(path, json={"secret": "whsec_!!"}, headers=AUTH)
    assert (await error_of(bad, 400))["message"].startswith("secret: ")


async def test_deliveries_with_attempts_filter_and_limit(
    client: Client, store: Store, clock: Clock
) -> None:
    """Deliveries list newest first with their attempts; status and limit filter them."""
    hook = await create(client)
    hook_id = str(hook["id"])
    await commit_events(store, [activity(1, T0 - 5000), activity(2, T0 - 4000)], T0)
    pending = await store.deliveries(hook_id, 10)
    assert len(pending) == 2
    oldest = pending[-1]
    await store.finish_attempts(
        [(Attempt(oldest.id, T0 + 1000, 500, 12.3456, "oops", "HTTP 500"), "dead", T0 + 1000, 0)]
    )
    path = f"/v1/webhooks/{hook_id}/deliveries"
    listed = await ok(await client.get(path, headers=AUTH))
    deliveries = listed["deliveries"]
    assert isinstance(deliveries, list)
    assert [d["id"] for d in deliveries] == [d.id for d in pending]
    dead = deliveries[1]
    assert dead["status"] == "dead"
    assert dead["attempt_count"] == 1
    assert dead["attempts"] == [
        {
            "attempted_at": "2025-11-21T04:40:01.000Z",
            "status_code": 500,
            "latency_ms": 12.346,
            "response_excerpt": "oops",
            "error": "HTTP 500",
        }
    ]
    only_dead = await ok(await client.get(path, params={"status": "dead"}, headers=AUTH))
    assert [d["id"] for d in only_dead["deliveries"]] == [oldest.id]
    one = await ok(await client.get(path, params={"limit": "1"}, headers=AUTH))
    assert len(one["deliveries"]) == 1


async def test_delivery_and_attempt_errors_go_through_the_redactor(
    make_client: ClientFactory, store: Store
) -> None:
    """An attempt's error, its receiver's answer and the delivery's last error are shown as
    dead-letter reasons and status's errors are, through the relay's redactor: a URL's password
    and query values and a configured secret never reach an answer (listed or redelivered).
    They were shown as stored, as the receiver or a proxy on the way said them."""
    client = await make_client(view=RelayView(redact=Redactor(["k-secret-hook-token"]).text))
    hook = await create(client)
    await commit_events(store, [activity(1, T0 - 5000)], T0)
    (delivery,) = await store.deliveries(str(hook["id"]), 10)
    error = (
        "ClientConnectorError: Cannot connect to host"
        " https://ops:hunter2@crm.example.com/in?token=abc123 (k-secret-hook-token)"
    )
    excerpt = '{"detail": "redirected to https://sso.example.com/cb?code=xyz789&state=1"}'
    attempt = Attempt(delivery.id, T0 + 1000, 502, 5.0, excerpt, error)
    await store.finish_attempts([(attempt, "dead", T0 + 1000, 0)])
    shown_error = (
        "ClientConnectorError: Cannot connect to host"
        " https://ops:***@crm.example.com/in?token=*** (***)"
    )
    shown_excerpt = '{"detail": "redirected to https://sso.example.com/cb?code=***&state=***"}'
    listed = await ok(await client.get(f"/v1/webhooks/{hook['id']}/deliveries", headers=AUTH))
    redelivered = await ok(
        await client.post(f"/v1/deliveries/{delivery.id}/redeliver", headers=AUTH), 202
    )
    for answer in (listed["deliveries"][0], redelivered):
        assert answer["attempts"][0]["error"] == shown_error
        assert answer["attempts"][0]["response_excerpt"] == shown_excerpt
    assert listed["deliveries"][0]["last_error"] == shown_error
    text = str(listed) + str(redelivered)
    for secret in ("hunter2", "abc123", "k-secret-hook-token", "xyz789"):
        assert secret not in text


class CountingStore:
    """The real store, counting the calls made of it (each is one query or transaction)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        found = getattr(self._store, name)
        if not inspect.iscoroutinefunction(found):
            return found

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return await found(*args, **kwargs)

        return counted


async def test_a_page_of_deliveries_costs_a_bounded_number_of_queries(
    aiohttp_client: AiohttpClient, any_store: Store
) -> None:
    """A page of 60 deliveries with two attempts each is read in three store calls (the
    webhook, the page, every attempt of it), not one more per delivery, and each delivery
    carries its own attempts, oldest first."""
    store = any_store
    counting = CountingStore(store)
    app = create_admin_app(counting, AdminSettings(token=TOKEN), guard=Guard(), now_ms=Clock())  # type: ignore[arg-type]
    client = await aiohttp_client(app)
    hook = await create(client)
    hook_id = str(hook["id"])
    await commit_events(store, [activity(i, T0 - 9000 + i) for i in range(60)], T0)
    every = await store.deliveries(hook_id, 100)
    for n in (1, 2):  # a failure then a success, each delivery: two attempts, in that order
        status = 500 if n == 1 else 200
        await store.finish_attempts(
            [
                (Attempt(d.id, T0 + n, status, 1.0, f"{d.id}:{n}"), "pending", T0, n - 1)
                for d in every
            ]
        )
    counting.calls.clear()
    path = f"/v1/webhooks/{hook_id}/deliveries"
    listed = await ok(await client.get(path, params={"limit": "100"}, headers=AUTH))
    assert len(counting.calls) <= 3, counting.calls
    assert [d["id"] for d in listed["deliveries"]] == [d.id for d in every]
    for d in listed["deliveries"]:
        excerpts = [a["response_excerpt"] for a in d["attempts"]]
        assert excerpts == [f"{d['id']}:1", f"{d['id']}:2"]


async def test_deliveries_page_back_with_before_and_next_before(
    client: Client, store: Store
) -> None:
    """Newest first, limit at a time: next_before names the next page back until none is left,
    the pages together hold every delivery once, and before works with a status filter."""
    hook = await create(client)
    hook_id = str(hook["id"])
    await commit_events(store, [activity(i, T0 - 9000 + i) for i in range(7)], T0)
    every = [d.id for d in await store.deliveries(hook_id, 100)]
    assert len(every) == 7
    path = f"/v1/webhooks/{hook_id}/deliveries"
    pages: list[list[int]] = []
    params = {"limit": "3"}
    while True:
        page = await ok(await client.get(path, params=params, headers=AUTH))
        pages.append([d["id"] for d in page["deliveries"]])
        if page["next_before"] is None:
            break
        assert page["next_before"] == pages[-1][-1]
        params = {"limit": "3", "before": str(page["next_before"])}
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [i for p in pages for i in p] == every  # newest first, each once
    exact = await ok(await client.get(path, params={"limit": "7"}, headers=AUTH))
    assert exact["next_before"] is None  # exactly limit left: no empty page to ask for
    oldest, second = every[-1], every[-2]
    await store.finish_attempts(
        [
            (Attempt(i, T0 + 1000, 500, 1.0, "", "HTTP 500"), "dead", T0 + 1000, 0)
            for i in (oldest, second)
        ]
    )
    dead = await ok(
        await client.get(
            path, params={"status": "dead", "before": str(second), "limit": "1"}, headers=AUTH
        )
    )
    assert ([d["id"] for d in dead["deliveries"]], dead["next_before"]) == ([oldest], None)
    beyond = await ok(await client.get(path, params={"before": str(every[-1])}, headers=AUTH))
    assert beyond == {"deliveries": [], "next_before": None}


@pytest.mark.parametrize(
    ("params", "prefix"),
    [
        pytest.param({"status": "lost"}, "status: expected one of", id="status"),
        pytest.param({"limit": "0"}, "limit: expected an integer from 1 to 500", id="zero"),
        pytest.param({"limit": "501"}, "limit: expected an integer from 1 to 500", id="big"),
        pytest.param({"limit": "x"}, "limit: expected an integer", id="text"),
        pytest.param({"before": "0"}, "before: expected a delivery id", id="before-zero"),
        pytest.param({"before": "-3"}, "before: expected a delivery id", id="before-negative"),
        pytest.param({"before": "2" * 20}, "before: expected a delivery id", id="before-big"),
        pytest.param({"befor": "3"}, "befor: unknown query parameter", id="before-typo"),
        pytest.param({"limit": "1" * 5000}, "limit: expected an integer", id="limit-long"),
        pytest.param({"before": "1" * 5000}, "before: expected a delivery id", id="before-long"),
    ],
)
async def test_deliveries_query_validation(
    client: Client, params: dict[str, str], prefix: str
) -> None:
    """Bad query values are 400s naming the parameter."""
    hook = await create(client)
    response = await client.get(
        f"/v1/webhooks/{hook['id']}/deliveries", params=params, headers=AUTH
    )
    assert (await error_of(response, 400))["message"].startswith(prefix)


async def test_redeliver_resets_a_dead_delivery(client: Client, store: Store) -> None:
    """redeliver makes a dead delivery pending, due now, with a fresh budget: 202."""
    hook = await create(client)
    await commit_events(store, [activity(1, T0 - 5000)], T0)
    (delivery,) = await store.deliveries(str(hook["id"]), 10)
    await store.finish_attempts([(Attempt(delivery.id, T0, 503, 5.0), "dead", T0, 0)])
    response = await client.post(f"/v1/deliveries/{delivery.id}/redeliver", headers=AUTH)
    body = await ok(response, 202)
    assert body["status"] == "pending"
    assert body["attempt_count"] == 0
    assert body["next_attempt_at"] == "2025-11-21T04:40:00.000Z"
    assert len(body["attempts"]) == 1
    assert (await store.delivery(delivery.id)).status == "pending"


async def test_redeliver_of_a_delivery_whose_event_was_pruned_is_410(
    client: Client, store: Store
) -> None:
    """A delivered delivery's history outlives its event: redelivering it would leave it pending
    for ever (nothing to send, never dead-lettered), so it is refused with 410 and left as it is."""
    hook = await create(client)
    await commit_events(store, [activity(1, T0 - 5000), activity(2, T0 - 4000)], T0)
    first, _ = sorted(await store.deliveries(str(hook["id"]), 10), key=lambda d: d.id)
    await store.finish_attempts([(Attempt(first.id, T0, 200, 5.0), "delivered", T0, 0)])
    assert await store.prune_outbox(T0 + 1, []) == 1
    response = await client.post(f"/v1/deliveries/{first.id}/redeliver", headers=AUTH)
    error = await error_of(response, 410)
    assert error["message"] == (
        f"delivery {first.id}: its event {first.event_id} is no longer in the outbox"
        " (pruned after outbox_retention_h) and cannot be sent again"
    )
    assert (await store.delivery(first.id)).status == "delivered"


async def test_redeliver_of_a_kind_the_filter_no_longer_wants_is_409(
    client: Client, store: Store
) -> None:
    """A delivered click of a webhook narrowed to opens since: made pending, it would never be
    sent (the worker sends only the kinds its filter wants) nor dead-lettered, so redelivering
    it is refused with 409 naming the filter, and left as it is; once the filter wants clicks
    again it is redelivered."""
    hook = await create(client)
    hook_id = str(hook["id"])
    await commit_events(store, [activity(1, T0 - 5000)], T0)
    (delivery,) = await store.deliveries(hook_id, 10)
    await store.finish_attempts([(Attempt(delivery.id, T0, 200, 5.0), "delivered", T0, 0)])
    opens = {"event_types": [OPEN]}
    await ok(await client.patch(f"/v1/webhooks/{hook_id}", json=opens, headers=AUTH))
    response = await client.post(f"/v1/deliveries/{delivery.id}/redeliver", headers=AUTH)
    error = await error_of(response, 409)
    assert error == {
        "code": "conflict",
        "message": f"delivery {delivery.id}: its event is a {CLICK}, which webhook {hook_id}'s"
        " event_types (com.constantcontact.email.open) no longer let through; widen them"
        f" (PATCH /v1/webhooks/{hook_id}) to send it again",
    }
    assert (await store.delivery(delivery.id)).status == "delivered"
    both = {"event_types": [OPEN, CLICK]}
    await ok(await client.patch(f"/v1/webhooks/{hook_id}", json=both, headers=AUTH))
    response = await client.post(f"/v1/deliveries/{delivery.id}/redeliver", headers=AUTH)
    assert (await ok(response, 202))["status"] == "pending"


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/v1/deliveries/{delivery}/redeliver", id="redeliver"),
        pytest.param("/v1/webhooks/{hook}/recover", id="recover"),
    ],
)
async def test_redeliver_and_recover_of_a_disabled_webhook_are_409(
    client: Client, store: Store, path: str
) -> None:
    """Nothing is sent to a disabled webhook until it is enabled, so a redelivery or recovery
    for one is refused with 409, code webhook_disabled, naming the webhook, its reason and how
    to enable it, and changes nothing; enabled again, it is accepted."""
    hook = await create(client)
    hook_id = str(hook["id"])
    await commit_events(store, [activity(1, T0 - 5000)], T0)
    (delivery,) = await store.deliveries(hook_id, 10)
    await store.finish_attempts([(Attempt(delivery.id, T0, 503, 5.0), "dead", T0, 0)])
    off = {"enabled": False}
    await ok(await client.patch(f"/v1/webhooks/{hook_id}", json=off, headers=AUTH))
    url = path.format(delivery=delivery.id, hook=hook_id)
    since = {"since": "2025-11-21T04:39:00+00:00"}
    body = since if "recover" in path else None
    error = await error_of(await client.post(url, json=body, headers=AUTH), 409)
    assert error == {
        "code": "webhook_disabled",
        "message": f"webhook {hook_id} is disabled (disabled through the admin API); enable it"
        f' first (PATCH /v1/webhooks/{hook_id} {{"enabled": true}}, or ctct-relay webhooks'
        f" update {hook_id} --enable)",
    }
    assert (await store.deliveries(hook_id, 10)) == [await store.delivery(delivery.id)]
    assert (await store.delivery(delivery.id)).status == "dead"
    await ok(await client.patch(f"/v1/webhooks/{hook_id}", json={"enabled": True}, headers=AUTH))
    await ok(await client.post(url, json=body, headers=AUTH), 202)
    assert (await store.delivery(delivery.id)).status == "pending"


async def test_a_new_url_starts_a_fresh_failing_clock_and_makes_retries_due(
    client: Client, store: Store, clock: Clock
) -> None:
    """PATCH url: the failing clock of the old URL is gone (one failure at the new one must not
    disable it) and the retries the old one earned are due now, their attempts kept."""
    hook = await create(client)
    hook_id = str(hook["id"])
    await commit_events(store, [activity(1, T0 - 5000)], T0)
    (delivery,) = await store.deliveries(hook_id, 10)
    await store.finish_attempts(
        [(Attempt(delivery.id, T0, 503, 5.0), "pending", T0 + 36_000_000, 0)]
    )
    await store.webhook_failed(hook_id, T0, disable_after_ms=10**12, restart_after_ms=10**12)
    clock.now = T0 + 60_000
    moved = {"url": "https://93.184.216.35/hook"}
    body = await ok(await client.patch(f"/v1/webhooks/{hook_id}", json=moved, headers=AUTH))
    assert body["failing_since"] is None
    stored = await store.webhook(hook_id)
    assert (stored.failing_since_ms, stored.last_failure_ms) == (None, None)
    again = await store.delivery(delivery.id)
    assert (again.status, again.attempts, again.next_attempt_ms) == ("pending", 1, T0 + 60_000)


async def test_every_change_is_told_to_the_running_dispatcher(
    make_client: ClientFactory, store: Store
) -> None:
    """Register, edit, rotate, redeliver, recover and delete each tell the relay's webhook
    dispatcher which webhook changed, so it acts now rather than at its next refresh."""
    told: list[str] = []
    client = await make_client(
        view=RelayView(on_webhook_change=lambda hook_id, _: told.append(hook_id))
    )
    hook = await create(client)
    hook_id = str(hook["id"])
    await ok(await client.patch(f"/v1/webhooks/{hook_id}", json={"description": "x"}, headers=AUTH))
    await ok(await client.post(f"/v1/webhooks/{hook_id}/rotate-secret", headers=AUTH))
    await commit_events(store, [activity(1, T0 - 5000)], T0)
    (delivery,) = await store.deliveries(hook_id, 10)
    await store.finish_attempts([(Attempt(delivery.id, T0, 503, 5.0), "dead", T0, 0)])
    await ok(await client.post(f"/v1/deliveries/{delivery.id}/redeliver", headers=AUTH), 202)
    since = {"since": "2025-11-21T04:39:00+00:00"}
    await ok(await client.post(f"/v1/webhooks/{hook_id}/recover", json=since, headers=AUTH), 202)
    assert (await client.delete(f"/v1/webhooks/{hook_id}", headers=AUTH)).status == 204
    assert told == [hook_id] * 6


async def test_recover_owes_matching_events_again(client: Client, store: Store) -> None:
    """recover re-owes every matching event committed since the time: 202 with the count."""
    await commit_events(store, [activity(1, T0 - 9000)], T0 - 1000)  # before the webhook
    hook = await create(client)
    hook_id = str(hook["id"])
    await commit_events(
        store, [activity(2, T0 - 5000), activity(3, T0 - 4000, Kind.OPEN)], T0 + 1000
    )
    assert len(await store.deliveries(hook_id, 10)) == 1  # clicks only, from registration on
    path = f"/v1/webhooks/{hook_id}/recover"
    body = await ok(
        await client.post(path, json={"since": "2025-11-21T04:39:00+00:00"}, headers=AUTH), 202
    )
    assert body == {"deliveries": 2}  # both clicks, the one from before registration too
    assert len(await store.deliveries(hook_id, 10)) == 2


@pytest.mark.parametrize(
    "since",
    [
        pytest.param("2025-11-21", id="date-only"),
        pytest.param("2025-11-21T04:39:00", id="no-offset"),
        pytest.param("yesterday", id="words"),
        pytest.param("2025-13-01T00:00:00Z", id="month"),
        pytest.param("2025-01-01T00:00:00+24:00", id="offset"),
        pytest.param(1763700000000, id="number"),
        pytest.param("2025-01-01T00:00:61Z", id="second-61"),
        pytest.param("2025-01-01T00:00:99Z", id="second-99"),
    ],
)
async def test_recover_needs_an_rfc3339_time(client: Client, since: object) -> None:
    """since must be an RFC 3339 time with an offset; anything else is a 400 naming it."""
    hook = await create(client)
    response = await client.post(
        f"/v1/webhooks/{hook['id']}/recover", json={"since": since}, headers=AUTH
    )
    assert (await error_of(response, 400))["message"].startswith("since: expected an RFC 3339")


@pytest.mark.parametrize("since", ["9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+00:01"])
async def test_recover_since_out_of_range_is_a_400_naming_it(client: Client, since: str) -> None:
    """A valid RFC 3339 time outside the years 1..9999 once in UTC is a 400 naming since."""
    hook = await create(client)
    response = await client.post(
        f"/v1/webhooks/{hook['id']}/recover", json={"since": since}, headers=AUTH
    )
    message = (await error_of(response, 400))["message"]
    assert message == f"since: outside the years 1 to 9999 in UTC: {since!r}"


@pytest.mark.parametrize(
    ("data", "status"),
    [
        pytest.param(b"", 200, id="empty"),
        pytest.param(b" \r\n\t", 400, id="json-whitespace"),
        pytest.param(b"\x0b", 400, id="vertical-tab"),
        pytest.param(b"{}", 200, id="empty-object"),
    ],
)
async def test_rotation_body_is_optional_but_json(client: Client, data: bytes, status: int) -> None:
    """An absent rotation body means "generate"; a body sent must be a JSON text (whitespace
    alone is none: schemathesis sends it as invalid syntax and expects a 400)."""
    hook = await create(client)
    response = await client.post(
        f"/v1/webhooks/{hook['id']}/rotate-secret",
        data=data,
        headers={**AUTH, "Content-Type": "application/json"},
    )
    if status == 400:
        assert (await error_of(response, 400))["message"].startswith("body: not valid JSON")
    else:
        assert (await ok(response))["secret"] != hook["secret"]


async def test_a_leap_second_is_a_time_but_no_later_second_is(client: Client) -> None:
    """RFC 3339 allows second 60 (a leap second, read as :59); 61 and up were clamped to :59."""
    hook = await create(client)
    path = f"/v1/webhooks/{hook['id']}/recover"
    response = await client.post(path, json={"since": "2016-12-31T23:59:60Z"}, headers=AUTH)
    assert response.status == 202, await response.text()


@pytest.mark.parametrize(
    "path", [pytest.param("/v1/webhooks", id="list"), pytest.param("/v1/webhooks/{id}", id="show")]
)
async def test_webhook_reads_refuse_unknown_query_parameters(client: Client, path: str) -> None:
    """As every other route does: ``?enabled=false`` must not silently list everything."""
    hook = await create(client)
    response = await client.get(
        path.format(id=hook["id"]), params={"enabled": "false"}, headers=AUTH
    )
    message = (await error_of(response, 400))["message"]
    assert message == "enabled: unknown query parameter (known: none)"


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        pytest.param("GET", "/v1/webhooks/wh%00x", None, id="show"),
        pytest.param("PATCH", "/v1/webhooks/wh%00x", {"enabled": True}, id="patch"),
        pytest.param("DELETE", "/v1/webhooks/wh%00x", None, id="delete"),
        pytest.param("POST", "/v1/webhooks/wh%00x/rotate-secret", None, id="rotate"),
        pytest.param("GET", "/v1/webhooks/wh%00x/deliveries", None, id="deliveries"),
        pytest.param(
            "POST", "/v1/webhooks/wh%00x/recover", {"since": "2025-01-01T00:00:00Z"}, id="recover"
        ),
    ],
)
async def test_a_nul_in_a_path_id_is_404_on_every_store(
    aiohttp_client: AiohttpClient,
    any_store: Store,
    method: str,
    path: str,
    body: dict[str, object] | None,
) -> None:
    """PostgreSQL refuses NUL in a query (it was a 500): an id with one names nothing."""
    await any_store.ensure_streams([KEY], T0)
    app = create_admin_app(any_store, AdminSettings(token=TOKEN), guard=Guard())
    client = await aiohttp_client(app)
    response = await client.request(method, path, json=body, headers=AUTH)
    assert (await error_of(response, 404))["message"].startswith("no ")


@pytest.mark.parametrize(
    ("route", "field"),
    [
        pytest.param("create", "description", id="create-description"),
        pytest.param("patch", "description", id="patch-description"),
    ],
)
async def test_a_nul_in_a_body_string_is_a_400_naming_it_on_every_store(
    aiohttp_client: AiohttpClient, any_store: Store, route: str, field: str
) -> None:
    """A JSON "\\u0000" in a string field is refused before the store sees it (PostgreSQL
    text cannot hold it: it was a 500)."""
    app = create_admin_app(any_store, AdminSettings(token=TOKEN), guard=Guard())
    client = await aiohttp_client(app)
    data = {"url": PUBLIC_URL, "event_types": [CLICK], field: "a\x00b"}
    if route == "create":
        response = await client.post("/v1/webhooks", json=data, headers=AUTH)
    else:
        hook = await create(client)
        response = await client.patch(
            f"/v1/webhooks/{hook['id']}", json={field: "a\x00b"}, headers=AUTH
        )
    message = (await error_of(response, 400))["message"]
    assert message == f"{field}: must not contain NUL (U+0000)"
    assert [h.description for h in await any_store.webhooks()] in ([], [""])


_GOOD_SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw" + "MfKQ9r8GKYqrTwjUPD8ILPZI"


@pytest.mark.parametrize(
    ("secret", "problem"),
    [
        pytest.param(" " + _GOOD_SECRET, "starts or ends with whitespace", id="leading-space"),
        pytest.param(_GOOD_SECRET + "\n", "starts or ends with whitespace", id="line-end"),
        pytest.param(_GOOD_SECRET + "\r\n", "starts or ends with whitespace", id="crlf"),
        pytest.param(_GOOD_SECRET[:20] + " " + _GOOD_SECRET[20:], "holds whitespace", id="space"),
        pytest.param(_GOOD_SECRET[:20] + "\t" + _GOOD_SECRET[20:], "holds whitespace", id="tab"),
        pytest.param(
            _GOOD_SECRET[:20] + "!*" + _GOOD_SECRET[22:],
            "the part after whsec_ is not valid base64",
            id="chars",
        ),
    ],
)
@pytest.mark.parametrize("route", ["create", "rotate"])
async def test_a_secret_with_whitespace_or_bad_base64_is_a_400_naming_it(
    client: Client, secret: str, problem: str, route: str
) -> None:
    """A given whsec_ secret with whitespace around or inside, or bad base64, is refused with a
    400 naming the field and the problem, never echoing the value (" whsec_…" used to be told it
    must start with whsec_); nothing is registered or rotated."""
    if route == "create":
        response = await client.post(
            "/v1/webhooks",
            json={"url": PUBLIC_URL, "event_types": [CLICK], "secret": secret},
            headers=AUTH,
        )
    else:
        hook = await create(client, secret=_GOOD_SECRET)
        response = await client.post(
            f"/v1/webhooks/{hook['id']}/rotate-secret", json={"secret": secret}, headers=AUTH
        )
    text = await response.text()
    error = await error_of(response, 400)
    assert error["message"].startswith(f"secret: {problem}"), error
    assert "MfKQ9r8GKYqr" not in text
    hooks = await ok(await client.get("/v1/webhooks", headers=AUTH))
    assert len(hooks["webhooks"]) == (0 if route == "create" else 1)
