# SPDX-License-Identifier: GPL-2.0-or-later
"""Issue 11, the state and start-up findings, against the real daemon and broker:
a second daemon on a metrics port in use (7), state files and the HMAC key of the reply
store (8), configuration warnings (12).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .conftest import ROOT, Broker, Daemon, daemon_config, write_config


def status_req(msg_id: str) -> bytes:
    """A request the daemon answers without a meter (unknown command): proves it serves."""
    return json.dumps({"MsgID": msg_id, "Cmd": "STATUS", "ObisCode": "1.0.1.8.0.255"}).encode()


def test_second_daemon_on_the_same_metrics_port_exits_78_before_spawning(
    run_daemon: Any, broker: Broker, tmp_path: Path
) -> None:
    # Given a daemon serving, with its metrics endpoint up
    first: Daemon = run_daemon()
    inq, outq = first.cfg["InQueue"], first.cfg["OutQueue"]
    assert first.metric("dlms2amqp_workers_alive") == 2
    broker.publish(inq, status_req("before"))
    assert len(broker.get_all(outq, 1, timeout=30)) == 1
    # When a second daemon starts with the same MetricsPort (and the same queues)
    second_dir = tmp_path / "second"
    second_dir.mkdir()
    cfg2 = daemon_config(
        second_dir,
        broker,
        MetricsPort=first.cfg["MetricsPort"],
        InQueue=inq,
        OutQueue=outq,
        DebugFile="",  # everything on stderr: the test sees all it prints
    )
    path2 = write_config(second_dir, cfg2)
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "dlms2amqp.cli.daemon", "-c", str(path2)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    took = time.monotonic() - t0
    # Then it stops at once with the configuration exit code and one plain line, no traceback
    assert r.returncode == 78, r.stderr
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    plain = [
        ln
        for ln in r.stderr.splitlines()
        if ln.startswith("dlms2amqpd: ") and not ln.startswith("dlms2amqpd: warning: ")
    ]
    assert len(plain) == 1, r.stderr
    assert f"MetricsPort {first.cfg['MetricsPort']}" in plain[0] and "in use" in plain[0]
    # And it spawned no worker and never consumed
    assert "worker_started" not in r.stderr and "workers_ready" not in r.stderr, r.stderr
    assert took < 30, took
    # And the first daemon goes on serving: nothing lost
    assert first.alive()
    assert broker.consumers(inq) == 1
    for i in range(5):
        broker.publish(inq, status_req(f"after-{i}"))
    got = broker.replies(outq, 5, timeout=30)
    assert sorted(g["InMsgID"] for g in got) == [f"after-{i}" for i in range(5)]
    assert first.metric("dlms2amqp_workers_alive") == 2


# --- finding 12: configuration warnings ------------------------------------------------
def _conf(tmp_path: Path, mode: int, **keys: Any) -> Path:
    p = tmp_path / "dlms2amqp.json"
    p.write_text(json.dumps(keys))
    p.chmod(mode)
    return p


def _warnings(path: Path) -> list[str]:
    from dlms2amqp.config import config_warnings, load_config

    return config_warnings(load_config(path))


def test_no_warning_for_a_safe_configuration(tmp_path: Path) -> None:
    pw = tmp_path / "broker.pw"
    pw.write_text("s3cret\n")
    pw.chmod(0o600)
    conf = _conf(tmp_path, 0o644, HostName="127.0.0.1", PasswordFile=str(pw))
    assert _warnings(conf) == []
    # an inline password in a file only its owner can read is fine too
    assert _warnings(_conf(tmp_path, 0o600, Password="s3cret")) == []
    # localhost and ::1 are loopback; a metrics endpoint that is off is no exposure
    assert _warnings(_conf(tmp_path, 0o600, HostName="localhost")) == []
    assert _warnings(_conf(tmp_path, 0o600, HostName="::1")) == []
    assert _warnings(_conf(tmp_path, 0o600, MetricsAddress="0.0.0.0", MetricsPort=0)) == []


def test_each_exposure_gives_its_warning(tmp_path: Path) -> None:
    # an inline Password in a world-readable file
    (w,) = _warnings(_conf(tmp_path, 0o644, Password="s3cret"))
    assert "Password" in w and "every user" in w and "s3cret" not in w
    # a PasswordFile readable by others
    pw = tmp_path / "broker.pw"
    pw.write_text("s3cret\n")
    pw.chmod(0o644)
    (w,) = _warnings(_conf(tmp_path, 0o600, PasswordFile=str(pw)))
    assert "PasswordFile" in w and "0600" in w and "s3cret" not in w
    # plain AMQP to a host that is not loopback (no name resolution needed)
    (w,) = _warnings(_conf(tmp_path, 0o600, HostName="rabbit.example.net"))
    assert "plain AMQP" in w and "Tls" in w
    assert _warnings(_conf(tmp_path, 0o600, HostName="rabbit.example.net", Tls=True)) == []
    # a metrics endpoint on every address
    (w,) = _warnings(_conf(tmp_path, 0o600, MetricsAddress="0.0.0.0"))
    assert "0.0.0.0:9640" in w and "MetricsAddress" in w


def test_check_config_and_start_print_the_warnings(
    tmp_path: Path, broker: Broker, run_daemon: Any
) -> None:
    # Given a world-readable file with the broker password inline and metrics on 0.0.0.0
    cfg = daemon_config(tmp_path, broker, MetricsAddress="0.0.0.0", Password="guest")
    path = write_config(tmp_path, cfg)
    path.chmod(0o644)
    # When it is checked
    r = subprocess.run(
        [sys.executable, "-m", "dlms2amqp.cli.daemon", "-c", str(path), "--check-config"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    # Then it is valid, with both warnings on stderr
    assert r.returncode == 0, r.stderr
    warns = [ln for ln in r.stderr.splitlines() if ln.startswith("dlms2amqpd: warning: ")]
    assert len(warns) == 2, r.stderr
    assert any("Password" in w for w in warns) and any("0.0.0.0" in w for w in warns)
    # And a daemon started with it logs them (event config_warning)
    d: Daemon = run_daemon(MetricsAddress="0.0.0.0", Password="guest")
    assert d.config_path.stat().st_mode & 0o004  # written world-readable (umask 022)
    logged = [e["warning"] for e in d.events("config_warning")]
    assert len(logged) == 2, d.output()
    assert any("0.0.0.0" in w for w in logged) and any("Password" in w for w in logged)


# --- finding 8: state at rest -----------------------------------------------------------
def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_store_files_are_private_and_keyed_by_an_installation_hmac(tmp_path: Path) -> None:
    import hashlib

    from dlms2amqp.daemon.replystore import KEY_FILE, ReplyStore

    # Given a state directory someone created 0755
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    store = ReplyStore(state / "replies.sqlite3", 100)
    body = b'{"MsgID": "m1", "ConnectionString": "-c 32 -a Low -P 123456"}'
    key = store.key_for("m1", body)
    store.put(key, "r1", b"reply")
    # Then directory 0700, database, its WAL and the key 0600
    assert _mode(state) == 0o700
    for name in ("replies.sqlite3", "replies.sqlite3-wal", KEY_FILE):
        assert _mode(state / name) == 0o600, name
    secret = (state / KEY_FILE).read_bytes()
    assert len(secret) == 32
    # And the key is no digest of the body (the password cannot be tried against it)
    assert "m1" not in key and hashlib.sha256(body).hexdigest()[:32] not in key
    assert len(key) == 64
    store.close()
    # And the installation key is kept: a restart finds the reply again
    again = ReplyStore(state / "replies.sqlite3", 100)
    assert again.key_for("m1", body) == key and again.get(key) == ("r1", b"reply")
    again.close()
    assert (state / KEY_FILE).read_bytes() == secret
    # And another installation keys the same request otherwise
    other = ReplyStore(tmp_path / "other" / "replies.sqlite3", 100)
    assert other.key_for("m1", body) != key
    other.close()


def test_a_damaged_key_file_is_a_clear_error(tmp_path: Path) -> None:
    from dlms2amqp.daemon.replystore import KEY_FILE, ReplyStore
    from dlms2amqp.errors import ConfigError

    state = tmp_path / "state"
    state.mkdir()
    (state / KEY_FILE).write_bytes(b"short")
    try:
        ReplyStore(state / "replies.sqlite3", 100)
    except ConfigError as e:
        assert KEY_FILE in str(e) and "delete it" in str(e)
    else:
        raise AssertionError("no error for a damaged key")


def test_reply_store_is_bounded_by_bytes(tmp_path: Path) -> None:
    from dlms2amqp.daemon.replystore import ReplyStore

    path = tmp_path / "state" / "replies.sqlite3"
    # Given a store of at most 200 kB of (compressed) bodies and 1000 replies
    store = ReplyStore(path, capacity=1000, max_bytes=200_000)
    keys = [store.key_for(str(i), b"b") for i in range(100)]
    for i, k in enumerate(keys):
        store.put(k, f"r{i}", os.urandom(10_000))  # incompressible: 10 kB each
        assert store.size_bytes <= 200_000 + 10_100
    # Then the newest replies are kept, the oldest went first, the bytes are within bound
    assert store.get(keys[-1]) is not None and store.get(keys[0]) is None
    assert 10 <= len(store) <= 20
    assert store.size_bytes <= 200_000
    held = store.size_bytes
    store.close()
    # And a restart counts the bytes already held
    again = ReplyStore(path, capacity=1000, max_bytes=200_000)
    assert again.size_bytes == held
    again.put(again.key_for("x", b"b"), "rx", os.urandom(150_000))
    assert again.size_bytes <= 200_000 and again.get(again.key_for("x", b"b")) is not None
    again.close()


def test_daemon_state_is_private_and_holds_no_password(
    run_daemon: Any, broker: Broker, tmp_path: Path
) -> None:
    # Given a running daemon (its StateDir created by it)
    d: Daemon = run_daemon()
    inq, outq = d.cfg["InQueue"], d.cfg["OutQueue"]
    pw = "654321"
    body = json.dumps(
        {
            "MsgID": "secret-1",
            "Cmd": "READ",
            "ObisCode": "1.0.1.8.0.255",
            "ConnectionString": f"-h 127.0.0.1 -p 1 -c 32 -a Low -P {pw}",
        }
    ).encode()
    # When a request with a meter password is answered (no meter there: notok)
    broker.publish(inq, body)
    assert broker.replies(outq, 1, timeout=40)[0]["InMsgID"] == "secret-1"
    # Then the state directory is 0700 and every file in it 0600
    state = Path(d.cfg["StateDir"])
    assert _mode(state) == 0o700
    files = [p for p in state.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"replies.sqlite3", "replystore.key"}
    for p in files:
        assert _mode(p) == 0o600, p
    # And neither the password nor a digest of the body is stored
    import hashlib

    digest = hashlib.sha256(body).hexdigest()[:32].encode()
    for p in files:
        data = p.read_bytes()
        assert pw.encode() not in data and digest not in data, p


def test_dead_letter_ttl_expires_dead_letters(run_daemon: Any, broker: Broker) -> None:
    # Given DeadLetterTTL 2 s
    d: Daemon = run_daemon(DeadLetterTTL=2)
    dlq = d.cfg["InQueue"] + ".dead"
    # When a body that is no request is dead-lettered
    broker.publish(d.cfg["InQueue"], b"not json")
    deadline = time.monotonic() + 20
    while (broker.count(dlq) or 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert broker.count(dlq) == 1
    # Then the broker drops it after the TTL
    deadline = time.monotonic() + 20
    while broker.count(dlq) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert broker.count(dlq) == 0


def test_dead_letter_ttl_on_an_existing_queue_is_a_clear_error(
    tmp_path: Path, broker: Broker
) -> None:
    # Given the dead-letter queue declared before without a TTL (the seed's way)
    cfg = daemon_config(tmp_path, broker, DeadLetterTTL=3600)
    dlq = cfg["InQueue"] + ".dead"
    broker.declare(dlq)
    path = write_config(tmp_path, cfg)
    # When the daemon wants it with x-message-ttl
    r = subprocess.run(
        [sys.executable, "-m", "dlms2amqp.cli.daemon", "-c", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=90,
    )
    # Then it stops with 78 and says which setting and what to do
    assert r.returncode == 78, r.stderr[-3000:]
    assert "DeadLetterTTL 3600" in r.stderr and dlq in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
