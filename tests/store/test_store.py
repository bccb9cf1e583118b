"""The store contract, for every backend: streams, exactly-once pages, watermarks, quota, outbox."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from pathlib import Path

import asyncpg
import orjson
import pytest

from relay.events import WILDCARD, Activity, Kind, from_millis
from relay.store import (
    Attempt,
    Behind,
    DisabledError,
    DueSend,
    DuplicateError,
    GoneError,
    NotFoundError,
    OutboxEvent,
    PassResult,
    PostgresStore,
    ReplayRequest,
    Store,
    StoreError,
    StreamKey,
    StreamRate,
    UnwantedError,
    Webhook,
    open_store,
    rowmap,
)
from relay.store import postgres as postgres_store
from relay.store import sqlite as sqlite_store
from relay.store.migrations import MIGRATIONS
from tests.storekit import behind_the_store, older_state

T0 = 1_763_000_000_000
KEY = StreamKey("acme", "campaign", "1100394165290")
ALL_KINDS = [kind.value for kind in Kind]  # every outbox kind (a due read asks for some)


def activity(contact: int, ms: int, kind: Kind = Kind.OPEN, account: str = "acme") -> Activity:
    return Activity(
        account=account,
        kind=kind,
        campaign_id="1100394165290",
        contact_id=str(contact),
        email_address=f"c{contact}@example.com",
        occurred_at=from_millis(ms),
        link_id="1" if kind is Kind.CLICK else None,
    )


async def one_stream(store: Store) -> int:
    await store.ensure_streams([KEY], T0)
    return (await store.streams())[0].id


async def test_migrations_applied_and_idempotent(store: Store, tmp_path: Path) -> None:
    """A new store is at the latest schema version; reopening applies nothing twice."""
    assert await store.schema_version() == len(MIGRATIONS)


async def test_ensure_streams_creates_once(store: Store) -> None:
    """Listing a stream twice creates it once; a retired stream listed again is revived."""
    assert await store.ensure_streams([KEY], T0) == 1
    assert await store.ensure_streams([KEY], T0 + 5) == 0
    await store.retire_streams([KEY])
    assert (await store.streams())[0].retired
    await store.ensure_streams([KEY], T0)
    stream = (await store.streams())[0]
    assert not stream.retired
    assert stream.next_due_ms == T0


async def test_commit_page_appends_only_unseen_activity(store: Store) -> None:
    """The same activity committed twice (other page, other scope) is one event."""
    sid = await one_stream(store)
    page = [activity(1, T0), activity(2, T0), activity(3, T0 + 1)]
    assert await store.commit_page(sid, page, T0) == 3
    assert await store.commit_page(sid, [activity(2, T0), activity(4, T0 + 2)], T0) == 1
    events = await store.read_outbox(0, 100)
    assert [e.contact_id for e in events] == ["1", "2", "3", "4"]
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    assert len({e.event_id for e in events}) == 4
    assert await store.dedup_count() == 4


async def test_commit_page_drops_repeats_within_one_page(store: Store) -> None:
    """An activity listed twice in one page (paging shifted under us) is committed once."""
    sid = await one_stream(store)
    page = [activity(1, T0), activity(2, T0), activity(1, T0), activity(3, T0), activity(2, T0)]
    assert await store.commit_page(sid, page, T0) == 3
    assert [e.contact_id for e in await store.read_outbox(0, 10)] == ["1", "2", "3"]


async def test_commit_page_larger_than_one_lookup_keeps_order_and_dedups(store: Store) -> None:
    """A chunk bigger than one dedup lookup: old keys dropped, new ones appended in order."""
    sid = await one_stream(store)
    await store.commit_page(sid, [activity(i, T0) for i in range(0, 1300, 2)], T0)
    page = [activity(i, T0) for i in range(1300)]
    assert await store.commit_page(sid, page, T0) == 650
    events = await store.read_outbox(650, 2000)
    assert [e.contact_id for e in events] == [str(i) for i in range(1, 1300, 2)]
    assert [e.event_id for e in events] == [a.event_id for a in page[1::2]]
    assert await store.dedup_count() == 1300


async def test_seeding_absorbs_without_emitting(store: Store) -> None:
    """A page committed with emit=False fills dedup but the outbox stays empty."""
    sid = await one_stream(store)
    assert await store.commit_page(sid, [activity(1, T0)], T0, emit=False) == 1
    assert await store.read_outbox(0, 10) == []
    assert await store.commit_page(sid, [activity(1, T0)], T0) == 0


async def test_same_activity_of_two_accounts_is_two_events(store: Store) -> None:
    """Dedup is per account: lookalike activity of another account is its own event."""
    sid = await one_stream(store)
    await store.commit_page(sid, [activity(1, T0, account="a")], T0)
    assert await store.commit_page(sid, [activity(1, T0, account="b")], T0) == 1


async def test_watermarks_never_move_backwards(store: Store) -> None:
    """finish_pass keeps the newer of the stored and the offered watermark."""
    sid = await one_stream(store)
    result = PassResult({Kind.OPEN: T0 + 100}, {"opens": 3}, T0 + 60_000, 12.5, T0)
    await store.finish_pass(sid, result)
    await store.finish_pass(sid, PassResult({Kind.OPEN: T0, Kind.CLICK: T0}, {}, T0, 1.0, T0))
    stream = await store.stream(sid)
    assert stream.watermarks == {Kind.OPEN: T0 + 100, Kind.CLICK: T0}
    assert stream.rate_per_h == 1.0


async def test_feeds_behind_their_summary_are_kept_until_a_pass_clears_them(
    store: Store,
) -> None:
    """finish_pass stores the pass's feeds behind their summary count, replacing the stream's
    (a pass that leaves none clears them); they are read back with the stream."""
    sid = await one_stream(store)
    assert (await store.stream(sid)).behind == {}
    behind = {Kind.BOUNCE: Behind(T0, 1), Kind.FORWARD: Behind(T0 + 5, 2)}
    await store.finish_pass(sid, PassResult({}, {"bounces": 1}, T0, 1.0, T0, behind=behind))
    assert (await store.stream(sid)).behind == behind
    assert [s.behind for s in await store.streams()] == [behind]
    await store.finish_pass(sid, PassResult({}, {"bounces": 1}, T0, 1.0, T0))
    assert (await store.stream(sid)).behind == {}


async def test_the_history_line_is_fixed_by_the_first_pass_that_offers_one(
    store: Store,
) -> None:
    """finish_pass stores a stream's history line when it has none; later passes, offering
    none or another, leave it."""
    sid = await one_stream(store)
    assert (await store.stream(sid)).line_ms is None
    await store.finish_pass(sid, PassResult({}, {}, T0, 1.0, T0))
    assert (await store.stream(sid)).line_ms is None
    await store.finish_pass(sid, PassResult({}, {}, T0, 1.0, T0, line_ms=T0 - 86400_000))
    await store.finish_pass(sid, PassResult({}, {}, T0, 1.0, T0, line_ms=T0 - 85000_000))
    await store.finish_pass(sid, PassResult({}, {}, T0, 1.0, T0))
    assert (await store.stream(sid)).line_ms == T0 - 86400_000


async def test_errors_back_off_and_retire(store: Store) -> None:
    """record_error counts, keeps the message, reschedules; a pass clears the count."""
    sid = await one_stream(store)
    await store.record_error(sid, "boom", T0 + 30_000)
    await store.record_error(sid, "boom again", T0 + 90_000)
    stream = await store.stream(sid)
    assert (stream.consecutive_errors, stream.last_error) == (2, "boom again")
    assert await store.due_streams(T0 + 60_000, 10) == []
    await store.finish_pass(sid, PassResult({}, {}, T0, 0.0, T0))
    assert (await store.stream(sid)).consecutive_errors == 0
    await store.record_error(sid, "gone", T0, retire=True)
    assert await store.due_streams(T0 + 10**9, 10) == []


async def test_due_streams_soonest_first_and_skips_paused(store: Store) -> None:
    """Due streams come soonest first; paused and retired ones never."""
    keys = [StreamKey("acme", "contact", str(i)) for i in range(3)]
    await store.ensure_streams(keys, T0)
    ids = [s.id for s in await store.streams()]
    for offset, sid in zip((300, 100, 200), ids, strict=True):
        await store.finish_pass(sid, PassResult({}, {}, T0 + offset, 1.0, T0))
    await store.set_paused(ids[2], True)
    assert await store.due_streams(T0 + 1000, 10) == [ids[1], ids[0]]
    assert await store.stream_rates() == {
        ids[0]: StreamRate("acme", 1.0),
        ids[1]: StreamRate("acme", 1.0),
    }
    await store.ensure_streams([StreamKey("globex", "contact", "9")], T0 - 1)
    [theirs] = [s.id for s in await store.streams("globex")]
    assert (await store.stream_rates())[theirs] == StreamRate("globex", None)  # never polled
    assert await store.due_streams(T0 + 1000, 10) == [theirs, ids[1], ids[0]]
    assert await store.due_streams(T0 + 1000, 10, "acme") == [ids[1], ids[0]]
    assert await store.due_streams(T0 + 1000, 10, "globex") == [theirs]


async def test_the_budget_salt_is_made_once_and_kept(store: Store, tmp_path: Path) -> None:
    """The salt of budget names is 32 random bytes made by the first call: every later call, of
    this store or a new one on the same state (a restart, another replica), returns it."""
    salt = await store.budget_salt()
    assert len(salt) == 32
    assert await store.budget_salt() == salt
    url = f"sqlite:///{tmp_path / 'other.db'}"
    other = open_store(url)
    await other.open()
    try:
        made = await other.budget_salt()
        assert made not in (salt, bytes(32))
    finally:
        await other.close()
    again = open_store(url)
    await again.open()
    try:
        assert await again.budget_salt() == made
    finally:
        await again.close()


async def test_quota_survives_reopen(tmp_path: Path) -> None:
    """Spent requests are counted per account and UTC day, durably."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    first = open_store(url)
    await first.open()
    assert await first.spend_quota("acme", "2026-11-23", 1) == 1
    assert await first.spend_quota("acme", "2026-11-23", 2) == 3
    await first.close()
    second = open_store(url)
    await second.open()
    assert await second.quota_used("acme", "2026-11-23") == 3
    assert await second.quota_used("acme", "2026-11-24") == 0
    await second.close()


async def test_account_pause_round_trip(store: Store) -> None:
    """A pause is stored with its reason and cleared by None."""
    await store.set_account_pause("acme", T0, "quota spent")
    assert await store.account_pauses() == {"acme": (T0, "quota spent")}
    await store.set_account_pause("acme", None, "")
    assert await store.account_pauses() == {}


async def test_sink_cursors_and_head(store: Store) -> None:
    """Cursors start at 0 and move; the head is the newest seq."""
    sid = await one_stream(store)
    await store.commit_page(sid, [activity(1, T0), activity(2, T0)], T0)
    head = await store.outbox_head()
    assert await store.sink_cursor("kafka") == 0
    await store.set_sink_cursor("kafka", head)
    assert await store.sink_cursor("kafka") == head
    assert await store.read_outbox(head, 10) == []


async def test_sink_cursor_never_moves_back(store: Store) -> None:
    """A lower position written late (a replica that lost the sink's lease while paused,
    settling its old round after the successor recorded more) leaves the cursor where it is;
    each sink's cursor, and the webhook fan-out's, keeps its own position."""
    await store.set_sink_cursor("kafka", 341)
    await store.set_sink_cursor("kafka", 155)
    assert await store.sink_cursor("kafka") == 341
    await store.set_sink_cursor("kafka", 342)
    assert await store.sink_cursor("kafka") == 342
    await store.set_sink_cursor("other", 7)
    assert await store.sink_cursors() == {"kafka": 342, "other": 7}


async def test_prune_bounds_dedup(store: Store) -> None:
    """Keys of activities older than the horizon are dropped; newer ones kept."""
    sid = await one_stream(store)
    await store.commit_page(sid, [activity(i, T0 + i * 1000) for i in range(10)], T0)
    assert await store.prune_dedup(T0 + 5000) == 5
    assert await store.dedup_count() == 5


