// smartcam dashboard: vanilla JS + hand-drawn SVG, no build step and nothing loaded from the internet.
// Reads only the sink's read-only API. Data is always inserted with textContent (never innerHTML).
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const HOUR = 3600;
const DAY = 86400;
const REFRESH_MS = 15000;
const DWELL_EDGES = [0, 5, 10, 20, 30, 60, 120, 300, 600, Infinity]; // display bins, seconds

const state = {
  token: null, cameras: [], selected: null, busy: false, again: false,
  range: "latest", custom: null, // custom: { from: "YYYY-MM-DD", to: "YYYY-MM-DD" } (UTC days, inclusive)
  sort: { key: "camera", dir: 1 }, siteRows: [],
};

// ------------------------------------------------------------------------------------------ token + fetch
function initToken() {
  const match = location.hash.match(/token=([^&]+)/);
  if (match) {
    sessionStorage.setItem("smartcam-token", decodeURIComponent(match[1]));
    history.replaceState(null, "", location.pathname + location.search); // keep the token out of the URL bar
  }
  state.token = sessionStorage.getItem("smartcam-token");
}

class AuthError extends Error {}

async function api(path, params = {}) {
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== null && value !== undefined) query.set(key, value);
  }
  const headers = { Accept: "application/json" };
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  const response = await fetch(`api/${path}?${query}`, { headers });
  if (response.status === 401) throw new AuthError("token required");
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

// ------------------------------------------------------------------------------------------ small helpers
function el(tag, attrs = {}, text = null) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== null) node.textContent = text;
  return node;
}

function svgEl(tag, attrs = {}, text = null) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (text !== null) node.textContent = text;
  return node;
}

