"""Flow-matching families (Flux.1; the family table says which) on the engine's samplers.

A rectified-flow model predicts a velocity v for x = (1 - t) * x0 + t * noise, so x0 = x - t * v.
Dividing by (1 - t) gives the variance-exploding form the rest of the engine speaks,
x / (1 - t) = x0 + s * noise with s = t / (1 - t): the k-diffusion samplers (deterministic,
ancestral, SDE, DPM fast/adaptive), the diffusers timestep samplers (DDIM, PLMS, UniPC, over
an equivalent discrete schedule), img2img, masks, hires and previews all work on it unchanged,
and a deterministic sampler takes the same steps Forge and ComfyUI take on the flow sigmas
(the first-order step of both forms is the same DDIM step).

The flow time t is the model's *shifted* time: t = shift * u / (1 + (shift - 1) * u) for the
uniform time u, with Flux.1-dev's shift depending on the image size (exp(mu), mu linear in the
number of latent patches, as diffusers' FluxPipeline computes it) and a fixed shift for others.
t = 1 (pure noise) is s = infinity; the schedule starts at ``FLOW_T_MAX`` instead, a 1e-4
difference in the first model input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ..families import FAMILIES
from .guidance import rescale_cfg
from .kdiffusion import ModelSigmas

FLOW_T_MAX = 1 - 1e-4
# Families whose spec says prediction "flow" (kept as ids: the engine checks plans by them).
FLOW_FAMILIES = frozenset(f.id for f in FAMILIES if f.prediction == "flow")
NUM_TIMESTEPS = 1000


def shifted(u, shift: float):
    """The model's flow time at uniform time ``u`` (a float or a tensor)."""
    return shift * u / (1 + (shift - 1) * u)


def unshifted(t, shift: float):
    return t / (shift - (shift - 1) * t)


class FlowSigmas(ModelSigmas):
    """A flow model's noise levels as a discrete VE model: timestep k (0..999) is uniform time
    u = (k + 1) / 1000, sigma = t / (1 - t) with t the shifted time. Conversions between
    timesteps and sigmas are exact (no table interpolation)."""

    def __init__(self, shift: float):
        self.shift = float(shift)
        u = torch.arange(1, NUM_TIMESTEPS + 1, dtype=torch.float64) / NUM_TIMESTEPS
        t = shifted(u, self.shift).clamp(max=FLOW_T_MAX)
        s = t / (1 - t)
        super().__init__(1 / (1 + s * s))

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        u = (t.to(torch.float64).clamp(0, NUM_TIMESTEPS - 1) + 1) / NUM_TIMESTEPS
        ft = shifted(u, self.shift).clamp(max=FLOW_T_MAX)
        return ft / (1 - ft)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.to(torch.float64)
        u = unshifted(s / (1 + s), self.shift)
        return u * NUM_TIMESTEPS - 1

    def simple(self, n: int) -> torch.Tensor:
        """ComfyUI / Forge "Simple", which is also diffusers' default for these pipelines: uniform
        times 1, 1 - 1/n, ..., 1/n, shifted; then 0."""
        u = torch.linspace(1.0, 1.0 / n, n, dtype=torch.float64)
        t = shifted(u, self.shift).clamp(max=FLOW_T_MAX)
        return torch.cat([t / (1 - t), t.new_zeros(1)])


class _TimeBounds:
    def __init__(self, lo: float, hi: float):
        self.sigma_min, self.sigma_max = lo, hi


# Schedules defined by sigma values (not timesteps): Forge and ComfyUI space them in flow time
# t (their "sigmas" of a flow model), between the smallest t and 1; spaced in the VE sigma
# instead they would spend most steps near pure noise.
TIME_SPACE_SCHEDULES = ("karras", "exponential", "kl_optimal")


def sigmas_in_flow_time(ms: FlowSigmas, schedule: str, n: int) -> torch.Tensor:
    from . import kdiffusion as kd

    build = {"karras": kd.sigmas_karras, "exponential": kd.sigmas_exponential,
             "kl_optimal": kd.sigmas_kl_optimal}[schedule]
    t = build(_TimeBounds(flow_time(ms.sigma_min), 1.0), n).clamp(max=FLOW_T_MAX)
    return t / (1 - t)


