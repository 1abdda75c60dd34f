"""The soak's clients: pairs of real DERP clients through nginx, numbered packets both ways.

Each client redials (same node key, through nginx) whenever its connection ends and notes which
relay it landed on and when, so the report can tell a packet lost because its own replica was
faulted from one lost by a pair nobody touched. Each direction sends on its own task (one stuck
connection never delays the others); per packet only its send time and one arrival byte are kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from array import array

from coordinator.relay.client import DerpClient, DerpError
from soaklib.kit import traffic

WARM_UP, Endpoint = traffic.WARM_UP, traffic.Endpoint

BUFFER_LIMIT = 256 * 1024  # a connection holding this much unsent is not given more (the packet counts as unsent)


class SoakEndpoint(Endpoint):
    """An :class:`Endpoint` that redials for ever and remembers where it was connected when."""

    def __init__(self, url: str, on_packet):
        super().__init__(url, on_packet)
        self.homes: list[tuple[float, bytes]] = []  # (monotonic time, relay server key) per connection

    async def start(self) -> None:
        await super().start()
        assert self.client is not None
        self.homes.append((time.monotonic(), self.client.server_key))

    async def _redial(self) -> DerpClient:
        attempt = 0
        while True:
            try:
                client = await DerpClient.connect(self.url, self.key, timeout=5)
            except DerpError:
                attempt += 1
                await asyncio.sleep(min(0.02 * attempt, 0.5))
                continue
            self.homes.append((time.monotonic(), client.server_key))
            return client

    def home_at(self, t: float) -> bytes | None:
        """The relay this client was (last) connected to at time ``t``."""
        found = None
        for when, key in self.homes:
            if when > t:
                break
            found = key
        return found

    def homes_between(self, start: float, end: float) -> set[bytes]:
        """Every relay this client was connected to at some moment in [start, end]."""
        keys = {k for when, k in self.homes if start <= when <= end}
        first = self.home_at(start)
        return keys | ({first} if first is not None else set())

    def send_nowait(self, dst: bytes, data: bytes) -> bool:
        """Hand one packet to the connection without waiting; False if there is none or it is backed up."""
        client = self.client
        transport = client.transport if client is not None else None
        if transport is None or transport.is_closing() or transport.get_write_buffer_size() > BUFFER_LIMIT:
            return False
        transport.write(_send_packet(dst, data))
        return True


def _send_packet(dst: bytes, data: bytes) -> bytes:
    from _relay import codec

    return codec.send_packet(dst, data)


class Flow:
    """One direction of a pair: packet ``seq`` went out at ``sent_at[seq - 1]`` (NaN: not handed over)
    and arrived at ``arrived_at[seq - 1]`` (NaN: never)."""

    def __init__(self, src: SoakEndpoint, dst: SoakEndpoint, pair: int):
        self.src, self.dst, self.pair = src, dst, pair
        self.sent_at = array("d")
        self.arrived_at = array("d")
        self.routed = False
        self.last_arrival: float | None = None
        self.longest_gap = 0.0

    def deliver(self, seq: int, now: float) -> None:
        if 0 < seq <= len(self.arrived_at) and math.isnan(self.arrived_at[seq - 1]):
            self.arrived_at[seq - 1] = now
            if self.last_arrival is not None:
                self.longest_gap = max(self.longest_gap, now - self.last_arrival)
            self.last_arrival = now

    def lost(self, until: float) -> list[tuple[int, float]]:
        """(seq, send time) of packets sent before ``until`` that never arrived."""
        return [(i + 1, t) for i, t in enumerate(self.sent_at)
                if not math.isnan(t) and t < until and math.isnan(self.arrived_at[i])]

    def longest_gap_outside(self, windows: list[tuple[float, float]]) -> float:
        """The longest silence between two arrivals that overlaps none of ``windows`` (start, end)."""
        times = sorted(t for t in self.arrived_at if not math.isnan(t))
        return max((b - a for a, b in zip(times, times[1:], strict=False)
                    if not any(a < end and b > start for start, end in windows)), default=0.0)

    @property
    def sent(self) -> int:
        return sum(1 for t in self.sent_at if not math.isnan(t))


class Load:
    """``pairs`` pairs of clients on ``url``, each side sending a numbered packet every ``interval`` s."""

    def __init__(self, url: str, pairs: int, interval: float):
        self.url, self.pairs, self.interval = url, pairs, interval
        self.endpoints: list[SoakEndpoint] = []
        self.flows: list[Flow] = []
        self.by_src: dict[bytes, Flow] = {}
        self._tasks: list[asyncio.Task] = []
        self.started = 0.0

    def _on_packet(self, src: bytes, data: bytes) -> None:
        flow = self.by_src.get(src)
        if flow is None:
            return
        if data == WARM_UP:
            flow.routed = True
        elif len(data) == 8:
            flow.deliver(int.from_bytes(data, "big"), time.monotonic())

    async def connect(self, rng: random.Random) -> None:
        """Connect every client, in an order drawn from ``rng`` so nginx's round robin pairs replicas at random."""
        pairs = [(SoakEndpoint(self.url, self._on_packet), SoakEndpoint(self.url, self._on_packet))
                 for _ in range(self.pairs)]
        self.endpoints = [e for pair in pairs for e in pair]
        order = list(self.endpoints)
        rng.shuffle(order)
        for e in order:
            await e.start()
        for i, (a, b) in enumerate(pairs):
            for src, dst in ((a, b), (b, a)):
                flow = Flow(src, dst, i)
                self.flows.append(flow)
                self.by_src[src.public_key] = flow

    async def routed(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while pending := [f for f in self.flows if not f.routed]:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(pending)} of {len(self.flows)} flows never delivered a warm-up packet")
            for f in pending:
                f.src.send_nowait(f.dst.public_key, WARM_UP)
            await asyncio.sleep(0.1)

    def run(self) -> None:
        self.started = time.monotonic()
        self._tasks = [asyncio.create_task(self._send(f), name=f"soak flow {i}") for i, f in enumerate(self.flows)]

    async def _send(self, flow: Flow) -> None:
        seq = 0
        while True:
            seq += 1
            at = self.started + seq * self.interval
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            sent = flow.src.send_nowait(flow.dst.public_key, seq.to_bytes(8, "big"))
            flow.sent_at.append(time.monotonic() if sent else math.nan)
            flow.arrived_at.append(math.nan)

    async def stop(self, drain: float = 2.0) -> float:
        """Stop sending; packets in flight get ``drain`` s. Returns when sending stopped."""
        stopped = time.monotonic()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.sleep(drain)
        return stopped

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(e.close() for e in self.endpoints), return_exceptions=True)
        with contextlib.suppress(Exception):
            self.endpoints.clear()
