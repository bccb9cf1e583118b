"""The README's configuration reference, derived from ``config/relay.example.yaml``.

The example file is the single source: every key with its default and its comment. This module
turns it into the Markdown table between the README's ``config-reference`` markers;
``tests/test_readme.py`` fails when the two differ, and ``python -m tests.configref`` rewrites
the README's copy.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config" / "relay.example.yaml"
README = ROOT / "README.md"
START = (
    "<!-- config-reference:start"
    " (generated from config/relay.example.yaml by python -m tests.configref) -->"
)
END = "<!-- config-reference:end -->"

_LINE = re.compile(r"^(?P<indent> *)(?P<item>- )?(?P<key>[a-z_0-9]+):(?P<rest>.*)$")


@dataclass(frozen=True)
class Key:
    """One documented key: its dotted path (``[]`` for list items), default and meaning."""

    path: str
    default: str
    meaning: str


def _split_comment(rest: str) -> tuple[str, str]:
    value, _, comment = rest.partition(" # ")
    if not _ and rest.strip().startswith("#"):
        return "", rest.strip().lstrip("#").strip()
    return value.strip(), comment.strip()


def keys(text: str) -> list[Key]:
    """Every key of the example, in file order (section headers included, list items as ``[]``)."""
    stack: list[tuple[int, str]] = []  # (indent of the key, path segment)
    found: list[Key] = []
    above = ""  # the comment line right above a key explains a section without its own comment
    for line in text.splitlines():
        match = _LINE.match(line)
        if not match:
            above = line.lstrip("# ").strip() if line.startswith("#") else ""
            continue
        indent = len(match["indent"])
        if match["item"]:
            # "- key:" opens a list item of the key above: the item's keys sit at indent + 2
            while stack and stack[-1][0] >= indent:
                stack.pop()
            if stack:
                stack[-1] = (stack[-1][0], stack[-1][1].removesuffix("[]") + "[]")
            indent += 2
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([segment for _, segment in stack] + [match["key"]])
        value, comment = _split_comment(match["rest"])
        found.append(Key(path, value, comment or above))
        above = ""
        stack.append((indent, match["key"]))
    return found


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def table(text: str) -> str:
    """The Markdown table of every key of the example."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key in keys(text):
        default = f"`{_cell(key.default)}`" if key.default else ""
        rows.append(f"| `{key.path}` | {default} | {_cell(key.meaning)} |")
    return "\n".join(rows)


def render_readme(readme: str, example: str) -> str:
    """The README with its reference block replaced by the table of ``example``."""
    head, start, rest = readme.partition(START)
    _, end, tail = rest.partition(END)
    if not start or not end:
        raise ValueError(f"README.md: the markers {START!r} and {END!r} are missing")
    return f"{head}{START}\n{table(example)}\n{END}{tail}"


def main() -> int:
    """Rewrite the README's configuration reference from the example."""
    README.write_text(render_readme(README.read_text(), EXAMPLE.read_text()))
    print(f"{README}: configuration reference regenerated from {EXAMPLE.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
