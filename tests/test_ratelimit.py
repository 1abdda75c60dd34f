"""Per-client rate limits: a limited sender gets its limit, by TCP push-back (nothing dropped); others are not slowed."""

import json
import subprocess
import urllib.request

import pytest

from coordinator.core.keys import NodeKey
from coordinator.core.settings import load_settings
from coordinator.relay.dataplane import DerpRelay
from testkit.procs import ROOT, Proc, free_port, python, refused_at_start

LIMIT = 4_000_000          # bytes/s the replica allows each client
BURST = 262_144
SIZE = 16_000              # payload per packet; a SendPacket frame is 37 bytes more
MESH_KEY = "cd" * 32       # mesh peers are exempt: the only unlimited clients
TOKEN = "ratelimit-test-token"


def floods(url: str, seconds: float, *mesh_keys) -> list[dict]:
    """Run one flooding pair per entry (a mesh key or None) at the same time, each in its own process."""
    procs = [subprocess.Popen([python(), str(ROOT / "testkit" / "flood.py"), url, "--seconds", str(seconds),
                               "--size", str(SIZE), *(["--mesh-key", k] if k else [])], stdout=subprocess.PIPE)
             for k in mesh_keys]
    try:
        return [json.loads(p.communicate(timeout=seconds + 60)[0]) for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()


def metric(base: str, name: str) -> float:
    request = urllib.request.Request(base + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_limited_sender_gets_its_limit_and_an_unlimited_pair_is_unaffected(pg_url, tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    replica = Proc([python(), "-m", "coordinator", "server", "--address", f"127.0.0.1:{port}", "--data-dir",
                    str(tmp_path), "--pg-url", pg_url, "--mesh-key", MESH_KEY,
                    "--per-client-rate-limit", str(LIMIT), "--per-client-rate-burst", str(BURST)],
                   env={"COORDINATOR_API_TOKEN": TOKEN}, log=tmp_path / "server.log")
    try:
        replica.wait_http(base + "/readyz")
        url = base + "/derp"
        (alone,) = floods(url, 3.0, MESH_KEY)
        limited, unlimited = floods(url, 5.0, None, MESH_KEY)
        expect = LIMIT * SIZE / (SIZE + 37)  # the limit counts the framing too
        rate = limited["bytes"] / limited["seconds"]
        mb = 1e6
        print(f"\nlimit {LIMIT / mb:.2f} MB/s (payload {expect / mb:.3f} MB/s): limited sender achieved "
              f"{rate / mb:.3f} MB/s = {100 * rate / expect:.1f} % of it, {limited['packets']} packets, "
              f"{limited['gaps']} gaps; unlimited (mesh-key) pair alone {alone['bytes'] / alone['seconds'] / mb:.1f} "
              f"MB/s, next to the limited one {unlimited['bytes'] / unlimited['seconds'] / mb:.1f} MB/s; "
              f"relay paused readers {metric(base, 'coordinator_derp_rate_limited_total'):.0f} times")
        assert abs(rate / expect - 1) < 0.05
        assert limited["gaps"] == 0  # push-back, never drops
        # Exempt and not slowed: far above the limit whether or not a limited sender shares the replica.
        assert unlimited["bytes"] / unlimited["seconds"] > 3 * LIMIT
        assert unlimited["bytes"] / unlimited["seconds"] > 0.3 * alone["bytes"] / alone["seconds"]
        assert metric(base, "coordinator_derp_rate_limited_total") > 0
    finally:
        replica.stop()


def test_burst_is_never_below_one_maximum_size_packet():
    assert DerpRelay(NodeKey.generate(), rate_limit=1000, rate_burst=10).server.rate_burst == 5 + 32 + 65536
    assert DerpRelay(NodeKey.generate(), rate_limit=1000, rate_burst=10**6).server.rate_burst == 10**6
    assert DerpRelay(NodeKey.generate(), rate_limit=1000).server.rate_burst == 5 + 32 + 65536
    assert DerpRelay(NodeKey.generate(), rate_limit=10**7).server.rate_burst == 10**6  # 0.1 s of the rate
    s = load_settings(environ={"COORDINATOR_DERP_PER_CLIENT_RATE_LIMIT": "1000000"})
    assert (s.per_client_rate_limit, s.per_client_rate_burst) == (1_000_000, 0)
    s = load_settings(environ={"COORDINATOR_DERP_PER_CLIENT_RATE_LIMIT": "4MiB", "COORDINATOR_DERP_PER_CLIENT_RATE_BURST": "256KiB"})
    assert (s.per_client_rate_limit, s.per_client_rate_burst) == (4 << 20, 256 << 10)  # sizes, as --max-request-head


@pytest.mark.parametrize(("flags", "named"), [
    (["--per-client-rate-limit", "10 MB/s"], "--per-client-rate-limit"),
    (["--per-client-rate-limit", "-1"], "--per-client-rate-limit"),
    (["--per-client-rate-limit", "1000", "--per-client-rate-burst", "lots"], "--per-client-rate-burst"),
    (["--per-client-rate-burst", "100000"], "--per-client-rate-burst"),
])
def test_bad_rate_settings_are_refused_at_start(flags, named, tmp_path):
    refused_at_start(["server", "--data-dir", str(tmp_path), *flags], named)
    assert list(tmp_path.iterdir()) == []
