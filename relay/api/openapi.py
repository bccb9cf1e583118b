"""The OpenAPI 3.1 document of the admin API, served at ``/openapi.json``.

It describes exactly what :mod:`relay.api.app` and :mod:`relay.api.webhooks` serve; the limits
(lengths, ranges, enums) come from :mod:`relay.api.body` and :mod:`relay.events`, the same values
the handlers check, and the test suite fuzzes the running API against this document.
"""

from __future__ import annotations

from relay.api import body, replay, streams
from relay.api.responses import ERROR_CODES, SPECIFIC_CODES, JsonObject
from relay.events import EVENT_TYPES, RESOURCE_ID, RESOURCE_ID_SHAPE, WILDCARD, Kind

API_VERSION = "1.0.0"


def document(*, with_metrics: bool = False, metrics_public: bool = True) -> JsonObject:
    """The document; ``with_metrics`` adds ``GET /metrics`` (served only by a running relay)."""
    paths: JsonObject = {
        "/healthz": _with_head(_health()),
        "/readyz": _with_head(_ready()),
        "/openapi.json": _with_head(_openapi()),
        "/v1/webhooks": {"get": _list_webhooks(), "post": _create_webhook()},
        "/v1/webhooks/{webhook_id}": {
            "parameters": [_ref("parameters", "WebhookId")],
            "get": _show_webhook(),
            "patch": _patch_webhook(),
            "delete": _delete_webhook(),
        },
        "/v1/webhooks/{webhook_id}/rotate-secret": {
            "parameters": [_ref("parameters", "WebhookId")],
            "post": _rotate_secret(),
        },
        "/v1/webhooks/{webhook_id}/secret": {
            "parameters": [_ref("parameters", "WebhookId")],
            "get": _show_secret(),
        },
        "/v1/webhooks/{webhook_id}/deliveries": {
            "parameters": [_ref("parameters", "WebhookId")],
            "get": _list_deliveries(),
        },
        "/v1/webhooks/{webhook_id}/recover": {
            "parameters": [_ref("parameters", "WebhookId")],
            "post": _recover(),
        },
        "/v1/deliveries/{delivery_id}/redeliver": {
            "parameters": [_ref("parameters", "DeliveryId")],
            "post": _redeliver(),
        },
    }
    paths.update(_operations_paths())
    if with_metrics:
        paths["/metrics"] = _with_head(_metrics(metrics_public))
    _add_refusals(paths)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ctct-relay admin API",
            "version": API_VERSION,
            "description": (
                "Register webhooks for Constant Contact email-tracking CloudEvents, rotate their"
                " signing secrets, and inspect, redeliver and recover deliveries; see what the"
                " relay is doing (status, streams), pause and resume polling, replay events with"
                " their ids and change polled targets at run time. Every error is"
                ' JSON: {"error": {"code": ..., "message": ...}}.'
            ),
        },
        "security": [{"bearerAuth": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "admin.token from the relay config (required unless the"
                    " API listens on loopback only; without it, the API answers only requests"
                    " whose Host is a loopback address or localhost and that no other site's"
                    " web page sent: a 403 otherwise)",
                }
            },
            "schemas": {**_schemas(), **_operations_schemas()},
            "parameters": {**_parameters(), **_operations_parameters()},
            "responses": _error_responses(),
        },
    }


# -- operations ---------------------------------------------------------------------------------


def _health() -> JsonObject:
    return {
        "operationId": "healthz",
        "summary": "Liveness: the process answers",
        "security": [],
        "responses": {"200": _json("alive", _status_schema("ok"))},
    }


def _ready() -> JsonObject:
    return {
        "operationId": "readyz",
        "summary": "Readiness: the state store answers",
        "description": (
            "503 while the state store does not answer, and once it is found corrupt (the relay"
            " is then stopping, exit status 1); the message names no file or server."
        ),
        "security": [],
        "responses": {
            "200": _json("ready", _status_schema("ready")),
            "503": _ref("responses", "Unavailable"),
        },
    }


def _with_head(get: JsonObject) -> JsonObject:
    """A path served by GET and HEAD (probes of load balancers and uptime checks): HEAD answers
    what GET does, with the same status and headers and without the body."""
    responses = get["responses"]
    if not isinstance(responses, dict):
        return {"get": get}
    head: JsonObject = {
        **get,
        "operationId": f"{get['operationId']}_head",
        "summary": f"{get['summary']} (headers only)",
        "responses": {
            status: {"description": str(r.get("description", ""))} if "content" in r else r
            for status, r in responses.items()
            if isinstance(r, dict)
        },
    }
    return {"get": get, "head": head}


def _openapi() -> JsonObject:
    return {
        "operationId": "openapi",
        "summary": "This document",
        "security": [],
        "responses": {"200": _json("the OpenAPI document", {"type": "object"})},
    }


