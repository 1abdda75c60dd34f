"""Settings from flags and environment (``COORDINATOR_*``, with the seed's ``CODER_*`` aliases)."""

from __future__ import annotations

import os
import re
import ssl
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlsplit

from coordinator.core.keys import InvalidKey, parse_mesh_key
from coordinator.core.urls import same_origin

ROOT_DATA_DIR = "/var/lib/coordinator"


class ConfigError(ValueError):
    """A setting is missing or malformed; the message says which and why."""


DEFAULT_PROMETHEUS_ADDRESS = "127.0.0.1:2112"  # Coder's default
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


def same_url(a: str, b: str) -> bool:
    """True if two URLs name the same scheme, host and port (paths and trailing slashes ignored)."""
    return same_origin(a, b)


_MISSING = object()


def _setting(flag: str, env: str, default=_MISSING, *, aliases: tuple[str, ...] = (), help: str = "", kind: str = "str",
             secret: bool = False):
    """One setting: its flag and environment names side by side (``aliases``: the seed's ``CODER_*`` names).

    ``kind`` is str, int, float, duration, size (bytes, also a rate in bytes/s), bool, region_id or http_url; ``secret`` settings warn when given as a flag
    (every local user can read a process's command line).
    """
    if not str(flag).startswith("--") or not str(env).startswith("COORDINATOR_") or default is _MISSING:
        raise TypeError(f"declare a setting as _setting('--flag', 'COORDINATOR_NAME', default, ...), not ({flag!r}, {env!r})")
    return field(default=default, metadata={"flag": flag, "env": env, "aliases": aliases, "help": help, "kind": kind,
                                            "secret": secret})


