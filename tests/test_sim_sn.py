# SPDX-License-Identifier: GPL-2.0-or-later
"""Short-name referencing in the simulator, read by Gurux's own client (the independent proof).

Gurux's Python client (gurux-dlms 1.0.203) with ``useLogicalNameReferencing = False``
reads the built-in meter over real TCP, WRAPPER and HDLC; every value is compared
with ``dlms2amqp.simulator.model`` and every base name with the table in
docs/design.md.  Unit tests at the end check the bytes of the simulator's READ
responses against IEC 62056-53 without any client.

gurux-dlms 1.0.203 cannot read a multi-block SN reply or send a ciphered SN request
as shipped.  The tests supply the smallest test-local fixes, each named after the
line it works around (``GX_FIXES``), so that the rest of the exchange is still
Gurux's own code; ``test_gurux_sn_block_bug_still_there`` fails the day Gurux
fixes the first of them.

The file is long because it tells the whole SN story in one place: the Gurux
client's view over sockets, then the bytes the same requests produce.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
from gurux_dlms import GXDLMSException, GXDLMSExceptionResponse, GXReplyData
from gurux_dlms.enums import Conformance, RequestTypes, SourceDiagnostic
from gurux_dlms.objects import GXDLMSData

from dlms2amqp.simulator import apdu as sim_apdu
from dlms2amqp.simulator import axdr_enc, cosem, model, sn
from dlms2amqp.simulator.apdu import Session, SimOptions
from tests.helpers_sim import GuruxMeter, gurux_client, running_simulator

INTERFACES = ["WRAPPER", "HDLC"]
READ_REQUEST = 5

#: base names of the built-in meter (docs/design.md, "Short-name referencing")
BASE_NAMES = {
    ("0.0.40.0.0.255", 12): 0xFA00,
    ("0.0.1.0.0.255", 8): 0x0100,
    ("0.0.42.0.0.255", 1): 0x0200,
    ("0.0.96.1.0.255", 1): 0x0300,
    ("0.0.43.1.0.255", 1): 0x0400,
    ("1.0.1.8.0.255", 3): 0x0500,
    ("1.0.2.8.0.255", 3): 0x0600,
    ("1.0.32.7.0.255", 3): 0x0700,
    ("1.0.31.7.0.255", 3): 0x0800,
    ("0.0.96.10.1.255", 1): 0x0900,
    ("1.0.99.1.0.255", 7): 0x0A00,
    ("1.0.98.1.0.255", 7): 0x0B00,
}


def _utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=timezone.utc)


def _ts(d: datetime) -> int:
    return int(d.timestamp())


def _rows(value) -> list[tuple]:
    return [(axdr_enc.parse_datetime(bytes(r[0])), *r[1:]) for r in value]


# --- Gurux 1.0.203 and SN: the fixes the tests need ----------------------------------
def _set_total_count(self, value: int) -> None:
    self.totalCount = value


def _get_more_data(self):
    return self.moreData


#: GXDLMS.readResponseDataBlockResult (GXDLMS.py lines 1847-1848) calls
#: GXReplyData.setTotalCount and getMoreData, which 1.0.203 does not define:
#: every data-block-result of a READ-response ends in AttributeError.
GX_FIXES = {"setTotalCount": _set_total_count, "getMoreData": _get_more_data}


@pytest.fixture
def gurux_sn_fixes(monkeypatch):
    for name, fn in GX_FIXES.items():
        monkeypatch.setattr(GXReplyData, name, fn, raising=False)


class SnMeter(GuruxMeter):
    """GuruxMeter for SN; counts the block-number-access requests it sends.

    GXDLMS.receiverReady (GXDLMS.py line 154) builds the next-block request with
    ``settings.command``, which the 1.0.203 client never sets: it would send the
    command byte 0x00 instead of READ-request (0x05), which a meter rightly refuses.
    ``request`` sets it before following the blocks.  With ``ciphered``, the
    invocation counter is raised after every exchange, as GXDLMS.getSNPdu
    (line 893) never raises it itself.
    """

    def __init__(self, *a, ciphered: bool = False, **kw):
        super().__init__(*a, **kw)
        self.ciphered = ciphered
        self.block_requests = 0

    def exchange(self, frame, reply) -> None:
        super().exchange(frame, reply)
        if self.ciphered:
            self.client.ciphering.invocationCounter += 1

    def request(self, frames):
        if frames is None:
            frames = []
        if isinstance(frames, (bytes, bytearray)):
            frames = [frames]
        reply = GXReplyData()
        for frame in frames:
            reply.clear()
            self.exchange(frame, reply)
            while reply.isMoreData():
                if reply.moreData & RequestTypes.DATABLOCK:
                    self.block_requests += 1
                    self.client.settings.command = READ_REQUEST
                self.exchange(self.client.receiverReady(reply), reply)
        return reply


def sn_client(client_sap: int, interface: str, max_pdu: int = 0, **kw):
    """Gurux client with SN referencing; ``max_pdu`` > 0 also proposes block transfer."""
    c = gurux_client(client_sap, interface, **kw)
    c.useLogicalNameReferencing = False
    if max_pdu:
        c.proposedConformance |= Conformance.BLOCK_TRANSFER_WITH_GET_OR_READ
        c.setMaxReceivePDUSize(max_pdu)
    return c


#: Gurux's clients read SN blocks that carry the bare Data (see sn.py), not the result list
GURUX_BLOCKS = ("-r", "SN", "--sn-blocks", "data")


@pytest.fixture(scope="module", params=INTERFACES)
def sim(request):
    with running_simulator(3, *GURUX_BLOCKS, interface=request.param) as info:
        info.interface = request.param
        yield info


def _meter(sim, client_sap: int, k: int = 0, max_pdu: int = 0, **kw) -> SnMeter:
    m = SnMeter(sn_client(client_sap, sim.interface, max_pdu, **kw), sim.host, sim.port + k)
    m.connect()
    return m


def _objects(m: SnMeter) -> dict[str, object]:
    reply = m.request(m.client.getObjectsRequest())
    return {str(o.logicalName): o for o in m.client.parseObjects(reply.data, True)}


def _by_base(ln: str, class_id: int):
    """A Gurux object addressed by the base name documented for it."""
    from gurux_dlms.GXDLMSClient import GXDLMSClient

    obj = GXDLMSClient.createObject(class_id)
    obj.logicalName = ln
    obj.shortName = BASE_NAMES[(ln, class_id)]
    return obj


# --- over real sockets ------------------------------------------------------------------
@pytest.mark.integration
def test_sn_association_and_object_list(sim):
    # Given the built-in meter, when Gurux associates with the SN context and reads 0xFA00/2
    m = _meter(sim, 32, k=1)
    try:
        objects = _objects(m)
        ldn = m.request(m.client.read(objects["0.0.42.0.0.255"], 2)).value
        serial = m.request(m.client.read(objects["0.0.96.1.0.255"], 2)).value
        m.release()
    finally:
        m.close()
    # Then the meter negotiated the SN services and lists each object at its documented base
    neg = m.client.negotiatedConformance
    wanted = (Conformance.READ, Conformance.MULTIPLE_REFERENCES, Conformance.PARAMETERIZED_ACCESS)
    assert all(neg & bit for bit in wanted)
    assert not neg & Conformance.GET
    got = {(ln, int(o.objectType)): o.shortName for ln, o in objects.items()}
    assert got == BASE_NAMES
    assert bytes(ldn) == model.logical_device_name(1)
    assert str(serial) == model.serial_number(1)


@pytest.mark.integration
def test_sn_clock(sim):
    m = _meter(sim, 16)
    try:
        clock = _by_base("0.0.1.0.0.255", 8)
        m.read(clock, 2)
        tz = m.read(clock, 3)
        status = m.read(clock, 4)
    finally:
        m.close()
    assert abs(clock.time.value.timestamp() - time.time()) < 10
    assert tz == 0
    assert int(status) == 0


@pytest.mark.integration
@pytest.mark.parametrize(
    "ln, fn, scaler, unit",
    [
        ("1.0.1.8.0.255", model.import_wh, 1.0, 30),
        ("1.0.32.7.0.255", model.voltage_raw, 0.1, 35),
        ("1.0.31.7.0.255", model.current_raw, 0.01, 33),
    ],
)
def test_sn_registers_with_scaler_unit(sim, ln, fn, scaler, unit):
    k = 2
    m = _meter(sim, 32, k=k)
    try:
        reg = _by_base(ln, 3)
        m.read(reg, 3)
        before = int(time.time())
        reply = m.request(m.client.read(reg, 2))
        after = int(time.time())
    finally:
        m.close()
    assert reg.scaler == pytest.approx(scaler)
    assert int(reg.unit) == unit
    assert reply.value in {fn(k, before), fn(k, after)}


@pytest.mark.integration
def test_sn_public_client_denied_energy(sim):
    m = _meter(sim, 16)
    try:
        reply = m.request(m.client.read(_by_base("1.0.1.8.0.255", 3), 2))
    finally:
        m.close()
    assert reply.error == cosem.READ_WRITE_DENIED


@pytest.mark.integration
def test_sn_wrong_password_rejected(sim):
    c = sn_client(32, sim.interface, password="12345678")
    with SnMeter(c, sim.host, sim.port) as m:
        with pytest.raises(GXDLMSException) as exc:
            m.connect()
    assert exc.value.diagnostic == SourceDiagnostic.AUTHENTICATION_FAILURE


@pytest.mark.integration
@pytest.mark.parametrize("client_sap, mechanism", [(18, 2), (19, 3), (20, 4), (22, 6)])
def test_sn_high_family(sim, client_sap, mechanism):
    # Given a High-family client: Gurux sends HLS pass 3 as a WRITE to 0xFA58 (class 12
    # method 8) and reads f(CtoS) from the READ-response the meter answers with
    from gurux_dlms.enums import Authentication, InterfaceType
    from gurux_dlms.secure import GXDLMSSecureClient

    itype = InterfaceType.HDLC if sim.interface == "HDLC" else InterfaceType.WRAPPER
    server = 1  # -s 1: one byte 03 with HDLC, as Gurux's example client sends it
    auth = Authentication(mechanism)
    c = GXDLMSSecureClient(False, client_sap, server, auth, cosem.HLS_SECRET.decode(), itype)
    if auth == Authentication.HIGH_SHA256:
        c.ciphering.systemTitle = bytearray(b"GRX12345")
    m = SnMeter(c, sim.host, sim.port)
    try:
        m.connect()  # raises unless the meter's f(CtoS) checks out
        before = int(time.time())
        value = m.read(_by_base("1.0.1.8.0.255", 3), 2)
        after = int(time.time())
        m.release()
    finally:
        m.close()
    assert c.getIsAuthenticationRequired()
    assert value in {model.import_wh(0, before), model.import_wh(0, after)}


@pytest.mark.integration
def test_sn_high_wrong_secret_rejected(sim):
    from gurux_dlms.enums import Authentication, InterfaceType
    from gurux_dlms.secure import GXDLMSSecureClient

    itype = InterfaceType.HDLC if sim.interface == "HDLC" else InterfaceType.WRAPPER
    server = 1  # -s 1: one byte 03 with HDLC, as Gurux's example client sends it
    c = GXDLMSSecureClient(False, 19, server, Authentication.HIGH_MD5, "Wrong", itype)
    m = SnMeter(c, sim.host, sim.port)
    try:
        if itype == InterfaceType.HDLC:
            c.parseUAResponse(m.request(c.snrmRequest()).data)
        reply = m.request(c.aarqRequest())
        c.parseAareResponse(reply.data)
        reply = m.request(c.getApplicationAssociationRequest())
        # the meter refuses pass 3: write-response read-write-denied, no f(CtoS)
        assert reply.error == cosem.READ_WRITE_DENIED
        # and the association is gone: service-not-allowed
        with pytest.raises(GXDLMSExceptionResponse):
            m.request(c.read(_by_base("1.0.1.8.0.255", 3), 2))
    finally:
        m.close()


@pytest.mark.integration
def test_sn_multiple_variable_access(sim):
    # Given one READ-request naming four variables, one of them not a base name of this meter
    k = 1
    m = _meter(sim, 32, k=k)
    try:
        volt = _by_base("1.0.32.7.0.255", 3)
        serial = _by_base("0.0.96.1.0.255", 1)
        unknown = GXDLMSData("0.0.96.1.9.255")
        unknown.shortName = 0x4000
        frames = m.client.readList([(volt, 3), (serial, 2), (volt, 1), (unknown, 2)])
        assert len(frames) == 1  # one request for all four
        before = int(time.time())
        reply = m.request(frames[0])
        after = int(time.time())
    finally:
        m.close()
    # Then the answers come back in order, the unknown one as object-undefined
    # (Gurux keeps the values and reports the data-access error in reply.error)
    assert reply.error == cosem.OBJECT_UNDEFINED
    scaler_unit, serial_v, ln = reply.value  # the error item has no value
    assert scaler_unit == [-1, 35]
    assert str(serial_v) == model.serial_number(k)
    assert bytes(ln) == cosem.ln_bytes("1.0.32.7.0.255")
    assert before <= after


@pytest.mark.integration
def test_sn_profile_by_range_several_blocks(sim, gurux_sn_fixes):
    # Given a client that accepts 256-byte PDUs and proposes block transfer with READ
    k = 1
    start, end = _utc(2026, 3, 4, 22), _utc(2026, 3, 5, 10)
    m = _meter(sim, 32, k=k, max_pdu=256)
    try:
        assert m.client.negotiatedConformance & Conformance.BLOCK_TRANSFER_WITH_GET_OR_READ
        pg = _by_base("1.0.99.1.0.255", 7)
        m.read(pg, 3)
        m.block_requests = 0
        reply = m.request(m.client.readRowsByRange(pg, start, end))
        rows = _rows(reply.value)
        m.client.updateValue(pg, 2, reply.value)
        m.release()
    finally:
        m.close()
    # Then the rows arrive over several data-block-results and equal the model
    assert not reply.error
    assert m.block_requests >= 4
    expected = model.load_profile_rows(k, _ts(start), _ts(end))
    assert len(expected) == 49
    assert rows == expected
    assert [int(r[0].value.timestamp()) for r in pg.buffer] == [r[0] for r in expected]
    assert [str(c[0].logicalName) for c in pg.captureObjects] == [
        "0.0.1.0.0.255", "0.0.96.10.1.255", "1.0.1.8.0.255", "1.0.2.8.0.255"
    ]  # fmt: skip


@pytest.mark.integration
def test_sn_billing_by_range_and_object_list_in_blocks(sim, gurux_sn_fixes):
    k = 2
    start, end = _utc(2026, 1, 25), _utc(2026, 2, 5)
    m = _meter(sim, 32, k=k, max_pdu=128)
    try:
        objects = _objects(m)
        list_blocks = m.block_requests
        pg = objects["1.0.98.1.0.255"]
        m.read(pg, 3)
        reply = m.request(m.client.readRowsByRange(pg, start, end))
    finally:
        m.close()
    assert list_blocks >= 1
    assert len(objects) == len(BASE_NAMES)
    assert _rows(reply.value) == model.billing_rows(k, _ts(start), _ts(end))


@pytest.mark.integration
def test_sn_profile_by_entry(sim, gurux_sn_fixes):
    k = 0
    m = _meter(sim, 32, k=k, max_pdu=512)
    try:
        pg = _by_base("1.0.99.1.0.255", 7)
        m.read(pg, 3)
        entries = m.read(pg, 7)
        t0 = int(time.time())
        reply = m.request(m.client.readRowsByEntry(pg, entries - 3, 4))
        t1 = int(time.time())
    finally:
        m.close()
    assert entries == model.LOAD_ENTRIES
    candidates = []
    for now in {t0, t1}:
        last = model.last_load_boundary(now)
        candidates.append(model.load_profile_rows(k, last - 3 * 900, last))
    assert _rows(reply.value) in candidates


@pytest.mark.integration
def test_gurux_sn_block_bug_still_there(sim):
    # Without the fixes, Gurux 1.0.203 fails on the first data-block-result it receives.
    m = _meter(sim, 32, max_pdu=256)
    try:
        pg = _by_base("1.0.99.1.0.255", 7)
        with pytest.raises(AttributeError, match="setTotalCount"):
            m.request(m.client.readRowsByRange(pg, _utc(2026, 3, 4), _utc(2026, 3, 5)))
    finally:
        m.close()


@pytest.mark.integration
def test_gurux_reads_no_value_from_standard_sn_blocks(gurux_sn_fixes):
    # Given the simulator's default SN blocks (the result list, as real SN meters send)
    with running_simulator(1, "-r", "SN") as s:
        m = SnMeter(sn_client(32, "WRAPPER", max_pdu=256), s.host, s.port)
        try:
            m.connect()
            pg = _by_base("1.0.99.1.0.255", 7)
            reply = m.request(m.client.readRowsByRange(pg, _utc(2026, 3, 4), _utc(2026, 3, 5)))
        finally:
            m.close()
    # Then gurux-dlms follows every block but gives no value and no error: it decodes the
    # joined raw data as one Data, and '01 00' (one result, choice data) is an empty array
    assert m.block_requests >= 4
    assert reply.value is None and reply.error == 0


# --- a short-name template ----------------------------------------------------------------
SN_TEMPLATE = """<?xml version="1.0" encoding="utf-8"?>
<Objects>
  <GXDLMSAssociationShortName>
    <LN>0.0.40.0.0.255</LN>
    <SN>64000</SN>
    <Version>2</Version>
    <Secret>47 75 72 75 78</Secret>
  </GXDLMSAssociationShortName>
  <GXDLMSClock>
    <LN>0.0.1.0.0.255</LN>
    <SN>512</SN>
    <TimeZone>-60</TimeZone>
  </GXDLMSClock>
  <GXDLMSData>
    <LN>0.0.96.1.0.255</LN>
    <Value Type="10">LGZ1234</Value>
  </GXDLMSData>
  <GXDLMSRegister>
    <LN>1.0.1.8.0.255</LN>
    <SN>768</SN>
    <Value Type="6">12345</Value>
    <Scaler>0.1</Scaler>
    <Unit>30</Unit>
  </GXDLMSRegister>
  <GXDLMSProfileGeneric>
    <LN>1.0.99.1.0.255</LN>
    <SN>1024</SN>
    <Version>1</Version>
    <Buffer>
      <Row><Cell Type="9" UIType="25">01/05/2024 10:00:00</Cell><Cell Type="6">100</Cell></Row>
      <Row><Cell Type="9" UIType="25">01/05/2024 10:15:00</Cell><Cell Type="6">105</Cell></Row>
      <Row><Cell Type="9" UIType="25">01/05/2024 10:30:00</Cell><Cell Type="6">111</Cell></Row>
    </Buffer>
    <CaptureObjects>
      <Item><ObjectType>8</ObjectType><LN>0.0.1.0.0.255</LN><Attribute>2</Attribute></Item>
      <Item><ObjectType>3</ObjectType><LN>1.0.1.8.0.255</LN><Attribute>2</Attribute></Item>
    </CaptureObjects>
    <CapturePeriod>900</CapturePeriod>
    <ProfileEntries>100</ProfileEntries>
  </GXDLMSProfileGeneric>
