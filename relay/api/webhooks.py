"""The webhook routes of the admin API: registration, changes, secrets, deliveries.

Handlers only translate: JSON in (checked field by field, :mod:`relay.api.body`), a call to the
registration service (:mod:`relay.api.service`) or the store, JSON out (:mod:`relay.api.views`).
Service and store errors become 400 / 404 / 409 / 410 here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import structlog
from aiohttp import web

from relay.api import body, service
from relay.api.responses import (
    WEBHOOK_DISABLED,
    WEBHOOK_LIMIT,
    ApiError,
    JsonObject,
    bad_request,
    json_response,
    not_found,
)
from relay.api.state import DECLARED_SECRETS, GUARD, NOW_MS, SETTINGS, STORE
from relay.api.status import VIEW
from relay.api.views import delivery_view, secret_view, webhook_view, webhook_with_secret
from relay.events import EVENT_TYPES
from relay.store import (
    DisabledError,
    DuplicateError,
    GoneError,
    LimitError,
    NotFoundError,
    UnwantedError,
)

CREATE_FIELDS = ("url", "event_types", "description", "enabled", "secret", "rate_limit_per_s")
PATCH_FIELDS = ("url", "event_types", "description", "enabled", "rate_limit_per_s")
MAX_PATTERN_CHARS = max(len(t) for t in EVENT_TYPES) + 8

log = structlog.get_logger(__name__)


def routes() -> web.RouteTableDef:
    """The routes this module serves, under ``/v1``."""
    table = web.RouteTableDef()
    table.post("/v1/webhooks")(_create)
    table.get("/v1/webhooks", allow_head=False)(_list)
    table.get("/v1/webhooks/{webhook_id}", allow_head=False)(_show)
    table.patch("/v1/webhooks/{webhook_id}")(_patch)
    table.delete("/v1/webhooks/{webhook_id}")(_delete)
    table.post("/v1/webhooks/{webhook_id}/rotate-secret")(_rotate)
    table.get("/v1/webhooks/{webhook_id}/secret", allow_head=False)(_secret_of)
    table.get("/v1/webhooks/{webhook_id}/deliveries", allow_head=False)(_deliveries)
    table.post("/v1/webhooks/{webhook_id}/recover")(_recover)
    table.post("/v1/deliveries/{delivery_id}/redeliver")(_redeliver)
    return table


async def _create(request: web.Request) -> web.Response:
    data = await body.read_object(request)
    body.check_fields(data, CREATE_FIELDS, required=("url", "event_types"))
    spec = service.DeclaredWebhook(
        url=body.string(data, "url", max_chars=body.MAX_URL_CHARS),
        event_types=_event_types(data),
        description=(
            body.string(data, "description", max_chars=body.MAX_DESCRIPTION_CHARS)
            if "description" in data
            else ""
        ),
        enabled=body.boolean(data, "enabled") if "enabled" in data else True,
        secret=_secret(data),
        rate_limit_per_s=body.rate_or_null(data, "rate_limit_per_s")
        if "rate_limit_per_s" in data
        else None,
    )
    now = request.app[NOW_MS]()
    with _service_errors():
        created = await service.create_webhook(
            request.app[STORE],
            request.app[GUARD],
            spec,
            now,
            request.app[SETTINGS].max_webhooks,
        )
    request.app[VIEW].webhook_changed(created.id)
    return json_response(webhook_with_secret(created, now), 201)


async def _list(request: web.Request) -> web.Response:
    body.check_query(request, ())
    now = request.app[NOW_MS]()
    hooks = await request.app[STORE].webhooks()
    return json_response({"webhooks": [webhook_view(h, now) for h in hooks]})


async def _show(request: web.Request) -> web.Response:
    body.check_query(request, ())
    with _service_errors():
        hook = await request.app[STORE].webhook(_webhook_id(request))
    return json_response(webhook_view(hook, request.app[NOW_MS]()))


async def _patch(request: web.Request) -> web.Response:
    data = await body.read_object(request)
    if "secret" in data:
        raise bad_request("secret: change it with POST /v1/webhooks/{id}/rotate-secret")
    body.check_fields(data, PATCH_FIELDS)
    changes = service.WebhookChanges(
        url=body.string(data, "url", max_chars=body.MAX_URL_CHARS) if "url" in data else None,
        event_types=_event_types(data) if "event_types" in data else None,
        description=body.string(data, "description", max_chars=body.MAX_DESCRIPTION_CHARS)
        if "description" in data
        else None,
        enabled=body.boolean(data, "enabled") if "enabled" in data else None,
        rate_limit_per_s=body.rate_or_null(data, "rate_limit_per_s")
        if "rate_limit_per_s" in data
        else service.KEEP,
    )
    now = request.app[NOW_MS]()
    with _service_errors():
        hook = await service.update_webhook(
            request.app[STORE],
            request.app[GUARD],
            _webhook_id(request),
            changes,
            now,
        )
    request.app[VIEW].webhook_changed(hook.id, hook)
    return json_response(webhook_view(hook, now))


async def _delete(request: web.Request) -> web.Response:
    with _service_errors():
        await request.app[STORE].delete_webhook(_webhook_id(request))
    log.info("webhook.deleted", webhook=_webhook_id(request))
    request.app[VIEW].webhook_changed(_webhook_id(request))
    return web.Response(status=204)


async def _rotate(request: web.Request) -> web.Response:
    data = await body.read_object(request, optional=True)
    body.check_fields(data, ("secret",))
    now = request.app[NOW_MS]()
    with _service_errors():
        hook = await service.rotate_secret(
            request.app[STORE],
            _webhook_id(request),
            now,
            request.app[SETTINGS].rotation_grace_s,
            _secret(data),
            request.app[DECLARED_SECRETS],
        )
    request.app[VIEW].webhook_changed(hook.id)
    return json_response(webhook_with_secret(hook, now))


async def _secret_of(request: web.Request) -> web.Response:
    """The current signing secret: how a declared webhook's generated one is read (the answers
    to creation and rotation are the others that carry it)."""
    body.check_query(request, ())
    with _service_errors():
        hook = await request.app[STORE].webhook(_webhook_id(request))
    log.info("webhook.secret_read", webhook=hook.id)  # the API's lines carry the peer
    return json_response(secret_view(hook, request.app[NOW_MS]()))


async def _deliveries(request: web.Request) -> web.Response:
    body.check_query(request, ("status", "limit", "before"))
    status = body.query_status(request)
    limit = body.query_limit(request)
    before = body.query_before(request)
    store = request.app[STORE]
    webhook_id = _webhook_id(request)
    with _service_errors():
        await store.webhook(webhook_id)  # an unknown webhook is a 404, not an empty list
    # one more than asked for says whether an older page exists, without a count
    found = await store.deliveries(webhook_id, limit + 1, status, before=before)
    page = found[:limit]
    # every delivery's attempts in one query: a query per delivery made a page of the largest
    # limit cost a thousand and one
    histories = await store.attempts_of([d.id for d in page])
    redact = request.app[VIEW].redact
    views: list[JsonObject] = [delivery_view(d, histories.get(d.id, []), redact) for d in page]
    next_before = page[-1].id if len(found) > limit else None
    return json_response({"deliveries": views, "next_before": next_before})


async def _redeliver(request: web.Request) -> web.Response:
    delivery_id = body.path_integer(request, "delivery_id", body.MAX_DELIVERY_ID)
    store = request.app[STORE]
    with _service_errors():
        delivery = await store.redeliver(delivery_id, request.app[NOW_MS]())
    log.info("webhook.redelivery_asked", webhook=delivery.webhook_id, delivery=delivery_id)
    request.app[VIEW].webhook_changed(delivery.webhook_id)
    attempts = await store.attempts(delivery_id)
    return json_response(delivery_view(delivery, attempts, request.app[VIEW].redact), 202)


async def _recover(request: web.Request) -> web.Response:
    data = await body.read_object(request)
    body.check_fields(data, ("since",), required=("since",))
    since_ms = body.timestamp_ms(data, "since")
    with _service_errors():
        count = await request.app[STORE].recover(
            _webhook_id(request), since_ms, request.app[NOW_MS]()
        )
    log.info("webhook.recovered", webhook=_webhook_id(request), deliveries=count)
    request.app[VIEW].webhook_changed(_webhook_id(request))
    return json_response({"deliveries": count}, 202)


def _webhook_id(request: web.Request) -> str:
    return body.path_id(request, "webhook_id", "webhook")


def _event_types(data: JsonObject) -> tuple[str, ...]:
    patterns = body.string_list(
        data, "event_types", max_items=body.MAX_EVENT_TYPES, max_chars=MAX_PATTERN_CHARS
    )
    with _service_errors():
        return service.check_event_types(patterns)


def _secret(data: JsonObject) -> str | None:
    if "secret" not in data:
        return None
    with _service_errors():
        return service.check_secret(body.string(data, "secret", max_chars=body.MAX_SECRET_CHARS))


@contextlib.contextmanager
def _service_errors() -> Iterator[None]:
    """Turns service and store outcomes into API errors: 409, 410, 400, 404."""
    try:
        yield
    except DuplicateError as exc:  # the store's unique URL: race-free, unlike a lookup first
        raise ApiError(409, str(exc)) from None
    except UnwantedError as exc:  # a redelivery of a kind the webhook's filter now rejects
        raise ApiError(409, str(exc)) from None
    except service.DeclaredSecretError as exc:  # the config would put its secret back
        raise ApiError(409, str(exc)) from None
    except DisabledError as exc:  # a redelivery or recovery nothing would send until enabled
        raise ApiError(409, str(exc), code=WEBHOOK_DISABLED) from None
    except LimitError as exc:  # a registration beyond webhooks.max_webhooks
        raise ApiError(409, str(exc), code=WEBHOOK_LIMIT) from None
    except GoneError as exc:  # a redelivery whose event was pruned
        raise ApiError(410, str(exc)) from None
    except service.WebhookError as exc:
        raise bad_request(str(exc)) from None
    except NotFoundError as exc:
        raise not_found(str(exc)) from None
