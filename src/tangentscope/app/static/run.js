// tangentscope: the page of a recorded run. Reads /api/run once, then one snapshot at a time
// (the slider) and one metrics column at a time. No dependencies; plotting from plot.js.
// window.tangentscope exposes counters that the browser test reads.
"use strict";

const $ = (id) => document.getElementById(id);
const run = { overview: null, traj: null, k: 0, cache: new Map(), snap: null, series: null,
  pending: 0 };
const counters = { loaded: false, snapshotDraws: 0, metricsDraws: 0, snapshot: null,
  trajectory: null, column: null, errors: 0 };
window.tangentscope = counters;

function banner(text, bad = false) {
  const b = $("banner");
  b.hidden = !text;
  b.textContent = text || "";
  b.classList.toggle("bad", bad);
}

function fail(message) {
  counters.errors++;
  const err = $("error");
  err.hidden = false;
  err.textContent = message;
}

async function getJSON(path) {
  const r = await fetch(path);
  let data = {};
  try { data = await r.json(); } catch (e) { data = { error: `HTTP ${r.status}` }; }
  if (!r.ok) throw new Error(data.error || `HTTP ${r.status}`);
  return data;
}

// ------------------------------------------------------------------ drawing ---
function modes(canvas, top, bottom, opts) {
  // top: eigenvalues (log bars); bottom: energies per mode (log bars), same order
  const { ctx, w, h } = prepare(canvas);
  const gap = 34, a = { x: 62, y: 18, w: w - 74, h: (h - 40 - gap) / 2 };
  const b = { x: 62, y: a.y + a.h + gap, w: a.w, h: a.h };
  const n = top.length;
  if (!n) return;
  const lmax = Math.max(...top.map((v) => v || 0));
  const zero = Math.max(lmax * n * 2.2e-16, 1e-300);
  const pos = top.filter((v) => v !== null && v > zero);
  const axL = new Axes(ctx, a, [0, n], logRange(pos, zero), { ylog: true });
  axL.frame({ xTicks: false, ylabel: "eigenvalue" });
  const stub = axL.ylim[0] * (axL.ylim[1] / axL.ylim[0]) ** 0.02;
  axL.bars(top.map((v) => (v !== null && v > zero ? v : stub)),
    (i) => (top[i] !== null && top[i] > zero ? opts.colorOf(i) : COLORS.zero), axL.ylim[0]);
  const emax = Math.max(...bottom.map((v) => v || 0), ...(opts.ticks || []).map((v) => v || 0));
  const efloor = Math.max(emax * 1e-12, 1e-300);
  const axE = new Axes(ctx, b, [0, n], logRange(bottom.concat(opts.ticks || []), efloor),
    { ylog: true });
  axE.frame({ xTicks: false, ylabel: opts.energyLabel });
  axE.bars(bottom, opts.colorOf, axE.ylim[0]);
  if (opts.ticks) {
    const bw = b.w / n;
    ctx.save(); axE.clip(); ctx.strokeStyle = "#111"; ctx.lineWidth = 1.6; ctx.beginPath();
    opts.ticks.forEach((v, i) => {
      if (v === null) return;
      const y = axE.py(Math.max(v, axE.ylim[0]));
      ctx.moveTo(b.x + (i + 0.15) * bw, y); ctx.lineTo(b.x + (i + 0.85) * bw, y);
    });
    ctx.stroke(); ctx.restore();
  }
  ctx.save();
  ctx.font = "11px system-ui, sans-serif"; ctx.fillStyle = COLORS.text;
  ctx.fillText(opts.topLabel, a.x, 12);
  ctx.fillText(opts.bottomLabel, b.x, b.y - 6);
  ctx.textAlign = "center"; ctx.textBaseline = "top";
  ctx.fillText(`mode i = 1 … ${n}${opts.more ? ` (the largest ${n} of ${opts.more})` : ""}`,
    b.x + b.w / 2, b.y + b.h + 6);
  ctx.restore();
}

