"""The SSRF guard's verdicts on addresses, with no network: embedded IPv4 addresses, prefixes
Python calls global that are not, and messages that never show a URL's password."""

from __future__ import annotations

import ipaddress

import pytest

from relay.sinks.ssrf import Guard, SsrfError, shown


@pytest.mark.parametrize(
    ("address", "carried", "category"),
    [
        pytest.param("::ffff:127.0.0.1", "127.0.0.1", "a loopback", id="mapped"),
        pytest.param("::ffff:0:a9fe:a9fe", "169.254.169.254", "a link-local", id="translated"),
        pytest.param("::7f00:1", "127.0.0.1", "a loopback", id="compatible"),
        pytest.param("64:ff9b::a00:1", "10.0.0.1", "a private", id="nat64"),
        pytest.param("2002:a9fe:a9fe::1", "169.254.169.254", "a link-local", id="6to4"),
    ],
)
def test_ipv6_forms_are_judged_by_the_ipv4_address_they_carry(
    address: str, carried: str, category: str
) -> None:
    with pytest.raises(SsrfError) as refused:
        Guard().check_ip(ipaddress.ip_address(address), "hooks.example.com")
    assert f"(it carries {carried}), {category} address" in str(refused.value)


@pytest.mark.parametrize(
    "address",
    [
        "64:ff9b::5db8:d822",
        "2002:5db8:d822::1",
        "::ffff:93.184.216.34",
        "2606:4700::1111",
        "3fff:1000::1",  # just past the documentation /20
        "3fff:ffff:ffff::1",  # the last of 2000::/3, IANA's global unicast space
    ],
)
def test_ipv6_forms_carrying_public_addresses_pass(address: str) -> None:
    Guard().check_ip(ipaddress.ip_address(address), "hooks.example.com")


@pytest.mark.parametrize(
    ("address", "category"),
    [
        pytest.param("::1", "a loopback", id="ipv6-loopback"),
        pytest.param("::", "an unspecified", id="ipv6-unspecified"),
        pytest.param("192.0.0.8", "a non-public", id="ietf-protocol-assignments"),
        pytest.param("192.88.99.1", "a non-public", id="6to4-relay-anycast"),
        pytest.param("64:ff9b:1::a00:1", "a reserved", id="local-use-nat64"),
        pytest.param("fec0::1", "a non-public", id="ipv6-site-local"),
        pytest.param("3fff::1", "a non-public", id="ipv6-documentation-rfc9637"),
        pytest.param("3fff:fff:ffff::1", "a non-public", id="ipv6-documentation-rfc9637-end"),
        pytest.param("5f00::1", "a reserved", id="srv6-sids-rfc9602"),
        pytest.param("5f00:ffff::1", "a reserved", id="srv6-sids-rfc9602-end"),
        # IPv6 space IANA has not allocated: Python calls it global, nothing routes it publicly
        pytest.param("4000::1", "a reserved", id="ipv6-unallocated-4000"),
        pytest.param("5f01::1", "a reserved", id="ipv6-unallocated-past-srv6"),
        pytest.param("e000::1", "a reserved", id="ipv6-unallocated-e000"),
        pytest.param("fe00::1", "a reserved", id="ipv6-unallocated-fe00"),
        pytest.param("200::1", "a reserved", id="ipv6-unallocated-200"),
    ],
)
def test_refused_without_an_embedded_reading(address: str, category: str) -> None:
    with pytest.raises(SsrfError, match=f"resolves to {address}, {category} address$"):
        Guard().check_ip(ipaddress.ip_address(address), address)


def test_the_allowlist_covers_the_forms_that_carry_an_allowed_address() -> None:
    guard = Guard.from_strings(["127.0.0.0/8"])
    for address in ("127.0.0.1", "::ffff:127.0.0.1", "64:ff9b::7f00:1"):
        guard.check_ip(ipaddress.ip_address(address), address)
    with pytest.raises(SsrfError):
        guard.check_ip(ipaddress.ip_address("::1"), "::1")


