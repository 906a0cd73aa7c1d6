"""TAE previews for the 16-channel families (TAEF1 for Flux.1 and the families on its VAE, TAESD3
for SD 3.x): found by name in both layouts, decoding the sampler's latents, through a real job."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from diffusionapi.demo import tiny_flux_pipeline, tiny_sd3_pipeline
from diffusionapi.engine import previews as pv
from diffusionapi.engine.live import LiveJob, TaesdCache
from diffusionapi.engine.plan import GenerationError, PreviewPlan

from .conftest import LiveServer, make_settings

SMALL_FLUX = dict(prompt="a red cube", width=64, height=64, steps=4, model="tiny-flux", fileType="png")


def _tiny_tae16(seed: int = 0):
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    vae = AutoencoderTiny(latent_channels=16).eval()
    # At random init the last convolution gives about 0, which the decoder maps to -1 (black) for
    # any latents; scaled up (and centred), its pictures depend on the latents.
    with torch.no_grad():
        last = vae.decoder.layers[-1]
        last.weight.mul_(10)
        last.bias.fill_(0.5)
    return vae


def _original_decoder(vae) -> dict:
    """The decoder's weights with the original file's keys (index 0 is the parameter-free clamp)."""
    return {f"{int(k.split('.')[1]) + 1}.{k.split('.', 2)[2]}": v.clone() for k, v in vae.decoder.state_dict().items()}


class Previews:
    def __init__(self):
        self.jpegs: list[tuple[int, bytes]] = []

    def step(self, phase, step, total):
        pass

    def preview(self, jpeg, step, total):
        self.jpegs.append((step, jpeg))


def test_16_channel_families_find_their_own_decoder_in_both_layouts(tmp_path):
    from safetensors.torch import save_file

    vae = _tiny_tae16()
    vae.save_pretrained(tmp_path / "folder" / "taef1")
    (tmp_path / "file").mkdir()
    save_file(_original_decoder(vae), tmp_path / "file" / "taesd3_decoder.safetensors")
    # Flux.1 and the families that share its VAE use TAEF1; SD 3.x uses TAESD3, never TAEF1.
    for family in ("flux1", "flux1-kontext", "chroma", "z-image"):
        assert pv.find_taesd(tmp_path / "folder", family) == tmp_path / "folder" / "taef1", family
        assert pv.find_taesd(tmp_path / "file", family) is None, family
    assert pv.find_taesd(tmp_path / "folder", "sd3") is None
    assert pv.find_taesd(tmp_path / "file", "sd3") == tmp_path / "file" / "taesd3_decoder.safetensors"
    # The original file builds a 16-channel decoder (read from its first convolution) equal to the folder's.
    z = torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(2))
    ref = pv.taesd_rgb(vae, z)
    assert ref.shape == (32, 48, 3)
    for path in (tmp_path / "folder" / "taef1", tmp_path / "file" / "taesd3_decoder.safetensors"):
        dec = pv.load_taesd(path, "cpu")
        assert dec.config.latent_channels == 16
        assert torch.equal(pv.taesd_rgb(dec, z), ref), path


def test_a_flux_preview_is_the_tae_decoding_of_that_steps_latents(tmp_path):
    vae = _tiny_tae16(seed=3)
    vae.save_pretrained(tmp_path / "taef1")
    seen = Previews()
    live = LiveJob(seen, PreviewPlan("taesd", 1), family="flux1", model_name="m", vae_approx_dir=tmp_path,
                   image_size=(48, 32), taesd=TaesdCache("cpu"), latent_channels=16)
    latents = [torch.randn(1, 16, 4, 6, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    current = {}
    cb = live.stage("generation", 2, lambda f: None, lambda: current["z"])
    for i, z in enumerate(latents):
        current["z"] = z
        cb((i + 1) / 2)
        live.sink.close()  # each step's preview is published before the next (no skipping)
    live.close()
    assert [s for s, _ in seen.jpegs] == [1, 2]
    for (_, jpeg), z in zip(seen.jpegs, latents):
        assert jpeg == pv.encode_jpeg(pv.taesd_rgb(vae, z), (48, 32))
    assert seen.jpegs[0][1] != seen.jpegs[1][1]


def test_a_4_channel_decoder_under_a_16_channel_name_is_refused(tmp_path):
    from diffusers import AutoencoderTiny

    AutoencoderTiny().save_pretrained(tmp_path / "taef1")
    with pytest.raises(GenerationError, match="latent channels"):
        LiveJob(Previews(), PreviewPlan("taesd", 1), family="flux1", model_name="m", vae_approx_dir=tmp_path,
                image_size=(64, 64), taesd=TaesdCache("cpu"), latent_channels=16)


@pytest.fixture(scope="module")
def tae_server(tmp_path_factory):
    """Tiny Flux.1 and SD 3 models; TAEF1 installed, TAESD3 not."""
    root = tmp_path_factory.mktemp("tae-store")
    tiny_flux_pipeline(0).save_pretrained(root / "models" / "tiny-flux")
    tiny_sd3_pipeline(0).save_pretrained(root / "models" / "tiny-sd3")
    (root / "loras").mkdir()
    (root / "upscalers").mkdir()
    (root / "labels.json").write_text("{}")
    _tiny_tae16(seed=4).save_pretrained(root / "vae-approx" / "taef1")
    settings = make_settings(root, tmp_path_factory.mktemp("tae-work"), default_model="tiny-flux",
                             vae_approx_dir=root / "vae-approx")
    with LiveServer(settings) as s:
        yield s


def _previews(server, method: str) -> list[tuple[int, np.ndarray]]:
    from diffusionapi.jobs.resolve import resolve_request
    from diffusionapi.schemas import Txt2ImgRequest

    plan = resolve_request(Txt2ImgRequest(**SMALL_FLUX, seed=1, sampler_name="Euler"), server.app.state.registry,
                           server.settings)
    plan.preview = PreviewPlan(method, 1)
    seen = Previews()
    server.engine.generate(plan, lambda p, v: None, lambda: False, seen)
    return [(s, np.asarray(Image.open(io.BytesIO(j))).astype(np.int16)) for s, j in seen.jpegs]


def test_a_flux_job_with_taef1_gets_tae_previews_that_change_over_the_steps(tae_server):
    tae, approx = _previews(tae_server, "taesd"), _previews(tae_server, "approx")
    assert len(tae) >= 2 and tae[-1][0] == 4
    assert all(img.shape == (64, 64, 3) for _, img in tae)
    assert any(not np.array_equal(tae[0][1], img) for _, img in tae[1:])
    # Not the approximate map: the same job's last preview through the fitted factors differs.
    assert approx[-1][0] == 4 and np.abs(tae[-1][1] - approx[-1][1]).mean() > 5
    # Accepted through HTTP too.
    r = tae_server.run(**SMALL_FLUX, seed=2, preview={"every": 1, "method": "taesd"})
    assert r["state"] == "done", r


def test_sd3_without_taesd3_is_a_422_naming_the_file(tae_server):
    r = tae_server.client.post("/txt2img", json={**SMALL_FLUX, "model": "tiny-sd3",
                                                 "preview": {"every": 1, "method": "taesd"}})
    assert r.status_code == 422, r.text
    assert "preview.method" in r.text and "taesd3_decoder" in r.text and "approx" in r.text
