# SPDX-License-Identifier: GPL-2.0-or-later
"""A private 3-node RabbitMQ cluster on this machine, for the scale-out tests.

Each node is a ``BrokerNode`` (own node name, AMQP and distribution ports, data and log
directories) and all of them share one random Erlang cookie, so they can cluster with each
other and with nothing else.  The cluster forms at boot by classic-config peer discovery:
the first node boots alone, then the others, at once, list it as their only peer and join
it (a node that still comes up alone is joined by hand with ``join_cluster``).
The consistent-hash exchange plugin is enabled on these nodes only; a quorum queue spans
all three nodes.

``stop_app``/``start_app`` act on one node, so a test can take a node away under load.

Run ``python -m testing.cluster`` to measure how long the cluster takes to start.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pika

from .brokernode import RABBIT_BIN, BrokerNode, BrokerNodeError

PLUGINS = ("rabbitmq_consistent_hash_exchange",)


@dataclass
class ClusterNode(BrokerNode):
    """One member: the cookie is the cluster's, the config names the first node as peer."""

    cookie: str = ""
    seed: str = ""  # node name of the first node; empty on the first node itself

    def env(self) -> dict[str, str]:
        e = super().env()
        e["RABBITMQ_ENABLED_PLUGINS"] = ",".join(PLUGINS)
        return e

    def _write_config(self) -> None:
        super()._write_config()
        cookie = self.base / "home" / ".erlang.cookie"
        cookie.chmod(0o600)
        cookie.write_text(self.cookie)
        cookie.chmod(0o400)
        (self.base / "enabled_plugins").write_text("[" + ",".join(PLUGINS) + "].\n")
        peer = self.seed or self.nodename
        extra = [
            "cluster_formation.peer_discovery_backend = classic_config",
            f"cluster_formation.classic_config.nodes.1 = {peer}",
            # the joiners wait for the first node instead of booting alone
            "cluster_formation.discovery_retry_limit = 120",
            "cluster_formation.discovery_retry_interval = 500",
            "cluster_partition_handling = pause_minority",
            "collect_statistics_interval = 1000",
        ]
        with open(self.base / "rabbitmq.conf", "a", encoding="utf-8") as f:
            f.write("\n".join(extra) + "\n")


@dataclass
class Cluster:
    """Three clustered nodes: ``start()``, ``nodes[i].stop_app()``, ``destroy()``."""

    size: int = 3
    nodes: list[ClusterNode] = field(default_factory=list)
    start_seconds: float | None = None

    def start(self, timeout: float = 180.0, attempts: int = 2) -> Cluster:
        """Start the nodes, wait until all are running members of one cluster.

        A node may fail to boot on a loaded machine (a port taken between ``free_port``
        and the bind): the whole cluster is then started again, once, with new ports.
        """
        for attempt in range(attempts):
            try:
                return self._start(timeout)
            except BrokerNodeError:
                if attempt == attempts - 1:
                    raise
        return self

    def _start(self, timeout: float) -> Cluster:
        cookie = secrets.token_hex(16).upper()
        tag = f"{os.getpid()}-{secrets.token_hex(2)}"
        first = f"d2acl-{tag}-0@localhost"
        self.nodes = [
            ClusterNode(
                nodename=f"d2acl-{tag}-{i}@localhost",
                cookie=cookie,
                seed="" if i == 0 else first,
                base=Path(tempfile.mkdtemp(prefix=f"d2a-cluster{i}-")),
            )
            for i in range(self.size)
        ]
        t0 = time.monotonic()
        errors: list[BaseException] = []

        def boot(n: ClusterNode, delay: float) -> None:
            time.sleep(delay)
            try:
                n.start(timeout=timeout)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        # the first node alone, then the others at once: they find it on their first try
        # (started all together, a joiner on a loaded machine gave up waiting and booted
        # alone)
        boot(self.nodes[0], 0.0)
        threads = [
            threading.Thread(target=boot, args=(n, 0.0), daemon=True) for n in self.nodes[1:]
        ]
        if not errors:
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout + 10)
        if errors:
            self.destroy()
            raise BrokerNodeError(f"cluster did not start: {errors[0]}")
        try:
            self.wait_members(timeout=20)
        except BrokerNodeError:
            self._join_stragglers()
            self.wait_members(timeout=60)
        self.start_seconds = time.monotonic() - t0
        return self

    def _join_stragglers(self) -> None:
        """Peer discovery raced (a loaded machine): join the missing nodes by hand."""
        running = set(self.running_members())
        for n in self.nodes[1:]:
            if n.nodename in running:
                continue
            n.ctl("stop_app")
            n.ctl("reset")
            n.ctl("join_cluster", self.nodes[0].nodename)
            n.ctl("start_app")

    def running_members(self, via: int = 0) -> list[str]:
        cp = self.nodes[via].ctl("eval", "rabbit_nodes:all_running().", timeout=30)
        text = " ".join(cp.stdout.split()).strip("[] ")
        return sorted(x.strip(" '") for x in text.split(",") if x.strip(" '"))

    def wait_members(self, timeout: float = 60.0) -> None:
        """Wait until the first node sees every node running in its cluster."""
        want = sorted(n.nodename for n in self.nodes)
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while time.monotonic() < deadline:
            with contextlib.suppress(BrokerNodeError, subprocess.TimeoutExpired):
                seen = self.running_members()
                if seen == want:
                    return
            time.sleep(0.5)
        raise BrokerNodeError(f"cluster members running: {seen}, expected {want}")

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    def addresses(self) -> list[str]:
        """``host:port`` of every node (what a daemon's ClusterHosts lists)."""
        return [f"127.0.0.1:{p}" for p in self.ports]

    def params(self, i: int = 0) -> pika.ConnectionParameters:
        return self.nodes[i].params()

    def connect(self) -> pika.BlockingConnection:
        """A test connection to the first node that answers."""
        last: BaseException | None = None
        for n in self.nodes:
            try:
                return pika.BlockingConnection(n.params(connection_attempts=1))
            except (pika.exceptions.AMQPError, OSError) as e:
                last = e
        raise BrokerNodeError(f"no cluster node answers: {last}")

    def queue_stats(self, name: str) -> tuple[int, int] | None:
        for n in self.nodes:
            with contextlib.suppress(BrokerNodeError, subprocess.TimeoutExpired):
                return n.queue_stats(name)
        return None

    def destroy(self) -> None:
        threads = [threading.Thread(target=n.destroy, daemon=True) for n in self.nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)


def main() -> None:
    """Start a cluster, report the start time, declare a quorum queue, stop it."""
    c = Cluster()
    try:
        c.start()
        print(f"3-node cluster started in {c.start_seconds:.1f} s, ports {c.ports}")
        conn = c.connect()
        ch = conn.channel()
        ch.exchange_declare("probe.hash", "x-consistent-hash", durable=True)
        q = ch.queue_declare("probe.q", durable=True, arguments={"x-queue-type": "quorum"})
        print("quorum queue declared:", q.method.queue, "members:")
        conn.close()
        cp = c.nodes[0].ctl("list_queues", "-q", "name", "type", "members")
        print(cp.stdout.strip())
        t0 = time.monotonic()
        c.nodes[1].stop_app()
        c.nodes[1].start_app()
        print(f"stop_app + start_app of node 1: {time.monotonic() - t0:.1f} s")
    finally:
        t0 = time.monotonic()
        c.destroy()
        print(f"destroyed in {time.monotonic() - t0:.1f} s")


__all__ = ["Cluster", "ClusterNode", "RABBIT_BIN"]

if __name__ == "__main__":
    main()
