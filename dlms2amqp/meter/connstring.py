# SPDX-License-Identifier: GPL-2.0-or-later
"""ConnectionString (Gurux client example's command line) -> ConnSettings.

The proof of concept passed the request's ``ConnectionString`` to Gurux's
example client; consumers keep sending those strings, so every option of the
seed is understood here with the meaning and defaults of Gurux's example
clients (``GXSettings`` of Gurux.DLMS.Python and ``Settings`` of
Gurux.DLMS.Net), options applied in the order given.  The server address is
built the way those clients build it: ``-s N`` is the address N itself, ``-l``
combines a logical address with the current address as physical, ``-n`` uses
the serial-number formula (README "Connection strings").  Options that a
gateway cannot honour (certificate generation, ECDSA, PLC media) are refused
with a reason instead of being half-done.  Passwords and keys are kept in
:class:`~dlms2amqp.secret.Secret`.

A value holding a control character (NUL included) is refused, never cut: C code below
would stop at the NUL and act on a prefix.  ``-h`` is normalised here without any I/O
(an IP literal read as the resolver reads it, a name lower-cased and checked); resolving
names and checking the allow-lists is ``targets.prepare`` (see docs/design.md).

Over 500 lines because it is one table read as one: the ~35 seed options with their
checks, the field-engineer wording of each refusal and the checks across options
(keys needed by ciphering, addresses) belong together; meter targets are ``targets``.
"""

from __future__ import annotations

import re
import shlex
import unicodedata
from dataclasses import dataclass, field, fields
from typing import Optional

from ..errors import ConnectionStringError
from ..secret import Secret
from . import targets

AUTHENTICATIONS = ("None", "Low", "High", "HighMD5", "HighSHA1", "HighGMAC", "HighSHA256")
SECURITIES = ("None", "Authentication", "Encryption", "AuthenticationEncryption")
INTERFACES = ("HDLC", "WRAPPER", "HdlcWithModeE")
STANDARDS = ("DLMS", "India", "Italy", "SaudiArabia", "IDIS")
TRACE_LEVELS = ("Off", "Error", "Warning", "Info", "Verbose")
PARITIES = ("None", "Odd", "Even", "Mark", "Space")
_UNSUPPORTED_INTERFACES = ("Plc", "PlcHdlc", "LPWAN", "WiSUN", "PlcPrime", "CoAP", "WirelessMBus")

_FLAGS = {"I"}  # options without a value
#: Gurux's default server address; ``-s`` replaces it, later ``-s``/``-l`` combine with it
DEFAULT_SERVER_ADDRESS = 1
_REFUSED = {
    "E": "exporting certificates from the meter is not supported by the gateway",
    "N": "generating certificates (Gurux web service) is not supported by the gateway",
}
_SERIAL_RE = re.compile(
    r"^(?P<port>.+?)(?::(?P<baud>\d+)(?::(?P<bits>[5-8])(?P<parity>[A-Za-z]+)"
    r"(?P<stop>1\.5|1|2))?)?$"
)
_OBIS_RE = re.compile(r"^\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}$")


