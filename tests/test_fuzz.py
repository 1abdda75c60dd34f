"""scripts/fuzz_relay.py for a short count: a replica under fuzzed input loses no packet of a healthy pair."""

from __future__ import annotations

import json
import subprocess
import sys

from testkit.procs import ROOT


def test_fuzz_relay_short_run():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "fuzz_relay.py"), "--count", "20000", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"fuzz_relay.py exited {done.returncode}:\n{done.stdout}\n{done.stderr[-3000:]}"
    figures = json.loads(done.stdout)
    print(f"\nfuzz: {figures}")
    assert figures["inputs"] == 20000 and all(figures["by_kind"].values())
    assert figures["healthy_received"] > 0 and figures["healthy_lost"] == figures["healthy_disconnects"] == 0
    assert figures["tracebacks"] == 0 and figures["replica_alive"]
