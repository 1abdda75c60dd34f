"""The soak's fleet: a Postgres primary with a streaming standby, N replicas, nginx in front.

With network namespaces (testkit/netlab.py) the driver moves itself into the lab's hub namespace, so
Postgres, nginx and the clients live there; each replica runs in a namespace of its own with its
own address and reaches Postgres over a Unix socket. Without them every replica listens on
127.0.0.1 and the partition fault is skipped.

Postgres lives in two fixed slots (port and directory each), so one multi-host URL with
``target_session_attrs=read-write`` always finds the primary: after a failover the dead primary's
slot is rebuilt as a fresh standby of the promoted one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
import urllib.request
from pathlib import Path

from coordinator.cli import nginx
from coordinator.core.urls import derp_url
from soaklib.bouncer import Bouncer
from soaklib.kit import netlab, pgcluster, procs

PgCluster, free_port = pgcluster.PgCluster, pgcluster.free_port
Proc, python = procs.Proc, procs.python

TOKEN = "soak-api-token"
REPLICA_PORT = 3000  # in namespaces every replica has its own address


class Postgres:
    """Two slots (primary, standby); :meth:`fail_over` kills the primary and promotes the standby."""

    def __init__(self, base: Path):
        self.base = base
        self.slots = [(free_port(), base / "pg-a"), (free_port(), base / "pg-b")]
        self.clusters: list[PgCluster | None] = [None, None]
        self.primary = 0

    def start(self) -> None:
        port, path = self.slots[0]
        pg = self.clusters[0] = PgCluster(port=port, base=path)
        pg.start()
        self.rebuild_standby()

    @property
    def url(self) -> str:
        """libpq URL naming both slots' Unix sockets; only the read-write one is accepted."""
        hosts = ",".join(str(path / "sock") for _, path in self.slots)
        ports = ",".join(str(port) for port, _ in self.slots)
        return f"postgresql://postgres@/postgres?host={hosts}&port={ports}&target_session_attrs=read-write"

    @property
    def primary_cluster(self) -> PgCluster:
        pg = self.clusters[self.primary]
        assert pg is not None
        return pg

    def rebuild_standby(self) -> None:
        """A fresh streaming standby of the primary in the other slot (its directory wiped first)."""
        slot = 1 - self.primary
        old = self.clusters[slot]
        if old is not None:
            old.destroy()
        port, path = self.slots[slot]
        shutil.rmtree(path, ignore_errors=True)
        standby = PgCluster(port=port, base=path, initdb=False)
        self.clusters[slot] = standby
        primary = self.primary_cluster
        standby._run("pg_basebackup", "-D", str(standby.data), "-h", "127.0.0.1", "-p", str(primary.port),
                     "-U", "postgres", "-R", "-X", "stream", "--no-sync", "-c", "fast")
        standby.start()

    def kill_primary_and_promote(self) -> None:
        """SIGKILL the primary's whole process group (a host dying), then promote the standby."""
        pg = self.primary_cluster
        if pg.proc is not None and pg.proc.poll() is None:
            os.killpg(pg.proc.pid, signal.SIGKILL)
            pg.proc.wait()
        standby = self.clusters[1 - self.primary]
        assert standby is not None
        standby.promote()
        self.primary = 1 - self.primary

    def restart_primary(self) -> None:
        self.primary_cluster.restart()

    def connections(self) -> int | None:
        """Client backends on the primary (the replicas' pools and listeners), None if it does not answer."""
        import psycopg

        try:
            with psycopg.connect(self.primary_cluster.url, autocommit=True, connect_timeout=2) as conn:
                row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                                   "AND pid <> pg_backend_pid()").fetchone()
                return int(row[0]) if row else None
        except psycopg.Error:
            return None

    def now(self) -> str | None:
        """The primary's clock (text), None if it does not answer."""
        row = self._query("SELECT now()::text")
        return str(row[0]) if row else None

    def beats_since(self, mark: str) -> int:
        """Live replicas whose last heartbeat reached the primary after ``mark`` (its own clock)."""
        row = self._query("SELECT count(*) FROM replicas WHERE stopped_at IS NULL AND updated_at > %s::timestamptz",
                          (mark,))
        return int(row[0]) if row else 0

    def _query(self, sql: str, params: tuple = ()) -> tuple | None:
        import psycopg

        try:
            with psycopg.connect(self.primary_cluster.url, autocommit=True, connect_timeout=2) as conn:
                return conn.execute(sql, params).fetchone()
        except psycopg.Error:
            return None

    def destroy(self) -> None:
        for pg in self.clusters:
            if pg is not None:
                pg.destroy()


