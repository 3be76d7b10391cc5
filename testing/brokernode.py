# SPDX-License-Identifier: GPL-2.0-or-later
"""A private RabbitMQ node for the fault tests (and bench/faults_report.py).

Fault tests stop the broker application, close every connection and restart it.  Doing
that on the shared broker (127.0.0.1:5672) would break the other engineers' tests, so
each test session starts its own node, on its own ports, with its own data, log and
configuration directories and its own Erlang cookie, and deletes everything at the end.
Optionally the node gets a TLS listener whose certificate authority, server and client
certificates are created here (with ``cryptography``).

Run ``python -m testing.brokernode`` to measure how long a node takes to start.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pika
import pika.exceptions

from .ports import free_port

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")


class BrokerNodeError(Exception):
    """The private node could not be started or controlled."""


@dataclass
class TlsFiles:
    """Paths of the test PKI: CA, server and client certificate and key (PEM)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_test_pki(directory: Path, hostname: str = "localhost") -> TlsFiles:
    """Create a throw-away CA and a server and a client certificate signed by it.

    The server certificate names ``hostname`` and 127.0.0.1 so that a client verifying the
    host name accepts it; everything is valid for one day.
    """
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    later = now + dt.timedelta(days=1)

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(k: ec.EllipticCurvePrivateKey, path: Path) -> None:
        path.write_bytes(
            k.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        path.chmod(0o644)  # the node may run as another user; throw-away test keys

    ca_key = key()
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("dlms2amqp fault-test CA"))
        .issuer_name(name("dlms2amqp fault-test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(later)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, usage: x509.ObjectIdentifier, san: bool) -> tuple:
        k = key()
        b = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_cert.subject)
            .public_key(k.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(later)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if san:
            b = b.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName(hostname),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
        return k, b.sign(ca_key, hashes.SHA256())

    s_key, s_cert = leaf(hostname, ExtendedKeyUsageOID.SERVER_AUTH, True)
    c_key, c_cert = leaf("dlms2amqp-test-client", ExtendedKeyUsageOID.CLIENT_AUTH, False)
    files = TlsFiles(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
    )
    pem = serialization.Encoding.PEM
    files.ca.write_bytes(ca_cert.public_bytes(pem))
    files.server_cert.write_bytes(s_cert.public_bytes(pem))
    files.client_cert.write_bytes(c_cert.public_bytes(pem))
    write_key(s_key, files.server_key)
    write_key(c_key, files.client_key)
    return files


@dataclass
class BrokerNode:
    """A RabbitMQ node of our own: ``start()``, control with ``ctl()``, ``destroy()``.

    The node runs as the current user (root here) with HOME in its temp directory, so
    its cookie is private and ``rabbitmqctl -n`` reaches only this node.
    """

    tls: bool = False
    user: str = "guest"
    password: str = "guest"
    vhost: str = "/"
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="d2a-broker-")))
    port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)
    tls_port: int | None = None
    nodename: str = ""
    tls_files: TlsFiles | None = None
    start_seconds: float | None = None
    #: more rabbitmq.conf lines, e.g. ``["max_message_size = 262144"]``
    extra_config: list[str] = field(default_factory=list)
    _proc: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        if not self.nodename:
            self.nodename = f"d2afault-{os.getpid()}-{secrets.token_hex(3)}@localhost"
        if self.tls and self.tls_port is None:
            self.tls_port = free_port()

    # --- environment -------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        """Environment for rabbitmq-server and rabbitmqctl targeting this node only."""
        e = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}
        e.update(
            HOME=str(self.base / "home"),
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.base / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.base / "log"),
            RABBITMQ_CONFIG_FILE=str(self.base / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.base / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.base / "enabled_plugins"),
            RABBITMQ_CONF_ENV_FILE=str(self.base / "rabbitmq-env.conf"),
            RABBITMQ_PID_FILE=str(self.base / "rabbit.pid"),
            RABBITMQ_ENABLED_PLUGINS="",
            ERL_EPMD_ADDRESS="127.0.0.1",
            ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        return e

    def _write_config(self) -> None:
        home = self.base / "home"
        home.mkdir(parents=True, exist_ok=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(16).upper())
        cookie.chmod(0o400)
        for d in ("mnesia", "log"):
            (self.base / d).mkdir(exist_ok=True)
        (self.base / "enabled_plugins").write_text("[].\n")
        (self.base / "rabbitmq-env.conf").write_text("# private fault-test node\n")
        (self.base / "advanced.config").write_text("[].\n")
        lines = [
            f"listeners.tcp.local = 127.0.0.1:{self.port}",
            "loopback_users = none",
            "log.console = false",
            "log.file.level = info",
            # the fault tests fill queues quickly; keep alarms out of the way
            "vm_memory_high_watermark.relative = 0.8",
            "disk_free_limit.absolute = 50MB",
            *self.extra_config,
        ]
        if self.tls:
            self.tls_files = make_test_pki(self.base / "pki")
            t = self.tls_files
            lines += [
                f"listeners.ssl.default = 127.0.0.1:{self.tls_port}",
                f"ssl_options.cacertfile = {t.ca}",
                f"ssl_options.certfile = {t.server_cert}",
                f"ssl_options.keyfile = {t.server_key}",
                "ssl_options.verify = verify_peer",
                "ssl_options.fail_if_no_peer_cert = false",
            ]
        (self.base / "rabbitmq.conf").write_text("\n".join(lines) + "\n")

    # --- lifecycle ---------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> BrokerNode:
        """Start the node and wait until AMQP answers; records ``start_seconds``."""
        self._write_config()
        t0 = time.monotonic()
        out = open(self.base / "server.out", "wb")  # noqa: SIM115 - child owns it
        try:
            self._proc = subprocess.Popen(
                [str(RABBIT_BIN / "rabbitmq-server")],
                env=self.env(),
                cwd=self.base,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            out.close()
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerNodeError(
                    f"rabbitmq-server exited with {self._proc.returncode}:\n" + self.output_tail()
                )
            if self.amqp_ok():
                self.start_seconds = time.monotonic() - t0
                if self.user != "guest" or self.vhost != "/":
                    self._add_user()
                return self
            time.sleep(0.5)
        self.destroy()
        raise BrokerNodeError(f"node not answering after {timeout:.0f} s:\n" + self.output_tail())

    def _add_user(self) -> None:
        if self.vhost != "/":
            self.ctl("add_vhost", self.vhost)
        if self.user != "guest":
            self.ctl("add_user", self.user, self.password, secret_args=True)
        self.ctl("set_permissions", "-p", self.vhost, self.user, ".*", ".*", ".*")

    def output_tail(self, n: int = 3000) -> str:
        try:
            return (self.base / "server.out").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    @property
    def os_pid(self) -> int | None:
        """PID of the Erlang VM (beam) of this node, from its pid file."""
        try:
            return int((self.base / "rabbit.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def ctl(
        self, *args: str, timeout: float = 60.0, check: bool = True, secret_args: bool = False
    ) -> subprocess.CompletedProcess:
        """Run ``rabbitmqctl -n NODE args``; raises on failure when ``check``."""
        cp = subprocess.run(
            [str(RABBIT_BIN / "rabbitmqctl"), "-n", self.nodename, *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and cp.returncode != 0:
            shown = args[0] if secret_args else " ".join(args)
            raise BrokerNodeError(
                f"rabbitmqctl {shown} exited with {cp.returncode}: {cp.stderr.strip()[-500:]}"
            )
        return cp

    def stop_app(self) -> None:
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")
        self.wait_amqp()

    def close_all_connections(self, reason: str = "fault test") -> int:
        """Close every client connection; returns how many there were."""
        n = len(self.connections())
        self.ctl("close_all_connections", reason)
        return n

    def connections(self) -> list[str]:
        cp = self.ctl("list_connections", "-q", "--no-table-headers", "peer_port", "name")
        return [ln for ln in cp.stdout.splitlines() if ln.strip()]

    def queue_stats(self, name: str) -> tuple[int, int] | None:
        """(messages_ready, messages_unacknowledged) of queue ``name`` via rabbitmqctl."""
        cp = self.ctl(
            "list_queues",
            "-q",
            "--no-table-headers",
            "-p",
            self.vhost,
            "name",
            "messages_ready",
            "messages_unacknowledged",
            timeout=30,
        )
        for ln in cp.stdout.splitlines():
            parts = ln.split("\t")
            if len(parts) == 3 and parts[0] == name:
                return int(parts[1]), int(parts[2])
        return None

    def amqp_ok(self) -> bool:
        """True when the node accepts an AMQP login (as guest: our user may not exist yet)."""
        p = self.params(connection_attempts=1)
        p.credentials = pika.PlainCredentials("guest", "guest")
        try:
            c = pika.BlockingConnection(p)
        except (pika.exceptions.AMQPError, OSError):
            return False
        with contextlib.suppress(Exception):
            c.close()
        return True

    def wait_amqp(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.amqp_ok():
                return
            time.sleep(0.3)
        raise BrokerNodeError(f"node not answering AMQP after {timeout:.0f} s")

    def params(
        self, heartbeat: int = 30, connection_attempts: int = 3
    ) -> pika.ConnectionParameters:
        """Plain AMQP parameters for a test client of this node."""
        return pika.ConnectionParameters(
            "127.0.0.1",
            self.port,
            self.vhost,
            pika.PlainCredentials(self.user, self.password),
            heartbeat=heartbeat,
            connection_attempts=connection_attempts,
            retry_delay=0.5,
            blocked_connection_timeout=60,
            socket_timeout=5,
        )

    def tls_params(self, heartbeat: int = 30) -> pika.ConnectionParameters:
        """amqps parameters verifying the node's certificate against the test CA."""
        import ssl

        if not self.tls or self.tls_files is None:
            raise BrokerNodeError("this node has no TLS listener")
        ctx = ssl.create_default_context(cafile=str(self.tls_files.ca))
        ctx.load_cert_chain(str(self.tls_files.client_cert), str(self.tls_files.client_key))
        return pika.ConnectionParameters(
            "localhost",
            self.tls_port,
            self.vhost,
            pika.PlainCredentials(self.user, self.password),
            heartbeat=heartbeat,
            ssl_options=pika.SSLOptions(ctx, "localhost"),
            connection_attempts=3,
            retry_delay=0.5,
        )

    def destroy(self) -> None:
        """Stop the node (politely, then SIGKILL of its process group) and delete its files."""
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(Exception):
                self.ctl("stop", timeout=60, check=False)
            try:
                self._proc.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, 9)
                self._proc.wait(10)
        pid = self.os_pid
        if pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, 9)
        shutil.rmtree(self.base, ignore_errors=True)


def main() -> None:
    """Start a node, report the start time, stop it."""
    for tls in (False, True):
        node = BrokerNode(tls=tls)
        try:
            node.start()
            print(
                f"private node tls={tls} started in {node.start_seconds:.1f} s "
                f"(port {node.port}, tls port {node.tls_port})"
            )
            if tls:
                c = pika.BlockingConnection(node.tls_params())
                print("amqps with verification: connected", c.is_open)
                c.close()
        finally:
            node.destroy()


if __name__ == "__main__":
    main()
