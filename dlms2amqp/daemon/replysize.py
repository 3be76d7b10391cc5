# SPDX-License-Identifier: GPL-2.0-or-later
"""Replies within a size limit: whole, in numbered parts, or refused.  Pure: no broker.

The broker closes the channel on a message over its ``max_message_size`` (406); every
unconfirmed publish on that channel is lost, the request is redelivered, answered from
the reply store with the same body, and the same publish fails again.  So the daemon
checks each reply against ``MaxReplyBytes`` (and the broker's limit once it has seen it)
*before* publishing:

- within the limit: published as it is;
- over it, and the request asked for parts (``"SplitReply": true``): the DataRecords
  are cut into parts, each a complete reply in the seed's format plus ``Part`` (1-based)
  and ``Parts`` (how many), each within the limit;
- otherwise: a ``notok`` reply naming the size and the limit and what to do instead.

The parts and the refusal are computed from the stored reply, and their MsgIDs are
derived from its MsgID, so a redelivery gets the very same messages again.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import orjson

from .. import reply as replymod
from ..request import SPLIT_FIELD

#: name of the optional request field asking for a split reply
_NS = uuid.UUID("6f1f3b1e-8f5d-4d6e-9a55-2d1a6c0e5b11")  # our namespace for derived MsgIDs


@dataclass(frozen=True)
class Fitted:
    """What to publish for one reply."""

    kind: str  # "whole" | "parts" | "refused"
    messages: list[tuple[str, bytes]]  # (reply MsgID, body), in order
    size: int  # bytes of the original reply body


def derived_id(reply_id: str, what: str) -> str:
    """A MsgID that is always the same for the same reply and the same use."""
    return str(uuid.uuid5(_NS, f"{reply_id}/{what}"))


def fit(
    in_msg_id: str, reply_id: str, body: bytes, limit: int, split: bool, limit_name: str
) -> Fitted:
    """The messages to publish for ``body`` with at most ``limit`` bytes each.

    ``limit_name`` names the limit in the refusal (``MaxReplyBytes`` or the broker's
    ``max_message_size``).
    """
    size = len(body)
    if size <= limit:
        return Fitted("whole", [(reply_id, body)], size)
    why = ""
    if split:
        parts = split_reply(reply_id, body, limit)
        if parts is not None:
            return Fitted("parts", parts, size)
        why = "; even split into parts, one DataRecord alone is over the limit"
    hint = (
        "; ask for a shorter range (dtFrom/dtTo)"
        if why
        else "; ask for a shorter range (dtFrom/dtTo), or add "
        f'"{SPLIT_FIELD}": true to the request to get the reply in numbered parts'
    )
    message = (
        f"The reply is {size} bytes, more than the {limit} bytes {limit_name} allows{why}{hint}"
    )
    rep = replymod.error_reply(in_msg_id, message)
    rep["MsgID"] = derived_id(reply_id, f"refused/{limit}")
    return Fitted("refused", [(rep["MsgID"], replymod.dumps(rep))], size)


def split_reply(reply_id: str, body: bytes, limit: int) -> list[tuple[str, bytes]] | None:
    """Cut a reply's DataRecords into parts of at most ``limit`` bytes; None if impossible.

    Every part keeps the reply's keys and values (InMsgID, Status, Error) with its own
    MsgID and a slice of DataRecords, then ``Part`` and ``Parts``.
    """
    try:
        rep = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(rep, dict) or not isinstance(rep.get("DataRecords"), list):
        return None
    records: list[Any] = rep["DataRecords"]
    if not records:
        return None
    sizes = [len(orjson.dumps(r)) for r in records]
    n_max = len(records)
    # the envelope at its largest: a derived MsgID, Part and Parts with the most digits
    envelope = _part(rep, derived_id(reply_id, "0"), [], n_max, n_max)
    room = limit - len(envelope)
    chunks: list[tuple[int, int]] = []
    start, used = 0, 0
    for i, s in enumerate(sizes):
        extra = s + (1 if i > start else 0)  # the comma between records
        if s > room:
            return None
        if used + extra > room:
            chunks.append((start, i))
            start, used = i, s
        else:
            used += extra
    chunks.append((start, len(records)))
    n = len(chunks)
    out = []
    for k, (a, b) in enumerate(chunks, 1):
        mid = derived_id(reply_id, f"part/{k}/{n}")
        data = _part(rep, mid, records[a:b], k, n)
        if len(data) > limit:  # cannot happen with the room computed above; never publish it
            return None
        out.append((mid, data))
    return out


def _part(rep: dict, msg_id: str, records: list[Any], part: int, parts: int) -> bytes:
    out = {k: v for k, v in rep.items() if k not in ("DataRecords", "Part", "Parts")}
    out["MsgID"] = msg_id
    out["DataRecords"] = records
    out["Part"] = part
    out["Parts"] = parts
    return orjson.dumps(out)
