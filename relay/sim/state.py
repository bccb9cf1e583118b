"""The simulator's run-time state, held on the aiohttp app under one typed key.

:func:`get_state` is how handlers, and tests running the app in-process, reach the clock, the
world, the limits, the fault injector and the statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from relay.sim.clock import SimClock
from relay.sim.faults import FaultInjector
from relay.sim.limits import Limits, Stats
from relay.sim.scenario import Scenario
from relay.sim.world import World


@dataclass(slots=True, eq=False)
class SimState:
    """Everything one running simulator owns (services, not values: they change as it runs)."""

    scenario: Scenario
    clock: SimClock
    world: World
    limits: Limits
    faults: FaultInjector
    stats: Stats
    freeze_gc: bool = False  # see relay.sim.app: only when the process is the simulator alone

    def now_ms(self) -> int:
        """Current simulated time; the world is brought up to it first, so answers are fresh."""
        self.world.advance_to(self.clock.now_ms())
        return self.world.now_ms


STATE = web.AppKey("ctct_sim_state", SimState)
# The simulated time (Unix ms) a /v2 request read the world at: its answer's Date header.
READ_AT = web.RequestKey("ctct_sim_read_at", int)


def get_state(app: web.Application) -> SimState:
    """The simulator state of an app made by ``create_app``."""
    return app[STATE]
