# SPDX-License-Identifier: GPL-2.0-or-later
"""Faults of the broker and of the daemon's processes, run through ``Lab.run``; the
``SCENARIOS`` table (name -> fault function and options).
"""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import datetime, timezone
from typing import Any

from testing.faults.lab import (
    Ctx,
    Daemon,
    read_request,
    reply_dict,
    stored_reply_ids,
    wait_for,
    worker_pids,
)
from testing.oracle import reply_in_id
from testing.ports import free_port

# --- the faults -----------------------------------------------------------------------------
LOST_EVENT = "broker_connection_lost"


def fault_broker_restart(ctx: Ctx) -> dict[str, Any]:
    """rabbitmqctl stop_app, 3 s down, start_app, while requests are in flight."""
    ctx.wait_some_progress()
    pid, lost = ctx.daemon.pid, ctx.log_count(LOST_EVENT)
    ctx.lab.node.stop_app()
    down = not ctx.lab.node.amqp_ok()
    time.sleep(3)
    ctx.lab.node.start_app()
    assert down, "the broker still accepted AMQP after stop_app"
    assert ctx.wait_log_increase(LOST_EVENT, lost, 30), "daemon did not log the lost connection"
    assert ctx.daemon.alive() and ctx.daemon.pid == pid, "daemon died"
    ctx.notes = "stop_app 3 s"
    return {"stop_app_rc": 0, "amqp_refused_while_stopped": down, "daemon_pid_unchanged": pid}


def fault_close_all(ctx: Ctx) -> dict[str, Any]:
    """rabbitmqctl close_all_connections while requests are in flight."""
    ctx.wait_some_progress()
    pid, lost = ctx.daemon.pid, ctx.log_count(LOST_EVENT)
    n = ctx.lab.node.close_all_connections()
    assert n >= 1, "no connection to close"
    assert ctx.wait_log_increase(LOST_EVENT, lost, 30), "daemon did not log the lost connection"
    assert ctx.daemon.alive() and ctx.daemon.pid == pid, "daemon died"
    return {"connections_closed": n, "daemon_pid_unchanged": pid}


def fault_silent_cut(ctx: Ctx) -> dict[str, Any]:
    """Blackhole the daemon's broker connection (no FIN, no RST) until it notices."""
    assert ctx.broker_proxy is not None
    ctx.wait_some_progress()
    hb = float(ctx.daemon.config.get("Heartbeat", 30))
    lost = ctx.log_count(LOST_EVENT)
    assert ctx.broker_proxy.open_connections() >= 1, "daemon not connected through the proxy"
    ctx.broker_proxy.blackhole()
    t0 = time.monotonic()
    # the daemon drops a connection silent for 1.5 heartbeats (pika alone: up to
    # 2 x (heartbeat + 5) s); a little margin for a busy machine
    limit = 2 * hb + 2
    detected = ctx.wait_log_increase(LOST_EVENT, lost, limit + 30)
    dt = time.monotonic() - t0
    time.sleep(2)  # reconnect attempts during the cut must fail cleanly
    ctx.broker_proxy.restore()
    ctx.notes = f"heartbeat {hb:g} s, detected after {dt:.1f} s"
    assert detected, f"cut not detected within {limit + 30:.0f} s"
    assert dt <= limit, f"cut detected only after {dt:.1f} s (heartbeat {hb:g} s)"
    return {"detected_after_s": round(dt, 1), "heartbeat_s": hb}


def fault_kill_worker(ctx: Ctx) -> dict[str, Any]:
    """SIGKILL one worker process in the middle of meter sessions."""
    ctx.wait_some_progress()
    before = worker_pids(ctx.daemon)
    assert before, "no worker process found"
    sessions = ctx.meters.open_connections()
    victim = before[0]
    os.kill(victim, signal.SIGKILL)
    replaced = wait_for(
        lambda: (
            victim not in worker_pids(ctx.daemon) and len(worker_pids(ctx.daemon)) >= len(before)
        ),
        30,
    )
    assert sessions > 0, "no meter session open at the kill"
    assert replaced, "the killed worker was not replaced"
    new = sorted(set(worker_pids(ctx.daemon)) - set(before))
    ctx.notes = "repeats allowed: first attempt died"
    return {"killed_pid": victim, "new_worker_pids": new, "meter_sessions_open": sessions}


