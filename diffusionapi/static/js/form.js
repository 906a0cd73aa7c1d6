// The generation form: catalog choices, request building, filling from parameters, field errors.
//
// Every control sits in an element whose data-field is the request field's dotted path
// ("steps", "hires.scale", "loras.0"), so an API error's `detail[].loc` finds its place.

const FAMILY_LABELS = {sd15: "SD 1.5", sdxl: "SDXL", "sdxl-refiner": "SDXL refiner"};
const NUMBER_FIELDS = ["steps", "cfg_scale", "width", "height", "batch_size", "n_iter", "clip_skip", "jpeg_quality",
                       "refiner_switch_at", "denoising_strength", "mask_blur", "inpaint_full_res_padding",
                       "hires.scale", "hires.steps", "hires.denoising_strength", "preview.every"];

const form = document.getElementById("gen-form");
const byId = (id) => document.getElementById(id);
let loras = []; // [{name, scale}]
let loraFamilies = {};
let defaults = null;

export function familyLabel(family) {
  return FAMILY_LABELS[family] || family || "unknown family";
}

function option(value, text, title) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = text;
  if (title) o.title = title;
  return o;
}

function fillSelect(select, items, keepFirst) {
  const before = select.value;
  const keep = keepFirst ? [select.options[0]] : [];
  select.replaceChildren(...keep, ...items);
  if ([...select.options].some((o) => o.value === before)) select.value = before;
}

function grouped(models) {
  const groups = new Map();
  for (const m of models) {
    if (!groups.has(m.type)) groups.set(m.type, []);
    groups.get(m.type).push(m);
  }
  return [...groups].map(([family, items]) => {
    const g = document.createElement("optgroup");
    g.label = familyLabel(family);
    g.append(...items.map((m) => option(m.name, `${m.label} (${familyLabel(m.type)})`,
                                        `${m.name} · ${m.format || ""}`)));
    return g;
  });
}

export function populate(catalog) {
  const bases = catalog.models.filter((m) => m.type !== "sdxl-refiner");
  const refiners = catalog.models.filter((m) => m.type === "sdxl-refiner" || m.type === "sdxl");
  fillSelect(byId("model"), grouped(bases), true);
  fillSelect(byId("refiner_checkpoint"), grouped(refiners), true);
  fillSelect(byId("sampler_name"), catalog.samplers.map((s) => option(s, s)), false);
  fillSelect(byId("scheduler_type"), catalog.schedulers.map((s) => option(s, s)), true);
  fillSelect(byId("hires.upscaler"), catalog.upscalers.map((u) => option(u.name, u.name, u.path)), false);
  loraFamilies = Object.fromEntries(catalog.loras.map((l) => [l.name, l.family]));
  fillSelect(byId("lora-add"), catalog.loras.map((l) => option(l.name, l.family ? `${l.name} (${familyLabel(l.family)})`
                                                                               : l.name)), true);
  if (!defaults) defaults = snapshot();
}

// ---- LoRAs ---------------------------------------------------------------------------------
export function addLora(name, scale = 1) {
  const found = loras.find((l) => l.name === name);
  if (found) found.scale = scale; else loras.push({name, scale});
  renderLoras();
}

function renderLoras() {
  const list = byId("lora-list");
  list.replaceChildren(...loras.map((l, i) => {
    const li = document.createElement("li");
    li.dataset.field = `loras.${i}`;
    const name = document.createElement("span");
    name.className = "lora-name";
    name.textContent = loraFamilies[l.name] ? `${l.name} (${familyLabel(loraFamilies[l.name])})` : l.name;
    const label = document.createElement("label");
    label.className = "visually-hidden";
    label.htmlFor = `lora-weight-${i}`;
    label.textContent = `Weight of LoRA ${l.name}`;
    const weight = document.createElement("input");
    Object.assign(weight, {type: "number", id: `lora-weight-${i}`, step: "0.05", min: "-10", max: "10",
                           value: String(l.scale)});
    weight.inputMode = "decimal";
    weight.addEventListener("input", () => { l.scale = weight.value; });
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "Remove";
    remove.setAttribute("aria-label", `Remove LoRA ${l.name}`);
    remove.addEventListener("click", () => { loras.splice(i, 1); renderLoras(); byId("lora-add").focus(); });
    li.append(name, label, weight, remove);
    return li;
  }));
}

byId("lora-add").addEventListener("change", (e) => {
  if (e.target.value) addLora(e.target.value, 1);
  e.target.value = "";
});

// ---- reading ---------------------------------------------------------------------------------
function number(id) {
  // A value that is not a number is sent as typed, so the server names the field in its 422.
  const raw = byId(id).value.trim();
  if (raw === "") return raw;
  const n = Number(raw);
  return Number.isFinite(n) ? n : raw;
}

