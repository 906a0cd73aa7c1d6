// HTTP access to the service: the API key header, JSON errors, the job event stream.
//
// EventSource cannot send headers, so the event stream is read with fetch() and parsed here;
// the key never goes into a URL (URLs end up in logs). When the stream is unavailable
// (an older server, a proxy that buffers), the job is followed by long-polling GET /queue/{id}?wait=.

import {FINAL_STATES as FINAL} from "./states.js";

const KEY_STORAGE = "diffusionapi.apiKey";

export function getKey() {
  try { return localStorage.getItem(KEY_STORAGE) || ""; } catch { return ""; }
}

export function setKey(key) {
  try {
    if (key) localStorage.setItem(KEY_STORAGE, key); else localStorage.removeItem(KEY_STORAGE);
  } catch { /* storage disabled: the key lives for this page only */ }
}

// Paths are relative to the page, so the playground also works behind a path prefix.
export function apiUrl(path) {
  return new URL(path.replace(/^\//, ""), document.baseURI).toString();
}

function headers(extra = {}) {
  const h = {...extra};
  const key = getKey();
  if (key) h["X-API-Key"] = key;
  return h;
}

export class ApiError extends Error {
  constructor(status, body) {
    super((body && (body.error || body.detail && JSON.stringify(body.detail))) || `HTTP ${status}`);
    this.status = status;
    this.body = body || {};
  }
}

async function parseBody(response) {
  const text = await response.text();
  if (!text) return null;
  try { return JSON.parse(text); } catch { return {error: text.slice(0, 500)}; }
}

export async function api(path, {method = "GET", body, signal} = {}) {
  const init = {method, signal, cache: "no-store",
                headers: headers(body === undefined ? {} : {"Content-Type": "application/json"})};
  if (body !== undefined) init.body = JSON.stringify(body);
  let response;
  try {
    response = await fetch(apiUrl(path), init);
  } catch (e) {
    if (signal && signal.aborted) throw e;
    throw new ApiError(0, {error: `cannot reach the server (${e.message})`});
  }
  const data = await parseBody(response);
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

// Server-sent events over fetch: yields {event, data} with data already JSON-parsed.
export async function* readEvents(path, signal) {
  const response = await fetch(apiUrl(path), {signal, cache: "no-store",
                                               headers: headers({Accept: "text/event-stream"})});
  const type = response.headers.get("content-type") || "";
  if (!response.ok || !type.startsWith("text/event-stream")) {
    throw new ApiError(response.status, await parseBody(response));
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = "message";
  let data = [];
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, cut).replace(/\r$/, "");
      buffer = buffer.slice(cut + 1);
      if (line === "") {
        if (data.length) {
          const text = data.join("\n");
          let parsed;
          try { parsed = JSON.parse(text); } catch { parsed = text; }
          yield {event, data: parsed};
        }
        event = "message";
        data = [];
        continue;
      }
      if (line.startsWith(":")) continue; // keep-alive comment
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      const val = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
      if (field === "event") event = val;
      else if (field === "data") data.push(val);
    }
  }
}

// Follows a job to its end. `on(kind, data)` gets the stream's events (queued, started,
// progress, preview) or, when polling, kind "status" with the /queue/{id} JSON.
// Resolves with the final /queue/{id} JSON (done, error or cancelled): read exactly once.
export async function followJob(jobId, on, signal) {
  const id = encodeURIComponent(jobId);
  try {
    for await (const {event, data} of readEvents(`queue/${id}/events`, signal)) {
      if (FINAL.has(event)) return data;
      on(event, data);
    }
  } catch (e) {
    if (signal && signal.aborted) throw e;
    // An unavailable stream is not a failed job: carry on by polling.
  }
  on("polling", {});
  for (;;) {
    const status = await api(`queue/${id}?wait=1`, {signal});
    if (FINAL.has(status.state)) return status;
    on("status", status);
  }
}
