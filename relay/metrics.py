"""Prometheus metrics of one running relay: the registry, the metric objects, the scrape.

One :class:`Metrics` per relay, each with its own ``CollectorRegistry`` (never the global
default), so tests and several relays in one process never collide. Components get it passed
in and call one method at the point where something happened (a request answered, a pass
finished, a batch acknowledged, an attempt settled). Everything that is *state* rather than
*events* (quota, outbox depth, watermark lag, rate-limit waits, the Kafka connection) is read at
scrape time instead: :meth:`Metrics.scrape` refreshes it from the store, the limiters and the
Kafka sink's health, so hot paths stay untouched.

Labels are bounded on purpose: account names come from the config, endpoints from the catalogue,
kinds and scopes are enums; no stream, campaign, contact or webhook id is ever a label.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from relay.store import OutboxEvent, Store, StoreError

log = structlog.get_logger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FANOUT_CURSOR = "webhooks-fanout"  # the store's cursor of webhook fan-out
# the most a scrape waits for the store (Prometheus' default scrape timeout is 10 s); then it
# answers with ctct_relay_store_up 0 and the counters this process keeps
STORE_TIMEOUT_S = 5.0
# Delivery latency runs from commit to acknowledgement: milliseconds for Kafka, up to hours for
# a webhook on its retry schedule.
_DELIVERY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 7200, 36000)
_REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

ResponseObserver = Callable[[str, str, float], None]


class BreakerView(Protocol):
    """What the scrape reads of an api_key's circuit breaker (``relay.ctct.breaker``)."""

    @property
    def is_open(self) -> bool: ...

    @property
    def failures(self) -> int: ...


class LimiterView(Protocol):
    """What the scrape reads of an account's rate limiter."""

    @property
    def breaker(self) -> BreakerView: ...

    @property
    def used_today(self) -> int: ...

    @property
    def remaining_today(self) -> int: ...

    waited_s: float
    waits: int


class PassView(Protocol):
    """What a finished poll pass reports (``relay.poller.PassOutcome``)."""

    fetched: int
    new: int
    skipped_records: int
    replayed: int


@dataclass
class _State:
    """Gauges and counters read from the store and the limiters at the last scrape."""

    # keyed by (account, budget): accounts sharing an api_key show their one budget's numbers
    quota_used: dict[tuple[str, str], int] = field(default_factory=dict)
    quota_remaining: dict[tuple[str, str], int] = field(default_factory=dict)
    waits: dict[tuple[str, str], tuple[int, float]] = field(default_factory=dict)
    circuit: dict[tuple[str, str], tuple[bool, int]] = field(default_factory=dict)  # open, failures
    outbox_depth: dict[str, int] = field(default_factory=dict)
    lag_max_s: dict[tuple[str, ...], float] = field(default_factory=dict)
    lag_min_s: dict[tuple[str, ...], float] = field(default_factory=dict)
    streams: dict[tuple[str, ...], int] = field(default_factory=dict)
    store_up: int | None = None  # None: no store watched


