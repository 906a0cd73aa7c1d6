// Playground wiring: catalog, submit, job progress, results, reuse, gallery, queue.

import {api, ApiError, followJob, getKey, setKey} from "./api.js";
import * as controlnet from "./controlnet.js";
import * as form from "./form.js";
import {addResults, base64ToBlob, clearResults, listResults, removeResult} from "./gallery.js";
import {InitImage, readAsDataUrl} from "./mask.js";
import {pngWithInfotext} from "./png.js";
import {QueuePanel} from "./queue.js";

const byId = (id) => document.getElementById(id);
const MIME = {png: "image/png", jpg: "image/jpeg"};
const EXT = {"image/png": "png", "image/jpeg": "jpg"};

const initImage = new InitImage();
const mine = new Set();        // ids of jobs submitted from this page
let currentJob = null;         // the job the result panel follows
const objectUrls = [];         // blob URLs of the result panel, freed when it changes

function notice(text, cls = "") {
  const el = byId("notice");
  el.textContent = text;
  el.className = `notice ${cls}`;
}

// ---- API key -----------------------------------------------------------------------------
const keyInput = byId("api-key");
keyInput.value = getKey();

function authError(err) {
  const p = byId("api-key-error");
  p.textContent = getKey() ? "The server refused this API key." : "This server needs an API key.";
  p.hidden = false;
  keyInput.setAttribute("aria-invalid", "true");
  if (err && document.activeElement === document.body) keyInput.focus();
}

keyInput.addEventListener("change", () => {
  setKey(keyInput.value.trim());
  byId("api-key-error").hidden = true;
  keyInput.removeAttribute("aria-invalid");
  loadCatalog();
  queue.refresh();
});

// ---- catalog -----------------------------------------------------------------------------
async function loadCatalog() {
  try {
    const [models, loras, upscalers, methods] = await Promise.all(
      ["models", "loras", "upscalers", "sampling_methods"].map((p) => api(p)));
    form.populate({models: models.models, loras: loras.loras, upscalers: upscalers.upscalers,
                   samplers: methods.sampling_methods, schedulers: methods.scheduler_types});
    await controlnet.loadChoices();
    document.body.dataset.ready = "true";
  } catch (e) {
    if (e.status === 401) authError(e);
    else notice(`Cannot load the model list: ${e.message}`, "error");
  }
}

// ---- submit ------------------------------------------------------------------------------
const genForm = byId("gen-form");

genForm.addEventListener("submit", async (e) => {
  e.preventDefault();
  form.clearErrors();
  notice("");
  let request;
  try {
    request = form.readRequest(initImage);
    controlnet.addTo(request.body);
  } catch (err) {
    notice(`Cannot read the form: ${err.message}`, "error");
    return;
  }
  const button = byId("generate");
  button.disabled = true;
  try {
    const answer = await api(request.path, {method: "POST", body: request.body});
    mine.add(answer.job_id);
    if (answer.ignored_fields?.length) {
      notice(`The server ignored fields it does not know: ${answer.ignored_fields.join(", ")}.`, "warning");
    }
    track(answer.job_id, request);
    queue.refresh();
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    if (err.status === 401) authError(err);
    form.showErrors(err, {fallbackField: err.status === 413 && request.path === "img2img" ? "init_image" : null});
  } finally {
    button.disabled = false;
  }
});

document.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
    e.preventDefault();
    genForm.requestSubmit();
  }
});

byId("swap-size").addEventListener("click", () => {
  const w = byId("width").value;
  byId("width").value = byId("height").value;
  byId("height").value = w;
});

byId("reset-form").addEventListener("click", () => {
  form.reset();
  initImage.remove();
  notice("");
});

// ---- progress ----------------------------------------------------------------------------
const progress = byId("progress");
const phase = byId("phase");

// Screen readers hear the phase when it changes, not every step.
let announced = "";

function showProgress(value, text, phaseName) {
  if (typeof value === "number" && Number.isFinite(value)) {
    progress.value = value;
    progress.setAttribute("aria-valuetext", `${Math.round(value)} %`);
  }
  if (text) phase.textContent = text;
  const say = phaseName ?? text;
  if (say && say !== announced) {
    announced = say;
    byId("phase-announce").textContent = say;
  }
}

function showPreview(b64, step) {
  if (!b64) return;
  byId("preview-box").hidden = false;
  byId("preview").src = `data:image/jpeg;base64,${b64}`;
  byId("preview-caption").textContent = step ? `Preview at step ${step}` : "Preview";
}

function describe(p) {
  const pct = `${Math.round(p.progress ?? 0)} %`;
  const step = p.step && p.total ? ` (step ${p.step} of ${p.total})` : "";
  return `${pct} — ${p.phase || p.current_phase || "working"}${step}`;
}

