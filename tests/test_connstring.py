# SPDX-License-Identifier: GPL-2.0-or-later
"""ConnectionString parsing: every seed option, quoting, serial forms, errors, secrets."""

import pytest
from gurux_dlms import GXDLMSClient
from hypothesis import given, settings
from hypothesis import strategies as st

from dlms2amqp.errors import ConnectionStringError
from dlms2amqp.meter.connstring import parse_connection_string, tokenize
from dlms2amqp.secret import Secret

KEY_A = "D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF"
KEY_B = "000102030405060708090A0B0C0D0E0F"


def test_seed_example():
    s = parse_connection_string("-h 127.0.0.1 -p 4060 -c 32 -a Low -i WRAPPER -P 00000000")
    assert (s.host, s.port, s.client_address, s.authentication, s.interface) == (
        "127.0.0.1",
        4060,
        32,
        "Low",
        "WRAPPER",
    )
    assert isinstance(s.password, Secret) and s.password.reveal() == "00000000"
    assert s.meter_key == "tcp:127.0.0.1:4060"
    assert s.endpoint == "127.0.0.1:4060"
    assert "00000000" not in repr(s) and "00000000" not in str(s)


def test_defaults_are_gurux_defaults():
    s = parse_connection_string("-h meter -p 4059")
    assert s.client_address == 16 and s.server_address == 1
    assert s.interface == "HDLC" and s.referencing == "LN" and s.authentication == "None"
    assert s.hdlc_window_size == 1 and s.hdlc_frame_size == 128


def test_every_option():
    text = (
        f"-h 10.0.0.1 -p 4059 -a HighGMAC -P pw -c 48 -s 1 -l 1 -n 12345 -r sn -t Verbose "
        f'-g "0.0.1.0.0.255:1; 0.0.1.0.0.255:2" -C AuthenticationEncryption -V Suite0 -K None '
        f"-v 0.0.43.1.0.255 -I -o C:\\dev\\device.xml -T 4775727578313233 -M 4432410000000001 "
        f"-A {KEY_A} -B {KEY_B} -D 00112233445566778899AABBCCDDEEFF -F 42 -d IDIS -G 1:1234 "
        f"-i HDLC -m 1 -W 2 -w 3 -f 247 -L lgz"
    )
    s = parse_connection_string(text)
    assert s.referencing == "SN"
    assert s.logical_address == 1 and s.serial_number == 12345
    assert s.get_list == [("0.0.1.0.0.255", 1), ("0.0.1.0.0.255", 2)]
    assert s.security == "AuthenticationEncryption"
    assert s.invocation_counter_obis == "0.0.43.1.0.255"
    assert s.auto_increase_invoke_id is True
    assert s.system_title == bytes.fromhex("4775727578313233")
    assert s.meter_system_title == bytes.fromhex("4432410000000001")
    assert s.authentication_key.reveal() == bytes.fromhex(KEY_A)
    assert s.block_cipher_key.reveal() == bytes.fromhex(KEY_B)
    assert s.dedicated_key.reveal() == bytes.fromhex("00112233445566778899AABBCCDDEEFF")
    assert s.initial_invocation_counter == 42 and s.standard == "IDIS"
    assert s.gateway == (1, b"1234")  # Gurux: ASCII unless 0x
    assert (s.gbt_window_size, s.hdlc_window_size, s.hdlc_frame_size) == (2, 3, 247)
    assert s.gbt_window_size_given and s.propose_general_protection
    assert s.manufacturer_id == "lgz"  # as given, like Gurux
    for secret in (KEY_A, KEY_B, "pw ", "00112233445566778899"):
        assert secret.lower() not in repr(s).lower()


