"""The relay as the control plane sees it: server key, handshake policy and the Cython data plane."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from _relay.relay import Forwarder, RelayServer
from coordinator.handshake import ServerHandshake
from coordinator.keys import NodeKey, load_or_create_server_key

log = logging.getLogger("coordinator.derp")

SERVER_KEY_FILE = "derper.key"


class DerpRelay:
    """One replica's embedded DERP relay; the HTTP layer hands upgraded sockets to :meth:`accept`."""

    def __init__(self, server_key: NodeKey, *, mesh_key: str | None = None, keepalive: float = 60.0, **tuning):
        self.key = server_key
        self.handshake = ServerHandshake(server_key, mesh_key)
        self.server = RelayServer(server_key.public, self.handshake, keepalive=keepalive, **tuning)

    @classmethod
    def from_data_dir(cls, data_dir: Path, **kwargs) -> DerpRelay:
        """Load (or create on first start) the server key under ``data_dir``."""
        key = load_or_create_server_key(Path(data_dir) / SERVER_KEY_FILE)
        log.info("DERP server key %s (from %s)", key.public_text, Path(data_dir) / SERVER_KEY_FILE)
        return cls(key, **kwargs)

    @property
    def public_key(self) -> bytes:
        return self.key.public

    @property
    def mesh_key(self) -> str | None:
        return self.handshake.mesh_key

    def set_mesh_key(self, mesh_key: str | None) -> None:
        """Install the deployment's mesh key (read from Postgres); applies to new connections."""
        self.handshake.mesh_key = mesh_key or None

    def upgrade_response(self) -> bytes:
        """The exact 101 response of a raw DERP upgrade (sent together with ServerKey)."""
        return (
            b"HTTP/1.1 101 Switching Protocols\r\n"
            b"Upgrade: DERP\r\n"
            b"Connection: Upgrade\r\n"
            b"Derp-Version: 2\r\n"
            b"Derp-Public-Key: " + self.key.public.hex().encode() + b"\r\n\r\n"
        )

    def accept(self, transport, prefix: bytes = b"", pending: bytes = b"", **kwargs):
        return self.server.accept(transport, prefix, pending, **kwargs)

    def forwarder(
        self, transport, name: str = "", on_congested: Callable[[Forwarder], None] | None = None
    ) -> Forwarder:
        """A Forwarder that sends ForwardPacket frames over ``transport`` (a raw DERP mesh link).

        ``on_congested(forwarder)`` is called when the link starts pushing back on its senders;
        whoever handles it calls ``forwarder.resume()`` once the transport drains (else the relay's
        once-a-second ticker does).
        """
        return Forwarder(self.server, transport, name, on_congested=on_congested)

    def start(self) -> None:
        self.server.start()

    def close(self, restarting: tuple[int, int] | None = None) -> None:
        """Close every client; ``restarting=(reconnect_in_ms, try_for_ms)`` first sends each a Restarting frame."""
        self.server.close_all(restarting)

    def stats(self) -> dict:
        return self.server.stats()
