# SPDX-License-Identifier: GPL-2.0-or-later
"""execute(request) -> reply dict: the whole read, with no AMQP in it.

Thread-safe: the daemon runs it from many threads at once, each for a
different meter.  It never raises for request or meter errors; those become a
``notok`` reply whose ``Error`` is a field engineer's message.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Optional

from ..errors import (
    GatewayError,
    MeterConnectionError,
    MeterProtocolError,
    MeterTimeoutError,
    ObjectError,
    RequestError,
)
from ..reply import (
    DATETIME_FORMATS,
    NAIVE_DATES_NOTE,
    error_reply,
    format_datetime,
    ok_reply,
    record,
    value_to_str,
)
from ..request import ReadRequest
from . import axdr, targets
from .connstring import ConnSettings, parse_connection_string
from .counters import CounterStore
from .options import ReaderOptions
from .pool import SessionPool
from .session import NOT_FOUND, DataAccessError, MeterSession
from .trace import make_tracer

log = logging.getLogger(__name__)

_OBIS_RE = re.compile(r"^\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}$")
CLOCK_OBIS = "0.0.1.0.0.255"
PROFILE, REGISTER, EXT_REGISTER, DEMAND_REGISTER, DATA, CLOCK = 7, 3, 4, 5, 1, 8


_stores: dict = {}
_stores_lock = threading.Lock()


def _counter_store(state_dir: Optional[Path]) -> Optional[CounterStore]:
    if state_dir is None:
        return None
    store = _stores.get(state_dir)  # hot path: no path resolution per request
    if store is not None:
        return store
    key = str(Path(state_dir).resolve())
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            store = _stores[key] = CounterStore(Path(state_dir))
        _stores[state_dir] = store
        return store


def execute(
    request: ReadRequest,
    options: ReaderOptions,
    pool: Optional[SessionPool] = None,
    settings: Optional[ConnSettings] = None,
) -> dict:
    """Run one request; returns the reply dict (``ok`` or ``notok``), never raises for errors.

    ``settings``: the request's connection string already parsed (the daemon's master
    parses it to route); None parses it here.
    """
    try:
        records = _run(request, options, pool, settings)
    except GatewayError as exc:
        return error_reply(request.msg_id, exc.message)
    except Exception as exc:
        # a cause we did not foresee: the traceback (no locals, redacted by logsetup) and
        # the MsgID go to the log so that it can be found and given a message of its own
        log.error(
            "internal error while reading a meter (MsgID %s): %s",
            request.msg_id[:64],
            type(exc).__name__,
            exc_info=True,
            extra={"msg_id": request.msg_id},
        )
        return error_reply(
            request.msg_id,
            f"internal error in the gateway while reading the meter ({type(exc).__name__}); "
            f"the log has the details under MsgID {request.msg_id[:64]}",
        )
    return ok_reply(request.msg_id, records, NAIVE_DATES_NOTE if request.naive_dates else "")


def check_obis(obis: str) -> str:
    if not _OBIS_RE.match(obis) or any(int(p) > 255 for p in obis.split(".")):
        raise RequestError(
            f"ObisCode {obis[:40]!r} is not a logical name (example: 1.0.99.1.0.255)"
        )
    return obis


def guess_class(obis: str) -> int:
    """Class id by OBIS convention; a wrong guess is corrected from the object list."""
    a, _b, c, d, _e, _f = (int(p) for p in obis.split("."))
    if c in (98, 99):
        return PROFILE
    if obis == CLOCK_OBIS or (a == 0 and c == 1 and d == 0):
        return CLOCK
    if a == 0 or c in (0, 96, 97):
        return DATA
    return REGISTER


def _run(
    request: ReadRequest,
    options: ReaderOptions,
    pool: Optional[SessionPool],
    settings: Optional[ConnSettings] = None,
) -> list:
    if request.cmd != "READ":
        raise RequestError(f"Unknown command {request.cmd[:32]!r}: only READ is supported")
    if options.datetime_format not in DATETIME_FORMATS:
        raise RequestError("datetime format must be iso or dotnet")
    if settings is None:
        settings = parse_connection_string(request.connection_string)
    if not settings.target_checked:  # the daemon's master did it; dlms2amqp-read has not
        targets.prepare(settings, options.allowed_hosts, options.allowed_serial_ports)
    if not settings.get_list:
        check_obis(request.obis)
    deadline = time.monotonic() + options.request_timeout
    counters = _counter_store(options.state_dir)
    trace = make_tracer(settings, options.trace_sink) if options.trace else None

    session = pool.take(settings) if pool is not None else None
    if session is not None:
        session.resume(deadline, trace)
        try:
            records = _read(session, request, settings, options)
        except (MeterConnectionError, MeterProtocolError, MeterTimeoutError):
            # the pooled association died: open a fresh one, within the same deadline
            session.abandon()
            session = None
        except ObjectError:
            _done(session, pool)  # unknown object / access denied: the association is fine
            raise
        except BaseException:
            session.close()
            raise
        else:
            _done(session, pool)
            return records
    session = MeterSession(settings, options.frame_timeout, counters, trace)
    ok = False
    try:
        session.open(deadline)
        records = _read(session, request, settings, options)
        ok = True
        return records
    finally:
        if ok and pool is not None:
            _done(session, pool)
        else:
            session.close()


def _done(session: MeterSession, pool: Optional[SessionPool]) -> None:
    session.finish()
    if pool is not None:
        pool.put(session)
    else:
        session.close()


def _code(obis: str, attr: int) -> str:
    return obis if attr == 2 else f"{obis}:{attr}"


#: data-access results that may mean "the class guessed from the OBIS code is wrong":
#: object-undefined, object-class-inconsistent, object-unavailable, and read-write-denied,
#: which some meters answer for a wrong class (Gurux's C reference meter does)
WRONG_CLASS = NOT_FOUND | {3}


def _get(session: MeterSession, obis: str, attr: int, selector: int = 0, params=None):
    """GET with the class id guessed, corrected from the object list when the meter objects."""
    class_id = session.known_class(obis) or guess_class(obis)
    try:
        return class_id, session.get_raw(class_id, obis, attr, selector, params)
    except DataAccessError as exc:
        if exc.code not in WRONG_CLASS or session.known_class(obis) is not None:
            raise
        original = exc
    real = _class_from_object_list(session, obis, original)
    if real == class_id:
        raise original  # the class was right: the meter means what it said
    return real, session.get_raw(real, obis, attr, selector, params)


def _class_from_object_list(session: MeterSession, obis: str, original: DataAccessError) -> int:
    """The object's class from the association's object list, or why it cannot be read."""
    try:
        session.load_object_list()
    except ObjectError:
        raise original from None
    real = session.known_class(obis)
    if real is None:
        if original.code == 3:
            # the meter said "denied" and its object list does not show the object
            raise DataAccessError(
                f"{original.message}; {obis} is not in this association's object list", 3
            ) from original
        raise ObjectError(f"unknown object {obis}: not in the meter's object list") from original
    session.note(f"{obis} is class {real} in the meter's object list")
    return real


def _decode(session: MeterSession, raw: bytes, what: str):
    """A complete value; bytes after it are ignored as Gurux's clients do, and said in --trace."""
    value, extra = axdr.decode_value(raw, session.settings.utc_to_normal_time)
    if extra:
        session.note(f"{extra} trailing bytes after the value of {what} ignored")
    return value