def _metrics(public: bool) -> JsonObject:
    ok: JsonObject = {
        "description": "metrics",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
    operation: JsonObject = {
        "operationId": "metrics",
        "summary": "Prometheus metrics in the text exposition format",
        "description": "Open unless admin.metrics_public is false; then it needs the token.",
        # never a 503: without the store it answers ctct_relay_store_up 0
        "responses": {"200": ok} if public else {"200": ok, **_errors(401, store=False)},
    }
    if public:
        operation["security"] = []
    return operation


def _list_webhooks() -> JsonObject:
    return {
        "operationId": "listWebhooks",
        "summary": "Every webhook, oldest first (secrets are never listed)",
        "description": "Takes no query parameters: an unknown one is a 400.",
        "responses": {"200": _json("webhooks", _schema("WebhookList")), **_errors(400, 401)},
    }


def _create_webhook() -> JsonObject:
    return {
        "operationId": "createWebhook",
        "summary": "Register a webhook; it receives events committed from now on",
        "description": "The destination must resolve to public addresses (SSRF guard) and use"
        " https unless allowlisted. A URL has at most one webhook: registering one already"
        " registered is a 409 whose error message names the webhook that has it. URLs are"
        " stored and compared with scheme and host in lower case and the scheme's default port"
        " dropped (HTTPS://Example.COM:443/h is https://example.com/h); path, query and"
        " fragment stay as written. A relay keeps at most webhooks.max_webhooks webhooks"
        " (config; 100 by default), enabled or not: registering one more is a 409 with code"
        " webhook_limit (counted in the registering transaction, so concurrent registrations"
        " cannot pass it). The answer shows the secret, as do rotation's and"
        " GET /v1/webhooks/{webhook_id}/secret.",
        "requestBody": _body("WebhookCreate"),
        "responses": {
            "201": _json("the webhook, with its secret", _schema("WebhookWithSecret")),
            **_errors(400, 401, 409, 413),
        },
    }


def _show_webhook() -> JsonObject:
    return {
        "operationId": "getWebhook",
        "summary": "One webhook (without its secret)",
        "description": "Takes no query parameters: an unknown one is a 400.",
        "responses": {
            "200": _json("the webhook", _schema("Webhook")),
            **_errors(400, 401, 404),
        },
    }


def _patch_webhook() -> JsonObject:
    return {
        "operationId": "updateWebhook",
        "summary": "Change a webhook; re-enabling clears the disabled reason and failing clock",
        "description": "Only the fields given are written, so a change never undoes what the"
        " dispatcher records meanwhile (its failing clock, a disable). Enabling a disabled"
        " webhook, or changing its url, starts its failing clock afresh and makes its pending"
        " deliveries waiting for a retry due at once, their attempt counts kept (in the same"
        " transaction). A url another webhook"
        " already has (compared as at registration) is a 409. Changing event_types drops, in"
        " the same transaction, the webhook's pending deliveries (retries included) of the"
        " types the new filter rejects, with their attempts, but for those due within a"
        " minute (one may be in flight): the worker drops those once it has let go of them;"
        " delivered and dead ones stay, and this process sends none of the rejected ones"
        " afterwards (an attempt already started finishes and is recorded; another replica"
        " may start one it had queued until its next refresh, within a second). Widening it"
        " owes nothing from the past: use recover.",
        "requestBody": _body("WebhookPatch"),
        "responses": {
            "200": _json("the webhook", _schema("Webhook")),
            **_errors(400, 401, 404, 409, 413),
        },
    }


def _delete_webhook() -> JsonObject:
    return {
        "operationId": "deleteWebhook",
        "summary": "Remove a webhook with its deliveries",
        "responses": {"204": {"description": "removed"}, **_errors(401, 404)},
    }


def _rotate_secret() -> JsonObject:
    return {
        "operationId": "rotateWebhookSecret",
        "summary": "Replace the signing secret; the old one keeps signing for the grace period",
        "description": "A webhook whose secret the config file declares (webhooks.declared[i]."
        "secret) is a 409 naming the key: its secret changes there (the next start rotates to"
        " it, the old one signing for admin.rotation_grace_s); rotated here, the next start"
        " put the config's back.",
        "requestBody": _body("RotateSecret", required=False),
        "responses": {
            "200": _json("the webhook, with its new secret", _schema("WebhookWithSecret")),
            **_errors(400, 401, 404, 409, 413),
        },
    }


def _show_secret() -> JsonObject:
    return {
        "operationId": "getWebhookSecret",
        "summary": "The webhook's current signing secret",
        "description": "For a receiver's configuration, e.g. of a webhook declared in the config"
        " file without a secret (one was generated). During a rotation's grace the previous"
        " secret also signs; previous_secret_expires_at says until when (it is not shown)."
        " Takes no query parameters: an unknown one is a 400.",
        "responses": {
            "200": _json("the secret", _schema("WebhookSecret")),
            **_errors(400, 401, 404),
        },
    }


def _list_deliveries() -> JsonObject:
    return {
        "operationId": "listDeliveries",
        "summary": "A webhook's deliveries, newest first, each with its attempts",
        "description": "One page: at most limit deliveries, newest (highest id) first. When"
        " older ones exist, next_before is the last id of the page: ask again with"
        " before=next_before (and the same status) for the next page back; null when this is"
        " the last page.",
        "parameters": [
            _ref("parameters", "DeliveryStatus"),
            _ref("parameters", "Limit"),
            _ref("parameters", "Before"),
        ],
        "responses": {
            "200": _json("deliveries", _schema("DeliveryList")),
            **_errors(400, 401, 404),
        },
    }


def _redeliver() -> JsonObject:
    return {
        "operationId": "redeliver",
        "summary": "Make a delivery pending again, due now, with a fresh attempt budget",
        "description": "Only a delivery whose event type the webhook's event_types still let"
        " through: one they reject (narrowed since) is a 409 whose error message names them"
        " (widen them with PATCH first), and one whose event was pruned is a 410. A disabled"
        " webhook's delivery is a 409 with code webhook_disabled (nothing would be sent until"
        " it is enabled: enable it with PATCH first, which makes its pending deliveries due"
        " at once).",
        "responses": {
            "202": _json("the delivery, pending", _schema("Delivery")),
            **_errors(400, 401, 404, 409, 410),
        },
    }


def _recover() -> JsonObject:
    return {
        "operationId": "recoverWebhook",
        "summary": "Owe the webhook every matching event committed since a time, again",
        "description": "A disabled webhook is a 409 with code webhook_disabled (nothing would be"
        " sent until it is enabled): enable it with PATCH first.",
        "requestBody": _body("Recover"),
        "responses": {
            "202": _json(
                "how many events are owed again, each once: one delivery per event created or"
                " reset (an event's pending delivery is reset, even when a log replay put the"
                " event in the outbox twice)",
                _schema("RecoverResult"),
            ),
            **_errors(400, 401, 404, 409, 413),
        },
    }


# -- components ---------------------------------------------------------------------------------


def _schemas() -> JsonObject:
    patterns = [*EVENT_TYPES, WILDCARD]
    event_types: JsonObject = {
        "type": "array",
        "minItems": 1,
        "maxItems": body.MAX_EVENT_TYPES,
        "items": {"type": "string", "enum": patterns},
        "description": f"exact event types, or {WILDCARD} for all; duplicates are dropped",
    }
    url: JsonObject = {"type": "string", "format": "uri", "maxLength": body.MAX_URL_CHARS}
    rate: JsonObject = {
        "type": ["number", "null"],
        "minimum": body.MIN_RATE_PER_S,
        "maximum": body.MAX_RATE_PER_S,
        "description": "requests per second to this endpoint; null: no limit",
    }
    description: JsonObject = {
        "type": "string",
        "maxLength": body.MAX_DESCRIPTION_CHARS,
        "pattern": body.NO_NUL_PATTERN,
        "description": "any text without NUL (U+0000)",
    }
    secret: JsonObject = {
        "type": "string",
        # base64 of 24 to 64 bytes: 8 to 21 groups of four characters, then none (24 to 63
        # bytes, a multiple of 3), one padded with = (26 to 62) or one padded with == (25 to 64)
        "pattern": "^whsec_(?:(?:[A-Za-z0-9+/]{4}){8,21}"
        "|(?:[A-Za-z0-9+/]{4}){8,20}[A-Za-z0-9+/]{3}="
        "|(?:[A-Za-z0-9+/]{4}){8,21}[A-Za-z0-9+/]{2}==)$",
        "maxLength": body.MAX_SECRET_CHARS,
        "description": "Standard Webhooks secret: whsec_ + base64 of 24 to 64 random bytes,"
        " without whitespace (around it or inside: a 400 naming the field, never the value)",
    }
    webhook = _webhook_schema(event_types)
    with_secret = {
        **webhook,
        "properties": {**_props(webhook), "secret": {"type": "string"}},
        "required": [*_required(webhook), "secret"],
    }
    return {
        "Error": _error_schema(),
        "Webhook": webhook,
        "WebhookWithSecret": with_secret,
        "WebhookList": _object({"webhooks": {"type": "array", "items": _schema("Webhook")}}),
        "WebhookSecret": _object(
            {
                "webhook_id": {"type": "string"},
                "secret": {"type": "string"},
                "previous_secret_expires_at": _time(nullable=True),
            }
        ),
        "WebhookCreate": _object(
            {
                "url": url,
                "event_types": event_types,
                "description": description,
                "enabled": {"type": "boolean", "default": True},
                "secret": {**secret, "description": "generated when absent"},
                "rate_limit_per_s": rate,
            },
            required=["url", "event_types"],
        ),
        "WebhookPatch": _object(
            {
                "url": url,
                "event_types": event_types,
                "description": description,
                "enabled": {"type": "boolean"},
                "rate_limit_per_s": rate,
            },
            required=[],
        ),
        "RotateSecret": _object({"secret": secret}, required=[]),
        "Recover": _object(
            {
                "since": {
                    "type": "string",
                    "format": "date-time",
                    "description": f"with an offset; within {body.TIME_RANGE}",
                }
            }
        ),
        "RecoverResult": _object({"deliveries": {"type": "integer", "minimum": 0}}),
        "Attempt": _object(
            {
                "attempted_at": _time(),
                "status_code": {"type": ["integer", "null"]},
                "latency_ms": {"type": "number", "minimum": 0},
                "response_excerpt": {"type": "string"},
                "error": {"type": ["string", "null"]},
            }
        ),
        "Delivery": _object(
            {
                "id": {"type": "integer", "minimum": 1},
                "webhook_id": {"type": "string"},
                "seq": {"type": "integer"},
                "event_id": {"type": "string"},
                "status": {"type": "string", "enum": list(body.DELIVERY_STATUSES)},
                "attempt_count": {"type": "integer", "minimum": 0},
                "next_attempt_at": _time(),
                "last_status": {"type": ["integer", "null"]},
                "last_error": {"type": ["string", "null"]},
                "created_at": _time(),
                "delivered_at": _time(nullable=True),
                "attempts": {"type": "array", "items": _schema("Attempt")},
            }
        ),
        "DeliveryList": _object(
            {
                "deliveries": {"type": "array", "items": _schema("Delivery")},
                "next_before": {
                    "type": ["integer", "null"],
                    "minimum": 1,
                    "description": "the before of the next page back; null: no older deliveries",
                },
            }
        ),
    }


def _webhook_schema(event_types: JsonObject) -> JsonObject:
    return _object(
        {
            "id": {"type": "string"},
            "url": {"type": "string"},
            "event_types": {k: v for k, v in event_types.items() if k != "description"},
            "description": {"type": "string"},
            "enabled": {"type": "boolean"},
            "rate_limit_per_s": {"type": ["number", "null"]},
            "disabled_reason": {"type": ["string", "null"]},
            "failing_since": _FAILING_SINCE,
            "previous_secret_expires_at": _time(nullable=True),
            "created_at": _time(),
            "updated_at": _time(),
        }
    )


def _error_schema() -> JsonObject:
    detail = _object(
        {
            "code": {"type": "string", "enum": sorted({*ERROR_CODES.values(), *SPECIFIC_CODES})},
            "message": {"type": "string"},
        }
    )
    return _object({"error": detail})


def _parameters() -> JsonObject:
    return {
        "WebhookId": {
            "name": "webhook_id",
            "in": "path",
            "required": True,
            "schema": {"type": "string", "minLength": 1},
        },
        "DeliveryId": {
            "name": "delivery_id",
            "in": "path",
            "required": True,
            "schema": {
                "type": "integer",
                "format": "int64",
                "minimum": 1,
                "maximum": body.MAX_DELIVERY_ID,
            },
        },
        "DeliveryStatus": {
            "name": "status",
            "in": "query",
            "required": False,
            "schema": {"type": "string", "enum": list(body.DELIVERY_STATUSES)},
        },
        "Before": {
            "name": "before",
            "in": "query",
            "required": False,
            "description": "only deliveries with a lower id (the next_before of the page before)",
            "schema": {
                "type": "integer",
                "format": "int64",
                "minimum": 1,
                "maximum": body.MAX_DELIVERY_ID,
            },
        },
        "Limit": {
            "name": "limit",
            "in": "query",
            "required": False,
            "schema": {
                "type": "integer",
                "minimum": 1,
                "maximum": body.MAX_DELIVERY_LIMIT,
                "default": body.DEFAULT_DELIVERY_LIMIT,
            },
        },
    }


_ERROR_RESPONSES = {
    400: (
        "BadRequest",
        "invalid JSON, an unknown field, a bad value, a path parameter of the wrong shape (an id"
        " out of range) or a body that does not decode as its Content-Encoding says; the"
        " message names it",
    ),
    401: ("Unauthorized", "missing or wrong bearer token"),
    404: ("NotFound", "no such webhook or delivery"),
    409: (
        "Conflict",
        "another webhook is registered for this URL (the message names it); for a"
        " registration, webhooks.max_webhooks webhooks are registered already (code"
        " webhook_limit); for a redelivery, the webhook's event_types no longer let the"
        " delivery's event type through (the message names them); or, for a redelivery or a"
        " recovery, the webhook is disabled (code webhook_disabled: enable it first); or, for"
        " a rotation, the config file declares the webhook's secret (the message names the"
        " key)",
    ),
    410: (
        "Gone",
        "the delivery's event is no longer in the outbox (pruned after outbox_retention_h)",
    ),
    403: (
        "Forbidden",
        "only without admin.token: the request's Host is not a loopback address or localhost,"
        " or its Origin or Sec-Fetch-Site says another site's web page sent it",
    ),
    413: ("PayloadTooLarge", f"body larger than {body.MAX_BODY_BYTES} bytes"),
    415: ("UnsupportedMediaType", f"a body sent without Content-Type: {body.JSON_MEDIA_TYPE}"),
    500: ("Internal", "unexpected failure (logged)"),
    503: (
        "Unavailable",
        "the state store failed or is not answering (PostgreSQL down), after at most about 10 s;"
        " a change whose message says 'nothing was changed' was not applied and may be"
        " repeated as it is",
    ),
}


def _error_responses() -> JsonObject:
    out: JsonObject = {}
    for status, (name, text) in _ERROR_RESPONSES.items():
        response: JsonObject = _json(text, _schema("Error"))
        headers: JsonObject = {
            "X-Request-Id": {
                "schema": {"type": "string"},
                "description": "the request_id of the relay's log lines about this request",
            }
        }
        if status == 401:
            headers["WWW-Authenticate"] = {"schema": {"type": "string"}, "required": True}
        response["headers"] = headers
        out[name] = response
    return out


def _add_refusals(paths: JsonObject) -> None:
    """Every operation may be refused with a 403 (a tokenless API's callers); every one that
    takes a body, with a 415 (a body that is not declared as JSON)."""
    for item in paths.values():
        if not isinstance(item, dict):
            continue
        for method, operation in item.items():
            if method not in _METHODS or not isinstance(operation, dict):
                continue
            responses = operation["responses"]
            if not isinstance(responses, dict):
                continue
            responses["403"] = _ref("responses", _ERROR_RESPONSES[403][0])
            if "requestBody" in operation:
                responses["415"] = _ref("responses", _ERROR_RESPONSES[415][0])


_METHODS = frozenset({"get", "head", "put", "post", "patch", "delete"})


def _errors(*statuses: int, store: bool = True) -> JsonObject:
    """The error responses of an operation; every /v1 operation may also fail with a 500, and
    (``store``) with a 503 while the state store fails or does not answer."""
    more = (500, 503) if store else (500,)
    return {str(s): _ref("responses", _ERROR_RESPONSES[s][0]) for s in (*statuses, *more)}


# -- helpers ------------------------------------------------------------------------------------


def _object(properties: JsonObject, required: list[str] | None = None) -> JsonObject:
    """A closed object: unknown properties are refused (requests) or never sent (responses)."""
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
        "required": list(properties) if required is None else required,
    }


