# SPDX-License-Identifier: GPL-2.0-or-later
"""Free TCP ports on 127.0.0.1: one ephemeral port, or a range (the simulator's)."""

from __future__ import annotations

import socket

from dlms2amqp.simulator.ports import free_port_range

__all__ = ["free_port", "free_port_range"]


def free_port() -> int:
    """An ephemeral TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
