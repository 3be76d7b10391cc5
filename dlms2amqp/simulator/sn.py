# SPDX-License-Identifier: GPL-2.0-or-later
"""Short-name (SN) referencing for the simulator: base names, READ and WRITE.

Meters such as Landis+Gyr's older ones address objects by a 16-bit *base
name* instead of class id + logical name (IEC 62056-53 "SN referencing",
application context 2, or 4 ciphered).  This module is the SN counterpart
of the GET/ACTION code in :mod:`dlms2amqp.simulator.apdu`, which hands it
every READ-request (0x05) and WRITE-request (0x06) of an SN association
(``Session.SERVICES``; inside glo-ciphering on a ciphered association):

- :class:`SnMap` gives every object of a :class:`~cosem.Device` a base name
  (attribute *n* at ``base + 8*(n-1)``, methods at the class's offsets) and
  serves the association SN object (class 12, base name 0xFA00) with its
  object list (attribute 2) and access rights (attribute 3).
- :func:`read_request` answers a READ-request with one or several items
  (variable-name, parameterised-access with the profile selectors 1 and 2),
  splits a long READ-response into data-block-result blocks and serves the
  client's block-number-access for the next one.  The raw-data of the blocks
  is the encoded result list (``01 00`` + Data for one item), as real SN
  meters send it; ``--sn-blocks data`` sends the bare Data instead, as Gurux's
  servers do and as gurux-dlms clients expect.
- :func:`write_request` is only there for HLS pass 3: Gurux's clients invoke
  ``reply_to_HLS_authentication`` (class 12 method 8, base + 0x58) with a
  WRITE and expect f(CtoS) back in a READ-response; the same method invoked
  the standard way (READ with parameterised-access) works too.  Attributes
  are read-only: writing one answers read-write-denied.

The allocation rule and the choices where the standard leaves room are in
docs/design.md ("Short-name referencing").
"""

from __future__ import annotations

import time
import weakref
from bisect import bisect_right
from typing import TYPE_CHECKING, Any, Optional

from dlms2amqp.simulator import axdr_enc as ax
from dlms2amqp.simulator import cosem
from dlms2amqp.simulator.cosem import CosemObject, DataAccessError, Device, ReadContext

if TYPE_CHECKING:  # pragma: no cover
    from dlms2amqp.simulator.apdu import Session

READ_REQUEST = 0x05
WRITE_REQUEST = 0x06
READ_RESPONSE = 0x0C
WRITE_RESPONSE = 0x0D
CONFIRMED_SERVICE_ERROR = 0x0E

# Variable-Access-Specification choices
VARIABLE_NAME = 2
PARAMETERISED_ACCESS = 4
BLOCK_NUMBER_ACCESS = 5
# Read-Response choices
R_DATA = 0
R_ERROR = 1
R_BLOCK = 2
# data-access-result codes of block transfer
NO_LONG_READ_IN_PROGRESS = 16
DATA_BLOCK_NUMBER_INVALID = 19

# conformance bits (wire order) offered on an SN association
CONF_READ = 0x100000
CONF_WRITE = 0x080000
CONF_BLOCK_READ = 0x001000
CONF_MULTIPLE_REFERENCES = 0x000200
CONF_PARAMETERIZED_ACCESS = 0x000020
SUPPORTED_CONFORMANCE = (
    CONF_READ | CONF_WRITE | CONF_BLOCK_READ | CONF_MULTIPLE_REFERENCES | CONF_PARAMETERIZED_ACCESS
)

ASSOCIATION_SN = 0xFA00
ASSOCIATION_SN_VERSION = 2
FIRST_BASE = 0x0100
STRIDE = 0x0100
#: (offset of method 1, number of methods) per class, from the classes' short-name
#: tables (IEC 62056-62): a name in this range is a method, not an attribute
METHODS = {
    3: (0x28, 1),
    4: (0x38, 1),
    5: (0x48, 2),
    7: (0x58, 4),
    8: (0x60, 6),
    9: (0x20, 1),
    12: (0x20, 8),
}
#: number of attributes per class (the last attribute defines the attribute range)
ATTRIBUTES = {1: 2, 3: 3, 4: 5, 5: 9, 7: 8, 8: 9, 12: 4}

#: bytes a ciphered reply adds around the plain APDU (tag, length, SC, IC, GMAC tag)
CIPHER_OVERHEAD = 1 + 3 + 1 + 4 + 12
#: bytes of a data-block-result header: tag, count, choice, last-block, number, length
BLOCK_HEADER = 1 + 1 + 1 + 1 + 2 + 3


