"""What one job may cost, checked at submit (and again when the worker resolves it).

The per-field limits (width, steps, batch size, ...) each bound one factor; the time and memory
a job takes is their product, and the prompt multiplies it too: every ``AND`` part is one more
conditioning the UNet evaluates at every step, and every 75-token chunk (``BREAK`` closes one)
lengthens what cross-attention reads. So a job's **cost** is

    cost = images x sum over passes (width x height x steps) x conditioning / 1e6

in megapixel-steps: ``images`` = batch_size x n_iter; the passes are the first pass (img2img:
the steps that actually run) and the hires pass at its final size; ``conditioning`` is the
number of text chunks the UNet attends to per step — every AND part's chunks plus the negative
prompt's — divided by 2, so a plain prompt with a plain negative prompt counts 1. A job above
``DIFFUSIONAPI_MAX_COST`` is refused with a 422 that says what it costs and what to lower.

Image guidance adds to it. A ControlNet unit is one more network evaluated with the UNet, a copy
of its encoder and middle block: about half a UNet evaluation (``CONTROLNET_SHARE``) at each
evaluation in its window, so a pass's pixel-steps count ``1 + 0.5 x window`` per unit (``window``
= guidance_end - guidance_start; a unit of weight 0 is skipped, a hires option of ``low`` /
``high`` leaves the other pass out). T2I-Adapters run once per pass, not per step: not counted.
An IP-Adapter's image tokens (``IP_ADAPTER_TOKENS`` per reference image) are read by
cross-attention in both passes like text tokens: they count as conditioning, in chunks of 75.

Also here, because they are about what a prompt makes the engine do: brackets nested deeper
than the prompt parser follows, and attention weights that overflow (``(((...)))`` 5,000 deep
is 1.1**5000 = inf, which the worker would only notice as NaN images).
"""
from __future__ import annotations

import math
import re

from .engine.plan import GenerationPlan
from .engine.prompts import MAX_ATTENTION_NESTING, PromptError, extract_extra_networks, parse_attention, split_and

SEED_LIMIT = 2**64  # torch's generators take seeds below this; image k of a job uses seed + k
MAX_ATTENTION_WEIGHT = 1000.0  # far beyond any useful emphasis; larger ones only make NaN images
CHUNK_TOKENS = 75
CONTROLNET_SHARE = 0.5  # a ControlNet evaluation, in UNet evaluations (encoder + middle block of a copy)
IP_ADAPTER_TOKENS = 4   # image tokens per reference image of a plain IP-Adapter (Plus: its own count)
_TOKEN = re.compile(r"\w+|[^\w\s]")  # CLIP's BPE makes at least one token of each
_BREAK = re.compile(r"\bBREAK\b")


class LimitExceeded(ValueError):
    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status


def text_chunks(text: str) -> int:
    """A lower bound on the 75-token chunks a text is encoded as (no tokenizer needed)."""
    return sum(max(1, math.ceil(len(_TOKEN.findall(seg)) / CHUNK_TOKENS)) for seg in _BREAK.split(text))


def check_prompt(text: str, field: str) -> list[str]:
    """The AND parts of ``text`` (LoRA tags removed); LimitExceeded when the prompt nests brackets
    deeper than the parser follows or its weights overflow. Linear in the text's length."""
    try:
        plain, _, _ = extract_extra_networks(text)
    except PromptError as e:
        raise LimitExceeded(field, str(e)) from None
    depth = bracket_depth(plain)
    if depth > MAX_ATTENTION_NESTING:
        raise LimitExceeded(field, f"brackets are nested {depth} deep; at most {MAX_ATTENTION_NESTING}")
    parts = []
    for part, weight in split_and(plain):
        if not math.isfinite(weight) or abs(weight) > MAX_ATTENTION_WEIGHT:
            raise LimitExceeded(field, f"an AND part's weight {weight:g} is beyond ±{MAX_ATTENTION_WEIGHT:g}")
        for run, w in parse_attention(part):
            if w != -1.0 and (not math.isfinite(w) or abs(w) > MAX_ATTENTION_WEIGHT):
                raise LimitExceeded(field, f"the attention weight of {run[:40]!r} comes to {w:g}, beyond "
                                           f"±{MAX_ATTENTION_WEIGHT:g} (nested brackets multiply)")
        parts.append(part)
    return parts


