"""Prompts to text-encoder conditioning, the way AUTOMATIC1111 builds it.

- Each text is parsed for attention (``engine/prompts.py``), tokenized piece by piece and cut
  into chunks of 75 tokens, each framed by start/end tokens and padded to 77; a chunk boundary
  that falls within 20 tokens after a comma moves the text after that comma to the next chunk;
  ``BREAK`` closes the current chunk. Chunks are encoded separately and concatenated.
- Weights multiply the encoder's hidden states per token, and the chunk is rescaled to its
  original mean ("Original" emphasis). The rescale is skipped when either mean is within
  1e-4 of zero relative to the mean magnitude: there the ratio is noise, not a correction (a
  freshly initialised final LayerNorm makes the mean exactly 0; trained CLIPs are far from it).
- Clip skip N: SD 1.5 takes the N-th hidden state from the end and applies the final LayerNorm
  (N=1: the normal output). SDXL is conditioned on the penultimate layer by design (N=1 and 2
  both mean it), N > 2 goes further back, on both encoders, without the LayerNorm.
- Textual-inversion embeddings replace the tokens of their name, at the token-embedding layer.
- SDXL: CLIP-L and CLIP-G are chunked and weighted separately and concatenated per token; the
  pooled embedding is CLIP-G's, from the first chunk. An empty negative prompt is zeros where
  the pipeline asks for it (``force_zeros_for_empty_prompt``), as A1111 does for SDXL.
- Prompt editing, alternation and AND give several conditionings per job: :class:`StageConditioning`
  hands the denoiser the batch for the current model evaluation.

Encoded texts are kept in an LRU (:class:`ConditioningCache`), keyed by the encoder objects,
the text, clip skip, the embeddings in play and the active LoRAs (which change text encoders).
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from . import prompts as pp

CHUNK = 75
COMMA_BACKTRACK = 20
_PLACEHOLDER = 0  # token id under an embedding's vectors (replaced before the first layer)


@dataclass
class EncoderSlot:
    tokenizer: object
    encoder: torch.nn.Module
    key: str | None      # which tensor of an SDXL embedding feeds it: "clip_l" / "clip_g"; None: SD 1.5
    xl: bool             # SDXL layer rule (penultimate, no final LayerNorm)
    pooled: bool = False  # gives the pooled embedding (CLIP-G with projection)

    @property
    def width(self) -> int:
        return int(self.encoder.get_input_embeddings().weight.shape[1])


def encoder_slots(pipe, xl: bool) -> list[EncoderSlot]:
    slots = []
    if getattr(pipe, "text_encoder", None) is not None:
        slots.append(EncoderSlot(pipe.tokenizer, pipe.text_encoder, "clip_l" if xl else None, xl))
    if xl and getattr(pipe, "text_encoder_2", None) is not None:
        slots.append(EncoderSlot(pipe.tokenizer_2, pipe.text_encoder_2, "clip_g", True, pooled=True))
    return slots


@dataclass
class Chunk:
    tokens: list[int]
    weights: list[float]
    fixes: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (offset, vectors [n, width])


@dataclass
class Embedding:
    """An embedding usable by this model: name, per-slot vectors, the file's short hash."""
    name: str
    vectors: dict  # slot key (None for SD 1.5) -> tensor [n, width]
    shorthash: str = ""


@dataclass
class EncodeReport:
    used_embeddings: dict[str, str] = field(default_factory=dict)  # name -> short hash
    warnings: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- tokenize

def _comma(tokenizer) -> int | None:
    return tokenizer.get_vocab().get(",</w>")


def _ids(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]


class _Matcher:
    """Finds embedding names in a token sequence (longest name first), as token ids."""

    def __init__(self, tokenizer, embeddings: list[Embedding]):
        self.by_first: dict[int, list[tuple[list[int], Embedding]]] = {}
        names = _ids(tokenizer, [e.name for e in embeddings])
        for ids, emb in zip(names, embeddings):
            if ids:
                self.by_first.setdefault(ids[0], []).append((ids, emb))
        for v in self.by_first.values():
            v.sort(key=lambda x: len(x[0]), reverse=True)

    def at(self, tokens: list[int], pos: int):
        for ids, emb in self.by_first.get(tokens[pos], ()):
            if tokens[pos:pos + len(ids)] == ids:
                return emb, len(ids)
        return None, 0


