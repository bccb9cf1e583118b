"""The operations routes of the admin API: status, streams, pauses, replay, run-time targets,
retiring a sink.

Handlers translate only: query and body checked here (400 naming the field), the work done by the
store (:mod:`relay.store`) and the replay rules (:mod:`relay.api.replay`), JSON out
(:mod:`relay.api.status`). A change the scheduler must know at once (a pause, a resume, a target
added or removed) is announced through the :class:`~relay.api.status.RelayView`.
"""

from __future__ import annotations

import re

import structlog
from aiohttp import web

from relay.api import body, replay
from relay.api.responses import ApiError, JsonObject, bad_request, json_response, not_found
from relay.api.state import NOW_MS, STORE
from relay.api.status import VIEW, RelayView, status, stream_view
from relay.api.views import time_or_null
from relay.events import RESOURCE_ID, RESOURCE_ID_SHAPE
from relay.store import NotFoundError, Store, StoreError, Stream, StreamFilter, StreamKey

STREAM_STATES = ("active", "failing", "paused", "retired")
SCOPES = ("campaign", "contact")
TARGET_KINDS = {"campaigns": "campaign", "contacts": "contact"}
DEFAULT_STREAM_LIMIT = 100
MAX_STREAM_LIMIT = 1000
MAX_OFFSET = 10**9
MAX_STREAM_ID = 2**63 - 1
MAX_REASON_CHARS = 500
MAX_TARGETS = 1000
# not "." or "..": as a path segment (/v1/accounts/../pause) every URL-normalising client
# (ctct-relay, curl, browsers) sends another path; one group, so "^" + pattern + "$" holds
ACCOUNT_NAME = re.compile(
    r"(?:[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}|\.[A-Za-z0-9_-]|\.[A-Za-z0-9_.-]{2,99})", re.ASCII
)
ACCOUNT_SHAPE = "1 to 100 letters, digits, '_', '.' or '-', other than . and .."
_DIGITS = re.compile(r"[0-9]{1,19}", re.ASCII)
_LIST_QUERY = ("account", "scope", "state", "replaying", "limit", "offset")
DEAD_LETTER_SINKS = ("kafka",)  # webhook deliveries given up on are listed with their webhook
DEFAULT_DEAD_LETTER_LIMIT = 100
MAX_DEAD_LETTER_LIMIT = 1000

log = structlog.get_logger(__name__)


def routes(*, with_status: bool = True) -> web.RouteTableDef:
    """The routes this module serves (``with_status``: also ``GET /v1/status``)."""
    table = web.RouteTableDef()
    if with_status:
        table.get("/v1/status", allow_head=False)(_status)
    table.get("/v1/streams", allow_head=False)(_list)
    table.get("/v1/streams/{stream_id}", allow_head=False)(_show)
    table.post("/v1/streams/{stream_id}/pause")(_pause_stream)
    table.post("/v1/streams/{stream_id}/resume")(_resume_stream)
    table.post("/v1/streams/{stream_id}/replay")(_replay_stream)
    table.post("/v1/accounts/{account}/pause")(_hold_account)
    table.post("/v1/accounts/{account}/resume")(_release_account)
    table.post("/v1/accounts/{account}/replay")(_replay_account)
    table.get("/v1/accounts/{account}/targets", allow_head=False)(_targets)
    table.post("/v1/accounts/{account}/targets")(_add_targets)
    table.delete("/v1/accounts/{account}/targets/{kind}/{resource_id}")(_remove_target)
    table.get("/v1/dead-letters", allow_head=False)(_dead_letters)
    table.delete("/v1/sinks/{sink}")(_forget_sink)
    return table


async def _status(request: web.Request) -> web.Response:
    body.check_query(request, ())
    store, now = request.app[STORE], request.app[NOW_MS]()
    return json_response(await status(store, request.app[VIEW], now))


async def _list(request: web.Request) -> web.Response:
    body.check_query(request, _LIST_QUERY)
    account = _query(request, "account")
    if account is not None and not ACCOUNT_NAME.fullmatch(account):
        raise bad_request(f"account: expected {ACCOUNT_SHAPE}, got {body.clip(account)!r}")
    scope = _choice(request, "scope", SCOPES)
    state = _choice(request, "state", STREAM_STATES)
    replaying = _choice(request, "replaying", ("true", "false"))
    limit = _integer(request, "limit", DEFAULT_STREAM_LIMIT, 1, MAX_STREAM_LIMIT)
    offset = _integer(request, "offset", 0, 0, MAX_OFFSET)
    store, now, view = request.app[STORE], request.app[NOW_MS](), request.app[VIEW]
    where = StreamFilter(account, scope, state, None if replaying is None else replaying == "true")
    page, total = await store.stream_page(where, limit, offset)
    replays = await store.replays()
    return json_response(
        {
            "streams": [stream_view(s, replays.get(s.id), now, view) for s in page],
            "total": total,
            "limit": limit,
            "offset": offset,
        }
    )


