# SPDX-License-Identifier: GPL-2.0-or-later
"""Scenarios with their own shape: TLS, a ciphered session across a kill, a queue
declared otherwise, a poison request that crashes its worker, the delivery limit.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from typing import Any

from testing.collector import AmqpClient, Collector
from testing.faults.lab import (
    Daemon,
    Lab,
    Result,
    daemon_env,
    leak_scan,
    read_request,
    reply_dict,
    wait_for,
    worker_pids,
)
from testing.oracle import (
    CANARY_BROKER_PASSWORD,
    CANARY_PASSWORD,
    ROWS,
    Row,
    dead_letter_reason,
    judge,
    reply_in_id,
    scan_canaries,
)
from testing.proxy import TcpProxy


def scenario_tls(lab: Lab, requests: int = 5) -> Result:
    """amqps with certificate verification against a test CA; a wrong CA is refused.

    Uses its own TLS node (the lab's node has no TLS listener unless started with tls=True).
    """
    from testing.brokernode import BrokerNode, make_test_pki

    res = Result(Row("broker TLS (amqps)", sent=requests))
    node = lab.node
    own = None
    if not node.tls:
        own = BrokerNode(user="d2afault", password=CANARY_BROKER_PASSWORD, tls=True)
        own.start()
        node = own
    try:
        assert node.tls_files is not None
        uid = f"tls-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
        in_q, out_q = f"d2af.{uid}.in", f"d2af.{uid}.out"
        dlq = in_q + ".dead"
        client = AmqpClient(node.params)
        tls_cfg = {
            "Tls": True,
            "Port": node.tls_port,
            "HostName": "127.0.0.1",
            "TlsServerName": "localhost",
            "TlsCaFile": str(node.tls_files.ca),
            "TlsCertFile": str(node.tls_files.client_cert),
            "TlsKeyFile": str(node.tls_files.client_key),
        }
        assert node.tls_port is not None
        base = lab.daemon_config(in_q, out_q, node.tls_port)
        # a daemon trusting another CA must not connect
        wrong = make_test_pki(lab.workdir / f"{uid}-wrongca")
        bad = Daemon(lab.workdir / f"{uid}-wrong", {**base, **tls_cfg, "TlsCaFile": str(wrong.ca)})
        bad.start()
        time.sleep(5)
        never_declared = client.queue_depth(in_q) is None
        refused = never_declared and (bad.alive() or bad.returncode != 0)
        bad_out = bad.output() + bad.log_text()
        bad.stop()
        res.evidence["wrong_ca_refused"] = refused
        res.evidence["wrong_ca_message"] = next(
            (
                ln[:160]
                for ln in bad_out.splitlines()
                if "certif" in ln.lower() or "ssl" in ln.lower()
            ),
            "",
        )
        if not refused:
            res.problems.append("daemon connected although the broker's CA is not trusted")
        daemon = Daemon(lab.workdir / uid, {**base, **tls_cfg})
        collector = Collector(client, [out_q, dlq])
        try:
            daemon.start()
            daemon.wait_consuming(client, in_q)
            conns = node.ctl(
                "list_connections", "-q", "--no-table-headers", "ssl", "peer_port"
            ).stdout
            res.evidence["broker_sees_ssl_connection"] = "true" in conns
            if "true" not in conns:
                res.problems.append(f"no TLS connection on the broker: {conns.strip()[:200]}")
            collector.start()
            bodies = [
                (f"tls-{k}", read_request(f"tls-{k}", lab.sim.port + k)) for k in range(requests)
            ]
            client.publish(in_q, bodies)
            collector.wait_ids({i for i, _ in bodies}, 60)
            time.sleep(0.5)
            items = collector.snapshot()
            res.row = judge("broker TLS (amqps)", [i for i, _ in bodies], items, {out_q}, dlq)
            oks = sum(1 for r in items if reply_dict(r).get("Status") == "ok")
            if oks < requests:
                res.problems.append(f"only {oks} of {requests} replies ok over amqps")
            res.leaks = leak_scan(daemon, items, dlq) + scan_canaries(
                [("wrong-CA daemon", bad_out.encode())]
            )
            res.row.notes = (
                "verify_peer, test CA; wrong CA refused" if refused else "wrong CA accepted!"
            )
        finally:
            daemon.stop()
            collector.stop()
            client.delete_queues([in_q, out_q, dlq])
    finally:
        if own is not None:
            own.destroy()
    lab.rows.append(res.row)
    ROWS.append(res.row)
    return res


GMAC_AKEY = "D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF"  # the simulator's client-48 keys: secrets too
GMAC_BKEY = "000102030405060708090A0B0C0D0E0F"


def gmac_request(msg_id: str, port: int) -> bytes:
    cs = (
        f"-h 127.0.0.1 -p {port} -i WRAPPER -c 48 -s 1 -a HighGMAC -C AuthenticationEncryption"
        f" -T 4775727578313233 -A {GMAC_AKEY} -B {GMAC_BKEY}"
    )
    return json.dumps(
        {"MsgID": msg_id, "Cmd": "READ", "ObisCode": "1.0.1.8.0.255", "ConnectionString": cs}
    ).encode()


def scenario_cipher_kill(lab: Lab, first: int = 6, after: int = 3) -> Result:
    """Ciphered meter (client 48): kill -9 the daemon mid-session, restart, read again.

    The meter refuses an invocation counter not above the last one it accepted; the daemon
    persists its counters in StateDir before use, so after the restart every read must
    still be ok.  All requests go to one meter, so they run one after the other.
    """
    port = lab.sim.port + lab.meters - 1
    res = Result(Row("cipher (client 48) kill -9 + restart", sent=first + after))
    with daemon_env(lab, "cipher") as env:
        ids = [f"gm-{k}" for k in range(first)]
        lab.client.publish(env.in_q, [(i, gmac_request(i, port)) for i in ids])
        if not wait_for(lambda: len(env.collector.snapshot()) >= 2, 60):
            res.problems.append("no ciphered reply before the kill")
        rc = env.daemon.kill9()
        if rc != -signal.SIGKILL:
            res.problems.append(f"kill -9 exit code {rc}")
        before = len(env.collector.snapshot())
        env.daemon.start()
        env.daemon.wait_consuming(lab.client, env.in_q)
        more = [f"gm-after-{k}" for k in range(after)]
        lab.client.publish(env.in_q, [(i, gmac_request(i, port)) for i in more])
        env.collector.wait_ids(set(ids + more), 90)
        time.sleep(0.5)
        items = env.collector.snapshot()
        res.leaks = leak_scan(env.daemon, items, env.dlq, (GMAC_AKEY, GMAC_BKEY))
        log = env.daemon.log_text()
    res.row = judge(res.row.fault, ids + more, items, {env.out_q}, env.dlq)
    statuses = {reply_in_id(r): reply_dict(r) for r in items if r.queue == env.out_q}
    for i in ids + more:
        d = statuses.get(i, {})
        if d.get("Status") != "ok":
            res.problems.append(f"{i}: {d.get('Status')} {str(d.get('Error'))[:120]}")
    resyncs = log.lower().count("resync")
    res.evidence = {
        "kill_exit_code": rc,
        "replies_before_kill": before,
        "resync_log_lines": resyncs,
    }
    res.row.notes = f"{before} answered before kill; {resyncs} counter resync lines in the log"
    lab.rows.append(res.row)
    ROWS.append(res.row)
    return res


def check_queue_mismatch(lab: Lab) -> dict[str, Any]:
    """InQueue exists as a classic queue, the daemon is configured for quorum: clear exit."""
    uid = f"mismatch-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
    in_q, out_q = f"d2af.{uid}.in", f"d2af.{uid}.out"
    conn = lab.client.connect()
    try:
        conn.channel().queue_declare(in_q, durable=True)
    finally:
        conn.close()
    d = Daemon(lab.workdir / uid, lab.daemon_config(in_q, out_q, lab.node.port, QueueType="quorum"))
    try:
        d.start()
        rc = d.wait_exit(60)
        text = d.output() + d.log_text()
    finally:
        d.stop()
        lab.client.delete_queues([in_q, out_q, in_q + ".dead"])
    return {"exit_code": rc, "text": text, "leaks": scan_canaries([("mismatch", text.encode())])}


def scenario_poison_worker_crash(lab: Lab, others: int = 10) -> Result:
    """A request that kills its worker every time (we SIGKILL the workers as soon as its
    meter sees a connection) must end as a notok reply after one retry, not loop; the other
    requests are still answered."""
    poison_port = lab.sim.port + lab.meters - 2
    res = Result(Row("poison: worker dies on every attempt", sent=others + 1))
    with contextlib.ExitStack() as st:
        proxy = TcpProxy([poison_port], count_dlms=True)
        st.callback(proxy.close)
        env = st.enter_context(daemon_env(lab, "poison"))
        kills: list[int] = []
        stop = threading.Event()

        def killer() -> None:
            seen = 0
            while not stop.is_set():
                n = proxy.stats[poison_port].connections
                if n > seen:
                    seen = n
                    for pid in worker_pids(env.daemon):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                            kills.append(pid)
                time.sleep(0.02)

        t = threading.Thread(target=killer, daemon=True)
        t.start()
        st.callback(stop.set)
        ids = ["poison"] + [f"poison-other-{k}" for k in range(others)]
        bodies = [("poison", read_request("poison", proxy.port_of[poison_port]))]
        bodies += [(i, read_request(i, lab.sim.port + k)) for k, i in enumerate(ids[1:])]
        lab.client.publish(env.in_q, bodies)
        env.collector.wait_ids(set(ids), 120)
        time.sleep(3.0)  # a looping request would show more connections/kills here
        stop.set()
        items = env.collector.snapshot()
        res.leaks = leak_scan(env.daemon, items, env.dlq)
        attempts = proxy.stats[poison_port].connections
        alive = env.daemon.alive()
    res.row = judge(res.row.fault, ids, items, {env.out_q}, env.dlq)
    d = next((reply_dict(r) for r in items if reply_in_id(r) == "poison"), {})
    dead = [r for r in items if r.queue == env.dlq and reply_in_id(r) == "poison"]
    if not dead and d.get("Status") != "notok":
        res.problems.append(f"poison request not answered notok nor dead-lettered: {d}")
    if attempts > 3:
        res.problems.append(f"poison request tried {attempts} times (loop)")
    if not alive:
        res.problems.append("daemon died")
    if not kills:
        res.problems.append("no worker was killed: fault not injected")
    res.evidence = {
        "attempts": attempts,
        "workers_killed": len(kills),
        "error": str(d.get("Error", ""))[:120] or (dead_letter_reason(dead[0]) if dead else ""),
    }
    res.row.notes = f"{attempts} attempts, {len(kills)} workers killed: {res.evidence['error']}"
    lab.rows.append(res.row)
    ROWS.append(res.row)
    return res


def scenario_delivery_limit(lab: Lab, queue_type: str = "classic", limit: int = 2) -> Result:
    """A request that is never answered because the daemon dies during it, again and again.

    The meter never answers (``--silent``), the master is killed with SIGKILL while the
    session waits, and restarted.  After ``DeliveryLimit`` deliveries the request must be
    dead-lettered with a reason instead of looping forever.
    """
    from testing.simulator import running_simulator

    name = f"delivery limit {limit} ({queue_type})"
    res = Result(Row(name, sent=1))
    cycles = 0
    with contextlib.ExitStack() as st:
        sim = st.enter_context(running_simulator(1, "--silent", "-P", CANARY_PASSWORD))
        proxy = TcpProxy([sim.port], count_dlms=True)
        st.callback(proxy.close)
        env = st.enter_context(
            daemon_env(
                lab,
                f"dlimit-{queue_type}",
                {
                    "QueueType": queue_type,
                    "DeliveryLimit": limit,
                    "RequestTimeout": 120,
                    "FrameTimeout": 100,
                },
            )
        )
        mid = f"dlimit-{queue_type}"
        lab.client.publish(env.in_q, [(mid, read_request(mid, proxy.port_of[sim.port]))])
        t0 = time.monotonic()
        marks: list[float] = []
        while cycles < limit + 3:
            marks.append(round(time.monotonic() - t0, 1))
            # wait until delivery number cycles+1 is inside its meter session (or answered);
            # counted from the start, because the restarted daemon may connect very quickly
            wait_for(
                lambda n=cycles: proxy.stats[sim.port].connections > n or env.collector.snapshot(),
                30,
            )
            if env.collector.snapshot():
                break
            time.sleep(0.5)
            env.daemon.kill9()
            cycles += 1
            env.daemon.start()
            env.daemon.wait_consuming(lab.client, env.in_q)
        env.collector.wait_ids({mid}, 30)
        marks.append(round(time.monotonic() - t0, 1))
        time.sleep(0.5)
        items = env.collector.snapshot()
        res.leaks = leak_scan(env.daemon, items, env.dlq)
    marks.append(round(time.monotonic() - t0, 1))
    res.row = judge(name, [mid], items, {env.out_q}, env.dlq)
    dead = [r for r in items if r.queue == env.dlq]
    reason = dead_letter_reason(dead[0]) if dead else ""
    res.evidence = {"kill_cycles": cycles, "meter_sessions": proxy.stats[sim.port].connections}
    res.evidence["cycle_starts_s"] = marks
    res.evidence["reason"] = reason[:120]
    if not dead:
        res.problems.append(
            f"not dead-lettered after {cycles} kill cycles (DeliveryLimit {limit}); got "
            f"{[reply_dict(r).get('Error') for r in items][:3]}"
        )
    if cycles > limit + 1:
        res.problems.append(f"{cycles} deliveries for DeliveryLimit {limit}")
    res.row.notes = f"{cycles} kill -9 cycles; reason: {reason[:70]}"
    lab.rows.append(res.row)
    ROWS.append(res.row)
    return res
