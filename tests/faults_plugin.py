# SPDX-License-Identifier: GPL-2.0-or-later
"""Prints the fault table at the end of a pytest run that ran fault tests.

tests/test_faults.py registers it when it runs; tests/conftest.py may also list it in
``pytest_plugins = ["tests.faults_plugin"]`` (registered once either way).
"""

from __future__ import annotations

from typing import Any


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    from testing.oracle import ROWS, format_table

    if not ROWS:
        return
    terminalreporter.section("fault injection: requests and outcomes")
    for line in format_table(ROWS).splitlines():
        terminalreporter.write_line(line)
