"""A live peer that answers with this replica's own DERP server key: the health finding EDERP03.

Two replicas started on one data directory share its server key. Each then takes the other's relay
for its own (the mesh does not link to itself), so they never mesh and clients of one cannot reach
clients of the other, while both report healthy. The mesh marks such links ``is_self``; a self link
to any URL but this replica's own relay URL is one of these.
"""

from __future__ import annotations

import logging

from coordinator.cluster.mesh import Mesh
from coordinator.core.health import Finding
from coordinator.core.keys import short
from coordinator.core.urls import derp_url

log = logging.getLogger("coordinator.dupkey")

CODE = "EDERP03"


class DuplicateKeyCheck:
    """Finds peers sharing this replica's server key; logs each once, with what to do about it."""

    def __init__(self, own_relay_url: str, key_file: str):
        self.own = derp_url(own_relay_url) if own_relay_url else None
        self.key_file = key_file
        self._logged: set[str] = set()

    def check(self, mesh: Mesh | None) -> list[Finding]:
        if mesh is None:
            return []
        urls = sorted(url for url, link in mesh.links.items() if link.is_self and url != self.own)
        key = short(mesh.relay.public_key)
        for url in urls:
            if url not in self._logged:
                log.error(
                    "the live replica at %s has this replica's DERP server key %s, so the two never mesh and their "
                    "clients cannot reach each other: every replica needs its own data directory (the key is %s); "
                    "start one of them with another --data-dir (COORDINATOR_DATA_DIR), or, if that replica's "
                    "relay URL wrongly points here, fix its COORDINATOR_DERP_SERVER_RELAY_URL",
                    url, key, self.key_file, extra={"peer": url, "code": CODE},
                )
        self._logged = set(urls)  # a peer that comes back with the same key is logged again
        return [
            Finding(CODE, "error", f"duplicate server key: the replica at {url} has this replica's DERP server key {key} "
                                   f"(two replicas on one data directory); give each its own --data-dir")
            for url in urls
        ]
