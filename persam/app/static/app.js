// persam app: the page. Plain JavaScript, no library, nothing from the web.
// The server does all the work (persam's own method); this file draws and sends clicks.
"use strict";

const $ = (selector) => document.querySelector(selector);

const ui = {
  refs: [],            // references as the server describes them (+ history for undo)
  current: null,       // id of the reference shown on the canvas
  tool: "positive",
  targets: [],         // targets as the server describes them
  concept: null,
  useFileConcept: false,  // the concept came from a file: run without learning
  runToken: 0,         // a newer run stops an older one
  running: false,
  allowFolders: true,
  hasSession: false,   // the server holds a session of this browser (see request)
  images: {},          // loaded Image objects by URL
};

// ------------------------------------------------------------------------------------------
// messages and requests

function say(text, kind = "error") {
  const box = $("#message");
  if (!text) { box.hidden = true; box.textContent = ""; return; }
  box.hidden = false;
  box.dataset.kind = kind;
  box.textContent = text;
}

let pending = 0;  // requests in flight, shown as body[data-pending] (for tests and the cursor)
function track(delta) {
  pending += delta;
  document.body.dataset.pending = String(pending);
}

async function api(method, url, body) {
  track(1);
  try {
    return await request(method, url, body);
  } finally {
    track(-1);
  }
}

// The server makes this browser's session with its first change (a POST), not when the page is
// looked at.  Until one exists, changes go one at a time, so that two early uploads do not make
// two sessions of which the page keeps one.
let sessionQueue = Promise.resolve();

async function request(method, url, body) {
  if (method === "GET" || ui.hasSession) return send(method, url, body);
  const turn = sessionQueue.then(() => send(method, url, body));
  sessionQueue = turn.catch(() => {});
  return turn;
}

async function send(method, url, body) {
  const options = { method, credentials: "same-origin", headers: {} };
  if (body instanceof FormData) options.body = body;
  else if (body !== undefined) {
    options.body = JSON.stringify(body);
    options.headers["Content-Type"] = "application/json";
  }
  let response;
  try {
    response = await fetch(url, options);
  } catch (err) {
    throw new Error("the persam server does not answer (is `persam app` still running?)");
  }
  if (response.ok && method !== "GET") ui.hasSession = true;
  if (response.status === 410) ui.hasSession = false;  // ended: the server cleared the cookie
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error || message; } catch (err) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

async function apiJSON(method, url, body) {
  track(1);
  try {
    return await (await request(method, url, body)).json();
  } finally {
    track(-1);
  }
}

function fileForm(name, files) {
  const form = new FormData();
  for (const f of files) form.append(name, f, f.name);
  return form;
}

function saveBlob(blob, name) {
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = name;
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

function fileName(response, fallback) {
  const match = /filename="([^"]+)"/.exec(response.headers.get("Content-Disposition") || "");
  return match ? match[1] : fallback;
}

const fmt = (x, digits = 2) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));

// ------------------------------------------------------------------------------------------
// the reference canvas

function currentRef() {
  return ui.refs.find((r) => r.id === ui.current) || null;
}

function loadImage(url) {
  if (!url) return Promise.resolve(null);
  if (ui.images[url]) return ui.images[url];
  ui.images[url] = new Promise((resolve) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => resolve(null);
    img.src = url;
  });
  return ui.images[url];
}

let drag = null;  // {x0, y0, x1, y1} in canvas pixels while dragging

