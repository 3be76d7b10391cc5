# SPDX-License-Identifier: GPL-2.0-or-later
"""Meter faults, ciphering and invocation counters against the real simulator."""

from __future__ import annotations

import socket
import time

import orjson
import pytest

from dlms2amqp.meter.counters import CounterStore
from dlms2amqp.meter.reader import ReaderOptions, execute
from dlms2amqp.request import parse_request
from dlms2amqp.simulator import model
from tests.helpers_sim import running_simulator

pytestmark = pytest.mark.integration
LOW = "-c 32 -a Low -P 00000000"
GMAC = (
    "-c 48 -a HighGMAC -C AuthenticationEncryption -T 4775727578313233 "
    "-A D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF -B 000102030405060708090A0B0C0D0E0F"
)


def read(port, conn=LOW, obis="1.0.1.8.0.255", interface="WRAPPER", **opts):
    body = {
        "MsgID": "f1",
        "Cmd": "READ",
        "ObisCode": obis,
        "ConnectionString": f"-h 127.0.0.1 -p {port} -i {interface} {conn}",
        "dtFrom": "2026-01-01T00:00:00Z",
        "dtTo": "2026-01-01T01:00:00Z",
    }
    opts.setdefault("frame_timeout", 10)
    opts.setdefault("request_timeout", 30)
    return execute(parse_request(orjson.dumps(body)), ReaderOptions(**opts))


def dead_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_dead_port_is_refused_connection():
    reply = read(dead_port())
    assert reply["Status"] == "notok"
    assert "refused" in reply["Error"] and "127.0.0.1:" in reply["Error"]


@pytest.mark.parametrize("interface", ["WRAPPER", "HDLC"])
def test_silent_meter_times_out_within_deadline(interface):
    with running_simulator(1, "--silent", interface=interface) as sim:
        t0 = time.monotonic()
        reply = read(sim.port, interface=interface, frame_timeout=0.5, request_timeout=3)
        took = time.monotonic() - t0
    assert reply["Status"] == "notok"
    step = "HDLC connection (SNRM)" if interface == "HDLC" else "association"
    assert reply["Error"].startswith(f"timeout during {step}")
    assert took < 3.5


def test_request_deadline_bounds_the_whole_read():
    with running_simulator(1, "--silent") as sim:
        t0 = time.monotonic()
        reply = read(sim.port, frame_timeout=5, request_timeout=1)
        assert time.monotonic() - t0 < 2.0
    assert "timeout during association" in reply["Error"]


def test_garbage_is_a_protocol_error_or_timeout():
    with running_simulator(1, "--garbage") as sim:
        reply = read(sim.port, frame_timeout=1, request_timeout=5)
    assert reply["Status"] == "notok"
    assert "is not a valid DLMS frame during association" in reply["Error"]
    assert "Traceback" not in reply["Error"] and "object at 0x" not in reply["Error"]


def test_reject_auth_is_authentication_failure():
    with running_simulator(1, "--reject-auth") as sim:
        reply = read(sim.port)
    assert reply["Status"] == "notok"
    assert "Authentication failure" in reply["Error"] or "rejected" in reply["Error"]


@pytest.fixture(scope="module", params=["WRAPPER", "HDLC"])
def sim(request):
    with running_simulator(2, interface=request.param) as info:
        info.interface = request.param
        yield info


def test_gmac_ciphered_reads_with_persisted_counter(sim, tmp_path):
    # Given the ciphering client 48 and a state directory
    first = read(sim.port, GMAC, "1.0.99.1.0.255", sim.interface, state_dir=tmp_path)
    assert first["Status"] == "ok", first["Error"]
    assert len(first["DataRecords"]) == 3 * 5
    store = CounterStore(tmp_path)
    # the counter is kept under the meter's system title, learnt from the AARE
    title = model.system_title(0).hex()
    [path] = [p for p in (tmp_path / "counters").iterdir() if p.name.startswith(title)]
    assert store.alias(f"tcp:127.0.0.1:{sim.port}") == title
    mark1 = store.load(path.name)
    # When read again, the counter used is above the persisted mark: never reused
    second = read(sim.port, GMAC, "1.0.1.8.0.255", sim.interface, state_dir=tmp_path)
    assert second["Status"] == "ok", second["Error"]
    mark2 = store.load(path.name)
    assert mark2 > mark1 > 0
    # and the meter saw counters above the first mark (no resynchronisation was needed)
    seen = read(sim.port, "-c 16", "0.0.43.1.0.255", sim.interface)
    assert mark1 < int(seen["DataRecords"][0]["Value"]) <= mark2
    # The key is not in the file name or content
    assert "000102030405" not in path.name.upper() and "D0D1D2" not in path.name.upper()


def test_gmac_with_public_counter_read(sim):
    # -v reads 0.0.43.1.0.255 through client 16 first, then uses value + 1
    k = 1
    for _ in range(2):
        reply = read(sim.port + k, GMAC + " -v 0.0.43.1.0.255", "0.0.96.1.0.255", sim.interface)
        assert reply["Status"] == "ok", reply["Error"]


def test_stale_counter_resynchronised_from_meter_answer(sim, tmp_path):
    # Given a meter that already accepted counters (previous test or a first read)
    assert read(sim.port, GMAC, interface=sim.interface)["Status"] == "ok"
    # When a gateway without memory (new state dir) starts from 1, the meter's
    # invocation-counter-error tells the expected value and the read still succeeds
    reply = read(sim.port, GMAC, interface=sim.interface, state_dir=tmp_path)
    assert reply["Status"] == "ok", reply["Error"]


def test_wrong_block_key_is_refused():
    with running_simulator(1) as s:
        bad = GMAC.replace("000102030405060708090A0B0C0D0E0F", "0F" * 16)
        reply = read(s.port, bad)
    assert reply["Status"] == "notok"
    assert "0F0F0F" not in reply["Error"].upper()


def test_counter_follows_the_meter_to_a_new_address(tmp_path):
    # Given meter 0 read with ciphering: its counter mark is kept under its system title
    with running_simulator(1) as first:
        assert read(first.port, GMAC, state_dir=tmp_path)["Status"] == "ok"
    store = CounterStore(tmp_path)
    title = model.system_title(0).hex()
    [path] = [p for p in (tmp_path / "counters").iterdir() if p.name.startswith(title)]
    mark = store.load(path.name)
    # When the same meter (same system title) answers at another address, told by -M
    with running_simulator(1) as moved:
        reply = read(moved.port, f"{GMAC} -M {title}", state_dir=tmp_path)
        seen = read(moved.port, "-c 16", "0.0.43.1.0.255")
    # Then the counters it gets continue above the mark, never from 1
    assert reply["Status"] == "ok", reply["Error"]
    assert int(seen["DataRecords"][0]["Value"]) > mark
