"""LoRAs through HTTP: kohya and diffusers files, scales, combinations, no leaks, errors."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from diffusionapi.demo import tiny_sd15_pipeline, tiny_sdxl_pipeline

from .tiny_files import write_tiny_lora
from diffusionapi.images import read_infotext

from .conftest import SMALL, LiveServer, make_settings


@pytest.fixture(scope="module")
def lora_server(model_store, tmp_path_factory):
    work = tmp_path_factory.mktemp("lora-work")
    loras = work / "loras"
    sd, xl = tiny_sd15_pipeline(0), tiny_sdxl_pipeline(0)
    write_tiny_lora(sd, loras / "sd-kohya.safetensors", "kohya", seed=1)
    write_tiny_lora(sd, loras / "style" / "sd-peft.safetensors", "diffusers", seed=2)
    write_tiny_lora(sd, loras / "sd-second.safetensors", "kohya", seed=3)
    write_tiny_lora(xl, loras / "xl-kohya.safetensors", "kohya", seed=4)
    from safetensors.torch import load_file, save_file

    from .checkpoint_factory import kohya_lora_to_sgm_names

    save_file(kohya_lora_to_sgm_names(load_file(str(loras / "xl-kohya.safetensors")), xl.unet.config),
              str(loras / "xl-civitai-sgm.safetensors"))
    write_tiny_lora(xl, loras / "xl-peft.safetensors", "diffusers", seed=5)
    write_tiny_lora(sd, loras / "sd-te-only.safetensors", "kohya", seed=6, unet=False, strength=2.0)
    write_tiny_lora(xl, loras / "xl-te-only.safetensors", "diffusers", seed=7, unet=False, strength=2.0)
    good = (loras / "sd-kohya.safetensors").read_bytes()
    (loras / "broken.safetensors").write_bytes(good[: len(good) // 2])
    with LiveServer(make_settings(model_store, work, loras_dir=loras)) as s:
        yield s


def px(resp):
    assert resp["state"] == "done", resp
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(resp["image"]))))


def gen(server, model="tiny-sd15", **kw):
    return px(server.run(**dict(SMALL, model=model, seed=42, fileType="png", **kw)))


def test_listing(lora_server):
    loras = {x["name"]: x for x in lora_server.client.get("/loras").json()["loras"]}
    assert set(loras) == {"sd-kohya", "style/sd-peft", "sd-second", "xl-kohya", "xl-peft", "broken",
                          "sd-te-only", "xl-te-only", "xl-civitai-sgm"}
    assert loras["xl-civitai-sgm"]["family"] == "sdxl"
    assert all(x["scale"] == 1.0 for x in loras.values())
    assert loras["sd-kohya"]["family"] == "sd15" and loras["xl-kohya"]["family"] == "sdxl"
    assert loras["xl-peft"]["family"] == "sdxl" and loras["style/sd-peft"]["family"] == "sd15"


@pytest.mark.parametrize("model, lora", [("tiny-sd15", "sd-kohya"), ("tiny-sd15", "style/sd-peft"),
                                         ("tiny-sdxl", "xl-kohya"), ("tiny-sdxl", "xl-peft")])
def test_lora_changes_output_and_scale_matters(lora_server, model, lora):
    base = gen(lora_server, model)
    full = gen(lora_server, model, loras=[{"name": lora, "scale": 1.0}])
    half = gen(lora_server, model, loras=[{"name": lora, "scale": 0.5}])
    zero = gen(lora_server, model, loras=[{"name": lora, "scale": 0.0}])
    assert not np.array_equal(base, full) and not np.array_equal(full, half)
    assert np.array_equal(base, zero)
    assert np.array_equal(base, gen(lora_server, model))  # nothing leaks into the next job


@pytest.mark.parametrize("model, lora", [("tiny-sd15", "sd-te-only"), ("tiny-sdxl", "xl-te-only")])
def test_text_encoder_only_lora_takes_effect(lora_server, model, lora):
    # transformers >= 5.6 names CLIP modules without "text_model.": the text-encoder half of a
    # LoRA must still land, not be silently dropped.
    gen(lora_server, model, loras=["sd-kohya" if model == "tiny-sd15" else "xl-kohya"])  # another adapter first
    assert not np.array_equal(gen(lora_server, model), gen(lora_server, model, loras=[lora]))


def test_string_and_object_forms_agree(lora_server):
    assert np.array_equal(gen(lora_server, loras=["sd-kohya"]), gen(lora_server, loras=[{"name": "sd-kohya"}]))


def test_two_loras_combine(lora_server):
    a = gen(lora_server, loras=["sd-kohya"])
    b = gen(lora_server, loras=["sd-second"])
    both = gen(lora_server, loras=["sd-kohya", {"name": "sd-second", "scale": 0.7}])
    assert not np.array_equal(both, a) and not np.array_equal(both, b)
    # Order does not matter, bit for bit on every CPU (the engine applies LoRAs in a canonical order),
    # and a changed scale is honoured exactly, with no memory of the previous set.
    assert np.array_equal(both, gen(lora_server, loras=[{"name": "sd-second", "scale": 0.7}, "sd-kohya"]))
    assert np.array_equal(a, gen(lora_server, loras=["sd-kohya"]))


def test_no_leak_bit_for_bit_against_a_fresh_server(lora_server, model_store, tmp_path):
    gen(lora_server, loras=["sd-kohya", "style/sd-peft"])
    after = gen(lora_server)
    with LiveServer(make_settings(model_store, tmp_path, loras_dir=lora_server.settings.loras_dir)) as fresh:
        assert np.array_equal(after, gen(fresh))


def test_lora_file_read_once(lora_server):
    gen(lora_server, loras=["sd-second"])
    loads = lora_server.engine.loras.loads
    gen(lora_server, loras=["sd-second"])
    gen(lora_server)
    gen(lora_server, loras=[{"name": "sd-second", "scale": 0.3}])
    assert lora_server.engine.loras.loads == loads


@pytest.mark.parametrize("lora, reason", [("xl-kohya", "SDXL"), ("broken", "broken")])
def test_incompatible_or_corrupt_lora_fails_the_job_only(lora_server, lora, reason):
    base = gen(lora_server)
    r = lora_server.run(**dict(SMALL, model="tiny-sd15", seed=42, loras=["sd-kohya", lora]))
    assert r["state"] == "error" and lora in r["error"] and reason in r["error"], r
    assert np.array_equal(base, gen(lora_server))
    assert not np.array_equal(base, gen(lora_server, loras=["sd-kohya"]))


def test_unknown_lora_lists_close_matches(lora_server):
    r = lora_server.client.post("/txt2img", json=dict(SMALL, loras=["sd-kohy"]))
    assert r.status_code == 422
    assert "loras[0]" in r.json()["error"] and "did you mean: sd-kohya" in r.json()["error"]
    for bad in ("../loras/sd-kohya", "/etc/passwd", "style/../sd-kohya"):
        assert lora_server.client.post("/txt2img", json=dict(SMALL, loras=[bad])).status_code == 422


def test_infotext_lora_hashes(lora_server):
    r = lora_server.run(**dict(SMALL, model="tiny-sd15", seed=1, fileType="png",
                               prompt="portrait", loras=["sd-kohya", {"name": "style/sd-peft", "scale": 0.5}]))
    info = read_infotext(base64.b64decode(r["image"]))
    assert info.startswith("portrait\n")
    import hashlib

    def sha(p):
        return hashlib.sha256(p.read_bytes()).hexdigest()

    h1 = sha(lora_server.settings.loras_dir / "sd-kohya.safetensors")[:12]
    h2 = sha(lora_server.settings.loras_dir / "style" / "sd-peft.safetensors")[:12]
    assert f'Lora hashes: "sd-kohya: {h1}, style/sd-peft: {h2}"' in info
    assert r["payload"]["loras"] == [{"name": "sd-kohya", "scale": 1.0}, {"name": "style/sd-peft", "scale": 0.5}]


def test_loras_apply_to_the_hires_pass(lora_server):
    hires = {"enabled": True, "steps": 3, "upscaler": "Latent"}
    plain = gen(lora_server, hires=hires)
    with_lora = gen(lora_server, hires=hires, loras=["sd-kohya"])
    assert with_lora.shape == plain.shape == (128, 128, 3)
    assert not np.array_equal(plain, with_lora)
    assert np.array_equal(plain, gen(lora_server, hires=hires))


def test_sdxl_lora_with_sgm_key_names(lora_server):
    # civitai SDXL LoRAs name UNet modules the SGM way (lora_unet_input_blocks_4_1_...).
    assert np.array_equal(gen(lora_server, "tiny-sdxl", loras=["xl-civitai-sgm"]),
                          gen(lora_server, "tiny-sdxl", loras=["xl-kohya"]))


def test_loras_are_applied_in_a_canonical_order(tmp_path):
    """PEFT sums the active adapters' deltas in the order they were set, and fp32 sums in another
    order differ in the last bits on some CPUs (an AMD EPYC box did): the service applies a set of
    LoRAs in one order whatever order the request named them in, so "order does not matter" holds
    bit for bit everywhere. Shown on a recording pipeline, without diffusers."""
    from types import SimpleNamespace

    from diffusionapi.engine.loras import LoraManager, adapter_name
    from diffusionapi.engine.plan import LoraUse
    from diffusionapi.vocabulary import LoraEntry

    class Pipe:
        def __init__(self):
            self.loaded, self.calls = [], []

        def load_lora_weights(self, folder, weight_name, adapter_name):
            self.loaded.append(adapter_name)

        def get_list_adapters(self):
            return {"unet": list(self.loaded)}

        def enable_lora(self):
            pass

        def set_adapters(self, names, adapter_weights):
            self.calls.append(list(zip(names, adapter_weights)))

    entries = {}
    for name in ("b-second", "a-first", "style/c-third"):
        path = tmp_path / f"{name}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        entries[name] = LoraEntry(name, path, None)
    uses = [LoraUse(entries["b-second"], 0.7), LoraUse(entries["style/c-third"], 1.0), LoraUse(entries["a-first"], 1.0)]
    pipe = Pipe()
    loaded = SimpleNamespace(pipe=pipe, loras={}, family="sd15", spec=SimpleNamespace(lora_family="sd15"),
                             entry=SimpleNamespace(name="m"))
    manager = LoraManager()
    manager.apply(loaded, uses)
    manager.apply(loaded, list(reversed(uses)))
    manager.apply(loaded, [uses[1], uses[0], uses[2]])
    expected = [(adapter_name(entries[n]), w) for n, w in (("a-first", 1.0), ("b-second", 0.7), ("style/c-third", 1.0))]
    assert pipe.calls == [expected] * 3
