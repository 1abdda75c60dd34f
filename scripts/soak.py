#!/usr/bin/env python3
"""Chaos soak: a replica fleet under client traffic and random faults, with figures at the end.

    sudo .venv/bin/python scripts/soak.py --duration 30m --seed 7 --json-out soak.json

Starts 5 replicas (each in its own network namespace when the machine allows it) behind real nginx,
on a Postgres primary with a streaming standby; connects 200 client pairs through nginx sending
numbered packets both ways; then, every 15-45 s (seeded), one fault: SIGKILL, SIGTERM or SIGSTOP
(10 s) of a replica and its restart, a Postgres primary SIGKILL with standby promotion (and a fresh
standby after), a Postgres restart, a 20 s partition between two replicas. It prints every fault and
its recovery time, packets lost by pairs whose replicas were not touched (goal 0), the longest gap
per pair, replicas that failed to rejoin (goal 0), each replica's RSS and descriptors over time (the
slope after warm-up), and Postgres connections. Everything it starts is stopped on the way out,
Ctrl-C and SIGTERM included; exit status 1 if a goal was missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from soaklib import report as figures
from soaklib.faults import BOUNCER, KINDS, Chaos, available_kinds
from soaklib.fleet import Fleet
from soaklib.kit import netlab
from soaklib.load import Load

from coordinator.core.errors import ConfigError
from coordinator.core.values import parse_duration
from testkit.pgbouncer import pgbouncer_binary

SAMPLE_EVERY = 5.0


def log(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="soak.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", default="3m", help="how long faults are drawn, Go-style (3m, 30m; default 3m)")
    p.add_argument("--seed", type=int, default=1, help="seed of the fault draw (default 1)")
    p.add_argument("--replicas", type=int, default=5)
    p.add_argument("--pairs", type=int, default=200)
    p.add_argument("--interval", default="250ms", help="each side of a pair sends one packet this often")
    p.add_argument("--gap", default="15s:45s", help="pause between faults, min:max (default 15s:45s)")
    p.add_argument("--warm-up", default="60s", help="replica age before its RSS and fds count for drift")
    p.add_argument("--faults", default=",".join(KINDS),
                   help=f"the kinds of fault to draw from (default: all: {','.join(KINDS)}; {BOUNCER} with --pgbouncer)")
    p.add_argument("--pgbouncer", action="store_true",
                   help=f"put PgBouncer (session pooling) between the replicas and Postgres, and add {BOUNCER} faults")
    p.add_argument("--no-netns", action="store_true", help="run on 127.0.0.1 without namespaces (no partition fault)")
    p.add_argument("--debug", action="store_true", help="add each flow's longest gap and homes to the JSON")
    p.add_argument("--keep", action="store_true", help="keep the run's directory (replica, nginx and Postgres logs)")
    p.add_argument("--json-out", help="write the figures as JSON here too")
    p.add_argument("--replica-arg", action="append", default=[], help="one more `coordinator server` flag")
    args = p.parse_args(argv)
    try:
        args.duration_s = parse_duration(args.duration, "--duration")
        args.interval_s = parse_duration(args.interval, "--interval")
        args.warm_up_s = parse_duration(args.warm_up, "--warm-up")
        low, _, high = args.gap.partition(":")
        args.gap_s = (parse_duration(low, "--gap"), parse_duration(high or low, "--gap"))
    except ConfigError as exc:
        p.error(str(exc))
    args.kinds = tuple(k for k in args.faults.split(",") if k)
    if args.pgbouncer and pgbouncer_binary() is None:
        p.error("--pgbouncer: pgbouncer is not installed (apt-get install pgbouncer; scripts/bootstrap.sh test)")
    if args.pgbouncer and BOUNCER not in args.kinds:
        args.kinds += (BOUNCER,)
    if unknown := set(args.kinds) - set(KINDS) - ({BOUNCER} if args.pgbouncer else set()):
        p.error(f"--faults: unknown kind(s) {', '.join(sorted(unknown))} (known: {', '.join(KINDS)}, "
                f"and {BOUNCER} with --pgbouncer)")
    if args.replicas < 2 or args.pairs < 1 or args.interval_s <= 0 or args.gap_s[0] > args.gap_s[1]:
        p.error("need --replicas >= 2, --pairs >= 1, a positive --interval and --gap min <= max")
    return args


async def sample(fleet: Fleet, samples: list[figures.Sample], pg_conns: list[int]) -> None:
    while True:
        for r in fleet.replicas:
            pid = r.pid
            if pid is None or r.stopped:
                continue
            try:
                rss = int(next(line.split()[1] for line in open(f"/proc/{pid}/status") if line.startswith("VmRSS")))
                fds = len(os.listdir(f"/proc/{pid}/fd"))
            except (OSError, StopIteration, ValueError):
                continue
            st = await asyncio.to_thread(r.status)
            clients = st["relay"].get("current_connections", 0) if st else 0
            samples.append(figures.Sample(time.monotonic(), r.index, r.starts, r.started_at, rss / 1024, fds, clients))
        conns = await asyncio.to_thread(fleet.pg.connections)
        if conns is not None:
            pg_conns.append(conns)
        await asyncio.sleep(SAMPLE_EVERY)


async def soak(args: argparse.Namespace, fleet: Fleet) -> dict:
    rng = random.Random(args.seed)
    front = " behind PgBouncer (session pooling)" if fleet.bouncer else ""
    log(f"starting Postgres (primary + streaming standby){front}, {args.replicas} replicas and nginx in {fleet.base}")
    await asyncio.to_thread(fleet.start)
    deadline = time.monotonic() + 120
    while not await asyncio.to_thread(fleet.all_healthy):
        if time.monotonic() > deadline:
            raise RuntimeError("the fleet did not come up whole within 120 s")
        await asyncio.sleep(0.5)
    load = Load(fleet.access_url, args.pairs, args.interval_s)
    samples: list[figures.Sample] = []
    pg_conns: list[int] = []
    sampler = asyncio.create_task(sample(fleet, samples, pg_conns), name="soak sampler")
    chaos = Chaos(fleet, rng, available_kinds(fleet.lab, args.kinds, log), log)
    try:
        log(f"connecting {args.pairs} client pairs through nginx ({fleet.access_url})")
        await load.connect(rng)
        await load.routed()
        load.run()
        t0 = time.monotonic()
        log(f"traffic on: every side sends a numbered packet every {args.interval_s * 1e3:.0f} ms; "
            f"faults for {args.duration_s:.0f} s")
        while True:
            pause = rng.uniform(*args.gap_s)
            if time.monotonic() + pause > t0 + args.duration_s:
                await asyncio.sleep(max(0.0, t0 + args.duration_s - time.monotonic()))
                break
            await asyncio.sleep(pause)
            await chaos.run_one(chaos.draw())
        stopped = await load.stop()
        keys = {r.index: figures._key(r.server_key) for r in fleet.replicas}
        loss = figures.losses(load, chaos.faults, {i: k for i, k in keys.items() if k}, stopped)
        never = set(loss.pop("pairs_never_touched"))
        quiet = loss.pop("quiet_gaps")
        return {
            "duration_s": time.monotonic() - t0, "seed": args.seed, "replicas": args.replicas, "pairs": args.pairs,
            "interval_s": args.interval_s, "faults": [f.as_dict(t0) for f in chaos.faults],
            "loss": loss,
            "gaps": figures.gaps(load.flows),
            "gaps_untouched": figures.gaps([f for f in load.flows if f.pair in never]),
            "gaps_quiet": quiet,
            "failed_to_rejoin": sorted({i for f in chaos.faults for i in f.failed_to_rejoin}),
            "drift": figures.drift(samples, args.warm_up_s),
            "postgres_connections": {
                "min": min(pg_conns, default=None), "median": statistics.median(pg_conns) if pg_conns else None,
                "max": max(pg_conns, default=None), "last": pg_conns[-1] if pg_conns else None,
            },
            "client_reconnects": sum(e.reconnects for e in load.endpoints),
            "pair_gaps": [[f.pair, round(f.longest_gap, 2), [figures.replica_of(keys, e.homes) for e in (f.src, f.dst)]]
                          for f in load.flows] if args.debug else None,
        }
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        await load.close()


def leftovers(fleet: Fleet, lab: netlab.NetLab | None) -> list[str]:
    """Processes this soak started that still run (there should be none)."""
    left = [f"replica {r.index} pid {r.proc.proc.pid}" for r in fleet.replicas if r.proc and r.proc.proc.poll() is None]
    if fleet.nginx is not None and fleet.nginx.proc.poll() is None:
        left.append(f"nginx pid {fleet.nginx.proc.pid}")
    left += [f"postgres pid {pg.proc.pid}" for pg in fleet.pg.clusters if pg and pg.proc and pg.proc.poll() is None]
    return left


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    lab: netlab.NetLab | None = None
    if not args.no_netns:
        try:
            netlab.check()
            netlab.sweep()
            lab = netlab.NetLab(args.replicas).create()
            lab.enter()  # Postgres, nginx and the clients live in the hub from here on
        except netlab.Unavailable as exc:
            log(f"no network namespaces: {exc}")
    base = Path(tempfile.mkdtemp(prefix="coordsoak-"))
    base.chmod(0o755)
    fleet = Fleet(base, args.replicas, lab, args.replica_arg, pgbouncer=args.pgbouncer)
    # SIGTERM and SIGHUP end the run like Ctrl-C: the finally blocks below stop everything.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    result: dict | None = None
    try:
        result = asyncio.run(soak(args, fleet))
    except KeyboardInterrupt:
        log("interrupted: stopping everything")
    finally:
        fleet.close()
        left = leftovers(fleet, lab)
        if lab is not None:
            lab.close()
        if args.keep:
            log(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    if result is None:
        return 130
    result["leftover_processes"] = left
    for line in figures.render(result):
        print(line, flush=True)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    missed = result["loss"]["lost_untouched"] or result["failed_to_rejoin"] or left
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
