# SPDX-License-Identifier: GPL-2.0-or-later
"""Link: the connection under one session, and the request/exchange loop over it.

Gurux builds the frames and parses the answers; the link sends them, waits for each
answer within the per-frame timeout and the whole-request deadline, collects every
block of a reply and translates what Gurux raises into the gateway's errors (one
message per known cause, naming the step).  Whatever fails on the wire marks the link
``broken``: its association is not released politely, only the media is closed.

No association logic here (that is :mod:`.session`) and no counter policy (that is
:mod:`.counters`): the session hands in a ``before_send`` hook that reserves
invocation counters before a ciphered frame leaves.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator, Optional

from gurux_dlms import GXByteBuffer, GXDLMSClient, GXDLMSException
from gurux_dlms.enums import RequestTypes
from gurux_dlms.enums.ExceptionServiceError import ExceptionServiceError
from gurux_dlms.GXDLMSConfirmedServiceError import GXDLMSConfirmedServiceError
from gurux_dlms.GXDLMSExceptionResponse import GXDLMSExceptionResponse

from ..errors import (
    AuthenticationError,
    InvocationCounterError,
    MeterConnectionError,
    MeterError,
    MeterProtocolError,
    MeterTimeoutError,
    ObjectError,
)
from .connstring import ConnSettings
from .gurux_compat import ReplyData, gbt_stalled  # (patches Gurux on import)
from .media import Media, SerialMedia, TcpMedia, Trace

MAX_REPLY_BYTES = 8 * 1024 * 1024
#: seconds of silence inside a streamed GBT window after which the client acknowledges:
#: the meter waits for it (Gurux's Java meter streams one block per acknowledgement)
GBT_STALL = 1.0
#: Gurux exceptions that mean "the meter answered no" (the association is fine)
REFUSALS = (GXDLMSExceptionResponse, GXDLMSConfirmedServiceError)
#: what Gurux hands out as a request: one frame, a list of frames, or nothing to send
Frames = Any


class Link:
    """Media, deadline and trace of one session; not thread-safe (one thread per meter)."""

    def __init__(self, frame_timeout: float = 5.0, trace: Optional[Trace] = None):
        self.frame_timeout = frame_timeout
        self.trace = trace
        self.deadline = time.monotonic() + 3600
        self.media: Optional[Media] = None
        self.broken = False
        self.last_used = time.monotonic()
        #: called before every frame is sent (the session reserves invocation counters)
        self.before_send: Optional[Callable[[], None]] = None

    # --- media ---------------------------------------------------------------------
    def open(self, settings: ConnSettings) -> None:
        """Open the TCP connection or the serial line (mode E hand-shake included)."""
        s = settings
        timeout = min(self.frame_timeout, self.remaining("connect"))
        if s.serial_port is None:
            if s.host is None or s.port is None:
                raise MeterConnectionError(
                    "ConnectionString needs -h host and -p port, or -S serial port"
                )
            self.media = TcpMedia(s.address or s.host, s.port, timeout, self.trace)
            return
        baud = 300 if s.interface == "HdlcWithModeE" else s.baud_rate
        path = s.serial_device or s.serial_port
        media = SerialMedia(path, baud, s.data_bits, s.parity, s.stop_bits, self.trace)
        if s.interface == "HdlcWithModeE":
            try:
                media.mode_e_handshake(timeout, s.data_bits, s.parity, s.stop_bits)
            except BaseException:
                media.close()
                raise
        self.media = media

    def close(self) -> None:
        """Close the media (idempotent); the association above it is gone with it."""
        media, self.media = self.media, None
        if media is not None:
            media.close()

    def stale(self) -> bool:
        """The peer closed, or sent unsolicited bytes, while the link was idle."""
        return self.media is not None and self.media.is_stale()

    def set_trace(self, trace: Optional[Trace]) -> None:
        """Trace the frames of the next request to ``trace`` (None: no tracing)."""
        self.trace = trace
        if self.media is not None:
            self.media.trace = trace

    def note(self, text: str) -> None:
        """A line in the --trace output (no-op without tracing): what the gateway decided."""
        note = getattr(self.trace, "note", None)
        if note is not None:
            note(text)

    @contextlib.contextmanager
    def masked(self) -> Iterator[None]:
        """Mask every byte sent meanwhile in the trace (an AARQ may carry a password)."""
        masking = hasattr(self.trace, "masking")
        if masking:
            self.trace.masking = True  # type: ignore[union-attr]
        try:
            yield
        finally:
            if masking:
                self.trace.masking = False  # type: ignore[union-attr]

    def remaining(self, step: str) -> float:
        """Seconds left before the request deadline; a timeout error naming ``step`` if none."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise MeterTimeoutError(f"timeout during {step} (request deadline reached)")
        return left

    # --- exchange ------------------------------------------------------------------
    def request(
        self, client: GXDLMSClient, frames: Frames, step: str, raw: bool, results: bool = False
    ) -> ReplyData:
        """Send the frames, collect every block; ``results``: keep a list reply's raw results."""
        if frames is None:
            frames = []
        elif isinstance(frames, (bytes, bytearray)):
            frames = [frames]
        reply = ReplyData()
        reply.raw_only = raw
        reply.raw_list = results
        blocks = 0
        try:
            for frame in frames:
                reply.clear()
                reply.raw_only = raw
                reply.raw_list = results
                self._exchange(client, frame, reply, step)
                while reply.isMoreData():
                    if reply.moreData & RequestTypes.DATABLOCK:
                        blocks += 1
                    self._exchange(client, client.receiverReady(reply), reply, step)
        except MeterError:
            self.broken = True
            raise
        except Exception as exc:
            self.broken = True
            raise translate(exc, step) from exc
        self.last_used = time.monotonic()
        reply.read_blocks = blocks
        return reply

    def _exchange(self, client: GXDLMSClient, frame: Any, reply: ReplyData, step: str) -> None:
        media = self.media
        if media is None:
            raise MeterConnectionError(f"no connection to the meter during {step}")
        if self.before_send is not None:
            self.before_send()
        if frame:  # empty: nothing to send, the meter streams more (GBT window)
            media.send(bytes(frame))
        buf = GXByteBuffer()
        received = 0
        streamed = not frame and bool(reply.moreData & RequestTypes.GBT)
        while True:
            try:
                timeout = min(self.frame_timeout, self.remaining(step))
                if streamed and not received:
                    timeout = min(timeout, GBT_STALL)
                chunk = media.recv(timeout, step)
            except MeterTimeoutError as exc:
                if streamed and not received and self.remaining(step) > 0:
                    # a GBT window went quiet: the meter waits for our acknowledgement
                    streamed = False
                    media.send(bytes(gbt_stalled(client.settings)))
                    continue
                if received:
                    raise MeterProtocolError(
                        f"the meter's answer is not a valid DLMS frame during {step} "
                        f"({received} bytes received, no complete frame)"
                    ) from exc
                raise
            received += len(chunk)
            buf.set(chunk)
            if client.getData(buf, reply, None):
                return
            if buf.size > MAX_REPLY_BYTES:
                raise MeterProtocolError(f"the meter's answer is too long during {step}")


