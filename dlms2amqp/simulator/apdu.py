# SPDX-License-Identifier: GPL-2.0-or-later
"""The simulator's DLMS application layer, free of I/O: APDU in, APDUs out.

``Session`` is one connection's association state: AARQ/AARE, GET normal/next
with block transfer, ACTION for HLS pass 3/4, RLRQ/RLRE and ciphering.  The
event loop in :mod:`dlms2amqp.simulator.server` owns the sockets and framing
and hands each complete APDU to its connection's Session.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from dataclasses import dataclass
from typing import Optional

from dlms2amqp.simulator import axdr_enc as ax
from dlms2amqp.simulator import cosem
from dlms2amqp.simulator import security as sec
from dlms2amqp.simulator.cosem import Association, DataAccessError, Device, MeterState, ReadContext

log = logging.getLogger("dlms2amqp.sim")

# APDU tags
AARQ = 0x60
AARE = 0x61
RLRQ = 0x62
RLRE = 0x63
GET_REQUEST = 0xC0
ACTION_REQUEST = 0xC3
GET_RESPONSE = 0xC4
ACTION_RESPONSE = 0xC7
GLO_GET_REQUEST = 0xC8
GLO_ACTION_REQUEST = 0xCB
GLO_GET_RESPONSE = 0xCC
GLO_ACTION_RESPONSE = 0xCF
GLO_INITIATE_REQUEST = 0x21
GLO_INITIATE_RESPONSE = 0x28
EXCEPTION_RESPONSE = 0xD8
INITIATE_REQUEST = 0x01
INITIATE_RESPONSE = 0x08
CONFIRMED_SERVICE_ERROR = 0x0E

# AARE diagnostics (acse-service-user)
DIAG_NULL = 0
DIAG_NO_REASON = 1
DIAG_CONTEXT_NOT_SUPPORTED = 2
DIAG_MECH_NOT_RECOGNISED = 11
DIAG_MECH_REQUIRED = 12
DIAG_AUTH_FAILURE = 13
DIAG_AUTH_REQUIRED = 14

CTX_LN = 1
CTX_LN_CIPHERED = 3

# conformance bits (wire order) the simulator implements
CONF_BLOCK_GET = 0x001000
CONF_GET = 0x000010
CONF_SELECTIVE = 0x000004
CONF_ACTION = 0x000001
SUPPORTED_CONFORMANCE = CONF_BLOCK_GET | CONF_GET | CONF_SELECTIVE | CONF_ACTION
SERVER_MAX_PDU = 0xFFFF

_APP_CTX_PREFIX = b"\x60\x85\x74\x05\x08\x01"
_MECH_PREFIX = b"\x60\x85\x74\x05\x08\x02"


_APDU_NAMES = {
    AARQ: "AARQ",
    AARE: "AARE",
    RLRQ: "RLRQ",
    RLRE: "RLRE",
    GET_REQUEST: "GET-Request",
    GET_RESPONSE: "GET-Response",
    ACTION_REQUEST: "ACTION-Request",
    ACTION_RESPONSE: "ACTION-Response",
    GLO_GET_REQUEST: "glo-GET-Request",
    GLO_GET_RESPONSE: "glo-GET-Response",
    GLO_ACTION_REQUEST: "glo-ACTION-Request",
    GLO_ACTION_RESPONSE: "glo-ACTION-Response",
    EXCEPTION_RESPONSE: "exception-response",
}


def _apdu_name(apdu: Optional[bytes]) -> str:
    if not apdu:
        return "nothing"
    return _APDU_NAMES.get(apdu[0], f"APDU 0x{apdu[0]:02X}")


class ApduError(ValueError):
    """The client sent an APDU the simulator cannot parse."""


def ber_len(n: int) -> bytes:
    """BER length (AARQ/AARE)."""
    return ax.enc_len(n)


def _ber_items(buf: bytes, pos: int, end: int):
    """Yield (tag, content) of consecutive BER TLVs."""
    while pos < end:
        tag = buf[pos]
        n, pos = ax.dec_len(buf, pos + 1)
        if pos + n > end:
            raise ApduError("truncated BER item")
        yield tag, buf[pos : pos + n]
        pos += n


@dataclass
class SimOptions:
    """Per-simulator settings; rates are fractions of connections (0..1)."""

    utc_offset: int = 0
    latency_ms: float = 0.0
    silent: float = 0.0
    garbage: float = 0.0
    reset: float = 0.0
    reject_auth: float = 0.0
    interface: str = "WRAPPER"
    seed: Optional[int] = None
    # HDLC: the server address forms answered (framing.ADDRESS_FORMS) and the physical
    # addresses of the two- and four-byte forms (0 too until every reader sends Gurux's form)
    hdlc_address: tuple[str, ...] = ("one-byte", "two-byte", "serial")
    hdlc_physical: tuple[int, ...] = (1, 0)
    hdlc_limits: tuple[int, int] = (7, 2030)  # the meter's largest HDLC window, info field


def _aare(
    ctx_id: int,
    result: int,
    diag: int,
    user_info: bytes = b"",
    hls: Optional[tuple[bytes, bytes]] = None,
) -> bytes:
    body = b"\xa1\x09\x06\x07" + _APP_CTX_PREFIX + bytes((ctx_id,))
    body += b"\xa2\x03\x02\x01" + bytes((result,))
    body += b"\xa3\x05\xa1\x03\x02\x01" + bytes((diag,))
    if hls is not None:
        st, challenge = hls
        body += b"\xa4" + ber_len(len(st) + 2) + b"\x04" + ber_len(len(st)) + st
        body += b"\x88\x02\x07\x80"
        body += b"\x89\x07" + _MECH_PREFIX + bytes((cosem.MECH_HLS_GMAC,))
        body += (
            b"\xaa" + ber_len(len(challenge) + 2) + b"\x80" + ber_len(len(challenge)) + challenge
        )
    if user_info:
        body += (
            b"\xbe" + ber_len(len(user_info) + 2) + b"\x04" + ber_len(len(user_info)) + user_info
        )
    return bytes((AARE,)) + ber_len(len(body)) + body


def _initiate_response(conformance: int, max_pdu: int) -> bytes:
    return (
        b"\x08\x00\x06\x5f\x1f\x04\x00"
        + conformance.to_bytes(3, "big")
        + max_pdu.to_bytes(2, "big")
        + b"\x00\x07"
    )


def parse_initiate_request(buf: bytes) -> tuple[int, int]:
    """xDLMS InitiateRequest -> (conformance, client max receive PDU size)."""
    try:
        if buf[0] != INITIATE_REQUEST:
            raise ApduError("not an InitiateRequest")
        pos = 1
        if buf[pos]:  # dedicated-key
            pos += 2 + buf[pos + 1]
        else:
            pos += 1
        pos += 2 if buf[pos] else 1  # response-allowed
        pos += 2 if buf[pos] else 1  # proposed-quality-of-service
        if buf[pos] < 6:
            raise ApduError("DLMS version below 6")
        pos += 1
        if buf[pos : pos + 3] != b"\x5f\x1f\x04":
            raise ApduError("bad conformance block")
        conformance = int.from_bytes(buf[pos + 4 : pos + 7], "big")
        max_pdu = int.from_bytes(buf[pos + 7 : pos + 9], "big")
        return conformance, max_pdu
    except IndexError as e:
        raise ApduError("truncated InitiateRequest") from e


class Session:
    """DLMS application layer of one connection: APDU in, APDUs out."""

    __slots__ = (
        "device",
        "meter",
        "opts",
        "client_sap",
        "assoc",
        "associated",
        "authenticated",
        "client_max_pdu",
        "conformance",
        "blocks",
        "block_no",
        "block_invoke",
        "ciphered",
        "stoc",
        "ctos",
        "reject_auth",
    )

    def __init__(
        self, device: Device, meter: MeterState, opts: SimOptions, reject_auth: bool = False
    ):
        self.device = device
        self.meter = meter
        self.opts = opts
        self.client_sap = 0
        self.assoc: Optional[Association] = None
        self.associated = False
        self.authenticated = False
        self.client_max_pdu = SERVER_MAX_PDU
        self.conformance = 0
        self.blocks: list[bytes] = []
        self.block_no = 0
        self.block_invoke = 0
        self.ciphered = False
        self.stoc = b""
        self.ctos = b""
        self.reject_auth = reject_auth

    # -- entry point -------------------------------------------------------
    def handle(self, client_sap: int, apdu: bytes) -> Optional[bytes]:
        """One request APDU -> one response APDU (None: no answer)."""
        if not apdu:
            return None
        tag = apdu[0]
        if tag == AARQ:
            return self._aarq(client_sap, apdu)
        if tag == RLRQ:
            return self._rlrq(apdu)
        if not self.associated or client_sap != self.client_sap:
            return b"\xd8\x01\x01"  # service-not-allowed, operation-not-possible
        if self.ciphered:
            return self._ciphered(apdu)
        if self.assoc is not None and self.assoc.security:
            return b"\xd8\x01\x01"  # plain APDU on a ciphered association
        return self._plain(apdu)

    def _plain(self, apdu: bytes) -> Optional[bytes]:
        tag = apdu[0]
        if tag == GET_REQUEST and self.authenticated:
            return self._get(apdu)
        if tag == ACTION_REQUEST:
            return self._action(apdu)
        if tag == GET_REQUEST:
            return b"\xd8\x01\x01"
        return b"\xd8\x02\x02"  # service-unknown, service-not-supported

    def _ciphered(self, apdu: bytes) -> Optional[bytes]:
        tag = apdu[0]
        if tag not in (GLO_GET_REQUEST, GLO_ACTION_REQUEST):
            return b"\xd8\x01\x01"
        assoc = self.assoc
        assert assoc is not None
        try:
            n, pos = ax.dec_len(apdu, 1)
            sc, ic, plain = sec.decrypt(
                assoc.client_system_title, assoc.block_key, assoc.auth_key, apdu[pos : pos + n]
            )
        except (sec.DecryptError, ValueError, IndexError):  # bad tag, truncated
            return b"\xd8\x01\x05"  # deciphering-error
        if sc & 0x30 != assoc.security & 0x30:
            return b"\xd8\x01\x05"  # not the security policy of this association
        if ic <= self.meter.last_ic:
            return b"\xd8\x01\x06" + struct.pack(">I", self.meter.last_ic + 1)
        self.meter.last_ic = ic
        reply = self._plain(plain)
        if reply is None:
            return None
        if reply[0] == GET_RESPONSE:
            out_tag = GLO_GET_RESPONSE
        elif reply[0] == ACTION_RESPONSE:
            out_tag = GLO_ACTION_RESPONSE
        else:
            return reply
        return self._encrypt(out_tag, reply)

    def _encrypt(self, out_tag: int, plain: bytes) -> bytes:
        assoc = self.assoc
        assert assoc is not None
        self.meter.server_ic += 1
        body = sec.encrypt(
            0x30,
            self.meter.system_title,
            self.meter.server_ic,
            assoc.block_key,
            assoc.auth_key,
            plain,
        )
        return bytes((out_tag,)) + ax.enc_len(len(body)) + body

    # -- association ---------------------------------------------------------
    def _reset(self) -> None:
        self.associated = False
        self.authenticated = False
        self.ciphered = False
        self.assoc = None
        self.blocks = []
        self.stoc = b""

    def _reject(self, ctx_id: int, diag: int, why: str) -> bytes:
        log.info("meter %d client %d: association rejected: %s", self.meter.k, self.client_sap, why)
        return _aare(ctx_id, 1, diag)

    def _aarq(self, client_sap: int, apdu: bytes) -> bytes:
        """AARQ -> AARE (or an exception-response for a stale invocation counter)."""
        self._reset()
        self.client_sap = client_sap
        try:
            n, pos = ax.dec_len(apdu, 1)
            ctx_id = CTX_LN
            mech = cosem.MECH_NONE
            password = b""
            calling_title = b""
            user_info = b""
            for tag, content in _ber_items(apdu, pos, pos + n):
                if tag == 0xA1:
                    ctx_id = content[-1]
                    if content[2:-1] != _APP_CTX_PREFIX:
                        return self._reject(
                            CTX_LN, DIAG_CONTEXT_NOT_SUPPORTED, "unknown application context"
                        )
                elif tag == 0xA6:
                    calling_title = bytes(content[2:])
                elif tag == 0x8B:
                    mech = content[-1]
                elif tag == 0xAC:
                    password = bytes(content[2:])
                elif tag == 0xBE:
                    user_info = bytes(content[2:])
        except (IndexError, ValueError, ax.DecodeError):
            return self._reject(CTX_LN, DIAG_NO_REASON, "AARQ does not parse")
        assoc = self.device.associations.get(client_sap)
        if assoc is None:
            return self._reject(ctx_id, DIAG_NO_REASON, "no association for this client address")
        want_ctx = CTX_LN_CIPHERED if assoc.security else CTX_LN
        if ctx_id != want_ctx:
            return self._reject(ctx_id, DIAG_CONTEXT_NOT_SUPPORTED, "wrong application context")
        if mech != assoc.mechanism:
            diag = DIAG_MECH_REQUIRED if mech == 0 else DIAG_MECH_NOT_RECOGNISED
            return self._reject(ctx_id, diag, f"mechanism {mech}, expected {assoc.mechanism}")
        if self.reject_auth and assoc.mechanism != cosem.MECH_NONE:
            return self._reject(ctx_id, DIAG_AUTH_FAILURE, "--reject-auth")
        if assoc.mechanism == cosem.MECH_LOW and password != assoc.secret:
            return self._reject(ctx_id, DIAG_AUTH_FAILURE, "wrong password")
        # user information: InitiateRequest, ciphered or not
        try:
            if assoc.security:
                if not user_info or user_info[0] != GLO_INITIATE_REQUEST:
                    return self._reject(ctx_id, DIAG_NO_REASON, "InitiateRequest not ciphered")
                if calling_title != assoc.client_system_title:
                    return self._reject(ctx_id, DIAG_AUTH_FAILURE, "unknown client system title")
                ln_, p = ax.dec_len(user_info, 1)
                try:
                    _sc, ic, plain = sec.decrypt(
                        calling_title, assoc.block_key, assoc.auth_key, user_info[p : p + ln_]
                    )
                except (sec.DecryptError, ValueError, IndexError):
                    return self._reject(
                        ctx_id, DIAG_AUTH_FAILURE, "InitiateRequest does not decipher"
                    )
                if ic <= self.meter.last_ic:
                    # exception-response invocation-counter-error with the counter expected:
                    # what Gurux's client turns into GXDLMSExceptionResponse
                    log.info(
                        "meter %d: invocation counter %d not above %d",
                        self.meter.k,
                        ic,
                        self.meter.last_ic,
                    )
                    return b"\xd8\x01\x06" + struct.pack(">I", self.meter.last_ic + 1)
                self.meter.last_ic = ic
                conformance, max_pdu = parse_initiate_request(plain)
            else:
                conformance, max_pdu = parse_initiate_request(user_info)
        except (ApduError, IndexError, ax.DecodeError) as e:
            return self._reject(ctx_id, DIAG_NO_REASON, f"bad InitiateRequest: {e}")
        self.conformance = conformance & SUPPORTED_CONFORMANCE
        self.client_max_pdu = max(64, min(max_pdu or SERVER_MAX_PDU, SERVER_MAX_PDU))
        self.client_sap = client_sap
        self.assoc = assoc
        self.associated = True
        init = _initiate_response(self.conformance, SERVER_MAX_PDU)
        if assoc.mechanism == cosem.MECH_HLS_GMAC:
            self.authenticated = False
            self.ctos = password
            self.stoc = os.urandom(16)
            glo = self._encrypt(GLO_INITIATE_RESPONSE, init)
            self.ciphered = True
            return _aare(
                ctx_id, 0, DIAG_AUTH_REQUIRED, glo, hls=(self.meter.system_title, self.stoc)
            )
        self.authenticated = True
        return _aare(ctx_id, 0, DIAG_NULL, init)

    def _rlrq(self, apdu: bytes) -> bytes:
        self._reset()
        return b"\x63\x03\x80\x01\x00"

    # -- ACTION (HLS pass 3/4) ------------------------------------------------
    def _action(self, apdu: bytes) -> bytes:
        if len(apdu) < 13 or apdu[1] != 1:
            return b"\xd8\x02\x02"
        invoke = apdu[2]
        class_id = int.from_bytes(apdu[3:5], "big")
        ln = bytes(apdu[5:11])
        method = apdu[11]
        head = bytes((ACTION_RESPONSE, 1, invoke))
        assoc = self.assoc
        if (
            class_id != 15
            or ln != self.device.association_ln
            or method != 1
            or assoc is None
            or assoc.mechanism != cosem.MECH_HLS_GMAC
            or not self.stoc
        ):
            return head + b"\x0b\x00"  # object-unavailable
        try:
            value, _ = ax.decode(apdu, 13) if apdu[12] else (None, 0)
        except ax.DecodeError:
            return head + b"\x0c\x00"  # type-unmatched
        ok = False
        if isinstance(value, bytes) and len(value) == 17 and value[0] == 0x10:
            ic = int.from_bytes(value[1:5], "big")
            expected = sec.gmac_tag(
                assoc.client_system_title, ic, assoc.block_key, assoc.auth_key, self.stoc
            )
            ok = expected == value[5:]
        self.stoc = b""
        if not ok:
            self._reset()
            return head + b"\x03\x00"  # read-write-denied (authentication failed)
        self.authenticated = True
        return head + b"\x00\x01\x00" + ax.octet_string(self._ctos_reply())

    def _ctos_reply(self) -> bytes:
        """f(CtoS) of HLS pass 4: SC || IC || GMAC tag under the meter's system title."""
        assoc = self.assoc
        assert assoc is not None
        self.meter.server_ic += 1
        ic = self.meter.server_ic
        tag = sec.gmac_tag(self.meter.system_title, ic, assoc.block_key, assoc.auth_key, self.ctos)
        return b"\x10" + ic.to_bytes(4, "big") + tag

    # -- GET -------------------------------------------------------------------
    def _get(self, apdu: bytes) -> bytes:
        kind = apdu[1] if len(apdu) > 1 else 0
        if kind == 1:
            return self._get_normal(apdu)
        if kind == 2:
            return self._get_next(apdu)
        return b"\xd8\x01\x02"  # GET-with-list is not offered (no multiple-references)

    def _get_normal(self, apdu: bytes) -> bytes:
        if len(apdu) < 13:
            return b"\xd8\x02\x02"
        invoke = apdu[2]
        class_id = int.from_bytes(apdu[3:5], "big")
        ln = bytes(apdu[5:11])
        attr = apdu[11]
        self.blocks = []
        ctx = ReadContext(self.meter, int(time.time()), self.opts.utc_offset, self.client_sap)
        try:
            if apdu[12]:
                ctx.selector = apdu[13]
                ctx.params, _ = ax.decode(apdu, 14)
            data = self.device.read(ctx, class_id, ln, attr)
        except DataAccessError as e:
            return bytes((GET_RESPONSE, 1, invoke, 1, e.code))
        except (ax.DecodeError, IndexError):
            return bytes((GET_RESPONSE, 1, invoke, 1, cosem.OTHER_REASON))
        limit = self.client_max_pdu - (40 if self.ciphered else 0)
        if len(data) + 4 <= limit or not (self.conformance & CONF_BLOCK_GET):
            return bytes((GET_RESPONSE, 1, invoke, 0)) + data
        size = limit - 12
        self.blocks = [data[i : i + size] for i in range(0, len(data), size)]
        self.block_no = 0
        self.block_invoke = invoke
        return self._next_block()

    def _next_block(self) -> bytes:
        chunk = self.blocks[self.block_no]
        self.block_no += 1
        last = 1 if self.block_no == len(self.blocks) else 0
        out = (
            bytes((GET_RESPONSE, 2, self.block_invoke, last))
            + self.block_no.to_bytes(4, "big")
            + b"\x00"
            + ax.enc_len(len(chunk))
            + chunk
        )
        if last:
            self.blocks = []
        return out

    def _get_next(self, apdu: bytes) -> bytes:
        invoke = apdu[2] if len(apdu) > 2 else 0
        if len(apdu) < 7 or not self.blocks:
            # no-long-get-in-progress
            return (
                bytes((GET_RESPONSE, 2, invoke, 1)) + self.block_no.to_bytes(4, "big") + b"\x01\x10"
            )
        acked = int.from_bytes(apdu[3:7], "big")
        if acked != self.block_no:
            self.blocks = []
            # data-block-number-invalid
            return bytes((GET_RESPONSE, 2, invoke, 1)) + acked.to_bytes(4, "big") + b"\x01\x13"
        self.block_invoke = invoke
        return self._next_block()
