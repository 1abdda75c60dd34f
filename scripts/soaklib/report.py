"""The soak's figures: losses split by whether the pair's replicas were touched, gaps, drift, Postgres.

A lost packet is *touched* when it was sent while a fault was on (from its start until 3 s after
the fleet was whole again) and one of its two clients was connected, at some moment in that window,
to a replica the fault hit, or, for a partition, the two clients sat on its two sides. Every other
lost packet counts against the goal of zero. Memory and descriptor drift is the least-squares slope
of each replica process's samples after its own warm-up; descriptors are counted net of the client
connections the replica serves, so clients moving between replicas do not look like a leak.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from soaklib.faults import REJOIN_TIMEOUT, Fault
from soaklib.load import Flow, Load

GRACE = 3.0
REPLICA_FAULTS = ("replica-sigkill", "replica-sigterm", "replica-sigstop")


@dataclass
class Sample:
    t: float
    replica: int
    run: int  # which start of that replica
    started: float
    rss_mib: float
    fds: int
    clients: int


def _key(text: str | None) -> bytes | None:
    return bytes.fromhex(text.removeprefix("nodekey:")) if text else None


def replica_of(keys: dict[int, bytes | None], homes: list[tuple[float, bytes]]) -> list[int | None]:
    """The replica indexes a client was connected to, in order."""
    by_key = {k: i for i, k in keys.items() if k}
    return [by_key.get(k) for _, k in homes]


def _windows(faults: list[Fault], keys: dict[int, bytes], load: Load):
    """(start, end, touched flow ids) per fault."""
    out = []
    for f in faults:
        end = (f.recovered or f.ended + REJOIN_TIMEOUT) + GRACE
        start = f.start - 1.0
        hit = {keys[i] for i in f.replicas if i in keys}
        touched: set[int] = set()
        for n, flow in enumerate(load.flows):
            src, dst = flow.src.homes_between(start, end), flow.dst.homes_between(start, end)
            if f.kind in REPLICA_FAULTS and (src & hit or dst & hit):
                touched.add(n)
            elif f.kind == "partition" and len(hit) == 2 and (src & hit) and (dst & hit) and (src | dst) >= hit:
                touched.add(n)
        out.append((start, end, touched))
    return out


def losses(load: Load, faults: list[Fault], keys: dict[int, bytes], until: float) -> dict:
    windows = _windows(faults, keys, load)
    quiet = quiet_gaps(load, windows)
    touched = untouched = sent = 0
    untouched_pairs: set[int] = set()
    for n, flow in enumerate(load.flows):
        sent += flow.sent
        for _seq, t in flow.lost(until):
            if any(start <= t <= end and n in hit for start, end, hit in windows):
                touched += 1
            else:
                untouched += 1
                untouched_pairs.add(flow.pair)
    never = {load.flows[n].pair for n in range(len(load.flows))} - {load.flows[n].pair for *_, hit in windows for n in hit}
    return {"sent": sent, "lost_touched": touched, "lost_untouched": untouched,
            "untouched_pairs_with_loss": len(untouched_pairs), "pairs_never_touched": sorted(never),
            "quiet_gaps": quiet}


def quiet_gaps(load: Load, windows) -> dict:
    """Longest silence per pair outside the windows of the faults that touched that pair."""
    per_pair: dict[int, float] = {}
    for n, flow in enumerate(load.flows):
        own = [(start, end) for start, end, hit in windows if n in hit]
        per_pair[flow.pair] = max(per_pair.get(flow.pair, 0.0), flow.longest_gap_outside(own))
    return _summary(list(per_pair.values()))


def _summary(values: list[float]) -> dict:
    return {"pairs": len(values), "p50_s": round(_pct(values, 0.5), 3), "p99_s": round(_pct(values, 0.99), 3),
            "max_s": round(max(values, default=0.0), 3)}


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


def gaps(flows: list[Flow]) -> dict:
    """Longest silence each receiver saw, per pair (the worse direction), in seconds."""
    per_pair: dict[int, float] = {}
    for f in flows:
        per_pair[f.pair] = max(per_pair.get(f.pair, 0.0), f.longest_gap)
    return _summary(list(per_pair.values()))


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope (units per second)."""
    if len(points) < 3:
        return 0.0
    mt = statistics.fmean(t for t, _ in points)
    mv = statistics.fmean(v for _, v in points)
    den = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (v - mv) for t, v in points) / den if den else 0.0


