# SPDX-License-Identifier: GPL-2.0-or-later
"""A-XDR encoders (and the small decoder for request parameters) of the simulator.

Every encoder returns the complete encoded ``Data`` (tag + content) as bytes, so
values can be pre-encoded once and concatenated without copying Python objects
around.  ``encode(tag, value)`` is the generic entry point used by the template
loader: for ``ARRAY``/``STRUCTURE`` the value is a list of already encoded items.

``decode(buf, pos)`` returns ``(python_value, new_pos)``; arrays and structures
become lists, date-times stay 12-byte ``bytes`` (decode them with
``parse_datetime``).  It only needs to understand what clients send in
selective-access parameters, but it accepts every fixed-size type.
"""

from __future__ import annotations

import calendar
import struct
import time
from typing import Any

NULL = 0
ARRAY = 1
STRUCTURE = 2
BOOLEAN = 3
BIT_STRING = 4
INT32 = 5  # double-long
UINT32 = 6  # double-long-unsigned
OCTET_STRING = 9
VISIBLE_STRING = 10
UTF8_STRING = 12
BCD = 13
INT8 = 15  # integer
INT16 = 16  # long
UINT8 = 17  # unsigned
UINT16 = 18  # long-unsigned
INT64 = 20
UINT64 = 21
ENUM = 22
FLOAT32 = 23
FLOAT64 = 24
DATETIME = 25
DATE = 26
TIME = 27

_FIXED = {
    BOOLEAN: ">B",
    INT32: ">i",
    UINT32: ">I",
    BCD: ">b",
    INT8: ">b",
    INT16: ">h",
    UINT8: ">B",
    UINT16: ">H",
    INT64: ">q",
    UINT64: ">Q",
    ENUM: ">B",
    FLOAT32: ">f",
    FLOAT64: ">d",
}
_FIXED_STRUCTS = {tag: struct.Struct(fmt) for tag, fmt in _FIXED.items()}
_RAW_SIZES = {DATETIME: 12, DATE: 5, TIME: 4}


class DecodeError(ValueError):
    """The bytes are not valid A-XDR for what the simulator expects."""


def enc_len(n: int) -> bytes:
    """BER-style length used by A-XDR for variable-length items."""
    if n < 0x80:
        return bytes((n,))
    if n < 0x100:
        return bytes((0x81, n))
    if n < 0x10000:
        return bytes((0x82, n >> 8, n & 0xFF))
    return b"\x84" + n.to_bytes(4, "big")