class SnError(ValueError):
    """Base names of a device that cannot be served (clash, no room left)."""


def span(class_id: int, n_attrs: int) -> int:
    """Bytes of name space an object of ``class_id`` takes (attributes and methods)."""
    end = 8 * max(n_attrs, 1)
    m = METHODS.get(class_id)
    if m is not None:
        end = max(end, m[0] + 8 * m[1])
    return end


def _attr_count(obj: CosemObject) -> int:
    return max(ATTRIBUTES.get(obj.class_id, 1), *obj.attrs.keys(), 1)


class SnMap:
    """Base names of one device's objects, and its association SN object."""

    def __init__(self, device: Device):
        self.device = device
        given = [o for o in device.objects if o.class_id == 12]
        if given:
            self.assoc = given[0]
        else:
            self.assoc = CosemObject(12, device.association_ln, ASSOCIATION_SN_VERSION)
        if self.assoc.short_name is None:
            self.assoc.short_name = ASSOCIATION_SN
        # SN lists the class 12 association in place of the LN ones (class 15)
        self.objects = [self.assoc] + [
            o for o in device.objects if o is not self.assoc and o.class_id != 15
        ]
        self.base: dict[int, int] = {}  # id(obj) -> base name
        self._allocate()
        order = sorted(self.objects, key=lambda o: self.base[id(o)])
        self._bases = [self.base[id(o)] for o in order]
        self._sorted = order
        self._list_cache: Optional[bytes] = None
        self._rights_cache: dict[int, bytes] = {}

    def _allocate(self) -> None:
        ranges: list[tuple[int, int]] = []
        for o in self.objects:
            if o.short_name is None:
                continue
            lo, hi = o.short_name, o.short_name + span(o.class_id, _attr_count(o))
            for a, b in ranges:
                if lo < b and a < hi:
                    raise SnError(
                        f"{cosem.ln_text(o.ln)}: short name 0x{lo:04X} overlaps another object's"
                    )
            ranges.append((lo, hi))
            self.base[id(o)] = lo
        nxt = FIRST_BASE
        for o in self.objects:
            if o.short_name is not None:
                continue
            size = max(STRIDE, span(o.class_id, _attr_count(o)))
            while any(nxt < b and a < nxt + size for a, b in ranges):
                nxt += STRIDE
            if nxt + size > 0x10000:
                raise SnError(f"no short name left for {cosem.ln_text(o.ln)} (too many objects)")
            self.base[id(o)] = nxt
            ranges.append((nxt, nxt + size))
            nxt += size

    def base_name(self, obj: CosemObject) -> int:
        return self.base[id(obj)]

    @property
    def assoc_base(self) -> int:
        """Base name of the association SN object (the vaa-name of the InitiateResponse)."""
        return self.base[id(self.assoc)]

    def resolve(self, name: int) -> tuple[CosemObject, bool, int]:
        """Base name + offset -> (object, is_method, attribute or method index)."""
        i = bisect_right(self._bases, name) - 1
        if i < 0:
            raise DataAccessError(cosem.OBJECT_UNDEFINED)
        obj = self._sorted[i]
        off = name - self._bases[i]
        if off % 8:
            raise DataAccessError(cosem.OBJECT_UNDEFINED)
        m = METHODS.get(obj.class_id)
        if m is not None and m[0] <= off < m[0] + 8 * m[1]:
            return obj, True, (off - m[0]) // 8 + 1
        attr = off // 8 + 1
        if attr > _attr_count(obj):
            raise DataAccessError(cosem.OBJECT_UNDEFINED)
        return obj, False, attr

    # -- class 12 ---------------------------------------------------------------
    def object_list(self) -> bytes:
        """Class 12 attribute 2: {base_name long, class_id, version, logical_name} each."""
        if self._list_cache is None:
            items = [
                ax.structure(
                    [
                        ax.int16(_signed(self.base[id(o)])),
                        ax.uint16(o.class_id),
                        ax.uint8(o.version),
                        ax.octet_string(o.ln),
                    ]
                )
                for o in self.objects
            ]
            self._list_cache = ax.array(items)
        return self._list_cache

    def access_rights(self, client_sap: int) -> bytes:
        """Class 12 attribute 3: what ``client_sap`` may read, per base name."""
        cached = self._rights_cache.get(client_sap)
        if cached is not None:
            return cached
        items = []
        for o in self.objects:
            can_read = o.readers is None or client_sap in o.readers
            attrs = []
            for a in range(1, _attr_count(o) + 1):
                readable = a == 1 or (can_read and (a in o.attrs or o is self.assoc))
                attrs.append(ax.structure([ax.int8(a), ax.enum(1 if readable else 0), ax.null()]))
            methods = []
            if o is self.assoc:
                methods.append(ax.structure([ax.int8(8), ax.enum(1)]))
            items.append(
                ax.structure(
                    [ax.int16(_signed(self.base[id(o)])), ax.array(attrs), ax.array(methods)]
                )
            )
        out = ax.array(items)
        self._rights_cache[client_sap] = out
        return out

    def read(self, ctx: ReadContext, obj: CosemObject, attr: int) -> bytes:
        """Encoded Data of one attribute, or DataAccessError."""
        if obj is self.assoc:
            if ctx.selector:
                raise DataAccessError(cosem.OTHER_REASON)
            if attr == 1:
                return ax.octet_string(obj.ln)
            if attr == 2:
                return self.object_list()
            if attr == 3:
                return self.access_rights(ctx.client_sap)
            v = obj.attrs.get(attr)
            if isinstance(v, bytes):
                return v
            raise DataAccessError(cosem.OBJECT_UNAVAILABLE)
        return self.device.read(ctx, obj.class_id, obj.ln, attr)


