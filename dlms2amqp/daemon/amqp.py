# SPDX-License-Identifier: GPL-2.0-or-later
"""pika plumbing shared by the daemon, dlms2amqp-send and dlms2amqp-dump.

Connection parameters, the field-engineer texts of broker errors, the topology, and
the one publisher-confirm tracker.  The tools use one BlockingConnection per process,
from one thread.  Publishes go out with
publisher confirms, ``mandatory`` and persistent delivery, so "returned without error"
means the broker has the message.  pika's exceptions are translated into ``BrokerError``
here, with messages that name the broker and never the password.
"""

from __future__ import annotations

import socket
import ssl
from collections import Counter
from typing import Any, Callable, Generic, Optional, TypeVar

import pika
import pika.exceptions as pex

from ..config import Config
from ..errors import BrokerError, ConfigError
from . import pika_compat  # noqa: F401 - one send per loop turn (installed at import)

PERSISTENT = pika.DeliveryMode.Persistent
JSON = "application/json"
T = TypeVar("T")

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
    cfg: Config, heartbeat: Optional[int] = None, name: str = "dlms2amqp"
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
        # shown by rabbitmqctl list_connections / the management UI
        client_properties={"connection_name": name},
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
        # pika wraps the socket error of a bring-up phase (AMQPConnectorSocketConnectError,
        # whose str is empty) in its .exception
        cause = getattr(inner, "exception", inner)
        return BrokerError(f"Cannot connect to broker {where}: {_socket_reason(cfg, cause)}")
    if isinstance(e, OSError):
        return BrokerError(f"Cannot connect to broker {where}: {_socket_reason(cfg, e)}")
    return BrokerError(f"Broker {where}: {type(e).__name__} {e}")


def _socket_reason(cfg: Config, e: object) -> str:
    """Why a connection to the broker failed, in words (no exception class names)."""
    if isinstance(e, socket.gaierror):
        return f"host name {cfg.HostName} does not resolve ({e.strerror}); check HostName"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused: nothing listens there; check HostName and Port"
    if isinstance(e, (TimeoutError, socket.timeout)):
        return "no answer (timeout); check HostName, Port and the network"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e)
    return text if text else type(e).__name__


def connect(
    cfg: Config, heartbeat: Optional[int] = None, name: str = "dlms2amqp"
) -> pika.BlockingConnection:
    try:
        return pika.BlockingConnection(connection_parameters(cfg, heartbeat, name))
    except CONNECTION_ERRORS as e:
        raise broker_error(cfg, e) from e


def queue_arguments(cfg: Config) -> dict[str, Any]:
    """InQueue arguments: none for classic (the seed's queues), poison-safe for quorum."""
    if cfg.QueueType != "quorum":
        return {}
    return quorum_arguments(cfg)


def quorum_arguments(cfg: Config) -> dict[str, Any]:
    """A replicated request queue: x-delivery-limit and at-least-once dead-lettering."""
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": cfg.DeliveryLimit,
        "x-dead-letter-exchange": cfg.dead_letter_exchange,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def dead_letter_arguments(cfg: Config) -> Optional[dict[str, Any]]:
    """The dead-letter queue's arguments: a message TTL when DeadLetterTTL is set."""
    return {"x-message-ttl": cfg.DeadLetterTTL * 1000} if cfg.DeadLetterTTL else None


def queue_mismatch(
    cfg: Config, name: str, arguments: Optional[dict], reply_text: str
) -> ConfigError:
    """PRECONDITION_FAILED on a queue declare, in the field engineer's words."""
    kind = (arguments or {}).get("x-queue-type", "classic")
    if name == cfg.dead_letter_queue:
        ttl = cfg.DeadLetterTTL
        return ConfigError(
            f"Queue {name} already exists on {describe(cfg)} with another message TTL than "
            f"DeadLetterTTL {ttl} ({reply_text}). Set DeadLetterTTL in {cfg.path} to the "
            "existing queue's, or move its messages away (shovel) and delete it "
            "(rabbitmqctl delete_queue) so that it is declared again; see the README."
        )
    return ConfigError(
        f"Queue {name} already exists on {describe(cfg)} with other arguments than a "
        f"durable {kind} queue ({reply_text}). Set QueueType in {cfg.path} to match "
        "the existing queue, or delete the queue (rabbitmqctl delete_queue) if it is "
        "empty."
    )


