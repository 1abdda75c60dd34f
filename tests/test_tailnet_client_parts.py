"""The tailnet client's pure parts: the backoff's bounds, the bounded update stream, the peers view, URLs."""

from __future__ import annotations

import uuid

import pytest

from coordinator.cluster.tailnet.backoff import Backoff
from coordinator.cluster.tailnet.client import TailnetClient, coordinate_url
from coordinator.cluster.tailnet.subscription import PeerUpdates
from coordinator.cluster.tailnet.view import PeerUpdate, TailnetRefused, apply

pytestmark = pytest.mark.anyio
A, B, C = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()


def test_backoff_grows_with_jitter_and_stays_bounded():
    b = Backoff(0.1, 2.0)
    delays = [b.next() for _ in range(40)]
    assert 0.05 <= delays[0] <= 0.1
    assert 0.1 <= delays[1] <= 0.2
    assert all(1.0 <= d <= 2.0 for d in delays[6:]), "capped at the maximum, never below half of it"
    assert len({round(d, 6) for d in delays[6:]}) > 20, "jittered: a fleet does not redial in step"
    b.reset()
    assert b.next() <= 0.1
    assert all(0 <= b.soon() <= 0.1 for _ in range(20))
    with pytest.raises(ValueError):
        Backoff(0, 1)


def test_coordinate_url_from_access_urls():
    pid = uuid.UUID(int=7)
    want = f"ws://lb:8080/api/v2/tailnet/coordinate?peer_id={pid}"
    assert coordinate_url("http://lb:8080", pid) == want
    assert coordinate_url("http://lb:8080/", pid) == want
    assert coordinate_url("ws://lb:8080/api/v2/tailnet/coordinate", pid) == want
    assert coordinate_url("https://coder.example.com", pid).startswith("wss://coder.example.com/api/v2/")
    for bad in ("lb:8080", "ftp://lb", "http://"):
        with pytest.raises(ValueError, match="http"):
            coordinate_url(bad, pid)


def _update(peer: uuid.UUID, kind: str, seq: int = 0) -> PeerUpdate:
    return PeerUpdate(peer, kind, {"seq": seq} if kind == "node" else None, float(seq), 1)


def test_view_keeps_a_lost_peers_node_and_drops_a_disconnected_ones():
    s = apply(None, _update(A, "node", 1))
    assert s is not None and (s.kind, s.node) == ("node", {"seq": 1})
    s = apply(s, _update(A, "ready_for_handshake", 2))
    assert s is not None and (s.kind, s.node, s.ready_for_handshake) == ("node", {"seq": 1}, 2.0)
    s = apply(s, _update(A, "lost", 3))
    assert s is not None and (s.kind, s.node) == ("lost", {"seq": 1})
    s = apply(s, _update(A, "disconnected", 4))
    assert s is not None and (s.kind, s.node) == ("disconnected", None)
    assert apply(None, _update(B, "ready_for_handshake")) is None, "no view entry without a node first"


async def test_update_stream_is_bounded_and_keeps_the_newest_per_peer():
    closed = []
    sub = PeerUpdates(4, closed.append)
    for seq in range(10):
        sub.put(_update(A if seq % 2 else B, "node", seq))
    sub.put(_update(C, "lost", 10))
    got = []
    sub.end()
    async for u in sub:
        got.append((u.peer, u.kind, u.node))
    assert len(got) <= 5 and sub.coalesced >= 6
    assert (B, "node", {"seq": 8}) in got and (A, "node", {"seq": 9}) in got and (C, "lost", None) in got
    assert got[-1][0] == C, "order is that of each peer's newest update"
    assert closed == [sub]


async def test_update_stream_raises_the_refusal():
    sub = PeerUpdates(8, lambda _: None)
    sub.put(_update(A, "node", 1))
    sub.end("closed by the coordinator (1008: invalid tailnet token)")
    it = aiter(sub)
    assert (await anext(it)).peer == A
    with pytest.raises(TailnetRefused, match="invalid tailnet token"):
        await anext(it)


async def test_client_refuses_bad_input_before_sending():
    client = TailnetClient("http://127.0.0.1:9", A, "t")
    with pytest.raises(ValueError, match="8192"):
        await client.update({"pad": "x" * 9000})
    with pytest.raises(ValueError, match="itself"):
        await client.add_tunnel(A)
    with pytest.raises(ValueError, match="UUID"):
        await client.add_tunnel(str(B))  # type: ignore[arg-type]
    assert client.node is None and not client.tunnels
    await client.close()


def test_backoff_after_try_again_later_spreads_over_a_wider_window():
    b = Backoff(0.1, 5.0)
    first = [Backoff(0.1, 5.0).later() for _ in range(200)]
    assert all(0 <= d <= 1.0 for d in first) and max(first) > 0.5, "the first window is at least 1 s"
    assert sum(d < 0.1 for d in first) < 60, "not most of the fleet within the first 100 ms"
    delays = [b.later() for _ in range(10)]
    assert all(d <= 5.0 for d in delays) and max(delays[6:]) > 1.0
