"""Store fixtures: every store test runs against each backend."""

from __future__ import annotations

import pytest

from relay.store import Store


@pytest.fixture
def store(any_store: Store) -> Store:
    """An opened, empty store of each backend (``any_store``, shared by every test package)."""
    return any_store
