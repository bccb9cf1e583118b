"""A tokenless admin API answers this machine's clients, not web pages; bodies must be JSON."""

from __future__ import annotations

import orjson
import pytest

from relay.api import AdminSettings, openapi_document
from relay.store import Store
from tests.api.conftest import AUTH, KEY, PUBLIC_URL, T0, Client, ClientFactory, error_of

HOOK = {"url": PUBLIC_URL, "event_types": ["com.constantcontact.email.*"]}
# what a browser sends for fetch(api, {method: "POST", mode: "no-cors", body: "..."}) from
# another site: a "simple request", sent without a CORS preflight
CROSS_SITE = {
    "Origin": "https://attacker.example",
    "Content-Type": "text/plain;charset=UTF-8",
    "Sec-Fetch-Site": "cross-site",
    "Sec-Fetch-Mode": "no-cors",
}


@pytest.fixture
async def tokenless(make_client: ClientFactory) -> Client:
    """The API as the example config runs it without CTCT_RELAY_ADMIN_TOKEN: loopback, open."""
    return await make_client(AdminSettings(host="127.0.0.1", token=None))


async def test_a_cross_site_page_cannot_register_a_webhook(tokenless: Client) -> None:
    """The demonstrated CSRF: another site's no-cors POST is a 403 and registers nothing."""
    response = await tokenless.post("/v1/webhooks", data=orjson.dumps(HOOK), headers=CROSS_SITE)
    error = await error_of(response, 403)
    assert error["code"] == "forbidden"
    assert error["message"].startswith("Sec-Fetch-Site:")
    listed = await (await tokenless.get("/v1/webhooks")).json()
    assert listed == {"webhooks": []}


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"Origin": "https://attacker.example"}, id="origin"),
        pytest.param({"Origin": "null"}, id="null-origin"),
        pytest.param({"Sec-Fetch-Site": "cross-site"}, id="cross-site"),
        pytest.param({"Sec-Fetch-Site": "same-site"}, id="same-site"),
    ],
)
async def test_a_page_cannot_pause_a_stream_with_an_empty_post(
    tokenless: Client, store: Store, headers: dict[str, str]
) -> None:
    """A body-less POST needs no Content-Type, so the origin check alone must stop it."""
    await store.ensure_streams([KEY], T0)
    stream = (await store.streams())[0]
    response = await tokenless.post(f"/v1/streams/{stream.id}/pause", headers=headers)
    await error_of(response, 403)
    assert not (await store.streams())[0].paused


@pytest.mark.parametrize("path", ["/v1/webhooks", "/healthz", "/openapi.json", "/nothing"])
async def test_a_rebound_host_name_is_refused(tokenless: Client, path: str) -> None:
    """DNS rebinding: a page on a name re-pointed at 127.0.0.1 sends that name as Host."""
    port = tokenless.port
    response = await tokenless.get(path, headers={"Host": f"rebind.attacker.example:{port}"})
    error = await error_of(response, 403)
    assert error["message"].startswith("Host: 'rebind.attacker.example:")


@pytest.mark.parametrize(
    "host",
    [
        pytest.param("127.0.0.1:{port}", id="ipv4"),
        pytest.param("127.0.0.2:{port}", id="ipv4-other"),
        pytest.param("localhost:{port}", id="localhost"),
        pytest.param("LOCALHOST", id="localhost-no-port"),
        pytest.param("[::1]:{port}", id="ipv6"),
        pytest.param("[::ffff:127.0.0.1]:{port}", id="ipv4-mapped"),
    ],
)
async def test_local_names_are_answered(tokenless: Client, host: str) -> None:
    """A loopback literal or localhost, with any port or none, is this machine."""
    response = await tokenless.get("/v1/webhooks", headers={"Host": host.format(port=1)})
    assert response.status == 200, await response.text()


