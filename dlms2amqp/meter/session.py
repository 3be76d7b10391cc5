# SPDX-License-Identifier: GPL-2.0-or-later
"""MeterSession: open (associate), read attributes as raw A-XDR, close.

Gurux does what is hard to get right (AARQ/AARE, HLS, ciphering, HDLC and
block transfer); the attribute values themselves are returned as raw bytes and
decoded by :mod:`dlms2amqp.meter.axdr`, because Gurux's value decoding is most of
the gateway's CPU on profile reads.  Raw mode is switched per reply object
(``reply.raw_only``), so concurrent threads do not interfere.

The rooms around it: :mod:`.link` sends and waits (every wait bounded by the
per-frame timeout and the whole-request deadline, every step named in its errors:
"connect", "association", "reading 1.0.99.1.0.255 attribute 2"), and
:class:`.counters.CounterPolicy` decides the invocation counters.  The reader and
the pool change a session only through its methods (:meth:`MeterSession.resume`,
:meth:`~MeterSession.finish`, :meth:`~MeterSession.abandon`, ...).  ``close`` releases the
association and the media in ``finally`` and never raises.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from gurux_dlms import GXByteBuffer, GXDLMSClient
from gurux_dlms.enums import Conformance, InterfaceType

from ..errors import (
    AuthenticationError,
    ConnectionStringError,
    InvocationCounterError,
    MeterError,
    MeterProtocolError,
    ObjectError,
)
from . import axdr
from .client import key_bytes, make_client
from .connstring import ConnSettings
from .counters import DEFAULT_COUNTER_OBIS, CounterPolicy, CounterStore, count_resync
from .gurux_compat import ReplyData  # (patches Gurux on import)
from .link import REFUSALS, Frames, Link, parse
from .media import Media, Trace

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
#: bytes a glo-ciphered APDU adds (tag, length, security control, invocation counter, tag)
CIPHER_OVERHEAD = 20


class DataAccessError(ObjectError):
    """The meter answered a data-access result other than success; ``code`` says which."""

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
        trace: Optional[Trace] = None,
    ):
        self.settings = settings
        self.counters = counters
        self.link = Link(frame_timeout, trace)
        self._client: Optional[GXDLMSClient] = None
        self.associated = False
        self.linked = False  # HDLC link up (UA received): DISC it on close
        self._policy: Optional[CounterPolicy] = None
        #: obis -> class id, ("sn", obis) -> short name, learnt on this association
        self.class_cache: dict = {}

    # --- what the reader and the pool see ------------------------------------------
    @property
    def client(self) -> GXDLMSClient:
        """The Gurux client of the association (set up by :meth:`open`)."""
        if self._client is None:
            raise RuntimeError("the session is not open")
        return self._client

    @client.setter
    def client(self, client: GXDLMSClient) -> None:
        self._client = client

    @property
    def media(self) -> Optional[Media]:
        return self.link.media

    @property
    def last_used(self) -> float:
        return self.link.last_used

    @property
    def alive(self) -> bool:
        return self.associated and not self.link.broken and self.link.media is not None

    def stale(self) -> bool:
        """The meter closed, or sent unsolicited bytes, while the session was idle."""
        return self.link.stale()

    def resume(self, deadline: float, trace: Optional[Trace]) -> None:
        """Take a pooled session up for one more request (its deadline and its trace)."""
        self.link.deadline = deadline
        self.link.set_trace(trace)

    def finish(self) -> None:
        """The request is over: stop tracing to its sink (the session may be pooled)."""
        self.link.set_trace(None)

    def abandon(self) -> None:
        """The connection is not to be trusted: close the media without releasing politely."""
        self.link.broken = True
        self.close()

    def known_class(self, obis: str) -> Optional[int]:
        """The class of ``obis`` learnt on this association (object list or a read)."""
        return self.class_cache.get(obis)

    def learn_class(self, obis: str, class_id: int) -> None:
        """Remember the class a read proved for ``obis`` (no guess next time)."""
        self.class_cache[obis] = class_id

    def note(self, text: str) -> None:
        """A line in the --trace output (no-op without tracing): what the gateway decided."""
        self.link.note(text)

    # --- setup -------------------------------------------------------------------
    def _make_client(self, public: bool = False) -> GXDLMSClient:
        """The Gurux client for this meter's string (``public``: client 16, no security)."""
        return make_client(self.settings, public)

    # --- open ------------------------------------------------------------------------
    def open(self, deadline: float) -> None:
        """Connect and associate; on failure everything is released before raising."""
        self.link.deadline = deadline
        meter_counter = None
        for attempt in (1, 2):
            try:
                if attempt == 1 and self.settings.invocation_counter_obis and self._ciphered():
                    meter_counter = self._read_public_counter()
                self.client = self._make_client()
                if self._ciphered() and self._init_counter(meter_counter) and attempt == 1:
                    count_resync()  # -v: the meter's counter was above ours
                self.link.open(self.settings)
                self._associate(self.client)
                if self._policy is not None and self._policy.name is not None:
                    self._learn_system_title()
                return
            except InvocationCounterError as exc:
                self.abandon()
                self.link.broken = False
                expected = getattr(exc, "expected", None)
                if attempt == 1 and not expected and not self.settings.invocation_counter_obis:
                    # another owner (host) moved the meter's counter on: ask the meter
                    try:
                        expected = self._read_public_counter(DEFAULT_COUNTER_OBIS) + 1
                    except MeterError:
                        expected = None
                if attempt == 2 or not expected:
                    raise
                # the meter told which counter it expects: resynchronise once, upwards only
                count_resync()
                meter_counter = max(meter_counter or 0, expected - 1)
            except BaseException:
                self.close()
                raise

    def _ciphered(self) -> bool:
        s = self.settings
        return s.security != "None" or s.authentication == "HighGMAC"

    def _request(self, frames: Frames, step: str, raw: bool, results: bool = False) -> ReplyData:
        return self.link.request(self.client, frames, step, raw, results)

    def _associate(self, client: GXDLMSClient) -> None:
        if client.interfaceType in (InterfaceType.HDLC, InterfaceType.HDLC_WITH_MODE_E):
            reply = self._request(client.snrmRequest(), "HDLC connection (SNRM)", raw=False)
            parse("HDLC connection (SNRM)", client.parseUAResponse, reply.data)
            self.linked = True
        # the AARQ may carry a password in clear, maybe over several frames: mask it all
        with self.link.masked():
            reply = self._request(client.aarqRequest(), "association", raw=False)
        parse("association", client.parseAareResponse, reply.data)
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

    # --- invocation counter (the policy is counters.CounterPolicy) --------------------
    def _read_public_counter(self, obis: Optional[str] = None) -> int:
        """Read the invocation counter object through the public client (16): ``obis``,
        or -v's."""
        obis = obis or self.settings.invocation_counter_obis or ""
        step = f"reading the invocation counter {obis}"
        self.client = self._make_client(public=True)
        self.link.open(self.settings)
        try:
            self._associate(self.client)
            value = axdr.decode_all(self.get_raw(1, obis, 2, step=step))
            if not isinstance(value, int):
                raise MeterProtocolError(f"the invocation counter {obis} is not a number")
            return value
        finally:
            self.close()
            self.link.broken = False

    def _init_counter(self, meter_counter: Optional[int]) -> bool:
        """Set the next counter; True when the meter's value was above ours (a resync)."""
        s = self.settings
        if self._policy is None:
            if s.system_title is None or s.block_cipher_key is None:
                raise ConnectionStringError("ciphering needs -T and -B")  # connstring checks
            key = key_bytes(s.block_cipher_key.reveal())
            self._policy = CounterPolicy(self.counters, s.meter_key, s.system_title, bytes(key))
        ciphering = self.client.ciphering
        policy = self._policy
        ciphering.invocationCounter = policy.start(
            meter_counter, s.initial_invocation_counter, s.meter_system_title
        )
        if policy.name is not None:  # counters persisted: reserve before every frame
            self.link.before_send = lambda: policy.reserve(ciphering.invocationCounter)
        return policy.resynced

    def _learn_system_title(self) -> None:
        """Key the counter by the meter's system title from now on (the AARE told it)."""
        title = self.client.settings.sourceSystemTitle
        if not title or len(title) != 8 or self._policy is None:
            return
        ciphering = self.client.ciphering
        ciphering.invocationCounter = self._policy.learn_title(
            bytes(title), ciphering.invocationCounter
        )

    # --- reads -------------------------------------------------------------------------
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
        name: Any = obis
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
                    if isinstance(exc.__cause__, REFUSALS):
                        self.link.broken = False
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
                if isinstance(result, bytes):
                    out[i] = result
                else:
                    class_id, obis, attr = items[i]
                    out[i] = self._access_error(class_id, obis, attr, result)
        return out

    def supports_list_reads(self) -> bool:
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
        return int(sn)

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

    # --- close -------------------------------------------------------------------------
    def close(self) -> None:
        """Release the association (unless broken) and the media; never raises."""
        link, client = self.link, self._client
        try:
            if link.media is not None and client is not None and not link.broken:
                link.deadline = time.monotonic() + min(link.frame_timeout, 2.0)
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
            link.close()
