# SPDX-License-Identifier: GPL-2.0-or-later
"""Publishing requests for tests and benchmarks: one connection, pipelined confirms.

A blocking publish that waits for each confirm managed ~580 messages/s here, which would
make the sender part of what a benchmark measures; ``Publisher`` keeps up to ``window``
unconfirmed (the daemon's own ``ConfirmTracker`` matches acks to messages).  Every
message is persistent and ``mandatory``, with ``message_id`` and ``correlation_id`` set to
its id; a nack or a return counts as a failure.  ``publish`` is the blocking form for a
test: it returns once every message is confirmed, and raises otherwise.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from typing import Any, Callable, Optional

import pika

from dlms2amqp.daemon.amqp import ConfirmTracker


class Publisher:
    """Publishes ``(id, body)`` messages to one queue from its own thread and IOLoop."""

    def __init__(
        self,
        params: pika.ConnectionParameters,
        queue: str,
        messages: Sequence[tuple[str, bytes]],
        on_sent: Optional[Callable[[str, float], None]] = None,
        window: int = 500,
        rate: float = 0.0,
        reply_to: Optional[str] = None,
        headers: Optional[dict[str, Any]] = None,
        routes: Optional[Sequence[tuple[str, str]]] = None,
    ):
        self.params = params
        self.queue = queue
        self.routes = routes  # (exchange, routing key) of each message; default: to queue
        self.messages = messages
        self.on_sent = on_sent
        self.window = window
        self.rate = rate  # messages per second, 0 = as fast as confirms go
        self.reply_to = reply_to
        self.headers = headers
        self.next = 0
        self.confirms: ConfirmTracker[str] = ConfirmTracker()
        self.confirmed = 0
        self.failed: list[str] = []
        self.error: Optional[str] = None
        self._conn: Any = None
        self._ch: Any = None
        self._t0 = 0.0
        self._timer = False
        self.thread = threading.Thread(target=self._run, name="publisher", daemon=True)

    # pika callbacks (all in the publisher thread)
    def _run(self) -> None:
        try:
            self._conn = pika.SelectConnection(
                self.params,
                on_open_callback=lambda c: c.channel(on_open_callback=self._on_channel),
                on_open_error_callback=self._on_fail,
                on_close_callback=self._on_closed,
            )
            self._conn.ioloop.start()
        except Exception as e:  # noqa: BLE001 - reported to the caller
            self.error = f"publisher: {e}"

    def _on_fail(self, _conn: Any, err: Any) -> None:
        self.error = f"publisher cannot connect: {err}"
        self._conn.ioloop.stop()

    def _on_closed(self, _conn: Any, reason: Any) -> None:
        if self.next < len(self.messages) or self.confirms:
            self.error = f"publisher connection closed: {reason}"
        self._conn.ioloop.stop()

    def _on_channel(self, ch: Any) -> None:
        self._ch = ch
        ch.add_on_return_callback(
            lambda _c, _m, props, _b: self.confirms.on_return(props.message_id)
        )
        ch.confirm_delivery(self._on_confirm, callback=lambda _f: self._begin())

    def _begin(self) -> None:
        self._t0 = time.monotonic()
        self._pump()

    def _on_confirm(self, frame: Any) -> None:
        for mid, outcome in self.confirms.on_confirm(frame.method):
            if outcome == "ok":
                self.confirmed += 1
            else:
                self.failed.append(mid)
        self._pump()

    def _pump(self) -> None:
        n = 0
        while self.next < len(self.messages) and len(self.confirms) < self.window:
            if self.rate > 0:
                due = self._t0 + self.next / self.rate
                if time.monotonic() < due:
                    if not self._timer:  # one wake-up pending, not one per confirm
                        self._timer = True
                        self._conn.ioloop.call_later(
                            max(0.0, due - time.monotonic()), self._on_timer
                        )
                    return
            mid, body = self.messages[self.next]
            exchange, key = self.routes[self.next] if self.routes else ("", self.queue)
            self.next += 1
            if self.on_sent is not None:
                self.on_sent(mid, time.monotonic())
            self._ch.basic_publish(
                exchange,
                key,
                body,
                pika.BasicProperties(
                    delivery_mode=2,
                    content_type="application/json",
                    message_id=mid,
                    correlation_id=mid,
                    reply_to=self.reply_to,
                    headers=self.headers,
                ),
                mandatory=True,
            )
            self.confirms.published(mid, mid)
            n += 1
            if n >= 200:  # let the ioloop read confirms now and then
                self._conn.ioloop.call_later(0, self._pump)
                return
        if self.next >= len(self.messages) and not self.confirms:
            if not (self._conn.is_closing or self._conn.is_closed):
                self._conn.close()

    def _on_timer(self) -> None:
        self._timer = False
        self._pump()

    # the caller's side
    def start(self) -> Publisher:
        self.thread.start()
        return self

    def done(self) -> bool:
        return not self.thread.is_alive()

    def abort(self) -> None:
        conn = self._conn
        if conn is not None and self.thread.is_alive():
            with contextlib.suppress(Exception):
                conn.ioloop.add_callback_threadsafe(conn.close)
        self.thread.join(10)


def publish(
    params: pika.ConnectionParameters,
    queue: str,
    messages: Sequence[tuple[str, bytes]],
    reply_to: Optional[str] = None,
    headers: Optional[dict[str, Any]] = None,
    timeout: float = 120.0,
    rate: float = 0.0,
    routes: Optional[Sequence[tuple[str, str]]] = None,
) -> None:
    """Publish and wait until the broker confirmed every message; raises RuntimeError if not.

    ``rate``: messages per second (0: as fast as the confirms come back)."""
    if rate > 0:
        timeout += len(messages) / rate
    p = Publisher(
        params, queue, messages, reply_to=reply_to, headers=headers, rate=rate, routes=routes
    ).start()
    p.thread.join(timeout)
    if p.thread.is_alive():
        p.abort()
        raise RuntimeError(f"publishing to {queue}: not confirmed after {timeout:.0f} s")
    if p.error or p.failed or p.confirmed != len(messages):
        raise RuntimeError(
            f"publishing to {queue}: {p.error or ''} {len(p.failed)} refused or returned, "
            f"{p.confirmed}/{len(messages)} confirmed"
        )