async def test_prune_dedup_goes_in_short_transactions(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large backlog of old keys is deleted a chunk per transaction (one DELETE of a million
    keys held the writer for seconds) until none is left; newer keys stay."""
    monkeypatch.setattr(rowmap, "PRUNE_CHUNK", 4)
    sid = await one_stream(store)
    await store.commit_page(sid, [activity(i, T0 + i * 1000) for i in range(11)], T0)
    chunked = store._in_chunks  # type: ignore[attr-defined]
    totals: list[int] = []

    async def spy(run: object) -> int:
        totals.append(await chunked(run))
        return totals[-1]

    monkeypatch.setattr(store, "_in_chunks", spy)
    assert await store.prune_dedup(T0 + 10_000) == 10
    assert totals == [10]
    assert await store.dedup_count() == 1


async def test_unknown_stream_is_a_store_error(store: Store) -> None:
    """Asking for a stream that does not exist names it."""
    with pytest.raises(StoreError, match="no stream with id 999"):
        await store.stream(999)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        pytest.param("mysql://x", "unsupported URL scheme 'mysql'", id="scheme"),
        pytest.param("sqlite:/relative", "expected sqlite:///", id="shape"),
    ],
)
def test_bad_state_urls_are_named(url: str, message: str) -> None:
    """A state URL the relay cannot use says what it expected."""
    with pytest.raises(StoreError, match=message):
        open_store(url)


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


async def test_a_new_sqlite_state_file_is_private(tmp_path: Path) -> None:
    """The state holds webhook signing secrets: a file the relay creates, with its -wal and
    -shm, is 0600 whatever the umask; an existing file keeps the mode its owner gave it."""
    db = tmp_path / "state.db"
    with _umask(0o022):
        store = open_store(f"sqlite:///{db}")
        await store.open()
        await store.ensure_streams([StreamKey("a", "campaign", "1")], 0)  # the WAL is written
        modes = _modes(tmp_path)
        await store.close()
        assert modes == {"state.db": "0o600", "state.db-wal": "0o600", "state.db-shm": "0o600"}
        shared = tmp_path / "shared.db"
        sqlite3.connect(shared).close()
        shared.chmod(0o640)
        store = open_store(f"sqlite:///{shared}")
        await store.open()
        await store.close()
    assert _modes(tmp_path)["shared.db"] == "0o640"


def _modes(directory: Path) -> dict[str, str]:
    return {
        p.name: oct(p.stat().st_mode & 0o777) for p in directory.iterdir() if "lock" not in p.name
    }


async def test_unwritable_path_is_a_clear_error(tmp_path: Path) -> None:
    """A state file that cannot be created is a StoreError naming the path."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    store = open_store(f"sqlite:///{blocker / 'sub' / 'state.db'}")
    with pytest.raises(StoreError, match="cannot open"):
        await store.open()
    await store.close()


async def test_an_exclusive_sqlite_store_is_opened_once_at_a_time(tmp_path: Path) -> None:
    """The relay's store (exclusive) locks <state>.lock while open: a second exclusive open fails
    with one line naming the file and the holder; plain opens (tests, the demo's look-ups) are
    not stopped; closing releases the lock (a second `ctct-relay run` started silently)."""
    db = tmp_path / "state.db"
    url = f"sqlite:///{db}"
    first = open_store(url, exclusive=True)
    await first.open()
    second = open_store(url, exclusive=True)
    with pytest.raises(StoreError) as refused:
        await second.open()
    await second.close()
    assert str(refused.value) == (
        f"state store {db} is in use by another ctct-relay process (pid {os.getpid()})"
        " (one relay per SQLite file; several replicas need a postgresql:// state)"
    )
    plain = open_store(url)
    await plain.open()
    assert await plain.schema_version() == len(MIGRATIONS)
    await plain.close()
    await first.close()
    assert (tmp_path / "state.db.lock").exists()  # left in place: it is the lock, not a flag
    again = open_store(url, exclusive=True)
    await again.open()
    await again.close()


async def test_an_exclusive_sqlite_store_stops_another_process(tmp_path: Path) -> None:
    """flock is held across processes: another process's exclusive open of the same file is
    refused while this one has it, and succeeds once it is closed (or this process died)."""
    db = tmp_path / "state.db"
    url = f"sqlite:///{db}"
    script = (
        "import asyncio, sys\n"
        "from relay.store import StoreError, open_store\n"
        "async def main():\n"
        "    store = open_store(sys.argv[1], exclusive=True)\n"
        "    try:\n"
        "        await store.open()\n"
        "    except StoreError as exc:\n"
        "        print(exc)\n"
        "        return 1\n"
        "    await store.close()\n"
        "    return 0\n"
        "sys.exit(asyncio.run(main()))\n"
    )

    async def other() -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, url, stdout=asyncio.subprocess.PIPE
        )
        out, _ = await proc.communicate()
        return proc.returncode or 0, out.decode()

    held = open_store(url, exclusive=True)
    await held.open()
    try:
        status, said = await other()
    finally:
        await held.close()
    assert status == 1
    assert (
        said == f"state store {db} is in use by another ctct-relay process (pid {os.getpid()})"
        " (one relay per SQLite file; several replicas need a postgresql:// state)\n"
    )
    assert await other() == (0, "")


async def test_prune_outbox_keeps_everything_a_reader_still_needs(store: Store) -> None:
    """Only old events every reader is done with go: nothing above the Kafka cursor or the
    webhook fan-out, nothing a webhook is still owed, nothing recent, never the head."""
    sid = await one_stream(store)
    await store.commit_page(sid, [activity(i, T0 + i) for i in range(10)], T0)  # seq 1..10
    await store.commit_page(sid, [activity(i, T0 + i) for i in range(10, 20)], T0 + 5000)
    late = T0 + 10_000
    # No reader has a cursor yet: nothing was read, nothing goes.
    assert await store.prune_outbox(late, ["kafka"]) == 0
    hook = await store.create_webhook(
        Webhook(id="wh_1", url="https://example.com/h", event_types=(WILDCARD,), secret="s")
    )
    assert hook.start_seq == 20  # registered after the commits: owed nothing
    assert await store.fanout(100, T0) == 20
    await store.set_sink_cursor("kafka", 6)
    # Kafka has published seq 1..6: 1..5 go (strictly below the slowest reader's cursor)
    assert await store.prune_outbox(late, ["kafka"]) == 5
    assert [e.seq for e in await store.read_outbox(0, 100)][:2] == [6, 7]
    # Once Kafka's cursor is forgotten (an operator retired it) the fan-out cursor (20) bounds;
    # the retention too: seq 11..20 were committed at T0 + 5000, not before that horizon.
    assert await store.forget_sink("kafka")
    assert await store.prune_outbox(T0 + 5000, []) == 5  # seq 6..10, committed at T0
    assert (await store.read_outbox(0, 100))[0].seq == 11
    assert await store.prune_outbox(late, []) == 9  # seq 11..19; 20 is the head
    assert [e.seq for e in await store.read_outbox(0, 100)] == [20]
    assert await store.outbox_head() == 20
    await store.commit_page(sid, [activity(99, T0 + 99)], late)
    assert [e.seq for e in await store.read_outbox(0, 100)] == [20, 21]  # seq never reused


async def test_prune_outbox_keeps_what_an_unconfigured_sink_has_not_published(
    store: Store,
) -> None:
    """A stored sink cursor holds the prune back though no configured sink names it (Kafka left
    out of the config for a while, or of the replica holding the prune lease): pruned, its
    unpublished events would be a silent gap once it runs again; forgetting it releases them."""
    sid = await one_stream(store)
    await store.commit_page(sid, [activity(i, T0 + i) for i in range(10)], T0)  # seq 1..10
    assert await store.fanout(100, T0) == 10
    await store.set_sink_cursor("kafka", 4)  # Kafka published 1..4, then left the config
    late = T0 + 10_000
    assert await store.prune_outbox(late, []) == 3  # 1..3: below Kafka's cursor only
    assert [e.seq for e in await store.read_outbox(0, 100)] == list(range(4, 11))
    assert await store.sink_cursors() == {"kafka": 4, "webhooks-fanout": 10}
    assert await store.forget_sink("kafka")
    assert not await store.forget_sink("kafka")  # gone already
    assert await store.prune_outbox(late, []) == 6  # 4..9; 10 is the head
    assert await store.sink_cursors() == {"webhooks-fanout": 10}


async def test_prune_outbox_keeps_events_owed_to_webhooks(store: Store) -> None:
    """Events with a pending or dead delivery stay however old; delivered ones may go."""
    sid = await one_stream(store)
    await store.create_webhook(
        Webhook(id="wh_1", url="https://example.com/h", event_types=(WILDCARD,), secret="s")
    )
    await store.commit_page(sid, [activity(i, T0 + i) for i in range(6)], T0)  # seq 1..6
    assert await store.fanout(100, T0) == 6
    deliveries = sorted(await store.deliveries("wh_1", 100), key=lambda d: d.seq)
    outcome = [(1, "delivered"), (2, "dead"), (3, "delivered"), (4, "pending"), (5, "delivered")]
    await store.finish_attempts(
        [
            (Attempt(deliveries[seq - 1].id, T0, 200, 1.0), status, T0, 0)
            for seq, status in outcome
            if status != "pending"
        ]
    )
    assert await store.prune_outbox(T0 + 1, []) == 3  # 1, 3, 5; 2 dead, 4 and 6 pending
    assert [e.seq for e in await store.read_outbox(0, 100)] == [2, 4, 6]
    due = await store.due_deliveries("wh_1", T0 + 10**9, 10)
    assert [(d.seq, e.seq) for d, e in due] == [(4, 4), (6, 6)]


async def test_prune_deliveries_drops_delivered_history_only(store: Store) -> None:
    """Deliveries delivered before the cutoff go with their attempts; a newer delivered one,
    a dead one and a pending one stay, whatever their age."""
    sid = await one_stream(store)
    await store.create_webhook(
        Webhook(id="wh_1", url="https://example.com/h", event_types=(WILDCARD,), secret="s")
    )
    await store.commit_page(sid, [activity(i, T0 + i) for i in range(4)], T0)  # seq 1..4
    await store.fanout(100, T0)
    d = sorted(await store.deliveries("wh_1", 100), key=lambda x: x.seq)
    await store.finish_attempts(
        [
            (Attempt(d[0].id, T0 + 10, 200, 1.0), "delivered", T0, 0),
            (Attempt(d[1].id, T0 + 90, 200, 1.0), "delivered", T0, 0),
            (Attempt(d[2].id, T0 + 10, 500, 1.0), "dead", T0, 0),
        ]
    )
    assert await store.prune_deliveries(T0 + 50) == 1
    assert await store.attempts(d[0].id) == []
    left = sorted((x.seq, x.status) for x in await store.deliveries("wh_1", 100))
    assert left == [(2, "delivered"), (3, "dead"), (4, "pending")]
    assert len(await store.attempts(d[1].id)) == 1
    assert await store.prune_deliveries(T0 + 50) == 0
    assert await store.prune_outbox(T0 + 1, []) == 2  # the dead and the pending keep theirs
    assert [e.seq for e in await store.read_outbox(0, 100)] == [3, 4]


async def test_due_deliveries_read_back_every_field_in_due_order(store: Store) -> None:
    """A due delivery comes back with its event exactly as committed (data byte for byte, non-
    ASCII text and escapes included), soonest due first, then by seq."""
    sid = await one_stream(store)
    await store.create_webhook(
        Webhook(id="wh_1", url="https://example.com/h", event_types=(WILDCARD,), secret="s")
    )
    odd = dataclasses.replace(activity(1, T0 + 1), email_address='zoë"\\\u2028@exämple.com')
    await store.commit_page(sid, [odd, activity(2, T0 + 2, kind=Kind.CLICK)], T0 + 7)
    await store.fanout(100, T0)
    first, _ = sorted(await store.deliveries("wh_1", 10), key=lambda d: d.seq)
    await store.finish_attempts([(Attempt(first.id, T0 + 1, 500, 1.0), "pending", T0 + 50, 0)])
    due = await store.due_deliveries("wh_1", T0 + 100, 10)
    assert [d.seq for d, _ in due] == [2, 1]  # seq 1 is due later (its retry)
    delivery, event = due[1]
    assert (delivery.id, delivery.webhook_id, delivery.status) == (first.id, "wh_1", "pending")
    assert (delivery.attempts, delivery.next_attempt_ms, delivery.last_status) == (1, T0 + 50, 500)
    [stored] = [e for e in await store.read_outbox(0, 10) if e.seq == 1]
    assert event == stored
    assert orjson.loads(event.data)["email_address"] == odd.email_address
    assert due[0][1].kind is Kind.CLICK
    assert await store.due_deliveries("wh_1", T0 + 10, 10) == [due[0]]  # the retry is not due


