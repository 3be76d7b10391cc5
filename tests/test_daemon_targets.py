# SPDX-License-Identifier: GPL-2.0-or-later
"""dlms2amqpd and hostile targets (issue 11, findings 4, 5, 6): real broker, real simulator.

- one meter spelt seven ways is still read one association at a time, through one pooled
  association (a counting proxy in front of the simulator sees connections and overlap,
  not the daemon's own account; without pooling its count of overlap would race with
  the closing of one connection and the opening of the next);
- AllowedHosts and AllowedSerialPorts refuse with a reply naming the setting, and a
  refused host is never contacted (a listener counts connections);
- a path that is no serial device is refused without being opened (a FIFO's reader would
  wake up);
- the causes that used to be "internal error" get replies of their own.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import Broker, Daemon
from .helpers_sim import running_simulator
from .test_daemon_sim import CountingProxy, energy_ok, publish_all, request

pytestmark = pytest.mark.integration

SPELLINGS = [
    "127.0.0.1",
    "127.1",
    "localhost",
    "LOCALHOST",
    "0x7f.0.0.1",
    "::ffff:127.0.0.1",
    "2130706433",
]


def test_one_meter_spelt_seven_ways_gets_one_association_at_a_time(
    run_daemon: Any, broker: Broker
) -> None:
    with running_simulator(1, "--latency", "30") as sim:
        proxy = CountingProxy(sim.port)
        try:
            d: Daemon = run_daemon(IdleSessionTimeout=60, Workers=2, SessionsPerWorker=8)
            bodies = []
            for i in range(14):
                r = request(f"k{i}", proxy.port)
                host = SPELLINGS[i % len(SPELLINGS)]
                r["ConnectionString"] = r["ConnectionString"].replace("127.0.0.1", host)
                bodies.append(r)
            t0 = time.time()
            publish_all(broker, d.cfg["InQueue"], bodies)
            replies = broker.replies(d.cfg["OutQueue"], len(bodies), timeout=120)
            t1 = time.time()
            assert len(replies) == len(bodies)
            assert all(energy_ok(r, 0, t0, t1) for r in replies), replies
            # Then the meter never saw two associations at once, and the pooled association
            # of one spelling served the others (one key, one pool entry)
            assert proxy.max_current == 1
            assert proxy.total <= 2
            assert d.metric("dlms2amqp_pool_hits_total") >= len(bodies) - 2
        finally:
            proxy.close()


class CountingListener:
    """A local TCP port that counts who connects (the service a request may aim at)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket()
        self.sock.bind((host, 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            c.close()

    def close(self) -> None:
        self.sock.close()


def test_allow_lists_and_bad_targets_get_their_own_replies(
    run_daemon: Any, broker: Broker, tmp_path: Path
) -> None:
    listener = CountingListener()
    fifo = tmp_path / "fifo-meter"
    os.mkfifo(fifo)
    woke = threading.Event()

    def fifo_reader() -> None:
        fd = os.open(fifo, os.O_RDONLY)  # returns only when somebody opens it to write
        woke.set()
        os.close(fd)

    threading.Thread(target=fifo_reader, daemon=True).start()
    master, slave = os.openpty()
    try:
        # the meter on 127.0.0.2; the gateway's own host (127.0.0.1) closed by AllowedHosts
        with running_simulator(1, host="127.0.0.2") as sim:
            d: Daemon = run_daemon(
                AllowedHosts=["!127.0.0.1/32", "127.0.0.0/8"],
                AllowedSerialPorts=["/dev/pts/*", "/etc/*", f"{tmp_path}/*"],
            )
            conn = "-c 32 -a Low -P 00000000 -i WRAPPER"
            cases = {
                "allowed": (f"-h 127.0.0.2 -p {sim.port} {conn}", None),
                "literal-refused": (
                    f"-h 127.1 -p {listener.port} {conn}",
                    f"host 127.0.0.1 port {listener.port} is refused by the AllowedHosts setting",
                ),
                # a name is checked by the address it resolves to
                "name-refused": (
                    f"-h LocalHost -p {listener.port} {conn}",
                    f"host localhost (127.0.0.1) port {listener.port} is refused by the "
                    "AllowedHosts setting",
                ),
                "no-such-name": (
                    f"-h no-such-host.invalid -p {sim.port}",
                    "cannot resolve host name no-such-host.invalid",
                ),
                "serial-refused": (
                    "-S /dev/ttyS0:9600",
                    "serial port /dev/ttyS0 is refused by the AllowedSerialPorts setting",
                ),
                "passwd": (
                    "-S /etc/passwd",
                    "serial port /etc/passwd is not a serial device: it is a regular file",
                ),
                "fifo": (f"-S {fifo}", "is not a serial device: it is a named pipe"),
                "null": ("-S /etc/../dev/null", "AllowedSerialPorts"),
                "pty-no-meter": (f"-S {os.ttyname(slave)} -t Off", "timeout"),
                "nul-host": (
                    f"-h 127.0.0.2\0evil -p {sim.port}",
                    "option -h: control character U+0000 is not allowed",
                ),
                "nul-serial": ("-S /dev/ttyS0\0", "option -S: control character U+0000"),
                "long-host": (f"-h {'a' * 1900} -p {sim.port}", "is not a host name"),
            }
            bodies = [
                {"MsgID": k, "Cmd": "READ", "ObisCode": "1.0.1.8.0.255", "ConnectionString": cs}
                for k, (cs, _) in cases.items()
            ]
            bodies.append(
                {
                    "MsgID": "to-year-1",
                    "Cmd": "READ",
                    "ObisCode": "1.0.99.1.0.255",
                    "ConnectionString": f"-h 127.0.0.2 -p {sim.port} {conn}",
                    "dtTo": "0001-01-01",
                }
            )
            publish_all(broker, d.cfg["InQueue"], bodies)
            replies = {
                r["InMsgID"]: r for r in broker.replies(d.cfg["OutQueue"], len(bodies), timeout=120)
            }
        assert set(replies) == {b["MsgID"] for b in bodies}
        assert replies["allowed"]["Status"] == "ok", replies["allowed"]
        for k, (_cs, fragment) in cases.items():
            if fragment is not None:
                rep = replies[k]
                assert rep["Status"] == "notok" and fragment in rep["Error"], (k, rep)
        assert "dtTo '0001-01-01' is out of range" in replies["to-year-1"]["Error"]
        assert not any("internal" in r["Error"].lower() for r in replies.values()), replies
        # the refused host was never contacted, the FIFO never opened
        time.sleep(0.3)
        assert listener.accepted == 0
        assert not woke.is_set()
        assert not d.events("internal_error") and not d.events("reader_crashed")
        assert "00000000" not in json.dumps(replies)
    finally:
        listener.close()
        os.close(master)
        os.close(slave)
        if not woke.is_set():
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
