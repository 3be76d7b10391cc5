# SPDX-License-Identifier: GPL-2.0-or-later
"""The master's reply path with the broker's answers scripted: acks, requeues, dead-letters.

The real broker cannot be made to return a reply to a queue the daemon has just declared
again, nor to nack one part of a split reply on demand; a recording stand-in for the
broker adapter can.  Everything else is the real Master (reply store, intake, limits).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import orjson
import pytest

from dlms2amqp import reply as replymod
from dlms2amqp.config import build_config
from dlms2amqp.daemon.broker import Delivery
from dlms2amqp.daemon.master import Master


class ScriptedBroker:
    """Records what the master does; each publish is answered by ``outcome(n, target)``."""

    def __init__(self, outcome: Callable[[int, str], str]):
        self.outcome = outcome
        self.published: list[tuple[str, bytes]] = []
        self.acked: list[int] = []
        self.requeued: list[int] = []
        self.dead: list[tuple[bytes, str, str]] = []
        self.declared: list[str] = []
        self.max_message_size: Optional[int] = None
        self.later: list[Callable[[], None]] = []
        self.commits = 0
        self.in_doubt: list[Any] = []  # what each commit would leave to settle if in doubt

    def current(self, d: Delivery) -> bool:
        return True

    def publish(
        self, _x: str, target: str, body: bytes, _props: Any, on_ok: Any, on_fail: Any
    ) -> bool:
        n = len(self.published)
        self.published.append((target, body))
        result = self.outcome(n, target)
        self.later.append(on_ok if result == "ok" else (lambda: on_fail(result)))
        return True

    def publish_ack(
        self,
        d: Delivery,
        _x: str,
        target: str,
        messages: list[tuple[bytes, Any]],
        on_done: Any,
        in_doubt: Optional[list[Any]] = None,
    ) -> bool:
        """The tx channel: every message and the ack in one commit; returns come with it."""
        self.in_doubt.append(in_doubt)
        returned = set()
        for body, props in messages:
            n = len(self.published)
            self.published.append((target, body))
            if self.outcome(n, target) == "returned":
                returned.add(props.message_id)
        self.acked.append(d.tag)
        self.commits += 1
        self.later.append(lambda: on_done(returned))
        return True

    def dead_letter_body(self, body: bytes, reason: str, kind: str) -> None:
        self.dead.append((body, reason, kind))

    def declare_again(self, queue: str, then: Callable[[], None]) -> bool:
        self.declared.append(queue)
        self.later.append(then)
        return True

    def ack(self, d: Delivery) -> None:
        self.acked.append(d.tag)

    def requeue(self, d: Delivery) -> None:
        self.requeued.append(d.tag)

    def dead_letter(self, d: Delivery, body: bytes, reason: str, kind: str) -> None:
        self.dead.append((body, reason, kind))
        self.acked.append(d.tag)

    def run(self) -> None:
        """Deliver the broker's answers (confirms, returns, declare-oks) in order."""
        while self.later:
            self.later.pop(0)()


@pytest.fixture
def master(tmp_path: Path) -> Any:
    cfg = build_config(
        {"StateDir": str(tmp_path / "state"), "MaxReplyBytes": 4096, "Workers": 1, "MetricsPort": 0}
    )
    m = Master(cfg)
    yield m
    m.store.close()


REQUEST = b'{"MsgID": "r1", "Cmd": "READ"}'


def big_reply(rows: int = 200) -> bytes:
    recs = [replymod.record(None, "1.0.1.8.0.255", i) for i in range(rows)]
    return replymod.dumps(replymod.ok_reply("r1", recs))


def answer(
    master: Any,
    broker: ScriptedBroker,
    body: bytes,
    split: bool,
    reply_to: str = "",
    tx: bool = False,
) -> Delivery:
    master.broker = broker
    d = Delivery(1, 7, reply_to or None, REQUEST, tx=tx)
    master.answer(master.store.key_for("r1", REQUEST), "r1", "reply-1", body, [d], split=split)
    broker.run()
    return d


