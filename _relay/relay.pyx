# cython: language_level=3
"""The DERP relay's data plane: connections, routing table, send queues, forwarders, counters.

After the HTTP upgrade a connection's transport belongs to a :class:`Conn`, an asyncio protocol
implemented here. Frames are parsed in place from the bytes the event loop hands over, routed by a
dict from 32-byte key to destination, and copied once into the destination's output buffer. Every
destination touched while handling one read is flushed once at its end (write coalescing). When a
destination's transport pushes back, packets wait in bounded queues (data and disco apart) that
drop the oldest packet when full, so a sender is never blocked by a slow receiver. A mesh link is
different (as in Go's derper, whose forwarding write stalls the sender's reader): while its
transport holds more than ``max_buffer`` unsent bytes, the senders that route to it stop being read
until it drains, which pushes back on them over TCP instead of dropping.

Only per-connection events (handshake, registration, close, keepalive ticks) touch Python objects
beyond the dict lookup. The handshake itself (NaCl boxes, JSON) is a Python callable injected by
the control plane; nothing here knows about HTTP, Postgres or configuration.
"""

cimport cython
from cpython.bytearray cimport PyByteArray_AS_STRING
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.object cimport PyObject
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcmp, memcpy, memset
from libc.stdint cimport uint64_t

from _relay cimport proto as P

import ipaddress
import logging
import random
import time
from collections import deque

log = logging.getLogger("coordinator.relay")

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    cdef struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk_id, timespec *tp)
    int CLOCK_MONOTONIC


cdef inline double monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


# Drop reasons, also the order of RelayServer.drops.
DROP_REASONS = ("unknown_dest", "unknown_dest_on_fwd", "gone", "queue_head", "queue_tail", "write_error", "dup_client")
cdef enum:
    DROP_UNKNOWN_DEST = 0
    DROP_UNKNOWN_DEST_ON_FWD = 1
    DROP_GONE = 2
    DROP_QUEUE_HEAD = 3
    DROP_QUEUE_TAIL = 4
    DROP_WRITE_ERROR = 5
    DROP_DUP_CLIENT = 6
    N_DROPS = 7

cdef enum:
    ST_HANDSHAKE = 0
    ST_ACTIVE = 1
    ST_CLOSED = 2

cdef enum:
    ROUTE_CACHE = 4
    READ_BUFFER_SIZE = 262144
    SCRATCH_SIZE = 65536
    IDLE_BUFFER_KEEP = 4096      # output buffers above this are freed when a conn goes idle
    MESH_HARD_LIMIT_FACTOR = 8   # a mesh link sheds forwarded packets past this many x max_buffer

cdef enum:
    WS_OP_CONT = 0x0
    WS_OP_TEXT = 0x1
    WS_OP_BINARY = 0x2
    WS_OP_CLOSE = 0x8
    WS_OP_PING = 0x9
    WS_OP_PONG = 0xA


cdef class RelayServer
cdef class Conn


class ProtocolViolation(Exception):
    """A peer broke the DERP or WebSocket protocol; the message is the logged reason."""


cdef inline bint looks_like_disco(const unsigned char* pkt, Py_ssize_t n) noexcept nogil:
    return n >= P.DISCO_MIN_LEN and memcmp(pkt, P.DERP_DISCO_MAGIC, P.DISCO_MAGIC_LEN) == 0


cdef inline Py_ssize_t ws_header_size(Py_ssize_t n) noexcept nogil:
    return 2 if n < 126 else (4 if n <= 65535 else 10)


cdef inline Py_ssize_t ws_put_header(unsigned char* p, int opcode, Py_ssize_t n) noexcept nogil:
    p[0] = 0x80 | opcode
    if n < 126:
        p[1] = <unsigned char>n
        return 2
    if n <= 65535:
        p[1] = 126
        p[2] = (n >> 8) & 0xff
        p[3] = n & 0xff
        return 4
    p[1] = 127
    cdef int i
    for i in range(8):
        p[2 + i] = (<uint64_t>n >> (56 - 8 * i)) & 0xff
    return 10


cdef void ws_unmask(unsigned char* dst, const unsigned char* src, Py_ssize_t n,
                    const unsigned char* mask, int offset) noexcept nogil:
    """XOR ``n`` bytes with the 4-byte mask starting at mask position ``offset``, 8 bytes at a time."""
    cdef unsigned char m8[8]
    cdef uint64_t word, mword
    cdef Py_ssize_t i = 0
    cdef int j
    for j in range(8):
        m8[j] = mask[(offset + j) & 3]
    memcpy(&mword, m8, 8)
    while i + 8 <= n:
        memcpy(&word, src + i, 8)
        word ^= mword
        memcpy(dst + i, &word, 8)
        i += 8
    while i < n:
        dst[i] = src[i] ^ m8[i & 7]
        i += 1


@cython.final
cdef class Counters:
    """Relay-wide counters; ``RelayServer.stats()`` is the Python view."""
    cdef public unsigned long long packets_in, bytes_in, packets_out, bytes_out
    cdef public unsigned long long forwarded_in, forwarded_out, accepts, handshake_failures
    cdef public unsigned long long pings, pongs, keepalives, peer_gone_disconnected, peer_gone_not_here
    cdef public unsigned long long home_conns_total, protocol_errors, mesh_pushbacks
    cdef unsigned long long drops[N_DROPS]
    cdef unsigned long long drop_bytes[N_DROPS]


