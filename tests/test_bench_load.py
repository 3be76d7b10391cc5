# SPDX-License-Identifier: GPL-2.0-or-later
"""The load benchmark (bench/load.py), end to end in quick mode, and its oracle.

The benchmark's speed targets are not asserted here (the machine is shared and noisy);
what is asserted is what must never happen: a lost request or a wrong value.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOAD = ROOT / "bench" / "load.py"


def _load_module():
    sys.path.insert(0, str(LOAD.parent))
    spec = importlib.util.spec_from_file_location("bench_load", LOAD)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_load"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _good_reply(load, k: int, spec) -> dict:
    """A reply built straight from the documented data model (what the daemon must send)."""
    records = []
    start, end = int(spec.dt_from.timestamp()), int(spec.dt_to.timestamp())
    for row in load.model.load_profile_rows(k, start, end):
        t = datetime.fromtimestamp(row[0], timezone.utc)
        for code, value in zip(load.PROFILE_COLUMNS, row[1:]):
            records.append({"DateTime": t.isoformat(), "Code": code, "Value": str(value)})
    return {"InMsgID": "x", "MsgID": "y", "Status": "ok", "Error": "", "DataRecords": records}


def test_oracle_accepts_the_model_and_rejects_one_wrong_value():
    # Given a one-day read of meter 7 and the reply the data model prescribes
    load = _load_module()
    start = datetime(2026, 11, 20, tzinfo=timezone.utc)
    spec = load.ReadSpec(load.PROFILE_OBIS, "WRAPPER", start, start + timedelta(days=1))
    oracle = load.Oracle(spec)
    reply = _good_reply(load, 7, spec)
    assert len(reply["DataRecords"]) == 97 * 3  # both ends of the range are included
    # Then it is accepted for meter 7 and refused for meter 8
    assert oracle.check(7, reply) is None
    assert oracle.check(8, reply) is not None
    # When one value is off by one, or a record is missing, it is refused with the reason
    bad = json.loads(json.dumps(reply))
    bad["DataRecords"][4]["Value"] = str(int(bad["DataRecords"][4]["Value"]) + 1)
    assert "wrong values" in oracle.check(7, bad)
    short = json.loads(json.dumps(reply))
    del short["DataRecords"][-1]
    assert "missing" in oracle.check(7, short)


@pytest.mark.integration
def test_quick_load_run_loses_nothing_and_every_value_is_right(tmp_path):
    # Given the simulator, the daemon and the local broker, started by the benchmark itself
    # When the quick benchmark runs (300 meters, one READ each, plus the ceiling loop)
    proc = subprocess.run(
        [sys.executable, str(LOAD), "--quick", "--ceiling", "--results-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout[-4000:] + "\n" + proc.stderr[-4000:]
    # Then it exits 0 (no wrong value, nothing lost) and its results say so
    assert proc.returncode == 0, out
    [result] = tmp_path.glob("load-*-quick.json")
    data = json.loads(result.read_text())
    for name in ("main", "ceiling"):
        run = data["runs"][name]
        assert run["requests"] == 300, (name, out)
        assert run["lost"] == 0 and run["wrong"] == 0, (name, run)
        assert run["ok"] == 300, (name, run["notok_examples"])
    assert data["runs"]["main"]["duplicates"] == 0
    assert data["runs"]["main"]["reads_per_s"] > 0
    assert data["runs"]["main"]["cpu_ms_per_read"]["daemon"] > 0
    assert result.with_suffix(".md").read_text().startswith("# Load benchmark")
    assert {t["result"] for t in data["targets"]} <= {"PASS", "MISS", "n/a"}
