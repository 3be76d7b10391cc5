# SPDX-License-Identifier: GPL-2.0-or-later
"""Every change this project makes to Gurux's behaviour, in one place.

Applied once, on import, and only for the Gurux version they were written for:
another version fails loudly here instead of misbehaving somewhere else.

- raw-value mode: a reply object with ``raw_only`` set skips Gurux's value
  decoding (most of the gateway's CPU on profile reads); the session decodes
  the raw A-XDR itself with :mod:`dlms2amqp.meter.axdr`.
- print silencing: Gurux prints from inside the library (per-frame notices,
  "Server did not accept CtoS." on a refused High login, key material on some
  signing paths) and stdout belongs to the CLI's JSON.
- HDLC frame length: ``GXDLMS.getHdlcFrame`` puts bits 8-10 of the wrong sum into
  the frame format field, so any frame longer than 255 bytes (max info field over
  about 245) goes out with a wrong length; the frame is corrected here (length
  field, HCS, FCS), everything else (segmentation, sequence numbers) stays Gurux's.
"""

from __future__ import annotations

import importlib
from importlib.metadata import version

from gurux_dlms._GXFCS16 import _GXFCS16
from gurux_dlms.enums import RequestTypes
from gurux_dlms.GXDLMS import GXDLMS

#: the gurux-dlms release these patches were written against (setup.cfg pins it)
GURUX_DLMS_VERSION = "1.0.203"

_installed = version("gurux-dlms")
if _installed != GURUX_DLMS_VERSION:
    raise ImportError(
        f"dlms2amqp patches gurux-dlms {GURUX_DLMS_VERSION}, but {_installed} is installed; "
        "install the pinned version (pip install -e .)"
    )

# --- raw-value mode: skip Gurux's value decoding for replies that ask for it -----------
_orig_get_value = GXDLMS.getValueFromData.__func__


def _get_value_from_data(cls, settings, reply):
    if getattr(reply, "raw_only", False):
        if reply.moreData == RequestTypes.NONE:
            if settings:
                settings.resetBlockIndex()
            reply.data.position = 0
        return None
    return _orig_get_value(cls, settings, reply)


if not getattr(GXDLMS, "_dlms2amqp_raw", False):
    GXDLMS.getValueFromData = classmethod(_get_value_from_data)
    GXDLMS._dlms2amqp_raw = True


# Gurux prints to stdout from inside the library ("Encryption is applied." per frame, and
# key material on some signing paths); stdout belongs to the CLI's JSON.  Silence those
# modules' print (a module-level name shadows the builtin for that module only).
def _no_print(*_args, **_kwargs) -> None:
    return None


#: every gurux_dlms module that calls print() in 1.0.203 (grep -l "print(" gurux_dlms)
PRINTING_MODULES = (
    "GXDLMSChippering", "GXDLMSChipperingStream", "GXSecure", "GXDLMSSettings", "_GXAPDU",
    "GXDLMS", "GXDLMSClient", "GXDLMSConverter", "GXDLMSLNCommandHandler",
    "GXDLMSSNCommandHandler", "GXDLMSTranslator", "objects.GXDLMSSecuritySetup",
    "objects.GXDLMSProfileGeneric", "objects.GXDLMSObjectCollection",
    "manufacturersettings.GXManufacturerCollection",
)  # fmt: skip

for _name in PRINTING_MODULES:
    _module = importlib.import_module(f"gurux_dlms.{_name}")
    _module.print = _no_print


# --- HDLC frames over 255 bytes ---------------------------------------------------------
# Frame format field (IEC 62056-46 frame format type 3): 4 bits type (0xA), 1 bit
# segmentation, 11 bits frame length (every byte between the two flags).
_orig_get_hdlc_frame = GXDLMS.getHdlcFrame.__func__


def _address_end(frame: bytearray, pos: int) -> int:
    """Index after an HDLC address starting at pos (its last byte has bit 0 set)."""
    while pos < len(frame) and not frame[pos] & 1:
        pos += 1
    return pos + 1


def fix_hdlc_length(frame: bytearray) -> bytearray:
    """Rewrite the 11-bit length, the HCS and the FCS of one flag-delimited HDLC frame."""
    length = len(frame) - 2
    if length > 0x7FF:
        raise ValueError(f"HDLC frame of {length} bytes does not fit the 11-bit length field")
    frame[1] = (frame[1] & 0xF8) | (length >> 8)
    frame[2] = length & 0xFF
    header_end = _address_end(frame, _address_end(frame, 3)) + 1  # + control byte
    # countFCS16 returns the CRC byte-swapped, to be stored big-endian (Gurux's setUInt16)
    frame[header_end : header_end + 2] = _GXFCS16.countFCS16(frame, 1, header_end - 1).to_bytes(
        2, "big"
    )
    if len(frame) > header_end + 3:  # an information field follows the HCS
        frame[-3:-1] = _GXFCS16.countFCS16(frame, 1, len(frame) - 4).to_bytes(2, "big")
    return frame


def _get_hdlc_frame(cls, settings, frame_, data):
    frame = _orig_get_hdlc_frame(cls, settings, frame_, data)
    if len(frame) - 2 > 0xFF:  # Gurux's own length is right up to 255 bytes
        frame = fix_hdlc_length(bytearray(frame))
    return frame


if not getattr(GXDLMS, "_dlms2amqp_hdlc_length", False):
    GXDLMS.getHdlcFrame = classmethod(_get_hdlc_frame)
    GXDLMS._dlms2amqp_hdlc_length = True
