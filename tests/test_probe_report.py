"""The probe's judgement (coordinator.ops.probe.report) on made-up figures: no clusters, no sockets."""

from __future__ import annotations

from datetime import UTC, datetime

from coordinator.ops.probe import SCHEMA, build_report, render_text
from coordinator.ops.probe.model import Figure, MeshPair, ReplicaInfo, assign_short_ids

MS = 0.001
THRESHOLD = 10 * MS


def replica(n: int, *, relay: bool = True, http: float = 1 * MS, derp: float = 2 * MS, **kw) -> ReplicaInfo:
    r = ReplicaInfo(id=f"{n:08d}-0000-0000-0000-000000000000", hostname=f"host{n}", region_id=1,
                    relay_url=f"http://10.0.0.{n}:3000" if relay else "", **kw)
    if relay:
        r.http, r.derp = Figure([http] * 3), Figure([derp] * 3)
        r.server_key = bytes([n]) * 32
    return r


def report(replicas: list[ReplicaInfo], *, mesh: list[MeshPair] = (), database: Figure | None = None,
           pubsub: Figure | None = None, not_alive: list[ReplicaInfo] = ()) -> dict:
    assign_short_ids(replicas)
    return build_report(source={"mode": "database", "target": "db:5432"}, threshold=THRESHOLD, samples=3,
                        started_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), duration=1.25,
                        database=database, pubsub=pubsub, replicas=replicas, not_alive=list(not_alive),
                        mesh=list(mesh))


def kinds(doc: dict) -> list[tuple[str, str | None]]:
    return [(p["kind"], p["figure"]) for p in doc["problems"]]


def test_everything_within_the_threshold_is_ok():
    a, b = replica(1), replica(2)
    pairs = [MeshPair(a, b, Figure([5 * MS])), MeshPair(b, a, Figure([6 * MS]))]
    doc = report([a, b], mesh=pairs, database=Figure([0.5 * MS, 0.7 * MS, 0.6 * MS]), pubsub=Figure([1 * MS]))
    assert doc["ok"] and doc["problems"] == [] and doc["notes"] == []
    assert doc["schema"] == SCHEMA and doc["started_at"] == "2026-01-02T03:04:05Z" and doc["duration_ms"] == 1250.0
    assert doc["database"]["median_ms"] == 0.6 and doc["database"]["measured"]
    # relays' share: the round trip minus the probe's DERP pings to A and B (2 ms each)
    assert [m["relays_ms"] for m in doc["mesh"]] == [1.0, 2.0]
    assert "OK: every figure is within 10 ms" in render_text(doc)


def test_figures_over_the_threshold_are_latency_problems():
    a, b = replica(1, http=12 * MS), replica(2, database_latency_us=15_000)
    pairs = [MeshPair(a, b, Figure([30 * MS]))]  # 30 - 2 - 2 = 26 ms for the relays
    doc = report([a, b], mesh=pairs, database=Figure([11 * MS]))
    assert not doc["ok"]
    assert kinds(doc) == [("latency", "database"), ("latency", "http"), ("latency", "reported_database"),
                          ("latency", "mesh")]
    messages = [p["message"] for p in doc["problems"]]
    assert messages[0] == "database round trip from this host 11.00 ms over the 10 ms threshold"
    assert doc["problems"][3]["value_ms"] == 26.0 and "round trip 30.00 ms" in messages[3]
    assert doc["replicas"][0]["http"]["over_threshold"] and not doc["replicas"][0]["derp"]["over_threshold"]
    text = render_text(doc)
    assert "FAIL: 4 problems" in text and "12.00 ms !" in text


def test_no_samples_is_unreachable_and_a_late_error_is_a_failure():
    a, b = replica(1), replica(2)
    a.derp = Figure([], "cannot connect: refused")
    b.http = Figure([1 * MS], "timed out (after 1 good samples)")
    doc = report([a, b], pubsub=Figure([], "no LISTEN"))
    assert kinds(doc) == [("failed", "pubsub"), ("unreachable", "derp"), ("failed", "http")]
    assert not doc["replicas"][0]["reachable"] and doc["replicas"][1]["reachable"]


def test_a_replica_without_relay_url_among_several_is_a_problem():
    a, b = replica(1), replica(2, relay=False)
    doc = report([a, b])
    assert kinds(doc) == [("unreachable", "relay_url")]
    assert "COORDINATOR_DERP_SERVER_RELAY_URL" in doc["problems"][0]["message"]
    assert "NO RELAY URL" in render_text(doc)


def test_a_lone_replica_without_relay_url_is_a_single_replica_setup():
    doc = report([replica(1, relay=False)], database=Figure([1 * MS]), pubsub=Figure([2 * MS]))
    assert doc["ok"] and doc["problems"] == []
    assert len(doc["notes"]) == 1 and doc["notes"][0].startswith("single-replica setup")
    text = render_text(doc)
    assert "single replica, no relay URL" in text and "Note: single-replica setup" in text and "OK:" in text


def test_no_live_replicas():
    doc = report([], not_alive=[replica(9)])
    assert [p["message"] for p in doc["problems"]] == ["no live replicas found"]
    assert doc["not_alive"][0]["hostname"] == "host9"


def test_two_replicas_behind_one_relay_are_misconfigured():
    a, b = replica(1), replica(2)
    b.server_key = a.server_key
    doc = report([a, b])
    assert kinds(doc) == [("misconfigured", "relay_url")]
    assert doc["problems"][0]["peer"] == a.id and "load balancer" in doc["problems"][0]["message"]


def test_matrix_cells_judged_and_dead_peers_left_out():
    a, b = replica(1), replica(2)
    a.peer_latencies = {b.id: {"derp_ms": 11.5, "http_ms": 1.0, "p99_ms": True, "error": None},
                        "gone": {"derp_ms": 1.0}}
    b.peer_latencies = {a.id: {"derp_ms": None, "http_ms": "x", "error": "dial tcp: refused\n retrying"}}
    doc = report([a, b])
    assert set(doc["matrix"][a.id]) == {b.id}
    cell = doc["matrix"][a.id][b.id]
    assert cell["over_threshold"] and cell["p99_ms"] is None  # a bool is not a figure
    assert doc["matrix"][b.id][a.id]["http_ms"] is None
    assert kinds(doc) == [("latency", "matrix_derp"), ("unreachable", "matrix")]
    assert doc["problems"][1]["message"].endswith("dial tcp: refused retrying")  # one line
    assert "ERROR" in render_text(doc)
