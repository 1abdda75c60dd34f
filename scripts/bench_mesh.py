#!/usr/bin/env python3
"""Throughput, loss and latency across two meshed relays, against both clients on one relay.

What is measured
----------------
Two relay processes (``benchlib.py relay --mesh-key K``: ``create_app(DerpRelay(..., mesh_key=K))``
under uvicorn with uvloop and ``DerpHttpProtocol``, plus a ``coordinator.mesh.Mesh``) run on
127.0.0.1 and are meshed with each other (``POST /bench/mesh``: each dials the other's ``/derp``
with the shared mesh key, sends WatchConns and installs forwarders for the keys it learns).

Every case (mode x packet size) runs twice, back to back, with the same ``--pairs`` client pairs
and the same client code as ``bench_relay.py`` (imported from it):

* ``single``: sender and receiver of every pair on relay A (B is meshed but idle);
* ``cross``: senders on relay A, receivers on relay B: every packet goes SendPacket -> A ->
  ForwardPacket over the A->B mesh link -> B -> RecvPacket, and in windowed mode every ack goes
  the other way over the B->A link.

Before a case is measured, each pair sends probe packets (with the connections' DerpClient, before
the benchmark protocols take the sockets over) in both directions until one arrives: in the cross
case that is when A has learnt the receiver and B the sender through PeerPresent. Only then the
senders start. Modes, warm-up, loss, latency sampling and the client's CPU economy are those of
``bench_relay.py`` (see its docstring): ``windowed`` keeps <= ``--window`` packets in flight per
sender, acknowledged by the receiver through the relays, and must be lossless; ``flood`` writes as
fast as TCP back-pressure allows and shows the relays' drops as loss.

The floor
---------
Unless ``--no-floor``, every case also runs against two copies of ``floor_relay.c`` (compiled here
with ``cc -O2``): a zero-work relay in C, one epoll thread, that routes SendPacket, ForwardPacket
and RecvPacket with no checks, queues, watchers or Python, and flushes once per read like ours.
Same client, same pairs, same run; windowed mode only (the floor has no drop policy, so under flood
its buffers would only grow). Its cross / single ratio is what the extra hop itself costs on
this machine; ours divided by it is the share of that our relay keeps. (The floor skips the NaCl
boxes: the client does not wait for ServerInfo there, and the mesh link is a fixed connection.)

Reported per relay, case and topology: delivered packets/s and MB/s, loss %, one-way latency p50/p99,
CPU seconds of relay A and relay B (/proc/<pid>/stat, over the measured window) and of the client,
relay CPU per delivered packet (A + B), "others CPU s": machine CPU (/proc/stat) used by
neither the relays nor the client, i.e. other work on a shared machine (and softirq time the kernel
charges to no process), and "steal s", CPU time the hypervisor gave to other guests. A second table
gives cross / single ratios; the issue's target is windowed 1000 B cross >= 0.6x single.

The figures are noisy on a shared 2-CPU machine: other load slows the single-replica case (two
busy processes) more than the cross case (three processes that mostly wait on each other), which
*raises* the ratio. Trust rows whose "others CPU s" is small; ``--repeat N`` runs each case N
times, single and cross alternated, and reports the median run. ``--pin`` puts both relays on the
last CPU and the client on the others, which takes the scheduler's placement out of the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time

import bench_relay as br
import benchlib

TARGET = ("windowed", 1000, 0.6)  # mode, size, minimum cross/single pkt/s ratio (from the issue)
TOPOLOGIES = ("single", "cross")
PROBE_TAG = b"bench-mesh-probe"  # + a 4-byte sequence number; probes never reach the benchmark protocols


# ======================================================================================
# client side
# ======================================================================================


async def probe_route(a, b, deadline: float) -> int:
    """Send probes ``a`` -> ``b`` until one arrives; returns how many were sent.

    Probes that the first relay dropped (destination not known yet) are simply resent. Only the
    newest probe counts as arrival, and it is sent only once the previous one timed out: packets
    on one route stay in order, so when it arrives nothing older is still in flight and nothing
    of the probing reaches the benchmark protocols after the hand-over.
    """
    n = 0
    wait = 0.02
    while True:
        n += 1
        tag = PROBE_TAG + n.to_bytes(4, "little")
        await a.send(b.public_key, tag)
        until = min(deadline, time.monotonic() + wait)
        while True:
            try:
                pkt = await b.recv_packet(timeout=max(0.0, until - time.monotonic()))
            except TimeoutError:
                break
            if pkt.src == a.public_key and pkt.data == tag:
                return n
        if time.monotonic() >= deadline:
            raise RuntimeError(f"routing not established: {n} probes to {b.url} did not arrive")
        wait = min(0.25, wait * 2)


async def client_case(pipe, spec: dict) -> dict:
    """One client process's share of a case (``bench_relay.client_case`` with two relay URLs)."""
    from coordinator.client import DerpClient

    pairs = spec["pairs"]
    shared = br.Shared()
    urls = (spec["send_url"], spec["recv_url"])
    wait_info = spec.get("wait_server_info", True)
    clients = await asyncio.gather(*(DerpClient.connect(urls[i % 2], timeout=30, wait_server_info=wait_info)
                                     for i in range(2 * pairs)))
    t_probe = time.monotonic()
    deadline = t_probe + spec["route_timeout"]

    async def probe_pair(s, r) -> int:
        return await probe_route(s, r, deadline) + await probe_route(r, s, deadline)

    probes = await asyncio.gather(*(probe_pair(clients[2 * i], clients[2 * i + 1]) for i in range(pairs)))
    route_ms = 1000 * (time.monotonic() - t_probe)
    conns = [(c, await benchlib.take_over(c)) for c in clients]

    senders, receivers, transports = [], [], []
    for i in range(pairs):
        snd, rcv = br.attach_pair(conns[2 * i], conns[2 * i + 1], spec, shared, transports)
        senders.append(snd)
        receivers.append(rcv)
    return await br.measure(pipe, spec, shared, senders, receivers, transports,
                            {"probes": sum(probes), "route_ms": route_ms})


