# SPDX-License-Identifier: GPL-2.0-or-later
"""execute() from many threads at once (as in a worker), one meter per thread, shared pool."""

from __future__ import annotations

import threading

import orjson
import pytest

from dlms2amqp.meter.pool import SessionPool
from dlms2amqp.meter.reader import ReaderOptions, execute
from dlms2amqp.request import parse_request
from dlms2amqp.simulator import model
from tests.helpers_sim import running_simulator

pytestmark = pytest.mark.integration
METERS = 6
READS = 5


def test_threads_read_their_own_meters_correctly():
    pool = SessionPool(idle_timeout=30)
    results: dict = {}
    with running_simulator(METERS) as sim:

        def worker(k: int) -> None:
            out = []
            for i in range(READS):
                obis = "0.0.96.1.0.255" if i % 2 == 0 else "1.0.99.1.0.255"
                body = orjson.dumps(
                    {
                        "MsgID": f"{k}-{i}",
                        "Cmd": "READ",
                        "ObisCode": obis,
                        "ConnectionString": f"-h 127.0.0.1 -p {sim.port + k} -c 32 -a Low "
                        "-P 00000000 -i WRAPPER",
                        "dtFrom": "2026-01-01T00:00:00Z",
                        "dtTo": "2026-01-02T00:00:00Z",
                    }
                )
                out.append(execute(parse_request(body), ReaderOptions(frame_timeout=20), pool))
            results[k] = out

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(METERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        pool.close_all()
    assert sorted(results) == list(range(METERS))
    for k, replies in results.items():
        for i, reply in enumerate(replies):
            assert reply["Status"] == "ok", reply["Error"]
            assert reply["InMsgID"] == f"{k}-{i}"
            if i % 2 == 0:
                assert reply["DataRecords"][0]["Value"] == model.serial_number(k)
            else:
                rows = model.load_profile_rows(k, 1767225600, 1767312000)
                assert reply["DataRecords"][1]["Value"] == str(rows[0][2])
                assert len(reply["DataRecords"]) == 3 * len(rows)
    # every meter opened once, then reused its association
    assert pool.misses == METERS and pool.hits == METERS * (READS - 1)
