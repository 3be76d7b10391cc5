# SPDX-License-Identifier: GPL-2.0-or-later
"""The simulator's AES-GCM (``cryptography``) against Gurux's pure-Python AES-GCM.

Gurux is the oracle: the gateway uses Gurux's client, so the simulator must
produce exactly the bytes Gurux produces and accept exactly what it sends.
"""

from __future__ import annotations

import pytest
from gurux_dlms.AesGcmParameter import AesGcmParameter
from gurux_dlms.enums.Security import Security
from gurux_dlms.GXByteBuffer import GXByteBuffer
from gurux_dlms.GXCiphering import GXCiphering
from gurux_dlms.GXDLMSChippering import GXDLMSChippering
from gurux_dlms.GXDLMSSettings import GXDLMSSettings
from hypothesis import given, settings
from hypothesis import strategies as st

from dlms2amqp.simulator import security as sec

BLOCK_KEY = bytes.fromhex("000102030405060708090A0B0C0D0E0F")
AUTH_KEY = bytes.fromhex("D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF")
CLIENT_ST = bytes.fromhex("4775727578313233")

# Green Book example: glo-get-request of the clock's time, system title
# 4D4D4D0000BC614E, invocation counter 0x01234567, the keys above.
GB_ST = bytes.fromhex("4D4D4D0000BC614E")
GB_IC = 0x01234567
GB_PLAIN = bytes.fromhex("C0010000080000010000FF0200")
GB_AE = bytes.fromhex("3001234567411312FF935A47566827C467BC7D825C3BE4A77C3FCC056B6B")
GB_A = bytes.fromhex("1001234567C0010000080000010000FF020006725D910F9221D263877516")


def _strip_tag_and_length(apdu: bytes) -> bytes:
    """Drop the glo tag and the A-XDR length in front of SC || IC || ...."""
    first = apdu[1]
    if first < 0x80:
        return apdu[2:]
    return apdu[2 + (first & 0x7F) :]


def gurux_encrypt(sc: int, st_: bytes, ic: int, bk: bytes, ak: bytes, plain: bytes) -> bytes:
    p = AesGcmParameter(sec.GLO_GET_REQUEST, bytearray(st_), bytearray(bk), bytearray(ak))
    p.security = Security(sc)
    p.invocationCounter = ic
    return _strip_tag_and_length(bytes(GXDLMSChippering.encryptAesGcm(p, bytearray(plain))))


def gurux_decrypt(st_: bytes, bk: bytes, ak: bytes, data: bytes) -> bytes:
    settings_ = GXDLMSSettings(True, None)
    p = AesGcmParameter(0, bytearray(st_), bytearray(bk), bytearray(ak))
    p.settings = settings_
    apdu = bytes([sec.GLO_GET_REQUEST]) + _axdr_len(len(data)) + data
    return bytes(GXDLMSChippering.decryptAesGcm(settings_, p, GXByteBuffer(bytearray(apdu))))


def _axdr_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    if n < 0x100:
        return bytes([0x81, n])
    return bytes([0x82]) + n.to_bytes(2, "big")


def test_green_book_vectors() -> None:
    # Given the Green Book's example, When ciphered, Then the published bytes come out
    assert sec.encrypt(0x30, GB_ST, GB_IC, BLOCK_KEY, AUTH_KEY, GB_PLAIN) == GB_AE
    assert sec.encrypt(0x10, GB_ST, GB_IC, BLOCK_KEY, AUTH_KEY, GB_PLAIN) == GB_A
    assert sec.decrypt(GB_ST, BLOCK_KEY, AUTH_KEY, GB_AE) == (0x30, GB_IC, GB_PLAIN)
    assert sec.decrypt(GB_ST, BLOCK_KEY, AUTH_KEY, GB_A) == (0x10, GB_IC, GB_PLAIN)
    # and Gurux agrees on the same vectors
    assert gurux_encrypt(0x30, GB_ST, GB_IC, BLOCK_KEY, AUTH_KEY, GB_PLAIN) == GB_AE
    assert gurux_encrypt(0x10, GB_ST, GB_IC, BLOCK_KEY, AUTH_KEY, GB_PLAIN) == GB_A