def _props(schema: JsonObject) -> JsonObject:
    props = schema["properties"]
    return dict(props) if isinstance(props, dict) else {}


def _required(schema: JsonObject) -> list[str]:
    required = schema["required"]
    return [str(r) for r in required] if isinstance(required, list) else []


def _time(*, nullable: bool = False) -> JsonObject:
    return {"type": ["string", "null"] if nullable else "string", "format": "date-time"}


_FAILING_SINCE: JsonObject = {
    **_time(nullable=True),
    "description": "start of the failing clock (null: not failing); a failed attempt after a"
    " silence of over twice the longest retry wait plus timeout_s starts it again; the"
    " endpoint is disabled once it has run webhooks.disable_after_s",
}


def _status_schema(value: str) -> JsonObject:
    return _object({"status": {"type": "string", "const": value}})


def _schema(name: str) -> JsonObject:
    return _ref("schemas", name)


def _ref(kind: str, name: str) -> JsonObject:
    return {"$ref": f"#/components/{kind}/{name}"}


def _json(description: str, schema: JsonObject) -> JsonObject:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _body(name: str, *, required: bool = True) -> JsonObject:
    return {"required": required, "content": {"application/json": {"schema": _schema(name)}}}


# -- operations: status, streams, pauses, replay, targets ---------------------------------------


