// icma's page: every action is a call to the worker's public API (the same as curl).
"use strict";

const CONFIG = JSON.parse(document.getElementById("icma-config").textContent);
const KEY = "icma-api-key"; // sessionStorage: gone when the tab closes
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
let adapterList = null;

// --- the API ------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message, field) {
    super(message);
    this.status = status; this.code = code; this.field = field;
  }
  describe() {
    // Validation errors already name their field at the front of the message.
    if (!this.field || this.message.toLowerCase().startsWith(this.field.toLowerCase())) return this.message;
    return `${this.field}: ${this.message}`;
  }
}

async function api(path, { method = "GET", body, form, signal, raw = false } = {}) {
  const headers = {};
  const key = sessionStorage.getItem(KEY);
  if (key) headers.Authorization = "Bearer " + key;
  let payload;
  if (body !== undefined) { headers["Content-Type"] = "application/json"; payload = JSON.stringify(body); }
  else if (form !== undefined) payload = form;
  let res;
  try {
    res = await fetch(path, { method, headers, body: payload, signal });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "network", `the worker did not answer (${err.message})`);
  }
  if (!res.ok) {
    let detail = {};
    try { detail = (await res.json()).error || {}; } catch (_) { /* not our JSON */ }
    const err = new ApiError(res.status, detail.code || `http_${res.status}`,
      detail.message || res.statusText || `HTTP ${res.status}`, detail.field);
    if (res.status === 401) askForKey(err.message);
    throw err;
  }
  return raw ? res : res.json();
}

// --- small helpers ------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function showError(box, err) {
  box.textContent = err instanceof ApiError ? err.describe() : String(err.message || err);
  box.hidden = false;
}

function clearError(box) { box.hidden = true; box.textContent = ""; }

function ms(v) { return v >= 1000 ? `${(v / 1000).toFixed(1)} s` : `${Math.round(v)} ms`; }

function fmt(v) { return typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toFixed(3)) : String(v); }

// --- structure drawings -------------------------------------------------------------------

const drawings = new Map(); // request key -> {url, info}; a page asks for the same ones again

async function drawInto(figure, smiles, reference, label, signal) {
  figure.replaceChildren(el("span", { class: "drawing-wait", text: "drawing…" }));
  const key = JSON.stringify([smiles, reference || null]);
  try {
    let entry = drawings.get(key);
    if (!entry) {
      const res = await api("/v1/depict", { method: "POST", raw: true, signal,
        body: reference ? { smiles, reference } : { smiles } });
      const svg = await res.text();
      // An <img> of a blob: the drawing can show but never run anything.
      entry = { url: URL.createObjectURL(new Blob([svg], { type: "image/svg+xml" })), info: {
        heavy: Number(res.headers.get("X-Heavy-Atoms")),
        shared: res.headers.get("X-Shared-Atoms") === null ? null : Number(res.headers.get("X-Shared-Atoms")),
        complete: res.headers.get("X-MCS-Complete") !== "false" } };
      drawings.set(key, entry);
    }
    figure.replaceChildren(el("img", { src: entry.url, alt: label, width: 320, height: 240 }));
    return entry.info;
  } catch (err) {
    if (err.name === "AbortError") throw err;
    figure.replaceChildren(el("span", { class: "drawing-wait", text: `no drawing: ${err instanceof ApiError ? err.describe() : err.message}` }));
    return null;
  }
}

// --- tabs ---------------------------------------------------------------------------------

const tabs = [...document.querySelectorAll('[role="tab"]')];

function selectTab(tab, focus = false) {
  for (const t of tabs) {
    const on = t === tab;
    t.setAttribute("aria-selected", on ? "true" : "false");
    t.tabIndex = on ? 0 : -1;
    document.getElementById(t.getAttribute("aria-controls")).hidden = !on;
  }
  if (focus) tab.focus();
  const name = tab.id.replace("tab-", "");
  if (location.hash !== "#" + name) history.replaceState(null, "", "#" + name);
  if (name === "models" && !keyDialog.open) refreshModels();
}

