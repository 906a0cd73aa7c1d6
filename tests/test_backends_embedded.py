"""EmbeddedBackend (store + queue + worker thread) driven by a fake engine: no diffusers, no torch
models. The fake engine reports progress per "step" and honours ``cancelled()`` like the real one."""
from __future__ import annotations

import json
import threading
import time

import pytest
from PIL import Image

from diffusionapi.jobs.backends.embedded import EmbeddedBackend
from diffusionapi.jobs.states import MAX_ATTEMPTS
from diffusionapi.config import Settings
from diffusionapi.engine.plan import GeneratedImage, GenerationResult, JobCancelled
from diffusionapi.registry import Registry
from diffusionapi.jobs.runner import JobInterrupted


class FakeEngine:
    """Makes a flat image whose colour is the seed; each step waits on ``gate`` (when set)."""

    def __init__(self, steps_delay: float = 0.0):
        self.delay = steps_delay
        self.started = threading.Event()
        self.gate: threading.Event | None = None
        self.runs: list[str] = []

    def generate(self, plan, report, cancelled):
        self.runs.append(plan.prompt)
        self.started.set()
        for i in range(plan.steps):
            if cancelled():
                raise JobCancelled()
            if self.gate is not None:
                self.gate.wait(10)
            time.sleep(self.delay)
            report("generation", 100.0 * (i + 1) / plan.steps)
        img = Image.new("RGB", (plan.width, plan.height), (plan.seed % 256, 0, 0))
        return GenerationResult([GeneratedImage(img, plan.seed, {"Steps": plan.steps, "Seed": plan.seed})])


def _fake_model(models_dir):
    """A diffusers folder with configs only: the registry reads its family, the fake engine never loads it."""
    folder = models_dir / "fake-sd15"
    (folder / "unet").mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                         "text_encoder": ["transformers", "CLIPTextModel"]}))
    (folder / "unet" / "config.json").write_text(json.dumps({"in_channels": 4}))


@pytest.fixture
def make_backend(tmp_path):
    made = []

    def make(engine):
        _fake_model(tmp_path / "models")
        settings = Settings(models_dir=tmp_path / "models", loras_dir=tmp_path / "loras",
                            upscalers_dir=tmp_path / "up", outputs_dir=tmp_path / "out", queue_dir=tmp_path / "queue",
                            model_labels=tmp_path / "labels.json", device="cpu", default_model="fake-sd15")
        backend = EmbeddedBackend(settings, Registry(settings), lambda: engine)
        made.append(backend)
        return backend

    yield make
    for b in made:
        b.stop()


def payload(**kw):
    base = dict(prompt="p", model="fake-sd15", width=16, height=16, steps=3, seed=7, sampler_name="Euler",
                scheduler_type="default", fileType="png")
    base.update(kw)
    return base


