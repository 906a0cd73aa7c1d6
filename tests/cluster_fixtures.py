"""Real Redis and RabbitMQ servers for the cluster tests: free ports, temp dirs, stopped afterwards.

One broker and one Redis per test session (RabbitMQ takes a few seconds to boot). Each runs
as a child of the test process with its own data directory, node name and Erlang port mapper
port, so nothing touches a system-wide instance and parallel sessions do not collide.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")  # Debian's package; /usr/sbin wrappers switch user
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float, proc: subprocess.Popen, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout} s")


def stop_process(proc: subprocess.Popen | None) -> None:
    """Ends a child server: SIGTERM, then SIGKILL if it is still running 20 s later."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


class RedisServer:
    """redis-server with AOF on (as the README recommends), in its own directory."""

    def __init__(self, workdir: Path, port: int | None = None):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--save", "", "--daemonize", "no", "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_port(self.port, 20, self.proc, "redis-server")
        return self

    def stop(self) -> None:
        stop_process(self.proc)


class RabbitMQServer:
    """rabbitmq-server as a child process; stop() and start() again keep its data (durable queues)."""

    def __init__(self, workdir: Path):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.node = f"dapitest{uuid.uuid4().hex[:8]}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"
        (self.dir / "enabled_plugins").write_text("[].\n")
        self.env = {**os.environ,
                    "HOME": str(self.dir),  # the Erlang cookie lives here
                    "RABBITMQ_NODENAME": self.node, "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                    "RABBITMQ_NODE_PORT": str(self.port), "RABBITMQ_DIST_PORT": str(self.dist_port),
                    "ERL_EPMD_PORT": str(self.epmd_port),
                    "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"), "RABBITMQ_LOG_BASE": str(self.dir / "log"),
                    "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
                    "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq"),
                    "RABBITMQ_PID_FILE": str(self.dir / "rabbit.pid")}
        self.proc: subprocess.Popen | None = None

    @staticmethod
    def available() -> bool:
        return (RABBITMQ_BIN / "rabbitmq-server").exists()

    def start(self, timeout: float = 90) -> RabbitMQServer:
        self.proc = subprocess.Popen([str(RABBITMQ_BIN / "rabbitmq-server")], env=self.env, cwd=self.dir,
                                     stdout=open(self.dir / "stdout.log", "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        _wait_port(self.port, timeout, self.proc, "rabbitmq-server")
        return self

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.node, *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def queue_depths(self) -> dict[str, int]:
        out = self.ctl("list_queues", "-q", "--no-table-headers", "name", "messages").stdout
        return {n: int(m) for n, m in (line.split() for line in out.splitlines() if line.strip())}

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.ctl("stop")  # a clean stop: durable queues and persistent messages are on disk
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def close(self) -> None:
        self.stop()
        # The Erlang port mapper daemon it started outlives the node; end it (it serves only our port).
        epmd = shutil.which("epmd")
        if epmd:
            subprocess.run([epmd, "-kill"], env=self.env, capture_output=True, timeout=10)


@contextmanager
def own_redis(workdir: Path):
    """A Redis of one module's own (one its tests stop and start again), stopped at the end."""
    server = RedisServer(workdir).start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def running(cluster, workers: int, apis: int = 2):
    """``cluster`` (tests/test_celery_backend.py's Cluster) with ``workers`` workers and ``apis``
    API nodes started and answering; at the end every node it still has is killed."""
    try:
        for _ in range(workers):
            cluster.add_worker()
        for _ in range(apis):
            cluster.add_api()
        for a in cluster.api:
            a.wait_http()
        cluster.wait_workers(workers)
        yield cluster
    finally:
        for n in cluster.api + cluster.workers + cluster.stopped:
            n.stop(signal.SIGKILL)


def emptied_job_state(url: str):
    """The Celery backend's Redis job state on an emptied database (results kept 60 s, 3 attempts
    a job), closed at the end: for a test's fixture to ``yield from``."""
    from diffusionapi.jobs.backends.celery.state import RedisJobState

    s = RedisJobState(url, results_ttl=60, max_attempts=3)
    s.r.flushdb()
    yield s
    s.close()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def rabbitmq_server(tmp_path_factory):
    if not RabbitMQServer.available():
        pytest.fail("rabbitmq-server is not installed (scripts/system-deps.sh installs it)")
    server = RabbitMQServer(tmp_path_factory.mktemp("rabbitmq")).start()
    yield server
    server.close()
