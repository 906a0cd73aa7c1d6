"""DiffusionAPI benchmarks: every figure is a ratio of two things measured side by side in one run.

    .venv/bin/python benchmarks/run.py [--quick] [--device cpu|cuda] [--out benchmarks/results/latest.json]

Not part of the test suite: it prints a table and writes JSON, and never fails on a slow machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import httpx  # noqa: E402
import psutil  # noqa: E402

from bench_model import build_bench_pipeline, install_bench_model  # noqa: E402

SIZE, STEPS = 256, 10
REQ = dict(prompt="a lighthouse on a cliff at dusk", negative_prompt="", width=SIZE, height=SIZE, steps=STEPS,
           cfg_scale=7.0, sampler_name="Euler", scheduler_type="default", fileType="png")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    def __init__(self, work: Path, models: Path, loras: Path, device: str, **env):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        work.mkdir(parents=True, exist_ok=True)
        e = {**os.environ, "DIFFUSIONAPI_MODELS_DIR": str(models), "DIFFUSIONAPI_LORAS_DIR": str(loras),
             "DIFFUSIONAPI_OUTPUTS_DIR": str(work / "out"), "DIFFUSIONAPI_QUEUE_DIR": str(work / "queue"),
             "DIFFUSIONAPI_DEVICE": device, "DIFFUSIONAPI_MODEL_LABELS": str(work / "labels.json"),
             "DIFFUSIONAPI_MAX_QUEUED_JOBS": "1000",
             **{f"DIFFUSIONAPI_{k.upper()}": str(v) for k, v in env.items()}}
        self.proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "diffusionapi.main:app", "--port",
                                      str(self.port), "--log-level", "warning"], env=e, cwd=work)
        self.client = httpx.Client(base_url=self.url, timeout=600)
        for _ in range(600):
            try:
                if self.client.get("/hello").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        self.ps = psutil.Process(self.proc.pid)

    def job(self, poll_hz: float | None = 10, **overrides) -> dict:
        """Submit, then poll at poll_hz (None: long-poll) until done. Returns the final body + wall time."""
        t0 = time.perf_counter()
        job = self.client.post("/txt2img", json={**REQ, **overrides}).json()["job_id"]
        while True:
            if poll_hz is None:
                body = self.client.get(f"/queue/{job}", params={"wait": 60}).json()
            else:
                body = self.client.get(f"/queue/{job}").json()
            if body["state"] in ("done", "error", "cancelled"):
                break
            if poll_hz is not None:  # a long-poll that came back early just asks again
                time.sleep(1 / poll_hz)
        body["wall"] = time.perf_counter() - t0
        assert body["state"] == "done", body
        return body

    def rss_mb(self) -> float:
        return self.ps.memory_info().rss / 2**20

    def close(self):
        self.proc.terminate()
        self.proc.wait(30)


def direct_pipeline(model_dir: Path, device: str):
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from diffusionapi.demo import _quiet

    _quiet()
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), dtype=dtype, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False,
                                                   local_files_only=True).to(device)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def direct_call(pipe, seed: int):
    import torch

    return pipe(REQ["prompt"], negative_prompt="", num_inference_steps=STEPS, height=SIZE, width=SIZE,
                guidance_scale=REQ["cfg_scale"], generator=torch.Generator("cpu").manual_seed(seed)).images[0]


PER_JOB_SCRIPT = """
import sys, torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
from diffusers.utils import logging
logging.disable_progress_bar()
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], safety_checker=None, feature_extractor=None,
    requires_safety_checker=False, local_files_only=True)
pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
pipe.set_progress_bar_config(disable=True)
img = pipe("a lighthouse on a cliff at dusk", num_inference_steps=%d, height=%d, width=%d,
           generator=torch.Generator().manual_seed(int(sys.argv[2]))).images[0]
