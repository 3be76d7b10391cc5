# SPDX-License-Identifier: GPL-2.0-or-later
"""Scale-out: one request stream, several daemons, one owner per meter (docs/design.md).

With ``Partitions`` N > 0 the daemon declares a consistent-hash exchange
``<InQueue>.partitions`` and N durable quorum queues ``<InQueue>.p<i>`` bound to it, each
with ``x-single-active-consumer``: the broker delivers a partition to one consumer at a
time, whichever daemon subscribed first, and hands it to the next subscriber when that
daemon's channel goes away.  A request's routing key is its meter key with a host name
resolved, so one meter always lands in one partition, hence in one daemon, whose master
sends it always to one worker, which runs one session per meter at a time.

The pieces here, called from small hooks in ``broker`` and ``master``:

- ``topology``/``describe``: what is declared (also shown by ``--check-config``);
- ``key_of``/``route_of``/``routing_key``: the partition key of a request, the meter key
  its worker will use (a host name keyed by its resolved address);
- ``Mover``: a delivery from InQueue (consumed on the transactional channel) is published
  to the exchange in one commit and acked in the next (at-least-once; the reply store
  absorbs a duplicate); a host name is resolved
  (the master's resolver, off the loop) before the publish;
- ``Balancer``: single-active-consumer never moves a partition from a living consumer,
  so a daemon that holds more than its share (N / consumers, rounded up) gives partitions
  away one at a time: it stops starting jobs from it, waits for its jobs in flight, closes
  its idle associations, cancels its consumer, requeues what it held, and subscribes again
  (at the end of the line);
- serial ports: ``serial:<port>`` requests go to the direct exchange ``<InQueue>.serial``,
  bound by the daemon that lists the port in ``SerialPorts`` to its own single-active-
  consumer queue; nobody bound -> alternate exchange -> a waiting queue; both wait at most
  ``SerialPortWait`` (x-message-ttl) and then dead-letter to ``<InQueue>.serial.expired``,
  which every daemon consumes and answers notok (``expired_reply``);
- ``InQueueWatch``: with Partitions 0, a periodic passive declare of InQueue counts its
  consumers: more than one is a warning and a metric (meters may get two associations).

Over 500 lines because the names, arguments and behaviour of one topology belong
together: the queue names and arguments used by ``topology`` are the ones ``Mover``,
``Balancer`` and the serial routing rely on.  (Splitting the serial part out is the
obvious next cut.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import orjson
import pika

from ..config import Config
from ..errors import ConfigError, GatewayError
from ..meter import targets
from ..meter.connstring import ConnSettings, parse_connection_string
from . import amqp, indoubt

WEIGHT = "20"  # points on the hash ring per partition queue: an even spread for small N
EXCHANGE_TYPE = "x-consistent-hash"
PLUGIN = "rabbitmq_consistent_hash_exchange"
#: headers of the InQueue message that belong to that queue, not to the moved request
QUEUE_HEADERS = (
    "x-delivery-count",
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
)
_NOT_MOVED = frozenset((*QUEUE_HEADERS, indoubt.HEADER, indoubt.LENGTH_HEADER))
WATCH_SECONDS = 30.0
BALANCE_SECONDS = 2.0
POOL_CLOSE_SECONDS = 1.5
#: a partition taken over with redelivered requests: its previous owner may not know yet
#: (a stopped broker node tells the other nodes before its own clients); wait this long
#: before reading, so that the old owner has dropped its sessions (Master.drop_jobs)
TAKEOVER_GRACE_SECONDS = 2.0  # workers handle ClosePool within one heartbeat (1 s)
PARSED_KEPT = 4096  # Mover.parsed: requests moved and not yet back (prefetch-bounded)
PARSED_BYTES = 4 << 20  # and their bodies, 4 MiB at most

Step = tuple[str, str, Optional[dict]]


def exchange_name(cfg: Config) -> str:
    return cfg.InQueue + ".partitions"


def presence_queue(cfg: Config) -> str:
    """Every daemon holds a consumer here: its consumer count is the number of daemons.

    (A single-active-consumer quorum queue reports only its active consumer, so the
    partitions cannot tell how many daemons stand by.)  Nothing is published to it.
    """
    return cfg.InQueue + ".daemons"


def partition_queues(cfg: Config) -> list[str]:
    """``INDLMS.p0`` ... ``INDLMS.p<N-1>``, zero-padded so that they sort."""
    width = len(str(max(cfg.Partitions - 1, 0)))
    return [f"{cfg.InQueue}.p{i:0{width}d}" for i in range(cfg.Partitions)]


def partition_arguments(cfg: Config) -> dict[str, Any]:
    """Quorum (replicated, x-delivery-limit, safe dead-lettering), single active consumer."""
    return {**amqp.quorum_arguments(cfg), "x-single-active-consumer": True}


# --- serial ports: one host each ------------------------------------------------------------
def serial_exchange(cfg: Config) -> str:
    """Direct exchange: routing key ``serial:<port>`` -> the owner's port queue."""
    return cfg.InQueue + ".serial"


