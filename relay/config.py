"""Settings: read once at start-up from YAML, ``${ENV}`` interpolation and environment overrides.

Every key is documented in ``config/relay.example.yaml``. Errors name the key and the problem
(``accounts[0].rate_limit.requests_per_second: expected a number > 0, got 'fast'``) and are raised
before anything starts. This is the only module that reads the environment.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import unicodedata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import date, datetime
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import parse_qs, urlsplit

import yaml

from relay.api import AdminConfigError, AdminSettings, DeclaredWebhook, check_exposure
from relay.api.body import MAX_RATE_PER_S, MIN_RATE_PER_S
from relay.api.service import WebhookError, check_secret
from relay.api.streams import ACCOUNT_NAME, ACCOUNT_SHAPE
from relay.ctct.breaker import BreakerSettings
from relay.ctct.client import Credentials, RetryPolicy
from relay.ctct.ratelimit import Budget
from relay.events import RESOURCE_ID, RESOURCE_ID_SHAPE, Kind, RecordError, parse_time
from relay.hostnames import valid_host
from relay.poller import PollSettings
from relay.scheduler import ScheduleSettings
from relay.sinks.kafka import KafkaSecurity, KafkaSecurityError, KafkaSettings
from relay.sinks.ssrf import Guard, masked_query
from relay.sinks.webhooks import DeliverySettings
from relay.store import StoreError
from relay.store.pgurl import url_problem as postgres_url_problem
from relay.store.postgres import PostgresSettings
from relay.store.sqlite import path_from_url

ENV_PREFIX = "CTCT_RELAY_"
# Variables under the prefix that belong to other commands, not to the config: the admin token
# the CLI sends (`ctct-relay webhooks|status …`) and the Kafka jar cache of `dev-kafka`. A shell
# that exports them for those commands must still be able to run the relay.
NOT_OVERRIDES = frozenset({"CTCT_RELAY_ADMIN_TOKEN", "CTCT_RELAY_KAFKA_CACHE"})
DEFAULT_STATE = "sqlite:///relay-state.db"
DEFAULT_RETENTION_H = 168.0
DEFAULT_OUTBOX_RETENTION_H = 168.0
# Ceilings of keys without their own: no setting needs more, and larger values overflow the
# timers (timedelta) and protocol fields (Kafka's int32) they end up in.
MAX_NUMBER = 1e9
MAX_INTEGER = 2**31 - 1
# The smallest kafka.max_request_bytes: the smallest event is ~380 bytes as a record (its ce_*
# headers alone take ~300), ~450 structured; under that every event was dead-lettered as too
# large. Kafka's clients accept any size; this floor leaves room for the longest ids and sources.
MIN_REQUEST_BYTES = 1024
MAX_WEBHOOKS = 10_000  # the most webhooks.max_webhooks may be: a worker per webhook
# What unsets a key that is not a string, as text (override variables are text); YAML's spellings.
NULL_WORDS = frozenset({"null", "Null", "NULL", "~"})
# What true/false keys take as text (override variables are text): YAML 1.1's words, any case.
FLAGS = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
_GUESSED = frozenset({"bool", "int", "float", "timestamp"})  # YAML 1.1 resolvers _Loader replaces
_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")  # what Kafka accepts as a topic name
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?message}, ${NAME?message}: what Docker
# Compose and POSIX shells take (without nesting: the word after the operator is text, up to "}")
_ENV_REF = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<word>[^}]*))?\}")
_ENV_FORMS = (
    "supported: ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?message}, ${NAME?message};"
    " $${ is a literal ${"
)
# the last names of the keys read as secrets (text(..., secret=True) below): an error about a
# reference in one of them shows none of its text (interpolation comes before the readers)
_SECRET_KEYS = frozenset(
    {"api_key", "access_token", "token", "secret", "password", "ssl_password", "state"}
)
# one label of a host name as the resolver takes it, after IDNA (underscores are in use)
LogLevel = Literal["debug", "info", "warning", "error"]
Mode = Literal["binary", "structured"]
Compression = Literal["none", "gzip", "lz4", "zstd"]
Protocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
Mechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
LogFormat = Literal["auto", "json", "console"]


class _Loader(yaml.SafeLoader):
    """YAML with fewer guesses about plain scalars, so text keeps the form it was written in.

    PyYAML follows YAML 1.1: ``0123`` is octal 83, ``12:30:45`` is 45045, ``on``/``no`` are
    booleans and ``2026-01-01`` is a date, all silently, in keys that expect text (tokens, ids,
    times). Here only ``true``/``false``, ``null``/``~``, decimal integers (no leading zero, up
    to 100 digits) and decimal floats (``.inf``/``.nan`` included) are resolved; everything else
    stays the string as written. Number and true/false keys read such strings themselves
    (:class:`_Reader`).
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """A key written twice is an error: YAML says so, PyYAML keeps the last silently."""
        seen: set[str] = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if key.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {key.value} is written twice", key.start_mark
                    )
                seen.add(key.value)
        return super().construct_mapping(node, deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag.rsplit(":", 1)[-1] not in _GUESSED]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
# at most 100 digits: longer ones stay text (int() refuses over 4300 digits, with a traceback)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:0|-?[1-9][0-9]{0,99})$"), list("-0123456789")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+][0-9]+)?
        |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.VERBOSE,
    ),
    list("-+0123456789."),
)


class ConfigError(ValueError):
    """A configuration problem; the message names the file or key and what is wrong.

    ``environment``: the problem comes from ``CTCT_RELAY_*`` variables alone, which the message
    names; :func:`load` does not put the file's name in front of it.
    """

    def __init__(self, message: str, *, environment: bool = False) -> None:
        super().__init__(message)
        self.environment = environment


