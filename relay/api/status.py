"""What ``GET /v1/status`` and ``GET /v1/streams`` show: accounts, streams, sinks, webhooks.

Everything comes from the store, so any replica answers the same; the running relay adds what only
it knows through a :class:`RelayView` (each account's daily allowance and live request count, both
of its api_key's budget, and the callback that makes the scheduler re-read targets and pauses). The
request count shown is the larger of that live count and the store's for the budget, which every
replica adds to.
No secret is ever shown: webhook URLs lose their user info and fragment and show every query
value as ``***`` (where tokens hide; the keys stay), and error texts go through the relay's
redactor.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlsplit, urlunsplit

from aiohttp import web

from relay.api.responses import JsonObject
from relay.api.views import time_or_null
from relay.sinks.ssrf import masked_query
from relay.store import DeliveryCounts, Store, Stream, StreamStats, Webhook

FANOUT_SINK = "webhooks-fanout"  # the cursor of webhook fan-out (deliveries track the rest)


@dataclass(frozen=True)
class AccountQuota:
    """One configured account's daily allowance and its requests spent today, live: those of its
    api_key's budget, which ``shared_with`` (the other accounts using the key) spend too."""

    name: str
    daily_allowance: int
    used_today: Callable[[], int]
    budget: str | None = None  # the budget's name, ``key:<12 hex>`` (nothing of the key)
    shared_with: tuple[str, ...] = ()
    circuit: Callable[[], CircuitView] | None = None  # the key's circuit breaker, live


@dataclass(frozen=True)
class CircuitView:
    """The circuit breaker of an account's api_key as this process sees it (it is no store
    state: each replica counts the failures its own requests meet)."""

    state: str  # closed | open | half_open
    consecutive_failures: int
    probe_at_ms: int | None  # when a probe request may go (open, half_open)
    last_error: str


def _same(text: str) -> str:
    return text


@dataclass
class RelayView:
    """What only the running relay knows; the API works from the store alone without it."""

    accounts: dict[str, AccountQuota] = field(default_factory=dict)
    sinks: tuple[str, ...] = (FANOUT_SINK,)  # sinks shown even before their first cursor write
    # per sink that knows it: (connected, or None when not publishing here; its last error)
    health: dict[str, Callable[[], tuple[bool | None, str | None]]] = field(default_factory=dict)
    redact: Callable[[str], str] = _same  # removes configured secrets from error texts
    # tells the scheduler that pauses or targets changed (set once the scheduler exists)
    on_change: Callable[[], Awaitable[None]] | None = None
    # tells this process's webhook dispatcher that a webhook changed or deliveries of it became
    # due (set once the dispatcher exists; other replicas see it at their next refresh)
    # (with the webhook as an edit stored it, whose filter applies to queued deliveries at once)
    on_webhook_change: Callable[[str, Webhook | None], None] | None = None

    async def changed(self) -> None:
        """Let the scheduler pick up a pause, resume or target change now."""
        if self.on_change is not None:
            await self.on_change()

    def webhook_changed(self, webhook_id: str, hook: Webhook | None = None) -> None:
        """Let the webhook dispatcher act on a webhook's change or new due deliveries now;
        ``hook``: the webhook as an edit just stored it."""
        if self.on_webhook_change is not None:
            self.on_webhook_change(webhook_id, hook)


VIEW = web.AppKey("relay.view", RelayView)


async def status(store: Store, view: RelayView, now_ms: int) -> JsonObject:
    """The whole relay at a glance: per account, the outbox and its sinks, per webhook."""
    stats = await store.stream_stats()  # counted in the store: status stays cheap at 100k streams
    pauses = await store.account_pauses()
    holds = await store.account_holds()
    names = sorted(set(view.accounts) | set(stats) | set(pauses) | set(holds))
    day = datetime.fromtimestamp(now_ms / 1000, UTC).date().isoformat()
    accounts: list[JsonObject] = []
    for name in names:
        counts = stats.get(name, StreamStats())
        accounts.append(
            {
                "name": name,
                "configured": name in view.accounts,
                "quota": await _quota(store, view.accounts.get(name), name, day),
                "paused": _relay_pause(pauses.get(name), now_ms, view.redact),
                "circuit": _circuit(view.accounts.get(name), view.redact),
                "held": _hold(holds.get(name)),
                "streams": {
                    "total": counts.total,
                    "active": counts.active,
                    "paused": counts.paused,
                    "retired": counts.retired,
                    "failing": counts.failing,
                    "replaying": counts.replaying,
                },
                "max_lag_s": _lag_s(counts.oldest_watermark_ms, now_ms),
            }
        )
    head = await store.outbox_head()
    return {
        "time": time_or_null(now_ms),
        "accounts": accounts,
        "outbox": {"head": head},
        "sinks": await _sinks(store, view, head),
        "webhooks": await _webhooks(store),
    }


