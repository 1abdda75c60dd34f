"""The benchmark scripts still run and measure what they claim (figures are never asserted)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
QUICK = ["--modes", "windowed", "--sizes", "1000", "--seconds", "0.5", "--warmup", "0.2", "--json"]


def run_script(name: str, *args: str) -> tuple[dict, str]:
    done = subprocess.run([sys.executable, str(SCRIPTS / name), *QUICK, *args], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, f"{name} exited {done.returncode}:\n{done.stderr[-3000:]}"
    assert "WARNING" not in done.stderr, done.stderr[-3000:]
    return json.loads(done.stdout), done.stderr


def test_bench_relay_is_lossless_against_both_servers():
    out, _ = run_script("bench_relay.py")
    rows = out["results"]["relay"] + out["results"]["baseline"]
    assert len(rows) == 2
    for r in rows:
        assert r["received_total"] > 0
        assert r["received_total"] == r["sent_total"]


@pytest.mark.skipif(shutil.which("cc") is None, reason="the floor relay needs a C compiler")
def test_bench_relay_per_packet_client_against_the_floor():
    """Every packet its own write (as Tailscale's client): ours and the floor both deliver all of it."""
    out, _ = run_script("bench_relay.py", "--client", "per-packet", "--no-baseline")
    rows = out["results"]["relay"] + out["results"]["floor"]
    assert len(rows) == 2
    for r in rows:
        assert r["received_total"] > 0
        assert r["received_total"] == r["sent_total"]
        assert r["server_us_per_pkt"] > 0
    assert any("the floor's" in line for line in out["targets"])


@pytest.mark.skipif(shutil.which("cc") is None, reason="the floor relay needs a C compiler")
def test_bench_mesh_crosses_the_mesh_and_measures_the_floor():
    out, _ = run_script("bench_mesh.py")
    by = {(r["relay"], r["topology"]): r for r in out["results"]}
    assert set(by) == {("ours", "single"), ("ours", "cross"), ("floor", "single"), ("floor", "cross")}
    for r in by.values():
        assert r["received_total"] > 0
        assert r["received_total"] == r["sent_total"]
    # Our cross case really went over the mesh link; the single one never did.
    cross, single = by[("ours", "cross")]["relay_counted"], by[("ours", "single")]["relay_counted"]
    assert cross["A"]["forwarded_out"] > 0 and cross["B"]["forwarded_in"] > 0
    assert single["A"]["forwarded_out"] == 0
    assert [row["mode"] for row in out["ours_over_floor"]] == ["windowed"]
    assert any(line.startswith("floor: ") for line in out["targets"])


def test_bench_cluster_measures_a_small_cluster():
    done = subprocess.run([sys.executable, str(SCRIPTS / "bench_cluster.py"), "--replicas", "4", "--idle", "1",
                           "--heartbeat", "1s", "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"bench_cluster.py exited {done.returncode}:\n{done.stderr[-3000:]}"
    out = json.loads(done.stdout)
    assert out["mesh"]["meshed_after_spawn_s"] >= out["mesh"]["ready_s"] > 0
    assert out["pg_connections_per_replica"]["min"] >= 1
    stop = out["mass_stop"]
    assert (stop["stopped"], stop["survivors"], stop["exited"]) == (2, 2, 2)
    assert stop["drop_lines_missing"] == 0 and stop["exit_statuses"] == [0]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the TLS relays need a certificate made with openssl")
def test_bench_mesh_over_tls_next_to_plain_http():
    out, _ = run_script("bench_mesh.py", "--tls", "--tls-mesh", "--no-floor", "--topologies", "cross")
    by = {r["relay"]: r for r in out["results"]}
    assert set(by) == {"ours", "tls", "tls-mesh"}
    for r in by.values():
        assert r["received_total"] > 0
        assert r["received_total"] == r["sent_total"]
        assert r["relay_counted"]["A"]["forwarded_out"] > 0  # it crossed the mesh link
    schemes = {name: {url.split(":", 1)[0] for status in relays.values() for url in status}
               for name, relays in out["mesh_links"].items()}
    assert schemes == {"ours": {"http"}, "tls": {"https"}, "tls-mesh": {"https"}}
