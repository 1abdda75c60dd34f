"""One probe run: discover, measure, judge."""

from __future__ import annotations

import contextlib
import time
from datetime import UTC, datetime

from coordinator.core.health import LATENCY_THRESHOLD
from coordinator.core.urls import relay_base, without_userinfo
from coordinator.ops.probe.discovery import connect_db, replicas_from_api, replicas_from_db
from coordinator.ops.probe.measure import measure
from coordinator.ops.probe.model import (
    DEFAULT_SAMPLES,
    DEFAULT_TIMEOUT,
    ProbeUsageError,
    assign_short_ids,
)
from coordinator.ops.probe.relays import custom_relays
from coordinator.ops.probe.report import build_report
from coordinator.ops.probe.tailnet import DEFAULT_THRESHOLD as TAILNET_THRESHOLD
from coordinator.ops.probe.tailnet import TailnetCheck, measure_tailnet, stored_token


async def run_probe(
    *,
    pg_url: str | None = None,
    replica_url: str | None = None,
    token: str | None = None,
    threshold: float = LATENCY_THRESHOLD,
    samples: int = DEFAULT_SAMPLES,
    timeout: float = DEFAULT_TIMEOUT,
    insecure: bool = False,
    derp_map: str | None = None,
    tailnet_token: str | None = None,
    tailnet_threshold: float = TAILNET_THRESHOLD,
) -> dict:
    """Discover the replicas (from ``pg_url``, else from ``replica_url``'s API) and measure.

    Returns the ``coordinator.ops.probe/v1`` report (``report["ok"]``); raises :class:`ProbeUsageError`
    when the arguments lead nowhere. Thresholds and timeouts are in seconds. The custom relays of the
    DERP map (``derp_map``, a URL or file, else found as :mod:`coordinator.ops.probe.relays` says) are
    measured too.
    """
    if bool(pg_url) == bool(replica_url):
        raise ProbeUsageError("give either a database URL (--pg-url) or a replica URL (--url), not both or neither")
    if threshold <= 0:
        raise ProbeUsageError("the threshold must be positive")
    if samples < 1:
        raise ProbeUsageError("samples must be at least 1")
    started_at = datetime.now(UTC)
    t0 = time.perf_counter()
    conn = None
    try:
        if pg_url:
            conn, target, _ = await connect_db(pg_url, timeout)
            found = await replicas_from_db(conn, target, timeout)
            source = {"mode": "database", "target": target}
        else:
            assert replica_url is not None  # one of the two, checked above
            if relay_base(replica_url) is None:
                raise ProbeUsageError(f"--url {replica_url!r} must be an http:// or https:// URL with a host")
            found = await replicas_from_api(replica_url, token, timeout, insecure)
            source = {"mode": "replica", "target": without_userinfo(replica_url)}
        alive = [r for r in found if r.alive]
        not_alive = [r for r in found if not r.alive]
        assign_short_ids(found)
        relays, map_info = await custom_relays(derp_map, replica_url if not pg_url else None, alive, timeout, insecure)
        database, pubsub, mesh = await measure(alive, conn, pg_url, samples, timeout, insecure, relays)
        if not tailnet_token and conn is not None:
            tailnet_token = await stored_token(conn)
        tailnet: TailnetCheck = await measure_tailnet(alive, tailnet_token, samples, timeout)
    finally:
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()
    return build_report(source=source, threshold=threshold, samples=samples, started_at=started_at,
                        duration=time.perf_counter() - t0, database=database, pubsub=pubsub,
                        replicas=alive, not_alive=not_alive, mesh=mesh, relays=relays, derp_map=map_info,
                        tailnet=(tailnet, tailnet_threshold))
