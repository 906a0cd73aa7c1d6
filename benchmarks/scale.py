"""Scale-out figures: the Celery backend (RabbitMQ + Redis) beside the embedded backend. CPU only.

    .venv/bin/python benchmarks/scale.py [--quick] [--jobs 1000] [--sleep 1.0] [--workers 1,4,16] [--parts throughput,latency,overhead,affinity]

1. Throughput with a sleep-engine (each job sleeps ``--sleep`` seconds instead of generating):
   1, 4 and 16 worker processes on ``--jobs`` queued jobs; ratio vs one worker and efficiency
   (ratio / workers; the goal is >= 0.9). The embedded backend (one in-process worker) beside it.
2. Submit latency at ``--rate`` requests/s (open loop, after 2 s of the same load not counted)
   spread over 2 API nodes, vs one embedded server.
3. Per-job queue overhead on tiny real jobs (wall time of submit + long-poll minus the worker's
   own generation time), Celery vs embedded; and model reloads with two models on two workers
   (affinity: each worker prefers the model it loaded first).

It starts private RabbitMQ and Redis servers (Debian packages; see scripts/system-deps.sh),
prints a table, writes benchmarks/results/scale.json, and never fails on a slow machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from tests.cluster_fixtures import RabbitMQServer, RedisServer, free_port  # noqa: E402

WARMUP_SEC = 2  # of load at the measured rate before a latency figure, not counted
TINY = dict(prompt="a lighthouse", width=64, height=64, steps=4, fileType="png")


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def settings_env(work: Path, models: Path, **extra) -> dict:
    env = {**os.environ, "DIFFUSIONAPI_MODELS_DIR": str(models), "DIFFUSIONAPI_LORAS_DIR": str(work / "loras"),
           "DIFFUSIONAPI_UPSCALERS_DIR": str(work / "upscalers"), "DIFFUSIONAPI_OUTPUTS_DIR": str(work / "outputs"),
           "DIFFUSIONAPI_QUEUE_DIR": str(work / "queue"), "DIFFUSIONAPI_MODEL_LABELS": str(work / "labels.json"),
           "DIFFUSIONAPI_DEVICE": "cpu", "DIFFUSIONAPI_MAX_QUEUED_JOBS": "100000", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    env.update({f"DIFFUSIONAPI_{k.upper()}": str(v) for k, v in extra.items()})
    return env


def settings_from(env: dict):
    from diffusionapi.config import Settings

    old = dict(os.environ)
    os.environ.update(env)
    try:
        return Settings()
    finally:
        os.environ.clear()
        os.environ.update(old)


class Proc:
    def __init__(self, args, env, cwd: Path, port: int | None = None):
        cwd.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.url = f"http://127.0.0.1:{port}" if port else None
        self.proc = subprocess.Popen([sys.executable, *args], env=env, cwd=cwd, stdout=open(cwd / "log.txt", "ab"),
                                     stderr=subprocess.STDOUT)

    def wait_http(self, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/hello", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"{self.url} did not start")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def sleep_workers(n, sleep, env, root: Path, models=("bench",)):
    procs = [Proc(["-m", "diffusionapi.jobs.backends.celery.cli", "worker", "--device", "cpu", "--models", ",".join(models),
                   "--name", f"sleep{i}", "--sleep-engine", str(sleep)], env, root / f"sleep{i}") for i in range(n)]
    return procs


def wait_live(state, n, hb, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if sum(1 for w in state.workers() if w["heartbeat_age"] <= 3 * hb) >= n:
            return
        time.sleep(0.3)
    raise RuntimeError(f"{n} workers did not come up")


def drain(state, timeout=3600):
    deadline = time.time() + timeout
    while state.size() and time.time() < deadline:
        time.sleep(0.02)
    return time.perf_counter()


def echo_payload(env):
    from diffusionapi.registry import Registry
    from diffusionapi.jobs.resolve import resolve_txt2img
    from diffusionapi.schemas import Txt2ImgRequest

    s = settings_from(env)
    return resolve_txt2img(Txt2ImgRequest(**TINY, model="bench", seed=1), Registry(s), s).echo


def throughput_celery(n, jobs, sleep, env, root, rabbit, redis_srv):
    from diffusionapi.jobs.backends.celery.backend import CeleryBackend

    s = settings_from(env)
    backend = CeleryBackend(s)
    backend.state.r.flushdb()
    rabbit.ctl("purge_queue", "dapi.model.bench")
    payload = echo_payload(env)
    workers = sleep_workers(n, sleep, env, root / f"tp{n}")
    try:
        wait_live(backend.state, n, s.worker_heartbeat_sec)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(lambda _: backend.submit("txt2img", payload), range(jobs)))
        t_submitted = time.perf_counter()
        t_end = drain(backend.state)
        done = sum(1 for j in ids if (f := backend.take_final(j)) is not None and f.status.state == "done")
        return {"workers": n, "jobs": jobs, "done": done, "seconds": round(t_end - t0, 2),
                "jobs_per_sec": round(jobs / (t_end - t0), 2), "submit_seconds": round(t_submitted - t0, 2)}
    finally:
        for w in workers:
            w.stop()
        backend.stop()


def throughput_embedded(jobs, sleep, env):
    from diffusionapi.jobs.backends.embedded import EmbeddedBackend
    from diffusionapi.jobs.backends.celery.sleep_engine import SleepEngine
    from diffusionapi.registry import Registry

    s = settings_from(env)
    backend = EmbeddedBackend(s, Registry(s), lambda: SleepEngine(sleep))
    backend.start()
    payload = echo_payload(env)
    try:
        t0 = time.perf_counter()
        ids = [backend.submit("txt2img", payload) for _ in range(jobs)]
        while backend.queue.size():
            time.sleep(0.02)
        t_end = time.perf_counter()
        done = sum(1 for j in ids if (f := backend.take_final(j)) is not None and f.status.state == "done")
        return {"workers": 1, "jobs": jobs, "done": done, "seconds": round(t_end - t0, 2),
                "jobs_per_sec": round(jobs / (t_end - t0), 2)}
    finally:
        backend.stop()


def _open_loop(urls, rate, seconds, body, threads=64):
    """Open loop: request i is due at t0 + i/rate whatever the earlier ones did; each thread keeps
    one keep-alive connection (plain http.client: an async client costs more CPU than the servers
    on a small box). Latency is measured from the moment a request is sent."""
    import http.client
    import threading
    from urllib.parse import urlsplit

    n = int(rate * seconds)
    data = json.dumps(body).encode()
    lat, late, codes = [], [], {}
    lock = threading.Lock()
    counter = iter(range(n))
    t0 = time.perf_counter() + 0.5

    def client():
        conns = {}
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            url = urls[i % len(urls)]
            due = t0 + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            start = time.perf_counter()
            for attempt in (1, 2):
                reused = url in conns
                try:
                    c = conns.get(url)
                    if c is None:
                        u = urlsplit(url)
                        c = conns[url] = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
                    c.request("POST", "/txt2img", body=data, headers={"content-type": "application/json"})
                    r = c.getresponse()
                    r.read()
                    code = r.status
                    break
                except (OSError, http.client.HTTPException) as e:
                    conns.pop(url, None)
                    code = type(e).__name__
                    # A keep-alive connection the server closed while idle: send again on a new
                    # one, as HTTP clients do (the request never reached the server).
                    if not (reused and attempt == 1 and isinstance(
                            e, (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected))):
                        break
            end = time.perf_counter()
            with lock:
                lat.append((end - start) * 1000)
                late.append(max(0.0, start - due) * 1000)
                codes[code] = codes.get(code, 0) + 1

    workers = [threading.Thread(target=client, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - t0
    return {"requests": n, "achieved_rate": round(n / elapsed, 1), "p50_ms": round(pct(lat, 50), 1),
            "p99_ms": round(pct(lat, 99), 1), "max_ms": round(max(lat), 1),
            "client_late_p99_ms": round(pct(late, 99), 1), "codes": {str(k): v for k, v in codes.items()}}


def serve_embedded_sleep(port: int, sleep: float) -> None:
    """A real uvicorn server, embedded backend, sleep-engine (child process of this benchmark)."""
    import uvicorn

    from diffusionapi.jobs.backends.celery.sleep_engine import SleepEngine
    from diffusionapi.config import Settings
    from diffusionapi.main import create_app

    app = create_app(Settings(), engine_factory=lambda: SleepEngine(sleep))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def submit_latency(rate, seconds, sleep, env, root, redis_srv):
    from diffusionapi.jobs.backends.celery.state import RedisJobState

    out = {}
    state = RedisJobState(redis_srv.url)
    state.r.flushdb()
    workers = sleep_workers(4, sleep, env, root / "lat-workers")
    apis = []
    try:
        wait_live(state, 4, float(env.get("DIFFUSIONAPI_WORKER_HEARTBEAT_SEC", 2)))
        apis = [Proc(["-m", "diffusionapi.jobs.backends.celery.cli", "api", "--host", "127.0.0.1", "--port", str(p),
                      "--log-level", "warning"], env, root / f"api{p}", p) for p in (free_port(), free_port())]
        for a in apis:
            a.wait_http()
        time.sleep(1.5)  # the API nodes' catalog view is warm
        urls = [a.url for a in apis]
        _open_loop(urls, rate, WARMUP_SEC, dict(TINY, model="bench"))  # steady state: threads, connections, caches
        out["celery_2_api_nodes"] = _open_loop(urls, rate, seconds, dict(TINY, model="bench"))
    finally:
        for p in apis + workers:
            p.stop()
    port = free_port()
    emb_env = {**env, "DIFFUSIONAPI_BACKEND": "embedded"}
    emb_env.update(DIFFUSIONAPI_QUEUE_DIR=str(root / "emb-lat" / "queue"))  # its own queue: left jobs stay there
    emb = Proc([__file__, "--serve-embedded", str(port), "--sleep", str(sleep)], emb_env, root / "emb-lat", port)
    try:
        emb.wait_http()
        _open_loop([emb.url], rate, WARMUP_SEC, dict(TINY, model="bench"))
        out["embedded_1_server"] = _open_loop([emb.url], rate, seconds, dict(TINY, model="bench"))
    finally:
        emb.stop()
    return out


def _sequential(url, n, body):
    over, gens = [], []
    with httpx.Client(base_url=url, timeout=120) as c:
        for i in range(n + 1):
            t = time.perf_counter()
            job = c.post("/txt2img", json={**body, "seed": i}).json()["job_id"]
            r = c.get(f"/queue/{job}", params={"wait": 60}).json()
            while r.get("state") in ("queued", "processing"):
                r = c.get(f"/queue/{job}", params={"wait": 60}).json()
            wall = time.perf_counter() - t
            if r.get("state") != "done":
                raise RuntimeError(f"job failed: {r}")
            if i == 0:
                continue  # warm-up: the model's first load
            over.append((wall - r["generation_time_sec"]) * 1000)
            gens.append(r["generation_time_sec"] * 1000)
    return {"jobs": n, "overhead_ms_median": round(statistics.median(over), 1),
            "overhead_ms_p90": round(pct(over, 90), 1), "generation_ms_median": round(statistics.median(gens), 1)}


def real_jobs(n, env, root, redis_srv):
    from diffusionapi.jobs.backends.celery.state import RedisJobState

    out = {}
    state = RedisJobState(redis_srv.url)
    state.r.flushdb()
    port = free_port()
    w = Proc(["-m", "diffusionapi.jobs.backends.celery.cli", "worker", "--device", "cpu", "--models", "bench", "--name", "real1"],
             env, root / "real-worker")
    api = Proc(["-m", "diffusionapi.jobs.backends.celery.cli", "api", "--host", "127.0.0.1", "--port", str(port),
                "--log-level", "warning"], env, root / "real-api", port)
    try:
        wait_live(state, 1, float(env.get("DIFFUSIONAPI_WORKER_HEARTBEAT_SEC", 2)))
        api.wait_http()
        time.sleep(1.5)
        out["celery"] = _sequential(api.url, n, dict(TINY, model="bench"))
    finally:
        api.stop()
        w.stop()
    port = free_port()
    emb = Proc(["-m", "uvicorn", "diffusionapi.main:app", "--port", str(port), "--log-level", "warning"],
               {**env, "DIFFUSIONAPI_BACKEND": "embedded", "DIFFUSIONAPI_QUEUE_DIR": str(root / "real-emb" / "queue")},
               root / "real-emb", port)
    try:
        emb.wait_http()
        out["embedded"] = _sequential(emb.url, n, dict(TINY, model="bench"))
    finally:
        emb.stop()
    return out


def reloads(n, env, root, redis_srv):
    """Two workers, two models (each worker's home model is a different one), jobs alternating."""
    from diffusionapi.jobs.backends.celery.state import RedisJobState

    state = RedisJobState(redis_srv.url)
    state.r.flushdb()
    port = free_port()
    ws = [Proc(["-m", "diffusionapi.jobs.backends.celery.cli", "worker", "--device", "cpu", "--models", models, "--name", f"aff{i}"],
               env, root / f"aff{i}") for i, models in enumerate(("bench,bench2", "bench2,bench"))]
    api = Proc(["-m", "diffusionapi.jobs.backends.celery.cli", "api", "--host", "127.0.0.1", "--port", str(port),
                "--log-level", "warning"], env, root / "aff-api", port)
    try:
        wait_live(state, 2, float(env.get("DIFFUSIONAPI_WORKER_HEARTBEAT_SEC", 2)))
        api.wait_http()
        time.sleep(1.5)
        with httpx.Client(base_url=api.url, timeout=120) as c:
            ids = [c.post("/txt2img", json=dict(TINY, model=("bench", "bench2")[i % 2], seed=i)).json()["job_id"]
                   for i in range(n)]
            results = [c.get(f"/queue/{j}", params={"wait": 60}).json() for j in ids]
        reloaded = sum(1 for r in results if (r.get("load_time_sec") or 0) > 0)
        return {"jobs": n, "models": 2, "workers": 2, "jobs_that_loaded_a_model": reloaded,
                "done": sum(r["state"] == "done" for r in results)}
    finally:
        api.stop()
        for w in ws:
            w.stop()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="200 jobs of 0.2 s, 1/4 workers, 5 s of load")
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--sleep", type=float, default=1.0, help="seconds each sleep-engine job takes (the issue's 1 s)")
    ap.add_argument("--workers", default="1,4,16")
    ap.add_argument("--rate", type=float, default=200)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--real-jobs", type=int, default=20)
    ap.add_argument("--parts", default="throughput,latency,overhead,affinity")
    ap.add_argument("--serve-embedded", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale.json")
    args = ap.parse_args()
    if args.serve_embedded:
        serve_embedded_sleep(args.serve_embedded, args.sleep)
        return 0
    if args.quick:
        args.jobs, args.sleep, args.workers, args.seconds, args.real_jobs = 200, 0.2, "1,4", 5, 8
    counts = [int(x) for x in args.workers.split(",")]
    parts = set(args.parts.split(","))

    from diffusionapi.demo import save_tiny_model

    root = Path(tempfile.mkdtemp(prefix="dapi-scale-"))
    models = root / "models"
    save_tiny_model("sd15", models / "bench")
    save_tiny_model("sd15", models / "bench2")
    rabbit = RabbitMQServer(root / "rabbitmq").start()
    redis_srv = RedisServer(root / "redis").start()
    env = settings_env(root / "work", models, backend="celery", broker_url=rabbit.url, redis_url=redis_srv.url,
                       worker_heartbeat_sec=1.0)
    res = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
           "sleep_sec": args.sleep, "jobs": args.jobs}
    def measure(name, fn, *a):
        # A figure that cannot be taken is reported, not fatal: the others still print.
        for q in ("dapi.model.bench", "dapi.model.bench2"):  # leftovers of the part before
            rabbit.ctl("purge_queue", q)
        try:
            res[name] = fn(*a)
            print(json.dumps({name: res[name]}), flush=True)
        except Exception as e:  # noqa: BLE001
            res.setdefault("failed", {})[name] = f"{type(e).__name__}: {e}"
            print(f"{name}: not measured: {type(e).__name__}: {e}", file=sys.stderr)

    def throughput():
        tp = [throughput_celery(n, args.jobs, args.sleep, env, root, rabbit, redis_srv) for n in counts]
        base = tp[0]["jobs_per_sec"] if tp and tp[0]["workers"] == 1 else None
        for row in tp:
            row["ratio_vs_1"] = round(row["jobs_per_sec"] / base, 2) if base else None
            row["efficiency"] = round(row["ratio_vs_1"] / row["workers"], 3) if base else None
            row["ideal_jobs_per_sec"] = round(row["workers"] / args.sleep, 1)
        return tp

    try:
        if "throughput" in parts:
            measure("throughput_celery", throughput)
            measure("throughput_embedded", throughput_embedded, args.jobs, args.sleep, env)
        if "latency" in parts:
            measure("submit_latency", submit_latency, args.rate, args.seconds, args.sleep, env, root, redis_srv)
        if "overhead" in parts:
            measure("per_job_overhead", real_jobs, args.real_jobs, env, root, redis_srv)
        if "affinity" in parts:
            measure("affinity", reloads, max(8, args.real_jobs), env, root, redis_srv)
    finally:
        rabbit.close()
        redis_srv.stop()

    report(res, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(f"\nwrote {args.out}")
    return 0


def report(res, args) -> None:
    if "throughput_celery" in res and "throughput_embedded" in res:
        _report_throughput(res, args)
    if "submit_latency" in res:
        print(f"\nsubmit latency at {args.rate:g} req/s for {args.seconds:g} s:")
        for k, v in res["submit_latency"].items():
            print(f"  {k:20} p50 {v['p50_ms']} ms, p99 {v['p99_ms']} ms, max {v['max_ms']} ms, "
                  f"achieved {v['achieved_rate']}/s (client late p99 {v['client_late_p99_ms']} ms), {v['codes']}")
    if "per_job_overhead" in res:
        print("\nper-job queue overhead, tiny real jobs (wall of submit + long-poll - generation time):")
        for k, v in res["per_job_overhead"].items():
            print(f"  {k:10} median {v['overhead_ms_median']} ms, p90 {v['overhead_ms_p90']} ms "
                  f"(generation {v['generation_ms_median']} ms)")
    if "affinity" in res:
        a = res["affinity"]
        print(f"\naffinity: {a['jobs']} jobs alternating 2 models on 2 workers: {a['jobs_that_loaded_a_model']} "
              f"loaded a model ({a['done']} done)")


def _report_throughput(res, args) -> None:
    print(f"\nsleep-engine: {args.jobs} jobs of {args.sleep} s, {os.cpu_count()} CPUs")
    print(f"{'backend':10} {'workers':>7} {'jobs/s':>8} {'ideal':>7} {'ratio':>6} {'effic.':>6} {'seconds':>8}")
    for r in res["throughput_celery"]:
        print(f"{'celery':10} {r['workers']:>7} {r['jobs_per_sec']:>8} {r['ideal_jobs_per_sec']:>7} "
              f"{r['ratio_vs_1']!s:>6} {r['efficiency']!s:>6} {r['seconds']:>8}")
    e = res["throughput_embedded"]
    print(f"{'embedded':10} {1:>7} {e['jobs_per_sec']:>8} {round(1 / args.sleep, 1):>7} {'-':>6} {'-':>6} {e['seconds']:>8}")


if __name__ == "__main__":
    sys.exit(main())