async function draw() {
  const canvas = $("#ref-canvas");
  const ctx = canvas.getContext("2d");
  const ref = currentRef();
  $("#ref-empty").hidden = Boolean(ref);
  canvas.hidden = !ref;
  if (!ref) { $("#ref-info").textContent = ""; return; }
  const [picture, mask] = await Promise.all([loadImage(ref.preview), loadImage(ref.mask)]);
  if (ref !== currentRef()) return;
  canvas.width = ref.preview_width;
  canvas.height = ref.preview_height;
  if (picture) ctx.drawImage(picture, 0, 0, canvas.width, canvas.height);
  if (mask) ctx.drawImage(mask, 0, 0, canvas.width, canvas.height);
  const s = ref.preview_width / ref.width;
  const r = Math.max(5, Math.round(canvas.width / 110));
  if (ref.box) {
    ctx.lineWidth = Math.max(2, r / 2.5);
    ctx.strokeStyle = "#ffd400";
    ctx.strokeRect(ref.box[0] * s, ref.box[1] * s, (ref.box[2] - ref.box[0]) * s, (ref.box[3] - ref.box[1]) * s);
  }
  for (const [x, y, label] of ref.points) {
    ctx.beginPath();
    ctx.arc(x * s, y * s, r, 0, 2 * Math.PI);
    ctx.fillStyle = label ? "#1fbf4a" : "#e0302a";
    ctx.fill();
    ctx.lineWidth = 2;
    ctx.strokeStyle = "#fff";
    ctx.stroke();
  }
  if (drag) {
    ctx.setLineDash([6, 4]);
    ctx.lineWidth = 2;
    ctx.strokeStyle = "#ffd400";
    ctx.strokeRect(Math.min(drag.x0, drag.x1), Math.min(drag.y0, drag.y1), Math.abs(drag.x1 - drag.x0), Math.abs(drag.y1 - drag.y0));
    ctx.setLineDash([]);
  }
}

function refInfo(ref, extra) {
  let text;
  if (ref.area > 0) {
    const share = (100 * ref.area) / (ref.width * ref.height);
    const from = { clicks: "your clicks", box: "your box", file: "the uploaded mask" }[ref.mask_source] || "";
    text = `Mask: ${share.toFixed(1)} % of the image (${ref.area.toLocaleString("en")} px), from ${from}.`;
  } else {
    text = "No mask yet: click on the object.";
  }
  $("#ref-info").textContent = `${ref.name} · ${ref.width}×${ref.height}. ${text}${extra ? " " + extra : ""}`;
  $("#ref-info").dataset.area = ref.area;
}

function canvasPoint(event) {
  const canvas = $("#ref-canvas");
  const rect = canvas.getBoundingClientRect();
  const x = ((event.clientX - rect.left) * canvas.width) / rect.width;
  const y = ((event.clientY - rect.top) * canvas.height) / rect.height;
  return [Math.min(Math.max(x, 0), canvas.width - 0.01), Math.min(Math.max(y, 0), canvas.height - 0.01)];
}

async function sendPrompts(ref, points, box, remember = true) {
  const before = { points: ref.points, box: ref.box };
  say("Segmenting the reference…", "busy");
  try {
    const out = await apiJSON("POST", `/api/references/${ref.id}/prompts`, { points, box });
    if (remember) ref.history.push(before);
    Object.assign(ref, out);
    ui.useFileConcept = false;
    showConcept();
    renderRefs();
    say("");
    refInfo(ref, out.area ? `SAM: ${fmt(out.decode_s)} s.` : "");
  } catch (err) {
    say(err.message);
  }
  await draw();
}

function setupCanvas() {
  const canvas = $("#ref-canvas");
  canvas.addEventListener("contextmenu", (e) => e.preventDefault());
  canvas.addEventListener("pointerdown", (e) => {
    if (!currentRef()) return;
    const [x, y] = canvasPoint(e);
    drag = { x0: x, y0: y, x1: x, y1: y, button: e.button, shift: e.shiftKey, moved: false };
    canvas.setPointerCapture(e.pointerId);
  });
  canvas.addEventListener("pointermove", (e) => {
    if (!drag) return;
    [drag.x1, drag.y1] = canvasPoint(e);
    drag.moved = drag.moved || Math.hypot(drag.x1 - drag.x0, drag.y1 - drag.y0) > 6;
    if (drag.moved) draw();
  });
  canvas.addEventListener("pointerup", async (e) => {
    if (!drag) return;
    const d = drag;
    drag = null;
    const ref = currentRef();
    if (!ref) return;
    const s = ref.width / ref.preview_width;
    if (d.moved) {  // a box, whatever the tool
      const box = [Math.min(d.x0, d.x1) * s, Math.min(d.y0, d.y1) * s, Math.max(d.x0, d.x1) * s, Math.max(d.y0, d.y1) * s];
      box[2] = Math.min(box[2], ref.width);
      box[3] = Math.min(box[3], ref.height);
      await sendPrompts(ref, [], box);
      return;
    }
    if (ui.tool === "box") { say("Drag a box around the object.", "info"); draw(); return; }
    const label = d.button === 2 || d.shift || ui.tool === "negative" ? 0 : 1;
    const points = (ref.box ? [] : ref.points).concat([[d.x0 * s, d.y0 * s, label]]);
    await sendPrompts(ref, points, null);
  });
}

