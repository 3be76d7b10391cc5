# SPDX-License-Identifier: GPL-2.0-or-later
"""Compact A-XDR decoder for large replies (profile buffers) and plain values.

Gurux decodes every byte through Python method calls; on a one-day profile that
is most of the gateway's CPU (gurux-facts.md: 8.8 ms per read stock, 2.2 ms
with a small decoder).  Gurux still frames, ciphers and reassembles blocks; the
resulting attribute bytes are decoded here.  ``tests/test_axdr.py`` compares
this decoder with Gurux's ``GXCommon.getData`` on every data type.

Values map to Python natives: integers and enums -> int, booleans -> bool,
floats -> float, strings -> str, octet strings -> bytes, bit strings -> str of
'0'/'1', arrays and structures -> list, date-time (tag 25) -> datetime, date
(26) -> date, time (27) -> time.  A 12-byte octet string is turned into a
datetime only by :func:`to_datetime` (the caller knows which column is a clock).
The one encoder here, :func:`range_selector`, writes the date-times of a profile
read by range.
"""

from __future__ import annotations

import struct
from datetime import date, datetime, time, timedelta, timezone
from typing import Any, Optional

from ..errors import MeterProtocolError

# Tags (Blue Book data types)
NULL, ARRAY, STRUCTURE, BOOLEAN, BIT_STRING = 0, 1, 2, 3, 4
INT32, UINT32, OCTET_STRING, VISIBLE_STRING, UTF8_STRING = 5, 6, 9, 10, 12
BCD, INT8, INT16, UINT8, UINT16, COMPACT_ARRAY = 13, 15, 16, 17, 18, 19
INT64, UINT64, ENUM, FLOAT32, FLOAT64, DATETIME, DATE, TIME = 20, 21, 22, 23, 24, 25, 26, 27

#: deviation value meaning "not specified"
DEVIATION_UNSPECIFIED = -0x8000

_FIXED = {
    INT32: struct.Struct(">i"),
    UINT32: struct.Struct(">I"),
    INT8: struct.Struct(">b"),
    INT16: struct.Struct(">h"),
    UINT16: struct.Struct(">H"),
    INT64: struct.Struct(">q"),
    UINT64: struct.Struct(">Q"),
    FLOAT32: struct.Struct(">f"),
    FLOAT64: struct.Struct(">d"),
}
_DT = struct.Struct(">HBBBBBBBhB")
_TZ_CACHE: dict = {}


def _tz(offset_min: int) -> timezone:
    tz = _TZ_CACHE.get(offset_min)
    if tz is None:
        tz = _TZ_CACHE[offset_min] = timezone(timedelta(minutes=offset_min))
    return tz


def _length(data: bytes, pos: int) -> tuple[int, int]:
    first = data[pos]
    if first < 0x80:
        return first, pos + 1
    n = first & 0x7F
    if n == 0 or n > 4:
        raise MeterProtocolError("the meter sent a malformed length in its reply")
    return int.from_bytes(data[pos + 1 : pos + 1 + n], "big"), pos + 1 + n


def to_datetime(
    raw: bytes, default_tz: timezone = timezone.utc, utc_normal: bool = False
) -> Optional[datetime]:
    """Decode a 12-byte COSEM date-time; None when it is not a usable instant.

    Blue Book sign: local time + deviation = UTC, so the UTC offset is
    ``-deviation`` minutes.  ``utc_normal`` (``-d India``/``Italy``/``SaudiArabia``,
    Gurux's ``UseUtc2NormalTime``): the deviation is the UTC offset itself, as those
    meters send it.  An unspecified deviation (0x8000) takes ``default_tz``.
    """
    if len(raw) != 12:
        return None
    year, month, day, _dow, hour, minute, second, hundredths, dev, _status = _DT.unpack(raw)
    if year == 0xFFFF or month > 12 or day > 31 or hour > 23 or minute > 59 or second > 59:
        return None
    if month == 0 or day == 0:
        return None
    micro = 0 if hundredths == 0xFF else hundredths * 10000
    if dev == DEVIATION_UNSPECIFIED:
        tz = default_tz
    else:
        tz = _tz(dev if utc_normal else -dev)
    try:
        return datetime(year, month, day, hour, minute, second, micro, tzinfo=tz)
    except ValueError:
        return None


_ISO_PARTS: dict = {}
_ISO_PARTS_NORMAL: dict = {}  # the same for the "normal" deviation sign


