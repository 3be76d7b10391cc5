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


# --- the acknowledgement rule, block by block (pure logic, bytes in, bytes out) ---------
def _wrap(apdu: bytes) -> bytes:
    return bytes((0, 1, 0, 1, 0, 16)) + len(apdu).to_bytes(2, "big") + apdu


def _block(bc: int, bn: int, bna: int, data: bytes = bytes(20)) -> bytes:
    return _wrap(
        bytes((0xE0, bc))
        + bn.to_bytes(2, "big")
        + bna.to_bytes(2, "big")
        + bytes((len(data),))
        + data
    )


def _ack_fields(frame: bytes) -> tuple[int, int, int]:
    """(block control, block number, block number acknowledged) of the client's GBT ack."""
    apdu = bytes(frame)[8:]
    assert apdu[0] == 0xE0
    return apdu[1], int.from_bytes(apdu[2:4], "big"), int.from_bytes(apdu[4:6], "big")


def test_gbt_ack_rule_window_lost_block_and_stall():
    from gurux_dlms import GXByteBuffer, GXDLMSClient
    from gurux_dlms.enums import InterfaceType

    from dlms2amqp.meter.gurux_compat import ReplyData, gbt_stalled

    c = GXDLMSClient(True, 16, 1, interfaceType=InterfaceType.WRAPPER)
    c.settings.gbtWindowSize = 3
    reply = ReplyData()

    def feed(frame: bytes) -> bytes:
        assert c.getData(GXByteBuffer(frame), reply, None)
        return bytes(c.receiverReady(reply))

    # block 1 alone (no streaming bit): acknowledged at once, with the client's window 3
    assert _ack_fields(feed(_block(0x01, 1, 0))) == (0x83, 1, 1)
    # a streamed window 2, 3, 4: nothing sent until its last block (no streaming bit)
    assert feed(_block(0x41, 2, 1)) == b""
    assert feed(_block(0x41, 3, 1)) == b""
    assert _ack_fields(feed(_block(0x01, 4, 1))) == (0x83, 2, 4)
    # the next window loses block 6: block 7 is dropped, not answered; when the meter goes
    # quiet the ack names block 5 (the last in order), so the meter sends 6 again
    assert feed(_block(0x41, 5, 2)) == b""
    assert feed(_block(0x01, 7, 2)) == b""
    bc, bn, bna = _ack_fields(gbt_stalled(c.settings))
    assert (bn, bna) == (3, 5)
    # a meter seen stalling is offered its own announced window (1) and acked per block
    assert bc == 0x81
    assert _ack_fields(feed(_block(0x41, 6, 3))) == (0x81, 4, 6)
    # a repeat of a block already received is dropped
    assert feed(_block(0x41, 6, 3)) == b""


def test_gbt_meter_looping_on_a_block_is_a_clear_error():
    # Gurux's Java meter, asked for a window over 1, sends its block 1 again and again
    # without being asked: the reply is given up with a field-engineer message
    from gurux_dlms import GXByteBuffer, GXDLMSClient
    from gurux_dlms.enums import InterfaceType

    from dlms2amqp.errors import MeterProtocolError
    from dlms2amqp.meter.gurux_compat import GBT_MAX_REPEATS, ReplyData

    c = GXDLMSClient(True, 16, 1, interfaceType=InterfaceType.WRAPPER)
    c.settings.gbtWindowSize = 5
    reply = ReplyData()
    for frame in (_block(0x01, 1, 0), _block(0x41, 2, 1)):
        assert c.getData(GXByteBuffer(frame), reply, None)
    for _ in range(GBT_MAX_REPEATS):
        assert c.getData(GXByteBuffer(_block(0x01, 1, 0, bytes(4))), reply, None)
        assert bytes(c.receiverReady(reply)) == b""  # dropped, not answered
    with pytest.raises(MeterProtocolError, match="-W 1"):
        c.getData(GXByteBuffer(_block(0x01, 1, 0, bytes(4))), reply, None)