def unowned_name(cfg: Config) -> str:
    """Alternate exchange and queue of the serial exchange: ports nobody declared."""
    return cfg.InQueue + ".serial.unowned"


def expired_name(cfg: Config) -> str:
    """Fanout exchange and queue the waits end in; every daemon answers them notok."""
    return cfg.InQueue + ".serial.expired"


def serial_queue(cfg: Config, port: str) -> str:
    return f"{cfg.InQueue}.serial:{port}"


def serial_wait_arguments(cfg: Config) -> dict[str, Any]:
    return {
        "x-queue-type": "quorum",
        "x-message-ttl": int(cfg.SerialPortWait * 1000),
        "x-dead-letter-exchange": expired_name(cfg),
    }


def serial_port_arguments(cfg: Config) -> dict[str, Any]:
    return {**serial_wait_arguments(cfg), "x-single-active-consumer": True}


def check(cfg: Config) -> None:
    """Settings that only make sense together (a ConfigError names them)."""
    if cfg.SerialPorts and cfg.Partitions <= 0:
        raise ConfigError(
            f"SerialPorts in {cfg.path} needs Partitions > 0: with one daemon every port is "
            "its own; remove SerialPorts or set Partitions"
        )


def serial_topology(cfg: Config) -> list[Step]:
    unowned, expired = unowned_name(cfg), expired_name(cfg)
    steps: list[Step] = [
        ("xexchange", expired, {"type": "fanout"}),
        ("queue", expired, {"x-queue-type": "quorum"}),
        ("xbind", expired, {"exchange": expired, "routing_key": ""}),
        ("xexchange", unowned, {"type": "fanout"}),
        ("queue", unowned, serial_wait_arguments(cfg)),
        ("xbind", unowned, {"exchange": unowned, "routing_key": ""}),
        (
            "xexchange",
            serial_exchange(cfg),
            {"type": "direct", "arguments": {"alternate-exchange": unowned}},
        ),
    ]
    for port in cfg.SerialPorts:
        q = serial_queue(cfg, port)
        steps += [
            ("queue", q, serial_port_arguments(cfg)),
            ("xbind", q, {"exchange": serial_exchange(cfg), "routing_key": "serial:" + port}),
        ]
    return steps


def topology(cfg: Config) -> list[Step]:
    """The seed's topology, plus the exchange and the partition queues when N > 0."""
    steps = amqp.topology(cfg)
    if cfg.Partitions <= 0:
        return steps
    if cfg.QueueType == "quorum":
        # a classic queue lives on one node: with it down, no reply could be published
        # and no request dead-lettered, whatever the partitions do
        replicated = {cfg.OutQueue, cfg.dead_letter_queue}
        steps = [
            (
                w,
                n,
                {**(a or {}), "x-queue-type": "quorum"} if w == "queue" and n in replicated else a,
            )
            for w, n, a in steps
        ]
    steps += serial_topology(cfg)
    steps.append(("queue", presence_queue(cfg), {"x-queue-type": "quorum"}))
    steps.append(("hash_exchange", exchange_name(cfg), None))
    args = partition_arguments(cfg)
    for q in partition_queues(cfg):
        steps += [("queue", q, args), ("hash_bind", q, None)]
    return steps


