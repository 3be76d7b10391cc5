# SPDX-License-Identifier: GPL-2.0-or-later
"""Reply format: the seed's keys, MsgID uuid4, DateTime formats."""

import uuid
from datetime import datetime, timedelta, timezone

import orjson

from dlms2amqp.reply import dumps, error_reply, format_datetime, ok_reply, record, value_to_str

TZ3 = timezone(timedelta(hours=3))


def test_seed_keys_and_uuid4():
    reply = ok_reply("1443", [record(None, "1.0.1.8.0.255", 5)])
    assert list(reply) == ["InMsgID", "MsgID", "Status", "Error", "DataRecords"]
    assert uuid.UUID(reply["MsgID"]).version == 4
    assert reply["Status"] == "ok" and reply["Error"] == ""
    assert reply["DataRecords"] == [{"DateTime": "", "Code": "1.0.1.8.0.255", "Value": "5"}]
    assert ok_reply("1", [])["MsgID"] != reply["MsgID"]


def test_error_reply_matches_seed_example():
    msg = "Connection is permanently rejected. Authentication failure."
    reply = orjson.loads(dumps(error_reply("1443", msg)))
    assert reply["Status"] == "notok"
    assert reply["Error"] == msg
    assert reply["DataRecords"] == []
    assert error_reply(None, "x")["InMsgID"] == ""


def test_iso_keeps_meter_offset():
    dt = datetime(2020, 12, 15, 21, 0, 0, tzinfo=TZ3)
    assert format_datetime(dt) == "2020-12-15T21:00:00+03:00"
    assert format_datetime(dt.replace(microsecond=10000)) == "2020-12-15T21:00:00.010+03:00"


def test_dotnet_format_of_the_seed():
    assert (
        format_datetime(datetime(2020, 12, 15, 21, 0, 0, 10000, tzinfo=TZ3), "dotnet")
        == "12/15/2020 9:00:00.010 PM"
    )
    assert (
        format_datetime(datetime(2020, 12, 15, 0, 0, 0, 10000), "dotnet")
        == "12/15/2020 12:00:00.010 AM"
    )
    assert format_datetime(datetime(2020, 1, 2, 12, 5, 7), "dotnet") == "1/2/2020 12:05:07.000 PM"


def test_register_record_has_scaler_and_unit():
    rec = record(None, "1.0.32.7.0.255", 2295, scaler=-1, unit=35)
    assert rec == {
        "DateTime": "",
        "Code": "1.0.32.7.0.255",
        "Value": "2295",
        "Scaler": -1,
        "Unit": 35,
    }


def test_value_strings():
    assert value_to_str(b"D2ASIM") == "44324153494D"
    assert value_to_str(None) == ""
    assert value_to_str(True) == "true"
    assert value_to_str([1, b"\x01"]) == "[1, 01]"
    assert value_to_str(-5) == "-5"
