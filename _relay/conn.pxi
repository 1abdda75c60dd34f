# One client connection (Conn), its rate limit and the set of connections of one key; included by
# relay.pyx.

@cython.final
cdef class RateLimit:
    """One client's token bucket, in bytes read from its connection: in debt, it is not read."""

    cdef int charge(self, Conn conn, Py_ssize_t n) except -1:
        """``n`` bytes were read: pay for them; in debt, stop reading until the bucket refills."""
        cdef RelayServer server = conn.server
        cdef double tokens = bucket_refill(&self.bucket, monotonic()) - n
        self.bucket.tokens = tokens  # a read is paid for even when it leaves the bucket in debt
        if tokens < 0 and self.timer is None and conn.state == ST_ACTIVE and conn.hold_reads(PAUSE_RATE):
            server.counters.rate_limited += 1
            self.timer = server.loop.call_later(-tokens / self.bucket.rate, conn.rate_refilled)
        return 0


@cython.final
cdef class ClientSet:
    """All live connections of one key; the last one to send is the active one (tailscale#2745)."""


@cython.final
cdef class Conn(Writer):
    """One DERP client connection: an asyncio protocol that owns its transport after the upgrade."""

    def __cinit__(self, RelayServer server, transport, bint websocket, str remote_ip, int remote_port, bint not_ideal):
        self.server = server
        self.transport = transport
        if websocket:
            self.ws = WebSocket()
        self.remote_ip = remote_ip
        self.remote_port = remote_port
        self.not_ideal = not_ideal
        self.state = ST_HANDSHAKE
        self.not_here.tokens = self.not_here.burst = 3.0
        self.not_here.rate = 1.0
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
        if self.rl is not None:
            return self.server.rate_view  # reads of at most one burst keep a limited sender smooth
        return self.server.read_view

    def buffer_updated(self, Py_ssize_t nbytes):
        if self.state != ST_CLOSED and nbytes > 0:
            self.consume(self.server.read_buf, nbytes)

    cdef int consume(self, const unsigned char* p, Py_ssize_t n) except -1:
        if self.cset is not None and self.cset.active is not self:
            self.server.make_active(self)
        try:
            if self.ws is None:
                self.feed(p, n)
            else:
                self.ws.feed(self, p, n)
        except ProtocolViolation as exc:
            self.close(str(exc), True)
        finally:
            self.server.flush_dirty()
        if self.rl is not None:
            self.rl.charge(self, n)
        return 0

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        self.fd = -1
        if exc is None:
            self.close("client disconnected", False)
        else:
            self.close(f"connection lost: {exc}", False)
        self.transport = None

    cdef bint hold_reads(self, int why):
        """Stop reading for reason ``why`` (a PAUSE_* bit); False if the transport cannot pause."""
        if self.state == ST_CLOSED or self.transport is None:
            return False
        if not self.pause_why:
            try:
                self.transport.pause_reading()
            except (NotImplementedError, AttributeError, RuntimeError):
                return False
        self.pause_why |= why
        return True

    cdef void release_reads(self, int why):
        """Reason ``why`` is over: read again unless another reason still holds."""
        if not self.pause_why & why:
            return
        self.pause_why &= ~why
        if (not self.pause_why and self.state != ST_CLOSED and self.transport is not None
                and not self.transport.is_closing()):
            self.transport.resume_reading()

    def rate_refilled(self):
        """The rate limiter's timer: the bucket has paid its debt."""
        if self.rl is not None:
            self.rl.timer = None
        self.release_reads(PAUSE_RATE)

    def pause_writing(self):
        self.paused = True
        self.paused_at = monotonic()

    def resume_writing(self):
        self.paused = False
        self.send_pending_pongs()
        self.drain_queues()
        self.server.flush_dirty()

    cdef int send_pending_pongs(self) except -1:
        if self.ws is not None:
            self.ws.send_pending_pong(self)
        if self.pong_pending and self.state == ST_ACTIVE:
            self.pong_pending = False
            self.server.counters.pongs += 1
            self.put_frame(P.FRAME_PONG, self.pong_data, 8, NULL, 0)
        return 0

    # -- lifecycle --------------------------------------------------------------------

    cdef start(self, bytes prefix, bytes pending):
        """Send ``prefix`` (the HTTP response, if any) with ServerKey, then read what arrived early."""
        server = self.server
        self.transport.set_write_buffer_limits(server.high_water, server.high_water // 4)
        self.hs_timer = server.loop.call_later(server.handshake_timeout, self.handshake_timeout)
        if self.ws is not None:
            if prefix:
                self.transport.write(prefix)
            self.put_frame(P.FRAME_SERVER_KEY, <const unsigned char*>P.DERP_MAGIC, P.MAGIC_LEN,
                           <const unsigned char*>PyBytes_AS_STRING(server.public_key), P.KEY_LEN)
            self.flush()
        else:
            self.transport.write(prefix + server.server_key_frame)
            self.fd = direct_fd(self.transport)
        if pending:
            self.data_received(pending)

    def handshake_timeout(self):
        if self.state == ST_HANDSHAKE or self.state == ST_ADMITTING:
            self.server.counters.handshake_failures += 1
            self.close("handshake not completed within %.0f s" % self.server.handshake_timeout, True)

    cpdef close(self, str reason, bint error=False):
        """Close the connection, logging ``reason``; safe to call more than once."""
        cdef int was = self.state
        if was == ST_CLOSED:
            return
        self.state = ST_CLOSED
        self.server.open_conns -= 1
        self.release_preauth()
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
        elif self.admission is not None:
            self.admission[0].cancel()
            self.admission = None
            self.server.admitting -= 1
        if self.rl is not None and self.rl.timer is not None:
            self.rl.timer.cancel()
            self.rl.timer = None
        self.drop_queued(DROP_GONE)
        if self.transport is not None:
            self.fd = -1  # a flush from now on goes through the transport, which knows it is closing
            if error and (self.ws is None or not self.ws.closing):
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

    cdef void release_preauth(self) noexcept:
        self.server.preauth_bytes -= self.preauth_charged
        self.preauth_charged = 0

    cdef int charge_preauth(self, Py_ssize_t n) except -1:
        """Count ``n`` more buffered ClientInfo bytes against the relay-wide pre-auth budget."""
        cdef RelayServer server = self.server
        if server.preauth_bytes + n > server.preauth_limit:
            server.counters.preauth_refused += 1
            raise ProtocolViolation(f"pre-auth memory budget full ({server.preauth_bytes} bytes held by "
                                    f"unfinished handshakes, limit {server.preauth_limit})")
        server.preauth_bytes += n
        self.preauth_charged += n
        return 0

    def short_key(self) -> str:
        if self.key is None:
            return "[handshake]"
        import base64
        return "[" + base64.b64encode(self.key).decode()[:5] + "]"

    def __dealloc__(self):
        if self.ibuf != NULL:
            free(self.ibuf)

    # -- incoming DERP frames ---------------------------------------------------------

    cdef int ibuf_append(self, const unsigned char* p, Py_ssize_t n) except -1:
        cdef Py_ssize_t cap
        cdef unsigned char* nb
        if self.state == ST_HANDSHAKE:
            self.charge_preauth(n)
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
        while n > 0 and self.state <= ST_ACTIVE:
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
                    if on_frame(self, self.ibuf[0], NULL, length) == FRAME_SKIP:
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
                on_frame(self, self.ibuf[0], self.ibuf + P.FRAME_HEADER_LEN, self.ineed - P.FRAME_HEADER_LEN)
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
            if n - P.FRAME_HEADER_LEN >= length:
                on_frame(self, ftype, p + P.FRAME_HEADER_LEN, length)  # a skipped frame is passed over here
                p += P.FRAME_HEADER_LEN + length
                n -= P.FRAME_HEADER_LEN + length
                continue
            if on_frame(self, ftype, NULL, length) == FRAME_SKIP:
                self.skip = length
                p += P.FRAME_HEADER_LEN
                n -= P.FRAME_HEADER_LEN
                continue
            self.ineed = P.FRAME_HEADER_LEN + length
            self.ibuf_append(p, n)
            return 0
        if n > 0 and self.state == ST_ADMITTING:
            self.hold(p, n)
        return 0

    cdef int hold(self, const unsigned char* p, Py_ssize_t n) except -1:
        """Keep what a client sends while its admission is pending; it is handled once admitted."""
        cdef bytearray held = self.admission[2]
        if len(held) + n > HOLD_LIMIT:
            raise ProtocolViolation(f"sent more than {HOLD_LIMIT} bytes before it was admitted")
        held += (<const char*>p)[:n]
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
                    c.drop(reason, 1, len(frame) - P.FRAME_HEADER_LEN - P.KEY_LEN)
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
        self.release_preauth()
        self.key = key
        self.can_mesh = can_mesh
        self.is_prober = bool(info.get("isprober"))
        if server.admit is not None and not can_mesh:
            # Admission is decided before ServerInfo, once per handshake; mesh peers are trusted.
            verdict = server.admit(key, self.remote_ip)
            if inspect.isawaitable(verdict):
                self.admission = [asyncio.ensure_future(verdict), server_info, bytearray()]
                self.state = ST_ADMITTING
                server.admitting += 1
                self.hold_reads(PAUSE_ADMIT)  # what the client sends meanwhile waits in the kernel
                self.admission[0].add_done_callback(self.admission_done)
                return 0
            if not verdict:
                return self.refuse()
        return self.admitted(server_info)

    def admission_done(self, future):
        """The admission awaitable resolved: go on with the handshake, or refuse the client."""
        if self.state != ST_ADMITTING:
            return  # closed meanwhile
        _, server_info, held = self.admission
        self.admission = None
        self.server.admitting -= 1
        if future.cancelled() or future.exception() is not None:
            log.warning("derp %s %s: admission hook failed, refusing: %r", self.remote_ip, self.short_key(),
                        None if future.cancelled() else future.exception())
            self.refuse()
        elif not future.result():
            self.refuse()
        else:
            self.admitted(server_info)
            self.release_reads(PAUSE_ADMIT)
            try:
                self.feed(<const unsigned char*>PyByteArray_AS_STRING(held), len(held))
            except ProtocolViolation as exc:
                self.close(str(exc), True)
        self.server.flush_dirty()

    cdef int refuse(self) except -1:
        """Admission control said no: a clear close (Health frame or WebSocket 1008), counted, logged at debug."""
        cdef bytes why = b"refused by the server's admission control"
        self.server.counters.admission_refused += 1
        if self.ws is not None:
            self.ws.close_with(self, 1008, why)
        else:
            self.put_frame(P.FRAME_HEALTH, <const unsigned char*>PyBytes_AS_STRING(why), len(why), NULL, 0)
        self.close("refused by admission control", False)
        return 0

    cdef int admitted(self, bytes server_info) except -1:
        server = self.server
        if self.hs_timer is not None:
            self.hs_timer.cancel()
            self.hs_timer = None
        if self.can_mesh:
            self.write_timeout = server.mesh_write_timeout
        self.addr18 = address18(self.remote_ip, self.remote_port)
        # ServerInfo is always the first frame after ServerKey: write it before anyone can enqueue.
        self.put_frame(P.FRAME_SERVER_INFO, <const unsigned char*>PyBytes_AS_STRING(server_info),
                       PyBytes_GET_SIZE(server_info), NULL, 0)
        self.state = ST_ACTIVE
        self.next_keepalive = monotonic() + server.keepalive + random.random() * server.keepalive_jitter
        if server.rate_limit > 0 and not self.can_mesh:
            self.rl = RateLimit()
            self.rl.bucket.rate = server.rate_limit
            self.rl.bucket.tokens = self.rl.bucket.burst = server.rate_burst
            self.rl.bucket.last = monotonic()
        server.register(self)
        return 0

    # -- Python view --------------------------------------------------------------------

    @property
    def websocket(self) -> bool:
        """Whether the client speaks DERP over WebSocket."""
        return self.ws is not None

    @property
    def read_paused(self) -> bool:
        """Whether a congested mesh link holds this connection's reads."""
        return self.pause_why & PAUSE_MESH != 0

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