def consumer_prefetch(cfg: Config) -> int:
    """Prefetch per consumer: the whole Prefetch with one queue, a slice of it per partition.

    Quorum queues know no channel-wide (global) prefetch, so with N partition consumers the
    daemon may hold N times this.  A small slice keeps a partition's backlog in the broker,
    where the next owner finds it, and makes a handover wait for few jobs.
    """
    if cfg.Partitions <= 0:
        return cfg.prefetch
    return max(2, 2 * math.ceil(cfg.prefetch / cfg.Partitions))


def consumed_queues(cfg: Config) -> list[str]:
    """InQueue (moved to the partitions when N > 0), presence, every partition queue."""
    if cfg.Partitions <= 0:
        return [cfg.InQueue]
    return [
        cfg.InQueue,
        presence_queue(cfg),
        expired_name(cfg),
        *[serial_queue(cfg, p) for p in cfg.SerialPorts],
        *partition_queues(cfg),
    ]


def describe(cfg: Config) -> dict[str, Any]:
    """The topology as ``--check-config`` shows it."""
    out: dict[str, Any] = {
        "InQueue": {
            "name": cfg.InQueue,
            "type": cfg.QueueType,
            "arguments": amqp.queue_arguments(cfg),
        },
        "OutQueue": {
            "name": cfg.OutQueue,
            "type": "quorum" if cfg.Partitions > 0 and cfg.QueueType == "quorum" else "classic",
        },
        "DeadLetter": {"exchange": cfg.dead_letter_exchange, "queue": cfg.dead_letter_queue},
        "Partitions": cfg.Partitions,
    }
    if cfg.Partitions > 0:
        out["PartitionExchange"] = {
            "name": exchange_name(cfg),
            "type": EXCHANGE_TYPE,
            "plugin": PLUGIN + " (enable it on every broker node)",
            "routing_key": "meter key, host names resolved first, e.g. tcp:10.0.0.5:4059 "
            "or serial:/dev/ttyUSB0",
        }
        out["PresenceQueue"] = {
            "name": presence_queue(cfg),
            "why": "every daemon consumes it; its consumer count is the number of daemons",
        }
        out["PartitionQueues"] = {
            "names": partition_queues(cfg),
            "binding_weight": int(WEIGHT),
            "arguments": partition_arguments(cfg),
        }
        out["SerialPorts"] = {
            "exchange": serial_exchange(cfg) + " (direct, routing key serial:<port>)",
            "owned_here": {p: serial_queue(cfg, p) for p in cfg.SerialPorts},
            "port_queue_arguments": serial_port_arguments(cfg),
            "no_owner": f"{unowned_name(cfg)} (alternate exchange), after SerialPortWait "
            f"{cfg.SerialPortWait:g} s to {expired_name(cfg)}, answered notok by any daemon",
        }
        out["Flow"] = (
            f"{cfg.InQueue} -> (daemon: publish, commit, then ack) -> {exchange_name(cfg)} -> "
            "one partition per meter -> the one daemon active on it"
        )
    out["BrokerNodes"] = [f"{h}:{p}" for h, p in broker_addresses(cfg)]
    return out


def broker_addresses(cfg: Config) -> list[tuple[str, int]]:
    """HostName:Port, then ClusterHosts in order (a host without port uses Port)."""
    out = [(cfg.HostName, cfg.Port)]
    for entry in cfg.ClusterHosts:
        host, sep, port = entry.rpartition(":")
        out.append((host, int(port)) if sep and port.isdigit() else (entry, cfg.Port))
    return out


def pick_address(cfg: Config, failures: int) -> tuple[str, int]:
    """The node to try on this (re)connect: the next one after each failure."""
    nodes = broker_addresses(cfg)
    return nodes[failures % len(nodes)]