</Objects>
"""


@pytest.mark.integration
@pytest.mark.parametrize("interface", INTERFACES)
def test_sn_template_read_by_gurux(tmp_path, interface):
    # Given a template with an association SN object and <SN> base names (one left out)
    path = tmp_path / "sn.xml"
    path.write_text(SN_TEMPLATE)
    from gurux_dlms import GXDLMSClient
    from gurux_dlms.enums import Authentication, InterfaceType

    itype = InterfaceType.HDLC if interface == "HDLC" else InterfaceType.WRAPPER
    server = 1  # -s 1: one byte 03 with HDLC, as Gurux's example client sends it
    with running_simulator(1, "-x", str(path), interface=interface) as s:
        # When Gurux's client 17 (Low, the class 12 secret) reads it with short names
        c = GXDLMSClient(False, 17, server, Authentication.LOW, "Gurux", itype)
        m = SnMeter(c, s.host, s.port)
        try:
            m.connect()
            objects = _objects(m)
            reg = objects["1.0.1.8.0.255"]
            m.read(reg, 3)
            value = m.request(c.read(reg, 2)).value
            serial = m.request(c.read(objects["0.0.96.1.0.255"], 2)).value
            tz = m.request(c.read(objects["0.0.1.0.0.255"], 3)).value
            pg = objects["1.0.99.1.0.255"]
            m.read(pg, 3)
            rows = m.request(
                c.readRowsByRange(pg, _utc(2024, 1, 5, 10, 10), _utc(2024, 1, 5, 11))
            ).value
            m.release()
        finally:
            m.close()
        # and client 16 without authentication is served too,
        pub = SnMeter(
            GXDLMSClient(False, 16, server, Authentication.NONE, None, itype), s.host, s.port
        )
        try:
            pub.connect()
            pub_serial = pub.request(pub.client.read(objects["0.0.96.1.0.255"], 2)).value
        finally:
            pub.close()
        # and client 18 with High and the same secret
        from gurux_dlms.secure import GXDLMSSecureClient

        hc = GXDLMSSecureClient(False, 18, server, Authentication.HIGH, "Gurux", itype)
        high = SnMeter(hc, s.host, s.port)
        try:
            high.connect()
            high_value = high.request(hc.read(reg, 2)).value
        finally:
            high.close()
    # Then the template's base names are served, the missing one allocated from 0x0100
    got = {ln: o.shortName for ln, o in objects.items()}
    assert got == {
        "0.0.40.0.0.255": 64000, "0.0.1.0.0.255": 512, "0.0.96.1.0.255": 0x0100,
        "1.0.1.8.0.255": 768, "1.0.99.1.0.255": 1024,
    }  # fmt: skip
    assert value == high_value == 12345
    assert reg.scaler == pytest.approx(0.1) and int(reg.unit) == 30
    assert str(serial) == str(pub_serial) == "LGZ1234"
    assert tz == -60
    assert [(axdr_enc.parse_datetime(bytes(r[0])), r[1]) for r in rows] == [
        (_ts(_utc(2024, 1, 5, 10, 15)), 105),
        (_ts(_utc(2024, 1, 5, 10, 30)), 111),
    ]


@pytest.mark.parametrize(
    "sn_text, message",
    [("770", "not a multiple of 8"), ("776", "overlaps"), ("0", "not a multiple of 8")],
)
def test_sn_template_bad_base_names(sn_text, message):
    from dlms2amqp.simulator import template

    # a second register at 770 / 776: inside the first one's names (768 + 3 attributes)
    text = SN_TEMPLATE.replace(
        "  <GXDLMSProfileGeneric>",
        f"  <GXDLMSRegister><LN>1.0.2.8.0.255</LN><SN>{sn_text}</SN>"
        '<Value Type="6">1</Value></GXDLMSRegister>\n  <GXDLMSProfileGeneric>',
    )
    with pytest.raises(template.TemplateError, match=message):
        template.build_device(template.parse_template(text, "sn.xml"))


# --- client 48: HLS-GMAC and authenticated encryption (glo-read) --------------------------
def _ciphered_main(host: str, port: int, interface: str, ic: int, k: int) -> None:
    """Run under ``python -O``: Gurux's client reads SN through glo-read-request/response.

    ``-O`` drops ``assert not tmp`` in GXDLMS.getSNPdu (GXDLMS.py line 895), an
    assertion that fails on every ciphered SN request Gurux builds (the ciphered
    bytes are exactly what it asserts to be empty).
    """
    for name, fn in GX_FIXES.items():
        setattr(GXReplyData, name, fn)
    c = sn_client(48, interface, max_pdu=512, invocation_counter=ic)
    m = SnMeter(c, host, port, ciphered=True)
    try:
        m.connect()
        reg = _by_base("1.0.2.8.0.255", 3)
        m.read(reg, 3)
        t0 = int(time.time())
        value = m.read(reg, 2)
        t1 = int(time.time())
        pg = _by_base("1.0.99.1.0.255", 7)
        m.read(pg, 3)
        m.block_requests = 0
        reply = m.request(m.client.readRowsByRange(pg, _utc(2026, 1, 1), _utc(2026, 1, 2)))
        blocks = m.block_requests
        m.release()
    finally:
        m.close()
    rows = [[axdr_enc.parse_datetime(bytes(r[0])), *r[1:]] for r in reply.value]
    out = {"unit": int(reg.unit), "value": value, "t": [t0, t1], "rows": rows, "blocks": blocks}
    print("RESULT " + json.dumps(out))


@pytest.mark.integration
@pytest.mark.parametrize("interface", INTERFACES)
def test_sn_hls_gmac_ciphered(interface):
    k = 1
    with running_simulator(2, *GURUX_BLOCKS, interface=interface) as s:
        pub = SnMeter(sn_client(16, interface), s.host, s.port + k)
        try:
            pub.connect()
            last = pub.read(_by_base("0.0.43.1.0.255", 1), 2)
        finally:
            pub.close()
        root = Path(__file__).resolve().parent.parent
        cmd = [sys.executable, "-O", "-m", "tests.test_sim_sn", s.host, str(s.port + k)]
        cmd += [interface, str(last + 1), str(k)]
        env = dict(os.environ, PYTHONPATH=str(root))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    got = json.loads(line[len("RESULT ") :])
    assert got["unit"] == 30
    assert got["value"] in {model.export_wh(k, t) for t in got["t"]}
    expected = model.load_profile_rows(k, _ts(_utc(2026, 1, 1)), _ts(_utc(2026, 1, 2)))
    assert [tuple(r) for r in got["rows"]] == expected
    assert got["blocks"] >= 2


# --- bytes, no client ----------------------------------------------------------------------
def _initiate(conformance: int, max_pdu: int) -> bytes:
    return (
        b"\x01\x00\x00\x00\x06\x5f\x1f\x04\x00"
        + conformance.to_bytes(3, "big")
        + max_pdu.to_bytes(2, "big")
    )


def _aarq(ctx: int, conformance: int, max_pdu: int, password: bytes = b"") -> bytes:
    ui = _initiate(conformance, max_pdu)
    body = b"\xa1\x09\x06\x07\x60\x85\x74\x05\x08\x01" + bytes((ctx,))
    if password:  # Low: acse-requirements, mechanism-name, calling-authentication-value
        body += b"\x8a\x02\x07\x80\x8b\x07\x60\x85\x74\x05\x08\x02\x01"
        body += b"\xac" + bytes((len(password) + 2, 0x80, len(password))) + password
    body += b"\xbe" + bytes((len(ui) + 2, 0x04, len(ui))) + ui
    return b"\x60" + bytes((len(body),)) + body


CONF_ALL = 0x101220  # read, block-read, multiple-references, parameterized-access
CTX_SN = 2


def _sn_device() -> cosem.Device:
    d = cosem.builtin_device()
    sn.use_short_names(d)
    return d


def _session(
    conformance: int = CONF_ALL, max_pdu: int = 256, client: int = 16, blocks: str = "list"
) -> Session:
    s = Session(_sn_device(), cosem.MeterState(0), SimOptions(sn_blocks=blocks))
    password = b"00000000" if client == 32 else b""
    aare = s.handle(client, _aarq(CTX_SN, conformance, max_pdu, password))
    assert aare is not None and aare[13:18] == b"\xa2\x03\x02\x01\x00"  # accepted
    return s


def test_aare_for_sn_context():
    s = Session(_sn_device(), cosem.MeterState(0), SimOptions())
    aare = s.handle(16, _aarq(CTX_SN, 0x10001F | CONF_ALL, 1024))
    assert aare is not None
    # application context 2 echoed, accepted, and an InitiateResponse with the SN services
    assert aare[4:13] == b"\x06\x07\x60\x85\x74\x05\x08\x01\x02"
    assert aare[13:18] == b"\xa2\x03\x02\x01\x00"
    init = aare[-14:]
    assert init == b"\x08\x00\x06\x5f\x1f\x04\x00\x10\x12\x20\xff\xff\xfa\x00"


def test_sn_context_refused_by_ln_association():
    s = Session(cosem.builtin_device(), cosem.MeterState(0), SimOptions())
    aare = s.handle(16, _aarq(CTX_SN, CONF_ALL, 1024))
    assert aare is not None
    assert aare[13:18] == b"\xa2\x03\x02\x01\x01"  # rejected-permanent
    assert aare[18:25] == b"\xa3\x05\xa1\x03\x02\x01\x02"  # application-context-name not supported


def test_ln_context_refused_by_sn_association():
    s = Session(_sn_device(), cosem.MeterState(0), SimOptions())
    aare = s.handle(16, _aarq(1, 0x001010, 1024))
    assert aare is not None
    assert aare[13:18] == b"\xa2\x03\x02\x01\x01"  # rejected-permanent
    assert aare[18:25] == b"\xa3\x05\xa1\x03\x02\x01\x02"  # application-context-name not supported


def test_read_response_items_bytes():
    s = _session()
    # variable-name 0x0108 (clock time zone), 0x0208 (logical device name), 0x4000 (nothing)
    reply = s.handle(16, b"\x05\x03\x02\x01\x10\x02\x02\x08\x02\x40\x00")
    ldn = model.logical_device_name(0)
    assert reply == (
        b"\x0c\x03" + b"\x00\x10\x00\x00" + b"\x00\x09" + bytes((len(ldn),)) + ldn + b"\x01\x04"
    )


@pytest.mark.parametrize("blocks", ["list", "data"])
def test_read_response_blocks_bytes(blocks):
    # Given a client PDU of 256 bytes, when it reads a day of load profile by range
    s = _session(client=32, blocks=blocks)
    pg = 0x0A00 + 8
    params = axdr_enc.structure(
        [
            axdr_enc.structure(
                [
                    axdr_enc.uint16(8),
                    axdr_enc.octet_string(cosem.LN_CLOCK),
                    axdr_enc.int8(2),
                    axdr_enc.uint16(0),
                ]
            ),
            axdr_enc.octet_string(axdr_enc.datetime_raw(_ts(_utc(2026, 1, 1)))),
            axdr_enc.octet_string(axdr_enc.datetime_raw(_ts(_utc(2026, 1, 2)))),
            axdr_enc.array([]),
        ]
    )
    request = b"\x05\x01\x04" + pg.to_bytes(2, "big") + b"\x01" + params
    first = s.handle(32, request)
    # Then READ-response data-block-result: last-block FALSE, block-number 1, raw-data
    assert first is not None and first[:6] == b"\x0c\x01\x02\x00\x00\x01"
    assert len(first) <= 256
    raw = bytearray()
    n, pos = axdr_enc.dec_len(first, 6)
    raw += first[pos : pos + n]
    number = 1
    while True:
        # the client acknowledges with block-number-access
        nxt = s.handle(32, b"\x05\x01\x05" + number.to_bytes(2, "big"))
        assert nxt is not None and nxt[:3] == b"\x0c\x01\x02"
        assert int.from_bytes(nxt[4:6], "big") == number + 1
        assert len(nxt) <= 256
        n, pos = axdr_enc.dec_len(nxt, 6)
        assert pos + n == len(nxt)
        raw += nxt[pos : pos + n]
        number += 1
        if nxt[3]:
            break
    # and the raw data of the blocks together is the result list: one result, choice data,
    # the profile buffer (with --sn-blocks data: the buffer alone)
    assert number > 4
    if blocks == "list":
        assert raw[:3] == b"\x01\x00\x01"
        del raw[:2]
    value, end = axdr_enc.decode(bytes(raw))
    assert end == len(raw)
    assert [axdr_enc.parse_datetime(r[0]) for r in value] == [
        r[0] for r in model.load_profile_rows(0, _ts(_utc(2026, 1, 1)), _ts(_utc(2026, 1, 2)))
    ]
    # and nothing is left to send: no-long-read-in-progress
    assert s.handle(32, b"\x05\x01\x05" + number.to_bytes(2, "big")) == b"\x0c\x01\x01\x10"


def test_read_block_number_out_of_order():
    s = _session(max_pdu=128)
    first = s.handle(16, b"\x05\x01\x02\xfa\x08")  # the object list does not fit 128 bytes
    assert first is not None and first[:6] == b"\x0c\x01\x02\x00\x00\x01"
    # a client that acknowledges a block it never got: data-block-number-invalid, transfer ends
    assert s.handle(16, b"\x05\x01\x05\x00\x05") == b"\x0c\x01\x01\x13"
    assert s.handle(16, b"\x05\x01\x05\x00\x01") == b"\x0c\x01\x01\x10"


@pytest.mark.parametrize(
    "conformance, apdu",
    [
        (0x001220, b"\x05\x01\x02\x01\x08"),  # no read
        (0x101020, b"\x05\x02\x02\x01\x08\x02\x01\x10"),  # two items, no multiple-references
        (0x101200, b"\x05\x01\x04\x0a\x08\x01\x00"),  # parameterised, not negotiated
        (0x101220, b"\x06\x01\x02\xfa\x58\x01\x09\x00"),  # write, not negotiated
    ],
)
def test_services_not_negotiated_refused(conformance, apdu):
    s = _session(conformance=conformance)
    assert s.handle(16, apdu) == bytes((0x0E, apdu[0], 3, 2))  # service-unsupported


def test_no_blocks_without_block_transfer_negotiated():
    s = _session(conformance=0x100220, max_pdu=128)
    reply = s.handle(16, b"\x05\x01\x02\xfa\x08")
    assert reply is not None and reply[:3] == b"\x0c\x01\x00" and len(reply) > 128


def test_parameterised_access_on_plain_attribute_refused():
    s = _session()
    reply = s.handle(16, b"\x05\x01\x04\x01\x08\x01\x00")  # clock time, selector 1, null
    assert reply == b"\x0c\x01\x01" + bytes((cosem.OTHER_REASON,))


def test_read_that_does_not_parse():
    s = _session()
    assert s.handle(16, b"\x05\x02\x02\x01") == b"\x0e\x05\x03\x00"


def test_sn_requests_fuzzed():
    # Whatever follows the READ/WRITE tag, the meter answers with a READ/WRITE response or
    # a confirmed-service-error, never an exception (here: raised out of Session.handle)
    import random

    rng = random.Random(1234)
    s = _session(client=32)
    heads = [b"\x05\x01\x02", b"\x05\x01\x04\x0a\x08", b"\x05\x02\x02", b"\x06\x01\x02", b"\x05"]
    for i in range(3000):
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(12)))
        reply = s.handle(32, heads[i % len(heads)] + body)
        assert reply is not None and reply[0] in (0x0C, 0x0D, 0x0E), reply
    # and the association still serves a plain read afterwards
    assert s.handle(32, b"\x05\x01\x02\x03\x08")[:3] == b"\x0c\x01\x00"


def test_get_and_action_on_sn_association_refused():
    s = _session()
    reply = s.handle(16, b"\xc0\x01\x01\x00\x08\x00\x00\x01\x00\x00\xff\x02\x00")
    assert reply == b"\xd8\x02\x02"  # service-unknown, service-not-supported
    action = b"\xc3\x01\x01\x00\x0f\x00\x00\x28\x00\x00\xff\x01\x01\x09\x02\x00\x00"
    assert s.handle(16, action) == b"\xd8\x02\x02"


def test_base_names_explicit_and_allocated():
    objs = [
        cosem.CosemObject(1, cosem.ln_bytes("0.0.96.1.0.255"), short_name=0x0100),
        cosem.CosemObject(3, cosem.ln_bytes("1.0.1.8.0.255")),
        cosem.CosemObject(7, cosem.ln_bytes("1.0.99.1.0.255"), attrs={2: b"\x00"}),
    ]
    d = cosem.Device(objs, [cosem.Association(16)])
    m = sn.SnMap(d)
    assert [m.base_name(o) for o in objs] == [0x0100, 0x0200, 0x0300]
    assert m.base_name(m.assoc) == 0xFA00
    assert m.resolve(0x0308) == (objs[2], False, 2)
    assert m.resolve(0x0358) == (objs[2], True, 1)  # profile reset: a method
    assert m.resolve(0xFA58) == (m.assoc, True, 8)  # reply_to_HLS_authentication
    with pytest.raises(cosem.DataAccessError):
        m.resolve(0x0104)


def test_base_names_that_overlap_are_refused():
    objs = [
        cosem.CosemObject(3, cosem.ln_bytes("1.0.1.8.0.255"), short_name=0x0100),
        cosem.CosemObject(1, cosem.ln_bytes("0.0.96.1.0.255"), short_name=0x0108),
    ]
    with pytest.raises(sn.SnError, match="overlaps"):
        sn.SnMap(cosem.Device(objs, [cosem.Association(16)]))


def test_hls_pass3_by_read_with_parameterised_access():
    # Given client 19 (HighMD5) associated with a CtoS challenge
    import hashlib

    ctos = b"0123456789ABCDEF"
    s = Session(_sn_device(), cosem.MeterState(0), SimOptions())
    aarq = bytearray(_aarq(CTX_SN, CONF_ALL, 1024))
    extra = b"\x8a\x02\x07\x80\x8b\x07\x60\x85\x74\x05\x08\x02\x03"
    extra += b"\xac\x12\x80\x10" + ctos
    body = bytes(aarq[2:13]) + extra + bytes(aarq[13:])
    aare = s.handle(19, b"\x60" + bytes((len(body),)) + body)
    assert aare is not None and b"\xa3\x05\xa1\x03\x02\x01\x0e" in aare  # authentication-required
    stoc = aare[aare.index(b"\xaa\x12\x80\x10") + 4 :][:16]
    # Before pass 3 the meter serves nothing
    assert s.handle(19, b"\x05\x01\x02\x05\x08") == b"\x0c\x01\x01\x03"
    # When the client sends f(StoC) = MD5(StoC || secret) the standard way, a READ of
    # class 12 method 8 (0xFA58) with parameterised access
    proof = hashlib.md5(stoc + cosem.HLS_SECRET).digest()
    reply = s.handle(19, b"\x05\x01\x04\xfa\x58\x00\x09\x10" + proof)
    # Then the meter answers f(CtoS) = MD5(CtoS || secret) and serves reads
    assert reply == b"\x0c\x01\x00\x09\x10" + hashlib.md5(ctos + cosem.HLS_SECRET).digest()
    reg = s.handle(19, b"\x05\x01\x02\x05\x08")
    assert reg is not None and reg[:4] == b"\x0c\x01\x00\x06"


def test_hls_reply_needs_a_challenge():
    # HLS pass 3 on a session without HLS in progress is refused, not crashed
    s = _session(conformance=CONF_ALL | sn.CONF_WRITE)
    reply = s.handle(16, b"\x06\x01\x02\xfa\x58\x01\x09\x02\x00\x00")
    assert reply == b"\x0d\x01\x01\x03"
    assert sim_apdu.SUPPORTED_CONFORMANCE & sn.CONF_READ == 0


if __name__ == "__main__":
    _ciphered_main(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
