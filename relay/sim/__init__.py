"""The Constant Contact v2 tracking API simulator: a deterministic, time-scaled fake of the API.

It serves every endpoint of :mod:`relay.ctct.catalogue` with the real API's shapes, paging, quirks,
authentication, per-key limits and errors, generates campaign activity from a seeded scenario,
injects faults on demand, and exposes ground truth and statistics under ``/_sim``.

    scenario.py  the Scenario values          loader.py    YAML/mapping -> Scenario
    fields.py    typed reading with key paths clock.py     SimClock: scaled, advanceable time
    model.py     contacts, campaigns, activity schedule.py  who exists and when
    generator.py one campaign's history        index.py     sorted streams, offset paging
    world.py     what is visible now           render.py    JSON records, quirks, times
    params.py    query parameters, next token  responses.py JSON and error-array answers
    limits.py    auth, qps/daily limits, stats faults.py    random and scripted faults
    gate.py      the /v2 middleware            v2.py        the /v2 handlers
    control.py   the /_sim endpoints           state.py     SimState and its AppKey
    app.py       create_app, serve, run_sim
"""

from __future__ import annotations

from relay.sim.app import RunningSim, create_app, run_sim, serve
from relay.sim.clock import SimClock
from relay.sim.loader import load_scenario, scenario_from_mapping
from relay.sim.scenario import (
    ApiKey,
    Audience,
    Campaigns,
    CampaignSpec,
    Contacts,
    Faults,
    Rates,
    Scenario,
    ScenarioError,
)
from relay.sim.state import STATE, SimState, get_state

__all__ = [
    "STATE",
    "ApiKey",
    "Audience",
    "CampaignSpec",
    "Campaigns",
    "Contacts",
    "Faults",
    "Rates",
    "RunningSim",
    "Scenario",
    "ScenarioError",
    "SimClock",
    "SimState",
    "create_app",
    "get_state",
    "load_scenario",
    "run_sim",
    "scenario_from_mapping",
    "serve",
]
