"""The SQLite store against a damaged or misplaced file: links, corruption, an emptied file."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from relay.store import CorruptError, SqliteStore, StoreError, open_store
from relay.store.migrations import MIGRATIONS
from tests.sqlitekit import damage_middle, filled_state

IN_USE = " (one relay per SQLite file; several replicas need a postgresql:// state)"


async def _refusal(url: str) -> str:
    """The error of an exclusive open of ``url`` that must be refused."""
    store = open_store(url, exclusive=True)
    with pytest.raises(StoreError) as refused:
        await store.open()
    await store.close()
    return str(refused.value)


async def test_a_symbolic_link_to_a_held_state_file_finds_its_lock(tmp_path: Path) -> None:
    """A link to the state file or to its directory names the same store: an exclusive open
    through it is refused while the file is held, naming both paths, and the other way round
    (the lock was taken beside the path as written: a second relay ran through a link)."""
    base = tmp_path  # pytest's is a real path already
    data = base / "data"
    data.mkdir()
    db = data / "state.db"
    (base / "alias.db").symlink_to(db)
    (base / "linked").symlink_to(data, target_is_directory=True)
    pid = os.getpid()
    held = open_store(f"sqlite:///{db}", exclusive=True)
    await held.open()
    try:
        for alias in (base / "alias.db", base / "linked" / "state.db"):
            said = await _refusal(f"sqlite:///{alias}")
            assert said == (
                f"state store {alias} (that is, {db}) is in use by another ctct-relay process"
                f" (pid {pid}){IN_USE}"
            )
    finally:
        await held.close()
    through_link = open_store(f"sqlite:///{base / 'alias.db'}", exclusive=True)
    await through_link.open()
    try:
        said = await _refusal(f"sqlite:///{db}")
        assert (
            said == f"state store {db} is in use by another ctct-relay process (pid {pid}){IN_USE}"
        )
    finally:
        await through_link.close()
    assert not (base / "alias.db.lock").exists()  # one lock file, beside the real one


async def test_a_state_file_with_hard_links_is_refused_by_the_relay(tmp_path: Path) -> None:
    """A hard link is another name no path resolves to the same lock, so the relay's store
    (exclusive) refuses a file with more than one, naming it and the way out; other opens and
    the file with its one name again are not stopped."""
    db = tmp_path / "state.db"
    url = f"sqlite:///{db}"
    await filled_state(db, events=10)
    other = tmp_path / "other.db"
    os.link(db, other)
    said = await _refusal(url)
    assert said.startswith(f"state store {db} has 2 hard links (names): ")
    assert f"-samefile {db}" in said
    plain = open_store(url)
    await plain.open()
    await plain.close()
    other.unlink()
    relay = open_store(url, exclusive=True)  # the refusal released the lock
    await relay.open()
    assert await relay.schema_version() == len(MIGRATIONS)
    await relay.close()


async def test_a_corrupt_page_is_a_corrupt_error_that_ends_the_store(tmp_path: Path) -> None:
    """A file damaged in the middle opens (SQLite reads its start only) and fails on the first
    read of a damaged page: a CorruptError (SQLITE_CORRUPT, not a StoreError to retry) naming
    the file and the way out; its listeners hear it once, and every later call is refused."""
    db = tmp_path / "state.db"
    await filled_state(db)
    damage_middle(db)
    store = SqliteStore(db)
    heard: list[StoreError] = []
    store.on_fatal(heard.append)
    await store.open()
    try:
        with pytest.raises(CorruptError) as found:
            await store.read_outbox(0, 10_000)
        message = str(found.value)
        assert message.startswith(
            f"state store {db} is corrupt (database disk image is malformed): "
        )
        assert "restore the file from a backup" in message
        assert f"sqlite3 {db} .recover | sqlite3 recovered.db" in message
        assert isinstance(found.value.__cause__, sqlite3.DatabaseError)
        assert heard == [found.value]
        with pytest.raises(CorruptError) as refused:
            await store.schema_version()  # reads an intact page: refused all the same
        assert str(refused.value) == message
        assert heard == [found.value]
    finally:
        await store.close()


async def test_a_file_that_is_not_a_database_is_a_corrupt_error(tmp_path: Path) -> None:
    """A state file whose header was overwritten (SQLITE_NOTADB) is refused at open with the
    CorruptError, not the plain "cannot open"."""
    db = tmp_path / "state.db"
    await filled_state(db, events=10)
    with db.open("r+b") as f:
        f.write(b"\x5a" * 100)
    store = open_store(f"sqlite:///{db}", exclusive=True)
    with pytest.raises(CorruptError, match=r"is corrupt \(file is not a database\): "):
        await store.open()
    await store.close()


async def test_an_empty_state_file_is_a_new_store_with_a_warning(tmp_path: Path) -> None:
    """An existing state file of 0 bytes (truncated) becomes a new store, with a warning naming
    it (the state it held is gone); a file the store creates itself, or reopens, warns of
    nothing."""
    fresh = tmp_path / "fresh.db"
    emptied = tmp_path / "state.db"
    await filled_state(emptied, events=10)
    os.truncate(emptied, 0)
    with capture_logs() as logs:
        for db in (fresh, emptied, fresh, emptied):
            store = open_store(f"sqlite:///{db}", exclusive=True)
            await store.open()
            assert await store.schema_version() == len(MIGRATIONS)
            assert await store.outbox_head() == 0
            await store.close()
    warned = [e for e in logs if e["event"] == "store.empty_file"]
    assert len(warned) == 1, logs
    assert warned[0]["log_level"] == "warning"
    assert warned[0]["path"] == str(emptied)
    assert "restore the file from a backup" in warned[0]["detail"]
