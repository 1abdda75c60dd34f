"""High-availability layer for service replicas: Postgres rendezvous, embedded DERP relay mesh.

``coordinator.Replica`` is the library entry point (see docs/library.md); importing the package
alone stays cheap.
"""

from coordinator.core.version import __version__

__all__ = ["Replica", "Settings", "load_settings", "__version__"]


def __getattr__(name: str):
    if name == "Replica":
        from coordinator.replica import Replica

        return Replica
    if name in ("Settings", "load_settings"):
        from coordinator.core import settings

        return getattr(settings, name)
    raise AttributeError(f"module 'coordinator' has no attribute {name!r}")
