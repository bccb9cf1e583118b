"""The admin API application: factory, exposure check, bearer-token auth, JSON errors, health.

``/healthz``, ``/readyz``, ``/openapi.json`` and ``/metrics`` (unless ``admin.metrics_public`` is
false) are open; everything else (``/v1/…``, and any
unknown path, so probing reveals nothing) needs ``Authorization: Bearer <token>`` when a token is
configured. Without a token the API is open, which :func:`check_exposure` allows only on a
loopback address. Every answer is JSON; a state store that fails or does not answer becomes a
503 naming the problem, an unexpected exception a logged 500, never a traceback on the wire.

A ``/v1`` request waits at most ``STORE_WAIT_S`` for an unreachable store (a
:func:`relay.store.wait_budget`; the CLI's ``--timeout`` is 30 s by default). A GET is also cut
off at ``READ_TIMEOUT_S`` (cancelling a read changes nothing). A change is never cancelled: its
store calls give up between attempts, and only while none of its writing transactions has sent
COMMIT, so its 503 says "nothing was changed" and nothing is applied after it; once a COMMIT was
sent, the change runs its full course (``postgres.reconnect_max_s``), never half-applied by us.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import math
import secrets
import time
from collections.abc import Callable, Mapping

import orjson
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from relay.api import body, openapi, origin, streams, webhooks
from relay.api.responses import ApiError, error_response, json_response
from relay.api.state import (
    DECLARED_SECRETS,
    GUARD,
    NOW_MS,
    SETTINGS,
    STORE,
    AdminSettings,
    StatusFn,
)
from relay.api.status import VIEW, RelayView
from relay.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from relay.metrics import Metrics
from relay.sinks.ssrf import Guard
from relay.store import (
    CorruptError,
    Store,
    StoreError,
    UnavailableError,
    WaitBudget,
    wait_budget,
)

log = structlog.get_logger(__name__)

PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/openapi.json"})
READY_TIMEOUT_S = 2.0
STORE_WAIT_S = 10.0  # the most a /v1 request waits for an unreachable store (see above)
READ_TIMEOUT_S = STORE_WAIT_S  # the most a GET /v1/... takes, whatever the store does
# How long a stopping relay lets admin requests in progress finish before cancelling them:
# aiohttp's default (60 s) alone outlasted the 40 s grace deploy/ gives a stopping container.
SHUTDOWN_GRACE_S = 5.0
_CHALLENGE = 'Bearer realm="ctct-relay"'
REQUEST_ID_HEADER = "X-Request-Id"
REQUEST_ID = web.RequestKey("relay.request_id", str)

__all__ = ["AdminConfigError", "AdminSettings", "check_exposure", "create_admin_app"]


class AdminConfigError(ValueError):
    """Admin API settings that would be unsafe or cannot work; the message names the key."""


def wall_ms() -> int:
    """Wall-clock Unix milliseconds."""
    return int(time.time() * 1000)


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` keeps the API on this machine."""
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False  # a name (or "" for every interface) may reach the network
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


MIN_TOKEN_CHARS = 16


def check_exposure(settings: AdminSettings) -> None:
    """Refuse settings that would expose an unauthenticated API, or that cannot work."""
    if not 0 <= settings.port <= 65535:
        raise AdminConfigError(f"admin.port: expected 0 to 65535, got {settings.port}")
    if not (math.isfinite(settings.rotation_grace_s) and settings.rotation_grace_s >= 0):
        raise AdminConfigError(
            f"admin.rotation_grace_s: expected a number of seconds >= 0,"
            f" got {settings.rotation_grace_s}"
        )
    if settings.token is not None:
        token = settings.token
        # it travels in a header: visible ASCII, no spaces (the value itself is never shown)
        if not token or not token.isascii() or not token.isprintable() or " " in token:
            raise AdminConfigError("admin.token: must be non-empty printable ASCII without spaces")
        if len(token) < MIN_TOKEN_CHARS:  # guessable, and too short to scrub from logs safely
            raise AdminConfigError(
                f"admin.token: must be at least {MIN_TOKEN_CHARS} characters"
                " (e.g. the output of `openssl rand -hex 16`)"
            )
        return
    if not is_loopback(settings.host):
        raise AdminConfigError(
            "admin.token: required when admin.host is not loopback"
            f" (admin.host is {settings.host!r}: anyone who can reach it could register webhooks"
            " and read delivery data; set admin.token, or listen on 127.0.0.1)"
        )


