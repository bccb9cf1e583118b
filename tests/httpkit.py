"""An HTTP server on 127.0.0.1 for tests whose client must cross a real socket."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web
from aiohttp.test_utils import TestServer
from aiohttp.typedefs import Handler


@asynccontextmanager
async def serving_get(handler: Handler) -> AsyncIterator[str]:
    """A server on a free port of 127.0.0.1 answering every GET with ``handler`` until the block
    ends; its base URL (no trailing slash)."""
    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    async with TestServer(app, host="127.0.0.1") as server:
        yield str(server.make_url("")).rstrip("/")
