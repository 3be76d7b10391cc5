# SPDX-License-Identifier: GPL-2.0-or-later
"""dlms2amqpd end to end: real broker, real simulator, real session layer.

Values are checked against ``dlms2amqp.simulator.model``.  Meter-side facts (how many
connections a meter saw, whether two overlapped) come from a counting TCP proxy in front
of the simulator, not from the daemon's own account.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from dlms2amqp.simulator import model

from .conftest import ROOT, Broker, Daemon
from .helpers_sim import running_simulator

pytestmark = pytest.mark.integration

ENERGY = "1.0.1.8.0.255"
PROFILE = "1.0.99.1.0.255"


class CountingProxy:
    """TCP proxy in front of one meter: counts connections and their overlap."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.port = self.lsock.getsockname()[1]
        self.lock = threading.Lock()
        self.current = 0
        self.max_current = 0
        self.total = 0
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            with self.lock:
                self.total += 1
                self.current += 1
                self.max_current = max(self.max_current, self.current)
            threading.Thread(target=self._pump, args=(c,), daemon=True).start()

    def _pump(self, c: socket.socket) -> None:
        try:
            u = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
        except OSError:
            c.close()
            with self.lock:
                self.current -= 1
            return
        try:
            socks = [c, u]
            while True:
                r, _, _ = select.select(socks, [], [], 60)
                if not r:
                    break
                for s in r:
                    data = s.recv(65536)
                    if not data:
                        return
                    (u if s is c else c).sendall(data)
        except OSError:
            pass
        finally:
            c.close()
            u.close()
            with self.lock:
                self.current -= 1

    def close(self) -> None:
        self.closed = True
        self.lsock.close()


def request(msg_id: str, port: int, obis: str = ENERGY, **extra: Any) -> dict:
    r = {
        "MsgID": msg_id,
        "Cmd": "READ",
        "ObisCode": obis,
        "ConnectionString": f"-h 127.0.0.1 -p {port} -c 32 -a Low -i WRAPPER -P 00000000",
    }
    r.update(extra)
    return r


def publish_all(broker: Broker, queue: str, bodies: list[dict]) -> None:
    with broker.connection() as c:
        ch = c.channel()
        ch.confirm_delivery()
        for b in bodies:
            ch.basic_publish("", queue, json.dumps(b).encode(), mandatory=True)


def values(reply: dict) -> set[str]:
    return {str(r.get("Value")) for r in reply["DataRecords"]}


def energy_ok(reply: dict, k: int, t0: float, t1: float) -> bool:
    """The import register of meter k at some moment between t0 and t1."""
    candidates = {str(model.import_wh(k, int(t))) for t in (t0, t1)}
    return reply["Status"] == "ok" and bool(values(reply) & candidates)


