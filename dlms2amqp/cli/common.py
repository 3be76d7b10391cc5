# SPDX-License-Identifier: GPL-2.0-or-later
"""What every command shares: exit codes, the default configuration file, its loading.

Exit codes follow sysexits.h where one fits, so that systemd and scripts can tell a
configuration mistake (78, do not restart) from a broker that is away (69, retry).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from ..config import Config, load_config
from ..errors import ConfigError

EXIT_OK = 0
EXIT_NOTOK = 1  # dlms2amqp-read: the meter answered notok; -send: some files rejected
EXIT_USAGE = 2  # argparse's own code for a bad command line
EXIT_WORKER_BOOT = 3  # dlms2amqpd: workers cannot start, or another fatal error
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: the broker cannot be reached
EXIT_CONFIG = 78  # EX_CONFIG: the configuration file is wrong

DEFAULT_CONFIG = "/etc/dlms2amqp.json"


def add_config_option(p: argparse.ArgumentParser, help: str = "daemon config file") -> None:
    """The -c/--config option, with the one default path."""
    p.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=help)


def load_or_report(prog: str, path: str) -> Optional[Config]:
    """Load the configuration; on error print it (named key and file) and return None."""
    try:
        return load_config(path)
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return None
