# SPDX-License-Identifier: GPL-2.0-or-later
"""Gurux XML device templates (``dlms2amqp-sim -x FILE``).

Gurux.DLMS.Simulator.Net and GXDLMSDirector save a meter as an XML file whose
root is ``<Objects>`` and whose children are named after the COSEM class
(``<GXDLMSData>``, ``<GXDLMSRegister>`` ...).  Gurux's own loader in
gurux-dlms 1.0.203 loops forever on these files, so this module reads them with
the standard library, keeping line numbers so that a field engineer can fix a
broken file.

Reading is in two steps so that the XML part does not depend on the server:

1. :func:`load_template` turns the file into plain data (:class:`Template`):
   typed attribute values ``(dlms_type, value)``, profile definitions and
   associations.  Anything the simulator cannot serve is named in
   ``Template.warnings``, never silently dropped.
2. :func:`build_device` turns that data into the simulator's object model
   (``dlms2amqp.simulator.cosem``).

Element names follow the per-class ``load()``/``save()`` methods of Gurux
(``objects/GXDLMS*.py``): values carry ``Type`` (DLMS data type number) and
optionally ``UIType``; octet strings are hex bytes; date-times are
``MM/dd/yyyy HH:mm:ss`` with ``*`` for "not specified"; a register's
``<Scaler>`` is the multiplier (``0.01``), not the exponent.

The module is over 500 lines because it is one file format read end to end
(objects, values, associations with their security setups, profiles); splitting
it would scatter the line-number bookkeeping every error message relies on.
"""

from __future__ import annotations

import datetime
import math
import re
import struct
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union
from xml.parsers import expat

from ..errors import ConfigError
from ..secret import Secret
from . import axdr_enc as ax
from . import cosem, sn
from .axdr_enc import (  # DLMS data type numbers (Blue Book / Gurux DataType)
    ARRAY,
    BCD,
    BIT_STRING,
    BOOLEAN,
    DATE,
    DATETIME,
    ENUM,
    FLOAT32,
    FLOAT64,
    INT8,
    INT16,
    INT32,
    INT64,
    NULL,
    OCTET_STRING,
    STRUCTURE,
    TIME,
    UINT8,
    UINT16,
    UINT32,
    UINT64,
)
from .axdr_enc import UTF8_STRING as STRING_UTF8
from .axdr_enc import VISIBLE_STRING as STRING
from .cosem import OTHER_REASON, DataAccessError

__all__ = [
    "TemplateError",
    "DlmsValue",
    "TemplateObject",
    "TemplateAssociation",
    "CaptureColumn",
    "Template",
    "load_template",
    "parse_template",
    "build_device",
    "encode_value",
]

#: A typed DLMS value: (data type number, Python value).  Arrays and structures
#: hold a list of DlmsValue; octet strings, date-times, dates and times hold bytes.
DlmsValue = tuple[int, Any]

_INT_RANGES = {
    INT8: (-(1 << 7), (1 << 7) - 1),
    INT16: (-(1 << 15), (1 << 15) - 1),
    INT32: (-(1 << 31), (1 << 31) - 1),
    INT64: (-(1 << 63), (1 << 63) - 1),
    UINT8: (0, 0xFF),
    UINT16: (0, 0xFFFF),
    UINT32: (0, 0xFFFFFFFF),
    UINT64: (0, (1 << 64) - 1),
    ENUM: (0, 0xFF),
    BCD: (-128, 127),
}

#: COSEM classes by Gurux element name (without the ``GXDLMS`` prefix).
CLASS_IDS = {
    "Data": 1,
    "Register": 3,
    "ExtendedRegister": 4,
    "DemandRegister": 5,
    "RegisterActivation": 6,
    "ProfileGeneric": 7,
    "Clock": 8,
    "ScriptTable": 9,
    "Schedule": 10,
    "SpecialDaysTable": 11,
    "AssociationShortName": 12,
    "AssociationLogicalName": 15,
    "SapAssignment": 17,
    "ImageTransfer": 18,
    "IECLocalPortSetup": 19,
    "ActivityCalendar": 20,
    "RegisterMonitor": 21,
    "ActionSchedule": 22,
    "HdlcSetup": 23,
    "IecTwistedPairSetup": 24,
    "MBusSlavePortSetup": 25,
    "UtilityTables": 26,
    "ModemConfiguration": 27,
    "AutoAnswer": 28,
    "AutoConnect": 29,
    "PushSetup": 40,
    "TcpUdpSetup": 41,
    "Ip4Setup": 42,
    "MacAddressSetup": 43,
    "PppSetup": 44,
    "GprsSetup": 45,
    "SmtpSetup": 46,
    "GSMDiagnostic": 47,
    "Ip6Setup": 48,
    "MBusDiagnostic": 77,
    "LlcSscsSetup": 80,
    "MBusClient": 72,
    "MBusMasterPortSetup": 74,
    "RegisterTable": 61,
    "StatusMapping": 63,
    "SecuritySetup": 64,
    "ParameterMonitor": 65,
    "SensorManager": 67,
    "ArrayManager": 68,
    "DisconnectControl": 70,
    "Limiter": 71,
    "Account": 111,
    "Credit": 112,
    "Charge": 113,
    "TokenGateway": 115,
    "CompactData": 62,
    "NtpSetup": 100,
    "Iec8802LlcType1Setup": 57,
    "Iec8802LlcType2Setup": 58,
    "Iec8802LlcType3Setup": 59,
    "CommunicationPortProtection": 124,
    "LteMonitoring": 151,
    "FunctionControl": 122,
}

#: classes whose stored values the simulator serves
SERVED_CLASSES = {
    1: "Data",
    3: "Register",
    4: "ExtendedRegister",
    7: "ProfileGeneric",
    8: "Clock",
    12: "AssociationShortName",
    15: "AssociationLogicalName",
}

