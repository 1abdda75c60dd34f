"""The chaos soak (scripts/soak.py) for three minutes: 5 replicas behind nginx, a Postgres primary
with a streaming standby, 200 client pairs, a random fault every 15-45 s.

It must end with no replica that failed to rejoin, no packet lost by a pair whose replicas were
not touched, no memory drift beyond a generous bound, and nothing it started still running.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from coordinator.cli import nginx

try:
    from testkit.procs import ROOT
except ImportError:  # before testkit/ held the shared helpers
    from testkit.procs import ROOT

DURATION = "3m"
RSS_DRIFT_BOUND = 600.0  # MiB per hour: generous, three minutes is short to fit a slope on


def _processes_with(marker: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if marker in line and "pytest" not in line and " ps " not in line]


@pytest.mark.timeout(600)
def test_three_minute_soak(tmp_path):
    if nginx.nginx_binary() is None:
        pytest.skip("nginx is not installed (scripts/bootstrap.sh test)")
    out = tmp_path / "soak.json"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "soak.py"), "--duration", DURATION, "--seed", "11",
         "--json-out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        stdout, stderr = proc.communicate(timeout=560)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the soak stops everything it started on SIGTERM
        stdout, stderr = proc.communicate(timeout=60)
    print(stdout[-6000:])
    print(stderr[-3000:])
    assert out.exists(), f"the soak ended without figures (exit {proc.returncode})"
    report = json.loads(out.read_text())
    assert len(report["faults"]) >= 3, report["faults"]
    assert report["failed_to_rejoin"] == []
    assert report["loss"]["lost_untouched"] == 0, report["loss"]
    assert report["loss"]["sent"] > 0
    for replica, d in report["drift"].items():
        assert d["rss_mib_per_hour"] < RSS_DRIFT_BOUND, (replica, d)
    assert report["leftover_processes"] == []
    base = re.search(r" in (/\S*coordsoak-\S+)", stdout)
    assert base, stdout[:2000]
    assert not _processes_with(base.group(1)), _processes_with(base.group(1))  # this run's, not a parallel one's
    if os.geteuid() == 0:
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert f"coordlab{proc.pid}-" not in listed, listed
    assert proc.returncode == 0
