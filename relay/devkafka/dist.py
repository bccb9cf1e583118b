"""The Kafka jars: fetched once by Maven from deploy/kafka/pom.xml into a cache directory.

The cache holds `libs/` (the broker's classpath), `m2/` (Maven's own repository, so a fresh
machine needs nothing in ~/.m2 and later runs reuse it) and a marker naming the POM that filled
`libs/`. A complete cache is used as is, without Maven.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from relay.devkafka.errors import DevKafkaError, tail

KAFKA_VERSION = "3.9.1"  # keep in sync with <kafka.version> in deploy/kafka/pom.xml
CACHE_ENV = "CTCT_RELAY_KAFKA_CACHE"
_REPO = Path(__file__).resolve().parents[2]
POM = _REPO / "deploy" / "kafka" / "pom.xml"
INSTALL_HINTS = {
    "java": "Java 17 (apt-get install openjdk-17-jre-headless)",
    "mvn": "Maven (apt-get install maven)",
}
_MARKER = "libs.complete"


@dataclass(frozen=True)
class KafkaDist:
    """The jars of one Kafka release, and the `java` that runs them."""

    libs_dir: Path
    version: str
    java: Path


def default_cache_dir(env: Mapping[str, str]) -> Path:
    """`$CTCT_RELAY_KAFKA_CACHE`, else `<repo>/.cache/kafka/<version>` (git-ignored)."""
    override = env.get(CACHE_ENV)
    return Path(override) if override else _REPO / ".cache" / "kafka" / KAFKA_VERSION


def ensure_kafka(
    cache_dir: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    pom: Path = POM,
    timeout_s: float = 900.0,
) -> KafkaDist:
    """Return the Kafka jars under `cache_dir`, running Maven first if they are not complete.

    `env` is the environment whose `JAVA_HOME` (else PATH) gives `java` and whose PATH gives
    `mvn`, which may name the cache and which Maven runs with; it defaults to this process's
    environment. Raises
    `DevKafkaError` saying what to install when a tool is missing, or with Maven's output.
    """
    environ = os.environ if env is None else env
    root = cache_dir if cache_dir is not None else default_cache_dir(environ)
    try:
        return _ensure(root, environ, pom, timeout_s)
    except OSError as exc:  # the cache is a file, under a file, not writable, ...
        named = cache_dir is None and bool(environ.get(CACHE_ENV))
        where = f"{CACHE_ENV}={root}" if named else str(root)
        raise DevKafkaError(
            f"{where}: cannot keep the Kafka cache there: {exc.strerror or exc}"
        ) from None


def _ensure(root: Path, environ: Mapping[str, str], pom: Path, timeout_s: float) -> KafkaDist:
    search_path = environ.get("PATH", os.defpath)
    stamp = _stamp(pom)
    complete = _read(root / _MARKER) == stamp and (root / "libs").is_dir()
    java = _java(environ, search_path)
    # Maven only fills the cache; a complete cache needs none.
    mvn = None if complete else shutil.which("mvn", path=search_path)
    absent = {"java": java is None, "mvn": not complete and mvn is None}
    if java is None or any(absent.values()):
        missing = [name for name, is_absent in absent.items() if is_absent]
        hints = " and ".join(INSTALL_HINTS[name] for name in missing)
        raise DevKafkaError(
            f"the local Kafka broker needs {' and '.join(missing)} on PATH; install {hints}"
        )
    if mvn is not None:
        _fill_cache(Path(mvn), pom, root, stamp, environ, timeout_s)
    return KafkaDist(libs_dir=root / "libs", version=KAFKA_VERSION, java=Path(java))


def _java(environ: Mapping[str, str], search_path: str) -> str | None:
    """`$JAVA_HOME/bin/java` when JAVA_HOME is set, as Kafka's own scripts and Maven choose it
    (a `java` on PATH may be an older one), else `java` on PATH."""
    home = environ.get("JAVA_HOME")
    if not home:
        return shutil.which("java", path=search_path)
    java = Path(home) / "bin" / "java"
    if not (java.is_file() and os.access(java, os.X_OK)):
        raise DevKafkaError(
            f"JAVA_HOME={home}: no {java}; point JAVA_HOME at a Java 17 installation, or unset"
            " it to use the java on PATH"
        )
    return str(java)


def _fill_cache(
    mvn: Path, pom: Path, root: Path, stamp: str, env: Mapping[str, str], timeout_s: float
) -> None:
    if not pom.is_file():
        raise DevKafkaError(f"{pom} not found: dev Kafka runs from a ctct-relay source checkout")
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".lock"):
        # Another process (a parallel test run) may have filled it while we waited.
        if _read(root / _MARKER) == stamp:
            return
        _copy_libs(mvn, pom, root, env, timeout_s)
        (root / _MARKER).write_text(stamp)


def _copy_libs(mvn: Path, pom: Path, root: Path, env: Mapping[str, str], timeout_s: float) -> None:
    # Maven writes into a staging directory that replaces libs/ only when complete, so an
    # interrupted download never leaves a classpath that looks usable.
    staging = Path(tempfile.mkdtemp(prefix="libs-", dir=root))
    command = [
        str(mvn),
        "-q",
        "-B",
        "-f",
        str(pom),
        f"-Dmaven.repo.local={root / 'm2'}",
        "dependency:copy-dependencies",
        "-DincludeScope=runtime",
        f"-DoutputDirectory={staging}",
    ]
    try:
        result = subprocess.run(  # noqa: S603 - argv of the resolved mvn, no shell
            command, env=dict(env), capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise DevKafkaError(
            f"Maven did not fetch Kafka {KAFKA_VERSION} within {timeout_s:.0f} s; check that "
            "Maven Central is reachable (proxies go in ~/.m2/settings.xml)"
        ) from exc
    if result.returncode != 0 or not any(staging.glob("kafka_2.13-*.jar")):
        shutil.rmtree(staging, ignore_errors=True)
        output = tail((result.stdout + result.stderr).splitlines())
        raise DevKafkaError(
            f"Maven failed to fetch Kafka {KAFKA_VERSION} (exit {result.returncode}) with: "
            f"{' '.join(command)}\nlast output:\n{output}"
        )
    shutil.rmtree(root / "libs", ignore_errors=True)
    staging.rename(root / "libs")


def _stamp(pom: Path) -> str:
    # The marker records which POM filled libs/, so editing the POM refetches.
    try:
        content = pom.read_bytes()
    except FileNotFoundError:
        return "no POM"
    return f"{KAFKA_VERSION} {hashlib.sha256(content).hexdigest()}\n"


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        yield
