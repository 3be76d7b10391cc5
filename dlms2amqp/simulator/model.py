# SPDX-License-Identifier: GPL-2.0-or-later
"""The built-in meter's deterministic data model.

Every value the simulator serves is a pure function of the meter index ``k``
(``port - first_port``) and a UTC POSIX timestamp ``t``, so that a test or a
benchmark can compute the exact expected reply for any meter and any range
without talking to the simulator.  With ``n = t // 900`` (quarter-hours since
the epoch)::

    import_wh(k, t)   = 1000*k + 10*n + (n*(k+1)) % 7     # never decreases
    export_wh(k, t)   = 100*k + 2*n + n % 3                 # never decreases
    status(k, t)      = 0x80 if (n + k) % 97 == 0 else 0
    voltage_raw(k, t) = 2290 + (k + n) % 21                 # scaler -1, V
    current_raw(k, t) = 100 + (7*k + n) % 400               # scaler -2, A

Profiles (rows produced on demand, buffers infinite in the past):

- ``load_profile_rows(k, start, end)``: one row ``(t, status, import, export)``
  for every ``t`` with ``t % 900 == 0`` and ``start <= t <= end``.
- ``billing_rows(k, start, end, utc_offset_min=0)``: one row
  ``(t, import, export)`` at every local midnight of the meter
  (``(t + 60*utc_offset_min) % 86400 == 0``) within ``[start, end]``.

Identity: ``logical_device_name(k)`` (16 bytes), ``serial_number(k)``,
``system_title(k)`` (8 bytes, used by HLS-GMAC / ciphering).
"""

from __future__ import annotations

LOAD_PERIOD = 900
BILLING_PERIOD = 86400
LOAD_ENTRIES = 35040
BILLING_ENTRIES = 366
LOAD_DEFAULT_ROWS = 96
BILLING_DEFAULT_ROWS = 31


def import_wh(k: int, t: int) -> int:
    """Active energy import in Wh; a step function of the quarter-hour."""
    n = t // 900
    return 1000 * k + 10 * n + (n * (k + 1)) % 7


def export_wh(k: int, t: int) -> int:
    """Active energy export in Wh."""
    n = t // 900
    return 100 * k + 2 * n + n % 3


def status(k: int, t: int) -> int:
    """Status byte of the load profile (0x80 now and then, to exercise flags)."""
    return 0x80 if (t // 900 + k) % 97 == 0 else 0


def voltage_raw(k: int, t: int) -> int:
    """Voltage L1 in 0.1 V (scaler -1)."""
    return 2290 + (k + t // 900) % 21


def current_raw(k: int, t: int) -> int:
    """Current L1 in 0.01 A (scaler -2)."""
    return 100 + (7 * k + t // 900) % 400


def logical_device_name(k: int) -> bytes:
    """16-byte logical device name, unique per meter."""
    return b"D2ASIM" + b"%010d" % k


def serial_number(k: int) -> str:
    """8-digit serial number, unique per meter."""
    return f"{10000000 + k:08d}"


def system_title(k: int) -> bytes:
    """The meter's 8-byte system title (HLS-GMAC, ciphering)."""
    return b"D2A" + k.to_bytes(5, "big")


def _ceil_to(t: int, period: int, offset: int = 0) -> int:
    """Smallest u >= t with (u + offset) % period == 0."""
    return t + (-(t + offset)) % period


def load_profile_rows(k: int, start: int, end: int) -> list[tuple[int, int, int, int]]:
    """Rows (t, status, import_wh, export_wh) for every quarter-hour in [start, end]."""
    return [
        (t, status(k, t), import_wh(k, t), export_wh(k, t))
        for t in range(_ceil_to(start, LOAD_PERIOD), end + 1, LOAD_PERIOD)
    ]


def billing_rows(
    k: int, start: int, end: int, utc_offset_min: int = 0
) -> list[tuple[int, int, int]]:
    """Rows (t, import_wh, export_wh) at every local midnight in [start, end]."""
    off = 60 * utc_offset_min
    return [
        (t, import_wh(k, t), export_wh(k, t))
        for t in range(_ceil_to(start, BILLING_PERIOD, off), end + 1, BILLING_PERIOD)
    ]


def last_load_boundary(now: int) -> int:
    """Time of the newest load-profile row at ``now``."""
    return now - now % LOAD_PERIOD


def last_billing_boundary(now: int, utc_offset_min: int = 0) -> int:
    """Time of the newest billing row (last local midnight) at ``now``."""
    off = 60 * utc_offset_min
    return now - (now + off) % BILLING_PERIOD
