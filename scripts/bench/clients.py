"""The benchmark client: DERP connections driven by lean asyncio protocols, one case per client process.

It is built to cost little CPU, since it shares the machine with the server: after the handshake
each socket is driven by an ``asyncio.Protocol`` of its own; senders write whole windows / 64 KiB
batches in one ``write`` built with one ``bytes.join`` from a prebuilt header, timestamp and
payload; receivers check the framing of a whole read at once with strided slices (all frames of a
case have the same length), so per-packet Python work is limited to the sampled timestamps.

With ``writes="per-packet"`` (``--client per-packet``) the client behaves like Tailscale's derphttp
client instead: every packet (and every ack) is its own ``write`` (one send(2) while the socket
takes it), so the server sees about one packet per read, and receivers parse each read frame by
frame. That mode measures what a relay spends per read rather than per byte.
Wire constants come from ``_relay.codec``, the relay's own.
"""

from __future__ import annotations

import asyncio
import os
import signal
import struct
import time
from time import perf_counter_ns

from _relay.codec import FRAME_HEADER_LEN, KEY_LEN, PING, PONG, RECV_PACKET, SEND_PACKET
from bench import proc

HDR = struct.Struct(">BI")
assert HDR.size == FRAME_HEADER_LEN
TS_OFF = FRAME_HEADER_LEN + KEY_LEN  # timestamp offset inside a Send/RecvPacket frame
ACK_LEN = 8
PROBE_TAG = b"bench-mesh-probe"  # + a 4-byte sequence number; probes never reach the benchmark protocols


async def connect_raw(url: str, timeout: float = 30.0, wait_server_info: bool = True):
    """A handshaken raw-upgrade DerpClient whose socket has nothing left unread by the client.

    Returns ``(client, leftover)``: bytes the client's StreamReader read past the handshake, to be
    fed to whatever protocol takes over ``client.transport`` (with ``transport.set_protocol``).
    """
    from coordinator.relay.client import DerpClient

    client = await DerpClient.connect(url, timeout=timeout, wait_server_info=wait_server_info)
    return client, await take_over(client)


