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


@pytest.mark.parametrize("count, dead", [(0, False), (2, False), (3, True), (7, True)])
def test_quorum_delivery_count_over_the_limit(intake: Intake, count: int, dead: bool) -> None:
    d = intake.decide(body(), {"x-delivery-count": count}, set())
    if dead:
        assert d == DeadLetter(
            f"delivered {count + 1} times without an answer (poison request)", "delivery_limit"
        )
    else:
        assert isinstance(d, Dispatch)


def test_classic_queue_attempts_over_the_limit_then_forgotten(intake: Intake) -> None:
    raw = body()
    decisions = [intake.decide(raw, None, set()) for _ in range(4)]
    assert [type(d) for d in decisions] == [Dispatch, Dispatch, Dispatch, DeadLetter]
    assert decisions[-1] == DeadLetter(
        "delivered 4 times without an answer (poison request)", "delivery_limit"
    )
    # dead-lettering forgets the count: a request sent again later is read again
    assert isinstance(intake.decide(raw, None, set()), Dispatch)


def test_a_stored_answer_wins_over_the_delivery_limit(intake: Intake, store: ReplyStore) -> None:
    raw = body()
    store.put(intake.replies.key_for("m1", raw), "reply-1", b"{}")
    assert isinstance(intake.decide(raw, {"x-delivery-count": 99}, set()), Stored)