const epoch = (iso) => (iso ? Date.parse(iso) / 1000 : null);
const pad = (n) => String(n).padStart(2, "0");
function utcTime(seconds, withDate = false) {
  const d = new Date(seconds * 1000);
  const hm = `${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())}`;
  return withDate ? `${d.getUTCFullYear()}-${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())} ${hm}` : hm;
}
function ago(iso) {
  if (!iso) return "never";
  const s = Math.max(0, Date.now() / 1000 - epoch(iso));
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  if (s < 172800) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} days ago`;
}
const fmt = (v, digits = 1) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits).replace(/\.0+$/, ""));
function fmtSeconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 90) return `${fmt(s)} s`;
  return `${fmt(s / 60)} min`;
}
const camKey = (c) => `${c.site}/${c.camera_id}`;

// A y scale with 4-5 round ticks; counts of people get whole-number steps.
function niceScale(value, integer = true) {
  const raw = Math.max(value, integer ? 1 : 1e-9) / 4;
  const exp = Math.pow(10, Math.floor(Math.log10(raw)));
  let step = [1, 2, 2.5, 5, 10].map((m) => m * exp).find((m) => m >= raw);
  if (integer) step = Math.max(1, Math.ceil(step));
  return { max: step * Math.max(1, Math.ceil(value / step)), step };
}

// ------------------------------------------------------------------------------------------ time ranges
const dayStart = (t) => Math.floor(t / DAY) * DAY;
const isoDay = (t) => new Date(t * 1000).toISOString().slice(0, 10);
const iso = (t) => new Date(t * 1000).toISOString();

// The picked range as [since, until) epoch seconds. "latest" ends at the hour after the newest event of the
// camera (or of any camera for the site overview), so a camera that stopped a while ago still shows its data.
function rangeFor(cam) {
  const now = Date.now() / 1000;
  const today = dayStart(now);
  let since;
  let until;
  switch (state.range) {
    case "today": [since, until] = [today, today + DAY]; break;
    case "yesterday": [since, until] = [today - DAY, today]; break;
    case "7d": [since, until] = [today - 6 * DAY, today + DAY]; break;
    case "30d": [since, until] = [today - 29 * DAY, today + DAY]; break;
    case "custom":
      since = Date.parse(`${state.custom.from}T00:00:00Z`) / 1000;
      until = Date.parse(`${state.custom.to}T00:00:00Z`) / 1000 + DAY;
      break;
    default: {
      const seen = cam ? [epoch(cam.last_seen)] : state.cameras.map((c) => epoch(c.last_seen));
      const last = Math.max(...seen.filter((t) => t !== null), -Infinity);
      until = (Math.floor((Number.isFinite(last) ? last : now) / HOUR) + 1) * HOUR;
      since = until - 24 * HOUR;
    }
  }
  return { since, until, hourly: until - since <= 2 * DAY };
}

function rangeParams(r) {
  return { since: iso(r.since), until: iso(r.until) };
}

function rangeLabel(r) {
  if (r.since % DAY === 0 && r.until % DAY === 0) {
    const last = isoDay(r.until - DAY);
    return r.until - r.since === DAY ? `${isoDay(r.since)} UTC` : `${isoDay(r.since)} – ${last} UTC`;
  }
  return `${utcTime(r.since, true)} – ${utcTime(r.until, true)} UTC`;
}

// Day-over-day and week-over-week: the same range shifted back (a day for a one-day range, else its length;
// and a week, for ranges shorter than a week).
function comparisons(r) {
  const span = r.until - r.since;
  const out = [{ key: span <= DAY ? "day" : "period",
    label: span <= DAY ? "vs the day before" : `vs the previous ${Math.round(span / DAY)} days`, shift: Math.max(span, DAY) }];
  if (span < 7 * DAY) out.push({ key: "week", label: "vs a week before", shift: 7 * DAY });
  return out;
}

// ------------------------------------------------------------------------------------------ charts
// Plot area inside each SVG's own viewBox (the wide chart and the half-width ones differ).
function box(svg) {
  const vb = svg.viewBox.baseVal;
  return { w: vb.width, h: vb.height, left: 48, right: 22, top: 14, bottom: 36 };
}

function frame(svg, scale, yLabel) {
  svg.replaceChildren();
  const b = box(svg);
  const plotH = b.h - b.top - b.bottom;
  const y = (v) => b.top + plotH * (1 - v / scale.max);
  for (let v = 0; v <= scale.max + 1e-9; v += scale.step) {
    svg.append(svgEl("line", { class: v ? "grid" : "grid base", x1: b.left, x2: b.w - b.right, y1: y(v), y2: y(v) }));
    svg.append(svgEl("text", { class: "tick y", x: b.left - 8, y: y(v) + 4 }, fmt(v, 2)));
  }
  svg.append(svgEl("text", { class: "axis-label", x: 14, y: b.top + plotH / 2,
    transform: `rotate(-90 14 ${b.top + plotH / 2})` }, yLabel));
  return { y, b };
}

function emptyNote(svg, text) {
  const b = box(svg);
  svg.append(svgEl("text", { class: "empty", x: b.w / 2, y: b.h / 2 }, text));
}

// Grouped bars: one slot per label, one bar per series; values[i][k] is series k of slot i.
function drawBars(svg, slots, series, yLabel, { attrs = () => ({}), tip, every = 1, integer = true } = {}) {
  const max = Math.max(0, ...slots.flatMap((s) => series.map((k) => s.values[k] || 0)));
  const { y, b } = frame(svg, niceScale(max, integer), yLabel);
  const slot = (b.w - b.left - b.right) / Math.max(1, slots.length);
  const barW = Math.min(56, Math.max(1.5, (slot * 0.76) / series.length)); // a few slots: no huge slabs
  slots.forEach((s, i) => {
    const x0 = b.left + i * slot + (slot - barW * series.length) / 2;
    series.forEach((k, j) => {
      const v = s.values[k] || 0;
      const rect = svgEl("rect", { class: `bar ${k}`, x: x0 + j * barW, y: y(v), width: barW,
        height: Math.max(0, y(0) - y(v)), "data-value": v, ...attrs(s, k) });
      rect.append(svgEl("title", {}, tip(s, k, v)));
      svg.append(rect);
    });
    if (i % every === 0) {
      svg.append(svgEl("text", { class: "tick x", x: b.left + i * slot + slot / 2, y: b.h - b.bottom + 18 },
        s.label));
    }
  });
  return { y, b };
}

// Entries and exits per hour (ranges up to two days) or per day, zero slots included.
function drawEntries(svg, rows, r) {
  let slots;
  if (r.hourly) {
    const byHour = new Map(rows.map((row) => [row.hour_ts, row]));
    const n = Math.round((r.until - r.since) / HOUR);
    slots = Array.from({ length: n }, (_, i) => {
      const hour = r.since + i * HOUR;
      const row = byHour.get(hour) || {};
      return { key: iso(hour), at: hour, label: utcTime(hour), values: { entries: row.entries || 0, exits: row.exits || 0 } };
    });
  } else {
    const byDay = new Map(rows.map((row) => [row.day, row]));
    const n = Math.round((r.until - r.since) / DAY);
    slots = Array.from({ length: n }, (_, i) => {
      const day = isoDay(r.since + i * DAY);
      const row = byDay.get(day) || {};
      return { key: day, at: r.since + i * DAY, label: day.slice(5), values: { entries: row.entries || 0, exits: row.exits || 0 } };
    });
  }
  drawBars(svg, slots, ["entries", "exits"], r.hourly ? "people per hour" : "people per day", {
    attrs: (s) => (r.hourly ? { "data-hour": s.key } : { "data-day": s.key }),
    tip: (s, k, v) => `${r.hourly ? `${utcTime(s.at, true)} UTC` : s.key}: ${v} ${k}`,
    every: Math.max(1, Math.ceil(slots.length / 12)),
  });
  if (!rows.some((row) => row.entries || row.exits)) emptyNote(svg, "no entries in this range");
}

function occupancyBucket(r) {
  const span = r.until - r.since;
  if (span <= DAY) return 600;
  if (span <= 2 * DAY) return 1800;
  if (span <= 8 * DAY) return 3 * HOUR;
  return 12 * HOUR;
}

// Occupancy (max and mean people in view) per interval, as two lines with markers on the max.
function drawOccupancy(svg, intervals, r) {
  const { y, b } = frame(svg, niceScale(Math.max(0, ...intervals.map((row) => row.max))), "people in view");
  const plotW = b.w - b.left - b.right;
  const x = (t) => b.left + (plotW * (t - r.since)) / (r.until - r.since);
  const span = r.until - r.since;
  for (let i = 0; i < 6; i += 1) {
    const t = r.since + (i * span) / 6;
    svg.append(svgEl("text", { class: "tick x", x: x(t), y: b.h - b.bottom + 18 },
      span <= 2 * DAY ? utcTime(t) : isoDay(t).slice(5)));
  }
  if (!intervals.length) {
    emptyNote(svg, "no count reports in this range");
    return;
  }
  for (const series of ["mean", "max"]) {
    const d = intervals.map((row, i) => `${i ? "L" : "M"}${x(row.t_ts).toFixed(1)},${y(row[series]).toFixed(1)}`).join(" ");
    svg.append(svgEl("path", { class: `line ${series}`, d }));
  }
  for (const row of intervals) {
    const dot = svgEl("circle", { class: "pt", cx: x(row.t_ts), cy: y(row.max), r: intervals.length > 60 ? 1.8 : 3,
      "data-t": row.t, "data-max": row.max, "data-mean": row.mean });
    dot.append(svgEl("title", {}, `${utcTime(row.t_ts, true)} UTC: max ${row.max}, mean ${fmt(row.mean)}`));
    svg.append(dot);
  }
}

// Dwell histogram regrouped into readable bins (the API's bins are fine-grained).
function drawDwell(svg, dwell) {
  const counts = DWELL_EDGES.slice(0, -1).map(() => 0);
  for (const bin of dwell.histogram) {
    const i = DWELL_EDGES.findIndex((edge, j) => bin.lo >= edge && bin.lo < DWELL_EDGES[j + 1]);
    counts[i] += bin.n;
  }
  const slots = counts.map((n, i) => {
    const lo = DWELL_EDGES[i];
    const hi = DWELL_EDGES[i + 1];
    const label = hi === Infinity ? `${lo / 60}m+` : hi <= 60 ? `${lo}-${hi}s` : `${lo / 60}-${hi / 60}m`;
    return { lo, label, values: { dwell: n } };
  });
  drawBars(svg, slots, ["dwell"], "people", { attrs: (s) => ({ "data-lo": s.lo }), tip: (s, k, v) => `${s.label}: ${v} people` });
  if (!dwell.n) emptyNote(svg, "no exits in this range");
}

// In and out per counting line (the overview's line totals over the range).
function drawLines(svg, lines) {
  const slots = lines.map((l) => ({ name: l.line, label: l.line, values: { in: l.in, out: l.out } }));
  drawBars(svg, slots, ["in", "out"], "crossings", {
    attrs: (s) => ({ "data-line": s.name }), tip: (s, k, v) => `line ${s.name}: ${v} ${k}` });
}

// Per zone: most and mean people in view, and the median stay.
function drawZones(svg, dwellSvg, zones) {
  const slots = zones.map((z) => ({ name: z.zone, label: z.zone,
    values: { max: z.occupancy_max ?? 0, mean: z.occupancy_mean ?? 0, dwell: z.dwell.median ?? 0 } }));
  drawBars(svg, slots, ["max", "mean"], "people in view", { integer: false,
    attrs: (s) => ({ "data-zone": s.name }), tip: (s, k, v) => `zone ${s.name}: ${k} ${fmt(v)} in view` });
  drawBars(dwellSvg, slots, ["dwell"], "median stay, s", { integer: false,
    attrs: (s) => ({ "data-zone": s.name }), tip: (s, k, v) => `zone ${s.name}: median stay ${fmtSeconds(v)}` });
  if (!zones.some((z) => z.occupancy_max !== null)) emptyNote(svg, "no zone count reports in this range");
  if (!zones.some((z) => z.dwell.n)) emptyNote(dwellSvg, "no zone exits in this range");
}

function fillTable(table, rows) {
  table.tBodies[0].replaceChildren(...rows.map((cells) => {
    const tr = el("tr");
    cells.forEach((c, i) => tr.append(el("td", i ? { class: "num" } : {}, String(c))));
    return tr;
  }));
}

// ------------------------------------------------------------------------------------------ panels
const modelOf = (c) => {
  const m = (c.model && c.model.active) || (c.stats && c.stats.model) || null;
  return m ? (m.version ? `${m.name} ${m.version}` : m.name) : "–";
};

function renderTotals(cameras, deadLetters) {
  const online = cameras.filter((c) => c.state === "online").length;
  const events = cameras.reduce((sum, c) => sum + (c.events_total || 0), 0);
  const refused = el("span", { class: `pill${deadLetters ? " warn" : ""}`, id: "dead-letters" },
    `${deadLetters.toLocaleString("en")} refused`);
  refused.title = "payloads the sink refused (dead letters): see /api/dead-letters";
  document.getElementById("totals").replaceChildren(
    el("span", { class: "pill" }, `${cameras.length} camera${cameras.length === 1 ? "" : "s"}`),
    el("span", { class: "pill ok" }, `${online} online`),
    el("span", { class: "pill" }, `${events.toLocaleString("en")} events`),
    refused,
  );
}

function renderFleet(cameras, deadLetters) {
  const offline = cameras.filter((c) => c.state !== "online").length; // offline, or no status yet
  const backlog = cameras.reduce((s, c) => s + ((c.stats && c.stats.outbox_depth) || 0), 0);
  const backlogged = cameras.filter((c) => c.stats && c.stats.outbox_depth > 0).length;
  const item = (id, label, value, text, bad) => {
    const box = el("div", { class: `fleet-item${bad ? " bad" : ""}`, id, "data-value": value });
    box.append(el("span", { class: "kpi-value" }, text), el("span", { class: "kpi-label" }, label));
    return box;
  };
  document.getElementById("fleet").replaceChildren(
    item("fleet-offline", "cameras not online", offline, `${offline} / ${cameras.length}`, offline > 0),
    item("fleet-backlog", backlogged ? `queued on ${backlogged} camera${backlogged === 1 ? "" : "s"}` : "outbox backlog",
      backlog, backlog.toLocaleString("en"), backlog > 0),
    item("fleet-dead", "dead letters", deadLetters, deadLetters.toLocaleString("en"), deadLetters > 0),
  );
}

function renderSiteTable() {
  const { key, dir } = state.sort;
  const value = (row) => row[key] ?? (typeof row[key] === "number" ? 0 : "");
  const rows = [...state.siteRows].sort((a, b) => {
    const va = value(a);
    const vb = value(b);
    const cmp = typeof va === "number" && typeof vb === "number" ? va - vb : String(va).localeCompare(String(vb));
    return dir * cmp || a.camera.localeCompare(b.camera);
  });
  for (const th of document.querySelectorAll("#site-table th[data-sort]")) {
    th.setAttribute("aria-sort", th.dataset.sort === key ? (dir > 0 ? "ascending" : "descending") : "none");
  }
  document.querySelector("#site-table tbody").replaceChildren(...rows.map((row) => {
    const tr = el("tr", { "data-camera": row.camera, class: row.camera === state.selected ? "selected" : "" });
    const status = el("td");
    status.append(el("span", { class: `dot ${row.state}` }), document.createTextNode(` ${row.state}`));
    tr.append(el("td", {}, row.camera), status, el("td", {}, row.model),
      el("td", { title: row.last_seen_iso || "" }, ago(row.last_seen_iso)),
      el("td", { class: "num" }, String(row.entries_today)), el("td", { class: "num" }, String(row.entries_range)),
      el("td", { class: "num" }, row.outbox === null ? "–" : String(row.outbox)));
    tr.addEventListener("click", () => select(row.camera));
    return tr;
  }));
}

function renderCameras(cameras) {
  const box = document.getElementById("cameras");
  if (!cameras.length) {
    box.replaceChildren(el("p", { class: "empty-text" }, "No camera has reported yet."));
    return;
  }
  box.replaceChildren(...cameras.map((c) => {
    const card = el("button", { type: "button", class: "camera card", "data-camera": camKey(c),
      "aria-pressed": String(camKey(c) === state.selected) });
    const head = el("div", { class: "camera-head" });
    head.append(el("span", { class: `dot ${c.state}`, title: c.state }), el("strong", {}, c.camera_id),
      el("span", { class: "site" }, c.site));
    const status = el("span", { class: `status ${c.state}` }, c.state);
    const facts = el("dl", { class: "facts" });
    for (const [k, v] of [["last seen", ago(c.last_seen)], ["fps", fmt(c.fps)],
      ["inference", c.inference_ms_p50 == null ? "–" : `${fmt(c.inference_ms_p50)} ms`],
      ["events", (c.events_total || 0).toLocaleString("en")],
      // over-the-air models (docs/models-ota.md): what runs, and whether the latest update failed
      ["model", !c.model ? modelOf(c) : (c.model.active.version || c.model.active.name)
        + (c.model.failed ? ` · update ${c.model.update.version} ${c.model.update.state.replace("_", " ")}` : "")]]) {
      facts.append(el("dt", {}, k), el("dd", {}, v));
    }
    card.append(head, status, facts);
    card.title = c.last_seen ? `last event ${c.last_seen}` : "no event yet";
    card.addEventListener("click", () => select(camKey(c)));
    return card;
  }));
}

function kpi(label, value, hint = "") {
  const box = el("div", { class: "kpi" });
  box.append(el("span", { class: "kpi-value" }, value), el("span", { class: "kpi-label" }, label));
  if (hint) box.title = hint;
  return box;
}

function renderEvents(rows, emptyText = "No events stored yet.") {
  const body = document.querySelector("#events tbody");
  if (!rows.length) {
    const tr = el("tr");
    tr.append(el("td", { colspan: "6", class: "empty-text" }, emptyText));
    body.replaceChildren(tr);
    return;
  }
  body.replaceChildren(...rows.map((e) => {
    const tr = el("tr", { "data-event-id": e.event_id });
    const details = [];
    if (e.zone) details.push(`zone ${e.zone}`);
    if (e.line) details.push(`line ${e.line} ${e.direction || ""}`.trim());
    if (e.count !== null && e.count !== undefined) details.push(`${e.count} in view`);
    if (e.dwell_s !== null && e.dwell_s !== undefined) details.push(`stayed ${fmtSeconds(e.dwell_s)}`);
    const type = el("td");
    type.append(el("span", { class: `badge ${String(e.type).replace(".", "-")}` }, e.type));
    const id = el("td", { class: "mono", title: e.event_id }, e.event_id);
    tr.append(el("td", { class: "mono" }, e.ts.replace("T", " ").replace(/\.\d+Z$/, "")),
      el("td", {}, `${e.site}/${e.camera_id}`), type, el("td", {}, e.track_id ?? "–"),
      el("td", {}, details.join(", ") || "–"), id);
    return tr;
  }));
}

function renderCompare(current, previous) {
  document.getElementById("compare").replaceChildren(...previous.map(({ c, entries }) => {
    const diff = current - entries;
    const pct = entries ? `${diff >= 0 ? "+" : ""}${Math.round((100 * diff) / entries)} %` : (current ? "new" : "±0");
    const box = el("div", { class: `delta ${diff > 0 ? "up" : diff < 0 ? "down" : "flat"}`, "data-compare": c.key,
      "data-previous": entries, "data-diff": diff });
    box.append(el("span", { class: "delta-value" }, `${diff >= 0 ? "+" : "−"}${Math.abs(diff)} (${pct})`),
      el("span", { class: "kpi-label" }, `entries ${c.label} (${entries})`));
    return box;
  }));
}

// Entries of the same camera over the range shifted back by ``c.shift``: whole days from the daily rollups,
// the latest-24-h range (not day-aligned) hour by hour.
async function previousEntries(scope, r, c) {
  const shifted = { ...scope, since: iso(r.since - c.shift), until: iso(r.until - c.shift) };
  const aligned = r.since % DAY === 0 && r.until % DAY === 0;
  const rows = aligned ? (await api("stats/daily", shifted)).days : (await api("stats/hourly", shifted)).hours;
  return rows.reduce((s, row) => s + (row.entries || 0), 0);
}

async function renderCamera(cam, r) {
  const scope = { site: cam.site, camera: cam.camera_id };
  const range = { ...scope, ...rangeParams(r) };
  const compare = comparisons(r);
  const [rows, occupancy, dwell, events, summaries, overview, ...previous] = await Promise.all([
    r.hourly ? api("stats/hourly", range) : api("stats/daily", range),
    api("occupancy", { ...range, bucket: occupancyBucket(r) }),
    api("dwell", range),
    api("events", { ...range, limit: 25 }),
    api("summaries", { ...scope, limit: 1 }),
    api("overview", range),
    ...compare.map((c) => previousEntries(scope, r, c)),
  ]);
  const detail = document.getElementById("detail");
  detail.hidden = false;
  detail.dataset.range = state.range;
  document.getElementById("camera-title").textContent = `${cam.site} / ${cam.camera_id}`;
  document.getElementById("range").textContent = rangeLabel(r);
  document.getElementById("entries-title").textContent = r.hourly ? "Entries per hour" : "Entries per day";
  const list = r.hourly ? rows.hours : rows.days;
  const sum = (items, k) => items.reduce((s, row) => s + (row[k] || 0), 0);
  const mine = overview.cameras[0] || { unique_tracks: 0, peak_hour: null, zones: [], lines: [] };
  const occMax = Math.max(0, ...occupancy.intervals.map((row) => row.max));
  const entries = sum(list, "entries");
  document.getElementById("kpis").replaceChildren(
    kpi("entries", String(entries)),
    kpi("exits", String(sum(list, "exits"))),
    kpi("people", String(mine.unique_tracks), "distinct people (track ids) in this range, each counted once"),
    kpi("peak hour", mine.peak_hour ? `${utcTime(mine.peak_hour.hour_ts)} UTC` : "–",
      mine.peak_hour ? `${mine.peak_hour.entries} entries, ${mine.peak_hour.hour}` : ""),
    kpi("most in view", occupancy.intervals.length ? String(occMax) : "–"),
    kpi("median stay", fmtSeconds(dwell.median), `mean ${fmtSeconds(dwell.mean)}`),
    kpi("90% left within", fmtSeconds(dwell.p90), "p90 of the time people stayed"),
  );
  renderCompare(entries, compare.map((c, i) => ({ c, entries: previous[i] })));
  document.getElementById("dwell-stats").textContent = dwell.n
    ? `n ${dwell.n} · mean ${fmtSeconds(dwell.mean)} · median ${fmtSeconds(dwell.median)} · p90 ${fmtSeconds(dwell.p90)}`
    : "";
  drawEntries(document.getElementById("chart-entries"), list, r);
  drawOccupancy(document.getElementById("chart-occupancy"), occupancy.intervals, r);
  drawDwell(document.getElementById("chart-dwell"), dwell);
  const linesPanel = document.getElementById("lines-panel");
  linesPanel.hidden = !mine.lines.length;
  if (mine.lines.length) {
    drawLines(document.getElementById("chart-lines"), mine.lines);
    fillTable(document.getElementById("lines-table"), mine.lines.map((l) => [l.line, l.in, l.out, l.in - l.out]));
  }
  const zonesPanel = document.getElementById("zones-panel");
  zonesPanel.hidden = !mine.zones.length;
  if (mine.zones.length) {
    drawZones(document.getElementById("chart-zones"), document.getElementById("chart-zones-dwell"), mine.zones);
    fillTable(document.getElementById("zones-table"), mine.zones.map((z) => [z.zone, z.entries,
      z.occupancy_max ?? "–", fmt(z.occupancy_mean), fmtSeconds(z.dwell.median)]));
  }
  document.getElementById("events-scope").textContent = `· ${cam.site}/${cam.camera_id} · ${rangeLabel(r)}`;
  const latest = summaries.summaries[0];
  renderEvents(events.events, latest
    ? `This camera sends summaries (summary mode): the figures above come from them; there are no per-person ` +
      `records. Latest window ${utcTime(epoch(latest.start), true)} UTC, ${latest.events} events.`
    : "No events in this range.");
  renderSamples(cam).catch(() => { document.getElementById("samples-card").hidden = true; });
}

// Thumbnails come through fetch (with the token), not <img src>, which could not send the Authorization header.
const sampleUrls = [];
async function renderSamples(cam) {
  const { samples } = await api("samples", { site: cam.site, camera: cam.camera_id, limit: 12 });
  const card = document.getElementById("samples-card");
  card.hidden = samples.length === 0;
  document.getElementById("samples-scope").textContent = `· ${cam.site}/${cam.camera_id}`;
  while (sampleUrls.length) URL.revokeObjectURL(sampleUrls.pop());
  const headers = state.token ? { Authorization: `Bearer ${state.token}` } : {};
  const tiles = await Promise.all(samples.map(async (s) => {
    const fig = el("figure", { class: "sample" });
    const response = await fetch(`api/samples/${encodeURIComponent(s.sample_id)}.jpg`, { headers });
    if (response.ok) {
      const url = URL.createObjectURL(await response.blob());
      sampleUrls.push(url);
      fig.append(el("img", { src: url, alt: `sample ${s.sample_id}`, width: 160 }));
    }
    fig.append(el("figcaption", {}, `${s.ts.slice(0, 19).replace("T", " ")} · ${s.reasons.join(", ")} · ` +
      `${s.detections} det · ${Math.round(s.bytes / 1024)} KB`));
    return fig;
  }));
  document.getElementById("samples").replaceChildren(...tiles);
}

async function renderSite(cameras, siteRange) {
  const today = dayStart(Date.now() / 1000);
  const [todays, ranged] = await Promise.all([
    api("overview", { since: iso(today), until: iso(today + DAY) }),
    api("overview", rangeParams(siteRange)),
  ]);
  const entries = (o) => new Map(o.cameras.map((c) => [camKey(c), c.entries]));
  const [byToday, byRange] = [entries(todays), entries(ranged)];
  state.siteRows = cameras.map((c) => ({
    camera: camKey(c), state: c.state, model: modelOf(c), last_seen: epoch(c.last_seen) ?? -Infinity,
    last_seen_iso: c.last_seen, entries_today: byToday.get(camKey(c)) || 0, entries_range: byRange.get(camKey(c)) || 0,
    outbox: c.stats && c.stats.outbox_depth !== undefined ? c.stats.outbox_depth : null,
  }));
  renderSiteTable();
}

// ------------------------------------------------------------------------------------------ main loop
function showBanner(text) {
  const banner = document.getElementById("banner");
  banner.hidden = !text;
  banner.textContent = text || "";
}

function select(key) {
  state.selected = key;
  refresh();
}

async function refresh() {
  if (state.busy) {
    state.again = true; // a click while loading: load again once this one is done
    return;
  }
  state.busy = true;
  try {
    const [{ cameras }, dead] = await Promise.all([api("cameras"), api("dead-letters", { limit: 1 })]);
    state.cameras = cameras;
    if (!cameras.some((c) => camKey(c) === state.selected)) state.selected = cameras.length ? camKey(cameras[0]) : null;
    document.getElementById("auth").hidden = true;
    renderTotals(cameras, dead.total);
    renderFleet(cameras, dead.total);
    renderCameras(cameras);
    await renderSite(cameras, rangeFor(null));
    const cam = cameras.find((c) => camKey(c) === state.selected);
    if (cam) {
      await renderCamera(cam, rangeFor(cam));
    } else {
      document.getElementById("detail").hidden = true;
      renderEvents((await api("events", { limit: 25 })).events);
    }
    showBanner("");
    document.getElementById("refreshed").textContent = `updated ${new Date().toLocaleTimeString("en-GB")}`;
    document.body.dataset.range = state.range;
    document.body.dataset.selected = state.selected || "";
    document.body.dataset.ready = "true";
  } catch (err) {
    if (err instanceof AuthError) {
      document.getElementById("auth").hidden = false;
      showBanner(state.token ? "The API refused this token." : "");
    } else {
      showBanner(`Could not load data: ${err.message}`);
    }
  } finally {
    state.busy = false;
    if (state.again) {
      state.again = false;
      refresh();
    }
  }
}

function pickRange(name) {
  for (const b of document.querySelectorAll("#range-picker button")) {
    b.setAttribute("aria-pressed", String(b.dataset.range === name));
  }
  const form = document.getElementById("custom-range");
  form.hidden = name !== "custom";
  if (name === "custom") {
    const cam = state.cameras.find((c) => camKey(c) === state.selected);
    const r = rangeFor(cam);
    document.getElementById("custom-from").value = state.custom ? state.custom.from : isoDay(r.since);
    document.getElementById("custom-to").value = state.custom ? state.custom.to : isoDay(r.until - 1);
    return; // applied on submit
  }
  state.range = name;
  document.body.dataset.ready = "false";
  refresh();
}

async function download(kind) {
  const cam = state.cameras.find((c) => camKey(c) === state.selected);
  const params = cam ? { site: cam.site, camera: cam.camera_id, ...rangeParams(rangeFor(cam)) } : rangeParams(rangeFor(null));
  const query = new URLSearchParams({ ...params, format: "csv" });
  const headers = state.token ? { Authorization: `Bearer ${state.token}` } : {};
  try {
    const response = await fetch(`api/stats/${kind}?${query}`, { headers });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const link = el("a", { href: URL.createObjectURL(await response.blob()),
      download: `smartcam-${cam ? `${cam.site}-${cam.camera_id}` : "all"}-${kind}.csv` });
    document.body.append(link);
    link.click();
    link.remove();
  } catch (err) {
    showBanner(`Could not download the ${kind} CSV: ${err.message}`);
  }
}

document.getElementById("auth").addEventListener("submit", (ev) => {
  ev.preventDefault();
  state.token = document.getElementById("token-input").value.trim();
  sessionStorage.setItem("smartcam-token", state.token);
  refresh();
});
for (const b of document.querySelectorAll("#range-picker button")) {
  b.addEventListener("click", () => pickRange(b.dataset.range));
}
document.getElementById("custom-range").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const from = document.getElementById("custom-from").value;
  const to = document.getElementById("custom-to").value;
  if (!from || !to || from > to) {
    showBanner("Custom range: the first day must not be after the last.");
    return;
  }
  state.custom = { from, to };
  state.range = "custom";
  document.body.dataset.ready = "false";
  refresh();
});
for (const th of document.querySelectorAll("#site-table th[data-sort]")) {
  th.querySelector("button").addEventListener("click", () => {
    const key = th.dataset.sort;
    state.sort = { key, dir: state.sort.key === key ? -state.sort.dir : (key === "camera" || key === "model" ? 1 : -1) };
    renderSiteTable();
  });
}
document.getElementById("csv-hourly").addEventListener("click", () => download("hourly"));
document.getElementById("csv-daily").addEventListener("click", () => download("daily"));

initToken();
refresh();
setInterval(refresh, REFRESH_MS);
