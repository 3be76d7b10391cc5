# SPDX-License-Identifier: GPL-2.0-or-later
"""reader.execute against the real simulator over WRAPPER and HDLC: every object kind.

Expected values come from the simulator's documented data model
(dlms2amqp.simulator.model).
"""

from __future__ import annotations

import calendar
import time
from datetime import datetime, timedelta, timezone

import orjson
import pytest

from dlms2amqp.meter.pool import SessionPool
from dlms2amqp.meter.reader import ReaderOptions, execute
from dlms2amqp.request import parse_request
from dlms2amqp.simulator import model
from tests.helpers_sim import running_simulator

pytestmark = pytest.mark.integration
LOW = "-c 32 -a Low -P 00000000"


@pytest.fixture(scope="module", params=["WRAPPER", "HDLC"])
def sim(request):
    with running_simulator(3, interface=request.param) as info:
        info.interface = request.param
        yield info


def read(sim, obis, conn=LOW, k=0, dt_from=None, dt_to=None, pool=None, **opts):
    body = {
        "MsgID": "t1",
        "Cmd": "READ",
        "ObisCode": obis,
        "ConnectionString": f"-h {sim.host} -p {sim.port + k} -i {sim.interface} {conn}",
    }
    if dt_from:
        body["dtFrom"] = dt_from
    if dt_to:
        body["dtTo"] = dt_to
    options = ReaderOptions(frame_timeout=10, request_timeout=30, **opts)
    return execute(parse_request(orjson.dumps(body)), options, pool)


def ts(iso: str) -> int:
    return calendar.timegm(datetime.fromisoformat(iso).utctimetuple())


@pytest.mark.parametrize(
    "obis, fn, scaler, unit",
    [
        ("1.0.1.8.0.255", model.import_wh, 0, 30),
        ("1.0.2.8.0.255", model.export_wh, 0, 30),
        ("1.0.32.7.0.255", model.voltage_raw, -1, 35),
        ("1.0.31.7.0.255", model.current_raw, -2, 33),
    ],
)
def test_registers(sim, obis, fn, scaler, unit):
    k = 2
    before = int(time.time())
    reply = read(sim, obis, k=k)
    after = int(time.time())
    assert reply["Status"] == "ok", reply["Error"]
    [rec] = reply["DataRecords"]
    assert rec["Code"] == obis and rec["Scaler"] == scaler and rec["Unit"] == unit
    assert int(rec["Value"]) in {fn(k, before), fn(k, after)}
    assert set(reply) == {"InMsgID", "MsgID", "Status", "Error", "DataRecords"}


def test_data_objects_and_public_client(sim):
    k = 1
    serial = read(sim, "0.0.96.1.0.255", conn="-c 16", k=k)
    ldn = read(sim, "0.0.42.0.0.255", conn="-c 16", k=k)
    status = read(sim, "0.0.96.10.1.255", k=k)
    assert serial["DataRecords"][0]["Value"] == model.serial_number(k)
    assert bytes.fromhex(ldn["DataRecords"][0]["Value"]) == model.logical_device_name(k)
    now = int(time.time())
    assert int(status["DataRecords"][0]["Value"]) in {
        model.status(k, now),
        model.status(k, now - 5),
    }
    assert "Scaler" not in serial["DataRecords"][0]


def test_clock(sim):
    reply = read(sim, "0.0.1.0.0.255", conn="-c 16")
    [rec] = reply["DataRecords"]
    meter_time = datetime.fromisoformat(rec["Value"])
    assert abs(meter_time.timestamp() - time.time()) < 10
    assert rec["DateTime"] == rec["Value"]


def test_load_profile_one_day_with_offset(sim):
    # Given a day in UTC+3, as the seed's request has it
    k = 1
    reply = read(
        sim, "1.0.99.1.0.255", k=k,
        dt_from="2026-01-15T00:00:00+03:00", dt_to="2026-01-16T00:00:00+03:00",
    )  # fmt: skip
    assert reply["Status"] == "ok", reply["Error"]
    rows = model.load_profile_rows(
        k, ts("2026-01-15T00:00:00+03:00"), ts("2026-01-16T00:00:00+03:00")
    )
    assert len(rows) == 97
    expected = []
    for t, st, imp, exp in rows:
        when = datetime.fromtimestamp(t, timezone.utc).isoformat()
        expected += [
            {"DateTime": when, "Code": "0.0.96.10.1.255", "Value": str(st)},
            {"DateTime": when, "Code": "1.0.1.8.0.255", "Value": str(imp)},
            {"DateTime": when, "Code": "1.0.2.8.0.255", "Value": str(exp)},
        ]
    assert reply["DataRecords"] == expected


