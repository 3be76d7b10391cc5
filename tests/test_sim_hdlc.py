# SPDX-License-Identifier: GPL-2.0-or-later
"""HDLC codec and link state machine of the simulator, with bytes; serial path over a pty."""

from __future__ import annotations

import calendar
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from dlms2amqp.simulator import framing, model
from dlms2amqp.simulator.apdu import SimOptions
from dlms2amqp.simulator.framing import HdlcDecoder, HdlcLink, crc16_x25, hdlc_encode

CLIENT16 = b"\x21"
SERVER_1 = b"\x03"  # the one-byte server address 1 (what Gurux's clients send for -s 1)
SERVER_1_1 = b"\x02\x03"  # logical 1, physical 1, two-byte form
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


def _gurux_address_bytes(value: int) -> bytes:
    from gurux_dlms.GXDLMS import GXDLMS

    return bytes(GXDLMS.getAddressBytes(value, 0))


@pytest.mark.parametrize(
    "logical, physical, size",
    [(1, 0, 2), (1, 1, 2), (1, 0x7F, 2), (1, 1, 4), (1, 0x3FFF, 4), (0x3FFF, 0x3FFE, 4)],
)
def test_address_bytes_equal_guruxs(logical, physical, size):
    from gurux_dlms import GXDLMSClient

    value = GXDLMSClient.getServerAddress(logical, physical, size)
    assert framing.hdlc_address(logical, physical, size) == _gurux_address_bytes(value)


@pytest.mark.parametrize("serial", [0, 1, 9999, 10000, 123456, 10000005, 99999999])
def test_serial_number_address_is_guruxs_formula(serial):
    from gurux_dlms import GXDLMSClient

    value = GXDLMSClient.getServerAddressFromSerialNumber(serial)
    mine = framing.hdlc_address(1, framing.serial_number_address(serial), 4)
    assert mine == _gurux_address_bytes(value)


def test_default_addresses_are_the_reference_meters():
    # one-byte 1, two-byte 1/1, the serial address, and the all-station address of each
    # form; nothing else (not 1/0, the form older readers sent for -s 1)
    serial = framing.hdlc_address(1, 123456 % 10000 + 1000, 4)
    got = framing.server_addresses(physical=SimOptions().hdlc_physical, serial=123456)
    assert got == {SERVER_1, b"\xff", SERVER_1_1, b"\x02\xff", serial}
    assert SERVER_1_0 in framing.server_addresses(physical=(0,), serial=123456)
    assert framing.server_addresses(("four-byte",), (5,)) == {
        framing.hdlc_address(1, 5, 4),
        framing.hdlc_address(1, 0x3FFF, 4),
    }


def _decode(frames: list[bytes]) -> list[framing.HdlcFrame]:
    dec = HdlcDecoder()
    return [f for b in frames for f in dec.feed(b)]


def _snrm_info(max_tx: int, max_rx: int, win_tx: int, win_rx: int) -> bytes:
    """The SNRM information field as IEC 62056-46 spells it (values from the client's side)."""

    def p(tag: int, v: int) -> bytes:
        return bytes((tag, 1, v)) if v < 256 else bytes((tag, 2)) + v.to_bytes(2, "big")

    body = p(5, max_tx) + p(6, max_rx) + b"\x07\x04" + win_tx.to_bytes(4, "big")
    body += b"\x08\x04" + win_rx.to_bytes(4, "big")
    return b"\x81\x80" + bytes((len(body),)) + body


def _link(max_info: int = 128, window: int = 1, dest: bytes = SERVER_1) -> HdlcLink:
    link = HdlcLink()
    info = _snrm_info(max_info, max_info, window, window)
    (ua,) = _decode(link.on_frame(framing.HdlcFrame(dest, CLIENT16, 0x93, info, False))[0])
    assert ua.control == 0x73
    return link


def _on(link: HdlcLink, control: int, info: bytes = b"", segmented: bool = False, dest=SERVER_1):
    out, delivered = link.on_frame(framing.HdlcFrame(dest, CLIENT16, control, info, segmented))
    return _decode(out), delivered


