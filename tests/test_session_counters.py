# SPDX-License-Identifier: GPL-2.0-or-later
"""Invocation counter store: atomic, persistent, never lowered, concurrent-safe."""

import threading

from dlms2amqp.meter.counters import BLOCK, CounterPolicy, CounterStore, counter_key


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


CLIENT_TITLE = bytes.fromhex("4775727578313233")
KEY = bytes(range(16))
METER_TITLE = bytes.fromhex("4432410000000001")


def test_policy_starts_above_meter_counter_F_and_the_stored_mark(tmp_path):
    store = CounterStore(tmp_path)
    policy = CounterPolicy(store, "tcp:10.0.0.1:4059", CLIENT_TITLE, KEY)
    # Given nothing stored: the larger of the meter's counter + 1 and -F
    assert policy.start(41, None, None) == 42
    # And the block above it is on disk before it is used
    assert store.load(policy.name) == 42 + BLOCK
    other = CounterPolicy(store, "tcp:10.0.0.9:4059", CLIENT_TITLE, KEY)
    assert other.start(None, 7, None) == 7
    # And a second start of the same meter stays above what the first reserved
    assert policy.start(41, None, None) == 42 + BLOCK + 1
    # Given a mark on disk (a previous run used counters up to it): start above it
    store.reserve(policy.name, 1000)
    again = CounterPolicy(store, "tcp:10.0.0.1:4059", CLIENT_TITLE, KEY)
    assert again.start(41, 7, None) == 1001
    assert store.load(again.name) == 1001 + BLOCK


def test_policy_without_store_persists_nothing():
    policy = CounterPolicy(None, "tcp:10.0.0.1:4059", CLIENT_TITLE, KEY)
    assert policy.start(None, None, None) == 1 and policy.name is None
    policy.reserve(10_000)  # no store: nothing to write
    assert policy.learn_title(METER_TITLE, 5) == 5


def test_policy_learns_the_meter_title_and_keeps_its_counters(tmp_path):
    store = CounterStore(tmp_path)
    # Given counters already used with this meter (by its title) through another address
    titled = counter_key(METER_TITLE.hex(), CLIENT_TITLE, KEY)
    store.reserve(titled, 500)
    policy = CounterPolicy(store, "tcp:10.0.0.2:4059", CLIENT_TITLE, KEY)
    nxt = policy.start(None, None, None)  # keyed by the address until the AARE
    assert nxt == 1
    # When the AARE tells the title
    nxt = policy.learn_title(METER_TITLE, nxt)
    # Then the counter goes on above what that meter saw, under its title, and the
    # address remembers the title for the next session
    assert nxt == 501 and policy.name == titled
    assert store.load(titled) >= 501 + 4
    assert store.alias("tcp:10.0.0.2:4059") == METER_TITLE.hex()
    later = CounterPolicy(store, "tcp:10.0.0.2:4059", CLIENT_TITLE, KEY)
    assert later.start(None, None, None) > 501 and later.name == titled


def test_policy_reserves_a_block_at_a_time(tmp_path):
    store = CounterStore(tmp_path)
    policy = CounterPolicy(store, "serial:/dev/ttyUSB0", CLIENT_TITLE, KEY)
    policy.start(None, None, METER_TITLE)
    first = store.load(policy.name)
    policy.reserve(first - 10)  # well inside the block: no write
    assert store.load(policy.name) == first
    policy.reserve(first - 2)  # near its end: the next block
    assert store.load(policy.name) == first - 2 + BLOCK


def test_policy_says_when_it_took_the_meters_counter(tmp_path):
    store = CounterStore(tmp_path)
    policy = CounterPolicy(store, "tcp:10.0.0.2:4059", CLIENT_TITLE, KEY)
    # Given no -v read: our own counter, no resync
    assert policy.start(None, 5, None) == 5 and not policy.resynced
    # Given the meter's counter above -F and the stored mark (another host used the meter)
    mark = store.load(policy.name)
    assert policy.start(mark + 100, 5, None) == mark + 101 and policy.resynced
    # Given the meter's counter below our stored mark: ours wins, no resync
    assert policy.start(3, None, None) > mark + 101 and not policy.resynced
    # Without a store: above -F only
    bare = CounterPolicy(None, "tcp:10.0.0.2:4059", CLIENT_TITLE, KEY)
    assert bare.start(9, 5, None) == 10 and bare.resynced
    assert bare.start(2, 5, None) == 5 and not bare.resynced
