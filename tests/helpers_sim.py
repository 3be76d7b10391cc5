# SPDX-License-Identifier: GPL-2.0-or-later
"""Start the real ``dlms2amqp-sim`` for a test and stop it afterwards.

    with running_simulator(3) as sim:      # meters on sim.port .. sim.port+2
        read(sim.host, sim.port + 1)

Keep the signature stable: other engineers' tests import it.
"""

from __future__ import annotations

import os
import socket

# the process wrapper lives in the shared harness (bench/ uses it too)
from testing.ports import free_port_range  # noqa: F401
from testing.simulator import SIM_CMD, SimInfo, running_simulator  # noqa: F401


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
