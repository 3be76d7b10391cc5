# SPDX-License-Identifier: GPL-2.0-or-later
"""Helpers of the load benchmark (``bench/load.py``).

Kept apart from the orchestration so that each piece is small: ports, process
accounting from ``/proc``, the pipelined AMQP publisher and the reply collector,
the expected-reply oracle built on ``dlms2amqp.simulator.model``, and the report
writers.  Nothing here is part of the gateway.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import pika
import pika.exceptions

BROKER_HOST = "127.0.0.1"
BROKER_PORT = 5672
BROKER_USER = "guest"
BROKER_PASSWORD = "guest"

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class BenchError(Exception):
    """A benchmark set-up step failed (simulator, daemon or broker not usable)."""


# --- /proc accounting ----------------------------------------------------------------------
def _read_stat(pid: int) -> Optional[tuple[int, int, float, int]]:
    """(ppid, rss_bytes, cpu_seconds, starttime) of a process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ')'
    rest = data[data.rindex(")") + 2 :].split()
    ppid = int(rest[1])
    utime, stime = int(rest[11]), int(rest[12])
    starttime = int(rest[19])
    rss_pages = int(rest[21])
    return ppid, rss_pages * PAGE_SIZE, (utime + stime) / CLK_TCK, starttime


def _all_pids() -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (one scan of /proc)."""
    parent: dict[int, int] = {}
    for pid in _all_pids():
        st = _read_stat(pid)
        if st is not None:
            parent[pid] = st[0]
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if pid in parent or pid == root:
            out.append(pid)
            todo.extend(children.get(pid, ()))
    return out


def find_listener_pid(port: int) -> Optional[int]:
    """The process listening on TCP ``port`` (e.g. the broker on 5672).

    Several RabbitMQ nodes may run here (fault tests start their own), so the broker is
    found by its listening socket rather than by name.
    """
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(parts[9])
        except OSError:
            continue
    if not inodes:
        return None
    targets = {f"socket:[{i}]" for i in inodes}
    for pid in _all_pids():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in targets:
                    return pid
            except OSError:
                continue
    return None


def find_pid_by_comm(name: str) -> Optional[int]:
    """The first process whose command name is ``name`` (e.g. RabbitMQ's ``beam.smp``)."""
    for pid in _all_pids():
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == name:
                    return pid
        except OSError:
            continue
    return None


class ProcGroup:
    """CPU and RSS of one process tree, robust to children that come and go.

    CPU is the sum of the last seen utime+stime of every process ever seen in the
    tree (keyed by pid and start time, so a recycled pid is a new process).
    """

    def __init__(self, name: str, root: Optional[int], tree: bool = True):
        self.name = name
        self.root = root
        self.tree = tree  # False: the root process alone (the daemon's master)
        self._cpu: dict[tuple[int, int], float] = {}
        self.peak_rss = 0
        self.last_rss = 0

    def sample(self) -> None:
        if self.root is None:
            return
        rss = 0
        for pid in process_tree(self.root) if self.tree else [self.root]:
            st = _read_stat(pid)
            if st is None:
                continue
            _, rss_b, cpu, start = st
            self._cpu[(pid, start)] = cpu
            rss += rss_b
        self.last_rss = rss
        self.peak_rss = max(self.peak_rss, rss)

    def cpu(self) -> float:
        return sum(self._cpu.values())

    def reset_peak(self) -> None:
        self.peak_rss = self.last_rss


class Sampler:
    """Samples process groups in a thread (default every 0.5 s) for peak RSS and CPU."""

    def __init__(self, groups: Sequence[ProcGroup], interval: float = 0.5):
        self.groups = list(groups)
        self.interval = interval
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        with self._lock:
            for g in self.groups:
                g.sample()

    def snapshot(self) -> dict[str, float]:
        """Sample now and return CPU seconds per group."""
        self.sample()
        with self._lock:
            return {g.name: g.cpu() for g in self.groups}

    def reset_peaks(self) -> None:
        with self._lock:
            for g in self.groups:
                g.reset_peak()

    def peaks(self) -> dict[str, int]:
        with self._lock:
            return {g.name: g.peak_rss for g in self.groups}

    def __enter__(self) -> Sampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


# --- child processes -----------------------------------------------------------------------
def venv_bin(name: str) -> str:
    """Path of a console script installed beside the running interpreter."""
    cand = Path(sys.executable).with_name(name)
    return str(cand) if cand.exists() else name


@dataclass
class Child:
    """A process the benchmark started; stopped with SIGTERM, then SIGKILL."""

    name: str
    proc: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, nbytes: int = 2000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-nbytes:].decode("utf-8", "replace")

    def stop(self, grace: float = 15.0) -> Optional[int]:
        """Stop the whole process group; returns the exit code."""
        if self.proc.poll() is None:
            # the master stops its own children; the group is killed only if it does not
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        # leftovers of the group (workers of a master that died first)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode


