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


def job_cost(plan: GenerationPlan, parts: list[str] | None = None) -> tuple[float, dict]:
    """(cost in megapixel-steps, its factors) of a plan (see the module doc)."""
    parts = parts if parts is not None else [p for p, _ in split_and(extract_extra_networks(plan.prompt)[0])]
    chunks = sum(text_chunks(p) for p in parts) + text_chunks(extract_extra_networks(plan.negative_prompt)[0])
    conditioning = max(1.0, chunks / 2)
    steps = plan.steps
    if plan.init is not None:  # img2img runs the last t_enc + 1 steps of the schedule
        steps = int(min(plan.init.denoising_strength, 0.999) * plan.steps) + 1
    pixel_steps = plan.width * plan.height * steps
    if plan.hires is not None:
        pixel_steps += plan.hires.width * plan.hires.height * plan.hires.steps
    images = plan.batch_size * plan.n_iter
    cost = images * pixel_steps * conditioning / 1e6
    return cost, {"images": images, "pixel_steps": pixel_steps, "conditioning": conditioning}


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
            lower.append("the prompt's AND parts / BREAK chunks (conditioning x%g)" % f["conditioning"])
        raise LimitExceeded("cost", f"this job costs {cost:.0f} megapixel-steps ({f['images']} image(s) x "
                                    f"{f['pixel_steps'] / 1e6:.1f} Mpx-steps x conditioning {f['conditioning']:g}); "
                                    f"the limit is {max_cost:g} (DIFFUSIONAPI_MAX_COST): lower "
                                    + ", ".join(lower))
    return cost