def tokenize_text(text: str, slot: EncoderSlot, embeddings: list[Embedding],
                  report: EncodeReport | None = None) -> list[Chunk]:
    """One text -> its 77-token chunks (start, 75 tokens, end), with weights and embedding fixes."""
    tok = slot.tokenizer
    bos, eos = tok.bos_token_id, tok.eos_token_id
    comma = _comma(tok)
    pieces = pp.parse_attention(text)
    ids_list = iter(_ids(tok, [t for t, w in pieces if (t, w) != pp.BREAK]))
    matcher = _Matcher(tok, embeddings) if embeddings else None
    chunks: list[Chunk] = []
    cur = Chunk([], [])
    last_comma = -1

    def close() -> None:
        nonlocal cur, last_comma
        pad = CHUNK - len(cur.tokens)
        chunks.append(Chunk([bos] + cur.tokens + [eos] * (pad + 1), [1.0] + cur.weights + [1.0] * (pad + 1),
                            [(off + 1, vec) for off, vec in cur.fixes]))
        cur = Chunk([], [])
        last_comma = -1

    for piece in pieces:
        if piece == pp.BREAK:
            close()
            continue
        weight = piece[1]
        ids = next(ids_list)
        pos = 0
        while pos < len(ids):
            token = ids[pos]
            if token == comma:
                last_comma = len(cur.tokens)
            elif len(cur.tokens) == CHUNK and last_comma != -1 and len(cur.tokens) - last_comma <= COMMA_BACKTRACK:
                # Keep the words after the last comma together: they start the next chunk.
                cut = last_comma + 1
                moved = Chunk(cur.tokens[cut:], cur.weights[cut:],
                              [(off - cut, v) for off, v in cur.fixes if off >= cut])
                cur = Chunk(cur.tokens[:cut], cur.weights[:cut], [(o, v) for o, v in cur.fixes if o < cut])
                close()
                cur = moved
            if len(cur.tokens) == CHUNK:
                close()
            emb, span = matcher.at(ids, pos) if matcher else (None, 0)
            if emb is None:
                cur.tokens.append(token)
                cur.weights.append(weight)
                pos += 1
                continue
            vec = emb.vectors[slot.key]
            n = min(int(vec.shape[0]), CHUNK)
            if len(cur.tokens) + n > CHUNK:
                close()
            cur.fixes.append((len(cur.tokens), vec[:n]))
            cur.tokens += [_PLACEHOLDER] * n
            cur.weights += [weight] * n
            pos += span
            if report is not None:
                report.used_embeddings[emb.name] = emb.shorthash
    if cur.tokens or not chunks:
        close()
    return chunks


# ---------------------------------------------------------------------------- encode

def _final_norm(encoder):
    return encoder.final_layer_norm if hasattr(encoder, "final_layer_norm") else encoder.text_model.final_layer_norm


def _hidden_layer_count(encoder) -> int:
    return int(encoder.config.num_hidden_layers)


