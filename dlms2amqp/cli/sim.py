# SPDX-License-Identifier: GPL-2.0-or-later
"""``dlms2amqp-sim``: serve N simulated DLMS/COSEM meters on consecutive ports.

Options follow Gurux.DLMS.Simulator.Net where they overlap (``-p -N -i -x -t``).
Prints ``ready N meters on PORT-LAST`` once every port listens; exits 0 on
SIGTERM/SIGINT; 2 on bad arguments; 1 when it cannot start (port busy, limits).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from dlms2amqp.simulator.framing import ADDRESS_FORMS, DEFAULT_FORMS

EXIT_OK = 0
EXIT_START = 1
EXIT_USAGE = 2

_LEVELS = {
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "verbose": logging.DEBUG,
}


def _rate(text: str) -> float:
    try:
        v = float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number between 0 and 1") from e
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not between 0 and 1")
    return v


def _trace(text: str) -> str:
    if text.lower() not in _LEVELS:
        raise argparse.ArgumentTypeError("use Error, Warning, Info or Verbose")
    return text.lower()


def _physical(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        v = -1
    if not 0 <= v <= 0x3FFD:
        raise argparse.ArgumentTypeError(f"{text!r} is not an HDLC physical address (0..16381)")
    return v


def _bounded(low: int, high: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = low - 1
        if not low <= v <= high:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number from {low} to {high}")
        return v

    return parse


def _forms(text: str) -> tuple[str, ...]:
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    if "any" in names:
        return ADDRESS_FORMS
    bad = [n for n in names if n not in ADDRESS_FORMS]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"{text!r}: use one-byte, two-byte, four-byte, serial or any (comma-separated)"
        )
    return tuple(dict.fromkeys(names))


def _byte_count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if not 0 <= n <= 64:
        raise argparse.ArgumentTypeError(f"--trailing-bytes {text!r}: expected 0..64")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dlms2amqp-sim",
        description="Serve N simulated DLMS/COSEM meters on consecutive TCP ports.",
    )
    p.add_argument("-p", "--port", type=int, default=4060, help="first port (meter k on PORT+k)")
    p.add_argument("-N", "--count", type=int, default=1, help="number of meters")
    p.add_argument(
        "-i", "--interface", default="WRAPPER", type=str.upper, choices=["WRAPPER", "HDLC"]
    )
    p.add_argument(
        "-x", "--template", help="Gurux XML device template instead of the built-in meter"
    )
    p.add_argument(
        "-t", "--trace", type=_trace, default="warning", help="Error|Warning|Info|Verbose"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("-P", "--password", help="Low-level secret of client 32 (default 00000000)")
    p.add_argument(
        "-n", "--physical", type=_physical, metavar="PHYSICAL",
        help="HDLC physical server address of the two- and four-byte forms (default 1)",
    )  # fmt: skip
    p.add_argument(
        "--hdlc-address", type=_forms, default=DEFAULT_FORMS, metavar="FORMS",
        help="HDLC server address forms answered, comma-separated: one-byte, two-byte, "
        "four-byte, serial, or any (default one-byte,two-byte,serial)",
    )  # fmt: skip
    p.add_argument(
        "--hdlc-window", type=_bounded(1, 7), default=7, metavar="N",
        help="largest HDLC window the meters agree to (1..7, default 7)",
    )  # fmt: skip
    p.add_argument(
        "--hdlc-max-info", type=_bounded(32, 2030), default=2030, metavar="BYTES",
        help="largest HDLC information field the meters agree to (32..2030, default 2030)",
    )  # fmt: skip
    p.add_argument("--serial", help="serve one meter (HDLC) on this serial device or pty")
    p.add_argument("--utc-offset", type=int, default=0, help="meter local time offset, minutes")
    p.add_argument("--latency", type=float, default=0.0, metavar="MS", help="delay per reply frame")
    for name, what in (
        ("silent", "accept the connection, never answer"),
        ("garbage", "answer with bytes that are not a DLMS frame"),
        ("reset", "close the connection mid-session"),
        ("reject-auth", "reject authenticated associations"),
    ):
        p.add_argument(
            f"--{name}", type=_rate, nargs="?", const=1.0, default=0.0, metavar="RATE",
            help=f"{what} (fraction of connections; bare flag = 1)",
        )  # fmt: skip
    # --- meter quirks of real meters (simulator application layer) -----------------
    p.add_argument(
        "--trailing-bytes", type=_byte_count, default=0, metavar="N",
        help="append N bytes after the clock value and after the last profile block",
    )  # fmt: skip
    p.add_argument(
        "--deny-wrong-class", action="store_true",
        help="answer read-write-denied for an unknown object or a wrong class",
    )  # fmt: skip
    p.add_argument(
        "--gbt-ack-each", action="store_true",
        help="general block transfer as Gurux's Java meter: streaming bit and window 1 "
        "in every block but the last, one block per acknowledgement",
    )  # fmt: skip
    p.add_argument(
        "-r",
        "--referencing",
        type=str.upper,
        choices=["LN", "SN"],
        default="LN",
        help="logical-name or short-name referencing for every client (default LN)",
    )
    p.add_argument(
        "--sn-blocks",
        choices=["list", "data"],
        default="list",
        help="short-name READ blocks carry the result list (as field SN meters send it;"
        " default) or the bare value (as Gurux's servers do; what gurux-dlms clients read)",
    )
    p.add_argument("--procs", type=int, default=1, help="split the meters over K processes")
    p.add_argument("--seed", type=int, help="random seed for the fault rates")
    return p


def _device(args: argparse.Namespace):
    from dlms2amqp.simulator import cosem, sn

    if args.template:
        from dlms2amqp.simulator import template

        tpl = template.load_template(args.template)
        for warning in tpl.warnings:  # what the template has but the simulator does not serve
            print(f"dlms2amqp-sim: template: {warning}", file=sys.stderr, flush=True)
        password = args.password.encode() if args.password is not None else None
        device = template.build_device(tpl, password)
    else:
        password = (args.password if args.password is not None else "00000000").encode()
        device = cosem.builtin_device(password)
    if args.referencing == "SN":
        sn.use_short_names(device)
    return device


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=_LEVELS[args.trace],
        stream=sys.stderr,
        format="%(asctime)s sim %(levelname)s %(message)s",
    )
    if args.count < 1 or args.procs < 1 or not 0 < args.port < 65536:
        print("dlms2amqp-sim: -N and --procs must be >= 1 and -p a port", file=sys.stderr)
        return EXIT_USAGE
    last = args.port + args.count - 1
    if last > 65535:
        print(f"dlms2amqp-sim: ports {args.port}-{last} go beyond 65535", file=sys.stderr)
        return EXIT_USAGE
    if args.physical is not None and args.physical > 0x7F and "two-byte" in args.hdlc_address:
        print(
            f"dlms2amqp-sim: -n {args.physical} does not fit a two-byte HDLC address (0..127): "
            "give --hdlc-address without two-byte (four-byte, serial)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    from dlms2amqp.simulator.apdu import SimOptions
    from dlms2amqp.simulator.server import Server

    opts = SimOptions(
        utc_offset=args.utc_offset,
        latency_ms=args.latency,
        silent=args.silent,
        garbage=args.garbage,
        reset=args.reset,
        reject_auth=args.reject_auth,
        interface=args.interface,
        seed=args.seed,
        hdlc_address=args.hdlc_address,
        # physical 1 by default, as Gurux's C reference meter
        hdlc_physical=(1,) if args.physical is None else (args.physical,),
        hdlc_limits=(args.hdlc_window, args.hdlc_max_info),
        trailing_bytes=args.trailing_bytes,
        deny_wrong_class=args.deny_wrong_class,
        gbt_ack_each=args.gbt_ack_each,
    )
    opts.sn_blocks = args.sn_blocks
    try:
        device = _device(args)
    except Exception as e:  # template errors are reported, not traced
        print(f"dlms2amqp-sim: {e}", file=sys.stderr)
        return EXIT_START
    if args.serial:
        from dlms2amqp.simulator.server import serve_serial

        return serve_serial(device, args.serial, opts)
    from dlms2amqp.simulator import procs as prefork

    procs = min(args.procs, args.count)
    per_proc = (args.count + procs - 1) // procs
    msg = prefork.open_files(per_proc)
    if msg:
        print(f"dlms2amqp-sim: {msg}", file=sys.stderr)
        return EXIT_START
    if procs > 1:
        return prefork.run_procs(device, args.host, args.port, args.count, opts, procs, per_proc)
    server = Server(device, args.host, args.port, args.count, opts)
    try:
        server.listen()
    except OSError as e:
        print(f"dlms2amqp-sim: {e.strerror or e}", file=sys.stderr)
        return EXIT_START
    server.install_signals()
    print(f"ready {args.count} meters on {args.port}-{last}", flush=True)
    server.run()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