@pytest.mark.parametrize("sc", [0x10, 0x20, 0x30])
def test_each_security_matches_gurux_both_ways(sc: int) -> None:
    plain = bytes.fromhex("C001C100070100630100FF0200")
    ours = sec.encrypt(sc, CLIENT_ST, 7, BLOCK_KEY, AUTH_KEY, plain)
    assert ours == gurux_encrypt(sc, CLIENT_ST, 7, BLOCK_KEY, AUTH_KEY, plain)
    assert gurux_decrypt(CLIENT_ST, BLOCK_KEY, AUTH_KEY, ours) == plain
    assert sec.decrypt(CLIENT_ST, BLOCK_KEY, AUTH_KEY, ours) == (sc, 7, plain)
    expected_len = 5 + len(plain) + (0 if sc == 0x20 else sec.TAG_LEN)
    assert len(ours) == expected_len


@settings(max_examples=40, deadline=None)
@given(
    sc=st.sampled_from([0x10, 0x20, 0x30]),
    st_=st.binary(min_size=8, max_size=8),
    ic=st.integers(min_value=0, max_value=0xFFFFFFFF),
    bk=st.binary(min_size=16, max_size=16),
    ak=st.binary(min_size=16, max_size=16),
    plain=st.binary(min_size=0, max_size=300),
)
def test_random_vectors_match_gurux(
    sc: int, st_: bytes, ic: int, bk: bytes, ak: bytes, plain: bytes
) -> None:
    ours = sec.encrypt(sc, st_, ic, bk, ak, plain)
    assert ours == gurux_encrypt(sc, st_, ic, bk, ak, plain)
    assert sec.decrypt(st_, bk, ak, ours) == (sc, ic, plain)


@settings(max_examples=25, deadline=None)
@given(
    ic=st.integers(min_value=0, max_value=0xFFFFFFFF),
    challenge=st.binary(min_size=8, max_size=64),
)
def test_gmac_tag_matches_gurux_generate_gmac_password(ic: int, challenge: bytes) -> None:
    c = GXCiphering(bytearray(CLIENT_ST))
    c.invocationCounter = ic
    expected = bytes(c.generateGmacPassword(bytearray(challenge)))
    # Gurux returns SC || IC || tag: the meter sends that, we compute the tag
    assert expected[:5] == bytes([0x10]) + ic.to_bytes(4, "big")
    assert sec.gmac_tag(CLIENT_ST, ic, BLOCK_KEY, AUTH_KEY, challenge) == expected[5:]


@pytest.mark.parametrize("sc", [0x10, 0x30])
def test_tampering_is_detected(sc: int) -> None:
    good = sec.encrypt(sc, CLIENT_ST, 42, BLOCK_KEY, AUTH_KEY, GB_PLAIN)
    for pos in range(len(good)):
        bad = bytearray(good)
        bad[pos] ^= 0x01
        # any flipped bit (SC, IC, payload, tag) must be refused, never accepted silently
        with pytest.raises(sec.DecryptError):
            sec.decrypt(CLIENT_ST, BLOCK_KEY, AUTH_KEY, bytes(bad))


@pytest.mark.parametrize("sc", [0x10, 0x30])
def test_wrong_keys_or_title_are_rejected(sc: int) -> None:
    good = sec.encrypt(sc, CLIENT_ST, 42, BLOCK_KEY, AUTH_KEY, GB_PLAIN)
    other = bytes(16)
    with pytest.raises(sec.DecryptError) as info:
        sec.decrypt(CLIENT_ST, BLOCK_KEY, other, good)
    assert AUTH_KEY.hex() not in str(info.value).lower()
    with pytest.raises(sec.DecryptError):
        sec.decrypt(CLIENT_ST, other, AUTH_KEY, good)
    with pytest.raises(sec.DecryptError):
        sec.decrypt(GB_ST, BLOCK_KEY, AUTH_KEY, good)
    with pytest.raises(sec.DecryptError):
        sec.decrypt(CLIENT_ST, BLOCK_KEY, AUTH_KEY, good[:10])


def test_tag_mapping() -> None:
    assert sec.GLO_TAGS[0xC0] == 0xC8
    assert sec.GLO_TAGS[0xC4] == 0xCC
    assert sec.GLO_TAGS[0xC3] == 0xCB
    assert sec.GLO_TAGS[0xC7] == 0xCF
    assert sec.GLO_TAGS[0x01] == 0x21
    assert sec.GLO_TAGS[0x08] == 0x28
    assert all(sec.PLAIN_TAGS[g] == p for p, g in sec.GLO_TAGS.items())


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        sec.encrypt(0x30, b"short", 1, BLOCK_KEY, AUTH_KEY, b"x")
    with pytest.raises(ValueError):
        sec.encrypt(0x40, CLIENT_ST, 1, BLOCK_KEY, AUTH_KEY, b"x")
    with pytest.raises(ValueError):
        sec.encrypt(0x30, CLIENT_ST, 1 << 32, BLOCK_KEY, AUTH_KEY, b"x")
    with pytest.raises(sec.DecryptError):
        sec.decrypt(CLIENT_ST, BLOCK_KEY, AUTH_KEY, b"\x30\x00")


