"""Kafka brokers and sinks as the integration tests drive them: a broker started for a fixture
or failed with its cause, a sink running until stopped, and waiting for a condition."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import pytest

from relay.devkafka import DevKafka, DevKafkaError
from relay.events import Activity
from relay.sinks.kafka import KafkaSink
from relay.store import Store, StreamKey


def start_or_fail(broker: DevKafka, what: str) -> None:
    """Start ``broker`` on a loop of its own (a fixture wider than a test must not tie it to a
    test's loop), or fail naming ``what`` and the cause."""
    error = None
    try:
        asyncio.run(broker.start())
    except DevKafkaError as exc:
        error = str(exc)
    if error is not None:  # outside the except: no chained traceback
        pytest.fail(f"cannot start {what}: {error}", pytrace=False)


async def until(check: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> float:
    """Poll ``check`` until true; the seconds it took. Fails naming ``what``."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        await asyncio.sleep(0.1)
    return time.monotonic() - started


class Running:
    """A sink publishing the outbox of ``store`` until ``stop()``."""

    def __init__(self, sink: KafkaSink, store: Store) -> None:
        self.sink = sink
        self.store = store
        self.halt = asyncio.Event()
        self.task = asyncio.create_task(sink.run(self.halt))

    async def commit(self, page: list[Activity]) -> int:
        """Commit ``page``; the outbox head after it."""
        await self.store.ensure_streams([StreamKey("acme", "campaign", "1")], 0)
        [stream] = await self.store.streams()
        await self.store.commit_page(stream.id, page, 0)
        self.sink.notify()
        return await self.store.outbox_head()

    async def caught_up(self, timeout_s: float = 60) -> None:
        head = await self.store.outbox_head()

        async def reached() -> bool:
            assert not self.task.done(), self.task
            return await self.store.sink_cursor("kafka") == head

        await until(reached, timeout_s, f"the sink's cursor at the outbox head {head}")

    async def stop(self, timeout_s: float = 120) -> float:
        """Stop the sink within ``timeout_s``; the seconds ``run`` took to return."""
        started = time.monotonic()
        self.halt.set()
        await asyncio.wait_for(self.task, timeout_s)
        return time.monotonic() - started


class BootstrapProxy:
    """A TCP relay on 127.0.0.1 in front of a broker, for ``bootstrap_servers``: clients learn
    the broker's advertised address from it and connect there directly afterwards, so holding
    it (``hold``: connections accepted, never answered) fails only new bootstraps, as a broker
    address that stopped answering would."""

    def __init__(self, broker: str) -> None:
        host, port = broker.rsplit(":", 1)
        self._broker = (host, int(port))
        self.held = False
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"127.0.0.1:{port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accepted, "127.0.0.1", 0)

    def hold(self, held: bool = True) -> None:
        """From now on, answer new connections (False) or leave them unanswered (True)."""
        self.held = held

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for pipe in self._pipes:
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self.held:
                while await reader.read(65536):  # swallowed: the client waits for an answer
                    pass
                return
            up_reader, up_writer = await asyncio.open_connection(*self._broker)
            pipes = [
                asyncio.create_task(_pipe(reader, up_writer)),
                asyncio.create_task(_pipe(up_reader, writer)),
            ]
            self._pipes.update(pipes)
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            for pipe in pipes:
                pipe.cancel()
                self._pipes.discard(pipe)
            up_writer.close()
        except OSError:
            pass
        finally:
            writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
