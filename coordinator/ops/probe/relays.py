"""The custom relays of a deployment's DERP map, for ``coordinator probe`` to measure as derpprobe does.

Where the map comes from, first that applies: ``--derp-map`` (a URL or a file); with ``--url``, that
replica's ``/derpmap/default``; the replicas' own ``COORDINATOR_DERP_CONFIG_URL`` or ``_PATH`` (set in
their pods already); a live replica's ``/derpmap/default`` through its relay URL. Each DERP node of a
region that is not the embedded relay's is then measured from here like a replica: ``GET /derp/probe``
on a kept-alive connection and a DERP ping through it. Only reachability is judged: a custom relay
may well be far away (Tailscale's own relays are), so its latency is reported, not held to the threshold.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from coordinator.ops.probe.model import ProbeUsageError, ReplicaInfo
from coordinator.relay.derpconfig import DerpMapError, fetch, parse_derp_map, relay_nodes
from coordinator.relay.httpclient import http_client

CONFIG_ENV = ("COORDINATOR_DERP_CONFIG_URL", "CODER_DERP_CONFIG_URL", "COORDINATOR_DERP_CONFIG_PATH",
              "CODER_DERP_CONFIG_PATH")
MAP_PATH = "/derpmap/default"


@dataclass
class RelayInfo(ReplicaInfo):
    """One custom relay node, measured like a replica (``relay_url`` is the node's base URL)."""

    region_code: str = ""
    name: str = ""
    insecure: bool = False  # the map's InsecureForTests

    @property
    def label(self) -> str:
        return f"custom relay {self.region_code or self.region_id}/{self.name} ({self.relay_url})"


def map_source(explicit: str | None, replica_url: str | None, replicas: list[ReplicaInfo]) -> tuple[str | None, str]:
    """(URL or path of the DERP map, how it was chosen); (None, why) when there is nowhere to look."""
    if explicit:
        return explicit, "--derp-map"
    if replica_url:
        return replica_url.rstrip("/") + MAP_PATH, "--url"
    for name in CONFIG_ENV:
        if os.environ.get(name):
            return os.environ[name], name
    for r in replicas:
        if r.alive and r.relay_url:
            return r.relay_url.rstrip("/") + MAP_PATH, f"replica {r.short or r.id}"
    return None, ("no DERP map to read custom relays from (no replica has a relay URL): give --derp-map "
                  "URL|PATH, e.g. the access URL's /derpmap/default")


async def read_map(source: str, timeout: float, insecure: bool) -> dict:
    """The DERP map at ``source`` (an http(s) URL or a file), checked; DerpMapError saying why not."""
    where = f"DERP map {source}"
    if not source.startswith(("http://", "https://")):
        try:
            with open(source.removeprefix("file://"), "rb") as file:
                return parse_derp_map(file.read(), where, keep_embedded=True)
        except OSError as exc:
            raise DerpMapError(f"{where}: cannot read: {exc.strerror or exc}") from None
    async with http_client(insecure=insecure, follow_redirects=True) as client:
        data = await fetch(client, source, where, timeout + 1.0)  # bounded in time and size
    return parse_derp_map(data, where, keep_embedded=True)


async def custom_relays(explicit: str | None, replica_url: str | None, replicas: list[ReplicaInfo], timeout: float,
                        insecure: bool) -> tuple[list[RelayInfo], dict]:
    """The custom relays to measure, and the report's ``derp_map`` section (where from, embedded relay or not).

    A map named with ``--derp-map`` that cannot be read is a usage error; one found on its own is a note.
    """
    source, how = map_source(explicit, replica_url, replicas)
    info: dict = {"source": source, "chosen_by": how if source else None, "embedded_relay": None, "error": None}
    if source is None:
        info["error"] = how
        return [], info
    try:
        document = await read_map(source, timeout, insecure)
    except DerpMapError as exc:
        if explicit:
            raise ProbeUsageError(f"--derp-map: {exc}") from None
        info["error"] = str(exc)
        return [], info
    # Known from a deployment's own map: it marks the embedded region (or has none when the relay is off).
    embedded = any(r.get("EmbeddedRelay") for r in document["Regions"].values())
    info["embedded_relay"] = True if embedded else (False if source.endswith(MAP_PATH) else None)
    relays = [RelayInfo(id=f"{n.region_id}/{n.name}", hostname=n.host_name, region_id=n.region_id,
                        relay_url=n.base_url, region_code=n.region_code, name=n.name, insecure=n.insecure,
                        short=n.name) for n in relay_nodes(document)]
    return relays, info
