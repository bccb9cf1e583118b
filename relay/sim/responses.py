"""JSON answers of the simulator, and the API's error array.

Every /v2 error is ``[{"error_key": …, "error_message": …}]`` with its status, as the real API
answers; handlers raise :class:`ApiError` and the gate turns it into that body.
"""

from __future__ import annotations

import math

import orjson
from aiohttp import web

JSON = "application/json"


class ApiError(Exception):
    """An error answer of the /v2 API."""

    def __init__(
        self, status: int, error_key: str, message: str, *, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_key = error_key
        self.message = message
        self.retry_after_s = retry_after_s

    def response(self) -> web.Response:
        """The error as the API sends it."""
        return error_response(
            self.status, self.error_key, self.message, retry_after_s=self.retry_after_s
        )


def bad_param(message: str) -> ApiError:
    """A 400 for a rejected query parameter; the message names it."""
    return ApiError(400, "query.param.invalid", message)


def not_found(message: str) -> ApiError:
    """A 404 for an unknown contact, campaign or link."""
    return ApiError(404, "http.status.not_found", message)


def json_response(body: object, status: int = 200) -> web.Response:
    """``body`` serialized with orjson."""
    return web.Response(status=status, body=orjson.dumps(body), content_type=JSON)


def error_response(
    status: int, error_key: str, message: str, *, retry_after_s: float | None = None
) -> web.Response:
    """The API's error array; ``Retry-After`` in whole seconds when given."""
    response = json_response([{"error_key": error_key, "error_message": message}], status)
    if retry_after_s is not None:
        response.headers["Retry-After"] = str(math.ceil(retry_after_s))
    return response