class Secret:
    """A string that never shows itself in repr, str, logs or status output."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret value, for the one place that sends it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class CampaignTargets:
    """Which campaigns of an account to follow."""

    discover: bool = True  # poll the SENT campaign list and follow new campaigns
    discover_interval_s: float = 300.0
    # stop following discovered campaigns sent longer ago than this (not those in ids or
    # added at run time: relay.targets.CampaignDiscovery)
    max_age_days: float = 30.0
    ids: tuple[str, ...] = ()  # followed whatever discovery says


@dataclass(frozen=True, slots=True)
class AccountSettings:
    """One Constant Contact account: its own access token, an api_key perhaps shared with others."""

    name: str
    base_url: str
    api_key: Secret
    access_token: Secret
    budget: Budget = field(default_factory=Budget)
    campaigns: CampaignTargets = field(default_factory=CampaignTargets)
    contacts: tuple[str, ...] = ()  # contact ids followed with contact-scope feeds
    poll: PollSettings = field(default_factory=PollSettings)

    def credentials(self) -> Credentials:
        """What the client needs to call this account's API."""
        return Credentials(self.base_url, self.api_key.reveal(), self.access_token.reveal())

    def budget_name(self, salt: bytes) -> str:
        """The name of the request budget this account draws from: ``key:<12 hex>``, an
        HMAC-SHA256 of its server and api_key under the state store's random ``salt``
        (``Store.budget_salt``).

        Constant Contact counts its limits per api_key (one key serves every account of an
        integration, each with its own access token), so accounts with the same key and server
        share one budget. The name depends on nothing else (not on what the accounts are called
        or their order, so renaming or adding one splits no count), is the same after a restart
        and on every replica of the store, and without the salt, which never leaves the store,
        it tells nothing of the key: an unsalted digest (``legacy_budget_id``) let whoever read
        /metrics confirm a guessed key. The ``:`` keeps it apart from account names in the
        store's per-name quota and request-log rows.
        """
        return "key:" + hmac.new(salt, self._budget_text(), hashlib.sha256).hexdigest()[:12]

    @property
    def legacy_budget_id(self) -> str:
        """The budget's name before ``budget_name``: an unsalted digest. Only read to carry the
        day's count stored under it over to ``budget_name`` after an upgrade; never shown."""
        return "key:" + hashlib.sha256(self._budget_text()).hexdigest()[:12]

    def _budget_text(self) -> bytes:
        parts = urlsplit(self.base_url)
        server = f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path.rstrip('/')}"
        return f"ctct-relay budget\0{server}\0{self.api_key.reveal()}".encode()


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """Upstream HTTP behaviour shared by every account."""

    timeout_s: float = 30.0
    connect_timeout_s: float = 10.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    breaker: BreakerSettings = field(default_factory=BreakerSettings)  # per api_key


@dataclass(frozen=True, slots=True)
class LogSettings:
    """Log level and rendering."""

    level: LogLevel = "info"
    format: LogFormat = "auto"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a running relay is configured with."""

    accounts: tuple[AccountSettings, ...]
    state: str = DEFAULT_STATE
    postgres: PostgresSettings = field(default_factory=PostgresSettings)  # for postgresql:// state
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    dedup_retention_h: float = DEFAULT_RETENTION_H  # outlasts overlap and late arrivals
    outbox_retention_h: float = DEFAULT_OUTBOX_RETENTION_H  # published events kept this long
    http: HttpSettings = field(default_factory=HttpSettings)
    logging: LogSettings = field(default_factory=LogSettings)
    kafka: KafkaSettings | None = None
    admin: AdminSettings = field(default_factory=AdminSettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    allow_networks: tuple[str, ...] = ()  # webhook destinations allowed despite SSRF rules
    webhooks: tuple[DeclaredWebhook, ...] = ()

    def budget_groups(self, salt: bytes) -> dict[str, tuple[str, ...]]:
        """The accounts drawing from each budget (one per api_key, by ``budget_name``), in
        config order."""
        groups: dict[str, tuple[str, ...]] = {}
        for account in self.accounts:
            name = account.budget_name(salt)
            groups[name] = (*groups.get(name, ()), account.name)
        return groups

    def secrets(self) -> list[str]:
        """Every secret value, so log redaction can scrub them wherever they appear."""
        values = [
            secret.reveal()
            for account in self.accounts
            for secret in (account.api_key, account.access_token)
        ]
        if self.kafka:
            security = self.kafka.security
            values += [v for v in (security.password, security.ssl_password) if v]
        if self.admin.token:
            values.append(self.admin.token)
        values += [w.secret for w in self.webhooks if w.secret]
        state = urlsplit(self.state)
        if state.password:
            values.append(state.password)
        # asyncpg also takes the password (and the client key's) from the query
        query = parse_qs(state.query)
        values += [v for name in ("password", "sslpassword") for v in query.get(name, ()) if v]
        return values


def load(path: str | Path, environ: Mapping[str, str] | None = None) -> Settings:
    """Read, interpolate, override and validate a config file."""
    env = os.environ if environ is None else environ
    source = Path(path)
    text = _read(path)
    try:
        raw = yaml.load(text, _Loader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{source}: not valid YAML{at}: {problem}") from None
    except (ValueError, OverflowError):  # the value is not shown: it may be a secret
        raise ConfigError(
            f"{source}: not valid YAML: a value does not fit its explicit tag (!!int, !!float,"
            " !!timestamp …)"
        ) from None
    except RecursionError:
        raise ConfigError(f"{source}: not valid YAML: nested too deeply") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys")
    try:
        interpolated = _interpolate(raw, env, "")
    except ConfigError as exc:  # an unset ${NAME:?…}, a malformed ${
        raise ConfigError(f"{source}: {exc}") from None
    except RecursionError:  # a YAML anchor holding an alias to itself: &a [*a]
        raise ConfigError(f"{source}: a YAML anchor contains an alias to itself") from None
    origins: dict[str, str] = {}
    data = _apply_overrides(interpolated, env, origins)  # its errors name the variable
    try:
        if not isinstance(data, dict):
            raise ConfigError("the top level must be a mapping of keys")
        return from_mapping(data, origins=origins)
    except ConfigError as exc:
        if exc.environment:
            raise
        raise ConfigError(f"{source}: {exc}") from None


def _read(path: str | Path) -> str:
    """The config file's text; errors name the file."""
    if path == "":  # Path("") is ".": it was "cannot read config file: Is a directory"
        raise ConfigError("config file: the path is empty (expected the path of a YAML file)")
    source = Path(path)
    try:
        return source.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read config file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text (byte {exc.start + 1})") from None


def from_mapping(
    data: Mapping[str, object], *, origins: Mapping[str, str] | None = None
) -> Settings:
    """Validate an already-parsed configuration. ``origins``: the override variable that set
    each key path (``http.timeout_s`` → ``CTCT_RELAY_HTTP__TIMEOUT_S``): an error about a key
    one of them set names it (see :func:`_blame_override`)."""
    try:
        return _settings(data, origins or {})
    except ConfigError as exc:
        raise _blame_override(exc, origins or {}) from None


_KEY_PATH = re.compile(r"[a-z0-9_]+(?:\[\d+\]|\.[a-z0-9_]+)*")


def _blame_override(exc: ConfigError, origins: Mapping[str, str]) -> ConfigError:
    """Every check's message starts with the key it is about (``poll.page_limit: …``); when an
    override variable set that key, or a mapping or list around it, the message names the
    variable instead of leaving the config file to be blamed (as unknown keys do)."""
    key, sep, rest = str(exc).partition(": ")
    if exc.environment or not sep or not _KEY_PATH.fullmatch(key):
        return exc
    path = key
    while path not in origins:
        parent = re.sub(r"(?:\[\d+\]|\.[a-z0-9_]+)$", "", path)
        if parent == path:
            return exc
        path = parent
    return ConfigError(f"{key} (from {origins[path]}): {rest}", environment=True)


