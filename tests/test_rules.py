"""The shared rules, each with one home: URL reading (coordinator.core.urls), error text and the
"Failed to dial peers" wording (coordinator.core.errors), liveness (coordinator.cluster.registry.ALIVE_SQL),
findings, their roll-up and the latency limit (coordinator.core.health), the operator's timestamps
(coordinator.core.timestamps), the operator views' read of the replicas table (coordinator.cluster.registry.view),
which relay stats are gauges (DerpRelay.GAUGES), the protocol version (_relay.codec), and one HTTP client path
(coordinator.relay.httpclient; the DERP upgrade alone in coordinator.relay.client)."""

from __future__ import annotations

import inspect
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from _relay import codec
from coordinator.cluster import controlplane, latency, mesh
from coordinator.cluster import registry as replicas
from coordinator.cluster.pubsub import pgconn
from coordinator.cluster.registry import table as registry_table
from coordinator.core import settings as config
from coordinator.core.errors import DIAL_ERROR, ConfigError, describe, dial_error, merge_dial_errors, one_line
from coordinator.core.health import LATENCY_THRESHOLD, SEVERITIES, Finding, overall
from coordinator.core.keys import NodeKey
from coordinator.core.timestamps import iso_utc
from coordinator.core.urls import derp_url, endpoint, relay_base, same_origin, websocket_url, without_userinfo
from coordinator.core.values import check_http_url
from coordinator.ops import prometheus
from coordinator.ops.probe import discovery
from coordinator.ops.probe.run import run_probe
from coordinator.ops.prometheus import RelayCollector
from coordinator.relay.dataplane import DerpRelay


@pytest.mark.parametrize(
    ("url", "base"),
    [
        ("http://10.0.0.1:80", "http://10.0.0.1:80"),
        ("https://a.example/derp/", "https://a.example"),
        (" http://u:secret@h:3000/x?y#z ", "http://h:3000"),
        ("http://[::1]:3000", "http://[::1]:3000"),
        ("10.0.0.1:80", None),
        ("ftp://h", None),
        ("http://", None),
        ("http://h:notaport", None),
        ("http://h:70000", None),
        ("", None),
    ],
)
def test_relay_base(url, base):
    assert relay_base(url) == base
    assert derp_url(url) == (None if base is None else base + "/derp")


def test_one_reading_of_urls_everywhere():
    assert derp_url("http://u:p@h:1/anything") == "http://h:1/derp"
    with pytest.raises(ConfigError, match="COORDINATOR_ACCESS_URL"):
        check_http_url("http://h:notaport", "COORDINATOR_ACCESS_URL")
    assert same_origin("http://H:80/a", "http://h/b") and not same_origin("http://h", "https://h")
    assert same_origin("https://h:443", "https://h/")
    assert without_userinfo("http://u:p@h:1/x") == "http://h:1/x"


def test_error_text():
    assert describe(TimeoutError()) == "timed out"
    assert describe(TimeoutError("no reply within 3s")) == "no reply within 3s"
    assert describe(OSError("a\n  b")) == "a b"
    assert describe(ValueError()) == "ValueError"
    assert len(describe(RuntimeError("x" * 1000))) == 300
    assert one_line("a\n\tb  c") == "a b c"


def test_dial_errors_built_and_merged_by_one_rule():
    assert dial_error([]) is None
    assert dial_error(["a: refused"]) == "Failed to dial peers: a: refused"
    merged = merge_dial_errors(dial_error(["a: x"]), None, dial_error(["b: y", "c: z"]))
    assert merged == DIAL_ERROR + "a: x; b: y; c: z"
    assert merge_dial_errors(None, "") is None
    assert controlplane.merge_dial_errors is merge_dial_errors
    assert mesh.dial_error is latency.dial_error is dial_error


def test_liveness_sql_has_one_home():
    assert replicas.ALIVE_SQL in discovery._REPLICAS_SQL and replicas.ALIVE_SQL in discovery._REPLICAS_SQL_V1
    assert f"{replicas.MISSED_BEATS} * heartbeat_ms" in replicas.ALIVE_SQL


def test_endpoint_is_the_one_dialling_rule():
    where = endpoint("https://u:p@Relay.example/derp?x=1")
    assert (where.host, where.port, where.tls, where.netloc, where.path) == (
        "relay.example", 443, True, "Relay.example", "/derp?x=1")
    assert endpoint("http://[::1]:3000").port == 3000 and endpoint("http://[::1]:3000").path == ""
    for bad in ("ftp://h/", "10.0.0.1:80", "http://"):
        with pytest.raises(ValueError):
            endpoint(bad)
    assert websocket_url("https://h/derp") == "wss://h/derp" and websocket_url("http://h:1/derp") == "ws://h:1/derp"
    # Where a client dials is derived here only; the rest read a URL's password or validate settings.
    assert _users("urlsplit(") == {"coordinator/core/urls.py", "coordinator/core/values.py",
                                   "coordinator/core/settings.py", "coordinator/cluster/db.py"}


ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "coordinator").rglob("*.py"))
EVERY_SOURCE = sorted(p for d in ("coordinator", "tests", "testkit", "scripts") for p in (ROOT / d).rglob("*.py"))


