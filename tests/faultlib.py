# SPDX-License-Identifier: GPL-2.0-or-later
"""Building blocks of the fault-injection suite (tests/test_faults.py, bench/faults_report.py).

- ``TcpProxy``: a selectors-based TCP relay the test controls.  In front of the broker it
  simulates a silent network cut (``blackhole()``: bytes are swallowed, sockets stay open);
  in front of the meters it counts DLMS associations (AARQ) and completed reads (GET
  responses) per meter port, because the simulator has no per-meter session log.
- ``AmqpClient``: publishes requests with confirms and collects replies and dead-letters
  with reconnects (the broker itself is being faulted while we collect).
- ``Oracle``: every request id ends with exactly one distinct reply (duplicates
  byte-identical) or a dead-letter entry with a reason; no meter read twice for one id.
- ``scan_canaries``: fake secrets must not appear in logs, output, replies or dead-letter
  metadata.
- ``Daemon``: the real ``dlms2amqpd`` as a subprocess with its config, log and PIDs.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
import pika.exceptions

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


# --- requests ---------------------------------------------------------------------------------
def conn_string(port: int, canaries: bool = True, extra: str = "") -> str:
    """Connection string for simulated meter on ``port``: client 32, Low, canary secrets."""
    s = f"-h 127.0.0.1 -p {port} -c 32 -s 1 -a Low -i WRAPPER -P {CANARY_PASSWORD}"
    if canaries:
        s += f" -A {CANARY_AKEY} -B {CANARY_BKEY} -D {CANARY_DKEY}"
    return (s + " " + extra).strip()


def read_request(msg_id: str, port: int, obis: str = "1.0.1.8.0.255", **kw: Any) -> bytes:
    """A READ request body in the seed's format."""
    body = {
        "MsgID": msg_id,
        "Cmd": "READ",
        "ObisCode": obis,
        "ConnectionString": conn_string(port, **kw),
    }
    return json.dumps(body).encode()


# --- TCP proxy --------------------------------------------------------------------------------
WRAPPER_HEADER = 8
TAG_AARQ = 0x60
TAG_GET_RESPONSE = 0xC4


class _Stream:
    """Splits a WRAPPER byte stream into APDUs (first byte = tag); tolerant of garbage."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[int]:
        self.buf += data
        tags = []
        while len(self.buf) >= WRAPPER_HEADER:
            if self.buf[0:2] != b"\x00\x01":
                self.buf.clear()  # not WRAPPER (garbage fault): stop parsing this stream
                break
            n = int.from_bytes(self.buf[6:8], "big")
            if len(self.buf) < WRAPPER_HEADER + n:
                break
            apdu = bytes(self.buf[WRAPPER_HEADER : WRAPPER_HEADER + n])
            del self.buf[: WRAPPER_HEADER + n]
            if apdu:
                tags.append(apdu[0])
        return tags


@dataclass
class PortStats:
    """What one meter saw through the proxy."""

    connections: int = 0
    aarqs: int = 0
    get_responses: int = 0
    sessions_with_reads: int = 0  # connections in which at least one GET was answered


class _Pair:
    def __init__(self, client: socket.socket, upstream: socket.socket, listen_port: int):
        self.client = client
        self.upstream = upstream
        self.listen_port = listen_port
        self.c2s = _Stream()
        self.s2c = _Stream()
        self.out: dict[socket.socket, bytearray] = {client: bytearray(), upstream: bytearray()}
        self.read_seen = False


class TcpProxy:
    """Relays 127.0.0.1:<listen port> to targets; counts DLMS APDUs; can blackhole.

    ``blackhole()`` keeps every socket open but swallows what arrives, like a cable cut
    somewhere in the network: neither side sees a FIN or RST, only silence.
    """

    def __init__(
        self, targets: list[int], target_host: str = "127.0.0.1", count_dlms: bool = False
    ):
        self.target_host = target_host
        self.count_dlms = count_dlms
        self.sel = selectors.DefaultSelector()
        self.listeners: dict[int, int] = {}  # listen port -> target port
        self.stats: dict[int, PortStats] = defaultdict(PortStats)  # keyed by target port
        self.pairs: list[_Pair] = []
        self.blackholed = False
        self.refuse_new = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        for t in targets:
            ls = socket.socket()
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind(("127.0.0.1", 0))
            ls.listen(256)
            ls.setblocking(False)
            self.listeners[ls.getsockname()[1]] = t
            self.sel.register(ls, selectors.EVENT_READ, ("listen", ls.getsockname()[1]))
        self.port_of = {t: lp for lp, t in self.listeners.items()}  # target -> listen port
        self.thread = threading.Thread(target=self._loop, name="tcpproxy", daemon=True)
        self.thread.start()

    # control (any thread) ---------------------------------------------------------------
    def blackhole(self) -> None:
        """Start swallowing all traffic of existing and new connections (silent cut)."""
        with self._lock:
            self.blackholed = True
            self.refuse_new = True

    def restore(self) -> None:
        """End the cut: existing (dead) connections are closed, new ones forwarded."""
        with self._lock:
            self.blackholed = False
            self.refuse_new = False
        self._wake_w.send(b"r")

    def open_connections(self) -> int:
        with self._lock:
            return len(self.pairs)

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self.thread.join(5)
        for key in list(self.sel.get_map().values()):
            with contextlib.suppress(Exception):
                key.fileobj.close()
        self.sel.close()
        self._wake_w.close()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def total(self) -> PortStats:
        t = PortStats()
        for s in self.stats.values():
            t.connections += s.connections
            t.aarqs += s.aarqs
            t.get_responses += s.get_responses
            t.sessions_with_reads += s.sessions_with_reads
        return t

    # the loop ---------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            for key, _mask in self.sel.select(0.5):
                kind, arg = key.data
                try:
                    if kind == "wake":
                        with contextlib.suppress(BlockingIOError):
                            self._wake_r.recv(100)
                        if not self.blackholed:
                            # connections that lived through a cut are dead: drop them
                            for p in list(self.pairs):
                                if getattr(p, "cut", False):
                                    self._drop(p)
                    elif kind == "listen":
                        self._accept(key.fileobj, arg)
                    else:
                        self._io(arg, key.fileobj, _mask)
                except OSError:
                    if kind == "pair":
                        self._drop(arg)

    def _accept(self, ls: socket.socket, listen_port: int) -> None:
        try:
            c, _ = ls.accept()
        except BlockingIOError:
            return
        if self.refuse_new:
            c.close()  # the network is down: nothing reaches the other side
            return
        target = self.listeners[listen_port]
        try:
            u = socket.create_connection((self.target_host, target), timeout=5)
        except OSError:
            c.close()
            return
        c.setblocking(False)
        u.setblocking(False)
        p = _Pair(c, u, listen_port)
        with self._lock:
            self.pairs.append(p)
        self.stats[target].connections += 1
        self.sel.register(c, selectors.EVENT_READ, ("pair", p))
        self.sel.register(u, selectors.EVENT_READ, ("pair", p))

    def _io(self, p: _Pair, s: socket.socket, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            buf = p.out[s]
            n = s.send(buf)
            del buf[:n]
            if not buf:
                self.sel.modify(s, selectors.EVENT_READ, ("pair", p))
        if not mask & selectors.EVENT_READ:
            return
        data = s.recv(65536)
        if not data:
            self._drop(p)
            return
        if self.blackholed:
            p.cut = True  # type: ignore[attr-defined]
            return  # swallowed
        other = p.upstream if s is p.client else p.client
        if self.count_dlms:
            self._count(p, s is p.client, data)
        p.out[other] += data
        self.sel.modify(other, selectors.EVENT_READ | selectors.EVENT_WRITE, ("pair", p))

    def _count(self, p: _Pair, from_client: bool, data: bytes) -> None:
        st = self.stats[self.listeners[p.listen_port]]
        if from_client:
            st.aarqs += sum(1 for t in p.c2s.feed(data) if t == TAG_AARQ)
        else:
            n = sum(1 for t in p.s2c.feed(data) if t == TAG_GET_RESPONSE)
            st.get_responses += n
            if n and not p.read_seen:
                p.read_seen = True
                st.sessions_with_reads += 1

    def _drop(self, p: _Pair) -> None:
        for s in (p.client, p.upstream):
            with contextlib.suppress(Exception):
                self.sel.unregister(s)
            with contextlib.suppress(Exception):
                s.close()
        with self._lock:
            if p in self.pairs:
                self.pairs.remove(p)


# --- AMQP client side ------------------------------------------------------------------------
@dataclass
class Received:
    queue: str
    body: bytes
    props: Any
    headers: dict
    t: float = 0.0  # time.monotonic() when received


class AmqpClient:
    """Test-side broker access: publish with confirms, collect with reconnects."""

    def __init__(self, params_factory: Any):
        self.params_factory = params_factory

    def connect(self) -> pika.BlockingConnection:
        return pika.BlockingConnection(self.params_factory())

    def publish(self, queue: str, bodies: list[tuple[str, bytes]], reply_to: str = "") -> None:
        """Publish persistent, mandatory, confirmed messages; raises if one is not confirmed."""
        conn = self.connect()
        try:
            ch = conn.channel()
            ch.confirm_delivery()
            for mid, body in bodies:
                ch.basic_publish(
                    "",
                    queue,
                    body,
                    pika.BasicProperties(
                        delivery_mode=2,
                        content_type="application/json",
                        message_id=mid,
                        reply_to=reply_to or None,
                    ),
                    mandatory=True,
                )
        finally:
            with contextlib.suppress(Exception):
                conn.close()

    def queue_depth(self, queue: str) -> tuple[int, int] | None:
        """(messages ready, consumers) of ``queue`` or None if it does not exist."""
        try:
            conn = self.connect()
        except (pika.exceptions.AMQPError, OSError):
            return None
        try:
            ch = conn.channel()
            ok = ch.queue_declare(queue, passive=True)
            return ok.method.message_count, ok.method.consumer_count
        except pika.exceptions.ChannelClosedByBroker:
            return None
        finally:
            with contextlib.suppress(Exception):
                conn.close()

    def delete_queues(self, names: Iterable[str]) -> None:
        with contextlib.suppress(Exception):
            conn = self.connect()
            try:
                for n in names:
                    ch = conn.channel()
                    with contextlib.suppress(pika.exceptions.ChannelClosedByBroker):
                        ch.queue_delete(n)
            finally:
                conn.close()


class Collector:
    """Consumes reply and dead-letter queues in a thread; reconnects through broker faults."""

    def __init__(self, client: AmqpClient, queues: list[str]):
        self.client = client
        self.queues = queues
        self.items: list[Received] = []
        self.errors: list[str] = []
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="collector", daemon=True)

    def start(self) -> Collector:
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(15)

    def _run(self) -> None:
        while not self._stop.is_set():
            conn = None
            try:
                conn = self.client.connect()
                ch = conn.channel()
                ch.basic_qos(prefetch_count=500)
                for q in self.queues:
                    try:
                        ch.queue_declare(q, passive=True)
                    except pika.exceptions.ChannelClosedByBroker:
                        ch = conn.channel()  # not declared yet by the daemon
                        raise RuntimeError(f"queue {q} not there yet") from None

                    def cb(c: Any, m: Any, p: Any, b: bytes, q: str = q) -> None:
                        with self.lock:
                            self.items.append(
                                Received(q, b, p, dict(p.headers or {}), time.monotonic())
                            )
                        c.basic_ack(m.delivery_tag)

                    ch.basic_consume(q, cb)
                while not self._stop.is_set():
                    conn.process_data_events(time_limit=0.2)
            except Exception as e:  # noqa: BLE001 - keep collecting through faults
                self.errors.append(type(e).__name__)
                time.sleep(0.5)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.close()

    def snapshot(self) -> list[Received]:
        with self.lock:
            return list(self.items)

    def wait_ids(self, ids: set[str], timeout: float, dlq: str = "") -> bool:
        """Wait until every id has a reply or a dead-letter entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ids <= accounted_ids(self.snapshot(), dlq):
                return True
            time.sleep(0.3)
        return False


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
            row.replies += 1
            bodies = {r.body for r in replies}
            if len(bodies) > 1:
                row.duplicated_divergent += 1
                row.divergent_ids.append(mid)
            elif len(replies) > 1:
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
            st = proxy.stats.get(port_of_id[mid])
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