def exchange_for(cfg: Config, key: str) -> str:
    """Where a request with this routing key goes: serial ports to their owner's exchange."""
    return serial_exchange(cfg) if key.startswith("serial:") else exchange_name(cfg)


def routing_key(meter_key: str) -> str:
    """The meter key as routing key (a short string: a very long one is hashed)."""
    if len(meter_key.encode()) <= 255:
        return meter_key
    return "sha256:" + hashlib.sha256(meter_key.encode()).hexdigest()


def target_of(body: bytes, max_bytes: int) -> Union[ConnSettings, str]:
    """The parsed target of a request body, or the routing key of a body that is no request.

    An invalid request still goes to a partition: the intake there answers it (or
    dead-letters it) exactly as with one daemon.
    """
    if len(body) > max_bytes:
        return "invalid:oversize"
    try:
        data = orjson.loads(body)
        cs = data.get("ConnectionString") if isinstance(data, dict) else None
        if isinstance(cs, str):
            return parse_connection_string(cs)
    except (orjson.JSONDecodeError, GatewayError, ValueError, TypeError):
        pass
    return "invalid:" + hashlib.sha256(body).hexdigest()[:16]


def key_of(settings: ConnSettings, address: Optional[str] = None) -> str:
    """The routing key of a target: the meter key its worker will use.

    An IP literal is normalised by the parser already (``127.000.000.001``,
    ``::ffff:127.0.0.1`` -> ``127.0.0.1``); a host name is keyed by ``address``, its
    resolved address, when given (``localhost`` -> ``tcp:127.0.0.1:4059``), else by the
    name itself.  Serial ports keep their path as given (their exchange routes by name).
    """
    if address is not None and targets.needs_lookup(settings):
        settings = dataclasses.replace(settings, address=address)
    return routing_key(settings.meter_key)


def route_of(body: bytes, max_bytes: int, address: Optional[str] = None) -> str:
    """The routing key of a request body (``address``: its host name resolved)."""
    target = target_of(body, max_bytes)
    return target if isinstance(target, str) else key_of(target, address)


def moved_properties(props: Any) -> pika.BasicProperties:
    """The request's properties, persistent, without InQueue's own headers, nor those of
    a commit in doubt (daemon/indoubt.py: only a daemon may send one, into a partition)."""
    headers = {k: v for k, v in (props.headers or {}).items() if k not in _NOT_MOVED}
    return pika.BasicProperties(
        content_type=props.content_type,
        delivery_mode=amqp.PERSISTENT,
        message_id=props.message_id,
        correlation_id=props.correlation_id,
        reply_to=props.reply_to,
        headers=headers or None,
    )


@dataclass
class PartitionState:
    queue: str
    active: bool = False  # we received a delivery since we subscribed
    draining: bool = False
    held: list[Any] = field(default_factory=list)  # deliveries kept while draining
    keys: set[str] = field(default_factory=set)  # meters read from this partition
    subscribed: bool = True  # we have a consumer on it (active or in line)
    grace_until: float = 0.0  # taken over: deliveries wait until then
    waiting: list[Any] = field(default_factory=list)  # (d, method, props, body) in grace
    drain_step: str = ""  # "" | "jobs" | "pool" | "cancel"
    pool_closed_at: float = 0.0


