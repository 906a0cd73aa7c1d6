"""Live progress end to end, through uvicorn on tiny models: SSE events, previews, webhooks."""
from __future__ import annotations

import base64
import io
import json
import shutil
import threading
import time

import httpx
import httpx_sse
import pytest
import torch
from PIL import Image

from diffusionapi.jobs.webhooks import SIGNATURE_HEADER, verify

from .conftest import SMALL, LiveServer, ServerProcess, make_settings
from .holding import Hold
from .test_webhooks import Receiver, wait_for

SECRET = "test-secret"
FINAL = ("done", "error", "cancelled")


# ---------------------------------------------------------------------------- fixtures

# The test model's decoder, per latent pixel: RGB = G^T z (up to one global normalization).
G = torch.tensor([[0.4, 0.1, -0.2], [-0.1, 0.5, 0.1], [0.2, -0.2, 0.4], [-0.3, -0.1, -0.3]])


def linear_vae(g: torch.Tensor):
    """An AutoencoderKL whose decoder is the linear map ``g`` (4 latent channels -> RGB) at each latent
    pixel, up to the global normalization of its last GroupNorm (one group): every conv is an identity
    tap, every residual branch and the attention output are zeroed, and the final SiLU runs in its
    linear range. Random-weight VAEs are far from linear, so a preview could not be compared with
    their images; real SD VAEs are close enough to linear that the published factors work."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,) * 4, in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        latent_channels=4, norm_num_groups=1, layers_per_block=1, sample_size=64).eval()
    d = vae.decoder

    def identity(conv, n):
        conv.weight.zero_()
        conv.bias.zero_()
        k = conv.weight.shape[-1] // 2
        for i in range(n):
            conv.weight[i, i, k, k] = 1.0

    with torch.no_grad():
        identity(vae.post_quant_conv, 4)
        identity(d.conv_in, 4)
        for m in d.modules():
            if type(m).__name__ == "ResnetBlock2D":
                m.conv2.weight.zero_()
                m.conv2.bias.zero_()
            elif type(m).__name__ == "Attention":
                m.to_out[0].weight.zero_()
                m.to_out[0].bias.zero_()
            elif type(m).__name__ == "Upsample2D":
                identity(m.conv, 8)
        d.conv_norm_out.weight.fill_(0.05)  # SiLU(0.05 u) ~ 0.025 u: linear
        d.conv_norm_out.bias.zero_()
        d.conv_out.weight.zero_()
        d.conv_out.bias.zero_()
        d.conv_out.weight[:, :4, 1, 1] = g.T / 0.05
    return vae


@pytest.fixture(scope="module")
def live_store(model_store, tmp_path_factory):
    """The shared tiny SD 1.5/SDXL models plus ``tiny-linear`` (an SD 1.5 tiny model with the VAE
    above) and its factor file ``vae-approx/tiny-linear.json``; a random TAESD decoder as
    ``vae-approx/taesd/``."""
    from diffusers import AutoencoderTiny

    from diffusionapi.demo import tiny_sd15_pipeline
    from diffusionapi.engine.previews import LatentRGB

    root = tmp_path_factory.mktemp("live-store")
    for sub in ("loras", "upscalers"):
        (root / sub).mkdir()
    (root / "labels.json").write_text("{}")
    models = root / "models"
    models.mkdir()
    for name in ("tiny-sd15", "tiny-sdxl"):  # copies: the registry skips links leading outside
        shutil.copytree(model_store / "models" / name, models / name)
    pipe = tiny_sd15_pipeline(seed=3)
    pipe.vae = linear_vae(G)
    pipe.save_pretrained(models / "tiny-linear", safe_serialization=True)
    approx = root / "vae-approx"
    approx.mkdir()
    # The factors are G itself, scaled for this random UNet's latents (std ~15, where real models
    # give ~1) so that the preview is not clipped; correlation does not depend on the scale.
    factors = LatentRGB(tuple(tuple(float(v) / 40 for v in row) for row in G))
    (approx / "tiny-linear.json").write_text(factors.to_json())
    torch.manual_seed(0)
    AutoencoderTiny().save_pretrained(approx / "taesd")
    return root


def live_settings(store, work, **overrides):
    return make_settings(store, work, **{"vae_approx_dir": store / "vae-approx", "webhook_secret": SECRET,
                                         "webhook_allowed_hosts": ["127.0.0.1"], "webhook_backoff_sec": 0.1,
                                         **overrides})


@pytest.fixture(scope="module")
def live(live_store, tmp_path_factory):
    with LiveServer(live_settings(live_store, tmp_path_factory.mktemp("work"))) as s:
        yield s


def hold(server, **payload) -> tuple[str, str]:
    """Submit ``payload`` behind a running blocker job, held until the test waits for it or cancels
    it (tests/holding.py); returns (blocker id, job id), the job queued."""
    blocker = server.submit_blocker()
    job = server.submit(**payload)
    assert server.client.get(f"/queue/{job}").json()["state"] == "queued"
    return blocker, job


def listen(url: str, job_id: str, out: list, last_event_id: str | None = None, stop_after: str | None = None,
           connected: threading.Event | None = None) -> None:
    """Collect (id, event, data) from the job's stream until the final event (or ``stop_after``)."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    with httpx.Client(timeout=120) as c, httpx_sse.connect_sse(c, "GET", f"{url}/queue/{job_id}/events",
                                                               headers=headers) as src:
        assert src.response.status_code == 200
        assert src.response.headers["content-type"].startswith("text/event-stream")
        if connected:
            connected.set()
        for ev in src.iter_sse():
            if not ev.data:  # keep-alive
                continue
            out.append((ev.id, ev.event, json.loads(ev.data)))
            if ev.event in FINAL or ev.event == stop_after:
                return


