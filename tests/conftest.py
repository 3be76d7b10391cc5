# SPDX-License-Identifier: GPL-2.0-or-later
"""Shared fixtures: the real local RabbitMQ, unique queues, the daemon as a subprocess.

The ``broker`` fixture skips when RabbitMQ is not reachable on 127.0.0.1:5672 on a
developer's machine, but FAILS under ``CI=true``: a CI run that silently skipped every
broker test would prove nothing.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Optional

import pika
import pika.exceptions
import pytest

from testing.daemon import DaemonProcess
from testing.ports import free_port
from testing.publisher import publish

ROOT = Path(__file__).resolve().parents[1]
BROKER_HOST = "127.0.0.1"
BROKER_PORT = 5672


def _broker_params() -> pika.ConnectionParameters:
    return pika.ConnectionParameters(
        BROKER_HOST,
        BROKER_PORT,
        "/",
        pika.PlainCredentials("guest", "guest"),
        connection_attempts=1,
        socket_timeout=5,
        blocked_connection_timeout=30,
    )


class Broker:
    """Small synchronous helpers on the real broker (one connection per call: simple)."""

    def __init__(self) -> None:
        self.created: list[str] = []
        self.exchanges: list[str] = []

    def connection(self) -> pika.BlockingConnection:
        return pika.BlockingConnection(_broker_params())

    def queue_name(self, tag: str = "q") -> str:
        name = f"test.{tag}.{uuid.uuid4().hex[:10]}"
        return name

    def track(self, cfg: dict[str, Any]) -> None:
        q = cfg["InQueue"]
        self.created += [q, cfg["OutQueue"], q + ".dead"]
        self.exchanges.append(q + ".dlx")

    def declare(self, queue: str, **arguments: Any) -> None:
        with self.connection() as c:
            c.channel().queue_declare(queue, durable=True, arguments=arguments or None)
        self.created.append(queue)

    def publish(
        self,
        queue: str,
        body: bytes,
        reply_to: Optional[str] = None,
        headers: Optional[dict] = None,
    ) -> None:
        mid = f"test-{uuid.uuid4().hex[:12]}"
        publish(_broker_params(), queue, [(mid, body)], reply_to=reply_to, headers=headers)

    def count(self, queue: str) -> Optional[int]:
        """Messages ready in a queue, None if it does not exist."""
        try:
            with self.connection() as c:
                return c.channel().queue_declare(queue, passive=True).method.message_count
        except pika.exceptions.ChannelClosedByBroker:
            return None

    def consumers(self, queue: str) -> Optional[int]:
        try:
            with self.connection() as c:
                return c.channel().queue_declare(queue, passive=True).method.consumer_count
        except pika.exceptions.ChannelClosedByBroker:
            return None

    def get_all(self, queue: str, n: int, timeout: float = 60.0) -> list[tuple[Any, Any, bytes]]:
        """Wait for ``n`` messages on ``queue`` and take them (acked)."""
        got: list[tuple[Any, Any, bytes]] = []
        deadline = time.monotonic() + timeout
        with self.connection() as c:
            ch = c.channel()
            while len(got) < n and time.monotonic() < deadline:
                method, props, body = ch.basic_get(queue, auto_ack=True)
                if method is None:
                    c.sleep(0.1)
                    continue
                got.append((method, props, body))
        return got

    def replies(self, queue: str, n: int, timeout: float = 60.0) -> list[dict]:
        return [json.loads(b) for _m, _p, b in self.get_all(queue, n, timeout)]

    def cleanup(self) -> None:
        try:
            with self.connection() as c:
                ch = c.channel()
                for q in set(self.created):
                    ch.queue_delete(q)
                for x in set(self.exchanges):
                    ch.exchange_delete(x)
        except pika.exceptions.AMQPError:
            pass


@pytest.fixture
def broker() -> Iterator[Broker]:
    try:
        with pika.BlockingConnection(_broker_params()):
            pass
    except pika.exceptions.AMQPError as e:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"RabbitMQ not reachable on {BROKER_HOST}:{BROKER_PORT} under CI: {e!r}")
        pytest.skip(f"RabbitMQ not reachable on {BROKER_HOST}:{BROKER_PORT}")
    b = Broker()
    try:
        yield b
    finally:
        b.cleanup()


def daemon_config(tmp_path: Path, broker: Broker, **overrides: Any) -> dict[str, Any]:
    """A config for a test daemon: unique queues, free metrics port, files in tmp_path."""
    tag = uuid.uuid4().hex[:10]
    cfg: dict[str, Any] = {
        "HostName": BROKER_HOST,
        "Port": BROKER_PORT,
        "VirtualHost": "/",
        "UserName": "guest",
        "Password": "guest",
        "DebugFile": str(tmp_path / "daemon.log"),
        "InQueue": f"test.{tag}.in",
        "OutQueue": f"test.{tag}.out",
        "Workers": 2,
        "SessionsPerWorker": 8,
        "RequestTimeout": 20.0,
        "FrameTimeout": 5.0,
        "MetricsPort": free_port(),
        "StateDir": str(tmp_path / "state"),
        "LogLevel": "Info",
        "ShutdownGrace": 20.0,
        "Heartbeat": 10,
    }
    cfg.update(overrides)
    broker.track(cfg)
    return cfg


def write_config(tmp_path: Path, cfg: dict[str, Any], name: str = "dlms2amqp.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(cfg, indent=2))
    return p


class Daemon(DaemonProcess):
    """dlms2amqpd as a subprocess, on the shared broker."""

    def __init__(self, config_path: Path, cfg: dict[str, Any], broker: Broker):
        super().__init__(
            config_path,
            cfg,
            output_path=config_path.parent / f"daemon-stderr-{uuid.uuid4().hex[:6]}.txt",
        )
        self.broker = broker

    def start(self, wait: bool = True, timeout: float = 60.0) -> Daemon:  # type: ignore[override]
        super().start()
        if wait:
            self.wait_consuming(timeout)
        return self

    def wait_consuming(self, timeout: float = 60.0) -> None:  # type: ignore[override]
        super().wait_consuming(self.broker.consumers, self.cfg["InQueue"], timeout)

    def output(self, log_tail: int = 40) -> str:
        return super().output(log_tail)

    def children(self) -> list[int]:
        return self.workers()

    def stop(self, timeout: float = 60.0) -> int:  # type: ignore[override]
        rc = super().stop(timeout)
        return 0 if rc is None else rc


@pytest.fixture
def run_daemon(tmp_path: Path, broker: Broker) -> Iterator[Any]:
    """Factory: ``d = run_daemon(**config_overrides)``; every daemon is stopped at the end."""
    started: list[Daemon] = []

    def start(wait: bool = True, **overrides: Any) -> Daemon:
        cfg = daemon_config(tmp_path, broker, **overrides)
        path = write_config(tmp_path, cfg, f"d{len(started)}.json")
        d = Daemon(path, cfg, broker)
        started.append(d)
        return d.start(wait=wait)

    try:
        yield start
    finally:
        for d in started:
            try:
                d.stop(timeout=30)
            except Exception:  # noqa: BLE001 - make sure nothing is left running
                pass
            d.kill()
