# SPDX-License-Identifier: GPL-2.0-or-later
"""The fault suite's own tools, tested against real sockets and the real simulator."""

from __future__ import annotations

import socket
import threading
import time

from testing import faults as faultlib
from testing.faults import Received, Row, TcpProxy, judge, scan_canaries
from tests.helpers_sim import GuruxMeter, gurux_client, running_simulator


def _echo_server() -> tuple[socket.socket, threading.Thread]:
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(5)

    def run() -> None:
        while True:
            try:
                c, _ = ls.accept()
            except OSError:
                return
            threading.Thread(target=_echo, args=(c,), daemon=True).start()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return ls, t


def _echo(c: socket.socket) -> None:
    with c:
        while True:
            try:
                d = c.recv(4096)
            except OSError:
                return
            if not d:
                return
            c.sendall(d)


def test_proxy_forwards_then_blackholes_without_closing() -> None:
    ls, _ = _echo_server()
    with TcpProxy([ls.getsockname()[1]]) as proxy:
        port = next(iter(proxy.listeners))
        c = socket.create_connection(("127.0.0.1", port), timeout=5)
        c.sendall(b"hello")
        assert c.recv(100) == b"hello"
        # When the network is cut silently
        proxy.blackhole()
        c.sendall(b"lost")
        c.settimeout(1.0)
        # Then nothing arrives and the connection is not closed either
        try:
            data = c.recv(100)
        except socket.timeout:
            data = None
        assert data is None
        # and new connections go nowhere
        c2 = socket.create_connection(("127.0.0.1", port), timeout=5)
        c2.settimeout(2)
        assert c2.recv(10) == b""
        # After the network is back, new connections work again
        proxy.restore()
        c3 = socket.create_connection(("127.0.0.1", port), timeout=5)
        c3.sendall(b"back")
        c3.settimeout(5)
        assert c3.recv(100) == b"back"
        for s in (c, c2, c3):
            s.close()
    ls.close()


def test_proxy_counts_associations_and_reads_per_meter() -> None:
    from gurux_dlms.objects import GXDLMSData

    with running_simulator(2) as sim:
        with TcpProxy([sim.port, sim.port + 1], count_dlms=True) as proxy:
            for _ in range(2):
                cl = gurux_client(16)
                with GuruxMeter(cl, "127.0.0.1", proxy.port_of[sim.port + 1]) as m:
                    m.connect()
                    m.read(GXDLMSData("0.0.96.1.0.255"), 2)
                    m.release()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and proxy.stats[sim.port + 1].connections < 2:
                time.sleep(0.05)
            st = proxy.stats[sim.port + 1]
            assert (st.connections, st.aarqs, st.sessions_with_reads) == (2, 2, 2)
            assert st.get_responses >= 2
            assert proxy.stats[sim.port].aarqs == 0


def _rx(q: str, body: bytes, headers: dict | None = None) -> Received:
    return Received(q, body, None, headers or {})


def test_oracle_counts_lost_duplicates_and_dead_letters() -> None:
    items = [
        _rx("out", b'{"InMsgID": "a", "MsgID": "r1"}'),
        _rx("out", b'{"InMsgID": "a", "MsgID": "r1"}'),  # identical duplicate: allowed
        _rx("out", b'{"InMsgID": "b", "MsgID": "r2"}'),
        _rx("out", b'{"InMsgID": "b", "MsgID": "r3"}'),  # divergent duplicate
        _rx("dlq", b'{"MsgID": "c"}', {"x-dlms2amqp-reason": "bad"}),
        _rx("dlq", b'{"MsgID": "d"}'),  # no reason
    ]
    row = judge("t", ["a", "b", "c", "d", "e"], items, {"out"}, "dlq")
    assert (row.replies, row.dead_lettered, row.lost) == (2, 2, 1)
    assert (row.duplicated_identical, row.duplicated_divergent) == (1, 1)
    assert row.lost_ids == ["e"] and row.divergent_ids == ["b"] and row.unreasoned_dead == ["d"]
    assert not row.ok()
    assert Row("clean", sent=1, replies=1).ok()
    table = faultlib.format_table([row])
    assert "dup divergent" in table and table.count("\n") == 2


def test_oracle_takes_a_reply_in_parts_as_one_reply_when_complete() -> None:
    def part(i: str, k: int, n: int, rid: str) -> Received:
        return _rx(
            "out", f'{{"InMsgID": "{i}", "MsgID": "{rid}", "Part": {k}, "Parts": {n}}}'.encode()
        )

    items = [
        part("a", 1, 2, "p1"),
        part("a", 2, 2, "p2"),
        part("a", 2, 2, "p2"),  # a part again, the same bytes: an identical duplicate
        part("b", 1, 3, "q1"),
        part("b", 3, 3, "q3"),  # part 2 of 3 never came: not delivered
        part("c", 1, 2, "s1"),
        part("c", 2, 2, "s2"),
        part("c", 2, 2, "s2-other"),  # part 2 twice with other bytes: divergent
    ]
    row = judge("parts", ["a", "b", "c"], items, {"out"}, "dlq")
    assert (row.replies, row.lost, row.lost_ids) == (2, 1, ["b"])
    assert (row.duplicated_identical, row.duplicated_divergent) == (1, 1)
    assert row.divergent_ids == ["c"]


def test_canary_scanner_finds_every_form() -> None:
    pw = faultlib.CANARY_PASSWORD
    blobs = [
        ("clean", b"nothing to see"),
        ("literal", f"password={pw}".encode()),
        ("hexdump", b"60 1d a1 09 " + pw.encode().hex(" ").encode()),
        ("key lower", faultlib.CANARY_BKEY.lower().encode()),
        ("broker", b"amqp://u:" + faultlib.CANARY_BROKER_PASSWORD.encode() + b"@h"),
    ]
    found = scan_canaries(blobs)
    assert [f.split(":")[0] for f in found] == ["literal", "hexdump", "key lower", "broker"]
