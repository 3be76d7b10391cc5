# SPDX-License-Identifier: GPL-2.0-or-later
"""The simulator's DLMS application layer, free of I/O: APDU in, APDUs out.

``Session`` is one connection's association state: AARQ/AARE for every
mechanism (None, Low, High, HighMD5, HighSHA1, HighSHA256, HighGMAC) with or
without ciphering, GET normal/next/with-list with block transfer or general
block transfer (GBT), ACTION for HLS pass 3/4, RLRQ/RLRE and ciphering.  The
event loop in :mod:`dlms2amqp.simulator.server` owns the sockets and framing
and hands each complete APDU to its connection's Session; APDUs streamed after
the reply (GBT windows) wait in ``Session.more``.

Short-name services plug in through ``Session.SERVICES`` (request tag ->
handler), so the association logic stays one for both referencings.  The
module is over 500 lines because association, GET and GBT share the session
state and read best side by side.
"""

from __future__ import annotations

import hmac
import logging
import os
import struct
import time
from dataclasses import dataclass
from typing import Callable, Optional

from dlms2amqp.simulator import axdr_enc as ax
from dlms2amqp.simulator import cosem, sn
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
GBT = 0xE0
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
CTX_SN = 2  # the ciphered contexts are these + 2

# conformance bits (wire order: bit n of the Blue Book is 1 << (23 - n))
CONF_GBT = 0x200000
CONF_BLOCK_GET = 0x001000
CONF_MULTIPLE_REFS = 0x000200
CONF_GET = 0x000010
CONF_SELECTIVE = 0x000004
CONF_ACTION = 0x000001
#: what the simulator implements for logical-name referencing
SUPPORTED_CONFORMANCE = (
    CONF_GBT | CONF_BLOCK_GET | CONF_MULTIPLE_REFS | CONF_GET | CONF_SELECTIVE | CONF_ACTION
)
#: conformance offered per referencing (1 LN, 2 SN: read, write, block-read,
#: multiple references, parameterized access, see sn.py)
CONFORMANCE_BY_REFERENCING = {
    1: SUPPORTED_CONFORMANCE,
    2: sn.SUPPORTED_CONFORMANCE,
}
SERVER_MAX_PDU = 0xFFFF
#: the GBT window the meter streams at most (Green Book: 1..63)
MAX_GBT_WINDOW = 63

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
    hdlc_physical: tuple[int, ...] = (1,)
    hdlc_limits: tuple[int, int] = (7, 2030)  # the meter's largest HDLC window, info field
    # --- meter quirks (sim --trailing-bytes / --deny-wrong-class) -------------------
    #: bytes appended after the clock value and after the last profile block
    trailing_bytes: int = 0
    #: answer read-write-denied (3) for an unknown object or a wrong class
    deny_wrong_class: bool = False
    #: GBT as Gurux's Java meter sends it: every block but the last with the streaming
    #: bit and window 1 (0x41), one block per client acknowledgement
    gbt_ack_each: bool = False

    #: SN READ blocks: "list" (the encoded result list) or "data" (the bare Data), see sn.py
    sn_blocks: str = "list"


def _aare(
    ctx_id: int,
    result: int,
    diag: int,
    user_info: bytes = b"",
    title: bytes = b"",
    hls: Optional[tuple[int, bytes]] = None,
) -> bytes:
    """AARE; ``title`` the responding AP title, ``hls`` (mechanism, StoC challenge)."""
    body = b"\xa1\x09\x06\x07" + _APP_CTX_PREFIX + bytes((ctx_id,))
    body += b"\xa2\x03\x02\x01" + bytes((result,))
    body += b"\xa3\x05\xa1\x03\x02\x01" + bytes((diag,))
    if title:
        body += b"\xa4" + ber_len(len(title) + 2) + b"\x04" + ber_len(len(title)) + title
    if hls is not None:
        mech, challenge = hls
        body += b"\x88\x02\x07\x80"
        body += b"\x89\x07" + _MECH_PREFIX + bytes((mech,))
        body += (
            b"\xaa" + ber_len(len(challenge) + 2) + b"\x80" + ber_len(len(challenge)) + challenge
        )
    if user_info:
        body += (
            b"\xbe" + ber_len(len(user_info) + 2) + b"\x04" + ber_len(len(user_info)) + user_info
        )
    return bytes((AARE,)) + ber_len(len(body)) + body


