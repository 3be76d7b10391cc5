# SPDX-License-Identifier: GPL-2.0-or-later
"""dlms2amqp-read as a real process: exit codes, output, trace masking, serial, canaries."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import orjson
import pytest

from dlms2amqp.simulator import model
from tests.helpers_sim import SIM_CMD, running_simulator

pytestmark = pytest.mark.integration
READ = [sys.executable, "-m", "dlms2amqp.cli.read"]

# canaries: fake secrets that must never appear in any output
PW = "CanaryPw7731"
KEY_A = "C0FFEE00C0FFEE00C0FFEE00C0FFEE01"
KEY_B = "BADC0DE0BADC0DE0BADC0DE0BADC0DE1"
KEY_D = "5EC12E7000112233445566778899AA42"


def run(*args, timeout=60):
    return subprocess.run([*READ, *args], capture_output=True, timeout=timeout)


def leaks(out: bytes) -> list:
    text = out.decode("utf-8", "replace")
    found = []
    for secret in (PW, KEY_A, KEY_B, KEY_D):
        for form in (secret, secret.lower(), secret.encode().hex(), secret.encode().hex().upper()):
            if form in text or form in text.replace(" ", ""):
                found.append(secret)
    return found


@pytest.fixture(scope="module")
def sim():
    with running_simulator(1, "-P", PW) as info:
        yield info


def test_register_ok_exit_0(sim):
    r = run(f"-h 127.0.0.1 -p {sim.port} -c 32 -a Low -P {PW} -i WRAPPER", "1.0.1.8.0.255")
    assert r.returncode == 0, r.stderr
    reply = orjson.loads(r.stdout)
    assert reply["Status"] == "ok" and reply["DataRecords"][0]["Unit"] == 30
    assert leaks(r.stdout + r.stderr) == []


def test_profile_with_range_and_dotnet(sim):
    r = run(
        f"-h 127.0.0.1 -p {sim.port} -c 32 -a Low -P {PW} -i WRAPPER",
        "1.0.99.1.0.255",
        "--from", "2026-01-01T00:00:00+00:00", "--to", "2026-01-01T00:15:00+00:00",
        "--datetime-format", "dotnet",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    recs = orjson.loads(r.stdout)["DataRecords"]
    assert [x["DateTime"] for x in recs[::3]] == [
        "1/1/2026 12:00:00.000 AM",
        "1/1/2026 12:15:00.000 AM",
    ]
    rows = model.load_profile_rows(0, 1767225600, 1767226500)
    assert recs[1]["Value"] == str(rows[0][2])


def test_notok_exit_1_for_dead_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    r = run(f"-h 127.0.0.1 -p {port} -c 32 -a Low -P {PW}", "1.0.1.8.0.255")
    assert r.returncode == 1
    reply = orjson.loads(r.stdout)
    assert reply["Status"] == "notok" and "refused" in reply["Error"]
    assert leaks(r.stdout + r.stderr) == []


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["-h x -p 1"],
        ["-h x -p 1", "1.0.1.8.0.255", "--from", "yesterday"],
        ["-h x -p 1", "1.0.1.8.0.255", "--timeout", "0"],
        ["-h x -p 1", "1.0.1.8.0.255", "--datetime-format", "excel"],
        [f"-h x -p 1 -P {PW}", "1.0.1.8.0.255", "extra"],
        [f"-h x -p 1 -P {PW}"],
    ],
)
def test_usage_errors_exit_2(args):
    r = run(*args)
    assert r.returncode == 2
    assert b"usage:" in r.stderr
    assert leaks(r.stdout + r.stderr) == []


def test_trace_masks_password_and_keys(sim):
    r = run(
        f"-h 127.0.0.1 -p {sim.port} -c 32 -a Low -P {PW} -i WRAPPER", "0.0.96.1.0.255", "--trace"
    )
    assert r.returncode == 0
    assert b"TX " in r.stderr and b"RX " in r.stderr
    assert b"** ** **" in r.stderr  # the AARQ's authentication value, masked
    assert leaks(r.stdout + r.stderr) == []


def test_canaries_in_every_path(sim):
    # Given requests with known fake secrets on every path: success, wrong password,
    # ciphering with fake keys, bad options, silent and garbage meters, with --trace
    gmac = (
        "-c 48 -a HighGMAC -C AuthenticationEncryption -T 4775727578313233 "
        f"-A {KEY_A} -B {KEY_B} -D {KEY_D}"
    )
    outputs = []
    base = f"-h 127.0.0.1 -p {sim.port} -i WRAPPER"
    cases = [
        (f"{base} -c 32 -a Low -P {PW}", 0),
        (f"{base} -c 32 -a Low -P {PW}x", 1),
        (f"{base} -c 32 -a High -P {PW}", 1),
        (f"{base} {gmac}", 1),
        (f"{base} -c 32 -a Low -P {PW} -A {KEY_A}Z", 1),
        (f"{base} -c 32 -a Low -P {PW} -N 0.0.43.0.0.255", 1),
    ]
    for conn, code in cases:
        r = run(conn, "1.0.1.8.0.255", "--trace", "--timeout", "10")
        assert r.returncode == code, (conn.replace(PW, "pw"), r.stdout[-300:])
        outputs.append(r.stdout + r.stderr)
    for flag in ("--silent", "--garbage"):
        with running_simulator(1, flag) as bad:
            r = run(f"-h 127.0.0.1 -p {bad.port} {gmac}", "1.0.1.8.0.255", "--trace",
                    "--timeout", "2", "--frame-timeout", "0.5")  # fmt: skip
            assert r.returncode == 1
            outputs.append(r.stdout + r.stderr)
    # Then no output holds any of them
    for out in outputs:
        assert leaks(out) == []


@pytest.mark.skipif(shutil.which("socat") is None, reason="socat not installed")
def test_serial_path_through_socat_pty_pair():
    # Given a real pty pair, the simulator serving HDLC on one end
    tmp = tempfile.mkdtemp(prefix="d2a-read-pty-")
    a, b = os.path.join(tmp, "a"), os.path.join(tmp, "b")
    socat = subprocess.Popen(
        ["socat", "-d", "-d", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
        stderr=subprocess.DEVNULL,
    )
    sim = None
    try:
        deadline = time.monotonic() + 20
        while not (os.path.exists(a) and os.path.exists(b)):
            assert time.monotonic() < deadline, "socat did not create the pty pair"
            time.sleep(0.05)
        sim = subprocess.Popen([*SIM_CMD, "--serial", a], stdout=subprocess.PIPE, text=True)
        assert sim.stdout.readline().startswith("ready")
        pts = os.path.realpath(b)
        assert pts.startswith("/dev/pts/")
        # When the reader opens the other end as a serial port
        r = run(f"-S {pts}:9600:8None1 -c 32 -a Low -P 00000000 -i HDLC", "1.0.1.8.0.255")
        serial = run(f"-S {pts}:9600:8None1 -c 16 -i HDLC", "0.0.96.1.0.255")
    finally:
        if sim is not None:
            sim.terminate()
            try:
                sim.wait(15)
            except subprocess.TimeoutExpired:
                sim.kill()
                sim.wait()
        socat.terminate()
        socat.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    # Then both reads succeed over the serial line
    assert r.returncode == 0, r.stdout[-400:]
    assert orjson.loads(r.stdout)["DataRecords"][0]["Unit"] == 30
    assert orjson.loads(serial.stdout)["DataRecords"][0]["Value"] == model.serial_number(0)


def test_invocation_counter_survives_a_process_restart(tmp_path):
    # Given a ciphered meter read by one dlms2amqp-read process with --state-dir
    gmac = (
        "-c 48 -a HighGMAC -C AuthenticationEncryption -T 4775727578313233 "
        "-A D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF -B 000102030405060708090A0B0C0D0E0F"
    )
    state = str(tmp_path)
    with running_simulator(1) as s:
        conn = f"-h 127.0.0.1 -p {s.port} -i WRAPPER {gmac}"
        first = run(conn, "1.0.1.8.0.255", "--state-dir", state)
        marks = [
            int(p.read_text())
            for p in (tmp_path / "counters").iterdir()
            if p.is_file() and not p.name.startswith(".")
        ]
        # When a new process reads again (a restart)
        second = run(conn, "1.0.1.8.0.255", "--state-dir", state)
        seen = run(f"-h 127.0.0.1 -p {s.port} -i WRAPPER -c 16", "0.0.43.1.0.255")
    # Then it continued above the persisted mark instead of resending old counters
    assert first.returncode == 0 and second.returncode == 0, second.stdout
    assert int(orjson.loads(seen.stdout)["DataRecords"][0]["Value"]) > max(marks)
