"""Metrics: a registry per relay, scrape-time state from the store, /metrics on the admin API."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient

from relay.api import AdminSettings, create_admin_app
from relay.ctct.breaker import KeyBreaker
from relay.events import Kind, from_millis, parse_activity
from relay.metrics import FANOUT_CURSOR, Metrics
from relay.poller import PassOutcome
from relay.sinks.ssrf import Guard
from relay.store import OutboxEvent, PassResult, Store, StreamKey, open_store

NOW_MS = 1_763_700_000_000
TOKEN = "metrics-unit-admin-token"


@dataclass
class FakeLimiter:
    """The limiter's counters, as the scrape reads them."""

    used_today: int = 120
    remaining_today: int = 8880
    waited_s: float = 1.5
    waits: int = 6
    breaker: KeyBreaker = field(default_factory=KeyBreaker)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    """A real SQLite store with one campaign stream holding two committed opens."""
    opened = open_store(f"sqlite:///{tmp_path / 'state.db'}")
    await opened.open()
    await opened.ensure_streams([StreamKey("acme", "campaign", "1100")], 0, seed=False)
    stream = (await opened.streams())[0]
    activities = [
        parse_activity(
            {
                "activity_type": "EMAIL_OPEN",
                "campaign_id": "1100",
                "contact_id": str(c),
                "email_address": f"c{c}@example.com",
                "open_date": from_millis(NOW_MS - 60_000).isoformat(),
            },
            account="acme",
            kind=Kind.OPEN,
        )
        for c in (1, 2)
    ]
    await opened.commit_page(stream.id, activities, NOW_MS)
    await opened.finish_pass(
        stream.id, PassResult({Kind.OPEN: NOW_MS - 60_000}, {}, NOW_MS, 1.0, NOW_MS)
    )
    yield opened
    await opened.close()


ACME = (("account", "acme"), ("budget", "key:0123456789ab"))  # the labels of acme's budget


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


async def test_scrape_reads_quota_waits_outbox_depth_and_lag(store: Store) -> None:
    """Quota, waits, outbox depth per sink and watermark lag per scope and kind come from the
    limiters and the store at scrape time."""
    metrics = Metrics(lambda: NOW_MS)
    metrics.watch_limiter("acme", FakeLimiter(), "key:0123456789ab")
    metrics.watch_store(store, ["kafka", FANOUT_CURSOR])
    await store.set_sink_cursor("kafka", 1)
    got = samples(await metrics.scrape())
    assert got[("ctct_relay_quota_used_requests", ACME)] == 120
    assert got[("ctct_relay_quota_remaining_requests", ACME)] == 8880
    assert got[("ctct_relay_rate_limit_waits_total", ACME)] == 6
    assert got[("ctct_relay_rate_limit_wait_seconds_total", ACME)] == 1.5
    assert got[("ctct_relay_circuit_open", ACME)] == 0
    assert got[("ctct_relay_circuit_failures", ACME)] == 0
    assert got[("ctct_relay_outbox_depth_events", (("sink", "kafka"),))] == 1
    assert got[("ctct_relay_outbox_depth_events", (("sink", FANOUT_CURSOR),))] == 2
    assert got[("ctct_relay_outbox_depth_events", (("sink", "webhooks"),))] == 0
    min_lag = ("ctct_relay_watermark_lag_min_seconds", (("kind", "open"), ("scope", "campaign")))
    assert got[min_lag] == 60.0
    lag = ("ctct_relay_watermark_lag_max_seconds", (("kind", "open"), ("scope", "campaign")))
    assert got[lag] == 60.0
    assert got[("ctct_relay_streams", (("scope", "campaign"), ("state", "active")))] == 1


def test_each_relay_has_its_own_registry() -> None:
    """Two Metrics in one process never share or collide, and the global registry stays clean."""
    one, two = Metrics(), Metrics()
    one.pass_finished("acme", PassOutcome(fetched=10, new=7))
    assert one.registry.get_sample_value("ctct_relay_events_new_total", {"account": "acme"}) == 7
    assert (
        one.registry.get_sample_value("ctct_relay_events_deduplicated_total", {"account": "acme"})
        == 3
    )
    assert two.registry.get_sample_value("ctct_relay_events_new_total", {"account": "acme"}) is None
    assert REGISTRY.get_sample_value("ctct_relay_events_new_total", {"account": "acme"}) is None


def test_records_skipped_as_unreadable_are_counted() -> None:
    """A record the parser refuses (poll.bad_record) is left out so that its stream goes on; the
    pass's count of them reaches a counter, so an account whose records are being dropped shows
    on a dashboard and an alert, not only in a warning line per record."""
    metrics = Metrics()
    metrics.pass_finished("acme", PassOutcome(fetched=10, new=7, skipped_records=2))
    metrics.pass_finished("acme", PassOutcome(fetched=1, new=1, skipped_records=1))
    value = metrics.registry.get_sample_value
    assert value("ctct_relay_records_skipped_total", {"account": "acme"}) == 3
    assert value("ctct_relay_events_deduplicated_total", {"account": "acme"}) == 3