function onEvent(jobId, kind, data) {
  if (jobId !== currentJob) return;
  if (kind === "queued") showProgress(0, `Queued${data.position ? ` — position ${data.position}` : ""}`);
  else if (kind === "started") showProgress(undefined, "Started");
  else if (kind === "progress") showProgress(data.progress, describe(data), data.phase);
  else if (kind === "preview") showPreview(data.image, data.step);
  else if (kind === "status") {
    const queued = data.state === "queued";
    showProgress(data.progress, queued ? `Queued${data.queue_position ? ` — position ${data.queue_position}` : ""}`
                                       : describe(data), queued ? "Queued" : data.current_phase);
    showPreview(data.preview, data.preview_step);
  }
}

async function track(jobId, request) {
  currentJob = jobId;
  byId("job-status").hidden = false;
  byId("job-status").dataset.jobId = jobId;
  byId("cancel-current").disabled = false;
  byId("preview-box").hidden = true;
  byId("preview").removeAttribute("src");
  showProgress(0, "Submitted");
  let final;
  try {
    final = await followJob(jobId, (kind, data) => onEvent(jobId, kind, data));
  } catch (e) {
    if (jobId === currentJob) showProgress(undefined, `Lost track of the job: ${e.message}`);
    return;
  }
  await finish(jobId, final, request);
}

byId("cancel-current").addEventListener("click", async () => {
  if (!currentJob) return;
  try {
    const r = await api(`queue/${encodeURIComponent(currentJob)}`, {method: "DELETE"});
    showProgress(undefined, r.state === "cancelling" ? "Cancelling…" : "Cancelled");
  } catch (e) {
    showProgress(undefined, `Cannot cancel: ${e.message}`);
  }
});

// ---- results -----------------------------------------------------------------------------
function imagesOf(final) {
  if (Array.isArray(final.images) && final.images.length) return final.images;
  return final.image ? [{image: final.image, seed: final.seed, infotext: final.infotext, width: final.width,
                         height: final.height, output_path: final.output_path}] : [];
}

async function finish(jobId, final, request) {
  const isCurrent = jobId === currentJob;
  if (final.state !== "done") {
    if (isCurrent) {
      byId("cancel-current").disabled = true;
      showProgress(undefined, final.state === "cancelled" ? "Cancelled" : "Failed");
      const p = document.createElement("p");
      p.className = "error";
      p.setAttribute("role", "alert");
      p.textContent = final.state === "cancelled" ? "The job was cancelled." : `The job failed: ${final.error}`;
      byId("result").replaceChildren(p);
    }
    return;
  }
  const mime = MIME[final.file_type] || "image/png";
  const created = Date.now();
  const entries = imagesOf(final).map((img, i) => ({
    id: `${jobId}-${i}`, jobId, created: created + i, mime, blob: base64ToBlob(img.image, mime),
    infotext: img.infotext ?? final.infotext ?? "", payload: final.payload || request.body,
    seed: img.seed ?? final.seed, width: img.width ?? final.width, height: img.height ?? final.height,
  }));
  try {
    await addResults(entries);
  } catch (e) {
    notice(`Results cannot be kept in this browser: ${e.message}`, "warning");
  }
  renderGallery();
  queue.refresh();
  if (isCurrent) {
    byId("cancel-current").disabled = true;
    showProgress(100, `Done in ${final.generation_time_sec?.toFixed?.(1) ?? "?"} s`);
    byId("preview-box").hidden = true;
    showResult(entries);
  } else {
    notice(`Job ${jobId.slice(0, 8)} finished; it is in the gallery.`);
  }
}

function button(text, onClick, label) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  if (label) b.setAttribute("aria-label", label);
  b.addEventListener("click", onClick);
  return b;
}

// entries: gallery entries of one job (or one gallery item).
function showResult(entries) {
  while (objectUrls.length) URL.revokeObjectURL(objectUrls.pop());
  const box = byId("result");
  const grid = document.createElement("div");
  grid.className = "images";
  entries.forEach((e, i) => {
    const url = URL.createObjectURL(e.blob);
    objectUrls.push(url);
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.src = url;
    img.alt = `Generated image ${i + 1}${e.seed !== undefined ? `, seed ${e.seed}` : ""}: ${e.payload?.prompt ?? ""}`;
    img.width = e.width || 512;
    img.height = e.height || 512;
    const cap = document.createElement("figcaption");
    const link = document.createElement("a");
    link.href = url;
    link.download = `${e.id}.${EXT[e.mime] || "img"}`;
    link.textContent = "Download";
    link.setAttribute("aria-label", `Download image ${i + 1}`);
    const info = document.createElement("span");
    info.textContent = `seed ${e.seed ?? "?"} · ${e.width}×${e.height}`;
    cap.append(info, link, button("Use as input image", async () => {
      await initImage.load(await readAsDataUrl(e.blob));
      byId("init-file").focus();
    }, `Use image ${i + 1} as the img2img input`));
    fig.append(img, cap);
    grid.append(fig);
  });
  const first = entries[0];
  const heading = document.createElement("h3");
  heading.textContent = "Infotext";
  const pre = document.createElement("pre");
  pre.className = "infotext";
  pre.id = "result-infotext";
  pre.textContent = entries.map((e) => e.infotext).filter(Boolean).join("\n\n") || "(none)";
  const actions = document.createElement("div");
  actions.className = "result-actions";
  actions.append(
    button("Reuse parameters", () => reuseEntry(first)),
    button("Copy infotext", () => navigator.clipboard?.writeText(pre.textContent)));
  box.replaceChildren(grid, heading, pre, actions);
}