# --- processes ------------------------------------------------------------------------------
def children_of(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
        except OSError:
            continue
        ppid = int(st[st.rindex(")") + 2 :].split()[1])
        if ppid == pid:
            out.append(int(d))
    return out


def rss_kb(pids: Iterable[int]) -> int:
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for ln in f:
                    if ln.startswith("VmRSS:"):
                        total += int(ln.split()[1])
        except OSError:
            pass
    return total


@dataclass
class Daemon:
    """The real dlms2amqpd in a subprocess, with its own config, state dir and log."""

    workdir: Path
    config: dict[str, Any]
    proc: subprocess.Popen | None = None
    starts: int = 0

    @property
    def config_path(self) -> Path:
        return self.workdir / "dlms2amqp.json"

    @property
    def log_path(self) -> Path:
        return self.workdir / "debug.log"

    def start(self) -> Daemon:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = {
            "DebugFile": str(self.log_path),
            "StateDir": str(self.workdir / "state"),
            "MetricsPort": 0,
            "LogLevel": "Debug",
            **self.config,
        }
        self.config_path.write_text(json.dumps(cfg, indent=1))
        self.starts += 1
        out = open(self.workdir / f"output.{self.starts}.txt", "wb")  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dlms2amqp.cli.daemon", "-c", str(self.config_path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.workdir,
            )
        finally:
            out.close()
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def workers(self) -> list[int]:
        return children_of(self.pid) if self.alive() else []

    def output(self) -> str:
        parts = []
        for p in sorted(self.workdir.glob("output.*.txt")):
            parts.append(p.read_text(errors="replace"))
        return "\n".join(parts)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_consuming(self, client: AmqpClient, queue: str, timeout: float = 60) -> None:
        """Wait until the daemon consumes ``queue`` (consumer count >= 1)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise AssertionError(
                    f"dlms2amqpd exited with {self.proc.returncode}:\n{self.output()[-3000:]}"
                )
            d = client.queue_depth(queue)
            if d is not None and d[1] >= 1:
                return
            time.sleep(0.3)
        raise AssertionError(f"dlms2amqpd not consuming {queue} after {timeout} s")

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait_exit(self, timeout: float) -> int | None:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill9(self) -> int:
        """SIGKILL the master only (workers notice their parent died); returns exit code."""
        os.kill(self.pid, signal.SIGKILL)
        rc = self.proc.wait(10)
        # orphaned workers: a service manager would kill the whole unit; so do we
        time.sleep(0.5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        return rc

    def stop(self, grace: float = 40.0) -> int | None:
        """SIGTERM, then SIGKILL of the process group; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return self.proc.returncode


# --- scenarios ------------------------------------------------------------------------------
@dataclass
class Result:
    """A scenario's table row, the evidence that the fault happened, and what went wrong."""

    row: Row
    evidence: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.row.fault}: evidence={self.evidence} problems={self.problems} "
            f"leaks={self.leaks} lost={self.row.lost_ids[:10]} "
            f"divergent={self.row.divergent_ids[:10]} unreasoned={self.row.unreasoned_dead[:10]}"
        )


def stored_reply_ids(state_dir: Path) -> set[str]:
    """MsgIDs whose reply is in the daemon's reply store (read-only peek at its SQLite)."""
    import sqlite3

    path = state_dir / "replies.sqlite3"
    if not path.exists():
        return set()
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return {k.split("|", 1)[0] for (k,) in db.execute("SELECT key FROM replies")}
    finally:
        db.close()


