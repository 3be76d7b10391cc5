# SPDX-License-Identifier: GPL-2.0-or-later
"""The daemon's broker adapter: one asynchronous connection (pika SelectConnection).

It runs on the master's IOLoop and does the AMQP part of the job only: connect, declare
the topology, consume InQueue, publish with pipelined confirms (one ``ConfirmTracker``),
ack/requeue, dead-letter, and reconnect with capped exponential back-off.  What to do with
a delivery is the master's (and the intake's) business.

Everything is asynchronous, the topology too: one channel declares the dead-letter
exchange and queue, InQueue and OutQueue, then turns on confirms, sets the prefetch and
consumes.  Nothing here blocks the loop, so worker heartbeats and replies are never held
up by a slow or silent broker.

Delivery tags belong to one channel: each new channel starts a new *generation*, and a
``Delivery`` of an older one is void (the broker redelivers it; the reply store answers).

With ``Partitions`` > 0 a second channel, in transaction mode, consumes InQueue (each
request moved to its partition: publish in one commit, ack in the next) and the queues
whose requests are read here (partitions, serial ports, expired serial requests): a reply
and the ack of its request are one ``tx_commit`` (``publish_ack``), so a kill or a lost
connection never leaves a reply out with its request redelivered to another daemon.
Both channels share one generation: either one closing closes the connection.

Broker-side surprises: a consumer cancelled by the broker (InQueue deleted) is handled
like a lost channel (logged, counted, topology declared again, with the same back-off);
the back-off starts again at 0.5 s only after the connection has served for
``HEALTHY_SECONDS``, so a channel that dies right after each consume (a reply the broker
refuses) is retried ever more slowly; a channel closed for a message over the broker's
``max_message_size`` teaches the daemon that limit; a queue a reply came back unroutable
from can be declared again (``declare_again``).

Over 500 lines because the channel's life is one state machine (connect, declare, confirm,
consume, cancel, close, reconnect), for the confirm channel and the transactional one,
whose callbacks share one generation counter; split across modules, each callback would
need the others' state (the commit bookkeeping itself is ``amqp.TxTracker``).
Scale-out's part of it lives in ``partitions``.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional

import pika
import pika.adapters.select_connection
import pika.exceptions as pex

from .. import reply as replymod
from ..config import Config
from ..errors import BrokerError, ConfigError, GatewayError
from ..metrics import Metrics
from . import amqp, partitions

IOLoop = pika.adapters.select_connection.IOLoop
REASON_HEADER = "x-dlms2amqp-reason"
#: consuming this long without a failure resets the reconnect back-off to 0.5 s
HEALTHY_SECONDS = 10.0
# RabbitMQ's 406 text for a message over max_message_size (the body's size)
_TOO_LARGE = re.compile(r"message size (\d+) is larger than (?:configured )?max size (\d+)")

OnOk = Callable[[], None]
OnFail = Callable[[str], None]  # "nacked" | "returned" | "connection_lost"


@dataclass
class Delivery:
    gen: int  # channel generation; tags of older generations are void
    tag: int
    reply_to: Optional[str]
    body: bytes = b""  # the request as delivered (dead-lettered as it came)
    queue: str = ""  # the queue it came from (InQueue or a partition)
    tx: bool = False  # came on the transactional channel (partitions): acked in a commit


class Broker:
    """Consumer and publisher of the master, on its IOLoop."""

    def __init__(
        self,
        cfg: Config,
        ioloop: Any,
        metrics: Metrics,
        log: Any,
        on_delivery: Callable[[Delivery, Any, Any, bytes], None],
        on_lost: Callable[[], None],
        on_fatal: Callable[[GatewayError], None],
        name: str,
    ):
        self.cfg = cfg
        self.ioloop = ioloop
        self.metrics = metrics
        self.log = log
        self.on_delivery = on_delivery
        self.on_lost = on_lost
        self.on_fatal = on_fatal
        self.name = name  # shown by rabbitmqctl list_connections
        self.conn: Any = None
        self.ch: Any = None
        self.consumer_tag: Optional[str] = None
        self.tags: dict[str, str] = {}  # consumer tag -> queue (partitions: several)
        self.ready = False  # consuming on the current channel
        self.gen = 0
        self.unacked = 0
        self.failures = 0  # failed connections since the last healthy period
        self.consuming_since = 0.0
        self.max_message_size: Optional[int] = None  # the broker's, once it refused one
        self.redeclaring: dict[str, list[Callable[[], None]]] = {}
        self.reconnect_timer: Any = None
        self.confirms: amqp.ConfirmTracker[tuple[OnOk, OnFail]] = amqp.ConfirmTracker()
        # partitions: a second channel in transaction mode (tx_select) consumes the queues
        # whose requests are read here; a reply and the ack of its request are one commit
        self.txch: Any = None
        self.tx = amqp.TxTracker()
        #: messages of commits in doubt, published again on the next connection
        self.replay: list[tuple[str, str, bytes, Any]] = []
        self.replaying: dict[int, tuple[str, str, bytes, Any]] = {}  # sent, not confirmed
        self.consumers_made = 0  # for consumer tags of our own on the tx channel
        self.declaring: Optional[tuple[str, str, Optional[dict]]] = None
        self.channel_error: Optional[BaseException] = None
        self.stopping = False  # no (re)connects, no consuming
        self.closing = False  # close() was called: a closed connection ends the loop
        self.rx_bytes = -1  # bytes received, and when they last changed
        self.rx_seen_at = 0.0

    # --- connection ----------------------------------------------------------------------
    def connect(self) -> None:
        """Open the connection; the rest follows in callbacks."""
        self.reconnect_timer = None
        if self.stopping or self.conn is not None:
            return
        try:
            params = amqp.connection_parameters(self.cfg, name=self.name)
        except ConfigError as e:
            self.on_fatal(e)
            return
        self.channel_error = None
        params.host, params.port = partitions.pick_address(self.cfg, self.failures)
        self.conn = pika.SelectConnection(
            params,
            on_open_callback=lambda c: c.channel(on_open_callback=self.guard(self._on_channel)),
            on_open_error_callback=lambda _c, e: self.connection_lost(e),
            on_close_callback=self._on_connection_closed,
            custom_ioloop=self.ioloop,
        )

    def _on_channel(self, ch: Any) -> None:
        self.ch = ch
        ch.add_on_close_callback(self._on_channel_closed)
        ch.add_on_return_callback(
            lambda _c, _m, props, _b: self.confirms.on_return(props.message_id)
        )
        ch.add_on_cancel_callback(self.guard(self._on_cancelled))
        self._declare(partitions.topology(self.cfg))

    def _declare(self, steps: list[tuple[str, str, Optional[dict]]]) -> None:
        """Declare the topology one step after the other, then consume."""
        ch = self.ch
        if ch is None:
            return
        if not steps:
            self.declaring = None
            ch.confirm_delivery(
                self.guard(self._on_confirm),
                callback=lambda _f: ch.basic_qos(
                    prefetch_count=partitions.consumer_prefetch(self.cfg),
                    callback=self.guard(
                        self._open_tx_channel if self.cfg.Partitions > 0 else self._consume
                    ),
                ),
            )
            return
        self.declaring = step = steps[0]
        what, name, arguments = step
        then = self.guard(lambda _f: self._declare(steps[1:]))
        if what == "exchange":
            ch.exchange_declare(name, "fanout", durable=True, callback=then)
        elif what == "hash_exchange":
            ch.exchange_declare(name, partitions.EXCHANGE_TYPE, durable=True, callback=then)
        elif what == "xexchange":
            spec = arguments or {}
            ch.exchange_declare(
                name,
                spec.get("type", "fanout"),
                durable=True,
                arguments=spec.get("arguments"),
                callback=then,
            )
        elif what == "xbind":
            spec = arguments or {}
            ch.queue_bind(name, spec["exchange"], routing_key=spec["routing_key"], callback=then)
        elif what == "hash_bind":
            ch.queue_bind(
                name,
                partitions.exchange_name(self.cfg),
                routing_key=partitions.WEIGHT,
                callback=then,
            )
        elif what == "bind":
            ch.queue_bind(name, self.cfg.dead_letter_exchange, routing_key="", callback=then)
        else:
            ch.queue_declare(name, durable=True, arguments=arguments or None, callback=then)

    def _open_tx_channel(self, _frame: Any = None) -> None:
        """Partitions: the channel that consumes what is read here, in transaction mode.

        Replies and the ack of their request go out on it and are committed together
        (``publish_ack``): a kill or a lost connection before the commit rolls both back
        (the request is redelivered, nobody saw a reply), after it both hold.  InQueue
        is consumed here too: a move publishes in one commit and acks in the next
        (``publish_ack(ack=False)``, ``partitions.Mover``).  Confirms and transactions
        exclude each other on one channel: the presence queue, the in-doubt messages and
        the dead letters of a request already acked (``dead_letter_body``) keep the
        confirm channel; a delivery of this channel is dead-lettered on it.
        """
        if self.conn is None or not self.conn.is_open or self.stopping:
            return
        self.conn.channel(on_open_callback=self.guard(self._on_tx_channel))

    def _on_tx_channel(self, ch: Any) -> None:
        self.txch = ch
        # pika rejects a delivery that reaches a consumer it cancelled by itself
        # (Channel._on_deliver -> self.basic_reject): on this channel that reject must wait
        # for the commit in flight like every other command, or the broker closes the
        # connection (504), and it must be committed, or the request stays unacked here
        raw_reject = ch.basic_reject

        def reject_in_tx(delivery_tag: int = 0, requeue: bool = True) -> None:
            def op() -> None:
                # this channel still (a tag is void on another); not self.gen: _consume
                # starts the generation after this channel opened
                if self.txch is ch and ch.is_open:
                    raw_reject(delivery_tag, requeue=requeue)
                    self._sent_on_tx()

            self._on_tx(op)

        ch.basic_reject = reject_in_tx
        ch.add_on_close_callback(self._on_tx_channel_closed)
        ch.add_on_return_callback(
            lambda _c, m, props, _b: self.tx.on_return(props.message_id, m.routing_key)
        )
        ch.add_on_cancel_callback(self.guard(self._on_cancelled))
        ch.tx_select(
            callback=self.guard(
                lambda _f: ch.basic_qos(
                    prefetch_count=partitions.consumer_prefetch(self.cfg),
                    callback=self.guard(self._consume),
                )
            )
        )

    def _on_tx_channel_closed(self, ch: Any, reason: BaseException) -> None:
        if ch is not self.txch:
            return
        self.txch = None
        if isinstance(reason, pex.ChannelClosedByBroker) and reason.reply_code == 406:
            self._learn_size_limit(str(reason.reply_text))
        if self.conn is not None and self.conn.is_open and not self.closing:
            self.log.warning("broker_channel_closed", error=str(reason), channel="tx")
            self.channel_error = reason
            self.conn.close()  # reconnect through _on_connection_closed

    def _channel_for(self, queue: str) -> Any:
        """The channel a queue is consumed on: partitions' reads on the tx channel."""
        if self.txch is not None and queue != partitions.presence_queue(self.cfg):
            return self.txch
        return self.ch

    def _consume(self, _frame: Any = None) -> None:
        if self.ch is None or self.stopping:
            return
        self.confirms.reset()
        self.tx.reset()
        self.gen += 1
        self.tags = {}
        if self.txch is None:
            self.consumer_tag = self.ch.basic_consume(
                self.cfg.InQueue, self.guard(self._on_message), callback=self._on_consume_ok
            )
        else:  # partitions: a move is a publish and an ack in one commit (partitions.Mover)
            self.consumer_tag = f"tx{self.gen}.in"
            self.txch.basic_consume(
                self.cfg.InQueue,
                self.guard(self._on_message),
                consumer_tag=self.consumer_tag,
                callback=self._on_consume_ok,
            )
        self.tags[self.consumer_tag] = self.cfg.InQueue
        for q in partitions.consumed_queues(self.cfg)[1:]:
            self.consume_queue(q)

    # --- partitions (daemon/partitions.py) -------------------------------------------------
    def consume_queue(self, queue: str) -> None:
        """Subscribe to one more queue on the current channel (a partition)."""
        if self.ch is None or self.stopping or queue in self.tags.values():
            return
        ch = self._channel_for(queue)
        if ch is not self.txch:
            tag = ch.basic_consume(queue, self.guard(self._on_message))
            self.tags[tag] = queue
            return
        self.consumers_made += 1
        tag = f"tx{self.gen}.{self.consumers_made}"  # ours: the consume may wait for a commit
        self.tags[tag] = queue
        gen = self.gen
        self._on_tx(
            lambda: (
                gen == self.gen
                and ch.basic_consume(queue, self.guard(self._on_message), consumer_tag=tag)
            )
        )

    def cancel_queue(self, queue: str, on_ok: Callable[[], None]) -> None:
        """Cancel our consumer on ``queue``; ``on_ok`` once the broker confirmed it."""
        tag = next((t for t, q in self.tags.items() if q == queue), None)
        if self.ch is None or tag is None:
            return
        gen = self.gen

        def done(_frame: Any) -> None:
            self.tags.pop(tag, None)
            if gen == self.gen:
                on_ok()

        ch = self._channel_for(queue)
        if ch is self.txch:
            self._on_tx(lambda: gen == self.gen and ch.basic_cancel(tag, callback=self.guard(done)))
        else:
            ch.basic_cancel(tag, callback=self.guard(done))

    def _replay(self) -> None:
        """Publish, with confirms, what settles the commits in doubt (connection_lost)."""
        pending, self.replay = self.replay, []
        for item in pending:
            exchange, key, body, props = item
            self.replaying[id(item)] = item  # until confirmed: a lost connection keeps it

            def confirmed(item: tuple = item) -> None:
                self.replaying.pop(id(item), None)

            def failed(kind: str, item: tuple = item) -> None:
                self.replaying.pop(id(item), None)
                if kind == "returned":  # its queue is gone: nobody can take it
                    self.log.error("replay_returned", message_id=item[3].message_id)
                else:
                    self.replay.append(item)  # the next connection tries again

            if not self.publish(exchange, key, body, props, confirmed, failed):
                self.replaying.pop(id(item), None)
                self.replay.append(item)
        if pending:
            self.metrics.replies_replayed.inc(len(pending))
            self.log.warning("commit_in_doubt_sent", messages=len(pending))

    def count_consumers(self, queue: str, on_count: Callable[[int], None]) -> None:
        """Passive declare: the consumer count of ``queue`` (ours included)."""
        if self.ch is None or not self.ready:
            return
        self.ch.queue_declare(
            queue,
            passive=True,
            callback=self.guard(lambda f: on_count(int(f.method.consumer_count))),
        )

    def _on_consume_ok(self, _frame: Any) -> None:
        self.ready = True
        self._replay()
        if self.failures:
            self.metrics.broker_reconnects.inc()
        # the back-off is not reset here: see watch() (HEALTHY_SECONDS)
        self.consuming_since = time.monotonic()
        self.metrics.broker_connected.set(1)
        self.log.info(
            "consuming",
            broker=amqp.describe(self.cfg),
            queue=self.cfg.InQueue,
            prefetch=self.cfg.prefetch,
            queue_type=self.cfg.QueueType,
        )

    def _on_cancelled(self, frame: Any) -> None:
        """The broker cancelled our consumer (InQueue deleted, leader moved): start over.

        Like a lost channel: the connection is closed, the reconnect (with the back-off)
        declares the topology again, InQueue included, and consumes again.
        """
        if self.stopping:
            return
        self.metrics.consumer_cancelled.inc()
        self.ready = False
        self.metrics.broker_connected.set(0)
        tag = getattr(getattr(frame, "method", None), "consumer_tag", None) or self.consumer_tag
        self.log.warning(
            "broker_cancelled_consumer",
            queue=self.cfg.InQueue,
            consumer_tag=tag,
            action="reconnect, declare the queues again, consume again",
        )
        self.channel_error = BrokerError(
            f"Broker {amqp.describe(self.cfg)} cancelled the consumer of {self.cfg.InQueue} "
            "(queue deleted or moved)"
        )
        if self.conn is not None and self.conn.is_open:
            self.conn.close()

    def _on_channel_closed(self, _ch: Any, reason: BaseException) -> None:
        self.ch = None
        if self.declaring is not None and isinstance(reason, pex.ChannelClosedByBroker):
            what, name, arguments = self.declaring
            self.declaring = None
            if reason.reply_code == 406:  # PRECONDITION_FAILED: not ours to fix by retrying
                if what == "exchange":
                    self.on_fatal(amqp.exchange_mismatch(self.cfg))
                else:
                    self.on_fatal(amqp.queue_mismatch(self.cfg, name, arguments, reason.reply_text))
                return
        if isinstance(reason, pex.ChannelClosedByBroker) and reason.reply_code == 406:
            self._learn_size_limit(str(reason.reply_text))
        if self.conn is not None and self.conn.is_open and not self.closing:
            self.log.warning("broker_channel_closed", error=str(reason))
            self.channel_error = reason
            self.conn.close()  # reconnect through _on_connection_closed

    def _learn_size_limit(self, text: str) -> None:
        """The broker refused a message over its max_message_size: keep below it from now."""
        m = _TOO_LARGE.search(text)
        if m is None:
            return
        size, limit = int(m.group(1)), int(m.group(2))
        if self.max_message_size is None or limit < self.max_message_size:
            self.max_message_size = limit
        self.log.error(
            "broker_refused_message_size",
            bytes=size,
            broker_max_message_size=limit,
            MaxReplyBytes=self.cfg.MaxReplyBytes,
            hint="set MaxReplyBytes below the broker's max_message_size; until a restart "
            "the daemon keeps replies within the broker's limit",
        )

    def _on_connection_closed(self, _conn: Any, reason: BaseException) -> None:
        if self.closing:
            self.conn = self.ch = None
            self.ioloop.stop()
            return
        if (
            self.declaring is not None
            and self.declaring[0] == "hash_exchange"
            and isinstance(reason, pex.ConnectionClosedByBroker)
            and reason.reply_code == 503
        ):
            self.on_fatal(
                ConfigError(
                    f"Broker {amqp.describe(self.cfg)} does not know the exchange type "
                    f"{partitions.EXCHANGE_TYPE} needed by Partitions {self.cfg.Partitions}"
                    f" in {self.cfg.path}: enable the plugin on every node (rabbitmq-plugins "
                    f"enable {partitions.PLUGIN}), or set Partitions to 0"
                )
            )
            return
        self.connection_lost(self.channel_error or reason)

    def connection_lost(self, error: BaseException) -> None:
        """Forget the channel: its delivery tags are void, the broker will redeliver."""
        err = error if isinstance(error, GatewayError) else amqp.broker_error(self.cfg, error)
        self.failures += 1
        delay = min(self.cfg.ReconnectMaxDelay, 0.5 * 2 ** min(self.failures - 1, 16))
        self.log.warning("broker_connection_lost", error=str(err), retry_in=round(delay, 2))
        conn, self.conn, self.ch, self.consumer_tag = self.conn, None, None, None
        self.txch = None
        self.tags = {}
        if conn is not None and conn.is_open:
            try:
                conn.close()
            except amqp.CONNECTION_ERRORS:
                pass
        self.ready = False
        self.declaring = None
        self.redeclaring.clear()  # their deliveries are void now
        self.gen += 1
        left = self.confirms.reset()
        if self.replaying:  # in-doubt messages sent but not confirmed: the next connection
            self.replay.extend(self.replaying.values())
            self.replaying.clear()
        doubt = self.tx.in_doubt()
        if doubt:
            # the commit may have settled the acks and lost the publishes, or rolled both
            # back: once connected, its replies go to their partitions' owners to settle
            self.replay.extend(doubt)
            self.log.warning("commit_in_doubt", messages=len(doubt))
        uncommitted = self.tx.reset()  # rolled back by the broker, or committed unseen
        if left or uncommitted:
            self.metrics.publish_failures.labels(kind="connection_lost").inc(
                len(left) + uncommitted
            )
        self.metrics.broker_connected.set(0)
        self.unacked = 0
        self.metrics.in_flight.set(0)
        self.on_lost()
        if not self.stopping and self.reconnect_timer is None:
            self.reconnect_timer = self.ioloop.call_later(delay, self.guard(self.connect))

    def guard(self, fn: Callable[..., None]) -> Callable[..., None]:
        """Wrap a callback: a bug must be logged, not stop the event loop silently."""

        def call(*args: Any) -> None:
            try:
                fn(*args)
            except amqp.CONNECTION_ERRORS as e:
                self.connection_lost(e)
            except GatewayError as e:
                self.on_fatal(e)
            except Exception as e:  # noqa: BLE001 - keep serving
                self.log.exception("internal_error", error=type(e).__name__)

        return call

    def watch(self, now: float) -> None:
        """Drop a connection that has received nothing for 1.5 heartbeats.

        The broker sends a heartbeat every half heartbeat, so a healthy connection is
        never that quiet.  pika's own check only fires after up to 2 x (heartbeat + 5) s,
        which leaves replies waiting four times longer after a silent network cut.
        """
        if self.failures and self.ready and now - self.consuming_since >= HEALTHY_SECONDS:
            self.failures = 0  # served long enough: the next failure retries after 0.5 s
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
                pex.AMQPHeartbeatTimeout(f"nothing received from the broker for {silent:.0f} s")
            )

    # --- deliveries ----------------------------------------------------------------------
    def _on_message(self, ch: Any, method: Any, props: Any, body: bytes) -> None:
        self.unacked += 1
        self.metrics.in_flight.set(self.unacked)
        d = Delivery(
            self.gen,
            method.delivery_tag,
            props.reply_to or None,
            body,
            self.tags.get(method.consumer_tag, self.cfg.InQueue),
            tx=ch is not None and ch is self.txch,
        )
        self.on_delivery(d, method, props, body)

    def current(self, d: Delivery) -> bool:
        """The delivery's tag is valid (same channel)."""
        return d.gen == self.gen and (self.txch if d.tx else self.ch) is not None

    def ack(self, d: Delivery) -> None:
        if self.current(d):
            if d.tx:
                self._on_tx(lambda: self._tx_send(d, lambda ch: ch.basic_ack(d.tag)))
            else:
                self.ch.basic_ack(d.tag)
            self.unacked -= 1
            self.metrics.in_flight.set(self.unacked)

    def requeue(self, d: Delivery) -> None:
        if self.current(d):
            if d.tx:  # transactional too
                self._on_tx(lambda: self._tx_send(d, lambda ch: ch.basic_nack(d.tag, requeue=True)))
            else:
                self.ch.basic_nack(d.tag, requeue=True)
            self.unacked -= 1
            self.metrics.in_flight.set(self.unacked)

    # --- transactions (partitions) -------------------------------------------------------
    def publish_ack(
        self,
        d: Delivery,
        exchange: str,
        routing_key: str,
        messages: list[tuple[bytes, pika.BasicProperties]],
        on_done: Callable[[set[str]], None],
        in_doubt: Optional[Callable[[], list[tuple[str, str, bytes, Any]]]] = None,
        ack: bool = True,
    ) -> bool:
        """Publish ``messages`` and ack ``d`` in one transaction of the tx channel.

        ``ack`` False: only publish (in ``d``'s name); the caller acks ``d`` in a later
        transaction, once ``on_done`` said this one committed (a request's move:
        ``partitions.Mover``), so nothing goes in doubt - a commit that may have lost
        the publish has not settled the ack.

        ``in_doubt``: makes what to publish, with confirms, on the next connection if this
        one closes while the commit is in flight (default: ``messages`` again; a reply
        gives its settling message for the partition, daemon/indoubt.py).

        ``on_done(returned)`` runs once the broker committed them, with the message ids
        that came back unroutable (the broker returns them before the commit-ok; the ack
        is committed then all the same).  Never called when the channel is lost first:
        the broker then rolled back (the request is redelivered) or committed without
        telling us (the request is answered and gone).  False when the tag is void.
        """
        if not d.tx or not self.current(d):
            return False
        if ack:
            self.unacked -= 1
            self.metrics.in_flight.set(self.unacked)

        def send(ch: Any) -> None:
            for body, props in messages:
                ch.basic_publish(exchange, routing_key, body, props, mandatory=True)
            sent = [(p.message_id, routing_key) for _b, p in messages]
            if not ack:  # in doubt: the request is redelivered, as it is not acked
                self.tx.add(sent, on_done)
                return
            ch.basic_ack(d.tag)
            again = in_doubt or (lambda: [(exchange, routing_key, b, p) for b, p in messages])
            self.tx.add(sent, on_done, again)

        self._on_tx(lambda: self._tx_send(d, send))
        return True

    def _on_tx(self, op: Callable[[], Any]) -> None:
        """Run an operation of the tx channel now, or after the commit in flight."""
        if self.tx.committing is not None:
            self.tx.backlog.append(op)
        else:
            op()

    def _tx_send(self, d: Delivery, send: Callable[[Any], None]) -> None:
        """Send one delivery's operations on the tx channel (if its tag is still valid)."""
        if not self.current(d):
            return  # void: the broker rolled back or redelivers
        send(self.txch)
        self._sent_on_tx()

    def _sent_on_tx(self) -> None:
        """Something went out on the tx channel: it belongs to the next commit."""
        self.tx.dirty = True
        self._commit()

    def _commit(self) -> None:
        """Commit what was sent on the tx channel, unless a commit is in flight."""
        ch = self.txch
        if ch is None or not self.tx.begin():
            return
        gen = self.gen
        ch.tx_commit(callback=self.guard(lambda _f: self._on_commit_ok(gen)))

    def _on_commit_ok(self, gen: int) -> None:
        if gen != self.gen:
            return
        done = self.tx.committed()
        self.metrics.tx_commits.inc()
        self.metrics.tx_deliveries.inc(len(done))
        # what came up during the commit goes out now, then what the callbacks send, all
        # in the next transaction: nothing may commit while this is being sent
        backlog, self.tx.backlog = self.tx.backlog, []
        self.tx.flushing = True
        try:
            for op in backlog:
                try:
                    op()
                except amqp.CONNECTION_ERRORS:
                    raise
                except Exception as e:  # noqa: BLE001 - the callbacks below must still run:
                    # they ack the moves this commit published (else stuck until reconnect)
                    self.log.exception("commit_backlog_failed", error=type(e).__name__)
            for on_done, returned in done:
                try:
                    on_done(returned)
                except amqp.CONNECTION_ERRORS:
                    raise
                except Exception as e:  # noqa: BLE001 - the others' callbacks still run
                    self.log.exception("commit_callback_failed", error=type(e).__name__)
        finally:
            self.tx.flushing = False
        self._commit()

    def unsettled(self) -> bool:
        """Publishes waiting for their confirm, or operations waiting for their commit."""
        return bool(self.confirms) or self.tx.busy()

    # --- publishing ----------------------------------------------------------------------
    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        props: pika.BasicProperties,
        on_ok: OnOk,
        on_fail: OnFail,
    ) -> bool:
        """Publish with confirm; ``on_ok()`` or ``on_fail(kind)`` runs when the broker answers.

        Confirms are pipelined (no wait per message); the caller acks the request in
        ``on_ok``.  False when not connected (the request will be redelivered).
        """
        if not self.ready or self.ch is None:
            return False
        self.ch.basic_publish(exchange, routing_key, body, props, mandatory=True)
        self.confirms.published(props.message_id, (on_ok, on_fail))
        return True

    def declare_again(self, queue: str, then: Callable[[], None], bind: bool = False) -> bool:
        """Declare ``queue`` again (durable, its arguments of the topology), then call ``then``.

        For OutQueue after a reply to it came back unroutable (somebody deleted it), and
        for the dead-letter queue (``bind``: bound to the dead-letter exchange again).
        Declares of one queue at once are merged.  False when not connected (``then``
        is not called: the deliveries waiting for it are void).
        """
        ch = self.ch
        if not self.ready or ch is None:
            return False
        waiting = self.redeclaring.setdefault(queue, [])
        waiting.append(then)
        if len(waiting) == 1:
            self.metrics.queue_redeclared.inc()
            self.log.warning(
                "queue_declared_again", queue=queue, why="message came back unroutable"
            )

            def declared(_frame: Any) -> None:
                for fn in self.redeclaring.pop(queue, []):
                    fn()

            def bound(_frame: Any) -> None:
                ch.queue_bind(
                    queue,
                    self.cfg.dead_letter_exchange,
                    routing_key="",
                    callback=self.guard(declared),
                )

            arguments = next(
                (a for w, n, a in partitions.topology(self.cfg) if w == "queue" and n == queue),
                None,
            )
            ch.queue_declare(
                queue,
                durable=True,
                arguments=arguments or None,
                callback=self.guard(bound if bind else declared),
            )
        return True

    def _on_confirm(self, frame: Any) -> None:
        for (on_ok, on_fail), outcome in self.confirms.on_confirm(frame.method):
            if outcome == "ok":
                on_ok()
            else:
                on_fail(outcome)

    def _dead_props(self, reason: str) -> pika.BasicProperties:
        return pika.BasicProperties(
            delivery_mode=amqp.PERSISTENT,
            content_type="application/octet-stream",
            message_id="dead-" + replymod.new_msg_id(),
            headers={REASON_HEADER: reason},
        )

    def dead_letter_body(self, body: bytes, reason: str, kind: str, again: bool = False) -> None:
        """Dead-letter a request that is acked already (a reply returned after its commit).

        Published with a confirm on the confirm channel; the dead-letter queue is declared
        again once if it is gone.  Nothing left to requeue when this fails: logged.
        """
        props = self._dead_props(reason)

        def ok() -> None:
            self.metrics.dead_lettered.labels(reason=kind).inc()

        def failed(why: str) -> None:
            if why == "returned" and not again:
                resend = lambda: self.dead_letter_body(body, reason, kind, True)  # noqa: E731
                if self.declare_again(self.cfg.dead_letter_queue, resend, bind=True):
                    return
            self.log.error("dead_letter_failed", kind=why, acked=True, bytes=len(body))

        if self.publish(self.cfg.dead_letter_exchange, "", body, props, ok, failed):
            self.log.warning("dead_lettered", reason=reason, bytes=len(body))
        else:
            self.log.error("dead_letter_failed", kind="connection_lost", acked=True)

    def dead_letter(self, d: Delivery, body: bytes, reason: str, kind: str) -> None:
        """Publish the request to the dead-letter exchange with its reason, then ack it.

        On the tx channel both are one commit; a return (dead-letter queue deleted) comes
        after the ack is committed, so the body is published again by ``dead_letter_body``.
        """
        if not self.current(d):
            return
        props = self._dead_props(reason)
        if d.tx:

            def done(returned: set[str]) -> None:
                if returned:
                    self.dead_letter_body(body, reason, kind)
                else:
                    self.metrics.dead_lettered.labels(reason=kind).inc()

            if self.publish_ack(d, self.cfg.dead_letter_exchange, "", [(body, props)], done):
                self.log.warning("dead_lettered", reason=reason, bytes=len(body))
            return

        def ok() -> None:
            self.ack(d)
            self.metrics.dead_lettered.labels(reason=kind).inc()

        def failed(why: str, again: bool) -> None:
            if why == "returned" and not again:
                # the dead-letter queue was deleted: declare and bind it again, retry once
                if self.declare_again(self.cfg.dead_letter_queue, resend, bind=True):
                    return
            self.log.error("dead_letter_failed", kind=why)
            self.requeue(d)

        def send(again: bool = False) -> bool:
            return self.current(d) and self.publish(
                self.cfg.dead_letter_exchange, "", body, props, ok, lambda w: failed(w, again)
            )

        def resend() -> None:
            send(True)

        if send():
            self.log.warning("dead_lettered", reason=reason, bytes=len(body))

    # --- stop ----------------------------------------------------------------------------
    def stop_consuming(self) -> None:
        """No new deliveries, no reconnect; publishing and acking go on."""
        self.stopping = True
        if self.reconnect_timer is not None:
            self.ioloop.remove_timeout(self.reconnect_timer)
            self.reconnect_timer = None
        if self.ch is not None:
            consumers = list(self.tags.items())
            if not consumers and self.consumer_tag:
                consumers = [(self.consumer_tag, self.cfg.InQueue)]
            for tag, queue in consumers:
                ch = self._channel_for(queue)
                if ch is self.txch:
                    self._on_tx(partial(ch.basic_cancel, tag))
                else:
                    ch.basic_cancel(tag)

    def close(self, requeue: list[Delivery]) -> None:
        """Requeue what is left, close the connection; the loop stops once it is closed."""
        self.stopping = self.closing = True
        if self.conn is not None and self.conn.is_open:
            try:
                for d in requeue:
                    if not d.tx:  # the tx channel's close requeues its deliveries itself
                        self.requeue(d)
                self.conn.close()
            except amqp.CONNECTION_ERRORS:
                self.ioloop.stop()
            self.ioloop.call_later(10, self.ioloop.stop)  # the broker may not answer
        else:
            self.ioloop.stop()
