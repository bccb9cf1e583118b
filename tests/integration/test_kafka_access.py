"""The Kafka sink against a broker that checks who it is (SASL PLAIN, TLS, ACLs enforced by
KRaft's StandardAuthorizer): refusals are reported with their cause and the principal, never
with a password, and stop the relay at start-up instead of being retried for ever."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from structlog.testing import capture_logs

from relay.devkafka import KafkaDist
from relay.events import Kind
from relay.sinks.kafka import KafkaSecurity, KafkaSettings, KafkaSink, KafkaSinkError
from relay.store import Store
from tests.integration.kafkakit import Running, start_or_fail, until
from tests.integration.securekafka import USERS, SecureKafka
from tests.integration.test_kafka_sink import bounce
from tests.procs import Proc, SimProcess, free_port, relay_config

pytestmark = pytest.mark.integration

WRONG_PASSWORD = "not-the-pw-90d1e"


@pytest.fixture(scope="module")
def secure_kafka(
    kafka_dist: KafkaDist, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SecureKafka]:
    """One broker with SASL, TLS and an authorizer for the module (its start is the cost)."""
    broker = SecureKafka(kafka_dist, tmp_path_factory.mktemp("secure-kafka"))
    print(f"secure Kafka broker log: {broker.log_path}")
    start_or_fail(broker, "the secured Kafka broker")
    try:
        yield broker
    finally:
        asyncio.run(broker.stop())


def sasl(user: str, password: str) -> KafkaSecurity:
    return KafkaSecurity(
        protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", username=user, password=password
    )


def settings_for(bootstrap: str, prefix: str, security: KafkaSecurity) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=bootstrap,
        topic=prefix + ".ctct.email.{kind}",
        request_timeout_s=5,
        retry_backoff_max_s=1.0,
        security=security,
    )


async def create_topics(broker: SecureKafka, settings: KafkaSettings) -> None:
    """The topics, made by the super user on the PLAINTEXT listener."""
    admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, 1, 1) for t in settings.topics()])
    finally:
        await admin.close()


async def reader_without_write(broker: SecureKafka, settings: KafkaSettings) -> list[str]:
    """The topics made, and User:reader granted Describe on them and IdempotentWrite, not Write;
    returns the ACL pattern of the topics, to grant or revoke Write with."""
    await create_topics(broker, settings)
    pattern = ["--topic", settings.topic.split("{", 1)[0], "--resource-pattern-type", "prefixed"]
    await broker.grant("User:reader", "--operation", "Describe", *pattern)
    await broker.grant("User:reader", "--operation", "IdempotentWrite", "--cluster")
    return pattern


def every_line(logs: list[dict[str, object]], caplog: pytest.LogCaptureFixture) -> str:
    """Our structured events and the libraries' records (aiokafka's), as one text."""
    return "\n".join([str(e) for e in logs] + [r.getMessage() for r in caplog.records])


async def start_up_error(settings: KafkaSettings, store: Store, timeout_s: float = 20) -> str:
    """The message of the KafkaSinkError a sink on ``settings`` stops with at start-up."""
    sink = KafkaSink(settings, store)
    with pytest.raises(KafkaSinkError) as stopped:
        await asyncio.wait_for(sink.run(asyncio.Event()), timeout_s)
    return str(stopped.value)


async def test_a_wrong_sasl_password_stops_the_sink_at_start_up_naming_the_cause(
    secure_kafka: SecureKafka, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker refuses the password: the sink stops with the broker's reason, the address
    and the user (it retried for ever, "Unable to bootstrap", the cause only in aiokafka's
    log); the password appears nowhere."""
    caplog.set_level(logging.INFO)
    settings = settings_for(
        secure_kafka.sasl_bootstrap, f"pw{uuid.uuid4().hex[:8]}", sasl("relay", WRONG_PASSWORD)
    )
    with capture_logs() as logs:
        message = await start_up_error(settings, store)
    assert message.startswith(
        f"kafka: {secure_kafka.sasl_bootstrap} refused to authenticate User:relay (SASL PLAIN,"
    ), message
    assert "Invalid username or password" in message
    assert "kafka.security.username and password" in message
    assert WRONG_PASSWORD not in message + every_line(logs, caplog)


