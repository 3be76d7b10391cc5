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


def scan_canaries(named_blobs: Iterable[tuple[str, bytes]]) -> list[str]:
    """Names of the blobs containing a canary, as ``"where: canary"`` lines (empty = clean)."""
    found = []
    forms = [(c, canary_forms(c)) for c in CANARIES]
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
                            self.items.append(Received(q, b, p, dict(p.headers or {})))
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
    except (ValueError, UnicodeDecodeError):
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
    sessions_repeated: int = 0
    notes: str = ""
    lost_ids: list[str] = field(default_factory=list)
    divergent_ids: list[str] = field(default_factory=list)
    unreasoned_dead: list[str] = field(default_factory=list)

    def ok(self, allow_repeats: bool = False) -> bool:
        return (
            self.lost == 0
            and self.duplicated_divergent == 0
            and not self.unreasoned_dead
            and (allow_repeats or self.sessions_repeated == 0)
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
            str(r.sessions_repeated),
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


def daemon_available() -> bool:
    try:
        import dlms2amqp.cli.daemon  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not landed yet"
        return False
    return True


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
