# The relay's map: every cdef class with its fields, grouped by who owns them, and its C methods.
# The code is in relay.pyx and the parts it includes (writer.pxi, websocket.pxi, conn.pxi,
# frames.pxi, server.pxi); wire constants are in proto.pxd.

cimport cython

from _relay cimport proto as P

cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int fd, const void* buf, size_t n, int flags)
    int MSG_DONTWAIT, MSG_NOSIGNAL

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    cdef struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk_id, timespec *tp)
    int CLOCK_MONOTONIC


# Drop reasons: indexes into Counters.drops; relay.pyx's DROP_REASONS names each one.
cdef enum:
    DROP_UNKNOWN_DEST = 0
    DROP_UNKNOWN_DEST_ON_FWD = 1
    DROP_GONE = 2
    DROP_QUEUE_HEAD = 3
    DROP_QUEUE_TAIL = 4
    DROP_WRITE_ERROR = 5
    N_DROPS = 6

# Conn.state
cdef enum:
    ST_HANDSHAKE = 0
    ST_ACTIVE = 1
    ST_ADMITTING = 2             # handshake done, waiting for RelayServer.admit; frames are held
    ST_CLOSED = 3

cdef enum:
    ROUTE_CACHE = 4
    READ_BUFFER_SIZE = 262144
    SCRATCH_SIZE = 65536
    IDLE_BUFFER_KEEP = 4096      # output buffers above this are freed when a conn goes idle
    MESH_HARD_LIMIT_FACTOR = 8   # a mesh link sheds forwarded packets past this many x max_buffer
    WS_MAX_HEADER = 14

cdef enum:                       # why a connection is not read (Conn.pause_why bits)
    PAUSE_MESH = 1               # a mesh link it sends to is congested (Forwarder.paused)
    PAUSE_RATE = 2               # over its per-client rate limit
    PAUSE_ADMIT = 4              # waiting for the admission decision
    HOLD_LIMIT = 2 * READ_BUFFER_SIZE  # bytes a client may send before it is admitted
    MAX_FRAME = P.FRAME_HEADER_LEN + P.KEY_LEN + P.MAX_PACKET_SIZE  # a SendPacket of the largest packet
    FRAME_SKIP = 1               # a frame handler's answer to a header: skip the payload unread

cdef enum:
    WS_OP_CONT = 0x0
    WS_OP_TEXT = 0x1
    WS_OP_BINARY = 0x2
    WS_OP_CLOSE = 0x8
    WS_OP_PING = 0x9
    WS_OP_PONG = 0xA


cdef struct TokenBucket:
    double tokens, last          # tokens left, and when they were counted (monotonic seconds)
    double rate, burst           # refill per second, and the most it holds


cdef struct RouteCache:
    # The last ROUTE_CACHE destinations a sender looked up (a mesh link interleaves many); the
    # targets themselves are Python objects, kept beside it in Conn.rc_target.
    unsigned char key[ROUTE_CACHE][P.KEY_LEN]
    unsigned long long gen       # RelayServer.gen when filled: any routing change empties it
    int next


cdef struct WsDecoder:
    # The header of the incoming WebSocket frame, and how much of its payload is still to come.
    unsigned char hdr[WS_MAX_HEADER]
    int hlen                     # header bytes read so far
    int op
    bint fin, in_payload
    bint fragmented              # inside a fragmented data message (its FIN not yet seen)
    unsigned long long rem       # payload bytes still to read
    unsigned char mask[4]
    int moff                     # position in the mask of the next payload byte


@cython.final
cdef class Counters:
    cdef public unsigned long long packets_in, bytes_in, packets_out, bytes_out
    cdef public unsigned long long forwarded_in, forwarded_out, accepts, handshake_failures
    cdef public unsigned long long pings, pongs, keepalives, peer_gone_disconnected, peer_gone_not_here
    cdef public unsigned long long protocol_errors, mesh_pushbacks
    cdef public unsigned long long admission_refused, rate_limited, pongs_dropped, preauth_refused
    cdef unsigned long long drops[N_DROPS]
    cdef unsigned long long drop_bytes[N_DROPS]

    cdef inline void drop(self, int reason, unsigned long long packets, Py_ssize_t nbytes) noexcept


@cython.final
cdef class WebSocket:
    # incoming frames: the header being decoded, a control frame's payload
    cdef WsDecoder dec
    cdef bytearray ctrl
    # outgoing control frames
    cdef bint closing            # our Close frame is sent
    cdef bytes pong_pending      # the payload of a Pong that waits while the transport pushes back

    cdef int feed(self, Conn conn, const unsigned char* p, Py_ssize_t n) except -1
    cdef int begin_frame(self, Conn conn) except -1
    cdef int control(self, Conn conn) except -1
    cdef int send_pending_pong(self, Conn conn) except -1
    cdef int fail(self, Conn conn, int code, str why) except -1
    cdef int write_control(self, Conn conn, int opcode, bytes body) except -1
    cdef int close_with(self, Conn conn, int code, bytes reason) except -1
    cdef bytes frame(self, const unsigned char* buf, Py_ssize_t n)


