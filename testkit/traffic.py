"""Numbered packets between pairs of real DERP clients, to count what a lifecycle event loses.

An :class:`Endpoint` is one client that, like a Tailscale client, redials with the same node key
(through the load balancer, or the one replica it was given) whenever its connection ends, and
counts the ``Restarting`` frames it was sent. A :class:`Flow` sends numbered packets from one
endpoint to another at a fixed rate and records when each arrived, so a test can tell exactly
which packets were lost, when they were sent, and the longest silence a receiver saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from coordinator.core.keys import NodeKey
from coordinator.relay.client import DerpClient, DerpError, RecvPacket, Restarting
from testkit.polling import wait_for

WARM_UP = b"warm-up"  # not 8 bytes long, so never taken for a numbered packet


class Endpoint:
    """A DERP client kept connected to ``url`` under one node key until :meth:`close`."""

    def __init__(self, url: str, on_packet: Callable[[bytes, bytes], None]):
        self.url = url
        self.key = NodeKey.generate()
        self.on_packet = on_packet  # (source key, payload)
        self.client: DerpClient | None = None
        self.restarting: list[Restarting] = []
        self.reconnects = 0
        self.errors: list[str] = []
        self._task: asyncio.Task | None = None

    @property
    def public_key(self) -> bytes:
        return self.key.public

    @property
    def server_key(self) -> bytes | None:
        return self.client.server_key if self.client is not None else None

    async def start(self) -> None:
        self.client = await DerpClient.connect(self.url, self.key, timeout=10)
        self._task = asyncio.create_task(self._run(), name=f"endpoint {self.key.public.hex()[:8]}")

    async def _run(self) -> None:
        while True:
            try:
                while True:
                    frame = await self.client.recv()
                    if isinstance(frame, RecvPacket):
                        self.on_packet(frame.src, frame.data)
                    elif isinstance(frame, Restarting):
                        self.restarting.append(frame)
            except (DerpError, OSError) as exc:
                self.errors.append(str(exc))
            old, self.client = self.client, None
            with contextlib.suppress(Exception):
                await old.close()
            self.client = await self._redial()
            self.reconnects += 1

    async def _redial(self) -> DerpClient:
        for attempt in range(1000):
            try:
                return await DerpClient.connect(self.url, self.key, timeout=5)
            except DerpError:
                await asyncio.sleep(min(0.01 * (attempt + 1), 0.2))
        raise AssertionError(f"{self.url}: could not reconnect")

    async def send(self, dst: bytes, data: bytes) -> bool:
        """True if the packet was handed to a connection (not that it arrived)."""
        client = self.client
        if client is None:
            return False
        try:
            await client.send(dst, data)
        except (DerpError, OSError, RuntimeError):
            return False
        return True

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self.client is not None:
            await self.client.close()


@dataclass
class Flow:
    """Numbered packets from ``src`` to ``dst``: what was sent when, what arrived when."""

    src: Endpoint
    dst: Endpoint
    sent: dict[int, float] = field(default_factory=dict)  # seq -> monotonic send time
    received: dict[int, float] = field(default_factory=dict)  # seq -> monotonic arrival time
    routed: bool = False  # a warm-up packet arrived: the route across the mesh exists

    def lost(self, until: float) -> list[tuple[int, float]]:
        """(seq, send time) of every packet sent before ``until`` that never arrived."""
        return [(s, t) for s, t in self.sent.items() if t < until and s not in self.received]

    def longest_gap(self) -> float:
        times = sorted(self.received.values())
        return max((b - a for a, b in zip(times, times[1:], strict=False)), default=0.0)


class Traffic:
    """``pairs`` flows over fresh endpoints; ``connect(i)`` gives the URL for endpoint ``i``."""

    def __init__(self, pairs: int, connect: Callable[[int], str], interval: float = 0.05):
        self.interval = interval
        self.flows: list[Flow] = []
        self.by_src: dict[bytes, Flow] = {}
        self._connect = connect
        self._pairs = pairs
        self._sender: asyncio.Task | None = None
        self.endpoints: list[Endpoint] = []

    def _deliver(self, src: bytes, data: bytes) -> None:
        flow = self.by_src.get(src)
        if flow is None:
            return
        if data == WARM_UP:
            flow.routed = True
        elif len(data) == 8:
            flow.received.setdefault(int.from_bytes(data, "big"), time.monotonic())

    async def start(self) -> None:
        for i in range(self._pairs):
            a, b = (Endpoint(self._connect(2 * i + j), self._deliver) for j in range(2))
            self.endpoints += [a, b]
            await a.start()
            await b.start()
            flow = Flow(a, b)
            self.flows.append(flow)
            self.by_src[a.public_key] = flow

    async def routed(self, timeout: float = 20.0) -> None:
        """Wait until every flow delivers (each receiver's presence has crossed the mesh)."""
        pending = list(self.flows)

        async def delivered() -> bool:
            nonlocal pending
            pending = [f for f in pending if not f.routed]
            for f in pending:
                await f.src.send(f.dst.public_key, WARM_UP)
            return not pending

        await wait_for(delivered, timeout, lambda: f"every flow to deliver ({len(pending)} of {len(self.flows)} never did)",
                       0.05)

    def run(self) -> None:
        """Start sending numbered packets on every flow."""
        self._sender = asyncio.create_task(self._send_all(), name="traffic sender")

    async def _send_all(self) -> None:
        seq = 0
        next_at = time.monotonic()
        while True:
            seq += 1
            payload = seq.to_bytes(8, "big")
            for f in self.flows:
                if await f.src.send(f.dst.public_key, payload):
                    f.sent[seq] = time.monotonic()
            next_at += self.interval
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def stop(self, drain: float = 1.0) -> float:
        """Stop sending, give packets in flight ``drain`` seconds; the time sending stopped."""
        stopped = time.monotonic()
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
        await asyncio.sleep(drain)
        return stopped

    async def close(self) -> None:
        if self._sender is not None and not self._sender.done():
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
        await asyncio.gather(*(e.close() for e in self.endpoints), return_exceptions=True)
