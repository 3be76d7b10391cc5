# SPDX-License-Identifier: GPL-2.0-or-later
"""Prometheus metrics of the daemon (names from shared/notes/reliability.md).

Only the master exports; workers send their counters with their heartbeats and results.
No label carries a meter, request or address: those would make the series unbounded.
"""

from __future__ import annotations

import errno
from typing import Optional

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from . import __version__
from .errors import ConfigError

_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)


class Metrics:
    """All metrics in one registry (one per process, so tests can build several)."""

    def __init__(self, registry: Optional[CollectorRegistry] = None):
        r = self.registry = registry or CollectorRegistry()
        p = "dlms2amqp_"
        self.requests = Counter(
            p + "requests",
            "Requests answered, by command and status",
            ["cmd", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            p + "request_duration_seconds",
            "Time from delivery to the reply being published",
            buckets=_BUCKETS,
            registry=r,
        )
        self.meter_session = Histogram(
            p + "meter_session_seconds",
            "Time spent in reader.execute per request",
            buckets=_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            p + "requests_in_flight", "Requests delivered and not yet acknowledged", registry=r
        )
        self.redeliveries = Counter(
            p + "redeliveries", "Deliveries flagged redelivered by the broker", registry=r
        )
        self.dedup_hits = Counter(
            p + "dedup_hits", "Redeliveries answered from the reply store", registry=r
        )
        self.dead_lettered = Counter(
            p + "dead_lettered", "Requests sent to the dead-letter queue", ["reason"], registry=r
        )
        self.publish_failures = Counter(
            p + "reply_publish_failures", "Reply publishes not confirmed", ["kind"], registry=r
        )
        self.workers_alive = Gauge(p + "workers_alive", "Worker processes alive", registry=r)
        self.worker_restarts = Counter(
            p + "worker_restarts", "Worker processes replaced", ["reason"], registry=r
        )
        self.broker_connected = Gauge(
            p + "broker_connected", "1 while connected to the broker", registry=r
        )
        self.broker_reconnects = Counter(
            p + "broker_reconnects", "Broker connections re-established", registry=r
        )
        self.pool_connections = Gauge(
            p + "pool_connections", "Idle associated meter sessions in the pools", registry=r
        )
        self.pool_hits = Counter(
            p + "pool_hits", "Requests served on a pooled (reused) association", registry=r
        )
        # broker-side surprises (issue 11)
        self.consumer_cancelled = Counter(
            p + "consumer_cancelled",
            "Consumers cancelled by the broker (InQueue deleted or moved)",
            registry=r,
        )
        self.replies_oversize = Counter(
            p + "replies_oversize",
            "Replies over MaxReplyBytes or the broker's max_message_size, by outcome",
            ["outcome"],  # refused | parts
            registry=r,
        )
        self.queue_redeclared = Counter(
            p + "queue_redeclared",
            "OutQueue or the dead-letter queue declared again after a message came back unroutable",
            registry=r,
        )
        # scale-out (daemon/partitions.py, meter/counters.py)
        self.partitions_active = Gauge(
            p + "partitions_active", "Partition queues this daemon is serving", registry=r
        )
        self.partition_consumers = Gauge(
            p + "partition_consumers",
            "Daemons subscribed to the partitions (active or standing by)",
            registry=r,
        )
        self.partition_handovers = Counter(
            p + "partition_handovers", "Partitions this daemon gave to another", registry=r
        )
        self.requests_moved = Counter(
            p + "requests_moved", "Requests moved from InQueue to their partition", registry=r
        )
        self.inqueue_other_consumers = Gauge(
            p + "inqueue_other_consumers",
            "Other consumers seen on InQueue with Partitions 0 (meters may get two sessions)",
            registry=r,
        )
        self.counter_resyncs = Counter(
            p + "counter_resyncs",
            "Invocation counters taken from the meter because ours was behind",
            registry=r,
        )
        self.replies_replayed = Counter(
            p + "replies_replayed",
            "Replies whose commit was in doubt (connection closed during it), sent back to "
            "their partition for its owner to settle",
            registry=r,
        )
        self.tx_commits = Counter(
            p + "tx_commits",
            "Transactions committed on the partitions' channel (replies with their acks, "
            "grouped while a commit is in flight)",
            registry=r,
        )
        self.tx_deliveries = Counter(
            p + "tx_committed_deliveries",
            "Replies and dead-letters (each with the ack of its delivery) in those commits",
            registry=r,
        )
        self.in_doubt = Counter(
            p + "in_doubt_settled",
            "Commits in doubt settled here: published, dropped (request answered or being "
            "read here), refused (not a daemon's)",
            ["outcome"],
            registry=r,
        )
        self.build_info = Gauge(p + "build_info", "Version of dlms2amqp", ["version"], registry=r)
        self.build_info.labels(version=__version__).set(1)

    def serve(self, port: int, address: str = "127.0.0.1") -> None:
        """Start the HTTP endpoint (a daemon thread of prometheus_client).

        The master calls this before it spawns anything, so a port taken by another
        daemon ends the start at once with one line (ConfigError, exit 78) instead of a
        traceback after the workers were started (a restart loop under systemd).
        """
        if not port:
            return
        try:
            start_http_server(port, addr=address, registry=self.registry)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                why = "is in use (another dlms2amqpd with the same MetricsPort?)"
            elif e.errno == errno.EACCES:
                why = "needs privileges (a port below 1024)"
            elif e.errno == errno.EADDRNOTAVAIL:
                why = "cannot be used: MetricsAddress is not an address of this host"
            else:
                why = f"cannot be opened ({e.strerror or e})"
            raise ConfigError(
                f"MetricsPort {port} on MetricsAddress {address} {why}; stop the other "
                "process or choose another MetricsPort (0 = no metrics endpoint)"
            ) from None
