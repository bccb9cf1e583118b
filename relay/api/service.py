"""Webhook registration: the rules for creating, changing and re-keying webhooks, without HTTP.

The admin API's handlers and the config file's declared webhooks (:func:`upsert_declared`) both go
through here, so one set of rules applies: destinations pass the SSRF guard when they are
registered, event types are known ones or the wildcard, secrets are valid ``whsec_`` secrets, and
one URL has at most one webhook (declared webhooks are matched by URL). URLs are stored in the
form :func:`normalized_url` gives and compared in it, so ``https://Example.COM:443/h`` and
``https://example.com/h`` are one endpoint, also against rows stored before URLs were normalised.

A webhook is disabled by the dispatcher (410 Gone, failing too long), by an operator through the
API or by the config file; each leaves its own ``disabled_reason``. A restart never silently
re-enables a webhook the dispatcher or an operator disabled: only the config file undoes its own.
"""

from __future__ import annotations

import dataclasses
import enum
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import structlog
import yarl

from relay.api import body
from relay.events import check_type_pattern
from relay.sinks import signing
from relay.sinks.ssrf import Guard, SsrfError, shown
from relay.store import DuplicateError, LimitError, Store, Webhook

log = structlog.get_logger(__name__)

ID_PREFIX = "wh_"
DISABLED_BY_API = "disabled through the admin API"
DISABLED_BY_CONFIG = "disabled in the config file"
_DEFAULT_PORTS = {"http": 80, "https": 443}


class WebhookError(ValueError):
    """A webhook definition the relay refuses; the message starts with the field it is about."""


class DeclaredSecretError(Exception):
    """A change through the API to a secret the config file declares: the next start would put
    the config's back, so it is refused; the message names the config key to change instead."""


DEFAULT_GRACE_S = 86400.0  # admin.rotation_grace_s's default


@dataclass(frozen=True)
class DeclaredWebhook:
    """A webhook as declared: by the config file, or by the body of a registration request."""

    url: str
    event_types: tuple[str, ...]
    description: str = ""
    enabled: bool = True
    secret: str | None = field(default=None, repr=False)  # None: generate one
    rate_limit_per_s: float | None = None


class Keep(enum.Enum):
    """Marks a field a change leaves as it is (where None is a value: "no rate limit")."""

    KEEP = "keep"


KEEP = Keep.KEEP


@dataclass(frozen=True)
class WebhookChanges:
    """What a PATCH changes; None (or KEEP) leaves a field as it is."""

    url: str | None = None
    event_types: tuple[str, ...] | None = None
    description: str | None = None
    enabled: bool | None = None
    rate_limit_per_s: float | Keep | None = KEEP


def new_webhook_id() -> str:
    """``wh_`` and 16 random hex digits."""
    return ID_PREFIX + secrets.token_hex(8)


def check_event_types(patterns: Iterable[str]) -> tuple[str, ...]:
    """Known types or the wildcard, at least one, duplicates dropped (first one kept)."""
    out: list[str] = []
    for index, pattern in enumerate(patterns):
        try:
            check_type_pattern(pattern)
        except ValueError as exc:
            raise WebhookError(f"event_types[{index}]: {exc}") from None
        if pattern not in out:
            out.append(pattern)
    if not out:
        raise WebhookError("event_types: at least one is required")
    return tuple(out)


def check_secret(secret: str) -> str:
    """A valid ``whsec_`` secret (the message never contains it)."""
    try:
        signing.secret_key(secret)
    except signing.SecretError as exc:
        raise WebhookError(str(exc)) from None
    return secret


def check_rate(rate: float | None) -> float | None:
    """None (no limit) or a rate in [MIN_RATE_PER_S, MAX_RATE_PER_S]."""
    if rate is not None and not body.MIN_RATE_PER_S <= rate <= body.MAX_RATE_PER_S:
        raise WebhookError(f"rate_limit_per_s: {body.RATE_RANGE}")
    return rate


def check_description(text: str) -> str:
    """At most MAX_DESCRIPTION_CHARS characters."""
    if len(text) > body.MAX_DESCRIPTION_CHARS:
        raise WebhookError(f"description: longer than {body.MAX_DESCRIPTION_CHARS} characters")
    return text


async def check_url(guard: Guard, url: str) -> str:
    """An absolute http(s) URL of a destination the SSRF guard allows (resolves the host), in
    the form it is stored in (:func:`normalized_url`)."""
    if len(url) > body.MAX_URL_CHARS:
        raise WebhookError(f"url: longer than {body.MAX_URL_CHARS} characters")
    if not _uri_characters(url):
        raise WebhookError("url: must be printable ASCII without spaces (percent-encode the rest)")
    _check_one_host(url)
    try:
        port = urlsplit(url).port
    except ValueError:
        port = None  # out of range: the guard names it
    if port == 0:
        raise WebhookError("url: port 0 cannot be connected to")
    url = normalized_url(url)
    try:
        await guard.check_url(url)
    except SsrfError as exc:
        raise WebhookError(str(exc)) from None
    return url


