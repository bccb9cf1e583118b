"""Shared fixtures: every test leaves logging as it found it."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import structlog


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """Undo logs.configure() so one test's stream never receives another's lines."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    # debug lines of every request would drown pytest's report of a failure
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    yield
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


from tests.simkit import make_sim, sim  # noqa: E402, F401 - fixtures shared by every test package
