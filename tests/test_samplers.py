"""The sampler table: schedules vs diffusers, algorithms on an analytic target, every
combination through HTTP (runs or is rejected), determinism and progress."""
from __future__ import annotations

import base64
import math

import numpy as np
import pytest
import torch

from diffusionapi.demo import SD15_SCHEDULER
from diffusionapi.engine import kdiffusion as kd
from diffusionapi.engine.samplers import SAMPLER_NAMES, SCHEDULER_TYPES, SamplerChoiceError, resolve_sampler

from .conftest import SMALL

MS = kd.ModelSigmas.from_scheduler_config(SD15_SCHEDULER)
COMBOS = [(n, t) for n in SAMPLER_NAMES for t in SCHEDULER_TYPES]


def _accepted(name, st):
    try:
        resolve_sampler(name, st)
        return True
    except SamplerChoiceError:
        return False


def _fast(name, st) -> bool:
    """The fast tier's share of the sweep: every sampler with its own schedule ('default'), every
    schedule on Euler, and every refused pair (a 422 costs nothing); the full suite runs them all."""
    return st == "default" or name == "Euler" or not _accepted(name, st)


SWEEP = [pytest.param(n, t, marks=[] if _fast(n, t) else [pytest.mark.slow]) for n, t in COMBOS]


# ---------------------------------------------------------------- schedules

def _diffusers_sigmas(n, **kw):
    from diffusers import EulerDiscreteScheduler

    s = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", **kw)
    s.set_timesteps(n)
    return s.sigmas.double()


@pytest.mark.parametrize("n", [4, 10, 30])
def test_sigma_schedules_equal_diffusers(n):
    torch.testing.assert_close(kd.sigmas_normal(MS, n), _diffusers_sigmas(n, timestep_spacing="linspace"),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kd.sigmas_karras(MS, n),
                               _diffusers_sigmas(n, timestep_spacing="linspace", use_karras_sigmas=True),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kd.sigmas_exponential(MS, n),
                               _diffusers_sigmas(n, timestep_spacing="linspace", use_exponential_sigmas=True),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kd.build_sigmas(MS, "ddim", n),
                               _diffusers_sigmas(n, timestep_spacing="leading", steps_offset=1),
                               rtol=1e-5, atol=1e-5)


def test_sigma_to_t_inverts_t_to_sigma():
    t = torch.tensor([0.0, 10.5, 500.25, 999.0], dtype=torch.float64)
    for v in t:
        assert float(MS.sigma_to_t(MS.t_to_sigma(v))) == pytest.approx(float(v), abs=1e-6)


def test_a1111_normal_schedule_starts_at_sigma_max():
    # The shipped SD 1.5 "leading" spacing starts far lower; A1111's Normal starts at 14.6.
    assert float(kd.sigmas_normal(MS, 8)[0]) == pytest.approx(14.6146, abs=1e-3)
    assert float(kd.build_sigmas(MS, "pndm", 8)[0]) < 8


# ---------------------------------------------------------------- resolution

def test_karras_names_imply_karras_and_reject_others():
    r = resolve_sampler("DPM++ 2M Karras", None)
    assert (r.infotext_sampler, r.infotext_schedule) == ("DPM++ 2M", "Karras")
    assert resolve_sampler("LMS Karras", "default").schedule == "karras"
    with pytest.raises(SamplerChoiceError, match="valid choices"):
        resolve_sampler("DPM++ SDE Karras", "exponential")


def test_seed_default_schedule_and_samplers_own():
    assert resolve_sampler("Euler", None).schedule == "karras"      # the seed's default
    assert resolve_sampler("Euler", "default").schedule == "default"
    assert resolve_sampler("DDIM", None).schedule == "ddim"
    assert resolve_sampler("PLMS", None).schedule == "pndm"
    assert resolve_sampler("DPM fast", None).infotext_schedule == "Automatic"
    with pytest.raises(SamplerChoiceError, match="DPM adaptive"):
        resolve_sampler("DPM adaptive", "karras")


# ---------------------------------------------------------------- algorithms

class Gaussian:
    """Data ~ N(mu, s^2) per element: the exact denoiser and the exact ODE solution are known."""

    def __init__(self, mu=0.7, s=0.5):
        self.mu, self.s = mu, s
        self.evals = 0

    def __call__(self, x, sigma):
        self.evals += 1
        s2, sig2 = self.s ** 2, float(sigma[0]) ** 2
        return (s2 * x + sig2 * self.mu) / (s2 + sig2)

    def ode_solution(self, x_t, sigma_from, sigma_to):
        return self.mu + (x_t - self.mu) * math.sqrt(self.s ** 2 + sigma_to ** 2) / math.sqrt(self.s ** 2 + sigma_from ** 2)