img.save(sys.argv[3])
""" % (STEPS, SIZE, SIZE)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q / 100 * len(xs))) - 1))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "latest.json")
    args = ap.parse_args()
    n = 3 if args.quick else 6
    results: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "device": args.device,
                                 "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")},
                     "settings": {"size": SIZE, "steps": STEPS, "sampler": "Euler (default schedule)"}}
    work = Path(tempfile.mkdtemp(prefix="dapi-bench-"))
    models, loras = work / "models", work / "loras"
    print("building bench models ...", flush=True)
    install_bench_model(models / "bench-a", seed=0)
    install_bench_model(models / "bench-b", seed=1)
    from tests.tiny_files import write_tiny_lora

    bp = build_bench_pipeline(0)
    write_tiny_lora(bp, loras / "l1.safetensors", "kohya", seed=1, strength=0.05)
    write_tiny_lora(bp, loras / "l2.safetensors", "kohya", seed=2, strength=0.05)
    del bp

    # 1. overhead: N sequential HTTP jobs vs N direct diffusers calls, interleaved in rounds.
    svc = Service(work / "s1", models, loras, args.device)
    (work / "s1").mkdir(exist_ok=True)
    svc.job(model="bench-a", seed=0)  # load once, as the direct pipeline loads once
    pipe = direct_pipeline(models / "bench-a", args.device)
    direct_call(pipe, 0)
    t_direct, t_http, t_long, gen_times = [], [], [], []
    for rnd in range(2):
        t0 = time.perf_counter()
        for i in range(n):
            direct_call(pipe, i)
        t_direct.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(n):
            gen_times.append(svc.job(model="bench-a", seed=i)["generation_time_sec"])
        t_http.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for i in range(n):
            svc.job(poll_hz=None, model="bench-a", seed=i)
        t_long.append(time.perf_counter() - t0)
    results["overhead"] = {
        "jobs": 2 * n, "direct_s": sum(t_direct), "http_poll_10hz_s": sum(t_http), "http_long_poll_s": sum(t_long),
        "ratio_poll_10hz": sum(t_http) / sum(t_direct), "ratio_long_poll": sum(t_long) / sum(t_direct),
        "worker_generation_s_mean": statistics.mean(gen_times), "direct_s_per_image": sum(t_direct) / (2 * n)}
    del pipe

    # 5. poll latency while a generation runs: 20 pollers at 10 Hz.
    job = svc.client.post("/txt2img", json={**REQ, "model": "bench-a", "steps": 40}).json()["job_id"]
    lat: list[float] = []
    hello: list[float] = []
    stop = threading.Event()

    def poller(path, sink):
        with httpx.Client(base_url=svc.url, timeout=30) as c:
            while not stop.is_set():
                t0 = time.perf_counter()
                r = c.get(path)
                sink.append((time.perf_counter() - t0) * 1000)
                if r.json().get("state") in ("done", "error"):
                    stop.set()
                time.sleep(0.1)

    while svc.client.get("/queue").json()["jobs"][0]["state"] != "processing":
        time.sleep(0.05)
    threads = [threading.Thread(target=poller, args=(f"/queue/{job}" if i else "/hello", lat if i else hello))
               for i in range(21)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results["poll_latency_ms"] = {"pollers": 20, "hz_each": 10, "n": len(lat), "p50": pct(lat, 50),
                                  "p99": pct(lat, 99), "hello_p99": pct(hello, 99)}

    # 6. memory over 50 small jobs.
    rss = []
    for i in range(20 if args.quick else 50):
        svc.job(poll_hz=None, model="bench-a", seed=i, width=128, height=128, steps=4,
                loras=[["l1"], ["l2"], []][i % 3])
        rss.append(svc.rss_mb())
    results["memory_mb"] = {"jobs": len(rss), "rss_after_first": rss[0], "rss_after_10": rss[9],
                            "rss_after_last": rss[-1], "growth_10_to_last": rss[-1] - rss[9], "peak": max(rss)}

    # 4. LoRA switch: two jobs with different LoRAs vs two without (LoRAs already cached, then cold).
    t_none = [svc.job(poll_hz=None, model="bench-a", seed=i, loras=[])["generation_time_sec"] for i in range(2)]
    t_lora = [svc.job(poll_hz=None, model="bench-a", seed=i, loras=[name])["generation_time_sec"]
              for i, name in enumerate(("l1", "l2"))]
    results["lora_switch"] = {"two_jobs_no_lora_s": sum(t_none), "two_jobs_different_loras_s": sum(t_lora),
                              "ratio": sum(t_lora) / sum(t_none)}
    svc.close()

    # 2. versus the seed's design: a fresh process that loads the model for every job.
    t0 = time.perf_counter()
    for i in range(5):
        subprocess.run([sys.executable, "-c", PER_JOB_SCRIPT, str(models / "bench-a"), str(i),
                        str(work / f"pj{i}.png")], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    t_proc = time.perf_counter() - t0
    (work / "s2").mkdir(exist_ok=True)
    svc = Service(work / "s2", models, loras, args.device)
    t0 = time.perf_counter()
    for i in range(5):
        svc.job(poll_hz=10, model="bench-a", seed=i)  # includes the one model load
    t_svc = time.perf_counter() - t0
    svc.close()
    results["per_job_subprocess"] = {"jobs": 5, "subprocess_s": t_proc, "service_s": t_svc, "ratio": t_proc / t_svc}

    # 3. model switch A -> B -> A: cache of 1 (reload every switch) vs cache of 2.
    switch = {}
    for size in (1, 2):
        (work / f"m{size}").mkdir(exist_ok=True)
        svc = Service(work / f"m{size}", models, loras, args.device, pipeline_cache_size=size)
        jobs = [svc.job(poll_hz=None, model=m, seed=0) for m in ("bench-a", "bench-b", "bench-a")]
        svc.close()
        switch[size] = ([j["wall"] for j in jobs], [j["load_time_sec"] for j in jobs])
    results["model_switch"] = {"cache1_A_B_A_s": switch[1][0], "cache2_A_B_A_s": switch[2][0],
                               "cache1_load_s": switch[1][1], "cache2_load_s": switch[2][1],
                               "third_job_ratio_cold_vs_cached": switch[1][0][2] / switch[2][0][2]}

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    o, p, m, l, s, w = (results[k] for k in ("overhead", "poll_latency_ms", "memory_mb", "lora_switch",
                                              "per_job_subprocess", "model_switch"))
    rows = [
        ("overhead: HTTP (10 Hz polls) / direct diffusers", f"{o['ratio_poll_10hz']:.3f}", "(+ poll quantization)"),
        ("worker time per job / direct diffusers call", f"{o['worker_generation_s_mean'] / o['direct_s_per_image']:.3f}", ""),
        ("overhead: HTTP (long-poll) / direct diffusers", f"{o['ratio_long_poll']:.3f}", "<= 1.03"),
        ("direct diffusers s/image", f"{o['direct_s_per_image']:.2f}", ""),
        ("per-job subprocess / service (5 jobs)", f"{s['ratio']:.2f}x", "higher is better"),
        ("model switch A->B->A, 3rd job cold/cached", f"{w['third_job_ratio_cold_vs_cached']:.2f}x", ""),
        ("  load s of the 3rd job: cache 1 / cache 2", f"{w['cache1_load_s'][2]:.2f} / {w['cache2_load_s'][2]:.2f}", ""),
        ("LoRA switch: 2 jobs different LoRAs / none", f"{l['ratio']:.3f}", ""),
        ("poll p50 / p99 ms (20 pollers x 10 Hz)", f"{p['p50']:.1f} / {p['p99']:.1f}", "p99 < 50"),
        ("/hello p99 ms meanwhile", f"{p['hello_p99']:.1f}", ""),
        (f"RSS MB after 1 / 10 / {m['jobs']} jobs", f"{m['rss_after_first']:.0f} / {m['rss_after_10']:.0f} / "
                                                    f"{m['rss_after_last']:.0f}", "no growth"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\nDiffusionAPI benchmarks ({results['machine']['platform']}, {os.cpu_count()} CPUs, device {args.device})")
    for name, val, target in rows:
        print(f"  {name:<{width}}  {val:>16}  {target}")
    print(f"\nJSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
