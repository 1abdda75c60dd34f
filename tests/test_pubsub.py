"""coordinator.cluster.pubsub against a real Postgres: delivery, ordering, overflow, outages, races, limits."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import uuid

import anyio
import psycopg
import pytest
from prometheus_client import generate_latest

from coordinator.cluster.pubsub import (
    QUEUE_SIZE,
    DroppedMessages,
    InvalidChannel,
    InvalidPayload,
    NotConnected,
    PayloadTooLarge,
    PublishError,
    PubSub,
    PubSubError,
    QueueFull,
)
from testkit.pgcluster import free_port
from testkit.polling import wait_for

pytestmark = pytest.mark.anyio

# Short timers so failures are detected and healed within a test's budget.
FAST = dict(
    ping_interval=0.3,
    ping_timeout=1.0,
    reconnect_min=0.05,
    reconnect_max=0.5,
    publish_timeout=3.0,
    connect_timeout=2.0,
)


async def query(url: str, sql: str, params: tuple = ()) -> list[tuple]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(sql, params)
        return await cur.fetchall() if cur.description else []


async def listener_pids(url: str, ps: PubSub) -> set[int]:
    """Backends of ``ps``'s listener connection, found by the application_name it sets."""
    sql = "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
    return {row[0] for row in await query(url, sql, (ps.application_name,))}


async def listener_pid(url: str, ps: PubSub, *, not_pid: int | None = None) -> int:
    """The one listener backend (other than ``not_pid``, which may take a moment to exit)."""
    seen: set[int] = set()

    async def one() -> bool:
        seen.clear()
        seen.update(await listener_pids(url, ps))
        return len(seen) == 1 and not_pid not in seen

    await wait_for(one, 10, lambda: f"one listener backend other than {not_pid}, found {seen}", 0.05)
    return seen.pop()


async def publish_until_ok(ps: PubSub, channel: str, payload: str, timeout: float = 20.0) -> None:
    async def sent() -> bool:
        await ps.publish(channel, payload)
        return True

    await wait_for(sent, timeout, f"a publish on {channel!r} to go through", 0.1, ignore=(PublishError,))


@pytest.fixture
async def ps(pg_url):
    async with PubSub(pg_url, **FAST) as ps:
        yield ps



async def test_round_trip_sync_and_async_handlers(ps):
    sync_got, async_got, other = [], [], []

    async def async_handler(payload: bytes) -> None:
        await anyio.sleep(0)
        async_got.append(payload)

    await ps.subscribe("greetings", sync_got.append)
    await ps.subscribe("greetings", async_handler)
    await ps.subscribe("other", other.append)
    await ps.publish("greetings", b"hello")
    await ps.publish("greetings", "w\u00f6rld")
    await wait_for(lambda: len(sync_got) == 2 and len(async_got) == 2, 10, "both handlers")
    assert sync_got == async_got == [b"hello", "w\u00f6rld".encode()]
    assert other == []
    assert ps.connected


async def test_fifo_under_slow_handlers(ps):
    slow, fast = [], []

    async def slow_handler(payload: bytes) -> None:
        await anyio.sleep(random.uniform(0, 0.005))
        slow.append(int(payload))

    await ps.subscribe("ordered", slow_handler)
    await ps.subscribe("ordered", lambda p: fast.append(int(p)))
    for i in range(100):
        await ps.publish("ordered", str(i))
    await wait_for(lambda: len(slow) == 100, 10, "slow subscriber")
    assert slow == fast == list(range(100))


async def test_full_queue_delivers_2048_then_dropped_then_later(ps):
    release = anyio.Event()
    slow: list = []
    fast: list = []

    async def blocked(payload: bytes | None, err: Exception | None) -> None:
        slow.append(err or payload)
        await release.wait()

    await ps.subscribe_with_err("flood", blocked)
    await ps.subscribe("flood", fast.append)
    total = QUEUE_SIZE + 52
    async with ps.batcher() as bp:
        for i in range(total):
            await bp.publish("flood", f"m-{i}")
    # The blocked subscriber stalls neither the listener nor its sibling.
    await wait_for(lambda: len(fast) == total, 10, "the fast subscriber")
    await wait_for(lambda: ps.metrics["dropped_messages"] == total - QUEUE_SIZE, 10, "drops to be counted")
    release.set()
    await ps.publish("flood", "later")
    await wait_for(lambda: slow and slow[-1] == b"later", 10, "the later message")
    assert slow[:QUEUE_SIZE] == [f"m-{i}".encode() for i in range(QUEUE_SIZE)]
    assert isinstance(slow[QUEUE_SIZE], DroppedMessages)
    assert slow[QUEUE_SIZE].count == total - QUEUE_SIZE
    assert slow[QUEUE_SIZE + 1 :] == [b"later"]


