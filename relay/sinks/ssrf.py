"""SSRF protection for webhook destinations.

A destination must resolve only to public (globally routable, non-multicast) addresses, unless
it falls in an explicitly allowed network. It is checked when a webhook is registered and again at
connect time on the addresses actually resolved (:class:`GuardedResolver`), so a name that later
resolves to 127.0.0.1 or 169.254.169.254 (DNS rebinding) is refused too. IPv4-mapped IPv6
addresses are judged by the IPv4 address they carry. ``https`` is required unless the destination
is allowlisted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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
        """Whether the address is in an explicitly allowed network."""
        ip = _unmapped(ip)
        return any(ip in net for net in self._allow if net.version == ip.version)

    def check_ip(self, ip: IPAddress, host: str) -> None:
        """Raise SsrfError unless the address is public or allowlisted."""
        plain = _unmapped(ip)
        if self.allowlisted(plain):
            return
        if not plain.is_global or plain.is_multicast:
            raise SsrfError(f"url: {host} resolves to {ip}, a {_category(plain)} address")

    async def check_url(self, url: str) -> None:
        """Validate scheme and host, resolve it and check every address (at registration)."""
        parts = urlsplit(url)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise SsrfError(f"url: expected an http(s) URL with a host, got {url!r}")
        try:
            port = parts.port
        except ValueError:
            raise SsrfError(f"url: invalid port in {url!r}") from None
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


class GuardedResolver(AbstractResolver):
    """aiohttp resolver that refuses hosts resolving to forbidden addresses, at connect time."""

    def __init__(self, guard: Guard) -> None:
        self._guard = guard
        self._inner = ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            self._guard.check_ip(ipaddress.ip_address(result["host"]), host)
        return results

    async def close(self) -> None:
        await self._inner.close()


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
    return sorted({ipaddress.ip_address(info[4][0]) for info in infos}, key=str)


def _unmapped(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _category(ip: IPAddress) -> str:
    for name in ("loopback", "link_local", "multicast", "unspecified", "private", "reserved"):
        if getattr(ip, f"is_{name}"):
            return name.replace("_", "-")
    return "non-public"