def test_link_snrm_i_frames_segmentation_rr_disc():
    link = HdlcLink(framing.server_addresses(physical=(0,)))
    # Given SNRM proposing 64-byte information fields
    snrm_info = bytes.fromhex(
        "818012 05 01 40 06 01 40 0704 00000001 0804 00000001".replace(" ", "")
    )
    (ua,) = _decode(
        link.on_frame(framing.HdlcFrame(SERVER_1_0, CLIENT16, 0x93, snrm_info, False))[0]
    )
    assert ua.control == 0x73 and ua.info == snrm_info  # agreed as proposed
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


@pytest.mark.parametrize(
    "forms, answered",
    [
        (("one-byte",), {SERVER_1}),
        (("two-byte",), {SERVER_1_1}),
        (("four-byte",), {framing.hdlc_address(1, 1, 4)}),
        (("serial",), {framing.hdlc_address(1, 1000 + 4567, 4)}),
        (framing.ADDRESS_FORMS, None),  # any: every address above
    ],
)
def test_link_answers_only_its_configured_forms(forms, answered):
    candidates = {
        SERVER_1,
        SERVER_1_1,
        SERVER_1_0,
        b"\x05",  # one-byte 2
        b"\x02\x05",  # two-byte 1/2
        framing.hdlc_address(1, 1, 4),
        framing.hdlc_address(1, 0, 4),
        framing.hdlc_address(1, 1000 + 4567, 4),  # serial 1234567
        framing.hdlc_address(1, 1000 + 4568, 4),  # another meter's serial address
    }
    if answered is None:
        answered = {SERVER_1, SERVER_1_1, framing.hdlc_address(1, 1, 4)}
        answered.add(framing.hdlc_address(1, 1000 + 4567, 4))
    addresses = framing.server_addresses(forms, (1,), 1234567)
    for dest in candidates:
        for control in (0x93, 0x53, 0x10, 0x11):  # SNRM, DISC, I, RR: any of them
            out = HdlcLink(addresses).on_frame(
                framing.HdlcFrame(dest, CLIENT16, control, b"\xe6\xe6\x00\x01", False)
            )
            if dest in answered:
                assert out[0], (dest.hex(), hex(control))
            else:  # no UA, no DM, no FRMR: silence
                assert out == ([], None), (dest.hex(), hex(control))


def test_link_ignores_a_client_address_of_more_than_one_byte():
    link = HdlcLink()
    assert link.on_frame(framing.HdlcFrame(SERVER_1, b"\x00\x21", 0x93, b"", False)) == ([], None)
    assert link.ignored == 1


def test_ua_carries_the_negotiated_window_and_information_field():
    # Given a client proposing 2030-byte fields and windows of 7: agreed as proposed
    link = HdlcLink()
    (ua,) = _decode(
        link.on_frame(
            framing.HdlcFrame(SERVER_1, CLIENT16, 0x93, _snrm_info(2030, 1024, 7, 3), False)
        )[0]
    )
    # UA values from the meter's side: transmit = the client's receive, and back
    assert ua.info == bytes.fromhex(
        "81801405020400060207ee07040000000308040000000 7".replace(" ", "")
    )
    assert (link.max_tx, link.max_rx, link.win_tx, link.win_rx) == (1024, 2030, 3, 7)
    # More than the meter can: capped to 2030 and 7; nothing proposed: the defaults 128 and 1
    (ua,) = _decode(
        link.on_frame(
            framing.HdlcFrame(SERVER_1, CLIENT16, 0x93, _snrm_info(4000, 3000, 8, 63), False)
        )[0]
    )
    assert ua.info == _snrm_info(2030, 2030, 7, 7)
    (ua,) = _decode(link.on_frame(framing.HdlcFrame(SERVER_1, CLIENT16, 0x93, b"", False))[0])
    assert ua.info == _snrm_info(128, 128, 1, 1)


