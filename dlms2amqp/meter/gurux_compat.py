# SPDX-License-Identifier: GPL-2.0-or-later
"""Every change this project makes to Gurux's behaviour, in one place.

Applied once, on import, and only for the Gurux version they were written for:
another version fails loudly here instead of misbehaving somewhere else.

- raw-value mode: a reply object with ``raw_only`` set skips Gurux's value
  decoding (most of the gateway's CPU on profile reads); the session decodes
  the raw A-XDR itself with :mod:`dlms2amqp.meter.axdr`.
- print silencing: Gurux prints from inside the library (per-frame notices,
  key material on some signing paths) and stdout belongs to the CLI's JSON.
"""

from __future__ import annotations

import importlib
from importlib.metadata import version

from gurux_dlms.enums import RequestTypes
from gurux_dlms.GXDLMS import GXDLMS

#: the gurux-dlms release these patches were written against (setup.cfg pins it)
GURUX_DLMS_VERSION = "1.0.203"

_installed = version("gurux-dlms")
if _installed != GURUX_DLMS_VERSION:
    raise ImportError(
        f"dlms2amqp patches gurux-dlms {GURUX_DLMS_VERSION}, but {_installed} is installed; "
        "install the pinned version (pip install -e .)"
    )

# --- raw-value mode: skip Gurux's value decoding for replies that ask for it -----------
_orig_get_value = GXDLMS.getValueFromData.__func__


def _get_value_from_data(cls, settings, reply):
    if getattr(reply, "raw_only", False):
        if reply.moreData == RequestTypes.NONE:
            if settings:
                settings.resetBlockIndex()
            reply.data.position = 0
        return None
    return _orig_get_value(cls, settings, reply)


if not getattr(GXDLMS, "_dlms2amqp_raw", False):
    GXDLMS.getValueFromData = classmethod(_get_value_from_data)
    GXDLMS._dlms2amqp_raw = True


# Gurux prints to stdout from inside the library ("Encryption is applied." per frame, and
# key material on some signing paths); stdout belongs to the CLI's JSON.  Silence those
# modules' print (a module-level name shadows the builtin for that module only).
def _no_print(*_args, **_kwargs) -> None:
    return None


for _name in ("GXDLMSChippering", "GXSecure", "GXDLMSSettings", "_GXAPDU", "GXDLMS",
              "GXDLMSLNCommandHandler", "GXDLMSSNCommandHandler", "GXDLMSTranslator"):  # fmt: skip
    _module = importlib.import_module(f"gurux_dlms.{_name}")
    _module.print = _no_print
