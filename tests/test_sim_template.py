# SPDX-License-Identifier: GPL-2.0-or-later
"""Gurux XML device templates: parsing, errors that name the line, warnings."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest

from dlms2amqp.simulator import template as tpl
from dlms2amqp.simulator.template import TemplateError, load_template, parse_template

DATA = Path(__file__).parent / "data"
EXAMPLE = DATA / "gurux-template-example-LN-v3-Low.xml"

#: A small template in the format Gurux.DLMS.Simulator.Net writes; the secret is "S3cr3t!!".
SMALL = """\ufeff<?xml version="1.0" encoding="utf-8"?>
<Objects>
  <GXDLMSData>
    <LN>0.0.96.1.0.255</LN>
    <Access>11</Access>
    <Value Type="10">SIM-0001</Value>
  </GXDLMSData>
  <GXDLMSData>
    <LN>0.0.42.0.0.255</LN>
    <Value Type="9">47 52 58 33</Value>
  </GXDLMSData>
  <GXDLMSRegister>
    <LN>1.0.32.7.0.255</LN>
    <Access3>800180018001</Access3>
    <Unit>35</Unit>
    <Scaler>0.1</Scaler>
    <Value Type="18">2301</Value>
  </GXDLMSRegister>
  <GXDLMSRegister>
    <LN>1.0.1.8.0.255</LN>
    <Unit>30</Unit>
    <Scaler>1000</Scaler>
    <Value Type="6">123456</Value>
  </GXDLMSRegister>
  <GXDLMSClock>
    <LN>0.0.1.0.0.255</LN>
    <Time>01/05/2024 10:00:00</Time>
    <TimeZone>-60</TimeZone>
    <Status>0</Status>
    <Begin>03/*/* 02:00:00</Begin>
    <End/>
    <Deviation>60</Deviation>
    <Enabled>1</Enabled>
    <ClockBase>1</ClockBase>
  </GXDLMSClock>
  <GXDLMSProfileGeneric>
    <LN>1.0.99.1.0.255</LN>
    <Version>1</Version>
    <Buffer>
      <Row>
        <Cell Type="9" UIType="25">01/05/2024 10:00:00</Cell>
        <Cell Type="6">100</Cell>
      </Row>
      <Row>
        <Cell Type="9" UIType="25">01/05/2024 10:15:00</Cell>
        <Cell Type="6">105</Cell>
      </Row>
      <Row>
        <Cell Type="9" UIType="25">01/05/2024 10:30:00</Cell>
        <Cell Type="6">111</Cell>
      </Row>
    </Buffer>
    <CaptureObjects>
      <Item><ObjectType>8</ObjectType><LN>0.0.1.0.0.255</LN><Attribute>2</Attribute><Data>0</Data></Item>
      <Item><ObjectType>3</ObjectType><LN>1.0.1.8.0.255</LN><Attribute>2</Attribute><Data>0</Data></Item>
    </CaptureObjects>
    <CapturePeriod>900</CapturePeriod>
    <SortMethod>1</SortMethod>
    <EntriesInUse>3</EntriesInUse>
    <ProfileEntries>100</ProfileEntries>
  </GXDLMSProfileGeneric>
  <GXDLMSCredit>
    <LN>0.0.19.10.0.255</LN>
  </GXDLMSCredit>
  <GXDLMSAssociationLogicalName>
    <LN>0.0.40.0.0.255</LN>
    <Version>2</Version>
    <ClientSAP>16</ClientSAP>
    <ServerSAP>1</ServerSAP>
    <AuthenticationMechanismName>
      <MechanismId>0</MechanismId>
    </AuthenticationMechanismName>
  </GXDLMSAssociationLogicalName>
  <GXDLMSAssociationLogicalName>
    <LN>0.0.40.0.2.255</LN>
    <Version>2</Version>
    <ClientSAP>32</ClientSAP>
    <ServerSAP>1</ServerSAP>
    <AuthenticationMechanismName>
      <JointIsoCtt>2</JointIsoCtt>
      <Country>16</Country>
      <CountryName>756</CountryName>
      <IdentifiedOrganization>5</IdentifiedOrganization>
      <DlmsUA>8</DlmsUA>
      <AuthenticationMechanismName>2</AuthenticationMechanismName>
      <MechanismId>1</MechanismId>
    </AuthenticationMechanismName>
    <Secret>53 33 63 72 33 74 21 21</Secret>
    <AssociationStatus>0</AssociationStatus>
  </GXDLMSAssociationLogicalName>
  <GXDLMSAssociationLogicalName>
    <LN>0.0.40.0.3.255</LN>
    <ClientSAP>1</ClientSAP>
    <AuthenticationMechanismName>
      <MechanismId>5</MechanismId>
    </AuthenticationMechanismName>
    <Secret>30 31 32 33</Secret>
  </GXDLMSAssociationLogicalName>
</Objects>
"""
SMALL_SECRET = b"S3cr3t!!"


def _dt(year: int, mon: int, day: int, h: int, m: int, s: int) -> bytes:
    import datetime

    dow = datetime.date(year, mon, day).isoweekday()
    return struct.pack(">HBBBBBBBhB", year, mon, day, dow, h, m, s, 0, -0x8000, 0)


# --------------------------------------------------------------------- parsing
def test_example_from_gurux_is_read() -> None:
    # Given the template from Gurux's public repository (UTF-8 BOM, Access3 rights)
    t = load_template(EXAMPLE)
    # Then both Data objects and the Low association are there with their values
    ldn = t.find("0.0.42.0.0.255", 1)
    assert ldn is not None and ldn.attributes[2] == (tpl.OCTET_STRING, b"GRX3")
    ic = t.find("0.0.43.1.1.255", 1)
    assert ic is not None and ic.attributes[2] == (tpl.UINT32, 149)
    assert ic.access == {1: 3, 2: 3}
    (assoc,) = t.associations
    assert (assoc.client_sap, assoc.server_sap, assoc.mechanism_id) == (18, 1, 1)
    assert assoc.secret is not None and assoc.secret.reveal() == b"Gurux"
    assert assoc.object_list == [(1, "0.0.42.0.0.255")]
    assert "Gurux" not in repr(assoc) and "4775727578" not in repr(assoc).lower()
    # the association object itself is served with its stored attributes
    ao = t.find("0.0.40.0.1.255", 15)
    assert ao is not None and ao.version == 3
    assert ao.attributes[3] == (tpl.STRUCTURE, [(tpl.INT8, 18), (tpl.UINT16, 1)])
    assert ao.attributes[6] == (tpl.OCTET_STRING, bytes.fromhex("60857405080201"))
    assert 7 not in ao.attributes  # the secret is never readable
    # and the one thing not enforced is said
    assert t.warnings == [
        "0.0.40.0.1.255 class 15: client 18 object list and access rights not enforced"
        " (every client reads every object)"
    ]


def test_small_template_values_and_warnings() -> None:
    t = parse_template(SMALL, "small.xml")
    assert t.find("0.0.96.1.0.255").attributes[2] == (tpl.STRING, "SIM-0001")
    volt = t.find("1.0.32.7.0.255", 3)
    assert volt.attributes == {
        2: (tpl.UINT16, 2301),
        3: (tpl.STRUCTURE, [(tpl.INT8, -1), (tpl.ENUM, 35)]),
    }
    assert volt.access == {1: 1, 2: 1, 3: 1}
    energy = t.find("1.0.1.8.0.255", 3)
    assert energy.attributes[3] == (tpl.STRUCTURE, [(tpl.INT8, 3), (tpl.ENUM, 30)])
    clock = t.find("0.0.1.0.0.255", 8)
    assert clock.attributes[3] == (tpl.INT16, -60)
    assert clock.attributes[5] == (
        tpl.OCTET_STRING,
        struct.pack(">HBBBBBBBhB", 0xFFFF, 3, 0xFF, 0xFF, 2, 0, 0, 0, -0x8000, 0),
    )
    assert clock.attributes[8] == (tpl.BOOLEAN, True)
    assert 2 not in clock.attributes  # the clock runs: time is served live
    pg = t.find("1.0.99.1.0.255", 7)
    assert [(c.class_id, c.ln, c.attribute) for c in pg.capture_objects] == [
        (8, "0.0.1.0.0.255", 2),
        (3, "1.0.1.8.0.255", 2),
    ]
    assert pg.buffer[1] == [(tpl.OCTET_STRING, _dt(2024, 1, 5, 10, 15, 0)), (tpl.UINT32, 105)]
    assert pg.attributes[4] == (tpl.UINT32, 900)
    assert pg.attributes[7] == (tpl.UINT32, 3)
    assert pg.attributes[8] == (tpl.UINT32, 100)
    assert [(a.client_sap, a.mechanism_id) for a in t.associations] == [(16, 0), (32, 1), (1, 5)]
    assert t.associations[1].secret.reveal() == SMALL_SECRET
    # HighGMAC without a security setup object: served with Gurux's demonstration keys, said
    assert t.associations[2].block_key.reveal() == tpl.DEMO_BLOCK_KEY
    assert t.warnings == [
        "0.0.19.10.0.255 class 112 (Credit): not served",
        "0.0.40.0.3.255 class 15: client 1 has no keys in a security setup object:"
        " Gurux's demonstration keys are used",
    ]


def test_template_saved_by_gurux_is_read(tmp_path: Path) -> None:
    # Given a template written by Gurux's own GXDLMSObjectCollection.save()
    from gurux_dlms import GXDateTime
    from gurux_dlms.enums import Authentication, DataType, Unit
    from gurux_dlms.objects import (
        GXDLMSAssociationLogicalName,
        GXDLMSCaptureObject,
        GXDLMSClock,
        GXDLMSData,
        GXDLMSObjectCollection,
        GXDLMSProfileGeneric,
        GXDLMSRegister,
    )

    objs = GXDLMSObjectCollection()
    d = GXDLMSData("0.0.96.1.0.255")
    d.value = "SIM-0001"
    d.setDataType(2, DataType.STRING)
    r = GXDLMSRegister("1.0.1.8.0.255")
    r.value = 123456
    r.setDataType(2, DataType.UINT32)
    r.scaler = 0.01
    r.unit = Unit.ACTIVE_ENERGY
    clk = GXDLMSClock()
    clk.timeZone = 60
    a = GXDLMSAssociationLogicalName()
    a.clientSAP = 32
    a.authenticationMechanismName.mechanismId = Authentication.LOW
    a.secret = b"ABCDEFGH"
    pg = GXDLMSProfileGeneric("1.0.99.1.0.255")
    pg.captureObjects.append((clk, GXDLMSCaptureObject(2, 0)))
    pg.captureObjects.append((r, GXDLMSCaptureObject(2, 0)))
    pg.capturePeriod = 900
    pg.buffer = [[GXDateTime("01/05/2024 10:00:00"), 100], [GXDateTime("01/05/2024 10:15:00"), 105]]
    for o in (d, r, clk, a, pg):
        objs.append(o)
    path = tmp_path / "gurux-saved.xml"
    objs.save(str(path))
    # When read
    t = load_template(path)
    # Then Gurux's values come back
    assert t.find("0.0.96.1.0.255").attributes[2] == (tpl.STRING, "SIM-0001")
    assert t.find("1.0.1.8.0.255").attributes == {
        2: (tpl.UINT32, 123456),
        3: (tpl.STRUCTURE, [(tpl.INT8, -2), (tpl.ENUM, 30)]),
    }
    assert t.find("0.0.1.0.0.255").attributes[3] == (tpl.INT16, 60)
    buf = t.find("1.0.99.1.0.255").buffer
    assert buf == [
        [(tpl.DATETIME, _dt(2024, 1, 5, 10, 0, 0)), (tpl.INT32, 100)],
        [(tpl.DATETIME, _dt(2024, 1, 5, 10, 15, 0)), (tpl.INT32, 105)],
    ]
    (assoc,) = t.associations
    assert (assoc.client_sap, assoc.mechanism_id, assoc.secret.reveal()) == (32, 1, b"ABCDEFGH")
    assert t.warnings == []


# ---------------------------------------------------------------------- errors
def _error(text: str) -> str:
    with pytest.raises(TemplateError) as info:
        parse_template(text, "meter.xml")
    return str(info.value)


def test_malformed_xml_names_file_and_line() -> None:
    bad = SMALL.replace("</GXDLMSRegister>", "</GXDLMSRegistr>", 1)
    line = SMALL[: SMALL.index("</GXDLMSRegister>")].count("\n") + 1
    msg = _error(bad)
    assert msg.startswith(f"template meter.xml, line {line}, column ")
    assert "mismatched tag" in msg


def test_bad_value_names_the_line() -> None:
    bad = SMALL.replace('<Value Type="18">2301</Value>', '<Value Type="18">230,1 V</Value>')
    line = SMALL[: SMALL.index('<Value Type="18">')].count("\n") + 1
    assert _error(bad) == f"template meter.xml, line {line}: <Value> '230,1 V' is not a number"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (
            '<Value Type="18">2301</Value>',
            '<Value Type="18">70000</Value>',
            "out of range 0..65535",
        ),
        ("<Scaler>0.1</Scaler>", "<Scaler>0.3</Scaler>", "is not a power of ten"),
        ("<LN>1.0.32.7.0.255</LN>", "<LN>1.0.32.7.0</LN>", "is not six numbers 0..255"),
        ('<Value Type="9">47 52 58 33</Value>', '<Value Type="9">GRX3</Value>', "not hex bytes"),
        ("<Begin>03/*/* 02:00:00</Begin>", "<Begin>13/01/2024 02:00:00</Begin>", "out of range"),
    ],
)
def test_value_errors_are_explained(old: str, new: str, expected: str) -> None:
    bad = SMALL.replace(old, new, 1)
    assert bad != SMALL
    msg = _error(bad)
    assert msg.startswith("template meter.xml, line ")
    assert expected in msg