def iso_from_raw(raw: bytes, utc_normal: bool = False) -> Optional[str]:
    """``format_datetime(to_datetime(raw), "iso")`` without building a datetime.

    Profile rows carry one date-time each and formatting them was the largest cost of a
    read (6 us a row); the date and the offset repeat from row to row, so they are
    formatted once and cached.  None where ``to_datetime`` gives None; ``utc_normal``
    as there.
    """
    if len(raw) != 12:
        return None
    hour, minute, second, hundredths = raw[5], raw[6], raw[7], raw[8]
    if hour > 23 or minute > 59 or second > 59 or (99 < hundredths < 0xFF):
        return None
    key = raw[0:4] + raw[9:11]
    cache = _ISO_PARTS_NORMAL if utc_normal else _ISO_PARTS
    parts = cache.get(key)
    if parts is None:
        midnight = to_datetime(raw[0:5] + b"\0\0\0\0" + raw[9:12], utc_normal=utc_normal)
        if midnight is None:
            return None
        parts = (
            f"{midnight.year:04d}-{midnight.month:02d}-{midnight.day:02d}T",
            midnight.isoformat()[19:],
        )
        if len(cache) > 4096:
            cache.clear()
        cache[key] = parts
    date_part, offset = parts
    if hundredths == 0 or hundredths == 0xFF:
        return f"{date_part}{hour:02d}:{minute:02d}:{second:02d}{offset}"
    return f"{date_part}{hour:02d}:{minute:02d}:{second:02d}.{hundredths * 10:03d}{offset}"


def _to_date(raw: bytes) -> Optional[date]:
    year, month, day = int.from_bytes(raw[0:2], "big"), raw[2], raw[3]
    try:
        return date(year, month, day)
    except ValueError:
        return None


def _to_time(raw: bytes) -> Optional[time]:
    hour, minute, second, hundredths = raw
    try:
        return time(hour, minute, second, 0 if hundredths == 0xFF else hundredths * 10000)
    except ValueError:
        return None


def decode(data: bytes, pos: int = 0, utc_normal: bool = False) -> tuple[Any, int]:
    """Decode one tagged value at ``pos``; returns (value, next position).

    ``utc_normal``: date-times (tag 25) carry the deviation in the "normal" sign
    (see :func:`to_datetime`).
    """
    if type(data) is not bytes:
        data = bytes(data)
    try:
        return _decode(data, pos, utc_normal)
    except (IndexError, struct.error) as exc:
        raise MeterProtocolError("the meter's reply ended in the middle of a value") from exc


def decode_all(data: bytes, utc_normal: bool = False) -> Any:
    """Decode a whole attribute value and check nothing is left over."""
    value, pos = decode(data, 0, utc_normal)
    if pos != len(data):
        raise MeterProtocolError("the meter's reply has trailing bytes after the value")
    return value


def decode_value(data: bytes, utc_normal: bool = False) -> tuple[Any, int]:
    """Decode one complete value; returns (value, number of bytes after it).

    Some meters append bytes after a complete value (Gurux's C reference meter does
    after the clock and after the last profile block); Gurux's clients decode the value
    and ignore the rest, so the gateway does too and lets the caller say so.  A value
    that is itself cut short still raises.
    """
    value, pos = decode(data, 0, utc_normal)
    return value, len(data) - pos


def split_results(data: bytes) -> tuple[list, int]:
    """A GET-with-list (or SN READ) result list -> ([bytes | int, ...], bytes after it).

    ``data`` is the count and the results as the meter sent them: each result is
    ``00`` + a value (returned as that value's own A-XDR bytes, for ``decode_value``)
    or ``01`` + a data-access-result (returned as the int code).  Per-item results keep
    one refused item from hiding the others.
    """
    if type(data) is not bytes:
        data = bytes(data)
    try:
        count, pos = _length(data, 0)
        out: list[bytes | int] = []
        for _ in range(count):
            choice = data[pos]
            if choice == 0:
                _value, end = _decode(data, pos + 1)
                out.append(data[pos + 1 : end])
                pos = end
            elif choice == 1:
                out.append(data[pos + 1])
                pos += 2
            else:
                raise MeterProtocolError(
                    f"the meter's list reply holds an unknown result kind ({choice})"
                )
    except (IndexError, struct.error) as exc:
        raise MeterProtocolError("the meter's list reply ended in the middle of a result") from exc
    if pos > len(data):
        raise MeterProtocolError("the meter's list reply ended in the middle of a result")
    return out, len(data) - pos