def _operations_paths() -> JsonObject:
    stream = [_ref("parameters", "StreamId")]
    account = [_ref("parameters", "Account")]
    return {
        "/v1/status": {"get": _op("status", "Accounts, outbox and sinks, webhooks", "Status")},
        "/v1/streams": {"get": _list_streams()},
        "/v1/dead-letters": {"get": _list_dead_letters()},
        "/v1/streams/{stream_id}": {
            "parameters": stream,
            "get": _op("getStream", "One stream", "Stream", errors=(400, 401, 404)),
        },
        "/v1/streams/{stream_id}/pause": {
            "parameters": stream,
            "post": _control("pauseStream", "Stop polling a stream until resumed", "Stream"),
        },
        "/v1/streams/{stream_id}/resume": {
            "parameters": stream,
            "post": _control("resumeStream", "Poll a paused stream again", "Stream"),
        },
        "/v1/streams/{stream_id}/replay": {
            "parameters": stream,
            "post": _replay_op("replayStream", "StreamReplay", retired=True),
        },
        "/v1/accounts/{account}/pause": {
            "parameters": account,
            "post": {
                **_control(
                    "pauseAccount",
                    "Start no pass of the account until resumed (apart from quota pauses)",
                    "AccountHold",
                ),
                "requestBody": _body("Pause", required=False),
            },
        },
        "/v1/accounts/{account}/resume": {
            "parameters": account,
            "post": _control("resumeAccount", "End an operator pause", "AccountHold"),
        },
        "/v1/accounts/{account}/replay": {
            "parameters": account,
            "post": _replay_op("replayAccount", "AccountReplay", retired=False),
        },
        "/v1/accounts/{account}/targets": {
            "parameters": account,
            "get": _op(
                "listTargets", "Polled campaigns and contacts", "Targets", errors=(400, 401, 404)
            ),
            "post": {
                "operationId": "addTargets",
                "summary": "Poll more campaigns or contacts (kept across restarts)",
                "description": (
                    "Each target is followed until removed: campaign discovery does not retire"
                    " an added campaign for its age (campaigns.max_age_days), and one it had"
                    " retired is polled again. Adding a removed target again ends its removal."
                ),
                "requestBody": _body("TargetsAdd"),
                "responses": {
                    "200": _json(
                        "nothing new: every target was polled already", _schema("TargetsAdded")
                    ),
                    "201": _json("targets created", _schema("TargetsAdded")),
                    **_errors(400, 401, 404, 413),
                },
            },
        },
        "/v1/accounts/{account}/targets/{kind}/{resource_id}": {
            "parameters": [
                *account,
                _ref("parameters", "TargetKind"),
                _ref("parameters", "ResourceId"),
            ],
            "delete": {
                "operationId": "removeTarget",
                "summary": "Stop polling a campaign or contact; discovery will not add it back",
                "responses": {"204": {"description": "removed"}, **_errors(400, 401, 404)},
            },
        },
        "/v1/sinks/{sink}": {
            "parameters": [_ref("parameters", "Sink")],
            "delete": {
                "operationId": "forgetSink",
                "summary": "Retire a sink: forget its cursor, so the outbox prune stops keeping"
                " the events it has not published",
                "description": "The outbox prune keeps every event above any stored sink cursor,"
                " whether or not the sink is configured (a sink left out of the config for a"
                " while, or of one replica, loses nothing). A sink removed for good holds the"
                " prune back until forgotten here. Configured again later, it starts from the"
                " oldest event still in the outbox. 404: no cursor stored under that name;"
                " 409: the sink is configured on the replica answering (webhooks-fanout"
                " always is).",
                "responses": {
                    "204": {"description": "forgotten"},
                    "409": _json("the sink is configured on this replica", _schema("Error")),
                    **_errors(401, 404),
                },
            },
        },
    }


