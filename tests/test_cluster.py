# SPDX-License-Identifier: GPL-2.0-or-later
"""The private 3-node cluster of testing/cluster.py: members, quorum queues, the plugin.

One cluster per test session (the ``cluster`` fixture of conftest.py; about 15 s to start).
"""

from __future__ import annotations

import time

import pika

from testing.cluster import Cluster


def test_three_running_members(cluster: Cluster) -> None:
    assert len(cluster.running_members()) == 3
    assert cluster.running_members(via=2) == cluster.running_members(via=0)
    assert cluster.start_seconds is not None
    print(f"cluster start: {cluster.start_seconds:.1f} s")


def test_quorum_queue_spans_all_nodes_and_hash_exchange_routes(cluster: Cluster) -> None:
    conn = cluster.connect()
    ch = conn.channel()
    ch.exchange_declare("t.hash", "x-consistent-hash", durable=True)
    for i in range(3):
        ch.queue_declare(f"t.p{i}", durable=True, arguments={"x-queue-type": "quorum"})
        ch.queue_bind(f"t.p{i}", "t.hash", routing_key="20")
    ch.confirm_delivery()
    for k in range(60):
        ch.basic_publish("t.hash", f"tcp:127.0.0.1:{4000 + k}", b"x", mandatory=True)
    counts = [ch.queue_declare(f"t.p{i}", passive=True).method.message_count for i in range(3)]
    conn.close()
    assert sum(counts) == 60
    assert all(c > 0 for c in counts), counts  # the hash spreads 60 keys over 3 queues
    out = cluster.nodes[0].ctl("list_queues", "-q", "name", "members").stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("t.p0"))
    assert all(n.nodename in line for n in cluster.nodes)


def test_one_node_stopped_queue_stays_available(cluster: Cluster) -> None:
    conn = pika.BlockingConnection(cluster.params(0))
    ch = conn.channel()
    ch.queue_declare("t.avail", durable=True, arguments={"x-queue-type": "quorum"})
    conn.close()
    cluster.nodes[1].stop_app()
    try:
        assert not cluster.nodes[1].amqp_ok()
        conn = pika.BlockingConnection(cluster.params(2))
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish("", "t.avail", b"y", mandatory=True)  # confirmed by 2 of 3
        assert ch.queue_declare("t.avail", passive=True).method.message_count == 1
        conn.close()
    finally:
        t0 = time.monotonic()
        cluster.nodes[1].start_app()
    assert time.monotonic() - t0 < 60
    cluster.wait_members(timeout=60)
