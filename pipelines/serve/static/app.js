// instdiff web page: calls the HTTP API v1 of the same server (JSON, base64 PNG images).
// Plain browser JavaScript, no dependencies and no build step, so the page works offline.
"use strict";

const state = {
  inputB64: null, // the input image as base64 (no data: prefix)
  session: null, // {id, prompt, imageB64, generateSeconds}
};

const $ = (id) => document.getElementById(id);

// ---- API -----------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(message, status = 0) {
    super(message);
    this.status = status; // the HTTP status, 0 when no answer came
  }
}

// A readable one-line message for a failed response: the API's {"error": {"code", "message"}}, FastAPI's
// {"detail": ...}, or the status line.
function errorMessage(status, statusText, body, retryAfter) {
  let msg = "";
  let code = "";
  if (body && typeof body === "object") {
    if (body.error && typeof body.error === "object") {
      msg = String(body.error.message || "");
      code = String(body.error.code || "");
    } else if (typeof body.detail === "string") {
      msg = body.detail;
    } else if (Array.isArray(body.detail)) {
      msg = body.detail.map((d) => `${(d.loc || []).join(".")}: ${d.msg}`).join("; ");
    }
  }
  if (!msg) msg = statusText || "request failed";
  let text = `${msg} (HTTP ${status}${code ? `, ${code}` : ""})`;
  if (retryAfter) text += ` Retry after ${retryAfter} s.`;
  return text;
}

async function api(method, path, body) {
  const init = { method, headers: { Accept: "application/json" } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    throw new ApiError(`Could not reach the server (${e.message}).`);
  }
  let data = null;
  const text = await resp.text();
  try {
    data = text ? JSON.parse(text) : null;
  } catch (e) {
    data = null;
  }
  if (!resp.ok) {
    const retry = resp.headers.get("Retry-After");
    throw new ApiError(errorMessage(resp.status, resp.statusText, data, retry), resp.status);
  }
  if (data === null || typeof data !== "object") {
    throw new ApiError(`The server sent a response that is not JSON (HTTP ${resp.status}).`);
  }
  return data;
}

// ---- small helpers -------------------------------------------------------------------------------

function showError(message) {
  const el = $("error");
  el.textContent = message;
  el.hidden = !message;
  if (message) el.scrollIntoView({ block: "nearest" });
}

function dataUrl(b64) {
  return b64.startsWith("data:") ? b64 : `data:image/png;base64,${b64}`;
}

function stripDataUrl(url) {
  const i = url.indexOf("base64,");
  return i >= 0 ? url.slice(i + 7) : url;
}

function formatSeconds(s) {
  if (typeof s !== "number" || !isFinite(s)) return "–";
  if (s < 1) return `${(s * 1000).toFixed(s < 0.01 ? 2 : 0)} ms`;
  return `${s.toFixed(2)} s`;
}

function formatNumber(x, digits = 2) {
  if (typeof x !== "number" || !isFinite(x)) return String(x);
  return Number.isInteger(x) ? String(x) : x.toFixed(digits);
}

// Run an async action with its button disabled and the busy state announced.
async function busy(button, label, action) {
  const old = button.textContent;
  button.disabled = true;
  button.textContent = label;
  document.body.setAttribute("aria-busy", "true");
  showError("");
  try {
    await action();
  } catch (e) {
    showError(e instanceof ApiError ? e.message : `Unexpected error: ${e.message}`);
  } finally {
    button.disabled = false;
    button.textContent = old;
    document.body.removeAttribute("aria-busy");
  }
}

// Form number fields: only those the user filled in, as numbers.
function numberFields(pairs) {
  const out = {};
  for (const [key, id, parse] of pairs) {
    const v = $(id).value.trim();
    if (v === "") continue;
    const n = parse(v);
    if (Number.isNaN(n)) throw new ApiError(`${key}: "${v}" is not a number.`);
    out[key] = n;
  }
  return out;
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the image could not be decoded"));
    img.src = src;
  });
}

function setImage(id, src) {
  return new Promise((resolve) => {
    const img = $(id);
    img.onload = () => resolve(img);
    img.onerror = () => resolve(img);
    img.src = src;
  });
}