def test_reply_returned_from_out_queue_declares_it_and_publishes_again(master: Any) -> None:
    b = ScriptedBroker(lambda n, _t: "returned" if n == 0 else "ok")
    answer(master, b, replymod.dumps(replymod.error_reply("r1", "x")), False)
    assert b.declared == [master.cfg.OutQueue]
    assert [t for t, _ in b.published] == [master.cfg.OutQueue] * 2
    assert b.published[0][1] == b.published[1][1]
    assert b.acked == [7] and not b.dead and not b.requeued


def test_reply_returned_again_dead_letters_the_request_not_the_reply(master: Any) -> None:
    b = ScriptedBroker(lambda _n, _t: "returned")
    answer(master, b, replymod.dumps(replymod.error_reply("r1", "x")), False)
    assert b.declared == [master.cfg.OutQueue]
    assert len(b.dead) == 1
    body, reason, kind = b.dead[0]
    assert body == REQUEST  # the request as it came, so it can be replayed
    assert kind == "unroutable" and master.cfg.OutQueue in reason and "again" in reason
    assert b.acked == [7]  # once (by the dead-letter), never twice


def test_reply_to_missing_is_not_declared_the_request_is_dead_lettered(master: Any) -> None:
    b = ScriptedBroker(lambda _n, _t: "returned")
    answer(master, b, replymod.dumps(replymod.error_reply("r1", "x")), False, reply_to="client.q")
    assert b.declared == [] and len(b.published) == 1
    assert b.dead == [(REQUEST, "reply queue client.q (reply_to) does not exist", "unroutable")]


def test_parts_are_acked_once_after_the_last_confirm(master: Any) -> None:
    b = ScriptedBroker(lambda _n, _t: "ok")
    answer(master, b, big_reply(), True)
    parts = [orjson.loads(body) for _t, body in b.published]
    assert len(parts) > 2 and [p["Part"] for p in parts] == list(range(1, len(parts) + 1))
    assert all(len(body) <= 4096 for _t, body in b.published)
    assert b.acked == [7]


def test_one_part_nacked_requeues_the_request_once(master: Any) -> None:
    b = ScriptedBroker(lambda n, _t: "nacked" if n in (1, 2) else "ok")
    answer(master, b, big_reply(400), True)
    assert len(b.published) > 3
    assert b.requeued == [7] and b.acked == [] and not b.dead


def test_oversize_refused_is_what_the_store_keeps(master: Any) -> None:
    b = ScriptedBroker(lambda _n, _t: "ok")
    answer(master, b, big_reply(), False)
    ((target, body),) = b.published
    rep = orjson.loads(body)
    assert rep["Status"] == "notok" and "4096 bytes MaxReplyBytes" in rep["Error"]
    # the small refusal is stored, not the big reply: a redelivery gets the same bytes
    assert master.store.get(master.store.key_for("r1", REQUEST)) == (rep["MsgID"], body)


def test_the_broker_limit_once_known_wins_when_lower(master: Any) -> None:
    b = ScriptedBroker(lambda _n, _t: "ok")
    b.max_message_size = 2048
    master.broker = b
    assert master.reply_limit() == (2048, "the broker's max_message_size")
    b.max_message_size = 1 << 30
    assert master.reply_limit() == (4096, "MaxReplyBytes")


# --- partitions: the delivery came on the tx channel (reply and ack in one commit) ---------
def test_tx_parts_and_ack_are_one_commit(master: Any) -> None:
    b = ScriptedBroker(lambda _n, _t: "ok")
    answer(master, b, big_reply(), True, tx=True)
    assert len(b.published) > 2 and b.commits == 1
    assert b.acked == [7] and not b.requeued and not b.dead and not b.declared


