// pagedllm's web page: chat and completions over the OpenAI API (streamed), and a live map of
// the paged KV cache drawn from GET /kv_cache/blocks. Plain JS, no dependencies, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "pagedllm.apiKey";
const POLL_MS = 250;          // the map's refresh: 4 per second
const CHART_SPAN_S = 300;     // the charts show the last five minutes

const state = {
  apiKey: sessionStorage.getItem(KEY_STORAGE) || "",
  model: null,
  tab: "chat",
  messages: [],               // the chat so far: {role, content}
  chatAbort: null,
  compAbort: null,
  snapshot: null,
  samples: [],                // chart samples: {time, running, waiting, swapped, ...}
  polling: false,
};
window.pagedllm = state;      // for people (and tests) poking at the page

// ---- API key and requests -------------------------------------------------------------------

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.apiKey) h["Authorization"] = "Bearer " + state.apiKey;
  return h;
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function errorOf(response) {
  let message = response.status + " " + response.statusText;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON */ }
  if (response.status === 401) setAuth(state.apiKey ? "refused" : "needed");
  return new ApiError(response.status, message);
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers() });
  if (!response.ok) throw await errorOf(response);
  return response;
}

function setAuth(status, detail) {
  document.body.dataset.auth = status;
  const pill = $("auth-status");
  const banner = $("key-banner");
  const texts = {
    ok: state.apiKey ? "API key accepted" : "connected (no API key needed)",
    needed: "API key required",
    refused: "API key refused",
    unreachable: "server unreachable",
  };
  pill.textContent = texts[status] || status;
  banner.hidden = !(status === "needed" || status === "refused" || status === "unreachable");
  if (status === "needed") {
    $("key-message").textContent =
      "This server requires an API key (pagedllm serve --api-key). Enter it to use the page.";
  } else if (status === "refused") {
    $("key-message").textContent =
      "The server refused this API key (401). Enter the key the server was started with.";
  } else if (status === "unreachable") {
    $("key-message").textContent = "Cannot reach the server: " + (detail || "");
  }
}

async function checkServer() {
  try {
    const body = await (await api("v1/models")).json();
    state.model = body.data && body.data.length ? body.data[0].id : null;
    $("model-name").textContent = state.model || "";
    setAuth("ok");
    return true;
  } catch (error) {
    if (!(error instanceof ApiError)) setAuth("unreachable", String(error));
    return false;
  }
}

$("key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  state.apiKey = $("key-input").value.trim();
  sessionStorage.setItem(KEY_STORAGE, state.apiKey);
  if (await checkServer() && state.tab === "kv") startPolling();
});

// ---- tabs ---------------------------------------------------------------------------------

for (const button of document.querySelectorAll(".tab")) {
  button.addEventListener("click", () => showTab(button.dataset.tab));
}

function showTab(tab) {
  state.tab = tab;
  for (const button of document.querySelectorAll(".tab")) {
    button.classList.toggle("active", button.dataset.tab === tab);
  }
  for (const name of ["chat", "completions", "kv"]) $("panel-" + name).hidden = name !== tab;
  location.hash = tab;
  if (tab === "kv") startPolling();
}

// ---- sampling settings (the same fields on both tabs) -----------------------------------------

const PARAMS = [
  ["temperature", "Temperature", "0.7", "0", "2", "0.05"],
  ["top_p", "Top-p", "1", "0", "1", "0.05"],
  ["max_tokens", "Max tokens", "256", "1", "", "1"],
  ["seed", "Seed (empty: random)", "", "", "", "1"],
];
for (const box of document.querySelectorAll(".params")) {
  const prefix = box.dataset.prefix;
  for (const [name, label, value, min, max, step] of PARAMS) {
    const wrap = document.createElement("label");
    wrap.textContent = label;
    const input = document.createElement("input");
    Object.assign(input, { type: "number", id: prefix + "-" + name, value, step });
    if (min !== "") input.min = min;
    if (max !== "") input.max = max;
    wrap.appendChild(input);
    box.appendChild(wrap);
  }
}

