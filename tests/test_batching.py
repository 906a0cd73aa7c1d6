"""Dynamic batching (DIFFUSIONAPI_MAX_BATCH_JOBS) on CPU with tiny models, through the real server.

Tolerance: a batched job's image equals its solo image to within 1 level of 255 per pixel on CPU
fp32 (batched convolutions and matmuls sum in another order; measured: 0 or 1 over Euler a, DPM++ 2M
Karras, DPM++ SDE on SDXL, DDIM, UniPC). On CUDA fp16 the batched kernels differ more (fp16 noise).
"""
from __future__ import annotations

import base64
import io
import time

import numpy as np
import pytest
from PIL import Image

from .conftest import LiveServer, make_settings
from .holding import Hold

JOB = dict(model="tiny-sd15", width=64, height=64, steps=6, sampler_name="Euler a", fileType="png")
TOLERANCE = 1  # levels of 255


def pixels(body: dict) -> np.ndarray:
    assert body["state"] == "done", body
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(body["image"]))).convert("RGB")).astype(int)


@pytest.fixture(scope="module")
def batching_server(model_store, tmp_path_factory):
    from tests.tiny_files import write_tiny_lora

    from diffusionapi.demo import tiny_sd15_pipeline

    write_tiny_lora(tiny_sd15_pipeline(0), model_store / "loras" / "batch-style.safetensors", seed=3, strength=0.3)
    settings = make_settings(model_store, tmp_path_factory.mktemp("batching"), max_batch_jobs=4)
    with LiveServer(settings) as s:
        yield s


def hold(server: LiveServer) -> str:
    """A held job of another shape, running, so that the next submissions queue up together
    (``server.wait(blocker)`` lets it go on; tests/holding.py)."""
    return server.submit_blocker(width=96, height=96, steps=4)


def solo(server: LiveServer, **job) -> np.ndarray:
    before = list(server.engine.batches)
    img = pixels(server.run(**job))  # alone in the queue: nothing to batch with
    assert server.engine.batches == before
    return img


def test_batched_jobs_each_equal_their_solo_image(batching_server):
    s = batching_server
    jobs = [dict(JOB, prompt=f"a red fox number {i}", seed=100 + i) for i in range(3)]
    jobs[1]["negative_prompt"] = "blurry"
    alone = [solo(s, **j) for j in jobs]
    runs = len(s.engine.batches)
    blocker = hold(s)
    ids = [s.submit(**j) for j in jobs]
    s.release(blocker)  # all three queued behind it: now they go, together
    bodies = [s.wait(i) for i in ids]
    assert s.wait(blocker)["state"] == "done"
    assert s.engine.batches[runs:] == [3]  # one UNet batch of the three jobs
    for body, ref, job in zip(bodies, alone, jobs):
        assert body["seed"] == job["seed"] and body["payload"]["prompt"] == job["prompt"]
        assert np.abs(pixels(body) - ref).max() <= TOLERANCE
        assert f"Seed: {job['seed']}" in body["infotext"]
    # Different seeds and prompts really are different rows, not one image three times.
    assert np.abs(alone[0] - alone[2]).max() > 10


def test_cancel_one_job_of_a_batch(batching_server):
    s = batching_server
    # The other two are held (tests/holding.py) until the cancelled one has ended: the batch is
    # surely still running then, however fast this CPU is.
    others = Hold()
    jobs = [dict(JOB, steps=8, prompt=f"a lighthouse {i}" + (f" {others.token}" if i != 1 else ""), seed=7 + i)
            for i in range(3)]
    runs = len(s.engine.batches)
    blocker = hold(s)
    ids = [s.submit(**j) for j in jobs]
    assert s.wait(blocker)["state"] == "done"
    # Running in the batch (its first progress write; later ones may be throttled while the
    # held rows wait, so its progress figure is not what to wait for).
    while s.client.get(f"/queue/{ids[1]}").json()["state"] != "processing":
        time.sleep(0.01)
    assert s.client.delete(f"/queue/{ids[1]}").json()["state"] in ("cancelling", "cancelled")
    cancelled = s.wait(ids[1])
    assert cancelled["state"] == "cancelled"
    # It ended on its own, at its next model evaluation: the rest of the batch is still running.
    assert s.client.get(f"/queue/{ids[0]}").json()["state"] == "processing"
    others.release()
    done = [s.wait(ids[0]), s.wait(ids[2])]
    assert s.engine.batches[runs:] == [3]
    for body, job in zip(done, (jobs[0], jobs[2])):
        assert np.abs(pixels(body) - solo(s, **job)).max() <= TOLERANCE