def _read(session: MeterSession, request: ReadRequest, settings: ConnSettings, options) -> list:
    fmt = options.datetime_format
    if settings.get_list:
        return _read_list(session, settings.get_list, fmt)
    obis = request.obis
    class_id = session.known_class(obis) or guess_class(obis)
    if class_id == PROFILE:
        return _read_profile(session, request, fmt, options.max_rows)
    class_id, raw = _get(session, obis, 2)
    session.learn_class(obis, class_id)
    if class_id == PROFILE:
        return _read_profile(session, request, fmt, options.max_rows)
    return _records_for(session, class_id, obis, raw, fmt)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _records_for(session: MeterSession, class_id: int, obis: str, raw: bytes, fmt: str) -> list:
    value = _decode(session, raw, obis)
    normal = session.settings.utc_to_normal_time
    if class_id == CLOCK:
        dt = axdr.to_datetime(value, utc_normal=normal) if isinstance(value, bytes) else value
        shown = format_datetime(dt, fmt) if isinstance(dt, datetime) else value
        return [record(dt if isinstance(dt, datetime) else _now(), obis, shown, fmt)]
    if class_id in (REGISTER, EXT_REGISTER, DEMAND_REGISTER):  # attribute 3: scaler_unit
        scaler = unit = None
        su = _decode(session, session.get_raw(class_id, obis, 3), f"{obis} attribute 3")
        if isinstance(su, list) and len(su) == 2:
            scaler, unit = su
        when = _now()
        if class_id == EXT_REGISTER:
            captured = _decode(session, session.get_raw(class_id, obis, 5), f"{obis} attribute 5")
            dt = (
                axdr.to_datetime(captured, utc_normal=normal)
                if isinstance(captured, bytes)
                else captured
            )
            if isinstance(dt, datetime):
                when = dt
        return [record(when, obis, value, fmt, scaler=scaler, unit=unit)]
    return [record(_now(), obis, value, fmt)]