@pytest.fixture
def other_ca(tmp_path: Path) -> Path:
    """A self-signed CA certificate that signed nothing of the broker's."""
    cert = tmp_path / "other-ca.crt"
    command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    files = ["-subj", "/CN=other", "-keyout", str(tmp_path / "other-ca.key"), "-out", str(cert)]
    subprocess.run([*command, *files], check=True, capture_output=True)
    return cert


async def test_an_untrusted_broker_certificate_stops_the_sink_at_start_up(
    secure_kafka: SecureKafka, store: Store, other_ca: Path
) -> None:
    """ssl_cafile names a CA that did not sign the broker's certificate: the sink stops with
    OpenSSL's verdict and the file (it retried for ever, "Unable to bootstrap")."""
    security = KafkaSecurity(protocol="SSL", ssl_cafile=str(other_ca))
    settings = settings_for(secure_kafka.ssl_bootstrap, f"ca{uuid.uuid4().hex[:8]}", security)
    message = await start_up_error(settings, store)
    assert message.startswith(
        f"kafka: TLS: the certificate of {secure_kafka.ssl_bootstrap} is not trusted: "
    ), message
    assert "self-signed certificate" in message
    assert f"checked against the CA certificates in {other_ca}" in message


async def test_a_trusted_certificate_and_good_credentials_still_publish(
    secure_kafka: SecureKafka, store: Store
) -> None:
    """The checks above refuse only what the broker or OpenSSL refuse: the right CA over TLS,
    and a user with the ACLs it needs over SASL, connect and publish."""
    prefix = f"ok{uuid.uuid4().hex[:8]}"
    tls = KafkaSecurity(protocol="SSL", ssl_cafile=str(secure_kafka.ca_file))
    over_tls = settings_for(secure_kafka.ssl_bootstrap, prefix, tls)
    await create_topics(secure_kafka, over_tls)
    run = Running(KafkaSink(over_tls, store), store)
    await run.commit([bounce(i) for i in range(5)])
    await run.caught_up(60)
    await run.stop(60)
    pattern = ["--topic", f"{prefix}.ctct.email.", "--resource-pattern-type", "prefixed"]
    await secure_kafka.grant("User:reader", "--operation", "Describe", *pattern)
    await secure_kafka.grant("User:reader", "--operation", "Write", *pattern)
    over_sasl = settings_for(secure_kafka.sasl_bootstrap, prefix, sasl("reader", USERS["reader"]))
    run = Running(KafkaSink(over_sasl, store), store)
    await run.commit([bounce(i) for i in range(5, 10)])
    await run.caught_up(60)
    await run.stop(60)


async def test_a_principal_without_any_acl_stops_the_sink_at_start_up(
    secure_kafka: SecureKafka, store: Store
) -> None:
    """No ACL at all: the broker refuses the idempotent producer its id; the sink stops naming
    the principal and the ACL it needs (it retried for ever)."""
    prefix = f"none{uuid.uuid4().hex[:8]}"
    settings = settings_for(
        secure_kafka.sasl_bootstrap, prefix, sasl("stranger", USERS["stranger"])
    )
    assert await start_up_error(settings, store) == (
        f"kafka: User:stranger is not authorized on the cluster of {secure_kafka.sasl_bootstrap}"
        " (ClusterAuthorizationFailed): the idempotent producer needs IdempotentWrite on the"
        " cluster or Write on a topic"
    )


