// The status page: poll /status/data once a second and redraw. Every value from the server is
// set with textContent (replica rows are written by peers: never trust them as markup).
"use strict";

const POLL_MS = 1000;
let previous = null; // {t, packets_in, packets_out} of the last poll, for packets/s

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null) node.setAttribute(k, String(v));
  }
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function shortName(r) {
  return r.hostname + " " + r.id.slice(0, 8) + (r.self ? " (this)" : "");
}

function fmtMs(v) {
  return v === null || v === undefined ? "—" : v.toFixed(v < 10 ? 2 : 1);
}

function level(v, limit) {
  if (v === null || v === undefined) return "na";
  if (v > limit) return "over";
  return v > limit / 2 ? "near" : "ok";
}

function renderReplicas(data) {
  const body = document.querySelector("#replicas tbody");
  body.replaceChildren();
  for (const r of data.replicas) {
    const tr = el("tr", {"data-replica": r.id, "data-alive": r.alive ? "1" : "0"});
    tr.append(el("td", {title: r.id}, shortName(r)));
    const state = el("td");
    state.append(el("span", {class: "state " + (r.alive ? "alive" : "dead")}, r.alive ? "alive" : "dead"));
    tr.append(state);
    const age = r.heartbeat_age_s;
    tr.append(el("td", {class: "age"}, age === null || age === undefined ? "unknown" : age.toFixed(1) + " s"));
    tr.append(el("td", {}, r.version));
    tr.append(el("td", {}, r.relay_url || "(none)"));
    tr.append(el("td", {class: "error"}, r.error || ""));
    body.append(tr);
  }
}

function renderFindings(data) {
  const list = document.getElementById("findings");
  list.replaceChildren();
  if (!data.findings.length) list.append(el("li", {class: "ok"}, "no findings: healthy"));
  for (const f of data.findings) {
    const li = el("li", {class: f.severity, "data-code": f.code});
    li.append(el("code", {}, f.code), document.createTextNode(" " + f.severity + ": " + f.message));
    list.append(li);
  }
}

function gridHeader(table, columns) {
  const head = el("tr");
  head.append(el("th", {}, "from \\ to"));
  for (const c of columns) head.append(el("th", {title: c.title || ""}, c.label));
  table.append(head);
}

function renderMesh(data) {
  const table = document.getElementById("mesh");
  table.replaceChildren();
  const cols = data.replicas.map((r) => ({label: shortName(r), title: r.relay_url}));
  gridHeader(table, cols);
  for (const row of data.replicas) {
    const tr = el("tr", {"data-replica": row.id});
    tr.append(el("th", {}, shortName(row)));
    for (const col of data.replicas) {
      if (col.id === row.id) {
        tr.append(el("td", {class: "na"}, "·"));
        continue;
      }
      const link = (data.mesh[row.id] || {})[col.id] || {state: "unknown"};
      const cls = link.state.replace(/ /g, "-");
      tr.append(el("td", {class: cls, "data-peer": col.id, "data-state": link.state, title: link.error || ""}, link.state));
    }
    table.append(tr);
  }
}

function renderLatency(data) {
  const table = document.getElementById("latency");
  table.replaceChildren();
  const limit = data.threshold_ms;
  document.getElementById("limit").textContent = String(limit);
  const cols = data.replicas.map((r) => ({key: r.id, label: shortName(r), title: r.relay_url}));
  cols.push({key: "database", label: "database"}, {key: "pubsub", label: "pub/sub"});
  gridHeader(table, cols);
  for (const row of data.replicas) {
    const tr = el("tr", {"data-replica": row.id});
    tr.append(el("th", {}, shortName(row)));
    const cells = data.latency[row.id] || {};
    for (const col of cols) {
      if (col.key === row.id) {
        tr.append(el("td", {class: "na"}, "·"));
        continue;
      }
      const v = row.alive ? cells[col.key] : null;
      const lv = level(v, limit);
      tr.append(el("td", {class: lv, "data-to": col.key, "data-level": lv, "data-ms": v}, row.alive ? fmtMs(v) : "dead"));
    }
    table.append(tr);
  }
}

function kvRows(tbody, rows) {
  tbody.replaceChildren();
  for (const [k, v, id] of rows) {
    const tr = el("tr", {id: id});
    tr.append(el("td", {}, k), el("td", {class: "value"}, v));
    tbody.append(tr);
  }
}

function renderRelay(data) {
  const r = data.relay;
  const now = performance.now();
  let rateIn = "…", rateOut = "…";
  if (previous) {
    const dt = (now - previous.t) / 1000;
    rateIn = ((r.packets_in - previous.packets_in) / dt).toFixed(1);
    rateOut = ((r.packets_out - previous.packets_out) / dt).toFixed(1);
  }
  previous = {t: now, packets_in: r.packets_in, packets_out: r.packets_out};
  kvRows(document.querySelector("#relay tbody"), [
    ["clients connected here", r.clients, "relay-clients"],
    ["connections (incl. mesh)", r.connections, "relay-connections"],
    ["clients on peers (via mesh)", r.remote_clients, "relay-remote"],
    ["packets/s received", rateIn, "relay-rate-in"],
    ["packets/s sent", rateOut, "relay-rate-out"],
    ["packets received / sent (total)", r.packets_in + " / " + r.packets_out, "relay-packets"],
    ["forwarded to / from peers", r.forwarded_out + " / " + r.forwarded_in, "relay-forwarded"],
  ]);
  kvRows(document.querySelector("#drops tbody"),
    Object.entries(r.drops).map(([reason, n]) => [reason, n, "drop-" + reason]));
}

