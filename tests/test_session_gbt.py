# SPDX-License-Identifier: GPL-2.0-or-later
"""General block transfer (-W) through reader.execute against the real simulator.

Small client PDUs (256 bytes) make a profile reply many GBT blocks.  ``--gbt-ack-each``
makes the simulator send GBT as Gurux's Java meter does (streaming bit and window 1 in
every block but the first and the last, one block per acknowledgement): a client that
waits for more after a streamed block then hangs.  Expected values come from the
simulator's model (dlms2amqp.simulator.model).
"""

from __future__ import annotations

import calendar
from datetime import datetime

import orjson
import pytest

from dlms2amqp.meter import session as session_mod
from dlms2amqp.meter.reader import ReaderOptions, execute
from dlms2amqp.request import parse_request
from dlms2amqp.simulator import model
from tests.helpers_sim import running_simulator

pytestmark = pytest.mark.integration
LOW = "-c 32 -a Low -P 00000000"
START, END = "2026-03-01T00:00:00Z", "2026-03-02T00:00:00Z"


def _ts(iso: str) -> int:
    return calendar.timegm(datetime.fromisoformat(iso).utctimetuple())


@pytest.fixture
def small_pdu(monkeypatch):
    """The reader's Gurux client proposes a 256-byte PDU (the meter cuts replies small)."""
    orig = session_mod.make_client

    def make(settings, public=False):
        client = orig(settings, public)
        client.setMaxReceivePDUSize(256)
        return client

    monkeypatch.setattr(session_mod, "make_client", make)


def _read_profile(sim, interface: str, window: int) -> dict:
    body = {
        "MsgID": "gbt",
        "Cmd": "READ",
        "ObisCode": "1.0.99.1.0.255",
        "ConnectionString": f"-h {sim.host} -p {sim.port} -i {interface} {LOW} -W {window}",
        "dtFrom": START,
        "dtTo": END,
    }
    options = ReaderOptions(frame_timeout=5, request_timeout=20)
    return execute(parse_request(orjson.dumps(body)), options, None)


def _check(reply: dict) -> None:
    assert reply["Status"] == "ok", reply["Error"]
    rows = model.load_profile_rows(0, _ts(START), _ts(END))
    assert len(rows) == 97
    assert len(reply["DataRecords"]) == 3 * len(rows)
    assert [r["Value"] for r in reply["DataRecords"][-3:]] == [str(v) for v in rows[-1][1:4]]
    assert [r["Value"] for r in reply["DataRecords"][:3]] == [str(v) for v in rows[0][1:4]]


@pytest.mark.parametrize("interface", ["WRAPPER", "HDLC"])
@pytest.mark.parametrize("window", [1, 3, 5, 7])
def test_gbt_windows_small_pdu(small_pdu, interface, window):
    # Given a meter streaming GBT windows of the size the client asks for (WRAPPER; HDLC
    # one block per turn), when a day of profile is read with -W 1/3/5/7 and 256-byte PDUs
    with running_simulator(1, interface=interface) as sim:
        reply = _read_profile(sim, interface, window)
    # Then every row is the model's
    _check(reply)


@pytest.mark.parametrize("interface", ["WRAPPER", "HDLC"])
@pytest.mark.parametrize("window", [1, 5])
def test_gbt_meter_window_1_with_streaming_bit(small_pdu, interface, window):
    # Given a meter that announces window 1 yet sets the streaming bit (Gurux's Java
    # meter), when the client proposed a window of 5: it must ack every block, as the
    # meter's window is the smaller one (it hung waiting for more before)
    with running_simulator(1, "--gbt-ack-each", interface=interface) as sim:
        reply = _read_profile(sim, interface, window)
    _check(reply)