def client_worker(pipe, spec: dict) -> None:
    br.client_worker(pipe, spec, client_case)


# ======================================================================================
# orchestration
# ======================================================================================

COUNTERS = ("packets_in", "packets_out", "forwarded_in", "forwarded_out")


def steal_seconds() -> float:
    """CPU time the hypervisor gave to other guests (all CPUs; /proc/stat's steal column)."""
    with open("/proc/stat") as f:
        v = f.readline().split()
    return int(v[8]) / benchlib.CLK_TCK if len(v) > 8 else 0.0


def run_case(relays: list[benchlib.ServerProcess], args, mode: str, size: int, topology: str,
             floor: bool = False) -> dict:
    a, b = relays

    def sample():
        return [r.cpu() for r in relays], benchlib.machine_cpu_seconds(), steal_seconds(), time.monotonic()

    specs = br.client_specs(args, size, mode, send_url=a.url, recv_url=b.url if topology == "cross" else a.url,
                            route_timeout=args.route_timeout, cpus=args.client_cpus, wait_server_info=not floor)
    run = br.drive_clients(specs, client_worker, args, lambda: [r.stats() for r in relays], sample,
                           ready_timeout=60 + args.route_timeout)
    ready, results, (stats0, stats1) = run["ready"], run["results"], run["counters"]
    (cpu0, mach0, st0, m0), (cpu1, mach1, st1, m1) = run["samples"]
    traffic = br.client_totals(results, size)
    received = traffic["received"]
    relay_cpu = [c1 - c0 for c0, c1 in zip(cpu0, cpu1, strict=True)]
    cli_cpu = sum(r["cpu"] for r in results)
    busy, total, steal = mach1[0] - mach0[0], mach1[1] - mach0[1], st1 - st0
    deltas = [br.counter_delta(s0, s1, COUNTERS) for s0, s1 in zip(stats0, stats1, strict=True)]
    return {
        "relay": "floor" if floor else "ours",
        "mode": mode, "size": size, "topology": topology, "pairs": args.pairs, **traffic,
        "relay_cpu_s": {"A": relay_cpu[0], "B": relay_cpu[1]},
        "relay_us_per_pkt": 1e6 * sum(relay_cpu) / received if received else None,
        "client_cpu_s": cli_cpu, "client_us_per_pkt": 1e6 * cli_cpu / received if received else None,
        "machine_busy_pct": 100.0 * busy / total if total else None,
        "others_cpu_s": max(0.0, busy - steal - sum(relay_cpu) - cli_cpu), "steal_s": steal,
        "window_s": m1 - m0,
        "relay_counted": {"A": deltas[0][0], "B": deltas[1][0]},
        "relay_drops": {"A": deltas[0][1], "B": deltas[1][1]},
        "probes": sum(r["probes"] for r in ready), "route_ms": max(r["route_ms"] for r in ready),
    }


