#!/usr/bin/env python3
"""Throughput, loss and latency of the DERP relay, against a pure-Python baseline relay.

What is measured
----------------
The relay runs in its own process (``benchlib.py relay``: ``create_app(DerpRelay(...))`` under
uvicorn with uvloop and ``DerpHttpProtocol``, as ``coordinator server`` runs it) on 127.0.0.1.
``--pairs`` client pairs connect to it with raw ``Upgrade: DERP`` connections and the full
handshake; in each pair one connection sends SendPacket frames to the other. For every mode and
packet size (one *case*), after ``--warmup`` seconds the benchmark measures for ``--seconds``:

* delivered packets/s and MB/s (10^6 bytes of packet payload) counted by the receivers;
* loss % = 1 - received/sent over the whole case (after a drain once senders stop);
* one-way latency p50/p99: senders put ``time.perf_counter_ns()`` (CLOCK_MONOTONIC, shared by all
  processes on Linux) in the first 8 payload bytes, receivers sample every ``--sample-every``-th
  packet;
* the server process's CPU seconds (utime+stime from /proc/<pid>/stat) and the client process's.

Modes:

* ``windowed``: each sender keeps at most ``--window`` packets in flight; the receiver sends a
  cumulative ack (8-byte count) back through the relay once it has ``--ack-every`` new packets.
  Nothing may be lost; a loss is reported as an error.
* ``flood``: senders write as fast as TCP back-pressure on their own connection lets them; the
  relay drops what a slow receiver cannot take (its queues), which shows as loss.

Every case also runs, right after, against a minimal pure-Python asyncio relay (in this file,
``--serve-baseline``: per frame, parse the header, look the destination up in a dict and
``transport.write`` the rewritten frame; same event loop; frames for a destination whose transport
pushes back are dropped) in another process, with the same client, and the script prints
ours/baseline ratios. ``--no-baseline`` skips it; ``--relay-path`` benchmarks a modified build.

The machine's total CPU use over each window is read from /proc/stat as well: on a shared machine
"others CPU s" (used by neither server nor client) tells how much other work disturbed a figure.
Both relays count packets (GET /bench/stats); a disagreement with the client's counts is reported.

The client runs in ``--client-procs`` separate processes (default 1, uvloop). It is built to cost
little CPU, since it shares the machine with the server: after the handshake each socket is driven
by an ``asyncio.Protocol`` of its own; senders write whole windows / 64 KiB batches in one
``write`` built with one ``bytes.join`` from a prebuilt header, timestamp and payload; receivers
check the framing of a whole read at once with strided slices (all frames of a case have the same
length), so per-packet Python work is limited to the sampled timestamps.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import struct
import sys
import time
from time import perf_counter_ns

import benchlib

SEND_PACKET = 0x04
RECV_PACKET = 0x05
SERVER_KEY = 0x01
CLIENT_INFO = 0x02
SERVER_INFO = 0x03
KEEP_ALIVE = 0x06
PING = 0x12
PONG = 0x13
KEY_LEN = 32
HDR = struct.Struct(">BI")
TS_OFF = 5 + KEY_LEN  # timestamp offset inside a Send/RecvPacket frame
ACK_LEN = 8

TARGETS = {  # windowed mode, from the issue: (size, metric, minimum)
    100: ("pkt/s", 120_000),
    1000: ("pkt/s", 80_000),
    16000: ("MB/s", 200),
}


# ======================================================================================
# client side
# ======================================================================================


class Shared:
    """Per-process measurement state shared by all connections of one client process."""

    __slots__ = ("measuring", "lat")

    def __init__(self):
        self.measuring = False
        self.lat: list[int] = []


class FixedFrames(asyncio.Protocol):
    """Reads a stream of RecvPacket frames that all have one length and one source.

    A read is checked as a whole: the 6 leading bytes (type, length, first key byte) of every
    frame in it are compared with strided slices, in C. Anything else in the stream (KeepAlive,
    PeerGone, a Ping) falls back to a frame-by-frame parse of that read.
    """

    def __init__(self, src: bytes, payload_len: int):
        self.F = 5 + KEY_LEN + payload_len
        self.expect = HDR.pack(RECV_PACKET, KEY_LEN + payload_len) + src[:1]
        self.expect_ints = tuple(self.expect)
        self.rem = b""
        self.transport: asyncio.Transport | None = None
        self.other_frames = 0
        self.closed = False

    def connection_lost(self, exc):
        self.closed = True

    def data_received(self, data: bytes) -> None:
        F = self.F
        off = 0
        if self.rem:
            rem, self.rem = self.rem, b""
            if len(rem) >= 6 and rem[:6] == self.expect:
                need = F - len(rem)
                if len(data) < need:
                    self.rem = rem + data
                    return
                self._frames(rem + data[:need], 0, 1)
                off = need
            else:
                data = rem + data
        n = (len(data) - off) // F
        if n:
            end = off + n * F
            e0, e1, e2, e3, e4, e5 = self.expect_ints
            if (
                data[off:end:F].count(e0) == n
                and data[off + 1 : end : F].count(e1) == n
                and data[off + 2 : end : F].count(e2) == n
                and data[off + 3 : end : F].count(e3) == n
                and data[off + 4 : end : F].count(e4) == n
                and data[off + 5 : end : F].count(e5) == n
            ):
                self._frames(data, off, n)
                off = end
            else:
                off = self._generic(data, off)
        tail = len(data) - off
        if tail and data[off : off + 6] != self.expect[: min(6, tail)]:
            off = self._generic(data, off)  # complete control frames now, not with the next read
        if off < len(data):
            self.rem = data[off:]
        self._after_read()

    def _generic(self, data: bytes, pos: int) -> int:
        F, L = self.F, len(data)
        while L - pos >= 5:
            ftype, length = HDR.unpack_from(data, pos)
            end = pos + 5 + length
            if end > L:
                break
            if end - pos == F and data[pos : pos + 6] == self.expect:
                self._frames(data, pos, 1)
            else:
                self.other_frames += 1
                if ftype == PING and self.transport is not None:
                    self.transport.write(HDR.pack(PONG, 8) + data[pos + 5 : pos + 13])
            pos = end
        return pos

    def _frames(self, data: bytes, off: int, n: int) -> None:
        raise NotImplementedError

    def _after_read(self) -> None:
        pass


class Receiver(FixedFrames):
    """Counts packets from one sender, samples their timestamps, acks them in windowed mode."""

    def __init__(self, src: bytes, size: int, shared: Shared, sample_every: int, ack_every: int):
        super().__init__(src, size)
        self.shared = shared
        self.k = sample_every
        self.count = 0
        self.acked = 0
        self.acks = 0
        self.ack_every = ack_every  # 0: no acks (flood)
        self.ack_prefix = HDR.pack(SEND_PACKET, KEY_LEN + ACK_LEN) + src

    def _frames(self, data: bytes, off: int, n: int) -> None:
        c = self.count
        self.count = c + n
        if self.shared.measuring:
            k = self.k
            first = (-c) % k
            if first < n:
                now = perf_counter_ns()
                F = self.F
                append = self.shared.lat.append
                from_bytes = int.from_bytes
                for q in range(off + first * F + TS_OFF, off + n * F, k * F):
                    append(now - from_bytes(data[q : q + 8], "little"))

    def _after_read(self) -> None:
        if self.ack_every and self.count - self.acked >= self.ack_every:
            self.acked = self.count
            self.acks += 1
            self.transport.write(self.ack_prefix + self.count.to_bytes(8, "little"))


class WindowSender(FixedFrames):
    """Keeps ``window`` packets in flight; reads the receiver's cumulative acks."""

    def __init__(self, dst: bytes, size: int, window: int):
        super().__init__(dst, ACK_LEN)
        self.pre = HDR.pack(SEND_PACKET, KEY_LEN + size) + dst
        self.post = b"\xa5" * (size - 8)
        self.window = window
        self.sent = 0
        self.acked = 0
        self.running = False

    def _frames(self, data: bytes, off: int, n: int) -> None:
        q = off + (n - 1) * self.F + TS_OFF
        self.acked = int.from_bytes(data[q : q + 8], "little")

    def _after_read(self) -> None:
        self.fill()

    def fill(self) -> None:
        if not self.running:
            return
        m = self.window - (self.sent - self.acked)
        if m > 0:
            ts = perf_counter_ns().to_bytes(8, "little")
            self.transport.write(b"".join([self.pre, ts, self.post] * m))
            self.sent += m

    def start(self) -> None:
        self.running = True
        self.fill()

    def stop(self) -> None:
        self.running = False


