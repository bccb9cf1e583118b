"""How the admin API shows webhooks, deliveries and attempts: JSON objects with RFC 3339 times.

A webhook's view never carries a secret; :func:`webhook_with_secret` adds it for the two answers
that must show it once (creation and rotation), and :func:`secret_view` is the answer that is
asked for it alone (``GET /v1/webhooks/{id}/secret``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from relay.api.responses import JsonObject
from relay.events import format_time, from_millis
from relay.store import Attempt, Delivery, Webhook


def time_or_null(ms: int | None) -> str | None:
    """RFC 3339 UTC with milliseconds, or None."""
    return None if ms is None else format_time(from_millis(ms))


def _grace_until(webhook: Webhook, now_ms: int) -> int | None:
    grace_until = webhook.previous_expires_ms if webhook.previous_secret else None
    if grace_until is not None and grace_until <= now_ms:
        grace_until = None  # the rotation grace is over: only one secret signs now
    return grace_until


def webhook_view(webhook: Webhook, now_ms: int) -> JsonObject:
    """A webhook without its secrets."""
    grace_until = _grace_until(webhook, now_ms)
    return {
        "id": webhook.id,
        "url": webhook.url,
        "event_types": list(webhook.event_types),
        "description": webhook.description,
        "enabled": webhook.enabled,
        "rate_limit_per_s": webhook.rate_limit_per_s,
        "disabled_reason": webhook.disabled_reason,
        "failing_since": time_or_null(webhook.failing_since_ms),
        "previous_secret_expires_at": time_or_null(grace_until),
        "created_at": time_or_null(webhook.created_ms),
        "updated_at": time_or_null(webhook.updated_ms),
    }


def webhook_with_secret(webhook: Webhook, now_ms: int) -> JsonObject:
    """A webhook with its current secret: only in the answers to creation and rotation."""
    return {**webhook_view(webhook, now_ms), "secret": webhook.secret}


def secret_view(webhook: Webhook, now_ms: int) -> JsonObject:
    """A webhook's current secret and, during a rotation's grace, when the previous one (which
    still signs, and is not shown) stops signing."""
    return {
        "webhook_id": webhook.id,
        "secret": webhook.secret,
        "previous_secret_expires_at": time_or_null(_grace_until(webhook, now_ms)),
    }


def attempt_view(attempt: Attempt, redact: Callable[[str], str]) -> JsonObject:
    """One HTTP attempt of a delivery; its texts (the receiver's answer, the error met) through
    ``redact``, the relay's redactor, as every other error text the API shows: a receiver or a
    proxy may echo a URL with user info or query values, or a token."""
    return {
        "attempted_at": time_or_null(attempt.attempted_ms),
        "status_code": attempt.status_code,
        "latency_ms": round(attempt.latency_ms, 3),
        "response_excerpt": redact(attempt.response_excerpt),
        "error": _redacted(attempt.error, redact),
    }


def delivery_view(
    delivery: Delivery, attempts: Sequence[Attempt], redact: Callable[[str], str]
) -> JsonObject:
    """A delivery with its attempts, oldest first; error texts through ``redact``
    (:func:`attempt_view`)."""
    return {
        "id": delivery.id,
        "webhook_id": delivery.webhook_id,
        "seq": delivery.seq,
        "event_id": delivery.event_id,
        "status": delivery.status,
        "attempt_count": delivery.attempts,
        "next_attempt_at": time_or_null(delivery.next_attempt_ms),
        "last_status": delivery.last_status,
        "last_error": _redacted(delivery.last_error, redact),
        "created_at": time_or_null(delivery.created_ms),
        "delivered_at": time_or_null(delivery.delivered_ms),
        "attempts": [attempt_view(a, redact) for a in attempts],
    }


def _redacted(text: str | None, redact: Callable[[str], str]) -> str | None:
    return None if text is None else redact(text)
