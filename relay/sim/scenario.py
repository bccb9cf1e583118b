"""The scenario: what the simulated account holds and how it behaves, as frozen values.

Every field has a default, so ``Scenario()`` is a small, valid world (time moving at real speed,
starting now). ``config/sim.example.yaml`` documents each key; :mod:`relay.sim.loader` builds these
values from YAML and names the key path of anything it rejects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


class ScenarioError(ValueError):
    """A scenario that cannot be used; the message names the file or key path and the problem."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One API key the simulator accepts, with its access token and its Mashery limits.

    Like the real API, the limits are the key's: the accounts using it (``more_tokens``, one
    OAuth access token each) share them with the first."""

    api_key: str = "demo-key"
    access_token: str = field(default="demo-token", repr=False)
    qps: int | None = 4  # requests per any 1-second window; None: unenforced
    daily: int | None = 10_000  # requests per UTC day; None: unenforced
    more_tokens: tuple[str, ...] = field(default=(), repr=False)  # more accounts on this key

    @property
    def tokens(self) -> tuple[str, ...]:
        """Every access token the key accepts."""
        return (self.access_token, *self.more_tokens)


@dataclass(frozen=True, slots=True)
class Contacts:
    """The account's contacts: ``count`` exist before the start, ``added`` arrive during the run."""

    count: int = 40
    first_id: int = 1001
    added: int = 0
    added_every_s: float = 300.0


@dataclass(frozen=True, slots=True)
class Audience:
    """Who receives a campaign: ``count`` contacts if set, else a ``fraction`` of them."""

    fraction: float = 1.0
    count: int | None = None


@dataclass(frozen=True, slots=True)
class CampaignSpec:
    """One explicitly listed campaign."""

    id: str  # numeric string, e.g. "1100394165290"
    send_at_s: float  # seconds after the scenario start; negative: already sent
    name: str = ""
    audience: Audience | None = None  # None: the schedule's audience
    links: tuple[str, ...] | None = None  # None: generated like the schedule's


@dataclass(frozen=True, slots=True)
class Campaigns:
    """Generated campaigns, sent every ``sent_every_s``; the first ``already_sent`` before start."""

    count: int = 12
    already_sent: int = 2
    sent_every_s: float = 600.0
    audience: Audience = field(default_factory=Audience)
    links: int = 3  # links per campaign, besides the "0" link
    zero_link: bool = True  # whether every campaign also has the link with id "0"
    explicit: tuple[CampaignSpec, ...] = ()


@dataclass(frozen=True, slots=True)
class Rates:
    """Probabilities (per recipient unless noted) and delays of the generated activity."""

    open: float = 0.45
    reopen: float = 0.3  # chance of each further open by an opener
    click: float = 0.35  # chance an opener clicks
    reclick: float = 0.2  # chance of each further click by a clicker
    forward: float = 0.05  # chance an opener forwards
    bounce: float = 0.03  # a bounced recipient does nothing else
    unsubscribe: float = 0.02
    spam: float = 0.005  # chance an opener reports spam (counted by the summary only)
    scanner: float = 0.02  # link scanners open and click every link at one instant
    open_delay_s: float = 900.0  # mean delay from send to open (exponential)
    click_delay_s: float = 60.0  # mean delay from open to click or forward
    bounce_delay_s: float = 20.0  # mean delay from send to bounce
    send_batch: int = 100  # sends sharing one millisecond
    send_batch_gap_s: float = 1.0  # time between two send batches
    late: float = 0.05  # share of activities that become visible after their own time
    late_mean_s: float = 120.0  # mean extra delay of a late activity (exponential, at least 1 s)


@dataclass(frozen=True, slots=True)
class Faults:
    """Random failures injected into /v2 answers."""

    error_5xx_rate: float = 0.0
    slow_rate: float = 0.0
    slow_s: float = 2.0
    truncate_rate: float = 0.0


@dataclass(frozen=True, slots=True)
class Scenario:
    """A complete simulated account."""

    seed: int = 1
    start: datetime | None = None  # aware UTC; None: the real time when the app is created
    time_scale: float = 1.0  # simulated seconds per real second; 0: time moves only when advanced
    quirks: bool = True  # render ids and dates in the API's inconsistent ways
    keys: tuple[ApiKey, ...] = (ApiKey(),)
    contacts: Contacts = field(default_factory=Contacts)
    campaigns: Campaigns = field(default_factory=Campaigns)
    rates: Rates = field(default_factory=Rates)
    faults: Faults = field(default_factory=Faults)
