# SPDX-License-Identifier: GPL-2.0-or-later
"""-d India (Gurux's UseUtc2NormalTime) end to end: our reader and Gurux's client agree.

Our simulator writes and reads deviations in the Blue Book sign only, so it cannot be a
real India meter; what it can prove is that, on the same meter, the reader configured
with ``-d India`` sees the clock and asks for profile ranges exactly as Gurux's client
configured the way Gurux's example client configures ``-d India`` (standard INDIA,
``useUtc2NormalTime``).  The meter runs at UTC+05:30 so that the sign shows.
"""

from __future__ import annotations

from datetime import datetime

import orjson
import pytest
from gurux_dlms import GXDLMSClient
from gurux_dlms.enums import DataType, Standard
from gurux_dlms.objects import GXDLMSClock, GXDLMSProfileGeneric

from dlms2amqp.meter.reader import ReaderOptions, execute
from dlms2amqp.request import parse_request
from tests.helpers_sim import GuruxMeter, gurux_client, running_simulator

pytestmark = pytest.mark.integration
LOW = "-c 32 -a Low -P 00000000"


@pytest.fixture(scope="module")
def sim():
    with running_simulator(1, "--utc-offset", "330", interface="WRAPPER") as info:
        yield info


def read(sim, obis: str, conn: str, **dates: str) -> dict:
    body = {
        "MsgID": "t1",
        "Cmd": "READ",
        "ObisCode": obis,
        "ConnectionString": f"-h {sim.host} -p {sim.port} -i WRAPPER {LOW} {conn}",
        **dates,
    }
    reply = execute(parse_request(orjson.dumps(body)), ReaderOptions(frame_timeout=10))
    assert reply["Status"] == "ok", reply["Error"]
    return reply


def clock_value(sim, conn: str) -> str:
    return read(sim, "0.0.1.0.0.255", conn)["DataRecords"][0]["Value"]


def india_meter(sim) -> GuruxMeter:
    client = gurux_client(32, "WRAPPER")
    client.standard = Standard.INDIA
    client.useUtc2NormalTime = True  # what Gurux's example client's -d India sets
    meter = GuruxMeter(client, sim.host, sim.port)
    meter.connect()
    return meter


def test_clock_reads_as_gurux_reads_it_with_the_switch(sim):
    # Given the meter's clock read by Gurux's client configured for -d India
    meter = india_meter(sim)
    try:
        clock = GXDLMSClock()
        meter.read(clock, 2)
        theirs = clock.time.value
    finally:
        meter.close()
    # When we read it with -d India, and with the Blue Book sign
    india = datetime.fromisoformat(clock_value(sim, "-d India"))
    plain = datetime.fromisoformat(clock_value(sim, ""))
    # Then -d India shows Gurux's offset and instant; without it, the meter's own +05:30
    assert india.utcoffset() == theirs.utcoffset()
    assert abs(india.timestamp() - theirs.timestamp()) < 10
    assert plain.utcoffset() is not None and plain.utcoffset().total_seconds() == 330 * 60
    assert india.utcoffset() == -plain.utcoffset()


def test_profile_range_asks_what_gurux_asks_with_the_switch(sim):
    # Given a range in the meter's local offset (the deviation bytes carry the sign)
    start, end = "2026-03-04T10:00:00+05:30", "2026-03-04T12:00:00+05:30"
    meter = india_meter(sim)
    try:
        pg = GXDLMSProfileGeneric("1.0.99.1.0.255")
        meter.read(pg, 3)
        reply = meter.request(
            meter.client.readRowsByRange(
                pg, datetime.fromisoformat(start), datetime.fromisoformat(end)
            )
        )
        assert not reply.error
        rows = reply.value
        codes = [str(obj.logicalName) for obj, _ in pg.captureObjects]
    finally:
        meter.close()
    assert rows, "Gurux's client got no rows: the range proves nothing"
    # When we read the same range with -d India
    ours = read(sim, "1.0.99.1.0.255", "-d India", dtFrom=start, dtTo=end)["DataRecords"]
    # Then the same rows come back, stamped as Gurux decodes them with the switch
    energy = codes.index("1.0.1.8.0.255")
    expected = []
    for row in rows:
        when = GXDLMSClient.changeType(bytes(row[0]), DataType.DATETIME, True).value
        expected.append((when.isoformat(), str(row[energy])))
    got = [(r["DateTime"], r["Value"]) for r in ours if r["Code"] == "1.0.1.8.0.255"]
    assert got == expected