#: mechanism ids (AuthenticationMechanismName/MechanismId) that can be served
MECHANISM_NAMES = {
    0: "None",
    1: "Low",
    2: "High",
    3: "HighMD5",
    4: "HighSHA1",
    5: "HighGMAC",
    6: "HighSHA256",
    7: "HighECDSA",
}
SERVED_MECHANISMS = {0, 1, 2, 3, 4, 5, 6}

#: Gurux's demonstration keys (GXDLMSSecureClient defaults), when a template names none
DEMO_BLOCK_KEY = cosem.BLOCK_KEY
DEMO_AUTH_KEY = cosem.AUTH_KEY

_LINE = "{urn:dlms2amqp}line"

#: encoded OID prefix 2.16.756.5.8 (joint-iso-ctt country 756 identified-organization DLMS-UA)
_OID_PREFIX = bytes.fromhex("6085740508")


class TemplateError(ConfigError):
    """A template file that cannot be read; the message names the file and line."""

    reason = "template"


@dataclass
class CaptureColumn:
    """One column of a profile: the captured object's attribute."""

    class_id: int
    ln: str
    attribute: int
    data_index: int = 0


@dataclass
class TemplateObject:
    """One COSEM object from the template, with the values the simulator serves."""

    class_id: int
    ln: str
    version: int = 0
    line: int = 0
    #: attribute index -> stored typed value (attribute 1, the LN, is implicit)
    attributes: dict[int, DlmsValue] = field(default_factory=dict)
    #: attribute index -> access mode (0 none, 1 read, 2 write, 3 read-write) when given
    access: dict[int, int] = field(default_factory=dict)
    # Profile generic only
    capture_objects: list[CaptureColumn] = field(default_factory=list)
    buffer: list[list[DlmsValue]] = field(default_factory=list)
    #: base name for short-name referencing (``<SN>``); None: allocated (see sn.py)
    short_name: Optional[int] = None


@dataclass
class TemplateSecuritySetup:
    """A security setup object (class 64): the keys and policy of ciphered associations."""

    ln: str
    version: int = 0
    policy: int = 0
    suite: int = 0
    server_system_title: bytes = b""
    block_key: Optional[Secret] = None
    auth_key: Optional[Secret] = None
    line: int = 0

    def security_control(self) -> int:
        """The security control bits (0x10 authentication, 0x20 encryption) of the policy."""
        p = self.policy
        if self.version == 0 and p <= 3:  # enum: 1 authenticated, 2 encrypted, 3 both
            return (0x10 if p & 1 else 0) | (0x20 if p & 2 else 0)
        # version 1 bit map: authenticated request/response 0x04/0x20, encrypted 0x08/0x40
        return (0x10 if p & 0x24 else 0) | (0x20 if p & 0x48 else 0)


@dataclass
class TemplateAssociation:
    """An association LN object: who may connect and how they authenticate."""

    ln: str
    client_sap: int
    server_sap: int = 1
    mechanism_id: int = 0
    #: the Low-level password or HLS secret; ``None`` when absent
    secret: Optional[Secret] = None
    #: (class id, LN) of the objects listed in its ObjectList (empty: not given)
    object_list: list[tuple[int, str]] = field(default_factory=list)
    line: int = 0
    #: application context id: 1 LN, 2 SN, 3 LN ciphered, 4 SN ciphered
    context_id: int = 1
    #: logical name of its security setup object, when given
    security_setup: Optional[str] = None
    # resolved after parsing (see _resolve_security)
    #: security control bits the client must use (0: plain)
    security: int = 0
    security_suite: int = 0
    block_key: Optional[Secret] = None
    auth_key: Optional[Secret] = None
    server_system_title: bytes = b""

    @property
    def mechanism_name(self) -> str:
        return MECHANISM_NAMES.get(self.mechanism_id, f"mechanism {self.mechanism_id}")


@dataclass
class Template:
    """Everything read from one template file."""

    path: str
    objects: list[TemplateObject] = field(default_factory=list)
    associations: list[TemplateAssociation] = field(default_factory=list)
    #: objects or attributes that are not served, one human-readable line each
    warnings: list[str] = field(default_factory=list)
    #: security setup objects by logical name (keys for ciphered associations)
    security_setups: dict[str, TemplateSecuritySetup] = field(default_factory=dict)
    #: the secret of its association SN object (class 12), when it has one
    sn_secret: Optional[Secret] = None

    def find(self, ln: str, class_id: Optional[int] = None) -> Optional[TemplateObject]:
        for obj in self.objects:
            if obj.ln == ln and (class_id is None or obj.class_id == class_id):
                return obj
        return None


# --------------------------------------------------------------------------- XML
def _parse_xml(data: bytes) -> ET.Element:
    """Build an ElementTree with each element's source line in a private attribute.

    ElementTree does not keep line numbers; expat does, so the tree is built
    from expat's callbacks.  Raises ``xml.parsers.expat.ExpatError``.
    """
    parser = expat.ParserCreate()
    builder = ET.TreeBuilder()

    def start(tag: str, attrs: dict[str, str]) -> None:
        attrs[_LINE] = str(parser.CurrentLineNumber)
        builder.start(tag, attrs)

    parser.StartElementHandler = start
    parser.EndElementHandler = builder.end
    parser.CharacterDataHandler = builder.data
    parser.Parse(data, True)
    return builder.close()


def _line(el: ET.Element) -> int:
    return int(el.get(_LINE, "0"))


class _Ctx:
    """Where we are, so that every error names the file and the line."""

    def __init__(self, path: str):
        self.path = path

    def error(self, el: Optional[ET.Element], message: str) -> TemplateError:
        where = f"{self.path}, line {_line(el)}" if el is not None else self.path
        return TemplateError(f"template {where}: {message}")


