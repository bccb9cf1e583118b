"""Wiring of one running relay: start-up and shutdown order of store, clients, scheduler, jobs.

Start: open the store (migrations), one ClientSession, per api_key a limiter that resumes today's
count from the store (accounts sharing a key share it: the API counts per key), per account a
client and a poller; configured streams; the scheduler; discovery and pruning jobs.
Stop (SIGTERM/SIGINT): stop dispatching, abandon in-flight passes (committed pages stay
committed; the watermark did not move, so the next run re-reads them and dedup drops them), close
the HTTP session, close the store.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from datetime import UTC, datetime

import aiohttp
import structlog
from aiohttp import web

from relay.api import (
    WebhookError,
    admin_runner,
    create_admin_app,
    declared_secrets,
    upsert_declared,
)
from relay.api.status import FANOUT_SINK, AccountQuota, CircuitView, RelayView
from relay.config import AccountSettings, ConfigError, Settings
from relay.ctct.breaker import BreakerSettings, KeyBreaker
from relay.ctct.client import CtctClient
from relay.ctct.errors import CtctError
from relay.ctct.ratelimit import RateLimiter
from relay.heap import settle_after_startup
from relay.leases import AccountBudget, exclusively, leased_job, new_replica_id, run_leased
from relay.logs import Redactor
from relay.metrics import FANOUT_CURSOR, Metrics
from relay.poller import Poller
from relay.scheduler import AccountRuntime, Planner, Scheduler
from relay.sinks.kafka import SINK as KAFKA_SINK
from relay.sinks.kafka import STOP_MAX_S as KAFKA_STOP_MAX_S
from relay.sinks.kafka import KafkaSink, KafkaSinkError
from relay.sinks.ssrf import Guard
from relay.sinks.webhooks import WebhookDispatcher
from relay.store import Store, StoreError, open_store
from relay.store.coordination import Coordinator, coordinator_for
from relay.targets import CampaignDiscovery, ensure_configured

log = structlog.get_logger(__name__)

PRUNE_EVERY_S = 3600.0
# How long a stop waits for the Kafka sink (which ends within STOP_MAX_S, ~13 s, whatever the
# broker does) before its lease's owner cancels it, then for every sink: longer than the Kafka
# grace, so the Kafka worker is stopped by its owner first (and gives its lease back), and with
# the rest of the shutdown well inside the 40 s Kubernetes and deploy/ give a stopping relay
# (it was 45 s: a relay whose broker was down was killed mid-stop).
KAFKA_GRACE_S = KAFKA_STOP_MAX_S + 2.0
SINK_GRACE_S = KAFKA_GRACE_S + 5.0


def now_ms() -> int:
    """Wall-clock Unix milliseconds."""
    return int(time.time() * 1000)


class StoreLedger:
    """The store's per-day request count of one budget, as the limiter's QuotaLedger."""

    def __init__(self, store: Store, budget: str) -> None:
        self._store = store
        self._budget = budget

    async def spend(self, day: str, requests: int) -> int:
        return await self._store.spend_quota(self._budget, day, requests)


async def run_relay(
    settings: Settings,
    stop: asyncio.Event,
    metrics: Metrics | None = None,
    *,
    settle_heap: bool = False,
) -> None:
    """Run until ``stop`` is set, then shut down in order.

    A ``stop`` during start-up abandons it where it waits (an unreachable PostgreSQL is retried
    for ``postgres.reconnect_max_s``, longer than an orchestrator's grace period; a lease held
    by another replica): what had started is stopped in reverse order and this returns, logging
    ``relay.stopped_during_startup``, as after a stop once started.

    ``settle_heap``: apply the process's garbage-collector policy once started (``relay.heap``);
    only the process's owner asks for it (``ctct-relay run``), since it is process-wide.
    """
    replica = new_replica_id()
    # every log line of this process names it: replicas sharing PostgreSQL tell apart by it
    structlog.contextvars.bind_contextvars(replica=replica)
    started = asyncio.Event()
    failures = _Failures()
    relay = asyncio.create_task(
        _relay(settings, stop, started, failures, replica, metrics or Metrics(now_ms), settle_heap),
        name="relay",
    )
    stopping = asyncio.create_task(stop.wait(), name="relay:stop")
    try:
        await asyncio.wait({relay, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not relay.done() and not started.is_set():
            relay.cancel()  # its exit stack stops what had started
            await asyncio.wait({relay})
            if relay.cancelled():
                failure = failures.first()
                if failure is not None:  # the stop was the relay's own: a corrupt store, …
                    raise failure
                log.warning("relay.stopped_during_startup")
                return
        await relay  # an orderly stop, or the relay's failure
    finally:
        stopping.cancel()
        if not relay.done():  # this was cancelled: so is the relay, and it is awaited
            relay.cancel()
            await asyncio.wait({relay})


async def _relay(
    settings: Settings,
    stop: asyncio.Event,
    started: asyncio.Event,
    failures: _Failures,
    replica: str,
    metrics: Metrics,
    settle_heap: bool,
) -> None:
    """The relay's start-up (``started`` set once done), its run until ``stop``, its shutdown."""
    async with AsyncExitStack() as stack:
        # exclusive: a second relay on the same SQLite file stops here (it would poll the same
        # streams, spending the API budget twice, and run a second set of sinks)
        store = open_store(settings.state, settings.postgres, exclusive=True)
        await store.open()
        stack.push_async_callback(store.close)
        failures.damage = _stop_on_fatal(store, stop)
        coordinator = coordinator_for(store, replica, settings.postgres)
        session = await stack.enter_async_context(aiohttp.ClientSession())
        guard = Guard.from_strings(settings.allow_networks)

        async def declare() -> None:
            await upsert_declared(
                store,
                guard,
                settings.webhooks,
                now_ms(),
                "webhooks.declared",
                settings.admin.max_webhooks,
                settings.admin.rotation_grace_s,
            )

        try:
            # one replica at a time, so replicas starting together create each webhook once
            await exclusively(coordinator, "declare-webhooks", declare, 4 * coordinator.lease_s)
        except WebhookError as exc:
            raise ConfigError(str(exc)) from None
        sinks = _start_sinks(settings, store, stop, guard, metrics, coordinator)
        for reader in sinks.outbox_readers:
            # A stored cursor from the start (0: nothing published yet), so a replica without
            # this sink configured that holds the prune lease keeps the sink's events too.
            await store.set_sink_cursor(reader, 0)
        failures.sinks = sinks.tasks
        stack.push_async_callback(_stop_sinks, sinks)
        cursors = [FANOUT_CURSOR] + (["kafka"] if settings.kafka else [])
        metrics.watch_store(store, cursors)
        if KAFKA_SINK in sinks.health:  # the gauge says what status says: null where not publishing
            metrics.watch_kafka(sinks.health[KAFKA_SINK])
        view = RelayView(
            sinks=(FANOUT_SINK, KAFKA_SINK) if settings.kafka else (FANOUT_SINK,),
            redact=Redactor(settings.secrets()).text,
            health=sinks.health,
        )
        view.on_webhook_change = sinks.webhooks.changed
        runner = await _start_admin(settings, store, guard, metrics, view)
        stack.push_async_callback(runner.cleanup)
        today = datetime.now(UTC).date().isoformat()
        runtimes: list[AccountRuntime] = []
        clients: list[CtctClient] = []
        salt = await store.budget_salt()
        groups = settings.budget_groups(salt)
        limiters: dict[str, RateLimiter] = {}  # one per api_key: the API counts per key
        for account in settings.accounts:
            budget = account.budget_name(salt)
            if budget not in limiters:
                limiters[budget] = await _limiter(
                    account,
                    budget,
                    groups[budget],
                    store,
                    today,
                    coordinator,
                    settings.http.breaker,
                )
            limiter = limiters[budget]
            metrics.watch_limiter(account.name, limiter, budget)
            runtime, client = _account_runtime(
                settings, account, limiter, store, session, sinks.notify, metrics
            )
            runtimes.append(runtime)
            clients.append(client)
            sharing = tuple(name for name in groups[budget] if name != account.name)
            view.accounts[account.name] = _quota_view(runtime, budget, sharing)
            await ensure_configured(
                store, account.name, account.campaigns.ids, account.contacts, now_ms()
            )
        scheduler = Scheduler(
            store, runtimes, settings.schedule, metrics=metrics, coordinator=coordinator
        )
        stack.push_async_callback(scheduler.stop)
        view.on_change = scheduler.reload  # pauses and targets changed through the admin API
        for account, client in zip(settings.accounts, clients, strict=True):
            if not account.campaigns.discover:
                continue
            discovery = CampaignDiscovery(
                client,
                store,
                account.name,
                account.campaigns.max_age_days,
                scheduler.reload,
                keep=account.campaigns.ids,
            )
            scheduler.add_job(
                _discovery_job(scheduler, coordinator, account.name, discovery),
                account.campaigns.discover_interval_s,
                f"discover:{account.name}",
            )
        retention_ms = int(settings.dedup_retention_h * 3600_000)
        outbox_ms = int(settings.outbox_retention_h * 3600_000)
        readers = sinks.outbox_readers
        scheduler.add_job(
            _guarded(
                leased_job(
                    coordinator, "prune", lambda: _prune(store, retention_ms, outbox_ms, readers)
                ),
                "prune",
            ),
            PRUNE_EVERY_S,
            "prune",
        )
        if settle_heap:
            settle_after_startup()  # everything above lives as long as the process
        await scheduler.start()
        log.info("relay.started", accounts=[a.name for a in settings.accounts], replica=replica)
        started.set()
        await stop.wait()
        log.info("relay.stopping")
    failure = failures.first()
    if failure is not None:
        raise failure  # the relay's error: ctct-relay run exits 1 with it


