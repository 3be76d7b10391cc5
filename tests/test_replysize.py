# SPDX-License-Identifier: GPL-2.0-or-later
"""Replies within the size limit: whole, in numbered parts, or refused (no broker)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import orjson
import pytest

from dlms2amqp import reply as replymod
from dlms2amqp.daemon.replysize import fit, split_reply

SEED_KEYS = ["InMsgID", "MsgID", "Status", "Error", "DataRecords"]


def profile_reply(rows: int, note: str = "") -> dict:
    t0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
    recs = [
        replymod.record(t0 + timedelta(minutes=15 * i), "1.0.99.1.0.255", 1000 + i * 7)
        for i in range(rows)
    ]
    return replymod.ok_reply("req-7", recs, note)


def test_a_reply_within_the_limit_goes_out_as_it_is() -> None:
    body = replymod.dumps(profile_reply(10))
    f = fit("req-7", "r1", body, len(body), False, "MaxReplyBytes")
    assert f.kind == "whole" and f.messages == [("r1", body)] and f.size == len(body)


def test_a_reply_over_the_limit_is_refused_with_size_limit_and_advice() -> None:
    body = replymod.dumps(profile_reply(500))
    f = fit("req-7", "r1", body, 4096, False, "MaxReplyBytes")
    assert f.kind == "refused" and len(f.messages) == 1
    mid, data = f.messages[0]
    rep = orjson.loads(data)
    assert list(rep) == SEED_KEYS
    assert rep["Status"] == "notok" and rep["DataRecords"] == [] and rep["InMsgID"] == "req-7"
    assert rep["MsgID"] == mid != "r1"
    err = rep["Error"]
    assert f"{len(body)} bytes" in err and "4096 bytes MaxReplyBytes" in err
    assert "shorter range" in err and '"SplitReply": true' in err
    # the same stored reply refused again (a redelivery) gives the very same message
    assert fit("req-7", "r1", body, 4096, False, "MaxReplyBytes").messages == f.messages


@pytest.mark.parametrize("limit", [400, 600, 700, 1000, 1500, 4096, 10000])
def test_split_parts_are_complete_replies_within_the_limit(limit: int) -> None:
    original = profile_reply(300, note="dtFrom/dtTo had no UTC offset and were taken as UTC")
    body = replymod.dumps(original)
    f = fit("req-7", "r1", body, limit, True, "MaxReplyBytes")
    assert f.kind == "parts"
    parts = [orjson.loads(b) for _m, b in f.messages]
    n = len(parts)
    assert n >= len(body) // limit
    records = []
    for k, ((mid, data), p) in enumerate(zip(f.messages, parts), 1):
        assert len(data) <= limit
        assert list(p) == [*SEED_KEYS, "Part", "Parts"]
        assert (p["Part"], p["Parts"]) == (k, n)
        assert p["MsgID"] == mid
        assert {x: p[x] for x in ("InMsgID", "Status", "Error")} == {
            x: original[x] for x in ("InMsgID", "Status", "Error")
        }
        assert p["DataRecords"], "an empty part"
        records += p["DataRecords"]
    assert records == original["DataRecords"]
    assert len({m for m, _ in f.messages}) == n and "r1" not in {m for m, _ in f.messages}
    # deterministic: a redelivery answered from the store publishes the same parts
    assert fit("req-7", "r1", body, limit, True, "MaxReplyBytes").messages == f.messages


def test_parts_are_packed_full() -> None:
    body = replymod.dumps(profile_reply(300))
    limit = 2000
    parts = split_reply("r1", body, limit)
    assert parts is not None
    rec = len(orjson.dumps(orjson.loads(body)["DataRecords"][0]))
    # every part but the last has no room left for one more record
    for _m, data in parts[:-1]:
        assert len(data) + rec + 1 > limit


def test_a_record_alone_over_the_limit_cannot_be_split() -> None:
    rep = replymod.ok_reply("req-7", [replymod.record(None, "0.0.42.0.0.255", b"\x01" * 3000)])
    body = replymod.dumps(rep)
    f = fit("req-7", "r1", body, 4096, True, "the broker's max_message_size")
    assert f.kind == "refused"
    err = orjson.loads(f.messages[0][1])["Error"]
    assert "one DataRecord alone is over the limit" in err
    assert "4096 bytes the broker's max_message_size" in err and "shorter range" in err


def test_a_notok_reply_without_records_over_the_limit_is_refused() -> None:
    body = replymod.dumps(replymod.error_reply("req-7", "x" * 5000))
    assert fit("req-7", "r1", body, 4096, True, "MaxReplyBytes").kind == "refused"
