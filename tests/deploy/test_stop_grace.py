"""The relay's shutdown fits inside the grace its deployments give a stopping container."""

from __future__ import annotations

import re

from relay import app
from relay.api.app import SHUTDOWN_GRACE_S
from relay.sinks import kafka
from tests.deploy.files import compose, manifests

# What the rest of a stop needs besides the admin API's and the sinks' graces (scheduler, HTTP
# session, store) and the time a signal takes to arrive.
REST_OF_STOP_S = 10.0


def k8s_grace_s() -> float:
    [deployment] = [m for m in manifests().values() if m["kind"] == "Deployment"]
    spec = deployment["spec"]
    assert isinstance(spec, dict)
    return float(spec["template"]["spec"]["terminationGracePeriodSeconds"])


def compose_grace_s() -> float:
    services = compose()["services"]
    assert isinstance(services, dict)
    text = str(services["relay"].get("stop_grace_period", "10s"))  # Docker's default: 10 s
    match = re.fullmatch(r"(\d+)s", text)
    assert match, f"stop_grace_period: expected whole seconds like 40s, got {text!r}"
    return float(match[1])


def test_the_sinks_grace_fits_in_the_kubernetes_grace_with_room_for_the_rest() -> None:
    """The admin API's grace (its cleanup runs first) plus SINK_GRACE_S plus the rest of the
    stop stays within terminationGracePeriodSeconds (the sinks' was 45 s against 40: Kubernetes
    killed a relay still waiting for its Kafka sink; the admin API's was aiohttp's 60 s)."""
    assert k8s_grace_s() >= SHUTDOWN_GRACE_S + app.SINK_GRACE_S + REST_OF_STOP_S


def test_the_compose_relay_gets_the_same_grace_as_on_kubernetes() -> None:
    """docker compose stop waits as long as Kubernetes (Docker's default, 10 s, is shorter
    than a stop with the broker down)."""
    assert compose_grace_s() == k8s_grace_s()


def test_each_owner_waits_longer_than_what_it_stops() -> None:
    """The Kafka sink's longest stop < its lease owner's grace < the sinks' grace: the sink
    is cut off by nobody when it ends in time, and its owner gives the lease back first."""
    assert kafka.STOP_MAX_S < app.KAFKA_GRACE_S < app.SINK_GRACE_S