def test_tx_reply_returned_from_out_queue_is_published_again_after_declaring(
    master: Any,
) -> None:
    b = ScriptedBroker(lambda n, _t: "returned" if n == 0 else "ok")
    answer(master, b, replymod.dumps(replymod.error_reply("r1", "x")), False, tx=True)
    assert b.declared == [master.cfg.OutQueue]
    assert [t for t, _ in b.published] == [master.cfg.OutQueue] * 2
    assert b.published[0][1] == b.published[1][1]
    assert b.acked == [7] and b.commits == 1 and not b.dead and not b.requeued


def test_tx_reply_returned_again_dead_letters_the_request(master: Any) -> None:
    b = ScriptedBroker(lambda _n, _t: "returned")
    answer(master, b, replymod.dumps(replymod.error_reply("r1", "x")), False, tx=True)
    assert b.declared == [master.cfg.OutQueue]
    [(body, reason, kind)] = b.dead
    assert body == REQUEST and kind == "unroutable" and "again" in reason
    assert b.acked == [7]  # by the commit, once


def test_tx_reply_to_missing_dead_letters_the_request(master: Any) -> None:
    b = ScriptedBroker(lambda _n, _t: "returned")
    answer(master, b, replymod.dumps(replymod.error_reply("r1", "x")), False, "client.q", tx=True)
    assert b.declared == [] and len(b.published) == 1
    assert b.dead == [(REQUEST, "reply queue client.q (reply_to) does not exist", "unroutable")]


# --- commits in doubt (daemon/indoubt.py) ----------------------------------------------
def test_tx_commit_in_doubt_leaves_request_and_reply_for_the_partition(master: Any) -> None:
    from dlms2amqp.daemon import indoubt

    # Given a reply in parts to a request that came from partition p03
    b = ScriptedBroker(lambda _n, _t: "ok")
    master.broker = b
    d = Delivery(1, 7, "client.q", REQUEST, queue="in.p03", tx=True)
    key = master.store.key_for("r1", REQUEST)
    body = big_reply()
    master.answer(key, "r1", "reply-1", body, [d], split=True)
    b.run()
    # Then if that commit ends in doubt, one message goes back into p03: request + the
    # whole stored reply (not its parts), from our broker user, for p03's owner
    [make] = b.in_doubt
    [(exchange, queue, msg, props)] = make()
    assert (exchange, queue) == ("", "in.p03") and msg == REQUEST + body
    assert props.user_id == master.cfg.UserName and props.reply_to == "client.q"
    assert props.headers == {indoubt.HEADER: "reply-1", indoubt.LENGTH_HEADER: len(REQUEST)}
    assert props.delivery_mode == 2
    # and the commit that came back ok marks the request answered here
    assert key in master.committed


def in_doubt_delivery(
    master: Any, reply: bytes, user: Optional[str] = None, tag: int = 9
) -> tuple[Delivery, Any, bytes]:
    from dlms2amqp.daemon import indoubt

    _x, queue, body, props = indoubt.message(
        master.cfg.UserName if user is None else user,
        "in.p03",
        "client.q",
        REQUEST,
        "reply-1",
        reply,
    )
    return Delivery(1, tag, props.reply_to, body, queue=queue, tx=True), props, body


def test_in_doubt_unknown_here_is_published_stored_and_acked_in_one_commit(master: Any) -> None:
    # Given a commit in doubt of another daemon, for a request this daemon never saw
    b = ScriptedBroker(lambda _n, _t: "ok")
    master.broker = b
    reply = replymod.dumps(replymod.error_reply("r1", "x"))
    d, props, body = in_doubt_delivery(master, reply)
    master.settle_in_doubt(d, props, body)
    b.run()
    # Then its reply goes to the request's reply_to with the ack, and is stored: a
    # redelivery of the request itself is answered with the same bytes
    assert b.published == [("client.q", reply)] and b.acked == [9] and b.commits == 1
    key = master.store.key_for("r1", REQUEST)
    assert master.store.get(key) == ("reply-1", reply)
    assert key in master.committed and not b.dead


