"""What Postgres NOTIFY can carry, checked before anything is sent or LISTENed."""

from __future__ import annotations

import functools

from coordinator.cluster.pubsub.errors import InvalidChannel, InvalidPayload, PayloadTooLarge

MAX_PAYLOAD_BYTES = 8000  # Postgres rejects NOTIFY payloads of 8000 bytes or more (default build)
MAX_CHANNEL_BYTES = 63  # NAMEDATALEN - 1: LISTEN would silently truncate a longer name
QUEUE_SIZE = 2048  # unhandled messages buffered per subscriber (Coder's BufferSize)
COLOSSAL_BYTES = 7600  # 95% of the limit, labelled so operators notice payloads creeping up on it


def check_channel(channel: str) -> str:
    """Return ``channel`` if Postgres can LISTEN on it exactly, else raise InvalidChannel."""
    if not isinstance(channel, str):
        raise InvalidChannel(f"channel must be str, not {type(channel).__name__}")
    return _check_channel_name(channel)


@functools.lru_cache(maxsize=4096)  # publishers reuse a few names, and this is on the per-message path
def _check_channel_name(channel: str) -> str:
    size = len(channel.encode("utf-8", "surrogatepass"))
    if not 0 < size <= MAX_CHANNEL_BYTES or "\x00" in channel:
        raise InvalidChannel(
            f"channel name must be 1-{MAX_CHANNEL_BYTES} bytes without NUL; got {size} bytes: {channel[:70]!r}"
        )
    return channel


def check_payload(payload: bytes | str) -> tuple[str, int]:
    """Return the payload as text and its size in bytes, or raise InvalidPayload / PayloadTooLarge."""
    if isinstance(payload, str):
        text = payload
        try:
            size = len(text) if text.isascii() else len(text.encode())
        except UnicodeEncodeError as exc:
            raise InvalidPayload(f"payload is not encodable as UTF-8: {exc}") from None
    elif isinstance(payload, bytes | bytearray | memoryview):
        raw = bytes(payload)
        try:
            text = raw.decode()
        except UnicodeDecodeError as exc:
            raise InvalidPayload(f"payload is not UTF-8 text: {exc}") from None
        size = len(raw)
    else:
        raise TypeError(f"payload must be bytes or str, not {type(payload).__name__}")
    if size >= MAX_PAYLOAD_BYTES:
        raise PayloadTooLarge(
            f"payload is {size} bytes; Postgres NOTIFY payloads must be under {MAX_PAYLOAD_BYTES} bytes"
            " (send ids and let the receiver query)"
        )
    if "\x00" in text:
        raise InvalidPayload("payload contains a NUL character, which Postgres text cannot hold")
    return text, size
