# SPDX-License-Identifier: GPL-2.0-or-later
"""The fault lab: a private broker node, the latency simulator, a counting proxy, the real
daemon, and ``Lab.run`` which injects one fault and applies the oracle.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testing.collector import AmqpClient, Collector, Received
from testing.daemon import DaemonProcess
from testing.oracle import (
    CANARY_AKEY,
    CANARY_BKEY,
    CANARY_BROKER_PASSWORD,
    CANARY_DKEY,
    CANARY_PASSWORD,
    ROWS,
    Row,
    files_under,
    judge,
    reply_in_id,
    scan_canaries,
)
from testing.proxy import TcpProxy


# --- requests ---------------------------------------------------------------------------------
def conn_string(port: int, canaries: bool = True, extra: str = "") -> str:
    """Connection string for simulated meter on ``port``: client 32, Low, canary secrets."""
    s = f"-h 127.0.0.1 -p {port} -c 32 -s 1 -a Low -i WRAPPER -P {CANARY_PASSWORD}"
    if canaries:
        s += f" -A {CANARY_AKEY} -B {CANARY_BKEY} -D {CANARY_DKEY}"
    return (s + " " + extra).strip()


def read_request(msg_id: str, port: int, obis: str = "1.0.1.8.0.255", **kw: Any) -> bytes:
    """A READ request body in the seed's format."""
    body = {
        "MsgID": msg_id,
        "Cmd": "READ",
        "ObisCode": obis,
        "ConnectionString": conn_string(port, **kw),
    }
    return json.dumps(body).encode()


# --- the daemon under test ---------------------------------------------------------------
class Daemon(DaemonProcess):
    """The real dlms2amqpd with its own work directory: config, state dir, log, output.

    It leads its own process group (a kill -9 of the master leaves workers that ``stop``
    and ``kill9`` take down, as a service manager would).  ``config`` holds the options of
    the scenario; ``start`` writes them, with the lab's defaults, before every start.
    """

    def __init__(self, workdir: Path, config: dict[str, Any]):
        self.workdir = workdir
        self.config = config
        super().__init__(
            workdir / "dlms2amqp.json",
            self._full_config(),
            output_path=workdir / "output.txt",
            own_group=True,
            cwd=workdir,
        )

    def _full_config(self) -> dict[str, Any]:
        return {
            "DebugFile": str(self.workdir / "debug.log"),
            "StateDir": str(self.workdir / "state"),
            "MetricsPort": 0,
            "LogLevel": "Debug",
            **self.config,
        }

    @property
    def log_path(self) -> Path:
        return Path(self.cfg["DebugFile"])

    def start(self) -> Daemon:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cfg = self._full_config()
        self.config_path.write_text(json.dumps(self.cfg, indent=1))
        super().start()
        return self

    def wait_consuming(  # type: ignore[override]
        self, client: AmqpClient, queue: str, timeout: float = 60
    ) -> None:
        """Wait until the daemon consumes ``queue`` (consumer count >= 1)."""

        def consumers(q: str) -> int:
            depth = client.queue_depth(q)
            return depth[1] if depth is not None else 0

        super().wait_consuming(consumers, queue, timeout)


# --- scenarios ------------------------------------------------------------------------------
@dataclass
class Result:
    """A scenario's table row, the evidence that the fault happened, and what went wrong."""

    row: Row
    evidence: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.row.fault}: evidence={self.evidence} problems={self.problems} "
            f"leaks={self.leaks} lost={self.row.lost_ids[:10]} "
            f"divergent={self.row.divergent_ids[:10]} unreasoned={self.row.unreasoned_dead[:10]}"
        )


def stored_reply_ids(state_dir: Path) -> set[str]:
    """MsgIDs whose reply is in the daemon's reply store (read-only peek at its SQLite)."""
    import sqlite3
    import zlib

    path = state_dir / "replies.sqlite3"
    if not path.exists():
        return set()
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        # the key is an HMAC (no MsgID in it): the stored reply's InMsgID says whose it is
        return {
            str(json.loads(zlib.decompress(b)).get("InMsgID"))
            for (b,) in db.execute("SELECT body FROM replies")
        }
    finally:
        db.close()


def wait_for(pred: Any, timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())


def worker_pids(daemon: Daemon) -> list[int]:
    """The daemon's worker processes (its children running multiprocessing.spawn)."""
    out = []
    for pid in daemon.workers():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"resource_tracker" not in cmd:
            out.append(pid)
    return out


