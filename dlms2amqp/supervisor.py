# SPDX-License-Identifier: GPL-2.0-or-later
"""The master: owns the only broker connection, routes requests to workers, supervises.

Data flows one way: delivery -> (reply store hit? answer it) -> parse -> worker (by meter
key) -> result -> store -> publish with confirm -> ack.  Everything here runs in one
thread: the pika loop is polled with ``process_data_events(time_limit=...)`` and the
worker pipes are drained between polls.  We chose polling over a result thread with
``add_callback_threadsafe`` because one thread owning all master state needs no locks,
and the cost (up to one poll interval, 50 ms, of added latency) is small next to a meter
session.  Signal handlers only queue the signal; the loop handles it (gunicorn style).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
import zlib
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Optional

import orjson
import pika
import pika.exceptions as pex

from . import amqp, logsetup
from . import reply as replymod
from .config import Config
from .errors import BrokerError, ConfigError, GatewayError
from .metrics import Metrics
from .replystore import ReplyStore, request_key
from .worker import WorkerSettings
from .worker import main as worker_main

POLL_SECONDS = 0.05
SUPERVISE_SECONDS = 0.5
HEARTBEAT_LIMIT = 15.0  # a worker silent this long is killed
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
        # broker state
        self.conn: Optional[pika.BlockingConnection] = None
        self.ch: Any = None
        self.consumer_tag: Optional[str] = None
        self.gen = 0
        self.unacked = 0
        self.failures = 0
        self.next_connect = 0.0
        # stop state
        self.stopping = False
        self.stop_deadline = 0.0
        self.boot_failures = 0

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
        if index < len(self.workers):
            self.workers[index] = w
        else:
            self.workers.append(w)
        self.log.info("worker_started", worker=index, pid=proc.pid)
        return w

    def _send(self, w: WorkerHandle, msg: tuple) -> bool:
        try:
            w.conn.send(msg)
            return True
        except (OSError, ValueError):
            return False  # dead worker: supervise() handles it

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
                if w.ready and now - w.last_seen > HEARTBEAT_LIMIT:
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
        w.conn.close()
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

    def drain_workers(self, timeout: float = 0.0) -> None:
        conns = {w.conn: w for w in self.workers if not w.conn.closed}
        if not conns:
            time.sleep(timeout)
            return
        for c in wait(list(conns), timeout):
            w = conns[c]  # type: ignore[index]
            for _ in range(1000):
                try:
                    msg = c.recv()  # type: ignore[union-attr]
                except (EOFError, OSError):
                    break
                self._on_worker_message(w, msg)
                if not c.poll():  # type: ignore[union-attr]
                    break

    def _on_worker_message(self, w: WorkerHandle, msg: tuple) -> None:
        w.last_seen = time.monotonic()
        kind = msg[0]
        if kind == "hb":
            stats = msg[1]
            if "hits" in stats:
                w.pool_hits = stats["hits"]
            if "idle" in stats:
                w.pool_idle = stats["idle"]
            self.metrics.pool_connections.set(sum(x.pool_idle for x in self.workers))
        elif kind == "ready":
            w.ready = True
            self.boot_failures = 0
        elif kind == "start":
            job = self.jobs.get(msg[1])
            if job:
                job.started = time.monotonic()
        elif kind == "done":
            _, jid, reply_id, body, status, rows, seconds, pooled = msg
            w.jobs.discard(jid)
            job = self.jobs.get(jid)
            if job is None:
                return
            self.metrics.meter_session.observe(seconds)
            if pooled:
                self.metrics.pool_hits.inc()
            self.complete(job, reply_id, body, status, rows, pooled=pooled)

    # --- broker --------------------------------------------------------------------------
    def connect(self) -> None:
        """Connect, declare the topology and start consuming."""
        cfg = self.cfg
        conn = amqp.connect(cfg)
        try:
            amqp.declare_topology(conn, cfg)
            ch = conn.channel()
            ch.confirm_delivery()
            ch.basic_qos(prefetch_count=cfg.prefetch)
            tag = ch.basic_consume(cfg.InQueue, self.on_message, auto_ack=False)
        except BaseException:
            try:
                conn.close()
            except Exception:  # noqa: BLE001
                pass
            raise
        self.conn, self.ch, self.consumer_tag = conn, ch, tag
        self.gen += 1
        self.unacked = 0
        if self.failures:
            self.metrics.broker_reconnects.inc()
        self.failures = 0
        self.metrics.broker_connected.set(1)
        self.log.info(
            "consuming",
            broker=amqp.describe(cfg),
            queue=cfg.InQueue,
            prefetch=cfg.prefetch,
            queue_type=cfg.QueueType,
        )

    def connection_lost(self, error: BaseException) -> None:
        """Forget the channel: its delivery tags are void, the broker will redeliver."""
        err = amqp.broker_error(self.cfg, error) if not isinstance(error, BrokerError) else error
        self.failures += 1
        delay = min(self.cfg.ReconnectMaxDelay, 0.5 * 2 ** min(self.failures - 1, 16))
        self.next_connect = time.monotonic() + delay
        self.log.warning("broker_connection_lost", error=str(err), retry_in=round(delay, 2))
        if self.conn is not None:
            try:
                if self.conn.is_open:
                    self.conn.close()
            except Exception:  # noqa: BLE001 - already broken
                pass
        self.conn = self.ch = self.consumer_tag = None
        self.metrics.broker_connected.set(0)
        self.unacked = 0
        self.metrics.in_flight.set(0)
        for job in self.jobs.values():
            job.deliveries.clear()

    @property
    def connected(self) -> bool:
        return self.ch is not None

    def _publish(self, routing_key: str, body: bytes, props: pika.BasicProperties) -> None:
        self.ch.basic_publish("", routing_key, body, props, mandatory=True)

    def ack(self, d: Delivery) -> None:
        if d.gen == self.gen and self.connected:
            self.ch.basic_ack(d.tag)
            self.unacked -= 1
            self.metrics.in_flight.set(self.unacked)

    def answer(
        self, key: str, in_msg_id: str, reply_id: str, body: bytes, deliveries: list[Delivery]
    ) -> bool:
        """Store, publish (confirmed) and ack.  False if the reply could not be routed."""
        reply_id, body = self.store.put(key, reply_id, body)
        ok = True
        for d in deliveries:
            if d.gen != self.gen or not self.connected:
                continue  # void tag: the redelivery is answered from the store
            target = d.reply_to or self.cfg.OutQueue
            try:
                self._publish(target, body, amqp.properties(reply_id, in_msg_id))
            except pex.UnroutableError:
                self.metrics.publish_failures.labels(kind="returned").inc()
                self.dead_letter(d, body, f"reply queue {target} does not exist", "unroutable")
                ok = False
                continue
            except pex.NackError:
                self.metrics.publish_failures.labels(kind="nacked").inc()
                self.log.warning("reply_nacked", msg_id=in_msg_id)
                self.ch.basic_nack(d.tag, requeue=True)  # redelivered, answered from store
                self.unacked -= 1
                continue
            self.ack(d)
        return ok

    def dead_letter(self, d: Delivery, body: bytes, reason: str, kind: str) -> None:
        """Publish the request to the dead-letter exchange with its reason, then ack it."""
        if d.gen != self.gen or not self.connected:
            return
        props = pika.BasicProperties(
            delivery_mode=amqp.PERSISTENT,
            content_type="application/octet-stream",
            headers={REASON_HEADER: reason},
        )
        self.ch.basic_publish(self.cfg.dead_letter_exchange, "", body, props, mandatory=True)
        self.ack(d)
        self.metrics.dead_lettered.labels(reason=kind).inc()
        self.log.warning("dead_lettered", reason=reason, bytes=len(body))

    def on_message(self, ch: Any, method: Any, props: Any, body: bytes) -> None:
        """One delivery from InQueue (called by pika inside process_data_events)."""
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
            ch.basic_nack(method.delivery_tag, requeue=True)
            self.unacked -= 1
            return
        from .request import extract_msg_id, parse_request

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
        from .connstring import parse_connection_string

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
        self,
        job: Job,
        reply_id: str,
        body: bytes,
        status: str,
        rows: int,
        pooled: bool = False,
        error: str = "",
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
            pooled=pooled,
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
        if self.connected and self.consumer_tag:
            try:
                pending = self.ch.basic_cancel(self.consumer_tag)
                for method, _props, _body in pending or ():
                    self.ch.basic_nack(method.delivery_tag, requeue=True)
            except amqp.CONNECTION_ERRORS as e:
                self.connection_lost(e)

    def finish_stop(self) -> None:
        """Grace over: requeue what is left, close the broker, stop the workers."""
        left = list(self.jobs.values())
        if left:
            self.log.warning("requeued_at_stop", requests=len(left))
        if self.connected:
            try:
                for job in left:
                    for d in job.deliveries:
                        if d.gen == self.gen:
                            self.ch.basic_nack(d.tag, requeue=True)
                self.ch.close()
                self.conn.close()
            except amqp.CONNECTION_ERRORS:
                pass  # unacked deliveries go back to the queue anyway
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
    def run(self) -> int:
        self.install_signals()
        for i in range(self.cfg.Workers):
            self.spawn(i)
        self.metrics.serve(self.cfg.MetricsPort, self.cfg.MetricsAddress)
        # wait until every worker imported the session layer (a broken install halts here)
        while not all(w.ready for w in self.workers):
            self.handle_signals()
            if self.stopping:
                self.finish_stop()
                return EXIT_OK
            self.drain_workers(0.2)
            self.supervise()
        self.log.info(
            "workers_ready",
            workers=len(self.workers),
            sessions_per_worker=self.cfg.SessionsPerWorker,
        )
        last_supervise = 0.0
        while True:
            self.handle_signals()
            now = time.monotonic()
            if not self.connected and not self.stopping and now >= self.next_connect:
                try:
                    self.connect()
                except ConfigError:
                    self.finish_stop()
                    raise
                except (BrokerError, *amqp.CONNECTION_ERRORS) as e:
                    self.connection_lost(e)
            if self.connected:
                try:
                    self.conn.process_data_events(time_limit=POLL_SECONDS)
                    self.drain_workers(0)
                except amqp.CONNECTION_ERRORS as e:
                    self.connection_lost(e)
            else:
                self.drain_workers(POLL_SECONDS)
            if now - last_supervise >= SUPERVISE_SECONDS:
                last_supervise = now
                try:
                    self.supervise()
                except amqp.CONNECTION_ERRORS as e:
                    self.connection_lost(e)
            if self.stopping and (not self.jobs or now >= self.stop_deadline):
                self.finish_stop()
                self.log.info("stopped")
                return EXIT_OK


def _cmd_label(cmd: str) -> str:
    """Bounded label values: READ, or 'other'."""
    return "READ" if cmd == "READ" else "other"
