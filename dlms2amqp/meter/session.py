# SPDX-License-Identifier: GPL-2.0-or-later
"""MeterSession: open (associate), read attributes as raw A-XDR, close.

Gurux does what is hard to get right (AARQ/AARE, HLS, ciphering, HDLC and
block transfer); the attribute values themselves are returned as raw bytes and
decoded by :mod:`dlms2amqp.axdr`, because Gurux's value decoding is most of the
gateway's CPU on profile reads (gurux-facts.md).  Raw mode is switched per
reply object (``reply.raw_only``), so concurrent threads do not interfere.

Every step has a name used in timeout messages ("connect", "association",
"reading 1.0.99.1.0.255 attribute 2"); every wait is bounded by the per-frame
timeout and by the whole-request deadline.  ``close`` releases the association
and the media in ``finally`` and never raises.
"""

from __future__ import annotations

import time
from datetime import timezone
from typing import Any, Callable, Optional

from gurux_dlms import GXByteBuffer, GXDLMSClient, GXDLMSException
from gurux_dlms.enums import (
    Authentication,
    Conformance,
    InterfaceType,
    RequestTypes,
    Security,
    Standard,
)
from gurux_dlms.enums.ExceptionServiceError import ExceptionServiceError
from gurux_dlms.GXDLMSConfirmedServiceError import GXDLMSConfirmedServiceError
from gurux_dlms.GXDLMSExceptionResponse import GXDLMSExceptionResponse
from gurux_dlms.secure import GXDLMSSecureClient

from ..errors import (
    AuthenticationError,
    InvocationCounterError,
    MeterConnectionError,
    MeterError,
    MeterProtocolError,
    MeterTimeoutError,
    ObjectError,
)
from . import axdr
from .connstring import ConnSettings
from .counters import BLOCK, CounterStore, counter_key
from .gurux_compat import ReplyData  # (patches Gurux on import)
from .media import Media, SerialMedia, TcpMedia

_AUTH = {
    "None": Authentication.NONE,
    "Low": Authentication.LOW,
    "High": Authentication.HIGH,
    "HighMD5": Authentication.HIGH_MD5,
    "HighSHA1": Authentication.HIGH_SHA1,
    "HighGMAC": Authentication.HIGH_GMAC,
    "HighSHA256": Authentication.HIGH_SHA256,
}
_SECURITY = {
    "None": Security.NONE,
    "Authentication": Security.AUTHENTICATION,
    "Encryption": Security.ENCRYPTION,
    "AuthenticationEncryption": Security.AUTHENTICATION_ENCRYPTION,
}
_INTERFACE = {
    "HDLC": InterfaceType.HDLC,
    "WRAPPER": InterfaceType.WRAPPER,
    "HdlcWithModeE": InterfaceType.HDLC_WITH_MODE_E,
}
_STANDARD = {
    "DLMS": Standard.DLMS,
    "India": Standard.INDIA,
    "Italy": Standard.ITALY,
    "SaudiArabia": Standard.SAUDI_ARABIA,
    "IDIS": Standard.IDIS,
}
DATA_ACCESS_RESULTS = {
    1: "hardware-fault",
    2: "temporary-failure",
    3: "read-write-denied",
    4: "object-undefined",
    9: "object-class-inconsistent",
    11: "object-unavailable",
    12: "type-unmatched",
    13: "scope-of-access-violated",
    14: "data-block-unavailable",
    15: "long-get-aborted",
    16: "no-long-get-in-progress",
    250: "other-reason",
}
#: results that mean "this (class, OBIS) does not exist here" (the class guess may be wrong)
NOT_FOUND = {4, 9, 11}
MAX_REPLY_BYTES = 8 * 1024 * 1024
#: Gurux exceptions that mean "the meter answered no" (the association is fine)
_REFUSALS = (GXDLMSExceptionResponse, GXDLMSConfirmedServiceError)
#: bytes a glo-ciphered APDU adds (tag, length, security control, invocation counter, tag)
CIPHER_OVERHEAD = 20


