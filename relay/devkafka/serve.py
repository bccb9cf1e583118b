"""The body of `ctct-relay dev-kafka`: one dev broker in the foreground until Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from relay.devkafka.broker import DevKafka
from relay.devkafka.dist import ensure_kafka
from relay.devkafka.errors import DevKafkaError


async def serve_dev_kafka(port: int | None, data_dir: Path | None, out: TextIO) -> None:
    """Fetch Kafka if needed and run a broker until cancelled (Ctrl-C) or sent SIGTERM, or
    until the broker dies (then `DevKafkaError` with the end of its log).

    Either way the broker is stopped cleanly; after SIGTERM this returns normally. `data_dir`
    holds the broker's config, data and log and is kept, so topics survive the next run;
    without it a temporary directory is used and removed on exit. Raises `DevKafkaError`.
    """
    if data_dir is not None:
        _check_data_dir(data_dir)
    # In a thread, so a first-use Maven download leaves the loop free to see Ctrl-C.
    dist = await asyncio.to_thread(ensure_kafka)
    terminated = asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        _on_sigterm(stack, terminated.set)
        if data_dir is None:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ctct-kafka-")))
        broker = await stack.enter_async_context(DevKafka(dist, data_dir, port=port))
        print(
            f"Kafka broker ready at {broker.bootstrap_servers} (log: {broker.log_path})",
            file=out,
            flush=True,
        )
        # the broker may die (out of memory, disk full, killed): that must not go unnoticed
        exited = asyncio.ensure_future(broker.exited())
        signalled = asyncio.ensure_future(terminated.wait())
        try:
            await asyncio.wait({exited, signalled}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in (exited, signalled):
                waiting.cancel()
            await asyncio.gather(exited, signalled, return_exceptions=True)
        if not exited.cancelled() and exited.exception() is None:
            raise DevKafkaError(
                f"the broker at {broker.bootstrap_servers} exited (code {exited.result()});"
                f" last lines of {broker.log_path}:\n{broker.log_tail()}"
            )


def _check_data_dir(data_dir: Path) -> None:
    """A directory the broker can write to, or an error naming the option (not a traceback
    from deep in the start, after a Maven download)."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=data_dir):
            pass
    except OSError as exc:
        raise DevKafkaError(
            f"--data-dir {data_dir}: cannot keep the broker's data there: {exc.strerror or exc}"
        ) from None


def _on_sigterm(stack: contextlib.AsyncExitStack, callback: Callable[[], None]) -> None:
    # `kill` or a service manager must stop the broker as Ctrl-C does: the JVM runs in its own
    # session and would otherwise outlive us, holding the port.
    loop = asyncio.get_running_loop()
    try:
        loop.add_signal_handler(signal.SIGTERM, callback)
    except (RuntimeError, NotImplementedError):  # not the main thread, or no signals here
        return
    stack.callback(loop.remove_signal_handler, signal.SIGTERM)