def test_wrong_root_element() -> None:
    msg = _error('<?xml version="1.0"?>\n<Meter>\n</Meter>\n')
    assert msg == "template meter.xml, line 2: the root element is <Meter>, expected <Objects>"


def test_bad_secret_error_does_not_show_it() -> None:
    bad = SMALL.replace("53 33 63 72 33 74 21 21", "S3cr3t!!")
    msg = _error(bad)
    assert "Secret" in msg and "not shown" in msg
    assert "S3cr3t" not in msg


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(TemplateError) as info:
        load_template(tmp_path / "nope.xml")
    assert str(info.value).startswith(f"template {tmp_path / 'nope.xml'}: cannot read the file")


def test_template_without_servable_association_is_refused() -> None:
    # HighECDSA (7) is the one mechanism the simulator does not serve
    only_ecdsa = SMALL.replace("<MechanismId>0</MechanismId>", "<MechanismId>7</MechanismId>")
    only_ecdsa = only_ecdsa.replace("<MechanismId>1</MechanismId>", "<MechanismId>7</MechanismId>")
    only_ecdsa = only_ecdsa.replace("<MechanismId>5</MechanismId>", "<MechanismId>7</MechanismId>")
    t = parse_template(only_ecdsa, "meter.xml")
    assert t.associations == []
    with pytest.raises(TemplateError) as info:
        tpl.build_device(t)
    assert "no association that the simulator can serve" in str(info.value)