cdef class Writer:
    # set by the subclass's constructor
    cdef RelayServer server
    cdef object transport
    cdef WebSocket ws            # a WebSocket client's framing (both ways); None for raw DERP and mesh links
    cdef bint shared             # others write to this transport too (a mesh link's client)
    # direct writes to the socket (Writer.try_send)
    cdef int fd                  # the socket under a plain uvloop TCP transport, else -1
    cdef bint queued             # the transport may hold unsent bytes: ask it before sending directly
    # output buffer, flushed once per event-loop turn that wrote to it
    cdef unsigned char* obuf
    cdef Py_ssize_t olen, ocap
    cdef bint dirty              # in the server's dirty chain
    cdef Writer next_dirty       # the next in that chain
    cdef bint used               # written since the last tick (idle buffers are freed)

    cdef int grow(self, Py_ssize_t need) except -1

    # final: called directly (no vtable), so the C compiler inlines these fast paths
    @cython.final
    cdef inline int reserve(self, Py_ssize_t extra) except -1

    @cython.final
    cdef inline void mark_dirty(self) noexcept

    cdef int put_frame(self, unsigned char ftype, const unsigned char* a, Py_ssize_t na,
                       const unsigned char* b, Py_ssize_t nb) except -1
    cdef int flush(self) except -1
    cdef Py_ssize_t try_send(self, const unsigned char* buf, Py_ssize_t n) except -1
    cdef int write_out(self, bytes out) except -1
    cdef void release_buffer(self) noexcept


@cython.final
cdef class Forwarder(Writer):
    # set by the control plane
    cdef readonly str name
    cdef public Py_ssize_t max_buffer
    cdef public object on_congested  # called with this Forwarder when the link starts pushing back
    # push-back
    cdef readonly bint congested
    cdef list paused                 # senders not read until this link drains
    cdef bint closed
    # in the output buffer, not yet written
    cdef Py_ssize_t pending_frames, pending_bytes

    cdef inline int forward(self, Conn sender, const unsigned char* src, const unsigned char* dst,
                            const unsigned char* pkt, Py_ssize_t n) except -1


@cython.final
cdef class RateLimit:
    cdef TokenBucket bucket      # in bytes read from the connection; it may go into debt
    cdef object timer            # the call_later that reads the client again

    cdef int charge(self, Conn conn, Py_ssize_t n) except -1


@cython.final
cdef class ClientSet:
    cdef bytes key
    cdef list conns              # ordered by recency: the last is active
    cdef Conn active


@cython.final
cdef class Conn(Writer):
    # identity: the peer's address at accept, the rest from the handshake
    cdef readonly str remote_ip
    cdef readonly int remote_port
    cdef readonly bint not_ideal
    cdef readonly bytes key
    cdef readonly bint can_mesh, is_prober, preferred
    cdef bytes addr18            # remote address as 16-byte IPv6 + port, for PeerPresent
    # lifecycle
    cdef int state
    cdef object hs_timer
    cdef double next_keepalive
    cdef list admission          # while ST_ADMITTING: [future, ServerInfo payload, held bytes]
    cdef Py_ssize_t preauth_charged  # bytes of an unfinished ClientInfo held in ibuf (RelayServer.preauth_bytes)
    # owned by RelayServer's registry
    cdef ClientSet cset
    cdef bint watcher
    # flow control: our transport pushing back, and a congested mesh link pausing our reads
    cdef bint paused
    cdef double paused_at, write_timeout
    cdef object queue, disco_queue   # bounded, used only while paused
    cdef bint pong_pending           # at most one reply waits while paused (a ping flood buffers nothing more)
    cdef unsigned char pong_data[8]
    cdef int pause_why               # PAUSE_* bits: the transport is not read while any is set
    cdef RateLimit rl                # None when unlimited (or a mesh peer): one pointer test per read
    # incoming DERP frame reassembly
    cdef unsigned char* ibuf
    cdef Py_ssize_t ilen, icap, ineed, skip
    # routing: recent destinations, and who last sent to us ("heard from" once per source)
    cdef RouteCache rc
    cdef list rc_target
    cdef unsigned char hc_key[P.KEY_LEN]
    cdef unsigned long long hc_gen
    cdef TokenBucket not_here    # PeerGone(NotHere) answers: 1/s, burst 3

    cdef int consume(self, const unsigned char* p, Py_ssize_t n) except -1
    cdef bint hold_reads(self, int why)
    cdef void release_reads(self, int why)
    cdef int send_pending_pongs(self) except -1
    cdef start(self, bytes prefix, bytes pending)
    cpdef close(self, str reason, bint error=*)
    cdef void release_preauth(self) noexcept
    cdef int charge_preauth(self, Py_ssize_t n) except -1
    cdef int ibuf_append(self, const unsigned char* p, Py_ssize_t n) except -1
    cdef int feed(self, const unsigned char* p, Py_ssize_t n) except -1
    cdef int hold(self, const unsigned char* p, Py_ssize_t n) except -1
    cdef int drain_queues(self) except -1
    cdef void drop_queued(self, int reason)
    cdef int put_peer_gone(self, bytes key, unsigned char reason) except -1
    cdef int put_peer_present(self, Conn who) except -1
    cdef int finish_handshake(self, bytes payload) except -1
    cdef int refuse(self) except -1
    cdef int admitted(self, bytes server_info) except -1