def test_frames_over_255_bytes_have_the_11_bit_length_of_the_standard():
    # IEC 62056-46 frame format field: 1010 (type 3), S (segmentation), 11-bit length
    # counting every byte between the flags
    info = bytes(range(256)) * 7 + bytes(range(238))  # 2030 bytes
    for segmented in (False, True):
        frame = hdlc_encode(framing.hdlc_address(1, 1000, 4), CLIENT16, 0x10, info, segmented)
        n = len(frame) - 2
        assert n == 2 + 4 + 1 + 1 + 2 + 2030 + 2 == 2042
        assert frame[0] == frame[-1] == 0x7E
        assert (
            frame[1]
            == 0xA0 | (0x08 if segmented else 0) | (n >> 8)
            == (0xAF if segmented else 0xA7)
        )
        assert frame[2] == n & 0xFF == 0xFA
        hcs_end = 3 + 4 + 1 + 1
        assert int.from_bytes(frame[hcs_end : hcs_end + 2], "little") == crc16_x25(frame[1:hcs_end])
        assert frame[hcs_end + 2 : -3] == info
        assert int.from_bytes(frame[-3:-1], "little") == crc16_x25(frame[1:-3])
    with pytest.raises(framing.FramingError):
        hdlc_encode(SERVER_1, CLIENT16, 0x10, bytes(2040))


def test_link_sends_big_frames_the_client_allows():
    link = _link(max_info=2030)
    out, delivered = _on(link, 0x10, b"\xe6\xe6\x00\xc0\x01")
    apdu = bytes(5000)
    frames = link.reply(apdu)
    sizes = [len(f) for f in frames]
    assert sizes == [2030 + 11]  # window 1: one frame, then wait for RR
    (fr,) = _decode(frames)
    assert fr.segmented and len(fr.info) == 2030


def test_transmit_window_sends_n_frames_then_waits_and_goes_back_n():
    # Given window 3, 32-byte fields, and a reply of 8 segments (3 + 253 bytes)
    link = _link(max_info=32, window=3)
    _on(link, 0x10, b"\xe6\xe6\x00\xc0\x01")
    apdu = bytes(i % 251 for i in range(253))
    burst = _decode(link.reply(apdu))
    # Then three I-frames: N(S) 0, 1, 2, N(R) 1, the final bit on the third only
    assert [f.control for f in burst] == [0x20, 0x22, 0x34]
    assert all(f.segmented for f in burst)
    got = b"".join(f.info for f in burst)
    # When the client acknowledges all three (RR N(R)=3): the next three
    burst, _ = _on(link, 0x71)
    assert [f.control for f in burst] == [0x26, 0x28, 0x3A]
    got += b"".join(f.info for f in burst)
    # When it acknowledges only one of them (N(R)=4): go back N, send N(S) 4 and 5 again
    again, _ = _on(link, 0x91)
    assert [f.control for f in again] == [0x28, 0x3A]
    # REJ N(R)=5: only N(S) 5 again
    again, _ = _on(link, 0xB9)
    assert [f.control for f in again] == [0x3A]
    # RR N(R)=6: the last two segments, the last one unsegmented with the final bit
    burst, _ = _on(link, 0xD1)
    assert [(f.control, f.segmented) for f in burst] == [(0x2C, True), (0x3E, False)]
    got += b"".join(f.info for f in burst)
    assert got == b"\xe6\xe7\x00" + apdu
    # An N(R) the meter never sent is a frame reject
    (frmr,), _ = _on(link, 0x31)
    assert frmr.control == 0x97


def test_receive_window_takes_n_frames_before_acknowledging():
    # Given window 3 and 32-byte fields; the client sends a 100-byte request in 4 frames
    link = _link(max_info=32, window=3)
    req = b"\xe6\xe6\x00" + bytes(range(97))
    parts = [req[i : i + 32] for i in range(0, len(req), 32)]
    # frames of the window without the poll bit: no answer until the window is full
    assert _on(link, 0x00, parts[0], True) == ([], None)
    assert _on(link, 0x02, parts[1], True) == ([], None)
    (rr,), _ = _on(link, 0x04, parts[2], True)
    assert rr.control == 0x71  # RR, N(R)=3, F
    # the last frame completes the APDU
    out, delivered = _on(link, 0x16, parts[3])
    assert out == [] and delivered == (16, req[3:])
    # the poll bit asks for an answer at once
    (rr,), _ = _on(link, 0x18, parts[0], True)
    assert rr.control == 0xB1  # N(R)=5


def test_frame_longer_than_negotiated_is_rejected():
    link = _link(max_info=32)
    (frmr,), delivered = _on(link, 0x10, bytes(33))
    assert frmr.control == 0x97 and delivered is None


