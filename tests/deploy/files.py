"""The deployment files as data: Dockerfile instructions, the compose file, the manifests, tools."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "deploy" / "docker-compose.yml"
K8S = ROOT / "deploy" / "k8s"
HEALTHCHECK = ROOT / "deploy" / "healthcheck.py"
# The Kubernetes version whose schemas the manifests are checked against; make lint uses the same.
K8S_VERSION = "1.33.0"
# The venv's console scripts: ctct-relay and the linters installed with the dev extras.
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction: keyword, flags (``--from=build``) and the rest of the line."""

    keyword: str
    flags: tuple[str, ...]
    args: str
    stage: int  # index of the FROM it belongs to

    def exec_form(self) -> list[str]:
        """The JSON array of an exec-form instruction (ENTRYPOINT, CMD, VOLUME, HEALTHCHECK CMD)."""
        text = self.args.removeprefix("CMD").strip() if self.keyword == "HEALTHCHECK" else self.args
        value = json.loads(text)
        assert isinstance(value, list), f"{self.keyword}: not an exec-form array: {self.args}"
        return [str(v) for v in value]


def dockerfile(path: Path = DOCKERFILE) -> list[Instruction]:
    """The instructions in order; continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "Dockerfile ends with a continuation"
    instructions = []
    stage = -1
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        flags = []
        rest = rest.strip()
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            flags.append(flag)
            rest = rest.strip()
        instructions.append(Instruction(keyword, tuple(flags), rest, stage))
    return instructions


def only(instructions: list[Instruction], keyword: str) -> Instruction:
    """The single instruction of that keyword in the final stage."""
    last = max(i.stage for i in instructions)
    found = [i for i in instructions if i.keyword == keyword and i.stage == last]
    assert len(found) == 1, f"expected one {keyword} in the runtime stage, found {found}"
    return found[0]


def copied_from(instructions: list[Instruction], target: str) -> Path:
    """The repository file a runtime-stage ``COPY <src> <target>`` puts at ``target``."""
    last = max(i.stage for i in instructions)
    for i in instructions:
        if i.keyword == "COPY" and i.stage == last and not i.flags:
            src, dest = i.args.split()
            if dest == target:
                return ROOT / src
    raise AssertionError(f"no COPY in the runtime stage puts a file at {target}")


def compose() -> dict[str, object]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def manifests() -> dict[str, dict[str, object]]:
    """Every Kubernetes manifest of deploy/k8s by file name (kustomization.yaml apart)."""
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
            assert len(docs) == 1, f"{path.name}: expected one resource, found {len(docs)}"
            found[path.name] = docs[0]
    return found


def tool(
    name: str, *args: str, env: dict[str, str] | None = None, unset: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Run a linter installed in the venv by the dev extras; its absence is a failure."""
    base = {k: v for k, v in os.environ.items() if k not in unset}
    exe = BIN / name
    assert exe.exists(), f"{exe} is missing: install the dev extras (make venv)"
    return subprocess.run(
        [str(exe), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**base, **(env or {})},
        check=False,
    )
