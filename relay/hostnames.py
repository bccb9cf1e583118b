"""Host names as users type them into URLs (the config's ``base_url``, the CLI's ``--api``)."""

from __future__ import annotations

import ipaddress
import re

_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def valid_host(host: str) -> bool:
    """An IP address, or a DNS name (IDNA for non-ASCII) of 1-63 character labels of letters,
    digits, _ and - (not first or last), at most 253 characters, whose last label is not a
    number. ``api..example.com`` (an empty label) made aiohttp raise UnicodeError per request;
    ``1.2.3.4.5`` is neither an address nor a name."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return True
    try:
        name = host.encode("idna").decode("ascii")
    except UnicodeError:  # an empty or over-long label: the resolver's own encoding fails
        return False
    labels = name.removesuffix(".").split(".")
    return (
        len(name) <= 253
        and all(_LABEL.fullmatch(label) for label in labels)
        and not labels[-1].isdigit()
    )
