# SPDX-License-Identifier: GPL-2.0-or-later
"""Reply dicts in the proof of concept's format.

Consumers were built against the seed's reply; its keys (``InMsgID, MsgID,
Status, Error, DataRecords``) are kept exactly.  Date-times are ISO 8601 with
the meter's own UTC offset by default, or the .NET ``G``-like format of the
proof of concept (``12/15/2020 9:00:00.010 PM``) for consumers that parse it.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Iterable, Optional

import orjson

DATETIME_FORMATS = ("iso", "dotnet")

#: Error text of an ok reply whose request had dates without UTC offset
NAIVE_DATES_NOTE = "dtFrom/dtTo had no UTC offset and were taken as UTC"


def format_datetime(value: Optional[datetime], fmt: str = "iso") -> str:
    """Format a meter date-time; an unspecified one (None) becomes an empty string."""
    if value is None:
        return ""
    if fmt == "dotnet":
        hour12 = value.hour % 12 or 12
        ampm = "PM" if value.hour >= 12 else "AM"
        return (
            f"{value.month}/{value.day}/{value.year:04d} {hour12}:{value.minute:02d}:"
            f"{value.second:02d}.{value.microsecond // 1000:03d} {ampm}"
        )
    if fmt != "iso":
        raise ValueError(f"datetime format must be one of {', '.join(DATETIME_FORMATS)}")
    spec = "milliseconds" if value.microsecond else "seconds"
    return value.isoformat(timespec=spec)


def record(
    dt: Optional[datetime],
    code: str,
    value: Any,
    fmt: str = "iso",
    scaler: Optional[int] = None,
    unit: Optional[int] = None,
) -> dict:
    """One DataRecord; Scaler and Unit only for registers."""
    rec: dict[str, Any] = {
        "DateTime": format_datetime(dt, fmt),
        "Code": code,
        "Value": value_to_str(value),
    }
    if scaler is not None:
        rec["Scaler"] = scaler
    if unit is not None:
        rec["Unit"] = unit
    return rec


def value_to_str(value: Any) -> str:
    """Values travel as strings (the seed's ``"Value": "1134573"``)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex().upper()
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(value_to_str(v) for v in value) + "]"
    return str(value)


def new_msg_id() -> str:
    return str(uuid.uuid4())


def ok_reply(in_msg_id: str, records: Iterable[dict], note: str = "") -> dict:
    return {
        "InMsgID": in_msg_id,
        "MsgID": new_msg_id(),
        "Status": "ok",
        "Error": note,
        "DataRecords": list(records),
    }


def error_reply(in_msg_id: Optional[str], message: str) -> dict:
    return {
        "InMsgID": in_msg_id or "",
        "MsgID": new_msg_id(),
        "Status": "notok",
        "Error": message,
        "DataRecords": [],
    }


def dumps(reply: dict) -> bytes:
    """Serialise a reply for publishing."""
    return orjson.dumps(reply)
