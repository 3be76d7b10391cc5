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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import pika
import pika.adapters.select_connection
import pika.exceptions as pex

from .. import reply as replymod
from ..config import Config
from ..errors import ConfigError, GatewayError
from ..metrics import Metrics
from . import amqp

IOLoop = pika.adapters.select_connection.IOLoop
REASON_HEADER = "x-dlms2amqp-reason"

OnOk = Callable[[], None]
OnFail = Callable[[str], None]  # "nacked" | "returned" | "connection_lost"


@dataclass
class Delivery:
    gen: int  # channel generation; tags of older generations are void
    tag: int
    reply_to: Optional[str]


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
        self.ready = False  # consuming on the current channel
        self.gen = 0
        self.unacked = 0
        self.failures = 0
        self.reconnect_timer: Any = None
        self.confirms: amqp.ConfirmTracker[tuple[OnOk, OnFail]] = amqp.ConfirmTracker()
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
        self._declare(amqp.topology(self.cfg))

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
                    prefetch_count=self.cfg.prefetch, callback=self.guard(self._consume)
                ),
            )
            return
        self.declaring = step = steps[0]
        what, name, arguments = step
        then = self.guard(lambda _f: self._declare(steps[1:]))
        if what == "exchange":
            ch.exchange_declare(name, "fanout", durable=True, callback=then)
        elif what == "bind":
            ch.queue_bind(name, self.cfg.dead_letter_exchange, routing_key="", callback=then)
        else:
            ch.queue_declare(name, durable=True, arguments=arguments or None, callback=then)

    def _consume(self, _frame: Any = None) -> None:
        if self.ch is None or self.stopping:
            return
        self.confirms.reset()
        self.gen += 1
        self.consumer_tag = self.ch.basic_consume(
            self.cfg.InQueue, self.guard(self._on_message), callback=self._on_consume_ok
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

    def _on_cancelled(self, _frame: Any) -> None:
        """The broker cancelled our consumer (queue deleted, leader moved): start over."""
        if self.conn is not None and self.conn.is_open and not self.stopping:
            self.log.warning("broker_cancelled_consumer", queue=self.cfg.InQueue)
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
        if self.conn is not None and self.conn.is_open and not self.closing:
            self.log.warning("broker_channel_closed", error=str(reason))
            self.channel_error = reason
            self.conn.close()  # reconnect through _on_connection_closed

    def _on_connection_closed(self, _conn: Any, reason: BaseException) -> None:
        if self.closing:
            self.conn = self.ch = None
            self.ioloop.stop()
            return
        self.connection_lost(self.channel_error or reason)

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
        self.declaring = None
        self.gen += 1
        left = self.confirms.reset()
        if left:
            self.metrics.publish_failures.labels(kind="connection_lost").inc(len(left))
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
    def _on_message(self, _ch: Any, method: Any, props: Any, body: bytes) -> None:
        self.unacked += 1
        self.metrics.in_flight.set(self.unacked)
        d = Delivery(self.gen, method.delivery_tag, props.reply_to or None)
        self.on_delivery(d, method, props, body)

    def current(self, d: Delivery) -> bool:
        """The delivery's tag is valid (same channel)."""
        return d.gen == self.gen and self.ch is not None

    def ack(self, d: Delivery) -> None:
        if self.current(d):
            self.ch.basic_ack(d.tag)
            self.unacked -= 1
            self.metrics.in_flight.set(self.unacked)

    def requeue(self, d: Delivery) -> None:
        if self.current(d):
            self.ch.basic_nack(d.tag, requeue=True)
            self.unacked -= 1
            self.metrics.in_flight.set(self.unacked)

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

    def _on_confirm(self, frame: Any) -> None:
        for (on_ok, on_fail), outcome in self.confirms.on_confirm(frame.method):
            if outcome == "ok":
                on_ok()
            else:
                on_fail(outcome)

    def dead_letter(self, d: Delivery, body: bytes, reason: str, kind: str) -> None:
        """Publish the request to the dead-letter exchange with its reason, then ack it."""
        if not self.current(d):
            return
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

        self.publish(self.cfg.dead_letter_exchange, "", body, props, ok, failed)
        self.log.warning("dead_lettered", reason=reason, bytes=len(body))

    # --- stop ----------------------------------------------------------------------------
    def stop_consuming(self) -> None:
        """No new deliveries, no reconnect; publishing and acking go on."""
        self.stopping = True
        if self.reconnect_timer is not None:
            self.ioloop.remove_timeout(self.reconnect_timer)
            self.reconnect_timer = None
        if self.ch is not None and self.consumer_tag:
            self.ch.basic_cancel(self.consumer_tag)

    def close(self, requeue: list[Delivery]) -> None:
        """Requeue what is left, close the connection; the loop stops once it is closed."""
        self.stopping = self.closing = True
        if self.conn is not None and self.conn.is_open:
            try:
                for d in requeue:
                    self.requeue(d)
                self.conn.close()
            except amqp.CONNECTION_ERRORS:
                self.ioloop.stop()
            self.ioloop.call_later(10, self.ioloop.stop)  # the broker may not answer
        else:
            self.ioloop.stop()