def _ctx(eta, seed=0, like=None):
    g = torch.Generator().manual_seed(seed)
    return kd.RunContext(noise=kd.SeededNoise(g, like), progress=lambda f: None, eta=eta)


@pytest.mark.parametrize("algo, tol", [("euler", 0.1), ("heun", 5e-3), ("dpm_2", 5e-3), ("dpmpp_2m", 5e-3),
                                       ("lms", 5e-3), ("dpmpp_2s_ancestral", 1e-2)])
def test_deterministic_samplers_follow_the_exact_ode(algo, tol):
    model = Gaussian()
    x_t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 14.6
    errors = []
    for n in (20, 40):
        sigmas = kd.sigmas_karras(MS, n)
        out = kd.FIXED_ALGORITHMS[algo](model, x_t.clone(), sigmas, _ctx(0.0, like=x_t))
        exact = model.ode_solution(x_t, float(sigmas[0]), 0.0)
        errors.append(float((out - exact).abs().max()))
    assert errors[1] < tol, errors
    assert errors[1] < errors[0], errors  # converges as steps grow


def test_dpm_fast_matches_exact_ode_and_uses_exactly_nfe_evaluations():
    model = Gaussian()
    x_t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * MS.sigma_max
    for nfe in (24, 25, 26):
        model.evals = 0
        out = kd.sample_dpm_fast(model, x_t.clone(), MS.sigma_min, MS.sigma_max, nfe, _ctx(0.0, like=x_t))
        assert model.evals == nfe
        exact = model.ode_solution(x_t, MS.sigma_max, MS.sigma_min)
        assert torch.allclose(out, exact, atol=5e-3), (nfe, float((out - exact).abs().max()))


def test_dpm_adaptive_matches_exact_ode():
    model = Gaussian()
    x_t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * MS.sigma_max
    seen = []
    ctx = kd.RunContext(noise=kd.SeededNoise(torch.Generator(), x_t), progress=seen.append, eta=0.0)
    out = kd.sample_dpm_adaptive(model, x_t.clone(), MS.sigma_min, MS.sigma_max, ctx)
    exact = model.ode_solution(x_t, MS.sigma_max, MS.sigma_min)
    assert torch.allclose(out, exact, atol=5e-2)  # A1111's tolerances: rtol 0.05, atol 0.0078
    assert seen == sorted(seen) and seen[-1] == 1.0
    model.evals = 0
    tight = kd.sample_dpm_adaptive(model, x_t.clone(), MS.sigma_min, MS.sigma_max, ctx, rtol=1e-4, atol=1e-5)
    assert torch.allclose(tight, exact, atol=1e-3)
    assert model.evals > 20  # the error control really took smaller steps