def admin_runner(app: web.Application) -> web.AppRunner:
    """The runner the relay serves its admin ``app`` with: requests still in progress at a stop
    get ``SHUTDOWN_GRACE_S``, then are cancelled (a client holding a request open cannot hold
    the stop)."""
    return web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S)


def create_admin_app(
    store: Store,
    settings: AdminSettings,
    *,
    guard: Guard,
    now_ms: Callable[[], int] = wall_ms,
    status: StatusFn | None = None,
    metrics: Metrics | None = None,
    view: RelayView | None = None,
    declared_secrets: Mapping[str, str] | None = None,
) -> web.Application:
    """The admin API on an opened store. Raises AdminConfigError for unsafe settings.

    ``view`` is what the running relay adds to the store's state (its accounts' allowances, the
    scheduler to tell about pauses and targets); ``status``, when given, replaces the built-in
    ``GET /v1/status``; ``metrics`` serves ``GET /metrics`` (Prometheus text format);
    ``declared_secrets`` (``service.declared_secrets``): the webhooks whose secret the config file
    declares, which ``rotate-secret`` refuses.
    """
    check_exposure(settings)
    middlewares: list[Middleware] = [_request_id, _errors]
    if settings.token is not None:
        public = PUBLIC_PATHS | ({"/metrics"} if settings.metrics_public else set())
        middlewares.append(_bearer_auth(settings.token, public))
    else:  # open on loopback: to this machine's clients only, not web pages (see origin.py)
        middlewares.append(origin.local_only())
    app = web.Application(middlewares=middlewares, client_max_size=body.MAX_BODY_BYTES)
    app[STORE] = store
    app[SETTINGS] = settings
    app[GUARD] = guard
    app[NOW_MS] = now_ms
    app[VIEW] = view or RelayView()
    app[DECLARED_SECRETS] = dict(declared_secrets or {})
    document = orjson.dumps(
        openapi.document(with_metrics=metrics is not None, metrics_public=settings.metrics_public)
    )

    async def serve_openapi(_request: web.Request) -> web.Response:
        return web.Response(body=document, content_type="application/json", charset="utf-8")

    # HEAD too on the open routes: load balancers and uptime checks probe with it (RFC 9110
    # wants HEAD wherever GET is served); it runs the GET handler, without the body
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/openapi.json", serve_openapi)
    if status is not None:
        app.router.add_get("/v1/status", _status_handler(status), allow_head=False)
    if metrics is not None:
        app.router.add_get("/metrics", _metrics_handler(metrics))
    app.router.add_routes(webhooks.routes())
    app.router.add_routes(streams.routes(with_status=status is None))
    return app


def _metrics_handler(metrics: Metrics) -> Handler:
    async def handle(_request: web.Request) -> web.StreamResponse:
        body = await metrics.scrape()
        return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})

    return handle


