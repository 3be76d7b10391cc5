# SPDX-License-Identifier: GPL-2.0-or-later
"""The coalescing ``_produce`` (daemon/pika_compat.py) against a socket that counts sends."""

from __future__ import annotations

import collections

import pika
import pytest
from pika.adapters.utils import io_services_utils

from dlms2amqp.daemon import amqp, pika_compat  # noqa: F401 - amqp installs it


class CountingSocket:
    """Takes at most ``cap`` bytes per send (a full socket buffer), records each send."""

    def __init__(self, cap: int = 1 << 30, block_after: int = -1):
        self.cap = cap
        self.sends: list[bytes] = []
        self.block_after = block_after

    def send(self, data: bytes) -> int:
        if len(self.sends) == self.block_after:
            raise BlockingIOError(11, "would block")
        taken = bytes(data[: self.cap])
        self.sends.append(taken)
        return len(taken)


def transport(chunks: list[bytes], sock: CountingSocket) -> object:
    t = object.__new__(io_services_utils._AsyncPlaintextTransport)
    t._sock = sock
    t._tx_buffers = collections.deque(chunks)
    t._tx_buffered_byte_count = sum(map(len, chunks))
    return t


def test_installed_for_this_pika() -> None:
    assert pika_compat.INSTALLED, pika.__version__
    assert io_services_utils._AsyncTransportBase._produce is pika_compat._produce


def test_a_turns_frames_go_out_in_one_send_in_order() -> None:
    chunks = [b"method", b"header", b"body", b"ack"]
    sock = CountingSocket()
    t = transport(chunks, sock)
    t._produce()
    assert sock.sends == [b"methodheaderbodyack"]
    assert not t._tx_buffers and t._tx_buffered_byte_count == 0


def test_partial_sends_put_the_rest_back_in_front() -> None:
    chunks = [bytes([i]) * 10 for i in range(5)]
    sock = CountingSocket(cap=7)
    t = transport(chunks, sock)
    t._produce()
    assert b"".join(sock.sends) == b"".join(chunks)
    assert all(len(s) <= 7 for s in sock.sends) and t._tx_buffered_byte_count == 0


def test_would_block_propagates_with_the_bytes_kept() -> None:
    chunks = [b"a" * 10, b"b" * 10, b"c" * 10]
    sock = CountingSocket(cap=5, block_after=1)
    t = transport(chunks, sock)
    with pytest.raises(BlockingIOError):
        t._produce()
    # one send of 5 bytes went out; the other 25 wait, in order, for the next turn
    assert sock.sends == [b"a" * 5]
    assert b"".join(t._tx_buffers) == b"a" * 5 + b"b" * 10 + b"c" * 10
    assert t._tx_buffered_byte_count == 25


def test_large_buffers_are_joined_in_bounded_pieces() -> None:
    big = [b"x" * (100 * 1024)] * 6  # 600 KiB waiting
    sock = CountingSocket()
    t = transport(big, sock)
    t._produce()
    assert b"".join(sock.sends) == b"".join(big)
    assert max(map(len, sock.sends)) <= pika_compat.COALESCE_BYTES + 100 * 1024
    assert len(sock.sends) < len(big)


@pytest.mark.integration
def test_a_real_connection_still_talks() -> None:
    """Through the patched transport to the real broker: publish, get back, same bytes."""
    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672))
    try:
        ch = conn.channel()
        q = ch.queue_declare("", exclusive=True).method.queue
        body = bytes(range(256)) * 600  # several frames
        for i in range(20):
            ch.basic_publish("", q, body + bytes([i]))
        got = [ch.basic_get(q, auto_ack=True)[2] for _ in range(20)]
        assert got == [body + bytes([i]) for i in range(20)]
    finally:
        conn.close()


def test_tls_transport_keeps_pikas_own_loop() -> None:
    """After a would-block OpenSSL wants the same buffer again: no joining under TLS."""
    chunks = [b"method", b"header", b"body"]
    sock = CountingSocket()
    t = object.__new__(io_services_utils._AsyncSSLTransport)
    t._sock = sock
    t._tx_buffers = collections.deque(chunks)
    t._tx_buffered_byte_count = sum(map(len, chunks))
    io_services_utils._AsyncTransportBase._produce(t)
    assert sock.sends == chunks