def exchange_mismatch(cfg: Config) -> ConfigError:
    """PRECONDITION_FAILED on the dead-letter exchange declare."""
    return ConfigError(
        f"Exchange {cfg.dead_letter_exchange} already exists with another type; set "
        f"DeadLetterExchange in {cfg.path}"
    )


def topology(cfg: Config) -> list[tuple[str, str, Optional[dict]]]:
    """What the daemon declares, in order: (what, name, queue arguments).

    ``what`` is "exchange" (the dead-letter fanout), "queue" (durable) or "bind" (the
    dead-letter queue to its exchange).  One list for the daemon's asynchronous declare
    and the blocking ``declare_topology``.
    """
    return [
        ("exchange", cfg.dead_letter_exchange, None),
        ("queue", cfg.dead_letter_queue, dead_letter_arguments(cfg)),
        ("bind", cfg.dead_letter_queue, None),
        ("queue", cfg.InQueue, queue_arguments(cfg)),
        ("queue", cfg.OutQueue, None),
    ]


def declare_queue(
    conn: pika.BlockingConnection, cfg: Config, name: str, arguments: Optional[dict] = None
) -> Any:
    """Declare a durable queue; PRECONDITION_FAILED becomes a clear configuration error."""
    ch = conn.channel()
    try:
        ch.queue_declare(name, durable=True, arguments=arguments or None)
    except pex.ChannelClosedByBroker as e:
        if e.reply_code == 406:
            raise queue_mismatch(cfg, name, arguments, e.reply_text) from None
        raise broker_error(cfg, e) from e
    else:
        ch.close()


def declare_topology(conn: pika.BlockingConnection, cfg: Config) -> None:
    """InQueue, OutQueue, and the dead-letter exchange and queue (blocking connection)."""
    for what, name, arguments in topology(cfg):
        if what == "queue":
            declare_queue(conn, cfg, name, arguments)
            continue
        ch = conn.channel()
        if what == "bind":
            ch.queue_bind(name, cfg.dead_letter_exchange, routing_key="")
        else:
            try:
                ch.exchange_declare(name, "fanout", durable=True)
            except pex.ChannelClosedByBroker as e:
                if e.reply_code == 406:
                    raise exchange_mismatch(cfg) from None
                raise
        ch.close()


def properties(
    message_id: str,
    correlation_id: Optional[str] = None,
    headers: Optional[dict[str, Any]] = None,
) -> pika.BasicProperties:
    if correlation_id is not None and len(correlation_id.encode()) > 255:
        # an AMQP short string: an over-long MsgID (a rejected request) cannot be echoed
        # here; the reply body's InMsgID still carries what could be read of it
        correlation_id = None
    return pika.BasicProperties(
        content_type=JSON,
        delivery_mode=PERSISTENT,
        message_id=message_id,
        correlation_id=correlation_id,
        headers=headers,
    )


class ConfirmTracker(Generic[T]):
    """Publisher confirms of one channel: which publish a (multiple) ack or nack is for.

    Publish with ``mandatory`` and a ``message_id``; a message the broker could not route
    comes back (``on_return``) before its ack, so an ack of a returned message counts as
    "returned".  The one tracker of the daemon's broker adapter and of the publishers
    (``PipelinedPublisher``, the tests' and the bench's).
    """

    def __init__(self) -> None:
        self.seq = 0
        self.pending: dict[int, tuple[Optional[str], T]] = {}
        self.returned: set[str] = set()

    def __len__(self) -> int:
        return len(self.pending)

    def published(self, message_id: Optional[str], payload: T) -> int:
        """Count one basic_publish on this channel; ``payload`` comes back with its outcome."""
        self.seq += 1
        self.pending[self.seq] = (message_id, payload)
        return self.seq

    def on_return(self, message_id: Optional[str]) -> None:
        if message_id:
            self.returned.add(message_id)

    def on_confirm(self, method: Any) -> list[tuple[T, str]]:
        """Outcomes of a Basic.Ack/Basic.Nack: (payload, "ok" | "nacked" | "returned")."""
        ok = isinstance(method, pika.spec.Basic.Ack)
        if method.multiple:
            # published in order, kept in order (a dict keeps insertion order): the
            # entries up to the tag are the first ones, no need to look at the rest
            seqs = []
            for s in self.pending:
                if s > method.delivery_tag:
                    break
                seqs.append(s)
        else:
            seqs = [method.delivery_tag]
        out: list[tuple[T, str]] = []
        for seq in seqs:
            entry = self.pending.pop(seq, None)
            if entry is None:
                continue
            mid, payload = entry
            if not ok:
                out.append((payload, "nacked"))
            elif mid is not None and mid in self.returned:
                self.returned.discard(mid)
                out.append((payload, "returned"))
            else:
                out.append((payload, "ok"))
        return out

    def reset(self) -> list[T]:
        """A new channel starts at 1: forget everything; returns what was unconfirmed."""
        left = [payload for _mid, payload in self.pending.values()]
        self.seq = 0
        self.pending.clear()
        self.returned.clear()
        return left


