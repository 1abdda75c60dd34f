"""The benchmarks' output: tables, ratios against the baseline measured in the same run, and the targets."""

from __future__ import annotations

RELAY_TARGETS = {  # windowed mode, from the issue: (size, metric, minimum)
    100: ("pkt/s", 120_000),
    1000: ("pkt/s", 80_000),
    16000: ("MB/s", 200),
}
FLOOR_CPU_TARGET = {100: 1.3, 1000: 1.3}  # one relay, windowed, per-packet client: ours/floor server CPU per packet
MESH_TARGET = ("windowed", 1000, 0.6)  # mode, size, minimum cross/single pkt/s ratio (from the issue)


def fmt(v, spec: str = ",.0f") -> str:
    if v is None:
        return "-"
    return format(v, spec)


def print_relay_results(results: dict[str, list[dict]], args) -> None:
    """bench_relay.py's tables: every case, then ours / baseline, then the targets."""
    cols = ("mode", "size", "server", "pkt/s", "MB/s", "loss %", "p50 µs", "p99 µs", "srv CPU s",
            "srv µs/pkt", "cli CPU s", "cli µs/pkt", "machine busy %", "others CPU s", "relay drops", "srv instr/pkt")
    rows = []
    for name, cases in results.items():
        for r in cases:
            rows.append((
                r["mode"], str(r["size"]), name, fmt(r["pkt_s"]), fmt(r["mb_s"], ",.1f"), fmt(r["loss_pct"], ".2f"),
                fmt(r["p50_us"]), fmt(r["p99_us"]), f"{r['server_cpu_s']:.2f} ({r['server_cpu_pct']:.0f}%)",
                fmt(r["server_us_per_pkt"], ".2f"), fmt(r["client_cpu_s"], ".2f"), fmt(r["client_us_per_pkt"], ".2f"),
                fmt(r["machine_busy_pct"], ".0f"), fmt(r["others_cpu_s"], ".2f"),
                ",".join(f"{k}={v}" for k, v in r["server_drops"].items()) or "0",
                fmt(r.get("server_ir_per_pkt"), ",.0f"),
            ))
    rows.sort(key=lambda row: (args.modes.index(row[0]), int(row[1]), row[2] != "relay"))
    table(cols, rows)

    if "baseline" in results:
        print()
        print("ours / baseline (same client, same workload; for latency and CPU per packet lower is better)")
        base = {(r["mode"], r["size"]): r for r in results["baseline"]}
        metrics = (("pkt/s", "pkt_s", ",.0f"), ("MB/s", "mb_s", ",.1f"), ("loss %", "loss_pct", ".2f"),
                   ("p50 µs", "p50_us", ",.0f"), ("p99 µs", "p99_us", ",.0f"),
                   ("srv CPU s", "server_cpu_s", ".2f"), ("srv µs/pkt", "server_us_per_pkt", ".2f"))
        rows = []
        for r in results["relay"]:
            b = base.get((r["mode"], r["size"]))
            if b is None:
                continue
            for label, k, spec in metrics:
                ours, theirs = r[k], b[k]
                ratio = "-" if ours is None or not theirs else f"{ours / theirs:.2f}"
                rows.append((r["mode"], str(r["size"]), label, fmt(ours, spec), fmt(theirs, spec), ratio))
        table(("mode", "size", "metric", "ours", "baseline", "ours/baseline"), rows)

    if "floor" in results:
        key, unit = cost_metric(results["floor"])
        print()
        print(f"server {unit} per delivered packet against the floor (zero-work C relay, same client; lower is better)")
        others = [n for n in results if n not in ("floor", "baseline")]
        floor = {(r["mode"], r["size"]): r for r in results["floor"]}
        rows = []
        for r in results["floor"]:
            row = [r["mode"], str(r["size"]), fmt(r[key], ",.2f")]
            for name in others:
                o = next((x for x in results[name] if (x["mode"], x["size"]) == (r["mode"], r["size"])), None)
                v, f = (o or {}).get(key), floor[(r["mode"], r["size"])][key]
                row += [fmt(v, ",.2f"), "-" if v is None or not f else f"{v / f:.2f}",
                        "-" if o is None or not r["pkt_s"] else f"{o['pkt_s'] / r['pkt_s']:.2f}"]
            rows.append(tuple(row))
        cols = ["mode", "size", f"floor {unit}/pkt"]
        for name in others:
            cols += [f"{name} {unit}/pkt", f"{name}/floor", f"{name}/floor pkt/s"]
        table(tuple(cols), rows)

    checks = relay_target_checks(results.get("relay", []), results.get("floor", []))
    if checks:
        print()
        for line in checks:
            print(line)