@dataclass
class ConnSettings:
    """Everything needed to open a session with one meter."""

    host: Optional[str] = None
    port: Optional[int] = None
    serial_port: Optional[str] = None
    baud_rate: int = 9600
    data_bits: int = 8
    parity: str = "None"
    stop_bits: str = "1"
    authentication: str = "None"
    password: Optional[Secret] = None
    client_address: int = 16
    #: the address exactly as Gurux's example client computes it from -s/-l/-n
    server_address: int = DEFAULT_SERVER_ADDRESS
    logical_address: Optional[int] = None  # last -l value (informational)
    serial_number: Optional[int] = None  # last -n value (informational)
    referencing: str = "LN"
    get_list: list = field(default_factory=list)  # [(obis, attribute_index)]
    security: str = "None"
    invocation_counter_obis: Optional[str] = None
    auto_increase_invoke_id: bool = False
    system_title: Optional[bytes] = None
    meter_system_title: Optional[bytes] = None
    authentication_key: Optional[Secret] = None
    block_cipher_key: Optional[Secret] = None
    dedicated_key: Optional[Secret] = None
    initial_invocation_counter: Optional[int] = None
    standard: str = "DLMS"
    #: -d India/Italy/SaudiArabia: date-time deviations in the meter's "normal" sign
    utc_to_normal_time: bool = False
    #: -K given: Gurux's .NET client then proposes general-protection (it matters for SN)
    propose_general_protection: bool = False
    gateway: Optional[tuple] = None  # (network_id, physical device address bytes)
    interface: str = "HDLC"
    gbt_window_size: int = 1
    gbt_window_size_given: bool = False  # -W present: propose general block transfer
    hdlc_window_size: int = 1
    hdlc_frame_size: int = 128
    manufacturer_id: Optional[str] = None
    # --- the target as connected to and keyed (meter/targets.py) ---
    #: the IP address connected to: the -h literal normalised, or the name resolved
    address: Optional[str] = None
    host_is_literal: bool = False  # -h gave an IP address (no name to resolve)
    serial_device: Optional[str] = None  # real path of -S (symbolic links resolved)
    target_checked: bool = False  # targets.prepare fixed and checked the target

    @property
    def meter_key(self) -> str:
        """Routing and locking key: one meter, one association at a time.

        By address and port (``localhost``, ``127.1`` and ``127.0.0.1`` are one meter) and
        by the serial device's real path, once ``targets.prepare`` fixed them.
        """
        if self.serial_port is not None:
            return f"serial:{self.serial_device or self.serial_port}"
        return f"tcp:{targets.key_host(self.address or str(self.host))}:{self.port}"

    @property
    def endpoint(self) -> str:
        """Printable address, without secrets."""
        if self.serial_port is not None:
            return self.serial_port
        return f"{targets.key_host(str(self.host))}:{self.port}"

    def session_fingerprint(self) -> tuple:
        """Settings that must match for a pooled association to be reused."""
        return (
            self.meter_key,
            self.authentication,
            self.password,
            self.client_address,
            self.server_address,
            self.logical_address,
            self.serial_number,
            self.referencing,
            self.security,
            self.system_title,
            self.authentication_key,
            self.block_cipher_key,
            self.dedicated_key,
            self.interface,
            self.baud_rate,
            self.hdlc_window_size,
            self.hdlc_frame_size,
            self.gbt_window_size_given,
            self.gbt_window_size,
            self.propose_general_protection,
            self.meter_system_title,
            self.standard,
        )

    def __reduce__(self) -> tuple:
        # Every job crosses the master -> worker pipe: the values in field order are a
        # quarter of the default pickle (a dict keyed by field names) and 4x faster.
        return (_settings_from, (tuple([getattr(self, name) for name in _FIELDS]),))


_FIELDS = tuple(f.name for f in fields(ConnSettings))


def _settings_from(values: tuple) -> ConnSettings:
    """Unpickle a ConnSettings (``ConnSettings.__reduce__``)."""
    return ConnSettings(*values)


class _Refused(ConnectionStringError):
    """A recognised value the gateway refuses: its reason is shown wherever it stands.

    The message names only the canonical spelling of the value, never the raw word, so
    it cannot echo the second word of an unquoted password.
    """


def _choice(opt: str, value: str, allowed: tuple, aliases: Optional[dict] = None) -> str:
    low = value.strip().lower()
    for item in allowed:
        if item.lower() == low:
            return item
    if aliases and low in aliases:
        return aliases[low]
    raise ConnectionStringError(
        f"option -{opt}: {value!r} is not allowed; use one of {', '.join(allowed)}"
    )


def _int(opt: str, value: str, lo: int, hi: int, what: str = "a number") -> int:
    try:
        number = int(value, 0) if value.lower().startswith("0x") else int(value)
    except ValueError:
        raise ConnectionStringError(
            f"option -{opt}: {value!r} is not {what} ({lo}..{hi})"
        ) from None
    if not lo <= number <= hi:
        raise ConnectionStringError(f"option -{opt}: {number} is out of range {lo}..{hi}")
    return number


def _hex(opt: str, value: str, lengths: tuple, secret: bool) -> bytes:
    text = value.replace(" ", "")
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        shown = "the value" if secret else repr(value)
        raise ConnectionStringError(f"option -{opt}: {shown} is not hexadecimal") from None
    if len(raw) not in lengths:
        raise ConnectionStringError(
            f"option -{opt}: {len(raw)} bytes given, expected "
            + " or ".join(str(n) for n in lengths)
            + " bytes in hexadecimal"
        )
    return raw


def _obis(opt: str, value: str) -> str:
    text = value.strip()
    if not _OBIS_RE.match(text) or any(int(p) > 255 for p in text.split(".")):
        raise ConnectionStringError(
            f"option -{opt}: {value!r} is not a logical name (example: 0.0.43.1.0.255)"
        )
    return text


