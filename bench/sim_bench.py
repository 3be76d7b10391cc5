# SPDX-License-Identifier: GPL-2.0-or-later
"""Benchmark of ``dlms2amqp-sim``: is the simulator cheap enough to be invisible?

Starts ``dlms2amqp-sim -N COUNT`` (one process), then prints:

- seconds until the ready line,
- idle RSS (VmRSS of the simulator after start),
- simulator CPU (utime+stime from /proc/PID/stat) per one-day load-profile read,
  while a client in another process keeps CONNS associations busy, one GET with
  selective access by range (96 rows) in flight on each.

Targets (issue 2): ready < 5 s, idle RSS < 64 MB, < 1.0 ms of simulator CPU per read.

    .venv/bin/python bench/sim_bench.py            # -N 10000, 3000 reads
"""

from __future__ import annotations

import argparse
import calendar
import multiprocessing
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dlms2amqp.simulator import axdr_enc as ax  # noqa: E402
from dlms2amqp.simulator import cosem, model, ports  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")

AARQ_LOW = bytes.fromhex(
    "6036a1090607608574050801018a0207808b0760857405080201ac0a80083030303030303030"
    "be10040e01000000065f1f040000181dffff"
)


def wrap(apdu: bytes) -> bytes:
    return struct.pack(">HHHH", 1, 32, 1, len(apdu)) + apdu


def one_day_get(day_start: int) -> bytes:
    sel = ax.structure(
        [
            ax.structure([ax.uint16(8), ax.octet_string(cosem.LN_CLOCK), ax.int8(2), ax.uint16(0)]),
            ax.datetime_data(day_start),
            ax.datetime_data(day_start + 86400 - 900),
            ax.array([]),
        ]
    )
    return wrap(b"\xc0\x01\xc1\x00\x07" + cosem.LN_LOAD + b"\x02\x01\x01" + sel)


