"""When a failed attempt is tried again: the schedule with jitter, and Retry-After on 429/503
(delay-seconds or an HTTP-date), which may lengthen a wait but never shorten it. No network."""

from __future__ import annotations

import email.utils
from dataclasses import dataclass, field

import aiohttp
import pytest

from relay.sinks import webhooks
from relay.sinks.ssrf import Guard
from relay.sinks.webhooks import DeliverySettings, Outcome, WebhookDispatcher
from relay.store import DueSend, Webhook

SCHEDULE = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)


def dispatcher(jitter: float = 0.0) -> WebhookDispatcher:
    settings = DeliverySettings(retry_schedule_s=SCHEDULE, jitter=jitter, max_retry_after_s=3600)
    return WebhookDispatcher(None, settings, Guard())  # type: ignore[arg-type]


def refused(retry_after_s: float | None) -> Outcome:
    return Outcome(503, 1.0, "", None, retry_after_s)


def test_a_short_retry_after_never_cuts_the_schedule_short() -> None:
    """Retry-After: 1 on every attempt: the waits are still the schedule's (it used to cap every
    wait at max_retry_after_s, dead-lettering after 4.6 h instead of 27.6 h)."""
    d = dispatcher()
    waits = [d._retry_delay_s(n, refused(1.0)) for n in range(1, len(SCHEDULE) + 2)]
    assert waits == [*SCHEDULE, None]


def test_a_long_retry_after_lengthens_a_wait_up_to_the_bound() -> None:
    d = dispatcher()
    assert d._retry_delay_s(1, refused(120.0)) == 120.0
    assert d._retry_delay_s(1, refused(86400.0)) == 3600.0  # max_retry_after_s
    assert d._retry_delay_s(4, refused(86400.0)) == 7200.0  # the schedule is longer still


def test_jitter_never_brings_a_retry_before_the_time_asked_for() -> None:
    d = dispatcher(jitter=0.5)
    waits = [d._retry_delay_s(1, refused(60.0)) for _ in range(200)]
    assert min(waits) >= 60.0  # type: ignore[operator]
    plain = [d._retry_delay_s(2, refused(None)) for _ in range(200)]
    assert 150.0 <= min(plain) < max(plain) <= 450.0


def test_deliveries_told_the_same_retry_after_come_back_spread_out() -> None:
    """A rate-limited endpoint answers a backlog 429 with the same Retry-After: the retries are
    spread by the jitter above that time (never before it, at most ``jitter`` later), not all
    due at one instant, which met the endpoint with the whole backlog at once again. (The
    Retry-After replaced the jittered wait: every one of them came back at the same moment.)"""
    d = dispatcher(jitter=0.1)
    waits = [d._retry_delay_s(1, refused(120.0)) for _ in range(200)]
    assert all(120.0 <= w <= 132.0 for w in waits)  # type: ignore[operator]
    assert len(set(waits)) > 100
    capped = [d._retry_delay_s(1, refused(86400.0)) for _ in range(200)]
    assert all(3600.0 <= w <= 3960.0 for w in capped)  # type: ignore[operator]
    assert len(set(capped)) > 100
    # the longest silence of a failing endpoint allows for the jitter above the bound too
    short = DeliverySettings(retry_schedule_s=(5.0,), jitter=0.1, max_retry_after_s=3600)
    assert short.quiet_s == pytest.approx(3960.0 + short.timeout_s + short.refresh_s)


@dataclass
class Answer:
    """What _retry_after reads of a response: its headers."""

    headers: dict[str, str] = field(default_factory=dict)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        pytest.param("120", 120.0, id="delay-seconds"),
        pytest.param(email.utils.formatdate(1_800_000_030, usegmt=True), 30.0, id="http-date"),
        pytest.param(email.utils.formatdate(1_799_999_000, usegmt=True), 0.0, id="date-passed"),
        pytest.param("soon", None, id="garbage"),
        pytest.param("-5", None, id="negative"),
        pytest.param("", None, id="empty"),
        pytest.param("\u00b2", None, id="superscript-digit"),  # isdigit() says yes, float() no
        pytest.param("\u0661\u0662", None, id="arabic-indic-digits"),
        pytest.param("Sun, 06 Nov 99999999999 08:49:37 GMT", None, id="year-overflows-c-int"),
        pytest.param("Sun, 06 Nov 10000 08:49:37 GMT", None, id="year-beyond-9999"),
    ],
)
def test_retry_after_reads_seconds_and_http_dates(value: str, seconds: float | None) -> None:
    answer = Answer({"Retry-After": value})
    assert webhooks._retry_after(answer, 1_800_000_000.0) == seconds  # type: ignore[arg-type]


class TimingOut:
    """A session whose connect times out (aiohttp's sock_connect timeout)."""

    def post(self, *args: object, **kwargs: object) -> object:
        raise aiohttp.ConnectionTimeoutError("Connection timeout to host")


async def test_a_connect_timeout_is_reported_as_such_with_its_own_limit() -> None:
    settings = DeliverySettings(timeout_s=15.0, connect_timeout_s=2.5)
    d = WebhookDispatcher(None, settings, Guard())  # type: ignore[arg-type]
    hook = Webhook(
        "wh_1", "https://hooks.example.com/x", ("com.constantcontact.email.*",), "whsec_" + "A" * 32
    )
    due = DueSend(1, 0, "id-1", 0, b"{}", "open", 0)
    outcome = await d._attempt(TimingOut(), hook, due)  # type: ignore[arg-type]
    assert outcome.error == "connect timed out after 2.5s"
