# SPDX-License-Identifier: GPL-2.0-or-later
"""GET-with-list, bytes after a value and the class fallback, with a meter's bytes.

The meter side is bytes replayed to the real session and the real Gurux client (our
simulator does not offer GET-with-list yet); the requests are checked against what
Gurux's own ``GXDLMSClient.readList`` sends and the values against Gurux's decoding.
"""

from __future__ import annotations

import time

import pytest
from gurux_dlms import GXByteBuffer, GXDLMSClient, GXReplyData
from gurux_dlms.enums import Conformance, InterfaceType
from gurux_dlms.objects import GXDLMSObject

from dlms2amqp.errors import MeterProtocolError, ObjectError
from dlms2amqp.meter import axdr, reader
from dlms2amqp.meter.client import gurux_to_native
from dlms2amqp.meter.connstring import parse_connection_string
from dlms2amqp.meter.media import Media
from dlms2amqp.meter.session import DataAccessError, MeterSession

LIST_CONFORMANCE = (
    Conformance.GET | Conformance.BLOCK_TRANSFER_WITH_GET_OR_READ | Conformance.MULTIPLE_REFERENCES
)


def wrapper(apdu: bytes, src: int = 1, dst: int = 16) -> bytes:
    """One WRAPPER frame from the meter (source = server address) to the client."""
    head = b"\x00\x01" + src.to_bytes(2, "big") + dst.to_bytes(2, "big")
    return head + len(apdu).to_bytes(2, "big") + apdu


def get_list_response(*results: bytes, invoke: int = 0xC1) -> bytes:
    return bytes([0xC4, 0x03, invoke, len(results)]) + b"".join(results)


def get_block(last: int, number: int, raw: bytes, invoke: int = 0xC1) -> bytes:
    head = bytes([0xC4, 0x02, invoke, last]) + number.to_bytes(4, "big")
    return head + b"\x00" + axdr_length(len(raw)) + raw


def axdr_length(n: int) -> bytes:
    return bytes([n]) if n < 0x80 else b"\x82" + n.to_bytes(2, "big")


def ok(value: bytes) -> bytes:
    return b"\x00" + value


def refused(code: int) -> bytes:
    return bytes([1, code])


class Replayed(Media):
    """The meter's answers, one per request, in order; what the client sent is kept."""

    def __init__(self, answers: list):
        self.answers = list(answers)
        self.sent: list = []

    def send(self, data: bytes) -> None:
        self.sent.append(bytes(data))

    def recv(self, timeout: float, step: str) -> bytes:
        if not self.answers:
            raise AssertionError(f"the client asked more than the meter was given ({step})")
        return self.answers.pop(0)

    def close(self) -> None:
        pass


class Notes:
    """A trace sink that keeps the notes (frames are not of interest here)."""

    def __init__(self):
        self.lines: list = []

    def __call__(self, direction: str, data: bytes) -> None:
        pass

    def note(self, text: str) -> None:
        self.lines.append(text)


def session(answers: list, pdu: int = 1024, conformance=LIST_CONFORMANCE, conn: str = "-c 16"):
    """An associated session as the AARE would have left it (conformance, PDU size)."""
    s = MeterSession(parse_connection_string(f"-h 127.0.0.1 -p 1 -i WRAPPER {conn}"), 5)
    s.client = s._make_client()
    s.client.settings.negotiatedConformance = conformance
    s.client.settings.maxPduSize = pdu
    s.link.media = Replayed(answers)
    s.associated = True
    s.resume(time.monotonic() + 30, Notes())
    return s


def gurux_list_requests(items: list, pdu: int = 1024) -> list:
    """What Gurux's own client sends for the same list (the oracle for request bytes)."""
    c = GXDLMSClient(True, 16, 1, interfaceType=InterfaceType.WRAPPER)
    c.settings.negotiatedConformance = LIST_CONFORMANCE
    c.settings.maxPduSize = pdu
    objs = [(GXDLMSObject(cls, obis), attr) for cls, obis, attr in items]
    return [bytes(frame) for message in c.readList(objs) for frame in message]