def _check_one_host(url: str) -> None:
    """Refuse a URL whose host depends on who parses it: the guard checks one reading (urlsplit),
    the delivery connects to another (yarl), a receiver's proxy may use a third (WHATWG reads
    ``https://127.0.0.1\\@example.com/`` as host 127.0.0.1, urlsplit as example.com)."""
    if "\\" in url:
        raise WebhookError(
            "url: must not contain a backslash: URL parsers disagree on its meaning"
            " (percent-encode it as %5C)"
        )
    try:
        ours: str | None = urlsplit(url).hostname
    except ValueError:
        return  # the guard names what is wrong with it
    try:
        theirs = yarl.URL(url).host
    except ValueError:
        theirs = None
    if ours is not None and theirs is not None and ours != theirs.lower():
        raise WebhookError(
            f"url: its host reads as {ours!r} or {theirs!r} depending on the parser; refused"
        )
    if ours is not None and theirs is None:
        raise WebhookError(f"url: its host {ours!r} cannot be connected to (not a valid URL)")


def normalized_url(url: str) -> str:
    """A webhook URL as stored and compared: scheme and host in lower case (RFC 3986 says they
    are case-insensitive) and the scheme's default port dropped, so that one endpoint cannot be
    registered twice under different spellings. User info, path, query and fragment stay as
    written: they are the endpoint's to interpret. A URL that does not parse comes back as
    given, for :func:`check_url` to refuse."""
    if not _uri_characters(url):
        return url
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return url
    host = parts.hostname  # lower case already; an IPv6 literal without its brackets
    if not parts.netloc or host is None or not url.lower().startswith(f"{parts.scheme}://"):
        return url
    user_info, at, _ = parts.netloc.rpartition("@")
    netloc = f"{user_info}{at}[{host}]" if ":" in host else f"{user_info}{at}{host}"
    if port is not None and port != _DEFAULT_PORTS.get(parts.scheme):
        netloc += f":{port}"
    rest = url[len(parts.scheme) + 3 + len(parts.netloc) :]  # urlsplit keeps netloc as written
    return f"{parts.scheme}://{netloc}{rest}"


def _uri_characters(url: str) -> bool:
    # RFC 3986: a URI is printable ASCII without spaces; IRIs must be sent percent-encoded
    return url.isascii() and url.isprintable() and " " not in url


async def _check_unregistered(store: Store, url: str, webhook_id: str | None = None) -> None:
    """DuplicateError when another webhook has ``url`` in another spelling: one stored before
    URLs were normalised (the store's unique index catches the same spelling, races included)."""
    for hook in await store.webhooks():
        if hook.id != webhook_id and hook.url != url and normalized_url(hook.url) == url:
            raise DuplicateError(f"url: already registered as webhook {hook.id}")


async def create_webhook(
    store: Store,
    guard: Guard,
    spec: DeclaredWebhook,
    now_ms: int,
    max_webhooks: int | None = None,
) -> Webhook:
    """Register a webhook; it receives events committed from now on. Raises WebhookError, the
    store's DuplicateError when the URL is already registered, or its LimitError when
    ``max_webhooks`` are registered already."""
    webhook = await _new_webhook(guard, spec, now_ms, DISABLED_BY_API)
    await _check_unregistered(store, webhook.url)
    created = await store.create_webhook(webhook, max_webhooks)
    log.info("webhook.created", webhook=created.id, host=_host(created.url))
    return created


async def update_webhook(
    store: Store, guard: Guard, webhook_id: str, changes: WebhookChanges, now_ms: int
) -> Webhook:
    """Apply a PATCH, writing only the fields it changes. Raises NotFoundError, WebhookError or
    DuplicateError (the new URL is taken)."""
    current = await store.webhook(webhook_id)
    updated = current
    if changes.url is not None:
        updated = dataclasses.replace(updated, url=await check_url(guard, changes.url))
        if updated.url != current.url:
            await _check_unregistered(store, updated.url, webhook_id)
    if changes.event_types is not None:
        updated = dataclasses.replace(updated, event_types=check_event_types(changes.event_types))
    if changes.description is not None:
        updated = dataclasses.replace(updated, description=check_description(changes.description))
    if changes.rate_limit_per_s is not KEEP:
        updated = dataclasses.replace(
            updated, rate_limit_per_s=check_rate(changes.rate_limit_per_s)
        )
    if changes.enabled is not None:
        updated = _set_enabled(updated, changes.enabled, DISABLED_BY_API)
    if updated.url != current.url:
        # a new destination: the old one's failures are not its own (its clock near
        # disable_after_s, one failure here disabled the webhook at once); the store makes the
        # retries the old one earned due now in the same write
        updated = _fresh_clock(updated)
    if updated == current:
        return current
    updated = dataclasses.replace(updated, updated_ms=now_ms)
    await store.update_webhook(updated, _written(current, updated))
    log.info("webhook.updated", webhook=webhook_id, enabled=updated.enabled)
    return updated