class Balancer:
    """Which partitions this daemon is active on, and giving the excess away.

    ``broker`` provides ``cancel_queue(name, on_ok)``, ``consume_queue(name)``,
    ``requeue(d)``, ``count_consumers(name, on_count)``; ``busy(queue)`` says whether a
    job from that partition is still being read; ``close_pool()`` asks the workers to
    close idle associations.
    """

    def __init__(
        self,
        cfg: Config,
        broker: Any,
        busy: Callable[[str], bool],
        close_pool: Callable[[set[str]], None],
        log: Any,
        metrics: Any,
        redeliver: Optional[Callable[[Any, Any, Any, bytes], None]] = None,
    ):
        self.redeliver = redeliver
        self.cfg = cfg
        self.broker = broker
        self.busy = busy
        self.close_pool = close_pool
        self.log = log
        self.metrics = metrics
        self.parts = {q: PartitionState(q) for q in partition_queues(cfg)}
        self.consumers = 1
        self.next_check = 0.0

    def share(self) -> int:
        return math.ceil(len(self.parts) / max(1, self.consumers))

    def active(self) -> list[str]:
        return [q for q, p in self.parts.items() if p.active and not p.draining]

    def on_delivery(
        self, queue: str, d: Any, method: Any = None, props: Any = None, body: bytes = b""
    ) -> bool:
        """True when the delivery is held (partition being given away, or taken over)."""
        p = self.parts.get(queue)
        if p is None:
            return False
        if p.draining:
            p.held.append(d)
            return True
        now = time.monotonic()
        if not p.active:
            # the first delivery since we subscribed: the broker made us its consumer.
            # Taken whether or not it waits out the grace below: the first delivery of
            # a partition handed over by a daemon that requeued what it held is such a
            # redelivery, and a newcomer taking it must show it in its log and metric
            redelivered = bool(method is not None and method.redelivered)
            if redelivered:
                p.grace_until = now + TAKEOVER_GRACE_SECONDS
                self.log.info(
                    "partition_takeover_grace", partition=queue, seconds=TAKEOVER_GRACE_SECONDS
                )
            p.active = True
            self.metrics.partitions_active.set(len(self.active()))
            self.log.info("partition_taken", partition=queue, redelivered=redelivered)
        if now < p.grace_until and self.redeliver is not None:
            p.waiting.append((d, method, props, body))
            return True
        return False

    def note(self, queue: str, meter_key: str) -> None:
        """A job of this meter was dispatched from this partition."""
        p = self.parts.get(queue)
        if p is not None:
            p.keys.add(meter_key)

    def on_lost(self) -> None:
        """The channel is gone: the broker gave our partitions to others (or will)."""
        for p in self.parts.values():
            p.active = p.draining = False
            p.held.clear()
            p.drain_step = ""
            p.keys.clear()
            p.waiting.clear()  # their tags are void: the broker redelivers them
            p.grace_until = 0.0
            p.subscribed = True  # the reconnect subscribes to every partition
        self.metrics.partitions_active.set(0)
        self.close_pool(set())  # all: every partition may go to another daemon

    def tick(self, now: float) -> None:
        for p in self.parts.values():
            if p.waiting and now >= p.grace_until and self.redeliver is not None:
                waiting, p.waiting = p.waiting, []
                for args in waiting:
                    self.redeliver(*args)
        draining = [p for p in self.parts.values() if p.draining]
        for p in draining:
            self._drain(p, now)
        if now < self.next_check or not self.broker.ready:
            return
        self.next_check = now + BALANCE_SECONDS
        self.broker.count_consumers(presence_queue(self.cfg), self._on_count)

    def _on_count(self, consumers: int) -> None:
        self.consumers = max(1, consumers)
        self.metrics.partition_consumers.set(self.consumers)
        if any(p.draining for p in self.parts.values()):
            return
        mine = self.active()
        if len(mine) >= self.share():
            # full: leave the line of the partitions we do not serve, so that what
            # others give away goes to a daemon that still needs partitions
            for p in self.parts.values():
                if p.subscribed and not p.active and not p.draining:
                    p.draining, p.drain_step = True, "cancel"
                    self.broker.cancel_queue(p.queue, lambda p=p: self._released(p, False))
        else:
            for p in self.parts.values():
                if not p.subscribed and not p.draining:
                    p.subscribed = True
                    self.broker.consume_queue(p.queue)
        for q in mine[self.share() :]:  # give the excess away, all at once
            victim = self.parts[q]
            victim.draining = True
            victim.drain_step = "jobs"
            self.log.info(
                "partition_release",
                partition=victim.queue,
                active=len(mine),
                share=self.share(),
                daemons=self.consumers,
            )

    def _drain(self, p: PartitionState, now: float) -> None:
        if p.drain_step == "jobs" and not self.busy(p.queue):
            # every read from this partition is answered: close the idle associations
            # before anyone else may open one
            # (only this partition's meters: closing a session of a meter still being
            # served here would race with its next job opening a new one)
            self.close_pool(set(p.keys) or {"-"})
            p.keys.clear()
            p.drain_step, p.pool_closed_at = "pool", now
        elif p.drain_step == "pool" and now - p.pool_closed_at >= POOL_CLOSE_SECONDS:
            p.drain_step = "cancel"
            self.broker.cancel_queue(p.queue, lambda: self._released(p))

    def _released(self, p: PartitionState, served: bool = True) -> None:
        held, p.held = p.held + [w[0] for w in p.waiting], []
        p.waiting = []
        for d in held:
            self.broker.requeue(d)
        p.active = p.draining = p.subscribed = False
        p.drain_step = ""
        self.metrics.partitions_active.set(len(self.active()))
        if served:
            self.metrics.partition_handovers.inc()
            self.log.info("partition_released", partition=p.queue, requeued=len(held))
        elif held:
            self.log.info("partition_left", partition=p.queue, requeued=len(held))
        # back in line (last) at a later balance check, if this daemon is below its share


