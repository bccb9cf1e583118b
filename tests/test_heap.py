"""The garbage collector's policy of a running relay: start-up's heap frozen, young collections
rarer (relay.heap), applied by ``run_relay`` once it has started."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from relay.app import run_relay
from relay.config import load
from relay.heap import GEN0_THRESHOLD, settle_after_startup
from tests.procs import free_port
from tests.simkit import API_KEY, TOKEN, MakeSim


@pytest.fixture(autouse=True)
def _restore_gc() -> Iterator[None]:
    """The policy is process-wide: give the rest of the test session the collector it had."""
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


class _Node:
    """A container that can be part of a reference cycle and be weakly referenced."""

    def __init__(self) -> None:
        self.other: _Node | None = None


def test_settle_collects_start_up_garbage_then_freezes_what_lives() -> None:
    """A cycle that is already garbage is collected; a live object is exempted from later
    collections; the young generation's threshold rises, the older ones' stay."""
    gc.unfreeze()
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    garbage = weakref.ref(a)
    del a, b
    kept = _Node()
    _, gen1, gen2 = gc.get_threshold()
    settle_after_startup()
    assert garbage() is None
    assert gc.get_freeze_count() > 0
    assert not any(kept is o for o in gc.get_objects())  # frozen: in no generation
    assert gc.get_threshold() == (GEN0_THRESHOLD, gen1, gen2)


async def test_run_relay_settles_the_heap_once_started(make_sim: MakeSim, tmp_path: Path) -> None:
    """``run_relay`` applies the policy after start-up when asked, as ``ctct-relay run`` asks;
    tests and the demo running it inside another process leave that process's collector alone."""
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
    sim = await make_sim()
    config = {
        "state": f"sqlite:///{tmp_path / 'state.db'}",
        "accounts": [
            {"name": "acme", "base_url": sim.url, "api_key": API_KEY, "access_token": TOKEN}
        ],
        "admin": {"port": free_port(), "token": "heap-test-admin-token"},
        "logging": {"level": "warning"},
    }
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(config))
    stop = asyncio.Event()
    relay = asyncio.create_task(run_relay(load(path, environ={}), stop, settle_heap=True))
    try:
        deadline = time.monotonic() + 20
        while gc.get_threshold()[0] != GEN0_THRESHOLD and not relay.done():
            assert time.monotonic() < deadline, "run_relay started without settling the heap"
            await asyncio.sleep(0.05)
        assert gc.get_freeze_count() > 0
    finally:
        stop.set()
        await relay
