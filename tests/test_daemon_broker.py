# SPDX-License-Identifier: GPL-2.0-or-later
"""What the broker can do to the daemon (issue 11): a cancelled consumer, a reply over the
broker's ``max_message_size``, a publisher's forged ``x-delivery-count``, a deleted OutQueue.

The size tests run on a private RabbitMQ node with a low ``max_message_size`` (the shared
broker's settings are never changed); the others on the shared broker with unique queues.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Optional

import pika
import pytest

from dlms2amqp.simulator import model
from testing.brokernode import BrokerNode
from testing.publisher import publish

from .conftest import Broker, Daemon, daemon_config, write_config
from .helpers_sim import running_simulator

pytestmark = pytest.mark.integration

PROFILE = "1.0.99.1.0.255"
ENERGY = "1.0.1.8.0.255"
NODE_MAX = 65536  # the private node's max_message_size


def req(msg_id: str, port: int = 1, **over: Any) -> bytes:
    r: dict[str, Any] = {
        "MsgID": msg_id,
        "Cmd": "READ",
        "ObisCode": ENERGY,
        "ConnectionString": f"-h 127.0.0.1 -p {port} -c 32 -a Low -i WRAPPER -P 00000000",
    }
    r.update(over)
    return json.dumps({k: v for k, v in r.items() if v is not None}).encode()


def wait_for(pred: Any, timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())


# --- 1. the broker cancels the consumer (InQueue deleted) ------------------------------
def test_consumer_cancelled_is_logged_counted_and_retried_with_a_growing_backoff(
    run_daemon: Any, broker: Broker
) -> None:
    d: Daemon = run_daemon(ReconnectMaxDelay=8.0)
    inq, outq = d.cfg["InQueue"], d.cfg["OutQueue"]
    # When InQueue is deleted three times, each time right after the daemon consumes again
    for n in range(1, 4):
        assert wait_for(lambda: broker.consumers(inq) == 1, 30), d.output()
        with broker.connection() as c:
            c.channel().queue_delete(inq)
        assert wait_for(lambda n=n: len(d.events("broker_connection_lost")) >= n, 30)
    # Then each cancel is logged (a structured event) and counted
    cancels = d.events("broker_cancelled_consumer")
    assert len(cancels) == 3 and all(e["queue"] == inq for e in cancels), cancels
    assert d.metric("dlms2amqp_consumer_cancelled_total") == 3
    # and the back-off grows: it is not reset by a consume that is cancelled at once
    lost = d.events("broker_connection_lost")
    assert [e["retry_in"] for e in lost] == [0.5, 1.0, 2.0], lost
    assert all("cancelled the consumer of " + inq in e["error"] for e in lost), lost
    # and broker_connected says 0 while it waits (2 s now), 1 once it consumes again
    assert d.metric("dlms2amqp_broker_connected") == 0
    assert wait_for(lambda: broker.consumers(inq) == 1, 30)
    assert wait_for(lambda: d.metric("dlms2amqp_broker_connected") == 1, 10)
    # and the queue it declared again is served
    broker.publish(inq, req("after-cancels", Cmd="X"))
    assert broker.replies(outq, 1, timeout=30)[0]["InMsgID"] == "after-cancels"
    assert d.metric("dlms2amqp_broker_reconnects_total") == 3


# --- 9. a publisher's x-delivery-count counts for nothing on a classic queue -------------
@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_forged_delivery_count_does_not_dead_letter(
    tmp_path: Path, broker: Broker, queue_type: str
) -> None:
    from dlms2amqp.config import build_config
    from dlms2amqp.daemon import amqp

    cfg = daemon_config(tmp_path, broker, QueueType=queue_type, DeliveryLimit=5)
    inq = cfg["InQueue"]
    with broker.connection() as conn:
        amqp.declare_topology(conn, build_config(cfg))
    # Given two requests whose publisher set x-delivery-count 99; the first one was also
    # delivered once before without an ack (so it comes redelivered)
    broker.publish(inq, req("forged-1", Cmd="X"), headers={"x-delivery-count": 99})
    with broker.connection() as conn:
        ch = conn.channel()
        method = None
        deadline = time.monotonic() + 10
        while method is None and time.monotonic() < deadline:
            method, _p, _b = ch.basic_get(inq, auto_ack=False)
        assert method is not None
        ch.basic_nack(method.delivery_tag, requeue=True)
    broker.publish(inq, req("forged-2", Cmd="X"), headers={"x-delivery-count": 99})
    # When the daemon takes them
    d = Daemon(write_config(tmp_path, cfg), cfg, broker).start()
    try:
        # Then both are answered (Unknown command), none dead-lettered as poison
        replies = {r["InMsgID"]: r for r in broker.replies(cfg["OutQueue"], 2, timeout=30)}
        assert set(replies) == {"forged-1", "forged-2"}
        assert all(r["Error"].startswith("Unknown command") for r in replies.values())
        assert broker.count(inq + ".dead") == 0
        assert d.metric("dlms2amqp_dead_lettered_total") == 0
        assert d.metric("dlms2amqp_redeliveries_total") >= 1  # the broker's flag was seen
    finally:
        assert d.stop() == 0


# --- 10. OutQueue deleted under the daemon ----------------------------------------------
def test_deleted_out_queue_is_declared_again_and_the_reply_delivered(
    run_daemon: Any, broker: Broker
) -> None:
    d: Daemon = run_daemon()
    inq, outq = d.cfg["InQueue"], d.cfg["OutQueue"]
    broker.publish(inq, req("before", Cmd="X"))
    assert broker.replies(outq, 1, timeout=30)[0]["InMsgID"] == "before"
    # When somebody deletes OutQueue and requests come in
    with broker.connection() as c:
        c.channel().queue_delete(outq)
    assert broker.count(outq) is None
    for i in range(5):
        broker.publish(inq, req(f"after-{i}", Cmd="X"))
    # Then the daemon declares it again and the replies land there, nothing dead-lettered
    assert wait_for(lambda: broker.count(outq) is not None, 30), d.output()
    got = broker.replies(outq, 5, timeout=30)
    assert sorted(r["InMsgID"] for r in got) == [f"after-{i}" for i in range(5)]
    assert broker.count(inq + ".dead") == 0
    assert d.metric("dlms2amqp_queue_redeclared_total") >= 1
    assert d.events("queue_declared_again")[0]["queue"] == outq
    assert d.metric("dlms2amqp_dead_lettered_total") == 0
    assert broker.count(inq) == 0


def test_reply_to_a_missing_queue_dead_letters_the_request_not_the_reply(
    run_daemon: Any, broker: Broker
) -> None:
    d: Daemon = run_daemon()
    inq = d.cfg["InQueue"]
    body = req("noreplyq", Cmd="X")
    missing = f"test.missing.{uuid.uuid4().hex[:8]}"
    broker.publish(inq, body, reply_to=missing)
    dead = broker.get_all(inq + ".dead", 1, timeout=30)
    assert len(dead) == 1
    _m, props, dl_body = dead[0]
    # Then the dead-letter queue holds the request as it was sent (it can be replayed)
    assert dl_body == body
    assert props.headers["x-dlms2amqp-reason"] == f"reply queue {missing} (reply_to) does not exist"
    assert d.metric("dlms2amqp_dead_lettered_total", 'reason="unroutable"') == 1
    assert broker.count(missing) is None  # a client's reply_to queue is not ours to create


def test_deleted_dead_letter_queue_is_declared_and_bound_again(
    run_daemon: Any, broker: Broker
) -> None:
    d: Daemon = run_daemon()
    dlq = d.cfg["InQueue"] + ".dead"
    with broker.connection() as c:
        c.channel().queue_delete(dlq)
    # When a body that must be dead-lettered comes in (its publish to the exchange returns)
    broker.publish(d.cfg["InQueue"], b"not json at all")
    # Then the queue is declared and bound again and the body lands there, with its reason
    assert wait_for(lambda: broker.count(dlq) is not None, 30), d.output()
    dead = broker.get_all(dlq, 1, timeout=30)
    assert len(dead) == 1 and dead[0][2] == b"not json at all"
    assert dead[0][1].headers["x-dlms2amqp-reason"] == "body is not valid JSON"
    assert d.events("queue_declared_again")[0]["queue"] == dlq
    assert broker.count(d.cfg["InQueue"]) == 0


# --- 2. replies over the size limit (a private node, max_message_size 64 KiB) -------------
class NodeBroker(Broker):
    """The conftest helpers, on the private node."""

    def __init__(self, node: BrokerNode):
        super().__init__()
        self.node = node

    def connection(self) -> pika.BlockingConnection:
        return pika.BlockingConnection(self.node.params())

    def publish(
        self,
        queue: str,
        body: bytes,
        reply_to: Optional[str] = None,
        headers: Optional[dict] = None,
    ) -> None:
        mid = f"test-{uuid.uuid4().hex[:12]}"
        publish(self.node.params(), queue, [(mid, body)], reply_to=reply_to, headers=headers)


@pytest.fixture(scope="module")
def small_node() -> Iterator[BrokerNode]:
    node = BrokerNode(extra_config=[f"max_message_size = {NODE_MAX}"])
    node.start()
    try:
        yield node
    finally:
        node.destroy()


@pytest.fixture
def node_broker(small_node: BrokerNode) -> Iterator[NodeBroker]:
    b = NodeBroker(small_node)
    try:
        yield b
    finally:
        b.cleanup()


@pytest.fixture
def node_daemon(tmp_path: Path, node_broker: NodeBroker) -> Iterator[Any]:
    started: list[Daemon] = []

    def start(**over: Any) -> Daemon:
        cfg = daemon_config(tmp_path, node_broker, Port=node_broker.node.port, **over)
        d = Daemon(write_config(tmp_path, cfg, f"d{len(started)}.json"), cfg, node_broker)
        started.append(d)
        return d.start()

    try:
        yield start
    finally:
        for d in started:
            try:
                d.stop(timeout=30)
            except Exception:  # noqa: BLE001 - make sure nothing is left running
                pass
            d.kill()


DAYS = 3  # 3 days of load profile: about 72 kB of reply, over the node's 64 KiB


def profile_range() -> tuple[int, int]:
    end = (int(time.time()) // 86400) * 86400
    return end - DAYS * 86400, end


def iso(t: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(t))


def big_request(msg_id: str, port: int, **over: Any) -> bytes:
    start, end = profile_range()
    return req(msg_id, port, ObisCode=PROFILE, dtFrom=iso(start), dtTo=iso(end), **over)


def expected_profile(k: int) -> dict[tuple[str, str], str]:
    start, end = profile_range()
    want = {}
    for t, st, imp, exp in model.load_profile_rows(k, start, end):
        when = datetime.fromtimestamp(t, timezone.utc).isoformat()
        want[(when, "0.0.96.10.1.255")] = str(st)
        want[(when, ENERGY)] = str(imp)
        want[(when, "1.0.2.8.0.255")] = str(exp)
    return want


def oversize_with_15_others(d: Daemon, b: NodeBroker, sim: Any) -> dict[str, dict]:
    """Publish one oversize request and 15 small ones; wait for all 16 replies."""
    inq, outq = d.cfg["InQueue"], d.cfg["OutQueue"]
    b.publish(inq, big_request("huge", sim.port))
    for k in range(1, 16):
        b.publish(inq, req(f"small-{k}", sim.port + k))
    want = {"huge", *(f"small-{k}" for k in range(1, 16))}
    by_id: dict[str, dict] = {}
    deadline = time.monotonic() + 90
    # a reply confirmed just before the channel closed comes again (the same bytes): read
    # until every request has one
    while set(by_id) != want and time.monotonic() < deadline:
        for r in b.replies(outq, 1, timeout=2):
            assert by_id.setdefault(r["InMsgID"], r) == r, "two different replies for one id"
    assert set(by_id) == want, d.output()
    for k in range(1, 16):
        assert by_id[f"small-{k}"]["Status"] == "ok", by_id[f"small-{k}"]
    assert b.count(inq + ".dead") == 0
    return by_id


def test_oversize_reply_is_refused_and_15_others_are_answered(
    node_daemon: Any, node_broker: NodeBroker
) -> None:
    with running_simulator(16) as sim:
        d: Daemon = node_daemon(MaxReplyBytes=49152)
        by_id = oversize_with_15_others(d, node_broker, sim)
    rep = by_id["huge"]
    # Then the oversize request gets a notok that names the size, the limit and what to do
    assert rep["Status"] == "notok" and rep["DataRecords"] == []
    err = rep["Error"]
    size = int(err.split("The reply is ", 1)[1].split(" bytes", 1)[0])
    assert size > NODE_MAX
    assert "more than the 49152 bytes MaxReplyBytes allows" in err
    assert "shorter range" in err and '"SplitReply": true' in err
    # refused before publishing: the broker never had to close the channel
    assert not d.events("broker_channel_closed") and not d.events("broker_connection_lost")
    assert d.metric("dlms2amqp_replies_oversize_total", 'outcome="refused"') == 1
    ev = [e for e in d.events("request") if e["msg_id"] == "huge"]
    assert ev and ev[0]["status"] == "notok" and ev[0]["reply"] == "refused"


def test_split_reply_comes_in_complete_numbered_parts(
    node_daemon: Any, node_broker: NodeBroker
) -> None:
    limit = 20000
    with running_simulator(1) as sim:
        d: Daemon = node_daemon(MaxReplyBytes=limit)
        node_broker.publish(d.cfg["InQueue"], big_request("split", sim.port, SplitReply=True))
        first = node_broker.get_all(d.cfg["OutQueue"], 1, timeout=60)
        assert first, d.output()
        n = json.loads(first[0][2])["Parts"]
        got = first + node_broker.get_all(d.cfg["OutQueue"], n - 1, timeout=30)
    assert n >= 4 and len(got) == n
    parts = [json.loads(b) for _m, _p, b in got]
    # each part is a complete reply in the seed's format, within the limit, numbered
    assert sorted(p["Part"] for p in parts) == list(range(1, n + 1))
    for (_m, props, body), p in zip(got, parts):
        assert len(body) <= limit
        assert list(p) == ["InMsgID", "MsgID", "Status", "Error", "DataRecords", "Part", "Parts"]
        assert p["InMsgID"] == "split" and p["Status"] == "ok" and p["Parts"] == n
        assert props.correlation_id == "split" and props.message_id == p["MsgID"]
    assert len({p["MsgID"] for p in parts}) == n
    # and together they hold exactly the meter's rows (the simulator's model)
    got_records = {
        (r["DateTime"], r["Code"]): r["Value"]
        for p in sorted(parts, key=lambda p: p["Part"])
        for r in p["DataRecords"]
    }
    assert got_records == expected_profile(0)
    assert sum(len(p["DataRecords"]) for p in parts) == len(got_records)
    assert d.metric("dlms2amqp_replies_oversize_total", 'outcome="parts"') == 1


def test_limit_above_the_broker_is_learnt_and_the_loop_ends(
    node_daemon: Any, node_broker: NodeBroker
) -> None:
    # Given MaxReplyBytes (16 MiB by default) above the broker's max_message_size (64 KiB)
    with running_simulator(16) as sim:
        d: Daemon = node_daemon(ReconnectMaxDelay=4.0)
        by_id = oversize_with_15_others(d, node_broker, sim)
        # When the broker refuses the reply and closes the channel
        refused = d.events("broker_refused_message_size")
        assert refused and refused[0]["broker_max_message_size"] == NODE_MAX
        assert refused[0]["bytes"] > NODE_MAX
        # Then the redelivered request, answered from the store, is refused within the
        # broker's limit (once: no loop), and the 15 others still got their replies
        rep = by_id["huge"]
        assert rep["Status"] == "notok"
        assert (
            f"more than the {NODE_MAX} bytes the broker's max_message_size allows" in rep["Error"]
        )
        time.sleep(2)
        assert len(d.events("broker_refused_message_size")) == 1
        assert len(d.events("broker_connection_lost")) == 1
        assert d.metric("dlms2amqp_broker_connected") == 1
        # and a later oversize request is refused before publishing
        node_broker.publish(d.cfg["InQueue"], big_request("huge-2", sim.port + 1))
        rep2 = node_broker.replies(d.cfg["OutQueue"], 1, timeout=60)[0]
        assert rep2["InMsgID"] == "huge-2" and rep2["Status"] == "notok"
        assert len(d.events("broker_connection_lost")) == 1