@pytest.mark.parametrize(
    ("network", "address"),
    [
        pytest.param("64:ff9b::/96", "64:ff9b::a00:1", id="nat64"),
        pytest.param("2002::/16", "2002:a9fe:a9fe::1", id="6to4"),
        pytest.param("::ffff:0:0/96", "::ffff:127.0.0.1", id="mapped"),
        pytest.param("::ffff:0:0:0/96", "::ffff:0:a9fe:a9fe", id="translated"),
        pytest.param("::/96", "::7f00:1", id="compatible"),
    ],
)
def test_an_allowlisted_prefix_that_embeds_ipv4_allows_its_addresses(
    network: str, address: str
) -> None:
    """An IPv6 address carrying a non-public IPv4 one is allowed by a network in the allowlist
    holding either its own form or the IPv4 it carries (only the latter was looked at: an
    allowlisted NAT64, 6to4 or IPv4-mapped prefix never matched), and plain http with it."""
    ip = ipaddress.ip_address(address)
    with pytest.raises(SsrfError):
        Guard().check_ip(ip, address)
    guard = Guard.from_strings([network])
    guard.check_ip(ip, address)
    assert guard.allowlisted(ip)


def test_an_allowlisted_embedding_prefix_allows_only_its_own_addresses() -> None:
    """Allowlisting NAT64 allows neither the IPv4 addresses it reaches in other forms nor other
    prefixes carrying them: what is outside every allowed network is refused as before."""
    guard = Guard.from_strings(["64:ff9b::/96"])
    for address in ("10.0.0.1", "::ffff:10.0.0.1", "2002:a00:1::1", "64:ff9b:1::a00:1"):
        ip = ipaddress.ip_address(address)
        with pytest.raises(SsrfError):
            guard.check_ip(ip, address)
        assert not guard.allowlisted(ip)


async def test_messages_never_show_a_urls_password() -> None:
    """A refused URL's password is shown as ***."""
    with pytest.raises(SsrfError) as refused:
        await Guard().check_url("ftp://ops:hunter2@hooks.example.com/x")
    assert "hunter2" not in str(refused.value)
    assert "ftp://ops:***@hooks.example.com/x" in str(refused.value)
    assert shown("https://u:p@h:8443/x") == "https://u:***@h:8443/x"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        pytest.param("https://h.example/a", "https://h.example/a", id="no-query"),
        pytest.param(
            "https://h.example/a?token=s3cr3t&team=ops",
            "https://h.example/a?token=***&team=***",
            id="values-hidden-keys-kept",
        ),
        pytest.param(
            "https://u:pw@h.example:8443/a?token=s3cr3t#part",
            "https://u:***@h.example:8443/a?token=***#part",
            id="password-and-query",
        ),
        pytest.param("https://h.example/a?s3cr3t", "https://h.example/a?***", id="bare-item"),
        pytest.param(
            "https://h.example/a?token=&x", "https://h.example/a?token=***&***", id="empty"
        ),
        pytest.param(
            "https://h.example/a#duplicate-wh_1",
            "https://h.example/a#duplicate-wh_1",
            id="fragment",
        ),
        pytest.param("http://u:pw@[::1/a?token=s3cr3t", "http://***@[::1/a", id="unparsable"),
    ],
)
def test_shown_hides_query_values_and_passwords(url: str, expected: str) -> None:
    """Messages and logs show a URL's query keys but not their values (tokens hide there)."""
    assert shown(url) == expected


async def test_refusal_messages_hide_query_values() -> None:
    """A URL the guard refuses is named in the error without the values of its query."""
    with pytest.raises(SsrfError) as refused:
        await Guard().check_url("ftp://hooks.example.com/x?token=s3cr3t")
    assert "s3cr3t" not in str(refused.value)
    assert "ftp://hooks.example.com/x?token=***" in str(refused.value)
