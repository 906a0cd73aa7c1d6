"""Chaos soak of the Celery deployment: load while its parts fail, then an account of every job.

    .venv/bin/python benchmarks/chaos.py [--seconds 90] [--clients 8] [--sleep 0.3] [--faults all]

Starts private RabbitMQ and Redis (AOF on, as docs/cluster-faults.md recommends), 2 API nodes
and 2 sleep-engine workers (each job sleeps ``--sleep`` s instead of generating). ``--clients``
threads submit (each with its own Idempotency-Key, retried with the same key on any failure, on
either node), cancel one job in 20, and collect each job's final answer, then ask once more.
Meanwhile, one after another, round robin for ``--seconds``: kill -9 a worker (a new one
starts), kill -9 an API node (restarted on its port), restart RabbitMQ, stop Redis for 3 s, a
Redis blip (stop, start at once). Then the load stops and the jobs drain (``--drain`` s at most).

Prints, and writes to benchmarks/results/chaos.json:
  accepted      distinct jobs the clients were given an id for
  done / cancelled / error   their final states as collected
  lost          accepted jobs never final (unknown before their final answer, or still not final)
  served-twice  jobs whose final answer came back a second time
  ran-twice     jobs with an output file on more than one worker, or two "started" events
  dup-submits   keys that were given two different job ids
It never fails: it measures.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from benchmarks.scale import Proc, settings_env  # noqa: E402
from tests.cluster_fixtures import RabbitMQServer, RedisServer, free_port  # noqa: E402

JOB = dict(prompt="chaos", width=64, height=64, steps=2, model="bench")
FINAL = ("done", "error", "cancelled")


class Deployment:
    def __init__(self, root: Path, sleep: float, code: Path | None = None):
        from diffusionapi.demo import save_tiny_model

        self.root, self.sleep = root, sleep
        models = root / "models"
        save_tiny_model("sd15", models / "bench")
        self.rabbit = RabbitMQServer(root / "rabbitmq").start()
        self.redis = RedisServer(root / "redis").start()
        self.env = settings_env(root / "work", models, backend="celery", broker_url=self.rabbit.url,
                                redis_url=self.redis.url, worker_heartbeat_sec=1.0, orphan_grace_sec=5.0)
        if code:  # API nodes and workers run another checkout (a before/after comparison)
            self.env.update(PYTHONPATH=str(code), PYTHONDONTWRITEBYTECODE="1")
        self.ports = [free_port(), free_port()]
        self.api = [self._api(i) for i in range(2)]
        self.workers: list[Proc] = []
        self.worker_dirs: list[Path] = []
        self._gen = 0
        for _ in range(2):
            self.add_worker()
        for a in self.api:
            a.wait_http()

    def _api(self, i: int) -> Proc:
        return Proc(["-m", "diffusionapi.jobs.backends.celery.cli", "api", "--host", "127.0.0.1", "--port",
                     str(self.ports[i]), "--log-level", "warning"], self.env, self.root / f"api{i}", self.ports[i])

    def add_worker(self) -> None:
        self._gen += 1
        d = self.root / f"w{self._gen}"
        self.workers.append(Proc(["-m", "diffusionapi.jobs.backends.celery.cli", "worker", "--device", "cpu",
                                  "--models", "bench", "--name", f"chaos-w{self._gen}", "--sleep-engine",
                                  str(self.sleep)], self.env, d))
        self.worker_dirs.append(d)

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    # ---- the faults
    def kill_worker(self) -> str:
        victim = random.choice([w for w in self.workers if w.proc.poll() is None])
        victim.proc.kill()
        victim.proc.wait()
        self.add_worker()
        return "kill -9 a worker"

    def kill_api(self) -> str:
        i = random.randrange(2)
        self.api[i].proc.kill()
        self.api[i].proc.wait()
        time.sleep(1)
        self.api[i] = self._api(i)
        self.api[i].wait_http()
        return f"kill -9 API node {i}"

    def restart_rabbit(self) -> str:
        self.rabbit.stop()
        self.rabbit.start()
        return "RabbitMQ restart"

    def redis_outage(self) -> str:
        self.redis.stop()
        time.sleep(3)
        self.redis.start()
        return "Redis stopped 3 s"

    def redis_blip(self) -> str:
        self.redis.stop()
        self.redis.start()
        return "Redis blip"

    def close(self) -> None:
        for p in self.api + self.workers:
            if p.proc.poll() is None:
                p.proc.kill()
                p.proc.wait()
        self.rabbit.close()
        self.redis.stop()


class Client(threading.Thread):
    def __init__(self, dep: Deployment, stop: threading.Event, deadline: float, ledger: dict, lock):
        super().__init__(daemon=True)
        self.dep, self.stop_load, self.deadline, self.ledger, self.lock = dep, stop, deadline, ledger, lock

    def run(self) -> None:
        c = httpx.Client(timeout=15)
        while not self.stop_load.is_set():
            key = str(uuid.uuid4())
            jobs = self.submit(c, key)  # more than one: a duplicate submit (each is collected)
            if jobs and random.random() < 0.05:
                self.request(c, "DELETE", f"/queue/{jobs[0]}")
            for job in jobs:
                self.collect(c, job)

    def request(self, c, method, path, **kw):
        url = random.choice(self.dep.urls) + path
        try:
            return c.request(method, url, **kw)
        except httpx.HTTPError:
            return None

    def submit(self, c, key: str) -> list[str]:
        ids = set()
        while time.time() < self.deadline:
            r = self.request(c, "POST", "/txt2img", json=dict(JOB, seed=random.randrange(10 ** 6)),
                             headers={"Idempotency-Key": key})
            if r is not None and r.status_code == 200:
                ids.add(r.json()["job_id"])
                if random.random() < 0.1:  # a client that did not see its answer retries anyway
                    continue
                break
            if self.stop_load.is_set() and not ids:
                return []
            time.sleep(0.3)
        with self.lock:
            if len(ids) > 1:
                self.ledger["dup_submits"] += 1
            for j in ids:
                self.ledger["jobs"].setdefault(j, {"final": None, "served": 0})
        return sorted(ids)

    def collect(self, c, job: str) -> None:
        entry = self.ledger["jobs"][job]
        while time.time() < self.deadline:
            r = self.request(c, "GET", f"/queue/{job}", params={"wait": 5})
            if r is None or r.status_code == 503 or r.status_code >= 500:
                time.sleep(0.3)
                continue
            if r.status_code == 404:
                entry["final"] = entry["final"] or "unknown"
                break
            body = r.json()
            if body["state"] in FINAL:
                with self.lock:
                    entry["final"] = body["state"]
                    entry["served"] += 1
                break
        # Once more: a final answer is served exactly once.
        r = self.request(c, "GET", f"/queue/{job}")
        if r is not None and r.status_code == 200 and r.json().get("state") in FINAL:
            with self.lock:
                entry["served"] += 1


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=90, help="load and faults this long")
    ap.add_argument("--drain", type=float, default=240, help="then at most this long for the jobs to end")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--sleep", type=float, default=0.3, help="seconds each sleep-engine job takes")
    ap.add_argument("--faults", default="worker,api,rabbitmq,redis,blip")
    ap.add_argument("--every", type=float, default=8.0, help="seconds between faults")
    ap.add_argument("--code", type=Path, default=None,
                    help="run the API nodes and workers from this checkout instead (e.g. the code before a fix)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "chaos.json")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="dapi-chaos-"))
    dep = Deployment(root, args.sleep, args.code)
    ledger = {"jobs": {}, "dup_submits": 0}
    lock = threading.Lock()
    stop = threading.Event()
    t0 = time.time()
    deadline = t0 + args.seconds + args.drain
    faults_done: list[str] = []
    try:
        from diffusionapi.jobs.backends.celery.state import RedisJobState

        state = RedisJobState(dep.redis.url)
        wait_until = time.time() + 300
        while len([w for w in state.workers() if w["heartbeat_age"] < 3]) < 2 and time.time() < wait_until:
            time.sleep(0.5)
        clients = [Client(dep, stop, deadline, ledger, lock) for _ in range(args.clients)]
        for cl in clients:
            cl.start()
        kinds = {"worker": dep.kill_worker, "api": dep.kill_api, "rabbitmq": dep.restart_rabbit,
                 "redis": dep.redis_outage, "blip": dep.redis_blip}
        order = [kinds[k] for k in args.faults.split(",") if k in kinds]
        i = 0
        while order:
            time.sleep(args.every)
            started = time.time() - t0
            if started >= args.seconds:
                break
            what = order[i % len(order)]()
            i += 1
            faults_done.append(f"{started:5.1f}s {what} (over at {time.time() - t0:.1f}s)")
            print(faults_done[-1], flush=True)
        while time.time() - t0 < args.seconds:
            time.sleep(0.5)
        stop.set()
        for cl in clients:
            cl.join(max(1.0, deadline - time.time()))
        jobs = ledger["jobs"]
        ran_twice = 0
        for j in jobs:
            outputs = sum((d / "outputs" / f"{j}.jpg").exists() for d in dep.worker_dirs)
            ran_twice += outputs > 1
        counts = Counter(e["final"] for e in jobs.values())
        res = {"code": str(args.code) if args.code else "this checkout", "seconds": args.seconds, "clients": args.clients, "sleep_sec": args.sleep, "faults": faults_done,
               "accepted": len(jobs), "done": counts.get("done", 0), "cancelled": counts.get("cancelled", 0),
               "error": counts.get("error", 0), "lost": counts.get(None, 0) + counts.get("unknown", 0),
               "served_twice": sum(e["served"] > 1 for e in jobs.values()), "ran_twice": ran_twice,
               "dup_submits": ledger["dup_submits"], "wall_sec": round(time.time() - t0, 1)}
        state.close()
    finally:
        stop.set()
        dep.close()
    print(json.dumps(res, indent=2))
    print("\naccepted {accepted}  done {done}  cancelled {cancelled}  error {error}  lost {lost}  "
          "served-twice {served_twice}  ran-twice {ran_twice}  dup-submits {dup_submits}".format(**res))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
