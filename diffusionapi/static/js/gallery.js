// This browser's recent results, in IndexedDB (images are too large for localStorage).
// The server forgets a job after its final read; this is where results stay.

const DB_NAME = "diffusionapi-playground";
const STORE = "results";
const KEEP = 60;

let dbPromise = null;

function openDb() {
  if (!dbPromise) {
    dbPromise = new Promise((resolve, reject) => {
      const req = indexedDB.open(DB_NAME, 1);
      req.onupgradeneeded = () => req.result.createObjectStore(STORE, {keyPath: "id"});
      req.onsuccess = () => resolve(req.result);
      req.onerror = () => reject(req.error);
    });
  }
  return dbPromise;
}

function run(mode, fn) {
  return openDb().then((db) => new Promise((resolve, reject) => {
    const tx = db.transaction(STORE, mode);
    const result = fn(tx.objectStore(STORE));
    tx.oncomplete = () => resolve(result && "result" in result ? result.result : undefined);
    tx.onerror = () => reject(tx.error);
  }));
}

export function base64ToBlob(b64, mime) {
  const bin = atob(b64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return new Blob([bytes], {type: mime});
}

// entries: [{id, jobId, created, mime, blob, infotext, payload, seed, width, height}]
export async function addResults(entries) {
  await run("readwrite", (store) => { for (const e of entries) store.put(e); });
  const all = await listResults();
  const old = all.slice(KEEP);
  if (old.length) await run("readwrite", (store) => { for (const e of old) store.delete(e.id); });
}

export async function listResults() {
  const all = await run("readonly", (store) => store.getAll());
  return (all || []).sort((a, b) => b.created - a.created || String(a.id).localeCompare(String(b.id)));
}

export function removeResult(id) {
  return run("readwrite", (store) => { store.delete(id); });
}

export function clearResults() {
  return run("readwrite", (store) => { store.clear(); });
}
