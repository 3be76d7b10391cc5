# SPDX-License-Identifier: GPL-2.0-or-later
"""Byte transports under the Gurux client: a plain TCP socket and a serial line.

Why not ``gurux_net.GXNet``: it starts a receiver thread per open connection
and hands bytes over through a lock and an event; a worker holding hundreds of
pooled sessions would hold hundreds of extra threads.  Measured with
``bench/read_bench.py`` (one-day load profile, whole request, WRAPPER, Low,
loopback, shared 2-core machine, median of 5 interleaved rounds, 100 reads),
CPU / wall per read: plain socket 2.9 / 4.2 ms against GXNet 3.8 / 7.2 ms on a
busy run, 1.7 / 3.1 ms against 2.4 / 2.9 ms on a quieter one.  The plain socket
costs 25-30 % less CPU, is not slower, and needs no thread, so it is kept.

Serial lines are driven with ``termios`` directly (no pyserial, no thread):
raw mode, the settings of ``-S port:baud:8None1``, and the IEC 62056-21 mode E
hand-shake for optical probes (``-i HdlcWithModeE``).
"""

from __future__ import annotations

import os
import select
import socket
import stat
import time
from typing import Callable, Optional

from ..errors import MeterConnectionError, MeterTimeoutError

Trace = Callable[[str, bytes], None]


class Media:
    """send / recv with an absolute deadline; close is idempotent."""

    trace: Optional[Trace] = None

    def send(self, data: bytes) -> None:
        raise NotImplementedError

    def recv(self, timeout: float, step: str) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def is_stale(self) -> bool:
        """True when the peer closed or sent unsolicited bytes while idle."""
        return False


class TcpMedia(Media):
    def __init__(self, host: str, port: int, timeout: float, trace: Optional[Trace] = None):
        self.trace = trace
        self.endpoint = f"{host}:{port}"
        self.sock: Optional[socket.socket] = None
        try:
            self.sock = socket.create_connection((host, port), timeout=max(timeout, 0.05))
        except socket.timeout as exc:
            raise MeterTimeoutError(
                f"timeout while connecting to {self.endpoint} after {timeout:.1f} s (step: connect)"
            ) from exc
        except ConnectionRefusedError as exc:
            raise MeterConnectionError(
                f"connection to {self.endpoint} refused: nothing listens on that port"
            ) from exc
        except OSError as exc:
            raise MeterConnectionError(
                f"cannot connect to {self.endpoint}: {exc.strerror or exc}"
            ) from exc
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _live(self) -> socket.socket:
        if self.sock is None:
            raise MeterConnectionError(f"the connection to {self.endpoint} is closed")
        return self.sock

    def send(self, data: bytes) -> None:
        sock = self._live()
        if self.trace:
            self.trace("TX", bytes(data))
        try:
            sock.sendall(data)
        except OSError as exc:
            raise MeterConnectionError(
                f"connection to {self.endpoint} lost while sending: {exc.strerror or exc}"
            ) from exc

    def recv(self, timeout: float, step: str) -> bytes:
        if timeout <= 0:
            raise MeterTimeoutError(f"timeout during {step} (request deadline reached)")
        sock = self._live()
        sock.settimeout(timeout)
        try:
            chunk = sock.recv(65536)
        except socket.timeout as exc:
            raise MeterTimeoutError(
                f"timeout during {step}: no answer from {self.endpoint} in {timeout:.1f} s"
            ) from exc
        except OSError as exc:
            raise MeterConnectionError(
                f"connection to {self.endpoint} lost during {step}: {exc.strerror or exc}"
            ) from exc
        if not chunk:
            raise MeterConnectionError(
                f"the meter at {self.endpoint} closed the connection during {step}"
            )
        if self.trace:
            self.trace("RX", chunk)
        return chunk

    def is_stale(self) -> bool:
        try:
            r, _, _ = select.select([self._live()], [], [], 0)
        except (MeterConnectionError, OSError, ValueError):
            return True
        return bool(r)

    def close(self) -> None:
        sock, self.sock = getattr(self, "sock", None), None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass


_BAUDS = {
    300: "B300", 600: "B600", 1200: "B1200", 2400: "B2400", 4800: "B4800", 9600: "B9600",
    19200: "B19200", 38400: "B38400", 57600: "B57600", 115200: "B115200",
    230400: "B230400", 460800: "B460800", 921600: "B921600",
}  # fmt: skip
_MODE_E_BAUD_CHARS = {"0": 300, "1": 600, "2": 1200, "3": 2400, "4": 4800, "5": 9600, "6": 19200}


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "a regular file"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISBLK(mode):
        return "a block device (a disk)"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a character device"


def _kernel_class(rdev: int) -> Optional[str]:
    """The device's class in sysfs (``tty``, ``mem``, ``misc``...), None when not listed.

    Pseudo-terminals (``/dev/pts/N``) are not listed; they are checked by ``isatty``.
    """
    link = f"/sys/dev/char/{os.major(rdev)}:{os.minor(rdev)}/subsystem"
    try:
        return os.path.basename(os.readlink(link))
    except OSError:
        return None


def open_serial_device(path: str) -> int:
    """Open a serial port only once it is known to be one; returns the descriptor.

    A request names the path, so it may name any file: the path must be a character
    device (``stat``), of the kernel's ``tty`` class when sysfs lists it, before it is
    opened at all; it is then opened without becoming our controlling terminal and
    without waiting for carrier (``O_NOCTTY | O_NONBLOCK``), and must be a terminal
    (``isatty``, and still the device checked) before anything is written to it.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise MeterConnectionError(f"serial port {path} does not exist") from None
    except PermissionError:
        raise MeterConnectionError(f"no permission to open serial port {path}") from None
    except (OSError, ValueError) as exc:
        raise MeterConnectionError(
            f"cannot open serial port {path}: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    if not stat.S_ISCHR(st.st_mode):
        raise MeterConnectionError(
            f"serial port {path} is not a serial device: it is {_kind(st.st_mode)}"
        )
    kclass = _kernel_class(st.st_rdev)
    if kclass is not None and kclass != "tty":
        raise MeterConnectionError(
            f"serial port {path} is not a serial device: it is a {kclass} device, not a tty"
        )
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise MeterConnectionError(f"serial port {path} does not exist") from None
    except PermissionError:
        raise MeterConnectionError(f"no permission to open serial port {path}") from None
    except OSError as exc:
        raise MeterConnectionError(
            f"cannot open serial port {path}: {exc.strerror or exc}"
        ) from None
    try:
        same = os.fstat(fd).st_rdev == st.st_rdev
        if not same or not os.isatty(fd):
            raise MeterConnectionError(
                f"serial port {path} is not a serial device: it is a character device "
                "but not a terminal (tty)"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


class SerialMedia(Media):
    """A serial device (or pty) in raw mode, configured with termios."""

    def __init__(
        self,
        path: str,
        baud: int = 9600,
        data_bits: int = 8,
        parity: str = "None",
        stop_bits: str = "1",
        trace: Optional[Trace] = None,
    ):
        import termios  # POSIX only; imported here so that Windows users get a clear error

        self.trace = trace
        self.endpoint = path
        self.termios = termios
        self.fd: Optional[int] = open_serial_device(path)
        try:
            self.configure(baud, data_bits, parity, stop_bits)
        except BaseException:
            self.close()
            raise

    def configure(self, baud: int, data_bits: int, parity: str, stop_bits: str) -> None:
        t = self.termios
        try:
            attrs = t.tcgetattr(self.fd)
        except t.error as exc:
            raise MeterConnectionError(f"{self.endpoint} is not a serial port") from exc
        speed = getattr(t, _BAUDS.get(baud, "B9600"))
        attrs[0] = 0  # iflag: raw
        attrs[1] = 0  # oflag
        cflag = t.CREAD | t.CLOCAL
        cflag |= {5: t.CS5, 6: t.CS6, 7: t.CS7, 8: t.CS8}[data_bits]
        if parity in ("Even", "Odd", "Mark", "Space"):
            cflag |= t.PARENB
            if parity in ("Odd", "Mark"):
                cflag |= t.PARODD
        if stop_bits == "2":
            cflag |= t.CSTOPB
        attrs[2] = cflag
        attrs[3] = 0  # lflag: no echo, no canonical mode
        attrs[4] = attrs[5] = speed
        attrs[6][t.VMIN] = 0
        attrs[6][t.VTIME] = 0
        try:
            t.tcsetattr(self.fd, t.TCSANOW, attrs)
        except t.error as exc:
            # Linux ptys force 8 bits without parity and may answer EINVAL to other
            # settings; a pty has no line to configure, so that is not an error.
            if os.path.realpath(self.endpoint).startswith("/dev/pts/"):
                return
            raise MeterConnectionError(
                f"serial port {self.endpoint} refused the line settings "
                f"{baud} {data_bits}{parity}{stop_bits}"
            ) from exc

    def _live(self) -> int:
        if self.fd is None:
            raise MeterConnectionError(f"serial port {self.endpoint} is closed")
        return self.fd

    def send(self, data: bytes) -> None:
        fd = self._live()
        if self.trace:
            self.trace("TX", bytes(data))
        view = memoryview(bytes(data))
        deadline = time.monotonic() + 10
        while view:
            try:
                n = os.write(fd, view)
                view = view[n:]
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise MeterTimeoutError(
                        f"serial port {self.endpoint} does not accept data"
                    ) from None
                select.select([], [fd], [], 0.1)
            except OSError as exc:
                raise MeterConnectionError(
                    f"serial port {self.endpoint} failed while sending: {exc.strerror or exc}"
                ) from exc

    def recv(self, timeout: float, step: str) -> bytes:
        if timeout <= 0:
            raise MeterTimeoutError(f"timeout during {step} (request deadline reached)")
        fd = self._live()
        r, _, _ = select.select([fd], [], [], timeout)
        if not r:
            raise MeterTimeoutError(
                f"timeout during {step}: no answer on {self.endpoint} in {timeout:.1f} s"
            )
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return b""
        except OSError as exc:
            raise MeterConnectionError(
                f"serial port {self.endpoint} failed during {step}: {exc.strerror or exc}"
            ) from exc
        if not chunk:
            raise MeterConnectionError(f"serial port {self.endpoint} was closed during {step}")
        if self.trace:
            self.trace("RX", chunk)
        return chunk

    def mode_e_handshake(self, timeout: float, data_bits: int, parity: str, stop_bits: str) -> None:
        """IEC 62056-21 opening at 300 baud, then switch to the meter's HDLC speed."""
        self.configure(300, 7, "Even", "1")
        self.send(b"/?!\r\n")
        ident = b""
        deadline = time.monotonic() + timeout
        while not ident.endswith(b"\r\n"):
            ident += self.recv(deadline - time.monotonic(), "mode E identification")
            if len(ident) > 64:
                break
        start = ident.find(b"/")
        if start < 0 or len(ident) < start + 5:
            raise MeterConnectionError(
                f"the optical probe on {self.endpoint} got no IEC 62056-21 identification"
            )
        baud_char = chr(ident[start + 4])
        baud = _MODE_E_BAUD_CHARS.get(baud_char, 9600)
        self.send(b"\x062" + baud_char.encode() + b"2\r\n")
        time.sleep(0.3)  # the meter switches speed after the acknowledgement
        self.configure(baud, data_bits, parity, stop_bits)

    def close(self) -> None:
        fd, self.fd = getattr(self, "fd", None), None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