def fault_kill_master(ctx: Ctx) -> dict[str, Any]:
    """SIGKILL the master mid-load, restart it on the same StateDir, then replay answered ones.

    Requests whose reply was stored before the kill must not be read again; re-publishing
    five answered requests (a redelivery as the broker would make it) must give the very
    same reply bytes from the store, without a meter session.
    """
    ctx.wait_some_progress()
    d = ctx.daemon
    old = d.pid
    rc = d.kill9()
    assert rc == -signal.SIGKILL, f"master exit code {rc}"
    stored = stored_reply_ids(d.workdir / "state")
    ctx.no_repeat_ids |= stored
    d.start()
    d.wait_consuming(ctx.lab.client, ctx.in_q)
    assert d.pid != old, "same PID after restart"
    ids = {i for i, _ in ctx.bodies}
    ctx.collector.wait_ids(ids, 60)
    sessions = ctx.meters.total().aarqs
    replay = ctx.bodies[:5]  # checked below: no new meter session at all for these
    n_before = len(ctx.collector.snapshot())
    ctx.lab.client.publish(ctx.in_q, replay)
    wait_for(lambda: len(ctx.collector.snapshot()) >= n_before + len(replay), 30)
    time.sleep(0.5)
    new_sessions = ctx.meters.total().aarqs - sessions
    from_store = ctx.log_count("answered_from_store")
    ctx.notes = f"{len(stored)} stored before kill; 5 replayed; {from_store} from store"
    assert new_sessions == 0, f"{new_sessions} meter sessions opened for replayed requests"
    assert from_store >= len(replay), f"only {from_store} answers from the reply store"
    return {"exit_code": rc, "old_pid": old, "new_pid": d.pid, "stored_before_kill": len(stored)}


def fault_sigterm(ctx: Ctx) -> dict[str, Any]:
    """SIGTERM under load (finish in-flight, requeue the rest), then restart."""
    ctx.wait_some_progress()
    d = ctx.daemon
    old = d.pid
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    rc = d.wait_exit(float(d.config.get("ShutdownGrace", 30)) + 20)
    took = time.monotonic() - t0
    assert rc == 0, f"exit code after SIGTERM: {rc}"
    answered = len(ctx.collector.snapshot())
    d.start()
    d.wait_consuming(ctx.lab.client, ctx.in_q)
    assert d.pid != old
    ctx.notes = f"stopped in {took:.1f} s, {answered} answered before restart"
    return {"exit_code": rc, "stop_seconds": round(took, 1), "answered_before_restart": answered}


def fault_memory_alarm(ctx: Ctx) -> dict[str, Any]:
    """Broker memory alarm (publishers blocked) for 10 s under load, then cleared."""
    ctx.wait_some_progress()
    node = ctx.lab.node
    node.ctl("set_vm_memory_high_watermark", "absolute", "1")
    try:
        time.sleep(4)
        during0 = ctx.replies()
        time.sleep(6)
        during1 = ctx.replies()
        alarms = node.ctl("eval", "rabbit_alarm:get_alarms().", check=False).stdout.strip()
    finally:
        node.ctl("set_vm_memory_high_watermark", "0.8")
    ctx.notes = f"replies during the alarm: {during1 - during0} in 6 s"
    assert "memory" in alarms, f"no memory alarm raised: {alarms[:200]}"
    assert during1 == during0, "replies still published while the broker blocked publishers"
    assert ctx.daemon.alive(), "daemon died"
    return {"alarm": alarms[:120], "replies_during_alarm": during1 - during0}


