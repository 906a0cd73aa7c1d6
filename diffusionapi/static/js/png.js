// A 1×1 PNG that carries a pasted infotext in its "parameters" text chunk, so that /png-info —
// the one place that parses parameters — reads pasted text the same way as a dropped image.

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

function crc32(bytes) {
  let c = 0xffffffff;
  for (const b of bytes) c = CRC_TABLE[(c ^ b) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function chunk(type, data) {
  const out = new Uint8Array(12 + data.length);
  const view = new DataView(out.buffer);
  view.setUint32(0, data.length);
  out.set(new TextEncoder().encode(type), 4);
  out.set(data, 8);
  view.setUint32(8 + data.length, crc32(out.subarray(4, 8 + data.length)));
  return out;
}

// iTXt (UTF-8): keyword, NUL, compression flag 0, method 0, empty language and translated keyword.
function itxt(keyword, text) {
  const enc = new TextEncoder();
  const head = enc.encode(keyword);
  const body = enc.encode(text);
  const data = new Uint8Array(head.length + 5 + body.length);
  data.set(head, 0);
  data.set(body, head.length + 5); // the five bytes between are 0
  return chunk("iTXt", data);
}

export async function pngWithInfotext(text) {
  const canvas = document.createElement("canvas");
  canvas.width = canvas.height = 1;
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
  const png = new Uint8Array(await blob.arrayBuffer());
  const iend = png.length - 12; // IEND is the last chunk, always 12 bytes
  const extra = itxt("parameters", text);
  const out = new Uint8Array(png.length + extra.length);
  out.set(png.subarray(0, iend), 0);
  out.set(extra, iend);
  out.set(png.subarray(iend), iend + extra.length);
  let bin = "";
  for (const b of out) bin += String.fromCharCode(b);
  return `data:image/png;base64,${btoa(bin)}`;
}