async function reuseEntry(entry) {
  if (entry.payload) {
    form.fillForm(entry.payload);
    notice("The form has the parameters of this result.");
  } else {
    await reuseFromImage(entry.blob, "this result");
  }
  byId("prompt").focus();
}

// ---- reuse from images and infotexts (parsed by the server's /png-info) -------------------------
async function reuseFromDataUrl(dataUrl, what, errorField) {
  try {
    const info = await api("png-info", {method: "POST", body: {image: dataUrl}});
    if (!info.infotext) {
      notice(`${what} has no generation parameters.`, "warning");
      return false;
    }
    form.fillForm(info.parameters || {});
    byId("infotext-input").value = info.infotext;
    notice(`The form has the parameters of ${what}.`);
    return true;
  } catch (e) {
    if (e.status === 401) authError(e);
    const message = e.status === 404 ? "this server has no /png-info" : e.message;
    if (errorField) {
      const p = byId(errorField);
      p.textContent = message;
      p.hidden = false;
    } else {
      notice(`Cannot read parameters from ${what}: ${message}`, "error");
    }
    return false;
  }
}

async function reuseFromImage(blob, what) {
  return reuseFromDataUrl(await readAsDataUrl(blob), what);
}

byId("png-file").addEventListener("change", (e) => {
  const file = e.target.files[0];
  if (file) reuseFromImage(file, file.name);
});

byId("infotext-apply").addEventListener("click", async () => {
  const text = byId("infotext-input").value.trim();
  const err = byId("infotext-error");
  err.hidden = true;
  if (!text) {
    err.textContent = "Paste an infotext first.";
    err.hidden = false;
    byId("infotext-input").focus();
    return;
  }
  await reuseFromDataUrl(await pngWithInfotext(text), "the pasted infotext", "infotext-error");
});

// Drops: on the img2img box an image becomes the input image; anywhere else its parameters
// fill the form.
let dragDepth = 0;
document.addEventListener("dragenter", () => { dragDepth++; document.body.classList.add("dragging"); });
document.addEventListener("dragleave", () => {
  dragDepth = Math.max(0, dragDepth - 1);
  if (!dragDepth) document.body.classList.remove("dragging");
});
document.addEventListener("dragover", (e) => e.preventDefault());
document.addEventListener("drop", (e) => {
  e.preventDefault();
  dragDepth = 0;
  document.body.classList.remove("dragging");
  const file = [...(e.dataTransfer?.files || [])].find((f) => f.type.startsWith("image/"));
  if (!file) return;
  if (e.target.closest && e.target.closest("#img2img-box")) initImage.loadFile(file);
  else reuseFromImage(file, file.name);
});

// ---- gallery -----------------------------------------------------------------------------
const galleryUrls = [];

async function renderGallery() {
  let items;
  try {
    items = await listResults();
  } catch {
    byId("gallery-list").replaceChildren();
    return;
  }
  while (galleryUrls.length) URL.revokeObjectURL(galleryUrls.pop());
  byId("gallery-list").replaceChildren(...items.map((e) => {
    const li = document.createElement("li");
    const url = URL.createObjectURL(e.blob);
    galleryUrls.push(url);
    const open = button("", () => { currentJob = null; byId("job-status").hidden = true; showResult([e]); },
                        `Show result: ${e.payload?.prompt || e.id}`);
    open.className = "open";
    const img = document.createElement("img");
    img.src = url;
    img.alt = "";
    open.append(img);
    const remove = button("×", async () => { await removeResult(e.id); renderGallery(); },
                          `Remove from gallery: ${e.payload?.prompt || e.id}`);
    remove.className = "remove";
    li.append(open, remove);
    return li;
  }));
}

byId("gallery-clear").addEventListener("click", async () => {
  await clearResults();
  renderGallery();
});

// ---- start -------------------------------------------------------------------------------
const queue = new QueuePanel({isMine: (id) => mine.has(id), onAuthError: authError});
form.syncSeed();
loadCatalog();
renderGallery();
queue.refresh();
