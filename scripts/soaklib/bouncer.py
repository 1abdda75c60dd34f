"""PgBouncer (Debian's ``pgbouncer``) in front of the soak's Postgres, in session pooling mode.

It listens on a Unix socket only (the replicas reach it from their namespaces through the shared
filesystem) and points at the primary's socket; after a failover :meth:`point` rewrites its one
database line and reloads it (SIGHUP). As root it runs as the test Postgres's unprivileged user.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from soaklib.kit import pgcluster
from testkit.pgbouncer import pgbouncer_binary


class Bouncer:
    def __init__(self, base: Path, port: int):
        found = pgbouncer_binary()
        if found is None:
            raise RuntimeError("--pgbouncer: pgbouncer is not installed (apt-get install pgbouncer; scripts/bootstrap.sh test)")
        self.binary = found
        self.base = base
        self.port = port
        self.sock = base / "sock"
        self.sock.mkdir(parents=True, exist_ok=True)
        self.user = pgcluster._demote_target()
        self.ini = base / "pgbouncer.ini"
        self.proc: subprocess.Popen | None = None
        (base / "userlist.txt").write_text('"postgres" ""\n')

    @property
    def url(self) -> str:
        return f"postgresql://postgres@/postgres?host={self.sock}&port={self.port}"

    def point(self, upstream_sock: Path, upstream_port: int) -> None:
        """Send new server connections to ``upstream`` (written, then reloaded if running)."""
        self.ini.write_text(
            "[databases]\n"
            f"* = host={upstream_sock} port={upstream_port}\n"
            "[pgbouncer]\n"
            f"listen_addr =\nlisten_port = {self.port}\nunix_socket_dir = {self.sock}\n"
            f"auth_type = trust\nauth_file = {self.base / 'userlist.txt'}\n"
            "pool_mode = session\ndefault_pool_size = 100\nmax_client_conn = 1000\n"
            f"logfile = {self.base / 'pgbouncer.log'}\npidfile = {self.base / 'pgbouncer.pid'}\n"
            "server_reset_query = DISCARD ALL\n"
            # After one failed server login PgBouncer refuses every client for server_login_retry
            # (15 s by default), even once reloaded onto the promoted primary: keep that short.
            "server_login_retry = 1\n"
        )
        if self.user is not None:
            for p in [self.base, *self.base.iterdir()]:
                os.chown(p, self.user.pw_uid, self.user.pw_gid)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)

    def start(self, timeout: float = 15.0) -> None:
        (self.sock / f".s.PGSQL.{self.port}").unlink(missing_ok=True)  # a killed one's leftover
        args = [self.binary, *(["-u", self.user.pw_name] if self.user is not None else []), str(self.ini)]
        with open(self.base / "stdout.log", "ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        socket_file = self.sock / f".s.PGSQL.{self.port}"
        deadline = time.monotonic() + timeout
        while not socket_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pgbouncer did not start: {(self.base / 'stdout.log').read_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Immediate shutdown (SIGTERM; SIGINT would wait for its session clients)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()