class FloodSender(asyncio.Protocol):
    """Writes ~64 KiB batches, one per event-loop turn, until its transport pushes back."""

    def __init__(self, dst: bytes, size: int, batch_bytes: int = 65536):
        self.pre = HDR.pack(SEND_PACKET, KEY_LEN + size) + dst
        self.post = b"\xa5" * (size - 8)
        self.m = max(1, batch_bytes // (5 + KEY_LEN + size))
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.sent = 0
        self.running = False
        self.paused = False
        self.scheduled = False
        self.closed = False

    def data_received(self, data: bytes) -> None:
        pass  # nothing is sent to a flood sender (PeerGone at the end at most)

    def connection_lost(self, exc):
        self.closed = True

    def pause_writing(self):
        self.paused = True

    def resume_writing(self):
        self.paused = False
        self.kick()

    def kick(self) -> None:
        if self.running and not self.paused and not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.pump)

    def pump(self) -> None:
        self.scheduled = False
        if not self.running or self.paused or self.closed:
            return
        ts = perf_counter_ns().to_bytes(8, "little")
        self.transport.write(b"".join([self.pre, ts, self.post] * self.m))
        self.sent += self.m
        self.kick()

    def start(self) -> None:
        self.running = True
        self.kick()

    def stop(self) -> None:
        self.running = False


