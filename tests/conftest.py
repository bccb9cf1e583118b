"""Shared fixtures: every test leaves logging as it found it; an empty SQLite store. Hooks: under
pytest-xdist, tests marked ``serial`` take their turn alone (tests/turns.py)."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import structlog

from relay.store import Store, open_store
from tests import pgkit, turns

if TYPE_CHECKING:
    from xdist.workermanage import WorkerController

_TURNS_DIR = pytest.StashKey[Path]()
_TURNS = pytest.StashKey[turns.Turns]()


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: WorkerController) -> None:
    """(xdist controller) Every worker of the run gets the one directory of its turn locks."""
    config = node.config
    if _TURNS_DIR not in config.stash:
        config.stash[_TURNS_DIR] = Path(tempfile.mkdtemp(prefix="ctct-relay-turns-"))
    node.workerinput[turns.WORKER_INPUT_KEY] = str(config.stash[_TURNS_DIR])


def pytest_unconfigure(config: pytest.Config) -> None:
    directory = config.stash.get(_TURNS_DIR, None)
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)


def _turns_dir(config: pytest.Config) -> Path | None:
    """(xdist worker) The directory of the run's turn locks; None outside pytest-xdist."""
    workerinput: dict[str, object] = getattr(config, "workerinput", {})
    directory = workerinput.get(turns.WORKER_INPUT_KEY)
    return Path(directory) if isinstance(directory, str) else None


def _serial(item: pytest.Item | None) -> bool:
    return item is not None and item.get_closest_marker(turns.MARK) is not None


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """(xdist worker) Serial tests first: one worker runs them back to back at the start (every
    worker sorts alike, as xdist requires), rather than each waiting for a long test to end."""
    if _turns_dir(config) is not None:
        items.sort(key=lambda item: not _serial(item))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_protocol(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, object, object]:
    """(xdist worker) Each test waits for its turn: alone when marked ``serial``. Outside
    pytest-timeout's hook, so the wait never counts against the test's own timeout."""
    config = item.config
    directory = _turns_dir(config)
    if directory is None:
        return (yield)  # not under xdist: every test runs alone anyway
    if _TURNS not in config.stash:
        config.stash[_TURNS] = turns.Turns(directory)
    with config.stash[_TURNS].turn(alone=_serial(item), alone_next=_serial(nextitem)):
        return (yield)


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


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a PostgreSQL server for the session: ``$RELAY_TEST_POSTGRES_URL`` or
    ``$DATABASE_URL`` when set, else a throwaway cluster (its log is kept for failures)."""
    external = pgkit.external_url()
    if external:
        yield external
        return
    try:
        cluster = pgkit.Cluster().start()
    except pgkit.PgKitError as exc:
        error = str(exc)
    else:
        error = ""
    if error:
        pytest.fail(f"cannot start PostgreSQL: {error}", pytrace=False)
    try:
        yield cluster.url
    finally:
        kept = tmp_path_factory.mktemp("postgres") / "server.log"
        if cluster.log.exists():
            shutil.copyfile(cluster.log, kept)
        print(f"PostgreSQL server log: {kept}")
        cluster.destroy()


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh, empty database on the session's server, dropped after the test."""
    url = pgkit.fresh_database(postgres_server)
    yield url
    pgkit.remove_database(postgres_server, url)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    """An opened, empty SQLite store (tests/store runs its tests on every backend instead)."""
    opened = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await opened.open()
    yield opened
    await opened.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """An opened, empty store of each backend (tests/store runs every test on it)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'state.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    opened = open_store(url)
    await opened.open()
    yield opened
    await opened.close()
