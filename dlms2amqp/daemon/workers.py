# SPDX-License-Identifier: GPL-2.0-or-later
"""The arbiter: the worker processes of the master, and their lives.

It spawns the workers (``spawn`` start method: no broker socket, no pika state inherited),
watches their pipes on the master's IOLoop, counts their heartbeats, kills a silent, a
hung or a never-ready one, replaces a dead one and hands its unfinished jobs back to the
master (which retries once or answers), halts the daemon after repeated boot failures,
and stops them in stages at the end (``Stop``, wait, SIGKILL).

Writes to a worker pipe go through one sender thread per worker: a pipe write blocks
while the worker is busy, and the event loop must never block.  Those threads touch no
other state.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Callable, Optional

from ..config import Config
from ..errors import GatewayError
from ..metrics import Metrics
from . import ipc
from .broker import IOLoop
from .worker import main as worker_main

HANG_MARGIN = 15.0  # seconds past RequestTimeout before a session counts as hung
BOOT_TIMEOUT = 60.0
BOOT_FAILURES_LIMIT = 3
STOP_WAIT = 5.0  # seconds the workers get to exit after Stop


@dataclass
class WorkerHandle:
    index: int
    proc: Any
    conn: Connection
    born: float
    outbox: queue.SimpleQueue  # messages for the sender thread (None ends it)
    ready: bool = False
    last_seen: float = 0.0
    jobs: dict[int, Optional[float]] = field(default_factory=dict)  # job id -> started at
    hung: set[int] = field(default_factory=set)
    kill_reason: Optional[str] = None
    pool_hits: float = 0.0
    pool_idle: float = 0.0


def _sender(conn: Connection, outbox: queue.SimpleQueue) -> None:
    """Write messages to one worker's pipe; ends on None or a dead pipe."""
    while True:
        msg = outbox.get()
        if msg is None:
            return
        try:
            conn.send(msg)
        except (OSError, ValueError):
            return  # dead worker: supervise() replaces it and re-sends its jobs


#: the master's handlers: a finished job; the jobs of a worker that died (id, hung)
OnDone = Callable[[ipc.Done], None]
OnOrphans = Callable[[list[tuple[int, bool]]], None]


