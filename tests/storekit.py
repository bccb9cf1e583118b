"""Raw writes to a test store's database, behind the store's back: state an older relay (or
a hand edit) could leave, which the store's own calls no longer write."""

from __future__ import annotations

import contextlib
import itertools
import re
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import asyncpg
import pytest

from relay.store import PostgresStore, Store
from relay.store.migrations import MIGRATIONS
from relay.store.pg_migrations import PG_MIGRATIONS


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


async def older_state(
    backend: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    version: int,
    insert: str,
    rows: Sequence[tuple[object, ...]],
) -> str:
    """The state an older relay left: a ``backend`` database ("sqlite": a file in ``tmp_path``;
    "postgresql": the ``postgres_url`` fixture's) with the first ``version`` migrations, each
    recorded as applied, and ``rows`` written by ``insert`` (``?`` placeholders); its URL."""
    if backend == "sqlite":
        path = tmp_path / "old.db"
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY)")
            for number, script in enumerate(MIGRATIONS[:version], start=1):
                for statement in script:
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (number,))
            conn.executemany(insert, rows)
            conn.commit()
        return f"sqlite:///{path}"
    url: str = request.getfixturevalue("postgres_url")
    numbers = itertools.count(1)
    pg = await asyncpg.connect(url)
    try:
        await pg.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY)")
        for number, script in enumerate(PG_MIGRATIONS[:version], start=1):
            for statement in script:
                await pg.execute(statement)
            await pg.execute("INSERT INTO schema_version (version) VALUES ($1)", number)
        await pg.executemany(re.sub(r"\?", lambda _: f"${next(numbers)}", insert), rows)
    finally:
        await pg.close()
    return url
