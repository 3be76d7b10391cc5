#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Scale-out benchmark: the same N-meter read with one daemon and with two (issue 12).

It starts the private 3-node cluster (testing/cluster.py), N simulated meters, and runs
one READ per meter three times over unique queues:

- ``direct``: one daemon, Partitions 0 (the seed's path, the baseline);
- ``1 daemon``: one daemon, Partitions P (every request makes the partition hop);
- ``2 direct``: two daemons, Partitions 0, both consuming InQueue (safe here only because
  every request reads a meter of its own: it is what scale-out prevents);
- ``2 daemons``: two daemons, Partitions P;
- ``2 via exchange``: the same, the requests published straight to the partition exchange
  with the routing keys ``dlms2amqp-send`` computes (``partition_routes``): no move.

The hop of two daemons is compared with both: ``direct`` (what one host would cost) and
``2 direct`` (the same load split over two process trees, without the hop: the hop alone;
two processes at half the rate each pay their per-wake-up costs over fewer requests).

For each it prints reads/s (first publish to last reply) and the CPU time per read of
the daemons' processes (masters and workers, from /proc; the masters alone in brackets),
and the overhead per read of the partition hop against ``direct``.  On two cores expect
no speed-up from the second daemon: the figure to watch is the CPU per read of the hop
(the issue asks for < 15 %).  Every reply must be ok, or the run fails (exit 1).

Two rounds.  First each set-up reads as fast as it goes: the 3 broker nodes share the 2
cores with the daemons, the hop doubles the queue work of the cluster, so the partitioned
set-ups run at a lower rate on a saturated machine, and a process's CPU per read grows
when it runs slower on a busy machine (fewer requests per wake-up, more cache misses).
Then (``--rate``, default 300/s) the same read is offered at one rate to all three: the
difference is then the work of the hop itself.

Two runs of one set-up on this machine differ by up to 15 % (its neighbours), so each
round runs the three set-ups ``--repeat`` times, interleaved (direct, 1, 2, direct, 1,
2, ...), every queue of a set-up deleted after it (an idle quorum queue keeps costing the
cluster CPU); the overhead is computed against the direct run of the same repetition,
and the median of the repetitions is the figure.

    .venv/bin/python bench/scaleout_bench.py            # 10,000 meters, 3 repetitions
    .venv/bin/python bench/scaleout_bench.py -N 200 --rate 100 --repeat 1   # a quick proof
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import loadlib  # noqa: E402  (bench/, beside this script)

from dlms2amqp.cli.send import partition_routes  # noqa: E402
from dlms2amqp.config import build_config  # noqa: E402
from testing.cluster import Cluster  # noqa: E402
from testing.daemon import children_of  # noqa: E402
from testing.ports import free_port_range  # noqa: E402
from testing.scaleout import LOW, ScaleLab, replies_by_id  # noqa: E402
from testing.simulator import running_simulator  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
WARM = 200  # requests before each measurement


def cpu_seconds(pid: int, children: bool = True) -> float:
    """User + system CPU of a process and its live children (the workers)."""
    total = 0.0
    for p in [pid, *children_of(pid)] if children else [pid]:
        try:
            with open(f"/proc/{p}/stat") as f:
                st = f.read()
        except OSError:
            continue
        fields = st[st.rindex(")") + 2 :].split()
        total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


def run(
    cluster: Cluster,
    sim: Any,
    n: int,
    daemons: int,
    partitions: int,
    work: Path,
    rate: float = 0.0,
    via_exchange: bool = False,
) -> dict:
    lab = ScaleLab(cluster, work, None, partitions=partitions, IdleSessionTimeout=0)
    started = []
    try:
        for _ in range(daemons):
            over: dict[str, Any] = {"Workers": 2, "SessionsPerWorker": 32}
            if partitions == 0:
                over["Partitions"] = 0
                over["QueueType"] = "quorum"
            started.append(lab.start_daemon(**over))
        if partitions:  # (each start waited for that daemon's own "consuming")
            lab.wait_subscribed(daemons)
        col = lab.collector()
        if not col.ready.wait(60):
            raise SystemExit("collector did not start")
        # a warm-up, not measured, in every set-up: the first daemon takes every partition
        # and gives the excess away once requests flow (Balancer); measured after that,
        # the run holds no hand-over
        warm = [(f"w{k}", lab.request(f"w{k}", sim.port + k, LOW)) for k in range(min(n, WARM))]
        lab.publish(warm)
        if not col.wait_ids({m for m, _ in warm}, timeout=120):
            raise SystemExit("the warm-up got no replies")
        if partitions:
            lab.wait_balanced()
        reqs = [(f"b{k}", lab.request(f"b{k}", sim.port + k, LOW)) for k in range(n)]
        ids = {m for m, _ in reqs}
        nodes = [loadlib.find_listener_pid(n.port) for n in cluster.nodes]
        brokers = [p for p in nodes if p is not None]
        broker0 = sum(cpu_seconds(p, children=False) for p in brokers)
        cpu0 = sum(cpu_seconds(d.pid) for d in started)
        master0 = sum(cpu_seconds(d.pid, children=False) for d in started)
        routes = None
        if via_exchange:  # routed as dlms2amqp-send routes them, computed before the clock
            routes = partition_routes(build_config(lab.daemon_config(0)), reqs)
        t0 = time.monotonic()
        lab.publish(reqs, rate=rate, routes=routes)
        if not col.wait_ids(ids, timeout=max(300, n / 5) + (n / rate if rate else 0)):
            raise SystemExit(f"only {len(col.snapshot())} of {n} replies")
        wall = max(r.t for r in col.snapshot()) - t0
        cpu = sum(cpu_seconds(d.pid) for d in started) - cpu0
        master = sum(cpu_seconds(d.pid, children=False) for d in started) - master0
        broker = sum(cpu_seconds(p, children=False) for p in brokers) - broker0
        got = replies_by_id(col.snapshot(), lab.out_queue)
        bad = [i for i, r in got.items() if r[0]["Status"] != "ok"]
        col.stop()
        if bad:
            raise SystemExit(f"{len(bad)} replies not ok, e.g. {got[bad[0]][0]['Error']}")
        return {
            "reads_per_s": n / wall,
            "cpu_ms_per_read": 1000 * cpu / n,
            "master_ms_per_read": 1000 * master / n,
            "cluster_ms_per_read": 1000 * broker / n,
            "wall_s": wall,
        }
    finally:
        lab.stop_all()
        lab.delete_queues()  # idle quorum queues cost the cluster CPU in the next set-up


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-N", type=int, default=10000, help="meters (one read each)")
    ap.add_argument(
        "-P",
        type=int,
        default=4,
        help="Partitions (default 4: two per daemon; each is a quorum queue on the 3 nodes, "
        "so more cost the cluster CPU per request)",
    )
    ap.add_argument("--procs", type=int, default=2, help="simulator processes")
    ap.add_argument(
        "--rate",
        type=float,
        default=300.0,
        help="requests/s of the second round, offered alike to every set-up (0: no second "
        "round; default 300, under the slowest set-up's saturated rate here, 350-550/s)",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="repetitions of the three set-ups in each round, interleaved (median reported)",
    )
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="d2a-scalebench-"))
    cluster = Cluster()
    t0 = time.monotonic()
    cluster.start()
    print(f"cluster started in {time.monotonic() - t0:.1f} s", flush=True)
    results: dict[str, list[dict]] = {}
    try:
        # 10,000 ports do not fit the harness's default 20000..31000 beside the cluster's
        # ports (and RabbitMQ's 25672): search below the ephemeral range, as bench/load.py
        first = free_port_range(args.N, low=1025, high=32000)
        with running_simulator(args.N, "--procs", str(args.procs), port=first, timeout=300) as sim:
            plan = [
                ("direct", 1, 0, False),
                ("1 daemon", 1, args.P, False),
                ("2 direct", 2, 0, False),
                ("2 daemons", 2, args.P, False),
                ("2 via exchange", 2, args.P, True),
            ]
            rounds = [0.0] + ([args.rate] if args.rate > 0 else [])
            for rate in rounds:
                for k in range(args.repeat):
                    for name, daemons, parts, via in plan:
                        label = name if not rate else f"{name} @{rate:g}/s"
                        r = run(
                            cluster, sim, args.N, daemons, parts, work / f"{label}.{k}", rate, via
                        )
                        results.setdefault(label, []).append(r)
                        print(
                            f"{label:<22} #{k + 1} {args.N} reads: "
                            f"{r['reads_per_s']:8.1f} reads/s, "
                            f"{r['cpu_ms_per_read']:6.2f} ms CPU per read (masters "
                            f"{r['master_ms_per_read']:.2f}; the 3 broker nodes "
                            f"{r['cluster_ms_per_read']:.2f}) ({r['wall_s']:.1f} s)",
                            flush=True,
                        )
    finally:
        with contextlib.suppress(Exception):
            cluster.destroy()
    summary: dict[str, Any] = {}
    for label, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(
            f"median {label:<22} {med['reads_per_s']:8.1f} reads/s, {med['cpu_ms_per_read']:.2f} "
            f"ms CPU per read (masters {med['master_ms_per_read']:.2f}; the 3 broker nodes "
            f"{med['cluster_ms_per_read']:.2f})"
        )
    for rate in rounds:
        tail = "" if not rate else f" @{rate:g}/s"
        what = "as fast as each goes" if not rate else f"{rate:g} requests/s offered to each"
        for name, against in (
            ("1 daemon", "direct"),
            ("2 daemons", "direct"),
            ("2 daemons", "2 direct"),
            ("2 via exchange", "2 direct"),
        ):
            base = [r["cpu_ms_per_read"] for r in results[against + tail]]
            runs = [r["cpu_ms_per_read"] for r in results[name + tail]]
            extra = [100 * (c / b - 1) for c, b in zip(runs, base)]
            summary[f"{name} vs {against}{tail}"] = {
                "overhead_pct": extra,
                "median_pct": statistics.median(extra),
            }
            each = ", ".join(f"{e:+.1f}" for e in extra)
            print(
                f"partition hop overhead, {name} vs {against}, {what}: "
                f"{statistics.median(extra):+.1f} % CPU per read (median; each repetition "
                f"against its {against} run: {each} %)"
            )
    print(
        json.dumps(
            {"meters": args.N, "partitions": args.P, "runs": results, "overhead": summary},
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
