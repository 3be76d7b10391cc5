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
- HDLC frame length: ``GXDLMS.getHdlcFrame`` takes bits 8-10 of the 11-bit frame
  length from the length less 7, so frames of 256..262, 512..518, ... bytes (with
  one-byte addresses: the first frame of a long request with a max info field of 250
  or 1024, for instance) go out with a wrong length; the frame is corrected here
  (length field, HCS, FCS), everything else (segmentation, sequence numbers) stays
  Gurux's.
- raw list results: a GET-with-list (LN) or multi-variable READ (SN) reply read
  with ``raw_list`` keeps its count and per-item results as bytes; Gurux's own
  parsing keeps only the last item's error and puts None in every refused place.
- short-name block transfer: ``GXDLMS.readResponseDataBlockResult`` calls
  ``GXReplyData.setTotalCount`` and ``getMoreData``, which 1.0.203 does not have, so
  every SN READ answered in more than one block (profiles) raised AttributeError;
  the session's replies are a :class:`ReplyData` that has them.
- short-name next block: ``GXDLMSSNParameters`` never records its command in the
  settings (the LN parameters do), so ``receiverReady`` asked for the next READ block
  with command 0 and the meter answered "service not supported".
- short-name ciphering: ``GXDLMS.getSNPdu`` asserts that the ciphered APDU is empty
  (``assert not tmp``) and never steps the invocation counter, so every ciphered SN
  request (SN High with ``-C AuthenticationEncryption``) failed; the SN PDU is built
  plain by Gurux and ciphered here, as Gurux's LN path does.
- general block transfer (client): the acknowledgement of a GBT block referred to
  a settings attribute that does not exist; it is built as Gurux's .NET client
  builds it, sent at a block without the streaming bit or when the window is full
  (also when a meter that streams one block per window goes quiet, as Gurux's Java
  meter does); out-of-order blocks are dropped and asked for again.
- HDLC receive window over 1: Gurux's client acknowledges one frame per RR and
  drops the middle frames of a window; with a negotiated window over 1 the receive
  sequence is kept here (window 1 is left to Gurux).