def answered_here(master: Any) -> tuple[ScriptedBroker, str, bytes]:
    """This daemon answers the request r1 itself (tag 7, tx): its broker, key and reply."""
    b = ScriptedBroker(lambda _n, _t: "ok")
    master.broker = b
    key = master.store.key_for("r1", REQUEST)
    mine = replymod.dumps(replymod.error_reply("r1", "read here"))
    master.answer(key, "r1", "reply-2", mine, [Delivery(1, 7, "client.q", REQUEST, tx=True)])
    return b, key, mine


def test_in_doubt_answered_or_being_read_here_is_dropped(master: Any) -> None:
    # Given a request whose reply this daemon committed (it got the redelivery first)
    b, key, mine = answered_here(master)
    b.run()
    assert b.published == [("client.q", mine)]
    # When another daemon's reply in doubt for it arrives
    d, props, body = in_doubt_delivery(master, replymod.dumps(replymod.error_reply("r1", "x")))
    master.settle_in_doubt(d, props, body)
    b.run()
    # Then it is acked and dropped: one reply for the request, ours
    assert b.published == [("client.q", mine)] and b.acked == [7, 9]
    # And while the request is being read here, the same
    master.committed.clear()
    master.by_key[key] = 1
    d, props, body = in_doubt_delivery(master, b"{}", tag=10)
    master.settle_in_doubt(d, props, body)
    assert b.published == [("client.q", mine)] and b.acked == [7, 9, 10] and not b.dead


def test_in_doubt_stored_but_not_committed_here_is_published(master: Any) -> None:
    # Given our own reply whose commit ended in doubt (stored here, no commit-ok)
    key = master.store.key_for("r1", REQUEST)
    reply = replymod.dumps(replymod.error_reply("r1", "x"))
    master.store.put(key, "reply-1", reply)
    # When its in-doubt message comes back to us (we still own the partition)
    b = ScriptedBroker(lambda _n, _t: "ok")
    master.broker = b
    d, props, body = in_doubt_delivery(master, reply)
    master.settle_in_doubt(d, props, body)
    b.run()
    # Then it is published: the broker may have settled the ack and lost the reply
    assert b.published == [("client.q", reply)] and b.acked == [9]


@pytest.mark.parametrize("user", ["mallory", ""])
def test_in_doubt_from_another_user_is_dead_lettered_never_published(
    master: Any, user: str
) -> None:
    b = ScriptedBroker(lambda _n, _t: "ok")
    master.broker = b
    forged = replymod.dumps(replymod.ok_reply("r1", []))
    d, props, body = in_doubt_delivery(master, forged, user=user or None)
    if not user:
        props.user_id = None
    master.settle_in_doubt(d, props, body)
    assert b.published == []
    [(dead_body, reason, kind)] = b.dead
    assert dead_body == body and kind == "in_doubt_refused" and "not ours" in reason
    assert master.store.get(master.store.key_for("r1", REQUEST)) is None


def test_in_doubt_headers_are_not_moved_from_inqueue() -> None:
    import pika

    from dlms2amqp.daemon import indoubt, partitions

    # A client puts the in-doubt headers on a request: the mover drops them
    props = pika.BasicProperties(
        headers={indoubt.HEADER: "x", indoubt.LENGTH_HEADER: 3, "mine": 1}, user_id="guest"
    )
    out = partitions.moved_properties(props)
    assert out.headers == {"mine": 1} and out.user_id is None
    assert not indoubt.is_in_doubt(out)


def test_tx_tracker_one_commit_at_a_time_backlog_returns() -> None:
    from dlms2amqp.daemon.amqp import TxTracker

    t = TxTracker()
    seen: list[set[str]] = []
    assert not t.begin()  # nothing sent: no commit
    t.add([("a", "OUT"), ("b", "OUT")], seen.append)
    t.dirty = True
    assert t.begin() and t.busy()
    t.dirty = True  # something more sent meanwhile would be refused by RabbitMQ...
    assert not t.begin()  # ... so no second commit while one is in flight
    t.add([("c", "OUT")], seen.append)
    t.on_return("b", "OUT")
    [(cb, back)] = t.committed()
    cb(back)
    assert seen == [{"b"}]
    assert t.begin()  # the next transaction: what came up meanwhile
    [(cb, back)] = t.committed()
    cb(back)
    assert seen == [{"b"}, set()] and not t.busy()
    t.add([("d", "OUT")], seen.append)
    t.backlog.append(lambda: None)
    assert t.reset() == 2 and not t.busy()