def flow_time(sigma: float) -> float:
    return sigma / (1 + sigma)


@dataclass(frozen=True)
class FlowShift:
    """How a model's shift is chosen, from its scheduler config."""
    shift: float = 1.0
    dynamic: bool = False
    base_seq_len: int = 256
    max_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15
    # Flux.2: mu from the token count and the step count (diffusers' compute_empirical_mu), not
    # from base/max shift; at ``steps`` None, its pipeline's default 50 steps.
    empirical: bool = False

    @classmethod
    def from_scheduler_config(cls, config) -> "FlowShift":
        return cls(float(config.get("shift", 1.0)), bool(config.get("use_dynamic_shifting", False)),
                   int(config.get("base_image_seq_len", 256)), int(config.get("max_image_seq_len", 4096)),
                   float(config.get("base_shift", 0.5)), float(config.get("max_shift", 1.15)))

    def for_size(self, width: int, height: int, vae_scale: int = 8, patch: int = 2, steps: int | None = None) -> float:
        if not self.dynamic:
            return self.shift
        seq_len = (height // (vae_scale * patch)) * (width // (vae_scale * patch))
        if self.empirical:
            return math.exp(empirical_mu(seq_len, steps or 50))
        m = (self.max_shift - self.base_shift) / (self.max_seq_len - self.base_seq_len)
        mu = seq_len * m + (self.base_shift - m * self.base_seq_len)
        return math.exp(mu)


def empirical_mu(seq_len: int, steps: int) -> float:
    """Flux.2's mu (diffusers' compute_empirical_mu, BFL's fit): linear in the token count at 10
    and at 200 steps, interpolated linearly in the step count; above 4300 tokens the 200-step line."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if seq_len > 4300:
        return float(a2 * seq_len + b2)
    m_200, m_10 = a2 * seq_len + b2, a1 * seq_len + b1
    a = (m_200 - m_10) / 190.0
    return float(a * steps + m_200 - 200.0 * a)


class FlowModelSigmas:
    """Per-size sigmas of a loaded flow model (the shift depends on the size; Flux.2's also on
    the step count), made once each."""

    def __init__(self, shift: FlowShift, vae_scale: int = 8, patch: int = 2):
        self.shift, self.vae_scale, self.patch = shift, vae_scale, patch
        self._by_shift: dict[float, FlowSigmas] = {}

    def at(self, width: int, height: int, steps: int | None = None) -> FlowSigmas:
        value = round(self.shift.for_size(width, height, self.vae_scale, self.patch, steps), 12)
        if value not in self._by_shift:
            self._by_shift[value] = FlowSigmas(value)
        return self._by_shift[value]


def timestep_scheduler_config(ms: FlowSigmas) -> dict:
    """A DDPM-style config whose betas give ``ms``'s discrete sigmas: diffusers' DDIM, PLMS and
    UniPC then run on the flow model like on any epsilon model."""
    acp = ms.alphas_cumprod
    prev = torch.cat([acp.new_ones(1), acp[:-1]])
    betas = (1 - acp / prev).clamp(1e-12, 0.999999)
    return {"num_train_timesteps": NUM_TIMESTEPS, "trained_betas": betas.tolist(), "prediction_type": "epsilon",
            "timestep_spacing": "linspace", "steps_offset": 0, "beta_schedule": "linear",
            "beta_start": 0.0001, "beta_end": 0.02}


# ---------------------------------------------------------------------------- denoisers

@dataclass
class FlowConditioning:
    """A job's text conditioning for a flow family: the sequence and pooled vector of the prompt
    and, when CFG runs a negative pass, of the negative prompt (Flux: T5 + CLIP-L pooled;
    SD 3: CLIP-L + CLIP-G + T5 sequence, both CLIPs pooled)."""
    embeds: torch.Tensor                 # [1, seq, joint_dim]
    pooled: torch.Tensor                 # [1, pooled_dim]
    text_ids: torch.Tensor | None = None  # Flux: [seq, 3] positions of the text tokens
    neg_embeds: torch.Tensor | None = None
    neg_pooled: torch.Tensor | None = None


def pack(x: torch.Tensor) -> torch.Tensor:
    """[b, c, h, w] latents -> [b, (h/2)(w/2), 4c] patches (diffusers' FluxPipeline layout)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, c4 = x.shape
    return x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FlowDenoiser:
    """A flow model as a k-diffusion denoiser D(x, sigma) -> x0 in the VE form (module
    docstring), and as a diffusers-style epsilon model for DDIM/PLMS/UniPC.

    ``cfg_scale`` above 1 adds a negative pass, v = neg + cfg * (pos - neg); at 1 (Flux's usual
    value, Forge's rule) each step is one pass and the negative prompt is not used."""

    vpred = False  # model_output() gives epsilon

    def __init__(self, loaded, cond: FlowConditioning, ms: FlowSigmas, cfg_scale: float,
                 on_eval: Callable[[], None], cfg_rescale: float = 0.0):
        self.transformer = loaded.pipe.transformer
        self.cond = cond
        self.ms = ms
        self.cfg = float(cfg_scale)
        self.rescale = float(cfg_rescale)
        self.on_eval = on_eval
        self.dtype = self.transformer.dtype
        self.evals = 0
        self._x0 = None
        self.negative_pass = self.cfg != 1.0 and cond.neg_embeds is not None

    def latest_x0(self):
        x0 = self._x0
        return x0() if callable(x0) else x0

    def network(self, x_flow: torch.Tensor, t: float, embeds: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        """The family's transformer on ``n`` conditioning rows per image: velocities [n*b, c, h, w]."""
        raise NotImplementedError

    def velocity(self, x_flow: torch.Tensor, t: float) -> torch.Tensor:
        self.on_eval()
        self.evals += 1
        b = x_flow.shape[0]
        rows = [(self.cond.embeds, self.cond.pooled)]
        if self.negative_pass:
            rows.insert(0, (self.cond.neg_embeds, self.cond.neg_pooled))
        dev = x_flow.device
        embeds = torch.cat([e.expand(b, -1, -1) for e, _ in rows]).to(dev, self.dtype)
        pooled = torch.cat([p.expand(b, -1) for _, p in rows]).to(dev, self.dtype)
        v = self.network(x_flow, t, embeds, pooled).float()
        if len(rows) == 1:
            return v
        neg, pos = v.split(b)
        guided = neg + (pos - neg) * self.cfg
        if self.rescale:
            guided = rescale_cfg(guided, neg, [pos], [1.0], self.rescale)
        return guided

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = float(sigma.reshape(-1)[0])
        t = flow_time(s)
        x_flow = x * (1 / (1 + s))
        x0 = x_flow - self.velocity(x_flow, t) * t
        self._x0 = x0
        return x0

    def model_output(self, x_vp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Epsilon at a discrete timestep, for diffusers' schedulers (VP-scaled input)."""
        s = float(self.ms.t_to_sigma(t.reshape(-1)[:1].to(torch.float64))[0])
        x = x_vp * math.sqrt(1 + s * s)
        return (x - self(x, torch.tensor([s]))) / s


class FluxDenoiser(FlowDenoiser):
    """Flux.1: latents packed 2x2, flow time as the timestep, and ``guidance`` (Forge's "Distilled
    CFG Scale") fed to guidance-distilled models (dev), ignored by schnell."""

    def __init__(self, loaded, cond, ms, cfg_scale, on_eval, cfg_rescale=0.0, guidance: float | None = None):
        super().__init__(loaded, cond, ms, cfg_scale, on_eval, cfg_rescale)
        self.guidance = guidance if self.transformer.config.guidance_embeds else None

    # ControlNet units (engine/controlnet/transformer.FlowControl), set by the job's ControlState: called
    # with the transformer's inputs, it returns the residual kwargs to add (empty when none is on).
    control = None
    clock = None  # A1111's sampling step (engine/controlnet/units.StepClock), with ControlNet units

    def network(self, x_flow, t, embeds, pooled):
        rows = embeds.shape[0] // x_flow.shape[0]
        _, _, h, w = x_flow.shape
        dev, n = x_flow.device, embeds.shape[0]
        guidance = None if self.guidance is None else torch.full((n,), float(self.guidance), device=dev,
                                                                  dtype=torch.float32)
        inputs = dict(hidden_states=pack(x_flow.to(self.dtype)).repeat(rows, 1, 1),
                      timestep=torch.full((n,), t, device=dev, dtype=self.dtype), guidance=guidance,
                      pooled_projections=pooled, encoder_hidden_states=embeds,
                      txt_ids=self.cond.text_ids.to(dev, self.dtype), img_ids=image_ids(h, w, dev, self.dtype))
        extra = self.control(inputs, rows) if self.control is not None else {}
        out = self.transformer(**inputs, **extra, return_dict=False)[0]
        return unpack(out, h, w)


@dataclass
class ReferenceTokens:
    """An edit job's reference images as Flux.1 Kontext sees them: their latents packed 2x2
    ([1, n, 64]) and the position ids of those tokens ([n, 3]), first id 1 (0 is the image
    being made), as diffusers' FluxKontextPipeline.prepare_latents makes them for one image.
    Flux.2's are [1, n, 128] with (t, h, w, l) ids [n, 4] (flow_families.flux2_reference_tokens)."""
    tokens: torch.Tensor
    ids: torch.Tensor


def reference_tokens(latents: list[torch.Tensor]) -> ReferenceTokens:
    """Reference latents [1, c, h, w] -> Kontext tokens. One reference sits at position (0, 0),
    as in diffusers. Several are laid out side by side in position space, each beside the
    ones before it (right of them when that keeps the layout squarer, else below) -- ComfyUI's
    default ("offset") way of giving Kontext several reference latents, InvokeAI's too; the
    pipeline itself takes one image. Offsets count 2x2 patches."""
    tokens, ids = [], []
    h_end = w_end = 0  # where the references placed so far end, in patches
    for z in latents:
        hp, wp = z.shape[-2] // 2, z.shape[-1] // 2
        h_off, w_off = (0, w_end) if hp + h_end > wp + w_end else (h_end, 0)
        pos = image_ids(z.shape[-2], z.shape[-1], z.device, torch.float32)
        pos[:, 0] = 1
        pos[:, 1] += h_off
        pos[:, 2] += w_off
        tokens.append(pack(z))
        ids.append(pos)
        h_end, w_end = max(h_end, hp + h_off), max(w_end, wp + w_off)
    return ReferenceTokens(torch.cat(tokens, dim=1), torch.cat(ids))


def reference_size(width: int, height: int, max_pixels: int, multiple: int = 16) -> tuple[int, int]:
    """The size a reference image is encoded at: its own, scaled down (aspect kept) to at most
    ``max_pixels`` (the model's native area), then rounded down to ``multiple`` (2x2 patches)."""
    scale = min(1.0, math.sqrt(max_pixels / float(width * height)))
    w, h = int(width * scale), int(height * scale)
    return max(multiple, w // multiple * multiple), max(multiple, h // multiple * multiple)


class FluxKontextDenoiser(FluxDenoiser):
    """Flux.1 Kontext: Flux.1's network with the reference tokens appended to the image tokens
    at every evaluation (FluxKontextPipeline.__call__); only the image's own tokens come out."""

    def __init__(self, loaded, cond, ms, cfg_scale, on_eval, cfg_rescale=0.0, guidance: float | None = None,
                 references: ReferenceTokens | None = None):
        super().__init__(loaded, cond, ms, cfg_scale, on_eval, cfg_rescale, guidance)
        self.references = references

    def network(self, x_flow, t, embeds, pooled):
        if self.references is None:  # Kontext without an image is a text-to-image model
            return super().network(x_flow, t, embeds, pooled)
        rows = embeds.shape[0] // x_flow.shape[0]
        _, _, h, w = x_flow.shape
        dev, n = x_flow.device, embeds.shape[0]
        guidance = None if self.guidance is None else torch.full((n,), float(self.guidance), device=dev,
                                                                  dtype=torch.float32)
        own = pack(x_flow.to(self.dtype)).repeat(rows, 1, 1)
        refs = self.references.tokens.to(dev, self.dtype).expand(n, -1, -1)
        ids = torch.cat([image_ids(h, w, dev, self.dtype), self.references.ids.to(dev, self.dtype)])
        out = self.transformer(hidden_states=torch.cat([own, refs], dim=1),
                               timestep=torch.full((n,), t, device=dev, dtype=self.dtype), guidance=guidance,
                               pooled_projections=pooled, encoder_hidden_states=embeds,
                               txt_ids=self.cond.text_ids.to(dev, self.dtype), img_ids=ids, return_dict=False)[0]
        return unpack(out[:, :own.shape[1]], h, w)


def fill_conditioning(masked_latents: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Flux.1 Fill's fixed input channels, as FluxFillPipeline.prepare_mask_latents makes them:
    the masked image's latents [1, 16, h, w] packed 2x2 (64 channels), then the binary pixel mask
    [1, 1, 8h, 8w] (1 = repaint) with each latent pixel's 8x8 block as 64 channels, packed 2x2
    (256): [1, h*w/4, 320], appended to every token's 64 noisy-latent channels."""
    b, _, h, w = masked_latents.shape
    m = mask[:, 0].to(masked_latents).view(b, h, 8, w, 8).permute(0, 2, 4, 1, 3).reshape(b, 64, h, w)
    return torch.cat([pack(masked_latents), pack(m)], dim=-1)


class FillTransformer:
    """The transformer with Flux.1 Fill's conditioning concatenated to every token of its input
    (the same for each image of the batch and each CFG row), as ConcatUNet does for SD
    inpainting UNets; anything else passes through to the transformer."""

    def __init__(self, transformer, conditioning: torch.Tensor):
        self.transformer = transformer
        self.conditioning = conditioning

    def __getattr__(self, name):
        return getattr(self.transformer, name)

    def __call__(self, *, hidden_states: torch.Tensor, **kwargs):
        n, tokens, _ = hidden_states.shape
        c = self.conditioning.to(hidden_states.device, hidden_states.dtype)
        return self.transformer(hidden_states=torch.cat([hidden_states, c.expand(n, tokens, -1)], dim=2), **kwargs)


class FluxFillDenoiser(FluxDenoiser):
    """Flux.1 Fill: Flux.1's network with the masked image's latents and the mask fed at every
    evaluation (FluxFillPipeline.__call__); the output is the velocity of the 64 latent channels."""

    def __init__(self, loaded, cond, ms, cfg_scale, on_eval, cfg_rescale=0.0, guidance: float | None = None,
                 fill: torch.Tensor | None = None):
        super().__init__(loaded, cond, ms, cfg_scale, on_eval, cfg_rescale, guidance)
        if fill is None:
            raise ValueError("Flux.1 Fill needs its image and mask conditioning")
        self.transformer = FillTransformer(self.transformer, fill)


class SD3Denoiser(FlowDenoiser):
    """SD 3.x (MMDiT): latents as they are (the transformer patches them), timestep = 1000 t."""

    control = None  # ControlNet units, as FluxDenoiser's
    clock = None

    def network(self, x_flow, t, embeds, pooled):
        rows = embeds.shape[0] // x_flow.shape[0]
        n = embeds.shape[0]
        inputs = dict(hidden_states=x_flow.to(self.dtype).repeat(rows, 1, 1, 1),
                      timestep=torch.full((n,), t * NUM_TIMESTEPS, device=x_flow.device, dtype=self.dtype),
                      encoder_hidden_states=embeds, pooled_projections=pooled)
        extra = self.control(inputs, rows) if self.control is not None else {}
        return self.transformer(**inputs, **extra, return_dict=False)[0]


def make_flow_denoiser(loaded, cond: FlowConditioning, ms: FlowSigmas, cfg_scale: float, on_eval,
                       cfg_rescale: float = 0.0, guidance: float | None = None,
                       references: ReferenceTokens | None = None, fill: torch.Tensor | None = None) -> FlowDenoiser:
    if loaded.spec.inpainting_only and loaded.spec.conditioning == "flux":
        return FluxFillDenoiser(loaded, cond, ms, cfg_scale, on_eval, cfg_rescale, guidance, fill)
    if loaded.spec.edits and loaded.spec.conditioning == "flux":
        return FluxKontextDenoiser(loaded, cond, ms, cfg_scale, on_eval, cfg_rescale, guidance, references)
    if loaded.spec.conditioning == "flux":
        return FluxDenoiser(loaded, cond, ms, cfg_scale, on_eval, cfg_rescale, guidance)
    return SD3Denoiser(loaded, cond, ms, cfg_scale, on_eval, cfg_rescale)


def plain_prompt(prompt: str, steps: int) -> str:
    """The text T5 reads (and Flux's CLIP-L, whose pooled vector A1111's weights never reach):
    A1111's emphasis brackets and BREAK removed, prompt editing at its first step."""
    from .prompts import parse_attention

    # BREAK's parse swallows the spaces around it: it stands for one.
    parts = [" " if (t, w) == ("BREAK", -1) else t for t, w in parse_attention(first_step_prompt(prompt, steps))]
    return " ".join("".join(parts).split())


def first_step_prompt(prompt: str, steps: int) -> str:
    """The prompt at its first step (prompt editing), emphasis and BREAK kept: what SD 3's CLIP
    encoders read (:func:`encode_sd3`)."""
    from .prompts import prompt_schedule

    return prompt_schedule(prompt, steps)[0][1] if prompt.strip() else ""


# Families whose flow conditioning reads A1111's emphasis and BREAK (the engine keys its
# conditioning cache by the text with them): SD 3's CLIP hidden states are part of its sequence,
# and T5 reads the weights for SD 3, Flux.1 and Chroma (:func:`encode_t5_weighted`).
WEIGHTED_CONDITIONING = frozenset({"sd3", "flux", "chroma"})


def encode_t5_weighted(tokenizer, encoder, text: str, max_length: int, device,
                       masked: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
    """T5's hidden states of ``text`` (A1111's prompt syntax, its first step) with the weights
    applied as Forge's T5 engine applies them ("Original" emphasis): each bracketed run is
    tokenized on its own, its tokens' hidden states multiplied by its weight, then the whole
    sequence rescaled to its unweighted mean. Padded to ``max_length`` as the pipelines pad (EOS
    then pad tokens, truncated before the EOS). ``masked``: the encoder attends only to the text
    and EOS (Chroma's pipeline does). Returns (hidden states [1, L, D], the tokenizer's mask
    [1, L]), or None when no weight differs from 1: the caller then takes the pipeline's own
    encoding of the plain text, so such prompts stay exactly diffusers'."""
    from .prompts import parse_attention

    # BREAK: T5 has no chunks to close. A run's own spaces go: T5's tokenizer starts every piece
    # at a word anyway, and a trailing space would become a token of its own.
    runs = [(t.strip(), w) for t, w in parse_attention(text) if w != -1 and t.strip()]
    if all(w == 1.0 for _, w in runs):
        return None
    ids: list[int] = []
    weights: list[float] = []
    for run, weight in runs:
        piece = tokenizer(run, add_special_tokens=False).input_ids
        ids += piece
        weights += [weight] * len(piece)
    ids, weights = ids[:max_length - 1] + [tokenizer.eos_token_id], weights[:max_length - 1] + [1.0]
    mask = [1] * len(ids) + [0] * (max_length - len(ids))
    ids += [tokenizer.pad_token_id] * (max_length - len(ids))
    weights += [1.0] * (max_length - len(weights))
    model_device = next(encoder.parameters()).device
    with torch.no_grad():
        z = encoder(torch.tensor([ids], device=model_device),
                    attention_mask=torch.tensor([mask], device=model_device) if masked else None)[0]
    z = z.to(device=device, dtype=encoder.dtype)
    mean = z.float().mean()
    z = z * torch.tensor(weights, dtype=z.dtype, device=z.device)[None, :, None]
    z = z * (mean / z.float().mean()).to(z.dtype)
    return z, torch.tensor([mask], device=device)


SD3_T5_TOKENS = 256  # T5's part of SD 3's sequence (diffusers' default, padded to it; zeros without T5)


def encode_sd3(pipe, text: str, device, min_chunks: int = 1) -> tuple[torch.Tensor, torch.Tensor, int]:
    """SD 3's joint text sequence as Forge builds it: CLIP-L and CLIP-G chunked as A1111 does
    (75 tokens per chunk, ``BREAK`` closes one), their penultimate hidden states weighted per
    token with A1111's emphasis (engine/conditioning), side by side and zero-padded to T5's
    width, then T5's tokens of the text with its weights (:func:`encode_t5_weighted`). The pooled vectors are CLIP-L's and
    CLIP-G's of the first chunk, before weighting (as in A1111 and Forge). A text without
    weights, BREAK or more than 75 tokens gives exactly diffusers' ``encode_prompt``.
    ``min_chunks``: CLIP chunks of the empty text are added up to that many (A1111 pads the
    shorter of prompt and negative prompt so, and CFG batches the two). Returns the sequence,
    the pooled vectors and the number of CLIP chunks."""
    from .conditioning import EncoderSlot, encode_chunks, tokenize_text

    slots = [EncoderSlot(pipe.tokenizer, pipe.text_encoder, "clip_l", True, pooled=True),
             EncoderSlot(pipe.tokenizer_2, pipe.text_encoder_2, "clip_g", True, pooled=True)]
    per_slot = [tokenize_text(text, s, []) for s in slots]
    n = max(min_chunks, *(len(c) for c in per_slot))
    hidden, pooled = [], []
    for slot, chunks in zip(slots, per_slot):
        chunks = chunks + tokenize_text("", slot, []) * (n - len(chunks))  # tokenizers that split differently
        z, p = encode_chunks(slot, chunks, 1)
        hidden.append(z.to(device, pipe.text_encoder.dtype))
        pooled.append(p.to(device, pipe.text_encoder.dtype))
    weighted = (encode_t5_weighted(pipe.tokenizer_3, pipe.text_encoder_3, text, SD3_T5_TOKENS, device)
                if pipe.text_encoder_3 is not None else None)
    t5 = weighted[0] if weighted is not None else pipe._get_t5_prompt_embeds(
        prompt=plain_prompt(text, 1), num_images_per_prompt=1, max_sequence_length=SD3_T5_TOKENS, device=device)
    clip = torch.cat(hidden, dim=-1)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1), n


def encode_flow(loaded, prompt: str, negative: str | None) -> FlowConditioning:
    """Flux: the pipeline's own encoders (T5 up to 512 tokens) on the plain text, T5's states
    then taken with the prompt's weights (:func:`encode_t5_weighted`; CLIP-L gives only the
    pooled vector, which weights never reach, as in Forge). SD 3: :func:`encode_sd3` (T5 up to
    256 tokens). ``prompt`` / ``negative``: the text with A1111's syntax, at its first step."""
    pipe = loaded.pipe
    device = pipe._execution_device
    if loaded.spec.conditioning == "flux":
        length = min(512, int(getattr(pipe.tokenizer_2, "model_max_length", 512) or 512))

        def one(text):
            embeds, pooled, ids = pipe.encode_prompt(prompt=plain_prompt(text, 1), prompt_2=None, device=device,
                                                     num_images_per_prompt=1, max_sequence_length=length)
            weighted = encode_t5_weighted(pipe.tokenizer_2, pipe.text_encoder_2, text, length, device)
            return (weighted[0].to(embeds.dtype) if weighted is not None else embeds), pooled, ids

        embeds, pooled, ids = one(prompt)
        cond = FlowConditioning(embeds, pooled, ids)
        if negative is not None:
            cond.neg_embeds, cond.neg_pooled, _ = one(negative)
        return cond
    with torch.no_grad():
        embeds, pooled, n = encode_sd3(pipe, prompt, device)
        cond = FlowConditioning(embeds, pooled, None)
        if negative is not None:
            cond.neg_embeds, cond.neg_pooled, neg_n = encode_sd3(pipe, negative, device, n)
            if neg_n > n:
                cond.embeds, _, _ = encode_sd3(pipe, prompt, device, neg_n)
    return cond