# --------------------------------------------------------- the object model
def _read(
    device, class_id: int, ln: str, attr: int, client: int = 32, selector: int = 0, params=None
) -> bytes:
    from dlms2amqp.simulator import cosem

    ctx = cosem.ReadContext(cosem.MeterState(0), 1_700_000_000, 0, client, selector, params)
    return device.read(ctx, class_id, cosem.ln_bytes(ln), attr)


def test_build_device_serves_stored_values() -> None:
    from dlms2amqp.simulator import axdr_enc as ax
    from dlms2amqp.simulator import cosem

    t = parse_template(SMALL, "small.xml")
    device = tpl.build_device(t)
    assert sorted(device.associations) == [1, 16, 32]
    assert device.associations[1].mechanism == cosem.MECH_HLS_GMAC
    assert device.associations[32].secret == SMALL_SECRET
    assert device.associations[32].mechanism == cosem.MECH_LOW
    assert _read(device, 1, "0.0.96.1.0.255", 2) == b"\x0a\x08SIM-0001"
    assert _read(device, 3, "1.0.32.7.0.255", 2) == b"\x12\x08\xfd"
    assert _read(device, 3, "1.0.32.7.0.255", 3) == bytes.fromhex("02020fff1623")
    # the clock runs
    assert _read(device, 8, "0.0.1.0.0.255", 2) == ax.datetime_data(1_700_000_000, 0)
    # profile: all rows, by entry, by range
    rows = [
        b"\x02\x02\x09\x0c" + _dt(2024, 1, 5, 10, m, 0) + b"\x06" + v.to_bytes(4, "big")
        for m, v in ((0, 100), (15, 105), (30, 111))
    ]
    assert _read(device, 7, "1.0.99.1.0.255", 2) == b"\x01\x03" + b"".join(rows)
    assert _read(device, 7, "1.0.99.1.0.255", 2, selector=2, params=[2, 3, 0, 0]) == (
        b"\x01\x02" + rows[1] + rows[2]
    )
    rng = [None, _dt(2024, 1, 5, 10, 10, 0), _dt(2024, 1, 5, 10, 20, 0), []]
    assert _read(device, 7, "1.0.99.1.0.255", 2, selector=1, params=rng) == b"\x01\x01" + rows[1]
    # -P overrides the Low secret
    assert tpl.build_device(t, password=b"other").associations[32].secret == b"other"
    # the unserved object is absent
    with pytest.raises(cosem.DataAccessError):
        _read(device, 112, "0.0.19.10.0.255", 2)


