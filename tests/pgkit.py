"""A throwaway PostgreSQL cluster for tests and benchmarks.

``$RELAY_TEST_POSTGRES_URL`` or ``$DATABASE_URL`` names a server to use instead. Otherwise the
server binaries are found (``PATH``, ``/usr/lib/postgresql/*/bin``) or, when missing and running
as root, the distribution's ``postgresql`` package is installed with apt-get; then ``initdb``
creates a cluster in a temporary directory that listens on 127.0.0.1 only, on a free port, with
its unix socket inside that directory. As root, initdb and the server run as ``nobody`` (PostgreSQL
refuses to run as root). ``python -m tests.pgkit --ensure`` only makes sure the binaries are
there (``make postgres-server``), so no test waits on apt.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg

ENV_URLS = ("RELAY_TEST_POSTGRES_URL", "DATABASE_URL")
PACKAGE = "postgresql"


class PgKitError(Exception):
    """The test cluster could not be set up; the message says what is missing."""


def external_url() -> str | None:
    """A server given by the environment, if any."""
    for name in ENV_URLS:
        value = os.environ.get(name)
        if value:
            return value
    return None


def find_bindir() -> Path | None:
    """The directory holding initdb and pg_ctl, newest version first."""
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).resolve().parent
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(candidate) / "initdb").exists() and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    return None


def ensure_server() -> Path:
    """The server binaries, installed with apt-get (as root) when they are missing."""
    found = find_bindir()
    if found is not None:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise PgKitError(
            "the PostgreSQL tests need the PostgreSQL server (initdb, pg_ctl): install it"
            " (e.g. `apt-get install postgresql`) or set RELAY_TEST_POSTGRES_URL"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", PACKAGE],
    ):
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise PgKitError(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}"[-4000:])
    found = find_bindir()
    if found is None:
        raise PgKitError(f"installed {PACKAGE}, but initdb and pg_ctl are still not found")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Cluster:
    """One initdb'd cluster in a temporary directory; ``start``, ``restart``, ``stop``."""

    def __init__(self, *, fsync: bool = False) -> None:
        self.bindir = ensure_server()
        self.root = Path(tempfile.mkdtemp(prefix="relay-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = free_port()
        self.fsync = fsync
        self._as_nobody = os.geteuid() == 0
        if self._as_nobody:
            shutil.chown(self.root, "nobody")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8")

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bindir / tool), *args]
        if self._as_nobody:
            command = ["runuser", "-u", "nobody", "--", *command]
        done = subprocess.run(
            command, capture_output=True, text=True, check=False, cwd=self.root, timeout=120
        )
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise PgKitError(f"{tool} failed:\n{done.stdout}{done.stderr}\n{log}")

    def start(self) -> Cluster:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root}"
            f" -c fsync={'on' if self.fsync else 'off'} -c max_connections=200"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")
        return self

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def restart(self) -> None:
        """Stop (fast: every connection is cut) and start again on the same port."""
        self.stop()
        self.start()

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def destroy(self) -> None:
        if self.running():
            self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


async def create_database(server_url: str) -> str:
    """A new empty database on the server; returns its URL."""
    name = f"relay_test_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base, _, _ = server_url.partition("?")
    return base.rsplit("/", 1)[0] + "/" + name


async def drop_database(server_url: str, url: str) -> None:
    name = url.rsplit("/", 1)[1]
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


# What the server says on a damaged page or index, by SQLSTATE (see damage_on_insert).
DAMAGE = {
    "XX001": "invalid page in block 7 of relation base/16384/16402",
    "XX002": 'index "outbox_pkey" contains unexpected zero page at block 3',
}


async def damage_on_insert(conn: asyncpg.Connection, table: str, sqlstate: str) -> str:
    """Make every insert into ``table`` fail as the server fails on a damaged page or index:
    SQLSTATE ``sqlstate`` (XX001, XX002) with the server's own words, which are returned. (Real
    damage means stopping the server and overwriting its files; the client sees only this.)"""
    words = DAMAGE[sqlstate]
    await conn.execute(
        f"""CREATE FUNCTION relay_test_damage() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION '{words.replace("'", "''")}' USING ERRCODE = '{sqlstate}'; END $$"""
    )
    await conn.execute(
        f"CREATE TRIGGER relay_test_damage BEFORE INSERT ON {table}"
        " FOR EACH STATEMENT EXECUTE FUNCTION relay_test_damage()"
    )
    return words


def fresh_database(server_url: str) -> str:
    """``create_database`` from synchronous code, even inside a running event loop (fixtures)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, create_database(server_url)).result()


def remove_database(server_url: str, url: str) -> None:
    """``drop_database`` from synchronous code."""
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, drop_database(server_url, url)).result()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ensure", action="store_true", help="install the server when missing")
    parser.parse_args()
    if external_url():
        print("postgres: using the server of", " or ".join(f"${n}" for n in ENV_URLS))
        return 0
    try:
        print("postgres server binaries:", ensure_server())
    except PgKitError as exc:
        print(f"postgres: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