def _signed(base: int) -> int:
    """A base name is a 'long' (Integer16) in the object list."""
    return base - 0x10000 if base >= 0x8000 else base


_MAPS: weakref.WeakKeyDictionary[Device, SnMap] = weakref.WeakKeyDictionary()


def sn_map(device: Device) -> SnMap:
    """The device's base names, computed once (the device is shared by all meters)."""
    m = _MAPS.get(device)
    if m is None:
        m = SnMap(device)
        _MAPS[device] = m
    return m


def use_short_names(device: Device) -> SnMap:
    """Serve every association of ``device`` with SN referencing (``dlms2amqp-sim -r SN``).

    Raises SnError when the objects cannot all get a base name, before any client comes.
    """
    m = sn_map(device)
    for a in device.associations.values():
        a.referencing = 2
    return m


# --------------------------------------------------------------------------- READ
def _service_error(service: int, reason: int = 0) -> bytes:
    """confirmed-service-error read (5) / write (6), ServiceError service: ``reason``.

    0 other (the request does not parse), 2 service-unsupported (not negotiated).
    """
    return bytes((CONFIRMED_SERVICE_ERROR, service, 3, reason))


def _offered(session: Session, items: int, parameterised: bool, service: int) -> bool:
    """Was this request's service negotiated (conformance of the AARE)?"""
    conf = session.conformance
    if not conf & (CONF_READ if service == 5 else CONF_WRITE):
        return False
    if items > 1 and not conf & CONF_MULTIPLE_REFERENCES:
        return False
    return not (parameterised and not conf & CONF_PARAMETERIZED_ACCESS)


def _error(code: int) -> bytes:
    return bytes((READ_RESPONSE, 1, R_ERROR, code))


def read_request(session: Session, apdu: bytes) -> bytes:
    """READ-request -> READ-response (data, errors or the first/next block)."""
    try:
        n, pos = ax.dec_len(apdu, 1)
        if n == 0:
            raise ax.DecodeError("no item")
        items: list[tuple[int, Optional[tuple[int, Any]]]] = []
        for _ in range(n):
            choice = apdu[pos]
            if choice == BLOCK_NUMBER_ACCESS:
                if n != 1:
                    raise ax.DecodeError("block-number-access among other items")
                return _next_block(session, int.from_bytes(apdu[pos + 1 : pos + 3], "big"))
            if len(apdu) < pos + 3:
                raise ax.DecodeError("truncated variable name")
            name = int.from_bytes(apdu[pos + 1 : pos + 3], "big")
            if choice == VARIABLE_NAME:
                items.append((name, None))
                pos += 3
            elif choice == PARAMETERISED_ACCESS:
                selector = apdu[pos + 3]
                params, pos = ax.decode(apdu, pos + 4)
                items.append((name, (selector, params)))
            else:  # detailed access, read-data-block-access: not offered
                raise ax.DecodeError(f"variable access {choice} is not offered")
    except (IndexError, ax.DecodeError):
        return _service_error(5)
    if not _offered(session, len(items), any(a is not None for _, a in items), 5):
        return _service_error(5, 2)
    session.blocks = []
    smap = sn_map(session.device)
    now = int(time.time())
    results = [_read_item(session, smap, now, name, access) for name, access in items]
    body = ax.enc_len(len(results)) + b"".join(results)
    limit = session.client_max_pdu - (CIPHER_OVERHEAD if session.ciphered else 0)
    if 1 + len(body) <= limit or not (session.conformance & CONF_BLOCK_READ):
        return bytes((READ_RESPONSE,)) + body
    # The blocks carry the encoded result list (count, choice, Data...); Gurux's servers
    # put only the Data of a single item there, and Gurux's clients expect that.
    if session.opts.sn_blocks == "data" and len(results) == 1:
        raw = results[0][1:]
    else:
        raw = body
    size = max(16, limit - BLOCK_HEADER)
    session.blocks = [raw[i : i + size] for i in range(0, len(raw), size)]
    session.block_no = 0
    return _send_block(session)


