# SPDX-License-Identifier: GPL-2.0-or-later
"""The compact A-XDR decoder against Gurux's own decoding, on every data type."""

import struct
from datetime import date, datetime, time, timedelta, timezone

import pytest
from gurux_dlms import GXByteBuffer
from gurux_dlms.GXDLMSSettings import GXDLMSSettings
from gurux_dlms.internal._GXCommon import _GXCommon
from gurux_dlms.internal._GXDataInfo import _GXDataInfo
from hypothesis import given, settings
from hypothesis import strategies as st

from dlms2amqp.errors import MeterProtocolError
from dlms2amqp.meter import axdr


def gurux_decode(raw: bytes):
    """Gurux's decoding, normalised to the Python natives axdr returns."""
    value = _GXCommon.getData(GXDLMSSettings(False, None), GXByteBuffer(raw), _GXDataInfo())
    return normalise(value)


def normalise(v):
    name = type(v).__name__
    if name == "GXDateTime":
        dt = v.value
        return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)
    if name == "GXDate":
        return v.value.date()
    if name == "GXTime":
        return v.value.time().replace(microsecond=0)  # Gurux reads hundredths as ms
    if name == "GXBitString":
        return str(v)
    if name in ("GXEnum", "GXUInt8", "GXUInt16", "GXUInt32", "GXUInt64", "GXInt8", "GXInt16"):
        return int(v.value) if hasattr(v, "value") and v.value is not None else int(str(v))
    if name in ("GXFloat32", "GXFloat64"):
        return float(str(v))
    if isinstance(v, (bytes, bytearray)):
        return bytes(v)
    if isinstance(v, list):
        return [normalise(x) for x in v]
    return v


def ours(raw: bytes):
    v = axdr.decode_all(raw)
    if isinstance(v, time):
        return v.replace(microsecond=0)
    return v


def length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    if n < 0x100:
        return b"\x81" + bytes([n])
    return b"\x82" + n.to_bytes(2, "big")


CASES = [
    ("null", "00", None),
    ("boolean", "0301", True),
    ("bit-string", "040ba0e0", "10100000111"),
    ("int32", "05fffffffe", -2),
    ("uint32", "06ffffffff", 0xFFFFFFFF),
    ("octet-string", "0903010203", b"\x01\x02\x03"),
    ("visible-string", "0a03616263", "abc"),
    ("utf8-string", "0c03616263", "abc"),
    ("bcd", "0d12", 0x12),
    ("int8", "0f80", -128),
    ("int16", "10ff38", -200),
    ("uint8", "11ff", 255),
    ("uint16", "12fffe", 0xFFFE),
    ("int64", "14ffffffffffffffff", -1),
    ("uint64", "15ffffffffffffffff", 2**64 - 1),
    ("enum", "1605", 5),
    ("float32", "173fc00000", 1.5),
    ("float64", "18400c000000000000", 3.5),
    ("date", "1a07e40c0f02", date(2020, 12, 15)),
    ("time", "1b0c0d0eff", time(12, 13, 14)),
    (
        "date-time +03:00",
        "1907e40c0f020c0d0e01ff4c00",
        datetime(2020, 12, 15, 12, 13, 14, 10000, tzinfo=timezone(timedelta(hours=3))),
    ),
    (
        "date-time unspecified deviation",
        "1907e40c0f020c0d0eff800000",
        datetime(2020, 12, 15, 12, 13, 14, tzinfo=timezone.utc),
    ),
    ("array", "01020f010f02", [1, 2]),
    ("structure", "02020906000001000fff1208ae", [bytes.fromhex("000001000fff"), 2222]),
    ("long array", "018180" + "1100" * 128, [0] * 128),
]


@pytest.mark.parametrize("name, hexdata, expected", CASES, ids=[c[0] for c in CASES])
def test_every_type_matches_gurux(name, hexdata, expected):
    raw = bytes.fromhex(hexdata)
    assert ours(raw) == expected
    assert gurux_decode(raw) == ours(raw)


