# SPDX-License-Identifier: GPL-2.0-or-later
"""Commits in doubt, settled by the partition's owner (docs/design.md, "Commits in doubt").

With partitions the reply and the ack of its request go out in one ``tx_commit``.  When
the connection closes while a commit is in flight, its outcome is unknown:

a. the broker settled the ack and lost the reply (a broker node stopping in between: seen
   in the kill-and-node-stop test) - nobody will answer that request;
b. it committed both - the client has the reply;
c. it rolled both back - the request is redelivered, maybe to another daemon, which reads
   the meter again and answers with a reply of its own.

Publishing the reply again straight to the client (the first remedy) mends (a) and turns
(c) into two different replies to one request.  So the daemon does not decide: it sends
the request and its stored reply, as one message, back into the request's own partition
queue.  Whoever owns the partition then takes it *after* the redelivered request of case
(c) (a requeued message goes back to the head of the queue, this one comes later, on a new
connection), and decides with what it knows:

- the request is being read here, or its reply is in a commit in flight here, or was
  committed here lately (``Master.committed``): drop it, the reply of that read is the
  only one (c).  This is checked first, even while the daemon stops or hands the
  partition over (both requeue, and the next owner would not know);
- else: store that reply and publish it, with the ack of this message, in one commit (a);
  in case (b) the client gets the same bytes twice, the duplicate RabbitMQ allows anyway.
  If the redelivered request reaches this daemon later after all, it is answered from the
  reply store (``ReplyStoreSize`` > 0), the same bytes again.

A reply to a request out of ``<InQueue>.serial.expired`` (which every daemon consumes)
goes back there, and a serial port's copy that waits longer than ``SerialPortWait`` ends
there too: whichever daemon takes it settles it the same way.  If request + reply would
exceed the broker's ``max_message_size`` (once learned), the reply's own messages are
published again instead, straight to the client.

The message: body = request bytes + reply bytes; headers ``x-dlms2amqp-in-doubt`` (the
reply id) and ``x-dlms2amqp-request-bytes``; ``user_id`` = the daemon's broker user,
which RabbitMQ checks against the connection's login.  A message with those headers and
another (or no) ``user_id`` is not ours: it is dead-lettered, never published as a
reply.  The InQueue mover drops both headers, so they cannot be smuggled in a request.
A client that logs in as the daemons' broker user could still forge one: give clients a
user of their own (README, "Several gateway hosts").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import pika

from . import amqp

HEADER = "x-dlms2amqp-in-doubt"
LENGTH_HEADER = "x-dlms2amqp-request-bytes"


@dataclass(frozen=True)
class InDoubt:
    """What a daemon's commit in doubt left for the partition's owner to settle."""

    request: bytes  # the request as delivered to the daemon that answered it
    reply_id: str
    reply: bytes  # the reply as its reply store keeps it (whole; parts are cut again)


def message(
    user: str, queue: str, reply_to: Optional[str], request: bytes, reply_id: str, reply: bytes
) -> tuple[str, str, bytes, pika.BasicProperties]:
    """The (exchange, routing key, body, properties) to publish, with a confirm, once
    connected again: straight into ``queue``, the partition the request came from."""
    props = pika.BasicProperties(
        content_type="application/octet-stream",
        delivery_mode=amqp.PERSISTENT,
        message_id="in-doubt-" + reply_id,
        reply_to=reply_to,
        user_id=user,
        headers={HEADER: reply_id, LENGTH_HEADER: len(request)},
    )
    return "", queue, request + reply, props


def is_in_doubt(props: Any) -> bool:
    """The delivery is a commit in doubt to settle, or claims to be."""
    headers = getattr(props, "headers", None)
    return isinstance(headers, dict) and HEADER in headers


def parse(user: str, props: Any, body: bytes) -> tuple[Optional[InDoubt], str]:
    """The commit in doubt carried by a delivery, or (None, why it is refused)."""
    if getattr(props, "user_id", None) != user:
        return None, (
            f"an in-doubt reply not published by a daemon of broker user {user} "
            "(user_id missing or another user): not ours, not published"
        )
    headers = props.headers or {}
    reply_id, size = headers.get(HEADER), headers.get(LENGTH_HEADER)
    if isinstance(reply_id, bytes):
        reply_id = reply_id.decode("utf-8", "replace")
    if (
        not isinstance(reply_id, str)
        or not reply_id
        or isinstance(size, bool)
        or not isinstance(size, int)
        or not 0 < size < len(body)
    ):
        return None, "an in-doubt reply with malformed headers: not published"
    return InDoubt(body[:size], reply_id, body[size:]), ""
