"""Curve25519 node keys as Tailscale encodes them, and the server key file derper uses."""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path

from nacl.bindings import crypto_scalarmult_base
from nacl.public import PrivateKey

KEY_LEN = 32
MESH_KEY_HEX_LEN = 2 * KEY_LEN  # a DERP mesh key is 32 bytes written as 64 hex characters, as Go's key.DERPMesh


class InvalidKey(ValueError):
    """A key or key file is malformed."""


def clamp(raw: bytes) -> bytes:
    """Clamp a Curve25519 private key the way Tailscale does at generation."""
    b = bytearray(raw)
    b[0] &= 248
    b[31] = (b[31] & 127) | 64
    return bytes(b)


def short(key: bytes) -> str:
    """Tailscale's ShortString: ``[`` + first 5 base64 chars + ``]``, for logs."""
    return "[" + base64.b64encode(key).decode()[:5] + "]"


def parse_hex_key(text: str, prefix: str) -> bytes:
    """Parse ``<prefix>:<64 hex>`` (or bare hex) into 32 bytes."""
    raw = text.strip()
    if raw.startswith(prefix + ":"):
        raw = raw[len(prefix) + 1 :]
    try:
        key = bytes.fromhex(raw)
    except ValueError:
        raise InvalidKey(f"{text!r} is not a {prefix} (64 hex digits)") from None
    if len(key) != KEY_LEN:
        raise InvalidKey(f"{prefix} must be 32 bytes, got {len(key)}")
    return key


def parse_mesh_key(text: str) -> bytes:
    """The 32 bytes of a DERP mesh key (64 hex characters, surrounding whitespace ignored).

    The one home of the mesh-key rule: settings, key files and the handshake all use it.
    """
    raw = text.strip() if isinstance(text, str) else ""
    if len(raw) != MESH_KEY_HEX_LEN:
        raise InvalidKey(f"a mesh key is {MESH_KEY_HEX_LEN} hex characters, got {len(raw)}")
    try:
        return bytes.fromhex(raw)
    except ValueError:
        raise InvalidKey(f"a mesh key is {MESH_KEY_HEX_LEN} hex characters (0-9, a-f)") from None


@dataclass(frozen=True)
class NodeKey:
    """A node (or DERP server) key pair."""

    private: bytes
    public: bytes

    @classmethod
    def generate(cls) -> NodeKey:
        return cls.from_private(clamp(os.urandom(KEY_LEN)))

    @classmethod
    def from_private(cls, private: bytes) -> NodeKey:
        if len(private) != KEY_LEN:
            raise InvalidKey("private key must be 32 bytes")
        return cls(private, crypto_scalarmult_base(private))

    @property
    def nacl(self) -> PrivateKey:
        return PrivateKey(self.private)

    @property
    def public_text(self) -> str:
        return "nodekey:" + self.public.hex()

    def __repr__(self) -> str:
        return f"NodeKey({short(self.public)})"


def load_or_create_server_key(path: Path) -> NodeKey:
    """Read derper's key file ``{"PrivateKey": "privkey:<hex>"}``, creating it (mode 0600) if absent."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        text = None
    except OSError as exc:
        raise InvalidKey(f"cannot read the server key file {path}: {exc.strerror}") from None
    if text is not None:
        try:
            data = json.loads(text)
            return NodeKey.from_private(parse_hex_key(data["PrivateKey"], "privkey"))
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidKey(f"server key file {path} is unreadable ({exc}); move it away to generate a new key") from None
    key = NodeKey.generate()
    tmp = path.with_suffix(".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"PrivateKey": "privkey:" + key.private.hex()}, indent="\t") + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise InvalidKey(f"cannot create the server key file {path}: {exc.strerror}") from None
    return key