def gurux_to_native(v: Any) -> Any:
    """A value decoded by Gurux -> the natives axdr returns (list reads only; small)."""
    name = type(v).__name__
    if name == "GXDateTime":
        dt = v.value
        return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)
    if name == "GXDate":
        return v.value.date()
    if name == "GXTime":
        return v.value.time()
    if name == "GXBitString":
        return str(v)
    if isinstance(v, (bytes, bytearray)):
        return bytes(v)
    if isinstance(v, list):
        return [gurux_to_native(x) for x in v]
    if isinstance(v, bool):
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return float(v)
    return v


class DataAccessError(ObjectError):
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class MeterSession:
    """One association with one meter; not thread-safe (one thread per meter)."""

    def __init__(
        self,
        settings: ConnSettings,
        frame_timeout: float = 5.0,
        counters: Optional[CounterStore] = None,
        trace: Optional[Callable[[str, bytes], None]] = None,
    ):
        self.settings = settings
        self.frame_timeout = frame_timeout
        self.counters = counters
        self.trace = trace
        self.deadline = time.monotonic() + 3600
        self.media: Optional[Media] = None
        self.client: Optional[GXDLMSClient] = None
        self.associated = False
        self.linked = False  # HDLC link up (UA received): DISC it on close
        self.broken = False
        self.last_used = time.monotonic()
        self._counter_key: Optional[str] = None
        self._reserved = 0
        self.class_cache: dict = {}  # obis -> class id learnt on this session

    # --- setup -------------------------------------------------------------------
    def _server_address(self) -> int:
        """The address as Gurux's example client builds it (connstring did the -s/-l/-n)."""
        return self.settings.server_address

    def _make_client(self, public: bool = False) -> GXDLMSClient:
        """A Gurux client set up the way Gurux's example client sets it up from the string.

        Always the secure client, as Gurux's examples use: the High family needs its
        ciphering object even without -C (the plain client has none).
        """
        s = self.settings
        ln = s.referencing == "LN"
        itype = _INTERFACE[s.interface]
        server = self._server_address()
        if public:
            client = GXDLMSSecureClient(ln, 16, server, Authentication.NONE, None, itype)
        else:
            password = s.password.reveal() if s.password else None
            if isinstance(password, bytes):
                password = bytearray(password)
            client = GXDLMSSecureClient(
                ln, s.client_address, server, _AUTH[s.authentication], password, itype
            )
            c = client.ciphering
            c.security = _SECURITY[s.security]
            if s.system_title is not None:
                c.systemTitle = bytearray(s.system_title)
            if s.authentication_key is not None:
                c.authenticationKey = bytearray(s.authentication_key.reveal())
            if s.block_cipher_key is not None:
                c.blockCipherKey = bytearray(s.block_cipher_key.reveal())
            if s.dedicated_key is not None:
                c.dedicatedKey = bytearray(s.dedicated_key.reveal())
            # -M is not handed to Gurux as serverSystemTitle (pre-established title): in
            # gurux-dlms that switches every GET to general-glo-ciphering even where the
            # meter did not negotiate general-protection, which such meters refuse; it
            # changes nothing in the SNRM or AARQ.  -M keys the invocation counter instead.
            if s.propose_general_protection:
                client.proposedConformance |= Conformance.GENERAL_PROTECTION
        client.standard = _STANDARD[s.standard]
        client.useUtc2NormalTime = s.utc_to_normal_time
        if s.gbt_window_size_given and ln:
            # -W: Gurux's .NET client proposes general block transfer for LN and sets the
            # window (the Python example's -W is a no-op through a typo in gurux-dlms)
            client.settings.gbtWindowSize = s.gbt_window_size
            client.proposedConformance |= Conformance.GENERAL_BLOCK_TRANSFER
        if s.gateway is not None:
            from gurux_dlms.GXDLMSGateway import GXDLMSGateway

            gateway = GXDLMSGateway()
            gateway.networkId = s.gateway[0]
            gateway.physicalDeviceAddress = bytearray(s.gateway[1])
            client.gateway = gateway
        client.autoIncreaseInvokeID = s.auto_increase_invoke_id
        if s.manufacturer_id:
            client.manufacturerId = s.manufacturer_id
        if s.interface != "WRAPPER":
            # frames over 255 bytes are framed correctly by gurux_compat's HDLC patch
            client.hdlcSettings.maxInfoTX = s.hdlc_frame_size
            client.hdlcSettings.maxInfoRX = s.hdlc_frame_size
            client.hdlcSettings.windowSizeTX = s.hdlc_window_size
            client.hdlcSettings.windowSizeRX = s.hdlc_window_size
        return client

    def _open_media(self) -> Media:
        s = self.settings
        timeout = min(self.frame_timeout, self._remaining("connect"))
        if s.serial_port is None:
            return TcpMedia(s.host, s.port, timeout, self.trace)
        baud = 300 if s.interface == "HdlcWithModeE" else s.baud_rate
        media = SerialMedia(s.serial_port, baud, s.data_bits, s.parity, s.stop_bits, self.trace)
        if s.interface == "HdlcWithModeE":
            try:
                media.mode_e_handshake(timeout, s.data_bits, s.parity, s.stop_bits)
            except BaseException:
                media.close()
                raise
        return media

    def _remaining(self, step: str) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise MeterTimeoutError(f"timeout during {step} (request deadline reached)")
        return left

    # --- public API -----------------------------------------------------------------
    def open(self, deadline: float) -> None:
        """Connect and associate; on failure everything is released before raising."""
        self.deadline = deadline
        meter_counter = None
        for attempt in (1, 2):
            try:
                if attempt == 1 and self.settings.invocation_counter_obis and self._ciphered():
                    meter_counter = self._read_public_counter()
                self.client = self._make_client()
                if self._ciphered():
                    self._init_counter(meter_counter)
                self.media = self._open_media()
                self._associate(self.client)
                if self._counter_key is not None:
                    self._learn_system_title()
                return
            except InvocationCounterError as exc:
                self.broken = True
                self.close()
                self.broken = False
                expected = getattr(exc, "expected", None)
                if attempt == 2 or not expected:
                    raise
                # the meter told which counter it expects: resynchronise once, upwards only
                meter_counter = max(meter_counter or 0, expected - 1)
            except BaseException:
                self.close()
                raise

    def _ciphered(self) -> bool:
        s = self.settings
        return s.security != "None" or s.authentication == "HighGMAC"

    def _associate(self, client: GXDLMSClient) -> None:
        if client.interfaceType in (InterfaceType.HDLC, InterfaceType.HDLC_WITH_MODE_E):
            reply = self._request(client.snrmRequest(), "HDLC connection (SNRM)", raw=False)
            self._parse("HDLC connection (SNRM)", client.parseUAResponse, reply.data)
            self.linked = True
        # the AARQ may carry a password in clear, maybe over several frames: mask it all
        masking = hasattr(self.trace, "masking")
        if masking:
            self.trace.masking = True  # type: ignore[union-attr]
        try:
            reply = self._request(client.aarqRequest(), "association", raw=False)
        finally:
            if masking:
                self.trace.masking = False  # type: ignore[union-attr]
        self._parse("association", client.parseAareResponse, reply.data)
        self.associated = True
        if client.getIsAuthenticationRequired():
            self._authenticate(client)

    def _authenticate(self, client: GXDLMSClient) -> None:
        """HLS pass 3/4: answer the meter's challenge and check its answer to ours."""
        step = "authentication"
        try:
            reply = self._request(client.getApplicationAssociationRequest(), step, raw=False)
        except ObjectError as exc:  # a confirmed-service-error to reply_to_HLS_authentication
            raise AuthenticationError(self._hls_refused()) from exc
        if reply.error:  # the action answered with a result other than success
            raise AuthenticationError(self._hls_refused())
        try:
            # Gurux raises a bare Exception when the meter's f(CtoS) is missing or wrong
            client.parseApplicationAssociationResponse(reply.data)
        except Exception as exc:
            raise AuthenticationError(self._hls_refused()) from exc

    def _hls_refused(self) -> str:
        s = self.settings
        if s.authentication == "HighGMAC":
            check = "the keys (-A, -B) and the system title (-T)"
        else:
            check = "the password (-P)"
        return (
            f"Authentication failure: the meter did not accept the {s.authentication} "
            f"login (it refused our answer to its challenge, or did not answer ours "
            f"correctly); check {check} and the client address (-c)"
        )

    def _parse(self, step: str, fn, data) -> None:
        try:
            fn(data)
        except MeterError:
            raise
        except Exception as exc:
            raise self._translate(exc, step) from exc

    def _read_public_counter(self) -> int:
        """Read the invocation counter object through the public client (16)."""
        obis = self.settings.invocation_counter_obis
        step = f"reading the invocation counter {obis}"
        self.client = self._make_client(public=True)
        self.media = self._open_media()
        try:
            self._associate(self.client)
            value = axdr.decode_all(self.get_raw(1, obis, 2, step=step))
            if not isinstance(value, int):
                raise MeterProtocolError(f"the invocation counter {obis} is not a number")
            return value
        finally:
            self.close()
            self.broken = False

    def _init_counter(self, meter_counter: Optional[int]) -> None:
        s = self.settings
        next_ic = max(meter_counter + 1 if meter_counter is not None else 1,
                      s.initial_invocation_counter or 1)  # fmt: skip
        if self.counters is not None:
            meter_id = (
                s.meter_system_title.hex()
                if s.meter_system_title
                else self.counters.alias(s.meter_key) or s.meter_key
            )
            self._counter_key = counter_key(meter_id, s.system_title, s.block_cipher_key.reveal())
            next_ic = max(next_ic, self.counters.load(self._counter_key) + 1)
        self.client.ciphering.invocationCounter = next_ic
        self._reserve()

    def _learn_system_title(self) -> None:
        """Key the counter by the meter's system title from now on (the AARE told it)."""
        title = self.client.settings.sourceSystemTitle
        if not title or len(title) != 8:
            return
        s = self.settings
        new_key = counter_key(bytes(title).hex(), s.system_title, s.block_cipher_key.reveal())
        if new_key != self._counter_key:
            # counters already used with this meter elsewhere (another address) stay used
            prior = self.counters.load(new_key)
            if prior >= self.client.ciphering.invocationCounter:
                self.client.ciphering.invocationCounter = prior + 1
            mark = max(self._reserved, self.counters.load(self._counter_key))
            self._reserved = self.counters.reserve(new_key, mark)
            self._counter_key = new_key
        self.counters.set_alias(s.meter_key, bytes(title).hex())
        self._reserve()

    def _reserve(self) -> None:
        if self.counters is None or self._counter_key is None:
            return
        nxt = self.client.ciphering.invocationCounter
        if nxt + 4 > self._reserved:
            self._reserved = self.counters.reserve(self._counter_key, nxt + BLOCK)

    def get_raw(
        self,
        class_id: int,
        obis: str,
        attr: int,
        selector: int = 0,
        params: Optional[bytes] = None,
        step: Optional[str] = None,
    ) -> bytes:
        """GET one attribute; returns its A-XDR bytes, DataAccessError on a refusal."""
        step = step or f"reading {obis} attribute {attr}"
        data = None
        if selector:
            data = GXByteBuffer(bytes([selector]) + (params or b""))
        name = obis
        if self.settings.referencing == "SN":
            name = self._short_name(obis)
        frames = self.client._read(name, class_id, attr, data)
        reply = self._request(frames, step, raw=True)
        if reply.error:
            raise self._access_error(class_id, obis, attr, reply.error)
        raw = bytes(reply.data.array())
        if reply.read_blocks and self.settings.referencing == "SN":
            # SN READ blocks carry the result list or the bare Data, depending on the meter
            result, extra = axdr.single_result(raw)
            if isinstance(result, int):
                raise self._access_error(class_id, obis, attr, result)
            if extra:
                self.note(f"{extra} trailing bytes after the value of {obis} ignored")
            return result
        return raw

    @staticmethod
    def _access_error(class_id: int, obis: str, attr: int, code: int) -> DataAccessError:
        text = DATA_ACCESS_RESULTS.get(code, f"error {code}")
        if code in NOT_FOUND:
            msg = f"unknown object {obis} (class {class_id}): the meter answered {text}"
        elif code == 3:
            msg = f"access denied to {obis} attribute {attr} ({text})"
        else:
            msg = f"the meter refused {obis} attribute {attr}: {text}"
        return DataAccessError(msg, code)

    def list_chunk(self) -> int:
        """How many attributes one GET-with-list may carry on this association.

        As Gurux's clients do: the request must fit in one APDU of the size the meter
        negotiated (10 bytes per attribute, 12 for the header, room for a ciphering
        header), and never more than 10 attributes ("all meters can handle 10").
        """
        budget = int(self.client.settings.maxPduSize) - 12
        if self._ciphered():
            budget -= CIPHER_OVERHEAD
        return max(1, min(10, budget // 10))

    def get_list(self, items: list, step: Optional[str] = None) -> list:
        """GET-with-list: [(class_id, obis, attr)] -> per item its A-XDR bytes or a DataAccessError.

        A long list goes out in chunks of :meth:`list_chunk`; a refused item is a
        DataAccessError in its own place, the other items still carry their values.
        """
        from gurux_dlms.objects import GXDLMSObject

        out: list = [None] * len(items)
        names: dict = {}
        wanted = []
        for i, (_class_id, obis, _attr) in enumerate(items):
            if self.settings.referencing == "SN":
                try:
                    names[i] = self._short_name(obis)
                except ObjectError as exc:
                    out[i] = exc  # not in the object list: nothing to ask the meter
                    continue
            wanted.append(i)
        size = self.list_chunk()
        what = step or f"reading a list of {len(items)} attributes"
        for first in range(0, len(wanted), size):
            chunk = wanted[first : first + size]
            objs = []
            for i in chunk:
                class_id, obis, attr = items[i]
                objs.append((GXDLMSObject(class_id, obis, names.get(i, 0)), attr))
            try:
                messages = self.client.readList(objs)
            except ValueError as exc:
                raise ObjectError(
                    "the meter does not support reading a list in one request"
                ) from exc
            results: list = []
            for message in messages:
                try:
                    reply = self._request(message, what, raw=True, results=True)
                except (MeterProtocolError, ObjectError) as exc:
                    # an exception-response or a confirmed-service-error to the list
                    # request is an answer: the association stays usable
                    if isinstance(exc.__cause__, _REFUSALS):
                        self.broken = False
                    raise
                if reply.error:
                    # the whole request refused (not per item)
                    text = DATA_ACCESS_RESULTS.get(reply.error, f"error {reply.error}")
                    raise DataAccessError(f"the meter refused the list read: {text}", reply.error)
                part, extra = axdr.split_results(bytes(reply.data.array()))
                if extra:
                    self.note(f"{extra} trailing bytes after the list reply ignored")
                results += part
            if len(results) != len(chunk):
                raise MeterProtocolError(
                    f"the meter answered a list read of {len(chunk)} attributes "
                    f"with {len(results)} results"
                )
            for i, result in zip(chunk, results):
                out[i] = (
                    result if isinstance(result, bytes) else self._access_error(*items[i], result)
                )
        return out

    def note(self, text: str) -> None:
        """A line in the --trace output (no-op without tracing): what the gateway decided."""
        note = getattr(self.trace, "note", None)
        if note is not None:
            note(text)

    def supports_list_reads(self) -> bool:
        from gurux_dlms.enums import Conformance

        try:
            return bool(self.client.negotiatedConformance & Conformance.MULTIPLE_REFERENCES)
        except (AttributeError, TypeError):
            return False

    def _short_name(self, obis: str) -> int:
        sn = self.class_cache.get(("sn", obis))
        if sn is None:
            self.load_object_list()
            sn = self.class_cache.get(("sn", obis))
        if sn is None:
            raise ObjectError(f"unknown object {obis}: not in the meter's object list")
        return sn

    def load_object_list(self) -> None:
        """Read the association's object list (class and short name of every object)."""
        if self.class_cache.get("object list read"):
            return  # one association's object list does not change while it lasts
        step = "reading the object list"
        reply = self._request(self.client.getObjectsRequest(), step, raw=False)
        try:
            objects = self.client.parseObjects(reply.data, False)
        except Exception as exc:
            raise MeterProtocolError("the meter's object list could not be understood") from exc
        for obj in objects:
            ln = str(obj.logicalName)
            self.class_cache[ln] = int(obj.objectType)
            if obj.shortName:
                self.class_cache[("sn", ln)] = obj.shortName
        self.class_cache["object list read"] = True

    def close(self) -> None:
        """Release the association (unless broken) and the media; never raises."""
        media, client = self.media, self.client
        try:
            if media is not None and client is not None and not self.broken:
                self.deadline = time.monotonic() + min(self.frame_timeout, 2.0)
                if self.associated:
                    try:
                        self._request(client.releaseRequest(), "release", raw=False)
                    except Exception:  # noqa: S110 - best effort, the media is closed below
                        pass
                if self.linked and client.interfaceType != InterfaceType.WRAPPER:
                    try:
                        self._request(client.disconnectRequest(), "disconnect", raw=False)
                    except Exception:  # noqa: S110
                        pass
        finally:
            self.associated = False
            self.linked = False
            self.media = None
            if media is not None:
                media.close()

    @property
    def alive(self) -> bool:
        return self.associated and not self.broken and self.media is not None

    # --- exchange -----------------------------------------------------------------
    def _request(self, frames, step: str, raw: bool, results: bool = False) -> ReplyData:
        """Send the frames, collect every block; ``results``: keep a list reply's raw results."""
        if frames is None:
            frames = []
        elif isinstance(frames, (bytes, bytearray)):
            frames = [frames]
        reply = ReplyData()
        reply.raw_only = raw
        reply.raw_list = results
        blocks = 0
        try:
            for frame in frames:
                reply.clear()
                reply.raw_only = raw
                reply.raw_list = results
                self._exchange(frame, reply, step)
                while reply.isMoreData():
                    if reply.moreData & RequestTypes.DATABLOCK:
                        blocks += 1
                    self._exchange(self.client.receiverReady(reply), reply, step)
        except MeterError:
            self.broken = True
            raise
        except Exception as exc:
            self.broken = True
            raise self._translate(exc, step) from exc
        self.last_used = time.monotonic()
        reply.read_blocks = blocks
        return reply

    def _exchange(self, frame, reply: ReplyData, step: str) -> None:
        if self.media is None:
            raise MeterConnectionError(f"no connection to the meter during {step}")
        if self._counter_key is not None:
            self._reserve()
        if frame:  # empty: nothing to send, the meter streams more (GBT window)
            self.media.send(bytes(frame))
        buf = GXByteBuffer()
        received = 0
        while True:
            try:
                timeout = min(self.frame_timeout, self._remaining(step))
                chunk = self.media.recv(timeout, step)
            except MeterTimeoutError as exc:
                if received:
                    raise MeterProtocolError(
                        f"the meter's answer is not a valid DLMS frame during {step} "
                        f"({received} bytes received, no complete frame)"
                    ) from exc
                raise
            received += len(chunk)
            buf.set(chunk)
            if self.client.getData(buf, reply, None):
                return
            if buf.size > MAX_REPLY_BYTES:
                raise MeterProtocolError(f"the meter's answer is too long during {step}")

    def _translate(self, exc: Exception, step: str) -> MeterError:
        if isinstance(exc, GXDLMSExceptionResponse):
            if exc.exceptionServiceError == ExceptionServiceError.INVOCATION_COUNTER_ERROR:
                err = InvocationCounterError(
                    f"invocation counter rejected by the meter during {step} "
                    f"(the meter expects at least {exc.serviceErrorValue}); "
                    "read the meter's counter with -v 0.0.43.1.0.255"
                )
                err.expected = (
                    exc.serviceErrorValue if isinstance(exc.serviceErrorValue, int) else None
                )
                return err
            return MeterProtocolError(f"the meter refused the request during {step}: {exc}")
        if isinstance(exc, GXDLMSException):
            parts = [p.strip().rstrip(".") for p in str(exc).splitlines() if p.strip()]
            text = ". ".join(parts) + "." if parts else "Association rejected by the meter."
            return AuthenticationError(text)
        if isinstance(exc, GXDLMSConfirmedServiceError):
            return ObjectError(f"the meter refused the request during {step}: {exc}")
        text = str(exc)
        if "authentication" in text.lower() or "invalid password" in text.lower():
            return AuthenticationError(f"authentication failed during {step}")
        return MeterProtocolError(f"the meter's answer could not be understood during {step}")
