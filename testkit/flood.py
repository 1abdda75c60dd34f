"""One sender/receiver pair through a relay, in its own process: the sender writes as fast as TCP lets it.

``python testkit/flood.py URL --seconds S [--warmup W] [--size N] [--mesh-key K]`` prints one JSON
line: payload bytes the receiver got during the measured window, the window's length, and
whether the packets (numbered by the sender) arrived without a gap, i.e. nothing was dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from coordinator.relay.client import DerpClient, RecvPacket


async def flood(url: str, seconds: float, warmup: float, size: int, mesh_key: str | None) -> dict:
    receiver = await DerpClient.connect(url)
    sender = await DerpClient.connect(url, mesh_key=mesh_key)
    start = time.monotonic()
    t0, t1 = start + warmup, start + warmup + seconds
    stop = asyncio.Event()

    async def send() -> None:
        seq, pad = 0, bytes(size - 8)
        while not stop.is_set():
            await sender.send_many(receiver.public_key, [(seq + i).to_bytes(8, "big") + pad for i in range(8)])
            seq += 8
            await asyncio.sleep(0)  # let this process's receiver read: a starved one is shed by the write timeout

    sending = asyncio.create_task(send())
    window_bytes, expected, gaps = 0, 0, 0
    try:
        while (now := time.monotonic()) < t1:
            frame = await receiver.recv(max(0.05, t1 - now + 5))
            if not isinstance(frame, RecvPacket):
                continue
            seq = int.from_bytes(frame.data[:8], "big")
            gaps += seq != expected
            expected = seq + 1
            if t0 <= time.monotonic() < t1:
                window_bytes += len(frame.data)
    finally:
        stop.set()
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        await sender.close()
        await receiver.close()
    return {"bytes": window_bytes, "seconds": seconds, "packets": expected, "gaps": gaps}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--size", type=int, default=16000)
    ap.add_argument("--mesh-key")
    args = ap.parse_args()
    print(json.dumps(asyncio.run(flood(args.url, args.seconds, args.warmup, args.size, args.mesh_key))), flush=True)


if __name__ == "__main__":
    main()