def recv_frame(sock: socket.socket) -> bytes:
    head = b""
    while len(head) < 8:
        chunk = sock.recv(8 - len(head))
        if not chunk:
            raise ConnectionError("simulator closed the connection")
        head += chunk
    n = struct.unpack(">HHHH", head)[3]
    body = bytearray()
    while len(body) < n:
        chunk = sock.recv(n - len(body))
        if not chunk:
            raise ConnectionError("simulator closed the connection")
        body += chunk
    return bytes(body)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def client(host: str, port: int, count: int, conns: int, reads: int, day: int, out) -> None:
    """Runs in its own process: CONNS associations, READS one-day reads in total."""
    try:
        request = one_day_get(day)
        socks = []
        step = max(1, count // conns)
        for i in range(conns):
            k = (i * step) % count
            s = socket.create_connection((host, port + k), timeout=30)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(wrap(AARQ_LOW))
            aare = recv_frame(s)
            if b"\xa2\x03\x02\x01\x00" not in aare:
                raise RuntimeError(f"meter {k}: association rejected")
            # correctness once per meter: the rows are those of model.py
            s.sendall(request)
            reply = recv_frame(s)
            rows, _ = ax.decode(reply, 4)
            got = [(ax.parse_datetime(r[0]), *r[1:]) for r in rows]
            if got != model.load_profile_rows(k, day, day + 86400 - 900):
                raise RuntimeError(f"meter {k}: rows differ from model.py")
            socks.append(s)
        out.send(("ready", len(rows)))
        out.recv()  # go
        sel = selectors.DefaultSelector()
        for s in socks:
            s.setblocking(True)
            sel.register(s, selectors.EVENT_READ)
        done = 0
        sent = 0
        for s in socks:
            if sent < reads:
                s.sendall(request)
                sent += 1
        t0 = time.monotonic()
        while done < reads:
            for key, _ in sel.select(60):
                s = key.fileobj
                reply = recv_frame(s)
                if reply[:4] != b"\xc4\x01\xc1\x00":
                    raise RuntimeError("unexpected reply")
                done += 1
                if sent < reads:
                    s.sendall(request)
                    sent += 1
        out.send(("done", time.monotonic() - t0))
        for s in socks:
            s.close()
        # phase 2: a whole session per read (connect, AARQ, GET, RLRQ, close)
        n_sessions = out.recv()
        t0 = time.monotonic()
        for i in range(n_sessions):
            k = (i * 7919) % count
            with socket.create_connection((host, port + k), timeout=30) as s:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.sendall(wrap(AARQ_LOW))
                recv_frame(s)
                s.sendall(request)
                if recv_frame(s)[:4] != b"\xc4\x01\xc1\x00":
                    raise RuntimeError("unexpected reply")
                s.sendall(wrap(b"\x62\x03\x80\x01\x00"))
                if recv_frame(s) != b"\x63\x03\x80\x01\x00":
                    raise RuntimeError("unexpected RLRE")
        out.send(("done", time.monotonic() - t0))
    except Exception as e:  # report to the parent instead of hanging it
        out.send(("error", str(e)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("-N", "--count", type=int, default=10000)
    p.add_argument("-p", "--port", type=int, help="first port (default: a free range)")
    p.add_argument("--reads", type=int, default=3000)
    p.add_argument("--conns", type=int, default=20)
    p.add_argument("--sessions", type=int, default=1000, help="whole sessions in phase 2")
    p.add_argument("--host", default="127.0.0.1")
    args = p.parse_args(argv)
    if args.port is None:
        args.port = ports.free_port_range(args.count, args.host, low=1025, high=32000)
    now = int(time.time())
    day = calendar.timegm(time.gmtime(now - 86400)[:3] + (0, 0, 0, 0, 0, 0))
    cmd = [sys.executable, "-m", "dlms2amqp.cli.sim", "-N", str(args.count), "-p", str(args.port)]
    cmd += ["--host", args.host]
    t0 = time.monotonic()
    sim = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=str(ROOT))
    try:
        line = sim.stdout.readline()
        ready_s = time.monotonic() - t0
        if not line.startswith("ready"):
            print(f"simulator did not start (exit {sim.wait()})", file=sys.stderr)
            return 1
        time.sleep(1.0)
        idle_rss = rss_mb(sim.pid)
        parent, child = multiprocessing.Pipe()
        cl = multiprocessing.Process(
            target=client,
            args=(args.host, args.port, args.count, args.conns, args.reads, day, child),
        )
        cl.start()
        msg = parent.recv()
        if msg[0] != "ready":
            print(f"client failed: {msg[1]}", file=sys.stderr)
            return 1
        rows = msg[1]
        cpu0 = cpu_seconds(sim.pid)
        parent.send("go")
        msg = parent.recv()
        cpu1 = cpu_seconds(sim.pid)
        if msg[0] != "done":
            print(f"client failed: {msg[1]}", file=sys.stderr)
            return 1
        wall = msg[1]
        cpu2 = cpu_seconds(sim.pid)
        parent.send(args.sessions)
        msg = parent.recv()
        cpu3 = cpu_seconds(sim.pid)
        cl.join(30)
        if msg[0] != "done":
            print(f"client failed: {msg[1]}", file=sys.stderr)
            return 1
        per_session_ms = (cpu3 - cpu2) * 1000 / max(1, args.sessions)
        loaded_rss = rss_mb(sim.pid)
        per_read_ms = (cpu1 - cpu0) * 1000 / args.reads
        print(f"meters               {args.count} (one process)")
        print(f"ready after          {ready_s:.2f} s        (target < 5 s)")
        print(f"idle RSS             {idle_rss:.1f} MB      (target < 64 MB)")
        print(f"RSS after the load   {loaded_rss:.1f} MB")
        print(
            f"one-day reads        {args.reads} x {rows} rows on {args.conns} connections"
            f" in {wall:.2f} s ({args.reads / wall:.0f}/s)"
        )
        print(f"simulator CPU        {per_read_ms:.3f} ms per read (target < 1.0 ms)")
        print(
            f"whole sessions       {per_session_ms:.3f} ms simulator CPU per TCP connect + AARQ"
            f" + one-day GET + RLRQ ({args.sessions} sessions, meters spread over the range)"
        )
        ok = ready_s < 5 and idle_rss < 64 and per_read_ms < 1.0
        print("targets              " + ("met" if ok else "NOT met"))
        return 0
    finally:
        sim.send_signal(signal.SIGTERM)
        try:
            sim.wait(20)
        except subprocess.TimeoutExpired:
            sim.kill()
            sim.wait()


if __name__ == "__main__":
    sys.exit(main())
