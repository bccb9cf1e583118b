"""The Kafka sink: drains the outbox, in order, through an idempotent aiokafka producer.

An event counts as published only when the broker acknowledged it (``acks=all``); only then does
the sink's cursor move past it. A record the broker refuses for good (too large, invalid topic)
goes to the dead-letter list with the reason and the cursor moves on, without resending anything
(a batch refused for good is sent again one record per batch on a fresh producer, whose sequence
numbers the refusal did not break; see ``KafkaSink._delivered``); any other failure (broker
down, leader moving, timeouts) stops the batch at the first unacknowledged event and retries from
there with backoff, so nothing is skipped. A retry may re-send events after the failed one that
did arrive: duplicates carry the same ``ce_id``.

The idempotent producer never gives up a batch while the broker is unreachable (aiokafka retries
it for ever): no failure comes. Acknowledgements are awaited in slices of ``request_timeout_s``,
and a slice without any reports the broker unreachable, as does an unanswered metadata request
of an idle sink (``_probe``); a stop waits for acknowledgements only so long, then abandons the
producer unflushed: what it held is sent again from the cursor at the next start.

Access problems are not outages (``access_error``): credentials the broker refuses, a broker
certificate not trusted, ACLs that keep the relay's principal from its topics or from a
producer id. aiokafka logs them and retries for ever; here they stop the relay at start-up with
their cause, and after it are reported (status, logs) and retried.

Rounds are read and sent ahead while earlier ones wait for the broker; one task settles them in
order and alone moves the cursor, and a partition's next batch waits for its previous one.
Events this process commits are handed over by the store in memory; the outbox is read whenever
they do not continue from the sink's position, and after every restart.

With several replicas the sink runs under a lease (``relay.leases.run_leased``) and is given its
validity check: nothing is handed to the producer once the lease ran out by this process's
clock (a paused holder, resumed after another replica took over), and the sink ends.

Records follow the CloudEvents Kafka protocol binding: binary content mode by default (value =
``data``, attributes as ``ce_*`` headers), structured mode as an option. Key = contact id, so each
contact's activity stays ordered in one partition.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import random
import ssl
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Literal

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.conn import create_conn
from aiokafka.errors import (
    AuthenticationFailedError,
    ClusterAuthorizationFailedError,
    CorruptRecordException,
    IllegalSaslStateError,
    InvalidTopicError,
    KafkaConnectionError,
    KafkaError,
    MessageSizeTooLargeError,
    RecordListTooLargeError,
    RecordTooLargeError,
    SaslAuthenticationFailed,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    UnsupportedForMessageFormatError,
    UnsupportedSaslMechanismError,
    for_code,
)
from aiokafka.partitioner import murmur2
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.protocol.metadata import MetadataRequest
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from relay.events import (
    DATA_CONTENT_TYPE,
    SPECVERSION,
    Kind,
    format_millis,
    source,
)
from relay.metrics import Metrics
from relay.store import OutboxAppend, OutboxEvent, Store, StoreError

log = structlog.get_logger(__name__)

SINK = "kafka"
# The broker refuses these for this record, whatever we retry: dead-letter and move on.
_PERMANENT = (
    MessageSizeTooLargeError,
    RecordListTooLargeError,  # a batch above the topic's segment.bytes
    RecordTooLargeError,
    InvalidTopicError,
    CorruptRecordException,
    UnsupportedForMessageFormatError,
)

# The topic configurations that bound a record batch, each with the error the broker refuses a
# batch above it with (a batch above segment.bytes fits no log segment), and the batch codecs of
# the Kafka protocol.
_MAX_MESSAGE_BYTES = "max.message.bytes"
_SEGMENT_BYTES = "segment.bytes"
_LIMITS: dict[str, type[KafkaError]] = {
    _MAX_MESSAGE_BYTES: MessageSizeTooLargeError,
    _SEGMENT_BYTES: RecordListTooLargeError,
}
_CODECS = {"none": 0, "gzip": 1, "lz4": 3, "zstd": 4}
# What a record batch of one record adds to the record's parts (61 bytes of batch header, the
# record's varints), with room to spare: a record this far within a topic's limit is not measured.
_BATCH_OVERHEAD = 1024

# Rounds read and handed to the producer ahead of the broker's acknowledgements: bounds memory;
# a partition's batches still go one at a time (see KafkaSink._send).
_ROUNDS_AHEAD = 4
# Events this process committed, kept to publish without reading them back: the oldest go
# first beyond this (the sink then reads those from the outbox).
_HANDED_OVER_MAX = 20_000
# At most this long (or request_timeout_s if shorter) a stop waits for the broker to acknowledge
# what was sent: then the producer is abandoned unflushed, and what it held is sent again from
# the cursor at the next start (same ce_id). An idempotent aiokafka producer never gives up a
# batch it holds, so its own stop() waits for ever while the broker is unreachable.
_STOP_SETTLE_MAX_S = 10.0
_ABANDON_S = 2.0  # then the requests in flight of an abandoned producer are cut off too
_DROP_S = 1.0  # then deliveries of the abandoned producer still waiting are cancelled
_CLOSE_S = 0.5  # the stop of a producer that holds nothing (closing its connections)
# The longest a stop of ``KafkaSink.run`` takes: its owner's grace (relay.app) must exceed it.
STOP_MAX_S = _STOP_SETTLE_MAX_S + _ABANDON_S + _DROP_S
# Topics whose creation the controller refused with a retriable code (RequestTimedOut: the
# creation may still go through; NotController: it moved) are asked for again after these
# waits, while start-up's time allows (twice request_timeout_s, with producer and admin start)
_CREATE_RETRY_WAITS_S = (0.25, 0.5, 1.0, 2.0)
_CREATE_MARGIN_S = 0.05  # the retries end this long before start-up's deadline: theirs is named


class KafkaSinkError(Exception):
    """A Kafka problem the relay cannot work around (e.g. a required topic is missing)."""


class KafkaSecurityError(KafkaSinkError):
    """A TLS file or passphrase the client cannot use; ``key`` is the setting under
    ``kafka.security`` to fix."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"kafka.security.{key}: {problem}")
        self.key = key
        self.problem = problem


class KafkaTopicsError(Exception):
    """A topic of the sink's that is gone, or cannot be created, found after start-up (a
    :class:`KafkaSinkError` at start-up): reported and retried, as someone may fix it while the
    relay runs; the message is the start-up one."""


class KafkaUnreachableError(ConnectionError):
    """Start-up got no answer in time; the message says from where. Retried with backoff."""


class KafkaAccessError(Exception):
    """The broker refused who the relay is (SASL authentication, an ACL), or the relay refused
    the broker's TLS certificate; the message names the cause and the principal, never a
    password. At start-up it stops the relay (retrying would only hide it); later it is
    reported and retried, as someone may fix the broker's side while the relay runs."""


