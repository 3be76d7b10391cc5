# SPDX-License-Identifier: GPL-2.0-or-later
"""ConnectionString parsing: every seed option, quoting, serial forms, errors, secrets."""

import pytest

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
    assert s.security == "AuthenticationEncryption" and s.suite == 0
    assert s.invocation_counter_obis == "0.0.43.1.0.255"
    assert s.auto_increase_invoke_id is True
    assert s.cache_file == "C:\\dev\\device.xml"
    assert s.system_title == bytes.fromhex("4775727578313233")
    assert s.meter_system_title == bytes.fromhex("4432410000000001")
    assert s.authentication_key.reveal() == bytes.fromhex(KEY_A)
    assert s.block_cipher_key.reveal() == bytes.fromhex(KEY_B)
    assert s.dedicated_key.reveal() == bytes.fromhex("00112233445566778899AABBCCDDEEFF")
    assert s.initial_invocation_counter == 42 and s.standard == "IDIS"
    assert s.gateway == (1, bytes.fromhex("1234")) and s.mac_address == 1
    assert (s.gbt_window_size, s.hdlc_window_size, s.hdlc_frame_size) == (2, 3, 247)
    assert s.manufacturer_id == "LGZ" and s.trace == "Verbose"
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
        ("-h x -p 1 -i PLC", "option -i: PLC is not supported"),
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
        ("-h x -p 1 -G 1:xyz", "option -G: 'xyz' is not a hexadecimal"),
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