def _op(op_id: str, summary: str, schema: str, errors: tuple[int, ...] = (400, 401)) -> JsonObject:
    return {
        "operationId": op_id,
        "summary": summary,
        "responses": {"200": _json(summary, _schema(schema)), **_errors(*errors)},
    }


def _control(op_id: str, summary: str, schema: str) -> JsonObject:
    return {
        "operationId": op_id,
        "summary": summary,
        "requestBody": _body("Empty", required=False),
        "responses": {"200": _json(summary, _schema(schema)), **_errors(400, 401, 404, 413)},
    }


def _list_streams() -> JsonObject:
    names = ("StreamAccount", "StreamScope", "StreamState", "Replaying", "StreamLimit", "Offset")
    return {
        "operationId": "listStreams",
        "summary": "Streams, filtered, in id order, one page at a time",
        "parameters": [_ref("parameters", n) for n in names],
        "responses": {"200": _json("streams", _schema("StreamList")), **_errors(400, 401)},
    }


def _list_dead_letters() -> JsonObject:
    return {
        "operationId": "listDeadLetters",
        "summary": "Events a sink gave up on for good, oldest first, with the broker's reason",
        "description": "Webhook deliveries that ran out of attempts are listed with their"
        " webhook (GET /v1/webhooks/{webhook_id}/deliveries?status=dead) and redelivered"
        " from there. total counts every dead letter of the sink, limit or not.",
        "parameters": [_ref("parameters", n) for n in ("DeadLetterSink", "DeadLetterLimit")],
        "responses": {
            "200": _json("dead letters", _schema("DeadLetterList")),
            **_errors(400, 401),
        },
    }


