"""Log set-up: redaction of secrets on every path, JSON off a TTY, poll ids on pass lines."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import logging
from pathlib import Path
from urllib.parse import quote

import orjson
import pytest
import structlog
import yarl
from aiohttp import web
from pytest_aiohttp import AiohttpClient

from relay import logs
from relay.api import AdminSettings, create_admin_app
from relay.ctct.ratelimit import Budget, RateLimiter
from relay.poller import Poller, PollSettings
from relay.scheduler import AccountRuntime, Planner, Scheduler, ScheduleSettings
from relay.sinks.ssrf import Guard
from relay.store import StreamKey, open_store
from tests.simkit import API_KEY, TOKEN, MakeSim, Sim


def test_configured_secrets_and_secret_shapes_are_redacted() -> None:
    """Known secrets, api_key= values, bearer tokens and whsec_ secrets never reach the output."""
    out = io.StringIO()
    logs.configure("debug", "json", secrets=["key-abc123", "tok-xyz789"], stream=out)
    log = structlog.get_logger("t")
    log.info(
        "request",
        url="https://api.example.com/v2/contacts?api_key=other-key&limit=5",
        headers={"Authorization": "Bearer tok-xyz789"},
        note=["key-abc123 leaked", ("nested", "whsec_c2VjcmV0c2VjcmV0")],
        error=ValueError("bad key-abc123"),
    )
    text = out.getvalue()
    for secret in ("key-abc123", "tok-xyz789", "other-key", "whsec_c2VjcmV0"):
        assert secret not in text
    line = orjson.loads(text.splitlines()[-1])
    assert line["url"].endswith("api_key=***&limit=***")  # a URL's query values: all of them
    assert line["event"] == "request"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        pytest.param(
            "POST https://crm:s3cr3t-pw@hooks.example.com/in failed",
            "POST https://crm:***@hooks.example.com/in failed",
            id="user-info-password",
        ),
        pytest.param(
            "ClientResponseError: 500, url='https://hooks.example.com/in?token=t0k3n&v=2'",
            "ClientResponseError: 500, url='https://hooks.example.com/in?token=***&v=***'",
            id="query-values",
        ),
        pytest.param(
            "https://hooks.example.com/in?t0k3n#frag",
            "https://hooks.example.com/in?***#frag",
            id="bare",
        ),
        pytest.param("limit=5&offset=10 of 12", "limit=5&offset=10 of 12", id="not-a-url"),
    ],
)
def test_url_passwords_and_query_values_are_redacted(text: str, shown: str) -> None:
    """A URL's password and its query values (where webhook URLs carry tokens: ?token=, ?sig=)
    are replaced by *** in every log line, configured or not; the keys and the rest stay."""
    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    structlog.get_logger("t").warning("webhook.failed", error=text)
    assert orjson.loads(out.getvalue())["error"] == shown


@dataclasses.dataclass
class _Credentials:
    api_key: str


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_values_rendered_from_objects_are_redacted(fmt: str) -> None:
    """A value that is no string (a yarl.URL, a dataclass orjson writes field by field, a set)
    is redacted in the text it is rendered as: it reached the output whole before."""
    out = io.StringIO()
    logs.configure("info", fmt, secrets=["key-abc123"], stream=out)
    structlog.get_logger("t").warning(
        "request",
        url=yarl.URL("https://api.example.com/v2/x?api_key=key-abc123"),
        credentials=_Credentials("key-abc123"),
        keys={"key-abc123"},
        attempts=3,
    )
    text = out.getvalue()
    assert "key-abc123" not in text
    assert "attempts" in text
    if fmt == "json":
        assert orjson.loads(text)["attempts"] == 3  # numbers stay numbers


def test_stdlib_logging_of_libraries_is_redacted_too() -> None:
    """Records logged by libraries through the logging module are scrubbed as well."""
    out = io.StringIO()
    logs.configure("info", "json", secrets=["key-abc123"], stream=out)
    logging.getLogger("aiohttp.client").warning("GET %s failed", "/v2?api_key=key-abc123")
    assert "key-abc123" not in out.getvalue()
    assert "api_key=***" in out.getvalue()


def test_stdlib_records_are_json_lines_like_structlog_ones() -> None:
    """With format json, a library's warning and its error with a traceback each give exactly
    one JSON object (the traceback as a text field, the logger's name, the level), secrets in
    the message and in the exception text redacted (they were bare text lines before)."""
    out = io.StringIO()
    logs.configure("info", "json", secrets=["kafkaPassw0rd"], stream=out)
    kafka = logging.getLogger("aiokafka.conn")
    kafka.warning("Unable connect to %s with password %s", "127.0.0.1:9092", "kafkaPassw0rd")
    try:
        raise ConnectionError("SASL as user u with kafkaPassw0rd refused")
    except ConnectionError:
        kafka.exception("Unable connect to node")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, out.getvalue()
    warning, error = (orjson.loads(line) for line in lines)
    assert warning["event"] == "Unable connect to 127.0.0.1:9092 with password ***"
    assert (warning["level"], warning["logger"]) == ("warning", "aiokafka.conn")
    assert "timestamp" in warning
    assert (error["event"], error["level"]) == ("Unable connect to node", "error")
    assert error["exception"].startswith("Traceback (most recent call last):")
    assert error["exception"].endswith("ConnectionError: SASL as user u with *** refused")
    assert "kafkaPassw0rd" not in out.getvalue()


async def test_asyncio_task_exception_never_retrieved_is_one_json_line() -> None:
    """asyncio's "Task exception was never retrieved" report (with its traceback) is one JSON
    line, the exception in a field, secrets redacted."""
    out = io.StringIO()
    logs.configure("info", "json", secrets=["tok-xyz789"], stream=out)

    async def fails() -> None:
        raise RuntimeError("upstream said Bearer tok-xyz789 is wrong")

    task = asyncio.get_running_loop().create_task(fails())
    await asyncio.wait([task])
    with structlog.contextvars.bound_contextvars(request_id="r1"):
        asyncio.get_running_loop().call_exception_handler(
            {"message": "Task exception was never retrieved", "exception": task.exception()}
        )
    (line,) = out.getvalue().splitlines()
    record = orjson.loads(line)
    assert record["event"].startswith("Task exception was never retrieved")
    assert (record["logger"], record["level"], record["request_id"]) == ("asyncio", "error", "r1")
    assert "RuntimeError: upstream said Bearer *** is wrong" in record["exception"]
    assert "tok-xyz789" not in line


def test_console_format_renders_library_records_too() -> None:
    """On a terminal (format console) a library's record is a console line with its level and
    logger, redacted, not the bare message."""
    out = io.StringIO()
    logs.configure("info", "console", secrets=["key-abc123"], stream=out)
    logging.getLogger("aiohttp.client").warning("GET /v2?api_key=key-abc123 failed")
    text = out.getvalue()
    assert "warning" in text
    assert "aiohttp.client" in text
    assert "api_key=***" in text
    assert "key-abc123" not in text


def test_level_filters_debug() -> None:
    """At level info, debug lines are not written."""
    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    structlog.get_logger("t").debug("hidden")
    assert out.getvalue() == ""


def test_encoded_forms_of_secrets_are_redacted() -> None:
    """URL-quoted and base64 forms of secrets and the key part of a whsec_ secret are scrubbed."""
    secret = "whsec_" + base64.b64encode(b"k" * 30).decode()
    api_key = "key/with+odd=chars"
    out = io.StringIO()
    logs.configure("info", "json", secrets=[secret, api_key], stream=out)
    structlog.get_logger("t").info(
        "leaks",
        body=secret.removeprefix("whsec_"),
        quoted=quote(api_key, safe=""),
        b64=base64.b64encode(api_key.encode()).decode(),
    )
    text = out.getvalue()
    assert secret.removeprefix("whsec_").rstrip("=") not in text
    assert quote(api_key, safe="") not in text
    assert base64.b64encode(api_key.encode()).decode().rstrip("=") not in text


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_console_on_a_tty_and_json_lines_otherwise() -> None:
    """format auto renders for people on a terminal and one JSON object per line elsewhere."""
    tty, pipe = _Tty(), io.StringIO()
    logs.configure("info", "auto", stream=tty)
    structlog.get_logger("t").info("hello", n=1)
    logs.configure("info", "auto", stream=pipe)
    structlog.get_logger("t").info("hello", n=1)
    assert "hello" in tty.getvalue()
    assert not tty.getvalue().lstrip().startswith("{")
    assert orjson.loads(pipe.getvalue())["n"] == 1


async def test_every_line_of_a_poll_pass_carries_its_poll_id(
    make_sim: MakeSim, tmp_path: Path
) -> None:
    """Each pass binds one poll id (and the stream) to all its lines, debug lines included."""
    sim = await make_sim()
    out = io.StringIO()
    logs.configure("debug", "json", stream=out)
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await store.open()
    try:
        keys = [StreamKey("acme", "campaign", str(c["id"])) for c in await _campaigns(sim)]
        await store.ensure_streams(keys, 0, seed=False)
        client = sim.client()
        poller = Poller(client, store, "acme", PollSettings(start_from="earliest"))
        limiter = RateLimiter(Budget(requests_per_second=1000, requests_per_day=10**6))
        runtime = AccountRuntime("acme", poller, limiter, Planner(ScheduleSettings()))
        scheduler = Scheduler(store, [runtime], ScheduleSettings(concurrency=4))
        await scheduler.tick()
        await scheduler.wait_idle()
    finally:
        await store.close()
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    in_pass = [line for line in lines if "stream" in line]
    assert {line["event"] for line in in_pass} >= {"ctct.response", "poll.pass"}
    ids_by_stream: dict[str, set[str]] = {}
    for line in in_pass:
        ids_by_stream.setdefault(line["stream"], set()).add(line["poll_id"])
    assert len(ids_by_stream) == len(keys)
    assert all(len(ids) == 1 for ids in ids_by_stream.values())
    assert len(set().union(*ids_by_stream.values())) == len(keys)


async def _campaigns(sim: Sim) -> list[dict[str, object]]:
    async with sim.session.get(
        f"{sim.url}/v2/emailmarketing/campaigns",
        params={"api_key": API_KEY, "status": "SENT"},
        headers={"Authorization": f"Bearer {TOKEN}"},
    ) as resp:
        body = await resp.json()
    results: list[dict[str, object]] = body["results"]
    return results


def test_jobs_cancelled_at_shutdown_leave_no_traceback() -> None:
    """A library logging a job cancelled by shutdown (APScheduler does) writes nothing; other
    errors with tracebacks still get through."""
    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    aps = logging.getLogger("apscheduler.executors.default")
    for exc in (asyncio.CancelledError(), RuntimeError("real failure")):
        try:
            raise exc
        except BaseException:
            aps.exception("Error running job tick")
    assert "CancelledError" not in out.getvalue()
    assert "RuntimeError: real failure" in out.getvalue()


def test_postgresql_reconnect_failures_are_one_line() -> None:
    """asyncpg's pool logging a failed reconnect during an outage writes one line naming the
    error, no traceback; other libraries keep theirs."""
    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    for name in ("asyncpg.pool", "aiokafka"):
        try:
            raise ConnectionRefusedError(111, "Connect call failed")
        except OSError:
            logging.getLogger(name).warning("Failed to restore the pool connection", exc_info=True)
    first, second = (orjson.loads(line) for line in out.getvalue().splitlines())
    assert first["event"] == (
        "Failed to restore the pool connection: ConnectionRefusedError: [Errno 111] Connect call"
        " failed"
    )
    assert "exception" not in first
    assert second["event"] == "Failed to restore the pool connection"
    assert "Traceback" in second["exception"]


async def test_every_line_of_an_admin_request_carries_its_request_id(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    """A request's log lines share one request_id; another request gets another."""
    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await store.open()
    try:
        app = create_admin_app(store, AdminSettings(token="a-admin-token-7c1e9a"), guard=Guard())
        client = await aiohttp_client(app)
        for _ in range(2):
            resp = await client.get("/v1/webhooks", headers={"Authorization": "Bearer wrong"})
            assert resp.status == 401
    finally:
        await store.close()
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    ids = [line["request_id"] for line in lines if line["event"] == "api.unauthorized"]
    assert len(ids) == 2
    assert len(set(ids)) == 2


async def test_admin_lines_name_the_webhook_and_the_peer(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    """Registering, reading the secret of and deleting a webhook each leave a line with the
    webhook's id under ``webhook`` (the key the dispatcher's lines use) and the peer's address
    (there is no access log); a refused token names the peer too."""
    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    token = "a-admin-token-7c1e9a"
    auth = {"Authorization": f"Bearer {token}"}
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await store.open()
    try:
        app = create_admin_app(store, AdminSettings(token=token), guard=Guard())
        client = await aiohttp_client(app)
        resp = await client.post(
            "/v1/webhooks",
            json={
                "url": "https://93.184.216.34/hook",
                "event_types": ["com.constantcontact.email.*"],
            },
            headers=auth,
        )
        assert resp.status == 201, await resp.text()
        hook_id = (await resp.json())["id"]
        assert (await client.get(f"/v1/webhooks/{hook_id}/secret", headers=auth)).status == 200
        assert (await client.delete(f"/v1/webhooks/{hook_id}", headers=auth)).status == 204
        resp = await client.get("/v1/webhooks", headers={"Authorization": "Bearer wrong"})
        assert resp.status == 401
    finally:
        await store.close()
    lines = {line["event"]: line for line in map(orjson.loads, out.getvalue().splitlines())}
    for event in ("webhook.created", "webhook.secret_read", "webhook.deleted"):
        assert lines[event]["webhook"] == hook_id, event
        assert lines[event]["peer"] == "127.0.0.1", event
    assert lines["api.unauthorized"]["peer"] == "127.0.0.1"


MALFORMED = {
    "LineTooLong": b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "BadStatusLine": b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
    "BadHttpMessage": b"POST /v1/webhooks HTTP/1.1\r\nHost: x\r\n"
    b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
}


async def _send_raw(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(4096), 10)
    writer.close()
    await writer.wait_closed()
    return answer


async def test_malformed_requests_are_one_warning_line_each(tmp_path: Path) -> None:
    """aiohttp's server logs an unparsable request as an error with a traceback (a log flood
    for anyone who can connect): each is one warning naming the peer and the problem; other
    aiohttp.server errors keep their traceback."""
    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await store.open()
    runner = web.AppRunner(create_admin_app(store, AdminSettings(), guard=Guard()))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        for request in MALFORMED.values():
            assert (await _send_raw(port, request)).startswith(b"HTTP/1.0 400 ")
            await asyncio.sleep(0.05)  # the error is logged as the connection closes
    finally:
        await runner.cleanup()
        await store.close()
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    server = [line for line in lines if line.get("logger") == "aiohttp.server"]
    assert len(server) == len(MALFORMED), lines
    for line, name in zip(server, MALFORMED, strict=True):
        assert line["level"] == "warning"
        assert "exception" not in line
        prefix = f"malformed HTTP request from 127.0.0.1, answered 400: {name}: "
        assert line["event"].startswith(prefix)
        assert len(line["event"]) < 300
    try:
        raise RuntimeError("a real bug")
    except RuntimeError:
        logging.getLogger("aiohttp.server").exception("Error handling request")
    last = orjson.loads(out.getvalue().splitlines()[-1])
    assert last["level"] == "error"
    assert "RuntimeError: a real bug" in last["exception"]


BAD_GZIP = (
    b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    b"Content-Encoding: gzip\r\nContent-Length: 14\r\n%s\r\nnot compressed"
)


async def test_a_body_that_does_not_decode_is_one_warning_line(tmp_path: Path) -> None:
    """A body whose Content-Encoding lies (gzip that is not gzip) is found again when aiohttp
    drains it after the answer, which it logged as an error with a traceback, for a request
    without the token too: it is one warning line, whether the API read the body or not."""
    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await store.open()
    token = "t" * 20
    app = create_admin_app(store, AdminSettings(token=token), guard=Guard())
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    auth = f"Authorization: Bearer {token}\r\n".encode()
    try:
        for path, header, status in [
            (b"/v1/webhooks", b"", b"401"),  # no token: the body is never read
            (b"/healthz", b"", b"405"),  # a public path: the body is never read either
            (b"/v1/webhooks", auth, b"400"),  # read, and refused
        ]:
            answer = await _send_raw(port, BAD_GZIP % (path, header))
            assert answer.startswith(b"HTTP/1.1 " + status), answer
            await asyncio.sleep(0.05)  # the error is logged as the connection closes
    finally:
        await runner.cleanup()
        await store.close()
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert not [line for line in lines if line["level"] == "error"], lines
    server = [line for line in lines if line.get("logger") == "aiohttp.server"]
    assert len(server) == 3, lines
    for line in server:
        assert line["level"] == "warning"
        assert "exception" not in line
        assert line["event"] == (
            "malformed HTTP request body, connection closed:"
            " ContentEncodingError: Can not decode content-encoding: gzip"
        )


def test_a_missing_topic_logged_at_every_metadata_lookup_is_one_line_per_topic() -> None:
    """aiokafka's "Topic %s not found in cluster metadata", thousands of times a second while a
    topic is deleted at run time, is written once per topic; other records all get through."""
    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    cluster = logging.getLogger("aiokafka.cluster")
    for _ in range(5000):
        cluster.error("Topic %s not found in cluster metadata", "ctct.email.bounce")
        cluster.error("Topic %s not found in cluster metadata", "ctct.email.open")
    for i in range(3):
        cluster.error("Something else %s", i)
    events = [orjson.loads(line)["event"] for line in out.getvalue().splitlines()]
    assert events == [
        "Topic ctct.email.bounce not found in cluster metadata",
        "Topic ctct.email.open not found in cluster metadata",
        "Something else 0",
        "Something else 1",
        "Something else 2",
    ]


def test_a_repeat_after_the_window_passes_and_counts_those_left_out() -> None:
    """Once the window is over, the next repeat is written with the number left out."""
    now = [0.0]
    collapse = logs.RepeatCollapser(window_s=60.0, clock=lambda: now[0])

    def record() -> logging.LogRecord:
        return logging.LogRecord(
            "aiokafka.cluster", logging.ERROR, __file__, 1,
            "Topic %s not found in cluster metadata", ("t",), None,
        )  # fmt: skip

    assert collapse(record())
    now[0] = 30.0
    assert not any(collapse(record()) for _ in range(99))
    now[0] = 61.0
    passed = record()
    assert collapse(passed)
    assert passed.getMessage() == (
        "Topic t not found in cluster metadata (repeated 99 times in the last 61 s, not logged)"
    )
    now[0] = 62.0
    assert not collapse(record())
