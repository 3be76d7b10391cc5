# SPDX-License-Identifier: GPL-2.0-or-later
"""``dlms2amqpd`` as a subprocess: its config file, output, log, metrics and worker PIDs.

One wrapper for the daemon tests (tests/conftest.py), the fault lab (testing.faults) and
the load benchmark (bench/load.py).  The caller writes the configuration; ``start`` runs
``python -m dlms2amqp.cli.daemon -c CONFIG`` with stdout and stderr in ``output_path``.
With ``own_group`` the daemon leads its own process group, so ``stop`` and ``kill9`` can
take its orphaned workers down as a service manager would.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parent.parent
DAEMON_CMD = [sys.executable, "-m", "dlms2amqp.cli.daemon"]


class DaemonProcess:
    """The real daemon; ``cfg`` is what its config file holds (for queues, ports, paths)."""

    def __init__(
        self,
        config_path: Path,
        cfg: dict[str, Any],
        output_path: Optional[Path] = None,
        own_group: bool = False,
        cwd: Optional[Path] = None,
        command: Optional[list[str]] = None,
    ):
        self.config_path = config_path
        self.cfg = cfg
        self.output_path = output_path or config_path.with_suffix(".output.txt")
        self.own_group = own_group
        self.cwd = cwd or ROOT
        self.command = command or DAEMON_CMD  # the load benchmark may compare another build
        self.proc: Optional[subprocess.Popen] = None

    # --- life ------------------------------------------------------------------------------
    def start(self) -> DaemonProcess:
        out = open(self.output_path, "ab")  # noqa: SIM115 - the child holds it
        try:
            self.proc = subprocess.Popen(
                [*self.command, "-c", str(self.config_path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=self.own_group,
                cwd=self.cwd,
            )
        finally:
            out.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> Optional[int]:
        """The exit code once it exited (None while it runs or before it started)."""
        return self.proc.poll() if self.proc is not None else None

    def wait_consuming(
        self, consumers: Callable[[str], Optional[int]], queue: str = "", timeout: float = 60.0
    ) -> None:
        """Wait until ``consumers(InQueue)`` >= 1; raises with the output if it exits first."""
        queue = queue or self.cfg["InQueue"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                rc = self.proc.returncode if self.proc is not None else None
                raise AssertionError(f"dlms2amqpd exited with {rc}:\n{self.output(40)[-6000:]}")
            if consumers(queue):
                return
            time.sleep(0.2)
        raise AssertionError(
            f"dlms2amqpd not consuming {queue} after {timeout} s:\n{self.output(40)[-6000:]}"
        )

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait_exit(self, timeout: float) -> Optional[int]:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace: float = 40.0) -> Optional[int]:
        """SIGTERM, wait ``grace`` s, then SIGKILL (of the group if it has one)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self._kill_all()
                self.proc.wait(10)
        if self.own_group:
            self._kill_group()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the master and its workers (end of a test, whatever happened)."""
        workers = self.workers()
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(10)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.own_group:
            self._kill_group()

    def kill9(self) -> int:
        """SIGKILL the master only (workers notice their parent died); returns exit code."""
        assert self.proc is not None
        os.kill(self.pid, signal.SIGKILL)
        rc = self.proc.wait(10)
        # orphaned workers: a service manager would kill the whole unit; so do we
        time.sleep(0.5)
        self._kill_group()
        return rc

    def _kill_all(self) -> None:
        if self.own_group:
            self._kill_group()
        elif self.proc is not None:
            self.proc.kill()

    def _kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    # --- what it left --------------------------------------------------------------------
    def output(self, log_tail: int = 0) -> str:
        """stdout and stderr of every start (and the last ``log_tail`` lines of the log)."""
        text = ""
        with contextlib.suppress(OSError):
            text = self.output_path.read_text(errors="replace")
        if log_tail:
            text += "\n--- log tail ---\n" + "\n".join(self.log_lines()[-log_tail:])
        return text

    def log_text(self) -> str:
        try:
            return Path(self.cfg["DebugFile"]).read_text(errors="replace")
        except (OSError, KeyError):
            return ""

    def log_lines(self) -> list[str]:
        return self.log_text().splitlines()

    def events(self, name: Optional[str] = None) -> list[dict]:
        """The JSON log records (of one event name)."""
        out = []
        for line in self.log_lines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if name is None or ev.get("event") == name:
                out.append(ev)
        return out

    def workers(self) -> list[int]:
        """The worker processes (spawned children, not multiprocessing's resource tracker)."""
        if not self.alive():
            return []
        return [p for p in children_of(self.pid) if _is_worker(p)]

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.cfg['MetricsPort']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            return str(r.read().decode())

    def metric(self, name: str, labels: str = "") -> float:
        """Sum of a metric's samples (those whose labels start with ``labels``); 0 if none."""
        total = 0.0
        for line in self.metrics().splitlines():
            if line.startswith("#") or not line.startswith(name + ("{" + labels if labels else "")):
                continue
            key, _, value = line.rpartition(" ")
            if key.split("{")[0] == name:
                total += float(value)
        return total


def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
        except OSError:
            continue
        ppid = int(st[st.rindex(")") + 2 :].split()[1])
        if ppid == pid:
            out.append(int(d))
    return out


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _is_worker(pid: int) -> bool:
    return b"resource_tracker" not in _cmdline(pid)


def rss_kb(pids: Any) -> int:
    """Resident memory of these processes together, in KiB."""
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for ln in f:
                    if ln.startswith("VmRSS:"):
                        total += int(ln.split()[1])
        except OSError:
            pass
    return total