def attach_pair(s_conn, r_conn, spec: dict, shared: Shared, transports: list):
    """Put a sender and a receiver protocol on two connected clients; returns (sender, receiver)."""
    (s_client, s_left), (r_client, r_left) = s_conn, r_conn
    size, mode = spec["size"], spec["mode"]
    rcv = Receiver(s_client.public_key, size, shared, spec["sample_every"], spec["ack_every"] if mode == "windowed" else 0)
    snd = WindowSender(r_client.public_key, size, spec["window"]) if mode == "windowed" else FloodSender(r_client.public_key, size)
    for proto, client, left in ((rcv, r_client, r_left), (snd, s_client, s_left)):
        t = client.transport
        t.set_protocol(proto)
        t.set_write_buffer_limits(high=256 * 1024)
        proto.transport = t
        transports.append(t)
        if left:
            proto.data_received(left)
    return snd, rcv


async def measure(pipe, spec: dict, shared: Shared, senders: list, receivers: list, transports: list,
                  ready_info=None) -> dict:
    """Report ready, wait for the common start time, run warm-up and measurement, drain, report."""

    def snapshot() -> tuple[float, int, int, float]:
        return (time.monotonic(), sum(s.sent for s in senders), sum(r.count for r in receivers),
                benchlib.self_cpu_seconds())

    async def sleep_until(t: float) -> None:
        await asyncio.sleep(max(0.0, t - time.monotonic()))

    pipe.send(("ready", ready_info))
    t0 = pipe.recv()  # blocking is fine: nothing is in flight yet
    await sleep_until(t0)
    for s in senders:
        s.start()
    await sleep_until(t0 + spec["warmup"])
    shared.measuring = True
    a = snapshot()
    await sleep_until(t0 + spec["warmup"] + spec["seconds"])
    b = snapshot()
    shared.measuring = False
    for s in senders:
        s.stop()
    # Drain: windowed until everything sent has arrived; flood until the receivers go quiet.
    deadline = time.monotonic() + 5.0
    last, quiet_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        got = sum(r.count for r in receivers)
        sent = sum(s.sent for s in senders)
        if got >= sent:
            break
        if spec["mode"] == "flood":
            if got != last or any(t.get_write_buffer_size() for t in transports):
                last, quiet_since = got, time.monotonic()
            elif time.monotonic() - quiet_since > 0.3:
                break
        await asyncio.sleep(0.01)
    sent_total = sum(s.sent for s in senders)
    recv_total = sum(r.count for r in receivers)
    for t in transports:
        t.close()
    await asyncio.sleep(0.05)
    return {
        "elapsed": b[0] - a[0], "sent": b[1] - a[1], "received": b[2] - a[2], "cpu": b[3] - a[3],
        "sent_total": sent_total, "received_total": recv_total, "latency_ns": shared.lat,
        "other_frames": sum(r.other_frames for r in receivers), "acks": sum(r.acks for r in receivers),
    }


