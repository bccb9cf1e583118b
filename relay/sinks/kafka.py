"""The Kafka sink: drains the outbox, in order, through one idempotent aiokafka producer.

An event counts as published only when the broker acknowledged it (``acks=all``); only then does
the sink's cursor move past it. A record the broker refuses for good (too large, invalid topic)
goes to the dead-letter list with the reason and the cursor moves on; any other failure (broker
down, leader moving, timeouts) stops the batch at the first unacknowledged event and retries from
there with backoff, so nothing is skipped. A retry may re-send events after the failed one that
did arrive: duplicates carry the same ``ce_id``.

Records follow the CloudEvents Kafka protocol binding: binary content mode by default (value =
``data``, attributes as ``ce_*`` headers), structured mode as an option. Key = contact id, so each
contact's activity stays ordered in one partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    CorruptRecordException,
    InvalidTopicError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordTooLargeError,
    TopicAlreadyExistsError,
    UnsupportedForMessageFormatError,
)
from aiokafka.helpers import create_ssl_context

from relay.events import Kind
from relay.store import OutboxEvent, Store

log = structlog.get_logger(__name__)

SINK = "kafka"
# The broker refuses these for this record, whatever we retry: dead-letter and move on.
_PERMANENT = (
    MessageSizeTooLargeError,
    RecordTooLargeError,
    InvalidTopicError,
    CorruptRecordException,
    UnsupportedForMessageFormatError,
)


class KafkaSinkError(Exception):
    """A Kafka problem the relay cannot work around (e.g. a required topic is missing)."""


@dataclass(frozen=True, slots=True)
class KafkaSecurity:
    """How to reach a secured cluster."""

    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    """The Kafka sink's configuration."""

    bootstrap_servers: str
    topic: str = "ctct.email.{kind}"  # {kind}: send, open, click, forward, bounce, unsubscribe
    content_mode: Literal["binary", "structured"] = "binary"
    compression: Literal["none", "gzip", "lz4", "zstd"] = "none"
    linger_ms: int = 20
    max_batch_bytes: int = 1_048_576
    max_request_bytes: int = 1_048_576
    request_timeout_s: float = 30.0
    client_id: str = "ctct-relay"
    create_topics: bool = False
    partitions: int = 3
    replication_factor: int = 1
    batch_events: int = 2000  # events read from the outbox per round
    idle_poll_s: float = 0.2  # outbox check interval when there is nothing to publish
    retry_backoff_s: float = 0.5
    retry_backoff_max_s: float = 30.0
    security: KafkaSecurity = field(default_factory=KafkaSecurity)

    def topic_for(self, kind: Kind) -> str:
        """The topic an event of ``kind`` goes to."""
        return self.topic.format(kind=kind.value)

    def topics(self, kinds: Sequence[Kind] = tuple(Kind)) -> list[str]:
        """Every topic the sink may write to."""
        return sorted({self.topic_for(kind) for kind in kinds})

    def client_options(self) -> dict[str, object]:
        """Connection options shared by the producer and the admin client."""
        sec = self.security
        options: dict[str, object] = {
            "bootstrap_servers": self.bootstrap_servers,
            "client_id": self.client_id,
            "request_timeout_ms": int(self.request_timeout_s * 1000),
            "security_protocol": sec.protocol,
        }
        if sec.protocol in {"SSL", "SASL_SSL"}:
            options["ssl_context"] = create_ssl_context(
                cafile=sec.ssl_cafile, certfile=sec.ssl_certfile, keyfile=sec.ssl_keyfile
            )
        if sec.protocol.startswith("SASL"):
            options["sasl_mechanism"] = sec.sasl_mechanism
            options["sasl_plain_username"] = sec.username
            options["sasl_plain_password"] = sec.password
        return options


def record_for(event: OutboxEvent, mode: str) -> tuple[bytes, list[tuple[str, bytes]]]:
    """Value and headers of an event per the CloudEvents Kafka binding."""
    attrs = event.attributes()
    if mode == "structured":
        return event.structured(), [("content-type", b"application/cloudevents+json")]
    headers = [
        (f"ce_{name}", value.encode()) for name, value in attrs.items() if name != "datacontenttype"
    ]
    headers.append(("content-type", attrs["datacontenttype"].encode()))
    return event.data, headers