def gurux_values(frame: bytes, request_items: list) -> list:
    """Gurux's stock parsing of a GET-with-list answer (values of the items that are ok)."""
    c = GXDLMSClient(True, 16, 1, interfaceType=InterfaceType.WRAPPER)
    c.settings.negotiatedConformance = LIST_CONFORMANCE
    c.readList([(GXDLMSObject(cls, obis), attr) for cls, obis, attr in request_items])
    reply = GXReplyData()
    assert c.getData(GXByteBuffer(frame), reply, None)
    return [gurux_to_native(v) for v in reply.value]


ENERGY = b"\x06\x00\x01\xe2\x40"  # double-long-unsigned 123456
SERIAL = b"\x0a\x0812345678"
ITEMS = [(3, "1.0.1.8.0.255", 2), (1, "0.0.96.1.0.255", 2), (1, "0.0.96.1.1.255", 2)]


# --- the pure splitter ------------------------------------------------------------------
@pytest.mark.parametrize(
    "hexdata, expected, extra",
    [
        ("02 00 11 05 00 12 01 00", [b"\x11\x05", b"\x12\x01\x00"], 0),
        ("03 00 11 05 01 03 01 04", [b"\x11\x05", 3, 4], 0),
        ("01 00 00", [b"\x00"], 0),  # null-data is a value, not an error
        ("01 00 02 02 11 01 09 02 aa bb", [bytes.fromhex("0202110109 02aabb")], 0),
        ("01 01 0b 00 00", [11], 2),  # bytes after the last result
        ("00", [], 0),
    ],
)
def test_split_results(hexdata, expected, extra):
    assert axdr.split_results(bytes.fromhex(hexdata)) == (expected, extra)


@pytest.mark.parametrize("hexdata", ["02 00 11 05", "01 00 12 01", "01 01", "01 05 03", ""])
def test_split_results_refuses_cut_or_unknown_results(hexdata):
    with pytest.raises(MeterProtocolError):
        axdr.split_results(bytes.fromhex(hexdata))


def test_decode_value_counts_bytes_after_a_complete_value_and_refuses_a_cut_one():
    assert axdr.decode_value(bytes.fromhex("1105 00 00 00")) == (5, 3)
    assert axdr.decode_value(bytes.fromhex("0102 1101 1102")) == ([1, 2], 0)
    with pytest.raises(MeterProtocolError, match="middle of a value"):
        axdr.decode_value(bytes.fromhex("0103 1101 1102"))
    rows, extra = axdr.decode_profile(bytes.fromhex("0101 0201 1107 ff"))
    assert (rows, extra) == ([[7]], 1)


# --- the session over Gurux's client ------------------------------------------------------
def test_get_list_request_as_gurux_sends_it_and_values_per_item():
    # Given a meter that answers the second item with read-write-denied
    answer = wrapper(get_list_response(ok(ENERGY), refused(3), ok(SERIAL)))
    s = session([answer])
    # When the session reads the list
    results = s.get_list(ITEMS)
    # Then the request is Gurux's, byte for byte, and each item has its own result
    assert s.media.sent == gurux_list_requests(ITEMS)
    assert results[0] == ENERGY and results[2] == SERIAL
    assert isinstance(results[1], DataAccessError) and results[1].code == 3
    assert "access denied to 0.0.96.1.0.255 attribute 2" in results[1].message
    # and the values equal Gurux's own decoding (Gurux puts None where an item was refused)
    stock = gurux_values(answer, ITEMS)
    assert [axdr.decode_all(results[0]), None, axdr.decode_all(results[2])] == stock
    assert s.alive


@pytest.mark.parametrize(
    "count, pdu, sizes",
    [(12, 1024, [10, 2]), (10, 1024, [10]), (23, 1024, [10, 10, 3]), (7, 64, [5, 2])],
)
def test_long_list_split_in_chunks_the_meter_can_take(count, pdu, sizes):
    items = [(3, f"1.0.{i}.8.0.255", 2) for i in range(count)]
    answers, first = [], 0
    for size in sizes:
        values = [ok(bytes([0x11, first + j])) for j in range(size)]
        answers.append(wrapper(get_list_response(*values)))
        first += size
    s = session(answers, pdu=pdu)
    results = s.get_list(items)
    assert [axdr.decode_all(r) for r in results] == list(range(count))
    # one request per chunk, each a GET-with-list (C0 03) of that many attributes
    assert [(f[8:10], f[11]) for f in s.media.sent] == [(b"\xc0\x03", n) for n in sizes]
    if pdu == 1024 and count <= 10:
        assert s.media.sent == gurux_list_requests(items, pdu)


