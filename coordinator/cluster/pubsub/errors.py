"""The pub/sub's errors and the one way it turns an exception into a log line."""

from __future__ import annotations


class PubSubError(Exception):
    """Base class of the pub/sub's errors."""


class InvalidChannel(PubSubError, ValueError):
    """Channel name empty, longer than 63 bytes, containing NUL, or reserved."""


class InvalidPayload(PubSubError, ValueError):
    """Payload that Postgres cannot carry as NOTIFY text (not UTF-8, or containing NUL)."""


class PayloadTooLarge(InvalidPayload):
    """Payload of 8000 bytes or more: send an id and let the receiver query."""


class PublishError(PubSubError):
    """The message was not sent (Postgres unreachable, timeout, rejected); ``__cause__`` has details."""


class QueueFull(PublishError):
    """The batch queue stayed full for ``publish_timeout``; the message was not queued."""


class NotConnected(PubSubError):
    """The listener connection is down, or could not be opened at start."""


class DroppedMessages(Exception):  # noqa: N818 - named after Coder's ErrDroppedMessages
    """Given to ``subscribe_with_err`` handlers when messages may have been lost: resync from the database."""

    def __init__(self, channel: str, reason: str, count: int | None = None):
        self.channel, self.reason, self.count = channel, reason, count
        what = f"{count} message{'s' if count != 1 else ''}" if count else "messages"
        super().__init__(f"dropped {what} on channel {channel!r}: {reason}")