class _Failures:
    """What stopped the relay from inside (it sets ``stop``): raised once it has shut down,
    also when that came during start-up, which a stop otherwise abandons quietly."""

    def __init__(self) -> None:
        self.damage: list[StoreError] = []  # a store that cannot be used any more
        self.sinks: list[asyncio.Task[None]] = []  # a sink that cannot run ends the relay

    def first(self) -> BaseException | None:
        if self.damage:
            return self.damage[0]
        for task in self.sinks:
            failure = task.exception() if task.done() and not task.cancelled() else None
            if failure is not None:
                return failure
        return None


def _stop_on_fatal(store: Store, stop: asyncio.Event) -> list[StoreError]:
    """Stop the relay when the store reports an error it cannot go on from (a corrupt SQLite
    file, damage PostgreSQL reports): every pass, delivery and job would fail on it for ever
    while the relay looked up. Components handle the StoreError of their own call as always;
    this ends the run. Returns the list that will hold the error."""
    damage: list[StoreError] = []

    def failed(exc: StoreError) -> None:
        if not damage:
            damage.append(exc)
            log.error("store.failed", error=str(exc))
        stop.set()

    store.on_fatal(failed)
    return damage


class _Sinks:
    """The running sink tasks and the event that asks them to finish."""

    def __init__(self, webhooks: WebhookDispatcher) -> None:
        self.webhooks = webhooks
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.on_commit: list[Callable[[], None]] = []  # in-process outbox readers to wake
        self.outbox_readers: list[str] = []  # sinks with an outbox cursor (besides fan-out)
        # sinks reporting their connection for /v1/status
        self.health: dict[str, Callable[[], tuple[bool | None, str | None]]] = {}

    def notify(self) -> None:
        """The poller committed new events."""
        for wake in self.on_commit:
            wake()


