"""Scenario loading: YAML file or mapping in, validated :class:`Scenario` out.

Every problem raises :class:`ScenarioError` naming the file, the key path and what is wrong
(``sim.example.yaml: faults.error_5xx_rate: expected a number between 0 and 1, got 'lots'``);
unknown keys are errors, so a typo cannot silently fall back to a default.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, date, datetime
from pathlib import Path

import yaml

# the relay config's loader, so both files read alike: 0123 and 2026-02-30T08:00:00Z stay the text
# written (YAML 1.1 made the first octal 83 and the second a traceback), true/false and decimal
# numbers are still typed
from relay.config import _Loader
from relay.sim.clock import EARLIEST, END
from relay.sim.fields import Fields
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
from relay.sim.schedule import MAX_LINKS, earliest_ms, generated_campaign_id

# Campaign and link ids are rendered as JSON numbers by the quirks, so they must round-trip
# through a double: at most 15 digits, no leading zero.
_NUMERIC_ID = re.compile(r"0|[1-9][0-9]{0,14}")
_MAX_REPEAT = 0.95  # reopen/reclick are chained chances; 1.0 would never stop


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario YAML file."""
    if path == "":  # Path("") is ".": it was "cannot read: Is a directory"
        raise ScenarioError("scenario file: the path is empty (expected the path of a YAML file)")
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScenarioError(f"{source}: no such scenario file") from None
    except OSError as exc:
        raise ScenarioError(f"{source}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ScenarioError(
            f"{source.name}: not UTF-8 text (byte {exc.start + 1}; save it as UTF-8)"
        ) from None
    try:
        data = yaml.load(text, _Loader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ScenarioError(f"{source.name}: not valid YAML{at}: {problem}") from None
    except (ValueError, OverflowError):
        raise ScenarioError(
            f"{source.name}: not valid YAML: a value does not fit its explicit tag (!!int,"
            " !!float, !!timestamp …)"
        ) from None
    except RecursionError:
        raise ScenarioError(f"{source.name}: not valid YAML: nested too deeply") from None
    return scenario_from_mapping({} if data is None else data, source=source.name)


def scenario_from_mapping(data: Mapping[str, object], *, source: str | None = None) -> Scenario:
    """Validate an already-parsed scenario; ``source`` prefixes error messages."""
    try:
        try:
            return _scenario(Fields(data))
        except ScenarioError:  # a ValueError too: already says what is wrong
            raise
        except RecursionError:  # an anchor holding an alias to itself, &a [*a], shown in a message
            raise ScenarioError("a YAML anchor contains an alias to itself") from None
        except (ValueError, OverflowError) as exc:  # a value no check above expected
            raise ScenarioError(f"a value cannot be used: {exc}") from None
    except ScenarioError as exc:
        if source is None:
            raise
        raise ScenarioError(f"{source}: {exc}") from None


def read_faults(fields: Fields, base: Faults) -> Faults:
    """The fault settings in ``fields``; absent keys keep ``base``'s values."""
    return Faults(
        error_5xx_rate=fields.rate("error_5xx_rate", base.error_5xx_rate),
        slow_rate=fields.rate("slow_rate", base.slow_rate),
        slow_s=fields.number("slow_s", base.slow_s, high=300.0),
        truncate_rate=fields.rate("truncate_rate", base.truncate_rate),
    )


def _scenario(root: Fields) -> Scenario:
    base = Scenario()
    faults_fields = root.child("faults")
    scenario = Scenario(
        seed=root.integer("seed", base.seed, low=-(2**63)),
        start=_start(root),
        time_scale=root.number("time_scale", base.time_scale),
        quirks=root.boolean("quirks", base.quirks),
        keys=_keys(root),
        contacts=_contacts(root.child("contacts")),
        campaigns=_campaigns(root.child("campaigns")),
        rates=_rates(root.child("rates")),
        faults=read_faults(faults_fields, base.faults),
    )
    faults_fields.finish()
    root.finish()
    _check_calendar(scenario)
    return scenario


def _check_calendar(scenario: Scenario) -> None:
    """Nothing may lie before EARLIEST: such dates failed to render (a 500 on every list that
    showed one), and a year before 1 not at all."""
    start = scenario.start or datetime.now(UTC)
    earliest = _unix_ms(EARLIEST)
    for key, at_ms in earliest_ms(scenario.contacts, scenario.campaigns, _unix_ms(start)):
        if at_ms >= earliest:
            continue
        if key == "contacts.count":
            at = datetime.fromtimestamp(at_ms / 1000, UTC)
            raise ScenarioError(
                f"{key}: the first of {scenario.contacts.count} contacts would be created at"
                f" {_utc_text(at)} (they are created an hour apart before the start),"
                f" before {EARLIEST:%Y-%m-%d}: start later or use fewer contacts"
            )
        what = "the first campaign" if key == "campaigns.sent_every_s" else "the campaign"
        raise ScenarioError(
            f"{key}: {what} would be sent before {EARLIEST:%Y}, the earliest time the simulator"
            f" serves (start {_utc_text(start)})"
        )


def _utc_text(moment: datetime) -> str:
    # isoformat, not strftime: %Y writes the year 1 as "1"
    return moment.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _unix_ms(moment: datetime) -> int:
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return delta.days * 86_400_000 + delta.seconds * 1000 + delta.microseconds // 1000


def _start(root: Fields) -> datetime | None:
    value = written = root.raw("start")
    if value is None:
        return None
    if isinstance(value, str):
        try:
            # 2026-02-30 and an offset of +25:00 are ValueErrors here (the loader keeps them text)
            value = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise root.fail("start", f"expected an ISO 8601 date and time, got {value!r}") from None
    if isinstance(value, datetime):
        try:
            value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        except OverflowError:  # 0001-01-01T00:00:00+01:00 is before the year 1 in UTC
            raise root.fail("start", f"outside the years 1 to 9999 in UTC: {written!r}") from None
    elif isinstance(value, date):
        value = datetime(value.year, value.month, value.day, tzinfo=UTC)
    else:
        raise root.fail("start", f"expected an ISO 8601 date and time, got {value!r}")
    if not EARLIEST <= value < END:
        raise root.fail(
            "start",
            f"{_utc_text(value)} is outside the simulator's calendar (from"
            f" {EARLIEST:%Y-%m-%d} to before {END:%Y-%m-%d})",
        )
    return value


def _keys(root: Fields) -> tuple[ApiKey, ...]:
    if not root.has("keys"):
        root.raw("keys")
        return Scenario().keys
    keys = tuple(_key(fields) for fields in root.children("keys"))
    if not keys:
        raise root.fail("keys", "at least one api key is required")
    names = [key.api_key for key in keys]
    if len(set(names)) != len(names):
        raise root.fail("keys", "api_key values must be unique")
    return keys


def _key(fields: Fields) -> ApiKey:
    base = ApiKey()
    key = ApiKey(
        api_key=fields.text("api_key"),
        access_token=fields.text("access_token"),
        # null and 0 both mean "not enforced"
        qps=fields.optional_integer("qps", base.qps) or None,
        daily=fields.optional_integer("daily", base.daily) or None,
        more_tokens=_more_tokens(fields),
    )
    if len(set(key.tokens)) != len(key.tokens):
        raise fields.fail("more_tokens", "access tokens of a key must be unique")
    fields.finish()
    return key


def _more_tokens(fields: Fields) -> tuple[str, ...]:
    value = fields.raw("more_tokens")
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise fields.fail("more_tokens", "expected a list of non-empty strings")
    return tuple(v.strip() for v in value)


def _contacts(fields: Fields) -> Contacts:
    base = Contacts()
    contacts = Contacts(
        count=fields.integer("count", base.count, high=1_000_000),
        first_id=fields.integer("first_id", base.first_id, low=1, high=10**12),
        added=fields.integer("added", base.added, high=1_000_000),
        added_every_s=fields.number("added_every_s", base.added_every_s),
    )
    fields.finish()
    return contacts


def _campaigns(fields: Fields) -> Campaigns:
    base = Campaigns()
    count = fields.integer("count", base.count, high=100_000)
    campaigns = Campaigns(
        count=count,
        already_sent=fields.integer("already_sent", min(base.already_sent, count), high=count),
        sent_every_s=fields.number("sent_every_s", base.sent_every_s),
        audience=_audience(fields, "audience") or base.audience,
        links=fields.integer("links", base.links, high=MAX_LINKS),
        zero_link=fields.boolean("zero_link", base.zero_link),
        explicit=tuple(_explicit(item) for item in fields.children("explicit")),
    )
    fields.finish()
    _check_campaign_ids(fields, campaigns)
    return campaigns


def _audience(fields: Fields, name: str) -> Audience | None:
    """An integer is a number of contacts, a decimal a fraction of them (1 vs 1.0)."""
    value = fields.raw(name)
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return Audience(count=value)
    if isinstance(value, float) and 0.0 < value <= 1.0:
        return Audience(fraction=value)
    raise fields.fail(
        name, f"expected a count (integer >= 0) or a fraction (0.0 < x <= 1.0), got {value!r}"
    )


def _explicit(fields: Fields) -> CampaignSpec:
    campaign_id = fields.text("id")
    if not _NUMERIC_ID.fullmatch(campaign_id):
        raise fields.fail("id", f"expected a numeric id of at most 15 digits, got {campaign_id!r}")
    if fields.raw("send_at_s") is None:
        raise fields.fail("send_at_s", "required (seconds after the start; negative: before)")
    spec = CampaignSpec(
        id=campaign_id,
        send_at_s=fields.number("send_at_s", 0.0, low=None),
        name=fields.text("name", ""),
        audience=_audience(fields, "audience"),
        links=_links(fields),
    )
    fields.finish()
    return spec


def _links(fields: Fields) -> tuple[str, ...] | None:
    value = fields.raw("links")
    if value is None:
        return None
    items = value if isinstance(value, list) else [None]
    links = tuple(str(item) for item in items if isinstance(item, str | int))
    if len(links) != len(items) or not all(_NUMERIC_ID.fullmatch(link) for link in links):
        raise fields.fail("links", f"expected a list of numeric link ids, got {value!r}")
    if len(set(links)) != len(links) or len(links) > MAX_LINKS + 1:
        raise fields.fail("links", f"expected at most {MAX_LINKS + 1} distinct link ids")
    return links


def _check_campaign_ids(fields: Fields, campaigns: Campaigns) -> None:
    generated = {generated_campaign_id(i) for i in range(campaigns.count)}
    seen: set[str] = set()
    for i, spec in enumerate(campaigns.explicit):
        if spec.id in generated or spec.id in seen:
            raise fields.fail(f"explicit[{i}].id", f"campaign id {spec.id} is used twice")
        seen.add(spec.id)


def _rates(fields: Fields) -> Rates:
    base = Rates()
    rates = Rates(
        open=fields.rate("open", base.open),
        reopen=fields.number("reopen", base.reopen, high=_MAX_REPEAT),
        click=fields.rate("click", base.click),
        reclick=fields.number("reclick", base.reclick, high=_MAX_REPEAT),
        forward=fields.rate("forward", base.forward),
        bounce=fields.rate("bounce", base.bounce),
        unsubscribe=fields.rate("unsubscribe", base.unsubscribe),
        spam=fields.rate("spam", base.spam),
        scanner=fields.rate("scanner", base.scanner),
        open_delay_s=fields.number("open_delay_s", base.open_delay_s),
        click_delay_s=fields.number("click_delay_s", base.click_delay_s),
        bounce_delay_s=fields.number("bounce_delay_s", base.bounce_delay_s),
        send_batch=fields.integer("send_batch", base.send_batch, low=1),
        send_batch_gap_s=fields.number("send_batch_gap_s", base.send_batch_gap_s),
        late=fields.rate("late", base.late),
        late_mean_s=fields.number("late_mean_s", base.late_mean_s),
    )
    fields.finish()
    return rates
