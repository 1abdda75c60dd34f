"""The deployment's DERP map: one region whose node is the access URL, as ``tailcfg.DERPMap`` JSON.

Tailscale clients and control servers learn relays from this document (headscale's ``derp.urls``,
derpprobe's ``-derp-map``, tailscaled's region clients). Field names, their order and the
``omitempty`` rules follow Tailscale's ``tailcfg.DERPMap`` / ``DERPRegion`` / ``DERPNode``, so the
JSON is what Go's ``encoding/json`` would print for the same values. Served at ``/derpmap/default``
and printed by ``coordinator derpmap``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from coordinator.core.errors import ConfigError
from coordinator.core.settings import Settings
from coordinator.core.urls import endpoint

# Field order of tailcfg.DERPNode; False means `json:",omitempty"` (zero values are left out).
_NODE_FIELDS = (
    ("Name", True), ("RegionID", True), ("HostName", True), ("CertName", False), ("IPv4", False),
    ("IPv6", False), ("STUNPort", False), ("STUNOnly", False), ("DERPPort", False), ("InsecureForTests", False),
    ("ForceHTTP", False),  # Coder's fork of tailcfg only; upstream clients ignore unknown fields
    ("STUNTestIP", False), ("CanPort80", False),
)
_REGION_FIELDS = (
    ("RegionID", True), ("RegionCode", True), ("RegionName", True), ("Latitude", False), ("Longitude", False),
    ("Avoid", False), ("Nodes", True),
)


def _ordered(values: dict, spec) -> dict:
    return {name: values.get(name) for name, always in spec if always or values.get(name)}


def derp_node(access_url: str, region_id: int) -> dict:
    """The ``DERPNode`` that dials ``access_url``: its host and port, no STUN, plain HTTP marked."""
    try:
        where = endpoint(access_url)
    except ValueError:
        raise ConfigError(f"COORDINATOR_ACCESS_URL: {access_url!r} must be an http:// or https:// URL with a valid port") from None
    if where.path not in ("", "/"):
        raise ConfigError(f"COORDINATOR_ACCESS_URL: {access_url!r} has a path; a DERP map node is a host and port "
                          "(clients always dial /derp at its root)")
    port, plain = where.port, not where.tls
    return _ordered({
        "Name": f"{region_id}a",
        "RegionID": region_id,
        "HostName": where.host,
        "STUNPort": -1,  # the replicas serve no STUN
        # Always explicit: zero means 443 to every client, even for a plain-HTTP node.
        "DERPPort": port,
        "ForceHTTP": plain,
        "CanPort80": plain and port == 80,  # captive-portal checks fetch http://HostName/generate_204
    }, _NODE_FIELDS)


def derp_map(settings: Settings) -> dict:
    """The ``tailcfg.DERPMap`` of this deployment; raises ConfigError without an access URL."""
    if not settings.access_url:
        raise ConfigError("the DERP map needs COORDINATOR_ACCESS_URL (--access-url): its node is the access URL")
    region = _ordered({
        "RegionID": settings.region_id,
        "RegionCode": settings.region_code,
        "RegionName": settings.region_name,
        "Nodes": [derp_node(settings.access_url, settings.region_id)],
    }, _REGION_FIELDS)
    return {"Regions": {str(settings.region_id): region}}


def render(document: dict) -> bytes:
    """Compact JSON, like Go's ``json.Marshal`` (no spaces)."""
    return json.dumps(document, separators=(",", ":")).encode()


@dataclass(frozen=True)
class PublishedMap:
    """What ``/derpmap/default`` serves: the rendered map and its ETag, or why there is none."""

    body: bytes = b""
    etag: str = ""
    missing: str = ""

    @classmethod
    def from_settings(cls, settings: Settings) -> PublishedMap:
        try:
            body = render(derp_map(settings))
        except ConfigError as exc:
            return cls(missing=str(exc))
        return cls(body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