# ------------------------------------------------ HLS-GMAC against the real simulator
def _secure_reader(port: int, invocation_counter: int):
    """Gurux's secure client as client 48 (HLS-GMAC, authenticated encryption)."""
    from gurux_dlms.enums import Authentication, InterfaceType, Security
    from gurux_dlms.secure import GXDLMSSecureClient

    from tests.test_sim_template import _GuruxReader

    reader = _GuruxReader(port, 16, None)
    c = GXDLMSSecureClient(True, 48, 1, Authentication.HIGH_GMAC, None, InterfaceType.WRAPPER)
    c.ciphering.security = Security.AUTHENTICATION_ENCRYPTION
    c.ciphering.systemTitle = bytearray(CLIENT_ST)
    c.ciphering.blockCipherKey = bytearray(BLOCK_KEY)
    c.ciphering.authenticationKey = bytearray(AUTH_KEY)
    c.ciphering.invocationCounter = invocation_counter
    reader.client = c
    return reader


def _hls_associate(reader) -> None:
    reader.associate()
    assert reader.client.getIsAuthenticationRequired()
    reply = reader.run(reader.client.getApplicationAssociationRequest())
    reader.client.parseApplicationAssociationResponse(reply.data)


def test_hls_gmac_session() -> None:
    import datetime

    from gurux_dlms import GXDLMSException, GXDLMSExceptionResponse
    from gurux_dlms.enums import ExceptionServiceError
    from gurux_dlms.objects import GXDLMSData, GXDLMSProfileGeneric, GXDLMSRegister

    from dlms2amqp.simulator import model
    from tests.helpers_sim import running_simulator
    from tests.test_sim_template import _GuruxReader

    # Given the built-in meter k=1 (its system title is b"D2A" + k)
    with running_simulator(2) as sim:
        port = sim.port + 1
        # When Gurux's secure client associates as client 48 with HLS-GMAC
        reader = _secure_reader(port, 100)
        try:
            _hls_associate(reader)
            # Then the meter's system title and ciphered replies check out
            assert bytes(reader.client.settings.sourceSystemTitle) == b"D2A" + (1).to_bytes(
                5, "big"
            )
            energy = GXDLMSRegister("1.0.1.8.0.255")
            reader.read(energy, 3)
            assert int(energy.unit) == 30
            now = int(datetime.datetime.now(datetime.timezone.utc).timestamp())
            value = reader.read(energy, 2)
            assert model.import_wh(1, now - 60) <= value <= model.import_wh(1, now + 60)
            # and a profile by range over an hour, block by block if needed
            pg = GXDLMSProfileGeneric("1.0.99.1.0.255")
            reader.read(pg, 3)
            end = datetime.datetime.fromtimestamp(
                model.last_load_boundary(now), datetime.timezone.utc
            )
            start = end - datetime.timedelta(hours=1)
            reply = reader.run(reader.client.readRowsByRange(pg, start, end))
            assert reply.error == 0
            rows = reader.client.updateValue(pg, 2, reply.value)
            expected = model.load_profile_rows(1, int(start.timestamp()), int(end.timestamp()))
            assert [(r[1], r[2], r[3]) for r in rows] == [(s, i, e) for _t, s, i, e in expected]
            counter = reader.client.ciphering.invocationCounter
        finally:
            reader.close()

        # The meter keeps the last accepted counter (0.0.43.1.0.255, readable by client 16)
        public = _GuruxReader(port, 16, None)
        try:
            public.associate()
            last = public.read(GXDLMSData("0.0.43.1.0.255"), 2)
        finally:
            public.close()
        assert 100 < last < counter + 1

        # When a session replays an old counter, Then the meter refuses it with
        # invocation-counter-error and names the counter it expects (last + 1)
        replay = _secure_reader(port, 100)
        try:
            with pytest.raises(GXDLMSExceptionResponse) as info:
                _hls_associate(replay)
            error = info.value.exceptionServiceError
            assert error == ExceptionServiceError.INVOCATION_COUNTER_ERROR
            assert info.value.serviceErrorValue == last + 1
        finally:
            replay.sock.close()

        # When the keys are wrong, Then the association fails too
        wrong = _secure_reader(port, last + 10)
        wrong.client.ciphering.authenticationKey = bytearray(16)
        try:
            with pytest.raises(GXDLMSException) as info:
                _hls_associate(wrong)
            assert int(info.value.diagnostic) == 13
        finally:
            wrong.sock.close()