def _settings(data: Mapping[str, object], origins: Mapping[str, str]) -> Settings:
    root = _Reader(data, "", origins)
    poll = root.child("poll")
    retention_h = poll.number("dedup_retention_h", DEFAULT_RETENTION_H)
    defaults = replace(_poll(poll), dedup_retention_s=retention_h * 3600)
    _check_retention(defaults, "poll.overlap_s")
    poll.done()
    accounts = tuple(_account(r, defaults) for r in root.readers("accounts"))
    if not accounts:
        raise ConfigError("accounts: at least one account is required")
    names = [a.name for a in accounts]
    if len(set(names)) != len(names):
        raise ConfigError(f"accounts: names must be unique, got {names}")
    _check_shared_keys(accounts)
    delivery, allow, declared, max_webhooks = _webhooks(root.child("webhooks"))
    settings = Settings(
        accounts=accounts,
        state=_state(root),
        postgres=_postgres(root.child("postgres")),
        outbox_retention_h=root.number(
            "outbox_retention_h", DEFAULT_OUTBOX_RETENTION_H, strict=False
        ),
        schedule=_schedule(root.child("schedule")),
        dedup_retention_h=retention_h,
        http=_http(root.child("http")),
        logging=_logs(root),
        kafka=_kafka(root),
        admin=replace(_admin(root.child("admin")), max_webhooks=max_webhooks),
        delivery=delivery,
        allow_networks=allow,
        webhooks=declared,
    )
    root.done()
    return settings


def _check_shared_keys(accounts: tuple[AccountSettings, ...]) -> None:
    """Accounts sharing an api_key share its limits, so they must agree on them: one budget
    cannot be 4/s for one account and 2/s for another. The key itself is never shown."""
    first: dict[str, int] = {}
    for index, account in enumerate(accounts):
        seen = first.setdefault(account.legacy_budget_id, index)  # one per key and server
        other = accounts[seen]
        if seen == index or other.budget == account.budget:
            continue
        mine, theirs = account.budget, other.budget
        differences = ", ".join(
            f"{f.name} {getattr(mine, f.name):g} against {getattr(theirs, f.name):g}"
            for f in fields(mine)
            if getattr(mine, f.name) != getattr(theirs, f.name)
        )
        raise ConfigError(
            f"accounts[{index}].rate_limit: {account.name} shares its api_key with {other.name}"
            f" (accounts[{seen}]), so its rate_limit settings must be equal ({differences})"
        )


def _admin(r: _Reader) -> AdminSettings:
    b = AdminSettings()
    token = r.optional_text("token", secret=True)
    admin = AdminSettings(
        host=r.text("host", b.host),
        port=r.integer("port", b.port, minimum=0, maximum=65535),
        # as the CLI does: a token file's line end ("$(cat token.txt)" keeps a CR) is not part
        # of it; a token of whitespace alone becomes "", which check_exposure refuses
        token=None if token is None else _secret_text(r, "token", token),
        rotation_grace_s=r.number("rotation_grace_s", b.rotation_grace_s, strict=False),
        metrics_public=r.flag("metrics_public", b.metrics_public),
    )
    r.done()
    try:
        check_exposure(admin)
    except AdminConfigError as exc:
        raise ConfigError(str(exc)) from None
    return admin


def _webhooks(
    r: _Reader,
) -> tuple[DeliverySettings, tuple[str, ...], tuple[DeclaredWebhook, ...], int]:
    b = DeliverySettings()
    max_webhooks = r.integer(
        "max_webhooks", AdminSettings().max_webhooks, minimum=1, maximum=MAX_WEBHOOKS
    )
    schedule = r.numbers("retry_schedule_s")
    delivery = DeliverySettings(
        retry_schedule_s=b.retry_schedule_s if schedule is None else tuple(schedule),
        timeout_s=r.number("timeout_s", b.timeout_s),
        connect_timeout_s=r.number("connect_timeout_s", b.connect_timeout_s),
        max_retry_after_s=r.number("max_retry_after_s", b.max_retry_after_s),
        concurrency=r.integer("concurrency", b.concurrency),
        disable_after_s=r.number("disable_after_s", b.disable_after_s),
        response_cap_bytes=r.integer("response_cap_bytes", b.response_cap_bytes),
    )
    allow = tuple(r.strings("allow_networks") or ())
    try:
        Guard.from_strings(allow)
    except ValueError as exc:
        raise ConfigError(f"{r.key('allow_networks')}: {exc}") from None
    declared = []
    for w in r.readers("declared"):
        secret = _optional_secret(w, "secret")
        if secret is not None:
            try:
                check_secret(secret)
            except WebhookError as exc:  # "secret: …", never the value
                raise ConfigError(f"{w.key('secret')}{str(exc).removeprefix('secret')}") from None
        rate = w.raw("rate_limit_per_s")
        declared.append(
            DeclaredWebhook(
                url=w.text("url"),
                event_types=tuple(w.strings("event_types") or ("com.constantcontact.email.*",)),
                description=w.text("description", " ").strip(),
                enabled=w.flag("enabled", True),
                secret=secret,
                rate_limit_per_s=None
                if rate is None
                else w.number(
                    "rate_limit_per_s",
                    1.0,
                    minimum=MIN_RATE_PER_S,
                    maximum=MAX_RATE_PER_S,
                    strict=False,
                ),
            )
        )
        w.done()
    if len(declared) > max_webhooks:
        raise ConfigError(
            f"{r.key('declared')}: {len(declared)} webhooks declared, more than"
            f" {r.key('max_webhooks')} ({max_webhooks}) allows"
        )
    r.done()
    return delivery, allow, tuple(declared), max_webhooks


def _kafka(root: _Reader) -> KafkaSettings | None:
    if root.raw("kafka") is None:
        return None
    r = root.child("kafka")
    b = KafkaSettings(bootstrap_servers="")
    topic = r.text("topic", b.topic)
    try:
        names = [topic.format(kind=kind.value) for kind in Kind]
    except (KeyError, IndexError, ValueError):
        raise ConfigError(
            f"{r.key('topic')}: only {{kind}} may be used in the template, got {topic!r}"
        ) from None
    for name in names:  # what the broker accepts; it would refuse to create or find others
        if not _TOPIC_NAME.fullmatch(name) or name in {".", ".."}:
            raise ConfigError(
                f"{r.key('topic')}: {name!r} is not a Kafka topic name (1 to 249 of a-z, A-Z,"
                " 0-9, '.', '_' and '-')"
            )
    settings = KafkaSettings(
        bootstrap_servers=_bootstrap_servers(r),
        topic=topic,
        content_mode=cast(Mode, r.choice("content_mode", ("binary", "structured"), b.content_mode)),
        compression=cast(
            Compression, r.choice("compression", ("none", "gzip", "lz4", "zstd"), b.compression)
        ),
        # Kafka's int32 fields, their whole range named in an error whichever end is crossed
        linger_ms=r.integer("linger_ms", b.linger_ms, minimum=0, maximum=MAX_INTEGER),
        max_batch_bytes=r.integer("max_batch_bytes", b.max_batch_bytes, maximum=MAX_INTEGER),
        max_request_bytes=_max_request_bytes(r, b.max_request_bytes),
        # Kafka carries it in int32 milliseconds: aiokafka fails only when it encodes a request,
        # and below 1 ms it was 0 ms, a timeout every request hit at once, retried for ever
        request_timeout_s=r.number(
            "request_timeout_s",
            b.request_timeout_s,
            minimum=0.001,
            strict=False,
            maximum=2_147_483,
        ),
        client_id=r.text("client_id", b.client_id),
        create_topics=r.flag("create_topics", b.create_topics),
        partitions=r.integer("partitions", b.partitions),
        replication_factor=r.integer("replication_factor", b.replication_factor, maximum=32767),
        batch_events=r.integer("batch_events", b.batch_events),
        security=_kafka_security(r.child("security")),
    )
    r.done()
    return settings


