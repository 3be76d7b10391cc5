# SPDX-License-Identifier: GPL-2.0-or-later
"""One error hierarchy for the whole gateway.

Every message is written for a field engineer: it is what ends up in a reply's
``Error`` field and in the logs.  It must never contain a Python repr, a frame
dump, or a secret (password, key, broker password).  Third-party exceptions are
translated into these at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations

from typing import Optional


class GatewayError(Exception):
    """Base of every error raised on purpose by dlms2amqp."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


# --- configuration and input -------------------------------------------------
class ConfigError(GatewayError):
    """The configuration file (or a file it names) cannot be used; the message names the key."""


class RequestError(GatewayError):
    """A request that cannot be executed as given (bad JSON, types, dates...)."""


class ConnectionStringError(RequestError):
    """A ConnectionString that does not parse; the message names the option."""


# --- meter side ----------------------------------------------------------------
class MeterError(GatewayError):
    """Anything that went wrong talking to a meter."""


class MeterConnectionError(MeterError):
    """TCP connection refused / unreachable, serial port missing or busy."""


class MeterTimeoutError(MeterError):
    """No (complete) answer in time; the message names the step."""


class MeterProtocolError(MeterError):
    """The meter answered with something that is not valid DLMS."""


class AuthenticationError(MeterError):
    """Association rejected (wrong password, wrong keys, unknown client)."""


class InvocationCounterError(AuthenticationError):
    """The meter refused the invocation counter of a ciphered association."""

    #: the counter the meter said it expects at least, when it said one
    expected: Optional[int] = None


class ObjectError(MeterError):
    """Object unknown to the meter, access denied, or other data-access result."""


# --- broker side ----------------------------------------------------------------
class BrokerError(GatewayError):
    """The broker cannot be reached or refused us; the message names it, never the password."""
