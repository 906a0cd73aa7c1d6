"""Fair turns and priorities on the Celery backend (#30, docs/tenants.md "Scheduling").

The rule is ``jobs/fair.py``; the Celery backend applies it in Redis (``state._FAIR``, Lua). Here,
against a real redis-server: the Lua picks start jobs in exactly the order the Python rule
predicts (the positions ``/queue`` reports), the same order the embedded queue starts them in,
a message's redelivery resumes the job it started, and ``max_queued`` holds across API nodes.
The end-to-end test (RabbitMQ, an API node, two sleep-engine workers) is in
tests/test_fair_cluster.py.
"""
from __future__ import annotations

import random
import threading
import uuid

import pytest

from diffusionapi.jobs.backends.celery.state import RedisJobState
from diffusionapi.jobs.backends.embedded.queue import JobQueue
from tests.cluster_fixtures import emptied_job_state, redis_server  # noqa: F401 - fixture

pytestmark = pytest.mark.broker


@pytest.fixture
def state(redis_server):  # noqa: F811
    yield from emptied_job_state(redis_server.url)


def put(state, name: str, owner: str | None, priority: int = 0, share: float = 1.0, queue: str = "q",
        owner_max: int | None = None) -> str | None:
    seq, _ = state.create_once(name, {"kind": "txt2img", "payload": {}, "queue": queue}, 0, owner=owner,
                               priority=priority, share=share, owner_max=owner_max)
    return name if seq and seq > 0 else None


def start_next(state, queue: str = "q", worker: str = "w1") -> str | None:
    """What a worker does with a broker message: the queue's next job, started."""
    verdict, _, _, job_id = state.claim_next(str(uuid.uuid4()), queue, worker, 30)
    return job_id if verdict == "run" else None


def drain(state, queue: str = "q") -> list[str]:
    out = []
    while (j := start_next(state, queue)) is not None:
        out.append(j)
    return out


def test_a_newcomer_waits_for_at_most_one_more_job_of_a_busy_key(state):
    for i in range(30):
        put(state, f"a{i}", "A")
    assert start_next(state) == "a0"
    put(state, "b0", "B")
    put(state, "a-urgent", "A", priority=3)
    predicted = state.fair_line()
    assert predicted[0] == "a-urgent" and predicted.index("b0") <= 2  # before A's third next job
    assert state.position("b0") == predicted.index("b0") + 1
    assert drain(state) == predicted  # the positions are the order the jobs start in


def test_a_higher_class_goes_first_whoever_s_turn_it_is_and_shares_weigh_turns(state):
    for i in range(6):
        put(state, f"a{i}", "A", share=2.0)
        put(state, f"b{i}", "B")
    put(state, "c-urgent", "C", priority=5)
    order = drain(state)
    assert order[0] == "c-urgent"
    first_nine = [j[0] for j in order[1:10]]
    assert first_nine.count("a") == 6 and first_nine.count("b") == 3


def test_the_lua_picks_agree_with_the_python_rule_and_the_embedded_queue(state):
    """Random keys, shares, priorities and arrivals between starts: every start is the head of the
    order predicted just before it, and the embedded queue fed the same events starts the same jobs."""
    rng = random.Random(7)
    q = JobQueue(10_000)
    shares = {"A": 1.0, "B": 2.0, "C": 0.5, None: 1.0}
    n = 0
    for _ in range(120):
        if rng.random() < 0.55 or not state.fair_line():
            owner = rng.choice(list(shares))
            prio = rng.choice([0, 0, 0, 1, 2, -1])
            name = f"j{n}"
            n += 1
            put(state, name, owner, priority=prio, share=shares[owner])
            q.put(name, owner=owner, priority=prio, share=shares[owner])
        else:
            predicted = state.fair_line()
            assert predicted == q.order()
            started = start_next(state)
            assert started == predicted[0] == q.take().job_id
            q.finish()
    assert drain(state) == [q.take().job_id for _ in range(q.size())]


def test_a_message_is_a_turn_of_its_queue_and_its_redelivery_resumes_its_job(state):
    put(state, "m1", "A", queue="model-1")
    put(state, "m2", "A", queue="model-2")
    put(state, "m1b", "B", queue="model-1")
    token = str(uuid.uuid4())
    verdict, attempt, record, job = state.claim_next(token, "model-2", "w1", 30)
    assert (verdict, attempt, job) == ("run", 1, "m2") and record["queue"] == "model-2"
    assert state.claim_next(token, "model-2", "w2", 30)[::3] == ("bound", "m2")  # redelivered: that job
    assert state.claim_next(str(uuid.uuid4()), "model-2", "w2", 30)[0] == "none"  # nothing left there
    assert drain(state, "model-1") == ["m1", "m1b"]  # each queue a line of its own: m2 spent A's turn there
    assert int(state.r.hget("dapi:job:m1b", "started_n")) == 3  # the order jobs started in


def test_a_key_waiting_on_one_queue_banks_no_turns_on_another(state):
    put(state, "a-other", "A", queue="model-2")  # waits on a queue no worker serves now
    for i in range(6):
        put(state, f"b{i}", "B", queue="model-1")
    assert [start_next(state, "model-1") for _ in range(3)] == ["b0", "b1", "b2"]
    for i in range(3):
        put(state, f"a{i}", "A", queue="model-1")
    predicted = state.fair_line()
    assert drain(state, "model-1") == ["a0", "b3", "a1", "b4", "a2", "b5"]  # A joins at model-1's turn
    assert [j for j in predicted if j != "a-other"] == ["a0", "b3", "a1", "b4", "a2", "b5"]
    assert predicted.index("a-other") == 0  # the head of its own queue


def test_cancel_and_forget_leave_the_line_and_a_released_job_rejoins_it(state):
    for name in ("a0", "a1", "a2"):
        put(state, name, "A")
    assert state.cancel("a1") == "cancelled"
    state.forget("a2")
    assert state.fair_line() == ["a0"] and state.active_count("A") == 1
    assert start_next(state) == "a0" and state.active_count("A") == 1  # running counts too
    assert state.release("a0", "w1")  # a graceful stop gives it back
    assert state.fair_line() == ["a0"] and start_next(state) == "a0"


def test_max_queued_holds_across_api_nodes_submitting_at_once(state, redis_server):  # noqa: F811
    nodes = [RedisJobState(redis_server.url) for _ in range(4)]
    made, barrier = [], threading.Barrier(4)

    def node(s: RedisJobState, i: int) -> None:
        barrier.wait()
        for k in range(5):
            if put(s, f"n{i}-{k}", "A", owner_max=3):
                made.append(f"n{i}-{k}")

    threads = [threading.Thread(target=node, args=(s, i)) for i, s in enumerate(nodes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 3 and state.active_count("A") == 3
    assert put(state, "other", "B", owner_max=3)  # another key's own count
    start_next(state)  # a running job still counts
    assert state.active_count("A") + state.active_count("B") == 4
    seq, count = state.create_once("x", {"queue": "q"}, 0, owner="A", owner_max=3)
    assert (seq, count) == (-2, "3")
    for s in nodes:
        s.close()