class FloorProcess(benchlib.ServerProcess):
    """A ``floor_relay`` process: it keeps no counters and speaks no HTTP."""

    def stats(self, timeout: float = 5.0, path: str = "") -> dict:
        return {}


def build_floor(workdir: str, log) -> str | None:
    """Compile ``floor_relay.c`` into ``workdir``; None (with a note) if there is no C compiler."""
    cc = shutil.which(os.environ.get("CC", "cc"))
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "floor_relay.c")
    out = os.path.join(workdir, "floor_relay")
    if cc is None:
        print("note: no C compiler, so no floor relay to compare with (--no-floor to silence)", file=log)
        return None
    done = subprocess.run([cc, "-O2", "-o", out, src], capture_output=True, text=True)
    if done.returncode:
        print(f"note: floor_relay.c did not compile, so no floor to compare with:\n{done.stderr}", file=log)
        return None
    return out


def start_floor(binary: str) -> list[benchlib.ServerProcess]:
    """Floor relays A and B, A dialing B as its mesh peer."""
    b = FloorProcess([binary], "floor B").__enter__()
    try:
        a = FloorProcess([binary, str(b.port)], "floor A").__enter__()
    except BaseException:
        b.stop()
        raise
    return [a, b]


def mesh_relays(relays: list[benchlib.ServerProcess], timeout: float) -> dict:
    """Mesh A and B with each other; wait until both links are up. Returns their status."""
    a, b = relays
    a.post("/bench/mesh", {"peers": [b.url]})
    b.post("/bench/mesh", {"peers": [a.url]})
    deadline = time.monotonic() + timeout
    while True:
        status = {r.name: r.stats(path="/bench/mesh") for r in relays}
        if all(s and all(link["connected"] for link in s.values()) for s in status.values()):
            return status
        if time.monotonic() > deadline:
            raise RuntimeError(f"mesh links not up within {timeout:.0f} s: {status}")
        time.sleep(0.05)


def consistency_warnings(r: dict) -> list[str]:
    """The relays' counters against the client's: a relay may drop packets, never invent them."""
    c = r["relay_counted"]
    if not (c["A"] and c["B"]):
        return []
    out = []
    frames = r["sent_total"] + r["acks"]  # SendPacket frames the client wrote after the probes
    got_in = c["A"]["packets_in"] + c["B"]["packets_in"]
    got_out = c["A"]["packets_out"] + c["B"]["packets_out"]
    fwd_out = c["A"]["forwarded_out"] + c["B"]["forwarded_out"]
    fwd_in = c["A"]["forwarded_in"] + c["B"]["forwarded_in"]
    if got_in != frames or got_out - r["acks"] > r["received_total"] or fwd_in > fwd_out:
        out.append(f"{r['mode']} {r['size']} B {r['topology']}: the relays counted {c} but the client sent "
                   f"{r['sent_total']} packets + {r['acks']} acks and received {r['received_total']}")
    if r["topology"] == "single" and fwd_out:
        out.append(f"{r['mode']} {r['size']} B single: {fwd_out} packets went over the mesh")
    if r["topology"] == "cross" and c["A"]["packets_in"] and not c["A"]["forwarded_out"]:
        out.append(f"{r['mode']} {r['size']} B cross: nothing went over the mesh")
    return out


# ======================================================================================
# output
# ======================================================================================

fmt = br.fmt


