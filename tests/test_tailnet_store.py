"""The peer coordinator's parts against a real PostgreSQL, without replicas: the mapping rules
(Coder's bestMappings), heartbeats judged on the database clock, and the 24-hour cleanup."""

from __future__ import annotations

import uuid

import anyio
import pytest

from coordinator.cluster.db import Database
from coordinator.cluster.tailnet.heartbeats import MISSED_BEATS, Heartbeats
from coordinator.cluster.tailnet.mapper import Mapper, Outgoing, QueueFull, SendQueue, best_mappings
from coordinator.cluster.tailnet.messages import encode_peer_update
from coordinator.cluster.tailnet.store import Binding, TailnetStore

pytestmark = pytest.mark.anyio

P = uuid.uuid4()
LIVE, DEAD = uuid.uuid4(), uuid.uuid4()


def alive(c: uuid.UUID) -> bool:
    return c == LIVE


def test_node_beats_lost_and_newest_node_wins():
    old_node = Binding(P, LIVE, 100.0, '{"n": 1}', lost=False)
    newer_lost = Binding(P, uuid.uuid4(), 200.0, '{"n": 0}', lost=True)
    assert best_mappings([newer_lost, old_node], alive)[P].kind == "node"
    newer_node = Binding(P, LIVE, 300.0, '{"n": 2}', lost=False)
    assert best_mappings([old_node, newer_node], alive)[P].node == '{"n": 2}'
    # a row of a coordinator that missed its beats counts as lost, whatever its status says
    dead_newest = Binding(P, DEAD, 400.0, '{"n": 3}', lost=False)
    best = best_mappings([old_node, dead_newest], alive)[P]
    assert (best.kind, best.node) == ("node", '{"n": 1}')
    assert best_mappings([dead_newest], alive)[P].kind == "lost"


def test_mapper_sends_changes_only():
    m = Mapper()
    m.apply_full([Binding(P, LIVE, 1.0, '{"n": 1}', lost=False)], stamp=1)
    first = m.update(alive)
    assert [(o.kind, o.frame) for o in first] == [("node", encode_peer_update(P, "node", '{"n": 1}'))]
    assert m.update(alive) == []  # nothing changed
    m.apply_peer(P, [Binding(P, LIVE, 2.0, '{"n": 1}', lost=True)], stamp=2)
    assert [o.kind for o in m.update(alive)] == ["lost"]
    assert m.update(alive) == []  # still lost: said once
    m.apply_full([], stamp=3)
    assert [o.kind for o in m.update(alive)] == ["disconnected"]
    # never told of it: a lost row says nothing
    fresh = Mapper()
    fresh.apply_full([Binding(P, LIVE, 1.0, "{}", lost=True)], stamp=1)
    assert fresh.update(alive) == []


def test_mapper_ignores_results_older_than_what_it_applied():
    """A slow full query must not overwrite a newer partial one (or the other way round)."""
    other = uuid.uuid4()
    m = Mapper()
    m.apply_peer(P, [Binding(P, LIVE, 5.0, '{"n": 5}', lost=False)], stamp=7)
    m.apply_full([Binding(P, LIVE, 1.0, '{"n": 1}', lost=False), Binding(other, LIVE, 1.0, "{}", lost=False)], stamp=6)
    assert m.rows[P][0].node == '{"n": 5}' and other in m.rows  # P kept its newer node; other arrived
    m.apply_peer(P, [], stamp=5)  # an old "gone" answer
    assert P in m.rows
    m.apply_full([], stamp=8)
    assert m.rows == {}
    m.apply_peer(P, [Binding(P, LIVE, 9.0, "{}", lost=False)], stamp=8)  # not newer than the full result
    assert m.rows == {}


def test_send_queue_coalesces_and_is_bounded():
    q = SendQueue(size=2)
    a, b, c = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    for n in range(100):
        q.put(Outgoing(a, "node", f"a{n}"))
    q.put(Outgoing(a, "ready_for_handshake", "a-rfh"))  # not folded into a's node
    assert len(q) == 2 and q.coalesced == 99
    with pytest.raises(QueueFull):
        q.put(Outgoing(b, "node", "b"))
    assert [q.pop().frame, q.pop().frame, q.pop()] == ["a99", "a-rfh", None]
    q.put(Outgoing(c, "lost", "c"))
    assert q.pop().frame == "c"