"""

from __future__ import annotations

import importlib
from importlib.metadata import version
from typing import Any

from gurux_dlms._GXFCS16 import _GXFCS16
from gurux_dlms.AesGcmParameter import AesGcmParameter
from gurux_dlms.enums import Command, InterfaceType, RequestTypes, Security
from gurux_dlms.GXCiphering import GXCiphering
from gurux_dlms.GXDLMS import GXDLMS
from gurux_dlms.GXDLMSLNParameters import GXDLMSLNParameters
from gurux_dlms.GXDLMSSettings import GXDLMSSettings
from gurux_dlms.GXDLMSSNParameters import GXDLMSSNParameters
from gurux_dlms.GXReplyData import GXReplyData
from gurux_dlms.internal._GXCommon import _GXCommon
from gurux_dlms.SingleReadResponse import SingleReadResponse

from ..errors import MeterProtocolError

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
    _module: Any = importlib.import_module(f"gurux_dlms.{_name}")  # untyped: Gurux
    _module.print = _no_print  # shadows the builtin in that module


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
    if len(frame) - 2 > 0xFF:  # Gurux's own length is right up to 255 bytes (and beyond
        # except just above each multiple of 256; recomputing is cheap and always right)
        frame = fix_hdlc_length(bytearray(frame))
    return frame


if not getattr(GXDLMS, "_dlms2amqp_hdlc_length", False):
    GXDLMS.getHdlcFrame = classmethod(_get_hdlc_frame)
    GXDLMS._dlms2amqp_hdlc_length = True


# --- raw list results: per-item values and errors as the meter sent them -------------
_orig_with_list = GXDLMS.handleGetResponseWithList.__func__
_orig_read_response = GXDLMS.handleReadResponse.__func__


def _get_response_with_list(cls, settings, reply):
    if getattr(reply, "raw_list", False) and reply.xml is None:
        GXDLMS.getDataFromBlock(reply.data, 0)  # keep "count + results" for the session
        return None
    return _orig_with_list(cls, settings, reply)


def _read_response(cls, settings, reply, index):
    if getattr(reply, "raw_list", False) and reply.xml is None and reply.totalCount == 0:
        data = reply.data
        pos = data.position
        count = _GXCommon.getObjectCount(data)
        kind = data.getUInt8() if data.position < data.size else None
        data.position = pos
        if not (count == 1 and kind == SingleReadResponse.DATA_BLOCK_RESULT):
            GXDLMS.getDataFromBlock(data, 0)  # keep "count + results" for the session
            return False
    return _orig_read_response(cls, settings, reply, index)


# --- short-name block transfer: the two GXReplyData methods 1.0.203 calls but lacks ---
class ReplyData(GXReplyData):
    """The session's reply object: Gurux's, with what its SN block path calls.

    A subclass rather than a patch of GXReplyData, so that Gurux's own class (and any
    other user of it in the process) keeps its 1.0.203 behaviour.
    """

    raw_only = False  # skip Gurux's value decoding (see above)
    raw_list = False  # keep a list reply's per-item results as bytes
    read_blocks = 0  # how many more blocks the session asked for (set by the session)

    def setTotalCount(self, value: int) -> None:  # noqa: N802 (Gurux's name)
        self.totalCount = value

    def getMoreData(self):  # noqa: N802 (Gurux's name)
        return self.moreData


# --- short-name next block: remember the command, as GXDLMSLNParameters does ---------
_orig_sn_params_init = GXDLMSSNParameters.__init__


def _sn_params_init(self, settings, command, *args, **kwargs):
    _orig_sn_params_init(self, settings, command, *args, **kwargs)
    if settings is not None and command in (Command.READ_REQUEST, Command.WRITE_REQUEST):
        settings.command = command


# --- short-name ciphering: build the SN PDU plain, cipher it as the LN path does ------
_orig_sn_pdu = GXDLMS.getSNPdu.__func__


def _sn_pdu(cls, p, reply):
    cipher = p.settings.cipher
    if (
        cipher is None
        or cipher.security == Security.NONE
        or p.command in (Command.AARQ, Command.AARE)
    ):
        return _orig_sn_pdu(cls, p, reply)
    hdlc = p.settings.interfaceType in (InterfaceType.HDLC, InterfaceType.HDLC_WITH_MODE_E)
    empty = not reply
    security = cipher.security
    cipher.security = Security.NONE
    try:
        _orig_sn_pdu(cls, p, reply)
    finally:
        cipher.security = security
    plain = reply.array()
    if hdlc and empty:
        plain = plain[len(_GXCommon.LLC_SEND_BYTES) :]
    s = AesGcmParameter(GXDLMS.getGloMessage(p.command), cipher.systemTitle,
                        cipher.blockCipherKey, cipher.authenticationKey)  # fmt: skip
    s.security = security
    s.securitySuite = cipher.securitySuite
    s.invocationCounter = cipher.invocationCounter
    ciphered = GXCiphering.encrypt(s, plain)
    cipher.invocationCounter = cipher.invocationCounter + 1
    reply.size = 0
    if hdlc:
        reply.set(_GXCommon.LLC_SEND_BYTES)
    reply.set(ciphered)
    return None


if not getattr(GXDLMS, "_dlms2amqp_lists", False):
    GXDLMS.handleGetResponseWithList = classmethod(_get_response_with_list)
    GXDLMS.handleReadResponse = classmethod(_read_response)
    GXDLMS.getSNPdu = classmethod(_sn_pdu)
    GXDLMSSNParameters.__init__ = _sn_params_init
    GXDLMS._dlms2amqp_lists = True


# --- general block transfer on the client side ---------------------------------------------
# ``GXDLMS.receiverReady`` acknowledges a GBT block with ``settings.blockNumber``, which
# GXDLMSSettings does not have (AttributeError on the first block of every GBT reply).
# Gurux's .NET client acknowledges with its own next block number (``settings.blockIndex``,
# stepped by getLnMessages) and the block received, with the client's GBT window.
#
# When to acknowledge (IEC 62056-5-3 as Gurux's meters behave): at a block without the
# streaming bit, or when the blocks received in this window reach the client's window.
# Gurux's Java meter sets the streaming bit on every block yet sends one block per
# acknowledgement (its block control announces window 1): waiting for more hung.  A
# meter that stops mid-window is learnt once per session (``gbt_stalled``, called by
# the link when a streamed window goes quiet) and from then on the smaller of the two
# windows closes a window.  The acknowledgement names the last block received in order;
# a block out of order (lost one before it) or already received is dropped and not
# answered, so the next acknowledgement asks for the missing block again.


#: GBT blocks out of order in a row before the reply is given up (a meter in a loop)
GBT_MAX_REPEATS = 32


class _GbtWindow:
    """The client's view of the GBT reply being received (kept on the settings)."""

    __slots__ = ("last", "got", "announced", "stalls", "dropped", "repeats")

    def __init__(self) -> None:
        self.last = 0  # last block number received in order
        self.got = 0  # blocks received in order in the current window
        self.announced = 1  # window in the meter's last block control
        self.stalls = False  # the meter was seen waiting in the middle of a window
        self.dropped = False  # the last block was out of order or a repeat
        self.repeats = 0  # blocks dropped in a row


def _gbt_state(settings) -> _GbtWindow:
    st = getattr(settings, "_dlms2amqp_gbt", None)
    if st is None:
        st = settings._dlms2amqp_gbt = _GbtWindow()
    return st


_orig_handle_gbt = GXDLMS.handleGbt.__func__