def _max_request_bytes(r: _Reader, default: int) -> int:
    """At least :data:`MIN_REQUEST_BYTES`: a smaller limit is met by no event, and the error
    says so (the range alone reads as an arbitrary rule)."""
    try:
        return r.integer(
            "max_request_bytes", default, minimum=MIN_REQUEST_BYTES, maximum=MAX_INTEGER
        )
    except ConfigError as exc:
        raise ConfigError(
            f"{exc} (every event is a few hundred bytes as a Kafka record: a smaller limit"
            " dead-letters them all as too large)"
        ) from None


def _bootstrap_servers(r: _Reader) -> str:
    """``host[:port]`` items separated by commas (an IPv6 address in brackets), as aiokafka
    reads them (no port: 9092); checked here because aiokafka retries a bad one for ever."""
    servers = r.text("bootstrap_servers")
    for item in servers.split(","):
        address = item.strip()
        try:
            parts = urlsplit(f"//{address}")
            usable = bool(parts.hostname) and parts.port != 0 and "@" not in address
            usable = usable and not (parts.path or parts.query or parts.fragment)
        except ValueError:  # the port is not a number from 0 to 65535, a broken [IPv6]
            usable = False
        if not usable:
            raise ConfigError(
                f"{r.key('bootstrap_servers')}: expected host:port[,host:port...] with ports from"
                f" 1 to 65535, got {_show(address)}"
            )
    return servers


_SSL_KEYS = ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_password")


def _kafka_security(r: _Reader) -> KafkaSecurity:
    b = KafkaSecurity()
    protocols = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
    protocol = r.choice("protocol", protocols, b.protocol)
    mechanism = r.choice(
        "sasl_mechanism", ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"), b.sasl_mechanism
    )
    sasl = protocol.startswith("SASL")
    security = KafkaSecurity(
        protocol=cast(Protocol, protocol),
        sasl_mechanism=cast(Mechanism, mechanism),
        username=r.text("username") if sasl else r.optional_text("username"),
        password=_required_secret(r, "password") if sasl else _optional_secret(r, "password"),
        ssl_cafile=_existing_file(r, "ssl_cafile"),
        ssl_certfile=_existing_file(r, "ssl_certfile"),
        ssl_keyfile=_existing_file(r, "ssl_keyfile"),
        ssl_password=_optional_secret(r, "ssl_password"),
    )
    if (security.ssl_certfile is None) != (security.ssl_keyfile is None):
        raise ConfigError(f"{r.key('ssl_certfile')}: ssl_certfile and ssl_keyfile go together")
    # settings the protocol would silently ignore: the user meant another protocol
    ignored = [k for k in _SSL_KEYS if getattr(security, k) is not None and not security.uses_ssl]
    ignored += [k for k in ("username", "password") if getattr(security, k) and not sasl]
    if ignored:
        wanted = (
            "SSL or SASL_SSL" if ignored[0].startswith("ssl_") else "SASL_PLAINTEXT or SASL_SSL"
        )
        raise ConfigError(
            f"{r.key('protocol')}: {', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'}"
            f" used only with {wanted}, not with {protocol}"
        )
    r.done()
    if not security.uses_ssl:
        return security
    try:  # at load, so a bad file or passphrase stops the start naming its key
        return replace(security, context=security.ssl_context())
    except KafkaSecurityError as exc:
        raise ConfigError(f"{r.key(exc.key)}: {exc.problem}") from None


def _existing_file(r: _Reader, name: str) -> str | None:
    path = r.optional_text(name)
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"{r.key(name)}: no such file: {path}")
    return path


def _state(root: _Reader) -> str:
    url = root.text("state", DEFAULT_STATE, secret=True)  # a URL may hold a password
    try:  # an unclosed IPv6 bracket ('…@[::1/relay') makes urlsplit raise
        scheme = urlsplit(url).scheme
    except ValueError:
        raise ConfigError(f"state: not a valid URL, got {_url(url)}") from None
    if scheme == "sqlite":
        problem = _sqlite_problem(url)
    elif scheme in {"postgresql", "postgres"}:
        problem = postgres_url_problem(url)
    else:
        problem = (
            "expected sqlite:///path/to/state.db or postgresql://user:password@host:port/database"
        )
    if problem:
        raise ConfigError(f"state: {problem}, got {_url(url)}")
    return url


def _sqlite_problem(url: str) -> str | None:
    if "?" in url or "#" in url:
        # it would be part of the file's name: sqlite:///relay.db?mode=ro made a new, empty
        # "relay.db?mode=ro" (and the streams started again from start_from)
        return (
            "expected sqlite:///path/to/state.db (a sqlite state takes no ?query or #fragment;"
            " they would be part of the file's name)"
        )
    try:
        path = path_from_url(url)
    except StoreError:
        path = Path()
    if path is None:
        # a relay whose state is lost at exit: after a restart every stream started again from
        # start_from and the sinks sent it all again; the state is there to survive restarts
        return (
            "expected sqlite:///path/to/state.db (an in-memory state is lost when the relay"
            " stops: it must survive restarts)"
        )
    if url.endswith("/") or path == Path() or path.is_dir():
        return "expected sqlite:///path/to/state.db (the path of a database file)"
    return None


def _postgres(r: _Reader) -> PostgresSettings:
    b = PostgresSettings()
    max_size = r.integer("pool_max_size", b.pool_max_size)
    settings = PostgresSettings(
        pool_min_size=r.integer("pool_min_size", b.pool_min_size, minimum=0, maximum=max_size),
        pool_max_size=max_size,
        statement_timeout_s=r.number("statement_timeout_s", b.statement_timeout_s),
        connect_timeout_s=r.number("connect_timeout_s", b.connect_timeout_s),
        reconnect_max_s=r.number("reconnect_max_s", b.reconnect_max_s, strict=False),
        lease_s=r.number("lease_s", b.lease_s, minimum=1.0, strict=False),
        request_margin_s=r.number("request_margin_s", b.request_margin_s, strict=False),
    )
    r.done()
    return settings


