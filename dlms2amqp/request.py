# SPDX-License-Identifier: GPL-2.0-or-later
"""Message body -> ReadRequest.

The body comes from the broker, i.e. from anybody who can publish: its size is
checked before parsing, and every field is type-checked so that a malformed
request becomes a ``notok`` reply rather than a crash in a worker.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from datetime import datetime, timedelta, timezone
from typing import Optional

import orjson

from .errors import RequestError

#: longest accepted string per field (the connection string carries keys and -g lists)
MAX_FIELD_CHARS = {
    "MsgID": 256,
    "Cmd": 32,
    "ObisCode": 64,
    "ConnectionString": 2048,
    "dtFrom": 64,
    "dtTo": 64,
}

#: dates a request may give: after every meter's epoch, and far enough from datetime's
#: limits that a day or an offset more or less cannot overflow
#: the optional request field asking for a reply over MaxReplyBytes in numbered parts
SPLIT_FIELD = "SplitReply"
DATE_MIN = datetime(1970, 1, 1, tzinfo=timezone.utc)
DATE_MAX = datetime(9999, 12, 30, 23, 59, 59, tzinfo=timezone.utc)

_ISO_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})"
    r"(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d{1,9}))?)?)?"
    r"\s*(Z|z|[+-]\d{2}:?\d{2})?$"
)


@dataclass(frozen=True)
class ReadRequest:
    """A validated request; ``connection_string`` may hold secrets and is never logged."""

    msg_id: str
    cmd: str
    obis: str
    connection_string: str
    dt_from: Optional[datetime]
    dt_to: Optional[datetime]
    naive_dates: bool = False
    split_reply: bool = False  # "SplitReply": true: a reply over the size limit comes in parts

    def __repr__(self) -> str:
        return (
            f"ReadRequest(msg_id={self.msg_id!r}, cmd={self.cmd!r}, obis={self.obis!r}, "
            f"connection_string=<hidden>, dt_from={self.dt_from!r}, dt_to={self.dt_to!r})"
        )

    def __reduce__(self) -> tuple:
        # crosses the master -> worker pipe with every job: positional values, not a dict
        return (ReadRequest, tuple([getattr(self, name) for name in _REQUEST_FIELDS]))


_REQUEST_FIELDS = tuple(f.name for f in fields(ReadRequest))


def parse_datetime(text: str, field: str = "date") -> tuple[datetime, bool]:
    """Parse an ISO 8601 date-time; returns (aware datetime, was_naive).

    Accepts .NET's seven fractional digits (the seed's example) which older
    ``fromisoformat`` versions refuse.  A value without offset is taken as UTC.
    """
    m = _ISO_RE.match(text.strip())
    if not m:
        raise RequestError(
            f"{field} {text!r} is not an ISO 8601 date-time (example: 2022-08-17T18:01:57+03:00)"
        )
    year, month, day, hh, mi, ss, frac, tz = m.groups()
    micro = int((frac or "0")[:6].ljust(6, "0"))
    try:
        naive = datetime(
            int(year), int(month), int(day), int(hh or 0), int(mi or 0), int(ss or 0), micro
        )
    except ValueError as exc:
        raise RequestError(f"{field} {text!r} is not a valid date: {exc}") from exc
    if tz is None or tz in ("Z", "z"):
        value = naive.replace(tzinfo=timezone.utc)
    else:
        sign = -1 if tz[0] == "-" else 1
        digits = tz[1:].replace(":", "")
        hours, minutes = int(digits[:2]), int(digits[2:])
        if hours > 23 or minutes > 59:
            raise RequestError(f"{field} {text!r} has an invalid UTC offset")
        value = naive.replace(tzinfo=timezone(timedelta(hours=hours, minutes=minutes) * sign))
    try:
        in_range = DATE_MIN <= value.astimezone(timezone.utc) <= DATE_MAX
    except OverflowError:
        in_range = False
    if not in_range:
        raise RequestError(
            f"{field} {text.strip()[:40]!r} is out of range: dates from 1970-01-01 to "
            "9999-12-30 (UTC) are accepted"
        )
    return value, tz is None


def _loads(body: bytes, max_bytes: int) -> dict:
    if len(body) > max_bytes:
        raise RequestError(f"request body is {len(body)} bytes, more than the {max_bytes} allowed")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestError("request body is not valid JSON") from exc
    if not isinstance(data, dict):
        raise RequestError("request body must be a JSON object")
    return data


def _string(data: dict, key: str, required: bool) -> Optional[str]:
    value = data.get(key)
    if value is None:
        if required:
            raise RequestError(f"request field {key} is missing")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RequestError(f"request field {key} must be a string")
    value = str(value)
    limit = MAX_FIELD_CHARS[key]
    if len(value) > limit:
        raise RequestError(f"request field {key} is longer than {limit} characters")
    return value


def parse_request(body: bytes, max_bytes: int = 65536) -> ReadRequest:
    """Validate a request body (JSON object in the seed's format)."""
    return request_from(_loads(body, max_bytes))


def request_from(data: dict) -> ReadRequest:
    """Validate an already decoded request object (the daemon decodes each body once)."""
    msg_id = _string(data, "MsgID", True)
    cmd = _string(data, "Cmd", True)
    obis = _string(data, "ObisCode", True)
    conn = _string(data, "ConnectionString", True)
    naive = False
    dates: list[Optional[datetime]] = []
    for key in ("dtFrom", "dtTo"):
        text = _string(data, key, False)
        if text is None or text.strip() == "":
            dates.append(None)
            continue
        value, was_naive = parse_datetime(text, key)
        naive = naive or was_naive
        dates.append(value)
    dt_from, dt_to = dates
    split = data.get(SPLIT_FIELD)
    if split is not None and not isinstance(split, bool):
        raise RequestError(f"request field {SPLIT_FIELD} must be true or false")
    if dt_from is not None and dt_to is not None and dt_from > dt_to:
        raise RequestError("dtFrom is later than dtTo")
    return ReadRequest(
        msg_id=msg_id or "",
        cmd=(cmd or "").strip().upper(),
        obis=(obis or "").strip(),
        connection_string=conn or "",
        dt_from=dt_from,
        dt_to=dt_to,
        naive_dates=naive,
        split_reply=bool(split),
    )


def extract_msg_id(body: bytes) -> Optional[str]:
    """Best-effort MsgID of a body that failed validation, for the error reply."""
    try:
        data = orjson.loads(body[:65536])
    except (orjson.JSONDecodeError, TypeError):
        return None
    return msg_id_of(data)


def msg_id_of(data: object) -> Optional[str]:
    """Best-effort MsgID of a decoded body (cut to its longest length), or None."""
    if not isinstance(data, dict):
        return None
    value = data.get("MsgID")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None
    return str(value)[: MAX_FIELD_CHARS["MsgID"]]