async def test_due_sends_are_the_due_deliveries_with_their_bodies_byte_for_byte(
    store: Store,
) -> None:
    """What the webhook senders read: the due deliveries in the same order, each with its
    event's structured CloudEvent exactly as OutboxEvent.structured() builds it (SQLite builds
    it in SQL: escapes, non-ASCII text and times from year 1 to 9999 included)."""
    sid = await one_stream(store)
    await store.create_webhook(
        Webhook(id="wh_1", url="https://example.com/h", event_types=(WILDCARD,), secret="s")
    )
    awkward = 'q"b\\s/\x01\x1f\x7f\n\t\r\b\f zoë \u2028 \U0001f600 <&>'
    times = [0, -1, 999, T0 + 1, T0 + 999, -62135596800000, 253402300799999, 951782400123]
    events = [
        dataclasses.replace(
            activity(i, ms, kind=list(Kind)[i % len(Kind)], account=f"acme{awkward}"),
            campaign_id=f"11{awkward}",
            contact_id=f"{i}{awkward}",
            email_address=f"{awkward}@example.com",
        )
        for i, ms in enumerate(times)
    ]
    await store.commit_page(sid, events, T0 + 7)
    await store.fanout(100, T0)
    first = min(await store.deliveries("wh_1", 100), key=lambda d: d.seq)
    await store.finish_attempts([(Attempt(first.id, T0 + 1, 500, 1.0), "pending", T0 + 50, 0)])
    due = await store.due_deliveries("wh_1", T0 + 100, 100)
    sends = await store.due_sends("wh_1", T0 + 100, 100, kinds=ALL_KINDS)
    assert len(sends) == len(times)
    assert sends == [
        # no reset: each version is the attempts settled
        DueSend(
            d.id, d.attempts, d.event_id, e.committed_ms, e.structured(), e.kind.value, d.attempts
        )
        for d, e in due
    ]
    assert sends[-1].delivery_id == first.id  # due later: its retry
    assert (sends[-1].attempts, sends[-1].version) == (1, 1)
    skip = {sends[0].delivery_id, sends[2].delivery_id}
    assert await store.due_sends("wh_1", T0 + 100, 2, skip, kinds=ALL_KINDS) == [sends[1], sends[3]]
    assert await store.due_sends("wh_1", T0 + 10, 100, kinds=ALL_KINDS) == sends[:-1]  # not due


async def test_due_deliveries_leave_out_the_held_ones_without_counting_them(store: Store) -> None:
    """Ids the reader holds are skipped and do not use up the limit: the next ones come back."""
    sid = await one_stream(store)
    await store.create_webhook(
        Webhook(id="wh_1", url="https://example.com/h", event_types=(WILDCARD,), secret="s")
    )
    await store.commit_page(sid, [activity(i, T0 + i) for i in range(1, 6)], T0 + 7)
    await store.fanout(100, T0)
    ids = [d.id for d, _ in await store.due_deliveries("wh_1", T0, 10)]
    assert len(ids) == 5
    due = await store.due_deliveries("wh_1", T0, 2, skip={ids[0], ids[2]})
    assert [d.id for d, _ in due] == [ids[1], ids[3]]
    assert await store.due_deliveries("wh_1", T0, 10, skip=ids) == []


async def test_next_due_ms_is_the_first_pending_retry_after_a_time(store: Store) -> None:
    """What wakes a worker for retries: the soonest pending delivery due after a given time
    (ones due before it, already taken, and delivered ones do not count)."""
    sid = await one_stream(store)
    await store.create_webhook(
        Webhook(id="wh_1", url="https://example.com/h", event_types=(WILDCARD,), secret="s")
    )
    await store.commit_page(sid, [activity(i, T0 + i) for i in range(1, 4)], T0)
    await store.fanout(100, T0)
    a, b, c = (d for d, _ in await store.due_deliveries("wh_1", T0, 10))
    assert await store.next_due_ms("wh_1") == T0
    assert await store.next_due_ms("wh_1", T0) is None
    await store.finish_attempts(
        [
            (Attempt(a.id, T0, 500, 1.0), "pending", T0 + 5000, 0),
            (Attempt(b.id, T0, 503, 1.0), "pending", T0 + 300, 0),
            (Attempt(c.id, T0, 200, 1.0), "delivered", T0, 0),
        ]
    )
    assert await store.next_due_ms("wh_1", T0) == T0 + 300
    assert await store.next_due_ms("wh_1", T0 + 300) == T0 + 5000
    assert await store.next_due_ms("wh_1", T0 + 5000) is None


async def test_redeliver_needs_the_event_in_the_outbox(store: Store) -> None:
    """A delivery whose event was pruned cannot be made pending again: GoneError, unchanged; an
    unknown id is still NotFoundError."""
    sid = await one_stream(store)
    await store.create_webhook(
        Webhook(id="wh_1", url="https://example.com/h", event_types=(WILDCARD,), secret="s")
    )
    await store.commit_page(sid, [activity(i, T0 + i) for i in range(1, 3)], T0)
    await store.fanout(100, T0)
    first, second = (d for d, _ in await store.due_deliveries("wh_1", T0, 10))
    await store.finish_attempts([(Attempt(first.id, T0, 200, 1.0), "delivered", T0, 0)])
    assert await store.prune_outbox(T0 + 1, []) == 1
    with pytest.raises(GoneError, match=f"delivery {first.id}: its event .* no longer"):
        await store.redeliver(first.id, T0 + 2)
    assert (await store.delivery(first.id)).status == "delivered"
    assert (await store.redeliver(second.id, T0 + 2)).status == "pending"
    with pytest.raises(NotFoundError):
        await store.redeliver(999_999, T0)


async def test_outbox_event_reads_back_every_field(store: Store) -> None:
    """Each column lands in its own field: id, account, kind, campaign, contact, times, data."""
    sid = await one_stream(store)
    committed = activity(7, T0 + 42, kind=Kind.CLICK)
    await store.commit_page(sid, [committed], T0 + 99)
    [event] = await store.read_outbox(0, 10)
    assert event.seq == 1
    assert event.event_id == committed.event_id
    assert event.account == "acme"
    assert event.kind is Kind.CLICK
    assert event.campaign_id == "1100394165290"
    assert event.contact_id == "7"
    assert event.occurred_ms == T0 + 42
    assert event.committed_ms == T0 + 99
    assert orjson.loads(event.data) == committed.data()


async def test_deferring_a_stream_moves_its_next_pass_and_counts_no_error(store: Store) -> None:
    """A stream deferred because the account's budget ran out keeps a clean error record."""
    await store.ensure_streams([StreamKey("acme", "campaign", "1")], T0)
    [stream] = await store.streams()
    await store.defer_stream(stream.id, T0 + 30_000)
    [stream] = await store.streams()
    assert stream.next_due_ms == T0 + 30_000
    assert stream.consecutive_errors == 0
    assert stream.last_error is None
    assert await store.due_streams(T0 + 29_999, 10) == []


async def test_a_shorter_pause_does_not_cut_a_longer_one_and_only_an_ended_one_is_lifted(
    store: Store,
) -> None:
    """A replica that learns a short pause (a 429) does not shorten another's pause until
    midnight, and lifting a pause that has ended leaves a newer one another replica stored."""
    await store.set_account_pause("acme", T0 + 3_600_000, "quota")
    await store.set_account_pause("acme", T0 + 60_000, "429")
    assert await store.account_pauses() == {"acme": (T0 + 3_600_000, "quota")}
    assert not await store.end_account_pause("acme", T0 + 60_000)
    assert await store.account_pauses() == {"acme": (T0 + 3_600_000, "quota")}
    assert await store.end_account_pause("acme", T0 + 3_600_000)
    assert await store.account_pauses() == {}
    assert not await store.end_account_pause("acme", T0 + 3_600_000)


async def test_a_clock_ahead_does_not_end_a_stored_pause_the_database_says_runs(
    store: Store,
) -> None:
    """On PostgreSQL a replica whose clock runs ahead does not end a stored pause (a Retry-After,
    a spent quota) for every replica: the database's clock must have passed it too. SQLite has
    one process, so its clock is the one that decides."""
    real_ms = int(time.time() * 1000)
    await store.set_account_pause("acme", real_ms + 3_600_000, "429")
    ended = await store.end_account_pause("acme", real_ms + 7_200_000)  # a clock 2 h ahead
    shared = isinstance(store, PostgresStore)
    assert ended is not shared
    assert ("acme" in await store.account_pauses()) is shared


async def test_operator_holds_are_apart_from_quota_pauses(store: Store) -> None:
    """Holding and releasing an account never touches the relay's own quota pause."""
    await store.set_account_pause("acme", T0 + 1000, "quota")
    await store.hold_account("acme", "migration", T0)
    assert await store.account_holds() == {"acme": (T0, "migration")}
    assert await store.release_account("acme") is True
    assert await store.release_account("acme") is False
    assert await store.account_pauses() == {"acme": (T0 + 1000, "quota")}


def _finished(store: Store, sid: int, replay: ReplayRequest | None) -> Awaitable[None]:
    """The end of a pass of ``sid`` that ran ``replay`` (None: none) and read nothing."""
    return store.finish_pass(sid, PassResult({}, {}, T0 + 60_000, 1.0, T0), replay=replay)


async def test_replay_request_keeps_the_earliest_time_and_ends_only_itself(store: Store) -> None:
    """Two requests keep the earlier time; a pass that ran the replaced request does not end
    the newer one; a pass that ran the newer one ends it."""
    sid = await one_stream(store)
    assert await store.request_replay([sid, 999], T0 - 10, T0) == 1
    first = await store.stream_replay(sid)
    assert await store.request_replay([sid], T0 - 5, T0) == 1
    second = await store.stream_replay(sid)
    assert first is not None
    assert second is not None
    assert second.since_ms == T0 - 10
    await _finished(store, sid, first)
    assert await store.replays() == {sid: T0 - 10}
    await _finished(store, sid, second)
    assert await store.stream_replay(sid) is None


async def test_the_pass_that_finishes_a_replay_ends_it_in_its_own_transaction(
    store: Store,
) -> None:
    """finish_pass ends the replay the pass ran, with nothing else to call: a crash or a lost
    lease right after it committed no longer left the request stored (ended by a separate
    end_replay), so the next pass ran the finished replay again and appended its events again.
    A pass that ran no replay, or failed or was put off, ends none: it is retried."""
    sid = await one_stream(store)
    await store.request_replay([sid], T0 - 10, T0)
    running = await store.stream_replay(sid)
    assert running is not None
    await _finished(store, sid, None)
    await store.record_error(sid, "boom", T0 + 1, replay=running)
    await store.defer_stream(sid, T0 + 1, replay=running)
    assert await store.stream_replay(sid) == running
    await _finished(store, sid, running)
    assert await store.stream_replay(sid) is None
    assert await store.replays() == {}


@pytest.mark.parametrize("again", [T0 - 10, T0 - 5], ids=["same-time", "later-time"])
async def test_a_replay_asked_again_is_not_ended_by_the_pass_running_the_first(
    store: Store, again: int
) -> None:
    """A request asked again while a pass runs the first, with the same or a later time (so the
    stored time does not move), outlives the end of that pass: it cleared it, though finish_pass
    ends the request the pass ran."""
    sid = await one_stream(store)
    await store.request_replay([sid], T0 - 10, T0)
    running = await store.stream_replay(sid)
    assert running is not None
    await store.request_replay([sid], again, T0 + 1000)
    await _finished(store, sid, running)
    assert await store.replays() == {sid: T0 - 10}


async def _end_pass(
    store: Store, how: str, sid: int, due_ms: int, replay: ReplayRequest | None
) -> None:
    """Write the end of a pass that ran ``replay`` (None: none) the way ``how`` names."""
    if how == "finish_pass":
        await store.finish_pass(sid, PassResult({}, {}, due_ms, 1.0, T0), replay=replay)
    elif how == "record_error":
        await store.record_error(sid, "boom", due_ms, replay=replay)
    else:
        await store.defer_stream(sid, due_ms, replay=replay)


PASS_ENDS = ("finish_pass", "record_error", "defer_stream")
LATER = T0 + 6 * 3600_000  # the next planned pass


@pytest.mark.parametrize("how", PASS_ENDS)
@pytest.mark.parametrize(
    ("ran", "asked"),
    [
        pytest.param(None, T0 - 7200_000, id="no-replay"),
        pytest.param(T0 - 3600_000, T0 - 7200_000, id="a-replay-then-an-earlier-one"),
        pytest.param(T0 - 3600_000, T0 - 3600_000, id="a-replay-asked-again"),
    ],
)
async def test_a_replay_asked_for_during_a_pass_keeps_the_stream_due(
    store: Store, how: str, ran: int | None, asked: int
) -> None:
    """A replay requested while a pass ran (even the same as the one the pass ran) keeps the
    stream due from the request, whatever the end of that pass writes: it was put off to the
    next planned pass (up to max_interval_s, `replay --wait` waiting)."""
    sid = await one_stream(store)
    running = None
    if ran is not None:
        await store.request_replay([sid], ran, T0)
        running = await store.stream_replay(sid)
    await store.request_replay([sid], asked, T0 + 1000)  # while the pass runs
    await _end_pass(store, how, sid, LATER, running)
    assert (await store.stream(sid)).next_due_ms <= T0 + 1000
    assert await store.due_streams(T0 + 1000, 10) == [sid]


