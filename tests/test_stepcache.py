"""Step caching (engine/stepcache.py) through a real server on tiny models: a cached job really
skips work (fewer attention layers run), its image differs from the uncached one of the same seed
but stays within the documented PSNR bound (docs/performance.md#step-caching), the infotext says
so, and the next uncached job makes the plain image exactly (the hooks are gone). Bad requests are
422s naming the field and the valid choices."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from diffusionapi.demo import save_tiny_model, tiny_flux_pipeline, tiny_sd3_pipeline
from diffusionapi.engine.stepcache import count_attention
from diffusionapi.images import read_infotext
from tests.conftest import LiveServer, make_settings

# The documented bounds (docs/performance.md#step-caching): PSNR of the cached image against the
# uncached image of the same seed, on these tiny random-weight models at 64x64, 8 Euler steps.
# Measured: DeepCache (interval 3) on SD 1.5 41.4 dB; First Block (0.4) on Flux 57.0 dB;
# TaylorSeer (interval 2) on Flux 64.3 dB, on SD 3 59.4 dB.
PSNR_BOUND_DB = {"deepcache": 35.0, "first_block": 50.0, "taylorseer": 50.0}

CASES = [
    ("tiny-sd15", {"method": "deepcache", "interval": 3}),
    # The tiny Flux's first block changes by 20-40 % a step (random weights): 0.4 lets it skip.
    ("tiny-flux", {"method": "first_block", "threshold": 0.4}),
    ("tiny-flux", {"method": "taylorseer", "interval": 2}),
    ("tiny-sd3", {"method": "taylorseer", "interval": 2}),
]
JOB = dict(prompt="a red boat on a lake", width=64, height=64, steps=8, seed=21, fileType="png",
           sampler_name="Euler")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("stepcache-store")
    save_tiny_model("sd15", root / "models" / "tiny-sd15")
    tiny_flux_pipeline(0).save_pretrained(root / "models" / "tiny-flux")
    tiny_sd3_pipeline(0).save_pretrained(root / "models" / "tiny-sd3")
    for d in ("loras", "upscalers"):
        (root / d).mkdir()
    (root / "labels.json").write_text("{}")
    settings = make_settings(root, tmp_path_factory.mktemp("stepcache-work"), pipeline_cache_size=3)
    with LiveServer(settings) as s:
        yield s


def _pixels(done: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(done["image"])))).astype(np.float64)


def _echo(done: dict) -> dict:
    return {k: v for k, v in done["payload"]["step_cache"].items() if v is not None}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def _run_counted(server, model: str, **extra) -> tuple[dict, int]:
    server.run(**{**JOB, "steps": 1}, model=model)  # resident before the hooks go on
    module = server.engine.cache._items[model].denoiser_module
    with count_attention(module) as calls:
        done = server.run(**JOB, model=model, **extra)
    assert done["state"] == "done", done
    return done, calls["n"]


@pytest.mark.parametrize("model,step_cache", CASES, ids=[f"{m}-{c['method']}" for m, c in CASES])
def test_cached_image_skips_work_and_stays_within_the_bound(server, model, step_cache):
    plain, plain_calls = _run_counted(server, model)
    cached, cached_calls = _run_counted(server, model, step_cache=step_cache)
    again, again_calls = _run_counted(server, model)

    assert cached_calls < plain_calls, (cached_calls, plain_calls)  # it really skipped attention layers
    assert again_calls == plain_calls
    a, b = _pixels(plain), _pixels(cached)
    value = psnr(a, b)
    print(f"{model} {step_cache}: attention calls {cached_calls}/{plain_calls}, PSNR {value:.1f} dB")
    assert not np.array_equal(a, b)
    assert value >= PSNR_BOUND_DB[step_cache["method"]], value
    assert np.array_equal(_pixels(again), a)  # hooks removed: the plain image exactly
    info = read_infotext(base64.b64decode(cached["image"]))
    knob = "interval" if "interval" in step_cache else "threshold"
    assert f"Step cache: {step_cache['method']}({knob}={step_cache[knob]})" in info
    assert "Step cache" not in read_infotext(base64.b64decode(again["image"]))
    assert _echo(cached) == step_cache and again["payload"]["step_cache"] is None


def _submit(server, **payload):
    return server.client.post("/txt2img", json={**JOB, **payload})


@pytest.mark.parametrize("model,step_cache,field,words", [
    ("tiny-sd15", {"method": "fast"}, "step_cache.method", "valid choices: first_block, taylorseer, deepcache"),
    ("tiny-sd15", {"method": "first_block"}, "step_cache.method", "valid choices: deepcache"),
    ("tiny-flux", {"method": "deepcache"}, "step_cache.method", "valid choices: first_block, taylorseer"),
    ("tiny-flux", {"method": "first_block", "interval": 3}, "step_cache", "interval does not apply"),
    ("tiny-sd15", {"method": "deepcache", "interval": 99}, "step_cache", "within 1..20"),
])
def test_bad_step_cache_is_a_422_naming_the_field(server, model, step_cache, field, words):
    r = _submit(server, model=model, step_cache=step_cache)
    assert r.status_code == 422, r.text
    assert field in r.text and words in r.text, r.text


def test_default_setting_applies_to_its_kind_of_network_only(tmp_path):
    """DIFFUSIONAPI_STEP_CACHE_DEFAULT: a job that sends no ``step_cache`` gets the first entry
    made for its model's network; ``"step_cache": null`` turns it off for one job."""
    root = tmp_path / "store"
    save_tiny_model("sd15", root / "models" / "tiny-sd15")
    for d in ("loras", "upscalers"):
        (root / d).mkdir()
    (root / "labels.json").write_text("{}")
    default = [{"method": "first_block", "threshold": 0.1}, {"method": "deepcache", "interval": 2}]
    with LiveServer(make_settings(root, tmp_path / "work", step_cache_default=default)) as s:
        by_default = s.run(**JOB, model="tiny-sd15")
        off = s.run(**JOB, model="tiny-sd15", step_cache=None)
    assert _echo(by_default) == {"method": "deepcache", "interval": 2}
    assert "Step cache: deepcache(interval=2)" in read_infotext(base64.b64decode(by_default["image"]))
    assert off["payload"]["step_cache"] is None
    assert not np.array_equal(_pixels(by_default), _pixels(off))


def test_first_block_on_a_too_shallow_transformer_fails_the_job_saying_why(server):
    """The tiny SD 3 has two blocks; its last (text stream only) stays outside First Block Cache,
    which leaves one: the job ends in an error naming the field and the model, and the model is
    left unhooked (the next plain job runs)."""
    failed = server.wait(server.submit(**JOB, model="tiny-sd3", step_cache={"method": "first_block"}))
    assert failed["state"] == "error" and "step_cache 'first_block'" in failed["error"], failed
    assert "tiny-sd3" in failed["error"]
    assert server.run(**JOB, model="tiny-sd3")["state"] == "done"