def _get_list(value: str) -> list:
    items = []
    for part in value.split(";"):
        part = part.strip()
        if not part:
            continue
        obis, sep, attr = part.partition(":")
        obis = _obis("g", obis)
        index = _int("g", attr, 1, 255, "an attribute index") if sep else 2
        items.append((obis, index))
    if not items:
        raise ConnectionStringError("option -g: empty list (example: 0.0.1.0.0.255:2)")
    return items


def _serial(s: ConnSettings, value: str) -> None:
    m = _SERIAL_RE.match(value.strip())
    if not m:
        raise ConnectionStringError(
            f"option -S: {value!r} is not a serial port (example: /dev/ttyUSB0:9600:8None1)"
        )
    s.serial_port = m.group("port")
    if m.group("baud"):
        s.baud_rate = _int("S", m.group("baud"), 300, 921600, "a baud rate")
    if m.group("bits"):
        s.data_bits = int(m.group("bits"))
        s.parity = _choice("S", m.group("parity"), PARITIES)
        s.stop_bits = m.group("stop")


#: options whose values are secrets (never echoed, nor what follows them on error)
SECRET_OPTIONS = frozenset("PABD")


#: what shlex splits on (str.split() would split on other Unicode spaces too)
_SHLEX_SPACE = re.compile(r"[ \t\r\n]+")


def tokenize(text: str) -> list:
    """Split like a shell, with quotes, but keep backslashes (Windows paths)."""
    if '"' not in text and "'" not in text:
        # no quotes: shlex (posix, no escape, no comments) just splits on its whitespace;
        # this is the common case and 20x faster than the lexer
        return [word for word in _SHLEX_SPACE.split(text) if word]
    lexer = shlex.shlex(text, posix=True)
    lexer.whitespace_split = True
    lexer.escape = ""
    lexer.commenters = ""
    try:
        return list(lexer)
    except ValueError as exc:
        raise ConnectionStringError("ConnectionString has an unclosed quote") from exc


#: Unicode categories refused in every value: controls (NUL included), format characters
#: (invisible, bidirectional overrides), surrogates, line and paragraph separators
_BAD_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _check_chars(opt: str, value: str) -> None:
    """A value with a NUL or another control character is refused (never cut or cleaned)."""
    if value.isprintable():
        return  # every refused category is non-printable: nothing to look at
    for ch in value:
        if unicodedata.category(ch) in _BAD_CATEGORIES:
            where = f"option -{opt}" if opt else "ConnectionString"
            raise ConnectionStringError(
                f"{where}: control character U+{ord(ch):04X} is not allowed in a value"
            )


def parse_connection_string(text: str) -> ConnSettings:
    """Parse a ConnectionString; errors name the option and the allowed values."""
    if not isinstance(text, str) or not text.strip():
        raise ConnectionStringError("ConnectionString is empty")
    tokens = tokenize(text)
    s = ConnSettings()
    i = 0
    secret_seen = False
    while i < len(tokens):
        tok = tokens[i]
        i += 1
        _check_chars("", tok)
        if not tok.startswith("-") or len(tok) < 2:
            # never echo the token: it may be the second word of an unquoted password
            after = (
                f" after option {tokens[i - 3]}" if i >= 3 and tokens[i - 3].startswith("-") else ""
            )
            raise ConnectionStringError(
                f"ConnectionString: unexpected word{after}; options look like -h 127.0.0.1 "
                'and values with spaces need quotes (-P "a b")'
            )
        opt = tok[1:]
        if opt == "sp":  # the seed's example of a serial port
            opt = "S"
        if opt in _REFUSED:
            raise ConnectionStringError(f"option -{opt} is refused: {_REFUSED[opt]}")
        if opt in _FLAGS:
            s.auto_increase_invoke_id = True
            continue
        if len(opt) != 1 or opt not in "hpSaPcsnlrtgCVKvoTMABDFdGimWwfL":
            shown = (
                " (not shown: it follows a password or key)" if secret_seen else (f" {tok[:20]!r}")
            )
            raise ConnectionStringError(
                f"unknown option{shown} in ConnectionString; values with spaces need quotes"
            )
        if i >= len(tokens):
            raise ConnectionStringError(f"option -{opt} needs a value")
        value = tokens[i]
        i += 1
        _check_chars(opt, value)
        try:
            _apply(s, opt, value)
        except _Refused:
            raise
        except ConnectionStringError:
            if not secret_seen or opt in SECRET_OPTIONS:
                raise
            # the value may be the second word of an unquoted password: never echo it
            raise ConnectionStringError(
                f"option -{opt}: invalid value (not shown: it follows a password or key; "
                'values with spaces need quotes, -P "a b")'
            ) from None
        if opt in SECRET_OPTIONS:
            secret_seen = True
    _check(s)
    return s