// ------------------------------------------------------------------------------------------
// references

function renderRefs() {
  const strip = $("#ref-strip");
  strip.replaceChildren();
  for (const ref of ui.refs) {
    const item = document.createElement("div");
    item.className = "thumb" + (ref.id === ui.current ? " selected" : "") + (ref.area ? " has-mask" : "");
    item.title = ref.name;
    const img = document.createElement("img");
    img.src = ref.preview;
    img.alt = ref.name;
    img.addEventListener("click", () => { ui.current = ref.id; renderRefs(); refInfo(ref); draw(); });
    const remove = document.createElement("button");
    remove.className = "remove";
    remove.textContent = "×";
    remove.title = "remove this reference";
    remove.addEventListener("click", async () => {
      try {
        await api("DELETE", `/api/references/${ref.id}`);
        ui.refs = ui.refs.filter((r) => r !== ref);
        if (ui.current === ref.id) ui.current = ui.refs.length ? ui.refs[0].id : null;
        ui.useFileConcept = false;
        renderRefs();
        draw();
      } catch (err) { say(err.message); }
    });
    item.append(img, remove);
    strip.append(item);
  }
  $("#mask-label").classList.toggle("disabled", !currentRef());
}

async function addReferences(files) {
  for (const file of files) {
    say(`Encoding ${file.name} (once; then every click only decodes)…`, "busy");
    try {
      const ref = await apiJSON("POST", "/api/references", fileForm("file", [file]));
      ref.history = [];
      ui.refs.push(ref);
      ui.current = ref.id;
      ui.useFileConcept = false;
      renderRefs();
      refInfo(ref, `Encoded in ${fmt(ref.encode_s, 1)} s.`);
      say("");
      await draw();
    } catch (err) {
      say(err.message);
    }
  }
}

// ------------------------------------------------------------------------------------------
// method and concept

function settings() {
  return {
    multi: $("#multi").checked,
    max_objects: Number($("#max-objects").value) || 5,
    min_similarity: $("#use-threshold").checked ? Number($("#min-similarity").value) : null,
  };
}

function showConcept() {
  const c = ui.concept;
  const names = { persam: "PerSAM", persam_f: "PerSAM-F", gfsam: "GF-SAM" };
  if (!c) { $("#concept-info").textContent = "Nothing learned yet."; }
  else if (c.source === "references") {
    $("#concept-info").textContent = `Concept: ${names[c.method]}, learned from ${c.references} reference${c.references === 1 ? "" : "s"}.`;
  } else {
    $("#concept-info").textContent = `Concept: ${names[c.method]}, loaded from ${c.source}` +
      (ui.useFileConcept ? " (mark a reference to learn again)." : ".");
  }
  $("#method").disabled = ui.useFileConcept;
  if (c && ui.useFileConcept) $("#method").value = c.method;
}

async function learn() {
  if (ui.useFileConcept && ui.concept) return;
  const method = $("#method").value;
  say(method === "persam_f" ? "Learning PerSAM-F's weights on the reference…"
    : method === "gfsam" ? "Learning GF-SAM's DINOv2 features of the references…" : "Learning the concept…", "busy");
  ui.concept = await apiJSON("POST", "/api/learn", { method });
  showConcept();
}

// ------------------------------------------------------------------------------------------
// targets and results

