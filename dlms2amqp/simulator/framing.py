# SPDX-License-Identifier: GPL-2.0-or-later
"""WRAPPER and HDLC codecs of the simulator: pure functions, bytes in, bytes out.

WRAPPER (IEC 62056-47): 8-byte header ``version(=1) source-wPort
destination-wPort length`` followed by the APDU.

HDLC (IEC 62056-46) below: ``hdlc_encode``/``HdlcDecoder`` for frame format type 3
(11-bit length, segmentation bit), CRC-16/X.25 for HCS and FCS, one-byte client
address, one/two/four-byte server address; ``server_addresses`` for the address forms
a meter answers; ``HdlcLink`` for the link a meter runs (SNRM/UA negotiation, windows,
segmentation, go-back-N).
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


# --- HDLC server addresses ------------------------------------------------------------
#: The forms a meter can be configured to answer (``dlms2amqp-sim --hdlc-address``).
ADDRESS_FORMS = ("one-byte", "two-byte", "four-byte", "serial")
#: What Gurux's C reference meter answers: the one-byte address 1, the two-byte address
#: logical 1 / physical 1, and its serial-number address.
DEFAULT_FORMS = ("one-byte", "two-byte", "serial")
LOGICAL_DEVICE = 1  # the management logical device: the only one a simulated meter has
ALL_STATIONS_1 = 0x7F  # all-station (broadcast) value of a one-byte address half
ALL_STATIONS_2 = 0x3FFF  # ... of a two-byte half (four-byte address)


def serial_number_address(serial: int) -> int:
    """Lower (physical) HDLC address of the serial-number form: ``serial % 10000 + 1000``.

    Gurux's clients (``-n SERIAL``) use this default formula with logical device 1 in
    the upper half, which makes a four-byte address.
    """
    return serial % 10000 + 1000


def server_addresses(
    forms: tuple[str, ...] = DEFAULT_FORMS,
    physical: tuple[int, ...] = (1,),
    serial: int = 0,
    logical: int = LOGICAL_DEVICE,
) -> frozenset[bytes]:
    """The raw destination addresses a meter answers, for ``HdlcLink``.

    Each configured form also answers its all-station (broadcast) address, as meters do.
    A frame to any other address gets no answer at all (no UA, no DM).
    """
    out: set[bytes] = set()
    for form in forms:
        if form == "one-byte":
            out |= {hdlc_address(logical), hdlc_address(ALL_STATIONS_1)}
        elif form == "two-byte":
            out |= {hdlc_address(logical, p, 2) for p in (*physical, ALL_STATIONS_1) if p < 0x80}
        elif form == "four-byte":
            out |= {hdlc_address(logical, p, 4) for p in (*physical, ALL_STATIONS_2)}
        elif form == "serial":
            out.add(hdlc_address(logical, serial_number_address(serial), 4))
        else:
            raise ValueError(f"unknown HDLC address form {form!r}")
    return frozenset(out)


# --- HDLC link ----------------------------------------------------------------------
RR = 0x01
RNR = 0x05  # REJ (0x09) is handled as RR: both ask for the frames from N(R) on
SERVER_MAX_WINDOW = 7
MAX_APDU = 0xFFFF + 16  # reassembly limit of a segmented request


def _ua_info(max_tx: int, max_rx: int, win_tx: int, win_rx: int) -> bytes:
    """UA information field: the negotiated values, from the meter's point of view."""

    def param(tag: int, v: int) -> bytes:
        return bytes((tag, 1, v)) if v < 0x100 else bytes((tag, 2)) + v.to_bytes(2, "big")

    body = param(5, max_tx) + param(6, max_rx)
    body += b"\x07\x04" + win_tx.to_bytes(4, "big") + b"\x08\x04" + win_rx.to_bytes(4, "big")
    return b"\x81\x80" + bytes((len(body),)) + body