async def _dead_letters(request: web.Request) -> web.Response:
    """A sink's dead letters, oldest first, with how many it holds in all."""
    body.check_query(request, ("sink", "limit"))
    sink = _choice(request, "sink", DEAD_LETTER_SINKS) or DEAD_LETTER_SINKS[0]
    limit = _integer(request, "limit", DEFAULT_DEAD_LETTER_LIMIT, 1, MAX_DEAD_LETTER_LIMIT)
    store, redact = request.app[STORE], request.app[VIEW].redact
    letters = await store.dead_letters(sink, limit)
    total = (await store.dead_letter_counts()).get(sink, 0)
    return json_response(
        {
            "dead_letters": [
                {
                    "sink": d.sink,
                    "seq": d.seq,
                    "event_id": d.event_id,
                    # an error text, stored as the sink saw it: redacted as status's are
                    "reason": redact(d.reason),
                    "created_at": time_or_null(d.created_ms),
                }
                for d in letters
            ],
            "total": max(total, len(letters)),
            "limit": limit,
        }
    )


async def _show(request: web.Request) -> web.Response:
    body.check_query(request, ())
    store = request.app[STORE]
    stream = await _stream(store, body.path_integer(request, "stream_id", MAX_STREAM_ID))
    return await _stream_answer(request, stream)


async def _pause_stream(request: web.Request) -> web.Response:
    return await _set_paused(request, paused=True)


async def _resume_stream(request: web.Request) -> web.Response:
    return await _set_paused(request, paused=False)


async def _set_paused(request: web.Request, *, paused: bool) -> web.Response:
    # no fields; a body, if sent, must be a JSON object without unknown fields
    body.check_fields(await body.read_object(request, optional=True), ())
    store = request.app[STORE]
    stream = await _stream(store, body.path_integer(request, "stream_id", MAX_STREAM_ID))
    await store.set_paused(stream.id, paused)
    log.info("api.stream_paused" if paused else "api.stream_resumed", stream=str(stream.key))
    await request.app[VIEW].changed()
    return await _stream_answer(request, await store.stream(stream.id))


async def _replay_stream(request: web.Request) -> web.Response:
    store = request.app[STORE]
    stream = await _stream(store, body.path_integer(request, "stream_id", MAX_STREAM_ID))
    ask = replay.parse(await body.read_object(request), allow_campaign=False)
    if stream.retired and ask.source == replay.UPSTREAM:
        raise ApiError(409, f"stream {stream.id} is retired: it is not polled any more")
    now = request.app[NOW_MS]()
    result = await replay.run(store, ask, stream.key.account, [stream], now, stream_id=stream.id)
    return json_response(result, 202)


async def _hold_account(request: web.Request) -> web.Response:
    data = await body.read_object(request, optional=True)
    body.check_fields(data, ("reason",))
    reason = body.string(data, "reason", max_chars=MAX_REASON_CHARS) if "reason" in data else ""
    account = await _account(request)
    store, now = request.app[STORE], request.app[NOW_MS]()
    await store.hold_account(account, reason or "paused by an operator", now)
    log.info("api.account_paused", account=account)
    await request.app[VIEW].changed()
    return await _account_answer(store, account)


async def _release_account(request: web.Request) -> web.Response:
    body.check_fields(await body.read_object(request, optional=True), ())
    account = await _account(request)
    store = request.app[STORE]
    if await store.release_account(account):
        log.info("api.account_resumed", account=account)
    await request.app[VIEW].changed()
    return await _account_answer(store, account)


async def _replay_account(request: web.Request) -> web.Response:
    account = await _account(request)
    ask = replay.parse(await body.read_object(request), allow_campaign=True)
    store = request.app[STORE]
    streams = [s for s in await store.streams(account) if not s.retired]
    if ask.campaign_id is not None and ask.source == replay.UPSTREAM:
        streams = [s for s in streams if s.key == StreamKey(account, "campaign", ask.campaign_id)]
        if not streams:
            raise not_found(f"campaign: account {account!r} polls no campaign {ask.campaign_id!r}")
    result = await replay.run(store, ask, account, streams, request.app[NOW_MS]())
    return json_response(result, 202)


async def _targets(request: web.Request) -> web.Response:
    body.check_query(request, ())
    account = await _account(request)
    store = request.app[STORE]
    return json_response(await _targets_view(store, account))


async def _add_targets(request: web.Request) -> web.Response:
    account = await _account(request)
    data = await body.read_object(request)
    body.check_fields(data, tuple(TARGET_KINDS))
    keys: list[StreamKey] = []
    for field, scope in TARGET_KINDS.items():
        if field in data:
            ids = body.string_list(data, field, max_items=MAX_TARGETS, max_chars=64)
            for index, rid in enumerate(ids):
                if not RESOURCE_ID.fullmatch(rid):
                    raise bad_request(
                        f"{field}[{index}]: expected {RESOURCE_ID_SHAPE}, got {rid!r}"
                    )
            keys += [StreamKey(account, scope, rid) for rid in dict.fromkeys(ids)]
    if not keys:
        raise bad_request("campaigns, contacts: give at least one id")
    store, now = request.app[STORE], request.app[NOW_MS]()
    # the mark first: the other way round, a failure between the two left a stream without
    # it, which discovery's full scan could retire for its age
    await store.add_targets(keys, now)
    created = await store.ensure_streams(keys, now)
    log.info("api.targets_added", account=account, targets=len(keys), created=created)
    await request.app[VIEW].changed()
    answer = await _targets_view(store, account)
    return json_response({**answer, "created": created}, 201 if created else 200)


