# SPDX-License-Identifier: GPL-2.0-or-later
"""The oracle of the fault suite and the benchmarks, and the canary secrets.

- every request id ends with exactly one distinct reply (duplicates byte-identical) or a
  dead-letter entry with a reason; no meter read twice for one id (``judge``, ``Row``);
  a reply split into numbered parts (``Part``/``Parts``) counts once, complete, and
  duplicates are compared part by part;
- ``scan_canaries``: fake secrets must not appear in logs, output, replies or dead-letter
  metadata.
"""

from __future__ import annotations

import contextlib
import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from testing.proxy import TcpProxy


# --- canary secrets ---------------------------------------------------------------------------
# Recognisable fake secrets: if any of them shows up in an output, something leaked.
CANARY_PASSWORD = "Cnry7PwQ"  # Low password (-P); the simulator is started with the same
CANARY_AKEY = "C0A1A2A3A4A5A6A7A8A9AAABACADAE5A"  # -A authentication key
CANARY_BKEY = "B0B1B2B3B4B5B6B7B8B9BABBBCBDBE5B"  # -B block cipher key
CANARY_DKEY = "D0DDD2D3D4D5D6D7D8D9DADBDCDDDE5D"  # -D dedicated key
CANARY_BROKER_PASSWORD = "BrokerCanary-9f3e1d"
CANARIES: tuple[str, ...] = (
    CANARY_PASSWORD,
    CANARY_AKEY,
    CANARY_BKEY,
    CANARY_DKEY,
    CANARY_BROKER_PASSWORD,
)


def canary_forms(canary: str) -> list[bytes]:
    """The byte forms a leak may take: literal, lower case, hex of the text, spaced hex."""
    forms = {canary.encode(), canary.lower().encode(), canary.encode().hex().encode()}
    if all(c in "0123456789ABCDEFabcdef" for c in canary) and len(canary) % 2 == 0:
        raw = bytes.fromhex(canary)
        forms |= {raw.hex(" ").encode(), raw.hex(" ").upper().encode()}
    else:
        forms.add(canary.encode().hex(" ").encode())
        forms.add(canary.encode().hex(" ").upper().encode())
        forms.add(canary.encode().hex().upper().encode())
    return sorted(forms)


def scan_canaries(named_blobs: Iterable[tuple[str, bytes]], extra: Iterable[str] = ()) -> list[str]:
    """Names of the blobs containing a canary, as ``"where: canary"`` lines (empty = clean)."""
    found = []
    forms = [(c, canary_forms(c)) for c in (*CANARIES, *extra)]
    for name, blob in named_blobs:
        low = blob.lower()
        for canary, fs in forms:
            if any(f.lower() in low for f in fs):
                found.append(f"{name}: {canary}")
    return found


def files_under(*dirs: Path) -> list[tuple[str, bytes]]:
    """(path, content) of every regular file below ``dirs`` (logs, stdout/stderr captures)."""
    out = []
    for d in dirs:
        if d.is_file():
            out.append((str(d), d.read_bytes()))
            continue
        for p in sorted(d.rglob("*")):
            if p.is_file() and p.stat().st_size < 200_000_000:
                with contextlib.suppress(OSError):
                    out.append((str(p), p.read_bytes()))
    return out


@dataclass
class Received:
    queue: str
    body: bytes
    props: Any
    headers: dict
    t: float = 0.0  # time.monotonic() when received


