# What each incoming DERP frame does, one handler per frame type (as Go's derp_server.go), and the
# routing and delivery they share; included by relay.pyx. Conn's reassembly (conn.pxi) calls
# on_frame with every frame; the handlers are module-level functions taking the connection first.

# A handler first checks the frame's length (and who may send it); with ``p`` NULL only the
# header has arrived, so it returns there and the payload is buffered (or skipped, if it
# returns FRAME_SKIP). With ``p`` the whole payload is at hand and it handles the frame.


cdef int on_frame(Conn conn, int ftype, const unsigned char* p, Py_ssize_t n) except -1:
    if conn.state == ST_HANDSHAKE and ftype != P.FRAME_CLIENT_INFO:
        raise ProtocolViolation(f"first frame must be ClientInfo, got type 0x{ftype:02x}")
    if ftype == P.FRAME_SEND_PACKET:
        return handle_send_packet(conn, p, n)
    if ftype == P.FRAME_FORWARD_PACKET:
        return handle_forward_packet(conn, p, n)
    if ftype == P.FRAME_PING:
        return handle_ping(conn, p, n)
    if ftype == P.FRAME_NOTE_PREFERRED:
        return handle_note_preferred(conn, p, n)
    if ftype == P.FRAME_CLIENT_INFO:
        return handle_client_info(conn, p, n)
    if ftype == P.FRAME_WATCH_CONNS:
        return handle_watch_conns(conn, p, n)
    if ftype == P.FRAME_CLOSE_PEER:
        return handle_close_peer(conn, p, n)
    return FRAME_SKIP  # unknown or client-bound types are skipped, as Go servers do


cdef int handle_client_info(Conn conn, const unsigned char* p, Py_ssize_t n) except -1:
    """The client's key and boxed info: the handshake (once; later ones are skipped)."""
    if conn.state != ST_HANDSHAKE:
        return FRAME_SKIP
    if n < P.CLIENT_INFO_MIN or n > conn.server.client_info_max:
        raise ProtocolViolation(f"ClientInfo frame of {n} bytes "
                                f"(allowed {P.CLIENT_INFO_MIN}..{conn.server.client_info_max})")
    if p != NULL:
        conn.finish_handshake(PyBytes_FromStringAndSize(<const char*>p, n))
    return 0


cdef inline int handle_send_packet(Conn conn, const unsigned char* p, Py_ssize_t n) except -1:
    """A packet from ``conn``'s client: to the local connection of its destination, over a mesh link, or dropped."""
    if n < P.KEY_LEN or n > P.KEY_LEN + P.MAX_PACKET_SIZE:
        raise ProtocolViolation(f"SendPacket frame of {n} bytes (packet limit {P.MAX_PACKET_SIZE})")
    if p == NULL:
        return 0
    cdef Counters c = conn.server.counters
    cdef const unsigned char* src = <const unsigned char*>PyBytes_AS_STRING(conn.key)
    c.packets_in += 1
    c.bytes_in += n - P.KEY_LEN
    target = route(conn, p, True)
    if target is None:
        drop_unknown(conn, p, p + P.KEY_LEN, n - P.KEY_LEN, DROP_UNKNOWN_DEST)
    elif type(target) is Conn:
        enqueue(<Conn>target, src, p + P.KEY_LEN, n - P.KEY_LEN)
    else:
        (<Forwarder>target).forward(conn, src, p, p + P.KEY_LEN, n - P.KEY_LEN)
    return 0


cdef inline int handle_forward_packet(Conn conn, const unsigned char* p, Py_ssize_t n) except -1:
    """A packet a mesh peer relays for one of its clients: delivered here, never forwarded again."""
    if not conn.can_mesh:
        raise ProtocolViolation("ForwardPacket from a client without the mesh key")
    if n < 2 * P.KEY_LEN or n > 2 * P.KEY_LEN + P.MAX_PACKET_SIZE:
        raise ProtocolViolation(f"ForwardPacket frame of {n} bytes (packet limit {P.MAX_PACKET_SIZE})")
    if p == NULL:
        return 0
    cdef Counters c = conn.server.counters
    c.forwarded_in += 1
    c.bytes_in += n - 2 * P.KEY_LEN
    target = route(conn, p + P.KEY_LEN, False)
    if type(target) is Conn:
        heard_from_ptr(<Conn>target, p)
        enqueue(<Conn>target, p, p + 2 * P.KEY_LEN, n - 2 * P.KEY_LEN)
    else:
        # Never re-forward: packets travel at most one mesh hop.
        drop_unknown(conn, p + P.KEY_LEN, p + 2 * P.KEY_LEN, n - 2 * P.KEY_LEN, DROP_UNKNOWN_DEST_ON_FWD)
    return 0


cdef int handle_ping(Conn conn, const unsigned char* p, Py_ssize_t n) except -1:
    """Answer with a Pong of the first 8 bytes; while our transport pushes back, one Pong waits."""
    if n < P.PING_MIN or n > P.PING_MAX:
        raise ProtocolViolation(f"Ping frame of {n} bytes (allowed {P.PING_MIN}..{P.PING_MAX})")
    if p == NULL:
        return 0
    cdef Counters c = conn.server.counters
    c.pings += 1
    if not conn.paused:
        c.pongs += 1
        conn.put_frame(P.FRAME_PONG, p, 8, NULL, 0)
    elif conn.pong_pending:
        c.pongs_dropped += 1  # as Go's derper: one Pong pending at most, extra Pings ignored
    else:
        conn.pong_pending = True
        memcpy(conn.pong_data, p, 8)
    return 0