class Arbiter:
    """``cfg.Workers`` worker processes, routed to by index."""

    def __init__(
        self,
        cfg: Config,
        ioloop: Any,
        metrics: Metrics,
        log: Any,
        on_done: OnDone,
        on_orphans: OnOrphans,
        on_error: Callable[[BaseException], None],
    ):
        self.cfg = cfg
        self.ioloop = ioloop
        self.metrics = metrics
        self.log = log
        self.on_done = on_done
        self.on_orphans = on_orphans
        self.on_error = on_error  # an exception while handling a worker message
        self.ctx = multiprocessing.get_context("spawn")
        self.workers: list[WorkerHandle] = []
        self.boot_failures = 0

    def __len__(self) -> int:
        return len(self.workers)

    @property
    def all_ready(self) -> bool:
        return all(w.ready for w in self.workers)

    def start(self) -> None:
        for i in range(self.cfg.Workers):
            self.spawn(i)

    def spawn(self, index: int) -> WorkerHandle:
        parent, child = self.ctx.Pipe(duplex=True)
        proc = self.ctx.Process(
            target=worker_main,
            args=(ipc.WorkerSettings.from_config(self.cfg, index), child),
            name=f"dlms2amqp-worker{index}",
            daemon=True,
        )
        proc.start()
        child.close()
        now = time.monotonic()
        w = WorkerHandle(index, proc, parent, born=now, outbox=queue.SimpleQueue(), last_seen=now)
        threading.Thread(
            target=_sender, args=(parent, w.outbox), name=f"to-worker{index}", daemon=True
        ).start()
        if index < len(self.workers):
            self.workers[index] = w
        else:
            self.workers.append(w)
        self.ioloop.add_handler(parent.fileno(), lambda _fd, _ev, w=w: self._drain(w), IOLoop.READ)
        self.log.info("worker_started", worker=index, pid=proc.pid)
        return w

    # --- messages to workers -----------------------------------------------------------
    def send(self, index: int, msg: ipc.ToWorker) -> None:
        """Queue a message for a worker (never blocks the event loop)."""
        self.workers[index].outbox.put(msg)

    def submit(self, index: int, job: ipc.Job) -> None:
        w = self.workers[index]
        w.jobs[job.job_id] = None
        w.outbox.put(job)

    def forget(self, index: int, job_id: int) -> None:
        """The master answered this job (the worker's result or an error)."""
        self.workers[index].jobs.pop(job_id, None)

    def broadcast(self, msg: ipc.ToWorker) -> None:
        for w in self.workers:
            w.outbox.put(msg)

    # --- messages from workers ---------------------------------------------------------
    def _drain(self, w: WorkerHandle) -> None:
        """The worker's pipe is readable: handle what it sent (bounded per wake-up)."""
        for _ in range(200):
            if w.conn.closed:
                return
            try:
                if not w.conn.poll():
                    return
                msg = w.conn.recv()
            except (EOFError, OSError):
                self._unwatch(w)  # dead worker: supervise() replaces it
                return
            try:
                self._on_message(w, msg)
            except Exception as e:  # noqa: BLE001 - the master decides
                self.on_error(e)

    def _on_message(self, w: WorkerHandle, msg: ipc.FromWorker) -> None:
        w.last_seen = time.monotonic()
        if isinstance(msg, ipc.Heartbeat):
            self._pool_stats(w, msg.pool)
        elif isinstance(msg, ipc.Ready):
            w.ready = True
            self.boot_failures = 0
        elif isinstance(msg, ipc.Started):
            if msg.job_id in w.jobs:
                w.jobs[msg.job_id] = time.monotonic()
        elif isinstance(msg, ipc.Done):
            self._pool_stats(w, msg.pool)
            if msg.job_id not in w.jobs:
                return  # answered already
            del w.jobs[msg.job_id]
            self.metrics.meter_session.observe(msg.seconds)
            self.on_done(msg)

    def _pool_stats(self, w: WorkerHandle, stats: ipc.PoolStats) -> None:
        """Pool counters of one worker -> the master's metrics (a new worker starts at 0)."""
        if stats.hits > w.pool_hits:  # stats from several threads may arrive out of order
            self.metrics.pool_hits.inc(stats.hits - w.pool_hits)
            w.pool_hits = stats.hits
        w.pool_idle = stats.idle
        self.metrics.pool_connections.set(sum(x.pool_idle for x in self.workers))

    # --- supervision -------------------------------------------------------------------
    def supervise(self) -> None:
        """Kill the silent, hung and never-ready; replace the dead (may raise GatewayError)."""
        now = time.monotonic()
        limit = self.cfg.RequestTimeout + HANG_MARGIN
        for w in list(self.workers):
            if w.proc.is_alive():
                if w.ready and now - w.last_seen > self.cfg.WorkerTimeout:
                    self.kill(w, "silent")
                elif not w.ready and now - w.born > BOOT_TIMEOUT:
                    self.kill(w, "boot_timeout")
                for jid, started in w.jobs.items():
                    if started is not None and now - started > limit:
                        w.hung.add(jid)
                        self.kill(w, "hung")
                continue
            self._replace(w)
        self.metrics.workers_alive.set(sum(1 for w in self.workers if w.proc.is_alive()))

    def kill(self, w: WorkerHandle, reason: str) -> None:
        if w.kill_reason is None:
            w.kill_reason = reason
            self.log.warning("worker_killed", worker=w.index, pid=w.proc.pid, reason=reason)
            try:
                os.kill(w.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _replace(self, w: WorkerHandle) -> None:
        w.proc.join(0.1)
        reason = w.kill_reason or f"exit_{w.proc.exitcode}"
        if not w.ready:
            self.boot_failures += 1
            if self.boot_failures >= BOOT_FAILURES_LIMIT:
                raise GatewayError(
                    f"Worker process failed to start {self.boot_failures} times "
                    f"(last exit code {w.proc.exitcode}); see the log file"
                )
        self.log.error(
            "worker_died", worker=w.index, pid=w.proc.pid, reason=reason, jobs=len(w.jobs)
        )
        self.metrics.worker_restarts.labels(reason=reason.split("_")[0]).inc()
        self._close_pipe(w)
        orphans = [(jid, jid in w.hung) for jid in sorted(w.jobs)]
        self.spawn(w.index)
        self.on_orphans(orphans)

    def _unwatch(self, w: WorkerHandle) -> None:
        try:
            self.ioloop.remove_handler(w.conn.fileno())
        except (KeyError, ValueError, OSError):
            pass

    def _close_pipe(self, w: WorkerHandle) -> None:
        w.outbox.put(None)
        if not w.conn.closed:
            self._unwatch(w)
            w.conn.close()

    # --- stop --------------------------------------------------------------------------
    def stop(self) -> None:
        """Staged stop: ``Stop`` to each, wait up to STOP_WAIT s, then SIGKILL."""
        self.broadcast(ipc.Stop())
        deadline = time.monotonic() + STOP_WAIT
        for w in self.workers:
            w.proc.join(max(0.1, deadline - time.monotonic()))
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(2)
