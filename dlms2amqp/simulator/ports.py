# SPDX-License-Identifier: GPL-2.0-or-later
"""Finding a run of free TCP ports for the simulator's N consecutive meters.

Tests, benchmarks and the demo share a machine with other runs, so a range is only
"free" when every port in it can be bound right now (it may still be taken before the
simulator binds it: callers retry on a start failure).
"""

from __future__ import annotations

import random
import socket


def range_free(host: str, first: int, count: int) -> bool:
    """True when ``first .. first+count-1`` can all be bound on ``host`` now."""
    socks = []
    try:
        for port in range(first, first + count):
            s = socket.socket()
            socks.append(s)
            s.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        for s in socks:
            s.close()


def free_port_range(
    count: int, host: str = "127.0.0.1", low: int = 20000, high: int = 31000, tries: int = 200
) -> int:
    """First port of ``count`` consecutive free ports in ``low..high`` (below the
    ephemeral range, so outgoing connections do not take them meanwhile)."""
    if count > high - low:
        raise RuntimeError(f"cannot find {count} consecutive ports in {low}..{high}")
    for _ in range(tries):
        first = random.randint(low, high - count)
        if range_free(host, first, count):
            return first
    raise RuntimeError(f"no {count} consecutive free ports found in {low}..{high}")
