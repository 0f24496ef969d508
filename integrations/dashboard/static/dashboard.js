// kvkit dashboard: fetch snapshots from the dashboard server and draw numbers, charts, tables.
// The server polls the metrics source; see integrations/dashboard/sources.py for the fields.
"use strict";

const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563"];
const MAX_POINTS = 600;
const history = [];         // snapshots, oldest first
const plots = {};           // chart id -> {plot, key}

// ---- formatting --------------------------------------------------------------------------
function pct(x) { return x == null ? "–" : (100 * x).toFixed(1) + "%"; }
function num(x, digits = 1) { return x == null ? "–" : Number(x).toFixed(digits); }
function bytes(x) {
  if (x == null) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(x) >= 1024 && i < units.length - 1) { x /= 1024; i++; }
  return x.toFixed(i ? 1 : 0) + " " + units[i];
}
function setNumber(id, value, text) {
  const el = document.getElementById(id);
  el.textContent = text;
  el.dataset.value = value == null ? "" : String(value);
}

// ---- charts ------------------------------------------------------------------------------
// series: [{label, values: [...]}]; rebuilt when the set of series changes, else updated.
function drawChart(id, series, fmt) {
  const box = document.querySelector("#" + id + " .plot");
  const xs = history.map(s => s.time);
  const data = [xs, ...series.map(s => s.values)];
  const key = series.map(s => s.label).join("|");
  const chart = document.getElementById(id);
  chart.dataset.points = String(xs.length);
  chart.dataset.series = key;
  if (plots[id] && plots[id].key === key) { plots[id].plot.setData(data); return; }
  if (plots[id]) plots[id].plot.destroy();
  const opts = {
    width: Math.max(box.clientWidth, 300), height: 200,
    scales: { x: { time: true } },
    legend: { live: false },
    series: [{}, ...series.map((s, i) => ({
      label: s.label, stroke: COLORS[i % COLORS.length], width: 2, dash: s.dash,
      value: (u, v) => fmt(v),
    }))],
    axes: [{}, { values: (u, ticks) => ticks.map(fmt), size: 84 }],
  };
  plots[id] = { plot: new uPlot(opts, data, box), key };
}

function column(kind, policy, field) {
  return history.map(s => { const row = (s[kind] || {})[policy]; return row ? row[field] : null; });
}

function policies(kind) {
  const names = new Set();
  history.forEach(s => Object.keys(s[kind] || {}).forEach(p => names.add(p)));
  return [...names].sort();
}

function drawCharts() {
  const kv = policies("kv"), ex = policies("experts");
  const denseMax = history.map(s => {
    const rows = Object.values(s.kv || {});
    return rows.length ? Math.max(...rows.map(r => r.dense_bytes || 0)) : null;
  });
  drawChart("chart-memory", [
    ...kv.map(p => ({ label: "resident " + p, values: column("kv", p, "resident_bytes") })),
    { label: "dense bf16 equivalent", values: denseMax, dash: [6, 4] },
  ], bytes);
  drawChart("chart-sparsity", kv.map(p => ({ label: p, values: column("kv", p, "sparsity") })), pct);
  drawChart("chart-evictions",
    kv.map(p => ({ label: p, values: column("kv", p, "eviction_tokens_per_s") })), v => num(v));
  drawChart("chart-experts",
    ex.map(p => ({ label: p, values: column("experts", p, "hit_rate") })), pct);
}

// ---- numbers and tables ------------------------------------------------------------------
// "dense -3.7% · streaming 65.4%": the headline split by policy
function perPolicy(rows, field) {
  return Object.keys(rows || {}).sort().map(p => p + " " + pct(rows[p][field])).join(" · ");
}

