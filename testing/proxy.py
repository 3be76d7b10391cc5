# SPDX-License-Identifier: GPL-2.0-or-later
"""``TcpProxy``: a selectors-based TCP relay the test controls.

In front of the broker it simulates a silent network cut (``blackhole()``: bytes are
swallowed, sockets stay open); in front of the meters it counts DLMS associations (AARQ)
and completed reads (GET responses) per meter port, because the simulator has no
per-meter session log.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, cast

# --- TCP proxy --------------------------------------------------------------------------------
WRAPPER_HEADER = 8
TAG_AARQ = 0x60
TAG_GET_RESPONSE = 0xC4


class _Stream:
    """Splits a WRAPPER byte stream into APDUs (first byte = tag); tolerant of garbage."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[int]:
        self.buf += data
        tags = []
        while len(self.buf) >= WRAPPER_HEADER:
            if self.buf[0:2] != b"\x00\x01":
                self.buf.clear()  # not WRAPPER (garbage fault): stop parsing this stream
                break
            n = int.from_bytes(self.buf[6:8], "big")
            if len(self.buf) < WRAPPER_HEADER + n:
                break
            apdu = bytes(self.buf[WRAPPER_HEADER : WRAPPER_HEADER + n])
            del self.buf[: WRAPPER_HEADER + n]
            if apdu:
                tags.append(apdu[0])
        return tags


@dataclass
class PortStats:
    """What one meter saw through the proxy."""

    connections: int = 0
    aarqs: int = 0
    get_responses: int = 0
    sessions_with_reads: int = 0  # connections in which at least one GET was answered


class _Pair:
    def __init__(self, client: socket.socket, upstream: socket.socket, listen_port: int):
        self.client = client
        self.upstream = upstream
        self.listen_port = listen_port
        self.c2s = _Stream()
        self.s2c = _Stream()
        self.out: dict[socket.socket, bytearray] = {client: bytearray(), upstream: bytearray()}
        self.read_seen = False


class TcpProxy:
    """Relays 127.0.0.1:<listen port> to targets; counts DLMS APDUs; can blackhole.

    ``blackhole()`` keeps every socket open but swallows what arrives, like a cable cut
    somewhere in the network: neither side sees a FIN or RST, only silence.
    """

    def __init__(
        self, targets: list[int], target_host: str = "127.0.0.1", count_dlms: bool = False
    ):
        self.target_host = target_host
        self.count_dlms = count_dlms
        self.sel = selectors.DefaultSelector()
        self.listeners: dict[int, int] = {}  # listen port -> target port
        self.stats: dict[int, PortStats] = defaultdict(PortStats)  # keyed by target port
        self.pairs: list[_Pair] = []
        self.blackholed = False
        self.refuse_new = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        for t in targets:
            ls = socket.socket()
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind(("127.0.0.1", 0))
            ls.listen(256)
            ls.setblocking(False)
            self.listeners[ls.getsockname()[1]] = t
            self.sel.register(ls, selectors.EVENT_READ, ("listen", ls.getsockname()[1]))
        self.port_of = {t: lp for lp, t in self.listeners.items()}  # target -> listen port
        self.thread = threading.Thread(target=self._loop, name="tcpproxy", daemon=True)
        self.thread.start()

    # control (any thread) ---------------------------------------------------------------
    def blackhole(self) -> None:
        """Start swallowing all traffic of existing and new connections (silent cut)."""
        with self._lock:
            self.blackholed = True
            self.refuse_new = True

    def restore(self) -> None:
        """End the cut: existing (dead) connections are closed, new ones forwarded."""
        with self._lock:
            self.blackholed = False
            self.refuse_new = False
        self._wake_w.send(b"r")

    def open_connections(self) -> int:
        with self._lock:
            return len(self.pairs)

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self.thread.join(5)
        for key in list(self.sel.get_map().values()):
            with contextlib.suppress(Exception):
                cast(socket.socket, key.fileobj).close()
        self.sel.close()
        self._wake_w.close()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def total(self) -> PortStats:
        t = PortStats()
        for s in self.stats.values():
            t.connections += s.connections
            t.aarqs += s.aarqs
            t.get_responses += s.get_responses
            t.sessions_with_reads += s.sessions_with_reads
        return t

    # the loop ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            for key, _mask in self.sel.select(0.5):
                kind, arg = key.data
                try:
                    if kind == "wake":
                        with contextlib.suppress(BlockingIOError):
                            self._wake_r.recv(100)
                        if not self.blackholed:
                            # connections that lived through a cut are dead: drop them
                            for p in list(self.pairs):
                                if getattr(p, "cut", False):
                                    self._drop(p)
                    elif kind == "listen":
                        self._accept(cast(socket.socket, key.fileobj), arg)
                    else:
                        self._io(arg, cast(socket.socket, key.fileobj), _mask)
                except OSError:
                    if kind == "pair":
                        self._drop(arg)

    def _accept(self, ls: socket.socket, listen_port: int) -> None:
        try:
            c, _ = ls.accept()
        except BlockingIOError:
            return
        if self.refuse_new:
            c.close()  # the network is down: nothing reaches the other side
            return
        target = self.listeners[listen_port]
        try:
            u = socket.create_connection((self.target_host, target), timeout=5)
        except OSError:
            c.close()
            return
        c.setblocking(False)
        u.setblocking(False)
        p = _Pair(c, u, listen_port)
        with self._lock:
            self.pairs.append(p)
        self.stats[target].connections += 1
        self.sel.register(c, selectors.EVENT_READ, ("pair", p))
        self.sel.register(u, selectors.EVENT_READ, ("pair", p))

    def _io(self, p: _Pair, s: socket.socket, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            buf = p.out[s]
            n = s.send(buf)
            del buf[:n]
            if not buf:
                self.sel.modify(s, selectors.EVENT_READ, ("pair", p))
        if not mask & selectors.EVENT_READ:
            return
        data = s.recv(65536)
        if not data:
            self._drop(p)
            return
        if self.blackholed:
            p.cut = True  # type: ignore[attr-defined]
            return  # swallowed
        other = p.upstream if s is p.client else p.client
        if self.count_dlms:
            self._count(p, s is p.client, data)
        p.out[other] += data
        self.sel.modify(other, selectors.EVENT_READ | selectors.EVENT_WRITE, ("pair", p))

    def _count(self, p: _Pair, from_client: bool, data: bytes) -> None:
        st = self.stats[self.listeners[p.listen_port]]
        if from_client:
            st.aarqs += sum(1 for t in p.c2s.feed(data) if t == TAG_AARQ)
        else:
            n = sum(1 for t in p.s2c.feed(data) if t == TAG_GET_RESPONSE)
            st.get_responses += n
            if n and not p.read_seen:
                p.read_seen = True
                st.sessions_with_reads += 1

    def _drop(self, p: _Pair) -> None:
        for s in (p.client, p.upstream):
            with contextlib.suppress(Exception):
                self.sel.unregister(s)
            with contextlib.suppress(Exception):
                s.close()
        with self._lock:
            if p in self.pairs:
                self.pairs.remove(p)
