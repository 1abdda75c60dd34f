#!/usr/bin/env python3
"""Latency probe: the same as ``coordinator probe`` (see ``docs/latency.md``).

    scripts/latency_probe.py --pg-url postgres://user:pass@db:5432/coordinator
    scripts/latency_probe.py --url http://10.0.0.1:3000 --token "$TOKEN" --json

Exit status 0: every figure within the threshold (10 ms); 1: a figure over it or a replica
unreachable; 2: usage or configuration error.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

try:
    from coordinator.ops.probe import main
except ModuleNotFoundError as exc:  # outside the project's venv (or before it is built)
    venv_python = ROOT / ".venv" / "bin" / "python"
    if venv_python.exists() and Path(sys.executable).resolve() != venv_python.resolve():
        os.execv(venv_python, [str(venv_python), __file__, *sys.argv[1:]])  # the checkout's venv has them
    print(f"latency_probe.py: Python package {exc.name!r} is missing: run `make test` once (creates .venv) "
          f"and use .venv/bin/python {sys.argv[0]}, or `pip install .`", file=sys.stderr)
    sys.exit(2)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="latency_probe.py"))
