# SPDX-License-Identifier: GPL-2.0-or-later
"""Typed messages between the master and its worker processes (over one duplex pipe).

    master -> worker   Job | Reopen | ClosePool | Stop
    worker -> master   Ready | Heartbeat | Started | Done

Dataclasses instead of positional tuples: a field added on one side cannot be read at
the wrong position on the other.  Everything here is pickled by ``multiprocessing``;
``Job`` carries the request and its parsed connection settings (the master parsed both
to route and validate, the worker does not parse them again).  Secrets inside stay
``Secret`` objects across the pipe.

This module imports neither pika nor Gurux: both sides use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional, Union

from ..config import Config
from ..meter.connstring import ConnSettings
from ..meter.options import ReaderOptions
from ..request import ReadRequest


@dataclass(frozen=True)
class WorkerSettings:
    """What one worker process needs, built once from the configuration by the master.

    No broker password in here.  ``reader`` is the options of every read in the worker,
    built here once and used there as is (``meter.options`` imports no Gurux).
    """

    index: int
    sessions: int
    idle_timeout: float
    reader: ReaderOptions
    debug_file: Optional[Path]
    log_level: str

    @classmethod
    def from_config(cls, cfg: Config, index: int) -> WorkerSettings:
        return cls(
            index=index,
            sessions=cfg.SessionsPerWorker,
            idle_timeout=cfg.IdleSessionTimeout,
            reader=ReaderOptions(
                frame_timeout=cfg.FrameTimeout,
                request_timeout=cfg.RequestTimeout,
                datetime_format=cfg.DateTimeFormat,
                state_dir=cfg.state_dir,
                trace=cfg.Trace,
                max_rows=cfg.MaxRows,
            ),
            debug_file=cfg.debug_file,
            log_level=cfg.LogLevel,
        )


class _Positional:
    """Pickled as its values in field order: a message per job each way, so the default
    (a dict keyed by field names, rebuilt through ``__setstate__``) is worth avoiding."""

    def __reduce__(self) -> tuple:
        cls = type(self)
        names = _FIELD_NAMES.get(cls)
        if names is None:
            names = _FIELD_NAMES[cls] = tuple(f.name for f in fields(self))  # type: ignore[arg-type]
        return (cls, tuple([getattr(self, name) for name in names]))


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


# --- master -> worker -------------------------------------------------------------------
@dataclass(frozen=True)
class Job(_Positional):
    """Read this meter; ``settings.meter_key`` picks the per-meter queue."""

    job_id: int
    request: ReadRequest
    settings: ConnSettings


@dataclass(frozen=True)
class Reopen:
    """SIGHUP reached the master: reopen the log file."""


@dataclass(frozen=True)
class ClosePool:
    """Close idle associations: of these meters (a partition given away), or all (none)."""

    keys: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Stop:
    """The grace period is over: drop what is left and exit."""


ToWorker = Union[Job, Reopen, ClosePool, Stop]


# --- worker -> master -------------------------------------------------------------------
@dataclass(frozen=True)
class PoolStats(_Positional):
    """Session-pool counters: reuses so far and idle sessions held."""

    hits: float = 0.0
    idle: float = 0.0
    resyncs: float = 0.0  # invocation counters taken from the meter (counters.RESYNCS)


@dataclass(frozen=True)
class Ready:
    pid: int


@dataclass(frozen=True)
class Heartbeat:
    pool: PoolStats = field(default_factory=PoolStats)


@dataclass(frozen=True)
class Started(_Positional):
    """A session thread began this job (the hang clock starts here, not at dispatch)."""

    job_id: int


@dataclass(frozen=True)
class Done(_Positional):
    """The reply of one job, with what the master logs and counts (no second decode)."""

    job_id: int
    reply_id: str
    body: bytes
    status: str  # "ok" | "notok"
    error: str  # the reply's Error text ("" for a plain ok)
    rows: int
    seconds: float
    pool: PoolStats = field(default_factory=PoolStats)


FromWorker = Union[Ready, Heartbeat, Started, Done]
