# SPDX-License-Identifier: GPL-2.0-or-later
"""Request validation: size, JSON shape, types, dates."""

from datetime import datetime, timedelta, timezone

import orjson
import pytest

from dlms2amqp.errors import RequestError
from dlms2amqp.request import extract_msg_id, parse_request

SEED = {
    "MsgID": "1443",
    "Cmd": "READ",
    "ObisCode": "1.0.99.1.0.255",
    "ConnectionString": "-h 127.0.0.1 -p 4060 -c 32 -a Low -i WRAPPER -P 00000000",
    "dtFrom": "2022-08-17T18:01:57.9123297+03:00",
    "dtTo": "2022-08-22T18:01:57.9269498+03:00",
}


def body(**changes):
    data = dict(SEED)
    for key, value in changes.items():
        if value is ...:
            data.pop(key)
        else:
            data[key] = value
    return orjson.dumps(data)


def test_seed_request_parses_with_seven_fraction_digits():
    req = parse_request(body())
    tz = timezone(timedelta(hours=3))
    assert req.msg_id == "1443"
    assert req.cmd == "READ"
    assert req.obis == "1.0.99.1.0.255"
    assert req.dt_from == datetime(2022, 8, 17, 18, 1, 57, 912329, tzinfo=tz)
    assert req.dt_to == datetime(2022, 8, 22, 18, 1, 57, 926949, tzinfo=tz)
    assert req.naive_dates is False


def test_naive_dates_are_utc_and_flagged():
    req = parse_request(body(dtFrom="2020-12-15T00:00:00", dtTo="2020-12-16 00:00"))
    assert req.dt_from == datetime(2020, 12, 15, tzinfo=timezone.utc)
    assert req.dt_to == datetime(2020, 12, 16, tzinfo=timezone.utc)
    assert req.naive_dates is True


def test_z_suffix_and_missing_dates():
    req = parse_request(body(dtFrom="2020-12-15T00:00:00Z", dtTo=...))
    assert req.dt_from.utcoffset() == timedelta(0)
    assert req.dt_to is None and req.naive_dates is False


def test_numeric_msg_id_is_accepted_as_string():
    assert parse_request(body(MsgID=1443)).msg_id == "1443"


def test_connection_string_hidden_in_repr():
    assert "00000000" not in repr(parse_request(body()))


@pytest.mark.parametrize(
    "raw, words",
    [
        (b"[1, 2]", "JSON object"),
        (b"{not json", "not valid JSON"),
        (b'"READ"', "JSON object"),
        (body(Cmd=...), "Cmd is missing"),
        (body(ObisCode=12), None),
        (body(ObisCode=[1]), "ObisCode must be a string"),
        (body(MsgID=True), "MsgID must be a string"),
        (body(ConnectionString="x" * 5000), "longer than"),
        (body(dtFrom="yesterday"), "dtFrom 'yesterday' is not an ISO 8601"),
        (body(dtFrom="2022-02-30T00:00:00"), "not a valid date"),
        (body(dtTo="2022-01-01T00:00:00+25:00"), "invalid UTC offset"),
        (body(dtFrom="2022-08-23T00:00:00+00:00"), "dtFrom is later than dtTo"),
    ],
)
def test_bad_requests(raw, words):
    if words is None:  # an integer OBIS is accepted as a string, but never crashes
        assert parse_request(raw).obis == "12"
        return
    with pytest.raises(RequestError) as info:
        parse_request(raw)
    assert words in str(info.value)


def test_size_limit_checked_before_parsing():
    big = b"{" + b" " * 70000 + b"}"
    with pytest.raises(RequestError, match="more than the 65536 allowed"):
        parse_request(big)
    with pytest.raises(RequestError, match="more than the 100 allowed"):
        parse_request(body(), max_bytes=100)


def test_extract_msg_id_best_effort():
    assert extract_msg_id(body(dtFrom="bad")) == "1443"
    assert extract_msg_id(b'{"MsgID": 7}') == "7"
    assert extract_msg_id(b"garbage") is None
    assert extract_msg_id(b"[1]") is None
    assert extract_msg_id(b'{"MsgID": {"a": 1}}') is None