function drawNumbers(snap) {
  const t = snap.totals || {};
  setNumber("num-memory-saved", t.memory_saved, pct(t.memory_saved));
  document.getElementById("num-memory-detail").textContent =
    t.dense_bytes ? bytes(t.resident_bytes) + " resident of " + bytes(t.dense_bytes) + " dense bf16" : "";
  document.getElementById("num-memory-policies").textContent = perPolicy(snap.kv, "memory_saved");
  setNumber("num-sparsity", t.sparsity, pct(t.sparsity));
  document.getElementById("num-sparsity-policies").textContent = perPolicy(snap.kv, "sparsity");
  setNumber("num-eviction-rate", t.eviction_tokens_per_s, num(t.eviction_tokens_per_s));
  setNumber("num-expert-hit-rate", t.expert_hit_rate, pct(t.expert_hit_rate));
}

function fillTable(id, rows, cells) {
  const body = document.querySelector("#" + id + " tbody");
  body.replaceChildren(...Object.keys(rows).sort().map(policy => {
    const tr = document.createElement("tr");
    tr.dataset.policy = policy;
    [[policy, policy], ...cells(rows[policy])].forEach(([text, value, field]) => {
      const td = document.createElement("td");
      td.textContent = text;
      if (field) { td.dataset.field = field; td.dataset.value = value == null ? "" : String(value); }
      tr.appendChild(td);
    });
    return tr;
  }));
}

function drawTables(snap) {
  fillTable("kv-table", snap.kv || {}, r => [
    [bytes(r.resident_bytes), r.resident_bytes, "resident_bytes"],
    [bytes(r.dense_bytes), r.dense_bytes, "dense_bytes"],
    [pct(r.memory_saved), r.memory_saved, "memory_saved"],
    [num(r.tokens_resident, 0), r.tokens_resident, "tokens_resident"],
    [num(r.pages_allocated, 0) + " / " + num(r.pages_free, 0), r.pages_allocated, "pages_allocated"],
    [pct(r.sparsity), r.sparsity, "sparsity"],
    [num(r.eviction_tokens_per_s), r.eviction_tokens_per_s, "eviction_tokens_per_s"],
    [num(r.decode_ms, 2), r.decode_ms, "decode_ms"],
    [pct(r.selection_recall), r.selection_recall, "selection_recall"],
  ]);
  fillTable("expert-table", snap.experts || {}, r => [
    [pct(r.hit_rate), r.hit_rate, "hit_rate"],
    [num(r.lookups, 0), r.lookups, "lookups"],
    [bytes(r.bytes_moved_per_s) + "/s", r.bytes_moved_per_s, "bytes_moved_per_s"],
    [pct(r.prefetch_accuracy), r.prefetch_accuracy, "prefetch_accuracy"],
  ]);
}

function render() {
  const snap = history[history.length - 1];
  if (!snap) return;
  document.getElementById("source").textContent =
    "reading " + snap.source + " at " + snap.url + " · " + history.length + " snapshots · " +
    new Date(snap.time * 1000).toLocaleTimeString();
  const err = document.getElementById("error");
  err.hidden = !snap.error;
  err.textContent = snap.error || "";
  drawNumbers(snap);
  drawTables(snap);
  drawCharts();
  document.body.dataset.ready = "true";
}

function add(snap) {
  if (history.length && history[history.length - 1].time >= snap.time) return;
  history.push(snap);
  if (history.length > MAX_POINTS) history.shift();
}

async function getJSON(path) {
  const resp = await fetch(path, { cache: "no-store" });
  if (!resp.ok) throw new Error(path + ": HTTP " + resp.status);
  return resp.json();
}

async function start() {
  let interval = 1;
  try {
    const h = await getJSON("/api/history");
    interval = h.interval || 1;
    h.snapshots.forEach(add);
    render();
  } catch (e) {
    document.getElementById("source").textContent = "cannot reach the dashboard server: " + e;
  }
  setInterval(async () => {
    try { add(await getJSON("/api/snapshot")); render(); }
    catch (e) { document.getElementById("source").textContent = "dashboard server: " + e; }
  }, interval * 1000);
}

start();
