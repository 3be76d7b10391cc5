# SPDX-License-Identifier: GPL-2.0-or-later
"""The intake policy with no broker: deliveries in, decisions out (the real reply store)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional

import orjson
import pytest

from dlms2amqp.daemon.intake import Answer, Attach, DeadLetter, Dispatch, Intake, Stored
from dlms2amqp.daemon.replystore import ReplyStore
from dlms2amqp.request import parse_request

CONN = "-h 127.0.0.1 -p 4061 -c 32 -a Low -P 00000000 -i WRAPPER"


def body(**fields: Any) -> bytes:
    req = {"MsgID": "m1", "Cmd": "READ", "ObisCode": "1.0.1.8.0.255", "ConnectionString": CONN}
    req.update(fields)
    return orjson.dumps({k: v for k, v in req.items() if v is not None})


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ReplyStore]:
    s = ReplyStore(tmp_path / "replies.sqlite3", 100)
    yield s
    s.close()


@pytest.fixture
def intake(store: ReplyStore) -> Intake:
    return Intake(store, max_body_bytes=4096, delivery_limit=3)


@pytest.mark.parametrize(
    "raw, reason, kind",
    [
        (b"x" * 4097, "body of 4097 bytes exceeds MaxBodyBytes 4096", "too_large"),
        (b'{"MsgID": "m1", ', "body is not valid JSON", "not_json"),
        (b"[1, 2]", "body is not a JSON object", "not_object"),
        (b'"just a string"', "body is not a JSON object", "not_object"),
        (body(MsgID=None), "body has no MsgID (string or number)", "no_msgid"),
        (body(MsgID=True), "body has no MsgID (string or number)", "no_msgid"),
        (body(MsgID={"a": 1}), "body has no MsgID (string or number)", "no_msgid"),
    ],
)
def test_no_request_at_all_is_dead_lettered(
    intake: Intake, raw: bytes, reason: str, kind: str
) -> None:
    assert intake.decide(raw, None, set()) == DeadLetter(reason, kind)


@pytest.mark.parametrize(
    "raw, cmd, error",
    [
        (body(Cmd="WRITE"), "WRITE", "Unknown command WRITE; only READ is supported"),
        (body(Cmd=" read "), None, None),  # normalised: a READ (see the Dispatch test)
        (body(ObisCode=None), "?", "request field ObisCode is missing"),
        (body(dtFrom="yesterday"), "?", "dtFrom 'yesterday' is not an ISO 8601 date-time"),
        (body(MsgID="x" * 300), "?", "request field MsgID is longer than 256 characters"),
        (body(ConnectionString="-h 127.0.0.1"), "READ", "-p"),
    ],
)
def test_invalid_request_is_answered_notok(
    intake: Intake, raw: bytes, cmd: Optional[str], error: Optional[str]
) -> None:
    d = intake.decide(raw, None, set())
    if cmd is None:
        assert isinstance(d, Dispatch)
        return
    assert isinstance(d, Answer), d
    assert d.cmd == cmd
    assert error in d.error
    reply = orjson.loads(d.body)
    assert reply["Status"] == "notok"
    assert reply["Error"] == d.error
    assert reply["MsgID"] == d.reply_id
    assert reply["InMsgID"] == orjson.loads(raw)["MsgID"][:256]
    assert d.key == intake.replies.key_for(d.msg_id, raw)


def test_good_request_is_dispatched_parsed_once(intake: Intake) -> None:
    raw = body(dtFrom="2024-01-01T00:00:00+02:00", dtTo="2024-01-02T00:00:00+02:00")
    d = intake.decide(raw, {"x-delivery-count": 0}, set())
    assert isinstance(d, Dispatch)
    assert d.msg_id == "m1"
    assert d.key == intake.replies.key_for("m1", raw)
    assert d.request == parse_request(raw)
    assert d.settings.meter_key == "tcp:127.0.0.1:4061"
    assert d.settings.password is not None and d.settings.password.reveal() == "00000000"


def test_settings_parsed_by_the_mover_are_used_not_parsed_again(
    intake: Intake, tmp_path: Path
) -> None:
    from dlms2amqp.config import build_config
    from dlms2amqp.daemon.partitions import PARSED_BYTES, PARSED_KEPT, Mover

    # Given a request moved to its partition by this daemon (the mover parsed it)
    cfg = build_config({"StateDir": str(tmp_path / "s"), "Partitions": 4, "MetricsPort": 0})
    mover = Mover(cfg, broker=None, log=None, metrics=None)
    mover._publish = lambda *a: None  # type: ignore[method-assign]  # no broker here
    raw = body()
    mover.move(None, None, raw)
    # When the partition brings it back: the intake dispatches the mover's settings
    parsed = mover.parsed_for(raw)
    assert parsed is not None and parsed.meter_key == "tcp:127.0.0.1:4061"
    d = intake.decide(raw, None, set(), False, parsed)
    assert isinstance(d, Dispatch) and d.settings is parsed
    # once: a second delivery of the same body is parsed afresh
    assert mover.parsed_for(raw) is None
    # and requests moved to partitions other daemons own do not pile up
    for i in range(PARSED_KEPT + 10):
        mover.move(None, None, body(MsgID=f"m{i}"))
    assert len(mover.parsed) == PARSED_KEPT
    assert mover.parsed_bytes == sum(map(len, mover.parsed))
    assert mover.parsed_for(body(MsgID="m0")) is None  # the oldest went first
    # nor do large bodies: bounded in bytes too
    for i in range(100):
        mover.move(None, None, body(MsgID=f"big{i}", ObisCode="1.0.99.1.0.255" + " " * 60000))
    assert mover.parsed_bytes <= PARSED_BYTES and mover.parsed_bytes == sum(map(len, mover.parsed))


def test_numeric_msgid_is_a_string(intake: Intake) -> None:
    d = intake.decide(body(MsgID=1443), None, set())
    assert isinstance(d, Dispatch) and d.msg_id == "1443" and d.request.msg_id == "1443"


def test_duplicate_already_answered_comes_from_the_store(intake: Intake, store: ReplyStore) -> None:
    raw = body()
    store.put(intake.replies.key_for("m1", raw), "reply-1", b'{"stored": true}')
    assert intake.decide(raw, None, set()) == Stored(
        intake.replies.key_for("m1", raw), "m1", "reply-1", b'{"stored": true}'
    )
    # the same MsgID with another body is another request
    assert isinstance(intake.decide(body(ObisCode="1.0.2.8.0.255"), None, set()), Dispatch)


def test_duplicate_being_read_is_attached(intake: Intake) -> None:
    raw = body()
    key = intake.replies.key_for("m1", raw)
    assert intake.decide(raw, None, {key}) == Attach(key)


@pytest.fixture
def quorum(store: ReplyStore) -> Intake:
    return Intake(store, max_body_bytes=4096, delivery_limit=3, queue_type="quorum")


@pytest.mark.parametrize("count, dead", [(0, False), (2, False), (3, True), (7, True)])
def test_quorum_delivery_count_over_the_limit(quorum: Intake, count: int, dead: bool) -> None:
    # a quorum queue sets x-delivery-count on every delivery itself (0 on the first)
    d = quorum.decide(body(), {"x-delivery-count": count}, set(), redelivered=count > 0)
    if dead:
        assert d == DeadLetter(
            f"delivered {count + 1} times without an answer (poison request)", "delivery_limit"
        )
    else:
        assert isinstance(d, Dispatch)


@pytest.mark.parametrize("redelivered", [False, True])
@pytest.mark.parametrize("count", [3, 99, "99", True])
def test_classic_queue_ignores_a_publisher_set_delivery_count(
    intake: Intake, count: Any, redelivered: bool
) -> None:
    # Given a publisher that put x-delivery-count on its message to a classic queue
    # Then it counts for nothing: only the broker's flag and our own record count
    d = intake.decide(body(), {"x-delivery-count": count}, set(), redelivered=redelivered)
    assert isinstance(d, Dispatch), d


@pytest.mark.parametrize("count", [3, 99])
def test_quorum_first_delivery_keeps_a_forged_count_that_counts_for_nothing(
    quorum: Intake, count: int
) -> None:
    # a quorum queue overwrites x-delivery-count on a redelivery only; on the first
    # delivery the header is whatever the publisher put there
    d = quorum.decide(body(), {"x-delivery-count": count}, set(), redelivered=False)
    assert isinstance(d, Dispatch), d


def test_quorum_header_that_is_no_number_counts_for_nothing(quorum: Intake) -> None:
    for bogus in ("99", True, 9.5, None):
        d = quorum.decide(body(), {"x-delivery-count": bogus}, set(), redelivered=True)
        assert isinstance(d, Dispatch), (bogus, d)
        quorum.replies.forget_attempts(d.key)


def test_classic_queue_attempts_over_the_limit_then_forgotten(intake: Intake) -> None:
    raw = body()
    decisions = [intake.decide(raw, None, set(), redelivered=i > 0) for i in range(4)]
    assert [type(d) for d in decisions] == [Dispatch, Dispatch, Dispatch, DeadLetter]
    assert decisions[-1] == DeadLetter(
        "delivered 4 times without an answer (poison request)", "delivery_limit"
    )
    # dead-lettering forgets the count: a request sent again later is read again
    assert isinstance(intake.decide(raw, None, set(), redelivered=True), Dispatch)


def test_a_first_delivery_is_never_poison(intake: Intake, store: ReplyStore) -> None:
    # Given a request body dispatched three times without an answer (the daemon died)
    raw = body()
    for i in range(3):
        assert isinstance(intake.decide(raw, None, set(), redelivered=i > 0), Dispatch)
    # When the same body is published again (a new message: redelivered is false)
    assert isinstance(intake.decide(raw, None, set(), redelivered=False), Dispatch)
    # Then the count starts again for it: two redeliveries more are still read
    assert isinstance(intake.decide(raw, None, set(), redelivered=True), Dispatch)
    assert isinstance(intake.decide(raw, None, set(), redelivered=True), Dispatch)
    assert isinstance(intake.decide(raw, None, set(), redelivered=True), DeadLetter)


def test_a_stored_answer_wins_over_the_delivery_limit(intake: Intake, store: ReplyStore) -> None:
    raw = body()
    store.put(intake.replies.key_for("m1", raw), "reply-1", b"{}")
    assert isinstance(intake.decide(raw, {"x-delivery-count": 99}, set()), Stored)
    assert isinstance(intake.decide(raw, {"x-delivery-count": 99}, set(), True), Stored)


def test_stored_answers_that_never_get_confirmed_hit_the_delivery_limit(
    intake: Intake, store: ReplyStore
) -> None:
    # Given a request whose reply is stored, but every publish of it fails (the broker
    # closes the channel), so the request comes back redelivered again and again
    raw = body()
    key = store.key_for("m1", raw)
    store.put(key, "reply-1", b"{}")
    first = intake.decide(raw, None, set(), redelivered=False)
    assert first == Stored(key, "m1", "reply-1", b"{}", False, 0)  # a first delivery: no count
    again = [intake.decide(raw, None, set(), redelivered=True) for _ in range(4)]
    # Then the store answers it DeliveryLimit times, then it is dead-lettered
    assert [getattr(d, "attempts", None) for d in again[:3]] == [1, 2, 3]
    assert again[3] == DeadLetter(
        "answered 4 times from the reply store, but the broker never confirmed the reply "
        "(delivery limit)",
        "delivery_limit",
    )
    # and forgotten: the stored reply still answers a later copy
    assert isinstance(intake.decide(raw, None, set(), redelivered=True), Stored)


def test_stored_answer_carries_the_split_request(intake: Intake, store: ReplyStore) -> None:
    raw = body(SplitReply=True)
    store.put(store.key_for("m1", raw), "reply-1", b"{}")
    d = intake.decide(raw, None, set())
    assert isinstance(d, Stored) and d.split


@pytest.mark.parametrize("value, split", [(True, True), (False, False), (None, False)])
def test_split_reply_field(intake: Intake, value: Any, split: bool) -> None:
    d = intake.decide(body(SplitReply=value), None, set())
    assert isinstance(d, Dispatch) and d.request.split_reply is split


@pytest.mark.parametrize("value", ["yes", 1, [True]])
def test_split_reply_field_must_be_true_or_false(intake: Intake, value: Any) -> None:
    d = intake.decide(body(SplitReply=value), None, set())
    assert isinstance(d, Answer)
    assert d.error == "request field SplitReply must be true or false"