@dataclass
class Settings:
    """Everything a replica is configured with. Build with :func:`load_settings`."""

    address: str = _setting(
        "--address", "COORDINATOR_ADDRESS", "127.0.0.1:3000", aliases=("CODER_HTTP_ADDRESS", "CODER_ADDRESS"),
        help="host:port this replica listens on (*:80 = all interfaces)",
    )
    data_dir: str = _setting(
        "--data-dir", "COORDINATOR_DATA_DIR", "",
        help="directory for the server key and embedded Postgres (empty: ~/.local/share/coordinator, as root /var/lib/coordinator)",
    )
    access_url: str = _setting(
        "--access-url", "COORDINATOR_ACCESS_URL", "", aliases=("CODER_ACCESS_URL",),
        help="the load balancer's URL, shared by all replicas",
    )
    relay_url: str = _setting(
        "--relay-url", "COORDINATOR_DERP_SERVER_RELAY_URL", "", aliases=("CODER_DERP_SERVER_RELAY_URL",),
        help="this replica's own URL, reachable by its peers (never the load balancer)",
    )
    pg_url: str = _setting(
        "--pg-url", "COORDINATOR_PG_CONNECTION_URL", "", aliases=("CODER_PG_CONNECTION_URL",), secret=True,
        help="PostgreSQL URL; empty starts an embedded Postgres in the data directory",
    )
    db_wait: float = _setting(
        "--db-wait", "COORDINATOR_PG_WAIT", 0.0, kind="duration",
        help="give up starting if Postgres stays unreachable this long (0: keep retrying until it answers)",
    )
    shutdown_timeout: float = _setting(
        "--shutdown-timeout", "COORDINATOR_SHUTDOWN_TIMEOUT", 5.0, kind="duration",
        help="a stop (SIGTERM, SIGINT) ends within this long, whatever peers, mesh or Postgres do",
    )
    region_id: int = _setting(
        "--region-id", "COORDINATOR_DERP_SERVER_REGION_ID", 999, aliases=("CODER_DERP_SERVER_REGION_ID",), kind="region_id",
        help="DERP region of this replica; replicas mesh within one region",
    )
    heartbeat: float = _setting(
        "--heartbeat", "COORDINATOR_REPLICA_HEARTBEAT", 2.0, aliases=("CODER_REPLICA_HEARTBEAT",), kind="duration",
        help="replica heartbeat interval (peers are dead after 3 missed)",
    )
    mesh_key: str = _setting(
        "--mesh-key", "COORDINATOR_DERP_MESH_KEY", "", aliases=("CODER_DERP_MESH_KEY",), secret=True,
        help="DERP mesh key, 64 hex characters; by default generated once and stored in Postgres",
    )
    mesh_key_file: str = _setting(
        "--mesh-key-file", "COORDINATOR_DERP_MESH_KEY_FILE", "",
        help="file holding the DERP mesh key (whitespace trimmed), instead of --mesh-key",
    )
    keepalive: float = _setting(
        "--keepalive", "COORDINATOR_DERP_KEEPALIVE", 60.0, kind="duration",
        help="DERP keepalive interval (plus 0-5 s jitter)",
    )
    tls_cert_file: str = _setting(
        "--tls-cert-file", "COORDINATOR_TLS_CERT_FILE", "", aliases=("CODER_TLS_CERT_FILE",),
        help="PEM certificate chain: serve HTTPS (ALPN http/1.1 only)",
    )
    tls_key_file: str = _setting(
        "--tls-key-file", "COORDINATOR_TLS_KEY_FILE", "", aliases=("CODER_TLS_KEY_FILE",), help="PEM private key",
    )
    forwarded_allow_ips: str = _setting(
        "--forwarded-allow-ips", "COORDINATOR_FORWARDED_ALLOW_IPS", "127.0.0.1,::1",
        help="proxies (IPs or CIDRs, comma-separated) whose X-Forwarded-For is trusted",
    )
    latency_threshold: float = _setting(
        "--latency-threshold", "COORDINATOR_LATENCY_THRESHOLD", 0.010, kind="duration",
        help="warn when a peer, Postgres or the pub/sub is slower than this (median round trip)",
    )
    peer_timeout: float = _setting(
        "--peer-timeout", "COORDINATOR_PEER_TIMEOUT", 3.0, kind="duration", help="timeout of one latency probe to a peer",
    )
    api_token: str = _setting(
        "--api-token", "COORDINATOR_API_TOKEN", "", secret=True,
        help="bearer token of the operator API (default: generated once, stored in Postgres)",
    )
    api_token_file: str = _setting(
        "--api-token-file", "COORDINATOR_API_TOKEN_FILE", "",
        help="file holding the operator API's bearer token (whitespace trimmed), instead of --api-token",
    )
    max_connections: int = _setting(
        "--max-connections", "COORDINATOR_MAX_CONNECTIONS", 0, kind="int",
        help="client connections served at once, more get 503 (0: the open-file limit less a reserve)",
    )
    accept_connection_limit: float = _setting(
        "--accept-connection-limit", "COORDINATOR_ACCEPT_CONNECTION_LIMIT", 0.0, kind="float",
        help="new connections accepted per second, more get 503 (0: unlimited)",
    )
    accept_connection_burst: int = _setting(
        "--accept-connection-burst", "COORDINATOR_ACCEPT_CONNECTION_BURST", 0, kind="int",
        help="burst of new connections above the accept rate (0: one second's worth)",
    )
    header_timeout: float = _setting(
        "--header-timeout", "COORDINATOR_HEADER_TIMEOUT", 10.0, kind="duration",
        help="a request (head and body) must arrive this soon after the connection or request starts (else 408)",
    )
    max_request_head: int = _setting(
        "--max-request-head", "COORDINATOR_MAX_REQUEST_HEAD", 64 * 1024, kind="size",
        help="largest request head (request line and headers), larger gets 431",
    )
    preauth_memory: int = _setting(
        "--preauth-memory", "COORDINATOR_PREAUTH_MEMORY", 64 << 20, kind="size",
        help="bytes unfinished request heads, and apart unfinished DERP handshakes, may hold together",
    )
    log_level: str = _setting("--log-level", "COORDINATOR_LOG_LEVEL", "info", help="debug, info, warning or error")
    # -- Prometheus listener (docs/deployment.md) --------------------------------------------------
    prometheus_address: str = _setting(
        "--prometheus-address", "COORDINATOR_PROMETHEUS_ADDRESS", "", aliases=("CODER_PROMETHEUS_ADDRESS",),
        help="host:port serving /metrics without the API token (off when empty); never the main address",
    )
    prometheus_enable: str = _setting(
        "--prometheus-enable", "COORDINATOR_PROMETHEUS_ENABLE", "", aliases=("CODER_PROMETHEUS_ENABLE",),
        help=f"true: serve /metrics on --prometheus-address (default {DEFAULT_PROMETHEUS_ADDRESS}); false: never",
    )
    # -- DERP map, admission control, per-client rate limits (docs/tailscale.md) --------------------
    region_code: str = _setting(
        "--region-code", "COORDINATOR_DERP_SERVER_REGION_CODE", "coordinator", aliases=("CODER_DERP_SERVER_REGION_CODE",),
        help="short code of the DERP region in the DERP map (/derpmap/default)",
    )
    region_name: str = _setting(
        "--region-name", "COORDINATOR_DERP_SERVER_REGION_NAME", "Coordinator Embedded Relay",
        aliases=("CODER_DERP_SERVER_REGION_NAME",), help="long name of the DERP region in the DERP map",
    )
    verify_client_url: str = _setting(
        "--verify-client-url", "COORDINATOR_DERP_VERIFY_CLIENT_URL", "", kind="http_url",
        help="admission webhook: POST {NodePublic, Source} per new client, admit only on {\"Allow\": true}",
    )
    verify_client_url_fail_open: bool = _setting(
        "--verify-client-url-fail-open", "COORDINATOR_DERP_VERIFY_CLIENT_URL_FAIL_OPEN", True, kind="bool",
        help="admit clients while the admission webhook fails (down, slow, garbage answers)",
    )
    verify_client_url_timeout: float = _setting(
        "--verify-client-url-timeout", "COORDINATOR_DERP_VERIFY_CLIENT_URL_TIMEOUT", 5.0, kind="duration",
        help="how long one admission webhook request may take before it counts as failed",
    )
    verify_client_url_cache: float = _setting(
        "--verify-client-url-cache", "COORDINATOR_DERP_VERIFY_CLIENT_URL_CACHE", 5.0, kind="duration",
        help="how long an admission decision is reused for the same key and address (0: ask every time)",
    )
    per_client_rate_limit: int = _setting(
        "--per-client-rate-limit", "COORDINATOR_DERP_PER_CLIENT_RATE_LIMIT", 0, kind="size",
        help="bytes/s each client may send (0: unlimited); enforced by reading less, mesh peers exempt",
    )
    per_client_rate_burst: int = _setting(
        "--per-client-rate-burst", "COORDINATOR_DERP_PER_CLIENT_RATE_BURST", 0, kind="size",
        help="bytes a client may send at once above the rate (default 0.1 s of it; at least one maximum-size packet)",
    )
    # -- peer coordinator (docs/coordinator.md) --------------------------------------------------------
    tailnet_token: str = _setting(
        "--tailnet-token", "COORDINATOR_TAILNET_TOKEN", "", secret=True,
        help="bearer token peers present at /api/v2/tailnet/coordinate (default: generated once, stored in Postgres)",
    )
    tailnet_token_file: str = _setting(
        "--tailnet-token-file", "COORDINATOR_TAILNET_TOKEN_FILE", "",
        help="file holding the peer coordinator's bearer token (whitespace trimmed), instead of --tailnet-token",
    )
    tailnet_max_peers: int = _setting(
        "--tailnet-max-peers", "COORDINATOR_TAILNET_MAX_PEERS", 0, kind="int",
        help="peers this replica coordinates at once, more get an error (0: half its connection budget)",
    )
    extra: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict, repr=False)    # field -> the flag or variable it came from
    warnings: list = field(default_factory=list, repr=False)   # one line each, for the operator

    def source(self, name: str) -> str:
        """What the operator typed for setting ``name`` (its flag or environment variable), else its flag."""
        return self.sources.get(name) or _FIELDS[name].metadata["flag"]

    @property
    def listen(self) -> tuple[str, int]:
        return parse_address(self.address, self.source("address"))

    @property
    def prometheus_listen(self) -> tuple[str, int] | None:
        """Where the token-free /metrics listener binds, or None when it is off (the default)."""
        if self.prometheus_enable.strip() and not parse_bool(self.prometheus_enable, self.source("prometheus_enable")):
            return None
        address = self.prometheus_address or (DEFAULT_PROMETHEUS_ADDRESS if self.prometheus_enable.strip() else "")
        return parse_address(address, self.source("prometheus_address")) if address else None

    @property
    def data_path(self) -> Path:
        if self.data_dir:
            return Path(self.data_dir).expanduser()
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            return Path(ROOT_DATA_DIR)  # a system service's place; also one the embedded Postgres's user can reach
        base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
        return Path(base) / "coordinator"

    def validate(self) -> None:
        """Raise ConfigError for settings that can never work; every message names what the operator typed."""
        src = self.source
        self.listen  # noqa: B018 - parses and raises
        if self.access_url:
            check_http_url(self.access_url, src("access_url"))
        if self.relay_url:
            check_http_url(self.relay_url, src("relay_url"))
            if self.access_url and same_url(self.relay_url, self.access_url):
                raise ConfigError(
                    f"{src('relay_url')} must be this replica's own address, not the access URL "
                    f"({self.access_url}): the access URL is the load balancer, and peers must reach this replica directly"
                )
        if self.mesh_key:
            try:
                parse_mesh_key(self.mesh_key)
            except InvalidKey as exc:
                raise ConfigError(f"{src('mesh_key')}: {exc} (generate one with: openssl rand -hex 32)") from None
        for name in ("heartbeat", "latency_threshold", "peer_timeout", "keepalive", "header_timeout",
                     "shutdown_timeout", "verify_client_url_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{src(name)} must be positive")
        for name in ("max_connections", "accept_connection_limit", "accept_connection_burst", "db_wait",
                     "verify_client_url_cache", "tailnet_max_peers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{src(name)} must not be negative")
        for name in ("max_request_head", "preauth_memory"):
            if getattr(self, name) < 1024:
                raise ConfigError(f"{src(name)} must be at least 1KiB")
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ConfigError(f"{src('tls_cert_file')} and {src('tls_key_file')} must be given together")
        if self.tls_cert_file:
            _check_tls(self.tls_cert_file, self.tls_key_file, src("tls_cert_file"), src("tls_key_file"))
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise ConfigError(f"{src('log_level')}: {self.log_level!r} is not one of debug, info, warning, error")
        self._validate_prometheus()
        self._validate_relay_policy()

    def _validate_prometheus(self) -> None:
        metrics = self.prometheus_listen
        if metrics is None:
            return
        host, port = self.listen
        wildcard = ("0.0.0.0", "::")
        if metrics[1] == port != 0 and (metrics[0] == host or host in wildcard or metrics[0] in wildcard):
            raise ConfigError(
                f"{self.source('prometheus_address')} ({self.prometheus_address or DEFAULT_PROMETHEUS_ADDRESS}) must "
                f"differ from {self.source('address')} ({self.address}): the metrics listener has no token and needs "
                "its own port"
            )

    def _validate_relay_policy(self) -> None:
        """The DERP map, admission and rate-limit block (see the fields above)."""
        for name in ("region_code", "region_name"):
            value = getattr(self, name)
            if not value.strip() or not value.isprintable():
                raise ConfigError(f"{self.source(name)}: {value!r} must be non-empty printable text")
        if self.per_client_rate_burst and not self.per_client_rate_limit:
            raise ConfigError(f"{self.source('per_client_rate_burst')} needs {self.source('per_client_rate_limit')}")


