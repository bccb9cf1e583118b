"""JSON responses of the admin API and :class:`ApiError`, the one exception its handlers raise.

Every answer the API gives is JSON, errors included: ``{"error": {"code": …, "message": …}}``,
where ``code`` is a stable machine-readable word and ``message`` a sentence a user can act on
(starting with the field it is about, when there is one).
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from aiohttp import web

JsonObject = dict[str, object]

# status -> the stable error code clients can switch on
ERROR_CODES: Mapping[int, str] = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    410: "gone",
    413: "payload_too_large",
    415: "unsupported_media_type",
    500: "internal",
    503: "unavailable",
}
# codes more specific than their status's, for errors a client may want to tell apart
WEBHOOK_LIMIT = "webhook_limit"  # 409: webhooks.max_webhooks webhooks are registered already
WEBHOOK_DISABLED = "webhook_disabled"  # 409: a redelivery or recovery for a disabled webhook
SPECIFIC_CODES = (WEBHOOK_LIMIT, WEBHOOK_DISABLED)


class ApiError(Exception):
    """A request the API answers with an error status; the message is shown to the client."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or ERROR_CODES.get(status, "error")
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        """The JSON error response."""
        return error_response(self.status, self.message, code=self.code, headers=self.headers)


def bad_request(message: str) -> ApiError:
    """A 400 whose message names the offending field."""
    return ApiError(400, message)


def not_found(message: str) -> ApiError:
    """A 404 for an unknown webhook, delivery or route."""
    return ApiError(404, message)


def json_response(body: object, status: int = 200) -> web.Response:
    """``body`` serialized with orjson, as ``application/json``."""
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", charset="utf-8"
    )


def error_response(
    status: int,
    message: str,
    *,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """The error body every failure uses."""
    response = json_response(
        {"error": {"code": code or ERROR_CODES.get(status, "error"), "message": message}}, status
    )
    response.headers.update(headers or {})
    return response
