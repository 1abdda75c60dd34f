"""Postgres LISTEN/NOTIFY pub/sub for the control plane (asyncio; psycopg's async API is asyncio-only).

Modelled on Coder's ``coderd/database/pubsub``: one dedicated LISTEN connection per ``PubSub``, one
LISTEN per channel fanned out to bounded per-subscriber queues, and a ``DroppedMessages`` signal so
subscribers can resync. Where Coder hurt its users this differs:

- The listener is checked actively (TCP keepalives plus a NOTIFY round trip every few seconds) and
  reconnects by itself with capped backoff. Nothing here ever exits the process: state is exposed
  through ``connected``, ``metrics`` and Prometheus instead of a watchdog that restarts every replica.
- LISTEN/UNLISTEN are applied by the task that owns the listener connection, reconciling the wanted
  channel set; subscribe/cancel races converge and can never deadlock against incoming notifications.
- A full subscriber queue keeps the oldest 2048 messages and reports the gap once, in order.
- Publishing while Postgres is down fails within ``publish_timeout``; publish connections are dialled
  on demand, so they recover as soon as Postgres does.
- ``BatchPublisher`` sends bursts as one statement (one commit) instead of one commit per message.

One module per concern: ``errors``, ``limits`` (what NOTIFY can carry), ``metrics``, ``queue`` (a
subscriber), ``publisher``, ``listener``, ``liveness`` (the active check), ``batch``, ``tasks`` (the
owner of every background task) and ``core`` (the ``PubSub`` facade).
"""

from coordinator.cluster.pubsub.batch import BatchPublisher
from coordinator.cluster.pubsub.core import Cancel, ErrHandler, Handler, PubSub
from coordinator.cluster.pubsub.errors import (
    DroppedMessages,
    InvalidChannel,
    InvalidPayload,
    NotConnected,
    PayloadTooLarge,
    PublishError,
    PubSubError,
    QueueFull,
)
from coordinator.cluster.pubsub.limits import (
    COLOSSAL_BYTES,
    MAX_CHANNEL_BYTES,
    MAX_PAYLOAD_BYTES,
    QUEUE_SIZE,
    check_channel,
    check_payload,
)
from coordinator.cluster.pubsub.publisher import BATCH_SQL

__all__ = [
    "BATCH_SQL",
    "COLOSSAL_BYTES",
    "MAX_CHANNEL_BYTES",
    "MAX_PAYLOAD_BYTES",
    "QUEUE_SIZE",
    "BatchPublisher",
    "Cancel",
    "DroppedMessages",
    "ErrHandler",
    "Handler",
    "InvalidChannel",
    "InvalidPayload",
    "NotConnected",
    "PayloadTooLarge",
    "PubSub",
    "PubSubError",
    "PublishError",
    "QueueFull",
    "check_channel",
    "check_payload",
]