def wait_state(backend, job_id, states, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = backend.status(job_id)
        if st is not None and st.state in states:
            return st
        time.sleep(0.01)
    raise TimeoutError(f"{job_id} never reached {states}")


def test_done_job_is_taken_once_under_concurrent_readers(make_backend):
    backend = make_backend(FakeEngine())
    backend.start()
    job = backend.submit("txt2img", payload())
    wait_state(backend, job, ("done",))
    results = []
    barrier = threading.Barrier(8)

    def reader():
        barrier.wait()
        results.append(backend.take_final(job))

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = [r for r in results if r is not None]
    assert len(got) == 1 and got[0].status.state == "done" and got[0].images[0].startswith(b"\x89PNG")
    assert backend.status(job) is None and backend.take_final(job) is None


def test_cancel_queued_and_running(make_backend):
    engine = FakeEngine()
    engine.gate = threading.Event()
    backend = make_backend(engine)
    backend.start()
    running = backend.submit("txt2img", payload(prompt="running"))
    queued = backend.submit("txt2img", payload(prompt="queued"))
    assert engine.started.wait(10)
    assert backend.current_job() == running and backend.position(queued) == 1
    assert backend.cancel(queued) == "cancelled"
    assert backend.status(queued).state == "cancelled"
    assert backend.cancel(running) == "cancelling"
    engine.gate.set()
    assert wait_state(backend, running, ("cancelled",)).error == "cancelled by request"
    assert engine.runs == ["running"]  # the cancelled queued job never ran
    assert backend.cancel(running) == "cancelled"  # already final: says so


def test_graceful_stop_requeues_without_counting_an_attempt(make_backend, tmp_path):
    engine = FakeEngine()
    engine.gate = threading.Event()
    backend = make_backend(engine)
    backend.start()
    job = backend.submit("txt2img", payload())
    assert engine.started.wait(10)
    threading.Timer(0.2, engine.gate.set).start()
    backend.stop()
    assert backend.status(job).state == "queued"
    assert backend.store.read_job(job)["attempts"] == 0
    # A new backend on the same directory runs it.
    again = make_backend(FakeEngine())
    again.start()
    assert wait_state(again, job, ("done",)).state == "done"


def test_retry_cap_after_interrupted_attempts(make_backend):
    backend = make_backend(FakeEngine())
    job_ids = []
    for attempts in (MAX_ATTEMPTS - 1, MAX_ATTEMPTS):
        job = backend.submit("txt2img", payload(prompt=f"a{attempts}"))
        record = backend.store.read_job(job)
        record["attempts"] = attempts  # as left by crashes mid-job
        backend.store.write_job(job, record)
        backend.store.write_status(job, {"state": "processing", "current_phase": "generation", "progress": 10})
        job_ids.append(job)
    backend.queue.close()  # this instance is "the crashed process"; a restart recovers the records
    restarted = make_backend(FakeEngine())
    restarted.start()
    last_chance, too_many = job_ids
    assert wait_state(restarted, last_chance, ("done", "error")).state == "done"
    st = wait_state(restarted, too_many, ("done", "error"))
    assert st.state == "error" and "interrupted 3 times" in st.error


def test_engine_failure_is_a_job_error_and_the_worker_goes_on(make_backend):
    class Boom(FakeEngine):
        def generate(self, plan, report, cancelled):
            if plan.prompt == "boom":
                raise RuntimeError("kaput")
            return super().generate(plan, report, cancelled)

    backend = make_backend(Boom())
    backend.start()
    bad = backend.submit("txt2img", payload(prompt="boom"))
    good = backend.submit("txt2img", payload(prompt="fine"))
    assert "kaput" in wait_state(backend, bad, ("error",)).error
    assert wait_state(backend, good, ("done",)).state == "done"


def test_interrupted_exception_from_cancelled_requeues(make_backend):
    """The runner lets JobInterrupted through; the worker puts the job back as queued."""
    class Interrupting(FakeEngine):
        def generate(self, plan, report, cancelled):
            raise JobInterrupted()

    backend = make_backend(Interrupting())
    job = backend.submit("txt2img", payload())
    running = backend.queue.take()
    backend.worker.run_job(running.job_id, running.cancel)
    assert backend.status(job).state == "queued" and backend.store.read_job(job)["attempts"] == 0


def test_listing_and_positions(make_backend):
    engine = FakeEngine()
    engine.gate = threading.Event()
    backend = make_backend(engine)
    backend.start()
    ids = [backend.submit("txt2img", payload(prompt=str(i))) for i in range(3)]
    assert engine.started.wait(10)
    listing = backend.listing()
    assert [e.job_id for e in listing] == ids and [e.queue_position for e in listing] == [0, 1, 2]
    assert all(e.kind == "txt2img" for e in listing)
    engine.gate.set()


def test_a_job_that_ends_keeps_no_input_images(make_backend):
    """Cancelled (and finished, unread) jobs must not keep megabytes of base64 on disk (#31)."""
    engine = FakeEngine()
    engine.gate = threading.Event()
    backend = make_backend(engine)
    backend.start()
    big = "A" * 200_000  # stands for a base64 init image in the record
    running = backend.submit("txt2img", payload(prompt="running"))
    queued = backend.submit("img2img", payload(prompt="queued", init_image=big, mask=big))
    assert engine.started.wait(10)
    path = backend.store.job_path(queued)
    assert path.stat().st_size > 400_000
    assert backend.cancel(queued) == "cancelled"
    record = backend.store.read_job(queued)
    assert record["payload"]["init_image"] is None and record["payload"]["mask"] is None
    assert record["payload"]["prompt"] == "queued" and path.stat().st_size < 2_000
    engine.gate.set()
    wait_state(backend, running, ("done",))


def test_listing_reads_no_record_from_disk(make_backend, monkeypatch):
    """GET /queue (and /cluster, /sdapi/v1/progress) come from the in-memory index: polling a
    long queue costs no file parse per job (#31)."""
    engine = FakeEngine()
    engine.gate = threading.Event()
    backend = make_backend(engine)
    backend.start()
    jobs = [backend.submit("txt2img", payload(prompt=f"j{i}")) for i in range(6)]
    assert engine.started.wait(10)
    reads = []
    for name in ("read_job", "read_status"):
        original = getattr(backend.store, name)
        monkeypatch.setattr(backend.store, name, lambda job_id, _o=original, _n=name: reads.append(_n) or _o(job_id))
    for _ in range(10):
        listing = backend.listing()
    assert reads == []
    assert [e.job_id for e in listing] == jobs
    assert [e.queue_position for e in listing] == [0, 1, 2, 3, 4, 5]
    engine.gate.set()
    deadline = time.time() + 20  # the index follows each status write (just after its file)
    while time.time() < deadline and [e.state for e in backend.listing()] != ["done"] * 6:
        time.sleep(0.01)
    assert [e.state for e in backend.listing()] == ["done"] * 6


def test_listing_index_is_rebuilt_after_a_restart(make_backend):
    backend = make_backend(FakeEngine())
    job = backend.submit("upscale", {"image": "x", "upscaler": "Lanczos"})
    backend.queue.close()
    again = make_backend(FakeEngine())
    again.store.recover()
    assert [(j, e.kind, e.state) for j, e in again.store.index().items()] == [(job, "upscale", "queued")]