def test_tx_tracker_a_return_counts_for_one_delivery_of_its_queue() -> None:
    from dlms2amqp.daemon.amqp import TxTracker

    # Given one reply (one message id) published for two deliveries of one request in one
    # transaction, to OutQueue and to a reply_to queue that does not exist
    t = TxTracker()
    seen: list[tuple[str, set[str]]] = []
    t.add([("r1", "OUT")], lambda back: seen.append(("out", back)))
    t.add([("r1", "gone.q")], lambda back: seen.append(("gone", back)))
    t.dirty = True
    assert t.begin()
    # When the broker returns the one sent to the missing queue
    t.on_return("r1", "gone.q")
    for cb, back in t.committed():
        cb(back)
    # Then only that delivery learns its reply came back
    assert seen == [("out", set()), ("gone", {"r1"})]
    assert not t.returned


def test_tx_tracker_keeps_the_messages_of_a_commit_in_doubt() -> None:
    from dlms2amqp.daemon.amqp import TxTracker

    # Given two replies committed together, and a third sent after the commit went out
    t = TxTracker()
    t.add([("r1", "OUT")], lambda back: None, lambda: [("", "OUT", b"one", "p1")])
    t.add([("r2", "OUT")], lambda back: None, lambda: [("", "OUT", b"two", "p2")])
    t.dirty = True
    assert t.begin()
    t.add([("r3", "OUT")], lambda back: None, lambda: [("", "OUT", b"three", "p3")])
    # When the connection closes before the commit-ok: the commit's messages are in doubt
    # (the broker may have settled the acks and lost the publishes), the third never left
    assert t.in_doubt() == [("", "OUT", b"one", "p1"), ("", "OUT", b"two", "p2")]
    t.reset()
    assert t.in_doubt() == [] and not t.replays
    # and a commit that came back ok leaves nothing in doubt
    t.add([("r4", "OUT")], lambda back: None, lambda: [("", "OUT", b"four", "p4")])
    t.dirty = True
    assert t.begin()
    t.committed()
    assert t.in_doubt() == [] and not t.replays


def test_in_doubt_known_here_is_dropped_even_while_stopping(master: Any) -> None:
    from types import SimpleNamespace

    # Given a stopping daemon that committed a reply to the request
    b = ScriptedBroker(lambda _n, _t: "ok")
    master.broker = b
    key = master.store.key_for("r1", REQUEST)
    master._committed(key)
    master.stopping = True
    method = SimpleNamespace(redelivered=False)
    # When another daemon's reply in doubt for it arrives: acked and dropped, not
    # requeued (the next owner would not know the request was answered)
    d, props, body = in_doubt_delivery(master, replymod.dumps(replymod.error_reply("r1", "x")))
    master.on_delivery(d, method, props, body)
    assert b.acked == [9] and not b.requeued and not b.published
    # and one for a request unknown here goes back to the queue for the next owner
    other = b'{"MsgID": "r2", "Cmd": "READ"}'
    _x, queue, body2, props2 = indoubt_message(master, other)
    d2 = Delivery(1, 10, "client.q", body2, queue=queue, tx=True)
    master.on_delivery(d2, method, props2, body2)
    assert b.requeued == [10] and b.acked == [9]


def indoubt_message(master: Any, request: bytes) -> tuple:
    from dlms2amqp.daemon import indoubt

    reply = replymod.dumps(replymod.error_reply("r2", "x"))
    return indoubt.message(master.cfg.UserName, "in.p03", "client.q", request, "reply-2", reply)