@pytest.mark.parametrize(
    "value, port, baud, frame",
    [
        ("COM1:9600:8None1", "COM1", 9600, (8, "None", "1")),
        ("/dev/ttyUSB0:9600:8None1", "/dev/ttyUSB0", 9600, (8, "None", "1")),
        ("/dev/pts/7:19200:7Even2", "/dev/pts/7", 19200, (7, "Even", "2")),
        ("COM3", "COM3", 9600, (8, "None", "1")),
        ("/dev/ttyS0:300", "/dev/ttyS0", 300, (8, "None", "1")),
    ],
)
def test_serial_forms(value, port, baud, frame):
    s = parse_connection_string(f"-S {value} -c 16")
    assert s.serial_port == port and s.baud_rate == baud
    assert (s.data_bits, s.parity, s.stop_bits) == frame
    assert s.meter_key == f"serial:{port}" and s.endpoint == port


def test_seed_sp_alias_and_mode_e():
    s = parse_connection_string("-r SN -c 16 -s 1 -sp COM1 -i HdlcWithModeE")
    assert s.serial_port == "COM1" and s.interface == "HdlcWithModeE"


def test_quoting_and_backslashes_kept():
    assert tokenize('-P "a b\\c" -o C:\\x.xml') == ["-P", "a b\\c", "-o", "C:\\x.xml"]


@pytest.mark.parametrize(
    "text, words",
    [
        ("", "empty"),
        ("-h x -p 1 -Z 3", "unknown option '-Z'"),
        ("-h x -p", "option -p needs a value"),
        ("-h x -p 99999", "option -p: 99999 is out of range 1..65535"),
        ("-h x -p abc", "option -p: 'abc' is not a TCP port"),
        ("-h x -p 1 -a Medium", "option -a: 'Medium' is not allowed; use one of None, Low"),
        ("-h x -p 1 -r XX", "option -r: 'XX' is not allowed; use one of LN, SN"),
        ("-h x -p 1 -i PLC", "option -i: Plc is not supported"),
        ("-h x -p 1 -i Foo", "use one of HDLC, WRAPPER, HdlcWithModeE"),
        ("-h x -p 1 -N 0.0.43.0.0.255", "option -N is refused"),
        ("-h x -p 1 -E 0.0.43.0.0.255", "option -E is refused"),
        ("-h x -p 1 -V Suite1", "option -V: Suite1 needs ECDH"),
        ("-h x -p 1 -K GeneralSigning", "option -K: GeneralSigning needs certificates"),
        ("-h x -p 1 -a Low", "authentication Low needs -P"),
        ("-h x -p 1 -C Encrypted", "needs -T, -A, -B"),
        ("-h x -p 1 -g ''", "option -g: empty list"),
        ("-h x -p 1 -g 1.2.3", "option -g: '1.2.3' is not a logical name"),
        ("-h x -p 1 -v 0.0.43.1.0.256", "option -v"),
        ("-h x -p 1 -T 0102", "option -T: 2 bytes given, expected 8"),
        ("-h x -p 1 -w 9", "option -w: 9 is out of range 1..7"),
        ("-h x -p 1 -L 12", "option -L"),
        ("-h x -p 1 -G 5", "option -G"),
        ("-h x -p 1 -G 1:0xyz", "option -G: '0xyz' is not a hexadecimal"),
        ("-h x", "option -p (TCP port) is missing"),
        ("-c 16", "needs -h host and -p port, or -S"),
        ("-h x -p 1 -S COM1", "exclude each other"),
        ("-h x -p 1 -i HdlcWithModeE", "needs a serial port"),
        ('-h x -p 1 -P "open', "unclosed quote"),
        ("h x", "unexpected word;"),
        ("-h x -p 1 -P two words", "unexpected word after option -P"),
    ],
)
def test_errors_name_the_option(text, words):
    with pytest.raises(ConnectionStringError) as info:
        parse_connection_string(text)
    assert words in str(info.value)


def test_bad_key_value_not_echoed():
    with pytest.raises(ConnectionStringError) as info:
        parse_connection_string("-h x -p 1 -A SECRETKEYZZ")
    assert "SECRETKEYZZ" not in str(info.value)
    assert "option -A" in str(info.value)


