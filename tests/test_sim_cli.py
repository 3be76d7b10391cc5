# SPDX-License-Identifier: GPL-2.0-or-later
"""The ``dlms2amqp-sim`` process: ready line, ports, signals, start errors."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from tests.helpers_sim import SIM_CMD, free_port_range, running_simulator

pytestmark = pytest.mark.integration


def test_ready_line_every_port_listens_and_sigterm_exits_0():
    with running_simulator(50) as sim:
        assert sim.ready_line == f"ready 50 meters on {sim.port}-{sim.port + 49}"
        for p in (sim.port, sim.port + 25, sim.port + 49):
            socket.create_connection((sim.host, p), timeout=5).close()
        sim.proc.send_signal(signal.SIGTERM)
        assert sim.proc.wait(15) == 0


def test_sigint_exits_0():
    with running_simulator(1) as sim:
        sim.proc.send_signal(signal.SIGINT)
        assert sim.proc.wait(15) == 0


def test_busy_port_is_a_clear_error():
    first = free_port_range(3)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", first + 1))
    blocker.listen(1)
    try:
        r = subprocess.run(
            [*SIM_CMD, "-N", "3", "-p", str(first)], capture_output=True, text=True, timeout=30
        )
    finally:
        blocker.close()
    assert r.returncode == 1
    assert f"cannot listen on 127.0.0.1:{first + 1}" in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_arguments():
    r = subprocess.run([*SIM_CMD, "--silent", "2"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "between 0 and 1" in r.stderr
    r = subprocess.run([sys.executable, "-m", "dlms2amqp.cli.sim", "-p", "65535", "-N", "2"],
                       capture_output=True, text=True, timeout=30)  # fmt: skip
    assert r.returncode == 2 and "65535" in r.stderr


@pytest.mark.skipif(
    shutil.which("prlimit") is None or shutil.which("setpriv") is None or os.geteuid() != 0,
    reason="needs prlimit, setpriv and root to run as an unprivileged user",
)
def test_open_files_limit_raised_or_explained():
    first = free_port_range(500)
    base = [*SIM_CMD, "-N", "500", "-p", str(first)]
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    # Given a hard limit too low for 500 meters, an unprivileged simulator says what to set
    r = subprocess.run(
        ["prlimit", "--nofile=100:100", *nobody, *base], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 1
    assert "756 open files are needed" in r.stderr and "ulimit -n 756" in r.stderr
    # Given room under the hard limit, it raises the soft limit itself and starts
    with subprocess.Popen(
        ["prlimit", "--nofile=100:4096", *nobody, *base], stdout=subprocess.PIPE, text=True
    ) as p:
        try:
            assert p.stdout.readline().startswith("ready 500 meters")
        finally:
            p.send_signal(signal.SIGTERM)
            assert p.wait(15) == 0


def test_verbose_trace_never_shows_the_password():
    with running_simulator(1, "-t", "Verbose", "-P", "s3cr3t-pw") as sim:
        from gurux_dlms import GXDLMSException

        from tests.helpers_sim import GuruxMeter, gurux_client

        with GuruxMeter(gurux_client(32, password="s3cr3t-pw"), sim.host, sim.port) as m:
            m.connect()
            m.release()
        with GuruxMeter(gurux_client(32, password="wrong-pw"), sim.host, sim.port) as m:
            with pytest.raises(GXDLMSException):
                m.connect()
        sim.proc.send_signal(signal.SIGTERM)
        sim.proc.wait(15)
    log = "".join(sim.stderr_lines)
    assert "AARQ" in log and "association rejected: wrong password" in log
    assert "s3cr3t" not in log and "wrong-pw" not in log
    assert "73336372" not in log  # nor in hex


def test_procs_child_failure_is_reported():
    first = free_port_range(6)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", first + 4))
    blocker.listen(1)
    try:
        r = subprocess.run(
            [*SIM_CMD, "-N", "6", "-p", str(first), "--procs", "2"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        blocker.close()
    assert r.returncode == 1
    assert f"cannot listen on 127.0.0.1:{first + 4}" in r.stderr
    assert "ready" not in r.stdout
