"""Types of the compiled ``_relay.codec`` (codec.pyx); tests/test_stubs.py keeps the names in step."""

from typing_extensions import Buffer

FRAME_HEADER_LEN: int
KEY_LEN: int
NONCE_LEN: int
MAX_PACKET_SIZE: int
PROTOCOL_VERSION: int
MAGIC: bytes
DISCO_MAGIC: bytes
MAX_CLIENT_FRAME: int
MAX_WRITE_FRAME: int

SERVER_KEY: int
CLIENT_INFO: int
SERVER_INFO: int
SEND_PACKET: int
RECV_PACKET: int
KEEP_ALIVE: int
NOTE_PREFERRED: int
PEER_GONE: int
PEER_PRESENT: int
FORWARD_PACKET: int
WATCH_CONNS: int
CLOSE_PEER: int
PING: int
PONG: int
HEALTH: int
RESTARTING: int

PEER_GONE_DISCONNECTED: int
PEER_GONE_NOT_HERE: int
PEER_GONE_MESH_CONN_BROKE: int
PEER_PRESENT_IS_REGULAR: int
PEER_PRESENT_IS_MESH_PEER: int
PEER_PRESENT_IS_PROBER: int
PEER_PRESENT_NOT_IDEAL: int
CLIENT_INFO_MIN: int
CLIENT_INFO_MAX: int
PING_MAX: int
WS_MAX_OUT_MESSAGE: int

FRAME_NAMES: dict[int, str]

class FrameError(ValueError): ...

def header(ftype: int, length: int) -> bytes: ...
def frame(ftype: int, *parts: Buffer) -> bytes: ...
def send_packet(dst: bytes, data: Buffer) -> bytes: ...
def forward_packet(src: bytes, dst: bytes, data: Buffer) -> bytes: ...
def is_disco(data: bytes | bytearray | memoryview) -> bool: ...

class FrameReader:
    """Incremental frame parser: ``feed`` returns the complete frames as (type, payload) pairs."""

    def __init__(self, max_frame: int = ...) -> None: ...
    @property
    def buffered(self) -> int: ...
    def feed(self, data: Buffer) -> list[tuple[int, bytes]]: ...
