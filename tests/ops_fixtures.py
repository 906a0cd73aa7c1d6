"""A real Prometheus server (Debian's ``prometheus`` package, scripts/system-deps.sh) for the
operating tests: it scrapes the given targets every second; ``query`` asks its HTTP API."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx

from tests.cluster_fixtures import stop_process
from tests.conftest import free_port

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


class Prometheus:
    def __init__(self, workdir: Path, targets: dict[str, str]):
        """``targets``: job name -> "host:port" (scraped at /metrics)."""
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        jobs = "".join(f"  - job_name: {name}\n    scrape_interval: 1s\n    scrape_timeout: 1s\n"
                       f"    static_configs:\n      - targets: [{json.dumps(t)}]\n" for name, t in targets.items())
        (self.dir / "prometheus.yml").write_text("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
                                                 "scrape_configs:\n" + jobs)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> "Prometheus":
        if not Path(PROMETHEUS).exists():
            raise RuntimeError("prometheus is not installed (scripts/system-deps.sh installs it)")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={self.dir / 'prometheus.yml'}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=open(self.dir / "prometheus.log", "ab"), stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("prometheus exited: " + (self.dir / "prometheus.log").read_text()[-2000:])
            try:
                if httpx.get(self.url + "/-/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("prometheus did not become ready")

    def stop(self) -> None:
        stop_process(self.proc)

    def query(self, promql: str) -> dict[tuple, float]:
        """An instant query: {sorted label items (without __name__): value}."""
        r = httpx.get(self.url + "/api/v1/query", params={"query": promql}, timeout=10)
        r.raise_for_status()
        out = {}
        for item in r.json()["data"]["result"]:
            labels = tuple(sorted((k, v) for k, v in item["metric"].items() if k != "__name__"))
            out[labels] = float(item["value"][1])
        return out

    def value(self, promql: str) -> float | None:
        """The single value of a query that sums to one series (None when it has none yet)."""
        got = self.query(promql)
        return next(iter(got.values())) if got else None

    def wait_value(self, promql: str, expected: float, timeout: float = 60) -> float:
        """Polls until the query returns ``expected`` (scrapes come every second)."""
        deadline = time.time() + timeout
        got = None
        while time.time() < deadline:
            got = self.value(promql)
            if got == expected:
                return got
            time.sleep(0.5)
        raise AssertionError(f"{promql}: {got}, expected {expected}")

    def targets_up(self) -> dict[str, str]:
        r = httpx.get(self.url + "/api/v1/targets", timeout=10).json()
        return {t["labels"]["job"]: t["health"] for t in r["data"]["activeTargets"]}
