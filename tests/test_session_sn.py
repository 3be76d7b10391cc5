# SPDX-License-Identifier: GPL-2.0-or-later
"""Short-name referencing (``-r SN``) read end to end against the simulator, WRAPPER and HDLC.

Clock, registers, one-item and multi-item ``-g`` (one READ with several variable
names), profiles with and without dates, a profile answered in many READ blocks
(the gurux-dlms 1.0.203 block bugs patched in ``gurux_compat``) and a ciphered SN
association (the 1.0.203 ``getSNPdu`` assertion).  Expected values come from the
simulator's documented data model (dlms2amqp.simulator.model); the frames the
reader sends are checked in the trace.
"""

from __future__ import annotations

import calendar
import time
from datetime import datetime, timedelta, timezone

import orjson
import pytest
from gurux_dlms.enums import Conformance

from dlms2amqp.meter import reader
from dlms2amqp.meter.connstring import parse_connection_string
from dlms2amqp.meter.reader import ReaderOptions, execute
from dlms2amqp.meter.session import MeterSession
from dlms2amqp.request import ReadRequest, parse_request
from dlms2amqp.simulator import model
from tests.helpers_sim import running_simulator

pytestmark = pytest.mark.integration
LOW = "-c 32 -a Low -P 00000000 -r SN"
KEYS = "-T 4775727578313233 -A D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF -B 000102030405060708090A0B0C0D0E0F"
GMAC = f"-c 48 -a HighGMAC -C AuthenticationEncryption {KEYS} -r SN"


@pytest.fixture(scope="module", params=["WRAPPER", "HDLC"])
def sim(request):
    with running_simulator(3, "-r", "SN", interface=request.param) as info:
        info.interface = request.param
        yield info


def conn_of(sim, conn: str, k: int = 0) -> str:
    return f"-h {sim.host} -p {sim.port + k} -i {sim.interface} {conn}"


def read(sim, obis, conn=LOW, k=0, dt_from=None, dt_to=None, lines=None, **opts):
    body = {
        "MsgID": "sn",
        "Cmd": "READ",
        "ObisCode": obis,
        "ConnectionString": conn_of(sim, conn, k),
    }
    if dt_from:
        body["dtFrom"] = dt_from
    if dt_to:
        body["dtTo"] = dt_to
    if lines is not None:
        opts.update(trace=True, trace_sink=lines.append)
    options = ReaderOptions(frame_timeout=10, request_timeout=30, **opts)
    return execute(parse_request(orjson.dumps(body)), options)


def ts(iso: str) -> int:
    return calendar.timegm(datetime.fromisoformat(iso).utctimetuple())


def apdus(lines: list, direction: str = "TX") -> list:
    """The APDUs in trace lines (WRAPPER: after the 8-byte header; HDLC: after LLC)."""
    out = []
    for line in lines:
        if not line.startswith(direction + " "):
            continue
        data = bytes.fromhex(line[3:].replace("**", "00"))
        if data[:2] == b"\x00\x01":
            out.append(data[8:])
        elif data[0] == 0x7E and b"\xe6\xe6\x00" in data:
            out.append(data[data.index(b"\xe6\xe6\x00") + 3 : -3])
    return out


def profile_records(k: int, start: int, end: int) -> list:
    expected = []
    for t, st, imp, exp in model.load_profile_rows(k, start, end):
        when = datetime.fromtimestamp(t, timezone.utc).isoformat()
        expected += [
            {"DateTime": when, "Code": "0.0.96.10.1.255", "Value": str(st)},
            {"DateTime": when, "Code": "1.0.1.8.0.255", "Value": str(imp)},
            {"DateTime": when, "Code": "1.0.2.8.0.255", "Value": str(exp)},
        ]
    return expected


def test_sn_clock(sim):
    reply = read(sim, "0.0.1.0.0.255")
    assert reply["Status"] == "ok", reply["Error"]
    [rec] = reply["DataRecords"]
    assert abs(datetime.fromisoformat(rec["Value"]).timestamp() - time.time()) < 10


@pytest.mark.parametrize(
    "obis, fn, scaler, unit",
    [("1.0.1.8.0.255", model.import_wh, 0, 30), ("1.0.32.7.0.255", model.voltage_raw, -1, 35)],
)
def test_sn_registers(sim, obis, fn, scaler, unit):
    k = 1
    lines: list = []
    before = int(time.time())
    reply = read(sim, obis, k=k, lines=lines)
    after = int(time.time())
    assert reply["Status"] == "ok", reply["Error"]
    [rec] = reply["DataRecords"]
    assert (rec["Scaler"], rec["Unit"]) == (scaler, unit)
    assert int(rec["Value"]) in {fn(k, before), fn(k, after)}
    # SN on the wire: READ requests (05), no GET (C0)
    sent = apdus(lines)[1:-1]  # between AARQ and RLRQ
    assert sent and all(a[0] == 0x05 for a in sent)


