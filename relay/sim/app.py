"""The simulator application: the factory, its background ticker, and ways to run it.

:func:`create_app` wires one scenario into an ``aiohttp.web.Application``; :func:`run_sim` serves
it until interrupted (the ``ctct-relay sim`` command); :func:`serve` runs it inside another
asyncio program (tests, the demo) and yields its URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

from aiohttp import web

from relay.sim import control, v2
from relay.sim.clock import SimClock
from relay.sim.faults import FaultInjector
from relay.sim.gate import v2_gate
from relay.sim.limits import Limits, Stats
from relay.sim.scenario import Scenario
from relay.sim.state import READ_AT, STATE, SimState
from relay.sim.world import World

TICK_S = 0.2
# The ticker generates campaigns (in a worker thread) this many real seconds before they are sent,
# so the CPU-bound generation rarely lands on a request's path.
LOOKAHEAD_REAL_S = 10.0


def create_app(
    scenario: Scenario, clock: SimClock | None = None, *, freeze_gc: bool = False
) -> web.Application:
    """The simulator app for ``scenario``; ``clock`` (default: from the scenario) drives it.

    ``freeze_gc`` exempts the generated world from garbage collection (no second-long pauses in
    big scenarios); leave it off when the app shares its process with other work.
    """
    if clock is None:
        clock = SimClock(scenario.start, scenario.time_scale)
    state = SimState(
        scenario=scenario,
        clock=clock,
        world=World(scenario, clock.start_ms),
        limits=Limits(scenario.keys),
        faults=FaultInjector(scenario.faults, scenario.seed),
        stats=Stats(),
        freeze_gc=freeze_gc,
    )
    app = web.Application(middlewares=[v2_gate])
    app[STATE] = state
    app.add_routes(v2.routes())
    app.add_routes(control.routes())
    app.cleanup_ctx.append(_ticker)
    app.on_response_prepare.append(_simulated_date)
    return app


async def _simulated_date(request: web.Request, response: web.StreamResponse) -> None:
    """Date headers on the simulated clock, as the real API's are on its own: the relay bounds
    watermarks by the upstream's clock, which here runs ``time_scale`` times real time. An
    answer with data is dated when the data was read: at a high time_scale, the real time spent
    after the read (a slow fault, a busy loop) put the clock minutes past the data."""
    read_at_ms = request.get(READ_AT)
    if read_at_ms is None:
        moment = request.app[STATE].clock.now()
    else:
        moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=read_at_ms)
    response.headers["Date"] = format_datetime(moment, usegmt=True)


async def _ticker(app: web.Application) -> AsyncIterator[None]:
    """Keep the world current in the background; owned, cancelled and awaited by the app."""
    state = app[STATE]
    state.now_ms()  # generate what was sent before the start before the first request
    if state.freeze_gc:
        _freeze_gc()
    task = asyncio.create_task(_tick(state), name="ctct-sim-ticker")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _tick(state: SimState) -> None:
    while True:
        await asyncio.sleep(TICK_S)
        now_ms = state.now_ms()
        ahead_ms = round(LOOKAHEAD_REAL_S * state.clock.time_scale * 1000)
        await _prepare(state, now_ms + ahead_ms)


async def _prepare(state: SimState, until_ms: int) -> None:
    """Generate campaigns sent by ``until_ms`` in a worker thread, so the loop keeps serving."""
    world = state.world
    while (campaign := world.next_due(until_ms)) is not None:
        history = await asyncio.to_thread(world.generate, campaign)
        world.attach(history)
        if state.freeze_gc:
            _freeze_gc()


def _freeze_gc() -> None:
    """Exempt the (append-only, long-lived) world from future garbage collections.

    With hundreds of thousands of activities a full collection takes a second or more, stalling
    every request. Only for a process that is the simulator alone: a cycle that is garbage but
    already old when this runs is never collected.
    """
    gc.collect(1)
    gc.freeze()


@dataclass(frozen=True, slots=True)
class RunningSim:
    """A simulator serving in this process."""

    url: str  # base URL, e.g. http://127.0.0.1:54321
    app: web.Application

    @property
    def state(self) -> SimState:
        """Its state (clock, world, stats)."""
        return self.app[STATE]


@contextlib.asynccontextmanager
async def serve(
    scenario: Scenario, host: str = "127.0.0.1", port: int = 0, clock: SimClock | None = None
) -> AsyncIterator[RunningSim]:
    """Serve the simulator on ``host:port`` (0: a free port) for the duration of the block."""
    app = create_app(scenario, clock)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        yield RunningSim(f"http://{_url_host(bound_host)}:{bound_port}", app)
    finally:
        await runner.cleanup()


def run_sim(
    scenario: Scenario, host: str = "127.0.0.1", port: int = 8080, source: str = "the scenario"
) -> None:
    """Serve the simulator until interrupted, printing where it listens; ``source``: where the
    scenario (and so its api keys) came from, for that line."""
    app = create_app(scenario, freeze_gc=True)

    def announce(_: str) -> None:
        print(announcement(f"http://{_url_host(host)}:{port}", scenario, source))
        print("(press CTRL+C to stop)", flush=True)

    web.run_app(app, host=host, port=port, print=announce, access_log=None)


def announcement(url: str, scenario: Scenario, source: str) -> str:
    """The start-up line: where the simulator listens and how many api keys it accepts, from
    where; never the keys (a scenario may hold a real-looking key, and output is logged)."""
    count = len(scenario.keys)
    keys = f"{count} api key{'' if count == 1 else 's'} from {source}"
    return f"ctct simulator listening on {url}/v2 ({keys}; control: {url}/_sim)"


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
