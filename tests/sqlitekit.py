"""Real SQLite state files in known bad shapes, for the tests of how the relay meets them."""

from __future__ import annotations

import random
from pathlib import Path

from relay.events import Activity, Kind, from_millis
from relay.store import StreamKey, open_store

T0 = 1_763_000_000_000


async def filled_state(db: Path, events: int = 3000) -> None:
    """A state file holding ``events`` committed events and their dedup keys, closed (so its
    write-ahead log is checkpointed into the file and removed)."""
    store = open_store(f"sqlite:///{db}")
    await store.open()
    try:
        key = StreamKey("acme", "campaign", "1100394165290")
        await store.ensure_streams([key], T0)
        stream = (await store.streams())[0].id
        page = [
            Activity(
                account="acme",
                kind=Kind.OPEN,
                campaign_id=key.resource_id,
                contact_id=str(n),
                email_address=f"c{n}@example.com",
                occurred_at=from_millis(T0 + n),
            )
            for n in range(events)
        ]
        await store.commit_page(stream, page, T0)
    finally:
        await store.close()


def damage_middle(db: Path, seed: int = 13) -> None:
    """Overwrite the middle half of the file with random bytes: pages of its big tables and
    indexes, not the header or the schema at its start (which SQLite reads on opening it)."""
    size = db.stat().st_size
    with db.open("r+b") as f:
        f.seek(size // 4)
        f.write(random.Random(seed).randbytes(size // 2))
