# DERP wire constants: the one place they are defined (docs/derp-protocol.md, "Constants" and "Frames").
# Python sees them through _relay.codec.

cdef enum:
    FRAME_HEADER_LEN = 5
    KEY_LEN = 32
    NONCE_LEN = 24
    MAX_PACKET_SIZE = 65536
    PROTOCOL_VERSION = 2
    MAGIC_LEN = 8

    FRAME_SERVER_KEY = 0x01
    FRAME_CLIENT_INFO = 0x02
    FRAME_SERVER_INFO = 0x03
    FRAME_SEND_PACKET = 0x04
    FRAME_RECV_PACKET = 0x05
    FRAME_KEEP_ALIVE = 0x06
    FRAME_NOTE_PREFERRED = 0x07
    FRAME_PEER_GONE = 0x08
    FRAME_PEER_PRESENT = 0x09
    FRAME_FORWARD_PACKET = 0x0a
    FRAME_WATCH_CONNS = 0x10
    FRAME_CLOSE_PEER = 0x11
    FRAME_PING = 0x12
    FRAME_PONG = 0x13
    FRAME_HEALTH = 0x14
    FRAME_RESTARTING = 0x15

    PEER_GONE_DISCONNECTED = 0x00
    PEER_GONE_NOT_HERE = 0x01
    PEER_GONE_MESH_CONN_BROKE = 0xf0

    PEER_PRESENT_IS_REGULAR = 0x01
    PEER_PRESENT_IS_MESH_PEER = 0x02
    PEER_PRESENT_IS_PROBER = 0x04
    PEER_PRESENT_NOT_IDEAL = 0x08
    PEER_PRESENT_LEN = 51

    CLIENT_INFO_MIN = 56            # key + nonce: an empty box is still refused by NaCl
    CLIENT_INFO_MAX = 262144        # 256 KiB
    PING_MIN = 8
    PING_MAX = 1000
    DISCO_MAGIC_LEN = 6
    DISCO_MIN_LEN = 62              # magic + sender disco key + nonce

    WS_MAX_OUT_MESSAGE = 32768      # coder/websocket's default read limit on Go clients


cdef extern from *:
    """
    /* "DERP" + U+1F511 (key) and "TS" + U+1F4AC (speech balloon), UTF-8 */
    static const char DERP_MAGIC[] = {0x44, 0x45, 0x52, 0x50, (char)0xf0, (char)0x9f, (char)0x94, (char)0x91};
    static const char DERP_DISCO_MAGIC[] = {0x54, 0x53, (char)0xf0, (char)0x9f, (char)0x92, (char)0xac};
    """
    const char* DERP_MAGIC
    const char* DERP_DISCO_MAGIC


cdef inline unsigned int read_be32(const unsigned char* p) noexcept nogil:
    return (<unsigned int>p[0] << 24) | (<unsigned int>p[1] << 16) | (<unsigned int>p[2] << 8) | p[3]


cdef inline void write_header(unsigned char* p, unsigned char ftype, unsigned int length) noexcept nogil:
    p[0] = ftype
    p[1] = (length >> 24) & 0xff
    p[2] = (length >> 16) & 0xff
    p[3] = (length >> 8) & 0xff
    p[4] = length & 0xff
