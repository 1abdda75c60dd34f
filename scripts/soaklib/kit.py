"""The shared test helpers the soak drives (throwaway Postgres, processes, DERP client endpoints, namespaces)."""

from __future__ import annotations

from testkit import netlab, pgcluster, procs, traffic
from testkit.procs import ROOT

__all__ = ["ROOT", "netlab", "pgcluster", "procs", "traffic"]
