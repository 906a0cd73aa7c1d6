"""jobs/service.py: the one job service, driven with a fake backend (no worker, no engine):
what it records at submit, what it refuses before anything is queued, how cancel answers."""
from __future__ import annotations

import asyncio
import json

import pytest

from diffusionapi.config import Settings
from diffusionapi.errors import Conflict, NotFound, QueueFull, RequestError
from diffusionapi.jobs.backends.base import JobBackend
from diffusionapi.jobs.service import JobService
from diffusionapi.jobs.status import JobStatus
from diffusionapi.registry import Registry
from diffusionapi.schemas import Img2ImgRequest, Txt2ImgRequest


class RecordingBackend(JobBackend):
    """Keeps what it is given; jobs never run."""
    delivers_webhooks = False

    def __init__(self, full: bool = False):
        self.submitted: list[tuple[str, dict]] = []
        self.states: dict[str, str] = {}
        self.full = full

    def start(self): ...
    def stop(self): ...

    def submit(self, kind, payload):
        if self.full:
            raise QueueFull("the queue is full (0 jobs); retry later")
        job_id = f"00000000-0000-4000-8000-{len(self.submitted):012d}"
        self.submitted.append((kind, json.loads(json.dumps(payload))))  # what a store would write
        self.states[job_id] = "queued"
        return job_id

    def status(self, job_id):
        state = self.states.get(job_id)
        return JobStatus(state=state, current_phase=state) if state else None

    def take_final(self, job_id): return None
    def position(self, job_id): return 1 if self.states.get(job_id) == "queued" else None

    def cancel(self, job_id):
        state = self.states.get(job_id)
        if state == "queued":
            self.states[job_id] = "cancelled"
            return "cancelled"
        return state

    def listing(self): return []
    async def wait_final(self, job_id, timeout): await asyncio.sleep(0)
    def current_job(self): return None


@pytest.fixture
def service(tmp_path):
    models = tmp_path / "models" / "fake-sd15"
    (models / "unet").mkdir(parents=True)
    (models / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (models / "unet" / "config.json").write_text(json.dumps({"in_channels": 4}))
    settings = Settings(models_dir=tmp_path / "models", loras_dir=tmp_path / "l", upscalers_dir=tmp_path / "u",
                        queue_dir=tmp_path / "q", outputs_dir=tmp_path / "o", model_labels=tmp_path / "x.json",
                        max_steps=50)
    return JobService(RecordingBackend(), Registry(settings), settings)


def test_submit_records_the_request_as_resolved_once(service):
    submitted = service.submit("txt2img", Txt2ImgRequest(prompt="a cat", sampler_name="Euler a"))
    kind, record = service.backend.submitted[0]
    assert kind == "txt2img" and submitted.job_id
    # Names resolved, seed drawn, defaults filled: the worker needs to decide nothing again.
    assert record["model"] == "fake-sd15" and isinstance(record["seed"], int) and record["seed"] >= 0
    assert record["scheduler_type"] is not None and record == submitted.job.echo
    assert submitted.job.plan.sampler.infotext_sampler == "Euler a"


def test_a_refused_request_queues_nothing(service):
    with pytest.raises(RequestError) as e:
        service.submit("txt2img", Txt2ImgRequest(prompt="x", steps=51))
    assert (e.value.field, e.value.status) == ("steps", 422) and "50" in e.value.message
    with pytest.raises(RequestError) as e:
        service.submit("txt2img", Txt2ImgRequest(prompt="x", model="nope"))
    assert e.value.field == "model" and "fake-sd15" in e.value.message  # names the valid choices
    with pytest.raises(RequestError) as e:  # this backend delivers no webhooks: said at submit
        service.submit("txt2img", Txt2ImgRequest(prompt="x", webhook={"url": "http://example.com/h"}))
    assert e.value.field == "webhook"
    with pytest.raises(RequestError):  # the request type must match the kind
        service.submit("img2img", Txt2ImgRequest(prompt="x"))
    assert service.backend.submitted == []


def test_a_full_queue_is_a_503_with_retry_after(service):
    service.backend.full = True
    with pytest.raises(QueueFull) as e:
        service.submit("txt2img", Txt2ImgRequest(prompt="x"))
    assert e.value.status == 503 and e.value.headers["Retry-After"]


def test_img2img_record_keeps_its_image_the_echo_describes_it(service):
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), "red").save(buf, "PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    submitted = service.submit("img2img", Img2ImgRequest(prompt="x", init_image=b64))
    _, record = service.backend.submitted[0]
    assert record["init_image"] == b64 and (record["width"], record["height"]) == (64, 48)
    assert submitted.job.echo["init_image"] != b64  # the answer describes the image, never echoes it


def test_cancel_answers_in_lifecycle_terms(service):
    job = service.submit("txt2img", Txt2ImgRequest(prompt="x")).job_id
    assert service.cancel(job) == "cancelled"
    assert service.cancel(job) == "cancelled"  # again: it is (as DELETE has always answered)
    service.backend.states[job] = "done"
    with pytest.raises(Conflict) as e:
        service.cancel(job)
    assert e.value.status == 409 and e.value.extra == {"state": "done"}
    with pytest.raises(NotFound):
        service.cancel("00000000-0000-4000-8000-999999999999")
    with pytest.raises(NotFound):
        service.cancel("not-a-uuid")