def parse(step: str, fn: Callable[[Any], Any], data: Any) -> None:
    """Run one of Gurux's parse functions on an answer; its failure named by ``step``."""
    try:
        fn(data)
    except MeterError:
        raise
    except Exception as exc:
        raise translate(exc, step) from exc


def translate(exc: Exception, step: str) -> MeterError:
    """What Gurux raised -> the gateway's error for it (field-engineer wording)."""
    if isinstance(exc, GXDLMSExceptionResponse):
        if exc.exceptionServiceError == ExceptionServiceError.INVOCATION_COUNTER_ERROR:
            err = InvocationCounterError(
                f"invocation counter rejected by the meter during {step} "
                f"(the meter expects at least {exc.serviceErrorValue}); "
                "read the meter's counter with -v 0.0.43.1.0.255"
            )
            err.expected = exc.serviceErrorValue if isinstance(exc.serviceErrorValue, int) else None
            return err
        return MeterProtocolError(f"the meter refused the request during {step}: {exc}")
    if isinstance(exc, GXDLMSException):
        parts = [p.strip().rstrip(".") for p in str(exc).splitlines() if p.strip()]
        text = ". ".join(parts) + "." if parts else "Association rejected by the meter."
        return AuthenticationError(text)
    if isinstance(exc, GXDLMSConfirmedServiceError):
        return ObjectError(f"the meter refused the request during {step}: {exc}")
    text = str(exc)
    if "authentication" in text.lower() or "invalid password" in text.lower():
        return AuthenticationError(f"authentication failed during {step}")
    return MeterProtocolError(f"the meter's answer could not be understood during {step}")