function samplingParams(prefix) {
  const out = {};
  for (const [name] of PARAMS) {
    const raw = $(prefix + "-" + name).value.trim();
    if (raw === "") continue;
    out[name] = name === "max_tokens" || name === "seed" ? parseInt(raw, 10) : parseFloat(raw);
  }
  return out;
}

// ---- streaming ------------------------------------------------------------------------------

// Posts a streaming request and calls onChunk with each parsed SSE payload until [DONE].
async function stream(path, body, signal, onChunk) {
  const response = await fetch(path, {
    method: "POST", headers: headers(), signal,
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
  });
  if (!response.ok) throw await errorOf(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(500, chunk.error.message);
        onChunk(chunk);
      }
    }
  }
}

// Token timing of one answer: tokens/s from the first token to the last.
class Meter {
  constructor() { this.start = performance.now(); this.first = null; this.last = null; this.n = 0; }
  token(count = 1) {
    const now = performance.now();
    if (this.first === null) this.first = now;
    this.last = now;
    this.n += count;
  }
  text(tokens, finish) {
    const n = tokens ?? this.n;
    const parts = [n + " tokens"];
    if (this.first !== null) {
      parts.push("first token " + ((this.first - this.start) / 1000).toFixed(2) + " s");
      const span = (this.last - this.first) / 1000;
      if (n > 1 && span > 0) parts.push(((n - 1) / span).toFixed(1) + " tokens/s");
    }
    if (finish) parts.push(finish);
    return parts.join(" · ");
  }
}

// ---- chat -----------------------------------------------------------------------------------

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("chat-log").appendChild(div);
  $("chat-log").scrollTop = $("chat-log").scrollHeight;
  return div;
}

function setChatBusy(busy) {
  $("chat-send").disabled = busy;
  $("chat-stop").disabled = !busy;
}

async function sendChat() {
  const text = $("chat-input").value.trim();
  if (!text || state.chatAbort) return;
  $("chat-input").value = "";
  addMessage("user", text);
  state.messages.push({ role: "user", content: text });
  const system = $("chat-system").value.trim();
  const messages = system ? [{ role: "system", content: system }, ...state.messages]
                          : state.messages.slice();
  const bubble = addMessage("assistant", "");
  bubble.classList.add("streaming");
  const stats = $("chat-stats");
  const meter = new Meter();
  let answer = "", finish = null, usage = null;
  state.chatAbort = new AbortController();
  setChatBusy(true);
  stats.dataset.state = "streaming";
  stats.textContent = "waiting for the first token…";
  try {
    await stream("v1/chat/completions",
                 { model: state.model, messages, ...samplingParams("chat") },
                 state.chatAbort.signal, (chunk) => {
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const delta = choice.delta || {};
        if (delta.content) {
          answer += delta.content;
          bubble.textContent = answer;
          meter.token();
          stats.textContent = meter.text();
          $("chat-log").scrollTop = $("chat-log").scrollHeight;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    });
    stats.dataset.state = "done";
    stats.textContent = meter.text(usage ? usage.completion_tokens : null,
                                   "finish: " + (finish || "?"));
  } catch (error) {
    if (error.name === "AbortError") {
      stats.dataset.state = "stopped";
      stats.textContent = meter.text(null, "stopped");
    } else {
      stats.dataset.state = "error";
      stats.textContent = "";
      addMessage("error", "Error: " + error.message);
    }
  } finally {
    bubble.classList.remove("streaming");
    state.messages.push({ role: "assistant", content: answer });
    state.chatAbort = null;
    setChatBusy(false);
  }
}

$("chat-form").addEventListener("submit", (event) => { event.preventDefault(); sendChat(); });
$("chat-input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); sendChat(); }
});
$("chat-stop").addEventListener("click", () => state.chatAbort && state.chatAbort.abort());
$("chat-clear").addEventListener("click", () => {
  if (state.chatAbort) state.chatAbort.abort();
  state.messages = [];
  $("chat-log").textContent = "";
  $("chat-stats").textContent = "";
});

