"""SSRF protection for webhook destinations.

A destination must resolve only to public (globally routable, non-multicast) addresses, unless
it falls in an explicitly allowed network. It is checked when a webhook is registered and again at
connect time on the addresses actually resolved (:class:`GuardedResolver`), so a name that later
resolves to 127.0.0.1 or 169.254.169.254 (DNS rebinding) is refused too. IPv6 addresses that
carry an IPv4 address (IPv4-mapped and -translated, IPv4-compatible, NAT64 ``64:ff9b::/96``,
6to4 ``2002::/16``) are judged by the IPv4 address, since networks that translate them reach
it; one is allowlisted when either that IPv4 address or its own IPv6 form is. ``https`` is
required unless the destination is allowlisted, checked at registration and again on the
address a plain-http connection reached (:class:`GuardedConnector`). Numeric hosts other than
the dotted quad (``2130706433``, ``0x7f.1``) are refused at registration: aiohttp will not
connect to them.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
import socket
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ClientRequest
from aiohttp.tracing import Trace

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# threads for webhook destinations' name lookups: more than the endpoints whose DNS may hang at
# once (each holds one); started only as lookups overlap
RESOLVER_THREADS = 64
# as aiohttp's own resolver: only the address families configured on this host
_AI_ADDRCONFIG = socket.AI_ADDRCONFIG & getattr(socket, "AI_MASK", socket.AI_ADDRCONFIG)
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# IPv6 prefixes whose last 32 bits are an IPv4 address a translator or the stack reaches: the
# address is judged by that IPv4 address (::ffff:0:0/96, IPv4-mapped, has its own property)
_EMBEDDING_IPV4 = tuple(
    ipaddress.IPv6Network(n)
    for n in ("::ffff:0:0:0/96", "::/96", "64:ff9b::/96")  # SIIT, IPv4-compatible, NAT64
)
# Not globally reachable, though Python's is_global says so for some of them: IETF protocol
# assignments, the deprecated 6to4 relay anycast, local-use NAT64 (RFC 8215, any prefix length),
# the deprecated IPv6 site-local range (RFC 3879; still routed inside some networks), the IPv6
# documentation prefix 3fff::/20 (RFC 9637) and the SRv6 SIDs of 5f00::/16 (RFC 9602)
_NOT_PUBLIC = tuple(
    ipaddress.ip_network(n)
    for n in (
        "192.0.0.0/24",
        "192.88.99.0/24",
        "64:ff9b:1::/48",
        "fec0::/10",
        "3fff::/20",
        "5f00::/16",
    )
)
# a host of digits, hex and dots that is not a dotted quad: resolvers read it as IPv4, aiohttp
# refuses to connect to it
_MASK = "***"  # what messages show instead of a password or a query value
_NUMERIC_HOST = re.compile(r"(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+))*\.?", re.IGNORECASE)


class SsrfError(ValueError):
    """A destination the relay refuses to call; the message says why."""


class Guard:
    """Decides which destinations are allowed."""

    def __init__(self, allow: Sequence[Network] = ()) -> None:
        self._allow = tuple(allow)

    @classmethod
    def from_strings(cls, networks: Sequence[str]) -> Guard:
        """From CIDR strings such as ``127.0.0.0/8``; raises ValueError naming a bad one."""
        parsed = []
        for text in networks:
            try:
                parsed.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                raise ValueError(f"not a network: {text!r}") from None
        return cls(parsed)

    def allowlisted(self, ip: IPAddress) -> bool:
        """Whether the address is in an explicitly allowed network, in its own form or as the
        IPv4 address it carries (an allowed NAT64 or 6to4 prefix allows its addresses, an
        allowed IPv4 network the IPv6 forms that reach it)."""
        return any(
            form in net
            for form in {ip, _unmapped(ip)}
            for net in self._allow
            if net.version == form.version
        )

    def check_ip(self, ip: IPAddress, host: str) -> None:
        """Raise SsrfError unless the address is public or allowlisted."""
        if self.allowlisted(ip):
            return
        plain = _unmapped(ip)
        if (
            not plain.is_global
            or plain.is_multicast
            or plain.is_reserved  # IPv6 space IANA has not allocated: Python calls it global
            or any(plain in n for n in _NOT_PUBLIC)
        ):
            what = _category(plain)
            carried = f" (it carries {plain})" if plain != ip else ""
            raise SsrfError(f"url: {host} resolves to {ip}{carried}, {what} address")

    async def check_url(self, url: str) -> None:
        """Validate scheme and host, resolve it and check every address (at registration)."""
        try:
            parts = urlsplit(url)
            parts.hostname  # noqa: B018 - parses the netloc: an unclosed or bad [IPv6] raises
        except ValueError as exc:
            # the URL cannot be shown safely (it does not parse: its password cannot be cut)
            raise SsrfError(f"url: not a valid URL: {exc}") from None
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise SsrfError(f"url: expected an http(s) URL with a host, got {shown(url)!r}")
        try:
            port = parts.port
        except ValueError:
            raise SsrfError(f"url: invalid port in {shown(url)!r}") from None
        if _NUMERIC_HOST.fullmatch(parts.hostname) and not _is_ipv4(parts.hostname):
            raise SsrfError(f"url: {parts.hostname} is not an IPv4 address in dotted form a.b.c.d")
        addresses = await _resolve(parts.hostname, port or (443 if parts.scheme == "https" else 80))
        for ip in addresses:
            self.check_ip(ip, parts.hostname)
        if parts.scheme != "https" and not all(self.allowlisted(ip) for ip in addresses):
            raise SsrfError(f"url: https is required for {parts.hostname}")

    def check_literal(self, host: str) -> None:
        """Check a host that is an IP literal (aiohttp does not resolve those)."""
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return
        self.check_ip(ip, host)


class GuardedConnector(aiohttp.TCPConnector):
    """aiohttp connector for webhook destinations: names resolve through
    :class:`GuardedResolver`, and a plain-http connection is used only when the address it
    reached is allowlisted, checked once connected, before a byte is sent. The https rule holds
    at connect time as the address rules do: a name that resolved to allowlisted addresses at
    registration may resolve elsewhere since, and the allowlist may have shrunk."""

    def __init__(self, guard: Guard, *, limit: int = 100) -> None:
        self._guarded_resolver = GuardedResolver(guard)
        super().__init__(resolver=self._guarded_resolver, limit=limit)
        self._guard = guard

    async def close(self, *, abort_ssl: bool = False) -> None:
        await super().close(abort_ssl=abort_ssl)
        await self._guarded_resolver.close()  # its threads: aiohttp closes only its own resolver

    async def _create_connection(
        self,
        req: ClientRequest,
        traces: list[Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 - aiohttp's signature, overridden
    ) -> ResponseHandler:
        proto = await super()._create_connection(req, traces, timeout)
        if req.is_ssl():
            return proto
        peer = proto.transport.get_extra_info("peername") if proto.transport else None
        ip = ipaddress.ip_address(peer[0]) if peer else None
        if ip is None or not self._guard.allowlisted(ip):
            proto.close()
            raise SsrfError(
                f"url: https is required for {req.url.raw_host}: it resolves to {ip},"
                " outside webhooks.allow_networks"
            )
        return proto


class GuardedResolver(AbstractResolver):
    """aiohttp resolver that refuses hosts resolving to forbidden addresses, at connect time.

    Names are looked up on threads of its own (``threads``, started as needed), not the event
    loop's default executor: that one has only a few threads (``min(32, CPUs + 4)``) and the
    process's other lookups use it too, so a few endpoints whose DNS hangs (a lookup blocks its
    thread for the resolver's whole timeout, again at every attempt, as failures are not cached)
    held up every endpoint's connections, and the poller's. aiohttp looks up one name and port
    once at a time, so each hanging endpoint holds one of these threads, never another's."""

    def __init__(self, guard: Guard, threads: int = RESOLVER_THREADS) -> None:
        self._guard = guard
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="webhook-dns")

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        lookup = functools.partial(
            socket.getaddrinfo, host, port, family, socket.SOCK_STREAM, 0, _AI_ADDRCONFIG
        )
        infos = await asyncio.get_running_loop().run_in_executor(self._pool, lookup)
        results: list[ResolveResult] = []
        for found, _, proto, _, address in infos:
            if len(address) == 4:  # IPv6: host, port, flow info, scope (of a link-local one)
                ip = f"{address[0]}%{address[3]}" if address[3] else str(address[0])
            elif found == socket.AF_INET6:
                continue  # IPv6 not supported by this Python build (as aiohttp's resolver)
            else:
                ip = str(address[0])
            self._guard.check_ip(ipaddress.ip_address(ip), host)
            results.append(
                ResolveResult(
                    hostname=host,
                    host=ip,
                    port=int(address[1]),
                    family=found,
                    proto=proto,
                    flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
                )
            )
        return results

    async def close(self) -> None:
        # lookups still blocked in a thread end on their own; nobody waits for them
        self._pool.shutdown(wait=False, cancel_futures=True)


