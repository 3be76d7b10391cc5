# SPDX-License-Identifier: GPL-2.0-or-later
"""The partition routing key: the meter key the worker will use (issue 12).

``-h localhost`` and ``-h 127.0.0.1`` are one meter: they must hash to one partition, or
two daemons may open two associations to it.  The pure part (``key_of``/``route_of``) and
the Mover's hook (resolve first, then publish) with a recording broker; the whole path
with real daemons and the cluster is in test_scaleout.py.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Callable, Optional

import pytest

from dlms2amqp.config import Config, load_config
from dlms2amqp.daemon import partitions
from dlms2amqp.errors import MeterConnectionError
from dlms2amqp.meter import targets
from dlms2amqp.meter.connstring import parse_connection_string

LOCAL = "tcp:127.0.0.1:4059"


def _key(cs: str, address: Optional[str] = None) -> str:
    return partitions.key_of(parse_connection_string(cs), address)


@pytest.mark.parametrize(
    "cs",
    [
        "-h 127.0.0.1 -p 4059",
        "-h 127.000.000.001 -p 4059",
        "-h 127.1 -p 4059",
        "-h 0x7f.0.0.1 -p 4059",
        "-h ::ffff:127.0.0.1 -p 4059",
        "-h [::FFFF:127.0.0.1] -p 4059",
    ],
)
def test_ip_literal_spellings_one_key(cs: str) -> None:
    assert _key(cs) == LOCAL
    # an address handed in for a literal changes nothing: the literal is what is connected to
    assert _key(cs, "10.9.9.9") == LOCAL


@pytest.mark.parametrize("name", ["localhost", "LOCALHOST", "localhost.", "meter7.example.net"])
def test_host_name_keyed_by_its_resolved_address(name: str) -> None:
    assert _key(f"-h {name} -p 4059 -c 32 -a Low -P 00000000", "127.0.0.1") == LOCAL
    assert _key(f"-h {name} -p 4060", "127.0.0.1") != LOCAL  # the port is part of the key


def test_host_name_resolved_to_ipv6_is_the_ipv6_literal_key() -> None:
    assert _key("-h meter7.example.net -p 4059", "::1") == _key("-h [::1] -p 4059")
    assert _key("-h ::1 -p 4059") == "tcp:[::1]:4059"


def test_host_name_not_resolved_keeps_its_name() -> None:
    assert _key("-h LocalHost -p 4059") == "tcp:localhost:4059"


def test_serial_port_key_unchanged() -> None:
    assert _key("-S /dev/ttyUSB0 -c 32", "127.0.0.1") == "serial:/dev/ttyUSB0"


@pytest.mark.parametrize(
    "cs,address",
    [
        ("-h localhost -p 4059", "127.0.0.1"),
        ("-h meter7.example.net -p 4059", "fe80::1"),
        ("-h 127.000.000.001 -p 4059", None),
        ("-h ::ffff:10.1.2.3 -p 4059", None),
    ],
)
def test_key_is_the_workers_meter_key(cs: str, address: Optional[str]) -> None:
    """What the master's route() keys a job by once targets.prepare fixed its target."""
    settings = parse_connection_string(cs)
    targets.prepare(settings, address=address)
    assert _key(cs, address) == partitions.routing_key(settings.meter_key)


def test_route_of_body() -> None:
    body = json.dumps({"MsgID": "1", "Cmd": "READ", "ConnectionString": "-h localhost -p 4059"})
    assert partitions.route_of(body.encode(), 10_000) == "tcp:localhost:4059"
    assert partitions.route_of(body.encode(), 10_000, "127.0.0.1") == LOCAL
    assert partitions.route_of(b"{nope", 10_000).startswith("invalid:")
    assert partitions.route_of(body.encode(), 10) == "invalid:oversize"
    long_name = ".".join(["a" * 61] * 4)  # 247 characters: with tcp: and the port, 257
    cs = json.dumps({"ConnectionString": f"-h {long_name} -p 65535"}).encode()
    assert partitions.route_of(cs, 10_000).startswith("sha256:")


