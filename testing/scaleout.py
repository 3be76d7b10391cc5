# SPDX-License-Identifier: GPL-2.0-or-later
"""Several daemons against the private cluster: configs, requests, the oracle's inputs.

``ScaleLab`` holds a ``Cluster`` (testing/cluster.py), the simulated meters behind a
counting ``TcpProxy`` (what the meters saw: connections open at once per meter), and the
daemons, each with its own StateDir, metrics port and home node, as on separate hosts.
Used by tests/test_scaleout.py and bench/scaleout_bench.py.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import time
import uuid
from pathlib import Path
from typing import Any, Optional

import pika
import pika.exceptions

from .cluster import Cluster
from .collector import AmqpClient, Collector
from .daemon import DaemonProcess
from .ports import free_port
from .proxy import TcpProxy

LOW = "-c 32 -s 1 -a Low -P 00000000 -i WRAPPER"
GMAC = (
    "-c 48 -s 1 -a HighGMAC -C AuthenticationEncryption -i WRAPPER -T 4775727578313233 "
    "-A D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF -B 000102030405060708090A0B0C0D0E0F"
)


class ScaleLab:
    """Daemons d0..dk on one request stream; meters behind ``proxy``."""

    def __init__(
        self,
        cluster: Cluster,
        workdir: Path,
        proxy: Optional[TcpProxy] = None,
        partitions: int = 12,
        **config: Any,
    ):
        self.cluster = cluster
        self.workdir = workdir
        self.proxy = proxy
        self.partitions = partitions
        self.config = config
        tag = uuid.uuid4().hex[:8]
        self.in_queue = f"scale.{tag}.in"
        self.out_queue = f"scale.{tag}.out"
        self.daemons: list[DaemonProcess] = []
        self._rotate = itertools.count()
        self.client = AmqpClient(self.params)

    # --- broker access (any node that answers: the tests stop nodes) ---------------------------
    def params(self) -> pika.ConnectionParameters:
        """Parameters of the next node in turn (the collector reconnects through these)."""
        nodes = self.cluster.nodes
        for _ in range(len(nodes)):
            n = nodes[next(self._rotate) % len(nodes)]
            if n.amqp_ok():
                return n.params(connection_attempts=1)
        return nodes[0].params(connection_attempts=1)

    def consumers(self, queue: str) -> int:
        try:
            conn = pika.BlockingConnection(self.params())
        except (pika.exceptions.AMQPError, OSError):
            return 0
        try:
            return int(conn.channel().queue_declare(queue, passive=True).method.consumer_count)
        except pika.exceptions.ChannelClosedByBroker:
            return 0
        finally:
            with contextlib.suppress(Exception):
                conn.close()

    def partition_queues(self) -> list[str]:
        width = len(str(max(self.partitions - 1, 0)))
        return [f"{self.in_queue}.p{i:0{width}d}" for i in range(self.partitions)]

    # --- daemons -------------------------------------------------------------------------------
    def daemon_config(self, i: int, **over: Any) -> dict[str, Any]:
        nodes = self.cluster.nodes
        home = nodes[i % len(nodes)]
        others = [f"127.0.0.1:{n.port}" for n in nodes if n is not home]
        d = self.workdir / f"d{i}"
        d.mkdir(parents=True, exist_ok=True)
        cfg: dict[str, Any] = {
            "HostName": "127.0.0.1",
            "Port": home.port,
            "ClusterHosts": others,
            "InQueue": self.in_queue,
            "OutQueue": self.out_queue,
            "QueueType": "quorum",
            "Partitions": self.partitions,
            "Workers": 1,
            "SessionsPerWorker": 8,
            "RequestTimeout": 20.0,
            "FrameTimeout": 5.0,
            "MetricsPort": free_port(),
            "StateDir": str(d / "state"),
            "DebugFile": str(d / "daemon.log"),
            "LogLevel": "Info",
            "ShutdownGrace": 10.0,
            "Heartbeat": 10,
            "ReconnectMaxDelay": 2.0,
        }
        cfg.update(self.config)
        cfg.update(over)
        return cfg

    def start_daemon(self, wait: bool = True, **over: Any) -> DaemonProcess:
        i = len(self.daemons)
        cfg = self.daemon_config(i, **over)
        path = self.workdir / f"d{i}" / "dlms2amqp.json"
        path.write_text(json.dumps(cfg, indent=2))
        d = DaemonProcess(path, cfg, own_group=True)
        self.daemons.append(d)
        d.start()
        if wait:
            # its own "consuming", not a consumer on InQueue: the others' would do for a
            # daemon that has exited meanwhile (a config error, say)
            deadline = time.monotonic() + 90
            while not d.events("consuming"):
                if not d.alive():
                    raise AssertionError(f"daemon d{i} exited:\n{d.output(40)[-6000:]}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"daemon d{i} not consuming after 90 s")
                time.sleep(0.2)
        return d

    def wait_subscribed(self, n: int, timeout: float = 60.0) -> None:
        """Until every partition has ``n`` consumers (active or standing by)."""
        deadline = time.monotonic() + timeout
        last = 0
        while time.monotonic() < deadline:
            last = self.consumers(self.in_queue + ".daemons")
            if last >= n:
                return
            time.sleep(0.3)
        raise AssertionError(f"{last} consumers on the partitions, expected {n}")

    def wait_balanced(self, timeout: float = 60.0) -> list[float]:
        """After some requests: until the first daemon has given away what is over its share.

        The first daemon takes every partition; the others get theirs when it gives the
        excess away (``Balancer``, every 2 s, once requests flow): a measurement started
        before that would include hand-overs.  (A daemon counts a partition as active from
        its first delivery on: those handed over show only once requests come.)  Returns
        each daemon's ``partitions_active``.
        """
        share = math.ceil(self.partitions / max(1, len(self.daemons)))
        deadline = time.monotonic() + timeout
        active: list[float] = []
        while len(self.daemons) > 1 and time.monotonic() < deadline:
            active = [d.metric("dlms2amqp_partitions_active") for d in self.daemons]
            given = sum(d.metric("dlms2amqp_partition_handovers_total") for d in self.daemons)
            if max(active) <= share and given >= self.partitions - share:
                return active
            time.sleep(0.3)
        if len(self.daemons) > 1:
            raise AssertionError(f"partitions active per daemon {active}, share {share}")
        return active

    def delete_queues(self) -> list[str]:
        """Delete every queue of this lab (names under its InQueue and OutQueue).

        Each quorum queue is a Raft group on the 3 nodes that keeps ticking while idle: a
        benchmark running set-ups one after the other would otherwise charge the later ones
        with the earlier ones' queues.  Returns the names deleted.
        """
        cp = self.cluster.nodes[0].ctl("list_queues", "-q", "--no-table-headers", "name")
        names = [
            n
            for n in (line.strip() for line in cp.stdout.splitlines())
            if n == self.out_queue or n == self.in_queue or n.startswith(self.in_queue + ".")
        ]
        with contextlib.closing(self.cluster.connect()) as conn:
            ch = conn.channel()
            for name in names:
                ch.queue_delete(name)
        return names

    def stop_all(self) -> None:
        for d in self.daemons:
            with contextlib.suppress(Exception):
                d.stop(grace=20)

    # --- requests ------------------------------------------------------------------------------
    def meter_port(self, sim_port: int) -> int:
        return self.proxy.port_of[sim_port] if self.proxy is not None else sim_port

    def request(
        self,
        msg_id: str,
        sim_port: int,
        conn: str,
        obis: str = "1.0.1.8.0.255",
        host: str = "127.0.0.1",
    ) -> bytes:
        """A READ of the meter behind ``sim_port`` (``host``: how -h spells the proxy)."""
        body = {
            "MsgID": msg_id,
            "Cmd": "READ",
            "ObisCode": obis,
            "ConnectionString": f"-h {host} -p {self.meter_port(sim_port)} {conn}",
        }
        return json.dumps(body).encode()

    def collector(self) -> Collector:
        c = Collector(self.client, [self.out_queue, self.in_queue + ".dead"]).start()
        return c

    def publish(
        self,
        bodies: list[tuple[str, bytes]],
        rate: float = 0.0,
        routes: Optional[list[tuple[str, str]]] = None,
    ) -> None:
        """To InQueue, or with ``routes`` (dlms2amqp-send's ``partition_routes``) to those."""
        self.client.publish(self.in_queue, bodies, rate=rate, routes=routes)


def replies_by_id(items: list[Any], out_queue: str) -> dict[str, list[dict]]:
    """InMsgID -> every reply body received for it."""
    out: dict[str, list[dict]] = {}
    for r in items:
        if r.queue != out_queue:
            continue
        rep = json.loads(r.body)
        out.setdefault(str(rep.get("InMsgID")), []).append(rep)
    return out