def test_lost_reply_is_sent_again_on_a_repeated_request():
    link = _link()
    _on(link, 0x10, b"\xe6\xe6\x00\xc0\x01")
    first = link.reply(b"\xc4\x01")
    # the client did not get it and repeats its I-frame (same N(S)=0)
    out, delivered = link.on_frame(
        framing.HdlcFrame(SERVER_1, CLIENT16, 0x10, b"\xe6\xe6\x00\xc0\x01", False)
    )
    assert out == first and delivered is None


def test_decoder_takes_a_2039_byte_frame_built_by_hand():
    # Given a frame laid out by hand after IEC 62056-46: 2 format + 1 + 1 address + 1 control
    # + 2 HCS + 2030 information + 2 FCS = 2039 = 0x7F7 bytes between the flags
    head = bytes((0xA7, 0xF7)) + b"\x03" + CLIENT16 + b"\x10"
    head += crc16_x25(head).to_bytes(2, "little")
    body = head + b"\xe6\xe6\x00" + bytes(2027)
    frame = b"\x7e" + body + crc16_x25(body).to_bytes(2, "little") + b"\x7e"
    assert len(frame) == 2041
    # Then the decoder yields it whole, and a link that agreed to 2030 takes it
    (fr,) = HdlcDecoder().feed(frame)
    assert len(fr.info) == 2030 and not fr.segmented
    _out, delivered = _link(max_info=2030).on_frame(fr)
    assert delivered == (16, bytes(2027))


# --- Gurux's client against the simulator over TCP ---------------------------------------
def _gurux(server_address: int, client_sap: int = 16, window: int = 1, max_info: int = 128):
    """Gurux's client as its example client sets it up for -s/-l/-n, -w and -f."""
    from gurux_dlms import GXDLMSClient
    from gurux_dlms.enums import Authentication, InterfaceType

    auth, pw = (Authentication.LOW, "00000000") if client_sap == 32 else (Authentication.NONE, None)
    c = GXDLMSClient(True, client_sap, server_address, auth, pw, InterfaceType.HDLC)
    c.hdlcSettings.windowSizeRX = c.hdlcSettings.windowSizeTX = window
    c.hdlcSettings.maxInfoRX = c.hdlcSettings.maxInfoTX = max_info
    return c


def _address(form: str, k: int) -> int:
    """The server address Gurux's example client makes of -s 1 / -l 1 / -n SERIAL."""
    from gurux_dlms import GXDLMSClient

    return {
        "one-byte 1": 1,  # -s 1
        "one-byte 2": 2,  # -s 2
        "two-byte 1/1": GXDLMSClient.getServerAddress(1, 1),  # -l 1 (after -s 1)
        "two-byte 1/0": GXDLMSClient.getServerAddress(1, 0),
        "four-byte 1/1": GXDLMSClient.getServerAddress(1, 1, 4),
        "serial": GXDLMSClient.getServerAddressFromSerialNumber(int(model.serial_number(k))),
        "other serial": GXDLMSClient.getServerAddressFromSerialNumber(
            int(model.serial_number(k + 1))
        ),
    }[form]


ADDRESS_FORMS = [
    "one-byte 1",
    "one-byte 2",
    "two-byte 1/1",
    "two-byte 1/0",
    "four-byte 1/1",
    "serial",
    "other serial",
]
#: simulator switches -> (the forms it answers, an answered form to probe it with)
SIM_ADDRESSING = {
    "default": ([], {"one-byte 1", "two-byte 1/1", "serial"}),
    "physical 0": (["-n", "0"], {"one-byte 1", "two-byte 1/0", "serial"}),
    "one-byte": (["--hdlc-address", "one-byte"], {"one-byte 1"}),
    "two-byte": (["--hdlc-address", "two-byte", "-n", "1"], {"two-byte 1/1"}),
    "four-byte": (["--hdlc-address", "four-byte", "-n", "1"], {"four-byte 1/1"}),
    "serial": (["--hdlc-address", "serial"], {"serial"}),
    "any": (
        ["--hdlc-address", "any", "-n", "1"],
        {"one-byte 1", "two-byte 1/1", "four-byte 1/1", "serial"},
    ),
}


@pytest.fixture(scope="module", params=sorted(SIM_ADDRESSING))
def addressed_sim(request):
    from tests.helpers_sim import running_simulator

    args, answered = SIM_ADDRESSING[request.param]
    with running_simulator(2, *args, interface="HDLC") as sim:
        sim.answered = answered
        yield sim