def test_webhook_outcomes_count_attempts_latency_and_dead_letters() -> None:
    """delivered feeds the latency histogram, pending counts as retry, dead as a dead letter."""
    metrics = Metrics(lambda: NOW_MS)
    metrics.webhooks_settled([("delivered", NOW_MS - 2500, NOW_MS), ("pending", NOW_MS, NOW_MS)])
    metrics.webhooks_settled(
        [("dead", NOW_MS, NOW_MS), ("delivered", NOW_MS - 500, NOW_MS), ("pending", NOW_MS, 0)]
    )
    value = metrics.registry.get_sample_value
    assert value("ctct_relay_webhook_attempts_total", {"outcome": "retry"}) == 2
    assert value("ctct_relay_webhook_attempts_total", {"outcome": "delivered"}) == 2
    assert value("ctct_relay_events_published_total", {"sink": "webhooks"}) == 2
    assert value("ctct_relay_dead_letters_total", {"sink": "webhooks"}) == 1
    assert value("ctct_relay_delivery_latency_seconds_sum", {"sink": "webhooks"}) == 3.0
    assert value("ctct_relay_delivery_latency_seconds_count", {"sink": "webhooks"}) == 2
    assert (
        value("ctct_relay_delivery_latency_seconds_bucket", {"sink": "webhooks", "le": "1.0"}) == 1
    )


@pytest.mark.parametrize(
    ("public", "status"),
    [pytest.param(True, 200, id="open"), pytest.param(False, 401, id="token-protected")],
)
async def test_metrics_route_is_open_unless_configured_to_need_the_token(
    aiohttp_client: AiohttpClient, store: Store, public: bool, status: int
) -> None:
    """/metrics answers without the token by default; with metrics_public false it needs it."""
    settings = AdminSettings(token=TOKEN, metrics_public=public)
    app = create_admin_app(store, settings, guard=Guard(), metrics=Metrics())
    client = await aiohttp_client(app)
    resp = await client.get("/metrics")
    assert resp.status == status
    authed = await client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert authed.status == 200
    assert authed.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert "ctct_relay_api_requests" in await authed.text()
    doc = await (await client.get("/openapi.json")).json()
    assert ("security" in doc["paths"]["/metrics"]["get"]) is public


def test_kafka_published_events_count_with_their_latency() -> None:
    """Events the sink published count, each with its own commit-to-ack latency; an
    observation on a bucket bound falls in that bucket."""
    metrics = Metrics(lambda: NOW_MS)
    events = [
        OutboxEvent(seq, f"id-{seq}", "acme", Kind.OPEN, "1100", str(seq), 0, NOW_MS - ms, b"{}")
        for seq, ms in ((1, 1000), (2, 1000), (3, 5000))
    ]
    metrics.kafka_published(events)
    metrics.kafka_round_settled(started=0.0)
    value = metrics.registry.get_sample_value
    assert value("ctct_relay_events_published_total", {"sink": "kafka"}) == 3
    assert value("ctct_relay_delivery_latency_seconds_count", {"sink": "kafka"}) == 3
    assert value("ctct_relay_delivery_latency_seconds_bucket", {"sink": "kafka", "le": "1.0"}) == 2
    assert value("ctct_relay_delivery_latency_seconds_sum", {"sink": "kafka"}) == 7.0
    assert value("ctct_relay_kafka_publish_seconds_count", {}) == 1


async def test_overview_leaves_paused_and_retired_streams_out_of_the_lag(store: Store) -> None:
    """Streams are counted by state; only active streams' watermarks make the lag."""
    keys = [StreamKey("acme", "campaign", "2200"), StreamKey("acme", "contact", "77")]
    await store.ensure_streams(keys, 0, seed=False)
    by_key = {s.key: s.id for s in await store.streams()}
    old = PassResult({Kind.OPEN: NOW_MS - 3_600_000}, {}, NOW_MS, 1.0, NOW_MS)
    await store.finish_pass(by_key[keys[0]], old)
    await store.set_paused(by_key[keys[0]], True)
    await store.retire_streams([keys[1]])
    overview = await store.overview()
    assert overview.streams == {
        ("campaign", "active"): 1,
        ("campaign", "paused"): 1,
        ("contact", "retired"): 1,
    }
    assert overview.watermarks == {("campaign", Kind.OPEN): (NOW_MS - 60_000, NOW_MS - 60_000)}
    assert overview.pending_deliveries == 0