def test_ciphered_list_chunk_leaves_room_for_the_ciphering_header():
    plain = session([], pdu=128)
    ciphered = session([], pdu=128, conn="-c 48 -a HighGMAC -C AuthenticationEncryption "
                       "-T 4775727578313233 -A D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF "
                       "-B 000102030405060708090A0B0C0D0E0F")  # fmt: skip
    assert plain.list_chunk() == 10
    assert ciphered.list_chunk() == 9
    assert 12 + 20 + 10 * ciphered.list_chunk() <= 128


def test_list_answer_in_blocks():
    body = bytes([3]) + ok(ENERGY) + refused(4) + ok(SERIAL)
    s = session([wrapper(get_block(0, 1, body[:5])), wrapper(get_block(1, 2, body[5:]))])
    results = s.get_list(ITEMS)
    assert results[0] == ENERGY and results[2] == SERIAL
    assert results[1].code == 4 and "unknown object 0.0.96.1.0.255" in results[1].message
    # the second request asks for block 1 (GET next-data-block, C0 02)
    assert s.media.sent[1][8:] == bytes([0xC0, 0x02, 0xC1]) + (1).to_bytes(4, "big")


def test_bytes_after_the_list_are_ignored_and_said():
    s = session([wrapper(get_list_response(ok(ENERGY), ok(SERIAL)) + b"\x00\x00")])
    assert s.get_list(ITEMS[:2]) == [ENERGY, SERIAL]
    assert s.link.trace.lines == ["2 trailing bytes after the list reply ignored"]


def test_list_answer_with_another_count_is_a_protocol_error():
    s = session([wrapper(get_list_response(ok(ENERGY)))])
    with pytest.raises(MeterProtocolError, match="list read of 3 attributes with 1 results"):
        s.get_list(ITEMS)


# --- the reader on top: records per item, class fallback, trailing bytes --------------------
def object_list(*objects: tuple) -> bytes:
    """Association LN attribute 2: array of {class, version, LN, access rights}."""
    out = b"\x01" + bytes([len(objects)])
    for class_id, obis in objects:
        ln = bytes(int(p) for p in obis.split("."))
        out += b"\x02\x04\x12" + class_id.to_bytes(2, "big") + b"\x11\x00\x09\x06" + ln
        out += b"\x02\x02\x01\x00\x01\x00"
    return out


def get_normal(value: bytes | None = None, error: int | None = None, invoke: int = 0xC1) -> bytes:
    if error is not None:
        return bytes([0xC4, 0x01, invoke, 1, error])
    return bytes([0xC4, 0x01, invoke, 0]) + value


def test_list_records_carry_the_error_of_their_item_only():
    s = session([wrapper(get_list_response(ok(ENERGY), refused(3), ok(SERIAL)))])
    # the object list says the denied object's class was right: it stays "access denied"
    s.media.answers.append(wrapper(get_normal(object_list((1, "0.0.96.1.0.255")))))
    items = [("1.0.1.8.0.255", 2), ("0.0.96.1.0.255", 2), ("0.0.96.1.1.255", 2)]
    records = reader._read_list(s, items, "iso")
    assert [r["Code"] for r in records] == [o for o, _ in items]
    assert records[0]["Value"] == "123456" and "Error" not in records[0]
    assert records[1]["Value"] == ""
    assert records[1]["Error"] == "access denied to 0.0.96.1.0.255 attribute 2 (read-write-denied)"
    assert records[2]["Value"] == "12345678" and "Error" not in records[2]