def test_unquoted_password_words_not_echoed():
    with pytest.raises(ConnectionStringError) as info:
        parse_connection_string("-h x -p 1 -P first SECONDWORD")
    assert "SECONDWORD" not in str(info.value) and "first" not in str(info.value)


_addr = GXDLMSClient.getServerAddress
_serial = GXDLMSClient.getServerAddressFromSerialNumber


@pytest.mark.parametrize(
    "options, expected",
    [
        # Gurux's example clients: start at 1; -s N replaces 1 by N, a later -s is the
        # physical part; -l L combines L with the current address as physical; -n uses
        # the serial-number formula.  Expected values from Gurux's own functions.
        ("", 1),
        ("-s 1", 1),
        ("-s 17", 17),
        ("-l 1", _addr(1, 1)),
        ("-s 0 -l 1", _addr(1, 0)),
        ("-s 17 -l 1", _addr(1, 17)),
        ("-l 1 -s 17", _addr(_addr(1, 1), 17)),
        ("-s 5 -s 7", _addr(5, 7)),
        ("-s 300 -l 2", _addr(2, 300)),
        ("-n 12345678", _serial(12345678)),
        ("-n 7", _serial(7)),
        ("-s 17 -n 12345678", _serial(12345678)),
    ],
)
def test_server_address_as_gurux_example_builds_it(options, expected):
    s = parse_connection_string(f"-h x -p 1 {options}")
    assert s.server_address == expected


def test_server_address_that_does_not_fit():
    with pytest.raises(ConnectionStringError) as info:
        parse_connection_string("-h x -p 1 -n 12345678 -s 3")
    assert "option -s" in str(info.value) and "physical" in str(info.value)
    with pytest.raises(ConnectionStringError) as info:
        parse_connection_string("-h x -p 1 -i WRAPPER -s 70000")
    assert "16-bit WRAPPER address" in str(info.value)


@pytest.mark.parametrize("options", ["-s 0", "-c 0"])
def test_address_zero_is_refused_as_gurux_does(options):
    with pytest.raises(ConnectionStringError) as info:
        parse_connection_string(f"-h x -p 1 {options}")
    assert "address 0" in str(info.value)


def test_client_address_range_depends_on_framing():
    assert parse_connection_string("-h x -p 1 -i WRAPPER -c 300").client_address == 300
    with pytest.raises(ConnectionStringError) as info:
        parse_connection_string("-h x -p 1 -c 300")
    assert "one-byte HDLC client address" in str(info.value)


def test_password_in_hex_after_0x():
    s = parse_connection_string("-h x -p 1 -a Low -P 0x3132FF")
    assert s.password.reveal() == b"12\xff"
    assert parse_connection_string("-h x -p 1 -a Low -P 0X31").password.reveal() == "0X31"
    with pytest.raises(ConnectionStringError) as info:
        parse_connection_string("-h x -p 1 -a Low -P 0xSECRETZZ")
    assert "SECRETZZ" not in str(info.value) and "option -P" in str(info.value)


@pytest.mark.parametrize("name", ["highmd5", "HighMd5", "HIGHSHA1", "HighSha256", "highgmac"])
def test_authentication_names_are_case_insensitive(name):
    text = f"-h x -p 1 -a {name} -P pw -T 4775727578313233 -A {KEY_A} -B {KEY_B}"
    assert parse_connection_string(text).authentication.lower() == name.lower()