def _read_item(
    session: Session, smap: SnMap, now: int, name: int, access: Optional[tuple[int, Any]]
) -> bytes:
    """One Read-Response item: 0 + Data, or 1 + data-access-result."""
    try:
        obj, is_method, index = smap.resolve(name)
        if is_method:
            if obj is smap.assoc and index == 8 and access is not None:
                reply = session.hls_reply(access[1])
                if reply is None:
                    raise DataAccessError(cosem.READ_WRITE_DENIED)
                return b"\x00" + ax.octet_string(reply)
            raise DataAccessError(cosem.READ_WRITE_DENIED)
        if not session.authenticated:
            raise DataAccessError(cosem.READ_WRITE_DENIED)
        ctx = ReadContext(
            session.meter, now, session.opts.utc_offset, session.client_sap, session=session
        )
        if access is not None:
            ctx.selector, ctx.params = access
            if ctx.selector == 0:  # parameterised access without a selector
                raise DataAccessError(cosem.OTHER_REASON)
        return b"\x00" + smap.read(ctx, obj, index)
    except DataAccessError as e:
        return bytes((R_ERROR, e.code))


def _send_block(session: Session) -> bytes:
    chunk = session.blocks[session.block_no]
    session.block_no += 1
    last = session.block_no == len(session.blocks)
    out = (
        bytes((READ_RESPONSE, 1, R_BLOCK, 1 if last else 0))
        + session.block_no.to_bytes(2, "big")
        + ax.enc_len(len(chunk))
        + chunk
    )
    if last:
        session.blocks = []
    return out


def _next_block(session: Session, acked: int) -> bytes:
    """block-number-access: the client acknowledges block ``acked``, sends for the next."""
    if not session.blocks:
        return _error(NO_LONG_READ_IN_PROGRESS)
    if acked != session.block_no:
        session.blocks = []
        return _error(DATA_BLOCK_NUMBER_INVALID)
    return _send_block(session)


# -------------------------------------------------------------------------- WRITE
def write_request(session: Session, apdu: bytes) -> bytes:
    """WRITE-request: HLS pass 3 on class 12 method 8; attributes are read-only."""
    try:
        n, pos = ax.dec_len(apdu, 1)
        names = []
        for _ in range(n):
            if apdu[pos] != VARIABLE_NAME:
                raise ax.DecodeError("write-data-block-access is not offered")
            names.append(int.from_bytes(apdu[pos + 1 : pos + 3], "big"))
            pos += 3
        m, pos = ax.dec_len(apdu, pos)
        values = []
        for _ in range(m):
            v, pos = ax.decode(apdu, pos)
            values.append(v)
        if m != n:
            raise ax.DecodeError("as many values as names")
    except (IndexError, ax.DecodeError):
        return _service_error(6)
    if not _offered(session, len(names), False, 6):
        return _service_error(6, 2)
    smap = sn_map(session.device)
    results = []
    for name, value in zip(names, values):
        try:
            obj, is_method, index = smap.resolve(name)
        except DataAccessError as e:
            results.append(bytes((1, e.code)))
            continue
        if is_method and obj is smap.assoc and index == 8 and n == 1:
            reply = session.hls_reply(value)
            if reply is not None:
                # what Gurux's clients read f(CtoS) from
                return bytes((READ_RESPONSE, 1, R_DATA)) + ax.octet_string(reply)
        results.append(bytes((1, cosem.READ_WRITE_DENIED)))
    return bytes((WRITE_RESPONSE,)) + ax.enc_len(len(results)) + b"".join(results)


#: the request services of an SN association, hooked into ``apdu.Session.SERVICES``
SERVICES = {READ_REQUEST: read_request, WRITE_REQUEST: write_request}
