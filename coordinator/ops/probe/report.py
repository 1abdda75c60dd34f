"""The judgement: figures in, the ``coordinator.ops.probe/v1`` document out. Pure: no I/O, no clock.

Every problem names what it is about (``subject``, ``replica``, ``peer``, ``figure``), so the JSON can
be filtered by a machine and the text read by a person.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from coordinator.core.errors import one_line
from coordinator.core.timestamps import iso_utc
from coordinator.ops.probe.model import SCHEMA, Figure, MeshPair, ReplicaInfo, fmt_ms, fmt_threshold, ms
from coordinator.ops.probe.tailnet import TailnetCheck
from coordinator.ops.probe.tailnet import judge as judge_tailnet

RELAY_URL_ENV = "COORDINATOR_DERP_SERVER_RELAY_URL"
_NO_DB = "not measured (no database URL)"


def _reported_ms(us: int | None) -> float | None:
    return None if not us or us <= 0 else us / 1000.0


@dataclass
class _Judge:
    """Collects problems; every figure is judged against one threshold (seconds)."""

    threshold: float
    problems: list[dict] = field(default_factory=list)

    @property
    def threshold_ms(self) -> float:
        return ms(self.threshold)

    def over(self, what: str, value_ms: float) -> str:
        return f"{what} {fmt_ms(value_ms)} over the {fmt_threshold(self.threshold_ms)} threshold"

    def problem(self, kind: str, subject: str, message: str, *, replica: ReplicaInfo | None = None,
                peer: ReplicaInfo | str | None = None, figure: str | None = None,
                value_ms: float | None = None) -> None:
        self.problems.append({
            "kind": kind, "subject": subject,
            "replica": replica.id if replica else None,
            "peer": peer.id if isinstance(peer, ReplicaInfo) else peer,
            "figure": figure, "value_ms": value_ms, "message": message,
        })

    def figure(self, fig: Figure, subject: str, what: str, *, replica: ReplicaInfo | None = None,
               peer: ReplicaInfo | None = None, figure: str | None = None, unreachable: bool = True) -> None:
        """No samples: unreachable (or failed); samples then an error: failed; a median over: latency."""
        med = fig.median
        where: dict[str, Any] = dict(replica=replica, peer=peer, figure=figure)
        if med is None:
            self.problem("unreachable" if unreachable else "failed", subject, f"{what}: {fig.error or 'no samples'}", **where)
            return
        if fig.error:  # answered, then stopped answering
            self.problem("failed", subject, f"{what}: {fig.error}", **where)
        if med > self.threshold:
            self.problem("latency", subject, self.over(what, ms(med)), value_ms=ms(med), **where)


def _section(fig: Figure | None, threshold: float) -> dict:
    if fig is None:
        return {"measured": False, "note": _NO_DB, "median_ms": None, "samples_ms": [], "error": None,
                "over_threshold": False}
    return {"measured": True, "note": None, **fig.to_json(threshold)}


def _replica(judge: _Judge, r: ReplicaInfo, single: bool) -> dict:
    if not r.relay_url and not single:  # a lone replica has no peer to relay to: noted, not judged
        judge.problem("unreachable", "replica",
                      f"{r.label} has no relay URL: its clients are unreachable from other replicas "
                      f"(set {RELAY_URL_ENV})", replica=r, figure="relay_url")
    elif r.relay_url:
        judge.figure(r.http, "replica", f"{r.label}: HTTP latency-check", replica=r, figure="http")
        judge.figure(r.derp, "replica", f"{r.label}: DERP ping", replica=r, figure="derp")
    if r.error:
        judge.problem("replica_error", "replica", f"{r.label} reports: {one_line(r.error)}", replica=r, figure="error")
    reported = {"database_ms": _reported_ms(r.database_latency_us), "pubsub_ms": _reported_ms(r.pubsub_latency_us)}
    for key, what in (("database_ms", "its database latency"), ("pubsub_ms", "its pub/sub round trip")):
        value = reported[key]
        if value is not None and value > judge.threshold_ms:
            judge.problem("latency", "replica", f"{r.label} reports " + judge.over(what, value), replica=r,
                          figure="reported_" + key[:-3], value_ms=value)
    return {
        "id": r.id, "short": r.short, "hostname": r.hostname, "region_id": r.region_id, "relay_url": r.relay_url,
        "reachable": bool(r.relay_url) and r.http.median is not None and r.derp.median is not None,
        "server_key": ("nodekey:" + r.server_key.hex()) if r.server_key else None,
        "error": r.error or None, "reported": reported,
        "http": r.http.to_json(judge.threshold), "derp": r.derp.to_json(judge.threshold),
    }


def _custom_relay(judge: _Judge, r: ReplicaInfo) -> dict:
    """A custom relay node: judged on answering (HTTP /derp/probe and a DERP ping), not on the threshold."""
    for fig, figure, what in ((r.http, "http", "GET /derp/probe"), (r.derp, "derp", "DERP ping")):
        if fig.median is None:
            judge.problem("unreachable", "relay", f"{r.label}: {what}: {fig.error or 'no samples'}", figure=figure,
                          peer=r.id)
    return {
        "id": r.id, "region_id": r.region_id, "region_code": getattr(r, "region_code", ""),
        "name": getattr(r, "name", r.id), "host_name": r.hostname, "url": r.relay_url,
        "reachable": r.http.median is not None and r.derp.median is not None,
        "server_key": ("nodekey:" + r.server_key.hex()) if r.server_key else None,
        "http": r.http.to_json(judge.threshold), "derp": r.derp.to_json(judge.threshold),
    }


def _shared_relays(judge: _Judge, replicas: list[ReplicaInfo]) -> None:
    """Two replicas whose relay URLs reach one relay (same server key): a load balancer in the way."""
    seen: dict[bytes, ReplicaInfo] = {}
    for r in replicas:
        if r.server_key is None:
            continue
        other = seen.setdefault(r.server_key, r)
        if other is not r:
            judge.problem("misconfigured", "replica",
                          f"{other.label} and {r.label} reach the same relay (server key nodekey:{r.server_key.hex()[:16]}…): "
                          "is one relay URL the load balancer?", replica=r, peer=other, figure="relay_url")


def _mesh_pair(judge: _Judge, p: MeshPair) -> dict:
    relays, rtt = p.relays(), p.rtt.median
    what = f"mesh path {p.a.short} -> {p.b.short}"
    if relays is None or rtt is None:  # (no round trip, no relays' share)
        judge.figure(p.rtt, "mesh", what, replica=p.a, peer=p.b, figure="mesh")
    elif relays > judge.threshold:
        judge.problem("latency", "mesh", judge.over(f"{what}: relays' share", ms(relays))
                      + f" (round trip {fmt_ms(ms(rtt))})", replica=p.a, peer=p.b, figure="mesh",
                      value_ms=ms(relays))
    return {
        "from": p.a.id, "to": p.b.id, "region_id": p.a.region_id, "rtt": p.rtt.to_json(judge.threshold),
        "relays_ms": None if relays is None else ms(relays),
        "over_threshold": relays is not None and relays > judge.threshold,
    }


def _matrix_cell(judge: _Judge, r: ReplicaInfo, peer: ReplicaInfo, entry: dict) -> dict:
    cell: dict[str, Any] = {k: entry.get(k) for k in ("relay_url", "http_ms", "derp_ms", "p99_ms", "error")}
    for k in ("http_ms", "derp_ms", "p99_ms"):
        if not isinstance(cell[k], int | float) or isinstance(cell[k], bool):
            cell[k] = None
    over = [k for k in ("http_ms", "derp_ms") if cell[k] is not None and cell[k] > judge.threshold_ms]
    cell["over_threshold"] = bool(over)
    if cell["error"]:
        judge.problem("unreachable", "matrix", f"{r.label} cannot reach {peer.short}: {one_line(cell['error'])}",
                      replica=r, peer=peer, figure="matrix")
    for k in over:
        judge.problem("latency", "matrix", f"{r.label} measures {peer.short}: " + judge.over(k[:-3], cell[k]),
                      replica=r, peer=peer, figure="matrix_" + k[:-3], value_ms=cell[k])
    return cell


def _matrix(judge: _Judge, replicas: list[ReplicaInfo]) -> dict[str, dict[str, dict]]:
    """What the replicas measured themselves (``replicas.peer_latencies``), live peers only."""
    by_id = {r.id: r for r in replicas}
    matrix: dict[str, dict[str, dict]] = {}
    for r in replicas:
        row = {}
        for peer_id, entry in sorted(r.peer_latencies.items()):
            peer = by_id.get(peer_id)
            if peer is not None and peer is not r:  # else a peer that is no longer alive
                row[peer_id] = _matrix_cell(judge, r, peer, entry)
        matrix[r.id] = row
    return matrix


def build_report(*, source: dict, threshold: float, samples: int, started_at: datetime, duration: float,
                 database: Figure | None, pubsub: Figure | None, replicas: list[ReplicaInfo],
                 not_alive: list[ReplicaInfo], mesh: list[MeshPair], relays: Sequence[ReplicaInfo] = (),
                 derp_map: dict | None = None, tailnet: tuple[TailnetCheck, float] | None = None) -> dict:
    """The ``coordinator.ops.probe/v1`` document for these figures (``threshold`` and ``duration`` in seconds)."""
    judge = _Judge(threshold)
    notes: list[str] = []
    if database is not None:
        judge.figure(database, "database", "database round trip from this host", figure="database", unreachable=False)
    if pubsub is not None:
        judge.figure(pubsub, "pubsub", "pub/sub round trip from this host", figure="pubsub", unreachable=False)
    if not replicas:
        judge.problem("unreachable", "replicas", "no live replicas found")
    single = len(replicas) == 1 and not replicas[0].relay_url
    relay_off = derp_map is not None and derp_map.get("embedded_relay") is False
    if relay_off:
        notes.append("the embedded relay is off (the DERP map has no embedded region): replicas have no relay URL "
                     "and no mesh; clients use the custom relays")
    elif single:
        notes.append(f"single-replica setup: {replicas[0].label} has no relay URL, which it needs only once a "
                     f"second replica joins (set {RELAY_URL_ENV} then)")
    replicas_json = [_replica(judge, r, single or relay_off) for r in replicas]
    if derp_map and derp_map.get("error"):
        notes.append(f"custom relays not probed: {derp_map['error']}")
    relays_json = [_custom_relay(judge, r) for r in relays]
    _shared_relays(judge, replicas)
    mesh_json = [_mesh_pair(judge, p) for p in mesh]
    matrix = _matrix(judge, replicas)
    tailnet_json = None
    if tailnet is not None:  # (the check, its own threshold in seconds)
        tailnet_json, tailnet_problems = judge_tailnet(*tailnet)
        judge.problems += tailnet_problems
    return {
        "schema": SCHEMA,
        "started_at": iso_utc(started_at),
        "duration_ms": round(duration * 1000.0, 1),
        "threshold_ms": judge.threshold_ms,
        "samples": samples,
        "source": source,
        "database": _section(database, threshold),
        "pubsub": _section(pubsub, threshold),
        "replicas": replicas_json,
        "mesh": mesh_json,
        "derp_map": derp_map,
        "relays": relays_json,
        "matrix": matrix,
        "tailnet": tailnet_json,
        "not_alive": [{"id": r.id, "hostname": r.hostname, "relay_url": r.relay_url} for r in not_alive],
        "notes": notes,
        "ok": not judge.problems,
        "problems": judge.problems,
    }
