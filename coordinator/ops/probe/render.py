"""The probe's report as text: tables a person reads in a terminal."""

from __future__ import annotations

from coordinator.core.errors import one_line
from coordinator.ops.probe.model import fmt_ms, fmt_threshold


def _table(headers: list[str], rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = [indent + "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append(indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return lines


def _from_here(report: dict) -> list[str]:
    out = ["From this host"]
    for key, what in (("database", "database round trip"), ("pubsub", "pub/sub round trip")):
        sec = report[key]
        if not sec["measured"]:
            value = sec["note"]
        elif sec["median_ms"] is None:
            value = f"FAILED: {sec['error']}"
        else:
            value = fmt_ms(sec["median_ms"], report["threshold_ms"])
        out.append(f"  {what:<22}{value}")
    return out


def _status(r: dict, lone: bool, relay_off: bool = False) -> str:
    status = "ok"
    if not r["relay_url"]:
        status = "embedded relay off" if relay_off else "single replica, no relay URL" if lone else "NO RELAY URL"
    elif not r["reachable"]:
        status = "UNREACHABLE: " + (r["http"]["error"] or r["derp"]["error"] or "")
    if r["error"]:
        status += f"; reports: {one_line(r['error'])}"
    return status


def _replicas(report: dict) -> list[str]:
    th, replicas = report["threshold_ms"], report["replicas"]
    out = ["Replicas (http: GET /derp/latency-check; derp: DERP ping through the relay; "
           "db, pubsub: as the replica reports them)"]
    rows = [[
        r["short"], r["hostname"], str(r["region_id"]), r["relay_url"] or "-",
        fmt_ms(r["http"]["median_ms"], th), fmt_ms(r["derp"]["median_ms"], th),
        fmt_ms(r["reported"]["database_ms"], th), fmt_ms(r["reported"]["pubsub_ms"], th),
        _status(r, len(replicas) == 1, (report.get("derp_map") or {}).get("embedded_relay") is False),
    ] for r in replicas]
    out += _table(["replica", "hostname", "region", "relay URL", "http", "derp", "db", "pubsub", "status"], rows)
    if report["not_alive"]:
        out.append(f"  ({len(report['not_alive'])} stopped or dead replica rows not probed)")
    return out


def _relays(report: dict) -> list[str]:
    src = report.get("derp_map") or {}
    where = f" from {src['source']}" if src.get("source") else ""
    out = [f"Custom relays of the DERP map{where} (http: GET /derp/probe; derp: DERP ping; reported, not judged "
           "against the threshold)"]
    if not report.get("relays"):
        return []  # none in the map (or no map: a note says why)
    rows = [[
        f"{r['region_id']} {r['region_code']}".strip(), r["name"], r["url"], fmt_ms(r["http"]["median_ms"]),
        fmt_ms(r["derp"]["median_ms"]),
        "ok" if r["reachable"] else "UNREACHABLE: " + (r["http"]["error"] or r["derp"]["error"] or ""),
    ] for r in report["relays"]]
    return out + _table(["region", "node", "URL", "http", "derp", "status"], rows)


def _mesh(report: dict, short: dict[str, str]) -> list[str]:
    out = ["Mesh path (probe client on A -> relay A -> relay B -> probe client on B, echoed back; "
           "relays = round trip minus this host's DERP pings to A and B)"]
    if not report["mesh"]:
        return [*out, "  (no pairs: fewer than two reachable replicas in one region)"]
    rows = []
    for m in report["mesh"]:
        rtt = m["rtt"]
        rows.append([short[m["from"]], short[m["to"]], fmt_ms(rtt["median_ms"]),
                     fmt_ms(m["relays_ms"], report["threshold_ms"]) if rtt["median_ms"] is not None
                     else rtt["error"] if rtt["error"].startswith("not measured") else f"FAILED: {rtt['error']}"])
    return out + _table(["A", "B", "round trip", "relays"], rows)


def _cell(cell: dict | None, same: bool) -> str:
    if same:
        return "·"
    if cell is None:
        return "-"
    if cell["error"]:
        return "ERROR"
    return (" / ".join(fmt_ms(cell[k]).removesuffix(" ms") for k in ("derp_ms", "http_ms"))
            + (" !" if cell["over_threshold"] else ""))


def _matrix(report: dict, short: dict[str, str]) -> list[str]:
    out = ["Matrix measured by the replicas (row: measuring replica; derp / http)"]
    if not any(report["matrix"].values()):
        return [*out, "  not reported yet (replicas without the latency monitor, or it has not run)"]
    ids = [r["id"] for r in report["replicas"]]
    rows = [[short[a], *(_cell(report["matrix"].get(a, {}).get(b), a == b) for b in ids)] for a in ids]
    return out + _table(["from \\ to", *(short[i] for i in ids)], rows)


def _tailnet(report: dict) -> list[str]:
    out = ["Peer coordinator (an update from a probe peer on one replica to one on another, both ways)"]
    t = report.get("tailnet")
    if t is None:
        return []
    if not t["measured"]:
        return [*out, f"  not measured: {t['note']}"]
    if t["median_ms"] is None:
        return [*out, f"  FAILED ({t['code']}): {t['error']}"]
    samples = ", ".join(f"{v:.1f}" for v in t["samples_ms"])
    return [*out, f"  propagation {fmt_ms(t['median_ms'], t['threshold_ms'])} median (threshold "
                  f"{fmt_threshold(t['threshold_ms'])}; samples {samples} ms)"
                  + (f"; {t['code']}: {t['error']}" if t["error"] else "")]


def _verdict(report: dict) -> list[str]:
    out = [f"Note: {note}" for note in report.get("notes", ())]
    if report["ok"]:
        return [*out, f"OK: every figure is within {fmt_threshold(report['threshold_ms'])} and every replica answers."]
    n = len(report["problems"])
    return [*out, f"FAIL: {n} problem{'s' if n != 1 else ''}", *(f"  - {p['message']}" for p in report["problems"])]


def render_text(report: dict) -> str:
    """The report as the tables ``coordinator probe`` prints (without ``--json``)."""
    src, replicas = report["source"], report["replicas"]
    short = {r["id"]: r["short"] for r in replicas}
    where = f"PostgreSQL at {src['target']}" if src["mode"] == "database" else f"the API of {src['target']}"
    out = [
        f"Latency probe: {len(replicas)} live replica{'s' if len(replicas) != 1 else ''} from {where}",
        f"Threshold {fmt_threshold(report['threshold_ms'])} (medians of {report['samples']} samples; '!' marks a "
        f"figure over it); took {report['duration_ms'] / 1000:.2f} s",
    ]
    for part in (_from_here(report), _replicas(report), _relays(report), _mesh(report, short), _matrix(report, short),
                 _tailnet(report),
                 _verdict(report)):
        if part:
            out += ["", *part]
    return "\n".join(out) + "\n"
