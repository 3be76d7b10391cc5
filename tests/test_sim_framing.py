# SPDX-License-Identifier: GPL-2.0-or-later
"""Unit tests of the simulator's codecs and APDU layer, with bytes."""

from __future__ import annotations

import time

import pytest

from dlms2amqp.simulator import axdr_enc as ax
from dlms2amqp.simulator import cosem, framing, model
from dlms2amqp.simulator.apdu import Session, SimOptions


def test_wrapper_roundtrip_and_split_feed():
    frame = framing.wrapper_encode(16, 1, b"\xc0\x01\xc1")
    assert frame == bytes.fromhex("0001 0010 0001 0003 c001c1")
    dec = framing.WrapperDecoder()
    # Given the frame split at every byte, the decoder yields it exactly once
    out = []
    for i in range(len(frame)):
        out += dec.feed(frame[i : i + 1])
    assert [(f.source, f.destination, f.apdu) for f in out] == [(16, 1, b"\xc0\x01\xc1")]
    two = dec.feed(frame + frame)
    assert len(two) == 2 and not dec.buf


def test_wrapper_rejects_garbage():
    with pytest.raises(framing.FramingError):
        framing.WrapperDecoder().feed(b"\x7e\xa0\x07\x03\x21\x93\x0f\x01")


@pytest.mark.parametrize("n", [0, 1, 127, 128, 255, 256, 65535, 65536])
def test_lengths(n):
    enc = ax.enc_len(n)
    assert ax.dec_len(enc + b"rest", 0) == (n, len(enc))


def test_datetime_roundtrip_with_offset():
    t = 1767225600  # 2026-01-01T00:00:00Z
    raw = ax.datetime_raw(t, 60)
    # local 01:00, deviation -60 (local + deviation = UTC), Thursday = 4
    assert raw == bytes.fromhex("07ea 01 01 04 01 00 00 00 ffc4 00")
    assert ax.parse_datetime(raw) == t
    unspecified = raw[:9] + b"\x80\x00" + raw[11:]
    assert ax.parse_datetime(unspecified, 60) == t


def test_decode_selective_access_entry():
    data = ax.structure([ax.uint32(1), ax.uint32(3), ax.uint16(1), ax.uint16(0)])
    assert ax.decode(data) == ([1, 3, 1, 0], len(data))


def _session(pw: bytes = b"00000000") -> Session:
    return Session(cosem.builtin_device(pw), cosem.MeterState(4), SimOptions())


AARQ_LOW = bytes.fromhex(
    "6036a1090607608574050801018a0207808b0760857405080201ac0a80083030303030303030"
    "be10040e01000000065f1f040000181dffff"
)


def test_aarq_low_accepted_and_rlre_encoding():
    s = _session()
    aare = s.handle(32, AARQ_LOW)
    # result accepted (a2 03 02 01 00), diagnostic null, InitiateResponse with vaa-name 7
    assert aare[0] == 0x61 and b"\xa2\x03\x02\x01\x00" in aare
    assert aare.endswith(b"\xff\xff\x00\x07")
    # conformance: what the client proposed (00181d) and the simulator supports
    assert b"\x5f\x1f\x04\x00\x00\x10\x15" in aare
    assert s.handle(32, b"\x62\x03\x80\x01\x00") == b"\x63\x03\x80\x01\x00"


def test_aarq_wrong_password_rejected_with_authentication_failure():
    aare = _session(b"secret!!").handle(32, AARQ_LOW)
    assert b"\xa2\x03\x02\x01\x01" in aare  # rejected-permanent
    assert b"\xa3\x05\xa1\x03\x02\x01\x0d" in aare  # acse-service-user 13


def test_get_before_association_is_refused():
    assert _session().handle(32, bytes.fromhex("c001c1000301000108 00ff0200")) == b"\xd8\x01\x01"


