# SPDX-License-Identifier: GPL-2.0-or-later
"""Frame traces (``--trace``, ``Trace``) with every known secret masked."""

from __future__ import annotations

import re
import sys
from typing import Callable, Optional

from .connstring import ConnSettings


class FrameTracer:
    """Frame printer that masks the password, the keys and the AARQ's authentication value.

    A Low password travels in clear inside the AARQ, and an AARQ may be split over several
    HDLC frames, so a pattern search per frame cannot be trusted to find all of it.  While
    the session sends its AARQ (``masking``), every TX byte after the first four is
    masked; the other frames, sent and received (a meter may echo the password), are
    shown with the known secrets and any calling-authentication-value masked.
    """

    def __init__(self, settings: ConnSettings, sink: Optional[Callable[[str], None]]):
        self.secrets = []
        for value in (settings.password, settings.authentication_key,
                      settings.block_cipher_key, settings.dedicated_key):  # fmt: skip
            if value:
                raw = value.reveal()
                self.secrets.append(raw.encode() if isinstance(raw, str) else raw)
        self.out = sink or (lambda line: print(line, file=sys.stderr, flush=True))
        self.masking = False

    def __call__(self, direction: str, data: bytes) -> None:
        data = bytes(data)
        hexes = [f"{b:02X}" for b in data]
        spans = []
        if direction == "TX" and self.masking:
            spans.append((4, len(data)))
        for secret in self.secrets:  # RX too: a meter may echo the password
            start = data.find(secret)
            while start >= 0:
                spans.append((start, start + len(secret)))
                start = data.find(secret, start + 1)
        # the AARQ's calling-authentication-value: AC len 80 len value
        for m in re.finditer(rb"\xac(.)\x80(.)", data, re.DOTALL):
            if m.group(1)[0] == m.group(2)[0] + 2:
                spans.append((m.end(), m.end() + m.group(2)[0]))
        for start, end in spans:
            for i in range(start, min(end, len(hexes))):
                hexes[i] = "**"
        self.out(f"{direction} {' '.join(hexes)}")

    def note(self, text: str) -> None:
        """A line about what the gateway decided (``-- 3 trailing bytes ... ignored``)."""
        self.out(f"-- {text}")


def make_tracer(settings: ConnSettings, sink: Optional[Callable[[str], None]]) -> FrameTracer:
    return FrameTracer(settings, sink)