function card(t) {
  let el = document.querySelector(`.card[data-id="${t.id}"]`);
  if (!el) {
    el = document.createElement("figure");
    el.className = "card";
    el.dataset.id = t.id;
    el.innerHTML = `<div class="frame"><img class="picture" alt=""></div>
      <figcaption><div class="title"><span class="name"></span><button type="button" class="remove" title="remove">×</button></div>
      <div class="status"></div><div class="scores"><span class="peak"></span><span class="iou"></span></div>
      <div class="timing muted"></div>
      <button type="button" class="heatmap" hidden>Heat map</button></figcaption>`;
    el.querySelector(".remove").addEventListener("click", async () => {
      try {
        await api("DELETE", `/api/targets/${t.id}`);
        ui.targets = ui.targets.filter((x) => x.id !== t.id);
        el.remove();
        summary();
      } catch (err) { say(err.message); }
    });
    el.querySelector(".heatmap").addEventListener("click", () => toggleHeatmap(el));
    el.querySelector(".picture").addEventListener("click", () => openFull(el));
    $("#gallery").append(el);
  }
  const r = t.result;
  el.querySelector(".name").textContent = t.name.split("/").pop();
  el.querySelector(".name").title = t.name;
  const img = el.querySelector(".picture");
  const src = r && r.overlay ? r.overlay : t.thumb;
  if (src && img.dataset.src !== src) { img.src = src; img.dataset.src = src; }
  el.dataset.view = "overlay";
  el.dataset.status = !r ? "pending" : r.status !== "ok" ? r.status : r.found ? "found" : "not-found";
  const status = el.querySelector(".status");
  const heat = el.querySelector(".heatmap");
  heat.textContent = "Heat map";
  if (!r) {
    status.textContent = "not run yet";
    el.querySelector(".peak").textContent = "";
    el.querySelector(".iou").textContent = "";
    el.querySelector(".timing").textContent = "";
    heat.hidden = true;
  } else if (r.status === "error") {
    status.textContent = r.error;
    heat.hidden = true;
  } else if (r.status === "skipped") {  // a reference image, as the command line skips it
    status.textContent = `skipped: the ${r.reason}`;
    el.querySelector(".peak").textContent = "";
    el.querySelector(".iou").textContent = "";
    el.querySelector(".timing").textContent = "";
    heat.hidden = true;
  } else {
    status.textContent = r.found ? (r.objects > 1 ? `found: ${r.objects} objects` : "found") : `not found (${r.reason})`;
    const gfsam = r.method === "gfsam";  // its score is DINOv2's best match; it predicts no IoU
    el.querySelector(".peak").textContent = `${gfsam ? "score" : "peak similarity"} ${fmt(r.peak_similarity)}`;
    el.querySelector(".iou").textContent = r.iou_score === null || gfsam ? "" : `predicted IoU ${fmt(r.iou_score)}`;
    el.querySelector(".status").title = r.reason || "";
    el.querySelector(".timing").textContent = r.encoded
      ? `encoded in ${fmt(r.encode_s, 1)} s · segmented in ${fmt(r.segment_s)} s`
      : `segmented in ${fmt(r.segment_s)} s` + (gfsam ? "" : " (cached embedding)");
    heat.hidden = gfsam;
  }
  return el;
}

function toggleHeatmap(el) {
  const t = ui.targets.find((x) => x.id === el.dataset.id);
  if (!t || !t.result) return;
  const img = el.querySelector(".picture");
  const button = el.querySelector(".heatmap");
  if (el.dataset.view === "heatmap") {
    img.src = t.result.overlay;
    img.dataset.src = t.result.overlay;
    el.dataset.view = "overlay";
    button.textContent = "Heat map";
  } else {
    img.src = `/api/targets/${t.id}/similarity.png?v=${encodeURIComponent(t.result.overlay)}`;
    img.dataset.src = img.src;
    el.dataset.view = "heatmap";
    button.textContent = "Overlay";
  }
}

function openFull(el) {  // the result at full size (or the heat map, when the card shows it)
  const t = ui.targets.find((x) => x.id === el.dataset.id);
  if (!t || !t.result || t.result.status !== "ok") return;
  const heatmap = el.dataset.view === "heatmap";
  $("#viewer-image").src = heatmap ? el.querySelector(".picture").src : t.result.full;
  $("#viewer-caption").textContent = `${t.name.split("/").pop()} · ${heatmap ? "heat map" : `${t.width}×${t.height}`}`;
  $("#viewer").showModal();
}

function renderTargets() {
  const keep = new Set(ui.targets.map((t) => t.id));
  for (const el of document.querySelectorAll(".card")) if (!keep.has(el.dataset.id)) el.remove();
  for (const t of ui.targets) card(t);
  summary();
}

