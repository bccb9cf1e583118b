"""The mapping of aiokafka's errors to access problems: which are (credentials, ACLs, an
untrusted certificate), what their message names (the cause, the address, the principal),
what it never does (the password). tests/integration/test_kafka_access.py meets each of them
on a real broker."""

from __future__ import annotations

import ssl

import pytest
from aiokafka.errors import (
    AuthenticationFailedError,
    ClusterAuthorizationFailedError,
    KafkaConnectionError,
    KafkaError,
    NodeNotReadyError,
    RequestTimedOutError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
    UnsupportedSaslMechanismError,
)

from relay.sinks.kafka import KafkaSecurity, KafkaSettings, access_error, principal

PASSWORD = "pw-0c7d1b"
SASL = KafkaSecurity(
    protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-256", username="relay", password=PASSWORD
)


def settings(security: KafkaSecurity = SASL) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers="kafka-1:9093,kafka-2:9093", security=security)


@pytest.mark.parametrize(
    ("security", "expected"),
    [
        pytest.param(SASL, "User:relay", id="sasl"),
        pytest.param(KafkaSecurity(), "User:ANONYMOUS", id="plaintext"),
        pytest.param(KafkaSecurity(protocol="SSL"), "User:ANONYMOUS", id="tls-no-client-cert"),
        pytest.param(
            KafkaSecurity(protocol="SSL", ssl_certfile="/etc/c.pem", ssl_keyfile="/etc/k.pem"),
            "the principal of the certificate in /etc/c.pem",
            id="tls-client-cert",
        ),
    ],
)
def test_the_principal_is_the_one_the_broker_sees(security: KafkaSecurity, expected: str) -> None:
    """Kafka's default principal builder: User:<SASL user>, or ANONYMOUS without credentials."""
    assert principal(security) == expected


def test_a_topic_authorization_failure_names_the_topic_and_the_principal() -> None:
    """Not a missing topic: an ACL problem of this principal on this topic."""
    error = access_error(TopicAuthorizationFailedError("ctct.email.open"), settings())
    assert str(error).startswith(
        "kafka: User:relay is not authorized for topic(s) ctct.email.open on"
        " kafka-1:9093,kafka-2:9093 (TopicAuthorizationFailed): the broker's ACLs must allow it"
        " Describe and Write on them"
    )


def test_topics_refused_together_are_named_in_order() -> None:
    """aiokafka passes a set when several topics were refused at once."""
    error = access_error(TopicAuthorizationFailedError({"t.b", "t.a"}), settings(), "kafka-2:9093")
    assert "topic(s) t.a, t.b on kafka-2:9093 " in str(error)


def test_a_cluster_authorization_failure_says_what_the_producer_needs() -> None:
    """InitProducerId refused: the idempotent producer's ACL, named."""
    error = access_error(ClusterAuthorizationFailedError(), settings())
    assert str(error) == (
        "kafka: User:relay is not authorized on the cluster of kafka-1:9093,kafka-2:9093"
        " (ClusterAuthorizationFailed): the idempotent producer needs IdempotentWrite on the"
        " cluster or Write on a topic"
    )


def test_an_access_problem_behind_a_wrapper_is_found() -> None:
    """aiokafka's sender wraps what crashed it; the cause is what the user must fix."""
    try:
        try:
            raise ClusterAuthorizationFailedError()
        except ClusterAuthorizationFailedError as exc:
            raise KafkaError("Unexpected error during batch delivery") from exc
    except KafkaError as wrapped:
        error = access_error(wrapped, settings())
    assert "(ClusterAuthorizationFailed)" in str(error)


@pytest.mark.parametrize(
    ("exc", "said"),
    [
        pytest.param(
            SaslAuthenticationFailed("Authentication failed: Invalid username or password"),
            "SaslAuthenticationFailed): Authentication failed: Invalid username or password",
            id="bad-password",
        ),
        pytest.param(
            UnsupportedSaslMechanismError("Kafka broker does not support SCRAM-SHA-256"),
            "UnsupportedSaslMechanismError): Kafka broker does not support SCRAM-SHA-256",
            id="mechanism",
        ),
        pytest.param(AuthenticationFailedError(), "AuthenticationFailedError", id="no-broker-text"),
        pytest.param(
            SaslAuthenticationFailed(f"user relay with password {PASSWORD} refused"),
            "user relay with password *** refused",
            id="password-echoed",
        ),
    ],
)
def test_a_refused_authentication_names_the_broker_user_and_reason(
    exc: BaseException, said: str
) -> None:
    """The broker's reason, where it came from, as whom; never the password, even echoed."""
    error = str(access_error(exc, settings(), "kafka-2:9093"))
    assert error.startswith(
        "kafka: kafka-2:9093 refused to authenticate User:relay (SASL SCRAM-SHA-256, "
    ), error
    assert said in error
    assert error.endswith("; check kafka.security.username and password")
    assert PASSWORD not in error


def test_an_untrusted_certificate_names_the_verdict_and_the_ca_file() -> None:
    """OpenSSL's verification verdict, and which CAs it checked against."""
    exc = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED]")
    exc.verify_message = "self-signed certificate"
    tls = KafkaSecurity(protocol="SSL", ssl_cafile="/etc/ca.pem")
    assert str(access_error(exc, settings(tls), "kafka-1:9093")) == (
        "kafka: TLS: the certificate of kafka-1:9093 is not trusted: self-signed certificate"
        " (checked against the CA certificates in /etc/ca.pem: kafka.security.ssl_cafile)"
    )
    system = str(access_error(exc, settings(KafkaSecurity(protocol="SSL")), "kafka-1:9093"))
    assert "(checked against the system's CA certificates: kafka.security.ssl_cafile)" in system


@pytest.mark.parametrize(
    "exc",
    [
        KafkaConnectionError("Unable to bootstrap from [('kafka-1', 9093, 2)]"),
        NodeNotReadyError(1),
        RequestTimedOutError(),
        ConnectionRefusedError(111, "Connection refused"),
        ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"),
        TimeoutError(),
    ],
)
def test_outages_are_no_access_problems(exc: BaseException) -> None:
    """A broker down, slow or speaking another protocol is retried as an outage."""
    assert access_error(exc, settings()) is None
