"""The gate every /v2 request passes: authentication, limits, content negotiation, faults, stats.

In the order the real stack applies them: the API gateway (Mashery) checks the key and its
limits first, so a rejected request never reaches the data and does not count as served; only
admitted requests consume a fault script entry.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from relay.sim.faults import FaultPlan, error_key_for
from relay.sim.limits import UNKNOWN_KEY, Reason
from relay.sim.responses import ApiError, error_response
from relay.sim.state import STATE, SimState
from relay.sim.v2 import Handler

V2_PREFIX = "/v2/"
_UNMATCHED = "(no such route)"
_JSON_RANGES = frozenset({"*/*", "application/*", "application/json"})
# Constant Contact's error keys for a bad api_key and a bad access token (its WordPress plugin,
# among others, tells the two apart by them); the status is the v2 docs' 401.
_INACTIVE_KEY = (
    "mashery.not.authorized.inactive",
    "The Mashery account associated with this request is not active, or an invalid API key was"
    " used.",
)
_INVALID_TOKEN = (
    "http.status.authentication.invalid_token",
    "Not authorized: the Authorization: Bearer access token is not one of this api_key's",
)
# The bodies Constant Contact's gateway sends (quoted on its developer forum), not Mashery's
# generic "Account Over Queries Per Second Limit" texts.
_MASHERY_ACCOUNT = "The Mashery account associated with this request is over its"
_LIMIT_ERRORS = {
    Reason.OVER_QPS: (
        "mashery.not.authorized.over.qps",
        f"{_MASHERY_ACCOUNT} queries-per-second quota.",
    ),
    Reason.OVER_RATELIMIT: (
        "mashery.not.authorized.over.ratelimit",
        f"{_MASHERY_ACCOUNT} rate limit quota.",
    ),
}


@web.middleware
async def v2_gate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Apply the gate to /v2 requests; everything else (``/_sim``) passes untouched."""
    if not request.path.startswith(V2_PREFIX):
        return await handler(request)
    state = request.app[STATE]
    stream = stream_of(request.path)
    state.stats.begin(stream)
    try:
        response = await _gated(state, request, handler)
    finally:
        state.stats.end(stream)
    state.stats.answered(_template(request), response.status)
    return response


def stream_of(path: str) -> str | None:
    """The resource a tracking request reads (``/v2/contacts/1017``, ``/v2/emailmarketing/
    campaigns/11``): what one relay pass polls, so two requests for it at once mean two relay
    replicas polled the same stream at once. None for other requests."""
    resource, found, _ = path.partition("/tracking")
    return resource if found else None


async def _gated(state: SimState, request: web.Request, handler: Handler) -> web.StreamResponse:
    key = state.limits.authenticate(
        request.query.get("api_key"), request.headers.get("Authorization")
    )
    if key is None:
        known = request.query.get("api_key") in state.limits.names()
        state.stats.rejected(
            request.query["api_key"] if known else UNKNOWN_KEY, Reason.UNAUTHORIZED
        )
        return error_response(401, *(_INVALID_TOKEN if known else _INACTIVE_KEY))
    reason = state.limits.admit(key)
    if reason is not None:
        state.stats.rejected(key.api_key, reason)
        return error_response(403, *_LIMIT_ERRORS[reason])
    if not accepts_json(request.headers.get("Accept")):
        state.stats.rejected(key.api_key, Reason.NOT_ACCEPTABLE)
        return error_response(
            406, "http.status.not_acceptable", "Only application/json responses are available"
        )
    plan = state.faults.plan(request.path)
    response, faulted = await _serve(request, handler, plan)
    if faulted:
        state.faults.applied()
    state.stats.served(key.api_key, fault=faulted)
    return response


async def _serve(
    request: web.Request, handler: Handler, plan: FaultPlan
) -> tuple[web.StreamResponse, bool]:
    """The answer under ``plan``, and whether the plan changed it."""
    if plan.delay_s:
        await asyncio.sleep(plan.delay_s)
    if plan.status is not None:
        failure = error_response(
            plan.status,
            plan.error_key or error_key_for(plan.status),
            plan.error_message or f"Simulated failure ({plan.status})",
            retry_after_s=plan.retry_after_s,
        )
        return failure, True
    try:
        response = await handler(request)
    except ApiError as exc:
        response = exc.response()
    except web.HTTPException as exc:  # the router's 404/405, in the API's error format
        response = error_response(exc.status, error_key_for(exc.status), exc.reason)
    cut = _truncated(response) if plan.truncate else None
    return (response, bool(plan.delay_s)) if cut is None else (cut, True)


def _truncated(response: web.StreamResponse) -> web.StreamResponse | None:
    """The same 200 answer with its body cut in the middle (never valid JSON); None for an
    answer that is no 200 with a body."""
    if response.status != 200 or not isinstance(response, web.Response):
        return None
    body = response.body
    if not isinstance(body, bytes) or len(body) < 2:
        return None
    return web.Response(status=200, body=body[: len(body) // 2], content_type="application/json")


def accepts_json(accept: str | None) -> bool:
    """Whether an ``Accept`` header (absent or empty: anything) admits application/json."""
    if accept is None or not accept.strip():
        return True
    for item in accept.split(","):
        media, *params = item.split(";")
        if media.strip().lower() in _JSON_RANGES and _quality(params) > 0:
            return True
    return False


def _quality(params: list[str]) -> float:
    for param in params:
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            try:
                return float(value.strip())
            except ValueError:
                return 0.0
    return 1.0


def _template(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else _UNMATCHED
