"""The shipped configs load through the relay's own loader, with the environment they are given."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from relay import config
from relay.sim import load_scenario
from tests.deploy.files import COMPOSE, ROOT, dockerfile, manifests, only, tool

CONFIGS = sorted((ROOT / "config").glob("*.yaml"))
SECRETS = {
    "CTCT_API_KEY": "deploy-test-api-key",
    "CTCT_ACCESS_TOKEN": "deploy-test-access-token",
    "CTCT_RELAY_ADMIN_TOKEN": "deploy-test-admin-token",
    "POSTGRES_PASSWORD": "deploy-test-pg-password",
}


def k8s_config(tmp_path: Path) -> Path:
    """The relay.yaml of the Kubernetes ConfigMap, written out as the pod sees it."""
    configmap = next(m for m in manifests().values() if m["kind"] == "ConfigMap")
    path = tmp_path / "relay.yaml"
    path.write_text(configmap["data"]["relay.yaml"])
    return path


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_file_loads(path: Path) -> None:
    """config/*.yaml: relay configs through relay.config.load, scenarios through the simulator's."""
    if path.name.startswith("sim"):
        assert load_scenario(path).keys
        return
    settings = config.load(path, SECRETS)
    assert settings.accounts
    # whatever the file takes from the environment is a secret the logs scrub
    taken = {v for k, v in SECRETS.items() if "${" + k + "}" in path.read_text()}
    assert taken <= set(settings.secrets())


def test_container_config_keeps_state_on_the_volume() -> None:
    """SQLite state in the image's state VOLUME; the admin API where the HEALTHCHECK looks."""
    settings = config.load(ROOT / "config" / "relay.container.yaml", SECRETS)
    volumes = only(dockerfile(), "VOLUME").exec_form()
    assert settings.state == "sqlite:////var/lib/ctct-relay/relay-state.db"
    assert settings.state.removeprefix("sqlite:///").rsplit("/", 1)[0] in volumes
    check_url = only(dockerfile(), "HEALTHCHECK").exec_form()[-1]
    assert check_url == f"http://127.0.0.1:{settings.admin.port}/healthz"
    assert settings.admin.host == "0.0.0.0"
    assert settings.admin.token == SECRETS["CTCT_RELAY_ADMIN_TOKEN"]
    assert settings.accounts[0].base_url == "https://api.constantcontact.com"
    assert settings.kafka is None


def test_container_config_gains_kafka_from_one_variable() -> None:
    """CTCT_RELAY_KAFKA__BOOTSTRAP_SERVERS adds the Kafka sink, as the file's comment says."""
    env = {**SECRETS, "CTCT_RELAY_KAFKA__BOOTSTRAP_SERVERS": "broker:9092"}
    settings = config.load(ROOT / "config" / "relay.container.yaml", env)
    assert settings.kafka is not None
    assert settings.kafka.bootstrap_servers == "broker:9092"


@pytest.mark.parametrize("missing", ["CTCT_API_KEY", "CTCT_ACCESS_TOKEN", "CTCT_RELAY_ADMIN_TOKEN"])
def test_container_config_names_a_missing_secret(missing: str) -> None:
    """A container started without one of its secrets stops with the variable's name."""
    env = {k: v for k, v in SECRETS.items() if k != missing}
    with pytest.raises(config.ConfigError, match=f"environment variable {missing} is not set"):
        config.load(ROOT / "config" / "relay.container.yaml", env)


def compose_relay() -> tuple[Path, dict[str, str]]:
    """The config file the compose relay reads and its environment, as the Compose CLI has them."""
    result = tool(
        "docker-compose",
        *("-f", str(COMPOSE), "config", "--format", "json"),
        env={"CTCT_RELAY_ADMIN_TOKEN": SECRETS["CTCT_RELAY_ADMIN_TOKEN"]},
        unset=("POSTGRES_PASSWORD",),
    )
    assert result.returncode == 0, result.stderr
    relay = json.loads(result.stdout)["services"]["relay"]
    (mount,) = [v for v in relay["volumes"] if v["target"] == "/etc/ctct-relay"]
    command = relay["command"]
    inside = command[command.index("--config") + 1]
    path = Path(mount["source"]) / inside.removeprefix(mount["target"] + "/")
    environment = {k: str(v) for k, v in relay["environment"].items()}
    return path, environment


def test_compose_config_loads_with_the_compose_environment() -> None:
    """PostgreSQL state, the compose broker, the simulator with its demo key, the given token."""
    path, environment = compose_relay()
    assert path == ROOT / "config" / "relay.compose.yaml"
    settings = config.load(path, environment)
    password = environment["POSTGRES_PASSWORD"]
    assert settings.state == f"postgresql://ctct_relay:{password}@postgres:5432/ctct_relay"
    assert password in settings.secrets()
    assert settings.kafka is not None
    assert settings.kafka.bootstrap_servers == "kafka:9092"
    assert settings.kafka.create_topics
    account = settings.accounts[0]
    assert account.base_url == "http://sim:8080"
    scenario = load_scenario(ROOT / "config" / "sim.example.yaml")
    assert (account.api_key.reveal(), account.access_token.reveal()) == (
        scenario.keys[0].api_key,
        scenario.keys[0].access_token,
    )
    assert settings.admin.token == SECRETS["CTCT_RELAY_ADMIN_TOKEN"]


def pod_environment() -> dict[str, str]:
    """The Deployment's env, with each secretKeyRef filled from a Secret holding test values."""
    secret = {
        "api-key": SECRETS["CTCT_API_KEY"],
        "access-token": SECRETS["CTCT_ACCESS_TOKEN"],
        "admin-token": SECRETS["CTCT_RELAY_ADMIN_TOKEN"],
        "postgres-password": SECRETS["POSTGRES_PASSWORD"],
    }
    deployment = next(m for m in manifests().values() if m["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    environment = service_links() if pod.get("enableServiceLinks", True) else {}
    for var in container["env"]:
        if "value" in var:
            environment[var["name"]] = var["value"]
        else:
            environment[var["name"]] = secret[var["valueFrom"]["secretKeyRef"]["key"]]
    return environment


def service_links() -> dict[str, str]:
    """The variables the kubelet adds for each Service of the namespace when the pod spec leaves
    enableServiceLinks at its default (true), as Docker links named them (an example IP)."""
    environment = {}
    for service in (m for m in manifests().values() if m["kind"] == "Service"):
        prefix = service["metadata"]["name"].upper().replace("-", "_")
        ports = service["spec"]["ports"]
        ip = "10.96.12.34"
        environment[f"{prefix}_SERVICE_HOST"] = ip
        environment[f"{prefix}_SERVICE_PORT"] = str(ports[0]["port"])
        environment[f"{prefix}_PORT"] = f"tcp://{ip}:{ports[0]['port']}"
        for port in ports:
            number, protocol = port["port"], port.get("protocol", "TCP")
            if "name" in port:
                name = port["name"].upper().replace("-", "_")
                environment[f"{prefix}_SERVICE_PORT_{name}"] = str(number)
            link = f"{prefix}_PORT_{number}_{protocol}"
            environment[link] = f"{protocol.lower()}://{ip}:{number}"
            environment[f"{link}_PROTO"] = protocol.lower()
            environment[f"{link}_PORT"] = str(number)
            environment[f"{link}_ADDR"] = ip
    return environment


def test_service_links_would_stop_the_relay(tmp_path: Path) -> None:
    """What enableServiceLinks: false keeps out: with them, the relay names the variables."""
    links = service_links()
    assert "CTCT_RELAY_SERVICE_HOST" in links
    environment = {k: v for k, v in pod_environment().items() if k not in links}
    with pytest.raises(config.ConfigError) as caught:
        config.load(k8s_config(tmp_path), {**environment, **links})
    assert "(from CTCT_RELAY_SERVICE_HOST)" in str(caught.value)
    assert "enableServiceLinks: false" in str(caught.value)


def test_k8s_configmap_config_loads(tmp_path: Path) -> None:
    """The ConfigMap's relay.yaml loads with the environment the Deployment gives the pod,
    service-link variables included unless the pod spec turns them off."""
    settings = config.load(k8s_config(tmp_path), pod_environment())
    assert settings.state.startswith("postgresql://ctct_relay:")
    assert SECRETS["POSTGRES_PASSWORD"] in settings.secrets()
    assert settings.kafka is not None
    assert settings.admin.token == SECRETS["CTCT_RELAY_ADMIN_TOKEN"]
    assert settings.accounts[0].api_key.reveal() == SECRETS["CTCT_API_KEY"]
    assert settings.accounts[0].access_token.reveal() == SECRETS["CTCT_ACCESS_TOKEN"]


def test_k8s_configmap_config_documents_only_real_keys(tmp_path: Path) -> None:
    """Every key of the embedded config appears in config/relay.example.yaml (no invented keys)."""
    example = yaml.safe_load((ROOT / "config" / "relay.example.yaml").read_text())
    embedded = yaml.safe_load(k8s_config(tmp_path).read_text())

    def paths(node: object, prefix: str = "") -> set[str]:
        if isinstance(node, dict):
            return {p for k, v in node.items() for p in paths(v, f"{prefix}{k}.")} | {
                f"{prefix}{k}" for k in node
            }
        if isinstance(node, list) and node and isinstance(node[0], dict):
            return paths(node[0], prefix)
        return set()

    assert paths(embedded) <= paths(example)
