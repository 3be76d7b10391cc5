# SPDX-License-Identifier: GPL-2.0-or-later
"""Invocation counters persisted per (meter, client system title, key).

Counters are kept per (meter system title, client system title, key);
:class:`CounterPolicy` is how one session uses them.  The
meter's title is known before the association only from ``-M`` or from the
address -> title alias learnt at the previous session; otherwise the address
stands in for it until the AARE tells the title.

A ciphering meter rejects an APDU whose invocation counter is not greater than
the last one it accepted.  If the gateway restarts and starts again from a
counter the meter already saw, every request fails.  So counters are reserved
in blocks: before a counter is used, a high-water mark at or above it is
written to disk (atomic rename + fsync).  After a restart the gateway starts
above the mark and never sends a counter twice.  The mark never goes down.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Optional

from ..errors import ConfigError

BLOCK = 64
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")
#: the invocation-counter object a session reads through the public client when a meter
#: rejects our counter without saying which one it expects (and no -v was given)
DEFAULT_COUNTER_OBIS = "0.0.43.1.0.255"
#: how often a session in this process took the meter's counter because ours was behind
#: (another gateway host used this meter since, or the state was lost); the worker
#: reports it for the ``counter_resyncs`` metric
RESYNCS = [0]
_RESYNC_LOCK = threading.Lock()


def count_resync() -> None:
    """One more counter taken from the meter (sessions run on several threads)."""
    with _RESYNC_LOCK:
        RESYNCS[0] += 1


def counter_key(meter_id: str, client_title: bytes, key: bytes) -> str:
    """File-name-safe identity; the key itself is only represented by a hash prefix."""
    key_id = hashlib.sha256(b"dlms2amqp-ic" + key).hexdigest()[:12]
    return f"{_SAFE.sub('_', meter_id)}__{client_title.hex()}__{key_id}"


class CounterStore:
    """High-water marks of invocation counters under ``state_dir/counters``."""

    def __init__(self, state_dir: Path):
        self.dir = Path(state_dir) / "counters"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the state directory {self.dir}: {exc}") from exc
        self._lock = threading.Lock()

    def alias(self, meter_key: str) -> Optional[str]:
        """The meter system title (hex) last seen at this address, if any."""
        try:
            text = (self.dir / "by-address" / _SAFE.sub("_", meter_key)).read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return text if re.fullmatch(r"[0-9a-f]{16}", text) else None

    def set_alias(self, meter_key: str, system_title_hex: str) -> None:
        """Remember which meter (system title) answers at this address."""
        if self.alias(meter_key) == system_title_hex:
            return
        folder = self.dir / "by-address"
        folder.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            f.write(system_title_hex + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / _SAFE.sub("_", meter_key))

    def _path(self, key: str) -> Path:
        return self.dir / key

    def load(self, key: str) -> int:
        """The high-water mark (0 when unknown): counters up to it may have been used."""
        try:
            text = self._path(key).read_text().strip()
        except FileNotFoundError:
            return 0
        try:
            return int(text)
        except ValueError:
            return 0

    def reserve(self, key: str, upto: int) -> int:
        """Persist a mark >= ``upto`` (never lowering it) before counters up to it are used."""
        with self._lock:
            current = self.load(key)
            if upto <= current:
                return current
            fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-")
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(f"{upto}\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self._path(key))
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
            dfd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            return upto


class CounterPolicy:
    """The invocation counter of one ciphered session: where it starts, what is reserved.

    Never lower than the meter's own counter (``-v``), ``-F``, or what the store says was
    used; reserved on disk before use (:meth:`reserve`, before every frame); and once the
    AARE told the meter's system title, kept under that title (:meth:`learn_title`), so
    the same meter reached at another address continues from its counters.  Gurux-free:
    the session reads the client's counter and sets what comes back.
    """

    def __init__(
        self, store: Optional[CounterStore], meter_key: str, client_title: bytes, key: bytes
    ):
        self.store = store
        self.meter_key = meter_key
        self.client_title = client_title
        self._key = key
        #: the file name the counter is kept under (None: no store, nothing persisted)
        self.name: Optional[str] = None
        self.reserved = 0
        #: the last :meth:`start` began at the meter's counter, above our own (a resync)
        self.resynced = False

    def start(
        self,
        meter_counter: Optional[int],
        initial: Optional[int],
        meter_title: Optional[bytes],
    ) -> int:
        """The first counter of the session (and its block reserved).

        Sets :attr:`resynced` when the meter's counter was above ours (``-F`` and the store).
        """
        own = initial or 1
        if self.store is not None:
            meter_id = (
                meter_title.hex()
                if meter_title
                else self.store.alias(self.meter_key) or self.meter_key
            )
            self.name = counter_key(meter_id, self.client_title, self._key)
            own = max(own, self.store.load(self.name) + 1)
        next_ic = max(meter_counter + 1 if meter_counter is not None else 1, own)
        self.resynced = next_ic > own
        self.reserve(next_ic)
        return next_ic

    def reserve(self, next_ic: int) -> None:
        """Persist a mark above ``next_ic`` before it is used (a block at a time)."""
        if self.store is None or self.name is None:
            return
        if next_ic + 4 > self.reserved:
            self.reserved = self.store.reserve(self.name, next_ic + BLOCK)

    def learn_title(self, title: bytes, next_ic: int) -> int:
        """Key the counter by the meter's system title from now on; the next counter to use.

        Counters already used with this meter elsewhere (another address) stay used.
        """
        if self.store is None or self.name is None:
            return next_ic
        new_name = counter_key(title.hex(), self.client_title, self._key)
        if new_name != self.name:
            prior = self.store.load(new_name)
            if prior >= next_ic:
                next_ic = prior + 1
            mark = max(self.reserved, self.store.load(self.name))
            self.reserved = self.store.reserve(new_name, mark)
            self.name = new_name
        self.store.set_alias(self.meter_key, title.hex())
        self.reserve(next_ic)
        return next_ic
