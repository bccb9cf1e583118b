"""``ctct-relay demo``: the simulator and the client at work, in one process, in the terminal.

Starts the simulator on a free loopback port, then polls it the way the relay does: discover sent
campaigns, read each campaign's summary (one request) and fetch only the feeds whose counts
changed, from a watermark with an overlap, dropping what was already seen. Every new activity is
printed as one line. State is in memory; the durable pipeline is ``ctct-relay run``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import datetime, timedelta
from typing import TextIO

import aiohttp
from aiohttp import web

from relay.ctct import catalogue
from relay.ctct.catalogue import Scope
from relay.ctct.client import Credentials, CtctClient
from relay.ctct.errors import CtctError
from relay.ctct.ratelimit import Budget, RateLimiter
from relay.events import Activity, DedupKey, Kind, parse_activity
from relay.sim import Scenario, create_app

OVERLAP = timedelta(minutes=10)


class DemoPoller:
    """Summary-gated polling of every sent campaign, with in-memory watermarks and dedup."""

    def __init__(self, client: CtctClient, out: TextIO) -> None:
        self._client = client
        self._out = out
        self._counts: dict[str, dict[str, object]] = {}
        self._watermarks: dict[tuple[str, Kind], datetime] = {}
        self._seen: set[DedupKey] = set()
        self.events = 0

    async def pass_once(self) -> None:
        """One pass over every campaign the account has sent."""
        campaigns = [
            str(row["id"])
            async for page in self._client.pages(catalogue.get("campaigns.sent"))
            for row in page.records
        ]
        for campaign in campaigns:
            summary = await self._client.fetch(
                catalogue.get("campaign.summary"), resource_id=campaign
            )
            if not isinstance(summary, dict):
                continue
            before = self._counts.get(campaign, {})
            self._counts[campaign] = summary
            for kind in Kind:
                field = catalogue.FEEDS[kind]  # summary counts are named like the feeds
                if summary.get(field) != before.get(field) and summary.get(field):
                    await self._poll(campaign, kind)

    async def _poll(self, campaign: str, kind: Kind) -> None:
        mark = self._watermarks.get((campaign, kind))
        since = mark - OVERLAP if mark else None
        newest = mark
        endpoint = catalogue.feed(Scope.CAMPAIGN, kind)
        async for page in self._client.pages(endpoint, resource_id=campaign, since=since):
            for record in page.records:
                activity = parse_activity(record, account="demo", kind=kind)
                newest = max(newest or activity.occurred_at, activity.occurred_at)
                if activity.dedup_key not in self._seen:
                    self._seen.add(activity.dedup_key)
                    self._show(activity)
        if newest:
            self._watermarks[(campaign, kind)] = newest

    def _show(self, a: Activity) -> None:
        self.events += 1
        extra = f" link {a.link_id}" if a.link_id else ""
        extra += f" code {a.bounce_code}" if a.bounce_code else ""
        when = a.occurred_at.strftime("%H:%M:%S.%f")[:-3]
        print(
            f"{when}  {a.kind.value:11} campaign {a.campaign_id}  contact {a.contact_id:>6}"
            f"{extra}  id {a.event_id[:8]}",
            file=self._out,
            flush=True,
        )


async def run_demo(scenario: Scenario, duration_s: float | None, out: TextIO) -> int:
    """Run the simulator and the polling loop until ``duration_s`` passes or Ctrl-C."""
    runner = web.AppRunner(create_app(scenario), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    base = f"http://{host}:{port}"
    key = scenario.keys[0]
    print(f"simulator: {base} (ground truth: {base}/_sim/truth)", file=out)
    print("polling sent campaigns; new activities below (Ctrl-C to stop)", file=out, flush=True)
    deadline = None if duration_s is None else time.monotonic() + duration_s
    try:
        async with aiohttp.ClientSession() as session:
            budget = Budget(requests_per_second=float(key.qps or 4), reserved_share=0.0)
            client = CtctClient(
                session, Credentials(base, key.api_key, key.access_token), RateLimiter(budget)
            )
            poller = DemoPoller(client, out)
            with contextlib.suppress(asyncio.CancelledError):
                while deadline is None or time.monotonic() < deadline:
                    try:
                        await poller.pass_once()
                    except CtctError as exc:
                        print(f"upstream error: {exc}", file=out, flush=True)
                    await asyncio.sleep(1.0)
            print(
                f"demo: {poller.events} events from {client.requests_sent} API requests",
                file=out,
                flush=True,
            )
    finally:
        await runner.cleanup()
    return 0
