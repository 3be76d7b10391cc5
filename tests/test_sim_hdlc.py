# SPDX-License-Identifier: GPL-2.0-or-later
"""HDLC codec and link state machine of the simulator, with bytes; serial path over a pty."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from dlms2amqp.simulator import framing
from dlms2amqp.simulator.framing import HdlcDecoder, HdlcLink, crc16_x25, hdlc_encode

CLIENT16 = b"\x21"
SERVER_1_0 = b"\x02\x01"  # logical 1, physical 0, two-byte form


def test_crc16_x25_check_value():
    assert crc16_x25(b"123456789") == 0x906E


def test_snrm_frame_bytes_match_the_standard_example():
    # 7E A0 07 03 21 93 0F 01 7E: SNRM from client 16 to server 1 (one-byte address)
    assert hdlc_encode(b"\x03", CLIENT16, 0x93) == bytes.fromhex(
        "7ea00703219 30f017e".replace(" ", "")
    )


def test_decoder_resynchronises_and_drops_bad_frames():
    good = hdlc_encode(SERVER_1_0, CLIENT16, 0x10, b"\xe6\xe6\x00\x01")
    bad = bytearray(good)
    bad[-3] ^= 0xFF  # broken FCS
    dec = HdlcDecoder()
    frames = dec.feed(b"noise" + bytes(bad) + good[:5])
    frames += dec.feed(good[5:])
    assert len(frames) == 1
    assert (frames[0].destination, frames[0].source, frames[0].info) == (
        SERVER_1_0,
        CLIENT16,
        b"\xe6\xe6\x00\x01",
    )
    assert dec.dropped > 0


def test_addresses():
    assert framing.hdlc_address(1, 0, 2) == SERVER_1_0
    assert framing.parse_hdlc_address(framing.hdlc_address(1, 17, 4)) == (1, 17)
    assert framing.parse_hdlc_address(framing.hdlc_address(0x3FFF, 0x1234, 4)) == (0x3FFF, 0x1234)


def _decode(frames: list[bytes]) -> list[framing.HdlcFrame]:
    dec = HdlcDecoder()
    return [f for b in frames for f in dec.feed(b)]


def test_link_snrm_i_frames_segmentation_rr_disc():
    link = HdlcLink()
    # Given SNRM proposing 64-byte information fields
    snrm_info = bytes.fromhex(
        "818012 05 01 40 06 01 40 0704 00000001 0804 00000001".replace(" ", "")
    )
    (ua,) = _decode(
        link.on_frame(framing.HdlcFrame(SERVER_1_0, CLIENT16, 0x93, snrm_info, False))[0]
    )
    assert ua.control == 0x73 and b"\x05\x01\x40\x06\x01\x40" in ua.info
    # When an I-frame (N(S)=0) carries an APDU
    out, delivered = link.on_frame(
        framing.HdlcFrame(SERVER_1_0, CLIENT16, 0x10, b"\xe6\xe6\x00\xc0\x01", False)
    )
    assert out == [] and delivered == (16, b"\xc0\x01")
    # Then a 150-byte reply is cut into 64-byte segments, the next one sent on RR
    apdu = bytes(range(150))
    first = _decode(link.reply(apdu))[0]
    assert first.segmented and first.control == 0x30  # N(R)=1, P/F, N(S)=0
    assert first.info[:3] == b"\xe6\xe7\x00"
    got = first.info
    rr = 0x31  # RR, N(R)=1
    while True:
        (seg,) = _decode(link.on_frame(framing.HdlcFrame(SERVER_1_0, CLIENT16, rr, b"", False))[0])
        got += seg.info
        rr = 0x11 | (((seg.control >> 1) + 1) % 8) << 5
        if not seg.segmented:
            break
    assert got == b"\xe6\xe7\x00" + apdu
    (ua2,) = _decode(link.on_frame(framing.HdlcFrame(SERVER_1_0, CLIENT16, 0x53, b"", False))[0])
    assert ua2.control == 0x73 and link.disconnected
    (dm,) = _decode(link.on_frame(framing.HdlcFrame(SERVER_1_0, CLIENT16, 0x53, b"", False))[0])
    assert dm.control == 0x1F


def test_link_ignores_other_server_addresses():
    link = HdlcLink()
    other = framing.hdlc_address(5, 0, 2)
    assert link.on_frame(framing.HdlcFrame(other, CLIENT16, 0x93, b"", False)) == ([], None)


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("socat") is None, reason="socat not installed")
def test_serial_path_over_a_pty_pair():
    from gurux_dlms.objects import GXDLMSData, GXDLMSRegister

    from dlms2amqp.simulator import model
    from tests.helpers_sim import SIM_CMD, GuruxMeter, TtyStream, gurux_client

    tmp = tempfile.mkdtemp(prefix="d2a-pty-")
    a, b = os.path.join(tmp, "a"), os.path.join(tmp, "b")
    socat = subprocess.Popen(
        ["socat", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
        stderr=subprocess.DEVNULL,
    )
    sim = None
    try:
        deadline = time.monotonic() + 20
        while not (os.path.exists(a) and os.path.exists(b)):
            assert time.monotonic() < deadline, "socat did not create the pty pair"
            time.sleep(0.05)
        sim = subprocess.Popen(
            [*SIM_CMD, "--serial", a], stdout=subprocess.PIPE, text=True, stderr=sys.stderr
        )
        assert sim.stdout.readline().startswith("ready 1 meters on")
        c = gurux_client(32, "HDLC")
        with GuruxMeter(c, stream=TtyStream(b)) as m:
            m.connect()
            serial = m.read(GXDLMSData("0.0.96.1.0.255"), 2)
            reg = GXDLMSRegister("1.0.1.8.0.255")
            m.read(reg, 3)
            m.release()
        assert str(serial) == model.serial_number(0)
        assert int(reg.unit) == 30
        sim.terminate()
        assert sim.wait(15) == 0
    finally:
        if sim is not None and sim.poll() is None:
            sim.kill()
            sim.wait()
        socat.terminate()
        socat.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