def _poll(r: _Reader, base: PollSettings | None = None) -> PollSettings:
    """Poll settings; per account they start from the top-level ``poll`` section."""
    base = base or PollSettings()
    start_from = r.text("start_from", base.start_from)
    if start_from not in {"now", "earliest"}:
        try:
            parse_time(start_from, r.key("start_from"))
        except RecordError:
            raise ConfigError(
                f"{r.key('start_from')}: expected now, earliest or an ISO 8601 time,"
                f" got {start_from!r}"
            ) from None
    return PollSettings(
        kinds=_kinds(r, base.kinds),
        overlap_s=r.number("overlap_s", base.overlap_s, strict=False),
        start_from=start_from,
        summary_gate=r.flag("summary_gate", base.summary_gate),
        page_limit=r.integer("page_limit", base.page_limit, maximum=500),
        dedup_retention_s=base.dedup_retention_s,
        repeat_read_s=r.number("repeat_read_s", base.repeat_read_s),
    )


def _check_retention(poll: PollSettings, overlap_key: str) -> None:
    """Dedup keys must outlive what a pass reads again (the overlap, twice for seeding)."""
    if poll.dedup_retention_s <= poll.overlap_s * 2:
        raise ConfigError(
            f"poll.dedup_retention_h: must be longer than twice {overlap_key}"
            f" ({poll.dedup_retention_s / 3600:g} h against {poll.overlap_s:g} s)"
        )


def _kinds(r: _Reader, default: tuple[Kind, ...]) -> tuple[Kind, ...]:
    names = r.strings("kinds")
    if names is None:
        return default
    known = [k.value for k in Kind]
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise ConfigError(
            f"{r.key('kinds')}: expected a non-empty list of {', '.join(known)}, got {names}"
        )
    return tuple(Kind(n) for n in dict.fromkeys(names))


def _schedule(r: _Reader) -> ScheduleSettings:
    b = ScheduleSettings()
    settings = ScheduleSettings(
        min_interval_s=r.number("min_interval_s", b.min_interval_s),
        max_interval_s=r.number("max_interval_s", b.max_interval_s),
        prior_rate_per_h=r.number("prior_rate_per_h", b.prior_rate_per_h),
        floor_rate_per_h=r.number("floor_rate_per_h", b.floor_rate_per_h),
        smoothing=r.number("smoothing", b.smoothing, maximum=1.0),
        rate_memory_s=r.number("rate_memory_s", b.rate_memory_s),
        budget_share=r.number("budget_share", b.budget_share, maximum=1.0),
        repeat_share=r.number(
            "repeat_share", b.repeat_share, minimum=0.0, maximum=1.0, strict=False
        ),
        tick_s=r.number("tick_s", b.tick_s),
        concurrency=r.integer("concurrency", b.concurrency),
        error_backoff_s=r.number("error_backoff_s", b.error_backoff_s),
        error_backoff_max_s=r.number("error_backoff_max_s", b.error_backoff_max_s),
    )
    if settings.min_interval_s > settings.max_interval_s:
        raise ConfigError(f"{r.key('min_interval_s')}: must not exceed max_interval_s")
    r.done()
    return settings


def _account(r: _Reader, poll: PollSettings) -> AccountSettings:
    base_url = _base_url(r)
    limits = r.child("rate_limit")
    defaults = Budget()
    budget = Budget(
        requests_per_second=limits.number("requests_per_second", defaults.requests_per_second),
        requests_per_day=limits.integer("requests_per_day", defaults.requests_per_day),
        reserved_share=limits.number(
            "reserved_share", defaults.reserved_share, minimum=0.0, maximum=0.99, strict=False
        ),
    )
    limits.done()
    name = r.text("name")
    if not ACCOUNT_NAME.fullmatch(name):
        # part of event ids, CloudEvent sources (ctct://<name>/…) and admin API paths
        raise ConfigError(f"{r.key('name')}: expected {ACCOUNT_SHAPE}, got {_show(name)}")
    polling = r.child("poll")
    if polling.has("dedup_retention_h"):
        raise ConfigError(
            f"{polling.key('dedup_retention_h')}: set poll.dedup_retention_h at the top level"
            " (dedup keys are pruned for all accounts at once)"
        )
    account = AccountSettings(
        name=name,
        base_url=base_url,
        api_key=_credential(r, "api_key"),
        access_token=_credential(r, "access_token"),
        budget=budget,
        campaigns=_campaigns(r.child("campaigns")),
        contacts=r.ids("contacts"),
        poll=_poll(polling, poll),
    )
    _check_retention(account.poll, polling.key("overlap_s"))
    polling.done()
    r.done()
    return account


def _base_url(r: _Reader) -> str:
    """An http(s) URL of scheme, host and port only, whose host a request can be sent to."""
    key = r.key("base_url")
    base_url = r.text("base_url")
    expected = f"expected an http(s) URL, got {_url(base_url)}"
    try:
        parts = urlsplit(base_url)
    except ValueError:  # a broken [IPv6] literal
        raise ConfigError(f"{key}: {expected}") from None
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise ConfigError(f"{key}: {expected}")
    if parts.query or parts.fragment:
        # shown with the query's keys and *** for its values (a query may carry a token)
        raise ConfigError(
            f"{key}: a query or fragment is not allowed (give the scheme and host only, e.g."
            f" https://api.constantcontact.com), got {_url(base_url)}"
        )
    if "@" in parts.netloc or parts.path not in {"", "/"}:
        # the client appends /v2/...: a path doubles it, and every stream retires on the 404s
        raise ConfigError(
            f"{key}: give the scheme and host only, e.g. https://api.constantcontact.com,"
            f" got {_url(base_url)}"
        )
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ConfigError(f"{key}: the port is not a number from 1 to 65535, got {_url(base_url)}")
    host = parts.hostname or ""
    if not valid_host(host):
        # aiohttp would raise UnicodeError (IDNA) on every request, or fail to resolve it
        raise ConfigError(
            f"{key}: {host!r} is not a valid host name (an IP address, or labels of 1 to 63"
            " letters, digits, '-' or '_' separated by single dots), got"
            f" {_url(base_url)}"
        )
    return base_url


def _credential(r: _Reader, name: str) -> Secret:
    """An api_key or access token."""
    return Secret(_required_secret(r, name))


def _required_secret(r: _Reader, name: str) -> str:
    """A secret that must be given (see :func:`_secret_text`)."""
    value = _secret_text(r, name, r.text(name, secret=True))
    if not value:
        raise ConfigError(f"{r.key(name)}: required, but empty (only whitespace)")
    return value