// The base image with the mask drawn over it: "tint" (masked pixels tinted red) or "outline" (the mask's
// boundary in red). Returns a PNG data URL at the base image's size.
async function maskComposite(baseSrc, maskSrc, mode) {
  const [base, mask] = await Promise.all([loadImage(baseSrc), loadImage(maskSrc)]);
  const w = base.naturalWidth;
  const h = base.naturalHeight;
  const canvas = document.createElement("canvas");
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(mask, 0, 0, w, h);
  const m = ctx.getImageData(0, 0, w, h).data;
  const on = new Uint8Array(w * h);
  for (let i = 0; i < w * h; i++) on[i] = m[4 * i] > 127 ? 1 : 0;
  ctx.drawImage(base, 0, 0, w, h);
  const img = ctx.getImageData(0, 0, w, h);
  const p = img.data;
  const red = (i, a) => {
    p[4 * i] = Math.round(p[4 * i] * (1 - a) + 255 * a);
    p[4 * i + 1] = Math.round(p[4 * i + 1] * (1 - a));
    p[4 * i + 2] = Math.round(p[4 * i + 2] * (1 - a));
  };
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const i = y * w + x;
      if (!on[i]) continue;
      if (mode === "tint") {
        red(i, 0.5);
      } else {
        const edge =
          x === 0 || y === 0 || x === w - 1 || y === h - 1 ||
          !on[i - 1] || !on[i + 1] || !on[i - w] || !on[i + w];
        if (edge) red(i, 1);
      }
    }
  }
  ctx.putImageData(img, 0, 0);
  return canvas.toDataURL("image/png");
}

// ---- stats tables --------------------------------------------------------------------------------

function table(caption, rows) {
  const t = document.createElement("table");
  const c = document.createElement("caption");
  c.textContent = caption;
  t.appendChild(c);
  for (const [k, v] of rows) {
    const tr = t.insertRow();
    const th = document.createElement("th");
    th.scope = "row";
    th.textContent = k;
    tr.appendChild(th);
    tr.insertCell().textContent = v;
  }
  return t;
}

function timingRows(timings) {
  if (!timings || typeof timings !== "object") return [];
  return Object.entries(timings).map(([k, v]) => [k.replace(/_/g, " "), formatSeconds(v)]);
}

function warningsList(warnings) {
  if (!Array.isArray(warnings) || !warnings.length) return null;
  const box = document.createElement("div");
  box.className = "warnings";
  const h = document.createElement("p");
  h.textContent = "Warnings:";
  box.appendChild(h);
  const ul = document.createElement("ul");
  for (const w of warnings) {
    const li = document.createElement("li");
    li.textContent = typeof w === "string" ? w : JSON.stringify(w);
    ul.appendChild(li);
  }
  box.appendChild(ul);
  return box;
}

function parametersBlock(params) {
  if (!params || typeof params !== "object") return null;
  const d = document.createElement("details");
  const s = document.createElement("summary");
  s.textContent = "Every parameter used";
  d.appendChild(s);
  const pre = document.createElement("pre");
  pre.textContent = JSON.stringify(params, null, 2);
  d.appendChild(pre);
  return d;
}

function fill(container, nodes) {
  container.replaceChildren(...nodes.filter(Boolean));
}

// ---- input image ---------------------------------------------------------------------------------

async function setInput(b64, caption) {
  state.inputB64 = stripDataUrl(b64);
  const img = await setImage("input-img", dataUrl(b64));
  $("input-caption").textContent = `${caption} (${img.naturalWidth} × ${img.naturalHeight} px)`;
  $("input-figure").hidden = false;
  $("edit-run").disabled = false;
  $("edit-hint").textContent = "";
}

function onUpload(ev) {
  const file = ev.target.files && ev.target.files[0];
  if (!file) return;
  showError("");
  const reader = new FileReader();
  reader.onload = async () => {
    try {
      await loadImage(reader.result);
    } catch (e) {
      showError(`${file.name}: the browser cannot read this file as an image.`);
      return;
    }
    await setInput(reader.result, `Uploaded: ${file.name}`);
  };
  reader.onerror = () => showError(`${file.name}: the file could not be read.`);
  reader.readAsDataURL(file);
}

