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


# --- finding 12: configuration warnings ------------------------------------------------
def _conf(tmp_path: Path, mode: int, **keys: Any) -> Path:
    p = tmp_path / "dlms2amqp.json"
    p.write_text(json.dumps(keys))
    p.chmod(mode)
    return p


def _warnings(path: Path) -> list[str]:
    from dlms2amqp.config import config_warnings, load_config

    return config_warnings(load_config(path))


def test_no_warning_for_a_safe_configuration(tmp_path: Path) -> None:
    pw = tmp_path / "broker.pw"
    pw.write_text("s3cret\n")
    pw.chmod(0o600)
    conf = _conf(tmp_path, 0o644, HostName="127.0.0.1", PasswordFile=str(pw))
    assert _warnings(conf) == []
    # an inline password in a file only its owner can read is fine too
    assert _warnings(_conf(tmp_path, 0o600, Password="s3cret")) == []
    # localhost and ::1 are loopback; a metrics endpoint that is off is no exposure
    assert _warnings(_conf(tmp_path, 0o600, HostName="localhost")) == []
    assert _warnings(_conf(tmp_path, 0o600, HostName="::1")) == []
    assert _warnings(_conf(tmp_path, 0o600, MetricsAddress="0.0.0.0", MetricsPort=0)) == []


def test_each_exposure_gives_its_warning(tmp_path: Path) -> None:
    # an inline Password in a world-readable file
    (w,) = _warnings(_conf(tmp_path, 0o644, Password="s3cret"))
    assert "Password" in w and "every user" in w and "s3cret" not in w
    # a PasswordFile readable by others
    pw = tmp_path / "broker.pw"
    pw.write_text("s3cret\n")
    pw.chmod(0o644)
    (w,) = _warnings(_conf(tmp_path, 0o600, PasswordFile=str(pw)))
    assert "PasswordFile" in w and "0600" in w and "s3cret" not in w
    # plain AMQP to a host that is not loopback (no name resolution needed)
    (w,) = _warnings(_conf(tmp_path, 0o600, HostName="rabbit.example.net"))
    assert "plain AMQP" in w and "Tls" in w
    assert _warnings(_conf(tmp_path, 0o600, HostName="rabbit.example.net", Tls=True)) == []
    # a metrics endpoint on every address
    (w,) = _warnings(_conf(tmp_path, 0o600, MetricsAddress="0.0.0.0"))
    assert "0.0.0.0:9640" in w and "MetricsAddress" in w


def test_check_config_and_start_print_the_warnings(
    tmp_path: Path, broker: Broker, run_daemon: Any
) -> None:
    # Given a world-readable file with the broker password inline and metrics on 0.0.0.0
    cfg = daemon_config(tmp_path, broker, MetricsAddress="0.0.0.0", Password="guest")
    path = write_config(tmp_path, cfg)
    path.chmod(0o644)
    # When it is checked
    r = subprocess.run(
        [sys.executable, "-m", "dlms2amqp.cli.daemon", "-c", str(path), "--check-config"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    # Then it is valid, with both warnings on stderr
    assert r.returncode == 0, r.stderr
    warns = [ln for ln in r.stderr.splitlines() if ln.startswith("dlms2amqpd: warning: ")]
    assert len(warns) == 2, r.stderr
    assert any("Password" in w for w in warns) and any("0.0.0.0" in w for w in warns)
    # And a daemon started with it logs them (event config_warning)
    d: Daemon = run_daemon(MetricsAddress="0.0.0.0", Password="guest")
    assert d.config_path.stat().st_mode & 0o004  # written world-readable (umask 022)
    logged = [e["warning"] for e in d.events("config_warning")]
    assert len(logged) == 2, d.output()
    assert any("0.0.0.0" in w for w in logged) and any("Password" in w for w in logged)
