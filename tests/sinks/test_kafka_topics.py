"""Creating the sink's missing topics at start-up, against an in-process admin client that
answers as a broker's controller does: per-topic error codes, retriable ones asked again within
the start-up's time, the others fatal at once. tests/integration creates topics on a real
broker (that one answers every request at once: no retriable code to meet there)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from aiokafka.admin import NewTopic
from aiokafka.errors import (
    InvalidReplicationFactorError,
    NotControllerError,
    RequestTimedOutError,
    TopicAlreadyExistsError,
)
from structlog.testing import capture_logs

from relay.sinks.kafka import KafkaSettings, KafkaSink, KafkaSinkError
from relay.store import Store

OPEN, CLICK = "ctct.email.open", "ctct.email.click"


@dataclass
class Answer:
    """A CreateTopics response (version 1 on: topic, code, message)."""

    topic_errors: list[tuple[str, int, str | None]]


@dataclass
class FakeMetadata:
    refreshed: int = 0

    async def force_metadata_update(self) -> bool:
        self.refreshed += 1
        return True


@dataclass
class FakeAdmin:
    """An admin client whose CreateTopics answers are scripted, one code per topic per ask
    (0 once the list runs out); it records what each ask named."""

    existing: list[str]
    codes: dict[str, list[int]]
    asked: list[list[str]] = field(default_factory=list)
    _client: FakeMetadata = field(default_factory=FakeMetadata)

    async def list_topics(self) -> list[str]:
        return list(self.existing)

    async def create_topics(self, new_topics: Sequence[NewTopic]) -> Answer:
        names = [t.name for t in new_topics]
        self.asked.append(names)
        errors = []
        for name in names:
            script = self.codes.get(name, [])
            code = script.pop(0) if script else 0
            errors.append((name, code, "from the fake" if code else None))
        return Answer(errors)


class NoAclCheck(KafkaSink):
    """The sink without its ACL check (a metadata request to a real broker)."""

    async def _check_authorized(self, topics: list[str]) -> None:
        return None


async def create(
    store: Store,
    admin: FakeAdmin,
    wanted: list[str],
    request_timeout_s: float = 0.5,
    until: float | None = None,
) -> None:
    """``_create_missing`` of a sink creating topics, through ``admin``."""
    settings = KafkaSettings(
        bootstrap_servers="kafka-1:9092", create_topics=True, request_timeout_s=request_timeout_s
    )
    creating = NoAclCheck(settings, store)
    if until is None:
        await creating._create_missing(admin, wanted)  # type: ignore[arg-type]
    else:
        await creating._create_missing(admin, wanted, until)  # type: ignore[arg-type]


async def test_retriable_refusals_are_asked_again_and_already_exists_is_success(
    store: Store,
) -> None:
    """RequestTimedOut and NotController for a topic each are asked again, those topics only,
    after the controller is looked up again; TopicAlreadyExists then (the timed-out creation
    went through) counts as created: the start-up goes on."""
    admin = FakeAdmin(
        existing=[],
        codes={
            OPEN: [RequestTimedOutError.errno, TopicAlreadyExistsError.errno],
            CLICK: [NotControllerError.errno],
        },
    )
    with capture_logs() as logs:
        await create(store, admin, [CLICK, OPEN, "ctct.email.send"])
    assert admin.asked == [[CLICK, OPEN, "ctct.email.send"], [CLICK, OPEN]]
    assert admin._client.refreshed == 1
    assert [x["event"] for x in logs] == ["kafka.create_topics_retry", "kafka.topics_created"]


async def test_retriable_refusals_that_persist_fail_in_bounded_time_naming_topic_and_code(
    store: Store,
) -> None:
    """A topic the controller keeps answering RequestTimedOut for is asked a few times within
    twice request_timeout_s, then start-up fails naming it and the code (it failed at once)."""
    admin = FakeAdmin(existing=[CLICK], codes={OPEN: [RequestTimedOutError.errno] * 100})
    started = time.monotonic()
    with pytest.raises(KafkaSinkError) as failed:
        await create(store, admin, [CLICK, OPEN], request_timeout_s=0.5)
    assert time.monotonic() - started < 1.0
    assert 2 <= len(admin.asked) <= 5
    assert all(asked == [OPEN] for asked in admin.asked)
    message = str(failed.value)
    assert f"{OPEN}: RequestTimedOutError (from the fake)" in message
    assert f"asked {len(admin.asked)} times" in message


async def test_retries_end_before_the_start_ups_deadline(store: Store) -> None:
    """Given the time start-up gives up at, no retry starts too late to be answered before it:
    the failure names the topic, not a start-up that took too long."""
    admin = FakeAdmin(existing=[], codes={OPEN: [RequestTimedOutError.errno] * 100})
    until = asyncio.get_running_loop().time() + 0.4
    with pytest.raises(KafkaSinkError, match="RequestTimedOutError"):
        await create(store, admin, [OPEN], request_timeout_s=30.0, until=until)
    assert asyncio.get_running_loop().time() < until
    assert len(admin.asked) == 2  # at once, then after 0.25 s; the next wait would end past it


async def test_a_refusal_that_is_not_retriable_fails_at_once(store: Store) -> None:
    """InvalidReplicationFactor beside a retriable refusal: nothing is asked again, and both
    are named."""
    admin = FakeAdmin(
        existing=[],
        codes={OPEN: [InvalidReplicationFactorError.errno], CLICK: [NotControllerError.errno]},
    )
    with pytest.raises(KafkaSinkError) as failed:
        await create(store, admin, [CLICK, OPEN])
    assert len(admin.asked) == 1
    assert "InvalidReplicationFactorError" in str(failed.value)
    assert "NotControllerError" in str(failed.value)
