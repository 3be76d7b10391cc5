# SPDX-License-Identifier: GPL-2.0-or-later
"""dlms2amqpd against the real broker, on requests that need no meter.

Unknown commands, malformed bodies, bad requests, reply_to, the reply store, metrics,
SIGHUP, bad configuration, a queue declared with other arguments, a queue deleted under it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import ROOT, Broker, Daemon, daemon_config, write_config

pytestmark = pytest.mark.integration

CANARY_PW = "CanaryMeterPw31"


def req(msg_id: str, **over: Any) -> bytes:
    r = {
        "MsgID": msg_id,
        "Cmd": "READ",
        "ObisCode": "1.0.1.8.0.255",
        "ConnectionString": f"-h 127.0.0.1 -p 1 -c 32 -a Low -P {CANARY_PW}",
    }
    r.update(over)
    return json.dumps(r).encode()


def test_bad_config_exits_78_naming_key_and_file(tmp_path: Path, broker: Broker) -> None:
    cfg = daemon_config(tmp_path, broker, Workers=0)
    path = write_config(tmp_path, cfg)
    r = subprocess.run(
        [sys.executable, "-m", "dlms2amqp.cli.daemon", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert r.returncode == 78
    assert "Workers" in r.stderr and str(path) in r.stderr


def test_unknown_cmd_bad_request_and_reply_properties(run_daemon: Any, broker: Broker) -> None:
    d: Daemon = run_daemon()
    inq, outq = d.cfg["InQueue"], d.cfg["OutQueue"]
    # Given an unknown command, a request without ObisCode, and a bad connection string
    broker.publish(inq, req("u1", Cmd="WRITE"))
    broker.publish(inq, req("b1", ObisCode=None))
    # (an unknown option before the password is named; one after it is not shown, since it
    # may be the second word of an unquoted password: see test_connstring)
    broker.publish(inq, req("c1", ConnectionString=f"-Q 7 -h 127.0.0.1 -p 1 -P {CANARY_PW}"))
    got = broker.get_all(outq, 3, timeout=30)
    assert len(got) == 3
    replies = {}
    for _m, props, body in got:
        rep = json.loads(body)
        replies[rep["InMsgID"]] = rep
        # Then each reply carries the request id as correlation_id and its own MsgID
        assert props.correlation_id == rep["InMsgID"]
        assert props.message_id == rep["MsgID"]
        assert props.content_type == "application/json" and props.delivery_mode == 2
        assert set(rep) == {"InMsgID", "MsgID", "Status", "Error", "DataRecords"}
        assert rep["Status"] == "notok" and rep["DataRecords"] == []
    assert replies["u1"]["Error"].startswith("Unknown command")
    assert "ObisCode" in replies["b1"]["Error"]
    assert "-Q" in replies["c1"]["Error"]
    assert broker.count(inq) == 0
    logs = "\n".join(d.log_lines()) + d.output()
    assert CANARY_PW not in logs
    assert CANARY_PW not in json.dumps(replies)
    # unparsable requests count as cmd "other" (their Cmd is not trusted)
    assert d.metric("dlms2amqp_requests_total", 'cmd="other",status="notok"') == 2
    assert d.metric("dlms2amqp_requests_total", 'cmd="READ",status="notok"') == 1


def test_malformed_bodies_dead_lettered_with_reason(run_daemon: Any, broker: Broker) -> None:
    d: Daemon = run_daemon(MaxBodyBytes=4096)
    inq = d.cfg["InQueue"]
    bodies = {
        b"this is not json -P " + CANARY_PW.encode(): "not valid JSON",
        b'["a", "list"]': "not a JSON object",
        b'{"Cmd": "READ"}': "no MsgID",
        b'{"MsgID": "' + b"x" * 5000 + b'"}': "exceeds MaxBodyBytes",
    }
    for body in bodies:
        broker.publish(inq, body)
    dead = broker.get_all(inq + ".dead", len(bodies), timeout=30)
    assert len(dead) == len(bodies)
    for _m, props, body in dead:
        reason = props.headers["x-dlms2amqp-reason"]
        assert bodies[body] in reason, (body[:40], reason)
    # the daemon is still up and answering
    broker.publish(inq, req("after", Cmd="NOPE"))
    assert broker.replies(d.cfg["OutQueue"], 1, timeout=30)[0]["InMsgID"] == "after"
    assert d.proc is not None and d.proc.poll() is None
    assert d.metric("dlms2amqp_dead_lettered_total") == 4
    assert CANARY_PW not in "\n".join(d.log_lines()) + d.output()


def test_reply_to_and_store_answers_repeat_without_new_reply(
    run_daemon: Any, broker: Broker, tmp_path: Path
) -> None:
    d: Daemon = run_daemon()
    inq, outq = d.cfg["InQueue"], d.cfg["OutQueue"]
    mine = broker.queue_name("replyto")
    broker.declare(mine)
    # Given a request with reply_to
    body = req("r1", Cmd="STATUS")
    broker.publish(inq, body, reply_to=mine)
    first = broker.get_all(mine, 1, timeout=30)
    assert len(first) == 1 and broker.count(outq) == 0
    # When the very same request comes again (a redelivery or a publisher retry)
    broker.publish(inq, body, reply_to=mine)
    second = broker.get_all(mine, 1, timeout=30)
    # Then it is answered from the store: same reply MsgID, byte-identical body
    assert second[0][2] == first[0][2]
    assert second[0][1].message_id == first[0][1].message_id
    assert d.metric("dlms2amqp_dedup_hits_total") == 1
    # And the store survives a restart (same StateDir)
    assert d.stop() == 0
    cfg2 = dict(d.cfg)
    cfg2["MetricsPort"] = 0
    d2 = Daemon(write_config(tmp_path, cfg2, "again.json"), cfg2, broker).start()
    try:
        broker.publish(inq, body, reply_to=mine)
        third = broker.get_all(mine, 1, timeout=30)
        assert third[0][2] == first[0][2]
    finally:
        assert d2.stop() == 0


def test_reply_to_missing_queue_is_dead_lettered(run_daemon: Any, broker: Broker) -> None:
    d: Daemon = run_daemon()
    inq = d.cfg["InQueue"]
    broker.publish(inq, req("nq", Cmd="X"), reply_to="test.no.such.queue.ever")
    dead = broker.get_all(inq + ".dead", 1, timeout=30)
    assert len(dead) == 1
    assert "does not exist" in dead[0][1].headers["x-dlms2amqp-reason"]
    assert broker.count(inq) == 0


def test_sighup_reopens_log(run_daemon: Any, broker: Broker) -> None:
    d: Daemon = run_daemon()
    log = Path(d.cfg["DebugFile"])
    rotated = log.with_suffix(".1")
    os.rename(log, rotated)
    d.signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while not log.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert log.exists()
    broker.publish(d.cfg["InQueue"], req("h1", Cmd="X"))
    assert broker.replies(d.cfg["OutQueue"], 1, timeout=30)
    deadline = time.monotonic() + 10
    while '"h1"' not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert '"msg_id":"h1"' in log.read_text()
    assert '"h1"' not in rotated.read_text()


def test_existing_queue_with_other_arguments_is_a_clear_error(
    tmp_path: Path, broker: Broker
) -> None:
    cfg = daemon_config(tmp_path, broker, QueueType="quorum")
    broker.declare(cfg["InQueue"])  # an existing classic queue, as the seed made them
    d = Daemon(write_config(tmp_path, cfg), cfg, broker)
    d.start(wait=False)
    assert d.proc is not None
    rc = d.proc.wait(60)
    out = d.output()
    assert rc == 78, out
    assert f"Queue {cfg['InQueue']} already exists" in out and "QueueType" in out


def test_quorum_mode_declares_delivery_limit(run_daemon: Any, broker: Broker) -> None:
    d: Daemon = run_daemon(QueueType="quorum", DeliveryLimit=3)
    r = subprocess.run(
        ["rabbitmqctl", "-q", "list_queues", "name", "arguments"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    line = next(x for x in r.stdout.splitlines() if x.startswith(d.cfg["InQueue"] + "\t"))
    assert "x-delivery-limit" in line and "quorum" in line and "at-least-once" in line
    broker.publish(d.cfg["InQueue"], req("q1", Cmd="X"))
    assert broker.replies(d.cfg["OutQueue"], 1, timeout=30)[0]["InMsgID"] == "q1"


def _close_broker_connections(marker: str) -> int:
    """Close (server side, like close_all_connections) only the connections named marker."""
    r = subprocess.run(
        ["rabbitmqctl", "-q", "list_connections", "pid", "client_properties"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    closed = 0
    for line in r.stdout.splitlines():
        if f'"{marker}' in line:
            pid = line.split("\t", 1)[0]
            subprocess.run(
                ["rabbitmqctl", "-q", "close_connection", pid, "test: broker closes connection"],
                capture_output=True,
                timeout=60,
                check=True,
            )
            closed += 1
    return closed


def test_reconnects_after_connection_closed_by_broker(run_daemon: Any, broker: Broker) -> None:
    d: Daemon = run_daemon(ReconnectMaxDelay=1.0)
    inq, outq = d.cfg["InQueue"], d.cfg["OutQueue"]
    broker.publish(inq, req("before", Cmd="X"))
    assert broker.replies(outq, 1, timeout=30)
    # When the broker closes the daemon's connection (ConnectionClosedByBroker 320)
    assert _close_broker_connections(f"dlms2amqpd {inq} pid") == 1
    deadline = time.monotonic() + 30
    while d.metric("dlms2amqp_broker_reconnects_total") < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    # Then it reconnects and goes on answering
    assert d.metric("dlms2amqp_broker_reconnects_total") >= 1
    assert d.metric("dlms2amqp_broker_connected") == 1
    broker.publish(inq, req("after", Cmd="X"))
    assert broker.replies(outq, 1, timeout=30)[0]["InMsgID"] == "after"
    assert any(e["event"] == "broker_connection_lost" for e in d.events())


def test_poison_request_over_delivery_limit_is_dead_lettered(
    tmp_path: Path, broker: Broker
) -> None:
    from dlms2amqp.config import build_config
    from dlms2amqp.daemon import amqp

    cfg = daemon_config(tmp_path, broker, QueueType="quorum", DeliveryLimit=2)
    inq = cfg["InQueue"]
    with broker.connection() as conn:
        amqp.declare_topology(conn, build_config(cfg))
    # Given a request that was delivered twice already without an answer (as if it had
    # crashed whoever took it): x-delivery-count 2 on the next delivery
    broker.publish(inq, req("poison", Cmd="X"))
    with broker.connection() as conn:
        ch = conn.channel()
        for _ in range(2):
            deadline = time.monotonic() + 10
            method = None
            while method is None and time.monotonic() < deadline:
                method, _p, _b = ch.basic_get(inq, auto_ack=False)
            assert method is not None
            ch.basic_nack(method.delivery_tag, requeue=True)
    # When the daemon gets it
    d = Daemon(write_config(tmp_path, cfg), cfg, broker).start()
    try:
        dead = broker.get_all(inq + ".dead", 1, timeout=30)
        # Then it is dead-lettered with the reason, not read again
        assert len(dead) == 1
        assert "poison" in dead[0][1].headers["x-dlms2amqp-reason"]
        assert broker.count(cfg["OutQueue"]) == 0
        assert d.metric("dlms2amqp_dead_lettered_total", 'reason="delivery_limit"') == 1
    finally:
        assert d.stop() == 0


def test_overlong_msgid_gets_notok_reply(run_daemon: Any, broker: Broker) -> None:
    d: Daemon = run_daemon()
    broker.publish(d.cfg["InQueue"], req("é" * 200 + "x" * 10000))
    rep = broker.get_all(d.cfg["OutQueue"], 1, timeout=30)
    assert len(rep) == 1
    body = json.loads(rep[0][2])
    assert body["Status"] == "notok" and "MsgID" in body["Error"]
    assert rep[0][1].correlation_id is None  # 255-byte AMQP limit
    assert d.metric("dlms2amqp_dead_lettered_total") == 0


def test_deleted_queue_consumer_cancelled_redeclared_and_served(
    run_daemon: Any, broker: Broker
) -> None:
    d: Daemon = run_daemon(ReconnectMaxDelay=1.0)
    inq, outq = d.cfg["InQueue"], d.cfg["OutQueue"]
    # When somebody deletes InQueue under the running daemon (the broker cancels its consumer)
    with broker.connection() as c:
        c.channel().queue_delete(inq)
    deadline = time.monotonic() + 30
    while not d.events("broker_cancelled_consumer") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert d.events("broker_cancelled_consumer"), d.output()
    # Then it reconnects, declares the queue again and consumes it
    deadline = time.monotonic() + 30
    while not broker.consumers(inq) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert broker.consumers(inq) == 1
    broker.publish(inq, req("after-delete", Cmd="X"))
    assert broker.replies(outq, 1, timeout=30)[0]["InMsgID"] == "after-delete"
