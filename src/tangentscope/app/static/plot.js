// tangentscope pages: shared formatting and a tiny canvas plotting library (no dependencies).
// Loaded before app.js (the live page) and run.js (the page of a recorded run).
"use strict";

const COLORS = { channel: "#1f77b4", reservoir: "#e6862a", train: "#1f77b4", test: "#2ca02c",
  clean: "#6b6b6b", fit: "#1f77b4", axis: "#9a958a", grid: "#eeebe4", text: "#4a525a",
  zero: "#b9b4a8" };

// ---------------------------------------------------------------- formatting ---
function fmt(v, digits = 3) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (v === Infinity) return "∞";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(digits - 1);
  return Number(v.toPrecision(digits)).toString();
}
function niceCeil(v) {
  const mag = 10 ** Math.floor(Math.log10(v));
  return [1, 1.5, 2, 3, 4, 5, 6, 8, 10].map((m) => m * mag).find((c) => c >= v);
}
function pow10Label(e) {
  const sup = { "-": "⁻", 0: "⁰", 1: "¹", 2: "²", 3: "³", 4: "⁴", 5: "⁵", 6: "⁶", 7: "⁷", 8: "⁸",
    9: "⁹" };
  if (e === 0) return "1";
  if (e === 1) return "10";
  return "10" + String(e).split("").map((c) => sup[c]).join("");
}

// ------------------------------------------------------------------ plotting ---
// A tiny axes object: maps data to pixels (linear or log), draws ticks, grid and marks.
class Axes {
  constructor(ctx, rect, xlim, ylim, { xlog = false, ylog = false } = {}) {
    Object.assign(this, { ctx, rect, xlim, ylim, xlog, ylog });
  }
  tx(v) { return this._t(v, this.xlim, this.xlog); }
  ty(v) { return this._t(v, this.ylim, this.ylog); }
  _t(v, [a, b], log) {
    if (log) { v = Math.log10(Math.max(v, a)); a = Math.log10(a); b = Math.log10(b); }
    return (v - a) / (b - a || 1);
  }
  px(v) { return this.rect.x + this.tx(v) * this.rect.w; }
  py(v) { return this.rect.y + this.rect.h - this.ty(v) * this.rect.h; }
  ticks(lim, log, target) {
    const [a, b] = lim;
    if (log) {
      const lo = Math.ceil(Math.log10(a)), hi = Math.floor(Math.log10(b));
      const every = Math.max(1, Math.ceil((hi - lo + 1) / target));
      const out = [];
      for (let e = hi; e >= lo; e -= every) out.push({ v: 10 ** e, label: pow10Label(e) });
      return out;
    }
    const span = b - a || 1, raw = span / target, mag = 10 ** Math.floor(Math.log10(raw));
    const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
    const out = [];
    for (let v = Math.ceil(a / step) * step; v <= b + 1e-9 * span; v += step) {
      out.push({ v, label: fmt(Math.abs(v) < 1e-12 ? 0 : v, 3) });
    }
    return out;
  }
  frame({ xTicks = true, yTicks = true, xlabel = "", ylabel = "", nx = 6, ny = 5 } = {}) {
    const { ctx, rect } = this;
    ctx.save();
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = COLORS.text;
    ctx.strokeStyle = COLORS.grid;
    ctx.lineWidth = 1;
    if (yTicks) {
      ctx.textAlign = "right"; ctx.textBaseline = "middle";
      for (const t of this.ticks(this.ylim, this.ylog, ny)) {
        const y = Math.round(this.py(t.v)) + 0.5;
        ctx.beginPath(); ctx.moveTo(rect.x, y); ctx.lineTo(rect.x + rect.w, y); ctx.stroke();
        ctx.fillText(t.label, rect.x - 5, y);
      }
    }
    if (xTicks) {
      ctx.textAlign = "center"; ctx.textBaseline = "top";
      for (const t of this.ticks(this.xlim, this.xlog, nx)) {
        const x = Math.round(this.px(t.v)) + 0.5;
        ctx.beginPath(); ctx.moveTo(x, rect.y); ctx.lineTo(x, rect.y + rect.h); ctx.stroke();
        ctx.fillText(t.label, x, rect.y + rect.h + 4);
      }
    }
    ctx.strokeStyle = COLORS.axis;
    ctx.beginPath();
    ctx.moveTo(rect.x + 0.5, rect.y); ctx.lineTo(rect.x + 0.5, rect.y + rect.h + 0.5);
    ctx.lineTo(rect.x + rect.w, rect.y + rect.h + 0.5);
    ctx.stroke();
    if (xlabel) {
      ctx.textAlign = "center"; ctx.textBaseline = "bottom";
      ctx.fillText(xlabel, rect.x + rect.w / 2, rect.y + rect.h + 32);
    }
    if (ylabel) {
      ctx.translate(rect.x - 44, rect.y + rect.h / 2); ctx.rotate(-Math.PI / 2);
      ctx.textAlign = "center"; ctx.textBaseline = "top";
      ctx.fillText(ylabel, 0, 0);
    }
    ctx.restore();
  }
  line(xs, ys, color, { width = 1.8, dash = [] } = {}) {
    const { ctx } = this;
    ctx.save();
    this.clip();
    ctx.strokeStyle = color; ctx.lineWidth = width; ctx.setLineDash(dash);
    ctx.beginPath();
    let pen = false;
    for (let i = 0; i < xs.length; i++) {
      const y = ys[i];
      if (y === null || y === undefined || !Number.isFinite(y)) { pen = false; continue; }
      const X = this.px(xs[i]), Y = this.py(y);
      if (pen) ctx.lineTo(X, Y); else ctx.moveTo(X, Y);
      pen = true;
    }
    ctx.stroke();
    ctx.restore();
  }
  dots(xs, ys, color, r = 2.6) {
    const { ctx } = this;
    ctx.save(); this.clip(); ctx.fillStyle = color;
    for (let i = 0; i < xs.length; i++) {
      ctx.beginPath(); ctx.arc(this.px(xs[i]), this.py(ys[i]), r, 0, 2 * Math.PI); ctx.fill();
    }
    ctx.restore();
  }
  bars(values, colorOf, floor) {
    const { ctx, rect } = this;
    const n = values.length, w = rect.w / n, base = this.py(this.ylim[0]);
    ctx.save(); this.clip();
    for (let i = 0; i < n; i++) {
      const v = values[i] === null ? floor : Math.max(values[i], floor);
      const y = this.py(v);
      ctx.fillStyle = colorOf(i);
      ctx.fillRect(rect.x + i * w + (w > 3 ? 0.5 : 0), y, Math.max(w - (w > 3 ? 1 : 0), 0.6),
        base - y);
    }
    ctx.restore();
  }
  clip() {
    const { ctx, rect } = this;
    ctx.beginPath(); ctx.rect(rect.x, rect.y - 1, rect.w + 1, rect.h + 2); ctx.clip();
  }
}

function prepare(canvas) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  return { ctx, w, h };
}

function logRange(values, floor) {
  let lo = Infinity, hi = 0;
  for (const v of values) {
    if (v === null) continue;
    const x = Math.max(v, floor);
    if (x < lo) lo = x;
    if (x > hi) hi = x;
  }
  if (!(hi > 0)) return [1e-3, 1];
  lo = Math.min(lo, hi / 10);
  return [10 ** Math.floor(Math.log10(lo)), 10 ** Math.ceil(Math.log10(hi) + 1e-9)];
}