class Lab:
    """A private broker node, a latency simulator and helpers to run one fault scenario."""

    def __init__(self, workdir: Path, meters: int = 40, latency_ms: int = 300, tls: bool = False):
        from testing.brokernode import BrokerNode

        self.workdir = workdir
        self.meters = meters
        self.latency_ms = latency_ms
        self.node = BrokerNode(user="d2afault", password=CANARY_BROKER_PASSWORD, tls=tls)
        self.client = AmqpClient(self.node.params)
        self._stack = contextlib.ExitStack()
        self.sim: Any = None
        self.rows: list[Row] = []

    def __enter__(self) -> Lab:
        from testing.simulator import running_simulator

        try:
            self.node.start()
            self._stack.callback(self.node.destroy)
            self.sim = self._stack.enter_context(
                running_simulator(
                    self.meters, "-P", CANARY_PASSWORD, "--latency", str(self.latency_ms)
                )
            )
        except BaseException:
            self._stack.close()
            self.node.destroy()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def sim_ports(self) -> list[int]:
        return list(range(self.sim.port, self.sim.port + self.meters))

    def daemon_config(self, in_q: str, out_q: str, port: int, **over: Any) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "HostName": "127.0.0.1",
            "Port": port,
            "VirtualHost": "/",
            "UserName": self.node.user,
            "Password": self.node.password,
            "InQueue": in_q,
            "OutQueue": out_q,
            "Workers": 2,
            "SessionsPerWorker": 8,
            "RequestTimeout": 20,
            "FrameTimeout": 3,
            "Heartbeat": 5,
            "ReconnectMaxDelay": 2,
            "ShutdownGrace": 25,
        }
        cfg.update(over)
        return cfg

    def run(
        self,
        name: str,
        fault: Any,
        requests: int | None = None,
        via_proxy: bool = False,
        allow_repeats: bool = False,
        config: dict[str, Any] | None = None,
        timeout: float = 90.0,
        spare_meters: int = 0,
    ) -> Result:
        """Start a daemon, publish one READ per meter, inject ``fault(ctx)``, apply the oracle.

        Each request goes to its own meter (through a counting proxy), so a meter with two
        sessions that both got an answer means one request id was read twice.
        """
        slug = "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())
        uid = f"{slug}-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
        in_q, out_q = f"d2af.{uid}.in", f"d2af.{uid}.out"
        dlq = in_q + ".dead"
        n = requests or self.meters - spare_meters  # spare meters are the fault's own
        ports = self.sim_ports()[:n]
        res = Result(Row(name))
        with contextlib.ExitStack() as st:
            meters = TcpProxy(ports, count_dlms=True)
            st.callback(meters.close)
            broker_proxy = None
            port = self.node.port
            if via_proxy:
                broker_proxy = TcpProxy([self.node.port])
                st.callback(broker_proxy.close)
                port = next(iter(broker_proxy.listeners))
            daemon = Daemon(
                self.workdir / uid, self.daemon_config(in_q, out_q, port, **(config or {}))
            )
            st.callback(lambda: self.client.delete_queues([in_q, out_q, dlq]))
            st.callback(daemon.stop)
            daemon.start()
            daemon.wait_consuming(self.client, in_q)
            collector = Collector(self.client, [out_q, dlq]).start()
            st.callback(collector.stop)
            ids = [f"{slug}-{i}" for i in range(n)]
            port_of_id = dict(zip(ids, ports))
            bodies = [(i, read_request(i, meters.port_of[p])) for i, p in port_of_id.items()]
            self.client.publish(in_q, bodies)
            t_pub = time.monotonic()
            ctx = Ctx(
                self, daemon, meters, broker_proxy, collector, in_q, out_q, dlq, t_pub, bodies
            )
            try:
                res.evidence.update(fault(ctx) or {})
            except AssertionError as e:
                res.problems.append(f"fault not confirmed: {e}")
            ids += ctx.extra_ids  # requests the fault published itself are judged too
            if not collector.wait_ids(set(ids), timeout):
                res.problems.append(f"not every request accounted for after {timeout:.0f} s")
            time.sleep(1.0)  # late duplicates
            if not daemon.alive():
                res.problems.append(f"daemon not running at the end (rc {daemon.returncode})")
            rc = daemon.stop()
            res.evidence["final_exit_code"] = rc
            items = collector.snapshot()
            res.row = judge(name, ids, items, {out_q}, dlq, meters, port_of_id)
            repeated_after_store = ctx.no_repeat_ids & {
                i
                for i in ids
                if i in port_of_id and meters.stats[port_of_id[i]].sessions_with_reads > 1
            }
            if repeated_after_store:
                res.problems.append(
                    f"meter read again for ids whose reply was already stored: "
                    f"{sorted(repeated_after_store)[:10]}"
                )
            if not allow_repeats and res.row.sessions_repeated > 0:
                res.problems.append(f"{res.row.sessions_repeated} meter sessions repeated")
            res.leaks = leak_scan(daemon, items, dlq)
            res.row.notes = ctx.notes
        self.rows.append(res.row)
        ROWS.append(res.row)
        return res


