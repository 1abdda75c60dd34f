"""Helpers of the Postgres fault tests: who holds which server connection, slots hogged, a TLS CA."""

from __future__ import annotations

import subprocess
from pathlib import Path

import psutil
import psycopg

from testkit.pgcluster import PgCluster


def backends(admin: psycopg.Connection) -> list[tuple[int, int, str, str | None]]:
    """(pid, client port, application_name, wait_event_type) of every client backend."""
    return admin.execute(
        "SELECT pid, client_port, application_name, wait_event_type FROM pg_stat_activity "
        "WHERE backend_type = 'client backend' AND client_port IS NOT NULL AND pid <> pg_backend_pid()"
    ).fetchall()


def local_ports(pid: int) -> set[int]:
    try:
        return {c.laddr.port for c in psutil.Process(pid).net_connections(kind="tcp") if c.laddr}
    except psutil.Error:
        return set()


def conns_of(admin: psycopg.Connection, pid: int) -> int:
    """Server connections held by the process ``pid`` (matched by its sockets' local ports)."""
    ports = local_ports(pid)
    return sum(1 for _, port, _, _ in backends(admin) if port in ports)


def coordinator_pids(admin: psycopg.Connection) -> list[int]:
    return [pid for pid, _, app, _ in backends(admin) if app.startswith("coordinator")]


def hog_all_slots(pg: PgCluster, admin: psycopg.Connection, hogs: list[psycopg.Connection], rounds: int = 50) -> None:
    """Cut every coordinator connection and fill every free slot, until the replicas hold none."""
    for _ in range(rounds):
        for pid in coordinator_pids(admin):
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
        while True:
            try:
                hogs.append(psycopg.connect(pg.url, autocommit=True, application_name="hog", connect_timeout=2))
            except psycopg.OperationalError as exc:
                assert "too many clients" in str(exc), exc
                break
        if not coordinator_pids(admin):
            return
    raise AssertionError("the replicas kept getting connection slots")


def make_ca(base: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA: (certificate, key)."""
    cert, key = base / f"{name}.crt", base / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def make_server_cert(base: Path, ca: tuple[Path, Path], san: str) -> tuple[Path, Path]:
    """A server certificate for ``san`` (e.g. ``IP:127.0.0.1``) signed by ``ca``: (certificate, key)."""
    cert, key, csr, ext = base / "server.crt", base / "server.key", base / "server.csr", base / "san.ext"
    ext.write_text(f"subjectAltName={san}\n")
    subprocess.run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=postgres-test",
                    "-keyout", str(key), "-out", str(csr)], check=True, capture_output=True)
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
                    "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key