def test_sn_one_item_get_list(sim):
    reply = read(sim, "ignored", conn=LOW + ' -g "1.0.1.8.0.255:3"')
    assert reply["Status"] == "ok", reply["Error"]
    assert reply["DataRecords"][0]["Code"] == "1.0.1.8.0.255:3"
    assert reply["DataRecords"][0]["Value"] == "[0, 30]"


def test_sn_multi_item_get_list_is_one_read_with_an_error_in_its_item(sim):
    k = 2
    lines: list = []
    items = "0.0.96.1.0.255:2; 1.0.1.8.0.255:3; 1.2.3.4.5.6:2; 1.0.32.7.0.255:2"
    before = int(time.time())
    reply = read(sim, "ignored", conn=LOW + f' -g "{items}"', k=k, lines=lines)
    after = int(time.time())
    assert reply["Status"] == "ok", reply["Error"]
    recs = reply["DataRecords"]
    assert [r["Code"] for r in recs] == [
        "0.0.96.1.0.255", "1.0.1.8.0.255:3", "1.2.3.4.5.6", "1.0.32.7.0.255",
    ]  # fmt: skip
    assert recs[0]["Value"] == model.serial_number(k)
    assert recs[1]["Value"] == "[0, 30]"
    assert recs[2]["Value"] == "" and "not in the meter's object list" in recs[2]["Error"]
    assert int(recs[3]["Value"]) in {model.voltage_raw(k, before), model.voltage_raw(k, after)}
    assert all("Error" not in r for i, r in enumerate(recs) if i != 2)
    # one READ-request with the three known variable names (the unknown one is not asked)
    reads = [a for a in apdus(lines) if a[0] == 0x05 and a[1] > 1]
    assert len(reads) == 1 and reads[0][1] == 3


def test_sn_profile_by_range(sim):
    k = 1
    start, end = "2026-01-15T00:00:00+03:00", "2026-01-16T00:00:00+03:00"
    lines: list = []
    reply = read(sim, "1.0.99.1.0.255", k=k, dt_from=start, dt_to=end, lines=lines)
    assert reply["Status"] == "ok", reply["Error"]
    assert reply["DataRecords"] == profile_records(k, ts(start), ts(end))
    # parameterised access (04) with selector 1 (by range)
    assert any(a[0] == 0x05 and a[2] == 0x04 and a[5] == 0x01 for a in apdus(lines))


def test_sn_profile_without_dates(sim):
    before = time.time()
    reply = read(sim, "1.0.99.1.0.255")
    after = time.time()
    assert reply["Status"] == "ok", reply["Error"]
    recs = reply["DataRecords"]
    assert len(recs) == 3 * model.LOAD_DEFAULT_ROWS
    last = datetime.fromisoformat(recs[-1]["DateTime"]).timestamp()
    assert int(before) // 900 * 900 <= last <= int(after) // 900 * 900
    first = int(datetime.fromisoformat(recs[0]["DateTime"]).timestamp())
    assert recs == profile_records(0, first, int(last))


class SmallPduSession(MeterSession):
    """Proposes block transfer and a 256-byte PDU, so that a day comes in many READ blocks.

    Gurux's client (and so the reader, which proposes what Gurux's example client
    does) does not propose block transfer for SN; meters may send blocks anyway.
    """

    def _make_client(self, public: bool = False):
        client = super()._make_client(public)
        client.proposedConformance |= Conformance.BLOCK_TRANSFER_WITH_GET_OR_READ
        client.maxReceivePDUSize = 256
        return client


@pytest.fixture(scope="module", params=["list", "data"])
def blocks_sim(request, sim):
    """The SN meter with each form of READ block raw-data: the result list (standard,
    real meters) or the bare Data (Gurux's servers)."""
    if request.param == "list":
        yield sim
        return
    with running_simulator(3, "-r", "SN", "--sn-blocks", "data", interface=sim.interface) as info:
        info.interface = sim.interface
        yield info


def test_sn_profile_in_many_read_blocks(blocks_sim):
    sim = blocks_sim
    k = 2
    conn = conn_of(sim, LOW, k)
    start = datetime(2026, 3, 4, tzinfo=timezone.utc)
    end = start + timedelta(days=1)
    lines: list = []
    settings = parse_connection_string(conn)
    session = SmallPduSession(settings, 10, trace=reader.make_tracer(settings, lines.append))
    session.open(time.monotonic() + 30)
    try:
        request = ReadRequest("sn", "READ", "1.0.99.1.0.255", conn, start, end, False)
        records = reader._read(session, request, settings, ReaderOptions())
    finally:
        session.close()
    assert records == profile_records(k, int(start.timestamp()), int(end.timestamp()))
    # block-number-access (05 01 05 nnnn) for blocks 1, 2, 3, ... in order
    acks = [int.from_bytes(a[3:5], "big") for a in apdus(lines) if a[:3] == b"\x05\x01\x05"]
    assert len(acks) >= 10 and acks == list(range(1, len(acks) + 1))