def wait_for(pred: Any, timeout: float, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return bool(pred())


def worker_pids(daemon: Daemon) -> list[int]:
    """The daemon's worker processes (its children running multiprocessing.spawn)."""
    out = []
    for pid in daemon.workers():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"resource_tracker" not in cmd:
            out.append(pid)
    return out


class Lab:
    """A private broker node, a latency simulator and helpers to run one fault scenario."""

    def __init__(self, workdir: Path, meters: int = 40, latency_ms: int = 300, tls: bool = False):
        from tests.brokernode import BrokerNode

        self.workdir = workdir
        self.meters = meters
        self.latency_ms = latency_ms
        self.node = BrokerNode(user="d2afault", password=CANARY_BROKER_PASSWORD, tls=tls)
        self.client = AmqpClient(self.node.params)
        self._stack = contextlib.ExitStack()
        self.sim: Any = None
        self.rows: list[Row] = []

    def __enter__(self) -> Lab:
        from tests.helpers_sim import running_simulator

        try:
            self.node.start()
            self._stack.callback(self.node.destroy)
            self.sim = self._stack.enter_context(
                running_simulator(
                    self.meters, "-P", CANARY_PASSWORD, "--latency", str(self.latency_ms)
                )
            )
        except BaseException:
            self._stack.close()
            self.node.destroy()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def sim_ports(self) -> list[int]:
        return list(range(self.sim.port, self.sim.port + self.meters))

    def daemon_config(self, in_q: str, out_q: str, port: int, **over: Any) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "HostName": "127.0.0.1",
            "Port": port,
            "VirtualHost": "/",
            "UserName": self.node.user,
            "Password": self.node.password,
            "InQueue": in_q,
            "OutQueue": out_q,
            "Workers": 2,
            "SessionsPerWorker": 8,
            "RequestTimeout": 20,
            "FrameTimeout": 3,
            "Heartbeat": 5,
            "ReconnectMaxDelay": 2,
            "ShutdownGrace": 25,
        }
        cfg.update(over)
        return cfg

    def run(
        self,
        name: str,
        fault: Any,
        requests: int | None = None,
        via_proxy: bool = False,
        allow_repeats: bool = False,
        config: dict[str, Any] | None = None,
        timeout: float = 90.0,
    ) -> Result:
        """Start a daemon, publish one READ per meter, inject ``fault(ctx)``, apply the oracle.

        Each request goes to its own meter (through a counting proxy), so a meter with two
        sessions that both got an answer means one request id was read twice.
        """
        slug = "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())
        uid = f"{slug}-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
        in_q, out_q = f"d2af.{uid}.in", f"d2af.{uid}.out"
        dlq = in_q + ".dead"
        n = requests or self.meters
        ports = self.sim_ports()[:n]
        res = Result(Row(name))
        with contextlib.ExitStack() as st:
            meters = TcpProxy(ports, count_dlms=True)
            st.callback(meters.close)
            broker_proxy = None
            port = self.node.port
            if via_proxy:
                broker_proxy = TcpProxy([self.node.port])
                st.callback(broker_proxy.close)
                port = next(iter(broker_proxy.listeners))
            daemon = Daemon(
                self.workdir / uid, self.daemon_config(in_q, out_q, port, **(config or {}))
            )
            st.callback(lambda: self.client.delete_queues([in_q, out_q, dlq]))
            st.callback(daemon.stop)
            daemon.start()
            daemon.wait_consuming(self.client, in_q)
            collector = Collector(self.client, [out_q, dlq]).start()
            st.callback(collector.stop)
            ids = [f"{slug}-{i}" for i in range(n)]
            port_of_id = dict(zip(ids, ports))
            bodies = [(i, read_request(i, meters.port_of[p])) for i, p in port_of_id.items()]
            self.client.publish(in_q, bodies)
            t_pub = time.monotonic()
            ctx = Ctx(
                self, daemon, meters, broker_proxy, collector, in_q, out_q, dlq, t_pub, bodies
            )
            try:
                res.evidence.update(fault(ctx) or {})
            except AssertionError as e:
                res.problems.append(f"fault not confirmed: {e}")
            if not collector.wait_ids(set(ids), timeout):
                res.problems.append(f"not every request accounted for after {timeout:.0f} s")
            time.sleep(1.0)  # late duplicates
            if not daemon.alive():
                res.problems.append(f"daemon not running at the end (rc {daemon.proc.returncode})")
            rc = daemon.stop()
            res.evidence["final_exit_code"] = rc
            items = collector.snapshot()
            res.row = judge(name, ids, items, {out_q}, dlq, meters, port_of_id)
            repeated_after_store = ctx.no_repeat_ids & {
                i for i in ids if meters.stats[port_of_id[i]].sessions_with_reads > 1
            }
            if repeated_after_store:
                res.problems.append(
                    f"meter read again for ids whose reply was already stored: "
                    f"{sorted(repeated_after_store)[:10]}"
                )
            if not allow_repeats and res.row.sessions_repeated > 0:
                res.problems.append(f"{res.row.sessions_repeated} meter sessions repeated")
            res.leaks = leak_scan(daemon, items, dlq)
            res.row.notes = ctx.notes
        self.rows.append(res.row)
        ROWS.append(res.row)
        return res


def leak_scan(
    daemon: Daemon, items: list[Received], dlq: str, extra: Iterable[str] = ()
) -> list[str]:
    """Canaries in the daemon's files and output, in replies, in dead-letter metadata."""
    blobs = files_under(daemon.workdir)
    # positive control: the config file holds the broker password, the scanner must see it
    if daemon.config_path.exists() and not scan_canaries(
        [("config", daemon.config_path.read_bytes())]
    ):
        raise AssertionError("canary scanner does not find the broker password in the config")
    blobs = [(n, b) for n, b in blobs if not n.endswith((".sqlite3", ".sqlite3-wal", ".json"))]
    for r in items:
        if r.queue == dlq:
            # the dead-lettered request is the client's own message; its metadata is ours
            blobs.append((f"dead-letter headers of {reply_in_id(r)}", repr(r.headers).encode()))
        else:
            blobs.append((f"reply {reply_in_id(r)}", r.body))
    return scan_canaries(blobs, extra)


@dataclass
class Ctx:
    """What a fault function may touch."""

    lab: Lab
    daemon: Daemon
    meters: TcpProxy
    broker_proxy: TcpProxy | None
    collector: Collector
    in_q: str
    out_q: str
    dlq: str
    t_published: float
    bodies: list[tuple[str, bytes]] = field(default_factory=list)
    no_repeat_ids: set[str] = field(default_factory=set)
    notes: str = ""

    def replies(self) -> int:
        return len(self.collector.snapshot())

    def wait_some_progress(self, min_replies: int = 3, timeout: float = 30) -> None:
        """Wait until a few replies are out and meter sessions are open (under load)."""
        ok = wait_for(
            lambda: self.replies() >= min_replies and self.meters.open_connections() > 0, timeout
        )
        if not ok:
            raise AssertionError(
                f"no load to fault: {self.replies()} replies, "
                f"{self.meters.open_connections()} meter connections"
            )

    def log_count(self, event: str) -> int:
        """Occurrences of ``event`` in the daemon's log file and output."""
        return self.daemon.log_text().count(event) + self.daemon.output().count(event)

    def wait_log_increase(self, event: str, before: int, timeout: float) -> bool:
        return wait_for(lambda: self.log_count(event) > before, timeout, 0.2)


# --- the faults -----------------------------------------------------------------------------
LOST_EVENT = "broker_connection_lost"


