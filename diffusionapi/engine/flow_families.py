"""Flow-matching families whose text conditioning is one masked sequence (Qwen-Image, Z-Image,
Chroma, Flux.2) on the engine's samplers: their denoisers and prompt encoders. The engine calls
:func:`make_denoiser` and :func:`encode` for every flow family; Flux.1 and SD 3.x go on to
engine/flow.py.

Each transformer has its own conventions, read from its diffusers pipeline's sampling loop:

* Qwen-Image (QwenImagePipeline): latents packed 2x2 as Flux's, timestep = flow time t, the
  velocity as Flux's. Its "true CFG" takes a negative pass and then rescales the guided
  velocity of each 2x2 patch to the norm of the conditional one; the pipeline's
  ``true_cfg_scale`` is our ``cfg_scale`` (CFG 1 = one pass, the negative prompt unused).
  Prompt and negative prompt have their own lengths and padding masks, so the two passes run
  one after the other, as the pipeline runs them.
* Z-Image (ZImagePipeline): a list of [C, 1, h, w] latents and a list of caption sequences
  (unpadded), timestep 1 - t, and the *negated* velocity. Its CFG is
  ``pos + g * (pos - neg)``, which is A1111's ``neg + cfg * (pos - neg)`` at cfg = g + 1:
  ``cfg_scale`` 1 is the pipeline's ``guidance_scale`` 0 (Turbo's setting).
* Chroma (ChromaPipeline): Flux.1's packing, positions and timestep (flow time t), T5 alone
  with its padding masked except the first pad token (the pipeline's rule), no guidance
  embedding; plain CFG, ``guidance_scale`` = ``cfg_scale``.
* Flux.2 (Flux2KleinPipeline): the engine's [b, 32, h, w] latents patchified 2x2 into 128-channel
  tokens in row-major order with (t, h, w, l) positions, timestep t, plain CFG (klein base; the
  distilled klein runs at CFG 1), no guidance embedding on klein (the distilled CFG scale is fed
  where the transformer has one). An edit job's reference images (Flux2KleinPipeline's ``image``)
  are appended as extra tokens, each reference with its own time coordinate 10, 20, ...
  (:func:`flux2_reference_tokens`); only the image's own tokens come out.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .flow import (FlowDenoiser, ReferenceTokens, encode_flow, encode_t5_weighted, image_ids, make_flow_denoiser,
                   pack, plain_prompt, unpack)
from .guidance import rescale_cfg
from .vae_io import patchify, unpatchify


@dataclass
class SequenceConditioning:
    """The prompt's text sequence (and the negative prompt's, when CFG runs a negative pass):
    [1, seq, dim] with a padding mask (Qwen-Image: None when nothing is padded; Chroma) or with
    text positions (Flux.2: [1, seq, 4]); Z-Image: [seq, dim], unpadded."""
    embeds: torch.Tensor
    mask: torch.Tensor | None = None
    neg_embeds: torch.Tensor | None = None
    neg_mask: torch.Tensor | None = None
    text_ids: torch.Tensor | None = None
    neg_text_ids: torch.Tensor | None = None


class SequenceDenoiser(FlowDenoiser):
    """The shared part: one pass per prompt (their sequences differ in length), A1111's CFG
    combination (plus CFG rescale)."""

    def run(self, x_flow: torch.Tensor, t: float, embeds, mask, text_ids) -> torch.Tensor:
        """The transformer's velocity for one prompt, [b, C, h, w] float."""
        raise NotImplementedError

    def passes(self, x_flow: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(velocity of the prompt, velocity of the negative prompt or None)."""
        c = self.cond
        pos = self.run(x_flow, t, c.embeds, c.mask, c.text_ids)
        neg = self.run(x_flow, t, c.neg_embeds, c.neg_mask, c.neg_text_ids) if self.negative_pass else None
        return pos, neg

    def combine(self, pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        guided = neg + (pos - neg) * self.cfg
        if self.rescale:
            guided = rescale_cfg(guided, neg, [pos], [1.0], self.rescale)
        return guided

    def velocity(self, x_flow: torch.Tensor, t: float) -> torch.Tensor:
        self.on_eval()
        self.evals += 1
        pos, neg = self.passes(x_flow, t)
        return pos if neg is None else self.combine(pos, neg)


class QwenImageDenoiser(SequenceDenoiser):
    def run(self, x_flow, t, embeds, mask, text_ids):
        b, _, h, w = x_flow.shape
        dev = x_flow.device
        out = self.transformer(
            hidden_states=pack(x_flow.to(self.dtype)), timestep=torch.full((b,), t, device=dev, dtype=self.dtype),
            encoder_hidden_states=embeds.expand(b, -1, -1).to(dev, self.dtype),
            encoder_hidden_states_mask=None if mask is None else mask.expand(b, -1).to(dev),
            img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
        return unpack(out.float(), h, w)

    def combine(self, pos, neg):
        # QwenImagePipeline: the guided velocity of each 2x2 patch (a packed token) keeps the
        # conditional velocity's norm.
        h, w = pos.shape[-2:]
        guided = pack(neg + (pos - neg) * self.cfg)
        guided = guided * (pack(pos).norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))
        guided = unpack(guided, h, w)
        if self.rescale:
            guided = rescale_cfg(guided, neg, [pos], [1.0], self.rescale)
        return guided


class ZImageDenoiser(SequenceDenoiser):
    def passes(self, x_flow, t):
        b = x_flow.shape[0]
        dev = x_flow.device
        caps = [self.cond.embeds.to(dev, self.dtype)] * b
        if self.negative_pass:
            caps += [self.cond.neg_embeds.to(dev, self.dtype)] * b
        rows = len(caps) // b
        latents = list(x_flow.to(self.dtype).repeat(rows, 1, 1, 1).unsqueeze(2).unbind(0))
        timestep = torch.full((len(caps),), 1.0 - t, device=dev, dtype=self.dtype)
        out = self.transformer(latents, timestep, caps, return_dict=False)[0]
        v = -torch.stack([o.float() for o in out]).squeeze(2)  # it predicts noise - x0
        return (v, None) if rows == 1 else (v[:b], v[b:])


class ChromaDenoiser(SequenceDenoiser):
    def run(self, x_flow, t, embeds, mask, text_ids):
        b, _, h, w = x_flow.shape
        dev = x_flow.device
        img = image_ids(h, w, dev, self.dtype)
        # The text mask, then every image token (ChromaPipeline._prepare_attention_mask). Kept in
        # the pipeline's float type as it gives it (the transformer's attention then takes the
        # pairwise products as an additive bias), so that images equal diffusers' own.
        full = torch.cat([mask.to(dev, self.dtype), torch.ones(1, len(img), device=dev, dtype=self.dtype)], 1)
        out = self.transformer(hidden_states=pack(x_flow.to(self.dtype)),
                               timestep=torch.full((b,), t, device=dev, dtype=self.dtype),
                               encoder_hidden_states=embeds.expand(b, -1, -1).to(dev, self.dtype),
                               txt_ids=torch.zeros(embeds.shape[1], 3, device=dev, dtype=self.dtype), img_ids=img,
                               attention_mask=full.expand(b, -1), return_dict=False)[0]
        return unpack(out.float(), h, w)


def flux2_tokens(z: torch.Tensor) -> torch.Tensor:
    """Flux.2 latents [b, 32, h, w] -> tokens [b, h*w/4, 128]: patchified 2x2, row-major
    (Flux2Pipeline._pack_latents)."""
    p = patchify(z)
    b, c, h, w = p.shape
    return p.reshape(b, c, h * w).permute(0, 2, 1)


def flux2_ids(h: int, w: int, t: int = 0) -> torch.Tensor:
    """(t, h, w, l) of each token of an [h, w] patch grid, row-major ([h*w, 4];
    Flux2Pipeline._prepare_latent_ids; _prepare_image_ids for a reference, whose t is not 0)."""
    return torch.cartesian_prod(torch.tensor([t]), torch.arange(h), torch.arange(w), torch.arange(1))


def flux2_reference_tokens(latents: list[torch.Tensor]) -> ReferenceTokens:
    """An edit job's reference latents ([1, 32, h, w] each, at their own sizes) as
    Flux2KleinPipeline.prepare_image_latents makes them: each one's tokens at time coordinate
    10 * (k + 1) (_prepare_image_ids' scale 10), all of them in one sequence."""
    tokens = [flux2_tokens(z) for z in latents]
    ids = [flux2_ids(z.shape[-2] // 2, z.shape[-1] // 2, 10 * (k + 1)) for k, z in enumerate(latents)]
    return ReferenceTokens(torch.cat(tokens, dim=1), torch.cat(ids))


class Flux2Denoiser(SequenceDenoiser):
    def __init__(self, loaded, cond, ms, cfg_scale, on_eval, cfg_rescale=0.0, guidance: float | None = None,
                 references: ReferenceTokens | None = None):
        super().__init__(loaded, cond, ms, cfg_scale, on_eval, cfg_rescale)
        self.guidance = guidance if self.transformer.config.get("guidance_embeds", False) else None
        self.references = references

    def run(self, x_flow, t, embeds, mask, text_ids):
        b, _, h, w = x_flow.shape
        dev = x_flow.device
        own = flux2_tokens(x_flow.to(self.dtype))
        ids = flux2_ids(h // 2, w // 2).to(dev)
        tokens = own
        if self.references is not None:  # an edit job: the references follow the image's tokens
            tokens = torch.cat([own, self.references.tokens.to(dev, self.dtype).expand(b, -1, -1)], dim=1)
            ids = torch.cat([ids, self.references.ids.to(dev)])
        guidance = None if self.guidance is None else torch.full((b,), float(self.guidance), device=dev,
                                                                  dtype=torch.float32)
        out = self.transformer(hidden_states=tokens,
                               timestep=torch.full((b,), t, device=dev, dtype=self.dtype), guidance=guidance,
                               encoder_hidden_states=embeds.expand(b, -1, -1).to(dev, self.dtype),
                               txt_ids=text_ids.expand(b, -1, -1).to(dev), img_ids=ids.expand(b, -1, -1),
                               return_dict=False)[0]
        c = own.shape[2]
        return unpatchify(out[:, :own.shape[1]].permute(0, 2, 1).reshape(b, c, h // 2, w // 2).float())


DENOISERS = {"qwen-image": QwenImageDenoiser, "z-image": ZImageDenoiser, "chroma": ChromaDenoiser,
             "flux2": Flux2Denoiser}


def make_denoiser(loaded, cond, ms, cfg_scale: float, on_eval, cfg_rescale: float = 0.0,
                  guidance: float | None = None, references=None, fill=None) -> FlowDenoiser:
    """The denoiser of any flow family (the distilled guidance goes to the transformers that take
    it; an edit job's reference tokens to Flux.1 Kontext and Flux.2, an inpainting job's image and mask
    conditioning to Flux.1 Fill: engine/flow.py)."""
    kind = loaded.spec.conditioning
    if kind == "flux2":
        return Flux2Denoiser(loaded, cond, ms, cfg_scale, on_eval, cfg_rescale, guidance, references)
    if kind in DENOISERS:
        return DENOISERS[kind](loaded, cond, ms, cfg_scale, on_eval, cfg_rescale)
    return make_flow_denoiser(loaded, cond, ms, cfg_scale, on_eval, cfg_rescale, guidance, references, fill)


def encode(loaded, prompt: str, negative: str | None):
    """Any flow family's text conditioning (the pipeline's own encode_prompt)."""
    if loaded.spec.conditioning in DENOISERS:
        return encode_sequence(loaded, prompt, negative)
    return encode_flow(loaded, prompt, negative)


def encode_sequence(loaded, prompt: str, negative: str | None) -> SequenceConditioning:
    """The pipeline's own encode_prompt (its chat template, its hidden-state layer)."""
    pipe = loaded.pipe
    device = pipe._execution_device
    if loaded.spec.conditioning == "qwen-image":
        embeds, mask = pipe.encode_prompt(prompt=prompt, device=device, num_images_per_prompt=1,
                                          max_sequence_length=1024)
        cond = SequenceConditioning(embeds, mask)
        if negative is not None:
            cond.neg_embeds, cond.neg_mask = pipe.encode_prompt(prompt=negative, device=device,
                                                                num_images_per_prompt=1, max_sequence_length=1024)
        return cond
    if loaded.spec.conditioning == "flux2":
        embeds, ids = pipe.encode_prompt(prompt=prompt, device=device, num_images_per_prompt=1, max_sequence_length=512)
        cond = SequenceConditioning(embeds, text_ids=ids)
        if negative is not None:
            cond.neg_embeds, cond.neg_text_ids = pipe.encode_prompt(prompt=negative, device=device,
                                                                    num_images_per_prompt=1, max_sequence_length=512)
        return cond
    if loaded.spec.conditioning == "chroma":  # the text with A1111's weights (T5's states weighted, as Forge)
        embeds, _, mask, neg_embeds, _, neg_mask = pipe.encode_prompt(
            prompt=plain_prompt(prompt, 1), negative_prompt=plain_prompt(negative, 1) if negative is not None else None,
            device=device, num_images_per_prompt=1, do_classifier_free_guidance=negative is not None,
            max_sequence_length=512)
        cond = SequenceConditioning(embeds, mask, neg_embeds, neg_mask)
        for text, attr in ((prompt, "embeds"), (negative, "neg_embeds")):
            weighted = encode_t5_weighted(pipe.tokenizer, pipe.text_encoder, text, 512, device, masked=True) \
                if text is not None else None
            if weighted is not None:
                z, tokens = weighted  # the transformer sees the text, EOS and one pad (the pipeline's rule)
                seen = (torch.arange(tokens.shape[1], device=device)[None] <= tokens.sum(dim=1, keepdim=True))
                setattr(cond, attr, z.to(embeds.dtype))
                setattr(cond, "mask" if attr == "embeds" else "neg_mask", seen.to(mask.dtype))
        return cond
    pos, neg = pipe.encode_prompt(prompt=prompt, device=device, do_classifier_free_guidance=negative is not None,
                                  negative_prompt=negative, max_sequence_length=512)
    return SequenceConditioning(pos[0], None, neg[0] if negative is not None else None)