# --- the Mover's hook ---------------------------------------------------------------------
class Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def info(self, event: str, **kw: Any) -> None:
        self.events.append((event, kw))

    warning = info


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def inc(self) -> None:
        self.n += 1


class Metrics:
    def __init__(self) -> None:
        self.requests_moved = Counter()


class D(str):
    """A delivery of the confirm channel, named for the asserts."""

    tx = False


class TxD(D):
    """A delivery of the transactional channel (InQueue with partitions)."""

    tx = True


class Broker:
    """Records publishes; confirms them at once."""

    def __init__(self) -> None:
        self.published: list[tuple[str, str]] = []
        self.acked: list[Any] = []
        self.void: set[Any] = set()

    def current(self, d: Any) -> bool:
        return d not in self.void

    def publish(self, exchange: str, key: str, body: bytes, props: Any, ok: Any, fail: Any) -> bool:
        self.published.append((exchange, key))
        ok()
        return True

    def ack(self, d: Any) -> None:
        self.acked.append(d)

    def requeue(self, d: Any) -> None:  # pragma: no cover - not expected here
        raise AssertionError("requeued")


class Props:
    content_type = "application/json"
    message_id = None
    correlation_id = None
    reply_to = None
    headers = None


def _cfg(tmp_path: Any) -> Config:
    path = tmp_path / "dlms2amqp.json"
    path.write_text(json.dumps({"InQueue": "rk.in", "Partitions": 4}))
    return load_config(path)


def _body(host: str, port: int = 4059) -> bytes:
    return json.dumps(
        {"MsgID": host, "Cmd": "READ", "ConnectionString": f"-h {host} -p {port}"}
    ).encode()


def test_mover_resolves_a_name_before_publishing(tmp_path: Any) -> None:
    pending: list[tuple[str, int, Callable[[Any], None]]] = []
    broker, metrics = Broker(), Metrics()
    mover = partitions.Mover(
        _cfg(tmp_path), broker, Log(), metrics, lambda n, p, done: pending.append((n, p, done))
    )
    mover.move(D("d1"), Props(), _body("localhost"))
    assert broker.published == [] and [(n, p) for n, p, _ in pending] == [("localhost", 4059)]
    pending[0][2]("127.0.0.1")
    assert broker.published == [("rk.in.partitions", LOCAL)]
    assert broker.acked == ["d1"] and metrics.requests_moved.n == 1
    # a literal needs no lookup: same key at once
    mover.move(D("d2"), Props(), _body("127.000.000.001"))
    assert len(pending) == 1 and broker.published[-1] == ("rk.in.partitions", LOCAL)


def test_mover_unresolved_name_moved_by_name_and_void_delivery_dropped(tmp_path: Any) -> None:
    pending: list[Callable[[Any], None]] = []
    broker, log = Broker(), Log()
    mover = partitions.Mover(
        _cfg(tmp_path), broker, log, Metrics(), lambda n, p, done: pending.append(done)
    )
    mover.move(D("d1"), Props(), _body("nosuch.invalid"))
    pending[0](MeterConnectionError("cannot resolve host name nosuch.invalid"))
    assert broker.published == [("rk.in.partitions", "tcp:nosuch.invalid:4059")]
    assert ("move_unresolved", {"host": "nosuch.invalid"}) in log.events
    # the channel went away while resolving: the broker redelivers it, nothing is published
    mover.move(D("d2"), Props(), _body("localhost"))
    broker.void.add("d2")
    pending[1]("127.0.0.1")
    assert len(broker.published) == 1 and broker.acked == ["d1"]