async def client_case(pipe, spec: dict) -> dict:
    """One client process's share of a case: connect, wait for the start time, run, report."""
    shared = Shared()
    conns = await asyncio.gather(*(benchlib.connect_raw(spec["url"]) for _ in range(2 * spec["pairs"])))
    senders, receivers, transports = [], [], []
    for i in range(spec["pairs"]):
        snd, rcv = attach_pair(conns[2 * i], conns[2 * i + 1], spec, shared, transports)
        senders.append(snd)
        receivers.append(rcv)
    return await measure(pipe, spec, shared, senders, receivers, transports)


def client_worker(pipe, spec: dict, case=None) -> None:
    """Entry of a client process: run ``case`` (default: client_case) and send its result up the pipe."""
    # The parent handles Ctrl-C and stops us; SIGTERM (from it or PR_SET_PDEATHSIG) ends us quietly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    benchlib.die_with_parent()
    if spec.get("cpus"):
        os.sched_setaffinity(0, spec["cpus"])
    try:
        result = benchlib.run((case or client_case)(pipe, spec), spec["client_loop"])
        pipe.send(("done", result))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        try:
            pipe.send(("error", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass
        if isinstance(exc, KeyboardInterrupt):
            return
        raise


# ======================================================================================
# orchestration
# ======================================================================================


def client_totals(results: list[dict], size: int) -> dict:
    """What the client processes measured, summed: rates, loss, latency percentiles."""
    elapsed = sum(r["elapsed"] for r in results) / len(results)
    received = sum(r["received"] for r in results)
    sent_total = sum(r["sent_total"] for r in results)
    recv_total = sum(r["received_total"] for r in results)
    lat = sorted(x for r in results for x in r["latency_ns"])

    def pct(p: float) -> float | None:
        return lat[min(len(lat) - 1, int(p * len(lat)))] / 1000 if lat else None

    return {
        "seconds": elapsed, "received": received,
        "pkt_s": received / elapsed, "mb_s": received / elapsed * size / 1e6,
        "sent_pkt_s": sum(r["sent"] for r in results) / elapsed,
        "loss_pct": 100.0 * (1 - recv_total / sent_total) if sent_total else 0.0,
        "sent_total": sent_total, "received_total": recv_total, "acks": sum(r["acks"] for r in results),
        "p50_us": pct(0.50), "p99_us": pct(0.99), "latency_samples": len(lat),
        "other_frames": sum(r["other_frames"] for r in results),
    }


def client_specs(args, size: int, mode: str, **extra) -> list[dict]:
    """One spec per client process, the ``--pairs`` spread over ``--client-procs``."""
    nproc = max(1, min(args.client_procs, args.pairs))
    return [{
        "pairs": len(range(i, args.pairs, nproc)), "size": size, "mode": mode,
        "window": args.window, "ack_every": args.ack_every, "sample_every": args.sample_every,
        "warmup": args.warmup, "seconds": args.seconds, "client_loop": args.client_loop, **extra,
    } for i in range(nproc)]


def drive_clients(specs: list[dict], worker, args, counters, sample, ready_timeout: float = 60.0) -> dict:
    """Run one client process per spec through a case; the processes are reaped whatever happens.

    They start, connect and report ready; ``counters()`` is read; they are released together;
    ``sample()`` is read when the measured window opens (after ``--warmup``) and when it closes;
    their results are collected and ``counters()`` is read again.
    """
    ctx = multiprocessing.get_context("fork")
    workers = []
    ok = False

    def receive(pipe, timeout: float):
        if not pipe.poll(timeout):
            raise RuntimeError("client process did not answer in time")
        kind, value = pipe.recv()
        if kind == "error":
            raise RuntimeError(f"client process failed: {value}")
        return value

    try:
        for spec in specs:
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=worker, args=(child_end, spec), daemon=True)
            proc.start()
            child_end.close()
            workers.append((proc, parent_end))
        ready = [receive(pipe, ready_timeout) for _, pipe in workers]
        counters0 = counters()
        t0 = time.monotonic() + 0.05
        for _, pipe in workers:
            pipe.send(t0)
        time.sleep(max(0.0, t0 + args.warmup - time.monotonic()))
        sample0 = sample()
        time.sleep(max(0.0, t0 + args.warmup + args.seconds - time.monotonic()))
        sample1 = sample()
        results = [receive(pipe, 60) for _, pipe in workers]
        counters1 = counters()
        ok = True
    finally:
        for proc, pipe in workers:
            proc.join(5 if ok else 0)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
            pipe.close()
    return {"ready": ready, "results": results, "counters": (counters0, counters1), "samples": (sample0, sample1)}


def counter_delta(s0: dict, s1: dict, keys) -> tuple[dict, dict]:
    """(counters in ``keys``, drops) that changed between two /bench/stats answers ({} if one is missing)."""
    if not (s0 and s1):
        return {}, {}
    d0, d1 = s0.get("drops", {}), s1.get("drops", {})
    return {k: s1[k] - s0.get(k, 0) for k in keys}, {k: d1[k] - d0.get(k, 0) for k in d1 if d1[k] - d0.get(k, 0)}


def run_case(server: benchlib.ServerProcess, args, mode: str, size: int) -> dict:
    def sample():
        return server.cpu(), benchlib.machine_cpu_seconds(), time.monotonic()

    run = drive_clients(client_specs(args, size, mode, url=server.url), client_worker, args, server.stats, sample)
    results, (stats0, stats1) = run["results"], run["counters"]
    (cpu0, mach0, m0), (cpu1, mach1, m1) = run["samples"]
    traffic = client_totals(results, size)
    received = traffic["received"]
    counted, drops = counter_delta(stats0, stats1, ("packets_in", "packets_out"))
    srv_cpu = cpu1 - cpu0
    cli_cpu = sum(r["cpu"] for r in results)
    busy, total = mach1[0] - mach0[0], mach1[1] - mach0[1]
    return {
        "mode": mode, "size": size, "pairs": args.pairs, **traffic,
        "server_cpu_s": srv_cpu, "server_cpu_pct": 100.0 * srv_cpu / (m1 - m0),
        "client_cpu_s": cli_cpu, "client_us_per_pkt": 1e6 * cli_cpu / received if received else None,
        "server_us_per_pkt": 1e6 * srv_cpu / received if received else None,
        # Whole machine during the window (all CPUs, incl. softirq), and what neither of us used:
        # other processes on a shared machine make the figures noisy.
        "machine_busy_pct": 100.0 * busy / total if total else None,
        "others_cpu_s": max(0.0, busy - srv_cpu - cli_cpu),
        "server_counted": counted,
        "server_drops": drops,
    }


# ======================================================================================
# the baseline relay (pure Python, one write per frame)
# ======================================================================================


def serve_baseline(loop_name: str) -> None:
    """A minimal pure-Python DERP relay: raw upgrade, NaCl handshake, per-frame dict routing."""
    from coordinator.handshake import ServerHandshake
    from coordinator.keys import NodeKey

    key = NodeKey.generate()
    handshake = ServerHandshake(key)
    magic = b"DERP\xf0\x9f\x94\x91"
    server_key_frame = HDR.pack(SERVER_KEY, len(magic) + KEY_LEN) + magic + key.public
    upgrade = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n"
               b"Derp-Version: 2\r\nDerp-Public-Key: " + key.public.hex().encode() + b"\r\n\r\n")
    routes: dict[bytes, Conn] = {}
    conns: set[Conn] = set()
    counters = {"packets_in": 0, "packets_out": 0, "drops": {"unknown_dest": 0, "queue_full": 0}}
    pack = HDR.pack
    unpack_from = HDR.unpack_from

    class Conn(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
            self.buf = bytearray()
            self.state = 0  # 0 HTTP, 1 handshake, 2 active
            self.key = b""
            self.paused = False
            transport.set_write_buffer_limits(high=256 * 1024)
            conns.add(self)

        def connection_lost(self, exc):
            conns.discard(self)
            if self.key and routes.get(self.key) is self:
                del routes[self.key]

        def pause_writing(self):
            self.paused = True

        def resume_writing(self):
            self.paused = False

        def http(self) -> bool:
            buf = self.buf
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                if len(buf) > 16384:
                    self.transport.close()
                return False
            head = bytes(buf[:i]).lower()
            del buf[: i + 4]
            if head.startswith(b"get /bench/stats"):
                body = json.dumps(counters).encode()
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                                     + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
                self.transport.close()
                return False
            if b"\r\nupgrade: derp" not in head:
                self.transport.write(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n"
                                     b"Connection: close\r\n\r\n")
                self.transport.close()
                return False
            self.transport.write(upgrade + server_key_frame)
            self.state = 1
            return True

        def data_received(self, data):
            buf = self.buf
            buf += data
            if self.state == 0 and not self.http():
                return
            pos, n = 0, len(buf)
            while n - pos >= 5:
                ftype, length = unpack_from(buf, pos)
                end = pos + 5 + length
                if end > n:
                    break
                if ftype == SEND_PACKET and self.state == 2:
                    counters["packets_in"] += 1
                    target = routes.get(bytes(buf[pos + 5 : pos + 37]))
                    if target is None:
                        counters["drops"]["unknown_dest"] += 1
                    elif target.paused:
                        counters["drops"]["queue_full"] += 1
                    else:
                        target.transport.write(pack(RECV_PACKET, length) + self.key + buf[pos + 37 : end])
                        counters["packets_out"] += 1
                elif ftype == CLIENT_INFO and self.state == 1:
                    try:
                        client_key, _info, _mesh, server_info = handshake(bytes(buf[pos + 5 : end]))
                    except ValueError:
                        self.transport.abort()
                        return
                    self.key = client_key
                    self.transport.write(pack(SERVER_INFO, len(server_info)) + server_info)
                    routes[client_key] = self
                    self.state = 2
                elif ftype == PING and self.state == 2:
                    self.transport.write(pack(PONG, 8) + buf[pos + 5 : pos + 13])
                pos = end
            del buf[:pos]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        sock = benchlib.listening_socket()
        server = await loop.create_server(Conn, sock=sock, backlog=4096)
        print(f"READY {sock.getsockname()[1]}", flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        server.close()
        for c in list(conns):
            c.transport.abort()

    benchlib.run(main(), loop_name)


# ======================================================================================
# output
# ======================================================================================


def fmt(v, spec: str = ",.0f") -> str:
    if v is None:
        return "-"
    return format(v, spec)


def print_results(results: dict[str, list[dict]], args) -> None:
    cols = ("mode", "size", "server", "pkt/s", "MB/s", "loss %", "p50 µs", "p99 µs", "srv CPU s",
            "srv µs/pkt", "cli CPU s", "cli µs/pkt", "machine busy %", "others CPU s", "relay drops")
    rows = []
    for name, cases in results.items():
        for r in cases:
            rows.append((
                r["mode"], str(r["size"]), name, fmt(r["pkt_s"]), fmt(r["mb_s"], ",.1f"), fmt(r["loss_pct"], ".2f"),
                fmt(r["p50_us"]), fmt(r["p99_us"]), f"{r['server_cpu_s']:.2f} ({r['server_cpu_pct']:.0f}%)",
                fmt(r["server_us_per_pkt"], ".2f"), fmt(r["client_cpu_s"], ".2f"), fmt(r["client_us_per_pkt"], ".2f"),
                fmt(r["machine_busy_pct"], ".0f"), fmt(r["others_cpu_s"], ".2f"),
                ",".join(f"{k}={v}" for k, v in r["server_drops"].items()) or "0",
            ))
    rows.sort(key=lambda row: (args.modes.index(row[0]), int(row[1]), row[2] != "relay"))
    table(cols, rows)

    if "baseline" in results:
        print()
        print("ours / baseline (same client, same workload; for latency and CPU per packet lower is better)")
        base = {(r["mode"], r["size"]): r for r in results["baseline"]}
        metrics = (("pkt/s", "pkt_s", ",.0f"), ("MB/s", "mb_s", ",.1f"), ("loss %", "loss_pct", ".2f"),
                   ("p50 µs", "p50_us", ",.0f"), ("p99 µs", "p99_us", ",.0f"),
                   ("srv CPU s", "server_cpu_s", ".2f"), ("srv µs/pkt", "server_us_per_pkt", ".2f"))
        rows = []
        for r in results["relay"]:
            b = base.get((r["mode"], r["size"]))
            if b is None:
                continue
            for label, k, spec in metrics:
                ours, theirs = r[k], b[k]
                ratio = "-" if ours is None or not theirs else f"{ours / theirs:.2f}"
                rows.append((r["mode"], str(r["size"]), label, fmt(ours, spec), fmt(theirs, spec), ratio))
        table(("mode", "size", "metric", "ours", "baseline", "ours/baseline"), rows)

    checks = target_checks(results.get("relay", []))
    if checks:
        print()
        for line in checks:
            print(line)


def target_checks(cases: list[dict]) -> list[str]:
    out = []
    for r in cases:
        if r["mode"] != "windowed" or r["size"] not in TARGETS:
            continue
        metric, minimum = TARGETS[r["size"]]
        value = r["pkt_s"] if metric == "pkt/s" else r["mb_s"]
        ok = value >= minimum and r["loss_pct"] == 0
        out.append(f"target windowed {r['size']:>5} B: {metric} >= {minimum:,} and no loss: "
                   f"{'MET' if ok else 'NOT MET'} ({value:,.0f} {metric}, loss {r['loss_pct']:.2f} %)")
    return out


def table(cols, rows) -> None:
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) if i > 2 else c.ljust(w) for i, (c, w) in enumerate(zip(cols, widths, strict=True))))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(v.rjust(w) if i > 2 else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True))))


