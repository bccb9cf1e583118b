"""PostgreSQL state URLs as asyncpg reads them: the one check of a URL (:func:`url_problem`, used
by the config at load and by :meth:`relay.store.postgres.PostgresStore.from_url`), its servers
and how messages show it (:func:`describe_url`).

asyncpg's reading differs from libpq's in places, and a URL it reads otherwise than its writer
meant connects elsewhere, silently, or fails every connect (retried as if the server were down),
so those URLs are refused with the reason:

- a host before the path makes asyncpg ignore ``?host=`` and ``?port=``;
- the database comes from the path whenever the URL has one, so ``?dbname=`` (or asyncpg's
  ``?database=``) counts only in a URL with no path (``postgresql://user@host:5432?dbname=relay``):
  after a bare ``/`` asyncpg connects to the database named like the user instead.

What both take alike is accepted: several hosts tried in order, a Unix socket directory
(``%2Frun%2Fpostgresql`` before the path, or ``?host=/run/postgresql``), and no host at all
(``postgresql://user@/relay``, ``postgresql:///relay``): ``$PGHOST``, else the local socket
directories (``/run/postgresql``, ``/var/run/postgresql``, ``/tmp``) and then ``localhost``, on
``?port=`` or ``$PGPORT`` or 5432.

Messages never show a value of the query or the user info: any may be a secret.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit

from relay.hostnames import valid_host

SCHEMES = frozenset({"postgresql", "postgres"})
_EXPECTED = "(expected postgresql://user:password@host:port/database)"
# the query parameters asyncpg takes the database from when the URL has no path, in its order
_DATABASE_PARAMS = ("dbname", "database")

# Query parameters of the URL whose values asyncpg checks when it connects (connect_utils), with
# the values it takes: a wrong one fails every connect with ClientConfigurationError, so loading
# the config refuses it first (url_problem). Other parameters asyncpg reads are paths and names;
# the ones it does not know it sends to the server as settings, which the server checks.
URL_CHOICES: dict[str, tuple[str, ...]] = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "sslnegotiation": ("postgres", "direct"),
    "target_session_attrs": (
        "any",
        "primary",
        "standby",
        "prefer-standby",
        "read-write",
        "read-only",
    ),
    "gsslib": ("gssapi", "sspi"),
    "ssl_min_protocol_version": ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"),
    "ssl_max_protocol_version": ("TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"),
}
# asyncpg reads sslmode with '_' for '-' (verify_full) and the TLS versions with '_' for '.'
_URL_SPELLINGS = {
    "sslmode": ("_", "-"),
    "ssl_min_protocol_version": ("_", "."),
    "ssl_max_protocol_version": ("_", "."),
}


def url_problem(url: str) -> str | None:
    """What is wrong with a PostgreSQL state URL, or None: what asyncpg would refuse at every
    connect, or read otherwise than libpq and so connect elsewhere than meant (see the module
    docstring). Hosts before the path may be named; values of the query never are."""
    try:  # an unclosed or non-IPv6 '[' host ('…@[::1/relay') makes urlsplit raise
        parts = urlsplit(url)
    except ValueError:
        return f"not a valid URL (a '[' host must be an IPv6 address in [ ]) {_EXPECTED}"
    if parts.scheme not in SCHEMES:
        return f"not a postgresql URL {_EXPECTED}"
    try:  # as asyncpg parses it: an item without '=' fails every connect with ValueError
        query = _last_values(parts.query, keep_blank_values=True)
    except ValueError:
        return "the query is not name=value pairs separated by &"
    netloc = parts.netloc.rpartition("@")[2]
    if netloc:
        problem = _netloc_hosts_problem(netloc, query)
    elif "host" in query:
        problem = _query_hosts_problem(query)
    else:
        problem = _default_host_problem(query)
    return problem or _database_problem(parts, query) or _choices_problem(parts.query)


def _last_values(query: str, *, keep_blank_values: bool = False) -> dict[str, str]:
    """The query's parameters with the last value of each (asyncpg takes the last); asyncpg
    drops a blank one (``?host=``), which ``keep_blank_values`` keeps, to name it."""
    if not query:  # asyncpg parses no empty query (strict parsing would refuse it)
        return {}
    parsed = parse_qs(query, keep_blank_values=keep_blank_values, strict_parsing=True)
    return {name: values[-1] for name, values in parsed.items()}


def _netloc_hosts_problem(netloc: str, query: Mapping[str, str]) -> str | None:
    """The hosts before the path (``host:port,host:port``, tried in order): shown by the error
    as written, so a message may name them."""
    servers = split_hosts(netloc, unquote_hosts=True)
    several = len(servers) > 1
    for n, (_host, port) in enumerate(servers, 1):
        if port and _port_problem(port):
            which = f"the port of host {n}" if several else "the port"
            return (
                f"{which} is not a number from 1 to 65535 (in a password, / ? # @ and : must be"
                f" percent-encoded) {_EXPECTED}"
            )
    for n, (host, _port) in enumerate(servers, 1):
        if not host:
            return f"host {n} of {len(servers)} is empty (expected host:port,host:port)"
        if not (host.startswith("/") or valid_host(host)):
            # asyncpg would fail to resolve it on every connect, retried as if it were down
            which = f"host {n} of {len(servers)}, {host!r}," if several else repr(host)
            return (
                f"{which} is not a valid host name (an IP address, or labels of 1 to 63 letters,"
                " digits, '-' or '_' separated by single dots)"
            )
    # asyncpg reads ?host= and ?port= only when no host precedes the path: it would connect
    # elsewhere than they say, silently (libpq would use them)
    for name in ("host", "port"):
        if name in query:
            return (
                f"?{name}= is ignored by asyncpg when a host precedes the path: give the hosts"
                " and ports either as host:port,host:port before the path or as"
                " postgresql://user:password@/database?host=…&port=…"
            )
    return None


def _query_hosts_problem(query: Mapping[str, str]) -> str | None:
    """The hosts of ``?host=`` (and their ports, ``?port=``): the error masks query values, so
    a message names an entry by its place."""
    servers = split_hosts(query["host"])
    several = len(servers) > 1
    for n, (host, port) in enumerate(servers, 1):
        which = f"entry {n} of ?host=" if several else "?host="
        if not host:
            return f"{which} is empty (expected a host name, an IP address or a socket directory)"
        if not (host.startswith("/") or valid_host(host)):
            return (
                f"{which} is not a valid host name, IP address or socket directory (an absolute"
                " path)"
            )
        if port and _port_problem(port):
            return f"the port of {which} is not a number from 1 to 65535"
    if "port" not in query:
        return None
    ports = query["port"].split(",")
    if len(ports) > 1 and len(ports) != len(servers):
        return f"?port= names {len(ports)} ports for {len(servers)} hosts of ?host="
    return _ports_problem(ports)


def _default_host_problem(query: Mapping[str, str]) -> str | None:
    """No host: asyncpg tries ``$PGHOST``, else its default hosts (three socket directories and
    localhost), each on the one port of ``?port=``; a list of ports matches no list of hosts."""
    if "port" not in query:
        return None
    ports = query["port"].split(",")
    if len(ports) > 1:
        return (
            f"?port= names {len(ports)} ports but the URL names no host (give the hosts with"
            " ?host=…, or one port)"
        )
    return _ports_problem(ports)


def _ports_problem(ports: list[str]) -> str | None:
    for n, port in enumerate(ports, 1):
        if _port_problem(port):
            which = f"entry {n} of ?port=" if len(ports) > 1 else "?port="
            return f"{which} is not a number from 1 to 65535"
    return None


def _port_problem(port: str) -> bool:
    return not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535)


def _database_problem(parts: SplitResult, query: Mapping[str, str]) -> str | None:
    """The database: from the path, else from ``?dbname=`` or ``?database=`` (asyncpg reads
    those only when the URL has no path at all). A blank value is one asyncpg drops."""
    given = [f"?{name}=" for name in _DATABASE_PARAMS if query.get(name)]
    if parts.path.strip("/"):
        if given:
            return (
                f"the database is named twice, in the path and by {given[0]} (asyncpg takes the"
                " path's, libpq the query's): name it once"
            )
        return None
    if given and parts.path:
        return (
            f"{given[0]} is ignored by asyncpg after a '/' (it would connect to the database"
            f" named like the user): remove the '/' before the '?', or name the database in the"
            f" path {_EXPECTED}"
        )
    if len(given) > 1:
        return "the database is named twice, by ?dbname= and ?database=: name it once"
    if given:
        return None
    return f"the PostgreSQL URL names no database {_EXPECTED}"


def _choices_problem(query: str) -> str | None:
    """A value asyncpg refuses at every connect (:data:`URL_CHOICES`); never shows it."""
    params = _last_values(query)  # parsed already: it does not raise
    for name, choices in URL_CHOICES.items():
        if name not in params:
            continue
        value = params[name]
        old, new = _URL_SPELLINGS.get(name, ("", ""))
        if value not in choices and (not old or value.replace(old, new) not in choices):
            return f"{name} must be one of {', '.join(choices)}"
    return None


def split_hosts(spec: str, *, unquote_hosts: bool = False) -> list[tuple[str, str]]:
    """``(host, port)`` of each entry of a comma-separated host list as asyncpg splits it
    (``h1:5432,[::1]:5433``, ``/run/postgresql``): an IPv6 address without its brackets, a Unix
    socket directory whole, the port as written ('' when none is given). An entry asyncpg cannot
    read comes back as ``(entry, '')`` (an unclosed bracket) or ``('', '')`` (empty): it fails
    every connect with IndexError or ClientConfigurationError, so the config refuses it first.
    ``unquote_hosts``: percent-decode the hosts (the URL's own list before the path; its
    ``%2Frun%2Fpostgresql`` is a socket directory)."""
    servers: list[tuple[str, str]] = []
    for entry in spec.split(","):
        if entry.startswith("/"):
            host, port = entry, ""
        elif entry.startswith("["):
            found = _BRACKETED.fullmatch(entry)
            host, port = (found[1], found[2] or "") if found else (entry, "")
        else:
            host, _, port = entry.partition(":")
        servers.append((unquote(host) if unquote_hosts else host, port))
    return servers


_BRACKETED = re.compile(r"\[([^\]]*)\](?::(.*))?", re.DOTALL)


def url_servers(url: str) -> tuple[list[tuple[str, str]], bool]:
    """The servers of a PostgreSQL URL, in the order asyncpg tries them (:func:`split_hosts`),
    and whether they come from its query (``?host=``, ``?port=``) rather than before its path.
    asyncpg reads ``?host=`` and ``?port=`` only when no host precedes the path; no host at all
    is ``[]``."""
    netloc = urlsplit(url).netloc.rpartition("@")[2]
    if netloc:
        return split_hosts(netloc, unquote_hosts=True), False
    query = parse_qs(urlsplit(url).query)
    if "host" not in query:
        return [], False
    servers = split_hosts(query["host"][-1])  # asyncpg takes the last
    ports = query["port"][-1].split(",") if "port" in query else []
    if ports:
        ports = ports * len(servers) if len(ports) == 1 else ports
        servers = [(host, port) for (host, _), port in zip(servers, ports, strict=False)]
    return servers, True


def describe_url(url: str) -> str:
    """``host:port/database`` of a PostgreSQL URL (``h1:5432,h2:5433/database`` for several
    hosts): for messages, never the password. The values of the query are not shown (any may
    be a secret): hosts given by ``?host=`` are ``?host=…``, a database given by ``?dbname=``
    is ``/?dbname=…``; a URL with no host is ``the default host/database``."""
    try:
        servers, in_query = url_servers(url)
        parts = urlsplit(url)
        query = parse_qs(parts.query)
    except ValueError:
        return "?"
    path = parts.path or "/"
    if not parts.path and (named := [n for n in _DATABASE_PARAMS if n in query]):
        path = f"/?{named[0]}=…"
    if in_query:
        return f"?host=…{path}"
    if not servers:  # $PGHOST, else the local socket directories and localhost
        return f"the default host{path}"
    shown = (f"{f'[{host}]' if ':' in host else host}:{_port(port)}" for host, port in servers)
    return ",".join(shown) + path


def _port(written: str) -> str:
    if not written:
        return "5432"
    # one that is no number may be the end of a password holding a '/': not shown
    return written if written.isdigit() else "?"