cdef int handle_note_preferred(Conn conn, const unsigned char* p, Py_ssize_t n) except -1:
    """Whether this is the client's home relay (a gauge counts them)."""
    if n != 1:
        raise ProtocolViolation(f"NotePreferred frame of {n} bytes (must be 1)")
    if p != NULL:
        conn.preferred = p[0] != 0
    return 0


cdef int handle_watch_conns(Conn conn, const unsigned char* p, Py_ssize_t n) except -1:
    """A mesh peer subscribes to PeerPresent/PeerGone for our clients."""
    if not conn.can_mesh:
        raise ProtocolViolation("WatchConns from a client without the mesh key")
    if n != 0:
        raise ProtocolViolation(f"WatchConns frame of {n} bytes (must be 0)")
    if p != NULL:
        conn.server.add_watcher(conn)
    return 0


cdef int handle_close_peer(Conn conn, const unsigned char* p, Py_ssize_t n) except -1:
    """A mesh peer asks us to close a client's connections."""
    if not conn.can_mesh:
        raise ProtocolViolation("ClosePeer from a client without the mesh key")
    if n != P.KEY_LEN:
        raise ProtocolViolation(f"ClosePeer frame of {n} bytes (must be 32)")
    if p != NULL:
        conn.server.close_peer(PyBytes_FromStringAndSize(<const char*>p, P.KEY_LEN))
    return 0


# -- routing ---------------------------------------------------------------------------------------

cdef inline object route(Conn conn, const unsigned char* dst, bint note):
    """The local Conn or Forwarder for ``dst``, or None; recent answers are cached per sender."""
    cdef RelayServer server = conn.server
    cdef PyObject* found
    cdef int i
    if conn.rc.gen == server.gen:
        for i in range(ROUTE_CACHE):
            if memcmp(dst, conn.rc.key[i], P.KEY_LEN) == 0:
                return conn.rc_target[i]
    else:
        conn.rc.gen = server.gen
        conn.rc_target = [None] * ROUTE_CACHE
        memset(conn.rc.key, 0xff, sizeof(conn.rc.key))  # an all-ones key is never a real destination
    key = PyBytes_FromStringAndSize(<const char*>dst, P.KEY_LEN)
    found = PyDict_GetItem(server.routes, key)
    target = <object>found if found != NULL else None
    i = conn.rc.next
    conn.rc.next = (i + 1) % ROUTE_CACHE
    memcpy(conn.rc.key[i], dst, P.KEY_LEN)
    conn.rc_target[i] = target
    if note and type(target) is Conn:
        heard_from(<Conn>target, conn.key)
    return target


cdef int heard_from(Conn conn, bytes src) except -1:
    """Remember that ``src`` sent to ``conn``, for PeerGone when it leaves the region."""
    cdef const unsigned char* k = <const unsigned char*>PyBytes_AS_STRING(src)
    if conn.hc_gen == conn.server.gen and memcmp(conn.hc_key, k, P.KEY_LEN) == 0:
        return 0
    conn.server.note_heard(src, conn)
    memcpy(conn.hc_key, k, P.KEY_LEN)
    conn.hc_gen = conn.server.gen
    return 0


cdef int heard_from_ptr(Conn conn, const unsigned char* src) except -1:
    if conn.hc_gen == conn.server.gen and memcmp(conn.hc_key, src, P.KEY_LEN) == 0:
        return 0
    return heard_from(conn, PyBytes_FromStringAndSize(<const char*>src, P.KEY_LEN))


cdef int drop_unknown(Conn conn, const unsigned char* dst, const unsigned char* pkt, Py_ssize_t n,
                      int reason) except -1:
    cdef Counters c = conn.server.counters
    c.drop(reason, 1, n)
    if not looks_like_disco(pkt, n) or not bucket_take(&conn.not_here, monotonic(), 1.0):
        return 0
    cdef unsigned char reason_byte = P.PEER_GONE_NOT_HERE
    c.peer_gone_not_here += 1
    conn.put_frame(P.FRAME_PEER_GONE, dst, P.KEY_LEN, &reason_byte, 1)
    return 0


# -- delivery --------------------------------------------------------------------------------------

cdef inline int enqueue(Conn conn, const unsigned char* src, const unsigned char* pkt, Py_ssize_t n) except -1:
    """A RecvPacket for ``conn``'s client: into its output buffer, or a bounded queue while its transport
    pushes back."""
    cdef Counters c = conn.server.counters
    cdef Py_ssize_t size = P.FRAME_HEADER_LEN + P.KEY_LEN + n
    cdef bytes frame
    if conn.state != ST_ACTIVE:
        c.drop(DROP_GONE, 1, n)
        return 0
    if not conn.paused:
        conn.reserve(size)
        write_recv_packet(conn.obuf + conn.olen, src, pkt, n)
        conn.olen += size
        c.packets_out += 1
        c.bytes_out += n
        conn.mark_dirty()
        return 0
    # The transport pushes back: hold the frame in a bounded queue, dropping the oldest.
    cdef bint disco = looks_like_disco(pkt, n)
    queue = conn.disco_queue if disco else conn.queue
    if queue is None:
        queue = deque()
        if disco:
            conn.disco_queue = queue
        else:
            conn.queue = queue
    if len(queue) >= conn.server.queue_depth:
        if conn.server.queue_depth == 0:
            c.drop(DROP_QUEUE_TAIL, 1, n)
            return 0
        old = queue.popleft()
        c.drop(DROP_QUEUE_HEAD, 1, len(old) - P.FRAME_HEADER_LEN - P.KEY_LEN)
    frame = PyBytes_FromStringAndSize(NULL, size)
    write_recv_packet(<unsigned char*>PyBytes_AS_STRING(frame), src, pkt, n)
    queue.append(frame)
    return 0