def _handle_gbt(cls, settings, data):
    buf = data.data
    pos = buf.position
    if data.xml or buf.size - pos < 5:
        return _orig_handle_gbt(cls, settings, data)
    raw = buf.array() if hasattr(buf, "array") else buf._data
    bc = raw[pos]
    bn = int.from_bytes(bytes(raw[pos + 1 : pos + 3]), "big")
    st = _gbt_state(settings)
    if bn == 1 and not data.moreData & RequestTypes.GBT:
        st.last, st.got = 0, 0  # a new reply (a block 1 inside a reply is a repeat)
    st.announced = (bc & 0x3F) or 1
    if bn != st.last + 1:
        # out of order or a repeat: drop it as Gurux drops a repeat (keep what came before)
        data.streaming = (bc & 0x40) != 0
        buf.size = pos - 1
        data.command = Command.NONE
        st.dropped = True
        st.repeats += 1
        if st.repeats > GBT_MAX_REPEATS:
            raise MeterProtocolError(
                f"the meter keeps sending general block transfer block {bn} while block "
                f"{st.last + 1} is due (Gurux's Java meter does so with -W over 1): "
                "read it with -W 1, or without -W"
            )
        return None
    data.blockNumber = 0
    result = _orig_handle_gbt(cls, settings, data)
    st.dropped = data.blockNumber != bn  # Gurux dropped it (acknowledges an old block)
    if not st.dropped and getattr(data, "complete", True):
        st.repeats = 0
        st.last = bn
        st.got += 1
    return result


def _window(settings, st: _GbtWindow) -> int:
    """Blocks in a window: the client's, or the smaller one of a meter that stalls."""
    window = max(1, settings.gbtWindowSize)
    return min(window, st.announced) if st.stalls else window


def gbt_stalled(settings) -> bytes:
    """The meter went quiet inside a streamed window: acknowledge now, and learn it."""
    st = _gbt_state(settings)
    st.stalls = True
    return _gbt_ack(settings, st)


def _gbt_ack(settings, st: _GbtWindow) -> bytes:
    p = GXDLMSLNParameters(settings, 0, Command.GENERAL_BLOCK_TRANSFER, 0, None, None, 0xFF)
    # a meter seen stopping mid-window is offered its own window (Gurux's Java meter
    # streams as many blocks as the client's window, then sends a broken block)
    p.gbtWindowSize = _window(settings, st)
    p.blockNumberAck = st.last
    st.got = 0
    return GXDLMS.getLnMessages(p)[0]


_orig_receiver_ready = GXDLMS.receiverReady.__func__


def _receiver_ready(cls, settings, reply):
    if isinstance(reply, GXReplyData) and reply.moreData == RequestTypes.GBT:
        st = _gbt_state(settings)
        if st.dropped:
            return b""  # not answered: the window's end (or its silence) asks again
        if reply.streaming and st.got < _window(settings, st):
            return b""  # empty request: keep reading, the meter streams this window
        return _gbt_ack(settings, st)
    return _orig_receiver_ready(cls, settings, reply)


if not getattr(GXDLMS, "_dlms2amqp_gbt_ack", False):
    GXDLMS.receiverReady = classmethod(_receiver_ready)
    GXDLMS.handleGbt = classmethod(_handle_gbt)
    GXDLMS._dlms2amqp_gbt_ack = True


# --- HDLC receive window over 1 (client) -------------------------------------------------
# gurux-dlms 1.0.203 counts its receive sequence V(R) as "one more frame per RR or
# request", which holds only for window 1: with a window of W frames its RR and its next
# I-frame acknowledge one frame instead of W (the meter then sends the window again), and
# ``checkFrame`` drops the middle frames of a window of 3 or more (a misspelt local
# variable keeps its state from advancing).  With a negotiated receive window over 1 the
# client here accepts an I-frame when its N(S) is V(R), derives V(R) from the last frame
# accepted, and puts it in its RRs and I-frames.  Window 1 stays Gurux's own code.
_orig_check_frame = GXDLMSSettings.checkFrame
_orig_receiver_ready_frame = GXDLMSSettings.getReceiverReady
_orig_next_send = GXDLMSSettings.getNextSend


def _windowed(settings) -> bool:
    return not settings.isServer and settings.hdlc.windowSizeRX > 1


def _next_vr(settings) -> int:
    """V(R): one after the N(S) of the last I-frame accepted (Gurux starts at N(S) 7)."""
    return (((settings.receiverFrame >> 1) & 7) + 1) & 7


def _check_frame(self, frame_, xml):
    if frame_ & 1 or xml is not None or not _windowed(self):
        return _orig_check_frame(self, frame_, xml)
    if (frame_ >> 1) & 7 != _next_vr(self):
        return False  # out of sequence (a repeat after go-back-N): drop it
    self.receiverFrame = frame_
    return True


def _receiver_ready_frame(self):
    if not _windowed(self):
        return _orig_receiver_ready_frame(self)
    self.senderFrame = (_next_vr(self) << 5) | 0x10 | (self.senderFrame & 0x0E) | 1
    return self.senderFrame & 0xF1


def _next_send(self, first):
    if not (first and _windowed(self)):
        return _orig_next_send(self, first)
    ns = ((self.senderFrame >> 1) + 1) & 7  # N(S) of the last I-frame sent, plus one
    self.senderFrame = (_next_vr(self) << 5) | 0x10 | (ns << 1)
    return self.senderFrame


if not getattr(GXDLMSSettings, "_dlms2amqp_window", False):
    GXDLMSSettings.checkFrame = _check_frame
    GXDLMSSettings.getReceiverReady = _receiver_ready_frame
    GXDLMSSettings.getNextSend = _next_send
    GXDLMSSettings._dlms2amqp_window = True
