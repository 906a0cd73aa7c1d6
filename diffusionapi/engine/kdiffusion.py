"""k-diffusion-style samplers over sigmas, written for this project.

Everything here works on a *denoiser* ``model(x, sigma) -> x0`` in the variance-exploding
parameterisation (x = x0 + sigma * eps), the form A1111 drives its samplers in. Sources:
Karras et al. 2022 (Euler/Heun, karras sigmas), Lu et al. 2022 "DPM-Solver" (DPM fast and
adaptive: fixed-order and error-controlled solvers in log-SNR time), Lu et al. 2022
"DPM-Solver++" (2M multistep, 2S singlestep, SDE variant), and linear multistep (LMS).

Noise always comes from a caller-supplied ``NoiseSource`` seeded per job, never from the
global RNG, so a seed reproduces the same image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class NoiseSource(Protocol):
    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor: ...


class Progress(Protocol):
    def __call__(self, fraction: float) -> None: ...


# ---------------------------------------------------------------------------- sigmas

class ModelSigmas:
    """The discrete training sigmas of an eps/v-prediction model and conversions."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        acp = alphas_cumprod.to(torch.float64)
        self.alphas_cumprod = acp
        self.sigmas = ((1 - acp) / acp).sqrt()
        self.log_sigmas = self.sigmas.log()

    @classmethod
    def from_scheduler_config(cls, config) -> "ModelSigmas":
        n = int(config.get("num_train_timesteps", 1000))
        start, end = float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012))
        sched = config.get("beta_schedule", "scaled_linear")
        if sched == "scaled_linear":
            betas = torch.linspace(start ** 0.5, end ** 0.5, n, dtype=torch.float64) ** 2
        elif sched == "linear":
            betas = torch.linspace(start, end, n, dtype=torch.float64)
        else:
            raise ValueError(f"unsupported beta_schedule {sched!r}")
        acp = torch.cumprod(1 - betas, 0)
        if config.get("rescale_betas_zero_snr"):
            acp = zero_terminal_snr(acp)
        return cls(acp)

    @property
    def num_timesteps(self) -> int:
        return len(self.sigmas)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(torch.float64).clamp(0, self.num_timesteps - 1)
        lo = t.floor().long()
        hi = t.ceil().long()
        w = t - lo
        return ((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi]).exp()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep of a sigma, by linear interpolation in log-sigma."""
        log_sigma = sigma.to(torch.float64).clamp(min=1e-10).log()
        ls = self.log_sigmas.to(log_sigma.device)
        dists = log_sigma - ls[:, None] if log_sigma.dim() else log_sigma - ls
        idx = (dists >= 0).cumsum(0).argmax(0).clamp(max=len(ls) - 2)
        low, high = ls[idx], ls[idx + 1]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        return (1 - w) * idx + w * (idx + 1)


# What the last alpha-bar becomes under zero terminal SNR: exactly 0 would make the largest
# sigma infinite, so A1111 (dev) and ComfyUI use this value (sigma_max ~ 4500).
ZTSNR_LAST_ALPHA_CUMPROD = 4.8973451890853435e-08


def zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023 ("Common diffusion noise schedules and sample steps are flawed", alg. 1):
    shift and scale sqrt(alpha-bar) so the last step is pure noise and the first is unchanged."""
    ab_sqrt = alphas_cumprod.to(torch.float64).sqrt()
    first, last = ab_sqrt[0].clone(), ab_sqrt[-1].clone()
    ab_sqrt = (ab_sqrt - last) * first / (first - last)
    out = ab_sqrt ** 2
    out[-1] = ZTSNR_LAST_ALPHA_CUMPROD
    return out


def _append_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros(1)])


def sigmas_normal(ms: ModelSigmas, n: int) -> torch.Tensor:
    """A1111 "Normal": timesteps evenly spaced over the whole range (diffusers' "linspace")."""
    t = torch.linspace(ms.num_timesteps - 1, 0, n, dtype=torch.float64)
    return _append_zero(ms.t_to_sigma(t))


def sigmas_karras(ms: ModelSigmas, n: int, rho: float = 7.0) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = ms.sigma_min ** (1 / rho), ms.sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def sigmas_exponential(ms: ModelSigmas, n: int) -> torch.Tensor:
    return _append_zero(torch.linspace(math.log(ms.sigma_max), math.log(ms.sigma_min), n,
                                       dtype=torch.float64).exp())