def fault_second_daemon(ctx: Ctx) -> dict[str, Any]:
    """A second dlms2amqpd with the same configuration (same MetricsPort) starts under load.

    It must stop at once (exit 78, one line, no traceback, no worker spawned) and the
    first daemon must not notice: same PID, same workers, every request answered.
    """
    ctx.wait_some_progress()
    first = ctx.daemon
    pid, workers = first.pid, sorted(worker_pids(first))
    second = Daemon(first.workdir.with_name(first.workdir.name + "-second"), dict(first.config))
    t0 = time.monotonic()
    second.start()
    rc = second.wait_exit(60)
    took = time.monotonic() - t0
    text = second.output()
    if rc is None:
        second.stop()
    plain = [
        ln
        for ln in text.splitlines()
        if ln.startswith("dlms2amqpd: ") and not ln.startswith("dlms2amqpd: warning: ")
    ]
    ctx.notes = f"second daemon exit {rc} after {took:.1f} s"
    assert rc == 78, f"second daemon exit code {rc}: {text[-2000:]}"
    assert "Traceback" not in text, text[-2000:]
    assert len(plain) == 1 and "in use" in plain[0], text[-2000:]
    assert "worker_started" not in second.log_text(), "the second daemon spawned workers"
    assert first.alive() and first.pid == pid, "the first daemon died"
    assert sorted(worker_pids(first)) == workers, "the first daemon's workers changed"
    return {"second_exit_code": rc, "second_seconds": round(took, 1), "first_pid_unchanged": pid}


def fault_consumer_cancelled(ctx: Ctx) -> dict[str, Any]:
    """Delete InQueue under load and create it again, as an operator would.

    The broker cancels the daemon's consumer and drops what the queue held (ready and
    unacknowledged).  The daemon must notice, declare the topology again and consume the
    new queue; the back-office then sends again what got no reply.  Requests already read
    are answered from the reply store (no second meter session), those still being read
    join their session, the others are read once.
    """
    ctx.wait_some_progress()
    pid = ctx.daemon.pid
    lost, cancels = ctx.log_count(LOST_EVENT), ctx.log_count("broker_cancelled_consumer")
    held = ctx.lab.node.queue_stats(ctx.in_q) or (0, 0)  # (ready, unacknowledged)
    conn = ctx.lab.client.connect()
    try:
        ch = conn.channel()
        ch.queue_delete(ctx.in_q)
        ch.queue_declare(ctx.in_q, durable=True)  # classic, no arguments: as the daemon does
    finally:
        conn.close()
    assert ctx.wait_log_increase("broker_cancelled_consumer", cancels, 30), (
        "daemon did not log the cancelled consumer"
    )
    assert ctx.wait_log_increase(LOST_EVENT, lost, 30), "daemon did not start over"
    ctx.daemon.wait_consuming(ctx.lab.client, ctx.in_q, 60)
    assert ctx.daemon.alive() and ctx.daemon.pid == pid, "daemon died"
    answered = {reply_in_id(r) for r in ctx.collector.snapshot()}
    again = [(i, b) for i, b in ctx.bodies if i not in answered]
    ctx.no_repeat_ids |= stored_reply_ids(ctx.daemon.workdir / "state") & {i for i, _ in again}
    ctx.lab.client.publish(ctx.in_q, again)
    ctx.notes = f"deleted with {held[0]} ready + {held[1]} unacked; {len(again)} sent again"
    return {
        "queue_held_ready_unacked": list(held),
        "sent_again": len(again),
        "daemon_pid_unchanged": pid,
    }


#: spare meters (after the ones Lab.run uses) for the oversize requests
OVERSIZE_SPARE = 4
OVERSIZE_LIMIT = 32768  # MaxReplyBytes of the row; 3 days of load profile are ~72 kB


