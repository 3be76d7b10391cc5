# SPDX-License-Identifier: GPL-2.0-or-later
"""Pure pieces of the daemon: log redaction, the reply store, worker routing/serialisation."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from dlms2amqp import logsetup
from dlms2amqp.daemon.replystore import ReplyStore
from dlms2amqp.secret import Secret


@pytest.mark.parametrize(
    "text, secret",
    [
        ("-h 10.0.0.1 -p 4059 -c 32 -a Low -P S3cretPw", "S3cretPw"),
        ("-P 'two words' -a Low", "two words"),
        ('-P "quoted pw" -h x', "quoted pw"),
        ("-A D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF -B 000102030405060708090A0B0C0D0E0F", "D0D1D2D3"),
        ("-B 000102030405060708090A0B0C0D0E0F", "000102030405"),
        ("-D 00112233445566778899AABBCCDDEEFF", "0011223344"),
        ("amqps://adm:brokerpw@host:5671/HEX", "brokerpw"),
    ],
)
def test_redact_text_masks_secrets(text: str, secret: str) -> None:
    out = logsetup.redact_text(text)
    assert secret not in out
    assert "***" in out


def test_redact_keeps_harmless_options() -> None:
    text = "-h 10.0.0.1 -p 4059 -c 32 -s 1 -a Low -i WRAPPER"
    assert logsetup.redact_text(text) == text


def test_log_file_has_no_secrets(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    logsetup.configure(log, "Debug", process="test")
    try:
        lg = logsetup.get_logger("t")
        lg.info("one", password="pw-canary-1", connection_string="-P pw-canary-2")
        lg.info("two", note="using -P pw-canary-3 now", secret=Secret("pw-canary-4"))
        lg.info("three", settings={"Password": "pw-canary-5", "nested": ["-B pw-canary-6"]})
        lg.info("four", value=Secret("pw-canary-7"))
        try:
            pw = "pw-canary-8"  # noqa: F841 - a local that a rich traceback would show
            raise ValueError("boom")
        except ValueError:
            lg.exception("failed")
    finally:
        logsetup.configure(None, "Info")
    text = log.read_text()
    lines = [json.loads(x) for x in text.splitlines()]
    assert [x["event"] for x in lines] == ["one", "two", "three", "four", "failed"]
    assert "pw-canary" not in text
    assert "ValueError: boom" in text  # the traceback is there, without locals


def test_reopen_follows_rotation(tmp_path: Path) -> None:
    log = tmp_path / "r.log"
    logsetup.configure(log, "Info", process="test")
    try:
        logsetup.get_logger().info("before")
        log.rename(tmp_path / "r.log.1")
        logsetup.reopen()
        logsetup.get_logger().info("after")
    finally:
        logsetup.configure(None, "Info")
    assert '"after"' in log.read_text() and '"after"' not in (tmp_path / "r.log.1").read_text()


def test_reply_store_dedup_bound_and_restart(tmp_path: Path) -> None:
    path = tmp_path / "replies.sqlite3"
    store = ReplyStore(path, capacity=1000)
    k1 = store.key_for("1", b'{"MsgID": "1"}')
    assert store.get(k1) is None
    assert store.put(k1, "r-1", b"body-1") == ("r-1", b"body-1")
    # a second reply for the same request keeps the first one
    assert store.put(k1, "r-1b", b"body-1b") == ("r-1", b"body-1")
    # same MsgID, other body: another request
    k1b = store.key_for("1", b'{"MsgID": "1", "x": 2}')
    assert k1b != k1 and store.get(k1b) is None
    for i in range(2500):
        store.put(store.key_for(str(i + 10), b"b"), f"r{i}", b"x")
    store.prune()
    assert len(store) <= 1000
    assert store.get(k1) is None  # the oldest went first
    last = store.key_for("2509", b"b")
    store.close()
    again = ReplyStore(path, capacity=1000)
    assert again.get(last) == ("r2499", b"x")
    again.close()


def test_attempt_counter_survives_restart(tmp_path: Path) -> None:
    path = tmp_path / "replies.sqlite3"
    s = ReplyStore(path)
    k = s.key_for("p", b"{}")
    assert [s.count_attempt(k) for _ in range(3)] == [1, 2, 3]
    s.close()
    s = ReplyStore(path)
    assert s.count_attempt(k) == 4
    s.put(k, "r", b"b")  # answered: the counter is dropped
    assert s.count_attempt(k) == 1
    s.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_worker_pool_is_bounded_by_the_open_files_limit() -> None:
    import resource
    import subprocess
    import sys

    # Given a worker process whose hard open-files limit is 300 (set in a child process,
    # so this test process keeps its own limits)
    code = (
        "import resource\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (200, 300))\n"
        "from dlms2amqp.daemon.worker import WorkerSettings, _make_pool\n"
        "from dlms2amqp.meter.options import ReaderOptions\n"
        "s = WorkerSettings(index=0, sessions=16, idle_timeout=30, reader=ReaderOptions(),\n"
        "                   debug_file=None, log_level='Info')\n"
        "pool = _make_pool(s)\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], pool.max_sessions)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    soft, max_sessions = (int(x) for x in out.stdout.split())
    # Then the soft limit was raised to the hard one, and the pool leaves room for the
    # running sessions and the process's own files
    assert soft == 300
    assert max_sessions == 300 - 16 - 64
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] != 200


def test_ipc_messages_pickle_as_values_and_come_back_equal() -> None:
    import pickle

    from dlms2amqp.daemon import ipc
    from dlms2amqp.meter.connstring import parse_connection_string
    from dlms2amqp.request import parse_request

    body = (
        b'{"MsgID":"m1","Cmd":"READ","ObisCode":"1.0.99.1.0.255","SplitReply":true,'
        b'"ConnectionString":"-h 127.0.0.1 -p 4059 -a Low -P 12345678",'
        b'"dtFrom":"2026-11-29T00:00:00+03:00","dtTo":"2026-11-30T00:00:00"}'
    )
    req = parse_request(body)
    job = ipc.Job(7, req, parse_connection_string(req.connection_string))
    done = ipc.Done(7, "r1", b"{}", "notok", "why", 0, 0.25, ipc.PoolStats(3.0, 1.0, 2.0))
    for msg in (job, done, ipc.Started(7), ipc.Heartbeat(ipc.PoolStats(1.0)), ipc.Stop()):
        raw = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        assert pickle.loads(raw) == msg
    back = pickle.loads(pickle.dumps(job))
    assert back.request.dt_from == req.dt_from and back.request.naive_dates is True
    assert back.request.split_reply is True
    assert b"12345678" not in repr(back).encode()
