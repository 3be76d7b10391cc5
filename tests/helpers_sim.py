# SPDX-License-Identifier: GPL-2.0-or-later
"""Start the real ``dlms2amqp-sim`` for a test and stop it afterwards.

    with running_simulator(3) as sim:      # meters on sim.port .. sim.port+2
        read(sim.host, sim.port + 1)

Keep the signature stable: other engineers' tests import it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from dlms2amqp.simulator.ports import free_port_range

SIM_CMD = [sys.executable, "-m", "dlms2amqp.cli.sim"]


@dataclass
class SimInfo:
    port: int
    host: str
    proc: subprocess.Popen
    count: int = 1
    ready_line: str = ""
    stderr_lines: list[str] = field(default_factory=list)

    @property
    def last_port(self) -> int:
        return self.port + self.count - 1


@contextlib.contextmanager
def running_simulator(
    count: int = 1,
    *args: str,
    interface: str = "WRAPPER",
    host: str = "127.0.0.1",
    timeout: float = 60.0,
    port: Optional[int] = None,
    env: Optional[dict] = None,
) -> Iterator[SimInfo]:
    """Run ``dlms2amqp-sim -N count -i interface *args`` on a free port range."""
    last_err = ""
    for _attempt in range(5):
        first = port if port is not None else free_port_range(count, host)
        cmd = [*SIM_CMD, "-N", str(count), "-p", str(first), "-i", interface, "--host", host]
        cmd += list(args)
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env or dict(os.environ),
            cwd=str(Path(__file__).resolve().parent.parent),
        )
        info = SimInfo(first, host, proc, count)
        t = threading.Thread(target=_drain, args=(proc, info.stderr_lines), daemon=True)
        t.start()
        line = _read_ready(proc, timeout)
        if line is not None:
            info.ready_line = line
            try:
                yield info
            finally:
                _stop(proc)
            return
        _stop(proc)
        last_err = "".join(info.stderr_lines)[-2000:]
        if port is not None or "cannot listen" not in last_err:
            break
    raise RuntimeError(f"dlms2amqp-sim did not become ready: {last_err}")


def _drain(proc: subprocess.Popen, sink: list[str]) -> None:
    assert proc.stderr is not None
    for line in proc.stderr:
        if len(sink) < 10000:
            sink.append(line)


def _read_ready(proc: subprocess.Popen, timeout: float) -> Optional[str]:
    assert proc.stdout is not None
    result: list[str] = []

    def reader() -> None:
        line = proc.stdout.readline()
        result.append(line)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    t.join(timeout)
    deadline = time.monotonic() + 0.1
    while time.monotonic() < deadline and t.is_alive():
        time.sleep(0.01)
    if result and result[0].startswith("ready "):
        return result[0].strip()
    return None


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    for f in (proc.stdout, proc.stderr):
        if f is not None:
            try:
                f.close()
            except OSError:
                pass


# --- a small Gurux client over a plain socket (the independent proof) --------------
class GuruxMeter:
    """Gurux's GXDLMSClient over a plain TCP socket, for tests of the simulator.

    ``client`` is the Gurux client (GXDLMSClient or GXDLMSSecureClient), already
    configured with addresses, authentication and interface type.
    """

    def __init__(self, client, host: str = "", port: int = 0, timeout: float = 20.0, stream=None):
        self.client = client
        if stream is not None:
            self.sock = stream
        else:
            self.sock = socket.create_connection((host, port), timeout=timeout)
            self.sock.settimeout(timeout)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> GuruxMeter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def exchange(self, frame: bytes, reply) -> None:
        """Send one frame; receive until Gurux says the frame is complete."""
        from gurux_dlms import GXByteBuffer

        self.sock.sendall(bytes(frame))
        buf = GXByteBuffer()
        while not self.client.getData(buf, reply, None):
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("simulator closed the connection")
            buf.set(chunk)

    def request(self, frames) -> object:
        """Send request frames, follow block transfer / HDLC segments; return the reply."""
        from gurux_dlms import GXReplyData

        if frames is None:
            frames = []
        if isinstance(frames, (bytes, bytearray)):
            frames = [frames]
        reply = GXReplyData()
        for frame in frames:
            reply.clear()
            self.exchange(frame, reply)
            while reply.isMoreData():
                nxt = self.client.receiverReady(reply)
                self.exchange(nxt, reply)
        return reply

    def connect(self) -> None:
        """(HDLC: SNRM/UA,) AARQ/AARE, and HLS pass 3/4 when required."""
        from gurux_dlms.enums import InterfaceType

        if self.client.interfaceType == InterfaceType.HDLC:
            reply = self.request(self.client.snrmRequest())
            self.client.parseUAResponse(reply.data)
        reply = self.request(self.client.aarqRequest())
        self.client.parseAareResponse(reply.data)
        if self.client.getIsAuthenticationRequired():
            reply = self.request(self.client.getApplicationAssociationRequest())
            self.client.parseApplicationAssociationResponse(reply.data)

    def read(self, obj, attr: int):
        """Read one attribute; raises if the meter answered with a data-access error."""
        reply = self.request(self.client.read(obj, attr))
        if reply.error:
            raise RuntimeError(f"data-access error {reply.error}")
        return self.client.updateValue(obj, attr, reply.value)

    def release(self) -> None:
        from gurux_dlms.enums import InterfaceType

        reply = self.request(self.client.releaseRequest())
        if self.client.interfaceType == InterfaceType.HDLC:
            self.request(self.client.disconnectRequest())
        return reply


class TtyStream:
    """A pty / serial device with the socket methods GuruxMeter uses."""

    def __init__(self, path: str, timeout: float = 20.0):
        import tty

        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY)
        tty.setraw(self.fd)
        self.timeout = timeout

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def recv(self, n: int) -> bytes:
        import select

        r, _, _ = select.select([self.fd], [], [], self.timeout)
        if not r:
            raise TimeoutError("no answer on the serial line")
        return os.read(self.fd, n)

    def close(self) -> None:
        os.close(self.fd)


def gurux_client(client_sap: int = 16, interface: str = "WRAPPER", password: str = "", **kw):
    """A Gurux client for the built-in meter (16 none, 32 Low, 48 HLS-GMAC ciphered)."""
    from gurux_dlms import GXDLMSClient
    from gurux_dlms.enums import Authentication, InterfaceType

    itype = InterfaceType.HDLC if interface == "HDLC" else InterfaceType.WRAPPER
    # server address 1 as Gurux's example client sends -s 1 (HDLC: the one byte 03)
    server = 1
    if client_sap == 48:
        from gurux_dlms.enums import Security
        from gurux_dlms.secure import GXDLMSSecureClient

        c = GXDLMSSecureClient(True, 48, server, Authentication.HIGH_GMAC, None, itype)
        c.ciphering.security = Security.AUTHENTICATION_ENCRYPTION
        c.ciphering.systemTitle = bytearray.fromhex("4775727578313233")
        c.ciphering.blockCipherKey = bytearray.fromhex("000102030405060708090A0B0C0D0E0F")
        c.ciphering.authenticationKey = bytearray.fromhex("D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF")
        if "invocation_counter" in kw:
            c.ciphering.invocationCounter = kw["invocation_counter"]
        return c
    auth = Authentication.LOW if client_sap == 32 else Authentication.NONE
    if client_sap == 32 and not password:
        password = "00000000"
    return GXDLMSClient(True, client_sap, server, auth, password or None, itype)
