#!/usr/bin/env python3
"""Latency probe: the same as ``coordinator probe`` (see ``docs/latency.md``).

    scripts/latency_probe.py --pg-url postgres://user:pass@db:5432/coordinator
    scripts/latency_probe.py --url http://10.0.0.1:3000 --token "$TOKEN" --json

Exit status 0: every figure within the threshold (10 ms); 1: a figure over it or a replica
unreachable; 2: usage or configuration error.
"""

import sys
from pathlib import Path

try:
    from coordinator.probe import main
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from coordinator.probe import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="latency_probe.py"))