// -> {path: "txt2img" | "img2img", body}
export function readRequest(initImage) {
  const body = {prompt: byId("prompt").value, negative_prompt: byId("negative_prompt").value};
  if (byId("model").value) body.model = byId("model").value;
  body.sampler_name = byId("sampler_name").value;
  if (byId("scheduler_type").value) body.scheduler_type = byId("scheduler_type").value;
  for (const f of ["steps", "cfg_scale", "width", "height"]) body[f] = number(f);
  body.seed = byId("seed-random").checked ? -1 : number("seed");
  // Fields with A1111's defaults are sent only when changed, so an older server is not
  // asked for features it does not have.
  for (const f of ["batch_size", "n_iter", "clip_skip"]) {
    const v = number(f);
    if (v !== 1) body[f] = v;
  }
  body.fileType = byId("fileType").value;
  if (body.fileType === "jpg") body.jpeg_quality = number("jpeg_quality");
  if (loras.length) body.loras = loras.map((l) => ({name: l.name, scale: Number(l.scale)}));
  if (byId("hires.enabled").checked) {
    body.hires = {enabled: true, scale: number("hires.scale"), upscaler: byId("hires.upscaler").value,
                  steps: number("hires.steps"), denoising_strength: number("hires.denoising_strength")};
  }
  if (byId("refiner_checkpoint").value) {
    body.refiner_checkpoint = byId("refiner_checkpoint").value;
    body.refiner_switch_at = number("refiner_switch_at");
  }
  if (byId("preview.enabled").checked) {
    body.preview = {every: number("preview.every"), method: byId("preview.method").value};
  }
  if (!initImage || !initImage.loaded) return {path: "txt2img", body};
  body.init_image = initImage.imageDataUrl();
  body.denoising_strength = number("denoising_strength");
  body.resize_mode = Number(byId("resize_mode").value);
  if (initImage.hasMask()) {
    body.mask = initImage.maskDataUrl();
    body.mask_blur = number("mask_blur");
    body.inpainting_fill = Number(byId("inpainting_fill").value);
    body.inpaint_full_res = byId("inpaint_full_res").checked;
    body.inpaint_full_res_padding = number("inpaint_full_res_padding");
    body.inpainting_mask_invert = byId("inpainting_mask_invert").checked ? 1 : 0;
  }
  return {path: "img2img", body};
}

// ---- filling -----------------------------------------------------------------------------------
function controls() {
  return [...form.querySelectorAll("input[id], select[id], textarea[id]")].filter((el) => el.type !== "file");
}

function snapshot() {
  return Object.fromEntries(controls().map((el) => [el.id, el.type === "checkbox" ? el.checked : el.value]));
}

export function reset() {
  if (!defaults) return;
  for (const el of controls()) {
    if (!(el.id in defaults)) continue;
    if (el.type === "checkbox") el.checked = defaults[el.id]; else el.value = defaults[el.id];
  }
  loras = [];
  renderLoras();
  syncSeed();
  clearErrors();
}

function choose(id, value, label) {
  const select = byId(id);
  const wanted = String(value);
  let match = [...select.options].find((o) => o.value === wanted)
    || [...select.options].find((o) => o.value && o.textContent.toLowerCase().startsWith(wanted.toLowerCase() + " ("));
  if (!match) {
    // Keep what the image names, visibly: the server will say which names are valid.
    match = option(wanted, `${wanted} (${label || "not available here"})`);
    select.append(match);
  }
  select.value = match.value;
}

function setNumber(id, value) {
  if (value !== undefined && value !== null && value !== "") byId(id).value = String(value);
}

const truthy = (v) => v === true || v === 1 || v === "1" || v === "true" || v === "True";

// Fills the form from native request fields (a job's payload or /png-info's `parameters`).
// Fields the parameters do not mention go back to their defaults, as in the original request.
export function fillForm(p) {
  reset();
  if (typeof p.prompt === "string") byId("prompt").value = p.prompt;
  if (typeof p.negative_prompt === "string") byId("negative_prompt").value = p.negative_prompt;
  if (p.model) choose("model", p.model, "not installed");
  if (p.sampler_name) choose("sampler_name", p.sampler_name);
  if (p.scheduler_type) choose("scheduler_type", p.scheduler_type);
  for (const f of NUMBER_FIELDS) if (!f.includes(".")) setNumber(f, p[f]);
  if (p.fileType) choose("fileType", String(p.fileType).toLowerCase() === "png" ? "png" : "jpg");
  const seed = p.seed === undefined || p.seed === null ? -1 : Number(p.seed);
  byId("seed-random").checked = !(seed >= 0);
  if (seed >= 0) byId("seed").value = String(seed);
  syncSeed();
  for (const l of p.loras || []) {
    if (typeof l === "string") addLora(l, 1); else if (l && l.name) addLora(l.name, l.scale ?? 1);
  }
  // Native `hires`, or A1111's flat fields (enable_hr, hr_scale, ...).
  const hires = p.hires || (truthy(p.enable_hr) ? {enabled: true, scale: p.hr_scale, upscaler: p.hr_upscaler,
                                                   steps: p.hr_second_pass_steps, denoising_strength: p.denoising_strength}
                                               : null);
  if (hires && hires.enabled !== false) {
    byId("hires.enabled").checked = true;
    setNumber("hires.scale", hires.scale);
    if (hires.upscaler) choose("hires.upscaler", hires.upscaler);
    setNumber("hires.steps", hires.steps);
    setNumber("hires.denoising_strength", hires.denoising_strength);
    byId("hires-box").open = true;
  }
  if (p.refiner_checkpoint) {
    choose("refiner_checkpoint", p.refiner_checkpoint, "not installed");
    byId("refiner-box").open = true;
  }
  if (p.resize_mode !== undefined && p.resize_mode !== null) choose("resize_mode", p.resize_mode);
  if (p.inpainting_fill !== undefined && p.inpainting_fill !== null) choose("inpainting_fill", p.inpainting_fill);
  if (p.inpaint_full_res !== undefined) byId("inpaint_full_res").checked = truthy(p.inpaint_full_res);
  if (p.inpainting_mask_invert !== undefined) byId("inpainting_mask_invert").checked = truthy(p.inpainting_mask_invert);
  if (p.preview && typeof p.preview === "object") {
    byId("preview.enabled").checked = true;
    setNumber("preview.every", p.preview.every);
    if (p.preview.method) choose("preview.method", p.preview.method);
  }
  // Settings that live in the closed "Output" box are shown when they differ from the defaults.
  if (Number(p.clip_skip) > 1 || byId("fileType").value !== defaults?.fileType) byId("output-box").open = true;
}