async function onGenerate(ev) {
  ev.preventDefault();
  await busy($("gen-run"), "Generating…", async () => {
    const prompt = $("gen-prompt").value;
    const body = {
      prompt,
      ...numberFields([
        ["seed", "gen-seed", (v) => Number(v)],
        ["steps", "gen-steps", (v) => Number(v)],
      ]),
    };
    const t0 = performance.now();
    const r = await api("POST", "/v1/sessions", body);
    const seconds = (r.timings && r.timings.total) || (performance.now() - t0) / 1000;
    if (state.session && state.session.id !== r.session_id) endSession(true, true);
    state.session = { id: r.session_id, prompt, imageB64: r.image, generateSeconds: seconds };
    await setInput(r.image, `Generated from "${prompt}"`);
    if (!$("edit-source").value) $("edit-source").value = prompt;
    $("session-id").textContent = r.session_id;
    $("session-prompt").value = prompt;
    $("session-form").hidden = false;
    $("session-hint").hidden = true;
    $("session-result").hidden = true;
  });
}

// ---- one-shot edit -------------------------------------------------------------------------------

async function onEdit(ev) {
  ev.preventDefault();
  if (!state.inputB64) {
    showError("Upload or generate an input image first.");
    return;
  }
  await busy($("edit-run"), "Editing…", async () => {
    const sent = state.inputB64; // the input of this request, even if another is chosen meanwhile
    const body = {
      image: sent,
      target_prompt: $("edit-target").value,
      method: $("edit-method").value,
      ...numberFields([
        ["steps", "edit-steps", (v) => Number(v)],
        ["seed", "edit-seed", (v) => Number(v)],
        ["strength", "edit-strength", (v) => Number(v)],
        ["guidance_scale", "edit-guidance", (v) => Number(v)],
      ]),
    };
    const source = $("edit-source").value;
    if (source.trim()) body.source_prompt = source;
    const t0 = performance.now();
    const r = await api("POST", "/v1/edits", body);
    const wall = (performance.now() - t0) / 1000;
    const input = dataUrl(sent);
    await setImage("edit-input-img", input);
    const out = await setImage("edit-output-img", dataUrl(r.image));
    await setImage("edit-overlay-img", r.mask ? await maskComposite(input, dataUrl(r.mask), "tint") : input);
    const rows = [
      ["Method", String(r.method ?? body.method)],
      ["Seed", String(r.seed ?? "–")],
      ["UNet calls", formatNumber(r.unet_calls)],
      ["Size", `${out.naturalWidth} × ${out.naturalHeight} px`],
    ];
    if (typeof r.mask_area === "number") rows.push(["Edited area", `${(100 * r.mask_area).toFixed(1)} % of the image`]);
    rows.push(["Round trip (page)", formatSeconds(wall)]);
    fill($("edit-stats"), [
      table("Result", rows),
      table("Timings", timingRows(r.timings)),
      warningsList(r.warnings),
      parametersBlock(r.parameters),
    ]);
    $("edit-result").hidden = false;
  });
}

// ---- session edit --------------------------------------------------------------------------------

// Seconds a full regeneration takes: the server's figure (the session's generation time) when it sends one, else
// the generation time the page saw.
function fullSeconds(r) {
  return typeof r.regenerate_seconds === "number" ? r.regenerate_seconds : state.session.generateSeconds;
}

