"""High-availability layer for service replicas: Postgres rendezvous, embedded DERP relay mesh.

``coordinator.Replica`` is the library entry point (see docs/library.md); importing the package
alone stays cheap.
"""

__version__ = "0.1.0"
__all__ = ["Replica", "Settings", "load_settings", "__version__"]


def __getattr__(name: str):
    if name == "Replica":
        from coordinator.replica import Replica

        return Replica
    if name in ("Settings", "load_settings"):
        from coordinator import config

        return getattr(config, name)
    raise AttributeError(f"module 'coordinator' has no attribute {name!r}")