def _list_value(value, class_id: int, fmt: str, utc_normal: bool = False):
    """A clock's date-time octet string is shown as a date-time in the reply's format."""
    if isinstance(value, bytes) and len(value) == 12 and class_id == CLOCK:
        dt = axdr.to_datetime(value, utc_normal=utc_normal)
        return format_datetime(dt, fmt) if dt else value
    return value


def _read_list(session: MeterSession, items: list, fmt: str) -> list:
    """-g: GET-with-list when the meter negotiated it, else one GET per attribute.

    A refused attribute becomes a record with an ``Error`` of its own and an empty
    ``Value``; the others are read as usual.  Only when every attribute is refused is the
    reply ``notok`` (with the first reason).
    """
    results = None
    if len(items) > 1 and session.supports_list_reads():
        try:
            results = _get_list(session, items)
        except (ObjectError, MeterProtocolError):
            if not session.alive:
                raise
            session.note("the list read was refused; reading the attributes one by one")
    if results is None:
        results = []
        for obis, attr in items:
            try:
                results.append(_get(session, obis, attr))
            except ObjectError as exc:
                if not session.alive:
                    raise
                results.append(exc)
    if all(isinstance(r, ObjectError) for r in results):
        raise results[0]
    records = []
    now = _now()
    for (obis, attr), result in zip(items, results):
        code = _code(obis, attr)
        if isinstance(result, ObjectError):
            rec = record(now, code, None, fmt)
            rec["Error"] = result.message
        else:
            class_id, raw = result
            normal = session.settings.utc_to_normal_time
            value = _list_value(_decode(session, raw, code), class_id, fmt, normal)
            rec = record(now, code, value, fmt)
        records.append(rec)
    return records


def _get_list(session: MeterSession, items: list) -> list:
    """GET-with-list -> per item (class, raw) or its ObjectError; wrong classes corrected."""
    classes = [session.known_class(o) or guess_class(o) for o, _ in items]
    answers = session.get_list([(c, o, a) for c, (o, a) in zip(classes, items)])
    guessed = [
        i for i, (a, (o, _)) in enumerate(zip(answers, items))
        if isinstance(a, DataAccessError) and a.code in WRONG_CLASS
        and session.known_class(o) is None
    ]  # fmt: skip
    again = []
    for i in guessed:
        try:
            real = _class_from_object_list(session, items[i][0], answers[i])
        except ObjectError as exc:
            answers[i] = exc
            continue
        if real != classes[i]:
            classes[i] = real
            again.append(i)
    if again:
        fixed = session.get_list([(classes[i], *items[i]) for i in again])
        for i, answer in zip(again, fixed):
            answers[i] = answer
    return [a if isinstance(a, ObjectError) else (c, a) for c, a in zip(classes, answers)]


def _array_count(raw: bytes) -> Optional[int]:
    """Elements announced by an A-XDR array header (tag 1, length), without decoding."""
    if len(raw) < 2 or raw[0] != 0x01:
        return None
    first = raw[1]
    if first < 0x80:
        return first
    n = first & 0x7F
    if n == 0 or len(raw) < 2 + n:
        return None
    return int.from_bytes(raw[2 : 2 + n], "big")