# What a broker answers a SASL handshake or authentication it refuses (the credentials, the
# mechanism); aiokafka only logs them, then reports that it could not bootstrap.
_SASL_REFUSALS = (
    AuthenticationFailedError,
    SaslAuthenticationFailed,
    IllegalSaslStateError,
    UnsupportedSaslMechanismError,
)


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
    ssl_password: str | None = field(default=None, repr=False)  # of an encrypted ssl_keyfile
    # built once at start-up (config load) from the files above; None: built when needed
    context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)

    @property
    def uses_ssl(self) -> bool:
        """Whether the protocol is TLS (SSL or SASL_SSL)."""
        return self.protocol in {"SSL", "SASL_SSL"}

    def ssl_context(self) -> ssl.SSLContext:
        """The TLS context of the files above, as aiokafka's ``create_ssl_context`` builds it
        (hostname checked, broker certificate verified), but never prompting for a key's
        passphrase: a prompt on a terminal would block the event loop, and without one OpenSSL
        fails for ever. Raises :class:`KafkaSecurityError` naming the setting to fix."""
        try:
            context = ssl.create_default_context(cafile=self.ssl_cafile)
        except ssl.SSLError as exc:
            raise KafkaSecurityError(
                "ssl_cafile", f"no CA certificate OpenSSL can load in {self.ssl_cafile} ({exc})"
            ) from None
        except OSError as exc:
            raise KafkaSecurityError(
                "ssl_cafile", f"cannot read {self.ssl_cafile}: {exc.strerror or exc}"
            ) from None
        if self.ssl_certfile is not None:
            self._load_client_certificate(context, self.ssl_certfile, self.ssl_keyfile)
        return context

    def _load_client_certificate(
        self, context: ssl.SSLContext, certfile: str, keyfile: str | None
    ) -> None:
        cert = _read("ssl_certfile", certfile)
        if b"-----BEGIN CERTIFICATE-----" not in cert:
            raise KafkaSecurityError("ssl_certfile", f"no PEM certificate in {certfile}")
        key = cert if keyfile is None else _read("ssl_keyfile", keyfile)
        encrypted = b"ENCRYPTED" in key
        if encrypted and not self.ssl_password:
            raise KafkaSecurityError(
                "ssl_keyfile", f"{keyfile} is encrypted: give its passphrase in ssl_password"
            )
        password = self.ssl_password or ""
        try:  # the callback answers any passphrase request: OpenSSL never prompts
            context.load_cert_chain(certfile, keyfile, password=lambda: password)
        except ssl.SSLError as exc:
            if exc.reason == "KEY_VALUES_MISMATCH":
                raise KafkaSecurityError(
                    "ssl_keyfile", f"{keyfile} is not the key of the certificate in {certfile}"
                ) from None
            if encrypted:
                raise KafkaSecurityError(
                    "ssl_password", f"does not decrypt {keyfile} (or the key is damaged)"
                ) from None
            raise KafkaSecurityError(
                "ssl_keyfile", f"no PEM private key OpenSSL can load in {keyfile} ({exc})"
            ) from None


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
        if sec.uses_ssl:
            options["ssl_context"] = sec.context or sec.ssl_context()
        if sec.protocol.startswith("SASL"):
            options["sasl_mechanism"] = sec.sasl_mechanism
            options["sasl_plain_username"] = sec.username
            options["sasl_plain_password"] = sec.password
        return options


async def _ask_create(
    admin: AIOKafkaAdminClient, topics: list[str], partitions: int, replication_factor: int
) -> tuple[dict[str, str], set[str]]:
    """One CreateTopics request: the topics refused (with the error and the broker's message)
    and those of them refused with a retriable code. TopicAlreadyExists is no refusal: another
    replica, or an earlier ask the controller timed out on, created it."""
    new = [NewTopic(t, partitions, replication_factor) for t in topics]
    # the answer carries an error code per topic (the call itself does not raise)
    answer = await admin.create_topics(new)
    refused: dict[str, str] = {}
    retriable: set[str] = set()
    for topic, code, *message in answer.topic_errors:  # message: from version 1 on
        if code in (0, TopicAlreadyExistsError.errno):
            continue
        error = for_code(code)
        detail = f" ({message[0]})" if message and message[0] else ""
        refused[topic] = f"{topic}: {error.__name__}{detail}"
        if error.retriable:
            retriable.add(topic)
    return refused, retriable


