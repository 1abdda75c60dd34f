"""Running one case: client processes started, released together, measured, reaped; their figures summed."""

from __future__ import annotations

import multiprocessing
import time

from bench import callgrind, clients, proc


def client_totals(results: list[dict], size: int) -> dict:
    """What the client processes measured, summed: rates, loss, latency percentiles."""
    elapsed = sum(r["elapsed"] for r in results) / len(results)
    received = sum(r["received"] for r in results)
    sent_total = sum(r["sent_total"] for r in results)
    recv_total = sum(r["received_total"] for r in results)
    lat = sorted(x for r in results for x in r["latency_ns"])

    def pct(p: float) -> float | None:
        return lat[min(len(lat) - 1, int(p * len(lat)))] / 1000 if lat else None

    return {
        "seconds": elapsed, "received": received,
        "pkt_s": received / elapsed, "mb_s": received / elapsed * size / 1e6,
        "sent_pkt_s": sum(r["sent"] for r in results) / elapsed,
        "loss_pct": 100.0 * (1 - recv_total / sent_total) if sent_total else 0.0,
        "sent_total": sent_total, "received_total": recv_total, "acks": sum(r["acks"] for r in results),
        "p50_us": pct(0.50), "p99_us": pct(0.99), "latency_samples": len(lat),
        "other_frames": sum(r["other_frames"] for r in results),
    }


def client_specs(args, size: int, mode: str, **extra) -> list[dict]:
    """One spec per client process, the ``--pairs`` spread over ``--client-procs``."""
    nproc = max(1, min(args.client_procs, args.pairs))
    return [{
        "pairs": len(range(i, args.pairs, nproc)), "size": size, "mode": mode,
        "window": args.window, "ack_every": args.ack_every, "sample_every": args.sample_every,
        "warmup": args.warmup, "seconds": args.seconds, "client_loop": args.client_loop, "client": args.client,
        **extra,
    } for i in range(nproc)]


def drive_clients(specs: list[dict], worker, args, counters, sample, ready_timeout: float = 60.0) -> dict:
    """Run one client process per spec through a case; the processes are reaped whatever happens.

    They start, connect and report ready; ``counters()`` is read; they are released together;
    ``sample()`` is read when the measured window opens (after ``--warmup``) and when it closes;
    their results are collected and ``counters()`` is read again.
    """
    ctx = multiprocessing.get_context("fork")
    workers = []
    ok = False

    def receive(pipe, timeout: float):
        if not pipe.poll(timeout):
            raise RuntimeError("client process did not answer in time")
        kind, value = pipe.recv()
        if kind == "error":
            raise RuntimeError(f"client process failed: {value}")
        return value

    try:
        for spec in specs:
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=worker, args=(child_end, spec), daemon=True)
            proc.start()
            child_end.close()
            workers.append((proc, parent_end))
        ready = [receive(pipe, ready_timeout) for _, pipe in workers]
        counters0 = counters()
        t0 = time.monotonic() + 0.05
        for _, pipe in workers:
            pipe.send(t0)
        time.sleep(max(0.0, t0 + args.warmup - time.monotonic()))
        sample0 = sample()
        time.sleep(max(0.0, t0 + args.warmup + args.seconds - time.monotonic()))
        sample1 = sample()
        results = [receive(pipe, 60) for _, pipe in workers]
        counters1 = counters()
        ok = True
    finally:
        for proc, pipe in workers:
            proc.join(5 if ok else 0)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
            pipe.close()
    return {"ready": ready, "results": results, "counters": (counters0, counters1), "samples": (sample0, sample1)}


def counter_delta(s0: dict, s1: dict, keys) -> tuple[dict, dict]:
    """(counters in ``keys``, drops) that changed between two /bench/stats answers ({} if one is missing)."""
    if not (s0 and s1):
        return {}, {}
    d0, d1 = s0.get("drops", {}), s1.get("drops", {})
    return {k: s1[k] - s0.get(k, 0) for k in keys}, {k: d1[k] - d0.get(k, 0) for k in d1 if d1[k] - d0.get(k, 0)}