class Metrics:
    """The relay's metrics; ``scrape()`` renders them in the Prometheus text format."""

    def __init__(self, now_ms: Callable[[], int] | None = None) -> None:
        self._now_ms = now_ms or (lambda: int(time.time() * 1000))
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.api_requests = Counter(
            "ctct_relay_api_requests",
            "Upstream API requests by account, catalogue endpoint and HTTP status"
            " (timeout / transport_error when none came back).",
            ["account", "endpoint", "status"],
            registry=r,
        )
        self.api_latency = Histogram(
            "ctct_relay_api_request_seconds",
            "Upstream API request duration by catalogue endpoint.",
            ["endpoint"],
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.passes = Counter(
            "ctct_relay_poll_passes",
            "Poll passes by account and result (ok, or the class of the error that ended it).",
            ["account", "result"],
            registry=r,
        )
        self.events_fetched = Counter(
            "ctct_relay_events_fetched",
            "Activity records read from the API, before deduplication.",
            ["account"],
            registry=r,
        )
        self.events_new = Counter(
            "ctct_relay_events_new",
            "Activities committed to the outbox as new events.",
            ["account"],
            registry=r,
        )
        self.events_deduplicated = Counter(
            "ctct_relay_events_deduplicated",
            "Activities read again (overlap, retries, history absorbed at start) and dropped.",
            ["account"],
            registry=r,
        )
        self.events_replayed = Counter(
            "ctct_relay_events_replayed",
            "Known activities a replay read again and committed again (same event ids).",
            ["account"],
            registry=r,
        )
        self.records_skipped = Counter(
            "ctct_relay_records_skipped",
            "Activity records left out because they could not be read (poll.bad_record).",
            ["account"],
            registry=r,
        )
        self.published = Counter(
            "ctct_relay_events_published",
            "Events acknowledged by a sink (Kafka broker ack, webhook 2xx).",
            ["sink"],
            registry=r,
        )
        self.kafka_publish = Histogram(
            "ctct_relay_kafka_publish_seconds",
            "Time from sending a batch to Kafka until the broker acknowledged all of it.",
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        # ctct_relay_kafka_connected is scrape-time state: a gauge that said 0 on every replica
        # not publishing (and on a relay without Kafka) made "== 0" alerts fire for ever
        self._kafka_connected: bool | None = None  # as the sink last reported it
        self._kafka_health: Callable[[], tuple[bool | None, str | None]] | None = None
        self._webhook_counters: dict[str, Counter] = {}
        self.webhook_attempts = Counter(
            "ctct_relay_webhook_attempts",
            "Webhook delivery attempts by outcome: delivered, retry (failed, will retry),"
            " dead (failed, out of attempts).",
            ["outcome"],
            registry=r,
        )
        # Observed per event at Kafka rates: a bulk histogram (prometheus_client's costs ~6 us
        # per observation, measured; this one a dict update per distinct commit time).
        self.delivery_latency = _BulkHistogram(
            "ctct_relay_delivery_latency_seconds",
            "Time from an event's commit to its acknowledgement by a sink.",
            "sink",
            _DELIVERY_BUCKETS,
        )
        r.register(self.delivery_latency)
        self.dead_letters = Counter(
            "ctct_relay_dead_letters",
            "Events a sink gave up on (Kafka refused for good; webhook out of attempts).",
            ["sink"],
            registry=r,
        )
        self._state = _State()
        self._limiters: dict[str, tuple[LimiterView, str]] = {}  # account -> (limiter, budget)
        self._store: Store | None = None
        self._sinks: tuple[str, ...] = ()
        r.register(_StateCollector(self._state, self._kafka_connection))

    # wiring, once at start-up

    def watch_limiter(self, account: str, limiter: LimiterView, budget: str) -> None:
        """Report this account's quota and rate-limit waits at every scrape: those of its
        api_key's ``budget`` (``key:<hex>``), the same numbers for every account of the key."""
        self._limiters[account] = (limiter, budget)

    def watch_kafka(self, health: Callable[[], tuple[bool | None, str | None]]) -> None:
        """Report the Kafka sink's connection at every scrape as ``/v1/status`` does: ``health``
        says None where this process does not publish (another replica holds the sink)."""
        self._kafka_health = health

    def watch_store(self, store: Store, sinks: Sequence[str]) -> None:
        """Report outbox depth of ``sinks`` (cursor names) and watermark lag at every scrape."""
        self._store = store
        self._sinks = tuple(sinks)

    def _kafka_connection(self) -> bool | None:
        """Whether this process's Kafka producer is connected; None where it does not publish."""
        if self._kafka_health is not None:
            return self._kafka_health()[0]
        return self._kafka_connected

    # one-line hooks for the components

    def api_observer(self, account: str) -> ResponseObserver:
        """The client's per-response callback for ``account``: (endpoint, status, seconds)."""

        def observe(endpoint: str, status: str, seconds: float) -> None:
            self.api_requests.labels(account, endpoint, status).inc()
            self.api_latency.labels(endpoint).observe(seconds)

        return observe

    def pass_finished(self, account: str, outcome: PassView, result: str = "ok") -> None:
        """A poll pass committed its pages; ``result`` names the error class of a feed that
        failed while the others were committed."""
        self.passes.labels(account, result).inc()
        self.events_fetched.labels(account).inc(outcome.fetched)
        self.events_new.labels(account).inc(outcome.new)
        # a replay commits known activities again: re-emitted, not dropped
        if outcome.replayed:
            self.events_replayed.labels(account).inc(outcome.replayed)
        dropped = outcome.fetched - outcome.new - outcome.replayed
        self.events_deduplicated.labels(account).inc(max(0, dropped))
        if outcome.skipped_records:
            self.records_skipped.labels(account).inc(outcome.skipped_records)

    def pass_failed(self, account: str, error: BaseException) -> None:
        """A poll pass ended with an error, upstream or unexpected (its class names the result)."""
        self.passes.labels(account, type(error).__name__).inc()

    def kafka_round_settled(self, started: float) -> None:
        """The broker answered a round of batches that began at ``started``
        (``time.perf_counter()``)."""
        self.kafka_publish.observe(time.perf_counter() - started)

    def kafka_connected(self, connected: bool) -> None:
        """The Kafka sink connected to the cluster (topics checked) or lost it (read when no
        :meth:`watch_kafka` health is watched)."""
        self._kafka_connected = connected

    def kafka_published(self, events: Iterable[OutboxEvent]) -> None:
        """The broker acknowledged ``events`` and the cursor moved past them (dead-lettered
        events are counted by :meth:`dead_lettered`, not here)."""
        self._acknowledged("kafka", (e.committed_ms for e in events))

    def webhooks_settled(self, settled: Sequence[tuple[str, int, int]]) -> None:
        """Webhook attempts settled as ``delivered``, ``pending`` (retry) or ``dead``, each as
        (outcome, the event's commit time, the attempt's end), both Unix ms; the dispatcher
        hands them over in batches (per attempt, the counters' locks and label lookups were a
        tenth of its bookkeeping, profiled)."""
        outcomes = collections.Counter(outcome for outcome, _, _ in settled)
        counters = self._webhook_counters
        for outcome, count in outcomes.items():
            if outcome not in counters:  # children looked up once: labels() locks, builds a key
                counters[outcome] = self.webhook_attempts.labels(
                    "retry" if outcome == "pending" else outcome
                )
            counters[outcome].inc(count)
        if delivered := outcomes["delivered"]:
            self.published.labels("webhooks").inc(delivered)
            self.delivery_latency.observe_each(
                "webhooks",
                [max(0, end - c) / 1000 for o, c, end in settled if o == "delivered"],
            )
        if dead := outcomes["dead"]:
            self.dead_letters.labels("webhooks").inc(dead)

    def dead_lettered(self, sink: str) -> None:
        """A sink dead-lettered one event."""
        self.dead_letters.labels(sink).inc()

    def _acknowledged(self, sink: str, committed_ms: Iterable[int]) -> None:
        now_ms = self._now_ms()
        # events of one page share their commit time: count them once per distinct time
        by_time = collections.Counter(committed_ms)
        self.published.labels(sink).inc(by_time.total())
        for ms, count in by_time.items():
            self.delivery_latency.observe(sink, max(0.0, (now_ms - ms) / 1000), count)

    # the scrape

    async def scrape(self) -> bytes:
        """Refresh the scrape-time state, then render every metric in the text format."""
        await self.refresh()
        return generate_latest(self.registry)

    async def refresh(self) -> None:
        """Read quota, waits, outbox depth and watermark lag into the scrape-time state. The
        quota is the larger of the limiter's count and the store's for its budget (replicas
        count there for the whole deployment)."""
        state = _State()
        for account, (limiter, budget) in self._limiters.items():
            state.quota_used[(account, budget)] = limiter.used_today
            state.quota_remaining[(account, budget)] = limiter.remaining_today
            state.waits[(account, budget)] = (limiter.waits, limiter.waited_s)
            breaker = limiter.breaker
            state.circuit[(account, budget)] = (breaker.is_open, breaker.failures)
        if self._store is not None:
            state.store_up = 0
            stored = _State()
            try:
                # bounded: a store that does not answer (PostgreSQL down: every call is retried
                # for postgres.reconnect_max_s) must not outlast Prometheus' scrape timeout
                await asyncio.wait_for(self._read_store(self._store, stored), STORE_TIMEOUT_S)
            except StoreError as exc:  # the scrape still answers, with what the process knows
                log.warning("metrics.store_unavailable", error=str(exc))
            except TimeoutError:
                log.warning(
                    "metrics.store_unavailable",
                    error=f"the state store did not answer within {STORE_TIMEOUT_S:g} s",
                )
            else:
                state.store_up = 1
                # replicas share a budget's count in the store: this process's limiter knows
                # only its own requests (and what it last read), the store the deployment's
                for key, used in stored.quota_used.items():
                    local = state.quota_used.get(key, 0)
                    if used > local:
                        state.quota_used[key] = used
                        state.quota_remaining[key] = max(
                            0, state.quota_remaining.get(key, 0) - (used - local)
                        )
                state.outbox_depth = stored.outbox_depth
                state.streams = stored.streams
                state.lag_max_s = stored.lag_max_s
                state.lag_min_s = stored.lag_min_s
        self._state.__dict__.update(state.__dict__)  # one swap: a concurrent scrape sees either

    async def _read_store(self, store: Store, state: _State) -> None:
        day = datetime.fromtimestamp(self._now_ms() / 1000, UTC).date().isoformat()
        counts: dict[str, int] = {}  # one read per budget, however many accounts share it
        for account, (_limiter, budget) in self._limiters.items():
            if budget not in counts:
                counts[budget] = await store.quota_used(budget, day)
            state.quota_used[(account, budget)] = counts[budget]
        head = await store.outbox_head()
        # grouped queries, not every stream: about 1 s at 100,000 streams with 3 feeds each on
        # a shared 2-core box, where reading the streams (store.streams()) took 4.3-5.5 s
        overview = await store.overview()
        for sink in self._sinks:
            state.outbox_depth[sink] = max(0, head - await store.sink_cursor(sink))
        if FANOUT_CURSOR in self._sinks:
            state.outbox_depth["webhooks"] = overview.pending_deliveries
        now_ms = self._now_ms()
        state.streams = {key: n for key, n in overview.streams.items()}
        for (scope, kind), (oldest, newest) in overview.watermarks.items():
            state.lag_max_s[(scope, kind.value)] = max(0.0, (now_ms - oldest) / 1000)
            state.lag_min_s[(scope, kind.value)] = max(0.0, (now_ms - newest) / 1000)


class _StateCollector(Collector):
    """Renders the scrape-time state; labels are accounts, sinks, scopes and kinds only."""

    def __init__(self, state: _State, kafka_connected: Callable[[], bool | None]) -> None:
        self._state = state
        self._kafka_connected = kafka_connected  # read live: the sink's flag, no store read

    def describe(self) -> Iterable[Metric]:
        return list(self.collect())  # families without samples: no store read needed

    def collect(self) -> Iterator[Metric]:
        s = self._state
        yield _gauge(
            "ctct_relay_quota_used_requests",
            "Requests spent today (UTC) of the daily allowance of the account's api_key (budget:"
            " one per key; accounts sharing a key show the same numbers).",
            ["account", "budget"],
            {key: float(v) for key, v in s.quota_used.items()},
        )
        yield _gauge(
            "ctct_relay_quota_remaining_requests",
            "Requests left today (UTC) of the allowance of the account's api_key (after the"
            " reserved share; one budget per key).",
            ["account", "budget"],
            {key: float(v) for key, v in s.quota_remaining.items()},
        )
        waits = CounterMetricFamily(
            "ctct_relay_rate_limit_waits",
            "Requests that waited for a per-second slot of the rate limit of the account's"
            " api_key (budget: one per key, counted once for all its accounts).",
            labels=["account", "budget"],
        )
        waited = CounterMetricFamily(
            "ctct_relay_rate_limit_wait_seconds",
            "Time requests spent waiting for a per-second slot (per budget, as above).",
            labels=["account", "budget"],
        )
        for (account, budget), (count, seconds) in s.waits.items():
            waits.add_metric([account, budget], count)
            waited.add_metric([account, budget], seconds)
        yield waits
        yield waited
        yield _gauge(
            "ctct_relay_circuit_open",
            "1 while the circuit breaker of the account's api_key is open in this process (5xx"
            " or no answer on http.breaker_failures requests in a row: the key pauses, one probe"
            " request at a time), else 0.",
            ["account", "budget"],
            {key: float(is_open) for key, (is_open, _) in s.circuit.items()},
        )
        yield _gauge(
            "ctct_relay_circuit_failures",
            "Requests of the account's api_key in a row that got a 5xx or no answer (this"
            " process; an answer below 500 resets it).",
            ["account", "budget"],
            {key: float(failures) for key, (_, failures) in s.circuit.items()},
        )
        yield _gauge(
            "ctct_relay_outbox_depth_events",
            "Events a sink has not finished with: kafka, webhooks-fanout (committed, not yet"
            " fanned out to webhooks), webhooks (deliveries pending, retries included).",
            ["sink"],
            {(k,): float(v) for k, v in s.outbox_depth.items()},
        )
        yield _gauge(
            "ctct_relay_watermark_lag_max_seconds",
            "Largest now-minus-watermark over active streams, per stream scope and feed kind.",
            ["scope", "kind"],
            dict(s.lag_max_s),
        )
        yield _gauge(
            "ctct_relay_watermark_lag_min_seconds",
            "Smallest now-minus-watermark over active streams, per stream scope and feed kind.",
            ["scope", "kind"],
            dict(s.lag_min_s),
        )
        yield _gauge(
            "ctct_relay_kafka_connected",
            "1 while this process's Kafka producer is connected and the broker answers, else 0;"
            " no sample where this process does not publish to Kafka (another replica does, or"
            " no Kafka is configured).",
            [],
            {} if (kafka := self._kafka_connected()) is None else {(): float(kafka)},
        )
        if s.store_up is not None:
            yield _gauge(
                "ctct_relay_store_up",
                "1 when the last scrape could read the state store, else 0.",
                [],
                {(): float(s.store_up)},
            )
        yield _gauge(
            "ctct_relay_streams",
            "Streams known to the relay by scope and state (active, paused, retired).",
            ["scope", "state"],
            {k: float(v) for k, v in s.streams.items()},
        )


class _BulkHistogram(Collector):
    """A labelled histogram that takes many equal observations in one call."""

    def __init__(self, name: str, doc: str, label: str, buckets: Sequence[float]) -> None:
        self._name, self._doc, self._label = name, doc, label
        self._bounds = [float(b) for b in buckets]
        self._counts: dict[str, list[int]] = {}  # per label value: one count per bucket + inf
        self._sums: dict[str, float] = {}

    def observe(self, value_of_label: str, seconds: float, count: int = 1) -> None:
        """Add ``count`` observations of ``seconds``."""
        counts = self._counts.setdefault(value_of_label, [0] * (len(self._bounds) + 1))
        counts[bisect.bisect_left(self._bounds, seconds)] += count
        self._sums[value_of_label] = self._sums.get(value_of_label, 0.0) + seconds * count

    def observe_each(self, value_of_label: str, seconds: Sequence[float]) -> None:
        """Add one observation per value of ``seconds``."""
        counts = self._counts.setdefault(value_of_label, [0] * (len(self._bounds) + 1))
        bounds = self._bounds
        for value in seconds:
            counts[bisect.bisect_left(bounds, value)] += 1
        self._sums[value_of_label] = self._sums.get(value_of_label, 0.0) + sum(seconds)

    def describe(self) -> Iterable[Metric]:
        return [HistogramMetricFamily(self._name, self._doc, labels=[self._label])]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._doc, labels=[self._label])
        for label, counts in sorted(self._counts.items()):
            cumulative = list(itertools.accumulate(counts))
            buckets = [(_le(b), float(c)) for b, c in zip(self._bounds, cumulative, strict=False)]
            buckets.append(("+Inf", float(cumulative[-1])))
            family.add_metric([label], buckets, self._sums[label])
        yield family


def _le(bound: float) -> str:
    return str(bound)  # prometheus_client's own form: 0.5 -> "0.5", 1 -> "1.0"


def _gauge(
    name: str, doc: str, labels: list[str], values: dict[tuple[str, ...], float]
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key), value)
    return family