async def _remove_target(request: web.Request) -> web.Response:
    account = await _account(request)
    kind = request.match_info["kind"]
    scope = TARGET_KINDS.get(kind)
    if scope is None:
        raise bad_request(f"kind: expected campaigns or contacts, got {kind[:40]!r}")
    rid = body.path_resource_id(request, "resource_id")
    store, now = request.app[STORE], request.app[NOW_MS]()
    if not await store.remove_targets([StreamKey(account, scope, rid)], now):
        raise not_found(f"account {account!r} does not poll {scope} {rid!r}")
    log.info("api.target_removed", account=account, scope=scope, resource_id=rid)
    await request.app[VIEW].changed()
    return web.Response(status=204)


async def _forget_sink(request: web.Request) -> web.Response:
    """Retire a sink: its stored cursor goes, so the outbox prune no longer keeps the events it
    has not published (every stored cursor holds the prune back, configured or not)."""
    sink = request.match_info["sink"]
    view: RelayView = request.app[VIEW]
    if sink in view.sinks:  # webhook fan-out always; a sink this replica runs would write it again
        raise ApiError(
            409,
            f"sink {sink!r} is configured on this replica: remove it from the config of every"
            " replica (and restart them) before forgetting it",
        )
    store: Store = request.app[STORE]
    if not ACCOUNT_NAME.fullmatch(sink) or not await store.forget_sink(sink):
        raise not_found(f"no stored cursor of a sink named {body.clip(sink)!r}")
    log.warning("api.sink_forgotten", sink=sink)
    return web.Response(status=204)


# -- helpers ------------------------------------------------------------------------------------


async def _stream_answer(request: web.Request, stream: Stream) -> web.Response:
    store, now, view = request.app[STORE], request.app[NOW_MS](), request.app[VIEW]
    replay = await store.stream_replay(stream.id)
    since = None if replay is None else replay.since_ms
    return json_response(stream_view(stream, since, now, view))


async def _account_answer(store: Store, account: str) -> web.Response:
    hold = (await store.account_holds()).get(account)
    held = None if hold is None else {"since": time_or_null(hold[0]), "reason": hold[1]}
    return json_response({"account": account, "held": held})


async def _targets_view(store: Store, account: str) -> JsonObject:
    streams = [s for s in await store.streams(account) if not s.retired]
    removed = sorted(await store.removed_targets(account), key=lambda k: (k.scope, k.resource_id))
    return {
        "account": account,
        "campaigns": [s.key.resource_id for s in streams if s.key.scope == "campaign"],
        "contacts": [s.key.resource_id for s in streams if s.key.scope == "contact"],
        "removed": [{"scope": k.scope, "resource_id": k.resource_id} for k in removed],
    }


async def _stream(store: Store, stream_id: int) -> Stream:
    """The stream of an id from the path; one that does not exist is a 404."""
    try:
        return await store.stream(stream_id)
    except NotFoundError:
        raise not_found(f"no stream with id {stream_id}") from None
    except StoreError as exc:
        if str(exc).startswith("no stream"):  # the SQLite store's way of saying "not found"
            raise not_found(f"no stream with id {stream_id}") from None
        raise


async def _account(request: web.Request) -> str:
    """The account a path names: one the relay runs (when it says which) or one it stored."""
    name = request.match_info["account"]
    view: RelayView = request.app[VIEW]
    if view.accounts:
        if name not in view.accounts:
            known = ", ".join(sorted(view.accounts))
            raise not_found(f"no account named {body.clip(name)!r} (configured: {known})")
        return name
    if not ACCOUNT_NAME.fullmatch(name):
        raise not_found(f"no account named {body.clip(name)!r}")
    return name


def _query(request: web.Request, name: str) -> str | None:
    values = request.query.getall(name, [])
    if len(values) > 1:
        raise bad_request(f"{name}: given more than once")
    return values[0] if values else None


def _choice(request: web.Request, name: str, allowed: tuple[str, ...]) -> str | None:
    value = _query(request, name)
    if value is not None and value not in allowed:
        raise bad_request(f"{name}: expected one of {', '.join(allowed)}, got {body.clip(value)!r}")
    return value


def _integer(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    text = _query(request, name)
    if text is None:
        return default
    if not _DIGITS.fullmatch(text) or not low <= int(text) <= high:
        raise bad_request(
            f"{name}: expected an integer from {low} to {high}, got {body.clip(text)!r}"
        )
    return int(text)
