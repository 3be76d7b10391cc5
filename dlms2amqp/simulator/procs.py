# SPDX-License-Identifier: GPL-2.0-or-later
"""The simulator's pre-fork supervisor: K processes serving consecutive port ranges.

One selectors loop per process serves thousands of meters; past one core, ``--procs K``
forks K children (each a ``Server`` on its range), prints one ``ready`` line when all of
them listen, passes SIGTERM/SIGINT on, and fails the start when one child cannot start.
A child dies with its parent (PR_SET_PDEATHSIG), so no meter outlives the command.
"""

from __future__ import annotations

import os
import select
import signal
import sys
from typing import TYPE_CHECKING, Any, Optional

from ..limits import open_files_advice, raise_open_files

if TYPE_CHECKING:
    from .apdu import SimOptions
    from .cosem import Device

EXIT_OK = 0
EXIT_START = 1


def open_files(per_proc: int) -> Optional[str]:
    """Open-files limit for ``per_proc`` meters in one process; a message when short.

    Each meter is a listening socket: that many (and some room) are needed.  A gateway
    that pools associations also keeps one connection per meter open: up to two
    descriptors per meter are taken where the hard limit allows.
    """
    needed = per_proc + 256
    if raise_open_files(needed, beyond_hard=True) < needed:
        return open_files_advice(needed) + ", or serve fewer meters per process (-N, --procs)"
    raise_open_files(2 * per_proc + 256)
    return None


def die_with_parent(parent_pid: int) -> None:
    """Linux: a child gets SIGTERM when the parent dies, so no meter outlives it."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(EXIT_START)


def run_procs(
    device: Device, host: str, port: int, count: int, opts: SimOptions, procs: int, per_proc: int
) -> int:
    """Fork K children, each serving a port range; one ready line when all are ready."""
    from .server import Server

    children: list[int] = []
    parent_pid = os.getpid()
    ready_r, ready_w = os.pipe()
    for i in range(procs):
        first_k = i * per_proc
        n = min(per_proc, count - first_k)
        if n <= 0:
            break
        pid = os.fork()
        if pid == 0:
            os.close(ready_r)
            die_with_parent(parent_pid)
            code = EXIT_OK
            try:
                server = Server(device, host, port + first_k, n, opts, first_k=first_k)
                server.listen()
                server.install_signals()
                os.write(ready_w, b"r")
                server.run()
            except OSError as e:
                print(f"dlms2amqp-sim: {e.strerror or e}", file=sys.stderr)
                code = EXIT_START
            except BaseException as e:  # noqa: B036 - a child must never return into main()
                print(f"dlms2amqp-sim: meters {first_k}..{first_k + n - 1}: {e}", file=sys.stderr)
                code = EXIT_START
            finally:
                sys.stderr.flush()
                os._exit(code)
        children.append(pid)
    os.close(ready_w)
    stop = {"sig": False}

    def on_signal(signum: int, frame: Any) -> None:
        stop["sig"] = True
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    got = 0
    failed = False
    while got < len(children) and not failed and not stop["sig"]:
        try:
            readable, _, _ = select.select([ready_r], [], [], 0.2)
        except InterruptedError:
            continue
        if readable:
            chunk = os.read(ready_r, 64)
            got += len(chunk)
            if not chunk:
                failed = True
        for pid in children:  # a child that died while starting
            try:
                done, _status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                failed = True
                children.remove(pid)
                break
    os.close(ready_r)
    code = EXIT_OK
    if not failed and got == len(children):
        print(f"ready {count} meters on {port}-{port + count - 1}", flush=True)
    elif not stop["sig"]:  # a child failed to start (a signal while starting is a clean stop)
        on_signal(signal.SIGTERM, None)
        code = EXIT_START
    for pid in children:
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
            except ChildProcessError:
                status = 0
                break
        if not stop["sig"] and os.waitstatus_to_exitcode(status) != 0:
            code = EXIT_START
            on_signal(signal.SIGTERM, None)
    return code
