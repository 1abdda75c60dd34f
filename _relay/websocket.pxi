# WebSocket framing (RFC 6455) for DERP over WebSocket; included by relay.pyx. Our frames are
# unmasked binary messages; a client's are masked. Conn.ws_feed drives the decoder.

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