def test_list_item_with_a_wrong_class_is_read_again_with_the_object_list_class():
    # Given a meter that denies the demand register read as class 3 (it is class 5)
    s = session([
        wrapper(get_list_response(ok(ENERGY), refused(3))),
        wrapper(get_normal(object_list((5, "1.0.31.4.0.255"), (3, "1.0.1.8.0.255")))),
        wrapper(get_list_response(ok(b"\x12\x00\x2a"))),
    ])  # fmt: skip
    records = reader._read_list(s, [("1.0.1.8.0.255", 2), ("1.0.31.4.0.255", 2)], "iso")
    assert [r["Value"] for r in records] == ["123456", "42"]
    # the second list read asks class 5 for 1.0.31.4.0.255
    assert s.media.sent[2][8:] == bytes.fromhex("c003c101 0005 01001f0400ff 02 00")


def test_every_item_refused_is_notok_with_the_first_reason():
    s = session([wrapper(get_list_response(refused(4), refused(4)))])
    s.media.answers.append(wrapper(get_normal(object_list((1, "0.0.96.1.0.255")))))
    with pytest.raises(ObjectError, match="unknown object 1.2.3.4.5.6: not in the meter's"):
        reader._read_list(s, [("1.2.3.4.5.6", 2), ("1.2.3.4.5.7", 2)], "iso")


def test_without_multiple_references_items_are_read_one_by_one():
    s = session(
        [wrapper(get_normal(ENERGY)), wrapper(get_normal(error=3))],
        conformance=Conformance.GET | Conformance.BLOCK_TRANSFER_WITH_GET_OR_READ,
    )
    s.learn_class("0.0.96.1.0.255", 1)  # known class: no object list read
    records = reader._read_list(s, [("1.0.1.8.0.255", 2), ("0.0.96.1.0.255", 2)], "iso")
    assert [f[8:10] for f in s.media.sent] == [b"\xc0\x01", b"\xc0\x01"]
    assert records[0]["Value"] == "123456"
    assert records[1]["Error"] == "access denied to 0.0.96.1.0.255 attribute 2 (read-write-denied)"


@pytest.mark.parametrize("code", [3, 4])
def test_guessed_class_refused_falls_back_to_the_object_list(code):
    # Given the demand register, guessed class 3, refused; the object list says class 5
    s = session([
        wrapper(get_normal(error=code)),
        wrapper(get_normal(object_list((5, "1.0.31.4.0.255")))),
        wrapper(get_normal(b"\x12\x00\x2a")),
    ])  # fmt: skip
    class_id, raw = reader._get(s, "1.0.31.4.0.255", 2)
    assert (class_id, raw) == (5, b"\x12\x00\x2a")
    assert s.media.sent[2][8:13] == bytes.fromhex("c001c1 0005")  # class 5
    assert "1.0.31.4.0.255 is class 5 in the meter's object list" in s.link.trace.lines


def test_right_class_still_denied_is_access_denied():
    s = session([
        wrapper(get_normal(error=3)),
        wrapper(get_normal(object_list((3, "1.0.1.8.0.255")))),
    ])  # fmt: skip
    with pytest.raises(DataAccessError, match=r"access denied to 1.0.1.8.0.255 attribute 2"):
        reader._get(s, "1.0.1.8.0.255", 2)
    assert len(s.media.sent) == 2  # no second GET with the same class


def test_clock_with_bytes_after_the_value_reads_and_says_so():
    clock = b"\x09\x0c\x07\xea\x01\x0f\x04\x0c\x00\x00\x00\xff\xc4\x00"
    s = session([wrapper(get_normal(clock + b"\x00\x00\x00"))])
    class_id, raw = reader._get(s, "0.0.1.0.0.255", 2)
    [rec] = reader._records_for(s, class_id, "0.0.1.0.0.255", raw, "iso")
    assert rec["Value"] == "2026-01-15T12:00:00+01:00"
    assert s.link.trace.lines == ["3 trailing bytes after the value of 0.0.1.0.0.255 ignored"]


def test_value_cut_short_is_still_refused():
    s = session([wrapper(get_normal(b"\x09\x0c\x07\xea\x01"))])
    class_id, raw = reader._get(s, "0.0.1.0.0.255", 2)
    with pytest.raises(MeterProtocolError, match="middle of a value"):
        reader._records_for(s, class_id, "0.0.1.0.0.255", raw, "iso")