def fault_broker_restart(ctx: Ctx) -> dict[str, Any]:
    """rabbitmqctl stop_app, 3 s down, start_app, while requests are in flight."""
    ctx.wait_some_progress()
    pid, lost = ctx.daemon.pid, ctx.log_count(LOST_EVENT)
    ctx.lab.node.stop_app()
    down = not ctx.lab.node.amqp_ok()
    time.sleep(3)
    ctx.lab.node.start_app()
    assert down, "the broker still accepted AMQP after stop_app"
    assert ctx.wait_log_increase(LOST_EVENT, lost, 30), "daemon did not log the lost connection"
    assert ctx.daemon.alive() and ctx.daemon.pid == pid, "daemon died"
    ctx.notes = "stop_app 3 s"
    return {"stop_app_rc": 0, "amqp_refused_while_stopped": down, "daemon_pid_unchanged": pid}


def fault_close_all(ctx: Ctx) -> dict[str, Any]:
    """rabbitmqctl close_all_connections while requests are in flight."""
    ctx.wait_some_progress()
    pid, lost = ctx.daemon.pid, ctx.log_count(LOST_EVENT)
    n = ctx.lab.node.close_all_connections()
    assert n >= 1, "no connection to close"
    assert ctx.wait_log_increase(LOST_EVENT, lost, 30), "daemon did not log the lost connection"
    assert ctx.daemon.alive() and ctx.daemon.pid == pid, "daemon died"
    return {"connections_closed": n, "daemon_pid_unchanged": pid}


def fault_silent_cut(ctx: Ctx) -> dict[str, Any]:
    """Blackhole the daemon's broker connection (no FIN, no RST) until it notices."""
    assert ctx.broker_proxy is not None
    ctx.wait_some_progress()
    hb = float(ctx.daemon.config.get("Heartbeat", 30))
    lost = ctx.log_count(LOST_EVENT)
    assert ctx.broker_proxy.open_connections() >= 1, "daemon not connected through the proxy"
    ctx.broker_proxy.blackhole()
    t0 = time.monotonic()
    # the daemon drops a connection silent for 1.5 heartbeats (pika alone: up to
    # 2 x (heartbeat + 5) s); a little margin for a busy machine
    limit = 2 * hb + 2
    detected = ctx.wait_log_increase(LOST_EVENT, lost, limit + 30)
    dt = time.monotonic() - t0
    time.sleep(2)  # reconnect attempts during the cut must fail cleanly
    ctx.broker_proxy.restore()
    ctx.notes = f"heartbeat {hb:g} s, detected after {dt:.1f} s"
    assert detected, f"cut not detected within {limit + 30:.0f} s"
    assert dt <= limit, f"cut detected only after {dt:.1f} s (heartbeat {hb:g} s)"
    return {"detected_after_s": round(dt, 1), "heartbeat_s": hb}


def fault_kill_worker(ctx: Ctx) -> dict[str, Any]:
    """SIGKILL one worker process in the middle of meter sessions."""
    ctx.wait_some_progress()
    before = worker_pids(ctx.daemon)
    assert before, "no worker process found"
    sessions = ctx.meters.open_connections()
    victim = before[0]
    os.kill(victim, signal.SIGKILL)
    replaced = wait_for(
        lambda: (
            victim not in worker_pids(ctx.daemon) and len(worker_pids(ctx.daemon)) >= len(before)
        ),
        30,
    )
    assert sessions > 0, "no meter session open at the kill"
    assert replaced, "the killed worker was not replaced"
    new = sorted(set(worker_pids(ctx.daemon)) - set(before))
    ctx.notes = "repeats allowed: first attempt died"
    return {"killed_pid": victim, "new_worker_pids": new, "meter_sessions_open": sessions}


def fault_kill_master(ctx: Ctx) -> dict[str, Any]:
    """SIGKILL the master mid-load, restart it on the same StateDir, then replay answered ones.

    Requests whose reply was stored before the kill must not be read again; re-publishing
    five answered requests (a redelivery as the broker would make it) must give the very
    same reply bytes from the store, without a meter session.
    """
    ctx.wait_some_progress()
    d = ctx.daemon
    old = d.pid
    rc = d.kill9()
    assert rc == -signal.SIGKILL, f"master exit code {rc}"
    stored = stored_reply_ids(d.workdir / "state")
    ctx.no_repeat_ids |= stored
    d.start()
    d.wait_consuming(ctx.lab.client, ctx.in_q)
    assert d.pid != old, "same PID after restart"
    ids = {i for i, _ in ctx.bodies}
    ctx.collector.wait_ids(ids, 60)
    sessions = ctx.meters.total().aarqs
    replay = ctx.bodies[:5]  # checked below: no new meter session at all for these
    n_before = len(ctx.collector.snapshot())
    ctx.lab.client.publish(ctx.in_q, replay)
    wait_for(lambda: len(ctx.collector.snapshot()) >= n_before + len(replay), 30)
    time.sleep(0.5)
    new_sessions = ctx.meters.total().aarqs - sessions
    from_store = ctx.log_count("answered_from_store")
    ctx.notes = f"{len(stored)} stored before kill; 5 replayed; {from_store} from store"
    assert new_sessions == 0, f"{new_sessions} meter sessions opened for replayed requests"
    assert from_store >= len(replay), f"only {from_store} answers from the reply store"
    return {"exit_code": rc, "old_pid": old, "new_pid": d.pid, "stored_before_kill": len(stored)}


def fault_sigterm(ctx: Ctx) -> dict[str, Any]:
    """SIGTERM under load (finish in-flight, requeue the rest), then restart."""
    ctx.wait_some_progress()
    d = ctx.daemon
    old = d.pid
    t0 = time.monotonic()
    d.signal(signal.SIGTERM)
    rc = d.wait_exit(float(d.config.get("ShutdownGrace", 30)) + 20)
    took = time.monotonic() - t0
    assert rc == 0, f"exit code after SIGTERM: {rc}"
    answered = len(ctx.collector.snapshot())
    d.start()
    d.wait_consuming(ctx.lab.client, ctx.in_q)
    assert d.pid != old
    ctx.notes = f"stopped in {took:.1f} s, {answered} answered before restart"
    return {"exit_code": rc, "stop_seconds": round(took, 1), "answered_before_restart": answered}


def fault_memory_alarm(ctx: Ctx) -> dict[str, Any]:
    """Broker memory alarm (publishers blocked) for 10 s under load, then cleared."""
    ctx.wait_some_progress()
    node = ctx.lab.node
    node.ctl("set_vm_memory_high_watermark", "absolute", "1")
    try:
        time.sleep(4)
        during0 = ctx.replies()
        time.sleep(6)
        during1 = ctx.replies()
        alarms = node.ctl("eval", "rabbit_alarm:get_alarms().", check=False).stdout.strip()
    finally:
        node.ctl("set_vm_memory_high_watermark", "0.8")
    ctx.notes = f"replies during the alarm: {during1 - during0} in 6 s"
    assert "memory" in alarms, f"no memory alarm raised: {alarms[:200]}"
    assert during1 == during0, "replies still published while the broker blocked publishers"
    assert ctx.daemon.alive(), "daemon died"
    return {"alarm": alarms[:120], "replies_during_alarm": during1 - during0}


SCENARIOS: dict[str, dict[str, Any]] = {
    "broker stop_app/start_app": {"fault": fault_broker_restart},
    "close_all_connections": {"fault": fault_close_all},
    "silent network cut": {"fault": fault_silent_cut, "via_proxy": True},
    "kill -9 worker": {"fault": fault_kill_worker, "allow_repeats": True},
    "kill -9 master + restart": {"fault": fault_kill_master, "allow_repeats": True},
    "SIGTERM + restart": {"fault": fault_sigterm},
    "SIGTERM, 2 s grace + restart": {
        "fault": fault_sigterm,
        "allow_repeats": True,  # a session cut at the end of the grace period is read again
        "config": {"ShutdownGrace": 2},
    },
    "memory alarm (blocked publishers)": {
        "fault": fault_memory_alarm,
        "config": {"BlockedConnectionTimeout": 5},
    },
    "close_all_connections (quorum)": {"fault": fault_close_all, "config": {"QueueType": "quorum"}},
    "kill -9 master + restart (quorum)": {
        "fault": fault_kill_master,
        "allow_repeats": True,
        "config": {"QueueType": "quorum"},
    },
}


