# SPDX-License-Identifier: GPL-2.0-or-later
"""``AmqpCut``: a TCP relay in front of a broker that cuts a connection at a commit.

A commit whose outcome the daemon cannot know (the connection closes while its
``tx.commit`` is in flight) is otherwise a matter of luck: a broker node stopping at the
right millisecond.  This relay reads the AMQP 0-9-1 frames both ways and, once armed, cuts
the connection (closes both sockets) at the next commit:

- ``"before"``: the ``tx.commit`` frame is not forwarded: the broker rolls the
  transaction back when the connection goes (the request is redelivered);
- ``"after"``: the ``tx.commit`` reaches the broker but its ``tx.commit-ok`` is not
  forwarded: the broker committed, the daemon does not know.

``arm(mode, routing_key)`` cuts only the commit of a transaction that published with that
routing key (a reply to OutQueue, not a move of a request to its partition, which commits
on the same channel).  Each connection gets two relay threads; frames are forwarded whole,
so a cut falls between two frames.  Everything before the commit frame (the publishes and
the ack of the transaction) is forwarded first.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from typing import Optional

PROTOCOL_HEADER = 8  # b"AMQP\x00\x00\x09\x01", sent by the client before any frame
FRAME_METHOD = 1
TX_CLASS = 90
TX_COMMIT = 20
TX_COMMIT_OK = 21
BASIC_CLASS = 60
BASIC_PUBLISH = 40


class AmqpCut:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1"):
        self.upstream = (upstream_host, upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.mode: Optional[str] = None  # armed: "before" | "after"
        self.routing_key: Optional[str] = None  # armed for a transaction publishing to it
        self.matched: set[int] = set()  # connections (id of their pair) whose open
        #: transaction published with that key; "after": whose commit went to the broker
        self.committed: set[int] = set()
        self.cuts: list[str] = []  # the modes of the cuts made
        self.lock = threading.Lock()
        self.socks: list[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, mode: str, routing_key: Optional[str] = None) -> None:
        """Cut the next commit seen on any connection (once); with ``routing_key``, the next
        commit of a transaction that published with that key."""
        assert mode in ("before", "after")
        with self.lock:
            self.mode, self.routing_key = mode, routing_key
            self.matched.clear()
            self.committed.clear()

    def close(self) -> None:
        self.closed = True
        with contextlib.suppress(OSError):
            self.listener.close()
        for s in list(self.socks):
            with contextlib.suppress(OSError):
                s.close()

    def __enter__(self) -> AmqpCut:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- relay -------------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            up.settimeout(None)
            self.socks += [client, up]
            pair = (client, up)
            threading.Thread(target=self._pump, args=(client, up, True, pair), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, client, False, pair), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool, pair: tuple) -> None:
        buf = bytearray()
        header_left = PROTOCOL_HEADER if from_client else 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                buf += data
                if header_left:
                    n = min(header_left, len(buf))
                    dst.sendall(bytes(buf[:n]))
                    del buf[:n]
                    header_left -= n
                while len(buf) >= 7:
                    size = struct.unpack_from(">I", buf, 3)[0]
                    if len(buf) < 8 + size:
                        break
                    frame = bytes(buf[: 8 + size])
                    del buf[: 8 + size]
                    if self._cut_here(frame, from_client, id(pair)):
                        self._cut(pair)
                        return
                    dst.sendall(frame)
        except OSError:
            pass
        self._cut(pair)

    def _cut_here(self, frame: bytes, from_client: bool, conn: int) -> bool:
        if frame[0] != FRAME_METHOD or len(frame) < 11:
            return False
        cls, method = struct.unpack_from(">HH", frame, 7)
        with self.lock:
            if self.mode is None:
                return False
            if (cls, method, from_client) == (BASIC_CLASS, BASIC_PUBLISH, True):
                if self.routing_key is not None and _publish_key(frame) == self.routing_key:
                    self.matched.add(conn)
                return False
            if cls != TX_CLASS:
                return False
            wanted = self.routing_key is None or conn in self.matched
            if method == TX_COMMIT and from_client:
                self.matched.discard(conn)
                if wanted and self.mode == "after":
                    self.committed.add(conn)
                cut = wanted and self.mode == "before"
            elif method == TX_COMMIT_OK and not from_client:
                cut = self.mode == "after" and (self.routing_key is None or conn in self.committed)
                self.committed.discard(conn)
            else:
                return False
            if cut:
                self.cuts.append(self.mode)
                self.mode = None
            return cut

    def _cut(self, pair: tuple) -> None:
        for s in pair:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()


def _publish_key(frame: bytes) -> str:
    """The routing key of a basic.publish method frame (after reserved-1 and the exchange)."""
    at = 13  # 7 bytes of frame header, class and method ids, the reserved short
    at += 1 + frame[at]  # exchange (short string)
    return frame[at + 1 : at + 1 + frame[at]].decode("utf-8", "replace")