function summary() {
  $("#gallery-empty").hidden = ui.targets.length > 0;
  const done = ui.targets.filter((t) => t.result && t.result.status === "ok");
  const found = done.filter((t) => t.result.found).length;
  $("#summary").textContent = ui.targets.length
    ? `${ui.targets.length} target${ui.targets.length === 1 ? "" : "s"}` + (done.length ? `, object found in ${found} of ${done.length}` : "")
    : "";
}

async function addTargets(files) {
  const errors = [];
  let k = 0;
  for (const file of files) {
    k += 1;
    say(`Adding ${file.name} (${k} of ${files.length})…`, "busy");
    try {
      const out = await apiJSON("POST", "/api/targets", fileForm("files", [file]));
      for (const t of out.targets) { ui.targets.push(t); card(t); }
      errors.push(...out.errors);
    } catch (err) {
      errors.push(err.message);
    }
  }
  summary();
  say(errors.join(" · "));
}

function progress(done, total, text) {
  const bar = $("#progress");
  bar.hidden = total === 0;
  bar.max = Math.max(total, 1);
  bar.value = done;
  $("#progress-text").textContent = text;
}

async function run() {
  if (ui.running) { ui.runToken += 1; }  // a newer run replaces this one
  const token = ++ui.runToken;
  if (!ui.targets.length) { say("Add target images first."); return; }
  ui.running = true;
  $("#stop").hidden = false;
  $("#run").disabled = true;
  try {
    await learn();
    const chosen = settings();
    const targets = ui.targets.slice();
    let k = 0;
    for (const t of targets) {
      if (token !== ui.runToken) return;
      progress(k, targets.length, `Segmenting ${k + 1} / ${targets.length}: ${t.name.split("/").pop()}…`);
      say("");
      try {
        const out = await apiJSON("POST", `/api/targets/${t.id}/segment`, chosen);
        Object.assign(t, out);
        card(t);
      } catch (err) {
        if (/no target/.test(err.message)) continue;  // removed meanwhile
        throw err;
      }
      k += 1;
    }
    progress(k, targets.length, `Done: ${k} / ${targets.length}.`);
    summary();
  } catch (err) {
    say(err.message);
    progress(0, 0, "");
  } finally {
    if (token === ui.runToken) {
      ui.running = false;
      $("#stop").hidden = true;
      $("#run").disabled = false;
    }
  }
}

let rerunTimer = null;
function rerunSoon() {  // settings changed: decode again from the cached embeddings
  if (!ui.targets.some((t) => t.result)) return;
  clearTimeout(rerunTimer);
  rerunTimer = setTimeout(run, 300);
}

// ------------------------------------------------------------------------------------------
// wiring

async function restore() {
  try {
    const state = await apiJSON("GET", "/api/state");
    const app = state.app;
    $("#model").textContent = `${app.model_type} · ${app.device}`;
    ui.hasSession = state.session;
    if (state.expired) say(state.expired, "info");
    ui.allowFolders = app.allow_folders;
    $("#folder-form").hidden = !app.allow_folders;
    $("#folder-off").hidden = app.allow_folders;
    const gfsamOption = $("#method-gfsam");  // GF-SAM only with a DINOv2 checkpoint; else disabled, saying why
    gfsamOption.disabled = !app.gfsam.available;
    gfsamOption.title = app.gfsam.why || `DINOv2 ${app.gfsam.dinov2}`;
    if (!app.gfsam.available) gfsamOption.textContent = "GF-SAM (every instance): needs a DINOv2 checkpoint";
    ui.refs = state.references.map((r) => Object.assign(r, { history: [] }));
    ui.current = ui.refs.length ? ui.refs[ui.refs.length - 1].id : null;
    ui.targets = state.targets;
    ui.concept = state.concept;
    ui.useFileConcept = Boolean(state.concept && state.concept.source !== "references");
    renderRefs();
    if (currentRef()) refInfo(currentRef());
    renderTargets();
    showConcept();
    await draw();
    document.body.dataset.ready = "true";
  } catch (err) {
    say(err.message);
  }
}