@pytest.fixture
async def db(pg_url):
    database = await Database.open(pg_url, wait=10)
    try:
        yield database
    finally:
        await database.close()


@pytest.fixture
async def store(db):
    s = TailnetStore(db)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def _age(db: Database, table: str, column: str, where: str, params: tuple, hours: int = 25) -> None:
    async with db.connection() as conn:
        await conn.execute(f"UPDATE {table} SET {column} = now() - interval '{hours} hours' WHERE {where}", params)


async def test_heartbeats_cleanup(db, store):
    """Rows are kept 24 h: dead coordinators, lost peers and orphaned tunnels older than that go."""
    dead, live = uuid.uuid4(), uuid.uuid4()
    gone_peer, lost_peer, ok_peer, other = (uuid.uuid4() for _ in range(4))
    for c in (dead, live):
        await store.beat(c, 1.0, 5.0)
    await store.upsert_peer(lost_peer, live, '{"k": 1}')
    await store.mark_peer_lost(lost_peer, live)
    await store.upsert_peer(ok_peer, live, '{"k": 2}')
    await store.add_tunnel(live, gone_peer, other)   # its source has no row: orphaned
    await store.add_tunnel(live, ok_peer, other)     # its source is there: kept
    await store.upsert_peer(other, dead, '{"k": 3}')
    await _age(db, "tailnet_coordinators", "heartbeat_at", "id = %s", (dead,))
    await _age(db, "tailnet_peers", "updated_at", "true", ())
    await _age(db, "tailnet_tunnels", "updated_at", "true", ())
    assert await store.cleanup() == (1, 1, 1)
    async with db.connection() as conn:
        peers = {r[0] for r in await (await conn.execute("SELECT id FROM tailnet_peers")).fetchall()}
        tunnels = {r[0] for r in await (await conn.execute("SELECT src_id FROM tailnet_tunnels")).fetchall()}
    assert peers == {ok_peer}  # the lost one aged out; the dead coordinator's went with it (cascade)
    assert tunnels == {ok_peer}
    assert await store.cleanup() == (0, 0, 0)  # idempotent


async def test_lost_coordinator_mark_lost_and_bindings(db, store):
    c1, c2 = uuid.uuid4(), uuid.uuid4()
    a, b = uuid.uuid4(), uuid.uuid4()
    for c in (c1, c2):
        await store.beat(c, 1.0, 5.0)
    await store.upsert_peer(a, c1, '{"a": 1}')
    await store.upsert_peer(b, c2, '{"b": 1}')
    await store.add_tunnel(c1, a, b)
    assert {x.peer for x in await store.bindings(a)} == {b}
    assert {x.peer for x in await store.bindings(b)} == {a}  # a tunnel works both ways
    nobody = uuid.uuid4()
    changes = await store.peer_changes([a, b, nobody])  # one query for a batch of changed peers
    assert changes[a][0] == {b} and [x.node for x in changes[a][1]] == ['{"a": 1}']
    assert changes[b][0] == {a} and [x.coordinator for x in changes[b][1]] == [c2]
    assert changes[nobody] == (set(), [])
    assert await store.mark_coordinator_lost(c1) == 1
    (binding,) = await store.bindings(b)
    assert binding.lost and binding.node == '{"a": 1}'  # kept, not deleted
    await store.delete_peer(a, c1)
    assert await store.bindings(b) == [] and await store.tunnel_peers(b) == set()