// ---- completions ----------------------------------------------------------------------------

async function runCompletion() {
  const prompt = $("comp-prompt").value;
  if (!prompt || state.compAbort) return;
  const stats = $("comp-stats");
  const meter = new Meter();
  let text = "", finish = null, usage = null;
  $("comp-prompt-echo").textContent = prompt;
  $("comp-text").textContent = "";
  state.compAbort = new AbortController();
  $("comp-run").disabled = true;
  $("comp-stop").disabled = false;
  stats.dataset.state = "streaming";
  stats.textContent = "waiting for the first token…";
  try {
    await stream("v1/completions", { model: state.model, prompt, ...samplingParams("comp") },
                 state.compAbort.signal, (chunk) => {
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        if (choice.text) {
          text += choice.text;
          $("comp-text").textContent = text;
          meter.token();
          stats.textContent = meter.text();
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
    });
    stats.dataset.state = "done";
    stats.textContent = meter.text(usage ? usage.completion_tokens : null,
                                   "finish: " + (finish || "?"));
  } catch (error) {
    stats.dataset.state = error.name === "AbortError" ? "stopped" : "error";
    stats.textContent = error.name === "AbortError" ? meter.text(null, "stopped")
                                                    : "Error: " + error.message;
  } finally {
    state.compAbort = null;
    $("comp-run").disabled = false;
    $("comp-stop").disabled = true;
  }
}

$("comp-run").addEventListener("click", runCompletion);
$("comp-stop").addEventListener("click", () => state.compAbort && state.compAbort.abort());

// ---- the KV cache map -----------------------------------------------------------------------

// A color per request, in order of appearance: hues a golden angle apart, so that requests seen
// one after another never look alike.
const colorIndex = new Map();
function requestColor(id) {
  let i = colorIndex.get(id);
  if (i === undefined) {
    if (colorIndex.size > 4096) colorIndex.clear();
    i = colorIndex.size;
    colorIndex.set(id, i);
  }
  return "hsl(" + Math.round((i * 137.508 + 220) % 360) + ", 70%, " + (i % 2 ? 42 : 56) + "%)";
}
const COLORS = { f: "#e9ecf1", c: "#9bd3ae" };

// Cell layout of one canvas: as large as fits `maxHeight` at the canvas's width, 4-28 px.
function layout(canvas, numBlocks, maxHeight) {
  const width = canvas.clientWidth || canvas.width;
  let cell = Math.floor(Math.sqrt((width * maxHeight) / Math.max(numBlocks, 1)));
  cell = Math.max(4, Math.min(28, cell));
  const cols = Math.max(1, Math.floor(width / cell));
  const rows = Math.ceil(numBlocks / cols);
  const ratio = window.devicePixelRatio || 1;
  canvas.width = width * ratio;
  canvas.height = Math.max(rows * cell, cell) * ratio;
  canvas.style.height = Math.max(rows * cell, cell) + "px";
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  return { ctx, cell, cols, numBlocks };
}

function drawPool(canvas, pool, maxHeight) {
  const grid = layout(canvas, pool.num_blocks, maxHeight);
  canvas._grid = grid;
  canvas._pool = pool;
  const { ctx, cell, cols } = grid;
  const gap = cell >= 8 ? 1 : 0;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.font = "600 " + Math.floor(cell * 0.6) + "px system-ui, sans-serif";
  ctx.textAlign = "center";
  ctx.textBaseline = "middle";
  for (let b = 0; b < pool.num_blocks; b++) {
    const x = (b % cols) * cell, y = Math.floor(b / cols) * cell;
    const letter = pool.state[b];
    const s = letter.toLowerCase();   // upper case: in use and holding a hash
    const owners = pool.owners[b];
    ctx.fillStyle = s === "f" || s === "c" ? COLORS[s]
                  : requestColor(owners && owners.length ? owners[0] : "?");
    ctx.fillRect(x, y, cell - gap, cell - gap);
    if (s === "s") {            // shared: hatched, with the reference count when it fits
      ctx.strokeStyle = "rgba(20, 24, 33, 0.8)";
      ctx.lineWidth = 1;
      ctx.beginPath();
      for (let d = 3; d < 2 * cell; d += 4) {
        ctx.moveTo(x + Math.max(0, d - cell), y + Math.min(d, cell - gap));
        ctx.lineTo(x + Math.min(d, cell - gap), y + Math.max(0, d - cell));
      }
      ctx.stroke();
      if (cell >= 12) {
        ctx.fillStyle = "#fff";
        ctx.fillRect(x + cell * 0.2, y + cell * 0.2, cell * 0.6 - gap, cell * 0.6 - gap);
        ctx.fillStyle = "#111";
        ctx.fillText(String(pool.ref_count[b]), x + cell / 2 - gap / 2, y + cell / 2);
      }
    } else if (s === "c" && cell >= 8) {   // cached: a dot, reusable by a prefix hit
      ctx.fillStyle = "#2f7d4a";
      ctx.beginPath();
      ctx.arc(x + cell / 2, y + cell / 2, cell / 6, 0, 2 * Math.PI);
      ctx.fill();
    }
    if (letter !== s && cell >= 8) {   // in use and hashed: a white corner
      ctx.fillStyle = "rgba(255, 255, 255, 0.9)";
      ctx.beginPath();
      ctx.moveTo(x + cell - gap, y);
      ctx.lineTo(x + cell - gap - cell / 3, y);
      ctx.lineTo(x + cell - gap, y + cell / 3);
      ctx.fill();
    }
  }
}

const STATE_NAMES = { f: "free", c: "cached (free, holding a hashed prefix)", o: "owned",
                      s: "shared" };

function describeBlock(pool, b, where) {
  const letter = pool.state[b];
  const lines = [where + " block " + b + ": " + STATE_NAMES[letter.toLowerCase()]];
  lines.push("reference count " + pool.ref_count[b]);
  const owners = pool.owners[b] || [];
  if (owners.length) lines.push("request" + (owners.length > 1 ? "s " : " ") + owners.join(", "));
  const hashed = letter === "c" || letter === "O" || letter === "S";
  lines.push(hashed ? "prefix cache: hashed (a matching prompt reuses it)"
                    : "prefix cache: no hash");
  return lines.join("\n");
}

function attachTooltip(canvas, where) {
  const tip = $("kv-tooltip");
  canvas.addEventListener("mousemove", (event) => {
    const grid = canvas._grid, pool = canvas._pool;
    if (!grid || !pool) return;
    const rect = canvas.getBoundingClientRect();
    const col = Math.floor((event.clientX - rect.left) / grid.cell);
    const row = Math.floor((event.clientY - rect.top) / grid.cell);
    const b = row * grid.cols + col;
    if (col >= grid.cols || b < 0 || b >= pool.num_blocks) { tip.hidden = true; return; }
    tip.textContent = describeBlock(pool, b, where);
    const box = canvas.parentElement.getBoundingClientRect();
    tip.style.left = (event.clientX - box.left + 14) + "px";
    tip.style.top = (event.clientY - box.top + 14) + "px";
    tip.hidden = false;
  });
  canvas.addEventListener("mouseleave", () => { tip.hidden = true; });
}
attachTooltip($("kv-device"), "device");
attachTooltip($("kv-host"), "host");

// Expands the compact layout's maps of the blocks in use to per-block arrays.
function withOwners(pool) {
  if (!pool) return pool;
  const owners = new Array(pool.num_blocks);
  const refCount = new Array(pool.num_blocks).fill(0);
  for (const key in pool.owners) owners[+key] = pool.owners[key];
  for (const key in pool.ref_count) refCount[+key] = pool.ref_count[key];
  return { ...pool, owners, ref_count: refCount };
}

function render(snap) {
  const device = withOwners(snap.device);
  const host = withOwners(snap.host);
  $("kv-count-free").textContent = device.num_free_blocks - device.num_cached_free_blocks;
  $("kv-count-cached").textContent = device.num_cached_free_blocks;
  $("kv-count-owned").textContent = device.num_used_blocks - device.num_shared_blocks;
  $("kv-count-shared").textContent = device.num_shared_blocks;
  $("kv-device-title").textContent = device.num_blocks + " blocks of " + snap.block_size +
    " tokens, " + device.num_used_blocks + " in use, " + device.num_logical_blocks +
    " in block tables";
  drawPool($("kv-device"), device, 420);
  $("kv-host").hidden = !host;
  $("kv-host-none").hidden = !!host;
  if (host) {
    $("kv-host-title").textContent = host.num_blocks + " blocks, " + host.num_used_blocks +
      " in use";
    drawPool($("kv-host"), host, 120);
  } else {
    $("kv-host-title").textContent = "";
  }
  $("kv-updated").textContent = "step " + snap.num_steps + ", " +
    new Date(snap.time * 1000).toLocaleTimeString();
  const body = document.querySelector("#kv-requests tbody");
  body.textContent = "";
  for (const r of snap.requests) {
    const tr = document.createElement("tr");
    const cells = ["", r.id, r.status, r.num_seqs, r.num_device_blocks, r.num_host_blocks,
                   r.num_preemptions];
    cells.forEach((value, i) => {
      const td = document.createElement("td");
      if (i === 0) {
        const sw = document.createElement("i");
        sw.className = "swatch";
        sw.style.background = requestColor(r.id);
        td.appendChild(sw);
      } else {
        td.textContent = value;
      }
      if (i === 1) { td.className = "id"; td.title = r.id; }
      tr.appendChild(td);
    });
    body.appendChild(tr);
  }
}

// ---- charts ---------------------------------------------------------------------------------

function addSample(s) {
  const last = state.samples[state.samples.length - 1];
  if (last && s.time - last.time < 0.9) return;   // one sample a second
  state.samples.push(s);
  const cutoff = s.time - CHART_SPAN_S;
  while (state.samples.length && state.samples[0].time < cutoff) state.samples.shift();
}

function sampleOfStats(time, st) {
  return { time, running: st.num_running, waiting: st.num_waiting, swapped: st.num_swapped,
           preemptions: st.num_preemptions, used: st.num_blocks - st.num_free_blocks,
           blocks: st.num_blocks, queries: st.prefix_cache_queries,
           hits: st.prefix_cache_hits, generated: st.num_generation_tokens };
}

// Per-second rates between consecutive samples of a cumulative field.
function rates(field) {
  const out = [];
  for (let i = 1; i < state.samples.length; i++) {
    const a = state.samples[i - 1], b = state.samples[i];
    const dt = b.time - a.time;
    out.push([b.time, dt > 0 ? Math.max(0, b[field] - a[field]) / dt : 0]);
  }
  return out;
}

function drawChart(canvas, series, colors, fixedMax) {
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || canvas.width, h = canvas.clientHeight || canvas.height;
  canvas.width = w * ratio;
  canvas.height = h * ratio;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const now = Date.now() / 1000;
  let max = fixedMax || 0;
  if (!fixedMax) for (const s of series) for (const [, v] of s) max = Math.max(max, v);
  max = max || 1;
  const x = (t) => w - ((now - t) / CHART_SPAN_S) * w;
  const y = (v) => h - 12 - (v / max) * (h - 18);
  ctx.fillStyle = "#6b7280";
  ctx.font = "10px system-ui, sans-serif";
  ctx.textAlign = "left";
  ctx.fillText(max.toFixed(max < 10 ? 1 : 0), 2, 9);
  ctx.fillText("-" + CHART_SPAN_S / 60 + " min", 2, h - 2);
  ctx.textAlign = "right";
  ctx.fillText("now", w - 2, h - 2);
  series.forEach((points, i) => {
    ctx.strokeStyle = colors[i];
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    points.forEach(([t, v], j) => (j ? ctx.lineTo(x(t), y(v)) : ctx.moveTo(x(t), y(v))));
    ctx.stroke();
  });
}

function drawCharts() {
  const S = state.samples;
  const pick = (f) => S.map((s) => [s.time, f(s)]);
  drawChart($("chart-requests"), [pick((s) => s.running), pick((s) => s.waiting),
                                  pick((s) => s.swapped)], ["#2563eb", "#d97706", "#9333ea"]);
  drawChart($("chart-preemptions"), [rates("preemptions")], ["#b91c1c"]);
  const hitRate = [];
  for (let i = 1; i < S.length; i++) {
    const dq = S[i].queries - S[i - 1].queries;
    if (dq > 0) hitRate.push([S[i].time, (100 * (S[i].hits - S[i - 1].hits)) / dq]);
  }
  drawChart($("chart-hit-rate"), [hitRate], ["#15803d"], 100);
  drawChart($("chart-usage"), [pick((s) => (100 * s.used) / Math.max(s.blocks, 1))],
            ["#2563eb"], 100);
  const throughput = rates("generated");
  drawChart($("chart-throughput"), [throughput], ["#0f766e"]);
  const t = throughput[throughput.length - 1];
  $("kv-throughput").textContent = t && Date.now() / 1000 - t[0] < 3 ? t[1].toFixed(1) : "0";
}

// The numbers beside the map: the snapshot's own stats (the charts sample once a second).
function renderNumbers(st) {
  $("kv-running").textContent = st.num_running;
  $("kv-waiting").textContent = st.num_waiting;
  $("kv-swapped").textContent = st.num_swapped;
  $("kv-preemptions").textContent = st.num_preemptions;
  $("kv-hit-rate").textContent = st.prefix_cache_queries
    ? ((100 * st.prefix_cache_hits) / st.prefix_cache_queries).toFixed(1) + "%" : "–";
  const used = st.num_blocks - st.num_free_blocks;
  $("kv-usage").textContent = ((100 * used) / Math.max(st.num_blocks, 1)).toFixed(1) + "%";
}

// ---- polling (only while the KV tab is shown) ----------------------------------------------

async function loadHistory() {
  const body = await (await api("kv_cache/history")).json();
  const index = Object.fromEntries(body.fields.map((f, i) => [f, i]));
  const stats = (row) => Object.fromEntries(body.fields.map((f) => [f, row[index[f]]]));
  for (const row of body.samples) {
    const st = stats(row);
    addSample(sampleOfStats(st.time, { ...st,
      num_free_blocks: st.num_blocks - st.num_used_blocks }));
  }
}

async function startPolling() {
  if (state.polling || document.body.dataset.auth !== "ok") return;
  state.polling = true;
  try {
    if (!state.samples.length) await loadHistory();
    while (state.tab === "kv" && document.body.dataset.auth === "ok") {
      const started = performance.now();
      const snap = await (await api("kv_cache/blocks")).json();
      state.snapshot = snap;
      render(snap);
      renderNumbers(snap.stats);
      addSample(sampleOfStats(snap.time, snap.stats));
      drawCharts();
      await new Promise((r) => setTimeout(r, Math.max(0, POLL_MS - (performance.now() - started))));
    }
  } catch (error) {
    if (!(error instanceof ApiError)) setAuth("unreachable", String(error));
    $("kv-updated").textContent = "update failed: " + error.message;
  } finally {
    state.polling = false;
  }
}

// ---- start ----------------------------------------------------------------------------------

(async () => {
  const tab = location.hash.slice(1);
  const ok = await checkServer();
  showTab(["chat", "completions", "kv"].includes(tab) ? tab : "chat");
  if (!ok && state.tab === "kv") $("kv-updated").textContent = "waiting for an API key";
})();
