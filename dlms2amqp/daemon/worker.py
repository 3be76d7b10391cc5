# SPDX-License-Identifier: GPL-2.0-or-later
"""Worker process: runs meter sessions in threads, one meter at a time per meter key.

Real meters take seconds per round trip, so a worker keeps ``sessions`` blocking Gurux
sessions busy at once (threads); the GIL is released while they wait on sockets.  Two
requests for the same meter never overlap: the master routes a meter to one worker, and
here a per-meter queue runs them one after the other.

The worker knows nothing of AMQP.  It talks to the master over one duplex pipe, with
the typed messages of ``ipc``: it receives ``Job`` (a request and its connection settings,
parsed by the master), ``Reopen`` and ``Stop``; it sends ``Ready``, ``Heartbeat``,
``Started`` and ``Done`` (the reply with its status and error).

A heartbeat every second proves the worker is alive; the master kills a silent one.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import queue
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any, Optional

from .. import logsetup
from .. import reply as replymod
from ..limits import raise_open_files
from .ipc import (
    ClosePool,
    Done,
    Heartbeat,
    Job,
    PoolStats,
    Ready,
    Reopen,
    Started,
    Stop,
    WorkerSettings,
)

HEARTBEAT_SECONDS = 1.0


class _PipeOut:
    """Thread-safe sender that never blocks its callers (many session threads answer).

    Every message goes through one sender thread.  Were the main loop to write to the
    pipe itself, a full pipe in both directions would deadlock: the master blocked
    sending us jobs while we block sending it results and, in doing so, stop reading.
    Here the main loop only ever reads, so the master's sends always complete.
    What is queued is bounded by the master's prefetch.
    """

    def __init__(self, conn: Connection):
        self.conn = conn
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._pump, name="pipe-out", daemon=True)
        self.thread.start()

    def send(self, msg: Any) -> None:
        self.queue.put(msg)

    def _pump(self) -> None:
        while True:
            msg = self.queue.get()
            try:
                self.conn.send(msg)
            except (OSError, ValueError):
                # the master is gone: nobody can publish our results; stop at once
                os._exit(0)


def _make_pool(settings: WorkerSettings) -> Any:
    """The session layer's pool (bounded by the open-files limit), or None when off.

    Each pooled association holds a socket: the soft open-files limit is raised to the
    hard one first (systemd's default of 1024 would end in "Too many open files").
    """
    limit = raise_open_files()
    if settings.idle_timeout <= 0:
        return None
    from ..meter.pool import SessionPool

    # keep room for the running sessions, the pipe, logs and the state files
    room = max(0, limit - settings.sessions - 64)
    return SessionPool(idle_timeout=settings.idle_timeout, max_sessions=min(10000, room))


def _pool_stats(pool: Any) -> PoolStats:
    """Pool counters the master exports: reuses so far (``hits``) and idle sessions."""
    if pool is None:
        return PoolStats(resyncs=_resyncs())
    return PoolStats(
        hits=float(getattr(pool, "hits", 0)), idle=float(len(pool)), resyncs=_resyncs()
    )


def _resyncs() -> float:
    from ..meter import counters

    return float(counters.RESYNCS[0])


class Worker:
    def __init__(self, settings: WorkerSettings, conn: Connection):
        self.settings = settings
        self.conn = conn
        self.out = _PipeOut(conn)
        self.log = logsetup.get_logger("dlms2amqp.worker")
        self.options = settings.reader
        if self.options.trace:  # frames go to the worker's log (a sink is not pickled)
            tlog = logsetup.get_logger("dlms2amqp.trace")
            sink = lambda line: tlog.info("frame", frame=line)  # noqa: E731
            self.options = dataclasses.replace(self.options, trace_sink=sink)
        self.pool = _make_pool(settings)
        # Gurux loads here, before the worker reports ready, not in the first request:
        # that one would pay ~80 ms of imports (and the master has no use for them)
        from ..meter.reader import execute

        self.execute = execute
        self.executor = ThreadPoolExecutor(settings.sessions, thread_name_prefix="session")
        self.lock = threading.Lock()
        self.waiting: dict[str, collections.deque] = {}  # meter key -> queued jobs
        self.busy: set[str] = set()  # meter keys with a running session
        self.running = 0

    # --- per-meter serialisation ---------------------------------------------------
    def submit(self, job: Job) -> None:
        meter_key = job.settings.meter_key
        with self.lock:
            if meter_key in self.busy:
                self.waiting.setdefault(meter_key, collections.deque()).append(job)
                return
            self.busy.add(meter_key)
            self.running += 1
        self.executor.submit(self._run, job)

    def _next(self, meter_key: str) -> Optional[Job]:
        with self.lock:
            q = self.waiting.get(meter_key)
            if q:
                job = q.popleft()
                if not q:
                    del self.waiting[meter_key]
                return job
            self.busy.discard(meter_key)
            self.running -= 1
            return None

    def _run(self, first: Job) -> None:
        job: Optional[Job] = first
        while job is not None:
            self._execute(job)
            job = self._next(first.settings.meter_key)

    def _execute(self, job: Job) -> None:
        execute = self.execute
        request = job.request
        self.out.send(Started(job.job_id))
        t0 = time.monotonic()
        try:
            reply = execute(request, self.options, self.pool, settings=job.settings)
        except Exception as e:  # noqa: BLE001 - execute must not raise; never lose a reply
            self.log.exception("reader_crashed", msg_id=request.msg_id, error=type(e).__name__)
            reply = replymod.error_reply(
                request.msg_id, "Internal error in the gateway while reading the meter"
            )
        seconds = time.monotonic() - t0
        status = reply.get("Status", "notok")
        self.out.send(
            Done(
                job_id=job.job_id,
                reply_id=reply["MsgID"],
                body=replymod.dumps(reply),
                status=status,
                error="" if status == "ok" else str(reply.get("Error", "")),
                rows=len(reply.get("DataRecords") or ()),
                seconds=seconds,
                pool=_pool_stats(self.pool),
            )
        )

    # --- main loop -------------------------------------------------------------------
    def serve(self) -> None:
        self.out.send(Ready(os.getpid()))
        next_hb = 0.0
        while True:
            now = time.monotonic()
            if now >= next_hb:
                if self.pool is not None:
                    self.pool.close_idle()  # idle associations expire without traffic too
                self.out.send(Heartbeat(_pool_stats(self.pool)))
                next_hb = now + HEARTBEAT_SECONDS
            if not self.conn.poll(max(0.0, next_hb - time.monotonic())):
                continue
            msg = self.conn.recv()
            if isinstance(msg, Job):
                self.submit(msg)
            elif isinstance(msg, Reopen):
                logsetup.reopen()
            elif isinstance(msg, ClosePool):
                if self.pool is not None:
                    if msg.keys:
                        n = self.pool.close_keys(msg.keys)
                    else:
                        n = len(self.pool)
                        self.pool.close_all()
                    logsetup.get_logger("dlms2amqp.worker").info("pool_closed", sessions=n)
            elif isinstance(msg, Stop):
                self.stop()
                return

    def stop(self) -> None:
        """The master gave up on what is left (it was requeued): drop it, close the pool.

        Sessions still running are abandoned (the process exits; the OS closes their
        sockets): the master only sends ``Stop`` once the grace period is over.
        """
        with self.lock:
            self.waiting.clear()
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.pool is not None:
            try:
                self.pool.close_all()  # release idle associations politely
            except Exception:  # noqa: BLE001 - exiting anyway
                pass
        logsetup.get_logger("dlms2amqp.worker").info("worker_stopped", abandoned=self.running)
        os._exit(0)


def _die_with_master() -> None:
    """Linux: SIGKILL when the master dies (kill -9 too), so that no session outlives it.

    With several daemons, the broker hands a dead master's requests to another daemon at
    once; a worker finishing its read meanwhile would be a second association to the meter.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the master died before prctl
            os._exit(0)
    except (OSError, AttributeError):
        pass


def main(settings: WorkerSettings, conn: Connection) -> None:
    """Process entry point (spawned by the arbiter, ``workers.Arbiter``)."""
    # The master decides when we stop: a TERM or ^C to the process group must not kill
    # sessions half way; SIGHUP arrives as a "reopen" message.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _die_with_master()
    logsetup.configure(settings.debug_file, settings.log_level, process=f"worker{settings.index}")
    try:
        Worker(settings, conn).serve()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        # the master is gone: nobody can publish our results; stop at once
        os._exit(0)