# --- end to end against the simulator (which offers multiple references) ----------------
@pytest.fixture(scope="module", params=["WRAPPER", "HDLC"])
def sim(request):
    from tests.helpers_sim import running_simulator

    with running_simulator(2, interface=request.param) as info:
        info.interface = request.param
        yield info


def read_list(sim, items: str, conn: str = "-c 32 -a Low -P 00000000", k: int = 0):
    import orjson

    from dlms2amqp.request import parse_request

    lines: list = []
    where = f"-h {sim.host} -p {sim.port + k} -i {sim.interface}"
    body = {
        "MsgID": "l",
        "Cmd": "READ",
        "ObisCode": "0.0.0.0.0.0",
        "ConnectionString": f'{where} {conn} -g "{items}"',
    }
    options = reader.ReaderOptions(frame_timeout=10, request_timeout=30, trace=True,
                                   trace_sink=lines.append)  # fmt: skip
    return reader.execute(parse_request(orjson.dumps(body)), options), lines


def list_requests(lines: list) -> list:
    """Number of attributes in each GET-with-list request (C0 03) the reader sent."""
    out = []
    for line in lines:
        if line.startswith("TX ") and " C0 03 " in line:
            after = line.split(" C0 03 ", 1)[1].split()
            out.append(int(after[1], 16))  # invoke id, then the count
    return out


@pytest.mark.integration
def test_e2e_long_list_in_chunks_with_per_item_errors(sim):
    from dlms2amqp.simulator import model

    k = 1
    registers = ["1.0.1.8.0.255", "1.0.2.8.0.255", "1.0.32.7.0.255", "1.0.31.7.0.255"]
    items = [f"{o}:3" for o in registers] * 3 + ["1.2.3.4.5.6:2", "0.0.96.1.0.255:2"]
    reply, lines = read_list(sim, "; ".join(items), k=k)
    assert reply["Status"] == "ok", reply["Error"]
    recs = reply["DataRecords"]
    assert len(recs) == 14
    assert [r["Value"] for r in recs[:4]] == ["[0, 30]", "[0, 30]", "[-1, 35]", "[-2, 33]"]
    assert recs[12]["Value"] == "" and "unknown object 1.2.3.4.5.6" in recs[12]["Error"]
    assert recs[13]["Value"] == model.serial_number(k)
    assert sum("Error" in r for r in recs) == 1
    assert list_requests(lines) == [10, 4]


@pytest.mark.integration
def test_e2e_list_denied_item_for_the_public_client(sim):
    reply, lines = read_list(sim, "0.0.96.1.0.255:2; 1.0.1.8.0.255:2; 0.0.42.0.0.255:2",
                             conn="-c 16")  # fmt: skip
    assert reply["Status"] == "ok", reply["Error"]
    recs = reply["DataRecords"]
    assert recs[1]["Error"] == "access denied to 1.0.1.8.0.255 attribute 2 (read-write-denied)"
    assert "Error" not in recs[0] and "Error" not in recs[2]
    assert list_requests(lines) == [3]


@pytest.mark.integration
def test_e2e_list_values_equal_gurux_clients(sim):
    """The same list read by Gurux's own client (helpers_sim.GuruxMeter) gives the same values."""
    from tests.helpers_sim import GuruxMeter, gurux_client

    objs = [(3, "1.0.1.8.0.255", 3), (1, "0.0.96.1.0.255", 2), (1, "0.0.42.0.0.255", 2),
            (8, "0.0.1.0.0.255", 3)]  # fmt: skip
    reply, _ = read_list(sim, "; ".join(f"{o}:{a}" for _, o, a in objs))
    assert reply["Status"] == "ok", reply["Error"]
    m = GuruxMeter(gurux_client(32, sim.interface, password="00000000"), sim.host, sim.port)
    try:
        m.connect()
        frames = m.client.readList([(GXDLMSObject(c, o), a) for c, o, a in objs])
        values = []
        for message in frames:
            values += m.request(message).value
        m.release()
    finally:
        m.close()
    ours = [r["Value"] for r in reply["DataRecords"]]
    from dlms2amqp.reply import value_to_str

    assert ours == [value_to_str(gurux_to_native(v)) for v in values]