async def take_over(client) -> bytes:
    """Detach a raw DerpClient's socket from its StreamReader: the bytes read but not consumed.

    Whatever protocol then takes over ``client.transport`` must be fed these bytes first.
    """
    if client._backlog or client._reader.buffered:
        # Parsed-but-unconsumed frames cannot be handed over in order; the relay sends nothing
        # after ServerInfo unless someone sends to us, so this means a misbehaving server.
        await client.close()
        raise RuntimeError("DERP client holds frames past the handshake; cannot hand the socket over")
    buf = client._stream.reader._buffer
    leftover = bytes(buf)
    buf.clear()
    return leftover


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

    def __init__(self, src: bytes, payload_len: int, per_frame: bool = False):
        self.per_frame = per_frame  # parse every read frame by frame, as a real client does
        self.F = FRAME_HEADER_LEN + KEY_LEN + payload_len
        self.expect = HDR.pack(RECV_PACKET, KEY_LEN + payload_len) + src[:1]
        self.expect_ints = tuple(self.expect)
        self.rem = b""
        self.transport: asyncio.Transport | None = None
        self.other_frames = 0
        self.closed = False

    def connection_lost(self, exc):
        self.closed = True

    def data_received(self, data: bytes) -> None:
        if self.per_frame:
            if self.rem:
                data, self.rem = self.rem + data, b""
            off = self._generic(data, 0)
            if off < len(data):
                self.rem = data[off:]
            self._after_read()
            return
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

    def __init__(self, src: bytes, size: int, shared: Shared, sample_every: int, ack_every: int,
                 per_frame: bool = False):
        super().__init__(src, size, per_frame)
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

    def __init__(self, dst: bytes, size: int, window: int, per_packet: bool = False):
        super().__init__(dst, ACK_LEN, per_packet)
        self.pre = HDR.pack(SEND_PACKET, KEY_LEN + size) + dst
        self.post = b"\xa5" * (size - 8)
        self.per_packet = per_packet
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
            if self.per_packet:
                write = self.transport.write
                for _ in range(m):
                    write(b"".join([self.pre, perf_counter_ns().to_bytes(8, "little"), self.post]))
            else:
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

    def __init__(self, dst: bytes, size: int, batch_bytes: int = 65536, per_packet: bool = False):
        self.pre = HDR.pack(SEND_PACKET, KEY_LEN + size) + dst
        self.post = b"\xa5" * (size - 8)
        self.per_packet = per_packet
        self.m = max(1, batch_bytes // (FRAME_HEADER_LEN + KEY_LEN + size))
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
        if self.per_packet:
            pkt = b"".join([self.pre, ts, self.post])
            write = self.transport.write
            for _ in range(self.m):
                write(pkt)
        else:
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
    per_packet = spec.get("client") == "per-packet"
    rcv = Receiver(s_client.public_key, size, shared, spec["sample_every"], spec["ack_every"] if mode == "windowed" else 0,
                   per_packet)
    if mode == "windowed":
        snd = WindowSender(r_client.public_key, size, spec["window"], per_packet)
    else:
        snd = FloodSender(r_client.public_key, size, per_packet=per_packet)
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
                proc.self_cpu_seconds())

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
    wait_info = spec.get("wait_server_info", True)
    conns = await asyncio.gather(*(connect_raw(spec["url"], wait_server_info=wait_info) for _ in range(2 * spec["pairs"])))
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
    proc.die_with_parent()
    if spec.get("cpus"):
        os.sched_setaffinity(0, spec["cpus"])
    try:
        result = proc.run((case or client_case)(pipe, spec), spec["client_loop"])
        pipe.send(("done", result))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        try:
            pipe.send(("error", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass
        if isinstance(exc, KeyboardInterrupt):
            return
        raise


async def probe_route(a, b, deadline: float) -> int:
    """Send probes ``a`` -> ``b`` until one arrives; returns how many were sent.

    Probes that the first relay dropped (destination not known yet) are simply resent. Only the
    newest probe counts as arrival, and it is sent only once the previous one timed out: packets
    on one route stay in order, so when it arrives nothing older is still in flight and nothing
    of the probing reaches the benchmark protocols after the hand-over.
    """
    n = 0
    wait = 0.02
    while True:
        n += 1
        tag = PROBE_TAG + n.to_bytes(4, "little")
        await a.send(b.public_key, tag)
        until = min(deadline, time.monotonic() + wait)
        while True:
            try:
                pkt = await b.recv_packet(timeout=max(0.0, until - time.monotonic()))
            except TimeoutError:
                break
            if pkt.src == a.public_key and pkt.data == tag:
                return n
        if time.monotonic() >= deadline:
            raise RuntimeError(f"routing not established: {n} probes to {b.url} did not arrive")
        wait = min(0.25, wait * 2)


async def mesh_client_case(pipe, spec: dict) -> dict:
    """One client process's share of a mesh case: ``client_case`` with two relay URLs, routes probed first."""
    from coordinator.relay.client import DerpClient

    pairs = spec["pairs"]
    shared = Shared()
    urls = (spec["send_url"], spec["recv_url"])
    wait_info = spec.get("wait_server_info", True)
    clients = await asyncio.gather(*(DerpClient.connect(urls[i % 2], timeout=30, wait_server_info=wait_info)
                                     for i in range(2 * pairs)))
    t_probe = time.monotonic()
    deadline = t_probe + spec["route_timeout"]

    async def probe_pair(s, r) -> int:
        return await probe_route(s, r, deadline) + await probe_route(r, s, deadline)

    probes = await asyncio.gather(*(probe_pair(clients[2 * i], clients[2 * i + 1]) for i in range(pairs)))
    route_ms = 1000 * (time.monotonic() - t_probe)
    conns = [(c, await take_over(c)) for c in clients]

    senders, receivers, transports = [], [], []
    for i in range(pairs):
        snd, rcv = attach_pair(conns[2 * i], conns[2 * i + 1], spec, shared, transports)
        senders.append(snd)
        receivers.append(rcv)
    return await measure(pipe, spec, shared, senders, receivers, transports,
                            {"probes": sum(probes), "route_ms": route_ms})


def mesh_client_worker(pipe, spec: dict) -> None:
    client_worker(pipe, spec, mesh_client_case)
