"""/hello latency while 20 clients push 200 tiny jobs through the server (figures; never fails).

    .venv/bin/python benchmarks/load.py [--jobs 200] [--clients 20]

The test suite's tests/test_load.py checks the same load for behaviour (every job done exactly
once); this prints how fast a cheap endpoint stays meanwhile (target p99 < 100 ms on 2 cores).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--clients", type=int, default=20)
    args = ap.parse_args()
    from diffusionapi.demo import save_tiny_model
    from tests.conftest import LiveServer, make_settings

    work = Path(tempfile.mkdtemp(prefix="dapi-load-"))
    save_tiny_model("sd15", work / "store" / "models" / "tiny-sd15")
    for d in ("loras", "upscalers"):
        (work / "store" / d).mkdir()
    (work / "store" / "labels.json").write_text("{}")
    settings = make_settings(work / "store", work, max_queued_jobs=args.jobs + 10)
    per_client = args.jobs // args.clients
    with LiveServer(settings) as s:
        stop = threading.Event()
        hello_ms: list[float] = []

        def prober():
            with httpx.Client(base_url=s.url, timeout=10) as c:  # one kept-alive client, as real ones do
                while not stop.is_set():
                    t0 = time.perf_counter()
                    c.get("/hello")
                    hello_ms.append((time.perf_counter() - t0) * 1000)
                    time.sleep(0.02)

        def client(k: int) -> int:
            done = 0
            with httpx.Client(base_url=s.url, timeout=60) as c:
                ids = [c.post("/txt2img", json={"prompt": f"c{k} j{i}", "width": 64, "height": 64, "steps": 2,
                                               "seed": k * 1000 + i, "model": "tiny-sd15"}).json()["job_id"]
                       for i in range(per_client)]
                for job in ids:
                    while c.get(f"/queue/{job}", params={"wait": 5}).json()["state"] not in ("done", "error"):
                        pass
                    done += 1
            return done

        probes = [threading.Thread(target=prober) for _ in range(2)]
        for p in probes:
            p.start()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            total = sum(pool.map(client, range(args.clients)))
        wall = time.perf_counter() - t0
        stop.set()
        for p in probes:
            p.join()
    hello_ms.sort()
    p99 = hello_ms[max(int(len(hello_ms) * 0.99) - 1, 0)]
    print(f"{total} jobs in {wall:.1f} s; /hello during load: n={len(hello_ms)} "
          f"p50={statistics.median(hello_ms):.1f} ms p99={p99:.1f} ms (target p99 < 100 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
