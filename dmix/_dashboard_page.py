"""The ``/dmix`` page served by :mod:`dmix.dashboard`: one self-contained HTML document.

Its script polls ``<page>/data.json`` every second and redraws each fit: iteration, the
log-likelihood curve (an SVG polyline per initialisation), seconds per iteration, rows per
second, component weights and checkpoint status. Text goes in with ``textContent`` only.
"""

PAGE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>dmix fits</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
  h1 { font-size: 1.3em; margin: 0 0 .2em; }
  #status { color: #777; font-size: .9em; margin-bottom: 1em; }
  .fit { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 1em;
         margin-bottom: 1em; max-width: 1100px; }
  .fit h2 { font-size: 1.1em; margin: 0 0 .3em; }
  .badge { font-size: .8em; padding: .1em .5em; border-radius: 3px; margin-left: .5em;
           background: #e3f2fd; color: #0d47a1; }
  .badge.converged { background: #e8f5e9; color: #1b5e20; }
  .badge.failed { background: #ffebee; color: #b71c1c; }
  .badge.did-not-converge { background: #fff8e1; color: #8d6e00; }
  .meta { color: #555; font-size: .9em; margin-bottom: .6em; }
  .stats { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr));
           gap: .3em 1em; margin-bottom: .6em; }
  .stats div span { display: block; color: #777; font-size: .8em; }
  .stats div b { font-variant-numeric: tabular-nums; }
  .plots { display: flex; flex-wrap: wrap; gap: 1em; }
  svg { background: #fcfcfc; border: 1px solid #eee; }
  svg text { font-size: 11px; fill: #666; }
  .error { color: #b71c1c; white-space: pre-wrap; }
  .empty { color: #777; }
</style>
</head>
<body>
<h1>dmix fits</h1>
<div id="status">connecting...</div>
<div id="fits"></div>
<script>
"use strict";
const DATA = location.pathname.replace(/\/+$/, "") + "/data.json";
const NS = "http://www.w3.org/2000/svg";
const COLORS = ["#1565c0", "#c62828", "#2e7d32", "#6a1b9a", "#ef6c00", "#00838f", "#4e342e"];

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
function sv(tag, attrs) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  return e;
}
function num(x, digits) {
  if (x === null || x === undefined) return "-";
  if (Math.abs(x) >= 1e5 || (x !== 0 && Math.abs(x) < 1e-3)) return x.toExponential(digits - 1);
  return x.toPrecision(digits);
}
function stat(label, value, cls) {
  const d = el("div");
  d.append(el("span", null, label));
  d.append(el("b", cls, value));
  return d;
}

function curve(fit) {
  const W = 560, H = 200, L = 70, R = 10, T = 10, B = 25;
  const s = sv("svg", {width: W, height: H, class: "curve", "data-fit": fit.id});
  const series = Object.entries(fit.lower_bounds).map(
    ([init, ys]) => [init, ys.map((y, i) => [i + 1, y]).filter(p => p[1] !== null)]);
  const all = series.flatMap(([, ps]) => ps);
  const title = sv("text", {x: L, y: H - 6});
  title.textContent = "mean log-likelihood per iteration";
  s.append(title);
  if (!all.length) return s;
  const n = Math.max(...all.map(p => p[0]));
  let lo = Math.min(...all.map(p => p[1])), hi = Math.max(...all.map(p => p[1]));
  if (hi === lo) { lo -= 0.5; hi += 0.5; }
  const x = i => L + (n > 1 ? (i - 1) / (n - 1) : 0.5) * (W - L - R);
  const y = v => T + (hi - v) / (hi - lo) * (H - T - B);
  for (const [v, at] of [[hi, T + 4], [lo, H - B]]) {
    const t = sv("text", {x: 4, y: at});
    t.textContent = num(v, 6);
    s.append(t);
  }
  s.append(sv("line", {x1: L, y1: T, x2: L, y2: H - B, stroke: "#bbb"}));
  series.forEach(([init, ps], k) => {
    const points = ps.map(([i, v]) => x(i).toFixed(1) + "," + y(v).toFixed(1)).join(" ");
    s.append(sv("polyline", {points, fill: "none", stroke: COLORS[k % COLORS.length],
                             "stroke-width": 1.5, "data-init": init}));
  });
  return s;
}

function weightBars(weights) {
  const W = 360, H = 200, T = 10, B = 25;
  const s = sv("svg", {width: W, height: H, class: "weights"});
  const title = sv("text", {x: 4, y: H - 6});
  title.textContent = "component weights";
  s.append(title);
  if (!weights || !weights.length) return s;
  const top = Math.max(...weights) || 1, w = (W - 8) / weights.length;
  weights.forEach((v, k) => {
    const h = v / top * (H - T - B);
    const r = sv("rect", {x: 4 + k * w, y: H - B - h, width: Math.max(1, w - 1), height: h,
                          fill: COLORS[0]});
    const tip = sv("title");
    tip.textContent = "component " + k + ": " + v.toFixed(4);
    r.append(tip);
    s.append(r);
  });
  return s;
}

function checkpointText(c) {
  if (!c) return "off";
  const last = c.last ? ", last " + c.last : "";
  return c.saved + " saved (every " + c.every + ")" + last;
}

function card(fit) {
  const info = fit.info || {};
  const box = el("div", "fit");
  box.dataset.fit = fit.id;
  box.dataset.status = fit.status;
  const h = el("h2", null, fit.id);
  h.append(el("span", "badge " + fit.status.replace(/ /g, "-"), fit.status));
  box.append(h);
  const meta = [];
  if (info.n_rows) meta.push(info.n_rows.toLocaleString() + " rows x " + info.n_features +
                             " features in " + info.n_blocks + " blocks");
  if (info.n_components) meta.push(info.n_components + " components");
  if (info.n_init > 1) meta.push(info.n_init + " initialisations");
  if (info.source) meta.push(info.source);
  if (fit.resumed) meta.push("resumed from " + fit.resumed.name);
  box.append(el("div", "meta", meta.join(" | ")));
  const stats = el("div", "stats");
  stats.append(stat("iteration", fit.iteration + (info.max_iter ? " / " + info.max_iter : ""),
                    "iteration"));
  stats.append(stat("log-likelihood", num(fit.lower_bound, 8), "lower-bound"));
  stats.append(stat("change", num(fit.change, 3), "change"));
  stats.append(stat("seconds / iteration", num(fit.seconds_per_iteration, 3), "seconds"));
  stats.append(stat("rows / second", fit.rows_per_second === null ? "-" :
                    Math.round(fit.rows_per_second).toLocaleString(), "rows-per-second"));
  stats.append(stat("checkpoint", checkpointText(fit.checkpoint), "checkpoint"));
  box.append(stats);
  const plots = el("div", "plots");
  plots.append(curve(fit), weightBars(fit.weights));
  box.append(plots);
  if (fit.error) box.append(el("div", "error", fit.error));
  return box;
}

function render(data) {
  const root = document.getElementById("fits");
  root.replaceChildren(...data.fits.map(card));
  if (!data.fits.length) root.append(el("p", "empty", "No dmix fit has run on this cluster yet."));
  const running = data.fits.filter(f => f.status === "running").length;
  document.getElementById("status").textContent =
    running + " running, " + data.fits.length + " shown; updated " +
    new Date(data.time * 1000).toLocaleTimeString();
}

async function poll() {
  try {
    const r = await fetch(DATA, {cache: "no-store"});
    if (!r.ok) throw new Error("HTTP " + r.status);
    render(await r.json());
  } catch (e) {
    document.getElementById("status").textContent = "cannot reach the scheduler: " + e;
  }
  setTimeout(poll, 1000);
}
poll();
</script>
</body>
</html>
"""
