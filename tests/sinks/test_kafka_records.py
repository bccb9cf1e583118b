"""The Kafka sink's record building: CloudEvents binary/structured records, partitioning, and
reading what the store handed over in memory."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import cast

import orjson
import pytest
from aiokafka.partitioner import DefaultPartitioner

from relay.events import Activity, Kind, from_millis
from relay.sinks import kafka
from relay.sinks.kafka import KafkaSettings, KafkaSink, _Partitioner, record_for
from relay.store import OutboxAppend, OutboxEvent, Store


def event(
    kind: Kind, contact: str = "1001", ms: int = 1_763_633_221_500, link_uri: str | None = None
) -> OutboxEvent:
    activity = Activity(
        account="acme",
        kind=kind,
        campaign_id="1100394165290",
        contact_id=contact,
        email_address="c@example.com",
        occurred_at=from_millis(ms),
        link_id="7" if kind is Kind.CLICK else None,
        link_uri=link_uri,
    )
    return OutboxEvent(
        seq=1,
        event_id=activity.event_id,
        account="acme",
        kind=kind,
        campaign_id="1100394165290",
        contact_id=contact,
        occurred_ms=ms,
        committed_ms=ms,
        data=orjson.dumps(activity.data()),
    )


@pytest.mark.parametrize("kind", list(Kind), ids=lambda k: k.value)
def test_binary_headers_are_the_cloudevent_attributes(kind: Kind) -> None:
    """Every attribute but datacontenttype is a ce_ header, in order; content-type last."""
    e = event(kind)
    value, headers = record_for(e, "binary")
    attrs = e.attributes()
    expected = [(f"ce_{k}", v.encode()) for k, v in attrs.items() if k != "datacontenttype"]
    assert headers == [*expected, ("content-type", attrs["datacontenttype"].encode())]
    assert value == e.data


def test_structured_record_is_the_whole_event() -> None:
    """Structured mode: the value is the CloudEvent JSON, content-type says so."""
    e = event(Kind.BOUNCE)
    value, headers = record_for(e, "structured")
    assert headers == [("content-type", b"application/cloudevents+json")]
    assert orjson.loads(value) == {**e.attributes(), "data": orjson.loads(e.data)}


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_a_clicks_link_uri_is_in_the_record_value(mode: str) -> None:
    """Binary mode's value (the data) and structured mode's (the whole event, also the webhook
    body) carry the clicked URL."""
    value, _ = record_for(event(Kind.CLICK, link_uri="http://www.constantcontact.com"), mode)
    loaded = orjson.loads(value)
    data = loaded if mode == "binary" else loaded["data"]
    assert data["link_uri"] == "http://www.constantcontact.com"
    assert data["link_id"] == "7"


def test_record_headers_are_not_shared_between_records() -> None:
    """Each record gets its own header list (the producer may keep it until acknowledged)."""
    one = record_for(event(Kind.OPEN), "structured")
    two = record_for(event(Kind.OPEN), "structured")
    one[1].append(("x", b"y"))
    assert two[1] == [("content-type", b"application/cloudevents+json")]


@pytest.mark.parametrize("count", [1, 3, 7])
def test_partitions_match_the_default_partitioner(count: int) -> None:
    """Cached hashing picks the partition aiokafka's DefaultPartitioner picks for each key."""
    partitioner = _Partitioner(capacity=50)  # small: the bound is crossed on the way
    partitions = list(range(count))
    for contact in range(200):
        key = str(1000 + contact * 7919).encode()
        expected = DefaultPartitioner()(key, partitions, partitions)
        assert partitioner(key, partitions) == expected
        assert partitioner(key, partitions) == expected  # from the cache


def appended(after: int, seqs: list[int]) -> OutboxAppend:
    return OutboxAppend(after, [dataclasses.replace(event(Kind.OPEN, str(s)), seq=s) for s in seqs])


class NoStore:
    """Only what a KafkaSink touches when it is built."""

    def __init__(self) -> None:
        self.listeners: list[Callable[[OutboxAppend], None]] = []

    def on_append(self, listener: Callable[[OutboxAppend], None]) -> None:
        self.listeners.append(listener)


def sink_with(*appends: OutboxAppend) -> KafkaSink:
    store = NoStore()
    sink = KafkaSink(KafkaSettings(bootstrap_servers="127.0.0.1:9"), cast(Store, store))
    for append in appends:
        store.listeners[0](append)
    return sink


def seqs(events: list[OutboxEvent]) -> list[int]:
    return [e.seq for e in events]


def test_handed_over_commits_are_read_in_order_across_commits() -> None:
    """Commits announced out of order still read back in seq order, up to the limit, from any
    position inside them."""
    sink = sink_with(appended(3, [4, 5]), appended(0, [1, 2, 3]), appended(5, [6, 7, 8]))
    assert seqs(sink._from_memory(0, 100)) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert seqs(sink._from_memory(2, 4)) == [3, 4, 5, 6]
    assert seqs(sink._from_memory(8, 100)) == []


def test_a_gap_in_what_was_handed_over_means_reading_the_outbox() -> None:
    """Rows nobody announced (a replay, another process) stop the in-memory read at the gap."""
    sink = sink_with(appended(0, [1, 2]), appended(5, [6, 7]))
    assert seqs(sink._from_memory(0, 100)) == [1, 2]
    assert seqs(sink._from_memory(2, 100)) == []  # 3..5 are only in the outbox
    assert seqs(sink._from_memory(5, 100)) == [6, 7]
    assert seqs(sink._from_memory(9, 100)) == []


def test_published_commits_are_let_go_and_memory_stays_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What the sink has passed is dropped; beyond the bound the oldest commits go first."""
    monkeypatch.setattr(kafka, "_HANDED_OVER_MAX", 5)
    sink = sink_with(appended(0, [1, 2]), appended(2, [3, 4]), appended(4, [5, 6]))
    assert seqs(sink._from_memory(0, 100)) == []  # 1, 2 dropped: read from the outbox
    assert seqs(sink._from_memory(2, 100)) == [3, 4, 5, 6]
    sink._from_memory(4, 1)
    assert [a.after_seq for a in sink._handed] == [4]
    assert sink._handed_events == 2


@pytest.mark.parametrize("mode", ["binary", "structured"])
@pytest.mark.parametrize("kind", list(Kind), ids=lambda k: k.value)
def test_record_size_counts_key_value_and_every_header(kind: Kind, mode: str) -> None:
    """The size checked against max_request_bytes is the key, the value and every header's name
    and value, whatever the parts it is summed from."""
    e = event(kind, contact="123456789")
    key = e.contact_id.encode()
    value, headers, size = kafka._record(e, mode, key, {})
    assert (value, headers) == record_for(e, mode)
    assert size == len(key) + len(value) + sum(len(n) + len(v) for n, v in headers)
