"""Raw writes to a test store's database, behind the store's back: state an older relay (or
a hand edit) could leave, which the store's own calls no longer write."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import asyncpg

from relay.store import PostgresStore, Store


async def behind_the_store(store: Store, tmp_path: Path, sql: str) -> None:
    """Run ``sql`` on the database of ``store`` (the ``any_store`` fixture's: its SQLite file is
    ``tmp_path / "state.db"``) in a connection of its own, committed."""
    if isinstance(store, PostgresStore):
        pg = await asyncpg.connect(store._url)
        try:
            await pg.execute(sql)
        finally:
            await pg.close()
        return
    conn = sqlite3.connect(tmp_path / "state.db")
    try:
        with conn:
            conn.execute(sql)
    finally:
        conn.close()