tabs.forEach((tab, i) => {
  tab.addEventListener("click", () => selectTab(tab));
  tab.addEventListener("keydown", (e) => {
    const step = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
    if (step) selectTab(tabs[(i + step + tabs.length) % tabs.length], true);
    if (e.key === "Home") selectTab(tabs[0], true);
    if (e.key === "End") selectTab(tabs[tabs.length - 1], true);
  });
});

// Links to #batch (and back and forward) switch views without a reload.
window.addEventListener("hashchange", () => {
  const tab = tabs.find((t) => "#" + t.id.replace("tab-", "") === location.hash);
  if (tab && tab.getAttribute("aria-selected") !== "true") selectTab(tab);
});

// --- the API key --------------------------------------------------------------------------

const keyDialog = document.getElementById("key-dialog");

function askForKey(reason) {
  if (keyDialog.open) return;
  document.getElementById("key-reason").textContent = reason
    ? `The worker said: ${reason}. The key is kept in this browser tab only.`
    : "The key is kept in this browser tab only and sent with each call.";
  document.getElementById("key-input").value = sessionStorage.getItem(KEY) || "";
  keyDialog.showModal();
}

document.getElementById("key-button").addEventListener("click", () => askForKey());
keyDialog.addEventListener("close", () => {
  const input = document.getElementById("key-input");
  if (keyDialog.returnValue === "save" && input.value.trim()) sessionStorage.setItem(KEY, input.value.trim());
  if (keyDialog.returnValue === "forget") sessionStorage.removeItem(KEY);
  input.value = "";
  updateKeyButton();
  if (!document.getElementById("view-models").hidden) refreshModels();
  else loadAdapters();
});

function updateKeyButton() {
  const b = document.getElementById("key-button");
  b.textContent = sessionStorage.getItem(KEY) ? "API key ✓" : "API key";
}

// --- settings -----------------------------------------------------------------------------

function fillSelect(select, options, selected) {
  select.replaceChildren(...options.map(([value, label]) => el("option", { value, text: label, selected: value === selected })));
}

function setupSettings(form, task) {
  const spec = CONFIG.tasks[task];
  const shots = form.querySelector('[name="n_shot"]');
  if (shots) shots.placeholder = String(spec.n_shot);
  const method = form.querySelector('[name="method"]');
  if (method) fillSelect(method, [["", `default (${spec.default_method})`], ...spec.methods.map((m) => [m, m])], "");
  fillSelect(form.querySelector('[name="decoding"]'),
    [["", "default (the adapter's, else ICMA's sampling)"], ...CONFIG.decodings.map((d) => [d, d])], "");
}

async function loadAdapters() {
  try {
    adapterList = await api("/v1/adapters");
  } catch (err) {
    adapterList = null;
  }
  for (const select of document.querySelectorAll('select[name="adapter"]')) {
    const view = select.closest("[data-task]");
    const taskSelect = select.form && select.form.querySelector('[name="task"]');
    const task = view ? view.dataset.task : taskSelect.value;
    const def = adapterList && adapterList.defaults[task];
    const options = [["", `default (${def || "base model"})`], ["base", "base model (untuned)"]];
    for (const a of (adapterList ? adapterList.adapters : [])) {
      if (!a.task || a.task === task) options.push([a.name, a.name]);
    }
    fillSelect(select, options, select.value || "");
  }
}

function requestOptions(form, task) {
  const opts = {};
  const shots = form.querySelector('[name="n_shot"]');
  if (shots && shots.value !== "") opts.n_shot = Number(shots.value);
  const method = form.querySelector('[name="method"]');
  if (method && method.value) opts.retrieval = { method: method.value };
  const decoding = form.querySelector('[name="decoding"]').value;
  if (decoding) opts.generation = { decoding };
  const adapter = form.querySelector('[name="adapter"]').value;
  if (adapter) opts.adapter = adapter;
  const tries = form.querySelector('[name="num_candidates"]');
  if (task === "cap2mol" && tries && tries.value !== "" && Number(tries.value) !== 1) opts.num_candidates = Number(tries.value);
  return opts;
}

// --- translation views --------------------------------------------------------------------