async function onSessionEdit(ev) {
  ev.preventDefault();
  const s = state.session;
  if (!s) return;
  await busy($("session-run"), "Recomputing…", async () => {
    const prompt = $("session-prompt").value;
    const t0 = performance.now();
    let r;
    try {
      r = await api("POST", `/v1/sessions/${encodeURIComponent(s.id)}/edits`, { prompt });
    } catch (e) {
      if (e instanceof ApiError && e.status === 404) {
        // the server no longer holds the session (expired, evicted, deleted): start over
        endSession(false);
        throw new ApiError(`${e.message} Generate an image (section 1) to start a new session.`, 404);
      }
      throw e;
    }
    const wall = (performance.now() - t0) / 1000;
    const editSeconds = typeof r.seconds === "number" ? r.seconds : (r.timings && r.timings.total) || wall;
    const before = dataUrl(s.imageB64);
    const after = dataUrl(r.image);
    await setImage("session-before-img", before);
    await setImage("session-after-img", after);
    await setImage("session-outline-img", r.mask ? await maskComposite(after, dataUrl(r.mask), "outline") : after);
    const full = fullSeconds(r);
    const speedup = typeof r.speedup === "number" ? r.speedup : full && editSeconds ? full / editSeconds : null;
    const rows = [
      ["Prompt", `"${s.prompt}" → "${prompt}"`],
      ["Edit time", formatSeconds(editSeconds)],
      ["Full regeneration", formatSeconds(full)],
      ["Speed-up", speedup ? `${speedup.toFixed(2)}× faster than regenerating` : "–"],
      ["Round trip (page)", formatSeconds(wall)],
    ];
    if (typeof r.active_fraction === "number") {
      rows.push(["Recomputed area", `${(100 * r.active_fraction).toFixed(1)} % of the image`]);
    }
    if (typeof r.unet_macs_ratio === "number") {
      // dense MACs ÷ computed MACs of one sparse UNet step
      rows.push(["UNet work per sparse step", `${r.unet_macs_ratio.toFixed(2)}× less than dense`]);
    }
    if (r.unet_calls !== undefined) rows.push(["UNet calls", formatNumber(r.unet_calls)]);
    if (typeof r.edits === "number") rows.push(["Edits in this session", String(r.edits)]);
    fill($("session-stats"), [table("Session edit", rows), table("Timings", timingRows(r.timings)), warningsList(r.warnings)]);
    $("session-result").hidden = false;
    s.prompt = prompt;
    s.imageB64 = r.image;
  });
}

// Forget the page's session; callServer: also delete it on the server (quiet: ignore a failure, e.g. when the
// server already expired it).
function endSession(callServer, quiet = false) {
  const s = state.session;
  state.session = null;
  $("session-form").hidden = true;
  $("session-result").hidden = true;
  $("session-hint").hidden = false;
  if (s && callServer) {
    api("DELETE", `/v1/sessions/${encodeURIComponent(s.id)}`).catch((e) => quiet || showError(e.message));
  }
}

// ---- server status -------------------------------------------------------------------------------

function modelList(r) {
  if (Array.isArray(r)) return r;
  if (Array.isArray(r.models)) return r.models;
  if (Array.isArray(r.data)) return r.data;
  return [r];
}

async function loadServerInfo() {
  const el = $("server");
  const parts = [];
  try {
    await api("GET", "/healthz");
    parts.push("Server ready.");
  } catch (e) {
    parts.push(`Server not ready: ${e.message}`);
  }
  try {
    const m = modelList(await api("GET", "/v1/models"))[0] || {};
    const name = m.name || m.id;
    if (name) parts.push(`Model: ${name}${m.resolution ? ` (${m.resolution} px)` : ""}.`);
    const note = m.vocabulary_note || m.vocabulary;
    if (typeof note === "string" && note) parts.push(note);
    const d = m.defaults || {};
    if (typeof d.steps === "number") {
      for (const id of ["gen-steps", "edit-steps"]) $(id).placeholder = `default: ${d.steps}`;
    }
    if (typeof d.guidance_scale === "number") $("edit-guidance").placeholder = `default: ${d.guidance_scale}`;
    if (Array.isArray(m.methods) && m.methods.length) {
      const sel = $("edit-method");
      const known = new Set([...sel.options].map((o) => o.value));
      for (const meth of m.methods) {
        const v = typeof meth === "string" ? meth : meth && meth.name;
        if (v && !known.has(v)) sel.add(new Option(v, v));
      }
    }
  } catch (e) {
    parts.push(`Models unavailable: ${e.message}`);
  }
  el.textContent = parts.join(" ");
}

document.addEventListener("DOMContentLoaded", () => {
  $("upload-file").addEventListener("change", onUpload);
  $("generate-form").addEventListener("submit", onGenerate);
  $("edit-form").addEventListener("submit", onEdit);
  $("session-form").addEventListener("submit", onSessionEdit);
  $("session-end").addEventListener("click", () => endSession(true));
  loadServerInfo();
});