async def test_topics_the_principal_may_not_describe_are_not_reported_missing(
    secure_kafka: SecureKafka, store: Store
) -> None:
    """The topics exist, but no ACL lets User:relay at them (it may only produce
    idempotently): the sink stops saying so, naming the principal and the topics (it said they
    did not exist and to create them)."""
    settings = settings_for(
        secure_kafka.sasl_bootstrap, f"acl{uuid.uuid4().hex[:8]}", sasl("relay", USERS["relay"])
    )
    await create_topics(secure_kafka, settings)
    await secure_kafka.grant("User:relay", "--operation", "IdempotentWrite", "--cluster")
    message = await start_up_error(settings, store, 30)
    assert message.startswith(
        f"kafka: User:relay is not authorized for topic(s) {', '.join(settings.topics())}"
        f" on {secure_kafka.sasl_bootstrap} (TopicAuthorizationFailed)"
    ), message
    assert "do not exist" not in message
    assert USERS["relay"] not in message


async def test_a_topic_the_principal_may_not_write_is_reported_and_retried(
    secure_kafka: SecureKafka, store: Store
) -> None:
    """User:reader may describe every topic of the relay but write to none: the sink starts,
    then reports the refusal in status and logs naming the topic and the principal
    (``kafka.access_refused``), and retries: an ACL granted later is picked up."""
    prefix = f"ro{uuid.uuid4().hex[:8]}"
    settings = settings_for(secure_kafka.sasl_bootstrap, prefix, sasl("reader", USERS["reader"]))
    pattern = await reader_without_write(secure_kafka, settings)
    with capture_logs() as logs:
        run = Running(KafkaSink(settings, store), store)
        await run.commit([bounce(i) for i in range(5)])

        async def refused() -> bool:
            assert not run.task.done(), run.task
            return run.sink.last_error is not None and "TopicAuthorization" in run.sink.last_error

        await until(refused, 30, "the write refusal is reported")
        topic = settings.topic_for(Kind.BOUNCE)
        assert run.sink.last_error == (
            f"kafka: User:reader is not authorized for topic(s) {topic} on"
            f" {secure_kafka.sasl_bootstrap} (TopicAuthorizationFailed): the broker's ACLs must"
            " allow it Describe and Write on them (the broker says so of a topic that does not"
            " exist too, when the principal may not describe it)"
        )
        events = [e for e in logs if e["event"] == "kafka.access_refused"]
        assert events
        assert events[0]["error"] == run.sink.last_error
        await secure_kafka.grant("User:reader", "--operation", "Write", *pattern)
        await run.caught_up(60)
        await run.stop(60)


async def test_a_refusal_on_every_connection_backs_off_longer_each_time(
    secure_kafka: SecureKafka, store: Store
) -> None:
    """The broker takes the connection, then refuses every batch (no Write ACL): each retry
    waits longer than the one before, up to kafka's longest backoff (the backoff started over
    on every connection, so it retried every half second for as long as the refusal lasted:
    a new producer, producer id and topic check each time). A connection that gets an
    acknowledgement starts the backoff over."""
    prefix = f"bk{uuid.uuid4().hex[:8]}"
    settings = replace(
        settings_for(secure_kafka.sasl_bootstrap, prefix, sasl("reader", USERS["reader"])),
        retry_backoff_s=0.5,
        retry_backoff_max_s=30.0,
    )
    pattern = await reader_without_write(secure_kafka, settings)
    with capture_logs() as logs:
        run = Running(KafkaSink(settings, store), store)
        await run.commit([bounce(i) for i in range(5)])

        async def refused(times: int) -> bool:
            assert not run.task.done(), run.task
            return len([e for e in logs if e["event"] == "kafka.access_refused"]) >= times

        await until(lambda: refused(4), 30, "four refusals")
        delays = [e["retry_in_s"] for e in logs if e["event"] == "kafka.access_refused"]
        # attempt n waits between half and all of 0.5 s * 2 ** (n - 1)
        assert [0.25 <= d <= 0.5 for d in delays[:1]] == [True], delays
        assert delays[3] >= 2.0, delays
        await secure_kafka.grant("User:reader", "--operation", "Write", *pattern)
        await run.caught_up(60)
        before = len(delays)
        await secure_kafka.revoke("User:reader", "--operation", "Write", *pattern)
        await run.commit([bounce(i) for i in range(5, 10)])
        await until(lambda: refused(before + 1), 60, "the refusal after an acknowledgement")
        delays = [e["retry_in_s"] for e in logs if e["event"] == "kafka.access_refused"]
        assert delays[before] <= 0.5, delays  # the backoff started over
        await run.stop(60)


