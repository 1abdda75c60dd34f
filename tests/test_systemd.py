"""deploy/systemd/: the unit passes `systemd-analyze verify` with no complaint, carries the hardening, and its
stop (KillSignal within TimeoutStopSec) works on a real replica started with the example environment file."""

import configparser
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coordinator.core.settings import load_settings
from coordinator.core.values import parse_duration
from testkit.procs import ROOT, Proc, free_port

SYSTEMD = ROOT / "deploy" / "systemd"
COORDINATOR = Path(sys.executable).parent / "coordinator"  # the console script of the venv running the tests
UNIT, ENV_FILE = SYSTEMD / "coordinator.service", SYSTEMD / "coordinator.env"
HARDENING = {"DynamicUser": "yes", "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
             "PrivateTmp": "yes", "RestrictSUIDSGID": "yes", "CapabilityBoundingSet": ""}


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str
    parser.read_string(UNIT.read_text())
    return parser


def env_file() -> dict[str, str]:
    out = {}
    for line in ENV_FILE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def test_unit_verifies_cleanly(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian's systemd package)")
    # The paths the unit expects after installation point at this checkout's venv and example instead.
    text = UNIT.read_text().replace("/opt/coordinator/bin/coordinator", str(COORDINATOR))
    text = text.replace("/etc/coordinator/coordinator.env", str(ENV_FILE))
    copy = tmp_path / "coordinator.service"
    copy.write_text(text)
    out = subprocess.run([analyze, "verify", "--man=no", str(copy)], capture_output=True, text=True, timeout=120)
    complaints = [line for line in (out.stdout + out.stderr).splitlines() if str(copy) in line or "coordinator" in line]
    assert out.returncode == 0 and not complaints, out.stdout + out.stderr


def test_unit_is_hardened_and_stops_within_its_timeout():
    service = unit()["Service"]
    for key, value in HARDENING.items():
        assert service.get(key) == value, key
    assert service["Type"] in ("exec", "notify")
    assert int(service["LimitNOFILE"]) >= 65536
    assert service["EnvironmentFile"] == "/etc/coordinator/coordinator.env"
    shutdown = parse_duration(env_file()["COORDINATOR_SHUTDOWN_TIMEOUT"])
    assert parse_duration(service["TimeoutStopSec"]) >= shutdown + 5


def test_example_environment_is_valid_settings():
    settings = load_settings(environ=env_file())
    assert settings.relay_url and settings.access_url and settings.pg_url
    assert settings.prometheus_listen is not None and settings.prometheus_listen != settings.listen


def test_stop_signal_ends_a_replica_cleanly_within_timeout_stop_sec(tmp_path, pg_url):
    service = unit()["Service"]
    port = free_port()
    env = {**env_file(), "COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "COORDINATOR_PG_CONNECTION_URL": pg_url,
           "COORDINATOR_DERP_SERVER_RELAY_URL": f"http://127.0.0.1:{port}", "COORDINATOR_DATA_DIR": str(tmp_path),
           "COORDINATOR_PROMETHEUS_ADDRESS": f"127.0.0.1:{free_port()}", "COORDINATOR_ACCESS_URL": "http://lb.invalid"}
    p = Proc([str(COORDINATOR), "server"], env=env, log=tmp_path / "server.log")
    try:
        p.wait_http(f"http://127.0.0.1:{port}/readyz")
        started = time.monotonic()
        p.signal(getattr(signal, service["KillSignal"]))
        assert p.wait(parse_duration(service["TimeoutStopSec"])) == 0
        print(f"{service['KillSignal']}: exited 0 after {time.monotonic() - started:.2f} s "
              f"(TimeoutStopSec {service['TimeoutStopSec']})")
    finally:
        p.stop()