class ReplicaSlot:
    """One replica's address, data directory and current process (restarted in place)."""

    def __init__(self, fleet: Fleet, index: int):
        self.fleet = fleet
        self.index = index
        lab = fleet.lab
        self.host = lab.address(index) if lab else "127.0.0.1"
        self.port = REPLICA_PORT if lab else free_port()
        self.url = f"http://{self.host}:{self.port}"
        self.derp = derp_url(self.url) or self.url
        self.data = fleet.base / f"replica{index}"
        self.data.mkdir(exist_ok=True)
        self.proc: Proc | None = None
        self.server_key: str | None = None
        self.starts = 0
        self.started_at = 0.0
        self.stopped = False  # SIGSTOPped

    def start(self) -> None:
        if self.proc is not None:
            self.proc.stop()
        lab = self.fleet.lab
        prefix = lab.exec_args(self.index) if lab else []
        self.starts += 1
        self.started_at = time.monotonic()
        self.proc = Proc(
            [*prefix, python(), "-m", "coordinator", "server", "--address", f"{self.host}:{self.port}",
             "--data-dir", str(self.data), "--relay-url", self.url, "--access-url", self.fleet.access_url,
             "--pg-url", self.fleet.pg_url, *self.fleet.replica_args],
            env={"COORDINATOR_API_TOKEN": TOKEN}, log=self.data / f"server-{self.starts}.log",
        )

    @property
    def pid(self) -> int | None:
        return self.proc.proc.pid if self.proc is not None and self.proc.proc.poll() is None else None

    @property
    def exited(self) -> bool:
        return self.proc is None or self.proc.proc.poll() is not None

    def signal(self, sig: int) -> None:
        if self.proc is not None:
            self.proc.signal(sig)

    def status(self, timeout: float = 2.0) -> dict | None:
        """/api/v2/debug/status, or None while the replica does not answer."""
        request = urllib.request.Request(self.url + "/api/v2/debug/status", headers={"Authorization": f"Bearer {TOKEN}"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                return json.load(resp)
        except (OSError, ValueError):
            return None

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.signal(signal.SIGCONT)
            self.proc.signal(signal.SIGKILL)
            self.proc.stop()


class Fleet:
    """Everything the soak runs; :meth:`close` stops all of it, whatever state it is in."""

    def __init__(self, base: Path, replicas: int, lab: netlab.NetLab | None, replica_args: list[str],
                 pgbouncer: bool = False):
        self.base = base
        self.bouncer = Bouncer(base / "pgbouncer", free_port()) if pgbouncer else None
        self.lab = lab
        self.replica_args = replica_args
        self.pg = Postgres(base)
        self.access_port = free_port()
        self.access_url = f"http://127.0.0.1:{self.access_port}"
        self.replicas = [ReplicaSlot(self, i) for i in range(replicas)]
        self.nginx: Proc | None = None

    @property
    def pg_url(self) -> str:
        """What the replicas are given: PgBouncer's URL when it is in front, else both Postgres slots."""
        return self.bouncer.url if self.bouncer is not None else self.pg.url

    def point_bouncer(self) -> None:
        if self.bouncer is not None:
            primary = self.pg.primary_cluster
            self.bouncer.point(primary.sock, primary.port)

    def start(self) -> None:
        self.pg.start()
        if self.bouncer is not None:
            self.point_bouncer()
            self.bouncer.start()
        for r in self.replicas:
            r.start()
        prefix = self.base / "nginx"
        conf = nginx.write_config(prefix, [(r.host, r.port) for r in self.replicas], ("127.0.0.1", self.access_port))
        nginx.check(prefix, conf)
        self.nginx = Proc(nginx.command(prefix, conf), log=prefix / "nginx.out")

    def healthy(self, r: ReplicaSlot) -> bool:
        """Answers, reaches Postgres and its pub/sub, and has a connected link to every other replica."""
        st = None if r.exited or r.stopped else r.status()
        if not st or not st.get("database") or not st.get("pubsub"):
            return False
        r.server_key = st.get("server_key")
        links = st.get("mesh", {})
        return all(links.get(o.derp, {}).get("connected") for o in self.replicas if o is not r and not o.stopped)

    def all_healthy(self) -> bool:
        return all(self.healthy(r) for r in self.replicas)

    def close(self) -> None:
        for r in self.replicas:
            r.kill()
        if self.nginx is not None:
            self.nginx.stop()
        if self.bouncer is not None:
            self.bouncer.stop()
        self.pg.destroy()
