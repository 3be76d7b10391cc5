#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Run the fault scenarios of testing/faults/ and print the table.

    .venv/bin/python bench/faults_report.py            # everything (~6 min here)
    .venv/bin/python bench/faults_report.py --only kill --only cut

Columns: fault, requests sent, replies, dead-lettered, lost, duplicates (identical and
divergent bodies), meter sessions repeated (a meter that answered a read in two sessions
for the same request id).  The goal: zero lost and zero divergent on every row.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testing import faults as faultlib  # noqa: E402
from testing.faults import SCENARIOS, Lab, format_table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", action="append", default=[], help="run scenarios whose name has this")
    p.add_argument("--flood-seconds", type=float, default=40.0)
    p.add_argument("--flood-total", type=int, default=100_000)
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = p.parse_args(argv)

    def wanted(name: str) -> bool:
        return not args.only or any(o.lower() in name.lower() for o in args.only)

    work = Path(tempfile.mkdtemp(prefix="d2a-faults-"))
    results = []
    t0 = time.monotonic()
    with Lab(work) as lab:
        print(f"private broker node started in {lab.node.start_seconds:.1f} s", flush=True)
        for name, spec in SCENARIOS.items():
            if wanted(name):
                results.append(
                    lab.run(
                        name,
                        spec["fault"],
                        via_proxy=spec.get("via_proxy", False),
                        allow_repeats=spec.get("allow_repeats", False),
                        config=spec.get("config"),
                        spare_meters=spec.get("spare_meters", 0),
                    )
                )
                print(results[-1].summary(), flush=True)
        if wanted("meter faults"):
            results += faultlib.scenario_meter_faults(lab)
        if wanted("bad-request corpus"):
            results.append(faultlib.scenario_bad_requests(lab))
        if wanted("flood 100k"):
            results.append(
                faultlib.scenario_flood(lab, total=args.flood_total, seconds=args.flood_seconds)
            )
        for qt in ("classic", "quorum"):
            if wanted(f"delivery limit ({qt})"):
                results.append(faultlib.scenario_delivery_limit(lab, qt))
        if wanted("poison"):
            results.append(faultlib.scenario_poison_worker_crash(lab))
        if wanted("cipher"):
            results.append(faultlib.scenario_cipher_kill(lab))
        if wanted("broker TLS"):
            results.append(faultlib.scenario_tls(lab))
        for r in results[-8:]:
            print(r.summary(), flush=True)
        print()
        print(format_table(lab.rows))
    print(f"\n{len(results)} scenarios in {time.monotonic() - t0:.0f} s; work dir {work}")
    bad = [r for r in results if r.problems or r.leaks or r.row.lost or r.row.duplicated_divergent]
    for r in bad:
        print("FAILED:", r.summary())
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