def _users(needle: str, sources: list[Path] = SOURCES) -> set[str]:
    """The modules (the package's by default) whose text contains ``needle``, as paths from the repository root."""
    return {path.relative_to(ROOT).as_posix() for path in sources if needle in path.read_text(encoding="utf-8")}


def test_one_http_client_path_and_anyio_timeouts():
    # Sockets opened by hand: the DERP upgrade, and the timed latency checks (h11 parses, nothing in between).
    assert _users("asyncio.open_connection(") == {"coordinator/relay/client.py", "coordinator/relay/httpclient.py"}
    assert _users("import h11") == {"coordinator/relay/httpclient.py"}
    assert _users("import urllib.request") == set() and _users("http.client") == set()
    # Clients are made in one place (our TLS context, no proxies, anyio timeouts); others only name httpx's errors.
    made_elsewhere = _users("httpx.AsyncClient(") | _users("httpx.Client(") | _users("httpx.get(") | _users("httpx.post(")
    assert made_elsewhere == {"coordinator/relay/httpclient.py"}
    assert _users("import httpx") <= {"coordinator/relay/httpclient.py", "coordinator/relay/admission.py",
                                      "coordinator/ops/probe/discovery.py", "coordinator/cli/demo.py",
                                      "coordinator/relay/derpconfig.py", "coordinator/relay/relaycheck.py"}
    assert _users("asyncio." + "wait_for(", EVERY_SOURCE) == set()  # relay/client.py says why


def test_helpers_are_imported_not_put_on_the_path():
    assert _users("sys.path" + ".insert", EVERY_SOURCE) == set()
    assert _users("sys.path" + "[:0]", EVERY_SOURCE) <= {"scripts/bench/relay_server.py"}  # --relay-path A/B builds


def test_findings_roll_up_and_the_latency_limit_have_one_home():
    assert overall([]) == "ok"
    assert overall([Finding("EDB02", "warning", "slow")]) == "warning"
    assert overall([Finding("EDB02", "warning", "x"), Finding("EDB01", "error", "y")]) == "error"
    assert SEVERITIES == ("warning", "error")
    assert LATENCY_THRESHOLD == 0.010
    assert config.Settings().latency_threshold == LATENCY_THRESHOLD
    assert latency.LatencyMonitor().threshold == LATENCY_THRESHOLD
    assert inspect.signature(run_probe).parameters["threshold"].default == LATENCY_THRESHOLD
    for user in ("coordinator/ops/api.py", "coordinator/ops/status.py"):
        assert user in _users("overall(findings)")
    assert _users('f.severity == "error"') == set()
    assert _users("0.010") == {"coordinator/core/health.py"}


def test_timestamps_have_one_format():
    assert iso_utc(datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)) == "2026-01-02T03:04:05.678901Z"
    assert iso_utc(datetime(2026, 1, 2, 5, 4, 5, tzinfo=timezone(timedelta(hours=2)))) == "2026-01-02T03:04:05Z"
    assert iso_utc().endswith("Z")
    assert _users('.replace("+00:00", "Z")') == {"coordinator/core/timestamps.py"}


def test_operator_views_read_replicas_through_the_registry():
    assert "peer_latencies" in registry_table._SELECT_VIEW and "updated_at" in registry_table._SELECT_VIEW
    assert _users("FROM replicas") <= {"coordinator/cluster/registry/table.py", "coordinator/ops/probe/discovery.py"}


def test_relay_stats_declare_their_kind_and_the_upgrade_names_the_protocol_version():
    relay = DerpRelay(NodeKey.generate())
    stats = relay.stats()
    assert DerpRelay.GAUGES <= set(stats)
    kinds = {m.name: m.type for m in RelayCollector(relay).collect()}
    for name, value in stats.items():
        if isinstance(value, dict):
            continue
        exported = f"coordinator_derp_{name}" if name in DerpRelay.GAUGES else \
            f"coordinator_derp_{prometheus.COUNTER_NAMES.get(name, name)}"
        assert kinds[exported] == ("gauge" if name in DerpRelay.GAUGES else "counter"), name
    assert f"Derp-Version: {codec.PROTOCOL_VERSION}\r\n".encode() in relay.upgrade_response()


def test_no_alias_layer():
    assert not hasattr(mesh, "normalize_relay_url") and not hasattr(config, "same_url")
    assert not hasattr(pgconn, "abort") and not hasattr(replicas, "Replica")
