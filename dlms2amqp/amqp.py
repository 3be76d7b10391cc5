# SPDX-License-Identifier: GPL-2.0-or-later
"""pika plumbing shared by the daemon, dlms2amqp-send and dlms2amqp-dump.

One BlockingConnection per process, used from one thread.  Publishes go out with
publisher confirms, ``mandatory`` and persistent delivery, so "returned without error"
means the broker has the message.  pika's exceptions are translated into ``BrokerError``
here, with messages that name the broker and never the password.
"""

from __future__ import annotations

import ssl
from typing import Any, Optional

import pika
import pika.exceptions as pex

from .config import Config
from .errors import BrokerError, ConfigError

PERSISTENT = pika.DeliveryMode.Persistent
JSON = "application/json"

#: exceptions meaning "the connection or channel is gone: reconnect"
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    pex.AMQPConnectionError,  # includes ConnectionClosedByBroker, StreamLostError
    pex.AMQPChannelError,  # includes ChannelClosedByBroker
    pex.ConnectionWrongStateError,
    pex.ChannelWrongStateError,
    ConnectionError,
    OSError,
)


def connection_parameters(
    cfg: Config, heartbeat: Optional[int] = None
) -> pika.ConnectionParameters:
    """Parameters from the configuration, TLS with certificate verification when asked."""
    ssl_options = None
    if cfg.Tls:
        try:
            ctx = ssl.create_default_context(
                cafile=str(cfg.resolve(cfg.TlsCaFile)) if cfg.TlsCaFile else None
            )
            if cfg.TlsCertFile:
                ctx.load_cert_chain(cfg.resolve(cfg.TlsCertFile), cfg.resolve(cfg.TlsKeyFile))
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"TLS files in {cfg.path} cannot be used: {e}") from None
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        ssl_options = pika.SSLOptions(ctx, cfg.TlsServerName or cfg.HostName)
    return pika.ConnectionParameters(
        host=cfg.HostName,
        port=cfg.Port,
        virtual_host=cfg.VirtualHost,
        credentials=pika.PlainCredentials(cfg.UserName, str(cfg.password.reveal())),
        heartbeat=cfg.Heartbeat if heartbeat is None else heartbeat,
        blocked_connection_timeout=cfg.BlockedConnectionTimeout,
        ssl_options=ssl_options,
        connection_attempts=1,
        socket_timeout=10,
        stack_timeout=30,
        client_properties={"connection_name": "dlms2amqp"},
    )


def describe(cfg: Config) -> str:
    scheme = "amqps" if cfg.Tls else "amqp"
    return f"{scheme}://{cfg.UserName}@{cfg.HostName}:{cfg.Port}{_vhost(cfg.VirtualHost)}"


def _vhost(v: str) -> str:
    return "/" if v == "/" else "/" + v


def broker_error(cfg: Config, e: BaseException) -> BrokerError:
    """A field-engineer message for a pika exception (never the password)."""
    where = describe(cfg)
    if isinstance(e, pex.ProbableAuthenticationError) or isinstance(
        e, pex.ProbableAccessDeniedError
    ):
        return BrokerError(
            f"Broker {where} refused the login or the virtual host: check UserName, the "
            "password and the user's permissions on VirtualHost"
        )
    if isinstance(e, pex.ConnectionClosedByBroker):
        return BrokerError(f"Broker {where} closed the connection ({e.reply_code} {e.reply_text})")
    if isinstance(e, pex.ChannelClosedByBroker):
        return BrokerError(f"Broker {where} closed the channel ({e.reply_code} {e.reply_text})")
    if isinstance(e, pex.AMQPConnectionError):
        inner = e.args[0] if e.args else e
        if isinstance(inner, BaseException) and "CERTIFICATE" in str(inner).upper():
            return BrokerError(f"TLS certificate of broker {where} not accepted: {inner}")
        return BrokerError(f"Cannot connect to broker {where}: {type(inner).__name__} {inner}")
    return BrokerError(f"Broker {where}: {type(e).__name__} {e}")


def connect(cfg: Config, heartbeat: Optional[int] = None) -> pika.BlockingConnection:
    try:
        return pika.BlockingConnection(connection_parameters(cfg, heartbeat))
    except CONNECTION_ERRORS as e:
        raise broker_error(cfg, e) from e


def queue_arguments(cfg: Config) -> dict[str, Any]:
    """InQueue arguments: none for classic (the seed's queues), poison-safe for quorum."""
    if cfg.QueueType != "quorum":
        return {}
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": cfg.DeliveryLimit,
        "x-dead-letter-exchange": cfg.dead_letter_exchange,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def declare_queue(
    conn: pika.BlockingConnection, cfg: Config, name: str, arguments: Optional[dict] = None
) -> Any:
    """Declare a durable queue; PRECONDITION_FAILED becomes a clear configuration error."""
    ch = conn.channel()
    try:
        ch.queue_declare(name, durable=True, arguments=arguments or None)
    except pex.ChannelClosedByBroker as e:
        if e.reply_code == 406:
            kind = (arguments or {}).get("x-queue-type", "classic")
            raise ConfigError(
                f"Queue {name} already exists on {describe(cfg)} with other arguments than a "
                f"durable {kind} queue ({e.reply_text}). Set QueueType in {cfg.path} to match "
                "the existing queue, or delete the queue (rabbitmqctl delete_queue) if it is "
                "empty."
            ) from None
        raise broker_error(cfg, e) from e
    else:
        ch.close()


def declare_topology(conn: pika.BlockingConnection, cfg: Config) -> None:
    """InQueue, OutQueue, and the dead-letter exchange and queue."""
    ch = conn.channel()
    try:
        ch.exchange_declare(cfg.dead_letter_exchange, "fanout", durable=True)
    except pex.ChannelClosedByBroker as e:
        if e.reply_code == 406:
            raise ConfigError(
                f"Exchange {cfg.dead_letter_exchange} already exists with another type; set "
                f"DeadLetterExchange in {cfg.path}"
            ) from None
        raise
    ch.close()
    declare_queue(conn, cfg, cfg.dead_letter_queue)
    ch = conn.channel()
    ch.queue_bind(cfg.dead_letter_queue, cfg.dead_letter_exchange, routing_key="")
    ch.close()
    declare_queue(conn, cfg, cfg.InQueue, queue_arguments(cfg))
    declare_queue(conn, cfg, cfg.OutQueue)


def properties(
    message_id: str,
    correlation_id: Optional[str] = None,
    headers: Optional[dict[str, Any]] = None,
) -> pika.BasicProperties:
    return pika.BasicProperties(
        content_type=JSON,
        delivery_mode=PERSISTENT,
        message_id=message_id,
        correlation_id=correlation_id,
        headers=headers,
    )