async def test_credentials_refused_after_start_up_are_reported_and_retried(
    kafka_dist: KafkaDist, tmp_path: Path, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker stops taking the password while the sink runs (changed there, then a
    restart): status and logs say the broker refuses it and why (they said only that nothing
    was acknowledged, the cause was in aiokafka's log), and publishing resumes once the broker
    takes it again. The password appears nowhere."""
    caplog.set_level(logging.INFO)
    broker = SecureKafka(kafka_dist, tmp_path / "kafka")
    print(f"private secured Kafka broker log: {broker.log_path}")
    await broker.start()
    try:
        prefix = f"rot{uuid.uuid4().hex[:8]}"
        settings = settings_for(broker.sasl_bootstrap, prefix, sasl("reader", USERS["reader"]))
        await create_topics(broker, settings)
        pattern = ["--topic", f"{prefix}.ctct.email.", "--resource-pattern-type", "prefixed"]
        await broker.grant("User:reader", "--operation", "Describe", *pattern)
        await broker.grant("User:reader", "--operation", "Write", *pattern)
        with capture_logs() as logs:
            run = Running(KafkaSink(settings, store), store)
            await run.commit([bounce(i) for i in range(5)])
            await run.caught_up(60)
            broker.users["reader"] = "changed-on-the-broker"
            await broker.restart()
            await run.commit([bounce(i) for i in range(5, 10)])

            async def reported() -> bool:
                assert not run.task.done(), run.task
                error = run.sink.last_error
                return error is not None and "refused to authenticate" in error

            await until(reported, 60, "the refused credentials are reported")
            assert run.sink.last_error is not None
            assert run.sink.last_error.startswith(
                f"kafka: {broker.sasl_bootstrap} refused to authenticate User:reader (SASL PLAIN,"
            ), run.sink.last_error
            assert run.sink.health() == (False, run.sink.last_error)
            broker.users["reader"] = USERS["reader"]
            await broker.restart()
            await run.caught_up(90)
            assert run.sink.last_error is None
            await run.stop(60)
    finally:
        await broker.stop()
    assert USERS["reader"] not in every_line(logs, caplog)


async def test_the_relay_exits_at_start_up_on_a_wrong_password(
    secure_kafka: SecureKafka, tmp_path: Path
) -> None:
    """`ctct-relay run` with a password the broker refuses exits 1 within seconds with the
    cause on its output, without the password (it ran on, publishing nothing)."""
    upstream = cast(SimProcess, SimpleNamespace(url=f"http://127.0.0.1:{free_port()}"))
    kafka = {
        "bootstrap_servers": secure_kafka.sasl_bootstrap,
        "topic": f"run{uuid.uuid4().hex[:8]}" + ".ctct.email.{kind}",
        "request_timeout_s": 5,
        "security": {
            "protocol": "SASL_PLAINTEXT",
            "username": "relay",
            "password": WRONG_PASSWORD,
        },
    }
    relay = Proc(
        ["run", "--config", str(relay_config(tmp_path, upstream, kafka=kafka))],
        tmp_path / "relay.log",
    ).start()
    print(f"relay log: {relay.log}")
    try:
        assert relay.popen is not None
        code = await asyncio.to_thread(relay.popen.wait, 30)
    finally:
        relay.kill()
    output = relay.output()
    assert code == 1, output[-3000:]
    assert "refused to authenticate User:relay (SASL PLAIN" in output
    assert WRONG_PASSWORD not in output
