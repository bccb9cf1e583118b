"""Standard Webhooks signatures: the HMAC built from copied key states is HMAC-SHA256 itself."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time

import pytest
from standardwebhooks.webhooks import Webhook as Verifier

from relay.sinks import signing


@pytest.mark.parametrize("key_bytes", [24, 32, 63, 64])
@pytest.mark.parametrize("body", [b"", b"{}", bytes(range(256)) * 40], ids=["empty", "tiny", "10k"])
def test_signature_is_hmac_sha256_of_id_timestamp_and_body(key_bytes: int, body: bytes) -> None:
    """For every allowed key length (the longest is SHA-256's whole block), ``sign`` equals the
    standard library's HMAC over ``id.timestamp.body``."""
    secret = signing.generate_secret(key_bytes)
    key = base64.b64decode(secret.removeprefix("whsec_"))
    expected = hmac.new(key, b"msg_1.1763600000." + body, hashlib.sha256).digest()
    assert signing.sign(secret, "msg_1", 1763600000, body) == (
        "v1," + base64.b64encode(expected).decode()
    )


def test_headers_verify_with_the_standard_webhooks_library_for_each_secret() -> None:
    """During a rotation both secrets sign: a receiver holding either one accepts the request."""
    new, old = signing.generate_secret(), signing.generate_secret(48)
    body = b'{"token": "' + secrets.token_hex(200).encode() + b'"}'
    headers = signing.headers([new, old], "msg_2", int(time.time()), body)
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (new, old):
        Verifier(secret).verify(body, headers)
    with pytest.raises(Exception, match="No matching signature"):
        Verifier(signing.generate_secret()).verify(body, headers)