def leak_scan(
    daemon: Daemon, items: list[Received], dlq: str, extra: Iterable[str] = ()
) -> list[str]:
    """Canaries in the daemon's files and output, in replies, in dead-letter metadata."""
    blobs = files_under(daemon.workdir)
    # positive control: the config file holds the broker password, the scanner must see it
    if daemon.config_path.exists() and not scan_canaries(
        [("config", daemon.config_path.read_bytes())]
    ):
        raise AssertionError("canary scanner does not find the broker password in the config")
    blobs = [(n, b) for n, b in blobs if not n.endswith((".sqlite3", ".sqlite3-wal", ".json"))]
    for r in items:
        if r.queue == dlq:
            # the dead-lettered request is the client's own message; its metadata is ours
            blobs.append((f"dead-letter headers of {reply_in_id(r)}", repr(r.headers).encode()))
        else:
            blobs.append((f"reply {reply_in_id(r)}", r.body))
    return scan_canaries(blobs, extra)


@dataclass
class Ctx:
    """What a fault function may touch."""

    lab: Lab
    daemon: Daemon
    meters: TcpProxy
    broker_proxy: TcpProxy | None
    collector: Collector
    in_q: str
    out_q: str
    dlq: str
    t_published: float
    bodies: list[tuple[str, bytes]] = field(default_factory=list)
    no_repeat_ids: set[str] = field(default_factory=set)
    extra_ids: list[str] = field(default_factory=list)  # published by the fault, judged too
    notes: str = ""

    def replies(self) -> int:
        return len(self.collector.snapshot())

    def wait_some_progress(self, min_replies: int = 3, timeout: float = 30) -> None:
        """Wait until a few replies are out and meter sessions are open (under load)."""
        ok = wait_for(
            lambda: self.replies() >= min_replies and self.meters.open_connections() > 0, timeout
        )
        if not ok:
            raise AssertionError(
                f"no load to fault: {self.replies()} replies, "
                f"{self.meters.open_connections()} meter connections"
            )

    def log_count(self, event: str) -> int:
        """Occurrences of ``event`` in the daemon's log file and output."""
        return self.daemon.log_text().count(event) + self.daemon.output().count(event)

    def wait_log_increase(self, event: str, before: int, timeout: float) -> bool:
        return wait_for(lambda: self.log_count(event) > before, timeout, 0.2)


# --- scenarios with their own shape ----------------------------------------------------------
@dataclass
class Env:
    daemon: Daemon
    collector: Collector
    in_q: str
    out_q: str
    dlq: str


@contextlib.contextmanager
def daemon_env(
    lab: Lab, name: str, config: dict[str, Any] | None = None, params: Any = None
) -> Any:
    """A daemon on unique queues of the lab's node, with a collector; cleaned up after."""
    uid = f"{name}-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
    in_q, out_q = f"d2af.{uid}.in", f"d2af.{uid}.out"
    dlq = in_q + ".dead"
    cfg = lab.daemon_config(in_q, out_q, lab.node.port, **(config or {}))
    daemon = Daemon(lab.workdir / uid, cfg)
    client = AmqpClient(params or lab.node.params)
    collector = Collector(lab.client, [out_q, dlq])
    try:
        daemon.start()
        daemon.wait_consuming(lab.client, in_q)
        collector.start()
        yield Env(daemon, collector, in_q, out_q, dlq)
    finally:
        daemon.stop()
        collector.stop()
        client.delete_queues([in_q, out_q, dlq])


def reply_dict(r: Received) -> dict[str, Any]:
    try:
        d = json.loads(r.body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return {}
    return d if isinstance(d, dict) else {}