_FIELDS = {f.name: f for f in fields(Settings) if f.metadata}

# Environment variables of this project that are not settings, and CODER_* names with no meaning here.
OTHER_VARIABLES = frozenset({"COORDINATOR_WITH_NGINX", "COORDINATOR_TEST_PG_BINDIR"})


def declared_settings() -> list:
    """The dataclass fields that are settings, in declaration order (each has flag, env, aliases, help, kind)."""
    return list(_FIELDS.values())


def settings_help() -> list[tuple[str, str, str]]:
    """(flag, environment variable, help) for every setting."""
    return [(f.metadata["flag"], f.metadata["env"], f.metadata["help"]) for f in _FIELDS.values()]


def _check_tls(cert: str, key: str, cert_name: str, key_name: str) -> None:
    for name, path in ((cert_name, cert), (key_name, key)):
        if not Path(path).is_file():
            raise ConfigError(f"{name}: {path} is not a readable file")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise ConfigError(f"{cert_name} / {key_name}: not a usable PEM certificate and key ({exc.reason or exc})") from None
    except OSError as exc:
        raise ConfigError(f"{cert_name} / {key_name}: cannot read ({exc.strerror or exc})") from None


def _convert(kind: str, value, name: str):
    if kind in ("int", "float"):
        try:
            return int(value) if kind == "int" else float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}: {value!r} is not {'an integer' if kind == 'int' else 'a number'}") from None
    if kind == "duration":
        return parse_duration(value, name)
    if kind == "size":
        return parse_size(value, name)
    if kind == "bool":
        return parse_bool(value, name)
    if kind == "region_id":  # tailcfg: positive, and it must fit in a JavaScript number
        number = _convert("int", value, name)
        if not 0 < number <= 2**53:
            raise ConfigError(f"{name}: {value!r} must be a positive integer")
        return number
    if kind == "http_url":
        return check_http_url(value, name) if value else value
    return value


