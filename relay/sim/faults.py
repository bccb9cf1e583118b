"""Fault injection for /v2 answers: seeded random failures, and a deterministic script for tests.

Each admitted /v2 request asks :meth:`FaultInjector.plan` what to do. A script entry, when one is
queued (and the path matches ``script_path_prefix``), wins and is consumed; otherwise the random
rates decide. Settings change at run time through ``POST /_sim/faults``.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import asdict, dataclass
from http import HTTPStatus

from relay.sim.fields import Fields
from relay.sim.loader import read_faults
from relay.sim.scenario import Faults

JsonObject = dict[str, object]
_RANDOM_5XX = (500, 502, 503)
_FIXED_KEYS = {400: "query.param.invalid"}


def error_key_for(status: int) -> str:
    """The API-style error key of a status, e.g. ``http.status.service_unavailable``."""
    if status in _FIXED_KEYS:
        return _FIXED_KEYS[status]
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        return f"http.status.{status}"
    return "http.status." + phrase.lower().replace(" ", "_").replace("-", "_")


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """What to do to one request; the default does nothing."""

    delay_s: float = 0.0
    status: int | None = None  # answer with this error status instead of serving
    error_key: str | None = None
    error_message: str | None = None
    retry_after_s: float | None = None
    truncate: bool = False  # serve, but cut the body in the middle


class FaultInjector:
    """Current fault settings and script; owns the seeded random source for faults."""

    def __init__(self, faults: Faults, seed: int) -> None:
        self.settings = faults
        self._rng = random.Random(f"ctct-sim-faults/{seed}")
        self._script: deque[FaultPlan] = deque()
        self._prefix: str | None = None
        self.injected = 0

    def plan(self, path: str) -> FaultPlan:
        """The fault for one request to ``path`` (consumes a matching script entry); the gate
        reports with :meth:`applied` whether it changed the answer."""
        if self._script and (self._prefix is None or path.startswith(self._prefix)):
            return self._script.popleft()
        return self._random()

    def applied(self) -> None:
        """Count one fault that changed an answer (a truncation of an error answer does not:
        there is no 200 body to cut)."""
        self.injected += 1

    def _random(self) -> FaultPlan:
        rates, rng = self.settings, self._rng
        delay_s = rates.slow_s if rates.slow_rate and rng.random() < rates.slow_rate else 0.0
        if rates.error_5xx_rate and rng.random() < rates.error_5xx_rate:
            return FaultPlan(delay_s=delay_s, status=rng.choice(_RANDOM_5XX))
        truncate = bool(rates.truncate_rate) and rng.random() < rates.truncate_rate
        return FaultPlan(delay_s=delay_s, truncate=truncate)

    def configure(self, body: object) -> None:
        """Apply a ``POST /_sim/faults`` body; raises ScenarioError (nothing applied) if bad."""
        fields = Fields(body)
        reset = fields.boolean("reset", False)
        base = Faults() if reset else self.settings
        settings = read_faults(fields, base)
        prefix_given = fields.has("script_path_prefix")
        prefix = fields.text("script_path_prefix", "") or None
        script = [_script_entry(item) for item in fields.children("script")]
        script_given = fields.has("script")
        fields.finish()
        self.settings = settings
        if reset:
            self._script.clear()
            self._prefix = None
        if script_given:
            self._script = deque(script)
        if prefix_given or script_given:
            self._prefix = prefix

    def describe(self) -> JsonObject:
        """The current settings and the queued script, as JSON."""
        return {
            **asdict(self.settings),
            "script": [_describe_entry(plan) for plan in self._script],
            "script_path_prefix": self._prefix,
            "injected": self.injected,
        }


def _script_entry(fields: Fields) -> FaultPlan:
    status = fields.optional_integer("status", None, low=400, high=599)
    plan = FaultPlan(
        delay_s=fields.number("delay_s", 0.0, high=300.0),
        status=status,
        error_key=fields.text("error_key", "") or None,
        error_message=fields.text("error_message", "") or None,
        retry_after_s=_retry_after(fields, status),
        truncate=fields.boolean("truncate", False),
    )
    fields.finish()
    if plan.truncate and status is not None:
        raise fields.fail("truncate", "a script entry either fails with a status or truncates")
    return plan


def _retry_after(fields: Fields, status: int | None) -> float | None:
    if fields.has("retry_after"):
        return fields.number("retry_after", 0.0, high=86_400.0)
    fields.raw("retry_after")  # listed among the known keys in errors
    return 1.0 if status == 429 else None  # a 429 always says when to come back


def _describe_entry(plan: FaultPlan) -> JsonObject:
    # the values that differ from doing nothing; a retry_after of 0 is one (a header is sent)
    nothing = asdict(FaultPlan())
    return {key: value for key, value in asdict(plan).items() if value != nothing[key]}
