"""Live progress on the Celery backend, end to end: real RabbitMQ and Redis, two API nodes and one
worker as real processes on a tiny model. Events, previews and webhooks flow through Redis, so a
listener on either node sees what the worker did, and the worker sends the webhooks.

Node A and the worker allow webhooks to 127.0.0.1 (the test receiver); node B keeps the default
(public hosts only), to show the check at submit.
"""
from __future__ import annotations

import base64
import io
import json
import time

import httpx
import pytest
import redis
from PIL import Image

from diffusionapi.jobs.webhooks import SIGNATURE_HEADER, verify
from tests.cluster_fixtures import rabbitmq_server, redis_server, running  # noqa: F401 - fixtures
from tests.holding import Hold
from tests.test_celery_backend import Cluster, poll, submit, wait_final, wait_running
from tests.test_live import FINAL, listen, start_listener
from tests.test_webhooks import Receiver, wait_for

pytestmark = [pytest.mark.timeout(300), pytest.mark.broker]

SECRET = "cluster-secret"
JOB = dict(prompt="live", width=64, height=64, model="tiny-sd15", sampler_name="Euler")
BLOCKER = dict(JOB, steps=8)  # holds the one worker: held until cancelled (tests/holding.py)


class LiveCluster(Cluster):
    def env(self, name: str) -> dict:
        env = super().env(name)
        env.update(DIFFUSIONAPI_WEBHOOK_SECRET=SECRET, DIFFUSIONAPI_WEBHOOK_BACKOFF_SEC="0.1",
                   DIFFUSIONAPI_WEBHOOK_ALLOWED_HOSTS='["*"]' if name == "api2" else '["127.0.0.1"]')
        return env


@pytest.fixture(scope="module")
def cluster(model_store, tmp_path_factory, rabbitmq_server, redis_server):  # noqa: F811
    with running(LiveCluster(model_store, tmp_path_factory.mktemp("cluster-live"), rabbitmq_server, redis_server),
                 workers=1) as c:
        yield c


def held(node, **payload) -> tuple[str, str]:
    """(blocker, job): ``payload`` submitted behind a running blocker job, so it is queued. The
    blocker is held (tests/holding.py) until the test cancels it: it never finishes by itself."""
    blocker = submit(node, **dict(BLOCKER, prompt=Hold().prompt))
    wait_running(node, blocker)
    job = submit(node, **payload)
    assert poll(node, job)["state"] == "queued"
    return blocker, job


def cancel(node, job_id: str) -> None:
    httpx.delete(f"{node.url}/queue/{job_id}")
    wait_final(node, job_id)