def load_template(path: Union[str, Path]) -> Template:
    """Read a Gurux XML template file; raises :class:`TemplateError` naming the line."""
    name = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TemplateError(f"template {name}: cannot read the file ({exc.strerror})") from exc
    return parse_template(data, name)


def parse_template(data: Union[bytes, str], name: str = "<template>") -> Template:
    """Parse template text (bytes or str); ``name`` is used in messages."""
    ctx = _Ctx(name)
    if isinstance(data, str):
        data = data.encode("utf-8")
    try:
        root = _parse_xml(data)
    except expat.ExpatError as exc:
        raise TemplateError(
            f"template {name}, line {exc.lineno}, column {exc.offset + 1}: not well-formed"
            f" XML ({expat.ErrorString(exc.code)})"
        ) from exc
    if root.tag != "Objects":
        raise ctx.error(root, f"the root element is <{root.tag}>, expected <Objects>")
    template = Template(path=name)
    for el in root:
        _read_object(ctx, el, template)
    _check_references(template)
    _resolve_security(template)
    return template


# ------------------------------------------------------------------------ objects
def _read_object(ctx: _Ctx, el: ET.Element, template: Template) -> None:
    tag = el.tag
    if not tag.startswith("GXDLMS"):
        raise ctx.error(el, f"unexpected element <{tag}> (expected <GXDLMS...> objects)")
    cls_name = tag[6:]
    ln_el = el.find("LN")
    if ln_el is None or not (ln_el.text or "").strip():
        raise ctx.error(el, f"<{tag}> has no <LN> (logical name)")
    ln = _parse_ln(ctx, ln_el)
    class_id = CLASS_IDS.get(cls_name)
    if class_id is None:
        template.warnings.append(f"{ln} {cls_name}: unknown class, not served")
        return
    if class_id == 64:
        _read_security_setup(ctx, el, ln, template)
    if class_id not in SERVED_CLASSES:
        template.warnings.append(f"{ln} class {class_id} ({cls_name}): not served")
        return
    obj = TemplateObject(class_id=class_id, ln=ln, line=_line(el))
    obj.version = _int_child(ctx, el, "Version", 0)
    obj.access = _read_access(ctx, el)
    sn_el = el.find("SN")
    if sn_el is not None and (sn_el.text or "").strip():
        obj.short_name = _parse_int(ctx, sn_el, sn_el.text or "")
        if not 0 < obj.short_name <= 0xFFF8 or obj.short_name % 8:
            raise ctx.error(
                sn_el, f"short name {obj.short_name} is not a multiple of 8 in 8..65528"
            )
    reader = _READERS[class_id]
    reader(ctx, el, obj, template)
    if template.find(ln, class_id) is not None:
        template.warnings.append(f"{ln} class {class_id}: defined twice, first one served")
        return
    template.objects.append(obj)


def _parse_ln(ctx: _Ctx, el: ET.Element) -> str:
    text = (el.text or "").strip()
    parts = text.split(".")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 6 or not all(0 <= v <= 255 for v in values):
        raise ctx.error(el, f"logical name {text!r} is not six numbers 0..255 (like 1.0.1.8.0.255)")
    return ".".join(str(v) for v in values)


