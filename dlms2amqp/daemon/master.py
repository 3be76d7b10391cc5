# SPDX-License-Identifier: GPL-2.0-or-later
"""The master: wires the intake, the broker adapter and the arbiter on one IOLoop.

One request: delivery (``broker``) -> decision (``intake``: answer, dead-letter or
dispatch) -> worker chosen by crc32 of the meter key (``workers``; one meter is always
read by the same worker, which runs one session per meter at a time) -> ``Done`` ->
reply stored (``replystore``) -> checked against the size limit (``replysize``: whole,
in parts, or refused) -> published with a confirm -> request acked.

Everything here runs in one thread, on one pika IOLoop: the broker connection
(SelectConnection), the worker pipes (``add_handler`` on their file descriptors) and a
periodic tick (signals, supervision, first connect, stop).  We chose this over a
BlockingConnection plus a result thread handing results over with
``add_callback_threadsafe``: one thread owning all master state needs no locks, a worker
result wakes the loop at once, and publisher confirms are pipelined (a blocking publish
that waits for its own confirm managed ~580 replies/s here).  The only other threads
are one sender per worker (see ``workers``).  Signal handlers only queue the signal; the
tick handles it (gunicorn style).

Over 500 lines because the reply path (store, size check, parts, publish, ack, dead-letter
the request when a reply cannot be routed, the settling of commits in doubt with
partitions) and the stop sequence share the job table;
the pure decisions are already out (``intake``, ``replysize``), next to move out is the
reply path (with the commands beyond READ).
"""

from __future__ import annotations

import os
import signal
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import orjson

from .. import logsetup
from .. import reply as replymod
from ..config import Config
from ..errors import GatewayError
from ..meter import targets
from ..meter.connstring import ConnSettings
from ..metrics import Metrics
from ..request import SPLIT_FIELD, ReadRequest, extract_msg_id, msg_id_of
from . import amqp, indoubt, ipc, partitions, replysize
from .broker import Broker, Delivery, IOLoop
from .intake import Answer, Attach, DeadLetter, Dispatch, Intake, Stored
from .replystore import ReplyStore
from .workers import Arbiter

TICK_SECONDS = 0.1
SUPERVISE_SECONDS = 0.5


@dataclass
class Job:
    """One request being read, and every delivery of it waiting for the reply."""

    job_id: int
    key: str
    msg_id: str
    request: ReadRequest
    settings: ConnSettings
    worker: int  # -1 while its host name is being resolved
    t0: float
    deliveries: list[Delivery] = field(default_factory=list)
    attempts: int = 1

    def message(self) -> ipc.Job:
        return ipc.Job(self.job_id, self.request, self.settings)


@dataclass(frozen=True)
class _Doubt:
    """A commit in doubt as read here: its request's MsgID and key (daemon/indoubt.py)."""

    doubt: indoubt.InDoubt
    msg_id: str
    key: str
    split: bool  # the request asked for a reply in parts


#: how many committed request keys a daemon remembers to settle commits in doubt: one
#: lands within seconds (the reconnect) of its reply's commit
COMMITTED_KEPT = 100_000


