# SPDX-License-Identifier: GPL-2.0-or-later
"""DLMS/COSEM only: connection strings, media, sessions, the pool and the reader.

No AMQP and no processes here.  The daemon's master uses only the Gurux-free modules
(``connstring``, ``targets``, ``options``: parse, route by ``ConnSettings.meter_key``,
build the ``ReaderOptions``); its workers call ``reader.execute`` with a ``pool.SessionPool``.
"""