# ------------------------------------------------- served over TCP, read by Gurux
class _GuruxReader:
    """Gurux's client over a plain TCP socket (WRAPPER), as the gateway uses it."""

    def __init__(self, port: int, client: int, password: bytes | None):
        import socket

        from gurux_dlms import GXDLMSClient
        from gurux_dlms.enums import Authentication, InterfaceType

        auth = Authentication.LOW if password is not None else Authentication.NONE
        self.client = GXDLMSClient(True, client, 1, auth, password, InterfaceType.WRAPPER)
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)

    def exchange(self, frame: bytes):
        from gurux_dlms import GXByteBuffer, GXReplyData

        reply = GXReplyData()
        self.sock.sendall(bytes(frame))
        buf = GXByteBuffer()
        while not self.client.getData(buf, reply):
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("simulator closed the connection")
            buf.set(chunk)
        return reply

    def run(self, frames) -> object:
        from gurux_dlms import GXReplyData
        from gurux_dlms.enums import RequestTypes

        if frames is None:
            frames = []
        elif isinstance(frames, (bytes, bytearray)):
            frames = [frames]
        reply = None
        for frame in frames:
            reply = self.exchange(frame)
            data = reply
            while data.isMoreData():
                nxt = self.client.receiverReady(RequestTypes.DATABLOCK)
                more = self.exchange(nxt)
                data.data.set(more.data)
                data.moreData = more.moreData
        return reply if reply is not None else GXReplyData()

    def associate(self) -> None:
        reply = self.run(self.client.aarqRequest())
        self.client.parseAareResponse(reply.data)

    def read(self, obj, attr: int):
        reply = self.run(self.client.read(obj, attr))
        assert reply.error == 0, f"data access error {reply.error}"
        return self.client.updateValue(obj, attr, reply.value)

    def close(self) -> None:
        try:
            self.run(self.client.releaseRequest())
        finally:
            self.sock.close()


