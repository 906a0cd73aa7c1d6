"""200 jobs from 20 concurrent clients while others poll: nothing lost, nothing twice, /hello answers.

The clients run in a process of their own, as real clients do: in the server's process their
threads would compete with the server for one interpreter lock, and the test would measure that.
(How fast /hello answers under this load is a figure of benchmarks/load.py, not a test.)"""
from __future__ import annotations

import base64
import io
import json
import subprocess
import sys

import pytest
from PIL import Image

from .conftest import LiveServer, make_settings

pytestmark = pytest.mark.slow

JOBS, CLIENTS = 200, 20

# Run as ``python -c CLIENTS_SCRIPT <url> <jobs> <clients>``; prints one JSON object.
CLIENTS_SCRIPT = r"""
import json, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
import httpx

url, jobs, clients = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
stop = threading.Event()
hellos = []

def hello_prober():
    with httpx.Client(base_url=url, timeout=30) as c:
        while not stop.is_set():
            hellos.append(c.get("/hello").status_code)
            time.sleep(0.02)

def client(k):
    results, problems = [], []
    with httpx.Client(base_url=url, timeout=60) as c:
        ids = []
        for i in range(jobs // clients):
            r = c.post("/txt2img", json={"prompt": f"client {k} job {i}", "width": 64, "height": 64,
                                         "steps": 2, "seed": k * 1000 + i, "model": "tiny-sd15",
                                         "fileType": "png" if i % 2 else "jpg"})
            if r.status_code != 200:
                problems.append(f"submit: {r.status_code} {r.text[:200]}")
                continue
            ids.append(r.json()["job_id"])
        for job in ids:
            while True:
                body = c.get(f"/queue/{job}").json()
                if body["state"] in ("done", "error", "cancelled"):
                    results.append(body)
                    again = c.get(f"/queue/{job}").status_code
                    if again != 404:  # exactly once
                        problems.append(f"{job}: read again gave {again}")
                    break
                time.sleep(0.1)  # 10 Hz, a realistic client
    return results, problems

probers = [threading.Thread(target=hello_prober) for _ in range(2)]
for p in probers:
    p.start()
with ThreadPoolExecutor(clients) as pool:
    outs = list(pool.map(client, range(clients)))
stop.set()
for p in probers:
    p.join()
print(json.dumps({"results": [r for rs, _ in outs for r in rs], "problems": [p for _, ps in outs for p in ps],
                  "hellos": sorted(set(hellos)), "hello_count": len(hellos)}))
"""


def test_200_jobs_20_clients(model_store, tmp_path):
    settings = make_settings(model_store, tmp_path, max_queued_jobs=JOBS + 10)
    with LiveServer(settings) as s:
        run = subprocess.run([sys.executable, "-c", CLIENTS_SCRIPT, s.url, str(JOBS), str(CLIENTS)],
                             capture_output=True, text=True, timeout=1500)
        assert run.returncode == 0, run.stderr[-3000:]
        out = json.loads(run.stdout)

    assert not out["problems"], out["problems"][:5]
    results = out["results"]
    assert len(results) == JOBS
    assert all(r["state"] == "done" for r in results), [r.get("error") for r in results if r["state"] != "done"][:3]
    assert len({r["job_id"] for r in results}) == JOBS
    paths = {r["output_path"] for r in results}
    assert len(paths) == JOBS
    for r in results:
        Image.open(io.BytesIO(base64.b64decode(r["image"]))).load()
    assert len(list(settings.outputs_dir.iterdir())) == JOBS
    assert not [p for p in settings.queue_dir.glob("*.json") if not p.name.startswith(".")]  # job records (dotfiles: the service's own state)
    assert out["hello_count"] and out["hellos"] == [200]