def _combine(opt: str, logical: int, physical: int) -> int:
    """GXDLMSClient.getServerAddress: one-byte halves if both fit, else 14-bit halves."""
    if logical < 0x80 and physical < 0x80:
        return logical << 7 | physical
    if logical < 0x4000 and physical < 0x4000:
        return logical << 14 | physical
    raise ConnectionStringError(
        f"option -{opt}: logical address {logical} and physical address {physical} do not "
        "fit in a server address (each must be below 16384); note that -s after -l or -n "
        "is taken as the physical address"
    )


def _password(value: str) -> Secret:
    """-P: ASCII, or hexadecimal bytes after a 0x prefix (as Gurux's clients read it)."""
    if value.startswith("0x"):
        try:
            return Secret(bytes.fromhex(value[2:].replace(" ", "")))
        except ValueError:
            raise ConnectionStringError(
                "option -P: the value starts with 0x but is not hexadecimal "
                "(0x marks a password given in hex, e.g. -P 0x3030303030303030)"
            ) from None
    return Secret(value)


def _apply(s: ConnSettings, opt: str, value: str) -> None:
    if opt == "h":
        if not value.strip():
            raise ConnectionStringError("option -h: empty host name")
        literal = targets.ip_literal(value.strip())
        if literal is not None:
            s.host = s.address = targets.checked_address(literal)
            s.host_is_literal = True
        else:
            s.host = targets.host_name(value)
            s.address, s.host_is_literal = None, False
    elif opt == "p":
        s.port = _int("p", value, 1, 65535, "a TCP port")
    elif opt == "S":
        _serial(s, value)
    elif opt == "a":
        if value.strip().lower() == "highecdsa":
            raise _Refused(
                "option -a: HighECDSA needs certificates, which the gateway does not support"
            )
        s.authentication = _choice("a", value, AUTHENTICATIONS)
    elif opt == "P":
        s.password = _password(value)
    elif opt == "c":
        s.client_address = _int("c", value, 0, 0xFFFF, "a client address")
    elif opt == "s":
        number = _int("s", value, 0, 0x0FFFFFFF, "a server address")
        if s.server_address != DEFAULT_SERVER_ADDRESS:
            # Gurux: a second address option makes -s the physical part
            s.server_address = _combine("s", s.server_address, number)
        else:
            s.server_address = number
    elif opt == "l":
        s.logical_address = _int("l", value, 0, 0x3FFF, "a logical server address")
        s.server_address = _combine("l", s.logical_address, s.server_address)
    elif opt == "n":
        s.serial_number = _int("n", value, 0, 0x7FFFFFFF, "a serial number")
        # GXDLMSClient.getServerAddressFromSerialNumber with Gurux's default formula
        s.server_address = (1 << 14) | (s.serial_number % 10000 + 1000)
    elif opt == "r":
        referencing = _choice("r", value, ("LN", "SN"))
        if referencing != s.referencing:
            # Gurux recomputes the proposed conformance when the referencing changes,
            # dropping what an earlier -K added
            s.propose_general_protection = False
        s.referencing = referencing
    elif opt == "t":
        _choice("t", value, TRACE_LEVELS)  # checked, no effect (README: -t)
    elif opt == "g":
        s.get_list = _get_list(value)
    elif opt == "C":
        s.security = _choice("C", value, SECURITIES, {"encrypted": "Encryption"})
    elif opt == "V":
        suite = _choice("V", value, ("Suite0", "Suite1", "Suite2"), {"0": "Suite0"})
        if suite != "Suite0":
            raise _Refused(
                f"option -V: {suite} needs ECDH key agreement, which the gateway does "
                "not support; use Suite0"
            )
    elif opt == "K":
        signing = _choice(
            "K",
            value,
            (
                "None",
                "EphemeralUnifiedModel",
                "OnePassDiffieHellman",
                "StaticUnifiedModel",
                "GeneralSigning",
            ),
        )
        if signing != "None":
            raise _Refused(
                f"option -K: {signing} needs certificates, which the gateway does not "
                "support; use None"
            )
        s.propose_general_protection = True
    elif opt == "v":
        s.invocation_counter_obis = _obis("v", value)
    elif opt == "o":
        pass  # -o: accepted for compatibility, never opened (README: -o)
    elif opt == "T":
        s.system_title = _hex("T", value, (8,), False)
    elif opt == "M":
        s.meter_system_title = _hex("M", value, (8,), False)
    elif opt == "A":
        s.authentication_key = Secret(_hex("A", value, (16,), True))
    elif opt == "B":
        s.block_cipher_key = Secret(_hex("B", value, (16,), True))
    elif opt == "D":
        s.dedicated_key = Secret(_hex("D", value, (16,), True))
    elif opt == "F":
        s.initial_invocation_counter = _int("F", value, 0, 0xFFFFFFFF, "a counter")
    elif opt == "d":
        s.standard = _choice("d", value, STANDARDS)
        s.utc_to_normal_time = s.standard in ("India", "Italy", "SaudiArabia")
    elif opt == "G":
        net, sep, addr = value.partition(":")
        if not sep:
            raise ConnectionStringError(
                "option -G: expected NetworkId:PhysicalDeviceAddress (example: 1:12345678)"
            )
        text = addr.strip()
        if text.startswith("0x"):  # Gurux: 0x... is hex, anything else its ASCII bytes
            digits = text[2:]
            if len(digits) % 2:
                digits = "0" + digits
            try:
                device = bytes.fromhex(digits)
            except ValueError:
                raise ConnectionStringError(
                    f"option -G: {text!r} is not a hexadecimal physical device address"
                ) from None
        else:
            device = text.encode("ascii", "replace")
        if not device:
            raise ConnectionStringError("option -G: the physical device address is empty")
        s.gateway = (_int("G", net, 0, 255, "a network id"), device)
    elif opt == "i":
        low = value.strip().lower()
        unsupported = {n.lower(): n for n in _UNSUPPORTED_INTERFACES}
        if low in unsupported:
            raise _Refused(
                f"option -i: {unsupported[low]} is not supported by the gateway; use one of "
                + ", ".join(INTERFACES)
            )
        s.interface = _choice("i", value, INTERFACES)
    elif opt == "m":
        _int("m", value, 0, 0xFFFF, "a MAC address")  # checked, unused (PLC is refused)
    elif opt == "W":
        s.gbt_window_size = _int("W", value, 1, 63, "a window size")
        s.gbt_window_size_given = True
    elif opt == "w":
        s.hdlc_window_size = _int("w", value, 1, 7, "a window size")
    elif opt == "f":
        s.hdlc_frame_size = _int("f", value, 32, 2030, "a frame size")
    elif opt == "L":
        text = value.strip()
        if not re.fullmatch(r"[A-Za-z]{3}", text):
            raise ConnectionStringError(
                f"option -L: {value!r} is not a three-letter manufacturer id (example: LGZ)"
            )
        s.manufacturer_id = text  # as given: Gurux compares it case-sensitively ("LGZ")


