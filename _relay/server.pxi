# The relay: registry, routing table, ticker and the Python view of the counters; included by
# relay.pyx.

@cython.final
cdef class RelayServer:
    """The routing table and connection registry of one relay.

    ``handshake(payload) -> (client_key, client_info, can_mesh, server_info_payload)`` receives the
    ClientInfo frame's payload and raises to refuse the client.

    ``admit(client_key, remote_ip) -> bool`` (or an awaitable of one), if given, is asked once per
    handshake of a client without the mesh key, before ServerInfo is sent; what the client sends
    meanwhile is held (its reading paused) until the answer, and a refused client is closed.

    ``rate_limit`` (bytes/s, 0 = off) limits what each client without the mesh key may send, by
    not reading from it while its token bucket (depth ``rate_burst``, default 0.1 s of the rate,
    at least one largest SendPacket frame) is in debt: TCP pushes back on the sender, nothing is
    dropped.
    """

    def __cinit__(self, bytes public_key not None, handshake, *, double keepalive=60.0, double keepalive_jitter=5.0,
                  Py_ssize_t queue_depth=32, double write_timeout=2.0, double mesh_write_timeout=30.0,
                  double handshake_timeout=10.0, Py_ssize_t high_water=256 * 1024, admit=None,
                  double rate_limit=0.0, Py_ssize_t rate_burst=0,
                  Py_ssize_t preauth_limit=64 * 1024 * 1024, Py_ssize_t client_info_max=P.CLIENT_INFO_MAX):
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
        self.preauth_limit = preauth_limit
        self.client_info_max = min(client_info_max, <Py_ssize_t>P.CLIENT_INFO_MAX)
        self.routes = {}
        self.clients = {}
        self.mesh = {}
        self.heard = {}
        self.conns = {}
        self.watchers = []
        self.congested = []
        self.gen = 1
        self.scratch = <unsigned char*>malloc(SCRATCH_SIZE)
        if self.scratch == NULL:
            raise MemoryError()
        # One read buffer for every connection: reads are consumed before the next one starts.
        self.read_bytes = bytearray(READ_BUFFER_SIZE)
        self.read_buf = <unsigned char*>PyByteArray_AS_STRING(self.read_bytes)
        self.read_view = memoryview(self.read_bytes)
        self.admit = admit
        if rate_limit < 0:
            raise ValueError("rate_limit must be 0 (off) or positive")
        self.rate_limit = rate_limit
        # Default: a tenth of a second of the rate, so a replica that is scheduled late (a busy
        # machine) does not cost a limited client its rate; never less than the largest frame.
        self.rate_burst = max(<double>rate_burst if rate_burst > 0 else rate_limit / 10, <double>MAX_FRAME)
        self.rate_view = self.read_view[:min(<Py_ssize_t>self.rate_burst, <Py_ssize_t>READ_BUFFER_SIZE)]

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
                self.counters.drop(DROP_WRITE_ERROR, 1, 0)
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
        """Flush every Writer written since the last flush (a flush may chain more: they are flushed too)."""
        cdef Writer w
        while self.dirty_head is not None:
            w = self.dirty_head
            self.dirty_head = w.next_dirty
            if self.dirty_head is None:
                self.dirty_tail = None
            w.next_dirty = None
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
        self.open_conns += 1
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
        dups = sum(1 for cs in self.clients.values() if len((<ClientSet>cs).conns) > 1)
        return {
            "accepts": c.accepts,
            "current_connections": len(self.conns),
            "open_connections": self.open_conns,
            "preauth_bytes": self.preauth_bytes,
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
            "admission_refused": c.admission_refused,
            "admission_pending": self.admitting,
            "rate_limited": c.rate_limited,
            "pongs_dropped": c.pongs_dropped,
            "preauth_refused": c.preauth_refused,
            "mesh_links_congested": sum(1 for f in self.congested if (<Forwarder>f).congested),
            "senders_paused": sum(len((<Forwarder>f).paused) for f in self.congested),
            "drops": {name: c.drops[i] for i, name in DROP_REASONS.items()},
            "drop_bytes": {name: c.drop_bytes[i] for i, name in DROP_REASONS.items()},
        }
