# SPDX-License-Identifier: GPL-2.0-or-later
"""The open-files limit, raised where the process needs it (the daemon's workers, the simulator).

Each pooled meter association is a socket in a worker, each simulated meter a listening
socket (and one connection); with systemd's or a shell's default of 1024 thousands of
them end in "Too many open files".  One place decides how far the soft limit is raised.
"""

from __future__ import annotations

import resource
from typing import Optional

UNLIMITED_TARGET = 65536  # what "as far as allowed" means when the hard limit is unlimited


def raise_open_files(wanted: Optional[int] = None, beyond_hard: bool = False) -> int:
    """Raise the soft RLIMIT_NOFILE towards ``wanted``; returns the soft limit in force.

    ``wanted`` None means as far as the hard limit allows.  The limit is never lowered.
    With ``beyond_hard`` the hard limit is raised too when needed (root only; elsewhere
    the call leaves the limits as they were and the caller compares the result).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    infinite = hard == resource.RLIM_INFINITY
    target = wanted if wanted is not None else (UNLIMITED_TARGET if infinite else hard)
    if not beyond_hard and not infinite:
        target = min(target, hard)
    if soft >= target:
        return soft
    new_hard = hard if infinite or hard >= target else target
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, new_hard))
    except (ValueError, OSError):
        return soft
    return target


def open_files_advice(needed: int) -> str:
    """What to tell whoever starts a process that needs ``needed`` open files and cannot."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return (
        f"{needed} open files are needed but the limit is {soft} (hard limit {hard}): "
        f"run 'ulimit -n {needed}' as root before starting, raise 'nofile' in "
        f"/etc/security/limits.conf (or LimitNOFILE= in the systemd unit)"
    )
