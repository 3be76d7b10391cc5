# SPDX-License-Identifier: GPL-2.0-or-later
"""Serial paths through real socat pty pairs: plain HDLC and HdlcWithModeE (optical probe).

For mode E, a small probe stand-in on the reader's pty answers the IEC 62056-21
opening (identification with baud character 5 = 9600) and then relays bytes to
the simulator's pty: the reader's hand-shake and the HDLC session that follows
are both real.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import subprocess
import tempfile
import threading
import time

import orjson
import pytest

from dlms2amqp.meter.reader import ReaderOptions, execute
from dlms2amqp.request import parse_request
from dlms2amqp.simulator import model
from tests.helpers_sim import SIM_CMD

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("socat") is None, reason="socat not installed"),
]


@contextlib.contextmanager
def pty_pair(tmp: str, name: str):
    a, b = os.path.join(tmp, name + "a"), os.path.join(tmp, name + "b")
    proc = subprocess.Popen(
        ["socat", "-d", "-d", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not (os.path.exists(a) and os.path.exists(b)):
            assert time.monotonic() < deadline, "socat did not create the pty pair"
            time.sleep(0.05)
        yield os.path.realpath(a), os.path.realpath(b)
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def serial_simulator(path: str):
    sim = subprocess.Popen([*SIM_CMD, "--serial", path], stdout=subprocess.PIPE, text=True)
    try:
        assert sim.stdout.readline().startswith("ready")
        yield sim
    finally:
        sim.terminate()
        try:
            sim.wait(15)
        except subprocess.TimeoutExpired:
            sim.kill()
            sim.wait()
        sim.stdout.close()


def read(conn: str, obis: str) -> dict:
    body = {"MsgID": "s", "Cmd": "READ", "ObisCode": obis, "ConnectionString": conn}
    return execute(parse_request(orjson.dumps(body)), ReaderOptions(frame_timeout=10))


def test_hdlc_over_a_pty():
    tmp = tempfile.mkdtemp(prefix="d2a-ser-")
    try:
        with pty_pair(tmp, "m") as (meter_end, reader_end), serial_simulator(meter_end):
            reply = read(f"-S {reader_end}:9600:8None1 -c 32 -a Low -P 00000000 -i HDLC",
                         "1.0.32.7.0.255")  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert reply["Status"] == "ok", reply["Error"]
    [rec] = reply["DataRecords"]
    assert (rec["Scaler"], rec["Unit"]) == (-1, 35)
    assert 2290 <= int(rec["Value"]) <= 2310


def _probe(path: str, meter: str, seen: list, stop: threading.Event) -> None:
    """IEC 62056-21 opening on ``path``, then relay bytes between it and ``meter``."""
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
    mfd = os.open(meter, os.O_RDWR | os.O_NOCTTY)
    try:
        buf = b""
        while not buf.endswith(b"\r\n"):
            select.select([fd], [], [], 10)
            buf += os.read(fd, 64)
        seen.append(buf)
        os.write(fd, b"/D2A5SIM\r\n")
        ack = b""
        while not ack.endswith(b"\r\n"):
            select.select([fd], [], [], 10)
            ack += os.read(fd, 64)
        seen.append(ack)
        while not stop.is_set():
            r, _, _ = select.select([fd, mfd], [], [], 0.1)
            for src in r:
                data = os.read(src, 4096)
                os.write(mfd if src == fd else fd, data)
    except OSError:
        pass
    finally:
        os.close(fd)
        os.close(mfd)


def test_hdlc_with_mode_e_handshake():
    tmp = tempfile.mkdtemp(prefix="d2a-mode-e-")
    seen: list = []
    stop = threading.Event()
    try:
        with pty_pair(tmp, "m") as (meter_end, relay_end), serial_simulator(meter_end):
            with pty_pair(tmp, "r") as (probe_end, reader_end):
                t = threading.Thread(target=_probe, args=(probe_end, relay_end, seen, stop))
                t.start()
                try:
                    reply = read(f"-S {reader_end} -c 16 -i HdlcWithModeE", "0.0.96.1.0.255")
                finally:
                    stop.set()
                    t.join(10)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert seen[:2] == [b"/?!\r\n", b"\x06252\r\n"]
    assert reply["Status"] == "ok", reply["Error"]
    assert reply["DataRecords"][0]["Value"] == model.serial_number(0)


def test_missing_serial_port_is_clear():
    reply = read("-S /dev/does-not-exist:9600:8None1 -c 16 -i HDLC", "0.0.96.1.0.255")
    assert reply["Status"] == "notok"
    assert reply["Error"] == "serial port /dev/does-not-exist does not exist"