@pytest.mark.parametrize(
    "host",
    [
        pytest.param("", id="empty"),
        pytest.param("localhost.example", id="suffix"),
        pytest.param("127.0.0.1.nip.io", id="nip"),
        pytest.param("[::1", id="unclosed"),
        pytest.param("127.0.0.1:80x", id="bad-port"),
        pytest.param("localhost:65536", id="port-out-of-range"),
        pytest.param("localhost:" + "9" * 5000, id="port-too-long-for-int"),
        pytest.param("[::1]:" + "0" * 5000 + "1", id="port-of-many-zeros"),
        pytest.param("10.0.0.1", id="private"),
    ],
)
async def test_other_host_headers_are_refused(tokenless: Client, host: str) -> None:
    """Anything else, malformed included, is a 403 (a port of thousands of digits was a 500)."""
    await error_of(await tokenless.get("/v1/webhooks", headers={"Host": host}), 403)


async def test_a_same_origin_request_and_a_typed_url_are_answered(tokenless: Client) -> None:
    """The API's own origin and Sec-Fetch-Site none (a URL typed in the address bar) pass."""
    origin = f"http://127.0.0.1:{tokenless.port}"
    headers = {"Origin": origin, "Sec-Fetch-Site": "same-origin"}
    response = await tokenless.post("/v1/webhooks", json=HOOK, headers=headers)
    assert response.status == 201, await response.text()
    typed = await tokenless.get("/v1/webhooks", headers={"Sec-Fetch-Site": "none"})
    assert typed.status == 200
    other_port = {"Origin": f"http://127.0.0.1:{tokenless.port + 1}"}
    await error_of(await tokenless.get("/v1/webhooks", headers=other_port), 403)


async def test_with_a_token_any_host_name_is_answered(client: Client) -> None:
    """A token is what protects an API reached by name (a proxy's, a container's)."""
    headers = {**AUTH, "Host": "relay.internal.example"}
    assert (await client.get("/v1/webhooks", headers=headers)).status == 200


@pytest.mark.parametrize(
    "content_type",
    [
        pytest.param("text/plain;charset=UTF-8", id="text"),
        pytest.param("application/x-www-form-urlencoded", id="form"),
        pytest.param(None, id="none"),
    ],
)
@pytest.mark.parametrize("token", [True, False], ids=["token", "tokenless"])
async def test_a_body_must_be_declared_json(
    make_client: ClientFactory, content_type: str | None, token: bool
) -> None:
    """Token or not, a JSON body sent as another type is a 415 and changes nothing."""
    api = await make_client(None if token else AdminSettings(token=None))
    auth = AUTH if token else {}
    headers = {**auth, **({} if content_type is None else {"Content-Type": content_type})}
    response = await api.post("/v1/webhooks", data=orjson.dumps(HOOK), headers=headers)
    error = await error_of(response, 415)
    assert error["code"] == "unsupported_media_type"
    assert error["message"].startswith("Content-Type: expected application/json, got ")
    assert (await (await api.get("/v1/webhooks", headers=auth)).json()) == {"webhooks": []}
    typed = {**auth, "Content-Type": "Application/JSON; charset=utf-8"}
    created = await api.post("/v1/webhooks", data=orjson.dumps(HOOK), headers=typed)
    assert created.status == 201, await created.text()


async def test_an_optional_body_may_be_absent(client: Client) -> None:
    """No body at all needs no Content-Type (rotate-secret without a chosen secret)."""
    created = await (await client.post("/v1/webhooks", json=HOOK, headers=AUTH)).json()
    response = await client.post(f"/v1/webhooks/{created['id']}/rotate-secret", headers=AUTH)
    assert response.status == 200, await response.text()


async def test_an_empty_form_is_not_an_absent_body(tokenless: Client, store: Store) -> None:
    """An empty form POST (what an old browser may send without Origin) is a 415, not "no
    body": it pauses nothing."""
    await store.ensure_streams([KEY], T0)
    stream = (await store.streams())[0]
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    response = await tokenless.post(f"/v1/streams/{stream.id}/pause", headers=form)
    await error_of(response, 415)
    assert not (await store.streams())[0].paused


def test_the_document_lists_403_everywhere_and_415_where_a_body_goes() -> None:
    """Schemathesis checks statuses against the document: both refusals are in it."""
    paths = openapi_document(with_metrics=True)["paths"]
    assert isinstance(paths, dict)
    for item in paths.values():
        for method, operation in item.items():
            if method == "parameters":
                continue
            assert "403" in operation["responses"], (method, operation["operationId"])
            assert ("415" in operation["responses"]) == ("requestBody" in operation)
