# SPDX-License-Identifier: GPL-2.0-or-later
"""Bounded on-disk store of recent replies, so redeliveries do not read a meter twice.

RabbitMQ redelivers a request whose ack was lost (connection cut, daemon killed).  The
reply is written here *before* it is published, so the redelivered request is answered
with the same reply MsgID and body, even after a restart.  The store also counts how
many times a request was dispatched, which catches poison requests on classic queues
(they have no ``x-delivery-count``).

SQLite in WAL mode: one file, atomic writes, crash-safe, in the standard library.
Only the master process touches it, from one thread.  Bodies are stored zlib-compressed
(level 1): a one-day load profile reply shrinks about 15 times, which makes the write
cheaper than the compression.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
import zlib
from pathlib import Path
from typing import Optional

from ..errors import ConfigError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS replies (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT UNIQUE NOT NULL,
    reply_id TEXT NOT NULL,
    body BLOB NOT NULL,  -- zlib-compressed
    ts REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS attempts (
    key TEXT PRIMARY KEY,
    n INTEGER NOT NULL,
    ts REAL NOT NULL
);
"""


def request_key(msg_id: str, body: bytes) -> str:
    """Identity of a request: its MsgID and a digest of the exact body.

    The digest keeps a client that reuses a MsgID for a different request from getting
    the old reply.
    """
    return msg_id + "|" + hashlib.sha256(body).hexdigest()[:32]


class ReplyStore:
    """Most recent ``capacity`` replies, keyed by ``request_key``."""

    def __init__(self, path: Path, capacity: int = 100000):
        self.capacity = capacity
        self._writes = 0
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a power cut may lose the last commits but never corrupts;
            # a process crash loses nothing.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as e:
            raise ConfigError(f"Cannot open the reply store {path}: {e}") from e

    def get(self, key: str) -> Optional[tuple[str, bytes]]:
        """The stored (reply MsgID, body) for a request, or None."""
        if not self.capacity:
            return None
        row = self._db.execute("SELECT reply_id, body FROM replies WHERE key=?", (key,)).fetchone()
        return (row[0], zlib.decompress(row[1])) if row else None

    def put(self, key: str, reply_id: str, body: bytes) -> tuple[str, bytes]:
        """Store a reply unless one exists; returns the reply to publish (the first one)."""
        if not self.capacity:
            return reply_id, body
        db = self._db
        db.execute("BEGIN")
        try:
            cur = db.execute(
                "INSERT OR IGNORE INTO replies(key, reply_id, body, ts) VALUES (?,?,?,?)",
                (key, reply_id, zlib.compress(body, 1), time.time()),
            )
            inserted = cur.rowcount == 1
            if inserted:
                db.execute("DELETE FROM attempts WHERE key=?", (key,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if not inserted:
            existing = self.get(key)
            if existing:
                return existing
        self._writes += 1
        if self._writes % 1000 == 0:
            self.prune()
        return reply_id, body

    def prune(self) -> None:
        """Forget the oldest replies beyond capacity (and stale attempt counters)."""
        self._db.execute(
            "DELETE FROM replies WHERE seq <= (SELECT MAX(seq) FROM replies) - ?",
            (self.capacity,),
        )
        self._db.execute("DELETE FROM attempts WHERE ts < ?", (time.time() - 7 * 86400,))

    def count_attempt(self, key: str) -> int:
        """Record one more dispatch of a request; returns how many there have been."""
        row = self._db.execute(
            "INSERT INTO attempts(key, n, ts) VALUES (?, 1, ?) "
            "ON CONFLICT(key) DO UPDATE SET n = n + 1, ts = excluded.ts RETURNING n",
            (key, time.time()),
        ).fetchone()
        return int(row[0])

    def forget_attempts(self, key: str) -> None:
        self._db.execute("DELETE FROM attempts WHERE key=?", (key,))

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0])

    def close(self) -> None:
        self._db.close()
