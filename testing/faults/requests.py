# SPDX-License-Identifier: GPL-2.0-or-later
"""Scenarios with their own shape: faulty meters, bad requests, a flood."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections import defaultdict
from typing import Any

import pika
import pika.exceptions

from testing.collector import Collector
from testing.daemon import rss_kb
from testing.faults.lab import (
    Daemon,
    Lab,
    Result,
    conn_string,
    daemon_env,
    leak_scan,
    read_request,
    reply_dict,
    wait_for,
    worker_pids,
)
from testing.oracle import (
    CANARY_AKEY,
    CANARY_BKEY,
    CANARY_PASSWORD,
    ROWS,
    Row,
    dead_letter_reason,
    judge,
    reply_in_id,
)

METER_FAULTS = ("--silent", "--garbage", "--reset", "--reject-auth")


def scenario_meter_faults(lab: Lab, per_fault: int = 3, healthy: int = 12) -> list[Result]:
    """Meters that never answer, answer garbage, reset, reject auth; healthy ones alongside.

    Each faulty request must get a notok reply with an Error within RequestTimeout (+10 s
    slack for the queue), and every healthy request an ok reply: other work carries on.
    """
    from testing.simulator import running_simulator

    results: list[Result] = []
    request_timeout = 15.0
    with contextlib.ExitStack() as st:
        sims = {
            f: st.enter_context(running_simulator(per_fault, f, "-P", CANARY_PASSWORD))
            for f in METER_FAULTS
        }
        env = st.enter_context(
            daemon_env(
                lab,
                "meterfaults",
                # frame traces on: the Low password inside the AARQ must still be masked
                {"RequestTimeout": request_timeout, "FrameTimeout": 3, "Trace": True},
            )
        )
        groups: dict[str, list[tuple[str, bytes]]] = {}
        for f, sim in sims.items():
            groups[f] = [
                (f"mf{f}-{k}", read_request(f"mf{f}-{k}", sim.port + k)) for k in range(per_fault)
            ]
        groups["healthy"] = [
            (
                f"mf-healthy-{k}",
                read_request(f"mf-healthy-{k}", lab.sim.port + k, extra="-t Verbose"),
            )
            for k in range(healthy)
        ]
        everything = [b for g in groups.values() for b in g]
        t0 = time.monotonic()
        lab.client.publish(env.in_q, everything)
        env.collector.wait_ids({i for i, _ in everything}, request_timeout * 3 + 30)
        time.sleep(0.5)
        items = env.collector.snapshot()
        pid_alive = env.daemon.alive()
        leaks = leak_scan(env.daemon, items, env.dlq)
    by_id = {reply_in_id(r): r for r in items if r.queue == env.out_q}
    for g, bodies in groups.items():
        ids = [i for i, _ in bodies]
        res = Result(judge(f"meter {g.lstrip('-')}", ids, items, {env.out_q}, env.dlq))
        res.leaks = leaks
        worst = 0.0
        for i in ids:
            r = by_id.get(i)
            if r is None:
                continue
            d = reply_dict(r)
            worst = max(worst, r.t - t0)
            if g == "healthy":
                if d.get("Status") != "ok":
                    res.problems.append(
                        f"{i}: healthy meter got {d.get('Status')}: {d.get('Error')}"
                    )
            else:
                if d.get("Status") != "notok" or not d.get("Error"):
                    res.problems.append(f"{i}: expected notok with an Error, got {d}")
                if r.t - t0 > request_timeout + 10:
                    res.problems.append(f"{i}: answered after {r.t - t0:.1f} s")
        res.evidence = {"slowest_reply_s": round(worst, 1), "daemon_alive": pid_alive}
        errs = sorted({str(reply_dict(by_id[i]).get("Error"))[:60] for i in ids if i in by_id})
        res.row.notes = f"slowest {worst:.1f} s; " + "; ".join(errs[:2])
        if not pid_alive:
            res.problems.append("daemon died")
        results.append(res)
        lab.rows.append(res.row)
        ROWS.append(res.row)
    return results


def bad_request_corpus(meter_port: int) -> list[tuple[str, str | None, bytes]]:
    """(label, MsgID the reply must carry or None, body) of malformed requests."""
    good_cs = conn_string(meter_port)

    def req(mid: Any, **kw: Any) -> bytes:
        d: dict[str, Any] = {
            "MsgID": mid,
            "Cmd": "READ",
            "ObisCode": "1.0.1.8.0.255",
            "ConnectionString": good_cs,
        }
        for k, v in kw.items():
            if v is None:
                d.pop(k, None)
            else:
                d[k] = v
        return json.dumps(d).encode()

    deep = b'{"MsgID": "bad-deep", "x": ' + b"[" * 20000 + b"]" * 20000 + b"}"
    big = b'{"MsgID": "bad-10mb", "Cmd": "READ", "pad": "' + b"A" * (10 * 1024 * 1024) + b'"}'
    c = [
        ("not json", None, b"this is not JSON {" + CANARY_PASSWORD.encode()),
        ("empty body", None, b""),
        ("invalid utf-8", None, b'{"MsgID": "\xff\xfe"}'),
        ("json array", None, b'["READ", "1.0.1.8.0.255"]'),
        ("json null", None, b"null"),
        ("10 MB body", None, big),
        ("deep nesting", None, deep),
        ("missing MsgID", None, req(None, MsgID=None)),
        ("MsgID list", None, req(["x"])),
        ("Cmd number", "bad-cmdnum", req("bad-cmdnum", Cmd=7)),
        ("ObisCode number", "bad-obisnum", req("bad-obisnum", ObisCode=1.8)),
        ("ConnectionString object", "bad-csobj", req("bad-csobj", ConnectionString={"h": 1})),
        ("unknown command", "bad-unknown", req("bad-unknown", Cmd="WRITE")),
        ("missing Cmd", "bad-nocmd", req("bad-nocmd", Cmd=None)),
        ("missing ObisCode", "bad-noobis", req("bad-noobis", ObisCode=None)),
        ("missing ConnectionString", "bad-nocs", req("bad-nocs", ConnectionString=None)),
        ("bad obis", "bad-obis", req("bad-obis", ObisCode="1.2.3")),
        ("bad dtFrom", "bad-dtfrom", req("bad-dtfrom", dtFrom="yesterday")),
        ("bad dtTo", "bad-dtto", req("bad-dtto", dtTo="2022-13-45T99:00:00")),
        (
            "dtFrom after dtTo",
            "bad-dtorder",
            req("bad-dtorder", dtFrom="2024-02-01T00:00:00Z", dtTo="2024-01-01T00:00:00Z"),
        ),
        ("dtFrom number", "bad-dtnum", req("bad-dtnum", dtFrom=12345)),
        ("cs empty", "bad-csempty", req("bad-csempty", ConnectionString="")),
        ("cs no port", "bad-csnoport", req("bad-csnoport", ConnectionString="-h 127.0.0.1")),
        (
            "cs port text",
            "bad-csport",
            req("bad-csport", ConnectionString=f"-h 127.0.0.1 -p http -P {CANARY_PASSWORD}"),
        ),
        (
            "cs unknown option",
            "bad-csopt",
            req("bad-csopt", ConnectionString=good_cs + " -Q zzz"),
        ),
        (
            "cs dangling -P",
            "bad-csdangle",
            req("bad-csdangle", ConnectionString=f"-h 127.0.0.1 -p {meter_port} -a Low -P"),
        ),
        (
            "cs bad key",
            "bad-cskey",
            req(
                "bad-cskey",
                ConnectionString=f"-h 127.0.0.1 -p {meter_port} -c 48 -C AuthenticationEncryption"
                f" -B {CANARY_BKEY[:-3]} -A {CANARY_AKEY}",
            ),
        ),
        ("cs unbalanced quote", "bad-csquote", req("bad-csquote", ConnectionString='-h "127.0')),
        ("MsgID 10 kB", "M" * 10000, req("M" * 10000)),
        # valid after all: answered, any status
        ("ok: MsgID number", "1443", req(1443)),
        ("ok: unknown field", "bad-extra", req("bad-extra", Extra={"a": [1, 2]})),
    ]
    return c


def _same_msg_id(got: str | None, sent: str) -> bool:
    """An over-long MsgID may come back truncated (the daemon caps field lengths)."""
    if not got:
        return False
    return got == sent or (len(sent) > 255 and len(got) >= 64 and sent.startswith(got))


def scenario_bad_requests(lab: Lab) -> Result:
    """Every malformed request is answered or dead-lettered with a reason; daemon stays up."""
    corpus = bad_request_corpus(lab.sim.port)
    res = Result(Row("bad-request corpus", sent=len(corpus) + 4))
    with daemon_env(lab, "corpus") as env:
        pid = env.daemon.pid
        lab.client.publish(env.in_q, [(f"corpus-{i}", b) for i, (_, _, b) in enumerate(corpus)])
        good = [
            (f"corpus-good-{k}", read_request(f"corpus-good-{k}", lab.sim.port + k))
            for k in range(3)
        ]
        lab.client.publish(env.in_q, good)
        # a reply that cannot be routed (reply_to names no queue): returned by the broker
        unroutable = read_request("corpus-noreplyq", lab.sim.port + 5)
        lab.client.publish(
            env.in_q, [("corpus-noreplyq", unroutable)], reply_to="d2af.no-such-reply-queue"
        )

        def accounted() -> int:
            items = env.collector.snapshot()
            return len(items)

        wait_for(lambda: accounted() >= len(corpus) + 4, 90, 0.3)
        time.sleep(1.0)
        items = env.collector.snapshot()
        alive = env.daemon.alive() and env.daemon.pid == pid
        res.leaks = leak_scan(env.daemon, items, env.dlq)
    replies = [r for r in items if r.queue == env.out_q]
    dead = [r for r in items if r.queue == env.dlq]
    for label, mid, body in corpus:
        rep = [r for r in replies if mid is not None and _same_msg_id(reply_in_id(r), mid)]
        dl = [r for r in dead if r.body == body]
        if rep:
            res.row.replies += 1
            d = reply_dict(rep[0])
            if not label.startswith("ok:") and (d.get("Status") != "notok" or not d.get("Error")):
                res.problems.append(f"{label}: reply is not notok with an Error: {str(d)[:200]}")
            if len({r.body for r in rep}) > 1:
                res.row.duplicated_divergent += 1
        elif dl:
            res.row.dead_lettered += 1
            if not dead_letter_reason(dl[0]):
                res.row.unreasoned_dead.append(label)
                res.problems.append(f"{label}: dead-lettered without a reason")
        else:
            res.row.lost += 1
            res.row.lost_ids.append(label)
            res.problems.append(f"{label}: neither answered nor dead-lettered")
    for mid, _ in good:
        rep = [r for r in replies if reply_in_id(r) == mid]
        if rep and reply_dict(rep[0]).get("Status") == "ok":
            res.row.replies += 1
        else:
            res.row.lost += 1
            res.problems.append(f"{mid}: good request after the corpus not answered ok")
    reasons = {dead_letter_reason(r)[:80] for r in dead}
    # the daemon may dead-letter the request or its reply (which carries InMsgID)
    nr = [r for r in dead if r.body == unroutable or reply_in_id(r) == "corpus-noreplyq"]
    if nr and dead_letter_reason(nr[0]):
        res.row.dead_lettered += 1
    else:
        res.row.lost += 1
        res.problems.append("reply to a missing reply_to queue: request not dead-lettered")
    res.evidence = {"daemon_alive_same_pid": alive, "reasons": sorted(reasons)}
    # an "internal error" reason means a path the daemon does not handle: worth a clear message
    res.evidence["internal_errors"] = sorted(
        lbl
        for lbl, _mid, body in corpus
        for r in dead
        if r.body == body and "internal error" in dead_letter_reason(r)
    )
    if not alive:
        res.problems.append("daemon died or was restarted during the corpus")
    res.row.notes = f"{len(corpus)} bad + 3 good + 1 unroutable reply_to"
    lab.rows.append(res.row)
    ROWS.append(res.row)
    return res


def scenario_flood(
    lab: Lab, total: int = 100_000, seconds: float = 40.0, read_every: int = 20
) -> Result:
    """100,000 requests queued before the daemon starts; watch RSS and unacked for a while.

    Every ``read_every``-th request is a real READ (slow meters, latency per frame), the rest
    an unknown command answered by the master at once, so the daemon is busy on both paths.
    Answering all 100,000 would take minutes here, so we measure the first ``seconds``, stop
    the daemon with SIGTERM (it requeues what it holds) and check conservation: every
    request is answered, dead-lettered or still in the queue.
    """
    uid = f"flood-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
    in_q, out_q = f"d2af.{uid}.in", f"d2af.{uid}.out"
    dlq = in_q + ".dead"
    workers, spw = 2, 8
    prefetch = 2 * workers * spw
    cfg = lab.daemon_config(in_q, out_q, lab.node.port, Workers=workers, SessionsPerWorker=spw)
    daemon = Daemon(lab.workdir / uid, cfg)
    res = Result(Row("flood 100k", sent=total))
    collector = Collector(lab.client, [out_q, dlq])
    try:
        conn = lab.client.connect()
        try:
            ch = conn.channel()
            ch.queue_declare(in_q, durable=True)  # classic, no arguments: as the daemon does
            props = pika.BasicProperties(delivery_mode=2, content_type="application/json")
            t0 = time.monotonic()
            for i in range(total):
                mid = f"fl-{i}"
                if i % read_every == 0:
                    body = read_request(mid, lab.sim.port + (i // read_every) % lab.meters)
                else:
                    body = json.dumps(
                        {
                            "MsgID": mid,
                            "Cmd": "PING",
                            "ObisCode": "1.0.1.8.0.255",
                            "ConnectionString": conn_string(lab.sim.port),
                        }
                    ).encode()
                ch.basic_publish("", in_q, body, props)
            publish_s = time.monotonic() - t0
            # no per-message confirms (too slow for 100k): wait until the queue holds them all
            depth = 0
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                depth = ch.queue_declare(in_q, passive=True).method.message_count
                if depth >= total:
                    break
                time.sleep(0.5)
        finally:
            conn.close()
        res.evidence["publish_seconds"] = round(publish_s, 1)
        res.evidence["queue_depth_before_start"] = depth
        if depth != total:
            res.problems.append(f"queue holds {depth} of {total} before the daemon starts")
        daemon.start()
        daemon.wait_consuming(lab.client, in_q)
        collector.start()
        rss: list[int] = []
        unacked: list[int] = []
        done = threading.Event()

        def sample_unacked() -> None:
            # rabbitmqctl takes ~1 s of CPU per call here: its own thread, every 2 s
            while not done.is_set():
                with contextlib.suppress(Exception):
                    st = lab.node.queue_stats(in_q)
                    if st is not None:
                        unacked.append(st[1])
                done.wait(2.0)

        sampler = threading.Thread(target=sample_unacked, daemon=True)
        sampler.start()
        t_start = time.monotonic()
        try:
            while time.monotonic() - t_start < seconds:
                tick = time.monotonic()
                rss.append(rss_kb([daemon.pid, *worker_pids(daemon)]))
                if not daemon.alive():
                    res.problems.append(f"daemon exited with {daemon.returncode}")
                    break
                time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
        finally:
            done.set()
            sampler.join(30)
        rc = daemon.stop()
        res.evidence["sigterm_exit_code"] = rc
        time.sleep(1.0)
        collector.stop()
        items = collector.snapshot()
        ready = lab.node.queue_stats(in_q)
        left = ready[0] + ready[1] if ready else -1
        ids_answered = {reply_in_id(r) for r in items if r.queue == out_q}
        dead = [r for r in items if r.queue == dlq]
        by_id: dict[str | None, set[bytes]] = defaultdict(set)
        for r in items:
            if r.queue == out_q:
                by_id[reply_in_id(r)].add(r.body)
        res.row.replies = len(ids_answered)
        res.row.dead_lettered = len(dead)
        res.row.duplicated_divergent = sum(1 for v in by_id.values() if len(v) > 1)
        res.row.duplicated_identical = sum(1 for r in items if r.queue == out_q) - len(ids_answered)
        res.row.lost = total - len(ids_answered) - len(dead) - left
        half = len(rss) // 2
        warm = max(3, len(rss) // 4)
        first = max(rss[warm:half] or [0])
        last = max(rss[half:] or [0])
        res.evidence.update(
            {
                "seconds_measured": round(time.monotonic() - t_start, 1),
                "answered": len(ids_answered),
                "left_in_queue": left,
                "rss_mb_samples": len(rss),
                "rss_mb_first_half_max": round(first / 1024, 1),
                "rss_mb_second_half_max": round(last / 1024, 1),
                "unacked_max": max(unacked or [0]),
                "unacked_samples": len(unacked),
                "prefetch": prefetch,
            }
        )
        res.row.notes = (
            f"first {seconds:.0f} s: {len(ids_answered)} answered, {left} left queued; "
            f"RSS {first / 1024:.0f}->{last / 1024:.0f} MB; unacked max {max(unacked or [0])}"
            f" <= prefetch {prefetch}"
        )
        if max(unacked or [0]) > prefetch:
            res.problems.append(f"unacked {max(unacked)} exceeds prefetch {prefetch}")
        if not unacked:
            res.problems.append("no unacked sample")
        if last > first * 1.15 + 10 * 1024:
            res.problems.append(f"RSS grew from {first} kB to {last} kB")
        if res.row.lost:
            res.problems.append(f"{res.row.lost} requests neither answered nor still queued")
        res.leaks = leak_scan(daemon, items[:2000], dlq)
    finally:
        daemon.stop()
        collector.stop()
        lab.client.delete_queues([in_q, out_q, dlq])
    lab.rows.append(res.row)
    ROWS.append(res.row)
    return res
