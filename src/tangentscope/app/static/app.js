// tangentscope live page: one session per tab, frames over server-sent events, canvas plots.
// No dependencies. window.tangentscope exposes counters that the browser test reads.
"use strict";

const FIELDS = ["noise", "n", "seed", "width", "depth", "optimizer", "lr", "max_steps"];
const $ = (id) => document.getElementById(id);
const state = { session: null, source: null, latest: null, drawPending: false, limits: null,
  status: "starting" };
const counters = { frames: 0, fitDraws: 0, lossDraws: 0, spectrumDraws: 0, sessions: 0 };
window.tangentscope = counters;

function drawFit(f) {
  const { ctx, w, h } = prepare($("fit"));
  if (!f.data) return;
  const d = f.data;
  const all = d.y.concat(d.y_test);
  let lo = Math.min(...all), hi = Math.max(...all);
  const pad = 0.12 * (hi - lo || 1);
  const ax = new Axes(ctx, { x: 46, y: 8, w: w - 58, h: h - 40 }, [-1, 1], [lo - pad, hi + pad]);
  ax.frame({ xlabel: "" });
  ax.line(d.x_test, d.y_test, COLORS.clean, { width: 1.5 });
  ax.dots(d.x, d.y, "#111");
  ax.line(d.x_test, f.fit, COLORS.fit, { width: 2.2 });
  counters.fitDraws++;
}

function drawLoss(f) {
  const { ctx, w, h } = prepare($("loss"));
  const hist = f.history;
  if (!hist || hist.step.length === 0) return;
  const last = hist.step[hist.step.length - 1];
  const xmax = niceCeil(Math.max(1.05 * last, 10));
  const ys = hist.train.concat(hist.test).filter((v) => v !== null && v > 0);
  const ylim = logRange(ys, 1e-12);
  const ax = new Axes(ctx, { x: 46, y: 8, w: w - 90, h: h - 40 }, [0, xmax], ylim,
    { ylog: true });
  ax.frame({ xlabel: "" });
  const right = new Axes(ctx, ax.rect, [0, xmax], [0, 1]);
  right.line(hist.step, hist.reservoir, COLORS.reservoir, { width: 1.2, dash: [5, 4] });
  ctx.save();
  ctx.font = "11px system-ui, sans-serif"; ctx.fillStyle = COLORS.reservoir;
  ctx.textAlign = "left"; ctx.textBaseline = "middle";
  for (const v of [0, 0.5, 1]) ctx.fillText(`${v * 100}%`, ax.rect.x + ax.rect.w + 5, right.py(v));
  ctx.restore();
  ax.line(hist.step, hist.train, COLORS.train);
  ax.line(hist.step, hist.test, COLORS.test);
  counters.lossDraws++;
}