async def rotate_secret(
    store: Store,
    webhook_id: str,
    now_ms: int,
    grace_s: float,
    secret: str | None = None,
    declared_secrets: Mapping[str, str] | None = None,
) -> Webhook:
    """Replace the secret; the old one keeps signing for ``grace_s`` so receivers can switch.
    ``declared_secrets`` (:func:`declared_secrets`): a webhook whose secret the config file
    declares is refused with DeclaredSecretError naming the key (the next start put the
    config's secret back, and receivers that had switched rejected everything)."""
    current = await store.webhook(webhook_id)
    where = (declared_secrets or {}).get(normalized_url(current.url))
    if where is not None:
        raise DeclaredSecretError(
            f"secret: webhook {webhook_id}'s secret is declared in the config file ({where}):"
            " change it there; the next start rotates to it, the old one signing for"
            " admin.rotation_grace_s"
        )
    new = check_secret(secret) if secret is not None else signing.generate_secret()
    if new == current.secret:
        raise WebhookError("secret: the new secret must differ from the current one")
    rotated = _rotated(current, new, now_ms, grace_s)
    await store.update_webhook(rotated, changed_fields(current, rotated))
    log.info("webhook.secret_rotated", webhook=webhook_id, grace_s=grace_s)
    return rotated


def _rotated(current: Webhook, new: str, now_ms: int, grace_s: float) -> Webhook:
    grace_ms = int(grace_s * 1000)
    return dataclasses.replace(
        current,
        secret=new,
        previous_secret=current.secret if grace_ms > 0 else None,
        previous_expires_ms=now_ms + grace_ms if grace_ms > 0 else None,
        updated_ms=now_ms,
    )


def declared_secrets(declared: Sequence[DeclaredWebhook], key: str) -> dict[str, str]:
    """The normalised URLs of the declared webhooks that have a ``secret``, each with its config
    key (``webhooks.declared[2].secret``): those whose secret only the config file changes."""
    return {
        normalized_url(spec.url): f"{key}[{index}].secret"
        for index, spec in enumerate(declared)
        if spec.secret is not None
    }


async def upsert_declared(
    store: Store,
    guard: Guard,
    declared: Sequence[DeclaredWebhook],
    now_ms: int,
    key: str = "webhooks",
    max_webhooks: int | None = None,
    grace_s: float = DEFAULT_GRACE_S,
) -> list[Webhook]:
    """Create or update the config file's webhooks, matched by normalised URL; idempotent.

    Everything is validated before anything is written; errors name the entry under ``key``,
    the config key of the list (``webhooks[1].url: …``). A declared secret that differs from the
    stored one is rotated to, the stored one signing too for ``grace_s`` (receivers given the
    new one and those still on the old one both verify); without one the stored secret stays
    (a new webhook gets a generated one). Webhooks registered through the API and not declared
    are left alone. Two replicas starting together may both try to create one: the store's
    unique URL lets one win and the other updates it. A new one beyond ``max_webhooks``
    registered (those registered through the API count too) is a WebhookError naming the entry.
    Returns the webhooks in declaration order.
    """
    stored: dict[str, Webhook] = {}
    for hook in await store.webhooks():
        stored.setdefault(normalized_url(hook.url), hook)  # rows of before are matched too
    wanted: list[tuple[int, DeclaredWebhook]] = []
    seen: set[str] = set()
    for index, given in enumerate(declared):
        spec = dataclasses.replace(given, url=normalized_url(given.url))
        try:
            if spec.url in seen:
                raise WebhookError(f"url: {shown(spec.url)!r} is declared twice")
            seen.add(spec.url)
            _check_spec(spec)
            if spec.url not in stored:
                await check_url(guard, spec.url)
        except WebhookError as exc:
            raise WebhookError(f"{key}[{index}].{exc}") from None
        wanted.append((index, spec))
    out: list[Webhook] = []
    for index, spec in wanted:
        existing = stored.get(spec.url)
        if existing is None:
            try:
                created = await store.create_webhook(
                    await _new_webhook(guard, spec, now_ms, DISABLED_BY_CONFIG, checked=True),
                    max_webhooks,
                )
            except LimitError as exc:
                raise WebhookError(f"{key}[{index}].url: not registered: {exc}") from None
            except DuplicateError:
                # another replica declared it since we read the list: update that one instead
                existing = next(
                    h for h in await store.webhooks() if normalized_url(h.url) == spec.url
                )
            else:
                log.info("webhook.declared", webhook=created.id, host=_host(created.url))
                out.append(created)
                continue
        out.append(await _apply_declaration(store, existing, spec, now_ms, grace_s))
    return out