def _check_range_rows(
    session: MeterSession, obis: str, start: datetime, end: datetime, max_rows: int
) -> None:
    """Refuse, before the meter is asked, a range holding more than ``max_rows`` rows.

    Needs the capture period (attribute 4, one more GET), so it is read only for a range
    longer than ``max_rows`` minutes, which could hold too many rows at a period of a
    minute or more (with the default that is 34 days: a one-day read pays nothing).  A
    shorter range, a period of 0 (captured on events) or an unreadable one leaves the
    bound to ``_check_buffer_rows``, on the rows the meter announces.
    """
    span = (end - start).total_seconds()
    if span < max_rows * 60:
        return
    try:
        period = _decode(session, session.get_raw(PROFILE, obis, 4), f"{obis} attribute 4")
    except ObjectError:
        return
    if not isinstance(period, int) or isinstance(period, bool) or period <= 0:
        return
    rows = int(span // period) + 1
    if rows > max_rows:
        most = (max_rows - 1) * period
        shorter = f"{most // 86400} days" if most >= 86400 else f"{max(1, most // 3600)} hours"
        raise RequestError(
            f"dtFrom..dtTo spans {span / 86400:.0f} days: at the capture period of {obis}"
            f" ({period} s) that is up to {rows} rows, more than MaxRows {max_rows}; ask for"
            f" at most {shorter} per request"
        )


def _check_buffer_rows(raw: bytes, obis: str, max_rows: int, ranged: bool) -> None:
    """Refuse a buffer of more than ``max_rows`` rows before it is decoded into records."""
    count = _array_count(raw)
    if count is not None and count > max_rows:
        hint = "ask for a shorter range" if ranged else "read it by range (dtFrom, dtTo)"
        raise RequestError(
            f"the meter returned {count} rows of {obis}, more than MaxRows {max_rows}: {hint}"
        )


def _read_profile(session: MeterSession, request: ReadRequest, fmt: str, max_rows: int = 0) -> list:
    obis = request.obis
    class_id, raw = _get(session, obis, 3)
    if class_id != PROFILE:
        raise ObjectError(f"{obis} is not a profile (class {class_id})")
    session.learn_class(obis, PROFILE)
    capture = _decode(session, raw, f"{obis} attribute 3")
    columns = []
    clock_col = None
    for i, col in enumerate(capture or []):
        try:
            col_class, ln, attr = col[0], col[1], col[2]
            col_obis = ".".join(str(b) for b in ln)
        except (TypeError, IndexError):
            raise MeterProtocolError(
                f"the capture objects of {obis} could not be understood"
            ) from None
        if clock_col is None and col_class == CLOCK and attr == 2:
            clock_col = i
        columns.append(_code(col_obis, attr))
    start, end = request.dt_from, request.dt_to
    normal = session.settings.utc_to_normal_time
    ranged = start is not None or end is not None
    if not ranged:
        raw = session.get_raw(PROFILE, obis, 2)
    else:
        end = end or _now()
        start = start or end - timedelta(days=1)
        if max_rows:
            _check_range_rows(session, obis, start, end, max_rows)
        step = f"reading {obis} from {start.isoformat()} to {end.isoformat()}"
        selector = axdr.range_selector(start, end, normal)
        raw = session.get_raw(PROFILE, obis, 2, 1, selector, step=step)
    if max_rows:
        _check_buffer_rows(raw, obis, max_rows, ranged)
    rows, extra = axdr.decode_profile(raw, normal)
    if extra:
        session.note(f"{extra} trailing bytes after the buffer of {obis} ignored")
    return profile_records(rows, columns, clock_col, fmt, normal)


def profile_records(
    rows: list, columns: list, clock_col: Optional[int], fmt: str, utc_normal: bool = False
) -> list:
    """One record per row and per column other than the clock (the hot loop of a read).

    ``utc_normal``: the rows' date-times carry the deviation in the "normal" sign.
    """
    out: list[dict[str, str]] = []
    append = out.append
    to_dt = axdr.to_datetime
    others = [(j, code) for j, code in enumerate(columns) if j != clock_col]
    width = len(columns)
    iso = fmt == "iso"
    iso_from_raw = axdr.iso_from_raw
    for row in rows:
        when = ""
        if clock_col is not None and clock_col < len(row):
            stamp = row[clock_col]
            if iso and type(stamp) is bytes:
                when = iso_from_raw(stamp, utc_normal) or ""
            else:
                dt = to_dt(stamp, utc_normal=utc_normal) if isinstance(stamp, bytes) else stamp
                when = format_datetime(dt, fmt) if isinstance(dt, datetime) else ""
        short = len(row) < width
        for j, code in others:
            if short and j >= len(row):
                continue
            v = row[j]
            t = type(v)
            text = v if t is str else str(v) if t is int else value_to_str(v)
            append({"DateTime": when, "Code": code, "Value": text})
    return out
