# SPDX-License-Identifier: GPL-2.0-or-later
"""The intake policy: one delivery -> one decision.  Pure: no broker, no processes.

For each request taken from InQueue the master asks ``Intake.decide`` what to do:

- ``DeadLetter``  the body is no request at all (too large, not JSON, not an object, no
                  MsgID), or it was delivered too often without an answer (poison), or
                  its stored reply could not be published in as many deliveries;
- ``Stored``      it was answered before (a redelivery): publish the stored reply again;
- ``Attach``      the same request is being read right now: answer both deliveries at once;
- ``Answer``      a request we can answer without a meter (invalid field, unknown command,
                  bad connection string): a ``notok`` reply in the field engineer's words;
- ``Dispatch``    a valid READ: the request and its connection settings, parsed once.

Redeliveries are counted only from what the broker vouches for: the ``redelivered`` flag,
the daemon's own record, and a quorum queue's ``x-delivery-count`` on a redelivery (the
broker writes it then).  A publisher can put any header on a message: a classic queue
passes it through untouched, and a quorum queue too on the first delivery (RabbitMQ
3.10, seen in tests/test_daemon_broker.py).  So a first delivery is never poison.

The body is decoded once and the connection string parsed once here; the worker gets
both.  The reply store is reached through the small ``Replies`` interface (the real
``ReplyStore`` in the daemon and in the unit tests).
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Union

import orjson

from .. import reply as replymod
from ..errors import GatewayError
from ..meter.connstring import ConnSettings, parse_connection_string
from ..request import SPLIT_FIELD, ReadRequest, msg_id_of, request_from


class Replies(Protocol):
    """What the intake needs of the reply store."""

    def key_for(self, msg_id: str, body: bytes) -> str: ...

    def get(self, key: str) -> Optional[tuple[str, bytes]]: ...

    def count_attempt(self, key: str) -> int:
        """Record one more redelivery of a request (or store answer); returns the count."""
        ...

    def forget_attempts(self, key: str) -> None: ...


@dataclass(frozen=True)
class DeadLetter:
    reason: str  # the x-dlms2amqp-reason header: for whoever reads the dead-letter queue
    kind: str  # bounded metric label


@dataclass(frozen=True)
class Stored:
    key: str
    msg_id: str
    reply_id: str
    body: bytes
    split: bool = False  # the request asked for a reply in parts
    attempts: int = 0  # answers from the store so far for this redelivered request


@dataclass(frozen=True)
class Attach:
    key: str


@dataclass(frozen=True)
class Answer:
    key: str
    msg_id: str
    reply_id: str
    body: bytes
    cmd: str  # as sent (for the log), "?" when the body did not validate
    error: str


@dataclass(frozen=True)
class Dispatch:
    key: str
    msg_id: str
    request: ReadRequest
    settings: ConnSettings


Decision = Union[DeadLetter, Stored, Attach, Answer, Dispatch]


class Intake:
    """The rules of the door, with their limits from the configuration."""

    def __init__(
        self,
        replies: Replies,
        max_body_bytes: int,
        delivery_limit: int,
        queue_type: str = "classic",
    ):
        self.replies = replies
        self.max_body_bytes = max_body_bytes
        self.delivery_limit = delivery_limit
        self.quorum = queue_type == "quorum"

    def decide(
        self,
        body: bytes,
        headers: Optional[Mapping[str, Any]],
        running: Container[str],
        redelivered: bool = False,
        parsed: Optional[ConnSettings] = None,
    ) -> Decision:
        """What to do with one delivery; ``running`` holds the keys being read now.

        ``redelivered`` is the broker's flag on the delivery; ``parsed``: the connection
        settings of this very body, parsed already (by the partition mover), unused since.
        """
        if len(body) > self.max_body_bytes:
            return DeadLetter(
                f"body of {len(body)} bytes exceeds MaxBodyBytes {self.max_body_bytes}",
                "too_large",
            )
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return DeadLetter("body is not valid JSON", "not_json")
        if not isinstance(data, dict):
            return DeadLetter("body is not a JSON object", "not_object")
        msg_id = msg_id_of(data)
        if msg_id is None:
            return DeadLetter("body has no MsgID (string or number)", "no_msgid")
        key = self.replies.key_for(msg_id, body)
        limit = self.delivery_limit
        stored = self.replies.get(key)
        if stored is not None:
            # answered before; if its reply keeps failing to publish (the broker closing
            # the channel on it), the delivery limit ends the loop here too
            answers = self.replies.count_attempt(key) if redelivered else 0
            if answers > limit:
                self.replies.forget_attempts(key)
                return DeadLetter(
                    f"answered {answers} times from the reply store, but the broker never "
                    "confirmed the reply (delivery limit)",
                    "delivery_limit",
                )
            return Stored(key, msg_id, stored[0], stored[1], data.get(SPLIT_FIELD) is True, answers)
        if key in running:
            return Attach(key)
        if redelivered:
            # the first delivery is not written down (nearly every request has only that
            # one; a write per request was the master's dearest step): it is the "+ 1"
            attempts = self.replies.count_attempt(key) + 1
        else:
            # a new message, even with a body seen before: earlier attempts were not its own
            self.replies.forget_attempts(key)
            attempts = 1
        count = (headers or {}).get("x-delivery-count") if self.quorum and redelivered else None
        if isinstance(count, bool) or not isinstance(count, int):
            count = None
        if (count is not None and count >= limit) or attempts > limit:
            self.replies.forget_attempts(key)
            return DeadLetter(
                f"delivered {max(attempts, (count or 0) + 1)} times without an "
                "answer (poison request)",
                "delivery_limit",
            )
        try:
            request = request_from(data)
        except GatewayError as e:
            return _answer(key, msg_id, "?", e.message)
        if request.cmd != "READ":
            return _answer(
                key,
                msg_id,
                request.cmd,
                f"Unknown command {request.cmd[:32]}; only READ is supported",
            )
        if parsed is not None:
            return Dispatch(key, msg_id, request, parsed)
        try:
            settings = parse_connection_string(request.connection_string)
        except GatewayError as e:
            return _answer(key, msg_id, request.cmd, e.message)
        return Dispatch(key, msg_id, request, settings)


def _answer(key: str, msg_id: str, cmd: str, error: str) -> Answer:
    rep = replymod.error_reply(msg_id, error)
    return Answer(key, msg_id, rep["MsgID"], replymod.dumps(rep), cmd, error)
