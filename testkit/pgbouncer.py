"""A real PgBouncer (Debian's ``pgbouncer``) in front of a test Postgres: own ini in a temp dir, a
free port, ``session`` or ``transaction`` pooling; stopped (and its directory removed) by its owner.

As root it runs as the same unprivileged user as the test Postgres (PgBouncer refuses root).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from testkit.pgcluster import PgCluster, _demote_target, free_port


def pgbouncer_binary() -> str | None:
    return shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.access(p, os.X_OK)), None)


class PgBouncer:
    """One PgBouncer process on 127.0.0.1:<port> pooling every database of ``upstream``."""

    def __init__(self, upstream: PgCluster, mode: str = "transaction", *, pool_size: int = 20,
                 max_client_conn: int = 500):
        binary = pgbouncer_binary()
        assert binary, "pgbouncer is not installed (sh scripts/bootstrap.sh test installs it)"
        self.binary = binary
        self.upstream, self.mode = upstream, mode
        self.port = free_port()
        self.base = Path(tempfile.mkdtemp(prefix="coordtest-pgbouncer-"))
        self.base.chmod(0o755)
        self.user = _demote_target()
        self.ini = self.base / "pgbouncer.ini"
        self.log = self.base / "pgbouncer.log"
        (self.base / "userlist.txt").write_text('"postgres" ""\n')
        self.ini.write_text(
            "[databases]\n"
            f"* = host=127.0.0.1 port={upstream.port}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
            f"auth_type = trust\nauth_file = {self.base / 'userlist.txt'}\n"
            f"pool_mode = {mode}\ndefault_pool_size = {pool_size}\nmax_client_conn = {max_client_conn}\n"
            f"logfile = {self.log}\npidfile = {self.base / 'pgbouncer.pid'}\n"
            "admin_users = postgres\nserver_reset_query = DISCARD ALL\n"
        )
        if self.user is not None:
            for p in [self.base, *self.base.iterdir()]:
                os.chown(p, self.user.pw_uid, self.user.pw_gid)
        self.proc: subprocess.Popen | None = None

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def start(self, timeout: float = 15.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        args = [self.binary, *(["-u", self.user.pw_name] if self.user is not None else []), str(self.ini)]
        out = open(self.base / "stdout.log", "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pgbouncer exited {self.proc.returncode}: {self.output()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"pgbouncer did not listen within {timeout} s: {self.output()[-2000:]}")

    def output(self) -> str:
        return "".join(p.read_text(errors="replace") for p in (self.base / "stdout.log", self.log) if p.exists())

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # immediate shutdown (SIGINT would wait for session clients)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)
