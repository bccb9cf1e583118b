"""One single-node KRaft broker (combined broker and controller) in a child JVM.

The broker is a plain `subprocess.Popen` child rather than an asyncio subprocess, so its handle
is not tied to the event loop that started it: a synchronous pytest fixture can start it under
one `asyncio.run()` and stop it under another.

The JVM runs in its own session, so Ctrl-C at a terminal reaches only us and we stop it in order;
the price is that it would outlive a process that ends without stopping it, holding its ports
and heap. So the JVMs this process runs are tracked here and stopped (SIGTERM, then SIGKILL after
their grace) when the process is sent SIGTERM, whose default action would end it without any
cleanup (a handler is installed only where SIGTERM has its default action, and it ends the
process with SIGTERM as before), and at interpreter exit (Ctrl-C in a program that never stopped
its broker). A SIGKILLed process still leaves its broker behind: nothing can run then.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path
from types import FrameType, TracebackType
from typing import Self

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from relay.devkafka.dist import KafkaDist
from relay.devkafka.errors import TAIL_LINES, DevKafkaError, tail

# A dev broker that runs out of heap should die where the log shows it, not limp on.
JVM_OPTS = ("-Xms256m", "-Xmx512m", "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true")

# Console-only logging: the child's stdout is the broker log file. Config dumps and per-request
# chatter are silenced so the tail quoted in errors shows what went wrong.
_LOG4J = """\
log4j.rootLogger=INFO, stdout
log4j.appender.stdout=org.apache.log4j.ConsoleAppender
log4j.appender.stdout.layout=org.apache.log4j.PatternLayout
log4j.appender.stdout.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.request.logger=WARN
log4j.logger.state.change.logger=WARN
log4j.logger.org.apache.kafka.common.config.AbstractConfig=WARN
log4j.logger.kafka.server.KafkaConfig=WARN
"""


class DevKafka:
    """One single-node KRaft broker on 127.0.0.1 whose config, data and log live in `work_dir`.

    Ports are chosen on the first start (`port` fixes the client one) and kept, so `restart()`,
    or `start()` after `kill()`, brings the broker back where clients expect it, with its data.
    Topics must be created explicitly unless `auto_create_topics`; `num_partitions` applies to
    topics created without a count. The log file is appended to across restarts and kept.
    """

    def __init__(
        self,
        dist: KafkaDist,
        work_dir: Path,
        *,
        port: int | None = None,
        auto_create_topics: bool = False,
        num_partitions: int = 1,
        ready_timeout_s: float = 60.0,
        stop_grace_s: float = 15.0,
    ) -> None:
        self.dist = dist
        self.work_dir = work_dir
        self.data_dir = work_dir / "data"
        self.log_path = work_dir / "broker.log"
        self.auto_create_topics = auto_create_topics
        self.num_partitions = num_partitions
        self.ready_timeout_s = ready_timeout_s
        self.stop_grace_s = stop_grace_s
        self._port = port
        self._controller_port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        """`host:port` of the PLAINTEXT listener, fixed from the first start on."""
        if self._port is None:
            raise DevKafkaError("the broker has no port until it is started")
        return f"127.0.0.1:{self._port}"

    @property
    def pid(self) -> int | None:
        """Process id of the broker JVM while it runs."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    async def start(self) -> None:
        """Start the broker and return once it answers a metadata request."""
        if self.pid is not None:
            raise DevKafkaError(f"the broker at {self.bootstrap_servers} is already running")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if self._port is None:
            self._port = _free_port()
        _check_port_free(self._port)
        while self._controller_port in (None, self._port):
            self._controller_port = _free_port()
        config = self._write_config()
        if not (self.data_dir / "meta.properties").exists():
            await self._format(config)
        self._proc = self._launch(
            f"starting broker on {self.bootstrap_servers}", "kafka.Kafka", str(config)
        )
        try:
            await self._wait_ready()
        except BaseException:
            proc, self._proc = self._proc, None
            if proc is not None:
                _kill(proc)  # never leak a half-started JVM, also on cancellation
            raise

    async def stop(self) -> None:
        """Shut the broker down cleanly (SIGTERM), killing it after `stop_grace_s`."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.poll() is None:
                proc.terminate()
                await _wait_exit(proc, self.stop_grace_s)
        finally:
            _kill(proc)  # after the grace period, or if we are cancelled while waiting

    async def kill(self) -> None:
        """SIGKILL the broker, as a crash would: no clean shutdown, data on disk kept."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            await _wait_exit(proc, 10.0)
            _kill(proc)  # reaped by now; also forgets it

    async def restart(self) -> None:
        """Stop the broker if it runs, then start it again on the same ports and data."""
        await self.stop()
        await self.start()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def exited(self, poll_s: float = 0.5) -> int:
        """Wait until the broker process ends by itself; its exit code. (Polled: no thread
        stays blocked in ``wait`` when the caller gives up.)"""
        proc = self._proc
        if proc is None:
            raise DevKafkaError("the broker is not running")
        while (code := proc.poll()) is None:  # noqa: ASYNC110 (a process end sets no Event)
            await asyncio.sleep(poll_s)
        return code

    def log_tail(self, lines: int = TAIL_LINES) -> str:
        """The last lines of the broker log, for error messages and failing tests."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no broker log yet)"
        return tail(text.splitlines(), lines)

    def _write_config(self) -> Path:
        listeners = (
            f"PLAINTEXT://127.0.0.1:{self._port},CONTROLLER://127.0.0.1:{self._controller_port}"
        )
        settings = {
            "process.roles": "broker,controller",
            "node.id": "1",
            # A static voter set (not --standalone) lets a kept data dir start on new ports.
            "controller.quorum.voters": f"1@127.0.0.1:{self._controller_port}",
            "listeners": listeners,
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self._port}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": str(self.num_partitions),
            "auto.create.topics.enable": str(self.auto_create_topics).lower(),
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "offsets.topic.replication.factor": "1",
            # One partition each: fifty would make the first consumer group wait for them.
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "1",
            "group.initial.rebalance.delay.ms": "0",
            # Small thread pools and cleaner buffer keep one dev broker light.
            "num.network.threads": "2",
            "num.io.threads": "2",
            "background.threads": "2",
            "log.cleaner.dedupe.buffer.size": "8388608",
            # After a kill the controller refuses the restarted broker until the old incarnation's
            # session expires (9 s by default); a short session makes outage tests quick.
            "broker.heartbeat.interval.ms": "500",
            "broker.session.timeout.ms": "3000",
        }
        path = self.work_dir / "server.properties"
        path.write_text("".join(f"{key}={value}\n" for key, value in settings.items()))
        (self.work_dir / "log4j.properties").write_text(_LOG4J)
        return path

    def _java(self, main_class: str, *args: str) -> list[str]:
        log4j = (self.work_dir / "log4j.properties").as_uri()
        classpath = f"{self.dist.libs_dir}{os.sep}*"
        options = [*JVM_OPTS, f"-Dlog4j.configuration={log4j}", "-cp", classpath]
        return [str(self.dist.java), *options, main_class, *args]

    async def _format(self, config: Path) -> None:
        args = ("format", "-t", _cluster_id(), "-c", str(config))
        proc = self._launch("formatting storage", "kafka.tools.StorageTool", *args)
        try:
            await _wait_exit(proc, self.ready_timeout_s)
        finally:
            _kill(proc)  # a no-op once it has exited
        if proc.returncode != 0:
            raise DevKafkaError(
                f"formatting Kafka storage in {self.data_dir} failed (exit {proc.returncode}); "
                f"last lines of {self.log_path}:\n{self.log_tail()}"
            )

    def _launch(self, banner: str, main_class: str, *args: str) -> subprocess.Popen[bytes]:
        # Popen, not asyncio's subprocess: the handle must outlive the loop that started it.
        # It only forks; all waiting on the child happens off the loop.
        with self.log_path.open("ab") as log:
            log.write(f"=== {banner} ===\n".encode())
            log.flush()
            proc = subprocess.Popen(  # noqa: S603 - argv built here from the resolved java
                self._java(main_class, *args),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.work_dir,
                # Its own session: Ctrl-C at a terminal reaches only us, and we stop it in order.
                start_new_session=True,
            )
        _track(proc, self.stop_grace_s)
        return proc

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise DevKafkaError(
                    f"the Kafka broker exited (code {code}) before it was ready; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            if await _answers_metadata(self.bootstrap_servers):
                return
            if time.monotonic() >= deadline:
                raise DevKafkaError(
                    f"the Kafka broker at {self.bootstrap_servers} did not answer a metadata "
                    f"request within {self.ready_timeout_s:.0f} s; "
                    f"last lines of {self.log_path}:\n{self.log_tail()}"
                )
            await asyncio.sleep(0.2)


async def _answers_metadata(bootstrap: str, timeout_s: float = 5.0) -> bool:
    # A TCP probe first: aiokafka logs an error for every refused bootstrap, which would bury
    # the useful lines while the JVM is still starting.
    host, port = bootstrap.rsplit(":", 1)
    try:
        async with asyncio.timeout(1.0):
            _, writer = await asyncio.open_connection(host, int(port))
        writer.close()
        await writer.wait_closed()
    except (OSError, TimeoutError):
        return False
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        client_id="ctct-relay-devkafka",
        request_timeout_ms=int(timeout_s * 1000),
    )
    try:
        async with asyncio.timeout(timeout_s):
            await admin.start()
            cluster = await admin.describe_cluster()
    except (KafkaError, OSError, TimeoutError):
        return False
    finally:
        await admin.close()
    return bool(cluster.get("brokers"))


async def _wait_exit(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    # A thread instead of an asyncio child watcher keeps the handle usable from any loop.
    with contextlib.suppress(subprocess.TimeoutExpired):
        await asyncio.to_thread(proc.wait, timeout_s)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    # Synchronous, so it also runs in cleanup paths entered by cancellation; a SIGKILLed
    # process is reaped within milliseconds.
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)
    _RUNNING.pop(proc, None)


# The JVMs this process started and has not reaped, with their stop grace (see the docstring).
_RUNNING: dict[subprocess.Popen[bytes], float] = {}
_owner_pid: int | None = None  # the process that filled _RUNNING (a fork inherits the dict)


def _track(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    global _owner_pid
    if _owner_pid != os.getpid():
        _owner_pid = os.getpid()
        _RUNNING.clear()  # a forked child's copy: those JVMs are its parent's
    _RUNNING[proc] = grace_s
    # only where SIGTERM would end the process unhandled: a program that handles it (the relay's
    # commands do) stops its broker on its own orderly path
    main = threading.current_thread() is threading.main_thread()
    if main and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _stop_running_then_terminate)


@atexit.register
def _stop_running() -> None:
    """Stop every JVM this process still runs: SIGTERM, and SIGKILL after its grace."""
    if _owner_pid != os.getpid():
        return
    procs = [p for p in list(_RUNNING) if p.poll() is None]
    for proc in procs:
        with contextlib.suppress(OSError):
            proc.terminate()
    deadline = time.monotonic() + max((_RUNNING.get(p, 0.0) for p in procs), default=0.0)
    for proc in procs:
        # this may run in a signal handler: nothing may escape into the interrupted code
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            _kill(proc)


def _stop_running_then_terminate(signum: int, _frame: FrameType | None) -> None:
    # SIGTERM with its default action would end the process without any cleanup: stop the
    # brokers, then end as that default action would have (exit status 128 + 15)
    _stop_running()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _check_port_free(port: int) -> None:
    # Same SO_REUSEADDR as the JVM's listener, so a restart is not refused by TIME_WAIT leftovers.
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            raise DevKafkaError(
                f"port {port} on 127.0.0.1 is in use; choose another, or none for a free one"
            ) from exc


def _cluster_id() -> str:
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):  # the tool's option parser would read it as a flag
            return cluster_id
