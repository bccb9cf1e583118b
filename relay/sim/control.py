"""The ``/_sim`` control and ground-truth endpoints (no authentication: local test tooling).

``GET /_sim/truth`` lists every activity visible so far in canonical form, so a test or the demo
can check a relay delivered each one exactly once; ``/_sim/stats`` shows how the relay treated
the API; ``/_sim/clock`` and ``/_sim/faults`` steer the run.
"""

from __future__ import annotations

import orjson
from aiohttp import web

from relay.sim import render
from relay.sim.fields import Fields
from relay.sim.responses import error_response, json_response
from relay.sim.scenario import ScenarioError
from relay.sim.state import STATE, SimState

JsonObject = dict[str, object]
_INVALID = "sim.request.invalid"


def routes() -> list[web.RouteDef]:
    """The control routes."""
    return [
        web.get("/_sim/truth", truth),
        web.get("/_sim/stats", stats),
        web.get("/_sim/clock", get_clock),
        web.post("/_sim/clock", post_clock),
        web.get("/_sim/faults", get_faults),
        web.post("/_sim/faults", post_faults),
    ]


async def truth(request: web.Request) -> web.Response:
    """Every visible activity, ascending by time: ``{"now", "activities": [canonical…]}``."""
    state = request.app[STATE]
    now_ms = state.now_ms()
    activities = [render.canonical(a) for a in state.world.visible()]
    return json_response({"now": render.format_ms(now_ms), "activities": activities})


async def stats(request: web.Request) -> web.Response:
    """Per-key served/rejected counts and limits, per-route status counts, world size."""
    state = request.app[STATE]
    now_ms = state.now_ms()
    body = state.stats.describe(state.limits)
    body["faults_injected"] = state.faults.injected
    body["world"] = {
        "now": render.format_ms(now_ms),
        "visible_activities": state.world.visible_count,
        "campaigns_sent": state.world.sent_count,
        "contacts": state.world.contact_count,
    }
    return json_response(body)


async def get_clock(request: web.Request) -> web.Response:
    """``{"now", "start", "time_scale", "elapsed_s"}``."""
    return json_response(_clock(request.app[STATE]))


async def post_clock(request: web.Request) -> web.Response:
    """``{"advance_s": n}`` moves simulated time forward; answers like GET."""
    state = request.app[STATE]
    try:
        fields = Fields(await _json_body(request))
        seconds = fields.number("advance_s", 0.0)
        fields.finish()
        state.clock.advance(seconds)
    except ScenarioError as exc:
        return error_response(400, _INVALID, str(exc))
    except ValueError as exc:  # past the end of simulated time
        return error_response(400, _INVALID, f"advance_s: {exc}")
    return json_response(_clock(state))


async def get_faults(request: web.Request) -> web.Response:
    """The current fault settings and queued script."""
    return json_response(request.app[STATE].faults.describe())


async def post_faults(request: web.Request) -> web.Response:
    """Change fault settings and/or the script (``{"reset": true}`` clears all first)."""
    state = request.app[STATE]
    try:
        state.faults.configure(await _json_body(request))
    except ScenarioError as exc:
        return error_response(400, _INVALID, str(exc))
    return json_response(state.faults.describe())


def _clock(state: SimState) -> JsonObject:
    now_ms = state.now_ms()
    return {
        "now": render.format_ms(now_ms),
        "start": render.format_ms(state.clock.start_ms),
        "time_scale": state.clock.time_scale,
        "elapsed_s": round(state.clock.elapsed_s(), 3),
    }


async def _json_body(request: web.Request) -> object:
    raw = await request.read()
    try:
        return orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError as exc:
        raise ScenarioError(f"request body: not JSON ({exc})") from None