def test_get_register_and_block_transfer():
    s = _session()
    s.handle(32, AARQ_LOW)
    reply = s.handle(32, bytes.fromhex("c001c10003010001080 0ff0300".replace(" ", "")))
    assert reply == bytes.fromhex("c401c1 00 0202 0f00 161e".replace(" ", ""))
    # a 31-day range with a 256-byte client PDU -> GET-Response-With-Datablock
    s.client_max_pdu = 256
    sel = ax.structure(
        [
            ax.structure([ax.uint16(8), ax.octet_string(cosem.LN_CLOCK), ax.int8(2), ax.uint16(0)]),
            ax.datetime_data(1767225600),
            ax.datetime_data(1767225600 + 31 * 86400),
            ax.array([]),
        ]
    )
    req = b"\xc0\x01\xc1\x00\x07" + cosem.LN_LOAD + b"\x02\x01\x01" + sel
    data = b""
    reply = s.handle(32, req)
    block = 1
    while True:
        assert reply[:3] == b"\xc4\x02\xc1" and len(reply) <= 256
        assert int.from_bytes(reply[4:8], "big") == block
        n, pos = ax.dec_len(reply, 9)
        data += reply[pos : pos + n]
        if reply[3]:
            break
        reply = s.handle(32, b"\xc0\x02\xc1" + block.to_bytes(4, "big"))
        block += 1
    assert block > 100
    rows, end = ax.decode(data)
    assert end == len(data)
    got = [(ax.parse_datetime(r[0]), *r[1:]) for r in rows]
    assert got == model.load_profile_rows(4, 1767225600, 1767225600 + 31 * 86400)


def _get_profile(s: Session, ln: bytes, selector: int, params: bytes) -> list:
    req = b"\xc0\x01\xc1\x00\x07" + ln + b"\x02\x01" + bytes((selector,)) + params
    reply = s.handle(32, req)
    assert reply[:4] == b"\xc4\x01\xc1\x00", reply[:6].hex()
    rows, _ = ax.decode(reply, 4)
    return rows


def test_entry_selection_with_columns():
    # Given meter 4 associated as client 32
    s = _session()
    s.handle(32, AARQ_LOW)
    # When the last two entries are read, columns 3..4 (import, export)
    e = model.LOAD_ENTRIES
    params = ax.structure([ax.uint32(e - 1), ax.uint32(e), ax.uint16(3), ax.uint16(4)])
    before = model.last_load_boundary(int(time.time()))
    rows = _get_profile(s, cosem.LN_LOAD, 2, params)
    # Then two rows of two columns, the newest at the last quarter-hour
    assert len(rows) == 2 and all(len(r) == 2 for r in rows)
    candidates = [
        [[model.import_wh(4, t), model.export_wh(4, t)] for t in (last - 900, last)]
        for last in (before, before + 900)
    ]
    assert rows in candidates


def test_range_selection_with_selected_values():
    s = _session()
    s.handle(32, AARQ_LOW)
    t0 = 1767225600
    params = ax.structure(
        [
            ax.structure([ax.uint16(8), ax.octet_string(cosem.LN_CLOCK), ax.int8(2), ax.uint16(0)]),
            ax.datetime_data(t0),
            ax.datetime_data(t0 + 3600),
            ax.array(
                [
                    ax.structure(
                        [ax.uint16(8), ax.octet_string(cosem.LN_CLOCK), ax.int8(2), ax.uint16(0)]
                    ),
                    ax.structure(
                        [ax.uint16(1), ax.octet_string(cosem.LN_STATUS), ax.int8(2), ax.uint16(0)]
                    ),
                ]
            ),
        ]
    )
    rows = _get_profile(s, cosem.LN_LOAD, 1, params)
    assert [(ax.parse_datetime(r[0]), r[1]) for r in rows] == [
        (t, st) for t, st, _i, _e in model.load_profile_rows(4, t0, t0 + 3600)
    ]


def test_public_client_and_unknown_object():
    s = _session()
    aarq16 = bytes.fromhex("601da109060760857405080101be10040e01000000065f1f040000181dffff")
    assert b"\xa2\x03\x02\x01\x00" in s.handle(16, aarq16)
    # energy register: read-write-denied; unknown object: object-undefined
    assert s.handle(16, b"\xc0\x01\xc1\x00\x03" + cosem.LN_IMPORT + b"\x02\x00") == (
        b"\xc4\x01\xc1\x01\x03"
    )
    assert s.handle(16, b"\xc0\x01\xc1\x00\x03\x01\x02\x03\x04\x05\x06\x02\x00") == (
        b"\xc4\x01\xc1\x01\x04"
    )
    # the logical device name is public
    ldn = s.handle(16, b"\xc0\x01\xc1\x00\x01" + cosem.LN_LDN + b"\x02\x00")
    assert ldn == b"\xc4\x01\xc1\x00\x09\x10" + model.logical_device_name(4)