def stream_view(
    stream: Stream, replay_from_ms: int | None, now_ms: int, view: RelayView
) -> JsonObject:
    """One stream: where its watermarks are, how far behind, when it polls, its last error."""
    feeds: JsonObject = {
        kind.value: {"watermark": time_or_null(ms), "lag_s": _lag_s(ms, now_ms)}
        for kind, ms in sorted(stream.watermarks.items(), key=lambda item: item[0].value)
    }
    last = stream.last_poll_ms
    return {
        "id": stream.id,
        "account": stream.key.account,
        "scope": stream.key.scope,
        "resource_id": stream.key.resource_id,
        "state": _state(stream),
        "paused": stream.paused,
        "retired": stream.retired,
        "replay_from": time_or_null(replay_from_ms),
        "feeds": feeds,
        "lag_s": _max_lag(stream, now_ms),
        "rate_per_h": round(stream.rate_per_h, 3),
        "last_poll_at": time_or_null(last),
        "next_poll_at": time_or_null(stream.next_due_ms),
        "interval_s": None if last is None else max(0.0, (stream.next_due_ms - last) / 1000),
        "consecutive_errors": stream.consecutive_errors,
        "last_error": None if stream.last_error is None else view.redact(stream.last_error),
    }


def public_url(url: str) -> str:
    """A webhook URL as text views and status show it: without user info or fragment, and with
    the value of every query parameter as ``***`` (where credentials usually hide); the
    parameters' keys stay, so URLs differing only in their query can be told apart."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "(unparsable URL)"
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    query = masked_query(parts.query) if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def _state(stream: Stream) -> str:
    if stream.retired:
        return "retired"
    if stream.paused:
        return "paused"
    return "failing" if stream.consecutive_errors else "active"


def _lag_s(watermark_ms: int | None, now_ms: int) -> float | None:
    return None if watermark_ms is None else max(0.0, (now_ms - watermark_ms) / 1000)


def _max_lag(stream: Stream, now_ms: int) -> float | None:
    """A stream's lag: now minus its oldest feed watermark."""
    return _lag_s(min(stream.watermarks.values()), now_ms) if stream.watermarks else None


async def _quota(store: Store, quota: AccountQuota | None, name: str, day: str) -> JsonObject:
    if quota is None:  # not configured here: the store's count, no allowance to compare with
        return {
            "used_today": await store.quota_used(name, day),
            "allowance": None,
            "left_today": None,
            "budget": None,
            "shared_with": [],
        }
    used = quota.used_today()
    if quota.budget is not None:
        # the store counts the budget for every replica (and process) spending it; this
        # process's limiter only its own requests since it last read the store
        used = max(used, await store.quota_used(quota.budget, day))
    return {
        "used_today": used,
        "allowance": quota.daily_allowance,
        "left_today": max(0, quota.daily_allowance - used),
        "budget": quota.budget,
        "shared_with": list(quota.shared_with),
    }


def _relay_pause(
    pause: tuple[int, str] | None, now_ms: int, redact: Callable[[str], str]
) -> JsonObject | None:
    """The relay's own pause (quota spent, credentials refused); it ends by itself."""
    if pause is None or pause[0] <= now_ms:
        return None
    return {"until": time_or_null(pause[0]), "reason": redact(pause[1])}


def _circuit(quota: AccountQuota | None, redact: Callable[[str], str]) -> JsonObject | None:
    """The key's circuit breaker in this process (null: the account is not configured here)."""
    if quota is None or quota.circuit is None:
        return None
    circuit = quota.circuit()
    return {
        "state": circuit.state,
        "consecutive_failures": circuit.consecutive_failures,
        "probe_at": time_or_null(circuit.probe_at_ms),
        "last_error": redact(circuit.last_error) if circuit.last_error else None,
    }


def _hold(hold: tuple[int, str] | None) -> JsonObject | None:
    """An operator's pause; it lasts until resumed."""
    return None if hold is None else {"since": time_or_null(hold[0]), "reason": hold[1]}


async def _sinks(store: Store, view: RelayView, head: int) -> list[JsonObject]:
    cursors = await store.sink_cursors()
    dead = await store.dead_letter_counts()
    expected = view.sinks
    names = sorted(set(expected) | set(cursors) | set(dead))
    return [
        {
            "name": name,
            "cursor": cursors.get(name, 0),
            "depth": max(0, head - cursors.get(name, 0)),
            "dead_letters": dead.get(name, 0),
            "running": name in expected,  # a cursor left by a sink no longer configured: False
            **_health(view, name),
        }
        for name in names
    ]


def _health(view: RelayView, name: str) -> JsonObject:
    """A sink's connection as this process sees it: null where it does not know (a sink that
    does not report it, the Kafka sink on a replica not publishing)."""
    report = view.health.get(name)
    connected, error = (None, None) if report is None else report()
    return {"connected": connected, "last_error": None if error is None else view.redact(error)}


async def _webhooks(store: Store) -> list[JsonObject]:
    counts = await store.delivery_counts()
    return [
        _webhook_health(hook, counts.get(hook.id, DeliveryCounts()))
        for hook in await store.webhooks()
    ]


def _webhook_health(hook: Webhook, counts: DeliveryCounts) -> JsonObject:
    return {
        "id": hook.id,
        "url": public_url(hook.url),
        "enabled": hook.enabled,
        "disabled_reason": hook.disabled_reason,
        "failing_since": time_or_null(hook.failing_since_ms),
        "pending": counts.pending,
        "dead_letters": counts.dead,
        "oldest_pending_seq": counts.oldest_pending_seq,
    }
