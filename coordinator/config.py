"""Settings from flags and environment (``COORDINATOR_*``, with the seed's ``CODER_*`` aliases)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlsplit


class ConfigError(ValueError):
    """A setting is missing or malformed; the message says which and why."""


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
    """Return ``text`` if it is an absolute http(s) URL with a host, else raise ConfigError."""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{name}: {text!r} must be an absolute http:// or https:// URL with a host")
    return text


def same_url(a: str, b: str) -> bool:
    """True if two URLs name the same scheme, host and port (paths and trailing slashes ignored)."""
    pa, pb = urlsplit(a), urlsplit(b)
    default = {"http": 80, "https": 443}
    return (
        pa.scheme == pb.scheme
        and (pa.hostname or "").lower() == (pb.hostname or "").lower()
        and (pa.port or default.get(pa.scheme)) == (pb.port or default.get(pb.scheme))
    )


def _setting(env: str, default, *, aliases: tuple[str, ...] = (), help: str = "", kind: str = "str"):
    return field(default=default, metadata={"env": env, "aliases": aliases, "help": help, "kind": kind})


@dataclass
class Settings:
    """Everything a replica is configured with. Build with :func:`load_settings`."""

    address: str = _setting(
        "COORDINATOR_ADDRESS", "127.0.0.1:3000", aliases=("CODER_HTTP_ADDRESS", "CODER_ADDRESS"),
        help="host:port this replica listens on",
    )
    data_dir: str = _setting(
        "COORDINATOR_DATA_DIR", "", help="directory for the server key and embedded Postgres (default ~/.local/share/coordinator)",
    )
    access_url: str = _setting(
        "COORDINATOR_ACCESS_URL", "", aliases=("CODER_ACCESS_URL",), help="the load balancer's URL, shared by all replicas",
    )
    relay_url: str = _setting(
        "COORDINATOR_DERP_SERVER_RELAY_URL", "", aliases=("CODER_DERP_SERVER_RELAY_URL",),
        help="this replica's own URL, reachable by its peers (never the load balancer)",
    )
    pg_url: str = _setting(
        "COORDINATOR_PG_CONNECTION_URL", "", aliases=("CODER_PG_CONNECTION_URL",),
        help="PostgreSQL URL; empty starts an embedded Postgres in the data directory",
    )
    region_id: int = _setting(
        "COORDINATOR_DERP_SERVER_REGION_ID", 999, aliases=("CODER_DERP_SERVER_REGION_ID",), kind="int",
        help="DERP region of this replica; replicas mesh within one region",
    )
    heartbeat: float = _setting(
        "COORDINATOR_REPLICA_HEARTBEAT", 2.0, aliases=("CODER_REPLICA_HEARTBEAT",), kind="duration",
        help="replica heartbeat interval (peers are dead after 3 missed)",
    )
    mesh_key: str = _setting(
        "COORDINATOR_DERP_MESH_KEY", "", aliases=("CODER_DERP_MESH_KEY",),
        help="DERP mesh key; by default generated once and stored in Postgres",
    )
    keepalive: float = _setting(
        "COORDINATOR_DERP_KEEPALIVE", 60.0, kind="duration", help="DERP server keepalive interval",
    )
    tls_cert_file: str = _setting(
        "COORDINATOR_TLS_CERT_FILE", "", aliases=("CODER_TLS_CERT_FILE",), help="PEM certificate chain: serve HTTPS",
    )
    tls_key_file: str = _setting("COORDINATOR_TLS_KEY_FILE", "", aliases=("CODER_TLS_KEY_FILE",), help="PEM private key")
    forwarded_allow_ips: str = _setting(
        "COORDINATOR_FORWARDED_ALLOW_IPS", "127.0.0.1,::1",
        help="proxies (IPs or CIDRs, comma-separated) whose X-Forwarded-For is trusted",
    )
    db_wait: float = _setting(
        "COORDINATOR_PG_WAIT", 0.0, kind="duration",
        help="give up starting if Postgres stays unreachable this long (0: keep retrying until it answers)",
    )
    shutdown_timeout: float = _setting(
        "COORDINATOR_SHUTDOWN_TIMEOUT", 5.0, kind="duration",
        help="a stop (SIGTERM, SIGINT) ends within this long, whatever peers, mesh or Postgres do",
    )
    latency_threshold: float = _setting(
        "COORDINATOR_LATENCY_THRESHOLD", 0.010, kind="duration",
        help="warn when a peer, Postgres or the pub/sub is slower than this (median round trip)",
    )
    peer_timeout: float = _setting(
        "COORDINATOR_PEER_TIMEOUT", 3.0, kind="duration", help="timeout of one latency probe to a peer",
    )
    api_token: str = _setting(
        "COORDINATOR_API_TOKEN", "", help="bearer token of the operator API (default: generated once, stored in Postgres)",
    )
    log_level: str = _setting("COORDINATOR_LOG_LEVEL", "info", help="debug, info, warning or error")
    extra: dict = field(default_factory=dict)

    @property
    def listen(self) -> tuple[str, int]:
        return parse_address(self.address, "COORDINATOR_ADDRESS")

    @property
    def data_path(self) -> Path:
        if self.data_dir:
            return Path(self.data_dir).expanduser()
        base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
        return Path(base) / "coordinator"

    def validate(self) -> None:
        """Raise ConfigError for settings that can never work; every message names the variable."""
        self.listen  # noqa: B018 - parses and raises
        if self.access_url:
            check_http_url(self.access_url, "COORDINATOR_ACCESS_URL")
        if self.relay_url:
            check_http_url(self.relay_url, "COORDINATOR_DERP_SERVER_RELAY_URL")
            if self.access_url and same_url(self.relay_url, self.access_url):
                raise ConfigError(
                    "COORDINATOR_DERP_SERVER_RELAY_URL must be this replica's own address, not the access URL "
                    f"({self.access_url}): the access URL is the load balancer, and peers must reach this replica directly"
                )
        if self.heartbeat <= 0:
            raise ConfigError("COORDINATOR_REPLICA_HEARTBEAT must be positive")
        if self.latency_threshold <= 0 or self.peer_timeout <= 0:
            raise ConfigError("COORDINATOR_LATENCY_THRESHOLD and COORDINATOR_PEER_TIMEOUT must be positive")
        if self.keepalive <= 0:
            raise ConfigError("COORDINATOR_DERP_KEEPALIVE must be positive")
        if self.shutdown_timeout <= 0:
            raise ConfigError("COORDINATOR_SHUTDOWN_TIMEOUT must be positive")
        if self.db_wait < 0:
            raise ConfigError("COORDINATOR_PG_WAIT must not be negative (0 keeps retrying)")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigError("COORDINATOR_TLS_CERT_FILE and COORDINATOR_TLS_KEY_FILE must be given together")
        for name, path in (("COORDINATOR_TLS_CERT_FILE", self.tls_cert_file), ("COORDINATOR_TLS_KEY_FILE", self.tls_key_file)):
            if path and not Path(path).is_file():
                raise ConfigError(f"{name}: {path} is not a readable file")
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"COORDINATOR_LOG_LEVEL: {self.log_level!r} is not one of debug, info, warning, error")


def _convert(kind: str, value, name: str):
    if kind == "int":
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: {value!r} is not an integer") from None
    if kind == "duration":
        return parse_duration(value, name)
    return value


def load_settings(overrides: dict | None = None, environ: dict | None = None) -> Settings:
    """Settings from the environment, then ``overrides`` (flags; ``None`` values are ignored)."""
    environ = os.environ if environ is None else environ
    overrides = overrides or {}
    values = {}
    for f in fields(Settings):
        meta = f.metadata
        if not meta:
            continue
        name = meta["env"]
        if overrides.get(f.name) is not None:
            values[f.name] = _convert(meta["kind"], overrides[f.name], "--" + f.name.replace("_", "-"))
            continue
        for var in (name, *meta["aliases"]):
            if environ.get(var, "") != "":
                values[f.name] = _convert(meta["kind"], environ[var], var)
                break
    settings = Settings(**values)
    settings.validate()
    return settings


def settings_help() -> list[tuple[str, str, str]]:
    """(flag, environment variable, help) for every setting, for the CLI and the docs."""
    out = []
    for f in fields(Settings):
        if f.metadata:
            out.append(("--" + f.name.replace("_", "-"), f.metadata["env"], f.metadata["help"]))
    return out
