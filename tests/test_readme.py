"""The README stays true to the code: its configuration reference is the example file's."""

from __future__ import annotations

import time

import pytest

from relay.sinks import signing
from tests import configref


def test_configuration_reference_matches_the_example() -> None:
    """Every key of config/relay.example.yaml is in the README's reference with its default."""
    readme = configref.README.read_text()
    expected = configref.render_readme(readme, configref.EXAMPLE.read_text())
    assert readme == expected, "README.md is stale: run `python -m tests.configref`"


def test_reference_parser_reads_nesting_and_list_items() -> None:
    """Nested keys get dotted paths, list items `[]`, and the comment above names a section."""
    text = (
        "# Where state lives.\n"
        "store:\n"
        "  url: x   # the url\n"
        "hooks:\n"
        "  - url: a # one hook\n"
        "    tags: [b] # its tags\n"
        "top: 1\n"
    )
    got = [(k.path, k.default, k.meaning) for k in configref.keys(text)]
    assert got == [
        ("store", "", "Where state lives."),
        ("store.url", "x", "the url"),
        ("hooks", "", ""),
        ("hooks[].url", "a", "one hook"),
        ("hooks[].tags", "[b]", "its tags"),
        ("top", "1", ""),
    ]


def _python_block_defining(name: str) -> str:
    readme = configref.README.read_text()
    for block in readme.split("```python\n")[1:]:
        code = block.split("```", 1)[0]
        if f"def {name}(" in code:
            return code
    raise AssertionError(f"README.md has no python block defining {name}()")


def test_readme_signature_check_accepts_the_relay_and_rejects_tampering() -> None:
    """The README's library-free verifier accepts our signatures, rotation included."""
    scope: dict[str, object] = {}
    exec(_python_block_defining("verify"), scope)  # noqa: S102 - the README's own snippet
    verify = scope["verify"]
    assert callable(verify)
    old, new = signing.generate_secret(), signing.generate_secret()
    body = b'{"specversion":"1.0","id":"e1"}'
    headers = signing.headers([new, old], "e1", int(time.time()), body)
    verify(old, headers, body)
    verify(new, headers, body)
    with pytest.raises(ValueError, match="bad webhook-signature"):
        verify(old, headers, body + b" ")
    with pytest.raises(ValueError, match="bad webhook-signature"):
        verify(signing.generate_secret(), headers, body)
    stale = signing.headers([new], "e1", int(time.time()) - 3600, body)
    with pytest.raises(ValueError, match="stale"):
        verify(new, stale, body)
