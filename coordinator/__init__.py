"""High-availability layer for service replicas: Postgres rendezvous, embedded DERP relay mesh."""

__version__ = "0.1.0"
