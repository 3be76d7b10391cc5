# SPDX-License-Identifier: GPL-2.0-or-later
"""DLMS/COSEM only: connection strings, media, sessions, the pool and the reader.

No AMQP and no processes here; the daemon reaches this package through
``reader.execute`` and ``ConnSettings.meter_key`` alone.
"""
