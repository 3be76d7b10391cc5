# SPDX-License-Identifier: GPL-2.0-or-later
"""One error hierarchy for the whole gateway.

Every message is written for a field engineer: it is what ends up in a reply's
``Error`` field and in the logs.  It must never contain a Python repr, a frame
dump, or a secret (password, key, broker password).  Third-party exceptions are
translated into these at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error raised on purpose by dlms2amqp."""

    #: short machine-friendly reason, used as a metric label / dead-letter reason
    reason = "error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


# --- configuration and input -------------------------------------------------
class ConfigError(GatewayError):
    reason = "config"


class RequestError(GatewayError):
    """A request that cannot be executed as given (bad JSON, types, dates...)."""

    reason = "bad_request"


class ConnectionStringError(RequestError):
    """A ConnectionString that does not parse; the message names the option."""

    reason = "bad_connection_string"


# --- meter side ----------------------------------------------------------------
class MeterError(GatewayError):
    """Anything that went wrong talking to a meter."""

    reason = "meter_error"


class MeterConnectionError(MeterError):
    """TCP connection refused / unreachable, serial port missing or busy."""

    reason = "connection"


class MeterTimeoutError(MeterError):
    """No (complete) answer in time; the message names the step."""

    reason = "timeout"


class MeterProtocolError(MeterError):
    """The meter answered with something that is not valid DLMS."""

    reason = "protocol"


class AuthenticationError(MeterError):
    """Association rejected (wrong password, wrong keys, unknown client)."""

    reason = "authentication"


class InvocationCounterError(AuthenticationError):
    reason = "invocation_counter"


class ObjectError(MeterError):
    """Object unknown to the meter, access denied, or other data-access result."""

    reason = "data_access"


# --- broker side ----------------------------------------------------------------
class BrokerError(GatewayError):
    reason = "broker"
