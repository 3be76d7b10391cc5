# SPDX-License-Identifier: GPL-2.0-or-later
"""The one change we make to pika: its event loop writes a loop turn's frames in one send.

pika buffers each marshalled frame as its own chunk and its plaintext transport sends the
chunks one ``send()`` each: a publish is three system calls (method, header, body), an ack
one more, and on loopback each send also runs the receiving side of TCP in our process.
Counted with ``strace -c`` on a daemon reading 3,000 meters: 4 sends per request with one
queue, 8 with the partition hop.  ``_produce`` is what the loop calls when the socket is
writable, after the callbacks of the turn have queued their frames; the replacement below
joins the waiting chunks (up to ``COALESCE_BYTES``) before each send and keeps pika's
bookkeeping as it is (a partial send puts the rest back in front, a would-block error
propagates to pika's handler).

Applied at import of ``daemon.amqp``, only to the pika versions it was read against
(``pika >= 1.3, < 1.5``: ``_AsyncTransportBase._produce`` with ``_tx_buffers``,
``_tx_buffered_byte_count`` and ``_sigint_safe_send``); any other pika is left alone.  The
TLS transport's ``_produce`` calls the base one; for it pika's own loop runs unchanged
(after a would-block, OpenSSL wants the write retried with the same buffer, which a
join with the chunks queued since would change).
"""

from __future__ import annotations

from typing import Any

import pika
from pika.adapters.utils import io_services_utils

COALESCE_BYTES = 256 * 1024
_VERSIONS = ("1.3.", "1.4.")


def _produce(self: Any) -> None:
    """pika's ``_AsyncTransportBase._produce``, one send for many chunks."""
    if isinstance(self, _SSL):
        _ORIGINAL(self)
        return
    bufs = self._tx_buffers
    while bufs:
        if len(bufs) > 1 and len(bufs[0]) < COALESCE_BYTES:
            parts, size = [], 0
            while bufs and size < COALESCE_BYTES:
                chunk = bufs.popleft()
                parts.append(chunk)
                size += len(chunk)
            bufs.appendleft(b"".join(parts))
        sent = self._sigint_safe_send(self._sock, bufs[0])
        chunk = bufs.popleft()
        if sent < len(chunk):
            bufs.appendleft(chunk[sent:])
        self._tx_buffered_byte_count -= sent
        assert self._tx_buffered_byte_count >= 0, "tx buffer size underflow"


_SSL: Any = getattr(io_services_utils, "_AsyncSSLTransport", ())
_ORIGINAL: Any = getattr(getattr(io_services_utils, "_AsyncTransportBase", None), "_produce", None)


def install() -> bool:
    """Put ``_produce`` in place; False (pika untouched) for a pika it was not read for."""
    base = getattr(io_services_utils, "_AsyncTransportBase", None)
    if (
        base is None
        or not pika.__version__.startswith(_VERSIONS)
        or not hasattr(base, "_produce")
        or not hasattr(base, "_sigint_safe_send")
    ):
        return False
    base._produce = _produce
    return True


INSTALLED = install()
