# SPDX-License-Identifier: GPL-2.0-or-later
"""dlms2amqp-send and dlms2amqp-dump as subprocesses against the real broker."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import ROOT, Broker, daemon_config, free_port, write_config

pytestmark = pytest.mark.integration


def request(msg_id: str, port: int = 4060) -> dict:
    return {
        "MsgID": msg_id,
        "Cmd": "READ",
        "ObisCode": "1.0.99.1.0.255",
        "ConnectionString": f"-h 127.0.0.1 -p {port} -c 32 -a Low -i WRAPPER -P CanaryPw77",
        "dtFrom": "2020-12-15T00:00:00.00+03:00",
        "dtTo": "2020-12-16T00:00:00.00+03:00",
    }


def run(
    tool: str, *args: str, stdin: bytes = b"", timeout: float = 60
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"dlms2amqp.cli.{tool}", *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_send_validates_and_publishes(tmp_path: Path, broker: Broker) -> None:
    # Given three good request files and two bad ones
    cfg = daemon_config(tmp_path, broker)
    conf = write_config(tmp_path, cfg)
    files = []
    for i in range(3):
        f = tmp_path / f"req{i}.json"
        f.write_text(json.dumps(request(f"m{i}"), indent=2))
        files.append(str(f))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    no_obis = tmp_path / "noobis.json"
    r = request("m9")
    del r["ObisCode"]
    no_obis.write_text(json.dumps(r))
    # When they are sent
    res = run("send", "-c", str(conf), *files, str(bad_json), str(no_obis), str(tmp_path / "nope"))
    err = res.stderr.decode()
    # Then the bad ones are named with their reason, not sent, and the exit code says so
    assert res.returncode == 1, err
    assert f"{bad_json}: not sent: request body is not valid JSON" in err
    assert f"{no_obis}: not sent: request field ObisCode is missing" in err
    assert "nope: cannot read" in err
    assert "3 sent" in err
    got = broker.get_all(cfg["InQueue"], 3, timeout=10)
    assert sorted(json.loads(b)["MsgID"] for _m, _p, b in got) == ["m0", "m1", "m2"]
    for _m, props, _b in got:
        assert props.delivery_mode == 2 and props.content_type == "application/json"
    assert broker.count(cfg["InQueue"]) == 0
    assert "CanaryPw77" not in err


def test_send_stdin_json_lines(tmp_path: Path, broker: Broker) -> None:
    cfg = daemon_config(tmp_path, broker)
    conf = write_config(tmp_path, cfg)
    lines = b"\n".join(json.dumps(request(f"s{i}")).encode() for i in range(4)) + b"\n"
    res = run("send", "-c", str(conf), "-", stdin=lines)
    assert res.returncode == 0, res.stderr
    assert broker.count(cfg["InQueue"]) == 4


def test_send_many_files_is_fast(tmp_path: Path, broker: Broker) -> None:
    # 2,000 files here (the 10,000 are measured by tools/demo and the report)
    cfg = daemon_config(tmp_path, broker)
    conf = write_config(tmp_path, cfg)
    d = tmp_path / "reqs"
    d.mkdir()
    for i in range(2000):
        (d / f"{i}.json").write_text(json.dumps(request(str(i), 20000 + i)))
    t0 = time.monotonic()
    res = run("send", "-c", str(conf), *sorted(str(p) for p in d.iterdir()), timeout=120)
    elapsed = time.monotonic() - t0
    assert res.returncode == 0, res.stderr
    assert broker.count(cfg["InQueue"]) == 2000
    assert "2000/2000 confirmed" in res.stderr.decode()
    assert elapsed < 30, elapsed


def test_dump_prints_lines_and_acks_only_printed(tmp_path: Path, broker: Broker) -> None:
    cfg = daemon_config(tmp_path, broker)
    conf = write_config(tmp_path, cfg)
    broker.declare(cfg["OutQueue"])
    for i in range(5):
        body = json.dumps({"InMsgID": str(i), "MsgID": f"r{i}", "Status": "ok"}, indent=2)
        broker.publish(cfg["OutQueue"], body.encode())
    res = run("dump", "-c", str(conf), "--max", "2")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.decode().splitlines()
    assert [json.loads(x)["InMsgID"] for x in lines] == ["0", "1"]
    assert broker.count(cfg["OutQueue"]) == 3  # prefetched but unprinted went back
    res = run("dump", "-c", str(conf), "--timeout", "1")
    lines = res.stdout.decode().splitlines()
    assert sorted(json.loads(x)["InMsgID"] for x in lines) == ["2", "3", "4"]
    assert broker.count(cfg["OutQueue"]) == 0


def test_broker_unreachable_is_reported_without_password(tmp_path: Path, broker: Broker) -> None:
    cfg = daemon_config(tmp_path, broker, Port=free_port(), Password="BrokerCanary42")
    conf = write_config(tmp_path, cfg)
    f = tmp_path / "r.json"
    f.write_text(json.dumps(request("x")))
    for res in (run("send", "-c", str(conf), str(f)), run("dump", "-c", str(conf))):
        err = res.stderr.decode()
        assert res.returncode == 69, err
        assert "Cannot connect to broker amqp://guest@127.0.0.1" in err
        assert "connection refused: nothing listens there; check HostName and Port" in err
        assert "Error" not in err  # no exception class name (AMQPConnectorSocketConnectError)
        assert "BrokerCanary42" not in err + res.stdout.decode()
        assert "Traceback" not in err


def _readline(stream: Any, timeout: float) -> bytes:
    """One line from a child's pipe, or b"" after ``timeout`` s (never blocks forever)."""
    deadline = time.monotonic() + timeout
    buf = b""
    fd = stream.fileno()
    while not buf.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return b""
        chunk = os.read(fd, 1)
        if not chunk:
            return buf
        buf += chunk
    return buf


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_dump_follow_prints_new_replies_until_interrupted(
    tmp_path: Path, broker: Broker, signame: str
) -> None:
    cfg = daemon_config(tmp_path, broker)
    conf = write_config(tmp_path, cfg)
    broker.declare(cfg["OutQueue"])
    p = subprocess.Popen(
        [sys.executable, "-m", "dlms2amqp.cli.dump", "-c", str(conf), "--follow"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        # Given dump --follow consuming OutQueue
        deadline = time.monotonic() + 30
        while not broker.consumers(cfg["OutQueue"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert broker.consumers(cfg["OutQueue"]) == 1, "dump never consumed"
        time.sleep(2.5)  # longer than the default --timeout: --follow keeps waiting
        broker.publish(cfg["OutQueue"], b'{"InMsgID": "late", "Status": "ok"}')
        assert p.stdout is not None and p.stderr is not None
        line = _readline(p.stdout, 30)
        assert json.loads(line)["InMsgID"] == "late"
        # When it gets the signal (while waiting in the consume loop)
        p.send_signal(getattr(signal, signame))
        # Then it stops within a second or two, exit 0, with its summary and no traceback
        assert p.wait(15) == 0
        err = p.stderr.read().decode()
        assert "1 replies from " + cfg["OutQueue"] in err, err
        assert f"stopped by {signame}" in err and "Traceback" not in err, err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    # And it closed its connection: no consumer left, the printed reply was acked
    assert broker.consumers(cfg["OutQueue"]) == 0
    assert broker.count(cfg["OutQueue"]) == 0


def test_broker_errors_in_words_not_exception_names() -> None:
    """An unresolvable name and a refused port say what to check, not pika's class names."""
    import socket

    import pika.exceptions as pex
    from pika.adapters.utils.connection_workflow import AMQPConnectorSocketConnectError

    from dlms2amqp.config import build_config
    from dlms2amqp.daemon.amqp import broker_error

    cfg = build_config({"HostName": "meters-broker.invalid", "Password": "BrokerCanary42"})
    dns = broker_error(cfg, socket.gaierror(-2, "Name or service not known")).message
    assert dns == (
        "Cannot connect to broker amqp://guest@meters-broker.invalid:5672/: host name "
        "meters-broker.invalid does not resolve (Name or service not known); check HostName"
    )
    wrapped = pex.AMQPConnectionError(
        AMQPConnectorSocketConnectError(ConnectionRefusedError(111, "Connection refused"))
    )
    refused = broker_error(cfg, wrapped).message
    assert refused.endswith("connection refused: nothing listens there; check HostName and Port")
    for text in (dns, refused):
        assert "Error" not in text and "BrokerCanary42" not in text


def test_send_with_partitions_falls_back_to_inqueue(tmp_path: Path, broker: Broker) -> None:
    """With Partitions the requests go straight to the partition exchange, but only where
    daemons serve it (a consumer on the presence queue), and not for a broker user who may
    write to InQueue only (403): there they go to InQueue, which the daemons move from."""
    cfg = daemon_config(tmp_path, broker, Partitions=2)
    inq = cfg["InQueue"]
    f = tmp_path / "req.json"
    f.write_text(json.dumps(request("p1")))
    # no daemon ever ran: no exchange -> InQueue
    cp = run("send", "-c", str(write_config(tmp_path, cfg)), str(f))
    assert cp.returncode == 0, cp.stderr
    assert f"1 sent to {inq}," in cp.stderr.decode()
    # an exchange and a presence queue with a consumer, as a daemon leaves them (a direct
    # exchange stands for the consistent-hash one here), and a sender allowed InQueue only
    conn = broker.connection()
    ch = conn.channel()
    ch.exchange_declare(inq + ".partitions", "direct", durable=True)
    broker.exchanges.append(inq + ".partitions")
    ch.queue_declare(inq + ".daemons", durable=True)
    broker.created.append(inq + ".daemons")
    ch.basic_consume(inq + ".daemons", lambda *_a: None)
    user = "d2a-sender-" + inq.split(".")[1]
    ctl = ["rabbitmqctl", "-q"]
    subprocess.run([*ctl, "add_user", user, "SenderPw55"], check=True, capture_output=True)
    try:
        name = inq.replace(".", r"\.")
        perms = [f"^{name}(\\.daemons|\\.partitions)?$", f"^({name}|amq\\.default)$", "^$"]
        subprocess.run([*ctl, "set_permissions", "-p", "/", user, *perms], check=True)
        restricted = write_config(
            tmp_path, {**cfg, "UserName": user, "Password": "", "PasswordEnv": "D2A_SENDER_PW"}
        )
        cp = subprocess.run(
            [sys.executable, "-m", "dlms2amqp.cli.send", "-c", str(restricted), str(f)],
            capture_output=True,
            timeout=60,
            cwd=ROOT,
            env={**os.environ, "D2A_SENDER_PW": "SenderPw55"},
        )
        err = cp.stderr.decode()
        assert cp.returncode == 0, err
        assert "403" in err and f"sending to {inq} instead" in err and "SenderPw55" not in err
        assert f"1 sent to {inq}," in err
        assert broker.count(inq) == 2  # both sends are in InQueue, for the daemons to move
    finally:
        subprocess.run([*ctl, "delete_user", user], capture_output=True)
        conn.close()
