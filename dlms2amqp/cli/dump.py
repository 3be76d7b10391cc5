# SPDX-License-Identifier: GPL-2.0-or-later
"""dlms2amqp-dump: print replies from OutQueue, one JSON object per line.

A reply is acknowledged only after its line was written and flushed, so a crash or a
closed pipe (``| head``) never loses one: what was not printed goes back to the queue.

SIGINT and SIGTERM only set a flag that the consume loop checks at least every 0.5 s
(its inactivity timeout): a KeyboardInterrupt raised inside pika could land in the middle
of its frame handling and leave the process waiting, which a test once saw.  On the flag
the loop cancels the consumer (what was prefetched goes back), closes the connection and
prints the summary.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from typing import Optional

import orjson

from ..daemon import amqp
from ..errors import BrokerError, ConfigError
from .common import EXIT_CONFIG, EXIT_OK, EXIT_UNAVAILABLE, add_config_option, load_or_report


def one_line(body: bytes) -> bytes:
    """The reply as one JSON line (bodies that are not JSON are wrapped, not dropped)."""
    try:
        return orjson.dumps(orjson.loads(body))
    except orjson.JSONDecodeError:
        return orjson.dumps({"NotJson": body.decode("utf-8", "replace")})


class StopFlag:
    """Set by SIGINT/SIGTERM; the consume loop reads it (no exception inside pika)."""

    def __init__(self) -> None:
        self.signal: Optional[int] = None

    def __bool__(self) -> bool:
        return self.signal is not None

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._set)

    def _set(self, sig: int, _frame: object) -> None:
        self.signal = sig


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="dlms2amqp-dump", description="Print replies from the daemon's OutQueue."
    )
    add_config_option(p)
    p.add_argument("--max", type=int, default=0, metavar="N", help="stop after N replies")
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="S",
        help="stop when no reply came for S seconds (default 2; with --follow: never)",
    )
    p.add_argument("--follow", action="store_true", help="keep waiting for new replies")
    p.add_argument("--queue", help="read this queue instead of OutQueue")
    args = p.parse_args(argv)
    cfg = load_or_report("dlms2amqp-dump", args.config)
    if cfg is None:
        return EXIT_CONFIG
    timeout = args.timeout if args.timeout is not None else (None if args.follow else 2.0)
    queue = args.queue or cfg.OutQueue
    printed = 0
    out = sys.stdout.buffer
    stop = StopFlag()
    stop.install()
    try:
        conn = amqp.connect(cfg)
    except BrokerError as e:
        print(f"dlms2amqp-dump: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    try:
        if not args.queue:
            amqp.declare_queue(conn, cfg, queue)
        ch = conn.channel()
        ch.basic_qos(prefetch_count=min(args.max or 200, 200))
        last = time.monotonic()
        for method, _props, body in ch.consume(queue, inactivity_timeout=0.5):
            if stop:
                break  # a delivery that came with the signal is not printed: requeued
            if method is None:
                if timeout is not None and time.monotonic() - last >= timeout:
                    break
                continue
            last = time.monotonic()
            try:
                out.write(one_line(body) + b"\n")
                out.flush()
            except BrokenPipeError:
                break  # not printed: not acked, the broker requeues it
            ch.basic_ack(method.delivery_tag)
            printed += 1
            if args.max and printed >= args.max:
                break
        ch.cancel()  # requeues what was prefetched but not printed
        conn.close()
    except ConfigError as e:
        print(f"dlms2amqp-dump: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except amqp.CONNECTION_ERRORS as e:
        print(f"dlms2amqp-dump: {amqp.broker_error(cfg, e)}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if stop.signal is not None:
        print(f"dlms2amqp-dump: stopped by {signal.Signals(stop.signal).name}", file=sys.stderr)
    print(f"dlms2amqp-dump: {printed} replies from {queue}", file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
