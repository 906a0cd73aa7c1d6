"""Two transformer-only Flux files naming the same clip_l / t5xxl / ae hold one module of each
(engine/sharedparts.py) while both are resident, and each makes exactly the image it makes when
loaded alone; a LoRA with text-encoder keys on one does not reach the other."""
from __future__ import annotations

import base64
import gc
import io
import weakref
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from diffusionapi.engine.hostcache import pipeline_bytes
from diffusionapi.engine.sharedparts import SharedParts

from .conftest import LiveServer, make_settings
from .test_flux import save_flux_lora
from .tiny_files import write_tiny_lora
from .flow_files import flux_to_bfl, save, tiny_flux_for_files, write_flux_files

JOB = dict(prompt="a red cube", width=64, height=64, steps=3, fileType="png", sampler_name="Euler", seed=3)
# A prompt first encoded after the LoRA ran: the conditioning cache cannot hide a leak.
FRESH = dict(JOB, prompt="a blue sphere")
TE_LORA = [{"name": "clip-style", "scale": 1.0}]


def px(r):
    assert r["state"] == "done", r
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(r["image"]))).convert("RGB")).astype(np.int16)


def save_te_lora(te, path):
    """A diffusers-format Flux LoRA with transformer keys and text-encoder (CLIP-L) keys."""
    from safetensors.torch import load_file, save_file

    save_flux_lora(path)
    te_only = write_tiny_lora(SimpleNamespace(text_encoder=te), path.with_suffix(".te"), "diffusers", seed=9,
                              strength=2.0, unet=False)
    save_file({**load_file(str(path)), **load_file(str(te_only))}, str(path))
    te_only.unlink()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared-te")
    pipe = tiny_flux_for_files(0)
    files = write_flux_files(pipe, root, "flux-a")
    for name, seed in (("flux-b", 1), ("flux-c", 2)):  # other transformers, the same component files
        save(flux_to_bfl(tiny_flux_for_files(seed).transformer.state_dict()), root / "models" / f"{name}.safetensors")
    (root / "loras").mkdir()
    save_te_lora(pipe.text_encoder, root / "loras" / "clip-style.safetensors")
    (root / "upscalers").mkdir()
    (root / "labels.json").write_text("{}")
    return root, files


def _server(store, tmp_path_factory, size: int):
    root, _ = store
    return LiveServer(make_settings(root, tmp_path_factory.mktemp(f"work-{size}"), default_model="flux-a",
                                    pipeline_cache_size=size))


@pytest.fixture(scope="module")
def alone(store, tmp_path_factory):
    """Each model's images with one model resident at a time: nothing shared."""
    with _server(store, tmp_path_factory, 1) as s:
        out = {"a": px(s.run(**JOB, model="flux-a")), "a_lora": px(s.run(**JOB, model="flux-a", loras=TE_LORA)),
               "b": px(s.run(**JOB, model="flux-b")), "b_fresh": px(s.run(**FRESH, model="flux-b"))}
        # Evicting flux-a dropped the last user of its T5: flux-b had to build it again.
        out["t5_builds"] = s.engine.cache.shared.builds[str(store[1]["t5xxl"].resolve())]
    return out


def test_models_alone_build_their_components_each(alone):
    assert alone["t5_builds"] == 2
    assert not np.array_equal(alone["a"], alone["b"])
    assert not np.array_equal(alone["a"], alone["a_lora"])  # the text-encoder LoRA changes the image


def test_resident_models_share_one_t5_clip_and_vae(store, alone, tmp_path_factory):
    root, files = store
    with _server(store, tmp_path_factory, 2) as s:
        cache = s.engine.cache
        assert np.array_equal(px(s.run(**JOB, model="flux-a")), alone["a"])
        assert np.array_equal(px(s.run(**JOB, model="flux-b")), alone["b"])
        assert sorted(cache.resident()) == ["flux-a", "flux-b"]
        a, b = cache._items["flux-a"].pipe, cache._items["flux-b"].pipe
        assert a.text_encoder_2 is b.text_encoder_2 and a.text_encoder is b.text_encoder and a.vae is b.vae
        assert a.transformer is not b.transformer
        assert cache.shared.builds[str(files["t5xxl"].resolve())] == 1
        assert cache.shared.builds[str(files["clip_l"].resolve())] == 1
        # The shared modules count once in the pipelines' size.
        assert pipeline_bytes(a, b) == pipeline_bytes(a) + sum(
            t.numel() * t.element_size() for t in [*b.transformer.parameters(), *b.transformer.buffers()])

        # A LoRA with CLIP-L keys on flux-a: flux-a gets its own CLIP-L; flux-b's image is unchanged.
        assert np.array_equal(px(s.run(**JOB, model="flux-a", loras=TE_LORA)), alone["a_lora"])
        assert a.text_encoder is not b.text_encoder and a.text_encoder_2 is b.text_encoder_2
        assert _patched(a.text_encoder) and not _patched(b.text_encoder)
        assert np.array_equal(px(s.run(**FRESH, model="flux-b")), alone["b_fresh"])
        assert np.array_equal(px(s.run(**JOB, model="flux-b")), alone["b"])
        assert np.array_equal(px(s.run(**JOB, model="flux-a")), alone["a"])  # unloaded exactly

        # flux-c evicts the least recently used (flux-b): flux-a keeps the shared T5, flux-c takes it.
        t5 = weakref.ref(a.text_encoder_2)
        del a, b
        s.run(**JOB, model="flux-c")
        assert sorted(cache.resident()) == ["flux-a", "flux-c"]
        assert cache._items["flux-c"].pipe.text_encoder_2 is t5()
        assert cache.shared.builds[str(files["t5xxl"].resolve())] == 1
        assert np.array_equal(px(s.run(**JOB, model="flux-a")), alone["a"])


def _patched(module) -> bool:
    return any("lora" in name for name, _ in module.named_modules())


def test_registry_frees_a_module_with_its_last_user(tmp_path):
    path = tmp_path / "part.safetensors"
    save({"w": torch.ones(2)}, path)
    parts = SharedParts()

    def build():
        return torch.nn.Linear(2, 2)

    first = parts.get(path, "t5", torch.float32, build)
    again = parts.get(path, "t5", torch.float32, build)
    assert first is again and parts.builds[str(path.resolve())] == 1
    assert parts.get(path, "clip", torch.float32, build) is not first  # another role: another module
    assert parts.is_shared(first)
    own = parts.private_copy(first)
    assert own is not first and not parts.is_shared(own)
    gone = weakref.ref(first)
    del first
    gc.collect()
    assert gone() is again  # one user left
    del again
    gc.collect()
    assert gone() is None
    assert parts.get(path, "t5", torch.float32, build) is not None and parts.builds[str(path.resolve())] == 4
    save({"w": torch.zeros(3)}, path)  # replaced on disk: another file
    assert parts.get(path, "t5", torch.float32, build) is not None and parts.builds[str(path.resolve())] == 5