def spaced_timesteps(num_train: int, n: int, spacing: str, offset: int) -> torch.Tensor:
    """Descending integer timesteps as diffusers spaces them for a scheduler config."""
    if spacing == "leading":
        ts = torch.arange(n, dtype=torch.float64) * (num_train // n) + offset
    elif spacing == "trailing":
        ts = torch.arange(num_train, 0, -num_train / n, dtype=torch.float64).round() - 1
        ts = ts.flip(0)
    elif spacing == "linspace":
        ts = torch.linspace(0, num_train - 1, n, dtype=torch.float64).round()
    else:
        raise ValueError(f"unknown timestep_spacing {spacing!r}")
    return ts.clamp(0, num_train - 1).flip(0)


def sigmas_at_timesteps(ms: ModelSigmas, timesteps: torch.Tensor) -> torch.Tensor:
    return _append_zero(ms.sigmas[timesteps.long()])


def build_sigmas(ms: ModelSigmas, schedule: str, n: int, *, model_spacing: str = "leading",
                 model_offset: int = 1) -> torch.Tensor:
    """n+1 descending sigmas ending in 0 for one of the seed's scheduler types."""
    if schedule == "default":
        return sigmas_normal(ms, n)
    if schedule == "karras":
        return sigmas_karras(ms, n)
    if schedule == "exponential":
        return sigmas_exponential(ms, n)
    if schedule == "ddim":
        # A1111's DDIM schedule: uniform "leading" timesteps shifted by one.
        return sigmas_at_timesteps(ms, spaced_timesteps(ms.num_timesteps, n, "leading", 1))
    if schedule == "pndm":
        return sigmas_at_timesteps(ms, spaced_timesteps(ms.num_timesteps, n, model_spacing, model_offset))
    if schedule == "simple":
        return sigmas_simple(ms, n)
    if schedule == "sgm_uniform":
        return sigmas_sgm_uniform(ms, n)
    if schedule == "beta":
        return sigmas_beta(ms, n)
    if schedule == "kl_optimal":
        return sigmas_kl_optimal(ms, n)
    raise ValueError(f"no sigma schedule {schedule!r}")


def sigmas_simple(ms: ModelSigmas, n: int) -> torch.Tensor:
    """"Simple" (ComfyUI, Forge): n training timesteps evenly strided down from the last one.
    Flow models (engine/flow.py) compute it in continuous time."""
    if hasattr(ms, "simple"):
        return ms.simple(n)
    stride = ms.num_timesteps / n
    idx = torch.tensor([ms.num_timesteps - 1 - int(i * stride) for i in range(n)])
    return _append_zero(ms.sigmas[idx])


def sigmas_sgm_uniform(ms: ModelSigmas, n: int) -> torch.Tensor:
    """"SGM Uniform": n+1 timesteps evenly spaced over the whole range, the last (t = 0) dropped
    (the spacing Stability's SGM code uses for SDXL Turbo / Lightning)."""
    t = torch.linspace(ms.num_timesteps - 1, 0, n + 1, dtype=torch.float64)[:-1]
    return _append_zero(ms.t_to_sigma(t))


def sigmas_beta(ms: ModelSigmas, n: int, alpha: float = 0.6, beta: float = 0.6) -> torch.Tensor:
    """"Beta" (Lee et al. 2024, "Beta sampling is all you need"): timesteps at the quantiles of a
    Beta(0.6, 0.6) distribution, denser at both ends of the schedule."""
    import numpy as np
    from scipy import stats

    q = 1 - np.linspace(0, 1, n, endpoint=False)
    idx = np.rint(stats.beta.ppf(q, alpha, beta) * (ms.num_timesteps - 1)).astype(int)
    return _append_zero(ms.sigmas[torch.from_numpy(idx)])


def sigmas_kl_optimal(ms: ModelSigmas, n: int) -> torch.Tensor:
    """"KL Optimal" (Sabour et al. 2024, "Align Your Steps", the KL-optimal schedule):
    sigmas evenly spaced in arctan(sigma) between the model's bounds."""
    w = torch.arange(n, dtype=torch.float64) / max(n - 1, 1)
    lo, hi = math.atan(ms.sigma_min), math.atan(ms.sigma_max)
    return _append_zero(torch.tan(w * lo + (1 - w) * hi))


# ---------------------------------------------------------------------------- noise

class SeededNoise:
    """Gaussian noise from the job's CPU generator, moved to the latents' device."""

    def __init__(self, generator: torch.Generator, like: torch.Tensor):
        self.generator, self.shape, self.device, self.dtype = generator, like.shape, like.device, like.dtype

    def __call__(self, sigma=None, sigma_next=None) -> torch.Tensor:
        return torch.randn(self.shape, generator=self.generator, dtype=torch.float32).to(self.device, self.dtype)


class BrownianNoise:
    """Brownian-tree noise (torchsde), the noise DPM++ SDE needs so that steps of different
    sizes see consistent Brownian increments; seeded from the job's seed."""

    def __init__(self, like: torch.Tensor, sigma_min: float, sigma_max: float, seed: int):
        import torchsde

        self.lo, self.hi = float(sigma_min), float(sigma_max)
        w0 = torch.zeros(like.shape, dtype=torch.float32)
        # A hair of margin: torchsde stores the bounds in float32 and warns at the ends.
        self.device, self.dtype, self.shape = like.device, like.dtype, like.shape
        self.tree = torchsde.BrownianTree(self.lo * (1 - 1e-5), w0, self.hi * (1 + 1e-5), entropy=int(seed) % (2**63), tol=1e-6,
                                          pool_size=24)

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        a, b = float(sigma), float(sigma_next)
        a, b = min(max(a, self.lo), self.hi), min(max(b, self.lo), self.hi)
        lo, hi = min(a, b), max(a, b)
        if hi - lo <= 0:
            return torch.zeros(self.shape, device=self.device, dtype=self.dtype)
        w = self.tree(lo, hi) / math.sqrt(hi - lo)
        if a > b:  # k-diffusion's sign convention for a step down in sigma
            w = -w
        return w.to(self.device, self.dtype)


# ---------------------------------------------------------------------------- helpers

def _to_d(x, sigma, denoised):
    return (x - denoised) / sigma


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step into a deterministic part down to sigma_down and fresh noise sigma_up."""
    if not eta or sigma_next == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5)
    down = (sigma_next ** 2 - up ** 2) ** 0.5
    return down, up


@dataclass
class RunContext:
    noise: NoiseSource
    progress: Progress
    eta: float = 1.0


def _steps(sigmas: torch.Tensor):
    vals = [float(s) for s in sigmas]
    n = len(vals) - 1
    for i in range(n):
        yield i, n, vals[i], vals[i + 1]


def _s(x: torch.Tensor, v: float) -> torch.Tensor:
    # Sigmas stay on the CPU: reading one back from a GPU would synchronise every evaluation.
    return torch.full((x.shape[0],), v, dtype=torch.float64)


# ---------------------------------------------------------------------------- samplers

def sample_euler(model, x, sigmas, ctx: RunContext):
    for i, n, s, sn in _steps(sigmas):
        denoised = model(x, _s(x, s))
        x = x + _to_d(x, s, denoised) * (sn - s)
        ctx.progress((i + 1) / n)
    return x


def sample_euler_ancestral(model, x, sigmas, ctx: RunContext):
    for i, n, s, sn in _steps(sigmas):
        denoised = model(x, _s(x, s))
        down, up = ancestral_step(s, sn, ctx.eta)
        x = x + _to_d(x, s, denoised) * (down - s)
        if sn > 0 and up > 0:
            x = x + ctx.noise(s, sn) * up
        ctx.progress((i + 1) / n)
    return x


def sample_heun(model, x, sigmas, ctx: RunContext):
    for i, n, s, sn in _steps(sigmas):
        denoised = model(x, _s(x, s))
        d = _to_d(x, s, denoised)
        if sn == 0:
            x = x + d * (sn - s)
        else:
            x2 = x + d * (sn - s)
            d2 = _to_d(x2, sn, model(x2, _s(x, sn)))
            x = x + (d + d2) / 2 * (sn - s)
        ctx.progress((i + 1) / n)
    return x


def sample_dpm_2(model, x, sigmas, ctx: RunContext):
    for i, n, s, sn in _steps(sigmas):
        denoised = model(x, _s(x, s))
        d = _to_d(x, s, denoised)
        if sn == 0:
            x = x + d * (sn - s)
        else:
            mid = math.exp((math.log(s) + math.log(sn)) / 2)
            x2 = x + d * (mid - s)
            d2 = _to_d(x2, mid, model(x2, _s(x, mid)))
            x = x + d2 * (sn - s)
        ctx.progress((i + 1) / n)
    return x


def sample_dpmpp_2s_ancestral(model, x, sigmas, ctx: RunContext):
    """DPM-Solver++(2S) with ancestral noise: a midpoint in log-sigma, then a full step."""
    for i, n, s, sn in _steps(sigmas):
        denoised = model(x, _s(x, s))
        down, up = ancestral_step(s, sn, ctx.eta)
        if down == 0:
            x = x + _to_d(x, s, denoised) * (down - s)
        else:
            lam, lam_next = -math.log(s), -math.log(down)
            h = lam_next - lam
            s_mid = math.exp(-(lam + 0.5 * h))
            x2 = (s_mid / s) * x - math.expm1(-0.5 * h) * denoised
            denoised2 = model(x2, _s(x, s_mid))
            x = (down / s) * x - math.expm1(-h) * denoised2
        if sn > 0 and up > 0:
            x = x + ctx.noise(s, sn) * up
        ctx.progress((i + 1) / n)
    return x


def sample_dpmpp_2m(model, x, sigmas, ctx: RunContext):
    """DPM-Solver++(2M): second order from the previous step's denoised estimate."""
    prev = None
    h_prev = None
    for i, n, s, sn in _steps(sigmas):
        denoised = model(x, _s(x, s))
        if sn == 0:
            x = denoised
        else:
            h = math.log(s) - math.log(sn)
            if prev is None:
                d = denoised
            else:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * prev
            x = (sn / s) * x - math.expm1(-h) * d
            h_prev = h
        prev = denoised
        ctx.progress((i + 1) / n)
    return x


def sample_dpmpp_sde(model, x, sigmas, ctx: RunContext, r: float = 0.5):
    """DPM-Solver++ SDE (stochastic, second order, two evaluations per step)."""
    for i, n, s, sn in _steps(sigmas):
        denoised = model(x, _s(x, s))
        if sn == 0:
            x = x + _to_d(x, s, denoised) * (sn - s)
        else:
            lam, lam_next = -math.log(s), -math.log(sn)
            h = lam_next - lam
            s_mid = math.exp(-(lam + h * r))
            fac = 1 / (2 * r)
            down, up = ancestral_step(s, s_mid, ctx.eta)
            x2 = (down / s) * x - math.expm1(lam + math.log(down)) * denoised
            if up > 0:
                x2 = x2 + ctx.noise(s, s_mid) * up
            denoised2 = model(x2, _s(x, s_mid))
            down, up = ancestral_step(s, sn, ctx.eta)
            d = (1 - fac) * denoised + fac * denoised2
            x = (down / s) * x - math.expm1(lam + math.log(down)) * d
            if up > 0:
                x = x + ctx.noise(s, sn) * up
        ctx.progress((i + 1) / n)
    return x


def _lms_coefficient(order: int, t: list[float], i: int, j: int) -> float:
    from scipy import integrate

    def basis(tau):
        prod = 1.0
        for k in range(order):
            if k != j:
                prod *= (tau - t[i - k]) / (t[i - j] - t[i - k])
        return prod

    return integrate.quad(basis, t[i], t[i + 1], epsrel=1e-4)[0]


def sample_lms(model, x, sigmas, ctx: RunContext, order: int = 4):
    vals = [float(s) for s in sigmas]
    ds: list[torch.Tensor] = []
    n = len(vals) - 1
    for i in range(n):
        denoised = model(x, _s(x, vals[i]))
        ds.append(_to_d(x, vals[i], denoised))
        if len(ds) > order:
            ds.pop(0)
        cur = min(i + 1, order)
        coeffs = [_lms_coefficient(cur, vals, i, j) for j in range(cur)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
        ctx.progress((i + 1) / n)
    return x


# DPM-Solver in log-SNR time lam = -log(sigma) (data prediction form of eps model).

class _DPMSolver:
    def __init__(self, model, x_like):
        self.model = model
        self.like = x_like

    @staticmethod
    def sigma(lam: float) -> float:
        return math.exp(-lam)

    def eps(self, cache: dict, key: str, x, lam: float):
        if key not in cache:
            s = self.sigma(lam)
            cache[key] = (x - self.model(x, _s(x, s))) / s
        return cache[key]

    def step1(self, x, t, t_next, cache):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        return x - self.sigma(t_next) * math.expm1(h) * eps

    def step2(self, x, t, t_next, cache, r1=0.5):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - self.sigma(s1) * math.expm1(r1 * h) * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        return (x - self.sigma(t_next) * math.expm1(h) * eps
                - self.sigma(t_next) / (2 * r1) * math.expm1(h) * (eps_r1 - eps))

    def step3(self, x, t, t_next, cache, r1=1 / 3, r2=2 / 3):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - self.sigma(s1) * math.expm1(r1 * h) * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        u2 = (x - self.sigma(s2) * math.expm1(r2 * h) * eps
              - self.sigma(s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (eps_r1 - eps))
        eps_r2 = self.eps(cache, "eps_r2", u2, s2)
        return (x - self.sigma(t_next) * math.expm1(h) * eps
                - self.sigma(t_next) / r2 * (math.expm1(h) / h - 1) * (eps_r2 - eps))

    def ancestral(self, t: float, t_next: float, eta: float, t_end: float):
        """Step deterministically to sigma_down (not past the run's end), then add noise up to t_next."""
        if not eta:
            return t_next, 0.0
        down, _ = ancestral_step(self.sigma(t), self.sigma(t_next), eta)
        t_down = -math.log(down) if down > 0 else float("inf")
        t_target = min(t_end, t_down)
        up = max(self.sigma(t_next) ** 2 - self.sigma(t_target) ** 2, 0.0) ** 0.5
        return t_target, up


def sample_dpm_fast(model, x, sigma_min: float, sigma_max: float, nfe: int, ctx: RunContext):
    """DPM-Solver-fast: ``nfe`` evaluations split into order-3 steps (then 2/1) uniform in log-SNR."""
    solver = _DPMSolver(model, x)
    t_start, t_end = -math.log(sigma_max), -math.log(sigma_min)
    m = nfe // 3 + 1
    ts = torch.linspace(t_start, t_end, m + 1, dtype=torch.float64).tolist()
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    done = 0
    for i, order in enumerate(orders):
        cache: dict = {}
        t, t_next = ts[i], ts[i + 1]
        t_next_, up = solver.ancestral(t, t_next, ctx.eta, t_end)
        step = {1: solver.step1, 2: solver.step2, 3: solver.step3}[order]
        x = step(x, t, t_next_, cache)
        if up > 0:
            x = x + up * ctx.noise(solver.sigma(t), solver.sigma(t_next))
        done += order
        ctx.progress(min(done / nfe, 1.0))
    return x


class PIDStepSizeController:
    """Step-size control for DPM adaptive (an I-controller by default)."""

    def __init__(self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float,
                 accept_safety: float, eps: float = 1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety, self.eps = accept_safety, eps
        self.errs: list[float] = []

    def propose_step(self, error: float) -> bool:
        inv = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv, inv, inv]
        self.errs[0] = inv
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


def sample_dpm_adaptive(model, x, sigma_min: float, sigma_max: float, ctx: RunContext, *,
                        order: int = 3, rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05,
                        pcoeff: float = 0.0, icoeff: float = 1.0, dcoeff: float = 0.0,
                        accept_safety: float = 0.81, max_evals: int = 2000):
    """DPM-Solver-12/23 with embedded error estimate; progress is the log-SNR distance covered."""
    solver = _DPMSolver(model, x)
    t_start, t_end = -math.log(sigma_max), -math.log(sigma_min)
    s = t_start
    x_prev = x
    pid = PIDStepSizeController(h_init, pcoeff, icoeff, dcoeff, 1.5 if ctx.eta else order, accept_safety)
    nfe = 0
    while s < t_end - 1e-5:
        cache: dict = {}
        t = min(t_end, s + pid.h)
        t_, up = solver.ancestral(s, t, ctx.eta, t_end)
        if order == 2:
            x_low = solver.step1(x, s, t_, cache)
            x_high = solver.step2(x, s, t_, cache)
        else:
            x_low = solver.step2(x, s, t_, cache, r1=1 / 3)
            x_high = solver.step3(x, s, t_, cache)
        delta = torch.maximum(torch.full_like(x_low, atol), rtol * torch.maximum(x_low.abs(), x_prev.abs()))
        error = float(torch.linalg.norm(((x_low - x_high) / delta).float()) / x.numel() ** 0.5)
        nfe += len(cache)
        if pid.propose_step(error):
            x_prev = x_low
            x = x_high
            if up > 0:
                x = x + up * ctx.noise(solver.sigma(s), solver.sigma(t))
            s = t
            ctx.progress(min((s - t_start) / (t_end - t_start), 1.0))
        if nfe > max_evals:
            raise RuntimeError(f"DPM adaptive did not converge within {max_evals} model evaluations")
    ctx.progress(1.0)
    return x


def expected_evals(algorithm: str, sigmas: torch.Tensor, eta: float) -> int:
    """Model evaluations a fixed-schedule sampler makes over ``sigmas``: progress counts these."""
    vals = [float(v) for v in sigmas]
    pairs = list(zip(vals[:-1], vals[1:]))
    if algorithm in ("heun", "dpm_2", "dpmpp_sde"):
        return sum(2 if sn > 0 else 1 for _, sn in pairs)
    if algorithm == "dpmpp_2s_ancestral":
        return sum(2 if ancestral_step(s, sn, eta)[0] > 0 else 1 for s, sn in pairs)
    return len(pairs)  # one per step; DPM fast: its sigma list has one entry per evaluation


FIXED_ALGORITHMS = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpm_2": sample_dpm_2,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_sde": sample_dpmpp_sde,
    "lms": sample_lms,
}