async def test_heartbeats_missed_beats_judged_on_the_database_clock(db, store):
    """A coordinator whose row stops beating is dead after 3 of its own intervals; ours stays alive."""
    other = uuid.uuid4()
    changes: list[frozenset] = []
    beats = Heartbeats(store, uuid.uuid4(), 0.2, on_change=lambda: changes.append(beats.live()),
                       on_unhealthy=lambda _: None, on_recover=_nothing)
    await store.beat(other, 0.2, 5.0)
    await beats.beat()
    assert beats.alive(other) and beats.alive(beats.id) and beats.healthy
    # 3 beats of 0.2 s were missed long ago on the database clock: dead on the next beat read
    async with db.connection() as conn:
        await conn.execute("UPDATE tailnet_coordinators SET heartbeat_at = now() - interval '1 second' WHERE id = %s",
                           (other,))
    await beats.beat()
    assert not beats.alive(other)
    assert changes and other not in changes[-1]
    assert MISSED_BEATS == 3


async def _nothing() -> None:
    return None


class _FailingStore(TailnetStore):
    def __init__(self, db: Database, results: list[bool]):
        super().__init__(db)
        self.results = results

    async def beat(self, coordinator, heartbeat, timeout):
        if not self.results.pop(0):
            raise OSError("connection refused")
        return await super().beat(coordinator, heartbeat, timeout)


async def test_pgcoordinator_unhealthy_after_three_failed_beats(db):
    """One success, 3 failures: unhealthy (peers closed once); the next success recovers it."""
    store = _FailingStore(db, [True, False, False, False, True])
    await store.open()
    events: list[str] = []

    async def recover() -> None:
        events.append("recover")

    beats = Heartbeats(store, uuid.uuid4(), 0.1, on_change=lambda: None,
                       on_unhealthy=lambda why: events.append(f"unhealthy: {why}"), on_recover=recover)
    for _ in range(3):
        await beats.beat()
    assert beats.healthy and events == []  # two failures are not enough
    await beats.beat()
    assert not beats.healthy and events == ["unhealthy: connection refused"]
    await beats.beat()
    assert beats.healthy and events[-1] == "recover" and beats.failures == 0
    with anyio.fail_after(1):
        await beats.first_beat.wait()
    await store.close()


async def test_binder_batches_concurrent_node_writes(db, store):
    """Many peers updating at once: their nodes land in fewer statements than writes, each one written."""
    from coordinator.cluster.tailnet.binder import Binder

    coordinator = uuid.uuid4()
    await store.beat(coordinator, 1.0, 5.0)
    binder = Binder(store, coordinator)
    peers = [uuid.uuid4() for _ in range(200)]
    async with anyio.create_task_group() as tg:
        tg.start_soon(binder.run)
        async with anyio.create_task_group() as writers:
            for i, p in enumerate(peers):
                writers.start_soon(binder.upsert, p, f'{{"seq": {i}}}')
        tg.cancel_scope.cancel()
    print(f"\n200 concurrent node writes in {binder.batches} statements")
    assert binder.written == 200 and binder.batches < 200
    async with db.connection() as conn:
        rows = await (await conn.execute("SELECT id, node->>'seq' FROM tailnet_peers WHERE coordinator_id = %s",
                                          (coordinator,))).fetchall()
    assert {r[0]: int(r[1]) for r in rows} == {p: i for i, p in enumerate(peers)}


async def test_binder_lost_marks_are_batched_and_a_newer_node_wins(db, store):
    from coordinator.cluster.tailnet.binder import Binder

    coordinator = uuid.uuid4()
    await store.beat(coordinator, 1.0, 5.0)
    binder = Binder(store, coordinator)
    gone = [uuid.uuid4() for _ in range(100)]
    back = uuid.uuid4()

    async def status(peer: uuid.UUID) -> str:
        async with db.connection() as conn:
            row = await (await conn.execute("SELECT status FROM tailnet_peers WHERE id = %s", (peer,))).fetchone()
        return row[0]

    async with anyio.create_task_group() as tg:
        tg.start_soon(binder.run)
        for p in [*gone, back]:
            await binder.upsert(p, "{}")
        for p in [*gone, back]:
            binder.mark_lost(p)
        await binder.upsert(back, '{"again": true}')  # reconnected before the mark was written
        with anyio.fail_after(10):
            while binder.marked_lost < len(gone):
                await anyio.sleep(0.02)
        tg.cancel_scope.cancel()
    assert [await status(p) for p in gone] == ["lost"] * len(gone)
    assert await status(back) == "ok"