class Master:
    def __init__(self, cfg: Config, metrics: Optional[Metrics] = None):
        partitions.check(cfg)  # settings that need each other (SerialPorts, Partitions)
        self.cfg = cfg
        self.metrics = metrics or Metrics()
        self.log = logsetup.get_logger("dlms2amqp.master")
        self.ioloop = IOLoop()
        self.store = ReplyStore(
            cfg.state_dir / "replies.sqlite3", cfg.ReplyStoreSize, cfg.ReplyStoreMaxBytes
        )
        # partition queues are quorum queues whatever InQueue is
        queue_type = "quorum" if cfg.Partitions > 0 else cfg.QueueType
        self.intake = Intake(self.store, cfg.MaxBodyBytes, cfg.DeliveryLimit, queue_type)
        self.broker = Broker(
            cfg,
            self.ioloop,
            self.metrics,
            self.log,
            on_delivery=self.on_delivery,
            on_lost=self.on_connection_lost,
            on_fatal=self.fail,
            name=f"dlms2amqpd {cfg.InQueue} pid {os.getpid()}",
        )
        self.workers = Arbiter(
            cfg,
            self.ioloop,
            self.metrics,
            self.log,
            on_done=self.on_done,
            on_orphans=self.on_orphans,
            on_error=self._on_error,
        )
        # where requests may connect; host names resolved off the loop (meter/targets.py)
        self.allowed_hosts = targets.HostPolicy(cfg.AllowedHosts)
        self.allowed_serial = targets.SerialPolicy(cfg.AllowedSerialPorts)
        self.resolver = targets.AsyncResolver(
            self.ioloop.add_callback_threadsafe, self.ioloop.call_later
        )
        self.counters: dict[tuple[str, str], Any] = {}  # requests_total's children
        self.jobs: dict[int, Job] = {}
        self.by_key: dict[str, int] = {}  # request key -> job id
        # partitions: request keys whose reply we committed lately (oldest first), to
        # settle the commits in doubt of other daemons (daemon/indoubt.py)
        self.committed: dict[str, None] = {}
        self.committing: Counter[str] = Counter()  # replies sent, their commit not yet ok
        self.next_job = 1
        self.signals: list[int] = []
        self.started_consuming = False
        self.last_supervise = 0.0
        self.stopping = False
        self.closing = False
        self.stop_deadline = 0.0
        self.fatal: Optional[GatewayError] = None
        # scale-out hooks (daemon/partitions.py)
        self.in_queue = cfg.InQueue
        self.presence_queue = partitions.presence_queue(cfg)  # compared on every delivery
        self.expired_queue = partitions.expired_name(cfg)
        self.mover: Optional[partitions.Mover] = None
        self.balancer: Optional[partitions.Balancer] = None
        self.inqueue_watch: Optional[partitions.InQueueWatch] = None
        if cfg.Partitions > 0:
            # keyed by the resolved address: one meter, one partition, however it is spelt
            self.mover = partitions.Mover(
                cfg, self.broker, self.log, self.metrics, self.resolver.lookup, self._on_error
            )
            self.balancer = partitions.Balancer(
                cfg,
                self.broker,
                self.partition_busy,
                lambda keys: self.workers.broadcast(ipc.ClosePool(frozenset(keys))),
                self.log,
                self.metrics,
                redeliver=self.on_delivery,
            )
        else:
            self.inqueue_watch = partitions.InQueueWatch(cfg, self.broker, self.log, self.metrics)

    # --- signals -------------------------------------------------------------------------
    def install_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda s, _f: self.signals.append(s))

    def handle_signals(self) -> None:
        while self.signals:
            sig = self.signals.pop(0)
            if sig == signal.SIGHUP:
                logsetup.reopen()
                self.workers.broadcast(ipc.Reopen())
                self.log.info("log_reopened")
            elif not self.stopping:
                self.begin_stop(signal.Signals(sig).name)
            else:
                # a second TERM/INT: do not wait for the grace period, requeue what is left
                self.log.warning("stop_now", signal=signal.Signals(sig).name)
                self.stop_deadline = 0.0

    # --- deliveries ----------------------------------------------------------------------
    def on_delivery(self, d: Delivery, method: Any, props: Any, body: bytes) -> None:
        """One delivery from InQueue: ask the intake, do what it decided."""
        if method.redelivered:
            self.metrics.redeliveries.inc()
        # a commit in doubt (daemon/indoubt.py), read once; dropped at once when known here,
        # even while stopping or handing the partition over (both would requeue it).  Only
        # from the queues a daemon sends them to: InQueue is the senders' (its consumer is
        # on the tx channel too) and the mover strips the headers
        doubt = (
            self._read_doubt(props, body)
            if d.tx and d.queue != self.in_queue and indoubt.is_in_doubt(props)
            else None
        )
        if doubt is not None and doubt[0] is not None and self._drop_known(d, doubt[0]):
            return
        if self.stopping:
            self.broker.requeue(d)
            return
        if self.mover is not None and d.queue == self.presence_queue:
            self.broker.ack(d)  # nothing belongs here; someone published by mistake
            return
        if self.mover is not None and d.queue == self.expired_queue:
            if doubt is not None:  # out of a serial port's queue, unsettled in SerialPortWait
                self._settle(d, body, *doubt)
            else:
                self.serial_expired(d, props, body)
            return
        if self.balancer is not None and self.balancer.on_delivery(d.queue, d, method, props, body):
            return  # held: this partition is being given to another daemon
        t0 = time.monotonic()
        try:
            if self.mover is not None and d.queue == self.in_queue:
                self.mover.move(d, props, body)  # to its partition; read when it comes back
                return
            if doubt is not None:
                self._settle(d, body, *doubt)
                return
            parsed = self.mover.parsed_for(body) if self.mover is not None else None
            decision = self.intake.decide(
                body, props.headers, self.by_key, bool(method.redelivered), parsed
            )
            if isinstance(decision, Dispatch):
                self.dispatch(decision, d, t0)
            elif isinstance(decision, Attach):
                self.jobs[self.by_key[decision.key]].deliveries.append(d)
            elif isinstance(decision, Stored):
                self.metrics.dedup_hits.inc()
                self.log.info(
                    "answered_from_store",
                    msg_id=decision.msg_id,
                    reply_id=decision.reply_id,
                    **({"store_answers": decision.attempts} if decision.attempts else {}),
                )
                key = decision.key
                self.answer(
                    key,
                    decision.msg_id,
                    decision.reply_id,
                    decision.body,
                    [d],
                    split=decision.split,
                    stored=True,
                    on_acked=(lambda: self.store.forget_attempts(key))
                    if decision.attempts
                    else None,
                )
            elif isinstance(decision, Answer):
                self.answer(decision.key, decision.msg_id, decision.reply_id, decision.body, [d])
                self._count("READ" if decision.cmd == "READ" else "other", "notok", t0)
                self.log.info(
                    "request",
                    msg_id=decision.msg_id,
                    cmd=decision.cmd[:32],
                    status="notok",
                    error=decision.error,
                    duration_ms=_ms(t0),
                    rows=0,
                )
            elif isinstance(decision, DeadLetter):
                self.broker.dead_letter(d, body, decision.reason, decision.kind)
        except amqp.CONNECTION_ERRORS:
            raise
        except Exception as e:  # noqa: BLE001 - one bad request must not stop the daemon
            self.log.exception(
                "internal_error", error=type(e).__name__, msg_id=extract_msg_id(body)
            )
            self.broker.dead_letter(
                d, body, f"internal error in the gateway ({type(e).__name__})", "internal"
            )

    def _answered_here(self, key: str) -> Optional[str]:
        """Why a commit in doubt of this request is settled here already, if it is: being
        read, its reply in a commit in flight, or committed lately."""
        if key in self.by_key:
            return "being_read"
        if key in self.committing:
            return "committing"
        return "answered" if key in self.committed else None

    def _read_doubt(self, props: Any, body: bytes) -> tuple[Optional[_Doubt], str]:
        """A commit in doubt and its request's key, or (None, why it is refused)."""
        doubt, why = indoubt.parse(self.cfg.UserName, props, body)
        if doubt is None:
            return None, why
        data = _json_object(doubt.request)
        msg_id = msg_id_of(data) if data is not None else None
        if data is None or msg_id is None:
            return None, "an in-doubt reply without MsgID"
        key = self.store.key_for(msg_id, doubt.request)
        return _Doubt(doubt, msg_id, key, data.get(SPLIT_FIELD) is True), ""

    def _drop_known(self, d: Delivery, found: _Doubt) -> bool:
        """Drop (ack) a commit in doubt whose request this daemon read or answered."""
        outcome = self._answered_here(found.key)
        if outcome is None:
            return False
        self.metrics.in_doubt.labels(outcome=outcome).inc()
        self.log.info(
            "in_doubt_dropped", msg_id=found.msg_id, reply_id=found.doubt.reply_id, why=outcome
        )
        self.broker.ack(d)
        return True

    def settle_in_doubt(self, d: Delivery, props: Any, body: bytes) -> None:
        """A reply whose commit ended in doubt at some daemon (daemon/indoubt.py): drop it
        if its request is read or answered here, else publish it (and keep it)."""
        self._settle(d, body, *self._read_doubt(props, body))

    def _settle(self, d: Delivery, body: bytes, found: Optional[_Doubt], why: str) -> None:
        if found is None:
            self.metrics.in_doubt.labels(outcome="refused").inc()
            self.broker.dead_letter(d, body, why, "in_doubt_refused")
            return
        if self._drop_known(d, found):
            return
        doubt, key = found.doubt, found.key
        self.metrics.in_doubt.labels(outcome="published").inc()
        self.log.warning("in_doubt_published", msg_id=found.msg_id, reply_id=doubt.reply_id)
        reply_id, reply = self.store.put(key, doubt.reply_id, doubt.reply)
        request_d = replace(d, body=doubt.request)  # a copy in doubt: the request
        self.answer(key, found.msg_id, reply_id, reply, [request_d], split=found.split, stored=True)

    def dispatch(self, dec: Dispatch, d: Delivery, t0: float) -> None:
        """Fix the target (a host name is resolved first, off the loop), then route it."""
        job = Job(self.next_job, dec.key, dec.msg_id, dec.request, dec.settings, -1, t0, [d])
        self.next_job += 1
        self.jobs[job.job_id] = job
        self.by_key[job.key] = job.job_id  # a redelivery meanwhile attaches to it
        s = dec.settings
        if targets.needs_lookup(s):
            assert s.host is not None and s.port is not None
            self.resolver.lookup(s.host, s.port, lambda answer: self._resolved(job, answer))
        else:
            self.route(job, None)

    def _resolved(self, job: Job, answer: Any) -> None:
        """The resolver's answer for a job's host name (on the loop thread)."""
        if self.closing or self.jobs.get(job.job_id) is not job:
            return
        try:
            if isinstance(answer, GatewayError):
                self.complete_error(job, answer.message)
            else:
                self.route(job, answer)
        except Exception as e:  # noqa: BLE001 - a callback must not stop the loop
            self._on_error(e)

    def route(self, job: Job, address: Optional[str]) -> None:
        """Check the target (AllowedHosts, AllowedSerialPorts); by crc32 of the meter key
        to a worker: one meter, one worker."""
        try:
            targets.prepare(job.settings, self.allowed_hosts, self.allowed_serial, address)
        except GatewayError as e:
            self.complete_error(job, e.message)
            return
        key = job.settings.meter_key  # normalised now: what the workers' pools are keyed by
        if self.balancer is not None:
            self.balancer.note(job.deliveries[0].queue, key)
        job.worker = zlib.crc32(key.encode()) % len(self.workers)
        self.workers.submit(job.worker, job.message())

    def reply_limit(self) -> tuple[int, str]:
        """The size a reply body may have, and the name of that limit (for the refusal)."""
        broker_max = self.broker.max_message_size
        if broker_max is not None and broker_max < self.cfg.MaxReplyBytes:
            return broker_max, "the broker's max_message_size"
        return self.cfg.MaxReplyBytes, "MaxReplyBytes"

    def answer(
        self,
        key: str,
        in_msg_id: str,
        reply_id: str,
        body: bytes,
        deliveries: list[Delivery],
        split: bool = False,
        stored: bool = False,
        on_acked: Optional[Any] = None,
    ) -> str:
        """Store the reply, publish it for each delivery, ack each once confirmed.

        A reply over the size limit is published in parts (when the request asked) or
        replaced by a ``notok`` reply saying so (that one is stored then, not the huge
        reply).  Returns "whole", "parts" or "refused".
        """
        limit, limit_name = self.reply_limit()
        fitted = replysize.fit(in_msg_id, reply_id, body, limit, split, limit_name)
        kept = (reply_id, body)  # what the store holds: a commit in doubt sends that
        if not stored:
            keep = fitted.messages[0] if fitted.kind == "refused" else (reply_id, body)
            kept = self.store.put(key, *keep)
            if kept != keep:  # a reply was stored first: that one goes out
                fitted = replysize.fit(in_msg_id, kept[0], kept[1], limit, split, limit_name)
        if fitted.kind != "whole":
            self.metrics.replies_oversize.labels(outcome=fitted.kind).inc()
            self.log.warning(
                "reply_too_large",
                msg_id=in_msg_id,
                bytes=fitted.size,
                limit=limit,
                limit_name=limit_name,
                outcome=fitted.kind,
                messages=len(fitted.messages),
            )
        for d in deliveries:
            if self.broker.current(d):  # else void: the redelivery is answered from the store
                self._send(d, key, in_msg_id, fitted.messages, on_acked, kept)
        return fitted.kind

    def _send(
        self,
        d: Delivery,
        key: str,
        in_msg_id: str,
        messages: list[tuple[str, bytes]],
        on_acked: Optional[Any] = None,
        kept: Optional[tuple[str, bytes]] = None,
    ) -> None:
        """Publish a reply's messages for one delivery; ack it once all are confirmed.

        The first failure decides, once: nacked or lost, the request is requeued (its
        redelivery is answered from the store); returned from OutQueue (deleted under
        us), OutQueue is declared again and the message published again; returned again,
        or from a reply_to queue that does not exist, the *request* is dead-lettered.
        """
        target = d.reply_to or self.cfg.OutQueue
        if d.tx:
            self._send_tx(d, key, target, in_msg_id, messages, on_acked, kept)
            return
        left = [len(messages)]
        settled = [False]

        def ok() -> None:
            if settled[0]:
                return
            left[0] -= 1
            if left[0] == 0:
                settled[0] = True
                self.broker.ack(d)
                if on_acked is not None:
                    on_acked()

        def failed(kind: str, mid: str, body: bytes, again: bool) -> None:
            if settled[0]:
                return
            self.metrics.publish_failures.labels(kind=kind).inc()
            if kind == "returned" and target == self.cfg.OutQueue and not again:
                if self.broker.declare_again(target, lambda: publish(mid, body, True)):
                    return
            settled[0] = True
            if kind != "returned":
                self.log.warning("reply_not_confirmed", msg_id=in_msg_id, kind=kind)
                self.broker.requeue(d)
            elif target == self.cfg.OutQueue:
                self.broker.dead_letter(
                    d,
                    d.body,
                    f"the reply came back unroutable from OutQueue {target}, even after "
                    "declaring the queue again",
                    "unroutable",
                )
            else:
                self.broker.dead_letter(
                    d, d.body, f"reply queue {target} (reply_to) does not exist", "unroutable"
                )

        def publish(mid: str, body: bytes, again: bool = False) -> None:
            if not self.broker.current(d):
                return  # the channel is gone: the redelivery is answered from the store
            self.broker.publish(
                "",
                target,
                body,
                amqp.properties(mid, in_msg_id),
                ok,
                lambda kind: failed(kind, mid, body, again),
            )

        for mid, body in messages:
            publish(mid, body)

    def _send_tx(
        self,
        d: Delivery,
        key: str,
        target: str,
        in_msg_id: str,
        messages: list[tuple[str, bytes]],
        on_acked: Optional[Any] = None,
        kept: Optional[tuple[str, bytes]] = None,
    ) -> None:
        """Partitions: publish the reply's messages and ack the request in one commit.

        Before the commit nothing is seen: a kill or a lost connection rolls both back and
        the next owner of the partition gets the request with no reply out.  A message
        returned unroutable comes back after the ack was committed: returned from OutQueue
        (deleted under us), OutQueue is declared again and the message published again
        with a confirm; returned again, or from a missing ``reply_to`` queue, the request
        body is dead-lettered (``dead_letter_body``).  If the connection closes during the
        commit, the stored reply ``kept`` goes back to the request's partition, for its
        owner to settle (daemon/indoubt.py).
        """

        def done(returned: set[str]) -> None:
            self._committed(key)
            self.committing[key] -= 1
            if self.committing[key] <= 0:
                del self.committing[key]
            if not returned:
                if on_acked is not None:
                    on_acked()
                return
            self.metrics.publish_failures.labels(kind="returned").inc(len(returned))
            back = [(mid, body) for mid, body in messages if mid in returned]
            if target != self.cfg.OutQueue:
                self.broker.dead_letter_body(
                    d.body, f"reply queue {target} (reply_to) does not exist", "unroutable"
                )
                return
            unroutable = (
                f"the reply came back unroutable from OutQueue {target}, even after "
                "declaring the queue again"
            )
            failed_once = [False]

            def failed(kind: str) -> None:
                if failed_once[0]:
                    return
                failed_once[0] = True
                self.metrics.publish_failures.labels(kind=kind).inc()
                if kind == "returned":
                    self.broker.dead_letter_body(d.body, unroutable, "unroutable")
                else:  # the request is acked: nothing is redelivered
                    self.log.error("reply_lost", msg_id=in_msg_id, kind=kind)

            def again() -> None:
                for mid, body in back:
                    if not self.broker.publish(
                        "", target, body, amqp.properties(mid, in_msg_id), _noop, failed
                    ):
                        failed("connection_lost")

            if not self.broker.declare_again(target, again):
                failed("connection_lost")

        messages_out = [(body, amqp.properties(mid, in_msg_id)) for mid, body in messages]
        settle = None
        if kept is not None:  # built only if the commit ends in doubt (rare)
            user, reply_id, reply = self.cfg.UserName, kept[0], kept[1]

            def settle() -> list[tuple[str, str, bytes, Any]]:
                limit = self.broker.max_message_size
                if limit is not None and len(d.body) + len(reply) > limit:
                    # request + whole reply over the broker's limit: the reply's own
                    # messages go again, straight to the client (a duplicate at best)
                    return [("", target, b, p) for b, p in messages_out]
                return [indoubt.message(user, d.queue, d.reply_to, d.body, reply_id, reply)]

        if self.broker.publish_ack(d, "", target, messages_out, done, settle):
            self.committing[key] += 1

    def _committed(self, key: str) -> None:
        """A reply of ours is committed: a commit in doubt of its request is settled here."""
        self.committed[key] = None
        if len(self.committed) > COMMITTED_KEPT:
            del self.committed[next(iter(self.committed))]

    def on_connection_lost(self) -> None:
        """The broker will redeliver: the waiting deliveries' tags are void."""
        self.committing.clear()  # rolled back, committed or in doubt: not in flight now
        for job in self.jobs.values():
            job.deliveries.clear()
        if self.balancer is not None:
            self.balancer.on_lost()
            self.drop_jobs()

    def drop_jobs(self) -> None:
        """Partitions: the broker gives our partitions to others now; stop reading at once.

        Another daemon gets the requests in flight here (redelivered) and opens its own
        sessions to their meters: a session of ours still running, or a job still queued in
        a worker, would be a second association.  The workers with jobs are killed (the
        kernel closes their sockets), the jobs forgotten; the replacements start clean.
        """
        if not self.jobs:
            return
        busy = {job.worker for job in self.jobs.values() if job.worker >= 0}  # -1: resolving
        self.log.warning("jobs_dropped", jobs=len(self.jobs), workers=len(busy))
        self.jobs.clear()
        self.by_key.clear()
        for idx in busy:
            self.workers.kill(self.workers.workers[idx], "partitions_lost")

    def serial_expired(self, d: Delivery, props: Any, body: bytes) -> None:
        """A serial request no owner took within SerialPortWait: answer it notok."""
        answer, text = partitions.expired_reply(self.cfg, props.headers, body)
        msg_id = extract_msg_id(body)
        if not answer or msg_id is None:
            self.broker.dead_letter(d, body, text, "serial_port")
            return
        rep = replymod.error_reply(msg_id, text)
        key = self.store.key_for(msg_id, body)
        self.answer(key, msg_id, rep["MsgID"], replymod.dumps(rep), [d])
        self._count("READ", "notok", time.monotonic())
        self.log.info("request", msg_id=msg_id, status="notok", error=text, rows=0)

    def partition_busy(self, queue: str) -> bool:
        """A job from this partition (or of unknown origin, after a reconnect) is running."""
        return any(
            not job.deliveries or any(d.queue == queue for d in job.deliveries)
            for job in self.jobs.values()
        )

    # --- results -------------------------------------------------------------------------
    def on_done(self, done: ipc.Done) -> None:
        job = self.jobs.get(done.job_id)
        if job is not None:
            self.complete(job, done.reply_id, done.body, done.status, done.rows, done.error)

    def on_orphans(self, orphans: list[tuple[int, bool]]) -> None:
        """A worker died with these jobs: answer the hung, retry the others once."""
        for jid, hung in orphans:
            job = self.jobs.get(jid)
            if job is None:
                continue
            if hung:
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
                self.workers.submit(job.worker, job.message())
                self.log.warning(
                    "request_retried", msg_id=job.msg_id, endpoint=job.settings.endpoint
                )

    def complete(
        self, job: Job, reply_id: str, body: bytes, status: str, rows: int, error: str
    ) -> None:
        self.jobs.pop(job.job_id, None)
        self.by_key.pop(job.key, None)
        if job.worker >= 0:
            self.workers.forget(job.worker, job.job_id)
        sent = self.answer(
            job.key, job.msg_id, reply_id, body, job.deliveries, split=job.request.split_reply
        )
        if sent == "refused":
            status, error = "notok", f"reply of {len(body)} bytes over the size limit"
        self._count("READ", status, job.t0)
        self.log.info(
            "request",
            msg_id=job.msg_id,
            endpoint=job.settings.endpoint,
            cmd=job.request.cmd,
            status=status,
            duration_ms=_ms(job.t0),
            rows=rows,
            attempts=job.attempts,
            **({"reply": sent} if sent != "whole" else {}),
            **({"error": error} if error else {}),
        )

    def complete_error(self, job: Job, message: str) -> None:
        rep = replymod.error_reply(job.msg_id, message)
        self.complete(job, rep["MsgID"], replymod.dumps(rep), "notok", 0, message)

    def _count(self, cmd: str, status: str, t0: float) -> None:
        counter = self.counters.get((cmd, status))
        if counter is None:  # a few (command, status) pairs: labels() once for each
            counter = self.counters[(cmd, status)] = self.metrics.requests.labels(
                cmd=cmd, status=status
            )
        counter.inc()
        self.metrics.request_duration.observe(time.monotonic() - t0)

    def _on_error(self, e: BaseException) -> None:
        """An exception while handling a worker message (outside a pika callback)."""
        if isinstance(e, amqp.CONNECTION_ERRORS):
            self.broker.connection_lost(e)
        else:
            self.log.exception("internal_error", error=type(e).__name__)

    # --- stop ----------------------------------------------------------------------------
    def begin_stop(self, why: str) -> None:
        self.stopping = True
        self.stop_deadline = time.monotonic() + self.cfg.ShutdownGrace
        self.log.info(
            "stopping", signal=why, in_flight=len(self.jobs), grace_s=self.cfg.ShutdownGrace
        )
        self.broker.stop_consuming()

    def fail(self, error: GatewayError) -> None:
        """A fatal error (configuration, workers that cannot start): stop now."""
        if self.fatal is None:
            self.fatal = error
            self.log.error("fatal", error=error.message)
        self.stopping = True
        self.broker.stopping = True
        self.stop_deadline = 0.0

    def finish_stop(self) -> None:
        """Grace over: requeue what is left, close the broker connection, stop the loop."""
        if self.closing:
            return
        self.closing = True
        left = list(self.jobs.values())
        if left:
            self.log.warning("requeued_at_stop", requests=len(left))
        unsent = len(self.broker.replay) + len(self.broker.replaying)
        if unsent:  # no connection again to send them on: those replies may be lost
            self.log.error("commit_in_doubt_not_sent", messages=unsent)
        self.broker.close([d for job in left for d in job.deliveries])

    # --- main loop -----------------------------------------------------------------------
    def tick(self) -> None:
        """Every TICK_SECONDS: signals, supervision, first connect, end of the stop."""
        try:
            self.handle_signals()
            now = time.monotonic()
            self.broker.watch(now)
            if self.balancer is not None:
                self.balancer.tick(now)
            elif self.inqueue_watch is not None:
                self.inqueue_watch.tick(now)
            if now - self.last_supervise >= SUPERVISE_SECONDS:
                self.last_supervise = now
                self.workers.supervise()
            if not self.started_consuming and not self.stopping and self.workers.all_ready:
                self.started_consuming = True
                self.log.info(
                    "workers_ready",
                    workers=len(self.workers),
                    sessions_per_worker=self.cfg.SessionsPerWorker,
                )
                self.broker.connect()
            if self.stopping and (
                (not self.jobs and not self.broker.unsettled()) or now >= self.stop_deadline
            ):
                self.finish_stop()
        except amqp.CONNECTION_ERRORS as e:
            self.broker.connection_lost(e)
        except GatewayError as e:
            self.fail(e)
        except Exception as e:  # noqa: BLE001 - keep serving
            self.log.exception("internal_error", error=type(e).__name__)
        if not self.closing:
            self.ioloop.call_later(TICK_SECONDS, self.tick)

    def run(self) -> int:
        """Serve until stopped; raises the fatal error, if any."""
        # the metrics port first: a port in use stops the start before any worker exists
        self.metrics.serve(self.cfg.MetricsPort, self.cfg.MetricsAddress)
        self.install_signals()
        self.workers.start()
        self.ioloop.call_later(TICK_SECONDS, self.tick)
        try:
            self.ioloop.start()
        finally:
            self.resolver.close()
            self.workers.stop()
            self.store.close()
            self.metrics.broker_connected.set(0)
        if self.fatal is not None:
            raise self.fatal
        self.log.info("stopped")
        return 0


def _json_object(raw: bytes) -> Optional[dict]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def _noop() -> None:
    pass


def _ms(t0: float) -> float:
    return round((time.monotonic() - t0) * 1000, 1)
