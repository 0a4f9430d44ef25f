// narthex dashboard: the tenant's plan, live quota and usage, from the public API only.
// The pasted key lives in sessionStorage (this tab), is sent as X-API-Key to this origin,
// and never goes into a cookie or a URL.
"use strict";

const KEY = "narthex.apiKey";
const REFRESH_MS = 5000;
const COLORS = { ok: "#2f6fdf", err: "#d33", lim: "#e89b1a", p50: "#2a9d5c", p95: "#8a4fd8" };
let range = "day";
let timer = null;

const $ = (id) => document.getElementById(id);

async function call(path) {
  const response = await fetch(path, {
    headers: { "X-API-Key": sessionStorage.getItem(KEY) || "" },
    credentials: "omit",
    cache: "no-store",
  });
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  if (!response.ok) {
    const error = new Error((body && (body.detail || body.title)) || `HTTP ${response.status}`);
    error.status = response.status;
    error.retryAfter = response.headers.get("Retry-After");
    throw error;
  }
  return body;
}

function refusal(error) {
  if (error.status === 401) return "That API key was not accepted: check it, or ask your admin for a new one.";
  if (error.status === 403) return "This key may not read usage (it lacks the usage scope).";
  if (error.status === 429) return `Too many attempts from here; try again in ${error.retryAfter || "a few"} s.`;
  return `Could not reach the platform (${error.message}).`;
}

function showQuota(q) {
  $("who").textContent = `tenant ${q.tenant}`;
  $("plan").textContent = q.plan;
  $("plan-detail").textContent = `${q.bucket.refill_per_second}/s, burst ${q.bucket.capacity}, ` +
    `${q.max_items_per_request} items per request`;
  $("bucket-meter").max = q.bucket.capacity;
  $("bucket-meter").value = q.bucket.remaining;
  $("bucket").textContent = `${Math.floor(q.bucket.remaining)} of ${q.bucket.capacity} items available`;
  $("daily-meter").max = q.daily.limit;
  $("daily-meter").value = q.daily.remaining;
  $("daily").textContent = `${q.daily.used} of ${q.daily.limit} used; resets in ` +
    `${Math.round(q.daily.seconds_until_reset / 3600)} h`;
}

function usagePath() {
  const now = new Date();
  if (range === "day") {
    return "/v1/usage?granularity=hour";
  }
  const from = new Date(now.getTime() - 7 * 86400 * 1000);
  return `/v1/usage?granularity=day&from=${encodeURIComponent(from.toISOString())}`;
}

function label(iso) {
  const d = new Date(iso);
  return range === "day" ? `${String(d.getUTCHours()).padStart(2, "0")}h` :
    `${d.getUTCMonth() + 1}/${d.getUTCDate()}`;
}

function axes(ctx, w, h, max, unit) {
  ctx.clearRect(0, 0, w, h);
  ctx.strokeStyle = "#ccd"; ctx.fillStyle = "#556"; ctx.font = "11px system-ui";
  ctx.beginPath(); ctx.moveTo(40, 10); ctx.lineTo(40, h - 20); ctx.lineTo(w - 5, h - 20); ctx.stroke();
  ctx.fillText(`${max}${unit}`, 2, 16); ctx.fillText(`0`, 28, h - 22);
}

function drawRequests(series) {
  const canvas = $("requests-chart");
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  const max = Math.max(1, ...series.map((p) => p.requests));
  axes(ctx, w, h, max, "");
  const step = (w - 50) / series.length;
  series.forEach((p, i) => {
    const x = 45 + i * step;
    const bar = (n) => (n / max) * (h - 40);
    const ok = p.requests - p.errors - p.rate_limited;
    let y = h - 20;
    for (const [n, color] of [[ok, COLORS.ok], [p.rate_limited, COLORS.lim], [p.errors, COLORS.err]]) {
      if (n <= 0) continue;
      ctx.fillStyle = color;
      ctx.fillRect(x, y - bar(n), Math.max(1, step - 2), bar(n));
      y -= bar(n);
    }
    if (series.length <= 31 || i % 3 === 0) {
      ctx.fillStyle = "#556";
      ctx.fillText(label(p.start), x, h - 6);
    }
  });
}

function drawLatency(series) {
  const canvas = $("latency-chart");
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  const values = series.flatMap((p) => [p.latency_ms.p50 || 0, p.latency_ms.p95 || 0]);
  const max = Math.max(1, ...values);
  axes(ctx, w, h, max, " ms");
  const step = (w - 50) / series.length;
  for (const [name, color] of [["p50", COLORS.p50], ["p95", COLORS.p95]]) {
    ctx.strokeStyle = color; ctx.fillStyle = color; ctx.lineWidth = 2;
    ctx.beginPath();
    let started = false;
    series.forEach((p, i) => {
      const v = p.latency_ms[name];
      if (v === null || v === undefined) { started = false; return; }
      const x = 45 + i * step + step / 2, y = h - 20 - (v / max) * (h - 40);
      if (started) ctx.lineTo(x, y); else ctx.moveTo(x, y);
      ctx.fillRect(x - 2, y - 2, 4, 4);
      started = true;
    });
    ctx.stroke();
  }
}

function showUsage(u) {
  const t = u.totals;
  $("totals").textContent = `${t.requests} requests, ${t.items} items, ${t.errors} errors, ` +
    `${t.rate_limited} refused (429); p50 ${t.latency_ms.p50 ?? "-"} ms, p95 ${t.latency_ms.p95 ?? "-"} ms`;
  $("requests-chart").dataset.requests = String(t.requests);
  drawRequests(u.series);
  drawLatency(u.series);
}

async function refresh() {
  try {
    showQuota(await call("/v1/quota"));
    showUsage(await call(usagePath()));
    $("board-error").hidden = true;
  } catch (error) {
    if (error.status === 401) { logout(refusal(error)); return; }
    $("board-error").textContent = refusal(error);
    $("board-error").hidden = false;
  }
}

async function open(event) {
  if (event) event.preventDefault();
  const key = $("key").value.trim();
  if (key) sessionStorage.setItem(KEY, key);
  $("key").value = "";
  try {
    showQuota(await call("/v1/quota"));
  } catch (error) {
    logout(refusal(error));
    return;
  }
  $("login").hidden = true; $("board").hidden = false; $("logout").hidden = false;
  $("login-error").hidden = true;
  await refresh();
  clearInterval(timer);
  timer = setInterval(refresh, REFRESH_MS);
}

function logout(message) {
  clearInterval(timer);
  sessionStorage.removeItem(KEY);
  $("board").hidden = true; $("logout").hidden = true; $("login").hidden = false;
  $("who").textContent = "";
  $("login-error").textContent = message || "";
  $("login-error").hidden = !message;
}

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", open);
  $("logout").addEventListener("click", () => logout(""));
  document.querySelectorAll("[data-range]").forEach((b) => b.addEventListener("click", () => {
    range = b.dataset.range;
    document.querySelectorAll("[data-range]").forEach((o) => o.classList.toggle("active", o === b));
    refresh();
  }));
  if (sessionStorage.getItem(KEY)) open(null);
});