async def test_handler_errors_do_not_stop_delivery(ps):
    got = []

    def flaky(payload: bytes) -> None:
        got.append(payload)
        if payload == b"boom":
            raise RuntimeError("handler bug")

    await ps.subscribe("flaky", flaky)
    await ps.publish("flaky", "boom")
    await ps.publish("flaky", "fine")
    await wait_for(lambda: len(got) == 2, 10, "delivery after a raising handler")


async def test_cancel_unlistens_last_subscriber_only(ps):
    a, b = [], []
    cancel_a = await ps.subscribe("shared", a.append)
    cancel_b = await ps.subscribe("shared", b.append)
    assert "shared" in await ps.listening_channels()
    await cancel_a()
    await cancel_a()  # idempotent
    assert "shared" in await ps.listening_channels()
    await ps.publish("shared", "x")
    await wait_for(lambda: b == [b"x"], 10, "the remaining subscriber")
    await cancel_b()
    assert await ps.listening_channels() == set()
    assert a == []
    assert ps.latency_channel in await ps.listening_channels(include_internal=True)


async def test_cancel_from_inside_the_handler(ps):
    got = []
    cancel = None

    async def once(payload: bytes) -> None:
        got.append(payload)
        await cancel()  # must not deadlock against the listener or this subscriber's own task

    cancel = await ps.subscribe("once", once)
    for i in range(5):
        await ps.publish("once", str(i))
    await wait_for(lambda: ps.metrics["channels"] == 0, 10, "the cancel")
    assert got == [b"0"]
    assert await ps.listening_channels() == set()


async def test_500_channels_subscribe_and_cancel_concurrently(ps):
    channels = [f"race-{i}" for i in range(500)]
    old_got: list[bytes] = []
    new_got: dict[str, list[bytes]] = {c: [] for c in channels}
    noise: list[bytes] = []
    await ps.subscribe("noise", noise.append)
    stop = anyio.Event()

    async def keep_notifying() -> None:  # subscribe/cancel must not deadlock while messages flow
        i = 0
        while not stop.is_set():
            await ps.publish("noise", str(i))
            i += 1

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(keep_notifying)
            old = await asyncio.gather(*(ps.subscribe(c, old_got.append) for c in channels))
            new_cancels: dict[str, object] = {}

            async def resubscribe(c: str) -> None:
                new_cancels[c] = await ps.subscribe(c, new_got[c].append)

            # For every channel, cancel the old subscriber and subscribe a new one at the same time.
            ops = [cancel for cancel in old] + [lambda c=c: resubscribe(c) for c in channels]
            random.shuffle(ops)
            await asyncio.gather(*(op() for op in ops))
            assert set(channels) <= await ps.listening_channels()

            # Churn on a subset: each ends with exactly one live subscriber.
            churn = channels[:50]

            async def churn_one(c: str) -> None:
                for _ in range(3):
                    cancel = await ps.subscribe(c, lambda p: None)
                    await cancel()

            await asyncio.gather(*(churn_one(c) for c in churn))
            assert set(channels) <= await ps.listening_channels()

            async with ps.batcher() as bp:
                for c in channels:
                    await bp.publish(c, c)
            await wait_for(lambda: all(len(v) == 1 for v in new_got.values()), 20, "one message per channel")
            assert all(v == [c.encode()] for c, v in new_got.items())
            assert old_got == []

            await asyncio.gather(*(cancel() for cancel in new_cancels.values()))
            assert await ps.listening_channels() == {"noise"}
            stop.set()
    assert len(noise) > 0


async def test_payload_and_channel_limits(ps):
    got = []
    await ps.subscribe("limits", got.append)
    with pytest.raises(PayloadTooLarge, match="8000 bytes"):
        await ps.publish("limits", "x" * 8000)
    with pytest.raises(PayloadTooLarge, match="8000 bytes"):
        await ps.publish("limits", "\u00e9" * 4000)  # 4000 characters, 8000 bytes
    with pytest.raises(PayloadTooLarge):
        await ps.batcher().publish("limits", b"x" * 9000)
    with pytest.raises(InvalidPayload):
        await ps.publish("limits", b"\xff\xfe")
    with pytest.raises(InvalidPayload):
        await ps.publish("limits", "nul\x00inside")
    for bad in ("", "c" * 64, "\u00e9" * 32):
        with pytest.raises(InvalidChannel):
            await ps.publish(bad, "x")
        with pytest.raises(InvalidChannel):
            await ps.subscribe(bad, got.append)
    with pytest.raises(InvalidChannel):
        await ps.subscribe(ps.latency_channel, got.append)
    assert issubclass(PayloadTooLarge, PubSubError) and issubclass(InvalidChannel, PubSubError)

    longest = "c" * 63
    await ps.subscribe(longest, got.append)
    await ps.publish(longest, "short")
    await ps.publish("limits", "y" * 7999)
    await wait_for(lambda: len(got) == 2, 10, "the largest allowed payload")
    assert sorted(got, key=len) == [b"short", b"y" * 7999]
    assert ps.metrics["publish_errors"] == 7  # the batcher.publish rejection is not a PubSub.publish
    assert ps.metrics["subscribe_errors"] == 4