function series(canvas, xs, lines, { ylog = false, right = null, marker = null, xlabel = "" }) {
  const { ctx, w, h } = prepare(canvas);
  const good = xs.filter((v) => v !== null);
  if (!good.length) return null;
  let x0 = Math.min(...good), x1 = Math.max(...good);
  if (x1 === x0) x1 = x0 + 1;
  const ys = lines.flatMap((l) => l.y).filter((v) => v !== null && (!ylog || v > 0));
  let ylim;
  if (ylog) ylim = logRange(ys, 1e-300);
  else {
    let lo = Math.min(...ys), hi = Math.max(...ys);
    if (!Number.isFinite(lo)) { lo = 0; hi = 1; }
    const pad = 0.08 * (hi - lo || Math.abs(hi) || 1);
    ylim = [lo - pad, hi + pad];
  }
  const ax = new Axes(ctx, { x: 52, y: 8, w: w - (right ? 96 : 64), h: h - 44 }, [x0, x1], ylim,
    { ylog });
  ax.frame({ xlabel });
  if (right) {
    const r = new Axes(ctx, ax.rect, [x0, x1], [0, 1]);
    r.line(xs, right.y, right.color, { width: 1.2, dash: [5, 4] });
    ctx.save(); ctx.font = "11px system-ui, sans-serif"; ctx.fillStyle = right.color;
    ctx.textBaseline = "middle";
    for (const v of [0, 0.5, 1]) ctx.fillText(`${v * 100}%`, ax.rect.x + ax.rect.w + 5, r.py(v));
    ctx.restore();
  }
  for (const l of lines) {
    ax.line(l.x || xs, l.y, l.color, { dash: l.dash || [] });
    if (l.dots) ax.dots(l.x || xs, l.y.map((v) => v), l.color, 2.2);
  }
  if (marker !== null) {
    ctx.save(); ctx.strokeStyle = "#333"; ctx.setLineDash([3, 3]); ctx.lineWidth = 1;
    const X = Math.round(ax.px(marker)) + 0.5;
    ctx.beginPath(); ctx.moveTo(X, ax.rect.y); ctx.lineTo(X, ax.rect.y + ax.rect.h); ctx.stroke();
    ctx.restore();
  }
  return ax;
}

const PALETTE = ["#1f77b4", "#e6862a", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
  "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939"];

function drawSnapshot() {
  const s = run.snap, t = run.traj;
  if (!s || !t) return;
  const N = t.N;
  $("where").textContent = `snapshot ${s.k} of ${t.snapshots - 1}: step ${s.step}, ` +
    `t = ${fmt(s.time)}, loss ${fmt(s.loss)}` + (s.test_loss === null ? "" :
    `, test loss ${fmt(s.test_loss)}`);
  $("kernel-caption").textContent = `K_SS at step ${s.step} (n = ${t.n}, p = ${t.p})`;
  const lam = s.kernel.eigenvalues;
  modes($("kernel"), lam, s.kernel.energies, {
    colorOf: () => COLORS.channel, energyLabel: "|⟨vᵢ, r⟩|²",
    topLabel: "eigenvalues of K_SS(t) (largest first)",
    bottomLabel: "residual energy per eigenvector, same order", more: N > lam.length ? N : 0 });
  const ch = s.channel;
  const cstats = $("channel-stats");
  if (ch) {
    const colorOf = (i) => (i < ch.rank ? COLORS.channel : COLORS.reservoir);
    modes($("channel"), ch.eigenvalues, ch.energies, {
      colorOf, ticks: ch.initial_energies, energyLabel: "energy per mode",
      topLabel: "eigenvalues of W_S(0, t): channel (blue) and reservoir (orange)",
      bottomLabel: "residual r(t) per W_S mode (bars), initial residual r(0) (black ticks)",
      more: N > ch.eigenvalues.length ? N : 0 });
    $("channel-caption").textContent = `rank ${ch.rank} of ${N}`;
    const pct = (v) => (v === null ? "–" : `${(100 * v).toFixed(1)}%`);
    cstats.innerHTML = [["channel rank", `${ch.rank}`], ["cut λ >", fmt(ch.cut)],
      ["r(t) in channel", pct(ch.residual_channel_fraction)],
      ["r(0) in channel", pct(ch.initial_channel_fraction)],
      ["gap", fmt(ch.gap === null ? Infinity : ch.gap)]]
      .map(([k, v]) => `<span>${k} <b>${v}</b></span>`).join("");
  } else {
    prepare($("channel"));
    $("channel-caption").textContent = "";
    cstats.innerHTML = "<span>W_S(0, 0) = 0 at the first snapshot: move the slider.</span>";
  }
  const steps = t.steps;
  series($("loss"), steps, [{ y: t.loss, color: COLORS.train, dots: true },
    { y: t.test_loss, color: COLORS.test }], { ylog: t.loss.every((v) => v === null || v > 0),
    right: { y: t.channel_fraction, color: COLORS.reservoir }, marker: s.step, xlabel: "step" });
  const id = t.identities;
  series($("identities"), steps, [{ y: id.dissipation_error, color: COLORS.train, dots: true },
    { y: id.gradient_error, color: COLORS.test, dots: true },
    { y: id.displacement_error, color: COLORS.reservoir, dash: [5, 4] }],
  { ylog: true, marker: s.step, xlabel: "step" });
  counters.snapshotDraws++;
  counters.snapshot = s.k;
  $("kernel").dataset.draws = String(counters.snapshotDraws);
}

