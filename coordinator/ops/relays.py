"""The DERP map and its custom relays as the operator sees them: one JSON view for the API and the status page."""

from __future__ import annotations

from coordinator.cluster.controlplane import ControlPlane
from coordinator.core.timestamps import iso_utc


def _iso(epoch: float | None) -> str | None:
    return iso_utc(epoch) if epoch else None


def derp_view(control: ControlPlane) -> dict:
    """Whether the embedded relay runs, where the custom map comes from and how its last fetch went, the
    regions served, and every custom relay's last check (``up``, ``latency_ms``)."""
    maps, checks = control.derp_maps, control.relay_checks
    if maps is None:
        return {"embedded_relay": control.settings.derp_server_enable, "source": None, "regions": [], "relays": []}
    regions = (maps.document or {}).get("Regions", {})
    relays = checks.snapshot() if checks is not None else []
    for relay in relays:
        relay["checked_at"] = _iso(relay["checked_at"])
    return {
        "embedded_relay": maps.embedded,
        "source": maps.source or None,
        "fetched_at": _iso(maps.fetched_at),
        "fetch_error": maps.fetch_error,
        "fetch_failures": maps.failures,
        "etag": maps.published.etag or None,
        "missing": maps.published.missing or None,
        "regions": [{"region_id": r.get("RegionID"), "region_code": r.get("RegionCode"), "region_name": r.get("RegionName"),
                     "embedded": bool(r.get("EmbeddedRelay")), "nodes": len(r.get("Nodes", []))}
                    for r in regions.values()],
        "relays": relays,
    }