def dec_len(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode a length at ``pos``; returns (length, new position)."""
    try:
        b = buf[pos]
    except IndexError as e:
        raise DecodeError("truncated length") from e
    if b < 0x80:
        return b, pos + 1
    n = b & 0x7F
    if n == 0 or n > 4 or pos + 1 + n > len(buf):
        raise DecodeError("bad length")
    return int.from_bytes(buf[pos + 1 : pos + 1 + n], "big"), pos + 1 + n


def null() -> bytes:
    return b"\x00"


def boolean(v: bool) -> bytes:
    return b"\x03\x01" if v else b"\x03\x00"


def uint8(v: int) -> bytes:
    return bytes((UINT8, v))


def int8(v: int) -> bytes:
    return struct.pack(">Bb", INT8, v)


def enum(v: int) -> bytes:
    return bytes((ENUM, v))


def uint16(v: int) -> bytes:
    return struct.pack(">BH", UINT16, v)


def int16(v: int) -> bytes:
    return struct.pack(">Bh", INT16, v)


def uint32(v: int) -> bytes:
    return struct.pack(">BI", UINT32, v)


def int32(v: int) -> bytes:
    return struct.pack(">Bi", INT32, v)


def octet_string(v: bytes) -> bytes:
    return b"\x09" + enc_len(len(v)) + bytes(v)


def visible_string(v: str) -> bytes:
    raw = v.encode("ascii")
    return b"\x0a" + enc_len(len(raw)) + raw


def array(items: list[bytes]) -> bytes:
    return b"\x01" + enc_len(len(items)) + b"".join(items)


def structure(items: list[bytes]) -> bytes:
    return b"\x02" + enc_len(len(items)) + b"".join(items)


def encode(tag: int, value: Any) -> bytes:
    """Encode a Python value as A-XDR Data of type ``tag``.

    ARRAY/STRUCTURE take a list of encoded items; OCTET_STRING/BIT_STRING take
    bytes (BIT_STRING value is ``(bit_count, bytes)``); strings take str;
    DATETIME/DATE/TIME take the raw 12/5/4 bytes; numbers take int/float.
    """
    if tag == NULL:
        return b"\x00"
    if tag == ARRAY:
        return array(list(value))
    if tag == STRUCTURE:
        return structure(list(value))
    if tag in _FIXED_STRUCTS:
        if tag == BOOLEAN:
            value = 1 if value else 0
        return bytes((tag,)) + _FIXED_STRUCTS[tag].pack(value)
    if tag == OCTET_STRING:
        return octet_string(bytes(value))
    if tag in (VISIBLE_STRING, UTF8_STRING):
        raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        return bytes((tag,)) + enc_len(len(raw)) + raw
    if tag == BIT_STRING:
        bits, raw = value
        return b"\x04" + enc_len(bits) + bytes(raw)
    if tag in _RAW_SIZES:
        raw = bytes(value)
        if len(raw) != _RAW_SIZES[tag]:
            raise ValueError(f"type {tag} needs {_RAW_SIZES[tag]} bytes")
        return bytes((tag,)) + raw
    raise ValueError(f"A-XDR type {tag} is not supported")


def decode(buf: bytes, pos: int = 0) -> tuple[Any, int]:
    """Decode one Data at ``pos``; returns (value, new position)."""
    try:
        tag = buf[pos]
    except IndexError as e:
        raise DecodeError("truncated data") from e
    pos += 1
    if tag == NULL:
        return None, pos
    if tag in (ARRAY, STRUCTURE):
        n, pos = dec_len(buf, pos)
        items = []
        for _ in range(n):
            v, pos = decode(buf, pos)
            items.append(v)
        return items, pos
    st = _FIXED_STRUCTS.get(tag)
    if st is not None:
        if pos + st.size > len(buf):
            raise DecodeError("truncated data")
        return st.unpack_from(buf, pos)[0], pos + st.size
    if tag in (OCTET_STRING, VISIBLE_STRING, UTF8_STRING):
        n, pos = dec_len(buf, pos)
        if pos + n > len(buf):
            raise DecodeError("truncated string")
        raw = bytes(buf[pos : pos + n])
        return (raw if tag == OCTET_STRING else raw.decode("latin-1")), pos + n
    if tag == BIT_STRING:
        n, pos = dec_len(buf, pos)
        nb = (n + 7) // 8
        return bytes(buf[pos : pos + nb]), pos + nb
    if tag in _RAW_SIZES:
        n = _RAW_SIZES[tag]
        if pos + n > len(buf):
            raise DecodeError("truncated date-time")
        return bytes(buf[pos : pos + n]), pos + n
    raise DecodeError(f"unsupported A-XDR type {tag}")


# --- date-time ---------------------------------------------------------------
_DT = struct.Struct(">HBBBBBBBhB")


def datetime_raw(t: int, utc_offset_min: int = 0) -> bytes:
    """12-byte COSEM date-time for UTC ``t``: local time, deviation ``-offset``."""
    tm = time.gmtime(t + 60 * utc_offset_min)
    return _DT.pack(
        tm.tm_year,
        tm.tm_mon,
        tm.tm_mday,
        tm.tm_wday + 1,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        0,
        -utc_offset_min,
        0,
    )


def datetime_data(t: int, utc_offset_min: int = 0) -> bytes:
    """Date-time as the octet-string Data COSEM uses for clocks and profiles."""
    return b"\x09\x0c" + datetime_raw(t, utc_offset_min)


def parse_datetime(raw: bytes, utc_offset_min: int = 0) -> int:
    """UTC POSIX time of a 12-byte COSEM date-time.

    Unspecified fields (0xFF) count as their lowest value; an unspecified
    deviation (0x8000) means the meter's local time.
    """
    if len(raw) != 12:
        raise DecodeError("a date-time has 12 bytes")
    year, mon, day, _dow, hour, minute, sec, _hs, dev, _st = _DT.unpack(raw)
    if year == 0xFFFF or mon in (0xFF, 0xFD, 0xFE) or day in (0xFF, 0xFD, 0xFE):
        raise DecodeError("date-time without a full date")
    hour = 0 if hour == 0xFF else hour
    minute = 0 if minute == 0xFF else minute
    sec = 0 if sec == 0xFF else sec
    try:
        local = calendar.timegm((year, mon, day, hour, minute, sec, 0, 0, 0))
    except (ValueError, OverflowError) as e:
        raise DecodeError("invalid date-time") from e
    if dev == -0x8000:
        return local - 60 * utc_offset_min
    return local + 60 * dev
