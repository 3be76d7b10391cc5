# SPDX-License-Identifier: GPL-2.0-or-later
"""Meters written by others: bytes after values, read-write-denied for a wrong class, SN High
ciphered; the reader end to end over real TCP, WRAPPER and HDLC.

The simulator runs in this process (a thread running its selectors loop on free
loopback ports) so that the meter can be given what the built-in one lacks: the
quirks of Gurux's C reference meter (``SimOptions.trailing_bytes``,
``deny_wrong_class``), a demand register (class 5, which the reader guesses as a
register, class 3) and an SN association with High authentication and
authenticated encryption, as Gurux's Java meter offers (there client 24; here 18).
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone

import orjson
import pytest

from dlms2amqp.meter.reader import ReaderOptions, execute
from dlms2amqp.request import parse_request
from dlms2amqp.simulator import axdr_enc as ax
from dlms2amqp.simulator import cosem, model, sn
from dlms2amqp.simulator.apdu import SimOptions
from dlms2amqp.simulator.ports import free_port_range
from dlms2amqp.simulator.server import Server

pytestmark = pytest.mark.integration
LOW = "-c 32 -a Low -P 00000000"
KEYS = "-T 4775727578313233 -A D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF -B 000102030405060708090A0B0C0D0E0F"
DEMAND = "1.0.31.4.0.255"
TRAILING = 3


def demand_value(k: int, t: int) -> int:
    return 500 + (k + t // 900) % 50


def device(sn_high: bool = False) -> cosem.Device:
    """The built-in meter plus a demand register; ``sn_high``: SN, client 18 High + ciphered."""
    base = cosem.builtin_device()
    demand = cosem.CosemObject(
        5,
        cosem.ln_bytes(DEMAND),
        0,
        {
            2: lambda ctx: ax.uint32(demand_value(ctx.meter.k, ctx.now)),
            3: ax.structure([ax.int8(-1), ax.enum(27)]),  # 0.1 W
        },
        frozenset({32}),
    )
    associations = [a for a in base.associations.values() if not (sn_high and a.client_sap == 18)]
    if sn_high:  # client 18 (High, secret "Gurux") with every APDU ciphered
        associations.append(
            cosem.Association(
                18,
                cosem.MECH_HIGH,
                secret=b"Gurux",
                security=0x30,
                block_key=cosem.BLOCK_KEY,
                auth_key=cosem.AUTH_KEY,
                client_system_title=cosem.CLIENT_SYSTEM_TITLE,
            )
        )
    objects = [o for o in base.objects if o.class_id != 15]  # the new Device adds its own
    dev = cosem.Device([*objects, demand], associations, name="quirks")
    if sn_high:
        sn.use_short_names(dev)
    return dev


class InProcessMeter:
    def __init__(self, dev: cosem.Device, interface: str, **opts):
        self.interface = interface
        self.host = "127.0.0.1"
        self.port = free_port_range(1, self.host)
        options = SimOptions(interface=interface, **opts)
        self.server = Server(dev, self.host, self.port, 1, options)
        self.server.listen()
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(5)


@pytest.fixture(scope="module", params=["WRAPPER", "HDLC"])
def quirky(request):
    """Gurux's C reference meter's habits: bytes after values, "denied" for a wrong class."""
    meter = InProcessMeter(device(), request.param, trailing_bytes=TRAILING, deny_wrong_class=True)
    yield meter
    meter.stop()


@pytest.fixture(scope="module", params=["WRAPPER", "HDLC"])
def sn_high(request):
    meter = InProcessMeter(device(sn_high=True), request.param)
    yield meter
    meter.stop()


def read(meter, obis, conn=LOW, dt_from=None, dt_to=None, lines=None, **opts):
    body = {
        "MsgID": "q",
        "Cmd": "READ",
        "ObisCode": obis,
        "ConnectionString": f"-h {meter.host} -p {meter.port} -i {meter.interface} {conn}",
    }
    if dt_from:
        body["dtFrom"], body["dtTo"] = dt_from, dt_to
    if lines is not None:
        opts.update(trace=True, trace_sink=lines.append)
    options = ReaderOptions(frame_timeout=10, request_timeout=30, **opts)
    return execute(parse_request(orjson.dumps(body)), options)


def notes(lines: list) -> list:
    return [line[3:] for line in lines if line.startswith("-- ")]


def test_demand_register_denied_as_class_3_reads_as_class_5(quirky):
    lines: list = []
    before = int(time.time())
    reply = read(quirky, DEMAND, lines=lines)
    after = int(time.time())
    assert reply["Status"] == "ok", reply["Error"]
    [rec] = reply["DataRecords"]
    assert int(rec["Value"]) in {demand_value(0, before), demand_value(0, after)}
    assert (rec["Scaler"], rec["Unit"]) == (-1, 27)
    assert f"{DEMAND} is class 5 in the meter's object list" in notes(lines)


def test_right_class_still_denied_is_access_denied(quirky):
    reply = read(quirky, "1.0.1.8.0.255", conn="-c 16")
    assert reply["Status"] == "notok"
    assert reply["Error"] == "access denied to 1.0.1.8.0.255 attribute 2 (read-write-denied)"


def test_denied_and_not_in_the_object_list_says_both(quirky):
    reply = read(quirky, "1.2.3.4.5.6")
    assert reply["Status"] == "notok"
    assert reply["Error"] == (
        "access denied to 1.2.3.4.5.6 attribute 2 (read-write-denied); "
        "1.2.3.4.5.6 is not in this association's object list"
    )


def test_list_with_a_wrong_class_item(quirky):
    lines: list = []
    conn = LOW + f' -g "1.0.1.8.0.255:2; {DEMAND}:2; {DEMAND}:3; 1.2.3.4.5.6:2"'
    reply = read(quirky, "ignored", conn=conn, lines=lines)
    assert reply["Status"] == "ok", reply["Error"]
    recs = reply["DataRecords"]
    assert recs[2]["Value"] == "[-1, 27]" and "Error" not in recs[1]
    assert recs[3]["Value"] == "" and "read-write-denied" in recs[3]["Error"]
    # one list for all four, a second for the two demand register attributes, class 5
    lists = [line for line in lines if "C0 03" in line and line.startswith("TX")]
    assert len(lists) == 2


def test_clock_with_bytes_after_it(quirky):
    lines: list = []
    reply = read(quirky, "0.0.1.0.0.255", conn="-c 16", lines=lines)
    assert reply["Status"] == "ok", reply["Error"]
    meter_time = datetime.fromisoformat(reply["DataRecords"][0]["Value"])
    assert abs(meter_time.timestamp() - time.time()) < 10
    assert notes(lines) == [f"{TRAILING} trailing bytes after the value of 0.0.1.0.0.255 ignored"]


@pytest.mark.parametrize("dated", [True, False])
def test_profile_with_bytes_after_the_last_block(quirky, dated):
    lines: list = []
    start, end = "2026-02-01T00:00:00+00:00", "2026-02-02T00:00:00+00:00"
    if dated:
        reply = read(quirky, "1.0.99.1.0.255", dt_from=start, dt_to=end, lines=lines)
    else:
        reply = read(quirky, "1.0.99.1.0.255", lines=lines)
    assert reply["Status"] == "ok", reply["Error"]
    if dated:
        t0 = int(datetime.fromisoformat(start).timestamp())
        rows = model.load_profile_rows(0, t0, t0 + 86400)
        assert len(reply["DataRecords"]) == 3 * len(rows) == 3 * 97
        assert reply["DataRecords"][-1]["Value"] == str(rows[-1][3])
    else:
        assert len(reply["DataRecords"]) == 3 * model.LOAD_DEFAULT_ROWS
    assert notes(lines) == [f"{TRAILING} trailing bytes after the buffer of 1.0.99.1.0.255 ignored"]


def test_sn_high_with_authenticated_encryption(sn_high, tmp_path):
    # Given an SN association with High authentication and every APDU ciphered
    conn = f"-c 18 -a High -P Gurux -C AuthenticationEncryption {KEYS} -r SN"
    lines: list = []
    before = int(time.time())
    reply = read(sn_high, "1.0.1.8.0.255", conn=conn, state_dir=tmp_path, lines=lines)
    after = int(time.time())
    assert reply["Status"] == "ok", reply["Error"]
    assert int(reply["DataRecords"][0]["Value"]) in {
        model.import_wh(0, before),
        model.import_wh(0, after),
    }
    tx = [bytes.fromhex(line[3:].replace("**", "00")) for line in lines if line.startswith("TX")]
    if sn_high.interface == "WRAPPER":
        apdus = [f[8] for f in tx]
    else:
        apdus = [f[f.index(b"\xe6\xe6\x00") + 3] for f in tx if b"\xe6\xe6\x00" in f]
    # after the AARQ (masked in the trace) only ciphered READ/WRITE (glo 0x25/0x26), then
    # the release
    assert set(apdus[1:-1]) <= {0x25, 0x26} and apdus.count(0x25) >= 2 and apdus[-1] == 0x62
    # and a profile by range on the same kind of association
    start, end = "2026-01-01T00:00:00+00:00", "2026-01-01T06:00:00+00:00"
    again = read(sn_high, "1.0.99.1.0.255", conn=conn, state_dir=tmp_path, dt_from=start,
                 dt_to=end)  # fmt: skip
    assert again["Status"] == "ok", again["Error"]
    t0 = int(datetime.fromisoformat(start).astimezone(timezone.utc).timestamp())
    assert len(again["DataRecords"]) == 3 * len(model.load_profile_rows(0, t0, t0 + 6 * 3600))


def test_sn_high_wrong_secret_is_an_authentication_failure(sn_high, tmp_path):
    conn = f"-c 18 -a High -P Wrong -C AuthenticationEncryption {KEYS} -r SN"
    reply = read(sn_high, "1.0.1.8.0.255", conn=conn, state_dir=tmp_path)
    assert reply["Status"] == "notok"
    assert "uthentication" in reply["Error"]
