"""The demo's second act: two overlay peers on different replicas find each other, then talk over DERP.

Each peer has a DERP key of its own and a home region (the deployment's region, from the DERP
map). Peer A connects to the coordinator on one replica, peer B on another; A opens a tunnel to
B. Each learns the other's node (key and home region) from the coordinator, which carries it
across replicas through PostgreSQL. Then each dials the relay of its own replica with its key and
they exchange packets addressed to the keys they learned: the mesh carries them between replicas.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from coordinator.cluster.tailnet.client import TailnetClient
from coordinator.core.keys import NodeKey, parse_hex_key
from coordinator.relay.client import DerpClient, DerpError
from coordinator.relay.httpclient import blocking_http_client

LEARN_TIMEOUT = 15.0
PACKET_TIMEOUT = 15.0


def home_region(url: str) -> int:
    """The region of the deployment's DERP map (``/derpmap/default`` of ``url``): the peers' home."""
    with blocking_http_client(5.0) as client:
        regions = client.get(url + "/derpmap/default").raise_for_status().json()["Regions"]
    return int(next(iter(regions)))


def _node(key: NodeKey, region: int) -> dict[str, Any]:
    # What a Tailscale node would say about itself, reduced to what DERP needs: the key and home region.
    return {"key": key.public_text, "preferred_derp": region, "endpoints": [], "addresses": []}


def _learned_key(node: dict[str, Any]) -> bytes:
    return parse_hex_key(str(node["key"]), "nodekey")


async def _exchange(a: DerpClient, b: DerpClient, b_key: bytes, a_key: bytes) -> float:
    """A -> B (to the key A learned), then B -> A (likewise); the seconds until both arrived.

    The first packets may go before the mesh has learned where the other client is: resent until one lands.
    """
    start = time.perf_counter()
    deadline = time.monotonic() + PACKET_TIMEOUT
    for src, dst, dst_key, text in ((a, b, b_key, b"hello B, from A"), (b, a, a_key, b"hello A, from B")):
        while True:
            await src.send(dst_key, text)
            try:
                packet = await dst.recv_packet(timeout=0.1)
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise DerpError(f"no packet crossed within {PACKET_TIMEOUT:g} s") from None
                continue
            if packet.src != src.public_key or packet.data != text:
                raise DerpError("a packet arrived from the wrong key or with the wrong payload")
            break
    return time.perf_counter() - start


async def peers_find_each_other(url_a: str, url_b: str, token: str, labels: tuple[str, str]) -> None:
    """Peer A on ``url_a``'s coordinator, peer B on ``url_b``'s: learn each other's node, then exchange packets."""
    region = home_region(url_a)
    keys = NodeKey.generate(), NodeKey.generate()
    ids = uuid.uuid4(), uuid.uuid4()
    async with (TailnetClient(url_a, ids[0], token, node=_node(keys[0], region)) as a,
                TailnetClient(url_b, ids[1], token, node=_node(keys[1], region)) as b):
        start = time.perf_counter()
        await a.add_tunnel(ids[1])
        node_b = await a.wait_for_node(ids[1], LEARN_TIMEOUT)
        node_a = await b.wait_for_node(ids[0], LEARN_TIMEOUT)
        learned = (time.perf_counter() - start) * 1000
        for who, where, node, other in (("A", labels[0], node_b, "B"), ("B", labels[1], node_a, "A")):
            print(f"  peer {who} (on {where}) learned peer {other}'s node: key {str(node['key'])[:24]}…, "
                  f"home region {node['preferred_derp']}")
        print(f"  both nodes known {learned:.0f} ms after the tunnel was opened (through PostgreSQL)")
        derp_a = await DerpClient.connect(url_a + "/derp", keys[0])
        try:
            derp_b = await DerpClient.connect(url_b + "/derp", keys[1])
            try:
                took = await _exchange(derp_a, derp_b, _learned_key(node_b), _learned_key(node_a))
            finally:
                await derp_b.close()
        finally:
            await derp_a.close()
        print(f"  packets exchanged over DERP with the learned keys: A -> B and B -> A "
              f"({took * 1000:.0f} ms incl. mesh warm-up)")
