# SPDX-License-Identifier: GPL-2.0-or-later
"""Invocation counters across owners: two gateway hosts (two state dirs) take turns on
one ciphered meter, as when a partition moves between daemons.

The meter (the real simulator) is the oracle: it rejects any counter not above the last
one it accepted, and its counter object 0.0.43.1.0.255 (read through the public client)
says what it accepted last.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from dlms2amqp.meter import counters
from dlms2amqp.meter.counters import CounterStore
from dlms2amqp.meter.reader import ReaderOptions, execute
from dlms2amqp.request import parse_request
from testing.scaleout import GMAC
from testing.simulator import running_simulator

pytestmark = pytest.mark.integration


def read(port: int, conn: str, state: Path | None, obis: str = "1.0.1.8.0.255") -> dict:
    body = {
        "MsgID": "owners",
        "Cmd": "READ",
        "ObisCode": obis,
        "ConnectionString": f"-h 127.0.0.1 -p {port} {conn}",
    }
    opts = ReaderOptions(frame_timeout=10, request_timeout=30, state_dir=state)
    return execute(parse_request(orjson.dumps(body)), opts)


def meter_counter(port: int) -> int:
    rep = read(port, "-c 16 -i WRAPPER", None, "0.0.43.1.0.255")
    assert rep["Status"] == "ok", rep["Error"]
    return int(rep["DataRecords"][0]["Value"])


def marks(state: Path) -> list[int]:
    store = CounterStore(state)
    return [store.load(p.name) for p in (state / "counters").iterdir() if p.is_file()]


def test_owners_take_turns_resync_upwards_and_count_it(tmp_path: Path) -> None:
    a, b = tmp_path / "hostA", tmp_path / "hostB"
    with running_simulator(1) as sim:
        before = counters.RESYNCS[0]
        # host A reads first: a fresh meter, nothing to resynchronise
        assert read(sim.port, GMAC, a)["Status"] == "ok"
        assert counters.RESYNCS[0] == before
        for turn in range(3):
            # the partition moves to host B, which starts behind the meter: one resync
            seen = meter_counter(sim.port)
            r = read(sim.port, GMAC, b)
            assert r["Status"] == "ok", r["Error"]
            assert counters.RESYNCS[0] == before + 2 * turn + 1
            assert max(marks(b)) > seen  # B's persisted mark is above what the meter had
            # and back to A, now behind B: resync again, upwards
            seen = meter_counter(sim.port)
            mark_a = max(marks(a))
            r = read(sim.port, GMAC, a)
            assert r["Status"] == "ok", r["Error"]
            assert counters.RESYNCS[0] == before + 2 * turn + 2
            assert max(marks(a)) > max(seen, mark_a)  # never lowered
        # the owner reading again on its own needs no resync
        n = counters.RESYNCS[0]
        assert read(sim.port, GMAC, a)["Status"] == "ok"
        assert counters.RESYNCS[0] == n