def test_in_doubt_while_our_own_reply_is_being_committed_is_dropped(master: Any) -> None:
    # Given our reply to the request sent in a commit not yet ok (the broker answers later)
    b, key, mine = answered_here(master)
    assert master.committing[key] == 1 and key not in master.committed
    # When another daemon's reply in doubt arrives meanwhile: dropped, ours is the reply
    d, props, body = in_doubt_delivery(master, replymod.dumps(replymod.error_reply("r1", "x")))
    master.settle_in_doubt(d, props, body)
    assert b.published == [("client.q", mine)] and 9 in b.acked
    b.run()  # the commit-ok
    assert key in master.committed and not master.committing
    # a lost connection forgets commits in flight (they are void or in doubt now)
    master.answer(key, "r1", "reply-2", mine, [Delivery(1, 8, "client.q", REQUEST, tx=True)])
    assert master.committing[key] == 1
    master.on_connection_lost()
    assert not master.committing


def test_in_doubt_over_the_broker_limit_replays_the_reply_itself(master: Any) -> None:
    b = ScriptedBroker(lambda _n, _t: "ok")
    master.broker = b
    key = master.store.key_for("r1", REQUEST)
    reply = replymod.dumps(replymod.error_reply("r1", "x"))
    d = Delivery(1, 7, "client.q", REQUEST, queue="in.p03", tx=True)
    master.answer(key, "r1", "reply-1", reply, [d])
    [make] = b.in_doubt
    b.max_message_size = len(REQUEST) + len(reply) - 1  # learned from the broker
    [(exchange, target, msg, _props)] = make()
    assert (exchange, target, msg) == ("", "client.q", reply)
    b.max_message_size = None
    [(_x, queue, msg, _props)] = make()
    assert queue == "in.p03" and msg == REQUEST + reply


def test_confirm_tracker_multiple_ack_settles_up_to_its_tag_only() -> None:
    import pika

    from dlms2amqp.daemon.amqp import ConfirmTracker

    t: ConfirmTracker[str] = ConfirmTracker()
    for name in "abcde":
        t.published("id-" + name, name)
    t.on_return("id-b")
    got = t.on_confirm(pika.spec.Basic.Ack(delivery_tag=3, multiple=True))
    assert got == [("a", "ok"), ("b", "returned"), ("c", "ok")]
    assert t.on_confirm(pika.spec.Basic.Nack(delivery_tag=5, multiple=False)) == [("e", "nacked")]
    assert len(t) == 1  # d: not confirmed yet
    assert t.on_confirm(pika.spec.Basic.Ack(delivery_tag=5, multiple=True)) == [("d", "ok")]
    assert t.reset() == []


def test_in_doubt_headers_on_inqueue_are_moved_not_settled(tmp_path: Path) -> None:
    """InQueue is consumed on the tx channel with partitions; a sender's message with the
    in-doubt headers there is a request to move like any other, never settled or dropped
    (only daemons send those, into a partition)."""
    import pika

    from dlms2amqp.daemon import indoubt

    cfg = build_config(
        {"StateDir": str(tmp_path / "s"), "Workers": 1, "MetricsPort": 0, "Partitions": 2}
    )
    m = Master(cfg)
    try:
        b = ScriptedBroker(lambda _n, _t: "ok")
        m.broker = b
        moved: list[bytes] = []
        assert m.mover is not None
        m.mover.move = lambda d, props, body: moved.append(body)  # type: ignore[method-assign]
        _x, _q, body, props = indoubt.message(
            cfg.UserName, "in.p0", "client.q", REQUEST, "reply-1", b"{}"
        )
        m.committed[m.store.key_for("r1", REQUEST)] = None  # known: a partition would drop it
        d = Delivery(1, 5, None, body, queue=cfg.InQueue, tx=True)
        m.on_delivery(d, pika.spec.Basic.Deliver(delivery_tag=5), props, body)
        assert moved == [body] and b.acked == [] and b.published == []
    finally:
        m.store.close()
