"""Redis without a single point of failure (#32): the cluster's state store behind Sentinel
(``redis+sentinel://`` URLs). A primary, a replica and two sentinels started here; the primary
is killed (-9) with jobs queued and one running: a replica takes over, no job is lost, none runs
twice, and the cluster keeps serving.

Sentinel is ``redis-server --sentinel`` (Debian's ``redis-sentinel`` is the same binary).
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest
import redis

from diffusionapi.jobs.backends.celery.state import RedisJobState
from tests.cluster_fixtures import (REDIS_SERVER, RedisServer, _wait_port, free_port,  # noqa: F401
                                    rabbitmq_server, running)
from tests.test_celery_backend import poll, submit, wait_final, wait_state
from tests.test_cluster_faults import JOB, FaultCluster, wait_for

pytestmark = [pytest.mark.timeout(420), pytest.mark.broker]
SERVICE = "dapi"


class Replica(RedisServer):
    def __init__(self, workdir: Path, primary_port: int):
        super().__init__(workdir)
        self.primary_port = primary_port

    def start(self) -> Replica:
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--save", "", "--replicaof", "127.0.0.1", str(self.primary_port),
             "--logfile", str(self.dir / "redis.log")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, 20, self.proc, "redis replica")
        return self


class SentinelServer:
    def __init__(self, workdir: Path, primary_port: int):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        conf = self.dir / "sentinel.conf"  # sentinel rewrites its config: a file of its own
        conf.write_text(f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
                        f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 1\n"
                        f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                        f"sentinel failover-timeout {SERVICE} 10000\n")
        self.proc = subprocess.Popen([REDIS_SERVER, str(conf), "--sentinel", "--logfile", str(self.dir / "s.log")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, 20, self.proc, "redis sentinel")

    def master(self) -> tuple[str, int] | None:
        got = redis.Redis(port=self.port, decode_responses=True).sentinel_get_master_addr_by_name(SERVICE)
        return (got[0], int(got[1])) if got else None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class Sentinels:
    """What the cluster fixtures need of a Redis: its URL (and stop)."""

    def __init__(self, root: Path):
        self.primary = RedisServer(root / "primary").start()
        self.replica = Replica(root / "replica", self.primary.port).start()
        wait_for(lambda: redis.Redis(port=self.replica.port).info("replication").get("master_link_status") == "up",
                 60, "the replica in sync")
        self.sentinels = [SentinelServer(root / f"sentinel{i}", self.primary.port) for i in range(2)]
        self.url = "redis+sentinel://" + ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels) + f"/{SERVICE}/0"

    def stop(self) -> None:
        for s in self.sentinels:
            s.stop()
        self.replica.stop()
        self.primary.stop()


@pytest.fixture(scope="module")
def cluster(model_store, tmp_path_factory, rabbitmq_server):  # noqa: F811
    root = tmp_path_factory.mktemp("cluster-sentinel")
    redis_ha = Sentinels(root / "redis")
    try:
        with running(FaultCluster(model_store, root, rabbitmq_server, redis_ha), workers=1, apis=1) as c:
            yield c
    finally:
        redis_ha.stop()


def test_killing_the_primary_loses_no_job_and_the_cluster_keeps_serving(cluster):
    (a,) = cluster.api
    ha: Sentinels = cluster.redis
    assert ha.sentinels[0].master() == ("127.0.0.1", ha.primary.port)
    cluster.hold("sheld")
    running = submit(a, **dict(JOB, prompt="sheld"))
    wait_state(a, running, ("processing",))
    queued = [submit(a, **dict(JOB, seed=i)) for i in range(6)]
    assert all(poll(a, j)["state"] == "queued" for j in queued)
    # Each submit answered only once the replica had its job (WAIT): nothing to wait for here.
    ha.primary.proc.kill()
    ha.primary.proc.wait(10)
    wait_for(lambda: ha.sentinels[0].master() == ("127.0.0.1", ha.replica.port), 120, "the failover")
    # Until the worker beats on the new primary (found through the sentinels) a submit is a 503
    # to retry, never another error; then it is accepted.
    def accepted():
        r = httpx.post(a.url + "/txt2img", json=dict(JOB, seed=100), timeout=30)
        assert r.status_code in (200, 503), r.text
        return r.json()["job_id"] if r.status_code == 200 else None

    after = wait_for(accepted, 120, "a submit accepted after the failover")
    cluster.release("sheld")
    ids = [running, *queued, after]
    state = RedisJobState(ha.url)
    wait_for(lambda: all(state.is_final(j) for j in ids), 240, "every job final")
    for j in ids:  # none lost, none run twice
        assert sum((w.dir / "outputs" / f"{j}.jpg").exists() for w in cluster.workers) == 1, j
        assert [f[b"type"] for _, f in state.r.xrange(f"dapi:ev:{j}")].count(b"started") == 1, j
    for j in ids:
        assert wait_final(a, j)["state"] == "done"
        assert httpx.get(f"{a.url}/queue/{j}").status_code == 404
    assert httpx.get(a.url + "/cluster").json()["workers"][0]["alive"]
    state.close()
