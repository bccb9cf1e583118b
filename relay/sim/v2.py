"""The /v2 endpoints: one route per catalogue entry, answered from the world.

Routes are the catalogue's own path templates, so the simulator serves exactly what the client
calls. Authentication, limits and faults happen before these handlers (see :mod:`relay.sim.gate`);
handlers only validate parameters, find the resource and render.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

from relay.ctct.catalogue import ENDPOINTS, Endpoint, Scope, Shape
from relay.events import Kind
from relay.sim import render
from relay.sim.params import (
    TRACKING_DEFAULT_LIMIT,
    PageRequest,
    ParamError,
    page_request,
    parse_flag,
    parse_since,
)
from relay.sim.responses import bad_param, json_response, not_found
from relay.sim.state import READ_AT, STATE, SimState
from relay.sim.world import StreamKey, World

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
JsonObject = dict[str, object]

# Campaign statuses of the real API; the simulator only has sent campaigns, so the others
# (accepted, to behave like the API) list nothing.
_CAMPAIGN_STATUSES = {
    "SENT": True,
    "ALL": True,
    "DRAFT": False,
    "RUNNING": False,
    "SCHEDULED": False,
}
_CONTACT_STATUSES = {
    "ALL": True,
    "ACTIVE": True,
    "UNCONFIRMED": False,
    "OPTOUT": False,
    "REMOVED": False,
}
# A campaign summary asked without updateSummary=true is "current as of the last scheduled update"
# (v2 docs); the simulator's schedule (upstream's is not documented) is every whole hour.
SUMMARY_UPDATE_MS = 3_600_000
_SUMMARY_FIELDS = (
    ("sends", Kind.SEND),
    ("opens", Kind.OPEN),
    ("clicks", Kind.CLICK),
    ("forwards", Kind.FORWARD),
    ("unsubscribes", Kind.UNSUBSCRIBE),
    ("bounces", Kind.BOUNCE),
)
# summaryByCampaign rows (v2 docs, and the Java SDK's ContactTrackingSummaryByCampaignReport):
# campaign_id, contact_id and these counts; no sends, no unsubscribes.
_BY_CAMPAIGN_FIELDS = tuple(
    row for row in _SUMMARY_FIELDS if row[1] not in (Kind.SEND, Kind.UNSUBSCRIBE)
)


def routes() -> list[web.RouteDef]:
    """One GET route per catalogue endpoint, named after it."""
    return [web.get(ep.path, _handler(ep), name=ep.name) for ep in ENDPOINTS]


def _handler(endpoint: Endpoint) -> Handler:
    if endpoint.shape is Shape.ACTIVITIES:
        serve: Callable[[SimState, web.Request, Endpoint], object] = _activities
    elif endpoint.shape is Shape.SUMMARY:
        serve = _summary
    elif endpoint.shape is Shape.SUMMARY_LIST:
        serve = _summary_by_campaign
    elif endpoint.scope is Scope.ACCOUNT and endpoint.path.endswith("/campaigns"):
        serve = _campaigns
    else:
        serve = _contacts

    async def handle(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE]
        request[READ_AT] = state.now_ms()
        try:
            return json_response(serve(state, request, endpoint))
        except ParamError as exc:
            raise bad_param(str(exc)) from None

    return handle


def _query(request: web.Request) -> dict[str, str]:
    return dict(request.query.items())


def _paged(request: web.Request, page: PageRequest, more: bool, results: object) -> JsonObject:
    pagination: JsonObject = {}
    if more:
        pagination["next_link"] = f"{request.rel_url.raw_path}?next={page.next_token()}"
    return {"meta": {"pagination": pagination}, "results": results}


def _activities(state: SimState, request: web.Request, endpoint: Endpoint) -> JsonObject:
    page = page_request(_query(request), endpoint.max_limit or 0, TRACKING_DEFAULT_LIMIT)
    since_ms = parse_since(page.params, "created_since")
    key = _stream_key(state.world, endpoint, request.match_info)
    items, more = state.world.stream(key).page(since_ms, page.start, page.limit)
    quirks = state.scenario.quirks
    return _paged(request, page, more, [render.record(a, endpoint.scope, quirks) for a in items])


def _stream_key(world: World, endpoint: Endpoint, match: Mapping[str, str]) -> StreamKey:
    resource_id = match["resource_id"]
    campaign = None
    if endpoint.scope is Scope.CONTACT:
        if world.contact(resource_id) is None:
            raise not_found(f"contact {resource_id} not found")
    else:
        campaign = world.campaign(resource_id)
        if campaign is None:
            raise not_found(f"campaign {resource_id} not found")
    link_id = ""
    if endpoint.needs_link:
        link_id = match["link_id"]
        if not world.knows_link(link_id, campaign):
            raise not_found(f"link {link_id} not found")
    return (endpoint.scope, resource_id, endpoint.kind, link_id)


def _summary(state: SimState, request: web.Request, endpoint: Endpoint) -> JsonObject:
    world, resource_id = state.world, request.match_info["resource_id"]
    if endpoint.scope is Scope.CAMPAIGN:
        current = parse_flag(_query(request), "updateSummary")
        if world.campaign(resource_id) is None:
            raise not_found(f"campaign {resource_id} not found")
        if current:
            counts, updated_ms = world.counts(Scope.CAMPAIGN, resource_id), world.now_ms
        else:
            updated_ms = world.now_ms // SUMMARY_UPDATE_MS * SUMMARY_UPDATE_MS
            counts = world.campaign_counts_at(resource_id, updated_ms)
        body: JsonObject = {name: counts[kind] for name, kind in _SUMMARY_FIELDS}
        body["spam_count"] = world.spam_count(resource_id, updated_ms)
        return body
    if world.contact(resource_id) is None:
        raise not_found(f"contact {resource_id} not found")
    counts = world.counts(Scope.CONTACT, resource_id)
    body = {name: counts[kind] for name, kind in _SUMMARY_FIELDS}
    body["contact_id"] = resource_id  # the v2 docs' contact summary names its contact
    return body


def _summary_by_campaign(
    state: SimState, request: web.Request, endpoint: Endpoint
) -> list[JsonObject]:
    contact_id = request.match_info["resource_id"]
    if state.world.contact(contact_id) is None:
        raise not_found(f"contact {contact_id} not found")
    return [
        {
            "campaign_id": campaign.id,
            "contact_id": contact_id,
            **{name: counts[kind] for name, kind in _BY_CAMPAIGN_FIELDS},
        }
        for campaign, counts in state.world.counts_by_campaign(contact_id)
    ]


def _campaigns(state: SimState, request: web.Request, endpoint: Endpoint) -> JsonObject:
    page = page_request(_query(request), endpoint.max_limit or 0)
    since_ms = parse_since(page.params, "modified_since")
    if not _status_listed(page.params, _CAMPAIGN_STATUSES, "SENT"):
        return _paged(request, page, False, [])
    campaigns, more = state.world.sent_campaigns(since_ms, page.start, page.limit)
    return _paged(request, page, more, [render.campaign_resource(c) for c in campaigns])


def _contacts(state: SimState, request: web.Request, endpoint: Endpoint) -> JsonObject:
    page = page_request(_query(request), endpoint.max_limit or 0)
    since_ms = parse_since(page.params, "modified_since")
    if not _status_listed(page.params, _CONTACT_STATUSES, "ALL"):
        return _paged(request, page, False, [])
    contacts, more = state.world.existing_contacts(since_ms, page.start, page.limit)
    return _paged(request, page, more, [render.contact_resource(c) for c in contacts])


def _status_listed(params: Mapping[str, str], statuses: Mapping[str, bool], default: str) -> bool:
    """Whether the ``status`` filter lists anything; an unknown status is a 400."""
    status = params.get("status", default).upper()
    if status not in statuses:
        known = ", ".join(statuses)
        raise ParamError("status", f"status: expected one of {known}, got {status!r}")
    return statuses[status]
