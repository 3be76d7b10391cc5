# SPDX-License-Identifier: GPL-2.0-or-later
"""ReaderOptions: the settings every read of one process shares (no Gurux import).

Kept apart from ``reader`` (which loads Gurux) so that the daemon's master can build
them once from its configuration and ship them to each worker as they are; the
command line builds them from its arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from . import targets


@dataclass(frozen=True)
class ReaderOptions:
    """Timeouts, reply format, state directory and tracing of every read."""

    frame_timeout: float = 5.0  # seconds per frame wait
    request_timeout: float = 60.0  # whole request deadline
    datetime_format: str = "iso"  # or "dotnet"
    state_dir: Optional[Path] = None  # invocation counters
    trace: bool = False
    #: where trace lines go (default: stderr); set in the process that reads, not pickled
    trace_sink: Optional[Callable[[str], None]] = None
    max_rows: int = 0  # profile rows per request (MaxRows); 0 = no bound
    #: where a request may connect (AllowedHosts, AllowedSerialPorts); default anywhere
    allowed_hosts: targets.HostPolicy = targets.ALLOW_ALL_HOSTS
    allowed_serial_ports: targets.SerialPolicy = targets.ALLOW_ALL_SERIAL