def cost_metric(cases: list[dict]) -> tuple[str, str]:
    """What a server's cost per packet is measured in: instructions under --callgrind, else CPU µs."""
    if any(r.get("server_ir_per_pkt") for r in cases):
        return "server_ir_per_pkt", "instructions"
    return "server_us_per_pkt", "CPU µs"


def relay_target_checks(cases: list[dict], floor: list[dict] = ()) -> list[str]:
    out = []
    floor_by = {(r["mode"], r["size"]): r for r in floor}
    key, unit = cost_metric(list(floor))
    if key != "server_us_per_pkt":
        return ["(the targets on CPU per packet are not checked under --callgrind: instructions leave the kernel out)"]
    for r in cases:
        f = floor_by.get((r["mode"], r["size"]))
        if r["size"] not in FLOOR_CPU_TARGET or f is None or not r.get(key) or not f.get(key):
            continue
        ratio = r[key] / f[key]
        limit = FLOOR_CPU_TARGET[r["size"]]
        out.append(f"target windowed {r['size']:>5} B: server {unit} per packet <= {limit}x the floor's: "
                   f"{'MET' if ratio <= limit else 'NOT MET'} ({ratio:.2f}x: {r[key]:,.2f} vs {f[key]:,.2f})")
    for r in cases:
        if r["mode"] != "windowed" or r["size"] not in RELAY_TARGETS:
            continue
        metric, minimum = RELAY_TARGETS[r["size"]]
        value = r["pkt_s"] if metric == "pkt/s" else r["mb_s"]
        ok = value >= minimum and r["loss_pct"] == 0
        out.append(f"target windowed {r['size']:>5} B: {metric} >= {minimum:,} and no loss: "
                   f"{'MET' if ok else 'NOT MET'} ({value:,.0f} {metric}, loss {r['loss_pct']:.2f} %)")
    return out


def table(cols, rows) -> None:
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) if i > 2 else c.ljust(w) for i, (c, w) in enumerate(zip(cols, widths, strict=True))))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(v.rjust(w) if i > 2 else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True))))


def mesh_consistency_warnings(r: dict) -> list[str]:
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


def print_mesh_results(results: list[dict], args) -> None:
    """bench_mesh.py's tables: every case, cross / single, ours / floor, then the targets."""
    cols = ("relay", "mode", "size", "topology", "pkt/s", "MB/s", "loss %", "p50 µs", "p99 µs", "relay A CPU s",
            "relay B CPU s", "relays µs/pkt", "cli CPU s", "machine busy %", "others CPU s", "steal s", "relay drops",
            "relays instr/pkt")
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
            fmt(r["others_cpu_s"], ".2f"), fmt(r["steal_s"], ".2f"), drops, fmt(r.get("relay_ir_per_pkt"), ",.0f"),
        ))
    table(cols, rows)

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
    table(cols, rows)
    vs_floor = list(against_floor(results))
    if vs_floor:
        print()
        unit = "instructions" if any(r.get("relay_ir_per_pkt") for r in results) else "CPU"
        print(f"ours / floor (the zero-work C relay, same client): pkt/s (higher is better) and relays' {unit} per "
              "packet (lower is better)")
        cols = ("relay", "mode", "size", "single pkt/s", "cross pkt/s", "cross/single ratio", "single CPU/pkt",
                "cross CPU/pkt")
        table(cols, [(rl, m, str(z), f"{a:.2f}", f"{b:.2f}", f"{c:.2f}", fmt(d, ".2f"), fmt(e, ".2f"))
                     for rl, m, z, a, b, c, d, e in vs_floor])
    for relay, what in (("tls", "clients and the mesh link speak TLS"), ("tls-mesh", "the mesh link alone speaks TLS")):
        tls = list(tls_over_plain(results, relay))
        if tls:
            print()
            print(f"TLS / plain HTTP (our relays, same client; {what}): relays' cost per packet and pkt/s")
            table(("mode", "size", "topology", "cost/pkt", "pkt/s"),
                  [(m, str(z), t, fmt(c, ".2f"), fmt(p, ".2f")) for m, z, t, c, p in tls])
    for line in mesh_target_checks(results):
        print()
        print(line)


