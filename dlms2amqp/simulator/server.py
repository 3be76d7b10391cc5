# SPDX-License-Identifier: GPL-2.0-or-later
"""The simulator's server: one selectors event loop, N listening ports.

``Server`` owns the sockets: one listening socket per meter, one ``Conn`` per
accepted connection (its own framing decoder and
:class:`~dlms2amqp.simulator.apdu.Session`), replies delayed by timers in the
loop (never by sleeping), and the fault options applied per connection.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import random
import selectors
import signal
import socket
import struct
import time
from typing import Callable, Optional, Union, cast

from dlms2amqp.simulator import framing, model
from dlms2amqp.simulator.apdu import Session, SimOptions, _apdu_name
from dlms2amqp.simulator.cosem import Device, MeterState

log = logging.getLogger("dlms2amqp.sim")


# --- the event loop ----------------------------------------------------------------
class Conn:
    """One accepted connection."""

    __slots__ = (
        "sock",
        "k",
        "decoder",
        "link",
        "session",
        "out",
        "silent",
        "garbage",
        "reset",
        "closed",
    )

    def __init__(self, sock, k: int, session: Session, interface: str = "WRAPPER"):
        self.sock = sock
        self.k = k
        self.decoder: Union[framing.WrapperDecoder, framing.HdlcDecoder]
        self.link: Optional[framing.HdlcLink] = None
        if interface == "HDLC":
            self.decoder = framing.HdlcDecoder()
            o = session.opts
            serial = int(model.serial_number(k))
            addresses = framing.server_addresses(o.hdlc_address, o.hdlc_physical, serial)
            window, max_info = o.hdlc_limits
            self.link = framing.HdlcLink(addresses, max_info, window)
        else:
            self.decoder = framing.WrapperDecoder()
        self.session = session
        self.out = bytearray()
        self.silent = False
        self.garbage = False
        self.reset = False
        self.closed = False


class Server:
    """N meters on consecutive ports in one selectors loop."""

    def __init__(
        self,
        device: Device,
        host: str,
        first_port: int,
        count: int,
        opts: SimOptions,
        first_k: int = 0,
    ):
        self.device = device
        self.host = host
        self.first_port = first_port
        self.count = count
        self.opts = opts
        self.first_k = first_k
        self.sel = selectors.DefaultSelector()
        self.meters: dict[int, MeterState] = {}
        self.listeners: list[socket.socket] = []
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.stopping = False
        self.rng = random.Random(opts.seed)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def meter(self, k: int) -> MeterState:
        m = self.meters.get(k)
        if m is None:
            m = MeterState(k, model.system_title(k))
            self.meters[k] = m
        return m

    def listen(self) -> None:
        """Bind every port (raises OSError naming the port that failed)."""
        for i in range(self.count):
            port = self.first_port + i
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((self.host, port))
            except OSError as e:
                s.close()
                raise OSError(e.errno, f"cannot listen on {self.host}:{port}: {e.strerror}") from e
            s.listen(64)
            s.setblocking(False)
            self.listeners.append(s)
            self.sel.register(s, selectors.EVENT_READ, self.first_k + i)
        self.sel.register(self._wake_r, selectors.EVENT_READ, None)

    def stop(self) -> None:
        """Ask the loop to stop (safe from a signal handler)."""
        self.stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def install_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, lambda *_: setattr(self, "stopping", True))

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self.timers, (time.monotonic() + delay, next(self._seq), fn))

    def run(self) -> None:
        """Serve until stop()."""
        sel = self.sel
        while not self.stopping:
            timeout = None
            if self.timers:
                timeout = max(0.0, self.timers[0][0] - time.monotonic())
            for key, mask in sel.select(timeout):
                data = key.data
                if data is None:
                    try:
                        self._wake_r.recv(4096)
                    except OSError:
                        pass
                elif isinstance(data, int):
                    self._accept(key.fileobj, data)
                else:
                    if mask & selectors.EVENT_READ:
                        self._readable(data)
                    if mask & selectors.EVENT_WRITE and not data.closed:
                        self._flush(data)
            now = time.monotonic()
            while self.timers and self.timers[0][0] <= now:
                _, _, fn = heapq.heappop(self.timers)
                fn()
        self.close()

    def close(self) -> None:
        for key in list(self.sel.get_map().values()):
            try:
                cast(socket.socket, key.fileobj).close()
            except OSError:
                pass
        self.sel.close()
        self._wake_w.close()

    def _accept(self, lsock, k: int) -> None:
        for _ in range(64):
            try:
                sock, _addr = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.warning("accept failed on meter %d: %s", k, e)
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            o = self.opts
            rng = self.rng.random
            session = Session(
                self.device,
                self.meter(k),
                o,
                reject_auth=bool(o.reject_auth and rng() < o.reject_auth),
            )
            conn = Conn(sock, k, session, o.interface)
            conn.silent = bool(o.silent and rng() < o.silent)
            conn.garbage = bool(o.garbage and rng() < o.garbage)
            if o.reset and rng() < o.reset:
                conn.reset = True
            self.sel.register(sock, selectors.EVENT_READ, conn)
            log.debug("meter %d: connection accepted", k)

    def _drop(self, conn: Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    def _readable(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except _NoPeer:
            self._pause(conn)  # pty without a peer: poll again later
            return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        if not data:
            self._drop(conn)
            return
        if conn.silent:
            return
        self._on_data(conn, data)

    def _on_data(self, conn: Conn, data: bytes) -> None:
        try:
            frames = conn.decoder.feed(data)
        except framing.FramingError as e:
            log.info("meter %d: %s; closing", conn.k, e)
            self._drop(conn)
            return
        link = conn.link
        for fr in frames:
            is_info = isinstance(fr, framing.WrapperFrame) or fr.control & 1 == 0
            if conn.reset and conn.session.associated and is_info:
                # mid-session: the first data request after the association
                self._reset_conn(conn)
                return
            if conn.garbage:
                self._send(conn, os.urandom(7) + b"\x7e\x00\xff garbage")
                continue
            if isinstance(fr, framing.WrapperFrame):
                reply = self._handle(conn, fr.source, fr.apdu)
                if reply is not None:
                    self._send(conn, framing.wrapper_encode(fr.destination, fr.source, reply))
                    more, conn.session.more = conn.session.more, []
                    for extra in more:  # the rest of a streamed GBT window
                        self._send(conn, framing.wrapper_encode(fr.destination, fr.source, extra))
                continue
            if link is None:  # an HDLC frame on a wrapper port cannot be decoded; be safe
                continue
            ignored = link.ignored
            out, delivered = link.on_frame(fr)
            if link.ignored != ignored and not ignored:
                log.info(
                    "meter %d: no answer to HDLC server address %s from client address %s "
                    "(the meter answers the forms %s)",
                    conn.k, fr.destination.hex(), fr.source.hex(),
                    ",".join(self.opts.hdlc_address),
                )  # fmt: skip
            if link.disconnected:
                link.disconnected = False
                conn.session._reset()
            for frame in out:
                self._send(conn, frame)
            if delivered is not None:
                reply = self._handle(conn, *delivered)
                if reply is not None:
                    for frame in link.reply(reply):
                        self._send(conn, frame)

    def _handle(self, conn: Conn, client_sap: int, apdu: bytes) -> Optional[bytes]:
        try:
            reply = conn.session.handle(client_sap, apdu)
        except Exception:  # never let one bad request kill 10,000 meters
            log.exception("meter %d: request handling failed", conn.k)
            reply = b"\xd8\x02\x03"
        if log.isEnabledFor(logging.DEBUG):
            # APDU names and sizes only: an AARQ carries the Low password in clear
            log.debug(
                "meter %d client %d: %s (%d bytes) -> %s (%d bytes)",
                conn.k,
                client_sap,
                _apdu_name(apdu),
                len(apdu),
                _apdu_name(reply),
                len(reply or b""),
            )
        return reply

    def _pause(self, conn: Conn, seconds: float = 0.2) -> None:
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            return

        def resume() -> None:
            if not conn.closed:
                self.sel.register(conn.sock, selectors.EVENT_READ, conn)

        self.call_later(seconds, resume)

    def _reset_conn(self, conn: Conn) -> None:
        try:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self._drop(conn)

    def _send(self, conn: Conn, data: bytes) -> None:
        if self.opts.latency_ms > 0:
            self.call_later(self.opts.latency_ms / 1000.0, lambda: self._send_now(conn, data))
        else:
            self._send_now(conn, data)

    def _send_now(self, conn: Conn, data: bytes) -> None:
        if conn.closed:
            return
        if conn.out:
            conn.out += data
            return
        try:
            n = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self._drop(conn)
            return
        if n < len(data):
            conn.out += data[n:]
            self.sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)

    def _flush(self, conn: Conn) -> None:
        try:
            n = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(conn)
            return
        del conn.out[:n]
        if not conn.out:
            self.sel.modify(conn.sock, selectors.EVENT_READ, conn)


class _NoPeer(BlockingIOError):
    """Nobody holds the other end of the tty right now."""


class _FdStream:
    """A serial device / tty behind the socket methods the loop uses."""

    def __init__(self, fd: int):
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def recv(self, n: int) -> bytes:
        try:
            return os.read(self.fd, n)
        except BlockingIOError:
            raise
        except OSError as e:  # EIO: the other end of a pty is closed for now
            raise _NoPeer(str(e)) from e

    def send(self, data: bytes) -> int:
        return os.write(self.fd, data)

    def setsockopt(self, *args) -> None:
        pass

    def close(self) -> None:
        os.close(self.fd)


def open_serial(path: str) -> int:
    """Open a serial device or pty non-blocking in raw mode (OSError if impossible)."""
    import termios
    import tty

    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        tty.setraw(fd)
    except termios.error as e:
        os.close(fd)
        raise OSError(f"{path} is not a serial device or terminal: {e}") from e
    return fd


def serve_serial(device: Device, path: str, opts: SimOptions) -> int:
    """Serve meter 0 with HDLC on a serial device / pty until SIGTERM; exit code."""
    try:
        fd = open_serial(path)
    except OSError as e:
        print(f"dlms2amqp-sim: cannot open {path}: {e.strerror or e}", flush=True)
        return 1
    opts.interface = "HDLC"
    server = Server(device, "127.0.0.1", 0, 0, opts)
    server.listen()
    server.install_signals()
    stream = _FdStream(fd)
    conn = Conn(stream, 0, Session(device, server.meter(0), opts), "HDLC")
    server.sel.register(stream, selectors.EVENT_READ, conn)
    print(f"ready 1 meters on {path}", flush=True)
    server.run()
    return 0
