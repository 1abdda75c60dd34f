"""The peer coordinator (Coder's ``pgcoord``): overlay peers find each other across replicas.

Peers connect to a WebSocket on any replica (``endpoint``), speak the JSON protocol of ``messages``
and tell the coordinator their node and their tunnels. State lives in Postgres (``store``; tables
of migration 0003), replicas learn of changes through NOTIFY wake-ups, judge each other by
heartbeats (``heartbeats``) and send each local peer the nodes of the peers it shares a tunnel
with (``mapper``). ``docs/coordinator.md`` describes the protocol and the semantics.

Only ``messages`` is imported here: the client side needs nothing else.
"""

from coordinator.cluster.tailnet import messages

__all__ = ["messages"]