def image_of(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_listeners_on_both_nodes_get_progress_previews_and_the_final_answer_and_so_does_the_webhook(cluster):
    a, b = cluster.api
    rx = Receiver()
    try:
        blocker, job = held(a, **JOB, steps=8, seed=3, preview={"every": 1, "method": "approx"},
                            webhook={"url": rx.url, "events": ["done"]})
        (ta, ea), (tb, eb) = start_listener(a.url, job), start_listener(b.url, job)
        early: list = []
        listen(b.url, job, early, stop_after="queued")  # a client that goes away while the job waits
        cancel(b, blocker)
        for t in (ta, tb):
            t.join(120)
        later: list = []  # that client reconnects, after the job ran
        listen(a.url, job, later, last_event_id=early[-1][0])
        wait_for(lambda: rx.requests, timeout=60)
    finally:
        rx.close()
    types = [e[1] for e in ea]
    assert types[0] == "queued" and ea[0][2]["position"] >= 1
    assert types.index("started") < types.index("progress") and types[-1] == "done" and types.count("done") == 1
    progress = [e[2]["progress"] for e in ea if e[1] == "progress"]
    assert progress == sorted(progress) and progress[-1] < 100
    steps = [e[2]["step"] for e in ea if e[1] == "progress" and e[2]["step"] is not None]
    assert steps == sorted(steps) and steps[-1] == 8  # the last step is never throttled away
    previews = [e[2] for e in ea if e[1] == "preview"]
    assert previews and [p["step"] for p in previews] == sorted(p["step"] for p in previews)
    assert previews[-1]["step"] == previews[-1]["total"] == 8
    assert image_of(previews[-1]["image"]).format == "JPEG"
    done = ea[-1][2]
    assert done["state"] == "done" and done["job_id"] == job and image_of(done["image"]).size == (64, 64)
    # Node B's listener followed the same stream: same events, same ids, the same final answer,
    # whichever of the two consumed the job.
    assert [e[0] for e in eb] == [e[0] for e in ea] and eb[-1][2] == done
    # The reconnect resumed after its last event (no replay of it) and got the final answer too.
    assert [e[0] for e in later if e[0] in {x[0] for x in early}] == []
    assert later[-1][1] == "done" and later[-1][2] == done
    assert all(httpx.get(f"{n.url}/queue/{job}").status_code == 404 for n in (a, b))  # consumed
    # A reconnect that lost the connection just before the final event gets just that.
    again: list = []
    listen(b.url, job, again, last_event_id=ea[-2][0])
    assert [e[1] for e in again] == ["done"] and again[0][2] == done
    # The worker's webhook: signed, and its body is exactly the final GET /queue/{id} answer.
    [req] = rx.requests
    assert verify(SECRET, req["headers"][SIGNATURE_HEADER], req["body"])
    assert json.loads(req["body"]) == done
    deliveries = [d for d in httpx.get(b.url + "/queue").json()["webhooks"] if d["job_id"] == job]
    assert [(d["event"], d["state"]) for d in deliveries] == [("done", "delivered")]


def test_a_running_jobs_preview_and_step_reach_the_status_on_any_node(cluster):
    a, b = cluster.api
    hold = Hold(after=10)  # past 10 % (previews of steps 2..10 made) it waits until cancelled
    job = submit(a, **dict(JOB, prompt=f"live {hold.token}", width=128, height=128, steps=100,
                           preview={"every": 2, "method": "approx"}))
    seen = progress = None
    deadline = time.time() + 120
    while (seen is None or progress is None) and time.time() < deadline:
        body = poll(b, job)
        if body["state"] in FINAL:
            break
        if body.get("preview") and seen is None:
            seen = body
            r = httpx.get(f"{b.url}/queue/{job}/preview")
            assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
            assert Image.open(io.BytesIO(r.content)).size == (128, 128)
        p = httpx.get(a.url + "/sdapi/v1/progress").json()
        if p["current_image"] and p["state"]["sampling_step"] > 0:
            progress = p
        time.sleep(0.02)
    cancel(a, job)
    assert seen is not None, "no preview seen while the job ran"
    assert seen["preview_step"] >= 2 and seen["preview_step"] % 2 == 0 and image_of(seen["preview"]).format == "JPEG"
    assert progress is not None and progress["state"]["sampling_steps"] == 100 and progress["state"]["job"] == job


def test_a_job_cancelled_while_queued_ends_its_stream_and_sends_its_webhook(cluster):
    a, b = cluster.api
    rx = Receiver()
    try:
        blocker, job = held(a, **JOB, steps=2, webhook={"url": rx.url, "events": ["cancelled"]})
        t, events = start_listener(b.url, job)
        assert httpx.delete(f"{b.url}/queue/{job}").json()["state"] == "cancelled"
        t.join(60)
        cancel(a, blocker)
        wait_for(lambda: rx.requests, timeout=60)  # a worker sends it: the API node keeps no queue
    finally:
        rx.close()
    assert [e[1] for e in events] == ["queued", "cancelled"]
    final = events[-1][2]
    assert final["state"] == "cancelled" and final["error"] == "cancelled by request"
    [req] = rx.requests
    assert verify(SECRET, req["headers"][SIGNATURE_HEADER], req["body"]) and json.loads(req["body"]) == final


def test_a_listener_that_goes_away_leaves_no_read_waiting(cluster):
    a, b = cluster.api
    blocker, job = held(a, **JOB, steps=2)
    r = redis.Redis.from_url(cluster.redis.url, decode_responses=True)

    def blocked_reads() -> int:  # connections blocked in a read now (flag b), not pooled idle ones
        return sum(1 for c in r.client_list() if c.get("cmd") == "xread" and "b" in c.get("flags", ""))

    t, events = start_listener(a.url, job)
    wait_for(lambda: blocked_reads() == 1)  # a listener holds one blocking read (what is counted here)
    for node in (a, b, a):
        listen(node.url, job, [], stop_after="queued")
    wait_for(lambda: blocked_reads() <= 1, timeout=20)  # the nodes noticed the closed connections
    for _ in range(10):  # and no feed of theirs goes on reading (a queued job's reads are 0.5 s apart)
        assert blocked_reads() <= 1
        time.sleep(0.1)
    assert t.is_alive()  # the one still connected, of course, goes on
    httpx.delete(f"{a.url}/queue/{job}")
    t.join(30)  # it consumes the final answer
    assert events[-1][1] == "cancelled"
    cancel(a, blocker)
    r.close()


def test_webhook_checks_at_submit_and_unknown_jobs_events(cluster):
    a, b = cluster.api
    r = httpx.post(b.url + "/txt2img", json=dict(JOB, steps=2, webhook={"url": "http://127.0.0.1:9/hook"}))
    assert r.status_code == 422 and "webhook.url" in r.json()["error"] and "non-public" in r.json()["error"]
    assert httpx.get(f"{a.url}/queue/00000000-0000-0000-0000-000000000000/events").status_code == 404
    job = submit(a, **dict(JOB, steps=2))
    wait_final(b, job)  # the final poll consumed it, with no listener: nothing kept
    assert httpx.get(f"{a.url}/queue/{job}/events").status_code == 404


def test_an_openai_url_result_is_served_by_either_node(cluster):
    """`response_format: "url"` on the Celery backend: the bytes live in the cluster's Redis, so
    the node a load balancer picks for the GET need not be the node that answered the POST."""
    a, b = cluster.api
    res = httpx.post(f"{a.url}/v1/images/generations", timeout=120,
                     json={"model": "tiny-sd15", "prompt": "a plum", "size": "64x64", "response_format": "url"})
    assert res.status_code == 200, res.text
    url = res.json()["data"][0]["url"]
    assert url.startswith(a.url)
    on_b = httpx.get(b.url + url[len(a.url):])
    assert on_b.status_code == 200 and on_b.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(on_b.content)).size == (64, 64)
    assert on_b.content == httpx.get(url).content
    missing = httpx.get(b.url + url[len(a.url):-10] + "x" * 6 + ".png")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