def test_send_and_dump_end_to_end(run_daemon: Any, broker: Broker, tmp_path: Path) -> None:
    # Given the seed's workflow: request files, dlms2amqp-send, the daemon, dlms2amqp-dump
    with running_simulator(3) as sim:
        d: Daemon = run_daemon()
        end = (int(time.time()) // 86400) * 86400
        start = end - 86400
        files = []
        for k in range(3):
            body = request(
                str(k),
                sim.port + k,
                PROFILE,
                dtFrom=time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(start)),
                dtTo=time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(end)),
            )
            f = tmp_path / f"req{k}.json"
            f.write_text(json.dumps(body, indent=2))
            files.append(str(f))
        t0 = time.time()
        r = subprocess.run(
            [sys.executable, "-m", "dlms2amqp.cli.send", "-c", str(d.config_path), *files],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert r.returncode == 0, r.stderr
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "dlms2amqp.cli.dump",
                "-c",
                str(d.config_path),
                "--max",
                "3",
                "--timeout",
                "60",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
        assert r.returncode == 0, r.stderr
        replies = {x["InMsgID"]: x for x in map(json.loads, r.stdout.splitlines())}
        # Then each reply has the meter's quarter-hours of that day
        assert sorted(replies) == ["0", "1", "2"]
        for k in range(3):
            rep = replies[str(k)]
            assert rep["Status"] == "ok", rep["Error"]
            rows = model.load_profile_rows(k, start, end)
            assert len(rows) == 97
            want = {}
            for t, st, imp, exp in rows:
                when = datetime.fromtimestamp(t, timezone.utc).isoformat()
                want[(when, "0.0.96.10.1.255")] = str(st)
                want[(when, ENERGY)] = str(imp)
                want[(when, "1.0.2.8.0.255")] = str(exp)
            got = {(r["DateTime"], r["Code"]): r["Value"] for r in rep["DataRecords"]}
            assert got == want
        ev = d.events("request")
        assert {e["msg_id"] for e in ev} == {"0", "1", "2"}
        assert all(e["status"] == "ok" and e["rows"] > 0 and "endpoint" in e for e in ev)
        assert all(time.time() - t0 < 120 for _ in ev)


def test_500_meters_all_answered_correctly(run_daemon: Any, broker: Broker) -> None:
    n = 500
    with running_simulator(n) as sim:
        d: Daemon = run_daemon(Workers=2, SessionsPerWorker=16, IdleSessionTimeout=0)
        t0 = time.time()
        publish_all(broker, d.cfg["InQueue"], [request(str(k), sim.port + k) for k in range(n)])
        replies = broker.replies(d.cfg["OutQueue"], n, timeout=240)
        t1 = time.time()
        assert len(replies) == n
        by_id = {r["InMsgID"]: r for r in replies}
        assert len(by_id) == n
        bad = [k for k in range(n) if not energy_ok(by_id[str(k)], k, t0, t1)]
        assert not bad, [by_id[str(k)] for k in bad[:3]]
        assert d.metric("dlms2amqp_requests_total", 'cmd="READ",status="ok"') == n
        assert d.metric("dlms2amqp_requests_in_flight") == 0


def test_same_meter_serialised_pooled_and_survives_meter_restart(
    run_daemon: Any, broker: Broker
) -> None:
    with running_simulator(1, "--latency", "20") as sim:
        proxy = CountingProxy(sim.port)
        try:
            d: Daemon = run_daemon(IdleSessionTimeout=60)
            # Given 8 requests for the same meter at once
            t0 = time.time()
            publish_all(broker, d.cfg["InQueue"], [request(f"s{i}", proxy.port) for i in range(8)])
            replies = broker.replies(d.cfg["OutQueue"], 8, timeout=120)
            t1 = time.time()
            # Then they never overlapped, all are right, and the association was reused
            assert len(replies) == 8
            assert all(energy_ok(r, 0, t0, t1) for r in replies), replies
            assert proxy.max_current == 1
            assert proxy.total < 8
            assert d.metric("dlms2amqp_pool_hits_total") >= 1
            port = sim.port
        finally:
            pass
    # When the meter restarts (pooled connection now dead)
    with running_simulator(1, port=port):
        t0 = time.time()
        publish_all(broker, d.cfg["InQueue"], [request("after-restart", proxy.port)])
        rep = broker.replies(d.cfg["OutQueue"], 1, timeout=60)
        # Then the request is answered on a fresh association
        assert rep and energy_ok(rep[0], 0, t0, time.time()), rep
        assert proxy.max_current == 1
    proxy.close()


def test_sigterm_mid_flight_loses_nothing(run_daemon: Any, broker: Broker, tmp_path: Path) -> None:
    n = 12
    with running_simulator(n, "--latency", "400") as sim:
        d: Daemon = run_daemon(ShutdownGrace=2.0, Workers=1, SessionsPerWorker=4)
        inq, outq = d.cfg["InQueue"], d.cfg["OutQueue"]
        publish_all(broker, inq, [request(f"t{k}", sim.port + k) for k in range(n)])
        deadline = time.monotonic() + 30
        while d.metric("dlms2amqp_requests_in_flight") < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        # When SIGTERM arrives with reads in flight
        d.signal(signal.SIGTERM)
        assert d.proc is not None
        assert d.proc.wait(60) == 0
        # Then every request is either answered or back in the queue
        done = broker.count(outq) or 0
        left = broker.count(inq) or 0
        assert done + left == n, (done, left)
        assert left > 0  # the fault really cut work short
        # And a restarted daemon answers the rest, each id once
        d2 = Daemon(d.config_path, d.cfg, broker).start()
        try:
            replies = broker.replies(outq, n, timeout=120)
            ids = [r["InMsgID"] for r in replies]
            assert sorted(ids) == sorted(f"t{k}" for k in range(n))
            assert all(r["Status"] == "ok" for r in replies)
        finally:
            assert d2.stop() == 0


def test_worker_killed_mid_session_request_answered(run_daemon: Any, broker: Broker) -> None:
    n = 4
    with running_simulator(n, "--latency", "300") as sim:
        d: Daemon = run_daemon(Workers=2)
        before = set(d.children())
        assert len(before) == 2
        t0 = time.time()
        publish_all(broker, d.cfg["InQueue"], [request(f"w{k}", sim.port + k) for k in range(n)])
        deadline = time.monotonic() + 30
        while d.metric("dlms2amqp_requests_in_flight") < n and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # inside the meter sessions (300 ms per frame)
        # When every worker is killed with SIGKILL mid-session
        for pid in before:
            subprocess.run(["kill", "-9", str(pid)], check=True)
        replies = broker.replies(d.cfg["OutQueue"], n, timeout=120)
        # Then the workers were replaced and every request answered correctly
        after = set(d.children())
        assert len(after) == 2 and not (after & before)
        assert sorted(r["InMsgID"] for r in replies) == [f"w{k}" for k in range(n)]
        by_id = {r["InMsgID"]: r for r in replies}
        assert all(energy_ok(by_id[f"w{k}"], k, t0, time.time()) for k in range(n)), replies
        assert d.metric("dlms2amqp_worker_restarts_total") >= 2
        assert any(e.get("attempts") == 2 for e in d.events("request"))


def test_frozen_worker_is_replaced_and_its_request_answered(
    run_daemon: Any, broker: Broker
) -> None:
    with running_simulator(1, "--latency", "200") as sim:
        d: Daemon = run_daemon(Workers=1, WorkerTimeout=3.0)
        (pid,) = d.children()
        t0 = time.time()
        publish_all(broker, d.cfg["InQueue"], [request("frozen", sim.port)])
        deadline = time.monotonic() + 30
        while d.metric("dlms2amqp_requests_in_flight") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        # When the worker stops sending heartbeats mid-session (SIGSTOP: hung, not dead)
        os.kill(pid, signal.SIGSTOP)
        try:
            replies = broker.replies(d.cfg["OutQueue"], 1, timeout=60)
        finally:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        # Then the master killed and replaced it, and the request was answered
        assert len(replies) == 1 and energy_ok(replies[0], 0, t0, time.time()), replies
        after = d.children()
        assert len(after) == 1 and pid not in after
        assert d.metric("dlms2amqp_worker_restarts_total", 'reason="silent"') == 1


def test_second_sigterm_stops_at_once_and_requeues(run_daemon: Any, broker: Broker) -> None:
    n = 6
    with running_simulator(n, "--latency", "1000") as sim:
        d: Daemon = run_daemon(ShutdownGrace=120.0, Workers=1, SessionsPerWorker=2, Prefetch=n)
        inq, outq = d.cfg["InQueue"], d.cfg["OutQueue"]
        publish_all(broker, inq, [request(f"q{k}", sim.port + k) for k in range(n)])
        deadline = time.monotonic() + 30
        while d.metric("dlms2amqp_requests_in_flight") < n and time.monotonic() < deadline:
            time.sleep(0.1)
        # When an operator presses ^C twice
        d.signal(signal.SIGINT)
        time.sleep(0.5)
        t0 = time.monotonic()
        d.signal(signal.SIGINT)
        assert d.proc is not None
        # Then the daemon does not wait for the 120 s grace period, and nothing is lost
        assert d.proc.wait(30) == 0
        assert time.monotonic() - t0 < 20
        done, left = broker.count(outq) or 0, broker.count(inq) or 0
        assert done + left == n and left > 0, (done, left)
