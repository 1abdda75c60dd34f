"""The DERP handshake's cryptography: ClientInfo and ServerInfo NaCl boxes, and the mesh-key check.

As Go's derper: a client whose ClientInfo carries a well-formed mesh key that is not ours is
served as an ordinary client (the relay then refuses only its mesh frames); a malformed one is
refused, as Go's JSON decoding of ``key.DERPMesh`` refuses it.

The relay's data plane calls :meth:`ServerHandshake.__call__` once per connection with the
ClientInfo payload; everything here is per connection, never per packet.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import time

from nacl.exceptions import CryptoError
from nacl.public import Box, PublicKey

from _relay import codec
from coordinator.core.keys import KEY_LEN, InvalidKey, NodeKey, parse_mesh_key

log = logging.getLogger("coordinator.handshake")

SERVER_INFO_JSON = b'{"version":2}'


class HandshakeError(ValueError):
    """A client's ClientInfo was refused; the message is the reason logged for it."""


def mesh_keys_equal(presented: str, configured: str) -> bool:
    """Constant-time compare of two mesh keys as bytes (letter case does not matter); False if either is malformed."""
    try:
        return hmac.compare_digest(parse_mesh_key(presented), parse_mesh_key(configured))
    except InvalidKey:
        return False


def _box(private: NodeKey, peer_public: bytes) -> Box:
    if len(peer_public) != KEY_LEN or peer_public == bytes(KEY_LEN):
        raise HandshakeError("zero client key")
    try:
        return Box(private.nacl, PublicKey(peer_public))
    except (CryptoError, RuntimeError, ValueError):
        # libsodium refuses keys whose shared secret is all zeros (low-order points).
        raise HandshakeError("low-order client key") from None


class ServerHandshake:
    """Opens ClientInfo boxes for one server key and decides who may use the mesh frames."""

    def __init__(self, server_key: NodeKey, mesh_key: str | None = None):
        self.server_key = server_key
        self.mesh_key = mesh_key
        self._warned_at = -1e9

    @property
    def mesh_key(self) -> str | None:
        return self._mesh_key

    @mesh_key.setter
    def mesh_key(self, value: str | None) -> None:
        """Raises InvalidKey unless ``value`` is empty or 64 hex characters."""
        self._mesh_key_bytes = parse_mesh_key(value) if value else None
        self._mesh_key = value.strip() if value else None

    def __call__(self, payload: bytes) -> tuple[bytes, dict, bool, bytes]:
        """ClientInfo payload -> (client key, ClientInfo with lower-cased names, can_mesh, ServerInfo payload)."""
        client_key, sealed = payload[:KEY_LEN], payload[KEY_LEN:]
        box = _box(self.server_key, client_key)
        try:
            plain = box.decrypt(sealed[codec.NONCE_LEN :], sealed[: codec.NONCE_LEN])
        except CryptoError:
            raise HandshakeError("ClientInfo box does not open with this server key") from None
        try:
            raw = json.loads(plain)
        except (ValueError, UnicodeDecodeError):
            raise HandshakeError("ClientInfo is not JSON") from None
        if not isinstance(raw, dict):
            raise HandshakeError("ClientInfo is not a JSON object")
        # Go's encoding/json matches field names case-insensitively.
        info = {str(k).lower(): v for k, v in raw.items()}
        can_mesh = False
        presented = info.get("meshkey")
        if presented not in (None, ""):
            try:
                key = parse_mesh_key(presented)
            except InvalidKey as exc:
                raise HandshakeError(f"malformed meshKey: {exc}") from None
            can_mesh = self._mesh_key_bytes is not None and hmac.compare_digest(key, self._mesh_key_bytes)
            if not can_mesh and time.monotonic() - self._warned_at > 60:  # one line a minute, however many try
                self._warned_at = time.monotonic()
                log.warning("a DERP client presented a mesh key that is not ours: serving it as an ordinary client "
                            "(a replica with a different mesh key cannot mesh with this one)")
        nonce = os.urandom(codec.NONCE_LEN)
        return client_key, info, can_mesh, bytes(box.encrypt(SERVER_INFO_JSON, nonce))


def client_info_payload(client_key: NodeKey, server_public: bytes, info: dict, nonce: bytes | None = None) -> bytes:
    """The ClientInfo frame payload: our public key, then the sealed JSON."""
    box = _box(client_key, server_public)
    body = json.dumps(info, separators=(",", ":")).encode()
    return client_key.public + bytes(box.encrypt(body, nonce or os.urandom(codec.NONCE_LEN)))


def open_server_info(client_key: NodeKey, server_public: bytes, payload: bytes) -> dict:
    """Decrypt a ServerInfo payload (nonce + box) into its JSON object."""
    box = _box(client_key, server_public)
    try:
        return json.loads(box.decrypt(payload[codec.NONCE_LEN :], payload[: codec.NONCE_LEN]))
    except (CryptoError, ValueError) as exc:
        raise HandshakeError(f"ServerInfo does not open: {exc}") from None


def parse_server_key(payload: bytes) -> bytes:
    """The server public key from a ServerKey payload (magic + key + ignored extras)."""
    if len(payload) < len(codec.MAGIC) + KEY_LEN or payload[: len(codec.MAGIC)] != codec.MAGIC:
        raise HandshakeError("bad ServerKey frame (wrong magic or too short)")
    return payload[len(codec.MAGIC) : len(codec.MAGIC) + KEY_LEN]