def tls_over_plain(results: list[dict], relay: str = "tls"):
    """(mode, size, topology, cost ratio, pkt/s ratio) of the ``relay`` ('tls', 'tls-mesh') relays over ours."""
    key = "relay_ir_per_pkt" if any(r.get("relay_ir_per_pkt") for r in results) else "relay_us_per_pkt"
    plain = {(r["mode"], r["size"], r["topology"]): r for r in results if r["relay"] == "ours"}
    for r in results:
        p = plain.get((r["mode"], r["size"], r["topology"]))
        if r["relay"] == relay and p:
            yield (r["mode"], r["size"], r["topology"], r[key] / p[key] if r[key] and p[key] else None,
                   r["pkt_s"] / p["pkt_s"] if p["pkt_s"] else None)


def median_cases(runs: list[dict]) -> list[dict]:
    """Per case (mode, size), the run with the median server CPU per packet (the lower of an even count)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["mode"], r["size"]), []).append(r)
    return [sorted(g, key=lambda r: r["server_us_per_pkt"] or 0.0)[(len(g) - 1) // 2] for g in groups.values()]


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
    """(relay, mode, size, single, cross, ratio, cpu single, cpu cross): ours (and before) over the floor's."""
    pairs = {key: (s, c) for key, s, c in paired(results)}

    key = "relay_ir_per_pkt" if any(r.get("relay_ir_per_pkt") for r in results) else "relay_us_per_pkt"

    def cpu(r: dict, f: dict) -> float | None:
        ours, floor = r.get(key), f.get(key)
        return ours / floor if ours and floor else None

    for (relay, mode, size), (s, c) in pairs.items():
        floor = pairs.get(("floor", mode, size))
        if relay != "floor" and floor and floor[0]["pkt_s"] and floor[1]["pkt_s"]:
            fs, fc = floor
            yield (relay, mode, size, s["pkt_s"] / fs["pkt_s"], c["pkt_s"] / fc["pkt_s"],
                   pkt_ratio(s, c) / pkt_ratio(fs, fc) if pkt_ratio(fs, fc) else 0.0, cpu(s, fs), cpu(c, fc))


MESH_FLOOR_TARGET = (0.9, 1.2)  # across the mesh: ours >= 0.9x the floor's pkt/s and <= 1.2x its CPU per packet


def mesh_target_checks(results: list[dict]) -> list[str]:
    mode, size, minimum = MESH_TARGET
    out = []
    min_pkt, max_cpu = MESH_FLOOR_TARGET
    if any(r.get("relay_ir_per_pkt") for r in results):
        return ["(the targets are not checked under --callgrind: rates under valgrind mean nothing)"]
    for relay, m, s, _, cross, _, _, cpu in against_floor(results):
        if relay == "ours":
            ok = cross >= min_pkt and cpu is not None and cpu <= max_cpu
            out.append(f"target {m} {s} B across the mesh: >= {min_pkt}x the floor's pkt/s and <= {max_cpu}x its CPU "
                       f"per packet: {'MET' if ok else 'NOT MET'} ({cross:.2f}x pkt/s, {fmt(cpu, '.2f')}x CPU)")
    for (relay, m, s), single, cross in paired(results):
        if (m, s) != (mode, size):
            continue
        ratio = pkt_ratio(single, cross)
        if relay not in ("ours", "floor"):
            continue
        if relay == "ours":
            ok = ratio >= minimum and cross["loss_pct"] == 0
            out.append(f"target {mode} {size} B across two replicas >= {minimum}x one replica, no loss: "
                       f"{'MET' if ok else 'NOT MET'} ({ratio:.2f}x: {cross['pkt_s']:,.0f} vs "
                       f"{single['pkt_s']:,.0f} pkt/s, loss {cross['loss_pct']:.2f} %)")
        else:
            out.append(f"floor: the zero-work C relay reaches {ratio:.2f}x on this machine with the same client "
                       f"({cross['pkt_s']:,.0f} vs {single['pkt_s']:,.0f} pkt/s): what one extra hop costs here")
    return out
