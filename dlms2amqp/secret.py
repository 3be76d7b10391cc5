# SPDX-License-Identifier: GPL-2.0-or-later
"""A container for passwords and keys whose repr and str never show the value.

Keeping secrets in this type means a stray ``log.info(..., settings=settings)``
or an exception that formats a dataclass cannot leak them: leaking takes an
explicit ``.reveal()``.
"""

from __future__ import annotations

from typing import Union

_MASK = "***"


class Secret:
    __slots__ = ("_value",)

    def __init__(self, value: Union[str, bytes]):
        self._value = value

    def reveal(self) -> Union[str, bytes]:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __len__(self) -> int:
        return len(self._value)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Secret):
            return self._value == other._value
        return NotImplemented

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def __repr__(self) -> str:
        return f"Secret({_MASK})"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __reduce__(self):
        # Secrets cross the master -> worker pipe; pickling keeps the value.
        return (Secret, (self._value,))
