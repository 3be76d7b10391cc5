# SPDX-License-Identifier: GPL-2.0-or-later
"""Object model served by the simulator, and the built-in meter.

The model is deliberately small so that the template loader (``template.py``)
and the built-in meter produce the same thing:

- ``CosemObject(class_id, ln, version, attrs, readers)``: ``ln`` is the 6-byte
  logical name; ``attrs`` maps attribute id (>= 2; attribute 1 is the logical
  name and is implicit) to either pre-encoded A-XDR ``bytes`` (a complete
  ``Data``: tag + content, see ``axdr_enc``) or a function ``f(ctx) -> bytes``
  computed per read (``ctx`` is a ``ReadContext``: meter index, now, selective
  access, client).  ``readers`` is the set of client SAPs allowed to read
  attributes >= 2 (``None`` = every associated client).  A function may raise
  ``DataAccessError(code)``.
- ``Association(client_sap, mechanism, secret, security, ...)``: one per client
  address; ``mechanism`` is 0 none, 1 Low (``secret`` = password), 2 High, 3
  HighMD5, 4 HighSHA1, 6 HighSHA256 (``secret`` = HLS secret), 5 HighGMAC (keys in
  ``block_key``/``auth_key``); ``security`` is the security control the client
  must use (0 none, 0x10 authentication, 0x20 encryption, 0x30 both), ciphering
  needs the keys whatever the mechanism; ``referencing`` is 1 for logical names,
  2 for short names (the application context is that plus 2 when ciphered).
- ``Device(objects, associations, name)``: one device is shared by all N meters
  of a process (only the meter index and the invocation counter differ), which
  is what keeps 10,000 meters cheap.  ``Device.read(ctx, class_id, ln, attr)``
  returns the encoded Data or raises ``DataAccessError``.

``builtin_device()`` builds the meter documented in ``docs/design.md`` from the
functions of ``model.py``.  The module is over 500 lines because the object model,
the current association's attributes and the built-in meter built on them are read
together when the simulator changes.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from dlms2amqp.simulator import axdr_enc as ax
from dlms2amqp.simulator import model

# data-access-result codes
HARDWARE_FAULT = 1
TEMPORARY_FAILURE = 2
READ_WRITE_DENIED = 3
OBJECT_UNDEFINED = 4
OBJECT_CLASS_INCONSISTENT = 9
OBJECT_UNAVAILABLE = 11
TYPE_UNMATCHED = 12
SCOPE_OF_ACCESS_VIOLATED = 13
OTHER_REASON = 250

MECH_NONE = 0
MECH_LOW = 1
MECH_HIGH = 2
MECH_HIGH_MD5 = 3
MECH_HIGH_SHA1 = 4
MECH_HLS_GMAC = 5
MECH_HIGH_SHA256 = 6
#: mechanisms with HLS pass 3/4 (a challenge each way, checked with an ACTION)
HLS_MECHANISMS = frozenset(
    {MECH_HIGH, MECH_HIGH_MD5, MECH_HIGH_SHA1, MECH_HLS_GMAC, MECH_HIGH_SHA256}
)

MAX_ROWS_PER_READ = 200_000


class DataAccessError(Exception):
    """A GET that the meter answers with a data-access-result instead of data."""

    def __init__(self, code: int):
        super().__init__(f"data-access-result {code}")
        self.code = code


@dataclass
class MeterState:
    """What differs between the meters sharing one Device."""

    k: int
    system_title: bytes = b""
    #: last invocation counter accepted from a ciphering client
    last_ic: int = 0
    #: invocation counter the meter uses for its own ciphered replies
    server_ic: int = 0


@dataclass
class ReadContext:
    """Everything a dynamic attribute needs to compute its value."""

    meter: MeterState
    now: int
    utc_offset: int = 0
    client_sap: int = 0
    selector: int = 0
    params: Any = None
    #: the association serving the read (``apdu.Session``), for the association object
    session: Any = None

    @property
    def k(self) -> int:
        return self.meter.k


AttrValue = Union[bytes, Callable[[ReadContext], bytes]]


@dataclass
class CosemObject:
    class_id: int
    ln: bytes
    version: int = 0
    attrs: dict[int, AttrValue] = field(default_factory=dict)
    readers: Optional[frozenset[int]] = None
    #: attribute ids that accept selective access (listed in the object list)
    selective: dict[int, tuple[int, ...]] = field(default_factory=dict)
    #: base name for short-name referencing (None: allocated, see ``simulator.sn``)
    short_name: Optional[int] = None


@dataclass
class Association:
    client_sap: int
    mechanism: int = MECH_NONE
    secret: bytes = b""
    security: int = 0
    block_key: bytes = b""
    auth_key: bytes = b""
    #: the client's system title; empty: any (learnt from the AARQ)
    client_system_title: bytes = b""
    #: 1 logical-name, 2 short-name referencing
    referencing: int = 1
    #: security suite (low nibble of the security control byte)
    security_suite: int = 0
    #: the meter's system title for this association; empty: the meter's own
    system_title: bytes = b""
    #: server SAP of the association (attribute 3)
    server_sap: int = 1
    #: logical name of its security setup object (attribute 9); zeros: none
    security_setup: bytes = bytes(6)

    @property
    def context_id(self) -> int:
        """Application context id the client must propose (1..4)."""
        return self.referencing + (2 if self.security else 0)

    def __repr__(self) -> str:  # never show secrets or keys
        return f"Association(client_sap={self.client_sap}, mechanism={self.mechanism})"


def ln_bytes(text: str) -> bytes:
    """'1.0.99.1.0.255' -> 6 bytes."""
    parts = [int(p) for p in text.replace(":", ".").replace("-", ".").split(".")]
    if len(parts) != 6:
        raise ValueError(f"logical name {text!r} must have 6 parts")
    return bytes(parts)


def ln_text(ln: bytes) -> str:
    return ".".join(str(b) for b in ln)


class Device:
    """The object set and associations shared by all meters of one process."""

    def __init__(
        self,
        objects: list[CosemObject],
        associations: list[Association],
        name: str = "meter",
        association_ln: bytes = b"\x00\x00\x28\x00\x00\xff",
    ):
        self.name = name
        self.objects = list(objects)
        self.by_key: dict[tuple[int, bytes], CosemObject] = {
            (o.class_id, o.ln): o for o in self.objects
        }
        self.associations = {a.client_sap: a for a in associations}
        self.association_ln = association_ln
        self._object_list_cache: dict[int, bytes] = {}
        if (15, association_ln) not in self.by_key:
            assoc = CosemObject(15, association_ln, 1)
            self.objects.append(assoc)
            self.by_key[(15, association_ln)] = assoc
        assoc = self.by_key[(15, association_ln)]
        assoc.attrs.setdefault(2, self._object_list)
        for attr, fn in current_association_attributes(assoc.version).items():
            assoc.attrs.setdefault(attr, fn)

    def _object_list(self, ctx: ReadContext) -> bytes:
        cached = self._object_list_cache.get(ctx.client_sap)
        if cached is None:
            cached = self.encode_object_list(ctx.client_sap)
            self._object_list_cache[ctx.client_sap] = cached
        return cached

    def encode_object_list(self, client_sap: int) -> bytes:
        """Association LN attribute 2, with the access rights of ``client_sap``."""
        items = []
        for o in self.objects:
            can_read = o.readers is None or client_sap in o.readers
            n_attrs = max([1, *o.attrs.keys()])
            attr_access = []
            for a in range(1, n_attrs + 1):
                mode = 1 if (a == 1 or (can_read and a in o.attrs)) else 0
                if o.class_id == 15 and a == 7:
                    mode = 0  # the secret is never readable
                sel = o.selective.get(a)
                sel_enc = ax.array([ax.int8(s) for s in sel]) if sel else ax.null()
                attr_access.append(ax.structure([ax.int8(a), ax.enum(mode), sel_enc]))
            method_access = []
            if o.class_id == 15:
                method_access.append(ax.structure([ax.int8(1), ax.boolean(True)]))
            rights = ax.structure([ax.array(attr_access), ax.array(method_access)])
            items.append(
                ax.structure(
                    [ax.uint16(o.class_id), ax.uint8(o.version), ax.octet_string(o.ln), rights]
                )
            )
        return ax.array(items)

    def read(self, ctx: ReadContext, class_id: int, ln: bytes, attr: int) -> bytes:
        """Encoded Data of one attribute, or DataAccessError."""
        o = self.by_key.get((class_id, ln))
        if o is None:
            raise DataAccessError(OBJECT_UNDEFINED)
        if attr == 1:
            return ax.octet_string(ln)
        if o.readers is not None and ctx.client_sap not in o.readers:
            raise DataAccessError(READ_WRITE_DENIED)
        v = o.attrs.get(attr)
        if v is None:
            if class_id == 15 and attr == 7:
                raise DataAccessError(READ_WRITE_DENIED)
            raise DataAccessError(OBJECT_UNAVAILABLE)
        if ctx.selector and attr not in o.selective:
            raise DataAccessError(OTHER_REASON)
        if isinstance(v, bytes):
            return v
        return v(ctx)


_OID_PREFIX = b"\x60\x85\x74\x05\x08"


def secret_denied(ctx: ReadContext) -> bytes:
    """Attribute 7 of an association (its secret): never readable."""
    raise DataAccessError(READ_WRITE_DENIED)


def current_association_attributes(version: int) -> dict[int, AttrValue]:
    """Attributes 3..11 of the current association (class 15), from the live session.

    Values follow the association the client is connected through; the secret
    (attribute 7) is always denied.  Attributes 10 and 11 exist from version 2 on.
    """

    def assoc(ctx: ReadContext) -> Association:
        s = ctx.session
        if s is None or s.assoc is None:
            raise DataAccessError(OBJECT_UNAVAILABLE)
        return s.assoc

    def partners(ctx: ReadContext) -> bytes:
        a = assoc(ctx)
        return ax.structure([ax.int8(ctx.client_sap), ax.uint16(a.server_sap)])

    def context_name(ctx: ReadContext) -> bytes:
        return ax.octet_string(_OID_PREFIX + bytes((1, assoc(ctx).context_id)))

    def context_info(ctx: ReadContext) -> bytes:
        assoc(ctx)
        s = ctx.session
        return ax.structure(
            [
                ax.encode(ax.BIT_STRING, (24, s.conformance.to_bytes(3, "big"))),
                ax.uint16(s.server_max_pdu),
                ax.uint16(s.client_max_pdu),
                ax.uint8(6),
                ax.int8(0),
                ax.octet_string(b""),
            ]
        )

    def mechanism_name(ctx: ReadContext) -> bytes:
        return ax.octet_string(_OID_PREFIX + bytes((2, assoc(ctx).mechanism)))

    def status(ctx: ReadContext) -> bytes:
        s = ctx.session
        return ax.enum(2 if s is not None and s.authenticated else 1)

    def security_setup(ctx: ReadContext) -> bytes:
        return ax.octet_string(assoc(ctx).security_setup)

    attrs: dict[int, AttrValue] = {
        3: partners,
        4: context_name,
        5: context_info,
        6: mechanism_name,
        7: secret_denied,
        8: status,
    }
    if version >= 1:
        attrs[9] = security_setup
    if version >= 2:
        attrs[10] = ax.array([])
        attrs[11] = ax.structure([ax.uint8(0), ax.visible_string("")])
    return attrs


# --- the built-in meter ------------------------------------------------------
LN_CLOCK = ln_bytes("0.0.1.0.0.255")
LN_LDN = ln_bytes("0.0.42.0.0.255")
LN_SERIAL = ln_bytes("0.0.96.1.0.255")
LN_IMPORT = ln_bytes("1.0.1.8.0.255")
LN_EXPORT = ln_bytes("1.0.2.8.0.255")
LN_VOLTAGE = ln_bytes("1.0.32.7.0.255")
LN_CURRENT = ln_bytes("1.0.31.7.0.255")
LN_STATUS = ln_bytes("0.0.96.10.1.255")
LN_IC = ln_bytes("0.0.43.1.0.255")
LN_LOAD = ln_bytes("1.0.99.1.0.255")
LN_BILLING = ln_bytes("1.0.98.1.0.255")
LN_ASSOC = ln_bytes("0.0.40.0.0.255")

BLOCK_KEY = bytes.fromhex("000102030405060708090A0B0C0D0E0F")
AUTH_KEY = bytes.fromhex("D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF")
CLIENT_SYSTEM_TITLE = bytes.fromhex("4775727578313233")

_LP_ROW = struct.Struct(">BBBBHBBBBBBBhBBBBIBI")
_BILL_ROW = struct.Struct(">BBBBHBBBBBBBhBBIBI")


def _capture_def(class_id: int, ln: bytes, attr: int) -> bytes:
    return ax.structure([ax.uint16(class_id), ax.octet_string(ln), ax.int8(attr), ax.uint16(0)])


LOAD_COLUMNS = [(8, LN_CLOCK, 2), (1, LN_STATUS, 2), (3, LN_IMPORT, 2), (3, LN_EXPORT, 2)]
BILLING_COLUMNS = [(8, LN_CLOCK, 2), (3, LN_IMPORT, 2), (3, LN_EXPORT, 2)]


def _load_rows_fast(k: int, ts: range, off_min: int) -> list[bytes]:
    """Pre-encoded load-profile rows (all four columns)."""
    pack = _LP_ROW.pack
    off = 60 * off_min
    dev = -off_min
    out = []
    cur_day = None
    y = mo = d = dow = 0
    k1 = k + 1
    base_i = 1000 * k
    base_e = 100 * k
    for t in ts:
        lt = t + off
        day = lt // 86400
        if day != cur_day:
            tm = time.gmtime(day * 86400)
            y, mo, d, dow = tm.tm_year, tm.tm_mon, tm.tm_mday, tm.tm_wday + 1
            cur_day = day
        sod = lt - day * 86400
        n = t // 900
        out.append(
            pack(
                2,
                4,
                9,
                12,
                y,
                mo,
                d,
                dow,
                sod // 3600,
                (sod // 60) % 60,
                sod % 60,
                0,
                dev,
                0,
                17,
                0x80 if (n + k) % 97 == 0 else 0,
                6,
                base_i + 10 * n + (n * k1) % 7,
                6,
                base_e + 2 * n + n % 3,
            )  # fmt: skip
        )
    return out


def _billing_rows_fast(k: int, ts: range, off_min: int) -> list[bytes]:
    pack = _BILL_ROW.pack
    out = []
    for t in ts:
        tm = time.gmtime(t + 60 * off_min)
        out.append(
            pack(
                2,
                3,
                9,
                12,
                tm.tm_year,
                tm.tm_mon,
                tm.tm_mday,
                tm.tm_wday + 1,
                tm.tm_hour,
                tm.tm_min,
                tm.tm_sec,
                0,
                -off_min,
                0,
                6,
                model.import_wh(k, t),
                6,
                model.export_wh(k, t),
            )  # fmt: skip
        )
    return out


def _column_value(col: tuple[int, bytes, int], k: int, t: int, off_min: int) -> bytes:
    ln = col[1]
    if ln == LN_CLOCK:
        return ax.datetime_data(t, off_min)
    if ln == LN_STATUS:
        return ax.uint8(model.status(k, t))
    if ln == LN_IMPORT:
        return ax.uint32(model.import_wh(k, t))
    return ax.uint32(model.export_wh(k, t))


class _Profile:
    """Buffer of a built-in profile: rows computed on demand from model.py."""

    def __init__(self, period: int, entries: int, default_rows: int, columns: list, billing: bool):
        self.period = period
        self.entries = entries
        self.default_rows = default_rows
        self.columns = columns
        self.billing = billing

    def last(self, now: int, off_min: int) -> int:
        if self.billing:
            return model.last_billing_boundary(now, off_min)
        return model.last_load_boundary(now)

    def __call__(self, ctx: ReadContext) -> bytes:
        last = self.last(ctx.now, ctx.utc_offset)
        cols = None
        if ctx.selector == 0:
            start = last - (self.default_rows - 1) * self.period
            end = last
        elif ctx.selector == 1:
            p = ctx.params
            if not isinstance(p, list) or len(p) < 3:
                raise DataAccessError(OTHER_REASON)
            try:
                start = ax.parse_datetime(p[1], ctx.utc_offset)
                end = min(ax.parse_datetime(p[2], ctx.utc_offset), ctx.now)
            except (ax.DecodeError, TypeError) as e:
                raise DataAccessError(OTHER_REASON) from e
            if len(p) > 3 and p[3]:
                cols = []
                for sel in p[3]:
                    try:
                        key = (sel[0], bytes(sel[1]), sel[2])
                        cols.append(self.columns.index(key))
                    except (ValueError, IndexError, TypeError) as e:
                        raise DataAccessError(OTHER_REASON) from e
        elif ctx.selector == 2:
            p = ctx.params
            if not isinstance(p, list) or len(p) != 4:
                raise DataAccessError(OTHER_REASON)
            fe, te, fc, tc = p
            fe = max(1, fe)
            te = self.entries if te == 0 else min(te, self.entries)
            start = last - (self.entries - fe) * self.period
            end = last - (self.entries - te) * self.period
            ncol = len(self.columns)
            fc = max(1, fc)
            tc = ncol if tc == 0 else min(tc, ncol)
            if fc != 1 or tc != ncol:
                cols = list(range(fc - 1, tc))
        else:
            raise DataAccessError(OTHER_REASON)
        if self.billing:
            off = 60 * ctx.utc_offset
            first = start + (-(start + off)) % self.period
        else:
            first = start + (-start) % self.period
        ts = range(first, end + 1, self.period)
        if len(ts) > MAX_ROWS_PER_READ:
            raise DataAccessError(OTHER_REASON)
        k = ctx.meter.k
        if cols is None:
            if self.billing:
                rows = _billing_rows_fast(k, ts, ctx.utc_offset)
            else:
                rows = _load_rows_fast(k, ts, ctx.utc_offset)
        else:
            chosen = [self.columns[c] for c in cols]
            head = b"\x02" + ax.enc_len(len(chosen))
            rows = [
                head + b"".join(_column_value(c, k, t, ctx.utc_offset) for c in chosen) for t in ts
            ]
        return b"\x01" + ax.enc_len(len(rows)) + b"".join(rows)


def _ldn(ctx: ReadContext) -> bytes:
    return ax.octet_string(model.logical_device_name(ctx.k))


def _serial(ctx: ReadContext) -> bytes:
    return ax.visible_string(model.serial_number(ctx.k))


def _ic(ctx: ReadContext) -> bytes:
    return ax.uint32(ctx.meter.last_ic)


#: built-in HLS clients (address -> mechanism), secret HLS_SECRET, as Gurux's Java meter
HLS_CLIENTS = {18: MECH_HIGH, 19: MECH_HIGH_MD5, 20: MECH_HIGH_SHA1, 22: MECH_HIGH_SHA256}
HLS_SECRET = b"Gurux"


def builtin_device(password: bytes = b"00000000") -> Device:
    """The meter of docs/design.md (clients 16, 32, 48 and the HLS clients 18-22)."""
    public = frozenset({16, 32, 48, *HLS_CLIENTS})
    priv = frozenset({32, 48, *HLS_CLIENTS})

    def clock_time(ctx: ReadContext) -> bytes:
        return ax.datetime_data(ctx.now, ctx.utc_offset)

    def clock_tz(ctx: ReadContext) -> bytes:
        return ax.int16(-ctx.utc_offset)

    def reg(fn: Callable[[int, int], int], enc: Callable[[int], bytes]) -> AttrValue:
        return lambda ctx: enc(fn(ctx.meter.k, ctx.now))

    def su(scaler: int, unit: int) -> bytes:
        return ax.structure([ax.int8(scaler), ax.enum(unit)])

    load = _Profile(model.LOAD_PERIOD, model.LOAD_ENTRIES, 96, LOAD_COLUMNS, billing=False)
    bill = _Profile(model.BILLING_PERIOD, model.BILLING_ENTRIES, 31, BILLING_COLUMNS, billing=True)

    def profile(p: _Profile) -> dict[int, AttrValue]:
        return {
            2: p,
            3: ax.array([_capture_def(*c) for c in p.columns]),
            4: ax.uint32(p.period),
            5: ax.enum(1),
            6: _capture_def(0, bytes(6), 0),
            7: ax.uint32(p.entries),
            8: ax.uint32(p.entries),
        }

    objects = [
        CosemObject(15, LN_ASSOC, 2, {}, public),
        CosemObject(
            8,
            LN_CLOCK,
            0,
            {
                2: clock_time,
                3: clock_tz,
                4: ax.uint8(0),
                5: ax.octet_string(b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x80\x00\xff"),
                6: ax.octet_string(b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x80\x00\xff"),
                7: ax.int8(0),
                8: ax.boolean(False),
                9: ax.enum(1),
            },
            public,
        ),
        CosemObject(1, LN_LDN, 0, {2: _ldn}, public),
        CosemObject(1, LN_SERIAL, 0, {2: _serial}, public),
        CosemObject(1, LN_IC, 0, {2: _ic}, public),
        CosemObject(3, LN_IMPORT, 0, {2: reg(model.import_wh, ax.uint32), 3: su(0, 30)}, priv),
        CosemObject(3, LN_EXPORT, 0, {2: reg(model.export_wh, ax.uint32), 3: su(0, 30)}, priv),
        CosemObject(3, LN_VOLTAGE, 0, {2: reg(model.voltage_raw, ax.uint16), 3: su(-1, 35)}, priv),
        CosemObject(3, LN_CURRENT, 0, {2: reg(model.current_raw, ax.uint16), 3: su(-2, 33)}, priv),
        CosemObject(1, LN_STATUS, 0, {2: reg(model.status, ax.uint8)}, priv),
        CosemObject(7, LN_LOAD, 1, profile(load), priv, {2: (1, 2)}),
        CosemObject(7, LN_BILLING, 1, profile(bill), priv, {2: (1, 2)}),
    ]  # fmt: skip
    associations = [
        Association(16, MECH_NONE),
        Association(32, MECH_LOW, secret=password),
        Association(
            48,
            MECH_HLS_GMAC,
            security=0x30,
            block_key=BLOCK_KEY,
            auth_key=AUTH_KEY,
            client_system_title=CLIENT_SYSTEM_TITLE,
        ),
        *(Association(c, mech, secret=HLS_SECRET) for c, mech in HLS_CLIENTS.items()),
    ]
    return Device(objects, associations, name="built-in")
