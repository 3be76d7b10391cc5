# SPDX-License-Identifier: GPL-2.0-or-later
"""The master: owns the only broker connection, routes requests to workers, supervises.

Data flows one way: delivery -> (reply store hit? answer it) -> parse -> worker (by meter
key) -> result -> store -> publish with confirm -> ack.  Everything here runs in one
thread, on one pika IOLoop: the broker connection (SelectConnection), the worker pipes
(``add_handler`` on their file descriptors) and a periodic tick (signals, supervision,
stop).  We chose this over a BlockingConnection plus a result thread handing results over
with ``add_callback_threadsafe``: one thread owning all master state needs no locks, a
worker result wakes the loop at once, and publisher confirms are pipelined (a blocking
publish that waits for its own confirm managed ~580 replies/s here).  The only other
threads are one sender per worker, which write queued messages to that worker's pipe (a
pipe write blocks while the worker is busy) and touch no other state.  Signal handlers
only queue the signal; the tick handles it (gunicorn style).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import threading
import time
import zlib
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Optional

import orjson
import pika
import pika.adapters.select_connection

from .. import logsetup
from .. import reply as replymod
from ..config import Config
from ..errors import BrokerError, ConfigError, GatewayError
from ..metrics import Metrics
from . import amqp
from .replystore import ReplyStore, request_key
from .worker import WorkerSettings
from .worker import main as worker_main

IOLoop = pika.adapters.select_connection.IOLoop

TICK_SECONDS = 0.1
SUPERVISE_SECONDS = 0.5
HANG_MARGIN = 15.0  # seconds past RequestTimeout before a session counts as hung
BOOT_TIMEOUT = 60.0
BOOT_FAILURES_LIMIT = 3
REASON_HEADER = "x-dlms2amqp-reason"

EXIT_OK = 0
EXIT_CONFIG = 78  # EX_CONFIG
EXIT_WORKER_BOOT = 3


@dataclass
class Delivery:
    gen: int  # connection generation; tags of older generations are void
    tag: int
    reply_to: Optional[str]


@dataclass
class Job:
    job_id: int
    key: str
    msg_id: str
    request: Any
    meter_key: str
    endpoint: str
    cmd: str
    worker: int
    t0: float
    deliveries: list[Delivery] = field(default_factory=list)
    attempts: int = 1
    started: Optional[float] = None
    hung: bool = False


@dataclass
class WorkerHandle:
    index: int
    proc: Any
    conn: Connection
    born: float
    ready: bool = False
    last_seen: float = 0.0
    jobs: set[int] = field(default_factory=set)
    kill_reason: Optional[str] = None
    pool_hits: float = 0.0
    pool_idle: float = 0.0
    outbox: Any = None  # queue.SimpleQueue of messages for the sender thread


def _sender(conn: Connection, outbox: Any) -> None:
    """Write messages to one worker's pipe.

    A pipe write blocks while the worker (busy with its session threads) has not read the
    previous ones; doing it here keeps the event loop free.  Ends on None or a dead pipe.
    """
    while True:
        msg = outbox.get()
        if msg is None:
            return
        try:
            conn.send(msg)
        except (OSError, ValueError):
            return  # dead worker: supervise() replaces it and re-sends its jobs


class Supervisor:
    def __init__(self, cfg: Config, metrics: Optional[Metrics] = None):
        self.cfg = cfg
        self.metrics = metrics or Metrics()
        self.log = logsetup.get_logger("dlms2amqp.master")
        self.ctx = multiprocessing.get_context("spawn")
        self.store = ReplyStore(cfg.state_dir / "replies.sqlite3", cfg.ReplyStoreSize)
        self.workers: list[WorkerHandle] = []
        self.jobs: dict[int, Job] = {}
        self.by_key: dict[str, int] = {}
        self.next_job = 1
        self.signals: list[int] = []
        self.ioloop = IOLoop()
        self.connection_name = f"dlms2amqpd {cfg.InQueue} pid {os.getpid()}"
        # broker state
        self.conn: Any = None
        self.ch: Any = None
        self.consumer_tag: Optional[str] = None
        self.ready = False  # consuming on the current channel
        self.gen = 0  # channel generation; delivery tags of older ones are void
        self.unacked = 0
        self.failures = 0
        self.reconnect_timer: Any = None
        self.pub_seq = 0
        self.confirms: dict[int, tuple[Any, Any, Optional[str]]] = {}
        self.returned: set[str] = set()
        # life cycle
        self.started_consuming = False
        self.last_supervise = 0.0
        self.last_tick = 0.0
        self.rx_bytes = -1  # broker bytes received, and when they last changed
        self.rx_seen_at = 0.0
        self.stopping = False
        self.closing = False
        self.stop_deadline = 0.0
        self.boot_failures = 0
        self.fatal: Optional[GatewayError] = None

    # --- signals -------------------------------------------------------------------------
    def install_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda s, _f: self.signals.append(s))

    def handle_signals(self) -> None:
        while self.signals:
            sig = self.signals.pop(0)
            if sig == signal.SIGHUP:
                logsetup.reopen()
                for w in self.workers:
                    self._send(w, ("reopen",))
                self.log.info("log_reopened")
            elif not self.stopping:
                self.begin_stop(signal.Signals(sig).name)
            else:
                # a second TERM/INT: do not wait for the grace period, requeue what is left
                self.log.warning("stop_now", signal=signal.Signals(sig).name)
                self.stop_deadline = 0.0

    # --- workers -------------------------------------------------------------------------
    def _settings(self, index: int) -> WorkerSettings:
        c = self.cfg
        return WorkerSettings(
            index=index,
            sessions=c.SessionsPerWorker,
            request_timeout=c.RequestTimeout,
            frame_timeout=c.FrameTimeout,
            idle_timeout=c.IdleSessionTimeout,
            state_dir=c.state_dir,
            datetime_format=c.DateTimeFormat,
            trace=c.Trace,
            debug_file=c.debug_file,
            log_level=c.LogLevel,
        )

    def spawn(self, index: int) -> WorkerHandle:
        parent, child = self.ctx.Pipe(duplex=True)
        proc = self.ctx.Process(
            target=worker_main,
            args=(self._settings(index), child),
            name=f"dlms2amqp-worker{index}",
            daemon=True,
        )
        proc.start()
        child.close()
        now = time.monotonic()
        w = WorkerHandle(index, proc, parent, born=now, last_seen=now)
        w.outbox = queue.SimpleQueue()
        threading.Thread(
            target=_sender, args=(parent, w.outbox), name=f"to-worker{index}", daemon=True
        ).start()
        if index < len(self.workers):
            self.workers[index] = w
        else:
            self.workers.append(w)
        self.ioloop.add_handler(
            parent.fileno(), lambda _fd, _ev, w=w: self.drain_worker(w), IOLoop.READ
        )
        self.log.info("worker_started", worker=index, pid=proc.pid)
        return w

    def _send(self, w: WorkerHandle, msg: tuple) -> None:
        """Queue a message for the worker (never blocks the event loop)."""
        w.outbox.put(msg)

    def kill(self, w: WorkerHandle, reason: str) -> None:
        if w.kill_reason is None:
            w.kill_reason = reason
            self.log.warning("worker_killed", worker=w.index, pid=w.proc.pid, reason=reason)
            try:
                os.kill(w.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def supervise(self) -> None:
        now = time.monotonic()
        for w in list(self.workers):
            if w.proc.is_alive():
                if w.ready and now - w.last_seen > self.cfg.WorkerTimeout:
                    self.kill(w, "silent")
                elif not w.ready and now - w.born > BOOT_TIMEOUT:
                    self.kill(w, "boot_timeout")
                for jid in w.jobs:
                    job = self.jobs[jid]
                    limit = self.cfg.RequestTimeout + HANG_MARGIN
                    if job.started is not None and now - job.started > limit:
                        job.hung = True
                        self.kill(w, "hung")
                continue
            self._replace(w)
        self.metrics.workers_alive.set(sum(1 for w in self.workers if w.proc.is_alive()))

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
        orphans = [self.jobs[j] for j in sorted(w.jobs)]
        nw = self.spawn(w.index)
        for job in orphans:
            if job.hung:
                self.complete_error(
                    job,
                    f"The meter did not answer within {self.cfg.RequestTimeout:g} s; the "
                    "session was stopped",
                )
            elif job.attempts >= 2:
                self.complete_error(
                    job,
                    "The worker process reading this meter stopped twice during this "
                    "request; it was not retried again",
                )
            else:
                job.attempts += 1
                job.started = None
                nw.jobs.add(job.job_id)
                self._send(nw, ("job", job.job_id, job.request, job.meter_key))
                self.log.warning("request_retried", msg_id=job.msg_id, endpoint=job.endpoint)

    def _close_pipe(self, w: WorkerHandle) -> None:
        w.outbox.put(None)
        if not w.conn.closed:
            try:
                self.ioloop.remove_handler(w.conn.fileno())
            except (KeyError, ValueError, OSError):
                pass
            w.conn.close()

    def drain_worker(self, w: WorkerHandle) -> None:
        """The worker's pipe is readable: handle what it sent (bounded per wake-up)."""
        for _ in range(200):
            if w.conn.closed:
                return
            try:
                if not w.conn.poll():
                    return
                msg = w.conn.recv()
            except (EOFError, OSError):
                # dead worker: stop watching the pipe; supervise() replaces it
                try:
                    self.ioloop.remove_handler(w.conn.fileno())
                except (KeyError, ValueError, OSError):
                    pass
                return
            try:
                self._on_worker_message(w, msg)
            except amqp.CONNECTION_ERRORS as e:
                self.connection_lost(e)
            except Exception as e:  # noqa: BLE001 - keep serving
                self.log.exception("internal_error", error=type(e).__name__)

    def _pool_stats(self, w: WorkerHandle, stats: dict[str, float]) -> None:
        """Pool counters of one worker -> the master's metrics (a new worker starts at 0)."""
        hits = stats.get("hits", 0.0)
        if hits > w.pool_hits:  # stats from several threads may arrive out of order
            self.metrics.pool_hits.inc(hits - w.pool_hits)
            w.pool_hits = hits
        w.pool_idle = stats.get("idle", 0.0)
        self.metrics.pool_connections.set(sum(x.pool_idle for x in self.workers))

    def _on_worker_message(self, w: WorkerHandle, msg: tuple) -> None:
        w.last_seen = time.monotonic()
        kind = msg[0]
        if kind == "hb":
            self._pool_stats(w, msg[1])
        elif kind == "ready":
            w.ready = True
            self.boot_failures = 0
        elif kind == "start":
            job = self.jobs.get(msg[1])
            if job:
                job.started = time.monotonic()
        elif kind == "done":
            _, jid, reply_id, body, status, rows, seconds, stats = msg
            self._pool_stats(w, stats)
            w.jobs.discard(jid)
            job = self.jobs.get(jid)
            if job is None:
                return
            self.metrics.meter_session.observe(seconds)
            self.complete(job, reply_id, body, status, rows)

    # --- broker (asynchronous: pika SelectConnection on our own IOLoop) -----------------
    def connect(self) -> None:
        """Declare the topology (short blocking connection), then open the consumer."""
        self.reconnect_timer = None
        if self.stopping or self.conn is not None:
            return
        cfg = self.cfg
        try:
            setup = amqp.connect(cfg, name=self.connection_name + " setup")
            try:
                amqp.declare_topology(setup, cfg)
            finally:
                try:
                    setup.close()
                except amqp.CONNECTION_ERRORS:
                    pass
        except ConfigError as e:
            self.fail(e)
            return
        except (BrokerError, *amqp.CONNECTION_ERRORS) as e:
            self.connection_lost(e)
            return
        self.conn = pika.SelectConnection(
            amqp.connection_parameters(cfg, name=self.connection_name),
            on_open_callback=lambda c: c.channel(on_open_callback=self._on_channel),
            on_open_error_callback=lambda _c, e: self.connection_lost(e),
            on_close_callback=self._on_connection_closed,
            custom_ioloop=self.ioloop,
        )

    def _on_channel(self, ch: Any) -> None:
        self.ch = ch
        ch.add_on_close_callback(self._on_channel_closed)
        ch.add_on_return_callback(self._on_return)
        ch.confirm_delivery(
            self._guard(self._on_confirm),
            callback=lambda _f: ch.basic_qos(
                prefetch_count=self.cfg.prefetch, callback=lambda _f: self._consume()
            ),
        )

    def _consume(self) -> None:
        if self.ch is None or self.stopping:
            return
        self.pub_seq = 0
        self.confirms.clear()
        self.gen += 1
        self.consumer_tag = self.ch.basic_consume(
            self.cfg.InQueue, self._guard(self.on_message), callback=self._on_consume_ok
        )

    def _on_consume_ok(self, _frame: Any) -> None:
        self.ready = True
        if self.failures:
            self.metrics.broker_reconnects.inc()
        self.failures = 0
        self.metrics.broker_connected.set(1)
        self.log.info(
            "consuming",
            broker=amqp.describe(self.cfg),
            queue=self.cfg.InQueue,
            prefetch=self.cfg.prefetch,
            queue_type=self.cfg.QueueType,
        )

    def _on_channel_closed(self, _ch: Any, reason: BaseException) -> None:
        if self.conn is not None and self.conn.is_open and not self.closing:
            self.log.warning("broker_channel_closed", error=str(reason))
            self.conn.close()  # reconnect through _on_connection_closed
        self.ch = None

    def _on_connection_closed(self, _conn: Any, reason: BaseException) -> None:
        if self.closing:
            self.conn = self.ch = None
            self.ioloop.stop()
            return
        self.connection_lost(reason)

    def connection_lost(self, error: BaseException) -> None:
        """Forget the channel: its delivery tags are void, the broker will redeliver."""
        err = error if isinstance(error, GatewayError) else amqp.broker_error(self.cfg, error)
        self.failures += 1
        delay = min(self.cfg.ReconnectMaxDelay, 0.5 * 2 ** min(self.failures - 1, 16))
        self.log.warning("broker_connection_lost", error=str(err), retry_in=round(delay, 2))
        conn, self.conn, self.ch, self.consumer_tag = self.conn, None, None, None
        if conn is not None and conn.is_open:
            try:
                conn.close()
            except amqp.CONNECTION_ERRORS:
                pass
        self.ready = False
        self.gen += 1
        if self.confirms:
            self.metrics.publish_failures.labels(kind="connection_lost").inc(len(self.confirms))
        self.confirms.clear()
        self.returned.clear()
        self.metrics.broker_connected.set(0)
        self.unacked = 0
        self.metrics.in_flight.set(0)
        for job in self.jobs.values():
            job.deliveries.clear()
        if not self.stopping and self.reconnect_timer is None:
            self.reconnect_timer = self.ioloop.call_later(delay, self._guard(self.connect))

    def _guard(self, fn: Any) -> Any:
        """Wrap a pika callback: a bug must be logged, not stop the event loop silently."""

        def call(*args: Any) -> None:
            try:
                fn(*args)
            except amqp.CONNECTION_ERRORS as e:
                self.connection_lost(e)
            except GatewayError as e:
                self.fail(e)
            except Exception as e:  # noqa: BLE001 - keep serving
                self.log.exception("internal_error", error=type(e).__name__)

        return call

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        props: pika.BasicProperties,
        on_ok: Any,
        on_fail: Any,
    ) -> bool:
        """Publish with confirm; ``on_ok()`` or ``on_fail(kind)`` runs when the broker answers.

        Confirms are pipelined (no wait per message); the caller acks the request in
        ``on_ok``.  False when not connected (the request will be redelivered).
        """
        if not self.ready or self.ch is None:
            return False
        self.ch.basic_publish(exchange, routing_key, body, props, mandatory=True)
        self.pub_seq += 1
        self.confirms[self.pub_seq] = (on_ok, on_fail, props.message_id)
        return True

    def _on_return(self, _ch: Any, _method: Any, props: Any, _body: bytes) -> None:
        if props.message_id:
            self.returned.add(props.message_id)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        ok = isinstance(method, pika.spec.Basic.Ack)
        if method.multiple:
            seqs = [s for s in self.confirms if s <= method.delivery_tag]
        else:
            seqs = [method.delivery_tag]
        for seq in seqs:
            entry = self.confirms.pop(seq, None)
            if entry is None:
                continue
            on_ok, on_fail, mid = entry
            if not ok:
                on_fail("nacked")
            elif mid in self.returned:
                self.returned.discard(mid)
                on_fail("returned")
            else:
                on_ok()

    def ack(self, d: Delivery) -> None:
        if d.gen == self.gen and self.ch is not None:
            self.ch.basic_ack(d.tag)
            self.unacked -= 1
            self.metrics.in_flight.set(self.unacked)

    def requeue(self, d: Delivery) -> None:
        if d.gen == self.gen and self.ch is not None:
            self.ch.basic_nack(d.tag, requeue=True)
            self.unacked -= 1
            self.metrics.in_flight.set(self.unacked)

    def answer(
        self, key: str, in_msg_id: str, reply_id: str, body: bytes, deliveries: list[Delivery]
    ) -> None:
        """Store the reply, publish it for each delivery, ack each once confirmed."""
        reply_id, body = self.store.put(key, reply_id, body)
        for d in deliveries:
            if d.gen != self.gen:
                continue  # void tag: the redelivery is answered from the store
            target = d.reply_to or self.cfg.OutQueue

            def ok(d: Delivery = d) -> None:
                self.ack(d)

            def failed(kind: str, d: Delivery = d, target: str = target) -> None:
                self.metrics.publish_failures.labels(kind=kind).inc()
                if kind == "returned":
                    self.dead_letter(d, body, f"reply queue {target} does not exist", "unroutable")
                else:
                    self.log.warning("reply_not_confirmed", msg_id=in_msg_id, kind=kind)
                    self.requeue(d)  # redelivered and answered from the store

            self.publish("", target, body, amqp.properties(reply_id, in_msg_id), ok, failed)

    def dead_letter(self, d: Delivery, body: bytes, reason: str, kind: str) -> None:
        """Publish the request to the dead-letter exchange with its reason, then ack it."""
        props = pika.BasicProperties(
            delivery_mode=amqp.PERSISTENT,
            content_type="application/octet-stream",
            message_id="dead-" + replymod.new_msg_id(),
            headers={REASON_HEADER: reason},
        )

        def ok() -> None:
            self.ack(d)
            self.metrics.dead_lettered.labels(reason=kind).inc()

        def failed(why: str) -> None:
            self.log.error("dead_letter_failed", kind=why)
            self.requeue(d)

        if d.gen == self.gen:
            self.publish(self.cfg.dead_letter_exchange, "", body, props, ok, failed)
            self.log.warning("dead_lettered", reason=reason, bytes=len(body))

    def on_message(self, ch: Any, method: Any, props: Any, body: bytes) -> None:
        """One delivery from InQueue (pika callback)."""
        self.unacked += 1
        self.metrics.in_flight.set(self.unacked)
        d = Delivery(self.gen, method.delivery_tag, props.reply_to or None)
        try:
            self._on_message(ch, method, props, body, d)
        except amqp.CONNECTION_ERRORS:
            raise
        except Exception as e:  # noqa: BLE001 - one bad request must not stop the daemon
            self.log.exception("internal_error", error=type(e).__name__)
            self.dead_letter(
                d, body, f"internal error in the gateway ({type(e).__name__})", "internal"
            )

    def _on_message(self, ch: Any, method: Any, props: Any, body: bytes, d: Delivery) -> None:
        t0 = time.monotonic()
        if method.redelivered:
            self.metrics.redeliveries.inc()
        if self.stopping:
            self.requeue(d)
            return
        from ..request import extract_msg_id, parse_request

        cfg = self.cfg
        msg_id = extract_msg_id(body) if len(body) <= cfg.MaxBodyBytes else None
        if msg_id is None:
            reason, kind = self._malformed_reason(body)
            self.dead_letter(d, body, reason, kind)
            return
        key = request_key(msg_id, body)
        stored = self.store.get(key)
        if stored is not None:
            self.metrics.dedup_hits.inc()
            self.log.info("answered_from_store", msg_id=msg_id, reply_id=stored[0])
            self.answer(key, msg_id, stored[0], stored[1], [d])
            return
        running = self.by_key.get(key)
        if running is not None:
            self.jobs[running].deliveries.append(d)  # redelivery while still being read
            return
        headers = props.headers or {}
        count = headers.get("x-delivery-count")
        attempts = self.store.count_attempt(key)
        if (isinstance(count, int) and count >= cfg.DeliveryLimit) or attempts > cfg.DeliveryLimit:
            self.store.forget_attempts(key)
            self.dead_letter(
                d,
                body,
                f"delivered {max(attempts, (count or 0) + 1)} times without an "
                "answer (poison request)",
                "delivery_limit",
            )
            return
        try:
            request = parse_request(body, cfg.MaxBodyBytes)
        except GatewayError as e:
            self._answer_now(key, msg_id, d, "?", e.message, t0)
            return
        if request.cmd != "READ":
            self._answer_now(
                key,
                msg_id,
                d,
                request.cmd,
                f"Unknown command {request.cmd[:32]}; only READ is supported",
                t0,
            )
            return
        from ..meter.connstring import parse_connection_string

        try:
            settings = parse_connection_string(request.connection_string)
        except GatewayError as e:
            self._answer_now(key, msg_id, d, request.cmd, e.message, t0)
            return
        self.dispatch(key, msg_id, request, settings.meter_key, settings.endpoint, d, t0)

    def _malformed_reason(self, body: bytes) -> tuple[str, str]:
        if len(body) > self.cfg.MaxBodyBytes:
            return (
                f"body of {len(body)} bytes exceeds MaxBodyBytes {self.cfg.MaxBodyBytes}",
                "too_large",
            )
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return "body is not valid JSON", "not_json"
        if not isinstance(data, dict):
            return "body is not a JSON object", "not_object"
        return "body has no MsgID (string or number)", "no_msgid"

    def _answer_now(
        self, key: str, msg_id: str, d: Delivery, cmd: str, error: str, t0: float
    ) -> None:
        rep = replymod.error_reply(msg_id, error)
        self.answer(key, msg_id, rep["MsgID"], replymod.dumps(rep), [d])
        self.metrics.requests.labels(cmd=_cmd_label(cmd), status="notok").inc()
        self.metrics.request_duration.observe(time.monotonic() - t0)
        self.log.info(
            "request",
            msg_id=msg_id,
            cmd=cmd[:32],
            status="notok",
            error=error,
            duration_ms=round((time.monotonic() - t0) * 1000, 1),
            rows=0,
        )

    def dispatch(
        self,
        key: str,
        msg_id: str,
        request: Any,
        meter_key: str,
        endpoint: str,
        d: Delivery,
        t0: float,
    ) -> None:
        idx = zlib.crc32(meter_key.encode()) % len(self.workers)
        job = Job(
            self.next_job, key, msg_id, request, meter_key, endpoint, request.cmd, idx, t0, [d]
        )
        self.next_job += 1
        self.jobs[job.job_id] = job
        self.by_key[key] = job.job_id
        w = self.workers[idx]
        w.jobs.add(job.job_id)
        self._send(w, ("job", job.job_id, request, meter_key))

    def complete(
        self, job: Job, reply_id: str, body: bytes, status: str, rows: int, error: str = ""
    ) -> None:
        self.jobs.pop(job.job_id, None)
        self.by_key.pop(job.key, None)
        self.workers[job.worker].jobs.discard(job.job_id)
        self.answer(job.key, job.msg_id, reply_id, body, job.deliveries)
        dt = time.monotonic() - job.t0
        self.metrics.requests.labels(cmd="READ", status=status).inc()
        self.metrics.request_duration.observe(dt)
        if not error and status != "ok":
            try:
                error = str(orjson.loads(body).get("Error", ""))
            except orjson.JSONDecodeError:
                error = ""
        self.log.info(
            "request",
            msg_id=job.msg_id,
            endpoint=job.endpoint,
            cmd=job.cmd,
            status=status,
            duration_ms=round(dt * 1000, 1),
            rows=rows,
            attempts=job.attempts,
            **({"error": error} if error else {}),
        )

    def complete_error(self, job: Job, message: str) -> None:
        rep = replymod.error_reply(job.msg_id, message)
        self.complete(job, rep["MsgID"], replymod.dumps(rep), "notok", 0, error=message)

    # --- stop ----------------------------------------------------------------------------
    def begin_stop(self, why: str) -> None:
        self.stopping = True
        self.stop_deadline = time.monotonic() + self.cfg.ShutdownGrace
        self.log.info(
            "stopping", signal=why, in_flight=len(self.jobs), grace_s=self.cfg.ShutdownGrace
        )
        if self.reconnect_timer is not None:
            self.ioloop.remove_timeout(self.reconnect_timer)
            self.reconnect_timer = None
        if self.ch is not None and self.consumer_tag:
            self.ch.basic_cancel(self.consumer_tag)

    def fail(self, error: GatewayError) -> None:
        """A fatal error (configuration, workers that cannot start): stop now."""
        if self.fatal is None:
            self.fatal = error
            self.log.error("fatal", error=error.message)
        if not self.stopping:
            self.stopping = True
        self.stop_deadline = 0.0

    def finish_stop(self) -> None:
        """Grace over: requeue what is left, close the broker connection, stop the loop."""
        if self.closing:
            return
        self.closing = True
        left = list(self.jobs.values())
        if left:
            self.log.warning("requeued_at_stop", requests=len(left))
        if self.conn is not None and self.conn.is_open:
            try:
                for job in left:
                    for d in job.deliveries:
                        self.requeue(d)
                self.conn.close()
            except amqp.CONNECTION_ERRORS:
                self.ioloop.stop()
            self.ioloop.call_later(10, self.ioloop.stop)  # the broker may not answer
        else:
            self.ioloop.stop()

    def stop_workers(self) -> None:
        for w in self.workers:
            self._send(w, ("stop",))
        deadline = time.monotonic() + 5
        for w in self.workers:
            w.proc.join(max(0.1, deadline - time.monotonic()))
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(2)
        self.store.close()
        self.metrics.broker_connected.set(0)

    # --- main loop -----------------------------------------------------------------------
    def tick(self) -> None:
        """Every TICK_SECONDS: signals, supervision, first connect, end of the stop."""
        try:
            self.handle_signals()
            now = time.monotonic()
            if now - self.last_tick > 2.0 and self.last_tick:
                # the loop itself was held up (a blocking connect to a silent broker): the
                # workers' heartbeats wait in their pipes, they are not silent
                self.log.warning("master_stalled", seconds=round(now - self.last_tick, 1))
                for w in self.workers:
                    w.last_seen = max(w.last_seen, now)
                self.rx_seen_at = now  # likewise the broker's bytes wait in the socket
            self.last_tick = now
            self.watch_broker(now)
            if now - self.last_supervise >= SUPERVISE_SECONDS:
                self.last_supervise = now
                self.supervise()
            if (
                not self.started_consuming
                and not self.stopping
                and all(w.ready for w in self.workers)
            ):
                self.started_consuming = True
                self.log.info(
                    "workers_ready",
                    workers=len(self.workers),
                    sessions_per_worker=self.cfg.SessionsPerWorker,
                )
                self.connect()
            if self.stopping and (
                (not self.jobs and not self.confirms) or now >= self.stop_deadline
            ):
                self.finish_stop()
        except amqp.CONNECTION_ERRORS as e:
            self.connection_lost(e)
        except GatewayError as e:
            self.fail(e)
        except Exception as e:  # noqa: BLE001 - keep serving
            self.log.exception("internal_error", error=type(e).__name__)
        if not self.closing:
            self.ioloop.call_later(TICK_SECONDS, self.tick)

    def watch_broker(self, now: float) -> None:
        """Drop a connection that has received nothing for 1.5 heartbeats.

        The broker sends a heartbeat every half heartbeat, so a healthy connection is
        never that quiet.  pika's own check only fires after up to 2 x (heartbeat + 5) s,
        which leaves replies waiting four times longer after a silent network cut.
        """
        conn = self.conn
        if conn is None or not conn.is_open or self.cfg.Heartbeat <= 0:
            self.rx_seen_at = now
            return
        received = conn.bytes_received
        if received != self.rx_bytes:
            self.rx_bytes, self.rx_seen_at = received, now
            return
        silent = now - self.rx_seen_at
        if silent > 1.5 * self.cfg.Heartbeat:
            self.log.warning("broker_silent", seconds=round(silent, 1))
            self.rx_seen_at = now
            # the same path pika takes on its own heartbeat timeout
            conn._terminate_stream(
                pika.exceptions.AMQPHeartbeatTimeout(
                    f"nothing received from the broker for {silent:.0f} s"
                )
            )

    def run(self) -> int:
        self.install_signals()
        for i in range(self.cfg.Workers):
            self.spawn(i)
        self.metrics.serve(self.cfg.MetricsPort, self.cfg.MetricsAddress)
        self.ioloop.call_later(TICK_SECONDS, self.tick)
        try:
            self.ioloop.start()
        finally:
            self.stop_workers()
        if self.fatal is not None:
            raise self.fatal
        self.log.info("stopped")
        return EXIT_OK


def _cmd_label(cmd: str) -> str:
    """Bounded label values: READ, or 'other'."""
    return "READ" if cmd == "READ" else "other"
