# cython: language_level=3
"""The DERP relay's data plane: connections, routing table, send queues, forwarders, counters.

After the HTTP upgrade a connection's transport belongs to a :class:`Conn`, an asyncio protocol
implemented here. Frames are parsed in place from the bytes the event loop hands over, routed by a
dict from 32-byte key to destination, and copied into the destination's output buffer. Every
destination touched while handling one read is flushed once at its end (write coalescing). When a
destination's transport pushes back, packets wait (copied once more) in bounded queues, data and
disco apart, that drop the oldest packet when full, so a sender is never blocked by a slow
receiver. A mesh link is
different (as in Go's derper, whose forwarding write stalls the sender's reader): while its
transport holds more than ``max_buffer`` unsent bytes, the senders that route to it stop being read
until it drains, which pushes back on them over TCP instead of dropping.

Only per-connection events (handshake, registration, close, keepalive ticks) touch Python objects
beyond the dict lookup. The handshake itself (NaCl boxes, JSON) is a Python callable injected by
the control plane, and so is admission (asked once per handshake, possibly asynchronously);
nothing here knows about HTTP, Postgres or configuration. A per-client rate limit is a token
bucket charged once per read; while it is in debt the connection is not read.

relay.pxd declares every class's fields and C methods; the code is in the included parts:
writer.pxi (output buffers, mesh forwarders), websocket.pxi (WebSocket framing, its own class),
conn.pxi (one client connection: its reads, frame reassembly, lifecycle, handshake), frames.pxi
(one handler per frame type, and the routing and delivery they share), server.pxi (registry,
routing table, ticker, counters' Python view).
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

import asyncio
import inspect
import ipaddress
import logging
import random
from collections import deque

log = logging.getLogger("coordinator.relay")

# Why packets are dropped: the name (in stats() and metrics) of each index of Counters.drops.
DROP_REASONS = {
    DROP_UNKNOWN_DEST: "unknown_dest",
    DROP_UNKNOWN_DEST_ON_FWD: "unknown_dest_on_fwd",
    DROP_GONE: "gone",
    DROP_QUEUE_HEAD: "queue_head",
    DROP_QUEUE_TAIL: "queue_tail",
    DROP_WRITE_ERROR: "write_error",
}
assert sorted(DROP_REASONS) == list(range(N_DROPS)), "every drop reason needs a name"


class ProtocolViolation(Exception):
    """A peer broke the DERP or WebSocket protocol; the message is the logged reason."""


cdef inline bint looks_like_disco(const unsigned char* pkt, Py_ssize_t n) noexcept nogil:
    return n >= P.DISCO_MIN_LEN and memcmp(pkt, P.DERP_DISCO_MAGIC, P.DISCO_MAGIC_LEN) == 0


cdef inline void write_recv_packet(unsigned char* f, const unsigned char* src, const unsigned char* pkt,
                                   Py_ssize_t n) noexcept nogil:
    """A RecvPacket frame from ``src`` carrying ``n`` bytes of ``pkt``, written at ``f``."""
    P.write_header(f, P.FRAME_RECV_PACKET, <unsigned int>(P.KEY_LEN + n))
    memcpy(f + P.FRAME_HEADER_LEN, src, P.KEY_LEN)
    memcpy(f + P.FRAME_HEADER_LEN + P.KEY_LEN, pkt, n)


@cython.final
cdef class Counters:
    """Relay-wide counters; ``RelayServer.stats()`` is the Python view."""

    cdef inline void drop(self, int reason, unsigned long long packets, Py_ssize_t nbytes) noexcept:
        """The one place a dropped packet is counted."""
        self.drops[reason] += packets
        self.drop_bytes[reason] += nbytes


include "writer.pxi"
include "websocket.pxi"
include "conn.pxi"
include "frames.pxi"
include "server.pxi"