async def _apply_declaration(
    store: Store, existing: Webhook, spec: DeclaredWebhook, now_ms: int, grace_s: float
) -> Webhook:
    updated = dataclasses.replace(
        existing,
        event_types=check_event_types(spec.event_types),
        description=spec.description,
        rate_limit_per_s=spec.rate_limit_per_s,
    )
    if spec.secret is not None and spec.secret != existing.secret:
        # a rotation, as through the API: replaced outright, every receiver still on the stored
        # secret (one the API rotated to before the config declared it) rejected everything
        updated = _rotated(updated, spec.secret, now_ms, grace_s)
        log.info("webhook.declared_secret_rotated", webhook=existing.id, grace_s=grace_s)
    if not spec.enabled:
        updated = _set_enabled(updated, False, DISABLED_BY_CONFIG)
    elif existing.disabled_reason == DISABLED_BY_CONFIG:
        updated = _set_enabled(updated, True, DISABLED_BY_CONFIG)
    elif not existing.enabled:
        log.warning(
            "webhook.declared_but_disabled",
            webhook=existing.id,
            reason=existing.disabled_reason,
            hint=f"re-enable it with: ctct-relay webhooks update {existing.id} --enable",
        )
    if updated == existing:
        return existing
    updated = dataclasses.replace(updated, updated_ms=now_ms)
    await store.update_webhook(updated, _written(existing, updated))
    log.info("webhook.declared_updated", webhook=existing.id)
    return updated


def _check_spec(spec: DeclaredWebhook) -> None:
    check_event_types(spec.event_types)
    check_description(spec.description)
    check_rate(spec.rate_limit_per_s)
    if spec.secret is not None:
        check_secret(spec.secret)


async def _new_webhook(
    guard: Guard, spec: DeclaredWebhook, now_ms: int, disabled_reason: str, *, checked: bool = False
) -> Webhook:
    _check_spec(spec)
    url = spec.url if checked else await check_url(guard, spec.url)
    return Webhook(
        id=new_webhook_id(),
        url=url,
        event_types=check_event_types(spec.event_types),
        secret=spec.secret if spec.secret is not None else signing.generate_secret(),
        description=spec.description,
        enabled=spec.enabled,
        rate_limit_per_s=spec.rate_limit_per_s,
        disabled_reason=None if spec.enabled else disabled_reason,
        created_ms=now_ms,
        updated_ms=now_ms,
    )


def _set_enabled(webhook: Webhook, enabled: bool, reason: str) -> Webhook:
    if enabled == webhook.enabled:
        return webhook  # disabling twice keeps the first reason, the informative one
    if enabled:
        # a fresh start: the failing clock of the old outage must not disable it again at once
        # (and the store makes the retries it earned due now)
        return _fresh_clock(dataclasses.replace(webhook, enabled=True, disabled_reason=None))
    return dataclasses.replace(webhook, enabled=False, disabled_reason=reason)


def _fresh_clock(webhook: Webhook) -> Webhook:
    return dataclasses.replace(webhook, failing_since_ms=None, last_failure_ms=None)


_CLOCK_FIELDS = ("failing_since_ms", "last_failure_ms")


def _written(before: Webhook, after: Webhook) -> tuple[str, ...]:
    """:func:`changed_fields`, plus the failing clock when the change restarts it (enables the
    webhook, moves it to another URL) even if ``before`` showed none: the dispatcher may have
    started one since it was read, and it would count the old outage against the fresh start."""
    fields = changed_fields(before, after)
    fresh = before.url != after.url or (after.enabled and not before.enabled)
    if fresh:
        fields += tuple(name for name in _CLOCK_FIELDS if name not in fields)
    return fields


def changed_fields(before: Webhook, after: Webhook) -> tuple[str, ...]:
    """The fields ``after`` changes: what an update writes, so that it cannot undo what the
    dispatcher wrote meanwhile (its failing clock, a disable) in fields the change left alone."""
    return tuple(
        f.name
        for f in dataclasses.fields(Webhook)
        if getattr(before, f.name) != getattr(after, f.name)
    )


def _host(url: str) -> str:
    """What logs show of a destination: the host only, since paths often carry tokens."""
    return urlsplit(url).hostname or "?"