async def test_accounts_sharing_an_api_key_show_their_one_budget() -> None:
    """Two accounts on one key (one limiter): each series shows the key's numbers, labelled with
    the budget, so max by (budget) counts the key once."""
    metrics = Metrics(lambda: NOW_MS)
    limiter = FakeLimiter()
    metrics.watch_limiter("shop-a", limiter, "key:0123456789ab")
    metrics.watch_limiter("shop-b", limiter, "key:0123456789ab")
    got = samples(await metrics.scrape())
    used = {
        labels: value
        for (name, labels), value in got.items()
        if name == "ctct_relay_quota_used_requests"
    }
    assert used == {
        (("account", "shop-a"), ("budget", "key:0123456789ab")): 120,
        (("account", "shop-b"), ("budget", "key:0123456789ab")): 120,
    }


async def test_a_store_that_does_not_answer_still_gets_a_scrape(tmp_path: Path) -> None:
    """Without the store the scrape answers with what the process knows and store_up 0."""
    metrics = Metrics(lambda: NOW_MS)
    metrics.watch_limiter("acme", FakeLimiter(), "key:0123456789ab")
    metrics.watch_store(open_store(f"sqlite:///{tmp_path / 'never-opened.db'}"), ["kafka"])
    got = samples(await metrics.scrape())
    assert got[("ctct_relay_store_up", ())] == 0
    assert got[("ctct_relay_quota_used_requests", ACME)] == 120
    assert not any(name == "ctct_relay_outbox_depth_events" for name, _labels in got)


async def test_store_up_is_one_when_the_store_answers(store: Store) -> None:
    """A store that answers reports store_up 1."""
    metrics = Metrics(lambda: NOW_MS)
    metrics.watch_store(store, [])
    assert samples(await metrics.scrape())[("ctct_relay_store_up", ())] == 1


async def test_scrape_shows_an_open_circuit() -> None:
    """The circuit breaker of the account's api_key: open (1) and its failures in a row."""
    limiter = FakeLimiter()
    for _ in range(limiter.breaker.settings.failures):
        limiter.breaker.failed(False, "GET /v2/x answered 503")
    metrics = Metrics(lambda: NOW_MS)
    metrics.watch_limiter("acme", limiter, "key:0123456789ab")
    got = samples(await metrics.scrape())
    assert got[("ctct_relay_circuit_open", ACME)] == 1
    assert got[("ctct_relay_circuit_failures", ACME)] == 10


def test_activities_a_replay_commits_again_are_not_counted_as_dropped() -> None:
    """A replay re-reads known activities and commits them again (same ids, published again):
    they count as replayed, not as deduplicated, which says read again and dropped."""
    metrics = Metrics()
    metrics.pass_finished("acme", PassOutcome(fetched=10, new=2, replayed=7))
    value = metrics.registry.get_sample_value
    assert value("ctct_relay_events_new_total", {"account": "acme"}) == 2
    assert value("ctct_relay_events_replayed_total", {"account": "acme"}) == 7
    assert value("ctct_relay_events_deduplicated_total", {"account": "acme"}) == 1


async def test_kafka_connected_only_where_this_process_publishes() -> None:
    """ctct_relay_kafka_connected says what /v1/status says: 1 or 0 on the process publishing
    to Kafka, and no sample on a replica that does not publish or a relay without Kafka (where
    a 0 made every "== 0" alert fire)."""
    without_kafka = samples(await Metrics().scrape())
    assert ("ctct_relay_kafka_connected", ()) not in without_kafka
    health: list[bool | None] = [None]
    metrics = Metrics()
    metrics.watch_kafka(lambda: (health[0], None))
    assert ("ctct_relay_kafka_connected", ()) not in samples(await metrics.scrape())
    health[0] = True
    assert samples(await metrics.scrape())[("ctct_relay_kafka_connected", ())] == 1
    health[0] = False
    assert samples(await metrics.scrape())[("ctct_relay_kafka_connected", ())] == 0
    reported = Metrics()  # a sink without a watched health: what it reported last
    reported.kafka_connected(True)
    assert reported.registry.get_sample_value("ctct_relay_kafka_connected") == 1


@pytest.mark.parametrize(
    ("public", "status"),
    [pytest.param(True, 200, id="open"), pytest.param(False, 401, id="token-protected")],
)
async def test_head_on_metrics_answers_as_get_does_without_a_body(
    aiohttp_client: AiohttpClient, store: Store, public: bool, status: int
) -> None:
    """HEAD /metrics (probes, uptime checks) gets GET's status and content type, no body; it
    was a 405. With metrics_public false it needs the token as GET does."""
    settings = AdminSettings(token=TOKEN, metrics_public=public)
    app = create_admin_app(store, settings, guard=Guard(), metrics=Metrics())
    client = await aiohttp_client(app)
    resp = await client.head("/metrics")
    assert resp.status == status
    authed = await client.head("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert authed.status == 200
    assert authed.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert await authed.read() == b""