def reply_in_id(r: Received) -> str | None:
    """InMsgID of a reply, or the MsgID of a dead-lettered request (best effort)."""
    try:
        d = json.loads(r.body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        d = None
    if isinstance(d, dict):
        v = d.get("InMsgID", d.get("MsgID"))
        if isinstance(v, (str, int)):
            return str(v)
    if r.props is not None and r.props.message_id:
        return str(r.props.message_id)
    return None


def reply_part(r: Received) -> tuple[int, int] | None:
    """(Part, Parts) of a reply sent in numbered parts, None for a whole reply."""
    try:
        d = json.loads(r.body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(d, dict):
        return None
    part, parts = d.get("Part"), d.get("Parts")
    if isinstance(part, int) and isinstance(parts, int) and 1 <= part <= parts:
        return part, parts
    return None


def accounted_ids(items: list[Received], dlq: str = "") -> set[str]:
    return {i for i in (reply_in_id(r) for r in items) if i is not None}


def dead_letter_reason(r: Received) -> str:
    """The reason the daemon gave for a dead-letter (header names vary; x-death is broker's)."""
    h = r.headers
    for k in ("x-dlms2amqp-reason", "x-reason", "reason", "x-first-death-reason"):
        if k in h and h[k]:
            v = h[k]
            return v.decode() if isinstance(v, bytes) else str(v)
    deaths = h.get("x-death")
    if deaths:
        return str(deaths[0].get("reason", b"")) or "x-death"
    return ""


# --- the oracle ---------------------------------------------------------------------------
@dataclass
class Row:
    """One line of the faults table."""

    fault: str
    sent: int = 0
    replies: int = 0
    dead_lettered: int = 0
    lost: int = 0
    duplicated_identical: int = 0
    duplicated_divergent: int = 0
    sessions_repeated: int = -1  # -1: not measured (no counting proxy in front)
    notes: str = ""
    lost_ids: list[str] = field(default_factory=list)
    divergent_ids: list[str] = field(default_factory=list)
    unreasoned_dead: list[str] = field(default_factory=list)

    def ok(self, allow_repeats: bool = False) -> bool:
        return (
            self.lost == 0
            and self.duplicated_divergent == 0
            and not self.unreasoned_dead
            and (allow_repeats or self.sessions_repeated <= 0)
        )


ROWS: list[Row] = []  # collected by the tests, printed by tests/faults_plugin.py


def judge(
    fault: str,
    sent_ids: list[str],
    items: list[Received],
    out_queues: set[str],
    dlq: str,
    proxy: TcpProxy | None = None,
    port_of_id: dict[str, int] | None = None,
) -> Row:
    """Apply the oracle to what came back; returns the table row."""
    row = Row(fault, sent=len(sent_ids))
    by_id: dict[str, list[Received]] = defaultdict(list)
    for r in items:
        i = reply_in_id(r)
        if i is not None:
            by_id[i].append(r)
    for mid in sent_ids:
        got = by_id.get(mid, [])
        replies = [r for r in got if r.queue in out_queues]
        dead = [r for r in got if r.queue == dlq]
        if replies:
            by_part: dict[tuple[int, int] | None, set[bytes]] = defaultdict(set)
            for r in replies:
                by_part[reply_part(r)].add(r.body)
            announced = {p[1] for p in by_part if p is not None}
            complete = not announced or (
                len(announced) == 1
                and None not in by_part
                and set(by_part) == {(k, n) for n in announced for k in range(1, n + 1)}
            )
            if not complete:  # parts missing (or whole and parts mixed): not delivered
                row.lost += 1
                row.lost_ids.append(mid)
                continue
            row.replies += 1
            if any(len(bodies) > 1 for bodies in by_part.values()):
                row.duplicated_divergent += 1
                row.divergent_ids.append(mid)
            elif len(replies) > len(by_part):
                row.duplicated_identical += 1
        elif dead:
            row.dead_lettered += 1
            if not any(dead_letter_reason(r) for r in dead):
                row.unreasoned_dead.append(mid)
        else:
            row.lost += 1
            row.lost_ids.append(mid)
    if proxy is not None and port_of_id is not None:
        row.sessions_repeated = 0
        for mid in sent_ids:
            port = port_of_id.get(mid)
            st = proxy.stats.get(port) if port is not None else None
            if st is not None and st.sessions_with_reads > 1:
                row.sessions_repeated += st.sessions_with_reads - 1
    return row


def format_table(rows: list[Row]) -> str:
    head = (
        "fault",
        "sent",
        "replies",
        "dead-lettered",
        "lost",
        "dup identical",
        "dup divergent",
        "meter sessions repeated",
        "notes",
    )
    lines = [
        (
            r.fault,
            str(r.sent),
            str(r.replies),
            str(r.dead_lettered),
            str(r.lost),
            str(r.duplicated_identical),
            str(r.duplicated_divergent),
            str(r.sessions_repeated) if r.sessions_repeated >= 0 else "n/a",
            r.notes,
        )
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]

    def fmt(cols: tuple) -> str:
        return " | ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()

    return "\n".join([fmt(head), "-+-".join("-" * w for w in widths), *map(fmt, lines)])