class HdlcLink:
    """Server side of the HDLC data link (one connection), free of I/O.

    ``on_frame`` returns ``(frames_to_send, delivered)`` where ``delivered`` is
    ``(client_sap, apdu)`` once a complete APDU arrived; ``reply(apdu)`` returns the
    frames to send now: up to the negotiated window, the last one with the final bit;
    the rest follow the client's RR.  ``disconnected`` turns true on DISC/SNRM so the
    caller resets the association.

    The SNRM negotiates the information field lengths (up to ``max_info``) and the
    windows (up to ``max_window``) the client proposes; the UA carries the result.
    Frames to an address not in ``addresses`` get no answer at all, like real meters.
    """

    def __init__(
        self,
        addresses: Optional[frozenset[bytes]] = None,
        max_info: int = SERVER_MAX_INFO,
        max_window: int = SERVER_MAX_WINDOW,
    ):
        self.addresses = server_addresses() if addresses is None else addresses
        self.max_info_limit = max_info
        self.max_window_limit = max_window
        self.connected = False
        self.disconnected = False
        self.vs = 0  # N(S) of our next I-frame
        self.vr = 0  # N(S) we expect from the client
        self.max_tx = self.max_rx = DEFAULT_MAX_INFO
        self.win_tx = self.win_rx = 1
        self.rx = bytearray()
        self.rx_unacked = 0  # client I-frames received since we last acknowledged
        self.tx = b""  # the reply being sent (LLC included) and how far it went
        self.tx_pos = 0
        self.unacked: list[bytes] = []  # our I-frames the client has not acknowledged
        self.ack_base = 0  # N(S) of unacked[0]
        self.client_addr = b""
        self.server_addr = b""
        self.ignored = 0  # frames to an address this meter does not answer

    def _frame(self, control: int, info: bytes = b"", segmented: bool = False) -> bytes:
        return hdlc_encode(self.client_addr, self.server_addr, control, info, segmented)

    def _rr(self) -> bytes:
        return self._frame(RR | PF | (self.vr << 5))

    def on_frame(self, fr: HdlcFrame) -> tuple[list[bytes], Optional[tuple[int, bytes]]]:
        """Handle one client frame (see the class docstring)."""
        if fr.destination not in self.addresses or len(fr.source) != 1:
            self.ignored += 1
            return [], None
        self.client_addr = fr.source
        self.server_addr = fr.destination
        c = fr.control
        if c & 0xEF == SNRM:
            self._negotiate(fr.info)
            self.connected = True
            self.disconnected = True
            self.vs = self.vr = self.ack_base = self.rx_unacked = self.tx_pos = 0
            self.rx.clear()
            self.tx = b""
            self.unacked = []
            info = _ua_info(self.max_tx, self.max_rx, self.win_tx, self.win_rx)
            return [self._frame(UA | PF, info)], None
        if c & 0xEF == DISC:
            was = self.connected
            self.connected = False
            self.disconnected = True
            self.tx = b""
            self.unacked = []
            return [self._frame((UA if was else DM) | PF)], None
        if not self.connected:
            return [self._frame(DM | PF)], None
        if c & 1 == 0:
            return self._on_i_frame(fr)
        if c & 0x03 == 0x01:  # S-frame: RR, RNR, REJ
            if not self._ack(c >> 5):
                return [self._frame(FRMR | PF)], None
            if self.unacked and c & 0x0F != RNR:  # go back N: resend what was not received
                return list(self.unacked), None
            if self.tx_pos < len(self.tx) and c & 0x0F != RNR:
                return self._burst(), None
            return [self._rr()], None
        return [self._frame(FRMR | PF)], None

    def _on_i_frame(self, fr: HdlcFrame) -> tuple[list[bytes], Optional[tuple[int, bytes]]]:
        c = fr.control
        if len(fr.info) > self.max_rx:
            return [self._frame(FRMR | PF)], None
        if not self._ack(c >> 5):
            return [self._frame(FRMR | PF)], None
        ns = (c >> 1) & 7
        if ns != self.vr:
            if ns == (self.vr - 1) % 8 and self.unacked:
                return list(self.unacked), None  # our answer was lost: send it again
            return ([self._rr()] if c & PF else []), None
        self.vr = (self.vr + 1) % 8
        self.rx += fr.info
        if len(self.rx) > MAX_APDU:
            self.rx.clear()
            return [self._frame(FRMR | PF)], None
        if fr.segmented:
            self.rx_unacked += 1
            if c & PF or self.rx_unacked >= self.win_rx:
                self.rx_unacked = 0
                return [self._rr()], None
            return [], None  # more frames of the client's window follow
        self.rx_unacked = 0
        data = bytes(self.rx)
        self.rx.clear()
        if data[:3] == LLC_REQUEST:
            data = data[3:]
        return [], (fr.source[0] >> 1, data)

    def _ack(self, nr: int) -> bool:
        """The client acknowledged our I-frames before N(R) = ``nr``; False if impossible."""
        nr &= 7
        n = (nr - self.ack_base) % 8
        if n > len(self.unacked):
            return False
        del self.unacked[:n]
        self.ack_base = nr
        return True

    def _negotiate(self, info: bytes) -> None:
        self.max_tx = self.max_rx = DEFAULT_MAX_INFO
        self.win_tx = self.win_rx = 1
        if len(info) < 3 or info[0] != 0x81 or info[1] != 0x80:
            return
        pos = 3
        while pos + 2 <= len(info):
            tag, n = info[pos], info[pos + 1]
            v = int.from_bytes(info[pos + 2 : pos + 2 + n], "big")
            pos += 2 + n
            if tag == 5:  # the client's max info transmit = what we receive
                self.max_rx = max(32, min(v, self.max_info_limit))
            elif tag == 6:  # the client's max info receive = what we may send
                self.max_tx = max(32, min(v, self.max_info_limit))
            elif tag == 7:  # the client's transmit window = how many frames we accept
                self.win_rx = max(1, min(v, self.max_window_limit))
            elif tag == 8:  # the client's receive window = how many frames we may send
                self.win_tx = max(1, min(v, self.max_window_limit))

    def reply(self, apdu: bytes) -> list[bytes]:
        """Frames of the answer to send now (a window of them at most)."""
        self.tx = LLC_RESPONSE + apdu
        self.tx_pos = 0
        self.unacked = []
        self.ack_base = self.vs
        return self._burst()

    def _burst(self) -> list[bytes]:
        out = []
        tx, size = self.tx, self.max_tx
        while self.tx_pos < len(tx) and len(self.unacked) < self.win_tx:
            seg = tx[self.tx_pos : self.tx_pos + size]
            self.tx_pos += len(seg)
            more = self.tx_pos < len(tx)
            final = not more or len(self.unacked) + 1 == self.win_tx
            control = (self.vr << 5) | (PF if final else 0) | (self.vs << 1)
            self.vs = (self.vs + 1) % 8
            frame = self._frame(control, seg, segmented=more)
            self.unacked.append(frame)
            out.append(frame)
        if self.tx_pos >= len(tx):
            self.tx = b""
            self.tx_pos = 0
        return out
