"""The relay as the control plane sees it: server key, handshake policy and the Cython data plane."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from _relay import codec
from _relay.relay import Forwarder, RelayServer
from coordinator.core.keys import NodeKey, load_or_create_server_key
from coordinator.core.settings import Settings
from coordinator.relay.admission import AdmitHook, WebhookAdmission, guarded
from coordinator.relay.handshake import ServerHandshake

log = logging.getLogger("coordinator.derp")

SERVER_KEY_FILE = "derper.key"


class DerpRelay:
    """One replica's embedded DERP relay; the HTTP layer hands upgraded sockets to :meth:`accept`.

    ``admit`` is an embedder's ``async admit(key: bytes, source_ip: str) -> bool``, asked once per
    new client (never for mesh peers) before ServerInfo is sent; a :class:`WebhookAdmission` is
    used as it is. ``rate_limit`` (bytes/s) and ``rate_burst`` limit what each client may send.
    """

    def __init__(self, server_key: NodeKey, *, mesh_key: str | None = None, keepalive: float = 60.0,
                 admit: AdmitHook | WebhookAdmission | None = None, rate_limit: int = 0, rate_burst: int = 0,
                 **tuning):
        self.key = server_key
        self.handshake = ServerHandshake(server_key, mesh_key)
        self.admission = admit
        if admit is not None:
            tuning["admit"] = admit if isinstance(admit, WebhookAdmission) else guarded(admit)
        if rate_limit:
            tuning.update(rate_limit=rate_limit, rate_burst=rate_burst)
        self.server = RelayServer(server_key.public, self.handshake, keepalive=keepalive, **tuning)
        if rate_limit:
            log.info("per-client rate limit %d B/s, burst %.0f B%s", rate_limit, self.server.rate_burst,
                     " (raised to one maximum-size packet)" if 0 < rate_burst < self.server.rate_burst else "")

    @classmethod
    def from_settings(cls, settings: Settings) -> DerpRelay:
        """The relay a replica runs: key from the data directory, policy from the settings."""
        admit = None
        if settings.verify_client_url:
            admit = WebhookAdmission(settings.verify_client_url, timeout=settings.verify_client_url_timeout,
                                     fail_open=settings.verify_client_url_fail_open,
                                     cache=settings.verify_client_url_cache)
            log.info("admission control: %s (timeout %g s, %s, decisions reused for %g s)", settings.verify_client_url,
                     settings.verify_client_url_timeout,
                     "fail-open" if settings.verify_client_url_fail_open else "fail-closed",
                     settings.verify_client_url_cache)
        return cls.from_data_dir(settings.data_path, mesh_key=settings.mesh_key or None, keepalive=settings.keepalive,
                                 admit=admit, rate_limit=settings.per_client_rate_limit,
                                 preauth_limit=settings.preauth_memory,
                                 rate_burst=settings.per_client_rate_burst)

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
            b"Derp-Version: " + str(codec.PROTOCOL_VERSION).encode() + b"\r\n"
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

    # The numbers of stats() that are levels (gauges); every other number counts up from zero.
    GAUGES = frozenset({"current_connections", "current_home_connections", "clients_local", "clients_remote",
                        "watchers", "duplicate_keys", "mesh_links_congested", "senders_paused", "admission_pending"})

    def stats(self) -> dict:
        """The relay's counters and levels (:attr:`GAUGES`), plus the admission webhook's own counts."""
        stats = self.server.stats()
        if isinstance(self.admission, WebhookAdmission):
            stats["admission_webhook"] = self.admission.stats()
        return stats