def test_template_served_by_the_simulator_and_read_by_gurux(tmp_path: Path) -> None:
    from gurux_dlms.objects import GXDLMSClock, GXDLMSData, GXDLMSProfileGeneric, GXDLMSRegister

    from tests.helpers_sim import running_simulator

    # Given the small template on disk, served by the real dlms2amqp-sim
    path = tmp_path / "small.xml"
    path.write_text(SMALL, encoding="utf-8")
    with running_simulator(1, "-x", str(path)) as sim:
        # Then the warnings are printed at start (stderr is read by a thread of the harness:
        # on a loaded machine the ready line on stdout can come first)
        want = "0.0.19.10.0.255 class 112 (Credit): not served"
        deadline = time.monotonic() + 20
        while want not in "".join(sim.stderr_lines) and time.monotonic() < deadline:
            time.sleep(0.05)
        err = "".join(sim.stderr_lines)
        assert want in err
        assert "S3cr3t" not in err
        # When Gurux's client associates as client 32 with the template's secret
        reader = _GuruxReader(sim.port, 32, SMALL_SECRET)
        try:
            reader.associate()
            # Then it discovers the objects and reads the stored values back
            objects = reader.client.parseObjects(
                reader.run(reader.client.getObjectsRequest()).data, True
            )
            lns = {(int(o.objectType), o.logicalName) for o in objects}
            assert {(1, "0.0.96.1.0.255"), (3, "1.0.32.7.0.255"), (8, "0.0.1.0.0.255")} <= lns
            assert reader.read(GXDLMSData("0.0.96.1.0.255"), 2) == "SIM-0001"
            volt = GXDLMSRegister("1.0.32.7.0.255")
            reader.read(volt, 3)
            assert (volt.scaler, int(volt.unit)) == (0.1, 35)
            assert reader.read(volt, 2) == pytest.approx(230.1)
            energy = GXDLMSRegister("1.0.1.8.0.255")
            reader.read(energy, 3)
            assert reader.read(energy, 2) == 123456000
            clock = GXDLMSClock("0.0.1.0.0.255")
            assert reader.read(clock, 3) == -60
            pg = GXDLMSProfileGeneric("1.0.99.1.0.255")
            reader.read(pg, 3)
            assert [o.logicalName for o, _ in pg.captureObjects] == [
                "0.0.1.0.0.255",
                "1.0.1.8.0.255",
            ]
            assert reader.read(pg, 4) == 900
            reply = reader.run(reader.client.readRowsByEntry(pg, 2, 2))
            assert reply.error == 0
            rows = reader.client.updateValue(pg, 2, reply.value)
            # raw register values (Gurux does not scale profile cells)
            assert [r[1] for r in rows] == [105, 111]
            assert [(r[0].value.hour, r[0].value.minute) for r in rows] == [(10, 15), (10, 30)]
        finally:
            reader.close()
        # and a wrong password is refused
        bad = _GuruxReader(sim.port, 32, b"wrong!!!")
        try:
            from gurux_dlms import GXDLMSException

            with pytest.raises(GXDLMSException):
                bad.associate()
        finally:
            bad.sock.close()


