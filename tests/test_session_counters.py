# SPDX-License-Identifier: GPL-2.0-or-later
"""Invocation counter store: atomic, persistent, never lowered, concurrent-safe."""

import threading

from dlms2amqp.meter.counters import CounterStore, counter_key


def test_reserve_never_lowers_and_survives_reopen(tmp_path):
    key = counter_key("tcp:127.0.0.1:4060", bytes.fromhex("4775727578313233"), b"k" * 16)
    store = CounterStore(tmp_path)
    assert store.load(key) == 0
    assert store.reserve(key, 100) == 100
    assert store.reserve(key, 50) == 100
    assert CounterStore(tmp_path).load(key) == 100
    assert not [p for p in (tmp_path / "counters").iterdir() if p.name.startswith(".tmp")]


def test_key_identity_hides_key_and_separates_keys():
    a = counter_key("m", b"\x01" * 8, b"\xaa" * 16)
    b = counter_key("m", b"\x01" * 8, b"\xbb" * 16)
    assert a != b and "aaaa" not in a and "/" not in counter_key("serial:/dev/x", b"", b"")


def test_concurrent_reserves_keep_the_maximum(tmp_path):
    store = CounterStore(tmp_path)
    threads = [threading.Thread(target=store.reserve, args=("k", n)) for n in range(1, 41)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.load("k") == 40