@pytest.mark.parametrize("how", PASS_ENDS)
@pytest.mark.parametrize("ran", [None, T0 - 3600_000], ids=["no-replay", "its-replay"])
async def test_the_replay_a_pass_ran_does_not_keep_the_stream_due(
    store: Store, how: str, ran: int | None
) -> None:
    """Without a new request, the end of a pass schedules the next one as asked, whether it ran
    the stream's replay (ended by finish_pass, kept by the other two for the retry) or none."""
    sid = await one_stream(store)
    if ran is not None:
        await store.request_replay([sid], ran, T0)
    await _end_pass(store, how, sid, LATER, await store.stream_replay(sid))
    assert (await store.stream(sid)).next_due_ms == LATER
    assert await store.due_streams(LATER - 1, 10) == []


async def test_commit_replay_page_re_emits_known_keys_from_the_time_only(store: Store) -> None:
    """Known activity at or after ``since`` is appended again; older known activity is not."""
    sid = await one_stream(store)
    page = [activity(i, T0 + i * 10) for i in range(4)]
    await store.commit_page(sid, page, T0)
    new, appended = await store.commit_replay_page(
        sid, [*page, activity(9, T0 + 90)], T0 + 1, T0 + 20
    )
    assert (new, appended) == (1, 3)
    tail = await store.read_outbox(4, 10)
    assert [e.event_id for e in tail] == [page[2].event_id, page[3].event_id, tail[2].event_id]


async def test_log_replay_copies_each_event_once_in_order(store: Store) -> None:
    """Copies keep ids, data and order; copies already in the log are not copied again."""
    from relay.store import OutboxSelector

    sid = await one_stream(store)
    await store.commit_page(sid, [activity(i, T0 + i) for i in range(3)], T0)
    selector = OutboxSelector("acme", T0)
    assert (await store.count_outbox(selector)).count == 3
    first = await store.replay_outbox(selector, T0 + 5)
    assert (first.count, first.first_seq, first.last_seq) == (3, 4, 6)
    second = await store.replay_outbox(selector, T0 + 6)
    assert second.count == 3
    events = await store.read_outbox(0, 100)
    assert [e.event_id for e in events[6:]] == [e.event_id for e in events[:3]]
    assert [e.data for e in events[3:6]] == [e.data for e in events[:3]]
    assert (await store.count_outbox(OutboxSelector("other", T0))).count == 0
    narrowed = OutboxSelector("acme", T0 + 2, by_activity_time=True)
    assert (await store.count_outbox(narrowed)).count == 1


async def test_removed_targets_are_retired_remembered_and_restorable(store: Store) -> None:
    """Removal retires existing streams and marks them; adding them again forgets the mark."""
    await one_stream(store)
    missing = StreamKey("acme", "campaign", "404")
    assert await store.remove_targets([KEY, missing], T0) == 1
    assert (await store.streams())[0].retired
    assert await store.removed_targets("acme") == {KEY}
    await store.add_targets([KEY], T0 + 1)
    assert await store.removed_targets("acme") == set()


async def test_added_targets_are_remembered_until_removed(store: Store) -> None:
    """An operator's additions are kept per account, a second addition keeps one mark,
    discovery's retirement spares them (and counts only streams it stopped), and removing the
    stream forgets the mark."""
    other = StreamKey("other", "campaign", "7")
    found = StreamKey("acme", "campaign", "8")
    await store.add_targets([KEY, other], T0)
    await store.add_targets([KEY], T0 + 1)
    assert await store.added_targets("acme") == {KEY}
    assert await store.added_targets("other") == {other}
    await store.ensure_streams([KEY, found, other], T0)
    assert await store.retire_streams([KEY, found, other, StreamKey("acme", "campaign", "9")]) == 1
    assert await store.retire_streams([found]) == 0  # retired already
    assert {s.key: s.retired for s in await store.streams()} == {
        KEY: False,
        found: True,
        other: False,
    }
    assert await store.remove_targets([KEY], T0 + 2) == 1
    assert await store.added_targets("acme") == set()
    assert await store.removed_targets("acme") == {KEY}
    assert await store.added_targets("other") == {other}


async def test_status_counts(store: Store) -> None:
    """Sink cursors, dead letters per sink and webhook backlogs as status needs them."""
    await store.set_sink_cursor("kafka", 7)
    await store.add_dead_letter("kafka", 3, "e", "why", T0)
    assert await store.sink_cursors() == {"kafka": 7}
    assert await store.dead_letter_counts() == {"kafka": 1}
    assert await store.delivery_counts() == {}


async def test_deliveries_page_back_by_id_with_before(store: Store) -> None:
    """deliveries(before=id) reads the deliveries older than that id, newest first, with the
    status filter and the limit as without it."""
    sid = await one_stream(store)
    await store.create_webhook(
        Webhook(id="wh_1", url="https://example.com/h", event_types=(WILDCARD,), secret="s")
    )
    await store.commit_page(sid, [activity(i, T0 + i) for i in range(5)], T0)
    await store.fanout(100, T0)
    ids = [d.id for d in await store.deliveries("wh_1", 100)]
    assert len(ids) == 5
    assert ids == sorted(ids, reverse=True)
    assert [d.id for d in await store.deliveries("wh_1", 2, before=ids[1])] == ids[2:4]
    assert [d.id for d in await store.deliveries("wh_1", 100, before=ids[-1])] == []
    assert [d.id for d in await store.deliveries("wh_1", 100, before=ids[0] + 1)] == ids
    await store.finish_attempts([(Attempt(ids[3], T0, 500, 1.0, "", "HTTP 500"), "dead", T0, 0)])
    assert [d.id for d in await store.deliveries("wh_1", 10, "dead", before=ids[2])] == [ids[3]]
    assert await store.deliveries("wh_1", 10, "dead", before=ids[3]) == []
    assert await store.deliveries("wh_other", 10, before=ids[0] + 1) == []


# three webhooks, 30,000 deliveries: wh_2 has only the 100 oldest, so reading the table backwards
# by id (the primary key) and filtering on webhook_id would walk past every younger delivery
_FILL_WEBHOOKS = (
    "INSERT INTO webhooks (id, url, event_types, secret, start_seq, created_ms, updated_ms)"
    " VALUES ('wh_1', 'https://e.example/1', '[\"*\"]', 's', 0, 0, 0),"
    " ('wh_2', 'https://e.example/2', '[\"*\"]', 's', 0, 0, 0),"
    " ('wh_3', 'https://e.example/3', '[\"*\"]', 's', 0, 0, 0)"
)
_FILL_DELIVERIES = (
    "INSERT INTO deliveries (webhook_id, seq, event_id, status, next_attempt_ms, created_ms)"
    " SELECT CASE WHEN i <= 300 THEN 'wh_' || (i % 3 + 1) ELSE 'wh_' || (i % 2 * 2 + 1) END,"
    " i, 'e' || i, CASE WHEN i % 100 = 0 THEN 'dead' ELSE 'delivered' END, 0, 0 FROM {numbers}"
)
SQLITE_NUMBERS = (
    "(WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 30000)"
    " SELECT i FROM n)"
)