def _initiate_response(conformance: int, max_pdu: int, vaa_name: int = 0x0007) -> bytes:
    """InitiateResponse; vaa-name is 0x0007 for LN, the association's base name for SN."""
    return (
        b"\x08\x00\x06\x5f\x1f\x04\x00"
        + conformance.to_bytes(3, "big")
        + max_pdu.to_bytes(2, "big")
        + vaa_name.to_bytes(2, "big")
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

    #: extra request services (plain APDU tag -> handler(session, apdu) -> reply APDU),
    #: for instance the short-name READ of ``sn.py``; they run once associated and,
    #: on a ciphered association, inside glo-ciphering like GET.
    SERVICES: dict[int, Callable[[Session, bytes], Optional[bytes]]] = {}

    __slots__ = (
        "device",
        "meter",
        "opts",
        "client_sap",
        "assoc",
        "associated",
        "authenticated",
        "client_max_pdu",
        "server_max_pdu",
        "conformance",
        "context_id",
        "blocks",
        "block_no",
        "block_invoke",
        "ciphered",
        "stoc",
        "ctos",
        "peer_title",
        "reject_auth",
        "gbt",
        "gbt_sent",
        "gbt_peer",
        "more",
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
        self.server_max_pdu = SERVER_MAX_PDU
        self.conformance = 0
        self.context_id = 0
        self.blocks: list[bytes] = []
        self.block_no = 0
        self.block_invoke = 0
        self.ciphered = False
        self.stoc = b""
        self.ctos = b""
        self.peer_title = b""
        self.reject_auth = reject_auth
        #: GBT blocks of the reply being sent, how many went out, client's last block number
        self.gbt: list[bytes] = []
        self.gbt_sent = 0
        self.gbt_peer = 0
        #: APDUs to send right after the reply (a streamed GBT window)
        self.more: list[bytes] = []

    # -- entry point -------------------------------------------------------
    def handle(self, client_sap: int, apdu: bytes) -> Optional[bytes]:
        """One request APDU -> one response APDU (None: no answer).

        Further APDUs of a streamed GBT window are left in ``self.more``.
        """
        if not apdu:
            return None
        tag = apdu[0]
        if tag == AARQ:
            return self._aarq(client_sap, apdu)
        if tag == RLRQ:
            return self._rlrq(apdu)
        if not self.associated or client_sap != self.client_sap:
            return b"\xd8\x01\x01"  # service-not-allowed, operation-not-possible
        if tag == GBT:
            return self._gbt_ack(apdu)
        self.gbt = []
        if self.ciphered:
            reply = self._ciphered(apdu)
        elif self.assoc is not None and self.assoc.security:
            return b"\xd8\x01\x01"  # plain APDU on a ciphered association
        else:
            reply = self._plain(apdu)
        if (
            reply is not None
            and self.conformance & CONF_GBT
            and len(reply) > self.client_max_pdu
            and reply[0] != EXCEPTION_RESPONSE
        ):
            return self._gbt_start(reply)
        return reply

    def _plain(self, apdu: bytes) -> Optional[bytes]:
        tag = apdu[0]
        if self.assoc is not None and self.assoc.referencing == 2:
            # short names: only READ/WRITE (sn.py), which check authentication per item
            # themselves, HLS pass 3 arriving through them
            service = self.SERVICES.get(tag)
            return service(self, apdu) if service is not None else b"\xd8\x02\x02"
        if tag == ACTION_REQUEST:
            return self._action(apdu)
        if not self.authenticated:
            return b"\xd8\x01\x01"
        if tag == GET_REQUEST and self.assoc is not None and self.assoc.referencing == 1:
            return self._get(apdu)
        return b"\xd8\x02\x02"  # service-unknown, service-not-supported

    def _ciphered(self, apdu: bytes) -> Optional[bytes]:
        plain_tag = sec.PLAIN_TAGS.get(apdu[0])
        if plain_tag is None or apdu[0] in (GLO_INITIATE_REQUEST, sec.GLO_CONFIRMED_SERVICE_ERROR):
            return b"\xd8\x01\x01"
        assoc = self.assoc
        assert assoc is not None
        try:
            n, pos = ax.dec_len(apdu, 1)
            sc, ic, plain = sec.decrypt(
                self.peer_title, assoc.block_key, assoc.auth_key, apdu[pos : pos + n]
            )
        except (sec.DecryptError, ValueError, IndexError):  # bad tag, truncated
            return b"\xd8\x01\x05"  # deciphering-error
        if sc & 0x30 != assoc.security & 0x30 or not plain or plain[0] != plain_tag:
            return b"\xd8\x01\x05"  # not the security policy of this association
        if ic <= self.meter.last_ic:
            return b"\xd8\x01\x06" + struct.pack(">I", self.meter.last_ic + 1)
        self.meter.last_ic = ic
        reply = self._plain(plain)
        if reply is None:
            return None
        out_tag = sec.GLO_TAGS.get(reply[0])
        if out_tag is None:
            return reply
        return self._encrypt(out_tag, reply)

    def _encrypt(self, out_tag: int, plain: bytes) -> bytes:
        assoc = self.assoc
        assert assoc is not None
        self.meter.server_ic += 1
        body = sec.encrypt(
            (assoc.security or sec.SC_AUTHENTICATED_ENCRYPTION) | assoc.security_suite,
            self.own_title,
            self.meter.server_ic,
            assoc.block_key,
            assoc.auth_key,
            plain,
        )
        return bytes((out_tag,)) + ax.enc_len(len(body)) + body

    @property
    def own_title(self) -> bytes:
        """The meter's system title on this association."""
        if self.assoc is not None and self.assoc.system_title:
            return self.assoc.system_title
        return self.meter.system_title

    # -- association ---------------------------------------------------------
    def _reset(self) -> None:
        self.associated = False
        self.authenticated = False
        self.ciphered = False
        self.assoc = None
        self.blocks = []
        self.stoc = b""
        self.gbt = []
        self.more = []

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
        if ctx_id != assoc.context_id:
            return self._reject(ctx_id, DIAG_CONTEXT_NOT_SUPPORTED, "wrong application context")
        if mech != assoc.mechanism:
            diag = DIAG_MECH_REQUIRED if mech == 0 else DIAG_MECH_NOT_RECOGNISED
            return self._reject(ctx_id, diag, f"mechanism {mech}, expected {assoc.mechanism}")
        if self.reject_auth and assoc.mechanism != cosem.MECH_NONE:
            return self._reject(ctx_id, DIAG_AUTH_FAILURE, "--reject-auth")
        if assoc.mechanism == cosem.MECH_LOW and password != assoc.secret:
            return self._reject(ctx_id, DIAG_AUTH_FAILURE, "wrong password")
        hls = assoc.mechanism in cosem.HLS_MECHANISMS
        if hls and not 8 <= len(password) <= 64:
            return self._reject(ctx_id, DIAG_AUTH_FAILURE, "no CtoS challenge of 8..64 bytes")
        needs_title = assoc.security or assoc.mechanism in (
            cosem.MECH_HLS_GMAC,
            cosem.MECH_HIGH_SHA256,
        )
        if needs_title:
            if len(calling_title) != 8:
                return self._reject(ctx_id, DIAG_AUTH_FAILURE, "no client system title")
            if assoc.client_system_title and calling_title != assoc.client_system_title:
                return self._reject(ctx_id, DIAG_AUTH_FAILURE, "unknown client system title")
        self.peer_title = calling_title
        # user information: InitiateRequest, ciphered or not
        try:
            if assoc.security:
                if not user_info or user_info[0] != GLO_INITIATE_REQUEST:
                    return self._reject(ctx_id, DIAG_NO_REASON, "InitiateRequest not ciphered")
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
        offered = CONFORMANCE_BY_REFERENCING.get(assoc.referencing, SUPPORTED_CONFORMANCE)
        self.conformance = conformance & offered
        self.client_max_pdu = max(64, min(max_pdu or SERVER_MAX_PDU, SERVER_MAX_PDU))
        self.client_sap = client_sap
        self.context_id = ctx_id
        self.assoc = assoc
        self.associated = True
        vaa = sn.sn_map(self.device).assoc_base if assoc.referencing == 2 else 0x0007
        init = _initiate_response(self.conformance, self.server_max_pdu, vaa)
        if assoc.security:
            init = self._encrypt(GLO_INITIATE_RESPONSE, init)
            self.ciphered = True
        title = self.own_title if (needs_title or hls) else b""
        if hls:
            self.authenticated = False
            self.ctos = password
            self.stoc = os.urandom(16)
            return _aare(
                ctx_id, 0, DIAG_AUTH_REQUIRED, init, title, hls=(assoc.mechanism, self.stoc)
            )
        self.authenticated = True
        return _aare(ctx_id, 0, DIAG_NULL, init, title)

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
            or ln not in (self.device.association_ln, cosem.LN_ASSOC)
            or method != 1
            or assoc is None
            or assoc.mechanism not in cosem.HLS_MECHANISMS
            or not self.stoc
        ):
            return head + b"\x0b\x00"  # object-unavailable
        try:
            value, _ = ax.decode(apdu, 13) if apdu[12] else (None, 0)
        except ax.DecodeError:
            return head + b"\x0c\x00"  # type-unmatched
        reply = self.hls_reply(value)
        if reply is None:
            return head + b"\x03\x00"  # read-write-denied (authentication failed)
        return head + b"\x00\x01\x00" + ax.octet_string(reply)

    def hls_reply(self, value: object) -> Optional[bytes]:
        """HLS pass 3: f(StoC) from the client -> f(CtoS), or None (association reset).

        Shared by ACTION on class 15 (LN) and READ/WRITE on class 12 (SN, ``sn.py``).
        """
        assoc = self.assoc
        if assoc is None or assoc.mechanism not in cosem.HLS_MECHANISMS or not self.stoc:
            return None
        if not (isinstance(value, bytes) and self._client_proof_ok(assoc, value)):
            log.info("meter %d client %d: HLS pass 3 failed", self.meter.k, self.client_sap)
            # released, but an answer is still ciphered with this association's keys
            self.associated = False
            self.stoc = b""
            return None
        reply = self._own_proof(assoc)
        self.stoc = b""
        self.authenticated = True
        return reply

    def _client_proof_ok(self, assoc: Association, value: bytes) -> bool:
        """Check f(StoC) sent by the client (HLS pass 3)."""
        if assoc.mechanism == cosem.MECH_HLS_GMAC:
            if len(value) != 17 or value[0] != sec.SC_AUTHENTICATION | assoc.security_suite:
                return False
            ic = int.from_bytes(value[1:5], "big")
            expected = sec.gmac_tag_sc(
                value[0], self.peer_title, ic, assoc.block_key, assoc.auth_key, self.stoc
            )
            return hmac.compare_digest(expected, value[5:])
        expected = sec.hls_proof(
            assoc.mechanism, assoc.secret, self.stoc, self.peer_title, self.own_title, self.ctos
        )
        return hmac.compare_digest(expected, value)

    def _own_proof(self, assoc: Association) -> bytes:
        """f(CtoS) of HLS pass 4."""
        if assoc.mechanism == cosem.MECH_HLS_GMAC:
            self.meter.server_ic += 1
            ic = self.meter.server_ic
            sc = sec.SC_AUTHENTICATION | assoc.security_suite
            tag = sec.gmac_tag_sc(
                sc, self.own_title, ic, assoc.block_key, assoc.auth_key, self.ctos
            )
            return bytes((sc,)) + ic.to_bytes(4, "big") + tag
        return sec.hls_proof(
            assoc.mechanism, assoc.secret, self.ctos, self.own_title, self.peer_title, self.stoc
        )

    # -- GET -------------------------------------------------------------------
    def _get(self, apdu: bytes) -> bytes:
        kind = apdu[1] if len(apdu) > 1 else 0
        if kind == 1:
            return self._get_normal(apdu)
        if kind == 2:
            return self._get_next(apdu)
        if kind == 3 and self.conformance & CONF_MULTIPLE_REFS:
            return self._get_with_list(apdu)
        return b"\xd8\x01\x02"  # service-not-supported

    def _read_one(self, apdu: bytes, pos: int) -> tuple[bytes, int]:
        """One attribute descriptor (+ access selection) at ``pos``.

        Returns (Get-Data-Result: 00 data or 01 code, position after the item).
        """
        class_id = int.from_bytes(apdu[pos : pos + 2], "big")
        ln = bytes(apdu[pos + 2 : pos + 8])
        if pos + 9 >= len(apdu):
            raise IndexError("truncated attribute descriptor")
        attr = apdu[pos + 8]
        pos += 9
        ctx = ReadContext(
            self.meter, int(time.time()), self.opts.utc_offset, self.client_sap, session=self
        )
        try:
            if apdu[pos]:
                ctx.selector = apdu[pos + 1]
                ctx.params, pos = ax.decode(apdu, pos + 2)
            else:
                pos += 1
        except (ax.DecodeError, IndexError):
            return bytes((1, cosem.OTHER_REASON)), len(apdu)
        try:
            data = self.device.read(ctx, class_id, ln, attr)
        except DataAccessError as e:
            code = e.code
            if code == cosem.OBJECT_UNDEFINED and self.opts.deny_wrong_class:
                code = cosem.READ_WRITE_DENIED
            return bytes((1, code)), pos
        except (ax.DecodeError, IndexError):
            return bytes((1, cosem.OTHER_REASON)), pos
        return b"\x00" + data, pos

    def _get_normal(self, apdu: bytes) -> bytes:
        if len(apdu) < 13:
            return b"\xd8\x02\x02"
        invoke = apdu[2]
        self.blocks = []
        try:
            result, _ = self._read_one(apdu, 3)
        except IndexError:
            return b"\xd8\x02\x02"
        if result[0]:
            return bytes((GET_RESPONSE, 1, invoke)) + result
        if self.opts.trailing_bytes and apdu[11] == 2 and apdu[4] in (7, 8) and not apdu[3]:
            # like Gurux's C reference meter: bytes after the clock and the profile buffer
            result += bytes(self.opts.trailing_bytes)
        return self._respond(invoke, 1, result, result[1:])

    def _get_with_list(self, apdu: bytes) -> bytes:
        invoke = apdu[2] if len(apdu) > 2 else 0
        self.blocks = []
        try:
            count, pos = ax.dec_len(apdu, 3)
            results = []
            for _ in range(count):
                r, pos = self._read_one(apdu, pos)
                results.append(r)
        except (IndexError, ax.DecodeError):
            return b"\xd8\x02\x02"
        body = ax.enc_len(count) + b"".join(results)
        return self._respond(invoke, 3, body, body)

    def _respond(self, invoke: int, kind: int, body: bytes, raw: bytes) -> bytes:
        """GET-Response ``kind`` with ``body``, or GET block transfer of ``raw`` if too big.

        With GBT negotiated the whole response goes out and ``handle`` cuts it.
        """
        limit = self.client_max_pdu - (40 if self.ciphered else 0)
        if (
            len(body) + 3 <= limit
            or self.conformance & CONF_GBT
            or not (self.conformance & CONF_BLOCK_GET)
        ):
            return bytes((GET_RESPONSE, kind, invoke)) + body
        size = limit - 12
        self.blocks = [raw[i : i + size] for i in range(0, len(raw), size)]
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

    # -- general block transfer ---------------------------------------------------
    def _gbt_start(self, reply: bytes) -> bytes:
        """Cut a long reply into GBT blocks; the first goes out at once (window 1)."""
        size = self.client_max_pdu - 10
        self.gbt = [reply[i : i + size] for i in range(0, len(reply), size)]
        self.gbt_sent = 0
        self.gbt_peer = 0
        return self._gbt_window(1)

    def _gbt_block(self, streaming: bool) -> bytes:
        chunk = self.gbt[self.gbt_sent]
        self.gbt_sent += 1
        last = self.gbt_sent == len(self.gbt)
        if self.opts.gbt_ack_each:
            streaming = not last and self.gbt_sent > 1  # 0x41 after block 1 (Java meter)
        bc = 0x80 if last else (0x40 if streaming else 0)
        bc |= 1  # the window the meter would accept from the client
        out = (
            bytes((GBT, bc))
            + self.gbt_sent.to_bytes(2, "big")
            + self.gbt_peer.to_bytes(2, "big")
            + ax.enc_len(len(chunk))
            + chunk
        )
        if last:
            self.gbt = []
        return out

    def _gbt_window(self, window: int) -> bytes:
        """The next ``window`` blocks: the first is the reply, the rest wait in ``more``."""
        n = min(window, len(self.gbt) - self.gbt_sent)
        out = [self._gbt_block(i < n - 1) for i in range(n)]
        self.more = out[1:]
        return out[0]

    def _gbt_ack(self, apdu: bytes) -> Optional[bytes]:
        """The client's GBT acknowledgement: send the next window (or repeat lost blocks)."""
        if len(apdu) < 6 or not self.gbt:
            return b"\xd8\x01\x01"
        window = apdu[1] & 0x3F or 1
        self.gbt_peer = int.from_bytes(apdu[2:4], "big")
        acked = int.from_bytes(apdu[4:6], "big")
        if acked > self.gbt_sent:
            self.gbt = []
            return b"\xd8\x01\x01"
        self.gbt_sent = acked  # resend what the client did not confirm
        if self.opts.interface != "WRAPPER" or self.opts.gbt_ack_each:
            window = 1  # HDLC carries one APDU per turn: no streaming
        return self._gbt_window(min(window, MAX_GBT_WINDOW))


Session.SERVICES.update(sn.SERVICES)
