# SPDX-License-Identifier: GPL-2.0-or-later
"""dlms2amqp: read DLMS/COSEM smart meters through RabbitMQ."""

__version__ = "0.2.0"