function setupTranslateView(view) {
  const task = view.dataset.task;
  const form = view.querySelector("form");
  const input = form.querySelector('[name="query"]');
  const error = view.querySelector('[data-testid="error"]');
  const cancel = view.querySelector(".cancel");
  const submit = form.querySelector('[type="submit"]');
  const busy = view.querySelector(".busy");
  let running = null;
  setupSettings(form, task);

  for (const chip of form.querySelectorAll(".chip")) {
    chip.addEventListener("click", () => { input.value = chip.dataset.value; input.focus(); });
  }
  if (task === "cap2mol") {
    input.addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) form.requestSubmit(); });
  }
  cancel.addEventListener("click", () => running && running.abort());

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    clearError(error);
    const query = input.value.trim();
    if (!query) {
      showError(error, new ApiError(422, "empty", task === "mol2cap" ? "enter a SMILES" : "enter a caption", CONFIG.tasks[task].query));
      input.focus();
      return;
    }
    if (running) running.abort();
    // The last answer goes: under a new query (or its error) it would read as this one's.
    view.querySelector(".result").hidden = true;
    view.querySelector(".cards-title").hidden = true;
    view.querySelector(".cards").replaceChildren();
    const controller = new AbortController();
    running = controller;
    busy.hidden = false; cancel.hidden = false; submit.disabled = true;
    input.setAttribute("aria-invalid", "false");
    try {
      const out = await api("/" + task, { method: "POST", signal: controller.signal,
        body: { [CONFIG.tasks[task].query]: query, ...requestOptions(form, task) } });
      await render(view, task, query, out, controller.signal);
    } catch (err) {
      if (err.name === "AbortError") {
        showError(error, new Error("Cancelled. (The worker still finishes the answer it started; nothing is kept.)"));
      } else {
        showError(error, err);
        if (err.field && err.field.includes(CONFIG.tasks[task].query)) input.setAttribute("aria-invalid", "true");
      }
    } finally {
      if (running === controller) running = null;
      busy.hidden = true; cancel.hidden = true; submit.disabled = false;
    }
  });
}

function metaLine(out) {
  const t = out.timings;
  // The nearest-neighbour engine has no model to adapt: it answers with the best example's.
  const adapter = out.engine === "nearest-neighbour" ? "the best example's answer"
    : out.adapter ? `adapter ${out.adapter}` : "base model";
  const used = `${out.examples.length} example${out.examples.length === 1 ? "" : "s"}` +
    (out.n_examples_dropped ? ` (${out.n_examples_dropped} dropped for length)` : "");
  return [`${out.engine} · ${out.model} · ${adapter}`, used,
    `retrieval ${ms(t.retrieval_ms)} · generation ${ms(t.generation_ms)} · total ${ms(t.total_ms)}`,
    `${out.usage.prompt_tokens} prompt + ${out.usage.completion_tokens} answer tokens` +
    (out.finish_reason === "length" ? " (cut at the length limit)" : "")].join(" · ");
}

async function render(view, task, query, out, signal) {
  const result = view.querySelector(".result");
  const cards = view.querySelector(".cards");
  result.hidden = false;
  view.querySelector('[data-testid="meta"]').textContent = metaLine(out);
  let reference = null;
  if (task === "mol2cap") {
    view.querySelector('[data-testid="caption-output"]').textContent = out.caption || "(no caption)";
    reference = query;
    drawInto(view.querySelector(".query-drawing"), query, null, `the query molecule ${query}`, signal).catch(() => {});
  } else {
    const badge = view.querySelector('[data-testid="validity"]');
    badge.textContent = out.valid ? "valid molecule" : "not a valid molecule (RDKit cannot read it)";
    badge.className = "badge " + (out.valid ? "ok" : "bad");
    view.querySelector('[data-testid="smiles-output"]').textContent = out.smiles || "(empty)";
    view.querySelector('[data-testid="canonical-output"]').textContent = out.canonical_smiles || "—";
    const figure = view.querySelector('[data-testid="structure-output"]');
    if (out.valid) {
      reference = out.canonical_smiles;
      drawInto(figure, out.canonical_smiles, null, `the generated molecule ${out.canonical_smiles}`, signal).catch(() => {});
    } else {
      figure.replaceChildren(el("span", { class: "drawing-wait", text: "nothing to draw" }));
    }
    view.querySelector('[data-testid="meta"]').textContent +=
      ` · ${out.candidates_tried} candidate${out.candidates_tried === 1 ? "" : "s"} tried`;
  }
  view.querySelector(".cards-title").hidden = out.examples.length === 0;
  cards.replaceChildren(...out.examples.map((ex) => exampleCard(task, ex, reference, signal)));
}