def test_utf8_non_ascii():
    # Gurux shows non-ASCII UTF-8 as hex ("C3 A9"); we return the text
    assert axdr.decode_all(bytes.fromhex("0c02c3a9")) == "é"


def test_octet_string_clock_blue_book_sign():
    # Given a meter at UTC+2: local 12:00, deviation -120 (local + deviation = UTC)
    raw = struct.pack(">HBBBBBBBhB", 2024, 3, 1, 5, 12, 0, 0, 0, -120, 0)
    dt = axdr.to_datetime(raw)
    assert dt.utcoffset() == timedelta(hours=2)
    assert dt.astimezone(timezone.utc) == datetime(2024, 3, 1, 10, 0, tzinfo=timezone.utc)
    tagged = gurux_decode(b"\x19" + raw)
    assert tagged == dt
    unspecified = struct.pack(">HBBBBBBBhB", 2024, 3, 1, 5, 12, 0, 0, 0, -0x8000, 0)
    local = timezone(timedelta(hours=1))
    assert axdr.to_datetime(unspecified, local).utcoffset() == timedelta(hours=1)
    assert axdr.to_datetime(b"\xff" * 12) is None


@pytest.mark.parametrize("hexdata", ["", "05ffff", "0905aa", "0102110111", "63", "0185"])
def test_truncated_or_unknown_is_a_protocol_error(hexdata):
    with pytest.raises(MeterProtocolError):
        axdr.decode_all(bytes.fromhex(hexdata))


def test_trailing_bytes_refused():
    with pytest.raises(MeterProtocolError, match="trailing"):
        axdr.decode_all(bytes.fromhex("110100"))


# --- property test: random A-XDR trees ----------------------------------------------------
def _int(tag, fmt, lo, hi):
    return st.integers(lo, hi).map(lambda v: (bytes([tag]) + struct.pack(fmt, v), v))


def _dt():
    def build(args):
        dt, dev = args
        raw = struct.pack(
            ">HBBBBBBBhB",
            dt.year,
            dt.month,
            dt.day,
            0xFF,
            dt.hour,
            dt.minute,
            dt.second,
            dt.microsecond // 10000,
            dev,
            0,
        )
        tz = timezone(timedelta(minutes=-dev))
        return b"\x19" + raw, dt.replace(microsecond=dt.microsecond // 10000 * 10000, tzinfo=tz)

    return st.tuples(
        st.datetimes(datetime(1990, 1, 1), datetime(2090, 1, 1)),
        st.integers(-720, 720),
    ).map(build)


SIMPLE = st.one_of(
    _int(5, ">i", -(2**31), 2**31 - 1),
    _int(6, ">I", 0, 2**32 - 1),
    _int(15, ">b", -128, 127),
    _int(16, ">h", -(2**15), 2**15 - 1),
    _int(17, ">B", 0, 255),
    _int(18, ">H", 0, 2**16 - 1),
    _int(20, ">q", -(2**63), 2**63 - 1),
    _int(21, ">Q", 0, 2**64 - 1),
    _int(22, ">B", 0, 255),
    st.booleans().map(lambda b: (bytes([3, int(b)]), b)),
    st.binary(max_size=300).map(lambda b: (b"\x09" + length(len(b)) + b, b)),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40).map(
        lambda s: (b"\x0a" + length(len(s)) + s.encode(), s)
    ),
    st.floats(width=64, allow_nan=False).map(lambda f: (b"\x18" + struct.pack(">d", f), f)),
    _dt(),
)


def _container(children):
    def build(items, tag):
        raw = bytes([tag]) + length(len(items)) + b"".join(r for r, _ in items)
        return raw, [v for _, v in items]

    return st.tuples(st.lists(children, max_size=6), st.sampled_from([1, 2])).map(
        lambda a: build(*a)
    )