function drawMetrics() {
  const d = run.series;
  const canvas = $("metrics");
  if (!d) { prepare(canvas); return; }
  const xs = d.series.flatMap((s) => s.x);
  const lines = d.series.map((s, i) => ({ x: s.x, y: s.y, color: PALETTE[i % PALETTE.length],
    dots: s.x.length < 60 }));
  series(canvas, xs, lines, { xlabel: d.x, marker: run.snap ? run.snap.step : null });
  const groups = d.series.map((s, i) => `<span style="color:${PALETTE[i % PALETTE.length]}">` +
    `${s.group || d.column}</span>`).join(" ");
  $("metrics-caption").innerHTML = `${d.column} against ${d.x} ${groups}`;
  counters.metricsDraws++;
  counters.column = d.column;
  canvas.dataset.draws = String(counters.metricsDraws);
}

// ------------------------------------------------------------------ loading ---
async function showSnapshot(k) {
  const t = run.traj;
  if (!t) return;
  run.k = k;
  $("slider").value = String(k);
  const key = `${t.name}/${k}`;
  const ticket = ++run.pending;
  try {
    let snap = run.cache.get(key);
    if (!snap) {
      snap = await getJSON(`/api/run/snapshots/${k}?trajectory=${encodeURIComponent(t.name)}`);
      run.cache.set(key, snap);
    }
    if (ticket !== run.pending) return;       // the slider moved on meanwhile
    run.snap = snap;
    $("error").hidden = true;
    drawSnapshot();
    if (run.series) drawMetrics();
  } catch (e) {
    fail(`could not load snapshot ${k}: ${e.message}`);
  }
}

function selectTrajectory(name) {
  const t = run.overview.trajectories.find((x) => x.name === name);
  run.traj = t && t.analysed ? t : null;
  counters.trajectory = name;
  const panels = ["kernel-panel", "channel-panel", "loss-panel", "identities-panel"];
  for (const p of panels) $(p).hidden = !run.traj;
  if (t && !t.analysed) banner(`${name}: ${t.note}`);
  if (!run.traj) return;
  $("slider").max = String(t.snapshots - 1);
  showSnapshot(t.snapshots - 1);
}

async function selectColumn(col) {
  try {
    run.series = await getJSON(`/api/run/metrics?column=${encodeURIComponent(col)}`);
    drawMetrics();
  } catch (e) {
    fail(`could not load column ${col}: ${e.message}`);
  }
}

function showInfo(o) {
  const items = [];
  if (o.experiment) items.push(["experiment", o.experiment], ["preset", o.preset || "–"]);
  if (o.status) items.push(["status", o.status]);
  const t = o.trajectories[0];
  if (t) {
    items.push(["examples n", `${t.n}`], ["outputs p", `${t.p}`], ["loss", t.loss_name || "–"],
      ["model", t.model || "–"], ["optimizer", t.optimizer || "–"],
      ["snapshots", `${t.snapshots}`]);
  }
  for (const [k, v] of Object.entries(o.summary || {}).slice(0, 8)) items.push([k, fmt(v)]);
  $("info").innerHTML = items.map(([k, v]) => `<span>${k} <b>${v}</b></span>`).join("");
}

async function init() {
  const o = await getJSON("/api/run");
  run.overview = o;
  $("title").textContent = `· ${o.experiment ? `${o.experiment} · ` : ""}${o.path}`;
  const pill = $("status");
  pill.textContent = o.status || "recorded";
  pill.dataset.status = o.status === "complete" ? "done" : (o.status || "ready");
  showInfo(o);
  const sel = $("trajectory");
  for (const t of o.trajectories) sel.add(new Option(t.name === "." ? "(this directory)" :
    t.name, t.name));
  $("trajectory-box").hidden = o.trajectories.length === 0;
  sel.addEventListener("change", () => selectTrajectory(sel.value));
  $("slider").addEventListener("input", () => showSnapshot(Number($("slider").value)));
  $("prev").addEventListener("click", () => { if (run.k > 0) showSnapshot(run.k - 1); });
  $("next").addEventListener("click", () => {
    if (run.traj && run.k < run.traj.snapshots - 1) showSnapshot(run.k + 1);
  });
  const cols = $("column");
  const m = o.metrics;
  const ordered = m.gate_columns.concat(m.columns.filter((c) => !m.gate_columns.includes(c)));
  for (const c of ordered) cols.add(new Option(c, c));
  $("metrics-box").hidden = ordered.length === 0;
  $("metrics-panel").hidden = ordered.length === 0;
  cols.addEventListener("change", () => selectColumn(cols.value));
  if (o.trajectories.length) selectTrajectory(o.trajectories[0].name);
  else for (const p of ["kernel-panel", "channel-panel", "loss-panel", "identities-panel"]) {
    $(p).hidden = true;
  }
  if (ordered.length) await selectColumn(ordered[0]);
  window.addEventListener("resize", () => { drawSnapshot(); drawMetrics(); });
  counters.loaded = true;
}

init().catch((e) => { banner(`could not load the run: ${e.message}`, true); counters.errors++; });