function setup() {
  setupCanvas();
  $("#ref-file").addEventListener("change", async (e) => {
    const files = Array.from(e.target.files);
    e.target.value = "";
    await addReferences(files);
  });
  $("#mask-file").addEventListener("change", async (e) => {
    const file = e.target.files[0];
    e.target.value = "";
    const ref = currentRef();
    if (!file) return;
    if (!ref) { say("Add a reference image first, then its mask."); return; }
    say("Reading the mask…", "busy");
    try {
      const before = { points: ref.points, box: ref.box };
      Object.assign(ref, await apiJSON("POST", `/api/references/${ref.id}/mask`, fileForm("file", [file])));
      ref.history.push(before);
      ui.useFileConcept = false;
      say("");
      refInfo(ref);
      renderRefs();
    } catch (err) { say(err.message); }
    await draw();
  });
  for (const button of document.querySelectorAll(".tool")) {
    button.addEventListener("click", () => {
      ui.tool = button.dataset.tool;
      for (const b of document.querySelectorAll(".tool")) b.classList.toggle("active", b === button);
    });
  }
  $("#undo").addEventListener("click", async () => {
    const ref = currentRef();
    if (!ref || !ref.history.length) return;
    const last = ref.history.pop();
    await sendPrompts(ref, last.points, last.box, false);
  });
  $("#clear").addEventListener("click", async () => {
    const ref = currentRef();
    if (ref) await sendPrompts(ref, [], null);
  });
  $("#method").addEventListener("change", rerunSoon);
  $("#multi").addEventListener("change", rerunSoon);
  $("#max-objects").addEventListener("change", () => { if ($("#multi").checked) rerunSoon(); });
  $("#use-threshold").addEventListener("change", rerunSoon);
  $("#min-similarity").addEventListener("input", () => {
    $("#min-similarity-value").textContent = Number($("#min-similarity").value).toFixed(2);
    if ($("#use-threshold").checked) rerunSoon();
  });
  $("#target-files").addEventListener("change", async (e) => {
    const files = Array.from(e.target.files);
    e.target.value = "";
    await addTargets(files);
  });
  $("#folder-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    say("Listing the folder…", "busy");
    try {
      const out = await apiJSON("POST", "/api/targets/folder", { path: $("#folder-path").value });
      for (const t of out.targets) { ui.targets.push(t); card(t); }
      summary();
      const notes = out.notes.length ? ` ${out.notes.join(" · ")}` : "";
      say(`${out.targets.length} image${out.targets.length === 1 ? "" : "s"} added.${notes}`, "info");
    } catch (err) { say(err.message); }
  });
  $("#clear-targets").addEventListener("click", async () => {
    try {
      await api("DELETE", "/api/targets");
      ui.targets = [];
      renderTargets();
      progress(0, 0, "");
    } catch (err) { say(err.message); }
  });
  $("#run").addEventListener("click", run);
  $("#viewer").addEventListener("click", () => $("#viewer").close());
  $("#stop").addEventListener("click", () => {
    ui.runToken += 1;
    ui.running = false;
    $("#stop").hidden = true;
    $("#run").disabled = false;
    $("#progress-text").textContent = "Stopped.";
  });
  $("#download-zip").addEventListener("click", async () => {
    say("Writing the masks and results.json…", "busy");
    try {
      if (!ui.useFileConcept) await learn();
      const response = await api("POST", "/api/results.zip", settings());
      saveBlob(await response.blob(), fileName(response, "persam-results.zip"));
      say("Downloaded the zip: a mask, an overlay and a record in results.json per target, and the concept.", "info");
    } catch (err) { say(err.message); }
  });
  $("#download-concept").addEventListener("click", async () => {
    try {
      if (!ui.useFileConcept) await learn();
      const response = await api("GET", "/api/concept");
      saveBlob(await response.blob(), fileName(response, "persam.concept"));
      say("Saved the concept: use it here (Load concept) or with `persam apply`.", "info");
    } catch (err) { say(err.message); }
  });
  $("#concept-file").addEventListener("change", async (e) => {
    const file = e.target.files[0];
    e.target.value = "";
    if (!file) return;
    try {
      ui.concept = await apiJSON("POST", "/api/concept", fileForm("file", [file]));
      ui.useFileConcept = true;
      showConcept();
      say(`Loaded ${file.name}.`, "info");
      rerunSoon();
    } catch (err) { say(err.message); }
  });
  restore();
}

document.addEventListener("DOMContentLoaded", setup);
