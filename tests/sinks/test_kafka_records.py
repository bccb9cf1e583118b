"""The Kafka sink's record building: CloudEvents binary/structured records and partitioning."""

from __future__ import annotations

import orjson
import pytest
from aiokafka.partitioner import DefaultPartitioner

from relay.events import Activity, Kind, from_millis
from relay.sinks.kafka import _Partitioner, record_for
from relay.store import OutboxEvent


def event(kind: Kind, contact: str = "1001", ms: int = 1_763_633_221_500) -> OutboxEvent:
    activity = Activity(
        account="acme",
        kind=kind,
        campaign_id="1100394165290",
        contact_id=contact,
        email_address="c@example.com",
        occurred_at=from_millis(ms),
        link_id="7" if kind is Kind.CLICK else None,
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
