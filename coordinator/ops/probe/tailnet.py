"""The probe's peer coordinator check: an update made on one replica reaches a peer on another.

Two probe peers connect to the coordinators of two different replicas, each by its relay URL (never
through the load balancer, which could put both on one replica), and one opens a tunnel to the
other. Once each has the other's node, every sample is one update, alternately from either end,
timed from the ``update`` sent until the other end received it: the path a real node change takes
(WebSocket to replica A, a write and a NOTIFY in PostgreSQL, replica B's query, WebSocket to the
peer). Both peers send ``disconnect`` at the end, so they leave no rows behind but the tunnel's.

Failures carry codes (``docs/coordinator.md``): ETAILNET11 a probe peer could not connect or was
refused, ETAILNET12 a node or an update did not cross within the timeout, ETAILNET13 the median
propagation is over the threshold.
"""

from __future__ import annotations

import functools
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from coordinator.cluster.tailnet.client import TailnetClient
from coordinator.cluster.tailnet.view import TailnetError, TailnetRefused
from coordinator.core.errors import describe
from coordinator.core.urls import relay_base
from coordinator.ops.probe.model import Figure, ReplicaInfo, fmt_ms, fmt_threshold, ms

TOKEN_ENV = "COORDINATOR_TAILNET_TOKEN"
TOKEN_KEY = "tailnet_token"  # site_config key of the deployment's generated token (coordinator.cluster.tailnet.auth)
DEFAULT_THRESHOLD = 0.100  # seconds: the coordinator's propagation goal (p99 <= 100 ms), not the 10 ms latency one
CODE_UNREACHABLE, CODE_NOT_CROSSED, CODE_SLOW = "ETAILNET11", "ETAILNET12", "ETAILNET13"


@dataclass
class TailnetCheck:
    """The check's outcome: the two replicas, the propagation samples, or why it was not measured."""

    a: ReplicaInfo | None = None
    b: ReplicaInfo | None = None
    propagation: Figure = field(default_factory=Figure)
    code: str | None = None  # set when it failed
    skipped: str | None = None  # set when it was not run (no token, fewer than two replicas)


async def stored_token(conn: Any) -> str | None:
    """The deployment's generated tailnet token from ``site_config`` (None if it has none yet)."""
    try:
        cur = await conn.execute("SELECT value FROM site_config WHERE key = %s", (TOKEN_KEY,))
        row = await cur.fetchone()
    except Exception:  # an older schema, or no right to read it: the check then says it has no token
        return None
    return str(row[0]) if row else None


def pick_pair(replicas: list[ReplicaInfo]) -> tuple[ReplicaInfo, ReplicaInfo] | None:
    """Two live replicas reachable by their relay URLs (the first two by ID), or None."""
    usable = sorted((r for r in replicas if r.alive and relay_base(r.relay_url)), key=lambda r: r.id)
    return (usable[0], usable[1]) if len(usable) >= 2 else None


async def measure_tailnet(replicas: list[ReplicaInfo], token: str | None, samples: int, timeout: float) -> TailnetCheck:
    """Run the check (``timeout`` bounds each connection and each sample, in seconds)."""
    pair = pick_pair(replicas)
    if pair is None:
        return TailnetCheck(skipped="needs two live replicas with relay URLs")
    if not token:
        return TailnetCheck(*pair, skipped=f"no tailnet token (--tailnet-token or ${TOKEN_ENV}, or --pg-url)")
    check = TailnetCheck(*pair)
    ids = uuid.uuid4(), uuid.uuid4()
    nodes: list[dict[str, Any]] = [{"probe": "coordinator probe", "seq": 0}, {"probe": "coordinator probe", "seq": 0}]
    peers = [TailnetClient(str(relay_base(r.relay_url)), pid, token, node=node, connect_timeout=timeout,
                           backoff_max=min(1.0, timeout)) for r, pid, node in zip(pair, ids, nodes, strict=True)]
    try:
        for p in peers:
            p.start()
        for p, r in zip(peers, pair, strict=True):
            try:
                await p.wait_connected(timeout)
            except TailnetError as exc:
                return _failed(check, CODE_UNREACHABLE, f"probe peer on {r.label}: {describe(exc)}")
        await peers[0].add_tunnel(ids[1])
        try:
            await peers[0].wait_for_node(ids[1], timeout)
            await peers[1].wait_for_node(ids[0], timeout)
        except TailnetRefused as exc:  # accepted, then refused (a bad token, an unhealthy coordinator)
            return _failed(check, CODE_UNREACHABLE, f"a probe peer was refused: {describe(exc)}")
        except TailnetError as exc:
            return _failed(check, CODE_NOT_CROSSED, f"the tunnel's nodes did not cross: {describe(exc)}")
        for i in range(samples):
            src, dst = (0, 1) if i % 2 == 0 else (1, 0)
            seq = i + 1
            start = time.perf_counter()
            await peers[src].update({**nodes[src], "seq": seq})
            arrived = functools.partial(_has_seq, peers[dst], ids[src], seq)
            try:
                await peers[dst].wait_for(arrived, timeout, f"update {seq} from {pair[src].short}")
            except TailnetError as exc:
                return _failed(check, CODE_NOT_CROSSED, describe(exc))
            check.propagation.samples.append(time.perf_counter() - start)
    finally:
        for p in peers:
            await p.close()
    return check


def _has_seq(client: TailnetClient, peer: uuid.UUID, seq: int) -> bool:
    state = client.peers.get(peer)
    return state is not None and state.node is not None and state.node.get("seq") == seq


def _failed(check: TailnetCheck, code: str, why: str) -> TailnetCheck:
    check.code = code
    check.propagation.error = why
    return check


def judge(check: TailnetCheck, threshold: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the report's ``tailnet`` section, its problems): pure, like the rest of the report."""
    fig, problems = check.propagation, []
    what = "peer coordinator: an update across replicas"
    where = f" ({check.a.short} <-> {check.b.short})" if check.a and check.b else ""
    med = fig.median
    if check.skipped is None and check.code is None and med is not None and med > threshold:
        check.code = CODE_SLOW
    if check.code is not None:
        message = (f"{what}{where}: median {fmt_ms(ms(med))} over the {fmt_threshold(ms(threshold))} threshold"
                   if check.code == CODE_SLOW and med is not None else f"{what}{where}: {fig.error}")
        problems.append({"kind": "latency" if check.code == CODE_SLOW else "failed", "subject": "tailnet",
                         "replica": check.a.id if check.a else None, "peer": check.b.id if check.b else None,
                         "figure": "tailnet", "value_ms": None if med is None else ms(med),
                         "message": f"{message} [{check.code}]",
                         "code": check.code})
    section = {
        "measured": check.skipped is None, "note": check.skipped,
        "replicas": [r.id for r in (check.a, check.b) if r is not None],
        "threshold_ms": ms(threshold), "code": check.code, **fig.to_json(threshold),
    }
    return section, problems
