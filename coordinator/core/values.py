"""Reading one setting's value: durations, booleans, addresses, URLs and sizes, each refused by name when malformed."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from coordinator.core.errors import ConfigError

_BOOLS = {"1": True, "t": True, "true": True, "yes": True, "on": True,
          "0": False, "f": False, "false": False, "no": False, "off": False}

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str | float | int, name: str = "duration") -> float:
    """Parse a Go-style duration (``2s``, ``500ms``, ``1m30s``) or plain seconds into seconds."""
    if isinstance(text, int | float):
        return float(text)
    raw = text.strip()
    try:
        return float(raw)
    except ValueError:
        pass
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(raw):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(raw) or not raw:
        raise ConfigError(f"{name}: {text!r} is not a duration (examples: 2s, 500ms, 1m30s)")
    return total


def parse_bool(text: str | bool, name: str = "flag") -> bool:
    """``true``/``false`` (also 1/0, yes/no, on/off), as Go's strconv.ParseBool and shells spell them."""
    if isinstance(text, bool):
        return text
    raw = str(text).strip().lower()
    if raw in _BOOLS:
        return _BOOLS[raw]
    raise ConfigError(f"{name}: {text!r} is not true or false")


def parse_address(text: str, name: str = "address") -> tuple[str, int]:
    """Parse ``host:port`` (``[::1]:3000`` for IPv6); an empty host means all interfaces."""
    raw = text.strip()
    host, sep, port = raw.rpartition(":")
    if not sep:
        raise ConfigError(f"{name}: {text!r} must be host:port, e.g. 127.0.0.1:3000")
    host = host.strip("[]")
    if host in ("", "*"):
        host = "0.0.0.0"
    try:
        port_num = int(port)
    except ValueError:
        raise ConfigError(f"{name}: port {port!r} is not a number") from None
    if not 0 <= port_num <= 65535:
        raise ConfigError(f"{name}: port {port_num} is out of range 0-65535")
    return host, port_num


def check_http_url(text: str, name: str) -> str:
    """Return ``text`` if it is an absolute http(s) URL with a host and a valid port, else raise ConfigError."""
    try:
        parts = urlsplit(text)
        port = parts.port  # raises for a port that is not a number or out of range
    except ValueError as exc:
        raise ConfigError(f"{name}: {text!r} is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name}: {text!r} must be an absolute http:// or https:// URL with a host")
    if port == 0:
        raise ConfigError(f"{name}: {text!r} has port 0")
    return text


_SIZE = re.compile(r"^\s*(\d+)\s*(|b|kib|kb|k|mib|mb|m|gib|gb|g)\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
               "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


def parse_size(text: str | int, name: str = "size") -> int:
    """Parse a byte count: ``65536``, ``64KiB``, ``64MiB`` (K, M, G are powers of 1024)."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise ConfigError(f"{name}: {text!r} is not a size (examples: 65536, 64KiB, 64MiB)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