@pytest.mark.parametrize(
    "tail, words",
    [
        ("-V Suite1", "option -V: Suite1 needs ECDH"),
        ("-V suite2", "option -V: Suite2 needs ECDH"),
        ("-K GeneralSigning", "option -K: GeneralSigning needs certificates"),
        ("-a HighECDSA", "option -a: HighECDSA needs certificates"),
        ("-i plc", "option -i: Plc is not supported"),
        ("-N 0.0.43.0.0.255", "option -N is refused"),
    ],
)
def test_refusals_keep_their_reason_after_a_key(tail, words):
    # the reason of a refused value is shown even after a secret (it echoes no raw word)
    text = f"-h x -p 1 -a Low -P secret -T 4775727578313233 -A {KEY_A} {tail}"
    with pytest.raises(ConnectionStringError) as info:
        parse_connection_string(text)
    assert words in str(info.value)
    assert "secret" not in str(info.value) and KEY_A not in str(info.value)


@pytest.mark.parametrize(
    "standard, utc", [("DLMS", False), ("India", True), ("Italy", True),
                      ("SaudiArabia", True), ("IDIS", False)]
)  # fmt: skip
def test_standard_switches_utc_handling_like_gurux(standard, utc):
    s = parse_connection_string(f"-h x -p 1 -d {standard}")
    assert s.standard == standard and s.utc_to_normal_time is utc


def test_gateway_address_hex_with_0x():
    assert parse_connection_string("-h x -p 1 -G 2:0x0A0B").gateway == (2, b"\x0a\x0b")


def test_gurux_defaults_of_the_window_options():
    s = parse_connection_string("-h x -p 1")
    assert (s.gbt_window_size, s.gbt_window_size_given) == (1, False)
    assert not s.propose_general_protection and not s.utc_to_normal_time
    s = parse_connection_string("-h x -p 1 -W 5 -w 7 -f 2030")
    assert (s.gbt_window_size, s.hdlc_window_size, s.hdlc_frame_size) == (5, 7, 2030)
    assert s.gbt_window_size_given


@pytest.mark.parametrize("tail, words", [("-t Loud", "option -t"), ("-m 70000", "option -m")])
def test_options_without_effect_still_check_their_value(tail, words):
    # -t and -m change nothing (no field keeps them) but a bad value is still refused
    with pytest.raises(ConnectionStringError) as info:
        parse_connection_string(f"-h x -p 1 {tail}")
    assert words in str(info.value)


# --- the fast paths of the parser (no quotes; printable values) and of the pipe ----------
_WORDS = st.text(alphabet=st.characters(blacklist_characters="'\""), max_size=40)


def _shlex_words(text: str) -> list:
    import shlex

    lexer = shlex.shlex(text, posix=True)
    lexer.whitespace_split = True
    lexer.escape = ""
    lexer.commenters = ""
    return list(lexer)


@settings(max_examples=300, deadline=None)
@given(_WORDS)
def test_tokenize_without_quotes_splits_exactly_like_shlex(text: str) -> None:
    # Unicode spaces other than shlex's four, controls, backslashes, '#': all kept in words
    assert tokenize(text) == _shlex_words(text)


@pytest.mark.parametrize("text", ["-h\x0b127.0.0.1", "-P a\u00a0b", "-h\u2028x"])
def test_controls_and_odd_spaces_are_refused_after_the_fast_split(text: str) -> None:
    with pytest.raises(ConnectionStringError):
        parse_connection_string(text)


def test_settings_cross_the_pipe_whole_and_secrets_stay_hidden() -> None:
    import pickle

    s = parse_connection_string(
        f"-h 10.0.0.7 -p 4059 -c 48 -a High -P 'pass word' -C AuthenticationEncryption "
        f"-T 4D4D4D0000BC614E -A {KEY_A} -B {KEY_B} -g 0.0.43.1.0.255:2 -i WRAPPER"
    )
    s.target_checked = True
    back = pickle.loads(pickle.dumps(s, protocol=pickle.HIGHEST_PROTOCOL))
    assert back == s and back.meter_key == s.meter_key
    assert isinstance(back.password, Secret) and back.password.reveal() == "pass word"
    assert back.block_cipher_key.reveal() == bytes.fromhex(KEY_B)
    assert "pass word" not in repr(back)
