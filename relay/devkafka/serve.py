"""The body of `ctct-relay dev-kafka`: one dev broker in the foreground until Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from pathlib import Path
from typing import TextIO

from relay.devkafka.broker import DevKafka
from relay.devkafka.dist import ensure_kafka


async def serve_dev_kafka(port: int | None, data_dir: Path | None, out: TextIO) -> None:
    """Fetch Kafka if needed, run a broker until cancelled (Ctrl-C), then stop it cleanly.

    `data_dir` holds the broker's config, data and log and is kept, so topics survive the next
    run; without it a temporary directory is used and removed on exit. Raises `DevKafkaError`.
    """
    # Maven may run for a while on first use; it must not block the loop's signal handling.
    dist = await asyncio.to_thread(ensure_kafka)
    async with contextlib.AsyncExitStack() as stack:
        if data_dir is None:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ctct-kafka-")))
        broker = await stack.enter_async_context(DevKafka(dist, data_dir, port=port))
        print(
            f"Kafka broker ready at {broker.bootstrap_servers} (log: {broker.log_path})",
            file=out,
            flush=True,
        )
        await asyncio.Event().wait()
