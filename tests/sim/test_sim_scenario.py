"""Scenario loading: defaults, the example file, and error messages that name the key."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from relay.sim import (
    ApiKey,
    Audience,
    Scenario,
    ScenarioError,
    create_app,
    load_scenario,
    scenario_from_mapping,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "sim.example.yaml"


def test_defaults_make_a_working_scenario() -> None:
    """Scenario() alone is valid and builds an app."""
    default = Scenario()
    assert default.keys == (ApiKey("demo-key", "demo-token", qps=4, daily=10_000),)
    assert scenario_from_mapping({}) == default
    create_app(default)


def test_example_file_loads() -> None:
    """config/sim.example.yaml is valid and has the demo key."""
    example = load_scenario(EXAMPLE)
    assert [(k.api_key, k.access_token) for k in example.keys] == [("demo-key", "demo-token")]
    assert example.time_scale > 1
    assert example.rates.late > 0
    assert example.campaigns.explicit[0].links == ("0", "4242", "4243")


def test_values_are_read() -> None:
    """Keys map onto the frozen values, with start as aware UTC."""
    loaded = scenario_from_mapping(
        {
            "seed": 9,
            "start": "2026-11-23T08:00:00Z",
            "time_scale": 0,
            "quirks": False,
            "keys": [{"api_key": "a", "access_token": "b", "qps": 0, "daily": None}],
            "campaigns": {"audience": 5, "explicit": [{"id": "77", "send_at_s": -60}]},
            "faults": {"error_5xx_rate": 0.5},
        }
    )
    assert loaded.start == datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
    assert loaded.keys == (ApiKey("a", "b", qps=None, daily=None),)
    assert loaded.campaigns.audience == Audience(count=5)
    assert loaded.campaigns.explicit[0].send_at_s == -60
    assert loaded.faults.error_5xx_rate == 0.5
    assert not loaded.quirks


def test_audience_integer_is_a_count_and_decimal_a_fraction() -> None:
    """audience: 1 means one contact, 1.0 means everyone."""
    assert scenario_from_mapping({"campaigns": {"audience": 1}}).campaigns.audience == Audience(
        count=1
    )
    assert scenario_from_mapping({"campaigns": {"audience": 1.0}}).campaigns.audience == Audience(
        fraction=1.0
    )


def test_error_names_file_key_and_problem(tmp_path: Path) -> None:
    """A bad value in a file names the file, the key path, what was expected and what was got."""
    path = tmp_path / "sim.example.yaml"
    path.write_text("faults:\n  error_5xx_rate: lots\n")
    with pytest.raises(ScenarioError) as caught:
        load_scenario(path)
    assert str(caught.value) == (
        "sim.example.yaml: faults.error_5xx_rate: expected a number between 0 and 1, got 'lots'"
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param({"sede": 1}, "the top level: unknown key(s) sede", id="unknown-top"),
        pytest.param({"rates": {"opne": 0.1}}, "rates: unknown key(s) opne", id="unknown-nested"),
        pytest.param({"seed": "x"}, "seed: expected an integer", id="seed"),
        pytest.param({"seed": True}, "seed: expected an integer", id="seed-bool"),
        pytest.param({"time_scale": -1}, "time_scale: expected a number >= 0", id="scale"),
        pytest.param({"start": "soon"}, "start: expected an ISO 8601", id="start"),
        pytest.param({"quirks": "yes"}, "quirks: expected true or false", id="quirks"),
        pytest.param({"keys": []}, "keys: at least one api key", id="no-keys"),
        pytest.param({"keys": [{"api_key": "a"}]}, "keys[0].access_token: required", id="token"),
        pytest.param(
            {"keys": [{"api_key": "a", "access_token": "b"}] * 2}, "unique", id="dup-keys"
        ),
        pytest.param({"keys": {"api_key": "a"}}, "keys: expected a list", id="keys-mapping"),
        pytest.param(
            {"keys": [{"api_key": "a", "access_token": "b", "more_tokens": ["c", "b"]}]},
            "keys[0].more_tokens: access tokens of a key must be unique",
            id="dup-tokens",
        ),
        pytest.param(
            {"keys": [{"api_key": "a", "access_token": "b", "more_tokens": "c"}]},
            "keys[0].more_tokens: expected a list of non-empty strings",
            id="tokens-string",
        ),
        pytest.param({"contacts": 5}, "contacts: expected a mapping", id="contacts-scalar"),
        pytest.param({"contacts": {"count": 1.5}}, "contacts.count: expected an integer", id="c"),
        pytest.param(
            {"campaigns": {"count": 2, "already_sent": 3}},
            "campaigns.already_sent: expected an integer between 0 and 2, got 3",
            id="already-sent",
        ),
        pytest.param({"campaigns": {"links": 40}}, "campaigns.links", id="links"),
        pytest.param({"campaigns": {"audience": 1.5}}, "campaigns.audience", id="fraction"),
        pytest.param({"campaigns": {"audience": -1}}, "campaigns.audience", id="count"),
        pytest.param(
            {"campaigns": {"explicit": [{"id": "12ab", "send_at_s": 0}]}},
            "campaigns.explicit[0].id: expected a numeric id",
            id="explicit-id",
        ),
        pytest.param(
            {"campaigns": {"explicit": [{"id": "1100394165290", "send_at_s": 0}]}},
            "campaigns.explicit[0].id: campaign id 1100394165290 is used twice",
            id="explicit-clash",
        ),
        pytest.param(
            {"campaigns": {"explicit": [{"id": "5", "send_at_s": 0, "links": ["a"]}]}},
            "campaigns.explicit[0].links",
            id="explicit-links",
        ),
        pytest.param(
            {"rates": {"reopen": 1.0}}, "rates.reopen: expected a number between 0", id="r"
        ),
        pytest.param({"rates": {"send_batch": 0}}, "rates.send_batch", id="batch"),
        pytest.param({"faults": {"slow_s": "x"}}, "faults.slow_s", id="slow"),
        # every instant served lies in 1970..9999: out of it, dates failed to render (500s)
        pytest.param({"start": "1960-01-01T00:00:00Z"}, "start: 1960-01-01", id="start-early"),
        pytest.param({"start": "9999-06-01T00:00:00Z"}, "start: 9999-06-01", id="start-late"),
        pytest.param(
            {"start": "1970-01-02T00:00:00Z"},
            "contacts.count: the first of 40 contacts would be created at 1969-12-31T08:00:00Z",
            id="contacts-before-1970",
        ),
        pytest.param(
            {"campaigns": {"sent_every_s": 1e300}},
            "campaigns.sent_every_s: the first campaign would be sent before 1970",
            id="schedule-before-1970",
        ),
        pytest.param(
            {"campaigns": {"explicit": [{"id": "5", "send_at_s": -1e300}]}},
            "campaigns.explicit[0].send_at_s: the campaign would be sent before 1970",
            id="explicit-before-1970",
        ),
    ],
)
def test_errors_name_the_key(data: dict[str, object], message: str) -> None:
    """Every invalid value or unknown key raises ScenarioError naming the key path."""
    with pytest.raises(ScenarioError) as caught:
        scenario_from_mapping(data)
    assert message in str(caught.value)


def test_unknown_key_error_lists_the_known_ones() -> None:
    """An unknown key's message lists the keys that section knows."""
    with pytest.raises(ScenarioError, match=r"faults: unknown key\(s\) slowness \(known: .*slow_s"):
        scenario_from_mapping({"faults": {"slowness": 1}})


