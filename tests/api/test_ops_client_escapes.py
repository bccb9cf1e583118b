"""The operations commands print API-stored text escaped: it cannot drive the terminal."""

from __future__ import annotations

from pytest_aiohttp import AiohttpServer

from relay.api import AdminSettings, create_admin_app
from relay.api.status import AccountQuota, RelayView
from relay.sinks.ssrf import Guard
from relay.store import Store
from tests.api.conftest import TOKEN, Clock
from tests.api.test_ops_client import Cli


async def test_a_pause_reason_cannot_drive_the_terminal(
    aiohttp_server: AiohttpServer, store: Store, clock: Clock
) -> None:
    """status prints an operator's pause reason with its escape sequences shown, not obeyed."""
    view = RelayView(accounts={"acme": AccountQuota("acme", 9000, lambda: 100)})
    app = create_admin_app(
        store, AdminSettings(token=TOKEN), guard=Guard(), now_ms=clock, view=view
    )
    cli = Cli(str((await aiohttp_server(app)).make_url("")))
    status, _, _ = await cli("pause", "--account", "acme", "--reason", "\x1b[2Jwiped\x07")
    assert status == 0
    status, out, err = await cli("status")
    assert (status, err) == (0, "")
    assert "\x1b" not in out
    assert "\x07" not in out
    assert "\\x1b[2Jwiped\\x07" in out
