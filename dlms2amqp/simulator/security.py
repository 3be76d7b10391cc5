# SPDX-License-Identifier: GPL-2.0-or-later
"""AES-GCM ciphering and HLS-GMAC for the simulator (DLMS security suite 0).

The simulator must answer ciphered requests from client 48 for thousands of
meters; Gurux's own AES is pure Python and costs milliseconds per APDU, so this
module uses the ``cryptography`` package instead.  Gurux's implementation is
used only as the independent oracle in ``tests/test_sim_security.py``.

Green Book conventions (suite 0, global unicast key):

- nonce (IV) = sender's system title (8 bytes) || invocation counter (4 bytes, big endian);
- security control byte SC: 0x10 authentication, 0x20 encryption, 0x30 both
  (low nibble = security suite, 0 here);
- additional authenticated data: SC || authentication key, followed by the
  plaintext when only authentication is applied;
- tags are truncated to 12 bytes.

The functions handle what follows the length byte(s) of a glo-ciphered APDU:
``SC || IC || ciphertext || tag``.  Framing the tag and length (for instance
``0xC8 len ...``) is the caller's job; the tag mapping is below.
"""

from __future__ import annotations

import hashlib
import hmac
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dlms2amqp.simulator.cosem import MECH_HIGH, MECH_HIGH_MD5, MECH_HIGH_SHA1, MECH_HIGH_SHA256

__all__ = [
    "DecryptError",
    "SC_AUTHENTICATION",
    "SC_ENCRYPTION",
    "SC_AUTHENTICATED_ENCRYPTION",
    "TAG_LEN",
    "GLO_TAGS",
    "PLAIN_TAGS",
    "encrypt",
    "decrypt",
    "gmac_tag",
    "nonce",
    "hls_proof",
]

#: security control byte values (security suite 0)
SC_AUTHENTICATION = 0x10
SC_ENCRYPTION = 0x20
SC_AUTHENTICATED_ENCRYPTION = 0x30

#: DLMS truncates the GCM tag to 96 bits
TAG_LEN = 12

# APDU tags (plain service -> glo-ciphered service), Green Book table of xDLMS APDUs.
INITIATE_REQUEST = 0x01
INITIATE_RESPONSE = 0x08
CONFIRMED_SERVICE_ERROR = 0x0E
GET_REQUEST = 0xC0
SET_REQUEST = 0xC1
EVENT_NOTIFICATION = 0xC2
ACTION_REQUEST = 0xC3
GET_RESPONSE = 0xC4
SET_RESPONSE = 0xC5
ACTION_RESPONSE = 0xC7
READ_REQUEST = 0x05
WRITE_REQUEST = 0x06
READ_RESPONSE = 0x0C
WRITE_RESPONSE = 0x0D

GLO_INITIATE_REQUEST = 0x21
GLO_INITIATE_RESPONSE = 0x28
GLO_CONFIRMED_SERVICE_ERROR = 0x2E
GLO_GET_REQUEST = 0xC8
GLO_SET_REQUEST = 0xC9
GLO_EVENT_NOTIFICATION = 0xCA
GLO_ACTION_REQUEST = 0xCB
GLO_GET_RESPONSE = 0xCC
GLO_SET_RESPONSE = 0xCD
GLO_ACTION_RESPONSE = 0xCF
GLO_READ_REQUEST = 0x25
GLO_WRITE_REQUEST = 0x26
GLO_READ_RESPONSE = 0x2C
GLO_WRITE_RESPONSE = 0x2D

#: plain APDU tag -> glo-ciphered APDU tag
GLO_TAGS: dict[int, int] = {
    INITIATE_REQUEST: GLO_INITIATE_REQUEST,
    INITIATE_RESPONSE: GLO_INITIATE_RESPONSE,
    CONFIRMED_SERVICE_ERROR: GLO_CONFIRMED_SERVICE_ERROR,
    GET_REQUEST: GLO_GET_REQUEST,
    SET_REQUEST: GLO_SET_REQUEST,
    EVENT_NOTIFICATION: GLO_EVENT_NOTIFICATION,
    ACTION_REQUEST: GLO_ACTION_REQUEST,
    GET_RESPONSE: GLO_GET_RESPONSE,
    SET_RESPONSE: GLO_SET_RESPONSE,
    ACTION_RESPONSE: GLO_ACTION_RESPONSE,
    READ_REQUEST: GLO_READ_REQUEST,
    READ_RESPONSE: GLO_READ_RESPONSE,
    WRITE_REQUEST: GLO_WRITE_REQUEST,
    WRITE_RESPONSE: GLO_WRITE_RESPONSE,
}
#: glo-ciphered APDU tag -> plain APDU tag
PLAIN_TAGS: dict[int, int] = {v: k for k, v in GLO_TAGS.items()}