TREES = st.recursive(SIMPLE, _container, max_leaves=30)


@settings(max_examples=200, deadline=None)
@given(TREES)
def test_random_axdr_matches_expected_and_gurux(case):
    raw, expected = case
    assert axdr.decode_all(raw) == expected
    assert gurux_decode(raw) == expected


@pytest.mark.parametrize(
    "name, hexdata",
    [(c[0], c[1]) for c in CASES if c[0] not in ("time", "null")],
)
def test_list_read_normalisation_of_gurux_values(name, hexdata):
    # GET-with-list values are decoded by Gurux, then turned into our natives
    from dlms2amqp.meter.client import gurux_to_native

    raw = bytes.fromhex(hexdata)
    value = _GXCommon.getData(GXDLMSSettings(False, None), GXByteBuffer(raw), _GXDataInfo())
    assert gurux_to_native(value) == axdr.decode_all(raw)


@given(
    year=st.sampled_from([0, 1, 999, 1999, 2020, 2026, 9999, 0xFFFF]),
    month=st.integers(0, 14),
    day=st.integers(0, 33),
    hour=st.integers(0, 25),
    minute=st.integers(0, 61),
    second=st.integers(0, 61),
    hundredths=st.sampled_from([0, 1, 7, 50, 99, 100, 0xFE, 0xFF]),
    deviation=st.sampled_from([0, -180, 180, 60, -330, 0x8000 - 0x10000, 720, -720]),
)
def test_iso_from_raw_matches_datetime_formatting(
    year, month, day, hour, minute, second, hundredths, deviation
) -> None:

    from dlms2amqp.reply import format_datetime

    raw = struct.pack(
        ">HBBBBBBBhB", year, month, day, 0xFF, hour, minute, second, hundredths, deviation, 0
    )
    dt = axdr.to_datetime(raw)
    expected = format_datetime(dt, "iso") if dt is not None else None
    assert axdr.iso_from_raw(raw) == expected


@pytest.mark.parametrize(
    "hexdata, expected",
    [
        # the result list (IEC 62056-53, real SN meters): count 1, choice data, Data
        ("01 00 0102 1101 1102", (bytes.fromhex("0102 1101 1102"), 0)),
        ("01 00 1105 0000", (b"\x11\x05", 2)),
        ("01 01 0b", (11, 0)),  # count 1, data-access-error object-unavailable
        # the bare Data (Gurux's servers)
        ("0102 1101 1102", (bytes.fromhex("0102 1101 1102"), 0)),
        ("0100", (b"\x01\x00", 0)),  # an empty array is not a result list
        ("0101 00", (b"\x01\x01\x00", 0)),  # [null], not "error 0"
        ("1105 0000", (b"\x11\x05", 2)),
    ],
)
def test_single_result_takes_either_form_of_sn_block_data(hexdata, expected):
    assert axdr.single_result(bytes.fromhex(hexdata)) == expected


def test_single_result_refuses_a_value_cut_short():
    with pytest.raises(MeterProtocolError, match="middle of a value"):
        axdr.single_result(bytes.fromhex("0103 1101 1102"))


def gurux_settings(utc_normal: bool) -> GXDLMSSettings:
    settings = GXDLMSSettings(False, None)
    settings.useUtc2NormalTime = utc_normal  # what -d India/Italy/SaudiArabia sets
    return settings