def print_results(results: list[dict], args) -> None:
    cols = ("relay", "mode", "size", "topology", "pkt/s", "MB/s", "loss %", "p50 µs", "p99 µs", "relay A CPU s",
            "relay B CPU s", "relays µs/pkt", "cli CPU s", "machine busy %", "others CPU s", "steal s", "relay drops")
    rows = []
    for r in results:
        cpu = r["relay_cpu_s"]
        drops = ",".join(f"{n}:{k}={v}" for n in ("A", "B") for k, v in r["relay_drops"][n].items()) or "0"
        rows.append((
            r["relay"], r["mode"], str(r["size"]), r["topology"], fmt(r["pkt_s"]), fmt(r["mb_s"], ",.1f"),
            fmt(r["loss_pct"], ".2f"), fmt(r["p50_us"]), fmt(r["p99_us"]),
            f"{cpu['A']:.2f} ({100 * cpu['A'] / r['window_s']:.0f}%)",
            f"{cpu['B']:.2f} ({100 * cpu['B'] / r['window_s']:.0f}%)",
            fmt(r["relay_us_per_pkt"], ".2f"), fmt(r["client_cpu_s"], ".2f"), fmt(r["machine_busy_pct"], ".0f"),
            fmt(r["others_cpu_s"], ".2f"), fmt(r["steal_s"], ".2f"), drops,
        ))
    br.table(cols, rows)

    print()
    print("cross / single (same client, same workload; for latency and CPU per packet lower is better)")
    cols = ("relay", "mode", "size", "pkt/s", "MB/s", "p50 µs", "p99 µs", "relays µs/pkt", "relays CPU s", "loss % s/c")
    rows = []
    for (relay, mode, size), single, cross in paired(results):
        def ratio(k, s=single, c=cross):
            return "-" if s[k] is None or c[k] is None or not s[k] else f"{c[k] / s[k]:.2f}"

        cpu_s, cpu_c = sum(single["relay_cpu_s"].values()), sum(cross["relay_cpu_s"].values())
        rows.append((relay, mode, str(size), ratio("pkt_s"), ratio("mb_s"), ratio("p50_us"), ratio("p99_us"),
                     ratio("relay_us_per_pkt"), f"{cpu_c / cpu_s:.2f}" if cpu_s else "-",
                     f"{single['loss_pct']:.2f} / {cross['loss_pct']:.2f}"))
    br.table(cols, rows)
    vs_floor = list(against_floor(results))
    if vs_floor:
        print()
        print("ours / floor (share of the zero-work C relay's figure that ours reaches; higher is better)")
        cols = ("mode", "size", "single pkt/s", "cross pkt/s", "cross/single ratio")
        br.table(cols, [(m, str(z), f"{a:.2f}", f"{b:.2f}", f"{c:.2f}") for m, z, a, b, c in vs_floor])
    for line in target_checks(results):
        print()
        print(line)


def median_runs(runs: list[dict]) -> list[dict]:
    """Per relay, case and topology, the run with the median pkt/s (the lower one of an even count)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["relay"], r["mode"], r["size"], r["topology"]), []).append(r)
    return [sorted(g, key=lambda r: r["pkt_s"])[(len(g) - 1) // 2] for g in groups.values()]


def paired(results: list[dict]):
    """((relay, mode, size), single, cross) for every case measured in both topologies."""
    by = {(r["relay"], r["mode"], r["size"], r["topology"]): r for r in results}
    for r in results:
        key = (r["relay"], r["mode"], r["size"])
        if r["topology"] == "single" and (*key, "cross") in by:
            yield key, r, by[(*key, "cross")]


def pkt_ratio(single: dict, cross: dict) -> float:
    return cross["pkt_s"] / single["pkt_s"] if single["pkt_s"] else 0.0


def against_floor(results: list[dict]):
    """(mode, size, single, cross, ratio): ours over the floor's, for cases measured on both."""
    pairs = {key: (s, c) for key, s, c in paired(results)}
    for (relay, mode, size), (s, c) in pairs.items():
        floor = pairs.get(("floor", mode, size))
        if relay == "ours" and floor and floor[0]["pkt_s"] and floor[1]["pkt_s"]:
            fs, fc = floor
            yield (mode, size, s["pkt_s"] / fs["pkt_s"], c["pkt_s"] / fc["pkt_s"],
                   pkt_ratio(s, c) / pkt_ratio(fs, fc) if pkt_ratio(fs, fc) else 0.0)