def _replay_op(op_id: str, request: str, *, retired: bool) -> JsonObject:
    extra: JsonObject = (
        {"409": _json("the stream is retired (not polled)", _schema("Error"))} if retired else {}
    )
    return {
        "operationId": op_id,
        "summary": "Send events again from a point in time, with their ids",
        "description": "source log: copies of the events committed since then go to every sink"
        " again. source upstream: the next pass re-reads the feeds from then (activity time)"
        " and re-emits what it finds. dry_run: only count.",
        "requestBody": _body(request),
        "responses": {
            "202": _json("what was (or would be) replayed", _schema("ReplayResult")),
            **extra,
            **_errors(400, 401, 404, 413),
        },
    }


def _nullable(schema: JsonObject) -> JsonObject:
    return {**schema, "type": [schema["type"], "null"]}


def _operations_schemas() -> JsonObject:
    count: JsonObject = {"type": "integer", "minimum": 0}
    seconds: JsonObject = {"type": ["number", "null"], "minimum": 0}
    ids: JsonObject = {
        "type": "array",
        "minItems": 1,
        "maxItems": streams.MAX_TARGETS,
        "items": {
            "type": "string",
            "pattern": f"^{RESOURCE_ID.pattern}$",
            "maxLength": 64,
        },
    }
    replay_fields: JsonObject = {
        "since": {
            "type": "string",
            "format": "date-time",
            "description": "with an offset; from 1970-01-01T00:00:00Z on,"
            f" within {body.TIME_RANGE}",
        },
        "source": {"type": "string", "enum": list(replay.SOURCES), "default": replay.LOG},
        "dry_run": {"type": "boolean", "default": False},
    }
    hold = _object({"since": _time(), "reason": {"type": "string"}})
    targets = _operations_targets_schema()
    dead_letter = _object(
        {
            "sink": {"type": "string", "enum": list(streams.DEAD_LETTER_SINKS)},
            "seq": {"type": "integer", "minimum": 1},
            "event_id": {"type": "string"},
            "reason": {"type": "string", "description": "the broker's error text"},
            "created_at": _time(),
        }
    )
    return {
        "DeadLetterList": _object(
            {
                "dead_letters": {"type": "array", "items": dead_letter},
                "total": count,
                "limit": {"type": "integer", "minimum": 1},
            }
        ),
        "Empty": _object({}, required=[]),
        "Pause": _object(
            {
                "reason": {
                    "type": "string",
                    "maxLength": streams.MAX_REASON_CHARS,
                    "pattern": body.NO_NUL_PATTERN,
                }
            },
            required=[],
        ),
        "AccountHold": _object({"account": {"type": "string"}, "held": _nullable(hold)}),
        "StreamReplay": _object(replay_fields, required=["since"]),
        "AccountReplay": _object(
            {
                **replay_fields,
                "campaign": {
                    "type": "string",
                    "maxLength": replay.MAX_CAMPAIGN_CHARS,
                    "pattern": f"^{RESOURCE_ID.pattern}$",
                    "description": RESOURCE_ID_SHAPE,
                },
            },
            required=["since"],
        ),
        "ReplayResult": _object(
            {
                "source": {"type": "string", "enum": list(replay.SOURCES)},
                "since": _time(),
                "dry_run": {"type": "boolean"},
                "events": count,
                "first_seq": {"type": ["integer", "null"]},
                "last_seq": {"type": ["integer", "null"]},
                "streams": {"type": ["integer", "null"], "minimum": 0},
            }
        ),
        "Targets": targets,
        "TargetsAdd": {
            **_object({"campaigns": ids, "contacts": ids}, required=[]),
            "minProperties": 1,
        },
        "TargetsAdded": _object({**_props(targets), "created": count}),
        "Feed": _object({"watermark": _time(), "lag_s": seconds}),
        "Stream": _object(
            {
                "id": {"type": "integer", "minimum": 1},
                "account": {"type": "string"},
                "scope": {"type": "string", "enum": list(streams.SCOPES)},
                "resource_id": {"type": "string"},
                "state": {"type": "string", "enum": list(streams.STREAM_STATES)},
                "paused": {"type": "boolean"},
                "retired": {"type": "boolean"},
                "replay_from": _time(nullable=True),
                "feeds": {
                    "type": "object",
                    "propertyNames": {"enum": [k.value for k in Kind]},
                    "additionalProperties": _schema("Feed"),
                },
                "lag_s": seconds,
                "rate_per_h": {"type": "number", "minimum": 0},
                "last_poll_at": _time(nullable=True),
                "next_poll_at": _time(),
                "interval_s": seconds,
                "consecutive_errors": count,
                "last_error": {"type": ["string", "null"]},
            }
        ),
        "StreamList": _object(
            {
                "streams": {"type": "array", "items": _schema("Stream")},
                "total": count,
                "limit": {"type": "integer", "minimum": 1},
                "offset": count,
            }
        ),
        "Status": _status_schema_full(count, seconds, hold),
    }