class TxTracker:
    """Commits of one channel in transaction mode (tx_select), one at a time.

    Whatever the channel sends (publish, ack, nack) before a ``tx_commit`` belongs to that
    transaction.  While a commit is in flight RabbitMQ accepts no other command on the
    channel (it closes the connection: 504 "unexpected command while processing
    'tx.commit'"), so what comes up meanwhile waits in ``backlog`` and goes out after the
    commit-ok, in the next transaction (a group commit).  ``add`` registers a callback for
    the messages just sent, as (message id, routing key) pairs; ``committed`` (on the
    commit-ok) hands back the callbacks of that commit, each with the message ids of its
    own that came back unroutable (the broker sends those returns before the commit-ok).
    Returns are counted per (message id, routing key): two deliveries of one request, one
    answered to a missing ``reply_to``, get one return between them, not both or none.
    """

    def __init__(self) -> None:
        self.open: list[tuple[list[tuple[Optional[str], str]], Callable[[set[str]], None]]] = []
        self.committing: Optional[
            list[tuple[list[tuple[Optional[str], str]], Callable[[set[str]], None]]]
        ] = None
        self.dirty = False  # something sent since the last commit went out
        self.backlog: list[Callable[[], None]] = []  # to send after the commit in flight
        self.flushing = False  # sending the backlog: one commit for all of it, afterwards
        self.returned: Counter[tuple[str, str]] = Counter()
        #: for each callback, what makes the messages to publish if its commit ends in
        #: doubt: [(exchange, routing key, body, properties)]
        self.replays: dict[int, Callable[[], list[tuple[str, str, bytes, Any]]]] = {}

    def add(
        self,
        messages: list[tuple[Optional[str], str]],
        on_done: Callable[[set[str]], None],
        replay: Optional[Callable[[], list[tuple[str, str, bytes, Any]]]] = None,
    ) -> None:
        self.open.append((messages, on_done))
        if replay:
            self.replays[id(on_done)] = replay

    def in_doubt(self) -> list[tuple[str, str, bytes, Any]]:
        """The messages of the commit in flight: the channel went away before its commit-ok.

        RabbitMQ's commit is not atomic across queues (a broker node stopping during it can
        settle the ack and lose the publish), so its outcome is unknown: the caller
        publishes what each ``add`` gave for that case (a reply: its settling message for
        the partition's owner, daemon/indoubt.py).
        """
        out: list[tuple[str, str, bytes, Any]] = []
        for _messages, on_done in self.committing or []:
            make = self.replays.get(id(on_done))
            if make is not None:
                out.extend(make())
        return out

    def on_return(self, message_id: Optional[str], routing_key: str = "") -> None:
        if message_id:
            self.returned[(message_id, routing_key)] += 1

    def begin(self) -> bool:
        """True when a commit is to go out now: something was sent, none in flight."""
        if self.committing is not None or not self.dirty or self.flushing:
            return False
        self.committing, self.open, self.dirty = self.open, [], False
        return True

    def committed(self) -> list[tuple[Callable[[set[str]], None], set[str]]]:
        """The commit in flight is ok: its callbacks, each with its returned message ids."""
        batch, self.committing = self.committing or [], None
        out = []
        for messages, on_done in batch:
            back = set()
            for mid, key in messages:
                if mid is not None and self.returned[(mid, key)] > 0:
                    self.returned[(mid, key)] -= 1
                    back.add(mid)
            out.append((on_done, back))
            self.replays.pop(id(on_done), None)
        self.returned = +self.returned  # drop the zeros
        return out

    def busy(self) -> bool:
        return self.committing is not None or self.dirty or bool(self.backlog)

    def reset(self) -> int:
        """The channel is gone: forget everything; returns how many operations were pending."""
        n = len(self.open) + len(self.committing or []) + len(self.backlog)
        self.open, self.committing, self.dirty = [], None, False
        self.backlog, self.flushing = [], False
        self.returned.clear()
        self.replays.clear()
        return n