def _check(s: ConnSettings) -> None:
    if s.serial_port is None and s.host is None:
        raise ConnectionStringError("ConnectionString needs -h host and -p port, or -S serial port")
    if s.serial_port is not None and s.host is not None:
        raise ConnectionStringError("options -h and -S exclude each other")
    if s.host is not None and s.port is None:
        raise ConnectionStringError("option -p (TCP port) is missing")
    if s.authentication in ("Low", "High", "HighMD5", "HighSHA1", "HighSHA256") and not s.password:
        raise ConnectionStringError(f"option -P: authentication {s.authentication} needs -P")
    needs_keys = s.security != "None" or s.authentication == "HighGMAC"
    if needs_keys:
        missing = [
            f"-{o}"
            for o, v in (
                ("T", s.system_title),
                ("A", s.authentication_key),
                ("B", s.block_cipher_key),
            )
            if v is None
        ]
        if missing:
            raise ConnectionStringError(
                f"ciphering (-C {s.security}, -a {s.authentication}) needs " + ", ".join(missing)
            )
    if s.server_address == 0:
        raise ConnectionStringError(
            "options -s/-l/-n: server address 0 is not a meter address (-s 0 alone; "
            "with -l, -s 0 is the physical part: -s 0 -l 1)"
        )
    if s.client_address == 0:
        raise ConnectionStringError("option -c: client address 0 is not allowed (1..127)")
    if s.interface == "WRAPPER":
        if s.server_address > 0xFFFF:
            raise ConnectionStringError(
                f"options -s/-l/-n: server address {s.server_address} does not fit in the "
                "16-bit WRAPPER address (0..65535)"
            )
    elif s.client_address > 0x7F:
        raise ConnectionStringError(
            f"option -c: client address {s.client_address} does not fit in the one-byte "
            "HDLC client address (1..127)"
        )
    if s.interface == "HdlcWithModeE" and s.serial_port is None:
        raise ConnectionStringError("option -i HdlcWithModeE needs a serial port (-S)")