def _read(key: str, path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise KafkaSecurityError(key, f"cannot read {path}: {exc.strerror or exc}") from None


def principal(security: KafkaSecurity) -> str:
    """Who the broker takes the relay for, as Kafka's default principal builder names it (a
    broker's own builder or ``ssl.principal.mapping.rules`` may name it otherwise)."""
    if security.protocol.startswith("SASL"):
        return f"User:{security.username}"
    if security.uses_ssl and security.ssl_certfile is not None:
        return f"the principal of the certificate in {security.ssl_certfile}"
    return "User:ANONYMOUS"


def access_error(
    exc: BaseException, settings: KafkaSettings, where: str | None = None
) -> KafkaAccessError | None:
    """``exc`` as the access problem it is, in words a user can act on, or None when it is
    none: the broker refused the credentials (SASL), an ACL does not let the relay's principal
    at a topic or the cluster, or the broker's TLS certificate is not trusted. ``where``: the
    broker the connection went to, when known. No password is ever part of the message.
    Causes count too: aiokafka wraps what crashed its sender ("Unexpected error during batch
    delivery")."""
    cause: BaseException | None = exc
    while cause is not None:
        found = _access(cause, settings, where)
        if found is not None:
            return found
        cause = cause.__cause__
    return None


def _access(
    exc: BaseException, settings: KafkaSettings, where: str | None
) -> KafkaAccessError | None:
    if isinstance(exc, KafkaAccessError):
        return exc
    security = settings.security
    at = where or settings.bootstrap_servers
    who = principal(security)
    if isinstance(exc, TopicAuthorizationFailedError):
        return _unauthorized_topics(_topics_of(exc), settings, at)
    if isinstance(exc, ClusterAuthorizationFailedError):
        return KafkaAccessError(
            f"kafka: {who} is not authorized on the cluster of {at} (ClusterAuthorizationFailed):"
            " the idempotent producer needs IdempotentWrite on the cluster or Write on a topic"
        )
    if isinstance(exc, _SASL_REFUSALS):
        said = exc.args[0] if exc.args and isinstance(exc.args[0], str) else ""
        said = said or getattr(exc, "description", "") or type(exc).__name__
        if security.password:  # no broker repeats it, but a message is no place for it
            said = said.replace(security.password, "***")
        return KafkaAccessError(
            f"kafka: {at} refused to authenticate {who} (SASL {security.sasl_mechanism},"
            f" {type(exc).__name__}): {said}; check kafka.security.username and password"
        )
    if isinstance(exc, ssl.SSLCertVerificationError):
        trusted = (
            f"the CA certificates in {security.ssl_cafile}"
            if security.ssl_cafile
            else "the system's CA certificates"
        )
        return KafkaAccessError(
            f"kafka: TLS: the certificate of {at} is not trusted: {exc.verify_message}"
            f" (checked against {trusted}: kafka.security.ssl_cafile)"
        )
    return None


def _unauthorized_topics(topics: str, settings: KafkaSettings, at: str) -> KafkaAccessError:
    return KafkaAccessError(
        f"kafka: {principal(settings.security)} is not authorized for topic(s) {topics} on {at}"
        " (TopicAuthorizationFailed): the broker's ACLs must allow it Describe and Write on"
        " them (the broker says so of a topic that does not exist too, when the principal may"
        " not describe it)"
    )


def _topics_of(exc: TopicAuthorizationFailedError) -> str:
    """The topic(s) aiokafka put in the error: one name, or a set of them."""
    named = exc.args[0] if exc.args else None
    if isinstance(named, str):
        return named
    if isinstance(named, set | frozenset | list | tuple):
        return ", ".join(sorted(str(t) for t in named))
    return "(not named by the broker)"


_SPECVERSION = ("ce_specversion", SPECVERSION.encode())
_DATA_CONTENT_TYPE = ("content-type", DATA_CONTENT_TYPE.encode())
_STRUCTURED_CONTENT_TYPE = [("content-type", b"application/cloudevents+json")]
_TYPES = {kind: ("ce_type", kind.event_type.encode()) for kind in Kind}
# what every binary record's headers weigh whatever the event: names and constant values
_BINARY_SIZE = {
    kind: sum(len(n) for n in ("ce_id", "ce_source", "ce_subject", "ce_time"))
    + sum(len(n) + len(v) for n, v in (_SPECVERSION, _TYPES[kind], _DATA_CONTENT_TYPE))
    for kind in Kind
}
_STRUCTURED_SIZE = sum(len(n) + len(v) for n, v in _STRUCTURED_CONTENT_TYPE)


def record_for(event: OutboxEvent, mode: str) -> tuple[bytes, list[tuple[str, bytes]]]:
    """Value and headers of an event per the CloudEvents Kafka binding."""
    value, headers, _ = _record(event, mode, event.contact_id.encode(), {})
    return value, headers


def _record(
    event: OutboxEvent, mode: str, key: bytes, sources: dict[tuple[str, str], bytes]
) -> tuple[bytes, list[tuple[str, bytes]], int]:
    """Value, headers and size (key, value, header names and values) of an event's record;
    ``sources`` remembers encoded ``ce_source`` values (a round has a few campaigns).

    Binary mode writes the attributes straight to headers, constants pre-encoded: building the
    attribute dict first and encoding it cost ~20 us per event (profiled). The size is summed
    from the parts: a generator over the headers was a fifth of the sink's batching.
    """
    if mode == "structured":
        value = event.structured()
        return value, list(_STRUCTURED_CONTENT_TYPE), len(key) + len(value) + _STRUCTURED_SIZE
    where = (event.account, event.campaign_id)
    origin = sources.get(where)
    if origin is None:
        origin = sources[where] = source(*where).encode()
    ce_id = event.event_id.encode()
    ce_time = format_millis(event.occurred_ms).encode()
    headers = [
        _SPECVERSION,
        ("ce_id", ce_id),
        ("ce_source", origin),
        _TYPES[event.kind],
        ("ce_subject", key),
        ("ce_time", ce_time),
        _DATA_CONTENT_TYPE,
    ]
    value = event.data
    size = _BINARY_SIZE[event.kind] + 2 * len(key) + len(value) + len(ce_id) + len(origin)
    return value, headers, size + len(ce_time)


class _Partitioner:
    """The default partitioner's choice (murmur2 of the key, as Java and aiokafka compute it),
    remembered per key: the pure-Python hash was the largest cost of ``producer.send``."""

    def __init__(self, capacity: int = 100_000) -> None:  # ~15 MB of keys at most
        self._hashes: dict[bytes, int] = {}
        self._capacity = capacity

    def __call__(self, key: bytes, partitions: Sequence[int]) -> int:
        hashed = self._hashes.get(key)
        if hashed is None:
            if len(self._hashes) >= self._capacity:
                self._hashes.clear()  # contacts come and go: a bound, not an LRU
            hashed = self._hashes[key] = murmur2(key) & 0x7FFFFFFF
        return partitions[hashed % len(partitions)]


@dataclass(slots=True)
class _Batch:
    """Events bound for one partition, as one record batch."""

    topic: str
    partition: int
    builder: BatchBuilder
    events: list[OutboxEvent] = field(default_factory=list)


# a batch's delivery: its events the broker refused for good, by seq (see KafkaSink._delivered)
_Delivery = asyncio.Task[dict[int, BaseException]]


@dataclass(slots=True)
class _Round:
    """One outbox read, handed to the producer, waiting for the broker."""

    events: list[OutboxEvent]
    sent: list[tuple[_Batch, _Delivery | BaseException]]
    refused: dict[int, tuple[BaseException, int]]  # seq -> (error, batch size): never sent
    started: float  # time.perf_counter() when the round was read


def _always() -> bool:
    """The lease check of a sink that runs alone (SQLite, tests, benchmarks)."""
    return True


class KafkaSink:
    """Publishes the outbox to Kafka until stopped; survives broker outages."""

    name = SINK

    def __init__(
        self,
        settings: KafkaSettings,
        store: Store,
        now_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        metrics: Metrics | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._metrics = metrics or Metrics(now_ms)
        self._now_ms = now_ms
        self._rng = random.Random()
        self.published = 0
        self.dead_lettered = 0
        self.last_error: str | None = None  # the last failure; cleared by an acknowledgement
        self.connected = False
        # connected to a producer (set after start-up, cleared when it is given up); the broker
        # is reported reachable only while neither of the two below says otherwise
        self._online = False
        self._stalled = False  # batches waited request_timeout_s with no acknowledgement
        self._probe_failed = False  # the last metadata request (see _probe) got no answer
        self._last_answer = time.monotonic()  # of the broker: an acknowledgement or a refusal
        self._unsettled = False  # a stop gave up waiting for acknowledgements: do not flush
        self._deliveries: set[_Delivery] = set()  # batches awaiting the broker
        self.publishing = False  # run() is active here (this replica holds the sink's lease)
        self._started_once = False  # a producer started and found the topics in this process
        self._topics = {kind: settings.topic_for(kind) for kind in Kind}
        self._partition = _Partitioner()
        # the producer batches go to now; another one after a batch refused for good
        self._current: AIOKafkaProducer | None = None
        self._switching = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()  # replaced producers being stopped
        self._batch_bytes: dict[str, int] = {}  # topics whose batch limit < max_batch_bytes
        # every topic's limit of a record batch and the configuration that sets it, when read
        self._topic_limits: dict[str, tuple[int, str]] = {}
        self._committed = asyncio.Event()
        self._settled = asyncio.Event()  # the acknowledging task finished a round
        # per partition: the last batch handed to the producer (or why none was)
        self._chain: dict[tuple[str, int], _Delivery | BaseException] = {}
        self._handed: list[OutboxAppend] = []  # in seq order; see _from_memory
        self._handed_events = 0
        self._valid: Callable[[], bool] = _always
        store.on_append(self._appended)

    async def run(self, stop: asyncio.Event, valid: Callable[[], bool] = _always) -> None:
        """Connect, publish, and on any transient failure back off and resume from the cursor.

        ``valid``: whether the sink's lease still holds, asked right before each send; once it
        says no the sink sends nothing more, settles what it sent, and returns."""
        self.publishing = True
        self._valid = valid
        try:
            await self._run(stop)
            if not stop.is_set() and not valid():
                log.warning("kafka.lease_ran_out", action="stopped publishing")
        finally:
            self.publishing = False

    def health(self) -> tuple[bool | None, str | None]:
        """Whether the producer is connected (None when this process is not publishing) and
        the last failure, unredacted, for ``/v1/status``."""
        return (self.connected if self.publishing else None), self.last_error

    async def _run(self, stop: asyncio.Event) -> None:
        attempt = 0
        while not stop.is_set() and self._valid():
            connected_at: float | None = None
            try:
                producer = self._producer()  # builds the TLS context when config did not
            except ValueError as exc:  # an option aiokafka refuses: retrying will not help
                raise KafkaSinkError(f"kafka: {exc}") from None
            self._current = producer
            self._unsettled = False
            try:
                # a broker that accepts connections but does not answer holds these for
                # request_timeout_s: a stop (SIGTERM) must not wait for that
                if not await _unless_stopped(stop, self._connect(producer)):
                    break
                self._online, self._stalled, self._probe_failed = True, False, False
                self._started_once = True
                self._report()
                connected_at = time.monotonic()
                await self._drain(stop)
            except (KafkaSinkError, StoreError):
                raise  # the store's own failures are retried by the caller (run_leased)
            except (KafkaError, OSError, KafkaAccessError, KafkaTopicsError) as exc:
                if stop.is_set() or not self._valid():
                    # stopped, or the lease ran out (maybe what failed: rounds not sent because
                    # of it): not a broker problem; a real one shows at the next start
                    break
                access = access_error(exc, self._settings)
                if access is not None and not self._started_once:
                    # credentials, a certificate or ACLs wrong from the start: stop the relay
                    # with the cause, where retrying hid it in aiokafka's log for ever
                    raise KafkaSinkError(str(access)) from None
                if self._worked_since(connected_at):
                    attempt = 0  # a new trouble: retry soon
                attempt += 1  # a connection the broker refuses right away counts as a failure
                self.last_error = _described(access or exc)
                delay = self._backoff(attempt)
                event = "kafka.access_refused" if access else "kafka.unavailable"
                log.warning(event, error=self.last_error, retry_in_s=round(delay, 2))
                await _sleep_or_stop(stop, delay)
            except Exception as exc:
                # a bug or an option aiokafka refuses only once it uses it (a value Kafka cannot
                # encode): the same again after a backoff, for ever; stop the relay with its text
                raise KafkaSinkError(f"kafka: {type(exc).__name__}: {exc}") from exc
            finally:
                self._online = False
                self._report()
                # None: a delivery of a round given up must not start a producer of its own
                current, self._current = self._current, None
                if current is not None:
                    await _stop_quietly(current, 0.0 if self._unsettled else self._settle_s())
                await asyncio.gather(*self._retiring)
                await self._drop_deliveries()

    def _worked_since(self, connected_at: float | None) -> bool:
        """Whether the producer connected at ``connected_at`` (None: it did not) worked: the
        broker answered a batch since, or it lasted longer than the longest backoff. A broker
        that takes every connection and refuses every batch (an ACL, a topic setting) must
        not get a new producer, producer id and topic check every half second."""
        if connected_at is None:
            return False
        lasted_s = time.monotonic() - connected_at
        return self._last_answer > connected_at or lasted_s > self._settings.retry_backoff_max_s

    def _settle_s(self) -> float:
        """How long a stop waits for acknowledgements of what was sent."""
        return min(self._settings.request_timeout_s, _STOP_SETTLE_MAX_S)

    async def _drop_deliveries(self) -> None:
        """Forget batches of a producer that is gone: the broker will never answer them here;
        they are sent again from the cursor."""
        pending = {d for d in self._deliveries if not d.done()}
        if pending:  # an abandoned producer failed their batches: let them see it
            _, pending = await asyncio.wait(pending, timeout=_DROP_S)
        for delivery in pending:
            delivery.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        self._deliveries.clear()

    async def _connect(self, producer: AIOKafkaProducer) -> None:
        """Start the producer and check the topics, within ``2 * request_timeout_s``: a broker
        whose advertised listener cannot be reached answers the bootstrap's metadata request,
        then aiokafka waits for a producer id from that listener for ever."""
        limit_s = 2 * self._settings.request_timeout_s
        deadline = asyncio.timeout(limit_s)
        try:
            async with deadline:
                started = time.monotonic()
                try:
                    await producer.start()
                except KafkaConnectionError:
                    # "Unable to bootstrap": aiokafka logged why and dropped it. A quick failure
                    # is a refusal, not silence: ask once more, to report the cause
                    if time.monotonic() - started < self._settings.request_timeout_s:
                        refused = await self._refused(producer)
                        if refused is not None:
                            raise refused from None
                    raise
                try:
                    await self._check_topics(deadline.when())
                except KafkaSinkError as exc:
                    if not self._started_once:
                        raise  # the configuration or the cluster is wrong: stop the relay
                    # they were there before (a topic deleted since, an ACL changed): report
                    # and retry, as access problems; the poller and webhooks go on meanwhile
                    raise KafkaTopicsError(str(exc)) from None
        except TimeoutError:
            if not deadline.expired():
                raise
            raise KafkaUnreachableError(await self._silent(producer, limit_s)) from None

    async def _refused(self, producer: AIOKafkaProducer) -> KafkaAccessError | None:
        """The access problem of the first bootstrap address that refuses a connection made as
        aiokafka makes them (TLS, SASL), if any does for such a reason."""
        options = self._settings.client_options()
        del options["bootstrap_servers"]
        for host, port, _family in producer.client.hosts:
            where = _address(host, port)
            try:
                async with asyncio.timeout(self._settings.request_timeout_s):
                    connection = await create_conn(host, port, **options)
            except (KafkaError, OSError) as exc:  # TLS errors are OSErrors, so is a timeout
                refused = access_error(exc, self._settings, where)
                if refused is not None:
                    return refused
            else:
                connection.close()
        return None

    async def _why_silent(self, silence: str) -> str:
        """``silence``, or the access problem behind it: a reconnection the broker refuses (a
        password changed on the broker, a certificate from another CA) aiokafka only logs, and
        it retries for ever. Asked once per outage, within ``request_timeout_s``."""
        producer = self._current
        if producer is None:
            return silence
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._settings.request_timeout_s):
                refused = await self._refused(producer)
                if refused is not None:
                    return str(refused)
        return silence

    async def _silent(self, producer: AIOKafkaProducer, waited_s: float) -> str:
        """Why start-up got no answer in ``waited_s``: the brokers the bootstrap named that do
        not accept connections (their advertised listeners), when it named any."""
        bootstrap = self._settings.bootstrap_servers
        brokers = sorted(producer.client.cluster.brokers(), key=lambda b: b.nodeId)
        silent = [b for b in brokers if not await _accepts(b.host, b.port)]
        if not brokers:
            return f"kafka: no answer from bootstrap {bootstrap} in {waited_s:g} s"
        if not silent:
            return f"kafka: reached bootstrap {bootstrap}, but start-up took over {waited_s:g} s"
        named = ", ".join(f"broker {b.nodeId} at {_address(b.host, b.port)}" for b in silent)
        return (
            f"kafka: reached bootstrap {bootstrap}, but {named} (its advertised listener) does"
            " not answer; check the broker's advertised.listeners"
        )

    def _report(self) -> None:
        """Publish whether the broker is reachable (status, the gauge)."""
        connected = self._online and not (self._stalled or self._probe_failed)
        if connected != self.connected:
            self.connected = connected
            self._metrics.kafka_connected(connected)

    def _unreachable(self, error: str) -> None:
        """The broker did not answer in time: say so (logged once per outage), keep waiting."""
        if self.connected:
            log.warning("kafka.unavailable", error=error, action="waiting for the broker")
        self.last_error = error
        self._report()

    def _answered(self) -> None:
        """The broker acknowledged (or refused for good) a batch: it is reachable."""
        self._last_answer = time.monotonic()
        if self._stalled or self._probe_failed:
            self._stalled = self._probe_failed = False
            self.last_error = None
            if self._online:
                log.info("kafka.available")
            self._report()

    async def _probe(self) -> None:
        """Ask for metadata every ``request_timeout_s``: with nothing to publish, no
        acknowledgement would tell that the broker went away (or came back)."""
        every_s = self._settings.request_timeout_s
        while True:
            await asyncio.sleep(every_s)
            producer = self._current  # a refusal for good may have replaced it
            if producer is None:
                return
            try:
                async with asyncio.timeout(every_s):
                    answered = bool(await producer.client.force_metadata_update())
            except TimeoutError:
                answered = False
            if answered and self._probe_failed:
                self._probe_failed = False
                if not self._stalled:
                    self.last_error = None
                    log.info("kafka.available")
                self._report()
            elif not answered and not self._probe_failed:
                self._probe_failed = True
                if not self._stalled:  # the stall's error says more
                    self._unreachable(
                        await self._why_silent(
                            f"kafka: no broker of {self._settings.bootstrap_servers} answers"
                            f" a metadata request (asked every {every_s:g} s)"
                        )
                    )

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

    async def _check_topics(self, until: float | None = None) -> None:
        """Create missing topics when configured to; otherwise refuse to start without them.

        The topics of every kind, whatever ``poll.kinds`` says now: the outbox may hold events
        of any kind (kinds followed before, a replay), and one event without its topic would
        hold the cursor, and every event after it, for good. ``until``: the event loop's time
        start-up gives up at, if bounded.
        """
        wanted = self._settings.topics()
        admin = AIOKafkaAdminClient(**self._settings.client_options())
        try:
            await admin.start()  # in the try: a start cancelled by a stop closes it too
            await self._create_missing(admin, wanted, until)
            await self._read_batch_limits(admin, wanted)
        finally:
            await admin.close()

    async def _create_missing(
        self, admin: AIOKafkaAdminClient, wanted: list[str], until: float | None = None
    ) -> None:
        """Create the ``wanted`` topics that do not exist (when configured to); a refusal
        stops start-up naming each topic and its code, once retriable ones were asked for
        again until ``until`` (the loop's time; default: twice ``request_timeout_s`` on)."""
        existing = set(await admin.list_topics())
        missing = [t for t in wanted if t not in existing]
        if missing:
            await self._check_authorized(missing)
            if not self._settings.create_topics:
                raise KafkaSinkError(
                    f"kafka: topic(s) {', '.join(missing)} do not exist on"
                    f" {self._settings.bootstrap_servers}; create them or set"
                    " kafka.create_topics: true"
                )
            if until is None:
                until = asyncio.get_running_loop().time() + 2 * self._settings.request_timeout_s
            refused, asked = await self._create(admin, missing, until - _CREATE_MARGIN_S)
            if refused:
                tries = f" (asked {asked} times)" if asked > 1 else ""
                raise KafkaSinkError(
                    f"kafka: cannot create topic(s) on {self._settings.bootstrap_servers}: "
                    + "; ".join(refused.values())
                    + tries
                )
            log.info("kafka.topics_created", topics=missing)

    async def _create(
        self, admin: AIOKafkaAdminClient, topics: list[str], stop_at: float
    ) -> tuple[dict[str, str], int]:
        """Ask for ``topics``; returns the refusals (topic: what to show) and the asks made.
        While every refusal is retriable, those topics are asked for again after a short wait
        when the answer can come before ``stop_at`` (the loop's time); a retry cut off by it
        leaves the refusals of the ask before."""
        loop = asyncio.get_running_loop()
        s = self._settings
        refused, retriable = await _ask_create(admin, topics, s.partitions, s.replication_factor)
        asked = 1
        for wait_s in _CREATE_RETRY_WAITS_S:
            if not refused or retriable != set(refused) or loop.time() + wait_s >= stop_at:
                break
            log.warning("kafka.create_topics_retry", refused=list(refused.values()), wait_s=wait_s)
            await asyncio.sleep(wait_s)
            retry = [t for t in topics if t in refused]
            deadline = asyncio.timeout_at(stop_at)
            try:
                async with deadline:
                    # aiokafka looks the controller up again only when a whole request is
                    # refused with NotController, not when a topic's answer says so
                    await admin._client.force_metadata_update()
                    answer = await _ask_create(admin, retry, s.partitions, s.replication_factor)
            except TimeoutError:
                if not deadline.expired():
                    raise
                break
            asked += 1
            refused, retriable = answer
        return refused, asked

    async def _check_authorized(self, topics: list[str]) -> None:
        """Raise the access error of the ``topics`` the relay's principal may not describe: a
        metadata request for every topic leaves them out, just as if they did not exist (they
        were reported missing). Asked without auto-creation: asking creates nothing."""
        client = self._producer_now().client
        node = client.get_random_node()
        if node is None:
            return  # no broker known yet: the listing above came from the bootstrap alone
        answer = await client.send(node, MetadataRequest(topics, allow_auto_topic_creation=False))
        refused = {
            str(topic)
            for code, topic, *_ in answer.topics
            if code == TopicAuthorizationFailedError.errno
        }
        if refused:
            names = ", ".join(sorted(refused))
            raise _unauthorized_topics(names, self._settings, self._settings.bootstrap_servers)

    async def _read_batch_limits(self, admin: AIOKafkaAdminClient, topics: list[str]) -> None:
        """Keep each topic's record batches within its ``max.message.bytes`` and its
        ``segment.bytes``.

        The broker applies both limits to a whole record batch (a batch must fit one log
        segment), so batches of ``max_batch_bytes`` above either would all be refused and sent
        again one record at a time. A lower limit caps that topic's batches rather than stopping
        the relay: only a record too large on its own is then refused (dead-lettered), and
        mirroring every topic's limits into the relay's configuration would be the user's chore
        for no gain. Without the right to read topic configurations (DescribeConfigs), batches
        keep ``max_batch_bytes``: a refusal still costs only a resend of that batch's records
        one by one.
        """
        wanted = [
            ConfigResource(ConfigResourceType.TOPIC, topic, dict.fromkeys(_LIMITS))
            for topic in topics
        ]
        limits: dict[str, int] = {}
        topic_limits: dict[str, tuple[int, str]] = {}
        try:
            answers = await admin.describe_configs(wanted)
        except KafkaError as exc:
            log.warning("kafka.topic_limit_unknown", error=f"{type(exc).__name__}: {exc}")
            answers = []
        for answer in answers:
            for code, _message, _type, topic, entries in (r[:5] for r in answer.resources):
                values = {e[0]: str(e[1]) for e in entries if e[0] in _LIMITS}
                known = {n: int(v) for n, v in values.items() if v.isdigit()}
                if code != 0 or not known:
                    error = for_code(code).__name__ if code else f"no {_MAX_MESSAGE_BYTES}"
                    log.warning("kafka.topic_limit_unknown", topic=topic, error=error)
                    continue
                name = min(known, key=lambda n: known[n])  # the one that binds
                limit = known[name]
                topic_limits[topic] = (limit, name)
                if limit < self._settings.max_batch_bytes:
                    limits[topic] = limit
                    log.info(
                        "kafka.batches_capped",
                        topic=topic,
                        max_batch_bytes=self._settings.max_batch_bytes,
                        **{name.replace(".", "_"): limit},
                    )
        self._batch_bytes = limits
        self._topic_limits = topic_limits

    def _new_batch(self, producer: AIOKafkaProducer, topic: str) -> BatchBuilder:
        """An empty record batch for ``topic``, within the topic's limit."""
        limit = self._batch_bytes.get(topic)
        if limit is None:
            return producer.create_batch()
        return BatchBuilder(limit, _CODECS[self._settings.compression])

    async def _drain(self, stop: asyncio.Event) -> None:
        cursor = await self._store.sink_cursor(SINK)
        while not stop.is_set() and self._valid():
            cursor = await self._pipeline(stop, cursor)

    async def _pipeline(self, stop: asyncio.Event, cursor: int) -> int:
        """Read and send the next rounds while earlier ones wait for the broker; returns the
        cursor when ``stop`` is set.

        Reading, building and the cursor write overlap the broker's round trip: one round at a
        time left the sink idle for each acknowledgement, the broker idle for each read
        (profiled). The acknowledging task takes rounds in order and alone moves the cursor.
        """
        self._chain.clear()
        rounds: asyncio.Queue[_Round | None] = asyncio.Queue()
        acker = asyncio.create_task(self._acknowledge(rounds, cursor), name="kafka:acks")
        probe = asyncio.create_task(self._probe(), name="kafka:probe")
        try:
            read_from = cursor
            look = True  # whether the outbox may hold rows nobody handed over
            while not stop.is_set() and not acker.done() and self._valid():
                self._committed.clear()  # before the read: a commit after it sets it again
                limit = self._settings.batch_events
                events = self._from_memory(read_from, limit)
                look = look and not events  # handed over: nothing else was added before it
                if look or (not events and self._handed):  # or a gap before what was handed
                    events = await self._store.read_outbox(read_from, limit)
                    look = bool(events)  # there may be more
                if not events:
                    await self._idle(stop, acker)
                    look = True  # woken by another writer, or the idle poll
                    continue
                while rounds.qsize() >= _ROUNDS_AHEAD and not acker.done() and not stop.is_set():
                    self._settled.clear()  # a wake-up lost here comes with the next round
                    await _first(acker, self._settled.wait(), stop.wait())
                if acker.done() or stop.is_set():
                    break
                rounds.put_nowait(await self._send(events, stop))
                read_from = events[-1].seq
            rounds.put_nowait(None)  # stop, or lease lost: what was sent is still settled...
            if acker.done():
                return acker.result()
            # ... for a while: an unreachable broker would hold a stop for ever
            await asyncio.wait({acker}, timeout=self._settle_s())
            if not acker.done():
                self._unsettled = True  # the producer is abandoned, not flushed (see _run)
                log.warning(
                    "kafka.stop_unsettled",
                    waited_s=self._settle_s(),
                    action="unacknowledged events are sent again from the cursor at the next start",
                )
                return cursor  # the acknowledging task moved the stored cursor as far as it got
            return acker.result()
        finally:
            for task in (acker, probe):
                if not task.done():
                    task.cancel()
            await asyncio.gather(acker, probe, return_exceptions=True)

    async def _acknowledge(self, rounds: asyncio.Queue[_Round | None], cursor: int) -> int:
        """Settle rounds in order; returns the cursor at the end."""
        while (sent := await rounds.get()) is not None:
            cursor = await self._settle(sent, cursor)
            self._settled.set()
            self._metrics.kafka_round_settled(sent.started)
        return cursor

    def _appended(self, append: OutboxAppend) -> None:
        """The store announced a commit of this process: keep it for ``_from_memory``."""
        bisect.insort(self._handed, append, key=lambda a: a.after_seq)
        self._handed_events += len(append.events)
        while self._handed_events > _HANDED_OVER_MAX:
            self._handed_events -= len(self._handed.pop(0).events)

    def _from_memory(self, after_seq: int, limit: int) -> list[OutboxEvent]:
        """The outbox after ``after_seq`` as handed over by the store, when it holds the very
        next rows: encoding, committing and reading back ~2000 events cost the store's thread
        ~6 ms (profiled), and that thread also commits the poller's pages. Empty when there is
        a gap (a replay, another process, events dropped above): then the outbox is read."""
        handed = self._handed
        while handed and handed[0].events[-1].seq <= after_seq:  # published, or read back
            self._handed_events -= len(handed.pop(0).events)
        events: list[OutboxEvent] = []
        for append in handed:
            if not append.after_seq <= after_seq < append.events[-1].seq:
                break  # rows between after_seq and this append are not in memory
            start = bisect.bisect_right(append.events, after_seq, key=lambda e: e.seq)
            events += append.events[start : start + limit - len(events)]
            after_seq = events[-1].seq
            if len(events) >= limit:
                break
        return events

    def notify(self) -> None:
        """New events were committed: look at the outbox now instead of at the next idle poll.

        In-process wake-up (the poller calls it); other writers are found by the idle poll.
        """
        self._committed.set()

    async def _idle(self, stop: asyncio.Event, acker: asyncio.Task[int]) -> None:
        """Wait for a commit notification, ``stop`` or the end of the acknowledging task, at
        most ``idle_poll_s``."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._settings.idle_poll_s):
                await _first(acker, stop.wait(), self._committed.wait())

    async def _send(self, events: list[OutboxEvent], stop: asyncio.Event) -> _Round:
        """Hand a round to the producer as one closed record batch per partition.

        Per-record ``send`` futures, murmur2 hashing and lingering cost more than the records
        themselves (profiled). A partition's batch goes only after its previous one was
        acknowledged: after a failure nothing later may overtake what is sent again.
        """
        started = time.perf_counter()
        batches, refused = await self._batches(self._producer_now(), events)
        sent: list[tuple[_Batch, _Delivery | BaseException]] = []
        for batch in batches:
            where = (batch.topic, batch.partition)
            before = self._chain.get(where)
            if isinstance(before, asyncio.Future) and not before.done():
                stopping = asyncio.ensure_future(stop.wait())
                await asyncio.wait([before, stopping], return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                if not before.done():  # stopped: the rest of the round is not sent
                    self._chain[where] = error = KafkaError("stopping: not sent")
                    sent.append((batch, error))
                    continue
            if before is not None and _failed(before):
                self._chain[where] = error = KafkaError("an earlier batch of the partition failed")
                sent.append((batch, error))
                continue
            if not self._valid():  # checked last thing before the send: the paused holder
                self._chain[where] = error = KafkaError("the sink's lease ran out: not sent")
                sent.append((batch, error))
                continue
            producer = self._producer_now()  # a refusal of the batch before may have replaced it
            try:
                future = await producer.send_batch(
                    batch.builder, batch.topic, partition=batch.partition
                )
                task = asyncio.create_task(self._delivered(batch, producer, future))
                task.add_done_callback(_retrieve)  # a round given up may never await it
                self._deliveries.add(task)
                task.add_done_callback(self._deliveries.discard)
                delivery: _Delivery | BaseException = task
            except KafkaError as exc:  # refused before sending (closed producer, metadata)
                delivery = exc
            self._chain[where] = delivery
            sent.append((batch, delivery))
        return _Round(events, sent, refused, started)

    async def _delivered(
        self, batch: _Batch, producer: AIOKafkaProducer, future: asyncio.Future[object]
    ) -> dict[int, BaseException]:
        """Wait for a batch's acknowledgement; returns its events the broker refused for good
        (to dead-letter), each refused alone. Raises on any other failure.

        A batch refused for good leaves a gap in the producer's sequence numbers for its
        partition, which the broker answers with OutOfOrderSequenceNumber for every later batch
        of that producer there: what follows goes on a fresh producer (``_replace``). A batch of
        several records is then sent again one record per batch, so only the culprit is
        dead-lettered; the partition's next batch waits for all of it, so order holds, and
        nothing already acknowledged is sent again.
        """
        try:
            await future
            self._answered()
            return {}
        except _PERMANENT as exc:
            refused: BaseException = exc
        self._answered()
        await self._replace(producer)
        if len(batch.events) == 1:
            return {batch.events[0].seq: _refused_alone(refused, batch)}
        log.warning(
            "kafka.batch_refused",
            error=f"{type(refused).__name__}: {refused}",
            topic=batch.topic,
            partition=batch.partition,
            resend_singly=len(batch.events),
        )
        dead: dict[int, BaseException] = {}
        mode, sources = self._settings.content_mode, dict[tuple[str, str], bytes]()
        for event in batch.events:
            if not self._valid():
                raise KafkaError("the sink's lease ran out: not sent again")
            producer = self._producer_now()
            key = event.contact_id.encode()
            value, headers, _ = _record(event, mode, key, sources)
            single = _Batch(batch.topic, batch.partition, self._new_batch(producer, batch.topic))
            _append(single, key, value, headers)
            single.builder.close()
            sent = await producer.send_batch(single.builder, batch.topic, partition=batch.partition)
            try:
                await sent
                self._answered()
            except _PERMANENT as exc:
                self._answered()
                dead[event.seq] = _refused_alone(exc, single)
                await self._replace(producer)
        return dead

    def _producer_now(self) -> AIOKafkaProducer:
        if self._current is None:  # run() is between producers
            raise KafkaError("the Kafka producer is restarting")
        return self._current

    async def _replace(self, refused_on: AIOKafkaProducer) -> None:
        """Continue on a new producer (a new producer id, sequence numbers from 0) instead of
        ``refused_on``, once however many of its partitions saw a refusal.

        The new one takes over once it has started: batches handed to a producer that has not
        would wait for its metadata for ever if it never does. Until then the other partitions'
        batches still go on ``refused_on``, whose sequence numbers for them are intact (the
        refused partition's next batch waits for this). The old one is then stopped in the
        background: it still delivers the batches it holds (each partition's next batch waits
        for those). Raises a KafkaError if the new one does not start, as at start-up within
        twice ``request_timeout_s``: the batch is sent again from the cursor after a backoff.
        """
        async with self._switching:
            if self._current is not refused_on:
                return  # replaced already
            fresh = self._producer()
            try:
                await self._start_fresh(fresh)
            except BaseException:
                await _close_unused(fresh)
                raise
            if self._current is not refused_on:  # run() gave the old one up meanwhile
                await _close_unused(fresh)
                raise KafkaError("the Kafka producer is restarting")
            self._current = fresh
            retiring = asyncio.create_task(_stop_quietly(refused_on), name="kafka:retire")
            self._retiring.add(retiring)
            retiring.add_done_callback(self._retiring.discard)
            log.info("kafka.producer_replaced", reason="a batch was refused for good")

    async def _start_fresh(self, fresh: AIOKafkaProducer) -> None:
        limit_s = 2 * self._settings.request_timeout_s
        why = "kafka: a fresh producer (after a batch refused for good)"
        try:
            async with asyncio.timeout(limit_s):
                await fresh.start()
        except TimeoutError:
            raise KafkaError(f"{why} did not start within {limit_s:g} s") from None
        except (KafkaError, OSError) as exc:  # the cause stays: access_error() looks at it
            raise KafkaError(f"{why} could not start: {type(exc).__name__}: {exc}") from exc

    async def _settle(self, sent: _Round, cursor: int) -> int:
        """Await a round's acknowledgements; move the cursor over the acknowledged (or
        dead-lettered) prefix."""
        deliveries = [f for _, f in sent.sent if not isinstance(f, BaseException)]
        await self._acknowledged(deliveries)
        results = await asyncio.gather(*deliveries, return_exceptions=True)
        outcomes = iter(results)
        failed: dict[int, tuple[BaseException, int]] = dict(sent.refused)  # seq -> (error, size)
        for batch, future in sent.sent:
            outcome = future if isinstance(future, BaseException) else next(outcomes)
            if isinstance(outcome, BaseException):
                failed.update((e.seq, (outcome, len(batch.events))) for e in batch.events)
            else:  # refused for good, each alone
                failed.update((seq, (error, 1)) for seq, error in outcome.items())
        return await self._advance(sent.events, cursor, failed)

    async def _acknowledged(self, deliveries: list[_Delivery]) -> None:
        """Wait for every delivery, in slices of ``request_timeout_s``: a slice without any
        answer from the broker reports it unreachable. An idempotent aiokafka producer never
        gives up a batch while the broker is unreachable, and sending again on our own would
        break its ordering and idempotence: the same futures are awaited until it answers."""
        slice_s = self._settings.request_timeout_s
        pending = set(deliveries)
        started = time.monotonic()
        while pending:
            sliced = time.monotonic()
            _, pending = await asyncio.wait(pending, timeout=slice_s)
            silent_s = time.monotonic() - max(self._last_answer, started)
            if pending and self._last_answer < sliced and not self._stalled:
                self._stalled = True
                self._unreachable(
                    await self._why_silent(
                        f"kafka: no acknowledgement from {self._settings.bootstrap_servers}"
                        f" for {silent_s:.0f} s"
                    )
                )

    async def _batches(
        self, producer: AIOKafkaProducer, events: list[OutboxEvent]
    ) -> tuple[list[_Batch], dict[int, tuple[BaseException, int]]]:
        """Group events by partition, in outbox order, into closed batches; also the events
        refused before sending (see ``_refusal``)."""
        mode = self._settings.content_mode
        open_batches: dict[tuple[str, int], _Batch] = {}
        batches: list[_Batch] = []
        refused: dict[int, tuple[BaseException, int]] = {}
        partitions: dict[str, list[int]] = {}
        sources: dict[tuple[str, str], bytes] = {}
        topics, partition = self._topics, self._partition
        for event in events:
            topic = topics[event.kind]
            if topic not in partitions:
                partitions[topic] = sorted(await producer.partitions_for(topic))
            key = event.contact_id.encode()
            value, headers, size = _record(event, mode, key, sources)
            refusal = self._refusal(topic, key, value, headers, size)
            if refusal is not None:
                refused[event.seq] = (refusal, 1)
                continue
            where = (topic, partition(key, partitions[topic]))
            batch = open_batches.get(where)
            if batch is None or not _append(batch, key, value, headers):
                if batch is not None:
                    batch.builder.close()  # full: hand it over now, no lingering
                batch = open_batches[where] = _Batch(*where, self._new_batch(producer, topic))
                batches.append(batch)
                _append(batch, key, value, headers)  # an empty batch takes any first record
            batch.events.append(event)
        for batch in batches:
            batch.builder.close()
        return batches, refused

    def _refusal(
        self, topic: str, key: bytes, value: bytes, headers: list[tuple[str, bytes]], size: int
    ) -> KafkaError | None:
        """Why a record must be dead-lettered without being sent, if it must: it is larger than
        a request may be (``kafka.max_request_bytes``: the producer would refuse it), or, as a
        record batch of its own, than its topic's ``max.message.bytes`` or ``segment.bytes``
        read at start-up (the broker would refuse it, with the same error). Sent anyway, such a
        record cost a refusal and a fresh producer, and its batch's records were all sent again
        one per batch."""
        limit = self._settings.max_request_bytes
        if size > limit:
            return MessageSizeTooLargeError(f"{size} bytes > kafka.max_request_bytes {limit}")
        known = self._topic_limits.get(topic)
        if known is None or size + size // 64 + _BATCH_OVERHEAD <= known[0]:
            return None  # no limit known, or far enough within it (compressed or not)
        topic_limit, name = known
        batch = _batch_size(key, value, headers, _CODECS[self._settings.compression])
        if batch <= topic_limit:
            return None
        return _LIMITS[name](
            f"{batch} bytes as a record batch > {name} {topic_limit} of topic {topic}"
        )

    async def _advance(
        self, events: list[OutboxEvent], cursor: int, failed: dict[int, tuple[BaseException, int]]
    ) -> int:
        """Walk the events in order: acknowledged ones and permanent refusals of one record (a
        batch refused for good was sent again one record per batch, see ``_delivered``) move
        the cursor; the first other failure stops it there. Dead-lettered events move the cursor
        but are not counted as published."""
        done = cursor
        dead: set[int] = set()
        failure: BaseException | None = None
        for event in events:
            error, batch_size = failed.get(event.seq, (None, 0))
            if error is None:
                done = event.seq
            elif isinstance(error, _PERMANENT) and batch_size == 1:
                await self._dead_letter(event, error)
                dead.add(event.seq)
                done = event.seq
            else:
                failure = error
                break
        if done != cursor:
            self.last_error = None  # the broker acknowledged: whatever failed before is over
            await self._store.set_sink_cursor(SINK, done)
            published = [e for e in events if cursor < e.seq <= done and e.seq not in dead]
            self.published += len(published)
            self._metrics.kafka_published(published)
        if failure is not None:
            if isinstance(failure, KafkaError):
                raise failure
            raise KafkaError(str(failure)) from failure
        return done

    async def _dead_letter(self, event: OutboxEvent, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        await self._store.add_dead_letter(SINK, event.seq, event.event_id, reason, self._now_ms())
        self.dead_lettered += 1
        self._metrics.dead_lettered(SINK)
        log.error("kafka.dead_letter", event_id=event.event_id, seq=event.seq, reason=reason)

    def _backoff(self, attempt: int) -> float:
        s = self._settings
        cap = min(s.retry_backoff_max_s, s.retry_backoff_s * 2 ** min(attempt - 1, 16))
        return self._rng.uniform(cap / 2, cap)


def _refused_alone(exc: BaseException, batch: _Batch) -> BaseException:
    """The broker's refusal of a record sent alone, saying what it refused: the broker names
    neither the size nor the limit (e.g. ``[Error 10] MessageSizeTooLargeError``), so the
    dead letter's reason says how large the record was as a batch, and where it went."""
    return type(exc)(
        f"{batch.builder.size()} bytes as a record batch of its own, refused by the broker for"
        f" topic {batch.topic}"
    )


def _described(exc: BaseException) -> str:
    """An error as status and logs show it: ours as they are, others with their type."""
    if isinstance(exc, KafkaAccessError | KafkaTopicsError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _failed(sent: _Delivery | BaseException) -> bool:
    """Whether a batch handed over (a settled future) or not handed over failed."""
    return isinstance(sent, BaseException) or sent.cancelled() or sent.exception() is not None


def _retrieve(future: _Delivery) -> None:
    """Mark a batch's outcome as seen: rounds given up after a failure are never awaited."""
    if not future.cancelled():
        future.exception()


async def _first(task: asyncio.Task[int], *waits: Coroutine[object, object, object]) -> None:
    """Wait until ``task`` ends or any of ``waits`` returns; the other waits are cancelled."""
    others = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait([task, *others], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for other in others:
            other.cancel()
        await asyncio.gather(*others, return_exceptions=True)


def _batch_size(key: bytes, value: bytes, headers: list[tuple[str, bytes]], codec: int) -> int:
    """The bytes of a record batch holding only this record, compressed with ``codec``: what
    the broker compares with a topic's ``max.message.bytes``."""
    builder = DefaultRecordBatchBuilder(2, codec, 0, -1, -1, -1, 2**31 - 1)
    builder.append(0, None, key=key, value=value, headers=headers)
    return len(builder.build())


def _append(batch: _Batch, key: bytes, value: bytes, headers: list[tuple[str, bytes]]) -> bool:
    """Add a record to a batch; False when the batch is full."""
    return batch.builder.append(key=key, value=value, timestamp=None, headers=headers) is not None


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


async def _unless_stopped(stop: asyncio.Event, work: Coroutine[object, object, None]) -> bool:
    """Run ``work`` unless ``stop`` is set first (then it is cancelled): whether it finished.
    Its failure is raised."""
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
    if task.cancelled():
        return False
    task.result()
    return True


async def _accepts(host: str, port: int, timeout_s: float = 2.0) -> bool:
    """Whether ``host:port`` accepts a TCP connection within ``timeout_s``."""
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(host, port)
    except OSError:  # refused, unreachable, unknown host; TimeoutError too
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _stop_quietly(producer: AIOKafkaProducer, flush_s: float = _STOP_SETTLE_MAX_S) -> None:
    """Flush what can be flushed within ``flush_s``, then abandon the rest (see
    ``_STOP_SETTLE_MAX_S``); a producer that never connected has nothing to flush."""
    stopping = asyncio.ensure_future(producer.stop())
    try:
        await asyncio.wait({stopping}, timeout=flush_s)
    finally:  # also when cancelled: the producer must not go on retrying behind our back
        if not stopping.done():
            stopping.cancel()
            await asyncio.gather(stopping, return_exceptions=True)
            await _abandon(producer)
    if not stopping.cancelled() and (exc := stopping.exception()) is not None:
        log.warning("kafka.stop_failed", error=f"{type(exc).__name__}: {exc}")


async def _close_unused(producer: AIOKafkaProducer) -> None:
    """Stop a producer nothing was handed to (its start failed, or it came too late)."""
    with contextlib.suppress(Exception):  # TimeoutError too: it holds nothing of ours
        async with asyncio.timeout(_CLOSE_S):
            await producer.stop()


async def _abandon(producer: AIOKafkaProducer) -> None:
    """Close a producer without waiting for the batches it holds; they fail.

    aiokafka has no such call: ``stop()`` flushes, and an idempotent producer retries a batch
    for as long as the broker is unreachable. Their events are sent again from the cursor."""
    log.warning("kafka.producer_abandoned", reason="unacknowledged batches at stop")
    sender = producer._sender
    task = sender.sender_task if sender is not None else None
    if task is not None:
        task.cancel()  # its end waits for its requests in flight...
    await producer.client.close()  # ... which closing the connections fails
    if task is not None:
        await asyncio.wait({task}, timeout=_ABANDON_S)
    # once nothing sends them: their futures (and a cancelled stop()'s flush) end; internals of
    # aiokafka 0.14 (constraints.txt), as is _sender above
    accumulator = producer._message_accumulator
    held = [b for queued in accumulator._batches.values() for b in queued]
    held += accumulator._pending_batches
    accumulator.fail_all(KafkaError("abandoned unacknowledged at stop"))
    for batch in held:  # nobody waits for these: mark their failure seen
        batch._drain_waiter.exception()