def _read_access(ctx: _Ctx, el: ET.Element) -> dict[int, int]:
    access: dict[int, int] = {}
    a = el.find("Access")
    if a is not None and a.text:
        for i, ch in enumerate(a.text.strip(), start=1):
            if not ch.isdigit():
                raise ctx.error(a, f"access rights {a.text.strip()!r}: expected digits")
            access[i] = int(ch) & 3
    a3 = el.find("Access3")
    if a3 is not None and a3.text:
        text = a3.text.strip()
        if len(text) % 4 or not re.fullmatch(r"[0-9A-Fa-f]*", text):
            raise ctx.error(a3, f"access rights {text!r}: expected 4 hex digits per attribute")
        for i in range(len(text) // 4):
            access[i + 1] = int(text[4 * i : 4 * i + 4], 16) & 3
    return access


def _int_child(ctx: _Ctx, parent: ET.Element, name: str, default: int) -> int:
    el = parent.find(name)
    if el is None or el.text is None or not el.text.strip():
        return default
    return _parse_int(ctx, el, el.text)


def _parse_int(ctx: _Ctx, el: ET.Element, text: str) -> int:
    t = text.strip()
    try:
        return int(t)
    except ValueError:
        pass
    if t.lower() in ("true", "false"):
        return int(t.lower() == "true")
    try:
        f = float(t)
    except ValueError:
        raise ctx.error(el, f"<{el.tag}> {t!r} is not a number") from None
    if not math.isfinite(f) or f != int(f):
        raise ctx.error(el, f"<{el.tag}> {t!r} is not a whole number")
    return int(f)


def _read_data(ctx: _Ctx, el: ET.Element, obj: TemplateObject, template: Template) -> None:
    v = el.find("Value")
    if v is not None:
        obj.attributes[2] = _parse_value(ctx, v)
    else:
        template.warnings.append(
            f"{obj.ln} class {obj.class_id} attribute 2: no <Value>, not served"
        )


def _read_register(ctx: _Ctx, el: ET.Element, obj: TemplateObject, template: Template) -> None:
    _read_data(ctx, el, obj, template)
    unit = _int_child(ctx, el, "Unit", 0)
    scaler_el = el.find("Scaler")
    scaler = 0
    if scaler_el is not None and (scaler_el.text or "").strip():
        scaler = _parse_scaler(ctx, scaler_el)
    if not -128 <= scaler <= 127 or not 0 <= unit <= 255:
        raise ctx.error(el, f"scaler {scaler} or unit {unit} out of range")
    obj.attributes[3] = (STRUCTURE, [(INT8, scaler), (ENUM, unit)])
    if obj.class_id == 4:
        st = el.find("Status")
        if st is not None:
            obj.attributes[4] = _parse_value(ctx, st)
        ct = el.find("CaptureTime")
        if ct is not None and (ct.text or "").strip():
            obj.attributes[5] = (OCTET_STRING, _encode_datetime(ctx, ct, ct.text or ""))


def _parse_scaler(ctx: _Ctx, el: ET.Element) -> int:
    """Gurux saves the multiplier (10**scaler), e.g. ``0.01`` for scaler -2."""
    text = (el.text or "").strip()
    try:
        mult = float(text)
    except ValueError:
        raise ctx.error(el, f"scaler {text!r} is not a number") from None
    if mult <= 0:
        raise ctx.error(el, f"scaler {text!r} must be a positive power of ten (like 0.01)")
    exp = math.log10(mult)
    rounded = round(exp)
    if abs(exp - rounded) > 1e-6:
        raise ctx.error(el, f"scaler {text!r} is not a power of ten (like 0.01 or 1000)")
    return int(rounded)


def _read_clock(ctx: _Ctx, el: ET.Element, obj: TemplateObject, template: Template) -> None:
    # Attribute 2 (time) is served live by the simulator: the stored time is ignored.
    obj.attributes[3] = (INT16, _ranged(ctx, el, "TimeZone", INT16, 0))
    obj.attributes[4] = (UINT8, _ranged(ctx, el, "Status", UINT8, 0))
    for idx, name in ((5, "Begin"), (6, "End")):
        sub = el.find(name)
        if sub is not None and (sub.text or "").strip():
            obj.attributes[idx] = (OCTET_STRING, _encode_datetime(ctx, sub, sub.text or ""))
    obj.attributes[7] = (INT8, _ranged(ctx, el, "Deviation", INT8, 0))
    obj.attributes[8] = (BOOLEAN, bool(_int_child(ctx, el, "Enabled", 0)))
    obj.attributes[9] = (ENUM, _ranged(ctx, el, "ClockBase", ENUM, 1))


def _ranged(ctx: _Ctx, parent: ET.Element, name: str, dtype: int, default: int) -> int:
    value = _int_child(ctx, parent, name, default)
    lo, hi = _INT_RANGES[dtype]
    if not lo <= value <= hi:
        raise ctx.error(parent.find(name), f"<{name}> {value} out of range {lo}..{hi}")
    return value


def _read_profile(ctx: _Ctx, el: ET.Element, obj: TemplateObject, template: Template) -> None:
    co = el.find("CaptureObjects")
    if co is not None:
        for item in co.findall("Item"):
            ln_el = item.find("LN")
            if ln_el is None:
                raise ctx.error(item, "capture object without <LN>")
            obj.capture_objects.append(
                CaptureColumn(
                    class_id=_int_child(ctx, item, "ObjectType", 0),
                    ln=_parse_ln(ctx, ln_el),
                    attribute=_int_child(ctx, item, "Attribute", 2),
                    data_index=_int_child(ctx, item, "Data", 0),
                )
            )
    buf = el.find("Buffer")
    if buf is not None:
        for row_el in buf.findall("Row"):
            row = [_parse_value(ctx, cell) for cell in row_el.findall("Cell")]
            if obj.capture_objects and len(row) != len(obj.capture_objects):
                raise ctx.error(
                    row_el,
                    f"profile {obj.ln}: row has {len(row)} cells for"
                    f" {len(obj.capture_objects)} capture objects",
                )
            obj.buffer.append(row)
    obj.attributes[4] = (UINT32, _ranged(ctx, el, "CapturePeriod", UINT32, 0))
    obj.attributes[5] = (ENUM, _ranged(ctx, el, "SortMethod", ENUM, 1))
    if el.find("SortObject") is not None:
        template.warnings.append(f"{obj.ln} class 7 attribute 6 (sort object): not served")
    entries = _ranged(ctx, el, "ProfileEntries", UINT32, len(obj.buffer))
    obj.attributes[7] = (UINT32, len(obj.buffer))
    obj.attributes[8] = (UINT32, max(entries, len(obj.buffer)))


def _read_security_setup(ctx: _Ctx, el: ET.Element, ln: str, template: Template) -> None:
    """Keep the keys, titles and policy of a security setup (the object is not served).

    Gurux saves the object once in full and again as a stub in object lists: the
    copy with keys wins, wherever it stands.
    """
    known = template.security_setups.get(ln)
    if known is not None and known.block_key is not None:
        return

    def key(name: str) -> Optional[Secret]:
        k = el.find(name)
        if k is None or not (k.text or "").strip():
            return None
        try:
            raw = bytes.fromhex(re.sub(r"[\s:-]", "", k.text or ""))
        except ValueError:
            raise ctx.error(k, f"<{name}> is not hex bytes (value not shown)") from None
        if len(raw) not in (16, 32):
            raise ctx.error(k, f"<{name}> must be 16 or 32 bytes, not {len(raw)}")
        return Secret(raw)

    title = b""
    st = el.find("ServerSystemTitle")
    if st is not None and (st.text or "").strip():
        title = _hex(ctx, st, st.text or "")
        if len(title) != 8:
            raise ctx.error(st, f"<ServerSystemTitle> must be 8 bytes, not {len(title)}")
    template.security_setups[ln] = TemplateSecuritySetup(
        ln=ln,
        version=_int_child(ctx, el, "Version", 0),
        policy=_int_child(ctx, el, "SecurityPolicy", 0),
        suite=_ranged(ctx, el, "SecuritySuite", UINT8, 0),
        server_system_title=title,
        block_key=key("Guek"),
        auth_key=key("Gak"),
        line=_line(el),
    )


def _conformance_bits(value: int) -> str:
    """Gurux numbers conformance bits from the first bit of the bit-string."""
    return "".join("1" if value >> i & 1 else "0" for i in range(24))


def _read_association(ctx: _Ctx, el: ET.Element, obj: TemplateObject, template: Template) -> None:
    client = _int_child(ctx, el, "ClientSAP", -1)
    if client < 0:
        template.warnings.append(f"{obj.ln} class 15: no <ClientSAP>, association not served")
        return
    if not 0 <= client <= 0x7F:
        raise ctx.error(el.find("ClientSAP"), f"client address {client} out of range 0..127")
    server = _int_child(ctx, el, "ServerSAP", 1)
    obj.attributes[3] = (STRUCTURE, [(INT8, client), (UINT16, server & 0xFFFF)])
    mechanism = 0
    context_id = 1
    acn = el.find("ApplicationContextName")
    if acn is not None:
        context_id = _int_child(ctx, acn, "ContextId", 1)
        if not 1 <= context_id <= 4:
            raise ctx.error(acn, f"application context id {context_id} is not 1..4")
        obj.attributes[4] = (OCTET_STRING, _OID_PREFIX + bytes([1, context_id & 0xFF]))
    xci = el.find("XDLMSContextInfo")
    if xci is not None:
        conformance = _int_child(ctx, xci, "Conformance", 0) & 0xFFFFFF
        cyph = xci.find("CypheringInfo")
        obj.attributes[5] = (
            STRUCTURE,
            [
                (BIT_STRING, _conformance_bits(conformance)),
                (UINT16, _ranged(ctx, xci, "MaxReceivePduSize", UINT16, 1024)),
                (UINT16, _ranged(ctx, xci, "MaxSendPduSize", UINT16, 1024)),
                (UINT8, _ranged(ctx, xci, "DlmsVersionNumber", UINT8, 6)),
                (INT8, _ranged(ctx, xci, "QualityOfService", INT8, 0)),
                (OCTET_STRING, _hex(ctx, cyph, cyph.text or "") if cyph is not None else b""),
            ],
        )
    amn = el.find("AuthenticationMechanismName")
    if amn is not None:
        mechanism = _int_child(ctx, amn, "MechanismId", 0)
        if not 0 <= mechanism <= 255:
            raise ctx.error(amn, f"mechanism id {mechanism} out of range 0..255")
        obj.attributes[6] = (OCTET_STRING, _OID_PREFIX + bytes([2, mechanism]))
    status = el.find("AssociationStatus")
    if status is not None and (status.text or "").strip():
        obj.attributes[8] = (ENUM, _ranged(ctx, el, "AssociationStatus", ENUM, 0))
    ssr = el.find("SecuritySetupReference")
    security_setup = None
    if ssr is not None and (ssr.text or "").strip():
        security_setup = _parse_ln(ctx, ssr)
        obj.attributes[9] = (OCTET_STRING, bytes(int(p) for p in security_setup.split(".")))
    secret: Optional[Secret] = None
    sec_el = el.find("Secret")
    if sec_el is not None and (sec_el.text or "").strip():
        # Never echo the text in an error: it is the meter's password.
        raw = (sec_el.text or "").strip()
        try:
            secret = Secret(bytes.fromhex(raw))
        except ValueError:
            raise ctx.error(sec_el, "<Secret> is not hex bytes (value not shown)") from None
    objects: list[tuple[int, str]] = []
    ol = el.find("ObjectList")
    if ol is not None:
        for child in ol:
            ln_el = child.find("LN")
            cid = CLASS_IDS.get(child.tag[6:]) if child.tag.startswith("GXDLMS") else None
            if ln_el is None or cid is None:
                continue
            objects.append((cid, _parse_ln(ctx, ln_el)))
            if cid == 64:  # Gurux often saves the keys only inside the object list
                _read_security_setup(ctx, child, _parse_ln(ctx, ln_el), template)
    assoc = TemplateAssociation(
        ln=obj.ln,
        client_sap=client,
        server_sap=server,
        mechanism_id=mechanism,
        secret=secret,
        object_list=objects,
        line=obj.line,
        context_id=context_id,
        security_setup=security_setup,
    )
    if objects:
        template.warnings.append(
            f"{obj.ln} class 15: client {client} object list and access rights not enforced"
            " (every client reads every object)"
        )
    if mechanism not in SERVED_MECHANISMS:
        template.warnings.append(
            f"{obj.ln} class 15: client {client} with {assoc.mechanism_name}"
            " authentication: not served"
        )
        return
    if any(a.client_sap == client for a in template.associations):
        template.warnings.append(
            f"{obj.ln} class 15: client {client} already has an association, not served"
        )
        return
    template.associations.append(assoc)


def _read_association_sn(
    ctx: _Ctx, el: ET.Element, obj: TemplateObject, template: Template
) -> None:
    """Association SN (class 12): the template is read with short names (see build_device)."""
    sec_el = el.find("Secret")
    if sec_el is not None and (sec_el.text or "").strip():
        try:  # never echo the text in an error: it is the meter's secret
            template.sn_secret = Secret(bytes.fromhex((sec_el.text or "").strip()))
        except ValueError:
            raise ctx.error(sec_el, "<Secret> is not hex bytes (value not shown)") from None
    if el.find("ObjectList") is not None:
        template.warnings.append(
            f"{obj.ln} class 12: object list served from the template's objects, not stored"
        )


_READERS = {
    1: _read_data,
    3: _read_register,
    4: _read_register,
    7: _read_profile,
    8: _read_clock,
    12: _read_association_sn,
    15: _read_association,
}


def _check_references(template: Template) -> None:
    """Profile columns pointing at objects the template does not define."""
    for obj in template.objects:
        for col in obj.capture_objects:
            if template.find(col.ln) is None and col.class_id != 15:
                template.warnings.append(
                    f"{obj.ln} class 7: capture object {col.ln} class {col.class_id}"
                    " is not in the template"
                )


def _resolve_security(template: Template) -> None:
    """Give each association its ciphering (from the context id) and keys (security setup)."""
    for a in template.associations:
        setup = template.security_setups.get(a.security_setup or "")
        ciphered = a.context_id in (3, 4)
        needs_keys = ciphered or a.mechanism_id == cosem.MECH_HLS_GMAC
        if setup is not None:
            a.security_suite = setup.suite
            a.server_system_title = setup.server_system_title
            a.block_key, a.auth_key = setup.block_key, setup.auth_key
        if ciphered:
            a.security = (setup.security_control() if setup is not None else 0) or 0x30
        if needs_keys and (a.block_key is None or a.auth_key is None):
            template.warnings.append(
                f"{a.ln} class 15: client {a.client_sap} has no keys in a security setup"
                " object: Gurux's demonstration keys are used"
            )
            a.block_key = a.block_key or Secret(DEMO_BLOCK_KEY)
            a.auth_key = a.auth_key or Secret(DEMO_AUTH_KEY)
        if a.security_suite > 2:
            raise TemplateError(
                f"template {template.path}, line {a.line}: security suite {a.security_suite}"
                " is not 0, 1 or 2"
            )


# ------------------------------------------------------------------------- values
def _parse_value(ctx: _Ctx, el: ET.Element) -> DlmsValue:
    """A ``<Value Type=".." UIType="..">`` / ``<Cell>`` / ``<Item>`` element."""
    type_text = el.get("Type")
    ui_text = el.get("UIType")
    try:
        dtype = int(type_text) if type_text else NULL
        ui = int(ui_text) if ui_text else dtype
    except ValueError:
        raise ctx.error(
            el, f"<{el.tag}> Type {type_text!r} is not a DLMS data type number"
        ) from None
    text = el.text or ""
    if dtype == NULL and text.strip():
        # Gurux writes no Type for a plain string it could not type: serve it as text.
        return (STRING, text)
    if dtype in (ARRAY, STRUCTURE):
        return (dtype, [_parse_value(ctx, item) for item in el.findall("Item")])
    if dtype == NULL:
        return (NULL, None)
    t = text.strip()
    try:
        if dtype == BOOLEAN:
            if t.lower() in ("1", "true"):
                return (BOOLEAN, True)
            if t.lower() in ("0", "false", ""):
                return (BOOLEAN, False)
            raise ValueError(t)
        if dtype in _INT_RANGES:
            value = _parse_int(ctx, el, t)
            lo, hi = _INT_RANGES[dtype]
            if not lo <= value <= hi:
                raise ctx.error(el, f"value {value} out of range {lo}..{hi} for type {dtype}")
            return (dtype, value)
        if dtype in (FLOAT32, FLOAT64):
            return (dtype, float(t.replace(",", ".")))
        if dtype == OCTET_STRING:
            if ui in (STRING, STRING_UTF8):
                return (OCTET_STRING, text.encode("utf-8"))
            if ui == DATETIME:
                return (OCTET_STRING, _encode_datetime(ctx, el, t))
            if ui == DATE:
                return (OCTET_STRING, _encode_date(ctx, el, t))
            if ui == TIME:
                return (OCTET_STRING, _encode_time(ctx, el, t))
            return (OCTET_STRING, _hex(ctx, el, t))
        if dtype in (STRING, STRING_UTF8):
            return (dtype, text)
        if dtype == BIT_STRING:
            if not re.fullmatch(r"[01]*", t):
                raise ValueError(t)
            return (BIT_STRING, t)
        if dtype == DATETIME:
            return (DATETIME, _encode_datetime(ctx, el, t))
        if dtype == DATE:
            return (DATE, _encode_date(ctx, el, t))
        if dtype == TIME:
            return (TIME, _encode_time(ctx, el, t))
    except TemplateError:
        raise
    except ValueError:
        raise ctx.error(el, f"<{el.tag}> {t!r} is not a valid value of type {dtype}") from None
    raise ctx.error(el, f"<{el.tag}> data type {dtype} is not supported")


def _hex(ctx: _Ctx, el: ET.Element, text: str) -> bytes:
    cleaned = re.sub(r"[\s:-]", "", text)
    try:
        return bytes.fromhex(cleaned)
    except ValueError:
        raise ctx.error(el, f"<{el.tag}> {text!r} is not hex bytes (like 47 52 58 33)") from None


_TZ = r"(?:\s*(?P<tz>Z|[+-]\d{2}:?\d{2}))?"
_DT_RE = re.compile(
    r"^(?P<mon>\*|\d{1,2}|BEGIN|END)/(?P<day>\*|\d{1,2})/(?P<year>\*|\d{1,4})"
    r"(?:\s+(?P<h>\*|\d{1,2}):(?P<m>\*|\d{1,2})(?::(?P<s>\*|\d{1,2}))?)?" + _TZ + "$"
)
_ISO_RE = re.compile(
    r"^(?P<year>\d{4})-(?P<mon>\d{2})-(?P<day>\d{2})"
    r"(?:[T ](?P<h>\d{2}):(?P<m>\d{2})(?::(?P<s>\d{2}))?)?" + _TZ + "$"
)
#: COSEM month values for Gurux's DST markers
_MONTH_WORDS = {"BEGIN": 0xFE, "END": 0xFD}


def _field(value: Optional[str], wildcard: int) -> int:
    if value is None or value == "*":
        return wildcard
    return int(value)


def _deviation(tz: Optional[str]) -> int:
    """Blue Book deviation (local + deviation = UTC) of ``+02:00``; 0x8000 when absent."""
    if tz is None:
        return -0x8000
    if tz == "Z":
        return 0
    sign = -1 if tz[0] == "+" else 1
    digits = tz[1:].replace(":", "")
    return sign * (int(digits[:2]) * 60 + int(digits[2:]))


def _encode_datetime(ctx: _Ctx, el: Optional[ET.Element], text: str) -> bytes:
    """``MM/dd/yyyy HH:mm:ss`` (``*`` = not specified) -> COSEM date-time (12 bytes).

    Gurux writes local time without an offset: the deviation is then 0x8000
    (not specified) and a client takes it as the meter's local time.  An
    explicit offset (``+02:00``, ``Z``) is kept.
    """
    t = text.strip()
    m = _DT_RE.match(t) or _ISO_RE.match(t)
    if not m:
        raise ctx.error(
            el,
            f"<{el.tag if el is not None else 'date-time'}> {t!r} is not a date-time"
            " (expected MM/dd/yyyy HH:mm:ss)",
        )
    year = _field(m.group("year"), 0xFFFF)
    mon_text = m.group("mon")
    mon = _MONTH_WORDS[mon_text] if mon_text in _MONTH_WORDS else _field(mon_text, 0xFF)
    day = _field(m.group("day"), 0xFF)
    hour = _field(m.group("h"), 0xFF) if m.group("h") else 0
    minute = _field(m.group("m"), 0xFF) if m.group("m") else 0
    sec = _field(m.group("s"), 0xFF) if m.group("s") else 0
    if (
        (mon < 0xFD and not 1 <= mon <= 12)
        or (day != 0xFF and not 1 <= day <= 31)
        or (hour != 0xFF and hour > 23)
        or (minute != 0xFF and minute > 59)
        or (sec != 0xFF and sec > 59)
    ):
        raise ctx.error(el, f"date-time {t!r} has a field out of range")
    dow = 0xFF
    if year != 0xFFFF and mon <= 12 and day != 0xFF:
        try:
            dow = datetime.date(year, mon, day).isoweekday()
        except ValueError:
            raise ctx.error(el, f"date-time {t!r} is not a calendar date") from None
    deviation = _deviation(m.group("tz"))
    # hundredths 0, clock status 0 (valid)
    return struct.pack(">HBBBBBBBhB", year, mon, day, dow, hour, minute, sec, 0, deviation, 0)


def _encode_date(ctx: _Ctx, el: ET.Element, text: str) -> bytes:
    return _encode_datetime(ctx, el, text.strip() + " 00:00:00")[:5]


def _encode_time(ctx: _Ctx, el: ET.Element, text: str) -> bytes:
    m = re.fullmatch(r"(\*|\d{1,2}):(\*|\d{1,2})(?::(\*|\d{1,2}))?", text.strip())
    if not m:
        raise ctx.error(el, f"<{el.tag}> {text!r} is not a time (expected HH:mm:ss)")
    return bytes(
        [
            _field(m.group(1), 0xFF),
            _field(m.group(2), 0xFF),
            _field(m.group(3), 0xFF) if m.group(3) else 0,
            0,
        ]
    )


# ------------------------------------------------------------------ object model
def encode_value(value: DlmsValue) -> bytes:
    """A typed template value as complete A-XDR Data (tag + content)."""
    dtype, v = value
    if dtype in (ARRAY, STRUCTURE):
        return ax.encode(dtype, [encode_value(item) for item in v])
    if dtype == BIT_STRING:
        bits = str(v)
        nbytes = (len(bits) + 7) // 8
        raw = int(bits.ljust(8 * nbytes, "0"), 2).to_bytes(nbytes, "big") if bits else b""
        return ax.encode(BIT_STRING, (len(bits), raw))
    return ax.encode(dtype, v)


def build_device(template: Template, password: Optional[bytes] = None) -> cosem.Device:
    """The simulator's ``cosem.Device`` serving the template's objects.

    ``password`` (``-P``) replaces the secret of every Low-level association; HLS
    secrets and keys come from the template.
    Every associated client reads every object: per-association object lists
    and access rights are not enforced (said in ``template.warnings``).
    """
    objects: list[cosem.CosemObject] = []
    for obj in template.objects:
        attrs: dict[int, Any] = {a: encode_value(v) for a, v in obj.attributes.items()}
        selective: dict[int, tuple[int, ...]] = {}
        if obj.class_id == 8:
            attrs[2] = _live_clock
        elif obj.class_id == 7:
            attrs[2] = _StoredBuffer(obj, [encode_value((STRUCTURE, row)) for row in obj.buffer])
            attrs[3] = ax.array(
                [
                    ax.structure(
                        [
                            ax.uint16(c.class_id),
                            ax.octet_string(cosem.ln_bytes(c.ln)),
                            ax.int8(c.attribute),
                            ax.uint16(c.data_index),
                        ]
                    )
                    for c in obj.capture_objects
                ]
            )
            attrs.setdefault(
                6,
                ax.structure([ax.uint16(0), ax.octet_string(bytes(6)), ax.int8(0), ax.uint16(0)]),
            )
            selective[2] = (1, 2)
        if obj.class_id == 12:
            attrs = {}  # object list and access rights come from the served objects (sn.py)
        objects.append(
            cosem.CosemObject(
                obj.class_id,
                cosem.ln_bytes(obj.ln),
                obj.version,
                attrs,
                None,
                selective,
                short_name=obj.short_name,
            )
        )
    associations = []
    for a in template.associations:
        secret = b""
        if a.mechanism_id == cosem.MECH_LOW and password is not None:
            secret = password
        elif a.secret:
            secret = _raw(a.secret)
        associations.append(
            cosem.Association(
                a.client_sap,
                a.mechanism_id,
                secret=secret,
                security=a.security,
                block_key=_raw(a.block_key),
                auth_key=_raw(a.auth_key),
                referencing=2 if a.context_id in (2, 4) else 1,
                security_suite=a.security_suite,
                system_title=a.server_system_title,
                server_sap=a.server_sap,
                security_setup=cosem.ln_bytes(a.security_setup) if a.security_setup else bytes(6),
            )
        )
    short_names = not associations and any(o.class_id == 12 for o in template.objects)
    if short_names:
        associations = _sn_associations(template, password)
    if not associations:
        raise TemplateError(
            f"template {template.path}: no association that the simulator can serve"
            " (it needs a GXDLMSAssociationLogicalName with a <ClientSAP> and an"
            " authentication other than HighECDSA, or a GXDLMSAssociationShortName)"
        )
    device = cosem.Device(objects, associations, name=Path(template.path).name)
    try:
        if short_names:
            sn.use_short_names(device)
        elif any(o.short_name is not None for o in objects):
            sn.sn_map(device)  # the template's <SN> must hold for -r SN
    except sn.SnError as e:
        raise TemplateError(f"template {template.path}: {e}") from None
    # Every association object lists the same objects (the current association's view).
    for o in device.objects:
        if o.class_id == 15:
            o.attrs.setdefault(2, device.by_key[(15, device.association_ln)].attrs[2])
            # the attributes of its version that the file leaves out: none, empty, no user
            o.attrs.setdefault(7, cosem.secret_denied)
            o.attrs.setdefault(8, ax.enum(0))
            if o.version >= 1:
                o.attrs.setdefault(9, ax.octet_string(bytes(6)))
            if o.version >= 2:
                o.attrs.setdefault(10, ax.array([]))
                o.attrs.setdefault(11, ax.structure([ax.uint8(0), ax.visible_string("")]))
    return device


def _raw(secret: Optional[Secret]) -> bytes:
    if not secret:
        return b""
    raw = secret.reveal()
    return raw.encode() if isinstance(raw, str) else bytes(raw)


#: clients of a short-name template, as Gurux's example meters number them
SN_CLIENTS = ((16, cosem.MECH_NONE), (17, cosem.MECH_LOW), (18, cosem.MECH_HIGH))


def _sn_associations(template: Template, password: Optional[bytes]) -> list[cosem.Association]:
    """A template with an association SN object (class 12) and no LN association.

    Gurux's class 12 has one secret and no client address: serve client 16 without
    authentication and, with the secret (or ``-P``), 17 Low and 18 High.
    """
    secret = b""
    if password is not None:
        secret = password
    elif template.sn_secret:
        raw = template.sn_secret.reveal()
        secret = raw.encode() if isinstance(raw, str) else bytes(raw)
    out = []
    for client, mech in SN_CLIENTS:
        if mech == cosem.MECH_NONE or secret:
            out.append(cosem.Association(client, mech, secret=secret, referencing=2))
    return out


def _live_clock(ctx: cosem.ReadContext) -> bytes:
    """The template's stored time is a snapshot: a meter's clock runs."""
    return ax.datetime_data(ctx.now, ctx.utc_offset)


class _StoredBuffer:
    """Profile buffer from the template's rows, with selective access by range and entry."""

    def __init__(self, obj: TemplateObject, rows: list[bytes]):
        self.ln = obj.ln
        self.rows = rows
        self.raw = obj.buffer
        self.columns = obj.capture_objects

    def __call__(self, ctx: cosem.ReadContext) -> bytes:
        rows = self.rows
        if ctx.selector == 1:
            p = ctx.params
            if not isinstance(p, list) or len(p) < 3:
                raise DataAccessError(OTHER_REASON)
            try:
                start = ax.parse_datetime(p[1], ctx.utc_offset)
                end = ax.parse_datetime(p[2], ctx.utc_offset)
            except (ax.DecodeError, TypeError) as e:
                raise DataAccessError(OTHER_REASON) from e
            chosen = []
            for raw, enc in zip(self.raw, self.rows):
                t = self._time(raw, ctx.utc_offset)
                if t is not None and start <= t <= end:
                    chosen.append(enc)
            rows = chosen
        elif ctx.selector == 2:
            p = ctx.params
            if not isinstance(p, list) or len(p) != 4:
                raise DataAccessError(OTHER_REASON)
            first, last, fc, tc = p
            first = max(1, first)
            last = len(self.rows) if last == 0 else min(last, len(self.rows))
            if fc not in (0, 1) or tc not in (0, len(self.columns)):
                # Column selection on stored rows: re-encode the chosen cells.
                fc = max(1, fc)
                tc = len(self.columns) if tc == 0 else min(tc, len(self.columns))
                return ax.array(
                    [
                        encode_value((STRUCTURE, raw[fc - 1 : tc]))
                        for raw in self.raw[first - 1 : last]
                    ]
                )
            rows = self.rows[first - 1 : last]
        elif ctx.selector != 0:
            raise DataAccessError(OTHER_REASON)
        return b"\x01" + ax.enc_len(len(rows)) + b"".join(rows)

    @staticmethod
    def _time(row: list[DlmsValue], utc_offset: int) -> Optional[int]:
        if not row:
            return None
        dtype, v = row[0]
        if dtype in (OCTET_STRING, DATETIME) and isinstance(v, bytes) and len(v) == 12:
            try:
                return ax.parse_datetime(v, utc_offset)
            except ax.DecodeError:
                return None
        return None
