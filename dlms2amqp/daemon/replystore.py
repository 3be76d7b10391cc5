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

Secrets at rest: a request body holds the meter's password and keys, so the store never
keeps a plain digest of it (a 6-digit password was recovered from a SHA-256 key in 0.4 s
given a request template).  A request's key is an HMAC-SHA256 of MsgID and body under a
32-byte key created once per installation (``replystore.key`` in the state directory,
mode 0600); the state directory is 0700 and the database files 0600.  The store is
bounded by count (``ReplyStoreSize``) and by the bytes of its compressed bodies
(``ReplyStoreMaxBytes``): the oldest replies go first.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import sqlite3
import stat
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


KEY_FILE = "replystore.key"
_KEY_BYTES = 32


def secure_dir(path: Path) -> Optional[str]:
    """Create the state directory (0700), or take group and other rights off an existing one.

    Returns a warning when an existing directory cannot be changed (not ours): the files
    inside are 0600 anyway, so that is no reason to stop.
    """
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as e:
        raise ConfigError(f"Cannot use StateDir {path}: {e.strerror or e}") from None
    if mode & 0o077:
        try:
            path.chmod(mode & 0o700)
        except PermissionError:
            return (
                f"StateDir {path} is mode {mode:04o} and belongs to another user: make it"
                " 0700, owned by the daemon's user"
            )
    return None


def _private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 if missing; take group/other rights off it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def installation_key(state_dir: Path) -> bytes:
    """The HMAC key of this installation: created once (0600), then read.

    Losing it only means that replies stored before are not found again (a redelivery
    after that reads the meter again); it is never sent anywhere.
    """
    path = state_dir / KEY_FILE
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        key = b""
    except OSError as e:
        raise ConfigError(f"Cannot read the reply-store key {path}: {e.strerror}") from None
    if len(key) == _KEY_BYTES:
        return key
    if key:
        raise ConfigError(
            f"The reply-store key {path} is damaged ({len(key)} bytes, expected {_KEY_BYTES});"
            " delete it and the file replies.sqlite3 beside it, and start again"
        )
    fresh = secrets.token_bytes(_KEY_BYTES)
    tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}")
    try:
        if tmp.exists():  # left by a start that died here
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(fresh)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # never replaces a key another process created meanwhile
        except FileExistsError:
            pass
        os.unlink(tmp)
        key = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"Cannot create the reply-store key {path}: {e.strerror}") from None
    if len(key) != _KEY_BYTES:
        raise ConfigError(f"The reply-store key {path} is damaged; delete it and start again")
    return key


def request_key(secret: bytes, msg_id: str, body: bytes) -> str:
    """Identity of a request: an HMAC of its MsgID and of the exact body.

    The body keeps a client that reuses a MsgID for a different request from getting the
    old reply; the HMAC keeps the body's meter password from being guessed from the key.
    """
    mac = hmac.new(secret, msg_id.encode("utf-8", "surrogatepass"), hashlib.sha256)
    mac.update(b"\0")
    mac.update(body)
    return mac.hexdigest()


class ReplyStore:
    """Most recent replies (at most ``capacity`` and ``max_bytes``), keyed by ``key_for``.

    ``path``'s directory is the state directory: it holds the installation key too.
    """

    def __init__(self, path: Path, capacity: int = 100000, max_bytes: int = 0):
        self.capacity = capacity
        self.max_bytes = max_bytes  # compressed bodies; 0 = no byte bound
        self._writes = 0
        secure_dir(path.parent)
        self._secret = installation_key(path.parent)
        try:
            _private_file(path)
            for suffix in ("-wal", "-shm"):  # SQLite gives them the mode of the database
                side = path.with_name(path.name + suffix)
                if side.exists():
                    _private_file(side)
            self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a power cut may lose the last commits but never corrupts;
            # a process crash loses nothing.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self._bytes = int(
                self._db.execute("SELECT COALESCE(SUM(LENGTH(body)), 0) FROM replies").fetchone()[0]
            )
        except (sqlite3.Error, OSError) as e:
            raise ConfigError(f"Cannot open the reply store {path}: {e}") from e

    def key_for(self, msg_id: str, body: bytes) -> str:
        """The store key of a request (HMAC under this installation's key)."""
        return request_key(self._secret, msg_id, body)

    @property
    def size_bytes(self) -> int:
        """Compressed bytes of the bodies held now."""
        return self._bytes

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
        packed = zlib.compress(body, 1)
        db.execute("BEGIN")
        try:
            cur = db.execute(
                "INSERT OR IGNORE INTO replies(key, reply_id, body, ts) VALUES (?,?,?,?)",
                (key, reply_id, packed, time.time()),
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
            return existing if existing else (reply_id, body)
        self._writes += 1
        self._bytes += len(packed)
        if self._writes % 1000 == 0:
            self.prune()
        elif self.max_bytes and self._bytes > self.max_bytes:
            self._prune_bytes()
        return reply_id, body

    def prune(self) -> None:
        """Forget the oldest replies beyond capacity and bytes (and stale attempt counters)."""
        cur = self._db.execute(
            "DELETE FROM replies WHERE seq <= (SELECT MAX(seq) FROM replies) - ? "
            "RETURNING LENGTH(body)",
            (self.capacity,),
        )
        self._bytes -= sum(int(r[0]) for r in cur.fetchall())
        self._db.execute("DELETE FROM attempts WHERE ts < ?", (time.time() - 7 * 86400,))
        if self.max_bytes and self._bytes > self.max_bytes:
            self._prune_bytes()

    def _prune_bytes(self) -> None:
        """Forget the oldest replies until the bodies fit ``max_bytes`` (the newest stays).

        Goes down to 90 % of the bound, so that a full store does not prune on every put.
        """
        target = self.max_bytes * 9 // 10
        newest = self._db.execute("SELECT MAX(seq) FROM replies").fetchone()[0]
        while self._bytes > target:
            rows = self._db.execute(
                "SELECT seq, LENGTH(body) FROM replies WHERE seq < ? ORDER BY seq LIMIT 500",
                (newest,),
            ).fetchall()
            if not rows:
                break
            drop, last = 0, rows[-1][0]
            for seq, size in rows:
                drop += int(size)
                if self._bytes - drop <= target:
                    last = seq
                    break
            cur = self._db.execute(
                "DELETE FROM replies WHERE seq <= ? RETURNING LENGTH(body)", (last,)
            )
            self._bytes -= sum(int(r[0]) for r in cur.fetchall())

    def count_attempt(self, key: str) -> int:
        """Record one more dispatch of a request; returns how many there have been."""
        row = self._db.execute(
            "INSERT INTO attempts(key, n, ts) VALUES (?, 1, ?) "
            "ON CONFLICT(key) DO UPDATE SET n = n + 1, ts = excluded.ts RETURNING n",
            (key, time.time()),
        ).fetchone()
        return int(row[0])

    def forget_attempts(self, key: str) -> None:
        # called for every first delivery, which has nothing to forget: read before writing
        if self._db.execute("SELECT 1 FROM attempts WHERE key=?", (key,)).fetchone():
            self._db.execute("DELETE FROM attempts WHERE key=?", (key,))

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0])

    def close(self) -> None:
        self._db.close()