# --- HLS pass 3/4 proofs of mechanisms 2, 3, 4 and 6 against Gurux's GXSecure.secure ------
def _gurux_secure(authentication, challenge: bytes, secret: bytes) -> bytes:
    from gurux_dlms.GXSecure import GXSecure

    s = GXDLMSSettings(False, None)
    s.authentication = authentication
    return bytes(GXSecure.secure(s, None, 0, bytearray(challenge), bytearray(secret)))


@settings(max_examples=60, deadline=None)
@given(
    mech=st.sampled_from([2, 3, 4]),
    secret=st.binary(min_size=1, max_size=40),
    challenge=st.binary(min_size=8, max_size=64),
)
def test_hls_proof_high_md5_sha1_equal_gurux(mech: int, secret: bytes, challenge: bytes) -> None:
    from gurux_dlms.enums import Authentication

    auth = {2: Authentication.HIGH, 3: Authentication.HIGH_MD5, 4: Authentication.HIGH_SHA1}
    assert sec.hls_proof(mech, secret, challenge) == _gurux_secure(auth[mech], challenge, secret)


@settings(max_examples=30, deadline=None)
@given(
    secret=st.binary(min_size=1, max_size=20),
    stoc=st.binary(min_size=8, max_size=64),
    ctos=st.binary(min_size=8, max_size=64),
)
def test_hls_proof_sha256_equals_gurux_both_ways(secret: bytes, stoc: bytes, ctos: bytes) -> None:
    from gurux_dlms.enums import Authentication

    client_st, server_st = b"GRX12345", b"SIM00001"
    # what Gurux's client sends (pass 3) and what it expects back (pass 4)
    to_meter = _gurux_secure(
        Authentication.HIGH_SHA256, stoc, secret + client_st + server_st + stoc + ctos
    )
    to_client = _gurux_secure(
        Authentication.HIGH_SHA256, ctos, secret + server_st + client_st + ctos + stoc
    )
    assert sec.hls_proof(6, secret, stoc, client_st, server_st, ctos) == to_meter
    assert sec.hls_proof(6, secret, ctos, server_st, client_st, stoc) == to_client
    assert to_meter != to_client


def test_hls_proof_refuses_gmac_and_unknown() -> None:
    with pytest.raises(ValueError):
        sec.hls_proof(5, b"k", bytes(16))
    with pytest.raises(ValueError):
        sec.hls_proof(9, b"k", bytes(16))


@pytest.mark.parametrize("suite", [1, 2])
def test_suite_nibble_round_trip(suite: int) -> None:
    # suites 1 and 2 keep AES-GCM (128 / 256-bit keys); only the SC low nibble changes
    key = BLOCK_KEY * (2 if suite == 2 else 1)
    data = sec.encrypt(0x30 | suite, CLIENT_ST, 7, key, AUTH_KEY, b"\xc0\x01\x00")
    assert data[0] == 0x30 | suite
    assert sec.decrypt(CLIENT_ST, key, AUTH_KEY, data) == (0x30 | suite, 7, b"\xc0\x01\x00")


# --- the simulator Session's HLS pass 3/4 and GBT, bytes in and out (no sockets) ---------
def _session(interface: str = "WRAPPER"):
    from dlms2amqp.simulator import apdu, cosem, model

    dev = cosem.builtin_device()
    meter = cosem.MeterState(0, model.system_title(0))
    return apdu.Session(dev, meter, apdu.SimOptions(interface=interface))


def _gurux_aarq(client_sap: int, mechanism, secret: str, **kw) -> tuple[object, bytes]:
    """Gurux's own AARQ for the client (the APDU, without the WRAPPER header)."""
    from gurux_dlms.enums import InterfaceType
    from gurux_dlms.secure import GXDLMSSecureClient

    c = GXDLMSSecureClient(True, client_sap, 1, mechanism, secret, InterfaceType.WRAPPER)
    c.ciphering.systemTitle = bytearray(b"GRX12345")
    for name, value in kw.items():
        setattr(c, name, value)
    (frame,) = c.aarqRequest()
    return c, bytes(frame)[8:]


def _feed(c, apdu_bytes: bytes, source: int = 1, dest: int = 16):
    from gurux_dlms import GXByteBuffer, GXReplyData

    from dlms2amqp.simulator.framing import wrapper_encode

    reply = GXReplyData()
    c.getData(GXByteBuffer(wrapper_encode(source, dest, apdu_bytes)), reply, None)
    return reply


