"""Health findings for Postgres faults with a known cause (see :mod:`coordinator.cluster.pgerrors`).

The generic findings (``EDB01`` database unreachable, ``EPS01`` pub/sub disconnected) say that
something is wrong; these say what and what to do, from the errors the parts last saw.
"""

from __future__ import annotations

from typing import Protocol

from coordinator.cluster.latency import Finding
from coordinator.cluster.pgerrors import LISTEN_UNSUPPORTED, LOCKED, classify, for_url

_DETAIL = 300  # characters of the raw error kept in a finding


class _Registry(Protocol):
    @property
    def healthy(self) -> bool: ...
    @property
    def last_error(self) -> str | None: ...


class _PubSub(Protocol):
    listen_url: str

    @property
    def connected(self) -> bool: ...
    @property
    def listen_problem(self) -> str | None: ...
    @property
    def last_error(self) -> str | None: ...


def postgres_findings(url: str, registry: _Registry | None, pubsub: _PubSub | None,
                      join_error: str | None) -> list[Finding]:
    """One finding per known cause among the heartbeat's, the join loop's and the listener's last errors."""
    errors: list[tuple[str, str, str]] = []  # (what failed, its error, the URL it used)
    if registry is not None and not registry.healthy and registry.last_error:
        errors.append(("heartbeats", registry.last_error, url))
    elif registry is None and join_error:
        errors.append(("joining the replica set", join_error, url))
    out: list[Finding] = []
    if pubsub is not None:
        if pubsub.listen_problem:
            out.append(Finding(LISTEN_UNSUPPORTED.code, "error", pubsub.listen_problem))
        elif not pubsub.connected and pubsub.last_error:
            errors.append(("the pub/sub listener", pubsub.last_error, pubsub.listen_url))
    seen: set[str] = {f.code for f in out}
    for what, error, where in errors:
        cause = classify(error)
        if cause is None or cause.code in seen:
            continue
        seen.add(cause.code)
        cause = for_url(cause, where)
        detail = " ".join(error.split())[:_DETAIL]
        severity = "warning" if cause is LOCKED else "error"
        out.append(Finding(cause.code, severity, f"{what}: {cause.line(detail)}"))
    return out
