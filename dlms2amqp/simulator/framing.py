# SPDX-License-Identifier: GPL-2.0-or-later
"""WRAPPER and HDLC codecs of the simulator: pure functions, bytes in, bytes out.

WRAPPER (IEC 62056-47): 8-byte header ``version(=1) source-wPort
destination-wPort length`` followed by the APDU.

HDLC (IEC 62056-46) is in ``HdlcCodec`` below: frame format type 3, CRC-16/X.25
for HCS and FCS, one-byte client address, one/two/four-byte server address.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Optional

_WRAPPER = struct.Struct(">HHHH")


class FramingError(ValueError):
    """The byte stream is not a valid frame; the connection should be dropped."""


@dataclass
class WrapperFrame:
    source: int
    destination: int
    apdu: bytes


def wrapper_encode(source: int, destination: int, apdu: bytes) -> bytes:
    """One WRAPPER frame."""
    return _WRAPPER.pack(1, source, destination, len(apdu)) + apdu


class WrapperDecoder:
    """Cuts a TCP byte stream into WRAPPER frames."""

    __slots__ = ("buf", "max_len")

    def __init__(self, max_len: int = 0xFFFF):
        self.buf = bytearray()
        self.max_len = max_len

    def feed(self, data: bytes) -> list[WrapperFrame]:
        """Add received bytes; return the complete frames (FramingError on garbage)."""
        buf = self.buf
        buf += data
        out = []
        while len(buf) >= 8:
            version, src, dst, n = _WRAPPER.unpack_from(buf, 0)
            if version != 1:
                raise FramingError(f"WRAPPER version {version} (expected 1)")
            if n > self.max_len:
                raise FramingError(f"WRAPPER length {n} too large")
            if len(buf) < 8 + n:
                break
            out.append(WrapperFrame(src, dst, bytes(buf[8 : 8 + n])))
            del buf[: 8 + n]
        return out


# --- HDLC ---------------------------------------------------------------------------
FLAG = 0x7E
SNRM = 0x83
UA = 0x63
DISC = 0x43
DM = 0x0F
UI = 0x03
FRMR = 0x87
PF = 0x10
LLC_REQUEST = b"\xe6\xe6\x00"
LLC_RESPONSE = b"\xe6\xe7\x00"
DEFAULT_MAX_INFO = 128
SERVER_MAX_INFO = 2030


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x8408 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc_table()


def crc16_x25(data: bytes) -> int:
    """CRC-16/X.25 (HDLC HCS and FCS): reflected 0x1021, init and xorout 0xFFFF."""
    crc = 0xFFFF
    table = _CRC_TABLE
    for b in data:
        crc = (crc >> 8) ^ table[(crc ^ b) & 0xFF]
    return crc ^ 0xFFFF


def hdlc_address(upper: int, lower: int = 0, size: int = 1) -> bytes:
    """Encode an HDLC address of 1, 2 or 4 bytes (LSB of the last byte set)."""
    if size == 1:
        return bytes(((upper << 1) | 1,))
    if size == 2:
        return bytes((upper << 1 & 0xFE, (lower << 1) | 1))
    return bytes(
        (
            (upper >> 7) << 1 & 0xFE,
            (upper & 0x7F) << 1,
            (lower >> 7) << 1 & 0xFE,
            ((lower & 0x7F) << 1) | 1,
        )
    )


def parse_hdlc_address(raw: bytes) -> tuple[int, int]:
    """(upper, lower) of a 1, 2 or 4-byte server address; a client address has upper only."""
    if len(raw) == 1:
        return raw[0] >> 1, 0
    if len(raw) == 2:
        return raw[0] >> 1, raw[1] >> 1
    if len(raw) == 4:
        return ((raw[0] >> 1) << 7) | (raw[1] >> 1), ((raw[2] >> 1) << 7) | (raw[3] >> 1)
    raise FramingError(f"HDLC address of {len(raw)} bytes")


@dataclass
class HdlcFrame:
    destination: bytes  # raw address bytes
    source: bytes
    control: int
    info: bytes
    segmented: bool


def hdlc_encode(
    destination: bytes, source: bytes, control: int, info: bytes = b"", segmented: bool = False
) -> bytes:
    """One HDLC frame type 3 with flags, HCS (when there is information) and FCS."""
    n = 2 + len(destination) + len(source) + 1 + (2 + len(info) if info else 0) + 2
    if n > 0x7FF:
        raise FramingError("HDLC frame too long")
    head = bytes((0xA0 | (0x08 if segmented else 0) | (n >> 8), n & 0xFF)) + destination + source
    head += bytes((control,))
    if info:
        head += crc16_x25(head).to_bytes(2, "little") + info
    return b"\x7e" + head + crc16_x25(head).to_bytes(2, "little") + b"\x7e"


def _split_address(buf: bytes, pos: int, end: int) -> tuple[bytes, int]:
    start = pos
    while pos < end:
        if buf[pos] & 1:
            return bytes(buf[start : pos + 1]), pos + 1
        pos += 1
        if pos - start > 4:
            break
    raise FramingError("bad HDLC address")


class HdlcDecoder:
    """Cuts a byte stream into HDLC frames; frames with a bad HCS/FCS are dropped."""

    __slots__ = ("buf", "dropped")

    def __init__(self):
        self.buf = bytearray()
        self.dropped = 0

    def feed(self, data: bytes) -> list[HdlcFrame]:
        buf = self.buf
        buf += data
        out: list[HdlcFrame] = []
        while True:
            # resynchronise on a flag followed by a frame format byte
            i = 0
            while i < len(buf) and not (
                buf[i] == FLAG and (i + 1 >= len(buf) or buf[i + 1] & 0xF0 == 0xA0)
            ):
                i += 1
            if i:
                self.dropped += i
                del buf[:i]
            if len(buf) < 3:
                return out
            n = ((buf[1] & 0x07) << 8) | buf[2]
            if n < 7:
                del buf[:1]
                self.dropped += 1
                continue
            if len(buf) < n + 2:
                return out
            if buf[n + 1] != FLAG:
                del buf[:1]
                self.dropped += 1
                continue
            frame = bytes(buf[1 : n + 1])
            del buf[: n + 1]  # keep the closing flag: it may open the next frame
            try:
                fr = self._parse(frame)
            except FramingError:
                self.dropped += 1
                continue
            out.append(fr)

    @staticmethod
    def _parse(frame: bytes) -> HdlcFrame:
        end = len(frame)
        if crc16_x25(frame[:-2]) != int.from_bytes(frame[-2:], "little"):
            raise FramingError("bad FCS")
        dest, pos = _split_address(frame, 2, end)
        src, pos = _split_address(frame, pos, end)
        control = frame[pos]
        pos += 1
        info = b""
        if pos < end - 2:
            if crc16_x25(frame[:pos]) != int.from_bytes(frame[pos : pos + 2], "little"):
                raise FramingError("bad HCS")
            info = frame[pos + 2 : end - 2]
        return HdlcFrame(dest, src, control, info, bool(frame[0] & 0x08))


def _ua_info(max_tx: int, max_rx: int) -> bytes:
    def param(tag: int, v: int) -> bytes:
        return bytes((tag, 1, v)) if v < 0x100 else bytes((tag, 2)) + v.to_bytes(2, "big")

    body = param(5, max_tx) + param(6, max_rx) + b"\x07\x04\x00\x00\x00\x01\x08\x04\x00\x00\x00\x01"
    return b"\x81\x80" + bytes((len(body),)) + body


class HdlcLink:
    """Server side of the HDLC data link (one connection), free of I/O.

    ``on_frame`` returns ``(frames_to_send, delivered)`` where ``delivered`` is
    ``(client_sap, apdu)`` once a complete APDU arrived; ``reply(apdu)`` returns the
    frames to send now (the first segment; the others follow the client's RR).
    ``disconnected`` turns true on DISC/SNRM so the caller resets the association.
    """

    def __init__(self, logical: int = 1, physical: int = 0, max_info: int = SERVER_MAX_INFO):
        self.logical = logical
        self.physical = physical
        self.max_info_limit = max_info
        self.connected = False
        self.disconnected = False
        self.vs = 0
        self.vr = 0
        self.max_tx = DEFAULT_MAX_INFO
        self.max_rx = DEFAULT_MAX_INFO
        self.rx = bytearray()
        self.pending: list[bytes] = []  # segments of the reply still to send
        self.last_sent: list[bytes] = []
        self.client_addr = b""
        self.server_addr = b""

    def _accepts(self, raw: bytes) -> bool:
        upper, lower = parse_hdlc_address(raw)
        if len(raw) == 1:
            return upper in (self.logical, 0x7F)
        return upper == self.logical and lower in (self.physical, 0x3FFF, 0x7F)

    def _frame(self, control: int, info: bytes = b"", segmented: bool = False) -> bytes:
        return hdlc_encode(self.client_addr, self.server_addr, control, info, segmented)

    def on_frame(self, fr: HdlcFrame) -> tuple[list[bytes], Optional[tuple[int, bytes]]]:
        try:
            if not self._accepts(fr.destination):
                return [], None
        except FramingError:
            return [], None
        self.client_addr = fr.source
        self.server_addr = fr.destination
        c = fr.control
        if c & 0xEF == SNRM:
            self._negotiate(fr.info)
            self.connected = True
            self.disconnected = True
            self.vs = self.vr = 0
            self.rx.clear()
            self.pending = []
            return [self._frame(UA | PF, _ua_info(self.max_tx, self.max_rx))], None
        if c & 0xEF == DISC:
            was = self.connected
            self.connected = False
            self.disconnected = True
            self.pending = []
            return [self._frame((UA if was else DM) | PF)], None
        if not self.connected:
            return [self._frame(DM | PF)], None
        if c & 1 == 0:  # I-frame
            ns = (c >> 1) & 7
            if ns != self.vr:
                # a retransmission: our answer was lost, send it again
                if ns == (self.vr - 1) % 8 and self.last_sent:
                    return list(self.last_sent), None
                return [self._frame(0x01 | PF | (self.vr << 5))], None
            self.vr = (self.vr + 1) % 8
            self.rx += fr.info
            if fr.segmented:
                return [self._frame(0x01 | PF | (self.vr << 5))], None
            data = bytes(self.rx)
            self.rx.clear()
            if data[:3] == LLC_REQUEST:
                data = data[3:]
            return [], (fr.source[0] >> 1, data)
        if c & 0x0F == 0x01:  # RR
            nr = (c >> 5) & 7
            if self.pending:
                return [self._next_segment()], None
            if nr != self.vs and self.last_sent:
                return list(self.last_sent), None
            return [self._frame(0x01 | PF | (self.vr << 5))], None
        return [self._frame(FRMR | PF)], None

    def _negotiate(self, info: bytes) -> None:
        self.max_tx = self.max_rx = DEFAULT_MAX_INFO
        if len(info) < 3 or info[0] != 0x81 or info[1] != 0x80:
            return
        pos = 3
        while pos + 2 <= len(info):
            tag, n = info[pos], info[pos + 1]
            v = int.from_bytes(info[pos + 2 : pos + 2 + n], "big")
            pos += 2 + n
            if tag == 5:  # client max info TX = what we receive
                self.max_rx = max(32, min(v, self.max_info_limit))
            elif tag == 6:  # client max info RX = what we may send
                self.max_tx = max(32, min(v, self.max_info_limit))

    def reply(self, apdu: bytes) -> list[bytes]:
        data = LLC_RESPONSE + apdu
        size = self.max_tx
        self.pending = [data[i : i + size] for i in range(0, len(data), size)]
        return [self._next_segment()]

    def _next_segment(self) -> bytes:
        seg = self.pending.pop(0)
        control = (self.vr << 5) | PF | (self.vs << 1)
        self.vs = (self.vs + 1) % 8
        frame = self._frame(control, seg, segmented=bool(self.pending))
        self.last_sent = [frame]
        return frame
