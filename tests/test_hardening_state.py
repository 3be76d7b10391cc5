# SPDX-License-Identifier: GPL-2.0-or-later
"""Issue 11, the state and start-up findings, against the real daemon and broker:
a second daemon on a metrics port in use (7), state files and the HMAC key of the reply
store (8), configuration warnings (12).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .conftest import ROOT, Broker, Daemon, daemon_config, write_config


def status_req(msg_id: str) -> bytes:
    """A request the daemon answers without a meter (unknown command): proves it serves."""
    return json.dumps({"MsgID": msg_id, "Cmd": "STATUS", "ObisCode": "1.0.1.8.0.255"}).encode()


def test_second_daemon_on_the_same_metrics_port_exits_78_before_spawning(
    run_daemon: Any, broker: Broker, tmp_path: Path
) -> None:
    # Given a daemon serving, with its metrics endpoint up
    first: Daemon = run_daemon()
    inq, outq = first.cfg["InQueue"], first.cfg["OutQueue"]
    assert first.metric("dlms2amqp_workers_alive") == 2
    broker.publish(inq, status_req("before"))
    assert len(broker.get_all(outq, 1, timeout=30)) == 1
    # When a second daemon starts with the same MetricsPort (and the same queues)
    second_dir = tmp_path / "second"
    second_dir.mkdir()
    cfg2 = daemon_config(
        second_dir,
        broker,
        MetricsPort=first.cfg["MetricsPort"],
        InQueue=inq,
        OutQueue=outq,
        DebugFile="",  # everything on stderr: the test sees all it prints
    )
    path2 = write_config(second_dir, cfg2)
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "dlms2amqp.cli.daemon", "-c", str(path2)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    took = time.monotonic() - t0
    # Then it stops at once with the configuration exit code and one plain line, no traceback
    assert r.returncode == 78, r.stderr
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    plain = [ln for ln in r.stderr.splitlines() if ln.startswith("dlms2amqpd: ")]
    assert len(plain) == 1, r.stderr
    assert f"MetricsPort {first.cfg['MetricsPort']}" in plain[0] and "in use" in plain[0]
    # And it spawned no worker and never consumed
    assert "worker_started" not in r.stderr and "workers_ready" not in r.stderr, r.stderr
    assert took < 30, took
    # And the first daemon goes on serving: nothing lost
    assert first.alive()
    assert broker.consumers(inq) == 1
    for i in range(5):
        broker.publish(inq, status_req(f"after-{i}"))
    got = broker.replies(outq, 5, timeout=30)
    assert sorted(g["InMsgID"] for g in got) == [f"after-{i}" for i in range(5)]
    assert first.metric("dlms2amqp_workers_alive") == 2