@pytest.mark.integration
@pytest.mark.parametrize("form", ADDRESS_FORMS)
def test_gurux_client_with_each_server_address_form(addressed_sim, form):
    import socket

    from gurux_dlms import GXByteBuffer, GXReplyData
    from gurux_dlms.objects import GXDLMSData

    from tests.helpers_sim import GuruxMeter

    sim, k = addressed_sim, 1  # meter 1: its serial address is not meter 0's
    c = _gurux(_address(form, k))
    if form in sim.answered:
        # Then Gurux's client connects, associates, reads and releases
        with GuruxMeter(c, sim.host, sim.port + k, timeout=10) as m:
            m.connect()
            assert str(m.read(GXDLMSData("0.0.96.1.0.255"), 2)) == model.serial_number(k)
            m.release()
        return
    # Then an SNRM to this address gets no answer at all, while an SNRM that follows it
    # on the same connection to an address the meter answers gets its UA, first and alone
    probe_form = sorted(sim.answered)[0]
    probe = _gurux(_address(probe_form, k))
    with socket.create_connection((sim.host, sim.port + k), timeout=10) as sock:
        sock.sendall(bytes(c.snrmRequest()) + bytes(probe.snrmRequest()))
        buf, reply = GXByteBuffer(), GXReplyData()
        raw = b""
        while not probe.getData(buf, reply, None):
            chunk = sock.recv(4096)
            assert chunk, "the simulator closed the connection"
            raw += chunk
            buf.set(chunk)
        probe.parseUAResponse(reply.data)
        frames = HdlcDecoder().feed(raw)
        assert [f.control for f in frames] == [0x73]
        assert frames[0].source == bytes(GXDLMS_address(probe.serverAddress))
        sock.settimeout(0.3)
        with pytest.raises(socket.timeout):
            sock.recv(4096)


def GXDLMS_address(value: int) -> bytes:
    return _gurux_address_bytes(value)


@pytest.mark.integration
@pytest.mark.parametrize("window", [1, 3, 7])
@pytest.mark.parametrize("max_info", [128, 247, 1024, 2030])
def test_gurux_client_window_and_information_field(window, max_info):
    from gurux_dlms.objects import GXDLMSProfileGeneric, GXDLMSRegister

    from tests.helpers_sim import GuruxMeter, running_simulator
    from tests.test_sim_gurux import _rows, _ts, _utc

    with running_simulator(1, interface="HDLC") as sim:
        c = _gurux(1, 32, window, max_info)
        with GuruxMeter(c, sim.host, sim.port, timeout=10) as m:
            m.connect()
            # Then the UA agreed to what Gurux's client proposed, both ways
            h = c.hdlcSettings
            assert (h.maxInfoTX, h.maxInfoRX) == (max_info, max_info)
            assert (h.windowSizeTX, h.windowSizeRX) == (window, window)
            reg = GXDLMSRegister("1.0.1.8.0.255")
            m.read(reg, 3)
            assert int(reg.unit) == 30
            pg = GXDLMSProfileGeneric("1.0.99.1.0.255")
            m.read(pg, 3)
            # Gurux's client cannot take more than one frame per window (its RR's N(R)
            # counts one frame, and it drops the third frame of a window): with a window
            # over 1 it reads an hour (about 160 bytes, one frame from 247 on); a day
            # (about 2.7 kB, several frames) with window 1. test_transmit_window_* proves
            # multi-frame windows byte by byte.
            start = _utc(2026, 2, 28, 12)
            end = _utc(2026, 3, 1, 12) if window == 1 else _utc(2026, 2, 28, 13)
            if window == 1 or max_info >= 247:
                reply = m.request(c.readRowsByRange(pg, start, end))
                assert not reply.error
                rows = model.load_profile_rows(0, _ts(start), _ts(end))
                assert _rows(reply.value) == rows and len(rows) in (5, 97)
            m.release()


def _frame_by_hand(dest: bytes, control: int, info: bytes, source: bytes = CLIENT16) -> bytes:
    """One flag-delimited frame laid out after IEC 62056-46, without framing.hdlc_encode."""
    n = 2 + len(dest) + 1 + 1 + 2 + len(info) + 2
    head = bytes((0xA0 | n >> 8, n & 0xFF)) + dest + source + bytes((control,))
    head += crc16_x25(head).to_bytes(2, "little")
    body = head + info
    return b"\x7e" + body + crc16_x25(body).to_bytes(2, "little") + b"\x7e"