@pytest.mark.parametrize("algo", ["euler_ancestral", "dpmpp_2s_ancestral", "dpm_fast", "dpmpp_sde"])
def test_ancestral_samplers_reach_the_data_distribution(algo):
    model = Gaussian(mu=0.3, s=0.6)
    n = 20000
    x = torch.randn(1, n, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    sigmas = kd.sigmas_karras(MS, 300 if algo == "euler_ancestral" else 30)  # Euler a is first order
    x = x * float(sigmas[0])
    if algo == "dpm_fast":
        out = kd.sample_dpm_fast(model, x, MS.sigma_min, MS.sigma_max, 30, _ctx(1.0, like=x))
    elif algo == "dpmpp_sde":
        ctx = kd.RunContext(noise=kd.BrownianNoise(x, MS.sigma_min, MS.sigma_max, seed=5),
                            progress=lambda f: None, eta=1.0)
        out = kd.sample_dpmpp_sde(model, x, sigmas, ctx)
    else:
        out = kd.FIXED_ALGORITHMS[algo](model, x, sigmas, _ctx(1.0, seed=5, like=x))
    assert float(out.mean()) == pytest.approx(0.3, abs=0.03)
    assert float(out.std()) == pytest.approx(math.sqrt(0.36 + (MS.sigma_min ** 2 if algo == "dpm_fast" else 0)),
                                             abs=0.03)


@pytest.mark.parametrize("algo", list(kd.FIXED_ALGORITHMS))
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_expected_evaluations_are_exact(algo, eta):
    model = Gaussian()
    model.evals = 0
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 14.6
    sigmas = kd.sigmas_karras(MS, 7)
    if algo == "dpmpp_sde":
        ctx = kd.RunContext(noise=kd.BrownianNoise(x, MS.sigma_min, MS.sigma_max, 1), progress=lambda f: None, eta=eta)
    else:
        ctx = _ctx(eta, like=x)
    kd.FIXED_ALGORITHMS[algo](model, x, sigmas, ctx)
    assert model.evals == kd.expected_evals(algo, sigmas, eta)


def test_brownian_noise_is_seeded():
    like = torch.zeros(1, 4, 4, 4)
    a = kd.BrownianNoise(like, 0.03, 14.6, seed=7)(5.0, 3.0)
    b = kd.BrownianNoise(like, 0.03, 14.6, seed=7)(5.0, 3.0)
    c = kd.BrownianNoise(like, 0.03, 14.6, seed=8)(5.0, 3.0)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------- through HTTP

@pytest.mark.parametrize("name, st", SWEEP)
def test_every_combination_runs_or_is_rejected(server, name, st):
    payload = dict(SMALL, model="tiny-sd15", seed=11, sampler_name=name, scheduler_type=st, fileType="png")
    r = server.client.post("/txt2img", json=payload)
    if not _accepted(name, st):
        assert r.status_code == 422 and "scheduler_type" in r.json()["error"] and "valid choices" in r.json()["error"]
        return
    assert r.status_code == 200, r.text
    first = server.wait(r.json()["job_id"])
    assert first["state"] == "done", first
    again = server.run(**payload)
    assert first["image"] == again["image"], "same seed must give the same pixels"
    from diffusionapi.images import read_infotext

    info = read_infotext(base64.b64decode(first["image"]))
    spec = resolve_sampler(name, st)
    assert f"Sampler: {spec.infotext_sampler}, Schedule type: {spec.infotext_schedule}," in info


def test_different_samplers_give_different_images(server):
    images = {}
    for name in ("Euler", "Euler a", "Heun", "DPM2", "DPM++ 2S a", "DPM++ 2M", "DPM++ SDE", "DPM fast",
                 "DPM adaptive", "LMS", "DDIM", "PLMS", "UniPC"):
        r = server.run(**dict(SMALL, steps=6, model="tiny-sd15", seed=3, sampler_name=name,
                              scheduler_type="default", fileType="png"))
        images[name] = r["image"]
    assert len(set(images.values())) == len(images)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_progress_monotonic_and_complete(server, name):
    from diffusionapi.jobs.resolve import resolve_request
    from diffusionapi.schemas import Txt2ImgRequest

    spec = resolve_request(Txt2ImgRequest(**SMALL, model="tiny-sd15", sampler_name=name, seed=1),
                           server.app.state.registry, server.settings)
    seen = []
    server.engine.generate(spec, lambda phase, p: seen.append(p), lambda: False)
    assert seen == sorted(seen) and seen[-1] == 99.0  # 100 is written only when the job is done
    evals = [p for p in seen if p > 0]
    if name in ("Heun", "DPM2", "DPM++ SDE", "DPM++ SDE Karras", "DPM++ 2S a"):
        assert len(evals) == 2 * SMALL["steps"] - 1  # one report per model evaluation
    elif name == "PLMS":
        assert len(evals) == SMALL["steps"] + 1  # PLMS's extra step counts
    elif name != "DPM adaptive":
        assert len(evals) == SMALL["steps"]
    done = server.run(**SMALL, model="tiny-sd15", sampler_name=name, seed=1)
    assert done["progress"] == 100


def test_same_pixels_on_a_fresh_engine(server, model_store, tmp_path):
    from diffusionapi.engine.engine import Engine
    from diffusionapi.jobs.resolve import resolve_request
    from diffusionapi.schemas import Txt2ImgRequest

    from .conftest import make_settings

    payload = dict(SMALL, model="tiny-sd15", seed=21, sampler_name="DPM++ SDE", fileType="png")
    server.run(**dict(payload, sampler_name="Euler a", seed=3))  # other jobs ran before
    via_server = server.run(**payload)
    settings = make_settings(model_store, tmp_path)
    from diffusionapi.registry import Registry

    spec = resolve_request(Txt2ImgRequest(**payload), Registry(settings), settings)
    fresh = Engine(settings).generate(spec, lambda *a: None, lambda: False)
    from io import BytesIO

    from PIL import Image

    served = np.asarray(Image.open(BytesIO(base64.b64decode(via_server["image"]))))
    assert np.array_equal(served, np.asarray(fresh.image))


def test_scheduler_objects_are_fresh_per_stage(server):
    from diffusionapi.engine.sampling import make_schedule

    loaded = server.engine.cache.get(server.app.state.registry.resolve_model("tiny-sd15"))
    plan = make_schedule(loaded, resolve_sampler("UniPC", "karras"), 5)
    assert plan.factory() is not plan.factory()
    assert loaded.pipe.scheduler.__class__.__name__ == "PNDMScheduler"  # never mutated
