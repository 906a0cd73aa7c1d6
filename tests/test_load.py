"""200 jobs from 20 concurrent clients while others poll: nothing lost, nothing twice, /hello answers.

(How fast /hello answers under this load is a figure of benchmarks/load.py, not a test.)"""
from __future__ import annotations

import base64
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from PIL import Image

from .conftest import LiveServer, make_settings

JOBS, CLIENTS = 200, 20


def test_200_jobs_20_clients(model_store, tmp_path):
    settings = make_settings(model_store, tmp_path, max_queued_jobs=JOBS + 10)
    with LiveServer(settings) as s:
        stop = threading.Event()
        hellos: list[int] = []

        def hello_prober():
            with httpx.Client(base_url=s.url, timeout=30) as c:
                while not stop.is_set():
                    hellos.append(c.get("/hello").status_code)
                    time.sleep(0.02)

        def client(k: int) -> list[dict]:
            results = []
            with httpx.Client(base_url=s.url, timeout=60) as c:
                ids = []
                for i in range(JOBS // CLIENTS):
                    r = c.post("/txt2img", json={"prompt": f"client {k} job {i}", "width": 64, "height": 64,
                                                 "steps": 2, "seed": k * 1000 + i, "model": "tiny-sd15",
                                                 "fileType": "png" if i % 2 else "jpg"})
                    assert r.status_code == 200, r.text
                    ids.append(r.json()["job_id"])
                for job in ids:
                    while True:
                        body = c.get(f"/queue/{job}").json()
                        if body["state"] in ("done", "error", "cancelled"):
                            results.append(body)
                            assert c.get(f"/queue/{job}").status_code == 404  # exactly once
                            break
                        time.sleep(0.1)  # 10 Hz, a realistic client
            return results

        probers = [threading.Thread(target=hello_prober) for _ in range(2)]
        for p in probers:
            p.start()
        with ThreadPoolExecutor(CLIENTS) as pool:
            results = [r for rs in pool.map(client, range(CLIENTS)) for r in rs]
        stop.set()
        for p in probers:
            p.join()

        assert len(results) == JOBS
        assert all(r["state"] == "done" for r in results), [r["error"] for r in results if r["state"] != "done"][:3]
        assert len({r["job_id"] for r in results}) == JOBS
        paths = {r["output_path"] for r in results}
        assert len(paths) == JOBS
        for r in results:
            Image.open(io.BytesIO(base64.b64decode(r["image"]))).load()
        assert len(list(settings.outputs_dir.iterdir())) == JOBS
        assert not list(settings.queue_dir.glob("*.json"))
        assert hellos and set(hellos) == {200}