def start_child(name: str, argv: list[str], log_path: Path) -> Child:
    """Start ``argv`` in its own process group, stdout+stderr to ``log_path``."""
    log = open(log_path, "wb")  # noqa: SIM115 - the child owns it
    try:
        proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        log.close()
    return Child(name, proc, log_path)


def wait_for_log(child: Child, pattern: str, timeout: float) -> re.Match:
    """Wait until ``pattern`` appears in the child's output (e.g. the simulator's ready line)."""
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = rx.search(child.log_tail(1 << 20))
        if m:
            return m
        if not child.alive():
            raise BenchError(
                f"{child.name} exited with {child.proc.returncode} before it was ready:\n"
                + child.log_tail()
            )
        time.sleep(0.1)
    raise BenchError(f"{child.name} not ready after {timeout:.0f} s:\n" + child.log_tail())


# --- broker ----------------------------------------------------------------------------------
def broker_params(heartbeat: int = 60) -> pika.ConnectionParameters:
    return pika.ConnectionParameters(
        BROKER_HOST,
        BROKER_PORT,
        "/",
        pika.PlainCredentials(BROKER_USER, BROKER_PASSWORD),
        heartbeat=heartbeat,
        blocked_connection_timeout=300,
    )


def queue_consumers(name: str) -> Optional[int]:
    """Consumer count of queue ``name``, or None when it does not exist."""
    conn = pika.BlockingConnection(broker_params())
    try:
        ch = conn.channel()
        try:
            ok = ch.queue_declare(name, passive=True)
        except pika.exceptions.ChannelClosedByBroker:
            return None
        return ok.method.consumer_count
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def delete_queues(names: Iterable[str], exchanges: Iterable[str] = ()) -> None:
    """Delete benchmark queues and exchanges; missing ones are fine."""
    conn = pika.BlockingConnection(broker_params())
    try:
        for n in names:
            ch = conn.channel()
            with contextlib.suppress(pika.exceptions.ChannelClosedByBroker):
                ch.queue_delete(n)
            with contextlib.suppress(Exception):
                ch.close()
        for x in exchanges:
            ch = conn.channel()
            with contextlib.suppress(pika.exceptions.ChannelClosedByBroker):
                ch.exchange_delete(x)
            with contextlib.suppress(Exception):
                ch.close()
    finally:
        with contextlib.suppress(Exception):
            conn.close()


# --- statistics ------------------------------------------------------------------------------
def percentile(values: Sequence[float], p: float) -> Optional[float]:
    """Nearest-rank percentile (p in 0..100) of ``values``; None when empty."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def utc_day_start(days_back: int) -> datetime:
    """Midnight UTC ``days_back`` days before today (reads ranges that are fully past)."""
    now = datetime.now(timezone.utc)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return datetime.fromtimestamp(day.timestamp() - 86400 * days_back, timezone.utc)


@dataclass
class RunStats:
    """Everything one scenario measured (serialised into the JSON result)."""

    name: str
    requests: int = 0
    ok: int = 0
    notok: int = 0
    wrong: int = 0
    lost: int = 0
    duplicates: int = 0
    publish_failed: int = 0
    wall_s: float = 0.0
    reads_per_s: float = 0.0
    latency_p50_s: Optional[float] = None
    latency_p95_s: Optional[float] = None
    latency_p99_s: Optional[float] = None
    cpu_s: dict[str, float] = field(default_factory=dict)
    cpu_ms_per_read: dict[str, Optional[float]] = field(default_factory=dict)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    notok_examples: list[str] = field(default_factory=list)
    wrong_examples: list[str] = field(default_factory=list)
    # time series for the chart (seconds since first send)
    reply_times: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d.pop("reply_times")
        d.pop("latencies")
        return d


def fmt(v: Optional[float], digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
