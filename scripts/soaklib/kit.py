"""The shared test helpers the soak drives (throwaway Postgres, processes, DERP client endpoints).

They live in the repository's ``testkit/`` package; on a tree where they still sit in ``tests/``
(before that package), that directory is used instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # testkit/ (make's .pth in the venv does the same)

try:
    from testkit import pgcluster, procs, traffic
except ImportError:
    sys.path.append(str(ROOT / "tests"))
    import traffic  # type: ignore[no-redef]

    import pgcluster  # type: ignore[no-redef]
    import procs  # type: ignore[no-redef]

from testkit import netlab  # noqa: E402

__all__ = ["ROOT", "netlab", "pgcluster", "procs", "traffic"]
