# Output buffers (Writer) and mesh forwarders (Forwarder); included by relay.pyx.

# uvloop's TCPTransport.is_closing and get_write_buffer_size, called unbound: no lookup per flush
cdef object tcp_is_closing = None
cdef object tcp_unsent = None


cdef int direct_fd(transport) except -2:
    """The socket of a plain uvloop TCP transport, which a flush may write to directly; else -1."""
    global tcp_is_closing, tcp_unsent
    if type(transport).__name__ != "TCPTransport" or type(transport).__module__ != "uvloop.loop":
        return -1
    sock = transport.get_extra_info("socket")
    if sock is None:
        return -1
    tcp_is_closing = type(transport).is_closing
    tcp_unsent = type(transport).get_write_buffer_size
    return sock.fileno()


cdef class Writer:
    """An output buffer bound to a transport, flushed once per event-loop turn that wrote to it.

    A flush writes straight to the socket (one send(2), no bytes object, no transport call) while
    the transport holds nothing unsent; what the socket does not take goes to the transport, which
    keeps it in order and pushes back as usual, and the next flushes ask it until it has drained.
    """

    def __cinit__(self, *args, **kwargs):
        self.fd = -1
        self.queued = True

    cdef inline int reserve(self, Py_ssize_t extra) except -1:
        if self.olen + extra <= self.ocap:
            return 0
        return self.grow(self.olen + extra)

    cdef int grow(self, Py_ssize_t need) except -1:
        """Enlarge the output buffer to hold ``need`` bytes (doubling); out of line: rare."""
        cdef Py_ssize_t cap = self.ocap * 2 if self.ocap else 256
        cdef unsigned char* nb
        while cap < need:
            cap *= 2
        nb = <unsigned char*>realloc(self.obuf, cap)
        if nb == NULL:
            raise MemoryError()
        self.obuf = nb
        self.ocap = cap
        return 0

    cdef inline void mark_dirty(self) noexcept:
        self.used = True
        cdef RelayServer server
        if not self.dirty:
            self.dirty = True
            server = self.server
            if server.dirty_tail is None:
                server.dirty_head = self
            else:
                server.dirty_tail.next_dirty = self
            server.dirty_tail = self  # a chain, not a list: no allocation, no list call per read

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
        cdef Py_ssize_t n = self.olen
        if n == 0 or self.transport is None:
            self.olen = 0
            return 0
        self.olen = 0
        if self.ws is not None:
            return self.write_out(self.ws.frame(self.obuf, n))
        cdef Py_ssize_t sent = self.try_send(self.obuf, n)
        return self.write_out(PyBytes_FromStringAndSize(<char*>self.obuf + sent, n - sent) if sent < n else None)

    cdef Py_ssize_t try_send(self, const unsigned char* buf, Py_ssize_t n) except -1:
        """Write what the socket takes now, if nothing of ours waits in the transport; how much was written."""
        if self.fd < 0:
            return 0
        if self.queued:
            if tcp_unsent(self.transport):
                return 0
            self.queued = self.shared
        if tcp_is_closing(self.transport):  # its socket may be closed already, and the number reused
            self.fd = -1
            return 0
        cdef Py_ssize_t sent = send(self.fd, buf, n, MSG_DONTWAIT | MSG_NOSIGNAL)
        if sent < n:
            self.queued = True  # the rest (after an error: all of it) goes through the transport, which reports errors
        return max(sent, 0)

    cdef int write_out(self, bytes out) except -1:
        """Hand ``out`` to the transport; None: the flush went straight to the socket."""
        if out is not None:
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

    def __cinit__(self, RelayServer server, transport, str name="", Py_ssize_t max_buffer=512 * 1024,
                  on_congested=None):
        self.server = server
        self.transport = transport
        self.name = name
        self.max_buffer = max_buffer
        self.on_congested = on_congested
        self.paused = []
        self.shared = True  # the mesh client writes its own frames on this link
        self.fd = direct_fd(transport)

    cdef inline int forward(self, Conn sender, const unsigned char* src, const unsigned char* dst,
                            const unsigned char* pkt, Py_ssize_t n) except -1:
        cdef Counters c = self.server.counters
        if self.closed:
            c.drop(DROP_GONE, 1, n)
            return 0
        if self.congested and sender is not None and not sender.pause_why & PAUSE_MESH:
            # The rest of the sender's current read still goes out; nothing more is read from it.
            if sender.hold_reads(PAUSE_MESH):  # False for a bridge: shed past the link's hard limit
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
        cdef Py_ssize_t frames = self.pending_frames, nbytes = self.pending_bytes
        self.pending_frames = self.pending_bytes = 0
        if out is None:  # all of it went straight to the socket
            c.forwarded_out += frames
            return 0
        cdef Py_ssize_t unsent = self.transport.get_write_buffer_size()
        if unsent > self.max_buffer and not self.congested:
            self.congested = True
            if self not in self.server.congested:
                self.server.congested.append(self)
            if self.on_congested is not None:
                self.on_congested(self)
        if unsent > MESH_HARD_LIMIT_FACTOR * self.max_buffer:
            # Only senders that cannot be paused (the ASGI WebSocket bridge) get this far: shed them.
            c.drop(DROP_QUEUE_TAIL, frames, nbytes)
            return 0
        c.forwarded_out += frames
        self.transport.write(out)
        return 0

    def resume(self) -> None:
        """The link drained (or is going away): read the senders it paused again."""
        self.congested = False
        paused, self.paused = self.paused, []
        for conn in paused:
            (<Conn>conn).release_reads(PAUSE_MESH)

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
        self.fd = -1
        self.olen = 0
        self.server.counters.drop(DROP_GONE, self.pending_frames, self.pending_bytes)
        self.pending_frames = self.pending_bytes = 0
        self.resume()

    def __repr__(self):
        return f"<Forwarder {self.name}>"
