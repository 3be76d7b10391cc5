# SPDX-License-Identifier: GPL-2.0-or-later
"""Fault options, --procs and --utc-offset of the real simulator process."""

from __future__ import annotations

import calendar
import signal
import socket
import time
from datetime import datetime, timezone

import pytest
from gurux_dlms import GXDLMSException
from gurux_dlms.enums import SourceDiagnostic
from gurux_dlms.objects import GXDLMSClock, GXDLMSData, GXDLMSProfileGeneric

from dlms2amqp.simulator import axdr_enc, model
from tests.helpers_sim import GuruxMeter, gurux_client, running_simulator

pytestmark = pytest.mark.integration


def _aarq_frame(client_sap: int = 16) -> bytes:
    return bytes(gurux_client(client_sap).aarqRequest()[0])


def _answer(host: str, port: int, frame: bytes, timeout: float) -> bytes | None:
    """Send one frame; the first bytes answered, or None if nothing came in time."""
    with socket.create_connection((host, port), timeout=5) as s:
        s.settimeout(timeout)
        s.sendall(frame)
        try:
            return s.recv(65536)
        except TimeoutError:
            return None


def test_latency_delays_each_reply_frame():
    with running_simulator(1, "--latency", "400") as sim:
        c = gurux_client(16)
        with GuruxMeter(c, sim.host, sim.port) as m:
            t0 = time.monotonic()
            m.connect()
            t1 = time.monotonic()
            serial = m.read(GXDLMSData("0.0.96.1.0.255"), 2)
            t2 = time.monotonic()
    assert str(serial) == model.serial_number(0)
    assert t1 - t0 >= 0.38 and t2 - t1 >= 0.38


def test_silent_accepts_but_never_answers():
    with running_simulator(1, "--silent") as sim:
        assert _answer(sim.host, sim.port, _aarq_frame(), 1.0) is None
        assert sim.proc.poll() is None


def test_garbage_is_not_a_dlms_frame():
    with running_simulator(1, "--garbage") as sim:
        data = _answer(sim.host, sim.port, _aarq_frame(), 10.0)
    assert data and data[:2] != b"\x00\x01"


def test_reset_closes_mid_session():
    with running_simulator(1, "--reset") as sim:
        c = gurux_client(16)
        with GuruxMeter(c, sim.host, sim.port) as m:
            m.connect()  # the association still works
            with pytest.raises((ConnectionError, OSError)):
                m.read(GXDLMSData("0.0.96.1.0.255"), 2)


def test_reject_auth_rejects_the_right_password():
    with running_simulator(1, "--reject-auth") as sim:
        with GuruxMeter(gurux_client(32), sim.host, sim.port) as m:
            with pytest.raises(GXDLMSException) as exc:
                m.connect()
    assert exc.value.diagnostic == SourceDiagnostic.AUTHENTICATION_FAILURE


def test_rate_affects_a_fraction_of_connections():
    with running_simulator(1, "--silent", "0.5", "--seed", "7") as sim:
        answered = sum(
            _answer(sim.host, sim.port, _aarq_frame(), 0.5) is not None for _ in range(12)
        )
    assert 1 <= answered <= 11


def test_procs_split_ports_and_sigterm_stops_all():
    with running_simulator(20, "--procs", "2") as sim:
        assert sim.ready_line == f"ready 20 meters on {sim.port}-{sim.port + 19}"
        for k in (0, 9, 10, 19):
            with GuruxMeter(gurux_client(16), sim.host, sim.port + k) as m:
                m.connect()
                assert bytes(m.read(GXDLMSData("0.0.42.0.0.255"), 2)) == (
                    model.logical_device_name(k)
                )
        sim.proc.send_signal(signal.SIGTERM)
        assert sim.proc.wait(20) == 0
    for k in (0, 19):
        with pytest.raises(OSError):
            socket.create_connection((sim.host, sim.port + k), timeout=2).close()


def test_utc_offset_clock_and_billing_at_local_midnight():
    k = 0
    start = datetime(2026, 1, 30, tzinfo=timezone.utc)
    end = datetime(2026, 2, 3, tzinfo=timezone.utc)
    with running_simulator(1, "--utc-offset", "60") as sim:
        with GuruxMeter(gurux_client(32), sim.host, sim.port) as m:
            m.connect()
            clock = GXDLMSClock()
            m.read(clock, 3)
            m.read(clock, 2)
            pg = GXDLMSProfileGeneric("1.0.98.1.0.255")
            m.read(pg, 3)
            reply = m.request(m.client.readRowsByRange(pg, start, end))
    assert clock.timeZone == -60  # Blue Book: local + deviation = UTC
    assert abs(clock.time.value.timestamp() - time.time()) < 10
    rows = [(axdr_enc.parse_datetime(bytes(r[0])), *r[1:]) for r in reply.value]
    expected = model.billing_rows(
        k, calendar.timegm(start.utctimetuple()), calendar.timegm(end.utctimetuple()), 60
    )
    assert rows == expected
    assert all((t + 3600) % 86400 == 0 for t, *_ in rows)
