# SPDX-License-Identifier: GPL-2.0-or-later
"""``dlms2amqp-sim`` as a subprocess on a free port range, stopped afterwards.

    with running_simulator(3) as sim:      # meters on sim.port .. sim.port+2
        read(sim.host, sim.port + 1)

Used by the tests (through tests/helpers_sim.py, which re-exports it), the fault lab and
the benchmarks.  Keep the signature stable: other engineers' tests import it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from .ports import free_port_range

ROOT = Path(__file__).resolve().parent.parent
SIM_CMD = [sys.executable, "-m", "dlms2amqp.cli.sim"]


@dataclass
class SimInfo:
    port: int
    host: str
    proc: subprocess.Popen
    count: int = 1
    ready_line: str = ""
    stderr_lines: list[str] = field(default_factory=list)

    @property
    def last_port(self) -> int:
        return self.port + self.count - 1


@contextlib.contextmanager
def running_simulator(
    count: int = 1,
    *args: str,
    interface: str = "WRAPPER",
    host: str = "127.0.0.1",
    timeout: float = 60.0,
    port: Optional[int] = None,
    env: Optional[dict] = None,
) -> Iterator[SimInfo]:
    """Run ``dlms2amqp-sim -N count -i interface *args`` on a free port range."""
    last_err = ""
    for _attempt in range(5):
        first = port if port is not None else free_port_range(count, host)
        cmd = [*SIM_CMD, "-N", str(count), "-p", str(first), "-i", interface, "--host", host]
        cmd += list(args)
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env or dict(os.environ),
            cwd=str(ROOT),
        )
        info = SimInfo(first, host, proc, count)
        t = threading.Thread(target=_drain, args=(proc, info.stderr_lines), daemon=True)
        t.start()
        line = _read_ready(proc, timeout)
        if line is not None:
            info.ready_line = line
            try:
                yield info
            finally:
                _stop(proc)
            return
        _stop(proc)
        last_err = "".join(info.stderr_lines)[-2000:]
        if port is not None or "cannot listen" not in last_err:
            break
    raise RuntimeError(f"dlms2amqp-sim did not become ready: {last_err}")


def _drain(proc: subprocess.Popen, sink: list[str]) -> None:
    assert proc.stderr is not None
    for line in proc.stderr:
        if len(sink) < 10000:
            sink.append(line)


def _read_ready(proc: subprocess.Popen, timeout: float) -> Optional[str]:
    stdout = proc.stdout
    assert stdout is not None
    result: list[str] = []

    def reader() -> None:
        line = stdout.readline()
        result.append(line)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    t.join(timeout)
    deadline = time.monotonic() + 0.1
    while time.monotonic() < deadline and t.is_alive():
        time.sleep(0.01)
    if result and result[0].startswith("ready "):
        return result[0].strip()
    return None


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    for f in (proc.stdout, proc.stderr):
        if f is not None:
            try:
                f.close()
            except OSError:
                pass
