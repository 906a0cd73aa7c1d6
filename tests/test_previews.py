"""Preview pieces: latent->RGB factors (published, per-model, fitted), TAESD in both layouts, JPEG, the sink."""
from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from diffusionapi.engine import previews as pv


def test_approx_is_the_linear_map_with_bias():
    rgb = pv.LatentRGB(((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.5, 0.5, 0.5)), (0.0, 0.0, -0.5))
    z = torch.zeros(1, 4, 2, 3)
    z[0, 0, 0, 0] = 1.0     # red channel full
    z[0, 3, 1, 2] = -1.0    # channel 4 darkens all three
    out = pv.approx_rgb(z, rgb)
    assert out.shape == (2, 3, 3) and out.dtype == torch.uint8
    assert out[0, 0].tolist() == [255, 127, 63]          # (1+1)*127.5, (0+1)*127.5, (-0.5+1)*127.5
    assert out[1, 2].tolist() == [63, 63, 0]             # -0.5 each, blue also -0.5 bias: clamped at 0
    # With the published SD 1.5 factors, zero latents are mid grey (no bias).
    assert pv.approx_rgb(torch.zeros(1, 4, 1, 1), pv.SD15_LATENT_RGB)[0, 0].tolist() == [127, 127, 127]


def test_published_factor_tables_have_one_row_per_latent_channel():
    for fam in ("sd15", "sdxl", "sdxl-refiner"):
        t = pv.FAMILY_LATENT_RGB[fam]
        assert len(t.factors) == 4 and all(len(r) == 3 for r in t.factors)
    assert pv.FAMILY_LATENT_RGB["sdxl"].bias != (0.0, 0.0, 0.0)


def test_fit_recovers_a_linear_decoder():
    true = pv.LatentRGB(((0.3, -0.1, 0.2), (0.1, 0.4, 0.0), (-0.2, 0.1, 0.3), (0.0, -0.3, -0.5)), (0.1, -0.05, 0.0))
    f = torch.tensor(true.factors)
    b = torch.tensor(true.bias)

    def decode(z):  # a "VAE" that is exactly linear per latent pixel, 8x nearest upsampling
        img = torch.einsum("nchw,cr->nrhw", z, f) + b[None, :, None, None]
        return torch.nn.functional.interpolate(img, scale_factor=8, mode="nearest")

    fit = pv.fit_latent_rgb(decode, samples=2, size=8)
    assert torch.allclose(torch.tensor(fit.factors), f, atol=1e-4)
    assert torch.allclose(torch.tensor(fit.bias), b, atol=1e-4)


def test_a_models_own_factor_file_overrides_and_a_bad_one_falls_back(tmp_path):
    own = pv.LatentRGB(((1.0, 0.0, 0.0),) * 4, (0.0, 0.0, 0.0))
    (tmp_path / "mine.json").write_text(own.to_json())
    assert pv.latent_rgb_for("sd15", "mine", tmp_path) == own
    (tmp_path / "broken.json").write_text('{"factors": [[1, 2]]}')
    assert pv.latent_rgb_for("sdxl", "broken", tmp_path) == pv.SDXL_LATENT_RGB
    assert pv.latent_rgb_for("sd15", "absent", tmp_path) == pv.SD15_LATENT_RGB


def _tiny_taesd(seed=0):
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    return AutoencoderTiny().eval()


@pytest.fixture(scope="module")
def taesd_dirs(tmp_path_factory):
    """The same random TAESD decoder in the three layouts: diffusers folder, original .pth and .safetensors."""
    from safetensors.torch import save_file

    vae = _tiny_taesd()
    folder_dir = tmp_path_factory.mktemp("folder")
    vae.save_pretrained(folder_dir / "taesd")
    original = {f"{int(k.split('.')[1]) + 1}.{k.split('.', 2)[2]}": v.clone()
                for k, v in vae.decoder.state_dict().items()}
    pth_dir = tmp_path_factory.mktemp("pth")
    torch.save(original, pth_dir / "taesdxl_decoder.pth")
    st_dir = tmp_path_factory.mktemp("st")
    save_file(original, st_dir / "taesd_decoder.safetensors")
    return vae, folder_dir, pth_dir, st_dir


def test_taesd_found_by_family_and_all_layouts_decode_identically(taesd_dirs):
    vae, folder_dir, pth_dir, st_dir = taesd_dirs
    assert pv.find_taesd(folder_dir, "sd15") == folder_dir / "taesd"
    assert pv.find_taesd(folder_dir, "sdxl") is None          # an SD 1.5 decoder is not used for SDXL
    assert pv.find_taesd(pth_dir, "sdxl") == pth_dir / "taesdxl_decoder.pth"
    assert pv.find_taesd(st_dir, "sd15") == st_dir / "taesd_decoder.safetensors"
    assert pv.find_taesd(None, "sd15") is None
    z = torch.randn(1, 4, 4, 5, generator=torch.Generator().manual_seed(1))
    ref = pv.taesd_rgb(vae, z)
    assert ref.shape == (32, 40, 3)
    for path in (folder_dir / "taesd", pth_dir / "taesdxl_decoder.pth", st_dir / "taesd_decoder.safetensors"):
        dec = pv.load_taesd(path, "cpu")
        assert torch.equal(pv.taesd_rgb(dec, z), ref), path


def test_a_file_that_is_not_a_taesd_decoder_is_refused(tmp_path):
    torch.save({"1.weight": torch.zeros(3, 3)}, tmp_path / "taesd_decoder.pth")
    with pytest.raises((ValueError, RuntimeError)):
        pv.load_taesd(tmp_path / "taesd_decoder.pth", "cpu")


def test_jpeg_is_resized_to_the_preview_size():
    assert pv.preview_size(1024, 512) == (256, 128)
    assert pv.preview_size(64, 48) == (64, 48)  # never upscaled past the image
    rgb = torch.zeros(8, 16, 3, dtype=torch.uint8)
    rgb[..., 0] = 200
    img = Image.open(io.BytesIO(pv.encode_jpeg(rgb, (64, 32))))
    assert img.format == "JPEG" and img.size == (64, 32)
    assert abs(img.getpixel((30, 15))[0] - 200) < 8


def test_sink_publishes_every_nth_step_and_the_last():
    got = []

    def publish(p):
        got.append(p.step)

    sink = pv.PreviewSink("approx", 3, lambda z: pv.approx_rgb(z, pv.SD15_LATENT_RGB), (16, 16), publish)
    for step in range(1, 8):
        sink.offer(torch.full((1, 4, 2, 2), float(step)), step, 7, "generation")
    sink.close()
    # Only due steps are taken; when the encoder falls behind, older pending ones are skipped.
    assert got and set(got) <= {3, 6, 7} and got[-1] == 7 and got == sorted(got)