function renderDerp(data) {
  const d = data.derp;
  if (!d) return;
  const parts = [d.embedded_relay ? "embedded relay on" : "embedded relay off (custom relays only)"];
  parts.push(d.regions.length + " region" + (d.regions.length === 1 ? "" : "s") + " served");
  if (d.source) parts.push("custom map from " + d.source);
  if (d.fetch_error) parts.push("last fetch FAILED: " + d.fetch_error + " (serving the last good map)");
  else if (d.fetched_at) parts.push("fetched " + d.fetched_at);
  const summary = document.getElementById("derp-summary");
  summary.textContent = parts.join("; ");
  summary.className = d.fetch_error ? "error" : "muted";
  const body = document.querySelector("#derp-relays tbody");
  body.replaceChildren();
  if (!d.relays.length) {
    const tr = el("tr");
    tr.append(el("td", {colspan: 7, class: "muted"}, "no custom relays"));
    body.append(tr);
  }
  for (const r of d.relays) {
    const tr = el("tr", {"data-relay": r.name});
    const state = r.up === null ? "unchecked" : (r.up ? "up" : "down");
    tr.append(el("td", {}, r.region_id + (r.region_code ? " " + r.region_code : "")), el("td", {}, r.name),
      el("td", {}, r.url), el("td", {class: r.up === null ? "na" : state}, state), el("td", {}, fmtMs(r.latency_ms)),
      el("td", {class: "muted"}, r.checked_at || "—"), el("td", {class: "error"}, r.error || ""));
    body.append(tr);
  }
}

let previousTailnet = null; // {t, updates_in, updates_out} of the last poll, for updates/s

function renderTailnet(data) {
  const t = data.tailnet;
  const state = document.getElementById("tailnet-state");
  if (!t) {
    state.textContent = "not running on this replica";
    return;
  }
  state.replaceChildren(el("span", {class: "state " + (t.healthy ? "alive" : "dead")},
    t.healthy ? (t.ready ? "healthy" : "starting") : "unhealthy"));
  state.append(document.createTextNode(" coordinator " + t.coordinator_id.slice(0, 8) + "; " +
    t.live_coordinators + " live coordinator(s)" + (t.last_error ? "; last error: " + t.last_error : "")));
  const now = performance.now();
  let rateIn = "…", rateOut = "…";
  if (previousTailnet) {
    const dt = (now - previousTailnet.t) / 1000;
    rateIn = ((t.updates_in - previousTailnet.updates_in) / dt).toFixed(1);
    rateOut = ((t.updates_out - previousTailnet.updates_out) / dt).toFixed(1);
  }
  previousTailnet = {t: now, updates_in: t.updates_in, updates_out: t.updates_out};
  const refused = Object.entries(t.refused).map(([reason, n]) => reason + " " + n).join(", ");
  kvRows(document.querySelector("#tailnet-local tbody"), [
    ["peers connected here", t.peers, "tailnet-peers"],
    ["tunnels of those peers", t.tunnels, "tailnet-tunnels"],
    ["updates/s in / out", rateIn + " / " + rateOut, "tailnet-rate"],
    ["updates in / out (total)", t.updates_in + " / " + t.updates_out, "tailnet-updates"],
    ["propagation p50 / p99 (ms)", fmtMs(t.propagation_p50_ms) + " / " + fmtMs(t.propagation_p99_ms) +
      " (" + t.propagation_samples + " samples)", "tailnet-propagation"],
    ["resyncs after pub/sub gaps", t.resyncs, "tailnet-resyncs"],
    ["refused peers", t.refused_total + (refused ? " (" + refused + ")" : ""), "tailnet-refused"],
    ["throttled / replaced", t.throttled + " / " + t.replaced, "tailnet-throttled"],
    ["heartbeat failures in a row", t.heartbeat_failures, "tailnet-beat-failures"],
  ]);
  const body = document.querySelector("#tailnet-coordinators tbody");
  body.replaceChildren();
  for (const c of t.coordinators) {
    const tr = el("tr", {"data-coordinator": c.id, "data-alive": c.alive ? "1" : "0"});
    tr.append(el("td", {title: c.id}, c.id.slice(0, 8) + (c.self ? " (this)" : "")));
    const st = el("td");
    st.append(el("span", {class: "state " + (c.alive ? "alive" : "dead")}, c.alive ? "alive" : "dead"));
    tr.append(st);
    tr.append(el("td", {}, c.heartbeat_age_s === null ? "unknown" : c.heartbeat_age_s.toFixed(1) + " s"));
    tr.append(el("td", {class: "peers"}, c.peers), el("td", {class: "lost"}, c.lost), el("td", {}, c.tunnels));
    body.append(tr);
  }
}

function render(data) {
  const overall = document.getElementById("overall");
  overall.textContent = data.severity;
  overall.className = "badge " + data.severity;
  document.getElementById("updated").textContent = "served by " + (data.replica_id || "?").slice(0, 8) + ", " + data.time;
  renderReplicas(data);
  renderFindings(data);
  renderMesh(data);
  renderLatency(data);
  renderRelay(data);
  renderDerp(data);
  renderTailnet(data);
}

async function poll() {
  try {
    const resp = await fetch("/status/data", {credentials: "same-origin", cache: "no-store"});
    if (resp.status === 401) {
      window.location.reload(); // the session ended (token rotated): back to the login form
      return;
    }
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    render(await resp.json());
  } catch (err) {
    const overall = document.getElementById("overall");
    overall.textContent = "this replica is not answering";
    overall.className = "badge stale";
  }
  setTimeout(poll, POLL_MS);
}

document.addEventListener("DOMContentLoaded", poll);
