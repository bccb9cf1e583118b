"""Errors of the Constant Contact upstream, one class per thing a caller decides differently on.

    CtctError                      retriable? what the caller does
    ├── TransportError             yes        connection refused, DNS, reset, timeout: back off
    │   └── ResponseTimeoutError   yes        connected, but no answer in time: a slow query
    ├── InvalidRequestError        no         aiohttp refused to build the request (a control
    │                                     character in a credential, a host IDNA refuses): fix
    │                                     the config
    ├── MalformedResponseError     yes        a 2xx whose body is not the JSON we expect
    ├── PaginationLoopError        no         a next_link repeated, kept coming with pages
    │                                     bringing no new record, or outran the summary
    │                                     count: stop reading the feed, report
    ├── BudgetExhaustedError       no         our own daily allowance is spent: wait for resume_at
    ├── KeyPausedError             no         the api_key is held (a long Retry-After, a pause
    │   │                                 the scheduler stored) until resume_at: not sent
    │   └── CircuitOpenError       no         the key's circuit breaker is open (an outage):
    │                                     not sent; one probe at a time (ctct/breaker.py)
    └── ResponseError                         the API answered with an error status
        ├── BadRequestError        no  400    a parameter was rejected (bug or bad config)
        ├── UnauthorizedError      no  401    credentials are wrong: stop polling the account
        ├── ForbiddenError         no  403    any other 403
        ├── OverQpsError           yes 403    mashery.not.authorized.over.qps: back off
        ├── QuotaExhaustedError    no  403    mashery.not.authorized.over.ratelimit: pause
        │                                     the account until resume_at (00:00 UTC)
        ├── NotFoundError          no  404    the contact or campaign is gone: retire the stream
        ├── NotAcceptableError     no  406    the Accept header was refused
        ├── TooManyRequestsError   yes 429    honour retry_after_s
        └── ServerError            yes 5xx    back off

``sent`` is False on an error whose request provably never left (a connection refused, a DNS
failure, a connect timeout, a request aiohttp could not build): the client gives its budget back.

Every message is safe to log: URLs in it are redacted (no api_key, no token).
"""

from __future__ import annotations

from datetime import datetime


class CtctError(Exception):
    """Base of every upstream error; ``retriable``: the same request may succeed later."""

    retriable = False

    def __init__(
        self,
        message: str,
        *,
        endpoint: str | None = None,
        status: int | None = None,
        error_key: str | None = None,
        retry_after_s: float | None = None,
        sent: bool = True,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.endpoint = endpoint
        self.status = status
        self.error_key = error_key
        self.retry_after_s = retry_after_s
        # False only when the request provably never left this process (no connection was
        # made, or it could not be built): the API counted nothing, so neither does the quota
        self.sent = sent

    def __str__(self) -> str:
        return f"{self.endpoint}: {self.message}" if self.endpoint else self.message


class TransportError(CtctError):
    """The request did not get an HTTP answer (connection, DNS, reset, timeout)."""

    retriable = True


class ResponseTimeoutError(TransportError):
    """A connection was made and the request sent, but no whole answer came within the timeout
    (a slow query upstream). A connection that could not be made in time is a plain
    :class:`TransportError`."""


class InvalidRequestError(CtctError):
    """The request could not be built: aiohttp refused a header value (a control character in
    the access token) or the host name (IDNA). The same request will fail again."""


class MalformedResponseError(CtctError):
    """A success status with a body that is not the JSON the endpoint documents."""

    retriable = True


class PaginationLoopError(CtctError):
    """The API sent a next_link it had already sent in this read, kept sending new ones on
    pages that bring no record the read had not already returned (``client.MAX_EMPTY_PAGES``
    in a row), or kept sending them past the pages the feed's summary count implies (the
    poller's bound)."""


class BudgetExhaustedError(CtctError):
    """The account's own daily allowance (quota minus the reserved share) is spent."""

    def __init__(self, message: str, *, resume_at: datetime) -> None:
        super().__init__(message)
        self.resume_at = resume_at


class KeyPausedError(CtctError):
    """The api_key may not send before ``resume_at`` (a long Retry-After, a pause of the key);
    the request was not sent, so a pass stops here and keeps what it read."""

    def __init__(self, message: str, *, resume_at: datetime) -> None:
        super().__init__(message, sent=False)
        self.resume_at = resume_at


class CircuitOpenError(KeyPausedError):
    """The api_key's circuit breaker is open after requests in a row met an outage (5xx, no
    answer); ``resume_at``: when a probe may go (now, when one is already out)."""


class ResponseError(CtctError):
    """The API answered with an error status and (usually) its JSON error array."""


class BadRequestError(ResponseError):
    """400: the API rejected a parameter."""


class UnauthorizedError(ResponseError):
    """401: the api_key or access token is not valid; polling the account cannot succeed."""


class ForbiddenError(ResponseError):
    """403 for a reason other than the rate limits."""


class OverQpsError(ResponseError):
    """403 mashery.not.authorized.over.qps: too many requests this second."""

    retriable = True


class QuotaExhaustedError(ResponseError):
    """403 mashery.not.authorized.over.ratelimit: the key's daily quota is spent."""

    def __init__(
        self,
        message: str,
        *,
        resume_at: datetime,
        endpoint: str | None = None,
        status: int | None = None,
        error_key: str | None = None,
    ) -> None:
        super().__init__(message, endpoint=endpoint, status=status, error_key=error_key)
        self.resume_at = resume_at


class NotFoundError(ResponseError):
    """404: the contact, campaign or link does not exist (any more)."""


class NotAcceptableError(ResponseError):
    """406: the API cannot answer in the requested media type."""


class TooManyRequestsError(ResponseError):
    """429: slow down; ``retry_after_s`` carries the Retry-After header when sent."""

    retriable = True


class ServerError(ResponseError):
    """5xx: the API failed; usually passing."""

    retriable = True