class InQueueWatch:
    """Partitions 0: warn when another consumer shares InQueue."""

    def __init__(self, cfg: Config, broker: Any, log: Any, metrics: Any):
        self.cfg = cfg
        self.broker = broker
        self.log = log
        self.metrics = metrics
        self.next_check = time.monotonic() + 2.0
        self.warned = False

    def tick(self, now: float) -> None:
        if now < self.next_check or not self.broker.ready:
            return
        self.next_check = now + WATCH_SECONDS
        self.broker.count_consumers(self.cfg.InQueue, self._on_count)

    def _on_count(self, consumers: int) -> None:
        others = max(0, consumers - 1)
        self.metrics.inqueue_other_consumers.set(others)
        if others and not self.warned:
            self.log.warning(
                "other_consumers_on_inqueue",
                queue=self.cfg.InQueue,
                others=others,
                hint="meters may get parallel associations; set Partitions on every daemon",
            )
        self.warned = bool(others)


class Mover:
    """InQueue -> partition exchange: publish, and once the broker has it, ack the original.

    A request for a host name is moved once ``lookup`` (the master's ``AsyncResolver``,
    off the loop, through its cache) resolved it, with the resolved address in the key,
    so ``-h localhost`` and ``-h 127.0.0.1`` go to one partition.  A name that does not
    resolve is moved with its name as key: the owner of that partition resolves it again
    and answers notok as one daemon does.  ``AllowedHosts`` is not checked here either:
    the daemon that would connect refuses.
    """

    def __init__(
        self,
        cfg: Config,
        broker: Any,
        log: Any,
        metrics: Any,
        lookup: Optional[Callable[[str, int, Callable[[Any], None]], None]] = None,
        on_error: Optional[Callable[[BaseException], None]] = None,
    ):
        self.cfg = cfg
        self.broker = broker
        self.log = log
        self.metrics = metrics
        self.exchange = exchange_name(cfg)
        self.lookup = lookup
        self.on_error = on_error
        #: body -> its connection settings as parsed here, for this daemon's intake when
        #: the partition brings the request back to us (``parsed``): one parse, not two
        self.parsed: dict[bytes, ConnSettings] = {}
        self.parsed_bytes = 0  # of the bodies kept as keys

    def parsed_for(self, body: bytes) -> Optional[ConnSettings]:
        """The settings parsed when ``body`` was moved (once: the entry is taken)."""
        got = self.parsed.pop(body, None) if self.parsed else None
        if got is not None:
            self.parsed_bytes -= len(body)
        return got

    def move(self, d: Any, props: Any, body: bytes) -> None:
        target = target_of(body, self.cfg.MaxBodyBytes)
        if isinstance(target, str):
            self._publish(d, props, body, target)
            return
        # the same object: the move is published before the partition can bring it back,
        # and only then does the target check write into it (targets.prepare)
        if body not in self.parsed:
            self.parsed_bytes += len(body)
        self.parsed[body] = target
        # moved to partitions other daemons own never come back here: oldest out first
        while len(self.parsed) > PARSED_KEPT or self.parsed_bytes > PARSED_BYTES:
            oldest = next(iter(self.parsed))
            self.parsed_bytes -= len(oldest)
            del self.parsed[oldest]
        if self.lookup is not None and targets.needs_lookup(target):
            assert target.host is not None and target.port is not None
            self.lookup(
                target.host,
                target.port,
                lambda answer: self._resolved(d, props, body, target, answer),
            )
        else:
            self._publish(d, props, body, key_of(target))

    def _resolved(self, d: Any, props: Any, body: bytes, target: ConnSettings, answer: Any) -> None:
        """The resolver's answer (on the loop thread): an address, or an error."""
        try:
            address = answer if isinstance(answer, str) else None
            if address is None:
                # the owner's intake resolves again and answers notok (the reason is its)
                self.log.info("move_unresolved", host=target.host)
            if self.broker.current(d):  # else void: the broker redelivers the request
                self._publish(d, props, body, key_of(target, address))
        except amqp.CONNECTION_ERRORS:
            raise
        except Exception as e:  # noqa: BLE001 - a callback must not stop the loop
            if self.on_error is None:
                raise
            self.on_error(e)
            # settled, or it would hold a prefetch slot of InQueue until the next reconnect
            if self.broker.current(d):
                self.broker.dead_letter(
                    d, body, f"internal error in the gateway ({type(e).__name__})", "internal"
                )

    def _publish(self, d: Any, props: Any, body: bytes, key: str) -> None:
        """Publish the request to its partition; ack it once the broker has it.

        With partitions the daemon consumes InQueue on its transactional channel: the
        publish goes in one commit, the ack in the next (``publish_ack(ack=False)``), so
        a commit in doubt never holds an ack whose publish may be lost, and the acks of
        many moves settle in one broker command.  (A delivery from the confirm channel -
        none today - would take a confirm, then its ack.)
        """
        exchange = exchange_for(self.cfg, key)
        out = moved_properties(props)
        if out.message_id is None:
            out.message_id = "moved-" + hashlib.sha256(body).hexdigest()[:24]

        def ok() -> None:
            self.broker.ack(d)
            self.metrics.requests_moved.inc()

        def failed(kind: str) -> None:
            if kind == "returned":
                self.broker.dead_letter(
                    d,
                    body,
                    f"no partition queue is bound to exchange {self.exchange}",
                    "unroutable",
                )
            else:
                self.log.warning("move_not_confirmed", kind=kind)
                self.broker.requeue(d)

        def committed(returned: set[str]) -> None:
            if returned:
                failed("returned")
            else:
                ok()

        if d.tx:
            # False: the tag is void (channel gone): the broker redelivers the request
            self.broker.publish_ack(d, exchange, key, [(body, out)], committed, ack=False)
        elif not self.broker.publish(exchange, key, body, out, ok, failed):
            self.broker.requeue(d)


def expired_reply(cfg: Config, headers: Optional[dict], body: bytes) -> tuple[bool, str]:
    """A request out of a serial wait: (answer it, text) or (dead-letter it, reason)."""
    deaths = (headers or {}).get("x-death") or []
    reason = ""
    if deaths and isinstance(deaths[0], dict):
        raw = deaths[0].get("reason", b"")
        reason = raw.decode() if isinstance(raw, bytes) else str(raw)
    port = route_of(body, cfg.MaxBodyBytes).removeprefix("serial:")
    if reason and reason != "expired":
        return False, f"serial port {port}: the request was {reason} by its owner's queue"
    return True, (
        f"No gateway host owning serial port {port} took this request within "
        f"{cfg.SerialPortWait:g} s: check that the daemon of the host with this port is "
        "running and lists it in SerialPorts"
    )