export function syncSeed() {
  byId("seed").disabled = byId("seed-random").checked;
}
byId("seed-random").addEventListener("change", () => {
  syncSeed();
  if (!byId("seed-random").checked) byId("seed").focus();
});

// ---- errors ------------------------------------------------------------------------------------
function locPath(loc) {
  const parts = (loc || []).map(String);
  while (parts.length && ["body", "query", "path"].includes(parts[0])) parts.shift();
  // "loras[0].name" (a RequestError field) and ["loras", 0, "name"] (pydantic) read the same.
  return parts.join(".").replace(/\[(\d+)\]/g, ".$1").replace(/^\./, "");
}

function fieldFor(path) {
  const parts = path.split(".").filter(Boolean);
  while (parts.length) {
    const el = document.querySelector(`[data-field="${CSS.escape(parts.join("."))}"]`);
    if (el) return el;
    parts.pop();
  }
  return null;
}

function controlIn(container) {
  return container.matches("input, select, textarea") ? container
    : container.querySelector("input:not([type=hidden]), select, textarea");
}

export function setFieldError(container, message) {
  let p = [...container.children].find((c) => c.classList.contains("error") && c.dataset.generated);
  if (!p) {
    p = document.createElement("p");
    p.className = "error";
    p.dataset.generated = "1";
    p.id = `err-${(container.dataset.field || "x").replace(/[^\w-]/g, "-")}`;
    container.append(p);
  }
  p.textContent = p.hidden || !p.textContent ? message : `${p.textContent}; ${message}`;
  p.hidden = false;
  const control = controlIn(container);
  if (control) {
    control.setAttribute("aria-invalid", "true");
    const ids = new Set((control.getAttribute("aria-describedby") || "").split(/\s+/).filter(Boolean));
    ids.add(p.id);
    control.setAttribute("aria-describedby", [...ids].join(" "));
  }
  for (let d = container.closest("details"); d; d = d.parentElement.closest("details")) d.open = true;
  return control;
}

export function clearErrors() {
  for (const p of document.querySelectorAll("p.error[data-generated]")) { p.hidden = true; p.textContent = ""; }
  for (const el of document.querySelectorAll("[aria-invalid=true]")) el.removeAttribute("aria-invalid");
  const summary = byId("form-error");
  summary.hidden = true;
  summary.textContent = "";
}

// Shows an ApiError: each `detail` entry next to the field its `loc` names; the `error` text
// in the summary at the top of the form. Returns true when some field got its message.
export function showErrors(err, {fallbackField} = {}) {
  clearErrors();
  const body = err.body || {};
  const details = Array.isArray(body.detail) ? body.detail : [];
  let first = null;
  for (const d of details) {
    const container = fieldFor(locPath(d.loc));
    if (!container) continue;
    const control = setFieldError(container, String(d.msg || body.error || "invalid").replace(/^Value error, /, ""));
    first = first || control;
  }
  if (!details.length && typeof body.error === "string") {
    // Errors without `detail` still start with the field they are about ("steps: ...").
    const m = body.error.match(/^([A-Za-z_][\w.[\]]*): (.*)$/s);
    const container = (m && fieldFor(locPath([m[1]]))) || (fallbackField && fieldFor(fallbackField));
    if (container) first = setFieldError(container, m && fieldFor(locPath([m[1]])) ? m[2] : body.error);
  }
  const summary = byId("form-error");
  summary.textContent = `${err.status ? `Error ${err.status}: ` : ""}${body.error || err.message}`;
  summary.hidden = false;
  if (first) first.focus();
  return Boolean(first);
}