# --- scenarios with their own shape ----------------------------------------------------------
@dataclass
class Env:
    daemon: Daemon
    collector: Collector
    in_q: str
    out_q: str
    dlq: str


@contextlib.contextmanager
def daemon_env(
    lab: Lab, name: str, config: dict[str, Any] | None = None, params: Any = None
) -> Any:
    """A daemon on unique queues of the lab's node, with a collector; cleaned up after."""
    uid = f"{name}-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
    in_q, out_q = f"d2af.{uid}.in", f"d2af.{uid}.out"
    dlq = in_q + ".dead"
    cfg = lab.daemon_config(in_q, out_q, lab.node.port, **(config or {}))
    daemon = Daemon(lab.workdir / uid, cfg)
    client = AmqpClient(params or lab.node.params)
    collector = Collector(lab.client, [out_q, dlq])
    try:
        daemon.start()
        daemon.wait_consuming(lab.client, in_q)
        collector.start()
        yield Env(daemon, collector, in_q, out_q, dlq)
    finally:
        daemon.stop()
        collector.stop()
        client.delete_queues([in_q, out_q, dlq])


def reply_dict(r: Received) -> dict[str, Any]:
    try:
        d = json.loads(r.body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return {}
    return d if isinstance(d, dict) else {}


METER_FAULTS = ("--silent", "--garbage", "--reset", "--reject-auth")


def scenario_meter_faults(lab: Lab, per_fault: int = 3, healthy: int = 12) -> list[Result]:
    """Meters that never answer, answer garbage, reset, reject auth; healthy ones alongside.

    Each faulty request must get a notok reply with an Error within RequestTimeout (+10 s
    slack for the queue), and every healthy request an ok reply: other work carries on.
    """
    from tests.helpers_sim import running_simulator

    results: list[Result] = []
    request_timeout = 15.0
    with contextlib.ExitStack() as st:
        sims = {
            f: st.enter_context(running_simulator(per_fault, f, "-P", CANARY_PASSWORD))
            for f in METER_FAULTS
        }
        env = st.enter_context(
            daemon_env(
                lab,
                "meterfaults",
                # frame traces on: the Low password inside the AARQ must still be masked
                {"RequestTimeout": request_timeout, "FrameTimeout": 3, "Trace": True},
            )
        )
        groups: dict[str, list[tuple[str, bytes]]] = {}
        for f, sim in sims.items():
            groups[f] = [
                (f"mf{f}-{k}", read_request(f"mf{f}-{k}", sim.port + k)) for k in range(per_fault)
            ]
        groups["healthy"] = [
            (
                f"mf-healthy-{k}",
                read_request(f"mf-healthy-{k}", lab.sim.port + k, extra="-t Verbose"),
            )
            for k in range(healthy)
        ]
        everything = [b for g in groups.values() for b in g]
        t0 = time.monotonic()
        lab.client.publish(env.in_q, everything)
        env.collector.wait_ids({i for i, _ in everything}, request_timeout * 3 + 30)
        time.sleep(0.5)
        items = env.collector.snapshot()
        pid_alive = env.daemon.alive()
        leaks = leak_scan(env.daemon, items, env.dlq)
    by_id = {reply_in_id(r): r for r in items if r.queue == env.out_q}
    for g, bodies in groups.items():
        ids = [i for i, _ in bodies]
        res = Result(judge(f"meter {g.lstrip('-')}", ids, items, {env.out_q}, env.dlq))
        res.leaks = leaks
        worst = 0.0
        for i in ids:
            r = by_id.get(i)
            if r is None:
                continue
            d = reply_dict(r)
            worst = max(worst, r.t - t0)
            if g == "healthy":
                if d.get("Status") != "ok":
                    res.problems.append(
                        f"{i}: healthy meter got {d.get('Status')}: {d.get('Error')}"
                    )
            else:
                if d.get("Status") != "notok" or not d.get("Error"):
                    res.problems.append(f"{i}: expected notok with an Error, got {d}")
                if r.t - t0 > request_timeout + 10:
                    res.problems.append(f"{i}: answered after {r.t - t0:.1f} s")
        res.evidence = {"slowest_reply_s": round(worst, 1), "daemon_alive": pid_alive}
        errs = sorted({str(reply_dict(by_id[i]).get("Error"))[:60] for i in ids if i in by_id})
        res.row.notes = f"slowest {worst:.1f} s; " + "; ".join(errs[:2])
        if not pid_alive:
            res.problems.append("daemon died")
        results.append(res)
        lab.rows.append(res.row)
        ROWS.append(res.row)
    return results


def bad_request_corpus(meter_port: int) -> list[tuple[str, str | None, bytes]]:
    """(label, MsgID the reply must carry or None, body) of malformed requests."""
    good_cs = conn_string(meter_port)

    def req(mid: Any, **kw: Any) -> bytes:
        d: dict[str, Any] = {
            "MsgID": mid,
            "Cmd": "READ",
            "ObisCode": "1.0.1.8.0.255",
            "ConnectionString": good_cs,
        }
        for k, v in kw.items():
            if v is None:
                d.pop(k, None)
            else:
                d[k] = v
        return json.dumps(d).encode()

    deep = b'{"MsgID": "bad-deep", "x": ' + b"[" * 20000 + b"]" * 20000 + b"}"
    big = b'{"MsgID": "bad-10mb", "Cmd": "READ", "pad": "' + b"A" * (10 * 1024 * 1024) + b'"}'
    c = [
        ("not json", None, b"this is not JSON {" + CANARY_PASSWORD.encode()),
        ("empty body", None, b""),
        ("invalid utf-8", None, b'{"MsgID": "\xff\xfe"}'),
        ("json array", None, b'["READ", "1.0.1.8.0.255"]'),
        ("json null", None, b"null"),
        ("10 MB body", None, big),
        ("deep nesting", None, deep),
        ("missing MsgID", None, req(None, MsgID=None)),
        ("MsgID list", None, req(["x"])),
        ("Cmd number", "bad-cmdnum", req("bad-cmdnum", Cmd=7)),
        ("ObisCode number", "bad-obisnum", req("bad-obisnum", ObisCode=1.8)),
        ("ConnectionString object", "bad-csobj", req("bad-csobj", ConnectionString={"h": 1})),
        ("unknown command", "bad-unknown", req("bad-unknown", Cmd="WRITE")),
        ("missing Cmd", "bad-nocmd", req("bad-nocmd", Cmd=None)),
        ("missing ObisCode", "bad-noobis", req("bad-noobis", ObisCode=None)),
        ("missing ConnectionString", "bad-nocs", req("bad-nocs", ConnectionString=None)),
        ("bad obis", "bad-obis", req("bad-obis", ObisCode="1.2.3")),
        ("bad dtFrom", "bad-dtfrom", req("bad-dtfrom", dtFrom="yesterday")),
        ("bad dtTo", "bad-dtto", req("bad-dtto", dtTo="2022-13-45T99:00:00")),
        (
            "dtFrom after dtTo",
            "bad-dtorder",
            req("bad-dtorder", dtFrom="2024-02-01T00:00:00Z", dtTo="2024-01-01T00:00:00Z"),
        ),
        ("dtFrom number", "bad-dtnum", req("bad-dtnum", dtFrom=12345)),
        ("cs empty", "bad-csempty", req("bad-csempty", ConnectionString="")),
        ("cs no port", "bad-csnoport", req("bad-csnoport", ConnectionString="-h 127.0.0.1")),
        (
            "cs port text",
            "bad-csport",
            req("bad-csport", ConnectionString=f"-h 127.0.0.1 -p http -P {CANARY_PASSWORD}"),
        ),
        (
            "cs unknown option",
            "bad-csopt",
            req("bad-csopt", ConnectionString=good_cs + " -Q zzz"),
        ),
        (
            "cs dangling -P",
            "bad-csdangle",
            req("bad-csdangle", ConnectionString=f"-h 127.0.0.1 -p {meter_port} -a Low -P"),
        ),
        (
            "cs bad key",
            "bad-cskey",
            req(
                "bad-cskey",
                ConnectionString=f"-h 127.0.0.1 -p {meter_port} -c 48 -C AuthenticationEncryption"
                f" -B {CANARY_BKEY[:-3]} -A {CANARY_AKEY}",
            ),
        ),
        ("cs unbalanced quote", "bad-csquote", req("bad-csquote", ConnectionString='-h "127.0')),
        ("MsgID 10 kB", "M" * 10000, req("M" * 10000)),
        # valid after all: answered, any status
        ("ok: MsgID number", "1443", req(1443)),
        ("ok: unknown field", "bad-extra", req("bad-extra", Extra={"a": [1, 2]})),
    ]
    return c


def _same_msg_id(got: str | None, sent: str) -> bool:
    """An over-long MsgID may come back truncated (the daemon caps field lengths)."""
    if not got:
        return False
    return got == sent or (len(sent) > 255 and len(got) >= 64 and sent.startswith(got))


def scenario_bad_requests(lab: Lab) -> Result:
    """Every malformed request is answered or dead-lettered with a reason; daemon stays up."""
    corpus = bad_request_corpus(lab.sim.port)
    res = Result(Row("bad-request corpus", sent=len(corpus) + 4))
    with daemon_env(lab, "corpus") as env:
        pid = env.daemon.pid
        lab.client.publish(env.in_q, [(f"corpus-{i}", b) for i, (_, _, b) in enumerate(corpus)])
        good = [
            (f"corpus-good-{k}", read_request(f"corpus-good-{k}", lab.sim.port + k))
            for k in range(3)
        ]
        lab.client.publish(env.in_q, good)
        # a reply that cannot be routed (reply_to names no queue): returned by the broker
        unroutable = read_request("corpus-noreplyq", lab.sim.port + 5)
        lab.client.publish(
            env.in_q, [("corpus-noreplyq", unroutable)], reply_to="d2af.no-such-reply-queue"
        )

        def accounted() -> int:
            items = env.collector.snapshot()
            return len(items)

        wait_for(lambda: accounted() >= len(corpus) + 4, 90, 0.3)
        time.sleep(1.0)
        items = env.collector.snapshot()
        alive = env.daemon.alive() and env.daemon.pid == pid
        res.leaks = leak_scan(env.daemon, items, env.dlq)
    replies = [r for r in items if r.queue == env.out_q]
    dead = [r for r in items if r.queue == env.dlq]
    for label, mid, body in corpus:
        rep = [r for r in replies if mid is not None and _same_msg_id(reply_in_id(r), mid)]
        dl = [r for r in dead if r.body == body]
        if rep:
            res.row.replies += 1
            d = reply_dict(rep[0])
            if not label.startswith("ok:") and (d.get("Status") != "notok" or not d.get("Error")):
                res.problems.append(f"{label}: reply is not notok with an Error: {str(d)[:200]}")
            if len({r.body for r in rep}) > 1:
                res.row.duplicated_divergent += 1
        elif dl:
            res.row.dead_lettered += 1
            if not dead_letter_reason(dl[0]):
                res.row.unreasoned_dead.append(label)
                res.problems.append(f"{label}: dead-lettered without a reason")
        else:
            res.row.lost += 1
            res.row.lost_ids.append(label)
            res.problems.append(f"{label}: neither answered nor dead-lettered")
    for mid, _ in good:
        rep = [r for r in replies if reply_in_id(r) == mid]
        if rep and reply_dict(rep[0]).get("Status") == "ok":
            res.row.replies += 1
        else:
            res.row.lost += 1
            res.problems.append(f"{mid}: good request after the corpus not answered ok")
    reasons = {dead_letter_reason(r)[:80] for r in dead}
    # the daemon may dead-letter the request or its reply (which carries InMsgID)
    nr = [r for r in dead if r.body == unroutable or reply_in_id(r) == "corpus-noreplyq"]
    if nr and dead_letter_reason(nr[0]):
        res.row.dead_lettered += 1
    else:
        res.row.lost += 1
        res.problems.append("reply to a missing reply_to queue: request not dead-lettered")
    res.evidence = {"daemon_alive_same_pid": alive, "reasons": sorted(reasons)}
    # an "internal error" reason means a path the daemon does not handle: worth a clear message
    res.evidence["internal_errors"] = sorted(
        lbl
        for lbl, _mid, body in corpus
        for r in dead
        if r.body == body and "internal error" in dead_letter_reason(r)
    )
    if not alive:
        res.problems.append("daemon died or was restarted during the corpus")
    res.row.notes = f"{len(corpus)} bad + 3 good + 1 unroutable reply_to"
    lab.rows.append(res.row)
    ROWS.append(res.row)
    return res


def scenario_flood(
    lab: Lab, total: int = 100_000, seconds: float = 40.0, read_every: int = 20
) -> Result:
    """100,000 requests queued before the daemon starts; watch RSS and unacked for a while.

    Every ``read_every``-th request is a real READ (slow meters, latency per frame), the rest
    an unknown command answered by the master at once, so the daemon is busy on both paths.
    Answering all 100,000 would take minutes here, so we measure the first ``seconds``, stop
    the daemon with SIGTERM (it requeues what it holds) and check conservation: every
    request is answered, dead-lettered or still in the queue.
    """
    uid = f"flood-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
    in_q, out_q = f"d2af.{uid}.in", f"d2af.{uid}.out"
    dlq = in_q + ".dead"
    workers, spw = 2, 8
    prefetch = 2 * workers * spw
    cfg = lab.daemon_config(in_q, out_q, lab.node.port, Workers=workers, SessionsPerWorker=spw)
    daemon = Daemon(lab.workdir / uid, cfg)
    res = Result(Row("flood 100k", sent=total))
    collector = Collector(lab.client, [out_q, dlq])
    try:
        conn = lab.client.connect()
        try:
            ch = conn.channel()
            ch.queue_declare(in_q, durable=True)  # classic, no arguments: as the daemon does
            props = pika.BasicProperties(delivery_mode=2, content_type="application/json")
            t0 = time.monotonic()
            for i in range(total):
                mid = f"fl-{i}"
                if i % read_every == 0:
                    body = read_request(mid, lab.sim.port + (i // read_every) % lab.meters)
                else:
                    body = json.dumps(
                        {
                            "MsgID": mid,
                            "Cmd": "PING",
                            "ObisCode": "1.0.1.8.0.255",
                            "ConnectionString": conn_string(lab.sim.port),
                        }
                    ).encode()
                ch.basic_publish("", in_q, body, props)
            publish_s = time.monotonic() - t0
            # no per-message confirms (too slow for 100k): wait until the queue holds them all
            depth = 0
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                depth = ch.queue_declare(in_q, passive=True).method.message_count
                if depth >= total:
                    break
                time.sleep(0.5)
        finally:
            conn.close()
        res.evidence["publish_seconds"] = round(publish_s, 1)
        res.evidence["queue_depth_before_start"] = depth
        if depth != total:
            res.problems.append(f"queue holds {depth} of {total} before the daemon starts")
        daemon.start()
        daemon.wait_consuming(lab.client, in_q)
        collector.start()
        rss: list[int] = []
        unacked: list[int] = []
        done = threading.Event()

        def sample_unacked() -> None:
            # rabbitmqctl takes ~1 s of CPU per call here: its own thread, every 2 s
            while not done.is_set():
                with contextlib.suppress(Exception):
                    st = lab.node.queue_stats(in_q)
                    if st is not None:
                        unacked.append(st[1])
                done.wait(2.0)

        sampler = threading.Thread(target=sample_unacked, daemon=True)
        sampler.start()
        t_start = time.monotonic()
        try:
            while time.monotonic() - t_start < seconds:
                tick = time.monotonic()
                rss.append(rss_kb([daemon.pid, *worker_pids(daemon)]))
                if not daemon.alive():
                    res.problems.append(f"daemon exited with {daemon.proc.returncode}")
                    break
                time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
        finally:
            done.set()
            sampler.join(30)
        rc = daemon.stop()
        res.evidence["sigterm_exit_code"] = rc
        time.sleep(1.0)
        collector.stop()
        items = collector.snapshot()
        ready = lab.node.queue_stats(in_q)
        left = ready[0] + ready[1] if ready else -1
        ids_answered = {reply_in_id(r) for r in items if r.queue == out_q}
        dead = [r for r in items if r.queue == dlq]
        by_id: dict[str | None, set[bytes]] = defaultdict(set)
        for r in items:
            if r.queue == out_q:
                by_id[reply_in_id(r)].add(r.body)
        res.row.replies = len(ids_answered)
        res.row.dead_lettered = len(dead)
        res.row.duplicated_divergent = sum(1 for v in by_id.values() if len(v) > 1)
        res.row.duplicated_identical = sum(1 for r in items if r.queue == out_q) - len(ids_answered)
        res.row.lost = total - len(ids_answered) - len(dead) - left
        half = len(rss) // 2
        warm = max(3, len(rss) // 4)
        first = max(rss[warm:half] or [0])
        last = max(rss[half:] or [0])
        res.evidence.update(
            {
                "seconds_measured": round(time.monotonic() - t_start, 1),
                "answered": len(ids_answered),
                "left_in_queue": left,
                "rss_mb_samples": len(rss),
                "rss_mb_first_half_max": round(first / 1024, 1),
                "rss_mb_second_half_max": round(last / 1024, 1),
                "unacked_max": max(unacked or [0]),
                "unacked_samples": len(unacked),
                "prefetch": prefetch,
            }
        )
        res.row.notes = (
            f"first {seconds:.0f} s: {len(ids_answered)} answered, {left} left queued; "
            f"RSS {first / 1024:.0f}->{last / 1024:.0f} MB; unacked max {max(unacked or [0])}"
            f" <= prefetch {prefetch}"
        )
        if max(unacked or [0]) > prefetch:
            res.problems.append(f"unacked {max(unacked)} exceeds prefetch {prefetch}")
        if not unacked:
            res.problems.append("no unacked sample")
        if last > first * 1.15 + 10 * 1024:
            res.problems.append(f"RSS grew from {first} kB to {last} kB")
        if res.row.lost:
            res.problems.append(f"{res.row.lost} requests neither answered nor still queued")
        res.leaks = leak_scan(daemon, items[:2000], dlq)
    finally:
        daemon.stop()
        collector.stop()
        lab.client.delete_queues([in_q, out_q, dlq])
    lab.rows.append(res.row)
    ROWS.append(res.row)
    return res


def scenario_tls(lab: Lab, requests: int = 5) -> Result:
    """amqps with certificate verification against a test CA; a wrong CA is refused.

    Uses its own TLS node (the lab's node has no TLS listener unless started with tls=True).
    """
    from tests.brokernode import BrokerNode, make_test_pki

    res = Result(Row("broker TLS (amqps)", sent=requests))
    node = lab.node
    own = None
    if not node.tls:
        own = BrokerNode(user="d2afault", password=CANARY_BROKER_PASSWORD, tls=True)
        own.start()
        node = own
    try:
        assert node.tls_files is not None
        uid = f"tls-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
        in_q, out_q = f"d2af.{uid}.in", f"d2af.{uid}.out"
        dlq = in_q + ".dead"
        client = AmqpClient(node.params)
        tls_cfg = {
            "Tls": True,
            "Port": node.tls_port,
            "HostName": "127.0.0.1",
            "TlsServerName": "localhost",
            "TlsCaFile": str(node.tls_files.ca),
            "TlsCertFile": str(node.tls_files.client_cert),
            "TlsKeyFile": str(node.tls_files.client_key),
        }
        base = lab.daemon_config(in_q, out_q, node.tls_port)
        # a daemon trusting another CA must not connect
        wrong = make_test_pki(lab.workdir / f"{uid}-wrongca")
        bad = Daemon(lab.workdir / f"{uid}-wrong", {**base, **tls_cfg, "TlsCaFile": str(wrong.ca)})
        bad.start()
        time.sleep(5)
        never_declared = client.queue_depth(in_q) is None
        refused = never_declared and (bad.alive() or bad.proc.returncode != 0)
        bad_out = bad.output() + bad.log_text()
        bad.stop()
        res.evidence["wrong_ca_refused"] = refused
        res.evidence["wrong_ca_message"] = next(
            (
                ln[:160]
                for ln in bad_out.splitlines()
                if "certif" in ln.lower() or "ssl" in ln.lower()
            ),
            "",
        )
        if not refused:
            res.problems.append("daemon connected although the broker's CA is not trusted")
        daemon = Daemon(lab.workdir / uid, {**base, **tls_cfg})
        collector = Collector(client, [out_q, dlq])
        try:
            daemon.start()
            daemon.wait_consuming(client, in_q)
            conns = node.ctl(
                "list_connections", "-q", "--no-table-headers", "ssl", "peer_port"
            ).stdout
            res.evidence["broker_sees_ssl_connection"] = "true" in conns
            if "true" not in conns:
                res.problems.append(f"no TLS connection on the broker: {conns.strip()[:200]}")
            collector.start()
            bodies = [
                (f"tls-{k}", read_request(f"tls-{k}", lab.sim.port + k)) for k in range(requests)
            ]
            client.publish(in_q, bodies)
            collector.wait_ids({i for i, _ in bodies}, 60)
            time.sleep(0.5)
            items = collector.snapshot()
            res.row = judge("broker TLS (amqps)", [i for i, _ in bodies], items, {out_q}, dlq)
            oks = sum(1 for r in items if reply_dict(r).get("Status") == "ok")
            if oks < requests:
                res.problems.append(f"only {oks} of {requests} replies ok over amqps")
            res.leaks = leak_scan(daemon, items, dlq) + scan_canaries(
                [("wrong-CA daemon", bad_out.encode())]
            )
            res.row.notes = (
                "verify_peer, test CA; wrong CA refused" if refused else "wrong CA accepted!"
            )
        finally:
            daemon.stop()
            collector.stop()
            client.delete_queues([in_q, out_q, dlq])
    finally:
        if own is not None:
            own.destroy()
    lab.rows.append(res.row)
    ROWS.append(res.row)
    return res


GMAC_AKEY = "D0D1D2D3D4D5D6D7D8D9DADBDCDDDEDF"  # the simulator's client-48 keys: secrets too
GMAC_BKEY = "000102030405060708090A0B0C0D0E0F"


def gmac_request(msg_id: str, port: int) -> bytes:
    cs = (
        f"-h 127.0.0.1 -p {port} -i WRAPPER -c 48 -s 1 -a HighGMAC -C AuthenticationEncryption"
        f" -T 4775727578313233 -A {GMAC_AKEY} -B {GMAC_BKEY}"
    )
    return json.dumps(
        {"MsgID": msg_id, "Cmd": "READ", "ObisCode": "1.0.1.8.0.255", "ConnectionString": cs}
    ).encode()


def scenario_cipher_kill(lab: Lab, first: int = 6, after: int = 3) -> Result:
    """Ciphered meter (client 48): kill -9 the daemon mid-session, restart, read again.

    The meter refuses an invocation counter not above the last one it accepted; the daemon
    persists its counters in StateDir before use, so after the restart every read must
    still be ok.  All requests go to one meter, so they run one after the other.
    """
    port = lab.sim.port + lab.meters - 1
    res = Result(Row("cipher (client 48) kill -9 + restart", sent=first + after))
    with daemon_env(lab, "cipher") as env:
        ids = [f"gm-{k}" for k in range(first)]
        lab.client.publish(env.in_q, [(i, gmac_request(i, port)) for i in ids])
        if not wait_for(lambda: len(env.collector.snapshot()) >= 2, 60):
            res.problems.append("no ciphered reply before the kill")
        rc = env.daemon.kill9()
        if rc != -signal.SIGKILL:
            res.problems.append(f"kill -9 exit code {rc}")
        before = len(env.collector.snapshot())
        env.daemon.start()
        env.daemon.wait_consuming(lab.client, env.in_q)
        more = [f"gm-after-{k}" for k in range(after)]
        lab.client.publish(env.in_q, [(i, gmac_request(i, port)) for i in more])
        env.collector.wait_ids(set(ids + more), 90)
        time.sleep(0.5)
        items = env.collector.snapshot()
        res.leaks = leak_scan(env.daemon, items, env.dlq, (GMAC_AKEY, GMAC_BKEY))
        log = env.daemon.log_text()
    res.row = judge(res.row.fault, ids + more, items, {env.out_q}, env.dlq)
    statuses = {reply_in_id(r): reply_dict(r) for r in items if r.queue == env.out_q}
    for i in ids + more:
        d = statuses.get(i, {})
        if d.get("Status") != "ok":
            res.problems.append(f"{i}: {d.get('Status')} {str(d.get('Error'))[:120]}")
    resyncs = log.lower().count("resync")
    res.evidence = {
        "kill_exit_code": rc,
        "replies_before_kill": before,
        "resync_log_lines": resyncs,
    }
    res.row.notes = f"{before} answered before kill; {resyncs} counter resync lines in the log"
    lab.rows.append(res.row)
    ROWS.append(res.row)
    return res


def check_queue_mismatch(lab: Lab) -> dict[str, Any]:
    """InQueue exists as a classic queue, the daemon is configured for quorum: clear exit."""
    uid = f"mismatch-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
    in_q, out_q = f"d2af.{uid}.in", f"d2af.{uid}.out"
    conn = lab.client.connect()
    try:
        conn.channel().queue_declare(in_q, durable=True)
    finally:
        conn.close()
    d = Daemon(lab.workdir / uid, lab.daemon_config(in_q, out_q, lab.node.port, QueueType="quorum"))
    try:
        d.start()
        rc = d.wait_exit(60)
        text = d.output() + d.log_text()
    finally:
        d.stop()
        lab.client.delete_queues([in_q, out_q, in_q + ".dead"])
    return {"exit_code": rc, "text": text, "leaks": scan_canaries([("mismatch", text.encode())])}


def scenario_poison_worker_crash(lab: Lab, others: int = 10) -> Result:
    """A request that kills its worker every time (we SIGKILL the workers as soon as its
    meter sees a connection) must end as a notok reply after one retry, not loop; the other
    requests are still answered."""
    poison_port = lab.sim.port + lab.meters - 2
    res = Result(Row("poison: worker dies on every attempt", sent=others + 1))
    with contextlib.ExitStack() as st:
        proxy = TcpProxy([poison_port], count_dlms=True)
        st.callback(proxy.close)
        env = st.enter_context(daemon_env(lab, "poison"))
        kills: list[int] = []
        stop = threading.Event()

        def killer() -> None:
            seen = 0
            while not stop.is_set():
                n = proxy.stats[poison_port].connections
                if n > seen:
                    seen = n
                    for pid in worker_pids(env.daemon):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                            kills.append(pid)
                time.sleep(0.02)

        t = threading.Thread(target=killer, daemon=True)
        t.start()
        st.callback(stop.set)
        ids = ["poison"] + [f"poison-other-{k}" for k in range(others)]
        bodies = [("poison", read_request("poison", proxy.port_of[poison_port]))]
        bodies += [(i, read_request(i, lab.sim.port + k)) for k, i in enumerate(ids[1:])]
        lab.client.publish(env.in_q, bodies)
        env.collector.wait_ids(set(ids), 120)
        time.sleep(3.0)  # a looping request would show more connections/kills here
        stop.set()
        items = env.collector.snapshot()
        res.leaks = leak_scan(env.daemon, items, env.dlq)
        attempts = proxy.stats[poison_port].connections
        alive = env.daemon.alive()
    res.row = judge(res.row.fault, ids, items, {env.out_q}, env.dlq)
    d = next((reply_dict(r) for r in items if reply_in_id(r) == "poison"), {})
    dead = [r for r in items if r.queue == env.dlq and reply_in_id(r) == "poison"]
    if not dead and d.get("Status") != "notok":
        res.problems.append(f"poison request not answered notok nor dead-lettered: {d}")
    if attempts > 3:
        res.problems.append(f"poison request tried {attempts} times (loop)")
    if not alive:
        res.problems.append("daemon died")
    if not kills:
        res.problems.append("no worker was killed: fault not injected")
    res.evidence = {
        "attempts": attempts,
        "workers_killed": len(kills),
        "error": str(d.get("Error", ""))[:120] or (dead_letter_reason(dead[0]) if dead else ""),
    }
    res.row.notes = f"{attempts} attempts, {len(kills)} workers killed: {res.evidence['error']}"
    lab.rows.append(res.row)
    ROWS.append(res.row)
    return res


def scenario_delivery_limit(lab: Lab, queue_type: str = "classic", limit: int = 2) -> Result:
    """A request that is never answered because the daemon dies during it, again and again.

    The meter never answers (``--silent``), the master is killed with SIGKILL while the
    session waits, and restarted.  After ``DeliveryLimit`` deliveries the request must be
    dead-lettered with a reason instead of looping forever.
    """
    from tests.helpers_sim import running_simulator

    name = f"delivery limit {limit} ({queue_type})"
    res = Result(Row(name, sent=1))
    cycles = 0
    with contextlib.ExitStack() as st:
        sim = st.enter_context(running_simulator(1, "--silent", "-P", CANARY_PASSWORD))
        proxy = TcpProxy([sim.port], count_dlms=True)
        st.callback(proxy.close)
        env = st.enter_context(
            daemon_env(
                lab,
                f"dlimit-{queue_type}",
                {
                    "QueueType": queue_type,
                    "DeliveryLimit": limit,
                    "RequestTimeout": 120,
                    "FrameTimeout": 100,
                },
            )
        )
        mid = f"dlimit-{queue_type}"
        lab.client.publish(env.in_q, [(mid, read_request(mid, proxy.port_of[sim.port]))])
        t0 = time.monotonic()
        marks: list[float] = []
        while cycles < limit + 3:
            marks.append(round(time.monotonic() - t0, 1))
            # wait until delivery number cycles+1 is inside its meter session (or answered);
            # counted from the start, because the restarted daemon may connect very quickly
            wait_for(
                lambda n=cycles: proxy.stats[sim.port].connections > n or env.collector.snapshot(),
                30,
            )
            if env.collector.snapshot():
                break
            time.sleep(0.5)
            env.daemon.kill9()
            cycles += 1
            env.daemon.start()
            env.daemon.wait_consuming(lab.client, env.in_q)
        env.collector.wait_ids({mid}, 30)
        marks.append(round(time.monotonic() - t0, 1))
        time.sleep(0.5)
        items = env.collector.snapshot()
        res.leaks = leak_scan(env.daemon, items, env.dlq)
    marks.append(round(time.monotonic() - t0, 1))
    res.row = judge(name, [mid], items, {env.out_q}, env.dlq)
    dead = [r for r in items if r.queue == env.dlq]
    reason = dead_letter_reason(dead[0]) if dead else ""
    res.evidence = {"kill_cycles": cycles, "meter_sessions": proxy.stats[sim.port].connections}
    res.evidence["cycle_starts_s"] = marks
    res.evidence["reason"] = reason[:120]
    if not dead:
        res.problems.append(
            f"not dead-lettered after {cycles} kill cycles (DeliveryLimit {limit}); got "
            f"{[reply_dict(r).get('Error') for r in items][:3]}"
        )
    if cycles > limit + 1:
        res.problems.append(f"{cycles} deliveries for DeliveryLimit {limit}")
    res.row.notes = f"{cycles} kill -9 cycles; reason: {reason[:70]}"
    lab.rows.append(res.row)
    ROWS.append(res.row)
    return res
