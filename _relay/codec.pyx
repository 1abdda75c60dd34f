# cython: language_level=3
"""DERP framing for Python code: the protocol constants, frame encoders and an incremental reader.

The relay's hot path does its own framing in C (relay.pyx); this module serves clients, the
control plane and tests, with the same constants from proto.pxd.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.string cimport memcpy

from _relay cimport proto as P

FRAME_HEADER_LEN = P.FRAME_HEADER_LEN
KEY_LEN = P.KEY_LEN
NONCE_LEN = P.NONCE_LEN
MAX_PACKET_SIZE = P.MAX_PACKET_SIZE
PROTOCOL_VERSION = P.PROTOCOL_VERSION
MAGIC = PyBytes_FromStringAndSize(P.DERP_MAGIC, P.MAGIC_LEN)
DISCO_MAGIC = PyBytes_FromStringAndSize(P.DERP_DISCO_MAGIC, P.DISCO_MAGIC_LEN)
MAX_CLIENT_FRAME = 1 << 20  # clients refuse frames over 1 MiB
MAX_WRITE_FRAME = 10 << 20

SERVER_KEY = P.FRAME_SERVER_KEY
CLIENT_INFO = P.FRAME_CLIENT_INFO
SERVER_INFO = P.FRAME_SERVER_INFO
SEND_PACKET = P.FRAME_SEND_PACKET
RECV_PACKET = P.FRAME_RECV_PACKET
KEEP_ALIVE = P.FRAME_KEEP_ALIVE
NOTE_PREFERRED = P.FRAME_NOTE_PREFERRED
PEER_GONE = P.FRAME_PEER_GONE
PEER_PRESENT = P.FRAME_PEER_PRESENT
FORWARD_PACKET = P.FRAME_FORWARD_PACKET
WATCH_CONNS = P.FRAME_WATCH_CONNS
CLOSE_PEER = P.FRAME_CLOSE_PEER
PING = P.FRAME_PING
PONG = P.FRAME_PONG
HEALTH = P.FRAME_HEALTH
RESTARTING = P.FRAME_RESTARTING

PEER_GONE_DISCONNECTED = P.PEER_GONE_DISCONNECTED
PEER_GONE_NOT_HERE = P.PEER_GONE_NOT_HERE
PEER_GONE_MESH_CONN_BROKE = P.PEER_GONE_MESH_CONN_BROKE
PEER_PRESENT_IS_REGULAR = P.PEER_PRESENT_IS_REGULAR
PEER_PRESENT_IS_MESH_PEER = P.PEER_PRESENT_IS_MESH_PEER
PEER_PRESENT_IS_PROBER = P.PEER_PRESENT_IS_PROBER
PEER_PRESENT_NOT_IDEAL = P.PEER_PRESENT_NOT_IDEAL
CLIENT_INFO_MIN = P.CLIENT_INFO_MIN
CLIENT_INFO_MAX = P.CLIENT_INFO_MAX
PING_MAX = P.PING_MAX
WS_MAX_OUT_MESSAGE = P.WS_MAX_OUT_MESSAGE

FRAME_NAMES = {
    P.FRAME_SERVER_KEY: "ServerKey", P.FRAME_CLIENT_INFO: "ClientInfo", P.FRAME_SERVER_INFO: "ServerInfo",
    P.FRAME_SEND_PACKET: "SendPacket", P.FRAME_RECV_PACKET: "RecvPacket", P.FRAME_KEEP_ALIVE: "KeepAlive",
    P.FRAME_NOTE_PREFERRED: "NotePreferred", P.FRAME_PEER_GONE: "PeerGone", P.FRAME_PEER_PRESENT: "PeerPresent",
    P.FRAME_FORWARD_PACKET: "ForwardPacket", P.FRAME_WATCH_CONNS: "WatchConns", P.FRAME_CLOSE_PEER: "ClosePeer",
    P.FRAME_PING: "Ping", P.FRAME_PONG: "Pong", P.FRAME_HEALTH: "Health", P.FRAME_RESTARTING: "Restarting",
}


class FrameError(ValueError):
    """The byte stream is not valid DERP framing."""


def header(int ftype, Py_ssize_t length) -> bytes:
    """The 5-byte frame header: type, then the payload length as uint32 big-endian."""
    if not 0 <= ftype <= 255:
        raise FrameError(f"frame type {ftype} out of range")
    if length < 0 or length > MAX_WRITE_FRAME:
        raise FrameError(f"frame length {length} out of range (max {MAX_WRITE_FRAME})")
    out = PyBytes_FromStringAndSize(NULL, P.FRAME_HEADER_LEN)
    P.write_header(<unsigned char*>PyBytes_AS_STRING(out), <unsigned char>ftype, <unsigned int>length)
    return out


def frame(int ftype, *parts) -> bytes:
    """One whole frame: header plus the concatenated payload parts (bytes-like)."""
    payload = b"".join(parts)
    return header(ftype, len(payload)) + payload


def send_packet(bytes dst, data) -> bytes:
    """A SendPacket frame; ``data`` is at most P.MAX_PACKET_SIZE bytes."""
    cdef Py_ssize_t n = len(data)
    if len(dst) != P.KEY_LEN:
        raise FrameError("destination key must be 32 bytes")
    if n > P.MAX_PACKET_SIZE:
        raise FrameError(f"packet of {n} bytes exceeds the {P.MAX_PACKET_SIZE}-byte limit")
    out = PyBytes_FromStringAndSize(NULL, P.FRAME_HEADER_LEN + P.KEY_LEN + n)
    cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(out)
    P.write_header(p, P.FRAME_SEND_PACKET, <unsigned int>(P.KEY_LEN + n))
    memcpy(p + P.FRAME_HEADER_LEN, PyBytes_AS_STRING(dst), P.KEY_LEN)
    cdef const unsigned char[:] view
    if n:
        view = data
        memcpy(p + P.FRAME_HEADER_LEN + P.KEY_LEN, &view[0], n)
    return out


def forward_packet(bytes src, bytes dst, data) -> bytes:
    """A ForwardPacket frame (mesh peers only)."""
    if len(src) != P.KEY_LEN or len(dst) != P.KEY_LEN:
        raise FrameError("source and destination keys must be 32 bytes")
    if len(data) > P.MAX_PACKET_SIZE:
        raise FrameError(f"packet of {len(data)} bytes exceeds the {P.MAX_PACKET_SIZE}-byte limit")
    return frame(P.FRAME_FORWARD_PACKET, src, dst, data)


def is_disco(data) -> bool:
    """True if a packet looks like a disco message (magic prefix and minimum length)."""
    return len(data) >= P.DISCO_MIN_LEN and bytes(data[:P.DISCO_MAGIC_LEN]) == DISCO_MAGIC


cdef class FrameReader:
    """Incremental frame parser: ``feed(data)`` returns the complete frames as (type, payload) pairs.

    Frames may be split across feeds or coalesced within one; frames larger than ``max_frame``
    raise FrameError, as Go clients refuse frames over 1 MiB.
    """

    def __cinit__(self, Py_ssize_t max_frame=MAX_CLIENT_FRAME):
        self.buf = bytearray()
        self.max_frame = max_frame

    @property
    def buffered(self) -> int:
        return len(self.buf)

    def feed(self, data) -> list:
        cdef list out = []
        cdef const unsigned char* p
        cdef Py_ssize_t n, pos = 0, length
        cdef bytes chunk
        if self.buf:
            self.buf += data
            chunk = bytes(self.buf)
        elif type(data) is bytes:
            chunk = <bytes>data
        else:
            chunk = bytes(data)
        p = <const unsigned char*>PyBytes_AS_STRING(chunk)
        n = PyBytes_GET_SIZE(chunk)
        while n - pos >= P.FRAME_HEADER_LEN:
            length = P.read_be32(p + pos + 1)
            if length > self.max_frame:
                raise FrameError(
                    f"frame of type 0x{p[pos]:02x} with {length}-byte payload exceeds the {self.max_frame}-byte limit"
                )
            if n - pos - P.FRAME_HEADER_LEN < length:
                break
            out.append((p[pos], PyBytes_FromStringAndSize(<const char*>p + pos + P.FRAME_HEADER_LEN, length)))
            pos += P.FRAME_HEADER_LEN + length
        if pos < n:
            self.buf = bytearray(chunk[pos:]) if pos else bytearray(chunk)
        else:
            self.buf = bytearray()
        return out
