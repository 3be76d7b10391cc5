# SPDX-License-Identifier: GPL-2.0-or-later
"""Gateway-side CPU per profile read: stock Gurux decoding vs ours, in one run.

Starts the simulator on one port (WRAPPER, Low), reads it N times per scenario
from this process and reports ``time.process_time()`` per read (all threads of
this process: the client only; the simulator is another process).  Each read is
a whole request: connect, associate, capture objects, rows by range, release,
reply dict.  Scenarios run interleaved per round so that a noisy neighbour
hits all of them alike.

    .venv/bin/python bench/read_bench.py            # 1, 7, 31 days, stock vs ours, media
    .venv/bin/python bench/read_bench.py --reads 50 --quick

Target (issue 3): under 3 ms per one-day read including reply building.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dlms2amqp.errors import MeterTimeoutError  # noqa: E402
from dlms2amqp.meter import link as link_mod  # noqa: E402
from dlms2amqp.meter import session as session_mod  # noqa: E402
from dlms2amqp.meter.connstring import parse_connection_string  # noqa: E402
from dlms2amqp.meter.media import Media  # noqa: E402
from dlms2amqp.meter.pool import SessionPool  # noqa: E402
from dlms2amqp.meter.reader import ReaderOptions, execute  # noqa: E402
from dlms2amqp.reply import format_datetime, ok_reply, value_to_str  # noqa: E402
from dlms2amqp.request import ReadRequest  # noqa: E402
from testing.simulator import running_simulator  # noqa: E402

START = datetime(2026, 1, 1, tzinfo=timezone.utc)
OBIS = "1.0.99.1.0.255"


class GxNetMedia(Media):
    """gurux-net's GXNet (receiver thread per connection) behind our Media interface."""

    def __init__(self, host, port, timeout, trace=None):
        from gurux_net import GXNet
        from gurux_net.enums import NetworkType

        self.trace = trace
        self.net = GXNet(NetworkType.TCP, host, port)
        self.net.open()
        self.lock = self.net.getSynchronous()
        self.lock.acquire()

    def send(self, data):
        self.net.send(bytes(data))

    def recv(self, timeout, step):
        from gurux_common import ReceiveParameters

        p = ReceiveParameters()
        p.allData = True
        p.count = 1
        p.waitTime = int(timeout * 1000)
        if not self.net.receive(p):
            raise MeterTimeoutError(f"timeout during {step}")
        return bytes(p.reply)

    def close(self):
        try:
            self.lock.release()
        except RuntimeError:
            pass
        self.net.close()


def request(port: int, days: int) -> ReadRequest:
    return ReadRequest(
        msg_id="bench",
        cmd="READ",
        obis=OBIS,
        connection_string=f"-h 127.0.0.1 -p {port} -c 32 -a Low -P 00000000 -i WRAPPER",
        dt_from=START,
        dt_to=START + timedelta(days=days),
        naive_dates=False,
    )


def ours(req: ReadRequest) -> list:
    reply = execute(req, ReaderOptions(frame_timeout=10, request_timeout=60))
    assert reply["Status"] == "ok", reply["Error"]
    return reply["DataRecords"]


_POOL = SessionPool(idle_timeout=60)


def ours_pooled(req: ReadRequest) -> list:
    """Association kept between reads (the daemon's pool): no TCP/AARQ/release per read."""
    reply = execute(req, ReaderOptions(frame_timeout=10, request_timeout=60), _POOL)
    assert reply["Status"] == "ok", reply["Error"]
    return reply["DataRecords"]


def stock(req: ReadRequest) -> list:
    """The same session, decoded by Gurux's updateValue (the proof of concept's way)."""
    from gurux_dlms.objects import GXDLMSProfileGeneric

    settings = parse_connection_string(req.connection_string)
    s = session_mod.MeterSession(settings, 10)
    s.open(time.monotonic() + 60)
    try:
        pg = GXDLMSProfileGeneric(req.obis)
        r = s._request(s.client.read(pg, 3), "capture objects", raw=False)
        s.client.updateValue(pg, 3, r.value)
        r = s._request(s.client.readRowsByRange(pg, req.dt_from, req.dt_to), "rows", raw=False)
        s.client.updateValue(pg, 2, r.value)
        codes = [str(c[0].logicalName) for c in pg.captureObjects]
        records = []
        for row in pg.buffer:
            when = format_datetime(row[0].value, "iso")
            for j in range(1, len(row)):
                records.append({"DateTime": when, "Code": codes[j], "Value": value_to_str(row[j])})
        reply = ok_reply(req.msg_id, records)
    finally:
        s.close()
    return reply["DataRecords"]


def with_gxnet(fn):
    def run(req):
        saved = link_mod.TcpMedia
        link_mod.TcpMedia = GxNetMedia
        try:
            return fn(req)
        finally:
            link_mod.TcpMedia = saved

    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reads", type=int, default=100, help="reads per one-day scenario")
    ap.add_argument("--quick", action="store_true", help="fewer reads (smoke run)")
    args = ap.parse_args()
    n1 = 10 if args.quick else args.reads
    n7 = max(3, n1 // 5)
    n31 = max(2, n1 // 10)
    with running_simulator(1) as sim:
        scenarios = [
            ("1 day, ours (own A-XDR decoder)", ours, 1, n1),
            ("1 day, stock Gurux updateValue", stock, 1, n1),
            ("1 day, ours over gurux-net GXNet", with_gxnet(ours), 1, n1),
            ("1 day, ours, pooled association", ours_pooled, 1, n1),
            ("7 days, ours", ours, 7, n7),
            ("7 days, stock Gurux", stock, 7, n7),
            ("31 days, ours", ours, 31, n31),
            ("31 days, stock Gurux", stock, 31, n31),
        ]
        cpu = {name: [] for name, *_ in scenarios}
        wall = {name: [] for name, *_ in scenarios}
        counts, first = {}, {}
        for name, fn, days, _n in scenarios:  # warm-up; every way must give the same records
            records = fn(request(sim.port, days))
            counts[name] = len(records)
            if days in first and records != first[days]:
                raise SystemExit(f"{name}: records differ from the first {days}-day scenario")
            first.setdefault(days, records)
        rounds = 5
        for _ in range(rounds):
            for name, fn, days, n in scenarios:
                req = request(sim.port, days)
                per = max(1, n // rounds)
                c0, w0 = time.process_time(), time.perf_counter()
                for _ in range(per):
                    fn(req)
                cpu[name].append((time.process_time() - c0) / per)
                wall[name].append((time.perf_counter() - w0) / per)
        _POOL.close_all()
    print(f"{'scenario':38} {'records':>8} {'CPU ms/read':>12} {'wall ms/read':>13}")
    for name, *_ in scenarios:
        c = statistics.median(cpu[name]) * 1000
        w = statistics.median(wall[name]) * 1000
        print(f"{name:38} {counts[name]:8d} {c:12.2f} {w:13.2f}")
    print("(median of 5 interleaved rounds; CPU = time.process_time of this client process)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
