"""Helpers shared by the tests and the scripts (benchmarks, fuzzing); not part of the wheel.

Importable from the repository root: pytest puts it on the path (``pythonpath`` in pyproject.toml),
and ``make`` adds the root to the virtual environment for the scripts (a ``.pth`` file).

``pgcluster`` (throwaway PostgreSQL servers), ``procs`` (processes, ports, HTTP), ``cluster``
(replica processes behind nginx), ``relayfix`` (in-process relays), ``polling`` (every wait),
``delayproxy`` (a TCP proxy that adds latency), ``traffic`` and ``flood`` (DERP load), ``rawderp``
(a raw-socket DERP peer that may misbehave).
"""
