"""The poller's handling of records it cannot parse (test_poller.py runs against the simulator,
which renders only well-formed records)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import cast

import pytest

from relay.ctct.catalogue import Endpoint
from relay.ctct.client import CtctClient, Page
from relay.events import JsonObject, Kind, parse_time, to_millis
from relay.poller import Poller, PollSettings
from relay.store import Store, StreamKey, open_store

GOOD_TIME = "2026-11-20T10:05:00.000Z"


def open_record(contact: str, when: str) -> JsonObject:
    return {
        "activity_type": "EMAIL_OPEN",
        "campaign_id": "1100394165290",
        "contact_id": contact,
        "email_address": f"contact{contact}@example.com",
        "open_date": when,
    }


class OnePageClient:
    """Stands in for CtctClient (no upstream here): every feed is one page of given records."""

    def __init__(self, records: list[JsonObject]) -> None:
        self.records = records
        self.requests_sent = 0

    async def pages(
        self,
        endpoint: Endpoint,
        *,
        resource_id: str | None = None,
        link_id: str | None = None,
        since: datetime | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[Page]:
        self.requests_sent += 1
        yield Page(1, tuple(self.records), None)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await opened.open()
    yield opened
    await opened.close()


@pytest.mark.parametrize(
    "bad_time",
    [
        pytest.param("0001-01-01T00:00:00+01:00", id="before-year-1-in-utc"),
        pytest.param("9999-12-31T23:59:59-01:00", id="after-year-9999-in-utc"),
    ],
)
async def test_a_record_with_an_out_of_range_time_is_skipped_and_counted(
    store: Store, bad_time: str
) -> None:
    """The pass goes on past the record: the good records are committed, the bad one counts in
    ``skipped_records``, and the watermark is the newest good time."""
    client = OnePageClient(
        [open_record("1", GOOD_TIME), open_record("2", bad_time), open_record("3", GOOD_TIME)]
    )
    settings = PollSettings(kinds=(Kind.OPEN,), start_from="earliest", summary_gate=False)
    poller = Poller(cast(CtctClient, client), store, "acme", settings)
    await store.ensure_streams([StreamKey("acme", "campaign", "1100394165290")], 0, seed=False)
    stream = (await store.streams())[0]
    outcome = await poller.run_pass(stream)
    assert outcome.skipped_records == 1
    assert outcome.new == 2
    assert outcome.watermarks == {Kind.OPEN: to_millis(parse_time(GOOD_TIME))}
    events = await store.read_outbox(0, 10)
    assert sorted(e.contact_id for e in events) == ["1", "3"]
