"""The catalogue of Constant Contact v2 tracking and discovery endpoints, as data.

Each :class:`Endpoint` says where it lives, what it returns and how it pages. The client has one
code path for all of them; adding an endpoint is adding a row here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from urllib.parse import quote

from relay.events import Kind


class Scope(enum.StrEnum):
    """What the ``{resource_id}`` in the path names."""

    CONTACT = "contact"
    CAMPAIGN = "campaign"
    ACCOUNT = "account"  # discovery lists: no resource id


class Shape(enum.StrEnum):
    """The body an endpoint returns."""

    ACTIVITIES = "activities"  # {"meta": {"pagination": …}, "results": [tracking records]}
    RESOURCES = "resources"  # {"meta": {"pagination": …}, "results": [campaigns or contacts]}
    SUMMARY = "summary"  # one JSON object of counts
    SUMMARY_LIST = "summary_list"  # a plain JSON array of per-campaign counts, not paged


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One upstream endpoint."""

    name: str
    path: str  # template with {resource_id} and, for per-link clicks, {link_id}
    scope: Scope
    shape: Shape
    kind: Kind | None = None  # the single kind an activity feed returns; None for mixed or counts
    max_limit: int | None = None  # None: not paged
    since_param: str | None = None  # "created_since" or "modified_since"
    fixed_params: tuple[tuple[str, str], ...] = ()

    @property
    def paged(self) -> bool:
        """Whether the endpoint takes ``limit`` and answers with ``meta.pagination``."""
        return self.max_limit is not None

    @property
    def needs_link(self) -> bool:
        """Whether the path names a link (``clicks/{link_id}``)."""
        return "{link_id}" in self.path

    def url_path(self, resource_id: str | None = None, link_id: str | None = None) -> str:
        """The concrete path; ids are percent-encoded so they cannot escape their segment."""
        if self.scope is not Scope.ACCOUNT and not resource_id:
            raise ValueError(f"endpoint {self.name} needs a {self.scope.value} id")
        if self.needs_link and not link_id:
            raise ValueError(f"endpoint {self.name} needs a link id")
        return self.path.format(
            resource_id=quote(resource_id or "", safe=""), link_id=quote(link_id or "", safe="")
        )


TRACKING_LIMIT = 500
CONTACT_TRACKING = "/v2/contacts/{resource_id}/tracking"
CAMPAIGN_TRACKING = "/v2/emailmarketing/campaigns/{resource_id}/tracking"

# kind -> path suffix of its activity feed, in both scopes
FEEDS: dict[Kind, str] = {
    Kind.BOUNCE: "bounces",
    Kind.CLICK: "clicks",
    Kind.FORWARD: "forwards",
    Kind.OPEN: "opens",
    Kind.SEND: "sends",
    Kind.UNSUBSCRIBE: "unsubscribes",
}


def _feeds(scope: Scope, base: str) -> list[Endpoint]:
    rows = [
        Endpoint(
            f"{scope.value}.{suffix}",
            f"{base}/{suffix}",
            scope,
            Shape.ACTIVITIES,
            kind,
            TRACKING_LIMIT,
            "created_since",
        )
        for kind, suffix in FEEDS.items()
    ]
    rows.append(
        Endpoint(
            f"{scope.value}.clicks_by_link",
            f"{base}/clicks/{{link_id}}",
            scope,
            Shape.ACTIVITIES,
            Kind.CLICK,
            TRACKING_LIMIT,
            "created_since",
        )
    )
    return rows


ENDPOINTS: tuple[Endpoint, ...] = (
    *_feeds(Scope.CONTACT, CONTACT_TRACKING),
    Endpoint(
        "contact.activities",
        CONTACT_TRACKING,
        Scope.CONTACT,
        Shape.ACTIVITIES,
        None,
        TRACKING_LIMIT,
        "created_since",
    ),
    Endpoint(
        "contact.summary", f"{CONTACT_TRACKING}/reports/summary", Scope.CONTACT, Shape.SUMMARY
    ),
    Endpoint(
        "contact.summary_by_campaign",
        f"{CONTACT_TRACKING}/reports/summaryByCampaign",
        Scope.CONTACT,
        Shape.SUMMARY_LIST,
    ),
    *_feeds(Scope.CAMPAIGN, CAMPAIGN_TRACKING),
    Endpoint(
        "campaign.summary",
        f"{CAMPAIGN_TRACKING}/reports/summary",
        Scope.CAMPAIGN,
        Shape.SUMMARY,
        fixed_params=(("updateSummary", "true"),),
    ),
    Endpoint(
        "campaigns.sent",
        "/v2/emailmarketing/campaigns",
        Scope.ACCOUNT,
        Shape.RESOURCES,
        max_limit=50,
        since_param="modified_since",
        fixed_params=(("status", "SENT"),),
    ),
    Endpoint(
        "contacts.modified",
        "/v2/contacts",
        Scope.ACCOUNT,
        Shape.RESOURCES,
        max_limit=500,
        since_param="modified_since",
    ),
)

_BY_NAME = {endpoint.name: endpoint for endpoint in ENDPOINTS}


class UnknownEndpointError(KeyError):
    """An endpoint name that is not in the catalogue."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown endpoint"


def get(name: str) -> Endpoint:
    """The endpoint called ``name``; an unknown name raises an error listing the known ones."""
    try:
        return _BY_NAME[name]
    except KeyError:
        known = ", ".join(sorted(_BY_NAME))
        raise UnknownEndpointError(f"unknown endpoint {name!r}; known endpoints: {known}") from None


def feed(scope: Scope, kind: Kind) -> Endpoint:
    """The activity feed of ``kind`` in ``scope``."""
    return _BY_NAME[f"{scope.value}.{FEEDS[kind]}"]