def _ber_len(n: int) -> bytes:
    return bytes((n,)) if n < 0x80 else b"\x82" + n.to_bytes(2, "big")


@pytest.mark.integration
def test_a_client_frame_over_255_bytes_over_tcp():
    import socket

    from tests.helpers_sim import running_simulator

    # Given an AARQ of 362 bytes (Low, with a 300-byte implementation-information field,
    # BER lengths as X.690 has them) in one I-frame of 374 bytes, after an SNRM agreeing 2030
    impl = b"dlms2amqp test " * 20
    body = bytes.fromhex("a109060760857405080101 8a020780 8b0760857405080201".replace(" ", ""))
    body += b"\xac\x0a\x80\x0800000000" + b"\x9d" + _ber_len(len(impl)) + impl
    body += bytes.fromhex("be10040e01000000065f1f040000181dffff")
    aarq = b"\x60" + _ber_len(len(body)) + body
    client32 = b"\x41"
    frame = _frame_by_hand(SERVER_1, 0x10, b"\xe6\xe6\x00" + aarq, client32)
    assert len(aarq) == 362 and len(frame) == 2 + 374 and frame[1:3] == b"\xa1\x76"
    with running_simulator(1, interface="HDLC") as sim:
        with socket.create_connection((sim.host, sim.port), timeout=10) as sock:
            sock.sendall(_frame_by_hand(SERVER_1, 0x93, _snrm_info(2030, 2030, 1, 1), client32))
            dec, got = HdlcDecoder(), []
            while len(got) < 1:
                got += dec.feed(sock.recv(4096))
            assert got[0].control == 0x73 and got[0].info == _snrm_info(2030, 2030, 1, 1)
            sock.sendall(frame)
            got = []
            while len(got) < 1:
                got += dec.feed(sock.recv(4096))
    # Then the meter accepted the association in an I-frame N(R)=1, N(S)=0
    (aare,) = got
    assert aare.control == 0x30 and aare.info[:4] == b"\xe6\xe7\x00\x61"
    assert b"\xa2\x03\x02\x01\x00" in aare.info  # result: accepted


def _reader(sim, conn: str, obis: str = "1.0.1.8.0.255", k: int = 1, **dates) -> dict:
    import orjson

    from dlms2amqp.meter.reader import ReaderOptions, execute
    from dlms2amqp.request import parse_request

    body = {
        "MsgID": "t1",
        "Cmd": "READ",
        "ObisCode": obis,
        "ConnectionString": f"-h {sim.host} -p {sim.port + k} -i HDLC -c 32 -a Low "
        f"-P 00000000 {conn}",
        **dates,
    }
    options = ReaderOptions(frame_timeout=2, request_timeout=20)
    return execute(parse_request(orjson.dumps(body)), options, None)


@pytest.mark.integration
@pytest.mark.parametrize(
    "sim_args, answered",
    [
        ([], {"-s 1", "-l 1", "-n 10000001"}),
        (["--hdlc-address", "one-byte"], {"-s 1"}),
        (["--hdlc-address", "two-byte,serial", "-n", "1"], {"-l 1", "-n 10000001"}),
    ],
)
def test_reader_address_options_against_each_configuration(sim_args, answered):
    from tests.helpers_sim import running_simulator

    with running_simulator(2, *sim_args, interface="HDLC") as sim:
        for conn in ("-s 1", "-l 1", "-n 10000001", "-n 10000000", "-s 2"):
            reply = _reader(sim, conn)
            if conn in answered:
                assert reply["Status"] == "ok", (conn, reply["Error"])
            else:
                assert reply["Status"] == "notok", conn
                assert reply["Error"].startswith("timeout during HDLC connection (SNRM)"), conn


