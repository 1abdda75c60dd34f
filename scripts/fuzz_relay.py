#!/usr/bin/env python3
"""Fuzz a replica's front door and relay while a healthy pair relays numbered packets through it.

    .venv/bin/python scripts/fuzz_relay.py --count 1000000
    .venv/bin/python scripts/fuzz_relay.py --count 20000 --json      # what CI runs (tests/test_fuzz.py)

The replica is ``uvicorn coordinator.app:app --http coordinator.edge:DerpHttpProtocol`` in its own
process (the relay and HTTP layer of ``coordinator server``, without the control plane). Inputs, from
``--workers`` concurrent raw-socket attackers (testkit/rawderp.py), one "input" each:

* ``frames``: one random DERP frame after a valid handshake (known and unknown types, lengths in
  and out of range, mesh frames without the mesh key), sent in batches;
* ``client_info``: a junk or truncated ClientInfo after a valid upgrade;
* ``http``: a mutated upgrade request on ``/derp``;
* ``websocket``: one random WebSocket frame (opcodes, RSV bits, masks, lengths) after a valid
  WebSocket handshake.

Meanwhile two real clients exchange numbered packets; any packet lost or out of order, or either
disconnecting, is a failure. Prints inputs/s, the healthy pair's losses and disconnects, the
replica's RSS and fd peaks and any traceback in its log; exits 1 on a crash, a lost packet or a
traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import psutil

from coordinator.relay.client import DerpClient, DerpError
from testkit import rawderp
from testkit.rawderp import RawPeer

ROOT = Path(__file__).resolve().parent.parent

FRAME_TYPES = list(range(0x00, 0x20)) + [0x7F, 0xFF]
MIXES = {"frames": 0.90, "websocket": 0.08, "client_info": 0.01, "http": 0.01}  # shares of the inputs


# Frames a client may send after its handshake without being hung up on (the rest end its connection).
SKIPPED_TYPES = [t for t in FRAME_TYPES if t not in (0x04, 0x07, 0x0A, 0x10, 0x11, 0x12)]


def junk_frame(rng: random.Random, sink: bytes, safe: bool) -> bytes:
    """One DERP frame a hostile client might send after its handshake; ``safe`` ones keep the connection open.

    A batch is safe frames and then one that may be anything, so every frame sent is one the relay
    really parses (after a fatal frame it reads nothing more).
    """
    if safe:
        roll = rng.random()
        if roll < 0.35:
            dst = sink if rng.random() < 0.5 else rng.randbytes(32)
            return rawderp.frame(rawderp.SEND_PACKET, dst + rng.randbytes(rng.randint(0, 1400)))
        if roll < 0.5:
            return rawderp.frame(rawderp.PING, rng.randbytes(rng.randint(8, 1000)))
        if roll < 0.55:
            return rawderp.frame(rawderp.NOTE_PREFERRED, rng.randbytes(1))
        return rawderp.frame(rng.choice(SKIPPED_TYPES), rng.randbytes(rng.choice([0, 1, 5, 31, 32, 33, 100, 2000])))
    ftype = rng.choice(FRAME_TYPES)
    roll = rng.random()
    if roll < 0.3:
        n = rng.randint(0, 64)
    elif roll < 0.9:
        n = rng.randint(0, 2000)
    else:
        n = rng.choice([65536 + 32, 65536 + 33, 1 << 20, 0xFFFFFFFF])  # out of range: the relay must refuse
    if n > 4096:
        return struct.pack(">BI", ftype, n) + rng.randbytes(rng.randint(0, 64))  # a lying length, then hang up
    return struct.pack(">BI", ftype, n) + rng.randbytes(n)


def junk_ws_frame(rng: random.Random) -> bytes:
    opcode = rng.choice([0, 1, 2, 2, 2, 3, 7, 8, 9, 9, 10, 11, 15])
    payload = rawderp.frame(rng.choice(FRAME_TYPES), rng.randbytes(rng.randint(0, 40)))
    if rng.random() < 0.3:
        payload = rng.randbytes(rng.randint(0, 300))
    return rawderp.ws_frame(opcode, payload, fin=rng.random() < 0.8, rsv=rng.choice([0, 0, 0, 0, 1, 4]),
                            masked=rng.random() < 0.95)


def junk_http(rng: random.Random, port: int) -> bytes:
    req = bytearray(rawderp.upgrade_request(f"127.0.0.1:{port}", websocket=rng.random() < 0.5))
    for _ in range(rng.randint(1, 8)):
        op = rng.random()
        i = rng.randrange(len(req))
        if op < 0.4:
            req[i] = rng.randrange(256)
        elif op < 0.7:
            req[i:i] = rng.randbytes(rng.randint(1, 32))
        elif op < 0.85:
            del req[i : i + rng.randint(1, 16)]
        else:
            req[i:i] = b"\r\nX-" + rng.randbytes(8).hex().encode() + b": " + b"v" * rng.randint(0, 5000)
    return bytes(req)


class Fuzzer:
    def __init__(self, port: int, count: int, seed: int):
        self.port, self.count = port, count
        self.rng = random.Random(seed)
        self.done = {k: 0 for k in MIXES}
        self.quota = {k: max(1, int(count * share)) for k, share in MIXES.items()}
        self.quota["frames"] += count - sum(self.quota.values())
        self.connections = 0

    def take(self, n: int, kind: str) -> int:
        n = min(n, self.quota[kind] - self.done[kind])
        self.done[kind] += max(n, 0)
        return n

    def next_kind(self) -> str:
        """The kind furthest behind its share, so every kind keeps its share however fast each goes."""
        return min(MIXES, key=lambda k: self.done[k] / self.quota[k] if self.quota[k] else 2.0)

    @property
    def finished(self) -> bool:
        return all(self.done[k] >= self.quota[k] for k in MIXES)

    async def one(self, peer_key: bytes) -> None:
        rng = self.rng
        kind = self.next_kind()
        peer = await RawPeer.connect(self.port)
        self.connections += 1
        try:
            if kind == "frames":
                await peer.handshake(self.port)
                n = self.take(rng.randint(100, 2000), kind)  # one batch: nothing is sent after its last frame
                await peer.send(b"".join(junk_frame(rng, peer_key, safe=i < n - 1) for i in range(n)))
            elif kind == "client_info":
                await peer.upgrade(self.port)
                if self.take(1, kind):
                    n = rng.choice([0, 1, 55, 56, 100, 1000, 262144, 262145])
                    await peer.send(struct.pack(">BI", rng.choice([2, 2, 2, 4, 0x12]), n) +
                                    rng.randbytes(min(n, rng.randint(0, 2000))))
            elif kind == "http":
                if self.take(1, kind):
                    await peer.send(junk_http(rng, self.port))
            else:
                await peer.handshake(self.port, websocket=True)
                n = self.take(rng.randint(1, 50), kind)
                if n > 0:
                    await peer.send(b"".join(junk_ws_frame(rng) for _ in range(n)))
            await peer.closed_within(0.05)
        except (ConnectionError, OSError, TimeoutError, asyncio.IncompleteReadError):
            pass  # the replica hung up on us: what it should do to most of this
        finally:
            peer.close()

    async def worker(self, peer_key: bytes) -> None:
        while not self.finished:
            await self.one(peer_key)


class Healthy:
    """Two real clients exchanging numbered packets; counts losses and disconnects.

    A third, the sink, is the fuzzer's target for well-formed SendPackets; it reads and discards.
    """

    def __init__(self, url: str):
        self.url = url
        self.sent = self.received = self.lost = self.disconnects = 0

    async def run(self, stop: asyncio.Event) -> None:
        a = await DerpClient.connect(self.url)
        b = await DerpClient.connect(self.url)
        sink = await DerpClient.connect(self.url)
        self.key = sink.public_key
        self.ready.set()
        draining = asyncio.create_task(self._drain(sink))
        try:
            while not stop.is_set():
                self.sent += 1
                await a.send(b.public_key, self.sent.to_bytes(8, "big"))
                try:
                    got = await b.recv_packet(timeout=10)
                except TimeoutError:
                    self.lost += 1
                    continue
                if int.from_bytes(got.data, "big") != self.sent:
                    self.lost += 1
                else:
                    self.received += 1
                await asyncio.sleep(0.002)
        except (DerpError, OSError):
            self.disconnects += 1
        finally:
            draining.cancel()
            for c in (a, b, sink):
                await c.close()

    async def _drain(self, sink: DerpClient) -> None:
        while True:
            try:
                await sink.recv()
            except (DerpError, OSError):
                self.disconnects += 1
                return


async def fuzz(port: int, count: int, workers: int, seed: int, proc: psutil.Process) -> dict:
    healthy = Healthy(f"http://127.0.0.1:{port}/derp")
    healthy.ready = asyncio.Event()
    stop = asyncio.Event()
    pair = asyncio.create_task(healthy.run(stop))
    with anyio.fail_after(30):
        await healthy.ready.wait()
    fuzzer = Fuzzer(port, count, seed)
    peaks = {"rss": 0, "fds": 0}

    async def sample() -> None:
        while not stop.is_set():
            peaks["rss"] = max(peaks["rss"], proc.memory_info().rss)
            peaks["fds"] = max(peaks["fds"], proc.num_fds())
            await asyncio.sleep(0.2)

    sampler = asyncio.create_task(sample())
    rss0 = proc.memory_info().rss
    start = time.monotonic()
    await asyncio.gather(*(fuzzer.worker(healthy.key) for _ in range(workers)))
    elapsed = time.monotonic() - start
    await asyncio.sleep(0.5)  # the last packets in flight
    stop.set()
    await pair
    await sampler
    total = sum(fuzzer.done.values())
    return {
        "inputs": total, "by_kind": fuzzer.done, "connections": fuzzer.connections, "seconds": round(elapsed, 2),
        "inputs_per_s": round(total / elapsed), "healthy_sent": healthy.sent, "healthy_received": healthy.received,
        "healthy_lost": healthy.lost, "healthy_disconnects": healthy.disconnects,
        "rss_start_mib": round(rss0 / 2**20, 1), "rss_peak_mib": round(peaks["rss"] / 2**20, 1),
        "fd_peak": peaks["fds"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    ap.add_argument("--count", type=int, default=1_000_000, help="fuzzed inputs to send (default 1000000)")
    ap.add_argument("--workers", type=int, default=16, help="concurrent attacking connections")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="fuzz-relay-") as tmp:
        with socket_port() as port:
            pass
        log_path = Path(tmp) / "replica.log"
        with open(log_path, "wb") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "coordinator.app:app", "--http", "coordinator.edge:DerpHttpProtocol",
                 "--port", str(port), "--log-level", "warning"],
                env={**os.environ, "COORDINATOR_DATA_DIR": tmp}, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        try:
            wait_listening(port, server)
            figures = asyncio.run(fuzz(port, args.count, args.workers, args.seed, psutil.Process(server.pid)))
            figures["replica_alive"] = server.poll() is None
        finally:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        text = log_path.read_text(errors="replace")
        figures["tracebacks"] = text.count("Traceback")
        if figures["tracebacks"]:
            print(text[text.index("Traceback") :][:3000], file=sys.stderr)
    failed = (not figures["replica_alive"] or figures["healthy_lost"] or figures["healthy_disconnects"]
              or figures["tracebacks"] or figures["healthy_received"] == 0)
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"{figures['inputs']} inputs ({', '.join(f'{k} {v}' for k, v in figures['by_kind'].items())}) over "
              f"{figures['connections']} connections in {figures['seconds']} s: {figures['inputs_per_s']} inputs/s")
        print(f"healthy pair: {figures['healthy_received']}/{figures['healthy_sent']} packets, {figures['healthy_lost']} "
              f"lost, {figures['healthy_disconnects']} disconnects")
        print(f"replica: alive {figures['replica_alive']}, RSS {figures['rss_start_mib']} -> peak "
              f"{figures['rss_peak_mib']} MiB, fd peak {figures['fd_peak']}, tracebacks in its log {figures['tracebacks']}")
    return 1 if failed else 0


class socket_port:
    """A free TCP port on 127.0.0.1 (released on exit, for the replica to bind)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return self.sock.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.sock.close()


def wait_listening(port: int, server: subprocess.Popen, timeout: float = 60.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"fuzz_relay: the replica exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"fuzz_relay: the replica did not listen within {timeout:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