class PipelinedPublisher:
    """Publish many messages over one connection, keeping up to ``window`` unconfirmed.

    A publish that waits for its own confirm manages a few hundred messages a second;
    pipelining the confirms makes ``dlms2amqp-send`` of 10,000 files take seconds.  Each
    message is persistent and ``mandatory``; a nack or a return counts as a failure.
    """

    def __init__(
        self,
        cfg: Config,
        queue: str,
        messages: list[tuple[str, bytes]],
        window: int = 256,
        on_progress: Optional[Any] = None,
        routes: Optional[list[tuple[str, str]]] = None,
    ):
        self.cfg = cfg
        self.queue = queue
        self.messages = messages  # (name, body)
        #: (exchange, routing key) of each message; default: the default exchange to queue
        self.routes = routes
        self.window = window
        self.on_progress = on_progress
        self.next = 0
        self.confirms: ConfirmTracker[int] = ConfirmTracker()  # payload: message index
        self.confirmed: list[int] = []
        self.failed: dict[int, str] = {}  # message index -> reason
        self.error: Optional[BrokerError] = None
        self.refused = False  # the broker closed the channel with 403 (access refused)
        self._conn: Any = None
        self._ch: Any = None

    def run(self) -> None:
        """Publish everything; raises BrokerError if the connection failed."""
        self._conn = pika.SelectConnection(
            connection_parameters(self.cfg),
            on_open_callback=lambda c: c.channel(on_open_callback=self._on_channel),
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_closed,
        )
        self._conn.ioloop.start()
        if self.error is not None:
            raise self.error

    def _on_open_error(self, _conn: Any, err: BaseException) -> None:
        self.error = broker_error(
            self.cfg, err if isinstance(err, BaseException) else pex.AMQPConnectionError(err)
        )
        self._conn.ioloop.stop()

    def _on_closed(self, _conn: Any, reason: BaseException) -> None:
        if self.error is None and (self.next < len(self.messages) or self.confirms):
            self.error = broker_error(self.cfg, reason)
        self._conn.ioloop.stop()

    def _on_channel(self, ch: Any) -> None:
        self._ch = ch
        ch.add_on_close_callback(self._on_channel_closed)
        ch.add_on_return_callback(
            lambda _c, _m, props, _b: self.confirms.on_return(props.message_id)
        )
        ch.confirm_delivery(self._on_confirm, callback=lambda _f: self._pump())

    def _on_channel_closed(self, _ch: Any, reason: BaseException) -> None:
        if self.error is None and (self.next < len(self.messages) or self.confirms):
            self.error = broker_error(self.cfg, reason)
            self.refused = getattr(reason, "reply_code", None) == 403
        if self._conn.is_open:
            self._conn.close()

    def _pump(self) -> None:
        while self.next < len(self.messages) and len(self.confirms) < self.window:
            i = self.next
            self.next += 1
            mid = f"d2a-send-{i}"
            props = pika.BasicProperties(
                content_type=JSON, delivery_mode=PERSISTENT, message_id=mid
            )
            exchange, key = self.routes[i] if self.routes is not None else ("", self.queue)
            self._ch.basic_publish(exchange, key, self.messages[i][1], props, mandatory=True)
            self.confirms.published(mid, i)
        if self.next >= len(self.messages) and not self.confirms:
            self._conn.close()

    def _on_confirm(self, frame: Any) -> None:
        for i, outcome in self.confirms.on_confirm(frame.method):
            if outcome == "nacked":
                self.failed[i] = "refused by the broker (nack)"
            elif outcome == "returned" and self.routes is not None:
                exchange, key = self.routes[i]
                self.failed[i] = f"no queue bound to exchange {exchange} for {key} (returned)"
            elif outcome == "returned":
                self.failed[i] = f"queue {self.queue} does not exist (returned)"
            else:
                self.confirmed.append(i)
        if self.on_progress:
            self.on_progress(len(self.confirmed) + len(self.failed), len(self.messages))
        self._pump()
