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