class KafkaSink:
    """Publishes the outbox to Kafka until stopped; survives broker outages."""

    name = SINK

    def __init__(
        self,
        settings: KafkaSettings,
        store: Store,
        kinds: Sequence[Kind] = tuple(Kind),
        now_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self._settings = settings
        self._store = store
        self._kinds = tuple(kinds)
        self._now_ms = now_ms
        self._rng = random.Random()
        self.published = 0
        self.dead_lettered = 0
        self.last_error: str | None = None
        self.connected = False

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, publish, and on any transient failure back off and resume from the cursor."""
        attempt = 0
        while not stop.is_set():
            producer = self._producer()
            try:
                await producer.start()
                await self._check_topics()
                self.connected = True
                attempt = 0
                await self._drain(producer, stop)
            except KafkaSinkError:
                raise
            except (KafkaError, OSError) as exc:
                attempt += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                delay = self._backoff(attempt)
                log.warning("kafka.unavailable", error=self.last_error, retry_in_s=round(delay, 2))
                await _sleep_or_stop(stop, delay)
            finally:
                self.connected = False
                await _stop_quietly(producer)

    def _producer(self) -> AIOKafkaProducer:
        s = self._settings
        return AIOKafkaProducer(
            **s.client_options(),
            acks="all",
            enable_idempotence=True,
            compression_type=None if s.compression == "none" else s.compression,
            linger_ms=s.linger_ms,
            max_batch_size=s.max_batch_bytes,
            max_request_size=s.max_request_bytes,
        )

    async def _check_topics(self) -> None:
        """Create missing topics when configured to; otherwise refuse to start without them."""
        wanted = self._settings.topics(self._kinds)
        admin = AIOKafkaAdminClient(**self._settings.client_options())
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            missing = [t for t in wanted if t not in existing]
            if not missing:
                return
            if not self._settings.create_topics:
                raise KafkaSinkError(
                    f"kafka: topic(s) {', '.join(missing)} do not exist on"
                    f" {self._settings.bootstrap_servers}; create them or set"
                    " kafka.create_topics: true"
                )
            topics = [
                NewTopic(t, self._settings.partitions, self._settings.replication_factor)
                for t in missing
            ]
            with contextlib.suppress(TopicAlreadyExistsError):  # another replica was first
                await admin.create_topics(topics)
            log.info("kafka.topics_created", topics=missing)
        finally:
            await admin.close()

    async def _drain(self, producer: AIOKafkaProducer, stop: asyncio.Event) -> None:
        cursor = await self._store.sink_cursor(SINK)
        while not stop.is_set():
            events = await self._store.read_outbox(cursor, self._settings.batch_events)
            if not events:
                await _sleep_or_stop(stop, self._settings.idle_poll_s)
                continue
            cursor = await self._publish(producer, events, cursor)

    async def _publish(
        self, producer: AIOKafkaProducer, events: list[OutboxEvent], cursor: int
    ) -> int:
        """Send a batch; move the cursor over the acknowledged (or dead-lettered) prefix."""
        mode = self._settings.content_mode
        pending: list[asyncio.Future[object] | BaseException] = []
        for event in events:
            value, headers = record_for(event, mode)
            try:
                pending.append(
                    await producer.send(
                        self._settings.topic_for(event.kind),
                        value=value,
                        key=event.contact_id.encode(),
                        headers=headers,
                    )
                )
            except KafkaError as exc:  # refused before sending (size, closed producer, metadata)
                pending.append(exc)
        results = await asyncio.gather(
            *(p for p in pending if not isinstance(p, BaseException)), return_exceptions=True
        )
        outcomes = iter(results)
        done = cursor
        failure: BaseException | None = None
        for event, sent in zip(events, pending, strict=True):
            outcome = sent if isinstance(sent, BaseException) else next(outcomes)
            if isinstance(outcome, _PERMANENT):
                await self._dead_letter(event, outcome)
            elif isinstance(outcome, BaseException):
                failure = outcome
                break
            done = event.seq
        if done != cursor:
            await self._store.set_sink_cursor(SINK, done)
            self.published += sum(1 for e in events if cursor < e.seq <= done)
        if failure is not None:
            if isinstance(failure, KafkaError):
                raise failure
            raise KafkaError(str(failure)) from failure
        return done

    async def _dead_letter(self, event: OutboxEvent, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        await self._store.add_dead_letter(SINK, event.seq, event.event_id, reason, self._now_ms())
        self.dead_lettered += 1
        log.error("kafka.dead_letter", event_id=event.event_id, seq=event.seq, reason=reason)

    def _backoff(self, attempt: int) -> float:
        s = self._settings
        cap = min(s.retry_backoff_max_s, s.retry_backoff_s * 2 ** min(attempt - 1, 16))
        return self._rng.uniform(cap / 2, cap)


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


async def _stop_quietly(producer: AIOKafkaProducer) -> None:
    """Flush what can be flushed; a producer that never connected has nothing to flush."""
    try:
        await producer.stop()
    except (KafkaError, OSError) as exc:
        log.warning("kafka.stop_failed", error=str(exc))