async def test_malformed_payload_from_database_does_not_crash_listener(pg_cluster):
    # In a SQL_ASCII database NOTIFY carries arbitrary bytes that are not valid UTF-8.
    name = "t_ascii_" + uuid.uuid4().hex[:8]
    await query(
        pg_cluster.url,
        f"CREATE DATABASE {name} ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
    )
    url = f"postgresql://postgres@127.0.0.1:{pg_cluster.port}/{name}"
    try:
        async with PubSub(url, **FAST) as ps:
            got = []
            await ps.subscribe_with_err("raw", lambda p, e: got.append(e or p))
            await query(url, "SELECT pg_notify('raw', E'\\xff\\xfe\\x80 not utf-8')")
            await ps.publish("raw", "fine")
            await wait_for(lambda: len(got) == 2, 10, "both messages")
            assert got == [b"\xff\xfe\x80 not utf-8", b"fine"]
            assert ps.connected and ps.metrics["reconnects"] == 0
    finally:
        await query(pg_cluster.url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def test_terminated_listener_reconnects_and_signals_drops(pg_url, ps):
    events, plain = [], []
    await ps.subscribe_with_err("kick", lambda p, e: events.append(e or p))
    await ps.subscribe("kick", plain.append)
    old_pid = await listener_pid(pg_url, ps)
    await query(pg_url, "SELECT pg_terminate_backend(%s)", (old_pid,))
    await wait_for(lambda: ps.metrics["reconnects"] >= 1 and ps.connected, 10, "reconnect")
    await listener_pid(pg_url, ps, not_pid=old_pid)
    assert "kick" in await ps.listening_channels()
    await ps.publish("kick", "after")
    await wait_for(
        lambda: plain == [b"after"] and events and events[-1] == b"after", 10, "delivery after reconnect"
    )
    assert isinstance(events[0], DroppedMessages) and events[1:] == [b"after"]
    assert ps.metrics["disconnections"] >= 1


async def test_unresponsive_listener_is_detected_by_the_active_check(pg_url, ps):
    # A stopped backend keeps its TCP connection open but never answers: a half-open connection.
    events = []
    await ps.subscribe_with_err("kick", lambda p, e: events.append(e or p))
    old_pid = await listener_pid(pg_url, ps)
    os.kill(old_pid, signal.SIGSTOP)
    try:
        await wait_for(lambda: ps.metrics["ping_failures"] >= 1, 10, "the listener check to fail")
        await wait_for(lambda: ps.connected and ps.metrics["reconnects"] >= 1, 10, "reconnect")
    finally:
        os.kill(old_pid, signal.SIGCONT)
    await listener_pid(pg_url, ps, not_pid=old_pid)
    await ps.publish("kick", "after")
    await wait_for(lambda: events and events[-1] == b"after", 10, "delivery after reconnect")
    assert isinstance(events[0], DroppedMessages)


async def test_postgres_killed_and_restarted(own_cluster):
    url = own_cluster.url
    opts = dict(FAST, publish_timeout=1.0)  # the batch queue waits this long before QueueFull
    async with PubSub(url, **opts) as ps:
        events, plain = [], []
        await ps.subscribe_with_err("ev", lambda p, e: events.append(e or p))
        await ps.subscribe("ev", plain.append)
        for i in range(10):
            await ps.publish("ev", f"before-{i}")
        await wait_for(lambda: len(plain) == 10, 10, "messages before the crash")

        await anyio.to_thread.run_sync(own_cluster.kill)
        with anyio.fail_after(10):  # fails, and fails in bounded time
            with pytest.raises(PublishError):
                await ps.publish("ev", "while-down")
            with pytest.raises(PublishError):
                await ps.publish("ev", "while-down")
        await wait_for(lambda: not ps.connected, 10, "the listener to notice")
        assert ps.metrics["last_error"]

        # While Postgres is down nothing hangs: subscribing returns, a PubSub can start in the
        # background, and a waiting start fails with a clear error.
        late = []
        with anyio.fail_after(5):
            await ps.subscribe_with_err("ev", lambda p, e: late.append(e or p))
        background = PubSub(url, **opts)
        await background.start(wait=False)
        try:
            with anyio.fail_after(10), pytest.raises(NotConnected):
                async with PubSub(url, **opts):
                    pass
            # The batcher never loses silently: a message is queued, or publish raises.
            bp = ps.batcher(max_queue=5, max_batch=5)
            accepted = 0
            with anyio.fail_after(15), pytest.raises(QueueFull):
                while True:
                    await bp.publish("ev", f"queued-{accepted}")
                    accepted += 1
            assert accepted >= 5

            await anyio.to_thread.run_sync(own_cluster.start)
            await publish_until_ok(ps, "ev", "first-after")
            await wait_for(lambda: ps.connected, 20, "the listener to reconnect")
            assert await background.wait_connected(20)
            await bp.flush(timeout=20)
            assert ps.metrics["batched_messages"] == accepted

            for i in range(5):
                await ps.publish("ev", f"after-{i}")
            await wait_for(
                lambda: b"after-4" in events and b"after-4" in late and b"after-4" in plain, 10, "new messages"
            )
        finally:
            await background.close()

        for got in (events, late):  # told to resync before the new messages, and no other errors
            errors = [i for i, e in enumerate(got) if isinstance(e, Exception)]
            assert errors and all(isinstance(got[i], DroppedMessages) for i in errors)
            assert errors[0] < got.index(b"after-0")
        assert plain[:10] == [f"before-{i}".encode() for i in range(10)]
        assert ps.metrics["reconnects"] >= 1


async def test_batch_publisher_keeps_order_with_fewer_commits(ps):
    got = []
    await ps.subscribe("batched", got.append)
    n = 5000
    async with ps.batcher() as bp:
        for i in range(n):
            await bp.publish("batched", str(i))
        for _ in range(3):  # Postgres folds repeats within a transaction: each must still arrive
            await bp.publish("batched", "same")
        await bp.flush(timeout=10)
    await wait_for(lambda: len(got) == n + 3, 10, "all batched messages")
    assert got == [str(i).encode() for i in range(n)] + [b"same"] * 3
    m = ps.metrics
    assert m["batched_messages"] == n + 3
    assert 0 < m["batches"] <= n // 100
    assert m["batch_errors"] == 0


async def test_metrics_and_latency(pg_url, caplog):
    async with PubSub(pg_url, ping_interval=0) as ps, PubSub(pg_url, ping_interval=0) as other:
        got = []
        await ps.subscribe("m", got.append)
        await ps.publish("m", "abc")
        await ps.publish("m", b"x" * 7600)
        await ps.publish("m", "\u00e9")
        await wait_for(lambda: len(got) == 3, 10, "three messages")
        m = ps.metrics
        assert (m["publishes"], m["publish_errors"], m["subscribes"]) == (3, 0, 1)
        assert m["messages_received"] == 3 and m["colossal_messages_received"] == 1
        assert m["bytes_published"] == m["bytes_received"] == 3 + 7600 + 2
        assert m["connected"] is True and other.metrics["publishes"] == 0  # registries are per instance
        text = generate_latest(ps.registry).decode()
        assert 'coordinator_pubsub_publishes_total{success="true"} 3.0' in text
        assert 'coordinator_pubsub_messages_total{size="colossal"} 1.0' in text
        assert "coordinator_pubsub_connected 1.0" in text

        # Latency probes ignore foreign payloads on the private channel.
        with caplog.at_level(logging.WARNING, logger="coordinator.pubsub"):
            await other.publish(ps.latency_channel, "nonsense")
            send, recv = await ps.measure_latency(timeout=5)
        assert 0 < send <= recv
        assert ps.metrics["latency_measures"] == 1 and ps.metrics["latency_measure_errors"] == 0
        assert ps.registry.get_sample_value("coordinator_pubsub_receive_latency_seconds_count") == 1
        await wait_for(lambda: "unexpected message" in caplog.text, 10, "the foreign payload to be logged")


async def test_unreachable_postgres_fails_fast_and_close_releases_everything(pg_url):
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    with anyio.fail_after(10):
        with pytest.raises(NotConnected, match="cannot connect"):
            async with PubSub(dead, **FAST):
                pass
        unstarted = PubSub(dead, **FAST)
        try:
            with pytest.raises(PublishError):
                await unstarted.publish("c", "x")  # publishing needs no listener
        finally:
            await unstarted.close()

    db = pg_url.rsplit("/", 1)[1]
    ps = PubSub(pg_url, **FAST)
    try:
        await ps.start()
        await ps.subscribe("c", lambda p: None)
        await ps.publish("c", "x")
    finally:
        await ps.close()
    await ps.close()  # idempotent
    with pytest.raises(PubSubError):
        await ps.publish("c", "x")
    with pytest.raises(PubSubError):
        await ps.subscribe("c", lambda p: None)
    assert not ps.connected
    sql = "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND application_name LIKE 'coordinator-pubsub%%'"
    async def none_left() -> bool:
        return (await query(pg_url, sql, (db,)))[0][0] == 0

    await wait_for(none_left, 10, "every pub/sub connection to be closed", 0.05)