cdef class Writer:
    """An output buffer bound to a transport, flushed once per event-loop turn that wrote to it."""

    cdef RelayServer server
    cdef object transport
    cdef unsigned char* obuf
    cdef Py_ssize_t olen, ocap
    cdef bint dirty, ws, used

    cdef int reserve(self, Py_ssize_t extra) except -1:
        cdef Py_ssize_t need = self.olen + extra
        cdef Py_ssize_t cap
        cdef unsigned char* nb
        if need <= self.ocap:
            return 0
        cap = self.ocap * 2 if self.ocap else 256
        while cap < need:
            cap *= 2
        nb = <unsigned char*>realloc(self.obuf, cap)
        if nb == NULL:
            raise MemoryError()
        self.obuf = nb
        self.ocap = cap
        return 0

    cdef inline void mark_dirty(self):
        self.used = True
        if not self.dirty:
            self.dirty = True
            self.server.dirty.append(self)

    cdef int put_frame(self, unsigned char ftype, const unsigned char* a, Py_ssize_t na,
                       const unsigned char* b, Py_ssize_t nb) except -1:
        """Append one frame whose payload is ``a`` then ``b``; flushed at the end of this turn."""
        self.reserve(P.FRAME_HEADER_LEN + na + nb)
        cdef unsigned char* p = self.obuf + self.olen
        P.write_header(p, ftype, <unsigned int>(na + nb))
        if na:
            memcpy(p + P.FRAME_HEADER_LEN, a, na)
        if nb:
            memcpy(p + P.FRAME_HEADER_LEN + na, b, nb)
        self.olen += P.FRAME_HEADER_LEN + na + nb
        self.mark_dirty()
        return 0

    cdef int flush(self) except -1:
        cdef bytes out
        cdef Py_ssize_t n = self.olen, total, pos, k, w
        cdef unsigned char* q
        if n == 0 or self.transport is None:
            self.olen = 0
            return 0
        if not self.ws:
            out = PyBytes_FromStringAndSize(<char*>self.obuf, n)
        else:
            # One WebSocket binary message per 32 KiB: Go clients refuse larger messages.
            total = n + ((n + P.WS_MAX_OUT_MESSAGE - 1) // P.WS_MAX_OUT_MESSAGE) * 4
            out = PyBytes_FromStringAndSize(NULL, total)
            q = <unsigned char*>PyBytes_AS_STRING(out)
            pos = 0
            w = 0
            while pos < n:
                k = min(n - pos, <Py_ssize_t>P.WS_MAX_OUT_MESSAGE)
                w += ws_put_header(q + w, WS_OP_BINARY, k)
                memcpy(q + w, self.obuf + pos, k)
                w += k
                pos += k
            if w != total:
                out = out[:w]
        self.olen = 0
        self.write_out(out)
        return 0

    cdef int write_out(self, bytes out) except -1:
        self.transport.write(out)
        return 0

    cdef void release_buffer(self) noexcept:
        """Free an idle output buffer: idle connections should cost almost nothing."""
        if self.olen == 0 and self.obuf != NULL and (not self.used or self.ocap > IDLE_BUFFER_KEEP):
            free(self.obuf)
            self.obuf = NULL
            self.ocap = 0
        self.used = False

    def __dealloc__(self):
        if self.obuf != NULL:
            free(self.obuf)
            self.obuf = NULL


@cython.final
cdef class Forwarder(Writer):
    """Sends ForwardPacket frames for keys that live on a mesh peer, over that peer's link.

    The control plane creates one per outgoing mesh connection (its transport must speak raw DERP
    framing) and registers it for each key the peer reports present.
    """

    cdef readonly str name
    cdef public Py_ssize_t max_buffer
    cdef public object on_congested  # called with this Forwarder when the link starts pushing back
    cdef readonly bint congested
    cdef bint closed
    cdef Py_ssize_t pending_frames, pending_bytes   # in the output buffer, not yet written
    cdef list paused                                # senders not read until this link drains

    def __cinit__(self, RelayServer server, transport, str name="", Py_ssize_t max_buffer=512 * 1024,
                  on_congested=None):
        self.server = server
        self.transport = transport
        self.name = name
        self.max_buffer = max_buffer
        self.on_congested = on_congested
        self.paused = []

    cdef int forward(self, Conn sender, const unsigned char* src, const unsigned char* dst,
                     const unsigned char* pkt, Py_ssize_t n) except -1:
        cdef Counters c = self.server.counters
        if self.closed:
            c.drops[DROP_GONE] += 1
            c.drop_bytes[DROP_GONE] += n
            return 0
        if self.congested and sender is not None and not sender.read_paused:
            # The rest of the sender's current read still goes out; nothing more is read from it.
            if sender.pause_reading():
                self.paused.append(sender)
                c.mesh_pushbacks += 1
        self.reserve(P.FRAME_HEADER_LEN + 2 * P.KEY_LEN + n)
        cdef unsigned char* p = self.obuf + self.olen
        P.write_header(p, P.FRAME_FORWARD_PACKET, <unsigned int>(2 * P.KEY_LEN + n))
        memcpy(p + P.FRAME_HEADER_LEN, src, P.KEY_LEN)
        memcpy(p + P.FRAME_HEADER_LEN + P.KEY_LEN, dst, P.KEY_LEN)
        memcpy(p + P.FRAME_HEADER_LEN + 2 * P.KEY_LEN, pkt, n)
        self.olen += P.FRAME_HEADER_LEN + 2 * P.KEY_LEN + n
        self.pending_frames += 1
        self.pending_bytes += n
        self.mark_dirty()
        return 0

    cdef int write_out(self, bytes out) except -1:
        cdef Counters c = self.server.counters
        cdef Py_ssize_t unsent = self.transport.get_write_buffer_size()
        frames, nbytes = self.pending_frames, self.pending_bytes
        self.pending_frames = self.pending_bytes = 0
        if unsent > self.max_buffer and not self.congested:
            self.congested = True
            if self not in self.server.congested:
                self.server.congested.append(self)
            if self.on_congested is not None:
                self.on_congested(self)
        if unsent > MESH_HARD_LIMIT_FACTOR * self.max_buffer:
            # Only senders that cannot be paused (the ASGI WebSocket bridge) get this far: shed them.
            c.drops[DROP_QUEUE_TAIL] += frames
            c.drop_bytes[DROP_QUEUE_TAIL] += nbytes
            return 0
        c.forwarded_out += frames
        self.transport.write(out)
        return 0

    def resume(self) -> None:
        """The link drained (or is going away): read the senders it paused again."""
        self.congested = False
        paused, self.paused = self.paused, []
        for conn in paused:
            (<Conn>conn).resume_reading()

    def unsent(self) -> int:
        """Bytes the link's transport holds, not yet taken by the socket."""
        return 0 if self.closed else self.transport.get_write_buffer_size()

    def send(self, src: bytes, dst: bytes, packet: bytes) -> None:
        """Forward one packet from Python (tests, tools); the hot path calls the C method."""
        if len(src) != P.KEY_LEN or len(dst) != P.KEY_LEN or len(packet) > P.MAX_PACKET_SIZE:
            raise ValueError("keys must be 32 bytes and packets at most 64 KiB")
        self.forward(None, <const unsigned char*>PyBytes_AS_STRING(src), <const unsigned char*>PyBytes_AS_STRING(dst),
                     <const unsigned char*>PyBytes_AS_STRING(packet), len(packet))
        self.server.flush_soon()

    def close(self) -> None:
        """Stop forwarding through this link (its keys must be removed by the caller)."""
        self.closed = True
        self.olen = 0
        self.server.counters.drops[DROP_GONE] += self.pending_frames
        self.server.counters.drop_bytes[DROP_GONE] += self.pending_bytes
        self.pending_frames = self.pending_bytes = 0
        self.resume()

    def __repr__(self):
        return f"<Forwarder {self.name}>"


@cython.final
cdef class ClientSet:
    """All live connections of one key; the last one to send is the active one (tailscale#2745)."""
    cdef bytes key
    cdef list conns           # ordered by recency: the last is active
    cdef Conn active


@cython.final
cdef class Conn(Writer):
    """One DERP client connection: an asyncio protocol that owns its transport after the upgrade."""

    cdef readonly bytes key
    cdef readonly str remote_ip
    cdef readonly int remote_port
    cdef readonly bint can_mesh, is_prober, not_ideal, preferred, websocket
    cdef bytes addr18                    # remote address as 16-byte IPv6 + port, for PeerPresent
    cdef int state
    cdef bint paused, watcher, ws_closing
    cdef readonly bint read_paused      # by a congested mesh link (Forwarder.paused)
    cdef double paused_at, next_keepalive, write_timeout
    cdef object hs_timer
    cdef ClientSet cset
    # incoming DERP frame reassembly
    cdef unsigned char* ibuf
    cdef Py_ssize_t ilen, icap, ineed, skip
    # bounded queues used only while the transport pushes back
    cdef object queue, disco_queue
    # NotHere limiter: 1/s, burst 3
    cdef double nh_tokens, nh_last
    # route cache: the last ROUTE_CACHE destinations looked up (a mesh link interleaves many)
    cdef unsigned char rc_key[ROUTE_CACHE][32]
    cdef list rc_target
    cdef unsigned long long rc_gen
    cdef int rc_next
    # who last sent to this connection, so "heard from" is recorded once per source, not per packet
    cdef unsigned char hc_key[32]
    cdef unsigned long long hc_gen
    # incoming WebSocket framing
    cdef unsigned char ws_hdr[14]
    cdef int ws_hlen, ws_op, ws_moff
    cdef bint ws_in_payload, ws_fin
    cdef unsigned long long ws_rem
    cdef unsigned char ws_mask[4]
    cdef bytearray ws_ctrl

    def __cinit__(self, RelayServer server, transport, bint websocket, str remote_ip, int remote_port, bint not_ideal):
        self.server = server
        self.transport = transport
        self.ws = websocket
        self.websocket = websocket
        self.remote_ip = remote_ip
        self.remote_port = remote_port
        self.not_ideal = not_ideal
        self.state = ST_HANDSHAKE
        self.nh_tokens = 3.0
        self.write_timeout = server.write_timeout

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        cdef const unsigned char[:] view
        if self.state == ST_CLOSED:
            return
        if type(data) is bytes:
            self.consume(<const unsigned char*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
        else:
            view = data
            if view.shape[0]:
                self.consume(&view[0], view.shape[0])

    # uvloop and asyncio read straight into the relay's shared buffer (no bytes object per read)
    def get_buffer(self, sizehint):
        return self.server.read_view

    def buffer_updated(self, Py_ssize_t nbytes):
        if self.state != ST_CLOSED and nbytes > 0:
            self.consume(self.server.read_buf, nbytes)

    cdef int consume(self, const unsigned char* p, Py_ssize_t n) except -1:
        if self.cset is not None and self.cset.active is not self:
            self.server.make_active(self)
        try:
            if self.ws:
                self.ws_feed(p, n)
            else:
                self.feed(p, n)
        except ProtocolViolation as exc:
            self.close(str(exc), True)
        finally:
            self.server.flush_dirty()
        return 0

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        if exc is None:
            self.close("client disconnected", False)
        else:
            self.close(f"connection lost: {exc}", False)
        self.transport = None

    cdef bint pause_reading(self):
        """Stop reading this connection (a mesh link it sends to is congested); False if we cannot."""
        if self.state == ST_CLOSED or self.transport is None:
            return False
        try:
            self.transport.pause_reading()
        except (NotImplementedError, AttributeError, RuntimeError):
            return False  # a bridge transport: its packets are shed past the link's hard limit
        self.read_paused = True
        return True

    cdef void resume_reading(self):
        if not self.read_paused:
            return
        self.read_paused = False
        if self.state != ST_CLOSED and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def pause_writing(self):
        self.paused = True
        self.paused_at = monotonic()

    def resume_writing(self):
        self.paused = False
        self.drain_queues()
        self.server.flush_dirty()

    # -- lifecycle --------------------------------------------------------------------

    cdef start(self, bytes prefix, bytes pending):
        """Send ``prefix`` (the HTTP response, if any) with ServerKey, then read what arrived early."""
        server = self.server
        self.transport.set_write_buffer_limits(server.high_water, server.high_water // 4)
        self.hs_timer = server.loop.call_later(server.handshake_timeout, self.handshake_timeout)
        if self.ws:
            if prefix:
                self.transport.write(prefix)
            self.put_frame(P.FRAME_SERVER_KEY, <const unsigned char*>P.DERP_MAGIC, P.MAGIC_LEN,
                           <const unsigned char*>PyBytes_AS_STRING(server.public_key), P.KEY_LEN)
            self.flush()
        else:
            self.transport.write(prefix + server.server_key_frame)
        if pending:
            self.data_received(pending)

    def handshake_timeout(self):
        if self.state == ST_HANDSHAKE:
            self.server.counters.handshake_failures += 1
            self.close("handshake not completed within %.0f s" % self.server.handshake_timeout, True)

    cpdef close(self, str reason, bint error=False):
        """Close the connection, logging ``reason``; safe to call more than once."""
        cdef int was = self.state
        if was == ST_CLOSED:
            return
        self.state = ST_CLOSED
        if self.hs_timer is not None:
            self.hs_timer.cancel()
            self.hs_timer = None
        if error:
            self.server.counters.protocol_errors += 1
            log.warning("derp %s:%d %s: closed: %s", self.remote_ip, self.remote_port, self.short_key(), reason)
        else:
            log.debug("derp %s:%d %s: closed: %s", self.remote_ip, self.remote_port, self.short_key(), reason)
        if was == ST_ACTIVE:
            self.server.unregister(self)
        self.drop_queued(DROP_GONE)
        if self.transport is not None:
            if error:
                self.transport.abort()
            else:
                if self.olen:
                    self.flush()
                self.transport.close()
        self.olen = 0
        self.rc_target = None
        if self.ibuf != NULL:
            free(self.ibuf)
            self.ibuf = NULL
            self.icap = self.ilen = 0

    def short_key(self) -> str:
        if self.key is None:
            return "[handshake]"
        import base64
        return "[" + base64.b64encode(self.key).decode()[:5] + "]"

    def __dealloc__(self):
        if self.ibuf != NULL:
            free(self.ibuf)

    # -- incoming DERP frames ---------------------------------------------------------

    cdef int check_header(self, int ftype, Py_ssize_t length) except -1:
        """0: buffer and handle this frame; 1: skip its payload. Raises for violations."""
        if self.state == ST_HANDSHAKE:
            if ftype != P.FRAME_CLIENT_INFO:
                raise ProtocolViolation(f"first frame must be ClientInfo, got type 0x{ftype:02x}")
            if length < P.CLIENT_INFO_MIN or length > P.CLIENT_INFO_MAX:
                raise ProtocolViolation(f"ClientInfo frame of {length} bytes (allowed {P.CLIENT_INFO_MIN}..{P.CLIENT_INFO_MAX})")
            return 0
        if ftype == P.FRAME_SEND_PACKET:
            if length < P.KEY_LEN or length > P.KEY_LEN + P.MAX_PACKET_SIZE:
                raise ProtocolViolation(f"SendPacket frame of {length} bytes (packet limit {P.MAX_PACKET_SIZE})")
        elif ftype == P.FRAME_FORWARD_PACKET:
            if not self.can_mesh:
                raise ProtocolViolation("ForwardPacket from a client without the mesh key")
            if length < 2 * P.KEY_LEN or length > 2 * P.KEY_LEN + P.MAX_PACKET_SIZE:
                raise ProtocolViolation(f"ForwardPacket frame of {length} bytes (packet limit {P.MAX_PACKET_SIZE})")
        elif ftype == P.FRAME_PING:
            if length < P.PING_MIN or length > P.PING_MAX:
                raise ProtocolViolation(f"Ping frame of {length} bytes (allowed {P.PING_MIN}..{P.PING_MAX})")
        elif ftype == P.FRAME_NOTE_PREFERRED:
            if length != 1:
                raise ProtocolViolation(f"NotePreferred frame of {length} bytes (must be 1)")
        elif ftype == P.FRAME_WATCH_CONNS:
            if not self.can_mesh:
                raise ProtocolViolation("WatchConns from a client without the mesh key")
            if length != 0:
                raise ProtocolViolation(f"WatchConns frame of {length} bytes (must be 0)")
        elif ftype == P.FRAME_CLOSE_PEER:
            if not self.can_mesh:
                raise ProtocolViolation("ClosePeer from a client without the mesh key")
            if length != P.KEY_LEN:
                raise ProtocolViolation(f"ClosePeer frame of {length} bytes (must be 32)")
        else:
            return 1  # unknown or client-bound types are skipped, as Go servers do
        return 0

    cdef int ibuf_append(self, const unsigned char* p, Py_ssize_t n) except -1:
        cdef Py_ssize_t cap
        cdef unsigned char* nb
        if self.ilen + n > self.icap:
            cap = max(self.ilen + n, <Py_ssize_t>P.FRAME_HEADER_LEN + 256)
            nb = <unsigned char*>realloc(self.ibuf, cap)
            if nb == NULL:
                raise MemoryError()
            self.ibuf = nb
            self.icap = cap
        memcpy(self.ibuf + self.ilen, p, n)
        self.ilen += n
        return 0

    cdef int feed(self, const unsigned char* p, Py_ssize_t n) except -1:
        """Consume DERP stream bytes: whole frames straight from ``p``, partial ones via ``ibuf``."""
        cdef Py_ssize_t k, length
        cdef int ftype, r
        while n > 0 and self.state != ST_CLOSED:
            if self.skip:
                k = min(self.skip, n)
                self.skip -= k
                p += k
                n -= k
                continue
            if self.ilen:
                if self.ilen < P.FRAME_HEADER_LEN:
                    k = min(<Py_ssize_t>P.FRAME_HEADER_LEN - self.ilen, n)
                    self.ibuf_append(p, k)
                    p += k
                    n -= k
                    if self.ilen < P.FRAME_HEADER_LEN:
                        return 0
                    length = P.read_be32(self.ibuf + 1)
                    if self.check_header(self.ibuf[0], length):
                        self.ilen = 0
                        self.skip = length
                        continue
                    self.ineed = P.FRAME_HEADER_LEN + length
                k = min(self.ineed - self.ilen, n)
                if k:
                    self.ibuf_append(p, k)
                    p += k
                    n -= k
                if self.ilen < self.ineed:
                    return 0
                self.ilen = 0
                self.on_frame(self.ibuf[0], self.ibuf + P.FRAME_HEADER_LEN, self.ineed - P.FRAME_HEADER_LEN)
                if self.icap > 2 * P.FRAME_HEADER_LEN + P.CLIENT_INFO_MAX // 4:
                    free(self.ibuf)  # a big reassembly buffer is not kept for an idle connection
                    self.ibuf = NULL
                    self.icap = 0
                continue
            if n < P.FRAME_HEADER_LEN:
                self.ibuf_append(p, n)
                return 0
            ftype = p[0]
            length = P.read_be32(p + 1)
            if self.check_header(ftype, length):
                self.skip = length
                p += P.FRAME_HEADER_LEN
                n -= P.FRAME_HEADER_LEN
                continue
            if n - P.FRAME_HEADER_LEN >= length:
                self.on_frame(ftype, p + P.FRAME_HEADER_LEN, length)
                p += P.FRAME_HEADER_LEN + length
                n -= P.FRAME_HEADER_LEN + length
                continue
            self.ineed = P.FRAME_HEADER_LEN + length
            self.ibuf_append(p, n)
            return 0
        return 0

    cdef int on_frame(self, int ftype, const unsigned char* p, Py_ssize_t n) except -1:
        cdef RelayServer server = self.server
        cdef Counters c = server.counters
        cdef object target
        if ftype == P.FRAME_SEND_PACKET:
            c.packets_in += 1
            c.bytes_in += n - P.KEY_LEN
            target = self.route(p, True)
            if target is None:
                self.drop_unknown(p, p + P.KEY_LEN, n - P.KEY_LEN, DROP_UNKNOWN_DEST)
            elif type(target) is Conn:
                (<Conn>target).enqueue(<const unsigned char*>PyBytes_AS_STRING(self.key), p + P.KEY_LEN, n - P.KEY_LEN)
            else:
                (<Forwarder>target).forward(self, <const unsigned char*>PyBytes_AS_STRING(self.key), p,
                                            p + P.KEY_LEN, n - P.KEY_LEN)
        elif ftype == P.FRAME_FORWARD_PACKET:
            c.forwarded_in += 1
            c.bytes_in += n - 2 * P.KEY_LEN
            target = self.route(p + P.KEY_LEN, False)
            if type(target) is Conn:
                (<Conn>target).heard_from_ptr(p)
                (<Conn>target).enqueue(p, p + 2 * P.KEY_LEN, n - 2 * P.KEY_LEN)
            else:
                # Never re-forward: packets travel at most one mesh hop.
                self.drop_unknown(p + P.KEY_LEN, p + 2 * P.KEY_LEN, n - 2 * P.KEY_LEN, DROP_UNKNOWN_DEST_ON_FWD)
        elif ftype == P.FRAME_PING:
            c.pings += 1
            c.pongs += 1
            self.put_frame(P.FRAME_PONG, p, 8, NULL, 0)
        elif ftype == P.FRAME_NOTE_PREFERRED:
            if p[0] and not self.preferred:
                c.home_conns_total += 1
            self.preferred = p[0] != 0
        elif ftype == P.FRAME_CLIENT_INFO:
            self.finish_handshake(PyBytes_FromStringAndSize(<const char*>p, n))
        elif ftype == P.FRAME_WATCH_CONNS:
            server.add_watcher(self)
        elif ftype == P.FRAME_CLOSE_PEER:
            server.close_peer(PyBytes_FromStringAndSize(<const char*>p, P.KEY_LEN))
        return 0

    cdef object route(self, const unsigned char* dst, bint note):
        """The local Conn or Forwarder for ``dst``, or None; recent answers are cached per sender."""
        cdef RelayServer server = self.server
        cdef PyObject* found
        cdef int i
        if self.rc_gen == server.gen:
            for i in range(ROUTE_CACHE):
                if memcmp(dst, self.rc_key[i], P.KEY_LEN) == 0:
                    return self.rc_target[i]
        else:
            self.rc_gen = server.gen
            self.rc_target = [None] * ROUTE_CACHE
            memset(self.rc_key, 0xff, sizeof(self.rc_key))  # an all-ones key is never a real destination
        key = PyBytes_FromStringAndSize(<const char*>dst, P.KEY_LEN)
        found = PyDict_GetItem(server.routes, key)
        target = <object>found if found != NULL else None
        i = self.rc_next
        self.rc_next = (i + 1) % ROUTE_CACHE
        memcpy(self.rc_key[i], dst, P.KEY_LEN)
        self.rc_target[i] = target
        if note and type(target) is Conn:
            (<Conn>target).heard_from(self.key)
        return target

    cdef inline int heard_from(self, bytes src) except -1:
        """Remember that ``src`` sent to us, for PeerGone when it leaves the region."""
        cdef const unsigned char* k = <const unsigned char*>PyBytes_AS_STRING(src)
        if self.hc_gen == self.server.gen and memcmp(self.hc_key, k, P.KEY_LEN) == 0:
            return 0
        self.server.note_heard(src, self)
        memcpy(self.hc_key, k, P.KEY_LEN)
        self.hc_gen = self.server.gen
        return 0

    cdef inline int heard_from_ptr(self, const unsigned char* src) except -1:
        if self.hc_gen == self.server.gen and memcmp(self.hc_key, src, P.KEY_LEN) == 0:
            return 0
        return self.heard_from(PyBytes_FromStringAndSize(<const char*>src, P.KEY_LEN))

    cdef int drop_unknown(self, const unsigned char* dst, const unsigned char* pkt, Py_ssize_t n, int reason) except -1:
        cdef Counters c = self.server.counters
        cdef double now, tokens
        c.drops[reason] += 1
        c.drop_bytes[reason] += n
        if not looks_like_disco(pkt, n):
            return 0
        now = monotonic()
        tokens = min(3.0, self.nh_tokens + (now - self.nh_last))
        self.nh_last = now
        if tokens < 1.0:
            self.nh_tokens = tokens
            return 0
        self.nh_tokens = tokens - 1.0
        cdef unsigned char reason_byte = P.PEER_GONE_NOT_HERE
        c.peer_gone_not_here += 1
        self.put_frame(P.FRAME_PEER_GONE, dst, P.KEY_LEN, &reason_byte, 1)
        return 0

    # -- outgoing packets -------------------------------------------------------------

    cdef int enqueue(self, const unsigned char* src, const unsigned char* pkt, Py_ssize_t n) except -1:
        cdef Counters c = self.server.counters
        cdef bytes frame
        cdef unsigned char* f
        if self.state != ST_ACTIVE:
            c.drops[DROP_GONE] += 1
            c.drop_bytes[DROP_GONE] += n
            return 0
        if not self.paused:
            self.reserve(P.FRAME_HEADER_LEN + P.KEY_LEN + n)
            f = self.obuf + self.olen
            P.write_header(f, P.FRAME_RECV_PACKET, <unsigned int>(P.KEY_LEN + n))
            memcpy(f + P.FRAME_HEADER_LEN, src, P.KEY_LEN)
            memcpy(f + P.FRAME_HEADER_LEN + P.KEY_LEN, pkt, n)
            self.olen += P.FRAME_HEADER_LEN + P.KEY_LEN + n
            c.packets_out += 1
            c.bytes_out += n
            self.mark_dirty()
            return 0
        # The transport pushes back: hold the frame in a bounded queue, dropping the oldest.
        frame = PyBytes_FromStringAndSize(NULL, P.FRAME_HEADER_LEN + P.KEY_LEN + n)
        f = <unsigned char*>PyBytes_AS_STRING(frame)
        P.write_header(f, P.FRAME_RECV_PACKET, <unsigned int>(P.KEY_LEN + n))
        memcpy(f + P.FRAME_HEADER_LEN, src, P.KEY_LEN)
        memcpy(f + P.FRAME_HEADER_LEN + P.KEY_LEN, pkt, n)
        queue = self.disco_queue if looks_like_disco(pkt, n) else self.queue
        if queue is None:
            queue = deque()
            if looks_like_disco(pkt, n):
                self.disco_queue = queue
            else:
                self.queue = queue
        if len(queue) >= self.server.queue_depth:
            if self.server.queue_depth == 0:
                c.drops[DROP_QUEUE_TAIL] += 1
                c.drop_bytes[DROP_QUEUE_TAIL] += n
                return 0
            old = queue.popleft()
            c.drops[DROP_QUEUE_HEAD] += 1
            c.drop_bytes[DROP_QUEUE_HEAD] += len(old) - P.FRAME_HEADER_LEN - P.KEY_LEN
        queue.append(frame)
        return 0

    cdef int drain_queues(self) except -1:
        cdef Counters c = self.server.counters
        cdef bytes frame
        cdef Py_ssize_t n
        for queue in (self.disco_queue, self.queue):
            if not queue or self.state != ST_ACTIVE:
                continue
            while queue:
                frame = queue.popleft()
                n = PyBytes_GET_SIZE(frame)
                self.reserve(n)
                memcpy(self.obuf + self.olen, PyBytes_AS_STRING(frame), n)
                self.olen += n
                c.packets_out += 1
                c.bytes_out += n - P.FRAME_HEADER_LEN - P.KEY_LEN
            self.mark_dirty()
        return 0

    cdef void drop_queued(self, int reason):
        cdef Counters c = self.server.counters
        for queue in (self.disco_queue, self.queue):
            if queue:
                for frame in queue:
                    c.drops[reason] += 1
                    c.drop_bytes[reason] += len(frame) - P.FRAME_HEADER_LEN - P.KEY_LEN
                queue.clear()

    cdef int put_peer_gone(self, bytes key, unsigned char reason) except -1:
        self.put_frame(P.FRAME_PEER_GONE, <const unsigned char*>PyBytes_AS_STRING(key), P.KEY_LEN, &reason, 1)
        if reason == P.PEER_GONE_DISCONNECTED:
            self.server.counters.peer_gone_disconnected += 1
        return 0

    cdef int put_peer_present(self, Conn who) except -1:
        cdef unsigned char tail[19]
        cdef unsigned char flags = 0
        memcpy(tail, PyBytes_AS_STRING(who.addr18), 18)
        if who.can_mesh:
            flags |= P.PEER_PRESENT_IS_MESH_PEER
        if who.is_prober:
            flags |= P.PEER_PRESENT_IS_PROBER
        if who.not_ideal:
            flags |= P.PEER_PRESENT_NOT_IDEAL
        tail[18] = flags if flags else P.PEER_PRESENT_IS_REGULAR
        self.put_frame(P.FRAME_PEER_PRESENT, <const unsigned char*>PyBytes_AS_STRING(who.key), P.KEY_LEN, tail, 19)
        return 0

    # -- handshake (Python, once per connection) --------------------------------------

    cdef int finish_handshake(self, bytes payload) except -1:
        server = self.server
        try:
            key, info, can_mesh, server_info = server.handshake(payload)
        except Exception as exc:
            server.counters.handshake_failures += 1
            raise ProtocolViolation(f"handshake refused: {exc}") from None
        if self.hs_timer is not None:
            self.hs_timer.cancel()
            self.hs_timer = None
        self.key = key
        self.can_mesh = can_mesh
        self.is_prober = bool(info.get("isprober"))
        if can_mesh:
            self.write_timeout = server.mesh_write_timeout
        self.addr18 = address18(self.remote_ip, self.remote_port)
        # ServerInfo is always the first frame after ServerKey: write it before anyone can enqueue.
        self.put_frame(P.FRAME_SERVER_INFO, <const unsigned char*>PyBytes_AS_STRING(server_info),
                       PyBytes_GET_SIZE(server_info), NULL, 0)
        self.state = ST_ACTIVE
        self.next_keepalive = monotonic() + server.keepalive + random.random() * server.keepalive_jitter
        server.register(self)
        return 0

    # -- WebSocket framing (client frames are masked; ours are not) -------------------

    cdef int ws_feed(self, const unsigned char* p, Py_ssize_t n) except -1:
        cdef Py_ssize_t k, need
        cdef unsigned long long length
        cdef unsigned char* scratch = self.server.scratch
        cdef int op
        while n > 0 and self.state != ST_CLOSED:
            if not self.ws_in_payload:
                need = 2
                if self.ws_hlen >= 2:
                    need = 2 + (2 if (self.ws_hdr[1] & 0x7f) == 126 else (8 if (self.ws_hdr[1] & 0x7f) == 127 else 0)) + 4
                k = min(need - self.ws_hlen, n)
                memcpy(self.ws_hdr + self.ws_hlen, p, k)
                self.ws_hlen += k
                p += k
                n -= k
                if self.ws_hlen < need or need == 2:
                    continue
                if not (self.ws_hdr[1] & 0x80):
                    raise ProtocolViolation("unmasked WebSocket frame from client")
                length = self.ws_hdr[1] & 0x7f
                if length == 126:
                    length = (<unsigned long long>self.ws_hdr[2] << 8) | self.ws_hdr[3]
                elif length == 127:
                    length = 0
                    for k in range(8):
                        length = (length << 8) | self.ws_hdr[2 + k]
                memcpy(self.ws_mask, self.ws_hdr + need - 4, 4)
                op = self.ws_hdr[0] & 0x0f
                self.ws_fin = (self.ws_hdr[0] & 0x80) != 0
                self.ws_hlen = 0
                if op == WS_OP_TEXT:
                    self.ws_close_with(1003, b"derp: binary messages only")
                    raise ProtocolViolation("text WebSocket message (DERP needs binary)")
                if op >= 0x8:
                    if op not in (WS_OP_CLOSE, WS_OP_PING, WS_OP_PONG) or length > 125 or not self.ws_fin:
                        raise ProtocolViolation(f"bad WebSocket control frame (opcode {op}, {length} bytes)")
                    self.ws_ctrl = bytearray()
                elif op not in (WS_OP_CONT, WS_OP_BINARY):
                    raise ProtocolViolation(f"unknown WebSocket opcode {op}")
                self.ws_op = op
                self.ws_rem = length
                self.ws_moff = 0
                self.ws_in_payload = True
                if length == 0 and op >= 0x8:
                    self.ws_in_payload = False
                    self.ws_control()
                elif length == 0:
                    self.ws_in_payload = False
                continue
            k = <Py_ssize_t>min(<unsigned long long>n, self.ws_rem, <unsigned long long>SCRATCH_SIZE)
            ws_unmask(scratch, p, k, self.ws_mask, self.ws_moff)
            self.ws_moff = (self.ws_moff + k) & 3
            self.ws_rem -= k
            p += k
            n -= k
            if self.ws_op >= 0x8:
                self.ws_ctrl += (<char*>scratch)[:k]
            else:
                # Message boundaries mean nothing: the payload is just more of the DERP stream.
                self.feed(scratch, k)
            if self.ws_rem == 0:
                self.ws_in_payload = False
                if self.ws_op >= 0x8:
                    self.ws_control()
        return 0

    cdef int ws_control(self) except -1:
        cdef bytes body = bytes(self.ws_ctrl) if self.ws_ctrl is not None else b""
        cdef unsigned char hdr[10]
        cdef Py_ssize_t h
        self.ws_ctrl = None
        if self.ws_op == WS_OP_PING:
            if self.olen:
                self.flush()
            h = ws_put_header(hdr, WS_OP_PONG, len(body))
            self.transport.write((<char*>hdr)[:h] + body)
        elif self.ws_op == WS_OP_CLOSE:
            self.ws_close_with(int.from_bytes(body[:2], "big") if len(body) >= 2 else 1000, b"")
            self.close("WebSocket closed by client", False)
        return 0

    cdef void ws_close_with(self, int code, bytes reason):
        cdef unsigned char hdr[10]
        cdef Py_ssize_t h
        if self.ws_closing or self.transport is None:
            return
        self.ws_closing = True
        body = code.to_bytes(2, "big") + reason[:120]
        h = ws_put_header(hdr, WS_OP_CLOSE, len(body))
        if self.olen:
            self.flush()
        self.transport.write((<char*>hdr)[:h] + body)

    # -- Python view --------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self.state == ST_ACTIVE

    @property
    def closed(self) -> bool:
        return self.state == ST_CLOSED

    def __repr__(self):
        return f"<Conn {self.short_key()} {self.remote_ip}:{self.remote_port}>"


def address18(str ip, int port) -> bytes:
    """``ip`` as 16 bytes (IPv4 mapped into IPv6) plus a big-endian port; zeros if not an IP."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return bytes(18)
    if addr.version == 4:
        addr = ipaddress.IPv6Address("::ffff:" + str(addr))
    return addr.packed + port.to_bytes(2, "big")


@cython.final
cdef class RelayServer:
    """The routing table and connection registry of one relay.

    ``handshake(payload) -> (client_key, client_info, can_mesh, server_info_payload)`` receives the
    ClientInfo frame's payload and raises to refuse the client.
    """

    cdef readonly bytes public_key
    cdef readonly bytes server_key_frame
    cdef readonly Counters counters
    cdef public object handshake
    cdef public object loop
    cdef public double keepalive, keepalive_jitter, write_timeout, mesh_write_timeout, handshake_timeout
    cdef public Py_ssize_t queue_depth, high_water
    cdef dict routes            # key -> active local Conn, else preferred Forwarder
    cdef dict clients           # key -> ClientSet of local connections
    cdef dict mesh              # key -> [Forwarder, ...], first registered preferred
    cdef dict heard             # source key -> {Conn: None} that received packets from it
    cdef dict conns             # Conn -> None for every registered connection
    cdef list watchers
    cdef list dirty
    cdef list congested         # Forwarders pushing back on their senders
    cdef unsigned long long gen
    cdef unsigned char* scratch
    cdef bytearray read_bytes
    cdef unsigned char* read_buf
    cdef object read_view
    cdef object tick_handle
    cdef bint flush_scheduled

    def __cinit__(self, bytes public_key not None, handshake, *, double keepalive=60.0, double keepalive_jitter=5.0,
                  Py_ssize_t queue_depth=32, double write_timeout=2.0, double mesh_write_timeout=30.0,
                  double handshake_timeout=10.0, Py_ssize_t high_water=256 * 1024):
        if len(public_key) != P.KEY_LEN:
            raise ValueError("server public key must be 32 bytes")
        self.public_key = public_key
        self.server_key_frame = (bytes([P.FRAME_SERVER_KEY, 0, 0, 0, P.MAGIC_LEN + P.KEY_LEN])
                                 + PyBytes_FromStringAndSize(P.DERP_MAGIC, P.MAGIC_LEN) + public_key)
        self.handshake = handshake
        self.counters = Counters()
        self.keepalive = keepalive
        self.keepalive_jitter = keepalive_jitter
        self.queue_depth = queue_depth
        self.write_timeout = write_timeout
        self.mesh_write_timeout = mesh_write_timeout
        self.handshake_timeout = handshake_timeout
        self.high_water = high_water
        self.routes = {}
        self.clients = {}
        self.mesh = {}
        self.heard = {}
        self.conns = {}
        self.watchers = []
        self.dirty = []
        self.congested = []
        self.gen = 1
        self.scratch = <unsigned char*>malloc(SCRATCH_SIZE)
        if self.scratch == NULL:
            raise MemoryError()
        # One read buffer for every connection: reads are consumed before the next one starts.
        self.read_bytes = bytearray(READ_BUFFER_SIZE)
        self.read_buf = <unsigned char*>PyByteArray_AS_STRING(self.read_bytes)
        self.read_view = memoryview(self.read_bytes)

    def __dealloc__(self):
        if self.scratch != NULL:
            free(self.scratch)

    # -- event loop hooks -------------------------------------------------------------

    def start(self, loop=None) -> None:
        """Start the keepalive / write-timeout ticker on ``loop`` (default: the running loop)."""
        import asyncio
        self.loop = loop or asyncio.get_running_loop()
        if self.tick_handle is None:
            self.tick_handle = self.loop.call_later(self.tick_interval(), self.tick)

    cdef double tick_interval(self):
        return max(0.01, min(1.0, self.keepalive / 4))

    def tick(self):
        """Once a second: keepalives, write timeouts of stuck receivers, idle buffers."""
        cdef double now = monotonic()
        cdef Conn conn
        for conn in list(self.conns):
            if conn.paused and now - conn.paused_at > conn.write_timeout:
                self.counters.drops[DROP_WRITE_ERROR] += 1
                conn.close("write timeout: receiver stopped reading for %.0f s" % conn.write_timeout, True)
                continue
            if now >= conn.next_keepalive:
                conn.next_keepalive = now + self.keepalive + random.random() * self.keepalive_jitter
                self.counters.keepalives += 1
                conn.put_frame(P.FRAME_KEEP_ALIVE, NULL, 0, NULL, 0)
            elif not conn.dirty:
                conn.release_buffer()
        if self.congested:
            self.check_congested()
        self.flush_dirty()
        if self.tick_handle is not None:
            self.tick_handle = self.loop.call_later(self.tick_interval(), self.tick)

    cdef void check_congested(self):
        """Resume senders of links that drained without telling us (no on_congested handler)."""
        cdef Forwarder fwd
        still = []
        for fwd in self.congested:
            if not fwd.congested:
                continue
            if fwd.closed or fwd.transport.get_write_buffer_size() <= fwd.max_buffer // 4:
                fwd.resume()
            else:
                still.append(fwd)
        self.congested = still

    cdef int flush_dirty(self) except -1:
        cdef list batch
        cdef Writer w
        while self.dirty:
            batch = self.dirty
            self.dirty = []
            for w in batch:
                w.dirty = False
                w.flush()
        return 0

    def flush_soon(self) -> None:
        """Flush buffered output on the next loop turn (for writes made outside data_received)."""
        if not self.flush_scheduled and self.loop is not None:
            self.flush_scheduled = True
            self.loop.call_soon(self._flush_cb)

    def _flush_cb(self):
        self.flush_scheduled = False
        self.flush_dirty()

    def accept(self, transport, bytes prefix=b"", bytes pending=b"", *, bint websocket=False,
               remote=None, bint not_ideal=False) -> Conn:
        """Take over ``transport`` after the HTTP upgrade: send ``prefix`` + ServerKey, then read."""
        if self.loop is None:
            import asyncio
            self.loop = asyncio.get_running_loop()
        ip, port = (remote or ("", 0))[:2]
        conn = Conn(self, transport, websocket, str(ip), int(port or 0), not_ideal)
        self.counters.accepts += 1
        transport.set_protocol(conn)
        try:
            # uvloop picks its read callbacks when reading starts: restart reading to use get_buffer
            transport.pause_reading()
            transport.resume_reading()
        except NotImplementedError:
            pass  # a transport that pushes data to us (the ASGI WebSocket bridge)
        conn.start(prefix, pending)
        self.flush_dirty()
        return conn

    def close_all(self, restarting=None) -> None:
        """Close every connection and stop the ticker.

        With ``restarting=(reconnect_in_ms, try_for_ms)`` (a graceful stop), every client that
        finished its handshake first gets a Restarting frame, so it reconnects at once elsewhere.
        """
        cdef bytes payload = None
        cdef Conn c
        if self.tick_handle is not None:
            self.tick_handle.cancel()
            self.tick_handle = None
        if restarting is not None:
            payload = int(restarting[0]).to_bytes(4, "big") + int(restarting[1]).to_bytes(4, "big")
        for conn in list(self.conns):
            c = conn
            if payload is not None and c.state == ST_ACTIVE:
                c.put_frame(P.FRAME_RESTARTING, <const unsigned char*>PyBytes_AS_STRING(payload), 8, NULL, 0)
            c.close("server shutting down", False)

    # -- registry -----------------------------------------------------------------------

    cdef int note_heard(self, bytes src, Conn dst) except -1:
        cdef PyObject* found = PyDict_GetItem(self.heard, src)
        if found == NULL:
            self.heard[src] = {dst: None}
        else:
            (<dict>found)[dst] = None
        return 0

    cdef int register(self, Conn conn) except -1:
        cdef ClientSet cs = self.clients.get(conn.key)
        if cs is None:
            cs = ClientSet()
            cs.key = conn.key
            cs.conns = []
            self.clients[conn.key] = cs
        elif cs.conns:
            log.info("derp %s: duplicate connection for key (%d live)", conn.short_key(), len(cs.conns) + 1)
        cs.conns.append(conn)
        cs.active = conn
        conn.cset = cs
        self.conns[conn] = None
        self.routes[conn.key] = conn
        self.gen += 1
        for w in self.watchers:
            if w is not conn:
                (<Conn>w).put_peer_present(conn)
        return 0

    cdef int make_active(self, Conn conn) except -1:
        cdef ClientSet cs = conn.cset
        if conn.state != ST_ACTIVE:
            return 0
        cs.conns.remove(conn)
        cs.conns.append(conn)
        cs.active = conn
        self.routes[conn.key] = conn
        self.gen += 1
        return 0

    cdef int unregister(self, Conn conn) except -1:
        cdef ClientSet cs = conn.cset
        conn.cset = None
        self.conns.pop(conn, None)
        if conn.watcher:
            conn.watcher = False
            self.watchers.remove(conn)
        if cs is None:
            return 0
        cs.conns.remove(conn)
        self.gen += 1
        if cs.conns:
            if cs.active is conn:
                cs.active = cs.conns[len(cs.conns) - 1]
                self.routes[cs.key] = cs.active
            return 0
        del self.clients[cs.key]
        for w in self.watchers:
            (<Conn>w).put_peer_gone(cs.key, P.PEER_GONE_DISCONNECTED)
        fwds = self.mesh.get(cs.key)
        if fwds:
            self.routes[cs.key] = fwds[0]
        else:
            del self.routes[cs.key]
            self.left_region(cs.key)
        self.flush_soon()
        return 0

    cdef int left_region(self, bytes key) except -1:
        """``key`` is reachable neither here nor via the mesh: tell everyone who heard from it."""
        receivers = self.heard.pop(key, None)
        if receivers:
            for r in receivers:
                if (<Conn>r).state == ST_ACTIVE:
                    (<Conn>r).put_peer_gone(key, P.PEER_GONE_DISCONNECTED)
        return 0

    cdef int add_watcher(self, Conn conn) except -1:
        if conn.key == self.public_key:
            log.info("derp %s: ignoring WatchConns from ourselves (self-mesh)", conn.short_key())
            return 0
        if conn.watcher:
            return 0
        for cs in self.clients.values():
            if (<ClientSet>cs).active is not conn:
                conn.put_peer_present((<ClientSet>cs).active)
        conn.watcher = True
        self.watchers.append(conn)
        return 0

    def close_peer(self, bytes key) -> int:
        """Close every local connection of ``key``; returns how many were closed."""
        cs = self.clients.get(key)
        if cs is None:
            log.info("ClosePeer for a key with no local connection")
            return 0
        conns = list((<ClientSet>cs).conns)
        for conn in conns:
            (<Conn>conn).close("closed by mesh peer request (ClosePeer)", False)
        return len(conns)

    def add_forwarder(self, bytes key, Forwarder fwd) -> None:
        """A mesh peer reports ``key`` present: route to it unless ``key`` is connected here."""
        fwds = self.mesh.get(key)
        if fwds is None:
            self.mesh[key] = [fwd]
        elif fwd in fwds:
            return
        else:
            fwds.append(fwd)
        if key not in self.clients and key not in self.routes:
            self.routes[key] = fwd
        self.gen += 1

    def remove_forwarder(self, bytes key, Forwarder fwd) -> bool:
        """Forget ``fwd`` for ``key``; returns False if it was not registered for it."""
        fwds = self.mesh.get(key)
        if not fwds or fwd not in fwds:
            return False
        fwds.remove(fwd)
        self.gen += 1
        if fwds:
            if key not in self.clients:
                self.routes[key] = fwds[0]
            return True
        del self.mesh[key]
        if key not in self.clients:
            self.routes.pop(key, None)
            self.left_region(key)
            self.flush_soon()
        return True

    def lookup(self, bytes key):
        """The local Conn, the preferred Forwarder, or None for ``key``."""
        return self.routes.get(key)

    def connections(self, bytes key) -> list:
        """All local connections of ``key``, oldest first (the last is active)."""
        cs = self.clients.get(key)
        return list((<ClientSet>cs).conns) if cs is not None else []

    def client_keys(self) -> list:
        return list(self.clients)

    def forwarders(self, bytes key) -> list:
        return list(self.mesh.get(key, ()))

    def stats(self) -> dict:
        """Counters and gauges, for metrics and tests."""
        cdef Counters c = self.counters
        cdef int i
        dups = sum(1 for cs in self.clients.values() if len((<ClientSet>cs).conns) > 1)
        return {
            "accepts": c.accepts,
            "current_connections": len(self.conns),
            "current_home_connections": sum(1 for conn in self.conns if (<Conn>conn).preferred),
            "clients_local": len(self.clients),
            "clients_remote": sum(1 for k in self.mesh if k not in self.clients),
            "watchers": len(self.watchers),
            "duplicate_keys": dups,
            "packets_in": c.packets_in,
            "bytes_in": c.bytes_in,
            "packets_out": c.packets_out,
            "bytes_out": c.bytes_out,
            "forwarded_in": c.forwarded_in,
            "forwarded_out": c.forwarded_out,
            "handshake_failures": c.handshake_failures,
            "protocol_errors": c.protocol_errors,
            "pings": c.pings,
            "pongs": c.pongs,
            "keepalives": c.keepalives,
            "peer_gone_disconnected": c.peer_gone_disconnected,
            "peer_gone_not_here": c.peer_gone_not_here,
            "mesh_pushbacks": c.mesh_pushbacks,
            "mesh_links_congested": sum(1 for f in self.congested if (<Forwarder>f).congested),
            "senders_paused": sum(len((<Forwarder>f).paused) for f in self.congested),
            "drops": {DROP_REASONS[i]: c.drops[i] for i in range(N_DROPS)},
            "drop_bytes": {DROP_REASONS[i]: c.drop_bytes[i] for i in range(N_DROPS)},
        }