@cython.final
cdef class RelayServer:
    # identity
    cdef readonly bytes public_key
    cdef readonly bytes server_key_frame
    cdef readonly Counters counters
    # set by the control plane
    cdef public object handshake
    cdef public object loop
    cdef public double keepalive, keepalive_jitter, write_timeout, mesh_write_timeout, handshake_timeout
    cdef public Py_ssize_t queue_depth, high_water
    cdef public object admit                   # admission hook, or None (see the class docstring)
    cdef readonly double rate_limit, rate_burst  # per-client bytes/s (0: off) and bucket depth
    cdef public Py_ssize_t preauth_limit       # bytes all unfinished handshakes may hold together
    cdef public Py_ssize_t client_info_max     # largest ClientInfo frame one connection may send
    # budgets in use
    cdef Py_ssize_t admitting                  # connections waiting for their admission decision
    cdef readonly Py_ssize_t preauth_bytes
    cdef readonly Py_ssize_t open_conns        # accepted and not yet closed, handshakes included
    # registry and routing table
    cdef dict routes             # key -> active local Conn, else preferred Forwarder
    cdef dict clients            # key -> ClientSet of local connections
    cdef dict mesh               # key -> [Forwarder, ...], first registered preferred
    cdef dict heard              # source key -> {Conn: None} that received packets from it
    cdef dict conns              # Conn -> None for every registered connection
    cdef list watchers
    cdef unsigned long long gen  # bumped on every routing change (route caches compare it)
    # output coalescing and push-back
    cdef Writer dirty_head, dirty_tail  # Writers written this turn, chained by next_dirty, flushed at its end
    cdef list congested          # Forwarders pushing back on their senders
    cdef bint flush_scheduled
    cdef object tick_handle
    # buffers shared by every connection (reads are consumed before the next one starts)
    cdef unsigned char* scratch
    cdef bytearray read_bytes
    cdef unsigned char* read_buf
    cdef object read_view
    cdef object rate_view        # the read buffer cut to one burst, for rate-limited connections

    cdef double tick_interval(self)
    cdef void check_congested(self)
    cdef int flush_dirty(self) except -1
    cdef int note_heard(self, bytes src, Conn dst) except -1
    cdef int register(self, Conn conn) except -1
    cdef int make_active(self, Conn conn) except -1
    cdef int unregister(self, Conn conn) except -1
    cdef int left_region(self, bytes key) except -1
    cdef int add_watcher(self, Conn conn) except -1


# What each incoming frame does (frames.pxi): Conn.feed hands every frame to on_frame, which calls
# the handler of its type with the connection it came from.
cdef int on_frame(Conn conn, int ftype, const unsigned char* p, Py_ssize_t n) except -1
cdef int handle_client_info(Conn conn, const unsigned char* p, Py_ssize_t n) except -1
cdef inline int handle_send_packet(Conn conn, const unsigned char* p, Py_ssize_t n) except -1
cdef inline int handle_forward_packet(Conn conn, const unsigned char* p, Py_ssize_t n) except -1
cdef int handle_ping(Conn conn, const unsigned char* p, Py_ssize_t n) except -1
cdef int handle_note_preferred(Conn conn, const unsigned char* p, Py_ssize_t n) except -1
cdef int handle_watch_conns(Conn conn, const unsigned char* p, Py_ssize_t n) except -1
cdef int handle_close_peer(Conn conn, const unsigned char* p, Py_ssize_t n) except -1
# routing (the sender's route cache) and delivery into a receiving Conn
cdef inline object route(Conn conn, const unsigned char* dst, bint note)
cdef int heard_from(Conn conn, bytes src) except -1
cdef int heard_from_ptr(Conn conn, const unsigned char* src) except -1
cdef int drop_unknown(Conn conn, const unsigned char* dst, const unsigned char* pkt, Py_ssize_t n,
                      int reason) except -1
cdef inline int enqueue(Conn conn, const unsigned char* src, const unsigned char* pkt, Py_ssize_t n) except -1


cdef inline double monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline double bucket_refill(TokenBucket* b, double now) noexcept nogil:
    """Add what ``b`` earned since it was last counted (at most ``burst``); return its tokens."""
    b.tokens = min(b.burst, b.tokens + (now - b.last) * b.rate)
    b.last = now
    return b.tokens


cdef inline bint bucket_take(TokenBucket* b, double now, double cost) noexcept nogil:
    """Take ``cost`` from ``b`` if it holds that much after refilling (never into debt)."""
    if bucket_refill(b, now) < cost:
        return False
    b.tokens -= cost
    return True
