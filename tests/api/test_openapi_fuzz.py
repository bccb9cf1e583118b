"""The running admin API fuzzed by schemathesis against its own /openapi.json.

Every operation, with the token (valid and invalid inputs): no 5xx, statuses, content types,
headers and bodies as documented, invalid input refused with a 4xx, every 4xx a JSON error body.
Without the token: every /v1 operation answers 401 with a JSON error.

The app runs on a real port in a thread with its own event loop, because schemathesis calls it
synchronously (requests) from hypothesis-driven test functions.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import requests
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import BaseSchema, Case, GenerationMode, Response
from schemathesis.specs.openapi.formats import unregister_string_format

from relay.api import AdminSettings, create_admin_app, openapi_document
from relay.metrics import Metrics
from relay.sinks.ssrf import Guard
from relay.store import open_store
from tests.api.conftest import AUTH

MAX_EXAMPLES = 30
AUTH_TOKEN = AUTH["Authorization"].removeprefix("Bearer ")
METHODS = ("get", "put", "post", "patch", "delete")
PATHS: dict[str, Any] = openapi_document(with_metrics=True)["paths"]  # type: ignore[assignment]
OPERATIONS = [
    pytest.param(method.upper(), path, id=f"{method.upper()} {path}")
    for path, operations in PATHS.items()
    for method in operations
    if method in METHODS
]
PROTECTED = [p for p in OPERATIONS if str(p.values[1]).startswith("/v1/")]
CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_headers_conformance,
    schemathesis.checks.response_schema_conformance,
    schemathesis.checks.negative_data_rejection,
]
# positive_data_acceptance is left out on purpose: a schema-valid URL or secret may still be
# refused on its merits (the SSRF guard, a secret decoding to too few bytes) with a documented 400


class LiveServer:
    """The admin app with a token on 127.0.0.1:<free port>, served from a background thread."""

    def __init__(self, state: Path) -> None:
        self._state = state
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="admin-api", daemon=True)
        self.url = ""

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(30) or self._failure is not None:
            raise RuntimeError(f"admin API did not start: {self._failure!r}")

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to the test thread by start()
            self._failure = exc
            self._ready.set()

    async def _serve(self) -> None:
        store = open_store(f"sqlite:///{self._state}")
        await store.open()
        # a dead letter, so the listing's answers are checked against the document with an item
        await store.add_dead_letter("kafka", 1, "evt-1", "MessageSizeTooLargeError: too large", 0)
        app = create_admin_app(
            store, AdminSettings(token=AUTH_TOKEN), guard=Guard(), metrics=Metrics()
        )
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()
            await store.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The live admin API for this module."""
    server = LiveServer(tmp_path_factory.mktemp("fuzz") / "state.db")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    """One HTTP session for every generated request (closed, so no socket outlives the test)."""
    with requests.Session() as session:
        yield session


@pytest.fixture(scope="module")
def destinations() -> Iterator[None]:
    """Generated ``uri`` values are mostly usable destinations (public IP literals, no DNS).

    Without this nearly every generated URL would be refused by the SSRF guard (or need DNS), and
    the success paths would never be fuzzed. A few private ones keep the refusal path covered.
    """
    hosts = ["93.184.216.34", "8.8.4.4", "[2606:4700:4700::1111]", "10.0.0.1"]
    schemathesis.openapi.format(
        "uri",
        st.builds(
            "https://{}/{}".format,
            st.sampled_from(hosts),
            st.from_regex(r"[a-z0-9/_-]{0,20}", fullmatch=True),
        ),
    )
    yield
    unregister_string_format("uri")


@pytest.fixture(scope="module")
def schema(live: LiveServer, destinations: None) -> BaseSchema:
    """The document as the running app serves it, with the token as the bearer credential."""
    config = schemathesis.Config.from_dict(
        {
            "auth": {"openapi": {"bearerAuth": {"bearer": AUTH_TOKEN}}},
            # invalid cases vary the input, not the credential: the anonymous test covers that
            "generation": {"with-security-parameters": False},
        }
    )
    return schemathesis.openapi.from_url(f"{live.url}/openapi.json", config=config)