function drawSpectrum(f) {
  const canvas = $("spectrum");
  const { ctx, w, h } = prepare(canvas);
  if (!f.eigenvalues) return;
  const lam = f.eigenvalues, en = f.energies;
  const thr = f.threshold === null ? Infinity : f.threshold;  // null: t_eff = 0, all reservoir
  const zero = Math.max(f.zero || 0, 1e-300);
  const colorOf = (i) => (lam[i] !== null && lam[i] > thr ? COLORS.channel : COLORS.reservoir);
  const gap = 34, top = { x: 62, y: 18, w: w - 74, h: (h - 40 - gap) / 2 };
  const bottom = { x: 62, y: top.y + top.h + gap, w: top.w, h: top.h };
  const n = lam.length;
  const positive = lam.filter((v) => v !== null && v > zero);
  const nZero = n - positive.length;
  const axL = new Axes(ctx, top, [0, n], logRange(positive, zero), { ylog: true });
  axL.frame({ xTicks: false, ylabel: "eigenvalue λᵢ" });
  // numerically zero eigenvalues (the null space of K) are grey stubs at the bottom
  const stub = axL.ylim[0] * (axL.ylim[1] / axL.ylim[0]) ** 0.02;
  axL.bars(lam.map((v) => (v !== null && v > zero ? v : stub)),
    (i) => (lam[i] !== null && lam[i] > zero ? colorOf(i) : COLORS.zero), axL.ylim[0]);
  if (nZero > 0) {
    ctx.save(); ctx.font = "11px system-ui, sans-serif"; ctx.fillStyle = COLORS.text;
    ctx.textAlign = "right";
    ctx.fillText(`grey: ${nZero} eigenvalue${nZero > 1 ? "s" : ""} ≈ 0 (null space of K)`,
      top.x + top.w, 12);
    ctx.restore();
  }
  if (Number.isFinite(thr)) {
    ctx.save(); ctx.setLineDash([4, 3]); ctx.strokeStyle = "#333"; ctx.lineWidth = 1;
    const y = axL.py(thr);
    if (y >= top.y && y <= top.y + top.h) {
      ctx.beginPath(); ctx.moveTo(top.x, y); ctx.lineTo(top.x + top.w, y); ctx.stroke();
      ctx.font = "11px system-ui, sans-serif"; ctx.fillStyle = "#333"; ctx.textAlign = "right";
      ctx.fillText(`n / t_eff = ${fmt(thr)}`, top.x + top.w - 4, y - 4);
    }
    ctx.restore();
  }
  const enMax = Math.max(...en.map((v) => v || 0));
  const enFloor = Math.max(enMax * 1e-12, 1e-300);
  const axE = new Axes(ctx, bottom, [0, n], logRange(en, enFloor), { ylog: true });
  axE.frame({ xTicks: false, ylabel: "|⟨vᵢ, r⟩|²" });
  axE.bars(en, colorOf, axE.ylim[0]);
  if (f.noise_energies) {  // the known label noise ε, projected the same way: black ticks
    const noise = f.noise_energies, bw = bottom.w / n;
    ctx.save(); axE.clip(); ctx.strokeStyle = "#111"; ctx.lineWidth = 1.6;
    ctx.beginPath();
    for (let i = 0; i < n; i++) {
      if (noise[i] === null) continue;
      const y = axE.py(Math.max(noise[i], axE.ylim[0]));
      ctx.moveTo(bottom.x + (i + 0.15) * bw, y); ctx.lineTo(bottom.x + (i + 0.85) * bw, y);
    }
    ctx.stroke(); ctx.restore();
  }
  ctx.save();
  ctx.font = "11px system-ui, sans-serif"; ctx.fillStyle = COLORS.text;
  ctx.textAlign = "left"; ctx.textBaseline = "alphabetic";
  ctx.fillText("eNTK eigenvalues of the training set (largest first)", top.x, 12);
  ctx.fillText("residual energy per eigenvector |⟨vᵢ, r⟩|², same order", bottom.x,
    bottom.y - 6);
  ctx.textAlign = "right";
  ctx.fillText("black ticks: the known label noise |⟨vᵢ, ε⟩|²", bottom.x + bottom.w,
    bottom.y - 6);
  ctx.textAlign = "left";
  ctx.textAlign = "center"; ctx.textBaseline = "top";
  ctx.fillText(`eigenvector i = 1 … ${n}`, bottom.x + bottom.w / 2, bottom.y + bottom.h + 6);
  ctx.restore();
  counters.spectrumDraws++;
  canvas.dataset.draws = String(counters.spectrumDraws);
}

function drawStats(f) {
  const items = [
    ["step", f.step === undefined ? "–" : `${f.step}`],
    ["t_eff", fmt(f.t_eff)],
    ["train loss", fmt(f.train_loss)],
    ["test loss", fmt(f.test_loss)],
    ["residual energy in reservoir", f.reservoir_fraction === null || f.reservoir_fraction ===
      undefined ? "–" : `${(100 * f.reservoir_fraction).toFixed(1)}%`],
    ["λ_max", f.eigenvalues ? fmt(f.eigenvalues[0]) : "–"],
    ["stable GD lr <", fmt(f.gd_lr_max)],
    ["updates/s", f.timing ? fmt(f.timing.updates_per_s, 3) : "–"],
    ["spectrum", f.timing ? `${fmt(f.timing.spectrum_ms, 3)} ms` : "–"],
  ];
  $("stats").innerHTML = items.map(([k, v]) => `<span>${k} <b>${v}</b></span>`).join("");
}

function draw() {
  state.drawPending = false;
  const f = state.latest;
  if (!f) return;
  showStatus(f.status, f.message);
  drawFit(f); drawLoss(f); drawSpectrum(f); drawStats(f);
}

// ------------------------------------------------------------------ session ---
function showStatus(status, message) {
  state.status = status;
  const pill = $("status");
  pill.dataset.status = status;
  pill.textContent = status;
  $("run").textContent = status === "running" ? "Pause" : (status === "done" ? "Continue" : "Start");
  $("run").disabled = !state.session || status === "starting";
  $("reset").disabled = !state.session;
  if (message) banner(message, status === "diverged" || status === "error");
  else if (!state.bannerSticky) banner("");
}