function exampleCard(task, ex, reference, signal) {
  const figure = el("figure", { class: "drawing" });
  const shared = el("p", { class: "shared note" });
  const link = ex.cid ? el("a", { href: `https://pubchem.ncbi.nlm.nih.gov/compound/${encodeURIComponent(ex.cid)}`,
    target: "_blank", rel: "noopener noreferrer", text: `CID ${ex.cid}` }) : el("span", { text: "no CID" });
  const card = el("article", { class: "card", "data-testid": "example-card" },
    el("header", {}, el("span", { class: "rank", text: `#${ex.rank}` }), link,
      el("span", { class: "score", title: "similarity to the query", text: `score ${ex.score.toFixed(3)}` })),
    figure, shared,
    el("p", { class: "caption", text: ex.description }),
    el("code", { class: "smiles", text: ex.smiles }));
  drawInto(figure, ex.smiles, reference, `example ${ex.rank}, CID ${ex.cid}`, signal).then((info) => {
    if (info && info.shared !== null) {
      shared.textContent = `shares ${info.shared} of its ${info.heavy} atoms with the ${task === "mol2cap" ? "query" : "answer"}` +
        (info.complete ? "" : " (search stopped at its time limit)");
    }
  }).catch(() => {});
  return card;
}

// --- batch --------------------------------------------------------------------------------

const batch = document.getElementById("view-batch");
const batchForm = document.getElementById("batch-form");
let currentJob = null;
let jobTimer = null;

fillSelect(batchForm.querySelector('[name="decoding"]'), [["", "default (the adapter's, else ICMA's sampling)"], ...CONFIG.decodings.map((d) => [d, d])], "");
batchForm.querySelector('[name="task"]').addEventListener("change", loadAdapters);

batchForm.addEventListener("submit", async (e) => {
  e.preventDefault();
  const error = batchForm.querySelector('[data-testid="error"]');
  clearError(error);
  const file = batchForm.querySelector('[name="file"]').files[0];
  if (!file) { showError(error, new ApiError(422, "missing", "choose a file of inputs", "file")); return; }
  const options = {};
  const decoding = batchForm.querySelector('[name="decoding"]').value;
  if (decoding) options.generation = { decoding };
  const adapter = batchForm.querySelector('[name="adapter"]').value;
  if (adapter) options.adapter = adapter;
  const form = new FormData();
  form.append("task", batchForm.querySelector('[name="task"]').value);
  form.append("options", JSON.stringify(options));
  form.append("file", file, file.name);
  try {
    const job = await api("/v1/jobs/upload", { method: "POST", form });
    followJob(job);
  } catch (err) { showError(error, err); }
});

function followJob(job) {
  currentJob = job;
  const box = batch.querySelector(".job");
  box.hidden = false;
  box.querySelector(".job-id").textContent = job.id;
  box.querySelector(".metrics").hidden = true;
  showJob(job);
  clearInterval(jobTimer);
  jobTimer = setInterval(async () => {
    try {
      const now = await api(`/v1/jobs/${encodeURIComponent(currentJob.id)}`);
      showJob(now);
    } catch (err) { showError(batchForm.querySelector('[data-testid="error"]'), err); clearInterval(jobTimer); }
  }, 700);
}