def drift(samples: list[Sample], warm_up: float) -> dict:
    """Per replica: the longest-lived process's RSS and non-client fd slope per hour after its warm-up."""
    runs: dict[tuple[int, int], list[Sample]] = {}
    for s in samples:
        if s.t - s.started >= warm_up:
            runs.setdefault((s.replica, s.run), []).append(s)
    out: dict[str, dict] = {}
    for (replica, _run), points in sorted(runs.items(), key=lambda kv: -len(kv[1])):
        if str(replica) in out or len(points) < 3:
            continue
        span = points[-1].t - points[0].t
        out[str(replica)] = {
            "samples": len(points), "span_s": round(span),
            "rss_mib": [round(points[0].rss_mib, 1), round(points[-1].rss_mib, 1)],
            "rss_mib_per_hour": round(_slope([(p.t, p.rss_mib) for p in points]) * 3600, 1),
            "fds": [points[0].fds, points[-1].fds],
            "other_fds_per_hour": round(_slope([(p.t, p.fds - p.clients) for p in points]) * 3600, 1),
        }
    return out


def by_kind(faults: list[dict]) -> dict[str, dict]:
    """Recovery seconds per kind of fault: count, min, median, max (None: one did not recover)."""
    out: dict[str, dict] = {}
    for f in faults:
        out.setdefault(f["kind"], {"count": 0, "times": []})
        out[f["kind"]]["count"] += 1
        out[f["kind"]]["times"].append(f["recovery_s"])
    for entry in out.values():
        times = [t for t in entry.pop("times") if t is not None]
        entry.update(min_s=min(times, default=None), median_s=statistics.median(times) if times else None,
                     max_s=max(times, default=None), not_recovered=entry["count"] - len(times))
    return out


def render(report: dict) -> list[str]:
    lines = [f"soak: {report['duration_s']:.0f} s, seed {report['seed']}, {report['replicas']} replicas, "
             f"{report['pairs']} pairs, {len(report['faults'])} faults"]
    for f in report["faults"]:
        rec = "DID NOT RECOVER" if f["recovery_s"] is None else f"recovered {f['recovery_s']:.2f} s"
        lines.append(f"  {f['at_s']:7.1f} s  {f['kind']:16} {f['target']:22} {rec}"
                     + (f"  ({'; '.join(f['notes'])})" if f["notes"] else ""))
    for kind, k in sorted(by_kind(report["faults"]).items()):
        if k["median_s"] is not None:
            lines.append(f"  {kind:18} x{k['count']:<3} recovery min {k['min_s']:.2f} s, median {k['median_s']:.2f} s, "
                         f"max {k['max_s']:.2f} s" + (f", {k['not_recovered']} not recovered" if k["not_recovered"] else ""))
    loss = report["loss"]
    lines.append(f"packets: {loss['sent']} sent, {loss['lost_untouched']} lost by untouched pairs (goal 0), "
                 f"{loss['lost_touched']} lost by pairs whose replica was faulted")
    for label, g in (("every pair", report["gaps"]), ("outside the faults that touched the pair", report["gaps_quiet"]),
                     ("pairs never touched", report["gaps_untouched"])):
        lines.append(f"longest gap per pair, {label}: p50 {g['p50_s']:.3f} s, p99 {g['p99_s']:.3f} s, "
                     f"max {g['max_s']:.3f} s ({g['pairs']} pairs)")
    lines.append(f"replicas that failed to rejoin: {len(report['failed_to_rejoin'])} (goal 0)")
    for r, d in report["drift"].items():
        lines.append(f"replica {r}: RSS {d['rss_mib'][0]}->{d['rss_mib'][1]} MiB ({d['rss_mib_per_hour']:+.1f} MiB/h), "
                     f"fds {d['fds'][0]}->{d['fds'][1]} (non-client {d['other_fds_per_hour']:+.1f}/h) over {d['span_s']} s")
    pg = report["postgres_connections"]
    lines.append(f"postgres connections: min {pg['min']}, median {pg['median']}, max {pg['max']}, last {pg['last']}")
    lines.append(f"leftover processes: {report['leftover_processes']}")
    return lines
