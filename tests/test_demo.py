"""What the demo's banner tells a user to run works in the user's shell as printed."""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

from relay.demo import relay_command

SCRIPTS = Path(sysconfig.get_path("scripts"))


def test_the_bare_name_when_path_finds_this_installation() -> None:
    """With the virtualenv on PATH (activated), ``ctct-relay`` is what to type."""
    assert relay_command(os.pathsep.join([str(SCRIPTS), "/usr/bin"])) == "ctct-relay"


def test_the_full_path_when_path_does_not_find_it(tmp_path: Path) -> None:
    """A fresh shell after ``make demo`` has no .venv/bin on PATH: the printed command is the
    full path of this installation's script (a bare ``ctct-relay`` was "command not found")."""
    printed = relay_command(str(tmp_path))
    assert printed == str(SCRIPTS / "ctct-relay")
    assert Path(printed).is_absolute()
    assert shutil.which(printed) == printed  # executable as printed


def test_the_full_path_when_path_finds_another_installation(tmp_path: Path) -> None:
    """Another ``ctct-relay`` first on PATH (another checkout's) would run other code: the full
    path of this one is printed."""
    other = tmp_path / "ctct-relay"
    other.write_text("#!/bin/sh\nexit 0\n")
    other.chmod(0o755)
    assert relay_command(os.pathsep.join([str(tmp_path), str(SCRIPTS)])) == str(
        SCRIPTS / "ctct-relay"
    )