def bracket_depth(text: str) -> int:
    """How deep ``(`` and ``[`` nest (escapes skipped, unmatched closers ignored), in one pass."""
    depth = best = 0
    rounds = squares = 0
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "(":
            rounds += 1
        elif c == "[":
            squares += 1
        elif c == ")" and rounds:
            rounds -= 1
        elif c == "]" and squares:
            squares -= 1
        depth = rounds + squares
        best = max(best, depth)
        i += 1
    return best


def control_factor(plan: GenerationPlan, stage: str) -> float:
    """The network evaluations per UNet evaluation of a pass (``low``: the first pass, ``high``:
    the hires pass) with its ControlNet units: 1 + CONTROLNET_SHARE x window per unit."""
    extra = 0.0
    for u in plan.controlnets:
        if u.weight == 0 or getattr(u.entry, "kind", "controlnet") == "t2i-adapter":
            continue
        if (stage == "high" and u.hires == "low") or (stage == "low" and u.hires == "high" and plan.hires is not None):
            continue  # (as engine/controlnet/units.py: without a hires pass, every unit guides the only one)
        extra += CONTROLNET_SHARE * (u.guidance_end - u.guidance_start)
    return 1.0 + extra


def job_cost(plan: GenerationPlan, parts: list[str] | None = None) -> tuple[float, dict]:
    """(cost in megapixel-steps, its factors) of a plan (see the module doc)."""
    parts = parts if parts is not None else [p for p, _ in split_and(extract_extra_networks(plan.prompt)[0])]
    chunks = sum(text_chunks(p) for p in parts) + text_chunks(extract_extra_networks(plan.negative_prompt)[0])
    # IP-Adapter tokens join the text in both passes (the unconditional one sees a zero embedding)
    image_tokens = sum(len(a.images) * getattr(a.entry, "tokens", IP_ADAPTER_TOKENS)
                       for a in plan.ip_adapters if a.weight != 0)
    conditioning = max(1.0, chunks / 2 + image_tokens / CHUNK_TOKENS)
    steps = plan.steps
    if plan.init is not None:  # img2img runs the last t_enc + 1 steps of the schedule
        steps = int(min(plan.init.denoising_strength, 0.999) * plan.steps) + 1
    first = plan.width * plan.height * steps
    hires = plan.hires.width * plan.hires.height * plan.hires.steps if plan.hires is not None else 0
    pixel_steps = first + hires
    guided = first * control_factor(plan, "low") + hires * control_factor(plan, "high")
    images = plan.batch_size * plan.n_iter
    cost = images * guided * conditioning / 1e6
    return cost, {"images": images, "pixel_steps": pixel_steps, "conditioning": conditioning,
                  "control": guided / pixel_steps if pixel_steps else 1.0}


def check_plan(plan: GenerationPlan, max_cost: float) -> float:
    """LimitExceeded unless the plan is within the limits no single field can see; its cost."""
    images = plan.batch_size * plan.n_iter
    if plan.seed + images - 1 >= SEED_LIMIT:
        raise LimitExceeded("seed", f"with {images} images the seeds run from {plan.seed} to "
                                    f"{plan.seed + images - 1}; the last must be below 2**64")
    parts = check_prompt(plan.prompt, "prompt")
    check_prompt(plan.negative_prompt, "negative_prompt")
    cost, f = job_cost(plan, parts)
    if cost > max_cost:
        lower = ["width/height", "steps"]
        if plan.hires is not None:
            lower += ["hires.scale", "hires.steps"]
        if images > 1:
            lower += ["batch_size", "n_iter"]
        if f["conditioning"] > 1:
            lower.append("the prompt's AND parts / BREAK chunks" + (" / ip_adapters images" if plan.ip_adapters else "")
                         + " (conditioning x%g)" % f["conditioning"])
        control = ""
        if f["control"] > 1:
            lower.append(f"the controlnets units or their guidance windows (x{f['control']:.3g})")
            control = f" x ControlNets {f['control']:.3g}"
        shown = f"{cost:.0f}" if cost >= 100 else f"{cost:.3g}"
        raise LimitExceeded("cost", f"this job costs {shown} megapixel-steps ({f['images']} image(s) x "
                                    f"{f['pixel_steps'] / 1e6:.3g} Mpx-steps{control} x conditioning "
                                    f"{f['conditioning']:g}); "
                                    f"the limit is {max_cost:g} (DIFFUSIONAPI_MAX_COST): lower "
                                    + ", ".join(lower))
    return cost
