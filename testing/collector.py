# SPDX-License-Identifier: GPL-2.0-or-later
"""Test-side broker access (``AmqpClient``) and the reply collector (``Collector``).

The collector consumes reply and dead-letter queues in its own thread and connection and
reconnects through broker faults (the fault suite faults the broker while it collects).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable
from typing import Any, Callable, Optional

import pika
import pika.exceptions

from testing.oracle import Received, accounted_ids
from testing.publisher import publish

# --- AMQP client side ------------------------------------------------------------------------


class AmqpClient:
    """Test-side broker access: publish with confirms, collect with reconnects."""

    def __init__(self, params_factory: Any):
        self.params_factory = params_factory

    def connect(self) -> pika.BlockingConnection:
        return pika.BlockingConnection(self.params_factory())

    def publish(
        self,
        queue: str,
        bodies: list[tuple[str, bytes]],
        reply_to: str = "",
        rate: float = 0.0,
        routes: Optional[list[tuple[str, str]]] = None,
    ) -> None:
        """Publish persistent, mandatory, confirmed messages; raises if one is not confirmed.

        ``rate``: messages per second (0: as fast as the confirms come back); ``routes``:
        (exchange, routing key) of each message instead of ``queue``."""
        publish(
            self.params_factory(),
            queue,
            bodies,
            reply_to=reply_to or None,
            rate=rate,
            routes=routes,
        )

    def queue_depth(self, queue: str) -> tuple[int, int] | None:
        """(messages ready, consumers) of ``queue`` or None if it does not exist."""
        try:
            conn = self.connect()
        except (pika.exceptions.AMQPError, OSError):
            return None
        try:
            ch = conn.channel()
            ok = ch.queue_declare(queue, passive=True)
            return ok.method.message_count, ok.method.consumer_count
        except pika.exceptions.ChannelClosedByBroker:
            return None
        finally:
            with contextlib.suppress(Exception):
                conn.close()

    def delete_queues(self, names: Iterable[str]) -> None:
        with contextlib.suppress(Exception):
            conn = self.connect()
            try:
                for n in names:
                    ch = conn.channel()
                    with contextlib.suppress(pika.exceptions.ChannelClosedByBroker):
                        ch.queue_delete(n)
            finally:
                conn.close()


class Collector:
    """Consumes reply and dead-letter queues in a thread; reconnects through broker faults.

    What arrives is kept (``snapshot``), or handed to ``on_item`` in the collector's
    thread (the load benchmark times each reply and keeps only what it needs).
    """

    def __init__(
        self,
        client: AmqpClient,
        queues: list[str],
        on_item: Optional[Callable[[Received], None]] = None,
        prefetch: int = 500,
    ):
        self.client = client
        self.queues = queues
        self.on_item = on_item
        self.prefetch = prefetch
        self.items: list[Received] = []
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self.ready = threading.Event()  # consuming every queue (the first time)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="collector", daemon=True)

    def start(self) -> Collector:
        self.thread.start()
        return self

    @property
    def error(self) -> Optional[str]:
        """The errors so far (each one made it reconnect), or None."""
        return "collector: " + ", ".join(self.errors[-3:]) if self.errors else None

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(15)

    def _run(self) -> None:
        while not self._stop.is_set():
            conn = None
            try:
                conn = self.client.connect()
                ch = conn.channel()
                ch.basic_qos(prefetch_count=self.prefetch)
                for q in self.queues:
                    try:
                        ch.queue_declare(q, passive=True)
                    except pika.exceptions.ChannelClosedByBroker:
                        ch = conn.channel()  # not declared yet by the daemon
                        raise RuntimeError(f"queue {q} not there yet") from None

                    def cb(c: Any, m: Any, p: Any, b: bytes, q: str = q) -> None:
                        r = Received(q, b, p, dict(p.headers or {}), time.monotonic())
                        if self.on_item is not None:
                            self.on_item(r)
                        else:
                            with self.lock:
                                self.items.append(r)
                        c.basic_ack(m.delivery_tag)

                    ch.basic_consume(q, cb)
                self.ready.set()
                while not self._stop.is_set():
                    conn.process_data_events(time_limit=0.2)
            except Exception as e:  # noqa: BLE001 - keep collecting through faults
                self.errors.append(type(e).__name__)
                time.sleep(0.5)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()

    def snapshot(self) -> list[Received]:
        with self.lock:
            return list(self.items)

    def wait_ids(self, ids: set[str], timeout: float, dlq: str = "") -> bool:
        """Wait until every id has a reply or a dead-letter entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ids <= accounted_ids(self.snapshot(), dlq):
                return True
            time.sleep(0.3)
        return False
