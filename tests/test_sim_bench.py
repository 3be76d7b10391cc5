# SPDX-License-Identifier: GPL-2.0-or-later
"""bench/sim_bench.py runs end to end (small N) and prints its figures."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.integration


def test_sim_bench_small():
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "sim_bench.py"),
            "-N",
            "200",
            "--reads",
            "300",
            "--sessions",
            "50",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    ready = float(re.search(r"ready after\s+([\d.]+) s", r.stdout).group(1))
    rss = float(re.search(r"idle RSS\s+([\d.]+) MB", r.stdout).group(1))
    cpu = float(re.search(r"simulator CPU\s+([\d.]+) ms per read", r.stdout).group(1))
    assert 0 < ready < 30
    assert 0 < rss < 200
    assert 0 < cpu < 20  # generous: the machine is shared; the real figure is reported
    assert "300 x 96 rows" in r.stdout
    assert re.search(r"whole sessions\s+[\d.]+ ms", r.stdout)
