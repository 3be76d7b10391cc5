# SPDX-License-Identifier: GPL-2.0-or-later
"""Canary tests from the independent review: secrets must not leak through paths the
other suites do not cover (frame traces split over HDLC frames, connection-string errors).

Each test first proved a leak (the AARQ split over HDLC frames, words after an
unquoted password echoed in errors); both are fixed and the tests guard the fixes.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from dlms2amqp.errors import ConnectionStringError
from dlms2amqp.meter.connstring import parse_connection_string
from tests.helpers_sim import running_simulator

READ_CMD = [sys.executable, "-m", "dlms2amqp.cli.read"]
# 42 printable bytes: long enough that a 32-byte HDLC frame must split the AARQ inside it
LONG_PW = "CANARYpw0123456789abcdefghijklmnopqrstuvwx"


def _windows(secret: bytes, size: int = 6) -> list[str]:
    """Every ``size``-byte slice of the secret, as trace hex ("41 42 ..."), and as text."""
    out = []
    for i in range(len(secret) - size + 1):
        part = secret[i : i + size]
        out.append(part.hex(" ").upper())
        out.append(part.decode("latin-1"))
    return out


def _leaks(text: str, secret: bytes) -> list[str]:
    return [w for w in _windows(secret) if w in text]


def _read(
    sim_port: int, password: str, extra: str, trace: bool = True
) -> subprocess.CompletedProcess:
    conn = f"-h 127.0.0.1 -p {sim_port} -c 32 -a Low -P {password} -i HDLC {extra}"
    cmd = [*READ_CMD, conn, "0.0.1.0.0.255", "--timeout", "60"]
    if trace:
        cmd.append("--trace")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_trace_masks_password_in_one_frame() -> None:
    """Positive control: the whole AARQ in one frame, the password masked, the read works."""
    with running_simulator(1, "-P", LONG_PW, interface="HDLC") as sim:
        res = _read(sim.port, LONG_PW, "")
    assert '"Status": "ok"' in res.stdout, res.stdout + res.stderr[-2000:]
    assert "TX " in res.stderr  # the trace really ran
    assert "** **" in res.stderr  # and masked something
    assert _leaks(res.stdout + res.stderr, LONG_PW.encode()) == []


def test_trace_masks_password_split_over_hdlc_frames() -> None:
    with running_simulator(1, "-P", LONG_PW, interface="HDLC") as sim:
        res = _read(sim.port, LONG_PW, "-f 32")
    # the read itself must work (the association used segmented AARQ frames) ...
    assert '"Status": "ok"' in res.stdout, res.stdout + res.stderr[-2000:]
    assert res.stderr.count("TX ") >= 4
    # ... and no 6-byte piece of the password may appear in the trace
    assert _leaks(res.stdout + res.stderr, LONG_PW.encode()) == []


def test_wrong_password_reply_has_no_secret() -> None:
    """Rejected association: the reply says why, without either password."""
    sent = "CANARYwrongPW98765"
    with running_simulator(1, "-P", LONG_PW, interface="HDLC") as sim:
        res = _read(sim.port, sent, "")
    assert '"Status": "notok"' in res.stdout, res.stdout + res.stderr[-2000:]
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert _leaks(out, sent.encode()) == []
    assert _leaks(out, LONG_PW.encode()) == []


@pytest.mark.parametrize(
    "text",
    [
        # an unquoted password with a space: the second word is not an option
        "-h 127.0.0.1 -p 4059 -a Low -P CANARYaa CANARYbb",
        # a stray word after a key
        "-h 127.0.0.1 -p 4059 -a HighGMAC -P x -B 000102030405060708090A0B0C0D0E0F CANARYcc",
    ],
)
def test_connstring_error_hides_unquoted_secret_words(text: str) -> None:
    with pytest.raises(ConnectionStringError) as info:
        parse_connection_string(text)
    assert "CANARY" not in info.value.message
    assert "CANARY" not in repr(info.value)


@pytest.mark.parametrize(
    "text",
    [
        "-h 127.0.0.1 -p 4059 -a Low -P abc -CANARYdd",
        "-h 127.0.0.1 -p 4059 -a Low -P abc -i CANARYee",
        "-h 127.0.0.1 -p 4059 -a Low -P abc -c CANARYff",
    ],
)
def test_connstring_error_hides_dash_words_after_password(text: str) -> None:
    with pytest.raises(ConnectionStringError) as info:
        parse_connection_string(text)
    assert "CANARY" not in info.value.message
