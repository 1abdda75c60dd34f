"""Prometheus on its own listener: no token, off by default, never the main address; names and the dashboard."""

import contextlib
import json
import re
import socket
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.core.errors import ConfigError
from coordinator.core.settings import load_settings
from testkit.procs import ROOT, Proc, free_port, http_get, python

DASHBOARD = ROOT / "deploy" / "grafana" / "coordinator-dashboard.json"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "summary": ("_count", "_sum"),
            "gauge": ("",), "untyped": ("",), "info": ("_info",)}


@pytest.fixture
def replica(pg_url, tmp_path):
    port, metrics_port = free_port(), free_port()
    p = Proc([python(), "-m", "coordinator", "server", "--address", f"127.0.0.1:{port}", "--data-dir", str(tmp_path),
              "--pg-url", pg_url, "--prometheus-address", f"127.0.0.1:{metrics_port}"],
             env={"COORDINATOR_API_TOKEN": "tok"}, log=tmp_path / "server.log")
    try:
        p.wait_http(f"http://127.0.0.1:{port}/readyz")
        yield f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}", p
    finally:
        p.stop()


def exported(text: str) -> dict[str, str]:
    """Every sample name /metrics can carry (from its TYPE lines, so empty labelled families count) -> type."""
    names = {}
    for family in text_string_to_metric_families(text):
        for suffix in SUFFIXES[family.type]:
            names[family.name + suffix] = family.type
    return names


def test_metrics_without_token_on_their_own_listener(replica):
    main, metrics, proc = replica
    code, text = http_get(metrics + "/metrics")
    assert code == 200 and "coordinator_derp_current_connections" in text and "coordinator_pubsub_connected 1.0" in text
    assert "process_resident_memory_bytes" in text
    assert http_get(metrics + "/status")[0] == 404 and http_get(metrics + "/api/v2/replicas")[0] == 404
    assert http_get(main + "/metrics")[0] == 401  # the main listener still wants the token
    assert http_get(main + "/metrics", "tok")[0] == 200
    host, port = metrics.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:  # junk: closed, nothing else
        s.sendall(b"\x16\x03\x01" + b"A" * 20000)
        s.settimeout(5)
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            while s.recv(65536):
                pass
    assert http_get(metrics + "/metrics")[0] == 200
    assert proc.proc.poll() is None


def test_metric_names_follow_prometheus_conventions(replica):
    _, metrics, _ = replica
    for family in text_string_to_metric_families(http_get(metrics + "/metrics")[1]):
        name = family.name
        assert name.startswith(("coordinator_", "process_")), name
        if family.type == "counter":
            assert not name.endswith("_total"), f"{name}: the parser strips _total; it was doubled"
        if family.type == "histogram" and ("latency" in name or "duration" in name):
            assert name.endswith("_seconds"), f"{name}: time needs the base unit in the name"
        if "bytes" in name:
            assert name.endswith("_bytes"), f"{name}: bytes go last"
        assert re.fullmatch(r"[a-z_][a-z0-9_]*", name), name


def test_grafana_dashboard_uses_only_exported_metrics(replica):
    _, metrics, _ = replica
    names = exported(http_get(metrics + "/metrics")[1])
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    used = {m for e in exprs for m in re.findall(r"\b((?:coordinator|process)_[a-z0-9_]+)", e)}
    missing = used - set(names)
    assert not missing, f"the dashboard queries metrics /metrics does not export: {sorted(missing)}"
    print(f"dashboard: {len(exprs)} queries over {len(used)} metrics, all exported")


def test_off_by_default_and_coder_names():
    assert load_settings(environ={}).prometheus_listen is None
    assert load_settings(environ={"CODER_PROMETHEUS_ENABLE": "true"}).prometheus_listen == ("127.0.0.1", 2112)
    assert load_settings(environ={"CODER_PROMETHEUS_ADDRESS": "0.0.0.0:9100"}).prometheus_listen == ("0.0.0.0", 9100)
    off = {"CODER_PROMETHEUS_ENABLE": "false", "CODER_PROMETHEUS_ADDRESS": "0.0.0.0:9100"}
    assert load_settings(environ=off).prometheus_listen is None
    with pytest.raises(ConfigError, match="^CODER_PROMETHEUS_ENABLE: 'maybe'"):  # the name the operator used
        load_settings(environ={"CODER_PROMETHEUS_ENABLE": "maybe"})
    with pytest.raises(ConfigError, match="COORDINATOR_PROMETHEUS_ADDRESS.*must differ from.*COORDINATOR_ADDRESS"):
        load_settings(environ={"COORDINATOR_ADDRESS": "*:3000", "COORDINATOR_PROMETHEUS_ADDRESS": "127.0.0.1:3000"})


def test_refused_at_start_when_equal_to_the_main_address_or_taken(tmp_path, pg_url):
    port = free_port()
    out = subprocess.run([python(), "-m", "coordinator", "server", "--data-dir", str(tmp_path), "--pg-url", pg_url,
                          "--address", f"127.0.0.1:{port}", "--prometheus-address", f"127.0.0.1:{port}"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out
    assert "--prometheus-address" in out.stderr and "--address" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        out = subprocess.run([python(), "-m", "coordinator", "server", "--data-dir", str(tmp_path), "--pg-url", pg_url,
                              "--address", f"127.0.0.1:{free_port()}", "--prometheus-address", f"127.0.0.1:{busy}"],
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out
    assert f"--prometheus-address) 127.0.0.1:{busy}" in out.stderr and "Traceback" not in out.stderr