function banner(text, bad = false, sticky = false) {
  const b = $("banner");
  b.hidden = !text;
  b.textContent = text || "";
  b.classList.toggle("bad", bad);
  state.bannerSticky = Boolean(text) && sticky;
}

function fillForm(config) {
  const form = $("form");
  for (const k of FIELDS) {
    const el = form.elements[k];
    if (el && document.activeElement !== el && config[k] !== undefined) {
      el.value = config[k];
      el.classList.remove("invalid");
    }
  }
}

async function api(path, body) {
  const opts = body === undefined ? { method: "POST" } : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const r = await fetch(path, opts);
  let data = {};
  try { data = await r.json(); } catch (e) { data = { error: `HTTP ${r.status}` }; }
  return { ok: r.ok, status: r.status, data };
}

async function newSession() {
  const r = await api("/api/sessions", {});
  if (!r.ok) {
    showStatus("offline", "");
    banner(r.data.error || `could not start a session (HTTP ${r.status})`, true, true);
    return;
  }
  state.session = r.data.session;
  counters.session = state.session;
  counters.sessions++;
  fillForm(r.data.config);
  connect();
}

function connect() {
  if (state.source) state.source.close();
  const es = new EventSource(`/api/sessions/${state.session}/events`);
  state.source = es;
  es.addEventListener("state", (e) => {
    const f = JSON.parse(e.data);
    counters.frames++;
    counters.step = f.step;
    counters.status = f.status;
    if (f.run !== state.run) { state.run = f.run; fillForm(f.config); }
    state.latest = f;
    if (!state.drawPending) { state.drawPending = true; requestAnimationFrame(draw); }
  });
  es.onerror = async () => {
    if (es.readyState !== EventSource.CLOSED) return;  // the browser retries by itself
    const r = await fetch(`/api/sessions/${state.session}`).catch(() => null);
    if (r && r.status === 404) {
      banner("this page's session had ended; started a new one", false);
      newSession();
    } else {
      showStatus("offline", "");
      banner("lost the connection to the server; reload the page when it is back", true, true);
    }
  };
}

async function sendControls(values) {
  const form = $("form");
  for (const k of Object.keys(values)) form.elements[k].classList.remove("invalid");
  const r = await api(`/api/sessions/${state.session}/config`, values);
  const err = $("error");
  if (r.ok) {
    err.hidden = true;
    for (const el of form.querySelectorAll(".invalid")) el.classList.remove("invalid");
    fillForm(r.data.config);
    return;
  }
  err.hidden = false;
  err.textContent = `${r.data.error} — nothing was changed.`;
  const el = r.data.field && form.elements[r.data.field];
  if (el) el.classList.add("invalid");
}

async function init() {
  const lim = await fetch("/api/limits").then((r) => r.json());
  state.limits = lim;
  const form = $("form");
  const sel = form.elements.optimizer;
  for (const [name, label] of Object.entries(lim.optimizers)) sel.add(new Option(label, name));
  for (const k of FIELDS) {
    const el = form.elements[k], l = lim.limits[k];
    if (!el || !l) continue;
    if (l.type !== "choice") { el.min = l.min; el.max = l.max; }
    el.title = `${l.help}: ${l.type === "choice" ? l.choices.join(", ") : `${l.min} … ${l.max}`}`;
    el.addEventListener("change", () => {
      if (!state.session) return;
      const values = { [k]: el.value };
      if (k === "optimizer" && lim.default_lr[el.value] !== undefined) {
        values.lr = lim.default_lr[el.value];
      }
      sendControls(values);
    });
  }
  fillForm(lim.defaults);
  $("run").addEventListener("click", () => {
    const action = state.status === "running" ? "pause" : "start";
    api(`/api/sessions/${state.session}/${action}`);
  });
  $("reset").addEventListener("click", () => api(`/api/sessions/${state.session}/reset`));
  window.addEventListener("pagehide", () => {
    if (state.session) navigator.sendBeacon(`/api/sessions/${state.session}/close`);
  });
  window.addEventListener("resize", () => { if (state.latest) draw(); });
  await newSession();
}

init().catch((e) => banner(`could not load the page: ${e}`, true, true));
