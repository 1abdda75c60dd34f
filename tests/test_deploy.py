"""The relay as users run it: the uvicorn command line, `coordinator server`, TLS, the demo (the wheel: test_packaging)."""

import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest

from coordinator.relay.client import DerpClient
from testkit.procs import ROOT, Proc, free_port, python
from testkit.relayfix import serve_relay

pytestmark = pytest.mark.anyio


async def roundtrip(url: str, **kwargs) -> None:
    async with await DerpClient.connect(url, **kwargs) as a, await DerpClient.connect(url, **kwargs) as b:
        await a.send(b.public_key, b"ping over " + url.encode())
        assert (await b.recv_packet(timeout=5)).data == b"ping over " + url.encode()


@pytest.fixture
def procs():
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop()


async def test_plain_uvicorn_command_line(tmp_path, procs):
    port = free_port()
    p = Proc(
        [python(), "-m", "uvicorn", "coordinator.app:app", "--http", "coordinator.edge:DerpHttpProtocol",
         "--port", str(port), "--log-level", "warning"],
        env={"COORDINATOR_DATA_DIR": str(tmp_path)}, log=tmp_path / "uvicorn.log",
    )
    procs.append(p)
    p.wait_http(f"http://127.0.0.1:{port}/healthz")
    await roundtrip(f"http://127.0.0.1:{port}/derp")
    await roundtrip(f"http://127.0.0.1:{port}/derp", websocket=True)
    assert (tmp_path / "derper.key").exists()


async def test_uvicorn_without_derp_protocol_still_serves_websocket(tmp_path, procs):
    """Without --http only WebSocket clients can connect (through the ASGI bridge); raw gets 426."""
    port = free_port()
    p = Proc([python(), "-m", "uvicorn", "coordinator.app:app", "--port", str(port), "--log-level", "warning"],
             env={"COORDINATOR_DATA_DIR": str(tmp_path)}, log=tmp_path / "uvicorn.log")
    procs.append(p)
    p.wait_http(f"http://127.0.0.1:{port}/healthz")
    await roundtrip(f"http://127.0.0.1:{port}/derp", websocket=True)
    from coordinator.relay.client import DerpError

    with pytest.raises(DerpError, match="426"):
        await DerpClient.connect(f"http://127.0.0.1:{port}/derp")


@pytest.fixture
def open_dir():
    """A data directory the embedded Postgres's user can reach when the tests run as root (never widened for it)."""
    d = Path(tempfile.mkdtemp(prefix="coordtest-deploy-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


async def test_coordinator_server_serves_and_stops_on_sigterm(open_dir, procs):
    tmp_path = open_dir
    port = free_port()
    p = Proc([python(), "-m", "coordinator", "server", "--address", f"127.0.0.1:{port}", "--data-dir", str(tmp_path)],
             log=tmp_path / "server.log")
    procs.append(p)
    p.wait_http(f"http://127.0.0.1:{port}/readyz")
    await roundtrip(f"http://127.0.0.1:{port}/derp")
    assert "embedded PostgreSQL" in p.output
    url = subprocess.run([python(), "-m", "coordinator", "postgres-url", "--data-dir", str(tmp_path)],
                         capture_output=True, text=True, check=True, timeout=30).stdout.strip()
    import psycopg

    with psycopg.connect(url) as conn:
        (n,) = conn.execute("SELECT count(*) FROM replicas WHERE stopped_at IS NULL").fetchone()
        assert n == 1
    p.signal(signal.SIGTERM)
    assert p.wait() == 0
    assert "Traceback" not in p.output
    assert not (tmp_path / "postgres" / "postmaster.pid").exists()  # the embedded server stopped with us
    out = subprocess.run([python(), "-m", "coordinator", "postgres-url", "--data-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "no embedded PostgreSQL" in out.stderr


def test_coordinator_server_refuses_unreachable_database(tmp_path):
    port = free_port()
    out = subprocess.run(
        [python(), "-m", "coordinator", "server", "--data-dir", str(tmp_path), "--address", f"127.0.0.1:{free_port()}",
         "--pg-url", f"postgresql://u:secret@127.0.0.1:{port}/db", "--db-wait", "1s"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 1, out
    assert "cannot start" in out.stderr and f"127.0.0.1:{port}" in out.stderr
    assert "secret" not in out.stderr and "Traceback" not in out.stderr


def test_coordinator_server_refuses_a_data_dir_too_long_for_the_embedded_socket(tmp_path):
    """pgserver would move the socket to a world-writable directory; we refuse instead."""
    data = tmp_path / ("d" * 110)
    out = subprocess.run([python(), "-m", "coordinator", "server", "--data-dir", str(data),
                          "--address", f"127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out
    assert "too long for the embedded PostgreSQL's unix socket" in out.stderr and "--pg-url" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (data / "postgres" / "postmaster.pid").exists()


def test_coordinator_server_refuses_bad_config(tmp_path):
    for args, message in [
        (["--address", "nonsense"], "--address: "),
        (["--heartbeat", "fast"], "duration"),
        (["--relay-url", "10.0.0.1:80"], "absolute http"),
        (["--relay-url", "https://lb.example.com", "--access-url", "https://lb.example.com/"], "not the access URL"),
    ]:
        out = subprocess.run([python(), "-m", "coordinator", "server", "--data-dir", str(tmp_path), *args],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 2, out
        assert message in out.stderr and "Traceback" not in out.stderr


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
        check=True, capture_output=True,
    )
    return str(d / "cert.pem"), str(d / "key.pem")


async def test_tls_raw_and_websocket_with_http11_alpn(tls_cert):
    import asyncio
    import ssl

    cert, key = tls_cert
    async with serve_relay(ssl_certfile=cert, ssl_keyfile=key) as (url, _):
        assert url.startswith("https://")
        await roundtrip(url, insecure=True)
        await roundtrip(url, insecure=True, websocket=True)
        ctx = ssl.create_default_context(cafile=cert)
        ctx.set_alpn_protocols(["h2", "http/1.1"])
        port = int(url.split(":")[2].split("/")[0])
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
        writer.close()


def test_demo_shows_packets_crossing_replicas():
    out = subprocess.run([python(), "-m", "coordinator", "demo", "--once"], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("packet delivered") >= 3, out.stdout
    assert "replica up" in out.stdout and "Traceback" not in out.stderr


def test_missing_compiled_relay_fails_with_build_instructions(tmp_path):
    pkg = tmp_path / "_relay"
    pkg.mkdir()
    for src in (ROOT / "_relay").glob("*.py*"):  # sources only, no compiled module
        if not src.name.endswith(".so"):
            (pkg / src.name).write_bytes(src.read_bytes())
    out = subprocess.run([python(), "-S", "-c", "import _relay"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 1
    assert "compiled DERP relay" in out.stderr and "pip install ." in out.stderr