def _operations_targets_schema() -> JsonObject:
    return _object(
        {
            "account": {"type": "string"},
            "campaigns": {"type": "array", "items": {"type": "string"}},
            "contacts": {"type": "array", "items": {"type": "string"}},
            "removed": {
                "type": "array",
                "items": _object(
                    {
                        "scope": {"type": "string", "enum": list(streams.SCOPES)},
                        "resource_id": {"type": "string"},
                    }
                ),
            },
        }
    )


def _status_schema_full(count: JsonObject, seconds: JsonObject, hold: JsonObject) -> JsonObject:
    account = _object(
        {
            "name": {"type": "string"},
            "configured": {"type": "boolean"},
            "quota": _object(
                {
                    "used_today": count,
                    "allowance": {"type": ["integer", "null"], "minimum": 0},
                    "left_today": {"type": ["integer", "null"], "minimum": 0},
                    "budget": {
                        "type": ["string", "null"],
                        "description": "The api_key's budget (key:<12 hex>, an HMAC under the"
                        " state store's salt: nothing of the key); null when the account is not"
                        " configured here",
                    },
                    "shared_with": {
                        "type": "array",
                        "items": {"type": "string"},
                        "description": "Other accounts using the same api_key: the quota"
                        " numbers are the key's, spent by all of them",
                    },
                }
            ),
            "paused": _nullable(_object({"until": _time(), "reason": {"type": "string"}})),
            "circuit": {
                **_nullable(
                    _object(
                        {
                            "state": {"type": "string", "enum": ["closed", "open", "half_open"]},
                            "consecutive_failures": count,
                            "probe_at": _time(nullable=True),
                            "last_error": {"type": ["string", "null"]},
                        }
                    )
                ),
                "description": "The circuit breaker of the account's api_key in the process"
                " answering (a 5xx or no answer on http.breaker_failures requests in a row opens"
                " it: the key pauses until probe_at, when one request probes); null when the"
                " account is not configured there",
            },
            "held": _nullable(hold),
            "streams": _object(
                {k: count for k in ("total", "active", "paused", "retired", "failing", "replaying")}
            ),
            "max_lag_s": seconds,
        }
    )
    sink = _object(
        {
            "name": {"type": "string"},
            "cursor": count,
            "depth": count,
            "dead_letters": count,
            "running": {
                "type": "boolean",
                "description": "configured on the replica answering; the stored cursor of a sink"
                " configured nowhere still holds the outbox prune back until the sink is"
                " forgotten (DELETE /v1/sinks/{sink})",
            },
            # the Kafka sink on the replica publishing to Kafka; null elsewhere
            "connected": {"type": ["boolean", "null"]},
            "last_error": {"type": ["string", "null"]},
        }
    )
    webhook = _object(
        {
            "id": {"type": "string"},
            "url": {
                "type": "string",
                "description": "without user info or fragment, every query value as ***"
                " (the keys stay: ?token=***)",
            },
            "enabled": {"type": "boolean"},
            "disabled_reason": {"type": ["string", "null"]},
            "failing_since": _FAILING_SINCE,
            "pending": count,
            "dead_letters": count,
            "oldest_pending_seq": {"type": ["integer", "null"]},
        }
    )
    return _object(
        {
            "time": _time(),
            "accounts": {"type": "array", "items": account},
            "outbox": _object({"head": count}),
            "sinks": {"type": "array", "items": sink},
            "webhooks": {"type": "array", "items": webhook},
        }
    )