def test_yaml_syntax_error_is_a_scenario_error(tmp_path: Path) -> None:
    """Broken YAML raises ScenarioError with the file and line."""
    path = tmp_path / "broken.yaml"
    path.write_text("seed: 1\nrates: [unclosed\n")
    with pytest.raises(ScenarioError, match=r"broken.yaml: not valid YAML at line \d+"):
        load_scenario(path)


def test_missing_file_is_a_scenario_error(tmp_path: Path) -> None:
    """A missing file raises ScenarioError naming it."""
    with pytest.raises(ScenarioError, match="no such scenario file"):
        load_scenario(tmp_path / "absent.yaml")


def test_an_empty_path_says_it_is_empty() -> None:
    """An empty path (``sim --config ""``) says so, not that "." is a directory."""
    with pytest.raises(ScenarioError, match=r"^scenario file: the path is empty"):
        load_scenario("")


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    """A YAML list at the top level is rejected with the file name."""
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ScenarioError, match=r"list\.yaml: the top level: expected a mapping"):
        load_scenario(path)


def test_empty_file_is_the_default_scenario(tmp_path: Path) -> None:
    """An empty scenario file means every default."""
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert load_scenario(path) == Scenario()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(
            b"start: 2026-02-30T08:00:00Z\n",
            "s.yaml: start: expected an ISO 8601 date and time, got '2026-02-30T08:00:00Z'",
            id="no-30-february",
        ),
        pytest.param(
            b"start: 2026-11-23T08:00:00+25:00\n",
            "s.yaml: start: expected an ISO 8601 date and time, got '2026-11-23T08:00:00+25:00'",
            id="offset-out-of-range",
        ),
        pytest.param(
            b"start: 0001-01-01T00:00:00+01:00\n",
            "s.yaml: start: outside the years 1 to 9999 in UTC: '0001-01-01T00:00:00+01:00'",
            id="before-year-1-in-utc",
        ),
        pytest.param(
            b"seed: 7\n# caf\xe9 (latin-1)\n",
            "s.yaml: not UTF-8 text (byte 14; save it as UTF-8)",
            id="latin-1",
        ),
        pytest.param(
            b"start: !!timestamp 2026-02-30\n",
            "s.yaml: not valid YAML: a value does not fit its explicit tag",
            id="explicit-tag",
        ),
        pytest.param(
            b"campaigns:\n  explicit: &a [*a]\n",
            "s.yaml: campaigns.explicit[0]: expected a mapping of keys",
            id="alias-loop",
        ),
    ],
)
def test_ordinary_file_mistakes_are_scenario_errors(
    tmp_path: Path, content: bytes, message: str
) -> None:
    """A date that does not exist, an offset of 25 hours, a latin-1 file: ScenarioError naming
    the file and key (ValueError and UnicodeDecodeError tracebacks, through demo --scenario too)."""
    path = tmp_path / "s.yaml"
    path.write_bytes(content)
    with pytest.raises(ScenarioError) as caught:
        load_scenario(path)
    assert str(caught.value).startswith(message), caught.value


def test_scenario_yaml_keeps_text_as_written_like_the_relay_config(tmp_path: Path) -> None:
    """api_key: 0123 is the key "0123" (YAML 1.1 read octal 83, which the relay config, reading
    "0123", never matched); a start written as a timestamp is read as ISO 8601."""
    path = tmp_path / "s.yaml"
    path.write_text(
        "start: 2026-11-23T08:00:00Z\n"
        "keys:\n  - api_key: 0123\n    access_token: 0x1F\n"
        "campaigns:\n  explicit:\n    - {id: '7', send_at_s: -60, links: [0, 12]}\n"
    )
    scenario = load_scenario(path)
    assert [(k.api_key, k.access_token) for k in scenario.keys] == [("0123", "0x1F")]
    assert scenario.start == datetime(2026, 11, 23, 8, tzinfo=UTC)
    assert scenario.campaigns.explicit[0].links == ("0", "12")
