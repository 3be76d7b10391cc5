# SPDX-License-Identifier: GPL-2.0-or-later
"""AMQP and processes: the master, its broker adapter, the workers and the reply store.

DLMS is reached only through :mod:`dlms2amqp.meter` (``reader.execute``, ``meter_key``).
"""