def _quota_view(runtime: AccountRuntime, budget: str, sharing: tuple[str, ...]) -> AccountQuota:
    limiter = runtime.limiter

    def circuit() -> CircuitView:
        breaker = limiter.breaker
        until = breaker.open_until_s
        return CircuitView(
            breaker.state(),
            breaker.failures,
            None if until is None else int(until * 1000),
            breaker.last_error,
        )

    return AccountQuota(
        runtime.name,
        limiter.budget.daily_allowance,
        lambda: limiter.used_today,
        budget=budget,
        shared_with=sharing,
        circuit=circuit,
    )


async def _start_admin(
    settings: Settings, store: Store, guard: Guard, metrics: Metrics, view: RelayView
) -> web.AppRunner:
    """The admin API (webhooks, status, pauses, replay, targets, metrics) on its address."""
    app = create_admin_app(
        store,
        settings.admin,
        guard=guard,
        now_ms=now_ms,
        metrics=metrics,
        view=view,
        declared_secrets=declared_secrets(settings.webhooks, "webhooks.declared"),
    )
    runner = admin_runner(app)
    await runner.setup()
    site = web.TCPSite(runner, settings.admin.host, settings.admin.port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        where = f"{settings.admin.host}:{settings.admin.port}"
        raise ConfigError(f"admin: cannot listen on {where}: {exc.strerror or exc}") from None
    log.info("admin.listening", address=[f"{a[0]}:{a[1]}" for a in runner.addresses])
    return runner


def _start_sinks(
    settings: Settings,
    store: Store,
    relay_stop: asyncio.Event,
    guard: Guard,
    metrics: Metrics,
    coordinator: Coordinator,
) -> _Sinks:
    dispatcher = WebhookDispatcher(store, settings.delivery, guard, now_ms, metrics, coordinator)
    sinks = _Sinks(dispatcher)
    sinks.on_commit.append(dispatcher.notify)
    sinks.tasks.append(asyncio.create_task(dispatcher.run(sinks.stop), name="sink:webhooks"))
    if settings.kafka is not None:
        sink = KafkaSink(settings.kafka, store, now_ms, metrics)
        sinks.on_commit.append(sink.notify)
        sinks.outbox_readers.append(sink.name)
        sinks.health[sink.name] = sink.health
        # one publisher at a time keeps each contact's events in order; a lost lease or a
        # failure backs off and tries again, only configuration errors end the relay
        leased = run_leased(
            "sink:kafka",
            coordinator,
            sink.run,
            sinks.stop,
            fatal=(KafkaSinkError,),
            grace_s=KAFKA_GRACE_S,
        )
        task = asyncio.create_task(leased, name="sink:kafka")

        def fatal(done: asyncio.Task[None]) -> None:
            if not done.cancelled() and done.exception() is not None:
                log.error("sink.failed", sink="kafka", error=str(done.exception()))
                relay_stop.set()  # a sink that cannot run makes the relay exit with its error

        task.add_done_callback(fatal)
        sinks.tasks.append(task)
    # commits of other replicas wake the sinks here too (PostgreSQL LISTEN; nothing on SQLite)
    watch = coordinator.watch_commits(sinks.notify, sinks.stop)
    sinks.tasks.append(asyncio.create_task(watch, name="sink:wake"))
    return sinks


async def _stop_sinks(sinks: _Sinks) -> None:
    """Let sinks finish their batch and flush, within a grace period."""
    sinks.stop.set()
    _done, pending = (
        await asyncio.wait(sinks.tasks, timeout=SINK_GRACE_S) if sinks.tasks else ((), ())
    )
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


async def _limiter(
    account: AccountSettings,
    budget: str,
    members: Sequence[str],
    store: Store,
    today: str,
    coordinator: Coordinator,
    breaker: BreakerSettings | None = None,
) -> RateLimiter:
    """The rate limiter of ``account``'s budget (its name: ``budget``), shared by the
    ``members`` (the accounts with its api_key), counted in the store under the budget's name."""
    used = await store.quota_used(budget, today)
    if not used:
        # Today's count of an older version carries over once (an upgrade is a restart, and a
        # restart must not overspend): stored under the budget's unsalted name, or, before
        # budgets were per api_key, under each account's name. Replicas starting together may
        # each carry it: over-counting is the safe side.
        legacy = await store.quota_used(account.legacy_budget_id, today)
        if not legacy:
            legacy = sum([await store.quota_used(name, today) for name in members])
        if legacy:
            used = await store.spend_quota(budget, today, legacy)
    shared = coordinator.shared_budget
    return RateLimiter(
        account.budget,
        name=budget,
        used_today=used,
        # replicas: every request admitted and counted in PostgreSQL for the whole deployment
        ledger=None if shared else StoreLedger(store, budget),
        shared=AccountBudget(coordinator, budget) if shared else None,
        after_restart=True,
        breaker=KeyBreaker(breaker),  # the key's circuit: its outages stop all its streams
    )


def _account_runtime(
    settings: Settings,
    account: AccountSettings,
    limiter: RateLimiter,
    store: Store,
    session: aiohttp.ClientSession,
    on_commit: Callable[[], None],
    metrics: Metrics,
) -> tuple[AccountRuntime, CtctClient]:
    client = CtctClient(
        session,
        account.credentials(),
        limiter,
        retry=settings.http.retry,
        timeout=aiohttp.ClientTimeout(
            total=settings.http.timeout_s, connect=settings.http.connect_timeout_s
        ),
        on_response=metrics.api_observer(account.name),
    )
    poller = Poller(client, store, account.name, account.poll, now_ms, on_commit)
    return AccountRuntime(account.name, poller, limiter, Planner(settings.schedule)), client


def _discovery_job(
    scheduler: Scheduler, coordinator: Coordinator, account: str, discovery: CampaignDiscovery
) -> Callable[[], Awaitable[None]]:
    """One replica's campaign discovery for ``account``, spending its requests as its passes
    do: not while the account is held or paused, and an error that pauses a pass's account
    (or key) pauses it when discovery meets it too. (It used to call the API every
    ``discover_interval_s`` whatever the account's state, and only log those errors.)"""
    job = scheduler.account_job(account, discovery.run)
    return _guarded(leased_job(coordinator, f"discover:{account}", job), "discovery")


async def _prune(store: Store, retention_ms: int, outbox_ms: int, readers: Sequence[str]) -> None:
    pruned = await store.prune_dedup(now_ms() - retention_ms)
    if pruned:
        log.info("dedup.pruned", keys=pruned)
    # Webhook deliveries delivered longer ago than the retention, with their attempt history,
    # and published events older than it; the store keeps whatever a reader still needs.
    deliveries = await store.prune_deliveries(now_ms() - outbox_ms)
    if deliveries:
        log.info("deliveries.pruned", deliveries=deliveries)
    events = await store.prune_outbox(now_ms() - outbox_ms, readers)
    if events:
        log.info("outbox.pruned", events=events)
    held = _held_by_unconfigured(await store.sink_cursors(), readers)
    if held:
        # The prune keeps what every stored cursor still owes, configured here or not: said
        # each time, as an outbox that keeps growing for a retired sink is the operator's call.
        log.warning(
            "outbox.prune_held",
            sinks=held,
            hint="sinks not configured on this replica keep their events in the outbox; one"
            " configured on no replica any more lets go with: ctct-relay sinks forget NAME",
        )


def _held_by_unconfigured(cursors: dict[str, int], readers: Sequence[str]) -> dict[str, int]:
    """The cursors of sinks not configured here that sit below every configured reader's
    (webhook fan-out's included): those alone keep the prune from going as far as this
    replica's sinks would let it."""
    configured = {FANOUT_CURSOR, *readers}
    floor = min(cursors.get(name, 0) for name in configured)
    return {
        name: seq for name, seq in sorted(cursors.items()) if name not in configured and seq < floor
    }


def _guarded(job: Callable[[], Awaitable[None]], name: str) -> Callable[[], Awaitable[None]]:
    """A job that logs an upstream or store failure and runs again at its next interval."""

    async def run() -> None:
        try:
            await job()
        except (CtctError, StoreError) as exc:
            log.warning(f"{name}.failed", error=str(exc))

    return run
