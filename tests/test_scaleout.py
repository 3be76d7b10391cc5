# SPDX-License-Identifier: GPL-2.0-or-later
"""Scale-out (Partitions): several real daemons, the private 3-node cluster, real meters.

What the meters saw comes from the counting proxy in front of them (connections open at
once per meter), not from the daemons' own account.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pika
import pytest

from dlms2amqp.config import build_config
from dlms2amqp.daemon import partitions as parts
from testing.amqpcut import AmqpCut
from testing.cluster import Cluster
from testing.oracle import dead_letter_reason, reply_in_id
from testing.proxy import TcpProxy
from testing.scaleout import GMAC, LOW, ScaleLab, replies_by_id
from testing.simulator import running_simulator

from .conftest import ROOT

pytestmark = pytest.mark.integration


@pytest.fixture
def meters() -> Iterator[tuple[Any, TcpProxy]]:
    """20 simulated meters with 50 ms latency per frame, behind a counting proxy."""
    with running_simulator(20, "--latency", "50") as sim:
        proxy = TcpProxy(list(range(sim.port, sim.port + 20)), count_dlms=True)
        try:
            yield sim, proxy
        finally:
            proxy.close()


def _requests(lab: ScaleLab, sim: Any, n: int, prefix: str) -> list[tuple[str, bytes]]:
    out = []
    for k in range(n):
        m = k % 20
        conn = GMAC if m < 10 else LOW
        mid = f"{prefix}-{k}"
        out.append((mid, lab.request(mid, sim.port + m, conn)))
    return out


def _three_daemons_under_load(
    lab: ScaleLab, sim: Any, n: int, prefix: str, replies_first: int
) -> tuple[list[Any], Any, set[str]]:
    """3 daemons subscribed, a collector, ``n`` requests published; returns once
    ``replies_first`` replies are in (at most 60 s): (daemons, collector, request ids)."""
    daemons = [lab.start_daemon() for _ in range(3)]
    lab.wait_subscribed(3)
    col = lab.collector()
    assert col.ready.wait(30)
    reqs = _requests(lab, sim, n, prefix)
    ids = {m for m, _ in reqs}
    lab.publish(reqs)
    deadline = time.monotonic() + 60
    while len(col.snapshot()) < replies_first and time.monotonic() < deadline:
        time.sleep(0.1)
    return daemons, col, ids


def _check_outcome(lab: ScaleLab, col: Any, ids: set[str], proxy: TcpProxy) -> dict:
    """Every id answered (or dead-lettered with a reason), one association per meter at any
    time, duplicates identical; returns the replies by id."""
    items = col.snapshot()
    got = replies_by_id(items, lab.out_queue)
    dead = [r for r in items if r.queue == lab.in_queue + ".dead"]
    assert all(dead_letter_reason(r) for r in dead)
    assert ids <= set(got) | {reply_in_id(r) for r in dead}
    divergent = {
        i: r for i, r in got.items() if len({json.dumps(x, sort_keys=True) for x in r}) > 1
    }
    worst = {
        f"meter {p} (proxy port {proxy.port_of[p]})": s.max_open
        for p, s in proxy.stats.items()
        if s.max_open > 1
    }
    assert not worst, f"meters with two associations at once: {worst}"
    # a reply published means its request was acked in the same commit: nobody reads
    # that request again, so a duplicate can only be the same reply published again
    assert not divergent, divergent
    return got


def test_three_daemons_600_requests_one_association_per_meter(
    cluster: Cluster, tmp_path: Path, meters: tuple[Any, TcpProxy]
) -> None:
    sim, proxy = meters
    lab = ScaleLab(cluster, tmp_path, proxy, partitions=12)
    try:
        daemons, col, ids = _three_daemons_under_load(lab, sim, 600, "three", 0)
        assert col.wait_ids(ids, timeout=180), col.error
        got = _check_outcome(lab, col, ids, proxy)
        bad = {i: r[0].get("Error") for i, r in got.items() if r[0]["Status"] != "ok"}
        assert not bad, bad
        moved = sum(d.metric("dlms2amqp_requests_moved_total") for d in daemons)
        assert moved >= 600
        read = [len(d.events("request")) for d in daemons]
        assert sum(read) >= 600
        col.stop()
    finally:
        lab.stop_all()


def test_one_meter_spelt_localhost_and_127_0_0_1_gets_one_association(
    cluster: Cluster, tmp_path: Path, meters: tuple[Any, TcpProxy]
) -> None:
    """Requests for one meter as ``-h localhost`` and ``-h 127.0.0.1``, interleaved: the
    daemons route them by the resolved address, so one partition (one daemon) serves the
    meter and the proxy never sees two associations to it.  Routed by the name as given,
    the two spellings of a meter land in two partitions, mostly of two daemons, whose
    pooled sessions overlap."""
    sim, proxy = meters
    lab = ScaleLab(cluster, tmp_path, proxy, partitions=12)
    try:
        daemons = [lab.start_daemon() for _ in range(3)]
        lab.wait_subscribed(3)
        col = lab.collector()
        assert col.ready.wait(30)
        reqs = []
        for k in range(160):  # 8 per meter, the spelling alternating per meter
            m = k % 20
            host = ("localhost", "127.0.0.1")[(k // 20 + m) % 2]
            mid = f"spell-{k}-{host}"
            reqs.append((mid, lab.request(mid, sim.port + m, GMAC if m < 10 else LOW, host=host)))
        ids = {m for m, _ in reqs}
        lab.publish(reqs)
        assert col.wait_ids(ids, timeout=180), col.error
        got = _check_outcome(lab, col, ids, proxy)  # asserts one association per meter
        bad = {i: r[0].get("Error") for i, r in got.items() if r[0]["Status"] != "ok"}
        assert not bad, bad
        assert all(proxy.stats[sim.port + m].max_open == 1 for m in range(20)), proxy.stats
        # both spellings were read, as given (the endpoint is -h as the request spelt it)
        endpoints = {
            e.get("endpoint", "").split(":")[0] for d in daemons for e in d.events("request")
        }
        assert {"localhost", "127.0.0.1"} <= endpoints, endpoints
        assert sum(d.metric("dlms2amqp_requests_moved_total") for d in daemons) >= 160
        col.stop()
    finally:
        lab.stop_all()


def _partition_story(daemons: list[Any]) -> str:
    """Who took, released and left which partition, when (to explain a failed hand-over)."""
    lines = []
    for i, d in enumerate(daemons):
        for ev in d.events():
            if str(ev.get("event", "")).startswith("partition"):
                keys = ("partition", "active", "share", "daemons", "requeued", "redelivered")
                fields = {k: ev[k] for k in keys if k in ev}
                lines.append(f"{ev.get('timestamp')} d{i} {ev['event']} {fields}")
    return "\n".join(sorted(lines))[-6000:]


def _meters_per_partition(lab: ScaleLab, sim: Any) -> dict[str, int]:
    """Declare the lab's exchange and partition queues as its daemons will (the same
    names and arguments, so that their declares agree), route one request per meter
    through the exchange, and count where they went; the partitions are left empty."""
    cfg = build_config(lab.daemon_config(0))
    exchange, queues = parts.exchange_name(cfg), parts.partition_queues(cfg)
    conn = pika.BlockingConnection(lab.params())
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.exchange_declare(exchange, parts.EXCHANGE_TYPE, durable=True)
        for q in queues:
            ch.queue_declare(q, durable=True, arguments=parts.partition_arguments(cfg))
            ch.queue_bind(q, exchange, routing_key=parts.WEIGHT)
        probes = _requests(lab, sim, 20, "probe")
        for _, body in probes:
            ch.basic_publish(exchange, parts.route_of(body, cfg.MaxBodyBytes), body)
        deadline = time.monotonic() + 30
        while True:
            counts = {q: ch.queue_declare(q, passive=True).method.message_count for q in queues}
            if sum(counts.values()) >= len(probes) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        for q in queues:
            ch.queue_purge(q)
        return counts
    finally:
        conn.close()


def _lab_without_empty_partition(
    cluster: Cluster, tmp_path: Path, sim: Any, proxy: TcpProxy, partitions: int
) -> tuple[ScaleLab, TcpProxy, list[TcpProxy]]:
    """A lab in which every partition gets at least one of the 20 meters, its proxy, and
    the extra proxies made for it (to close).

    A meter's partition follows from its key, here the proxy's listen port, which is
    random: in some runs no meter lands in one of 4 partitions.  Then 3 partitions carry
    the load, 4 daemons cannot each be active on one, the newcomer is handed the empty
    one and reads nothing, and the test proves nothing.  Another proxy (other ports)
    spreads the meters anew.
    """
    lab, spare = ScaleLab(cluster, tmp_path, proxy, partitions=partitions), []
    for _ in range(20):
        counts = _meters_per_partition(lab, sim)
        if min(counts.values()) > 0:
            return lab, proxy, spare
        proxy = TcpProxy(list(range(sim.port, sim.port + 20)), count_dlms=True)
        spare.append(proxy)
        lab.proxy = proxy
    for p in spare:
        p.close()
    raise AssertionError(f"20 meters left a partition empty with 20 proxies: {counts}")


def test_fourth_daemon_takes_partitions_under_load(
    cluster: Cluster, tmp_path: Path, meters: tuple[Any, TcpProxy]
) -> None:
    """3 daemons under load, a 4th started: it is handed a partition within a bound (its
    log and its metric say so), reads from it, and no read fails or meets a second
    association."""
    sim, proxy = meters
    # 4 partitions, each with meters: with 4 daemons the share is 1, so the newcomer
    # must be handed one of the 4 busy partitions
    lab, proxy, spare = _lab_without_empty_partition(cluster, tmp_path, sim, proxy, 4)
    try:
        _daemons, col, ids = _three_daemons_under_load(lab, sim, 600, "four", 100)
        fourth = lab.start_daemon()
        t0 = time.monotonic()
        # keep the load on until the newcomer has been handed a partition (typically
        # 10 s here: two hand-overs of about 2 s + 1.5 s + the jobs in flight each)
        deadline, batch, taken_after = t0 + 60, 0, None
        while time.monotonic() < deadline:
            more = _requests(lab, sim, 40, f"four{batch}")
            batch += 1
            ids |= {m for m, _ in more}
            lab.publish(more)
            time.sleep(1.0)
            if fourth.events("partition_taken") and fourth.metric("dlms2amqp_partitions_active"):
                taken_after = time.monotonic() - t0
                break
        assert taken_after is not None, _partition_story(lab.daemons)
        more = _requests(lab, sim, 80, "four-after")  # and some after it took over
        ids |= {m for m, _ in more}
        lab.publish(more)
        assert col.wait_ids(ids, timeout=180), col.error
        got = _check_outcome(lab, col, ids, proxy)
        bad = {i: r[0].get("Error") for i, r in got.items() if r[0]["Status"] != "ok"}
        assert not bad, bad
        # the newcomer read requests from the partition it was given
        assert fourth.events("request"), _partition_story(lab.daemons)
        print(f"4th daemon active after {taken_after:.1f} s")
        col.stop()
    finally:
        lab.stop_all()
        for p in spare:
            p.close()


@pytest.mark.faults
def test_daemon_killed_and_broker_node_stopped_under_load(
    cluster: Cluster, tmp_path: Path, meters: tuple[Any, TcpProxy]
) -> None:
    sim, proxy = meters
    lab = ScaleLab(cluster, tmp_path, proxy, partitions=12)
    try:
        daemons, col, ids = _three_daemons_under_load(lab, sim, 600, "fault", 300)
        # kill -9 the daemon serving the most partitions
        victim = max(daemons, key=lambda d: d.metric("dlms2amqp_partitions_active"))
        assert victim.metric("dlms2amqp_partitions_active") > 0
        pid = victim.pid
        victim.kill9()
        assert not victim.alive()
        # and take away the broker node of another daemon, then bring it back
        other = next(d for d in daemons if d is not victim)
        node = next(n for n in cluster.nodes if n.port == other.cfg["Port"])
        node.stop_app()
        assert not node.amqp_ok()
        time.sleep(3)
        node.start_app()
        cluster.wait_members(timeout=60)
        if not col.wait_ids(ids, timeout=180):
            stats = {q: cluster.queue_stats(q) for q in [lab.in_queue, *lab.partition_queues()]}
            raise AssertionError(f"{len(col.snapshot())} of {len(ids)} answered; {stats}")
        got = _check_outcome(lab, col, ids, proxy)
        bad = {i: r[0].get("Error") for i, r in got.items() if r[0]["Status"] != "ok"}
        assert not bad, bad  # ciphered meters too, after the takeover
        assert pid not in [d.pid for d in daemons if d.alive()]
        col.stop()
    finally:
        lab.stop_all()


@pytest.mark.parametrize("cut", ["before", "after"])
def test_commit_in_doubt_is_settled_by_the_partition_owner(
    cluster: Cluster, tmp_path: Path, meters: tuple[Any, TcpProxy], cut: str
) -> None:
    """The connection closes while the reply's commit is in flight (a relay cuts it at the
    tx.commit, or at its commit-ok): whichever way the broker went, the client gets
    replies that are all the same bytes - one read's reply, never two different ones -
    and at least one."""
    sim, proxy = meters
    lab = ScaleLab(cluster, tmp_path, proxy, partitions=1)  # one partition: no hand-over
    relay = AmqpCut(cluster.nodes[0].port)
    try:
        # d0 owns the partition and reaches the broker through the relay; d1 stands by
        first = lab.start_daemon(Port=relay.port, ClusterHosts=[])
        [partition] = lab.partition_queues()
        deadline = time.monotonic() + 30
        while lab.consumers(partition) < 1 and time.monotonic() < deadline:
            time.sleep(0.2)  # subscribed first: the broker's single active consumer
        assert lab.consumers(partition) == 1
        second = lab.start_daemon()
        lab.wait_subscribed(2)
        col = lab.collector()
        assert col.ready.wait(30)
        relay.arm(cut, lab.out_queue)  # the reply's commit, not the move's
        lab.publish([("doubt-1", lab.request("doubt-1", sim.port, LOW))])
        assert col.wait_ids({"doubt-1"}, timeout=60), col.error
        # the in-doubt message reaches the partition's owner, who settles it
        deadline = time.monotonic() + 60
        settled: list[dict] = []
        while not settled and time.monotonic() < deadline:
            settled = [
                e
                for d in lab.daemons
                for e in d.events()
                if e.get("event") in ("in_doubt_dropped", "in_doubt_published")
            ]
            time.sleep(0.3)
        time.sleep(2)  # a reply published by the settling commit reaches the collector
        assert relay.cuts == [cut]
        assert first.events("commit_in_doubt") and first.events("commit_in_doubt_sent")
        assert settled, _partition_story(lab.daemons)
        replies = replies_by_id(col.snapshot(), lab.out_queue)["doubt-1"]
        assert len({json.dumps(r, sort_keys=True) for r in replies}) == 1, replies
        assert replies[0]["Status"] == "ok"
        readers = [d for d in lab.daemons if d.events("request")]
        if cut == "before":
            # rolled back: the request went to d1 (next in line) and was read again there;
            # d0's copy, in doubt, arrived after it and was dropped
            assert second in readers and len(replies) == 1
            assert [e["event"] for e in settled] == ["in_doubt_dropped"]
        else:
            # committed: nobody reads it again; the copy in doubt is published by the
            # partition's next owner - the same bytes, a duplicate at most
            assert readers == [first]
            assert [e["event"] for e in settled] == ["in_doubt_published"]
        col.stop()
    finally:
        lab.stop_all()
        relay.close()


@pytest.mark.parametrize("cut", ["before", "after"])
def test_move_commit_in_doubt_loses_no_request(
    cluster: Cluster, tmp_path: Path, meters: tuple[Any, TcpProxy], cut: str
) -> None:
    """A request's move from InQueue to its partition publishes in one commit and acks in
    the next.  The relay cuts the connection at the publish's commit (the broker rolls it
    back) or at its commit-ok (committed, the daemon does not know): either way the ack was
    not sent, InQueue redelivers the request, it is moved again, read once and answered;
    a second copy in the partition gets the same bytes."""
    sim, proxy = meters
    lab = ScaleLab(cluster, tmp_path, proxy, partitions=1)
    relay = AmqpCut(cluster.nodes[0].port)
    try:
        only = lab.start_daemon(Port=relay.port, ClusterHosts=[])
        lab.wait_subscribed(1)
        col = lab.collector()
        assert col.ready.wait(30)
        key = f"tcp:127.0.0.1:{lab.meter_port(sim.port)}"  # the move's routing key
        relay.arm(cut, key)
        lab.publish([("move-1", lab.request("move-1", sim.port, LOW))])
        assert col.wait_ids({"move-1"}, timeout=60), col.error
        time.sleep(2)  # a second reply (to a second copy of the move) would come by now
        assert relay.cuts == [cut]
        assert only.events("broker_connection_lost")
        assert not only.events("commit_in_doubt")  # nothing to settle: the ack never went
        replies = replies_by_id(col.snapshot(), lab.out_queue)["move-1"]
        assert len({json.dumps(r, sort_keys=True) for r in replies}) == 1, replies
        assert replies[0]["Status"] == "ok"
        # rolled back: one copy; committed: the moved copy and the redelivered one's move
        assert len(replies) == 1 if cut == "before" else 1 <= len(replies) <= 2, replies
        reads = only.events("request")
        assert len(reads) == 1, reads  # one meter session: a second copy is answered stored
        col.stop()
    finally:
        lab.stop_all()
        relay.close()


def test_send_publishes_straight_to_the_partition_exchange(
    cluster: Cluster, tmp_path: Path, meters: tuple[Any, TcpProxy]
) -> None:
    """dlms2amqp-send with Partitions: each request goes to the exchange, keyed as the
    mover keys it (a host name resolved first), so the daemon moves none; ``--inqueue``
    sends them to InQueue, and the daemon moves them."""
    sim, proxy = meters
    lab = ScaleLab(cluster, tmp_path, proxy, partitions=2)
    try:
        daemon = lab.start_daemon()
        lab.wait_subscribed(1)
        col = lab.collector()
        assert col.ready.wait(30)
        cfg = lab.daemon_config(9)
        cfgfile = tmp_path / "send.json"
        cfgfile.write_text(json.dumps(cfg))
        files = []
        for k, host in enumerate(["127.0.0.1", "localhost", "127.0.0.1"]):
            f = tmp_path / f"r{k}.json"
            f.write_bytes(lab.request(f"send-{k}", sim.port + k, LOW, host=host))
            files.append(str(f))
        send = [sys.executable, "-m", "dlms2amqp.cli.send", "-c", str(cfgfile)]
        cp = subprocess.run(send + files, capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert cp.returncode == 0, cp.stderr
        assert f"3 sent to {lab.in_queue}.partitions" in cp.stderr
        assert col.wait_ids({"send-0", "send-1", "send-2"}, timeout=60), col.error
        assert daemon.metric("dlms2amqp_requests_moved_total") == 0
        # the same meters again, through InQueue: now the daemon moves them
        for k, f in enumerate(files):
            Path(f).write_bytes(lab.request(f"again-{k}", sim.port + k, LOW))
        cp = subprocess.run(
            send + ["--inqueue", *files], capture_output=True, text=True, cwd=ROOT, timeout=60
        )
        assert cp.returncode == 0 and f"3 sent to {lab.in_queue}," in cp.stderr, cp.stderr
        assert col.wait_ids({"again-0", "again-1", "again-2"}, timeout=60), col.error
        assert daemon.metric("dlms2amqp_requests_moved_total") == 3
        got = replies_by_id(col.snapshot(), lab.out_queue)
        assert all(r[0]["Status"] == "ok" for r in got.values()), got
        assert all(s.max_open <= 1 for s in proxy.stats.values())
        col.stop()
    finally:
        lab.stop_all()


def test_check_config_shows_topology(tmp_path: Path) -> None:
    cfgfile = tmp_path / "c.json"
    cfgfile.write_text(json.dumps({"Partitions": 3, "InQueue": "IN", "ClusterHosts": ["b:5673"]}))
    cp = subprocess.run(
        [sys.executable, "-m", "dlms2amqp.cli.daemon", "-c", str(cfgfile), "--check-config"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert cp.returncode == 0, cp.stderr
    assert "IN.partitions" in cp.stdout and "x-consistent-hash" in cp.stdout
    assert '"IN.p0"' in cp.stdout and '"IN.p2"' in cp.stdout
    assert "x-single-active-consumer" in cp.stdout
    assert "b:5673" in cp.stdout


def test_partitions_without_plugin_is_a_clear_error(run_daemon: Any) -> None:
    """The shared broker has no consistent-hash plugin: the daemon says what to enable."""
    d = run_daemon(wait=False, Partitions=2, QueueType="quorum")
    deadline = time.monotonic() + 60
    while d.alive() and time.monotonic() < deadline:
        time.sleep(0.3)
    assert not d.alive()
    out = d.output()
    assert "rabbitmq_consistent_hash_exchange" in out, out[-3000:]
    assert "Traceback" not in out


def _serial_request(mid: str, port: str) -> tuple[str, bytes]:
    body = {
        "MsgID": mid,
        "Cmd": "READ",
        "ObisCode": "1.0.32.7.0.255",
        "ConnectionString": f"-S {port}:9600:8None1 -c 32 -a Low -P 00000000 -i HDLC",
    }
    return mid, json.dumps(body).encode()


@pytest.mark.skipif(shutil.which("socat") is None, reason="socat not installed")
def test_serial_port_requests_reach_its_host_or_end_notok(cluster: Cluster, tmp_path: Path) -> None:
    from .test_session_serial import pty_pair, serial_simulator

    tmp = tempfile.mkdtemp(prefix="d2a-ser-")
    lab = ScaleLab(cluster, tmp_path, partitions=2, SerialPortWait=3.0)
    try:
        with pty_pair(tmp, "m") as (meter_end, reader_end), serial_simulator(meter_end):
            owner = lab.start_daemon(SerialPorts=[reader_end])
            other = lab.start_daemon()
            lab.wait_subscribed(2)
            col = lab.collector()
            assert col.ready.wait(30)
            reqs = [_serial_request(f"ser-{k}", reader_end) for k in range(4)]
            reqs.append(_serial_request("nobody", "/dev/ttyNOBODY9"))
            t0 = time.monotonic()
            lab.publish(reqs)
            assert col.wait_ids({m for m, _ in reqs}, timeout=60), col.error
            got = replies_by_id(col.snapshot(), lab.out_queue)
            for k in range(4):
                assert got[f"ser-{k}"][0]["Status"] == "ok", got[f"ser-{k}"][0]["Error"]
            # read by the daemon of the host with the port, never by the other one
            read_by_owner = {e.get("msg_id") for e in owner.events("request")}
            read_by_other = {e.get("msg_id") for e in other.events("request")}
            assert {f"ser-{k}" for k in range(4)} <= read_by_owner
            assert not read_by_other & {f"ser-{k}" for k in range(4)}
            nobody = got["nobody"][0]
            assert nobody["Status"] == "notok"
            assert "No gateway host owning serial port /dev/ttyNOBODY9" in nobody["Error"]
            assert "SerialPorts" in nobody["Error"]
            # the owner goes away: its port's requests end notok after the bounded wait
            owner.stop(grace=20)
            t0 = time.monotonic()
            lab.publish([_serial_request("orphan", reader_end)])
            assert col.wait_ids({"orphan"}, timeout=60), col.error
            waited = time.monotonic() - t0
            orphan = replies_by_id(col.snapshot(), lab.out_queue)["orphan"][0]
            assert orphan["Status"] == "notok"
            assert f"serial port {reader_end}" in orphan["Error"]
            assert 2.5 <= waited < 30
            col.stop()
    finally:
        lab.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def test_partitions_0_warns_about_another_consumer_on_inqueue(
    run_daemon: Any, tmp_path: Path
) -> None:
    """Two daemons on one InQueue without Partitions: the second one says so."""
    first = run_daemon()
    second = run_daemon(
        InQueue=first.cfg["InQueue"],
        OutQueue=first.cfg["OutQueue"],
        DebugFile=str(tmp_path / "second.log"),
    )
    deadline = time.monotonic() + 30
    while not second.events("other_consumers_on_inqueue") and time.monotonic() < deadline:
        time.sleep(0.3)
    [warning] = second.events("other_consumers_on_inqueue")[:1]
    assert warning["others"] == 1 and "Partitions" in warning["hint"]
    assert second.metric("dlms2amqp_inqueue_other_consumers") == 1
