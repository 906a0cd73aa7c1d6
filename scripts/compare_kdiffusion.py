#!/usr/bin/env python3
"""Compare our samplers with k-diffusion's reference implementation, on a toy denoiser.

k-diffusion is not a usable dependency (it pulls ~38 packages), so this fetches its wheel and
torchdiffeq without dependencies into a temporary folder and imports only sampling.py,
utils.py and external.py from it. Not part of the tests; needs PyPI access.

    .venv/bin/python scripts/compare_kdiffusion.py
"""
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffusionapi.demo import SD15_SCHEDULER  # noqa: E402
from diffusionapi.engine import kdiffusion as kd  # noqa: E402


def fetch_reference(tmp: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "k-diffusion==0.1.1.post1",
                    "-d", str(tmp)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp / "deps"),
                    "torchdiffeq"], check=True)
    pkg = tmp / "pkg" / "k_diffusion"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    with zipfile.ZipFile(next(tmp.glob("k_diffusion-*.whl"))) as z:
        for name in ("sampling.py", "utils.py", "external.py"):
            (pkg / name).write_bytes(z.read(f"k_diffusion/{name}"))
    sys.path[:0] = [str(tmp / "pkg"), str(tmp / "deps")]


class Toy:
    """Gaussian-data denoiser plus a nonlinearity, so solvers of different order disagree."""

    def __call__(self, x, sigma):
        s2 = sigma.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype) ** 2
        return (0.36 * x + s2 * 0.3) / (0.36 + s2) + 0.05 * torch.tanh(x)


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="kdiff-ref-"))
    fetch_reference(tmp)
    from k_diffusion import external
    from k_diffusion import sampling as K

    ms = kd.ModelSigmas.from_scheduler_config(SD15_SCHEDULER)
    ref = external.DiscreteEpsDDPMDenoiser(torch.nn.Module(), ms.alphas_cumprod.float(), quantize=False)
    rows = [("sigmas normal (20)", ref.get_sigmas(20).double(), kd.sigmas_normal(ms, 20)),
            ("sigmas karras (20)", K.get_sigmas_karras(20, ms.sigma_min, ms.sigma_max).double(), kd.sigmas_karras(ms, 20)),
            ("sigmas exponential (20)", K.get_sigmas_exponential(20, ms.sigma_min, ms.sigma_max).double(),
             kd.sigmas_exponential(ms, 20))]
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sig = kd.sigmas_karras(ms, 12)

    def noise(seed):
        g = torch.Generator().manual_seed(seed)
        return lambda a=None, b=None: torch.randn(x0.shape, generator=g).double()

    for name, theirs, ours, eta in [("Euler", K.sample_euler, kd.sample_euler, 0), ("Heun", K.sample_heun, kd.sample_heun, 0),
                                    ("DPM2", K.sample_dpm_2, kd.sample_dpm_2, 0), ("LMS", K.sample_lms, kd.sample_lms, 0),
                                    ("DPM++ 2M", K.sample_dpmpp_2m, kd.sample_dpmpp_2m, 0),
                                    ("Euler a", K.sample_euler_ancestral, kd.sample_euler_ancestral, 1),
                                    ("DPM++ 2S a", K.sample_dpmpp_2s_ancestral, kd.sample_dpmpp_2s_ancestral, 1),
                                    ("DPM++ SDE", K.sample_dpmpp_sde, kd.sample_dpmpp_sde, 1)]:
        kw = {"noise_sampler": noise(5)} if eta else {}
        a = theirs(Toy(), x0 * sig[0], sig, disable=True, **kw)
        b = ours(Toy(), x0 * sig[0], sig, kd.RunContext(noise=noise(5), progress=lambda f: None, eta=float(eta)))
        rows.append((name, a, b))
    xs = x0 * ms.sigma_max
    for eta in (0.0, 1.0):
        a = K.sample_dpm_fast(Toy(), xs, ms.sigma_min, ms.sigma_max, 15, disable=True, eta=eta, noise_sampler=noise(7))
        b = kd.sample_dpm_fast(Toy(), xs, ms.sigma_min, ms.sigma_max, 15,
                               kd.RunContext(noise=noise(7), progress=lambda f: None, eta=eta))
        rows.append((f"DPM fast (eta {eta:g})", a, b))
        a = K.sample_dpm_adaptive(Toy(), xs, ms.sigma_min, ms.sigma_max, disable=True, eta=eta, noise_sampler=noise(7))
        b = kd.sample_dpm_adaptive(Toy(), xs, ms.sigma_min, ms.sigma_max,
                                   kd.RunContext(noise=noise(7), progress=lambda f: None, eta=eta))
        rows.append((f"DPM adaptive (eta {eta:g})", a, b))
    print(f"{'what':<26} max |ours - k-diffusion|")
    for name, a, b in rows:
        print(f"{name:<26} {float((a.double() - b.double()).abs().max()):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