def test_load_profile_31_days(sim):
    k = 0
    start, end = "2026-01-01T00:00:00+00:00", "2026-02-01T00:00:00+00:00"
    t0 = time.monotonic()
    reply = read(sim, "1.0.99.1.0.255", k=k, dt_from=start, dt_to=end)
    assert time.monotonic() - t0 < 30
    rows = model.load_profile_rows(k, ts(start), ts(end))
    assert len(rows) == 31 * 96 + 1
    recs = reply["DataRecords"]
    assert len(recs) == 3 * len(rows)
    assert recs[-2]["Value"] == str(rows[-1][2])
    assert recs[-2]["DateTime"] == "2026-02-01T00:00:00+00:00"


def test_billing_profile_dotnet_dates(sim):
    k = 2
    start, end = "2026-01-25T00:00:00Z", "2026-02-05T00:00:00Z"
    reply = read(sim, "1.0.98.1.0.255", k=k, dt_from=start, dt_to=end, datetime_format="dotnet")
    rows = model.billing_rows(k, ts(start), ts(end))
    recs = reply["DataRecords"]
    assert len(recs) == 2 * len(rows) == 24
    assert recs[0] == {"DateTime": "1/25/2026 12:00:00.000 AM", "Code": "1.0.1.8.0.255",
                       "Value": str(rows[0][1])}  # fmt: skip


def test_profile_without_dates_reads_default_buffer(sim):
    reply = read(sim, "1.0.99.1.0.255")
    assert reply["Status"] == "ok"
    assert len(reply["DataRecords"]) == 3 * model.LOAD_DEFAULT_ROWS


def test_naive_dates_taken_as_utc_and_said(sim):
    reply = read(sim, "1.0.98.1.0.255", dt_from="2026-01-01T00:00:00", dt_to="2026-01-02T00:00:00")
    assert reply["Status"] == "ok"
    assert "taken as UTC" in reply["Error"]
    assert reply["DataRecords"][0]["DateTime"] == "2026-01-01T00:00:00+00:00"


def test_get_list(sim):
    conn = LOW + ' -g "0.0.96.1.0.255:2; 1.0.1.8.0.255:3; 0.0.1.0.0.255:3"'
    reply = read(sim, "ignored", conn=conn)
    assert reply["Status"] == "ok", reply["Error"]
    codes = [r["Code"] for r in reply["DataRecords"]]
    assert codes == ["0.0.96.1.0.255", "1.0.1.8.0.255:3", "0.0.1.0.0.255:3"]
    assert reply["DataRecords"][0]["Value"] == model.serial_number(0)
    assert reply["DataRecords"][1]["Value"] == "[0, 30]"


def test_unknown_object_and_access_denied(sim):
    unknown = read(sim, "1.2.3.4.5.6")
    assert unknown["Status"] == "notok"
    assert "unknown object 1.2.3.4.5.6" in unknown["Error"]
    denied = read(sim, "1.0.1.8.0.255", conn="-c 16")
    assert denied["Status"] == "notok"
    assert denied["Error"] == "access denied to 1.0.1.8.0.255 attribute 2 (read-write-denied)"


def test_wrong_password_gurux_wording(sim):
    reply = read(sim, "1.0.1.8.0.255", conn="-c 32 -a Low -P 12345678")
    assert reply["Status"] == "notok"
    assert reply["Error"] == "Connection is permanently rejected. Authentication failure."
    assert "12345678" not in orjson.dumps(reply).decode()


def test_pool_reuses_association_and_survives_a_dead_one(sim):
    pool = SessionPool(idle_timeout=30)
    try:
        first = read(sim, "1.0.1.8.0.255", pool=pool)
        second = read(sim, "1.0.2.8.0.255", pool=pool)
        assert first["Status"] == second["Status"] == "ok"
        assert (pool.hits, pool.misses) == (1, 1)
        # When the pooled connection dies under us
        key = f"tcp:{sim.host}:{sim.port}"
        _, session = pool._sessions[key]
        session.media.sock.close()
        third = read(sim, "1.0.1.8.0.255", pool=pool)
        assert third["Status"] == "ok", third["Error"]
        # Different settings never reuse the association
        other = read(sim, "0.0.96.1.0.255", conn="-c 16", pool=pool)
        assert other["Status"] == "ok"
        assert pool.misses >= 2
    finally:
        pool.close_all()
    assert len(pool) == 0


def test_pool_expires_idle_sessions(sim):
    pool = SessionPool(idle_timeout=0.2)
    try:
        assert read(sim, "0.0.96.1.0.255", conn="-c 16", pool=pool)["Status"] == "ok"
        assert len(pool) == 1
        time.sleep(0.3)
        assert pool.close_idle() == 1 and len(pool) == 0
    finally:
        pool.close_all()


def test_unknown_command_and_bad_obis(sim):
    body = orjson.dumps({"MsgID": "x", "Cmd": "WRITE", "ObisCode": "1.0.1.8.0.255",
                         "ConnectionString": f"-h {sim.host} -p {sim.port}"})  # fmt: skip
    reply = execute(parse_request(body), ReaderOptions())
    assert reply["Status"] == "notok" and reply["Error"].startswith("Unknown command")
    assert read(sim, "1.0.1.8")["Error"].startswith("ObisCode '1.0.1.8' is not a logical name")