def start_listener(url, job_id, **kw):
    out, connected = [], threading.Event()
    t = threading.Thread(target=listen, args=(url, job_id, out), kwargs={**kw, "connected": connected}, daemon=True)
    t.start()
    assert connected.wait(30)
    return t, out


def image_of(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


# ---------------------------------------------------------------------------- the event stream

def test_two_listeners_get_queued_started_monotonic_progress_and_done_with_the_image(live):
    blocker, job = hold(live, **{**SMALL, 'steps': 12}, seed=1)
    (t1, a), (t2, b) = start_listener(live.url, job), start_listener(live.url, job)
    wait_for(lambda: a and b)  # both connected while the job waits
    live.release(blocker)
    for t in (t1, t2):
        t.join(120)
    types = [e[1] for e in a]
    assert types[0] == "queued" and a[0][2]["position"] >= 1
    assert "started" in types and types.index("started") < types.index("progress")
    assert types[-1] == "done" and types.count("done") == 1
    progress = [e[2]["progress"] for e in a if e[1] == "progress"]
    assert len(progress) >= 3 and progress == sorted(progress) and progress[-1] < 100
    steps = [e[2]["step"] for e in a if e[1] == "progress" and e[2]["step"] is not None]
    assert steps == sorted(steps) and steps[-1] == 12
    done = a[-1][2]
    assert done["state"] == "done" and done["job_id"] == job and done["progress"] == 100
    assert image_of(done["image"]).size == (done["width"], done["height"]) == (64, 64)
    # The second listener saw the same events (same ids), including the final one.
    assert [e[0] for e in b] == [e[0] for e in a] and b[-1][2] == done
    # Delivered through the stream, the final result is consumed as by a final poll.
    assert live.client.get(f"/queue/{job}").status_code == 404
    live.wait(blocker)


def test_position_updates_while_queued(live):
    blocker, first = hold(live, **{**SMALL, 'steps': 4})
    second = live.submit(**{**SMALL, 'steps': 4})
    t, events = start_listener(live.url, second)
    wait_for(lambda: events)  # connected: its first position is in
    assert live.client.delete(f"/queue/{first}").status_code == 200  # the one ahead leaves the line
    wait_for(lambda: len(events) >= 2)
    live.release(blocker)
    t.join(120)
    positions = [e[2]["position"] for e in events if e[1] == "queued"]
    assert positions[:2] == [2, 1]
    assert events[-1][1] == "done"
    live.wait(blocker)
    assert live.client.get(f"/queue/{first}").json()["state"] == "cancelled"


def test_reconnect_with_last_event_id_resumes_and_gets_the_final_event(live):
    blocker, job = hold(live, **{**SMALL, 'steps': 8})
    first: list = []
    listen(live.url, job, first, stop_after="queued")  # a client that goes away after one event
    assert [e[1] for e in first] == ["queued"]
    live.release(blocker)
    rest: list = []
    listen(live.url, job, rest, last_event_id=first[-1][0])
    assert rest[0][1] != "queued" or rest[0][2]["position"] != first[0][2]["position"]
    assert rest[-1][1] == "done" and rest[-1][2]["image"]
    ids = [int(e[0].rsplit("-", 1)[1]) for e in first + rest]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    # A client that lost the connection just before the final event still gets it.
    again: list = []
    listen(live.url, job, again, last_event_id=rest[-2][0])
    assert [e[1] for e in again] == ["done"] and again[0][2] == rest[-1][2]
    live.wait(blocker)


def test_a_stream_for_a_finished_job_delivers_its_result_once(live):
    job = live.submit(**SMALL)
    while live.client.get("/queue").json()["jobs"] and any(
            j["job_id"] == job and j["state"] not in FINAL for j in live.client.get("/queue").json()["jobs"]):
        time.sleep(0.02)
    events: list = []
    listen(live.url, job, events)
    assert [e[1] for e in events][-1] == "done" and events[-1][2]["image"]
    assert live.client.get(f"/queue/{job}").status_code == 404


def test_unknown_and_already_read_jobs_are_404(live):
    assert live.client.get("/queue/00000000-0000-0000-0000-000000000000/events").status_code == 404
    assert live.client.get("/queue/not-a-uuid/events").status_code == 404
    job = live.submit(**SMALL)
    live.wait(job)  # the final poll consumed it
    assert live.client.get(f"/queue/{job}/events").status_code == 404


def test_a_client_that_disconnects_costs_nothing(live):
    blocker, job = hold(live, **{**SMALL, 'steps': 4})
    for _ in range(3):
        listen(live.url, job, [], stop_after="queued")
    deadline = time.time() + 10  # the server notices the closed connections
    while time.time() < deadline and live.app.state.backend.live.events._logs.get(job).waiters:
        time.sleep(0.05)
    assert not live.app.state.backend.live.events._logs[job].waiters
    live.release(blocker)
    assert live.wait(job)["state"] == "done"
    live.wait(blocker)


# ---------------------------------------------------------------------------- previews

def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two [pixels, 3] images after removing each colour channel's mean."""
    a, b = a - a.mean(0), b - b.mean(0)
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def _small(img: Image.Image, size: int) -> torch.Tensor:
    arr = torch.tensor(list(img.convert("RGB").resize((size, size), Image.BOX).getdata()), dtype=torch.float32)
    return arr


def test_approx_previews_change_over_the_steps_and_the_last_resembles_the_image(live):
    steps = 10
    job = live.submit(prompt="previews", model="tiny-linear", width=128, height=128, steps=steps, seed=5,
                      sampler_name="Euler", fileType="png", preview={"every": 1, "method": "approx"})
    events: list = []
    listen(live.url, job, events)
    previews = [e[2] for e in events if e[1] == "preview"]
    assert previews, [e[1] for e in events]
    assert [p["step"] for p in previews] == sorted(p["step"] for p in previews)
    assert previews[-1]["step"] == previews[-1]["total"] == steps
    images = [image_of(p["image"]) for p in previews]
    assert all(i.format == "JPEG" and i.size == (128, 128) for i in images)
    # Previews change as the image forms (the last steps of a converging sampler may look alike).
    assert len({p["image"] for p in previews}) >= max(3, len(previews) // 2)
    assert previews[0]["image"] != previews[-1]["image"]
    final = image_of(events[-1][2]["image"])
    # The last preview is the final latents through this model's factors; the image is the same
    # latents through its VAE, which is that linear map up to a global normalization (see
    # linear_vae). Compared at latent resolution (16x16), colour means removed: 0.998 on the raw
    # tensors; 0.94 measured here, after the preview's JPEG and resizing. Threshold: 0.9.
    assert _corr(_small(images[-1], 16), _small(final, 16)) > 0.9


def test_a_batch_previews_its_first_image(live):
    steps = 6
    job = live.submit(prompt="batch", model="tiny-linear", width=128, height=128, steps=steps, seed=5,
                      sampler_name="Euler", fileType="png", batch_size=2, preview={"every": steps, "method": "approx"})
    events: list = []
    listen(live.url, job, events)
    previews = [e[2] for e in events if e[1] == "preview"]
    assert previews and previews[-1]["step"] == steps, [e[1] for e in events]
    last = _small(image_of(previews[-1]["image"]), 16)
    first, second = (_small(image_of(i["image"]), 16) for i in events[-1][2]["images"])
    # Measured 0.94 for the first image (see the test above), about 0 for the second (another seed).
    assert _corr(last, first) > 0.9 and _corr(last, first) > _corr(last, second) + 0.1


def _b64png(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("sampler", ["Euler", "DDIM"])  # a k-diffusion and a timestep sampler
def test_inpainting_has_previews(live, sampler):
    picture = Image.linear_gradient("L").resize((64, 64)).convert("RGB")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    r = live.client.post("/img2img", json=dict(prompt="inpaint", model="tiny-linear", steps=6, seed=3,
                                               sampler_name=sampler, init_image=_b64png(picture),
                                               mask=_b64png(mask), denoising_strength=1.0,
                                               preview={"every": 1, "method": "approx"}))
    assert r.status_code == 200, r.text
    events: list = []
    listen(live.url, r.json()["job_id"], events)
    assert events[-1][1] == "done", events[-1]
    previews = [e[2] for e in events if e[1] == "preview"]
    assert previews and previews[-1]["step"] == previews[-1]["total"], [e[1] for e in events]
    assert image_of(previews[-1]["image"]).size == (64, 64)


def test_latest_preview_is_in_the_status_and_at_the_preview_route(live):
    # Held past 10 % (tests/holding.py): previews exist, and it runs until this test cancels it.
    job = live.submit(prompt=f"p {Hold(after=10).token}", width=64, height=64, steps=60,
                      preview={"every": 2, "method": "taesd"})
    seen = None
    while True:
        body = live.client.get(f"/queue/{job}").json()
        if body["state"] in FINAL:
            break
        if body.get("preview"):
            seen = body
            r = live.client.get(f"/queue/{job}/preview")
            if r.status_code == 200:
                assert r.headers["content-type"] == "image/jpeg"
                assert Image.open(io.BytesIO(r.content)).size == (64, 64)
                live.client.delete(f"/queue/{job}")
                break
        time.sleep(0.01)
    assert seen is not None, "no preview seen while the job ran"
    assert seen["preview_step"] >= 2 and image_of(seen["preview"]).format == "JPEG"
    live.wait(job)


def test_preview_request_validation(live):
    r = live.client.post("/txt2img", json={**SMALL, "preview": {"every": 1, "method": "sharp"}})
    assert r.status_code == 422 and "preview" in r.text
    # TAESD for SDXL needs taesdxl, which is not installed here.
    r = live.client.post("/txt2img", json={**SMALL, "model": "tiny-sdxl", "preview": {"method": "taesd"}})
    assert r.status_code == 422 and "preview.method" in r.json()["error"] and "taesdxl" in r.json()["error"]


def test_previews_default_setting(live_store, tmp_path):
    with LiveServer(live_settings(live_store, tmp_path, previews_default={"every": 2, "method": "approx"})) as s:
        job = s.submit(**SMALL)
        events: list = []
        listen(s.url, job, events)
        assert any(e[1] == "preview" for e in events)
        off = s.submit(**SMALL, preview=None)
        events = []
        listen(s.url, off, events)
        assert not any(e[1] == "preview" for e in events) and events[-1][1] == "done"


# ---------------------------------------------------------------------------- webhooks

def test_webhook_gets_a_correctly_signed_body(live):
    rx = Receiver()
    try:
        job = live.submit(**SMALL, webhook={"url": rx.url, "events": ["done"]})
        done = live.wait(job)
        wait_for(lambda: rx.requests)
    finally:
        rx.close()
    [req] = rx.requests
    assert verify(SECRET, req["headers"][SIGNATURE_HEADER], req["body"])
    body = json.loads(req["body"])
    assert body["job_id"] == job and body["state"] == "done" and body["image"] == done["image"]
    deliveries = [d for d in live.client.get("/queue").json()["webhooks"] if d["job_id"] == job]
    assert [d["state"] for d in deliveries] == ["delivered"]


def test_webhook_that_fails_twice_then_succeeds_is_delivered_once(live):
    rx = Receiver([500, 502])
    try:
        job = live.submit(**SMALL, webhook={"url": rx.url, "events": ["done", "error"], "include_image": False})
        live.wait(job)
        wait_for(lambda: any(d["job_id"] == job and d["state"] != "pending"
                             for d in live.client.get("/queue").json()["webhooks"]))
    finally:
        rx.close()
    assert len(rx.requests) == 3 and len(rx.successes) == 1
    assert "image" not in json.loads(rx.successes[0]["body"])
    [d] = [d for d in live.client.get("/queue").json()["webhooks"] if d["job_id"] == job]
    assert d["state"] == "delivered" and [a["status_code"] for a in d["attempts"]] == [500, 502, 200]


def test_webhook_to_a_private_address_is_refused_at_submit(live_store, tmp_path):
    with LiveServer(make_settings(live_store, tmp_path, webhook_secret=SECRET)) as s:
        for url in ("http://127.0.0.1:9/hook", "http://10.0.0.1/hook", "http://169.254.169.254/"):
            r = s.client.post("/txt2img", json={**SMALL, "webhook": {"url": url}})
            assert r.status_code == 422, r.text
            assert "webhook.url" in r.json()["error"] and "non-public" in r.json()["error"]
        assert s.client.get("/queue").json()["jobs"] == []


def test_webhook_without_a_secret_or_with_bad_fields_is_refused(live_store, tmp_path):
    with LiveServer(make_settings(live_store, tmp_path, webhook_allowed_hosts=["127.0.0.1"])) as s:
        r = s.client.post("/txt2img", json={**SMALL, "webhook": {"url": "http://127.0.0.1:9/"}})
        assert r.status_code == 422 and "DIFFUSIONAPI_WEBHOOK_SECRET" in r.json()["error"]
        r = s.client.post("/txt2img", json={**SMALL, "webhook": {"url": "http://127.0.0.1:9/", "events": ["later"]}})
        assert r.status_code == 422 and "webhook" in r.text


@pytest.mark.processes
def test_a_server_restart_between_attempts_still_delivers(live_store, tmp_path):
    rx = Receiver([500])
    settings = live_settings(live_store, tmp_path, webhook_backoff_sec=4.0)
    srv = ServerProcess(settings).start()
    try:
        job = httpx.post(srv.url + "/txt2img", json={**SMALL, "webhook": {"url": rx.url}}).json()["job_id"]
        wait_for(lambda: len(rx.requests) == 1, timeout=120)  # first attempt failed; the retry is 4 s away
        srv.kill9()
        srv = ServerProcess(settings, port=srv.port).start()
        wait_for(lambda: rx.successes, timeout=60)
        assert json.loads(rx.successes[0]["body"])["job_id"] == job
        assert len(rx.successes) == 1
    finally:
        srv.stop()
        rx.close()