@pytest.mark.parametrize("deviation", [330, -330, 120, -60, 0, 720, -720])
@pytest.mark.parametrize("utc_normal", [False, True])
def test_deviation_sign_switch_decodes_as_gurux(deviation, utc_normal):
    # Given a date-time whose deviation is read with or without Gurux's UseUtc2NormalTime
    raw = struct.pack(">HBBBBBBBhB", 2026, 3, 1, 7, 12, 0, 0, 0, deviation, 0)
    gx = _GXCommon.getData(gurux_settings(utc_normal), GXByteBuffer(b"\x19" + raw), _GXDataInfo())
    # Then ours gives the instant Gurux gives, as octet string and as tag 25
    assert axdr.to_datetime(raw, utc_normal=utc_normal) == gx.value
    assert axdr.to_datetime(raw, utc_normal=utc_normal).utcoffset() == gx.value.utcoffset()
    assert axdr.decode_all(b"\x19" + raw, utc_normal=utc_normal) == gx.value
    expected = timedelta(minutes=deviation if utc_normal else -deviation)
    assert axdr.to_datetime(raw, utc_normal=utc_normal).utcoffset() == expected


def test_india_meter_clock_is_utc_plus_five_thirty():
    # Given an India meter (-d India) at 12:00 local, sending deviation +330 (its sign)
    raw = bytes.fromhex("07ea0301070c000000014a00")
    # Then the instant is 06:30 UTC, not 17:30 UTC as the Blue Book sign would read it
    dt = axdr.to_datetime(raw, utc_normal=True)
    assert dt.astimezone(timezone.utc) == datetime(2026, 3, 1, 6, 30, tzinfo=timezone.utc)
    assert axdr.iso_from_raw(raw, utc_normal=True) == "2026-03-01T12:00:00+05:30"
    assert axdr.iso_from_raw(raw) == "2026-03-01T12:00:00-05:30"  # cached apart
    assert axdr.iso_from_raw(raw, utc_normal=True) == "2026-03-01T12:00:00+05:30"
    rows, _ = axdr.decode_profile(b"\x01\x01\x02\x01\x19" + raw, utc_normal=True)
    assert rows[0][0] == dt


@pytest.mark.parametrize("offset_min", [330, -330, 60, 0, -720])
@pytest.mark.parametrize("utc_normal", [False, True])
def test_range_selector_date_times_encode_as_gurux(offset_min, utc_normal):
    # Given a range bound in some offset
    dt = datetime(2026, 3, 1, 12, 0, tzinfo=timezone(timedelta(minutes=offset_min)))
    ours = axdr.encode_datetime(dt, utc_normal)
    buff = GXByteBuffer()
    from gurux_dlms import GXDateTime
    from gurux_dlms.enums import DataType

    _GXCommon.setData(gurux_settings(utc_normal), buff, DataType.DATETIME, GXDateTime(dt))
    gx = bytes(buff.array())[1:]
    # Then the bytes are Gurux's (but the day of week, which Gurux leaves unspecified)
    assert ours[:4] + ours[5:] == gx[:4] + gx[5:]
    assert ours[4] == dt.isoweekday()
    # And they read back as the same instant with the same switch
    assert axdr.to_datetime(ours, utc_normal=utc_normal) == dt
    deviation = struct.unpack(">h", ours[9:11])[0]
    assert deviation == (offset_min if utc_normal else -offset_min)
    selector = axdr.range_selector(dt, dt, utc_normal)
    assert selector.count(b"\x09\x0c" + ours) == 2


def test_profile_rows_take_the_sign_switch():
    from dlms2amqp.meter.reader import profile_records

    # Given one profile row from an India meter: clock 12:00 local, deviation +330, a value
    stamp = bytes.fromhex("07ea0301070c000000014a00")
    rows = [[stamp, 42]]
    # Then with -d India the row is stamped +05:30, without it -05:30 (the Blue Book sign)
    india = profile_records(rows, ["0.0.1.0.0.255", "1.0.1.8.0.255"], 0, "iso", True)
    dlms = profile_records(rows, ["0.0.1.0.0.255", "1.0.1.8.0.255"], 0, "iso")
    assert india == [{"DateTime": "2026-03-01T12:00:00+05:30", "Code": "1.0.1.8.0.255",
                      "Value": "42"}]  # fmt: skip
    assert dlms[0]["DateTime"] == "2026-03-01T12:00:00-05:30"
