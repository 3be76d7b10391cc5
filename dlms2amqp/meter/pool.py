# SPDX-License-Identifier: GPL-2.0-or-later
"""SessionPool: keep one associated session per meter between requests.

Opening a session costs round trips (TCP, SNRM/UA, AARQ/AARE, HLS); a meter
read every few seconds by a head-end can reuse its association.  A pooled
session is only reused with exactly the same connection settings; one that
the meter closed meanwhile is detected (the socket is readable while idle) or
fails on first use, and the reader then opens a fresh one transparently.
``hits``/``misses``/``expired`` are plain counters the daemon exports as metrics.
"""

from __future__ import annotations

import threading
import time
from typing import Optional

from .connstring import ConnSettings
from .session import MeterSession


class SessionPool:
    def __init__(self, idle_timeout: float = 30.0, max_sessions: int = 10000):
        self.idle_timeout = idle_timeout
        self.max_sessions = max_sessions
        self._sessions: dict = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.expired = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def take(self, settings: ConnSettings) -> Optional[MeterSession]:
        """The pooled session for this meter if it fits these settings, else None."""
        with self._lock:
            entry = self._sessions.pop(settings.meter_key, None)
        session = None
        if entry is not None:
            fingerprint, candidate = entry
            now = time.monotonic()
            stale = candidate.stale()
            if (
                fingerprint == settings.session_fingerprint()
                and candidate.alive
                and not stale
                and now - candidate.last_used < self.idle_timeout
            ):
                session = candidate
            elif stale:
                candidate.abandon()  # the meter closed or spoke meanwhile: no release
            else:
                candidate.close()  # other settings, or idle too long: released politely
        with self._lock:
            if session is None:
                self.misses += 1
            else:
                self.hits += 1
        self.close_idle()
        return session

    def put(self, session: MeterSession) -> None:
        """Keep an associated session for the next request to the same meter."""
        if not session.alive or self.idle_timeout <= 0:
            session.close()
            return
        key = session.settings.meter_key
        with self._lock:
            old = self._sessions.pop(key, None)
            full = len(self._sessions) >= self.max_sessions
            if not full:
                self._sessions[key] = (session.settings.session_fingerprint(), session)
        if old is not None and old[1] is not session:
            old[1].close()
        if full:
            session.close()

    def close_idle(self) -> int:
        """Release sessions idle for longer than ``idle_timeout``; returns how many."""
        now = time.monotonic()
        victims = []
        with self._lock:
            # ``put`` re-inserts at the end, so the dict is ordered by when sessions were
            # returned: stop at the first one still fresh (O(expired), not O(pool)).
            for key, (_, session) in self._sessions.items():
                if now - session.last_used < self.idle_timeout:
                    break
                victims.append(key)
            victims = [self._sessions.pop(k)[1] for k in victims]
            self.expired += len(victims)
        for session in victims:
            session.close()
        return len(victims)

    def close_keys(self, keys: set[str] | frozenset[str]) -> int:
        """Release the idle sessions of these meters (another gateway host takes them)."""
        with self._lock:
            victims = [self._sessions.pop(k)[1] for k in list(self._sessions) if k in keys]
        for session in victims:
            session.close()
        return len(victims)

    def close_all(self) -> None:
        with self._lock:
            victims = [s for _, s in self._sessions.values()]
            self._sessions.clear()
        for session in victims:
            session.close()