function showJob(job) {
  currentJob = job;
  const box = batch.querySelector(".job");
  const pct = Math.round(job.progress * 100);
  box.querySelector("progress").value = pct;
  box.querySelector("progress").textContent = `${pct}%`;
  const failed = job.failed ? `, ${job.failed} with an error` : "";
  box.querySelector(".job-status").textContent =
    `${job.state}: ${job.done} of ${job.total} done (${pct}%)${failed}` + (job.message ? ` · ${job.message}` : "");
  const done = TERMINAL.has(job.state);
  box.querySelector(".job-cancel").disabled = done;
  box.querySelector(".job-jsonl").disabled = job.done === 0;
  box.querySelector(".job-csv").disabled = job.done === 0;
  if (done) {
    clearInterval(jobTimer);
    showMetrics(job);
  }
}

async function showMetrics(job) {
  const panel = batch.querySelector(".metrics");
  try {
    const m = await api(`/v1/jobs/${encodeURIComponent(job.id)}/metrics`);
    const rows = Object.entries(m.metrics).filter(([k, v]) => typeof v === "number" && k !== "n");
    panel.replaceChildren(el("h3", { text: `MolT5 metrics over ${m.scored} of ${m.total} inputs with a reference` }),
      el("table", {}, el("tbody", {}, ...rows.map(([k, v]) => el("tr", {}, el("th", { scope: "row", text: k }), el("td", { text: fmt(v) }))))));
    panel.hidden = false;
  } catch (err) {
    // 409 on field "reference": the file had none; nothing to show.
    panel.hidden = !(err instanceof ApiError && err.field !== "reference");
    if (!panel.hidden) panel.replaceChildren(el("p", { class: "error", text: err.describe() }));
  }
}

batch.querySelector(".job-cancel").addEventListener("click", async () => {
  if (!currentJob) return;
  try { showJob(await api(`/v1/jobs/${encodeURIComponent(currentJob.id)}`, { method: "DELETE" })); }
  catch (err) { showError(batchForm.querySelector('[data-testid="error"]'), err); }
});

async function resultLines(job) {
  const res = await api(`/v1/jobs/${encodeURIComponent(job.id)}/results?follow=false`, { raw: true });
  return (await res.text()).split("\n").filter((l) => l.trim());
}

function save(name, text, type) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const a = el("a", { href: url, download: name });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