def target_checks(results: list[dict]) -> list[str]:
    mode, size, minimum = TARGET
    out = []
    for (relay, m, s), single, cross in paired(results):
        if (m, s) != (mode, size):
            continue
        ratio = pkt_ratio(single, cross)
        if relay == "ours":
            ok = ratio >= minimum and cross["loss_pct"] == 0
            out.append(f"target {mode} {size} B across two replicas >= {minimum}x one replica, no loss: "
                       f"{'MET' if ok else 'NOT MET'} ({ratio:.2f}x: {cross['pkt_s']:,.0f} vs "
                       f"{single['pkt_s']:,.0f} pkt/s, loss {cross['loss_pct']:.2f} %)")
        else:
            out.append(f"floor: the zero-work C relay reaches {ratio:.2f}x on this machine with the same client "
                       f"({cross['pkt_s']:,.0f} vs {single['pkt_s']:,.0f} pkt/s): what one extra hop costs here")
    return out


# ======================================================================================


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=4, help="sender/receiver connection pairs (default 4)")
    ap.add_argument("--sizes", default="100,1000,16000", help="packet sizes in bytes, comma-separated, >= 8")
    ap.add_argument("--modes", default="windowed,flood", help="windowed,flood (default both)")
    ap.add_argument("--seconds", type=float, default=3.0, help="measured seconds per case (default 3)")
    ap.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds before each case (default 0.5)")
    ap.add_argument("--window", type=int, default=32, help="windowed: packets in flight per sender (default 32)")
    ap.add_argument("--ack-every", type=int, default=8, help="windowed: receiver acks every N packets (default 8)")
    ap.add_argument("--sample-every", type=int, default=8, help="latency: sample every k-th packet (default 8)")
    ap.add_argument("--client-procs", type=int, default=1, help="client processes (default 1)")
    ap.add_argument("--client-loop", choices=("uvloop", "asyncio"), default="uvloop")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run every case N times, single and cross alternated; report the median (default 1)")
    ap.add_argument("--topologies", default="single,cross", help="single,cross (default both)")
    ap.add_argument("--route-timeout", type=float, default=10.0,
                    help="seconds to wait for probes to arrive before a case (default 10)")
    ap.add_argument("--pin", action="store_true",
                    help="pin both relays to the last CPU and the client to the others (default: the scheduler "
                         "places them; pinning shows what a quiet, well-placed machine can do)")
    ap.add_argument("--relay-path", metavar="DIR",
                    help="benchmark a modified relay: import _relay from DIR/_relay (built there with "
                         "'python setup.py build_ext --inplace') instead of the installed one")
    ap.add_argument("--no-floor", dest="floor", action="store_false",
                    help="skip the floor: the same cases against floor_relay.c, a zero-work C relay (see above)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    args = ap.parse_args()
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        ap.error("--sizes: comma-separated integers")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.topologies = [t.strip() for t in args.topologies.split(",") if t.strip()]
    if not args.sizes or any(not 8 <= s <= 65536 for s in args.sizes):
        ap.error("--sizes: each between 8 and 65536 (8 bytes carry the timestamp)")
    if not args.modes or any(m not in ("windowed", "flood") for m in args.modes):
        ap.error("--modes: windowed and/or flood")
    if not args.topologies or any(t not in TOPOLOGIES for t in args.topologies):
        ap.error("--topologies: single and/or cross")
    if args.repeat < 1:
        ap.error("--repeat must be positive")
    if args.pairs < 1 or args.window < 1 or args.sample_every < 1 or args.seconds <= 0 or args.route_timeout <= 0:
        ap.error("--pairs, --window, --sample-every, --seconds and --route-timeout must be positive")
    if not 1 <= args.ack_every <= args.window:
        ap.error("--ack-every must be between 1 and --window (else the window deadlocks)")
    args.relay_cpus = args.client_cpus = None
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            ap.error("--pin needs at least 2 CPUs")
        args.relay_cpus, args.client_cpus = cpus[-1:], cpus[:-1]
    return args


def main() -> int:
    args = parse_args()
    benchlib.sigterm_as_interrupt()
    here = os.path.dirname(os.path.abspath(__file__))
    mesh_key = secrets.token_hex(32)
    relay_argv = [sys.executable, os.path.join(here, "benchlib.py"), "relay", "--keepalive", "3600",
                  "--mesh-key", mesh_key]
    if args.relay_path:
        relay_argv += ["--relay-path", args.relay_path]
    log = sys.stderr
    started = time.monotonic()
    runs: list[dict] = []
    relays: list[benchlib.ServerProcess] = []
    floor: list[benchlib.ServerProcess] = []
    workdir = tempfile.mkdtemp(prefix="bench-mesh-")
    try:
        for name in ("A", "B"):
            relays.append(benchlib.ServerProcess(relay_argv, name).__enter__())
        binary = build_floor(workdir, log) if args.floor else None
        if binary:
            floor = start_floor(binary)
        if args.relay_cpus:
            for p in relays + floor:
                os.sched_setaffinity(p.pid, args.relay_cpus)
        mesh_relays(relays, 20.0)
        pinned = f"; pinned: relays on CPU {args.relay_cpus}, client on {args.client_cpus}" if args.pin else ""
        print("relays (meshed): " + ", ".join(f"{p.name} pid {p.pid} port {p.port}" for p in relays + floor)
              + f"; client: {args.client_procs} process(es), {args.client_loop}; {os.cpu_count()} CPUs{pinned}", file=log)
        sets = [("ours", relays)] + ([("floor", floor)] if floor else [])
        for mode in args.modes:
            for size in args.sizes:
                for _ in range(args.repeat):
                    for name, pair in sets:
                        if name == "floor" and mode != "windowed":
                            continue  # the floor has no drop policy: under flood its buffers only grow
                        for topology in args.topologies:  # alternated: background load hits both alike
                            r = run_case(pair, args, mode, size, topology, floor=name == "floor")
                            runs.append(r)
                            cpu = r["relay_cpu_s"]
                            print(f"  {name:5} {mode:8} {size:>5} B {topology:6}: {r['pkt_s']:>10,.0f} pkt/s "
                                  f"{r['mb_s']:>8,.1f} MB/s loss {r['loss_pct']:.2f} %  p50 {fmt(r['p50_us'])} µs  "
                                  f"p99 {fmt(r['p99_us'])} µs  relay CPU A {cpu['A']:.2f} s B {cpu['B']:.2f} s  "
                                  f"client CPU {r['client_cpu_s']:.2f} s  others {r['others_cpu_s']:.2f} s  "
                                  f"(route after {r['probes']} probes, {r['route_ms']:.0f} ms)", file=log)
    except KeyboardInterrupt:
        print("interrupted", file=log)
        return 130
    finally:
        for p in relays:  # unmesh first: a link whose peer vanishes logs a warning and redials
            with contextlib.suppress(Exception):
                p.post("/bench/mesh", {"peers": []}, timeout=2)
        for p in reversed(relays + floor):
            p.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    results = median_runs(runs)
    for r in runs:
        for line in consistency_warnings(r):
            print("WARNING: " + line, file=log)
    lossy = [r for r in runs if r["mode"] == "windowed" and r["sent_total"] != r["received_total"]]
    if args.json:
        json.dump({"args": vars(args), "cpus": os.cpu_count(), "wall_seconds": time.monotonic() - started,
                   "results": results, "runs": runs if args.repeat > 1 else None,
                   "targets": target_checks(results),
                   "ours_over_floor": [dict(zip(("mode", "size", "single", "cross", "ratio"), row, strict=True))
                                       for row in against_floor(results)]}, sys.stdout, indent=2)
        print()
    else:
        print_results(results, args)
        print(f"\n({time.monotonic() - started:.0f} s. {args.pairs} pairs{' (pinned)' if args.pin else ''}; single = both ends on relay A, cross = "
              f"senders on A, receivers on B. MB = 10^6 bytes of packet payload. Latency is one-way, sampled every "
              f"{args.sample_every}th packet. CPU s over the {args.seconds:g} s measured, % = of one core; relays "
              f"µs/pkt = CPU of A + B per delivered packet; machine busy = all {os.cpu_count()} CPUs, incl. steal; others "
              f"= CPU used by neither the relays nor the client (other processes, uncharged softirq); steal = CPU "
              f"the hypervisor gave to other guests. With --repeat, each row is the run with the median pkt/s.)")
    if lossy:
        print(f"ERROR: windowed mode lost packets in {len(lossy)} case(s)", file=log)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
