"""The probe's report as text: tables a person reads in a terminal."""

from __future__ import annotations

from coordinator.errors import one_line
from coordinator.probe.model import fmt_ms, fmt_threshold


def _table(headers: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = [indent + "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append(indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return lines


def render_text(report: dict) -> str:
    th = report["threshold_ms"]
    src = report["source"]
    replicas = report["replicas"]
    short = {r["id"]: r["short"] for r in replicas}
    where = f"PostgreSQL at {src['target']}" if src["mode"] == "database" else f"the API of {src['target']}"
    out = [
        f"Latency probe: {len(replicas)} live replica{'s' if len(replicas) != 1 else ''} from {where}",
        f"Threshold {fmt_threshold(th)} (medians of {report['samples']} samples; '!' marks a figure over it); "
        f"took {report['duration_ms'] / 1000:.2f} s",
        "",
        "From this host",
    ]
    for key, what in (("database", "database round trip"), ("pubsub", "pub/sub round trip")):
        sec = report[key]
        if not sec["measured"]:
            value = sec["note"]
        elif sec["median_ms"] is None:
            value = f"FAILED: {sec['error']}"
        else:
            value = fmt_ms(sec["median_ms"], th)
        out.append(f"  {what:<22}{value}")

    out += ["", "Replicas (http: GET /derp/latency-check; derp: DERP ping through the relay; "
            "db, pubsub: as the replica reports them)"]
    rows = []
    for r in replicas:
        status = "ok"
        if not r["relay_url"]:
            status = "single replica, no relay URL" if len(replicas) == 1 else "NO RELAY URL"
        elif not r["reachable"]:
            status = "UNREACHABLE: " + (r["http"]["error"] or r["derp"]["error"] or "")
        if r["error"]:
            status += f"; reports: {one_line(r['error'])}"
        rows.append([
            r["short"], r["hostname"], str(r["region_id"]), r["relay_url"] or "-",
            fmt_ms(r["http"]["median_ms"], th), fmt_ms(r["derp"]["median_ms"], th),
            fmt_ms(r["reported"]["database_ms"], th), fmt_ms(r["reported"]["pubsub_ms"], th), status,
        ])
    out += _table(["replica", "hostname", "region", "relay URL", "http", "derp", "db", "pubsub", "status"], rows)
    if report["not_alive"]:
        out.append(f"  ({len(report['not_alive'])} stopped or dead replica rows not probed)")

    out += ["", "Mesh path (probe client on A -> relay A -> relay B -> probe client on B, echoed back; "
            "relays = round trip minus this host's DERP pings to A and B)"]
    if report["mesh"]:
        rows = []
        for m in report["mesh"]:
            rtt = m["rtt"]
            rows.append([short[m["from"]], short[m["to"]], fmt_ms(rtt["median_ms"]),
                         fmt_ms(m["relays_ms"], th) if rtt["median_ms"] is not None
                         else rtt["error"] if rtt["error"].startswith("not measured") else f"FAILED: {rtt['error']}"])
        out += _table(["A", "B", "round trip", "relays"], rows)
    else:
        out.append("  (no pairs: fewer than two reachable replicas in one region)")

    out += ["", "Matrix measured by the replicas (row: measuring replica; derp / http)"]
    if any(report["matrix"].values()):
        ids = [r["id"] for r in replicas]
        rows = []
        for a in ids:
            row = [short[a]]
            for b in ids:
                cell = report["matrix"].get(a, {}).get(b)
                if a == b:
                    row.append("·")
                elif cell is None:
                    row.append("-")
                elif cell["error"]:
                    row.append("ERROR")
                else:
                    row.append(" / ".join(fmt_ms(cell[k]).removesuffix(" ms") for k in ("derp_ms", "http_ms"))
                               + (" !" if cell["over_threshold"] else ""))
            rows.append(row)
        out += _table(["from \\ to", *(short[i] for i in ids)], rows)
    else:
        out.append("  not reported yet (replicas without the latency monitor, or it has not run)")

    out.append("")
    out += [f"Note: {note}" for note in report.get("notes", ())]
    if report["ok"]:
        out.append(f"OK: every figure is within {fmt_threshold(th)} and every replica answers.")
    else:
        n = len(report["problems"])
        out.append(f"FAIL: {n} problem{'s' if n != 1 else ''}")
        out += [f"  - {p['message']}" for p in report["problems"]]
    return "\n".join(out) + "\n"