def test_lora_job_and_its_lora_free_twin_are_not_batched(batching_server):
    s = batching_server
    twin = dict(JOB, prompt="a castle", seed=5)
    with_lora = dict(twin, loras=[{"name": "batch-style", "scale": 1.0}])
    alone = [solo(s, **with_lora), solo(s, **twin)]
    assert np.abs(alone[0] - alone[1]).max() > 10  # the LoRA changes the image
    runs = len(s.engine.batches)
    blocker = hold(s)
    ids = [s.submit(**with_lora), s.submit(**twin), s.submit(**dict(with_lora, seed=6))]
    s.release(blocker)
    bodies = [s.wait(i) for i in ids]
    s.wait(blocker)
    # The two LoRA jobs batch together; the LoRA-free twin runs alone.
    assert s.engine.batches[runs:] == [2]
    assert np.abs(pixels(bodies[0]) - alone[0]).max() <= TOLERANCE
    assert np.abs(pixels(bodies[1]) - alone[1]).max() <= TOLERANCE


def test_batch_window_never_moves_a_job_ahead_of_more_than_its_size(model_store, tmp_path):
    """The worker's choice, without running anything: head + compatible jobs among the next N-1."""
    from diffusionapi.jobs.backends.embedded import EmbeddedBackend
    from diffusionapi.registry import Registry

    def build(n):
        settings = make_settings(model_store, tmp_path / f"w{n}", max_batch_jobs=n)
        return EmbeddedBackend(settings, Registry(settings), lambda: None)

    a, x, b, c = (dict(JOB, prompt="a", seed=1), dict(JOB, prompt="x", width=72), dict(JOB, prompt="b", seed=2),
                  dict(JOB, prompt="c", seed=3))
    for n, expected in ((2, None), (3, ["a", "b"]), (4, ["a", "b", "c"])):
        backend = build(n)
        ids = {j["prompt"]: backend.submit("txt2img", j) for j in (a, x, b, c)}
        head = backend.queue.take()
        batch = backend.worker._gather(head)
        names = {v: k for k, v in ids.items()}
        assert (None if batch is None else [names[r.job_id] for r, _ in batch]) == expected, n
        # Batched jobs are running (position 0); the incompatible one keeps its place in line.
        if batch:
            assert all(backend.position(r.job_id) == 0 for r, _ in batch)
            assert backend.position(ids["x"]) == 1


def test_jobs_that_must_run_alone(model_store, tmp_path):
    from diffusionapi.engine.batching import batch_key
    from diffusionapi.registry import Registry
    from diffusionapi.jobs.runner import JobRunner

    settings = make_settings(model_store, tmp_path)
    runner = JobRunner(settings, Registry(settings), lambda: None)

    def key(**extra):
        return batch_key(runner.resolve("txt2img", {**JOB, "prompt": "p", "seed": 1, **extra}).plan)

    base = key()
    assert base is not None and key(prompt="q", seed=9, negative_prompt="n") == base
    assert key(cfg_scale=5) != base and key(steps=7) != base and key(width=72) != base
    assert key(sampler_name="Euler") != base
    assert key(model="tiny-sdxl") != base
    assert key(sampler_name="DPM adaptive") is None
    assert key(hires={"enabled": True, "scale": 2, "upscaler": "Latent", "steps": 2}) is None
    assert key(model="tiny-sdxl", refiner_checkpoint="tiny-sdxl-refiner") is None


def test_each_job_of_a_batch_streams_its_own_events(batching_server):
    from .test_live import start_listener

    s = batching_server
    runs = len(s.engine.batches)
    blocker = hold(s)
    jobs = [dict(JOB, prompt=f"a streamed fox {i}", seed=200 + i) for i in range(2)]
    ids = [s.submit(**j) for j in jobs]
    listeners = [start_listener(s.url, j) for j in ids]
    s.release(blocker)
    for t, _ in listeners:
        t.join(120)
    assert s.wait(blocker)["state"] == "done"
    assert s.engine.batches[runs:] == [2]  # they did run as one batch
    for (_, events), job in zip(listeners, jobs):
        kinds = [e[1] for e in events]
        assert "started" in kinds and "progress" in kinds and kinds[-1] == "done", kinds
        assert events[-1][2]["seed"] == job["seed"] and events[-1][2]["image"]


def test_max_batch_jobs_default_is_8_on_cuda_and_1_elsewhere():
    import torch

    from diffusionapi.config import Settings
    from diffusionapi.engine.batching import GPU_MAX_BATCH_JOBS, max_batch_jobs

    unset = Settings()
    assert unset.max_batch_jobs is None and GPU_MAX_BATCH_JOBS == 8
    assert max_batch_jobs(unset, torch.device("cuda")) == 8
    assert max_batch_jobs(unset, torch.device("cpu")) == 1 and max_batch_jobs(unset, None) == 1
    assert max_batch_jobs(Settings(max_batch_jobs=1), torch.device("cuda")) == 1
    assert max_batch_jobs(Settings(max_batch_jobs=3), torch.device("cpu")) == 3