async def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos: list[tuple[Any, ...]] = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise SsrfError(f"url: cannot resolve {host}: {exc.strerror}") from None
    except ValueError:  # UnicodeError: the idna codec refuses an empty or over-long label
        raise SsrfError(f"url: {host!r} is not a valid host name") from None
    return sorted({ipaddress.ip_address(info[4][0]) for info in infos}, key=str)


def shown(url: str) -> str:
    """A URL fit for messages and logs: its password and the value of every query parameter are
    replaced by ``***`` (webhook URLs often carry a token in the query). The keys stay, to tell
    the parameters apart; a query item without ``=`` may be a token itself and is hidden whole."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # a stray bracket in the host
        return _unparsable(url)
    if password is None and not parts.query:
        return url
    if password is not None:
        host = parts.netloc.rsplit("@", 1)[1]
        parts = parts._replace(netloc=f"{parts.username}:{_MASK}@{host}")
    if parts.query:
        parts = parts._replace(query=masked_query(parts.query))
    return parts.geturl()


def masked_query(query: str) -> str:
    """A URL's query with the value of every parameter replaced by ``***``: the keys stay, to
    tell the parameters apart (any value may be a secret); an item without ``=`` may be a token
    itself and is hidden whole."""
    return "&".join(_masked(item) for item in query.split("&"))


def _unparsable(url: str) -> str:
    """A URL urlsplit refuses, without its user info, query and fragment."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    rest = re.split(r"[?#]", rest, maxsplit=1)[0]
    if "@" in rest:
        rest = f"{_MASK}@{rest.rsplit('@', 1)[1]}"
    return f"{scheme}{sep}{rest}"


def _masked(item: str) -> str:
    """One ``key=value`` of a query as messages show it."""
    key, eq, _ = item.partition("=")
    if eq:
        return f"{key}={_MASK}"
    return _MASK if item else item


def _unmapped(ip: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 address carries, if it is one of the forms that reach it."""
    if isinstance(ip, ipaddress.IPv4Address):
        return ip
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.is_loopback or ip.is_unspecified:  # ::1 and :: are IPv6's own, not IPv4-compatible
        return ip
    if any(ip in net for net in _EMBEDDING_IPV4):
        return ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
    return ip


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def _category(ip: IPAddress) -> str:
    """ "a loopback address" and the like, for messages."""
    for name in ("loopback", "link_local", "multicast", "unspecified", "private", "reserved"):
        if getattr(ip, f"is_{name}"):
            word = name.replace("_", "-")
            return f"an {word}" if word[0] in "aeiou" else f"a {word}"
    return "a non-public"
