"""The replica registry: this process's row in ``replicas``, its heartbeat, and the live peers it finds."""

from coordinator.cluster.registry.registry import CHANNEL, ReplicaRegistry
from coordinator.cluster.registry.table import ALIVE_SQL, MISSED_BEATS, ReplicaInfo
from coordinator.cluster.registry.view import OperatorView

__all__ = ["ALIVE_SQL", "CHANNEL", "MISSED_BEATS", "OperatorView", "ReplicaInfo", "ReplicaRegistry"]