def test_sn_ciphered_hls_gmac(sim, tmp_path):
    k = 0
    lines: list = []
    before = int(time.time())
    reply = read(sim, "1.0.2.8.0.255", conn=GMAC, k=k, state_dir=tmp_path, lines=lines)
    after = int(time.time())
    assert reply["Status"] == "ok", reply["Error"]
    assert int(reply["DataRecords"][0]["Value"]) in {
        model.export_wh(k, before),
        model.export_wh(k, after),
    }
    sent = apdus(lines)
    reads = [a for a in sent if a[0] == 0x25]  # glo-read-request
    assert len(reads) >= 2
    counters = [int.from_bytes(a[3:7], "big") for a in reads]
    assert counters == sorted(set(counters))  # a new invocation counter per request
    assert not any(a[0] == 0x05 for a in sent)  # nothing in clear
    # a second request on a fresh association continues the persisted counter
    start, end = "2026-01-01T00:00:00Z", "2026-01-01T06:00:00Z"
    again = read(sim, "1.0.99.1.0.255", conn=GMAC, k=k, state_dir=tmp_path, dt_from=start,
                 dt_to=end)  # fmt: skip
    assert again["Status"] == "ok", again["Error"]
    assert again["DataRecords"] == profile_records(k, ts(start), ts(end))


def test_sn_list_answered_in_read_blocks(blocks_sim):
    # Given a list whose READ-response does not fit in 256 bytes
    sim = blocks_sim
    k = 1
    conn = conn_of(sim, LOW, k)
    lines: list = []
    settings = parse_connection_string(conn)
    session = SmallPduSession(settings, 10, trace=reader.make_tracer(settings, lines.append))
    session.open(time.monotonic() + 30)
    items = [("1.0.99.1.0.255", 3), ("1.0.98.1.0.255", 2), ("0.0.96.1.0.255", 2),
             ("1.0.99.1.0.255", 8), ("1.0.1.8.0.255", 3)]  # fmt: skip
    try:
        records = reader._read_list(session, items, "iso")
    finally:
        session.close()
    # Then every item has its value (the list form is what both kinds of meter send here)
    assert [r["Code"] for r in records] == [reader._code(o, a) for o, a in items]
    assert all("Error" not in r for r in records)
    assert records[0]["Value"].startswith("[[8, 0000010000FF, 2, 0], [1, 0000600A01FF, 2, 0]")
    assert records[1]["Value"].startswith("[[07") and records[1]["Value"].count("], [") == 30
    assert records[2]["Value"] == model.serial_number(k)
    assert records[3]["Value"] == "35040" and records[4]["Value"] == "[0, 30]"
    assert any(a[:3] == b"\x05\x01\x05" for a in apdus(lines))  # it did come in blocks


def test_sn_list_values_equal_gurux_clients(sim):
    """The same SN list read by Gurux's own SN client gives the same values (one READ each)."""
    from gurux_dlms.objects import GXDLMSObject

    from dlms2amqp.meter.client import gurux_to_native
    from dlms2amqp.reply import value_to_str
    from tests.helpers_sim import GuruxMeter, gurux_client

    items = [(3, "1.0.1.8.0.255", 3), (1, "0.0.96.1.0.255", 2), (1, "0.0.42.0.0.255", 2),
             (8, "0.0.1.0.0.255", 3), (7, "1.0.99.1.0.255", 4)]  # fmt: skip
    g = ' -g "' + "; ".join(f"{o}:{a}" for _, o, a in items) + '"'
    reply = read(sim, "ignored", conn=LOW + g, k=1)
    assert reply["Status"] == "ok", reply["Error"]
    client = gurux_client(32, sim.interface)
    client.useLogicalNameReferencing = False
    m = GuruxMeter(client, sim.host, sim.port + 1)
    try:
        m.connect()
        objects = client.parseObjects(m.request(client.getObjectsRequest()).data, False)
        names = {str(o.logicalName): o.shortName for o in objects}
        objs = [(GXDLMSObject(c, o, names[o]), a) for c, o, a in items]
        values = []
        for message in client.readList(objs):
            values += m.request(message).value
        m.release()
    finally:
        m.close()
    assert [r["Value"] for r in reply["DataRecords"]] == [
        value_to_str(gurux_to_native(v)) for v in values
    ]
