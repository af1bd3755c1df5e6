// smartcam dashboard: vanilla JS + hand-drawn SVG, no build step and nothing loaded from the internet.
// Reads only the sink's read-only API. Data is always inserted with textContent (never innerHTML).
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const HOUR = 3600;
const WINDOW_HOURS = 24;
const REFRESH_MS = 15000;
const DWELL_EDGES = [0, 5, 10, 20, 30, 60, 120, 300, 600, Infinity]; // display bins, seconds

const state = { token: null, cameras: [], selected: null, busy: false };

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

// ------------------------------------------------------------------------------------------ charts
// Plot area inside each SVG's own viewBox (the wide hourly chart and the two half-width ones differ).
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

// Entries (and exits) per hour over the window: one group of bars per hour, zero hours included.
function drawHourly(svg, rows, since) {
  const byHour = new Map(rows.map((r) => [r.hour_ts, r]));
  const hours = Array.from({ length: WINDOW_HOURS }, (_, i) => since + i * HOUR);
  const { y, b } = frame(svg, niceScale(Math.max(0, ...rows.map((r) => Math.max(r.entries, r.exits)))),
    "people per hour");
  const slot = (b.w - b.left - b.right) / hours.length;
  const barW = Math.max(2, slot * 0.36);
  hours.forEach((hour, i) => {
    const row = byHour.get(hour) || { entries: 0, exits: 0 };
    const x0 = b.left + i * slot + slot * 0.12;
    for (const [k, series] of [[0, "entries"], [1, "exits"]]) {
      const v = row[series];
      const rect = svgEl("rect", { class: `bar ${series}`, x: x0 + k * barW, y: y(v), width: barW,
        height: Math.max(0, y(0) - y(v)), "data-hour": new Date(hour * 1000).toISOString(), "data-value": v });
      rect.append(svgEl("title", {}, `${utcTime(hour, true)} UTC: ${v} ${series}`));
      svg.append(rect);
    }
    if (i % 2 === 0) {
      svg.append(svgEl("text", { class: "tick x", x: b.left + i * slot + slot / 2, y: b.h - b.bottom + 18 },
        utcTime(hour)));
    }
  });
  if (!rows.some((r) => r.entries || r.exits)) emptyNote(svg, "no entries in this window");
}

// Occupancy (max and mean people in view) per interval, as two lines with markers on the max.
function drawOccupancy(svg, intervals, since, until) {
  const { y, b } = frame(svg, niceScale(Math.max(0, ...intervals.map((r) => r.max))), "people in view");
  const plotW = b.w - b.left - b.right;
  const x = (t) => b.left + (plotW * (t - since)) / (until - since);
  for (let h = 0; h < WINDOW_HOURS; h += 4) {
    svg.append(svgEl("text", { class: "tick x", x: x(since + h * HOUR), y: b.h - b.bottom + 18 },
      utcTime(since + h * HOUR)));
  }
  if (!intervals.length) {
    emptyNote(svg, "no count reports in this window");
    return;
  }
  for (const series of ["mean", "max"]) {
    const d = intervals.map((r, i) => `${i ? "L" : "M"}${x(r.t_ts).toFixed(1)},${y(r[series]).toFixed(1)}`).join(" ");
    svg.append(svgEl("path", { class: `line ${series}`, d }));
  }
  for (const r of intervals) {
    const dot = svgEl("circle", { class: "pt", cx: x(r.t_ts), cy: y(r.max), r: intervals.length > 60 ? 1.8 : 3,
      "data-t": r.t, "data-max": r.max, "data-mean": r.mean });
    dot.append(svgEl("title", {}, `${utcTime(r.t_ts, true)} UTC: max ${r.max}, mean ${fmt(r.mean)}`));
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
  const { y, b } = frame(svg, niceScale(Math.max(0, ...counts)), "people");
  const slot = (b.w - b.left - b.right) / counts.length;
  counts.forEach((n, i) => {
    const lo = DWELL_EDGES[i];
    const hi = DWELL_EDGES[i + 1];
    const label = hi === Infinity ? `${lo / 60}m+` : hi <= 60 ? `${lo}-${hi}s` : `${lo / 60}-${hi / 60}m`;
    const rect = svgEl("rect", { class: "bar dwell", x: b.left + i * slot + slot * 0.15, y: y(n),
      width: slot * 0.7, height: Math.max(0, y(0) - y(n)), "data-lo": lo, "data-value": n });
    rect.append(svgEl("title", {}, `${label}: ${n} people`));
    svg.append(rect);
    svg.append(svgEl("text", { class: "tick x", x: b.left + i * slot + slot / 2, y: b.h - b.bottom + 18 },
      label));
  });
  if (!dwell.n) emptyNote(svg, "no exits in this window");
}

// ------------------------------------------------------------------------------------------ panels
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
      ["model", !c.model ? "–" : (c.model.active.version || c.model.active.name)
        + (c.model.failed ? ` · update ${c.model.update.version} ${c.model.update.state.replace("_", " ")}` : "")]]) {
      facts.append(el("dt", {}, k), el("dd", {}, v));
    }
    card.append(head, status, facts);
    card.title = c.last_seen ? `last event ${c.last_seen}` : "no event yet";
    card.addEventListener("click", () => {
      state.selected = camKey(c);
      refresh();
    });
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
    type.append(el("span", { class: `badge ${e.type.replace(".", "-")}` }, e.type));
    const id = el("td", { class: "mono", title: e.event_id }, e.event_id);
    tr.append(el("td", { class: "mono" }, e.ts.replace("T", " ").replace(/\.\d+Z$/, "")),
      el("td", {}, `${e.site}/${e.camera_id}`), type, el("td", {}, e.track_id ?? "–"),
      el("td", {}, details.join(", ") || "–"), id);
    return tr;
  }));
}

