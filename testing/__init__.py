# SPDX-License-Identifier: GPL-2.0-or-later
"""The harness shared by the tests (tests/) and the benchmarks (bench/).

    ports       free TCP ports and port ranges on 127.0.0.1
    brokernode  a private RabbitMQ node (fault tests stop and restart it)
    simulator   dlms2amqp-sim as a subprocess on a free port range
    daemon      dlms2amqpd as a subprocess: config, output, log, metrics, its workers
    publisher   pipelined, confirmed publishing (one connection, many messages)
    collector   a thread consuming reply and dead-letter queues, through broker faults
    proxy       a TCP relay the test controls (silent cut, DLMS session counting)
    oracle      canary secrets and the oracle: every request answered once or dead-lettered
    faults      the fault-injection lab and its scenarios

It is not installed with the package (setup.cfg excludes it): pytest finds it from the
repository root (``pythonpath = .``), the bench scripts put the root on ``sys.path``.
``bench/`` imports nothing from ``tests/``.
"""
