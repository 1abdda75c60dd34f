# WebSocket framing (RFC 6455) for DERP over WebSocket; included by relay.pyx. Our frames are
# unmasked binary messages; a client's are masked. A WebSocket connection's Conn holds a
# WebSocket (Writer.ws) that decodes what it reads and frames what it writes.

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


cdef inline bint ws_close_code_valid(int code) noexcept nogil:
    """Close codes a peer may send (RFC 6455 §7.4, IANA registry); 1005 and 1006 never go on the wire."""
    return (1000 <= code <= 1003) or (1007 <= code <= 1014) or (3000 <= code <= 4999)


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


cdef inline Py_ssize_t ws_header_need(const WsDecoder* d) noexcept nogil:
    """How long the frame header being read is: 2 bytes until its length byte is known."""
    if d.hlen < 2:
        return 2
    cdef int len7 = d.hdr[1] & 0x7f
    return 2 + (2 if len7 == 126 else (8 if len7 == 127 else 0)) + (4 if d.hdr[1] & 0x80 else 0)


cdef Py_ssize_t ws_take_header(WsDecoder* d, const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """Take header bytes of the next frame from ``p`` and return how many were taken.

    Once the header is whole it is decoded into ``op``, ``fin``, ``rem`` and ``mask``, and
    ``in_payload`` is set; the caller validates it (``hdr`` still holds the raw bytes).
    """
    cdef Py_ssize_t need, k, taken = 0
    cdef unsigned long long length
    cdef int i
    while True:
        need = ws_header_need(d)
        k = min(need - d.hlen, n - taken)
        memcpy(d.hdr + d.hlen, p + taken, k)
        d.hlen += k
        taken += k
        if d.hlen < need:
            return taken
        if ws_header_need(d) == need:  # knowing the length byte asks for nothing more
            break
    length = d.hdr[1] & 0x7f
    if length == 126:
        length = (<unsigned long long>d.hdr[2] << 8) | d.hdr[3]
    elif length == 127:
        length = 0
        for i in range(8):
            length = (length << 8) | d.hdr[2 + i]
    if d.hdr[1] & 0x80:
        memcpy(d.mask, d.hdr + need - 4, 4)
    d.op = d.hdr[0] & 0x0f
    d.fin = (d.hdr[0] & 0x80) != 0
    d.rem = length
    d.moff = 0
    d.hlen = 0
    d.in_payload = True
    return taken


@cython.final
cdef class WebSocket:
    """The WebSocket framing of one connection: its input is decoded into the DERP stream, its output
    framed as binary messages. Methods take the Conn they serve (no reference cycle)."""

    cdef int feed(self, Conn conn, const unsigned char* p, Py_ssize_t n) except -1:
        """Decode what ``conn`` read: data frames go on to ``Conn.feed``, control frames are answered."""
        cdef WsDecoder* d = &self.dec
        cdef unsigned char* scratch = conn.server.scratch
        cdef Py_ssize_t k
        while n > 0 and conn.state != ST_CLOSED:
            if not d.in_payload:
                k = ws_take_header(d, p, n)
                p += k
                n -= k
                if d.in_payload:
                    self.begin_frame(conn)
                continue
            k = <Py_ssize_t>min(<unsigned long long>n, d.rem, <unsigned long long>SCRATCH_SIZE)
            ws_unmask(scratch, p, k, d.mask, d.moff)
            d.moff = (d.moff + k) & 3
            d.rem -= k
            p += k
            n -= k
            if d.op >= 0x8:
                self.ctrl += (<char*>scratch)[:k]
            else:
                # Message boundaries mean nothing: the payload is just more of the DERP stream.
                conn.feed(scratch, k)
            if d.rem == 0:
                d.in_payload = False
                if d.op >= 0x8:
                    self.control(conn)
        return 0

    cdef int begin_frame(self, Conn conn) except -1:
        """Check the header ``ws_take_header`` just decoded (RFC 6455 §5); handle an empty frame at once."""
        cdef WsDecoder* d = &self.dec
        cdef int op = d.op
        if d.hdr[0] & 0x70:
            self.fail(conn, 1002, "WebSocket RSV bits set, but no extension was negotiated")
        if not (d.hdr[1] & 0x80):
            self.fail(conn, 1002, "unmasked WebSocket frame from client")
        if op == WS_OP_TEXT:
            self.fail(conn, 1003, "text WebSocket message (DERP needs binary)")
        if op >= 0x8:
            if op not in (WS_OP_CLOSE, WS_OP_PING, WS_OP_PONG) or d.rem > 125 or not d.fin:
                self.fail(conn, 1002, f"bad WebSocket control frame (opcode {op}, {d.rem} bytes)")
            self.ctrl = bytearray()
        elif op == WS_OP_CONT:
            if not d.fragmented:
                self.fail(conn, 1002, "WebSocket continuation frame without a message to continue")
            d.fragmented = not d.fin
        elif op == WS_OP_BINARY:
            if d.fragmented:
                self.fail(conn, 1002, "new WebSocket message before the fragmented one ended")
            d.fragmented = not d.fin
        else:
            self.fail(conn, 1002, f"unknown WebSocket opcode {op}")
        if d.rem == 0:
            d.in_payload = False
            if op >= 0x8:
                self.control(conn)
        return 0

    cdef int control(self, Conn conn) except -1:
        """A whole control frame arrived: answer a Ping (one Pong waits while paused), echo a Close."""
        cdef bytes body = bytes(self.ctrl) if self.ctrl is not None else b""
        cdef int code = 1000
        self.ctrl = None
        if self.dec.op == WS_OP_PING:
            if not conn.paused:
                self.write_control(conn, WS_OP_PONG, body)
            elif self.pong_pending is None:
                self.pong_pending = body
            else:
                conn.server.counters.pongs_dropped += 1
        elif self.dec.op == WS_OP_CLOSE:
            # RFC 6455 §7.4: echo a valid code, never 1005/1006; a malformed Close is a protocol error.
            if len(body) == 1:
                self.fail(conn, 1002, "one-byte WebSocket close payload")
            if len(body) >= 2:
                code = int.from_bytes(body[:2], "big")
                if not ws_close_code_valid(code):
                    self.fail(conn, 1002, f"invalid WebSocket close code {code}")
                try:
                    body[2:].decode("utf-8")
                except UnicodeDecodeError:
                    self.fail(conn, 1007, "WebSocket close reason is not UTF-8")
            self.close_with(conn, code, b"")
            conn.close("WebSocket closed by client", False)
        return 0

    cdef int send_pending_pong(self, Conn conn) except -1:
        """``conn``'s transport drained: send the Pong that waited."""
        if self.pong_pending is not None and conn.state != ST_CLOSED:
            body, self.pong_pending = self.pong_pending, None
            self.write_control(conn, WS_OP_PONG, body)
        return 0

    cdef int fail(self, Conn conn, int code, str why) except -1:
        """Send a Close with ``code`` and fail the connection (it closes once the Close is written)."""
        self.close_with(conn, code, b"")
        raise ProtocolViolation(why)

    cdef int write_control(self, Conn conn, int opcode, bytes body) except -1:
        cdef unsigned char hdr[10]
        cdef Py_ssize_t h = ws_put_header(hdr, opcode, len(body))
        if conn.transport is None:
            return 0
        if conn.olen:
            conn.flush()
        conn.transport.write((<char*>hdr)[:h] + body)
        return 0

    cdef int close_with(self, Conn conn, int code, bytes reason) except -1:
        """Send our Close frame (once)."""
        if self.closing or conn.transport is None:
            return 0
        self.closing = True
        self.write_control(conn, WS_OP_CLOSE, code.to_bytes(2, "big") + reason[:120])
        return 0

    cdef bytes frame(self, const unsigned char* buf, Py_ssize_t n):
        """``n`` bytes of DERP stream as binary messages of at most 32 KiB (Go clients refuse larger)."""
        cdef Py_ssize_t last = n % P.WS_MAX_OUT_MESSAGE  # the last message's length, if not a full one
        cdef Py_ssize_t total = n + (n // P.WS_MAX_OUT_MESSAGE) * 4 + ((2 if last < 126 else 4) if last else 0)
        cdef bytes out = PyBytes_FromStringAndSize(NULL, total)
        cdef unsigned char* q = <unsigned char*>PyBytes_AS_STRING(out)
        cdef Py_ssize_t pos = 0, w = 0, k
        while pos < n:
            k = min(n - pos, <Py_ssize_t>P.WS_MAX_OUT_MESSAGE)
            w += ws_put_header(q + w, WS_OP_BINARY, k)
            memcpy(q + w, buf + pos, k)
            w += k
            pos += k
        return out
