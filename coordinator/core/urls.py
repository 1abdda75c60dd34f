"""The one reading of a relay or access URL, shared by the settings, the mesh and the probe."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where an http(s) URL's requests go: what a client dials and what it sends as ``Host``."""

    host: str      # to dial (and the TLS server name)
    port: int
    tls: bool
    netloc: str    # the ``Host`` header: host[:port] without userinfo
    path: str      # path and query, "" when the URL has none


def endpoint(url: str) -> Endpoint:
    """The dialling facts of an http:// or https:// URL; ValueError for anything else."""
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"not an http:// or https:// URL with a host: {without_userinfo(url)!r}")
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    port = parts.port if parts.port is not None else DEFAULT_PORTS[parts.scheme]
    return Endpoint(parts.hostname, port, parts.scheme == "https",
                    parts.netloc.rpartition("@")[2], path)


def websocket_endpoint(url: str, path: str, query: str) -> str:
    """A WebSocket URL for ``path`` (appended unless ``url`` ends with it) with ``query``, from an access URL.

    ``url`` may be http(s):// or ws(s)://, with or without the path; ValueError for anything else.
    """
    parts = urlsplit(url.strip())
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None or not parts.hostname:
        raise ValueError(f"{without_userinfo(url)!r} must be an http(s):// or ws(s):// URL with a host")
    base = parts.path.rstrip("/")
    if not base.endswith(path):
        base += path
    return f"{scheme}://{parts.netloc}{base}?{query}"


def websocket_url(url: str) -> str:
    """``url`` with http(s) turned into ws(s), the scheme a WebSocket client dials."""
    parts = urlsplit(url)
    return parts._replace(scheme="wss" if parts.scheme == "https" else "ws").geturl()


def relay_base(url: str) -> str | None:
    """``scheme://host[:port]`` of an absolute http(s) URL with a host, or None if it is unusable.

    Userinfo, path, query and fragment are dropped: a relay is found by scheme, host and port alone,
    and a peer's credentials never end up in logs or in the mesh's link names.
    """
    try:
        parts = urlsplit(url.strip())
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in 0-65535
    except ValueError:
        return None
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        return None
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def derp_url(url: str) -> str | None:
    """``scheme://host[:port]/derp``: where a relay's DERP endpoint is, or None if ``url`` is unusable."""
    base = relay_base(url)
    return None if base is None else base + "/derp"


def same_origin(a: str, b: str) -> bool:
    """True if two URLs name the same scheme, host and port (paths and trailing slashes ignored)."""
    pa, pb = urlsplit(a), urlsplit(b)
    return (
        pa.scheme == pb.scheme
        and (pa.hostname or "").lower() == (pb.hostname or "").lower()
        and (pa.port or DEFAULT_PORTS.get(pa.scheme)) == (pb.port or DEFAULT_PORTS.get(pb.scheme))
    )


def without_userinfo(url: str) -> str:
    """``url`` with any ``user:password@`` removed, for reports and logs."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
