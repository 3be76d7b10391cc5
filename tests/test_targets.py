# SPDX-License-Identifier: GPL-2.0-or-later
"""Meter targets (issue 11, findings 4-6): one key per meter, allow-lists, serial checks.

Pure logic with tables, plus real files, FIFOs and pseudo-terminals for the serial checks
(a FIFO proves that a refused path is never opened: a writer opening it would wake the
reader blocked on it).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dlms2amqp import logsetup
from dlms2amqp.config import build_config
from dlms2amqp.errors import ConfigError, ConnectionStringError, MeterConnectionError, RequestError
from dlms2amqp.meter import reader, targets
from dlms2amqp.meter.connstring import parse_connection_string
from dlms2amqp.meter.media import SerialMedia, open_serial_device
from dlms2amqp.meter.reader import ReaderOptions, execute
from dlms2amqp.request import ReadRequest, parse_datetime, request_from
from testing.ports import free_port

_DEAD = free_port()  # nothing listens there


def key(cs: str) -> str:
    s = parse_connection_string(cs)
    targets.prepare(s)
    return s.meter_key


# --- finding 4: one meter, one key ----------------------------------------------------
@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "127.1",
        "127.0.1",
        "0x7f.0.0.1",
        "0x7f000001",
        "2130706433",
        "0177.0.0.1",
        "localhost",
        "LOCALHOST",
        "LocalHost.",
        "::ffff:127.0.0.1",
        "[::FFFF:7f00:1]",
    ],
)
def test_spellings_of_the_local_host_are_one_meter_key(host: str) -> None:
    assert key(f"-h {host} -p 4060") == "tcp:127.0.0.1:4060"


def test_ipv6_keys_are_compressed_lower_case_in_brackets() -> None:
    assert key("-h 0:0:0:0:0:0:0:1 -p 1") == key("-h [::1] -p 1") == "tcp:[::1]:1"
    assert key("-h 2001:DB8::0:1 -p 1") == "tcp:[2001:db8::1]:1"
    assert key("-h 10.0.0.1 -p 1") != key("-h 10.0.0.2 -p 1")
    assert key("-h 10.0.0.1 -p 1") != key("-h 10.0.0.1 -p 2")


def test_serial_key_is_the_real_path(tmp_path: Path) -> None:
    master, slave = os.openpty()
    try:
        real = os.ttyname(slave)
        link = tmp_path / "meter-link"
        link.symlink_to(real)
        assert key(f"-S {link}:9600") == key(f"-S {real}") == f"serial:{real}"
        assert key(f"-S /dev/../{real.lstrip('/')}") == f"serial:{real}"
    finally:
        os.close(master)
        os.close(slave)


@pytest.mark.parametrize(
    "cs, option, code",
    [
        ("-h 127.0.0.1\0evil -p 4060", "-h", "U+0000"),
        ("-S /dev/ttyS0\0", "-S", "U+0000"),
        ('-h "127.0.0.1\nx" -p 1', "-h", "U+000A"),
        ("-h x -p 1 -c 32 -a Low -P pa\x7fss", "-P", "U+007F"),
        ("-h x -p 1 -o cache\x1b[2J", "-o", "U+001B"),
        ("-h x -p 1 -g 0.0.1.0.0.255\u202e", "-g", "U+202E"),
        ("-h x -p 1 -L LG\u200bZ", "-L", "U+200B"),
        ("-h x\u2028y -p 1", "-h", "U+2028"),
        ("-h x -p 1 -\0", "ConnectionString", "U+0000"),
    ],
)
def test_control_characters_refused_in_every_value(cs: str, option: str, code: str) -> None:
    with pytest.raises(ConnectionStringError) as e:
        parse_connection_string(cs)
    assert option in e.value.message and code in e.value.message
    assert "pa" not in e.value.message.replace("parse", "")  # a password is never echoed


@pytest.mark.parametrize(
    "host, fragment",
    [
        ("a" * 1900, "is not a host name"),
        ("a" * 64 + ".example", "is not a host name"),
        ("meter..example", "is not a host name"),
        ("-meter", "is not a host name"),
        ("me ter", "is not a host name"),
        ("0.0.0.0", "not a meter address"),
        ("0", "not a meter address"),
        ("::", "not a meter address"),
    ],
)
def test_bad_hosts_refused_with_a_message(host: str, fragment: str) -> None:
    with pytest.raises(ConnectionStringError) as e:
        parse_connection_string(f'-h "{host}" -p 1')
    assert fragment in e.value.message and e.value.message.startswith("option -h")
    assert len(e.value.message) < 300


def test_host_names_lower_case_and_idna() -> None:
    assert parse_connection_string("-h Meter7.Example.NET. -p 1").host == "meter7.example.net"
    assert parse_connection_string("-h zähler.example -p 1").host == "xn--zhler-gra.example"
    assert parse_connection_string("-h meter_7.example -p 1").host == "meter_7.example"


# --- finding 5: AllowedHosts and AllowedSerialPorts -------------------------------------
def test_host_policy_first_match_decides() -> None:
    p = targets.HostPolicy(["!10.0.0.13", "10.0.0.0/8", "meter.example.net", "*.meters.example"])
    assert p.allows(None, "10.1.2.3")
    assert not p.allows(None, "10.0.0.13")
    assert not p.allows(None, "192.168.1.1")
    assert p.allows("meter.example.net", "192.168.1.1")  # a listed name, whatever address
    assert p.allows("a.meters.example", "192.168.1.1")
    assert not p.allows("meters.example", "192.168.1.1")  # *.domain is its sub-domains
    assert not p.allows("other.example.net", "192.168.1.1")
    assert not p.allows(None, "::1")  # an IPv4 CIDR never matches an IPv6 address
    assert targets.HostPolicy(["fd00::/8"]).allows(None, "fd12::1")
    assert targets.HostPolicy().allows(None, "203.0.113.9")  # the default: anywhere
    assert not targets.HostPolicy([]).allows(None, "10.0.0.1")  # empty: nowhere


def test_a_name_resolving_into_a_refused_cidr_is_refused() -> None:
    # localhost resolves to 127.0.0.1 (from /etc/hosts, as on every Linux)
    s = parse_connection_string("-h localhost -p 6379")
    with pytest.raises(targets.TargetRefused) as e:
        targets.prepare(s, targets.HostPolicy(["!127.0.0.0/8", "*"]))
    assert e.value.message == (
        "host localhost (127.0.0.1) port 6379 is refused by the AllowedHosts setting"
    )
    s = parse_connection_string("-h localhost -p 4060")
    targets.prepare(s, targets.HostPolicy(["127.0.0.1/32"]))
    assert s.address == "127.0.0.1" and s.target_checked
    s = parse_connection_string("-h ::ffff:127.0.0.1 -p 1")  # no bypass by the mapped form
    with pytest.raises(targets.TargetRefused):
        targets.prepare(s, targets.HostPolicy(["!127.0.0.0/8", "*"]))


def test_serial_policy_globs(tmp_path: Path) -> None:
    p = targets.SerialPolicy(["/dev/ttyUSB*", "/dev/serial/by-id/*"])
    assert p.allows("/dev/ttyUSB0", "/dev/ttyUSB0")
    assert p.allows("/dev/serial/by-id/usb-FTDI-if00", "/dev/ttyUSB3")
    assert not p.allows("/dev/ttyS0", "/dev/ttyS0")
    # * does not cross a /, and .. is resolved before matching
    assert not p.allows("/dev/ttyUSB0/../../etc/passwd", "/etc/passwd")
    assert not p.allows("/dev/ttyUSB0/x", "/dev/ttyUSB0/x")
    link = tmp_path / "ttyUSB-looking"
    link.symlink_to("/etc/passwd")
    s = parse_connection_string(f"-S {link}")
    with pytest.raises(targets.TargetRefused) as e:
        targets.prepare(s, serial=targets.SerialPolicy(["/dev/tty*"]))
    assert "AllowedSerialPorts" in e.value.message and "/etc/passwd" in e.value.message


@pytest.mark.parametrize(
    "entries, fragment",
    [
        (["10.0.0.0/33"], "is not *, a CIDR"),
        (["meter 7"], "is not *, a CIDR"),
        ("10.0.0.0/8", "must be a list"),
        ([""], "non-empty"),
    ],
)
def test_allowed_hosts_config_errors_name_the_key(entries: Any, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        build_config({"AllowedHosts": entries})
    assert "AllowedHosts" in e.value.message and fragment in e.value.message


def test_allowed_serial_ports_config() -> None:
    assert build_config({}).AllowedSerialPorts == ["*"] and build_config({}).AllowedHosts == ["*"]
    with pytest.raises(ConfigError) as e:
        build_config({"AllowedSerialPorts": ["ttyUSB*"]})
    assert "AllowedSerialPorts" in e.value.message and "absolute" in e.value.message


# --- serial devices: checked before they are opened ----------------------------------
def test_regular_file_refused_and_left_alone(tmp_path: Path) -> None:
    f = tmp_path / "passwd"
    f.write_text("root:x:0:0\n")
    before = f.stat()
    with pytest.raises(MeterConnectionError) as e:
        SerialMedia(str(f))
    assert e.value.message == f"serial port {f} is not a serial device: it is a regular file"
    after = f.stat()
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)


def test_fifo_refused_without_being_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    opened = threading.Event()

    def reader_side() -> None:
        fd = os.open(fifo, os.O_RDONLY)  # blocks until somebody opens it for writing
        opened.set()
        os.close(fd)

    t = threading.Thread(target=reader_side, daemon=True)
    t.start()
    with pytest.raises(MeterConnectionError) as e:
        open_serial_device(str(fifo))
    assert "is not a serial device: it is a named pipe" in e.value.message
    time.sleep(0.3)
    assert not opened.is_set(), "the FIFO was opened for writing"
    os.close(os.open(fifo, os.O_WRONLY))  # release the reader
    t.join(5)


def test_character_device_that_is_no_tty_refused() -> None:
    with pytest.raises(MeterConnectionError) as e:
        open_serial_device("/dev/null")
    assert "/dev/null is not a serial device" in e.value.message
    with pytest.raises(MeterConnectionError) as e:
        open_serial_device("/nonexistent/ttyUSB0")
    assert e.value.message == "serial port /nonexistent/ttyUSB0 does not exist"
    with pytest.raises(MeterConnectionError) as e:
        open_serial_device("/dev")
    assert "it is a directory" in e.value.message


def test_pty_is_accepted() -> None:
    master, slave = os.openpty()
    try:
        fd = open_serial_device(os.ttyname(slave))
        assert os.isatty(fd)
        os.close(fd)
    finally:
        os.close(master)
        os.close(slave)


# --- finding 6: specific replies instead of "internal error" ----------------------------
@pytest.mark.parametrize("text", ["0001-01-01", "1969-12-31T23:59Z", "9999-12-31T23:00-05:00"])
def test_dates_out_of_range_are_a_request_error(text: str) -> None:
    with pytest.raises(RequestError) as e:
        parse_datetime(text, "dtTo")
    assert "dtTo" in e.value.message and "out of range" in e.value.message
    base = {"MsgID": "1", "Cmd": "READ", "ObisCode": "1.0.99.1.0.255", "ConnectionString": "x"}
    with pytest.raises(RequestError):
        request_from({**base, "dtTo": text})


@pytest.mark.parametrize(
    "cs, fragment",
    [
        ("-h " + "a" * 1900 + " -p {port}", "is not a host name"),
        ("-S /dev/ttyS0\0", "control character U+0000"),
        ("-S /etc/passwd", "/etc/passwd is not a serial device: it is a regular file"),
        ("-h no-such-host.invalid -p {port}", "cannot resolve host name no-such-host.invalid"),
    ],
)
def test_reader_replies_name_the_cause(cs: str, fragment: str) -> None:
    cs = cs.format(port=free_port())
    req = ReadRequest("m1", "READ", "1.0.1.8.0.255", cs, None, None)
    rep = execute(req, ReaderOptions(frame_timeout=1, request_timeout=5))
    assert rep["Status"] == "notok" and fragment in rep["Error"], rep
    assert "internal" not in rep["Error"]


def test_dead_end_long_range_read_is_a_meter_error() -> None:
    port = free_port()
    req = ReadRequest(
        "m2",
        "READ",
        "1.0.99.1.0.255",
        f"-h 127.0.0.1 -p {port}",
        None,
        parse_datetime("1970-01-01", "dtTo")[0],
    )
    rep = execute(req, ReaderOptions(frame_timeout=1, request_timeout=5))
    assert rep["Status"] == "notok" and "refused" in rep["Error"]


def test_internal_error_logs_traceback_and_msg_id_masked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_a: Any, **_k: Any) -> list:
        raise ValueError("decoder fell over near -P Canary77Secret")

    monkeypatch.setattr(reader, "_run", broken)
    log = tmp_path / "log.jsonl"
    logsetup.configure(log, "Info", process="test")
    try:
        req = ReadRequest("msg-4711", "READ", "1.0.1.8.0.255", "-h x -p 1", None, None)
        rep = execute(req, ReaderOptions())
    finally:
        logging.getLogger().handlers[:] = [
            h for h in logging.getLogger().handlers if type(h).__name__ != "_ForwardHandler"
        ]
    assert rep["Status"] == "notok"
    assert "internal error" in rep["Error"] and "ValueError" in rep["Error"]
    assert "msg-4711" in rep["Error"]
    text = log.read_text()
    assert "msg-4711" in text and "Traceback" in text and "ValueError" in text
    assert "Canary77Secret" not in text and "-P ***" in text


# --- the resolver cache and the master's asynchronous resolver ------------------------
def test_resolver_caches_answers_and_failures() -> None:
    calls: list[str] = []

    def lookup(name: str, port: int) -> str:
        calls.append(name)
        if name == "bad.example":
            raise MeterConnectionError("cannot resolve host name bad.example")
        return "192.0.2.1"

    r = targets.Resolver(ttl=60, size=2, lookup=lookup)
    assert r.resolve("a.example", 1) == r.resolve("a.example", 1) == "192.0.2.1"
    for _ in range(2):
        with pytest.raises(MeterConnectionError):
            r.resolve("bad.example", 1)
    assert calls == ["a.example", "bad.example"]
    r.resolve("c.example", 1)  # size 2: the oldest entry goes
    r.resolve("a.example", 1)
    assert calls[-1] == "a.example" and len(calls) == 4


def test_async_resolver_answers_on_the_callers_thread_and_times_out() -> None:
    posted: list[Any] = []
    timers: list[Any] = []
    release = threading.Event()

    def lookup(name: str, port: int) -> str:
        if name == "slow.example":
            release.wait(10)
        return "192.0.2.7"

    ar = targets.AsyncResolver(
        posted.append,
        lambda d, fn: timers.append(fn),
        timeout=1,
        resolver=targets.Resolver(lookup=lookup),
    )
    got: list[Any] = []
    ar.lookup("fast.example", 1, got.append)
    deadline = time.monotonic() + 5
    while not posted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert got == []  # nothing runs on the resolver thread: it is posted
    posted.pop()()
    assert got == ["192.0.2.7"]
    ar.lookup("fast.example", 1, got.append)  # cached: answered at once
    assert got == ["192.0.2.7", "192.0.2.7"]
    ar.lookup("slow.example", 1, got.append)
    timers[-1]()  # the timeout fires first
    assert isinstance(got[-1], MeterConnectionError) and "within 1 s" in got[-1].message
    release.set()
    deadline = time.monotonic() + 5
    while not posted and time.monotonic() < deadline:
        time.sleep(0.01)
    posted.pop()()  # the late answer is dropped
    assert len(got) == 3
    ar.close()


# --- fuzz: no connection string and no request field ends in "internal error" ----------
_OPTS = list("hpSaPcsnlrtgCVKvoTMABDFdGimWwfLIE") + ["sp"]
_VALUES = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        [
            "127.0.0.1",
            "localhost",
            "::1",
            "0x10",
            "0",
            "65535",
            "Low",
            "HighGMAC",
            "WRAPPER",
            "SN",
            "AuthenticationEncryption",
            "000102030405060708090A0B0C0D0E0F",
            "4775727578313233",
            "0.0.1.0.0.255:2",
            "/dev/ttyS0:9600:8None1",
            "1:0x12",
            "LGZ",
            "-1",
            "99999999999999999999",
            "0xZZ",
            "a" * 300,
            "١٢٣",
        ]
    ),  # fmt: skip
)


@st.composite
def _connection_strings(draw: Any) -> str:
    parts = ["-h", "127.0.0.1", "-p", "1"] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(0, 8))):
        parts.append("-" + draw(st.sampled_from(_OPTS)))
        if draw(st.integers(0, 9)):
            value = draw(_VALUES).replace('"', "")
            parts.append(f'"{value}"' if draw(st.booleans()) else value)
    return " ".join(parts)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(_connection_strings(), st.sampled_from(["1.0.1.8.0.255", "1.0.99.1.0.255"]))
def test_fuzz_connection_strings_give_specific_errors(cs: str, obis: str) -> None:
    try:
        s = parse_connection_string(cs)
    except ConnectionStringError:
        return
    if s.serial_port is None:
        s.host, s.address, s.host_is_literal, s.port = "127.0.0.1", "127.0.0.1", True, _DEAD
    rep = execute(
        ReadRequest("f", "READ", obis, cs, None, None),
        ReaderOptions(frame_timeout=0.3, request_timeout=1.0),
        None,
        s,
    )
    assert rep["Status"] == "notok" and "internal" not in rep["Error"].lower(), (cs, rep)


_FIELD = st.one_of(
    st.none(),
    st.text(max_size=40),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.booleans(),
    st.sampled_from(["0001-01-01", "9999-12-31", "2022-02-30", "2022-08-17T18:01:57+2400"]),
)


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.fixed_dictionaries(
        {},
        optional={k: _FIELD for k in ("MsgID", "Cmd", "ObisCode", "ConnectionString", "dtFrom")}
        | {"dtTo": _FIELD},
    )
)
def test_fuzz_request_fields_give_request_errors(data: dict) -> None:
    try:
        request_from(data)
    except RequestError:
        pass
