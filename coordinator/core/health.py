"""Health findings and the rules that judge them: the latency limit, severities and their roll-up."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

LATENCY_THRESHOLD = 0.010  # seconds: every replica sits within 10 ms of every other and of Postgres
SEVERITIES = ("warning", "error")  # of a finding, mildest first


@dataclass(frozen=True)
class Finding:
    """One coded problem for the health report (codes like EDB01, EDERP03)."""

    code: str
    severity: str  # one of SEVERITIES
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "severity": self.severity, "message": self.message}


def overall(findings: Iterable[Finding]) -> str:
    """The worst severity among ``findings``, "ok" when there are none."""
    worst = max((SEVERITIES.index(f.severity) for f in findings), default=-1)
    return "ok" if worst < 0 else SEVERITIES[worst]