function csvCell(v) {
  const s = v === null || v === undefined ? "" : typeof v === "object" ? (v.message || JSON.stringify(v)) : String(v);
  return /[",\n\r]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

batch.querySelector(".job-jsonl").addEventListener("click", async () => {
  try { save(`icma-${currentJob.id}.jsonl`, (await resultLines(currentJob)).join("\n") + "\n", "application/x-ndjson"); }
  catch (err) { showError(batchForm.querySelector('[data-testid="error"]'), err); }
});

batch.querySelector(".job-csv").addEventListener("click", async () => {
  try {
    const rows = (await resultLines(currentJob)).map((l) => JSON.parse(l));
    const cols = ["index", "id", "input", "reference", "prediction", "valid", "canonical_smiles", "finish_reason", "error"]
      .filter((c) => rows.some((r) => c in r));
    const text = [cols.join(","), ...rows.map((r) => cols.map((c) => csvCell(r[c])).join(","))].join("\r\n") + "\r\n";
    save(`icma-${currentJob.id}.csv`, text, "text/csv");
  } catch (err) { showError(batchForm.querySelector('[data-testid="error"]'), err); }
});

// --- models -------------------------------------------------------------------------------

const models = document.getElementById("view-models");
let modelsTimer = null;

async function refreshModels() {
  const error = models.querySelector('[data-testid="error"]');
  clearError(error);
  clearTimeout(modelsTimer);
  try {
    await loadAdapters();
    if (adapterList) models.querySelector(".adapters").replaceChildren(...adapterList.adapters.map(adapterCard));
    if (adapterList && !adapterList.adapters.length) models.querySelector(".adapters").replaceChildren(el("p", { class: "note", text: "No adapters yet: requests use the base model." }));
    const jobs = (await api("/v1/jobs?limit=20")).jobs.filter((j) => j.kind === "tune");
    const box = models.querySelector(".tune-jobs");
    box.replaceChildren(...(jobs.length ? jobs.map(tuneCard) : [el("p", { class: "note", text: "No tuning runs on this worker." })]));
    if (!models.hidden && jobs.some((j) => !TERMINAL.has(j.state))) modelsTimer = setTimeout(refreshModels, 2000);
  } catch (err) { showError(error, err); }
}

function metricsTable(metrics) {
  const rows = Object.entries(metrics || {}).filter(([, v]) => typeof v === "number");
  if (!rows.length) return null;
  return el("table", { class: "small" }, el("tbody", {}, ...rows.map(([k, v]) => el("tr", {}, el("th", { scope: "row", text: k }), el("td", { text: fmt(v) })))));
}

function adapterCard(a) {
  const badges = el("p", { class: "badges" });
  if (a.default_for) badges.append(el("span", { class: "badge ok", text: `default for ${a.default_for}` }));
  if (a.shipped) badges.append(el("span", { class: "badge", text: "shipped" }));
  const ev = a.evaluation && (a.evaluation.metrics || a.evaluation);
  return el("article", { class: "card", "data-testid": "adapter-card" },
    el("header", {}, el("strong", { text: a.name }), el("span", { text: a.task || "any task" })),
    badges.childElementCount ? badges : null,
    el("p", { class: "note", text: `base ${a.base_model || "?"} · LoRA r ${a.r ?? "?"}, alpha ${a.lora_alpha ?? "?"}` }),
    metricsTable(ev));
}

function lossCurve(points) {
  const w = 320, h = 120, pad = 4;
  const svgNs = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(svgNs, "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("preserveAspectRatio", "none"); // fills the card's width
  svg.setAttribute("class", "curve");
  svg.setAttribute("role", "img");
  svg.setAttribute("data-testid", "loss-curve");
  if (points.length < 2) {
    svg.setAttribute("aria-label", "loss curve: not enough steps yet");
    return svg;
  }
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const sx = (x) => pad + (w - 2 * pad) * (x - x0) / ((x1 - x0) || 1);
  const sy = (y) => h - pad - (h - 2 * pad) * (y - y0) / ((y1 - y0) || 1);
  const line = document.createElementNS(svgNs, "polyline");
  line.setAttribute("points", points.map(([x, y]) => `${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join(" "));
  line.setAttribute("vector-effect", "non-scaling-stroke");
  svg.append(line);
  svg.setAttribute("aria-label", `training loss from ${ys[0].toFixed(3)} at step ${xs[0]} to ${ys[ys.length - 1].toFixed(3)} at step ${xs[xs.length - 1]}`);
  return svg;
}

function tuneCard(job) {
  const t = job.tuning || {};
  const pct = Math.round(job.progress * 100);
  const eta = t.eta_s ? ` · about ${Math.ceil(t.eta_s / 60)} min left` : "";
  const status = job.state === "running"
    ? `${t.phase || "starting"}${t.step ? `: step ${t.step} of ${t.total_steps}` : ""}${t.loss !== undefined ? ` · loss ${fmt(t.loss)}` : ""}${eta}`
    : `${job.state}${job.message ? ": " + job.message : ""}`;
  return el("article", { class: "card wide", "data-testid": "tune-card" },
    el("header", {}, el("strong", { text: (job.options && job.options.name) || job.id }), el("span", { text: job.task })),
    el("progress", { max: 100, value: pct, "aria-label": "tuning progress" }),
    el("p", { class: "note", text: status }),
    lossCurve(t.curve || []),
    (t.curve || []).length > 1 ? el("p", { class: "note", text: `training loss ${fmt(t.curve[0][1])} at step ${t.curve[0][0]} → ${fmt(t.curve[t.curve.length - 1][1])} at step ${t.curve[t.curve.length - 1][0]}` }) : null,
    metricsTable(t.metrics));
}

// --- start --------------------------------------------------------------------------------

document.querySelector(".version").textContent = `icma ${CONFIG.version}`;
document.querySelectorAll("section[data-task]").forEach(setupTranslateView);
updateKeyButton();
const start = tabs.find((t) => "#" + t.id.replace("tab-", "") === location.hash);
// Without the key every call is refused: ask first (closing the dialog loads the adapters).
if (CONFIG.key_required && !sessionStorage.getItem(KEY)) askForKey("this worker needs an API key");
else loadAdapters();
if (start) selectTab(start);
