# SPDX-License-Identifier: GPL-2.0-or-later
"""The Gurux client of one connection string, set up as Gurux's example client sets it up.

The wire bytes of the SNRM and AARQ follow from here (``tests/test_wire_equivalence``
compares them with Gurux's own client configured from the same string).  Also the one
conversion of values Gurux decoded into the natives :mod:`.axdr` returns.
"""

from __future__ import annotations

from datetime import timezone
from typing import Any

from gurux_dlms import GXDLMSClient
from gurux_dlms.enums import Authentication, Conformance, InterfaceType, Security, Standard
from gurux_dlms.secure import GXDLMSSecureClient

from .connstring import ConnSettings

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


def make_client(settings: ConnSettings, public: bool = False) -> GXDLMSClient:
    """A Gurux client set up the way Gurux's example client sets it up from the string.

    Always the secure client, as Gurux's examples use: the High family needs its
    ciphering object even without -C (the plain client has none).  The server
    address is exactly what connstring computed from -s/-l/-n, as Gurux's client does.
    """
    s = settings
    ln = s.referencing == "LN"
    itype = _INTERFACE[s.interface]
    server = s.server_address
    if public:
        client = GXDLMSSecureClient(ln, 16, server, Authentication.NONE, None, itype)
    else:
        secret = s.password.reveal() if s.password else None
        password = bytearray(secret) if isinstance(secret, bytes) else secret
        client = GXDLMSSecureClient(
            ln, s.client_address, server, _AUTH[s.authentication], password, itype
        )
        c = client.ciphering
        c.security = _SECURITY[s.security]
        if s.system_title is not None:
            c.systemTitle = bytearray(s.system_title)
        if s.authentication_key is not None:
            c.authenticationKey = key_bytes(s.authentication_key.reveal())
        if s.block_cipher_key is not None:
            c.blockCipherKey = key_bytes(s.block_cipher_key.reveal())
        if s.dedicated_key is not None:
            c.dedicatedKey = key_bytes(s.dedicated_key.reveal())
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


def key_bytes(secret: Any) -> bytearray:
    """A key or password revealed from its Secret, as the bytearray Gurux expects."""
    return bytearray(secret.encode() if isinstance(secret, str) else secret)


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