_VALID_SC = (SC_AUTHENTICATION, SC_ENCRYPTION, SC_AUTHENTICATED_ENCRYPTION)


class DecryptError(Exception):
    """A ciphered APDU that cannot be deciphered (bad tag, wrong key, truncated).

    The message never contains key material or plaintext.
    """


def nonce(system_title: bytes, ic: int) -> bytes:
    """The 12-byte GCM IV: the sender's system title and its invocation counter."""
    if len(system_title) != 8:
        raise ValueError("system title must be 8 bytes")
    if not 0 <= ic <= 0xFFFFFFFF:
        raise ValueError("invocation counter must fit in 32 bits")
    return bytes(system_title) + struct.pack(">I", ic)


def _check_keys(block_key: bytes, auth_key: bytes) -> None:
    if len(block_key) not in (16, 32):
        raise ValueError("block cipher key must be 16 or 32 bytes")
    if not auth_key:
        raise ValueError("authentication key is empty")


def encrypt(
    sc: int,
    system_title: bytes,
    ic: int,
    block_key: bytes,
    auth_key: bytes,
    plaintext: bytes,
) -> bytes:
    """Cipher one APDU as the sender whose system title is given.

    Returns ``SC || IC || payload``: ciphertext and 12-byte tag for 0x30,
    plaintext and tag for 0x10, ciphertext without tag for 0x20.
    """
    if sc & 0x30 not in _VALID_SC or sc & 0x0F > 2:
        raise ValueError(f"unsupported security control byte 0x{sc:02X}")
    _check_keys(block_key, auth_key)
    iv = nonce(system_title, ic)
    head = struct.pack(">BI", sc, ic)
    aead = AESGCM(bytes(block_key))
    security = sc & 0x30
    if security == SC_AUTHENTICATED_ENCRYPTION:
        out = aead.encrypt(iv, bytes(plaintext), bytes([sc]) + bytes(auth_key))
        return head + out[:-16] + out[-16 : -16 + TAG_LEN]
    if security == SC_AUTHENTICATION:
        aad = bytes([sc]) + bytes(auth_key) + bytes(plaintext)
        return head + bytes(plaintext) + aead.encrypt(iv, b"", aad)[:TAG_LEN]
    # Encryption only: GCM is CTR underneath; there is no tag to send.
    return head + _ctr(block_key, iv, plaintext)


def decrypt(
    system_title: bytes, block_key: bytes, auth_key: bytes, data: bytes
) -> tuple[int, int, bytes]:
    """Decipher ``SC || IC || payload`` sent by the holder of ``system_title``.

    Returns ``(sc, ic, plaintext)``; raises :class:`DecryptError` when the tag
    does not match (wrong keys, tampered or truncated data).  Checking that the
    counter grows is the caller's job: it knows the last accepted value.
    """
    _check_keys(block_key, auth_key)
    data = bytes(data)
    if len(data) < 5:
        raise DecryptError("ciphered APDU too short")
    sc, ic = struct.unpack_from(">BI", data, 0)
    security = sc & 0x30
    if security not in _VALID_SC or sc & 0x0F > 2:
        raise DecryptError(f"unsupported security control byte 0x{sc:02X}")
    iv = nonce(system_title, ic)
    body = data[5:]
    if security == SC_ENCRYPTION:
        # Without a tag nothing can be checked: the keystream is all there is.
        return sc, ic, _ctr(block_key, iv, body)
    if len(body) < TAG_LEN:
        raise DecryptError("ciphered APDU too short for its authentication tag")
    payload, tag = body[:-TAG_LEN], body[-TAG_LEN:]
    if security == SC_AUTHENTICATION:
        expected = gmac_tag_sc(sc, system_title, ic, block_key, auth_key, payload)
        if not _consteq(expected, tag):
            raise DecryptError("authentication tag mismatch (wrong keys or tampered data)")
        return sc, ic, payload
    dec = Cipher(
        algorithms.AES(bytes(block_key)),
        modes.GCM(iv, tag, min_tag_length=TAG_LEN),
    ).decryptor()
    dec.authenticate_additional_data(bytes([sc]) + bytes(auth_key))
    plaintext = dec.update(payload)
    try:
        dec.finalize()
    except InvalidTag as exc:
        raise DecryptError("authentication tag mismatch (wrong keys or tampered data)") from exc
    return sc, ic, plaintext


