# SPDX-License-Identifier: GPL-2.0-or-later
"""dlms2amqpd: take READ commands from InQueue, read meters, publish replies."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

import orjson

from .. import __version__, logsetup
from ..config import config_warnings, describe_keys
from ..daemon import partitions
from ..daemon.master import Master
from ..daemon.replystore import secure_dir
from ..errors import ConfigError, GatewayError
from .common import EXIT_CONFIG, EXIT_OK, EXIT_WORKER_BOOT, add_config_option, load_or_report


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="dlms2amqpd",
        description="Read DLMS/COSEM meters on behalf of RabbitMQ requests.",
        epilog="Configuration keys:\n" + describe_keys(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_option(p, "configuration file (JSON)")
    p.add_argument(
        "--check-config", action="store_true", help="validate the configuration and exit"
    )
    p.add_argument("--version", action="version", version=f"dlms2amqp {__version__}")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    cfg = load_or_report("dlms2amqpd", args.config)
    if cfg is None:
        return EXIT_CONFIG
    warnings = config_warnings(cfg)
    if args.check_config:
        print(orjson.dumps(cfg.as_dict(), option=orjson.OPT_INDENT_2).decode())
        for w in warnings:
            print(f"dlms2amqpd: warning: {w}", file=sys.stderr)
        try:
            partitions.check(cfg)
        except ConfigError as e:
            print(f"dlms2amqpd: {e}", file=sys.stderr)
            return EXIT_CONFIG
        print("topology to declare:")
        print(orjson.dumps(partitions.describe(cfg), option=orjson.OPT_INDENT_2).decode())
        print(f"dlms2amqpd: configuration {cfg.path} is valid", file=sys.stderr)
        return EXIT_OK
    try:
        state_warning = secure_dir(cfg.state_dir)  # 0700: the reply store and its HMAC key
    except ConfigError as e:
        print(f"dlms2amqpd: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if state_warning:
        warnings.append(state_warning)
    logsetup.configure(cfg.debug_file, cfg.LogLevel, process="master", console=True)
    log = logsetup.get_logger("dlms2amqp.master")
    log.info("starting", version=__version__, config=str(cfg.path), workers=cfg.Workers)
    for w in warnings:
        log.warning("config_warning", warning=w)
        # without a DebugFile (or on a terminal) the log line is on stderr already
        if cfg.debug_file is not None and not sys.stderr.isatty():
            print(f"dlms2amqpd: warning: {w}", file=sys.stderr)
    try:
        return Master(cfg).run()
    except ConfigError as e:
        log.error("config_error", error=e.message)
        print(f"dlms2amqpd: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except GatewayError as e:
        log.error("fatal", error=e.message)
        print(f"dlms2amqpd: {e}", file=sys.stderr)
        return EXIT_WORKER_BOOT


if __name__ == "__main__":
    sys.exit(main())
