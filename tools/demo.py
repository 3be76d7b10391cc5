#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""`make demo`: the proof of concept's workflow end to end on 100 simulated meters.

Starts the simulator (100 meters), the daemon with a temporary configuration on the local
RabbitMQ, writes 100 request files as the seed's load-test script did, sends them with
dlms2amqp-send, dumps the replies with dlms2amqp-dump, checks every reply against the
simulator's data model, prints a summary, and stops everything.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dlms2amqp.simulator import model, ports  # noqa: E402
from testing.ports import free_port  # noqa: E402

PY = sys.executable
DAY = 86400


def free_port_range(count: int) -> int:
    try:
        return ports.free_port_range(count)
    except RuntimeError as e:
        raise SystemExit(f"demo: {e}") from None


def start_simulator(count: int, tmp: Path) -> tuple[subprocess.Popen, int]:
    first = free_port_range(count)
    err = open(tmp / "simulator.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        [PY, "-m", "dlms2amqp.cli.sim", "-N", str(count), "-p", str(first), "-i", "WRAPPER"],
        stdout=subprocess.PIPE,
        stderr=err,
        cwd=ROOT,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("ready"):
        proc.kill()
        raise SystemExit(f"demo: simulator did not start: {(tmp / 'simulator.log').read_text()}")
    return proc, first


def broker_channel() -> Any:
    import pika

    conn = pika.BlockingConnection(
        pika.ConnectionParameters("127.0.0.1", 5672, "/", pika.PlainCredentials("guest", "guest"))
    )
    return conn, conn.channel()


def wait_consuming(daemon: subprocess.Popen, queue: str, tmp: Path, timeout: float = 60) -> None:
    import pika.exceptions

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise SystemExit(
                f"demo: daemon exited with {daemon.returncode}:\n"
                + (tmp / "daemon.out").read_text()[-3000:]
            )
        try:
            conn, ch = broker_channel()
            with conn:
                if ch.queue_declare(queue, passive=True).method.consumer_count:
                    return
        except pika.exceptions.AMQPError:
            pass
        time.sleep(0.3)
    raise SystemExit("demo: daemon not consuming in time")


def expected_records(k: int, start: int, end: int) -> dict[tuple[str, str], str]:
    """(DateTime, Code) -> Value the reply for meter k must hold, from the data model."""
    out = {}
    for t, st, imp, exp in model.load_profile_rows(k, start, end):
        when = datetime.fromtimestamp(t, timezone.utc).isoformat()
        out[(when, "0.0.96.10.1.255")] = str(st)
        out[(when, "1.0.1.8.0.255")] = str(imp)
        out[(when, "1.0.2.8.0.255")] = str(exp)
    return out


def check(reply: dict, k: int, start: int, end: int) -> Optional[str]:
    if reply.get("Status") != "ok":
        return f"notok: {reply.get('Error')}"
    got = {(r.get("DateTime"), r.get("Code")): r.get("Value") for r in reply["DataRecords"]}
    want = expected_records(k, start, end)
    wrong = [key for key, v in want.items() if got.get(key) != v]
    if wrong or len(got) != len(want):
        return f"{len(wrong)} of {len(want)} values differ, {len(got)} records (e.g. {wrong[:2]})"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--meters", type=int, default=100)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dlms2amqp-demo-"))
    tag = uuid.uuid4().hex[:8]
    cfg = {
        "HostName": "127.0.0.1",
        "Port": 5672,
        "VirtualHost": "/",
        "UserName": "guest",
        "Password": "guest",
        "DebugFile": str(tmp / "daemon.log"),
        "InQueue": f"demo.{tag}.in",
        "OutQueue": f"demo.{tag}.out",
        "Workers": args.workers,
        "SessionsPerWorker": 16,
        "MetricsPort": free_port(),
        "StateDir": str(tmp / "state"),
    }
    conf = tmp / "dlms2amqp.json"
    conf.write_text(json.dumps(cfg, indent=2))
    sim = daemon = None
    t_start = time.monotonic()
    try:
        sim, first = start_simulator(args.meters, tmp)
        out = open(tmp / "daemon.out", "wb")  # noqa: SIM115
        daemon = subprocess.Popen(
            [PY, "-m", "dlms2amqp.cli.daemon", "-c", str(conf)], stdout=out, stderr=out, cwd=ROOT
        )
        wait_consuming(daemon, cfg["InQueue"], tmp)
        # one day of the load profile, yesterday (UTC), as in the seed's load test
        end = (int(time.time()) // DAY) * DAY
        start = end - DAY
        reqdir = tmp / "requests"
        reqdir.mkdir()
        files = []
        for k in range(args.meters):
            port = first + k
            body = {
                "MsgID": str(port),
                "Cmd": "READ",
                "ObisCode": "1.0.99.1.0.255",
                "ConnectionString": f"-h 127.0.0.1 -p {port} -c 32 -a Low -i WRAPPER -P 00000000",
                "dtFrom": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(start)),
                "dtTo": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(end)),
            }
            f = reqdir / str(port)
            f.write_text(json.dumps(body, indent=2))
            files.append(str(f))
        t0 = time.monotonic()
        r = subprocess.run(
            [PY, "-m", "dlms2amqp.cli.send", "-c", str(conf), *files],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        print(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "send: (no output)")
        if r.returncode != 0:
            print(r.stderr)
            return 1
        r = subprocess.run(
            [
                PY,
                "-m",
                "dlms2amqp.cli.dump",
                "-c",
                str(conf),
                "--max",
                str(len(files)),
                "--timeout",
                "120",
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        wall = time.monotonic() - t0
        replies = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
        ok = notok = wrong = 0
        problems: list[str] = []
        seen = set()
        for rep in replies:
            port = int(rep["InMsgID"])
            seen.add(port)
            why = check(rep, port - first, start, end)
            if rep.get("Status") == "ok":
                ok += 1
            else:
                notok += 1
            if why:
                wrong += 1
                problems.append(f"  meter {port}: {why}")
        missing = args.meters - len(seen)
        print(
            f"demo: {args.meters} meters, {len(replies)} replies: {ok} ok, {notok} notok, "
            f"{wrong} not matching the simulator's data, {missing} missing"
        )
        print(
            f"demo: send + read + dump wall time {wall:.1f} s "
            f"({len(replies) / wall:.1f} replies/s); whole demo {time.monotonic() - t_start:.1f} s"
        )
        for line in problems[:10]:
            print(line)
        if replies:
            sample = dict(replies[0])
            recs = sample.get("DataRecords", [])
            sample["DataRecords"] = recs[:6] + (
                [f"... {len(recs) - 6} more"] if len(recs) > 6 else []
            )
            print("demo: sample reply:\n" + json.dumps(sample, indent=2))
        return 0 if (ok == args.meters and not wrong) else 1
    finally:
        for p in (daemon, sim):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
        try:
            conn, ch = broker_channel()
            with conn:
                for q in (cfg["InQueue"], cfg["OutQueue"], cfg["InQueue"] + ".dead"):
                    ch.queue_delete(q)
                ch.exchange_delete(cfg["InQueue"] + ".dlx")
        except Exception as e:  # noqa: BLE001 - best effort cleanup
            print(f"demo: could not delete the demo queues: {e}")
        if args.keep:
            print(f"demo: files kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
