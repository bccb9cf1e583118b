"""A dev broker that checks who its clients are: SASL PLAIN and TLS listeners besides the
PLAINTEXT one, and KRaft's StandardAuthorizer enforcing ACLs.

The PLAINTEXT listener (and the controller's) stays open to ``User:ANONYMOUS``, a super user,
so the launcher's readiness check and the tests' own admin work need no credentials; the SASL
users are ordinary principals with only the ACLs a test grants them (``grant``).
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

from relay.devkafka import DevKafka, KafkaDist
from relay.devkafka.broker import _free_port

# user -> password of the SASL PLAIN listener: each gets only the ACLs tests grant it; none are
# ever granted to "stranger"
USERS = {"relay": "relay-pw-5f8e2", "reader": "reader-pw-77a1c", "stranger": "stranger-pw-3b9"}


class SecureKafka(DevKafka):
    """A :class:`DevKafka` with SASL_PLAINTEXT and SSL listeners and an authorizer."""

    def __init__(self, dist: KafkaDist, work_dir: Path) -> None:
        super().__init__(dist, work_dir)
        self.users = dict(USERS)  # a restart applies a change
        self.sasl_port = _free_port()
        self.ssl_port = _free_port()
        self.tls = work_dir / "tls"

    @property
    def sasl_bootstrap(self) -> str:
        return f"127.0.0.1:{self.sasl_port}"

    @property
    def ssl_bootstrap(self) -> str:
        return f"127.0.0.1:{self.ssl_port}"

    @property
    def ca_file(self) -> Path:
        """The broker's own (self-signed) certificate: the CA a client must trust."""
        return self.tls / "broker.crt"

    def _write_config(self) -> Path:
        path = super()._write_config()
        self._make_certificate()
        plain, sasl, ssl = self.bootstrap_servers, self.sasl_bootstrap, self.ssl_bootstrap
        text = path.read_text()
        text = text.replace(
            f"\nlisteners=PLAINTEXT://{plain},",
            f"\nlisteners=PLAINTEXT://{plain},SASL_PLAINTEXT://{sasl},SSL://{ssl},",
        )
        text = text.replace(
            f"advertised.listeners=PLAINTEXT://{plain}\n",
            f"advertised.listeners=PLAINTEXT://{plain},SASL_PLAINTEXT://{sasl},SSL://{ssl}\n",
        )
        text = text.replace(
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,"
            "SSL:SSL,",
        )
        users = " ".join(f'user_{name}="{password}"' for name, password in self.users.items())
        extra = {
            "sasl.enabled.mechanisms": "PLAIN",
            "listener.name.sasl_plaintext.plain.sasl.jaas.config": (
                f"org.apache.kafka.common.security.plain.PlainLoginModule required {users};"
            ),
            "listener.name.ssl.ssl.keystore.type": "PEM",
            "listener.name.ssl.ssl.keystore.location": str(self.tls / "broker.pem"),
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users": "User:ANONYMOUS",
        }
        assert text.count("SASL_PLAINTEXT://") == 2, text  # both listener lines were found
        text += "".join(f"{key}={value}\n" for key, value in extra.items())
        path.write_text(text)
        return path

    def _make_certificate(self) -> None:
        if self.ca_file.exists():
            return
        self.tls.mkdir(parents=True, exist_ok=True)
        key, cert = self.tls / "broker.key", self.ca_file
        command = "openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=127.0.0.1"
        command += " -addext subjectAltName=IP:127.0.0.1"
        subprocess.run(
            [*command.split(), "-keyout", str(key), "-out", str(cert)],
            check=True,
            capture_output=True,
        )
        (self.tls / "broker.pem").write_bytes(key.read_bytes() + cert.read_bytes())

    async def grant(self, principal: str, *acl: str) -> None:
        """Add ACLs with Kafka's own tool, e.g. ``grant("User:reader", "--operation",
        "Describe", "--topic", "*")``."""
        await self._acls(["--add"], principal, acl)

    async def revoke(self, principal: str, *acl: str) -> None:
        """Remove ACLs added by :meth:`grant` (the same arguments)."""
        await self._acls(["--remove", "--force"], principal, acl)

    async def _acls(self, action: list[str], principal: str, acl: tuple[str, ...]) -> None:
        command = self._java(
            "kafka.admin.AclCommand",
            "--bootstrap-server",
            self.bootstrap_servers,
            *action,
            "--allow-principal",
            principal,
            *acl,
        )
        done = await asyncio.to_thread(
            subprocess.run,
            command,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.work_dir,
        )
        assert done.returncode == 0, done.stdout + done.stderr
