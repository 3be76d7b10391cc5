# SPDX-License-Identifier: GPL-2.0-or-later
"""Free TCP ports on 127.0.0.1: one port, or a range (the simulator's).

Both are taken below the kernel's ephemeral range: a port the kernel may hand to an
outgoing connection (a daemon's to a meter, a proxy's, pika's) between the moment a test
picks it and the moment its server binds it would be taken under it - seen once in CI, a
4th daemon's ``MetricsPort`` 52717 "in use" while 3 daemons read 600 meters.
"""

from __future__ import annotations

import random

from dlms2amqp.simulator.ports import free_port_range, range_free

__all__ = ["free_port", "free_port_range"]

BAND = 1700  # single ports come from the BAND ports under the ephemeral range
_given: set[int] = set()  # handed out by this process: not twice (a server may not be up yet)


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(tries: int = 500) -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, outside the ephemeral range,
    and not handed out before by this process (above the simulators' 20000..31000)."""
    high = _ephemeral_low() - 1
    low = max(1025, high - BAND)
    for _ in range(tries):
        port = random.randint(low, high)
        if port not in _given and range_free("127.0.0.1", port, 1):
            _given.add(port)
            return port
    raise RuntimeError(f"no free port found in {low}..{high}")