def apply_emphasis(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis on one chunk: scale each token, restore the chunk's mean
    (guarded: no rescale when a mean is ~0, where the ratio would be noise)."""
    if bool((weights == 1.0).all()):
        return z
    zf = z.float()
    before = zf.mean()
    zf = zf * weights.to(zf.device, torch.float32).reshape(-1, 1)
    after = zf.mean()
    scale = zf.abs().mean()
    eps = 1e-4 * float(scale) if float(scale) > 0 else 0.0
    if abs(float(after)) > eps and abs(float(before)) > eps:
        zf = zf * (before / after)
    return zf.to(z.dtype)


def encode_chunks(slot: EncoderSlot, chunks: list[Chunk], clip_skip: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[1, 77*len(chunks), width] hidden states (weighted) and, for CLIP-G, the pooled vector of chunk 0."""
    enc = slot.encoder
    device = enc.device
    pad = slot.tokenizer.pad_token_id
    rows = []
    for c in chunks:
        tokens = list(c.tokens)
        if pad is not None and pad != slot.tokenizer.eos_token_id:  # OpenCLIP pads after the end token
            end = tokens.index(slot.tokenizer.eos_token_id)
            tokens[end + 1:] = [pad] * (len(tokens) - end - 1)
        rows.append(tokens)
    ids = torch.tensor(rows, dtype=torch.long, device=device)
    fixes = [(b, off, vec) for b, c in enumerate(chunks) for off, vec in c.fixes]
    handle = None
    if fixes:
        def inject(_module, _inputs, output):
            output = output.clone()
            for b, off, vec in fixes:
                output[b, off:off + vec.shape[0]] = vec.to(output.device, output.dtype)
            return output
        handle = enc.get_input_embeddings().register_forward_hook(inject)
    layers = _hidden_layer_count(enc)
    try:
        if slot.xl:
            skip = min(max(clip_skip, 2), layers)
            out = enc(ids, output_hidden_states=True)
            z = out.hidden_states[-skip]
        elif clip_skip > 1:
            out = enc(ids, output_hidden_states=True)
            z = _final_norm(enc)(out.hidden_states[-min(clip_skip, layers)])
        else:
            out = enc(ids)
            z = out.last_hidden_state
    finally:
        if handle is not None:
            handle.remove()
    pooled = out.text_embeds[:1] if slot.pooled else None
    weights = torch.tensor([c.weights for c in chunks], dtype=torch.float32)
    z = torch.cat([apply_emphasis(z[i], weights[i]) for i in range(len(chunks))]).unsqueeze(0)
    return z, pooled


@dataclass
class EncodedText:
    hidden: torch.Tensor          # [1, 77*k, width (all slots together)]
    pooled: torch.Tensor | None   # [1, projection] (SDXL)
    used_embeddings: dict[str, str] = field(default_factory=dict)

    @property
    def chunks(self) -> int:
        return self.hidden.shape[1] // (CHUNK + 2)


def encode_text(slots: list[EncoderSlot], text: str, clip_skip: int, embeddings: list[Embedding]) -> EncodedText:
    """One plain text (after scheduling) through every encoder of the model."""
    report = EncodeReport()
    per_slot = [tokenize_text(text, s, embeddings, report) for s in slots]
    n = max(len(c) for c in per_slot)
    hidden, pooled = [], None
    for slot, chunks in zip(slots, per_slot):
        if len(chunks) < n:  # tokenizers that split differently: pad with empty chunks
            chunks = chunks + tokenize_text("", slot, []) * (n - len(chunks))
        z, p = encode_chunks(slot, chunks, clip_skip)
        hidden.append(z)
        if p is not None:
            pooled = p
    return EncodedText(torch.cat(hidden, dim=-1), pooled, report.used_embeddings)


# ---------------------------------------------------------------------------- cache

class ConditioningCache:
    """LRU of encoded texts. Entries hold weak references to the encoders they came from, so
    a model that was unloaded (and a new one at the same address) never matches."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get_or_encode(self, slots, key: tuple, make):
        if self.capacity <= 0:
            self.misses += 1
            return make()
        full = (tuple(id(s.encoder) for s in slots),) + key
        with self._lock:
            item = self._items.get(full)
            if item is not None and all(r() is s.encoder for r, s in zip(item[0], slots)):
                self._items.move_to_end(full)
                self.hits += 1
                return item[1]
        value = make()
        with self._lock:
            self.misses += 1
            self._items[full] = ([weakref.ref(s.encoder) for s in slots], value)
            self._items.move_to_end(full)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


# ---------------------------------------------------------------------------- schedules

Schedule = list  # [(end_at_step, EncodedText), ...]


def _pick(schedule: Schedule, step: int) -> EncodedText:
    for end, enc in schedule:
        if step <= end:
            return enc
    return schedule[-1][1]  # past the planned steps (DPM adaptive): the last one


def _pad_to(z: torch.Tensor, chunks: int, empty: torch.Tensor) -> torch.Tensor:
    have = z.shape[1] // (CHUNK + 2)
    if have >= chunks:
        return z
    return torch.cat([z] + [empty.to(z.dtype)] * (chunks - have), dim=1)


@dataclass
class StageConditioning:
    """What the CFG denoiser needs for one sampling stage: the negative and each AND part,
    each a schedule over model evaluations; ``batch(step)`` gives the UNet's inputs."""
    negative: Schedule
    parts: list[tuple[float, Schedule]]
    empty: torch.Tensor                  # one empty chunk's hidden states, for padding
    zero_negative: bool = False          # SDXL's empty negative prompt: zeros
    time_ids: torch.Tensor | None = None      # SDXL micro-conditioning: cond row
    neg_time_ids: torch.Tensor | None = None  # and the negative's row
    warnings: list[str] = field(default_factory=list)
    _last: tuple | None = None

    @property
    def weights(self) -> list[float]:
        return [w for w, _ in self.parts]

    @property
    def is_static(self) -> bool:
        return len(self.negative) == 1 and all(len(s) == 1 for _, s in self.parts)

    def used_embeddings(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for _, sched in self.parts:
            for _, enc in sched:
                out.update(enc.used_embeddings)
        for _, enc in self.negative:
            out.update(enc.used_embeddings)
        return out

    def batch(self, step: int) -> tuple[torch.Tensor, dict | None]:
        """[negative; part 1; part 2; ...] hidden states and SDXL's added conditions at ``step``
        (counted in model evaluations from the start of the job's schedule)."""
        neg = _pick(self.negative, step)
        conds = [_pick(s, step) for _, s in self.parts]
        key = (id(neg),) + tuple(id(c) for c in conds)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        n = max(x.hidden.shape[1] for x in [neg, *conds]) // (CHUNK + 2)
        rows = [_pad_to(x.hidden, n, self.empty) for x in [neg, *conds]]
        if self.zero_negative:
            rows[0] = torch.zeros_like(rows[0])
        embeds = torch.cat(rows)
        added = None
        if self.time_ids is not None:
            pooled = [x.pooled for x in [neg, *conds]]
            if self.zero_negative:
                pooled[0] = torch.zeros_like(pooled[0])
            added = {"text_embeds": torch.cat(pooled),
                     "time_ids": torch.cat([self.neg_time_ids] + [self.time_ids] * len(conds))}
        self._last = (key, (embeds, added))
        return embeds, added


def evaluations_per_step(algorithm: str) -> int:
    """A1111 counts prompt-editing steps in model evaluations and doubles the plan for its
    second-order samplers; so do we."""
    return 2 if algorithm in ("heun", "dpm_2", "dpmpp_2s_ancestral", "dpmpp_sde") else 1


class PromptEncoder:
    """Builds :class:`StageConditioning` for a model, with the LRU cache."""

    def __init__(self, cache_size: int):
        self.cache = ConditioningCache(cache_size)

    def _encode(self, slots, text: str, clip_skip: int, embeddings: list[Embedding], extra_key: tuple) -> EncodedText:
        emb_key = tuple(sorted((e.name, e.shorthash, id(next(iter(e.vectors.values())))) for e in embeddings))
        return self.cache.get_or_encode(slots, (text, clip_skip, emb_key, extra_key),
                                        lambda: encode_text(slots, text, clip_skip, embeddings))

    def build(self, pipe, *, xl: bool, prompt: str, negative: str, clip_skip: int, total_steps: int,
              hires_steps: int | None = None, embeddings: list[Embedding] = (), extra_key: tuple = (),
              zero_empty_negative: bool = False) -> StageConditioning:
        """``prompt`` without its LoRA tags. ``total_steps``: the first pass's evaluations; with
        ``hires_steps`` (the hires pass's evaluations) the schedule is the hires pass's."""
        slots = encoder_slots(pipe, xl)
        embeddings = list(embeddings)

        def schedule(text: str) -> Schedule:
            return [(end, self._encode(slots, t, clip_skip, embeddings, extra_key))
                    for end, t in pp.prompt_schedule(text, total_steps, hires_steps)]

        parts = [(w, schedule(t)) for t, w in pp.split_and(prompt)]
        neg = schedule(negative)
        empty = self._encode(slots, "", clip_skip, [], extra_key).hidden
        return StageConditioning(neg, parts, empty, zero_negative=zero_empty_negative and negative == "")


# ---------------------------------------------------------------------------- embeddings for a job

_FAMILY_LABELS = {"sd15": "SD 1.5", "sdxl": "SDXL"}


def usable_embeddings(entries, load, slots: list[EncoderSlot], model_family: str, texts: list[str],
                      hash_of) -> tuple[list[Embedding], list[str]]:
    """The embeddings a job's texts may call, fitted to the model's encoders, and a warning for
    each one named in a prompt that does not fit (it is skipped and its word read as text, as
    A1111 skips it). ``entries``: registry entries; ``load(entry)`` -> (tensors or None, why not)."""
    haystack = "\n".join(texts).lower()
    found, warnings = [], []
    xl = model_family != "sd15"
    for entry in entries:
        if entry.name.lower() not in haystack:
            continue
        tensors, error = load(entry)
        if tensors is None:
            warnings.append(f"embedding {entry.name!r} skipped: {error}")
            continue
        is_xl = "clip_g" in tensors
        if is_xl != xl:
            warnings.append(f"embedding {entry.name!r} is for {_FAMILY_LABELS['sdxl' if is_xl else 'sd15']}, "
                            f"the model is {_FAMILY_LABELS['sdxl' if xl else 'sd15']}: skipped")
            continue
        vectors = {}
        for slot in slots:
            vec = tensors[slot.key] if slot.key else tensors[""]
            if vec.shape[1] != slot.width:
                break
            vectors[slot.key] = vec
        else:
            found.append(Embedding(entry.name, vectors, hash_of(entry.path)[:12]))
            continue
        warnings.append(f"embedding {entry.name!r} does not fit this model's text encoder (width "
                        f"{int(vec.shape[1])}, expected {slot.width}): skipped")
    return found, warnings


def ti_hashes_infotext(used: dict[str, str]) -> str | None:
    """A1111's ``TI hashes`` value: ``name: shorthash, ...`` (names without ':' or ',')."""
    items = [f"{name.replace(':', '').replace(',', '')}: {h}" for name, h in used.items() if h]
    return ", ".join(items) or None
