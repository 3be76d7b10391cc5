# SPDX-License-Identifier: GPL-2.0-or-later
"""Issue 11, meter side of findings 3 and 8: MaxRows refuses a profile read before the
meter is asked (range x capture period) or before decoding (rows announced by the
buffer), and frame traces mask secrets a meter echoes back.  Real simulator, real TCP.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from dlms2amqp.meter.connstring import parse_connection_string
from dlms2amqp.meter.reader import ReaderOptions, _array_count, execute
from dlms2amqp.meter.trace import FrameTracer
from dlms2amqp.request import parse_request
from tests.helpers_sim import running_simulator

pytestmark = pytest.mark.integration
LOW = "-c 32 -a Low -P 00000000"
PROFILE = "1.0.99.1.0.255"


@pytest.fixture(scope="module")
def sim() -> Iterator[Any]:
    with running_simulator(1, interface="WRAPPER") as info:
        yield info


def read(sim: Any, dt_from: str = "", dt_to: str = "", **opts: Any) -> tuple[dict, list[str]]:
    body = {
        "MsgID": "rows",
        "Cmd": "READ",
        "ObisCode": PROFILE,
        "ConnectionString": f"-h {sim.host} -p {sim.port} -i WRAPPER {LOW}",
    }
    if dt_from:
        body["dtFrom"], body["dtTo"] = dt_from, dt_to
    frames: list[str] = []
    options = ReaderOptions(
        frame_timeout=10, request_timeout=60, trace=True, trace_sink=frames.append, **opts
    )
    return execute(parse_request(orjson.dumps(body)), options), frames


def rx_bytes(frames: list[str]) -> int:
    return sum(len(f.split()) - 1 for f in frames if f.startswith("RX"))


def test_a_ten_year_range_is_refused_before_the_meter_sends_rows(sim: Any) -> None:
    # Given MaxRows 50000 and a 10-year range of a quarter-hour profile (350,000 rows)
    reply, frames = read(sim, "2016-01-01T00:00:00Z", "2026-01-01T00:00:00Z", max_rows=50000)
    # Then notok, naming the rows, the bound and how long a range may be
    assert reply["Status"] == "notok" and reply["DataRecords"] == []
    err = reply["Error"]
    assert "350689 rows" in err and "MaxRows 50000" in err and "520 days" in err, err
    # And the meter sent no buffer: a few small frames (association, attributes 3 and 4)
    assert rx_bytes(frames) < 1000, rx_bytes(frames)
    # And a range within the bound is read as before
    ok, _ = read(sim, "2025-12-20T00:00:00Z", "2025-12-30T00:00:00Z", max_rows=50000)
    assert ok["Status"] == "ok" and len(ok["DataRecords"]) == 961 * 3, ok["Error"]


def test_a_one_day_read_costs_no_extra_frame(sim: Any) -> None:
    day = ("2025-12-20T00:00:00Z", "2025-12-21T00:00:00Z")
    bounded, f1 = read(sim, *day, max_rows=50000)
    free, f0 = read(sim, *day, max_rows=0)
    assert bounded["Status"] == "ok" and bounded["DataRecords"] == free["DataRecords"]
    # a day is shorter than MaxRows minutes: the capture period is not even asked
    assert len(f1) == len(f0)


def test_rows_over_the_bound_are_refused_before_decoding(sim: Any) -> None:
    # Given a read without range (the simulator sends its last 96 rows) and MaxRows 50
    reply, _ = read(sim, max_rows=50)
    # Then the buffer's announced row count refuses it, suggesting a read by range
    assert reply["Status"] == "notok"
    assert reply["Error"] == (
        f"the meter returned 96 rows of {PROFILE}, more than MaxRows 50: "
        "read it by range (dtFrom, dtTo)"
    )
    reply, _ = read(sim, max_rows=96)
    assert reply["Status"] == "ok" and len(reply["DataRecords"]) == 96 * 3
    # a day with MaxRows 60 (longer than 60 minutes): refused by the range check (97 rows)
    reply, frames = read(sim, "2025-12-20T00:00:00Z", "2025-12-21T00:00:00Z", max_rows=60)
    assert reply["Status"] == "notok" and "97 rows" in reply["Error"], reply["Error"]
    assert "at most 14 hours per request" in reply["Error"], reply["Error"]
    assert rx_bytes(frames) < 1000


def test_array_header_count() -> None:
    assert _array_count(bytes([1, 5, 2, 4])) == 5
    assert _array_count(bytes([1, 0x82, 0x01, 0x00])) == 256
    assert _array_count(bytes([1, 0x83, 0x05, 0x5A, 0x21])) == 350753
    assert _array_count(bytes([2, 5])) is None  # not an array
    assert _array_count(bytes([1, 0x82, 0x01])) is None  # truncated


def test_trace_masks_a_password_the_meter_echoes() -> None:
    # Given a tracer for a Low password, When a received frame carries that password
    settings = parse_connection_string("-h 127.0.0.1 -p 4059 -c 32 -a Low -P Ech0Secret")
    lines: list[str] = []
    tracer = FrameTracer(settings, lines.append)
    echo = b"\x00\x01\x00\x01\x00\x10\x00\x0c\xc4\x01\xc1\x00\x09\x0aEch0Secret"
    tracer("RX", echo)
    tracer("TX", b"\x00\x01" + b"Ech0Secret")
    # Then neither direction shows it, in hex or in text
    secret_hex = " ".join(f"{b:02X}" for b in b"Ech0Secret")
    for line in lines:
        assert secret_hex not in line and "Ech0Secret" not in line
        assert "** ** ** ** ** ** ** ** ** **" in line
    assert lines[0].startswith("RX 00 01 00 01")  # the rest of the frame stays readable


def test_daemon_refuses_twelve_five_year_reads_with_little_memory(
    run_daemon: Any, broker: Any
) -> None:
    import json
    import threading
    import time

    from testing.daemon import rss_kb

    # Given the daemon with its default MaxRows and 12 meters
    with running_simulator(12, interface="WRAPPER") as sim12:
        d = run_daemon()
        assert d.cfg.get("MaxRows") is None  # the default (50000) applies
        inq, outq = d.cfg["InQueue"], d.cfg["OutQueue"]
        peak = [0]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss_kb([d.pid, *d.workers()]))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        # When twelve 5-year profile reads and one 10-day read arrive at once
        for k in range(12):
            body = {
                "MsgID": f"y5-{k}",
                "Cmd": "READ",
                "ObisCode": PROFILE,
                "ConnectionString": f"-h {sim12.host} -p {sim12.port + k} -i WRAPPER {LOW}",
                "dtFrom": "2021-01-01T00:00:00Z",
                "dtTo": "2026-01-01T00:00:00Z",
            }
            broker.publish(inq, json.dumps(body).encode())
        body["MsgID"], body["dtFrom"], body["dtTo"] = (
            "d10",
            "2025-12-20T00:00:00Z",
            "2025-12-30T00:00:00Z",
        )
        broker.publish(inq, json.dumps(body).encode())
        replies = {r["InMsgID"]: r for r in broker.replies(outq, 13, timeout=60)}
        done.set()
        sampler.join(5)
    # Then each 5-year read is refused with the row count and the bound, the 10-day one read
    for k in range(12):
        r = replies[f"y5-{k}"]
        assert r["Status"] == "notok" and "175297 rows" in r["Error"], r["Error"]
        assert "MaxRows 50000" in r["Error"] and "520 days" in r["Error"], r["Error"]
    assert replies["d10"]["Status"] == "ok" and len(replies["d10"]["DataRecords"]) == 961 * 3
    # And the daemon (master + workers) stayed small (2.35 GB before the bound)
    print(f"peak RSS of the daemon: {peak[0] / 1024:.0f} MiB")
    assert 0 < peak[0] < 400 * 1024, peak[0]