def _read_secret_file(path: str, name: str) -> str:
    try:
        text = Path(path).expanduser().read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path}: {exc.strerror or exc}") from None
    if not text:
        raise ConfigError(f"{name}: {path} is empty")
    return text


def _has_password(url: str) -> bool:
    try:
        return bool(urlsplit(url).password) or "password=" in url
    except ValueError:
        return False


def _unknown_variables(environ) -> list[str]:
    known = set(OTHER_VARIABLES)
    for f in _FIELDS.values():
        known.add(f.metadata["env"])
        known.update(f.metadata["aliases"])
    odd = sorted(v for v in environ if v.startswith(("COORDINATOR_", "CODER_")) and v not in known)
    return [f"ignoring environment variables this project does not know: {', '.join(odd)}"] if odd else []


def load_settings(overrides: dict | None = None, environ: dict | None = None) -> Settings:
    """Settings from the environment, then ``overrides`` (flags by field name; ``None`` values are ignored)."""
    environ = os.environ if environ is None else environ
    overrides = overrides or {}
    values, sources = {}, {}
    notes = _unknown_variables(environ)
    for name, f in _FIELDS.items():
        meta = f.metadata
        if overrides.get(name) is not None:
            values[name] = _convert(meta["kind"], overrides[name], meta["flag"])
            sources[name] = meta["flag"]
            if meta["secret"] and values[name] and (name != "pg_url" or _has_password(values[name])):
                notes.append(f"{meta['flag']} on the command line is readable by every local user (/proc/PID/cmdline); "
                             f"prefer {meta['env']}" + (f" or {meta['flag']}-file" if f"{name}_file" in _FIELDS else ""))
            continue
        for var in (meta["env"], *meta["aliases"]):
            if environ.get(var, "") != "":
                values[name] = _convert(meta["kind"], environ[var], var)
                sources[name] = var
                break
    for secret in ("mesh_key", "api_token", "tailnet_token"):
        path = values.get(f"{secret}_file")
        if not path:
            continue
        if values.get(secret):
            raise ConfigError(f"give {sources[secret]} or {sources[secret + '_file']}, not both")
        values[secret] = _read_secret_file(path, sources[secret + "_file"])
        sources[secret] = sources[secret + "_file"]
    settings = Settings(**values, sources=sources, warnings=notes)
    settings.validate()
    return settings


def ensure_data_dir(settings: Settings) -> Path:
    """Create the data directory if needed; ConfigError (naming the setting) if it cannot be used."""
    path = settings.data_path
    name = settings.source("data_dir") if settings.data_dir else f"{settings.source('data_dir')} (default {path})"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{name}: {path} exists and is not a directory") from None
    except OSError as exc:
        raise ConfigError(f"{name}: cannot create {path}: {exc.strerror or exc}") from None
    if not path.is_dir():
        raise ConfigError(f"{name}: {path} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{name}: {path} is not writable by this user (uid {os.getuid()})")
    return path


def default_text(f) -> str:
    """A setting's default as the operator would write it, for --help and the docs."""
    value, kind = f.default, f.metadata["kind"]
    if kind == "bool":
        return "true" if value else "false"
    if kind == "duration":
        return f"{value * 1000:g}ms" if 0 < value < 1 else f"{value:g}s"
    if kind == "size" and value:
        for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
            if value % scale == 0:
                return f"{value // scale}{unit}"
    if value in ("", 0, 0.0):
        return "-" if value == "" else "0"
    return str(value)
