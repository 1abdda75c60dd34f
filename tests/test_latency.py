"""Latency awareness with real added latency: warnings, health findings, the operator API, metrics."""

import json
import logging
import signal
import urllib.error
import urllib.request

import pytest

from coordinator.cluster.latency import JUDGED_AFTER, Alarm, LatencyMonitor, Window
from testkit.cluster import HACluster, serve
from testkit.delayproxy import DelayProxy
from testkit.pgcluster import PgCluster
from testkit.polling import wait_blocking as wait

pytestmark = pytest.mark.anyio


def test_window_median_and_p99():
    w = Window(size=5)
    assert w.median is None and w.p99 is None
    for v in (0.001, 0.002, 0.050, 0.003, 0.002):
        w.add(v)
    assert w.median == 0.002  # one slow sample does not move the median
    assert w.p99 == 0.050
    for v in (0.004,) * 5:
        w.add(v)
    assert w.median == 0.004 and w.p99 == 0.004  # old samples leave the window


def test_a_median_is_judged_only_once_the_window_holds_enough_samples(caplog):
    """The first sample alone never raises an alarm, however slow: the docs promise a median."""
    monitor = LatencyMonitor(threshold=0.010)
    with caplog.at_level(logging.INFO, logger="coordinator.latency"):
        monitor.database_sample(0.500)
        assert monitor.database.judged is None and monitor.database.median == 0.5
        assert not [f for f in monitor.findings(database_ok=True, pubsub_connected=True) if f.code == "EDB02"]
        for _ in range(JUDGED_AFTER - 1):
            monitor.database_sample(0.020)
    assert monitor.database.judged == 0.020
    assert [f.code for f in monitor.findings(database_ok=True, pubsub_connected=True)] == ["EDB02"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "20.0 ms" in warnings[0], warnings


def test_alarm_warns_on_change_then_rate_limited_and_logs_recovery(caplog):
    alarm = Alarm("replica x (http://x)")
    with caplog.at_level(logging.INFO, logger="coordinator.latency"):
        alarm.update(0.015, 0.010)
        alarm.update(0.016, 0.010)  # still over, within the minute: no second warning
        alarm.update(0.002, 0.010)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "replica x (http://x)" in warnings[0].getMessage()
    assert "15.0 ms" in warnings[0].getMessage() and "10 ms limit" in warnings[0].getMessage()
    assert any("recovered" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


def get(url: str, token: str | None = None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as resp:
            body = resp.read()
            return resp.status, (json.loads(body) if resp.headers.get_content_type() == "application/json" else body.decode())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def codes(replica) -> list[str]:
    return [f["code"] for f in replica.api("/api/v2/debug/health")["findings"]]


@pytest.fixture
def cluster(pg_url, request):
    yield from serve(HACluster(pg_url, heartbeat="300ms"), request)


def test_operator_api_matrix_health_and_metrics(cluster):
    replicas = [cluster.add_replica() for _ in range(3)]
    r0 = replicas[0]
    # auth: /healthz and /readyz are public, the rest needs the token
    assert get(r0.url + "/healthz")[0] == 200
    assert get(r0.url + "/readyz") == (200, {"ready": True})
    for path in ("/api/v2/replicas", "/api/v2/debug/health", "/metrics"):
        status, body = get(r0.url + path)
        assert status == 401 and "bearer token" in body["message"]
        assert get(r0.url + path, "wrong-token") == (401, {"message": "invalid API token"})

    def matrix_complete():
        rows = r0.api("/api/v2/replicas")
        live = [r for r in rows if r["alive"]]
        return len(live) == 3 and all(
            len(r["peer_latencies"]) == 2 and all(v["http_ms"] is not None for v in r["peer_latencies"].values())
            for r in live
        ) and rows

    rows = wait(matrix_complete, 20, "every replica measured every peer")
    for row in rows:
        assert {"id", "hostname", "created_at", "relay_address", "region_id", "error", "database_latency"} <= set(row)
        assert row["database_latency"] > 0 and row["error"] == ""
        for peer in row["peer_latencies"].values():
            assert peer["http_ms"] < 10 and peer["error"] is None
    me = next(r for r in rows if r["self"])
    assert me["relay_address"] == r0.relay_url and all(r["latency_from_here"] for r in rows if not r["self"])
    matrix = "\n".join(
        f"  {row['relay_address']}: " + ", ".join(f"{v['relay_url']} {v['http_ms']:.2f} ms" for v in row["peer_latencies"].values())
        for row in rows
    )
    print(f"\nlatency matrix measured by the replicas (HTTP round trip, median):\n{matrix}")
    wait(lambda: codes(r0) == [], 10, "no findings on loopback")
    health = r0.api("/api/v2/debug/health")
    assert health["healthy"] and health["severity"] == "ok" and health["threshold_ms"] == 10
    status, text = get(r0.url + "/metrics", cluster.api_token)
    assert status == 200
    for metric in ("coordinator_derp_received_packets_total", "coordinator_derp_current_connections",
                   "coordinator_derp_dropped_packets_total{reason=\"queue_head\"}",
                   "coordinator_derp_senders_paused ", "coordinator_derp_mesh_pushbacks_total",
                   "coordinator_pubsub_", "coordinator_replica_peer_latency_seconds_bucket",
                   "coordinator_database_latency_seconds_count"):
        assert metric in text, metric


def test_slow_peer_warns_and_recovers(cluster):
    fast = [cluster.add_replica() for _ in range(2)]
    slow = cluster.add_replica(start=False)
    with DelayProxy("127.0.0.1", slow.port, delay=0.0075) as proxy:  # 15 ms round trip
        slow.relay_url = f"http://127.0.0.1:{proxy.port}"
        slow.start()
        for r in fast:
            finding = wait(lambda r=r: [f for f in r.api("/api/v2/debug/health")["findings"] if f["code"] == "EDERP02"],
                           20, "peer slow finding")
            assert slow.relay_url in finding[0]["message"] and finding[0]["severity"] == "warning"
        log = wait(lambda: "above the 10 ms limit" in fast[0].proc.output and fast[0].proc.output, 10, "warning logged")
        assert f"({slow.relay_url})" in log
        assert "EDERP02" not in codes(slow)  # the slow one's own view of the others is fast
        proxy.delay = 0.0
        for r in fast:
            wait(lambda r=r: "EDERP02" not in codes(r), 30, "finding cleared after the delay is removed")
        wait(lambda: "recovered" in fast[0].proc.output, 10, "recovery logged")


def test_slow_database_and_database_outage(cluster):
    own = PgCluster()
    try:
        own.start()
        cluster.pg_url = own.url
        with DelayProxy("127.0.0.1", own.port, delay=0.0) as proxy:
            r = cluster.add_replica(start=False)
            r.pg_url = f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres"
            r.start()
            wait(lambda: codes(r) == [], 10, "healthy on loopback")
            proxy.delay = 0.0075
            finding = wait(lambda: [f for f in r.api("/api/v2/debug/health")["findings"] if f["code"] == "EDB02"], 30,
                           "database slow finding")
            assert "database slow" in finding[0]["message"]
            assert get(r.url + "/readyz")[0] == 200  # slow is not down
            proxy.delay = 0.0
            wait(lambda: "EDB02" not in codes(r), 30, "database finding cleared")
            own.kill()
            wait(lambda: get(r.url + "/readyz")[0] == 503, 20, "not ready while Postgres is down")
            wait(lambda: "EDB01" in codes(r), 20, "database unreachable finding")
            assert r.proc.proc.poll() is None  # the replica keeps running through the outage
            own.start()
            wait(lambda: get(r.url + "/readyz")[0] == 200, 30, "ready again")
            r.stop(signal.SIGTERM)
    finally:
        own.destroy()
