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

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Union

from ..config import Config
from ..meter.connstring import ConnSettings
from ..request import ReadRequest

if TYPE_CHECKING:  # the master must not import the meter layer (Gurux) at run time
    from ..meter.reader import ReaderOptions


@dataclass(frozen=True)
class WorkerSettings:
    """What one worker process needs, built once from the configuration by the master.

    No broker password in here.  The reader's six fields become the worker's one
    ``ReaderOptions`` in ``reader_options`` (the only place they are copied): that class
    lives in ``meter.reader``, which imports Gurux, and the master must not load Gurux.
    """

    index: int
    sessions: int
    idle_timeout: float
    request_timeout: float
    frame_timeout: float
    datetime_format: str
    state_dir: Optional[Path]
    trace: bool
    debug_file: Optional[Path]
    log_level: str
    max_rows: int = 0

    @classmethod
    def from_config(cls, cfg: Config, index: int) -> WorkerSettings:
        return cls(
            index=index,
            sessions=cfg.SessionsPerWorker,
            idle_timeout=cfg.IdleSessionTimeout,
            request_timeout=cfg.RequestTimeout,
            frame_timeout=cfg.FrameTimeout,
            datetime_format=cfg.DateTimeFormat,
            state_dir=cfg.state_dir,
            trace=cfg.Trace,
            debug_file=cfg.debug_file,
            log_level=cfg.LogLevel,
            max_rows=cfg.MaxRows,
        )

    def reader_options(self, trace_sink: Optional[Callable[[str], None]] = None) -> ReaderOptions:
        """The options of every read in this worker (imports the meter layer: worker only)."""
        from ..meter.reader import ReaderOptions

        return ReaderOptions(
            frame_timeout=self.frame_timeout,
            request_timeout=self.request_timeout,
            datetime_format=self.datetime_format,
            state_dir=self.state_dir,
            trace=self.trace,
            trace_sink=trace_sink,
            max_rows=self.max_rows,
        )


# --- master -> worker -------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
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
class PoolStats:
    """Session-pool counters: reuses so far and idle sessions held."""

    hits: float = 0.0
    idle: float = 0.0
    resyncs: float = 0.0  # invocation counters taken from the meter (session.RESYNCS)


@dataclass(frozen=True)
class Ready:
    pid: int


@dataclass(frozen=True)
class Heartbeat:
    pool: PoolStats = field(default_factory=PoolStats)


@dataclass(frozen=True)
class Started:
    """A session thread began this job (the hang clock starts here, not at dispatch)."""

    job_id: int


@dataclass(frozen=True)
class Done:
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