def _operations_parameters() -> JsonObject:
    def query(name: str, schema: JsonObject) -> JsonObject:
        return {"name": name, "in": "query", "required": False, "schema": schema}

    def path(name: str, schema: JsonObject) -> JsonObject:
        return {"name": name, "in": "path", "required": True, "schema": schema}

    return {
        "StreamId": path(
            "stream_id",
            {"type": "integer", "format": "int64", "minimum": 1, "maximum": streams.MAX_STREAM_ID},
        ),
        "Account": path(
            "account", {"type": "string", "pattern": f"^{streams.ACCOUNT_NAME.pattern}$"}
        ),
        "Sink": path(
            "sink",
            {
                "type": "string",
                "pattern": f"^{streams.ACCOUNT_NAME.pattern}$",
                "description": "a sink name as GET /v1/status lists it (kafka)",
            },
        ),
        "TargetKind": path("kind", {"type": "string", "enum": list(streams.TARGET_KINDS)}),
        "ResourceId": path(
            "resource_id",
            {
                "type": "string",
                "pattern": f"^{RESOURCE_ID.pattern}$",
                "description": RESOURCE_ID_SHAPE,
            },
        ),
        "StreamAccount": query(
            "account", {"type": "string", "pattern": f"^{streams.ACCOUNT_NAME.pattern}$"}
        ),
        "StreamScope": query("scope", {"type": "string", "enum": list(streams.SCOPES)}),
        "StreamState": query("state", {"type": "string", "enum": list(streams.STREAM_STATES)}),
        "Replaying": query("replaying", {"type": "string", "enum": ["true", "false"]}),
        "StreamLimit": query(
            "limit",
            {
                "type": "integer",
                "minimum": 1,
                "maximum": streams.MAX_STREAM_LIMIT,
                "default": streams.DEFAULT_STREAM_LIMIT,
            },
        ),
        "Offset": query("offset", {"type": "integer", "minimum": 0, "maximum": streams.MAX_OFFSET}),
        "DeadLetterSink": query(
            "sink",
            {
                "type": "string",
                "enum": list(streams.DEAD_LETTER_SINKS),
                "default": streams.DEAD_LETTER_SINKS[0],
            },
        ),
        "DeadLetterLimit": query(
            "limit",
            {
                "type": "integer",
                "minimum": 1,
                "maximum": streams.MAX_DEAD_LETTER_LIMIT,
                "default": streams.DEFAULT_DEAD_LETTER_LIMIT,
            },
        ),
    }