def gmac_tag_sc(
    sc: int,
    system_title: bytes,
    ic: int,
    block_key: bytes,
    auth_key: bytes,
    data: bytes,
) -> bytes:
    """The 12-byte GMAC of ``SC || AK || data`` (authentication only)."""
    _check_keys(block_key, auth_key)
    aad = bytes([sc]) + bytes(auth_key) + bytes(data)
    return AESGCM(bytes(block_key)).encrypt(nonce(system_title, ic), b"", aad)[:TAG_LEN]


def gmac_tag(
    system_title: bytes, ic: int, block_key: bytes, auth_key: bytes, challenge: bytes
) -> bytes:
    """HLS-GMAC: the 12-byte tag f(challenge) with SC 0x10.

    The meter proves it knows the keys by returning ``0x10 || IC || tag`` of the
    client's challenge (StoC direction: CtoS challenge, meter's system title),
    and checks the client's answer the same way with the client's system title.
    """
    return gmac_tag_sc(SC_AUTHENTICATION, system_title, ic, block_key, auth_key, challenge)


def _consteq(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)


def _ctr(block_key: bytes, iv: bytes, data: bytes) -> bytes:
    # GCM's keystream starts at counter 2 for a 96-bit IV (counter 1 masks the tag).
    enc = Cipher(algorithms.AES(bytes(block_key)), modes.CTR(iv + b"\x00\x00\x00\x02")).encryptor()
    return enc.update(bytes(data)) + enc.finalize()


# --- HLS pass 3/4 for mechanisms 2, 3, 4 and 6 (numbers: cosem.MECH_*) ----------------


def _aes_ecb(key: bytes, data: bytes) -> bytes:
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    return enc.update(data) + enc.finalize()


def hls_proof(
    mechanism: int,
    secret: bytes,
    challenge: bytes,
    own_title: bytes = b"",
    peer_title: bytes = b"",
    own_challenge: bytes = b"",
) -> bytes:
    """f(challenge): what one party returns for the challenge the other party sent it.

    ``own_*`` belong to the party that computes the proof, ``peer_title`` to the
    other one.  The client proves itself with f(StoC), the meter with f(CtoS):

    - High (2) is manufacturer specific; like Gurux's meters, AES-128 in ECB mode of
      the challenge zero-padded to whole blocks, the key being the secret zero-padded
      (or cut) to 16 bytes;
    - HighMD5 (3) / HighSHA1 (4): the digest of challenge || secret;
    - HighSHA256 (6): SHA-256 of secret || own system title || peer system title ||
      challenge || own challenge.

    HighGMAC (5) needs the keys and an invocation counter: see :func:`gmac_tag`.
    """
    secret = bytes(secret)
    challenge = bytes(challenge)
    if mechanism == MECH_HIGH:
        n = max(len(challenge), len(secret), 1)
        n += -n % 16
        key = secret.ljust(16, b"\0")[:16]
        return _aes_ecb(key, challenge.ljust(n, b"\0"))
    if mechanism == MECH_HIGH_MD5:
        return hashlib.md5(challenge + secret).digest()
    if mechanism == MECH_HIGH_SHA1:
        return hashlib.sha1(challenge + secret).digest()
    if mechanism == MECH_HIGH_SHA256:
        return hashlib.sha256(
            secret + bytes(own_title) + bytes(peer_title) + challenge + bytes(own_challenge)
        ).digest()
    raise ValueError(f"no HLS proof function for mechanism {mechanism}")