@pytest.mark.parametrize("client_sap", [18, 19, 20, 22])
def test_session_pass3_proof_and_refusal(client_sap: int) -> None:
    from gurux_dlms.enums import Authentication

    mech = {18: 2, 19: 3, 20: 4, 22: 6}[client_sap]
    for secret, accepted in (("Gurux", True), ("gurux", False)):
        s = _session()
        c, aarq = _gurux_aarq(client_sap, Authentication(mech), secret)
        aare = s.handle(client_sap, aarq)
        c.parseAareResponse(_feed(c, aare, dest=client_sap).data)
        assert c.getIsAuthenticationRequired() and not s.authenticated
        # Before pass 3 the meter answers nothing but the ACTION
        assert s.handle(client_sap, bytes.fromhex("C001C1000100002A0000FF0200")) == b"\xd8\x01\x01"
        (action,) = c.getApplicationAssociationRequest()
        reply = s.handle(client_sap, bytes(action)[8:])
        assert reply[:3] == b"\xc7\x01\xc1"
        if accepted:
            assert reply[3:6] == b"\x00\x01\x00" and s.authenticated
            c.parseApplicationAssociationResponse(_feed(c, reply, dest=client_sap).data)
        else:
            assert reply[3:] == b"\x03\x00"  # read-write-denied, and the association is closed
            assert not s.associated
            assert s.handle(client_sap, bytes(action)[8:]) == b"\xd8\x01\x01"


def test_session_gbt_blocks_and_acks() -> None:
    from dlms2amqp.simulator import apdu

    s = _session()
    s.associated = s.authenticated = True
    s.client_sap = 32
    s.assoc = s.device.associations[32]
    s.conformance = apdu.SUPPORTED_CONFORMANCE
    s.client_max_pdu = 128
    long_reply = bytes((apdu.GET_RESPONSE, 1, 0xC1, 0)) + bytes(range(256)) * 2
    first = s._gbt_start(long_reply)
    # E0, block control (not last, window 1), block 1, ack 0, length, data
    assert first[:6] == b"\xe0\x01\x00\x01\x00\x00" and first[6] == 118
    # the client acks block 1 with window 3: blocks 2, 3 (streaming) and 4 (not)
    nxt = s.handle(32, b"\xe0\x83\x00\x01\x00\x01\x00")
    assert nxt[:6] == b"\xe0\x41\x00\x02\x00\x01"
    assert [b[:4] for b in s.more] == [b"\xe0\x41\x00\x03", b"\xe0\x01\x00\x04"]
    third = s.more[0]
    s.more = []
    # an ack of block 3 only (block 4 lost): the meter sends 4 again, then 5 (the last)
    again = s.handle(32, b"\xe0\x82\x00\x02\x00\x03\x00")
    assert again[:4] == b"\xe0\x41\x00\x04" and s.more[0][:4] == b"\xe0\x81\x00\x05"
    pieces = [first, nxt, third, again, s.more[0]]
    got = {int.from_bytes(p[2:4], "big"): p[7:] for p in pieces}
    assert b"".join(got[i] for i in sorted(got)) == long_reply
    # nothing left: a further ack is refused
    assert s.handle(32, b"\xe0\x81\x00\x03\x00\x05\x00") == b"\xd8\x01\x01"


def test_session_get_with_list_needs_multiple_references() -> None:
    from dlms2amqp.simulator import apdu

    s = _session()
    s.associated = s.authenticated = True
    s.client_sap = 32
    s.assoc = s.device.associations[32]
    # serial number and an unknown object, as one GET-Request-With-List
    req = bytes.fromhex("C003C1020001 0000600100FF 02 000001 0909090909 09 02 00".replace(" ", ""))
    s.conformance = apdu.SUPPORTED_CONFORMANCE & ~apdu.CONF_MULTIPLE_REFS
    assert s.handle(32, req) == b"\xd8\x01\x02"  # not negotiated: service not supported
    s.conformance = apdu.SUPPORTED_CONFORMANCE
    reply = s.handle(32, req)
    assert reply[:4] == b"\xc4\x03\xc1\x02"
    assert reply[4:6] == b"\x00\x0a" and reply.endswith(b"\x01\x04")  # data, then undefined
    s.opts.deny_wrong_class = True
    assert s.handle(32, req).endswith(b"\x01\x03")  # --deny-wrong-class: read-write-denied