def fault_oversize_reply(ctx: Ctx) -> dict[str, Any]:
    """Requests whose reply is over MaxReplyBytes, in the middle of the load.

    Two are refused with a notok naming the size and the limit, two asked for parts
    (``SplitReply``) and get every part within the limit, with exactly the meter's rows;
    the other requests are answered as usual (no channel closed, no reconnect).
    """
    from dlms2amqp.simulator import model

    ctx.wait_some_progress()
    lost = ctx.log_count(LOST_EVENT)
    first_spare = ctx.lab.meters - OVERSIZE_SPARE
    end = (int(time.time()) // 86400) * 86400
    start = end - 3 * 86400
    bodies, meter_of = [], {}
    for j in range(OVERSIZE_SPARE):
        k = first_spare + j
        split = j % 2 == 1
        mid = f"oversize-{'parts' if split else 'refused'}-{j}"
        req = json.loads(read_request(mid, ctx.lab.sim.port + k, obis="1.0.99.1.0.255"))
        req["dtFrom"] = datetime.fromtimestamp(start, timezone.utc).isoformat()
        req["dtTo"] = datetime.fromtimestamp(end, timezone.utc).isoformat()
        if split:
            req["SplitReply"] = True
        bodies.append((mid, json.dumps(req).encode()))
        meter_of[mid] = k
    ctx.extra_ids += [m for m, _ in bodies]
    ctx.lab.client.publish(ctx.in_q, bodies)

    def replies_of(mid: str) -> list[dict]:
        return [
            reply_dict(r)
            for r in ctx.collector.snapshot()
            if r.queue == ctx.out_q and reply_in_id(r) == mid
        ]

    def complete(mid: str) -> bool:
        got = replies_of(mid)
        if not got:
            return False
        parts = {d.get("Part") for d in got}
        return "Parts" not in got[0] or len(parts) >= int(got[0]["Parts"])

    assert wait_for(lambda: all(complete(m) for m, _ in bodies), 60), "oversize replies missing"
    sizes, n_parts = [], []
    for mid, _b in bodies:
        got = replies_of(mid)
        if "refused" in mid:
            err = str(got[0].get("Error"))
            assert got[0].get("Status") == "notok", got[0]
            assert f"more than the {OVERSIZE_LIMIT} bytes MaxReplyBytes allows" in err, err
            assert "shorter range" in err, err
            sizes.append(int(err.split("The reply is ", 1)[1].split(" ", 1)[0]))
            continue
        n = int(got[0]["Parts"])
        n_parts.append(n)
        parts = {d["Part"]: d for d in got}
        assert sorted(parts) == list(range(1, n + 1)), sorted(parts)
        assert n >= 2, "a reply over the limit came in one part"
        rows = model.load_profile_rows(meter_of[mid], start, end)
        records = [r for k in range(1, n + 1) for r in parts[k]["DataRecords"]]
        assert len(records) == 3 * len(rows), (len(records), len(rows))
        assert all(d.get("Status") == "ok" for d in parts.values())
    for r in ctx.collector.snapshot():
        if r.queue == ctx.out_q:
            assert len(r.body) <= OVERSIZE_LIMIT, f"a reply of {len(r.body)} bytes went out"
    assert ctx.log_count(LOST_EVENT) == lost, "the broker connection was lost"
    ctx.notes = f"refused {sizes} bytes > {OVERSIZE_LIMIT}; split into {n_parts} parts"
    return {"refused_sizes": sizes, "parts": n_parts, "limit": OVERSIZE_LIMIT}


SCENARIOS: dict[str, dict[str, Any]] = {
    "broker stop_app/start_app": {"fault": fault_broker_restart},
    "close_all_connections": {"fault": fault_close_all},
    "silent network cut": {"fault": fault_silent_cut, "via_proxy": True},
    "kill -9 worker": {"fault": fault_kill_worker, "allow_repeats": True},
    "kill -9 master + restart": {"fault": fault_kill_master, "allow_repeats": True},
    "SIGTERM + restart": {"fault": fault_sigterm},
    "SIGTERM, 2 s grace + restart": {
        "fault": fault_sigterm,
        "allow_repeats": True,  # a session cut at the end of the grace period is read again
        "config": {"ShutdownGrace": 2},
    },
    "memory alarm (blocked publishers)": {
        "fault": fault_memory_alarm,
        "config": {"BlockedConnectionTimeout": 5},
    },
    "close_all_connections (quorum)": {"fault": fault_close_all, "config": {"QueueType": "quorum"}},
    "kill -9 master + restart (quorum)": {
        "fault": fault_kill_master,
        "allow_repeats": True,
        "config": {"QueueType": "quorum"},
    },
    "second daemon on the same port": {
        "fault": fault_second_daemon,
        # the lab's daemons have no metrics endpoint unless asked: this one has
        "config": {"MetricsPort": free_port()},
    },
    "consumer cancelled (queue deleted and re-created)": {"fault": fault_consumer_cancelled},
    "oversize reply": {
        "fault": fault_oversize_reply,
        "config": {"MaxReplyBytes": OVERSIZE_LIMIT},
        "spare_meters": OVERSIZE_SPARE,  # Lab.run leaves these meters to the fault
    },
}
