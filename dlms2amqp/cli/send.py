# SPDX-License-Identifier: GPL-2.0-or-later
"""dlms2amqp-send: validate request files and put them on InQueue (one connection).

The proof of concept opened one connection per file; here all files go over one
connection with pipelined publisher confirms, so 10,000 files take seconds.  A file that
is not a valid request is reported with its name and reason and not sent.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

from ..daemon import amqp
from ..errors import BrokerError, ConfigError, GatewayError
from .common import (
    EXIT_CONFIG,
    EXIT_NOTOK,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    add_config_option,
    load_or_report,
)


def _stdin_requests(data: bytes) -> list[tuple[str, bytes]]:
    """stdin holds one JSON request, or one request per line (JSON lines)."""
    import orjson

    try:
        orjson.loads(data)
        return [("<stdin>", data)]
    except orjson.JSONDecodeError:
        lines = [ln for ln in data.splitlines() if ln.strip()]
        return [(f"<stdin>:{n}", ln) for n, ln in enumerate(lines, 1)] or [("<stdin>", data)]


def collect(names: list[str], max_bytes: int) -> tuple[list[tuple[str, bytes]], list[str]]:
    """Read and validate every input; returns (valid (name, body), error lines)."""
    from ..request import parse_request

    good: list[tuple[str, bytes]] = []
    errors: list[str] = []
    items: list[tuple[str, Optional[bytes]]] = []
    for name in names:
        if name == "-":
            items.extend(_stdin_requests(sys.stdin.buffer.read()))
            continue
        try:
            items.append((name, Path(name).read_bytes()))
        except OSError as e:
            errors.append(f"{name}: cannot read ({e.strerror})")
    for name, body in items:
        assert body is not None
        try:
            parse_request(body.strip(), max_bytes)
        except GatewayError as e:
            errors.append(f"{name}: not sent: {e.message}")
            continue
        good.append((name, body.strip()))
    return good, errors


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="dlms2amqp-send",
        description="Send request files (JSON) to the daemon's InQueue.",
    )
    add_config_option(p)
    p.add_argument("files", nargs="+", metavar="FILE", help="request files, or - for stdin")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress, errors only")
    args = p.parse_args(argv)
    cfg = load_or_report("dlms2amqp-send", args.config)
    if cfg is None:
        return EXIT_CONFIG
    t0 = time.monotonic()
    good, errors = collect(args.files, cfg.MaxBodyBytes)
    for line in errors:
        print(f"dlms2amqp-send: {line}", file=sys.stderr)
    progress = None
    if len(good) >= 100 and not args.quiet:
        last = [0.0]

        def progress(done: int, total: int) -> None:
            now = time.monotonic()
            if now - last[0] >= 0.5 or done == total:
                last[0] = now
                end = "\n" if done == total else ""
                print(f"\rdlms2amqp-send: {done}/{total} confirmed", end=end, file=sys.stderr)

    sent = 0
    if good:
        try:
            conn = amqp.connect(cfg)
            try:
                amqp.declare_queue(conn, cfg, cfg.InQueue, amqp.queue_arguments(cfg))
            finally:
                conn.close()
        except ConfigError as e:
            print(f"dlms2amqp-send: {e}", file=sys.stderr)
            return EXIT_CONFIG
        except BrokerError as e:
            print(f"dlms2amqp-send: {e}; nothing was sent", file=sys.stderr)
            return EXIT_UNAVAILABLE
        pub = amqp.PipelinedPublisher(cfg, cfg.InQueue, good, on_progress=progress)
        try:
            pub.run()
        except BrokerError as e:
            print(
                f"dlms2amqp-send: {e}; {len(pub.confirmed)} of {len(good)} were confirmed "
                "before the failure, the others may or may not have been sent",
                file=sys.stderr,
            )
            return EXIT_UNAVAILABLE
        for i, reason in sorted(pub.failed.items()):
            print(f"dlms2amqp-send: {good[i][0]}: not sent: {reason}", file=sys.stderr)
        sent = len(pub.confirmed)
        errors.extend(pub.failed.values())
    if not args.quiet:
        print(
            f"dlms2amqp-send: {sent} sent to {cfg.InQueue}, {len(errors)} not sent, "
            f"{time.monotonic() - t0:.2f} s",
            file=sys.stderr,
        )
    return EXIT_NOTOK if errors else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