def _optional_secret(r: _Reader, name: str) -> str | None:
    """A secret that may be left out (missing or empty); one of whitespace alone is refused,
    not taken for "none" (a webhook would get a generated secret its receiver does not know)."""
    given = r.optional_text(name, secret=True)
    if given is None:
        return None
    value = _secret_text(r, name, given)
    if not value:
        raise ConfigError(f"{r.key(name)}: only whitespace (leave the key out for none)")
    return value


def _secret_text(r: _Reader, name: str, value: str) -> str:
    """The one rule for every secret of the config file (credentials, tokens, passwords, webhook
    secrets): whitespace around it dropped (a secret file's line end, kubectl create secret
    --from-file), and refused if a control character is left inside, as no secret holds one
    (in a header it stops every request; a password with one never matches). Never shown."""
    value = value.strip()
    if any(unicodedata.category(c) == "Cc" for c in value):
        raise ConfigError(
            f"{r.key(name)}: holds a control character (a line break, a tab, …), which no"
            " secret does; the value of a secret is not shown"
        )
    return value


def _campaigns(r: _Reader) -> CampaignTargets:
    base = CampaignTargets()
    targets = CampaignTargets(
        discover=r.flag("discover", base.discover),
        discover_interval_s=r.number("discover_interval_s", base.discover_interval_s),
        max_age_days=r.number("max_age_days", base.max_age_days, maximum=36500),
        ids=r.ids("ids"),
    )
    r.done()
    return targets


def _http(r: _Reader) -> HttpSettings:
    defaults = RetryPolicy()
    base = HttpSettings()
    http = HttpSettings(
        timeout_s=r.number("timeout_s", base.timeout_s),
        connect_timeout_s=r.number("connect_timeout_s", base.connect_timeout_s),
        retry=RetryPolicy(
            max_attempts=r.integer("max_attempts", defaults.max_attempts),
            base_delay_s=r.number("backoff_base_s", defaults.base_delay_s),
            max_delay_s=r.number("backoff_max_s", defaults.max_delay_s),
            max_retry_after_s=r.number("max_retry_after_s", defaults.max_retry_after_s),
        ),
        breaker=_breaker(r),
    )
    r.done()
    return http


def _breaker(r: _Reader) -> BreakerSettings:
    base = BreakerSettings()
    open_s = r.number("breaker_open_s", base.open_s)
    max_open_s = r.number("breaker_max_open_s", max(base.max_open_s, open_s))
    if max_open_s < open_s:
        raise ConfigError(
            f"{r.key('breaker_max_open_s')}: {max_open_s:g} is shorter than"
            f" {r.key('breaker_open_s')} ({open_s:g})"
        )
    return BreakerSettings(
        failures=r.integer("breaker_failures", base.failures, minimum=0),
        open_s=open_s,
        max_open_s=max_open_s,
    )


def _logs(root: _Reader) -> LogSettings:
    r = root.child("logging")
    base = LogSettings()
    level = r.choice("level", ("debug", "info", "warning", "error"), base.level)
    fmt = r.choice("format", ("auto", "json", "console"), base.format)
    r.done()
    return LogSettings(level=cast(LogLevel, level), format=cast(LogFormat, fmt))


