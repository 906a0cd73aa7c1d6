// The ControlNet / IP-Adapter panel: one ControlNet unit and one IP-Adapter (docs/controlnet.md).
// Its choices come from GET /controlnets, /preprocessors and /ipadapters; the preview runs
// POST /controlnet/detect; addTo() puts the units into a request body.

import {api, ApiError} from "./api.js";
import {readAsDataUrl} from "./mask.js";

const byId = (id) => document.getElementById(id);
let controlImage = null;   // data URL
let referenceImage = null; // data URL

function option(value, text) {
  const o = document.createElement("option");
  o.value = value;
  o.textContent = text;
  return o;
}

export async function loadChoices() {
  // The panel is extra: a server without these endpoints leaves it empty, the page still works.
  try {
    const [cns, pps, ips] = await Promise.all(["controlnets", "preprocessors", "ipadapters"].map((p) => api(p)));
    byId("cn-model").replaceChildren(option("", "None"), ...cns.controlnets.filter((c) => !c.error)
      .map((c) => option(c.name, `${c.name} (${c.family === "sdxl" ? "SDXL" : c.family === "sd15" ? "SD 1.5" : c.family})`)));
    byId("cn-preprocessor").replaceChildren(...pps.preprocessors.filter((p) => p.available)
      .map((p) => option(p.name, p.name)));
    byId("ip-model").replaceChildren(option("", "None"), ...ips.ip_adapters.filter((i) => !i.error && i.image_encoder)
      .map((i) => option(i.name, i.name)));
  } catch (e) {
    if (!(e instanceof ApiError)) throw e;
  }
}

byId("cn-file").addEventListener("change", async (e) => {
  const file = e.target.files[0];
  controlImage = file ? await readAsDataUrl(file) : null;
  byId("cn-preview").hidden = true;
});

byId("ip-file").addEventListener("change", async (e) => {
  const file = e.target.files[0];
  referenceImage = file ? await readAsDataUrl(file) : null;
});

byId("cn-preview-button").addEventListener("click", async () => {
  const error = byId("cn-preview-error");
  error.hidden = true;
  if (!controlImage) {
    error.textContent = "Choose a control image first.";
    error.hidden = false;
    return;
  }
  try {
    const answer = await api("controlnet/detect", {method: "POST", body: {
      controlnet_module: byId("cn-preprocessor").value, controlnet_input_images: [controlImage],
      controlnet_processor_res: Math.min(Number(byId("width").value) || 512, Number(byId("height").value) || 512)}});
    const img = byId("cn-preview");
    img.src = `data:image/png;base64,${answer.images[0]}`;
    img.hidden = false;
  } catch (e) {
    if (!(e instanceof ApiError)) throw e;
    error.textContent = e.message;
    error.hidden = false;
  }
});

function num(id) {
  const raw = byId(id).value.trim();
  const n = Number(raw);
  return raw !== "" && Number.isFinite(n) ? n : raw;
}

// Adds the panel's units to a /txt2img or /img2img body (nothing when no model is chosen).
export function addTo(body) {
  if (byId("cn-model").value) {
    const unit = {model: byId("cn-model").value, preprocessor: byId("cn-preprocessor").value || "none",
                  weight: num("cn-weight"), guidance_start: num("cn-start"), guidance_end: num("cn-end"),
                  control_mode: byId("cn-mode").value, resize_mode: byId("cn-resize").value};
    if (controlImage) unit.image = controlImage;
    body.controlnets = [unit];
  }
  if (byId("ip-model").value) {
    body.ip_adapters = [{model: byId("ip-model").value, images: referenceImage ? [referenceImage] : [],
                         weight: num("ip-weight")}];
  }
  return body;
}
