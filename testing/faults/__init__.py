# SPDX-License-Identifier: GPL-2.0-or-later
"""The fault-injection suite's building blocks, in one namespace (tests/test_faults.py and
bench/faults_report.py use ``from testing import faults``).

    lab        Lab (private broker node, latency simulator, counting proxy, daemon), Ctx,
               Result, the fault daemon, leak scanning, request bodies
    broker     faults of the broker and of the daemon's processes, and SCENARIOS
    requests   faulty meters, bad requests, a flood
    restarts   TLS, a ciphered session across a kill, queue mismatch, poison, delivery limit

The oracle, the proxy and the collector live one level up (testing.oracle, testing.proxy,
testing.collector) and are re-exported here.
"""

from __future__ import annotations

from ..collector import AmqpClient, Collector
from ..daemon import DaemonProcess, children_of, rss_kb
from ..oracle import (
    CANARIES,
    CANARY_AKEY,
    CANARY_BKEY,
    CANARY_BROKER_PASSWORD,
    CANARY_DKEY,
    CANARY_PASSWORD,
    ROWS,
    Received,
    Row,
    accounted_ids,
    canary_forms,
    dead_letter_reason,
    files_under,
    format_table,
    judge,
    reply_in_id,
    scan_canaries,
)
from ..proxy import TAG_AARQ, TAG_GET_RESPONSE, WRAPPER_HEADER, PortStats, TcpProxy
from .broker import (
    LOST_EVENT,
    SCENARIOS,
    fault_broker_restart,
    fault_close_all,
    fault_kill_master,
    fault_kill_worker,
    fault_memory_alarm,
    fault_sigterm,
    fault_silent_cut,
)
from .lab import (
    Ctx,
    Daemon,
    Env,
    Lab,
    Result,
    conn_string,
    daemon_env,
    leak_scan,
    read_request,
    reply_dict,
    stored_reply_ids,
    wait_for,
    worker_pids,
)
from .requests import (
    METER_FAULTS,
    _same_msg_id,
    bad_request_corpus,
    scenario_bad_requests,
    scenario_flood,
    scenario_meter_faults,
)
from .restarts import (
    GMAC_AKEY,
    GMAC_BKEY,
    check_queue_mismatch,
    gmac_request,
    scenario_cipher_kill,
    scenario_delivery_limit,
    scenario_poison_worker_crash,
    scenario_tls,
)

__all__ = [
    "AmqpClient",
    "CANARIES",
    "CANARY_AKEY",
    "CANARY_BKEY",
    "CANARY_BROKER_PASSWORD",
    "CANARY_DKEY",
    "CANARY_PASSWORD",
    "Collector",
    "Ctx",
    "Daemon",
    "DaemonProcess",
    "Env",
    "GMAC_AKEY",
    "GMAC_BKEY",
    "LOST_EVENT",
    "Lab",
    "METER_FAULTS",
    "PortStats",
    "ROWS",
    "Received",
    "Result",
    "Row",
    "SCENARIOS",
    "TAG_AARQ",
    "TAG_GET_RESPONSE",
    "TcpProxy",
    "WRAPPER_HEADER",
    "_same_msg_id",
    "accounted_ids",
    "bad_request_corpus",
    "canary_forms",
    "check_queue_mismatch",
    "children_of",
    "conn_string",
    "daemon_env",
    "dead_letter_reason",
    "fault_broker_restart",
    "fault_close_all",
    "fault_kill_master",
    "fault_kill_worker",
    "fault_memory_alarm",
    "fault_sigterm",
    "fault_silent_cut",
    "files_under",
    "format_table",
    "gmac_request",
    "judge",
    "leak_scan",
    "read_request",
    "reply_dict",
    "reply_in_id",
    "rss_kb",
    "scan_canaries",
    "scenario_bad_requests",
    "scenario_cipher_kill",
    "scenario_delivery_limit",
    "scenario_flood",
    "scenario_meter_faults",
    "scenario_poison_worker_crash",
    "scenario_tls",
    "stored_reply_ids",
    "wait_for",
    "worker_pids",
]