class _Reader:
    """Typed access to one mapping of the config, tracking key paths and unknown keys."""

    def __init__(
        self,
        data: object,
        path: str,
        origins: Mapping[str, str],
        origin: str | None = None,
    ) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path or 'config'}: expected a mapping, got {_shape(data)}")
        self._data: Mapping[str, object] = data
        self._path = path
        self._used: set[str] = set()
        self._origins = origins  # key path -> the override variable that set it
        self._origin = origin  # the variable that set this mapping (or one around it)

    def _reader(self, data: object, path: str) -> _Reader:
        return _Reader(data, path, self._origins, self._origins.get(path, self._origin))

    def key(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path else name

    def _get(self, name: str) -> object:
        self._used.add(name)
        return self._data.get(name)

    def _given(self, name: str) -> object:
        """The value, None for the words null and ~ as text: what an override variable says to
        unset a key that is not a string (CTCT_RELAY_KAFKA=null leaves the section out). String
        keys read :meth:`_get`: for them the words are text (a token may be "null")."""
        value = self._get(name)
        return None if isinstance(value, str) and value in NULL_WORDS else value

    def has(self, name: str) -> bool:
        """Whether the key is written at all (without reading it)."""
        return name in self._data

    def raw(self, name: str) -> object:
        """The value as written, null words as None (marks the key as known)."""
        return self._given(name)

    def optional_text(self, name: str, *, secret: bool = False) -> str | None:
        value = self._get(name)
        return None if value is None or value == "" else self.text(name, secret=secret)

    def child(self, name: str) -> _Reader:
        return self._reader(self._given(name), self.key(name))

    def readers(self, name: str) -> Iterator[_Reader]:
        items = self._given(name)
        if items is None:
            return
        if not isinstance(items, list):
            raise ConfigError(f"{self.key(name)}: expected a list, got {_shape(items)}")
        for index, item in enumerate(items):
            yield self._reader(item, f"{self.key(name)}[{index}]")

    def text(self, name: str, default: str | None = None, *, secret: bool = False) -> str:
        """A string (or a YAML integer, as written); ``secret``: errors never show the value."""
        value = self._get(name)
        if value is None or value == "":
            if default is not None:
                return default
            raise ConfigError(f"{self.key(name)}: required, but missing or empty")
        if isinstance(value, (_FlowList, _FlowMapping)):
            return value.text  # an override variable's text, taken as written by string keys
        if isinstance(value, (bool, float)) or not isinstance(value, (str, int)):
            got = _kind(value) if secret else _show(value)
            # YAML read true, 1.50 or .inf as such: quoting keeps the text
            hint = " (quote it in YAML)" if isinstance(value, (bool, float)) else ""
            shown = "; the value of a secret is not shown" if secret else ""
            raise ConfigError(f"{self.key(name)}: expected a string, got {got}{hint}{shown}")
        return str(value)  # an int is written as it reads (_Loader): ids are often numbers

    def number(
        self,
        name: str,
        default: float,
        *,
        minimum: float = 0.0,
        maximum: float | None = None,
        strict: bool = True,
    ) -> float:
        """A finite number; ``strict``: greater than ``minimum``, else at least ``minimum``."""
        value = self._given(name)
        if value is None:
            return float(default)
        number = _as_number(value)
        real = None if number is None else _as_float(number)
        cap = MAX_NUMBER if maximum is None else maximum
        bound = f"{'>' if strict else '>='} {minimum:g}"
        if maximum is not None or (real is not None and cap < real < math.inf):
            short = f"{cap:g}"  # exact when it reads back the same (1e+09), else in full
            bound += f" and <= {short if float(short) == cap else f'{cap:.10g}'}"
        if real is None or not math.isfinite(real):
            what = "a number" if real is None else "a finite number"
            raise ConfigError(f"{self.key(name)}: expected {what} {bound}, got {_show(value)}")
        too_low = real <= minimum if strict else real < minimum
        if too_low or real > cap:
            raise ConfigError(f"{self.key(name)}: expected a number {bound}, got {_show(value)}")
        return real

    def integer(
        self, name: str, default: int, *, minimum: int = 1, maximum: int | None = None
    ) -> int:
        """A whole number from ``minimum`` to ``maximum`` (both included); 2.0 counts, 2.5 not."""
        value = self._given(name)
        if value is None:
            return default
        number = _as_number(value)
        cap = MAX_INTEGER if maximum is None else maximum
        whole = number if isinstance(number, int) else None
        if isinstance(number, float) and math.isfinite(number) and number.is_integer():
            whole = int(number)
        bound = f">= {minimum}"
        if maximum is not None or (whole is not None and whole > cap):
            bound += f" and <= {cap}"
        if whole is None or not minimum <= whole <= cap:
            raise ConfigError(f"{self.key(name)}: expected an integer {bound}, got {_show(value)}")
        return whole

    def flag(self, name: str, default: bool) -> bool:
        """true or false; also as a string (override variables are): the words of :data:`FLAGS`."""
        value = self._given(name)
        if value is None:
            return default
        if isinstance(value, str) and value.strip().lower() in FLAGS:
            return FLAGS[value.strip().lower()]
        if not isinstance(value, bool):
            raise ConfigError(f"{self.key(name)}: expected true or false, got {_show(value)}")
        return value

    def numbers(self, name: str) -> list[float] | None:
        """A non-empty list of finite numbers >= 0 (seconds)."""
        value = self._given(name)
        if value is None:
            return None
        items = [_as_number(v) for v in value] if isinstance(value, list) else []
        numbers = [_as_float(v) for v in items if v is not None]
        if (
            not items
            or len(numbers) != len(items)
            or not all(math.isfinite(v) and 0 <= v <= MAX_NUMBER for v in numbers)
        ):
            raise ConfigError(
                f"{self.key(name)}: expected a non-empty list of seconds, got {_show(value)}"
            )
        return numbers

    def strings(self, name: str) -> list[str] | None:
        """A list of ids or names; numbers are accepted and kept as text (ids often are)."""
        value = self._given(name)
        if value is None:
            return None
        if not isinstance(value, list) or not all(
            isinstance(v, (str, int)) and not isinstance(v, bool) for v in value
        ):
            raise ConfigError(f"{self.key(name)}: expected a list of strings, got {_show(value)}")
        return [str(v) for v in value]

    def ids(self, name: str) -> tuple[str, ...]:
        """A list of contact or campaign ids, each of the shape the admin API takes."""
        ids = self.strings(name) or []
        for index, value in enumerate(ids):
            if not RESOURCE_ID.fullmatch(value):
                raise ConfigError(
                    f"{self.key(name)}[{index}]: expected {RESOURCE_ID_SHAPE}, got {_show(value)}"
                )
        return tuple(ids)

    def choice(self, name: str, allowed: tuple[str, ...], default: str) -> str:
        value = self._given(name)
        if value is None:
            return default
        if value not in allowed:
            raise ConfigError(
                f"{self.key(name)}: expected one of {', '.join(allowed)}, got {_show(value)}"
            )
        return str(value)

    def done(self) -> None:
        """Refuse the keys nothing read. One an override variable set is named with it: a
        variable under the prefix is a key, whoever set it (a Kubernetes Service named
        ctct-relay gives every pod CTCT_RELAY_SERVICE_HOST, CTCT_RELAY_PORT, …)."""
        unknown = sorted(set(self._data) - self._used, key=str)  # YAML keys may be numbers
        if not unknown:
            return
        where = self._path or "top level"
        sources = [self._origins.get(self.key(str(k)), self._origin) for k in unknown]
        names = [k if isinstance(k, str) else _yaml_text(k) for k in unknown]  # `~:` is null
        listed = ", ".join(
            f"{k} (from {var})" if var else k for k, var in zip(names, sources, strict=True)
        )
        message = f"{where}: unknown key(s) {listed}"
        if any(sources):
            message += (
                f"; every {ENV_PREFIX}* variable sets a config key (on Kubernetes, a Service named"
                " ctct-relay adds CTCT_RELAY_SERVICE_HOST, CTCT_RELAY_PORT and others unless the"
                " pod spec has enableServiceLinks: false)"
            )
        raise ConfigError(message, environment=all(sources))


def _as_number(value: object) -> int | float | None:
    """A YAML number, or a string that spells one in decimal (``5``, ``2.5``, ``1e3``; ``0123`` is
    123): override variables are strings. None for anything else (true/false included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if not isinstance(value, str) or not value.isascii():
        return None
    try:
        return int(value, 10)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        return None


def _as_float(number: int | float) -> float:
    try:
        return float(number)
    except OverflowError:  # an integer beyond float range
        return math.inf if number > 0 else -math.inf


def _show(value: object) -> str:
    """A value for an error message, as YAML writes it (strings quoted), cut at 60 characters.
    Never for secrets: see :func:`_kind`. A mapping, or a list holding mappings or lists, is
    described by its shape (:func:`_shape`): a whole section written where another shape was
    expected (``accounts:`` without its ``-``) holds api keys, tokens and passwords."""
    if isinstance(value, dict) or (
        isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value)
    ):
        return _shape(value)
    text = _yaml_text(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _shape(value: object) -> str:
    """A value for an error about a section of the wrong shape (a mapping or list expected): a
    mapping or list by its keys or length, never its values, which may be secrets; anything
    else as :func:`_show` writes it."""
    if isinstance(value, dict) and value:
        keys = ", ".join(k if isinstance(k, str) else _yaml_text(k) for k in value)
        keys = keys if len(keys) <= 60 else keys[:57] + "..."
        return f"a mapping of {keys} (values not shown)"
    if isinstance(value, list) and value:
        count = f"{len(value)} item{'' if len(value) == 1 else 's'}"
        return f"a list of {count} (values not shown)"
    if isinstance(value, (dict, list)):
        return "an empty mapping" if isinstance(value, dict) else "an empty list"
    if isinstance(value, str) and value.lstrip().startswith(("[", "{")):
        # an override variable's flow text that did not parse: a section with its secrets
        return "text starting with [ or { that is not a YAML flow list or mapping (not shown)"
    return _show(value)


def _yaml_text(value: object) -> str:
    if isinstance(value, (_FlowList, _FlowMapping)):
        return repr(value.text)  # an override variable's text, as set
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else ".inf" if value > 0 else "-.inf"
    if isinstance(value, (date, datetime)):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml_text(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _url(url: str) -> str:
    """A URL for an error message, as written but for what may hold a credential: everything up
    to the last ``@`` (user info, even unencoded or without ``//``), the value of each query
    parameter (``?x=***``: the keys stay, so the error shows which one is wrong) and the
    fragment (``#***``). (:func:`relay.api.status.public_url` rebuilds the URL, which loses an
    empty host's ``//``: the very mistake a state error has to show.)"""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" in rest:  # first: a password may hold an unencoded ? or #
        rest = "…@" + rest.rsplit("@", 1)[1]
    rest, hash_sign, _ = rest.partition("#")
    rest, question, query = rest.partition("?")
    query = masked_query(query) if question else ""
    fragment = "#***" if hash_sign else ""
    return repr(f"{scheme}{sep}{rest}{question}{query}{fragment}")


def _kind(value: object) -> str:
    """What a value is, without the value (for secrets)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _interpolate(value: object, env: Mapping[str, str], path: str) -> object:
    """Replace environment references in every string (:func:`_expand`)."""
    if isinstance(value, dict):
        return {
            k: _interpolate(v, env, f"{path}.{k}" if path else str(k)) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_interpolate(v, env, f"{path}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value
    return _expand(value, env, path)


def _expand(text: str, env: Mapping[str, str], path: str) -> str:
    """``text`` with each ``${…}`` replaced as Docker Compose does (:data:`_ENV_REF`). A run of
    ``$`` before ``{`` reads in pairs, each ``$$`` one literal ``$``, and an odd one left starts
    a reference: ``$${X}`` is the text ``${X}``. Any other ``$`` is text as written (``pa$$word``
    stays so, as it always did). A ``${`` that starts no well-formed reference is an error:
    kept as text, ``${TOKEN:?required}`` once became the admin token itself."""
    out: list[str] = []
    pos = 0
    while (brace := text.find("${", pos)) >= 0:
        start = brace
        while start > pos and text[start - 1] == "$":
            start -= 1
        dollars = brace + 1 - start
        out.append(text[pos:start] + "$" * (dollars // 2))
        if dollars % 2 == 0:
            out.append("{")
            pos = brace + 2
            continue
        match = _ENV_REF.match(text, brace)
        if match is None or "${" in (match.group("word") or ""):
            raise ConfigError(f"{path}: {_bad_reference(text, brace, path)}")
        out.append(_resolve(match, env, path))
        pos = match.end()
    out.append(text[pos:])
    return "".join(out)


def _resolve(match: re.Match[str], env: Mapping[str, str], path: str) -> str:
    """The value of one well-formed reference; ``:`` in the operator counts empty as unset."""
    name, op, word = match.group("name", "op", "word")
    value = env.get(name)
    missing = value is None or (value == "" and op is not None and op.startswith(":"))
    if not missing:
        return value or ""
    if op is None:
        raise ConfigError(f"{path}: environment variable {name} is not set")
    if op.endswith("-"):
        return str(word)
    state = "is not set" if value is None else "is empty"
    raise ConfigError(
        f"{path}: environment variable {name} {state}" + (f": {word}" if word else "")
    )


def _bad_reference(text: str, brace: int, path: str) -> str:
    """What is wrong with the ``${`` at ``brace``; the text itself only of a key not secret."""
    end = text.find("}", brace)
    inner = text[brace + 2 : end] if end >= 0 else text[brace + 2 :]
    name = re.match(r"[A-Za-z0-9_]*", inner)
    after = inner[name.end() :] if name else inner
    if end < 0:
        problem = "a ${ without its closing }"
    elif not inner:
        problem = "an empty reference ${}"
    elif not name or not name.group() or name.group()[0].isdigit():
        problem = "a reference not starting with a variable name (a letter or _, then letters,"
        problem += " digits or _)"
    elif "${" in after:
        problem = "a reference inside another (nesting is not supported)"
    else:
        problem = "a reference with something other than }, :-, -, :? or ? after the name"
    leaf = re.sub(r"\[\d+\]$", "", path.rsplit(".", 1)[-1])
    if leaf in _SECRET_KEYS:
        shown = "; the value of a secret is not shown"
    else:
        reference = text[brace : end + 1] if end >= 0 else text[brace:]
        shown = f" in {reference[:60]!r}"
    return f"{problem}{shown} ({_ENV_FORMS})"


class _FlowList(list[object]):
    """A list read from an override variable's ``[…]``, keeping the text for string keys."""

    def __init__(self, items: list[object], text: str) -> None:
        super().__init__(items)
        self.text = text


class _FlowMapping(dict[object, object]):
    """A mapping read from an override variable's ``{…}``, keeping the text for string keys."""

    def __init__(self, items: dict[object, object], text: str) -> None:
        super().__init__(items)
        self.text = text


def _apply_overrides(data: object, env: Mapping[str, str], origins: dict[str, str]) -> object:
    """``CTCT_RELAY_HTTP__TIMEOUT_S=5`` sets ``http.timeout_s``; list items by index. ``origins``
    gets the variable behind each key path it sets or creates (as :meth:`_Reader.key` spells
    it), so an unknown key is reported with its variable."""
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX or name in NOT_OVERRIDES:
            continue
        keys = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        if "" in keys:  # HTTP__ or HTTP____TIMEOUT_S: a key would have no name
            raise ConfigError(
                f"{name}: an empty key name (each '__' separates two key names, as in"
                " CTCT_RELAY_HTTP__TIMEOUT_S)"
            )
        data = _set_path(data, keys, _override_value(env[name]), name, "", origins)
    return data


def _override_value(text: str) -> object:
    """A variable's text as it is: the readers of number and true/false keys read their words.
    Only a YAML flow list or mapping (``[a, b]``, ``{k: v}``) is parsed, for list and mapping
    keys; a string key still gets the text (a token may well start with a bracket)."""
    if not text.lstrip().startswith(("[", "{")):
        return text
    try:
        parsed = yaml.load(text, _Loader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError:
        return text
    if isinstance(parsed, list):
        return _FlowList(parsed, text)
    if isinstance(parsed, dict):
        return _FlowMapping(parsed, text)
    return text


def _set_path(
    node: object, keys: list[str], value: object, var: str, path: str, origins: dict[str, str]
) -> object:
    head, rest = keys[0], keys[1:]
    if isinstance(node, list):
        if not head.isdigit() or int(head) > len(node):
            raise ConfigError(f"{var}: {head!r} is not an index of a list of {len(node)}")
        index = int(head)
        at = f"{path}[{index}]"
        if index == len(node):
            node.append({})
            origins.setdefault(at, var)
        if rest:
            node[index] = _set_path(node[index], rest, value, var, at, origins)
        else:
            node[index] = value
            origins[at] = var
        return node
    if node is None:
        node = {}
    if not isinstance(node, dict):
        raise ConfigError(f"{var}: cannot set a key inside a {type(node).__name__}")
    at = f"{path}.{head}" if path else head
    if head not in node:
        origins.setdefault(at, var)
    if rest:
        child = node.get(head)
        if child is None and rest[0].isdigit():
            child = []
        node[head] = _set_path(child, rest, value, var, at, origins)
    else:
        node[head] = value
        origins[at] = var
    return node