def test_timezone_of_rows_follows_meter():
    # Given a meter at UTC+60 min, its rows carry +01:00 and the right instants
    with running_simulator(1, "--utc-offset", "60") as s:
        s.interface = "WRAPPER"
        reply = read(
            s, "1.0.99.1.0.255", dt_from="2026-01-01T00:00:00Z", dt_to="2026-01-01T00:30:00Z"
        )
    assert reply["Status"] == "ok", reply["Error"]
    first = datetime.fromisoformat(reply["DataRecords"][0]["DateTime"])
    assert first.utcoffset() == timedelta(hours=1)
    assert first == datetime(2026, 1, 1, tzinfo=timezone.utc)


@pytest.mark.parametrize("extra", ["-f 2030 -w 1", "-f 128 -w 1", "-f 1024", "-l 1"])
def test_hdlc_frame_sizes_and_addresses(sim, extra):
    # -f up to 2030 is proposed as given (frames over 255 bytes framed by gurux_compat);
    # "-l 1" is logical 1 / physical 1 (two address bytes 02 03), Gurux's meaning;
    # WRAPPER ignores -f and -w
    start, end = "2026-03-01T00:00:00Z", "2026-03-08T00:00:00Z"
    reply = read(sim, "1.0.99.1.0.255", conn=f"{LOW} {extra}", dt_from=start, dt_to=end)
    assert reply["Status"] == "ok", reply["Error"]
    rows = model.load_profile_rows(0, ts(start), ts(end))
    assert len(reply["DataRecords"]) == 3 * len(rows) == 3 * (7 * 96 + 1)
    assert reply["DataRecords"][-1]["Value"] == str(rows[-1][3])


def test_pooled_session_survives_an_unknown_object(sim):
    # Given a pooled association, when a request names an unknown object
    pool = SessionPool(idle_timeout=30)
    try:
        assert read(sim, "1.0.1.8.0.255", pool=pool)["Status"] == "ok"
        bad = read(sim, "1.2.3.4.5.6", pool=pool)
        good = read(sim, "1.0.2.8.0.255", pool=pool)
    finally:
        pool.close_all()
    # Then the error is reported and the association is kept for the next request
    assert bad["Status"] == "notok" and "unknown object" in bad["Error"]
    assert good["Status"] == "ok"
    assert (pool.hits, pool.misses) == (2, 1)


EXT_TEMPLATE = """<Objects>
    <GXDLMSExtendedRegister>
        <LN>1.0.1.6.0.255</LN>
        <Access>1111111</Access>
        <Value Type="6">4321</Value>
        <Scaler>0.1</Scaler>
        <Unit>27</Unit>
        <Status Type="17">0</Status>
        <CaptureTime>2026-01-15T08:30:00+02:00</CaptureTime>
    </GXDLMSExtendedRegister>
    <GXDLMSAssociationLogicalName>
        <LN>0.0.40.0.0.255</LN>
        <Version>2</Version>
        <ObjectList>
            <GXDLMSExtendedRegister>
                <LN>1.0.1.6.0.255</LN>
            </GXDLMSExtendedRegister>
        </ObjectList>
        <ClientSAP>16</ClientSAP>
        <ServerSAP>1</ServerSAP>
        <AuthenticationMechanismName>
            <MechanismId>0</MechanismId>
        </AuthenticationMechanismName>
    </GXDLMSAssociationLogicalName>
</Objects>
"""


def test_extended_register_found_through_the_object_list(tmp_path):
    # Given a meter (Gurux template) with an extended register whose OBIS looks like a
    # plain register: the first GET (class 3) is refused, the object list says class 4
    path = tmp_path / "ext.xml"
    path.write_text(EXT_TEMPLATE)
    with running_simulator(1, "-x", str(path)) as s:
        s.interface = "WRAPPER"
        reply = read(s, "1.0.1.6.0.255", conn="-c 16")
    assert reply["Status"] == "ok", reply["Error"]
    # Then the value, scaler/unit and the capture time (in the meter's offset) are reported
    assert reply["DataRecords"] == [
        {"DateTime": "2026-01-15T08:30:00+02:00", "Code": "1.0.1.6.0.255", "Value": "4321",
         "Scaler": -1, "Unit": 27}
    ]  # fmt: skip


def test_clock_in_dotnet_format(sim):
    reply = read(sim, "0.0.1.0.0.255", conn="-c 16", datetime_format="dotnet")
    [rec] = reply["DataRecords"]
    assert rec["Value"] == rec["DateTime"]
    assert rec["Value"].endswith((" AM", " PM")) and rec["Value"].count("/") == 2
