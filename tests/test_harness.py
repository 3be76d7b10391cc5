# SPDX-License-Identifier: GPL-2.0-or-later
"""The shared harness (testing/) on the real broker: the publisher and the collector.

The daemon tests and the fault suite stand on these; here they are checked on their own:
every message confirmed and collected once, a message to no queue counted as failed.
"""

from __future__ import annotations

import time

import pytest

from testing.collector import AmqpClient, Collector
from testing.publisher import Publisher, publish

from .conftest import Broker, _broker_params


@pytest.mark.integration
def test_publisher_confirms_everything_and_collector_gets_each_once(broker: Broker) -> None:
    q = broker.queue_name("harness")
    broker.declare(q)
    messages = [(f"m{i}", f'{{"n": {i}}}'.encode()) for i in range(1200)]
    sent: list[str] = []
    # Given a window smaller than the number of messages (pipelined, several rounds)
    p = Publisher(
        _broker_params(), q, messages, on_sent=lambda mid, _t: sent.append(mid), window=100
    )
    p.start().thread.join(60)
    assert p.done() and p.error is None
    assert p.confirmed == 1200 and p.failed == []
    assert sent == [mid for mid, _ in messages]  # in order, each once
    # When the collector consumes the queue
    c = Collector(AmqpClient(_broker_params), [q]).start()
    try:
        assert c.ready.wait(30)
        deadline = time.monotonic() + 30
        while len(c.snapshot()) < 1200 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.3)  # nothing more may arrive
        got = c.snapshot()
    finally:
        c.stop()
    # Then it has every message once, with its id
    assert sorted(r.props.message_id for r in got) == sorted(mid for mid, _ in messages)
    assert {r.queue for r in got} == {q}
    assert c.error is None


@pytest.mark.integration
def test_message_to_no_queue_is_a_failure(broker: Broker) -> None:
    missing = broker.queue_name("nowhere")
    p = Publisher(_broker_params(), missing, [("a", b"{}"), ("b", b"{}")]).start()
    p.thread.join(30)
    # returned (mandatory, unroutable) then acked: counted as failed, not as confirmed
    assert sorted(p.failed) == ["a", "b"] and p.confirmed == 0
    with pytest.raises(RuntimeError, match="2 refused or returned"):
        publish(_broker_params(), missing, [("c", b"{}"), ("d", b"{}")])