def _decode(data: bytes, pos: int, normal: bool = False) -> tuple[Any, int]:
    tag = data[pos]
    pos += 1
    fixed = _FIXED.get(tag)
    if fixed is not None:
        end = pos + fixed.size
        if end > len(data):
            raise IndexError
        return fixed.unpack_from(data, pos)[0], end
    if tag == ARRAY or tag == STRUCTURE:
        count, pos = _length(data, pos)
        items: list[Any] = []
        append = items.append
        size = len(data)
        fixed_get = _FIXED.get
        for _ in range(count):
            # leaves inline (profile rows are mostly these): no call per value
            child = data[pos]
            fixed = fixed_get(child)
            if fixed is not None:
                end = pos + 1 + fixed.size
                if end > size:
                    raise IndexError
                append(fixed.unpack_from(data, pos + 1)[0])
                pos = end
            elif child == OCTET_STRING and data[pos + 1] < 0x80:
                end = pos + 2 + data[pos + 1]
                if end > size:
                    raise IndexError
                append(data[pos + 2 : end])
                pos = end
            elif child == UINT8 or child == ENUM:
                append(data[pos + 1])
                pos += 2
            else:
                value, pos = _decode(data, pos, normal)
                append(value)
        return items, pos
    if tag == OCTET_STRING:
        n, pos = _length(data, pos)
        end = pos + n
        if end > len(data):
            raise IndexError
        return bytes(data[pos:end]), end
    if tag == UINT8 or tag == ENUM or tag == BCD:
        return data[pos], pos + 1
    if tag == BOOLEAN:
        return data[pos] != 0, pos + 1
    if tag == NULL:
        return None, pos
    if tag == VISIBLE_STRING or tag == UTF8_STRING:
        n, pos = _length(data, pos)
        end = pos + n
        if end > len(data):
            raise IndexError
        raw = bytes(data[pos:end])
        text = raw.decode("utf-8" if tag == UTF8_STRING else "latin-1")
        return text, end
    if tag == BIT_STRING:
        bits, pos = _length(data, pos)
        nbytes = (bits + 7) // 8
        end = pos + nbytes
        if end > len(data):
            raise IndexError
        text = "".join(format(b, "08b") for b in data[pos:end])[:bits]
        return text, end
    if tag == DATETIME:
        end = pos + 12
        if end > len(data):
            raise IndexError
        return to_datetime(bytes(data[pos:end]), utc_normal=normal), end
    if tag == DATE:
        end = pos + 5
        if end > len(data):
            raise IndexError
        return _to_date(bytes(data[pos:end])), end
    if tag == TIME:
        end = pos + 4
        if end > len(data):
            raise IndexError
        return _to_time(bytes(data[pos:end])), end
    raise MeterProtocolError(f"the meter's reply holds an unsupported data type ({tag})")


def single_result(data: bytes) -> tuple[Any, int]:
    """The raw-data of SN READ blocks for one item -> (its Data bytes or error code, extra).

    Meters put either the encoded result list there (count 1, choice, Data: what the
    standard and real SN meters send) or the bare Data (what Gurux's servers send and
    Gurux's clients expect).  The reading that leaves fewer bytes over wins; on a tie,
    the bare Data.  ``extra`` counts the bytes after the value.
    """
    try:
        _value, bare_extra = decode_value(data)
    except MeterProtocolError:
        bare_extra = None
    if data[:1] == b"\x01" and data[1:2] in (b"\x00", b"\x01"):
        try:
            items, list_extra = split_results(data)
        except MeterProtocolError:
            items = []
        if len(items) == 1 and items[0] != 0 and (bare_extra is None or list_extra < bare_extra):
            return items[0], list_extra
    if bare_extra is None:
        raise MeterProtocolError("the meter's reply ended in the middle of a value")
    return data[: len(data) - bare_extra], bare_extra


def decode_profile(data: bytes, utc_normal: bool = False) -> tuple[list, int]:
    """Decode a profile buffer (array of structures) -> (rows as lists, bytes after it)."""
    rows, extra = decode_value(data, utc_normal)
    if not isinstance(rows, list):
        raise MeterProtocolError("the profile buffer is not an array")
    return rows, extra


def encode_datetime(dt: datetime, utc_normal: bool = False) -> bytes:
    """COSEM date-time in the datetime's own offset (Blue Book: deviation = -offset).

    ``utc_normal``: the deviation is the offset itself (see :func:`to_datetime`).
    """
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    delta = dt.utcoffset() or timedelta(0)
    offset = int(delta.total_seconds() // 60)
    return _DT.pack(
        dt.year,
        dt.month,
        dt.day,
        dt.isoweekday(),
        dt.hour,
        dt.minute,
        dt.second,
        0,
        offset if utc_normal else -offset,
        0,
    )


_CLOCK_COLUMN = bytes.fromhex("0204120008090600000100 00ff0f02120000".replace(" ", ""))


def range_selector(start: datetime, end: datetime, utc_normal: bool = False) -> bytes:
    """Selective access by range (1) on the clock column, all columns."""
    return (
        b"\x02\x04"
        + _CLOCK_COLUMN
        + b"\x09\x0c"
        + encode_datetime(start, utc_normal)
        + b"\x09\x0c"
        + encode_datetime(end, utc_normal)
        + b"\x01\x00"
    )