@pytest.mark.integration
@pytest.mark.parametrize(
    "conn",
    ["-f 1024", "-f 2030", "-f 2030 -w 7", "-f 128 -w 2", "-f 128 -w 3", "-f 247 -w 7"],
)
def test_reader_reads_big_frames_and_whole_windows(conn):
    from tests.helpers_sim import running_simulator

    # a week of load profile: 19 kB in frames of up to 2 kB, or in windows of 2, 3, 7
    # frames the meter sends before it waits for the reader's RR
    start, end = "2026-03-01T00:00:00Z", "2026-03-08T00:00:00Z"
    with running_simulator(2, interface="HDLC") as sim:
        reply = _reader(sim, conn, "1.0.99.1.0.255", dtFrom=start, dtTo=end)
    assert reply["Status"] == "ok", reply["Error"]
    t0 = calendar.timegm(time.strptime(start, "%Y-%m-%dT%H:%M:%SZ"))
    t1 = calendar.timegm(time.strptime(end, "%Y-%m-%dT%H:%M:%SZ"))
    rows = model.load_profile_rows(1, t0, t1)
    assert len(reply["DataRecords"]) == 3 * len(rows) == 3 * (7 * 96 + 1)
    values = [int(r["Value"]) for r in reply["DataRecords"]]
    assert values == [v for row in rows for v in row[1:]]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--hdlc-address", "three-byte"], "use one-byte, two-byte, four-byte, serial or any"),
        (["--hdlc-address", ""], "use one-byte, two-byte, four-byte, serial or any"),
        (["-n", "x"], "is not an HDLC physical address (0..16381)"),
        (["-n", "16382"], "is not an HDLC physical address (0..16381)"),
        (["-n", "200"], "-n 200 does not fit a two-byte HDLC address (0..127)"),
        (["--hdlc-window", "8"], "'8' is not a number from 1 to 7"),
        (["--hdlc-max-info", "2031"], "'2031' is not a number from 32 to 2030"),
    ],
)
def test_bad_address_switches_are_refused_with_the_reason(args, message):
    from tests.helpers_sim import SIM_CMD

    r = subprocess.run([*SIM_CMD, "-i", "HDLC", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.integration
def test_four_byte_physical_address_over_127():
    from gurux_dlms import GXDLMSClient
    from gurux_dlms.objects import GXDLMSData

    from tests.helpers_sim import GuruxMeter, running_simulator

    args = ("--hdlc-address", "four-byte", "-n", "0x1234")
    with running_simulator(1, *args, interface="HDLC") as sim:
        c = _gurux(GXDLMSClient.getServerAddress(1, 0x1234))
        with GuruxMeter(c, sim.host, sim.port, timeout=10) as m:
            m.connect()
            assert str(m.read(GXDLMSData("0.0.96.1.0.255"), 2)) == model.serial_number(0)
            m.release()


@pytest.mark.integration
def test_meter_limits_cap_what_the_client_proposes():
    from gurux_dlms.objects import GXDLMSProfileGeneric

    from tests.helpers_sim import GuruxMeter, running_simulator
    from tests.test_sim_gurux import _rows, _ts, _utc

    # Given a meter that agrees to at most window 1 and 128-byte fields
    args = ("--hdlc-window", "1", "--hdlc-max-info", "128")
    with running_simulator(2, *args, interface="HDLC") as sim:
        # When Gurux's client proposes window 7 and 2030 bytes
        c = _gurux(1, 32, 7, 2030)
        with GuruxMeter(c, sim.host, sim.port, timeout=10) as m:
            m.connect()
            # Then the UA says 128 and 1, and a day of profile reads back in small frames
            h = c.hdlcSettings
            assert (h.maxInfoTX, h.maxInfoRX, h.windowSizeTX, h.windowSizeRX) == (128, 128, 1, 1)
            start, end = _utc(2026, 2, 28, 12), _utc(2026, 3, 1, 12)
            pg = GXDLMSProfileGeneric("1.0.99.1.0.255")
            m.read(pg, 3)
            reply = m.request(c.readRowsByRange(pg, start, end))
            assert _rows(reply.value) == model.load_profile_rows(0, _ts(start), _ts(end))
            m.release()
        # and our reader with -f 2030 -w 7 reads the same meter
        start, end = "2026-03-01T00:00:00Z", "2026-03-02T00:00:00Z"
        reply = _reader(sim, "-f 2030 -w 7", "1.0.99.1.0.255", dtFrom=start, dtTo=end)
        assert reply["Status"] == "ok", reply["Error"]
        assert len(reply["DataRecords"]) == 3 * 97


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
