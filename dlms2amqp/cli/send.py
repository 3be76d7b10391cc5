# SPDX-License-Identifier: GPL-2.0-or-later
"""dlms2amqp-send: validate request files and put them on InQueue (one connection).

The proof of concept opened one connection per file; here all files go over one
connection with pipelined publisher confirms, so 10,000 files take seconds.  A file that
is not a valid request is reported with its name and reason and not sent.

With ``Partitions`` > 0 in the configuration the requests go straight to the partition
exchange, keyed as a daemon's mover keys them (``partitions.route_of``, host names
resolved here), which saves the daemons the move from InQueue.  Only while daemons with
partitions serve the broker (a consumer on the presence queue): else, with ``--inqueue``,
or when the broker refuses this user to write to the exchange (403), to InQueue.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any, Optional

import pika.exceptions as pex

from ..config import Config
from ..daemon import amqp, partitions
from ..errors import BrokerError, ConfigError, GatewayError, MeterConnectionError
from ..meter import targets
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


def _partitions_served(conn: Any, cfg: Config) -> bool:
    """A daemon with Partitions serves this broker now: the partition exchange exists and
    the presence queue has a consumer (every such daemon holds one).  Exchange and queues
    are durable: left behind by daemons gone back to Partitions 0 (or by a sender whose
    configuration disagrees with the daemons'), they would keep requests nobody reads."""
    for declare in (
        lambda ch: ch.exchange_declare(partitions.exchange_name(cfg), passive=True),
        lambda ch: ch.queue_declare(partitions.presence_queue(cfg), passive=True),
    ):
        try:
            ch = conn.channel()
            ok = declare(ch)
        except pex.ChannelClosedByBroker as e:
            if e.reply_code == 404:
                return False
            raise amqp.broker_error(cfg, e) from e
        except amqp.CONNECTION_ERRORS as e:
            raise amqp.broker_error(cfg, e) from e
        with contextlib.suppress(*amqp.CONNECTION_ERRORS):
            ch.close()
    return int(ok.method.consumer_count) > 0


def _send(
    cfg: Config,
    good: list[tuple[str, bytes]],
    progress: Any,
    routes: Optional[list[tuple[str, str]]],
) -> tuple[amqp.PipelinedPublisher, Optional[BrokerError]]:
    pub = amqp.PipelinedPublisher(cfg, cfg.InQueue, good, on_progress=progress, routes=routes)
    try:
        pub.run()
    except BrokerError as e:
        return pub, e
    return pub, None


def partition_routes(cfg: Config, good: list[tuple[str, bytes]]) -> list[tuple[str, str]]:
    """(exchange, routing key) of each request, as a daemon's mover would route it.

    A host name is resolved here (once per name) so that ``-h localhost`` and
    ``-h 127.0.0.1`` land in one partition; a name that does not resolve is keyed by the
    name, as the mover does (the daemon that reads it answers notok).
    """
    resolver = targets.Resolver()
    out = []
    for _name, body in good:
        target = partitions.target_of(body, cfg.MaxBodyBytes)
        if isinstance(target, str):
            key = target
        else:
            address = None
            if targets.needs_lookup(target):
                assert target.host is not None and target.port is not None
                with contextlib.suppress(MeterConnectionError):
                    address = resolver.resolve(target.host, target.port)
            key = partitions.key_of(target, address)
        out.append((partitions.exchange_for(cfg, key), key))
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="dlms2amqp-send",
        description="Send request files (JSON) to the daemon's InQueue.",
    )
    add_config_option(p)
    p.add_argument("files", nargs="+", metavar="FILE", help="request files, or - for stdin")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress, errors only")
    p.add_argument(
        "--inqueue",
        action="store_true",
        help="with Partitions > 0: send to InQueue (the daemons move each request to its "
        "partition) instead of straight to the partition exchange",
    )
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
    where, routes = cfg.InQueue, None
    if good:
        straight = False
        try:
            conn = amqp.connect(cfg)
            try:
                amqp.declare_queue(conn, cfg, cfg.InQueue, amqp.queue_arguments(cfg))
                straight = cfg.Partitions > 0 and not args.inqueue and _partitions_served(conn, cfg)
            finally:
                with contextlib.suppress(*amqp.CONNECTION_ERRORS):
                    conn.close()
        except ConfigError as e:
            print(f"dlms2amqp-send: {e}", file=sys.stderr)
            return EXIT_CONFIG
        except BrokerError as e:
            print(f"dlms2amqp-send: {e}; nothing was sent", file=sys.stderr)
            return EXIT_UNAVAILABLE
        if straight:  # host names resolved with no connection open (no heartbeat to miss)
            where, routes = partitions.exchange_name(cfg), partition_routes(cfg, good)
        pub, err = _send(cfg, good, progress, routes)
        if err is not None and routes is not None and pub.refused and not pub.confirmed:
            # the sender's broker user may write to InQueue only: the daemons move them
            print(
                f"dlms2amqp-send: {err}; sending to {cfg.InQueue} instead (allow this user "
                f"to write to {where}, or use --inqueue)",
                file=sys.stderr,
            )
            where = cfg.InQueue
            pub, err = _send(cfg, good, progress, None)
        if err is not None:
            print(
                f"dlms2amqp-send: {err}; {len(pub.confirmed)} of {len(good)} were confirmed "
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
            f"dlms2amqp-send: {sent} sent to {where}, {len(errors)} not sent, "
            f"{time.monotonic() - t0:.2f} s",
            file=sys.stderr,
        )
    return EXIT_NOTOK if errors else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