# ======================================================================================


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=4, help="sender/receiver connection pairs (default 4)")
    ap.add_argument("--sizes", default="100,1000,16000", help="packet sizes in bytes, comma-separated, >= 8")
    ap.add_argument("--modes", default="windowed,flood", help="windowed,flood (default both)")
    ap.add_argument("--seconds", type=float, default=3.0, help="measured seconds per case (default 3)")
    ap.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each case (default 0.5)")
    ap.add_argument("--window", type=int, default=32, help="windowed: packets in flight per sender (default 32)")
    ap.add_argument("--ack-every", type=int, default=8, help="windowed: receiver acks every N packets (default 8)")
    ap.add_argument("--sample-every", type=int, default=8, help="latency: sample every k-th packet (default 8)")
    ap.add_argument("--client-procs", type=int, default=1, help="client processes (default 1)")
    ap.add_argument("--client-loop", choices=("uvloop", "asyncio"), default="uvloop")
    ap.add_argument("--baseline-loop", choices=("uvloop", "asyncio"), default="uvloop",
                    help="event loop of the pure-Python baseline relay (default uvloop, like ours)")
    ap.add_argument("--relay-path", metavar="DIR",
                    help="benchmark a modified relay: import _relay from DIR/_relay (built there with "
                         "'python setup.py build_ext --inplace') instead of the installed one")
    ap.add_argument("--no-baseline", action="store_true", help="skip the pure-Python baseline relay")
    ap.add_argument("--before-path", metavar="DIR",
                    help="also benchmark the relay built in DIR (e.g. the commit before a change) in the same run")
    ap.add_argument("--rate-limit", action="append", default=[], metavar="BYTES[:BURST]",
                    help="also benchmark the relay with this per-client rate limit (bytes/s); repeatable")
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    ap.add_argument("--serve-baseline", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        ap.error("--sizes: comma-separated integers")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.sizes or any(not 8 <= s <= 65536 for s in args.sizes):
        ap.error("--sizes: each between 8 and 65536 (8 bytes carry the timestamp)")
    if not args.modes or any(m not in ("windowed", "flood") for m in args.modes):
        ap.error("--modes: windowed and/or flood")
    if args.pairs < 1 or args.window < 1 or args.sample_every < 1 or args.seconds <= 0:
        ap.error("--pairs, --window, --sample-every and --seconds must be positive")
    if not 1 <= args.ack_every <= args.window:
        ap.error("--ack-every must be between 1 and --window (else the window deadlocks)")
    try:
        args.rate_limit = [tuple(int(v) for v in (spec + ":0").split(":")[:2]) for spec in args.rate_limit]
    except ValueError:
        ap.error("--rate-limit: BYTES or BYTES:BURST, integers")
    return args


def limit_name(rate: int, burst: int) -> str:
    """The server name of a ``--rate-limit`` run (bytes/s, and the burst if given)."""
    return f"limit={rate}" + (f":{burst}" if burst else "")


def main() -> int:
    args = parse_args()
    if args.serve_baseline:
        benchlib.die_with_parent()
        benchlib.raise_nofile()
        serve_baseline(args.baseline_loop)
        return 0
    benchlib.sigterm_as_interrupt()
    here = os.path.dirname(os.path.abspath(__file__))
    server_argv = [sys.executable, os.path.join(here, "benchlib.py"), "relay", "--keepalive", "3600"]
    relay_argv = server_argv + (["--relay-path", args.relay_path] if args.relay_path else [])
    servers = [("relay", relay_argv)]
    if args.before_path:
        servers.insert(0, ("before", server_argv + ["--relay-path", args.before_path]))
    for rate, burst in args.rate_limit:
        servers.append((limit_name(rate, burst), relay_argv + ["--rate-limit", str(rate), "--rate-burst", str(burst)]))
    if not args.no_baseline:
        servers.append(("baseline", [sys.executable, os.path.abspath(__file__), "--serve-baseline",
                                     "--baseline-loop", args.baseline_loop]))
    results: dict[str, list[dict]] = {name: [] for name, _ in servers}
    log = sys.stderr
    started = time.monotonic()
    procs: list[benchlib.ServerProcess] = []
    try:
        for name, argv in servers:
            procs.append(benchlib.ServerProcess(argv, name).__enter__())
        print("servers: " + ", ".join(f"{p.name} pid {p.pid} port {p.port}" for p in procs)
              + f"; client: {args.client_procs} process(es), {args.client_loop}; {os.cpu_count()} CPUs", file=log)
        for mode in args.modes:
            for size in args.sizes:
                for p in procs:
                    r = run_case(p, args, mode, size)
                    results[p.name].append(r)
                    print(f"  {mode:8} {size:>5} B {p.name:8}: {r['pkt_s']:>10,.0f} pkt/s {r['mb_s']:>8,.1f} MB/s "
                          f"loss {r['loss_pct']:.2f} %  p50 {fmt(r['p50_us'])} µs  p99 {fmt(r['p99_us'])} µs  "
                          f"server CPU {r['server_cpu_s']:.2f} s  client CPU {r['client_cpu_s']:.2f} s", file=log)
    except KeyboardInterrupt:
        print("interrupted", file=log)
        return 130
    finally:
        for p in reversed(procs):
            p.stop()
    for r in results["relay"] + results.get("baseline", []):
        c = r["server_counted"]
        # The relay counts the acks too; a relay may drop packets, never invent them.
        if c and (c["packets_in"] != r["sent_total"] + r["acks"]
                  or c["packets_out"] - r["acks"] > r["received_total"]):
            print(f"WARNING: {r['mode']} {r['size']} B: the server counted {c} but the client sent "
                  f"{r['sent_total']} packets + {r['acks']} acks and received {r['received_total']}", file=log)
    lossy = [r for r in results["relay"] + results.get("baseline", [])
             if r["mode"] == "windowed" and r["sent_total"] != r["received_total"]]
    if args.json:
        json.dump({"args": {k: v for k, v in vars(args).items() if k != "serve_baseline"},
                   "cpus": os.cpu_count(), "wall_seconds": time.monotonic() - started, "results": results,
                   "targets": target_checks(results["relay"])}, sys.stdout, indent=2)
        print()
    else:
        print_results(results, args)
        print(f"\n({time.monotonic() - started:.0f} s. MB = 10^6 bytes of packet payload. Latency is one-way, sampled "
              f"every {args.sample_every}th packet. CPU s over the {args.seconds:g} s measured; srv % = of one core; "
              f"µs/pkt = CPU per delivered packet; machine busy = all {os.cpu_count()} CPUs; others = CPU used by "
              f"neither server nor client (other processes, uncharged softirq).)")
    for rate, burst in args.rate_limit:
        for r in results[limit_name(rate, burst)]:
            share = rate * r["size"] / (r["size"] + 5 + KEY_LEN)  # the limit counts the framing too
            per_sender = r["mb_s"] * 1e6 / r["pairs"]
            if per_sender < share / 2:
                continue  # the limit did not bind: this run measured its cost, not its effect
            print(f"{limit_name(rate, burst)} {r['mode']} {r['size']} B: each sender got {per_sender / 1e6:.3f} MB/s of "
                  f"payload = {100 * per_sender / share:.1f} % of what the limit allows")
    if lossy:
        print(f"ERROR: windowed mode lost packets in {len(lossy)} case(s)", file=log)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