class TxBroker(Broker):
    """The transactional channel: publishes wait for ``commit()``, as do acks."""

    def __init__(self) -> None:
        super().__init__()
        self.open: list[tuple[str, Any]] = []  # what the next commit carries
        self.commits: list[list[str]] = []
        self.returned: set[Any] = set()

    def publish_ack(
        self, d: Any, exchange: str, key: str, messages: Any, on_done: Any, ack: bool = True
    ) -> bool:
        assert not ack  # a move never acks in the commit of its publish
        self.published.append((exchange, key))
        self.open.append(("publish " + d, lambda: on_done({"m"} if d in self.returned else set())))
        return True

    def ack(self, d: Any) -> None:
        self.open.append(("ack " + d, lambda: self.acked.append(d)))

    def dead_letter(self, d: Any, body: bytes, reason: str, kind: str) -> None:
        self.open.append(("dead-letter " + d, lambda: self.acked.append(d)))

    def commit(self) -> None:
        batch, self.open = self.open, []
        self.commits.append([what for what, _ in batch])
        for _what, done in batch:
            done()


def test_mover_on_the_tx_channel_acks_in_the_commit_after_its_publish(tmp_path: Any) -> None:
    broker, metrics = TxBroker(), Metrics()
    mover = partitions.Mover(_cfg(tmp_path), broker, Log(), metrics)
    mover.move(TxD("d1"), Props(), _body("127.0.0.1"))
    mover.move(TxD("d2"), Props(), _body("127.0.0.2"))
    broker.commit()
    assert broker.acked == [] and metrics.requests_moved.n == 2  # published, not acked yet
    mover.move(TxD("d3"), Props(), _body("127.0.0.3"))
    broker.returned.add("d3")  # no partition bound: returned before the commit-ok
    broker.commit()
    broker.commit()
    assert broker.commits == [
        ["publish d1", "publish d2"],
        ["ack d1", "ack d2", "publish d3"],
        ["dead-letter d3"],
    ]
    assert broker.acked == ["d1", "d2", "d3"] and metrics.requests_moved.n == 2


def test_mover_with_the_async_resolver_and_its_cache(tmp_path: Any) -> None:
    """The master's AsyncResolver: the lookup runs in its thread, then once from the cache."""
    calls: list[str] = []
    posted = threading.Event()
    callbacks: list[Callable[[], None]] = []

    def lookup(name: str, port: int) -> str:
        calls.append(name)
        return "127.0.0.1"

    def post(fn: Callable[[], None]) -> None:  # the IOLoop's add_callback_threadsafe
        callbacks.append(fn)
        posted.set()

    resolver = targets.AsyncResolver(
        post, lambda _s, _fn: None, resolver=targets.Resolver(lookup=lookup)
    )
    broker = Broker()
    mover = partitions.Mover(_cfg(tmp_path), broker, Log(), Metrics(), resolver.lookup)
    try:
        mover.move(D("d1"), Props(), _body("localhost"))
        assert posted.wait(10)
        assert broker.published == []  # not before the loop runs the answer
        callbacks.pop()()
        mover.move(D("d2"), Props(), _body("localhost"))  # cached: published at once
        mover.move(D("d3"), Props(), _body("127.0.0.1"))
    finally:
        resolver.close()
    assert calls == ["localhost"]
    assert broker.published == [("rk.in.partitions", LOCAL)] * 3


def test_send_routes_as_the_mover_does(tmp_path: Any) -> None:
    """dlms2amqp-send's straight-to-the-exchange keys are the mover's: a host name
    resolved, a serial port to the serial exchange, a body that is no request keyed by
    its hash."""
    from dlms2amqp.cli.send import partition_routes

    cfg = _cfg(tmp_path)
    serial = json.dumps(
        {"MsgID": "s", "Cmd": "READ", "ConnectionString": "-S /dev/ttyUSB0 -i HDLC"}
    ).encode()
    bodies = [_body("localhost"), _body("127.0.0.1", 4061), serial, b"{not json"]
    broker = Broker()
    mover = partitions.Mover(cfg, broker, Log(), Metrics(), lambda n, p, done: done("127.0.0.1"))
    for k, body in enumerate(bodies):
        mover.move(D(f"d{k}"), Props(), body)
    sent = partition_routes(cfg, [(f"f{k}", b) for k, b in enumerate(bodies)])
    assert sent == broker.published
    assert sent[0] == ("rk.in.partitions", LOCAL)
    assert sent[2] == ("rk.in.serial", "serial:/dev/ttyUSB0")
    assert sent[3][1].startswith("invalid:")