@pytest.mark.parametrize("before", [None, 250], ids=["first-page", "before"])
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_deliveries_listing_reads_the_webhook_index(
    backend: str, before: int | None, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A page of a webhook's deliveries is read off the index on (webhook_id, id), newest first,
    without a sort (EXPLAIN of the store's own query on an analysed table)."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'state.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    store = open_store(url)
    await store.open()
    await store.close()
    if backend == "sqlite":
        conn = sqlite3.connect(tmp_path / "state.db")
        try:
            conn.execute(_FILL_WEBHOOKS)
            conn.execute(_FILL_DELIVERIES.format(numbers=SQLITE_NUMBERS))
            conn.execute("ANALYZE")
            sql, args = sqlite_store.deliveries_query("wh_2", 50, None, before)
            plan = " | ".join(r[3] for r in conn.execute(f"EXPLAIN QUERY PLAN {sql}", args))
        finally:
            conn.close()
        assert "USING INDEX deliveries_webhook" in plan, plan
        assert "TEMP B-TREE" not in plan, plan
    else:
        pg = await asyncpg.connect(url)
        try:
            await pg.execute(_FILL_WEBHOOKS)
            numbers = "generate_series(1, 30000) AS i"
            await pg.execute(_FILL_DELIVERIES.format(numbers=numbers))
            await pg.execute("ANALYZE")
            sql, pg_args = postgres_store.deliveries_query("wh_2", 50, None, before)
            plan = " | ".join(r[0] for r in await pg.fetch(f"EXPLAIN {sql}", *pg_args))
        finally:
            await pg.close()
        assert "Index Scan Backward using deliveries_webhook" in plan, plan
        assert "Sort" not in plan, plan


async def test_dead_letters_listed_oldest_first_per_sink_up_to_a_limit(store: Store) -> None:
    """A sink's dead letters read back every field, in seq order, only that sink's, and no more
    than the limit; a seq dead-lettered again (a crash between the dead letter and the cursor
    write, a replay) is recorded once, with its first reason (it was listed and counted twice)."""
    await store.add_dead_letter("kafka", 9, "e9", "MessageSizeTooLargeError: too large", T0 + 2)
    await store.add_dead_letter("kafka", 4, "e4", "first", T0)
    await store.add_dead_letter("other", 1, "o1", "not kafka", T0)
    await store.add_dead_letter("kafka", 4, "e4", "again", T0 + 1)
    await store.add_dead_letter("other", 4, "e4", "another sink's", T0 + 1)
    everything = await store.dead_letters("kafka")
    assert [(d.seq, d.event_id, d.reason, d.created_ms) for d in everything] == [
        (4, "e4", "first", T0),
        (9, "e9", "MessageSizeTooLargeError: too large", T0 + 2),
    ]
    assert {d.sink for d in everything} == {"kafka"}
    assert await store.dead_letter_counts() == {"kafka": 2, "other": 2}
    assert [d.reason for d in await store.dead_letters("kafka", 1)] == ["first"]
    assert [d.event_id for d in await store.dead_letters("other", 1)] == ["o1"]
    assert await store.dead_letters("none") == []


async def test_stream_stats_and_pages_are_counted_in_the_store(store: Store) -> None:
    """Per-account counts by state and the oldest watermark of active streams (a paused or
    retired stream's lag is not the account's); filtered pages with a total."""
    from relay.store import StreamFilter, StreamStats

    keys = [StreamKey("acme", "campaign", str(i)) for i in range(5)]
    await store.ensure_streams([*keys, StreamKey("b", "contact", "1")], T0)
    ids = {s.key: s.id for s in await store.streams()}
    await store.set_paused(ids[keys[0]], True)
    await store.retire_streams([keys[1]])
    await store.record_error(ids[keys[2]], "boom", T0)
    await store.request_replay([ids[keys[3]]], T0, T0)
    await store.finish_pass(ids[keys[3]], PassResult({Kind.OPEN: T0 - 50}, {}, T0, 1.0, T0))
    await store.finish_pass(ids[keys[1]], PassResult({Kind.OPEN: T0 - 99}, {}, T0, 1.0, T0))
    await store.finish_pass(ids[keys[0]], PassResult({Kind.OPEN: T0 - 77}, {}, T0, 1.0, T0))
    stats = await store.stream_stats()
    assert stats["acme"] == StreamStats(
        total=5, active=3, failing=1, paused=1, retired=1, replaying=1, oldest_watermark_ms=T0 - 50
    )
    assert stats["b"].oldest_watermark_ms is None
    page, total = await store.stream_page(StreamFilter(account="acme", state="active"), 2, 1)
    assert total == 3
    assert [s.key for s in page] == [keys[3], keys[4]]
    assert page[0].watermarks == {Kind.OPEN: T0 - 50}
    replaying, _ = await store.stream_page(StreamFilter(replaying=True), 10, 0)
    assert [s.key for s in replaying] == [keys[3]]
    _, contacts = await store.stream_page(StreamFilter(scope="contact"), 10, 0)
    assert contacts == 1


async def test_log_replay_narrows_to_a_campaign_or_a_stream(store: Store) -> None:
    """A campaign or stream selector picks only that campaign's or stream's events."""
    from relay.store import OutboxSelector

    sid = await one_stream(store)
    other = StreamKey("acme", "contact", "5")
    await store.ensure_streams([other], T0)
    other_id = next(s.id for s in await store.streams() if s.key == other)
    await store.commit_page(sid, [activity(i, T0 + i) for i in range(3)], T0)
    foreign = Activity(
        account="acme",
        kind=Kind.OPEN,
        campaign_id="77",
        contact_id="5",
        email_address="c5@example.com",
        occurred_at=from_millis(T0),
    )
    await store.commit_page(other_id, [foreign], T0)
    assert (await store.count_outbox(OutboxSelector("acme", T0, campaign_id="77"))).count == 1
    assert (await store.count_outbox(OutboxSelector("acme", T0, stream_id=sid))).count == 3
    copied = await store.replay_outbox(OutboxSelector("acme", T0, campaign_id="77"), T0 + 1)
    assert copied.count == 1
    assert (await store.read_outbox(copied.first_seq - 1, 1))[0].event_id == foreign.event_id


def hook(n: int, url: str = "https://example.com/h", created_ms: int = T0) -> Webhook:
    return Webhook(
        id=f"wh_{n}",
        url=url,
        event_types=(WILDCARD,),
        secret="s",
        created_ms=created_ms,
        updated_ms=created_ms,
    )


async def test_a_url_has_one_webhook(store: Store) -> None:
    """Creating, or moving a webhook to, a URL another webhook has is a DuplicateError naming it."""
    await store.create_webhook(hook(1))
    with pytest.raises(DuplicateError, match="already registered as webhook wh_1"):
        await store.create_webhook(hook(2))
    other = await store.create_webhook(hook(3, "https://example.com/other"))
    with pytest.raises(DuplicateError, match="wh_1"):
        await store.update_webhook(dataclasses.replace(other, url="https://example.com/h"))
    assert [w.id for w in await store.webhooks()] == ["wh_1", "wh_3"]
    assert (await store.webhook("wh_3")).url == "https://example.com/other"


OLD_HOOKS = [
    ("wh_b", "https://a.example/h", T0 + 2),
    ("wh_a", "https://a.example/h", T0 + 1),
    ("wh_c", "https://a.example/h", T0 + 2),
    ("wh_z", "https://z.example/h", T0),
]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_migration_keeps_the_oldest_of_duplicate_urls(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A schema-2 database with a URL registered three times: the oldest keeps it, the younger
    ones are disabled with their url marked, and the unique index holds afterwards."""
    insert = (
        "INSERT INTO webhooks (id, url, event_types, secret, start_seq, created_ms, updated_ms)"
        " VALUES (?, ?, '[\"*\"]', 's', 0, ?, ?)"
    )
    rows = [(wid, url, created, created) for wid, url, created in OLD_HOOKS]
    store = open_store(await older_state(backend, tmp_path, request, 2, insert, rows))
    await store.open()
    try:
        assert await store.schema_version() == len(MIGRATIONS)
        hooks = {w.id: w for w in await store.webhooks()}
        assert (hooks["wh_a"].url, hooks["wh_a"].enabled) == ("https://a.example/h", True)
        assert (hooks["wh_z"].url, hooks["wh_z"].enabled) == ("https://z.example/h", True)
        for wid in ("wh_b", "wh_c"):
            assert hooks[wid].url == f"https://a.example/h#duplicate-{wid}"
            assert not hooks[wid].enabled
            assert "oldest" in (hooks[wid].disabled_reason or "")
        with pytest.raises(DuplicateError, match="wh_a"):
            await store.create_webhook(hook(9, "https://a.example/h"))
    finally:
        await store.close()


DUPLICATE_LETTERS = [
    ("kafka", 4, "e4", "first", T0),
    ("kafka", 4, "e4", "again", T0 + 1),
    ("kafka", 9, "e9", "once", T0 + 2),
    ("other", 4, "e4", "another sink's", T0 + 3),
]
BEFORE_UNIQUE_LETTERS = 10  # the schema version before dead letters were unique per (sink, seq)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_migration_keeps_the_first_of_duplicate_dead_letters(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A store that recorded a Kafka dead letter twice (no unique (sink, seq) before): the
    migration keeps the first record of each, and recording it again adds nothing."""
    insert = (
        "INSERT INTO dead_letters (sink, seq, event_id, reason, created_ms) VALUES (?, ?, ?, ?, ?)"
    )
    url = await older_state(
        backend, tmp_path, request, BEFORE_UNIQUE_LETTERS, insert, DUPLICATE_LETTERS
    )
    store = open_store(url)
    await store.open()
    try:
        assert await store.schema_version() == len(MIGRATIONS)
        letters = await store.dead_letters("kafka")
        assert [(d.seq, d.reason) for d in letters] == [(4, "first"), (9, "once")]
        await store.add_dead_letter("kafka", 9, "e9", "again", T0 + 9)
        assert await store.dead_letter_counts() == {"kafka": 2, "other": 1}
    finally:
        await store.close()


async def test_the_failing_clock_restarts_after_a_silence(store: Store) -> None:
    """Failures noted at most ``restart_after_ms`` apart keep the clock, which disables the
    webhook once it has run ``disable_after_ms``; a failure after a longer silence (the relay
    down or idle) restarts it instead, however old its start, and so does one after a clock
    with no noted failure (left running by a relay before schema version 13)."""
    await store.create_webhook(hook(1))
    after, restart = 1000, 300
    assert not await store.webhook_failed("wh_1", T0, after, restart)
    assert not await store.webhook_failed("wh_1", T0 + 250, after, restart)
    stored = await store.webhook("wh_1")
    assert (stored.failing_since_ms, stored.last_failure_ms) == (T0, T0 + 250)
    # six times the clock's whole span of silence: one failure now starts it again
    assert not await store.webhook_failed("wh_1", T0 + 6250, after, restart)
    stored = await store.webhook("wh_1")
    assert (stored.enabled, stored.failing_since_ms) == (True, T0 + 6250)
    for at in range(T0 + 6500, T0 + 7250, 250):  # failing on: the clock runs
        assert not await store.webhook_failed("wh_1", at, after, restart)
    assert await store.webhook_failed("wh_1", T0 + 7250, after, restart)
    stored = await store.webhook("wh_1")
    assert not stored.enabled
    assert stored.disabled_reason == f"failing continuously since {T0 + 6250} (Unix ms)"
    await store.webhook_succeeded("wh_1")
    stored = await store.webhook("wh_1")
    assert (stored.failing_since_ms, stored.last_failure_ms) == (None, None)
    # an older relay's clock: a start, no noted failure
    await store.create_webhook(hook(2, "https://example.com/two"))
    old = dataclasses.replace(await store.webhook("wh_2"), failing_since_ms=T0)
    await store.update_webhook(old, ["failing_since_ms"])
    assert not await store.webhook_failed("wh_2", T0 + 6000, after, restart)
    assert (await store.webhook("wh_2")).failing_since_ms == T0 + 6000


async def test_update_writes_only_the_named_fields(store: Store) -> None:
    """A partial update leaves every other column as stored, even if the caller's copy is stale."""
    created = await store.create_webhook(hook(1))
    await store.webhook_failed(
        "wh_1", T0 + 5, 10**9, 10**9
    )  # the dispatcher starts the failing clock
    stale = dataclasses.replace(created, description="crm", updated_ms=T0 + 9)
    await store.update_webhook(stale, ("description", "updated_ms"))
    stored = await store.webhook("wh_1")
    assert (stored.description, stored.updated_ms) == ("crm", T0 + 9)
    assert stored.failing_since_ms == T0 + 5  # not reset by the stale copy
    await store.update_webhook(stale)  # no fields named: every field is written
    assert (await store.webhook("wh_1")).failing_since_ms is None
    with pytest.raises(StoreError, match="not updatable: id"):
        await store.update_webhook(stale, ("id",))
    with pytest.raises(StoreError, match="not updatable: colour"):
        await store.update_webhook(stale, ("colour",))
    with pytest.raises(NotFoundError):
        await store.update_webhook(dataclasses.replace(stale, id="wh_9"), ("description",))


HOUR_MS = 3_600_000


@pytest.mark.parametrize(
    ("change", "fields"),
    [
        pytest.param({"enabled": True}, ("enabled", "updated_ms"), id="enabled-again"),
        pytest.param({"url": "https://example.com/new"}, ("url", "updated_ms"), id="url"),
    ],
)
async def test_enabling_or_moving_a_webhook_makes_its_waiting_retries_due_now(
    store: Store, change: dict[str, object], fields: tuple[str, ...]
) -> None:
    """Enabled again or moved to another URL, a webhook's pending deliveries waiting for a
    retry (up to 10 h) are due at the change's time, their attempt counts kept, and the record
    of an attempt in flight to the old URL does not bring its wait back; delivered and dead
    ones and other webhooks' are left as they are; disabling it or changing another field makes
    nothing due."""
    sid = await one_stream(store)
    first = await store.create_webhook(hook(1))
    await store.create_webhook(hook(2, "https://example.com/other"))
    await store.commit_page(sid, [activity(i, T0 + i) for i in range(5)], T0)  # seq 1..5
    await store.fanout(100, T0)
    by_seq = {d.seq: d for d in await store.deliveries("wh_1", 10)}
    other = {d.seq: d for d in await store.deliveries("wh_2", 10)}
    await store.finish_attempts(
        [
            (Attempt(by_seq[1].id, T0, 500, 1.0), "pending", T0 + 10 * HOUR_MS, 0),
            (Attempt(by_seq[2].id, T0, 500, 1.0), "pending", T0 + 5, 0),  # due already
            (Attempt(by_seq[3].id, T0, 200, 1.0), "delivered", T0, 0),
            (Attempt(by_seq[4].id, T0, 500, 1.0), "dead", T0, 0),
            (Attempt(other[1].id, T0, 500, 1.0), "pending", T0 + 10 * HOUR_MS, 0),
        ]
    )
    later = T0 + 10_000
    disabled = dataclasses.replace(first, enabled=False, updated_ms=later)
    await store.update_webhook(disabled, ("enabled", "updated_ms"))
    described = dataclasses.replace(disabled, description="crm", updated_ms=later)
    await store.update_webhook(described, ("description", "updated_ms"))
    assert (await store.delivery(by_seq[1].id)).next_attempt_ms == T0 + 10 * HOUR_MS
    changed = dataclasses.replace(described, updated_ms=later + 1, **change)  # type: ignore[arg-type]
    await store.update_webhook(changed, fields)
    now = {
        d.seq: (d.status, d.attempts, d.next_attempt_ms) for d in await store.deliveries("wh_1", 10)
    }
    assert now == {
        1: ("pending", 1, later + 1),
        2: ("pending", 1, T0 + 5),
        3: ("delivered", 1, T0),
        4: ("dead", 1, T0),
        5: ("pending", 0, T0),
    }
    due = await store.due_sends("wh_1", later + 1, 10, kinds=["open"])
    assert sorted(d.delivery_id for d in due) == sorted(by_seq[s].id for s in (1, 2, 5))
    # seq 2's attempt was in flight at the change (read at version 1): to the old URL, its
    # record (a 10 h wait earned there) joins the history and leaves the delivery due; to the
    # endpoint enabled again, it settles it as usual (the same endpoint answered)
    await store.finish_attempts(
        [(Attempt(by_seq[2].id, later, 500, 1.0), "pending", later + 10 * HOUR_MS, 1)]
    )
    after = await store.delivery(by_seq[2].id)
    moved = "url" in fields
    expected = (1, T0 + 5) if moved else (2, later + 10 * HOUR_MS)
    assert (after.status, after.attempts, after.next_attempt_ms) == ("pending", *expected)
    assert len(await store.attempts(by_seq[2].id)) == 2
    assert (await store.delivery(other[1].id)).next_attempt_ms == T0 + 10 * HOUR_MS


async def test_redeliver_and_recover_refuse_a_disabled_webhook(store: Store) -> None:
    """A disabled webhook has no worker: a redelivery or recovery for it would wait unsent, so
    both raise DisabledError naming it and its reason, and change nothing."""
    sid = await one_stream(store)
    first = await store.create_webhook(hook(1))
    await store.commit_page(sid, [activity(1, T0 + 1)], T0)
    await store.fanout(100, T0)
    (delivery,) = await store.deliveries("wh_1", 10)
    await store.finish_attempts([(Attempt(delivery.id, T0, 500, 1.0), "dead", T0, 0)])
    await store.disable_webhook("wh_1", "410 Gone from the endpoint", T0 + 1)
    message = "webhook wh_1 is disabled (410 Gone from the endpoint); enable it first"
    with pytest.raises(DisabledError, match=re.escape(message)):
        await store.redeliver(delivery.id, T0 + 5)
    with pytest.raises(DisabledError, match=re.escape(message)):
        await store.recover("wh_1", 0, T0 + 5)
    (left,) = await store.deliveries("wh_1", 10)
    assert (left.status, left.attempts) == ("dead", 1)
    await store.update_webhook(dataclasses.replace(first, enabled=True), ("enabled",))
    assert (await store.redeliver(delivery.id, T0 + 6)).status == "pending"


async def test_attempts_of_deleted_deliveries_are_skipped(store: Store) -> None:
    """A webhook deleted while its attempt was in flight: the batch still commits the rest."""
    sid = await one_stream(store)
    await store.create_webhook(hook(1))
    await store.create_webhook(hook(2, "https://example.com/two"))
    await store.commit_page(sid, [activity(1, T0)], T0)
    await store.fanout(100, T0)
    gone = (await store.deliveries("wh_1", 10))[0]
    kept = (await store.deliveries("wh_2", 10))[0]
    await store.delete_webhook("wh_1")
    await store.finish_attempts(
        [
            (Attempt(gone.id, T0, 200, 1.0), "delivered", T0, 0),
            (Attempt(kept.id, T0, 200, 1.0), "delivered", T0, 0),
        ]
    )
    assert (await store.delivery(kept.id)).status == "delivered"
    assert len(await store.attempts(kept.id)) == 1
    assert await store.attempts(gone.id) == []
    with pytest.raises(NotFoundError):
        await store.delivery(gone.id)


async def test_close_twice(store: Store) -> None:
    """A second close does nothing (shutdown paths may both close the store)."""
    await store.close()
    await store.close()


async def test_sqlite_announces_exactly_the_rows_a_commit_appended(tmp_path: Path) -> None:
    """Each emitting commit_page hands its listeners the rows it appended (as read_outbox reads
    them) and the head before them; replays, seeding and all-known pages announce nothing."""
    from relay.store import OutboxAppend, OutboxSelector

    store = open_store(f"sqlite:///{tmp_path / 'announce.db'}")
    await store.open()
    try:
        heard: list[OutboxAppend] = []
        store.on_append(heard.append)
        sid = await one_stream(store)
        await store.commit_page(sid, [activity(1, T0), activity(2, T0)], T0)
        await store.commit_page(sid, [activity(2, T0), activity(3, T0)], T0 + 1)
        await store.commit_page(sid, [activity(9, T0)], T0, emit=False)
        await store.commit_page(sid, [activity(1, T0)], T0)  # nothing new
        await store.replay_outbox(OutboxSelector("acme", T0), T0 + 2)  # seqs 4, 5, 6
        await store.commit_page(sid, [activity(4, T0 + 5), activity(5, T0 + 6)], T0 + 3)
        outbox = await store.read_outbox(0, 100)
        assert [(a.after_seq, [e.seq for e in a.events]) for a in heard] == [
            (0, [1, 2]),
            (2, [3]),
            (6, [7, 8]),
        ]
        assert [e for a in heard for e in a.events] == [outbox[i] for i in (0, 1, 2, 6, 7)]
    finally:
        await store.close()


async def test_sqlite_outbox_columns_keep_their_storage_classes(tmp_path: Path) -> None:
    """A page inserted as one statement stores ids and kinds as TEXT, times as INTEGER and data
    as BLOB, as row-by-row inserts do, in the order of the page."""
    path = tmp_path / "classes.db"
    store = open_store(f"sqlite:///{path}")
    await store.open()
    try:
        sid = await one_stream(store)
        page = [activity(i, T0 + i, kind=Kind.CLICK if i % 2 else Kind.OPEN) for i in range(5)]
        await store.commit_page(sid, page, T0 + 9)
    finally:
        await store.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        rows = conn.execute(
            "SELECT event_id, typeof(event_id), typeof(account), typeof(stream_id), typeof(kind),"
            " typeof(contact_id), typeof(occurred_ms), typeof(committed_ms), typeof(data)"
            " FROM outbox ORDER BY seq"
        ).fetchall()
    assert [r[0] for r in rows] == [a.event_id for a in page]
    assert {r[1:] for r in rows} == {
        ("text", "text", "integer", "text", "text", "integer", "integer", "blob")
    }


async def test_committed_data_reads_back_byte_for_byte(store: Store) -> None:
    """The outbox keeps each event's data JSON exactly as serialized, whatever its characters
    (quotes, backslashes, control characters, non-ASCII), with its ids and times."""
    sid = await one_stream(store)
    tricky = 'a "quoted" \\ back\\slash, tab\t, newline\n, \x01, é, 中文, \U0001f600, </script>'
    page = [
        Activity(
            account="acme",
            kind=Kind.BOUNCE,
            campaign_id="1100394165290",
            contact_id=str(i),
            email_address=f"c{i}@example.com",
            occurred_at=from_millis(T0 + i),
            bounce_code="B",
            bounce_description=tricky,
            bounce_message=tricky * i,
        )
        for i in range(3)
    ]
    await store.commit_page(sid, page, T0 + 9)
    events = await store.read_outbox(0, 10)
    assert [e.data for e in events] == [orjson.dumps(a.data()) for a in page]
    assert [(e.event_id, e.contact_id, e.occurred_ms, e.committed_ms) for e in events] == [
        (a.event_id, a.contact_id, a.occurred_ms, T0 + 9) for a in page
    ]


async def test_prune_keeps_keys_inserted_within_the_retention_however_old(store: Store) -> None:
    """A backfill commits history older than the retention before its pass ends; a pass that
    then fails is read again from the same watermark. Its keys are pruned only once both the
    activity and the insert are older than the cutoff (pruned by activity time, the retry
    emitted them twice)."""
    sid = await one_stream(store)
    day = 86_400_000
    history = [activity(i, T0 - 30 * day + i) for i in range(3)]
    assert await store.commit_page(sid, history, T0) == 3
    new, _ = await store.commit_replay_page(sid, [activity(9, T0 - 20 * day)], T0, T0)
    assert new == 1
    assert await store.prune_dedup(T0 + 3600_000 - 7 * day) == 0  # the hourly prune after it
    assert await store.commit_page(sid, history, T0 + 3600_000) == 0  # the retry: no double
    assert len(await store.read_outbox(0, 100)) == 4
    assert await store.prune_dedup(T0 + 1) == 4  # a retention later both times are older
    assert await store.dedup_count() == 0


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_dedup_keys_stored_before_the_insert_time_are_pruned_by_activity_time(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Keys stored before the schema knew insert times keep working as keys and are pruned by
    activity time, as they were; keys inserted after the upgrade are kept by both times."""
    old = [activity(i, T0 + i * 1000) for i in range(4)]
    insert = "INSERT INTO dedup (event_id, occurred_ms) VALUES (?, ?)"
    rows = [(a.event_id_bytes, a.occurred_ms) for a in old]
    store = open_store(await older_state(backend, tmp_path, request, 5, insert, rows))
    await store.open()
    try:
        assert await store.schema_version() == len(MIGRATIONS)
        sid = await one_stream(store)
        assert await store.commit_page(sid, [*old, activity(9, T0)], T0 + 10_000) == 1
        assert await store.prune_dedup(T0 + 2000) == 2
        assert await store.prune_dedup(T0 + 10_000) == 2
        assert await store.dedup_count() == 1
    finally:
        await store.close()


async def test_commit_replay_page_appends_a_repeated_activity_once(store: Store) -> None:
    """Offset pages that shift mid-pass return a record twice: a replay commit appends it
    once, as commit_page does (both copies were appended)."""
    sid = await one_stream(store)
    page = [activity(i, T0 + i * 10) for i in range(3)]
    await store.commit_page(sid, page, T0)
    new, appended = await store.commit_replay_page(
        sid,
        [page[0], page[1], page[1], page[2], activity(9, T0 + 90), activity(9, T0 + 90)],
        T0 + 1,
        T0,
    )
    assert (new, appended) == (1, 4)
    assert len({e.event_id for e in await store.read_outbox(3, 10)}) == 4


async def test_an_attempt_finished_after_a_reset_keeps_the_reset(store: Store) -> None:
    """redeliver or recover while an attempt is in flight: its record joins the history, but
    the delivery keeps the reset (pending, due now, a fresh budget) instead of the status the
    sender computed from the attempt count it read before (dead: never sent again)."""
    sid = await one_stream(store)
    await store.create_webhook(hook(1))
    await store.commit_page(sid, [activity(1, T0), activity(2, T0)], T0)
    await store.fanout(100, T0)
    first, second = sorted(await store.deliveries("wh_1", 10), key=lambda d: d.seq)
    read = {
        s.delivery_id: s.version for s in await store.due_sends("wh_1", T0, 10, kinds=ALL_KINDS)
    }
    await store.finish_attempts(
        [
            (Attempt(first.id, T0, 500, 1.0), "pending", T0 + 1, read[first.id]),
            (Attempt(second.id, T0, 500, 1.0), "pending", T0 + 1, read[second.id]),
        ]
    )
    # both read again with one attempt made, sent; then reset while in flight
    sent = {s.delivery_id: s for s in await store.due_sends("wh_1", T0 + 1, 10, kinds=ALL_KINDS)}
    assert [sent[d.id].attempts for d in (first, second)] == [1, 1]
    assert (await store.redeliver(first.id, T0 + 2)).attempts == 0
    assert await store.recover("wh_1", 0, T0 + 2) == 2
    await store.finish_attempts(
        [
            (
                Attempt(first.id, T0 + 3, 500, 1.0, "", "HTTP 500"),
                "dead",
                T0 + 3,
                sent[first.id].version,
            ),
            (Attempt(second.id, T0 + 3, 200, 1.0), "delivered", T0 + 3, sent[second.id].version),
        ]
    )
    for delivery in (first, second):
        now = await store.delivery(delivery.id)
        assert (now.status, now.attempts, now.next_attempt_ms) == ("pending", 0, T0 + 2)
        assert [a.attempted_ms for a in await store.attempts(delivery.id)] == [T0, T0 + 3]
    # an attempt of the reset delivery settles it as usual
    reset = {s.delivery_id: s for s in await store.due_sends("wh_1", T0 + 2, 10, kinds=ALL_KINDS)}
    assert reset[first.id].attempts == 0
    await store.finish_attempts(
        [(Attempt(first.id, T0 + 4, 200, 1.0), "delivered", T0 + 4, reset[first.id].version)]
    )
    assert (await store.delivery(first.id)).status == "delivered"


@pytest.mark.parametrize("reset", ["redeliver", "recover"])
async def test_a_first_attempt_finished_after_a_reset_keeps_the_reset(
    store: Store, reset: str
) -> None:
    """A reset during a delivery's FIRST attempt stands too: that attempt read 0 attempts, the
    count a reset sets, so only the version the reset moved on tells it (the attempt's retry in
    an hour used to overwrite the reset); of two attempts read at one version, only the first
    to finish settles the delivery."""
    sid = await one_stream(store)
    await store.create_webhook(hook(1))
    await store.commit_page(sid, [activity(1, T0)], T0)
    await store.fanout(100, T0)
    (sent,) = await store.due_sends("wh_1", T0, 10, kinds=ALL_KINDS)
    assert sent.attempts == 0
    if reset == "redeliver":
        await store.redeliver(sent.delivery_id, T0 + 2)
    else:
        assert await store.recover("wh_1", 0, T0 + 2) == 1
    hour = 3_600_000
    failed = Attempt(sent.delivery_id, T0 + 3, 503, 1.0)
    await store.finish_attempts([(failed, "pending", T0 + 3 + hour, sent.version)])
    now = await store.delivery(sent.delivery_id)
    assert (now.status, now.attempts, now.next_attempt_ms) == ("pending", 0, T0 + 2)
    assert [a.status_code for a in await store.attempts(sent.delivery_id)] == [503]
    (again,) = await store.due_sends("wh_1", T0 + 2, 10, kinds=ALL_KINDS)
    assert again.attempts == 0
    # sent twice at this version (a takeover): the first record settles it, the second is history
    first = Attempt(sent.delivery_id, T0 + 4, 503, 1.0)
    await store.finish_attempts([(first, "pending", T0 + 4 + hour, again.version)])
    late = Attempt(sent.delivery_id, T0 + 5, 200, 1.0)
    await store.finish_attempts([(late, "delivered", T0 + 5, again.version)])
    now = await store.delivery(sent.delivery_id)
    assert (now.status, now.attempts, now.next_attempt_ms) == ("pending", 1, T0 + 4 + hour)
    assert len(await store.attempts(sent.delivery_id)) == 3


async def test_recover_after_a_log_replay_owes_each_event_once(store: Store) -> None:
    """After a log replay each event is in the outbox twice with one id: recover makes one
    delivery per event (its first seq since the point asked for) and counts each once."""
    from relay.store import OutboxSelector

    sid = await one_stream(store)
    await store.create_webhook(hook(1))
    await store.commit_page(sid, [activity(i, T0 + i) for i in range(3)], T0)  # seq 1..3
    await store.replay_outbox(OutboxSelector("acme", T0), T0 + 5)  # copies: seq 4..6
    await store.fanout(100, T0 + 5)
    done = await store.deliveries("wh_1", 10)
    assert len(done) == 6
    await store.finish_attempts([(Attempt(d.id, T0, 200, 1.0), "delivered", T0, 0) for d in done])
    assert await store.recover("wh_1", T0, T0 + 10) == 3
    pending = await store.deliveries("wh_1", 10, "pending")
    assert sorted(d.seq for d in pending) == [1, 2, 3]


async def test_recover_resets_the_pending_delivery_of_a_replayed_event(store: Store) -> None:
    """An event whose replay copy is still pending is owed once: recover resets that delivery,
    whatever its seq, instead of owing the event again at its first seq (sent twice); an event
    with no pending delivery is owed at its first seq since the point asked for; kinds the
    filter rejects are not owed. The answer counts each event once."""
    from relay.store import OutboxSelector

    sid = await one_stream(store)
    await store.create_webhook(dataclasses.replace(hook(1), event_types=(Kind.OPEN.event_type,)))
    opens = [activity(i, T0 + i) for i in range(3)]
    await store.commit_page(sid, [*opens, activity(9, T0 + 9, Kind.CLICK)], T0)  # seq 1..4
    await store.fanout(100, T0)
    first = await store.deliveries("wh_1", 10)
    assert sorted(d.seq for d in first) == [1, 2, 3]
    await store.finish_attempts([(Attempt(d.id, T0, 200, 1.0), "delivered", T0, 0) for d in first])
    await store.replay_outbox(OutboxSelector("acme", T0), T0 + 5)  # copies: seq 5..8
    await store.fanout(100, T0 + 5)  # pending: 5, 6, 7 (8 is the click)
    copies = {d.seq: d for d in await store.deliveries("wh_1", 10, "pending")}
    assert sorted(copies) == [5, 6, 7]
    # the copy of the first open delivered, of the second retrying (one attempt made)
    await store.finish_attempts(
        [
            (Attempt(copies[5].id, T0 + 6, 200, 1.0), "delivered", T0 + 6, 0),
            (Attempt(copies[6].id, T0 + 6, 503, 1.0), "pending", T0 + 60_000, 0),
        ]
    )
    assert await store.recover("wh_1", T0, T0 + 10) == 3
    pending = await store.deliveries("wh_1", 10, "pending")
    assert sorted(d.seq for d in pending) == [1, 6, 7]  # one per open event
    assert len({d.event_id for d in pending}) == 3
    assert {(d.attempts, d.next_attempt_ms) for d in pending} == {(0, T0 + 10)}
    # recovered again: still one pending delivery per event
    assert await store.recover("wh_1", 0, T0 + 20) == 3
    assert sorted(d.seq for d in await store.deliveries("wh_1", 10, "pending")) == [1, 6, 7]


async def test_a_narrowed_filter_drops_the_pending_deliveries_it_rejects(store: Store) -> None:
    """Changing event_types drops, with their attempts, the webhook's pending deliveries (retries
    included) of the kinds the new filter rejects; delivered and dead ones, those it still wants
    and other webhooks' stay, and widening it again owes nothing back."""
    sid = await one_stream(store)
    first = await store.create_webhook(hook(1))
    await store.create_webhook(hook(2, url="https://example.com/other"))
    opens = [activity(i, T0 + i) for i in range(3)]
    clicks = [activity(i, T0 + 10 + i, Kind.CLICK) for i in range(2)]
    await store.commit_page(sid, [*opens, *clicks], T0)  # seq 1..3 opens, 4..5 clicks
    await store.fanout(100, T0)
    by_seq = {d.seq: d for d in await store.deliveries("wh_1", 10)}
    await store.finish_attempts(
        [
            (Attempt(by_seq[1].id, T0, 200, 1.0), "delivered", T0, 0),
            (Attempt(by_seq[2].id, T0, 500, 1.0), "dead", T0, 0),
            # a retry in an hour: not in flight (one due may be: see the next test)
            (Attempt(by_seq[3].id, T0, 503, 1.0), "pending", T0 + 3_600_000, 0),
            (Attempt(by_seq[4].id, T0, 503, 1.0), "pending", T0 + 5, 0),
        ]
    )
    await store.update_webhook(dataclasses.replace(first, description="x"), ["description"])
    assert len(await store.deliveries("wh_1", 10)) == 5  # another field: nothing dropped
    narrowed = dataclasses.replace(first, event_types=("com.constantcontact.email.click",))
    await store.update_webhook(narrowed, ["event_types"])
    left = {d.seq: d.status for d in await store.deliveries("wh_1", 10)}
    assert left == {1: "delivered", 2: "dead", 4: "pending", 5: "pending"}
    assert await store.attempts(by_seq[3].id) == []
    assert sorted(d.seq for d, _ in await store.due_deliveries("wh_1", T0 + 10, 10)) == [4, 5]
    assert len(await store.deliveries("wh_2", 10, "pending")) == 5
    await store.update_webhook(first, ["event_types"])  # widened again
    assert sorted(d.seq for d in await store.deliveries("wh_1", 10)) == [1, 2, 4, 5]


CLICKS_ONLY = ("com.constantcontact.email.click",)
NARROW_TO_CLICKS = "UPDATE webhooks SET event_types = '[\"com.constantcontact.email.click\"]'"


async def test_redeliver_refuses_a_kind_the_filter_no_longer_wants(store: Store) -> None:
    """A delivered open of a webhook narrowed to clicks: redelivered, it would stay pending for
    ever (never sent, never dead-lettered), so redeliver raises UnwantedError naming the filter
    and leaves it as it is; a click of the same webhook is redelivered."""
    sid = await one_stream(store)
    first = await store.create_webhook(hook(1))
    await store.commit_page(sid, [activity(1, T0 + 1), activity(2, T0 + 2, Kind.CLICK)], T0)
    await store.fanout(100, T0)
    opened, clicked = sorted(await store.deliveries("wh_1", 10), key=lambda d: d.seq)
    await store.finish_attempts(
        [(Attempt(d.id, T0, 200, 1.0), "delivered", T0, 0) for d in (opened, clicked)]
    )
    await store.update_webhook(dataclasses.replace(first, event_types=CLICKS_ONLY), ["event_types"])
    message = (
        f"delivery {opened.id}: its event is a com.constantcontact.email.open, which webhook"
        " wh_1's event_types (com.constantcontact.email.click) no longer let through"
    )
    with pytest.raises(UnwantedError, match=re.escape(message)):
        await store.redeliver(opened.id, T0 + 5)
    assert (await store.delivery(opened.id)).status == "delivered"
    assert (await store.redeliver(clicked.id, T0 + 5)).status == "pending"
    assert await store.deliveries("wh_1", 10, "pending") == [await store.delivery(clicked.id)]


async def test_a_redeliver_racing_a_filter_edit_sees_the_edit(store: Store) -> None:
    """PostgreSQL: a filter edit in progress (its transaction open, the webhook's row written)
    while a redeliver of a kind it drops runs: the redeliver waits for it and is refused, so no
    delivery of a rejected kind is left pending (the edit's drop could not see it). SQLite
    runs one write transaction at a time: the edit is committed first."""
    sid = await one_stream(store)
    await store.create_webhook(hook(1))
    await store.commit_page(sid, [activity(1, T0 + 1)], T0)
    await store.fanout(100, T0)
    (opened,) = await store.deliveries("wh_1", 10)
    await store.finish_attempts([(Attempt(opened.id, T0, 200, 1.0), "delivered", T0, 0)])
    types = orjson.dumps(list(CLICKS_ONLY)).decode()
    if isinstance(store, PostgresStore):
        pg = await asyncpg.connect(store._url)
        try:
            async with pg.transaction():
                await pg.execute("UPDATE webhooks SET event_types = $1 WHERE id = 'wh_1'", types)
                redelivering = asyncio.create_task(store.redeliver(opened.id, T0 + 5))
                await asyncio.sleep(0.3)  # it has read the delivery and waits for the row
        finally:
            await pg.close()
        outcome = await asyncio.gather(redelivering, return_exceptions=True)
    else:
        narrowed = dataclasses.replace(hook(1), event_types=CLICKS_ONLY)
        await store.update_webhook(narrowed, ["event_types"])
        outcome = await asyncio.gather(store.redeliver(opened.id, T0 + 5), return_exceptions=True)
    assert isinstance(outcome[0], UnwantedError), outcome
    assert await store.deliveries("wh_1", 10, "pending") == []


async def test_a_filter_edit_leaves_rejected_deliveries_that_may_be_in_flight_to_the_worker(
    store: Store,
) -> None:
    """A filter edit at T0 + 10 s narrowing to clicks: pending opens due by then plus a minute
    (one may be in flight, and its attempt's record must find it) stay, never read; the one due
    later goes at once. The worker's drop_unwanted then drops them, but those it holds; its
    records of them are written in full (a delivered one stays delivered)."""
    sid = await one_stream(store)
    first = await store.create_webhook(hook(1))
    await store.commit_page(sid, [activity(i, T0 + i) for i in range(4)], T0)  # opens 1..4
    await store.commit_page(sid, [activity(9, T0 + 9, Kind.CLICK)], T0)  # seq 5
    await store.fanout(100, T0)
    by_seq = {d.seq: d for d in await store.deliveries("wh_1", 10)}
    await store.finish_attempts(
        [
            (Attempt(by_seq[3].id, T0, 503, 1.0), "pending", T0 + 10_000 + 59_000, 0),
            (Attempt(by_seq[4].id, T0, 503, 1.0), "pending", T0 + 10_000 + 61_000, 0),
        ]
    )
    edited = dataclasses.replace(first, event_types=CLICKS_ONLY, updated_ms=T0 + 10_000)
    await store.update_webhook(edited, ["event_types", "updated_ms"])
    pending = {d.seq for d in await store.deliveries("wh_1", 10, "pending")}
    assert pending == {1, 2, 3, 5}  # seq 4, due after the minute, went
    due = await store.due_sends("wh_1", T0 + 100_000, 10, kinds=["click"])
    assert [s.kind for s in due] == ["click"]
    # the worker holds seq 1 (its attempt just succeeded, its record lingers)
    assert await store.drop_unwanted("wh_1", {by_seq[1].id}) == 2
    assert {d.seq for d in await store.deliveries("wh_1", 10, "pending")} == {1, 5}
    assert await store.attempts(by_seq[3].id) == []
    await store.finish_attempts([(Attempt(by_seq[1].id, T0 + 1, 200, 1.0), "delivered", T0, 0)])
    delivered = await store.delivery(by_seq[1].id)
    assert (delivered.status, delivered.attempts) == ("delivered", 1)
    assert len(await store.attempts(by_seq[1].id)) == 1


async def test_a_fanout_racing_a_filter_edit_leaves_no_rejected_kind_pending(store: Store) -> None:
    """PostgreSQL: a filter edit narrowing to clicks, followed at once by the worker's drop
    (told of the edit), while a fan-out that has read the webhooks (and inserted an open and a
    click for it) is still open: the edit waits for the fan-out, so the drop after it sees the
    open, and only the click is left pending. (The fan-out read the webhooks unlocked: the edit
    and the drop committed first, neither could see the uncommitted open, and the fan-out then
    left it pending, never to be sent nor dropped.) SQLite runs one write transaction at a
    time: the fan-out is committed first."""
    sid = await one_stream(store)
    first = await store.create_webhook(hook(1))
    await store.commit_page(sid, [activity(1, T0 + 1)], T0)
    await store.fanout(100, T0)  # the fan-out's cursor row exists: the test can lock it
    await store.commit_page(sid, [activity(2, T0 + 2), activity(3, T0 + 3, Kind.CLICK)], T0)
    narrowed = dataclasses.replace(first, event_types=CLICKS_ONLY)

    async def edit_then_drop() -> int:
        await store.update_webhook(narrowed, ["event_types"])
        return await store.drop_unwanted("wh_1")

    if isinstance(store, PostgresStore):
        pg = await asyncpg.connect(store._url)
        try:
            async with pg.transaction():
                # the fan-out reads, inserts, then waits here to move its cursor
                await pg.execute(
                    "SELECT seq FROM sink_cursors WHERE sink = $1 FOR UPDATE", rowmap.FANOUT
                )
                fanning = asyncio.create_task(store.fanout(100, T0))
                await asyncio.sleep(0.3)
                editing = asyncio.create_task(edit_then_drop())
                await asyncio.sleep(0.3)  # the edit and the drop commit now, or wait
        finally:
            await pg.close()
        await asyncio.gather(fanning, editing)
    else:
        assert await store.fanout(100, T0) == 2
        await edit_then_drop()
    pending = await store.deliveries("wh_1", 10, "pending")
    assert [d.seq for d in pending] == [3]  # the click (both opens dropped)


async def test_due_sends_read_only_the_kinds_asked_for(store: Store) -> None:
    """600 older pending opens and 5 clicks: asked for clicks, the due read returns the clicks
    in one batch of 512 (the opens are neither read nor counted in the limit; a read of every
    kind fills the batch with opens, and the clicks would never come)."""
    sid = await one_stream(store)
    await store.create_webhook(hook(1))
    opens = [activity(i, T0 + i) for i in range(600)]
    await store.commit_page(sid, opens, T0)
    await store.fanout(1000, T0)
    await store.commit_page(sid, [activity(i, T0 + i, Kind.CLICK) for i in range(5)], T0 + 1)
    await store.fanout(1000, T0 + 1)
    assert {s.kind for s in await store.due_sends("wh_1", T0 + 10, 512, kinds=ALL_KINDS)} == {
        "open"
    }
    clicks = await store.due_sends("wh_1", T0 + 10, 512, kinds=["click"])
    assert [s.kind for s in clicks] == ["click"] * 5
    assert await store.due_sends("wh_1", T0 + 10, 512, kinds=[]) == []
    skip = {clicks[0].delivery_id}
    assert await store.due_sends("wh_1", T0 + 10, 2, skip, kinds=["click"]) == clicks[1:3]


async def test_next_due_ms_of_the_kinds_asked_for(store: Store) -> None:
    """The next due time after a moment, of every kind or of the kinds asked for only (an open
    due sooner does not count when clicks are asked for)."""
    sid = await one_stream(store)
    await store.create_webhook(hook(1))
    await store.commit_page(sid, [activity(1, T0 + 1), activity(2, T0 + 2, Kind.CLICK)], T0)
    await store.fanout(100, T0)
    by_seq = {d.seq: d for d in await store.deliveries("wh_1", 10)}
    await store.finish_attempts(
        [
            (Attempt(by_seq[1].id, T0, 503, 1.0), "pending", T0 + 100, 0),
            (Attempt(by_seq[2].id, T0, 503, 1.0), "pending", T0 + 200, 0),
        ]
    )
    assert await store.next_due_ms("wh_1", T0) == T0 + 100
    assert await store.next_due_ms("wh_1", T0, kinds=ALL_KINDS) == T0 + 100
    assert await store.next_due_ms("wh_1", T0, kinds=["click"]) == T0 + 200
    assert await store.next_due_ms("wh_1", T0 + 200, kinds=ALL_KINDS) is None
    assert await store.next_due_ms("wh_1", T0, kinds=[]) is None


async def test_attempts_of_reads_many_deliveries_histories_at_once(store: Store) -> None:
    """Each delivery's attempts, oldest first; one without attempts, or unknown, has none."""
    sid = await one_stream(store)
    await store.create_webhook(hook(1))
    await store.commit_page(sid, [activity(i, T0 + i) for i in range(3)], T0)
    await store.fanout(100, T0)
    first, second, third = sorted(await store.deliveries("wh_1", 10), key=lambda d: d.seq)
    for n in range(2):
        await store.finish_attempts(
            [
                (Attempt(d.id, T0 + n, 500, 1.0, f"{d.id}.{n}"), "pending", T0, n)
                for d in (first, second)
            ]
        )
    found = await store.attempts_of([second.id, third.id, first.id, 999_999])
    assert found == {
        first.id: await store.attempts(first.id),
        second.id: await store.attempts(second.id),
        third.id: [],
        999_999: [],
    }
    assert [a.response_excerpt for a in found[first.id]] == [f"{first.id}.0", f"{first.id}.1"]
    assert await store.attempts_of([]) == {}


async def test_drop_unwanted_drops_what_the_stored_filter_rejects(
    store: Store, tmp_path: Path
) -> None:
    """Pending opens left behind by an older relay (a redelivery after the filter was narrowed
    to clicks) go with their attempts, as a filter edit drops them; pending clicks, and
    delivered opens, stay; a second call finds nothing."""
    sid = await one_stream(store)
    await store.create_webhook(hook(1))
    opens = [activity(i, T0 + i) for i in range(3)]
    await store.commit_page(sid, [*opens, activity(9, T0 + 9, Kind.CLICK)], T0)  # seq 1..4
    await store.fanout(100, T0)
    by_seq = {d.seq: d for d in await store.deliveries("wh_1", 10)}
    await store.finish_attempts(
        [
            (Attempt(by_seq[1].id, T0, 200, 1.0), "delivered", T0, 0),
            (Attempt(by_seq[2].id, T0, 500, 1.0), "pending", T0 + 5, 0),
        ]
    )
    await behind_the_store(store, tmp_path, NARROW_TO_CLICKS)
    assert await store.drop_unwanted("wh_1") == 2  # seq 2 (with its attempt) and 3
    left = {d.seq: d.status for d in await store.deliveries("wh_1", 10)}
    assert left == {1: "delivered", 4: "pending"}
    assert await store.attempts(by_seq[2].id) == []
    assert await store.drop_unwanted("wh_1") == 0
    with pytest.raises(NotFoundError):
        await store.drop_unwanted("wh_none")


async def test_the_due_read_uses_the_due_index_with_the_kinds_filter(tmp_path: Path) -> None:
    """SQLite: the due read (one JSON statement, the wanted kinds a parameter) still walks the
    deliveries_due index in due order, then one outbox lookup by seq per row (EXPLAIN QUERY
    PLAN of the store's own statement on an analysed table)."""
    store = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await store.open()
    await store.close()
    conn = sqlite3.connect(tmp_path / "state.db")
    try:
        conn.execute(_FILL_WEBHOOKS)
        conn.execute(_FILL_DELIVERIES.format(numbers=SQLITE_NUMBERS))
        conn.execute("ANALYZE")
        args = ("wh_1", T0, "[]", '["click"]', 512)
        rows = conn.execute(f"EXPLAIN QUERY PLAN {sqlite_store._DUE_SENDS_JSON}", args)
        plan = " | ".join(r[3] for r in rows)
    finally:
        conn.close()
    assert "SEARCH d USING INDEX deliveries_due" in plan, plan
    assert "SEARCH o USING INTEGER PRIMARY KEY" in plan, plan
    assert "TEMP B-TREE" not in plan, plan


@contextlib.asynccontextmanager
async def delivery_row_locked(store: Store, delivery_id: int) -> AsyncIterator[None]:
    """PostgreSQL: another connection holds the delivery's row, so a recover resetting it waits
    in mid-transaction (its reads done, its writes not) until the block ends. SQLite runs one
    transaction at a time: nothing to hold."""
    if not isinstance(store, PostgresStore):
        yield
        return
    conn = await asyncpg.connect(store._url)
    try:
        async with conn.transaction():
            await conn.execute("SELECT 1 FROM deliveries WHERE id = $1 FOR UPDATE", delivery_id)
            yield
    finally:
        await conn.close()


async def test_a_prune_overlapping_a_recover_leaves_no_pending_delivery_without_its_event(
    store: Store,
) -> None:
    """recover reads old events and owes them again while the hourly prune runs: the prune
    waits for it (PostgreSQL: its NOT EXISTS cannot see uncommitted deliveries) and keeps the
    events, so every pending delivery is still due (the due read joins its event)."""
    sid = await one_stream(store)
    await store.create_webhook(hook(1))
    await store.commit_page(sid, [activity(i, T0 + i) for i in range(1, 4)], T0)  # seq 1..3
    await store.fanout(100, T0)
    delivered = sorted(await store.deliveries("wh_1", 10), key=lambda d: d.seq)
    await store.finish_attempts(
        [(Attempt(d.id, T0, 200, 1.0), "delivered", T0, 0) for d in delivered]
    )
    await store.commit_page(sid, [activity(9, T0 + 9)], T0 + 10**6)  # seq 4: the head stays
    await store.fanout(100, T0 + 10**6)
    async with delivery_row_locked(store, delivered[0].id):
        recovering = asyncio.create_task(store.recover("wh_1", 0, T0 + 10**6))
        await asyncio.sleep(0.3)  # recover has read the events and waits to write
        pruning = asyncio.create_task(store.prune_outbox(T0 + 1, []))
        await asyncio.sleep(0.3)
    assert await recovering == 4
    await pruning
    pending = await store.deliveries("wh_1", 10, "pending")
    due = await store.due_deliveries("wh_1", T0 + 10**7, 10)
    assert sorted(d.id for d in pending) == sorted(d.id for d, _ in due)
    assert len(due) == 4


async def test_a_prune_overlapping_a_redeliver_leaves_no_pending_delivery_without_its_event(
    store: Store,
) -> None:
    """redeliver makes a delivered delivery pending while the prune deletes delivered events:
    either the prune goes first (GoneError, nothing pending) or the event stays."""
    sid = await one_stream(store)
    await store.create_webhook(hook(1))
    await store.commit_page(sid, [activity(1, T0 + 1), activity(2, T0 + 2)], T0)  # seq 1, 2
    await store.fanout(100, T0)
    first = sorted(await store.deliveries("wh_1", 10), key=lambda d: d.seq)[0]
    await store.finish_attempts([(Attempt(first.id, T0, 200, 1.0), "delivered", T0, 0)])
    async with delivery_row_locked(store, first.id):
        redelivering = asyncio.create_task(store.redeliver(first.id, T0 + 5))
        await asyncio.sleep(0.3)  # PostgreSQL: its UPDATE waits for the row
        pruning = asyncio.create_task(store.prune_outbox(T0 + 1, []))
        await asyncio.sleep(0.3)
    redelivered = await asyncio.gather(redelivering, return_exceptions=True)
    await pruning
    now = await store.delivery(first.id)
    due = await store.due_deliveries("wh_1", T0 + 10**7, 10)
    if now.status == "pending":
        assert first.id in [d.id for d, _ in due]
    else:
        assert isinstance(redelivered[0], GoneError)


async def test_a_pass_with_a_failed_feed_counts_an_error_and_moves_the_rest(store: Store) -> None:
    """finish_pass with an error (a feed failed, the others were committed) moves watermarks
    and counts one more consecutive error, so the stream keeps backing off; a clean pass
    clears the count and the error."""
    sid = await one_stream(store)
    for n in (1, 2):
        result = PassResult({Kind.OPEN: T0 + n}, {"opens": n}, T0 + n, 1.0, T0 + n, "clicks: 500")
        await store.finish_pass(sid, result)
        stream = await store.stream(sid)
        assert (stream.consecutive_errors, stream.last_error) == (n, "clicks: 500")
        assert stream.watermarks == {Kind.OPEN: T0 + n}
    await store.finish_pass(sid, PassResult({}, {}, T0 + 5, 1.0, T0 + 5))
    stream = await store.stream(sid)
    assert (stream.consecutive_errors, stream.last_error) == (0, None)


async def test_a_closed_sqlite_store_refuses_calls_with_a_store_error(tmp_path: Path) -> None:
    """A call on a closed SQLite store raised RuntimeError from its shut-down executor, which
    the admin API answered with a 500; it is a StoreError (a 503 naming the store)."""
    store = open_store(f"sqlite:///{tmp_path / 'closed.db'}")
    await store.open()
    await store.close()
    with pytest.raises(StoreError, match="closed"):
        await store.streams()


async def test_a_sqlite_store_that_fails_to_open_closes_its_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Migrations refusing the file (a schema newer than the code) left the connection open."""
    path = tmp_path / "newer.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY)")
        conn.execute("INSERT INTO schema_version VALUES (?)", (len(MIGRATIONS) + 1,))
        conn.commit()
    opened: list[Recording] = []
    connect = sqlite3.connect

    class Recording(sqlite3.Connection):
        closed = False

        def close(self) -> None:
            self.closed = True
            super().close()

    def recording(*args: object, **kwargs: object) -> sqlite3.Connection:
        conn = connect(*args, factory=Recording, **kwargs)  # type: ignore[misc]
        opened.append(conn)
        return conn

    monkeypatch.setattr(sqlite_store.sqlite3, "connect", recording)
    store = open_store(f"sqlite:///{path}")
    with pytest.raises(StoreError, match="newer"):
        await store.open()
    assert opened
    assert all(c.closed for c in opened)


def test_outbox_event_built_by_its_own_init_is_still_a_frozen_value() -> None:
    """OutboxEvent's hand-written __init__ puts each argument in its field and keeps the frozen
    dataclass's contract: immutable, equal and hashed by value, dataclasses.replace."""
    args = (7, "id-7", "acme", Kind.CLICK, "11", "22", 1_000, 2_000, b'{"a":1}')
    event = OutboxEvent(*args)
    assert dataclasses.astuple(event) == args
    assert event == OutboxEvent(*args)
    assert hash(event) == hash(OutboxEvent(*args))
    assert dataclasses.replace(event, seq=8).seq == 8
    assert dataclasses.replace(event, seq=8).data == b'{"a":1}'
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.seq = 9  # type: ignore[misc]