def run_relay_case(server: proc.ServerProcess, args, mode: str, size: int) -> dict:
    """One case against one relay (bench_relay.py): the clients' figures with the server's CPU and counters."""
    def sample():
        return server.cpu(), proc.machine_cpu_seconds(), time.monotonic()

    specs = client_specs(args, size, mode, url=server.url, wait_server_info=not getattr(server, "floor", False))
    workdir = getattr(args, "callgrind_dir", None)
    instructions = []

    def counters():
        if workdir is None:
            return server.stats()
        if instructions:  # the second call: the clients are done
            instructions.append(callgrind.stop(server.pid, workdir))
        else:
            callgrind.start(server.pid)
            instructions.append(0)
        return server.stats()

    run = drive_clients(specs, clients.client_worker, args, counters, sample)
    results, (stats0, stats1) = run["results"], run["counters"]
    (cpu0, mach0, m0), (cpu1, mach1, m1) = run["samples"]
    traffic = client_totals(results, size)
    received = traffic["received"]
    counted, drops = counter_delta(stats0, stats1, ("packets_in", "packets_out"))
    srv_cpu = cpu1 - cpu0
    cli_cpu = sum(r["cpu"] for r in results)
    busy, total = mach1[0] - mach0[0], mach1[1] - mach0[1]
    return {
        "mode": mode, "size": size, "pairs": args.pairs, **traffic,
        "server_cpu_s": srv_cpu, "server_cpu_pct": 100.0 * srv_cpu / (m1 - m0),
        "client_cpu_s": cli_cpu, "client_us_per_pkt": 1e6 * cli_cpu / received if received else None,
        "server_us_per_pkt": 1e6 * srv_cpu / received if received else None,
        # Whole machine during the window (all CPUs, incl. softirq), and what neither of us used:
        # other processes on a shared machine make the figures noisy.
        "machine_busy_pct": 100.0 * busy / total if total else None,
        "others_cpu_s": max(0.0, busy - srv_cpu - cli_cpu),
        "server_counted": counted,
        "server_drops": drops,
        # --callgrind: the server's user-space instructions per packet delivered over the whole case
        "server_ir_per_pkt": instructions[-1] / traffic["received_total"] if workdir and traffic["received_total"] else None,
    }


MESH_COUNTERS = ("packets_in", "packets_out", "forwarded_in", "forwarded_out")


def run_mesh_case(relays: list[proc.ServerProcess], args, mode: str, size: int, topology: str,
                  floor: bool = False) -> dict:
    """One case across relays A and B (bench_mesh.py); ``topology`` single puts both ends on A."""
    a, b = relays

    def sample():
        return [r.cpu() for r in relays], proc.machine_cpu_seconds(), proc.steal_seconds(), time.monotonic()

    specs = client_specs(args, size, mode, send_url=a.url, recv_url=b.url if topology == "cross" else a.url,
                            route_timeout=args.route_timeout, cpus=args.client_cpus, wait_server_info=not floor)
    workdir = getattr(args, "callgrind_dir", None)
    instructions: list[int] = []

    def counters():
        if workdir is not None:
            if instructions:  # the second call: the clients are done
                instructions[:] = [sum(callgrind.stop(r.pid, workdir) for r in relays)]
            else:
                for r in relays:
                    callgrind.start(r.pid)
                instructions.append(0)
        return [r.stats() for r in relays]

    run = drive_clients(specs, clients.mesh_client_worker, args, counters, sample, ready_timeout=60 + args.route_timeout)
    ready, results, (stats0, stats1) = run["ready"], run["results"], run["counters"]
    (cpu0, mach0, st0, m0), (cpu1, mach1, st1, m1) = run["samples"]
    traffic = client_totals(results, size)
    received = traffic["received"]
    relay_cpu = [c1 - c0 for c0, c1 in zip(cpu0, cpu1, strict=True)]
    cli_cpu = sum(r["cpu"] for r in results)
    busy, total, steal = mach1[0] - mach0[0], mach1[1] - mach0[1], st1 - st0
    deltas = [counter_delta(s0, s1, MESH_COUNTERS) for s0, s1 in zip(stats0, stats1, strict=True)]
    return {
        "relay": "floor" if floor else a.name.split()[0] if " " in a.name else "ours",
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
        # --callgrind: relays A + B's user-space instructions per packet delivered over the whole case
        "relay_ir_per_pkt": instructions[0] / traffic["received_total"] if workdir and traffic["received_total"] else None,
    }


def mesh_relays(relays: list[proc.ServerProcess], timeout: float) -> dict:
    """Mesh A and B with each other; wait until both links are up. Returns their status."""
    a, b = relays
    a.post("/bench/mesh", {"peers": [b.mesh_url]})
    b.post("/bench/mesh", {"peers": [a.mesh_url]})
    deadline = time.monotonic() + timeout
    while True:
        status = {r.name: r.stats(path="/bench/mesh") for r in relays}
        if all(s and all(link["connected"] for link in s.values()) for s in status.values()):
            return status
        if time.monotonic() > deadline:
            raise RuntimeError(f"mesh links not up within {timeout:.0f} s: {status}")
        time.sleep(0.05)
