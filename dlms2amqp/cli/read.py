# SPDX-License-Identifier: GPL-2.0-or-later
"""dlms2amqp-read: one read by hand, printing the reply the daemon would publish.

Exit codes: 0 the reply is ``ok``, 1 it is ``notok``, 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path
from typing import NoReturn, Optional

import orjson

from ..errors import RequestError
from ..meter import targets
from ..meter.reader import ReaderOptions, execute
from ..request import ReadRequest, parse_datetime
from .common import EXIT_NOTOK, EXIT_OK


class _Parser(argparse.ArgumentParser):
    """Usage errors never echo a connection string (it may hold a password or keys)."""

    hidden: tuple[str, ...] = ()

    def error(self, message: str) -> NoReturn:
        for text in self.hidden:
            if text:
                message = message.replace(text, "<connection string>")
        super().error(message)


def build_parser() -> _Parser:
    # no -h: connection strings start with "-h host"; --help only
    p = _Parser(
        add_help=False,
        prog="dlms2amqp-read",
        description="Read one OBIS code from one meter and print the reply JSON.",
        epilog='example: dlms2amqp-read "-h 127.0.0.1 -p 4060 -c 32 -a Low -P 00000000 '
        '-i WRAPPER" 1.0.99.1.0.255 --from 2020-12-15T00:00+03:00 --to 2020-12-16T00:00+03:00',
    )
    p.add_argument("--help", action="help", help="show this help and exit")
    p.add_argument("connection_string", help="Gurux-style connection string, quoted")
    p.add_argument("obis", help="OBIS code (logical name), e.g. 1.0.99.1.0.255")
    p.add_argument("--from", dest="dt_from", metavar="ISO", help="profile start (ISO 8601)")
    p.add_argument("--to", dest="dt_to", metavar="ISO", help="profile end (ISO 8601)")
    p.add_argument("--trace", action="store_true", help="print frames to stderr, secrets masked")
    p.add_argument(
        "--timeout", type=float, default=60.0, metavar="S", help="whole-request deadline"
    )
    p.add_argument("--frame-timeout", type=float, default=5.0, metavar="S", help="wait per frame")
    p.add_argument("--datetime-format", choices=["iso", "dotnet"], default="iso")
    p.add_argument("--state-dir", type=Path, help="where invocation counters are kept")
    p.add_argument("--msg-id", default=None, help="MsgID of the request (default: a new UUID)")
    p.add_argument(
        "--allow-host",
        action="append",
        metavar="ENTRY",
        help="like the daemon's AllowedHosts (CIDR, name, *.domain, !ENTRY), repeatable; "
        "default: any host",
    )
    p.add_argument(
        "--allow-serial",
        action="append",
        metavar="GLOB",
        help="like the daemon's AllowedSerialPorts, repeatable; default: any tty device",
    )
    return p


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser.hidden = tuple(a.strip() for a in argv if " " in a.strip() or "-P" in a)
    args = parser.parse_args(argv)
    if args.timeout <= 0 or args.frame_timeout <= 0:
        parser.error("--timeout and --frame-timeout must be positive")
    try:
        dt_from, naive_from = (
            parse_datetime(args.dt_from, "--from") if args.dt_from else (None, False)
        )
        dt_to, naive_to = parse_datetime(args.dt_to, "--to") if args.dt_to else (None, False)
    except RequestError as exc:
        parser.error(str(exc))
    if dt_from and dt_to and dt_from > dt_to:
        parser.error("--from is later than --to")
    try:
        hosts = targets.HostPolicy(args.allow_host or ["*"])
        serial = targets.SerialPolicy(args.allow_serial or ["*"])
    except ValueError as exc:
        parser.error(f"--allow-host/--allow-serial: {exc}")
    request = ReadRequest(
        msg_id=args.msg_id or str(uuid.uuid4()),
        cmd="READ",
        obis=args.obis.strip(),
        connection_string=args.connection_string,
        dt_from=dt_from,
        dt_to=dt_to,
        naive_dates=naive_from or naive_to,
    )
    options = ReaderOptions(
        frame_timeout=args.frame_timeout,
        request_timeout=args.timeout,
        datetime_format=args.datetime_format,
        state_dir=args.state_dir,
        trace=args.trace,
        allowed_hosts=hosts,
        allowed_serial_ports=serial,
    )
    reply = execute(request, options)
    sys.stdout.buffer.write(orjson.dumps(reply, option=orjson.OPT_INDENT_2) + b"\n")
    sys.stdout.flush()
    return EXIT_OK if reply["Status"] == "ok" else EXIT_NOTOK


if __name__ == "__main__":
    sys.exit(main())
