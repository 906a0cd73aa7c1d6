// The img2img input image and the inpainting mask painted over it on a canvas.
//
// The mask canvas has the image's own pixel size; what is painted (any alpha) becomes white in
// the mask sent to the server, everything else black — the convention of /img2img's `mask`.

const byId = (id) => document.getElementById(id);
// Bodies are capped by the server (DIFFUSIONAPI_MAX_BODY_BYTES, 1 MB by default): a larger
// upload is re-encoded as JPEG before it is sent.
const MAX_DATA_URL_CHARS = 700_000;

export function readAsDataUrl(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

export class InitImage {
  constructor() {
    this.area = byId("init-area");
    this.image = byId("init-canvas");
    this.mask = byId("mask-canvas");
    this.error = byId("mask-error");
    this.dataUrl = null;
    this.last = null;
    byId("init-file").addEventListener("change", (e) => {
      if (e.target.files[0]) this.loadFile(e.target.files[0]);
    });
    byId("init-remove").addEventListener("click", () => this.remove());
    byId("mask-clear").addEventListener("click", () => this.clearMask());
    byId("mask-fill").addEventListener("click", () => {
      const ctx = this.mask.getContext("2d");
      ctx.globalCompositeOperation = "source-over";
      ctx.fillStyle = "#ff2d2d";
      ctx.fillRect(0, 0, this.mask.width, this.mask.height);
    });
    this.mask.addEventListener("pointerdown", (e) => this.start(e));
    this.mask.addEventListener("pointermove", (e) => this.move(e));
    for (const type of ["pointerup", "pointercancel", "lostpointercapture"]) {
      this.mask.addEventListener(type, () => { this.last = null; });
    }
  }

  get loaded() {
    return this.dataUrl !== null;
  }

  async loadFile(file) {
    try {
      await this.load(await readAsDataUrl(file));
    } catch (e) {
      this.showError(`cannot read ${file.name} as an image`);
    }
  }

  async load(dataUrl) {
    const img = new Image();
    img.src = dataUrl;
    await img.decode();
    for (const c of [this.image, this.mask]) {
      c.width = img.naturalWidth;
      c.height = img.naturalHeight;
    }
    this.image.getContext("2d").drawImage(img, 0, 0);
    this.clearMask();
    this.dataUrl = dataUrl;
    // The output size starts as the image's own (a multiple of 8, as the server rounds).
    byId("width").value = String(Math.max(8, Math.round(img.naturalWidth / 8) * 8));
    byId("height").value = String(Math.max(8, Math.round(img.naturalHeight / 8) * 8));
    this.area.hidden = false;
    this.showError("");
    byId("img2img-box").open = true;
  }

  remove() {
    this.dataUrl = null;
    this.area.hidden = true;
    byId("init-file").value = "";
  }

  clearMask() {
    this.mask.getContext("2d").clearRect(0, 0, this.mask.width, this.mask.height);
  }

  showError(message) {
    this.error.textContent = message;
    this.error.hidden = !message;
  }

  point(e) {
    const r = this.mask.getBoundingClientRect();
    const scale = this.mask.width / r.width;
    return {x: (e.clientX - r.left) * scale, y: (e.clientY - r.top) * scale, scale};
  }

  start(e) {
    e.preventDefault();
    this.mask.setPointerCapture(e.pointerId);
    this.last = this.point(e);
    this.stroke(this.last, this.last);
  }

  move(e) {
    if (!this.last) return;
    const p = this.point(e);
    this.stroke(this.last, p);
    this.last = p;
  }

  stroke(a, b) {
    const ctx = this.mask.getContext("2d");
    ctx.globalCompositeOperation = byId("brush-erase").checked ? "destination-out" : "source-over";
    ctx.strokeStyle = "#ff2d2d";
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.lineWidth = Number(byId("brush-size").value) * b.scale;
    ctx.beginPath();
    ctx.moveTo(a.x, a.y);
    ctx.lineTo(b.x + 0.01, b.y);
    ctx.stroke();
  }

  hasMask() {
    if (!this.loaded) return false;
    const data = this.mask.getContext("2d").getImageData(0, 0, this.mask.width, this.mask.height).data;
    for (let i = 3; i < data.length; i += 4) if (data[i] > 0) return true;
    return false;
  }

  maskDataUrl() {
    const {width, height} = this.mask;
    const src = this.mask.getContext("2d").getImageData(0, 0, width, height).data;
    const out = document.createElement("canvas");
    out.width = width;
    out.height = height;
    const ctx = out.getContext("2d");
    const img = ctx.createImageData(width, height);
    for (let i = 0; i < src.length; i += 4) {
      const v = src[i + 3] > 0 ? 255 : 0;
      img.data[i] = img.data[i + 1] = img.data[i + 2] = v;
      img.data[i + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
    return out.toDataURL("image/png");
  }

  imageDataUrl() {
    if (this.dataUrl.length <= MAX_DATA_URL_CHARS) return this.dataUrl;
    return this.image.toDataURL("image/jpeg", 0.9);
  }
}
