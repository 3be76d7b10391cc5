# SPDX-License-Identifier: GPL-2.0-or-later
"""Arbitrary bytes never crash the simulator's codecs or APDU layer."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dlms2amqp.simulator import cosem, framing
from dlms2amqp.simulator.apdu import Session, SimOptions

DEVICE = cosem.builtin_device()
AARQ_LOW = bytes.fromhex(
    "6036a1090607608574050801018a0207808b0760857405080201ac0a80083030303030303030"
    "be10040e01000000065f1f040000181dffff"
)
PREFIXES = [b"", b"\x60", b"\xc0\x01\xc1", b"\xc0\x02\xc1", b"\xc3\x01\xc1", b"\x62", b"\xc8"]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(PREFIXES), st.binary(max_size=80), st.booleans())
def test_session_answers_or_stays_silent(prefix, tail, associate):
    s = Session(DEVICE, cosem.MeterState(3, b"D2A\x00\x00\x00\x00\x03"), SimOptions())
    if associate:
        s.handle(32, AARQ_LOW)
    reply = s.handle(32, prefix + tail)
    assert reply is None or (isinstance(reply, bytes) and len(reply) >= 1)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_hdlc_decoder_and_link_never_raise(data):
    dec = framing.HdlcDecoder()
    link = framing.HdlcLink()
    for fr in dec.feed(data):
        out, _delivered = link.on_frame(fr)
        assert all(f[0] == 0x7E and f[-1] == 0x7E for f in out)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_wrapper_decoder_raises_only_framing_errors(data):
    try:
        framing.WrapperDecoder().feed(data)
    except framing.FramingError:
        pass
