"""Fixtures for tests against a real Kafka broker.

`kafka_bootstrap` is one broker for the whole session: `$KAFKA_BOOTSTRAP_SERVERS` when set,
else a dev broker started here (Maven fetches Kafka into the cache on first use, about 25 s).
`dev_kafka_factory` starts private brokers for tests that kill, stop or restart one.
A broker that cannot be fetched or started fails the tests that need it; nothing is skipped.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Protocol

import pytest

from relay.devkafka import DevKafka, DevKafkaError, KafkaDist, ensure_kafka
from tests.integration.kafkakit import start_or_fail


class DevKafkaFactory(Protocol):
    """Starts a private broker that the fixture stops after the test."""

    async def __call__(
        self, *, auto_create_topics: bool = False, num_partitions: int = 1
    ) -> DevKafka: ...


@pytest.fixture(scope="session")
def kafka_dist() -> KafkaDist:
    """The Kafka jars from the cache, fetched by Maven if the cache is not complete."""
    try:
        return ensure_kafka()
    except DevKafkaError as exc:
        error = str(exc)
    pytest.fail(f"cannot fetch Kafka: {error}", pytrace=False)  # outside: no chained traceback


@pytest.fixture(scope="session")
def kafka_bootstrap(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """`host:port` of the broker every test of the session may share (and must not stop)."""
    external = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if external:
        yield external
        return
    dist: KafkaDist = request.getfixturevalue("kafka_dist")
    broker = DevKafka(dist, tmp_path_factory.mktemp("kafka"))
    # Synchronous on purpose: the broker is a child process, so a short-lived loop per step
    # avoids tying a session fixture to any test's event loop.
    start_or_fail(broker, "the session's Kafka broker")
    try:
        yield broker.bootstrap_servers
    finally:
        asyncio.run(broker.stop())


@pytest.fixture
async def dev_kafka_factory(
    kafka_dist: KafkaDist, tmp_path: Path
) -> AsyncIterator[DevKafkaFactory]:
    """Private brokers in `tmp_path`, all stopped after the test; their logs stay there."""
    brokers: list[DevKafka] = []

    async def start(*, auto_create_topics: bool = False, num_partitions: int = 1) -> DevKafka:
        broker = DevKafka(
            kafka_dist,
            tmp_path / f"kafka-{len(brokers)}",
            auto_create_topics=auto_create_topics,
            num_partitions=num_partitions,
        )
        brokers.append(broker)
        print(f"private Kafka broker log: {broker.log_path}")  # shown when the test fails
        await broker.start()
        return broker

    yield start
    for broker in brokers:
        await broker.stop()