@pytest.fixture(scope="module")
def anonymous(live: LiveServer, destinations: None) -> BaseSchema:
    """The same document, for a client that has no token."""
    config = schemathesis.Config.from_dict({})
    return schemathesis.openapi.from_url(f"{live.url}/openapi.json", config=config)


def seeded_webhook(live: LiveServer, http: requests.Session, name: str) -> str:
    """A real webhook for the fuzzer to aim at, so path ids are not always unknown."""
    slug = "".join(c if c.isalnum() else "-" for c in name)
    response = http.post(
        f"{live.url}/v1/webhooks",
        json={
            "url": f"https://93.184.216.34/{slug}",
            "event_types": ["com.constantcontact.email.*"],
        },
        headers=AUTH,
        timeout=10,
    )
    assert response.status_code == 201, response.text
    webhook_id: str = response.json()["id"]
    return webhook_id


def seeded_stream(live: LiveServer, http: requests.Session) -> int:
    """A real stream (a campaign target of account acme), so stream ids are not always unknown."""
    response = http.post(
        f"{live.url}/v1/accounts/acme/targets", json={"campaigns": ["42"]}, headers=AUTH, timeout=10
    )
    assert response.status_code in {200, 201}, response.text
    streams = http.get(f"{live.url}/v1/streams?account=acme", headers=AUTH, timeout=10).json()
    stream_id: int = streams["streams"][0]["id"]
    return stream_id


def strategies(
    schema: BaseSchema, method: str, path: str, webhook_id: str, stream_id: int | None = None
) -> st.SearchStrategy[Case[Any]]:
    """Valid and invalid requests, half of those with path ids aimed at a real webhook, stream
    or account."""
    operation = schema[path][method]
    targets: dict[str, object] = {
        "webhook_id": webhook_id,
        "stream_id": stream_id,
        "account": "acme",
    }
    aimed = {k: v for k, v in targets.items() if "{" + k + "}" in path and v is not None} or None
    options = [operation.as_strategy(GenerationMode.POSITIVE)]
    if aimed is not None:
        options.append(operation.as_strategy(GenerationMode.POSITIVE, path_parameters=aimed))
    if operation.body or any(True for _ in operation.iter_parameters()):
        options.append(operation.as_strategy(GenerationMode.NEGATIVE))
        if aimed is not None:
            options.append(operation.as_strategy(GenerationMode.NEGATIVE, path_parameters=aimed))
    return st.one_of(options)


def assert_json_error(response: Response) -> None:
    """A 4xx carries {"error": {"code": str, "message": str}}."""
    content_type = response.headers.get("content-type", [""])[0]
    assert content_type.startswith("application/json"), response.content
    body = orjson.loads(response.content)
    assert set(body) == {"error"}, body
    assert isinstance(body["error"]["code"], str)
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]


FUZZ = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as found
    suppress_health_check=list(HealthCheck),
)


@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_fuzz_with_token(
    schema: BaseSchema, live: LiveServer, http: requests.Session, method: str, path: str
) -> None:
    """With the token: no 5xx, responses as documented, bad input a 4xx with a JSON error."""
    webhook_id = seeded_webhook(live, http, f"{method}{path}")
    stream_id = seeded_stream(live, http)

    @FUZZ
    @given(case=strategies(schema, method, path, webhook_id, stream_id))
    def run(case: Case[Any]) -> None:
        response = case.call(base_url=live.url, session=http, timeout=10)
        case.validate_response(response, checks=CHECKS)
        assert response.status_code < 500, response.content
        if 400 <= response.status_code < 500:
            assert_json_error(response)

    run()


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_fuzz_without_token_is_401(
    anonymous: BaseSchema, live: LiveServer, http: requests.Session, method: str, path: str
) -> None:
    """Without the token every /v1 operation, whatever the input, is a JSON 401."""
    operation = anonymous[path][method]

    @FUZZ
    @given(case=operation.as_strategy(GenerationMode.POSITIVE))
    def run(case: Case[Any]) -> None:
        response = case.call(base_url=live.url, session=http, timeout=10)
        assert response.status_code == 401, response.content
        assert response.headers["www-authenticate"][0].startswith("Bearer")
        assert_json_error(response)

    run()
