#!/usr/bin/env python3
"""Throughput, loss and latency of the DERP relay, against a pure-Python baseline relay.

What is measured
----------------
The relay runs in its own process (``python -m bench relay``: ``create_app(DerpRelay(...))`` under
uvicorn with uvloop and ``DerpHttpProtocol``, as ``coordinator server`` runs it) on 127.0.0.1.
``--pairs`` client pairs connect to it with raw ``Upgrade: DERP`` connections and the full
handshake; in each pair one connection sends SendPacket frames to the other. For every mode and
packet size (one *case*), after ``--warmup`` seconds the benchmark measures for ``--seconds``:

* delivered packets/s and MB/s (10^6 bytes of packet payload) counted by the receivers;
* loss % = 1 - received/sent over the whole case (after a drain once senders stop);
* one-way latency p50/p99: senders put ``time.perf_counter_ns()`` (CLOCK_MONOTONIC, shared by all
  processes on Linux) in the first 8 payload bytes, receivers sample every ``--sample-every``-th
  packet;
* the server process's CPU seconds (utime+stime from /proc/<pid>/stat) and the client process's.

Modes:

* ``windowed``: each sender keeps at most ``--window`` packets in flight; the receiver sends a
  cumulative ack (8-byte count) back through the relay once it has ``--ack-every`` new packets.
  Nothing may be lost; a loss is reported as an error.
* ``flood``: senders write as fast as TCP back-pressure on their own connection lets them; the
  relay drops what a slow receiver cannot take (its queues), which shows as loss.

Every case also runs, right after, against a minimal pure-Python asyncio relay (``bench/baseline.py``,
``python -m bench baseline``: per frame, parse the header, look the destination up in a dict and
``transport.write`` the rewritten frame; same event loop; frames for a destination whose transport
pushes back are dropped) in another process, with the same client, and the script prints
ours/baseline ratios. ``--no-baseline`` skips it; ``--relay-path`` benchmarks a modified build.

Windowed cases also run against the floor (``floor_relay.c``, a zero-work relay in C, one epoll
thread, compiled here; see ``bench_mesh.py``) with the same client; ``--no-floor`` skips it. The
server's CPU per delivered packet, ours over the floor's, is what the relay spends beyond the
least any relay must. With ``--client per-packet`` every packet is its own write, as with
Tailscale's client, so that ratio is the cost per read; ``--before-path`` adds a second build of
ours to the same run (before/after a change), and ``--repeat N`` alternates all servers N times
per case and reports the run with the median server CPU per packet.

The machine's total CPU use over each window is read from /proc/stat as well: on a shared machine
"others CPU s" (used by neither server nor client) tells how much other work disturbed a figure.
Both relays count packets (GET /bench/stats); a disagreement with the client's counts is reported.

The client runs in ``--client-procs`` separate processes (default 1, uvloop); see ``bench/clients.py``
for how it keeps its own CPU cost low. The parts live in ``scripts/bench/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

from bench import callgrind, options, proc
from bench.driver import run_relay_case
from bench.floor import build_floor, start_one_floor
from bench.report import fmt, median_cases, print_relay_results, relay_target_checks

from _relay.codec import FRAME_HEADER_LEN, KEY_LEN


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_case_options(ap)
    ap.add_argument("--baseline-loop", choices=("uvloop", "asyncio"), default="uvloop",
                    help="event loop of the pure-Python baseline relay (default uvloop, like ours)")
    options.add_relay_path_option(ap)
    ap.add_argument("--no-baseline", action="store_true", help="skip the pure-Python baseline relay")
    ap.add_argument("--no-floor", dest="floor", action="store_false",
                    help="skip the floor: windowed cases against floor_relay.c, a zero-work C relay")
    ap.add_argument("--callgrind", metavar="DIR",
                    help="run the servers under valgrind's callgrind (dumps into DIR, for callgrind_annotate) and "
                         "report their user-space instructions per packet: reproducible on a busy machine (rates "
                         "under valgrind mean nothing; use --window 1 --ack-every 1 for one packet per read)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run every case N times, all servers alternated; report the median (default 1)")
    ap.add_argument("--before-path", metavar="DIR",
                    help="also benchmark the relay built in DIR (e.g. the commit before a change) in the same run")
    ap.add_argument("--rate-limit", action="append", default=[], metavar="BYTES[:BURST]",
                    help="also benchmark the relay with this per-client rate limit (bytes/s); repeatable")
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    args = ap.parse_args()
    options.check_case_options(ap, args)
    if args.repeat < 1:
        ap.error("--repeat must be positive")
    try:
        args.rate_limit = [tuple(int(v) for v in (spec + ":0").split(":")[:2]) for spec in args.rate_limit]
    except ValueError:
        ap.error("--rate-limit: BYTES or BYTES:BURST, integers")
    return args


def limit_name(rate: int, burst: int) -> str:
    """The server name of a ``--rate-limit`` run (bytes/s, and the burst if given)."""
    return f"limit={rate}" + (f":{burst}" if burst else "")


def consistency_warnings(r: dict) -> list[str]:
    """The server's counters against the client's: the relay counts the acks too, may drop, never invent."""
    c = r["server_counted"]
    if c and (c["packets_in"] != r["sent_total"] + r["acks"] or c["packets_out"] - r["acks"] > r["received_total"]):
        return [f"{r['mode']} {r['size']} B: the server counted {c} but the client sent "
                f"{r['sent_total']} packets + {r['acks']} acks and received {r['received_total']}"]
    return []


def main() -> int:
    args = parse_args()
    proc.sigterm_as_interrupt()
    server_argv = proc.server_argv("relay", "--keepalive", "3600")
    relay_argv = server_argv + (["--relay-path", args.relay_path] if args.relay_path else [])
    servers = [("relay", relay_argv)]
    if args.before_path:
        servers.insert(0, ("before", server_argv + ["--relay-path", args.before_path]))
    for rate, burst in args.rate_limit:
        servers.append((limit_name(rate, burst), relay_argv + ["--rate-limit", str(rate), "--rate-burst", str(burst)]))
    if not args.no_baseline:
        servers.append(("baseline", proc.server_argv("baseline", "--loop", args.baseline_loop)))
    runs: dict[str, list[dict]] = {name: [] for name, _ in servers}
    log = sys.stderr
    started = time.monotonic()
    procs: list[proc.ServerProcess] = []
    workdir = tempfile.mkdtemp(prefix="bench-relay-")
    args.callgrind_dir = None
    if args.callgrind:
        if not callgrind.available():
            print("--callgrind: valgrind is not installed", file=log)
            return 2
        os.makedirs(args.callgrind, exist_ok=True)
        args.callgrind_dir = args.callgrind
    try:
        for name, argv in servers:
            if args.callgrind:
                argv = callgrind.wrap(argv, args.callgrind, name)
            procs.append(proc.ServerProcess(argv, name, start_timeout=300 if args.callgrind else 20).__enter__())
        binary = build_floor(workdir, log) if args.floor else None
        if binary:
            procs.append(start_one_floor(binary, callgrind.wrap([binary], args.callgrind, "floor") if args.callgrind else None))
            runs["floor"] = []
        print("servers: " + ", ".join(f"{p.name} pid {p.pid} port {p.port}" for p in procs)
              + f"; client: {args.client_procs} process(es), {args.client_loop}; {os.cpu_count()} CPUs", file=log)
        for mode in args.modes:
            for size in args.sizes:
                for p in [p for _ in range(args.repeat) for p in procs]:
                    if p.name == "floor" and mode != "windowed":
                        continue  # the floor has no drop policy: under flood its buffers only grow
                    r = run_relay_case(p, args, mode, size)
                    runs[p.name].append(r)
                    print(f"  {mode:8} {size:>5} B {p.name:8}: {r['pkt_s']:>10,.0f} pkt/s {r['mb_s']:>8,.1f} MB/s "
                          f"loss {r['loss_pct']:.2f} %  p50 {fmt(r['p50_us'])} µs  p99 {fmt(r['p99_us'])} µs  "
                          f"server CPU {r['server_cpu_s']:.2f} s  client CPU {r['client_cpu_s']:.2f} s", file=log)
    except KeyboardInterrupt:
        print("interrupted", file=log)
        return 130
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    results = {name: median_cases(cases) for name, cases in runs.items()}
    every = results["relay"] + results.get("baseline", [])
    for r in every:
        for line in consistency_warnings(r):
            print("WARNING: " + line, file=log)
    lossy = [r for r in every if r["mode"] == "windowed" and r["sent_total"] != r["received_total"]]
    if args.json:
        json.dump({"args": vars(args), "cpus": os.cpu_count(), "wall_seconds": time.monotonic() - started,
                   "load_average": os.getloadavg(), "results": results,
                   "runs": runs if args.repeat > 1 else None,
                   "targets": relay_target_checks(results["relay"], results.get("floor", []))}, sys.stdout, indent=2)
        print()
    else:
        print_relay_results(results, args)
        print(f"\n({time.monotonic() - started:.0f} s. MB = 10^6 bytes of packet payload. Latency is one-way, sampled "
              f"every {args.sample_every}th packet. CPU s over the {args.seconds:g} s measured; srv % = of one core; "
              f"µs/pkt = CPU per delivered packet; machine busy = all {os.cpu_count()} CPUs; others = CPU used by "
              f"neither server nor client (other processes, uncharged softirq). Client: {args.client}. "
              f"Load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}.)")
    for rate, burst in args.rate_limit:
        for r in results[limit_name(rate, burst)]:
            share = rate * r["size"] / (r["size"] + FRAME_HEADER_LEN + KEY_LEN)  # the limit counts the framing too
            per_sender = r["mb_s"] * 1e6 / r["pairs"]
            if per_sender < share / 2:
                continue  # the limit did not bind: this run measured its cost, not its effect
            print(f"{limit_name(rate, burst)} {r['mode']} {r['size']} B: each sender got {per_sender / 1e6:.3f} MB/s of "
                  f"payload = {100 * per_sender / share:.1f} % of what the limit allows")
    if lossy:
        print(f"ERROR: windowed mode lost packets in {len(lossy)} case(s)", file=log)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