async def _healthz(_request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    try:
        await asyncio.wait_for(request.app[STORE].schema_version(), READY_TIMEOUT_S)
    except Exception as exc:  # whatever stops the store answering means "not ready", not a 500
        log.warning("api.not_ready", error=f"{type(exc).__name__}: {exc}")
        # the store's message names files and hosts; this endpoint is unauthenticated
        if isinstance(exc, CorruptError):  # the relay is stopping on it
            return error_response(503, "the state store is corrupt; see the relay log")
        return error_response(503, "the state store is not answering; see the relay log")
    return json_response({"status": "ready"})


def _status_handler(status: StatusFn) -> Handler:
    async def handle(_request: web.Request) -> web.StreamResponse:
        return json_response(await status())

    return handle


@web.middleware
async def _request_id(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every log line of one API request carries the same request_id and the peer's address
    (there is no access log: who read a secret or changed a webhook is in these lines). The
    answer carries the id in ``X-Request-Id``, so a client's error leads to its log lines."""
    request_id = secrets.token_hex(6)
    request[REQUEST_ID] = request_id
    with structlog.contextvars.bound_contextvars(request_id=request_id, peer=request.remote):
        response = await handler(request)
    if not response.prepared:
        response.headers[REQUEST_ID_HEADER] = request_id
    return response


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost: every failure leaves as the JSON error body. A store that fails or does not
    answer is a 503 naming the problem (no traceback: nothing here is a bug)."""
    budget: WaitBudget | None = None
    try:
        if not request.path.startswith("/v1/"):
            return await handler(request)
        # a store that does not answer (PostgreSQL down: each call retries for
        # postgres.reconnect_max_s) must not outlast the client's patience
        with wait_budget(STORE_WAIT_S) as budget:
            if request.method == "GET":  # reads only: cancelling one changes nothing
                return await asyncio.wait_for(handler(request), READ_TIMEOUT_S)
            return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects are answers, not errors
        return _http_error(request, exc)
    except StoreError as exc:
        # the store's messages name the server (host:port/database) or file, never a password;
        # configured secrets are redacted all the same
        message = request.app[VIEW].redact(str(exc))
        log.warning("api.store_error", method=request.method, path=request.path, error=message)
        if not message.startswith("state store"):
            message = f"state store: {message}"
        return error_response(503, message + _outcome(request, exc, budget))
    except TimeoutError:
        message = f"state store: no answer within {READ_TIMEOUT_S:g} s (see the relay log)"
        log.warning("api.store_error", method=request.method, path=request.path, error=message)
        return error_response(503, message)
    except Exception:
        log.exception("api.unhandled", method=request.method, path=request.path)
        return error_response(
            500,
            f"internal error; the relay log has the details (request_id {request[REQUEST_ID]})",
        )


def _outcome(request: web.Request, exc: StoreError, budget: WaitBudget | None) -> str:
    """What a failed change did, when the store can tell: the client's next step."""
    if request.method == "GET":
        return ""
    if isinstance(exc, UnavailableError) and exc.unchanged:
        return "; nothing was changed: repeat the request when the store answers again"
    if budget is not None and budget.committing:
        return "; the change may have been applied, in whole or in part: check before repeating it"
    return ""


def _http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    """aiohttp's own refusals (no route, wrong method, body too large) in our JSON form."""
    if isinstance(exc, web.HTTPNotFound):
        return error_response(404, f"no such resource: {request.path}")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return error_response(
            405,
            f"method {exc.method} is not allowed on {request.path} (allowed: {allowed})",
            headers={"Allow": allowed},
        )
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return error_response(413, f"body: larger than {body.MAX_BODY_BYTES} bytes")
    return error_response(exc.status, exc.reason)


def _bearer_auth(token: str, public: frozenset[str] = PUBLIC_PATHS) -> Middleware:
    expected = token.encode()

    @web.middleware
    async def bearer_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in public:
            return await handler(request)
        header = request.headers.get("Authorization")
        if header is None:
            raise ApiError(
                401,
                "Authorization: required (send 'Authorization: Bearer <admin token>')",
                headers={"WWW-Authenticate": _CHALLENGE},
            )
        if not _token_matches(header, expected):
            log.info("api.unauthorized", method=request.method, path=request.path)
            raise ApiError(
                401,
                "Authorization: the bearer token is not valid",
                headers={"WWW-Authenticate": _CHALLENGE + ', error="invalid_token"'},
            )
        return await handler(request)

    return bearer_auth


def _token_matches(header: str, expected: bytes) -> bool:
    scheme, _, given = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    # header text may carry lone surrogates (undecodable bytes): compare bytes, never raise
    given_bytes = given.strip().encode("utf-8", "surrogatepass")
    return hmac.compare_digest(given_bytes, expected)