def test_simulator_refuses_a_broken_template_naming_the_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    # Given a template with a typo in a closing tag
    path = tmp_path / "broken.xml"
    path.write_text(SMALL.replace("</GXDLMSClock>", "</GXDLMSClok>"), encoding="utf-8")
    line = SMALL[: SMALL.index("</GXDLMSClock>")].count("\n") + 1
    # When the simulator is started with it
    proc = subprocess.run(
        [sys.executable, "-m", "dlms2amqp.cli.sim", "-p", "1", "-x", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Then it exits 1 and says which file and line
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert f"template {path}, line {line}, column " in proc.stderr
    assert "mismatched tag" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("text", "fields"),
    [
        # Gurux .NET / Python writers: MM/dd/yyyy HH:mm:ss, local time, no offset
        ("01/05/2024 10:00:00", (2024, 1, 5, 5, 10, 0, 0, 0, -0x8000, 0)),
        ("12/31/2023 23:59:59", (2023, 12, 31, 7, 23, 59, 59, 0, -0x8000, 0)),
        # wildcards: not specified
        ("*/*/* 02:00:00", (0xFFFF, 0xFF, 0xFF, 0xFF, 2, 0, 0, 0, -0x8000, 0)),
        ("03/*/* *:30:00", (0xFFFF, 3, 0xFF, 0xFF, 0xFF, 30, 0, 0, -0x8000, 0)),
        # DST markers and explicit offsets
        ("BEGIN/*/* 03:00:00", (0xFFFF, 0xFE, 0xFF, 0xFF, 3, 0, 0, 0, -0x8000, 0)),
        ("01/05/2024 10:00:00 +02:00", (2024, 1, 5, 5, 10, 0, 0, 0, -120, 0)),
        ("2024-01-05T10:00:00Z", (2024, 1, 5, 5, 10, 0, 0, 0, 0, 0)),
        ("2024-01-05 10:00:00-0130", (2024, 1, 5, 5, 10, 0, 0, 0, 90, 0)),
    ],
)
def test_datetime_formats(text: str, fields: tuple) -> None:
    t = parse_template(
        f'<Objects><GXDLMSData><LN>0.0.1.2.3.255</LN><Value Type="25">{text}</Value>'
        "</GXDLMSData></Objects>"
    )
    assert t.find("0.0.1.2.3.255").attributes[2] == (
        tpl.DATETIME,
        struct.pack(">HBBBBBBBhB", *fields),
    )


@pytest.mark.parametrize("text", ["02/30/2024 10:00:00", "13/01/2024 10:00:00", "yesterday"])
def test_bad_datetimes_name_the_line(text: str) -> None:
    msg = _error(
        f'<Objects>\n<GXDLMSData><LN>0.0.1.2.3.255</LN>\n<Value Type="25">{text}</Value>'
        "</GXDLMSData></Objects>"
    )
    assert msg.startswith("template meter.xml, line 3: ")
    assert repr(text) in msg


def test_object_without_value_is_listed() -> None:
    t = parse_template(
        "<Objects><GXDLMSRegister><LN>1.0.1.8.0.255</LN><Unit>30</Unit></GXDLMSRegister></Objects>"
    )
    assert t.warnings == ["1.0.1.8.0.255 class 3 attribute 2: no <Value>, not served"]
    assert t.find("1.0.1.8.0.255").attributes == {
        3: (tpl.STRUCTURE, [(tpl.INT8, 0), (tpl.ENUM, 30)])
    }


# ------------------------------------------------------ ciphered associations
def _ciphered_template(policy: int, version: int = 0, suite: int = 0, key: str = "") -> str:
    key = key or "000102030405060708090A0B0C0D0E0F"
    return f"""<Objects>
<GXDLMSAssociationLogicalName>
  <LN>0.0.40.0.2.255</LN><ClientSAP>1</ClientSAP>
  <ApplicationContextName><ContextId>3</ContextId></ApplicationContextName>
  <AuthenticationMechanismName><MechanismId>6</MechanismId></AuthenticationMechanismName>
  <Secret>47 75 72 75 78</Secret>
  <SecuritySetupReference>0.0.43.0.0.255</SecuritySetupReference>
  <ObjectList>
    <GXDLMSSecuritySetup><LN>0.0.43.0.0.255</LN><Access>13333</Access></GXDLMSSecuritySetup>
  </ObjectList>
</GXDLMSAssociationLogicalName>
<GXDLMSSecuritySetup>
  <LN>0.0.43.0.0.255</LN><Version>{version}</Version>
  <SecurityPolicy>{policy}</SecurityPolicy><SecuritySuite>{suite}</SecuritySuite>
  <ServerSystemTitle>47 52 58 00 00 00 00 01</ServerSystemTitle>
  <Guek>{key}</Guek>
  <Gak>D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF</Gak>
</GXDLMSSecuritySetup>
</Objects>"""


@pytest.mark.parametrize(
    "policy, version, security",
    [
        (1, 0, 0x10),  # version 0 enum: all messages authenticated
        (2, 0, 0x20),  # encrypted
        (3, 0, 0x30),  # both
        (0x24, 1, 0x10),  # version 1 bits: authenticated request and response
        (0x6C, 1, 0x30),  # authenticated and encrypted, both ways (Gurux's 108)
        (0, 0, 0x30),  # context 3 without a policy: authenticated encryption
    ],
)
def test_security_setup_gives_policy_keys_and_title(policy, version, security) -> None:
    # Given the full security setup after the association, and a stub in its object list
    t = parse_template(_ciphered_template(policy, version), "c.xml")
    (a,) = t.associations
    # Then the full copy wins: keys, server system title and the policy's security bits
    assert (a.context_id, a.mechanism_id, a.security) == (3, 6, security)
    assert a.block_key.reveal() == bytes(range(16))
    assert a.server_system_title == bytes.fromhex("4752580000000001")
    assert t.warnings == [
        "0.0.40.0.2.255 class 15: client 1 object list and access rights not enforced"
        " (every client reads every object)",
        "0.0.43.0.0.255 class 64 (SecuritySetup): not served",
    ]
    device = tpl.build_device(t)
    d = device.associations[1]
    assert (d.security, d.context_id, d.secret, d.system_title) == (
        security,
        3,
        b"Gurux",
        bytes.fromhex("4752580000000001"),
    )
    assert "000102" not in repr(d) and "Gurux" not in repr(d)


def test_security_setup_bad_key_names_line_not_value() -> None:
    msg = _error(_ciphered_template(3, key="0011223344"))
    assert msg.startswith("template meter.xml, line ")
    assert "<Guek> must be 16 or 32 bytes, not 5" in msg
    assert "0011223344" not in msg


def test_security_suite_out_of_range_refused() -> None:
    msg = _error(_ciphered_template(3, suite=3))
    assert "security suite 3 is not 0, 1 or 2" in msg