async function renderCamera(cam) {
  const last = epoch(cam.last_seen) ?? Date.now() / 1000;
  const until = (Math.floor(last / HOUR) + 1) * HOUR;
  const since = until - WINDOW_HOURS * HOUR;
  const scope = { site: cam.site, camera: cam.camera_id };
  const range = { ...scope, since: new Date(since * 1000).toISOString(), until: new Date(until * 1000).toISOString() };
  const [hourly, occupancy, dwell, events, summaries, overview] = await Promise.all([
    api("stats/hourly", range),
    api("occupancy", { ...range, bucket: 600 }),
    api("dwell", range),
    api("events", { ...scope, limit: 25 }),
    api("summaries", { ...scope, limit: 1 }),
    api("overview", range),
  ]);
  document.getElementById("detail").hidden = false;
  document.getElementById("camera-title").textContent = `${cam.site} / ${cam.camera_id}`;
  document.getElementById("range").textContent = `${utcTime(since, true)} – ${utcTime(until, true)} UTC`;
  const hours = hourly.hours;
  const sum = (k) => hours.reduce((s, r) => s + (r[k] || 0), 0);
  const peak = hours.reduce((best, r) => (r.entries > (best ? best.entries : 0) ? r : best), null);
  const occMax = Math.max(0, ...occupancy.intervals.map((r) => r.max));
  document.getElementById("kpis").replaceChildren(
    kpi("entries", String(sum("entries"))),
    kpi("exits", String(sum("exits"))),
    kpi("people", String(overview.cameras.length ? overview.cameras[0].unique_tracks : 0),
      "distinct people (track ids) in this window, each counted once"),
    kpi("peak hour", peak ? `${utcTime(peak.hour_ts)} UTC` : "–", peak ? `${peak.entries} entries` : ""),
    kpi("most in view", occupancy.intervals.length ? String(occMax) : "–"),
    kpi("median stay", fmtSeconds(dwell.median), `mean ${fmtSeconds(dwell.mean)}`),
    kpi("90% left within", fmtSeconds(dwell.p90), "p90 of the time people stayed"),
  );
  document.getElementById("dwell-stats").textContent = dwell.n
    ? `n ${dwell.n} · mean ${fmtSeconds(dwell.mean)} · median ${fmtSeconds(dwell.median)} · p90 ${fmtSeconds(dwell.p90)}`
    : "";
  drawHourly(document.getElementById("chart-entries"), hours, since);
  drawOccupancy(document.getElementById("chart-occupancy"), occupancy.intervals, since, until);
  drawDwell(document.getElementById("chart-dwell"), dwell);
  document.getElementById("events-scope").textContent = `· ${cam.site}/${cam.camera_id}`;
  const latest = summaries.summaries[0];
  renderEvents(events.events, latest
    ? `This camera sends summaries (summary mode): the figures above come from them; there are no per-person ` +
      `records. Latest window ${utcTime(epoch(latest.start), true)} UTC, ${latest.events} events.`
    : "No events stored yet.");
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

// ------------------------------------------------------------------------------------------ main loop
function showBanner(text) {
  const banner = document.getElementById("banner");
  banner.hidden = !text;
  banner.textContent = text || "";
}

async function refresh() {
  if (state.busy) return;
  state.busy = true;
  try {
    const [{ cameras }, dead] = await Promise.all([api("cameras"), api("dead-letters", { limit: 1 })]);
    state.cameras = cameras;
    if (!cameras.some((c) => camKey(c) === state.selected)) state.selected = cameras.length ? camKey(cameras[0]) : null;
    document.getElementById("auth").hidden = true;
    renderTotals(cameras, dead.total);
    renderCameras(cameras);
    const cam = cameras.find((c) => camKey(c) === state.selected);
    if (cam) {
      await renderCamera(cam);
    } else {
      document.getElementById("detail").hidden = true;
      renderEvents((await api("events", { limit: 25 })).events);
    }
    showBanner("");
    document.getElementById("refreshed").textContent = `updated ${new Date().toLocaleTimeString("en-GB")}`;
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
  }
}

document.getElementById("auth").addEventListener("submit", (ev) => {
  ev.preventDefault();
  state.token = document.getElementById("token-input").value.trim();
  sessionStorage.setItem("smartcam-token", state.token);
  refresh();
});

initToken();
refresh();
setInterval(refresh, REFRESH_MS);
