"""The cluster: Postgres, pub/sub, the replica registry, the mesh, latency and the control plane that wires them."""
