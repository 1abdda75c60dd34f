#!/usr/bin/env python3
"""N replicas on one Postgres: time to a full mesh, Postgres connections, idle CPU, a mass SIGTERM.

What is measured
----------------
``--replicas`` (default 50) ``coordinator server`` processes are started at once on one Postgres
(a throwaway ``testkit/pgcluster.py`` server unless ``--pg-url`` is given), each on a free port with
its own data directory, as ``testkit/cluster.py`` starts them. Then:

* **fully meshed**: the time until every replica lists every other as a live peer and has a
  connected mesh link to each (``/api/v2/debug/status``, polled), from the moment the processes
  were spawned and from the moment the last one answered ``/readyz`` (start-up of N Python
  processes on few cores is most of the former; the latter is what the mesh itself costs);
* **Postgres connections per replica**: each replica's TCP connections to the Postgres port
  (from /proc via psutil; min/median/max), and ``pg_stat_activity``'s total for the
  ``coordinator`` application;
* **idle CPU** over ``--idle`` seconds (default 30) of all replica processes together, and of
  Postgres (postmaster and backends), as a share of one core;
* **a simultaneous SIGTERM** of every other replica (half of them): when each survivor dropped
  each stopped replica (the survivors' own ``mesh: peer ... left`` log lines, millisecond
  timestamps, checked against their status afterwards), and when every stopped process had exited.

Targets of the issue on this machine: fully meshed <= 10 s, drop <= 1 s, every stopped process
exited <= 5 s. Figures are printed with the targets; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

import psutil
from bench import proc

from coordinator.core.urls import derp_url
from testkit.cluster import HACluster, Replica, full_mesh
from testkit.polling import wait_until_blocking

ROOT = Path(__file__).resolve().parent.parent

TARGET_MESH_S, TARGET_DROP_S, TARGET_EXIT_S = 10.0, 1.0, 5.0
_LEFT = re.compile(r"^(\S+ \S+) INFO +coordinator\.mesh: mesh: peer (\S+) left", re.M)
_STOPPED = re.compile(r"^(\S+ \S+) INFO +coordinator\.replicas: replica \S+ stopped$", re.M)


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def poll(predicate, timeout: float, what: str, interval: float = 0.2) -> float:
    """Seconds until ``predicate()`` holds (OSError counts as not yet); raises after ``timeout``."""
    return wait_until_blocking(predicate, timeout, what, interval, ignore=(OSError,))


def sees_all(replicas: list[Replica]) -> bool:
    """Every replica sees every other alive and has a connected mesh link to it."""
    return all(r.status()["peers"] >= len(replicas) - 1 for r in replicas) and full_mesh(replicas)


def start_all(cluster: HACluster, n: int, timeout: float) -> dict:
    replicas = [cluster.add_replica(start=False) for _ in range(n)]
    spawned = time.monotonic()
    for r in replicas:
        r.start(wait=False)
    for r in replicas:
        r.proc.wait_http(r.url + "/readyz", timeout)
    ready = time.monotonic() - spawned
    progress(f"  all {n} ready {ready:.1f} s after they were spawned; waiting for the full mesh")
    meshed = poll(lambda: sees_all(replicas), timeout, "the full mesh", interval=0.1)
    return {"ready_s": ready, "meshed_after_spawn_s": ready + meshed, "meshed_after_ready_s": meshed}


def pg_connections(cluster: HACluster, pg_port: int, pg_url: str) -> dict:
    per = []
    for r in cluster.running():
        conns = psutil.Process(r.proc.proc.pid).net_connections(kind="tcp")
        per.append(sum(1 for c in conns if c.raddr and c.raddr.port == pg_port and c.status == psutil.CONN_ESTABLISHED))
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        rows = conn.execute("SELECT application_name, count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                            "AND pid <> pg_backend_pid() GROUP BY 1 ORDER BY 1").fetchall()
    by_name: dict[str, int] = {}
    for name, n in rows:  # one listener per replica, each with its own suffix
        key = re.sub(r"-[0-9a-f]{12}$", "-*", name or "(none)")
        by_name[key] = by_name.get(key, 0) + n
    return {"min": min(per), "median": statistics.median(per), "max": max(per), "pg_stat_activity": by_name}


def processes_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += proc.cpu_seconds(pid)
        except OSError:
            pass
    return total


def postgres_pids(postmaster: int | None) -> list[int]:
    if postmaster is None:
        return []
    try:
        p = psutil.Process(postmaster)
        return [postmaster, *(c.pid for c in p.children(recursive=True))]
    except psutil.Error:
        return []


def idle_cpu(cluster: HACluster, postmaster: int | None, seconds: float) -> dict:
    replica_pids = [r.proc.proc.pid for r in cluster.running()]
    pg_before = {pid: proc.cpu_seconds(pid) for pid in postgres_pids(postmaster)}
    r0 = processes_cpu(replica_pids)
    time.sleep(seconds)
    r1 = processes_cpu(replica_pids)
    pg_after = {pid: proc.cpu_seconds(pid) for pid in postgres_pids(postmaster)}
    pg = sum(v - pg_before.get(pid, 0.0) for pid, v in pg_after.items())
    n = len(replica_pids)
    return {"seconds": seconds, "replicas_core_share": (r1 - r0) / seconds, "per_replica_core_share": (r1 - r0) / seconds / n,
            "postgres_core_share": pg / seconds}


def log_time(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def mass_stop(cluster: HACluster, timeout: float) -> dict:
    replicas = cluster.running()
    leaving, staying = replicas[::2], replicas[1::2]
    gone = {derp_url(r.url) for r in leaving}
    logs = {r.index: len(r.proc.output) for r in staying}  # only lines written after the signal count
    signalled_wall, signalled = time.time(), time.monotonic()
    for r in leaving:
        r.proc.signal(signal.SIGTERM)
    exits: dict[int, float] = {}

    def exited() -> bool:
        for r in leaving:
            if r.index not in exits and not r.running:
                exits[r.index] = time.monotonic() - signalled
        return len(exits) == len(leaving)

    exit_wait_error = None
    try:
        poll(exited, timeout, "every stopped replica to exit", interval=0.01)
    except RuntimeError as exc:
        exit_wait_error = str(exc)

    def dropped() -> bool:
        for r in staying:
            s = r.status()
            if gone & set(s["mesh"]) or s["peers"] != len(staying) - 1:
                return False
        return True

    poll(dropped, timeout, "the survivors to drop every stopped replica", interval=0.05)
    confirmed = time.monotonic() - signalled  # an upper bound: polled only once every process had exited
    recorded = {}  # stopped replica's URL -> when it recorded its stop (its log line)
    for r in leaving:
        found = _STOPPED.findall(r.proc.output)
        if found:
            recorded[derp_url(r.url)] = log_time(found[-1])
    drop_times = []  # per survivor: when it had dropped the last of them
    after_recorded = []  # per (survivor, stopped replica): drop time minus that replica's recorded stop
    missing = 0
    for r in staying:
        seen = {url: log_time(stamp) for stamp, url in _LEFT.findall(r.proc.output[logs[r.index]:]) if url in gone}
        missing += len(gone - set(seen))
        if seen:
            drop_times.append(max(seen.values()) - signalled_wall)
        after_recorded += [t - recorded[url] for url, t in seen.items() if url in recorded]
    rec = [t - signalled_wall for t in recorded.values()]
    return {
        "stopped": len(leaving), "survivors": len(staying),
        "drop_s_max": max(drop_times, default=None), "drop_s_median": statistics.median(drop_times) if drop_times else None,
        "drop_lines_missing": missing,
        "recorded_s_max": max(rec, default=None), "recorded_s_median": statistics.median(rec) if rec else None,
        "drop_after_recorded_s_max": max(after_recorded, default=None),
        "drop_after_recorded_s_median": statistics.median(after_recorded) if after_recorded else None,
        "dropped_confirmed_by_status_s": confirmed,
        "exit_s_max": max(exits.values(), default=None), "exit_s_median": statistics.median(exits.values()) if exits else None,
        "exited": len(exits), "exit_statuses": sorted({r.proc.proc.returncode for r in leaving if not r.running}),
        "exit_wait_error": exit_wait_error,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--replicas", type=int, default=50, help="replica processes (default 50)")
    ap.add_argument("--heartbeat", default="2s", help="replica heartbeat (default 2s, the replicas' default)")
    ap.add_argument("--idle", type=float, default=30.0, help="seconds of idle CPU measurement (default 30)")
    ap.add_argument("--shutdown-timeout", default="5s", help="the replicas' --shutdown-timeout (default 5s)")
    ap.add_argument("--timeout", type=float, default=300.0, help="give up waiting for any phase after this (s)")
    ap.add_argument("--pg-url", help="Postgres URL (default: start a throwaway server)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    if args.replicas < 2:
        ap.error("--replicas must be at least 2")
    proc.sigterm_as_interrupt()
    proc.raise_nofile()
    pg = None
    cluster = None
    try:
        url = args.pg_url
        if url is None:
            from testkit.pgcluster import PgCluster

            pg = PgCluster()
            pg.start()
            url = pg.url
        import psycopg

        params = psycopg.conninfo.conninfo_to_dict(url)
        pg_port = int(params.get("port") or 5432)
        postmaster = pg.proc.pid if pg is not None else None
        cluster = HACluster(url, heartbeat=args.heartbeat, extra_args=("--shutdown-timeout", args.shutdown_timeout))
        progress(f"starting {args.replicas} replicas on {url} (heartbeat {args.heartbeat})")
        result = {"replicas": args.replicas, "heartbeat": args.heartbeat}
        result["mesh"] = start_all(cluster, args.replicas, args.timeout)
        result["pg_connections_per_replica"] = pg_connections(cluster, pg_port, url)
        progress(f"  measuring idle CPU for {args.idle:g} s")
        result["idle_cpu"] = idle_cpu(cluster, postmaster, args.idle)
        progress("  SIGTERM to every other replica at once")
        result["mass_stop"] = mass_stop(cluster, args.timeout)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if cluster is not None:
            cluster.close(graceful=True)
        if pg is not None:
            pg.destroy()
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
        return 0
    report(result)
    return 0


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def met(value: float | None, target: float) -> str:
    return "n/a" if value is None else ("MET" if value <= target else "NOT MET")


def report(r: dict) -> None:
    m, c, cpu, s = r["mesh"], r["pg_connections_per_replica"], r["idle_cpu"], r["mass_stop"]
    n = r["replicas"]
    print(f"{n} replicas on one Postgres (heartbeat {r['heartbeat']}):")
    print(f"  all ready {m['ready_s']:.1f} s after spawning; fully meshed (each sees {n - 1} peers alive, "
          f"{n * (n - 1)} links up) {m['meshed_after_ready_s']:.1f} s after the last was ready, "
          f"{m['meshed_after_spawn_s']:.1f} s after spawning; target <= {TARGET_MESH_S:g} s: "
          f"{met(m['meshed_after_ready_s'], TARGET_MESH_S)} (after ready) / {met(m['meshed_after_spawn_s'], TARGET_MESH_S)} "
          f"(after spawning)")
    print(f"  Postgres connections per replica: min {c['min']}, median {c['median']:g}, max {c['max']} "
          f"(client backends in pg_stat_activity by application_name: "
          f"{', '.join(f'{k} {v}' for k, v in c['pg_stat_activity'].items())})")
    print(f"  idle CPU over {cpu['seconds']:g} s: replicas {cpu['replicas_core_share']:.1%} of one core "
          f"({cpu['per_replica_core_share']:.2%} each), Postgres {cpu['postgres_core_share']:.1%}")
    print(f"  SIGTERM to {s['stopped']} of {n} at once: survivors dropped all of them within "
          f"{s['drop_s_max'] if s['drop_s_max'] is None else round(s['drop_s_max'], 3)} s (median survivor "
          f"{s['drop_s_median'] if s['drop_s_median'] is None else round(s['drop_s_median'], 3)} s; "
          f"{s['drop_lines_missing']} drops without a log line); target <= {TARGET_DROP_S:g} s: "
          f"{met(s['drop_s_max'], TARGET_DROP_S)}")
    print(f"  the stopped replicas recorded their stop {fmt(s['recorded_s_median'])} s (median) / {fmt(s['recorded_s_max'])} s "
          f"(last) after the signal; survivors dropped each {fmt(s['drop_after_recorded_s_median'])} s (median) / "
          f"{fmt(s['drop_after_recorded_s_max'])} s (max) after its stop was recorded (item 2's target: <= 0.5 s)")
    print(f"  stopped processes exited within {s['exit_s_max'] if s['exit_s_max'] is None else round(s['exit_s_max'], 2)} s "
          f"(median {s['exit_s_median'] if s['exit_s_median'] is None else round(s['exit_s_median'], 2)} s; "
          f"{s['exited']} of {s['stopped']} exited, statuses {s['exit_statuses']}); target <= {TARGET_EXIT_S:g} s: "
          f"{met(s['exit_s_max'], TARGET_EXIT_S)}")
    if s["exit_wait_error"]:
        print(f"  {s['exit_wait_error']}")


if __name__ == "__main__":
    sys.exit(main())
